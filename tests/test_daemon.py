"""lpd as a real process on one end of a veth pair: exact per-address and interface
accounting, metrics over HTTP, NIC mapping from a real HTTP server, idle expiry,
interface loss and return, signals and readiness."""
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import netns
from harness import (LPD, MAPPING_PORT, MAPPING_SERVER, PORT, Lpd, metrics, read_socket, scrape,
                     series, value, wait_for)

pytestmark = [pytest.mark.live, pytest.mark.usefixtures("engine")]   # cbpf, auto (ebpf)


def settle_counts(pair, name, expect, **labels):
    """Poll until a counter reaches `expect` (ring blocks are handed over within ~20 ms)."""
    return wait_for(lambda: value(metrics(pair), name, **labels) == expect, 5, 0.2)


def test_exact_bytes_per_address_and_interface_totals(pair):
    lpd = Lpd(pair, "--mapping-url", "none")
    pair.settle()
    before = pair.link_stats(pair.ns_b, pair.if_b)
    m0 = metrics(pair)
    sizes = [1, 100, 555, 1400, 1472]
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, sizes)              # received by B
    pair.udp_send(pair.ns_b, pair.ip4_b, pair.ip4_a, sizes[:3])          # sent by B
    pair.udp_send(pair.ns_a, pair.ip6_a, pair.ip6_b, [10, 1000])
    pair.udp_send(pair.ns_b, pair.ip6_b, pair.ip6_a, [20])
    assert pair.ping(pair.ns_a, pair.ip4_b, count=2)                    # 2 requests, 2 replies
    tagged = [netns.udp_frame(pair.mac_a, pair.mac_b, pair.ip4_a, pair.ip4_b, n,
                              vlans=[(netns.ETH_P_8021Q, 7)]) for n in (90, 300)]
    qinq = [netns.udp_frame(pair.mac_a, pair.mac_b, pair.ip4_a, pair.ip4_b, 200,
                            vlans=[(netns.ETH_P_8021AD, 100), (netns.ETH_P_8021Q, 7)])]
    good_ip = netns.udp_frame(pair.mac_a, pair.mac_b, pair.ip4_a, pair.ip4_b, 80)
    eth = good_ip[:14]
    malformed = {
        "ihl": eth + bytes([0x43]) + good_ip[15:],
        "version": eth + bytes([0x55]) + good_ip[15:],
        "length": eth + good_ip[14:16] + (2000).to_bytes(2, "big") + good_ip[18:],
        "truncated": eth + good_ip[14:24],
    }
    pair.inject(pair.ns_a, pair.if_a, tagged + qinq + list(malformed.values()))

    ip4_rx = sum(netns.frame_len(n) for n in sizes) + 2 * 98 + 90 + 300 + 200
    ip4_tx = sum(netns.frame_len(n) for n in sizes[:3]) + 2 * 98
    ip6_rx = netns.frame_len(10, True) + netns.frame_len(1000, True)
    ip6_tx = netns.frame_len(20, True)
    assert settle_counts(pair, "lpd_receive_bytes_total", ip4_rx, local_ip=pair.ip4_b, nic=pair.if_b)
    m = metrics(pair)
    lbl = {"nic": pair.if_b}
    assert value(m, "lpd_receive_bytes_total", local_ip=pair.ip4_b, **lbl) == ip4_rx
    assert value(m, "lpd_receive_packets_total", local_ip=pair.ip4_b, **lbl) == 5 + 2 + 3
    assert value(m, "lpd_transmit_bytes_total", local_ip=pair.ip4_b, **lbl) == ip4_tx
    assert value(m, "lpd_transmit_packets_total", local_ip=pair.ip4_b, **lbl) == 3 + 2
    # A is in the local net too: what B received from A, A transmitted.
    assert value(m, "lpd_transmit_bytes_total", local_ip=pair.ip4_a, **lbl) == ip4_rx
    assert value(m, "lpd_receive_bytes_total", local_ip=pair.ip6_b, **lbl) == ip6_rx
    assert value(m, "lpd_transmit_bytes_total", local_ip=pair.ip6_b, **lbl) == ip6_tx
    assert value(m, "lpd_receive_packets_total", local_ip=pair.ip6_b, **lbl) == 2
    for reason in malformed:
        got = value(m, "lpd_packets_malformed_total", reason=reason)
        assert got == value(m0, "lpd_packets_malformed_total", reason=reason) + 1, reason

    after = pair.link_stats(pair.ns_b, pair.if_b)
    delta = netns.stats_delta(after, before)
    for direction in ("receive", "transmit"):
        key = "rx" if direction == "receive" else "tx"
        got_b = value(m, f"lpd_interface_{direction}_bytes_total", **lbl) - \
            value(m0, f"lpd_interface_{direction}_bytes_total", **lbl)
        got_p = value(m, f"lpd_interface_{direction}_packets_total", **lbl) - \
            value(m0, f"lpd_interface_{direction}_packets_total", **lbl)
        assert (got_b, got_p) == (delta[f"{key}_bytes"], delta[f"{key}_packets"]), direction
    assert value(m, "lpd_capture_drops_total", worker="0", **lbl) == 0
    assert value(m, "lpd_interface_up", **lbl) == 1
    assert lpd.stop() == 0


def test_landing_page_and_legacy_gauges_go_quiet_then_expire(pair):
    Lpd(pair, "--mapping-url", "none", "--interval", "0.5", "--idle-timeout", "2",
        "--local-net", "10.199.0.0/24")
    assert 'href="/metrics"' in scrape(pair, path="/")
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [1000] * 20)
    busy = wait_for(lambda: (series(metrics(pair), "network_ip_rx_bps").get(pair.ip4_b) or 0) > 0, 3, 0.1)
    assert busy, "rx bps never rose"
    m = metrics(pair)
    assert value(m, "network_ip_rx_bps_total", nic=pair.if_b) >= series(m, "network_ip_rx_bps")[pair.ip4_b]
    quiet = wait_for(lambda: series(metrics(pair), "network_ip_rx_bps").get(pair.ip4_b) == 0.0, 3, 0.1)
    assert quiet, "a quiet address must read 0"
    gone = wait_for(lambda: pair.ip4_b not in series(metrics(pair), "network_ip_rx_bps"), 6, 0.2)
    assert gone, "an idle address must disappear after --idle-timeout"
    assert pair.ip4_b not in series(metrics(pair), "lpd_receive_bytes_total")


def test_nic_mapping_follows_a_real_service(pair, tmp_path):
    doc = tmp_path / "status.json"

    def serve(body):
        tmp = tmp_path / "status.tmp"
        tmp.write_text(body)
        tmp.replace(doc)

    serve(json.dumps({"config": {"lan": "eth2", "wan0": "eth0", "wan1": "eth1"},
                      "mappings": {pair.ip4_b: "wan1"}}))
    server = pair.popen(pair.ns_b, [sys.executable, "-c", MAPPING_SERVER % MAPPING_PORT, str(doc)])
    lpd = Lpd(pair, "--local-net", "10.199.0.0/24", "--mapping-interval", "0.5")
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100])

    def nic_of(addr):
        for (name, labels), _ in metrics(pair).items():
            d = dict(labels)
            if name == "lpd_receive_bytes_total" and d.get("local_ip") == addr:
                return d["nic"]
        return None

    assert wait_for(lambda: nic_of(pair.ip4_b) == "eth1", 8, 0.3), nic_of(pair.ip4_b)
    assert nic_of(pair.ip4_a) is None or nic_of(pair.ip4_a) == "eth0"
    m = metrics(pair)
    assert value(m, "lpd_mapping_last_success_timestamp_seconds") > time.time() - 60
    errors0 = value(m, "lpd_mapping_errors_total")

    for bad in ("{not json", json.dumps({"config": {"wan0": "eth0"}, "mappings": {"10.0.0.1": "wan9"}}),
                "HTTP500", "SLOW"):
        serve(bad)
        assert wait_for(lambda: value(metrics(pair), "lpd_mapping_errors_total") > errors0, 8, 0.3), bad
        errors0 = value(metrics(pair), "lpd_mapping_errors_total")
        assert nic_of(pair.ip4_b) == "eth1", f"last good mapping must be kept ({bad})"

    netns.stop(server)                                # service down
    assert wait_for(lambda: value(metrics(pair), "lpd_mapping_errors_total") > errors0, 8, 0.3)
    assert nic_of(pair.ip4_b) == "eth1"

    serve(json.dumps({"config": {"wan0": "ppp0", "wan1": "eth1"}, "mappings": {}}))
    pair.popen(pair.ns_b, [sys.executable, "-c", MAPPING_SERVER % MAPPING_PORT, str(doc)])
    assert wait_for(lambda: nic_of(pair.ip4_b) == "ppp0", 8, 0.3), "labels follow a changed mapping"
    log = lpd.stderr()
    # One line per state change, not one per failed poll.
    assert 1 <= log.count("keeping the last good mapping") <= 5, log
    assert "answering again" in log


def test_interface_deleted_and_recreated(pair):
    lpd = Lpd(pair, "--mapping-url", "none", "--local-net", "10.199.0.0/24")
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100, 200])
    first = netns.frame_len(100) + netns.frame_len(200)
    assert settle_counts(pair, "lpd_receive_bytes_total", first, local_ip=pair.ip4_b, nic=pair.if_b)
    pair.delete_link()
    assert wait_for(lambda: value(metrics(pair), "lpd_interface_up", nic=pair.if_b) == 0, 5)
    m = metrics(pair)
    assert value(m, "lpd_receive_bytes_total", local_ip=pair.ip4_b, nic=pair.if_b) == first
    pair.create_link()
    pair.settle()
    assert wait_for(lambda: value(metrics(pair), "lpd_interface_up", nic=pair.if_b) == 1, 5)
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [300])
    assert settle_counts(pair, "lpd_receive_bytes_total", first + netns.frame_len(300),
                         local_ip=pair.ip4_b, nic=pair.if_b)
    log = lpd.stderr()
    assert log.count("counters kept") == 1 and "capturing again" in log, log
    assert lpd.proc.poll() is None


def test_wait_interface_counts_from_when_it_appears(pair, tmp_path):
    """A unit for wg0 or a USB NIC starts before its interface exists: lpd is ready at
    once, says so in one line, shows the interface down, and when it appears reads
    its networks and its address ($MAC) as a start would have, and counts exactly."""
    rules, sock = tmp_path / "r.filters", tmp_path / "rules.sock"
    rules.write_text("to-me;ether dst $MAC and udp\nudp;udp\n")
    notify = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(notify))
    server.settimeout(15)
    pair.delete_link()
    lpd = Lpd(pair, "--mapping-url", "none", "--wait-interface", "-f", str(rules), "-u", str(sock),
              env=dict(os.environ, NOTIFY_SOCKET=str(notify)))
    assert server.recv(100) == b"READY=1"
    m = metrics(pair)
    assert value(m, "lpd_interface_up", nic=pair.if_b) == 0
    assert read_socket(sock) == "to-me:0:0\nudp:0:0\n"
    pair.create_link()
    pair.settle()
    assert wait_for(lambda: value(metrics(pair), "lpd_interface_up", nic=pair.if_b) == 1, 5)
    sizes = [100, 700, 1400]
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, sizes)
    pair.udp_send(pair.ns_a, pair.ip6_a, pair.ip6_b, sizes[:1])
    want4 = sum(netns.frame_len(n) for n in sizes)
    want6 = netns.frame_len(sizes[0], ipv6=True)
    assert settle_counts(pair, "lpd_receive_bytes_total", want4, local_ip=pair.ip4_b, nic=pair.if_b)
    assert settle_counts(pair, "lpd_receive_bytes_total", want6, local_ip=pair.ip6_b, nic=pair.if_b)
    assert read_socket(sock) == f"to-me:{want4 + want6}:4\nudp:{want4 + want6}:4\n"
    log = lpd.stderr()
    assert log.count("no such interface yet") == 1 and "capturing again" not in log, log
    assert f"{pair.if_b}: capturing" in log, log
    assert lpd.stop() == 0


def test_optional_filter_file_is_loaded_once_it_exists(pair, tmp_path):
    """The unit's -f /etc/lpd/IFACE.filters: no file is no rules (the socket answers,
    empty), and a SIGHUP after the file appears counts from then."""
    rules, sock = tmp_path / "r.filters", tmp_path / "rules.sock"
    lpd = Lpd(pair, "--mapping-url", "none", "--local-net", pair.net4, "-f", str(rules),
              "--filter-file-optional", "-u", str(sock))
    assert read_socket(sock) == ""
    assert not any(k[0] == "lpd_rule_bytes_total" for k in metrics(pair))
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100])       # before the rules: not counted
    assert settle_counts(pair, "lpd_receive_bytes_total", netns.frame_len(100),
                         local_ip=pair.ip4_b, nic=pair.if_b)
    rules.write_text("udp;udp\n")
    lpd.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: read_socket(sock) == "udp:0:0\n", 5), lpd.stderr()
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [200, 300])
    want = netns.frame_len(200) + netns.frame_len(300)
    assert wait_for(lambda: read_socket(sock) == f"udp:{want}:2\n", 5), read_socket(sock)
    assert value(metrics(pair), "lpd_rule_bytes_total", rule="udp") == want
    assert lpd.stop() == 0
    # Without --filter-file-optional a missing file stays a configuration error.
    cp = pair.run(pair.ns_b, [sys.executable, LPD, "-i", pair.if_b, "-f", str(tmp_path / "none")],
                  check=False)
    assert cp.returncode == 78 and "cannot read filter file" in cp.stderr


def test_an_interface_back_with_another_address_reloads_dollar_mac(pair, tmp_path):
    """A USB NIC swapped, a wg0 re-created: the same name, a new device and address.
    Rules written with $MAC follow the new address."""
    rules, sock = tmp_path / "r.filters", tmp_path / "rules.sock"
    rules.write_text("to-me;ether dst $MAC and udp\n")
    lpd = Lpd(pair, "--mapping-url", "none", "--local-net", pair.net4, "-f", str(rules),
              "-u", str(sock))
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100])
    first = netns.frame_len(100)
    assert wait_for(lambda: read_socket(sock) == f"to-me:{first}:1\n", 5), read_socket(sock)
    pair.delete_link()
    pair.mac_b = "02:00:00:00:0b:0b"                  # the new device's address
    pair.create_link()
    pair.settle()
    assert wait_for(lambda: "reloaded" in lpd.stderr(), 10), lpd.stderr()
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [200, 300])
    # A rule whose expansion changed is a new rule: it counts from the reload, as after
    # any edit of its line.
    want = netns.frame_len(200) + netns.frame_len(300)
    assert wait_for(lambda: read_socket(sock) == f"to-me:{want}:2\n", 5), read_socket(sock)
    assert "its address is now 02:00:00:00:0b:0b" in lpd.stderr()
    assert lpd.stop() == 0


def test_link_down_and_up(pair):
    Lpd(pair, "--mapping-url", "none", "--local-net", "10.199.0.0/24")
    pair.set_up(pair.ns_b, pair.if_b, False)
    assert wait_for(lambda: value(metrics(pair), "lpd_interface_up", nic=pair.if_b) == 0, 5)
    pair.set_up(pair.ns_b, pair.if_b, True)
    pair.settle()
    assert wait_for(lambda: value(metrics(pair), "lpd_interface_up", nic=pair.if_b) == 1, 5)
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [64])
    assert settle_counts(pair, "lpd_receive_bytes_total", netns.frame_len(64),
                         local_ip=pair.ip4_b, nic=pair.if_b)


def debian_prometheus_client_version():
    cp = subprocess.run(["/usr/bin/python3", "-c", "import importlib.metadata as m;"
                         "print(m.version('prometheus_client'))"], capture_output=True, text=True)
    return cp.stdout.strip()


@pytest.mark.parametrize("python", [sys.executable, "/usr/bin/python3"])
def test_default_local_nets_come_from_the_interface(pair, python):
    # Debian 12's own interpreter with its prometheus_client 0.16, and the current release.
    if python == "/usr/bin/python3":
        assert debian_prometheus_client_version().startswith("0.16"), "install python3-prometheus-client"
    Lpd(pair, "--mapping-url", "none", python=python)
    pair.udp_send(pair.ns_a, pair.ip6_a, pair.ip6_b, [5])
    assert settle_counts(pair, "lpd_receive_bytes_total", netns.frame_len(5, True),
                         local_ip=pair.ip6_b, nic=pair.if_b)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly_and_readiness_is_notified(pair, tmp_path, sig):
    notify = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(notify))
    server.settimeout(15)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify), JOURNAL_STREAM="8:1234")
    # Started the way a non-interactive shell starts a background job: SIGINT ignored.
    lpd = Lpd(pair, "--mapping-url", "none", env=env)
    assert server.recv(100) == b"READY=1"
    lpd.proc.send_signal(signal.SIGHUP)              # reload, keeps running
    time.sleep(0.5)
    assert lpd.proc.poll() is None
    assert lpd.stop(sig) == 0
    assert "<6>lpd: reloaded" in lpd.stderr()


STATUS = re.compile(r"^lpd: status: (\S+) (up|down), (\d+) frames, (\d+) drops, tx (\d+) bytes, "
                    r"rx (\d+) bytes, (\d+) local addresses, (\d+|no) remote addresses, "
                    r"(\d+) rules, uptime (\d+) s$", re.M)


def test_sigusr1_logs_status_and_sigusr2_is_ignored(pair, tmp_path):
    """Both once killed lpd without cleanup, leaving the socket file behind."""
    rules, sock = tmp_path / "r.filters", tmp_path / "rules.sock"
    rules.write_text("udp;udp\nicmp;icmp\n")
    lpd = Lpd(pair, "--mapping-url", "none", "--local-net", pair.net4, "-f", str(rules),
              "-u", str(sock))
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100])
    assert settle_counts(pair, "lpd_receive_bytes_total", netns.frame_len(100),
                         local_ip=pair.ip4_b, nic=pair.if_b)
    for n in range(1, 4):
        lpd.proc.send_signal(signal.SIGUSR1)
        assert wait_for(lambda: len(STATUS.findall(lpd.stderr())) == n, 5), lpd.stderr()
        lpd.proc.send_signal(signal.SIGUSR2)
    time.sleep(0.5)                                # room for a late extra line or death
    assert lpd.proc.poll() is None, lpd.stderr()
    found = STATUS.findall(lpd.stderr())
    assert len(found) == 3, lpd.stderr()
    ifname, state, frames, drops, tx, rx, addresses, remotes, nrules, uptime = found[-1]
    assert (ifname, state, drops, addresses, remotes, nrules) == (pair.if_b, "up", "0", "2", "no", "2")
    assert int(frames) >= 1 and int(rx) >= netns.frame_len(100) and int(uptime) < 60
    assert lpd.stop() == 0
    assert not sock.exists()


def test_rule_socket_counters_are_exported(pair, tmp_path):
    sock = tmp_path / "rules.sock"
    lpd = Lpd(pair, "--mapping-url", "none", "-u", str(sock))
    assert value(metrics(pair), "lpd_rule_socket_truncated_total") == 0
    assert lpd.stop() == 0
    Lpd(pair, "--mapping-url", "none")            # no rule socket, no such counter
    assert value(metrics(pair), "lpd_rule_socket_truncated_total") is None


def test_startup_errors_exit_codes(pair):
    def run(*args, ns=None):
        cp = pair.run(ns or pair.ns_b, [sys.executable, LPD, *args], check=False)
        return cp.returncode, cp.stderr.strip()

    code, err = run("-i", "nosuchif0")
    assert code == 78 and err == "lpd: nosuchif0: no such interface (--wait-interface waits for it)"
    code, err = run("--bogus")
    assert code == 64 and err.count("\n") == 0
    code, err = run("--interval", "0")
    assert code == 64
    blocker = pair.popen(pair.ns_b, [sys.executable, "-c",
                                     "import socket,time;s=socket.socket();s.bind(('127.0.0.1',%d));"
                                     "s.listen();print('ok',flush=True);time.sleep(60)" % PORT],
                         stdout=subprocess.PIPE, text=True)
    assert blocker.stdout.readline().strip() == "ok"
    code, err = run("-i", pair.if_b, "--web.listen-address", f"127.0.0.1:{PORT}")
    assert code == 69 and "address already in use" in err
    netns.stop(blocker)


def test_a_ring_that_cannot_be_mapped_is_one_line_exit_78(pair):
    """The kernel grants the ring (setsockopt), then mmap() fails: RLIMIT_AS is below the
    ring's size but above what the interpreter needs (bytes: prlimit's suffixes crash it)."""
    ring = 256 << 20
    cp = pair.run(pair.ns_b, ["prlimit", f"--as={ring // 2}", sys.executable, LPD, "-i", pair.if_b,
                              "--mapping-url", "none", "--web.listen-address", f"127.0.0.1:{PORT}",
                              "-b", str(ring)], check=False)
    assert cp.returncode == 78, cp.stderr
    assert cp.stderr == (f"lpd: {pair.if_b}: cannot set up a capture ring of 256 MiB: "
                         "Cannot allocate memory (a smaller -b may fit)\n")


def readable_copy(tmp):
    """lpd.py copied where an unprivileged user can read it. Such a user cannot reach
    pyenv's interpreter under /root either: those tests use Debian's, with Debian's
    prometheus_client (0.16)."""
    os.chmod(tmp, 0o755)
    copy = os.path.join(tmp, "lpd.py")
    with open(copy, "wb") as f:
        f.write(open(LPD, "rb").read())
    os.chmod(copy, 0o644)
    return copy


def test_no_permission_exits_77(pair):
    with tempfile.TemporaryDirectory() as tmp:
        copy = readable_copy(tmp)
        nobody = pair.run(pair.ns_b, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                      "/usr/bin/python3", copy, "-i", pair.if_b, "--mapping-url",
                                      "none", "--web.listen-address", "127.0.0.1:59124"],
                          check=False)
    assert nobody.returncode == 77, nobody.stderr
    assert nobody.stderr.strip() == (f"lpd: capturing on {pair.if_b} needs CAP_NET_RAW "
                                     "(run as root or grant the capability)")


@pytest.mark.parametrize("args,what", [
    (["--engine", "ebpf"], "--engine ebpf: cannot create a BPF map: Operation not permitted"),
    (["--engine", "cbpf", "-u", "/run/lpd-test-root-only/rules.sock"],
     "/run/lpd-test-root-only/rules.sock: cannot create directory: Permission denied"),
    (["--engine", "cbpf", "-u", "/run/rules.sock"],
     "/run/rules.sock: cannot create socket: Permission denied"),
    (["--engine", "cbpf", "-f", "{secret}/r.filters"],
     "{secret}/r.filters: cannot read filter file: Permission denied"),
    (["-r", "{secret}/x.pcap"], "{secret}/x.pcap: Permission denied"),
    (["--engine", "cbpf", "--conn-log", "{secret}/conn.log"],
     "--conn-log {secret}/conn.log: Permission denied"),
    (["--engine", "cbpf", "--web.listen-address", "127.0.0.1:80"],
     "--web.listen-address 127.0.0.1:80: Permission denied"),
])
def test_every_permission_failure_exits_77(pair, args, what):
    """Capture allowed (CAP_NET_RAW), but not what an option needs besides: the eBPF
    engine's maps (CAP_BPF), a socket where the user may not write, files only root
    may read or write, a port below 1024."""
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as secret:
        copy = readable_copy(tmp)
        for name in ("r.filters", "x.pcap"):          # root's, mode 0600
            with open(os.path.join(secret, name), "w") as f:
                f.write("udp;udp\n")
            os.chmod(os.path.join(secret, name), 0o600)
        os.chmod(secret, 0o711)                      # its files reachable, not readable
        args = [a.replace("{secret}", secret) for a in args]
        cp = pair.run(pair.ns_b, [
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw", "--bounding-set=-all,+net_raw",
            "/usr/bin/python3", copy, "-i", pair.if_b, "--mapping-url", "none",
            "--web.listen-address", f"127.0.0.1:{PORT}", *args], check=False)
        assert (cp.returncode, cp.stderr) == (77, f"lpd: {what.replace('{secret}', secret)}\n")


@pytest.mark.parametrize("caps,says", [("net_raw,+bpf,+perfmon", "engine ebpf"),
                                       ("net_raw,+bpf", "engine cbpf: the kernel refused")])
def test_the_readme_recipe_without_root(pair, caps, says):
    """README's setpriv line: the eBPF engine needs CAP_BPF and CAP_PERFMON; with one
    missing lpd counts on the classic path and says why, in one line."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = readable_copy(tmp)
        cp = pair.run(pair.ns_b, [
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            f"--inh-caps=+{caps}", f"--ambient-caps=+{caps}",
            "/usr/bin/python3", copy, "-i", pair.if_b, "--mapping-url", "none", "--duration", "1"],
            check=False)
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr.count("\n") == 1 and f"lpd: capturing on {pair.if_b} ({says}" in cp.stderr


def test_runs_unprivileged_with_only_cap_net_raw(pair):
    """What the systemd unit does (DynamicUser, CAP_NET_RAW only), done with setpriv."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = readable_copy(tmp)
        sock = os.path.join(tmp, "rules.sock")
        rules = os.path.join(tmp, "r.filters")
        with open(rules, "w") as f:
            f.write("udp;udp\n")
        os.chmod(tmp, 0o777)
        proc = pair.popen(pair.ns_b, [
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw", "--bounding-set=-all,+net_raw",
            "/usr/bin/python3", copy, "-i", pair.if_b, "--mapping-url", "none",
            "--web.listen-address", f"127.0.0.1:{PORT}", "-f", rules, "-u", sock],
            stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: proc.poll() is None and os.path.exists(sock), 15), proc.stderr.read()
        status = open(f"/proc/{proc.pid}/status").read()
        assert "\nUid:\t65534" in status and "CapEff:\t0000000000002000" in status
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [33])
        want = netns.frame_len(33)
        assert wait_for(lambda: value(metrics(pair), "lpd_receive_bytes_total", local_ip=pair.ip4_b,
                                      nic=pair.if_b) == want, 5, 0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not os.path.exists(sock)


def test_starts_where_there_is_no_etc_hosts(pair):
    """A minimal root file system (debootstrap minbase, many containers) has no
    /etc/hosts: the default listen address and the default mapping URL name localhost,
    which is loopback by definition (RFC 6761) and never asked of a resolver."""
    doc = os.path.join(tempfile.mkdtemp(), "status.json")
    with open(doc, "w") as f:
        json.dump({"config": {"wan0": "wan-from-service"}, "mappings": {}}, f)
    pair.popen(pair.ns_b, [sys.executable, "-c", MAPPING_SERVER % MAPPING_PORT, doc])
    hide = ("mount --bind /dev/null /etc/hosts && mount --bind /dev/null /etc/resolv.conf && "
            'exec "$@"')
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", hide, "sh",
                             *netns.ns_argv(pair.ns_b, [sys.executable, "-c",
                                                        "import socket; socket.getaddrinfo('localhost', 1)"])],
                            stderr=subprocess.PIPE, text=True)
    _, resolver = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "name resolution" in resolver, "the resolver must fail here"
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", hide, "sh",
                             *netns.ns_argv(pair.ns_b, [sys.executable, LPD, "-i", pair.if_b,
                                                        "--local-net", pair.net4,
                                                        "--mapping-interval", "0.5"])],
                            stderr=err)
    def answering():
        assert proc.poll() is None, "lpd exited"
        try:
            return metrics(pair)
        except netns.NetnsError:             # not listening yet
            return None

    try:
        assert wait_for(answering, 15, 0.2)
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100])
        assert wait_for(lambda: value(answering(), "lpd_receive_bytes_total", local_ip=pair.ip4_b,
                                      nic="wan-from-service") == netns.frame_len(100), 15, 0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    err.seek(0)
    log = err.read().decode()
    assert "resolution" not in log and "answered: NIC labels follow it" in log, log


def test_duration_runs_beside_the_service(pair, tmp_path):
    """A one-shot --duration measurement takes neither the service's metrics port nor
    its rule socket; given --web.listen-address or -u it serves them."""
    rules, sock = tmp_path / "r.filters", tmp_path / "rules.sock"
    rules.write_text("udp;udp\n")
    service = Lpd(pair, "--mapping-url", "none", "-f", str(rules), "-u", str(sock))
    shot = pair.popen(pair.ns_b, [sys.executable, LPD, "-i", pair.if_b, "--mapping-url", "none",
                                  "--duration", "3", "-f", str(rules),
                                  "--local-net", pair.net4], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    # Its first line says it captures (a loaded machine may take a while to get there).
    ready, _, _ = select.select([shot.stderr], [], [], 20)
    first = shot.stderr.readline() if ready else ""
    assert "capturing on" in first, first
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100])
    out, err = shot.communicate(timeout=30)
    assert shot.returncode == 0, first + err
    assert f"{pair.ip4_b}" in out and "udp" in out, out
    assert not os.path.exists(f"/run/lpd/{pair.if_b}.sock")
    assert service.proc.poll() is None and os.path.exists(sock)
    busy = pair.run(pair.ns_b, [sys.executable, LPD, "-i", pair.if_b, "--mapping-url", "none",
                                "--duration", "1", "--web.listen-address", f"127.0.0.1:{PORT}"],
                    check=False)
    assert busy.returncode == 69 and "address already in use" in busy.stderr
    assert service.stop() == 0


# --- the metrics endpoint beyond its connection cap (issue 24) ----------------------------

BURST_CLIENTS = 500                 # concurrent scrapes: about twice the endpoint's 256 slots
BURST_LIMIT = 30.0                  # s for the whole burst, connects to last byte
BURST_AS_LIMIT = 1_000_000_000      # RLIMIT_AS (bytes) of lpd and of the client process
BURST_NOFILE = 4096                 # descriptors of the client process: a socket per scrape

# The burst: every client connects at once, sends its GET as soon as it is connected and
# reads to the end; prints [status or null, Retry-After or null, how it ended] per client.
BURST_CLIENT = r"""
import json, select, socket, sys, time
port, n, limit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
req = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
conns = {}
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    conns[s.fileno()] = {"sock": s, "data": b"", "sent": False, "end": "timeout"}
poller = select.poll()
for fd in conns:
    poller.register(fd, select.POLLOUT)
deadline, left = time.monotonic() + limit, set(conns)
while left and time.monotonic() < deadline:
    for fd, ev in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
        c = conns[fd]
        try:
            if not c["sent"]:
                c["sock"].send(req)
                c["sent"] = True
                poller.modify(fd, select.POLLIN)
                continue
            b = c["sock"].recv(65536)
        except BlockingIOError:
            continue
        except OSError as e:
            b, c["end"] = b"", f"error {e.errno}"
        if b:
            c["data"] += b
            continue
        if c["end"] == "timeout":
            c["end"] = "eof"
        poller.unregister(fd)
        left.discard(fd)
out = []
for c in conns.values():
    head, _, body = c["data"].partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else None
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    whole = status == 200 and b"lpd_build_info" in body
    out.append([status, headers.get("retry-after"), c["end"], whole])
    c["sock"].close()
json.dump(out, sys.stdout)
"""


def test_a_burst_beyond_the_connection_cap_gets_200_or_503_never_a_bare_close(pair):
    """500 concurrent scrapes against the endpoint's 256 connections: each one gets its
    metrics or a 503 Service Unavailable with Retry-After; none is closed without a
    status (244 of 500 were, issue 24)."""
    lpd = Lpd(pair, "--mapping-url", "none", prefix=("prlimit", f"--as={BURST_AS_LIMIT}"))
    cp = pair.run(pair.ns_b, ["prlimit", f"--as={BURST_AS_LIMIT}", f"--nofile={BURST_NOFILE}",
                              sys.executable, "-c", BURST_CLIENT, str(PORT), str(BURST_CLIENTS),
                              str(BURST_LIMIT)], timeout=BURST_LIMIT + 10)
    results = json.loads(cp.stdout)
    assert len(results) == BURST_CLIENTS
    bare = [r for r in results if r[0] is None]
    assert not bare, f"{len(bare)} of {BURST_CLIENTS} closed without a status, e.g. {bare[0]}"
    ok = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 503]
    assert len(ok) + len(busy) == BURST_CLIENTS, {r[0] for r in results}
    assert ok and all(r[3] for r in ok), "a 200 carries the whole page"
    assert all(r[1] is not None and r[1].isdigit() and int(r[1]) > 0 for r in busy), busy[:3]
    assert "lpd_build_info" in scrape(pair), "the endpoint serves on after the burst"
    assert lpd.stop() == 0


def test_an_interface_back_with_new_networks_counts_them(pair):
    """Without --local-net, the networks are the interface's: down, given a wider prefix,
    up again, lpd reads them when capture reopens (under ebpf the program that holds
    them is built on the reload thread and swapped in) and an address only the new
    prefix covers counts as local."""
    Lpd(pair, "--mapping-url", "none", "--interval", "0.5")
    outside = "10.199.77.9"                            # in 10.199.0.0/16, not in B's /24
    frame = netns.udp_frame(pair.mac_a, pair.mac_b, outside, pair.ip4_b, 100)
    pair.set_up(pair.ns_b, pair.if_b, False)
    assert wait_for(lambda: value(metrics(pair), "lpd_interface_up", nic=pair.if_b) == 0, 5)
    pair.run(pair.ns_b, ["ip", "addr", "del", f"{pair.ip4_b}/24", "dev", pair.if_b])
    pair.run(pair.ns_b, ["ip", "addr", "add", f"{pair.ip4_b}/16", "dev", pair.if_b])
    pair.set_up(pair.ns_b, pair.if_b, True)
    pair.settle()

    def counted():
        netns.inject(pair.ns_a, pair.if_a, [frame])
        return value(metrics(pair), "lpd_transmit_bytes_total", local_ip=outside, nic=pair.if_b)
    assert wait_for(counted, 8, 0.5), sorted(k for k in metrics(pair) if "transmit" in k[0])


def test_an_interface_up_before_its_addresses_counts_them_once_they_come(pair):
    """DHCP on a new link: capture starts with no networks, the addresses come while it
    captures; the next interface check reads them (under ebpf its program is built on
    the reload thread and swapped in between blocks) and B's address counts."""
    for family in ("-4", "-6"):
        pair.run(pair.ns_b, ["ip", family, "addr", "flush", "dev", pair.if_b])
    Lpd(pair, "--mapping-url", "none", "--interval", "0.5")
    pair.run(pair.ns_b, ["ip", "addr", "add", f"{pair.ip4_b}/24", "dev", pair.if_b])
    pair.settle()

    def counted():
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [64])
        return value(metrics(pair), "lpd_receive_bytes_total", local_ip=pair.ip4_b, nic=pair.if_b)
    assert wait_for(counted, 8, 0.5)
