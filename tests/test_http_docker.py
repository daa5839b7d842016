"""HTTP requests per container on a real Docker engine: lpd on the engine's bridge with
--http reads container names from the Engine API (--docker-socket) and puts them on the
log's `container`, the histogram's `container` label, /api/requests' server keys and
lpd_container_info.

The engine is a private one (tests/docker_engine.py): its own containerd and dockerd,
started here, on a bridge of its own (`lpdd0`, 172.29.x.0/24 and a ULA /64), with
--live-restore, no iptables and no forwarding changes; dockerd is killed and restarted
by its PID. Images come without a registry: busybox httpd ("lpdtest/bb:1", from Debian's
busybox-static, downloaded, not installed) and a "usr" image that runs the host's
/usr/bin/python3 (mounted read-only) with test_http_live's HTTP/1.1 server (keep-alive,
chunked, 204, 304, 404, HEAD, slow, 100-continue, a close-delimited HTTP/1.0 answer).

lpd runs in the host's namespace on the bridge (`-i lpdd0`), its web port on loopback.
Every client is ours: curl from the host (to a published port on localhost, or to a
container's address directly), plain sockets from the host, and busybox wget inside a
container; nothing goes anywhere but loopback and the engine's bridge. The `live`
fixture does one run (with tcpdump writing the bridge's HTTP traffic to a pcap); the
tests after it each start their own lpd and containers. Waits are bounded, processes are
stopped by PID, containers removed by the test that made them, and the whole engine is
gone at the end. Without root, Docker or tcpdump, the fixtures fail: nothing is skipped.

What is checked (the issue's list):
1. curl localhost:<published port>/ -> web1 (through docker-proxy): in /api/requests under
   "web1", in the log with container "web1", in the histogram with container="web1".
2. the Python server in py1: seven URLs kept alive in one curl, three requests pipelined in
   one write, POST with Expect: 100-continue, HTTP/1.0 (curl -0), IPv6: exact log lines.
3. busybox httpd's quirks: exact log lines all the same.
4. lpd_container_info (every address, name, image), /api/containers, the histogram's
   container label: two containers, two names.
5. stop, start, reuse of an address, a new address, rename: followed within FRESH s.
6. dockerd SIGKILLed and restarted: lpd_docker_up 0, errors counted, names kept, one
   warning; then `answering again` and a container started afterwards is named.
7. container to container on the bridge: seen only with --promisc.
8. --docker-socket none, a missing socket, a socket nobody listens on: container "",
   servers ip:port, lpd runs on.
9. the bridge's pcap replayed with -r, and a copy with every data segment cut, reordered
   and duplicated: identical logs, equal to the live one but for `container`.
"""
import collections
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import docker_engine
import harness
import netns
from harness import (CHUNKED_LEN, CLOSE_LEN, FIXED_LEN, HIST, HTTP_SERVER, LPD, NOT_FOUND, TIMES,
                     PCAP_NS, PCAP_US, UPLOAD_LEN, Client, hist_series, key, labels_of, read_log,
                     free_port, read_pcap, request, strip, wait_for, write_pcap)

pytestmark = pytest.mark.docker

INTERVAL = 0.5              # lpd --interval: the log is flushed at each tick
WAIT = 10.0                 # seconds any one expectation may take
FRESH = 5.0                 # seconds a container change may take to show (lpd says ~1 s)
TIMEOUT = 10.0              # any one socket operation
CURL_TIMEOUT = 15
BB_INDEX = docker_engine.INDEX
FIELDS = ("ts", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "trans_depth", "method",
          "host", "uri", "version", "status_code", "request_body_len", "response_body_len", "ttfb",
          "duration", "container")
# Live and replayed times of one request: lpd's ring and tcpdump's are two packet sockets,
# and a frame the kernel left without a timestamp (one that crossed a veth from a
# container's namespace) is stamped once per socket. Seen here: `ts` equal, `ttfb` and
# `duration` up to 2 µs apart.
LIVE_CLOCK = 0.001
IFF_PROMISC = 0x100


# --- lpd on the bridge ----------------------------------------------------------------

def host_port_free(port):
    """True when `port` can be bound on 0.0.0.0 and [::] (what docker-proxy binds)."""
    socks = []
    try:
        for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(fam, socket.SOCK_STREAM)
            socks.append(s)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()




class HostLpd(harness.HostLpd):
    """harness.HostLpd, and the container names it publishes."""

    def container_info(self, m=None):
        """{(local_ip, container, image)} of lpd_container_info series equal to 1."""
        m = self.metrics() if m is None else m
        return container_info(m)


def container_info(m):
    out = set()
    for (name, labels), v in m.items():
        if name == "lpd_container_info":
            d = dict(labels)
            assert v == 1, (d, v)
            assert set(d) == {"local_ip", "container", "image"}, d
            out.add((d["local_ip"], d["container"], d["image"]))
    return out


def docker_lines(text, path):
    """stderr lines of lpd's engine warnings for socket `path` (not the recovery line)."""
    return [line for line in text.splitlines()
            if f"docker: {path}:" in line and "answering again" not in line]


# --- containers and clients -------------------------------------------------------------

class Containers:
    """Containers one test starts; all removed (rm -f) at the end."""

    def __init__(self, eng):
        self.eng, self.names = eng, []

    def busybox(self, name, *opts):
        self.names.append(name)
        self.eng.docker("run", "-d", "--name", name, *opts, self.eng.bb)
        return self.eng.addresses(name)

    def python(self, name, *opts):
        self.names.append(name)
        self.eng.docker("run", "-d", "--name", name, *self.eng.usr_run_args(),
                        "-v", f"{self.eng.srv}:/srv.py:ro", *opts, self.eng.usr,
                        docker_engine.PYTHON, "/srv.py", "80")
        return self.eng.addresses(name)

    def close(self):
        self.eng.remove(*self.names)
        self.names = []


class HostClient(Client):
    """test_http_live's client (its HTTP/1.1 reading of answers), from the host."""

    def __init__(self, host, port=80):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.connect((host, port))
        self.local = self.sock.getsockname()[:2]
        self.server = (host, port)
        self.depth = 0
        self.buf = b""

    def until_close(self):
        while True:
            b = self.sock.recv(65536)
            if not b:
                break
            self.buf += b
        out, self.buf = self.buf, b""
        return out


CURL_W = r"%{http_code} %{size_download} %{local_ip} %{local_port} %{num_connects}\n"


def curl(*args):
    """curl from the host; one (status, body bytes, local ip, local port, new connection)
    per transfer (`-w`)."""
    cp = subprocess.run(["curl", "-s", "-S", "--noproxy", "*", "--max-time", "10",
                         "-w", CURL_W, *args],
                        capture_output=True, text=True, timeout=CURL_TIMEOUT)
    assert cp.returncode == 0, (args, cp.returncode, cp.stderr)
    out = []
    for line in cp.stdout.splitlines():
        code, size, ip, port, connects = line.split()
        out.append((int(code), int(size), ip, int(port), int(connects)))
    return out


def record(orig, server, depth, method, uri, host, status, qlen, rlen, container,
           version="1.1"):
    rec = {"id.orig_h": orig[0], "id.orig_p": orig[1], "id.resp_h": server[0],
           "id.resp_p": server[1], "trans_depth": depth, "method": method}
    if host is not None:
        rec["host"] = host
    rec.update({"uri": uri, "version": version, "status_code": status, "request_body_len": qlen,
                "response_body_len": rlen, "container": container})
    return rec


def by_key(log):
    out = {}
    for r in log:
        assert key(r) not in out, f"two lines for one request: {r}"
        out[key(r)] = r
    return out


def wait_log(path, pred, timeout=WAIT):
    """The log once pred(log) holds (or as it is after `timeout`)."""
    return wait_for(lambda: (lambda log: log if pred(log) else None)(read_log(path)),
                    timeout, 0.1) or read_log(path)


def promisc(iface):
    return int(Path(f"/sys/class/net/{iface}/flags").read_text(), 16) & IFF_PROMISC


# --- the engine -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    with docker_engine.Engine() as eng:
        eng.bb = eng.busybox_image()
        eng.usr = eng.usr_image()
        eng.srv = os.path.join(eng.dir, "srv.py")
        Path(eng.srv).write_text(HTTP_SERVER)
        yield eng


@pytest.fixture
def containers(engine):
    c = Containers(engine)
    yield c
    c.close()


# --- one live run: tests 1-4 and 9 --------------------------------------------------------

class Live:
    def __init__(self, eng):
        self.eng = eng
        self.expected = []          # (scenario, record without times, route)
        self.windows = {}
        self.log, self.metrics, self.views = [], {}, {}
        self.addr, self.ids = {}, {}
        self.host_port = None
        self.pcap = self.log_path = None
        self.stderr, self.exit_code = "", None
        self.t0 = self.t1 = None

    def expect(self, name, orig, server, depth, method, uri, host, status, qlen, rlen,
               container, route, version="1.1"):
        self.expected.append((name, record(orig, server, depth, method, uri, host, status,
                                           qlen, rlen, container, version), route))

    def records(self, name):
        got = by_key(self.log)
        wanted = [rec for n, rec, _ in self.expected if n == name]
        missing = [rec for rec in wanted if key(rec) not in got]
        assert not missing, f"{name}: no log line for {missing}"
        return [got[key(rec)] for rec in wanted]


def scenario_published_port(live, tmp):
    """The issue's done-when: curl localhost:<published port>/ -> busybox in web1. Through
    docker-proxy, lpd sees the bridge address -> web1:80 (IPv4 or IPv6, as curl picked)."""
    out = Path(tmp) / "index.html"
    (code, size, _, _, _), = curl("-o", str(out), f"http://localhost:{live.host_port}/")
    assert (code, size, out.read_bytes()) == (200, len(BB_INDEX), BB_INDEX)


def scenario_curl_keepalive(live):
    """Seven URLs in one curl: one connection, answers of every kind."""
    ip = live.addr["py1"][0]
    urls = (("/fixed", 200, FIXED_LEN, "/fixed"), ("/chunked", 200, CHUNKED_LEN, "/chunked"),
            ("/empty", 204, 0, "/empty"), ("/cached", 304, 0, "/cached"),
            ("/missing", 404, len(NOT_FOUND), "/missing"), ("/slow", 200, 4, "/slow"),
            ("/items/42?x=1", 200, FIXED_LEN, "/items/:id"))
    args = []
    for uri, *_ in urls:
        args += ["-o", "/dev/null", f"http://{ip}{uri}"]
    got = curl(*args)
    assert [(c, s) for c, s, *_ in got] == [(c, s) for _, c, s, _ in urls], got
    assert [n for *_, n in got] == [1] + [0] * (len(urls) - 1), "one connection, kept alive"
    orig = (got[0][2], got[0][3])
    assert all((g[2], g[3]) == orig for g in got)
    for depth, (uri, status, length, route) in enumerate(urls, 1):
        live.expect("curl_keepalive", orig, (ip, 80), depth, "GET", uri, ip, status, 0, length,
                    "py1", route)


def scenario_pipelined(live):
    """Three requests in one write from a plain socket; answers come back in order."""
    ip = live.addr["py1"][0]
    c = HostClient(ip)
    reqs = (("GET", "/fixed", "a.example", 200, FIXED_LEN, "/fixed"),
            ("HEAD", "/big", "b.example", 200, 0, "/big"),
            ("GET", "/chunked?page=2", "c.example", 200, CHUNKED_LEN, "/chunked"))
    c.send(b"".join(request(m, u, h) for m, u, h, *_ in reqs))
    for depth, (method, uri, host, status, length, route) in enumerate(reqs, 1):
        code, body = c.response(method)
        assert (code, len(body)) == (status, length), uri
        live.expect("pipelined", c.local, c.server, depth, method, uri, host, status, 0, length,
                    "py1", route)
    c.close()


def scenario_expect(live, tmp):
    """POST with Expect: 100-continue (curl waits for the server's 100 Continue)."""
    ip = live.addr["py1"][0]
    body = Path(tmp) / "upload.bin"
    body.write_bytes(b"u" * UPLOAD_LEN)
    (code, size, lip, lport, _), = curl("-o", "/dev/null", "-H", "Expect: 100-continue",
                                        "-H", "Content-Type: application/octet-stream",
                                        "--data-binary", f"@{body}", f"http://{ip}/upload")
    answer = b"got %d" % UPLOAD_LEN
    assert (code, size) == (201, len(answer))
    live.expect("expect", (lip, lport), (ip, 80), 1, "POST", "/upload", ip, 201, UPLOAD_LEN,
                len(answer), "py1", "/upload")


def scenario_http10(live):
    """curl -0: HTTP/1.0 requests; one close-delimited answer, one with a length."""
    ip = live.addr["py1"][0]
    for uri, length in (("/close", CLOSE_LEN), ("/fixed?v=1.0", FIXED_LEN)):
        (code, size, lip, lport, _), = curl("-0", "-o", "/dev/null", f"http://{ip}{uri}")
        assert (code, size) == (200, length), uri
        live.expect("http10", (lip, lport), (ip, 80), 1, "GET", uri, ip, 200, 0, length, "py1",
                    uri.split("?")[0], "1.0")


def scenario_ipv6(live):
    """To the container's global IPv6 address: keep-alive, Host [addr]."""
    ip6 = live.addr["py1"][1]
    urls = (("/v6", "/v6"), ("/v6/items/99", "/v6/items/:id"))
    args = []
    for uri, _ in urls:
        args += ["-o", "/dev/null", f"http://[{ip6}]{uri}"]
    got = curl("-g", *args)
    assert [(c, s, n) for c, s, _, _, n in got] == [(200, FIXED_LEN, 1), (200, FIXED_LEN, 0)]
    orig = (got[0][2], got[0][3])
    assert orig[0] == live.eng.gw6, "from the bridge's own IPv6 address"
    for depth, (uri, route) in enumerate(urls, 1):
        live.expect("ipv6", orig, (ip6, 80), depth, "GET", uri, f"[{ip6}]", 200, 0, FIXED_LEN,
                    "py1", route)


def scenario_busybox(live):
    """busybox httpd's quirks (notes §2): Connection: close on every answer, a body on HEAD
    anyway, 404 and 501 pages without Content-Length (they end at the close), a second
    pipelined request ignored (status 0), HTTP/1.0 without Host."""
    ip = live.addr["web1"][0]
    srv = (ip, 80)

    def one(method, uri, host, body=b"", version="HTTP/1.1", headers=()):
        c = HostClient(ip)
        c.send(request(method, uri, host, version=version, headers=headers, body=body))
        code, fields = c.head()
        rest = c.until_close()
        c.close()
        assert fields.get("connection") == "close", fields
        return c, code, fields, rest

    c, code, fields, rest = one("GET", "/", "bb.example")
    assert (code, fields.get("content-length"), rest) == (200, str(len(BB_INDEX)), BB_INDEX)
    live.expect("busybox", c.local, srv, 1, "GET", "/", "bb.example", 200, 0, len(BB_INDEX),
                "web1", "/")
    c, code, fields, rest = one("HEAD", "/", "bb.example")
    assert (code, fields.get("content-length"), rest) == (200, str(len(BB_INDEX)), BB_INDEX), \
        "busybox sends the body on HEAD anyway"
    live.expect("busybox", c.local, srv, 1, "HEAD", "/", "bb.example", 200, 0, 0, "web1", "/")
    c, code, fields, page = one("GET", "/nope", "bb.example")
    assert code == 404 and "content-length" not in fields and b"404" in page
    live.expect("busybox", c.local, srv, 1, "GET", "/nope", "bb.example", 404, 0, len(page),
                "web1", "/nope")
    c, code, fields, page = one("POST", "/form", "bb.example", body=b"a=1&b",
                                headers=(("Content-Length", 5),))
    assert code == 501 and "content-length" not in fields and b"501" in page
    live.expect("busybox", c.local, srv, 1, "POST", "/form", "bb.example", 501, 5, len(page),
                "web1", "/form")
    c, code, fields, rest = one("GET", "/", None, version="HTTP/1.0")
    assert (code, rest) == (200, BB_INDEX)
    live.expect("busybox", c.local, srv, 1, "GET", "/", None, 200, 0, len(BB_INDEX), "web1", "/",
                "1.0")
    # two pipelined: busybox answers the first and closes; the second gets no answer
    c = HostClient(ip)
    c.send(request("GET", "/", "p1.example") + request("GET", "/again", "p2.example"))
    code, fields = c.head()
    rest = c.until_close()
    c.close()
    assert (code, rest) == (200, BB_INDEX), "exactly one answer"
    live.expect("busybox", c.local, srv, 1, "GET", "/", "p1.example", 200, 0, len(BB_INDEX),
                "web1", "/")
    live.expect("busybox", c.local, srv, 2, "GET", "/again", "p2.example", 0, 0, 0, "web1",
                "/again")


@pytest.fixture(scope="module")
def live(engine):
    """web1 (busybox, published on a host port) and py1 (the Python server); tcpdump and lpd
    on the bridge; every scenario; then lpd's log, metrics and documents, and the pcap."""
    tmp = tempfile.TemporaryDirectory()
    run = Live(engine)
    cont = Containers(engine)
    dump = lpd = None
    try:
        run.host_port = next((p for p in [8080] + [free_port("0.0.0.0") for _ in range(20)]
                              if host_port_free(p)), None)
        assert run.host_port, "no free host port to publish web1 on"
        run.addr["web1"] = cont.busybox("web1", "-p", f"{run.host_port}:80")
        run.addr["py1"] = cont.python("py1")
        for name in ("web1", "py1"):
            run.ids[name] = engine.container_id(name)
            for ip in run.addr[name]:
                engine.wait_http(ip)           # before lpd and tcpdump: not in the log
        run.pcap = Path(tmp.name) / "bridge.pcap"
        run.log_path = Path(tmp.name) / "http.json"
        dump = netns.start_tcpdump(None, engine.bridge, ["-p", "-s", "0", "-U",
                                                         "--time-stamp-precision", "nano",
                                                         "-w", str(run.pcap), "tcp port 80"])
        lpd = HostLpd(engine.bridge, "--http", "--http-log", str(run.log_path),
                      "--interval", str(INTERVAL), "--docker-socket", engine.socket)
        want = {(ip, n) for n, ips in run.addr.items() for ip in ips}
        wait_for(lambda: {(c["ip"], c["container"]) for c in
                          lpd.json("/api/containers")[1].get("containers", [])} >= want, WAIT)
        run.t0 = time.time()
        for name, scenario in (("published_port", lambda r: scenario_published_port(r, tmp.name)),
                               ("curl_keepalive", scenario_curl_keepalive),
                               ("pipelined", scenario_pipelined),
                               ("expect", lambda r: scenario_expect(r, tmp.name)),
                               ("http10", scenario_http10), ("ipv6", scenario_ipv6),
                               ("busybox", scenario_busybox)):
            t0 = time.time()
            scenario(run)
            run.windows[name] = (t0, time.time())
        run.t1 = time.time()
        n = len(run.expected) + 1              # + the published-port request (port unknown)
        run.log = wait_log(run.log_path, lambda log: len(log) >= n)
        time.sleep(2 * INTERVAL)               # anything more would be written by now
        run.log = read_log(run.log_path)
        count = lambda m: sum(v for k, v in m.items() if k[0] == HIST + "_count")  # noqa: E731
        run.metrics = wait_for(lambda: (lambda m: count(m) >= n and m)(lpd.metrics()), 5, 0.2) \
            or lpd.metrics()
        for view in ("/api/requests", "/api/requests?server=web1", "/api/requests?server=py1",
                     "/api/requests?server=nobody", "/api/containers"):
            run.views[view] = lpd.json(view)
        run.exit_code = lpd.stop()
        run.stderr = lpd.stderr()
        lpd = None
        time.sleep(0.3)
        netns.stop(dump)
        dump = None
        cont.close()
        yield run
    finally:
        if lpd is not None:
            lpd.stop()
        if dump is not None:
            netns.stop(dump)
        cont.close()
        tmp.cleanup()


def published_record(live):
    """The log line of the published-port request: to web1:80 with Host localhost:PORT."""
    host = f"localhost:{live.host_port}"
    recs = [r for r in live.log if r.get("host") == host]
    assert len(recs) == 1, (host, recs, live.log[:3])
    return recs[0]


# 1. ------------------------------------------------------------------------------------

def test_published_port_request_is_named_in_log_api_and_histogram(live):
    rec = published_record(live)
    ip4, ip6 = live.addr["web1"]
    assert (rec["id.resp_h"], rec["id.orig_h"]) in ((ip4, live.eng.gw4), (ip6, live.eng.gw6)), \
        "through docker-proxy: from the bridge's address to the container's"
    assert strip(rec) == record((rec["id.orig_h"], rec["id.orig_p"]), (rec["id.resp_h"], 80), 1,
                                "GET", "/", f"localhost:{live.host_port}", 200, 0,
                                len(BB_INDEX), "web1")
    status, doc = live.views["/api/requests"]
    assert status == 200
    assert rec in doc["servers"]["web1"], "grouped under the container's name"
    status, doc = live.views["/api/requests?server=web1"]
    assert status == 200 and set(doc["servers"]) == {"web1"} and rec in doc["servers"]["web1"]
    labels = labels_of(("GET", "200", "/", rec["id.resp_h"], "80", "web1"))
    n = sum(1 for r in live.log if r["id.resp_h"] == rec["id.resp_h"] and r["uri"] == "/"
            and r["status_code"] == 200 and r["method"] == "GET" and r["version"] == "1.1")
    assert live.metrics.get((HIST + "_count", frozenset(labels.items()))) == n, \
        hist_series(live.metrics)


# 2. and 3. -----------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", ["curl_keepalive", "pipelined", "expect", "http10",
                                      "ipv6", "busybox"])
def test_exact_log_lines(live, scenario):
    for rec, (_, want, _) in zip(live.records(scenario),
                                 [e for e in live.expected if e[0] == scenario]):
        assert strip(rec) == want, (rec, want)
        assert list(rec) == [k for k in FIELDS if k in rec], rec
        t0, t1 = live.windows[scenario]
        assert t0 - 0.5 <= rec["ts"] <= t1 + 0.5, (rec, t0, t1)
        if rec["status_code"]:
            assert 0 <= rec["ttfb"] <= rec["duration"] < 5, rec
        else:
            assert "ttfb" not in rec, rec


def test_the_log_has_nothing_else(live):
    want = {key(e) for _, e, _ in live.expected} | {key(published_record(live))}
    assert sorted(map(key, live.log)) == sorted(want), \
        [r for r in live.log if key(r) not in want]


def test_slow_and_pipelined_timing(live):
    slow, = [r for r in live.records("curl_keepalive") if r["uri"] == "/slow"]
    assert slow["ttfb"] >= 0.3, slow
    piped = live.records("pipelined")
    assert len({r["ts"] for r in piped}) == 1, "three requests, one segment"
    assert [r["duration"] for r in piped] == sorted(r["duration"] for r in piped)


def test_api_requests_grouped_by_container_newest_first(live):
    groups = collections.defaultdict(list)
    for rec in live.log:
        groups[rec["container"] or f"{rec['id.resp_h']}:{rec['id.resp_p']}"].append(rec)
    newest_first = {k: v[::-1] for k, v in groups.items()}
    assert set(newest_first) == {"web1", "py1"}
    status, doc = live.views["/api/requests"]
    assert status == 200 and doc["servers"] == newest_first
    status, doc = live.views["/api/requests?server=py1"]
    assert status == 200 and doc["servers"] == {"py1": newest_first["py1"]}
    status, doc = live.views["/api/requests?server=nobody"]
    assert status == 200 and doc["servers"] == {}


# 4. ------------------------------------------------------------------------------------

def test_container_info_has_every_address_with_name_and_image(live):
    want = {(ip, name, image) for name, image in (("web1", docker_engine.BB_IMAGE),
                                                  ("py1", docker_engine.USR_IMAGE))
            for ip in live.addr[name]}
    assert container_info(live.metrics) == want
    m = live.metrics
    assert m.get(("lpd_docker_up", frozenset())) == 1
    assert m.get(("lpd_docker_errors_total", frozenset())) == 0
    last = m.get(("lpd_docker_last_success_timestamp_seconds", frozenset()))
    assert last is not None and live.t0 - 60 <= last <= time.time(), last


def test_api_containers_document(live):
    status, doc = live.views["/api/containers"]
    assert status == 200, doc
    version = live.eng.api_json("/version")["ApiVersion"]
    assert {k: doc["engine"].get(k) for k in ("socket", "up", "api_version", "errors")} == \
        {"socket": live.eng.socket, "up": True, "api_version": version, "errors": 0}, doc
    assert isinstance(doc["time"], float) and abs(doc["time"] - time.time()) < 120
    images = {"web1": docker_engine.BB_IMAGE, "py1": docker_engine.USR_IMAGE}
    want = sorted((ip, name, images[name], live.ids[name])
                  for name, ips in live.addr.items() for ip in ips)
    got = sorted((c["ip"], c["container"], c["image"], c["id"]) for c in doc["containers"])
    assert got == want
    assert all(len(c["id"]) == 64 for c in doc["containers"])


def test_histogram_series_carry_the_container(live):
    want = collections.Counter()
    for _, rec, route in live.expected:
        want[(rec["method"], str(rec["status_code"]), route, rec["id.resp_h"],
              str(rec["id.resp_p"]), rec["container"])] += 1
    pub = published_record(live)
    want[("GET", "200", "/", pub["id.resp_h"], "80", "web1")] += 1
    got = hist_series(live.metrics)
    assert got == dict(want), {"different": {k: (v, got.get(k)) for k, v in want.items()
                                             if got.get(k) != v},
                               "unexpected": {k: v for k, v in got.items() if k not in want}}
    assert {k[5] for k in got} == {"web1", "py1"}, "two containers, two names"


def test_live_run_ends_cleanly(live):
    assert live.exit_code == 0, live.stderr
    assert "Traceback" not in live.stderr, live.stderr
    assert not docker_lines(live.stderr, live.eng.socket), live.stderr


# 5. ------------------------------------------------------------------------------------

def get_bb(ip, uri="/"):
    """One GET to busybox at ip:80 (its index page: `uri` is "/" or "/?tag"); returns the
    client (its .local) after the answer."""
    c = HostClient(ip)
    c.send(request("GET", uri, "t.example"))
    code, _ = c.head()
    assert code == 200 and c.until_close() == BB_INDEX
    c.close()
    return c


def test_map_follows_stop_start_and_rename(engine, containers, tmp_path):
    log_path = tmp_path / "http.json"
    lpd = HostLpd(engine.bridge, "--http", "--http-log", str(log_path), "--interval",
                  str(INTERVAL), "--docker-socket", engine.socket)
    bb = docker_engine.BB_IMAGE
    asked = []                                  # (client local address, expected container)

    def info_is(want):
        wait_for(lambda: lpd.container_info() == want, FRESH, 0.05)
        return lpd.container_info()

    def ask(ip, name):
        c = get_bb(ip, f"/?{name}-{len(asked)}")
        asked.append((c.local, ip, name))

    a_addr = containers.busybox("t5a")
    assert info_is({(ip, "t5a", bb) for ip in a_addr}) == {(ip, "t5a", bb) for ip in a_addr}
    engine.wait_http(a_addr[0])
    ask(a_addr[0], "t5a")
    engine.docker("stop", "-t", "0", "t5a")
    assert info_is(set()) == set(), "a stopped container's addresses leave lpd_container_info"
    b_addr = containers.busybox("t5b")
    assert b_addr == a_addr, "precondition: the engine gives t5a's old addresses to t5b"
    assert info_is({(ip, "t5b", bb) for ip in b_addr}) == {(ip, "t5b", bb) for ip in b_addr}
    engine.wait_http(b_addr[0])
    ask(b_addr[0], "t5b")
    engine.docker("start", "t5a")
    a2 = engine.addresses("t5a")
    assert a2[0] != a_addr[0], "precondition: t5a restarts on a new address"
    want = {(ip, "t5b", bb) for ip in b_addr} | {(ip, "t5a", bb) for ip in a2}
    assert info_is(want) == want
    engine.wait_http(a2[0])
    ask(a2[0], "t5a")
    ask(b_addr[0], "t5b")
    engine.docker("rename", "t5b", "t5c")
    containers.names.append("t5c")
    want = {(ip, "t5c", bb) for ip in b_addr} | {(ip, "t5a", bb) for ip in a2}
    assert info_is(want) == want, "a rename shows"
    ask(b_addr[0], "t5c")
    log = wait_log(log_path, lambda log: len(log) >= len(asked))
    got = {(r["id.orig_h"], r["id.orig_p"]): r for r in log}
    for local, ip, name in asked:
        rec = got.get(tuple(local))
        assert rec is not None, (local, name, log)
        assert (rec["id.resp_h"], rec["container"], rec["status_code"]) == (ip, name, 200), rec
    assert lpd.stop() == 0, lpd.stderr()


# 6. ------------------------------------------------------------------------------------

def test_dockerd_killed_and_restarted(engine, containers, tmp_path):
    log_path = tmp_path / "http.json"
    addr = containers.busybox("t6live")
    engine.wait_http(addr[0])
    lpd = HostLpd(engine.bridge, "--http", "--http-log", str(log_path), "--interval",
                  str(INTERVAL), "--docker-socket", engine.socket)
    bb = docker_engine.BB_IMAGE
    live_info = {(ip, "t6live", bb) for ip in addr}
    assert wait_for(lambda: lpd.container_info() == live_info, FRESH, 0.1), lpd.container_info()
    assert lpd.value("lpd_docker_up") == 1
    before = lpd.value("lpd_docker_errors_total")
    last_ok = lpd.value("lpd_docker_last_success_timestamp_seconds")
    killed_at = time.time()
    engine.kill_dockerd(signal.SIGKILL)
    try:
        assert wait_for(lambda: lpd.value("lpd_docker_up") == 0, WAIT, 0.1), \
            "lpd_docker_up must fall to 0 while the engine is down"
        e1 = lpd.value("lpd_docker_errors_total")
        assert e1 >= before + 1, (before, e1)
        # lpd retries (backoff up to 5 s): more errors, still one warning line
        assert wait_for(lambda: lpd.value("lpd_docker_errors_total") > e1, 8, 0.2), \
            "every failed retry counts"
        down = lpd.value("lpd_docker_last_success_timestamp_seconds")
        assert down is not None and down <= killed_at + 0.5, (down, killed_at, last_ok)
        status, doc = lpd.json("/api/containers")
        assert status == 200 and doc["engine"]["up"] is False and doc["engine"]["errors"] >= e1
        assert {(c["ip"], c["container"]) for c in doc["containers"]} == \
            {(ip, "t6live") for ip in addr}, "the last good map is kept"
        assert lpd.container_info() == live_info
        during = get_bb(addr[0], "/?during")         # live-restore: t6live still answers
        warned = docker_lines(lpd.stderr(), engine.socket)
        assert len(warned) == 1, lpd.stderr()
        assert "answering again" not in lpd.stderr()
    finally:
        engine.start_dockerd()
    restarted_at = time.time()
    assert wait_for(lambda: lpd.value("lpd_docker_up") == 1, WAIT, 0.1), lpd.stderr()
    assert wait_for(lambda: "answering again" in lpd.stderr(), 5, 0.1), lpd.stderr()
    assert lpd.value("lpd_docker_last_success_timestamp_seconds") >= restarted_at - 0.5
    new = containers.busybox("t6new")
    want = live_info | {(ip, "t6new", bb) for ip in new}
    assert wait_for(lambda: lpd.container_info() == want, FRESH, 0.1), lpd.container_info()
    engine.wait_http(new[0])
    after_live = get_bb(addr[0], "/?after")
    after_new = get_bb(new[0], "/?new")
    log = wait_log(log_path, lambda log: len(log) >= 3)
    got = {(r["id.orig_h"], r["id.orig_p"]): r for r in log}
    for c, ip, name, uri in ((during, addr[0], "t6live", "/?during"),
                             (after_live, addr[0], "t6live", "/?after"),
                             (after_new, new[0], "t6new", "/?new")):
        rec = got.get(tuple(c.local))
        assert rec is not None, (uri, log)
        assert (rec["id.resp_h"], rec["uri"], rec["container"]) == (ip, uri, name), rec
    err = lpd.stderr()
    assert len(docker_lines(err, engine.socket)) == 1, err
    assert err.count("answering again") == 1, err
    assert lpd.stop() == 0, lpd.stderr()


# 7. ------------------------------------------------------------------------------------

def test_container_to_container_is_seen_only_with_promisc(engine, containers, tmp_path):
    srv = containers.python("t7srv")
    cli = containers.busybox("t7cli")
    engine.wait_http(srv[0])
    seen = {}
    for mode in ("plain", "promisc"):
        assert not promisc(engine.bridge), "nothing else may hold the bridge promiscuous"
        log_path = tmp_path / f"{mode}.json"
        args = ["--promisc"] if mode == "promisc" else []
        lpd = HostLpd(engine.bridge, "--http", "--http-log", str(log_path), "--interval",
                      str(INTERVAL), "--docker-socket", engine.socket, *args)
        assert bool(promisc(engine.bridge)) == (mode == "promisc")
        assert wait_for(lambda: ("t7srv" in {c for _, c, _ in lpd.container_info()}), FRESH)
        marker = HostClient(srv[0])                 # host -> container: always seen
        marker.send(request("GET", f"/marker/{mode}", srv[0]))
        assert marker.response() == (200, b"x" * FIXED_LEN)
        marker.close()
        out = engine.docker("exec", "t7cli", "/bin/busybox", "wget", "-q", "-O", "-",
                            f"http://{srv[0]}/c2c/{mode}")
        assert out == "x" * FIXED_LEN
        marker2 = HostClient(srv[0])
        marker2.send(request("GET", f"/marker2/{mode}", srv[0]))
        assert marker2.response() == (200, b"x" * FIXED_LEN)
        marker2.close()
        wait_log(log_path, lambda log: any(r["uri"] == f"/marker2/{mode}" for r in log))
        time.sleep(2 * INTERVAL)
        seen[mode] = read_log(log_path)
        _, api = lpd.json("/api/requests?server=t7srv")
        seen[mode + "-api"] = api["servers"].get("t7srv", [])
        assert lpd.stop() == 0, lpd.stderr()
    for mode in ("plain", "promisc"):
        assert [r["uri"] for r in seen[mode] if r["uri"].startswith("/marker")] == \
            [f"/marker/{mode}", f"/marker2/{mode}"], seen[mode]
    c2c = [r for r in seen["plain"] if r["id.orig_h"] == cli[0]]
    assert c2c == [], "without --promisc the bridge's packet socket misses switched frames"
    assert not [r for r in seen["plain-api"] if r["id.orig_h"] == cli[0]]
    c2c = [r for r in seen["promisc"] if r["id.orig_h"] == cli[0]]
    assert len(c2c) == 1, seen["promisc"]
    rec = c2c[0]
    assert strip(rec) == record((cli[0], rec["id.orig_p"]), (srv[0], 80), 1, "GET",
                                "/c2c/promisc", srv[0], 200, 0, FIXED_LEN, "t7srv")
    assert rec in seen["promisc-api"]


# 8. ------------------------------------------------------------------------------------

def test_without_docker_names_are_empty_and_servers_are_ip_port(engine, containers, tmp_path):
    srv = containers.python("t8srv")
    for ip in srv:
        engine.wait_http(ip)
    missing = str(tmp_path / "no-such.sock")
    refused = str(tmp_path / "nothing-listens.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(refused)                        # a socket file, and nobody listening on it
    s.close()
    paths = {"none": "none", "missing": missing, "refused": refused}
    lpds = {}
    for mode, sock in paths.items():
        lpds[mode] = HostLpd(engine.bridge, "--http", "--http-log", str(tmp_path / f"{mode}.json"),
                             "--interval", str(INTERVAL), "--docker-socket", sock)
    sent = []
    for ip in srv:
        c = HostClient(ip)
        host = f"[{ip}]" if ":" in ip else ip
        c.send(request("GET", "/plain", host))
        assert c.response() == (200, b"x" * FIXED_LEN)
        c.close()
        sent.append(record(c.local, (ip, 80), 1, "GET", "/plain", host, 200, 0, FIXED_LEN, ""))
    for mode, lpd in lpds.items():
        log = wait_log(tmp_path / f"{mode}.json", lambda log: len(log) >= len(sent))
        assert sorted(map(strip, log), key=key) == sorted(sent, key=key), (mode, log)
        _, doc = lpd.json("/api/requests")
        assert set(doc["servers"]) == {f"{ip}:80" for ip in srv}, (mode, doc)
        _, doc = lpd.json(f"/api/requests?server={srv[0]}:80")
        assert [strip(r) for r in doc["servers"][f"{srv[0]}:80"]] == [sent[0]]
        m = lpd.metrics()
        assert container_info(m) == set(), mode
        assert {k[5] for k in hist_series(m)} == {""}, mode
        assert sum(hist_series(m).values()) == len(sent), mode
    for mode in ("missing", "refused"):
        m = lpds[mode].metrics()
        assert m.get(("lpd_docker_up", frozenset())) == 0, mode
        assert m.get(("lpd_docker_errors_total", frozenset())) >= 1, mode
        status, doc = lpds[mode].json("/api/containers")
        assert status == 200 and doc["containers"] == [], (mode, doc)
        assert (doc["engine"]["socket"], doc["engine"]["up"]) == (paths[mode], False), doc
    for mode, lpd in lpds.items():
        assert lpd.proc.poll() is None, (mode, lpd.stderr())
        assert lpd.stop() == 0, (mode, lpd.stderr())
        err = lpd.stderr()
        assert "Traceback" not in err, err
        if mode == "none":
            assert "docker: " not in err, err
        else:
            assert len(docker_lines(err, paths[mode])) == 1, (mode, err)


# 9. ------------------------------------------------------------------------------------

def split_segment(frame):
    """A TCP data segment (no SYN or RST) cut in three at its payload's thirds: the
    pieces (with recomputed lengths and checksums; a FIN on the last piece only) as
    [first, last, middle], then the whole segment again (a retransmission). None for
    anything else."""
    if len(frame) < 14 or frame[12:14] not in (b"\x08\x00", b"\x86\xdd"):
        return None
    ip = frame[14:]
    if frame[12:14] == b"\x08\x00":
        ihl = (ip[0] & 15) * 4
        if ip[9] != 6 or struct.unpack("!H", ip[6:8])[0] & 0x3FFF:
            return None
        total = struct.unpack("!H", ip[2:4])[0]
        l3, l4 = ip[:ihl], ip[ihl:total]
        pseudo = lambda n: l3[12:20] + struct.pack("!BBH", 0, 6, n)   # noqa: E731
    else:
        if ip[6] != 6:
            return None
        plen = struct.unpack("!H", ip[4:6])[0]
        l3, l4 = ip[:40], ip[40:40 + plen]
        pseudo = lambda n: l3[8:40] + struct.pack("!I3xB", n, 6)      # noqa: E731
    doff = (l4[12] >> 4) * 4
    flags = l4[13]
    payload = l4[doff:]
    if flags & 0x06 or len(payload) < 3:            # SYN, RST: as they are
        return None
    seq, = struct.unpack("!I", l4[4:8])
    cuts = [0, len(payload) // 3, 2 * len(payload) // 3, len(payload)]
    pieces = []
    for i in range(3):
        part = payload[cuts[i]:cuts[i + 1]]
        tcp = bytearray(l4[:doff] + part)
        tcp[4:8] = struct.pack("!I", (seq + cuts[i]) & 0xFFFFFFFF)
        if i < 2:
            tcp[13] &= ~0x01                         # a FIN rides on the last piece only
        tcp[16:18] = b"\0\0"
        tcp[16:18] = struct.pack("!H", netns.checksum(pseudo(len(tcp)) + bytes(tcp)))
        hdr = bytearray(l3)
        if frame[12:14] == b"\x08\x00":
            hdr[2:4] = struct.pack("!H", len(hdr) + len(tcp))
            hdr[10:12] = b"\0\0"
            hdr[10:12] = struct.pack("!H", netns.checksum(bytes(hdr)))
        else:
            hdr[4:6] = struct.pack("!H", len(tcp))
        pieces.append(frame[:14] + bytes(hdr) + bytes(tcp))
    return [pieces[0], pieces[2], pieces[1], frame]


def shuffle_capture(src, dst):
    """Every TCP data segment of `src` as three pieces out of order plus a duplicate of
    the whole, all at the segment's own timestamp; other frames as they are."""
    cap = read_pcap(src, strict=True)
    out, split = [], 0
    for sec, frac, wirelen, frame in cap["records"]:
        pieces = split_segment(frame) if len(frame) == wirelen else None
        if pieces is None:
            out.append((sec, frac, frame, wirelen))
            continue
        split += 1
        out += [(sec, frac, p) for p in pieces]
    write_pcap(dst, out, PCAP_NS if cap["nano"] else PCAP_US, cap["order"], cap["linktype"],
               cap["snaplen"])
    return len(cap["records"]), split


def replay(pcap, out):
    cp = subprocess.run([sys.executable, LPD, "-r", str(pcap), "--http", "--http-log", str(out),
                         "--docker-socket", "none", "--output", "json"],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr, cp.stderr
    return read_log(out)


def close_times(a, b, tol=LIVE_CLOCK):
    for k in TIMES:
        assert (k in a) == (k in b), (k, a, b)
        if k in a:
            assert abs(a[k] - b[k]) <= tol, (k, a, b)


def test_offline_replay_of_the_bridge_capture_reordered_and_duplicated(live, tmp_path):
    size = live.pcap.stat().st_size
    assert 0 < size < 4 << 20, size
    shuffled = tmp_path / "shuffled.pcap"
    frames, split = shuffle_capture(live.pcap, shuffled)
    assert split >= 20, (frames, split)
    assert shuffled.stat().st_size < 8 << 20
    clean = replay(live.pcap, tmp_path / "clean.json")
    mixed = replay(shuffled, tmp_path / "shuffled.json")
    assert mixed == clean, "reordered and duplicated segments must not change the log"
    assert all(r["container"] == "" for r in clean)
    assert len(clean) == len(live.log), (len(clean), len(live.log))
    for off, on in zip(clean, live.log):
        assert {k: v for k, v in strip(off).items() if k != "container"} == \
            {k: v for k, v in strip(on).items() if k != "container"}, (off, on)
        close_times(off, on)
