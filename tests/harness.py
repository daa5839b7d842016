"""Helpers the test modules share: no test module imports another (test_*.py), they
import these. Here: waiting, lpd's logs and rule socket, classic pcap files (one writer,
one reader), `lpd -r` as a process, lpd on a veth pair (netns.Pair) and its metrics, the
HTTP server and client of the live HTTP tests, and the run of two lpds on one traffic
(test_workers, test_engine), nfdump's collector nfcapd as a process (test_ipfix and the
bench's flow export series), TLS certificates and handshakes made in memory (the TLS
tests). Frames are built by packets.py and netns.py; fixtures (`pair`, `engine`) are in
conftest.py."""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import netns
import packets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LPD = os.path.join(ROOT, "lpd.py")
PORT = 59122
MAPPING_PORT = 32599
# Set by the `engine` fixture (conftest.py) of test modules that run under both engines:
# the engine every Lpd() of the test gets unless it names one itself.
ENGINE_VAR = "LPD_TEST_ENGINE"


# --- waiting, logs, sockets, processes ---------------------------------------------------

def wait_for(predicate, timeout=10.0, step=0.1, what=None):
    """predicate()'s first true result within `timeout` s, polled every `step` s; after the
    deadline one last call's result, or with `what` an AssertionError naming it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(step)
    if what is not None:
        raise AssertionError(f"timed out waiting for {what}")
    return predicate()


def read_log(path, whole=True):
    """The records of a JSON-lines log ([] while the file does not exist). whole: the
    file must end with a whole line (lpd writes a line at once); False for a log read
    while a writer may be mid-line, blank lines skipped."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    if not whole:
        return [json.loads(line) for line in text.split("\n") if line.strip()]
    assert not text or text.endswith("\n"), "a line is written whole"
    return [json.loads(line) for line in text.splitlines()]


def read_socket(path, timeout=5):
    """The rule socket's whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks).decode()
            chunks.append(data)


def parse_lines(text):
    """[(rule id, bytes, packets)] of the rule socket's answer."""
    rows = []
    for line in text.splitlines():
        rid, b, p = line.rsplit(":", 2)
        rows.append((rid, int(b), int(p)))
    return rows


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def free_port(host="127.0.0.1"):
    """A TCP port free on `host` just now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return sorted(int(x) for x in out.stdout.split())


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


# --- classic pcap files ------------------------------------------------------------------

PCAP_US, PCAP_NS = 0xA1B2C3D4, 0xA1B23C4D         # magic: µs and ns timestamps


def pcap_header(magic=PCAP_US, order="<", linktype=1, snaplen=65535):
    """A pcap file's global header: version 2.4, no zone, `order` "<" or ">"."""
    return struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)


def write_pcap(path, records, magic=PCAP_US, order="<", linktype=1, snaplen=65535):
    """A classic pcap of `records`, each (sec, frac, data) or (sec, frac, data, wirelen):
    frac in µs or ns as `magic` says, wirelen len(data) unless given."""
    with open(path, "wb") as f:
        f.write(pcap_header(magic, order, linktype, snaplen))
        rec = struct.Struct(order + "IIII")
        for sec, frac, data, *wirelen in records:
            f.write(rec.pack(sec, frac, len(data), wirelen[0] if wirelen else len(data)) + data)


def read_pcap(path, strict=False):
    """A classic pcap read here, without lpd: {"order", "nano", "linktype", "snaplen",
    "records": [(sec, frac, wirelen, data)]}. strict: a known magic, Ethernet and no
    trailing bytes are asserted; otherwise an unknown magic reads as big-endian and a
    truncated last record keeps the bytes there are."""
    data = Path(path).read_bytes()
    magic = data[:4]
    order = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    if strict:
        assert magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\xc3\xd4",
                         b"\xa1\xb2\x3c\x4d"), f"{path}: not a pcap ({magic.hex()})"
    snaplen, linktype = struct.unpack_from(order + "II", data, 16) if len(data) >= 24 else (0, 0)
    if strict:
        assert linktype == 1, f"{path}: link type {linktype}, not Ethernet"
    recs, off = [], 24
    while off + 16 <= len(data):
        sec, frac, caplen, wirelen = struct.unpack_from(order + "IIII", data, off)
        recs.append((sec, frac, wirelen, data[off + 16:off + 16 + caplen]))
        off += 16 + caplen
    if strict:
        assert off == len(data), f"{path}: trailing bytes"
    return {"order": order, "nano": nano, "linktype": linktype, "snaplen": snaplen,
            "records": recs}


def independent_records(path):
    """(wirelen, data) per record, parsed here without lpd."""
    return [(wirelen, data) for _, _, wirelen, data in read_pcap(path)["records"]]


def timed_frames(path):
    """[(ts in s, data)] per record, parsed here without lpd."""
    cap = read_pcap(path)
    unit = 1e9 if cap["nano"] else 1e6
    return [(sec + frac / unit, data) for sec, frac, _, data in cap["records"]]


def bare_udp4(src, dst, payload=b"x" * 10):
    """An Ethernet IPv4 UDP frame (ports 1 -> 2), not padded to 60 bytes."""
    return packets.ether("02:02:02:02:02:02", "04:04:04:04:04:04", packets.ETH_IP,
                         packets.ipv4(src, dst, packets.PROTO_UDP, packets.udp(1, 2, payload)),
                         pad=False)


# --- lpd -r as a process -----------------------------------------------------------------

def run_cli(tmp_path, trace, *args):
    """python3 lpd.py -r ... as a process: (exit code, stdout, stderr)."""
    pcap = tmp_path / "t.pcap"
    trace.write(pcap)
    p = subprocess.run([sys.executable, LPD, "-r", str(pcap), *args], capture_output=True,
                       text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def json_values(text):
    """Every JSON value in a stream (log lines and an indented document, in any order)."""
    dec, i, out = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return out
        value, i = dec.raw_decode(text, i)
        out.append(value)


# --- nfdump's collector ---------------------------------------------------------------------

COLLECTOR_START = 10.0              # seconds a collector may take to bind
COLLECTOR_DRAIN = 10.0              # seconds nfcapd may take to read what is queued for it


class Nfcapd:
    """nfcapd on 127.0.0.1:port (in namespace `ns` when given), stopped by PID."""

    def __init__(self, tmp_path, port, pair=None, ns=None, name="nfcapd"):
        self.port = port
        self.dir = tmp_path / f"{name}-{port}"
        self.dir.mkdir()
        self.log_path = tmp_path / f"{name}-{port}.log"
        self.log = open(self.log_path, "wb")
        cmd = ["nfcapd", "-w", str(self.dir), "-p", str(port), "-b", "127.0.0.1", "-B", "8000000"]
        self.proc = pair.popen(ns, cmd, stdout=self.log, stderr=subprocess.STDOUT) if pair else \
            subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_for(lambda: b"Bound to" in self.log_path.read_bytes(), COLLECTOR_START):
            self.end()
            raise AssertionError(self.log_path.read_text())

    def queued(self):
        """Bytes waiting in its socket's receive queue (/proc/<pid>/net/udp: its
        namespace's), 0 once it is gone."""
        try:
            with open(f"/proc/{self.proc.pid}/net/udp") as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            return 0
        local = f"0100007F:{self.port:04X}"
        return sum(int(r[4].split(":")[1], 16) for r in rows if r[1] == local)

    def end(self):
        """SIGTERM once it has read what was sent to it (nfcapd writes its file and its
        statistics line); killed if it has not ended 10 s later."""
        wait_for(lambda: self.queued() == 0, COLLECTOR_DRAIN, 0.02)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.log.close()

    def stop(self):
        """end(), then its flows."""
        self.end()
        return nfdump(self.dir)

    def sequence_errors(self):
        stats = [line for line in self.log_path.read_text().splitlines() if "Sequence Errors" in line]
        assert stats, self.log_path.read_text()
        return sum(int(line.split("Sequence Errors:")[1].split(",")[0]) for line in stats)


def nfdump(directory):
    """nfdump's own decoding of what nfcapd stored: its JSON records, times in UTC."""
    out = subprocess.run(["nfdump", "-R", str(directory), "-o", "json"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "TZ": "UTC"}, check=True)
    return json.loads(out.stdout) if out.stdout.strip() else []


def nfdump_totals(directory, timeout=120):
    """(records, octets, packets) of nfdump's decoding of what nfcapd stored, one line a
    record (for many records: nfdump's JSON is ~600 bytes each)."""
    out = subprocess.run(["nfdump", "-N", "-q", "-R", str(directory), "-o", "fmt:%ibyt %ipkt"],
                         capture_output=True, text=True, timeout=timeout, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return len(rows), sum(int(r[0]) for r in rows), sum(int(r[1]) for r in rows)


# --- lpd on a veth pair --------------------------------------------------------------------

def veth_pair():
    """The body of the `pair` fixtures: a netns.Pair, torn down afterwards."""
    with netns.Pair() as p:
        yield p


def scrape(pair, ns=None, port=PORT, path="/metrics"):
    """GET a page of lpd's HTTP server from inside its namespace."""
    code = ("import sys, urllib.request;"
            f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=5)"
            ".read().decode())")
    return pair.run(ns or pair.ns_b, [sys.executable, "-c", code]).stdout


def metrics(pair, ns=None, port=PORT):
    """{(name, frozenset(labels)): value} from lpd's /metrics, parsed by prometheus_client."""
    out = {}
    for fam in text_string_to_metric_families(scrape(pair, ns, port)):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m, name, **labels):
    return m.get((name, frozenset(labels.items())))


def series(m, name):
    return {dict(k[1]).get("local_ip"): v for k, v in m.items() if k[0] == name}


def api(pair, path):
    """(status, JSON document) of a GET on lpd's web port, from inside ns_b."""
    status, body = netns.http_get(pair.ns_b, "127.0.0.1", PORT, path)
    return status, json.loads(body)


class Lpd:
    """lpd started in ns_b on veth-b, stopped by PID at the end."""

    def __init__(self, pair, *args, env=None, python=sys.executable, prefix=()):
        """prefix: a command that execs lpd (prlimit --as=...), so proc.pid stays lpd's."""
        self.pair = pair
        engine = os.environ.get(ENGINE_VAR)
        if engine and "--engine" not in args:
            args = (*args, "--engine", engine)
        self.err = tempfile.TemporaryFile()
        self.proc = pair.popen(pair.ns_b, [*prefix, python, LPD, "-i", pair.if_b,
                                           "--web.listen-address", f"127.0.0.1:{PORT}", *args],
                               stderr=self.err, env=env)
        if not wait_for(self._ready, 15):
            raise AssertionError(f"lpd did not start: {self.stderr()}")

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"lpd exited {self.proc.returncode}: {self.stderr()}")
        try:
            return "lpd_build_info" in scrape(self.pair)
        except netns.NetnsError:
            return False

    def stderr(self):
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        return self.proc.wait(10)


class Instance(Lpd):
    """lpd on veth-b on a metrics port of its own, so two can watch the same traffic."""

    def __init__(self, pair, port, *args):
        self.port = port
        super().__init__(pair, *args, "--web.listen-address", f"127.0.0.1:{port}")

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"lpd exited {self.proc.returncode}: {self.stderr()}")
        try:
            return "lpd_build_info" in scrape(self.pair, port=self.port)
        except netns.NetnsError:
            return False


# A real HTTP server for the mapping service, run inside ns_b where lpd looks for it.
MAPPING_SERVER = r"""
import http.server, os, sys, time
path = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            body = open(path, 'rb').read()
        except OSError:
            body = b''
        if body.startswith(b'SLOW'):
            time.sleep(4)
        if body.startswith(b'HTTP500'):
            self.send_response(500); self.end_headers(); return
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(('127.0.0.1', %d), H).serve_forever()
"""


def add_remotes(pair, addrs):
    """Give the peer (ns_a) each remote address, and ns_b a host route to it through the
    peer's veth address (whose neighbour entry is permanent: no ARP or ND)."""
    for a in addrs:
        if ":" in a:
            pair.run(pair.ns_a, ["ip", "-6", "addr", "add", f"{a}/128", "dev", pair.if_a, "nodad"])
            pair.run(pair.ns_b, ["ip", "-6", "route", "add", f"{a}/128", "via", pair.ip6_a,
                                 "dev", pair.if_b])
        else:
            pair.run(pair.ns_a, ["ip", "addr", "add", f"{a}/32", "dev", pair.if_a])
            pair.run(pair.ns_b, ["ip", "route", "add", f"{a}/32", "via", pair.ip4_a,
                                 "dev", pair.if_b])
    pair.settle()           # the MLD reports of the new addresses' groups, before lpd starts


# --- two lpds on one traffic (test_workers: 1 and 2 workers; test_engine: cbpf and ebpf) ---

TWIN_RULES = "udp;udp\ntcp;tcp\nweb;tcp port 8080\nping;icmp or icmp6\n"
TWIN_HTTP_PORT = 8080
TWIN_SERVER = r"""
import http.server, socketserver, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        body = b"x" * int(self.path.strip("/") or 1)
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
S(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""
TWIN_FLOWS = 24                                 # UDP flows, several per worker


def twin_traffic(pair):
    """UDP flows both ways, pings, and HTTP requests of known sizes from ns_b to ns_a."""
    for sport in range(40000, 40000 + TWIN_FLOWS):
        pair.udp_send(pair.ns_b, pair.ip4_b, pair.ip4_a, [100 + sport % 7, 300], sport=sport)
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [200], sport=sport)
    pair.ping(pair.ns_a, pair.ip4_b)
    pair.ping(pair.ns_a, pair.ip6_b)
    for size in (1, 10, 1000, 5000, 20000, 77):
        status, body = netns.http_get(pair.ns_b, pair.ip4_a, TWIN_HTTP_PORT, f"/{size}")
        assert status == 200 and len(body) == size


def comparable(m):
    """The series that must not depend on the number of workers or the engine."""
    keep = ("lpd_transmit_", "lpd_receive_", "lpd_interface_", "lpd_rule_", "lpd_remote_",
            "ip_traffic_", "lpd_connections", "http_server_request_duration_seconds_count",
            "lpd_http_parse_errors", "lpd_worker_restarts")
    return {k: v for k, v in m.items() if k[0].startswith(keep)}


def strip_conn(rec):
    return {k: v for k, v in rec.items() if k not in ("ts", "uid", "duration", "pid", "comm")}


def strip_http(rec):
    return {k: v for k, v in rec.items() if k not in ("ts", "ttfb", "duration")}


def twin_http_up(pair):
    try:
        return netns.http_get(pair.ns_b, pair.ip4_a, TWIN_HTTP_PORT, "/1")[0] == 200
    except OSError:
        return False


def twin_run(variants, extra_traffic=None):
    """Two (or more) lpds with every stage on (-f, --remote, --connections, --http) on the
    same veth at the same time, each {name: (metrics port, its own arguments)}: the same
    frames, so every number, conn.log and http.log record must be the same. Per name:
    {"socket", "all" (metrics), "stderr", "children" (its processes before the traffic),
    "metrics" (comparable), "conns", "http"}. Each must exit 0 on SIGTERM and leave none
    of its child processes behind."""
    with tempfile.TemporaryDirectory() as tmp, netns.Pair() as pair:
        server = pair.popen(pair.ns_a, [sys.executable, "-c", TWIN_SERVER, str(TWIN_HTTP_PORT)])
        assert wait_for(lambda: twin_http_up(pair), 10), "HTTP server did not start"
        rules = os.path.join(tmp, "rules")
        with open(rules, "w") as f:
            f.write(TWIN_RULES)
        lpds, out = {}, {}
        try:
            for name, (port, args) in variants.items():
                lpds[name] = Instance(
                    pair, port, *args, "--mapping-url", "none", "--interval", "0.5",
                    "-f", rules, "-u", os.path.join(tmp, f"rules-{name}.sock"), "--remote", "-t", "0",
                    "--local-net", "10.199.0.2/32", "--local-net", "fd00:199::2/128",
                    "--conn-log", os.path.join(tmp, f"conn-{name}"),
                    "--http-log", os.path.join(tmp, f"http-{name}"),
                    "--http-ports", str(TWIN_HTTP_PORT))
            kids = {name: children(x.proc.pid) for name, x in lpds.items()}
            time.sleep(0.5)                  # both rings bound before the first frame
            twin_traffic(pair)
            if extra_traffic:
                extra_traffic(pair)
            time.sleep(1.5)
            for name, x in lpds.items():
                out[name] = {"socket": parse_lines(read_socket(os.path.join(tmp, f"rules-{name}.sock"))),
                             "all": metrics(pair, port=variants[name][0]), "stderr": x.stderr(),
                             "children": kids[name]}
        finally:
            codes = {name: x.stop() for name, x in lpds.items()}
            netns.stop(server)
        for name, x in lpds.items():
            assert codes[name] == 0, x.stderr()
            assert not [k for k in kids[name] if alive(k)], "a worker outlived SIGTERM"
            logs = {log: read_log(os.path.join(tmp, f"{log}-{name}"), whole=False)
                    for log in ("conn", "http")}
            out[name]["metrics"] = comparable(out[name]["all"])
            out[name]["conns"] = sorted(json.dumps(strip_conn(r), sort_keys=True) for r in logs["conn"])
            out[name]["http"] = sorted(json.dumps(strip_http(r), sort_keys=True) for r in logs["http"])
        return out


# --- HTTP/1.x live: test_http_live's server and client, also used by test_http_docker --------

# test_http_live's server (test_http_docker runs it in a container too). Every answer's
# body length is fixed here and known to the test.
HTTP_SERVER = r"""
import http.server, socket, socketserver, sys, threading, time
FIXED = b"x" * 1234
BIG = bytes(range(256)) * 781 + b"b" * 64            # 200,000 bytes
CHUNKS = (b"5;ext=1\r\nhello\r\n", b"3e8\r\n" + b"y" * 1000 + b"\r\n",
          b"11\r\n" + b"z" * 17 + b"\r\n", b"0\r\nX-Trailer: done\r\n\r\n")   # 1022 bytes

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True          # one segment per write

    def log_message(self, *a):
        pass

    def reply(self, code, body=b"", head=False, length=None):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def answer(self, head):
        path = self.path.split("?", 1)[0]
        if path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if not head:
                for piece in CHUNKS:
                    self.wfile.write(piece)
        elif path == "/empty":
            self.send_response(204)
            self.end_headers()
        elif path == "/cached":
            self.send_response(304)
            self.send_header("ETag", '"v1"')
            self.send_header("Content-Length", "1234")   # the representation's: no body follows
            self.end_headers()
        elif path == "/big":
            self.reply(200, BIG, head)
        elif path == "/slow":
            time.sleep(0.3)
            self.reply(200, b"slow", head)
        elif path == "/close":                           # HTTP/1.0, no length: ends at the close
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"c" * 3000)
            self.close_connection = True
        elif path == "/missing" or path.startswith("/r/"):
            self.reply(404, b"not found\n", head)
        else:
            self.reply(200, FIXED, head)

    def do_GET(self):
        self.answer(False)

    def do_HEAD(self):
        self.answer(True)

    def do_POST(self):                       # http.server sent the 100 Continue already
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            got = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if not size:
                    break
                got += len(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():         # trailers, then the blank line
                pass
        else:
            got = len(self.rfile.read(int(self.headers["Content-Length"])))
        self.reply(201, b"got %d" % got)


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request, client_address):
        pass                                 # the reset client: EPIPE/ECONNRESET, expected


servers = [Server(("::", int(p)), H) for p in sys.argv[1:]]
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

FIXED_LEN, BIG_LEN, CHUNKED_LEN, CLOSE_LEN, UPLOAD_LEN = 1234, 200_000, 1022, 3000, 5000
NOT_FOUND = b"not found\n"
SOCKET_TIMEOUT = 10.0                  # any one socket operation of Client
HIST = "http_server_request_duration_seconds"
TIMES = ("ts", "ttfb", "duration")


def request(method, uri, host=None, version="HTTP/1.1", headers=(), body=b""):
    lines = [f"{method} {uri} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Client:
    """One TCP connection from ns_b, bytes sent as given, answers parsed here (the test's
    own reading of HTTP/1.1 framing, to know when each answer is complete)."""

    def __init__(self, run, host, port):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = netns.socket_in(run.pair.ns_b, fam, socket.SOCK_STREAM)
        self.sock.settimeout(SOCKET_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)      # one segment a write
        self.sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", next(run.sports)))
        self.sock.connect((host, port))
        self.local = self.sock.getsockname()[:2]
        self.server = (host, port)
        self.depth = 0
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def _more(self):
        b = self.sock.recv(65536)
        if not b:
            raise AssertionError(f"{self.server}: closed in the middle of an answer")
        self.buf += b

    def _take(self, n):
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self):
        while b"\r\n" not in self.buf:
            self._more()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def head(self):
        """(status, {field: value}) of the next head, interim or final."""
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        first, *lines = head.split(b"\r\n")
        fields = {}
        for line in lines:
            k, _, v = line.partition(b":")
            fields[k.strip().lower().decode()] = v.strip().decode()
        return int(first.split()[1]), fields

    def response(self, method="GET"):
        """(status, body) of the next answer (RFC 9112 6.3)."""
        code, fields = self.head()
        if method == "HEAD" or code in (204, 304):
            return code, b""
        if fields.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if not size:
                    break
                body += self._take(size)
                assert self._take(2) == b"\r\n"
            while self._line():                  # trailers, then the blank line
                pass
            return code, body
        if "content-length" in fields:
            return code, self._take(int(fields["content-length"]))
        while True:                              # until the server closes
            b = self.sock.recv(65536)
            if not b:
                break
            self.buf += b
        body, self.buf = self.buf, b""
        return code, body

    def close(self):
        self.sock.close()

    def abort(self):
        """SO_LINGER 0, then close: a RST."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        self.sock.close()


def key(rec):
    return (rec["id.orig_h"], rec["id.orig_p"], rec["id.resp_h"], rec["id.resp_p"],
            rec["trans_depth"])


def strip(rec):
    return {k: v for k, v in rec.items() if k not in TIMES}


def hist_series(m, suffix="_count"):
    """The histogram's series without network_protocol_version (summed over it)."""
    out = {}
    for (name, labels), v in m.items():
        if name == HIST + suffix:
            d = dict(labels)
            k = (d["http_request_method"], d["http_response_status_code"], d["http_route"],
                 d["server_address"], d["server_port"], d["container"])
            out[k] = out.get(k, 0) + v
    return out


def labels_of(series_key, version="1.1"):
    """The labels of a hist_series key, of the series of one HTTP version."""
    return dict(zip(("http_request_method", "http_response_status_code", "http_route",
                     "server_address", "server_port", "container"), series_key),
                network_protocol_version=version)


# --- TLS ---------------------------------------------------------------------------------

def self_signed(directory, cn="tls.test", san=None):
    """(certificate, key) paths: a P-256 certificate for cn (and subjectAltName san)."""
    key, cert = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert, "-days",
                    "2", "-subj", f"/CN={cn}", *(["-addext", f"subjectAltName={san}"] if san else [])],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def memory_handshake(client, server, sni):
    """(the ClientHello's bytes, the server's first flight) as OpenSSL writes them for the
    ssl.SSLContexts `client` and `server` (its certificate loaded), over memory BIOs."""
    import ssl
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=sni)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    try:
        c.do_handshake()
    except ssl.SSLWantReadError:
        pass
    first = c_out.read()
    s_in.write(first)
    try:
        s.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return first, s_out.read()


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HostLpd:
    """lpd in the host's namespace on an interface (a container engine's bridge), its web
    port on loopback, stopped by PID (netns.popen also stops it at exit). limit: run it
    under prlimit --as=BYTES."""

    def __init__(self, iface, *args, limit=None, start=15):
        self.port = free_port()
        self.err = tempfile.TemporaryFile()
        prefix = ["prlimit", f"--as={limit}"] if limit else []
        self.proc = netns.popen(None, [*prefix, sys.executable, LPD, "-i", iface,
                                       "--web.listen-address", f"127.0.0.1:{self.port}",
                                       "--mapping-url", "none", *args], stderr=self.err)
        if not wait_for(self._ready, start, 0.05):
            self.stop()
            raise AssertionError(f"lpd did not start: {self.stderr()}")

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"lpd exited {self.proc.returncode}: {self.stderr()}")
        try:
            return "lpd_build_info" in self.get("/metrics")[1]
        except OSError:
            return False

    def get(self, path):
        """(status, body text) of one GET on lpd's web port."""
        try:
            with NO_PROXY.open(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def json(self, path):
        status, body = self.get(path)
        return status, json.loads(body)

    def metrics(self):
        out = {}
        for fam in text_string_to_metric_families(self.get("/metrics")[1]):
            for s in fam.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def value(self, name, **labels):
        return self.metrics().get((name, frozenset(labels.items())))

    def containers(self):
        """The container names /api/containers lists (none while it does not answer)."""
        status, doc = self.json("/api/containers")
        return {c["container"] for c in doc.get("containers", [])} if status == 200 else set()

    def stderr(self):
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM):
        return netns.stop(self.proc, sig, grace=10)
