"""lpd's container-engine client against engines that misbehave: a real HTTP/1.1
server on a real unix socket speaking the Docker Engine API's shapes (and podman's
variants), so that down, slow, garbage and restarted engines can be staged at will.
The real Docker engine is in test_http_docker.py."""
import contextlib
import http.server
import ipaddress
import json
import os
import queue
import socket
import socketserver
import tempfile
import threading
import time

import pytest

import harness
import lpd

pytestmark = pytest.mark.unit

WAIT = 10.0                  # seconds any one expectation may take


def wait_for(cond, timeout=WAIT):
    return harness.wait_for(cond, timeout, 0.02)


def summary(name, ips, image="lpdtest/bb:1", cid=None, names=None):
    """One /containers/json entry with an address on each of its networks."""
    nets = {}
    for i, ip in enumerate(ips):
        field = "GlobalIPv6Address" if ":" in ip else "IPAddress"
        nets[f"net{i}"] = {"IPAddress": "", "GlobalIPv6Address": "", field: ip}
    return {"Id": cid or (name.encode().hex() * 64)[:64], "Names": names or ["/" + name],
            "Image": image, "State": "running", "NetworkSettings": {"Networks": nets}}


class Engine:
    """A unix-socket engine. `containers` is what it lists; `events` queues stream lines;
    `mode` makes it misbehave: 'ok', 'garbage', '500', 'drip', 'huge'. stop(), then
    start(): the engine gone, then back on the same socket."""

    def __init__(self, path, version_header=("Api-Version", "1.41")):
        self.path = path
        self.start(version_header)

    def start(self, version_header=("Api-Version", "1.41")):
        """Listen on the socket (again, after stop(): a fresh engine, nothing listed yet)."""
        self.version_header = version_header
        self.containers, self.mode = [], "ok"
        self.requests = []
        self.streams = []                         # queues of open event streams
        engine = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def answer(self, status, body, ctype="application/json"):
                self.send_response(status)
                if engine.version_header:
                    self.send_header(*engine.version_header)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                engine.requests.append(self.path)
                if self.path == "/_ping":
                    return self.answer(200, b"OK", "text/plain")
                if self.path.endswith("/containers/json"):
                    if engine.mode == "garbage":
                        return self.answer(200, b"{\"not\": \"a list\"")
                    if engine.mode == "500":
                        return self.answer(500, b'{"message": "engine on fire"}')
                    if engine.mode == "huge":
                        self.send_response(200)
                        self.send_header("Content-Length", str(lpd.DOCKER_MAX_BYTES + 10))
                        self.end_headers()
                        for _ in range(lpd.DOCKER_MAX_BYTES // 65536 + 1):
                            self.wfile.write(b" " * 65536)
                        return
                    if engine.mode == "drip":
                        self.send_response(200)
                        self.send_header("Content-Length", "1000")
                        self.end_headers()
                        for _ in range(100):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(1)
                        return
                    return self.answer(200, json.dumps(engine.containers).encode())
                if "/events" in self.path:
                    q = queue.Queue()
                    engine.streams.append(q)
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.flush()
                    while True:
                        line = q.get()
                        if line is None:             # the engine goes: so does the stream
                            self.close_connection = True
                            return
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                return self.answer(404, b'{"message": "page not found"}')

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(self.path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def event(self, type_, action, actor="x" * 64):
        line = json.dumps({"Type": type_, "Action": action, "Actor": {"ID": actor,
                           "Attributes": {}}}).encode() + b"\n"
        for q in list(self.streams):
            q.put(line)

    def stop(self):
        if self.server is None:
            return
        for q in self.streams:
            q.put(None)
        self.server.shutdown()
        self.server.server_close()
        self.server = None
        os.unlink(self.path)


class Watched:
    """A DockerEngine polling in its own thread, its log lines kept."""

    def __init__(self, path):
        self.lines = []
        self.engine = lpd.DockerEngine(path, lambda level, msg: self.lines.append(msg))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.engine.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.engine.wake()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the poller did not stop"

    def name(self, ip):
        return self.engine.name_of(ipaddress.ip_address(ip).packed)


@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory() as d:
        yield d


@contextlib.contextmanager
def watching(sock_dir, *containers, sock="docker.sock", version_header=("Api-Version", "1.41")):
    """An Engine on sock_dir/sock listing `containers` and a Watched client of it: (engine,
    client); the client closed, then the engine stopped, however the block ends."""
    eng = Engine(os.path.join(sock_dir, sock), version_header)
    eng.containers = list(containers)
    w = Watched(eng.path)
    try:
        yield eng, w
    finally:
        w.close()
        eng.stop()


# --- pure parts ---------------------------------------------------------------------------

def test_listing_maps_every_address_of_every_network():
    body = json.dumps([summary("web1", ["172.17.0.2", "fd00:1::2", "10.5.0.7"]),
                       summary("db", ["172.17.0.3"], image="postgres:16"),
                       {"Id": "h" * 64, "Names": ["/hostnet"], "Image": "x",
                        "NetworkSettings": {"Networks": {"host": {"IPAddress": "",
                                                                  "GlobalIPv6Address": ""}}}}])
    table = lpd.parse_containers(body.encode())
    named = {str(ipaddress.ip_address(raw)): (c.name, c.image) for raw, c in table.items()}
    assert named == {"172.17.0.2": ("web1", "lpdtest/bb:1"), "fd00:1::2": ("web1", "lpdtest/bb:1"),
                     "10.5.0.7": ("web1", "lpdtest/bb:1"), "172.17.0.3": ("db", "postgres:16")}


def test_the_name_is_the_one_without_a_link_path():
    assert lpd.container_name(["/app/db", "/db"], "c" * 64) == "db"
    assert lpd.container_name(["/web"], "c" * 64) == "web"
    assert lpd.container_name([], "0123456789abcdef" * 4) == "0123456789ab"
    assert lpd.container_name(None, "0123456789abcdef" * 4) == "0123456789ab"


@pytest.mark.parametrize("body, reason", [
    (b"[", "invalid JSON"), (b"{}", "expected a JSON array"), (b"[1]", "without an Id"),
    (b"[" * 100000, "invalid JSON"),
    (json.dumps([summary("w", ["300.1.2.3"])]).encode(), "is not an address"),
])
def test_garbage_listings_are_one_clear_error(body, reason):
    with pytest.raises(lpd.DockerError, match=reason):
        lpd.parse_containers(body)


def test_odd_fields_are_skipped_not_fatal():
    body = json.dumps([{"Id": "a" * 64, "Names": "/x", "Image": 5, "NetworkSettings": None},
                       {"Id": "b" * 64, "NetworkSettings": {"Networks": {"n": "junk"}}}])
    assert lpd.parse_containers(body.encode()) == {}


@pytest.mark.parametrize("header, version", [
    ("1.41", (1, 41)), ("1.51", (1, 44)), ("1.24", (1, 24)), (None, (1, 41)), (" 1.43 ", (1, 43))])
def test_api_version_is_the_engines_at_most_1_44(header, version):
    assert lpd.docker_api_version(header) == version


def test_a_garbage_version_is_an_error():
    with pytest.raises(lpd.DockerError):
        lpd.docker_api_version("latest")


# --- against an engine on a unix socket ----------------------------------------------------

def test_names_follow_events_and_stopped_ones_linger(sock_dir):
    with watching(sock_dir, summary("web1", ["172.17.0.2"])) as (eng, w):
        assert wait_for(lambda: w.name("172.17.0.2") == "web1")
        assert w.engine.up and w.engine.api_version == (1, 41)
        assert any("/events?filters=" in r and r.startswith("/v1.41/") for r in eng.requests)
        # a new container, told by the stream: seen long before the periodic refresh
        eng.containers = [summary("web1", ["172.17.0.2"]), summary("web2", ["172.17.0.3"])]
        t0 = time.monotonic()
        eng.event("container", "start")
        assert wait_for(lambda: w.name("172.17.0.3") == "web2", 3)
        assert time.monotonic() - t0 < 2
        # web1 stops: gone from the running map at once, its address keeps the name
        eng.containers = [summary("web2", ["172.17.0.3"])]
        eng.event("container", "die")
        raw1 = ipaddress.ip_address("172.17.0.2").packed
        assert wait_for(lambda: raw1 not in w.engine.current, 3)
        assert w.name("172.17.0.2") == "web1"
        # ... until another container takes the address
        eng.containers = [summary("web2", ["172.17.0.3"]), summary("web3", ["172.17.0.2"])]
        eng.event("network", "connect")
        assert wait_for(lambda: w.name("172.17.0.2") == "web3", 3)
        # irrelevant events do not re-list
        n = sum(r.endswith("/containers/json") for r in eng.requests)
        eng.event("container", "exec_start")
        eng.event("image", "pull")
        time.sleep(0.6)
        assert sum(r.endswith("/containers/json") for r in eng.requests) == n
    assert w.lines == []


def test_a_lingering_name_expires(sock_dir, monkeypatch):
    monkeypatch.setattr(lpd, "DOCKER_KEEP", 0.5)
    with watching(sock_dir, summary("web1", ["172.17.0.2"])) as (eng, w):
        assert wait_for(lambda: w.name("172.17.0.2") == "web1")
        eng.containers = []
        eng.event("container", "destroy")
        assert wait_for(lambda: not w.engine.current, 3)
        time.sleep(0.7)
        eng.event("container", "destroy")           # the next list drops the old name
        assert wait_for(lambda: w.name("172.17.0.2") == "", 3)


def test_engine_down_keeps_names_logs_once_and_recovers(sock_dir):
    with watching(sock_dir, summary("web1", ["172.17.0.2"])) as (eng, w):
        assert wait_for(lambda: w.name("172.17.0.2") == "web1")
        eng.stop()                                   # the engine dies: its stream ends
        assert wait_for(lambda: not w.engine.up, 3)
        errors = w.engine.errors
        assert wait_for(lambda: w.engine.errors >= errors + 2, 8), "no retries while down"
        assert w.name("172.17.0.2") == "web1"        # the last good names stay
        warnings = [m for m in w.lines if eng.path in m]
        assert len(warnings) == 1 and "keeping the last good names" in warnings[0], w.lines
        # the engine comes back (upgraded: it speaks 1.43 now), with a change made meanwhile
        eng.start(("Api-Version", "1.43"))
        eng.containers = [summary("web1", ["172.17.0.9"])]
        assert wait_for(lambda: w.name("172.17.0.9") == "web1", 8)
        assert w.engine.up and w.engine.api_version == (1, 43)
        assert any(r.startswith("/v1.43/containers/json") for r in eng.requests)
        assert "answering again" in w.lines[-1] and len(w.lines) == 2, w.lines
        # and it follows events again
        eng.containers.append(summary("web2", ["172.17.0.10"]))
        eng.event("container", "start")
        assert wait_for(lambda: w.name("172.17.0.10") == "web2", 3)


def test_no_engine_is_one_line_and_no_names(sock_dir):
    path = os.path.join(sock_dir, "docker.sock")
    w = Watched(path)
    try:
        assert wait_for(lambda: w.engine.errors >= 2, 5)
        assert w.name("172.17.0.2") == "" and not w.engine.up
        assert len(w.lines) == 1 and "no engine" in w.lines[0] and path in w.lines[0], w.lines
        eng = Engine(path)                             # an engine that starts later is found
        eng.containers = [summary("late", ["172.17.0.4"])]
        assert wait_for(lambda: w.name("172.17.0.4") == "late", 8)
    finally:
        w.close()
        eng.stop()


@pytest.mark.parametrize("mode, reason", [("garbage", "invalid JSON"), ("500", "engine on fire"),
                                          ("huge", "answer over"), ("drip", "within 5 s")])
def test_a_misbehaving_engine_keeps_the_last_good_names(sock_dir, mode, reason):
    with watching(sock_dir, summary("web1", ["172.17.0.2"])) as (eng, w):
        assert wait_for(lambda: w.name("172.17.0.2") == "web1")
        eng.mode = mode
        eng.containers = [summary("other", ["172.17.0.2"])]
        eng.event("container", "rename")
        assert wait_for(lambda: not w.engine.up, lpd.DOCKER_TIMEOUT + 3)
        assert w.name("172.17.0.2") == "web1"
        assert len(w.lines) == 1 and reason in w.lines[0], w.lines
        eng.mode = "ok"
        assert wait_for(lambda: w.name("172.17.0.2") == "other", 10)
        assert w.engine.up


def test_podman_spelling(sock_dir):
    """podman says API-Version, removes with `remove`, and names the container in
    network events; the same client works."""
    with watching(sock_dir, summary("pod1", ["10.88.0.2"]), sock="podman.sock",
                  version_header=("API-Version", "1.41")) as (eng, w):
        assert wait_for(lambda: w.name("10.88.0.2") == "pod1")
        eng.containers = []
        eng.event("container", "remove")
        assert wait_for(lambda: not w.engine.current, 3)


def test_a_hostile_event_stream_is_survived(sock_dir):
    with watching(sock_dir, summary("web1", ["172.17.0.2"])) as (eng, w):
        assert wait_for(lambda: w.name("172.17.0.2") == "web1")
        eng.containers = [summary("web2", ["172.17.0.2"])]
        for q in eng.streams:
            q.put(b"\xff not json at all\n")             # unreadable: re-list to be sure
        assert wait_for(lambda: w.name("172.17.0.2") == "web2", 3)
        eng.containers = [summary("web3", ["172.17.0.2"])]
        for q in eng.streams:                            # a line over the bound: reconnect
            q.put(b"x" * (lpd.DOCKER_EVENT_MAX_BYTES + 10))
        assert wait_for(lambda: w.name("172.17.0.2") == "web3", 5)
        assert w.engine.up


def test_metrics_and_api_document(sock_dir):
    with watching(sock_dir, summary("web1", ["172.17.0.2", "fd00:1::2"]),
                  summary("db", ["172.17.0.3"], image="pg:16")) as (eng, w):
        assert wait_for(lambda: len(w.engine.current) == 3)
        published = lpd.Published()
        published.publish({"time": 1.0})
        c = lpd.Collector(published, lpd.NicMapping(None, "eth0", lambda *a: None), "eth0",
                          docker=w.engine)
        fams = {f.name: f for f in c.collect()}
        info = {tuple(sorted(s.labels.items())) for s in fams["lpd_container_info"].samples}
        assert info == {(("container", n), ("image", i), ("local_ip", ip)) for ip, n, i in
                        (("172.17.0.2", "web1", "lpdtest/bb:1"), ("fd00:1::2", "web1", "lpdtest/bb:1"),
                         ("172.17.0.3", "db", "pg:16"))}
        assert fams["lpd_docker_up"].samples[0].value == 1
        assert fams["lpd_docker_last_success_timestamp_seconds"].samples[0].value > 0
        doc = lpd.containers_document(published.latest(), c.presentation())
        assert doc["engine"] == {"socket": eng.path, "up": True, "errors": 0,
                                 "api_version": "1.41"}
        assert [r["container"] for r in doc["containers"]] == ["db", "web1", "web1"]
        assert doc["containers"][0] == {"ip": "172.17.0.3", "container": "db", "image": "pg:16",
                                        "id": summary("db", [])["Id"]}
    assert lpd.containers_document({}, lpd.Presentation("eth0", None, None, 0)) is None


def exchange(stage, client, server, request, response, ts=1.0):
    """One HTTP exchange on a fresh connection, frame by frame into the stage."""
    from packets import ETH_IP, PROTO_TCP, TCP_ACK, TCP_SYN, ether, ipv4, tcp
    A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
    push = TCP_ACK | 0x08

    def frame(src, dst, sport, dport, flags, seq, ack, payload=b""):
        return ether(A, B, ETH_IP, ipv4(src, dst, PROTO_TCP, tcp(sport, dport, flags, seq, ack,
                                                                    payload=payload)))
    for i, f in enumerate((frame(client, server, 40000, 80, TCP_SYN, 100, 0),
                           frame(server, client, 80, 40000, TCP_SYN | TCP_ACK, 500, 101),
                           frame(client, server, 40000, 80, push, 101, 501, request),
                           frame(server, client, 80, 40000, push, 501, 101 + len(request), response))):
        stage.packet(f, ts + i * 0.001)


def test_the_http_stage_names_servers_by_container():
    """A server address the engine names groups its requests under the name."""
    names = {ipaddress.ip_address("10.199.0.1").packed: "web1"}
    records = []
    stage = lpd.HttpRequests([80], records.append, lambda raw: names.get(raw, ""))
    for server in ("10.199.0.1", "10.199.0.2"):
        exchange(stage, "10.199.0.9", server, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    stage.finish()
    assert [(r["id.resp_h"], r["container"]) for r in records] == \
        [("10.199.0.1", "web1"), ("10.199.0.2", "")]
    assert sorted(srv for srv, _ in stage.snapshot().recent) == ["10.199.0.2:80", "web1"]
    labels = {k[-1] for k, *_ in stage.snapshot().histogram}
    assert labels == {"web1", ""}


def test_options():
    assert lpd.parse_args(["--http"]).docker_socket is None
    opts = lpd.parse_args(["--http", "--docker-socket", "/run/podman/podman.sock"])
    assert lpd.open_docker(opts).socket_path == "/run/podman/podman.sock"
    assert lpd.open_docker(lpd.parse_args(["--http"])).socket_path == lpd.DOCKER_SOCKET
    assert lpd.open_docker(lpd.parse_args(["--http", "--docker-socket", "none"])) is None
    assert lpd.open_docker(lpd.parse_args([])) is None                      # no HTTP: no names
    assert lpd.open_docker(lpd.parse_args(["-r", "x.pcap", "--http"]), replaying=True) is None
