"""Connections (issue 12) without namespaces: frame parsing, the table's bound and its
eviction order, the process lookup against this test's own real sockets, the conn
log's reopen, and the /api document. Zeek scenarios are in test_conn_offline.py, real
TCP in network namespaces in test_conn_live.py."""
import ipaddress
import json
import os
import socket

import pytest

import lpd
from harness import write_pcap
from packets import (ETH_8021Q, ETH_IP, ETH_IP6, PROTO_TCP, PROTO_UDP, TCP_SYN, ether, fragment6,
                     icmp, icmp6, ipv4, ipv6, tcp, udp, vlan_tag)

pytestmark = pytest.mark.offline

A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
SYN, ACK, FIN = 0x02, 0x10, 0x01


def t4(src, dst, sport, dport, flags=SYN, seq=1, ack=0, data=b"", tags=()):
    return ether(A, B, ETH_IP, ipv4(src, dst, PROTO_TCP, tcp(sport, dport, flags=flags, seq=seq,
                                                              ack=ack, payload=data)), tags=tags)


def test_parse_l4_reads_tcp_and_udp_over_both_families_and_tags():
    f = lpd.parse_l4(t4("10.0.0.1", "10.0.0.2", 1234, 80, SYN | ACK, 7, 9, b"abc",
                        tags=[vlan_tag(5)]))
    assert f == (6, ipaddress.ip_address("10.0.0.1").packed, ipaddress.ip_address("10.0.0.2").packed,
                 1234, 80, 43, 3, SYN | ACK, 7, 9, 65535, None, 14 + 4 + 20 + 20)
    f6 = lpd.parse_l4(ether(A, B, ETH_IP6, ipv6("fd00::1", "fd00::2", PROTO_UDP, udp(53, 999, b"x" * 9))))
    assert f6[0] == 17 and f6[3:7] == (53, 999, 40 + 8 + 9, 9)
    # Padding is not payload: a 60-byte frame carrying a bare ACK has none.
    assert lpd.parse_l4(t4("10.0.0.1", "10.0.0.2", 1, 2, ACK))[6] == 0


@pytest.mark.parametrize("frame", [
    ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", 1, b"\0" * 4)),                   # cut ICMP
    t4("10.0.0.1", "10.0.0.2", 1, 2)[:40],                                              # cut TCP
    ether(A, B, 0x0806, b"\0" * 28),                                                    # ARP
])
def test_parse_l4_refuses_what_is_not_a_whole_ip_packet(frame):
    assert lpd.parse_l4(frame) is None


def test_parse_l4_gives_icmp_its_type_and_counterpart_and_other_protocols_no_ports():
    ip = lambda a: ipaddress.ip_address(a).packed                        # noqa: E731
    # an echo request pairs with its reply (Zeek's counterpart), a one-way message's
    # code stands in for the responder's port
    echo = ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", 1, icmp(8, 0, b"\0" * 60)))
    assert lpd.parse_l4(echo)[:7] == (1, ip("10.0.0.1"), ip("10.0.0.2"), 8, 0, 20 + 64, 56)
    unreach = ether(A, B, ETH_IP, ipv4("10.0.0.2", "10.0.0.1", 1, icmp(3, 3, b"\0" * 32)))
    assert lpd.parse_l4(unreach)[3:5] == (3, 3)
    reply6 = ether(A, B, ETH_IP6, ipv6("fd00::2", "fd00::1", 58, icmp6(129, 0, b"\0" * 12)))
    assert lpd.parse_l4(reply6)[:7] == (58, ip("fd00::2"), ip("fd00::1"), 129, 128, 40 + 16, 8)
    gre = ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", 47, b"\0" * 24), tags=[vlan_tag(7)])
    assert lpd.parse_l4(gre)[:7] == (47, ip("10.0.0.1"), ip("10.0.0.2"), 0, 0, 44, 24)
    assert lpd.ip_tos_vlan(gre) == (0, 7)
    ef = ether(A, B, ETH_IP6, ipv6("fd00::1", "fd00::2", 47, b"\0" * 8, tclass=0xB8))
    assert lpd.ip_tos_vlan(ef) == (0xB8, 0)


def test_parse_l4_gives_fragments_their_datagram_id():
    first = ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", PROTO_UDP, udp(1, 2, b"x" * 40),
                                     ident=9, mf=True))
    later = ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", PROTO_UDP, b"y" * 24, ident=9,
                                     frag_offset=6))
    assert lpd.parse_l4(first)[11] == 9
    assert lpd.parse_l4(later) == (lpd.IP_FRAGMENT, ipaddress.ip_address("10.0.0.1").packed,
                                   ipaddress.ip_address("10.0.0.2").packed, 9, PROTO_UDP, 24, 44)
    # IPv6: the fragment header's identification; a later fragment's payload is what
    # follows that header
    first6 = ether(A, B, ETH_IP6, ipv6("fd00::1", "fd00::2", PROTO_UDP, udp(1, 2, b"x" * 40),
                                       exts=[fragment6(0, True, 77)]))
    assert lpd.parse_l4(first6)[11] == 77
    later6 = ether(A, B, ETH_IP6, ipv6("fd00::1", "fd00::2", PROTO_UDP, b"y" * 24,
                                       exts=[fragment6(6, False, 77)]))
    assert lpd.parse_l4(later6) == (lpd.IP_FRAGMENT, ipaddress.ip_address("fd00::1").packed,
                                    ipaddress.ip_address("fd00::2").packed, 77, PROTO_UDP, 24,
                                    40 + 8 + 24)
    # IPv6 behind extension headers: hop-by-hop and destination options are walked
    hop = bytes([60, 0]) + bytes(6)
    dst = bytes([PROTO_UDP, 0]) + bytes(6)
    v6 = ether(A, B, ETH_IP6, ipv6("fd00::1", "fd00::2", 0, hop + dst + udp(7, 8, b"z" * 5)))
    assert lpd.parse_l4(v6)[:7] == (PROTO_UDP, ipaddress.ip_address("fd00::1").packed,
                                    ipaddress.ip_address("fd00::2").packed, 7, 8, 40 + 16 + 13, 5)


def feed(conns, frames, t0=100.0, step=0.001):
    dec = lpd.Decoder(lpd.LocalAddresses([]), [conns])
    sf = [lpd.SynthFrame(d, len(d), ts=t0 + i * step) for i, d in enumerate(frames)]
    for block in lpd.frames_to_blocks(sf):
        dec.process_block(memoryview(block), 0)


def handshake(client, cport, server="10.0.0.2", sport=80, seq=1000):
    return [t4(client, server, cport, sport, SYN, seq),
            t4(server, client, sport, cport, SYN | ACK, 5000, seq + 1),
            t4(client, server, cport, sport, ACK, seq + 1, 5001)]


def test_a_syn_flood_evicts_half_open_connections_never_established_ones():
    logged = []
    conns = lpd.Connections(conn_max=100, finished=logged.append)
    established = handshake("10.0.0.1", 40000) + handshake("10.0.0.3", 40001)
    flood = [t4(f"10.9.{i // 250}.{i % 250}", "10.0.0.2", 1024 + i % 60000, 80, SYN, i)
             for i in range(5000)]
    feed(conns, established + flood)
    assert len(conns.table) <= 100
    # Evicted connections are not kept alive by their armed attempt timers.
    assert len(conns.timers) <= 100 + 100 // lpd.TIMERS_DEAD_FRACTION + lpd.TIMERS_MIN + 1
    keys = {(c.orig_h, c.orig_p) for c in conns.table.values()}
    assert (ipaddress.ip_address("10.0.0.1").packed, 40000) in keys
    assert (ipaddress.ip_address("10.0.0.3").packed, 40001) in keys
    assert conns.evictions == {"half_open": 5000 - 98, "oldest": 0}
    assert len(logged) == 5000 - 98 and {r["conn_state"] for r in logged} == {"S0"}
    snap = conns.snapshot()
    live = {(p, s): n for p, s, n in snap.live}
    assert live[("tcp", "established")] == 2 and live[("tcp", "connecting")] == 98


def test_without_half_open_ones_the_least_recently_active_goes():
    logged = []
    conns = lpd.Connections(conn_max=3, finished=logged.append)
    frames = []
    for i in range(3):
        frames += handshake("10.0.0.1", 40000 + i)
    frames.append(t4("10.0.0.1", "10.0.0.2", 40000, 80, ACK, 1001, 5001, b"x"))   # the first stays busy
    frames += handshake("10.0.0.1", 40003) + handshake("10.0.0.1", 50000)
    feed(conns, frames)
    assert conns.evictions == {"half_open": 0, "oldest": 2}
    assert [r["id.orig_p"] for r in logged] == [40001, 40002]
    assert {r["conn_state"] for r in logged} == {"S1"}


def test_live_counts_follow_the_state_and_return_to_zero():
    conns = lpd.Connections()
    c, s = "10.0.0.1", "10.0.0.2"
    feed(conns, handshake(c, 40000)[:1])
    assert conns.live[6, "connecting"] == 1
    feed(conns, handshake(c, 40000)[1:], t0=100.1)
    assert conns.live[6, "established"] == 1 and conns.live[6, "connecting"] == 0
    feed(conns, [t4(c, s, 40000, 80, FIN | ACK, 1001, 5001)], t0=100.2)
    assert conns.live[6, "closing"] == 1
    conns.finish()
    assert not any(conns.live.values()) and conns.closed[6, "S2"] == 1


def test_the_process_table_names_this_process_for_its_own_loopback_connection():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    try:
        (ch, cp), (sh, sp) = client.getsockname(), server.getsockname()
        key = (6, socket.inet_aton(ch), cp, socket.inet_aton(sh), sp)
        conn = lpd.Connection(key, 6, socket.inet_aton(ch), cp, socket.inet_aton(sh), sp, 0.0)
        table = lpd.ProcessTable(lambda *a: None)
        delivered = []
        table.deliver = delivered.append
        table.want(conn)
        assert table.fetch_once()
        assert delivered == [conn] and conn.pid == os.getpid()
        with open(f"/proc/{os.getpid()}/comm") as f:
            assert conn.comm == f.read().strip()
        # The rate limit: a second connection right after waits for the next scan.
        other = lpd.Connection(key, 6, socket.inet_aton(sh), sp, socket.inet_aton(ch), cp, 0.0)
        table.want(other)
        table.fetch_once()
        assert other.pid is None and table.scans == 1 and len(table.pending) == 1
        table.last_scan -= lpd.PROC_REFRESH_MIN
        table.fetch_once()
        assert other.pid == os.getpid() and table.scans == 2      # seen from the other end
    finally:
        for s in (client, peer, server):
            s.close()


def test_the_conn_log_reopens_after_rotation(tmp_path):
    path = tmp_path / "conn.json"
    log = lpd.JsonLog(str(path))
    log.write({"a": 1})
    log.flush()
    os.rename(path, tmp_path / "conn.json.1")
    log.write({"a": 2})
    log.reopen()
    log.write({"a": 3})
    log.close()
    assert [json.loads(l) for l in (tmp_path / "conn.json.1").read_text().splitlines()] == [{"a": 1}, {"a": 2}]
    assert [json.loads(l) for l in path.read_text().splitlines()] == [{"a": 3}]


def test_an_unwritable_conn_log_is_a_one_line_error(tmp_path, capsys):
    pcap = tmp_path / "x.pcap"
    write_pcap(pcap, [])
    assert lpd.main(["-r", str(pcap), "--conn-log", str(tmp_path / "no" / "dir.json")]) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--conn-log" in err and "No such file or directory" in err


def test_connections_document_filters_by_state_and_sorts_by_bytes():
    conns = lpd.Connections()
    frames = handshake("10.0.0.1", 40000) + handshake("10.0.0.3", 40001)[:1]
    frames.append(t4("10.0.0.1", "10.0.0.2", 40000, 80, ACK, 1001, 5001, b"x" * 500))
    feed(conns, frames)
    published = lpd.Published()
    published.publish({"time": 200.0, "connections": conns.snapshot()})
    how = lpd.Presentation("eth0", lambda a: "eth0", lambda k: ("Unknown",) * 4, 0)
    status, body = lpd.api_answer("/api/connections", "top=1", published, lambda: how)
    doc = json.loads(body)
    assert status == 200 and doc["open"] == 2 and len(doc["connections"]) == 1
    top = doc["connections"][0]
    assert (top["orig_h"], top["orig_p"], top["state"], top["orig_bytes"]) == ("10.0.0.1", 40000, "established", 500)
    assert top["age"] == pytest.approx(100.0, abs=0.1) and top["midstream"] is False
    status, body = lpd.api_answer("/api/connections", "state=connecting", published, lambda: how)
    assert [d["orig_h"] for d in json.loads(body)["connections"]] == ["10.0.0.3"]
    assert lpd.api_answer("/api/connections", "state=bogus", published, lambda: how)[0] == 400
    assert json.loads(body)["counts"]["tcp"] == {"connecting": 1, "established": 1, "closing": 0, "reset": 0}


# ---- found in review: each of these failed before its fix ---------------------------

RST = 0x04


def fed(frames, **kw):
    """Connections fed (ts, frame) pairs directly; -> (stage, finished records)."""
    recs = []
    conns = lpd.Connections(finished=recs.append, **kw)
    for ts, f in frames:
        conns.packet(f, ts, len(f), 1, lpd.ETH_HLEN)
    return conns, recs


def test_an_ip_length_beyond_the_frame_is_not_counted():
    bogus = bytearray(t4("10.0.0.1", "10.0.0.2", 1, 2, ACK, 5, 0, b"x"))
    bogus[16:18] = (65535).to_bytes(2, "big")
    conns, _ = fed([(1.0, bytes(bogus))])
    assert not conns.table


def test_a_peer_repeating_fins_cannot_grow_the_history_without_bound():
    frames = handshake("10.0.0.1", 40000)
    stream = [(100.0 + i * 0.001, f) for i, f in enumerate(frames)]
    stream += [(101 + i * 0.001, t4("10.0.0.1", "10.0.0.2", 40000, 80, FIN | ACK, 2000 + i, 5001))
               for i in range(2000)]
    conns, _ = fed(stream)
    (c,) = conns.table.values()
    assert len(c.history) == lpd.HISTORY_MAX


def test_syn_ack_backscatter_does_not_evict_an_established_connection():
    stream = [(i * 0.001, f) for i, f in enumerate(handshake("10.0.0.1", 40000, sport=22))]
    stream += [(2 + i * 1e-4, t4(f"10.7.{i // 250}.{i % 250}", "10.0.0.2", 80, 2000 + i, SYN | ACK, i, 7))
               for i in range(1000)]
    conns, recs = fed(stream, conn_max=100)
    assert any(c.resp_p == 22 for c in conns.table.values())
    assert conns.evictions["oldest"] == 0 and conns.evictions["half_open"] == 901


def test_a_retransmitted_syn_ack_after_the_originators_rst_joins_its_connection():
    c, s = "10.0.0.1", "10.0.0.2"
    stream = [(0.0, t4(c, s, 40000, 80, SYN, 100)), (0.01, t4(s, c, 80, 40000, SYN | ACK, 500, 101)),
              (0.02, t4(c, s, 40000, 80, RST, 101)), (1.0, t4(s, c, 80, 40000, SYN | ACK, 500, 101))]
    conns, recs = fed(stream)
    conns.finish()
    assert [(r["history"], r["conn_state"], r["resp_pkts"]) for r in recs] == [("ShR", "RSTO", 2)]


def test_fin_then_rst_from_one_side_ends_after_the_reset_delay():
    c, s = "10.0.0.1", "10.0.0.2"
    stream = [(i * 0.01, f) for i, f in enumerate(handshake(c, 40000))]
    stream += [(10.06, t4(c, s, 40000, 80, FIN | ACK, 1001, 5001)),
               (10.07, t4(c, s, 40000, 80, RST, 1002)),
               (30.0, t4(s, c, 80, 40000, ACK, 5001, 1002, b"late"))]
    conns, recs = fed(stream)
    assert [(r["history"], r["conn_state"]) for r in recs] == [("ShAFR", "RSTO")]
    assert len(conns.table) == 1                       # the late data is a new entry


def test_a_mass_timeout_ends_connections_a_budget_at_a_time():
    stream = [(i * 1e-5, ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", PROTO_UDP,
                                                   udp(1000 + i % 60000, 53 + i // 60000, b"q"))))
              for i in range(lpd.EXPIRE_BUDGET + 100)]
    conns, recs = fed(stream)
    conns.tick(1000.0)
    assert len(recs) == lpd.EXPIRE_BUDGET                  # bounded work per pass
    conns.tick(1001.0)
    assert len(recs) == lpd.EXPIRE_BUDGET + 100 and not conns.table



FLOOD_PASSES = 4            # a flood this many budgets long: more than one pass could skip


@pytest.mark.parametrize("flood", ["answered", "evicted"])
def test_dead_timer_entries_cost_an_expiry_pass_nothing(flood):
    """After a SYN flood, a connection closed by FINs ends in the first pass after its
    close delay (issue 24: it came ~20 s late). Answered by SYN-ACKs (SYN cookies), every
    flood SYN leaves an attempt timer with nothing to do; through a small table, every
    evicted one leaves a dead entry. Neither may take the pass's budget."""
    n = FLOOD_PASSES * lpd.EXPIRE_BUDGET
    conn_max = lpd.EXPIRE_BUDGET - 96 if flood == "evicted" else lpd.DEFAULT_CONN_MAX
    stream = []
    for i in range(n):
        src, port = f"10.{8 + i // 65536}.{i // 256 % 256}.{i % 256}", 1024 + i % 60000
        stream.append((100 + i * 1e-6, t4(src, "10.0.0.2", port, 80, SYN, i)))
        if flood == "answered":
            stream.append((100 + i * 1e-6, t4("10.0.0.2", src, 80, port, SYN | ACK, 7, i + 1)))
    c, s = "10.0.0.1", "10.0.0.2"
    stream += [(101 + i * 0.01, f) for i, f in enumerate(handshake(c, 40000))]
    stream += [(101.03, t4(c, s, 40000, 80, FIN | ACK, 1001, 5001)),
               (101.04, t4(s, c, 80, 40000, FIN | ACK, 5001, 1002)),
               (101.05, t4(c, s, 40000, 80, ACK, 1002, 5002))]
    conns, recs = fed(stream, conn_max=conn_max)
    logged = len(recs)
    conns.tick(101.05 + lpd.CONN_CLOSE_DELAY)
    ours = [r for r in recs[logged:] if r["id.orig_h"] == c]
    assert [(r["history"], r["conn_state"]) for r in ours] == [("ShAFf", "SF")]
    if flood == "answered":                          # answered: they live on, unlogged
        assert len(recs) == 1 and len(conns.table) == n
    assert conns.timers_dead <= max(lpd.TIMERS_MIN, len(conns.timers) // lpd.TIMERS_DEAD_FRACTION)


def test_api_top_takes_ascii_digits_only():
    published = lpd.Published()
    published.publish({"connections": lpd.Connections().snapshot()})
    how = lpd.Presentation("eth0", lambda a: "eth0", lambda k: ("Unknown",) * 4, 0)
    assert lpd.api_answer("/api/connections", "top=\u00b2", published, lambda: how)[0] == 400


def test_a_process_named_with_invalid_utf8_does_not_hide_the_others():
    import subprocess
    import sys
    import time
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(2)
    port = server.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c",
                              "import ctypes, socket, sys, time\n"
                              "ctypes.CDLL(None).prctl(15, b'ev\\xffil', 0, 0, 0)\n"
                              f"s = socket.create_connection(('127.0.0.1', {port}))\n"
                              "sys.stdin.read()\n"], stdin=subprocess.PIPE)
    try:
        odd, _ = server.accept()
        mine = socket.create_connection(("127.0.0.1", port))
        theirs, _ = server.accept()
        deadline = time.monotonic() + 5
        while open(f"/proc/{child.pid}/comm", "rb").read().strip() != b"ev\xffil" and \
                time.monotonic() < deadline:
            time.sleep(0.05)

        def conn(local, remote):
            return lpd.Connection(None, 6, socket.inet_aton(local[0]), local[1],
                                  socket.inet_aton(remote[0]), remote[1], 0.0)
        a, b = conn(odd.getpeername(), ("127.0.0.1", port)), conn(mine.getsockname(), ("127.0.0.1", port))
        table = lpd.ProcessTable(lambda *x: None)
        table.want(a)
        table.want(b)
        assert table.fetch_once()
        assert (a.pid, a.comm) == (child.pid, "ev\ufffdil") and b.pid == os.getpid()
        for s in (odd, mine, theirs):
            s.close()
    finally:
        child.kill()
        child.wait(5)
        server.close()
