"""Connection tracking (--connections, --conn-log) on a running lpd, with real TCP and UDP
between the two namespaces: lpd runs in ns_b on veth-b, clients and servers are small
Python processes (PEER below) driven line by line from the test, so every byte sent is
known and every step happens in a known order.

One lpd serves most scenarios (the `live` fixture runs them all, then each test checks
its part): handshake/data/FIN both ways (SF) with the veth's own counters, SYN to a
closed port (REJ), SYN dropped by a filter in the peer namespace (S0; a classic-BPF tc
filter, the kernel has neither netfilter tools nor tc's gact here), abort by each side
(RSTO, RSTR), half-close, IPv6, UDP request/response and one-way, a real kernel
retransmission (the first data segment dropped by a tc filter in the peer namespace)
and a hand-built exchange with duplicate segments (injected), lpd started in the middle
of long connections (no 'S', '^' when the port heuristic flips), pid/comm of a client,
/api/connections filters and the metrics against the log, the tcpdump capture of the
same traffic replayed with -r, SIGHUP reopening the log (and UDP's idle timeout).

Packet and IP-byte counts are checked against tcpdump's capture of veth-b (and, for the
first exchange, against the veth's kernel counters); payload bytes against what the
peers sent. Offloads are off (netns.Pair's default): every frame is a wire frame. One
transfer runs with them on (super-frames count as the wire frames they stand for, and
keep their place among the others), and a SYN flood against --conn-max (evictions,
memory) has an lpd of its own."""
import collections
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import netns
import packets
import lpd as lpd_module
from harness import LPD, PORT, Lpd, api, metrics, read_log, rss_kib, timed_frames, value, wait_for

pytestmark = pytest.mark.live

OTHER_MAC = "02:00:0a:c7:00:99"     # neither end's: frames to it reach lpd, not B's stack
CLOSE_WAIT = 12.0                   # a closed TCP connection lingers 5 s, timers run at 1 s ticks

# A TCP or UDP endpoint in a namespace, driven by one command per stdin line, answering
# one JSON line each: send N, recv N (exactly N bytes), eof (read to the end), shut
# (SHUT_WR), close, abort (SO_LINGER 0, then close: a RST), info, exit. A listener
# accepts at its first command. Every blocking call has a timeout.
PEER = r"""
import ctypes, json, socket, struct, sys
mode, host, port, opts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
if opts.get("comm"):
    ctypes.CDLL(None).prctl(15, opts["comm"].encode(), 0, 0, 0)          # PR_SET_NAME
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
udp = mode.startswith("udp")
kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM

def say(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()

def addr(a):
    return [a[0], a[1]]

conn = lsock = peer = None
if mode.endswith("listen"):
    lsock = socket.socket(fam, kind)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.settimeout(10)
    if udp:
        conn = lsock
    else:
        lsock.listen(8)
    say(ok=True, local=addr(lsock.getsockname()))
else:
    conn = socket.socket(fam, kind)
    if opts.get("syncnt"):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, opts["syncnt"])
    if opts.get("sport"):
        conn.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", opts["sport"]))
    conn.settimeout(10)
    try:
        conn.connect((host, port))
    except OSError as e:
        say(ok=False, errno=e.errno, error=str(e))
        sys.exit(0)
    say(ok=True, local=addr(conn.getsockname()), peer=addr(conn.getpeername()))
for line in sys.stdin:
    cmd, *args = line.split() or [""]
    try:
        if conn is None:
            conn, _ = lsock.accept()
            conn.settimeout(10)
        if cmd == "send":
            data = b"x" * int(args[0])
            if udp:
                conn.sendto(data, peer) if peer else conn.send(data)
            else:
                conn.sendall(data)
            say(ok=True)
        elif cmd == "recv":
            want, got = int(args[0]), 0
            while got < want:
                if udp:
                    b, peer = conn.recvfrom(65536)
                else:
                    b = conn.recv(want - got)
                if not b:
                    break
                got += len(b)
            say(ok=got == want, got=got)
        elif cmd == "eof":
            got = 0
            while True:
                b = conn.recv(65536)
                if not b:
                    break
                got += len(b)
            say(ok=True, got=got)
        elif cmd == "shut":
            conn.shutdown(socket.SHUT_WR)
            say(ok=True)
        elif cmd == "close":
            conn.close()
            say(ok=True)
        elif cmd == "abort":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            say(ok=True)
        elif cmd == "info":
            say(ok=True, local=addr(conn.getsockname()), peer=addr(conn.getpeername()))
        elif cmd == "exit":
            say(ok=True)
            break
        else:
            say(ok=False, error="unknown command " + cmd)
    except OSError as e:
        say(ok=False, errno=e.errno, error=str(e))
"""


class Peer:
    """One PEER process in a namespace: `listen` or `connect` (`udp-` for UDP)."""

    def __init__(self, pair, ns, mode, host, port, wait=True, **opts):
        self.err = tempfile.TemporaryFile()
        self.proc = pair.popen(ns, [sys.executable, "-c", PEER, mode, host, str(port),
                                    json.dumps(opts)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        self.buf = b""
        self.hello = self.read() if wait else None

    def read(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"peer {self.proc.args[4:7]} silent for {timeout} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.err.seek(0)
                    raise AssertionError(f"peer exited {self.proc.wait(5)}: "
                                         f"{self.err.read().decode(errors='replace')}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def result(self, timeout=15.0):
        """The first line of a peer started with wait=False."""
        if self.hello is None:
            self.hello = self.read(timeout)
        return self.hello

    def start(self, cmd):
        """Send a command without waiting for its answer (finish() reads it)."""
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, cmd="", timeout=15.0, ok=True):
        answer = self.read(timeout)
        if ok is not None:
            assert answer["ok"] == ok, (cmd, answer)
        return answer

    def do(self, cmd, timeout=15.0, ok=True):
        self.start(cmd)
        return self.finish(cmd, timeout, ok)

    def end(self):
        if self.proc.poll() is None:
            try:
                self.do("exit", 5, ok=None)
            except (AssertionError, OSError):
                pass
        netns.stop(self.proc)

    @property
    def local(self):
        return tuple(self.hello["local"])


def connect(pair, ns, host, port, **opts):
    return Peer(pair, ns, "connect", host, port, **opts)


def listen(pair, ns, host, port, **opts):
    return Peer(pair, ns, "listen", host, port, **opts)


def conn_id(proto, orig, resp):
    """The 5-tuple a log line is found by: (proto, orig_h, orig_p, resp_h, resp_p)."""
    return (proto, orig[0], orig[1], resp[0], resp[1])


def rec_id(rec):
    return (rec["proto"], rec["id.orig_h"], rec["id.orig_p"], rec["id.resp_h"], rec["id.resp_p"])


def row_id(row):
    return (row["proto"], row["orig_h"], row["orig_p"], row["resp_h"], row["resp_p"])


def fast_metrics(pair):
    """metrics(), read from this process (no helper process: a quick look)."""
    status, body = netns.http_get(pair.ns_b, "127.0.0.1", PORT, "/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


# --- tc: a drop filter in the peer namespace (classic BPF, direct action) ---------------
# At ingress cls_bpf sees the frame from its Ethernet header: drop IPv4 TCP to `port`,
# leave anything else to the next filter (TC_ACT_UNSPEC; TC_ACT_OK would end the chain).
TC_ACT_UNSPEC, TC_ACT_SHOT = 0xFFFFFFFF, 2


def tc_drop_tcp_port(pair, ns, ifname, port, pref):
    prog = [(0x30, 0, 0, 23),                  # ldb [23]       IP protocol
            (0x15, 0, 4, 6),                   # jeq #6 (TCP)
            (0xb1, 0, 0, 14),                  # ldxb 4*([14]&0xf)
            (0x48, 0, 0, 16),                  # ldh [x+16]     TCP destination port
            (0x15, 0, 1, port),
            (0x06, 0, 0, TC_ACT_SHOT),
            (0x06, 0, 0, TC_ACT_UNSPEC)]
    code = ",".join([str(len(prog))] + [" ".join(map(str, i)) for i in prog])
    pair.run(ns, ["tc", "qdisc", "replace", "dev", ifname, "ingress"])
    pair.run(ns, ["tc", "filter", "add", "dev", ifname, "ingress", "pref", str(pref),
                  "protocol", "ip", "bpf", "da", "bytecode", code])


def tc_del(pair, ns, ifname, pref):
    pair.run(ns, ["tc", "filter", "del", "dev", ifname, "ingress", "pref", str(pref)])


# --- frames to inject --------------------------------------------------------------------

def tcp_frame(src, dst, sport, dport, flags, seq, ack, payload=b"", dst_mac=OTHER_MAC,
              src_mac=netns.MAC_A):
    """An IPv4 TCP frame with valid checksums."""
    seg = packets.tcp(sport, dport, flags, seq, ack, window=64240, payload=payload)
    pseudo = packets.ip4(src) + packets.ip4(dst) + struct.pack("!BBH", 0, 6, len(seg))
    seg = seg[:16] + struct.pack("!H", netns.checksum(pseudo + seg)) + seg[18:]
    return packets.ether(dst_mac, src_mac, packets.ETH_IP, packets.ipv4(src, dst, 6, seg, df=True))


# --- tcpdump's capture as the oracle of packet counts -------------------------------------

def flows(frames):
    """{(proto, src, sport, dst, dport): [packets, IP bytes, payload bytes]} per direction."""
    import ipaddress
    out = collections.defaultdict(lambda: [0, 0, 0])
    for _, f in frames:
        et = struct.unpack_from("!H", f, 12)[0]
        if et == 0x0800:
            ihl = (f[14] & 15) * 4
            ip_len, proto = struct.unpack_from("!H", f, 16)[0], f[23]
            src, dst = str(ipaddress.ip_address(f[26:30])), str(ipaddress.ip_address(f[30:34]))
            l4, l4_len = 14 + ihl, ip_len - ihl
        elif et == 0x86DD:
            plen, proto = struct.unpack_from("!HB", f, 18)
            src, dst = str(ipaddress.ip_address(f[22:38])), str(ipaddress.ip_address(f[38:54]))
            ip_len, l4, l4_len = plen + 40, 54, plen
        else:
            continue
        if proto not in (6, 17):
            continue
        sport, dport = struct.unpack_from("!HH", f, l4)
        payload = l4_len - ((f[l4 + 12] >> 4) * 4 if proto == 6 else 8)
        c = out[("tcp" if proto == 6 else "udp", src, sport, dst, dport)]
        c[0] += 1
        c[1] += ip_len
        c[2] += payload
    return out


def check_counts(rec, flow):
    """orig/resp packets and IP bytes of a log line equal the capture's."""
    proto, oh, op, rh, rp = rec_id(rec)
    o, r = flow[(proto, oh, op, rh, rp)], flow[(proto, rh, rp, oh, op)]
    assert (rec["orig_pkts"], rec["orig_ip_bytes"]) == (o[0], o[1]), rec
    assert (rec["resp_pkts"], rec["resp_ip_bytes"]) == (r[0], r[1]), rec


# --- the shared run -----------------------------------------------------------------------

class Run:
    """What the live fixture did and saw."""

    def __init__(self, pair, lpd, log_path, pcap):
        self.pair, self.lpd, self.log_path, self.pcap = pair, lpd, log_path, pcap
        self.ids = {}            # scenario -> expected 5-tuple
        self.sent = {}           # scenario -> (orig payload bytes, resp payload bytes)
        self.times = {}          # scenario -> (wall time before its first packet, after its last)
        self.notes = {}          # scenario -> anything else it recorded
        self.log = []
        self.flow = {}

    def record(self, name):
        matches = [r for r in self.log if rec_id(r) == self.ids[name]]
        assert len(matches) == 1, (name, self.ids[name], matches,
                                   [r for r in self.log if r["id.resp_p"] == self.ids[name][4]])
        return matches[0]


PORTS = {"sf4": 7001, "rej": 7002, "s0": 7003, "rsto": 7004, "rstr": 7005, "half": 7006,
         "sf6": 7007, "rxmit": 7008, "holder": 7009, "bulk": 7010, "closing": 7011,
         "m1": 8080, "m2": 7777, "m3": 7778, "udp": 7012}
# Source ports chosen by the test: below the ephemeral range (32768-60999), so free.
CLIENT_PORTS = {"rej": 30201, "s0": 30202}   # clients that never connect: bound first
UDP_ONEWAY_SPORT = 30009
UDP_SIGHUP_SPORT = 30444
INJ = {"client": 40100, "server": 7013, "isn_c": 1_000_000, "isn_s": 3_000_000_000}


def exchange(client, server, up, down):
    """client sends `up` bytes, server reads them and answers `down` bytes (the sender
    may block until the reader reads: its answer is read after the reader's)."""
    if up:
        client.start(f"send {up}")
        server.do(f"recv {up}")
        client.finish(f"send {up}")
    if down:
        server.start(f"send {down}")
        client.do(f"recv {down}")
        server.finish(f"send {down}")


def close_both(first, second):
    """`first` closes, `second` reads to the end and closes: FIN both ways."""
    first.do("close")
    assert second.do("eof")["got"] == 0
    second.do("close")


def midstream_start(run, pair):
    """Before lpd: three long connections with some data both ways."""
    peers = {}
    for name in ("m1", "m2", "m3"):
        srv = listen(pair, pair.ns_a, pair.ip4_a, PORTS[name])
        cli = connect(pair, pair.ns_b, pair.ip4_a, PORTS[name])
        exchange(cli, srv, 500, 700)
        peers[name] = (cli, srv)
        run.ids[name] = conn_id("tcp", cli.local, (pair.ip4_a, PORTS[name]))
    return peers


def midstream_join(run, pair, peers):
    """lpd is running: m1's server talks first (8080, a likely server port: lpd flips,
    the client is orig, '^'); m2's client talks first (7777: orig is the client); m3's
    server talks first on 7778 (no likely port: the server is taken for orig)."""
    (c1, s1), (c2, s2), (c3, s3) = peers["m1"], peers["m2"], peers["m3"]
    exchange(c1, s1, 0, 1200)
    exchange(c1, s1, 300, 0)
    exchange(c2, s2, 400, 600)
    exchange(c3, s3, 0, 900)
    exchange(c3, s3, 100, 0)
    run.sent.update(m1=(300, 1200), m2=(400, 600))
    m3 = run.ids["m3"]
    run.ids["m3"] = (m3[0], m3[3], m3[4], m3[1], m3[2])       # the server is orig
    run.sent["m3"] = (900, 100)


def scenario_sf4(run, pair):
    pair.settle(quiet=0.3)
    before = pair.link_stats(pair.ns_b, pair.if_b)
    t0 = time.time()
    srv = listen(pair, pair.ns_a, pair.ip4_a, PORTS["sf4"])
    cli = connect(pair, pair.ns_b, pair.ip4_a, PORTS["sf4"])
    exchange(cli, srv, 1000, 2000)
    close_both(cli, srv)
    t1 = time.time()
    pair.settle(quiet=0.3)
    run.notes["sf4_link"] = netns.stats_delta(pair.link_stats(pair.ns_b, pair.if_b), before)
    run.ids["sf4"] = conn_id("tcp", cli.local, (pair.ip4_a, PORTS["sf4"]))
    run.sent["sf4"], run.times["sf4"] = (1000, 2000), (t0, t1)
    cli.end()
    srv.end()


def scenario_rej(run, pair):
    cli = connect(pair, pair.ns_b, pair.ip4_a, PORTS["rej"], wait=False, sport=CLIENT_PORTS["rej"])
    res = cli.result()
    assert not res["ok"] and res["errno"] == 111, res            # ECONNREFUSED
    run.ids["rej"] = ("tcp", pair.ip4_b, CLIENT_PORTS["rej"], pair.ip4_a, PORTS["rej"])
    return cli


def scenario_s0(run, pair):
    """A filter in ns_a drops SYNs to the port; the client (TCP_SYNCNT 1) retransmits
    its SYN and gives up after ~3 s: its result is read at the end."""
    tc_drop_tcp_port(pair, pair.ns_a, pair.if_a, PORTS["s0"], 10)
    run.times["s0"] = (time.time(), None)
    run.ids["s0"] = ("tcp", pair.ip4_b, CLIENT_PORTS["s0"], pair.ip4_a, PORTS["s0"])
    return connect(pair, pair.ns_b, pair.ip4_a, PORTS["s0"], wait=False, syncnt=1,
                   sport=CLIENT_PORTS["s0"])


def scenario_resets(run, pair):
    for name, aborter in (("rsto", "client"), ("rstr", "server")):
        srv = listen(pair, pair.ns_a, pair.ip4_a, PORTS[name])
        cli = connect(pair, pair.ns_b, pair.ip4_a, PORTS[name])
        exchange(cli, srv, 100, 200)
        (cli if aborter == "client" else srv).do("abort")
        run.ids[name] = conn_id("tcp", cli.local, (pair.ip4_a, PORTS[name]))
        run.sent[name] = (100, 200)
        cli.end()
        srv.end()


def scenario_half(run, pair):
    srv = listen(pair, pair.ns_a, pair.ip4_a, PORTS["half"])
    cli = connect(pair, pair.ns_b, pair.ip4_a, PORTS["half"])
    cli.do("send 1000")
    cli.do("shut")                                   # FIN from the client, still reading
    assert srv.do("eof")["got"] == 1000
    srv.do("send 3000")                              # the server goes on sending
    srv.do("send 1500")
    assert cli.do("recv 4500")["got"] == 4500
    srv.do("close")
    assert cli.do("eof")["got"] == 0
    cli.do("close")
    run.ids["half"] = conn_id("tcp", cli.local, (pair.ip4_a, PORTS["half"]))
    run.sent["half"] = (1000, 4500)
    cli.end()
    srv.end()


def scenario_sf6(run, pair):
    t0 = time.time()
    srv = listen(pair, pair.ns_a, pair.ip6_a, PORTS["sf6"])
    cli = connect(pair, pair.ns_b, pair.ip6_a, PORTS["sf6"])
    exchange(cli, srv, 1234, 4321)
    exchange(cli, srv, 10, 0)
    close_both(cli, srv)
    run.ids["sf6"] = conn_id("tcp", cli.local, (pair.ip6_a, PORTS["sf6"]))
    run.sent["sf6"], run.times["sf6"] = (1244, 4321), (t0, time.time())
    cli.end()
    srv.end()


def scenario_udp(run, pair):
    srv = Peer(pair, pair.ns_a, "udp-listen", pair.ip4_a, PORTS["udp"])
    cli = Peer(pair, pair.ns_b, "udp-connect", pair.ip4_a, PORTS["udp"])
    exchange(cli, srv, 100, 300)
    run.ids["udp"] = conn_id("udp", cli.local, (pair.ip4_a, PORTS["udp"]))
    run.sent["udp"] = (100, 300)
    cli.end()
    srv.end()
    # one way, to ns_a's sink on port 9 (it never answers, not even with ICMP)
    assert pair.udp_send(pair.ns_b, pair.ip4_b, pair.ip4_a, [100, 200],
                         sport=UDP_ONEWAY_SPORT) == [100, 200]
    run.ids["udp1"] = ("udp", pair.ip4_b, UDP_ONEWAY_SPORT, pair.ip4_a, netns.SINK_PORT)
    run.sent["udp1"] = (300, 0)


def scenario_rxmit(run, pair):
    """A real retransmission: the client's first data segment is seen by lpd on veth-b
    and dropped at ns_a's ingress; the filter goes, the kernel sends it again."""
    srv = listen(pair, pair.ns_a, pair.ip4_a, PORTS["rxmit"])
    cli = connect(pair, pair.ns_b, pair.ip4_a, PORTS["rxmit"])
    srv.do("info")                                   # accepted: the handshake is over
    tc_drop_tcp_port(pair, pair.ns_a, pair.if_a, PORTS["rxmit"], 20)
    cli.do("send 1000")
    time.sleep(0.1)                                  # the segment (and a tail-loss probe) dropped
    tc_del(pair, pair.ns_a, pair.if_a, 20)
    assert srv.do("recv 1000")["got"] == 1000        # the retransmission got through
    exchange(cli, srv, 0, 500)
    close_both(cli, srv)
    run.ids["rxmit"] = conn_id("tcp", cli.local, (pair.ip4_a, PORTS["rxmit"]))
    run.sent["rxmit"] = (1000, 500)
    cli.end()
    srv.end()


def scenario_injected(run, pair):
    """A whole exchange built by hand, injected from ns_a to a MAC nobody has (lpd sees
    it, B's stack ignores it): duplicate data segments each way."""
    a, b = pair.ip4_a, pair.ip4_b
    cp, sp, c, s = INJ["client"], INJ["server"], INJ["isn_c"], INJ["isn_s"]
    SYN, ACK, PSH, FIN = packets.TCP_SYN, packets.TCP_ACK, packets.TCP_PUSH, packets.TCP_FIN
    d100, d50, d200 = b"a" * 100, b"b" * 50, b"c" * 200

    def o(flags, seq, ack, data=b""):
        return tcp_frame(a, b, cp, sp, flags, seq, ack, data)

    def r(flags, seq, ack, data=b""):
        return tcp_frame(b, a, sp, cp, flags, seq, ack, data, src_mac=netns.MAC_B)
    frames = [
        o(SYN, c, 0),
        r(SYN | ACK, s, c + 1),
        o(ACK, c + 1, s + 1),
        o(PSH | ACK, c + 1, s + 1, d100),
        o(PSH | ACK, c + 1, s + 1, d100),            # retransmission: 'T'
        r(ACK, s + 1, c + 101),
        o(PSH | ACK, c + 101, s + 1, d50),
        o(PSH | ACK, c + 51, s + 1, d100),           # old bytes again: no size, no 2nd 'T'
        r(PSH | ACK, s + 1, c + 151, d200),
        r(PSH | ACK, s + 1, c + 151, d200),          # retransmission: 't'
        o(ACK, c + 151, s + 201),
        o(FIN | ACK, c + 151, s + 201),
        r(FIN | ACK, s + 201, c + 152),
        o(ACK, c + 152, s + 202),
    ]
    pair.inject(pair.ns_a, pair.if_a, frames)
    run.ids["inj"] = ("tcp", a, cp, b, sp)
    run.sent["inj"] = (150, 200)
    run.notes["inj_frames"] = frames


def stable(pair, fetch, tries=8):
    """fetch() twice around the checks' own requests until nothing moved in between."""
    for _ in range(tries):
        first = fetch()
        yield first
        if fetch() == first:
            return
    raise AssertionError("lpd's documents never held still")


def open_phase(run, pair):
    """Connections held open: a client with its own comm, a bigger one, a half-closed
    one; /api/connections and the metrics looked at while they are."""
    peers = []
    for name, comm in (("holder", "lpdt-holder"), ("bulk", None), ("closing", None)):
        srv = listen(pair, pair.ns_a, pair.ip4_a, PORTS[name])
        cli = connect(pair, pair.ns_b, pair.ip4_a, PORTS[name], **({"comm": comm} if comm else {}))
        peers.append((cli, srv))
        run.ids[name] = conn_id("tcp", cli.local, (pair.ip4_a, PORTS[name]))
    (hc, hs), (bc, bs), (cc, cs) = peers
    exchange(hc, hs, 111, 222)
    exchange(bc, bs, 20000, 30000)
    exchange(cc, cs, 50, 60)
    cc.do("shut")
    assert cs.do("eof")["got"] == 0                # the FIN: "closing"
    run.sent.update(holder=(111, 222), bulk=(20000, 30000), closing=(50, 60))
    run.notes["holder_pid"] = hc.proc.pid

    def holder_row():
        doc = api(pair, "/api/connections")[1]
        rows = [r for r in doc["connections"] if row_id(r) == run.ids["holder"]]
        return rows and rows[0]["pid"] is not None and rows[0]
    run.notes["holder_row"] = wait_for(holder_row, 6, 0.2)

    # The documents and the gauges, from a moment where nothing moves.
    views = {}
    for _ in stable(pair, lambda: api(pair, "/api/connections")):
        views = {"all": api(pair, "/api/connections")}
        for q in ("top=2", "state=established", "state=closing", "state=connecting",
                  "state=reset", "top=1&state=established", "top=0", "state=bogus", "top=x"):
            views[q] = api(pair, "/api/connections?" + q)
        views["metrics"] = fast_metrics(pair)
    run.notes["views"] = views
    return peers


@pytest.fixture(scope="module", params=["cbpf", "auto"])   # auto: ebpf where it can
def live(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("conn")
    with netns.Pair() as pair:
        run = Run(pair, None, tmp / "conn.json", tmp / "veth-b.pcap")
        mid = midstream_start(run, pair)
        time.sleep(0.3)                              # every ACK sent: nothing in flight
        run.lpd = Lpd(pair, "--mapping-url", "none", "--interval", "1", "--conn-log",
                      str(run.log_path), "--conn-timeout-udp", "2", "--engine", request.param)
        dump = netns.start_tcpdump(pair.ns_b, pair.if_b, ["-U", "-w", str(run.pcap),
                                                          "--time-stamp-precision", "nano"])
        try:
            scenario_sf4(run, pair)
            run.notes["mid_before"] = api(pair, "/api/connections")[1]
            midstream_join(run, pair, mid)
            run.notes["mid_rows"] = wait_for(lambda: (lambda rows: len(rows) == 3 and rows)(
                {row_id(r): r for r in api(pair, "/api/connections")[1]["connections"]
                 if row_id(r) in (run.ids["m1"], run.ids["m2"], run.ids["m3"])
                 and r["orig_bytes"] + r["resp_bytes"] > 0}), 5, 0.2)
            rej = scenario_rej(run, pair)
            s0 = scenario_s0(run, pair)
            scenario_resets(run, pair)
            scenario_half(run, pair)
            scenario_sf6(run, pair)
            scenario_udp(run, pair)
            scenario_rxmit(run, pair)
            scenario_injected(run, pair)
            opened = open_phase(run, pair)
            # ends: midstream ones (client first), the held ones
            for cli, srv in list(mid.values()) + opened[:2]:
                close_both(cli, srv)
            (cc, cs) = opened[2]
            cs.do("close")
            assert cc.do("eof")["got"] == 0
            cc.do("close")
            res = s0.result(15)
            assert not res["ok"] and res["errno"] == 110, res       # ETIMEDOUT
            run.times["s0"] = (run.times["s0"][0], time.time())
            for p in [rej, s0] + [x for pr in list(mid.values()) + opened for x in pr]:
                p.end()

            expected = set(run.ids.values())
            got = wait_for(lambda: expected <= {rec_id(r) for r in read_log(run.log_path)},
                           CLOSE_WAIT, 0.25)
            run.log = read_log(run.log_path)
            assert got, f"missing lines: {expected - {rec_id(r) for r in run.log}}"
            time.sleep(1.2)                          # a last tick: nothing else comes
        finally:
            netns.stop(dump)
        run.log = read_log(run.log_path)
        run.flow = flows(timed_frames(run.pcap))
        yield run


# --- the scenarios' checks ----------------------------------------------------------------

def check_sizes(run, name, rec):
    up, down = run.sent[name]
    assert (rec["orig_bytes"], rec["resp_bytes"]) == (up, down), rec


def test_sf_handshake_data_fin_both_ways(live):
    rec = live.record("sf4")
    assert rec["conn_state"] == "SF", rec
    h = rec["history"]
    assert h.startswith("ShAD") and set(h) <= set("ShADadFf") and all(c in h for c in "dFf"), h
    assert h.index("F") < h.index("f"), h            # the client closed first
    check_sizes(live, "sf4", rec)
    check_counts(rec, live.flow)
    # the veth's own counters saw exactly this connection's frames
    link = live.notes["sf4_link"]
    pkts = rec["orig_pkts"] + rec["resp_pkts"]
    assert link["tx_packets"] == rec["orig_pkts"] and link["rx_packets"] == rec["resp_pkts"], (link, rec)
    assert link["tx_bytes"] + link["rx_bytes"] == rec["orig_ip_bytes"] + rec["resp_ip_bytes"] + 14 * pkts
    # packets: SYN, SYN-ACK, the data in MSS-sized segments, at least one ACK each way, FINs
    assert rec["orig_pkts"] >= 4 and rec["resp_pkts"] >= 4
    t0, t1 = live.times["sf4"]
    assert t0 - 0.01 <= rec["ts"] <= t1 and 0 < rec["duration"] <= t1 - t0 + 0.01, (t0, t1, rec)
    assert (rec["proto"], rec["id.orig_h"], rec["id.resp_h"], rec["id.resp_p"]) == \
        ("tcp", live.pair.ip4_b, live.pair.ip4_a, PORTS["sf4"])
    assert set(rec) >= {"ts", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "duration",
                        "orig_bytes", "resp_bytes", "conn_state", "history", "orig_pkts",
                        "orig_ip_bytes", "resp_pkts", "resp_ip_bytes"}


def test_syn_to_a_closed_port_is_rej(live):
    rec = live.record("rej")
    assert (rec["conn_state"], rec["history"]) == ("REJ", "Sr"), rec
    assert (rec["orig_pkts"], rec["resp_pkts"]) == (1, 1)
    assert rec["resp_ip_bytes"] == 40                # RST+ACK, no options
    assert (rec["orig_bytes"], rec["resp_bytes"]) == (0, 0)
    check_counts(rec, live.flow)


def test_syn_dropped_by_the_peer_is_s0(live):
    rec = live.record("s0")
    assert (rec["conn_state"], rec["history"]) == ("S0", "S"), rec
    # the SYN and its retransmissions (how many in ~3 s is the kernel's business)
    assert rec["orig_pkts"] >= 2 and rec["orig_ip_bytes"] == 60 * rec["orig_pkts"], rec
    assert (rec["resp_pkts"], rec["resp_ip_bytes"]) == (0, 0), rec
    assert (rec["orig_bytes"], rec["resp_bytes"]) == (0, 0)
    t0, t1 = live.times["s0"]
    assert 0.5 < rec["duration"] < t1 - t0, rec
    check_counts(rec, live.flow)


@pytest.mark.parametrize("name, state, letter", [("rsto", "RSTO", "R"), ("rstr", "RSTR", "r")])
def test_abort_by_each_side(live, name, state, letter):
    rec = live.record(name)
    assert rec["conn_state"] == state, rec
    h = rec["history"]
    assert h.startswith("ShAD") and h.endswith(letter) and "d" in h, h
    assert h.count("R") + h.count("r") == 1, h
    check_sizes(live, name, rec)
    check_counts(rec, live.flow)


def test_half_close_is_sf_with_both_sizes(live):
    rec = live.record("half")
    assert rec["conn_state"] == "SF", rec
    h = rec["history"]
    assert h.startswith("ShAD") and h.index("F") < h.index("d") < h.index("f"), h
    check_sizes(live, "half", rec)
    check_counts(rec, live.flow)


def test_ipv6_tcp(live):
    rec = live.record("sf6")
    assert rec["conn_state"] == "SF" and rec["history"].startswith("ShAD"), rec
    assert (rec["id.orig_h"], rec["id.resp_h"]) == (live.pair.ip6_b, live.pair.ip6_a)
    check_sizes(live, "sf6", rec)
    check_counts(rec, live.flow)                     # IPv6: payload length + 40, every packet


def test_udp_request_response_and_one_way(live):
    rec = live.record("udp")
    assert (rec["conn_state"], rec["history"]) == ("SF", "Dd"), rec
    check_sizes(live, "udp", rec)
    assert (rec["orig_pkts"], rec["orig_ip_bytes"], rec["resp_pkts"], rec["resp_ip_bytes"]) == \
        (1, 128, 1, 328), rec
    one = live.record("udp1")
    assert (one["conn_state"], one["history"]) == ("S0", "D"), one
    check_sizes(live, "udp1", one)
    assert (one["orig_pkts"], one["orig_ip_bytes"], one["resp_pkts"], one["resp_ip_bytes"]) == \
        (2, 356, 0, 0), one


def test_real_retransmission_is_not_counted_twice(live):
    rec = live.record("rxmit")
    assert rec["conn_state"] == "SF", rec
    assert "T" in rec["history"], rec
    check_sizes(live, "rxmit", rec)
    check_counts(rec, live.flow)
    proto, oh, op, rh, rp = rec_id(rec)
    assert live.flow[(proto, oh, op, rh, rp)][2] > 1000, "the capture has the data twice"


def test_injected_duplicates_are_not_counted_twice(live):
    rec = live.record("inj")
    frames = live.notes["inj_frames"]
    assert rec["conn_state"] == "SF" and rec["history"] == "ShADTadtFf", rec
    check_sizes(live, "inj", rec)
    orig = [f for f in frames if f[26:30] == packets.ip4(live.pair.ip4_a)]
    resp = [f for f in frames if f not in orig]
    assert (rec["orig_pkts"], rec["resp_pkts"]) == (len(orig), len(resp)) == (9, 5)
    ip_len = lambda f: struct.unpack_from("!H", f, 16)[0]     # noqa: E731
    assert rec["orig_ip_bytes"] == sum(map(ip_len, orig)) == 9 * 40 + 100 + 100 + 50 + 100
    assert rec["resp_ip_bytes"] == sum(map(ip_len, resp)) == 5 * 40 + 400


def test_log_fields_equal_what_was_sent(live):
    """Every scenario's line: its addresses, ports and protocol, and the payload each way
    (where Zeek logs sizes: a duration above 0)."""
    for name, want in live.ids.items():
        rec = live.record(name)
        assert rec_id(rec) == want
        if name in live.sent:
            check_sizes(live, name, rec)
        check_counts(rec, live.flow)
    extra = [rec_id(r) for r in live.log if rec_id(r) not in live.ids.values()]
    assert len(live.log) == len(live.ids), extra


def test_midstream_connections(live):
    before = live.notes["mid_before"]
    mids = [live.ids[n] for n in ("m1", "m2", "m3")]
    assert not [r for r in before["connections"] if row_id(r) in mids], "nothing sent yet"
    rows = live.notes["mid_rows"]
    assert rows, "the midstream connections never showed in /api/connections"
    for name in ("m1", "m2", "m3"):
        assert rows[live.ids[name]]["midstream"] is True, rows[live.ids[name]]
    m1, m2, m3 = (live.record(n) for n in ("m1", "m2", "m3"))
    # m1: the server (8080) spoke first: flipped, the client is orig
    assert m1["history"].startswith("^d") and "S" not in m1["history"].upper(), m1
    assert (m1["id.resp_p"], m1["id.orig_h"]) == (8080, live.pair.ip4_b)
    # m2: the client spoke first
    assert m2["history"].startswith("D") and "s" not in m2["history"].lower(), m2
    # m3: the server spoke first from a port that is no likely server port: orig
    assert m3["history"].startswith("D") and m3["id.orig_p"] == PORTS["m3"], m3
    for name, rec in (("m1", m1), ("m2", m2), ("m3", m3)):
        assert rec["conn_state"] == "SF", rec
        assert "F" in rec["history"] and "f" in rec["history"], rec
        check_sizes(live, name, rec)
        check_counts(rec, live.flow)


def test_process_of_a_local_client(live):
    row = live.notes["holder_row"]
    pid = live.notes["holder_pid"]
    assert row, "the holder's connection never got a pid in /api/connections"
    assert (row["pid"], row["comm"]) == (pid, "lpdt-holder"), row
    rec = live.record("holder")
    assert (rec["pid"], rec["comm"]) == (pid, "lpdt-holder"), rec
    assert rec["conn_state"] == "SF"
    check_sizes(live, "holder", rec)


def counts_of(rows):
    out = collections.Counter()
    for r in rows:
        out[r["proto"], r["state"]] += 1
    return out


def test_api_filters_and_gauges(live):
    views = live.notes["views"]
    status, doc = views["all"]
    assert status == 200
    rows = doc["connections"]
    key = lambda r: (row_id(r), r["state"], r["orig_bytes"], r["resp_bytes"])   # noqa: E731
    wire = [r["orig_wire_bytes"] + r["resp_wire_bytes"] for r in rows]
    assert wire == sorted(wire, reverse=True), "biggest first"
    assert doc["open"] == len(rows)
    by_id = {row_id(r): r for r in rows}
    for name in ("holder", "bulk", "closing"):
        assert live.ids[name] in by_id, name
    assert by_id[live.ids["bulk"]]["state"] == "established"
    assert by_id[live.ids["holder"]]["state"] == "established"
    assert by_id[live.ids["closing"]]["state"] == "closing"
    bulk = by_id[live.ids["bulk"]]
    assert (bulk["orig_bytes"], bulk["resp_bytes"]) == (20000, 30000)
    assert rows[0]["orig_h"] == live.pair.ip4_b and row_id(rows[0]) == live.ids["bulk"]
    assert [key(r) for r in views["top=2"][1]["connections"]] == [key(r) for r in rows[:2]]
    assert views["top=0"][1]["connections"] == []
    for state in ("established", "closing", "connecting", "reset"):
        st, d = views[f"state={state}"]
        assert st == 200
        assert [key(r) for r in d["connections"]] == [key(r) for r in rows if r["state"] == state], state
    st, d = views["top=1&state=established"]
    assert [key(r) for r in d["connections"]] == [key(rows[0])]
    assert views["state=bogus"][0] == 400 and "state" in views["state=bogus"][1]["error"]
    assert views["top=x"][0] == 400
    # gauges: the open connections per (proto, state), as the document counts them
    m = views["metrics"]
    counted = counts_of(rows)
    for proto in ("tcp", "udp"):
        for state in ("connecting", "established", "closing", "reset"):
            assert value(m, "lpd_connections", proto=proto, state=state) == counted[proto, state], \
                (proto, state)
            assert doc["counts"][proto][state] == counted[proto, state]


def test_closed_totals_agree_with_the_log(live):
    def agree():
        m = metrics(live.pair)
        log = read_log(live.log_path)
        want = collections.Counter((r["proto"], r["conn_state"]) for r in log)
        got = {(dict(k[1])["proto"], dict(k[1])["conn_state"]): v for k, v in m.items()
               if k[0] == "lpd_connections_closed_total"}
        ok = all(got.get(k, 0) == n for k, n in want.items()) and sum(got.values()) == len(log)
        return ok and (m, want)
    res = wait_for(agree, 3, 0.3)
    assert res, "lpd_connections_closed_total must count what the log has"
    m, want = res
    assert want["tcp", "SF"] >= 8 and want["tcp", "REJ"] == 1 and want["tcp", "S0"] == 1
    assert want["tcp", "RSTO"] == 1 and want["tcp", "RSTR"] == 1
    assert want["udp", "SF"] == 1 and want["udp", "S0"] == 1
    for proto in ("tcp", "udp"):                      # everything has ended
        for state in ("connecting", "established", "closing", "reset"):
            assert value(m, "lpd_connections", proto=proto, state=state) == 0, (proto, state)


TIMES = ("ts", "duration")


def strip(rec):
    """A line without what a replay cannot know (pid, comm) and without its times (nor
    the uid, which its start time is part of)."""
    return {k: v for k, v in rec.items() if k not in ("pid", "comm", "uid") + TIMES}


def test_replay_of_the_capture_gives_the_same_log(live, tmp_path):
    out = tmp_path / "replayed.json"
    cp = subprocess.run([sys.executable, LPD, "-r", str(live.pcap), "--conn-log", str(out),
                         "--conn-timeout-udp", "2", "--interval", "1"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    replayed = read_log(out)
    assert all("pid" not in r for r in replayed)
    assert len(replayed) == len(live.log) == len({rec_id(r) for r in live.log})
    ours = {rec_id(r): r for r in live.log}
    for rec in replayed:
        want = ours[rec_id(rec)]
        assert strip(rec) == strip(want), (rec, want)
        # A frame B receives from TCP in ns_a still carries the sender's departure time
        # (monotonic clock), which a packet socket does not use: each socket stamps it
        # at its own delivery, tcpdump's a few µs before lpd's. Frames B sends share one
        # stamp. So times agree to within that (everything else exactly).
        assert [k for k in TIMES if k in rec] == [k for k in TIMES if k in want]
        for k in TIMES:
            if k in rec:
                assert abs(rec[k] - want[k]) < 0.001, (k, rec, want)


def test_sighup_reopens_the_conn_log(live):
    pair, path = live.pair, live.log_path
    rotated = path.with_name(path.name + ".1")
    os.rename(path, rotated)
    old_lines = len(read_log(rotated))
    live.lpd.proc.send_signal(signal.SIGHUP)
    assert wait_for(path.exists, 5, 0.05), "SIGHUP must create a new file at the path"
    sport = UDP_SIGHUP_SPORT
    pair.udp_send(pair.ns_b, pair.ip4_b, pair.ip4_a, [50], sport=sport)
    time.sleep(0.2)
    pair.udp_send(pair.ns_b, pair.ip4_b, pair.ip4_a, [70], sport=sport)
    sent = time.monotonic()
    want = ("udp", pair.ip4_b, sport, pair.ip4_a, netns.SINK_PORT)
    seen = wait_for(lambda: [r for r in read_log(path) if rec_id(r) == want], 6, 0.05)
    after = time.monotonic() - sent
    assert seen, "the new line goes to the new file"
    rec, = seen
    assert (rec["conn_state"], rec["history"], rec["orig_bytes"], rec["orig_pkts"]) == \
        ("S0", "D", 120, 2)
    # --conn-timeout-udp 2, timers run at the 1 s ticks
    assert 1.9 <= after <= 4.0, after
    assert len(read_log(rotated)) == old_lines, "nothing more in the renamed file"
    assert "reloaded" in live.lpd.stderr()
    assert live.lpd.stop() == 0


# --- offloads on: super-frames count as the wire frames they stand for -------------------

MSS = 1448                              # veth MTU 1500 - IPv4 20 - TCP 32 (with timestamps)


def wire_flows(frames):
    """flows() with each TSO/GSO/GRO super-frame split into its MSS-sized wire segments,
    every one with its own IPv4 and TCP headers (the SYNs' options are in their length)."""
    out = collections.defaultdict(lambda: [0, 0, 0])
    for ts, f in frames:
        (key, (_, ip_len, payload)), = flows([(ts, f)]).items()
        hdr = ip_len - payload
        segs = max(1, -(-payload // MSS))
        c = out[key]
        c[0] += segs
        c[1] += payload + segs * hdr
        c[2] += payload
    return out


@pytest.mark.parametrize("engine", ["cbpf", "auto"])   # auto: ebpf where it can
def test_offloads_on_super_frames_count_as_wire_frames(tmp_path, engine):
    log_path, pcap = tmp_path / "conn.json", tmp_path / "gso.pcap"
    with netns.Pair(offloads=True) as pair:
        lpd = Lpd(pair, "--mapping-url", "none", "--conn-log", str(log_path), "--engine", engine)
        # 64 KB super-frames at full speed: a buffer that holds the whole transfer
        dump = netns.start_tcpdump(pair.ns_b, pair.if_b, ["-U", "-B", "65536", "-w", str(pcap)])
        srv = listen(pair, pair.ns_a, pair.ip4_a, 7200)
        cli = connect(pair, pair.ns_b, pair.ip4_a, 7200)
        exchange(cli, srv, 1_000_000, 300_000)
        close_both(cli, srv)
        want = conn_id("tcp", cli.local, (pair.ip4_a, 7200))
        found = wait_for(lambda: [r for r in read_log(log_path) if rec_id(r) == want], CLOSE_WAIT, 0.3)
        netns.stop(dump)
        m = metrics(pair)
        cli.end()
        srv.end()
        assert lpd.stop() == 0
    assert found, "no line for the transfer"
    rec, = found
    frames = timed_frames(pcap)
    big = [f for _, f in frames if len(f) > 1514]
    assert big and value(m, "lpd_gso_frames_total", nic=pair.if_b) > 0, "super-frames did arrive"
    assert value(m, "lpd_gso_unsplit_total", nic=pair.if_b) == 0
    assert (rec["conn_state"], rec["orig_bytes"], rec["resp_bytes"]) == ("SF", 1_000_000, 300_000), rec
    wire = wire_flows(frames)
    assert wire[rec_id(rec)][2] >= 1_000_000, "tcpdump missed frames: no oracle"
    check_counts(rec, wire)
    assert rec["orig_pkts"] >= 1_000_000 // MSS and rec["resp_pkts"] >= 300_000 // MSS
    # The frames in the order they came: the data before the FINs, and 'T'/'t' only for
    # what the capture shows sent again (an end at or below the highest one yet, as Zeek)
    again, ends = set(), {}
    for _, f in frames:                              # IPv4, no IP options (Linux's TCP)
        sport, seq = struct.unpack_from("!H2xI", f, 34)
        plen = struct.unpack_from("!H", f, 16)[0] - 20 - (f[46] >> 4) * 4
        if plen:
            end = seq + plen
            if sport in ends and (end - ends[sport]) % (1 << 32) >= 1 << 31 or end == ends.get(sport):
                again.add("T" if sport == rec["id.orig_p"] else "t")
            else:
                ends[sport] = end
    h = rec["history"]
    assert h.startswith("ShAD") and max(h.index("D"), h.index("d")) < h.index("F") < h.index("f"), \
        f"history {h!r}: frames taken out of capture order?"
    assert {c for c in h if c in "Tt"} == again, (h, again)


# --- a SYN flood against --conn-max -------------------------------------------------------

def spoofed_syns(pair, n, seed):
    """n SYNs to B:80 from distinct spoofed sources in 198.18.0.0/16 (to a MAC nobody
    has: B's stack never answers), and their 5-tuples, in sending order."""
    rng = random.Random(seed)
    sources = set()
    while len(sources) < n:
        sources.add((f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}", rng.randrange(1024, 65536)))
    sources = sorted(sources, key=lambda s: rng.random())
    frames = [tcp_frame(src, pair.ip4_b, sport, 80, packets.TCP_SYN, rng.randrange(1 << 32), 0)
              for src, sport in sources]
    return frames, [("tcp", src, sport, pair.ip4_b, 80) for src, sport in sources]


def inject_all(pair, frames, batch=10000):
    for i in range(0, len(frames), batch):
        pair.inject(pair.ns_a, pair.if_a, frames[i:i + batch])


def half_open_evictions(m):
    return value(m, "lpd_connection_evictions_total", reason="half_open")


def test_syn_flood_evicts_half_open_connections_first(pair, tmp_path):
    log_path = tmp_path / "conn.json"
    conn_max, flood = 1000, 12000
    lpd = Lpd(pair, "--mapping-url", "none", "--conn-max", str(conn_max), "--conn-log", str(log_path))
    srv = listen(pair, pair.ns_a, pair.ip4_a, 7100)
    cli = connect(pair, pair.ns_b, pair.ip4_a, 7100)
    exchange(cli, srv, 1000, 1000)
    est = conn_id("tcp", cli.local, (pair.ip4_a, 7100))
    frames, flood_ids = spoofed_syns(pair, flood, 12)

    t_flood = time.monotonic()
    inject_all(pair, frames)
    evicted = flood + 1 - conn_max                   # the table holds the established one too
    m = wait_for(lambda: (lambda m: half_open_evictions(m) == evicted and m)(metrics(pair)), 5, 0.2)
    assert m, f"evictions {half_open_evictions(metrics(pair))}, expected {evicted}"
    assert value(m, "lpd_connection_evictions_total", reason="oldest") == 0
    assert value(m, "lpd_capture_drops_total", worker="0", nic=pair.if_b) == 0
    assert value(m, "lpd_connections", proto="tcp", state="connecting") == conn_max - 1
    assert value(m, "lpd_connections", proto="tcp", state="established") == 1
    assert rss_kib(lpd.proc.pid) < 300 * 1024
    doc = api(pair, "/api/connections?state=established")[1]
    assert [row_id(r) for r in doc["connections"]] == [est]
    assert doc["connections"][0]["orig_bytes"] == 1000
    assert api(pair, "/api/connections")[1]["open"] == conn_max
    # the evicted ones, the oldest, are logged at once; the others wait for their 5 s
    # attempt timer
    logged = wait_for(lambda: (lambda ids: len(ids) >= evicted and ids)(
        {rec_id(r) for r in read_log(log_path)}), 3, 0.2)
    assert time.monotonic() - t_flood < 4.5, "too slow to tell evictions from attempt timers"
    assert logged and set(flood_ids[:evicted]) <= logged and flood_ids[-1] not in logged
    assert est not in logged

    exchange(cli, srv, 10, 20)
    close_both(cli, srv)
    assert wait_for(lambda: len(read_log(log_path)) == flood + 1, CLOSE_WAIT, 0.3), \
        len(read_log(log_path))
    log = read_log(log_path)
    rec, = [r for r in log if rec_id(r) == est]
    assert (rec["conn_state"], rec["orig_bytes"], rec["resp_bytes"]) == ("SF", 1010, 1020), rec
    assert rec["history"].startswith("ShAD")
    floods = [r for r in log if rec_id(r) != est]
    assert {rec_id(r) for r in floods} == set(flood_ids)
    assert all((r["conn_state"], r["history"], r["orig_pkts"], r["orig_ip_bytes"], r["resp_pkts"]) ==
               ("S0", "S", 1, 40, 0) for r in floods), [r for r in floods if r["conn_state"] != "S0"][:3]
    assert all("duration" not in r for r in floods), "one packet: no duration, no sizes (Zeek)"
    m = metrics(pair)
    assert value(m, "lpd_connections_closed_total", proto="tcp", conn_state="S0") == flood
    assert value(m, "lpd_connections_closed_total", proto="tcp", conn_state="SF") == 1
    assert value(m, "lpd_connection_evictions_total", reason="half_open") == evicted
    cli.end()
    srv.end()
    assert lpd.stop() == 0


def test_syn_flood_memory_is_bounded_by_conn_max(pair):
    """40,000 half-open connections in well under a second against --conn-max 1000: what
    lpd holds is bounded by the 1000 (~1.3 KiB each), whatever the flood's size. Peak RSS
    is read while the flood's 5 s attempt timers are still pending."""
    conn_max, flood = 1000, 40000
    evicted = conn_max + flood - conn_max            # the warm-up's, then all but the last 1000
    lpd = Lpd(pair, "--mapping-url", "none", "--conn-max", str(conn_max), "--conn-log", os.devnull)
    frames, _ = spoofed_syns(pair, flood, 13)
    warm, _ = spoofed_syns(pair, 2 * conn_max, 14)
    inject_all(pair, warm)                           # the table full once: its own size counted
    assert wait_for(lambda: half_open_evictions(metrics(pair)) == conn_max, 5, 0.2)
    time.sleep(5.5)                                  # the others' attempt timers have run
    rss0 = rss_kib(lpd.proc.pid)
    t = time.monotonic()
    inject_all(pair, frames)
    assert time.monotonic() - t < 4, "the flood must fit in one attempt delay"
    assert wait_for(lambda: half_open_evictions(metrics(pair)) == evicted, 5, 0.2)
    assert value(metrics(pair), "lpd_capture_drops_total", worker="0", nic=pair.if_b) == 0
    grown = rss_kib(lpd.proc.pid) - rss0
    assert grown < 24 * 1024, f"RSS grew {grown >> 10} MiB for {flood} SYNs with --conn-max {conn_max}"
    assert lpd.stop() == 0


# A backlog of this many passes' worth of attempt timeouts, due just before a close.
BACKLOG_PASSES = 12
CATCH_UP_SLACK = 2.0                # s beyond the close delay and one tick (the log's flush)
CATCH_UP_AS_LIMIT = 2_000_000_000   # RLIMIT_AS of that lpd: ~50,000 connections, ~100 MiB


def test_a_close_after_a_flood_is_logged_after_its_close_delay(pair, tmp_path, engine):
    """Issue 24: after a flood of spoofed SYNs, a connection closed by FINs was logged
    ~20 s after its close: the flood's attempt timeouts, due first, were ended 4096 a
    tick. The budget bounds one pass, not the rate: passes follow each other between
    ring drains until the backlog is gone, so the close is logged one close delay (and
    at most a tick, the log's flush) after it."""
    flood = BACKLOG_PASSES * lpd_module.EXPIRE_BUDGET
    log_path = tmp_path / "conn.json"
    lpd = Lpd(pair, "--mapping-url", "none", "--conn-log", str(log_path), "--interval", "1",
              prefix=("prlimit", f"--as={CATCH_UP_AS_LIMIT}"))
    srv = listen(pair, pair.ns_a, pair.ip4_a, 7101)
    cli = connect(pair, pair.ns_b, pair.ip4_a, 7101)
    exchange(cli, srv, 100, 200)
    est = conn_id("tcp", cli.local, (pair.ip4_a, 7101))
    frames, _ = spoofed_syns(pair, flood, 15)
    inject_all(pair, frames)
    connecting = lambda: value(metrics(pair), "lpd_connections", proto="tcp", state="connecting")
    assert wait_for(lambda: connecting() == flood, 10, 0.2), connecting()
    close_both(cli, srv)
    closed = time.monotonic()
    port = f'"id.orig_p": {cli.local[1]}'

    def ours():
        with open(log_path) as f:
            return [r for r in map(json.loads, (line for line in f if port in line)) if rec_id(r) == est]
    deadline = lpd_module.CONN_CLOSE_DELAY + 1 + CATCH_UP_SLACK
    rec = wait_for(ours, 3 * deadline, 0.2)
    took = time.monotonic() - closed
    assert rec and rec[0]["conn_state"] == "SF", rec
    assert took <= deadline, f"logged {took:.1f} s after its close"
    assert wait_for(lambda: value(metrics(pair), "lpd_connections_closed_total", proto="tcp",
                                  conn_state="S0") == flood, 10, 0.3)
    assert value(metrics(pair), "lpd_capture_drops_total", worker="0", nic=pair.if_b) == 0
    cli.end()
    srv.end()
    assert lpd.stop() == 0


# A UDP responder in B: each datagram from A gets a reply half its size (+1), "end" stops
# it; it prints the bytes it answered. Bounded by its socket timeout.
_RESPONDER = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.settimeout(20)
print("ready", flush=True)
got = {}
while True:
    data, addr = s.recvfrom(65535)
    if data == b"end":
        break
    size = len(data) // 2 + 1
    s.sendto(b"r" * size, addr)
    got.setdefault(addr[0], []).append(size)
print(json.dumps(got), flush=True)
"""

# A's side: datagrams of the given sizes from (src, sport) to (dst, dport), `gap` seconds
# apart, each reply awaited (2 s at most); a pause after the first few, so that the rest
# comes after lpd has seen those (a ring block reaches lpd when it retires, within 20 ms),
# shorter than the test's --interval: a direction idle for FLOW_IDLE_TICKS ticks would
# leave the kernel again.
_CLIENT = r"""
import json, socket, sys, time
src, sport, dst, dport, gap, sizes = json.loads(sys.argv[1])
s = socket.socket(socket.AF_INET6 if ":" in src else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, sport))
s.settimeout(2)
replies = []
for i, n in enumerate(sizes):
    s.sendto(b"q" * n, (dst, dport))
    replies.append(len(s.recv(65535)))
    time.sleep(0.4 if i == 2 else gap)
print(json.dumps(replies), flush=True)
"""

OFFLOAD_PORT = 40400


@pytest.mark.parametrize("engine", ["cbpf", "auto"])   # auto: ebpf where it can
def test_udp_conversations_are_exact_whoever_counts_them(pair, tmp_path, engine):
    """Long UDP conversations (IPv4 and IPv6, many datagrams each way, one of them slow
    and longer than the UDP idle timeout): one conn.log record each, with the packets,
    IP bytes and payload bytes that were sent, under both engines. Under ebpf the kernel
    counts a direction from its second frame on (FlowOffload), so the frames copied to
    lpd are a small part of those sent; under cbpf every one is."""
    log_path = tmp_path / "conn.json"
    run = Lpd(pair, "--mapping-url", "none", "--interval", "0.5", "--conn-log", str(log_path),
              "--conn-timeout-udp", "2", "--engine", engine)
    responder = pair.popen(pair.ns_b, [sys.executable, "-c", _RESPONDER, str(OFFLOAD_PORT)],
                           stdout=subprocess.PIPE, text=True)
    assert responder.stdout.readline().strip() == "ready"
    rng = random.Random(7)
    talks = {                                    # name: (src, sport, dst, gap, sizes)
        "v4": (pair.ip4_a, 40401, pair.ip4_b, 0.0, [rng.randrange(1, 1400) for _ in range(400)]),
        "v6": (pair.ip6_a, 40402, pair.ip6_b, 0.0, [rng.randrange(1, 1400) for _ in range(300)]),
        # slower than a tick, longer than --conn-timeout-udp: one connection throughout
        "slow": (pair.ip4_a, 40403, pair.ip4_b, 0.2, [100] * 25),
    }
    clients = {name: pair.popen(pair.ns_a, [sys.executable, "-c", _CLIENT, json.dumps(
        [src, sport, dst, OFFLOAD_PORT, gap, sizes])], stdout=subprocess.PIPE, text=True)
        for name, (src, sport, dst, gap, sizes) in talks.items()}
    replies = {name: json.loads(c.stdout.readline()) for name, c in clients.items()}
    netns.run(pair.ns_a, [sys.executable, "-c", "import socket; s = socket.socket(socket.AF_INET, "
                          f"socket.SOCK_DGRAM); s.sendto(b'end', ('{pair.ip4_b}', {OFFLOAD_PORT}))"])
    responder.wait(10)
    ids = {name: (src, sport) for name, (src, sport, *_rest) in talks.items()}

    def records():
        recs = {}
        for r in read_log(log_path):
            for name, (src, sport) in ids.items():
                if (r["id.orig_h"], r["id.orig_p"], r["id.resp_p"]) == (src, sport, OFFLOAD_PORT):
                    recs.setdefault(name, []).append(r)
        return recs if len(recs) == len(ids) else None
    recs = wait_for(records, 10, 0.25)
    assert recs, read_log(log_path)
    m = metrics(pair)
    copied = sum(v for k, v in m.items() if k[0] == "lpd_capture_packets_total")
    engine_run = [dict(k[1])["engine"] for k in m if k[0] == "lpd_build_info"]
    run.stop()
    sent_frames = 0
    for name, (src, sport, dst, gap, sizes) in talks.items():
        assert len(recs[name]) == 1, recs[name]
        rec = recs[name][0]
        ip_hdr = 40 if ":" in src else 20
        back = replies[name]
        assert (rec["conn_state"], rec["history"]) == ("SF", "Dd"), rec
        assert (rec["orig_pkts"], rec["orig_bytes"], rec["orig_ip_bytes"]) == \
            (len(sizes), sum(sizes), sum(sizes) + len(sizes) * (ip_hdr + 8)), rec
        assert (rec["resp_pkts"], rec["resp_bytes"], rec["resp_ip_bytes"]) == \
            (len(back), sum(back), sum(back) + len(back) * (ip_hdr + 8)), rec
        sent_frames += len(sizes) + len(back)
    assert rec["duration"] >= 24 * 0.2, rec                # the slow one, last in talks
    if engine_run == ["ebpf"]:
        assert copied < sent_frames / 5, (copied, sent_frames)
    else:
        assert engine_run == ["cbpf"] and copied >= sent_frames, (engine_run, copied)
