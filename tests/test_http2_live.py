"""HTTP/2 in clear text (h2c) and gRPC on a running lpd (issue 28; the contract: README's
HTTP/2 and gRPC section): real servers and clients between the two namespaces of a
netns.Pair, lpd in ns_b on veth-b (`--http --http-ports 8080,8081,8082,50051 --http-log`),
under prlimit --as.

Servers in ns_a, started here and stopped by PID (netns.Pair.popen):
- nginx (Debian's, its own prefix and config in a temp dir, one process): port 8080
  `listen ... http2` (h2c with prior knowledge only), port 8081 plain HTTP/1.1, one server
  block; static files /empty (0 B), /five (5 B), /big (100,000 B: many DATA frames and
  segments), a 404 with a 13-byte page, and PUT /upload/note (WebDAV: nginx reads the
  whole 20,000-byte request body before it answers 201).
- a small Python server on the `h2` library, port 8082: HTTP/1.1 with `Upgrade: h2c`
  answered 101, the upgraded request answered on stream 1, then more streams.

Clients in ns_b: nghttp (prior knowledge, four requests on one connection: streams after
nghttp's PRIORITY frames for idle streams), curl --http2-prior-knowledge (one request,
and the PUT; Debian 12's curl 7.88.1 cannot reuse a prior-knowledge connection for a
second URL, whatever the server: exit 16, "Error in the HTTP2 framing layer" before it sends
the second request; so multi-stream prior knowledge is nghttp's), curl --http2
(h2c Upgrade, two URLs: stream 1 then stream 3), nghttp -u (Upgrade, then stream 13),
curl HTTP/1.1 on 8081 with and without an Upgrade header nginx ignores (still "1.1"),
h2load -n 200 -c 2 -m 10 (two connections, ten streams at a time, /five and /missing),
grpcio's client and server (port 50051, one channel: two unary calls, one aborted
NOT_FOUND with a message that needs percent-encoding, one server-streaming call);
then the 2024 CONTINUATION flood (our own socket: the preface, SETTINGS, a HEADERS
without END_HEADERS and FLOOD_FRAMES CONTINUATION frames, ~16 MB, which nginx reads and
discards) and one more curl request on a new connection.

Before lpd starts, an h2-library client opens a prior-knowledge connection to nginx and
makes MID_BEFORE's request; after, MID_AFTER's on the same connection (lpd joins it).

Checked, for each run (offloads off/on x engine cbpf/auto, as test_http_live):
- every request is logged once, with version "2" (or "1.1" on 8081), method, host, uri,
  status_code, request/response_body_len (= the file sizes, the PUT body), stream_id and
  trans_depth (the ordinal of its HEADERS on the connection);
- the oracle: tcpdump captures the same traffic on veth-b (the flood's connection aside)
  and tshark's http2 (and http) dissector gives (connection, ordinal, stream, method, path,
  authority, status, version, grpc-status, grpc-message); lpd's records equal it exactly;
- gRPC: rpc_method, grpc_status, grpc_message (decoded), request/response_messages and
  the bodies' bytes (5-byte prefixes included) per call; rpc_server_call_duration_seconds by
  method and status name, lpd_rpc_messages_total each way, none in the HTTP histogram;
- the joined connection: stream ids, statuses, sizes; "_OTHER" for a path sent as a
  reference to an HPACK entry made before lpd joined, the others read; hpack_unknown;
- `lpd -r CAPTURE` with the same options logs the same records (times within TIME_SLACK);
  the joined connection whole, as tshark;
- http_server_request_duration_seconds counts every request under its
  network_protocol_version, h2load's 200 among them with their status;
- the flood: lpd stays up under prlimit, its RSS and peak RSS (VmHWM) grow by less than
  FLOOD_RSS_MAX_KIB (it reaches the wire: veth-b's tx_bytes),
  lpd_http_parse_errors_total{reason="h2_header_block_too_large"} counts it, no other
  parse error is counted on the run (but the joined connection's hpack_unknown), the
  request after it is logged; lpd exits 0.
Every wait is bounded; a missing tool or namespace fails the fixture (no skips).
"""
import collections
import itertools
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

import netns
from harness import LPD, Lpd, metrics, read_log, strip, value, wait_for

pytestmark = pytest.mark.live

H2_PORT, H1_PORT, UP_PORT = 8080, 8081, 8082          # nginx h2c, nginx HTTP/1.1, h2 Upgrade
GRPC_PORT = 50051                                      # grpcio's server
PORTS = f"{H2_PORT},{H1_PORT},{UP_PORT},{GRPC_PORT}"
FILES = {"/empty": 0, "/five": 5, "/big": 100_000}
NOT_FOUND = b"no such file\n"                          # both servers' 404 page (13 bytes)
PUT_LEN = 20_000
SPORT0 = 31000                                         # curl's source ports
INTERVAL = 0.5
H2LOAD_N, H2LOAD_C, H2LOAD_M = 200, 2, 10
FLOOD_FRAMES = 18_000                                  # CONTINUATION frames of ~904 B: ~16 MB
FLOOD_RSS_MAX_KIB = 4096                               # lpd's RSS growth over the flood
AS_LIMIT = 1_000_000_000                               # prlimit --as for lpd (bytes; VmPeak ~300 MB)
TIME_SLACK = 0.01                                      # s: live vs replayed ts/ttfb/duration
TOOL_TIMEOUT = 30
TCPDUMP_BUFFER_KIB = 131072                            # h2load's bursts; the flood is not captured
MID_SPORT = 31900                                      # the connection lpd joins mid-way
MID_BEFORE, MID_AFTER = ("/five",), ("/big", "/five", "/missing")   # before / after lpd starts
FLOOD_SPORT = 31999                                    # the flood's source port (not captured)
FLOOD_WIRE_MIN = 8_000_000                             # bytes veth-b must have sent during the flood
HIST = "http_server_request_duration_seconds"
KEEP = os.environ.get("LPD_H2_KEEP")                   # a directory: keep captures and logs

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type text/plain;
    server {{
        listen {ip}:{h2} http2;
        listen {ip}:{h1};
        root {tmp}/www;
        error_page 404 /err404.txt;
        location = /err404.txt {{ internal; }}
        location /upload/ {{ dav_methods PUT; client_max_body_size 1m; }}
    }}
}}
"""

# HTTP/1.1 with Upgrade: h2c -> 101, the request answered on stream 1, then HTTP/2.
UPGRADE_SERVER = r"""
import socket, sys, threading
import h2.config, h2.connection, h2.events
BODIES = {"/empty": b"", "/five": b"hello", "/big": b"b" * 100_000}
NOT_FOUND = b"no such file\n"

class Conn:
    def __init__(self, sock):
        self.sock, self.pending = sock, {}

    def answer(self, sid, path):
        body = BODIES.get(path)
        status = "200" if body is not None else "404"
        body = NOT_FOUND if body is None else body
        self.h2.send_headers(sid, [(":status", status), ("content-length", str(len(body))),
                                   ("content-type", "text/plain")], end_stream=not body)
        if body:
            self.pending[sid] = body
        self.pump()

    def pump(self):
        for sid, body in list(self.pending.items()):
            while body:
                n = min(len(body), self.h2.local_flow_control_window(sid),
                        self.h2.max_outbound_frame_size)
                if n <= 0:
                    break
                self.h2.send_data(sid, body[:n], end_stream=n == len(body))
                body = body[n:]
            if body:
                self.pending[sid] = body
            else:
                del self.pending[sid]
        self.sock.sendall(self.h2.data_to_send())

    def run(self):
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = self.sock.recv(65536)
            if not d:
                return
            buf += d
        head, rest = buf.split(b"\r\n\r\n", 1)
        line, *fields = head.decode("latin-1").split("\r\n")
        method, path, _ = line.split(" ")
        hdr = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
        if hdr.get("upgrade", "").lower() != "h2c" or "http2-settings" not in hdr:
            body = BODIES.get(path, NOT_FOUND)
            code = b"200 OK" if path in BODIES else b"404 Not Found"
            self.sock.sendall(b"HTTP/1.1 " + code + b"\r\nContent-Length: %d\r\n"
                              b"Connection: close\r\n\r\n" % len(body) + body)
            return
        self.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                          b"Upgrade: h2c\r\n\r\n")
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.h2.initiate_upgrade_connection(hdr["http2-settings"])
        self.answer(1, path)
        data = rest
        while True:
            for ev in self.h2.receive_data(data) if data else ():
                if isinstance(ev, h2.events.RequestReceived):
                    h = {(k.decode() if isinstance(k, bytes) else k):
                         (v.decode() if isinstance(v, bytes) else v) for k, v in ev.headers}
                    self.answer(ev.stream_id, h[":path"])
                elif isinstance(ev, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.sock.sendall(self.h2.data_to_send())
                    return
            self.pump()
            data = self.sock.recv(65536)
            if not data:
                return

def serve(sock):
    try:
        Conn(sock).run()
    except OSError:
        pass
    finally:
        sock.close()

srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(16)
print("ready", flush=True)
while True:
    s, _ = srv.accept()
    threading.Thread(target=serve, args=(s,), daemon=True).start()
"""

# grpcio's server: a generic handler, bytes in and out (no generated code).
GRPC_SERVER = r"""
import sys
from concurrent import futures
import grpc
def say(req, ctx):
    return req[::-1]
def fail(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing: \u00fc 100%")
def stream(req, ctx):
    for i in range(3):
        yield req + bytes([i])
same = lambda b: b
handler = grpc.method_handlers_generic_handler("lpd.test.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(say, same, same),
    "Fail": grpc.unary_unary_rpc_method_handler(fail, same, same),
    "Stream": grpc.unary_stream_rpc_method_handler(stream, same, same)})
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(f"{sys.argv[1]}:{sys.argv[2]}")
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""

# One channel (one connection), four calls in turn: what each returned, as JSON.
GRPC_CLIENT = r"""
import json, sys
import grpc
out = []
with grpc.insecure_channel(f"{sys.argv[1]}:{sys.argv[2]}") as ch:
    say = ch.unary_unary("/lpd.test.Echo/Say")
    fail = ch.unary_unary("/lpd.test.Echo/Fail")
    stream = ch.unary_stream("/lpd.test.Echo/Stream")
    out.append(["Say", len(say(b"hello", timeout=5))])
    out.append(["Say", len(say(b"x" * 3000, timeout=5))])
    try:
        fail(b"?", timeout=5)
        out.append(["Fail", "OK"])
    except grpc.RpcError as e:
        out.append(["Fail", e.code().name, e.details()])
    out.append(["Stream", [len(m) for m in stream(b"ab", timeout=5)]])
print(json.dumps(out))
"""
GRPC_MESSAGE = "no such thing: \u00fc 100%"          # percent-encoded on the wire
# (rpc method, request payload, response payloads, grpc status, grpc message) per call
GRPC_CALLS = (("lpd.test.Echo/Say", 5, (5,), 0, None),
              ("lpd.test.Echo/Say", 3000, (3000,), 0, None),
              ("lpd.test.Echo/Fail", 1, (), 5, GRPC_MESSAGE),
              ("lpd.test.Echo/Stream", 2, (3, 3, 3), 0, None))
GRPC_PREFIX = 5                                        # a message's flag and length


def size(uri):
    return FILES.get(uri, len(NOT_FOUND))


def status_of(uri):
    return 200 if uri in FILES else 404


def record(sport, dport, depth, method, host, uri, status, req_len, resp_len, version,
           stream_id=None):
    rec = {"id.orig_h": netns.IP4_B, "id.orig_p": sport, "id.resp_h": netns.IP4_A,
           "id.resp_p": dport, "trans_depth": depth, "method": method, "host": host, "uri": uri,
           "status_code": status, "request_body_len": req_len, "response_body_len": resp_len,
           "container": "", "version": version}
    if stream_id is not None:
        rec["stream_id"] = stream_id
    return rec


def rec_key(rec):
    return (rec["id.orig_p"], rec["id.resp_p"], rec["trans_depth"])


class Run:
    def __init__(self, pair, offloads, engine, tmp):
        self.pair, self.offloads, self.engine, self.tmp = pair, offloads, engine, tmp
        self.sports = itertools.count(SPORT0)
        self.expected = []            # (scenario, record without times) for known source ports
        self.by_uri = {}              # scenario -> (server port, a uri only it asked for)
        self.sent = collections.Counter()   # (method, status, route, version, port): requests
        self.log, self.replayed, self.oracle, self.metrics = [], [], [], {}
        self.h2load_out = ""
        self.oracle_problems = []
        self.flood_sport = FLOOD_SPORT
        self.flood_bytes = 0          # CONTINUATION bytes the flood client handed the kernel
        self.flood_wire = 0           # veth-b's tx_bytes over the flood (the kernel's count)
        self.rss = {}                 # "before"/"after" the flood: (VmRSS, VmHWM) KiB
        self.alive_after_flood = None
        self.mid, self.mid_sent = None, []     # the joined connection: (stream id, path) sent
        self.drops_before_flood = None    # lpd's capture drops then (the flood may overrun the ring)
        self.tcpdump_err = ""
        self.exit_code, self.stderr = None, ""

    def count(self, method, uri, status, version, port, n=1):
        self.sent[(method, str(status), uri.split("?")[0], version, str(port))] += n

    def records(self, sport):
        return [r for r in self.log if r["id.orig_p"] == sport]


# --- servers and clients ----------------------------------------------------------------

def start_nginx(pair, tmp):
    www = tmp / "www"
    (www / "upload").mkdir(parents=True)
    for uri, n in FILES.items():
        (www / uri[1:]).write_bytes(b"x" * n if uri != "/five" else b"hello")
    (www / "err404.txt").write_bytes(NOT_FOUND)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, ip=pair.ip4_a, h2=H2_PORT, h1=H1_PORT))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = pair.popen(pair.ns_a, [nginx, "-p", str(tmp), "-c", str(conf)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_port(pair, H2_PORT, p, "nginx")
    wait_port(pair, H1_PORT, p, "nginx")
    return p


def start_upgrade_server(pair):
    p = pair.popen(pair.ns_a, [sys.executable, "-c", UPGRADE_SERVER, pair.ip4_a, str(UP_PORT)],
                   stdout=subprocess.PIPE, text=True)
    wait_port(pair, UP_PORT, p, "the h2c Upgrade server")
    return p


def wait_port(pair, port, proc, what, timeout=10):
    def up():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}")
        s = netns.socket_in(pair.ns_b, socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1)
        try:
            s.connect((pair.ip4_a, port))
            return True
        except OSError:
            return False
        finally:
            s.close()
    wait_for(up, timeout, 0.05, what=f"{what} on port {port}")


def tool(pair, argv, timeout=TOOL_TIMEOUT):
    """A client in ns_b: its stdout; a non-zero exit fails the run with its stderr."""
    return pair.run(pair.ns_b, argv, timeout=timeout).stdout


def url(port, path):
    return f"http://{netns.IP4_A}:{port}{path}"


CURL_W = "%{http_version} %{http_code} %{size_download}\\n"


def curl(run, args, urls):
    """curl from a known source port: [(version, status, body bytes)] per URL."""
    sport = next(run.sports)
    argv = ["curl", "-sS", "--max-time", "10", "--local-port", str(sport), "-w", CURL_W]
    for u in urls:
        argv += ["-o", "/dev/null", u]
    out = tool(run.pair, argv[:1] + list(args) + argv[1:])
    rows = [line.split() for line in out.splitlines()]
    return sport, [(v, int(c), int(n)) for v, c, n in rows]


# --- the scenarios ------------------------------------------------------------------------

def scenario_nghttp(run):
    """Prior knowledge, four requests on one connection (nghttp: source port unknown, its
    stream ids after PRIORITY frames on idle streams; found in the log by /big on 8080)."""
    out = tool(run.pair, ["nghttp", "-n", "-s", "-t", "10"]
               + [url(H2_PORT, u) for u in ("/five", "/big", "/empty", "/missing")])
    rows = [line.split() for line in out.splitlines()]
    got = sorted((int(t[4]), t[-1]) for t in rows if len(t) == 7 and t[0].isdigit())
    assert got == sorted((status_of(u), u) for u in ("/five", "/big", "/empty", "/missing")), out
    run.by_uri["nghttp"] = (H2_PORT, "/big", ("/five", "/big", "/empty", "/missing"))
    for u in ("/five", "/big", "/empty", "/missing"):
        run.count("GET", u, status_of(u), "2", H2_PORT)


def scenario_single(run):
    sport, got = curl(run, ["--http2-prior-knowledge"], [url(H2_PORT, "/five")])
    assert got == [("2", 200, 5)], got
    run.expected.append(("single", record(sport, H2_PORT, 1, "GET", f"{netns.IP4_A}:{H2_PORT}",
                                          "/five", 200, 0, 5, "2", 1)))


def scenario_put(run):
    body = run.tmp / "put.bin"
    body.write_bytes(bytes(range(256)) * (PUT_LEN // 256) + b"p" * (PUT_LEN % 256))
    sport, got = curl(run, ["--http2-prior-knowledge", "-X", "PUT", "--data-binary", f"@{body}"],
                      [url(H2_PORT, "/upload/note")])
    assert [(v, c) for v, c, _ in got] == [("2", 201)], got
    run.expected.append(("put", record(sport, H2_PORT, 1, "PUT", f"{netns.IP4_A}:{H2_PORT}",
                                       "/upload/note", 201, PUT_LEN, got[0][2], "2", 1)))


def scenario_upgrade(run):
    """curl --http2: GET /five with Upgrade: h2c (stream 1 after the 101), then /big on
    stream 3 of the same connection."""
    sport, got = curl(run, ["--http2"], [url(UP_PORT, "/five"), url(UP_PORT, "/big")])
    assert got == [("2", 200, 5), ("2", 200, FILES["/big"])], got
    host = f"{netns.IP4_A}:{UP_PORT}"
    run.expected += [("upgrade", record(sport, UP_PORT, 1, "GET", host, "/five", 200, 0, 5, "2", 1)),
                     ("upgrade", record(sport, UP_PORT, 2, "GET", host, "/big", 200, 0,
                                        FILES["/big"], "2", 3))]


def scenario_nghttp_upgrade(run):
    out = tool(run.pair, ["nghttp", "-u", "-n", "-s", "-t", "10", url(UP_PORT, "/empty"),
                          url(UP_PORT, "/nope")])
    assert " 404 " in out and "/nope" in out and "/empty" in out, out
    run.by_uri["nghttp-u"] = (UP_PORT, "/nope", ("/empty", "/nope"))
    for u in ("/empty", "/nope"):
        run.count("GET", u, status_of(u), "2", UP_PORT)


def scenario_http11(run):
    """nginx's HTTP/1.1 port: plain, then with an Upgrade: h2c nginx ignores (no 101)."""
    host = f"{netns.IP4_A}:{H1_PORT}"
    for name, args, uris in (("http11", ["--http1.1"], ("/five", "/big")),
                             ("http11-upgrade-ignored", ["--http2"], ("/empty", "/missing"))):
        sport, got = curl(run, args, [url(H1_PORT, u) for u in uris])
        assert got == [("1.1", status_of(u), size(u)) for u in uris], (name, got)
        run.expected += [(name, record(sport, H1_PORT, i, "GET", host, u, status_of(u), 0, size(u),
                                       "1.1")) for i, u in enumerate(uris, 1)]


def scenario_grpc(run):
    """grpcio's client and server on one connection (source port unknown: found in the log
    by its Fail call)."""
    out = tool(run.pair, [sys.executable, "-c", GRPC_CLIENT, run.pair.ip4_a, str(GRPC_PORT)])
    assert json.loads(out) == [["Say", 5], ["Say", 3000], ["Fail", "NOT_FOUND", GRPC_MESSAGE],
                               ["Stream", [3, 3, 3]]], out


def scenario_h2load(run):
    out = tool(run.pair, ["h2load", "-n", str(H2LOAD_N), "-c", str(H2LOAD_C), "-m", str(H2LOAD_M),
                          url(H2_PORT, "/five"), url(H2_PORT, "/missing")], timeout=60)
    run.h2load_out = out
    assert f"{H2LOAD_N} done" in out, out
    assert f"status codes: {H2LOAD_N // 2} 2xx, 0 3xx, {H2LOAD_N // 2} 4xx, 0 5xx" in out, out
    run.count("GET", "/five", 200, "2", H2_PORT, H2LOAD_N // 2)        # h2load takes the URIs in turn
    run.count("GET", "/missing", 404, "2", H2_PORT, H2LOAD_N // 2)


def frame(ftype, flags, sid, payload):
    return struct.pack("!I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack("!I", sid) + payload


def scenario_flood(run, lpd):
    """The CONTINUATION flood on one connection to nginx, then lpd must have counted it."""
    time.sleep(2 * INTERVAL)                          # the drops so far are published by now
    run.rss["before"] = mem(lpd.proc.pid)
    run.drops_before_flood = value(metrics(run.pair), "lpd_capture_drops_total", worker="0",
                                   nic=run.pair.if_b)
    sport = run.flood_sport
    tx0 = run.pair.link_stats(run.pair.ns_b, run.pair.if_b)["tx_bytes"]
    s = netns.socket_in(run.pair.ns_b, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.bind(("0.0.0.0", sport))
    s.connect((run.pair.ip4_a, H2_PORT))
    head = (b"\x82\x86\x44\x06/flood\x41\x05flood")   # :method GET, :scheme http, :path, :authority
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
              + frame(1, 0x1, 1, head))             # END_STREAM, no END_HEADERS
    try:
        for i in range(FLOOD_FRAMES):
            name, val = b"x-pad-%05d" % i, b"v" * 100
            field = b"\x00" + bytes([len(name)]) + name + bytes([len(val)]) + val
            payload = field * 8
            s.sendall(frame(9, 0, 1, payload))          # CONTINUATION, no END_HEADERS
            run.flood_bytes += 9 + len(payload)
    except OSError:
        pass                                            # nginx may reset: veth-b says how much went
    finally:
        s.close()
    def counted():
        if lpd.proc.poll() is not None:
            return True
        try:
            m = metrics(run.pair)
        except netns.NetnsError:
            return False
        return (value(m, "lpd_http_parse_errors_total", reason="h2_header_block_too_large") or 0) >= 1
    wait_for(counted, 15, 0.2)
    run.flood_wire = run.pair.link_stats(run.pair.ns_b, run.pair.if_b)["tx_bytes"] - tx0
    run.alive_after_flood = lpd.proc.poll() is None
    run.rss["after"] = mem(lpd.proc.pid) if run.alive_after_flood else None
    assert run.alive_after_flood, f"lpd exited {lpd.proc.returncode} during the flood"


class H2Client:
    """One prior-knowledge connection from ns_b on the h2 library (its HPACK indexes every
    field: a value sent again is a dynamic-table reference), requests one at a time."""

    def __init__(self, pair, sport, port):
        import h2.config
        import h2.connection
        self.sock = netns.socket_in(pair.ns_b, socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.bind(("0.0.0.0", sport))
        self.sock.connect((pair.ip4_a, port))
        self.authority = f"{pair.ip4_a}:{port}"
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.sock.sendall(self.h2.data_to_send())

    def get(self, path):
        """(stream id, :status, body bytes) of one GET."""
        import h2.events
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":path", path),
                                   (":authority", self.authority)], end_stream=True)
        self.sock.sendall(self.h2.data_to_send())
        status, body = None, 0
        while True:
            data = self.sock.recv(65536)
            assert data, "the server closed the connection"
            for ev in self.h2.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += len(ev.data)
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    self.sock.sendall(self.h2.data_to_send())
                    return sid, status, body
            self.sock.sendall(self.h2.data_to_send())

    def close(self):
        self.h2.close_connection()
        self.sock.sendall(self.h2.data_to_send())
        self.sock.close()


def scenario_mid_before(run):
    """Before lpd starts: the connection, its preface and SETTINGS, and its first request."""
    run.mid = H2Client(run.pair, MID_SPORT, H2_PORT)
    for path in MID_BEFORE:
        assert run.mid.get(path)[1:] == (status_of(path), size(path))


def scenario_mid_after(run):
    """lpd joins: the next requests on the same connection."""
    for path in MID_AFTER:
        sid, status, body = run.mid.get(path)
        assert (status, body) == (status_of(path), size(path)), path
        run.mid_sent.append((sid, path))
    run.mid.close()


def scenario_after(run):
    sport, got = curl(run, ["--http2-prior-knowledge"], [url(H2_PORT, "/empty")])
    assert got == [("2", 200, 0)], got
    run.expected.append(("after", record(sport, H2_PORT, 1, "GET", f"{netns.IP4_A}:{H2_PORT}",
                                         "/empty", 200, 0, 0, "2", 1)))


def mem(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                fields[k] = int(v.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


# --- the oracle: tshark's http2/http dissectors on the capture ----------------------------

TSHARK_FIELDS = ("tcp.srcport", "tcp.dstport", "http2.type", "http2.streamid", "http2.header.count",
                 "http2.header_table_size_update.header_table_size", "http2.header.name",
                 "http2.header.value", "http.request.method",
                 "http.request.uri", "http.host", "http.response.code")
AGGREGATOR = "\x1e"             # between a field's occurrences (header values hold commas)


def tshark_oracle(cap):
    """([(orig_p, resp_p, ordinal, stream_id or None, method, uri, host, status, version,
    grpc_status, grpc_message)], problems) from the capture: each connection's requests in
    the order their heads were sent; an HTTP/2 request with its stream's first final :status
    and its grpc-status/grpc-message (trailers or trailers-only; None without), HTTP/1
    answers in order (1xx aside); an HTTP/1 request answered 101 is stream 1 of the HTTP/2
    that follows. Each HEADERS frame's fields are split off the flattened lists by
    http2.header.count; problems: the lines where the counts do not add up or a block has
    neither :method, :status nor grpc-status (tshark's HPACK lost its way: a frame missing).
    The flood's connection is not in the capture."""
    argv = ["tshark", "-r", str(cap), "-o", "tcp.desegment_tcp_streams:TRUE",
            "-d", f"tcp.port=={H2_PORT},http2", "-d", f"tcp.port=={GRPC_PORT},http2",
            "-d", f"tcp.port=={H1_PORT},http", "-d", f"tcp.port=={UP_PORT},http",
            "-Y", "http2.type==1 || http.request || http.response", "-T", "fields",
            "-E", "separator=\t", "-E", "occurrence=a", "-E", f"aggregator={AGGREGATOR}"]
    for f in TSHARK_FIELDS:
        argv += ["-e", f]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    servers = {H2_PORT, H1_PORT, UP_PORT, GRPC_PORT}
    conns = collections.defaultdict(lambda: {"reqs": [], "status": {}, "grpc": {},
                                             "h1_status": []})
    split = lambda v: v.split(AGGREGATOR) if v else []          # noqa: E731
    problems = []
    for line in filter(None, cp.stdout.split("\n")):     # not splitlines(): it splits at \x1e
        sp, dp, types, sids, counts, updates, names, values, hmeth, huri, hhost, hcode = \
            (line.split("\t") + [""] * 12)[:12]
        sp, dp = int(sp), int(dp)
        to_server = dp in servers
        c = conns[(sp, dp) if to_server else (dp, sp)]
        heads = [int(sid) for t, sid in zip(split(types), split(sids)) if t == "1"]
        counts, names, values = [int(n) for n in split(counts)], split(names), split(values)
        # header.count counts a block's dynamic table size updates too (they have no name):
        # they open a block, so they are taken from the first block of the line
        for k in range(len(counts)):
            if sum(counts) > len(names):
                counts[k] -= min(counts[k], sum(counts) - len(names), len(split(updates)))
        fields, at = [], 0
        for n in counts:
            fields.append(dict(zip(names[at:at + n], values[at:at + n])))
            at += n
        if len(counts) != len(heads) or sum(counts) != len(names) or len(names) != len(values) \
                or not all(f and (":method" in f or ":status" in f or "grpc-status" in f)
                           for f in fields):
            problems.append(line)
            continue
        if to_server:
            for m, u, h in zip(split(hmeth), split(huri), split(hhost)):
                c["reqs"].append([None, m, u, h])
            for sid, f in zip(heads, fields):
                if ":method" in f:                          # not a request's trailers
                    c["reqs"].append([sid, f[":method"], f.get(":path"), f.get(":authority")])
        else:
            for code in split(hcode):
                if code == "101":
                    c["reqs"][0][0] = 1                     # the upgraded request is stream 1
                elif not code.startswith("1"):
                    c["h1_status"].append(int(code))
            for sid, f in zip(heads, fields):
                if ":status" in f and not f[":status"].startswith("1"):
                    c["status"].setdefault(sid, int(f[":status"]))
                if "grpc-status" in f:
                    c["grpc"][sid] = (int(f["grpc-status"]),
                                      urllib.parse.unquote(f.get("grpc-message", "")) or None)
    out = []
    for (sport, dport), c in sorted(conns.items()):
        h1 = iter(c["h1_status"])
        for i, (sid, m, u, h) in enumerate(c["reqs"], 1):
            if sid is None:
                status, version = next(h1, 0), "1.1"
            else:
                status, version = c["status"].get(sid, 0), "2"
            out.append((sport, dport, i, sid, m, u, h, status, version,
                        *c["grpc"].get(sid, (None, None))))
    return out, problems


def as_oracle(rec):
    return (rec["id.orig_p"], rec["id.resp_p"], rec["trans_depth"], rec.get("stream_id"),
            rec["method"], rec["uri"], rec.get("host"), rec["status_code"], rec.get("version"),
            rec.get("grpc_status"), rec.get("grpc_message") or None)


def hist(m):
    """{(method, status, route, version, port): count} of the HTTP histogram."""
    out = {}
    for (name, labels), v in m.items():
        if name == HIST + "_count":
            d = dict(labels)
            out[(d["http_request_method"], d["http_response_status_code"], d["http_route"],
                 d.get("network_protocol_version"), d["server_port"])] = v
    return out


# --- the run ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[(False, "cbpf"), (True, "cbpf"), (False, "auto"), (True, "auto")],
                ids=["offloads-off-cbpf", "offloads-on-cbpf", "offloads-off-auto", "offloads-on-auto"])
def h2_run(request):
    offloads, engine = request.param
    for t in ("nginx", "curl", "nghttp", "h2load", "tshark", "tcpdump", "prlimit"):
        assert shutil.which(t) or Path("/usr/sbin", t).exists(), f"{t} is not installed"
    with tempfile.TemporaryDirectory() as tmpdir, netns.Pair(offloads=offloads) as pair:
        tmp = Path(tmpdir)
        run = Run(pair, offloads, engine, tmp)
        log, cap, replay_log = tmp / "http.json", tmp / "cap.pcap", tmp / "replay.json"
        start_nginx(pair, tmp / "nginx")
        start_upgrade_server(pair)
        grpc_server = pair.popen(pair.ns_a, [sys.executable, "-c", GRPC_SERVER, pair.ip4_a,
                                             str(GRPC_PORT)], stdout=subprocess.PIPE, text=True)
        wait_port(pair, GRPC_PORT, grpc_server, "the gRPC server")
        dump = netns.start_tcpdump(pair.ns_b, pair.if_b,
                                   ["-s", "0", "-B", str(TCPDUMP_BUFFER_KIB), "-w", str(cap),
                                    f"tcp and not port {FLOOD_SPORT}"])
        scenario_mid_before(run)
        lpd = Lpd(pair, "--mapping-url", "none", "--http", "--http-ports", PORTS,
                  "--http-log", str(log), "--interval", str(INTERVAL), "--engine", engine,
                  prefix=("prlimit", f"--as={AS_LIMIT}"))
        try:
            for scenario in (scenario_mid_after, scenario_nghttp, scenario_single, scenario_put,
                             scenario_upgrade, scenario_nghttp_upgrade, scenario_http11, scenario_grpc,
                             scenario_h2load):
                scenario(run)
            scenario_flood(run, lpd)
            scenario_after(run)
            n = len(run.expected) + 4 + 2 + len(GRPC_CALLS) + H2LOAD_N + len(MID_AFTER)
            last = run.expected[-1][1]["id.orig_p"]
            wait_for(lambda: (lambda recs: len(recs) >= n and any(r["id.orig_p"] == last for r in recs))(
                read_log(log, whole=False)), 10, 0.1)
            time.sleep(2 * INTERVAL)
            run.log = read_log(log)
            run.metrics = metrics(pair)
            run.rss["end"] = mem(lpd.proc.pid)      # VmHWM: the flood's peak, however late
        finally:
            time.sleep(0.2)
            netns.stop(dump)
            run.tcpdump_err = dump.stderr.read()
            run.exit_code = lpd.stop()
            run.stderr = lpd.stderr()
        run.oracle, run.oracle_problems = tshark_oracle(cap)
        cp = subprocess.run(["prlimit", f"--as={AS_LIMIT}", sys.executable, LPD, "-r", str(cap),
                             "--mapping-url", "none", "--http", "--http-ports", PORTS,
                             "--http-log", str(replay_log), "--output", "json"],
                            capture_output=True, text=True, timeout=120)
        assert cp.returncode == 0, cp.stderr
        run.replayed = read_log(replay_log)
        if KEEP:
            dest = Path(KEEP) / f"{'on' if offloads else 'off'}-{engine}"
            dest.mkdir(parents=True, exist_ok=True)
            for f in (cap, log, replay_log):
                if f.exists():
                    shutil.copy(f, dest / f.name)
            (dest / "run.json").write_text(json.dumps({
                "rss_kib": run.rss, "flood_wire": run.flood_wire, "flood_bytes": run.flood_bytes,
                "tcpdump": run.tcpdump_err, "h2load": run.h2load_out}, indent=1))
        yield run


# --- 1. the log ---------------------------------------------------------------------------

def found(run, name):
    """The records of a connection found by a uri only it asked for (nghttp's)."""
    port, marker, _ = run.by_uri[name]
    sports = {r["id.orig_p"] for r in run.log if r["id.resp_p"] == port and r["uri"] == marker
              and r["id.orig_p"] != MID_SPORT}
    assert len(sports) == 1, (name, sports)
    return [r for r in run.log if r["id.orig_p"] in sports and r["id.resp_p"] == port]


def test_known_connections_logged_exactly(h2_run):
    """curl's connections (known source ports): one record per request, every field."""
    run = h2_run
    by_key = collections.defaultdict(list)
    for r in run.log:
        by_key[rec_key(r)].append(r)
    for name, want in run.expected:
        got = by_key.get(rec_key(want), [])
        assert len(got) == 1, (name, want, got)
        assert strip(got[0]) == want, (name, got[0], want)
    sports = {w["id.orig_p"] for _, w in run.expected}
    extra = [r for r in run.log if r["id.orig_p"] in sports
             and rec_key(r) not in {rec_key(w) for _, w in run.expected}]
    assert not extra, extra


def test_nghttp_connections(h2_run):
    """nghttp's prior-knowledge connection and its Upgrade one: stream ids and depths as
    the capture has them, sizes as served."""
    run = h2_run
    oracle = {(o[0], o[1], o[2]): o for o in run.oracle}
    for name in ("nghttp", "nghttp-u"):
        port, _, uris = run.by_uri[name]
        recs = sorted(found(run, name), key=lambda r: r["trans_depth"])
        assert [r["uri"] for r in recs] == list(uris), (name, recs)
        for r in recs:
            o = oracle.get(rec_key(r))
            assert o is not None, (name, r)
            want = record(r["id.orig_p"], port, o[2], "GET", f"{netns.IP4_A}:{port}", r["uri"],
                          status_of(r["uri"]), 0, size(r["uri"]), "2", o[3])
            assert strip(r) == want, (name, r, want)
        if name == "nghttp-u":
            assert recs[0]["stream_id"] == 1, "the upgraded request is stream 1"


def test_h2load_requests(h2_run):
    run = h2_run
    h2load = [r for r in run.log if r["id.resp_p"] == H2_PORT and r["uri"] in ("/five", "/missing")
              and r["id.orig_p"] not in {w["id.orig_p"] for _, w in run.expected}
              and r["id.orig_p"] not in {x["id.orig_p"] for x in found(run, "nghttp")}
              and r["id.orig_p"] != MID_SPORT]
    assert len(h2load) == H2LOAD_N, (len(h2load), run.h2load_out)
    conns = collections.Counter(r["id.orig_p"] for r in h2load)
    assert len(conns) == H2LOAD_C and set(conns.values()) == {H2LOAD_N // H2LOAD_C}, conns
    for r in h2load:
        assert r["version"] == "2" and r["method"] == "GET", r
        assert (r["status_code"], r["response_body_len"], r["request_body_len"]) == \
            (status_of(r["uri"]), size(r["uri"]), 0), r
        assert r["stream_id"] % 2 == 1 and r["trans_depth"] == (r["stream_id"] + 1) // 2, r
        assert r["host"] == f"{netns.IP4_A}:{H2_PORT}", r
    assert collections.Counter(r["uri"] for r in h2load) == {"/five": H2LOAD_N // 2,
                                                             "/missing": H2LOAD_N // 2}


def test_one_record_per_request_in_all(h2_run):
    """Nothing logged twice; the total is every request sent (the flood's aside)."""
    run = h2_run
    log = [r for r in run.log if r["id.orig_p"] != run.flood_sport]
    keys = [rec_key(r) for r in log]
    assert len(keys) == len(set(keys)), [k for k, n in collections.Counter(keys).items() if n > 1]
    h2_keys = [(r["id.orig_p"], r["id.resp_p"], r["stream_id"]) for r in log if "stream_id" in r]
    assert len(h2_keys) == len(set(h2_keys))
    assert len(log) == len(run.expected) + 4 + 2 + len(GRPC_CALLS) + H2LOAD_N + len(MID_AFTER), \
        len(log)
    assert all(r["version"] == ("1.1" if r["id.resp_p"] == H1_PORT else "2") for r in log), \
        [r for r in log if r.get("version") != ("1.1" if r["id.resp_p"] == H1_PORT else "2")][:5]


def test_times_are_plausible(h2_run):
    for r in h2_run.log:
        assert 0 <= r["duration"] < 5, r
        if r["status_code"]:
            assert 0 <= r["ttfb"] <= r["duration"], r


# --- 2. the oracle: tshark on the same traffic ----------------------------------------------

def test_records_equal_tsharks_reading_of_the_capture(h2_run):
    """Every connection lpd saw from its start (the joined one: test_joined_mid_connection)."""
    run = h2_run
    assert "0 packets dropped by kernel" in run.tcpdump_err, run.tcpdump_err
    assert not run.oracle_problems, run.oracle_problems[:3]
    got = collections.Counter(as_oracle(r) for r in run.log
                              if r["id.orig_p"] not in (run.flood_sport, MID_SPORT))
    want = collections.Counter(o for o in run.oracle if o[0] != MID_SPORT)
    assert sum(want.values()) == len(run.expected) + 4 + 2 + len(GRPC_CALLS) + H2LOAD_N, \
        "the oracle saw every request"
    assert got == want, {"lpd only": sorted((got - want).elements())[:10],
                         "tshark only": sorted((want - got).elements())[:10]}


def test_replay_of_the_capture_logs_the_same(h2_run):
    """The same records, but for the joined connection (the capture has its start: the
    replay reads it whole, test_joined_mid_connection)."""
    run = h2_run
    assert "0 packets dropped by kernel" in run.tcpdump_err, run.tcpdump_err
    live = sorted((r for r in run.log if r["id.orig_p"] != MID_SPORT), key=rec_key)
    replayed = sorted((r for r in run.replayed if r["id.orig_p"] != MID_SPORT), key=rec_key)
    assert [strip(r) for r in replayed] == [strip(r) for r in live], \
        {"replay only": [strip(r) for r in replayed if rec_key(r) not in {rec_key(x) for x in live}][:5],
         "live only": [strip(r) for r in live if rec_key(r) not in {rec_key(x) for x in replayed}][:5],
         "counts": (len(replayed), len(live))}
    for a, b in zip(live, replayed):
        for k in ("ts", "ttfb", "duration"):
            assert (k in a) == (k in b), (k, a, b)
            if k in a:
                assert abs(a[k] - b[k]) <= TIME_SLACK, (k, a, b)


def test_joined_mid_connection(h2_run):
    """A connection open (preface, SETTINGS, MID_BEFORE's requests) before lpd started: lpd
    syncs on frame headers and logs the requests after it started with their stream ids;
    a field the client's HPACK sent as a reference to an entry made before lpd joined is
    "_OTHER" (h2's encoder indexes every field: MID_BEFORE's paths), the others are read;
    hpack_unknown counts the references. The replay reads the whole connection, as tshark."""
    run = h2_run
    recs = sorted(run.records(MID_SPORT), key=lambda r: r["stream_id"])
    assert [r["stream_id"] for r in recs] == [sid for sid, _ in run.mid_sent], recs
    for r, (sid, path) in zip(recs, run.mid_sent):
        uri = "_OTHER" if path in MID_BEFORE else path
        assert (r["method"], r["uri"], r["status_code"], r["response_body_len"],
                r["request_body_len"], r["version"]) == \
            ("GET", uri, status_of(path), size(path), 0, "2"), (r, path)
    assert (value(run.metrics, "lpd_http_parse_errors_total", reason="hpack_unknown") or 0) >= 1
    oracle = [o for o in run.oracle if o[0] == MID_SPORT]
    assert [o[3] for o in oracle] == [1 + 2 * i for i in range(len(MID_BEFORE))] + \
        [sid for sid, _ in run.mid_sent], oracle
    assert [as_oracle(r) for r in sorted((r for r in run.replayed if r["id.orig_p"] == MID_SPORT),
                                         key=rec_key)] == oracle


# --- 2b. gRPC ------------------------------------------------------------------------------

def grpc_records(run):
    sports = {r["id.orig_p"] for r in run.log if r["id.resp_p"] == GRPC_PORT
              and r["uri"] == "/lpd.test.Echo/Fail"}
    assert len(sports) == 1, sports
    return sorted((r for r in run.log if r["id.orig_p"] in sports), key=lambda r: r["trans_depth"])


def test_grpc_calls_logged(h2_run):
    run = h2_run
    recs = grpc_records(run)
    oracle = {(o[0], o[1], o[2]): o for o in run.oracle}
    assert len(recs) == len(GRPC_CALLS), recs
    for r, (method, req, resps, status, message) in zip(recs, GRPC_CALLS):
        o = oracle.get(rec_key(r))
        assert o is not None, r
        want = record(r["id.orig_p"], GRPC_PORT, o[2], "POST", f"{netns.IP4_A}:{GRPC_PORT}",
                      "/" + method, 200, GRPC_PREFIX + req,
                      sum(GRPC_PREFIX + n for n in resps), "2", o[3])
        want.update({"rpc_method": method, "grpc_status": status,
                     "request_messages": 1, "response_messages": len(resps)})
        if message is not None:
            want["grpc_message"] = message
        got = strip(r)
        if message is None and got.get("grpc_message") == "":
            del got["grpc_message"]         # an empty grpc-message (grpcio sends one): either way
        assert got == want, (got, want)


def test_grpc_metrics(h2_run):
    """rpc_server_call_duration_seconds per method and status NAME; the messages each way;
    gRPC calls are not in the HTTP histogram (test_histogram_counts_every_request...)."""
    m = h2_run.metrics
    where = {"server_address": netns.IP4_A, "server_port": str(GRPC_PORT), "container": ""}
    calls = {(d["rpc_method"], d["rpc_response_status_code"]): v for d, v in
             ((dict(k[1]), v) for k, v in m.items() if k[0] == "rpc_server_call_duration_seconds_count")
             if d.get("rpc_system_name") == "grpc" and all(d.get(a) == b for a, b in where.items())}
    assert calls == {("lpd.test.Echo/Say", "OK"): 2, ("lpd.test.Echo/Fail", "NOT_FOUND"): 1,
                     ("lpd.test.Echo/Stream", "OK"): 1}, calls
    msgs = {(d["rpc_method"], d["direction"]): v for d, v in
            ((dict(k[1]), v) for k, v in m.items() if k[0] == "lpd_rpc_messages_total")
            if v and all(d.get(a) == b for a, b in where.items())}
    assert msgs == {("lpd.test.Echo/Say", "request"): 2, ("lpd.test.Echo/Say", "response"): 2,
                    ("lpd.test.Echo/Fail", "request"): 1, ("lpd.test.Echo/Stream", "request"): 1,
                    ("lpd.test.Echo/Stream", "response"): 3}, msgs


# --- 3. the histogram ---------------------------------------------------------------------

def test_histogram_counts_every_request_with_its_version(h2_run):
    run = h2_run
    want = collections.Counter(run.sent)
    for _, w in run.expected:
        want[(w["method"], str(w["status_code"]), w["uri"].split("?")[0], w["version"],
              str(w["id.resp_p"]))] += 1
    for r in run.records(run.flood_sport) + run.records(MID_SPORT):   # flood: whatever lpd
        # logged of it; the joined connection: its uris as lpd could read them
        want[(r["method"], str(r["status_code"]), r["uri"].split("?")[0], r["version"],
              str(r["id.resp_p"]))] += 1
    got = hist(run.metrics)
    assert got == dict(want), {"different": {k: (v, got.get(k)) for k, v in want.items()
                                             if got.get(k) != v},
                               "unexpected": {k: v for k, v in got.items() if k not in want}}
    # h2load's 200 among them (the equality above has them): /five and /missing on 8080
    assert got[("GET", "200", "/five", "2", str(H2_PORT))] > H2LOAD_N // 2
    assert got[("GET", "404", "/missing", "2", str(H2_PORT))] > H2LOAD_N // 2
    assert got[("GET", "200", "/five", "1.1", str(H1_PORT))] == 1


# --- 4. the flood -------------------------------------------------------------------------

def test_continuation_flood(h2_run):
    """Every part checked, the failures reported together."""
    run = h2_run
    (rss0, hwm0), (rss1, hwm1) = run.rss["before"], run.rss.get("end") or (None, None)
    counted = value(run.metrics, "lpd_http_parse_errors_total", reason="h2_header_block_too_large")
    after = [w for n, w in run.expected if n == "after"]
    wrong = {
        "the flood did not reach the wire": run.flood_wire < FLOOD_WIRE_MIN,
        "lpd did not stay up": not run.alive_after_flood,
        "h2_header_block_too_large not counted": not counted,
        "RSS grew too much": rss1 is None or rss1 - rss0 >= FLOOD_RSS_MAX_KIB,
        "peak RSS grew too much": hwm1 is None or hwm1 - hwm0 >= FLOOD_RSS_MAX_KIB,
        "the request after it is not logged": not after or [
            strip(r) for r in run.records(after[0]["id.orig_p"])] != after,
    }
    assert not any(wrong.values()), ([k for k, v in wrong.items() if v],
                                     {"rss_kib": run.rss, "flood_wire": run.flood_wire,
                                      "counted": counted, "capture drops": value(
                                          run.metrics, "lpd_capture_drops_total", worker="0",
                                          nic=netns.IF_B)})


def test_no_other_parse_errors_no_drops_and_a_clean_exit(h2_run):
    """No capture drops before the flood (a Python reader may fall behind the flood itself:
    its drops are only reported, in test_continuation_flood's message)."""
    m = h2_run.metrics
    assert h2_run.drops_before_flood == 0
    errors = {dict(k[1]).get("reason"): v for k, v in m.items()
              if k[0] == "lpd_http_parse_errors_total" and v}
    assert set(errors) <= {"h2_header_block_too_large", "hpack_unknown"}, errors
    assert h2_run.exit_code == 0, h2_run.stderr
    assert "Traceback" not in h2_run.stderr, h2_run.stderr
