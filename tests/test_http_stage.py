"""The HTTP stage (issue 13) without namespaces: the kernel program that returns only
the HTTP ports' frames whole, routes, percentiles and /api/requests. Request scenarios
from crafted pcaps are in test_http_offline.py, real HTTP in namespaces in
test_http_live.py."""
import collections
import io
import json

import pytest

import lpd
from packets import ETH_ARP, ETH_IP, ETH_IP6, PROTO_TCP, PROTO_UDP, ether, ipv4, ipv6, tcp, udp

pytestmark = pytest.mark.unit

A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def verdict(prog, frame):
    return lpd.bpf_interpret(prog, frame, len(frame))


def copied(prog, frame):
    """The bytes of `frame` a socket filter `prog` hands to the ring (0: dropped)."""
    return min(verdict(prog, frame), len(frame))


@pytest.mark.parametrize("prefilter", [None, "not arp"])
def test_the_kernel_program_returns_http_frames_whole_and_cuts_the_rest(prefilter):
    whole = lpd.whole_frames_program((80, 8080))
    pre = lpd.compile_filter(prefilter, kernel=True) if prefilter else None
    prog = lpd.kernel_program(pre, lpd.SNAPLEN_ACCOUNTING, whole)
    web = ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", PROTO_TCP, tcp(40000, 8080, payload=b"x" * 900)))
    reply6 = ether(A, B, ETH_IP6, ipv6("fd00::2", "fd00::1", PROTO_TCP, tcp(80, 40000, payload=b"y")))
    other = ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", PROTO_TCP, tcp(40000, 22, payload=b"z" * 900)))
    dns = ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", PROTO_UDP, udp(5353, 80, b"q")))
    arp = ether(A, B, ETH_ARP, bytes(28))
    # What the kernel copies: a frame shorter than the judge's loads is copied whole
    # without being judged (test below), so only the length copied is the contract.
    assert copied(prog, web) == len(web) and copied(prog, reply6) == len(reply6)
    assert copied(prog, other) == lpd.SNAPLEN_ACCOUNTING and copied(prog, dns) == len(dns)
    assert copied(prog, arp) == (0 if prefilter else len(arp))


# Frames whose every prefix the composed kernel program must deliver: TCP to an HTTP port
# (whole), with IPv4 options (the judge's [X + k] loads reach furthest), IPv6, other
# traffic, ARP; a prefix of any of them is what a malformed or cut frame looks like.
_PREFIX_FRAMES = [
    ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", PROTO_TCP, tcp(40000, 8080, payload=b"x" * 40)), pad=False),
    ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", PROTO_TCP, tcp(80, 40000, payload=b"x" * 8),
                             options=bytes(40)), pad=False),
    ether(A, B, ETH_IP6, ipv6("fd00::2", "fd00::1", PROTO_TCP, tcp(80, 40000, payload=b"y" * 8)), pad=False),
    ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", PROTO_UDP, udp(5353, 53, b"q" * 30)), pad=False),
    ether(A, B, ETH_ARP, bytes(28), pad=False),
]


@pytest.mark.parametrize("prefilter", [None, "not arp", "ip or ip6", "ether[60] = 0"])
@pytest.mark.parametrize("snaplen", [lpd.SNAPLEN_ACCOUNTING, 64])
def test_the_kernel_program_drops_a_frame_of_any_length_only_where_the_prefilter_does(prefilter, snaplen):
    """With --http the judge of "whole or cut" must never drop a frame, whatever its
    length: a load past the end of a classic-BPF program's frame returns 0 (drop), so
    an IPv4 header cut short never reached the accounting (issue 24). -F keeps libpcap's
    semantics: what it rejects, a load past the end included, is dropped."""
    whole = lpd.whole_frames_program((80, 8080))
    pre = lpd.compile_filter(prefilter, kernel=True) if prefilter else None
    prog = lpd.kernel_program(pre, snaplen, whole)
    for base in _PREFIX_FRAMES:
        for n in range(len(base) + 1):
            frame = base[:n]
            got = verdict(prog, frame)
            kept = pre is None or verdict(pre, frame) > 0
            assert (got > 0) == kept, (base.hex(), n, got)
            if kept:
                assert got >= min(n, snaplen), (base.hex(), n, got)     # what the accounting reads
                if verdict(whole, frame):
                    assert got >= n, (base.hex(), n, got)               # an HTTP frame: whole


def test_dump_shows_the_kernel_program_of_http():
    out = io.StringIO()
    assert lpd.dump_filter(lpd.parse_args(["-d", "--http", "--http-ports", "8080", "not arp"]), out) == 0
    text = out.getvalue()
    assert "ret      #262144" in text and f"ret      #{lpd.SNAPLEN_ACCOUNTING}" in text
    assert "#0x1f90" in text and "ja" in text


@pytest.mark.parametrize("uri,route", [
    ("/users/123/orders?x=1", "/users/:id/orders"),
    ("/", "/"),
    ("/a/deadbeefcafe/b", "/a/:id/b"),
    ("/u/123e4567-e89b-12d3-a456-426614174000", "/u/:id"),
    ("/static/app.js", "/static/app.js"),
    ("/v2/abc", "/v2/abc"),
    ("http://example.com/x/42?q", "/x/:id"),
])
def test_routes_drop_the_query_and_ids(uri, route):
    assert lpd.http_route(uri) == route


def test_percentiles_are_nearest_rank():
    values = sorted(i / 100 for i in range(1, 101))
    assert lpd._percentile(values, 0.5) == 0.5 and lpd._percentile(values, 0.99) == 0.99
    assert lpd._percentile([], 0.5) == 0.0


def test_bad_http_ports_are_usage_errors():
    for bad in ("0", "80,x", "70000", ","):
        with pytest.raises(lpd.UsageError):
            lpd.parse_args(["--http-ports", bad])
    assert lpd.parse_args(["--http-log", "-"]).http


def test_api_requests_filters_and_limits():
    stage = lpd.HttpRequests((80,))
    for i in range(3):
        stage.recent.setdefault("10.0.0.2:80", collections.deque(maxlen=5)).appendleft({"n": i})
    stage.recent.setdefault("10.0.0.3:80", collections.deque()).appendleft({"n": 9})
    published = lpd.Published()
    published.publish({"http": stage.snapshot()})
    how = lpd.Presentation("eth0", lambda a: "eth0", lambda k: ("Unknown",) * 4, 0)
    status, body = lpd.api_answer("/api/requests", "server=10.0.0.2%3A80&limit=2", published, lambda: how)
    assert status == 200 and json.loads(body)["servers"] == {"10.0.0.2:80": [{"n": 2}, {"n": 1}]}
    assert len(json.loads(lpd.api_answer("/api/requests", "", published, lambda: how)[1])["servers"]) == 2
    assert lpd.api_answer("/api/requests", "limit=x", published, lambda: how)[0] == 400
    published.publish({})
    assert lpd.api_answer("/api/requests", "", published, lambda: how)[0] == 404


def seg(src, dst, sport, dport, seq, data=b"", flags=0x18):
    return ether(A, B, ETH_IP, ipv4(src, dst, PROTO_TCP, tcp(sport, dport, flags=flags, seq=seq,
                                                              ack=1, payload=data)))


def test_held_early_segments_are_bounded_over_all_connections(monkeypatch):
    monkeypatch.setattr(lpd, "HTTP_OOO_TOTAL_MAX", 10_000)
    stage = lpd.HttpRequests((80,))
    for i in range(50):                      # each connection: a byte, then 1000 bytes far ahead
        stage.packet(seg("10.0.0.1", "10.0.0.2", 1000 + i, 80, 1, b"G"), 1.0)
        stage.packet(seg("10.0.0.1", "10.0.0.2", 1000 + i, 80, 5000, b"x" * 1000), 1.0)
    assert stage.ooo_total <= 10_000 + 1000 and stage.errors["gap"] >= 40


def test_pipelined_requests_without_answers_are_bounded(monkeypatch):
    monkeypatch.setattr(lpd, "HTTP_PENDING_MAX", 10)
    stage = lpd.HttpRequests((80,))
    req = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    stage.packet(seg("10.0.0.1", "10.0.0.2", 1000, 80, 1, req * 50), 1.0)
    (s,) = stage.streams.values()
    assert len(s.pending) == 10 and stage.errors["too_many_pending"] == 1


def test_a_scan_of_many_servers_keeps_a_bounded_set_of_series(monkeypatch):
    monkeypatch.setattr(lpd, "HTTP_SERVERS_MAX", 5)
    monkeypatch.setattr(lpd, "HTTP_RECENT_SERVERS", 100)
    stage = lpd.HttpRequests((80,))
    for i in range(20):
        server = f"10.0.1.{i + 1}"
        stage.packet(seg("10.0.0.1", server, 1000, 80, 1, b"GET /x HTTP/1.1\r\n\r\n"), 1.0)
        stage.packet(seg(server, "10.0.0.1", 80, 1000, 1, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 1.1)
    assert len(stage.recent) == 6 and "other" in stage.recent and len(stage.recent["other"]) == 15
    assert {labels[4] for labels in stage.histogram} == {f"10.0.1.{i + 1}" for i in range(5)} | {"other"}


def test_after_a_response_that_ran_to_the_close_late_bytes_are_ignored():
    stage = lpd.HttpRequests((80,))
    stage.packet(seg("10.0.0.1", "10.0.0.2", 40000, 80, 1000, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 1.0)
    stage.packet(seg("10.0.0.2", "10.0.0.1", 80, 40000, 5000, b"HTTP/1.1 200 OK\r\n\r\nbody", 0x19), 2.0)
    stage.packet(seg("10.0.0.2", "10.0.0.1", 80, 40000, 5024, b"late"), 3.0)    # raised before
    stage.finish()
    assert stage.recent["10.0.0.2:80"][0]["response_body_len"] == 4


def test_a_head_trickled_a_byte_at_a_time_is_searched_once():
    """Each delivery searches from where the last one stopped (not the whole buffer again:
    65,536 one-byte segments took 16 s that way)."""
    stage = lpd.HttpRequests((80,))
    head = b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 2000
    for i, b in enumerate(head):
        stage.packet(seg("10.0.0.1", "10.0.0.2", 40000, 80, 1000 + i, bytes([b])), 1.0)
        (s,) = stage.streams.values()
        assert s.to_server.scanned == len(s.to_server.buf) == i + 1


def test_uris_are_kept_bounded():
    stage = lpd.HttpRequests((80,))
    stage.packet(seg("10.0.0.1", "10.0.0.2", 40000, 80, 1000,
                     b"GET /" + b"a" * 50000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"), 1.0)
    stage.finish()
    assert len(stage.recent["10.0.0.2:80"][0]["uri"]) == lpd.HTTP_TEXT_MAX
