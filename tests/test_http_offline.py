"""HTTP/1.x requests from packets (issue 13) in a replay: hand-built pcaps, scenario by
scenario, and the exact http.log fields `--http-log` gives for them.

Expectations follow RFC 9112 framing and Zeek's http.log meanings as distilled in
/work/notes/http-spec.md (§4 Zeek, §5 framing), with lpd's documented departures: `uri` is
the request-target as sent (not percent-decoded), `ts` is the time of the request's first
byte, `status_code` 0 for a request that got no response, body lengths after chunked framing
is removed.

Timings (`ts`, `ttfb`, `duration`) come from packet timestamps: whole microseconds after T0
in nanosecond pcaps, compared at 2 µs (float rounding of epoch-sized values). Every byte
reaches the parser in TCP sequence order: `ttfb` ends at the packet that delivers the first
byte of the final response, `duration` at the packet that delivers its last byte (for a
request without a response: the connection's last packet).
"""
import collections
import json
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import LPD, PCAP_NS, json_values, run_cli, write_pcap
from packets import ETH_IP, ETH_IP6, PROTO_DSTOPTS, PROTO_TCP, TCP_ACK, TCP_FIN, TCP_PUSH, \
    TCP_RST, TCP_SYN, ether, ipv4, ipv6, ipv6_ext, tcp, vlan_tag

pytestmark = pytest.mark.offline

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
T0 = 1_700_000_000                  # an epoch-like base time, as a real capture has
W32 = 2 ** 32

SYN, ACK, FIN, RST, PSH = TCP_SYN, TCP_ACK, TCP_FIN, TCP_RST, TCP_PUSH
SA, PA, FA, RA = SYN | ACK, PSH | ACK, FIN | ACK, RST | ACK
FPA = FIN | PSH | ACK
MSS = b"\x02\x04\x05\xb4"

C = ("10.0.0.1", 40000)
C2 = ("10.0.0.1", 40001)
S = ("10.0.0.2", 80)
S8080 = ("10.0.0.2", 8080)
S9999 = ("10.0.0.2", 9999)
HOST = "example.com"

FIELDS = ("ts", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "trans_depth", "method",
          "host", "uri", "version", "status_code", "request_body_len", "response_body_len", "ttfb",
          "duration", "container")
TIMES = ("ts", "ttfb", "duration")
BUCKETS = ("0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1.0",
           "2.5", "5.0", "7.5", "10.0", "+Inf")
HIST = "http_server_request_duration_seconds"
LABELS = {"http_request_method", "http_response_status_code", "http_route",
          "network_protocol_version", "server_address",
          "server_port", "container"}


# --- building traces (the approach of test_conn_offline.py) -------------------------------

def _ip(src, dst, proto, seg, exts=(), tags=()):
    if ":" in src:
        return ether(MAC_A, MAC_B, ETH_IP6, ipv6(src, dst, proto, seg, exts=exts), tags=tags)
    return ether(MAC_A, MAC_B, ETH_IP, ipv4(src, dst, proto, seg), tags=tags)


def us(t):
    """Offset in seconds -> absolute time in microseconds."""
    return T0 * 1_000_000 + round(t * 1_000_000)


class Trace:
    """The frames of a pcap, in time order. Frames shorter than 60 bytes are padded (the
    Ethernet minimum): the padding must never reach the HTTP parser."""

    def __init__(self, exts=(), tags=()):
        self.pkts = []                      # (time µs, frame)
        self.exts, self.tags = exts, tags   # IPv6 extension headers, VLAN tags of every frame

    def add(self, t, frame):
        at = us(t)
        assert not self.pkts or at >= self.pkts[-1][0], "a trace is in time order"
        self.pkts.append((at, frame))

    def tcp(self, t, src, dst, flags, seq=0, ack=0, payload=b"", window=65535, options=b""):
        seg = tcp(src[1], dst[1], flags, seq % W32, ack % W32, window, options, payload)
        self.add(t, _ip(src[0], dst[0], PROTO_TCP, seg, self.exts, self.tags))

    def write(self, path):              # nanosecond pcap, little-endian, Ethernet
        write_pcap(path, [(at // 1_000_000, at % 1_000_000 * 1000, frame)
                          for at, frame in self.pkts], PCAP_NS)


class Conn:
    """One TCP connection of a trace, client c to server s, with the sequence numbers kept:
    `q` sends client bytes, `r` server bytes, each at the next sequence number and acking
    everything the peer sent; `at` sends bytes at any stream offset (retransmissions,
    reordering, gaps) without moving the next sequence number."""

    def __init__(self, tr, c=C, s=S, t=0.0, ci=1000, si=5000, handshake=True):
        self.tr, self.c, self.s = tr, c, s
        self.isn = {c: ci + 1, s: si + 1}
        self.nxt = dict(self.isn)
        if handshake:               # SYN, SYN-ACK, ACK at t, t+10 ms, t+20 ms
            tr.tcp(t, c, s, SYN, ci, options=MSS)
            tr.tcp(t + 0.01, s, c, SA, si, ci + 1, options=MSS)
            tr.tcp(t + 0.02, c, s, ACK, ci + 1, si + 1)

    def peer(self, side):
        return self.s if side == self.c else self.c

    def send(self, t, side, data, flags=PA):
        p = self.peer(side)
        self.tr.tcp(t, side, p, flags, self.nxt[side], self.nxt[p], data)
        self.nxt[side] += len(data) + (1 if flags & (FIN | SYN) else 0)

    def q(self, t, data, flags=PA):
        self.send(t, self.c, data, flags)

    def r(self, t, data, flags=PA):
        self.send(t, self.s, data, flags)

    def ack(self, t, side):
        self.send(t, side, b"", ACK)

    def fin(self, t, side):
        self.send(t, side, b"", FA)

    def rst(self, t, side):
        p = self.peer(side)
        self.tr.tcp(t, side, p, RA, self.nxt[side], self.nxt[p])

    def off(self, side):
        """The stream offset of the next byte `side` sends."""
        return self.nxt[side] - self.isn[side]

    def at(self, t, side, off, data, flags=PA):
        p = self.peer(side)
        self.tr.tcp(t, side, p, flags, self.isn[side] + off, self.nxt[p], data)

    def skip(self, side, n):
        """Account for n bytes sent by `side` that the capture never shows."""
        self.nxt[side] += n

    def close(self, t):
        """FIN from the client, FIN from the server 10 ms later; nothing after."""
        self.fin(t, self.c)
        self.fin(t + 0.01, self.s)


# --- HTTP messages ------------------------------------------------------------------------

REASONS = {100: "Continue", 101: "Switching Protocols", 103: "Early Hints", 200: "OK",
           201: "Created", 204: "No Content", 304: "Not Modified", 404: "Not Found",
           407: "Proxy Authentication Required", 500: "Internal Server Error",
           503: "Service Unavailable"}


def request(method="GET", uri="/", host=HOST, headers=(), body=b"", version="1.1",
            length=None):
    """A request; `length` True adds Content-Length of the body (default: when there is one)."""
    lines = [f"{method} {uri} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += list(headers)
    if length or (length is None and body):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def response(status=200, body=b"", headers=(), version="1.1", length=True, reason=None):
    lines = [f"HTTP/{version} {status} {reason or REASONS.get(status, 'Whatever')}"]
    lines += list(headers)
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# A 200 whose body follows chunked (in the same segment or in the next ones).
CHUNKED_200 = response(200, headers=["Transfer-Encoding: chunked"], length=False)


def rec(depth, method, uri, status, t, first=None, last=None, host=HOST, qlen=0, rlen=0,
        c=C, s=S, version="1.1"):
    """The http.log record expected: request's first byte at offset t, final response's first
    byte at `first` (None: no response), the last byte (or the connection's last packet) at
    `last`."""
    r = {"ts": us(t) / 1e6, "id.orig_h": c[0], "id.orig_p": c[1], "id.resp_h": s[0],
         "id.resp_p": s[1], "trans_depth": depth, "method": method, "uri": uri,
         "version": version, "status_code": status, "request_body_len": qlen, "response_body_len": rlen,
         "duration": (us(last) - us(t)) / 1e6, "container": ""}
    if host is not None:
        r["host"] = host
    if first is not None:
        r["ttfb"] = (us(first) - us(t)) / 1e6
    return r


def next_request(cn, depth, t=0.2):
    """GET /after at t, answered `ok` 10 ms later: parsed, and so logged, only when the
    message before it ended exactly where its framing says. Its record, at `depth`."""
    cn.q(t, request(uri="/after"))
    cn.r(t + 0.01, response(200, b"ok"))
    return rec(depth, "GET", "/after", 200, t, t + 0.01, t + 0.01, rlen=2)


# --- running lpd -------------------------------------------------------------------------

def order(recs):
    return sorted(recs, key=lambda r: (r.get("ts", 0), r.get("id.orig_h", ""),
                                       r.get("id.orig_p", 0), r.get("trans_depth", 0)))


def _close_to(got, want):
    """got with its times replaced by want's where they agree at 2 µs."""
    out = dict(got)
    for k in TIMES:
        g, w = got.get(k), want.get(k)
        if isinstance(g, (int, float)) and isinstance(w, (int, float)) and abs(g - w) <= 2e-6:
            out[k] = w
    return out


def check(recs, want):
    """The log (any order) is exactly `want`: same records, same keys, times at 2 µs."""
    got, want = order(recs), order(want)
    fixed = [_close_to(g, w) for g, w in zip(got, want)] + got[len(want):]
    assert fixed == want


def replay(tmp_path, trace, *args, output="json", http=True):
    """python3 lpd.py -r on the trace, as a process (replay() binds sys.stdout as a default
    argument at import time, so capsys cannot see an in-process --output): (the log's
    records, what --output printed)."""
    pcap, log = tmp_path / "t.pcap", tmp_path / "http.json"
    trace.write(pcap)
    if log.exists():
        log.unlink()
    argv = [sys.executable, LPD, "-r", str(pcap), *(["--http"] if http else []),
            "--http-log", str(log), "--output", output, *args]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)   # tiny pcaps
    assert p.returncode == 0, p.stderr
    lines = log.read_text().splitlines() if log.exists() else []
    assert all(line.strip() for line in lines), "one JSON object per line, no blank lines"
    return [json.loads(line) for line in lines], p.stdout


def http_log(tmp_path, trace, *args):
    return replay(tmp_path, trace, *args)[0]


def http_doc(out):
    return json.loads(out)["http"]


def histogram(text):
    """The http_server_request_duration_seconds samples of an exposition:
    {frozenset(labels without le): {"buckets": {le: n}, "sum": x, "count": n}}."""
    series = collections.defaultdict(lambda: {"buckets": {}, "les": []})
    found = False
    for fam in text_string_to_metric_families(text):
        if fam.name != HIST:
            continue
        found = True
        assert fam.type == "histogram"
        for smp in fam.samples:
            labels = dict(smp.labels)
            le = labels.pop("le", None)
            key = frozenset(labels.items())
            if smp.name == HIST + "_bucket":
                series[key]["buckets"][le] = smp.value
                series[key]["les"].append(le)
            elif smp.name == HIST + "_sum":
                series[key]["sum"] = smp.value
            elif smp.name == HIST + "_count":
                series[key]["count"] = smp.value
    assert found, f"no {HIST} in the exposition"
    return dict(series)


def route_counts(hist, **match):
    """{http_route: requests} over the series whose labels include `match`."""
    counts = collections.Counter()
    for key, s in hist.items():
        labels = dict(key)
        if all(labels.get(k) == v for k, v in match.items()):
            counts[labels["http_route"]] += s["count"]
    return dict(counts)


# --- the basic exchanges --------------------------------------------------------------------

def test_simple_get_with_content_length(tmp_path):
    """One GET, one 200 with Content-Length 11 in one segment: ttfb = duration = 20 ms; the
    ACKs (padded 60-byte frames) carry no HTTP bytes."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(headers=["User-Agent: test/1", "Accept: */*"]))
    cn.ack(0.04, S)
    cn.r(0.05, response(200, b"hello world", ["Content-Type: text/plain"]))
    cn.ack(0.06, C)
    cn.close(0.1)
    recs, out = replay(tmp_path, tr)
    check(recs, [rec(1, "GET", "/", 200, 0.03, 0.05, 0.05, rlen=11)])
    doc = http_doc(out)
    assert doc["servers"]["10.0.0.2:80"]["requests"] == 1
    assert doc["parse_errors"].get("gap", 0) == 0


def test_log_field_names_and_types(tmp_path):
    """Exactly the documented keys; `host` absent without a Host header, `ttfb` absent
    without a response; ints are ints, times floats, container "" (a replay knows none)."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/a"))
    cn.r(0.05, response(200, b"x"))
    cn.q(0.1, request(uri="/b", host=None))             # no Host: still a valid 1.1 message here
    cn.rst(0.2, S)
    recs = order(http_log(tmp_path, tr))
    assert [set(r) for r in recs] == [set(FIELDS), set(FIELDS) - {"host", "ttfb"}]
    for r in recs:
        for k in ("id.orig_p", "id.resp_p", "trans_depth", "status_code", "request_body_len",
                  "response_body_len"):
            assert type(r[k]) is int, k
        for k in TIMES:
            if k in r:
                assert isinstance(r[k], float), k
        assert r["container"] == "" and isinstance(r["id.orig_h"], str)
    assert recs[1]["status_code"] == 0


def test_keep_alive_three_sequential_requests(tmp_path):
    """Three requests one after another on one connection: trans_depth 1, 2, 3; each
    response in two segments (headers, then body) so ttfb and duration differ; the Host
    value and the request-target exactly as sent (no decoding)."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/a"))
    cn.r(0.04, response(200, b"A" * 300)[:-300])
    cn.r(0.06, b"A" * 300)
    cn.q(0.2, request(uri="/b?x=1&y=%2F", host=None, headers=["HOST: Example.COM:80"]))
    cn.r(0.25, response(404, b"B" * 40)[:-40])
    cn.r(0.30, b"B" * 40)
    cn.q(0.5, request(uri="/search?q=a%20b"))
    cn.r(0.9, response(200, b"C" * 2000)[:-1000])
    cn.r(1.5, b"C" * 1000)
    cn.close(2.0)
    recs, out = replay(tmp_path, tr)
    check(recs, [rec(1, "GET", "/a", 200, 0.03, 0.04, 0.06, rlen=300),
                 rec(2, "GET", "/b?x=1&y=%2F", 404, 0.2, 0.25, 0.30, host="Example.COM:80",
                     rlen=40),
                 rec(3, "GET", "/search?q=a%20b", 200, 0.5, 0.9, 1.5, rlen=2000)])
    srv = http_doc(out)["servers"]["10.0.0.2:80"]
    assert srv["requests"] == 3
    assert 0.03 - 1e-6 <= srv["p50"] <= 1.0 + 1e-6
    assert srv["p50"] <= srv["p95"] <= srv["p99"] <= 1.0 + 1e-6


def pipelined_requests():
    return request(uri="/one") + request(uri="/two") + request(uri="/three")


PIPE_RESPONSES = [response(200, b"111"), response(404, b"2222"), response(200, b"33333")]


def test_pipelining_responses_in_their_own_segments(tmp_path):
    """Three requests in ONE segment (same ts), three responses in three segments: matched in
    order (the 404 is the second request's), trans_depth 1..3."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, pipelined_requests())
    for i, r in enumerate(PIPE_RESPONSES):
        cn.r(0.05 + i * 0.01, r)
    cn.close(0.1)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/one", 200, 0.03, 0.05, 0.05, rlen=3),
           rec(2, "GET", "/two", 404, 0.03, 0.06, 0.06, rlen=4),
           rec(3, "GET", "/three", 200, 0.03, 0.07, 0.07, rlen=5)])


def test_pipelining_responses_in_one_segment(tmp_path):
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, pipelined_requests())
    cn.r(0.05, b"".join(PIPE_RESPONSES))
    cn.close(0.1)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/one", 200, 0.03, 0.05, 0.05, rlen=3),
           rec(2, "GET", "/two", 404, 0.03, 0.05, 0.05, rlen=4),
           rec(3, "GET", "/three", 200, 0.03, 0.05, 0.05, rlen=5)])


def test_pipelining_responses_split_across_message_boundaries(tmp_path):
    """The three responses' bytes cut at arbitrary places: segment 1 = response 1 + the first
    5 bytes of response 2, segment 2 = response 2 but its last 2 bytes, segment 3 = the rest."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, pipelined_requests())
    data = b"".join(PIPE_RESPONSES)
    p1 = len(PIPE_RESPONSES[0]) + 5
    p2 = len(PIPE_RESPONSES[0]) + len(PIPE_RESPONSES[1]) - 2
    cn.r(0.05, data[:p1])
    cn.r(0.06, data[p1:p2])
    cn.r(0.07, data[p2:])
    cn.close(0.1)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/one", 200, 0.03, 0.05, 0.05, rlen=3),
           rec(2, "GET", "/two", 404, 0.03, 0.05, 0.07, rlen=4),
           rec(3, "GET", "/three", 200, 0.03, 0.07, 0.07, rlen=5)])


def test_pipelined_requests_split_across_segments(tmp_path):
    """Requests cut mid-line: request 2 begins in segment 1 (ts of segment 1), request 3 in
    segment 2."""
    tr = Trace()
    cn = Conn(tr)
    data = pipelined_requests()
    r1 = len(request(uri="/one"))
    r2 = r1 + len(request(uri="/two"))
    cn.q(0.03, data[:r1 + 3])
    cn.q(0.04, data[r1 + 3:r2 + 10])
    cn.q(0.05, data[r2 + 10:])
    cn.r(0.08, b"".join(PIPE_RESPONSES))
    cn.close(0.1)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/one", 200, 0.03, 0.08, 0.08, rlen=3),
           rec(2, "GET", "/two", 404, 0.03, 0.08, 0.08, rlen=4),
           rec(3, "GET", "/three", 200, 0.04, 0.08, 0.08, rlen=5)])


# --- bodies ------------------------------------------------------------------------------

CHUNKED_BODY = (b"5;name=value\r\nhello\r\n"
                b"1A;q=\"a b\"\r\n" + b"z" * 26 + b"\r\n"
                b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n")


def test_chunked_response_with_extension_and_trailer(tmp_path):
    """response_body_len = 5 + 0x1A = 31, the sum of chunk sizes (§7.1.3), the extensions
    ignored, the trailer section read to its empty line; the chunk-size line itself split
    across segments, and a 2-byte segment (a padded frame). A second request on the same
    connection is parsed, so the chunked body ended exactly."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/chunked"))
    cn.r(0.05, CHUNKED_200)
    body = CHUNKED_BODY
    cut1 = body.index(b"1A") + 1                       # between "1" and "A"
    cut2 = body.index(b"0\r\nX-") + 3
    cn.r(0.06, body[:cut1])
    cn.r(0.07, body[cut1:cut2])
    cn.r(0.08, body[cut2:-2])
    cn.r(0.09, body[-2:])
    after = next_request(cn, 2)
    cn.close(0.3)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/chunked", 200, 0.03, 0.05, 0.09, rlen=31),
           after])


def test_chunked_response_in_one_segment_with_uppercase_and_leading_zeros(tmp_path):
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/c"))
    body = b"00A\r\n" + b"a" * 10 + b"\r\n" + b"1f\r\n" + b"b" * 31 + b"\r\n000\r\n\r\n"
    cn.r(0.05, CHUNKED_200 + body)
    cn.q(0.1, request(uri="/d"))
    cn.r(0.12, response(200, b"xyz"))
    cn.close(0.2)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/c", 200, 0.03, 0.05, 0.05, rlen=41),
           rec(2, "GET", "/d", 200, 0.1, 0.12, 0.12, rlen=3)])


CHUNK_SPLITS = {  # where the chunked body is cut into segments: lpd must wait, not spin
    "in the size line": [b"5;ext=1\r\nhello\r\n1", b"A\r\n" + b"z" * 26 + b"\r\n0\r\n\r\n"],
    "between CR and LF after the data": [b"5\r\nhello\r", b"\n1A\r\n" + b"z" * 26
                                         + b"\r\n0\r\n\r\n"],
    "in a trailer line": [b"5\r\nhello\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nX-Tr",
                          b"ailer: 1\r\n\r\n"],
    "before the last CRLF": [b"5\r\nhello\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\n", b"\r\n"],
}


@pytest.mark.parametrize("where", list(CHUNK_SPLITS))
def test_chunked_response_split_anywhere(tmp_path, where):
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/chunked"))
    cn.r(0.05, CHUNKED_200)
    cn.r(0.06, CHUNK_SPLITS[where][0])
    cn.r(0.07, CHUNK_SPLITS[where][1])
    after = next_request(cn, 2)
    cn.close(0.3)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/chunked", 200, 0.03, 0.05, 0.07, rlen=31),
           after])


@pytest.mark.parametrize("where", list(CHUNK_SPLITS))
def test_chunked_request_split_anywhere(tmp_path, where):
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request("POST", "/up", headers=["Transfer-Encoding: chunked"]))
    cn.q(0.04, CHUNK_SPLITS[where][0])
    cn.q(0.05, CHUNK_SPLITS[where][1])
    cn.r(0.07, response(200, b"ok"))
    after = next_request(cn, 2)
    cn.close(0.3)
    check(http_log(tmp_path, tr),
          [rec(1, "POST", "/up", 200, 0.03, 0.07, 0.07, qlen=31, rlen=2),
           after])


@pytest.mark.parametrize("size", [b"-5", b"0x5", b"+5", b"0_5"])
def test_invalid_chunk_size_is_a_parse_error(tmp_path, size):
    """chunk-size = 1*HEXDIG (RFC 9112 7.1): a sign, a 0x prefix or an underscore is
    invalid framing. The response cannot be framed any further: a parse error, no negative
    body length, and no later response matched on that connection."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/chunked"))
    cn.r(0.05, CHUNKED_200 + size + b"\r\nhello\r\n0\r\n\r\n")
    next_request(cn, 2)
    cn.close(0.3)
    recs, out = replay(tmp_path, tr)
    assert all(r["response_body_len"] >= 0 and r["request_body_len"] >= 0 for r in recs), recs
    assert [r["status_code"] for r in recs if r["uri"] == "/after"] in ([], [0]), recs
    assert sum(http_doc(out)["parse_errors"].values()) > 0


def test_chunked_request_body(tmp_path):
    """A chunked POST body: request_body_len = 4 + 5 = 9; the next request is found."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request("POST", "/upload", headers=["Transfer-Encoding: chunked"]))
    cn.q(0.04, b"4\r\nwiki\r\n5\r\npedia\r\n")
    cn.q(0.05, b"0\r\n\r\n")
    cn.r(0.07, response(201, b""))
    cn.q(0.1, request(uri="/x"))
    cn.r(0.11, response(200, b"x"))
    cn.close(0.2)
    check(http_log(tmp_path, tr),
          [rec(1, "POST", "/upload", 201, 0.03, 0.07, 0.07, qlen=9),
           rec(2, "GET", "/x", 200, 0.1, 0.11, 0.11, rlen=1)])


def test_post_with_content_length_body_across_segments(tmp_path):
    """Headers and the first 100 body bytes, then 1000, then 400: request_body_len 1500; the
    request bytes after the body are the next request."""
    body = bytes(range(256)) * 5 + b"q" * 220          # 1500 bytes, CRLFs and all
    assert len(body) == 1500
    tr = Trace()
    cn = Conn(tr)
    head = request("POST", "/form", headers=["Content-Type: application/octet-stream"],
                   body=body)
    cut = len(head) - 1400
    cn.q(0.03, head[:cut])
    cn.q(0.04, head[cut:cut + 1000])
    cn.ack(0.045, S)
    cn.q(0.05, head[cut + 1000:])
    cn.ack(0.06, S)
    cn.r(0.08, response(200, b"ok"))
    cn.q(0.1, request(uri="/next"))
    cn.r(0.11, response(200, b"n"))
    cn.close(0.2)
    check(http_log(tmp_path, tr),
          [rec(1, "POST", "/form", 200, 0.03, 0.08, 0.08, qlen=1500, rlen=2),
           rec(2, "GET", "/next", 200, 0.1, 0.11, 0.11, rlen=1)])


def test_expect_100_continue(tmp_path):
    """POST with Expect: 100-continue: headers, 100 Continue, the body, then 200. One record
    (the 100 does not end the request), status 200, ttfb to the 200's first byte."""
    tr = Trace()
    cn = Conn(tr)
    body = b"b" * 50
    cn.q(0.03, request("POST", "/up", headers=["Expect: 100-continue",
                                               f"Content-Length: {len(body)}"]))
    cn.r(0.04, b"HTTP/1.1 100 Continue\r\n\r\n")
    cn.q(0.05, body)
    cn.r(0.07, response(200, b"yes")[:-3])
    cn.r(0.08, b"yes")
    cn.q(0.2, request(uri="/after"))
    cn.r(0.21, response(200, b""))
    cn.close(0.3)
    check(http_log(tmp_path, tr),
          [rec(1, "POST", "/up", 200, 0.03, 0.07, 0.08, qlen=50, rlen=3),
           rec(2, "GET", "/after", 200, 0.2, 0.21, 0.21)])


def test_expect_100_continue_with_the_final_response_in_the_same_segment(tmp_path):
    """A second 100 and the 200 in one segment: still one record, ttfb to that segment."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request("PUT", "/x", headers=["Expect: 100-continue", "Content-Length: 4"]))
    cn.r(0.04, b"HTTP/1.1 100 Continue\r\n\r\n")
    cn.q(0.05, b"abcd")
    cn.r(0.07, b"HTTP/1.1 100 Continue\r\n\r\n" + response(200, b"ok"))
    cn.close(0.1)
    check(http_log(tmp_path, tr),
          [rec(1, "PUT", "/x", 200, 0.03, 0.07, 0.07, qlen=4, rlen=2)])


def test_early_hints_103_before_the_final_response(tmp_path):
    """A 1xx other than 100 is interim too: one record, status 200, ttfb to the 200."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/page"))
    cn.r(0.04, b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
    cn.r(0.09, response(200, b"page"))
    cn.close(0.2)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/page", 200, 0.03, 0.09, 0.09, rlen=4)])


def test_head_response_has_no_body_whatever_content_length_says(tmp_path):
    """HEAD answered with Content-Length: 1234 and no body (§6.3 rule 1): the next response
    on the connection is not swallowed as a body."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request("HEAD", "/file"))
    cn.r(0.05, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: x/y\r\n\r\n")
    cn.q(0.1, request(uri="/file"))
    cn.r(0.12, response(200, b"abcd"))
    cn.close(0.2)
    check(http_log(tmp_path, tr),
          [rec(1, "HEAD", "/file", 200, 0.03, 0.05, 0.05),
           rec(2, "GET", "/file", 200, 0.1, 0.12, 0.12, rlen=4)])


def test_204_and_304_have_no_body(tmp_path):
    """204 without Content-Length, 304 with Content-Length: 500 (the representation's size):
    neither has a body; the third response is found where it starts."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request("DELETE", "/thing/1"))
    cn.r(0.05, response(204, length=False))
    cn.q(0.1, request(uri="/doc", headers=['If-None-Match: "abc"']))
    cn.r(0.13, b'HTTP/1.1 304 Not Modified\r\nETag: "abc"\r\nContent-Length: 500\r\n\r\n')
    cn.q(0.2, request(uri="/last"))
    cn.r(0.24, response(200, b"end"))
    cn.close(0.3)
    check(http_log(tmp_path, tr),
          [rec(1, "DELETE", "/thing/1", 204, 0.03, 0.05, 0.05),
           rec(2, "GET", "/doc", 304, 0.1, 0.13, 0.13),
           rec(3, "GET", "/last", 200, 0.2, 0.24, 0.24, rlen=3)])


@pytest.mark.parametrize("cl", ["+5", "5, 6", "5 5", "0x5", "", "-1"])
def test_invalid_content_length_is_a_parse_error(tmp_path, cl):
    """RFC 9112 6.3 rule 5: an invalid Content-Length (a sign, differing list members, a
    space inside, hex, empty) is an unrecoverable framing error: a parse error, and the
    connection's later bytes are not matched as a response."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/a"))
    cn.r(0.05, f"HTTP/1.1 200 OK\r\nContent-Length: {cl}\r\n\r\nhello".encode())
    next_request(cn, 2)
    cn.close(0.3)
    recs, out = replay(tmp_path, tr)
    assert [r["status_code"] for r in recs if r["uri"] == "/after"] in ([], [0]), recs
    assert sum(http_doc(out)["parse_errors"].values()) > 0


def test_content_length_list_of_identical_values(tmp_path):
    """`5, 5` counts as 5, and so do two Content-Length fields of 5 (rule 5)."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/a"))
    cn.r(0.05, b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello")
    cn.q(0.1, request(uri="/b"))
    cn.r(0.12, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc")
    after = next_request(cn, 3)
    cn.close(0.3)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/a", 200, 0.03, 0.05, 0.05, rlen=5),
           rec(2, "GET", "/b", 200, 0.1, 0.12, 0.12, rlen=3),
           after])


def test_transfer_encoding_overrides_content_length(tmp_path):
    """Both: chunked wins (rule 3); the body is the chunks' 5 bytes, not 100."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/a"))
    cn.r(0.05, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n0\r\n\r\n", FPA)
    cn.fin(0.06, C)
    check(http_log(tmp_path, tr), [rec(1, "GET", "/a", 200, 0.03, 0.05, 0.05, rlen=5)])


def test_busybox_head_with_a_body_anyway(tmp_path):
    """busybox httpd answers HEAD with Content-Length: 6 and the 6 bytes, then closes
    (notes §2): the extra bytes must not spoil the HEAD's record (body 0) nor make another."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request("HEAD", "/"))
    cn.r(0.05, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n", FPA)
    cn.fin(0.06, C)
    check(http_log(tmp_path, tr), [rec(1, "HEAD", "/", 200, 0.03, 0.05, 0.05)])


def test_busybox_404_without_length_ends_at_close(tmp_path):
    """An HTTP/1.1 404 with Connection: close and no Content-Length: close-delimited."""
    page = b"<HTML><HEAD><TITLE>404 Not Found</TITLE></HEAD>\n<BODY><H1>404 Not Found</H1>\n"
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/missing"))
    cn.r(0.05, b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-type: text/html\r\n\r\n")
    cn.r(0.051, page, FPA)
    cn.fin(0.06, C)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/missing", 404, 0.03, 0.05, 0.051, rlen=len(page))])


def test_pipelined_head_then_get(tmp_path):
    """HEAD and GET pipelined: the HEAD's response (Content-Length 1000, no body) and the
    GET's in one segment; each framed by its own request's method."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request("HEAD", "/f") + request(uri="/f"))
    cn.r(0.05, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + response(200, b"f" * 20))
    cn.close(0.1)
    check(http_log(tmp_path, tr),
          [rec(1, "HEAD", "/f", 200, 0.03, 0.05, 0.05),
           rec(2, "GET", "/f", 200, 0.03, 0.05, 0.05, rlen=20)])


def test_http10_close_delimited_response_ends_at_fin(tmp_path):
    """HTTP/1.0, no Host (key absent), a response without Content-Length: its body is
    everything up to the server's FIN, which here rides on the last data segment."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, b"GET /old HTTP/1.0\r\nUser-Agent: x\r\n\r\n")
    cn.r(0.05, b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 100)
    cn.r(0.06, b"y" * 50, FPA)
    cn.fin(0.07, C)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/old", 200, 0.03, 0.05, 0.06, host=None, rlen=150, version="1.0")])


def test_close_delimited_response_with_a_separate_fin(tmp_path):
    """The same with the FIN 30 ms after the last data byte: duration still ends at the
    response's last byte (0.06), not at the FIN that revealed the end."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, b"GET /old HTTP/1.0\r\n\r\n")
    cn.r(0.05, b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 100)
    cn.r(0.06, b"y" * 50)
    cn.fin(0.09, S)
    cn.fin(0.10, C)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/old", 200, 0.03, 0.05, 0.06, host=None, rlen=150, version="1.0")])


# --- requests without a response ------------------------------------------------------------

def test_request_without_response_then_reset(tmp_path):
    """Request 1 answered, request 2 only ACKed, then the server resets: request 2 is logged
    with status_code 0, no ttfb, duration up to the RST (the connection's last packet)."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/fast"))
    cn.r(0.05, response(200, b"f"))
    cn.q(0.1, request(uri="/slow"))
    cn.ack(0.11, S)
    cn.rst(2.0, S)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/fast", 200, 0.03, 0.05, 0.05, rlen=1),
           rec(2, "GET", "/slow", 0, 0.1, None, 2.0)])


def test_request_without_response_then_close(tmp_path):
    """The server closes without answering: status_code 0, duration to the last packet."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/x"))
    cn.fin(0.5, S)
    cn.fin(0.51, C)
    check(http_log(tmp_path, tr), [rec(1, "GET", "/x", 0, 0.03, None, 0.51)])


def test_request_without_response_at_end_of_replay(tmp_path):
    """No response and no close by the end of the capture: logged at the end with code 0."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/pending"))
    cn.ack(0.04, S)
    check(http_log(tmp_path, tr), [rec(1, "GET", "/pending", 0, 0.03, None, 0.04)])


def test_response_headers_without_end_at_reset(tmp_path):
    """A response whose Content-Length body never completes, then RST: the request is
    logged once (status 200 or 0: the interface leaves open whether an unfinished response
    counts), and nothing else."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/big"))
    cn.r(0.05, response(200, b"x" * 1000)[:-900])
    cn.rst(0.5, S)
    recs = order(http_log(tmp_path, tr))
    assert len(recs) == 1
    r = recs[0]
    assert (r["trans_depth"], r["method"], r["uri"]) == (1, "GET", "/big")
    assert r["status_code"] in (0, 200)


# --- TCP: retransmissions, reordering, gaps ---------------------------------------------------

def test_retransmitted_segments_are_not_counted_twice(tmp_path):
    """The request's first segment retransmitted exactly, a segment overlapping old and new
    bytes, and a retransmitted response segment: the log is that of the clean exchange."""
    body = b"0123456789" * 20                              # 200 bytes
    msg = request("POST", "/r", body=body)
    head = len(msg) - 200
    tr = Trace()
    cn = Conn(tr)
    cn.at(0.03, C, 0, msg[:head + 100])                    # headers + body[:100]
    cn.at(0.25, C, 0, msg[:head + 100])                    # exact retransmission
    cn.at(0.26, C, head + 50, msg[head + 50:])             # overlaps body[50:100], adds the rest
    cn.skip(C, len(msg))
    cn.ack(0.27, S)
    resp = response(200, b"r" * 500)
    cn.at(0.3, S, 0, resp[:-250])
    cn.at(0.31, S, len(resp) - 250, resp[-250:])
    cn.skip(S, len(resp))
    cn.at(0.5, S, 0, resp[:-250])                          # the response retransmitted
    cn.at(0.5, S, len(resp) - 250, resp[-250:])
    cn.q(0.6, request(uri="/next"))
    cn.at(0.62, C, cn.off(C) - 5, request(uri="/next")[-5:])      # its tail again
    cn.r(0.65, response(200, b"n"))
    cn.close(0.8)
    check(http_log(tmp_path, tr),
          [rec(1, "POST", "/r", 200, 0.03, 0.3, 0.31, qlen=200, rlen=500),
           rec(2, "GET", "/next", 200, 0.6, 0.65, 0.65, rlen=1)])


@pytest.mark.parametrize("reorder", [False, True], ids=["in-order", "reordered"])
def test_reordered_segments_give_the_in_order_log(tmp_path, reorder):
    """Request in three segments A B C captured as A C B, response in three X Y Z captured
    as X Z Y (the same time slots): the log is the in-order one — the request starts at A,
    the response is complete when Y fills the hole."""
    req = request(uri="/reorder", headers=["Accept: */*", "User-Agent: reorder-test"])
    resp = response(200, b"R" * 90)
    a, b = 7, 30                                            # "GET /re" | "order HTTP/1.1..." | ...
    x, y = 10, len(resp) - 30

    def build(reorder):
        tr = Trace()
        cn = Conn(tr)
        reqs = [(0, req[:a]), (a, req[a:b]), (b, req[b:])]
        resps = [(0, resp[:x]), (x, resp[x:y]), (y, resp[y:])]
        if reorder:
            reqs = [reqs[0], reqs[2], reqs[1]]
            resps = [resps[0], resps[2], resps[1]]
        for i, (o, d) in enumerate(reqs):
            cn.at(0.03 + i * 0.001, C, o, d)
        cn.skip(C, len(req))
        for i, (o, d) in enumerate(resps):
            cn.at(0.05 + i * 0.001, S, o, d)
        cn.skip(S, len(resp))
        cn.close(0.1)
        return tr

    check(http_log(tmp_path, build(reorder)),
          [rec(1, "GET", "/reorder", 200, 0.03, 0.05, 0.052, rlen=90)])


def split(data, n):
    """data in n pieces of about equal size (the last takes the rest)."""
    k = max(1, len(data) // n)
    return [data[i * k:(i + 1) * k] for i in range(n - 1)] + [data[(n - 1) * k:]]


def test_shuffled_and_duplicated_capture_gives_the_same_log(tmp_path):
    """A keep-alive conversation, every message in several segments, replayed in order and
    then with each message's middle segments reversed and each message retransmitted whole
    after it: the same log."""
    msgs = [
        (C, split(request(uri="/a?b=c", headers=["Accept: */*"]), 3)),
        (S, split(CHUNKED_200 + CHUNKED_BODY, 5)),
        (C, split(request("POST", "/p", body=b"p" * 300), 4)),
        (S, split(response(201, b"c" * 77), 3)),
        (C, [request(uri="/z")]),
        (S, split(response(404, b"nope" * 10), 4)),
    ]

    def build(shuffle):
        tr = Trace()
        cn = Conn(tr)
        t = 0.1
        times = []
        for side, chunks in msgs:
            offs, o = [], cn.off(side)
            for ch in chunks:
                offs.append(o)
                o += len(ch)
            idx = list(range(len(chunks)))
            if shuffle and len(idx) >= 3:
                idx = [idx[0]] + idx[1:-1][::-1] + [idx[-1]]
            times.append((round(t, 6), round(t + 0.01 * (len(idx) - 1), 6)))
            for k in idx:
                cn.at(t, side, offs[k], chunks[k])
                t += 0.01
            if shuffle:
                cn.at(t - 0.005, side, offs[0], b"".join(chunks))
            cn.skip(side, sum(map(len, chunks)))
            t += 0.05
        cn.close(t + 0.1)
        return tr, times

    tr, times = build(False)
    want = [rec(1, "GET", "/a?b=c", 200, times[0][0], times[1][0], times[1][1], rlen=31),
            rec(2, "POST", "/p", 201, times[2][0], times[3][0], times[3][1], qlen=300, rlen=77),
            rec(3, "GET", "/z", 404, times[4][0], times[5][0], times[5][1], rlen=40)]
    check(http_log(tmp_path, tr), want)
    tr2, times2 = build(True)
    assert times2 == times
    check(http_log(tmp_path, tr2), want)


def gap_trace(after=False):
    """Request 1 answered; the start of request 2 never captured (the server ACKs it: capture
    loss), then its tail; with `after`, a complete request and a response beyond the gap."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/before"))
    cn.r(0.05, response(200, b"ok"))
    lost = request(uri="/lost", headers=["Accept: */*"])
    cn.skip(C, len(lost) - 15)
    cn.q(0.2, lost[-15:])
    cn.ack(0.21, S)
    if after:
        cn.q(0.3, request(uri="/after"))
        cn.r(0.31, response(200, b"no"))
    cn.close(0.5)
    return tr


def test_permanent_gap_is_a_parse_error(tmp_path):
    """A hole that never fills: what came before is logged, the parse error `gap` counted."""
    recs, out = replay(tmp_path, gap_trace())
    check(recs, [rec(1, "GET", "/before", 200, 0.03, 0.05, 0.05, rlen=2)])
    assert http_doc(out)["parse_errors"].get("gap", 0) > 0


def test_gap_ends_parsing_of_the_connection(tmp_path):
    """Bytes beyond a hole that never fills are not parsed (in either direction): no record
    for /after, nor for its response."""
    recs, out = replay(tmp_path, gap_trace(after=True))
    check(recs, [rec(1, "GET", "/before", 200, 0.03, 0.05, 0.05, rlen=2)])
    assert http_doc(out)["parse_errors"].get("gap", 0) > 0


def test_out_of_order_filled_is_no_gap(tmp_path):
    """A hole that fills later is no parse error."""
    tr = Trace()
    cn = Conn(tr)
    req = request(uri="/late")
    cn.at(0.03, C, 0, req[:5])
    cn.at(0.04, C, 20, req[20:])
    cn.at(0.30, C, 5, req[5:20])                         # 260 ms later: a retransmission
    cn.skip(C, len(req))
    cn.r(0.32, response(200, b"l"))
    cn.close(0.4)
    recs, out = replay(tmp_path, tr)
    check(recs, [rec(1, "GET", "/late", 200, 0.03, 0.32, 0.32, rlen=1)])
    assert http_doc(out)["parse_errors"].get("gap", 0) == 0


def test_gap_in_the_response_direction(tmp_path):
    """The end of response 1's body never captured: a `gap`; what lies beyond (response 2)
    is not parsed, so request 2 has no status but 0."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/first"))
    resp = response(200, b"x" * 200)
    cn.r(0.05, resp[:-100])
    cn.skip(S, 100)
    cn.q(0.2, request(uri="/second"))
    cn.r(0.21, response(200, b"ok"))
    cn.close(0.3)
    recs, out = replay(tmp_path, tr)
    assert http_doc(out)["parse_errors"].get("gap", 0) > 0
    assert [r["status_code"] for r in recs if r["uri"] == "/second"] in ([], [0]), recs
    assert [r["uri"] for r in order(recs)][:1] == ["/first"]


# --- Upgrade and CONNECT ------------------------------------------------------------------

WS_REQ = request(uri="/chat", headers=["Upgrade: websocket", "Connection: Upgrade",
                                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                                       "Sec-WebSocket-Version: 13"])
WS_101 = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


def test_upgrade_websocket_stops_parsing(tmp_path):
    """101 Switching Protocols: one record (status 101, no body); the bytes after it, HTTP
    lookalikes included, belong to the new protocol and make no records."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, WS_REQ)
    cn.r(0.05, WS_101)
    cn.q(0.1, b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")     # a masked "Hello"
    cn.q(0.11, request(uri="/not-http"))
    cn.r(0.12, response(200, b""))
    cn.r(0.13, b"\x81\x05Hello")
    cn.close(0.2)
    check(http_log(tmp_path, tr), [rec(1, "GET", "/chat", 101, 0.03, 0.05, 0.05)])


def test_upgrade_with_websocket_data_in_the_same_segment(tmp_path):
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, WS_REQ)
    cn.r(0.05, WS_101 + b"\x81\x05Hello" + response(200, b"zz"))
    cn.q(0.1, request(uri="/not-http"))
    cn.close(0.2)
    check(http_log(tmp_path, tr), [rec(1, "GET", "/chat", 101, 0.03, 0.05, 0.05)])


def test_connect_200_becomes_a_tunnel(tmp_path):
    """CONNECT answered 200: uri is the authority form as sent; after the blank line the
    connection is a tunnel (TLS bytes, an HTTP lookalike) and makes no more records."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request("CONNECT", "example.com:443", host="example.com:443"))
    cn.r(0.05, b"HTTP/1.1 200 Connection established\r\n\r\n")
    cn.q(0.06, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40))
    cn.r(0.07, b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03" + bytes(40))
    cn.q(0.1, request(uri="/inside"))
    cn.r(0.11, response(200, b"in"))
    cn.close(0.2)
    check(http_log(tmp_path, tr),
          [rec(1, "CONNECT", "example.com:443", 200, 0.03, 0.05, 0.05, host="example.com:443")])


def test_connect_refused_keeps_parsing(tmp_path):
    """CONNECT answered 407 (with a body) is no tunnel: the next CONNECT is parsed; its 200
    makes the tunnel."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request("CONNECT", "example.com:443", host="example.com:443"))
    cn.r(0.05, response(407, b"denied", ["Proxy-Authenticate: Basic realm=x"]))
    cn.q(0.1, request("CONNECT", "example.com:443", host="example.com:443",
                      headers=["Proxy-Authorization: Basic dTpw"]))
    cn.r(0.12, b"HTTP/1.1 200 OK\r\n\r\n")
    cn.q(0.13, request(uri="/inside"))
    cn.r(0.14, response(200, b"in"))
    cn.close(0.2)
    check(http_log(tmp_path, tr),
          [rec(1, "CONNECT", "example.com:443", 407, 0.03, 0.05, 0.05, host="example.com:443",
               rlen=6),
           rec(2, "CONNECT", "example.com:443", 200, 0.1, 0.12, 0.12, host="example.com:443")])


# --- servers and ports --------------------------------------------------------------------

def test_new_syn_on_the_same_ports_is_a_new_connection(tmp_path):
    """The client closes after an unanswered request (the server never FINs), and 20 s later
    opens a new connection from the same port: the old request ends with code 0, the new one
    is trans_depth 1 and gets its own response (not the old request's)."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request(uri="/old"))
    cn.ack(0.04, S)
    cn.fin(1.0, C)
    cn.ack(1.01, S)
    new = Conn(tr, t=20.0, ci=7000, si=9000)
    new.q(20.03, request(uri="/new"))
    new.r(20.05, response(200, b"new"))
    new.close(20.1)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/old", 0, 0.03, None, 1.01),
           rec(1, "GET", "/new", 200, 20.03, 20.05, 20.05, rlen=3)])


def two_servers_trace():
    """Two interleaved connections from the same client: port 80 (two requests) and port
    8080 (one), with different initial sequence numbers."""
    tr = Trace()
    a = Conn(tr, C, S, t=0.0)
    b = Conn(tr, C2, S8080, t=0.021, ci=3_000_000_000, si=4_294_967_000)   # seq wraps
    a.q(0.045, request(uri="/a1"))
    b.q(0.046, request(uri="/b1", host="10.0.0.2:8080"))
    a.r(0.05, response(200, b"a" * 10))
    b.r(0.06, response(500, b"b" * 1000))
    a.q(0.1, request(uri="/a2"))
    a.r(0.2, response(200, b"a"))
    a.close(0.3)
    b.close(0.32)
    return tr


def test_second_connection_on_port_8080(tmp_path):
    """trans_depth counts per connection; the server is the side on an HTTP port; the server
    sequence numbers of the 8080 connection wrap past 2^32 inside the response."""
    recs, out = replay(tmp_path, two_servers_trace())
    check(recs, [rec(1, "GET", "/a1", 200, 0.045, 0.05, 0.05, rlen=10),
                 rec(1, "GET", "/b1", 500, 0.046, 0.06, 0.06, host="10.0.0.2:8080", rlen=1000,
                     c=C2, s=S8080),
                 rec(2, "GET", "/a2", 200, 0.1, 0.2, 0.2, rlen=1)])
    servers = http_doc(out)["servers"]
    assert servers["10.0.0.2:80"]["requests"] == 2
    assert servers["10.0.0.2:8080"]["requests"] == 1


def port9999_trace():
    tr = Trace()
    cn = Conn(tr, C, S9999)
    cn.q(0.03, request(uri="/n"))
    cn.r(0.05, response(200, b"n"))
    cn.close(0.1)
    a = Conn(tr, C2, S, t=0.2)
    a.q(0.23, request(uri="/eighty"))
    a.r(0.25, response(200, b"8"))
    a.close(0.3)
    return tr


def test_port_9999_is_not_parsed_by_default(tmp_path):
    recs, out = replay(tmp_path, port9999_trace())
    check(recs, [rec(1, "GET", "/eighty", 200, 0.23, 0.25, 0.25, rlen=1, c=C2)])
    assert "10.0.0.2:9999" not in http_doc(out)["servers"]


def test_http_ports_replaces_the_default_list(tmp_path):
    """--http-ports 9999: 9999 parsed, 80 no longer."""
    recs, out = replay(tmp_path, port9999_trace(), "--http-ports", "9999")
    check(recs, [rec(1, "GET", "/n", 200, 0.03, 0.05, 0.05, rlen=1, s=S9999)])
    servers = http_doc(out)["servers"]
    assert servers["10.0.0.2:9999"]["requests"] == 1
    assert "10.0.0.2:80" not in servers


def test_http_ports_list(tmp_path):
    recs, _ = replay(tmp_path, port9999_trace(), "--http-ports", "80,9999")
    assert sorted(r["uri"] for r in recs) == ["/eighty", "/n"]


def test_ipv6(tmp_path):
    c6, s6 = ("2001:db8::1", 40000), ("2001:db8::2", 80)
    tr = Trace()
    cn = Conn(tr, c6, s6)
    cn.q(0.03, request(uri="/six", host="[2001:db8::2]"))
    cn.r(0.05, response(200, b"v6" * 10))
    cn.q(0.1, request("POST", "/six", host="[2001:db8::2]", body=b"p" * 7))
    cn.r(0.14, response(200, b""))
    cn.close(0.2)
    recs, out = replay(tmp_path, tr)
    check(recs, [rec(1, "GET", "/six", 200, 0.03, 0.05, 0.05, host="[2001:db8::2]", rlen=20,
                     c=c6, s=s6),
                 rec(2, "POST", "/six", 200, 0.1, 0.14, 0.14, host="[2001:db8::2]", qlen=7,
                     c=c6, s=s6)])
    servers = http_doc(out)["servers"]
    keys = [k for k in servers if "2001:db8::2" in k]
    assert len(keys) == 1 and servers[keys[0]]["requests"] == 2


def test_ipv6_with_an_extension_header(tmp_path):
    c6, s6 = ("2001:db8::1", 40000), ("2001:db8::2", 80)
    tr = Trace(exts=[ipv6_ext(PROTO_DSTOPTS)])
    cn = Conn(tr, c6, s6)
    cn.q(0.03, request(uri="/ext"))
    cn.r(0.05, response(200, b"e" * 9))
    cn.close(0.1)
    check(http_log(tmp_path, tr),
          [rec(1, "GET", "/ext", 200, 0.03, 0.05, 0.05, rlen=9, c=c6, s=s6)])


def test_vlan_tagged_frames(tmp_path):
    tr = Trace(tags=[vlan_tag(100)])
    cn = Conn(tr)
    cn.q(0.03, request(uri="/vlan"))
    cn.r(0.05, response(200, b"v"))
    cn.close(0.1)
    check(http_log(tmp_path, tr), [rec(1, "GET", "/vlan", 200, 0.03, 0.05, 0.05, rlen=1)])


def test_capture_started_mid_connection(tmp_path):
    """No handshake in the capture (lpd started while the connection was open): a request
    that starts a segment is still parsed."""
    tr = Trace()
    cn = Conn(tr, handshake=False)
    cn.q(0.03, request(uri="/mid"))
    cn.r(0.05, response(200, b"m"))
    cn.close(0.1)
    check(http_log(tmp_path, tr), [rec(1, "GET", "/mid", 200, 0.03, 0.05, 0.05, rlen=1)])


def test_unknown_method_is_logged_as_sent(tmp_path):
    """Zeek logs any verb; the histogram says _OTHER for one outside the known set."""
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, request("PURGE", "/cache", host="10.0.0.2"))
    cn.r(0.05, response(200, b""))
    cn.close(0.1)
    check(http_log(tmp_path, tr),
          [rec(1, "PURGE", "/cache", 200, 0.03, 0.05, 0.05, host="10.0.0.2")])
    hist = metrics(tmp_path, tr)
    assert [dict(k)["http_request_method"] for k in hist] == ["_OTHER"]


def test_non_http_bytes_on_port_80_make_no_records(tmp_path):
    tr = Trace()
    cn = Conn(tr)
    cn.q(0.03, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(100))
    cn.r(0.05, b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03" + bytes(100))
    cn.close(0.1)
    recs, out = replay(tmp_path, tr)
    assert recs == []
    assert http_doc(out)["servers"].get("10.0.0.2:80", {}).get("requests", 0) == 0


# --- the CLI --------------------------------------------------------------------------------

def test_help_lists_the_options():
    p = subprocess.run([sys.executable, LPD, "-h"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for opt in ("--http", "--http-log", "--http-ports"):
        assert opt in p.stdout


def test_http_log_implies_http(tmp_path):
    recs, out = replay(tmp_path, two_servers_trace(), http=False)
    assert len(recs) == 3
    assert http_doc(out)["servers"]["10.0.0.2:80"]["requests"] == 2


def test_http_without_log_gives_the_document(tmp_path):
    rc, out, err = run_cli(tmp_path, two_servers_trace(), "--http", "--output", "json")
    assert rc == 0, err
    servers = http_doc(out)["servers"]
    assert servers["10.0.0.2:80"]["requests"] == 2
    assert servers["10.0.0.2:8080"]["requests"] == 1


def test_cli_http_log_to_stdout(tmp_path):
    """`--http-log -`: the records on stdout, one per line, beside the JSON document."""
    rc, out, err = run_cli(tmp_path, two_servers_trace(), "--http-log", "-", "--output", "json")
    assert rc == 0, err
    values = json_values(out)
    recs = [v for v in values if isinstance(v, dict) and "trans_depth" in v]
    assert sorted(r["uri"] for r in recs) == ["/a1", "/a2", "/b1"]
    lines = [line for line in out.splitlines() if line.startswith("{") and line.endswith("}")
             and "trans_depth" in line]
    assert sorted(json.loads(line)["uri"] for line in lines) == ["/a1", "/a2", "/b1"]
    docs = [v for v in values if isinstance(v, dict) and "http" in v]
    assert len(docs) == 1 and docs[0]["http"]["servers"]["10.0.0.2:80"]["requests"] == 2


def test_table_output_mentions_the_servers(tmp_path):
    rc, out, err = run_cli(tmp_path, two_servers_trace(), "--http")
    assert rc == 0, err
    assert "10.0.0.2:80" in out and "10.0.0.2:8080" in out


# --- metrics ------------------------------------------------------------------------------

def metrics(tmp_path, trace, *args):
    return histogram(replay(tmp_path, trace, *args, output="metrics")[1])


ROUTES = [  # (uri, route, duration in s)
    ("/users/123/orders?x=1", "/users/:id/orders", 0.003),
    ("/users/456/orders", "/users/:id/orders", 0.3),
    ("/obj/deadbeef01/x", "/obj/:id/x", 0.02),
    ("/obj/cafe", "/obj/cafe", 0.06),
    ("/u/123e4567-e89b-12d3-a456-426614174000", "/u/:id", 0.8),
    ("/", "/", 3.0),
    ("/static/app.js?v=3", "/static/app.js", 0.004),
    ("/a/12ab", "/a/12ab", 12.0),
    ("/v1/items/7", "/v1/items/:id", 0.09),
]


def routes_trace():
    """One keep-alive connection, Host = the server address (so server_address/server_port
    are the same whether taken from Host or from the packets), each response one segment
    `duration` after its request."""
    tr = Trace()
    cn = Conn(tr)
    t = 0.1
    for uri, _, d in ROUTES:
        cn.q(t, request(uri=uri, host="10.0.0.2"))
        cn.r(t + d, response(200, b"ok"))
        t += d + 0.5
    cn.close(t)
    return tr


def test_histogram_labels_buckets_and_route_normalisation(tmp_path):
    hist = metrics(tmp_path, routes_trace())
    for key, s in hist.items():
        labels = dict(key)
        assert LABELS <= set(labels), labels
        assert (labels["http_request_method"], labels["http_response_status_code"],
                labels["server_address"], labels["server_port"], labels["container"]) == \
            ("GET", "200", "10.0.0.2", "80", "")
        assert tuple(s["les"]) == BUCKETS or [float(x) for x in s["les"]] == \
            [float(x) for x in BUCKETS]
        counts = [s["buckets"][le] for le in s["les"]]
        assert counts == sorted(counts) and counts[-1] == s["count"]
    want = collections.Counter(route for _, route, _ in ROUTES)
    assert route_counts(hist) == dict(want)
    # the two /users/:id/orders requests, 0.003 s and 0.3 s
    users = next(s for k, s in hist.items() if dict(k)["http_route"] == "/users/:id/orders")
    by_le = {float(le): n for le, n in users["buckets"].items()}
    assert [by_le[float(le)] for le in BUCKETS] == [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]
    assert users["count"] == 2 and users["sum"] == pytest.approx(0.303, abs=1e-5)
    slow = next(s for k, s in hist.items() if dict(k)["http_route"] == "/a/12ab")
    assert [slow["buckets"][le] for le in slow["les"]][-2:] == [0, 1]    # 12 s: only +Inf
    total = sum(s["sum"] for s in hist.values())
    assert total == pytest.approx(sum(d for _, _, d in ROUTES), abs=1e-4)


def test_route_cap_fifty_per_server_then_other(tmp_path):
    """60 distinct /item/<word> paths (letter words: never :id) on port 80: at most 50 routes
    of their own, the rest `other`, all 60 counted; the cap is per server: the 8080 server's
    one route keeps its name."""
    letters = "ghijklmnopqrstuvwxyz"
    words = ["x" + letters[i // 20] + letters[i % 20] for i in range(60)]
    assert len(set(words)) == 60
    tr = Trace()
    cn = Conn(tr)
    t = 0.1
    for w in words:
        cn.q(t, request(uri=f"/item/{w}", host="10.0.0.2"))
        cn.r(t + 0.002, response(200, b"i"))
        t += 0.01
    cn.close(t)
    b = Conn(tr, C2, S8080, t=t + 0.1)
    b.q(t + 0.2, request(uri="/hello", host="10.0.0.2:8080"))
    b.r(t + 0.21, response(200, b"h"))
    b.close(t + 0.3)
    hist = metrics(tmp_path, tr)
    r80 = route_counts(hist, server_port="80")
    assert "other" in r80 and sum(r80.values()) == 60
    own = set(r80) - {"other"}
    assert len(own) <= 50 and own <= {f"/item/{w}" for w in words}
    assert r80["other"] == 60 - len(own)
    assert route_counts(hist, server_port="8080") == {"/hello": 1}
    # the JSON document's routes stay bounded too
    pcap_out = replay(tmp_path, tr)[1]
    routes = http_doc(pcap_out)["servers"]["10.0.0.2:80"]["routes"]
    assert len(routes) <= 51 and sum(routes.values()) <= 60
    assert http_doc(pcap_out)["servers"]["10.0.0.2:80"]["requests"] == 60
