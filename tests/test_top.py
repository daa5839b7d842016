"""`lpd top` (issues 16 and 23): the live view of a running lpd, driven in a real tmux
against a live lpd in a network namespace with known traffic; --once as plain text; and
what it makes of answers that are not lpd's documents, from a small HTTP server of this
test on 127.0.0.1 (port 0). tmux runs on a private socket of this test (-L) and its
server is killed at the end."""
import http.server
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import lpd as lpdmod
import netns
from harness import LPD, Lpd, wait_for

pytestmark = pytest.mark.live

URL = "http://127.0.0.1:59122"
HOST_PORT = "127.0.0.1:59122"                  # --url as --web.listen-address takes it
RULES = "udp;udp\nping;icmp or icmp6\n"
RATE_FRAMES, RATE_PAYLOAD = 20, 1000           # a burst every RATE_PERIOD s
RATE_PERIOD = 0.05
CLOCK = r"\d\d:\d\d:\d\d"
DIM = "\x1b[2m"                                  # SGR 2, as tmux writes A_DIM back


class Sender:
    """UDP from A to B at a steady rate until stopped (bounded: at most `limit` s)."""

    def __init__(self, pair, limit=60.0):
        self.pair, self.stop_at = pair, time.monotonic() + limit
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        sport = 40000
        while not self.stopped.is_set() and time.monotonic() < self.stop_at:
            self.pair.udp_send(self.pair.ns_a, self.pair.ip4_a, self.pair.ip4_b,
                               [RATE_PAYLOAD] * RATE_FRAMES, sport=sport)
            sport = 40000 + (sport - 39999) % 50
            time.sleep(RATE_PERIOD)

    def stop(self):
        self.stopped.set()
        self.thread.join(10)


def start_lpd(pair, tmp):
    (tmp / "rules").write_text(RULES)
    return Lpd(pair, "--mapping-url", "none", "--remote", "-t", "0", "--local-net",
               f"{pair.ip4_b}/32", "--connections", "-f", str(tmp / "rules"),
               "-u", str(tmp / "r.sock"))


def top_once(ns, url=HOST_PORT, columns=80, *more):
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(netns.ns_argv(ns, [sys.executable, LPD, "top", "--once", "--url", url,
                                             *more]),
                          capture_output=True, text=True, timeout=30, env=env)


def test_once_shows_the_traffic_and_fits_the_width(pair, tmp_path):
    lpd = start_lpd(pair, tmp_path)
    sender = Sender(pair)
    try:
        time.sleep(2.5)                              # two intervals of steady traffic
        out = top_once(pair.ns_b, columns=60)
    finally:
        sender.stop()
        lpd.stop()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(len(line) <= 60 for line in lines), [line for line in lines if len(line) > 60]
    text = out.stdout
    for heading in ("local addresses: 1", "remote addresses:", "rules: 2", "connections:", "HTTP: off"):
        assert heading in text, (heading, text)
    assert "sorted by: tx+rx bit/s" in text and "history: 1 char = 1 s, last 20 s" in text, text
    row = next(line for line in lines if line.startswith(pair.ip4_b))
    # rx of B: RATE_FRAMES frames of frame_len(RATE_PAYLOAD) bytes per period (less the
    # sender's own overhead: it is a lower bound on the period) -> at most this rate
    top = RATE_FRAMES * netns.frame_len(RATE_PAYLOAD) * 8 / RATE_PERIOD
    value, unit = row.split()[3], row.split()[4]
    scale = {"bit/s": 1, "kbit/s": 1e3, "Mbit/s": 1e6}[unit]
    assert 0.1 * top < float(value) * scale <= 1.05 * top, row
    assert any(line.startswith(pair.ip4_a) for line in lines), text       # the remote
    assert any(line.startswith("udp ") and "bit/s" in line for line in lines), text


def test_once_without_a_daemon_is_one_line_and_fails(pair):
    for url in (URL, HOST_PORT, "localhost:59122", ":59122"):
        out = top_once(pair.ns_b, url)
        assert out.returncode == 1 and out.stdout == "", (url, out)
        assert out.stderr.count("\n") == 1 and "not answering" in out.stderr, (url, out.stderr)


TMUX_SERVERS = itertools.count()


class Tmux:
    """A tmux server of this test's own, one session (80x24) running lpd top (in `ns`)."""

    def __init__(self, ns, url, width=80, height=24, term="screen"):
        if shutil.which("tmux") is None:
            raise AssertionError("tmux is required (apt-get install tmux)")
        # a server of its own each: a killed one may still hold its socket a moment
        self.sock = f"lpdtest-{os.getpid()}-{next(TMUX_SERVERS)}"
        cmd = " ".join(netns.ns_argv(ns, [sys.executable, LPD, "top", "--url", url]))
        started = self.tmux("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height),
                            f"TERM={term} {cmd}; sleep 30")
        assert started.returncode == 0, started.stderr

    def tmux(self, *args):
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True,
                              timeout=10)

    def screen(self, escapes=False):
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "top").stdout

    def keys(self, *keys):
        self.tmux("send-keys", "-t", "top", *keys)

    def shows(self, text, timeout=8):
        return wait_for(lambda: text in self.screen(), timeout, 0.1)

    def matches(self, pattern, timeout=8):
        return wait_for(lambda: re.search(pattern, self.screen()), timeout, 0.1)

    def close(self):
        self.tmux("kill-server")


def dimmed(screen, text):
    """The line of a screen captured with escapes that holds `text` is drawn dim."""
    line = next((line for line in screen.splitlines() if text in line), "")
    return DIM in line.split(text)[0]


def test_keys_panes_pause_resize_and_a_killed_daemon(pair, tmp_path):
    lpd = start_lpd(pair, tmp_path)
    sender = Sender(pair)
    tmux = Tmux(pair.ns_b, "localhost:59122")        # HOST:PORT; localhost never resolved
    try:
        assert tmux.shows(pair.ip4_b), tmux.screen()
        assert tmux.shows("bit/s") and "local addresses: 1" in tmux.screen()
        screen = tmux.screen()
        assert screen.rstrip().splitlines()[-1] == lpdmod.TOP_KEYS, screen     # the key line, last
        assert re.search(r"history: 1 char = 1 s, last 20 s, newest right; \.:-=\+\*#%@ up to "
                         r"[0-9.]+ [kM]bit/s", screen), screen
        assert "sorted by: tx+rx bit/s" in screen, screen
        lines = screen.splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        for label in ("tx+rx bytes", "address", "tx+rx bit/s"):                 # s cycles the sort
            tmux.keys("s")
            assert tmux.shows(f"sorted by: {label}"), tmux.screen()
        tmux.keys("2")
        assert tmux.shows("remote addresses:"), tmux.screen()
        assert pair.ip4_a in tmux.screen() and "sorted by: bit/s" in tmux.screen()
        for key, shown in (("3", "rules: 2 - sorted by: bit/s"),          # a key, what it shows
                           ("4", "connections:"),
                           ("Tab", "HTTP: off"),
                           ("1", "pane 1/5 addresses"),
                           ("p", "paused"),
                           ("p", "pane 1/5 addresses")):                  # p again: resumed
            tmux.keys(key)
            assert tmux.shows(shown), (key, tmux.screen())
        tmux.tmux("resize-window", "-t", "top", "-x", "60", "-y", "15")
        assert wait_for(lambda: max(map(len, tmux.screen().splitlines() or [""])) <= 60 and
                        "q quit" in tmux.screen(), 5), tmux.screen()
        tmux.tmux("resize-window", "-t", "top", "-x", "80", "-y", "24")
        assert wait_for(lambda: tmux.screen().splitlines()[-1:] == [lpdmod.TOP_KEYS] and
                        len(tmux.screen().splitlines()) == 24, 5), tmux.screen()
        # the daemon dies (SIGKILL, by its PID): a banner with the time of the first failed
        # fetch, its last answer dimmed; it comes back: the normal view again
        sender.stop()
        before = time.strftime("%H:%M:%S")
        lpd.stop(signal.SIGKILL)
        assert tmux.matches(f"lpd stopped answering at {CLOCK}"), tmux.screen()
        screen = tmux.screen()
        when = re.search(f"lpd stopped answering at ({CLOCK})", screen).group(1)
        assert when >= before or before > "23:59:50", (when, before)           # not the last answer's
        assert re.search(f"at {CLOCK}: 127\\.0\\.0\\.1[^\n]*Connection refused\n"
                         f"last answer {CLOCK}, dimmed below; retrying every 1 s - localhost:59122",
                         screen), screen
        assert "Traceback" not in screen and screen.rstrip().splitlines()[-1] == lpdmod.TOP_KEYS
        assert dimmed(tmux.screen(escapes=True), pair.ip4_b), tmux.screen(escapes=True)
        lpd = start_lpd(pair, tmp_path)
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100] * 5)
        assert tmux.shows("pane 1/5 addresses", 10), tmux.screen()
        assert "stopped answering" not in tmux.screen()
        assert tmux.shows(pair.ip4_b) and not dimmed(tmux.screen(escapes=True), pair.ip4_b)
        tmux.keys("q")
        assert wait_for(lambda: "lpd top" not in tmux.screen(), 5), tmux.screen()
    finally:
        tmux.close()
        sender.stop()
        lpd.stop()


###############################################################################
# Answers that are not lpd's documents ########################################
###############################################################################

def _document(kind):
    """A small well-formed document of each kind, as lpd serves it (http: off)."""
    envelope = {"nic": "veth-b", "time": 1.0}
    io = {"tx_bytes": 1000, "tx_packets": 10, "rx_bytes": 2000, "rx_packets": 20}
    return {
        "interface": {**envelope, "up": True, "frames": 30, "drops": 0, **io, "malformed": {},
                      "gso_frames": 0, "gso_unsplit": 0},
        "addresses": {**envelope, "tracked": 1, "evictions": 0, "addresses": [
            {"address": "10.199.0.2", "nic": "veth-b", **io, "tx_bps": 8000.0, "rx_bps": 16000}]},
        "remotes": {**envelope, "tracked": 1, "evictions": 0, "error_bound_bytes": 0,
                    "threshold_bytes": 0, "totals": io, "remotes": [
                        {"address": "10.199.0.1", "country": "Unknown", "province": "Unknown",
                         "city": "Unknown", "isp": "Unknown", **io, "error_bytes": 0}]},
        "rules": {**envelope, "rules": [{"id": "udp", "bytes": 3000, "packets": 30}]},
        "connections": {**envelope, "open": 1, "counts": {"udp": {"established": 1}},
                        "closed": {}, "evictions": {}, "largest_closed": [], "connections": [
                            {"proto": "udp", "orig_h": "10.199.0.1", "orig_p": 40000,
                             "resp_h": "10.199.0.2", "resp_p": 9, "state": "established",
                             "history": "D", "orig_bytes": 900, "resp_bytes": 0, "orig_pkts": 9,
                             "resp_pkts": 0, "orig_wire_bytes": 1000, "resp_wire_bytes": 0,
                             "start": 0.0, "age": 1.0, "idle": 0.0, "midstream": False,
                             "pid": None, "comm": None}]},
    }.get(kind)


def _changed(kind, path, value):
    """_document(kind) with the field at `path` (keys and indexes) set to `value`."""
    doc = _document(kind)
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return doc


def _grpc_http(calls, ok=None, requests=10):
    """An http document with one HTTP server and two gRPC servers ("rpc", issue 28):
    `calls` on the busy one (`ok` of them OK), 4 on the other."""
    ok = calls - 3 if ok is None else ok
    return {"nic": "veth-b", "time": 1.0,
            "servers": {"10.199.0.1:8080": {"requests": requests, "errors": 1, "p50": 0.001,
                                            "p95": 0.002, "p99": 0.003, "routes": {"/": requests}}},
            "rpc": {"shop-grpc": {
                        "calls": calls, "errors": calls - ok,
                        "statuses": {"OK": ok, "NOT_FOUND": calls - ok - 1, "UNAVAILABLE": 1},
                        "p50": 0.0125, "p95": 0.0375, "p99": 0.0625,
                        "methods": {"helloworld.Greeter/SayHello": calls - 7, "pkg.Store/Get": 4,
                                    "pkg.Store/Put": 2, "pkg.Store/List": 1}},
                    "10.199.0.1:50051": {
                        "calls": 4, "errors": 0, "statuses": {"OK": 4}, "p50": 0.5, "p95": 0.5,
                        "p99": 0.75, "methods": {"pkg.Slow/Wait": 4}}},
            "parse_errors": {}}


def _json(doc):
    return json.dumps(doc).encode()


BIG_CHUNK = 1 << 20
BIG_BYTES = 50 * BIG_CHUNK             # an answer far past top's cap
HANG_LIMIT = 30.0                      # s a hanging answer waits at most (the test ends it)
TRICKLE_STEP = 0.05                    # s between the bytes of a trickling answer
TRICKLE_BYTES = 1000                   # at most
DEEP = 10**5                           # [[[[...]]]] levels

# case -> {kind: (status, body)}: the kinds not named answer as _document() does.
# Each case's documents sit under /<case>/api/<kind>, so --url http://HOST:PORT/<case>.
ANSWERS = {
    "good": {},
    "deep": {"interface": (200, b"[" * DEEP + b"]" * DEEP)},
    "deep-inside": {"addresses": (200, b'{"tracked": 1, "addresses": ' + b"[" * DEEP + b"]" * DEEP
                                  + b"}")},
    "string-for-number": {"interface": (200, _json(_changed("interface", ["tx_bytes"], "12")))},
    "list-for-object": {"addresses": (200, _json([]))},
    "object-for-list": {"remotes": (200, _json(_changed("remotes", ["remotes"], {})))},
    "null": {"remotes": (200, _json(_changed("remotes", ["remotes", 0, "country"], None)))},
    "bool-for-count": {"interface": (200, _json(_changed("interface", ["drops"], True)))},
    "negative": {"rules": (200, _json(_changed("rules", ["rules", 0, "bytes"], -1)))},
    "nan": {"addresses": (200, _json(_changed("addresses", ["addresses", 0, "tx_bps"], float("nan"))))},
    "infinity": {"addresses": (200, _json(_changed("addresses", ["addresses", 0, "rx_bps"], 7.0))
                               .replace(b"7.0", b"1e999"))},
    "huge-int": {"rules": (200, _json(_changed("rules", ["rules", 0, "packets"], 10**40)))},
    "missing": {"rules": (200, _json({"rules": [{"id": "udp", "packets": 1}]}))},
    "not-json": {"interface": (200, b"<html><body>hello</body></html>")},
    "not-utf8": {"interface": (200, b'{"nic": "\xff\xfe"}')},
    "http-500": {"remotes": (500, b"oops")},
    "no-interface": {"interface": (404, b"{}")},
    "map-of-wrong": {"connections": (200, _json(_changed("connections", ["counts", "udp"], [1])))},
    "grpc": {"http": (200, _json(_grpc_http(150)))},      # issue 28: gRPC servers too
}
# what each garbage case must say (the reason on screen and after --once)
GARBAGE = {
    "deep": "/api/interface: JSON nested too deep",
    "deep-inside": "/api/addresses: JSON nested too deep",
    "string-for-number": "/api/interface: interface.tx_bytes: expected a whole number >= 0, "
                         "got a string '12'",
    "list-for-object": "/api/addresses: addresses: expected an object, got an array of 0",
    "object-for-list": "/api/remotes: remotes.remotes: expected an array, got an object of 0",
    "null": "/api/remotes: remotes.remotes[0].country: expected a string, got null",
    "bool-for-count": "/api/interface: interface.drops: expected a whole number >= 0, got true",
    "negative": "/api/rules: rules.rules[0].bytes: expected a whole number >= 0, got a number -1",
    "nan": "/api/addresses: not JSON (NaN is no JSON number",
    "infinity": "/api/addresses: addresses.addresses[0].rx_bps: expected a finite number >= 0, "
                "got a number inf",
    "huge-int": "/api/rules: not JSON (a 41-digit number",
    "missing": "/api/rules: rules.rules[0].bytes: missing",
    "not-json": "/api/interface: not JSON (Expecting value",
    "not-utf8": "/api/interface: not JSON (",
    "http-500": "/api/remotes: HTTP 500",
    "no-interface": "/api/interface: HTTP 404",
    "map-of-wrong": "/api/connections: connections.counts['udp']: expected an object, got an array of 1",
    "big": "an answer larger than 4.0 MiB",
    "not-http": "not HTTP (BadStatusLine)",
}


class FakeLpd:
    """An HTTP server on 127.0.0.1 (an ephemeral port) in this process, answering
    /<case>/api/<kind> as ANSWERS says, and the cases that are about the transport:
    big (50 MB), hang, trickle (a byte at a time), close (no answer), not-http. `live`
    is a case the test switches (self.live)."""

    def __init__(self, host="127.0.0.1"):
        fake = self
        self.live = "good"
        self.ended = threading.Event()           # ends hanging and trickling answers

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                case, _, rest = self.path.lstrip("/").partition("/")
                case = "good" if case == "api" else case         # --url HOST:PORT: no prefix
                kind = rest.split("?")[0].rpartition("/")[2]
                try:
                    fake.answer(self, fake.live if case == "live" else case, kind)
                except (BrokenPipeError, ConnectionResetError):
                    pass                         # top stopped reading: as it should

            def log_message(self, *args):
                pass

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (http.server.ThreadingHTTPServer,), {"address_family": family})
        self.server = server_class((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, case):
        return f"http://127.0.0.1:{self.port}/{case}"

    def answer(self, h, case, kind):
        if case == "big":                      # [0,0,...,0]: 25 million numbers, once parsed
            chunk = b"0," * (BIG_CHUNK // 2)
            h.send_response(200)
            h.send_header("Content-Length", str(len(b"[") + BIG_BYTES + len(b"0]")))
            h.end_headers()
            h.wfile.write(b"[")
            for _ in range(BIG_BYTES // BIG_CHUNK):
                h.wfile.write(chunk)
            h.wfile.write(b"0]")
        elif case == "hang":
            self.ended.wait(HANG_LIMIT)
        elif case == "trickle":
            h.send_response(200)
            h.end_headers()
            for _ in range(TRICKLE_BYTES):
                if self.ended.wait(TRICKLE_STEP):
                    break
                h.wfile.write(b" ")
                h.wfile.flush()
        elif case == "close":
            h.close_connection = True
        elif case == "not-http":
            h.wfile.write(b"hello, this is not HTTP\r\n\r\n")
        else:
            status, body = ANSWERS[case].get(kind) or (200, _json(_document(kind)))
            if _document(kind) is None and kind not in ANSWERS[case]:
                status, body = 404, b'{"error": "that stage is not enabled"}'
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

    def close(self):
        self.ended.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def fake():
    server = FakeLpd()
    yield server
    server.close()


def test_good_documents_pass_and_a_stage_that_is_off_is_none(fake):
    docs = lpdmod.top_fetch(lpdmod.top_target(fake.url("good")))
    assert docs["http"] is None and docs["interface"]["nic"] == "veth-b"
    assert docs["connections"]["connections"][0]["resp_p"] == 9


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_is_one_short_reason(fake, case):
    started = time.monotonic()
    with pytest.raises(lpdmod.TopGarbage) as e:
        lpdmod.top_fetch(lpdmod.top_target(fake.url(case)))
    assert GARBAGE[case] in e.value.reason, e.value.reason
    assert str(e.value) == f"lpd answered garbage: {e.value.reason}"
    assert len(e.value.reason) <= lpdmod.TOP_REASON_MAX
    assert time.monotonic() - started < lpdmod.TOP_TIMEOUT


@pytest.mark.parametrize("case, reason", [("hang", "no whole answer within 0.5 s"),
                                          ("trickle", "no whole answer within 0.5 s"),
                                          ("close", "connection closed without an answer")])
def test_no_whole_answer_in_time_is_not_answering(fake, case, reason):
    started = time.monotonic()
    with pytest.raises(lpdmod.TopDown) as e:
        lpdmod.top_fetch(lpdmod.top_target(fake.url(case)), timeout=0.5)
    assert e.value.reason == reason
    assert time.monotonic() - started < 0.5 + 0.4       # one deadline for the whole fetch


def test_shape_errors_without_a_socket():
    check = lpdmod.top_document
    good = _document("addresses")
    assert check("addresses", 200, _json(good)) == good
    assert check("remotes", 404, b"") is None
    for body, reason in [
            (b"null", "addresses: expected an object, got null"),
            (b'{"tracked": 1}', "addresses.addresses: missing"),
            (b'{"tracked": 1, "addresses": [7]}',
             "addresses.addresses[0]: expected an object, got a number 7"),
            (b'{"tracked": 1.5, "addresses": []}',
             "addresses.tracked: expected a whole number >= 0, got a number 1.5"),
            (b'{"tracked": 1, "addresses": [], "x": -Infinity}', "not JSON (-Infinity is no JSON number"),
            (b"[" * DEEP, "JSON nested too deep")]:
        with pytest.raises(lpdmod.TopGarbage) as e:
            check("addresses", 200, body)
        assert e.value.reason.startswith(f"/api/addresses: {reason}"), e.value.reason
    long = _json(_changed("addresses", ["addresses", 0, "tx_bps"], "x" * 10**6))
    with pytest.raises(lpdmod.TopGarbage) as e:
        check("addresses", 200, long)
    assert len(e.value.reason) <= lpdmod.TOP_REASON_MAX and "got a string 'xxx" in e.value.reason


def _docs(**changes):
    docs = {kind: _document(kind) for kind in lpdmod.TOP_KINDS}
    docs.update(changes)
    return lpdmod._index_docs(docs)


def test_the_view_without_a_terminal():
    """frame() alone: the sort in each pane's title, the legend, the key line last, and
    the banners of a daemon that stops answering or answers garbage, then comes back."""
    view = lpdmod.TopView("localhost:59122", refresh=0.5)
    view.update(_docs(), 10.0, 1000.0)
    view.update(_docs(), 10.5, 1000.5)
    text = [t for _, t in view.frame(80)]
    assert all(len(t) <= 80 for t in text) and text[-1] == lpdmod.TOP_KEYS
    assert "local addresses: 1 - sorted by: tx+rx bit/s" in text
    assert any(t.startswith("history: 1 char = 0.5 s, last 10 s, newest right; .:-=+*#%@ up to 24.00 kbit/s")
               for t in text), text
    for pane, labels in (("1", ("tx+rx bytes", "address", "tx+rx bit/s")),
                         ("4", ("bytes", "originator", "bit/s"))):
        view.key(pane)
        for label in labels:                     # s cycles one sort for every pane
            view.key("s")
            assert any(f"- sorted by: {label}" in t for _, t in view.frame(80)), (pane, label)
    view.key("1")
    roles = dict(view.frame(80)[:2])
    assert lpdmod.TOP_TITLE in roles and not view.stale
    down = lpdmod.TopDown("127.0.0.1, ::1: Connection refused")
    view.fail(down, 1001.0)
    view.fail(down, 1002.0)                      # the time of the first failure stays
    (r0, t0), (r1, t1) = view.frame(80)[:2]
    when = lambda wall: time.strftime("%H:%M:%S", time.localtime(wall))  # noqa: E731
    assert (r0, t0) == (lpdmod.TOP_ALERT, f"lpd stopped answering at {when(1001.0)}: "
                                          "127.0.0.1, ::1: Connection refused")
    assert t1 == f"last answer {when(1000.5)}, dimmed below; retrying every 0.5 s - localhost:59122"
    assert view.stale and any(t.startswith("10.199.0.2") for _, t in view.frame(80))
    view.fail(lpdmod.TopGarbage("/api/rules: HTTP 500"), 1003.0)
    (r0, t0), (_, t1) = view.frame(80)[:2]
    assert (r0, t0) == (lpdmod.TOP_ALERT, "lpd answered garbage: /api/rules: HTTP 500")
    assert t1.startswith(f"since {when(1003.0)}; last answer {when(1000.5)}")
    view.update(_docs(), 14.0, 1004.0)
    assert view.frame(80)[0][0] == lpdmod.TOP_TITLE and not view.stale
    # a daemon's strings cannot drive the terminal
    evil = _changed("addresses", ["addresses", 0, "address"], "\x1b]0;owned\x07\x1b[2J")
    view.update(_docs(addresses=evil), 14.5, 1004.5)
    assert not any("\x1b" in t or "\x07" in t for _, t in view.frame(80))


def test_the_remotes_pane_shows_each_remotes_name():
    """With --names, /api/remotes gives each remote its name: a column beside the address,
    a long name cut at its left end (the registered domain stays), an unnamed remote's
    cell blank; without any name, no column. A name of the wrong type is garbage."""
    view = lpdmod.TopView("localhost:59122", refresh=0.5)
    view.key("2")
    view.update(_docs(), 10.0, 1000.0)
    head = next(t for _, t in view.frame(132) if t.startswith("remote address "))
    assert head.split()[:3] == ["remote", "address", "rate"]
    long = "r3---sn-4g5e6nze." + "x" * 40 + ".googlevideo.com"
    remotes = _document("remotes")
    row = remotes["remotes"][0]
    remotes["remotes"] = [{**row, "name": long},
                          {**row, "address": "2001:db8::1", "name": "www.example.test", "tx_bytes": 10},
                          {**row, "address": "192.0.2.9", "name": "", "tx_bytes": 5}]
    view.update(_docs(remotes=remotes), 10.5, 1000.5)
    text = [t for _, t in view.frame(132)]
    head = next(t for t in text if t.startswith("remote address "))
    assert head.split()[:4] == ["remote", "address", "name", "rate"]
    rows = {t.split()[0]: t for t in text if t.startswith(("10.199.0.1", "2001:db8::1", "192.0.2.9"))}
    cut = rows["10.199.0.1"].split()[1]
    assert len(cut) == lpdmod.TOP_NAME_WIDTH and cut.startswith("..") and cut.endswith(".googlevideo.com")
    assert rows["2001:db8::1"].split()[1] == "www.example.test"
    assert rows["192.0.2.9"].split()[1] == "0"                   # no name: the rate comes next
    column = head.index("name")
    assert all(r.index(r.split()[1]) == column for a, r in rows.items() if a != "192.0.2.9")
    bad = _json(_changed("remotes", ["remotes", 0, "name"], 7))
    with pytest.raises(lpdmod.TopGarbage) as e:
        lpdmod.top_document("remotes", 200, bad)
    assert e.value.reason == "/api/remotes: remotes.remotes[0].name: expected a string, got a number 7"


def test_the_url_forms():
    t = lpdmod.top_target
    loop = ("127.0.0.1", "::1")
    assert t("localhost:59122")[:4] == (loop, 59122, "localhost:59122", "")
    assert t(":59122")[:4] == (loop, 59122, "localhost:59122", "")
    assert t("[::1]:59122")[:4] == (("::1",), 59122, "[::1]:59122", "")
    assert t("10.0.0.1:80")[:3] == (("10.0.0.1",), 80, "10.0.0.1:80")
    assert t("http://LocalHost:59122/")[:4] == (loop, 59122, "localhost:59122", "")
    assert t("http://[::1]:1234/lpd/")[:4] == (("::1",), 1234, "[::1]:1234", "/lpd")
    assert t("http://example.org")[:3] == (("example.org",), 80, "example.org:80")
    for bad in ("https://localhost:59122", "localhost", "localhost:0", "http://x:99999",
                "http://a b:1", "ftp://localhost:21", "http://:80"):
        with pytest.raises(lpdmod.UsageError):
            t(bad)


def test_localhost_is_never_resolved(fake, monkeypatch):
    """RFC 6761: top maps localhost to 127.0.0.1, then ::1, itself. A server on ::1
    only is found too."""
    asked = []
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        asked.append(host)
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert lpdmod.top_fetch(lpdmod.top_target(f"http://localhost:{fake.port}/good"))
    v6 = FakeLpd("::1")
    try:
        for url in (f"http://localhost:{v6.port}/good", f"localhost:{v6.port}", f"[::1]:{v6.port}",
                    f":{v6.port}"):
            assert lpdmod.top_fetch(lpdmod.top_target(url))["interface"]["nic"] == "veth-b", url
    finally:
        v6.close()
    assert "localhost" not in [str(host).lower() for host in asked], asked


def test_a_resolver_that_does_not_answer_costs_no_more_than_the_deadline(monkeypatch):
    """A name goes through the resolver, which has no timeout of its own (a dead DNS
    server holds it 5 s a try): top still answers within its deadline, one line."""
    release = threading.Event()

    def getaddrinfo(host, *args, **kwargs):
        release.wait(30)                         # a resolver that hangs
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    start = time.monotonic()
    try:
        with pytest.raises(lpdmod.TopDown, match="within 0.5 s"):
            lpdmod.top_fetch(lpdmod.top_target("http://lpd.example:59122/"), timeout=0.5)
        assert time.monotonic() - start < 2.0
    finally:
        release.set()


# A process's peak RSS counts the memory of the one that forked it (until its exec), so
# a small Python in between starts lpd top and writes its children's peak (KiB) to a file;
# it stops lpd top at the timeout.
PEAK = ("import resource, subprocess, sys\n"
        "code = subprocess.call(sys.argv[3:], timeout=float(sys.argv[2]))\n"
        "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
        "sys.exit(code)\n")


def run_top(*args, timeout=30, prefix=()):
    """lpd top ARGS as a process without a terminal: (exit code, stdout, stderr, its peak
    RSS in KiB)."""
    with tempfile.NamedTemporaryFile() as peak:
        out = subprocess.run([sys.executable, "-c", PEAK, peak.name, str(timeout), *prefix,
                              sys.executable, LPD, "top", *args], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=timeout + 10)
        return out.returncode, out.stdout, out.stderr, int(open(peak.name).read() or 0)


ADDRESS_SPACE = 400_000_000            # bytes: prlimit --as; 50 MB read and parsed whole take more
TOP_RSS_KIB = 100_000                  # top's peak on any answer (60 MB of it: lpd.py compiled)


@pytest.mark.parametrize("case", ["big", "deep", "nan", "string-for-number", "http-500",
                                  "not-json", "not-http"])
def test_once_says_garbage_in_one_line_within_bounded_memory(fake, case):
    if shutil.which("prlimit") is None:
        raise AssertionError("prlimit is required (util-linux)")
    code, out, err, rss = run_top("--once", "--url", fake.url(case),
                                  prefix=("prlimit", f"--as={ADDRESS_SPACE}"))
    assert code == 1 and out == "", (code, out, err)
    assert err.startswith(f"lpd: top: {fake.url(case)}: lpd answered garbage: {GARBAGE[case]}"), err
    assert err.count("\n") == 1 and "Traceback" not in err and GARBAGE[case] in err, err
    assert rss < TOP_RSS_KIB, rss


def test_once_of_a_hanging_daemon_is_not_answering(fake):
    started = time.monotonic()
    code, out, err, _ = run_top("--once", "--url", fake.url("hang"))
    assert code == 1 and out == "" and err.count("\n") == 1, (code, out, err)
    assert f"not answering (no whole answer within {lpdmod.TOP_TIMEOUT:g} s)" in err, err
    assert time.monotonic() - started < lpdmod.TOP_TIMEOUT + 5


def test_without_a_terminal_it_prints_one_frame(fake):
    code, out, err, _ = run_top("--url", fake.url("good"), "--refresh", "0.1")
    assert code == 0, (code, out, err)
    assert err == "lpd: top: not a terminal: printing one frame as --once does\n", err
    assert "local addresses: 1 - sorted by: tx+rx bit/s" in out and "10.199.0.2" in out, out
    assert "HTTP: off" in out and "Traceback" not in out + err


def test_an_unknown_terminal_prints_one_frame(fake):
    tmux = Tmux(None, fake.url("good"), term="lpd-no-such-terminal")
    try:
        assert tmux.shows("local addresses: 1"), tmux.screen()
        screen = tmux.screen()
        assert "TERM='lpd-no-such-terminal' is not a terminal this system knows" in screen, screen
        assert "Traceback" not in screen
    finally:
        tmux.close()


def test_garbage_on_screen_and_back(fake):
    """The screen says what is wrong with an answer, dims the last good one, and returns to
    the normal view with the next good answer."""
    fake.live = "good"
    tmux = Tmux(None, fake.url("live"))
    try:
        assert tmux.shows("local addresses: 1"), tmux.screen()
        for case in ("nan", "deep", "http-500", "string-for-number", "not-http"):
            fake.live = case
            assert tmux.shows(f"lpd answered garbage: {GARBAGE[case]}"[:79]), (case, tmux.screen())
            screen = tmux.screen()
            assert re.search(f"since {CLOCK}; last answer {CLOCK}, dimmed below; retrying", screen), screen
            assert "Traceback" not in screen, screen
            assert dimmed(tmux.screen(escapes=True), "10.199.0.2"), tmux.screen(escapes=True)
        fake.live = "good"
        assert tmux.shows("pane 1/5 addresses"), tmux.screen()
        assert "garbage" not in tmux.screen()
        assert not dimmed(tmux.screen(escapes=True), "10.199.0.2")
    finally:
        fake.live = "good"
        tmux.close()


def test_a_terminal_that_cannot_dim_hides_an_old_answer(fake):
    """vt100 has no dim (A_DIM): the last answer is blanked instead, and said so."""
    fake.live = "good"
    tmux = Tmux(None, fake.url("live"), term="vt100")
    try:
        assert tmux.shows("10.199.0.2"), tmux.screen()
        fake.live = "http-500"
        assert tmux.shows(f"lpd answered garbage: {GARBAGE['http-500']}"), tmux.screen()
        screen = tmux.screen()
        assert re.search(f"last answer {CLOCK}, hidden; retrying", screen), screen
        assert "10.199.0.2" not in screen and screen.rstrip().splitlines()[-1] == lpdmod.TOP_KEYS
        fake.live = "good"
        assert tmux.shows("10.199.0.2"), tmux.screen()
    finally:
        fake.live = "good"
        tmux.close()


def test_titles_count_what_the_daemon_has_not_what_top_fetched():
    """?top=N cuts a document to N rows and says how many there were ("total", issue 24):
    the titles count those; an lpd that sends no (or no valid) total, the rows sent."""
    rules = _document("rules")
    http_doc = {"nic": "veth-b", "time": 1.0, "servers": {"10.199.0.1:80": {
        "requests": 3, "errors": 0, "p50": 0.001, "p95": 0.002}}, "total": 4000, "truncated": True}
    view = lpdmod.TopView("localhost:59122", refresh=0.5)
    for total, shown in ((250, 250), (None, 1), ("250", 1), (-1, 1)):
        docs = _docs(rules={**rules, "total": total, "truncated": True}, http=http_doc)
        view.update(docs, 10.0, 1000.0)
        view.key("3")
        assert any(t.startswith(f"rules: {shown} - sorted by") for _, t in view.frame(80)), total
    view.key("5")
    assert any(t.startswith("HTTP servers: 4000 - sorted by") for _, t in view.frame(80))


def test_the_http_pane_shows_grpc_servers():
    """The http document's "rpc" part (issue 28) below the HTTP servers: per gRPC server
    its call rate (two fetches apart), calls, error share, p50/p95/p99, then its statuses
    other than OK and its busiest methods; s sorts them as it sorts the HTTP servers.
    An lpd without "rpc" (or with none) shows no gRPC table; a wrong one is garbage."""
    view = lpdmod.TopView("localhost:59122", refresh=0.5)
    view.key("5")
    view.update(_docs(http=_grpc_http(100)), 10.0, 1000.0)
    view.update(_docs(http=_grpc_http(150)), 10.5, 1000.5)     # 50 calls in 0.5 s: 100/s
    text = [t for _, t in view.frame(80)]
    assert all(len(t) <= 80 for t in text), [t for t in text if len(t) > 80]
    assert any(t.startswith("HTTP servers: 1 - sorted by: req/s") for t in text), text
    at = text.index("gRPC servers: 2 - sorted by: calls/s")
    assert at > next(i for i, t in enumerate(text) if t.startswith("10.199.0.1:8080")), text
    assert text[at + 1].split() == ["server", "calls/s", "calls", "errors", "p50", "p95", "p99"]
    busy = text[at + 2].split()
    assert busy == ["shop-grpc", "100.0", "150", "2.0%", "12.5ms", "37.5ms", "62.5ms"], text
    assert text[at + 3] == "  errors: NOT_FOUND 2, UNAVAILABLE 1", text
    assert text[at + 4] == ("  methods: helloworld.Greeter/SayHello 143, pkg.Store/Get 4, "
                            "pkg.Store/Put 2, pk"), text                # cut at the width
    wide = [t for _, t in view.frame(132)]
    assert wide[at + 4] == ("  methods: helloworld.Greeter/SayHello 143, pkg.Store/Get 4, "
                            "pkg.Store/Put 2, pkg.Store/List 1"), wide
    assert text[at + 5].split() == ["10.199.0.1:50051", "0.0", "4", "0.0%", "500.0ms", "500.0ms",
                                    "750.0ms"], text
    assert text[at + 6:at + 8] == ["  errors: none", "  methods: pkg.Slow/Wait 4"], text
    for label, first in (("calls", "shop-grpc"), ("server", "10.199.0.1:50051"),
                         ("calls/s", "shop-grpc")):           # s cycles the sort
        view.key("s")
        text = [t for _, t in view.frame(80)]
        at = text.index(f"gRPC servers: 2 - sorted by: {label}")
        assert text[at + 2].startswith(first), (label, text)
    # --once cuts whole rows: a server never loses its errors or methods line
    once = [t for _, t in view.frame(80, panes=("http",), rows=1, keys=False)]
    at = once.index("gRPC servers: 2 - sorted by: calls/s")
    assert once[at + 2].startswith("shop-grpc") and once[at + 4].startswith("  methods:")
    assert not any(t.startswith("10.199.0.1:50051") for t in once), once
    # an lpd before HTTP/2 (no "rpc"), or one without gRPC calls: no gRPC table
    for doc in ({k: v for k, v in _grpc_http(50).items() if k != "rpc"}, {**_grpc_http(50), "rpc": {}}):
        view.update(_docs(http=doc), 11.0, 1001.0)
        text = [t for _, t in view.frame(80)]
        assert any(t.startswith("HTTP servers: 1") for t in text)
        assert not any("gRPC" in t or "errors:" in t for t in text), text
    for path, value, reason in (
            (["rpc", "10.199.0.1:50051", "statuses", "OK"], "4",
             "http.rpc['10.199.0.1:50051'].statuses['OK']: expected a whole number >= 0, got a string '4'"),
            (["rpc", "10.199.0.1:50051", "p99"], -1,
             "http.rpc['10.199.0.1:50051'].p99: expected a finite number >= 0, got a number -1"),
            (["rpc", "10.199.0.1:50051", "methods"], [],
             "http.rpc['10.199.0.1:50051'].methods: expected an object, got an array of 0")):
        doc = _grpc_http(50)
        node = doc
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
        with pytest.raises(lpdmod.TopGarbage) as e:
            lpdmod.top_document("http", 200, _json(doc))
        assert e.value.reason == f"/api/http: {reason}", e.value.reason
    missing = _grpc_http(50)
    del missing["rpc"]["10.199.0.1:50051"]["p99"]
    with pytest.raises(lpdmod.TopGarbage, match=r"http.rpc\['10.199.0.1:50051'\].p99: missing"):
        lpdmod.top_document("http", 200, _json(missing))


def test_once_shows_grpc_servers_from_the_daemon(fake):
    """--once against a daemon whose /api/http has gRPC servers: the table as plain text,
    within the width, below the HTTP servers."""
    code, out, err, _ = run_top("--once", "--url", fake.url("grpc"), "--refresh", "0.2")
    assert code == 0 and "Traceback" not in err, (code, out, err)
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert lines.index("gRPC servers: 2 - sorted by: calls/s") > lines.index(
        "HTTP servers: 1 - sorted by: req/s"), out
    row = next(line for line in lines if line.startswith("shop-grpc")).split()
    assert row[2:] == ["150", "2.0%", "12.5ms", "37.5ms", "62.5ms"], row
    assert "  errors: NOT_FOUND 2, UNAVAILABLE 1" in lines, out
    assert any(line.startswith("  methods: helloworld.Greeter/SayHello 143,") for line in lines), out


GRPC_PORT, GRPC_DELAY = 50051, 0.02
GRPC_SERVER = r"""
import sys, time
from concurrent import futures
import grpc
def answer(code):
    def method(request, context):
        time.sleep(float(sys.argv[3]))
        if code is not None:
            context.abort(code, "not here")
        return b"r" * 50
    return grpc.unary_unary_rpc_method_handler(method)      # bytes in, bytes out
srv = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("lpd.test.Echo", {
    "Ok": answer(None), "Missing": answer(grpc.StatusCode.NOT_FOUND)})])
srv.add_insecure_port(f"{sys.argv[1]}:{sys.argv[2]}")
srv.start()
print("ready", flush=True)
srv.wait_for_termination()
"""
GRPC_CLIENT = r"""
import json, sys
import grpc
channel = grpc.insecure_channel(f"{sys.argv[1]}:{sys.argv[2]}", options=[("grpc.enable_http_proxy", 0)])
codes = {}
for method in json.loads(sys.argv[3]):
    try:
        channel.unary_unary(f"/lpd.test.Echo/{method}")(b"q" * 20, timeout=5)
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    codes[code] = codes.get(code, 0) + 1
channel.close()
print(json.dumps(codes), flush=True)
"""


def test_once_shows_a_live_daemons_grpc_calls(pair):
    """A live lpd --http sees real gRPC calls (grpcio, h2c) from B to a server on A: top's
    HTTP pane has the server's row with the calls, error share, latency above the server's
    think time, the statuses that are errors and the methods, as the calls were made."""
    server = pair.popen(pair.ns_a, [sys.executable, "-c", GRPC_SERVER, pair.ip4_a, str(GRPC_PORT),
                                    str(GRPC_DELAY)], stdout=subprocess.PIPE, text=True)
    assert select.select([server.stdout], [], [], 10)[0] and \
        server.stdout.readline().strip() == "ready", f"no gRPC server (exit {server.poll()})"
    lpd = Lpd(pair, "--mapping-url", "none", "--local-net", f"{pair.ip4_b}/32", "--http",
              "--http-ports", str(GRPC_PORT), "--docker-socket", "none")
    try:
        calls = ["Ok", "Missing", "Ok", "Ok"] * 3              # 9 OK, 3 NOT_FOUND
        client = subprocess.run(netns.ns_argv(pair.ns_b, [
            sys.executable, "-c", GRPC_CLIENT, pair.ip4_a, str(GRPC_PORT), json.dumps(calls)]),
            capture_output=True, text=True, timeout=60)
        assert json.loads(client.stdout) == {"OK": 9, "NOT_FOUND": 3}, client.stdout + client.stderr

        def calls_seen():
            doc = json.loads(netns.http_get(pair.ns_b, "127.0.0.1", 59122, "/api/http")[1])
            return sum(s["calls"] for s in doc.get("rpc", {}).values()) == len(calls)
        assert wait_for(calls_seen, 10), "lpd did not count the calls"
        out = top_once(pair.ns_b, HOST_PORT, 80)
    finally:
        lpd.stop()
        netns.stop(server)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "HTTP servers: 0 - sorted by: req/s" in lines, out.stdout     # gRPC is not HTTP's
    at = lines.index("gRPC servers: 1 - sorted by: calls/s")
    row = lines[at + 2].split()
    assert row[0] == f"{pair.ip4_a}:{GRPC_PORT}" and row[2:4] == ["12", "25.0%"], lines[at:]
    p50, p95, p99 = (float(v[:-2]) / 1e3 for v in row[4:7])
    assert GRPC_DELAY <= p50 <= p95 <= p99 < 1.0, row
    assert lines[at + 3:at + 5] == ["  errors: NOT_FOUND 3",
                                    "  methods: lpd.test.Echo/Ok 9, lpd.test.Echo/Missing 3"], lines[at:]
