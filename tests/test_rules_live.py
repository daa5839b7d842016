"""Rules on a running lpd: known traffic on a veth pair, read back through the unix socket
by real clients (Python and `nc -U`), reload with SIGHUP, and the kernel prefilter."""
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

import netns
from harness import Lpd, metrics, parse_lines, read_socket, value, wait_for

pytestmark = [pytest.mark.live, pytest.mark.usefixtures("engine")]   # cbpf, auto (ebpf)


RULES = """\
# bpfcountd format; lpd's fixes: comments, blank lines, trimming, CRLF
udp4;udp and ip\r

to-b ; dst host 10.199.0.2
icmp;icmp
v6;ip6 and udp
big;greater 1000
in;inbound and (udp or icmp)
out;outbound and (udp or icmp)
me;ether src $MAC and (udp or icmp)
both;${in} or ${out}
we"ird\\id;udp and ip"""       # no final newline: the last character stays


def test_rule_counts_over_the_socket_in_file_order(pair, tmp_path):
    rules = tmp_path / "veth.filters"
    rules.write_text(RULES)
    sock = str(tmp_path / "lpd.sock")
    lpd = Lpd(pair, "--mapping-url", "none", "-f", str(rules), "-u", sock)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100, 1400])
    pair.udp_send(pair.ns_b, pair.ip4_b, pair.ip4_a, [50])
    pair.udp_send(pair.ns_a, pair.ip6_a, pair.ip6_b, [10])
    assert pair.ping(pair.ns_a, pair.ip4_b)
    f = netns.frame_len
    expect = [
        ("udp4", f(100) + f(1400) + f(50), 3),
        ("to-b", f(100) + f(1400) + 98, 3),
        ("icmp", 196, 2),
        ("v6", f(10, True), 1),
        ("big", f(1400), 1),
        ("in", f(100) + f(1400) + f(10, True) + 98, 4),
        ("out", f(50) + 98, 2),
        ("me", f(50) + 98, 2),
        ("both", f(100) + f(1400) + f(10, True) + 98 + f(50) + 98, 6),
        ('we"ird\\id', f(100) + f(1400) + f(50), 3),        # label escaping on /metrics
    ]
    assert wait_for(lambda: parse_lines(read_socket(sock)) == expect, 5, 0.2), read_socket(sock)
    nc = subprocess.run(["nc", "-U", sock], stdin=subprocess.DEVNULL, capture_output=True,
                        text=True, timeout=10)
    assert parse_lines(nc.stdout) == expect
    assert nc.stdout.endswith("\n")
    m = metrics(pair)
    for rid, b, p in expect:
        assert value(m, "lpd_rule_bytes_total", rule=rid) == b
        assert value(m, "lpd_rule_packets_total", rule=rid) == p
    assert lpd.stop() == 0
    assert not os.path.exists(sock), "the socket file is removed on SIGTERM"


def test_reload_keeps_unchanged_rules_and_survives_a_broken_file(pair, tmp_path):
    rules = tmp_path / "veth.filters"
    rules.write_text("udp4;udp and ip\nto-b;dst host 10.199.0.2\nicmp;icmp\n")
    sock = str(tmp_path / "lpd.sock")
    lpd = Lpd(pair, "--mapping-url", "none", "-f", str(rules), "-u", sock)
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100])
    one = netns.frame_len(100)
    assert wait_for(lambda: parse_lines(read_socket(sock))[0] == ("udp4", one, 1), 5, 0.2)

    rules.write_text("udp4;udp and ip\nto-b;dst host 10.199.0.1\ntcp;tcp\n")
    lpd.proc.send_signal(signal.SIGHUP)
    want = [("udp4", one, 1), ("to-b", 0, 0), ("tcp", 0, 0)]
    assert wait_for(lambda: parse_lines(read_socket(sock)) == want, 5, 0.2), read_socket(sock)

    rules.write_text("udp4;udp and ip\nbad;port nonsense-service\n")
    lpd.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reload failed" in lpd.stderr(), 5)
    line = [x for x in lpd.stderr().splitlines() if "reload failed" in x][0]
    assert f"{rules}:2:" in line
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100])
    assert wait_for(lambda: parse_lines(read_socket(sock)) ==
                    [("udp4", 2 * one, 2), ("to-b", 0, 0), ("tcp", 0, 0)], 5, 0.2)


def test_prefilter_swap_on_reload_loses_no_packet(pair, tmp_path):
    rules = tmp_path / "veth.filters"
    rules.write_text("# no rules yet: the kernel program cuts frames to the headers\n")
    sock = str(tmp_path / "lpd.sock")
    lpd = Lpd(pair, "--mapping-url", "none", "-F", "udp", "-f", str(rules), "-u", sock,
              "--local-net", "10.199.0.0/24")
    n = 20000
    sender = threading.Thread(target=pair.udp_send, args=(pair.ns_a, pair.ip4_a, pair.ip4_b, [18] * n))
    sender.start()
    time.sleep(0.05)
    rules.write_text("udp4;udp\n")                   # the kernel program changes (full frames)
    lpd.proc.send_signal(signal.SIGHUP)
    sender.join(60)
    want = n * netns.frame_len(18)
    assert wait_for(lambda: value(metrics(pair), "lpd_receive_bytes_total",
                                  local_ip=pair.ip4_b, nic=pair.if_b) == want, 10, 0.3)
    assert "reloaded" in lpd.stderr()
    assert value(metrics(pair), "lpd_capture_drops_total", worker="0", nic=pair.if_b) == 0


def test_kernel_prefilter_sees_vlan_tags_and_direction(pair):
    """-F compiles for the kernel: the tag is stripped there, so `vlan` must use the
    ancillary loads; only matching frames may reach lpd at all. (`vlan` shifts every
    later offset, as in libpcap, so the direction test comes first.)"""
    lpd = Lpd(pair, "--mapping-url", "none", "-F", "(outbound and icmp) or vlan 7",
              "--local-net", "10.199.0.0/24")
    m0 = metrics(pair)
    frames = [netns.udp_frame(pair.mac_a, pair.mac_b, pair.ip4_a, pair.ip4_b, 100,
                              vlans=[(netns.ETH_P_8021Q, vid)]) for vid in (7, 8, 7)]
    plain = netns.udp_frame(pair.mac_a, pair.mac_b, pair.ip4_a, pair.ip4_b, 100)
    pair.inject(pair.ns_a, pair.if_a, frames + [plain])
    assert pair.ping(pair.ns_a, pair.ip4_b)       # the request is inbound: only the reply passes
    lbl = {"nic": pair.if_b}
    # What -F lets through, as the interface totals count it: under cbpf the frames the
    # ring got, under ebpf the frames the program's gate passed (it copies none).
    names = ("lpd_interface_receive_packets_total", "lpd_interface_transmit_packets_total")
    got = lambda: sum(value(metrics(pair), n, **lbl) - value(m0, n, **lbl) for n in names)  # noqa: E731
    assert wait_for(lambda: got() == 3, 5, 0.2), got()
    m = metrics(pair)
    assert value(m, "lpd_receive_bytes_total", local_ip=pair.ip4_b, **lbl) == 2 * 100
    assert value(m, "lpd_transmit_bytes_total", local_ip=pair.ip4_b, **lbl) == 98
    assert lpd.stop() == 0


# --- reload runs beside capture (issue 9) ----------------------------------------------

@pytest.fixture
def netns_etc(pair):
    """/etc/netns/<ns_b>/: `ip netns exec` mounts its files over /etc's for lpd alone."""
    d = f"/etc/netns/{pair.ns_b}"
    os.makedirs(d, exist_ok=True)
    with open("/etc/hosts") as f:
        base = f.read()

    def write(name, text):
        # In place, never by rename: the bind mount holds the file, not the name.
        with open(os.path.join(d, name), "r+" if os.path.exists(os.path.join(d, name)) else "w") as f:
            f.seek(0)
            f.truncate()
            f.write(text)
    write.base_hosts = base
    yield write
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def sink_rows(sock):
    return {rid: (b, p) for rid, b, p in parse_lines(read_socket(sock))}


def test_reload_never_stalls_capture_even_on_a_slow_name_lookup(pair, tmp_path, netns_etc):
    """SIGHUP with a rule naming a host that the (silent) DNS server never answers:
    while the lookup hangs, frames are still drained and counted."""
    netns_etc("resolv.conf", f"nameserver {pair.ip4_a}\noptions timeout:4 attempts:1\n")
    netns_etc("hosts", netns_etc.base_hosts)
    silent = netns.socket_in(pair.ns_a, socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind((pair.ip4_a, 53))                   # takes queries, answers none
    rules = tmp_path / "veth.filters"
    rules.write_text(f"sink;udp dst port {netns.SINK_PORT}\n")
    sock = str(tmp_path / "lpd.sock")
    lpd = Lpd(pair, "--mapping-url", "none", "-f", str(rules), "-u", sock)
    one = netns.frame_len(100)
    rules.write_text(f"sink;udp dst port {netns.SINK_PORT}\nslow;host lpd-test-unanswered.example\n")
    lpd.proc.send_signal(signal.SIGHUP)
    t0 = time.monotonic()
    time.sleep(0.3)
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100] * 5)
    assert wait_for(lambda: sink_rows(sock).get("sink") == (5 * one, 5), 2.5, 0.1), sink_rows(sock)
    assert "reload failed" not in lpd.stderr() and time.monotonic() - t0 < 3.5, \
        "the lookup ended before the check: the test proves nothing"
    assert wait_for(lambda: "reload failed" in lpd.stderr(), 10)
    assert sink_rows(sock) == {"sink": (5 * one, 5)}
    silent.close()


def test_reload_resolves_host_names_again(pair, tmp_path, netns_etc):
    netns_etc("hosts", netns_etc.base_hosts + f"{pair.ip4_a} lpd-test-peer\n")
    rules = tmp_path / "veth.filters"
    rules.write_text(f"peer;src host lpd-test-peer and udp dst port {netns.SINK_PORT}\n")
    sock = str(tmp_path / "lpd.sock")
    lpd = Lpd(pair, "--mapping-url", "none", "-f", str(rules), "-u", sock)
    one = netns.frame_len(100)
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100] * 3)
    assert wait_for(lambda: sink_rows(sock) == {"peer": (3 * one, 3)}, 5, 0.1), sink_rows(sock)
    netns_etc("hosts", netns_etc.base_hosts + "10.199.0.77 lpd-test-peer\n")
    lpd.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: lpd.stderr().count("reloaded") == 1, 5)
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100] * 4)
    time.sleep(0.5)
    assert sink_rows(sock) == {"peer": (3 * one, 3)}     # same text, other address: not counted


BURSTS_MAX = 100           # bound on the sender's bursts of datagrams


def test_widening_reload_never_judges_a_frame_cut_short(pair, tmp_path):
    """Two rules swapped in together, both matching every datagram sent (each has a
    zero at byte 300): if any queued frame cut to the old 128 bytes reached the new
    rules, 'big' would fall behind 'all'."""
    rules = tmp_path / "veth.filters"
    rules.write_text(f"old;udp dst port {netns.SINK_PORT}\n")
    sock = str(tmp_path / "lpd.sock")
    lpd = Lpd(pair, "--mapping-url", "none", "-f", str(rules), "-u", sock,
              "--local-net", "10.199.0.0/24")
    # Datagrams go out in bursts until the reload has landed and some after it: a fast
    # machine sends a fixed 20,000 before the reload thread has even started.
    chunk, sent, stop = 2000, [], threading.Event()

    def send():
        for _ in range(BURSTS_MAX):
            pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [400] * chunk)
            sent.append(chunk)
            if stop.is_set():
                return
    sender = threading.Thread(target=send)
    sender.start()
    assert wait_for(lambda: sent, 10)
    rules.write_text(f"old;udp dst port {netns.SINK_PORT}\n"
                     f"all;udp dst port {netns.SINK_PORT}\n"
                     f"big;udp dst port {netns.SINK_PORT} and ether[300] = 0\n")
    lpd.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reloaded" in lpd.stderr(), 10), lpd.stderr()
    time.sleep(0.5)                                    # past the widening's drain
    stop.set()
    sender.join(60)
    n = sum(sent)
    one = netns.frame_len(400)
    assert wait_for(lambda: sink_rows(sock).get("old") == (n * one, n), 10, 0.2), sink_rows(sock)
    got = sink_rows(sock)
    assert 0 < got["all"][1] < n, got                  # the reload landed mid-stream
    assert got["big"] == got["all"], got
    assert value(metrics(pair), "lpd_capture_drops_total", worker="0", nic=pair.if_b) == 0


# --- --http never costs the accounting a frame (issue 24) -------------------------------

SHORT_REPEAT = 40          # copies of each short frame: a loss of one kind shows as 40


def _short_frames(pair):
    """Frames shorter than the loads of --http's kernel program (which reads the TCP
    ports at up to byte 78), each with what lpd makes of it: (frame, malformed reason or
    the local address it is attributed to)."""
    mac_b, mac_a = netns.mac_bytes(pair.mac_b), netns.mac_bytes(pair.mac_a)
    eth4, eth6 = mac_b + mac_a + b"\x08\x00", mac_b + mac_a + b"\x86\xdd"
    ip4_b, ip4_a = socket.inet_pton(socket.AF_INET, pair.ip4_b), socket.inet_pton(socket.AF_INET, pair.ip4_a)
    ip6_b, ip6_a = socket.inet_pton(socket.AF_INET6, pair.ip6_b), socket.inet_pton(socket.AF_INET6, pair.ip6_a)
    sport = (40000).to_bytes(2, "big")
    # A TCP segment of which only the source port made it: a whole IPv4 header saying so.
    hdr4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(sport), 0, 0, 64, socket.IPPROTO_TCP, 0,
                       ip4_a, ip4_b)
    hdr4 = hdr4[:10] + netns.checksum(hdr4).to_bytes(2, "big") + hdr4[12:]
    hdr6 = struct.pack("!IHBB16s16s", 0x60000000, len(sport), socket.IPPROTO_TCP, 64, ip6_a, ip6_b)
    return [
        (eth4, "truncated"),                            # an Ethernet header, nothing after
        (eth4 + hdr4[:10], "truncated"),                # an IPv4 header cut short
        (eth6 + b"\x60\x00", "truncated"),              # a 16-byte IPv6 stub
        (eth4 + hdr4 + sport, pair.ip4_b),              # 36 bytes: the judge reads byte 36
        (eth6 + hdr6 + sport, pair.ip6_b),              # 56 bytes: the judge reads byte 56
    ]


def test_http_never_drops_a_frame_too_short_for_its_kernel_program(pair, tmp_path):
    """With --http the kernel program judges which frames are copied whole; a frame
    shorter than the bytes it loads used to end it with 0 (drop), so rules, interface
    totals and malformed counts all missed it. Every count must be as without --http:
    the interface's equal to the veth's own counters, the rules' exact."""
    rules = tmp_path / "veth.filters"
    rules.write_text("in;inbound\nme;ether dst $MAC\n")
    lpd = Lpd(pair, "--mapping-url", "none", "--http", "--docker-socket", "none", "-f", str(rules))
    pair.settle()
    kinds = _short_frames(pair)
    normal = netns.udp_frame(pair.mac_a, pair.mac_b, pair.ip4_a, pair.ip4_b, 200)
    frames = [f for f, _ in kinds] * SHORT_REPEAT + [normal] * SHORT_REPEAT
    lbl = {"nic": pair.if_b}
    before, m0 = pair.link_stats(pair.ns_b, pair.if_b), metrics(pair)

    def delta(m, name, **labels):
        return (value(m, name, **labels) or 0) - (value(m0, name, **labels) or 0)

    assert pair.inject(pair.ns_a, pair.if_a, frames) == [len(f) for f in frames]
    veth = netns.stats_delta(pair.link_stats(pair.ns_b, pair.if_b), before)
    assert veth["rx_packets"] == len(frames), veth      # nothing else crossed the link
    counted = lambda: delta(metrics(pair), "lpd_interface_receive_packets_total", **lbl)
    assert wait_for(lambda: counted() >= len(frames), 5, 0.2), f"{counted()} of {len(frames)} frames"
    time.sleep(0.3)                                       # a frame too many would show now
    m = metrics(pair)
    assert delta(m, "lpd_interface_receive_packets_total", **lbl) == veth["rx_packets"]
    assert delta(m, "lpd_interface_receive_bytes_total", **lbl) == veth["rx_bytes"]
    assert delta(m, "lpd_interface_transmit_packets_total", **lbl) == veth["tx_packets"]
    for reason in ("truncated", "version", "ihl", "length"):
        want = SHORT_REPEAT * sum(1 for _, what in kinds if what == reason)
        assert delta(m, "lpd_packets_malformed_total", reason=reason) == want, reason
    rx4 = SHORT_REPEAT * (len(normal) + sum(len(f) for f, what in kinds if what == pair.ip4_b))
    rx6 = SHORT_REPEAT * sum(len(f) for f, what in kinds if what == pair.ip6_b)
    assert delta(m, "lpd_receive_bytes_total", local_ip=pair.ip4_b, **lbl) == rx4
    assert delta(m, "lpd_receive_bytes_total", local_ip=pair.ip6_b, **lbl) == rx6
    for rule in ("in", "me"):
        assert delta(m, "lpd_rule_packets_total", rule=rule) == len(frames), rule
        assert delta(m, "lpd_rule_bytes_total", rule=rule) == sum(map(len, frames)), rule
    assert value(m, "lpd_capture_drops_total", worker="0", **lbl) == 0
    assert lpd.stop() == 0
