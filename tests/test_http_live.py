"""HTTP requests from packets (--http, --http-log) on a running lpd, with real HTTP/1.x
between the two namespaces and no Docker: servers are labelled `ip:port` and `container`
is "".

lpd runs in ns_b on veth-b as a real process. ns_a runs an HTTP/1.1 server (harness.HTTP_SERVER,
Python's http.server on a dual-stack socket, ports 80 and 8080) with fixed-length,
chunked (an extension and a trailer, one write per chunk), 204, 304 (with a
Content-Length it must not be believed), 404, HEAD, slow (0.3 s before answering),
`Expect: 100-continue` (http.server's own interim answer), a close-delimited HTTP/1.0
answer and a ~200 KB body. The clients are plain sockets in ns_b created from this
process (netns.socket_in), bound to known source ports, so every byte sent is ours:
keep-alive with sequential requests, three requests pipelined in one write, POST that
waits for its 100 Continue before sending the body (then a chunked POST on the same
connection), a request head in three segments, HTTP/1.0 without a Host header, IPv6
(with the 200 KB body too), a request reset (RST) before its answer, and a scanner's 300
random paths on the second port.

The whole run happens twice (the `http_run` fixture): offloads off, as netns.Pair has
them by default (every frame a wire frame), and on (TSO/GSO/GRO: the 200 KB answer and
the bigger writes reach lpd as super-frames). Each test then checks its part of what the
run logged, served on /api/requests and exported in
http_server_request_duration_seconds. Every wait is bounded; processes are stopped by
PID (netns.Pair's popen); without namespaces the fixture fails, it never skips.
"""
import collections
import itertools
import random
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import netns
from harness import (BIG_LEN, CHUNKED_LEN, CLOSE_LEN, FIXED_LEN, HIST, HTTP_SERVER, NOT_FOUND,
                     UPLOAD_LEN, Client, Lpd, api, hist_series, key, labels_of, metrics, read_log, request,
                     strip, value, wait_for)

pytestmark = pytest.mark.live

SLOW = 0.3
EXPECT_PAUSE = 0.1                     # client: after the 100 Continue, before the body
SPLIT_PAUSE = 0.05                     # client: between the pieces of one request head
HTTP_PORT, FLOOD_PORT = 80, 8080
FLOOD, ROUTES_MAX = 300, 50            # lpd's HTTP_ROUTES_MAX: a server's first 50 routes
SPORT0 = 31000                         # client source ports: below the ephemeral range
INTERVAL = 0.5                         # lpd --interval: the log is flushed at each tick
PARSE_ERRORS = ("gap", "head_too_large", "bad_request", "bad_response", "bad_chunk",
                "unmatched_response")


class Run:
    """What one run sent (the expected http.log records, in order) and saw."""

    def __init__(self, pair, offloads, log_path):
        self.pair, self.offloads, self.log_path = pair, offloads, log_path
        self.sports = itertools.count(SPORT0)
        self.expected = []            # (scenario, expected record without times, route)
        self.windows = {}             # scenario -> (time.time() before, after)
        self.log, self.views, self.metrics = [], {}, {}
        self.words = []
        self.exit_code, self.stderr = None, ""

    def expect(self, name, client, method, uri, host, status, req_body, resp_body, route,
               version="1.1"):
        client.depth += 1
        rec = {"id.orig_h": client.local[0], "id.orig_p": client.local[1],
               "id.resp_h": client.server[0], "id.resp_p": client.server[1],
               "trans_depth": client.depth, "method": method}
        if host is not None:
            rec["host"] = host
        rec.update({"uri": uri, "version": version, "status_code": status,
                    "request_body_len": req_body, "response_body_len": resp_body,
                    "container": ""})
        self.expected.append((name, rec, route))

    def records(self, name):
        """The logged records of a scenario, in the order its requests were sent."""
        by_key = {key(r): r for r in self.log}
        wanted = [rec for n, rec, _ in self.expected if n == name]
        missing = [rec for rec in wanted if key(rec) not in by_key]
        assert not missing, f"{name}: no log line for {missing}"
        return [by_key[key(rec)] for rec in wanted]


# --- the scenarios (each returns after its last answer was read) ------------------------

def scenario_keepalive(run, a4):
    """Three sequential requests on one connection, then a FIN."""
    c = Client(run, a4, HTTP_PORT)
    for uri, host, route, length in (("/items/42", a4, "/items/:id", FIXED_LEN),
                                     ("/chunked", "api.example", "/chunked", CHUNKED_LEN),
                                     ("/items/7?full=1", a4, "/items/:id", FIXED_LEN)):
        c.send(request("GET", uri, host))
        code, body = c.response()
        assert (code, len(body)) == (200, length), uri
        run.expect("keepalive", c, "GET", uri, host, 200, 0, length, route)
    c.close()


def scenario_misc(run, a4):
    """204, 304 (with a Content-Length), HEAD, 404, ids in the path, the 200 KB body."""
    c = Client(run, a4, HTTP_PORT)
    uuid = "/u/3f2a9c1b-0d4e-4f5a-8b6c-7d8e9f0a1b2c/orders/deadbeef00?x=1"
    for method, uri, status, length, route in (
            ("GET", "/empty", 204, 0, "/empty"),
            ("GET", "/cached", 304, 0, "/cached"),
            ("HEAD", "/fixed", 200, 0, "/fixed"),
            ("GET", "/missing", 404, len(NOT_FOUND), "/missing"),
            ("GET", "/big", 200, BIG_LEN, "/big"),
            ("GET", uuid, 200, FIXED_LEN, "/u/:id/orders/:id")):
        c.send(request(method, uri, "misc.example"))
        code, body = c.response(method)
        assert (code, len(body)) == (status, length), uri
        run.expect("misc", c, method, uri, "misc.example", status, 0, length, route)
    c.close()


def scenario_pipelined(run, a4):
    """Three requests in one write; the answers come back in order."""
    c = Client(run, a4, HTTP_PORT)
    reqs = (("GET", "/fixed", "a.example", 200, FIXED_LEN, "/fixed"),
            ("HEAD", "/big", "b.example", 200, 0, "/big"),
            ("GET", "/chunked?page=2", "c.example", 200, CHUNKED_LEN, "/chunked"))
    c.send(b"".join(request(m, u, h) for m, u, h, *_ in reqs))
    for method, uri, host, status, length, route in reqs:
        code, body = c.response(method)
        assert (code, len(body)) == (status, length), uri
        run.expect("pipelined", c, method, uri, host, status, 0, length, route)
    c.close()


def scenario_expect(run, a4):
    """POST with Expect: 100-continue: the body only EXPECT_PAUSE s after the interim 100
    (so the final answer's first byte is that much later); then, on the same connection,
    a POST with a chunked body (its length after the chunk framing)."""
    c = Client(run, a4, HTTP_PORT)
    c.send(request("POST", "/upload", a4, headers=(("Content-Type", "application/octet-stream"),
                                                   ("Content-Length", UPLOAD_LEN),
                                                   ("Expect", "100-continue"))))
    code, _ = c.head()
    assert code == 100, "the server must answer 100 Continue first"
    time.sleep(EXPECT_PAUSE)
    c.send(b"u" * UPLOAD_LEN)
    code, body = c.response("POST")
    assert (code, body) == (201, b"got %d" % UPLOAD_LEN)
    run.expect("expect", c, "POST", "/upload", a4, 201, UPLOAD_LEN, len(body), "/upload")
    chunks = b"64;note=1\r\n" + b"p" * 100 + b"\r\n7d0\r\n" + b"q" * 2000 + b"\r\n0\r\nX-Sum: 1\r\n\r\n"
    c.send(request("POST", "/upload?chunked", a4, headers=(("Transfer-Encoding", "chunked"),),
                   body=chunks))
    code, body = c.response("POST")
    assert (code, body) == (201, b"got 2100")
    run.expect("expect", c, "POST", "/upload?chunked", a4, 201, 2100, len(body), "/upload")
    c.close()


def scenario_split(run, a4):
    """One request head in three segments SPLIT_PAUSE s apart: the request starts at the
    first one."""
    c = Client(run, a4, HTTP_PORT)
    for i, piece in enumerate((b"GET /fix", b"ed?split HTTP/1.1\r\nHost: sp", b"lit\r\n\r\n")):
        if i:
            time.sleep(SPLIT_PAUSE)
        c.send(piece)
    code, body = c.response()
    assert (code, len(body)) == (200, FIXED_LEN)
    run.expect("split", c, "GET", "/fixed?split", "split", 200, 0, FIXED_LEN, "/fixed")
    c.close()


def scenario_http10(run, a4):
    """HTTP/1.0 without a Host header; the answer has no length and ends at the close."""
    c = Client(run, a4, HTTP_PORT)
    c.send(request("GET", "/close", None, version="HTTP/1.0"))
    code, body = c.response()
    assert (code, len(body)) == (200, CLOSE_LEN)
    run.expect("http10", c, "GET", "/close", None, 200, 0, CLOSE_LEN, "/close", "1.0")
    c.close()


def scenario_ipv6(run, a6):
    c = Client(run, a6, HTTP_PORT)
    for uri, route, length in (("/v6", "/v6", FIXED_LEN),
                               ("/v6/items/99", "/v6/items/:id", FIXED_LEN),
                               ("/big", "/big", BIG_LEN)):
        c.send(request("GET", uri, f"[{a6}]"))
        code, body = c.response()
        assert (code, len(body)) == (200, length), uri
        run.expect("ipv6", c, "GET", uri, f"[{a6}]", 200, 0, length, route)
    c.close()


def scenario_slow(run, a4):
    c = Client(run, a4, HTTP_PORT)
    c.send(request("GET", "/slow", a4))
    assert c.response() == (200, b"slow")
    run.expect("slow", c, "GET", "/slow", a4, 200, 0, 4, "/slow")
    c.close()


def scenario_reset(run, a4):
    """The request, then a RST while the server still sleeps on it."""
    c = Client(run, a4, HTTP_PORT)
    c.send(request("GET", "/slow?reset=1", a4))
    run.expect("reset", c, "GET", "/slow?reset=1", a4, 0, 0, 0, "/slow")
    time.sleep(0.05)                         # the request is on the wire, the answer 0.25 s away
    c.abort()


def scenario_flood(run, a4):
    """A scanner: 300 random paths (no id-like segment: letters past 'f'), pipelined 50 at
    a time on one connection, so the order lpd sees them in is the order sent."""
    rng = random.Random(13)
    words = []
    while len(words) < FLOOD:
        w = "".join(rng.choice("ghijklmnopqrstuvwxyz") for _ in range(10))
        if w not in words:
            words.append(w)
    run.words = words
    c = Client(run, a4, FLOOD_PORT)
    for i in range(0, FLOOD, 50):
        batch = words[i:i + 50]
        c.send(b"".join(request("GET", f"/r/{w}", "scan") for w in batch))
        for j, w in enumerate(batch):
            code, body = c.response()
            assert (code, body) == (404, NOT_FOUND)
            route = f"/r/{w}" if i + j < ROUTES_MAX else "other"
            run.expect("flood", c, "GET", f"/r/{w}", "scan", 404, 0, len(NOT_FOUND), route)
    c.close()


SCENARIOS = {"keepalive": scenario_keepalive, "misc": scenario_misc,
             "pipelined": scenario_pipelined, "expect": scenario_expect, "split": scenario_split,
             "http10": scenario_http10, "ipv6": scenario_ipv6, "slow": scenario_slow,
             "reset": scenario_reset, "flood": scenario_flood}


def start_server(pair):
    p = pair.popen(pair.ns_a, [sys.executable, "-c", HTTP_SERVER, str(HTTP_PORT), str(FLOOD_PORT)],
                   stdout=subprocess.PIPE, text=True)
    if not select.select([p.stdout], [], [], 10)[0] or p.stdout.readline().strip() != "ready":
        raise AssertionError(f"HTTP server in ns_a did not start (exit {p.poll()})")
    return p


VIEWS = {"all": "/api/requests",
         "server": "/api/requests?server=10.199.0.1:80",
         "server6": "/api/requests?server=fd00:199::1:80",
         "flood": "/api/requests?server=10.199.0.1%3A8080&limit=3",
         "nobody": "/api/requests?server=10.9.9.9:80",
         "limit=2": "/api/requests?limit=2",
         "limit=0": "/api/requests?limit=0",
         "limit=x": "/api/requests?limit=x"}


# auto: ebpf where it can (its program copies the HTTP ports' frames whole)
@pytest.fixture(scope="module", params=[(False, "cbpf"), (True, "cbpf"), (False, "auto"), (True, "auto")],
                ids=["offloads-off-cbpf", "offloads-on-cbpf", "offloads-off-auto", "offloads-on-auto"])
def http_run(request):
    offloads, engine = request.param
    with tempfile.TemporaryDirectory() as tmp, netns.Pair(offloads=offloads) as pair:
        log_path = Path(tmp) / "http.json"
        run = Run(pair, offloads, log_path)
        lpd = Lpd(pair, "--mapping-url", "none", "--http", "--http-log", str(log_path),
                  "--interval", str(INTERVAL), "--engine", engine)
        start_server(pair)
        for name, scenario in SCENARIOS.items():
            t0 = time.time()
            scenario(run, pair.ip6_a if name == "ipv6" else pair.ip4_a)
            run.windows[name] = (t0, time.time())
        # Short of a line, the tests say which (the fixture itself does not fail on it).
        n = len(run.expected)
        wait_for(lambda: len(read_log(log_path)) >= n, 10, 0.1)
        time.sleep(2 * INTERVAL)                 # anything more would be written by now
        run.log = read_log(log_path)
        total = lambda m: sum(v for k, v in m.items() if k[0] == HIST + "_count")   # noqa: E731
        run.metrics = wait_for(lambda: (lambda m: total(m) >= n and m)(metrics(pair)), 5, 0.2) \
            or metrics(pair)
        run.views = {name: api(pair, path) for name, path in VIEWS.items()}
        run.exit_code = lpd.stop()
        run.stderr = lpd.stderr()
        yield run


# --- 1. the log ----------------------------------------------------------------------------

def test_one_exact_log_line_per_request(http_run):
    run = http_run
    assert len(run.log) == len(run.expected), \
        (len(run.log), len(run.expected), [r for r in run.log if key(r) not in
                                           {key(e) for _, e, _ in run.expected}][:5])
    by_key = {key(r): r for r in run.log}
    assert len(by_key) == len(run.log), "one line per (connection, trans_depth)"
    for name, want, _ in run.expected:
        got = by_key.get(key(want))
        assert got is not None, (name, want)
        assert strip(got) == want, (name, got, want)
        assert list(got) == [k for k in ("ts", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p",
                                         "trans_depth", "method", "host", "uri", "version", "status_code",
                                         "request_body_len", "response_body_len", "ttfb",
                                         "duration", "container") if k in got], got


def test_log_lines_come_in_the_order_requests_finish(http_run):
    """Sequential scenarios: the log is in the order the requests were sent."""
    assert [key(r) for r in http_run.log] == [key(e) for _, e, _ in http_run.expected]


def test_the_big_answer_is_counted_exactly(http_run):
    for name in ("misc", "ipv6"):
        big, = [r for r in http_run.records(name) if r["uri"] == "/big"]
        assert (big["status_code"], big["response_body_len"]) == (200, BIG_LEN), big
    head_big, = [r for r in http_run.records("pipelined") if r["uri"] == "/big"]
    assert (head_big["method"], head_big["response_body_len"]) == ("HEAD", 0)


def test_times_are_plausible(http_run):
    run = http_run
    for name, (t0, t1) in run.windows.items():
        for rec in run.records(name):
            assert t0 - 0.5 <= rec["ts"] <= t1 + 0.5, (name, rec, t0, t1)
            assert 0 <= rec["duration"] < 5, rec
            if rec["status_code"]:
                assert 0 <= rec["ttfb"] <= rec["duration"], rec
                if name != "slow":
                    assert rec["ttfb"] < 2, rec
            else:
                assert "ttfb" not in rec, "no answer, no time to first byte"
    slow, = run.records("slow")
    assert slow["ttfb"] >= SLOW and slow["duration"] >= slow["ttfb"], slow
    expect, chunked = run.records("expect")
    assert expect["ttfb"] >= EXPECT_PAUSE, "ttfb is to the final answer, not the 100 Continue"
    assert expect["duration"] >= expect["ttfb"]
    assert chunked["ts"] >= expect["ts"] + expect["duration"]
    split, = run.records("split")
    assert split["ttfb"] >= 2 * SPLIT_PAUSE, "the request starts at its first segment"
    # pipelined: the three requests' first bytes are in one segment; answers in order
    piped = run.records("pipelined")
    assert len({r["ts"] for r in piped}) == 1, piped
    assert [r["ttfb"] for r in piped] == sorted(r["ttfb"] for r in piped), piped
    assert [r["duration"] for r in piped] == sorted(r["duration"] for r in piped), piped
    # keep-alive: each request starts after the last answer
    ka = run.records("keepalive")
    for a, b in zip(ka, ka[1:]):
        assert b["ts"] >= a["ts"] + a["duration"], (a, b)


def test_a_request_reset_before_its_answer_is_status_0(http_run):
    rec, = http_run.records("reset")
    assert (rec["status_code"], rec["response_body_len"], rec["uri"]) == (0, 0, "/slow?reset=1")
    assert "ttfb" not in rec
    assert rec["duration"] < SLOW, "it ended at the RST, before the server could answer"


# --- 2. /api/requests ----------------------------------------------------------------------

def test_api_requests_newest_first_with_filters(http_run):
    run = http_run
    per_server = collections.defaultdict(list)
    for rec in run.log:
        host = rec["id.resp_h"]
        per_server[f"{host}:{rec['id.resp_p']}"].append(rec)
    newest_first = {srv: recs[::-1] for srv, recs in per_server.items()}
    assert set(newest_first) == {"10.199.0.1:80", "10.199.0.1:8080", "fd00:199::1:80"}
    status, doc = run.views["all"]
    assert status == 200
    assert doc["servers"] == newest_first
    assert doc["nic"] == netns.IF_B and "time" in doc
    status, doc = run.views["server"]
    assert status == 200 and doc["servers"] == {"10.199.0.1:80": newest_first["10.199.0.1:80"]}
    assert run.views["server6"][1]["servers"] == {"fd00:199::1:80": newest_first["fd00:199::1:80"]}
    status, doc = run.views["flood"]
    assert status == 200
    assert doc["servers"] == {"10.199.0.1:8080": newest_first["10.199.0.1:8080"][:3]}
    assert [r["uri"] for r in doc["servers"]["10.199.0.1:8080"]] == \
        [f"/r/{w}" for w in run.words[::-1][:3]]
    assert run.views["nobody"] == (200, {**run.views["nobody"][1], "servers": {}})
    status, doc = run.views["limit=2"]
    assert status == 200 and doc["servers"] == {s: r[:2] for s, r in newest_first.items()}
    assert run.views["limit=0"][1]["servers"] == {s: [] for s in newest_first}
    status, doc = run.views["limit=x"]
    assert status == 400 and "limit" in doc["error"], doc


# --- 3. the histogram ----------------------------------------------------------------------

def expected_series(run):
    want = collections.Counter()
    for _, rec, route in run.expected:
        want[(rec["method"], str(rec["status_code"]), route, rec["id.resp_h"],
              str(rec["id.resp_p"]), "")] += 1
    return want


def test_histogram_count_per_series_equals_requests_sent(http_run):
    got, want = hist_series(http_run.metrics), expected_series(http_run)
    assert got == dict(want), {"missing or different": {k: (v, got.get(k)) for k, v in want.items()
                                                        if got.get(k) != v},
                               "unexpected": {k: v for k, v in got.items() if k not in want}}
    m = http_run.metrics
    versions = {}
    for _, rec, route in http_run.expected:
        versions[(rec["method"], str(rec["status_code"]), route, rec["id.resp_h"],
                  str(rec["id.resp_p"]), "")] = rec["version"]
    for k, n in want.items():
        assert value(m, HIST + "_bucket", le="+Inf", **labels_of(k, versions[k])) == n, k


def test_route_normalisation(http_run):
    routes = {k[2]: v for k, v in hist_series(http_run.metrics).items()
              if k[3:5] == ("10.199.0.1", "80")}
    assert routes["/items/:id"] == 2                       # /items/42 and /items/7?full=1
    assert routes["/u/:id/orders/:id"] == 1                # a UUID and long hex
    assert not [r for r in routes if "42" in r or "?" in r or "deadbeef" in r], routes
    v6 = {k[2] for k in hist_series(http_run.metrics) if k[3] == "fd00:199::1"}
    assert v6 == {"/v6", "/v6/items/:id", "/big"}


def test_slow_request_lands_in_its_bucket(http_run):
    m = http_run.metrics
    labels = labels_of(("GET", "200", "/slow", "10.199.0.1", "80", ""))
    assert value(m, HIST + "_count", **labels) == 1
    assert value(m, HIST + "_bucket", le="0.25", **labels) == 0
    assert value(m, HIST + "_bucket", le="0.5", **labels) == 1
    assert SLOW <= value(m, HIST + "_sum", **labels) < 0.5
    reset = labels_of(("GET", "0", "/slow", "10.199.0.1", "80", ""))
    assert value(m, HIST + "_count", **reset) == 1


# --- 5. a flood of random paths -----------------------------------------------------------

def test_random_paths_keep_the_series_bounded(http_run):
    flood = {k: v for k, v in hist_series(http_run.metrics).items()
             if k[3:5] == ("10.199.0.1", str(FLOOD_PORT))}
    routes = {k[2] for k in flood}
    assert len(flood) <= ROUTES_MAX + 1 and len(routes) <= ROUTES_MAX + 1, len(flood)
    assert routes == {f"/r/{w}" for w in http_run.words[:ROUTES_MAX]} | {"other"}
    assert flood[("GET", "404", "other", "10.199.0.1", str(FLOOD_PORT), "")] == FLOOD - ROUTES_MAX
    assert sum(flood.values()) == FLOOD
    buckets = [k for k in http_run.metrics if k[0] == HIST + "_bucket"
               and ("server_port", str(FLOOD_PORT)) in k[1]]
    assert len(buckets) == len(flood) * 15, "15 buckets (14 bounds and +Inf) per series"


# --- 4. offloads, and a clean run ---------------------------------------------------------

def test_super_frames_arrive_with_offloads_on_only(http_run):
    m = http_run.metrics
    gso = value(m, "lpd_gso_frames_total", nic=netns.IF_B)
    if http_run.offloads:
        assert gso > 0, "the 200 KB answer must arrive as super-frames"
        assert value(m, "lpd_gso_unsplit_total", nic=netns.IF_B) == 0
    else:
        assert gso == 0


def test_no_parse_errors_no_drops_and_a_clean_exit(http_run):
    m = http_run.metrics
    assert {r: value(m, "lpd_http_parse_errors_total", reason=r) for r in PARSE_ERRORS} == \
        dict.fromkeys(PARSE_ERRORS, 0)
    assert value(m, "lpd_capture_drops_total", worker="0", nic=netns.IF_B) == 0
    assert http_run.exit_code == 0, http_run.stderr
    assert "Traceback" not in http_run.stderr, http_run.stderr
