"""Two network namespaces joined by a veth pair: the test and bench harness.

Plain module (no pytest import) so both the tests and `tests/bench.py` use it:

    with netns.Pair() as p:
        p.ping(p.ns_a, p.ip4_b)
        before = p.link_stats(p.ns_b, p.if_b)
        p.udp_send(p.ns_a, p.ip4_a, p.ip4_b, [100, 200])
        p.inject(p.ns_a, p.if_a, [frame_bytes, ...])

Traffic stays inside the namespaces created here (10.199.0.0/24 and fd00:199::/64
exist only there). Every namespace name starts with `lpdt-<pid>-` and is deleted
on exit of the `with` block, at interpreter exit (atexit) and, for a run that was
killed outright, by `cleanup_stale()` the next time (only namespaces whose owner
pid is dead). Processes are stopped by PID only: the ones started through
`popen()`, plus whatever still lives inside our own namespaces.

Setup never degrades silently: without root or without `ip netns`, `Pair()` raises
NetnsError, so CI fails instead of skipping.
"""
import atexit
import ipaddress
import itertools
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time

PREFIX = "lpdt-"
IP = "ip"
ETHTOOL = "ethtool"
CMD_TIMEOUT = 20            # seconds for any one helper command
STOP_GRACE = 3.0            # seconds between SIGTERM and SIGKILL at teardown
SINK_PORT = 9               # "discard": the UDP port the sinks hold open

# The pair's fixed layout. Addresses are only ever configured inside our namespaces.
IF_A, IF_B = "veth-a", "veth-b"
MAC_A, MAC_B = "02:00:0a:c7:00:01", "02:00:0a:c7:00:02"
IP4_A, IP4_B, IP4_PREFIX = "10.199.0.1", "10.199.0.2", 24
IP6_A, IP6_B, IP6_PREFIX = "fd00:199::1", "fd00:199::2", 64
NET4, NET6 = "10.199.0.0/24", "fd00:199::/64"

# Sysctls set in each namespace before the veth appears, so the device inherits them
# ("default"): no DAD, no router solicitations, quick MLD reports, no RA handling.
NS_SYSCTLS = {
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.default.dad_transmits": "0",
    "net.ipv6.conf.default.router_solicitations": "0",
    "net.ipv6.conf.default.accept_ra": "0",
    "net.ipv6.conf.default.mldv1_unsolicited_report_interval": "10",   # ms
    "net.ipv6.conf.default.mldv2_unsolicited_report_interval": "10",   # ms
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.all.dad_transmits": "0",
}

OFFLOADS_REQUIRED = ["tso", "off", "gso", "off", "gro", "off"]
OFFLOADS_OPTIONAL = ["tx", "off", "rx", "off"]     # checksumming: frames carry real sums
OFFLOADS_ON = ["tso", "on", "gso", "on", "gro", "on"]   # what the kernel hands AF_PACKET then: super-frames

STAT_NAMES = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_dropped", "tx_dropped")


class NetnsError(RuntimeError):
    """The harness could not build or drive its namespaces."""


###############################################################################
# Commands inside a namespace #################################################
###############################################################################

def ns_argv(ns, cmd):
    """argv running `cmd` (a list) inside namespace `ns` (None: the current one)."""
    return list(cmd) if ns is None else [IP, "netns", "exec", ns] + list(cmd)


def run(ns, cmd, check=True, timeout=CMD_TIMEOUT, input=None):
    """Run `cmd` inside `ns`; return CompletedProcess (text). Raises NetnsError on failure."""
    argv = ns_argv(ns, cmd)
    try:
        cp = subprocess.run(argv, capture_output=True, text=isinstance(input, str) or input is None,
                            timeout=timeout, input=input)
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"timed out after {timeout}s: {' '.join(argv)}") from e
    except FileNotFoundError as e:
        raise NetnsError(f"not installed: {argv[0]}") from e
    if check and cp.returncode != 0:
        err = cp.stderr if isinstance(cp.stderr, str) else cp.stderr.decode(errors="replace")
        raise NetnsError(f"exit {cp.returncode}: {' '.join(argv)}: {err.strip()}")
    return cp


_procs = []                 # every Popen started through popen(), for teardown
_procs_lock = threading.Lock()


def popen(ns, cmd, **kw):
    """Start `cmd` inside `ns` and return the Popen.

    `ip netns exec` execs the command, so Popen.pid is the command's own PID (usable
    for /proc/<pid>/stat, SIGSTOP/SIGCONT). The process is stopped by PID at
    teardown (stop() may be called earlier).
    """
    kw.setdefault("stdin", subprocess.DEVNULL)
    p = subprocess.Popen(ns_argv(ns, cmd), **kw)
    with _procs_lock:
        _procs.append(p)
    return p


def stop(p, sig=signal.SIGTERM, grace=STOP_GRACE):
    """Stop one Popen by its PID: `sig`, wait `grace` s, then SIGKILL. Returns its exit code."""
    if p.poll() is None:
        try:
            os.kill(p.pid, signal.SIGCONT)      # a SIGSTOPped process must wake to die
            os.kill(p.pid, sig)
            return p.wait(grace)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            p.kill()
    try:
        return p.wait(grace)
    except subprocess.TimeoutExpired:
        return None


def _stop_all_procs():
    with _procs_lock:
        procs, _procs[:] = list(_procs), []
    for p in procs:
        stop(p)


def link_stats(ns, ifname):
    """Kernel counters of `ifname` as seen inside `ns`: dict of STAT_NAMES -> int."""
    paths = [f"/sys/class/net/{ifname}/statistics/{n}" for n in STAT_NAMES]
    out = run(ns, ["cat"] + paths).stdout.split()
    return dict(zip(STAT_NAMES, map(int, out)))


def operstate(ns, ifname):
    """'up', 'down', ... from /sys/class/net/<if>/operstate; 'absent' if no such interface."""
    cp = run(ns, ["cat", f"/sys/class/net/{ifname}/operstate"], check=False)
    return cp.stdout.strip() if cp.returncode == 0 else "absent"


def stats_delta(after, before):
    return {k: after[k] - before[k] for k in after}


# A helper process that runs inside the namespace: raw frames or UDP datagrams,
# described as JSON on stdin, answered with JSON on stdout.
_SENDER = r"""
import json, socket, sys
job = json.load(sys.stdin)
sent = []
if job["kind"] == "frames":
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((job["ifname"], 0))
    for hexframe in job["frames"]:
        sent.append(s.send(bytes.fromhex(hexframe)))
else:
    fam = socket.AF_INET6 if ":" in job["dst"] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((job["src"], job["sport"]))
    for size in job["sizes"]:
        sent.append(s.sendto(b"\x00" * size, (job["dst"], job["dport"])))
json.dump(sent, sys.stdout)
"""


def _send_job(ns, job):
    cp = run(ns, [sys.executable, "-c", _SENDER], input=json.dumps(job))
    return json.loads(cp.stdout)


def inject(ns, ifname, frames):
    """Send raw Ethernet frames (bytes each) out of `ifname` from an AF_PACKET socket in `ns`.

    Returns the byte counts the kernel accepted (one per frame).
    """
    return _send_job(ns, {"kind": "frames", "ifname": ifname,
                          "frames": [bytes(f).hex() for f in frames]})


def udp_send(ns, src, dst, sizes, dport=SINK_PORT, sport=0):
    """Send one UDP datagram per payload size from address `src` to `dst`, inside `ns`.

    Returns the payload byte counts sent. Frame length on the wire is payload + 8 (UDP)
    + 20 (IPv4) or 40 (IPv6) + 14 (Ethernet): see frame_len().
    """
    return _send_job(ns, {"kind": "udp", "src": src, "dst": dst, "sizes": list(sizes),
                          "dport": dport, "sport": sport})


def frame_len(payload, ipv6=False):
    """Ethernet frame length (as libpcap's `len`) of a UDP datagram with `payload` bytes."""
    return 14 + (40 if ipv6 else 20) + 8 + payload


# Holds a dual-stack UDP socket on SINK_PORT without reading it: datagrams to it are
# accepted (then dropped silently when the buffer is full), so no ICMP port-unreachable
# replies disturb the counts.
_SINK = r"""
import signal, socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", %d))
print("ready", flush=True)
signal.pause()
"""


def start_udp_sink(ns, port=SINK_PORT):
    p = popen(ns, [sys.executable, "-c", _SINK % port], stdout=subprocess.PIPE, text=True)
    if p.stdout.readline().strip() != "ready":
        stop(p)
        raise NetnsError(f"UDP sink in {ns} did not start (exit {p.poll()})")
    return p


def start_tcpdump(ns, ifname, args=(), ready_timeout=10):
    """Start `tcpdump -i IF -n ARGS` in `ns` (stdout piped, text) and return the Popen
    once it says it is listening, so nothing sent afterwards is missed."""
    p = popen(ns, ["tcpdump", "-i", ifname, "-n", "--immediate-mode"] + list(args),
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + ready_timeout
    lines = []
    while time.monotonic() < deadline:
        line = p.stderr.readline()        # tcpdump writes "listening on ..." then blocks
        lines.append(line)
        if "listening on" in line:
            return p
        if not line and p.poll() is not None:
            break
    stop(p)
    raise NetnsError(f"tcpdump in {ns} did not start: {''.join(lines).strip()}")


CLONE_NEWNET = 0x40000000
_libc = None


def _setns(fd):
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        import ctypes
        err = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(err)}")


def socket_in(ns, family, type_):
    """A socket created inside namespace `ns` (only this thread switches, briefly).

    Lets the test process talk to a server listening on 127.0.0.1 inside the
    namespace (lpd's /metrics) without a helper process.
    """
    import socket
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(there)
        try:
            return socket.socket(family, type_)
        finally:
            _setns(here)
    finally:
        os.close(there)
        os.close(here)


def http_get(ns, host, port, path="/", timeout=5.0):
    """GET http://host:port/path from inside `ns`; returns (status, body bytes)."""
    import http.client
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket_in(ns, family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = sock
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def ns_pids(ns):
    cp = run(None, [IP, "netns", "pids", ns], check=False)
    return [int(x) for x in cp.stdout.split()] if cp.returncode == 0 else []


###############################################################################
# Frames to inject ############################################################
###############################################################################

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8


def mac_bytes(mac):
    return bytes.fromhex(mac.replace(":", ""))


def checksum(data):
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def eth_frame(dst_mac, src_mac, ethertype, payload, vlans=()):
    """Ethernet II frame; `vlans` = [(tpid, vid), ...] outermost first (802.1Q/802.1ad)."""
    tags = b"".join(struct.pack("!HH", tpid, vid) for tpid, vid in vlans)
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + tags + struct.pack("!H", ethertype) + payload


def udp_packet(src, dst, payload, sport=40000, dport=SINK_PORT):
    """IPv4 or IPv6 (by the address) UDP packet with valid checksums, as bytes."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    udp_len = 8 + len(payload)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, 17, udp_len)
    else:
        pseudo = s.packed + d.packed + struct.pack("!I3xB", udp_len, 17)
    csum = checksum(pseudo + struct.pack("!HHHH", sport, dport, udp_len, 0) + payload) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, udp_len, csum) + payload
    if s.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, 17, 0,
                          s.packed, d.packed)
        hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
        return hdr + udp
    return struct.pack("!IHBB16s16s", 0x60000000, udp_len, 17, 64, s.packed, d.packed) + udp


def udp_frame(src_mac, dst_mac, src, dst, frame_size, vlans=(), sport=40000, dport=SINK_PORT):
    """A whole Ethernet frame of exactly `frame_size` bytes carrying UDP from src to dst."""
    ipv6 = ":" in src
    payload_len = frame_size - frame_len(0, ipv6) - 4 * len(vlans)
    if payload_len < 0:
        raise ValueError(f"frame_size {frame_size} too small")
    ethertype = ETH_P_IPV6 if ipv6 else ETH_P_IP
    return eth_frame(dst_mac, src_mac, ethertype,
                     udp_packet(src, dst, bytes(payload_len), sport, dport), vlans)


###############################################################################
# Namespace lifetime ##########################################################
###############################################################################

_counter = itertools.count()
_live_namespaces = set()
_ns_lock = threading.Lock()


def _new_ns_name(tag):
    return f"{PREFIX}{os.getpid()}-{next(_counter)}{random.randrange(16**4):04x}{tag}"


def create_ns(tag=""):
    """Create a namespace with a unique name, loopback up; registered for teardown."""
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root (run the tests as root)")
    name = _new_ns_name(tag)
    run(None, [IP, "netns", "add", name])
    with _ns_lock:
        _live_namespaces.add(name)
    run(name, [IP, "link", "set", "lo", "up"])
    for key, value in NS_SYSCTLS.items():
        run(name, ["sysctl", "-q", "-w", f"{key}={value}"])
    return name


def delete_ns(name):
    """Stop every process still inside `name` (by PID), then delete the namespace."""
    for _ in range(3):
        pids = [p for p in ns_pids(name) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            _signal(pid, signal.SIGCONT)
            _signal(pid, signal.SIGTERM)
        _wait_gone(pids, STOP_GRACE)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        _wait_gone(pids, STOP_GRACE)
    run(None, [IP, "netns", "del", name], check=False)
    with _ns_lock:
        _live_namespaces.discard(name)


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in pids):
            return
        time.sleep(0.02)


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def teardown_all():
    """Stop our processes and delete our namespaces (atexit; safe to call twice)."""
    _stop_all_procs()
    with _ns_lock:
        names = list(_live_namespaces)
    for name in names:
        delete_ns(name)


atexit.register(teardown_all)


def cleanup_stale():
    """Delete `lpdt-<pid>-*` namespaces left by runs whose process <pid> is dead."""
    cp = run(None, [IP, "netns", "list"], check=False)
    for line in cp.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX):].split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and not os.path.exists(f"/proc/{owner}"):
            delete_ns(name)


def exit_on_signals(signals=(signal.SIGTERM, signal.SIGHUP)):
    """Turn SIGTERM/SIGHUP into SystemExit so `with Pair()` blocks and atexit run."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    for s in signals:
        signal.signal(s, handler)


###############################################################################
# The pair ####################################################################
###############################################################################

class Pair:
    """Namespaces `ns_a` and `ns_b` joined by veth `if_a` <-> `if_b`.

    A has 10.199.0.1/24 and fd00:199::1/64, B has .2 and ::2; both with static
    neighbour entries (no ARP/ND traffic during a test), offloads off (frames on the
    veth are real-sized wire frames), and a UDP sink on port 9 (no ICMP replies).
    `settle()` waits until the link is quiet.
    """

    ns_a = ns_b = None
    if_a, if_b = IF_A, IF_B
    mac_a, mac_b = MAC_A, MAC_B
    ip4_a, ip4_b, ip6_a, ip6_b = IP4_A, IP4_B, IP6_A, IP6_B
    net4, net6 = NET4, NET6

    def __init__(self, sinks=True, queues=1, offloads=False):
        self.queues = queues
        self.offloads = offloads        # True: TSO, GSO and GRO on, as on a default host
        self.procs = []
        try:
            cleanup_stale()
            self.ns_a = create_ns("a")
            self.ns_b = create_ns("b")
            self.create_link()
            if sinks:
                self.procs += [start_udp_sink(self.ns_a), start_udp_sink(self.ns_b)]
            self.settle()
        except BaseException:
            self.close()
            raise

    # --- context manager / teardown ---
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for p in self.procs:
            stop(p)
        self.procs = []
        for ns in (self.ns_a, self.ns_b):
            if ns:
                delete_ns(ns)

    # --- the link ---
    def create_link(self):
        """(Re)create the veth pair with its addresses, neighbours and offload settings."""
        q = str(self.queues)
        run(None, [IP, "link", "add", self.if_a, "netns", self.ns_a, "address", self.mac_a,
                   "numtxqueues", q, "numrxqueues", q, "type", "veth",
                   "peer", "name", self.if_b, "netns", self.ns_b, "address", self.mac_b,
                   "numtxqueues", q, "numrxqueues", q])
        self._configure(self.ns_a, self.if_a, self.ip4_a, self.ip6_a,
                        self.ip4_b, self.ip6_b, self.mac_b)
        self._configure(self.ns_b, self.if_b, self.ip4_b, self.ip6_b,
                        self.ip4_a, self.ip6_a, self.mac_a)

    def _configure(self, ns, ifname, ip4, ip6, peer4, peer6, peer_mac):
        if self.offloads:
            run(ns, [ETHTOOL, "-K", ifname] + OFFLOADS_ON)
        else:
            run(ns, [ETHTOOL, "-K", ifname] + OFFLOADS_REQUIRED)
            run(ns, [ETHTOOL, "-K", ifname] + OFFLOADS_OPTIONAL, check=False)
        run(ns, [IP, "addr", "add", f"{ip4}/{IP4_PREFIX}", "dev", ifname])
        run(ns, [IP, "-6", "addr", "add", f"{ip6}/{IP6_PREFIX}", "dev", ifname, "nodad"])
        run(ns, [IP, "link", "set", ifname, "up"])
        for peer in (peer4, peer6):
            run(ns, [IP, "neigh", "replace", peer, "lladdr", peer_mac,
                     "dev", ifname, "nud", "permanent"])

    def delete_link(self):
        """Delete the veth pair (both ends go)."""
        run(self.ns_a, [IP, "link", "del", self.if_a])

    def recreate_link(self, gap=0.0, settle=True):
        """Delete the veth pair, wait `gap` seconds, create it again the same way
        (same names, MACs, addresses; counters start from 0) and settle()."""
        self.delete_link()
        time.sleep(gap)
        self.create_link()
        if settle:
            self.settle()

    def set_up(self, ns, ifname, up=True):
        run(ns, [IP, "link", "set", ifname, "up" if up else "down"])

    def _ends(self):
        return ((self.ns_a, self.if_a), (self.ns_b, self.if_b))

    def settle(self, quiet=0.5, timeout=5.0):
        """Wait until both ends are operationally up (the kernel's linkwatch reports
        carrier up to ~1 s late) and then until neither end's counters move for `quiet`
        s (MLD chatter after link-up). Returns False if still noisy after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not all(operstate(ns, i) == "up" for ns, i in self._ends()):
            if time.monotonic() > deadline:
                raise NetnsError(f"veth pair not up after {timeout}s")
            time.sleep(0.02)
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            now = tuple(link_stats(ns, i) for ns, i in self._ends())
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return True
            time.sleep(0.05)
        return False

    # --- per-namespace helpers (the module functions, bound here for convenience) ---
    run = staticmethod(run)
    link_stats = staticmethod(link_stats)
    inject = staticmethod(inject)
    udp_send = staticmethod(udp_send)

    def popen(self, ns, cmd, **kw):
        """popen(), and stopped by close() (before the namespaces go)."""
        p = popen(ns, cmd, **kw)
        self.procs.append(p)
        return p

    def side(self, ns):
        """(ifname, ip4, ip6, mac) of the end inside namespace `ns`."""
        if ns == self.ns_a:
            return self.if_a, self.ip4_a, self.ip6_a, self.mac_a
        if ns == self.ns_b:
            return self.if_b, self.ip4_b, self.ip6_b, self.mac_b
        raise ValueError(f"{ns} is not one of this pair's namespaces")

    def peer(self, ns):
        return self.ns_b if ns == self.ns_a else self.ns_a

    def ping(self, ns, dst, count=1, timeout=2):
        """Ping `dst` from `ns`; True when every echo was answered."""
        cp = run(ns, ["ping", "-n", "-c", str(count), "-W", str(timeout), "-i", "0.2", dst],
                 check=False, timeout=count * 0.2 + timeout + 5)
        return cp.returncode == 0
