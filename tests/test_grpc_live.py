"""gRPC over HTTP/2 in clear text (h2c), container to container on a real Docker engine,
read by lpd's HTTP stage (issue 28; the contract is lpd's HTTP/2 + gRPC output: records
with "version" "2", stream_id, rpc_method, grpc_status, grpc_message, request_messages and
response_messages; rpc_server_call_duration_seconds, lpd_rpc_messages_total,
lpd_rpc_message_bytes_total, the "rpc" part of /api/http).

The engine is tests/docker_engine.py's private one (own containerd, dockerd and bridge
`lpdd0`; no iptables, no forwarding changes). Both ends are containers of the "usr" image
running the host's /usr/bin/python3 with python3-grpcio and tests/grpc_app.py (generic
handlers, bytes messages, no protoc): `grpc-srv` serves `lpd.test.Echo` on port 50051
(h2c, prior knowledge); the clients run scripted calls against it and print what they
did (per call: method, status, messages and their sizes each way), which is the truth the
test holds lpd to. lpd runs on the host on the bridge (`-i lpdd0 --promisc`: container to
container frames are switched, a packet socket on the bridge sees them only in promiscuous
mode), with --http (default ports: 50051 among them), --http-log and --docker-socket,
under `prlimit --as`. tcpdump writes the bridge's port-50051 traffic to a pcap; tshark's
http2 dissector reads it as the second oracle. Nothing is sent anywhere but the private
bridge and loopback; every wait is bounded; processes are stopped by PID, containers
removed; the engine is gone at the end. A missing piece (root, dockerd, tcpdump, tshark,
python3-grpcio) fails the fixture: nothing is skipped.

One module run (fixture `run`), two lpds one after the other:
  mid-connection: `grpc-cli-hold` opens its channel (IPv6) and makes 3 calls (Unary twice,
      ServerStream) before lpd starts; then lpd starts and it makes 5 more on the same
      HTTP/2 connection: Unary, BidiStream (new :path), NotFound (new), ServerStream,
      Unary. That lpd is stopped, then:
  full: lpd started first, then `grpc-cli` makes 11 calls on one new connection: Unary
      (5 B and 100 KB each way), ServerStream (5 x 1 KB, 3 x 100 KB), BidiStream (4 x 10 B
      ping-pong; 100 KB + 4 B), NotFound twice (grpc-message with '%' and non-ASCII),
      Unavailable, Slow with a 0.3 s deadline, Unary.

What is checked:
 1. (done-when) the full run's calls are in lpd's scrape: rpc_server_call_duration_seconds
    _count{rpc_system_name="grpc", rpc_method="lpd.test.Echo/<M>", rpc_response_status_code=
    <NAME>, server_address=<srv ip>, server_port="50051", container="grpc-srv"} equal to
    the calls the client made per (method, status), and no other series. Slow: the
    client's timer (RST_STREAM(CANCEL)) and the server's own deadline from grpc-timeout
    (trailers with grpc-status 4) race, and both orders happen; per the contract's note it
    is DEADLINE_EXCEEDED when the capture shows the server's grpc-status 4 before the RST,
    else CANCELLED (and status_code 0 when no response HEADERS came before the RST: what
    the server sends after it is not the call's). When the two crossed the bridge within
    RACE (5 ms) of each other, lpd's packet socket may have had them in the other order
    than tcpdump's (seen: trailers 0.1-0.3 ms after the RST in the capture, before it in
    lpd's record), so either reading is accepted for the live lpd, the record, series and
    document agreeing with each other; lpd -r on the capture must follow its order (8.).
    _sum within the run's time.
 2. lpd_rpc_messages_total per (method, direction) = the messages the client sent /
    received; lpd_rpc_message_bytes_total = their payload bytes (with or without the 5-byte
    prefixes: the contract does not say which, either is accepted, nothing else).
 3. gRPC calls are not in http_server_request_duration_seconds; no parse errors.
 4. the --http-log records of the full run, one per call, exact: version "2", stream_id
    1, 3, 5, ..., trans_depth 1.., method POST, host = :authority, uri = :path,
    status_code 200 (0 for Slow: no response), rpc_method, grpc_status, grpc_message
    (percent-decoded, only when sent), request_messages / response_messages and the
    body lengths (DATA payload bytes = messages + 5-byte prefixes), container "grpc-srv",
    the client container's address; ttfb <= duration; /api/requests has them under
    "grpc-srv"; /api/http's "rpc" part: calls, errors, statuses, methods.
 5. tshark (http2 dissector on tcpdump's capture of the same traffic, the connection seen
    from its SYN): for every stream of the connection, (stream id, :method, :authority,
    :path, :status, grpc-status, grpc-message, DATA bytes and gRPC messages each way) equal
    to lpd's record, and lpd has a record for every stream tshark saw.
 6. mid-connection (the held client talks to grpc-srv's IPv6 address), as README's
    "Joined mid-connection" says: lpd logs exactly the 5 calls made after it started, with
    the stream ids the capture shows (7, 9, ..., 15); a field is exact where its HPACK
    representation is a literal, the static table or an entry inserted since lpd joined,
    and "_OTHER" (uri, method; status_code 0; host absent or "_OTHER") where it refers to
    an entry inserted before, which entry each one is known from tshark (the capture has
    the connection from its SYN): BidiStream and NotFound (never sent before: literal
    :path) exact, Unary and ServerStream (sent before) "_OTHER". A stream is a gRPC call
    only where a content-type lpd could read says so: grpc-core indexes content-type on
    every call after a connection's first, both ways, so these 5 are HTTP/2 requests with
    no gRPC fields, in http_server_request_duration_seconds (network_protocol_version "2")
    and not in the rpc histogram; every call counted once; body bytes exact;
    lpd_http_parse_errors_total{reason="hpack_unknown"} > 0 when anything was unknown.
 7. both lpds exit 0, no Traceback.
 8. lpd -r on the capture (it has both connections from their SYN): every call of both
    clients exact against tshark (container ""), and --output json's "rpc" document
    (calls, errors, statuses, methods per "ip:port").
"""
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

import docker_engine
import netns
from harness import LPD, HostLpd, read_log, wait_for

pytestmark = pytest.mark.docker

HERE = Path(__file__).resolve().parent
APP = HERE / "grpc_app.py"
PORT = 50051
SERVICE = "lpd.test.Echo"
SRV, CLI, HOLD = "grpc-srv", "grpc-cli", "grpc-cli-hold"
INTERVAL = 0.5              # lpd --interval: the log is flushed at each tick
WAIT = 15.0                 # seconds any one expectation may take
CLIENT_TIMEOUT = 60         # a client container's whole run
LPD_AS = 2 << 30            # prlimit --as for lpd (bytes of address space)
APP_AS = 2 << 30            # ... for the gRPC apps in the containers
TSHARK_AS = 3 << 30         # ... for tshark
TSHARK_TIMEOUT = 60
CLOCK = 0.5                 # s: a container's time.time() against the capture's stamps
DUMP_BUFFER = 65536         # KiB: tcpdump -B
RACE = 0.005               # s: frames both ways closer than this around a RST_STREAM may
                            # reach two packet sockets in either order (Stream.views)
PCAP_MAX = 16 << 20         # the capture is ~1.5 MB; more means something ran away
RPC = "rpc_server_call_duration_seconds"
HTTP_HIST = "http_server_request_duration_seconds"
STATUS = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
          5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
          9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
          13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}
FULL_CALLS = 11
HOLD_BEFORE, HOLD_AFTER = 3, 5
NEW_IN_HOLD = {f"{SERVICE}/BidiStream", f"{SERVICE}/NotFound"}    # first sent after lpd started
OLD_IN_HOLD = {f"{SERVICE}/Unary", f"{SERVICE}/ServerStream"}     # sent before, and after


# --- lpd on the bridge ----------------------------------------------------------------

def Lpd(iface, *args):
    """lpd in the host's namespace on the engine's bridge under prlimit --as."""
    return HostLpd(iface, *args, limit=LPD_AS, start=20)


def series(m, name):
    """{frozenset(labels): value} of samples called `name`."""
    return {labels: v for (n, labels), v in m.items() if n == name}


def rpc_counts(m, container=SRV):
    """Counter {(rpc_method, status name): calls} of the call histogram for `container`;
    every series checked for its label set."""
    out = collections.Counter()
    for labels, v in series(m, RPC + "_count").items():
        d = dict(labels)
        assert set(d) == {"rpc_system_name", "rpc_method", "rpc_response_status_code",
                          "server_address", "server_port", "container"}, d
        if d["container"] != container:
            continue
        assert d["rpc_system_name"] == "grpc", d
        out[(d["rpc_method"], d["rpc_response_status_code"])] += v
    return out


def wait_log(path, pred, timeout=WAIT):
    """The log (read tolerating a line being written) once pred(log) holds, or as it is
    after `timeout`."""
    def check():
        log = read_log(path, whole=False)
        return log if pred(log) else None
    return wait_for(check, timeout, 0.1) or read_log(path, whole=False)


# --- tshark: the oracle ------------------------------------------------------------------

def _frames_of(node):
    """Every "http2.stream" object under a packet's http2 layer (one per HTTP/2 frame)."""
    if isinstance(node, list):
        for n in node:
            yield from _frames_of(n)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k == "http2.stream":
                for f in (v if isinstance(v, list) else [v]):
                    yield f
            elif isinstance(v, (dict, list)):
                yield from _frames_of(v)


def _listify(v):
    return [] if v is None else v if isinstance(v, list) else [v]


class Field:
    """One header field as tshark decoded it: its HPACK index (None for a literal with a
    new name), whether it was inserted into the dynamic table, and `unknown`: set by
    joined_at() when a reader that joined the connection later could not decode it."""

    def __init__(self, h):
        self.name, self.value = h.get("http2.header.name"), h.get("http2.header.value")
        rep = h.get("http2.header.repr", "")
        self.index = int(h["http2.header.index"]) if "http2.header.index" in h else None
        assert self.index is not None or rep.startswith("Literal") and rep.endswith("New Name"), \
            ("the oracle cannot tell which entry this refers to", h)
        self.inserted = "Incremental Indexing" in rep
        self.unknown = False


def joined_at(conn, sid):
    """Mark the fields a reader that joined `conn` just before stream `sid` cannot know
    (RFC 7541): an index into the dynamic table past the entries inserted since it
    joined refers to an entry inserted before (nothing here resizes or overflows the
    4 KB tables: the newest entries are never the ones evicted)."""
    for direction, blocks in conn["blocks"].items():
        inserted, joined = 0, False
        for block_sid, block in blocks:               # in the order they crossed the wire
            joined = joined or block_sid >= sid
            if not joined:
                continue
            for f in block:
                f.unknown = f.index is not None and f.index > 61 and f.index - 62 >= inserted
                inserted += f.inserted


class Stream:
    """One stream as the capture shows it: events (time, direction, frame type, flags,
    header block | DATA bytes | RST code) in capture order, and the view of them up to
    the stream's end: its first RST_STREAM (either way) or both END_STREAMs; what comes
    after (a server's answer to a call the client already reset) HTTP/2 ignores, and so
    does the record of the call."""

    def __init__(self, sid, events=None):
        self.sid = sid
        self.events = [] if events is None else events
        self.build()

    def build(self):
        # [[Field, ...] per header block]
        self.headers = {"request": [], "response": []}
        self.data = {"request": b"", "response": b""}
        self.rst = {"request": None, "response": None}    # error code each side sent
        self.end_stream = {"request": False, "response": False}
        self.closed = False
        self.late = []                  # (direction, frame type) after the end
        for _, direction, ftype, flags, what in self.events:
            if self.closed:
                self.late.append((direction, ftype))
                continue
            if ftype in (0, 1) and flags & 0x01:
                self.end_stream[direction] = True
            if ftype == 1:
                self.headers[direction].append(list(what))
            elif ftype == 9:
                self.headers[direction][-1].extend(what)
            elif ftype == 0:
                self.data[direction] += what
            elif ftype == 3:
                self.rst[direction] = what
            self.closed = (self.rst["request"] is not None or self.rst["response"] is not None
                           or all(self.end_stream.values()))
        return self

    def views(self, race=None):
        """This stream as the capture has it, then (with `race` s) the other orders a
        second packet socket on the bridge may have seen: the frames of the other
        direction within `race` of the first RST_STREAM all before it, or all after it.
        Two sockets' orders of frames crossing the bridge at nearly the same time both ways
        can differ: seen live, lpd had the server's trailers before the client's RST where
        tcpdump had them 0.1-0.3 ms after."""
        out = [self]
        rsts = [e for e in self.events if e[2] == 3]
        if race is None or not rsts:
            return out
        r = rsts[0]
        near = [e for e in self.events if e[1] != r[1] and abs(e[0] - r[0]) <= race]
        rest = [e for e in self.events if e is not r and not any(e is n for n in near)]
        at = next((i for i, e in enumerate(rest) if e[0] > r[0]), len(rest))
        for order in (rest[:at] + near + [r] + rest[at:], rest[:at] + [r] + near + rest[at:]):
            v = Stream(self.sid, order)
            if not any(same_view(v, o) for o in out):
                out.append(v)
        return out

    def field(self, direction, name):
        """The first value of `name` in `direction`'s header blocks, or None."""
        return self.field_rep(direction, name)[0]

    def field_rep(self, direction, name):
        """(value, unknown) of the first `name` in `direction`'s blocks, (None, False) when
        there is none; unknown: see joined_at()."""
        for hb in self.headers[direction]:
            for f in hb:
                if f.name == name:
                    return f.value, f.unknown
        return None, False

    def is_grpc(self):
        return any((self.field(d, "content-type") or "").startswith("application/grpc")
                   for d in ("request", "response"))

    def messages(self, direction):
        """gRPC length-prefixed messages in the stream's DATA bytes (all of them whole)."""
        data, i, n = self.data[direction], 0, 0
        while i < len(data):
            assert i + 5 <= len(data), (self.sid, direction, "a cut prefix")
            i += 5 + int.from_bytes(data[i + 1:i + 5], "big")
            n += 1
        assert i == len(data), (self.sid, direction, "a cut message")
        return n


def h2_oracle(pcap, port=PORT):
    """{(client ip, client port): {"syn": bool, "first": time, "streams": {id: Stream}}}
    from tshark's http2 dissector (every TCP connection to `port` decoded as HTTP/2), in
    the order the frames crossed the bridge; a stream's frames end at its first
    RST_STREAM (either way) or when both sides have ended it."""
    cp = subprocess.run(["prlimit", f"--as={TSHARK_AS}", "tshark", "-n", "-r", str(pcap),
                         "-o", "tcp.desegment_tcp_streams:TRUE",
                         "-d", f"tcp.port=={port},http2", "-Y", "http2 || tcp.flags.syn==1",
                         "-T", "json", "--no-duplicate-keys", "-J", "frame ip ipv6 tcp http2"],
                        capture_output=True, text=True, timeout=TSHARK_TIMEOUT)
    assert cp.returncode == 0, cp.stderr[-2000:]
    conns = {}
    for pkt in json.loads(cp.stdout):
        layers = pkt["_source"]["layers"]
        tcp = layers["tcp"]
        net = layers.get("ip") or layers.get("ipv6")
        src = net.get("ip.src") or net.get("ipv6.src")
        dst = net.get("ip.dst") or net.get("ipv6.dst")
        sport, dport = int(tcp["tcp.srcport"]), int(tcp["tcp.dstport"])
        direction = "request" if dport == port else "response"
        client = (src, sport) if direction == "request" else (dst, dport)
        conn = conns.setdefault(client, {"syn": False, "events": {},
                                         "blocks": {"request": [], "response": []},
                                         "first": float(layers["frame"]["frame.time_epoch"])})
        flags = int(tcp["tcp.flags"], 16)
        if flags & 0x02 and not flags & 0x10 and direction == "request":
            conn["syn"] = True
        t = float(layers["frame"]["frame.time_epoch"])
        for f in _frames_of(layers.get("http2")):
            if "http2.type" not in f:
                continue
            ftype, sid = int(f["http2.type"]), int(f["http2.streamid"])
            if sid == 0:
                continue
            events = conn["events"].setdefault(sid, [])
            flags = int(f["http2.flags"], 16)
            if ftype in (1, 9):                           # HEADERS, CONTINUATION
                block = [Field(h) for h in _listify(f.get("http2.header"))]
                conn["blocks"][direction].append((sid, block))   # HPACK: even when late
                events.append((t, direction, ftype, flags, block))
            elif ftype == 0:                              # DATA
                raw = f.get("http2.data.data", "")
                data = bytes.fromhex(raw.replace(":", "")) if raw else b""
                length, pad = int(f["http2.length"]), 0
                if flags & 0x08:
                    pad = int(f.get("http2.pad_length", 0)) + 1
                assert len(data) == length - pad, f
                events.append((t, direction, ftype, flags, data))
            elif ftype == 3:                              # RST_STREAM
                events.append((t, direction, ftype, flags, int(f["http2.rst_stream.error"])))
    for conn in conns.values():
        conn["streams"] = {sid: Stream(sid, ev) for sid, ev in conn.pop("events").items()}
    return conns


def same_view(a, b):
    return (a.data, a.rst, [[(f.name, f.value) for f in hb] for d in ("request", "response")
                            for hb in a.headers[d]]) == \
        (b.data, b.rst, [[(f.name, f.value) for f in hb] for d in ("request", "response")
                         for hb in b.headers[d]])


def oracle_status(st):
    """The gRPC status number the contract derives from what the wire shows: grpc-status
    if it came before the stream closed, else the RST_STREAM code's mapping."""
    gs = st.field("response", "grpc-status")
    if gs is not None:
        return int(gs)
    rst = st.rst["request"] if st.rst["request"] is not None else st.rst["response"]
    if rst is not None:
        return {8: 1, 7: 14, 11: 8, 12: 7}.get(rst, 13)
    return None


# --- the run -------------------------------------------------------------------------------

class Run:
    pass


def start_client(eng, name, srv_ip, *args, detach=False):
    host = f"[{srv_ip}]" if ":" in srv_ip else srv_ip
    argv = ["run", "--name", name, *eng.usr_run_args(), "-v", f"{eng.app}:/grpc_app.py:ro",
            "-v", f"{eng.share}:/share", eng.usr, "/usr/bin/prlimit", f"--as={APP_AS}",
            docker_engine.PYTHON, "/grpc_app.py", "client", f"{host}:{PORT}", *args]
    if detach:
        return eng.docker(argv[0], "-d", *argv[1:])
    return eng.docker(*argv, timeout=CLIENT_TIMEOUT)


def client_result(eng, name, path, timeout=CLIENT_TIMEOUT):
    """The summary a client container wrote to `path` (waits for it, and for its exit 0)."""
    ok = wait_for(lambda: path.exists(), timeout, 0.05)
    if not ok:
        raise AssertionError(f"{name} wrote no {path.name}: "
                             f"{eng.docker('logs', name, check=False)}")
    code = eng.docker("wait", name, timeout=20)
    assert code == "0", (name, code, eng.docker("logs", name, check=False))
    return json.loads(path.read_text())


@pytest.fixture(scope="module", params=["cbpf", "ebpf"])
def run(request):
    """The whole run, under each capture engine (which frames the kernel copies whole
    differs; what lpd reads from them must not)."""
    for prog in ("tcpdump", "tshark", "prlimit"):
        assert shutil.which(prog), f"{prog} is not installed"
    cp = subprocess.run([docker_engine.PYTHON, "-c", "import grpc"], capture_output=True,
                        text=True, timeout=30)
    assert cp.returncode == 0, f"python3-grpcio is missing: {cp.stderr}"
    r = Run()
    tmp = tempfile.TemporaryDirectory()
    dump = lpd = None
    with docker_engine.Engine() as eng:
        try:
            eng.usr = eng.usr_image()
            eng.app = os.path.join(eng.dir, "grpc_app.py")
            shutil.copyfile(APP, eng.app)
            eng.share = os.path.join(eng.dir, "share")
            os.makedirs(eng.share, mode=0o777)
            os.chmod(eng.share, 0o777)
            share = Path(eng.share)
            r.eng = eng
            eng.docker("run", "-d", "--name", SRV, *eng.usr_run_args(),
                       "-v", f"{eng.app}:/grpc_app.py:ro", eng.usr, "/usr/bin/prlimit",
                       f"--as={APP_AS}", docker_engine.PYTHON, "/grpc_app.py", "serve")
            r.srv_ip, r.srv_ip6 = eng.addresses(SRV)
            for ip in (r.srv_ip, r.srv_ip6):
                eng.wait_http(ip, PORT, timeout=WAIT)      # before tcpdump and lpd
            r.pcap = Path(tmp.name) / "bridge.pcap"
            dump = netns.start_tcpdump(None, eng.bridge, ["-s", "0", "-U", "-B", str(DUMP_BUFFER),
                                                          "-w", str(r.pcap), f"tcp port {PORT}"])

            # mid-connection: the channel is open and has been used before lpd starts
            start_client(eng, HOLD, r.srv_ip6, "--script", "hold", "--hold", "/share",
                         "--out", "/share/hold.json", detach=True)
            assert wait_for(lambda: (share / "held").exists(), CLIENT_TIMEOUT, 0.05), \
                eng.docker("logs", HOLD, check=False)
            r.hold_ip = eng.addresses(HOLD)[0]
            r.hold_log = Path(tmp.name) / "hold.json"
            lpd = Lpd(eng.bridge, "--engine", request.param, "--promisc", "--http",
                      "--http-log", str(r.hold_log), "--interval", str(INTERVAL),
                      "--docker-socket", eng.socket)
            assert wait_for(lambda: SRV in lpd.containers(), WAIT, 0.1), lpd.containers()
            time.sleep(2 * INTERVAL)
            (share / "go").touch()
            r.hold = client_result(eng, HOLD, share / "hold.json")
            wait_log(r.hold_log, lambda log: len(log) >= HOLD_AFTER)
            time.sleep(2 * INTERVAL)             # anything more would be written by now
            r.hold_metrics = lpd.metrics()
            r.hold_exit, r.hold_stderr = lpd.stop(), lpd.stderr()
            lpd = None
            r.hold_records = read_log(r.hold_log)

            # full: lpd first, then a new client and connection
            r.full_log = Path(tmp.name) / "full.json"
            lpd = Lpd(eng.bridge, "--engine", request.param, "--promisc", "--http",
                      "--http-log", str(r.full_log), "--interval", str(INTERVAL),
                      "--docker-socket", eng.socket)
            assert wait_for(lambda: SRV in lpd.containers(), WAIT, 0.1), lpd.containers()
            r.t0 = time.time()
            start_client(eng, CLI, r.srv_ip, "--out", "/share/full.json")
            r.full = client_result(eng, CLI, share / "full.json")
            r.t1 = time.time()
            wait_log(r.full_log, lambda log: len(log) >= FULL_CALLS)
            time.sleep(2 * INTERVAL)
            r.full_metrics = wait_for(
                lambda: (lambda m: sum(rpc_counts(m).values()) >= FULL_CALLS and m)(
                    lpd.metrics()), 5, 0.2) or lpd.metrics()
            r.views = {p: lpd.json(p) for p in ("/api/requests", "/api/http")}
            r.full_exit, r.full_stderr = lpd.stop(), lpd.stderr()
            lpd = None
            r.full_records = read_log(r.full_log)
            time.sleep(0.3)
            netns.stop(dump)
            r.dump_stderr = dump.stderr.read()
            dump = None
            # the oracle must have every frame: GSO sends 64 KB frames, and a 2 MB buffer
            # was seen dropping some
            assert re.search(r"^0 packets dropped by kernel$", r.dump_stderr, re.M), \
                r.dump_stderr
            assert 0 < r.pcap.stat().st_size < PCAP_MAX, r.pcap.stat().st_size
            r.oracle = h2_oracle(r.pcap)
            r.replay_log = Path(tmp.name) / "replay.json"
            cp = subprocess.run(["prlimit", f"--as={LPD_AS}", sys.executable, LPD, "-r",
                                 str(r.pcap), "--http", "--http-log", str(r.replay_log),
                                 "--docker-socket", "none", "--output", "json"],
                                capture_output=True, text=True, timeout=120)
            r.replay_exit, r.replay_stderr = cp.returncode, cp.stderr
            r.replay_doc = json.loads(cp.stdout) if cp.returncode == 0 else None
            r.replay_records = read_log(r.replay_log)
            yield r
        finally:
            if lpd is not None:
                lpd.stop()
            if dump is not None:
                netns.stop(dump)
            eng.remove(HOLD, CLI, SRV)
            tmp.cleanup()


# --- what the wire says, per call ------------------------------------------------------

TIMES = ("ts", "ttfb", "duration")


def strip(rec):
    return {k: v for k, v in rec.items() if k not in TIMES}


def connection(run, client):
    """(client port, {stream id: Stream}) of the one connection `client` (its summary)
    made to grpc-srv, as the capture shows it."""
    cport, conn = connection_of(run, client)
    return cport, conn["streams"]


def connection_of(run, client):
    """(client port, the oracle's connection) of `client`."""
    conns = [(cport, c) for (ip, cport), c in run.oracle.items() if ip == client["local_ip"]
             and client["started"] - CLOCK <= c["first"] <= client["ended"] + CLOCK]
    assert len(conns) == 1, (client["local_ip"], client["started"], client["ended"],
                             {k: c["first"] for k, c in run.oracle.items()})
    cport, conn = conns[0]
    assert conn["syn"], "tcpdump started before the client: the capture has the SYN"
    return cport, conn


def server_of(client):
    """The server address a client's summary says it called."""
    return client["target"].rpartition(":")[0].strip("[]")


def wire_record(run, client, cport, st, depth, container=SRV):
    """The record the contract asks of a call, from the capture's stream `st`."""
    status = st.field("response", ":status")
    rec = {"id.orig_h": client["local_ip"], "id.orig_p": cport, "id.resp_h": server_of(client),
           "id.resp_p": PORT, "trans_depth": depth, "method": st.field("request", ":method"),
           "host": st.field("request", ":authority"), "uri": st.field("request", ":path"),
           "status_code": int(status) if status is not None else 0,
           "request_body_len": len(st.data["request"]),
           "response_body_len": len(st.data["response"]), "container": container,
           "version": "2", "stream_id": st.sid,
           "rpc_method": st.field("request", ":path")[1:], "grpc_status": oracle_status(st),
           "request_messages": st.messages("request"),
           "response_messages": st.messages("response")}
    msg = st.field("response", "grpc-message")
    if msg is not None:
        rec["grpc_message"] = urllib.parse.unquote(msg)
    return rec


def full_expected(run):
    """[(client call, Stream, expected record)] of the full run, in call order. Where the
    order of the two directions' frames around a RST_STREAM was too close to call (RACE),
    the view of the stream lpd's record matches, if any (else the capture's)."""
    cport, streams = connection(run, run.full)
    calls = run.full["calls"]
    sids = sorted(streams)
    assert sids == [2 * i + 1 for i in range(len(calls))], sids
    logged = {r.get("stream_id"): strip(r) for r in run.full_records}
    out = []
    for i, (call, sid) in enumerate(zip(calls, sids)):
        views = [(v, wire_record(run, run.full, cport, v, i + 1))
                 for v in streams[sid].views(RACE)]
        out.append((call, *next((vw for vw in views if vw[1] == logged.get(sid)), views[0])))
    return out


def status_name(call, st):
    """The status lpd must report: the wire's (Slow: CANCELLED or DEADLINE_EXCEEDED)."""
    return STATUS[oracle_status(st)]


# --- 0. the apps and the oracle agree (they must, before lpd is held to them) -------------

def test_client_did_what_the_script_says(run):
    got = [(c["method"].split("/")[1], c["status"], c["sent"], c["received"])
           for c in run.full["calls"]]
    assert got == [("Unary", "OK", 1, 1), ("Unary", "OK", 1, 1),
                   ("ServerStream", "OK", 1, 5), ("ServerStream", "OK", 1, 3),
                   ("BidiStream", "OK", 4, 4), ("BidiStream", "OK", 2, 2),
                   ("NotFound", "NOT_FOUND", 1, 0), ("NotFound", "NOT_FOUND", 1, 0),
                   ("Unavailable", "UNAVAILABLE", 1, 0), ("Slow", "DEADLINE_EXCEEDED", 1, 0),
                   ("Unary", "OK", 1, 1)]
    assert run.full["calls"][1]["sent_bytes"] == [100_000] == run.full["calls"][1]["received_bytes"]
    assert [len(p) for p in run.hold["phases"]] == [HOLD_BEFORE, HOLD_AFTER]
    assert all(c["status"] in ("OK", "NOT_FOUND") for c in run.hold["calls"])


def test_the_capture_agrees_with_the_client(run):
    for call, st, want in full_expected(run):
        assert st.is_grpc(), st.sid
        assert "/" + call["method"] == want["uri"]
        assert (want["request_messages"], want["response_messages"]) == \
            (call["sent"], call["received"]), (call, want)
        assert want["request_body_len"] == sum(call["sent_bytes"]) + 5 * call["sent"]
        assert want["response_body_len"] == sum(call["received_bytes"]) + 5 * call["received"]
        if call["method"].endswith("/Slow"):
            assert want["grpc_status"] in (1, 4), want
        else:
            assert want["grpc_status"] == call["code"], (call, want)
        if call["details"] is not None and not call["method"].endswith("/Slow"):
            assert want["grpc_message"] == call["details"], (call, want)


# --- 1.-3. Prometheus ------------------------------------------------------------------------

def test_done_when_calls_in_the_scrape_per_method_and_status(run):
    want = collections.Counter((call["method"], status_name(call, st))
                               for call, st, _ in full_expected(run))
    got = rpc_counts(run.full_metrics)
    assert got == want, {"different": {k: (v, got.get(k)) for k, v in want.items()
                                       if got.get(k) != v},
                         "unexpected": {k: v for k, v in got.items() if k not in want}}
    for labels in series(run.full_metrics, RPC + "_count"):
        d = dict(labels)
        assert (d["server_address"], d["server_port"], d["container"]) == \
            (run.srv_ip, str(PORT), SRV), d


def test_call_durations_are_plausible(run):
    sums = {}
    for labels, v in series(run.full_metrics, RPC + "_sum").items():
        d = dict(labels)
        sums[(d["rpc_method"], d["rpc_response_status_code"])] = v
    total = sum(sums.values())
    assert 0 < total <= (run.t1 - run.t0) + 1, (total, run.t1 - run.t0)
    slow = [v for (m, _), v in sums.items() if m == f"{SERVICE}/Slow"]
    assert len(slow) == 1 and 0.2 <= slow[0] < 3, sums
    for labels, v in series(run.full_metrics, RPC + "_bucket").items():
        d = dict(labels)
        if d["le"] == "+Inf":
            key = frozenset((k, x) for k, x in d.items() if k != "le")
            assert v == run.full_metrics[(RPC + "_count", key)], d


def test_message_counters(run):
    msgs, size = collections.Counter(), collections.Counter()
    for call in run.full["calls"]:
        msgs[(call["method"], "request")] += call["sent"]
        msgs[(call["method"], "response")] += call["received"]
        size[(call["method"], "request")] += sum(call["sent_bytes"])
        size[(call["method"], "response")] += sum(call["received_bytes"])

    def got(name):
        out = {}
        for labels, v in series(run.full_metrics, name).items():
            d = dict(labels)
            assert set(d) == {"rpc_method", "direction", "server_address", "server_port",
                              "container"}, d
            assert (d["server_address"], d["server_port"], d["container"]) == \
                (run.srv_ip, str(PORT), SRV), d
            if v:
                out[(d["rpc_method"], d["direction"])] = v
        return out

    assert got("lpd_rpc_messages_total") == {k: v for k, v in msgs.items() if v}
    by = got("lpd_rpc_message_bytes_total")
    assert set(by) == {k for k, v in size.items() if v}, (by, size)
    for k, v in by.items():
        assert v in (size[k], size[k] + 5 * msgs[k]), (k, v, size[k], msgs[k])


def test_grpc_calls_are_not_http_requests_and_nothing_failed_to_parse(run):
    http = {labels: v for labels, v in series(run.full_metrics, HTTP_HIST + "_count").items()
            if dict(labels).get("server_port") == str(PORT)}
    assert http == {}, http
    errors = {dict(k).get("reason"): v for k, v in
              series(run.full_metrics, "lpd_http_parse_errors_total").items() if v}
    assert errors == {}, errors


# --- 4.-5. the log, the documents, tshark ---------------------------------------------------

def test_log_records_are_exact(run):
    expected = full_expected(run)
    recs = run.full_records
    assert len(recs) == len(expected), recs
    by_sid = {}
    for rec in recs:
        assert rec.get("stream_id") not in by_sid, ("two records for one stream", rec)
        by_sid[rec.get("stream_id")] = rec
    for call, st, want in expected:
        rec = by_sid.get(st.sid)
        assert rec is not None, (st.sid, want, recs)
        assert strip(rec) == want, {"lpd": strip(rec), "wire": want, "client": call}
        assert run.t0 - 0.5 <= rec["ts"] <= run.t1 + 0.5, (rec, run.t0, run.t1)
        assert 0 <= rec["duration"] < 5, rec
        if "ttfb" in rec:
            assert 0 <= rec["ttfb"] <= rec["duration"], rec
        else:
            assert rec["status_code"] == 0, rec


def test_tshark_oracle_every_stream_lpd_logged_and_no_more(run):
    """(stream, :method, :authority, :path, :status, grpc-status, grpc-message, DATA bytes,
    messages) of every stream tshark decoded on the full run's connection = lpd's."""
    cport, streams = connection(run, run.full)
    fields = ("stream_id", "method", "host", "uri", "status_code", "grpc_status",
              "grpc_message", "request_body_len", "response_body_len", "request_messages",
              "response_messages")
    wire = sorted(tuple(want.get(f) for f in fields) for _, _, want in full_expected(run))
    assert len(wire) == len(streams)
    lpd = sorted(tuple(r.get(f) for f in fields) for r in run.full_records
                 if (r["id.orig_h"], r["id.orig_p"]) == (run.full["local_ip"], cport))
    assert lpd == wire


def test_api_requests_and_http_document(run):
    status, doc = run.views["/api/requests"]
    assert status == 200
    assert doc["servers"] == {SRV: run.full_records[::-1]}, doc["servers"].keys()
    status, doc = run.views["/api/http"]
    assert status == 200 and "rpc" in doc, doc
    expected = full_expected(run)
    statuses = collections.Counter(status_name(c, st) for c, st, _ in expected)
    methods = collections.Counter(c["method"] for c, _, _ in expected)
    rpc = doc["rpc"]
    assert set(rpc) == {SRV}, rpc
    got = rpc[SRV]
    assert {k: got.get(k) for k in ("calls", "errors", "statuses", "methods")} == \
        {"calls": len(expected), "errors": len(expected) - statuses["OK"],
         "statuses": dict(statuses), "methods": dict(methods)}, got
    assert 0 <= got["p50"] <= got["p95"] <= got["p99"] < 5, got


# --- 6. mid-connection -------------------------------------------------------------------------

RPC_FIELDS = ("rpc_method", "grpc_status", "grpc_message", "request_messages",
              "response_messages")


def hold_calls(run):
    """(client port, [(client call, Stream, lpd record)]) of the calls made after lpd
    started, the oracle's fields marked as a reader joining there knows them."""
    cport, conn = connection_of(run, run.hold)
    streams = conn["streams"]
    sids = sorted(streams)
    assert sids == [2 * i + 1 for i in range(HOLD_BEFORE + HOLD_AFTER)], sids
    joined_at(conn, sids[HOLD_BEFORE])
    after = [streams[s] for s in sids[HOLD_BEFORE:]]
    recs = run.hold_records
    assert [r.get("stream_id") for r in recs] == [st.sid for st in after], recs
    for call, st in zip(run.hold["phases"][1], after):
        assert "/" + call["method"] == st.field("request", ":path")
        assert st.is_grpc(), "precondition: the wire says application/grpc"
        if call["method"] in NEW_IN_HOLD:
            assert st.field_rep("request", ":path") == ("/" + call["method"], False), \
                "precondition: a :path never sent before is a literal"
        if call["method"] in OLD_IN_HOLD:
            assert st.field_rep("request", ":path") == ("/" + call["method"], True), \
                "precondition: a :path sent before lpd joined is indexed from then"
    return cport, list(zip(run.hold["phases"][1], after, recs))


def test_mid_connection_records_are_exact_where_known_and_unknown_elsewhere(run):
    """README, Joined mid-connection: what refers to a known entry, the static table or
    a literal is exact; what refers to an entry inserted before lpd joined is "_OTHER"
    (method, path; status_code 0) or not known (grpc_status null); a stream is a gRPC call
    only where a content-type lpd could read says so. Known/unknown per field from tshark,
    which has the connection from its start."""
    cport, calls = hold_calls(run)
    depths, seen = [], collections.Counter()
    for call, st, rec in calls:
        path, path_unk = st.field_rep("request", ":path")
        meth, meth_unk = st.field_rep("request", ":method")
        auth, auth_unk = st.field_rep("request", ":authority")
        status, status_unk = st.field_rep("response", ":status")
        seen[path_unk] += 1
        assert (rec["id.orig_h"], rec["id.orig_p"], rec["id.resp_h"], rec["id.resp_p"]) == \
            (run.hold["local_ip"], cport, run.srv_ip6, PORT), rec
        assert (rec["version"], rec["container"]) == ("2", SRV), rec
        assert rec["uri"] == ("_OTHER" if path_unk else path), (rec, path, path_unk)
        assert rec["method"] == ("_OTHER" if meth_unk else meth), (rec, meth, meth_unk)
        if auth_unk:
            assert rec.get("host", "_OTHER") == "_OTHER", (rec, auth)
        else:
            assert rec.get("host") == auth, (rec, auth)
        assert rec["status_code"] == (0 if status_unk else int(status)), (rec, status)
        assert (rec["request_body_len"], rec["response_body_len"]) == \
            (len(st.data["request"]), len(st.data["response"])), rec
        known_grpc = any(not unk and (ct or "").startswith("application/grpc")
                         for ct, unk in (st.field_rep(d, "content-type")
                                         for d in ("request", "response")))
        if known_grpc:
            gstat, gstat_unk = st.field_rep("response", "grpc-status")
            msg = st.field("response", "grpc-message")
            assert rec.get("rpc_method") == ("_OTHER" if path_unk else path[1:]), rec
            assert rec.get("grpc_status") == (None if gstat_unk or gstat is None
                                              else int(gstat)), (rec, gstat)
            assert rec.get("grpc_message") == (urllib.parse.unquote(msg) if msg else None), rec
            assert (rec["request_messages"], rec["response_messages"]) == \
                (call["sent"], call["received"]), (rec, call)
        else:
            assert not set(RPC_FIELDS) & set(rec), \
                ("no content-type lpd could read says gRPC: an HTTP/2 request", rec)
        depths.append(rec["trans_depth"])
    assert len(calls) == HOLD_AFTER
    assert depths == sorted(depths) and len(set(depths)) == len(depths), depths
    assert seen[True] and seen[False], ("the run must have paths of both kinds", seen)


def test_mid_connection_every_call_counted_once_as_logged(run):
    """The 5 calls are counted once each, in the histogram their record says: gRPC calls
    (rpc_method) in rpc_server_call_duration_seconds, others in the HTTP one."""
    _, calls = hold_calls(run)
    want_rpc = collections.Counter(
        (r["rpc_method"], STATUS[r["grpc_status"]] if r["grpc_status"] is not None
         else "_OTHER") for _, _, r in calls if "rpc_method" in r)
    want_http = collections.Counter((r["method"], str(r["status_code"]))
                                    for _, _, r in calls if "rpc_method" not in r)
    got_rpc = rpc_counts(run.hold_metrics)
    got_http = collections.Counter()
    for labels, v in series(run.hold_metrics, HTTP_HIST + "_count").items():
        d = dict(labels)
        if d["server_port"] == str(PORT):
            assert (d["server_address"], d["container"], d["network_protocol_version"]) == \
                (run.srv_ip6, SRV, "2"), d
            got_http[(d["http_request_method"], d["http_response_status_code"])] += v
    assert (got_rpc, got_http) == (want_rpc, want_http)
    assert sum(got_rpc.values()) + sum(got_http.values()) == HOLD_AFTER


def test_mid_connection_unknown_fields_are_counted(run):
    others = [r for r in run.hold_records
              if "_OTHER" in (r.get("uri"), r.get("rpc_method"), r.get("method"), r.get("host"))
              or ("rpc_method" in r and r.get("grpc_status") is None)]
    others += [k for k in rpc_counts(run.hold_metrics) if "_OTHER" in k]
    unknown = sum(v for labels, v in series(run.hold_metrics, "lpd_http_parse_errors_total")
                  .items() if dict(labels).get("reason") == "hpack_unknown")
    if others:
        assert unknown > 0, others
    bad = {dict(k).get("reason"): v for k, v in
           series(run.hold_metrics, "lpd_http_parse_errors_total").items()
           if v and dict(k).get("reason") != "hpack_unknown"}
    assert bad == {}, bad


# --- offline: the same capture through lpd -r -----------------------------------------------

def test_replay_of_the_capture_logs_every_call_exactly(run):
    """lpd -r on the bridge's capture sees both connections from their SYN: every call of
    both clients (the held one's 8, the full one's 11) exact against tshark, container ""."""
    assert r_ok(run)
    want = []
    for client in (run.hold, run.full):
        cport, streams = connection(run, client)
        for depth, sid in enumerate(sorted(streams), 1):
            want.append(wire_record(run, client, cport, streams[sid], depth, container=""))
    assert len(want) == HOLD_BEFORE + HOLD_AFTER + FULL_CALLS
    key = lambda r: (r["id.orig_h"], r["id.orig_p"], r["stream_id"])    # noqa: E731
    got = sorted(map(strip, run.replay_records), key=key)
    assert got == sorted(want, key=key)


def test_replay_rpc_document(run):
    assert r_ok(run)
    rpc = run.replay_doc["http"]["rpc"]
    want = {}
    for client in (run.hold, run.full):
        cport, streams = connection(run, client)
        sts = [streams[s] for s in sorted(streams)]
        statuses = collections.Counter(STATUS[oracle_status(st)] for st in sts)
        want[f"{server_of(client)}:{PORT}"] = {
            "calls": len(sts), "errors": len(sts) - statuses["OK"], "statuses": dict(statuses),
            "methods": dict(collections.Counter(st.field("request", ":path")[1:]
                                                for st in sts))}
    assert {srv: {k: doc.get(k) for k in ("calls", "errors", "statuses", "methods")}
            for srv, doc in rpc.items()} == want


def r_ok(run):
    assert run.replay_exit == 0, run.replay_stderr
    assert "Traceback" not in run.replay_stderr, run.replay_stderr
    return True


# --- 7. ----------------------------------------------------------------------------------------

def test_lpd_dropped_nothing(run):
    """Precondition of every exact count above: lpd's ring lost no frame."""
    for m in (run.hold_metrics, run.full_metrics):
        drops = series(m, "lpd_capture_drops_total")
        assert drops and not any(drops.values()), drops


def test_both_lpds_exit_cleanly(run):
    for code, err in ((run.hold_exit, run.hold_stderr), (run.full_exit, run.full_stderr)):
        assert code == 0, err
        assert "Traceback" not in err, err
