"""--workers N (issue 14): N capture processes on one PACKET_FANOUT group, one view.
The same traffic, counted by one process and by two workers, must give the same
numbers everywhere (addresses, rules, remotes, connections, HTTP); a worker killed
is replaced; SIGTERM leaves no process behind."""
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

import netns
from harness import TWIN_FLOWS as FLOWS
from harness import Lpd, alive, children, metrics, parse_lines, read_socket, twin_run, wait_for

pytestmark = pytest.mark.live

PORTS = {1: 59123, 2: 59124}


@pytest.fixture(scope="module")
def runs():
    """One process and two workers on the same interface at the same time: the same
    frames, so every number must be the same."""
    out = twin_run({n: (PORTS[n], ("--workers", str(n))) for n in (1, 2)})
    assert len(out[1]["children"]) == 0 and len(out[2]["children"]) == 2, \
        {n: out[n]["children"] for n in out}
    return out


def test_two_workers_count_what_one_process_counts(runs):
    one, two = runs[1]["metrics"], runs[2]["metrics"]
    assert one and set(one) == set(two)
    diff = {k: (one[k], two[k]) for k in one if one[k] != two[k]}
    assert not diff, diff
    # and it is not nothing: every kind of series saw traffic
    for prefix in ("lpd_receive_bytes_total", "lpd_rule_bytes_total", "ip_traffic_rx_bytes_total",
                   "lpd_connections", "http_server_request_duration_seconds_count"):
        assert sum(v for k, v in one.items() if k[0] == prefix) > 0, prefix


def test_the_rule_socket_says_the_same(runs):
    assert runs[1]["socket"] == runs[2]["socket"]
    assert [r[0] for r in runs[2]["socket"]] == ["udp", "tcp", "web", "ping"]
    assert all(p > 0 for _, _, p in runs[2]["socket"])


def test_connections_and_requests_stay_whole(runs):
    """Each flow's frames went to one worker: the conn.log and http.log of two workers
    are those of one process (histories, sizes and states whole)."""
    assert runs[2]["conns"] == runs[1]["conns"] and len(runs[1]["conns"]) >= FLOWS
    assert runs[2]["http"] == runs[1]["http"] and len(runs[1]["http"]) == 6
    assert any('"conn_state": "SF"' in c for c in runs[2]["conns"])


def per_worker(m, name="lpd_capture_packets_total"):
    return {dict(k[1])["worker"]: v for k, v in m.items() if k[0] == name}


def test_both_workers_took_frames(runs):
    """Frames per capture process: the single process is worker 0, two workers share
    the same total."""
    one, two = per_worker(runs[1]["all"]), per_worker(runs[2]["all"])
    assert set(one) == {"0"} and set(two) == {"0", "1"}, (one, two)
    assert all(v > 0 for v in two.values()) and sum(two.values()) == one["0"], (one, two)
    assert set(per_worker(runs[2]["all"], "lpd_capture_drops_total")) == {"0", "1"}


def test_a_killed_worker_is_replaced_and_nothing_outlives_the_parent(pair):
    lpd = Lpd(pair, "--workers", "2", "--mapping-url", "none", "--interval", "0.5")
    try:
        kids = children(lpd.proc.pid)
        assert len(kids) == 2
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100] * 20)
        key = ("lpd_receive_packets_total", frozenset({("local_ip", pair.ip4_b), ("nic", pair.if_b)}))
        assert wait_for(lambda: metrics(pair).get(key) == 20, 5)
        os.kill(kids[0], signal.SIGKILL)
        assert wait_for(lambda: len(children(lpd.proc.pid)) == 2 and
                        kids[0] not in children(lpd.proc.pid), 10)
        m = metrics(pair)
        assert m[("lpd_worker_restarts_total", frozenset())] == 1
        assert m[key] == 20, "counts already published were lost"
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100] * 20)
        assert wait_for(lambda: metrics(pair).get(key) == 40, 5)
        kids = children(lpd.proc.pid)
        assert "worker 0" in lpd.stderr() and "restarting" in lpd.stderr()
        # The parent's status line, the sums: asked until the new worker's first
        # publication is in it (an eBPF worker takes a moment to build its program).
        def status_of_both():
            lpd.proc.send_signal(signal.SIGUSR1)
            return wait_for(lambda: "status: veth-b up, 2 workers, " in lpd.stderr(), 0.5)
        assert wait_for(status_of_both, 10), lpd.stderr()
    finally:
        code = lpd.stop()
    assert code == 0
    assert not [k for k in kids if alive(k)]


def test_workers_die_with_a_parent_killed_outright(pair):
    lpd = Lpd(pair, "--workers", "2", "--mapping-url", "none")
    kids = children(lpd.proc.pid)
    assert len(kids) == 2
    lpd.proc.kill()
    lpd.proc.wait(5)
    assert wait_for(lambda: not [k for k in kids if alive(k)], 10), "orphaned workers"


def test_a_reload_reaches_every_worker(pair, tmp_path):
    rules, sock = tmp_path / "rules", tmp_path / "r.sock"
    rules.write_text("udp;udp\n")
    lpd = Lpd(pair, "--workers", "2", "--mapping-url", "none", "-f", str(rules), "-u", str(sock))
    try:
        rules.write_text("udp;udp\nbig;udp and greater 500\n")
        lpd.proc.send_signal(signal.SIGHUP)
        # every worker must have the new rule before a frame of it is sent: poll with bursts
        # until both workers' halves are counted
        def both():
            for sport in range(41000, 41016):
                pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [800], sport=sport)
            time.sleep(0.3)
            rows = dict((r, p) for r, _, p in parse_lines(read_socket(str(sock))))
            return rows.get("big", 0) > 0 and rows
        rows = wait_for(both, 15, 0.5)
        assert rows and set(rows) == {"udp", "big"}, rows
        # from now on both workers count the new rule: 16 flows of one frame each
        before = dict((r, p) for r, _, p in parse_lines(read_socket(str(sock))))
        for sport in range(42000, 42016):
            pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [800], sport=sport)
        after = wait_for(lambda: (lambda r: r["big"] - before["big"] == 16 and r)(
            dict((r, p) for r, _, p in parse_lines(read_socket(str(sock))))), 5)
        assert after, "a worker did not reload"
    finally:
        assert lpd.stop() == 0


@pytest.mark.parametrize("engine", ["cbpf", "ebpf"])
def test_interface_lost_and_back_with_workers(pair, engine):
    lpd = Lpd(pair, "--workers", "2", "--engine", engine, "--mapping-url", "none",
              "--local-net", "10.199.0.0/24")
    key = ("lpd_receive_packets_total", frozenset({("local_ip", pair.ip4_b), ("nic", pair.if_b)}))
    for sport in range(43000, 43016):               # flows for both workers
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100], sport=sport)
    assert wait_for(lambda: metrics(pair).get(key) == 16, 5)
    pair.delete_link()
    up = ("lpd_interface_up", frozenset({("nic", pair.if_b)}))
    assert wait_for(lambda: metrics(pair).get(up) == 0, 5)
    assert metrics(pair).get(key) == 16
    pair.create_link()
    pair.settle()
    assert wait_for(lambda: metrics(pair).get(up) == 1, 5)
    # both workers capture again (in the same fanout group): every flow is counted
    def counted():
        return metrics(pair).get(key)
    time.sleep(1.5)                                  # both rejoin (one second retries)
    for sport in range(44000, 44032):
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100], sport=sport)
    assert wait_for(lambda: counted() == 48, 5), counted()
    per = per_worker(metrics(pair))            # frames copied to each worker's ring
    assert len(per) == 2 and all(v > 0 if engine == "cbpf" else v == 0 for v in per.values()), per
    log = lpd.stderr()
    assert log.count("capturing again") == 2, log
    assert lpd.stop() == 0


def test_duration_with_workers_prints_the_sum(pair):
    p = pair.popen(pair.ns_b, [sys.executable, netns_lpd(), "-i", pair.if_b, "--workers", "2",
                               "--mapping-url", "none", "--local-net", "10.199.0.2/32",
                               "--web.listen-address", "127.0.0.1:59125", "--duration", "4",
                               "--output", "json"],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2)                                    # both workers capturing
    for sport in range(45000, 45020):
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100], sport=sport)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err.decode()
    docs = json.loads(out)
    row = {r["address"]: r for r in docs["addresses"]["addresses"]}[pair.ip4_b]
    assert row["rx_packets"] == 20 and row["rx_bytes"] == 20 * netns.frame_len(100), row


def netns_lpd():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lpd.py")


@pytest.mark.parametrize("rules,engine", [("udp;udp\n", "ebpf"),
                                          # protochain loops backwards: no eBPF translation
                                          ("chain;ip6 protochain 17\n", "cbpf")])
def test_build_info_names_the_engine_the_workers_chose(pair, tmp_path, rules, engine):
    """The parent publishes what its workers report, not a guess of its own (which
    missed a rule the eBPF translation refuses)."""
    path = tmp_path / "r.filters"
    path.write_text(rules)
    lpd = Lpd(pair, "--workers", "2", "--engine", "auto", "--mapping-url", "none",
              "-f", str(path), "-u", str(tmp_path / "r.sock"))
    info = [dict(k[1]) for k in metrics(pair) if k[0] == "lpd_build_info"]
    assert [i["engine"] for i in info] == [engine], info
    assert lpd.stderr().count(f"(engine {engine}") == 2, lpd.stderr()
    assert lpd.stop() == 0


def test_workers_wait_for_an_interface_and_say_so_once(pair, tmp_path):
    """--wait-interface with workers: one line from the parent (not one per worker), and
    every worker reads the interface's networks and address ($MAC) when it appears."""
    rules = tmp_path / "r.filters"
    rules.write_text("to-me;ether dst $MAC and udp\n")
    pair.delete_link()
    lpd = Lpd(pair, "--workers", "2", "--wait-interface", "--mapping-url", "none",
              "-f", str(rules), "-u", str(tmp_path / "r.sock"))
    pair.create_link()
    pair.settle()
    up = ("lpd_interface_up", frozenset({("nic", pair.if_b)}))
    assert wait_for(lambda: metrics(pair).get(up) == 1, 5)
    time.sleep(1.5)                                  # both workers capture (one-second checks)
    for sport in range(46000, 46016):                # flows for both workers
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100], sport=sport)
    want = 16 * netns.frame_len(100)
    rule = ("lpd_rule_bytes_total", frozenset({("rule", "to-me")}))
    addr = ("lpd_receive_bytes_total", frozenset({("local_ip", pair.ip4_b), ("nic", pair.if_b)}))
    assert wait_for(lambda: (metrics(pair).get(rule), metrics(pair).get(addr)) == (want, want), 5), \
        (metrics(pair).get(rule), metrics(pair).get(addr))
    log = lpd.stderr()
    assert log.count("no such interface yet") == 1 and "waiting for" in log, log
    assert lpd.stop() == 0
