#!/usr/bin/env python3
"""`make bench`: lpd's speed, cost and loss beside tcpdump, libpcap and softflowd, in one run.

    python3 tests/bench.py               # offline, then live (live needs root + netns)
    python3 tests/bench.py --offline     # the offline part only, no privileges, ~8 min
    python3 tests/bench.py --live        # namespaces + trafgen only
    python3 tests/bench.py --quick       # smaller counts: a smoke run
    python3 tests/bench.py --quick --series mix,flood   # live series by name (root)
    python3 tests/bench.py --series ipfix               # an offline series by name
    python3 tests/bench.py --rules-at-scale   # only the startup cost of big rule sets

Prints plain tables and writes the same figures as JSON to bench/results/<UTC time>.json.
Nothing here asserts a timing: it measures and reports.

Offline: frames from ../shared/corpus/pcaps plus a synthetic mix go through lpd's own
frames_to_blocks() -> Decoder.process_block() (the function the live ring loop calls),
with 0/1/10/50 rules; the rule matcher beside lpd's plain interpreter and libpcap's C
bpf_filter (ctypes); compile time and program length beside libpcap; the startup cost
(time, memory per rule) of 10,000 rules (--quick: 1,000) and of one long rule, beside libpcap.
--remote: the synthetic mix with and without a RemoteAddresses stage; a spoofed-source flood
of 10^6 distinct remotes plus a few heavy ones in a child process: RSS, evictions, floor,
and whether the heavy remotes keep their exact bytes.
--connections: a seeded TCP/UDP mix (handshake, data, FIN; UDP exchanges) with and without a
Connections stage, every flow finished with its exact sizes; a SYN flood of 10^6 spoofed
sources plus a few established connections in a child process: RSS, evictions, and whether
the established connections survive it.
--http: a seeded mix of HTTP/1.1 connections to port 80 (handshake, 1-5 keep-alive GETs
answered by Content-Length or chunked bodies in MSS segments, FINs), frames whole as the
kernel program returns them, with and without an HttpRequests stage; every request finished
with the status and body length it was sent with.
--ipfix: captures written here (10^4 and 10^5 short TCP/UDP flows, a few long ones) turned
into IPFIX by lpd -r --connections --ipfix and by softflowd -r (libpcap, C), each into a
fresh nfcapd on 127.0.0.1, beside lpd -r --connections alone: wall and CPU time, records
nfdump decodes, nfcapd's sequence errors, octets against the capture's IP bytes, and lpd's
export cost per flow and per frame.
--names (issue 27): a trace written here (DNS queries and answers, TLS conversations whose
real hellos Python's ssl module makes over memory BIOs, some ClientHellos in 2-3 segments,
and mostly bulk data and ACKs) through lpd -r with and without --names --ssl-log, beside
tshark -T fields decoding the same fields (query names, A answers, server names): CPU per
frame, the stage's per frame and per message, every count checked against the trace; peak
RSS under prlimit on the mix, on 10^5 DNS answers (--names-max 65536, the table full) and
on 10^5 ClientHellos that never finish, beside TLS_HELLOS_MAX x TLS_HELLO_MAX; the kernel
program's cost of copying handshakes whole (BPF_PROG_TEST_RUN, root, skipped without BPF).
--http2 (issue 28): a trace written here of h2c and gRPC connections with prior knowledge
(the h2 library on both ends: many streams at once, HPACK with its dynamic table, DATA
frames, WINDOW_UPDATEs) through lpd -r with and without --http, beside tshark's http2
dissector on the same file and beside lpd on the same calls as HTTP/1.1: CPU per frame and
per call, every count checked against the trace.
Offline series by name (--series): accounting, remote, remote-flood, connections, http,
syn-flood, matchers, rules-at-scale, worker-transport, ipfix, names, http2.

Live: two namespaces joined by a veth pair (tests/netns.py); every lpd line runs with
--engine ebpf and with --engine cbpf, beside tcpdump -w /dev/null. An lpd counting with
ebpf copies no frame to userspace: it is measured by its interface counters against the
veth's own and by system-wide CPU (/proc/stat) above a no-capture floor. Series (--series):
  ladder   trafgen sends a fixed number of frames at a ladder of rates; no capture, tcpdump
           (same ring size) and lpd consume them in turn: loss, CPU, RSS.
  drain    capacity: the consumer is SIGSTOPped while the ring fills, then SIGCONTed and
           timed (lpd also with only B local, --remote, --connections, --http); an lpd whose
           program copies nothing has no ring to drain (n/a).
  workers  the drain with 1 and 2 capture processes (--workers, PACKET_FANOUT).
  syscpu   system-wide CPU per frame of each engine (0/10 rules, --remote).
  mix      system-wide CPU per frame with every stage on (-f, --remote, --connections,
           --http) on a mix where 5 % of frames are HTTP, against issue 24's targets.
  flood    the ladder under tests/test_flood.py's spoofed flood with legitimate frames: the
           zero-loss rate at which those hosts' counts stay exact.
Traffic never leaves the namespaces this script creates.
"""
import argparse
import collections
import datetime
import functools
import glob
import json
import os
import pathlib
import pickle
import platform
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import netns  # noqa: E402

LPD_PATH = os.path.join(REPO, "lpd.py")
RESULTS_DIR = os.path.join(REPO, "bench", "results")
CORPUS_DIR = os.path.join(os.path.dirname(REPO), "shared", "corpus", "pcaps")

# ---- offline ---------------------------------------------------------------------
SYNTH_FRAMES = 1_000_000
SYNTH_FLOWS = 3000
SYNTH_TAGGED = 0.10                     # share of 802.1Q-tagged frames
SYNTH_IPV6 = 0.30
SYNTH_SIZES = (64, 64, 64, 78, 128, 256, 512, 576, 1024, 1280, 1400, 1500, 1514, 1514)
OFFLINE_SNAPLEN = 128                   # lpd's accounting snaplen: what the kernel hands it
OFFLINE_LOCAL_NETS = ("10.199.0.0/16", "fd00:199::/64")
RULE_FRAMES = 100_000                   # frames per rule-count run (rules cost more per frame)
MATCHER_FRAMES = 10_000                 # frames per expression in the matcher comparison
MATCHER_REPEAT = 3                      # best of: the box is shared, take the quietest pass
COMPILE_REPEAT = 20
SCALE_RULES = (10_000,)                 # rule files of this many rules, startup cost
QUICK_SCALE_RULES = (1_000,)            # (10,000: ~25 s of the bench's time)
SCALE_TERMS = (100, 250)                # one rule: an 'or' of this many 'host' terms
SCALE_AS_LIMIT = 8_000_000_000          # RLIMIT_AS of the measuring child (bytes: prlimit
                                        # crashes on its own suffixes here)
# --remote (issue 11): per-remote accounting beside the default path, and a flood
REMOTE_MAX = 65536                      # lpd's default --remote-max (read from lpd.py)
REMOTE_REPEAT = 3                       # best of, default and --remote alternating: the
                                        # difference is the figure, so take quiet passes
FLOOD_SOURCES = 1_000_000               # distinct spoofed remote sources, one frame each (the
                                        # issue's figure: --quick keeps it, ~10 s a run)
FLOOD_LONG_SOURCES = 4_000_000          # and once this long (not --quick): RSS levels off
                                        # by ~2 million (the table fills and trims), ~35 s
FLOOD_HEAVY = 5                         # heavy remotes (IPv4 and IPv6 in turn) ...
FLOOD_HEAVY_SHARE = 0.20                # ... carrying this share of all frames, interleaved
FLOOD_SIZE, FLOOD_HEAVY_SIZE = 64, 1514 # a flood is minimum-size frames, a big talker full ones
FLOOD_LOCAL_HOSTS = 256                 # local hosts the flood and the heavy remotes talk to
FLOOD_PPS = 1_000_000                   # the packet clock the frames carry: ticks (the daemon's
FLOOD_INTERVAL = 1.0                    # --interval, snapshots included) every this many s of it
FLOOD_AS_LIMIT = 3_000_000_000          # RLIMIT_AS of the flood child: a table that does not
                                        # stay bounded fails there, not on the shared machine
FLOOD_TIMEOUT = 300                     # s for one flood child
# --connections (issue 12): the connection stage beside the default path, and a SYN flood
CONN_MAX = 262144                       # lpd's default --conn-max (read from lpd.py)
CONN_SNAP = 142                         # the snaplen with --connections: lpd's CONN_SNAPLEN
                                        # (read from lpd.py), above the accounting one
CONN_FRAMES = 1_000_000                 # frames of the TCP/UDP mix (--quick: a tenth)
CONN_REPEAT = 3                         # best of, default and --connections alternating
CONN_CONCURRENT = 300                   # flows in progress at once, interleaved frame by frame
CONN_PPS = 10_000                       # the mix's packet clock: a closed flow's 5 s linger
                                        # (and so its timer) ends within the run, even --quick
CONN_UDP_SHARE = 0.40                   # share of the flows that are UDP
CONN_OUTBOUND = 0.70                    # share whose client is the local host
CONN_MSS = 1448
CONN_RESPONSES = (200, 600, 1448, 3000, 8000, 20000, 64000, 250000)   # bytes a request fetches
CONN_TCP_PORTS = (443, 443, 443, 80, 80, 22, 25, 993, 8080)
CONN_UDP_PORTS = (53, 53, 53, 123, 443, 443)   # DNS, NTP: one exchange; 443: a QUIC-like burst
SYN_FLOOD = 1_000_000                   # spoofed SYNs, each from a random address and port
SYN_FLOOD_QUICK = 400_000               # --quick (still past --conn-max: evictions happen);
                                        # a run: ~15 s, 10^6 ~40 s
SYN_FLOOD_EST = 5                       # established connections through the flood (IPv4
SYN_FLOOD_EST_SHARE = 0.05              # and IPv6 in turn), this share of the frames
# --http (issue 13): the HTTP stage beside the default path, on whole frames
HTTP_FRAMES = 300_000                   # frames of the HTTP mix (--quick: a tenth); whole
                                        # frames (~350,000 made, ~0.5 GB of blocks)
HTTP_REPEAT = 3                         # best of, default and --http alternating
HTTP_CONCURRENT = 300                   # connections in progress at once, interleaved
HTTP_PPS = 10_000                       # the mix's packet clock
HTTP_PORT = 80
HTTP_REQUESTS = (1, 2, 3, 4, 5)         # keep-alive requests per connection
HTTP_BODIES = (0, 45, 180, 600, 1448, 3000, 8000, 20000, 64000, 250000)  # response body bytes
HTTP_CHUNKED = 0.25                     # share of responses sent chunked
HTTP_CHUNK = 4096                       # their chunk size (the last one shorter)
HTTP_STATUSES = (200, 200, 200, 200, 200, 404, 301, 500)   # all with a body (no 204/304)
# --ipfix (issue 26): flow export's cost, lpd -r beside softflowd -r on the same captures
IPFIX_FLOWS = (10_000, 100_000)         # captures of this many short flows (--quick: the first)
IPFIX_UDP_PORTS = (53, 53, 53, 123)     # their UDP flows: one DNS or NTP exchange, 2 packets
IPFIX_RESPONSES = (200, 600, 1448, 2896)  # their TCP requests fetch 1 or 2 segments
IPFIX_PLAIN_SHARE = 0.5                 # TCP flows without timestamps: IPv4 ACKs padded to 60
IPFIX_LONG_FLOWS = 8                    # the capture of few long flows: TCP connections whose
IPFIX_LONG_BYTES = 24 << 20             # 1-3 responses are this long (--quick: a quarter)
IPFIX_T0 = 1_700_000_000                # the captures' first timestamp (s)
IPFIX_REPEAT = 3                        # best of (--quick: 1), the three lines in turn
IPFIX_AS_LIMIT = 3_000_000_000          # RLIMIT_AS of every exporter run (bytes)
IPFIX_TIMEOUT = 300                     # s for one exporter run
SOFTFLOWD = "softflowd"                 # Debian's /usr/sbin/softflowd (1.1.0)

# ---- live ------------------------------------------------------------------------
GENERATOR_CPU = 0                       # trafgen -P 1 pins its worker to CPU 0 by itself
# The rate ladder. No 50 kpps rung: every consumer was loss-free at 100 kpps in every
# pinning (README, Performance), and its 4 s a series paid for the second engine's lines.
LADDER_PPS = (100_000, 200_000, None)   # None: as fast as trafgen goes
RUNG_FRAMES = 200_000                   # >= the highest paced rate: trafgen -b bursts when -n < rate
QUICK_LADDER_PPS, QUICK_RUNG_FRAMES = (100_000, None), 100_000
FRAME_SIZES = (64, 1400)
LOSS_OK = 0.001                         # "zero loss": below 0.1 %
DRAIN_FRAMES = 1_000_000
DRAIN_RING = 256 << 20                  # ring big enough to hold DRAIN_FRAMES small frames
DRAIN_SETTLE = 1.3                      # s: tcpdump's blocks retire after 1 s
LPD_RETIRE_MS = 20                      # lpd's ring blocks retire after this (RING_RETIRE_MS,
LPD_SETTLE_RETIRES = 5                  # read from lpd.py): its drain waits this many of them
DRAIN_IDLE = 0.15                       # s without CPU progress = drained
IDLE_POLL = 0.01                        # s between reads of a consumer's CPU time then (each
                                        # read costs the bench CPU that lands in sys figures)
DRAIN_PROBE_FRAMES = 20_000             # sent to an ebpf lpd first: a ring it leaves empty
                                        # has nothing to drain (it counted in the kernel)
SYSCPU_FRAMES = 500_000                 # per run of the system-wide CPU series (0.5 s or
                                        # more of busy CPU: 50+ of /proc/stat's 10 ms ticks)
SYSCPU_REPEAT = 3
SYSCPU_WARMUP = 20_000
SYSCPU_COUNT_TIMEOUT = 20.0             # s for a slow consumer to account for a run's frames
SYSCPU_RING = DRAIN_RING                # every consumer's ring in the system-wide CPU series:
                                        # a run fits, so each works on every frame (a line
                                        # that dropped frames would show too low a cost)
SYSCPU_STALL = 2.5                      # s without a new count (over 2 publications): it lost
                                        # the rest (ring drops), stop waiting for them
SYSCPU_POLL = 0.2                       # s between reads of a consumer's count: each read
                                        # costs CPU that lands in the figure being measured
WORKER_FLOWS = 32                       # flows in the workers' drain, spread by the fanout hash
WORKER_SPORT0 = 40000
COUNT_TIMEOUT = 4.0                     # s to wait for a consumer to account a rung
COUNT_POLL = 0.1                        # s between its reads then
LPD_PORT = 19122                        # inside the receiving namespace only
DEFAULT_RING = 16 << 20                 # lpd's default -b (read from lpd.py); tcpdump -B the same
LIVE_LOCAL_NETS = ("10.199.0.0/16", "fd00:199::/64")    # both veth ends local
# --remote: only B (lpd's end) local, so trafgen's A -> B frames are remote -> local ones
# (two remotes, 10.199.0.1 and fd00:199::1: the frames the other drain lines see).
LIVE_REMOTE_LOCAL_NETS = ("10.199.0.2/32", "fd00:199::2/128")
LPD_AS_LIMIT = 2_000_000_000            # RLIMIT_AS of every lpd started here (bytes; a
                                        # 256 MiB ring, Python, thread stacks and arenas fit)
# Engines (issue 24): every lpd line runs once per engine, named explicitly; what
# `--engine auto` picks is recorded at the start of the live part.
ENGINES = ("ebpf", "cbpf")
# Every stage on, on a mix where 5 % of frames are HTTP: per cycle, one whole HTTP/1.1
# connection (the 9 frames of mix_http_steps, one every MIX_SPACING frames) between a
# local client and a remote server, the rest the default line's 64-byte UDP frames A -> B.
MIX_SPACING = 20                        # 1 HTTP frame in 20: 5 %
MIX_HTTP_BODY = 1000                    # response body bytes (one segment, frame < 1514)
MIX_CLIENT_ISN, MIX_SERVER_ISN = 1000, 5000
MIX_CLIENT_PORTS = (32768, 60999)       # one port per connection, dinc()'d each cycle (a
                                        # run of MIX_FRAMES has MIX_FRAMES / 180 of them)
MIX_FRAMES = 500_000                    # per run (--quick: a fifth)
HTTP_CLIENT_NET = "10.199.200.0/21"     # local clients, a new one for each trafgen run
HTTP_SERVER = "198.51.100.80"           # remote (documentation range), port 80
# B and the clients local: every frame of the mix has a remote end (A for the UDP frames)
MIX_LOCAL_NETS = LIVE_REMOTE_LOCAL_NETS + (HTTP_CLIENT_NET,)
EVERY_STAGE = ("--remote", "--connections", "--http", "--docker-socket", "none")
# (line, at most this many times tcpdump's CPU above the floor): printed, not asserted
MIX_TARGETS = {"lpd ebpf +10 rules --remote": 1.0, "lpd ebpf, every stage": 2.0}
# The spoofed flood of tests/test_flood.py, interleaved with legitimate frames A -> B, on
# the rate ladder: 64-byte UDP frames from spoofed sources inside the local networks to a
# remote address. IPv4: SPOOF_V4_DEFS trafgen packets whose third address byte dinc()s
# through its own SPOOF_V4_SPAN values and the fourth through 1..SPOOF_V4_FOURTH (coprime
# spans: every pair once per SPAN x FOURTH frames of it); IPv6: SPOOF_V6_DEFS packets whose
# last 32 bits dinc() through SPOOF_V6_SPAN values each.
SPOOF_V4_DEFS, SPOOF_V4_SPAN, SPOOF_V4_FOURTH = 6, 16, 249     # 23,904 IPv4 sources
SPOOF_V6_DEFS, SPOOF_V6_SPAN = 2, 3000                          # 6,000 IPv6 sources
SPOOF_FRAME = 64
SPOOF_LEGIT_PAYLOAD = 200               # test_flood's LEGIT datagrams, one per cycle
SPOOF_LOCAL_NETS = ("10.199.0.0/16", "fd00:199:1::/64")   # test_flood's (off B's own /64)
SPOOF_LOCAL_MAX = 2000                  # test_flood's LOCAL_MAX
SPOOF_INTERVAL = 0.5                    # lpd --interval (test_flood's)
SPOOF_WARMUP = 20_000                   # flood + legit frames before the first rung: the
                                        # legitimate hosts appear after the flood filled
                                        # the table (the attack issue 24 describes) ...
SPOOF_NEWCOMER_WAIT = 3 * SPOOF_INTERVAL  # ... and get at most one --interval to be counted
SPOOF_STABLE = 3 * SPOOF_INTERVAL       # s a count must stay put to be final (not exact)
SPOOF_SETTLE_TIMEOUT = 10.0             # s for a rung's counts to settle at most

RULE_EXPRS = [
    "udp port 9", "host 10.199.0.1", "net 10.199.0.0/24 and udp", "ip6 and udp",
    "tcp port 443", "udp port 53", "icmp or icmp6", "greater 1000", "vlan",
    "src net 198.51.100.0/24 and dst port 9", "ip6 dst host fd00:199::2",
    "tcp[tcpflags] & tcp-syn != 0", "ether broadcast", "arp", "less 128",
    "dst net 203.0.113.0/24", "udp dst portrange 1000-2000", "ip proto 47",
    "vlan 100 and ip", "not ip and not ip6",
]


###############################################################################
# Output ######################################################################
###############################################################################

MAX_CELL = 64                           # a row's message (Table.say) is printed whole


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) >= 0.001 or v == 0 else f"{v:.2e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


class Table:
    """Rows of dicts printed as a plain aligned table; kept for the JSON too."""

    def __init__(self, title, columns, note=None):
        self.title, self.columns, self.note, self.rows = title, columns, note, []

    def add(self, **row):
        self.rows.append(row)
        return row

    def say(self, first, message, **row):
        """A row that is one sentence after its leading columns (why a line has no
        figures: 'not available: <lpd's error>', 'n/a: ...'), printed whole, not cut to a
        cell; the leading columns are the first one and those after it the row has."""
        return self.add(**{self.columns[0]: first, "message": message}, **row)

    def _leading(self, r):
        """How many leading columns a message row shows."""
        n = 1
        while n < len(self.columns) and r.get(self.columns[n]) is not None:
            n += 1
        return n

    def render(self):
        cells = [[fmt(r.get(c))[:MAX_CELL] for c in self.columns] for r in self.rows]
        widths = [max([len(c)] + [len(row[i]) for row, r in zip(cells, self.rows)
                                  if "message" not in r or i < self._leading(r)])
                  for i, c in enumerate(self.columns)]
        lines = [f"== {self.title}"]
        if self.note:
            lines += [f"   {line}" for line in self.note.splitlines()]
        lines.append("  ".join(c.rjust(w) for c, w in zip(self.columns, widths)))
        for row, r in zip(cells, self.rows):
            n = self._leading(r) if "message" in r else len(row)
            line = "  ".join(v.rjust(w) for v, w in zip(row[:n], widths))
            lines.append(line + f"  {r['message']}" if "message" in r else line)
        return "\n".join(lines)

    def show(self):
        print(self.render(), flush=True)
        print(flush=True)

    def to_json(self):
        return {"title": self.title, "note": self.note, "rows": self.rows}


def machine_info():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "interpreter": sys.executable,
            "tcpdump": tool_version(["tcpdump", "--version"]),
            "trafgen": tool_version(["trafgen", "-v"]),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def tool_version(argv):
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (cp.stdout + cp.stderr).strip().splitlines()
    return text[0] if text else "?"


def save_json(results):
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(RESULTS_DIR, f"{stamp}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    return path


def import_lpd(path):
    """lpd as a module from `path` (the repo's lpd.py, or the wip shim)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("lpd", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lpd"] = mod
    spec.loader.exec_module(mod)
    return mod


###############################################################################
# Offline #####################################################################
###############################################################################

def corpus_frames(lpd):
    """(data, wirelen) of every Ethernet frame in the shared corpus; skipped files counted."""
    frames, skipped = [], 0
    for path in sorted(glob.glob(os.path.join(CORPUS_DIR, "*.pcap"))):
        try:
            frames += [(data, wirelen) for _, wirelen, data in lpd.read_pcap(path)]
        except Exception:
            skipped += 1
    return frames, skipped


def _ipv4_header(src, dst, total_len, proto=17):
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total_len, 0, 0x4000, 64, proto, 0, src, dst)
    s = sum(struct.unpack("!10H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return hdr[:10] + struct.pack("!H", ~s & 0xFFFF) + hdr[12:]


def synth_frame(flow, size):
    """The first OFFLINE_SNAPLEN bytes of a UDP frame of `size` bytes on the wire."""
    ipv6, tagged, src, dst, sport, dport = flow
    eth = b"\x02\x00\x0a\xc7\x00\x02\x02\x00\x0a\xc7\x00\x01"
    if tagged:
        eth += struct.pack("!HH", 0x8100, 100)
    l3 = size - len(eth) - 2
    if ipv6:
        eth += b"\x86\xdd"
        ip = struct.pack("!IHBB16s16s", 0x60000000, l3 - 40, 17, 64, src, dst)
    else:
        eth += b"\x08\x00"
        ip = _ipv4_header(src, dst, l3)
    udp = struct.pack("!HHHH", sport, dport, l3 - len(ip), 0)
    frame = eth + ip + udp
    return (frame + bytes(OFFLINE_SNAPLEN))[:min(size, OFFLINE_SNAPLEN)]


def synth_flows(rng):
    """SYNTH_FLOWS flows between local hosts (10.199/16, fd00:199::/64) and remote ones
    (documentation ranges; these are bytes in memory, never sent anywhere)."""
    flows = []
    for _ in range(SYNTH_FLOWS):
        ipv6 = rng.random() < SYNTH_IPV6
        if ipv6:
            local = bytes.fromhex("fd000199000000000000000000") + rng.randbytes(3)
            remote = bytes.fromhex("20010db8") + rng.randbytes(12)
        else:
            local = bytes([10, 199, rng.randrange(4), rng.randrange(1, 255)])
            remote = bytes([rng.choice((198, 203)), rng.choice((51, 0)), rng.choice((100, 113)),
                            rng.randrange(1, 255)])
        src, dst = (local, remote) if rng.random() < 0.5 else (remote, local)
        flows.append((ipv6, rng.random() < SYNTH_TAGGED, src, dst,
                      rng.randrange(1024, 65535), rng.choice((9, 53, 443, 1500, 4500))))
    return flows


def synthetic_frames(n, seed=199):
    rng = random.Random(seed)
    flows = synth_flows(rng)
    cache = {}
    frames = []
    for _ in range(n):
        fi, size = rng.randrange(len(flows)), rng.choice(SYNTH_SIZES)
        data = cache.get((fi, size))
        if data is None:
            data = cache[(fi, size)] = synth_frame(flows[fi], size)
        frames.append((data, size))
    return frames


def time_accounting(lpd, blocks, rules=None, repeat=2, remote_max=None, conns=None, http=None):
    """Best seconds for lpd.Decoder.process_block over every block (fresh counters each
    time); returns (s, decoder). With `remote_max`, a RemoteAddresses stage (--remote)
    as well, the decoder's first consumer as in the daemon; with `conns`, a callable
    making a fresh Connections stage (--connections), after it and before the rules;
    with `http`, one making a fresh HttpRequests stage (--http), after those (the
    daemon's order)."""
    import ipaddress
    best = float("inf")
    views = [memoryview(b) for b in blocks]
    for _ in range(repeat):
        local = lpd.LocalAddresses([ipaddress.ip_network(n) for n in OFFLINE_LOCAL_NETS])
        if rules is not None:
            rules = lpd.RuleCounter(rules.rules)          # fresh counters, same programs
        stages = [] if remote_max is None else [lpd.RemoteAddresses(remote_max)]
        if conns is not None:
            stages.append(conns())
        if http is not None:
            stages.append(http())
        acct = lpd.Decoder(local, stages + ([rules] if rules else []))
        t0 = time.perf_counter()
        for v in views:
            acct.process_block(v, 0)
        best = min(best, time.perf_counter() - t0)
    return best, acct


def time_beside_default(lpd, blocks, repeat, **stage):
    """time_accounting of the default path and of one with a stage (its `remote_max`,
    `conns` or `http`), `repeat` passes of each, alternating: on a shared box the
    difference is the figure, so both come from quiet passes. Returns (default s, stage s,
    the stage's decoder of the last pass)."""
    default = staged = float("inf")
    for _ in range(repeat):
        default = min(default, time_accounting(lpd, blocks, repeat=1)[0])
        secs, acct = time_accounting(lpd, blocks, repeat=1, **stage)
        staged = min(staged, secs)
    return default, staged, acct


def time_bare_walk(lpd, blocks):
    """The floor of any Python ring loop: walk every frame header of every block, nothing
    else (lpd's own FRAME_HDR/BLOCK_HDR layouts)."""
    frame_hdr, block_hdr, off = lpd.FRAME_HDR.unpack_from, lpd.BLOCK_HDR.unpack_from, lpd.BLOCK_HDR_OFF
    views = [memoryview(b) for b in blocks]
    t0 = time.perf_counter()
    for v in views:
        count, pos = block_hdr(v, off)
        for _ in range(count):
            pos += frame_hdr(v, pos)[0]
    return time.perf_counter() - t0


def make_ruleset(lpd, exprs):
    text = "".join(f"r{i};{e}\n" for i, e in enumerate(exprs))
    return lpd.RuleCounter(lpd.parse_filter_text(text, "bench", None))


def rule_exprs(n):
    """n rule expressions: the realistic list, then per-host rules for the rest."""
    exprs = list(RULE_EXPRS[:n])
    i = 0
    while len(exprs) < n:
        exprs.append(f"host 10.199.{i % 4}.{i + 1}")
        i += 1
    return exprs


def offline_accounting(lpd, results, quick):
    t = Table("Offline: decode + per-address accounting (+ rules), in-process",
              ["input", "rules", "frames", "ns/frame", "Mframes/s", "bytes ok"],
              note=f"lpd.frames_to_blocks -> Decoder.process_block; frames carry their first "
                   f"{OFFLINE_SNAPLEN} bytes (lpd's accounting snaplen), wirelen is the real one;\n"
                   f"local nets {', '.join(OFFLINE_LOCAL_NETS)}; rule runs use the first "
                   f"{RULE_FRAMES:,} synthetic frames.")
    if not hasattr(lpd, "frames_to_blocks") or not hasattr(lpd, "Decoder"):
        t.add(input="-", rules="lpd.frames_to_blocks/Decoder not available yet")
        return t
    corpus, skipped = corpus_frames(lpd)
    n = SYNTH_FRAMES // (10 if quick else 1)
    synth = synthetic_frames(n)
    for name, frames in ((f"corpus ({skipped} files skipped)", corpus), ("synthetic mix", synth)):
        blocks = list(lpd.frames_to_blocks(frames))
        secs, acct = time_accounting(lpd, blocks)
        t.add(input=name, rules=0, frames=len(frames), **{
            "ns/frame": secs / len(frames) * 1e9, "Mframes/s": len(frames) / secs / 1e6,
            "bytes ok": acct.totals[2] == sum(w for _, w in frames)})
    try:
        secs = time_bare_walk(lpd, blocks)
        t.add(input="synthetic, bare block walk (floor)", rules="-", frames=len(synth), **{
            "ns/frame": secs / len(synth) * 1e9, "Mframes/s": len(synth) / secs / 1e6})
    except AttributeError as e:
        t.add(input="bare block walk", rules="not available: " + one_line(e))
    rule_frames = synth[:RULE_FRAMES // (10 if quick else 1)]
    blocks = list(lpd.frames_to_blocks(rule_frames))
    base, _ = time_accounting(lpd, blocks)
    for nrules in (1, 10, 50):
        try:
            rules = make_ruleset(lpd, rule_exprs(nrules))
        except Exception as e:
            t.add(input="synthetic mix", rules=nrules, frames="not available yet: " + one_line(e))
            continue
        secs, _ = time_accounting(lpd, blocks, rules)
        t.add(input="synthetic mix", rules=nrules, frames=len(rule_frames), **{
            "ns/frame": secs / len(rule_frames) * 1e9,
            "Mframes/s": len(rule_frames) / secs / 1e6,
            "bytes ok": f"+{(secs - base) / len(rule_frames) * 1e9:.0f} ns over no rules"})
    results["offline_accounting"] = t.to_json()
    return t


def offline_remote(lpd, results, quick):
    """ns/frame of the default path and of --remote on the same synthetic mix, whose
    flows all have one local end and one remote (synth_flows)."""
    t = Table("Offline: --remote (per-remote accounting) beside the default path, in-process",
              ["input", "frames", "default ns/frame", "remote ns/frame", "+ns/frame",
               "remote Mframes/s", "remotes tracked", "bytes ok"],
              note=f"Decoder(local) against Decoder(local, [RemoteAddresses({REMOTE_MAX})]) on the "
                   f"same blocks, best of {REMOTE_REPEAT} alternating passes;\nsynthetic mix: "
                   f"{SYNTH_FLOWS:,} flows, each between a host in {', '.join(OFFLINE_LOCAL_NETS)} "
                   "and a remote one (198.51.100/24, 203.0.113/24, 2001:db8::/32);\nbytes ok: "
                   "the remotes' exact totals are every frame's bytes. Snapshots (once per "
                   "--interval in the daemon) are not timed.")
    results["offline_remote"] = t.to_json()
    if not hasattr(lpd, "RemoteAddresses"):
        t.add(input="-", frames="lpd.RemoteAddresses not available")
        return t
    frames = synthetic_frames(SYNTH_FRAMES // (10 if quick else 1))
    blocks = list(lpd.frames_to_blocks(frames))
    default, remote, acct = time_beside_default(lpd, blocks, REMOTE_REPEAT, remote_max=REMOTE_MAX)
    remotes = acct.consumers[0]
    n = len(frames)
    t.add(input=f"synthetic mix ({SYNTH_FLOWS:,} flows)", frames=n, **{
        "default ns/frame": default / n * 1e9, "remote ns/frame": remote / n * 1e9,
        "+ns/frame": (remote - default) / n * 1e9, "remote Mframes/s": n / remote / 1e6,
        "remotes tracked": remotes.tracked(),
        "bytes ok": remotes.totals[lpd.TX_BYTES] + remotes.totals[lpd.RX_BYTES]
        == sum(w for _, w in frames)})
    return t


# --connections: a mix of whole TCP connections and UDP flows, made frame by frame.

TH_FIN, TH_SYN, TH_PSH, TH_ACK = 0x01, 0x02, 0x08, 0x10
SEQ_MASK = 0xFFFFFFFF
_TCP_HDR = struct.Struct("!HHIIBBHHH")
_TCP_OPTS = b"\x01\x01\x08\x0a" + bytes(8)                           # NOP NOP TS: doff 8
_SYN_OPTS = b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + bytes(8) + b"\x01\x03\x03\x07"   # doff 10


def _tcp_steps(rng, responses=CONN_RESPONSES):
    """One TCP connection as (from client, flags, seq, ack, payload bytes), in order: the
    handshake, 1-3 requests each answered (bytes: one of `responses`) in MSS segments
    that the client ACKs every second one, FINs both ways (the client's first, mostly)
    and the last ACK."""
    c, s = rng.getrandbits(32), rng.getrandbits(32)         # wraps happen, and must count
    yield True, TH_SYN, c, 0, 0
    c = (c + 1) & SEQ_MASK
    yield False, TH_SYN | TH_ACK, s, c, 0
    s = (s + 1) & SEQ_MASK
    yield True, TH_ACK, c, s, 0
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        req = rng.randrange(80, 900)
        yield True, TH_PSH | TH_ACK, c, s, req
        c = (c + req) & SEQ_MASK
        left, segs = rng.choice(responses), 0
        while left:
            seg = min(CONN_MSS, left)
            left -= seg
            yield False, TH_ACK if left else TH_PSH | TH_ACK, s, c, seg
            s = (s + seg) & SEQ_MASK
            segs += 1
            if segs % 2 == 0 or not left:
                yield True, TH_ACK, c, s, 0
    if rng.random() < 0.7:
        yield True, TH_FIN | TH_ACK, c, s, 0
        c = (c + 1) & SEQ_MASK
        yield False, TH_FIN | TH_ACK, s, c, 0
        s = (s + 1) & SEQ_MASK
        yield True, TH_ACK, c, s, 0
    else:
        yield False, TH_FIN | TH_ACK, s, c, 0
        s = (s + 1) & SEQ_MASK
        yield True, TH_FIN | TH_ACK, c, s, 0
        c = (c + 1) & SEQ_MASK
        yield False, TH_ACK, s, c, 0


def _udp_steps(rng, port):
    """One UDP flow as (from client, payload bytes): a DNS or NTP exchange, or a QUIC-like
    burst (an Initial, the server's datagrams, a few client ones); both sides send."""
    if port == 53:
        yield True, rng.randrange(28, 60)
        yield False, rng.randrange(60, 480)
    elif port == 123:
        yield True, 48
        yield False, 48
    else:
        yield True, 1200
        for _ in range(rng.randrange(2, 40)):
            yield False, rng.choice((1200, 1250, 1350))
            if rng.random() < 0.3:
                yield True, rng.randrange(30, 60)
        yield True, rng.randrange(30, 60)


class _MixFlow:
    """One flow of the mix: its ends, its steps, and what Zeek's conn.log should say of
    it: [orig_bytes, resp_bytes, orig_pkts, orig_ip_bytes, resp_pkts, resp_ip_bytes]."""
    __slots__ = ("v6", "eth", "client", "server", "cport", "sport", "proto", "steps", "exp",
                 "opts")

    def frame(self, step, snaplen):
        """(captured bytes, wirelen) of one step."""
        if self.proto == 6:
            from_client, flags, seq, ack, plen = step
            opts = _SYN_OPTS if flags & TH_SYN else self.opts
            ports = (self.cport, self.sport) if from_client else (self.sport, self.cport)
            l4 = _TCP_HDR.pack(*ports, seq, ack, (5 + len(opts) // 4) << 4, flags, 64240, 0, 0) + opts
        else:
            from_client, plen = step
            ports = (self.cport, self.sport) if from_client else (self.sport, self.cport)
            l4 = struct.pack("!HHHH", *ports, 8 + plen, 0)
        src, dst = (self.client, self.server) if from_client else (self.server, self.client)
        l4_len = len(l4) + plen
        if self.v6:
            ip = struct.pack("!IHBB16s16s", 0x60000000, l4_len, self.proto, 64, src, dst)
        else:
            ip = _ipv4_header(src, dst, 20 + l4_len, self.proto)
        ip_len = len(ip) + l4_len
        wirelen = max(60, len(self.eth) + ip_len)
        at = 0 if from_client else 1
        exp = self.exp
        exp[at] += plen
        exp[2 + 2 * at] += 1
        exp[3 + 2 * at] += ip_len
        return (self.eth + ip + l4 + bytes(snaplen))[:min(wirelen, snaplen)], wirelen


def _mix_endpoints(rng, v6):
    """(client, server) raw addresses of a mix flow: a local and a remote one, either way."""
    if v6:
        local = bytes.fromhex("fd000199000000000000000000") + rng.randbytes(3)
        remote = bytes.fromhex("20010db8") + rng.randbytes(12)
    else:
        local = bytes([10, 199, rng.randrange(4), rng.randrange(1, 255)])
        remote = bytes([rng.choice((198, 203)), rng.choice((51, 0)),
                        rng.choice((100, 113)), rng.randrange(1, 255)])
    return (local, remote) if rng.random() < CONN_OUTBOUND else (remote, local)


class ConnMix:
    """A seeded mix of whole TCP connections (handshake, data, FINs) and UDP flows
    between the local nets and remote hosts, CONN_CONCURRENT of them in progress at a
    time, each frame from one picked at random, on a CONN_PPS packet clock. New flows
    start until `n` frames are made or `flows` flows have started (None: no bound); those
    in progress then run to their end. Every 5-tuple is used once. frames() yields
    SynthFrames; once it has run, `expected` holds each flow's conn.log figures by (proto,
    orig_h, orig_p, resp_h, resp_p). The flows' shape (the --connections series' unless
    given): the share of UDP flows and their server ports (_udp_steps), the bytes a TCP
    request fetches (_tcp_steps), and the share of TCP flows without timestamp options
    (their IPv4 ACKs are 54 bytes, padded to 60 on the wire)."""

    def __init__(self, lpd, n, snaplen, seed=12, flows=None, udp_share=CONN_UDP_SHARE,
                 udp_ports=CONN_UDP_PORTS, responses=CONN_RESPONSES, plain_share=0.0):
        self.lpd, self.n, self.snaplen, self.seed = lpd, n, snaplen, seed
        self.max_flows, self.udp_share, self.udp_ports = flows, udp_share, udp_ports
        self.responses, self.plain_share = responses, plain_share
        self.expected, self.tcp, self.udp, self.frames_made, self.wire_bytes = {}, 0, 0, 0, 0

    def _new_flow(self, rng, used):
        import ipaddress
        while True:
            f = _MixFlow()
            udp, f.v6 = rng.random() < self.udp_share, rng.random() < SYNTH_IPV6
            f.client, f.server = _mix_endpoints(rng, f.v6)
            # client ports above every likely server port: the first frame orients the flow
            f.cport = rng.randrange(32768, 61000)
            f.sport = rng.choice(self.udp_ports if udp else CONN_TCP_PORTS)
            f.proto = 17 if udp else 6
            key = (f.proto, f.client, f.cport, f.server, f.sport)
            if key not in used:
                used.add(key)
                break
        f.eth = b"\x02\x00\x0a\xc7\x00\x02\x02\x00\x0a\xc7\x00\x01"
        if rng.random() < SYNTH_TAGGED:
            f.eth += struct.pack("!HH", 0x8100, 100)
        f.eth += b"\x86\xdd" if f.v6 else b"\x08\x00"
        f.steps = _udp_steps(rng, f.sport) if udp else _tcp_steps(rng, self.responses)
        # (no draw without plain flows: the --connections series' mix stays as it was)
        f.opts = b"" if self.plain_share and rng.random() < self.plain_share else _TCP_OPTS
        f.exp = [0] * 6
        fam = ipaddress.IPv6Address if f.v6 else ipaddress.IPv4Address
        self.expected[("udp" if udp else "tcp", str(fam(f.client)), f.cport,
                       str(fam(f.server)), f.sport)] = f.exp
        if udp:
            self.udp += 1
        else:
            self.tcp += 1
        return f

    def frames(self):
        rng, used, active, made = random.Random(self.seed), set(), [], 0
        make = self.lpd.SynthFrame

        def more():         # a new flow may start
            return (self.n is None or made < self.n) and \
                (self.max_flows is None or self.flows < self.max_flows)

        while more() or active:
            while more() and len(active) < CONN_CONCURRENT:
                active.append(self._new_flow(rng, used))
            i = rng.randrange(len(active))
            step = next(active[i].steps, None)
            if step is None:
                active[i] = active[-1]
                active.pop()
                continue
            data, wirelen = active[i].frame(step, self.snaplen)
            yield make(data, wirelen, ts=made / CONN_PPS)
            made += 1
            self.wire_bytes += wirelen
        self.frames_made = made

    @property
    def flows(self):
        return self.tcp + self.udp


def mix_records_exact(mix, records, keep=10):
    """(how many conn.log records are SF with exactly the sizes and counts the mix sent,
    the first `keep` others with what was expected of them)."""
    exact, misses = 0, []
    for rec in records:
        exp = mix.expected.get((rec["proto"], rec["id.orig_h"], rec["id.orig_p"],
                                rec["id.resp_h"], rec["id.resp_p"]))
        got = [rec.get("orig_bytes"), rec.get("resp_bytes"), rec["orig_pkts"],
               rec["orig_ip_bytes"], rec["resp_pkts"], rec["resp_ip_bytes"]]
        if rec["conn_state"] == "SF" and got == exp:
            exact += 1
        elif len(misses) < keep:
            misses.append({"record": rec, "expected": exp})
    return exact, misses


def offline_connections(lpd, results, quick):
    """ns/frame of the default path and of --connections on a TCP/UDP mix of whole
    flows; every flow is finished (by its timers during the run, the rest by
    finish() as at the end of a replay) with its exact sizes."""
    t = Table("Offline: --connections (connection tracking) beside the default path, in-process",
              ["input", "flows", "frames", "default ns/frame", "conns ns/frame", "+ns/frame",
               "conns Mframes/s", "open at end", "finished in run", "finished",
               "finished = flows", "records exact", "bytes ok"],
              note=f"Decoder(local) against Decoder(local, [Connections({CONN_MAX})]) on the same "
                   f"blocks, best of {CONN_REPEAT} alternating passes; the stage's finished() "
                   "collects the conn.log records (as --conn-log's writer would get them);\n"
                   f"mix: seeded, {CONN_UDP_SHARE:.0%} UDP flows (DNS, NTP, QUIC-like bursts), the "
                   "rest TCP (handshake, 1-3 requests answered in MSS segments ACKed every second "
                   "one,\nFINs both ways, last ACK), "
                   f"{CONN_CONCURRENT:,} in progress at a time, interleaved, on a "
                   f"{CONN_PPS:,} fps packet clock ({SYNTH_IPV6:.0%} IPv6, {SYNTH_TAGGED:.0%} "
                   "tagged);\nfinished in run: by their close timers (5 s after the last FIN) "
                   "within process_block; finished: after finish() (untimed), as a replay "
                   f"ends; frames carry their first {CONN_SNAP} bytes (the --connections "
                   "snaplen);\nrecords exact: SF, and orig/resp bytes (from sequence numbers), "
                   "packets and IP bytes equal to what the mix sent; bytes ok: interface totals.")
    results["offline_connections"] = t.to_json()
    if not hasattr(lpd, "Connections"):
        t.add(input="-", flows="lpd.Connections not available")
        return t
    mix = ConnMix(lpd, CONN_FRAMES // (10 if quick else 1), CONN_SNAP)
    blocks = list(lpd.frames_to_blocks(mix.frames()))
    n = mix.frames_made
    records = []

    def make():             # a fresh stage each pass: `records` are the last pass's
        records.clear()
        return lpd.Connections(CONN_MAX, finished=records.append)

    default, conns, acct = time_beside_default(lpd, blocks, CONN_REPEAT, conns=make)
    stage = acct.consumers[0]
    open_end, in_run = stage.tracked(), sum(stage.closed.values())
    stage.finish()
    finished = sum(stage.closed.values())
    states = {f"{lpd.PROTO_NAMES[p]} {s}": v for (p, s), v in stage.closed.items() if v}
    exact, misses = mix_records_exact(mix, records)
    t.add(input=f"TCP/UDP mix ({mix.tcp:,} TCP + {mix.udp:,} UDP)", flows=mix.flows, frames=n, **{
        "default ns/frame": default / n * 1e9, "conns ns/frame": conns / n * 1e9,
        "+ns/frame": (conns - default) / n * 1e9, "conns Mframes/s": n / conns / 1e6,
        "open at end": open_end, "finished in run": in_run, "finished": finished,
        "finished = flows": finished == mix.flows == len(records),
        "records exact": f"{exact:,}/{mix.flows:,}",
        "bytes ok": acct.totals[lpd.TX_BYTES] + acct.totals[lpd.RX_BYTES] == mix.wire_bytes,
        "conn_states": states, "evictions": dict(stage.evictions), "not exact": misses})
    return t


# --http: whole HTTP/1.1 connections to port 80, their frames whole, made frame by frame.

def _http_steps(rng, expected):
    """One HTTP/1.1 connection as (from client, flags, seq, ack, payload), in order: the
    handshake, 1-5 keep-alive GETs, each answered (Content-Length or chunked body) in
    CONN_MSS segments that the client ACKs every second one, FINs both ways and the last
    ACK. Appends each request's (status, response body bytes) to `expected`."""
    c, s = rng.getrandbits(32), rng.getrandbits(32)
    yield True, TH_SYN, c, 0, b""
    c = (c + 1) & SEQ_MASK
    yield False, TH_SYN | TH_ACK, s, c, b""
    s = (s + 1) & SEQ_MASK
    yield True, TH_ACK, c, s, b""
    for depth in range(1, rng.choice(HTTP_REQUESTS) + 1):
        req = (f"GET /item/{rng.randrange(10 ** 6)}?page={depth} HTTP/1.1\r\n"
               "Host: www.example.com\r\nUser-Agent: lpd-bench/1\r\nAccept: */*\r\n\r\n").encode()
        yield True, TH_PSH | TH_ACK, c, s, req
        c = (c + len(req)) & SEQ_MASK
        status, body = rng.choice(HTTP_STATUSES), rng.choice(HTTP_BODIES)
        expected.append((status, body))
        if rng.random() < HTTP_CHUNKED:
            framed = b"".join(b"%x\r\n" % len(part) + part + b"\r\n" for part in
                              (b"x" * min(HTTP_CHUNK, body - i) for i in range(0, body, HTTP_CHUNK)))
            head, framed = "Transfer-Encoding: chunked", framed + b"0\r\n\r\n"
        else:
            head, framed = f"Content-Length: {body}", b"x" * body
        stream = memoryview((f"HTTP/1.1 {status} X\r\nContent-Type: text/html\r\n{head}\r\n\r\n")
                            .encode() + framed)
        for segs, at in enumerate(range(0, len(stream), CONN_MSS), 1):
            seg = stream[at:at + CONN_MSS]
            last = at + CONN_MSS >= len(stream)
            yield False, TH_PSH | TH_ACK if last else TH_ACK, s, c, seg
            s = (s + len(seg)) & SEQ_MASK
            if segs % 2 == 0 or last:
                yield True, TH_ACK, c, s, b""
    yield True, TH_FIN | TH_ACK, c, s, b""
    c = (c + 1) & SEQ_MASK
    yield False, TH_FIN | TH_ACK, s, c, b""
    s = (s + 1) & SEQ_MASK
    yield True, TH_ACK, c, s, b""


class _HttpFlow(_MixFlow):
    """One connection of the HTTP mix; its frames carry their payload, whole."""
    __slots__ = ()

    def frame(self, step, snaplen=None):
        from_client, flags, seq, ack, payload = step
        opts = _SYN_OPTS if flags & TH_SYN else _TCP_OPTS
        ports = (self.cport, self.sport) if from_client else (self.sport, self.cport)
        l4 = _TCP_HDR.pack(*ports, seq, ack, (5 + len(opts) // 4) << 4, flags, 64240, 0, 0) + opts
        src, dst = (self.client, self.server) if from_client else (self.server, self.client)
        l4_len = len(l4) + len(payload)
        if self.v6:
            ip = struct.pack("!IHBB16s16s", 0x60000000, l4_len, 6, 64, src, dst)
        else:
            ip = _ipv4_header(src, dst, 20 + l4_len, 6)
        data = self.eth + ip + l4 + payload
        wirelen = max(60, len(data))
        return data.ljust(wirelen, b"\0"), wirelen


class HttpMix(ConnMix):
    """A seeded mix of whole HTTP/1.1 connections to port 80 between the local nets and
    remote hosts, interleaved as ConnMix's (HTTP_CONCURRENT in progress, a frame from one
    picked at random, on an HTTP_PPS packet clock), every frame whole. Once frames() has
    run, `expected` holds each request's (status, response body bytes) by (orig_h,
    orig_p, trans_depth)."""

    def __init__(self, lpd, n, seed=13):
        super().__init__(lpd, n, None, seed)
        self.conns, self.requests = 0, 0

    def _new_flow(self, rng, used):
        import ipaddress
        while True:
            f = _HttpFlow()
            f.v6 = rng.random() < SYNTH_IPV6
            f.client, f.server = _mix_endpoints(rng, f.v6)
            f.cport, f.sport, f.proto = rng.randrange(32768, 61000), HTTP_PORT, 6
            if (f.client, f.cport) not in used:       # the key `expected` is kept by
                used.add((f.client, f.cport))
                break
        f.eth = b"\x02\x00\x0a\xc7\x00\x02\x02\x00\x0a\xc7\x00\x01"
        if rng.random() < SYNTH_TAGGED:
            f.eth += struct.pack("!HH", 0x8100, 100)
        f.eth += b"\x86\xdd" if f.v6 else b"\x08\x00"
        exp = []
        f.steps = self._steps(rng, f, exp)
        fam = ipaddress.IPv6Address if f.v6 else ipaddress.IPv4Address
        self.expected[(str(fam(f.client)), f.cport)] = exp
        self.conns += 1
        return f

    def _steps(self, rng, f, exp):
        yield from _http_steps(rng, exp)
        self.requests += len(exp)

    @property
    def flows(self):
        return self.conns


def http_records_exact(mix, records, keep=10):
    """(how many http.log records have exactly the status and response body length
    their request was answered with, the first `keep` others with what was expected)."""
    exact, misses = 0, []
    for rec in records:
        exp = mix.expected.get((rec["id.orig_h"], rec["id.orig_p"]), [])
        want = exp[rec["trans_depth"] - 1] if 0 < rec["trans_depth"] <= len(exp) else None
        if rec["id.resp_p"] == HTTP_PORT and want == (rec["status_code"], rec["response_body_len"]):
            exact += 1
        elif len(misses) < keep:
            misses.append({"record": rec, "expected": want})
    return exact, misses


def offline_http(lpd, results, quick):
    """ns/frame of the default path and of --http on a mix of whole HTTP connections;
    every request finished (at its response's last byte during the run, the rest by
    finish() as at the end of a replay) with its status and body length."""
    t = Table("Offline: --http (HTTP requests from TCP reassembly) beside the default path, "
              "in-process",
              ["input", "conns", "requests", "frames", "default ns/frame", "http ns/frame",
               "+ns/frame", "http Mframes/s", "finished in run", "finished",
               "finished = requests", "records exact", "parse errors", "bytes ok"],
              note=f"Decoder(local) against Decoder(local, [HttpRequests(({HTTP_PORT},))]) on the "
                   f"same blocks, best of {HTTP_REPEAT} alternating passes; the stage's finished() "
                   "collects the http.log records (as --http-log's writer would get them);\n"
                   f"mix: seeded HTTP/1.1 connections to port {HTTP_PORT} (handshake, "
                   f"{HTTP_REQUESTS[0]}-{HTTP_REQUESTS[-1]} keep-alive GETs, each answered with a "
                   f"body of {HTTP_BODIES[0]}-{HTTP_BODIES[-1]:,} bytes, {HTTP_CHUNKED:.0%} chunked "
                   f"({HTTP_CHUNK}-byte chunks), the rest by Content-Length,\nin {CONN_MSS}-byte "
                   "segments ACKed every second one; FINs both ways, last ACK), "
                   f"{HTTP_CONCURRENT:,} in progress at a time, interleaved, on a {HTTP_PPS:,} fps "
                   f"packet clock ({SYNTH_IPV6:.0%} IPv6, {SYNTH_TAGGED:.0%} tagged);\nframes are "
                   "whole (the kernel program returns the --http ports' frames whole), for both "
                   "paths; finished in run: records emitted within process_block;\nfinished: "
                   "after finish() (untimed); records exact: status_code and response_body_len "
                   "(the body after chunked framing) equal to what was sent;\nbytes ok: "
                   "interface totals.")
    results["offline_http"] = t.to_json()
    if not hasattr(lpd, "HttpRequests"):
        t.add(input="-", conns="lpd.HttpRequests not available")
        return t
    mix = HttpMix(lpd, HTTP_FRAMES // (10 if quick else 1))
    blocks = list(lpd.frames_to_blocks(mix.frames()))
    n = mix.frames_made
    records = []

    def make():             # a fresh stage each pass: `records` are the last pass's
        records.clear()
        return lpd.HttpRequests((HTTP_PORT,), finished=records.append)

    default, http, acct = time_beside_default(lpd, blocks, HTTP_REPEAT, http=make)
    stage = acct.consumers[0]
    in_run, open_end = len(records), len(stage.streams)
    stage.finish()
    exact, misses = http_records_exact(mix, records)
    errors = {k: v for k, v in stage.errors.items() if v}
    t.add(input=f"HTTP mix ({mix.conns:,} connections)", conns=mix.conns,
          requests=mix.requests, frames=n, **{
              "default ns/frame": default / n * 1e9, "http ns/frame": http / n * 1e9,
              "+ns/frame": (http - default) / n * 1e9, "http Mframes/s": n / http / 1e6,
              "finished in run": in_run, "finished": len(records),
              "finished = requests": len(records) == mix.requests,
              "records exact": f"{exact:,}/{mix.requests:,}",
              "parse errors": sum(errors.values()),
              "bytes ok": acct.totals[lpd.TX_BYTES] + acct.totals[lpd.RX_BYTES] == mix.wire_bytes,
              "open at end": open_end, "errors": errors, "not exact": misses})
    return t


# (local addresses, rules, remotes) of the publications a worker ships
WORKER_PUBLICATIONS = ((10, 10, 0), (1000, 100, 0), (10_000, 1000, 65_536))
WORKER_SHIPS = 10


def worker_publication(lpd, n_addr, n_rules, n_remote):
    rows = tuple(((4, i.to_bytes(4, "big")), i, i, i, i, 0.5, 0.5) for i in range(n_addr))
    remotes = tuple(((4, (i + (1 << 24)).to_bytes(4, "big")), i, i, i, i, 0)
                    for i in range(n_remote))
    return {"time": 1.0, "interface": lpd.InterfaceSnapshot(10, (1, 2, 3, 4)),
            "addresses": lpd.AddressSnapshot(rows),
            "rules": lpd.RuleSnapshot(tuple((f"r{i}", i, i) for i in range(n_rules))),
            "remotes": lpd.RemoteSnapshot(remotes)}


def offline_worker_transport(lpd, results, quick):
    """What --workers costs per publication: a worker pickles it onto its pipe, the
    parent reads and unpickles it, then merges the workers' latest."""
    t = Table("Offline: --workers transport - one publication shipped over a pipe and merged",
              ["addresses", "rules", "remotes", "KiB", "worker ms", "ship+read ms",
               "merge of 2 ms"],
              note=f"worker ms: plain_snapshots + pickle + write (worker CPU, once per --interval "
                   f"per worker); ship+read ms: to the parent's typed snapshots, through a real "
                   f"pipe read by a thread; merge of 2: merge_publications of two such; "
                   f"mean of {WORKER_SHIPS}.")
    results["offline_worker_transport"] = t.to_json()
    if not hasattr(lpd, "send_message"):
        t.add(addresses="-", rules="lpd --workers not available")
        return t
    for n_addr, n_rules, n_remote in WORKER_PUBLICATIONS[:2] if quick else WORKER_PUBLICATIONS:
        pub = worker_publication(lpd, n_addr, n_rules, n_remote)
        r, w = os.pipe()
        got = []

        def reader():
            buf = bytearray()
            while True:
                chunk = os.read(r, 1 << 20)
                if not chunk:
                    break
                buf.extend(chunk)
                got.extend(lpd.typed_snapshots(m["snaps"]) for m in lpd.take_messages(buf))
        th = threading.Thread(target=reader)
        th.start()
        cpu, t0 = 0.0, time.perf_counter()
        for _ in range(WORKER_SHIPS):
            c0 = time.thread_time()
            lpd.send_message(w, {"snaps": lpd.plain_snapshots(pub), "fresh": False, "logs": {}})
            cpu += time.thread_time() - c0
        os.close(w)
        th.join()
        os.close(r)
        ship = (time.perf_counter() - t0) / WORKER_SHIPS
        size = len(pickle.dumps({"snaps": lpd.plain_snapshots(pub)}, pickle.HIGHEST_PROTOCOL))
        t1 = time.perf_counter()
        for _ in range(WORKER_SHIPS):
            lpd.merge_publications([got[0], got[-1]])
        merge = (time.perf_counter() - t1) / WORKER_SHIPS
        t.add(addresses=n_addr, rules=n_rules, remotes=n_remote, KiB=size / 1024,
              **{"worker ms": cpu / WORKER_SHIPS * 1e3, "ship+read ms": ship * 1e3,
                 "merge of 2 ms": merge * 1e3})
    return t


def one_line(e):
    return f"{type(e).__name__}: {e}".splitlines()[0][:100]


def prog_tuples(prog):
    return [tuple(int(x) for x in insn) for insn in prog]


def offline_matchers(lpd, results, quick):
    """Per expression: lpd's matcher, lpd's interpreter, libpcap's bpf_filter (C, ctypes)."""
    t = Table("Offline: one rule on the same frames - lpd matcher, lpd interpreter, libpcap C",
              ["expression", "lpd insns", "pcap insns", "compile ms", "pcap ms",
               "matcher ns", "interp ns", "libpcap ns", "matches", "agree"],
              note="ns per frame; libpcap's bpf_filter runs libpcap's own program through ctypes\n"
                   "(a call costs ~0.3-0.5 us of ctypes overhead on its own); 'agree' compares the "
                   "accept decision of all three.")
    results["offline_matchers"] = t.to_json()
    missing = [n for n in ("compile_filter", "bpf_interpret") if not hasattr(lpd, n)]
    if missing:
        t.add(expression="not available yet: lpd." + ", lpd.".join(missing))
        return t
    try:
        import libpcap_oracle as oracle
    except ImportError as e:
        t.add(expression="libpcap not available: " + str(e))
        return t
    frames = synthetic_frames(MATCHER_FRAMES // (5 if quick else 1), seed=7)
    make_matcher = getattr(lpd, "make_matcher", None)
    ret0 = (oracle.bpf_insn * 1)(oracle.bpf_insn(0x06, 0, 0, 0))
    _, secs = run_each(frames, lambda d, w: oracle.lib.bpf_filter(ret0, d, w, len(d)))
    t.add(expression="(ctypes call overhead: 'ret #0')", **{"libpcap ns": secs / len(frames) * 1e9})
    for expr in RULE_EXPRS:
        row = t.add(expression=expr)
        try:
            prog = prog_tuples(lpd.compile_filter(expr))
        except Exception as e:
            row["lpd insns"] = "error: " + one_line(e)
            continue
        row["compile ms"] = best_time(lambda: lpd.compile_filter(expr), COMPILE_REPEAT) * 1e3
        row["lpd insns"] = len(prog)
        try:
            pprog = oracle.compile(expr)
            row["pcap insns"] = len(pprog)
            row["pcap ms"] = best_time(lambda: oracle.compile(expr), COMPILE_REPEAT) * 1e3
        except Exception as e:
            row["pcap insns"] = "error: " + one_line(e)
            continue
        arr = (oracle.bpf_insn * len(pprog))(*[oracle.bpf_insn(*i) for i in pprog])
        cfilter = oracle.lib.bpf_filter
        c_res, secs = run_each(frames, lambda d, w: cfilter(arr, d, w, len(d)))
        row["libpcap ns"] = secs / len(frames) * 1e9
        i_res, secs = run_each(frames, lambda d, w: lpd.bpf_interpret(prog, d, w))
        row["interp ns"] = secs / len(frames) * 1e9
        agree = [bool(a) for a in c_res] == [bool(b) for b in i_res]
        if make_matcher is not None:
            try:
                m = make_matcher(prog)
                m_res, secs = run_each(frames, lambda d, w: m(d, w))
                row["matcher ns"] = secs / len(frames) * 1e9
                agree = agree and [bool(a) for a in c_res] == [bool(b) for b in m_res]
            except Exception as e:
                row["matcher ns"] = "error: " + one_line(e)
        else:
            row["matcher ns"] = "n/a yet"
        row["matches"] = sum(1 for r in c_res if r)
        row["agree"] = agree
    return t


def run_each(frames, fn, repeat=MATCHER_REPEAT):
    """(results, best seconds over `repeat` passes) of fn(data, wirelen) on every frame."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = [fn(d, w) for d, w in frames]
        best = min(best, time.perf_counter() - t0)
    return res, best


def best_time(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# The first lines of every child script below (python -c): its JSON configuration from
# argv[1], lpd loaded from cfg["lpd"] (the file under test, not an installed copy), and
# its own memory figures in KiB.
_CHILD_PRELUDE = r"""
import importlib.util, ipaddress, json, random, resource, struct, sys, time
cfg = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("lpd", cfg["lpd"])
lpd = importlib.util.module_from_spec(spec)
sys.modules["lpd"] = lpd
spec.loader.exec_module(lpd)
def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)
def peak_kib():     # VmHWM, not ru_maxrss: that one keeps the forked bench's size across exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
"""


# The child that measures one rule file: a process of its own, so its RSS is the
# rules' and nothing the bench built before. Prints JSON.
_SCALE_CHILD = _CHILD_PRELUDE + """
before = rss_kib()
t0 = time.perf_counter()
rules = lpd.parse_filter_file(cfg["rules"], None)
t1 = time.perf_counter()
counter = lpd.RuleCounter(rules)
t2 = time.perf_counter()
after = rss_kib()
lpd.RuleCounter(lpd.parse_filter_file(cfg["rules"], None))       # SIGHUP, the file unchanged
t3 = time.perf_counter()
print(json.dumps({"parse": t1 - t0, "counter": t2 - t1, "reload": t3 - t2, "before": before,
                  "after": after, "peak": peak_kib()}))
"""


def scale_rule_exprs(n):
    """n rules of the shape a big site writes: a host each, then a port each, in turn."""
    return [f"host 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" if i % 2 == 0
            else f"port {1 + i % 65000}" for i in range(n)]


def run_limited(argv, as_limit, timeout):
    """argv under prlimit --as `as_limit` where prlimit is there (it execs the command),
    killed by its PID after `timeout` s (subprocess.TimeoutExpired): (CompletedProcess,
    wall s, CPU s: its user + sys, the RUSAGE_CHILDREN delta of waiting for it)."""
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    cp = subprocess.run(prlimit_argv(as_limit) + argv, capture_output=True, text=True,
                        timeout=timeout)
    wall, after = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    return cp, wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def run_child(script, cfg, as_limit, timeout):
    """One child script (python -c) with its JSON configuration, run_limited(); the JSON
    it prints. RuntimeError with the last line of its stderr when it fails."""
    cp = run_limited([sys.executable, "-c", script, json.dumps(cfg)], as_limit, timeout)[0]
    if cp.returncode:
        raise RuntimeError((cp.stderr.strip() or f"exit {cp.returncode}").splitlines()[-1])
    return json.loads(cp.stdout)


def _measure_rule_file(exprs, workdir):
    path = os.path.join(workdir, "scale.filters")
    with open(path, "w") as f:
        f.writelines(f"r{i};{e}\n" for i, e in enumerate(exprs))
    return run_child(_SCALE_CHILD, {"lpd": LPD, "rules": path}, SCALE_AS_LIMIT, 600)


def rules_at_scale(lpd, results, quick):
    """Startup cost of many rules (parse, compile, counting function) and of one long rule,
    beside libpcap compiling the same expressions."""
    t = Table("Rules at scale: what a rule file costs at startup (and on every SIGHUP)",
              ["rules", "expression", "lpd s", "of it counter s", "reload s", "libpcap s",
               "RSS MiB", "RSS per rule KiB", "peak MiB"],
              note="lpd s: parse_filter_file + RuleCounter in a fresh process (lpd imported "
                   "before); counter s: the generated counting\nfunctions' part; reload s: the "
                   "same again, the file unchanged (a SIGHUP); RSS: after the first, minus "
                   "before;\nlibpcap s: pcap_compile of each expression (ctypes). "
                   f"Limits: {getattr(lpd, 'FILTER_MAX_CHARS', '-')} characters, "
                   f"{getattr(lpd, 'FILTER_MAX_BLOCKS', '-')} blocks per expression.")
    results["rules_at_scale"] = t.to_json()
    try:
        import libpcap_oracle as oracle
    except ImportError as e:
        oracle = None
        t.note += f"\nlibpcap not available: {e}"

    def pcap_seconds(exprs):
        if oracle is None:
            return None
        t0 = time.perf_counter()
        for e in exprs:
            oracle.compile(e)
        return time.perf_counter() - t0

    cases = [(n, scale_rule_exprs(n), "host A / port N, in turn")
             for n in (QUICK_SCALE_RULES if quick else SCALE_RULES)]
    cases += [(1, [" or ".join(f"host 10.{i // 250}.{i % 250}.{i % 7 + 1}" for i in range(n))],
               f"one 'or' of {n} hosts") for n in SCALE_TERMS]
    with tempfile.TemporaryDirectory(prefix="lpd-bench-scale-") as workdir:
        for n, exprs, what in cases:
            row = t.add(rules=n, expression=what)
            try:
                m = _measure_rule_file(exprs, workdir)
            except Exception as e:
                row["lpd s"] = "error: " + one_line(e)
                continue
            grown = max(0, m["after"] - m["before"])
            row.update({"lpd s": m["parse"] + m["counter"], "of it counter s": m["counter"],
                        "reload s": m["reload"], "libpcap s": pcap_seconds(exprs),
                        "RSS MiB": grown / 1024, "RSS per rule KiB": grown / n,
                        "peak MiB": m["peak"] / 1024})
    return t


# The flood children's timed run, after the prelude: `frames` laid into blocks as they
# come (a block at a time in memory), only process_block timed; ticks and snapshots on
# the frames' packet clock every cfg["interval"] s as in the daemon, which keeps the last
# published snapshots (so does this: their memory is in the figures). Returns its figures:
# frames, seconds, RSS KiB before, at `half` the frames and after, and the peak.
_FLOOD_PRELUDE = _CHILD_PRELUDE + r"""
def timed_run(decoder, stages, frames, half):
    published = None        # the last snapshots, kept as the daemon keeps them
    def tick():
        nonlocal published
        for stage in stages:
            stage.tick(decoder.time)
        published = [stage.snapshot() for stage in stages]
    before, rss_half, busy, next_tick = rss_kib(), None, 0.0, None
    for block in lpd.frames_to_blocks(frames):
        view = memoryview(block)
        t0 = time.perf_counter()
        decoder.process_block(view, 0)
        busy += time.perf_counter() - t0
        view.release()
        if next_tick is None or decoder.time >= next_tick:
            tick()
            next_tick = decoder.time + cfg["interval"]
        if rss_half is None and decoder.frames >= half:
            rss_half = rss_kib()
    tick()
    return {"frames": decoder.frames, "seconds": busy, "before": before, "half": rss_half,
            "after": rss_kib(), "peak": peak_kib()}
"""


# The child that pushes one spoofed-source flood through the decoder: a process of its
# own (under prlimit), so its RSS is the flood's and nothing the bench built before.
# Frames are made one by one as timed_run takes them. Prints JSON.
_FLOOD_CHILD = _FLOOD_PRELUDE + r"""
SNAP = cfg["snaplen"]
ETH = b"\x02\x00\x0a\xc7\x00\x02\x02\x00\x0a\xc7\x00\x01"
IP4 = struct.Struct("!BBHHHBBHII").pack          # checksum 0: nothing in lpd reads it
IP6 = struct.Struct("!IHBB16s16s").pack
UDP = struct.Struct("!HHHH").pack
def frame(v6, src, dst, size):
    if v6:
        hdr = ETH + b"\x86\xdd" + IP6(0x60000000, size - 54, 17, 64, src, dst)
    else:
        hdr = ETH + b"\x08\x00" + IP4(0x45, 0, size - 14, 0, 0x4000, 64, 17, 0, src, dst)
    data = hdr + UDP(40000, 9, size - len(hdr), 0)
    return (data + bytes(SNAP))[:min(size, SNAP)]

nets = [ipaddress.ip_network(n) for n in cfg["local_nets"]]
net4 = next(n for n in nets if n.version == 4)
net6 = next(n for n in nets if n.version == 6)
pref4 = [(int(n.network_address), int(n.netmask)) for n in nets if n.version == 4]
locals4 = [int(net4.network_address) + 1 + i for i in range(cfg["local_hosts"])]
locals6 = [(int(net6.network_address) + 1 + i).to_bytes(16, "big")
           for i in range(cfg["local_hosts"])]
# Heavy remotes: 198.51.100.1.. and 2001:db8::1.., IPv4 and IPv6 in turn; the flood's
# sources: IPv4 ones scattered over the whole space (i * an odd constant mod 2**32 is a
# bijection: distinct), skipping local and heavy ones; IPv6 ones in 2001:db8:f100::/64.
HEAVY4, FLOOD6 = int(ipaddress.ip_address("198.51.100.0")), bytes.fromhex("20010db8f1000000")
heavy = [(h % 2 == 1, (int(ipaddress.ip_address("2001:db8::")) + 1 + h).to_bytes(16, "big")
          if h % 2 else HEAVY4 + 1 + h) for h in range(cfg["heavy"])]
heavy_keys = {k for _, k in heavy}
expected = {k: [0, 0, 0, 0] for k in heavy_keys}          # TX_BYTES .. RX_PACKETS
sent = [0, 0, 0, 0]
ratio = cfg["heavy_share"] / (1 - cfg["heavy_share"])      # heavy frames per flood frame

def frames():
    rng = random.Random(11)
    heavy_frames, seq, i4 = 0, 0, 0
    heavy_cache = {}
    for i in range(cfg["sources"]):
        if rng.random() < cfg["ipv6"]:
            v6, src, dst = True, FLOOD6 + i.to_bytes(8, "big"), locals6[i % len(locals6)]
        else:
            while True:
                src = i4 * 0x9E3779B1 & 0xFFFFFFFF
                i4 += 1
                if src not in heavy_keys and not any(src & m == n for n, m in pref4):
                    break
            v6, dst = False, locals4[i % len(locals4)]
        yield lpd.SynthFrame(frame(v6, src, dst, cfg["size"]), cfg["size"], ts=seq / cfg["pps"])
        seq += 1
        sent[lpd.RX_BYTES] += cfg["size"]
        sent[lpd.RX_PACKETS] += 1
        while heavy_frames < (i + 1) * ratio:
            h = heavy_frames % len(heavy)
            v6, key = heavy[h]
            tx = heavy_frames // len(heavy) % 2 == 1        # in turn: to the remote, from it
            data = heavy_cache.get((h, tx))
            if data is None:
                near = (locals6 if v6 else locals4)[h]
                ends = (near, key) if tx else (key, near)
                data = heavy_cache[(h, tx)] = frame(v6, *ends, cfg["heavy_size"])
            yield lpd.SynthFrame(data, cfg["heavy_size"], ts=seq / cfg["pps"])
            seq += 1
            at = lpd.TX_BYTES if tx else lpd.RX_BYTES
            for counts in (expected[key], sent):
                counts[at] += cfg["heavy_size"]
                counts[at + 1] += 1
            heavy_frames += 1

local = lpd.LocalAddresses(nets)
remotes = lpd.RemoteAddresses(cfg["remote_max"]) if cfg["remote"] else None
decoder = lpd.Decoder(local, [remotes] if remotes else [])
stages = [local] + ([remotes] if remotes else [])
out = timed_run(decoder, stages, frames(), cfg["sources"] * (1 + ratio) // 2)
out["bytes_ok"] = decoder.totals[lpd.RX_BYTES] + decoder.totals[lpd.TX_BYTES] == \
    sent[lpd.TX_BYTES] + sent[lpd.RX_BYTES]
if remotes:
    out.update(tracked=remotes.tracked(), evictions=remotes.evictions, floor=remotes.floor,
               totals_ok=list(remotes.totals) == sent, heavy=[
                   {"exact": remotes.table.get(k, [None] * 4)[:4] == expected[k],
                    "tracked": k in remotes.table, "bytes": sum(expected[k][0::2])}
                   for _, k in heavy])
print(json.dumps(out))
"""


def _run_flood(remote, sources):
    """One flood through a fresh child; its JSON."""
    cfg = {"lpd": LPD, "remote": remote, "remote_max": REMOTE_MAX, "sources": sources,
           "heavy": FLOOD_HEAVY, "heavy_share": FLOOD_HEAVY_SHARE, "size": FLOOD_SIZE,
           "heavy_size": FLOOD_HEAVY_SIZE, "ipv6": SYNTH_IPV6, "local_hosts": FLOOD_LOCAL_HOSTS,
           "local_nets": list(OFFLINE_LOCAL_NETS), "snaplen": OFFLINE_SNAPLEN, "pps": FLOOD_PPS,
           "interval": FLOOD_INTERVAL}
    return run_child(_FLOOD_CHILD, cfg, FLOOD_AS_LIMIT, FLOOD_TIMEOUT)


def flood_cells(m):
    """A flood child's figures as its table's cells: time per frame, memory in MiB."""
    return {"frames": m["frames"], "ns/frame": m["seconds"] / m["frames"] * 1e9,
            "RSS MiB": m["before"] / 1024, "+MiB half": (m["half"] - m["before"]) / 1024,
            "+MiB end": (m["after"] - m["before"]) / 1024,
            "peak +MiB": (m["peak"] - m["before"]) / 1024, "bytes ok": m["bytes_ok"]}


def remote_flood(lpd, results, quick):
    """A spoofed-source flood of FLOOD_SOURCES distinct remotes plus a few heavy ones:
    RSS stays bounded with --remote, and the heavy remotes keep their exact bytes."""
    t = Table(f"Offline: spoofed-source flood, distinct remote sources + {FLOOD_HEAVY} heavy "
              f"remotes, --remote-max {REMOTE_MAX:,}",
              ["remote", "sources", "frames", "ns/frame", "RSS MiB", "+MiB half", "+MiB end",
               "peak +MiB", "tracked", "evictions", "floor B", "heavy exact", "totals exact",
               "bytes ok"],
              note=f"One {FLOOD_SIZE}-byte frame from each spoofed source to one of "
                   f"{FLOOD_LOCAL_HOSTS} local hosts ({SYNTH_IPV6:.0%} IPv6); the heavy remotes' "
                   f"{FLOOD_HEAVY_SIZE}-byte frames, to and from them in turn,\nare "
                   f"{FLOOD_HEAVY_SHARE:.0%} of all, interleaved. A fresh process each (prlimit "
                   f"--as {FLOOD_AS_LIMIT / 1e9:g} GB); ticks and snapshots every "
                   f"{FLOOD_INTERVAL:g} s of a {FLOOD_PPS:,} fps packet clock.\nRSS MiB: before "
                   "the first frame; +MiB: grown since, at half the frames and at the end; peak: "
                   "VmHWM minus that start.\n"
                   "tracked: at the end (the table trims to --remote-max when it holds twice as "
                   "many); floor B: what an untracked remote carried at most;\nheavy exact: heavy "
                   "remotes tracked with exactly the bytes and frames sent; totals exact: the "
                   "remote totals are every frame's.")
    results["remote_flood"] = t.to_json()
    if not hasattr(lpd, "RemoteAddresses"):
        t.add(remote="lpd.RemoteAddresses not available")
        return t
    runs = [(False, FLOOD_SOURCES), (True, FLOOD_SOURCES)]
    if not quick:
        runs.append((True, FLOOD_LONG_SOURCES))
    for remote, sources in runs:
        row = t.add(remote=remote, sources=sources)
        try:
            m = _run_flood(remote, sources)
        except Exception as e:
            row["frames"] = "error: " + one_line(e)
            continue
        row.update(flood_cells(m))
        if remote:
            row.update({"tracked": m["tracked"], "evictions": m["evictions"], "floor B": m["floor"],
                        "heavy exact": f"{sum(h['exact'] for h in m['heavy'])}/{len(m['heavy'])}",
                        "totals exact": m["totals_ok"], "heavy detail": m["heavy"]})
    return t


# The child that pushes a SYN flood through the decoder and, with cfg["conns"], a
# Connections stage: a process of its own (under prlimit), so its RSS is the flood's.
# Spoofed SYNs, each from a random address and port (seeded), to the local hosts' ports
# 80 and 443; a few established connections (their handshake and request first, then
# the server's data and the client's ACKs interleaved with the flood, FINs both ways at
# the end). Frames are made one by one as timed_run takes them. Prints JSON.
_SYN_FLOOD_CHILD = _FLOOD_PRELUDE + r"""
SNAP, PPS = cfg["snaplen"], cfg["pps"]
ETH = b"\x02\x00\x0a\xc7\x00\x02\x02\x00\x0a\xc7\x00\x01"
IP4 = struct.Struct("!BBHHHBBH4s4s").pack          # checksum 0: nothing in lpd reads it
IP6 = struct.Struct("!IHBB16s16s").pack
TCP = struct.Struct("!HHIIBBHHH").pack
FIN, SYN, PSH, ACK, MASK = 0x01, 0x02, 0x08, 0x10, 0xFFFFFFFF
def frame(v6, src, dst, sport, dport, flags, seq, ack, plen=0):
    if v6:
        ip_len = 60 + plen
        hdr = ETH + b"\x86\xdd" + IP6(0x60000000, 20 + plen, 6, 64, src, dst)
    else:
        ip_len = 40 + plen
        hdr = ETH + b"\x08\x00" + IP4(0x45, 0, ip_len, 0, 0x4000, 64, 6, 0, src, dst)
    wirelen = max(60, 14 + ip_len)
    data = hdr + TCP(sport, dport, seq, ack, 0x50, flags, 65535, 0, 0)
    return (data + bytes(SNAP))[:min(wirelen, SNAP)], wirelen, ip_len

nets = [ipaddress.ip_network(n) for n in cfg["local_nets"]]
net4 = next(n for n in nets if n.version == 4)
net6 = next(n for n in nets if n.version == 6)
pref4 = [(int(n.network_address), int(n.netmask)) for n in nets if n.version == 4]
locals4 = [(int(net4.network_address) + 1 + i).to_bytes(4, "big") for i in range(cfg["local_hosts"])]
locals6 = [(int(net6.network_address) + 1 + i).to_bytes(16, "big") for i in range(cfg["local_hosts"])]
FLOOD6 = bytes.fromhex("20010db8f1000000")          # the flood's IPv6 sources: 2001:db8:f100::/64
rng = random.Random(13)
sent = [0, 0]                                        # frames, wire bytes

class Est:
    # Local client h, port 40000 + h, to 198.51.100.(1 + h) or 2001:db8::(1 + h) port 443.
    def __init__(self, h):
        self.v6 = h % 2 == 1
        self.client = (locals6 if self.v6 else locals4)[h]
        base = ipaddress.ip_address("2001:db8::" if self.v6 else "198.51.100.0")
        self.server = (base + 1 + h).packed
        self.cport, self.sport = 40000 + h, 443
        self.c, self.s = rng.getrandbits(32), rng.getrandbits(32)
        self.exp = [0] * 6      # orig_bytes, resp_bytes, orig_pkts, orig_ip_bytes, resp_pkts, resp_ip_bytes
        self.steps, self.syn_ts = 0, None
        a, b = (6, self.client, self.cport), (6, self.server, self.sport)
        self.key = (6, self.client, self.cport, self.server, self.sport) if a <= b else \
            (6, self.server, self.sport, self.client, self.cport)
        self.id = (str(ipaddress.ip_address(self.client)), self.cport)
    def out(self, from_client, flags, plen=0):
        if from_client:
            args = (self.client, self.server, self.cport, self.sport, flags, self.c, self.s, plen)
        else:
            args = (self.server, self.client, self.sport, self.cport, flags, self.s, self.c, plen)
        data, wirelen, ip_len = frame(self.v6, *args)
        step = (plen + (1 if flags & (SYN | FIN) else 0)) & MASK
        if from_client:
            self.c = (self.c + step) & MASK
        else:
            self.s = (self.s + step) & MASK
        at = 0 if from_client else 1
        self.exp[at] += plen
        self.exp[2 + 2 * at] += 1
        self.exp[3 + 2 * at] += ip_len
        return data, wirelen
    def opening(self):
        return [self.out(True, SYN), self.out(False, SYN | ACK), self.out(True, ACK),
                self.out(True, PSH | ACK, 300)]
    def data(self):              # two full segments from the server, then the client's ACK
        self.steps += 1
        if self.steps % 3:
            return self.out(False, ACK, cfg["mss"])
        return self.out(True, ACK)
    def closing(self):
        return [self.out(True, FIN | ACK), self.out(False, FIN | ACK), self.out(True, ACK)]

est = [Est(h) for h in range(cfg["established"])]
ratio = cfg["est_share"] / (1 - cfg["est_share"])   # established frames per SYN

def frames():
    n = 0
    def synth(data, wirelen):
        nonlocal n
        f = lpd.SynthFrame(data, wirelen, ts=n / PPS)
        n += 1
        sent[0] += 1
        sent[1] += wirelen
        return f
    for e in est:
        e.syn_ts = n / PPS
        for data, wirelen in e.opening():
            yield synth(data, wirelen)
    est_frames = 0
    for i in range(cfg["syns"]):
        if rng.random() < cfg["ipv6"]:
            v6, src, dst = True, FLOOD6 + rng.randbytes(8), locals6[i % len(locals6)]
        else:
            while True:
                src = rng.getrandbits(32)
                if not any(src & m == a for a, m in pref4) and src >> 8 != 0xC63364:   # 198.51.100/24
                    break
            v6, src, dst = False, src.to_bytes(4, "big"), locals4[i % len(locals4)]
        data, wirelen, _ = frame(v6, src, dst, rng.randrange(1024, 65536), rng.choice((80, 443)),
                                 SYN, rng.getrandbits(32), 0)
        yield synth(data, wirelen)
        while est and est_frames < (i + 1) * ratio:
            yield synth(*est[est_frames % len(est)].data())
            est_frames += 1
    for e in est:
        for data, wirelen in e.closing():
            yield synth(data, wirelen)

est_ids = {e.id for e in est}
est_records = []
def finished(rec):           # the established connections' records only: 10^6 would not fit
    if (rec["id.orig_h"], rec["id.orig_p"]) in est_ids or (rec["id.resp_h"], rec["id.resp_p"]) in est_ids:
        est_records.append(rec)

local = lpd.LocalAddresses(nets)
conns = lpd.Connections(cfg["conn_max"], finished=finished) if cfg["conns"] else None
decoder = lpd.Decoder(local, [conns] if conns else [])
stages = [local] + ([conns] if conns else [])
out = timed_run(decoder, stages, frames(), (cfg["syns"] * (1 + ratio)) // 2)
out["bytes_ok"] = decoder.totals[lpd.RX_BYTES] + decoder.totals[lpd.TX_BYTES] == sent[1]
if conns:
    kept = []
    for e in est:            # the connection its SYN opened, not one re-made mid-stream
        c = conns.table.get(e.key)
        kept.append(c is not None and not c.midstream and abs(c.first - e.syn_ts) < 1e-3)
    out.update(tracked=conns.tracked(), half_open=len(conns.half_open), timers=len(conns.timers),
               evictions=dict(conns.evictions), finished=sum(conns.closed.values()))
    conns.finish()
    out["closed"] = {f"{lpd.PROTO_NAMES[p]} {s}": n for (p, s), n in conns.closed.items() if n}
    out["established"] = []
    for e, k in zip(est, kept):
        recs = [r for r in est_records if e.id in ((r["id.orig_h"], r["id.orig_p"]),
                                                    (r["id.resp_h"], r["id.resp_p"]))]
        got = [[r.get("orig_bytes"), r.get("resp_bytes"), r["orig_pkts"], r["orig_ip_bytes"],
                r["resp_pkts"], r["resp_ip_bytes"]] for r in recs]
        out["established"].append({
            "kept": k, "exact": len(recs) == 1 and recs[0]["conn_state"] == "SF" and got[0] == e.exp,
            "records": [(r["conn_state"], r["history"]) for r in recs], "expected": e.exp})
print(json.dumps(out))
"""


def _run_syn_flood(conns, syns, conn_max):
    """One SYN flood through a fresh child; its JSON."""
    cfg = {"lpd": LPD, "conns": conns, "conn_max": conn_max, "syns": syns,
           "established": SYN_FLOOD_EST, "est_share": SYN_FLOOD_EST_SHARE, "mss": CONN_MSS,
           "ipv6": SYNTH_IPV6, "local_hosts": FLOOD_LOCAL_HOSTS,
           "local_nets": list(OFFLINE_LOCAL_NETS), "snaplen": CONN_SNAP, "pps": FLOOD_PPS,
           "interval": FLOOD_INTERVAL}
    return run_child(_SYN_FLOOD_CHILD, cfg, FLOOD_AS_LIMIT, FLOOD_TIMEOUT)


def syn_flood(lpd, results, quick):
    """A SYN flood from random spoofed sources plus a few established connections: RSS
    with --connections at the default --conn-max, half-open evictions, and whether the
    established connections come through it whole."""
    syns = SYN_FLOOD_QUICK if quick else SYN_FLOOD
    t = Table(f"Offline: SYN flood, spoofed sources + {SYN_FLOOD_EST} established connections, "
              "--connections",
              ["connections", "conn max", "SYNs", "frames", "ns/frame", "RSS MiB", "+MiB half",
               "+MiB end", "peak +MiB", "tracked", "half_open ev", "oldest ev", "timers",
               "established kept", "established SF exact", "bytes ok"],
              note="One 60-byte SYN (74 IPv6) from each random source address and port "
                   f"({SYNTH_IPV6:.0%} IPv6) to port 80 or 443 of one of {FLOOD_LOCAL_HOSTS} local "
                   f"hosts; {SYN_FLOOD_EST} established\nconnections (handshake and request before "
                   f"the flood, the server's {CONN_MSS}-byte segments and the client's ACKs "
                   f"{SYN_FLOOD_EST_SHARE:.0%} of the frames, interleaved; FINs both ways after "
                   f"it).\nA fresh process each (prlimit --as {FLOOD_AS_LIMIT / 1e9:g} GB); ticks "
                   f"and snapshots every {FLOOD_INTERVAL:g} s of a {FLOOD_PPS:,} fps packet clock "
                   "(the whole flood is within lpd's 5 s SYN attempt timer).\nRSS MiB: before the "
                   "first frame; +MiB: grown since, at half the frames and at the end (before "
                   "finish()); peak: VmHWM minus that start.\ntracked: table size at the end; "
                   "half_open/oldest ev: conns.evictions; timers: entries in the stage's timer "
                   "heap at the end;\nestablished kept: still in the table as the connection "
                   "their SYN opened; SF exact: after finish(), one record each, SF, with "
                   "exactly the bytes and packets sent.")
    results["syn_flood"] = t.to_json()
    if not hasattr(lpd, "Connections"):
        t.add(connections="lpd.Connections not available")
        return t
    for conns in (False, True):
        row = t.add(connections=conns, **{"conn max": CONN_MAX if conns else None, "SYNs": syns})
        try:
            m = _run_syn_flood(conns, syns, CONN_MAX)
        except Exception as e:
            row["frames"] = "error: " + one_line(e)
            continue
        row.update(flood_cells(m))
        if conns:
            est = m["established"]
            row.update({"tracked": m["tracked"], "half_open ev": m["evictions"].get("half_open"),
                        "oldest ev": m["evictions"].get("oldest"), "timers": m["timers"],
                        "established kept": f"{sum(e['kept'] for e in est)}/{len(est)}",
                        "established SF exact": f"{sum(e['exact'] for e in est)}/{len(est)}",
                        "established detail": est, "closed": m["closed"],
                        "finished during": m["finished"], "half_open at end": m["half_open"]})
    return t


# --ipfix (issue 26): lpd -r turning a capture into IPFIX records beside softflowd -r
# (libpcap, in C) on the same file, each into a fresh nfcapd on 127.0.0.1.

def write_mix_pcap(path, mix):
    """mix's frames as a classic pcap (harness.write_pcap), times from IPFIX_T0 on, each
    cut to CONN_SNAP bytes (lpd's --connections snaplen; wirelen kept). Returns what the
    file carries by each frame's own headers: frames, the IP packets' octets (IPv4 total
    length, IPv6 40 + payload length: what a flow record counts), and the Ethernet
    padding past them (bytes, frames)."""
    import harness
    seen = collections.Counter()

    def records():
        for f in mix.frames():
            data = f.data
            ip = 18 if data[12:14] == b"\x81\x00" else 14
            octets = 40 + int.from_bytes(data[ip + 4:ip + 6], "big") \
                if data[ip - 2:ip] == b"\x86\xdd" else int.from_bytes(data[ip + 2:ip + 4], "big")
            padding = f.wirelen - ip - octets
            seen.update(frames=1, octets=octets, padding=padding, padded=padding > 0)
            sec, usec = divmod(round(f.ts * 1e6), 1_000_000)
            yield IPFIX_T0 + sec, usec, data, f.wirelen

    harness.write_pcap(path, records(), snaplen=CONN_SNAP)
    return seen


def export_run(argv, workdir, name, collect):
    """One exporter run, `argv(port)` through run_limited(); with `collect`, into a fresh
    nfcapd on 127.0.0.1:port, stopped by its PID once it has read what came. Returns
    wall and CPU s, the exporter's stdout and, with `collect`, what nfdump decoded of
    what nfcapd stored (records, octets, packets) and nfcapd's sequence errors."""
    import harness
    nfcapd = harness.Nfcapd(pathlib.Path(workdir), harness.free_port(), name=name) \
        if collect else None
    try:
        cp, wall, cpu = run_limited(argv(nfcapd and nfcapd.port), IPFIX_AS_LIMIT, IPFIX_TIMEOUT)
    finally:
        if nfcapd:
            nfcapd.end()
    if cp.returncode:
        raise RuntimeError((cp.stderr.strip() or f"exit {cp.returncode}").splitlines()[-1])
    out = {"wall s": wall, "CPU s": cpu, "stdout": cp.stdout}
    if nfcapd:
        out["records decoded"], out["octets"], out["packets"] = harness.nfdump_totals(nfcapd.dir)
        out["seq errors"] = nfcapd.sequence_errors()
        shutil.rmtree(nfcapd.dir)
    return out


def records_sent(label, stdout):
    """(records the exporter says it sent, its other figures) from its own report: lpd's
    JSON document (--output json), softflowd's statistics (-r prints them)."""
    if label.startswith("lpd"):
        col = json.loads(stdout)["ipfix"]["collectors"][0]
        return col["records"], {k: col[k] for k in ("messages", "send_errors", "flows_dropped")}
    m = re.search(r"Flows exported: \d+ \((\d+) records\) in (\d+) packets \((\d+) failures\)",
                  stdout)
    forced = re.search(r"Flows expired: \d+ \((\d+) forced\)", stdout)
    return (int(m.group(1)) if m else None,
            {"messages": m and int(m.group(2)), "failures": m and int(m.group(3)),
             "forced expiries": forced and int(forced.group(1))})


def offline_ipfix(lpd, results, quick):
    """lpd -r --connections with and without --ipfix, and softflowd -r, on the same
    captures (short flows, few long ones): time and CPU of each, what nfcapd decoded
    of each exporter, and lpd's export cost per flow and per frame."""
    softflowd = shutil.which(SOFTFLOWD) or shutil.which(SOFTFLOWD, path="/usr/sbin:/sbin")
    long_bytes = IPFIX_LONG_BYTES // (4 if quick else 1)
    repeat = 1 if quick else IPFIX_REPEAT
    t = Table("Offline: flow export (--ipfix) beside softflowd, lpd -r and softflowd -r on the "
              "same captures",
              ["capture", "flows", "frames", "line", "wall s", "CPU s", "records sent",
               "records decoded", "seq errors", "octets - IP", "exact", "CPU µs/flow",
               "CPU ns/frame", "export µs/flow", "export ns/frame", "÷ softflowd"],
              note="Captures written here (classic pcap, frames cut to the --connections snaplen "
                   f"of {CONN_SNAP} bytes, wirelen kept) from the --connections series' mix: "
                   f"short flows, {CONN_UDP_SHARE:.0%} UDP\n(one DNS or NTP exchange), the rest "
                   "TCP (handshake, 1-3 requests each answered in 1-2 MSS segments, FINs), "
                   f"{IPFIX_PLAIN_SHARE:.0%} of them without timestamp options (their IPv4 ACKs "
                   f"padded to 60 bytes);\nlong flows: {IPFIX_LONG_FLOWS} TCP connections of 1-3 "
                   f"responses of {long_bytes >> 20} MiB. {CONN_CONCURRENT} flows in progress at "
                   f"a time, on a {CONN_PPS:,} fps packet clock; {SYNTH_IPV6:.0%} IPv6, "
                   f"{SYNTH_TAGGED:.0%} tagged.\nLines: lpd -r FILE --connections --output json "
                   "(the baseline); the same with --ipfix 127.0.0.1:P; softflowd -r FILE -n "
                   "127.0.0.1:P -v 10 (IPFIX; its defaults,\n-m 8192 flows). Each exporter into "
                   "a fresh nfcapd -B 8000000 on 127.0.0.1, stopped (SIGTERM, by PID) once its "
                   "socket queue is read. Every run under prlimit\n"
                   f"--as {IPFIX_AS_LIMIT / 1e9:g} GB, killed after {IPFIX_TIMEOUT} s; best of "
                   f"{repeat} (the three lines in turn): wall and CPU (user + sys of the "
                   "child: RUSAGE_CHILDREN).\nrecords sent: the exporter's own count; decoded: "
                   "nfdump -R of nfcapd's files (uniflow: a record per direction); seq errors: "
                   "nfcapd's; octets - IP: octets decoded\nminus the capture's IP octets (each "
                   "packet's IP length); exact: octets and packets decoded = the capture's "
                   "(collector figures: the worst run).\nCPU µs/flow, ns/frame: the line's CPU "
                   "over the capture's flows (connections) or frames; export: the --ipfix "
                   "line's CPU minus the baseline's;\n÷ softflowd: the --ipfix line's CPU "
                   "against softflowd's.")
    results["offline_ipfix"] = t.to_json()
    if not lpd_offers("--ipfix"):
        t.say("-", "lpd has no --ipfix")
        return t
    lines = [("lpd -r --connections", False,
              lambda pcap, port: [sys.executable, LPD, "-r", pcap, "--connections",
                                  "--output", "json"]),
             ("lpd -r --connections --ipfix", True,
              lambda pcap, port: [sys.executable, LPD, "-r", pcap, "--connections",
                                  "--output", "json", "--ipfix", f"127.0.0.1:{port}"]),
             ("softflowd -r -v 10", True,
              lambda pcap, port: [softflowd, "-r", pcap, "-n", f"127.0.0.1:{port}", "-v", "10"])]
    if softflowd is None or shutil.which("nfcapd") is None:
        t.note += "\nnot installed: " + " ".join(n for n, w in (("softflowd", softflowd),
                                                                ("nfcapd", shutil.which("nfcapd")))
                                                 if w is None)
        lines = lines[:1 if shutil.which("nfcapd") is None else 2]
    captures = [(f"{n:,} short flows", dict(flows=n, udp_ports=IPFIX_UDP_PORTS,
                                            responses=IPFIX_RESPONSES, seed=26))
                for n in IPFIX_FLOWS[:1 if quick else None]]
    captures.append((f"{IPFIX_LONG_FLOWS} long flows",
                     dict(flows=IPFIX_LONG_FLOWS, udp_share=0.0, responses=(long_bytes,), seed=27)))
    with tempfile.TemporaryDirectory(prefix="lpd-bench-ipfix-") as workdir:
        for name, shape in captures:
            mix = ConnMix(lpd, None, CONN_SNAP, plain_share=IPFIX_PLAIN_SHARE, **shape)
            pcap = os.path.join(workdir, "capture.pcap")
            t0 = time.monotonic()
            seen = write_mix_pcap(pcap, mix)
            flows, frames = mix.flows, seen["frames"]
            t.say(name, f"{frames:,} frames, {seen['octets']:,} IP octets, "
                        f"{seen['padding']:,} bytes of Ethernet padding in {seen['padded']:,} "
                        f"frames ({os.path.getsize(pcap) >> 20} MiB, written in "
                        f"{time.monotonic() - t0:.0f} s)", flows=flows, frames=frames)
            runs = {label: [] for label, _, _ in lines}
            for r in range(repeat):
                for i, (label, collect, argv) in enumerate(lines):
                    try:
                        runs[label].append(export_run(functools.partial(argv, pcap), workdir,
                                                      f"{len(t.rows)}.{r}.{i}", collect))
                    except subprocess.TimeoutExpired:
                        runs[label].append(f"killed after {IPFIX_TIMEOUT} s")
                    except Exception as e:
                        runs[label].append("error: " + one_line(e))
            os.unlink(pcap)
            rows = {}
            for label, collect, _ in lines:
                done = [m for m in runs[label] if isinstance(m, dict)]
                if len(done) < len(runs[label]):
                    t.say(name, next(m for m in runs[label] if isinstance(m, str)), flows=flows,
                          frames=frames, line=label)
                    continue
                cpu = min(m["CPU s"] for m in done)
                row = rows[label] = t.add(capture=name, flows=flows, frames=frames, line=label, **{
                    "wall s": min(m["wall s"] for m in done), "CPU s": cpu,
                    "CPU µs/flow": cpu / flows * 1e6, "CPU ns/frame": cpu / frames * 1e9})
                if collect:
                    for m in done:
                        m["exact"] = (m["octets"], m["packets"]) == (seen["octets"], frames)
                    worst = min(done, key=lambda m: (m["exact"], m["records decoded"],
                                                     -m["seq errors"]))
                    sent, detail = records_sent(label, worst["stdout"])
                    row.update({k: worst[k] for k in ("records decoded", "seq errors", "exact")})
                    row.update({"records sent": sent, "exporter": detail,
                                "octets - IP": worst["octets"] - seen["octets"]})
            base, ipfix = rows.get(lines[0][0]), rows.get(lines[1][0] if len(lines) > 1 else None)
            soft = rows.get(lines[2][0] if len(lines) > 2 else None)
            if base and ipfix:
                ipfix["export µs/flow"] = (ipfix["CPU s"] - base["CPU s"]) / flows * 1e6
                ipfix["export ns/frame"] = (ipfix["CPU s"] - base["CPU s"]) / frames * 1e9
            if ipfix and soft:
                ipfix["÷ softflowd"] = ratio(ipfix["CPU s"], soft["CPU s"])
    return t


# --names (issue 27): the names stages' CPU per frame and memory bounds, lpd -r beside
# tshark decoding the same fields; the kernel program's cost of copying handshakes whole.

NAMES_FRAMES = 150_000                  # frames of the mix (--quick: a fifth)
NAMES_DNS_SHARE = 0.04                  # of them DNS (a query and its answer each)
NAMES_TLS_SHARE = 0.004                 # TLS conversations per frame (150,000: 600)
NAMES_TLS12 = 0.2                       # share of them TLS 1.2 (the rest 1.3)
NAMES_SPLIT = 0.3                       # share of ClientHellos in 2-3 segments
NAMES_PLAIN_CONNS = 200                 # bulk connections on ports no stage reads
NAMES_CONCURRENT = 50                   # conversations in progress at once, interleaved
NAMES_STEP_US = 100                     # the mix's packet clock (10,000 fps)
NAMES_MSS = 1460
NAMES_IPV6 = 0.3
NAMES_FLOOD = 100_000                   # DNS answers / ClientHello first segments per flood
NAMES_FLOOD_MAX = 65536                 # --names-max of the DNS answer flood
NAMES_REPEAT = 3                        # best of, the lines in turn (--quick too)
NAMES_CAP = 4_000_000_000               # RLIMIT_AS of the runs the limits are taken from
NAMES_SLACK = 32 << 20                  # each limit: the baseline's VmPeak + the bound + this
NAMES_ENTRY_BUDGET = 2048               # bytes of address space a names table entry may take
NAMES_HELLO_SLACK = 1.25                # the pending hellos' bound times this (bytearrays,
                                        # their dict and lists)
NAMES_TIMEOUT = 300                     # s for one run
NAMES_TEST_RUNS = 1_000_000             # BPF_PROG_TEST_RUN repeat (best of NAMES_TEST_BEST)
NAMES_TEST_BEST = 5
NAMES_HELLO_PORT = 443
NAMES_WORDS = ("alpha", "bravo", "cdn", "edge", "api", "img", "static", "mail", "auth", "push",
               "eu", "us", "west", "east", "node", "svc", "app", "media", "data", "www")

NAMES_POLL = 0.005                      # s between reads of a run's /proc/<pid>/status


def _vm_status(pid):
    """(VmPeak, VmHWM) KiB of a live process, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            v = dict(line.split(":", 1) for line in f if line.startswith(("VmPeak", "VmHWM")))
        return int(v["VmPeak"].split()[0]), int(v["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def run_lpd_measured(args, as_limit, timeout=NAMES_TIMEOUT):
    """`python lpd.py ARGS` under prlimit --as=as_limit (it execs lpd: the PID is lpd's),
    as every run here: {wall s, CPU s (user + sys, os.wait4), VmPeak KiB, peak RSS KiB
    (VmHWM), stdout}. The peaks are read from /proc/<pid>/status every NAMES_POLL s
    while it runs (both only grow: the last read is its peak but for its last few ms;
    wait4's ru_maxrss would count the forked bench before the exec). Killed by its PID
    after `timeout` s; RuntimeError with stderr's last line when it fails."""
    argv = prlimit_argv(as_limit) + [sys.executable, LPD, *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdout=out, stderr=err)
        vm = None
        try:
            while True:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() - t0 > timeout:
                    raise subprocess.TimeoutExpired(argv, timeout)
                if _runs_lpd(p.pid):                   # after the exec: lpd's own image
                    vm = _vm_status(p.pid) or vm
                time.sleep(NAMES_POLL)
        except BaseException:
            p.kill()
            p.wait()
            raise
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode:
        last = stderr.strip().splitlines()
        raise RuntimeError((last[-1] if last else f"exit {p.returncode}")
                           + f" (exit {p.returncode}, prlimit --as={as_limit})")
    return {"wall s": wall, "CPU s": ru.ru_utime + ru.ru_stime, "stdout": stdout,
            "VmPeak KiB": vm and vm[0], "peak RSS KiB": vm and vm[1]}


def _runs_lpd(pid):
    """Whether pid has exec'd `python lpd.py` (not yet: the forked bench, or prlimit)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return len(argv) > 1 and argv[1] == LPD.encode()


def _names_frame(src, dst, payload, proto, sport, dport, flags=0, seq=0, ack=0):
    import packets as P
    l4 = P.udp(sport, dport, payload) if proto == 17 else \
        P.tcp(sport, dport, flags, seq=seq & SEQ_MASK, ack=ack & SEQ_MASK, payload=payload)
    if ":" in src:
        return P.ether("02:00:00:00:00:02", "02:00:00:00:00:01", P.ETH_IP6,
                       P.ipv6(src, dst, proto, l4))
    return P.ether("02:00:00:00:00:02", "02:00:00:00:00:01", P.ETH_IP, P.ipv4(src, dst, proto, l4))


def _dns_name(rng):
    return ".".join(rng.choice(NAMES_WORDS) + str(rng.randrange(1000))
                    for _ in range(rng.randrange(1, 4))) + rng.choice((".example", ".test", ".invalid"))


def _dns_message(ident, flags, name, qtype, answers=()):
    """A DNS message: one question, answers (owner, type, rdata), TTL 3600."""
    def qn(n):
        return b"".join(bytes([len(p)]) + p.encode() for p in n.split(".")) + b"\0"
    out = struct.pack("!HHHHHH", ident, flags, 1, len(answers), 0, 0) + qn(name) + \
        struct.pack("!HH", qtype, 1)
    for owner, rtype, rdata in answers:
        out += (b"\xc0\x0c" if owner == name else qn(owner)) + \
            struct.pack("!HHIH", rtype, 1, 3600, len(rdata)) + rdata
    return out


def tls_hellos(certificate, name, tls12=False):
    """(ClientHello bytes, the server's first flight) of one in-memory handshake by
    Python's ssl module (OpenSSL), as tests/test_tls_stage.py's hellos() makes them."""
    import ssl
    import harness
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    cctx.set_alpn_protocols(["h2", "http/1.1"])
    if tls12:
        cctx.maximum_version = ssl.TLSVersion.TLSv1_2
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(*certificate)
    sctx.set_alpn_protocols(["http/1.1"])
    return harness.memory_handshake(cctx, sctx, name)


class NamesMix:
    """The --names mix: DNS exchanges (A, AAAA, a CNAME then an A; random names, every
    answered address distinct), TLS conversations on port 443 (SYN, SYN-ACK, the
    ClientHello in 1 segment or, NAMES_SPLIT of them, 2-3, the server's flight, then
    bulk data and ACKs) and bulk connections on port 22; NAMES_CONCURRENT at a time,
    interleaved frame by frame. self.dns, self.tls: what it holds, for the checks."""

    def __init__(self, frames, certificate, seed=27):
        rng = self.rng = random.Random(seed)
        self.exchanges = int(frames * NAMES_DNS_SHARE / 2)
        self.conversations = max(1, int(frames * NAMES_TLS_SHARE))
        self.split = 0
        self.addresses = set()
        self._tls_state = []
        self.bulk = set()                   # id() of every bulk frame (data and its ACKs)
        streams = [self._dns(i) for i in range(self.exchanges)]
        tls = [self._tls(i, certificate) for i in range(self.conversations)]
        hs_frames = sum(len(s) for s in tls)
        bulk = max(0, frames - 2 * self.exchanges - hs_frames)
        owners = list(range(self.conversations + NAMES_PLAIN_CONNS))
        share = collections.Counter(rng.choice(owners) for _ in range(bulk))
        plain = []
        for i in range(NAMES_PLAIN_CONNS):
            plain.append(self._bulk([], i, 22, share[self.conversations + i], rng.randrange(1 << 32),
                                    rng.randrange(1 << 32)))
        for i, (s, st) in enumerate(zip(tls, self._tls_state)):
            self._bulk(s, i, NAMES_HELLO_PORT, share[i], *st)
        streams += tls + plain
        rng.shuffle(streams)
        self.streams = streams

    def _ends(self, i):
        v6 = self.rng.random() < NAMES_IPV6
        if v6:
            return f"fd00:199::{i % 60000 + 2:x}", f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1"
        return f"10.199.{i // 250 % 250}.{i % 250 + 2}", f"203.0.{113 + i // 250 % 8}.{i % 250 + 1}"

    def _dns(self, i):
        rng = self.rng
        v6 = rng.random() < NAMES_IPV6
        client, resolver = ("fd00:199::53", "fd00:199::1") if v6 else ("10.199.0.53", "10.199.0.1")
        name, kind, port = _dns_name(rng), rng.random(), 1024 + rng.randrange(60000)
        n = len(self.addresses)
        if kind < 0.25:
            qtype, addr = 28, bytes.fromhex("20010db8ffff") + n.to_bytes(10, "big")
        else:
            qtype, addr = 1, (0xC6120000 + n).to_bytes(4, "big")     # 198.18.0.0/15
        self.addresses.add(addr)
        answers = [(name, qtype, addr)]
        if kind > 0.85:
            target = "cname." + _dns_name(rng)
            answers = [(name, 5, b"".join(bytes([len(p)]) + p.encode()
                                          for p in target.split(".")) + b"\0"), (target, 1, addr)]
        return [_names_frame(client, resolver, _dns_message(i & 0xFFFF, 0x0100, name, qtype), 17,
                             port, 53),
                _names_frame(resolver, client, _dns_message(i & 0xFFFF, 0x8180, name, qtype,
                                                            answers), 17, 53, port)]

    def _tls(self, i, certificate):
        rng = self.rng
        client, server = self._ends(i)
        cport, cseq, sseq = 1024 + i % 60000, rng.randrange(1 << 32), rng.randrange(1 << 32)
        hello, flight = tls_hellos(certificate, _dns_name(rng).replace(".invalid", ".example"),
                                   rng.random() < NAMES_TLS12)
        out = _Frames([_names_frame(client, server, b"", 6, cport, NAMES_HELLO_PORT, 0x02, cseq),
               _names_frame(server, client, b"", 6, NAMES_HELLO_PORT, cport, 0x12, sseq, cseq + 1),
               _names_frame(client, server, b"", 6, cport, NAMES_HELLO_PORT, 0x10, cseq + 1, sseq + 1)])
        cseq, sseq = cseq + 1, sseq + 1
        parts = 1 if rng.random() >= NAMES_SPLIT else rng.choice((2, 3))
        self.split += parts > 1
        size = -(-len(hello) // parts)
        for off in range(0, len(hello), size):
            out.append(_names_frame(client, server, hello[off:off + size], 6, cport,
                                    NAMES_HELLO_PORT, 0x18, cseq + off, sseq))
        cseq += len(hello)
        for off in range(0, len(flight), NAMES_MSS):
            out.append(_names_frame(server, client, flight[off:off + NAMES_MSS], 6,
                                    NAMES_HELLO_PORT, cport, 0x18, sseq + off, cseq))
        sseq += len(flight)
        self._tls_state.append((cseq, sseq))
        out.append(_names_frame(client, server, b"", 6, cport, NAMES_HELLO_PORT, 0x10, cseq, sseq))
        out.ends = (client, server, cport)
        return out

    def _bulk(self, out, i, port, n, cseq, sseq):
        """n frames of server data (MSS, a TLS application data record's bytes or
        random) and the client's ACKs (one for two segments) appended to out."""
        rng = self.rng
        if port == NAMES_HELLO_PORT:
            client, server, cport = out.ends
        else:
            client, server = self._ends(10_000 + i)
            cport = 30000 + i
        payload = b"\x17\x03\x03" + rng.randbytes(NAMES_MSS - 3)
        k = 0
        while k < n:
            out.append(_names_frame(server, client, payload, 6, port, cport, 0x10, sseq, cseq))
            self.bulk.add(id(out[-1]))
            sseq += NAMES_MSS
            k += 1
            if k < n and k % 3 == 2:
                out.append(_names_frame(client, server, b"", 6, cport, port, 0x10, cseq, sseq))
                self.bulk.add(id(out[-1]))
                k += 1
        return out

    def frames(self):
        """Every frame, NAMES_CONCURRENT streams interleaved (each in its order)."""
        rng, pending, active = self.rng, iter(self.streams), []
        for s in pending:
            active.append(iter(s))
            if len(active) == NAMES_CONCURRENT:
                break
        while active:
            j = rng.randrange(len(active))
            f = next(active[j], None)
            if f is None:
                nxt = next(pending, None)
                if nxt is None:
                    active[j] = active[-1]
                    active.pop()
                else:
                    active[j] = iter(nxt)
                continue
            yield f


class _Frames(list):
    """A stream's frames, with its ends (a list cannot take attributes)."""


def write_names_pcap(path, frames, step_us=NAMES_STEP_US):
    """frames as a classic pcap (harness.write_pcap), step_us apart from IPFIX_T0;
    returns how many."""
    import harness
    n = [0]

    def records():
        for f in frames:
            sec, usec = divmod(n[0] * step_us, 1_000_000)
            n[0] += 1
            yield IPFIX_T0 + sec, usec, f
    harness.write_pcap(path, records())
    return n[0]


def answer_flood(n):
    """n DNS answers (A), each for a new address and name, none asked for."""
    for i in range(n):
        name = f"f{i}.flood.test"
        addr = (0x64400000 + i).to_bytes(4, "big")                     # 100.64.0.0/10
        yield _names_frame("10.199.0.1", "10.199.0.53",
                           _dns_message(i & 0xFFFF, 0x8180, name, 1, [(name, 1, addr)]), 17, 53,
                           1024 + i % 60000)


def hello_flood(n, hello, server="203.0.113.7"):
    """n ClientHello first segments, each of its own direction, none ever finished: a
    full MSS of the real `hello`'s message under a record and message header that say
    2^14 bytes (the most a hello may be), so each waits for more."""
    first = (b"\x16\x03\x01" + (1 << 14).to_bytes(2, "big") + b"\x01" +
             ((1 << 14) - 4).to_bytes(3, "big") + hello[9:] + bytes(NAMES_MSS))[:NAMES_MSS]
    for i in range(n):
        src = f"10.{200 + i // 62500 % 50}.{i // 250 % 250}.{i % 250 + 1}"
        yield _names_frame(src, server, first, 6, 1024 + i % 60000, NAMES_HELLO_PORT, 0x18, 1000)


def hello_fill(hello_max, directions, server="203.0.113.8"):
    """The designed worst case: `directions` hellos in part each holding as much as it
    may (a ClientHello whose record says 2^14 bytes, sent in MSS segments up to just
    under hello_max), all in part at once."""
    body = (1 << 14) - 4
    head = b"\x16\x03\x01" + (1 << 14).to_bytes(2, "big") + b"\x01" + body.to_bytes(3, "big")
    stream = head + bytes(hello_max)
    segs = (hello_max - NAMES_MSS) // NAMES_MSS
    for k in range(segs):
        for i in range(directions):
            src = f"10.{210 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"
            yield _names_frame(src, server, stream[k * NAMES_MSS:(k + 1) * NAMES_MSS], 6,
                               1024 + i, NAMES_HELLO_PORT, 0x18, 1000 + k * NAMES_MSS)


def tshark_names(pcap):
    """tshark -T fields of the same fields: (CPU s, rows with a query name, rows with an
    A answer, rows with a server name)."""
    cp, _, cpu = run_limited(["tshark", "-r", pcap, "-T", "fields", "-e", "dns.qry.name", "-e",
                              "dns.a", "-e", "tls.handshake.extensions_server_name"],
                             NAMES_CAP, NAMES_TIMEOUT)
    if cp.returncode:
        raise RuntimeError((cp.stderr.strip() or f"exit {cp.returncode}").splitlines()[-1])
    rows = [line.split("\t") for line in cp.stdout.splitlines()]
    return cpu, sum(bool(r[0]) for r in rows), sum(len(r) > 1 and bool(r[1]) for r in rows), \
        sum(len(r) > 2 and bool(r[2]) for r in rows)


def kernel_handshake_cost(lpd, t):
    """ns per BPF_PROG_TEST_RUN of a bulk TCP data frame, a pure ACK and a ClientHello's
    first segment: the copy plan without handshakes, with them but no hellos map, with it."""
    import ipaddress
    why = lpd.ebpf_available() if hasattr(lpd, "ebpf_available") else "lpd has no eBPF engine"
    if why is not None:
        t.say("kernel", f"skipped: {why}")
        return
    hello = b"\x16\x03\x01" + (1 << 14).to_bytes(2, "big") + b"\x01" + ((1 << 14) - 4).to_bytes(3, "big")
    rng = random.Random(5)
    frames = {"bulk TCP data (1514)": _names_frame("203.0.113.9", "10.199.0.9", b"\x17\x03\x03" +
                                                   rng.randbytes(NAMES_MSS - 3), 6, 443, 40000,
                                                   0x10, 1, 1),
              "pure ACK (60)": _names_frame("10.199.0.9", "203.0.113.9", b"", 6, 40000, 443, 0x10, 1, 1),
              "ClientHello 1st segment": _names_frame("10.199.0.9", "203.0.113.9",
                                                      (hello + rng.randbytes(NAMES_MSS))[:NAMES_MSS],
                                                      6, 40001, 443, 0x18, 1, 1)}
    nets = [ipaddress.ip_network(n) for n in OFFLINE_LOCAL_NETS]
    for label, handshakes, hellos in (("plan without handshakes", False, False),
                                      ("handshakes, no hellos map", True, False),
                                      ("handshakes + hellos map", True, True)):
        maps = prog = None
        try:
            maps = lpd.make_maps(0, hellos=hellos)
            image, labels = lpd.build_program(maps, nets, [], verdict=lpd.CopyPlan(
                0, 0, (53,), (53,), handshakes))
            prog = lpd.Program(image, labels, name="lpd_bench")
            for kind, data in frames.items():
                runs = [lpd.test_run(prog.fd, data, repeat=NAMES_TEST_RUNS)
                        for _ in range(NAMES_TEST_BEST)]
                t.add(part="kernel", line=label, trace=kind, frames=NAMES_TEST_RUNS,
                      **{"ns/frame": min(d for _, d in runs), "copy bytes": runs[0][0]})
        except Exception as e:
            t.say("kernel", "error: " + one_line(e), line=label)
        finally:
            if prog is not None:
                prog.close()
            for m in (maps or {}).values():
                m.close()


def _best(runs):
    return min(runs, key=lambda r: r["CPU s"])


def offline_names(lpd, results, quick):
    """--names on a trace of DNS, TLS hellos and bulk: CPU per frame and per message
    beside tshark decoding the same fields; peak RSS on the mix and under two floods
    against the designed bounds, each run under prlimit; the kernel program's cost of
    copying handshakes whole."""
    frames_n = NAMES_FRAMES // (5 if quick else 1)
    repeat = NAMES_REPEAT                   # --quick too: its runs are short, its trace noisy
    hellos_max = getattr(lpd, "TLS_HELLOS_MAX", 4096)
    hello_max = getattr(lpd, "TLS_HELLO_MAX", 16464)
    bound = hellos_max * hello_max
    hello_budget = int(bound * NAMES_HELLO_SLACK)
    t = Table("Offline: names (--names: passive DNS, TLS hellos) - lpd -r beside tshark; "
              "memory bounds; kernel copy cost",
              ["part", "line", "trace", "frames", "CPU s", "ns/frame", "stage ns/frame",
               "stage µs/msg", "peak RSS MiB", "+RSS MiB", "bound MiB", "AS limit MiB",
               "copy bytes", "checks"],
              note=f"cpu: a synthetic trace (classic pcap, whole frames, {NAMES_STEP_US} µs "
                   f"apart): DNS exchanges ({NAMES_DNS_SHARE:.0%} of frames: A, AAAA, CNAME+A, "
                   "random names, every address new), TLS conversations\n"
                   f"on port {NAMES_HELLO_PORT} (real hellos by Python's ssl over memory BIOs, "
                   f"{NAMES_TLS12:.0%} TLS 1.2; {NAMES_SPLIT:.0%} of ClientHellos in 2-3 "
                   "segments) and bulk (MSS data, an ACK per two; most frames),\n"
                   f"{NAMES_CONCURRENT} streams interleaved, {NAMES_IPV6:.0%} IPv6. Lines: lpd -r "
                   "FILE --output json (baseline); lpd -r FILE --names --ssl-log F --output json; "
                   f"best of {repeat}, in turn.\nCPU: the child's user+sys (wait4); ns/frame: "
                   "minus the same line's CPU on an empty trace (startup), per frame. stage: "
                   "--names minus baseline, per frame;\nper message (DNS messages + hellos "
                   "read) on the mix's messages alone (its frames but the bulk data and ACKs). "
                   "tshark (reference; the same file, the same\nstartup subtraction): -T fields "
                   "-e dns.qry.name -e dns.a -e tls.handshake.extensions_server_name; its check: "
                   "rows with a query name / a server name =\nthe messages in the trace. memory: "
                   "peak RSS (VmHWM, read while it runs) of lpd -r under prlimit --as = the same "
                   "trace's baseline VmPeak + the --names run's\nown fixed address space "
                   f"(measured on the empty trace) + the bound + {NAMES_SLACK >> 20} MiB; names: "
                   f"a budget of {NAMES_ENTRY_BUDGET} B an entry; hellos in part:\nTLS_HELLOS_MAX "
                   f"{hellos_max:,} x TLS_HELLO_MAX {hello_max:,} = {bound / 2**20:.1f} MiB, "
                   f"times {NAMES_HELLO_SLACK:g}. +RSS: minus the baseline's on the same trace. "
                   "Floods: frames 10 µs apart.\nEach run's peak includes its --output json "
                   "document, written at its end with every row (the DNS flood's: "
                   f"{NAMES_FLOOD_MAX:,} names).\nkernel: BPF_PROG_TEST_RUN, ns per run (best of "
                   f"{NAMES_TEST_BEST} x {NAMES_TEST_RUNS:,}); copy bytes: its verdict (0: not "
                   "copied).")
    results["offline_names"] = t.to_json()
    if not lpd_offers("--names"):
        t.say("-", "lpd has no --names")
        return t
    with tempfile.TemporaryDirectory(prefix="lpd-bench-names-") as workdir:
        t0 = time.monotonic()
        import harness
        cert = harness.self_signed(workdir, "bench.test")
        mix = NamesMix(frames_n, cert)
        pcap, empty = os.path.join(workdir, "mix.pcap"), os.path.join(workdir, "empty.pcap")
        n = write_names_pcap(pcap, mix.frames())
        write_names_pcap(empty, ())
        bulk = os.path.join(workdir, "bulk.pcap")
        bulk_n = write_names_pcap(bulk, (f for f in mix.frames() if id(f) in mix.bulk))
        only = os.path.join(workdir, "messages.pcap")
        only_n = write_names_pcap(only, (f for f in mix.frames() if id(f) not in mix.bulk))
        t.say("cpu", f"mix: {n:,} frames, {mix.exchanges:,} DNS exchanges, {mix.conversations:,} "
                     f"TLS conversations ({mix.split} ClientHellos split), "
                     f"{os.path.getsize(pcap) >> 20} MiB, made in {time.monotonic() - t0:.0f} s",
              frames=n)
        ssl_log = os.path.join(workdir, "ssl.log")

        def base(trace):
            return ["-r", trace, "--output", "json"]

        def names(trace, *extra, log=ssl_log):
            if os.path.exists(log):
                os.unlink(log)
            return ["-r", trace, "--names", "--ssl-log", log, *extra, "--output", "json"]
        try:
            e_base = _best([run_lpd_measured(base(empty), NAMES_CAP) for _ in range(repeat)])
            e_names = _best([run_lpd_measured(names(empty), NAMES_CAP) for _ in range(repeat)])
        except Exception as e:
            t.say("cpu", "lpd on an empty trace failed: " + one_line(e))
            return t
        fixed = max(0, e_names["VmPeak KiB"] - e_base["VmPeak KiB"]) * 1024
        t.add(part="cpu", line="lpd -r / --names (startup)", trace="empty", frames=0,
              **{"CPU s": e_base["CPU s"], "peak RSS MiB": e_base["peak RSS KiB"] / 1024,
                 "+RSS MiB": (e_names["peak RSS KiB"] - e_base["peak RSS KiB"]) / 1024},
              detail={"--names CPU s": e_names["CPU s"], "VmPeak KiB": e_base["VmPeak KiB"],
                      "--names VmPeak KiB": e_names["VmPeak KiB"]})
        runs = {"base": [], "names": [], "bulk base": [], "bulk names": [], "only base": [],
                "only names": []}
        only_log = os.path.join(workdir, "only-ssl.log")
        limit = None
        try:
            for _ in range(repeat):
                runs["base"].append(run_lpd_measured(base(pcap), limit or NAMES_CAP))
                if limit is None:
                    limit = runs["base"][0]["VmPeak KiB"] * 1024 + fixed + hello_budget + \
                        (len(mix.addresses) + mix.conversations) * NAMES_ENTRY_BUDGET + NAMES_SLACK
                runs["names"].append(run_lpd_measured(names(pcap), limit))
                runs["bulk base"].append(run_lpd_measured(base(bulk), limit))
                runs["bulk names"].append(run_lpd_measured(
                    names(bulk, log=os.path.join(workdir, "bulk-ssl.log")), limit))
                runs["only base"].append(run_lpd_measured(base(only), limit))
                runs["only names"].append(run_lpd_measured(names(only, log=only_log), limit))
        except Exception as e:
            t.say("cpu", "error: " + one_line(e))
            return t
        b, best = _best(runs["base"]), _best(runs["names"])
        bb, bn = _best(runs["bulk base"]), _best(runs["bulk names"])
        skip = ((bn["CPU s"] - e_names["CPU s"]) - (bb["CPU s"] - e_base["CPU s"])) / bulk_n
        bulk_doc = json.loads(bn["stdout"])
        bulk_ok = not (bulk_doc.get("names") or {}).get("total") and \
            not (bulk_doc.get("tls") or {}).get("client_hellos")
        t.add(part="cpu", line="lpd -r (baseline)", trace="the mix's bulk alone", frames=bulk_n,
              **{"CPU s": bb["CPU s"], "ns/frame": (bb["CPU s"] - e_base["CPU s"]) / bulk_n * 1e9,
                 "peak RSS MiB": bb["peak RSS KiB"] / 1024})
        t.add(part="cpu", line="lpd -r --names --ssl-log", trace="the mix's bulk alone",
              frames=bulk_n, checks=bulk_ok, **{
                  "CPU s": bn["CPU s"], "ns/frame": (bn["CPU s"] - e_names["CPU s"]) / bulk_n * 1e9,
                  "stage ns/frame": skip * 1e9, "peak RSS MiB": bn["peak RSS KiB"] / 1024})
        os.unlink(bulk)

        def read_all(run, log):
            """(every count as the mix has it, the counts, messages read) of a run."""
            doc = json.loads(run["stdout"])
            dns, tls = doc.get("names") or {}, doc.get("tls") or {}
            with open(log) as f:
                ssl_records = [json.loads(x) for x in f if x.strip()]
            msgs = dns.get("queries", 0) + dns.get("responses", 0) + \
                tls.get("client_hellos", 0) + tls.get("server_hellos", 0)
            errors = sum((dns.get("parse_errors") or {}).values()) + \
                sum((tls.get("parse_errors") or {}).values())
            checks = {"queries": dns.get("queries"), "responses": dns.get("responses"),
                      "client_hellos": tls.get("client_hellos"),
                      "server_hellos": tls.get("server_hellos"),
                      "ssl.log records": len(ssl_records), "names": dns.get("total"),
                      "parse errors": errors}
            ok = (dns.get("queries"), dns.get("responses")) == (mix.exchanges, mix.exchanges) \
                and (tls.get("client_hellos"), tls.get("server_hellos"), len(ssl_records)) == \
                (mix.conversations,) * 3 and errors == 0 and \
                dns.get("total") == len(mix.addresses) + mix.conversations
            return ok, checks, msgs
        ob, on = _best(runs["only base"]), _best(runs["only names"])
        ok, checks, msgs = read_all(on, only_log)
        only_stage = (on["CPU s"] - e_names["CPU s"]) - (ob["CPU s"] - e_base["CPU s"])
        t.add(part="cpu", line="lpd -r (baseline)", trace="the mix's messages alone",
              frames=only_n, **{"CPU s": ob["CPU s"],
                                "ns/frame": (ob["CPU s"] - e_base["CPU s"]) / only_n * 1e9,
                                "peak RSS MiB": ob["peak RSS KiB"] / 1024})
        t.add(part="cpu", line="lpd -r --names --ssl-log", trace="the mix's messages alone",
              frames=only_n, checks=ok, detail=checks, **{
                  "CPU s": on["CPU s"], "ns/frame": (on["CPU s"] - e_names["CPU s"]) / only_n * 1e9,
                  "stage ns/frame": only_stage / only_n * 1e9,
                  "stage µs/msg": only_stage / msgs * 1e6 if msgs else None,
                  "peak RSS MiB": on["peak RSS KiB"] / 1024})
        os.unlink(only)
        ok, checks, msgs = read_all(best, ssl_log)
        base_ns = (b["CPU s"] - e_base["CPU s"]) / n * 1e9
        names_ns = (best["CPU s"] - e_names["CPU s"]) / n * 1e9
        stage = (best["CPU s"] - e_names["CPU s"]) - (b["CPU s"] - e_base["CPU s"])
        t.add(part="cpu", line="lpd -r (baseline)", trace="mix", frames=n, **{
            "CPU s": b["CPU s"], "ns/frame": base_ns, "peak RSS MiB": b["peak RSS KiB"] / 1024})
        t.add(part="cpu", line="lpd -r --names --ssl-log", trace="mix", frames=n, checks=ok,
              detail=checks, **{
                  "CPU s": best["CPU s"], "ns/frame": names_ns, "stage ns/frame": stage / n * 1e9,
                  "peak RSS MiB": best["peak RSS KiB"] / 1024,
                  "+RSS MiB": (best["peak RSS KiB"] - b["peak RSS KiB"]) / 1024,
                  "AS limit MiB": limit / 2**20})
        if shutil.which("tshark"):
            try:
                e_cpu = min(tshark_names(empty)[0] for _ in range(repeat))
                cpu, qrows, arows, snis = min((tshark_names(pcap) for _ in range(repeat)),
                                              key=lambda r: r[0])
                t.add(part="cpu", line="tshark -T fields (reference)", trace="mix", frames=n,
                      checks=(qrows, snis) == (2 * mix.exchanges, mix.conversations),
                      detail={"rows with dns.qry.name": qrows, "rows with dns.a": arows,
                              "rows with a server name": snis, "startup CPU s": e_cpu},
                      **{"CPU s": cpu, "ns/frame": (cpu - e_cpu) / n * 1e9,
                         "÷ lpd --names": ratio((cpu - e_cpu) / n * 1e9, names_ns)})
            except Exception as e:
                t.say("cpu", "tshark: " + one_line(e))
        else:
            t.say("cpu", "tshark not installed")
        os.unlink(pcap)

        # memory: the floods, each beside its own baseline
        hello, _ = tls_hellos(cert, "flood.tls.test")
        floods = [("DNS answers", answer_flood(NAMES_FLOOD), ["--names-max", str(NAMES_FLOOD_MAX)],
                   NAMES_FLOOD_MAX * NAMES_ENTRY_BUDGET, None),
                  ("ClientHello 1st segments", hello_flood(NAMES_FLOOD, hello), [],
                   hello_budget, bound),
                  ("hellos filled", hello_fill(hello_max, hellos_max), [], hello_budget, bound)]
        for label, gen, extra, budget, shown_bound in floods:
            path = os.path.join(workdir, "flood.pcap")
            fn = write_names_pcap(path, gen, step_us=10)
            trace = f"{hellos_max:,} {label}" if label == "hellos filled" else f"{fn:,} {label}"
            line = "lpd -r --names" + (" " + " ".join(extra) if extra else "")
            try:
                fb = run_lpd_measured(base(path), NAMES_CAP)
                limit = fb["VmPeak KiB"] * 1024 + fixed + budget + NAMES_SLACK
                r = run_lpd_measured(names(path, *extra), limit)
            except Exception as e:
                t.say("memory", "error: " + one_line(e), line=line, trace=trace)
                continue
            finally:
                os.unlink(path)
            doc = json.loads(r["stdout"])
            dns, tls = doc.get("names") or {}, doc.get("tls") or {}
            errs = tls.get("parse_errors") or {}
            if label == "DNS answers":
                detail = {"names": dns.get("total"), "evictions": dns.get("evictions"),
                          "responses": dns.get("responses"), "unmatched": dns.get("unmatched")}
                ok = dns.get("total") == NAMES_FLOOD_MAX and \
                    dns.get("evictions") == NAMES_FLOOD - NAMES_FLOOD_MAX and \
                    dns.get("responses") == NAMES_FLOOD
                shown = NAMES_FLOOD_MAX * NAMES_ENTRY_BUDGET
            else:
                detail = {"client_hellos": tls.get("client_hellos"),
                          **{k: v for k, v in errs.items() if v}}
                waiting = fn if label.startswith("ClientHello") else hellos_max
                # every direction but the last TLS_HELLOS_MAX pushed out, none read
                ok = tls.get("client_hellos") == 0 and \
                    errs.get("evicted", 0) == max(0, waiting - hellos_max) and \
                    sum(errs.values()) == errs.get("evicted", 0)
                shown = shown_bound
            t.add(part="memory", line=line, trace=trace, frames=fn, checks=ok, detail=detail, **{
                "CPU s": r["CPU s"], "ns/frame": (r["CPU s"] - e_names["CPU s"]) / fn * 1e9,
                "peak RSS MiB": r["peak RSS KiB"] / 1024,
                "+RSS MiB": (r["peak RSS KiB"] - fb["peak RSS KiB"]) / 1024,
                "bound MiB": shown / 2**20, "AS limit MiB": limit / 2**20,
                "baseline peak RSS MiB": fb["peak RSS KiB"] / 1024})
    kernel_handshake_cost(lpd, t)
    return t


# --series http2 (issue 28): the HTTP stage on HTTP/2 in clear text (h2c, gRPC), lpd -r
# beside tshark's http2 dissector on the same capture and beside lpd on the same calls
# as HTTP/1.1.

H2_CONNS = 200                          # connections of the trace (--quick: a fifth)
H2_CALLS = (20, 50, 100, 200)           # calls per connection (drawn)
H2_BATCH = (1, 4, 10, 25)               # streams a client opens at once (drawn per batch)
H2_GRPC_SHARE = 0.75                    # connections that are gRPC (port 50051); the rest
                                        # h2c GETs (port 8080), prior knowledge both
H2_GRPC_PORT, H2_PORT = 50051, 8080
H2_METHODS = tuple(f"bench.{svc}/{m}" for svc in ("Users", "Orders", "Search", "Feed")
                   for m in ("Get", "List", "Put", "Watch"))
H2_PATHS = ("/", "/api/v1/items", "/api/v1/items/42", "/static/app.js", "/img/logo.png",
            "/healthz")
H2_REQUEST = (12, 40, 200, 1200)         # request message / body bytes (drawn)
H2_RESPONSE = (0, 60, 300, 2000, 9000, 40000)   # response message / body bytes (drawn)
H2_GRPC_ERRORS = (("NOT_FOUND", 5), ("UNAVAILABLE", 14))   # a share of calls end so
H2_ERROR_SHARE = 0.05
H2_MSS = 1448
H2_CONCURRENT = 100                     # connections in progress at once, interleaved
H2_STEP_US = 50                         # the trace's packet clock (20,000 fps)
H2_REPEAT = 3                           # best of, the lpd lines in turn
H2_TSHARK_REPEAT = 1                    # tshark's http2 takes about 2 min a run here
H2_CAP = 4_000_000_000                  # RLIMIT_AS of every run
H2_TIMEOUT = 600                        # s for one run


def h2_plan(rng, conn):
    """One connection's calls, the same for both renderings: (grpc?, port, [(path,
    request bytes, response bytes, grpc status or None)])."""
    grpc = rng.random() < H2_GRPC_SHARE
    calls = []
    for _ in range(rng.choice(H2_CALLS)):
        status = None
        if grpc:
            path = "/" + rng.choice(H2_METHODS)
            status = 0
            if rng.random() < H2_ERROR_SHARE:
                status = rng.choice(H2_GRPC_ERRORS)[1]
            req = rng.choice(H2_REQUEST)
        else:
            path, req = rng.choice(H2_PATHS), 0
        resp = 0 if status else rng.choice(H2_RESPONSE)
        calls.append((path, req, resp, status))
    return grpc, H2_GRPC_PORT if grpc else H2_PORT, calls


def _h2_addresses(conn):
    client = f"10.198.{conn // 250 % 250}.{conn % 250 + 1}"
    return client, "10.199.9.9", 20000 + conn % 40000


def _segments(client, server, sport, dport, writes):
    """A TCP connection's frames for `writes` ((to_server, bytes), ...): handshake, each
    write cut at H2_MSS with an ACK of it from the other side, FINs."""
    seq = {True: 1000, False: 50000}
    f = _names_frame

    def frame(to_server, payload, flags):
        src, dst, sp, dp = (client, server, sport, dport) if to_server else \
            (server, client, dport, sport)
        return f(src, dst, payload, 6, sp, dp, flags, seq[to_server], seq[not to_server])
    yield frame(True, b"", 0x02)
    seq[True] += 1
    yield frame(False, b"", 0x12)
    seq[False] += 1
    yield frame(True, b"", 0x10)
    for to_server, data in writes:
        for at in range(0, len(data), H2_MSS):
            chunk = data[at:at + H2_MSS]
            yield frame(to_server, chunk, 0x18)
            seq[to_server] += len(chunk)
        yield frame(not to_server, b"", 0x10)
    for to_server in (True, False):
        yield frame(to_server, b"", 0x11)
        seq[to_server] += 1
    yield frame(True, b"", 0x10)


def h2_writes(grpc, port, calls, rng):
    """The calls as HTTP/2 (the h2 library on both ends: HPACK with its dynamic table,
    flow control answered with WINDOW_UPDATEs): batches of streams opened at once, the
    server answering each batch's streams in turn."""
    import h2.config
    import h2.connection
    import h2.events
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                  header_encoding=None))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                  header_encoding=None))
    writes = []

    def move():
        for _ in range(20):
            moved = False
            for to_server, src, dst in ((True, client, server), (False, server, client)):
                data = src.data_to_send()
                if data:
                    moved = True
                    writes.append((to_server, data))
                    for ev in dst.receive_data(data):
                        if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                            dst.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if not moved:
                return
    client.initiate_connection()
    server.initiate_connection()
    move()
    authority = f"10.199.9.9:{port}".encode()
    i = 0
    while i < len(calls):
        batch = calls[i:i + rng.choice(H2_BATCH)]
        i += len(batch)
        sids = []
        for path, req, _, _ in batch:
            sid = client.get_next_available_stream_id()
            sids.append(sid)
            if grpc:
                client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                          (b":path", path.encode()), (b":authority", authority),
                                          (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                                          (b"grpc-timeout", b"5S"),
                                          (b"user-agent", b"grpc-python/1.85 bench")])
                client.send_data(sid, grpc_frame(req), end_stream=True)
            else:
                client.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                                          (b":path", path.encode()), (b":authority", authority),
                                          (b"accept", b"*/*"), (b"user-agent", b"bench/1.0")],
                                    end_stream=True)
        move()
        for sid, (path, _, resp, status) in zip(sids, batch):
            if grpc and status:                            # trailers only
                server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                          (b"grpc-status", str(status).encode()),
                                          (b"grpc-message", b"bench")], end_stream=True)
                continue
            server.send_headers(sid, [(b":status", b"200"),
                                      (b"content-type", b"application/grpc" if grpc else b"text/plain"),
                                      (b"server", b"bench")] +
                                ([] if grpc else [(b"content-length", str(resp).encode())]),
                                end_stream=not grpc and not resp)
            body = grpc_frame(resp) if grpc else bytes(resp)
            step = server.max_outbound_frame_size
            for at in range(0, len(body), step):
                while server.local_flow_control_window(sid) < min(step, len(body) - at):
                    move()                                 # the client's WINDOW_UPDATEs
                server.send_data(sid, body[at:at + step],
                                 end_stream=not grpc and at + step >= len(body))
            if grpc:
                server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        move()
    client.close_connection()
    move()
    return writes


def grpc_frame(n):
    return b"\0" + n.to_bytes(4, "big") + bytes(n)


def h1_writes(grpc, port, calls):
    """The same calls as HTTP/1.1 on one keep-alive connection, one at a time: the same
    request and response bodies (a gRPC message's bytes under Content-Length)."""
    writes = []
    host = f"10.199.9.9:{port}"
    for path, req, resp, status in calls:
        if grpc:
            body = grpc_frame(req)
            writes.append((True, (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                                  f"application/grpc\r\nUser-Agent: bench/1.0\r\nContent-Length: "
                                  f"{len(body)}\r\n\r\n").encode() + body))
            body = b"" if status else grpc_frame(resp)
        else:
            writes.append((True, (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n"
                                  f"User-Agent: bench/1.0\r\n\r\n").encode()))
            body = bytes(resp)
        code = "404 Not Found" if status else "200 OK"
        writes.append((False, (f"HTTP/1.1 {code}\r\nContent-Type: text/plain\r\nServer: bench\r\n"
                               f"Content-Length: {len(body)}\r\n\r\n").encode() + body))
    return writes


class H2Trace:
    """The plans of H2_CONNS connections (seeded), and their frames as HTTP/2 or HTTP/1.1,
    H2_CONCURRENT connections interleaved."""

    def __init__(self, conns):
        rng = random.Random(28)
        self.plans = [h2_plan(rng, c) for c in range(conns)]
        calls = [(grpc, c) for grpc, _, cs in self.plans for c in cs]
        self.grpc = sum(g for g, _ in calls)
        self.gets = len(calls) - self.grpc
        self.statuses = collections.Counter(
            c[3] for g, c in calls if g)                  # grpc status code -> calls

    def frames(self, h2):
        rng = random.Random(2828)

        def conn(i):
            grpc, port, calls = self.plans[i]
            client, server, sport = _h2_addresses(i)
            writes = h2_writes(grpc, port, calls, random.Random(i)) if h2 else \
                h1_writes(grpc, port, calls)
            return _segments(client, server, sport, port, writes)
        pending, active = iter(range(len(self.plans))), []
        while True:
            while len(active) < H2_CONCURRENT:
                i = next(pending, None)
                if i is None:
                    break
                active.append(conn(i))
            if not active:
                return
            j = rng.randrange(len(active))
            f = next(active[j], None)
            if f is None:
                active[j] = active[-1]
                active.pop()
                continue
            yield f


def tshark_h2(pcap, h2):
    """tshark decoding :path, :status and gRPC message lengths of every frame (the http2
    dissector, TCP reassembly on, the ports given as HTTP/2): (CPU s, paths, statuses)."""
    fields = ["-e", "http2.headers.path", "-e", "http2.headers.status", "-e", "grpc.message_length"] \
        if h2 else ["-e", "http.request.uri", "-e", "http.response.code"]
    proto = "http2" if h2 else "http"
    cp, _, cpu = run_limited(["tshark", "-r", pcap, "-d", f"tcp.port=={H2_GRPC_PORT},{proto}",
                              "-d", f"tcp.port=={H2_PORT},{proto}", "-T", "fields", *fields],
                             H2_CAP, H2_TIMEOUT)
    if cp.returncode:
        raise RuntimeError((cp.stderr.strip() or f"exit {cp.returncode}").splitlines()[-1])
    rows = [line.split("\t") for line in cp.stdout.splitlines()]
    count = lambda k: sum(len(r[k].split(",")) for r in rows if len(r) > k and r[k])  # noqa: E731
    return cpu, count(0), count(1)


def offline_http2(lpd, results, quick):
    """--http on HTTP/2 in clear text (h2c and gRPC, prior knowledge): lpd -r's CPU per
    frame and per call, beside tshark's http2 dissector on the same capture and beside
    lpd on the same calls as HTTP/1.1; every count checked against the trace."""
    conns = H2_CONNS // (5 if quick else 1)
    t = Table("Offline: HTTP/2 and gRPC (--http) - lpd -r beside tshark's http2 dissector "
              "and beside the same calls as HTTP/1.1",
              ["line", "trace", "frames", "calls", "CPU s", "ns/frame", "stage ns/frame",
               "stage µs/call", "÷ lpd --http", "peak RSS MiB", "checks"],
              note=f"A synthetic trace (classic pcap, whole frames, {H2_STEP_US} µs apart) of "
                   f"{conns} connections with prior knowledge, {H2_CONCURRENT} interleaved: "
                   f"{H2_GRPC_SHARE:.0%} gRPC (port {H2_GRPC_PORT}: unary\ncalls of "
                   f"{len(H2_METHODS)} methods, request messages of {H2_REQUEST} B, responses "
                   f"of {H2_RESPONSE} B then trailers; {H2_ERROR_SHARE:.0%} trailers-only "
                   "NOT_FOUND/UNAVAILABLE), the rest\nh2c GETs (port "
                   f"{H2_PORT}, bodies of the same sizes); {H2_CALLS} calls a connection in "
                   f"batches of {H2_BATCH} streams opened at once. Both ends are the h2 "
                   "library:\nHPACK with its dynamic table, DATA in frames of at most 16 KiB, "
                   "flow control with WINDOW_UPDATEs; TCP segments of "
                   f"{H2_MSS} B, an ACK per write. HTTP/1.1: the same\ncalls one at a time "
                   "on the same connections (POST with Content-Length for a gRPC call, the same "
                   "body bytes). Lines: lpd -r FILE --output json\n(baseline); lpd -r FILE "
                   f"--http --http-ports {H2_GRPC_PORT},{H2_PORT} --output json; best of "
                   f"{H2_REPEAT}, in turn (tshark: best of {H2_TSHARK_REPEAT}). CPU: the child's user+sys (wait4); ns/frame: minus\n"
                   "the same line's CPU on an empty trace (startup), per frame; stage: --http "
                   "minus baseline. ÷ lpd --http: per frame, against lpd --http on the same trace. "
                   "tshark (reference; the same startup subtraction): -d "
                   "tcp.port==P,http2\n-T fields -e http2.headers.path -e http2.headers.status "
                   "-e grpc.message_length (HTTP/1.1: the http dissector, -e http.request.uri "
                   "-e http.response.code);\nits check: the paths and statuses it decoded = "
                   "the calls. lpd's check: gRPC calls, statuses and HTTP requests in its "
                   "document = the trace's, no parse error.")
    results["offline_http2"] = t.to_json()
    try:
        import h2.connection  # noqa: F401
    except ImportError:
        t.say("-", "the h2 library is not installed (Debian: python3-h2; pip: h2)")
        return t
    with tempfile.TemporaryDirectory(prefix="lpd-bench-h2-") as workdir:
        t0 = time.monotonic()
        trace = H2Trace(conns)
        calls = trace.grpc + trace.gets
        paths = {}
        for name, as_h2 in (("h2", True), ("h1", False)):
            paths[name] = os.path.join(workdir, f"{name}.pcap")
            n = write_names_pcap(paths[name], trace.frames(as_h2), step_us=H2_STEP_US)
            paths[name + " frames"] = n
        empty = os.path.join(workdir, "empty.pcap")
        write_names_pcap(empty, ())
        t.say("h2", f"{calls:,} calls ({trace.grpc:,} gRPC, {trace.gets:,} GETs) on {conns} "
                    f"connections: HTTP/2 {paths['h2 frames']:,} frames, "
                    f"{os.path.getsize(paths['h2']) >> 20} MiB; HTTP/1.1 "
                    f"{paths['h1 frames']:,} frames, {os.path.getsize(paths['h1']) >> 20} MiB; "
                    f"made in {time.monotonic() - t0:.0f} s")
        ports = f"{H2_GRPC_PORT},{H2_PORT}"

        def base(pcap):
            return ["-r", pcap, "--output", "json"]

        def http(pcap):
            return ["-r", pcap, "--http", "--http-ports", ports, "--output", "json"]
        try:
            e_base = _best([run_lpd_measured(base(empty), H2_CAP, H2_TIMEOUT) for _ in range(H2_REPEAT)])
            e_http = _best([run_lpd_measured(http(empty), H2_CAP, H2_TIMEOUT) for _ in range(H2_REPEAT)])
            runs = collections.defaultdict(list)
            for _ in range(H2_REPEAT):
                for name in ("h2", "h1"):
                    runs[name, "base"].append(run_lpd_measured(base(paths[name]), H2_CAP, H2_TIMEOUT))
                    runs[name, "http"].append(run_lpd_measured(http(paths[name]), H2_CAP, H2_TIMEOUT))
        except Exception as e:
            t.say("-", "error: " + one_line(e))
            return t
        names = {0: "OK", 5: "NOT_FOUND", 14: "UNAVAILABLE"}
        want = {names[k]: v for k, v in trace.statuses.items()}
        lpd_ns = {}
        for name, label in (("h2", "HTTP/2 (h2c, gRPC)"), ("h1", "HTTP/1.1, the same calls")):
            n = paths[name + " frames"]
            b, h = _best(runs[name, "base"]), _best(runs[name, "http"])
            doc = json.loads(h["stdout"]).get("http") or {}
            rpc, servers = doc.get("rpc") or {}, doc.get("servers") or {}
            got = collections.Counter()
            for d in rpc.values():
                got.update(d.get("statuses") or {})
            requests = sum(d.get("requests", 0) for d in servers.values())
            errors = {k: v for k, v in (doc.get("parse_errors") or {}).items() if v}
            if name == "h2":
                ok = dict(got) == want and requests == trace.gets and not errors
                detail = {"gRPC calls": sum(got.values()), "statuses": dict(got),
                          "HTTP requests": requests, "parse errors": errors}
            else:
                ok = not rpc and requests == calls and not errors
                detail = {"HTTP requests": requests, "parse errors": errors}
            stage = (h["CPU s"] - e_http["CPU s"]) - (b["CPU s"] - e_base["CPU s"])
            ns = (h["CPU s"] - e_http["CPU s"]) / n * 1e9
            lpd_ns[name] = ns
            t.add(line="lpd -r (baseline)", trace=label, frames=n, **{
                "CPU s": b["CPU s"], "ns/frame": (b["CPU s"] - e_base["CPU s"]) / n * 1e9,
                "peak RSS MiB": b["peak RSS KiB"] / 1024})
            t.add(line="lpd -r --http", trace=label, frames=n, calls=calls, checks=ok,
                  detail=detail, **{
                      "CPU s": h["CPU s"], "ns/frame": ns, "stage ns/frame": stage / n * 1e9,
                      "stage µs/call": stage / calls * 1e6,
                      "peak RSS MiB": h["peak RSS KiB"] / 1024})
        if shutil.which("tshark"):
            try:
                e_cpu = min(tshark_h2(empty, True)[0] for _ in range(H2_TSHARK_REPEAT))
                for name, label in (("h2", "HTTP/2 (h2c, gRPC)"), ("h1", "HTTP/1.1, the same calls")):
                    n = paths[name + " frames"]
                    cpu, got_paths, got_statuses = min(
                        (tshark_h2(paths[name], name == "h2") for _ in range(H2_TSHARK_REPEAT)),
                        key=lambda r: r[0])
                    ns = (cpu - e_cpu) / n * 1e9
                    t.add(line=f"tshark {'http2' if name == 'h2' else 'http'} (reference)",
                          trace=label, frames=n, calls=calls,
                          checks=(got_paths, got_statuses) == (calls, calls),
                          detail={"paths": got_paths, "statuses": got_statuses,
                                  "startup CPU s": e_cpu},
                          **{"CPU s": cpu, "ns/frame": ns, "÷ lpd --http": ratio(ns, lpd_ns.get(name))})
            except Exception as e:
                t.say("tshark", one_line(e))
        else:
            t.say("tshark", "not installed")
    return t


OFFLINE_SERIES = {"accounting": offline_accounting, "remote": offline_remote,
                  "remote-flood": remote_flood, "connections": offline_connections,
                  "http": offline_http, "syn-flood": syn_flood, "matchers": offline_matchers,
                  "rules-at-scale": rules_at_scale, "worker-transport": offline_worker_transport,
                  "ipfix": offline_ipfix, "names": offline_names, "http2": offline_http2}


def run_offline(lpd, results, quick, series=tuple(OFFLINE_SERIES)):
    t0 = time.monotonic()
    for name, table in OFFLINE_SERIES.items():
        if name in series:
            table(lpd, results, quick).show()
    results["offline_seconds"] = round(time.monotonic() - t0, 1)


###############################################################################
# Live: process measurement ###################################################
###############################################################################

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime+stime (+ waited-for children) of a process, all threads, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def cpu_ns(pid):
    """Precise CPU time (ns) summed over the threads, from /proc/<pid>/task/*/schedstat."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError):
            pass
    return total


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def busy_jiffies():
    """Every CPU's non-idle time (user nice system irq softirq steal, not idle iowait)
    from /proc/stat's first line, in USER_HZ ticks."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4]


def busy_until_idle(pids, timeout=COUNT_TIMEOUT):
    """busy_jiffies() as of the last CPU progress of `pids`, once none has made any for
    DRAIN_IDLE s (now, without pids): the end of a consumer's work on the frames sent,
    without the wait for its next publication (an idle time other processes may fill)."""
    last_b = busy_jiffies()
    if not pids:
        return last_b
    last, last_t = [cpu_ns(p) for p in pids], time.monotonic()
    deadline = last_t + timeout
    while time.monotonic() < deadline:
        time.sleep(IDLE_POLL)
        now, t, b = [cpu_ns(p) for p in pids], time.monotonic(), busy_jiffies()
        if now != last:
            last, last_t, last_b = now, t, b
        elif t - last_t >= DRAIN_IDLE:
            break
    return last_b


@functools.lru_cache(maxsize=None)
def prlimit_argv(limit):
    """['prlimit', '--as=LIMIT'] to put before a command (it execs it: the PID stays the
    command's), or [] where prlimit is missing."""
    try:
        ok = subprocess.run(["prlimit", "--version"], capture_output=True).returncode == 0
    except OSError:
        ok = False
    return ["prlimit", f"--as={limit}"] if ok else []


class NotAvailable(Exception):
    """The consumer could not run (lpd lacks the feature yet): reported as a row."""


_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """[(name, {label: value}, value)] of a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line) if line and not line.startswith("#") else None
        if m:
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


# What a consumer has accounted for. seen: tcpdump's captured frames; lpd cbpf's frames
# copied to its ring; lpd ebpf's frames counted by its program (the interface receive
# counter: it copies none without a userspace stage). drops: ring drops. rx_bytes: lpd's
# interface receive bytes (None for the others). copied: frames that reached the ring.
Counts = collections.namedtuple("Counts", "seen drops rx_bytes copied")


###############################################################################
# Live: consumers #############################################################
###############################################################################

class Consumer:
    """A capture process in the receiving namespace; counts() -> Counts."""
    name = "?"
    counting = None             # lpd: the engine it counts with (lpd_build_info)
    settle = DRAIN_SETTLE       # s after a fill until every frame is in a retired block

    def __init__(self, pair, cpu, ring_bytes):
        self.pair, self.cpu, self.ring_bytes = pair, cpu, ring_bytes
        self.proc = None

    def argv(self):
        raise NotImplementedError

    def start(self):
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None else []
        self.proc = self.pair.popen(self.pair.ns_b, pin + self.argv(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.new_line = threading.Condition()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.wait_ready()
        return self

    def _read_stderr(self):
        for line in self.proc.stderr:
            with self.new_line:
                self.lines.append(line)
                self.new_line.notify_all()
        with self.new_line:
            self.new_line.notify_all()

    def wait_line(self, pattern, start=0, timeout=10.0):
        """Index of the first stderr line from `start` matching `pattern`, or None."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        with self.new_line:
            while True:
                for i in range(start, len(self.lines)):
                    if rx.search(self.lines[i]):
                        return i
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self.new_line.wait(min(left, 0.1))

    def wait_ready(self):
        raise NotImplementedError

    def stop(self):
        """Stop it; returns peak RSS (KiB) read just before."""
        rss = None
        if self.proc is not None and self.proc.poll() is None:
            rss = peak_rss_kib(self.proc.pid)
        if self.proc is not None:
            netns.stop(self.proc)
        return rss

    def cpu_time(self):
        """(precise CPU s from schedstat, utime+stime s from /proc/<pid>/stat)."""
        return cpu_ns(self.proc.pid) / 1e9, cpu_seconds(self.proc.pid)

    def pids(self):
        """The processes whose CPU shows when its work on the frames is done."""
        return [self.proc.pid]

    def capture_pids(self):
        """The processes that read its ring(s): what a drain stops and continues."""
        return [self.proc.pid]

    def wait_counted(self, before, expected, timeout=COUNT_TIMEOUT, field="seen"):
        """Poll counts() until `field` + drops since `before` reach `expected`; the last
        counts. field 'copied': what reached the ring (a drain), not what was counted."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.counts()
            got = getattr(now, field) - getattr(before, field) + now.drops - before.drops
            if got >= expected or time.monotonic() > deadline:
                return now
            time.sleep(COUNT_POLL)


class NoCapture(Consumer):
    """No consumer at all: the generator, the veth and the sink alone, the floor every
    system-wide CPU figure is read against. 'seen' is what the veth delivered."""
    name = "no capture (floor)"

    def __init__(self, pair):
        super().__init__(pair, None, 0)

    def start(self):
        return self

    def stop(self):
        return None

    def cpu_time(self):
        return 0.0, 0.0

    def pids(self):
        return []

    def counts(self):
        rx = netns.link_stats(self.pair.ns_b, self.pair.if_b)["rx_packets"]
        return Counts(rx, 0, None, 0)


class Tcpdump(Consumer):
    name = "tcpdump"

    def argv(self):
        return ["tcpdump", "-i", self.pair.if_b, "-n", "-w", "/dev/null",
                "-B", str(self.ring_bytes // 1024)]

    def wait_ready(self):
        if self.wait_line("listening on") is None:
            raise NotAvailable("tcpdump did not start: " + "".join(self.lines[-3:]).strip())

    STATS = re.compile(r"(\d+) packets captured\D+(\d+) packets received by filter\D+"
                       r"(\d+) packets dropped by kernel")

    def counts(self):
        """SIGUSR1 makes tcpdump print its (cumulative) counters on stderr."""
        with self.new_line:
            start = len(self.lines)
        os.kill(self.proc.pid, signal.SIGUSR1)
        if self.wait_line("dropped by kernel", start, timeout=3) is None:
            raise RuntimeError("tcpdump did not answer SIGUSR1")
        with self.new_line:
            text = "".join(self.lines[start:])
        m = self.STATS.findall(text)[-1]
        return Counts(int(m[0]), int(m[2]), None, int(m[0]))


class Lpd(Consumer):
    """lpd in the receiving namespace, under prlimit --as. engine: its --engine (None:
    lpd's default, auto); the name is 'lpd ENGINE' + `what` (default: ' +10 rules'
    with a rules file) unless `label` gives it whole."""
    name = "lpd"

    @property
    def settle(self):
        return LPD_RETIRE_MS * LPD_SETTLE_RETIRES / 1000

    def __init__(self, pair, cpu, ring_bytes, rules_file=None, extra=(), label=None,
                 local_nets=LIVE_LOCAL_NETS, engine=None, what=None):
        super().__init__(pair, cpu, ring_bytes)
        self.rules_file, self.local_nets, self.engine = rules_file, local_nets, engine
        self.extra = (["--engine", engine] if engine else []) + list(extra)
        if label is None:
            what = (" +10 rules" if rules_file else "") if what is None else what
            label = f"lpd {engine}{what}" if engine else f"lpd{what}"
        self.name = label

    def argv(self):
        argv = prlimit_argv(LPD_AS_LIMIT) + [sys.executable, LPD, "-i", self.pair.if_b]
        for net in self.local_nets:
            argv += ["--local-net", net]
        argv += ["--web.listen-address", f"127.0.0.1:{LPD_PORT}", "--mapping-url", "none"]
        if self.ring_bytes != DEFAULT_RING:
            argv += ["-b", str(self.ring_bytes)]
        if self.rules_file:
            argv += ["-f", self.rules_file, "-u", self.rules_file + ".sock"]
        return argv + self.extra

    def wait_ready(self):
        if self.wait_line("capturing on", timeout=20) is None:
            self.proc.poll()
            said = [line.strip() for line in self.lines if line.strip()]
            # lpd's errors are one line: the last it wrote
            raise NotAvailable(said[-1] if said else f"lpd exited {self.proc.returncode}")
        info = [labels for name, labels, _ in self.samples() if name == "lpd_build_info"]
        self.counting = info[0].get("engine") if info else None

    def samples(self):
        status, body = netns.http_get(self.pair.ns_b, "127.0.0.1", LPD_PORT, "/metrics")
        return parse_metrics(body.decode())

    def metrics(self):
        """Every series' value summed over its labels, by name."""
        values = {}
        for name, _, value in self.samples():
            values[name] = values.get(name, 0) + value
        return values

    def counts(self):
        m = self.metrics()
        copied = int(m.get("lpd_capture_packets_total", 0))
        seen = int(m.get("lpd_interface_receive_packets_total", 0)) \
            if self.counting == "ebpf" else copied
        return Counts(seen, int(m.get("lpd_capture_drops_total", 0)),
                      int(m.get("lpd_interface_receive_bytes_total", 0)), copied)

    def accounted(self):
        """(frames received that lpd accounted for, ring drops): its interface receive
        counter, whichever engine counts."""
        m = self.metrics()
        return (int(m.get("lpd_interface_receive_packets_total", 0)),
                int(m.get("lpd_capture_drops_total", 0)))


LPD = LPD_PATH


def auto_engine(pair, extra=(), local_nets=LIVE_LOCAL_NETS, rules_file=None):
    """What lpd's default, --engine auto, picks for these options: its start-up line's
    '(engine ...)' part."""
    c = Lpd(pair, None, DEFAULT_RING, rules_file, extra=extra, local_nets=local_nets)
    try:
        c.start()
        m = re.search(r"\((engine [^)]*)\)", "".join(c.lines))
        return m.group(1) if m else f"engine {c.counting}"
    except NotAvailable as e:
        return f"not available: {e}"
    finally:
        c.stop()


###############################################################################
# Live: generators ############################################################
###############################################################################

def trafgen_bytes(data):
    return ", ".join(f"0x{b:02x}" for b in data)


class Trafgen:
    """trafgen (netsniff-ng) in namespace A sending UDP frames of one size to B.

    Two frames round robin, IPv4 and IPv6 (10.199.0.1 -> .2, fd00:199::1 -> ::2, UDP port
    9 where B's sink holds a socket), written to a config file as raw bytes.
    """

    def __init__(self, pair, frame_size, workdir, flows=1):
        self.pair = pair
        p = pair
        # flows > 1: that many source ports, so a fanout hash spreads them over workers
        frames = [netns.udp_frame(p.mac_a, p.mac_b, src, dst, frame_size, sport=WORKER_SPORT0 + i)
                  for i in range(flows) for src, dst in ((p.ip4_a, p.ip4_b), (p.ip6_a, p.ip6_b))] \
            if flows > 1 else [netns.udp_frame(p.mac_a, p.mac_b, p.ip4_a, p.ip4_b, frame_size),
                               netns.udp_frame(p.mac_a, p.mac_b, p.ip6_a, p.ip6_b, frame_size)]
        self.conf = os.path.join(workdir, f"trafgen-{frame_size}-{flows}.cfg")
        self.write(["{ " + trafgen_bytes(fr) + " }" for fr in frames])

    def write(self, packets):
        with open(self.conf, "w") as f:
            f.writelines(p + "\n" for p in packets)

    def send(self, count, pps=None):
        """Send `count` frames at `pps` (None: top speed); (frames sent, seconds)."""
        argv = ["trafgen", "-o", self.pair.if_a, "-i", self.conf, "-n", str(count), "-P", "1",
                "--no-sock-mem", "--notouch-irq"]
        if pps:
            argv += ["-b", f"{pps}pps"]
        t0 = time.monotonic()
        cp = netns.run(self.pair.ns_a, argv, timeout=count / (pps or 100_000) + 30)
        secs = time.monotonic() - t0
        out = cp.stdout + cp.stderr
        m = re.search(r"(\d+) packets outgoing", out)
        t = re.search(r"(\d+) sec, (\d+) usec on CPU", out)     # its worker's own clock
        if t:
            secs = int(t.group(1)) + int(t.group(2)) / 1e6
        return (int(m.group(1)) if m else count), secs


def mix_http_steps():
    """The frames of one HTTP/1.1 connection of the mix, client first: (from client,
    trafgen TCP flags, seq, ack, payload): handshake, one GET, its answer (headers and a
    MIX_HTTP_BODY-byte body by Content-Length, one segment), the client's ACK, FINs both
    ways, the last ACK."""
    req = (f"GET /bench/item HTTP/1.1\r\nHost: {HTTP_SERVER}\r\nUser-Agent: lpd-bench/1\r\n"
           "Accept: */*\r\n\r\n").encode()
    resp = (f"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {MIX_HTTP_BODY}"
            "\r\n\r\n").encode() + b"x" * MIX_HTTP_BODY
    c, s = MIX_CLIENT_ISN, MIX_SERVER_ISN
    c1, s1 = c + 1 + len(req), s + 1 + len(resp)         # after the request / the answer
    return [(True, "syn", c, 0, b""), (False, "syn, ack", s, c + 1, b""),
            (True, "ack", c + 1, s + 1, b""), (True, "psh, ack", c + 1, s + 1, req),
            (False, "psh, ack", s + 1, c1, resp), (True, "ack", c1, s1, b""),
            (True, "fin, ack", c1, s1, b""), (False, "fin, ack", s1, c1 + 1, b""),
            (True, "ack", c1 + 1, s1 + 1, b"")]


class MixTrafgen(Trafgen):
    """trafgen sending the every-stage mix: cycles of MIX_CYCLE frames, each one whole
    HTTP/1.1 connection (mix_http_steps, IPv4) between a client in HTTP_CLIENT_NET and
    HTTP_SERVER port 80, one frame every MIX_SPACING, between the default line's 64-byte
    UDP frames A -> B (IPv4 and IPv6 in turn). trafgen sends a config's packets in order,
    so the dinc() of the client port in every HTTP packet moves in step: each cycle is a
    new connection. Both directions come from A to B's MAC; B's kernel drops them (the
    addresses are not its own, it does not forward), so no answer of its own (a reset
    from a closed port 80) disturbs the connections. Each send() writes the config with a
    new client address: no connection repeats within one consumer's runs."""

    def __init__(self, pair, workdir):
        self.pair, self.runs, self.requests = pair, 0, 0
        self.conf = os.path.join(workdir, "trafgen-mix.cfg")
        self.steps = mix_http_steps()
        self.cycle = len(self.steps) * MIX_SPACING
        p = pair
        self.udp = ["{ " + trafgen_bytes(netns.udp_frame(p.mac_a, p.mac_b, src, dst, 64)) + " }"
                    for src, dst in ((p.ip4_a, p.ip4_b), (p.ip6_a, p.ip6_b))]
        import ipaddress
        self.clients = ipaddress.ip_network(HTTP_CLIENT_NET)
        # the answer is the step the HTTP stage finishes a request at
        self.answer = next(i for i, st in enumerate(self.steps) if not st[0] and st[4])

    def http_packet(self, client, step):
        from_client, flags, seq, ack, payload = step
        port = f"dinc({MIX_CLIENT_PORTS[0]}, {MIX_CLIENT_PORTS[1]})"
        src, dst, sp, dp = (client, HTTP_SERVER, port, 80) if from_client else \
            (HTTP_SERVER, client, 80, port)
        mac_src, mac_dst = self.pair.mac_a, self.pair.mac_b
        body = (", " + trafgen_bytes(payload)) if payload else ""
        return (f"{{ eth(da={mac_dst}, sa={mac_src}), ipv4(sa={src}, da={dst}, ttl=64, df), "
                f"tcp(sp={sp}, dp={dp}, {flags}, seq={seq}, aseq={ack}, win=64240){body} }}")

    def send(self, count, pps=None):
        if count // self.cycle + 1 > MIX_CLIENT_PORTS[1] - MIX_CLIENT_PORTS[0]:
            raise ValueError(f"{count} frames: more connections than client ports")
        client = self.clients[1 + self.runs % (self.clients.num_addresses - 2)]
        self.runs += 1
        packets, udp = [], 0
        for step in self.steps:
            packets.append(self.http_packet(client, step))
            for _ in range(MIX_SPACING - 1):
                packets.append(self.udp[udp % len(self.udp)])
                udp += 1
        self.write(packets)
        sent, secs = super().send(count, pps)
        self.requests += self.answered(sent)
        return sent, secs

    def answered(self, sent):
        """Requests whose answer is among the first `sent` frames."""
        at = self.answer * MIX_SPACING
        return (sent - at - 1) // self.cycle + 1 if sent > at else 0


class FloodTrafgen(Trafgen):
    """trafgen sending tests/test_flood.py's flood (the SPOOF_* constants): 64-byte UDP
    frames from spoofed sources inside SPOOF_LOCAL_NETS to a remote address, the
    sources moved on by dinc() in each packet. With legit=True each cycle starts with one
    legitimate frame A -> B (a SPOOF_LEGIT_PAYLOAD-byte datagram to B's sink)."""

    def __init__(self, pair, workdir, legit):
        import math
        if math.gcd(SPOOF_V4_SPAN, SPOOF_V4_FOURTH) != 1:
            raise ValueError("SPOOF_V4_SPAN and SPOOF_V4_FOURTH must be coprime")
        self.pair, self.legit = pair, legit
        self.conf = os.path.join(workdir, f"trafgen-flood-{int(legit)}.cfg")
        p = pair
        eth = f"eth(da={p.mac_b}, sa={p.mac_a})"
        udp = "udp(sp=40000, dp=9)"
        packets = []
        self.legit_size = netns.frame_len(SPOOF_LEGIT_PAYLOAD)
        if legit:
            packets.append("{ " + trafgen_bytes(netns.udp_frame(p.mac_a, p.mac_b, p.ip4_a, p.ip4_b,
                                                                 self.legit_size)) + " }")
        # IPv6 packets before the IPv4 ones: trafgen 0.6.8 fails ('xfree: NULL pointer
        # given as argument') on an ipv6() packet after two ipv4() ones
        net6 = SPOOF_LOCAL_NETS[1].split("::")[0]             # fd00:199:1
        for j in range(SPOOF_V6_DEFS):
            lo = (j << 16) + 1                                 # the last 32 bits
            packets.append(
                f"{{ {eth}, ipv6(sa={net6}::{j:x}:1, da=2001:db8::1, hl=64, "
                f"sa=dinc({lo}, {lo + SPOOF_V6_SPAN - 1})), "
                f"{udp}, fill(0, {SPOOF_FRAME - netns.frame_len(0, ipv6=True)}) }}")
        net4 = SPOOF_LOCAL_NETS[0].split(".")[:2]            # 10.199
        for j in range(SPOOF_V4_DEFS):
            lo = 1 + j * SPOOF_V4_SPAN
            packets.append(
                f"{{ {eth}, ipv4(sa={'.'.join(net4)}.{lo}.1, da=192.0.2.1, ttl=64, df, "
                f"sa[2]=dinc({lo}, {lo + SPOOF_V4_SPAN - 1}), sa[3]=dinc(1, {SPOOF_V4_FOURTH})), "
                f"{udp}, fill(0, {SPOOF_FRAME - netns.frame_len(0)}) }}")
        self.cycle = len(packets)
        self.sources = (SPOOF_V4_DEFS * SPOOF_V4_SPAN * SPOOF_V4_FOURTH
                        + SPOOF_V6_DEFS * SPOOF_V6_SPAN)
        # frames that send every IPv4 source once (and every IPv6 one at least once)
        self.one_pass = self.cycle * max(SPOOF_V4_SPAN * SPOOF_V4_FOURTH, SPOOF_V6_SPAN)
        self.write(packets)

    def legit_frames(self, sent):
        """Legitimate frames among the first `sent` (each cycle's first)."""
        return -(-sent // self.cycle) if self.legit else 0


###############################################################################
# Live: series ################################################################
###############################################################################

PINNINGS = {
    # name: (consumer CPU, rps_cpus mask on the receiving veth)
    "split": (1, "0"),            # generator CPU 0, consumer CPU 1, receive path on CPU 0
    "shared": (GENERATOR_CPU, format(1 << GENERATOR_CPU, "x")),   # all on one core
}


def set_rps(pair, mask):
    """Receive packet steering of the receiving veth onto the CPUs in hex `mask` (0: off)."""
    netns.run(pair.ns_b, ["sh", "-c", f"for q in /sys/class/net/{pair.if_b}/queues/rx-*/rps_cpus;"
                                      f" do echo {mask} > $q; done"])


def wait_link_quiet(pair, quiet=0.05, timeout=3.0):
    last = netns.link_stats(pair.ns_b, pair.if_b)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = netns.link_stats(pair.ns_b, pair.if_b)
        if now == last:
            return now
        last = now
    return last


def start_or_say(consumer, table, label=None):
    """Start `consumer`; False (and a 'not available: <why>' row) if it cannot run."""
    try:
        consumer.start()
        return True
    except NotAvailable as e:
        consumer.stop()
        table.say(label or consumer.name, f"not available: {e}")
        return False


def run_rung(pair, gen, consumer, pps, frames):
    v0 = netns.link_stats(pair.ns_b, pair.if_b)
    c0 = consumer.counts()
    cpu0 = consumer.cpu_time()
    b0 = busy_jiffies()
    sent, secs = gen.send(frames, pps)
    v1 = wait_link_quiet(pair)
    busy = (busy_until_idle(consumer.pids()) - b0) / CLK_TCK
    veth = v1["rx_packets"] - v0["rx_packets"]
    c1 = consumer.wait_counted(c0, veth)
    cpu1 = consumer.cpu_time()
    cpu, cpu_ticks = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    seen, drops = c1.seen - c0.seen, c1.drops - c0.drops
    row = {"consumer": consumer.name, "target pps": pps or "top", "sent pps": sent / secs,
           "sent": sent, "veth rx": veth, "seen": seen, "drops": drops,
           "seen/sent": seen / sent if sent else None, "seen/veth": seen / veth if veth else None,
           "loss %": 100.0 * (1 - seen / sent) if sent else None,
           "cpu s/M": cpu / seen * 1e6 if seen else None, "_cpu": cpu,
           "cpu s/M (stat)": cpu_ticks / seen * 1e6 if seen else None,
           "sys ns/frame": busy / sent * 1e9 if sent else None, "_busy": busy}
    if consumer.counting:
        row["engine"] = consumer.counting
    if c1.rx_bytes is not None:
        row["bytes = veth"] = (c1.rx_bytes - c0.rx_bytes) == v1["rx_bytes"] - v0["rx_bytes"]
    return row


def run_series(pair, gen, consumer, table, frames):
    """One consumer over the whole ladder; appends rows, returns the series summary."""
    if not start_or_say(consumer, table):
        return None
    rows = []
    try:
        for pps in LADDER_PPS:
            rows.append(table.add(**run_rung(pair, gen, consumer, pps, frames)))
    finally:
        rss = consumer.stop()
    ok = [r for r in rows if r["loss %"] is not None and r["loss %"] < LOSS_OK * 100]
    seen, sent = sum(r["seen"] for r in rows), sum(r["sent"] for r in rows)
    summary = {"consumer": consumer.name, "zero-loss pps": max((r["sent pps"] for r in ok), default=0),
               "cpu s/M": sum(r["_cpu"] for r in rows) / seen * 1e6 if seen else None,
               "sys ns/frame": sum(r["_busy"] for r in rows) / sent * 1e9 if sent else None,
               "peak RSS MiB": rss / 1024 if rss else None,
               "bytes = veth": all(r["bytes = veth"] for r in ok)
               if ok and "bytes = veth" in ok[0] else None, "_rows": rows}
    for r in rows:
        r["peak RSS MiB"] = summary["peak RSS MiB"]
    return summary


def above_floor(rows, floor_rows, key="target pps"):
    """Each row's 'above floor': its sys ns/frame minus the floor row's of the same rung."""
    floor = {r[key]: r.get("sys ns/frame") for r in floor_rows}
    for r in rows:
        f = floor.get(r[key])
        if f is not None and r.get("sys ns/frame") is not None:
            r["above floor"] = r["sys ns/frame"] - f


def ring_left_empty(pair, gen, consumer):
    """For an lpd counting with ebpf: send DRAIN_PROBE_FRAMES; (frames it counted, veth rx)
    when none of them reached its ring (nothing there to drain), else None."""
    if consumer.counting != "ebpf":
        return None
    c0, v0 = consumer.counts(), netns.link_stats(pair.ns_b, pair.if_b)
    gen.send(DRAIN_PROBE_FRAMES)
    rx = wait_link_quiet(pair)["rx_packets"] - v0["rx_packets"]
    c1 = consumer.wait_counted(c0, rx)
    if c1.copied != c0.copied or c1.drops != c0.drops:
        return None
    return c1.seen - c0.seen, rx


def say_nothing_to_drain(table, consumer, probe, **row):
    counted, rx = probe
    return table.say(consumer.name, f"n/a: its ebpf program counted {counted:,} of {rx:,} probe "
                                    "frames in the kernel and copied none to the ring: nothing "
                                    "to drain (its cost: system-wide CPU tables)", **row)


def drain_capacity(pair, gen, consumer, table):
    """Fill the ring while `consumer` is stopped, then time how fast it empties it: every
    capture process (several with --workers) stopped while the rings fill, all continued
    at once; wall time until the last is idle, CPU summed. An lpd whose ebpf program
    copies nothing gets an n/a row instead."""
    if not start_or_say(consumer, table):
        return None
    try:
        pids = consumer.capture_pids()
        probe = ring_left_empty(pair, gen, consumer)
        if probe:
            return say_nothing_to_drain(table, consumer, probe)
        c0 = consumer.counts()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        v0 = netns.link_stats(pair.ns_b, pair.if_b)
        sent, _ = gen.send(DRAIN_FRAMES)
        v1 = wait_link_quiet(pair)
        time.sleep(consumer.settle)
        ns0, t0 = [cpu_ns(pid) for pid in pids], time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        last = wait_all_idle(pids, ns0, t0)
        t1, cpu = max(t for _, t in last), sum(n - n0 for (n, _), n0 in zip(last, ns0)) / 1e9
        c1 = consumer.wait_counted(c0, v1["rx_packets"] - v0["rx_packets"], field="copied")
        seen, drops = c1.copied - c0.copied, c1.drops - c0.drops
        row = table.add(consumer=consumer.name, frames=sent, **{
            "veth rx": v1["rx_packets"] - v0["rx_packets"], "seen": seen, "drops": drops,
            "drain s": t1 - t0, "cpu s": cpu,
            "Mfps wall": seen / (t1 - t0) / 1e6 if t1 > t0 else None,
            "Mfps/core": seen / cpu / 1e6 if cpu else None})
        if consumer.counting:
            row["engine"] = consumer.counting
        if "--connections" in getattr(consumer, "extra", ()):
            row["conns open"] = int(consumer.metrics().get("lpd_connections", 0))
        if "--http" in getattr(consumer, "extra", ()):
            row["http reqs"] = int(consumer.metrics().get(
                "http_server_request_duration_seconds_count", 0))
    finally:
        consumer.stop()
    return row


class LpdWorkers(Lpd):
    """lpd --workers N --workers-pin: a worker per CPU; N = 1 is the single process,
    pinned like the other consumers."""

    def __init__(self, pair, n, ring_bytes, rules_file=None, engine=None):
        super().__init__(pair, 1 if n == 1 else None, ring_bytes, rules_file,
                         extra=["--workers", str(n), "--workers-pin"] if n > 1 else [],
                         engine=engine,
                         what=f"{' +10 rules' if rules_file else ''}, {n} worker{'s' * (n > 1)}")
        self.n = n

    def capture_pids(self):
        if self.n == 1:
            return [self.proc.pid]
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout.split()
        return [int(x) for x in out]

    def wait_ready(self):
        super().wait_ready()
        pids = self.capture_pids()
        if len(pids) != self.n:
            raise NotAvailable(f"{len(pids)} capture processes, wanted {self.n}")


def wait_all_idle(pids, ns0, t0, timeout=20.0):
    """[(cpu ns, time of its last progress)] per pid, once every one is idle."""
    last = [(n, t0) for n in ns0]
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        time.sleep(0.005)
        t = time.monotonic()
        for i, pid in enumerate(pids):
            now = cpu_ns(pid)
            if now != last[i][0]:
                last[i] = (now, t)
        if all(n != n0 and t - lt >= DRAIN_IDLE for (n, lt), n0 in zip(last, ns0)):
            break
    return last


def accounted(consumer):
    """(frames received a consumer has accounted for, frames it lost): lpd's interface
    counters (either engine) and ring drops, tcpdump's captured and dropped."""
    if consumer is None:
        return 0, 0
    if isinstance(consumer, Lpd):
        return consumer.accounted()
    c = consumer.counts()
    return c.seen, c.drops


def wait_accounted(consumer, before, rx):
    """Poll accounted() until the consumer has accounted for or lost `rx` frames since
    `before`, or its count stops moving for SYSCPU_STALL s, or SYSCPU_COUNT_TIMEOUT."""
    if consumer is None:
        return before
    return settle(lambda: accounted(consumer),
                  lambda now: now[0] + now[1] - before[0] - before[1] >= rx,
                  SYSCPU_COUNT_TIMEOUT, SYSCPU_STALL, SYSCPU_POLL)


def http_requests(consumer):
    return int(consumer.metrics().get("http_server_request_duration_seconds_count", 0))


def system_cpu(pair, gen, consumer, table, label, frames=None):
    """System-wide CPU while `frames` (default SYSCPU_FRAMES) frames are sent and the
    consumer works on them (until its CPU is idle), best of SYSCPU_REPEAT runs: the
    generator, the veth and the sink cost the same with any consumer, so the 'no capture'
    line (consumer None) is the floor the others are read against. Whether it accounted
    for them is read once, after the last run (over the warm-up and every run: waiting
    for a publication between runs would only add time). With --http on a MixTrafgen:
    the requests lpd finished against those sent."""
    frames = frames or SYSCPU_FRAMES
    if consumer is not None and not start_or_say(consumer, table, label):
        return None
    pids = consumer.pids() if consumer is not None else []
    http = isinstance(gen, MixTrafgen) and "--http" in getattr(consumer, "extra", ())
    try:
        base_rx, base = netns.link_stats(pair.ns_b, pair.if_b)["rx_packets"], accounted(consumer)
        asked0, done0 = (gen.requests, http_requests(consumer)) if http else (0, 0)
        gen.send(SYSCPU_WARMUP)
        wait_link_quiet(pair)
        busy_until_idle(pids, SYSCPU_COUNT_TIMEOUT)
        runs = []
        for _ in range(SYSCPU_REPEAT):
            v0 = netns.link_stats(pair.ns_b, pair.if_b)
            b0 = busy_jiffies()
            gen.send(frames)
            v1 = wait_link_quiet(pair)
            b1 = busy_until_idle(pids, SYSCPU_COUNT_TIMEOUT)
            runs.append(((b1 - b0) / CLK_TCK, v1["rx_packets"] - v0["rx_packets"]))
        received = v1["rx_packets"] - base_rx
        c1 = wait_accounted(consumer, base, received)
        busy, rx = min(runs)
        row = table.add(consumer=label, frames=rx, received=received, **{
            "counted": c1[0] - base[0] if consumer else received, "lost": c1[1] - base[1],
            "busy s": busy, "ns/frame": busy / rx * 1e9 if rx else None})
        if http:        # finished at the answer's last byte, published each --interval
            asked = gen.requests - asked0
            deadline = time.monotonic() + COUNT_TIMEOUT
            while http_requests(consumer) - done0 < asked and time.monotonic() < deadline:
                time.sleep(SYSCPU_POLL)
            row["http reqs"] = f"{http_requests(consumer) - done0:,}/{asked:,}"
        if consumer is not None and consumer.counting:
            row["engine"] = consumer.counting
        return row
    finally:
        if consumer is not None:
            consumer.stop()


FLOOR_AGAIN = "no capture, again"


def read_against_floor(rows, floor_label="no capture", ref_label="tcpdump -w /dev/null"):
    """'above floor' and '÷ tcpdump' of each row of a system-wide CPU series. The floor
    is the lower of the series' first and (where it has one) last 'no capture' runs: a
    run that came first once measured twice its later self, above tcpdump's whole cost."""
    floors = [r for r in (rows.get(floor_label), rows.get(FLOOR_AGAIN)) if r and r.get("ns/frame")]
    floor, ref = min(floors, key=lambda r: r["ns/frame"], default=None), rows.get(ref_label)
    for label, row in rows.items():
        if row and floor and row is not floor and row.get("ns/frame"):
            row["above floor"] = row["ns/frame"] - floor["ns/frame"]
            if ref and (ref.get("above floor") or 0) > 0 and row is not ref:
                row["÷ tcpdump"] = row["above floor"] / ref["above floor"]


# --- the spoofed flood on the ladder ---------------------------------------------

def flood_view(consumer, pair):
    """The figures a flood rung compares, cumulative: lpd's per-address counters of the
    legitimate hosts (B's receive, A's transmit), its interface totals, table figures
    and ring drops."""
    v = collections.Counter()
    for name, labels, value in consumer.samples():
        ip = labels.get("local_ip")
        if ip == pair.ip4_b and name in ("lpd_receive_packets_total", "lpd_receive_bytes_total"):
            v["B " + name[4:-6]] += value
        elif ip == pair.ip4_a and name in ("lpd_transmit_packets_total",
                                           "lpd_transmit_bytes_total"):
            v["A " + name[4:-6]] += value
        elif name.startswith("lpd_interface_") and name.endswith("_total"):
            v[name[14:-6].replace("_", " ").replace("receive", "rx").replace("transmit", "tx")] \
                += value
        elif name in ("lpd_local_addresses", "lpd_local_evictions_total",
                      "lpd_local_unattributed_packets_total", "lpd_capture_drops_total"):
            v[name] += value
    return dict(v)


def flood_rung(pair, gen, consumer, pps, frames):
    """One rung of flood + legitimate frames: are the legitimate hosts' counts exact and
    the interface totals the veth's? Waits until they are, or stop moving."""
    v0, f0 = netns.link_stats(pair.ns_b, pair.if_b), flood_view(consumer, pair)
    sent, secs = gen.send(frames, pps)
    v1 = wait_link_quiet(pair)
    veth = {k: v1[k] - v0[k] for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")}
    legit = gen.legit_frames(sent)
    iface = {"rx packets": veth["rx_packets"], "rx bytes": veth["rx_bytes"],
             "tx packets": veth["tx_packets"], "tx bytes": veth["tx_bytes"]}
    hosts = {"B receive_packets": legit, "B receive_bytes": legit * gen.legit_size,
             "A transmit_packets": legit, "A transmit_bytes": legit * gen.legit_size}
    want = {**iface, **hosts}

    def delta():
        now = flood_view(consumer, pair)
        return {k: now.get(k, 0) - f0.get(k, 0) for k in set(now) | set(f0)}

    def exact(d):
        return all(d.get(k, 0) == v for k, v in want.items())
    d = settle(delta, exact)
    return {"consumer": consumer.name, "engine": consumer.counting, "target pps": pps or "top",
            "sent pps": sent / secs, "sent": sent, "veth rx": veth["rx_packets"],
            "legit sent": legit, "legit counted": int(d.get("B receive_packets", 0)),
            "legit exact": all(d.get(k, 0) == v for k, v in hosts.items()),
            "iface = veth": all(d.get(k, 0) == v for k, v in iface.items()),
            "unattributed": d.get("lpd_local_unattributed_packets_total"),
            "local addrs": int(flood_view(consumer, pair).get("lpd_local_addresses", 0)),
            "evictions": int(d.get("lpd_local_evictions_total", 0)),
            "drops": int(d.get("lpd_capture_drops_total", 0)), "exact": exact(d)}


def settle(read, done, timeout=SPOOF_SETTLE_TIMEOUT, stable=SPOOF_STABLE,
           poll=SPOOF_INTERVAL / 2):
    """read() until done(value), or until it has not changed for `stable` s (final, not
    done), or `timeout` s; the last value."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        value = read()
        t = time.monotonic()
        if done(value) or t > deadline:
            return value
        if value != last:
            last, since = value, t
        elif t - since >= stable:
            return value
        time.sleep(poll)


def flood_series(pair, workdir, consumer, table):
    """The ladder under tests/test_flood.py's flood, for one consumer: the flood alone
    first (it fills lpd's address table), then flood + legitimate frames (the legitimate
    hosts appear after the flood), SPOOF_NEWCOMER_WAIT, then the rungs. Returns the
    series summary."""
    if not start_or_say(consumer, table):
        return None
    flood, mixed = FloodTrafgen(pair, workdir, legit=False), FloodTrafgen(pair, workdir, legit=True)
    rows = []
    try:
        flood.send(flood.one_pass)
        wait_link_quiet(pair)
        mixed.send(SPOOF_WARMUP)
        time.sleep(SPOOF_NEWCOMER_WAIT)
        for pps in LADDER_PPS:
            rows.append(table.add(**flood_rung(pair, mixed, consumer, pps, RUNG_FRAMES)))
    finally:
        rss = consumer.stop()
    ok = [r for r in rows if r["exact"]]
    return {"consumer": consumer.name, "engine": consumer.counting,
            "zero-loss pps": max((r["sent pps"] for r in ok), default=0),
            "rungs exact": f"{len(ok)}/{len(rows)}", "peak RSS MiB": rss / 1024 if rss else None}


def lpd_offers(flag):
    cp = subprocess.run([sys.executable, LPD, "-h"], capture_output=True, text=True, timeout=30)
    return flag in cp.stdout


###############################################################################
# Live: the tables ############################################################
###############################################################################

LIVE_SERIES = ("ladder", "drain", "workers", "syscpu", "mix", "flood")
ENGINE_NOTE = ("lpd ebpf / lpd cbpf: --engine ebpf / cbpf (lpd's default, auto, picks: see the "
               "line above the tables); lpd ebpf counts in the kernel and copies no frame to\n"
               "its ring, so its 'seen' is its interface receive counter (what its program "
               "counted) and its cost is the receive path's: sys ns/frame, not cpu s/M.")


def live_ladder(pair, workdir, rules_file, ratios_in):
    ladder = Table("Live: rate ladder (trafgen -> veth -> consumer)",
                   ["consumer", "frame", "pinning", "target pps", "sent pps", "sent", "veth rx",
                    "seen", "drops", "loss %", "cpu s/M", "sys ns/frame", "above floor",
                    "peak RSS MiB", "bytes = veth"],
                   note=f"{RUNG_FRAMES:,} frames per rung (IPv4+IPv6 UDP, round robin); "
                        f"ring {DEFAULT_RING >> 20} MiB for each (tcpdump -B {DEFAULT_RING >> 10});\n"
                        "pinning split: trafgen CPU 0, consumer CPU 1; shared: all on CPU 0 with RPS "
                        "onto it.\ncpu s/M: consumer CPU seconds per million frames seen, all threads "
                        "(schedstat run time: the utime+stime of /proc/<pid>/stat\nwithout its 10 ms "
                        "ticks; the tick-based figure is in the JSON); sys ns/frame: every CPU's busy "
                        "time (/proc/stat user+nice+system+irq+softirq+steal)\nper frame sent, from "
                        "the rung's start until the consumer's CPU is idle (its work on the frames "
                        f"done; idle: no progress for {DRAIN_IDLE:g} s); above floor: minus the\n"
                        "no-capture line's at the same rung (trafgen, veth, sink; a paced rung "
                        "lasts longer, so other load on the machine weighs more); bytes = veth: "
                        "lpd's\ninterface receive bytes equal the veth's rx_bytes.\n" + ENGINE_NOTE)
    summary = Table("Live: summary per series", ["consumer", "frame", "pinning", "zero-loss pps",
                                                  "cpu s/M", "sys ns/frame", "above floor",
                                                  "peak RSS MiB", "bytes = veth"],
                    note=f"zero-loss pps: highest rung with < {LOSS_OK * 100:g} % loss (lpd ebpf: "
                         "counted by its program against sent); cpu s/M and sys ns/frame over "
                         "all rungs.")
    gens = {size: Trafgen(pair, size, workdir) for size in FRAME_SIZES}
    sums = {}
    for size, pinning in [(64, "split"), (64, "shared"), (1400, "split")]:
        cpu, rps = PINNINGS[pinning]
        set_rps(pair, rps)
        consumers = [NoCapture(pair), Tcpdump(pair, cpu, DEFAULT_RING)]
        consumers += [Lpd(pair, cpu, DEFAULT_RING, engine=e) for e in ENGINES]
        consumers += [Lpd(pair, cpu, DEFAULT_RING, rules_file, engine=e) for e in ENGINES]
        plan = {}
        for c in consumers:
            start = len(ladder.rows)
            s = run_series(pair, gens[size], c, ladder, RUNG_FRAMES)
            for r in ladder.rows[start:]:
                r.update(frame=size, pinning=pinning)
            if s:
                plan[c.name] = s
        floor = plan.get(NoCapture.name)
        for name, s in plan.items():
            if floor and s is not floor:
                above_floor(s["_rows"], floor["_rows"])
                if s["sys ns/frame"] is not None and floor["sys ns/frame"] is not None:
                    s["above floor"] = s["sys ns/frame"] - floor["sys ns/frame"]
            summary.add(frame=size, pinning=pinning, **{k: v for k, v in s.items() if k != "_rows"})
            sums[(size, pinning, name)] = s
        print(f"   ... {size}-byte frames, {pinning}: done", file=sys.stderr, flush=True)
    ratios_in["ladder"] = sums
    return ladder, summary


def live_drain(pair, workdir, rules_file, flags, ratios_in):
    drain = Table("Live: capacity - ring filled while the consumer is SIGSTOPped, then drained",
                  ["consumer", "pinning", "frames", "veth rx", "seen", "drops", "drain s", "cpu s",
                   "Mfps wall", "Mfps/core", "conns open", "http reqs"],
                  note=f"64-byte frames; ring {DRAIN_RING >> 20} MiB for all; seen: frames that "
                       "reached the ring; Mfps/core = seen / consumer CPU seconds (schedstat) after "
                       "SIGCONT.\nA ring consumer only: an lpd ebpf that copies none of "
                       f"{DRAIN_PROBE_FRAMES:,} probe frames to its ring (it counts in the kernel) "
                       "has nothing to drain and gets an n/a line;\nwith --connections it copies "
                       "a UDP direction's first frames and counts the rest in the kernel "
                       "(FlowOffload): 'seen' is the few it copied.\nlpd, B local: --local-net "
                       f"{' '.join(LIVE_REMOTE_LOCAL_NETS)} (trafgen's source, A, is remote: 2 "
                       "remotes); lpd --remote: the same with --remote.\nlpd --connections: the "
                       "default lpd line's options with --connections. trafgen's frames are UDP (A "
                       "-> B port 9, no answer), so the stage\ntracks 2 one-way UDP flows (IPv4, "
                       "IPv6): its per-frame parse, lookup and counts, no TCP state machine; conns "
                       "open: lpd_connections after the drain.\nlpd --http: the default lpd line's "
                       "options with --http (its default --http-ports). trafgen's UDP frames are "
                       "not HTTP: the line measures the stage's\nper-frame cost on non-HTTP traffic "
                       "(each frame's headers parsed, then skipped: no reassembly) and the kernel "
                       "program's per-branch cut (the frames\nfail its HTTP-ports branch, so they "
                       "reach the ring cut to the snaplen as on the default line; the program runs "
                       "in the receive path while lpd\nis stopped, so its own cost is not in lpd's "
                       "cpu s); http reqs: requests in http_server_request_duration_seconds after "
                       "the drain (0 expected). Pinning shared: the default and +10 rules lines "
                       "only (a drain runs after the generator stopped: the pinning only moves the "
                       "consumer to CPU 0).\n" + ENGINE_NOTE)
    gen = Trafgen(pair, 64, workdir)
    drains = {}
    for pinning in ("split", "shared"):
        cpu, rps = PINNINGS[pinning]
        set_rps(pair, rps)
        drainers = [Tcpdump(pair, cpu, DRAIN_RING)]
        drainers += [Lpd(pair, cpu, DRAIN_RING, engine=e) for e in ENGINES]
        drainers += [Lpd(pair, cpu, DRAIN_RING, rules_file, engine=e) for e in ENGINES]
        # The stage lines split only: a drain runs after the generator stopped, so the
        # pinning changes little (it only moves the consumer to the other core).
        if flags["--remote"] and pinning == "split":
            # The default line's frames, but local <-> remote: the same lpd without
            # --remote beside it, so the difference is the remote stage alone (cbpf's:
            # ebpf without a stage has nothing to drain, as its line above shows).
            drainers.append(Lpd(pair, cpu, DRAIN_RING, local_nets=LIVE_REMOTE_LOCAL_NETS,
                                engine="cbpf", what=", B local"))
            drainers += [Lpd(pair, cpu, DRAIN_RING, local_nets=LIVE_REMOTE_LOCAL_NETS,
                             extra=["--remote"], engine=e, what=" --remote") for e in ENGINES]
        for stage in ("--connections", "--http"):
            if flags[stage] and pinning == "split":
                # Beside the default lpd line: the same options and frames, plus the stage.
                drainers += [Lpd(pair, cpu, DRAIN_RING, extra=[stage], engine=e, what=" " + stage)
                             for e in ENGINES]
        for c in drainers:
            before = len(drain.rows)
            row = drain_capacity(pair, gen, c, drain)
            for r in drain.rows[before:]:           # its row: figures, n/a or not available
                r["pinning"] = pinning
            if row:
                drains[(pinning, c.name)] = row
        print(f"   ... drain, {pinning}: done", file=sys.stderr, flush=True)
    ratios_in["drain"] = drains
    return (drain,)


def live_workers(pair, workdir, rules_file, ratios_in):
    scale = Table("Live: workers - drain capacity of 1 and 2 capture processes (PACKET_FANOUT)",
                  ["consumer", "frames", "veth rx", "seen", "drops", "drain s", "cpu s",
                   "Mfps wall", "Mfps/core", "2 ÷ 1 wall"],
                  note=f"64-byte frames of {WORKER_FLOWS} UDP flows x IPv4/IPv6 (the fanout hash "
                       f"spreads flows); ring {DRAIN_RING >> 20} MiB per process; every capture "
                       "process SIGSTOPped while the rings fill, then continued at once; drain s: "
                       "until the last is idle;\ncpu s: summed over them. 1 worker = the single "
                       "process on CPU 1; 2 workers: --workers 2 --workers-pin (CPUs 0 and 1). "
                       "The parent (exporters) is not stopped and not counted.\nlpd ebpf: each "
                       "worker's socket runs the program, which copies nothing without a userspace "
                       f"stage: checked with {DRAIN_PROBE_FRAMES:,} probe frames (n/a: nothing to "
                       "drain; rules change nothing there, so once, without).\n" + ENGINE_NOTE)
    set_rps(pair, "0")
    flows = Trafgen(pair, 64, workdir, flows=WORKER_FLOWS)
    for rules in (None, rules_file):
        # ebpf's workers copy nothing with or without rules: its n/a lines once
        for engine in ENGINES if rules is None else ("cbpf",):
            rows = [drain_capacity(pair, flows, LpdWorkers(pair, n, DRAIN_RING, rules, engine),
                                   scale) for n in (1, 2)]
            if all(r and r.get("Mfps wall") for r in rows):
                rows[1]["2 ÷ 1 wall"] = ratio(rows[1]["Mfps wall"], rows[0]["Mfps wall"])
    ref = ratios_in.get("drain", {}).get(("split", "tcpdump"))
    if ref:
        scale.add(consumer="tcpdump (the split drain above)", frames=ref["frames"], **{
            k: ref.get(k) for k in ("veth rx", "seen", "drops", "drain s", "cpu s",
                                    "Mfps wall", "Mfps/core")})
    else:               # this run has no drain series: tcpdump's own, on these flows
        set_rps(pair, PINNINGS["split"][1])
        drain_capacity(pair, flows, Tcpdump(pair, PINNINGS["split"][0], DRAIN_RING), scale)
    return (scale,)


def live_syscpu(pair, workdir, rules_file, flags):
    syscpu = Table("Live: system-wide CPU per frame (/proc/stat), cbpf and ebpf engines beside "
                   "tcpdump",
                   ["consumer", "frames", "received", "counted", "lost", "busy s", "ns/frame",
                    "above floor", "÷ tcpdump"],
                   note=f"trafgen A -> B at top speed, 64-byte UDP (IPv4+IPv6), {SYSCPU_FRAMES:,} "
                        f"frames a run, best of {SYSCPU_REPEAT}; ring {SYSCPU_RING >> 20} MiB for "
                        "every consumer (a run fits: each works on every frame).\nbusy s: every "
                        "CPU's user+nice+system+irq+softirq+steal time from /proc/stat, from the "
                        "run's start until the consumer's CPU is idle (its work on the frames "
                        f"done;\nidle: no progress for {DRAIN_IDLE:g} s); above floor: ns/frame "
                        "minus the 'no capture' line (generator, veth, sink); ÷ tcpdump: that "
                        "against tcpdump's.\nreceived: the veth's frames over the warm-up and "
                        "every run; counted: the consumer's receive count over them (lpd's "
                        "interface counters: the ebpf engine\ncopies no frame to its ring); lost: "
                        "its ring drops (lpd ebpf --remote: copies for the remote stage that did "
                        "not fit). 10 rules: the drain series' rules file.")
    gen = Trafgen(pair, 64, workdir)
    set_rps(pair, "0")
    lines = [("no capture", None), ("tcpdump -w /dev/null", Tcpdump(pair, None, SYSCPU_RING))]
    lines += [(c.name, c) for e in ENGINES for c in (Lpd(pair, None, SYSCPU_RING, engine=e),
                                                     Lpd(pair, None, SYSCPU_RING, rules_file,
                                                         engine=e))]
    if flags["--remote"]:
        # remote addresses in userspace: what the copy of headers costs each engine
        lines += [(c.name, c) for c in (Lpd(pair, None, SYSCPU_RING, engine=e, what=" --remote",
                                            local_nets=LIVE_REMOTE_LOCAL_NETS, extra=["--remote"])
                                        for e in ENGINES)]
    lines.append((FLOOR_AGAIN, None))
    rows = {label: system_cpu(pair, gen, c, syscpu, label) for label, c in lines}
    read_against_floor(rows)
    return (syscpu,)


def live_mix(pair, workdir, rules_file, flags, auto):
    gen = MixTrafgen(pair, workdir)
    mix = Table("Live: system-wide CPU per frame, every stage on, 5 % HTTP (/proc/stat)",
                ["consumer", "frames", "received", "counted", "lost", "http reqs", "busy s",
                 "ns/frame", "above floor", "÷ tcpdump", "target", "met"],
                note=f"trafgen A -> B at top speed, {MIX_FRAMES:,} frames a run, best of "
                     f"{SYSCPU_REPEAT}: cycles of {gen.cycle} frames, one whole HTTP/1.1 "
                     f"connection in every {MIX_SPACING}th frame ({len(gen.steps)} frames: "
                     "handshake, GET, 200 with a\n"
                     f"{MIX_HTTP_BODY}-byte body, ACK, FINs, ACK; IPv4; a client in "
                     f"{HTTP_CLIENT_NET}, server {HTTP_SERVER}:80), the rest 64-byte UDP A -> B "
                     f"(IPv4+IPv6). Local: {', '.join(MIX_LOCAL_NETS)}\n(every frame has a "
                     f"remote end). Ring {SYSCPU_RING >> 20} MiB for every consumer. +10 rules: "
                     "the drain series' rules file; every stage: -f (those 10 rules) "
                     f"{' '.join(EVERY_STAGE)}.\nbusy s, above floor, ÷ tcpdump, received, "
                     "counted, lost: as in the table above; http reqs: requests lpd finished "
                     "(http_server_request_duration_seconds_count) / sent.\ntarget: issue "
                     "24's, against tcpdump's figure above the floor in this run (printed, "
                     "not asserted).\n"
                     f"--engine auto with every stage on picks: {auto.get('every stage on', '?')}. "
                     "A line lpd refuses says why (its one-line error).")
    set_rps(pair, "0")
    lines = [("no capture", None), ("tcpdump -w /dev/null", Tcpdump(pair, None, SYSCPU_RING))]
    if flags["--remote"]:
        lines += [(f"lpd {e} +10 rules --remote",
                   Lpd(pair, None, SYSCPU_RING, rules_file, extra=["--remote"],
                       local_nets=MIX_LOCAL_NETS, engine=e)) for e in ENGINES]
    if all(flags[f] for f in ("--remote", "--connections", "--http")):
        lines += [(f"lpd {e}, every stage",
                   Lpd(pair, None, SYSCPU_RING, rules_file, extra=EVERY_STAGE,
                       local_nets=MIX_LOCAL_NETS, engine=e)) for e in ENGINES]
    lines.append((FLOOR_AGAIN, None))
    rows = {label: system_cpu(pair, gen, c, mix, label, MIX_FRAMES) for label, c in lines}
    read_against_floor(rows)
    for label, at_most in MIX_TARGETS.items():
        row = rows.get(label)
        if row is not None:
            row["target"] = f"<= {at_most:g}x tcpdump"
            if row.get("÷ tcpdump") is not None:
                row["met"] = row["÷ tcpdump"] <= at_most
    return (mix,)


def live_flood(pair, workdir):
    gen = FloodTrafgen(pair, workdir, legit=True)
    flood = Table("Live: rate ladder under a spoofed flood (tests/test_flood.py's) with "
                  "legitimate frames",
                  ["consumer", "target pps", "sent pps", "sent", "veth rx", "legit sent",
                   "legit counted", "legit exact", "iface = veth", "unattributed", "local addrs",
                   "evictions", "drops", "exact"],
                  note=f"Cycles of {gen.cycle} frames: one legitimate {gen.legit_size}-byte frame "
                       f"A -> B (10.199.0.1 -> .2), then {SPOOF_FRAME}-byte UDP frames from "
                       f"{gen.sources:,} spoofed sources inside the local networks\n"
                       f"({SPOOF_V4_DEFS * SPOOF_V4_SPAN * SPOOF_V4_FOURTH:,} in 10.199.1-"
                       f"{SPOOF_V4_DEFS * SPOOF_V4_SPAN}.x, {SPOOF_V6_DEFS * SPOOF_V6_SPAN:,} in "
                       f"{SPOOF_LOCAL_NETS[1]}) to a remote address; lpd --local-net "
                       f"{' --local-net '.join(SPOOF_LOCAL_NETS)} --local-max {SPOOF_LOCAL_MAX} "
                       f"--interval {SPOOF_INTERVAL:g}.\nPer consumer: the flood alone first "
                       f"({gen.one_pass:,} frames: it fills the address table), then "
                       f"{SPOOF_WARMUP:,} frames of this mix (the legitimate hosts appear after "
                       f"the flood),\n{SPOOF_NEWCOMER_WAIT:g} s, then the rungs ({RUNG_FRAMES:,} "
                       "frames each). legit counted: B's lpd_receive_packets_total over the rung; "
                       "legit exact: B's receive and A's transmit\npackets and bytes equal what "
                       "was sent; iface = veth: lpd's interface receive and transmit packets and "
                       "bytes equal the veth's; unattributed: lpd_local_unattributed_packets_total"
                       "\n(where lpd has it); local addrs: lpd_local_addresses after the rung; "
                       "exact: both. A rung's figures are read once they are right or stop moving "
                       f"for {SPOOF_STABLE:g} s. Split pinning (trafgen CPU 0, lpd CPU 1).")
    summary = Table("Live: zero-loss rate under a spoofed flood",
                    ["consumer", "engine", "zero-loss pps", "rungs exact", "peak RSS MiB"],
                    note="zero-loss pps: the highest rung of the ladder above at which the "
                         "legitimate hosts' counts are exact and the interface totals equal the "
                         "veth's; 0: no rung.")
    set_rps(pair, PINNINGS["split"][1])
    cpu = PINNINGS["split"][0]
    # No tcpdump line: it has no per-host counts, and the ladder gives the generator's
    # ceiling at the same rates.
    consumers = [Lpd(pair, cpu, DEFAULT_RING, engine=e, local_nets=SPOOF_LOCAL_NETS,
                     extra=["--local-max", str(SPOOF_LOCAL_MAX), "--interval", str(SPOOF_INTERVAL)])
                 for e in ENGINES]
    for c in consumers:
        s = flood_series(pair, workdir, c, flood)
        if s:
            summary.add(**s)
        else:
            summary.say(c.name, "not available (the ladder table says why)")
    return flood, summary


def live_ratios(ratios_in):
    """lpd ÷ tcpdump from the ladder and drain series of this run."""
    ratios = Table("Live: lpd / tcpdump", ["frame", "pinning", "consumer", "zero-loss pps ratio",
                                           "cpu s/M ratio", "sys CPU ratio",
                                           "drain Mfps/core ratio"],
                   note="sys CPU ratio: sys ns/frame above the floor against tcpdump's (the "
                        "measure for lpd ebpf, whose work is in the kernel); drain: '-' where lpd "
                        "ebpf had nothing to drain.")
    sums, drains = ratios_in.get("ladder", {}), ratios_in.get("drain", {})
    for (size, pinning, name), s in sums.items():
        ref = sums.get((size, pinning, "tcpdump"))
        if name in ("tcpdump", NoCapture.name) or not ref:
            continue
        d, dref = drains.get((pinning, name)), drains.get((pinning, "tcpdump"))
        ratios.add(frame=size, pinning=pinning, consumer=name, **{
            "zero-loss pps ratio": ratio(s["zero-loss pps"], ref["zero-loss pps"]),
            "cpu s/M ratio": ratio(s["cpu s/M"], ref["cpu s/M"]),
            "sys CPU ratio": ratio(s.get("above floor"), ref.get("above floor")),
            "drain Mfps/core ratio": ratio(d and d.get("Mfps/core"), dref and dref.get("Mfps/core"))
            if size == 64 else None})
    ladder_names = {name for _, _, name in sums}
    for (pinning, name), d in drains.items():         # the drain-only lines (--remote, ...)
        dref = drains.get((pinning, "tcpdump"))
        if name not in ladder_names and name != "tcpdump" and dref:
            ratios.add(frame=64, pinning=pinning, consumer=name, **{
                "drain Mfps/core ratio": ratio(d.get("Mfps/core"), dref.get("Mfps/core"))})
    return ratios


def show_live(results, tables):
    for t in tables:
        for r in t.rows:
            for k in [k for k in r if k.startswith("_")]:
                r.pop(k)
        t.show()
        results.setdefault("live", []).append(t.to_json())


def run_live(results, quick, workdir, series=LIVE_SERIES):
    global RUNG_FRAMES, DRAIN_FRAMES, LADDER_PPS, SYSCPU_FRAMES, SYSCPU_REPEAT, MIX_FRAMES
    if quick:
        RUNG_FRAMES, DRAIN_FRAMES, LADDER_PPS = QUICK_RUNG_FRAMES, DRAIN_FRAMES // 4, QUICK_LADDER_PPS
        SYSCPU_FRAMES, SYSCPU_REPEAT, MIX_FRAMES = SYSCPU_FRAMES // 5, 1, MIX_FRAMES // 5
    rules_file = os.path.join(workdir, "rules.txt")
    with open(rules_file, "w") as f:
        f.writelines(f"r{i};{e}\n" for i, e in enumerate(rule_exprs(10)))
    flags = {flag: lpd_offers(flag) for flag in ("--remote", "--connections", "--http",
                                                 "--workers", "--engine")}
    timing = results.setdefault("live_seconds", {})
    ratios_in = {}
    with netns.Pair() as pair:
        auto = {"default options": auto_engine(pair)}
        if all(flags[f] for f in ("--remote", "--connections", "--http")):
            auto["every stage on"] = auto_engine(pair, EVERY_STAGE, MIX_LOCAL_NETS, rules_file)
        results["auto_engine"] = auto
        print("lpd --engine auto picks: " + "; ".join(f"{k}: {v}" for k, v in auto.items()) + "\n",
              flush=True)
        steps = {"ladder": lambda: live_ladder(pair, workdir, rules_file, ratios_in),
                 "drain": lambda: live_drain(pair, workdir, rules_file, flags, ratios_in),
                 "workers": lambda: live_workers(pair, workdir, rules_file, ratios_in)
                 if flags["--workers"] else (),
                 "syscpu": lambda: live_syscpu(pair, workdir, rules_file, flags)
                 if flags["--engine"] else (),
                 "mix": lambda: live_mix(pair, workdir, rules_file, flags, auto)
                 if flags["--engine"] else (),
                 "flood": lambda: live_flood(pair, workdir)}
        for name in LIVE_SERIES:
            if name in series:
                t0 = time.monotonic()
                tables = steps[name]()
                timing[name] = round(time.monotonic() - t0, 1)
                show_live(results, tables)
                print(f"   ... {name}: {timing[name]} s", file=sys.stderr, flush=True)
    if "ladder" in series or "drain" in series:
        show_live(results, [live_ratios(ratios_in)])


def ratio(a, b):
    """a / b of two positive figures (a figure above a floor can be noise below it)."""
    return a / b if a and b and a > 0 and b > 0 else None


###############################################################################
# main ########################################################################
###############################################################################

def main(argv=None):
    global LPD
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--offline", action="store_true", help="only the in-process part")
    ap.add_argument("--live", action="store_true", help="only the live part (root)")
    ap.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    ap.add_argument("--rules-at-scale", action="store_true",
                    help="only the 'Rules at scale' table (no privileges)")
    ap.add_argument("--series", metavar="NAME,...",
                    help="only these series (default all); offline: "
                         f"{','.join(OFFLINE_SERIES)}; live (root): {','.join(LIVE_SERIES)}. "
                         "Only offline names: no live part, only live names: no offline part")
    ap.add_argument("--lpd", default=LPD_PATH, help="lpd.py to measure (default: the repo's)")
    args = ap.parse_args(argv)
    LPD = os.path.abspath(args.lpd)
    series = [*OFFLINE_SERIES, *LIVE_SERIES] if args.series is None else \
        [s for s in args.series.split(",") if s]
    unknown = set(series) - set(OFFLINE_SERIES) - set(LIVE_SERIES)
    if unknown:
        ap.error(f"--series: no such series: {', '.join(sorted(unknown))} "
                 f"(there are {', '.join([*OFFLINE_SERIES, *LIVE_SERIES])})")
    if args.series is not None and not (args.offline or args.live):
        args.offline = not any(s in LIVE_SERIES for s in series)
        args.live = not any(s in OFFLINE_SERIES for s in series)
    do_offline, do_live = not args.live or args.offline, not args.offline or args.live
    netns.exit_on_signals()
    started = time.monotonic()
    info = machine_info()
    results = {"machine": info, "lpd": LPD, "quick": args.quick, "series": series}
    print("lpd bench - " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    lpd = import_lpd(LPD)
    info["lpd_version"] = getattr(lpd, "__version__", "?")
    global DEFAULT_RING, REMOTE_MAX, CONN_MAX, CONN_SNAP, LPD_RETIRE_MS
    DEFAULT_RING = getattr(lpd, "DEFAULT_RING_BYTES", DEFAULT_RING)
    LPD_RETIRE_MS = getattr(lpd, "RING_RETIRE_MS", LPD_RETIRE_MS)
    REMOTE_MAX = getattr(lpd, "DEFAULT_REMOTE_MAX", REMOTE_MAX)
    CONN_MAX = getattr(lpd, "DEFAULT_CONN_MAX", CONN_MAX)
    CONN_SNAP = max(OFFLINE_SNAPLEN, getattr(lpd, "CONN_SNAPLEN", CONN_SNAP))
    print(f"lpd {info['lpd_version']} ({LPD}) under {sys.executable}\n", flush=True)
    try:
        if args.rules_at_scale:
            rules_at_scale(lpd, results, args.quick).show()
            do_offline = do_live = False
        if do_offline:
            run_offline(lpd, results, args.quick, series)
        if do_live:
            if os.geteuid() != 0:
                raise SystemExit("the live part needs root (network namespaces); "
                                 "run with --offline for the rest")
            with tempfile.TemporaryDirectory(prefix="lpd-bench-") as workdir:
                os.chmod(workdir, 0o755)
                run_live(results, args.quick, workdir, series)
    finally:
        results["seconds"] = round(time.monotonic() - started, 1)
        path = save_json(results)
        print(f"total {results['seconds']} s; results in {os.path.relpath(path, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
