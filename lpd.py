#!/usr/bin/env python3
"""lpd — per-address and per-rule network accounting from an AF_PACKET ring.

One module, standard library plus prometheus_client (and maxminddb for GeoIP).
Data flows one way: sources (the ring, a pcap file, synthetic blocks) -> decode
(one flat loop per block) -> stages (local addresses, remote addresses,
connections, HTTP requests, rules, flow export, names; or the eBPF engine counting in the
kernel) -> published snapshots (immutable; the capture thread is the only writer) ->
exporters (Prometheus, /api documents, the rule socket, --output; IPFIX records go
out from the flow export stage itself, on the capture thread, never waiting).

Chapters, in dependency order: no chapter uses a name a later one defines, and
each banner's "provides:" line says what later chapters take from it
(tests/test_layout.py checks both, and that this index is the banners):
  1 Errors and logging
  2 Options
  3 Linux ABI: kernel constants and structures
  4 Wire formats: Ethernet, VLAN, IPv4, IPv6
  5 System helpers: interfaces, unix sockets
  6 Classic BPF: opcodes, formatter, interpreter, snapshot length
  7 Filter compiler
    7.1 Protocol knowledge
    7.2 Lexer
    7.3 Intermediate code
    7.4 Code generator
    7.5 Parser
    7.6 Linearizer
    7.7 Optimiser
    7.8 Entry points
  8 Filter matcher: classic BPF translated to Python
  9 Snapshots: what the capture thread publishes
  10 Sources: where ring blocks come from
  11 Decode: one flat loop per block
  12 Enrichment: background pollers (NIC mapping, GeoIP, processes, Docker)
  13 Presentation: documents, metric families, logs, the stage row
  14 Stages
    14.1 Local addresses
    14.2 Remote addresses
    14.3 Connections (Zeek's conn.log semantics)
    14.4 Rules (bpfcountd-compatible filter files)
    14.5 Flow export (IPFIX)
  15 Names: passive DNS and TLS
    15.1 DNS messages (RFC 1035, read from bytes lpd did not write)
    15.2 TLS handshakes (ClientHello, ServerHello, JA4)
    15.3 Names (--names)
    15.4 TLS hellos (--names, --ssl-log)
  16 HTTP: requests, HTTP/2 and gRPC
    16.1 HPACK (RFC 7541, header compression)
    16.2 HTTP/2 connections (frames, streams, gRPC calls)
    16.3 HTTP requests (TCP reassembly, HTTP/1.x, the stage)
  17 eBPF engine: accounting and rules as one kernel program (--engine ebpf)
    17.1 Assembler
    17.2 Syscalls: bpf(2), maps, programs, test runs
    17.3 Programs: the decoder and the rules in eBPF
    17.4 Accounting: the kernel tables behind the stages
  18 Exporters
    18.1 The stage table at work
    18.2 One selector server (the metrics endpoint, the rule socket)
    18.3 The metrics endpoint
    18.4 The rule socket (bpfcountd's unix socket)
  19 Daemon: wiring, signals, reload
  20 Workers: one capture process per core behind PACKET_FANOUT
  21 Offline replay and filter dumps
  22 Operator view: lpd top
  23 main

Where a new stage goes: one sub-chapter of 14 "Stages" — its Consumer, documents, metric
families, table lines, how the options (2) build it, and last its row,
STAGES.append(Stage(...)); the daemon, the workers, -r, /api, --output and /metrics take
it from there (18.1). 14.5, flow export, was added so; 15.3, the names, too, in a
chapter of its own once 14 had reached its size budget; and 16.3, HTTP, moved after the
HTTP/2 parsers it hands connections to.
"""
import argparse
import bisect
import collections
import ctypes
import errno
import fcntl
import functools
import gc
import grp
import hashlib
import heapq
import http.client
import ipaddress
import itertools
import json
import math
import mmap
import os
import pickle
import re
import select
import selectors
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
import types
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import Callable, NamedTuple, Optional

__version__ = "0.1.0"
# The name on PyPI: "lpd" there is an unrelated project.
DISTRIBUTION = "lpd-netacct"


###############################################################################
# 1 Errors and logging ########################################################
###############################################################################
# provides: ConfigError, FilterError, log, LOG_*, LpdError, NoPermission, os_failure, PortInUse,
#   sd_notify, UsageError


class LpdError(Exception):
    """Base of every error lpd reports as one line and an exit code."""
    exit_code = 1


class UsageError(LpdError):
    exit_code = 64      # EX_USAGE


class ConfigError(LpdError):
    exit_code = 78      # EX_CONFIG


class NoPermission(LpdError):
    exit_code = 77      # EX_NOPERM


class PortInUse(LpdError):
    exit_code = 69      # EX_UNAVAILABLE


def os_failure(e, text):
    """The error for what the system refused: no permission (exit 77) or any other
    reason, a configuration that cannot work here (78)."""
    kind = NoPermission if e.errno in (errno.EPERM, errno.EACCES) else ConfigError
    return kind(f"{text}: {os.strerror(e.errno) if e.errno else e}")


class FilterError(UsageError):
    """A filter expression that does not compile; str() is 'line:col: reason'."""

    def __init__(self, reason, col=1, line=1):
        self.reason, self.col, self.line = reason, col, line
        super().__init__(f"{line}:{col}: {reason}")


LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG = 3, 4, 5, 6, 7     # syslog priorities


LOG_NAME = ["lpd"]                 # a worker says which it is


def log(priority, message):
    """One line on stderr; journald reads the <N> priority prefix."""
    prefix = f"<{priority}>" if os.environ.get("JOURNAL_STREAM") else ""
    try:
        sys.stderr.write(f"{prefix}{LOG_NAME[0]}: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def sd_notify(state):
    """systemd's readiness protocol, without libsystemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log(LOG_WARNING, f"sd_notify: {addr}: {e.strerror}")


###############################################################################
# 2 Options ###################################################################
###############################################################################
# provides: _ArgParser, DEFAULT_*, IPFIX_TEMPLATE_EVERY, parse_args, parse_listen_address,
#   _positive_float

DEFAULT_LISTEN = "localhost:59122"
DEFAULT_MAPPING_URL = "http://localhost:32599/status"
DEFAULT_RING_BYTES = 16 << 20
# Local addresses tracked at most: room for a /18 of hosts, and a bound on what a flood
# of spoofed sources inside a local network can cost (memory, scrape size, series).
DEFAULT_LOCAL_MAX = 16384
RING_MIN_BYTES = 1 << 16
# The ring is kernel memory, pinned for lpd's lifetime and allocated by setsockopt()
# before any mmap(): it is never swapped, no memory cgroup is charged for it and
# RLIMIT_AS only sees the mapping afterwards. Asking for more than the machine can spare
# stalls inside that setsockopt() (SIGTERM waits too) until the global OOM killer takes
# other processes. So -b may take at most this share of physical memory.
RING_MAX_MEMORY_DIVISOR = 4                 # at most 1/4 of physical memory
# Remote addresses tracked at most (space-saving: the table trims to this when it holds
# twice as many), and the bytes a remote must exceed before it gets its own series
# (ip_traffic_monitor_cli's -t default: 1 MiB).
DEFAULT_REMOTE_MAX = 65536
DEFAULT_EXPORT_THRESHOLD = 1 << 20
DEFAULT_IDLE_TIMEOUT = 300.0
OUTPUTS = ("table", "metrics", "json")
ENGINES = ("auto", "cbpf", "ebpf")
# eyes-devine's plain-HTTP ports.
DEFAULT_HTTP_PORTS = (80, 8080, 8000, 3000, 5000, 9000, 50051)   # 50051: gRPC's
# Connections tracked at most, and the idle timeouts that end them.
DEFAULT_CONN_MAX = 262144
DEFAULT_NAMES_MAX = 65536           # remote addresses with a name (--names-max)
# Registered domains with their own traffic counters (--names-domains): a dashboard's
# "top services" at 2 series each; on a home router a few services (video, updates,
# cloud storage) carry most bytes, and the rest is `other`.
DEFAULT_NAMES_DOMAINS = 20
DEFAULT_CONN_TIMEOUT_TCP = 300.0
DEFAULT_CONN_TIMEOUT_UDP = 60.0
DEFAULT_FLOW_ACTIVE_TIMEOUT = 60.0
# Over UDP a collector that starts late, or restarts, can decode nothing until the
# templates come again: RFC 6728 allows 600 s; this, and every IPFIX_TEMPLATE_EVERY
# messages, whichever comes first (softflowd: every 16).
DEFAULT_IPFIX_TEMPLATE_INTERVAL = 60.0
IPFIX_TEMPLATE_EVERY = 16


def physical_memory():
    """Bytes of RAM, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


class _ArgParser(argparse.ArgumentParser):
    """argparse that reports usage errors as UsageError (exit 64), not exit 2."""

    def error(self, message):
        raise UsageError(message)


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _ports(text):
    try:
        ports = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected port numbers separated by commas, got {text!r}") from None
    if not ports or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"ports must be 1..65535, got {text!r}")
    return ports


def _size(text):
    """A byte count, with an optional k/m/g suffix (binary)."""
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    value = int(text[:-1] if mult > 1 else text, 0) * mult
    if value < RING_MIN_BYTES:
        raise argparse.ArgumentTypeError(f"ring size must be at least {RING_MIN_BYTES >> 10} KiB, "
                                         f"got {text!r}")
    memory = physical_memory()
    if memory and value > memory // RING_MAX_MEMORY_DIVISOR:
        raise argparse.ArgumentTypeError(
            f"ring size {text!r} is more than 1/{RING_MAX_MEMORY_DIVISOR} of physical memory "
            f"({memory // RING_MAX_MEMORY_DIVISOR >> 20} MiB of {memory >> 20} MiB)")
    return value


def _network(text):
    """A CIDR network; host bits set are an error, as in tcpdump's 'net', because
    10.0.0.1/8 is more likely a typo for a /32 or a /24 than a wish for 10.0.0.0/8."""
    try:
        return ipaddress.ip_network(text)
    except ValueError as e:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(str(e)) from None
        raise argparse.ArgumentTypeError(f"{text} has host bits set (the network is {net})") from None


def _mac(text):
    """A MAC address as $MAC in filter files writes it: six hex bytes, lower case."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9a-fA-F]{1,2}", p) for p in parts):
        raise argparse.ArgumentTypeError(f"expected a MAC address like 02:00:00:00:00:01, got {text!r}")
    return ":".join(f"{int(p, 16):02x}" for p in parts)


def parse_listen_address(text):
    """'HOST:PORT', ':PORT' (all addresses) or '[v6]:PORT' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--web.listen-address: expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    return host or "::", int(port)


IPFIX_TRANSPORTS = ("udp", "tcp")


def ipfix_collector(text):
    """--ipfix [udp://|tcp://]HOST:PORT ('[v6]:PORT' too) -> (transport, host, port)."""
    transport, sep, rest = text.partition("://")
    if not sep:
        transport, rest = IPFIX_TRANSPORTS[0], text
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if transport not in IPFIX_TRANSPORTS or not sep or not host or not port.isdigit() or \
            not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected [udp://|tcp://]HOST:PORT, got {text!r}")
    return transport, host, int(port)


def _domain_id(text):
    n = _non_negative_int(text)
    if n >= 1 << 32:
        raise argparse.ArgumentTypeError(f"an observation domain id is 32 bits, got {n}")
    return n


WORKERS_MAX = 256


def _workers(text):
    if text == "auto":
        return len(os.sched_getaffinity(0))
    n = _positive_int(text)
    if n > WORKERS_MAX:
        raise argparse.ArgumentTypeError(f"at most {WORKERS_MAX}, got {n}")
    return n


def worker_argument(text):
    """--worker-of INDEX,GROUP,CONTROL_FD,DATA_FD,PARENT_PID (the parent writes it)."""
    try:
        index, group, control, data, parent = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 5 numbers, got {text!r}") from None
    return index, group, control, data, parent


HELP_EPILOG = f"""\
lpd top [--url HOST:PORT] [--once]   watch a running lpd in the terminal

signals: TERM, INT stop (exit 0); HUP re-reads the filter file, the interface's
networks, the GeoIP databases and reopens the logs; USR1 logs a status line.
exit codes: 0 stopped, 64 usage, 69 metrics port in use, 77 no permission,
78 bad configuration; every error is one line.
more: man 8 lpd, and README.md (in /usr/share/doc/lpd/ from the .deb; on PyPI as
{DISTRIBUTION})."""


def build_parser():
    p = _ArgParser(prog="lpd", description="Per-address and per-rule network accounting "
                   "from an AF_PACKET ring, exported to Prometheus and a unix socket.",
                   epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", dest="interface", metavar="IFACE",
                   help="capture interface (default: the default route's, else the first up one)")
    p.add_argument("--wait-interface", action="store_true",
                   help="an -i interface that does not exist yet is waited for (counting starts "
                        "when it appears) instead of an error")
    p.add_argument("--local-net", dest="local_nets", metavar="CIDR", action="append", type=_network,
                   help="a local network (repeatable; default: the interface's own networks)")
    p.add_argument("--web.listen-address", dest="listen", metavar="HOST:PORT",
                   help=f"Prometheus endpoint (default {DEFAULT_LISTEN}; with --duration: "
                        "none unless given)")
    p.add_argument("--interval", type=_positive_float, default=1.0, metavar="SECONDS",
                   help="period of the *_bps gauges (default 1)")
    p.add_argument("--local-max", type=_positive_int, metavar="N",
                   help=f"local addresses tracked at most; the least busy are evicted "
                        f"(default {DEFAULT_LOCAL_MAX}; with -r: no bound)")
    p.add_argument("--idle-timeout", type=_positive_float, metavar="SECONDS",
                   help=f"forget an address after this long without traffic "
                        f"(default {DEFAULT_IDLE_TIMEOUT:g}; with -r: never)")
    p.add_argument("--remote", action="store_true",
                   help="count per remote address (any address outside the local networks)")
    p.add_argument("--remote-max", type=_positive_int, default=DEFAULT_REMOTE_MAX, metavar="N",
                   help=f"remote addresses kept when the table, at twice this, is trimmed; "
                        f"the heaviest stay (default {DEFAULT_REMOTE_MAX})")
    p.add_argument("-t", "--prometheus-export-threshold", dest="export_threshold",
                   type=_non_negative_int, default=DEFAULT_EXPORT_THRESHOLD, metavar="BYTES",
                   help="a remote gets its own ip_traffic_* series once its tx+rx bytes exceed "
                        "this (default %(default)s; 0: every remote)")
    p.add_argument("-g", "--geoip-db", metavar="PATH",
                   help="GeoLite2/GeoIP2 City or Country database: country, province and city "
                        "labels of remotes (implies --remote; needs maxminddb)")
    p.add_argument("--geoip-isp-db", metavar="PATH",
                   help="GeoIP2-ISP or GeoLite2-ASN database: the isp label (implies --remote)")
    p.add_argument("--geoip-lang", default="en", metavar="LANG",
                   help="language of the GeoIP names, e.g. zh-CN (default en; falls back to en)")
    p.add_argument("--connections", action="store_true",
                   help="track TCP and UDP connections (Zeek's conn_state and history)")
    p.add_argument("--conn-log", metavar="PATH",
                   help="one JSON line per finished connection, Zeek's conn.log fields ('-': "
                        "stdout; reopened on SIGHUP; implies --connections)")
    p.add_argument("--conn-max", type=_positive_int, default=DEFAULT_CONN_MAX, metavar="N",
                   help=f"connections tracked at most; half-open ones are evicted first "
                        f"(default {DEFAULT_CONN_MAX})")
    p.add_argument("--conn-timeout-tcp", type=_positive_float, default=DEFAULT_CONN_TIMEOUT_TCP,
                   metavar="SECONDS", help="idle TCP connections end (default %(default)g)")
    p.add_argument("--conn-timeout-udp", type=_positive_float, default=DEFAULT_CONN_TIMEOUT_UDP,
                   metavar="SECONDS", help="idle UDP flows end (default %(default)g)")
    p.add_argument("--ipfix", type=ipfix_collector, action="append", default=[],
                   metavar="[tcp://]HOST:PORT",
                   help="send every flow as IPFIX records to this collector (nfcapd, nfacctd, "
                        "goflow2; UDP unless tcp://; repeatable; implies --connections)")
    p.add_argument("--ipfix-domain", type=_domain_id, metavar="N",
                   help="IPFIX observation domain id (default: one of this host and interface; "
                        "worker K adds K)")
    p.add_argument("--ipfix-biflow", action="store_true",
                   help="one RFC 5103 biflow record per connection instead of one per direction")
    p.add_argument("--ipfix-template-interval", type=_positive_float,
                   default=DEFAULT_IPFIX_TEMPLATE_INTERVAL, metavar="SECONDS",
                   help="resend the templates over UDP at least this often (default %(default)g; "
                        f"also every {IPFIX_TEMPLATE_EVERY} messages)")
    p.add_argument("--flow-active-timeout", type=_positive_float,
                   default=DEFAULT_FLOW_ACTIVE_TIMEOUT, metavar="SECONDS",
                   help="a flow still going is reported at least this often, as what it "
                        "counted since (default %(default)g)")
    p.add_argument("--http", action="store_true",
                   help="HTTP/1.x, HTTP/2 (h2c) and gRPC on --http-ports: latency histograms, "
                        "log, /api/requests")
    p.add_argument("--http-ports", type=_ports, default=DEFAULT_HTTP_PORTS, metavar="PORT,...",
                   help="TCP ports whose traffic is parsed as HTTP (default "
                        f"{','.join(map(str, DEFAULT_HTTP_PORTS))})")
    p.add_argument("--http-log", metavar="PATH",
                   help="one JSON line per HTTP request, Zeek's http.log names ('-': stdout; "
                        "reopened on SIGHUP; implies --http)")
    p.add_argument("--names", action="store_true",
                   help="passive DNS: each remote address gets the name a local host looked "
                        "up for it, from the DNS answers on UDP port 53")
    p.add_argument("--names-mdns", action="store_true",
                   help="with --names: multicast DNS answers (UDP port 5353) too")
    p.add_argument("--names-max", type=_positive_int, default=DEFAULT_NAMES_MAX, metavar="N",
                   help="addresses with a name at most (default %(default)s); new names "
                        "cannot push out those whose address carried traffic")
    p.add_argument("--names-domains", type=_non_negative_int, default=DEFAULT_NAMES_DOMAINS,
                   metavar="K", help="with --names and --remote: transmit and receive bytes of "
                   "the K busiest registered domains (Public Suffix List), the rest as 'other' "
                   "(default %(default)s; 0: off)")
    p.add_argument("--dns-log", metavar="PATH",
                   help="one JSON line per DNS query, Zeek's dns.log fields ('-': stdout; "
                        "reopened on SIGHUP; implies --names)")
    p.add_argument("--ssl-log", metavar="PATH",
                   help="one JSON line per TLS ClientHello, Zeek's ssl.log fields and its JA4 "
                        "('-': stdout; reopened on SIGHUP; implies --names)")
    p.add_argument("--docker-socket", metavar="PATH",
                   help="Docker (or podman) Engine API socket: container names of HTTP servers "
                        "and lpd_container_info (default /var/run/docker.sock while capturing "
                        "with --http; with -r only when given; 'none': off)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="count in the kernel with an eBPF program lpd builds (ebpf), or copy "
                        "frames to lpd behind a classic filter (cbpf); auto: ebpf where the "
                        "kernel and privileges allow it and the options need no frames")
    p.add_argument("--workers", type=_workers, default=1, metavar="N|auto",
                   help="capture processes behind one PACKET_FANOUT group, flows hashed to "
                        "one each; the numbers are their sum (default 1; auto: one per CPU)")
    p.add_argument("--workers-pin", action="store_true",
                   help="pin worker N to the N-th CPU lpd may run on")
    p.add_argument("--worker-of", type=worker_argument, help=argparse.SUPPRESS)
    p.add_argument("--duration", type=_positive_float, metavar="SECONDS",
                   help="capture this long, print the table (see --output) and exit")
    p.add_argument("--output", choices=OUTPUTS, default="table",
                   help="what -r and --duration print: a table for people (default), the "
                        "Prometheus exposition, or one JSON document")
    p.add_argument("--mapping-url", metavar="URL",
                   help=f"NIC mapping service, or 'none' (default {DEFAULT_MAPPING_URL}, asked "
                        "quietly until it answers once)")
    p.add_argument("--mapping-interval", type=_positive_float, default=10.0, metavar="SECONDS",
                   help="how often to fetch the mapping (default 10)")
    p.add_argument("-b", dest="ring_bytes", type=_size, default=DEFAULT_RING_BYTES, metavar="BYTES",
                   help="capture ring size (default 16m)")
    p.add_argument("--promisc", action="store_true", help="put the interface in promiscuous mode")
    p.add_argument("-f", dest="filter_file", metavar="FILTERFILE",
                   help="rules: lines of '<identifier>;<bpf expression>'")
    p.add_argument("--filter-file-optional", action="store_true",
                   help="a missing -f file means no rules yet (SIGHUP loads it once it exists)")
    p.add_argument("--mac", type=_mac, metavar="MAC",
                   help="$MAC of the filter file (default: -i's address; -r has none)")
    p.add_argument("-F", dest="prefilter", metavar="EXPR",
                   help="kernel prefilter: only matching packets reach lpd")
    p.add_argument("-u", dest="socket_path", metavar="SOCKETPATH",
                   help="rule counters socket (default /run/lpd/<iface>.sock)")
    p.add_argument("--socket-group", metavar="GROUP", help="group owning the rule socket")
    p.add_argument("-r", dest="read_file", metavar="FILE",
                   help="read a pcap or pcapng file, print the totals and exit")
    p.add_argument("-d", dest="dump", action="count", default=0,
                   help="print the compiled EXPR like tcpdump -d (-dd, -ddd) and exit")
    p.add_argument("--kernel", action="store_true", help="with -d: the kernel-target program")
    p.add_argument("--version", action="version", version=f"lpd {__version__}")
    p.add_argument("expression", nargs="*", help="filter expression (with -d)")
    return p


def parse_args(argv):
    opts = build_parser().parse_args(argv)
    if opts.expression and not opts.dump:
        raise UsageError(f"unexpected argument {opts.expression[0]!r} (a filter expression goes with -d or -F)")
    if opts.kernel and not opts.dump:
        raise UsageError("--kernel goes with -d")
    if opts.filter_file_optional and not opts.filter_file:
        raise UsageError("--filter-file-optional goes with -f")
    if opts.wait_interface and not opts.interface:
        raise UsageError("--wait-interface goes with -i")
    # A one-shot --duration run beside the service must not take its port: it listens
    # only when asked to.
    opts.serve = opts.listen is not None or not opts.duration
    opts.listen = parse_listen_address(opts.listen or DEFAULT_LISTEN)
    # localpacketdump's service at its default address is used where it answers, but a
    # first run must not warn about a service nobody set up.
    opts.mapping_configured = opts.mapping_url is not None
    opts.mapping_url = opts.mapping_url or DEFAULT_MAPPING_URL
    if opts.mapping_url.lower() == "none":
        opts.mapping_url = None
    if opts.geoip_db or opts.geoip_isp_db:
        opts.remote = True
    if opts.conn_log or opts.ipfix:
        opts.connections = True
    if opts.http_log:
        opts.http = True
    if opts.dns_log or opts.ssl_log or opts.names_mdns:
        opts.names = True
    return opts


###############################################################################
# 3 Linux ABI: kernel constants and structures ################################
###############################################################################
# provides: _align, ARPHRD_ETHER, ATTR_*, BLOCK, BLOCK_*, BPF_*, EBPF_*, EEXIST_NEG, ENOTSUPP,
#   ETH_*, FP, FRAME, FRAME_*, GSO_MAX_SEGS, GSO_NEVER, HELPER, HELPERS, IFA_ADDRESS, IFA_LOCAL,
#   IFADDRMSG,
#   IFF_LOOPBACK, IFF_UP, IFREQ, IFREQ_HWADDR, IFREQ_INT, MEMBARRIER_CMD_GLOBAL, NETLINK_ROUTE,
#   NLM_F_DUMP, NLM_F_REQUEST, NLMSG_*, NLMSGERR, NLMSGHDR, NR_BPF, NR_MEMBARRIER, PACKET_*,
#   PROG_INFO_*, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, RING_BLOCK_BYTES, RING_RETIRE_MS,
#   RTA_ALIGNTO, RTATTR, RTM_GETADDR, RTM_NEWADDR, S16_MAX, S16_MIN, SIOCGIFFLAGS, SIOCGIFHWADDR,
#   SIOCGIFMTU, SKB_*, SLL_ADDR_LEN, SNAPLEN_ACCOUNTING, SNAPLEN_FULL, SO_ATTACH_BPF,
#   SO_ATTACH_FILTER, SOCK_FILTER, SOCK_FPROG, SOL_PACKET, TP_*, TPACKET_*, U32, V3_ALIGNMENT,
#   VIRTIO_*

# Interfaces (linux/sockios.h, linux/if.h).
SIOCGIFFLAGS = 0x8913
SIOCGIFMTU = 0x8921
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFREQ = struct.Struct("16sH14x")
IFREQ_INT = struct.Struct("16si12x")         # the same, for the int members (ifr_mtu)
IFREQ_HWADDR = slice(18, 24)        # ifr_hwaddr.sa_data: after the name and sa_family

# rtnetlink, for the capture interface's own networks without iproute2.
NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSG_ALIGNTO = RTA_ALIGNTO = 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
NLMSGHDR = struct.Struct("=IHHII")
NLMSGERR = struct.Struct("=i")
IFADDRMSG = struct.Struct("=BBBBI")
RTATTR = struct.Struct("=HH")

# Packet sockets: Python's socket module has none of these (linux/if_packet.h,
# asm-generic/socket.h, linux/if_ether.h).
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC = 1, 1
PACKET_RX_RING, PACKET_STATISTICS, PACKET_AUXDATA, PACKET_VERSION = 5, 6, 8, 10
PACKET_VNET_HDR = 15
PACKET_FANOUT = 18
# One flow, one ring: the kernel hashes addresses and ports (the same both ways), and
# with DEFRAG reassembles IP fragments first, so a flow's fragments follow it.
PACKET_FANOUT_HASH, PACKET_FANOUT_FLAG_DEFRAG = 0, 0x8000
PACKET_FANOUT_GROUP_MASK = 0xFFFF
TPACKET_V3 = 2
SO_ATTACH_FILTER = 26
SO_ATTACH_BPF = 50                 # the same, for an eBPF program fd (--engine ebpf)
ETH_P_ALL = 0x0003
ETH_P_8021Q = 0x8100
ETH_HLEN, ETH_ALEN, ETH_TYPE_OFF = 14, 6, 12
ETH_SRC = slice(ETH_ALEN, 2 * ETH_ALEN)
SLL_ADDR_LEN = 8
PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OTHERHOST, PACKET_OUTGOING = range(5)
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID = 0x10, 0x40
TPACKET_ALIGNMENT = 16
V3_ALIGNMENT = 8                    # frames within a V3 block (TOTAL_PKT_LEN_INCL_ALIGN)
TPACKET_MIN_MACLEN = 16             # tpacket_rcv() reserves at least this for the link header
TPACKET_FRAME_SIZE = 2048           # tp_frame_size: V3 ignores it beyond the checks on it

TPACKET_REQ3 = struct.Struct("=7I")
PACKET_MREQ = struct.Struct("=iHH8s")
TPACKET_STATS_V3 = struct.Struct("=III")
SOCK_FPROG = struct.Struct("=HxxxxxxQ")     # struct sock_fprog { u16 len; sock_filter *filter; }
SOCK_FILTER = struct.Struct("=HBBI")
U32 = struct.Struct("=I")

# membarrier(2) (linux/membarrier.h). MEMBARRIER_CMD_GLOBAL is synchronize_rcu(): it
# returns once every CPU has left the RCU read-side sections it was in, and a socket
# program runs inside one (sk_filter_trim_cap, dev_queue_xmit_nit): every program run
# that began before the call has returned. The eBPF engine's grace period.
# None on a machine not listed: no guessed number (another machine's is another call).
NR_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "armv7l": 389, "i686": 375, "riscv64": 283}.get(
    os.uname().machine)
MEMBARRIER_CMD_GLOBAL = 1

# eBPF (include/uapi/linux/bpf.h): the instruction set, helper ids, bpf(2)'s commands
# and attributes, struct __sk_buff. Batch commands (Linux 5.6+): one syscall writes or
# deletes many map entries.

# struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; } (little-endian
# bitfields on x86-64: dst in the low nibble). ld_imm64 takes two slots, the second with
# only imm (the high 32 bits).
BPF_INSN = struct.Struct("<BBhi")
BPF_INSN_SIZE = BPF_INSN.size                        # 8

# Classes (the classic ones keep their numbers; 6 and 7 are new)
EBPF_LD, EBPF_LDX, EBPF_ST, EBPF_STX, EBPF_ALU, EBPF_JMP, EBPF_JMP32, EBPF_ALU64 = range(8)
# Sizes and modes
EBPF_W, EBPF_H, EBPF_B, EBPF_DW = 0x00, 0x08, 0x10, 0x18
EBPF_IMM, EBPF_ABS, EBPF_IND, EBPF_MEM, EBPF_MEMSX, EBPF_ATOMIC = 0x00, 0x20, 0x40, 0x60, 0x80, 0xc0
# ALU operations (BPF_ALU / BPF_ALU64)
EBPF_ADD, EBPF_SUB, EBPF_MUL, EBPF_DIV, EBPF_OR, EBPF_AND, EBPF_LSH, EBPF_RSH = range(0, 0x80, 0x10)
EBPF_NEG, EBPF_MOD, EBPF_XOR, EBPF_MOV, EBPF_ARSH, EBPF_END = 0x80, 0x90, 0xa0, 0xb0, 0xc0, 0xd0
EBPF_K, EBPF_X = 0x00, 0x08                          # operand: imm or src_reg
EBPF_TO_LE, EBPF_TO_BE = 0x00, 0x08                  # BPF_END's source bit
# Jump operations (BPF_JMP: 64-bit compare, BPF_JMP32: low 32 bits)
EBPF_JA, EBPF_JEQ, EBPF_JGT, EBPF_JGE, EBPF_JSET, EBPF_JNE = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50
EBPF_JSGT, EBPF_JSGE, EBPF_CALL, EBPF_EXIT = 0x60, 0x70, 0x80, 0x90
EBPF_JLT, EBPF_JLE, EBPF_JSLT, EBPF_JSLE = 0xa0, 0xb0, 0xc0, 0xd0
EBPF_FETCH = 0x01                                     # atomic: old value back in src_reg
BPF_PSEUDO_MAP_FD = 1                                 # ld_imm64 src_reg: imm is a map fd
BPF_PSEUDO_CALL = 1                                   # call src_reg: imm is a pc offset

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
FP = R10
EBPF_STACK_MAX = 512
S16_MIN, S16_MAX = -(1 << 15), (1 << 15) - 1

# Helper ids (include/uapi/linux/bpf.h, __BPF_FUNC_MAPPER order; stable ABI).
HELPERS = {
    1: "map_lookup_elem", 2: "map_update_elem", 3: "map_delete_elem", 5: "ktime_get_ns",
    6: "trace_printk", 7: "get_prandom_u32", 8: "get_smp_processor_id", 12: "tail_call",
    25: "perf_event_output", 26: "skb_load_bytes", 46: "get_socket_cookie",
    47: "get_socket_uid", 68: "skb_load_bytes_relative", 130: "ringbuf_output",
    181: "loop",
}
HELPER = {name: n for n, name in HELPERS.items()}
BPF_ANY, BPF_NOEXIST = 0, 1                           # map_update_elem flags
EEXIST_NEG = -errno.EEXIST

NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "i686": 357, "riscv64": 280}.get(
    os.uname().machine, 321)
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_MAP_GET_NEXT_KEY, BPF_PROG_LOAD, BPF_PROG_TEST_RUN, BPF_OBJ_GET_INFO_BY_FD = 4, 5, 10, 15
BPF_MAP_LOOKUP_AND_DELETE_ELEM, BPF_MAP_LOOKUP_BATCH = 21, 24
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY = 1, 2, 5, 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_OBJ_NAME_LEN = 16
BPF_MAP_UPDATE_BATCH, BPF_MAP_DELETE_BATCH = 26, 27
ENOTSUPP = 524                     # the kernel's internal "not supported" (no errno name)

# union bpf_attr, one layout per command (only the fields lpd sets; the kernel wants the
# rest zero up to the size passed, which is this struct's size).
ATTR_MAP_CREATE = struct.Struct("=IIIIIII16s")       # type, key, value, max, flags, inner, numa, name
ATTR_MAP_ELEM = struct.Struct("=IxxxxQQQ")           # fd, key*, value*/next_key*, flags
ATTR_MAP_BATCH = struct.Struct("=QQQQIIQQ")          # in_batch*, out_batch*, keys*, values*, count, fd, elem_flags, flags
ATTR_MAP_BATCH_COUNT_OFF = 32                        # where the kernel writes back `count`
ATTR_PROG_LOAD = struct.Struct("=IIQQIIQII16s")      # type, insn_cnt, insns*, license*, log_level, log_size, log_buf*, kern_version, flags, name
ATTR_TEST_RUN = struct.Struct("=IIIIQQIIIIQQIII4x")  # fd, retval, size_in, size_out, in*, out*, repeat, duration, ctx_in/out ...
ATTR_TEST_RUN_RETVAL = slice(4, 8)
ATTR_TEST_RUN_DURATION = slice(36, 40)
ATTR_INFO = struct.Struct("=IIQ")                    # bpf_fd, info_len, info*
# struct bpf_prog_info: the fields lpd reads (offsets from include/uapi/linux/bpf.h).
PROG_INFO_SIZE = 232
PROG_INFO_JITED_LEN_OFF, PROG_INFO_XLATED_LEN_OFF = 16, 20      # after type, id, tag[8]
PROG_INFO_RUN_TIME_OFF, PROG_INFO_RUN_CNT_OFF = 192, 200        # run_time_ns, run_cnt (u64)
PROG_INFO_VERIFIED_INSNS_OFF = 216

# __sk_buff (include/uapi/linux/bpf.h): what a socket program reads.
# Offsets of struct __sk_buff, the socket program's context. The verifier rewrites each
# load into a load from the real sk_buff (bpf_convert_ctx_access); loads must be 4 bytes
# and aligned, except the 8-byte ones (tstamp, hwtstamp). Which offsets a SOCKET_FILTER
# may read on a kernel: the eBPF chapter's `probe` (sk_filter_is_valid_access).
SKB_FIELDS = (
    ("len", 0), ("pkt_type", 4), ("mark", 8), ("queue_mapping", 12), ("protocol", 16),
    ("vlan_present", 20), ("vlan_tci", 24), ("vlan_proto", 28), ("priority", 32),
    ("ingress_ifindex", 36), ("ifindex", 40), ("tc_index", 44), ("cb[0]", 48), ("cb[1]", 52),
    ("cb[2]", 56), ("cb[3]", 60), ("cb[4]", 64), ("hash", 68), ("tc_classid", 72), ("data", 76),
    ("data_end", 80), ("napi_id", 84), ("family", 88), ("remote_ip4", 92), ("local_ip4", 96),
    ("remote_ip6[0]", 100), ("local_ip6[0]", 116), ("remote_port", 132), ("local_port", 136),
    ("data_meta", 140), ("flow_keys", 144), ("tstamp", 152), ("wire_len", 160),
    ("gso_segs", 164), ("sk", 168), ("gso_size", 176), ("tstamp_type", 180), ("hwtstamp", 184),
)
SKB = dict(SKB_FIELDS)
SKB_LEN, SKB_PKT_TYPE, SKB_PROTOCOL = SKB["len"], SKB["pkt_type"], SKB["protocol"]
SKB_VLAN_PRESENT, SKB_VLAN_TCI, SKB_VLAN_PROTO = SKB["vlan_present"], SKB["vlan_tci"], SKB["vlan_proto"]
SKB_GSO_SEGS, SKB_GSO_SIZE = SKB["gso_segs"], SKB["gso_size"]


def _layout(fields, keep=None):
    """A Struct over `fields` ((name, code) in order, '=' byte order). With `keep`,
    the other fields become padding and the trailing ones are left off, so the hot
    loop unpacks only what it reads from the one declaration the builders use."""
    codes = []
    for name, code in fields:
        wanted = name is not None and (keep is None or name in keep)
        codes.append(code if wanted else f"{struct.calcsize('=' + code)}x")
        if wanted:
            last = len(codes)
    return struct.Struct("=" + "".join(codes[:last]))


def _offset(fields, field):
    """Byte offset of one field of a layout."""
    names = [name for name, _ in fields]
    return struct.calcsize("=" + "".join(code for _, code in fields[:names.index(field)]))


def _align(n, to):
    return (n + to - 1) & ~(to - 1)


# struct tpacket_block_desc with its tpacket_hdr_v1 (the block header of a V3 ring).
BLOCK_FIELDS = (
    ("version", "I"), ("offset_to_priv", "I"), ("block_status", "I"), ("num_pkts", "I"),
    ("offset_to_first_pkt", "I"), ("blk_len", "I"), ("seq_num", "Q"),
    ("first_sec", "I"), ("first_nsec", "I"), ("last_sec", "I"), ("last_nsec", "I"))
BLOCK = _layout(BLOCK_FIELDS)
BLOCK_STATUS_OFF = _offset(BLOCK_FIELDS, "block_status")
BLOCK_HDR_OFF = _offset(BLOCK_FIELDS, "num_pkts")
BLOCK_HDR = _layout(BLOCK_FIELDS[3:5])          # num_pkts, offset_to_first_pkt
BLOCK_LEN_OFF = _offset(BLOCK_FIELDS, "blk_len")
BLOCK_TS_FIRST = _layout(BLOCK_FIELDS[7:9])      # first_sec, first_nsec
BLOCK_TS_FIRST_OFF = _offset(BLOCK_FIELDS, "first_sec")
BLOCK_FIRST_FRAME = _align(BLOCK.size, V3_ALIGNMENT)       # BLK_PLUS_PRIV(0)

# struct tpacket3_hdr (with tpacket_hdr_variant1) then struct sockaddr_ll, as the
# kernel writes them before each frame. sll_protocol is in network byte order.
FRAME_FIELDS = (
    ("next_offset", "I"), ("sec", "I"), ("nsec", "I"), ("snaplen", "I"), ("len", "I"),
    ("status", "I"), ("mac", "H"), ("net", "H"),
    ("rxhash", "I"), ("vlan_tci", "I"), ("vlan_tpid", "H"), (None, "H"),
    (None, "8x"),                                # tp_padding
    ("sll_family", "H"), ("sll_protocol", "H"), ("sll_ifindex", "i"), ("sll_hatype", "H"),
    ("sll_pkttype", "B"), ("sll_halen", "B"), ("sll_addr", "8s"))
FRAME = _layout(FRAME_FIELDS)                    # every field: reading whole and building
FRAME_TS = _layout(FRAME_FIELDS[1:3])            # sec, nsec: the kernel's timestamp
FRAME_TS_OFF = _offset(FRAME_FIELDS, "sec")
FRAME_HDR = _layout(FRAME_FIELDS, ("next_offset", "snaplen", "len", "status", "mac",
                                   "vlan_tci", "vlan_tpid", "sll_pkttype"))   # the hot loop's
# Where tpacket_rcv() puts an Ethernet frame: the network header aligned, after the
# headers and room for the link header (tp_net = 96, tp_mac = 82).
FRAME_NET_OFF = _align(FRAME.size + TPACKET_MIN_MACLEN, TPACKET_ALIGNMENT)
ARPHRD_ETHER = 1

# struct virtio_net_hdr (linux/virtio_net.h): with PACKET_VNET_HDR the kernel writes it
# right before each frame; for a GSO/GRO super-frame it says how the NIC would cut it.
# Host byte order (vio_le(): the legacy layout is the host's).
VIRTIO_NET_HDR = struct.Struct("=BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start/offset
VIRTIO_GSO_TYPE_BACK = VIRTIO_NET_HDR.size - 1     # gso_type, counted back from the frame
VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP = 0, 1, 3
VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4 = 4, 5
VIRTIO_NET_HDR_GSO_ECN = 0x80
VIRTIO_NET_HDR_GSO_TYPE_MASK = 0x0F         # the type; the bits above are flags (ECN, ...)
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
GSO_MAX_SEGS = 65535                        # the kernel's own bound (GSO_MAX_SEGS)
# Longer than any frame (tp_len is at most 4 GiB, and in practice 512 KiB with BIG TCP)
# yet one 30-bit digit, so CPython compares it at the cost of a small int.
GSO_NEVER = (1 << 30) - 1

# Capture geometry: lpd's choices within the ABI above.
RING_BLOCK_BYTES = 1 << 20
# A block goes to userspace when full or after this; at low rates it bounds how late a
# frame is counted, at high rates blocks fill long before (see README, Performance).
RING_RETIRE_MS = 20
SNAPLEN_ACCOUNTING = 128                   # Ethernet + stacked tags + IPv6 addresses
SNAPLEN_FULL = 262144                      # libpcap's maximum


###############################################################################
# 4 Wire formats: Ethernet, VLAN, IPv4, IPv6 ##################################
###############################################################################
# provides: address, ETH_IPV4_HDR, ETHERTYPE_IPV4, ETHERTYPE_IPV6, FAMILIES, family_of_key,
#   IP_TOS_MASK, IPPROTO_*, IPV4_*, IPV6_*, MALFORMED_REASONS, raw_address, TCP_DOFF_OFF,
#   TCP_MIN_HDR_LEN, TCP_SEQ_OFF, U16BE, UDP_HDR_LEN, VLAN_*

VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100))    # 802.1Q, 802.1ad, old QinQ
VLAN_TAG = struct.Struct("!HH")
VLAN_TAG_LEN = VLAN_TAG.size
VLAN_VID_MASK = 0x0FFF                              # a tag's VLAN id, below its priority and DEI bits
U16BE = struct.Struct("!H")
ETHERTYPE_IPV4, ETHERTYPE_IPV6 = 0x0800, 0x86DD
IPV4_HDR = struct.Struct("!BxH8xII")                 # version/IHL, total length, src, dst
IPV6_HDR = struct.Struct("!B3xH2x16s16s")            # version, payload length, src, dst
ETH_IPV4_HDR = struct.Struct("!12xHBxH8xII")         # ethertype, then IPV4_HDR
IPV4_VIHL_PLAIN = 0x45                              # version 4, no options
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
IPV4_PROTO_OFF, IPV4_SRC_OFF, IPV6_NEXT_OFF, IPV6_SRC_OFF = 9, 12, 6, 8
IPV4_TOS_OFF, IPV6_TCLASS_SHIFT, IP_TOS_MASK = 1, 4, 0xFF   # IPv6's class: bits 4-11 of its first 16
IPV6_HDR_LEN, UDP_HDR_LEN, TCP_DOFF_OFF, TCP_MIN_HDR_LEN = 40, 8, 12, 20
TCP_SEQ_OFF = 4


class Family(NamedTuple):
    """What differs between IPv4 and IPv6 wherever lpd handles an address. The hot
    loop keys an IPv4 address by its integer and an IPv6 one by its 16 raw bytes,
    whichever each unpacks cheapest."""
    version: int
    address: type                                   # ipaddress class
    key_to_int: Callable                            # hot-loop key -> integer


FAMILIES = {
    4: Family(4, ipaddress.IPv4Address, int),
    6: Family(6, ipaddress.IPv6Address, lambda raw: int.from_bytes(raw, "big")),
}


def family_of_key(key):
    """The family of a hot-loop key: an int is IPv4, 16 bytes IPv6."""
    return FAMILIES[4] if type(key) is int else FAMILIES[6]


def address(key):
    """(version, hot-loop key) -> an ipaddress object."""
    version, raw = key
    return FAMILIES[version].address(raw)


def raw_address(raw):
    """4 or 16 raw bytes (as parse_l4 gives them) -> the address as text."""
    return str(ipaddress.ip_address(raw))

# Why a frame was not attributed to an address: lpd_packets_malformed_total{reason}.
MALFORMED_REASONS = (
    "truncated",   # shorter than the Ethernet/VLAN/IP header it announces
    "version",     # IP version field disagrees with the ethertype
    "ihl",         # IPv4 header length below 5 words
    "length",      # IP total length beyond the frame's wire length (or below the header)
)


###############################################################################
# 5 System helpers: interfaces, unix sockets ##################################
###############################################################################
# provides: _bind_unix_socket, _clear_stale_socket, default_interface, default_socket_path,
#   interface_flags, interface_index, interface_mac, interface_mtu, interface_networks,
#   is_localhost, LOOPBACK_ADDRESSES, resolve_group, stream_addresses


def _ifreq(ifname, request):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s, request, IFREQ.pack(ifname.encode(), 0) + bytes(8))


def interface_flags(ifname):
    """The interface's IFF_* flags, or None when it does not exist (in this netns)."""
    try:
        return IFREQ.unpack_from(_ifreq(ifname, SIOCGIFFLAGS))[1]
    except OSError:
        return None


def interface_mtu(ifname):
    """The interface's MTU, or None when it does not exist."""
    try:
        return IFREQ_INT.unpack_from(_ifreq(ifname, SIOCGIFMTU))[1]
    except OSError:
        return None


def interface_index(ifname):
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


def interface_mac(ifname):
    """'aa:bb:cc:dd:ee:ff' in lower case, as bpfcountd's $MAC."""
    try:
        raw = _ifreq(ifname, SIOCGIFHWADDR)
    except OSError as e:
        raise ConfigError(f"{ifname}: cannot read the MAC address: {e.strerror}") from None
    return ":".join(f"{b:02x}" for b in raw[IFREQ_HWADDR])


def default_interface():
    """The default route's interface, else the first up non-loopback one."""
    for path, is_default, dev_col in (
            ("/proc/net/route", lambda f: f[1] == "00000000" and f[7] == "00000000", 0),
            ("/proc/net/ipv6_route", lambda f: f[0] == "0" * 32 and f[1] == "00", 9)):
        try:
            with open(path) as fh:
                for line in fh:
                    f = line.split()
                    if len(f) > 9 and is_default(f) and f[dev_col] != "lo":
                        return f[dev_col]
        except OSError:
            pass
    for _, name in sorted(socket.if_nameindex()):
        flags = interface_flags(name)
        if flags is not None and flags & IFF_UP and not flags & IFF_LOOPBACK:
            return name
    raise ConfigError("no capture interface: no default route and no up interface; use -i IFACE")


def _netlink_dump(request_type, body):
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE) as s:
        s.sendto(NLMSGHDR.pack(NLMSGHDR.size + len(body), request_type,
                               NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body, (0, 0))
        while True:
            data = s.recv(65536)
            off = 0
            while off + NLMSGHDR.size <= len(data):
                length, mtype, _, _, _ = NLMSGHDR.unpack_from(data, off)
                if mtype == NLMSG_DONE or length < NLMSGHDR.size:
                    return
                if mtype == NLMSG_ERROR:
                    code = -NLMSGERR.unpack_from(data, off + NLMSGHDR.size)[0]
                    raise OSError(code, os.strerror(code))
                yield mtype, data[off + NLMSGHDR.size:off + length]
                off += _align(length, NLMSG_ALIGNTO)


def _rtattrs(data, off):
    attrs = {}
    while off + RTATTR.size <= len(data):
        length, atype = RTATTR.unpack_from(data, off)
        if length < RTATTR.size:
            break
        attrs[atype] = data[off + RTATTR.size:off + length]
        off += _align(length, RTA_ALIGNTO)
    return attrs


def interface_networks(ifindex):
    """The networks of the addresses configured on one interface (RTM_GETADDR)."""
    nets = []
    for mtype, msg in _netlink_dump(RTM_GETADDR, IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        family, prefixlen, _, _, index = IFADDRMSG.unpack_from(msg)
        if mtype != RTM_NEWADDR or index != ifindex or family not in (socket.AF_INET, socket.AF_INET6):
            continue
        attrs = _rtattrs(msg, IFADDRMSG.size)
        # On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is ours.
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if raw:
            net = ipaddress.ip_network((ipaddress.ip_address(raw), prefixlen), strict=False)
            if net not in nets:
                nets.append(net)
    return nets


# RFC 6761 6.3: "localhost" and names under ".localhost" are loopback by definition, and
# a minimal root file system (debootstrap minbase, many containers) has no /etc/hosts,
# where asking the resolver fails ("Temporary failure in name resolution") or asks DNS.
LOOPBACK_ADDRESSES = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))


def is_localhost(host):
    host = host.lower().rstrip(".")
    return host == "localhost" or host.endswith(".localhost")


def stream_addresses(host, port):
    """[(family, sockaddr)] to connect or bind a TCP socket to HOST:PORT, IPv4 loopback
    first for localhost (never resolved); socket.gaierror for a name that does not resolve."""
    if is_localhost(host):
        return [(family, (address, port)) for family, address in LOOPBACK_ADDRESSES]
    return [(ai[0], ai[4]) for ai in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def default_socket_path(iface):
    """Where the rule socket lives unless -u says otherwise."""
    return f"/run/lpd/{iface}.sock"


def resolve_group(spec):
    """--socket-group value (name or numeric gid) -> gid; ConfigError if unknown."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, int) or str(spec).isdigit():
        return int(spec)
    try:
        return grp.getgrnam(spec).gr_gid
    except KeyError:
        raise ConfigError(f"--socket-group: no such group {spec!r}") from None


def _probe_unix_socket(path):
    """True if something accepts connections at path, False if the file is stale."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except socket.timeout:
        return True   # a full backlog is still a live server
    finally:
        s.close()


def _clear_stale_socket(path):
    """Remove a dead socket file at path; ConfigError if it is live or not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path}: exists and is not a socket; not replacing it")
    try:
        live = _probe_unix_socket(path)
    except OSError as e:
        raise os_failure(e, f"{path}: cannot probe existing socket") from None
    if live:
        raise ConfigError(f"{path}: another lpd is serving this socket")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise os_failure(e, f"{path}: cannot remove stale socket") from None


def _bind_unix_socket(path, mode, gid):
    """Listening socket at path with mode/group set before anyone can connect.

    Binds to a temporary name in the same directory, fixes mode and group there and
    renames it into place, so the socket never exists with the umask's permissions
    and the process-wide umask is left alone (other threads may be creating files).
    """
    d = os.path.dirname(path) or "."
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    if len(os.fsencode(tmp)) > 107:
        tmp = os.path.join(d, f".lpd{os.getpid()}.tmp")
    if len(os.fsencode(path)) > 107:
        raise ConfigError(f"{path}: socket path longer than 107 bytes")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        s.bind(tmp)
        try:
            os.chmod(tmp, mode)
            if gid is not None:
                os.chown(tmp, -1, gid)
            s.listen(128)
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as e:
        s.close()
        what = "set socket group" if e.errno == errno.EPERM and gid is not None else "create socket"
        raise os_failure(e, f"{path}: cannot {what}") from None
    return s


###############################################################################
# 6 Classic BPF: opcodes, formatter, interpreter, snapshot length #############
###############################################################################
# provides: accept_all, _alu_bound, _ALU_NAMES, BPF_*, _cls, format_program, _image, _jmp,
#   _jump_taken, _LOAD_SIZES, _MAX_BACKWARD_JUMPS, pack_filter, _PKT_TYPE_MAX, program_snaplen,
#   _s32, _skb_protocol, SKF_*, U32_MAX, _UNPACK_H, _UNPACK_W

# Classic BPF, as struct sock_filter / struct bpf_insn spell it. A program is a
# list of (code, jt, jf, k) tuples.
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xa0
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50
BPF_LSH, BPF_RSH, BPF_NEG, BPF_MOD, BPF_XOR = 0x60, 0x70, 0x80, 0x90, 0xa0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10
BPF_TAX, BPF_TXA = 0x00, 0x80
BPF_MEMWORDS = 16
# The fields of an opcode (bpf.h's BPF_CLASS, BPF_SIZE, BPF_MODE, BPF_OP, BPF_SRC).
BPF_CLASS_MASK, BPF_SIZE_MASK, BPF_MODE_MASK, BPF_OP_MASK = 0x07, 0x18, 0xE0, 0xF0
BPF_RVAL_MASK = 0x18                # a ret's source: BPF_K, BPF_X or BPF_A
U32_MAX = 0xFFFFFFFF                # A, X and k are 32-bit unsigned

# Linux ancillary data: loads at these offsets read socket metadata, not packet bytes.
SKF_AD_OFF = 0xfffff000             # -0x1000 as the unsigned k of a load
SKF_AD_PROTOCOL, SKF_AD_PKTTYPE, SKF_AD_IFINDEX, SKF_AD_NLATTR = 0, 4, 8, 12
SKF_AD_NLATTR_NEST, SKF_AD_MARK, SKF_AD_QUEUE, SKF_AD_HATYPE = 16, 20, 24, 28
SKF_AD_RXHASH, SKF_AD_CPU, SKF_AD_ALU_XOR_X, SKF_AD_VLAN_TAG = 32, 36, 40, 44
SKF_AD_VLAN_TAG_PRESENT, SKF_AD_PAY_OFFSET, SKF_AD_RANDOM, SKF_AD_VLAN_TPID = 48, 52, 56, 60


def _cls(code):
    return code & BPF_CLASS_MASK


def _jmp(op):
    return BPF_JMP | op | BPF_K


def accept_all(snaplen):
    """The default kernel filter: everything, cut to the bytes lpd reads."""
    return [(0x06, 0, 0, snaplen)]        # ret #snaplen


def pack_filter(prog):
    return b"".join(SOCK_FILTER.pack(*insn) for insn in prog)


_AD_NAMES = {SKF_AD_PROTOCOL: "proto", SKF_AD_PKTTYPE: "type", SKF_AD_IFINDEX: "ifidx",
             SKF_AD_NLATTR: "nla", SKF_AD_NLATTR_NEST: "nlan", SKF_AD_MARK: "mark",
             SKF_AD_QUEUE: "queue", SKF_AD_HATYPE: "hatype", SKF_AD_RXHASH: "rxhash",
             SKF_AD_CPU: "cpu", SKF_AD_ALU_XOR_X: "xor_x", SKF_AD_VLAN_TAG: "vlan_tci",
             SKF_AD_VLAN_TAG_PRESENT: "vlanp", SKF_AD_PAY_OFFSET: "poff",
             SKF_AD_RANDOM: "random", SKF_AD_VLAN_TPID: "vlan_tpid"}
_ALU_NAMES = {BPF_ADD: "add", BPF_SUB: "sub", BPF_MUL: "mul", BPF_DIV: "div", BPF_MOD: "mod",
              BPF_AND: "and", BPF_OR: "or", BPF_XOR: "xor", BPF_LSH: "lsh", BPF_RSH: "rsh"}
_JMP_NAMES = {BPF_JGT: "jgt", BPF_JGE: "jge", BPF_JEQ: "jeq", BPF_JSET: "jset"}


def _s32(k):
    k &= U32_MAX
    return k - (1 << 32) if k & 0x80000000 else k


def _image_table():
    """{code: (name, operand)}, as libpcap's bpf_image() spells them: the operand a
    str.format template over k (signed), u (k unsigned), ad (an ancillary load's name,
    else k signed), ja (a ja's target) and code."""
    t = {BPF_RET | BPF_K: ("ret", "#{k}"), BPF_RET | BPF_A: ("ret", ""),
         BPF_LD | BPF_W | BPF_LEN: ("ld", "#pktlen"), BPF_LD | BPF_IMM: ("ld", "#0x{u:x}"),
         BPF_LDX | BPF_IMM: ("ldx", "#0x{u:x}"), BPF_LDX | BPF_MSH | BPF_B: ("ldxb", "4*([{k}]&0xf)"),
         BPF_LD | BPF_MEM: ("ld", "M[{k}]"), BPF_LDX | BPF_MEM: ("ldx", "M[{k}]"),
         BPF_ST: ("st", "M[{k}]"), BPF_STX: ("stx", "M[{k}]"), BPF_JMP | BPF_JA: ("ja", "{ja}"),
         BPF_ALU | BPF_NEG: ("neg", ""), BPF_MISC | BPF_TAX: ("tax", ""),
         BPF_MISC | BPF_TXA: ("txa", "")}
    for size, name in ((BPF_W, "ld"), (BPF_H, "ldh"), (BPF_B, "ldb")):
        t[BPF_LD | size | BPF_ABS] = (name, "[{ad}]")
        t[BPF_LD | size | BPF_IND] = (name, "[x + {k}]")
    for op, name in _JMP_NAMES.items():
        t[BPF_JMP | op | BPF_K], t[BPF_JMP | op | BPF_X] = (name, "#0x{u:x}"), (name, "x")
    for op, name in _ALU_NAMES.items():
        imm = "#0x{u:x}" if op in (BPF_AND, BPF_OR, BPF_XOR) else "#{k}"
        t[BPF_ALU | op | BPF_K], t[BPF_ALU | op | BPF_X] = (name, imm), (name, "x")
    return t


_IMAGE = _image_table()


def _image(insn, n):
    """One line of 'tcpdump -d' (libpcap's bpf_image())."""
    code, jt, jf, k = insn
    opname, operand = _IMAGE.get(code, ("unimp", "0x{code:x}"))
    ad = _AD_NAMES.get(k - SKF_AD_OFF) if k >= SKF_AD_OFF else None
    operand = operand.format(k=_s32(k), u=k, ad=ad or _s32(k), ja=_s32((n + 1 + k) & U32_MAX),
                             code=code)
    if _cls(code) == BPF_JMP and code & BPF_OP_MASK != BPF_JA:
        return f"({n:03d}) {opname:<8} {operand:<16} jt {n + 1 + jt}\tjf {n + 1 + jf}"
    return f"({n:03d}) {opname:<8} {operand}"


def format_program(prog, level=1):
    """The program as 'tcpdump -d' (level 1), '-dd' (2) or '-ddd' (3) prints it."""
    if level >= 3:
        return f"{len(prog)}\n" + "".join(f"{c} {t} {f} {k}\n" for c, t, f, k in prog)
    if level == 2:
        return "".join(f"{{ 0x{c:x}, {t}, {f}, 0x{k:08x} }},\n" for c, t, f, k in prog)
    return "".join(_image(insn, n) + "\n" for n, insn in enumerate(prog))


#
# Rules are evaluated for every frame, so a compiled program is translated once
# into Python source and compile()d (make_matcher, make_rules_counter);
# bpf_interpret is the plain interpreter that translation is measured against
# and tested with. Semantics are libpcap's userspace bpf_filter() (1.10) for
# everything it defines, and the Linux kernel's for ancillary loads, which
# libpcap's interpreter does not implement:
#   - a load past the end of the captured bytes rejects (returns 0);
#   - division or modulo by zero rejects; A and X are 32-bit unsigned;
#   - BPF_LEN is the wire length; scratch memory M[0..15] starts at 0;
#   - ja's k is sign-extended (libpcap compiles 'protochain' to a backward jump);
#     after 65536 backward jumps the frame is rejected: libpcap's protochain
#     step for AH sets X to the header length instead of adding it, so on some
#     IPv6 chains libpcap's own interpreter never returns;
#   - shifts by 32 or more give 0 (libpcap's rule for X; a K that large is
#     refused by both libpcap's compiler and the kernel's checker);
#   - an opcode libpcap's interpreter has no case for, a jump out of the
#     program, or M[k] with k >= 16 rejects instead of crashing;
#   - loads at SKF_AD_OFF + n: PKTTYPE, VLAN_TAG, VLAN_TAG_PRESENT and PROTOCOL
#     as in the kernel's net/core/filter.c; any other ancillary load rejects.
#     VLAN_TAG is the whole 16-bit TCI (PCP, DEI and VID) as since Linux 4.20
#     ("net: remove VLAN_TAG_PRESENT"); before that the kernel cleared bit 12,
#     which it used as its own "present" flag.


_PKT_TYPE_MAX = 7           # the kernel masks skb->pkt_type with this
# libpcap 1.10 loops forever on a program that jumps back forever; a frame of
# 256 KiB walked in 8-byte headers needs 32768 turns of protochain's loop.
_MAX_BACKWARD_JUMPS = 1 << 16

_UNPACK_H = U16BE.unpack_from
_UNPACK_W = struct.Struct("!I").unpack_from


def _skb_protocol(data):
    """What eth_type_trans() leaves in skb->protocol (host order), from the frame."""
    if len(data) < 14:
        return 0
    ethertype = data[12] << 8 | data[13]
    if ethertype >= 0x0600:
        return ethertype
    return 0x0001 if data[14:16] == b"\xff\xff" else 0x0004   # ETH_P_802_3 / ETH_P_802_2


def _ancillary(k, data, pkttype, vlan_tci):
    """Value of an ancillary load, or None when the kernel has nothing there for us."""
    off = k - SKF_AD_OFF
    if off == SKF_AD_PKTTYPE:
        return pkttype & _PKT_TYPE_MAX
    if off == SKF_AD_VLAN_TAG:
        return 0 if vlan_tci is None else vlan_tci & 0xFFFF
    if off == SKF_AD_VLAN_TAG_PRESENT:
        return 0 if vlan_tci is None else 1
    if off == SKF_AD_PROTOCOL:
        return _skb_protocol(data)
    return None


def _load_packet(data, size, k):
    """Big-endian load of `size` bytes at k, or None past the end (k may be huge)."""
    if k + size > len(data):
        return None
    if size == 1:
        return data[k]
    return _UNPACK_H(data, k)[0] if size == 2 else _UNPACK_W(data, k)[0]


_LOAD_SIZES = {BPF_W: 4, BPF_H: 2, BPF_B: 1}


def _alu_result(op, a, v):
    """A op v for BPF_ALU (v is K or X); None for division by zero or unknown op."""
    if op == BPF_ADD:
        return (a + v) & U32_MAX
    if op == BPF_SUB:
        return (a - v) & U32_MAX
    if op == BPF_MUL:
        return (a * v) & U32_MAX
    if op in (BPF_DIV, BPF_MOD):
        if v == 0:
            return None
        return a // v if op == BPF_DIV else a % v
    if op == BPF_OR:
        return a | v
    if op == BPF_AND:
        return a & v
    if op == BPF_XOR:
        return a ^ v
    if op == BPF_LSH:
        return (a << v) & U32_MAX if v < 32 else 0
    if op == BPF_RSH:
        return a >> v
    return None


def _jump_taken(op, a, v):
    if op == BPF_JEQ:
        return a == v
    if op == BPF_JGT:
        return a > v
    if op == BPF_JGE:
        return a >= v
    return (a & v) != 0                                         # BPF_JSET


def bpf_interpret(prog, data, wirelen, pkttype=0, vlan_tci=None):
    """Run classic BPF `prog` on a frame; the accept length (0 = reject).

    The straightforward interpreter: the reference the generated matchers are
    tested against and the baseline `make bench` measures them against.
    """
    a = x = 0
    mem = [0] * BPF_MEMWORDS
    pc, end, back = 0, len(prog), 0
    while 0 <= pc < end:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code > 0xFF:
            return 0
        cls = _cls(code)
        if cls == BPF_RET:
            if code == BPF_RET | BPF_K:
                return k
            return a if code == BPF_RET | BPF_A else 0
        if cls == BPF_LD:
            mode, size = code & BPF_MODE_MASK, code & BPF_SIZE_MASK
            if mode == BPF_ABS and size in _LOAD_SIZES:
                a = _ancillary(k, data, pkttype, vlan_tci) if k >= SKF_AD_OFF else \
                    _load_packet(data, _LOAD_SIZES[size], k)
            elif mode == BPF_IND and size in _LOAD_SIZES:
                a = _load_packet(data, _LOAD_SIZES[size], x + k)
            elif code == BPF_LD | BPF_IMM:
                a = k
            elif code == BPF_LD | BPF_W | BPF_LEN:
                a = wirelen
            elif code == BPF_LD | BPF_MEM and k < BPF_MEMWORDS:
                a = mem[k]
            else:
                return 0
            if a is None:
                return 0
        elif cls == BPF_LDX:
            if code == BPF_LDX | BPF_W | BPF_IMM:
                x = k
            elif code == BPF_LDX | BPF_W | BPF_LEN:
                x = wirelen
            elif code == BPF_LDX | BPF_W | BPF_MEM and k < BPF_MEMWORDS:
                x = mem[k]
            elif code == BPF_LDX | BPF_B | BPF_MSH and k < len(data):
                x = (data[k] & 0x0F) << 2
            else:
                return 0
        elif cls in (BPF_ST, BPF_STX):
            if code & ~BPF_CLASS_MASK or k >= BPF_MEMWORDS:
                return 0
            mem[k] = a if cls == BPF_ST else x
        elif cls == BPF_ALU:
            if code == BPF_ALU | BPF_NEG:
                a = -a & U32_MAX
            else:
                a = _alu_result(code & BPF_OP_MASK, a, x if code & BPF_X else k)
                if a is None:
                    return 0
        elif cls == BPF_JMP:
            op = code & BPF_OP_MASK
            if code == BPF_JMP | BPF_JA:
                off = k - (1 << 32) if k & 0x80000000 else k
                if off < 0:
                    back += 1
                    if back > _MAX_BACKWARD_JUMPS:
                        return 0
                pc += off
            elif op in (BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET):
                pc += jt if _jump_taken(op, a, x if code & BPF_X else k) else jf
            else:
                return 0
        elif code == BPF_MISC | BPF_TAX:
            x = a
        elif code == BPF_MISC | BPF_TXA:
            a = x
        else:
            return 0
    return 0


def _alu_bound(op, bound_a, bound_v, by_x, k):
    """Upper bound of A op v (possibly >= 2**32, meaning the result needs a mask)."""
    if op == BPF_ADD:
        return bound_a + bound_v
    if op == BPF_MUL:
        return bound_a * bound_v
    if op == BPF_LSH:           # by K < 32 here; by X handled by the caller
        return bound_a << k
    if op == BPF_SUB:
        return bound_a if not by_x and k == 0 else 1 << 33
    if op == BPF_AND:
        return min(bound_a, bound_v)
    if op in (BPF_OR, BPF_XOR):
        return (1 << max(bound_a, bound_v).bit_length()) - 1
    return bound_a              # DIV, MOD, RSH never grow A


def program_snaplen(prog, limit=SNAPLEN_FULL):
    """The fewest leading bytes of a frame on which `prog` decides as on the whole frame.

    Rules run in userspace on what the kernel copied; cutting frames to this length
    instead of keeping them whole lets the ring hold several times more frames, with
    no rule seeing a different byte. An abstract interpretation over the program's
    forward-only jumps bounds A, X and M[] from above; a load at [X + k] is bounded by
    the largest X can be. Returns `limit` where no bound below it can be proved (a
    backward jump, as in libpcap's protochain loop, wraps k past the program's end).
    """
    n = len(prog)
    states = [None] * (n + 1)                        # (A, X, M tuple) upper bounds per pc
    states[0] = (0, 0, (0,) * 16)
    need = 0

    def merge(pc, st):
        old = states[pc]
        states[pc] = st if old is None else (max(old[0], st[0]), max(old[1], st[1]),
                                             tuple(map(max, old[2], st[2])))

    for pc, (code, jt, jf, k) in enumerate(prog):
        st = states[pc]
        if st is None:                               # unreachable
            continue
        a, x, mem = st
        cls, mode, size = _cls(code), code & BPF_MODE_MASK, code & BPF_SIZE_MASK
        if cls in (BPF_LD, BPF_LDX):
            if mode == BPF_IMM:
                v = k
            elif mode == BPF_MEM:
                v = mem[k & 15]
            elif mode == BPF_LEN:
                v = limit
            elif mode == BPF_MSH:                    # 4*([k]&0xf)
                need, v = max(need, k + 1), 60
            elif k >= SKF_AD_OFF or (mode == BPF_IND and x + k >= SKF_AD_OFF):
                v = U32_MAX                             # ancillary data, not frame bytes
            else:
                need = max(need, k + (x if mode == BPF_IND else 0) + _LOAD_SIZES[size])
                v = (1 << 8 * _LOAD_SIZES[size]) - 1
            if cls == BPF_LD:
                a = v
            else:
                x = v
        elif cls in (BPF_ST, BPF_STX):
            mem = mem[:k & 15] + ((a if cls == BPF_ST else x),) + mem[(k & 15) + 1:]
        elif cls == BPF_ALU:                         # the matcher's bounds; neg and a
            op, by_x = code & BPF_OP_MASK, bool(code & BPF_X)   # shift by X may reach any value
            a = U32_MAX if op == BPF_NEG or (op == BPF_LSH and by_x) else \
                min(_alu_bound(op, a, x if by_x else k, by_x, k), U32_MAX)
        elif cls == BPF_MISC:
            if code & BPF_TXA:
                a = x
            else:
                x = a
        if need >= limit:
            return limit
        if cls == BPF_JMP:
            if code & BPF_OP_MASK == BPF_JA:
                if pc + 1 + k >= n:                  # a loop (libpcap's protochain): no bound
                    return limit
                merge(pc + 1 + k, (a, x, mem))
            else:
                merge(pc + 1 + jt, (a, x, mem))
                merge(pc + 1 + jf, (a, x, mem))
        elif cls != BPF_RET:                         # everything but ret falls through
            merge(pc + 1, (a, x, mem))
    return min(need, limit)


###############################################################################
# 7 Filter compiler ###########################################################
###############################################################################
# provides: compile_filter, FILTER_MAX_CHARS, FilterTooLarge, _Syntax

class _Syntax(FilterError):
    """A parse failure; the parser may still try another production."""


class FilterTooLarge(FilterError):
    """An expression beyond FILTER_MAX_CHARS or FILTER_MAX_BLOCKS; reason says which."""

    def __init__(self, size, limit):
        super().__init__(f"expression too large ({size}, at most {limit})")


###############################################################################
# 7.1 Protocol knowledge ######################################################
# provides: ETHER_PROTO_NAMES, ETHERMTU, ETHERTYPE, IPPROTO, ISIS_PDU, ISO_PROTO, KEYWORDS, LLC_*,
#   LLCSAP, NAMED_NUMBERS, PNAMES, PPP_MPLS_UCAST, PPP_OF_ETHERTYPE

ETHERMTU = 1500
ETHERTYPE = dict(ip=0x0800, arp=0x0806, rarp=0x8035, ip6=0x86dd, atalk=0x809b, aarp=0x80f3,
                 decnet=0x6003, sca=0x6007, lat=0x6004, mopdl=0x6001, moprc=0x6002,
                 loopback=0x9000, ipx=0x8137, ns=0x0600, vlan=0x8100, qinq_ad=0x88a8,
                 qinq=0x9100, mpls=0x8847, pppoed=0x8863, pppoes=0x8864)
LLCSAP = dict(iso=0xfe, stp=0x42, ipx=0xe0, netbeui=0xf0, ip=0x06, snap=0xaa)
# pcap_nametoeproto(), then pcap_nametollc(): the names 'ether proto' accepts.
ETHER_PROTO_NAMES = {n: ETHERTYPE[n] for n in (
    "aarp", "arp", "atalk", "decnet", "ip", "ip6", "lat", "loopback", "mopdl", "moprc",
    "rarp", "sca")}
LLC_PROTO_NAMES = {n: LLCSAP[n] for n in ("iso", "stp", "ipx", "netbeui")}
IPPROTO = dict(icmp=1, igmp=2, igrp=9, tcp=6, udp=17, icmpv6=58, ah=51, esp=50, pim=103,
               vrrp=112, carp=112, sctp=132, hopopts=0, dstopts=60, routing=43,
               fragment=44, none=59)
ISO_PROTO = dict(clnp=0x81, esis=0x82, isis=0x83)
ISIS_PDU = dict(l1_iih=15, l2_iih=16, ptp_iih=17, l1_lsp=18, l2_lsp=20, l1_csnp=24,
                l2_csnp=25, l1_psnp=26, l2_psnp=27)
LLC_S_TYPES = dict(rr=0x01, rnr=0x05, rej=0x09)
LLC_U_TYPES = dict(ui=0x03, ua=0x63, disc=0x43, dm=0x0f, sabme=0x6f, test=0xe3, xid=0xaf,
                   frmr=0x87)
# After 'pppoes' the link layer is PPP; libpcap maps Ethernet types to PPP protocols.
PPP_OF_ETHERTYPE = {0x0800: 0x0021, 0x86dd: 0x0057, 0x6003: 0x0027, 0x809b: 0x0029,
                    0x0600: 0x0025, 0xfe: 0x0023, 0x42: 0x0031, 0xe0: 0x002b}
PPP_MPLS_UCAST = 0x0281

# Keywords of scanner.l.  Protocol qualifiers carry their pname; link types that
# are not Ethernet still lex as keywords, so they cannot be host names either.
PNAMES = {"link": "link", "ether": "link", "ppp": "link", "slip": "link", "fddi": "link",
          "tr": "link", "wlan": "link", "arp": "arp", "rarp": "rarp", "ip": "ip",
          "sctp": "sctp", "tcp": "tcp", "udp": "udp", "icmp": "icmp", "igmp": "igmp",
          "igrp": "igrp", "pim": "pim", "vrrp": "vrrp", "carp": "carp", "radio": "radio",
          "ip6": "ip6", "icmp6": "icmp6", "ah": "ah", "esp": "esp", "atalk": "atalk",
          "aarp": "aarp", "decnet": "decnet", "lat": "lat", "sca": "sca", "moprc": "moprc",
          "mopdl": "mopdl", "iso": "iso", "esis": "esis", "es-is": "esis", "isis": "isis",
          "is-is": "isis", "l1": "l1", "l2": "l2", "iih": "iih", "lsp": "lsp", "snp": "snp",
          "csnp": "csnp", "psnp": "psnp", "clnp": "clnp", "stp": "stp", "ipx": "ipx",
          "netbeui": "netbeui"}
KEYWORDS = {"dst": "DST", "src": "SRC", "host": "HOST", "net": "NET", "mask": "NETMASK",
            "port": "PORT", "portrange": "PORTRANGE", "proto": "PROTO",
            "protochain": "PROTOCHAIN", "gateway": "GATEWAY", "less": "LESS",
            "greater": "GREATER", "byte": "CBYTE", "broadcast": "BROADCAST",
            "multicast": "MULTICAST", "and": "AND", "&&": "AND", "or": "OR", "||": "OR",
            "not": "!", "len": "LEN", "length": "LEN", "inbound": "INBOUND",
            "outbound": "OUTBOUND", "ifindex": "IFINDEX", "vlan": "VLAN", "mpls": "MPLS",
            "pppoed": "PPPOED", "pppoes": "PPPOES", "geneve": "GENEVE", "llc": "LLC",
            "type": "TYPE", "subtype": "SUBTYPE", "direction": "DIR", "dir": "DIR",
            "address1": "ADDR", "addr1": "ADDR", "address2": "ADDR", "addr2": "ADDR",
            "address3": "ADDR", "addr3": "ADDR", "address4": "ADDR", "addr4": "ADDR",
            "ra": "ADDR", "ta": "ADDR"}
KEYWORDS.update((w, "PNAME") for w in PNAMES)
# Link types lpd never captures: their keywords only ever produce an error.
for _w in ("lane metac bcc oam oamf4 oamf4ec oamf4sc sc ilmic vpi vci connectmsg metaconnect "
           "on ifname rset ruleset rnr rulenum srnr subrulenum reason action fisu lssu lsu "
           "msu hfisu hlssu hmsu sio opc dpc sls hsio hopc hdpc hsls").split():
    KEYWORDS[_w] = "FOREIGN"

# Named constants that lex as numbers (scanner.l).
NAMED_NUMBERS = dict(
    icmptype=0, icmpcode=1, icmp6type=0, icmp6code=1, tcpflags=13,
    **{"icmp-echoreply": 0, "icmp-unreach": 3, "icmp-sourcequench": 4, "icmp-redirect": 5,
       "icmp-echo": 8, "icmp-routeradvert": 9, "icmp-routersolicit": 10,
       "icmp-timxceed": 11, "icmp-paramprob": 12, "icmp-tstamp": 13,
       "icmp-tstampreply": 14, "icmp-ireq": 15, "icmp-ireqreply": 16, "icmp-maskreq": 17,
       "icmp-maskreply": 18, "icmp6-destinationunreach": 1, "icmp6-packettoobig": 2,
       "icmp6-timeexceeded": 3, "icmp6-parameterproblem": 4, "icmp6-echo": 128,
       "icmp6-echoreply": 129, "icmp6-multicastlistenerquery": 130,
       "icmp6-multicastlistenerreportv1": 131, "icmp6-multicastlistenerdone": 132,
       "icmp6-routersolicit": 133, "icmp6-routeradvert": 134,
       "icmp6-neighborsolicit": 135, "icmp6-neighboradvert": 136, "icmp6-redirect": 137,
       "icmp6-routerrenum": 138, "icmp6-nodeinformationquery": 139,
       "icmp6-nodeinformationresponse": 140, "icmp6-ineighbordiscoverysolicit": 141,
       "icmp6-ineighbordiscoveryadvert": 142, "icmp6-multicastlistenerreportv2": 143,
       "icmp6-homeagentdiscoveryrequest": 144, "icmp6-homeagentdiscoveryreply": 145,
       "icmp6-mobileprefixsolicit": 146, "icmp6-mobileprefixadvert": 147,
       "icmp6-certpathsolicit": 148, "icmp6-certpathadvert": 149,
       "icmp6-multicastrouteradvert": 151, "icmp6-multicastroutersolicit": 152,
       "icmp6-multicastrouterterm": 153, "tcp-fin": 0x01, "tcp-syn": 0x02,
       "tcp-rst": 0x04, "tcp-push": 0x08, "tcp-ack": 0x10, "tcp-urg": 0x20,
       "tcp-ece": 0x40, "tcp-cwr": 0x80})

###############################################################################
# 7.2 Lexer ###################################################################
# provides: Token, tokenize
#
# Flex semantics, i.e. the longest match wins and ties go to the earlier rule.

_W = r"[0-9A-Fa-f]{1,4}"
_N = r"(?:0[xX][0-9A-Fa-f]+|[0-9]+)"
_V4 = rf"{_N}\.{_N}\.{_N}\.{_N}"


def _v6_patterns():
    """scanner.l's V6 alternatives: n groups, '::' after group i, optional IPv4 tail."""
    pats = [":".join([_W] * 8), ":".join([_W] * 6) + ":" + _V4]
    for tail, total in (("", 8), (_V4, 6)):
        for n in range(total - 1, -1, -1):
            for i in range(n + 1):
                left, right = ":".join([_W] * i), ":".join([_W] * (n - i))
                if tail:
                    right = (right + ":" if right else "") + tail
                pats.append(left + "::" + right)
    return [re.compile(p) for p in pats]


_LEX = [  # (kind, [regexes]) in rule order; keywords are handled before these
    ("OP2", [re.compile(r">=|<=|!=|==|<<|>>")]),
    ("OP1", [re.compile(r"[-+*/%:\[\]!<>()&|^=]")]),
    ("AID", [re.compile(r"\$[0-9A-Fa-f]{1,2}")]),
    ("EID", [re.compile(p) for p in (
        r"[0-9A-Fa-f]{1,2}(?::[0-9A-Fa-f]{1,2}){5}", r"[0-9A-Fa-f]{1,2}(?:-[0-9A-Fa-f]{1,2}){5}",
        r"[0-9A-Fa-f]{1,2}(?:\.[0-9A-Fa-f]{1,2}){5}", r"[0-9A-Fa-f]{4}(?:\.[0-9A-Fa-f]{4}){2}",
        r"[0-9A-Fa-f]{12}")]),
    ("NUM", [re.compile(r"0[xX][0-9A-Fa-f]+"), re.compile(r"[0-9]+")]),
    ("HID", [re.compile(rf"{_N}(?:\.{_N}){{1,3}}")]),
    ("HID6", _v6_patterns()),
    ("BADEID", [re.compile(r"[0-9A-Fa-f]{1,2}:+(?:[0-9A-Fa-f]{1,2}:+)+")]),
    ("NAMED", None),
    ("ID", [re.compile(r"[A-Za-z0-9](?:[-_.A-Za-z0-9]*[.A-Za-z0-9])?")]),
    ("ESCID", [re.compile(r"\\[^ !()\n\t]+")]),
]
_WORD = re.compile(r"[A-Za-z0-9&|][-A-Za-z0-9&|]*")
_HEX_RUN = re.compile(r"[0-9A-Fa-f:.]*")


class Token:
    __slots__ = ("kind", "value", "text", "col")

    def __init__(self, kind, value, text, col):
        self.kind, self.value, self.text, self.col = kind, value, text, col

    def __repr__(self):
        return f"Token({self.kind}, {self.value!r}, col {self.col})"


def _longest(regexes, text, pos):
    best = 0
    for r in regexes:
        m = r.match(text, pos)
        if m and m.end() - pos > best:
            best = m.end() - pos
    return best


def _number(text, col):
    """stou(): decimal, 0x hex or 0 octal, unsigned 32 bits."""
    if text[:2] in ("0x", "0X"):
        n = int(text[2:], 16)
    elif text.startswith("0") and len(text) > 1:
        if re.search(r"[89]", text):
            raise FilterError(f"number {text} contains non-octal digit", col)
        n = int(text, 8)
    else:
        n = int(text)
    if n > U32_MAX:
        raise FilterError(f"number {text} overflows 32 bits", col)
    return n


def tokenize(expr):
    """The tokens of a filter expression, ending with an EOF token."""
    toks, pos, n = [], 0, len(expr)
    while True:
        while pos < n and expr[pos] in " \r\n\t":
            pos += 1
        col = pos + 1
        if pos >= n:
            toks.append(Token("EOF", None, "", col))
            return toks
        # Literal words (keywords first, named numbers later in rule order).
        kw_len = named_len = 0
        m = _WORD.match(expr, pos)
        if m:
            word = m.group()
            for end in range(len(word), 0, -1):
                w = word[:end]
                if w in KEYWORDS and not kw_len:
                    kw_len = end
                if w in NAMED_NUMBERS and not named_len:
                    named_len = end
        best_kind, best_len = None, 0
        if kw_len:
            best_kind, best_len = "KEYWORD", kw_len
        # Every IPv6 and bad-MAC pattern has a ':' within its run of these characters:
        # without one, their dozens of regexes cannot match here.
        colon = ":" in _HEX_RUN.match(expr, pos).group()
        for kind, regexes in _LEX:
            if not colon and kind in ("HID6", "BADEID"):
                continue
            length = named_len if kind == "NAMED" else _longest(regexes, expr, pos)
            if length > best_len:
                best_kind, best_len = kind, length
        if not best_kind:
            raise _Syntax(f"unexpected character {expr[pos]!r}", col)
        text = expr[pos:pos + best_len]
        pos += best_len
        if best_kind == "KEYWORD":
            kind = KEYWORDS[text]
            value = PNAMES.get(text) if kind == "PNAME" else text
            toks.append(Token(kind, value, text, col))
        elif best_kind in ("OP1", "OP2"):
            toks.append(Token({"==": "="}.get(text, text), text, text, col))
        elif best_kind == "NAMED":
            toks.append(Token("NUM", NAMED_NUMBERS[text], text, col))
        elif best_kind == "NUM":
            toks.append(Token("NUM", _number(text, col), text, col))
        elif best_kind == "ESCID":
            toks.append(Token("ID", text[1:], text, col))
        elif best_kind == "BADEID":
            raise FilterError(f"bogus ethernet address {text}", col)
        elif best_kind == "HID6":
            try:
                socket.inet_pton(socket.AF_INET6, text)
            except OSError:
                raise FilterError(f"bogus IPv6 address {text}", col) from None
            toks.append(Token("HID6", text, text, col))
        else:
            toks.append(Token(best_kind, text, text, col))

###############################################################################
# 7.3 Intermediate code #######################################################
# provides: _Arth, _backpatch, _Block, DEFAULT, EN10MB, gen_and, gen_not, gen_or, NOP, _Offset,
#   PPP, QERR, _Stmt
#
# gencode.c's blocks of statements ending in a branch or return.

NOP = -1


class _Stmt:
    __slots__ = ("code", "k", "jt", "jf")

    def __init__(self, code, k=0):
        # k is a u_int in libpcap: offsets like -2 wrap, and the optimiser must see that.
        self.code, self.k, self.jt, self.jf = code, k & U32_MAX, None, None


class _Edge:
    __slots__ = ("id", "code", "edom", "succ", "pred", "next")

    def __init__(self, pred):
        self.pred, self.succ, self.next, self.id, self.code, self.edom = pred, None, None, 0, 0, 0


class _Block:
    __slots__ = ("id", "stmts", "s", "et", "ef", "sense", "head", "link", "level", "offset",
                 "longjt", "longjf", "dom", "in_edges", "val", "oval", "kill", "in_use",
                 "out_use", "mark", "dom_lo", "dom_hi")

    def __init__(self, code, k=0, stmts=None):
        self.s = _Stmt(code, k)
        self.stmts = stmts or []
        self.et, self.ef = _Edge(self), _Edge(self)
        self.sense, self.head, self.link = 0, self, None
        self.longjt = self.longjf = 0
        self.id = self.level = self.offset = self.dom = self.oval = 0
        self.kill = self.in_use = self.out_use = 0
        self.in_edges, self.val, self.mark = None, None, 0
        self.dom_lo = self.dom_hi = -1

    @property
    def jt(self):
        return self.et.succ

    @property
    def jf(self):
        return self.ef.succ


# While parsing, a block's unresolved true (sense 0) or false exits are chained
# through those very edges; backpatch() points a whole chain at its target.
def _backpatch(lst, target):
    while lst:
        e = lst.ef if lst.sense else lst.et
        lst, e.succ = e.succ, target


def _merge(b0, b1):
    p = b0
    while True:
        e = p.ef if p.sense else p.et
        if e.succ is None:
            e.succ = b1
            return
        p = e.succ


def gen_and(b0, b1):
    _backpatch(b0, b1.head)
    b0.sense ^= 1
    b1.sense ^= 1
    _merge(b1, b0)
    b1.sense ^= 1
    b1.head = b0.head


def gen_or(b0, b1):
    b0.sense ^= 1
    _backpatch(b0, b1.head)
    b0.sense ^= 1
    _merge(b1, b0)
    b1.head = b0.head


def gen_not(b):
    b.sense ^= 1


class _Offset:
    """An absolute offset: a constant part plus, if variable, a scratch register."""
    __slots__ = ("constant_part", "is_variable", "reg")

    def __init__(self, constant_part, is_variable=False, reg=-1):
        self.constant_part, self.is_variable, self.reg = constant_part, is_variable, reg

    def copy(self):
        return _Offset(self.constant_part, self.is_variable, self.reg)


class _Arth:
    """An arithmetic value: statements leaving it in scratch register regno, plus the
    protocol tests (b) that must hold for the loads in it to make sense."""
    __slots__ = ("s", "regno", "b")

    def __init__(self, s, regno, b=None):
        self.s, self.regno, self.b = s, regno, b


DEFAULT = "default"
QERR = ("undef", "undef", "undef")     # qualifiers: (proto, dir, addr)
EN10MB, PPP = "Ethernet", "PPP"

###############################################################################
# 7.4 Code generator ##########################################################
# provides: _Gen
#
# gencode.c: small generators returning blocks to combine.

class _Gen:
    """The compiler state for one expression: link layer and header offsets, which
    'vlan', 'mpls' and 'pppoes' move for everything parsed after them."""

    def __init__(self, kernel, snaplen):
        self.kernel, self.snaplen = kernel, snaplen
        self.linktype, self.prevlinktype = EN10MB, None
        self.off_linkhdr = _Offset(0)
        self.off_prevlinkhdr = _Offset(0)
        self.off_outermostlinkhdr = _Offset(0)
        self.off_linktype = _Offset(12)
        self.off_linkpl = _Offset(14)
        self.off_nl, self.off_nl_nosnap = 0, 3
        self.label_stack_depth = self.vlan_stack_depth = 0
        self.is_vlan_vloffset = self.is_geneve = False
        self.no_optimize = False
        self.regused, self.curreg = [False] * BPF_MEMWORDS, 0
        self.col = 1            # where errors are reported
        # Names looked up (hosts, networks, ports, protocols, MACs: /etc and DNS), also
        # by alternatives attempt() rewound: one list object, which restore() keeps.
        self.names = []

    def error(self, reason):
        raise FilterError(reason, self.col)

    def snapshot(self):
        d = {k: v for k, v in vars(self).items()}
        for k in ("off_linkhdr", "off_prevlinkhdr", "off_outermostlinkhdr", "off_linktype",
                  "off_linkpl"):
            d[k] = d[k].copy()
        d["regused"] = list(self.regused)
        return d

    def restore(self, d):
        vars(self).update(d)

    # -- scratch memory registers --------------------------------------------
    def alloc_reg(self):
        for _ in range(BPF_MEMWORDS):
            if not self.regused[self.curreg]:
                self.regused[self.curreg] = True
                return self.curreg
            self.curreg = (self.curreg + 1) % BPF_MEMWORDS
        self.error("too many registers needed to evaluate expression")

    def free_reg(self, n):
        self.regused[n] = False

    # -- loads ---------------------------------------------------------------
    def abs_offset_varpart(self, off):
        if not off.is_variable:
            return None
        if off.reg == -1:
            off.reg = self.alloc_reg()
        return [_Stmt(BPF_LDX | BPF_MEM, off.reg)]

    def load_absoffsetrel(self, off, offset, size):
        s = self.abs_offset_varpart(off)
        if s is not None:
            return s + [_Stmt(BPF_LD | BPF_IND | size, off.constant_part + offset)]
        return [_Stmt(BPF_LD | BPF_ABS | size, off.constant_part + offset)]

    def loadx_iphdrlen(self):
        s = self.abs_offset_varpart(self.off_linkpl)
        k = self.off_linkpl.constant_part + self.off_nl
        if s is not None:
            return s + [_Stmt(BPF_LD | BPF_IND | BPF_B, k), _Stmt(BPF_ALU | BPF_AND | BPF_K, 0xf),
                        _Stmt(BPF_ALU | BPF_LSH | BPF_K, 2), _Stmt(BPF_ALU | BPF_ADD | BPF_X),
                        _Stmt(BPF_MISC | BPF_TAX)]
        return [_Stmt(BPF_LDX | BPF_MSH | BPF_B, k)]

    def load_a(self, offrel, offset, size):
        """Load a field at offset from the start of the header 'offrel' names."""
        pl, nl = self.off_linkpl, self.off_nl
        if offrel == "packet":
            return [_Stmt(BPF_LD | BPF_ABS | size, offset)]
        if offrel == "linkhdr":
            return self.load_absoffsetrel(self.off_linkhdr, offset, size)
        if offrel == "prevlinkhdr":
            return self.load_absoffsetrel(self.off_prevlinkhdr, offset, size)
        if offrel == "llc":
            return self.load_absoffsetrel(pl, offset, size)
        if offrel == "prevmplshdr":
            return self.load_absoffsetrel(pl, nl - 4 + offset, size)
        if offrel == "linkpl":
            return self.load_absoffsetrel(pl, nl + offset, size)
        if offrel == "linkpl_nosnap":
            return self.load_absoffsetrel(pl, self.off_nl_nosnap + offset, size)
        if offrel == "linktype":
            return self.load_absoffsetrel(self.off_linktype, offset, size)
        if offrel == "tran_ipv4":
            return self.loadx_iphdrlen() + [
                _Stmt(BPF_LD | BPF_IND | size, pl.constant_part + nl + offset)]
        if offrel == "tran_ipv6":
            return self.load_absoffsetrel(pl, nl + 40 + offset, size)
        raise AssertionError(offrel)

    # -- comparisons ---------------------------------------------------------
    def ncmp(self, offrel, offset, size, mask, jtype, reverse, v):
        s = self.load_a(offrel, offset & U32_MAX, size)
        if mask != U32_MAX:
            s.append(_Stmt(BPF_ALU | BPF_AND | BPF_K, mask))
        b = _Block(_jmp(jtype), v & U32_MAX, s)
        if reverse and jtype in (BPF_JGT, BPF_JGE):
            gen_not(b)
        return b

    def cmp(self, offrel, offset, size, v):
        return self.ncmp(offrel, offset, size, U32_MAX, BPF_JEQ, False, v)

    def cmp_gt(self, offrel, offset, size, v):
        return self.ncmp(offrel, offset, size, U32_MAX, BPF_JGT, False, v)

    def cmp_ge(self, offrel, offset, size, v):
        return self.ncmp(offrel, offset, size, U32_MAX, BPF_JGE, False, v)

    def cmp_lt(self, offrel, offset, size, v):
        return self.ncmp(offrel, offset, size, U32_MAX, BPF_JGE, True, v)

    def cmp_le(self, offrel, offset, size, v):
        return self.ncmp(offrel, offset, size, U32_MAX, BPF_JGT, True, v)

    def mcmp(self, offrel, offset, size, v, mask):
        return self.ncmp(offrel, offset, size, mask, BPF_JEQ, False, v)

    def bcmp(self, offrel, offset, data):
        """Compare a byte string, in words then halfwords then a byte, last part first."""
        b, size = None, len(data)
        for width, load in ((4, BPF_W), (2, BPF_H), (1, BPF_B)):
            while size >= width:
                tmp = self.cmp(offrel, offset + size - width, load,
                               int.from_bytes(data[size - width:size], "big"))
                if b is not None:
                    gen_and(b, tmp)
                b, size = tmp, size - width
        return b

    def uncond(self, rsense):
        return _Block(_jmp(BPF_JEQ), 0, [_Stmt(BPF_LD | BPF_IMM, int(not rsense))])

    def true(self):
        return self.uncond(1)

    def retblk(self, v):
        return _Block(BPF_RET | BPF_K, v)

    # -- link layer ----------------------------------------------------------
    def linktype_test(self, ll_proto):
        """gen_linktype(): is the payload of this link layer of type ll_proto?"""
        if self.label_stack_depth > 0:
            return self.mpls_linktype(ll_proto)
        if self.linktype == PPP:
            return self.cmp("linktype", 0, BPF_H, PPP_OF_ETHERTYPE.get(ll_proto, ll_proto))
        return self.ether_linktype(ll_proto)

    def ether_linktype(self, ll_proto):
        # Values up to ETHERMTU are 802.3 lengths, so those protocols live in 802.2 LLC.
        if ll_proto in (LLCSAP["iso"], LLCSAP["ip"], LLCSAP["netbeui"]):
            b0 = self.cmp_gt("linktype", 0, BPF_H, ETHERMTU)
            gen_not(b0)
            b1 = self.cmp("llc", 0, BPF_H, (ll_proto << 8) | ll_proto)
            gen_and(b0, b1)
            return b1
        if ll_proto == LLCSAP["ipx"]:
            b0 = self.cmp("llc", 0, BPF_B, LLCSAP["ipx"])
            b1 = self.cmp("llc", 0, BPF_H, 0xffff)
            gen_or(b0, b1)
            b0 = self.snap(0x000000, ETHERTYPE["ipx"])
            gen_or(b0, b1)
            b0 = self.cmp_gt("linktype", 0, BPF_H, ETHERMTU)
            gen_not(b0)
            gen_and(b0, b1)
            b0 = self.cmp("linktype", 0, BPF_H, ETHERTYPE["ipx"])
            gen_or(b0, b1)
            return b1
        if ll_proto in (ETHERTYPE["atalk"], ETHERTYPE["aarp"]):
            b0 = self.cmp_gt("linktype", 0, BPF_H, ETHERMTU)
            gen_not(b0)
            if ll_proto == ETHERTYPE["atalk"]:
                b1 = self.snap(0x080007, ETHERTYPE["atalk"])
            else:
                b1 = self.snap(0x000000, ETHERTYPE["aarp"])
            gen_and(b0, b1)
            b0 = self.cmp("linktype", 0, BPF_H, ll_proto)
            gen_or(b0, b1)
            return b1
        if ll_proto <= ETHERMTU:
            b0 = self.cmp_gt("linktype", 0, BPF_H, ETHERMTU)
            gen_not(b0)
            b1 = self.cmp("linktype", 2, BPF_B, ll_proto)
            gen_and(b0, b1)
            return b1
        return self.cmp("linktype", 0, BPF_H, ll_proto)

    def snap(self, orgcode, ptype):
        return self.bcmp("llc", 0, bytes([0xaa, 0xaa, 0x03]) + orgcode.to_bytes(3, "big")
                         + ptype.to_bytes(2, "big"))

    def mpls_linktype(self, ll_proto):
        # Below an MPLS label, only the bottom-of-stack bit and the IP version tell.
        if ll_proto in (ETHERTYPE["ip"], ETHERTYPE["ip6"]):
            b0 = self.mcmp("linkpl", -2, BPF_B, 0x01, 0x01)
            b1 = self.mcmp("linkpl", 0, BPF_B, 0x40 if ll_proto == ETHERTYPE["ip"] else 0x60, 0xf0)
            gen_and(b0, b1)
            return b1
        self.error("unsupported protocol over mpls")

    def llc(self):
        if self.linktype != EN10MB:
            self.error(f"'llc' not supported for {self.linktype}")
        b0 = self.cmp_gt("linktype", 0, BPF_H, ETHERMTU)
        gen_not(b0)
        b1 = self.cmp("llc", 0, BPF_H, 0xffff)     # not Novell's raw 802.3
        gen_not(b1)
        gen_and(b0, b1)
        return b1

    def llc_type(self, name):
        """'llc i|s|u' and 'llc <S or U frame type>': tests on the LLC control byte."""
        name_l = name.lower()
        if name_l == "i":
            b0 = self.llc()
            b1 = _Block(_jmp(BPF_JSET), 0x01, self.load_a("llc", 2, BPF_B))
            gen_not(b1)
            gen_and(b0, b1)
            return b1
        if name_l in ("s", "u"):
            value, mask = (1 if name_l == "s" else 3), 0x03
        elif name_l in LLC_S_TYPES:
            value, mask = LLC_S_TYPES[name_l], 0x0f
        elif name_l in LLC_U_TYPES:
            value, mask = LLC_U_TYPES[name_l], 0xef
        else:
            self.error(f'unknown LLC type name "{name}"')
        b0 = self.llc()
        b1 = self.mcmp("llc", 2, BPF_B, value, mask)
        gen_and(b0, b1)
        return b1

    # -- addresses -----------------------------------------------------------
    def _dir_error(self, d, what):
        self.error(f"'{d}' is not a valid qualifier for {what}")

    def hostop(self, addr, mask, d, ll_proto, src_off, dst_off):
        if d in ("and", "or", DEFAULT):
            b0 = self.hostop(addr, mask, "src", ll_proto, src_off, dst_off)
            b1 = self.hostop(addr, mask, "dst", ll_proto, src_off, dst_off)
            (gen_and if d == "and" else gen_or)(b0, b1)
            return b1
        if d not in ("src", "dst"):
            self._dir_error(d, "addresses other than 802.11 MAC addresses")
        b0 = self.linktype_test(ll_proto)
        b1 = self.mcmp("linkpl", src_off if d == "src" else dst_off, BPF_W, addr, mask)
        gen_and(b0, b1)
        return b1

    def hostop6(self, addr, mask, d, src_off, dst_off):
        if d in ("and", "or", DEFAULT):
            b0 = self.hostop6(addr, mask, "src", src_off, dst_off)
            b1 = self.hostop6(addr, mask, "dst", src_off, dst_off)
            (gen_and if d == "and" else gen_or)(b0, b1)
            return b1
        if d not in ("src", "dst"):
            self._dir_error(d, "addresses other than 802.11 MAC addresses")
        off = src_off if d == "src" else dst_off
        word = [(int.from_bytes(addr[i:i + 4], "big"), int.from_bytes(mask[i:i + 4], "big"))
                for i in range(0, 16, 4)]
        b1 = self.mcmp("linkpl", off + 12, BPF_W, *word[3])
        for i in (2, 1, 0):
            b0 = self.mcmp("linkpl", off + 4 * i, BPF_W, *word[i])
            gen_and(b0, b1)
        b0 = self.linktype_test(ETHERTYPE["ip6"])
        gen_and(b0, b1)
        return b1

    def ehostop(self, eaddr, d):
        if d == "src":
            return self.bcmp("linkhdr", 6, eaddr)
        if d == "dst":
            return self.bcmp("linkhdr", 0, eaddr)
        if d in ("and", "or", DEFAULT):
            b0 = self.ehostop(eaddr, "src")
            b1 = self.ehostop(eaddr, "dst")
            (gen_and if d == "and" else gen_or)(b0, b1)
            return b1
        self.error(f"'{d}' is only supported on 802.11 with 802.11 headers")

    def dnhostop(self, addr, d):
        if d in ("and", "or", DEFAULT):
            b0 = self.dnhostop(addr, "src")
            b1 = self.dnhostop(addr, "dst")
            (gen_and if d == "and" else gen_or)(b0, b1)
            return b1
        if d not in ("src", "dst"):
            self._dir_error(d, "addresses other than 802.11 MAC addresses")
        off_sh, off_lh = (1, 7) if d == "dst" else (3, 15)
        a = ((addr & 0xff) << 8) | ((addr >> 8) & 0xff)     # DECnet addresses are little-endian
        b0 = self.linktype_test(ETHERTYPE["decnet"])
        tmp = self.mcmp("linkpl", 2, BPF_H, 0x8106, 0xff07)
        b1 = self.cmp("linkpl", 2 + 1 + off_lh, BPF_H, a)
        gen_and(tmp, b1)
        tmp = self.mcmp("linkpl", 2, BPF_B, 0x06, 0x7)
        b2 = self.cmp("linkpl", 2 + off_lh, BPF_H, a)
        gen_and(tmp, b2)
        gen_or(b2, b1)
        tmp = self.mcmp("linkpl", 2, BPF_H, 0x8102, 0xff07)
        b2 = self.cmp("linkpl", 2 + 1 + off_sh, BPF_H, a)
        gen_and(tmp, b2)
        gen_or(b2, b1)
        tmp = self.mcmp("linkpl", 2, BPF_B, 0x02, 0x7)
        b2 = self.cmp("linkpl", 2 + off_sh, BPF_H, a)
        gen_and(tmp, b2)
        gen_or(b2, b1)
        gen_and(b0, b1)
        return b1

    _NOT_HOST = {"sctp", "tcp", "udp", "icmp", "igmp", "igrp", "icmp6", "ah", "esp", "pim",
                 "vrrp", "esis", "isis", "clnp", "stp", "netbeui", "l1", "l2", "iih", "snp",
                 "csnp", "psnp", "lsp", "radio", "carp"}

    def host(self, addr, mask, proto, d, typ):
        """An IPv4 address (or DECnet one) in whatever carries it: ip, arp, rarp."""
        if proto == DEFAULT:
            b0 = self.host(addr, mask, "ip", d, typ)
            if self.label_stack_depth == 0:
                b1 = self.host(addr, mask, "arp", d, typ)
                gen_or(b0, b1)
                b0 = self.host(addr, mask, "rarp", d, typ)
                gen_or(b1, b0)
            return b0
        if proto == "ip":
            return self.hostop(addr, mask, d, ETHERTYPE["ip"], 12, 16)
        if proto in ("arp", "rarp"):
            return self.hostop(addr, mask, d, ETHERTYPE[proto], 14, 24)
        if proto == "decnet":
            return self.dnhostop(addr, d)
        if proto == "link":
            self.error(f"link-layer modifier applied to {typ}")
        if proto == "ip6":
            self.error("'ip6' modifier applied to ip host")
        if proto in self._NOT_HOST:
            self.error(f"'{proto}' modifier applied to {typ}")
        self.error(f"{proto.upper()} host filtering not implemented")

    def host6(self, addr, mask, proto, d, typ):
        if proto in (DEFAULT, "ip6"):
            return self.hostop6(addr, mask, d, 8, 24)
        if proto == "link":
            self.error(f"link-layer modifier applied to ip6 {typ}")
        self.error(f"'{proto}' modifier applied to ip6 {typ}")

    # -- protocols -----------------------------------------------------------
    def proto_abbrev(self, proto):
        """A bare protocol name: 'tcp', 'ip6', 'arp', 'stp' …"""
        ip_only = {"icmp", "igmp", "igrp", "vrrp", "carp"}
        if proto in ("sctp", "tcp", "udp", "pim", "ah", "esp"):
            return self.proto(IPPROTO[proto], DEFAULT, DEFAULT)
        if proto in ip_only:
            return self.proto(IPPROTO[proto], "ip", DEFAULT)
        if proto == "icmp6":
            return self.proto(IPPROTO["icmpv6"], "ip6", DEFAULT)
        if proto in ("ip", "arp", "rarp", "atalk", "aarp", "decnet", "sca", "lat", "mopdl",
                     "moprc", "ip6"):
            return self.linktype_test(ETHERTYPE[proto])
        if proto in ("iso", "stp", "ipx", "netbeui"):
            return self.linktype_test(LLCSAP[proto])
        if proto in ISO_PROTO:
            return self.proto(ISO_PROTO[proto], "iso", DEFAULT)
        isis = {"l1": ("l1_iih", "ptp_iih", "l1_lsp", "l1_csnp", "l1_psnp"),
                "l2": ("l2_iih", "ptp_iih", "l2_lsp", "l2_csnp", "l2_psnp"),
                "iih": ("l1_iih", "l2_iih", "ptp_iih"), "lsp": ("l1_lsp", "l2_lsp"),
                "snp": ("l1_csnp", "l2_csnp", "l1_psnp", "l2_psnp"),
                "csnp": ("l1_csnp", "l2_csnp"), "psnp": ("l1_psnp", "l2_psnp")}
        if proto in isis:
            pdus = isis[proto]
            b1 = self.proto(ISIS_PDU[pdus[0]], "isis", DEFAULT)
            b0 = self.proto(ISIS_PDU[pdus[1]], "isis", DEFAULT)
            gen_or(b1, b0)
            b1 = b0
            for pdu in pdus[2:]:
                b0 = self.proto(ISIS_PDU[pdu], "isis", DEFAULT)
                gen_or(b0, b1)
            return b1
        if proto == "link":
            self.error("link layer applied in wrong context")
        self.error(f"'{proto}' is not a valid protocol type")

    def proto(self, v, proto, d):
        """'[ip|ip6|ether|iso|isis] proto v'."""
        if d != DEFAULT:
            self.error("direction applied to 'proto'")
        if proto == DEFAULT:
            b0 = self.proto(v, "ip", d)
            b1 = self.proto(v, "ip6", d)
            gen_or(b0, b1)
            return b1
        if proto == "link":
            return self.linktype_test(v)
        if proto == "ip":
            b0 = self.linktype_test(ETHERTYPE["ip"])
            b1 = self.cmp("linkpl", 9, BPF_B, v)
            gen_and(b0, b1)
            return b1
        if proto == "ip6":
            # Only one extension header is looked through: a fragment header.
            b0 = self.linktype_test(ETHERTYPE["ip6"])
            b2 = self.cmp("linkpl", 6, BPF_B, IPPROTO["fragment"])
            b1 = self.cmp("linkpl", 40, BPF_B, v)
            gen_and(b2, b1)
            b2 = self.cmp("linkpl", 6, BPF_B, v)
            gen_or(b2, b1)
            gen_and(b0, b1)
            return b1
        if proto == "iso":
            b0 = self.linktype_test(LLCSAP["iso"])
            b1 = self.cmp("linkpl_nosnap", 0, BPF_B, v)
            gen_and(b0, b1)
            return b1
        if proto == "isis":
            b0 = self.proto(ISO_PROTO["isis"], "iso", DEFAULT)
            b1 = self.cmp("linkpl_nosnap", 4, BPF_B, v)
            gen_and(b0, b1)
            return b1
        if proto in ("arp", "rarp", "lat", "sca", "moprc", "mopdl"):
            self.error(f"{proto} does not encapsulate another protocol")
        if proto in ("atalk", "decnet"):
            self.error(f"{proto} encapsulation is not specifiable")
        self.error(f"'{proto} proto' is bogus")

    def ipfrag(self):
        """True for the first (or only) fragment: later ones carry no ports."""
        b = _Block(_jmp(BPF_JSET), 0x1fff, self.load_a("linkpl", 6, BPF_H))
        gen_not(b)
        return b

    def portop(self, tran, lo, hi, ipproto, d):
        """Ports (lo..hi) of one transport protocol over IPv4 (tran 'tran_ipv4') or IPv6."""
        if tran == "tran_ipv4":
            tmp = self.cmp("linkpl", 9, BPF_B, ipproto)
            b0 = self.ipfrag()
            gen_and(tmp, b0)
        else:
            b0 = self.cmp("linkpl", 6, BPF_B, ipproto)

        def atom(off):
            if lo is None:
                return self.cmp(tran, off, BPF_H, hi)
            b1 = self.cmp_ge(tran, off, BPF_H, lo)
            b2 = self.cmp_le(tran, off, BPF_H, hi)
            gen_and(b1, b2)
            return b2

        if d in ("src", "dst"):
            b1 = atom(0 if d == "src" else 2)
        elif d in ("and", "or", DEFAULT):
            tmp = atom(0)
            b1 = atom(2)
            (gen_and if d == "and" else gen_or)(tmp, b1)
        else:
            self._dir_error(d, "ports" if lo is None else "port ranges")
        gen_and(b0, b1)
        return b1

    def port(self, lo, hi, ipproto, d):
        """'port' (lo None) or 'portrange' over IPv4 or IPv6; ipproto None = tcp/udp/sctp."""
        if lo is not None and lo > hi:
            lo, hi = hi, lo
        result = self.port_over("tran_ipv4", lo, hi, ipproto, d)
        gen_or(self.port_over("tran_ipv6", lo, hi, ipproto, d), result)
        return result

    def port_over(self, tran, lo, hi, ipproto, d):
        b0 = self.linktype_test(ETHERTYPE["ip" if tran == "tran_ipv4" else "ip6"])
        if ipproto is not None:
            b1 = self.portop(tran, lo, hi, ipproto, d)
        else:
            tmp = self.portop(tran, lo, hi, IPPROTO["tcp"], d)
            b1 = self.portop(tran, lo, hi, IPPROTO["udp"], d)
            gen_or(tmp, b1)
            tmp = self.portop(tran, lo, hi, IPPROTO["sctp"], d)
            gen_or(tmp, b1)
        gen_and(b0, b1)
        return b1

    def protochain(self, v, proto):
        """Follow IPv6 extension headers and AH up to protocol v (a loop: no optimiser)."""
        reg2 = self.alloc_reg()     # allocated (and for 'default' leaked) as libpcap does
        if proto == DEFAULT:
            b0 = self.protochain(v, "ip")
            b = self.protochain(v, "ip6")
            gen_or(b0, b)
            return b
        if proto not in ("ip", "ip6"):
            self.error("bad protocol applied for 'protochain'")
        if self.off_linkpl.is_variable:
            self.error("'protochain' not supported with variable length headers")
        if self.kernel:
            self.error("'protochain' needs backward jumps, which the kernel refuses")
        self.no_optimize = True
        base = self.off_linkpl.constant_part + self.off_nl
        S = _Stmt
        if proto == "ip":
            b0 = self.linktype_test(ETHERTYPE["ip"])
            head = [S(BPF_LD | BPF_ABS | BPF_B, base + 9), S(BPF_LDX | BPF_MSH | BPF_B, base)]
        else:
            b0 = self.linktype_test(ETHERTYPE["ip6"])
            head = [S(BPF_LD | BPF_ABS | BPF_B, base + 6), S(BPF_LDX | BPF_IMM, 40)]
        s = list(head)
        again = len(s)
        jeq_v = S(_jmp(BPF_JEQ), v)
        jeq_none = S(_jmp(BPF_JEQ), IPPROTO["none"])
        s += [jeq_v, jeq_none]
        jeq_v.jf = jeq_none
        fix3 = None
        if proto == "ip6":
            v6 = [S(_jmp(BPF_JEQ), IPPROTO[n]) for n in ("hopopts", "dstopts", "routing", "fragment")]
            jeq_none.jf = v6[0]
            for a, b in zip(v6, v6[1:]):
                a.jf = b
            fix3 = v6[-1]
            advance = [S(BPF_LD | BPF_IND | BPF_B, base), S(BPF_ST, reg2),
                       S(BPF_LD | BPF_IND | BPF_B, base + 1), S(BPF_ALU | BPF_ADD | BPF_K, 1),
                       S(BPF_ALU | BPF_MUL | BPF_K, 8), S(BPF_ALU | BPF_ADD | BPF_X),
                       S(BPF_MISC | BPF_TAX), S(BPF_LD | BPF_MEM, reg2)]
            for j in v6:
                j.jt = advance[0]
            s += v6 + advance
            s.append(S(BPF_JMP | BPF_JA, again - len(s) - 1))
        else:
            nop = S(BPF_ALU | BPF_ADD | BPF_K, 0)
            jeq_none.jf = nop
            s.append(nop)
        ahcheck = S(_jmp(BPF_JEQ), IPPROTO["ah"])
        if fix3 is not None:
            fix3.jf = ahcheck
        s.append(ahcheck)
        ah = [S(BPF_MISC | BPF_TXA), S(BPF_LD | BPF_IND | BPF_B, base), S(BPF_ST, reg2),
              S(BPF_MISC | BPF_TXA), S(BPF_ALU | BPF_ADD | BPF_K, 1), S(BPF_MISC | BPF_TAX),
              S(BPF_LD | BPF_IND | BPF_B, base), S(BPF_ALU | BPF_ADD | BPF_K, 2),
              S(BPF_ALU | BPF_MUL | BPF_K, 4), S(BPF_MISC | BPF_TAX), S(BPF_LD | BPF_MEM, reg2)]
        ahcheck.jt = ah[0]
        s += ah
        s.append(S(BPF_JMP | BPF_JA, again - len(s) - 1))
        end = S(BPF_ALU | BPF_ADD | BPF_K, 0)
        s.append(end)
        jeq_none.jt = ahcheck.jf = jeq_v.jt = end
        b = _Block(_jmp(BPF_JEQ), v, s)
        self.free_reg(reg2)
        gen_and(b0, b)
        return b

    # -- arithmetic ----------------------------------------------------------
    def loadi(self, val):
        reg = self.alloc_reg()
        return _Arth([_Stmt(BPF_LD | BPF_IMM, val), _Stmt(BPF_ST, reg)], reg)

    def loadlen(self):
        reg = self.alloc_reg()
        return _Arth([_Stmt(BPF_LD | BPF_LEN), _Stmt(BPF_ST, reg)], reg)

    def xfer_to_x(self, a):
        return _Stmt(BPF_LDX | BPF_MEM, a.regno)

    def xfer_to_a(self, a):
        return _Stmt(BPF_LD | BPF_MEM, a.regno)

    def load(self, proto, inst, size):
        """proto[inst : size]: a packet load relative to proto's header."""
        regno = self.alloc_reg()
        self.free_reg(inst.regno)
        size_code = {1: BPF_B, 2: BPF_H, 4: BPF_W}.get(size)
        if size_code is None:
            self.error("data size must be 1, 2, or 4")
        pl = self.off_linkpl

        def indexed(off, k):
            s = self.abs_offset_varpart(off)
            if s is not None:
                s += [self.xfer_to_a(inst), _Stmt(BPF_ALU | BPF_ADD | BPF_X), _Stmt(BPF_MISC | BPF_TAX)]
            else:
                s = [self.xfer_to_x(inst)]
            return s + [_Stmt(BPF_LD | BPF_IND | size_code, k)]

        if proto == "link":
            inst.s += indexed(self.off_linkhdr, self.off_linkhdr.constant_part)
        elif proto in ("ip", "arp", "rarp", "atalk", "decnet", "sca", "lat", "moprc", "mopdl",
                       "ip6"):
            inst.s += indexed(pl, pl.constant_part + self.off_nl)
            b = self.proto_abbrev(proto)
            if inst.b:
                gen_and(inst.b, b)
            inst.b = b
        elif proto in ("sctp", "tcp", "udp", "icmp", "igmp", "igrp", "pim", "vrrp", "carp"):
            # Transport headers: after the IPv4 header, in the first fragment only.
            inst.s += self.loadx_iphdrlen() + [
                self.xfer_to_a(inst), _Stmt(BPF_ALU | BPF_ADD | BPF_X), _Stmt(BPF_MISC | BPF_TAX),
                _Stmt(BPF_LD | BPF_IND | size_code, pl.constant_part + self.off_nl)]
            b = self.ipfrag()
            gen_and(self.proto_abbrev(proto), b)
            if inst.b:
                gen_and(inst.b, b)
            gen_and(self.proto_abbrev("ip"), b)
            inst.b = b
        elif proto == "icmp6":
            # Right after a fixed IPv6 header: extension headers are not followed.
            b = self.proto_abbrev("ip6")
            if inst.b:
                gen_and(inst.b, b)
            inst.b = b
            b = self.cmp("linkpl", 6, BPF_B, IPPROTO["icmpv6"])
            gen_and(inst.b, b)
            inst.b = b
            inst.s += indexed(pl, pl.constant_part + self.off_nl + 40)
        elif proto == "radio":
            self.error("radio information not present in capture")
        else:
            self.error(f"'{proto}[...]' is not supported (unsupported index operation)")
        inst.regno = regno
        inst.s.append(_Stmt(BPF_ST, regno))
        return inst

    def relation(self, code, a0, a1, reversed_):
        s0 = [self.xfer_to_x(a1), self.xfer_to_a(a0)]
        if code == BPF_JEQ:
            s0.append(_Stmt(BPF_ALU | BPF_SUB | BPF_X))
            b = _Block(_jmp(code))
        else:
            b = _Block(BPF_JMP | code | BPF_X)
        if reversed_:
            gen_not(b)
        b.stmts = a0.s + a1.s + s0
        self.free_reg(a0.regno)
        self.free_reg(a1.regno)
        if a0.b:
            if a1.b:
                gen_and(a0.b, a1.b)
                tmp = a1.b
            else:
                tmp = a0.b
        else:
            tmp = a1.b
        if tmp:
            gen_and(tmp, b)
        return b

    def neg(self, a):
        a.s += [self.xfer_to_a(a), _Stmt(BPF_ALU | BPF_NEG), _Stmt(BPF_ST, a.regno)]
        return a

    def arth(self, code, a0, a1):
        first = a1.s[0]
        if first.code == BPF_LD | BPF_IMM:
            if code == BPF_DIV and first.k == 0:
                self.error("division by zero")
            if code == BPF_MOD and first.k == 0:
                self.error("modulus by zero")
            if code in (BPF_LSH, BPF_RSH) and first.k > 31:
                self.error("shift by more than 31 bits")
        a0.s = a0.s + a1.s + [self.xfer_to_x(a1), self.xfer_to_a(a0),
                              _Stmt(BPF_ALU | BPF_X | code)]
        self.free_reg(a0.regno)
        self.free_reg(a1.regno)
        a0.regno = self.alloc_reg()
        a0.s.append(_Stmt(BPF_ST, a0.regno))
        return a0       # a1's protocol tests are dropped, as libpcap drops them

    # -- other primitives ----------------------------------------------------
    def length(self, jmp, n):
        return _Block(_jmp(jmp), n, [_Stmt(BPF_LD | BPF_LEN)])

    def byteop(self, op, idx, val):
        if op == "=":
            return self.cmp("linkhdr", idx, BPF_B, val)
        if op == "<":
            return self.cmp_lt("linkhdr", idx, BPF_B, val)
        if op == ">":
            return self.cmp_gt("linkhdr", idx, BPF_B, val)
        # libpcap emits the ALU operation without loading the byte first.
        b = _Block(_jmp(BPF_JEQ), 0, [_Stmt(BPF_ALU | (BPF_OR if op == "|" else BPF_AND) | BPF_K, val)])
        gen_not(b)
        return b

    def broadcast(self, proto):
        if proto in (DEFAULT, "link"):
            if self.linktype != EN10MB:
                self.error("not a broadcast link")
            return self.linkraw_address(b"\xff" * 6, "dst")
        if proto == "ip":
            # lpd, like libpcap without an interface, does not know the netmask.
            self.error("netmask not known, so 'ip broadcast' not supported")
        self.error("only link-layer/IP broadcast filters supported")

    def multicast(self, proto):
        if proto in (DEFAULT, "link"):
            if self.linktype != EN10MB:
                self.error("link-layer multicast filters supported only on ethernet")
            b0 = _Block(_jmp(BPF_JSET), 1, self.load_a("linkhdr", 0, BPF_B))
            tmp = self.prevlinkhdr_check()
            if tmp is not None:
                gen_and(tmp, b0)
            return b0
        if proto == "ip":
            b0 = self.linktype_test(ETHERTYPE["ip"])
            b1 = self.cmp_ge("linkpl", 16, BPF_B, 224)
            gen_and(b0, b1)
            return b1
        if proto == "ip6":
            b0 = self.linktype_test(ETHERTYPE["ip6"])
            b1 = self.cmp("linkpl", 24, BPF_B, 255)
            gen_and(b0, b1)
            return b1
        self.error("link-layer multicast filters supported only on ethernet")

    def inbound(self, outbound):
        # The packet type is socket metadata (the AF_PACKET sll_pkttype), loaded
        # relative to the link header exactly as libpcap does.
        b0 = self.cmp("linkhdr", (SKF_AD_OFF + SKF_AD_PKTTYPE) & U32_MAX, BPF_H,
                      PACKET_OUTGOING)
        if not outbound:
            gen_not(b0)
        return b0

    def ifindex(self, n):
        return self.cmp("linkhdr", (SKF_AD_OFF + SKF_AD_IFINDEX) & U32_MAX, BPF_W, n)

    def vlan(self, vlan_num):
        """'vlan [id]': in the data in userspace; in the kernel the outermost tag is
        socket metadata, and an inner tag moves offsets at run time."""
        if self.label_stack_depth > 0:
            self.error("no VLAN match after MPLS")
        if self.linktype != EN10MB:
            self.error(f"no VLAN support for {self.linktype}")
        if vlan_num is not None and vlan_num > 0x0fff:
            self.error(f"VLAN tag {vlan_num} greater than maximum 4095")
        if (self.kernel and self.vlan_stack_depth == 0 and not self.off_linkhdr.is_variable
                and self.off_linkhdr.constant_part == self.off_outermostlinkhdr.constant_part):
            b0 = self.vlan_bpf_extensions(vlan_num)
        else:
            b0 = self.vlan_tpid_test()
            if vlan_num is not None:
                b1 = self.mcmp("linkpl", 0, BPF_H, vlan_num, 0x0fff)
                gen_and(b0, b1)
                b0 = b1
            self.off_linkpl.constant_part += 4
            self.off_linktype.constant_part += 4
        self.vlan_stack_depth += 1
        return b0

    def vlan_tpid_test(self):
        b0 = self.linktype_test(ETHERTYPE["vlan"])
        b1 = self.linktype_test(ETHERTYPE["qinq_ad"])
        gen_or(b0, b1)
        b0 = b1
        b1 = self.linktype_test(ETHERTYPE["qinq"])
        gen_or(b0, b1)
        return b1

    def vlan_bpf_extensions(self, vlan_num):
        b0 = _Block(_jmp(BPF_JEQ), 1,
                    [_Stmt(BPF_LD | BPF_B | BPF_ABS, SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT)])
        b_tpid = self.vlan_tpid_test()
        b_vid = None
        if vlan_num is not None:
            b_vid = self.mcmp("linkpl", 0, BPF_H, vlan_num, 0x0fff)
        # No tag in the metadata: a tag in the data shifts later headers by 4.
        self.is_vlan_vloffset = True
        s = []
        for off in (self.off_linkpl, self.off_linktype):
            off.is_variable = True
            if off.reg == -1:
                off.reg = self.alloc_reg()
            s += [_Stmt(BPF_LD | BPF_MEM, off.reg), _Stmt(BPF_ALU | BPF_ADD | BPF_K, 4),
                  _Stmt(BPF_ST, off.reg)]
        b_tpid.head.stmts = s + b_tpid.head.stmts
        gen_or(b0, b_tpid)
        b0 = b_tpid
        if b_vid is not None:
            # The id comes from the metadata when present, else from the data.
            vid_stmts = b_vid.stmts
            tci = _Stmt(BPF_LD | BPF_B | BPF_ABS, SKF_AD_OFF + SKF_AD_VLAN_TAG)
            jeq = _Stmt(_jmp(BPF_JEQ), 1)
            jeq.jt, jeq.jf = tci, vid_stmts[0]
            b_vid.stmts = [_Stmt(BPF_LD | BPF_B | BPF_ABS, SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT),
                           jeq, tci, _Stmt(BPF_JMP | BPF_JA, len(vid_stmts) - 1)] + vid_stmts
            gen_and(b0, b_vid)
            b0 = b_vid
        return b0

    def mpls(self, label):
        if self.label_stack_depth > 0:
            b0 = self.mcmp("prevmplshdr", 2, BPF_B, 0, 0x01)    # previous label not bottom
        elif self.linktype == EN10MB:
            b0 = self.linktype_test(ETHERTYPE["mpls"])
        else:
            b0 = self.linktype_test(PPP_MPLS_UCAST)
        if label is not None:
            if label > 0xfffff:
                self.error(f"MPLS label {label} greater than maximum 1048575")
            b1 = self.mcmp("linkpl", 0, BPF_W, label << 12, 0xfffff000)
            gen_and(b0, b1)
            b0 = b1
        self.off_nl_nosnap += 4
        self.off_nl += 4
        self.label_stack_depth += 1
        return b0

    def geneve(self, vni):
        """'geneve [vni]': UDP port 6081; later primitives look inside the tunnel, at
        offsets computed at run time (libpcap then skips the optimiser)."""
        if vni is not None and vni > 0xffffff:
            self.error(f"Geneve VNI {vni} greater than maximum 16777215")
        b0 = self.geneve_check("tran_ipv4", vni)
        s = self.loadx_iphdrlen() + [_Stmt(BPF_MISC | BPF_TXA)]
        b1 = _Block(BPF_JMP | BPF_JEQ | BPF_X, 0, s)
        gen_and(b0, b1)
        v4 = b1
        b0 = self.geneve_check("tran_ipv6", vni)
        s = self.abs_offset_varpart(self.off_linkpl)
        if s is not None:
            s += [_Stmt(BPF_LD | BPF_IMM, 40), _Stmt(BPF_ALU | BPF_ADD | BPF_X)]
        else:
            s = [_Stmt(BPF_LD | BPF_IMM, 40)]
        b1 = _Block(BPF_JMP | BPF_JEQ | BPF_X, 0, s + [_Stmt(BPF_MISC | BPF_TAX)])
        gen_and(b0, b1)
        gen_or(v4, b1)
        b0 = b1
        b1 = self.true()
        b1.stmts = self.geneve_offsets() + b1.stmts
        gen_and(b0, b1)
        self.is_geneve = True
        return b1

    def geneve_check(self, tran, vni):
        b0 = self.port_over(tran, None, 6081, IPPROTO["udp"], "dst")
        b1 = self.mcmp(tran, 8, BPF_B, 0, 0xc0)         # version 0
        gen_and(b0, b1)
        b0 = b1
        if vni is not None:
            b1 = self.mcmp(tran, 12, BPF_W, vni << 8, 0xffffff00)
            gen_and(b0, b1)
            b0 = b1
        return b0

    def geneve_offsets(self):
        """Statements that, with A at the UDP header, store the inner link-layer offsets;
        the inner frame is Ethernet (type 0x6558) or bare IP."""
        S = _Stmt
        s = [S(BPF_ALU | BPF_ADD | BPF_K, self.off_linkpl.constant_part + self.off_nl + 8),
             S(BPF_MISC | BPF_TAX), S(BPF_ALU | BPF_ADD | BPF_K, 2)]
        self.off_linktype = _Offset(0, True, self.alloc_reg())
        s += [S(BPF_ST, self.off_linktype.reg), S(BPF_LD | BPF_IND | BPF_B, 0),
              S(BPF_ALU | BPF_AND | BPF_K, 0x3f), S(BPF_ALU | BPF_MUL | BPF_K, 4),
              S(BPF_ALU | BPF_ADD | BPF_K, 8), S(BPF_ALU | BPF_ADD | BPF_X)]
        self.push_linkhdr(EN10MB, _Offset(0, True, self.alloc_reg()))
        s.append(S(BPF_ST, self.off_linkhdr.reg))
        self.no_optimize = True
        txa, proto = S(BPF_MISC | BPF_TXA), S(_jmp(BPF_JEQ), 0x6558)
        s += [S(BPF_LD | BPF_IND | BPF_H, 2), S(BPF_LDX | BPF_MEM, self.off_linkhdr.reg), proto,
              txa, S(BPF_ALU | BPF_ADD | BPF_K, 12), S(BPF_ST, self.off_linktype.reg),
              S(BPF_ALU | BPF_ADD | BPF_K, 2), S(BPF_MISC | BPF_TAX)]
        self.off_linkpl = _Offset(0, True, self.alloc_reg())
        stx = S(BPF_STX, self.off_linkpl.reg)
        s.append(stx)
        proto.jt, proto.jf = txa, stx
        self.off_nl = 0
        return s

    def push_linkhdr(self, linktype, off):
        self.prevlinktype, self.linktype = self.linktype, linktype
        self.off_prevlinkhdr = self.off_linkhdr
        self.off_linkhdr = off
        self.is_geneve = False

    def prevlinkhdr_check(self):
        """Inside Geneve, link-layer tests apply only when the inner frame is Ethernet."""
        if not self.is_geneve:
            return None
        b0 = _Block(BPF_JMP | BPF_JEQ | BPF_X, 0, [_Stmt(BPF_LD | BPF_MEM, self.off_linkhdr.reg),
                                                  _Stmt(BPF_LDX | BPF_MEM, self.off_linkpl.reg)])
        gen_not(b0)
        return b0

    def linkraw_address(self, eaddr, d):
        b = self.ehostop(eaddr, d)
        tmp = self.prevlinkhdr_check()
        if tmp is not None:
            gen_and(tmp, b)
        return b

    def pppoed(self):
        return self.linktype_test(ETHERTYPE["pppoed"])

    def pppoes(self, sess):
        b0 = self.linktype_test(ETHERTYPE["pppoes"])
        if sess is not None:
            if sess > 0xffff:
                self.error(f"PPPoE session number {sess} greater than maximum 65535")
            b1 = self.mcmp("linkpl", 0, BPF_W, sess, 0xffff)
            gen_and(b0, b1)
            b0 = b1
        # Everything after this is inside the PPP frame of the session.
        pl = self.off_linkpl
        self.push_linkhdr(PPP, _Offset(pl.constant_part + self.off_nl + 6, pl.is_variable, pl.reg))
        self.off_linktype = self.off_linkhdr.copy()
        pl.constant_part = self.off_linkhdr.constant_part + 2
        self.off_nl = self.off_nl_nosnap = 0
        return b0

    def finish(self, p):
        """Attach the returns; the root computes the run-time VLAN offsets if any."""
        if self.is_vlan_vloffset:
            for off in (self.off_linkpl, self.off_linktype):
                if off.reg == -1:
                    off.reg = self.alloc_reg()
            p.head.stmts = [_Stmt(BPF_LD | BPF_W | BPF_IMM, 0), _Stmt(BPF_ST, self.off_linkpl.reg),
                            _Stmt(BPF_ST, self.off_linktype.reg)] + p.head.stmts
        _backpatch(p, self.retblk(self.snaplen))
        p.sense ^= 1
        _backpatch(p, self.retblk(0))
        return p.head

    # -- names and numbers (gen_scode, gen_ncode, gen_mcode, gen_mcode6, gen_ecode) --
    def scode(self, name, q):
        self.names.append(name)
        proto, d, addr = q
        if addr == "net":
            a = _nametonetaddr(name)
            if not a:
                self.error(f"unknown network '{name}'")
            mask = U32_MAX
            while a and not a & 0xff000000:
                a, mask = (a << 8) & U32_MAX, (mask << 8) & U32_MAX
            return self.host(a, mask, proto, d, "net")
        if addr in (DEFAULT, "host"):
            if proto == "link":
                if self.linktype != EN10MB:
                    self.error("only ethernet supports link-level host names")
                eaddr = _ether_hostton(name)
                if eaddr is None:
                    self.error(f"unknown ether host '{name}'")
                return self.linkraw_address(eaddr, d)
            if proto == "decnet":
                self.error(f"decnet name support not included, '{name}' cannot be translated")
            b = None
            for family, sockaddr in _nametoaddrinfo(name):
                if family == socket.AF_INET:
                    if proto == "ip6":
                        continue
                    tmp = self.host(int.from_bytes(socket.inet_aton(sockaddr[0]), "big"),
                                    U32_MAX, proto, d, addr if addr != DEFAULT else "host")
                elif family == socket.AF_INET6:
                    if proto == "ip":
                        continue
                    tmp = self.host6(socket.inet_pton(socket.AF_INET6, sockaddr[0].split("%")[0]),
                                     b"\xff" * 16, proto, d, "host")
                else:
                    continue
                if b is not None:
                    gen_or(b, tmp)
                b = tmp
            if b is None:
                self.error(f"unknown host '{name}'"
                           + ("" if proto == DEFAULT else " for specified address family"))
            return b
        if addr in ("port", "portrange"):
            if proto not in (DEFAULT, "udp", "tcp", "sctp"):
                self.error(f"illegal qualifier of '{addr}'")
            if addr == "port":
                res = _nametoport(name)
                if res is None:
                    self.error(f"expected a port number after 'port', got '{name}'")
                lo, (hi, real) = None, res
            else:
                res = _nametoportrange(name)
                if res is None:
                    self.error(f"unknown port in range '{name}'")
                lo, hi, real = res
            what = "port" if addr == "port" else "port in range"
            if proto != DEFAULT:
                want = IPPROTO[proto]
                if real is not None and real != want:
                    other = {v: k for k, v in IPPROTO.items() if k in ("tcp", "udp", "sctp")}[real]
                    self.error(f"{what} '{name}' is {other}")
                real = want
            for p in (lo, hi):
                if p is not None and p < 0:
                    self.error(f"illegal port number {p} < 0")
                if p is not None and p > 65535:
                    self.error(f"illegal port number {p} > 65535")
            return self.port(lo, hi, real, d)
        if addr == "gateway":
            self.gateway()
        if addr in ("proto", "protochain"):
            v = self.lookup_proto(name, proto)
            if v is None:
                self.error(f"unknown protocol: {name}")
            return self.proto(v, proto, d) if addr == "proto" else self.protochain(v, proto)
        self.error("syntax error in filter expression")

    def gateway(self):
        self.error("'gateway' is not supported (libpcap with IPv6 does not support it either)")

    def lookup_proto(self, name, proto):
        if proto in (DEFAULT, "ip", "ip6"):
            try:
                return socket.getprotobyname(name)
            except (OSError, UnicodeError, ValueError):
                self.error(f"unknown ip proto '{name}'")
        if proto == "link":
            v = ETHER_PROTO_NAMES.get(name, LLC_PROTO_NAMES.get(name))
            if v is None:
                self.error(f"unknown ether proto '{name}'")
            return v
        if proto == "iso":
            if name not in ISO_PROTO:
                self.error(f"unknown osi proto '{name}'")
            return ISO_PROTO[name]
        return None

    def ncode(self, s, v, q):
        """A number (s None) or a dotted IPv4 address s, under qualifiers q."""
        proto, d, addr = q
        if s is None:
            vlen = 32
        elif proto == "decnet":
            v = _atodn(s)
            if v is None:
                self.error(f"malformed decnet address '{s}'")
        else:
            vlen, v = _atoin(s)
            if vlen < 0:
                self.error(f"invalid IPv4 address '{s}'")
        if addr in (DEFAULT, "host", "net"):
            if proto == "decnet":
                return self.host(v, 0, proto, d, addr)
            if proto == "link":
                self.error("illegal link layer address")
            mask = U32_MAX
            if s is None and addr == "net":
                while v and not v & 0xff000000:
                    v, mask = (v << 8) & U32_MAX, (mask << 8) & U32_MAX
            else:
                v, mask = (v << (32 - vlen)) & U32_MAX, (mask << (32 - vlen)) & U32_MAX
            return self.host(v, mask, proto, d, "net" if addr == "net" else "host")
        if addr in ("port", "portrange"):
            if proto not in (DEFAULT, "udp", "tcp", "sctp"):
                self.error(f"illegal qualifier of '{addr}'")
            if v > 65535:
                self.error(f"illegal port number {v} > 65535")
            ipproto = None if proto == DEFAULT else IPPROTO[proto]
            return self.port(None if addr == "port" else v, v, ipproto, d)
        if addr == "gateway":
            self.gateway()
        if addr == "proto":
            return self.proto(v, proto, d)
        if addr == "protochain":
            return self.protochain(v, proto)
        self.error("syntax error in filter expression")

    def mcode(self, s1, s2, masklen, q):
        """'net a.b.c.d/len' and 'net a.b.c.d mask m.m.m.m'."""
        nlen, n = _atoin(s1)
        if nlen < 0:
            self.error(f"invalid IPv4 address '{s1}'")
        n = (n << (32 - nlen)) & U32_MAX
        if s2 is not None:
            mlen, m = _atoin(s2)
            if mlen < 0:
                self.error(f"invalid IPv4 address '{s2}'")
            m = (m << (32 - mlen)) & U32_MAX
            if n & ~m:
                self.error(f'non-network bits set in "{s1} mask {s2}"')
        else:
            if masklen > 32:
                self.error("mask length must be <= 32")
            m = (U32_MAX << (32 - masklen)) & U32_MAX if masklen else 0
            if n & ~m:
                self.error(f'non-network bits set in "{s1}/{masklen}"')
        if q[2] != "net":
            self.error("Mask syntax for networks only")
        return self.host(n, m, q[0], q[1], "net")

    def mcode6(self, s, masklen, q):
        addr = socket.inet_pton(socket.AF_INET6, s)
        if masklen > 128:
            self.error("mask length must be <= 128")
        m = ((1 << 128) - (1 << (128 - masklen))).to_bytes(16, "big")
        if int.from_bytes(addr, "big") & ~int.from_bytes(m, "big"):
            self.error(f'non-network bits set in "{s}/{masklen}"')
        if q[2] in (DEFAULT, "host"):
            if masklen != 128:
                self.error("Mask syntax for networks only")
        elif q[2] != "net":
            self.error("invalid qualifier against IPv6 address")
        return self.host6(addr, m, q[0], q[1], "net" if q[2] == "net" else "host")

    def ecode(self, s, q):
        if q[2] in ("host", DEFAULT) and q[0] == "link":
            if self.linktype != EN10MB:
                self.error("ethernet addresses supported only on ethernet")
            return self.linkraw_address(_ether_aton(s), q[1])
        self.error("ethernet address used in non-ether expression")


def _atoin(s):
    """__pcap_atoin(): (bits given, value) of a dotted quad that may be partial."""
    addr, length = 0, 0
    for part in s.split("."):
        n = 0
        for c in part:
            if n > 25:
                return -1, 0
            n = n * 10 + ord(c) - 48
        if n > 255:
            return -1, 0
        addr, length = ((addr << 8) | n) & U32_MAX, length + 8
    return length, addr


def _atodn(s):
    """__pcap_atodn(): sscanf("%d.%d") of area.node, masked into 16 bits."""
    m = re.match(r"\s*([-+]?\d+)\.\s*([-+]?\d+)", s)
    if not m:
        return None
    return ((int(m.group(1)) << 10) & 0o176000) | (int(m.group(2)) & 0o1777)


def _ether_aton(s):
    out, i = bytearray(), 0
    while i < len(s):
        if s[i] in ":.-":
            i += 1
        d = int(s[i], 16)
        i += 1
        if i < len(s) and s[i] in "0123456789abcdefABCDEF":
            d = (d << 4) | int(s[i], 16)
            i += 1
        out.append(d)
    return bytes(out)


def _read_db(path):
    try:
        with open(path) as f:
            for line in f:
                fields = line.split("#")[0].split()
                if fields:
                    yield fields
    except OSError:
        return


def _ether_hostton(name):
    """/etc/ethers, as ether_hostton() reads it."""
    for fields in _read_db("/etc/ethers"):
        if len(fields) >= 2 and fields[1] == name:
            try:
                return _ether_aton(fields[0])
            except ValueError:
                return None
    return None


def _nametonetaddr(name):
    """getnetbyname() from /etc/networks: the network number, 0 if unknown."""
    for fields in _read_db("/etc/networks"):
        if len(fields) >= 2 and name in [fields[0]] + fields[2:]:
            val = 0
            try:
                for part in fields[1].split("."):
                    val = (val << 8) | (int(part, 0) & 0xff)
            except ValueError:
                return 0
            return val
    return 0


def _nametoaddrinfo(name):
    try:
        return [(ai[0], ai[4]) for ai in socket.getaddrinfo(
            name, None, socket.AF_UNSPEC, socket.SOCK_STREAM, socket.IPPROTO_TCP)]
    except (OSError, UnicodeError, ValueError):
        return []


def _service_port(name, socktype, proto):
    try:
        for ai in socket.getaddrinfo(None, name, socket.AF_UNSPEC, socktype, proto):
            return ai[4][1]
    except (OSError, UnicodeError, ValueError):
        pass
    return None


def _nametoport(name):
    """(port, IP protocol or None for both) like pcap_nametoport(); None if unknown.

    A service known for only one of tcp and udp (or at different ports) matches
    only that protocol."""
    tcp = _service_port(name, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    udp = _service_port(name, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    if tcp is not None:
        return tcp, (None if udp == tcp else IPPROTO["tcp"])
    if udp is not None:
        return udp, IPPROTO["udp"]
    return None


def _nametoportrange(name):
    m = re.match(r"\s*([-+]?\d+)-\s*([-+]?\d+)", name)      # sscanf("%d-%d")
    if m:
        return int(m.group(1)), int(m.group(2)), None
    if "-" not in name:
        return None
    a, b = name.split("-", 1)
    pa, pb = _nametoport(a), _nametoport(b)
    if pa is None or pb is None:
        return None
    return pa[0], pb[0], (pa[1] if pa[1] == pb[1] else None)

###############################################################################
# 7.5 Parser ##################################################################
# provides: _Parser
#
# Recursive descent over grammar.y's productions, generating code as
# yacc's actions do, in the same order.  A bare id after and/or inherits the
# qualifiers (q) of what precedes it.

_RELOPS = {">": (BPF_JGT, False), ">=": (BPF_JGE, False), "=": (BPF_JEQ, False),
           "<=": (BPF_JGT, True), "<": (BPF_JGE, True), "!=": (BPF_JEQ, True)}
_ARITH = {"+": BPF_ADD, "-": BPF_SUB, "*": BPF_MUL, "/": BPF_DIV, "%": BPF_MOD, "&": BPF_AND,
          "|": BPF_OR, "^": BPF_XOR, "<<": BPF_LSH, ">>": BPF_RSH}
# yacc's %left levels; '%' and '^' have none, so yacc always shifts past them.
_PREC = {"|": 1, "&": 2, "<<": 3, ">>": 3, "+": 4, "-": 4, "*": 5, "/": 5}
_UMINUS = 6
_ID_START = ("ID", "HID", "HID6", "EID", "AID")
_ID_FOLLOW = ("AND", "OR", ")", "EOF")
_HEAD_START = ("SRC", "DST", "ADDR", "HOST", "NET", "PORT", "PORTRANGE", "PROTO", "PROTOCHAIN",
               "GATEWAY")


class _Parser:
    def __init__(self, expr, gen):
        self.toks = tokenize(expr)
        self.i = 0
        self.g = gen

    def peek(self, k=0):
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def take(self):
        tok = self.toks[self.i]
        self.i += 1
        self.g.col = tok.col
        return tok

    def fail(self, expected, tok=None):
        tok = tok or self.peek()
        got = "end of expression" if tok.kind == "EOF" else f"'{tok.text}'"
        raise _Syntax(f"expected {expected}, got {got}", tok.col)

    def expect(self, kind, expected):
        if self.peek().kind != kind:
            self.fail(expected)
        return self.take()

    def at(self, tok):
        self.g.col = tok.col

    def attempt(self, *alternatives):
        """Try productions in turn (each may consume tokens and generate code); an
        error rewinds the tokens and the compiler state.  yacc, deciding with
        lookahead, would not have run the failed alternative's actions at all."""
        start, state, errors = self.i, self.g.snapshot(), []
        for alt in alternatives:
            try:
                return alt()
            except FilterError as e:
                errors.append(e)
                self.i = start
                self.g.restore(state)
                state = self.g.snapshot()
        raise max(errors, key=lambda e: (e.col, not isinstance(e, _Syntax)))

    def matching_paren(self):
        """Index of the token after the ')' closing the '(' at the current token."""
        depth, j = 0, self.i
        while j < len(self.toks):
            kind = self.toks[j].kind
            if kind == "(":
                depth += 1
            elif kind == ")":
                depth -= 1
                if depth == 0:
                    return j + 1
            elif kind == "EOF":
                break
            j += 1
        return j

    # -- expressions ---------------------------------------------------------
    def parse_prog(self):
        """prog: null expr | null"""
        if self.peek().kind == "EOF":
            return None
        b, _ = self.parse_expr()
        if self.peek().kind != "EOF":
            self.fail("'and', 'or' or the end of the expression")
        return b

    def parse_expr(self, q=QERR):
        """expr: term | expr and term | expr and id | expr or term | expr or id"""
        b, q = self.parse_term(q, allow_id=False)
        while self.peek().kind in ("AND", "OR"):
            op = self.take().kind
            b2, q = self.parse_term(q, allow_id=True)
            (gen_and if op == "AND" else gen_or)(b, b2)
            b = b2
        return b, q

    def parse_term(self, q, allow_id):
        """term: rterm | not term   (and, after and/or, also an id inheriting q)"""
        tok = self.peek()
        if tok.kind == "!":
            self.take()
            b, q2 = self.parse_term(q, allow_id)
            gen_not(b)
            return b, q2
        if allow_id:
            if tok.kind in _ID_START:
                return self.parse_id(q)
            if tok.kind == "NUM" and self.peek(1).kind in _ID_FOLLOW:
                return self.parse_id(q)
            if tok.kind == "(" and self.toks[self.matching_paren()].kind in _ID_FOLLOW:
                return self.attempt(lambda: self.parse_id(q), lambda: self.parse_rterm(q))
        return self.parse_rterm(q)

    def parse_rterm(self, q):
        """rterm: head id | paren expr ')' | pname | arth relop arth | arth irelop arth | other"""
        tok, nxt = self.peek(), self.peek(1)
        kind = tok.kind
        if kind == "PNAME":
            if nxt.kind == "[":
                return self.parse_relation(), QERR
            if nxt.kind in _HEAD_START:
                return self.parse_head_id()
            if nxt.kind in ("BROADCAST", "MULTICAST"):
                return self.parse_other(), QERR
            self.take()
            return self.g.proto_abbrev(tok.value), QERR
        if kind in _HEAD_START:
            return self.parse_head_id()
        if kind == "(":
            if self.toks[self.matching_paren()].kind in _RELOPS or \
                    self.toks[self.matching_paren()].kind in _ARITH:
                return self.parse_relation(), QERR
            self.take()
            b, _ = self.parse_expr(q)
            self.expect(")", "')' or 'and'/'or'")
            return b, q     # yacc: $$.q = $1.q, the qualifiers from before '('
        if kind in ("NUM", "LEN", "-"):
            return self.parse_relation(), QERR
        if kind in _ID_START:
            self.fail("a primitive such as 'host', 'port' or 'tcp' before this address or name")
        return self.parse_other(), QERR

    def parse_head_id(self):
        """rterm: head id
        head: pqual dqual aqual | pqual dqual | pqual aqual | pqual PROTO | pqual PROTOCHAIN
            | pqual ndaqual"""
        proto, d, addr = DEFAULT, DEFAULT, DEFAULT
        if self.peek().kind == "PNAME":
            proto = self.take().value
        kind = self.peek().kind
        if kind in ("SRC", "DST", "ADDR"):
            d = self.parse_dqual()
            kind = self.peek().kind
            if kind in ("HOST", "NET", "PORT", "PORTRANGE"):
                addr = self.take().kind.lower()
        elif kind in ("HOST", "NET", "PORT", "PORTRANGE", "PROTO", "PROTOCHAIN", "GATEWAY"):
            addr = self.take().kind.lower()
        else:
            self.fail("'src', 'dst', 'host', 'net', 'port', 'portrange', 'proto' or 'protochain'")
        return self.parse_id((proto, d, addr))

    def parse_dqual(self):
        """dqual: SRC | DST | SRC OR DST | DST OR SRC | SRC AND DST | DST AND SRC
            | ADDR1 | ADDR2 | ADDR3 | ADDR4 | RA | TA"""
        tok = self.take()
        if tok.kind == "ADDR":
            return tok.value
        if self.peek().kind in ("AND", "OR"):
            op = self.take().kind
            other = "DST" if tok.kind == "SRC" else "SRC"
            self.expect(other, f"'{other.lower()}' after '{tok.text} {op.lower()}'")
            return op.lower()
        return tok.kind.lower()

    # -- ids -----------------------------------------------------------------
    def parse_id(self, q):
        """id: nid | pnum | paren pid ')'"""
        tok = self.peek()
        if tok.kind == "(":
            self.take()
            b, _ = self.parse_pid(q)
            self.expect(")", "')' or 'and'/'or'")
            return b, q
        if tok.kind == "NUM":
            v = self.take().value
            self.check_id_follow()
            self.at(tok)
            return self.g.ncode(None, v, q), q
        return self.parse_nid(q)

    def check_id_follow(self):
        if self.peek().kind not in _ID_FOLLOW:
            self.fail("'and', 'or', ')' or the end of the expression")

    def parse_pid(self, q):
        """pid: nid | qid and id | qid or id
        qid: pnum | pid"""
        tok = self.peek()
        if tok.kind in ("NUM", "("):
            v = self.parse_pnum()
            self.check_id_follow()
            if self.peek().kind not in ("AND", "OR"):     # '(' pnum ')' is pnum, not pid
                self.at(tok)
                return self.g.ncode(None, v, q), q
            self.at(tok)
            b = self.g.ncode(None, v, q)
        else:
            b, _ = self.parse_nid(q)
        while self.peek().kind in ("AND", "OR"):
            op = self.take().kind
            b2, _ = self.parse_id(q)
            (gen_and if op == "AND" else gen_or)(b, b2)
            b = b2
        return b, q

    def parse_pnum(self):
        """pnum: NUM | paren pnum ')'"""
        if self.peek().kind == "(":
            self.take()
            v = self.parse_pnum()
            self.expect(")", "')'")
            return v
        return self.expect("NUM", "a number").value

    def parse_nid(self, q):
        """nid: ID | HID '/' NUM | HID NETMASK HID | HID | HID6 '/' NUM | HID6 | EID | AID
            | not id"""
        tok = self.peek()
        kind = tok.kind
        if kind == "!":
            self.take()
            b, q2 = self.parse_id(q)
            gen_not(b)
            return b, q2
        if kind not in _ID_START:
            what = {"port": "a port number or name", "portrange": "a port range",
                    "proto": "a protocol number or name"}.get(q[2], "an address, name or number")
            self.fail(what)
        self.take()
        g = self.g
        if kind == "ID":
            self.check_id_follow()
            self.at(tok)
            return g.scode(tok.value, q), q
        if kind == "HID":
            if self.peek().kind == "/":
                self.take()
                n = self.expect("NUM", "a mask length after '/'").value
                self.check_id_follow()
                self.at(tok)
                return g.mcode(tok.value, None, n, q), q
            if self.peek().kind == "NETMASK":
                self.take()
                m = self.expect("HID", "a dotted netmask after 'mask'")
                self.check_id_follow()
                self.at(tok)
                return g.mcode(tok.value, m.value, 0, q), q
            self.check_id_follow()
            self.at(tok)
            if q[2] in ("port", "portrange", "proto", "protochain"):
                g.error(f"'{q[2]}' modifier applied to ip host")
            return g.ncode(tok.value, 0, q), q
        if kind == "HID6":
            masklen = 128
            if self.peek().kind == "/":
                self.take()
                masklen = self.expect("NUM", "a prefix length after '/'").value
            self.check_id_follow()
            self.at(tok)
            return g.mcode6(tok.value, masklen, q), q
        if kind == "EID":
            self.check_id_follow()
            self.at(tok)
            return g.ecode(tok.value, q), q
        self.at(tok)
        g.error("ARCnet addresses ('$xx') are supported only on ARCnet")

    # -- relations and arithmetic ------------------------------------------------
    def parse_relation(self):
        """rterm: arth relop arth | arth irelop arth
        relop: '>' | GEQ | '='      irelop: LEQ | '<' | NEQ"""
        a0 = self.parse_arth()
        tok = self.peek()
        if tok.kind not in _RELOPS:
            self.fail("a comparison ('=', '!=', '<', '<=', '>', '>=')")
        self.take()
        a1 = self.parse_arth()
        code, rev = _RELOPS[tok.kind]
        self.at(tok)
        return self.g.relation(code, a0, a1, rev)

    def parse_arth(self):
        """arth: pnum | narth
        narth: pname '[' arth ']' | pname '[' arth ':' NUM ']' | arth '+' arth | arth '-' arth
            | arth '*' arth | arth '/' arth | arth '%' arth | arth '&' arth | arth '|' arth
            | arth '^' arth | arth LSH arth | arth RSH arth | '-' arth | paren narth ')' | LEN

        Operators are resolved the way yacc resolves this ambiguous grammar: by the
        precedence table, shifting whenever an operator has no precedence."""
        stack = []      # operands (_Arth), binary operator tokens, and "neg" markers

        def reducible(look):
            if len(stack) >= 2 and stack[-2] == "neg":
                rule = _UMINUS
            elif len(stack) >= 3 and isinstance(stack[-2], Token):
                rule = _PREC.get(stack[-2].kind)
            else:
                return False
            if look is None:
                return True
            return rule is not None and _PREC.get(look) is not None and rule >= _PREC[look]

        def reduce():
            if stack[-2] == "neg":
                a = stack.pop()
                stack.pop()
                stack.append(self.g.neg(a))
            else:
                a1, op, a0 = stack.pop(), stack.pop(), stack.pop()
                self.at(op)
                stack.append(self.g.arth(_ARITH[op.kind], a0, a1))

        while True:
            while self.peek().kind == "-":
                self.take()
                stack.append("neg")
            stack.append(self.parse_arth_primary())
            look = self.peek()
            if look.kind in _ARITH:
                while reducible(look.kind):
                    reduce()
                stack.append(self.take())
                continue
            while len(stack) > 1:
                reduce()
            return stack[0]

    def parse_arth_primary(self):
        tok = self.peek()
        if tok.kind == "NUM":
            self.take()
            return self.g.loadi(tok.value)
        if tok.kind == "LEN":
            self.take()
            return self.g.loadlen()
        if tok.kind == "(":
            self.take()
            a = self.parse_arth()
            self.expect(")", "')' or an arithmetic operator")
            return a
        if tok.kind == "PNAME" and self.peek(1).kind == "[":
            self.take()
            self.take()
            inst = self.parse_arth()
            size, where = 1, tok
            if self.peek().kind == ":":
                self.take()
                where = self.expect("NUM", "a size (1, 2 or 4) after ':'")
                size = where.value
            self.expect("]", "']'")
            self.at(where)
            return self.g.load(tok.value, inst, size)
        self.fail("a number, 'len' or a packet access like 'ip[0]'")

    # -- other primitives ----------------------------------------------------
    def parse_other(self):
        """other: pqual TK_BROADCAST | pqual TK_MULTICAST | LESS NUM | GREATER NUM
            | CBYTE NUM byteop NUM | INBOUND | OUTBOUND | IFINDEX NUM | VLAN pnum | VLAN
            | MPLS pnum | MPLS | PPPOED | PPPOES pnum | PPPOES | GENEVE pnum | GENEVE | pllc"""
        g = self.g
        tok = self.take()
        kind = tok.kind
        if kind == "PNAME" or kind in ("BROADCAST", "MULTICAST"):
            proto = DEFAULT
            if kind == "PNAME":
                proto, tok = tok.value, self.take()
            return g.broadcast(proto) if tok.kind == "BROADCAST" else g.multicast(proto)
        if kind in ("LESS", "GREATER"):
            n = self.expect("NUM", f"a length after '{tok.text}'").value
            self.at(tok)
            if kind == "GREATER":
                return g.length(BPF_JGE, n)
            b = g.length(BPF_JGT, n)
            gen_not(b)
            return b
        if kind == "CBYTE":
            idx = self.expect("NUM", "a byte offset after 'byte'").value
            op = self.peek()
            if op.kind not in ("&", "|", "<", ">", "="):
                self.fail("one of '&', '|', '<', '>', '='")
            self.take()
            val = self.expect("NUM", "a number").value
            return g.byteop(op.kind, idx, val)
        if kind in ("INBOUND", "OUTBOUND"):
            return g.inbound(kind == "OUTBOUND")
        if kind == "IFINDEX":
            return g.ifindex(self.expect("NUM", "an interface index after 'ifindex'").value)
        if kind in ("VLAN", "MPLS", "PPPOES", "GENEVE"):
            n, where = None, tok
            if self.peek().kind in ("NUM", "("):
                where = self.peek()
                n = self.parse_pnum()
            self.at(where)
            if kind == "VLAN":
                return g.vlan(n)
            if kind == "MPLS":
                return g.mpls(n)
            if kind == "PPPOES":
                return g.pppoes(n)
            return g.geneve(n)
        if kind == "PPPOED":
            return g.pppoed()
        if kind == "LLC":
            nxt = self.peek()
            if nxt.kind == "ID" or nxt.text == "rnr":      # 'rnr' lexes as a keyword
                self.take()
                self.at(nxt)
                return g.llc_type(nxt.text if nxt.kind != "ID" else nxt.value)
            return g.llc()
        if kind in ("TYPE", "SUBTYPE", "DIR"):
            g.error("802.11 link-layer types supported only on 802.11")
        if kind == "FOREIGN":
            g.error(f"'{tok.text}' applies only to link types lpd does not capture")
        self.i -= 1
        self.fail("a primitive such as 'host', 'port', 'tcp' or 'ip[0] = 1'")

###############################################################################
# 7.6 Linearizer ##############################################################
# provides: _linearize, _postorder, _reachable
#
# From blocks to instructions (optimize.c's icode_to_fcode).

def _reachable(root):
    """Blocks reachable from root, depth first (true branch first), root first."""
    seen, order, stack = set(), [], [root]
    while stack:
        b = stack.pop()
        if b is None or id(b) in seen:
            continue
        seen.add(id(b))
        order.append(b)
        stack.append(b.ef.succ)
        stack.append(b.et.succ)
    return order


def _postorder(root, first_false):
    """Blocks in the order a recursive post-order walk finishes them."""
    seen, out, stack = set(), [], [(root, False)]
    while stack:
        b, done = stack.pop()
        if done:
            out.append(b)
            continue
        if b is None or id(b) in seen:
            continue
        seen.add(id(b))
        stack.append((b, True))
        kids = (b.ef.succ, b.et.succ) if first_false else (b.et.succ, b.ef.succ)
        for kid in reversed(kids):
            stack.append((kid, False))
    return out


def _linearize(root):
    """Lay blocks out back to front as libpcap does; a branch too far for the
    8-bit jt/jf gets an extra 'ja' after it.

    libpcap restarts the whole layout each time a branch turns out too far
    (quadratic in the blocks). A block's successors are laid out before it, so
    growing a block by a 'ja' moves only what is laid out after it: one pass
    that redoes just that block gives the same program. Positions are counted
    from the program's end (`rend`) until the total is known."""
    order = _postorder(root, first_false=True)
    rend, pieces, end = {}, [], 0
    for p in order:
        live = [s for s in p.stmts if s.code != NOP]
        slen = len(live)
        body = []
        for off, s in enumerate(live):
            jt = jf = 0
            if _cls(s.code) == BPF_JMP and s.code != BPF_JMP | BPF_JA and off != slen - 2:
                # Block-local jumps, counted over the raw statement list as libpcap does.
                raw = p.stmts[:slen]
                jt = next(i for i, r in enumerate(raw) if r is s.jt) - off - 1
                jf = next(i for i, r in enumerate(raw) if r is s.jf) - off - 1
            body.append((s.code, jt, jf, s.k & U32_MAX))
        code, k = p.s.code, p.s.k & U32_MAX
        if p.et.succ is None:
            end += slen + 1
            rend[id(p)] = end
            pieces.append(body + [(code, 0, 0, k)])
            continue
        while True:
            start = end + slen + 1 + p.longjt + p.longjf
            extra, jts, longs, grown = 0, [], [], False
            for which in ("t", "f"):
                succ = p.et.succ if which == "t" else p.ef.succ
                dist = start - rend[id(succ)] - slen - 1
                if dist >= 256:
                    if (p.longjt if which == "t" else p.longjf) == 0:
                        if which == "t":
                            p.longjt += 1
                        else:
                            p.longjf += 1
                        grown = True
                        break
                    jts.append(extra)
                    extra += 1
                    longs.append((BPF_JMP | BPF_JA, 0, 0, dist - extra))
                else:
                    jts.append(dist)
            if not grown:
                break
        end = start
        rend[id(p)] = end
        pieces.append(body + [(code, jts[0], jts[1], k)] + longs)
    return [insn for piece in reversed(pieces) for insn in piece]


###############################################################################
# 7.7 Optimiser ###############################################################
# provides: _Optimizer
#
# optimize.c: value numbering within blocks, constant folding,
# dead-store elimination and branch threading over edge dominators, repeated to
# a fixed point; then identical blocks are merged.  It is part of the semantics:
# a load whose result no longer matters is dropped, so a frame too short for it
# is still accepted, exactly as libpcap's optimised program accepts it.

_A_ATOM, _X_ATOM, _N_ATOMS = BPF_MEMWORDS, BPF_MEMWORDS + 1, BPF_MEMWORDS + 2
_AX_ATOM = _N_ATOMS
_VAL_UNKNOWN = 0


def _atomuse(s):
    c = s.code
    if c == NOP:
        return -1
    cls = _cls(c)
    if cls == BPF_RET:
        return _A_ATOM if c & BPF_RVAL_MASK == BPF_A else _X_ATOM if c & BPF_RVAL_MASK == BPF_X else -1
    if cls in (BPF_LD, BPF_LDX):
        mode = c & BPF_MODE_MASK
        return _X_ATOM if mode == BPF_IND else s.k if mode == BPF_MEM else -1
    if cls == BPF_ST:
        return _A_ATOM
    if cls == BPF_STX:
        return _X_ATOM
    if cls in (BPF_JMP, BPF_ALU):
        return _AX_ATOM if c & BPF_X else _A_ATOM
    return _X_ATOM if c & 0xf8 == BPF_TXA else _A_ATOM      # BPF_MISC


def _atomdef(s):
    c = s.code
    if c == NOP:
        return -1
    cls = _cls(c)
    if cls in (BPF_LD, BPF_ALU):
        return _A_ATOM
    if cls == BPF_LDX:
        return _X_ATOM
    if cls in (BPF_ST, BPF_STX):
        return s.k
    if cls == BPF_MISC:
        return _X_ATOM if c & 0xf8 == BPF_TAX else _A_ATOM
    return -1


# Below these sizes the plain ways are quicker than setting up the faster ones:
# testing a bit of a dom bitset than numbering the dominator tree (number_dom_tree),
# trying every edge dominator than sorting the edges by test (fold_masks).
_DOM_TREE_MIN_BLOCKS = 256
_FOLD_MASKS_MIN_EDGES = 256


def _bits(x):
    while x:
        low = x & -x
        yield low.bit_length() - 1
        x ^= low


class _Optimizer:
    def __init__(self, root, reachable=None):
        self.root = root
        self.blocks = []
        # Number the blocks depth first, true branch first, as libpcap does.
        for b in reachable or _reachable(root):
            b.id = len(self.blocks)
            self.blocks.append(b)
        n = len(self.blocks)
        self.edges = [None] * (2 * n)
        for b in self.blocks:
            b.et.id, b.ef.id = b.id, n + b.id
            self.edges[b.id], self.edges[n + b.id] = b.et, b.ef
            b.et.pred = b.ef.pred = b

    def error(self, reason):
        raise FilterError(reason, 1)

    def run(self):
        self.loop(False)
        self.loop(True)
        self.intern_blocks()
        return self.opt_root()

    # -- the flow graph ------------------------------------------------------
    def find_levels(self):
        """Level = longest path to a return; levels[i] lists blocks as libpcap links them."""
        levels = [[] for _ in self.blocks]
        order = _postorder(self.root, first_false=False)
        for b in order:
            if b.et.succ is not None:
                b.level = max(b.et.succ.level, b.ef.succ.level) + 1
            else:
                b.level = 0
        for b in reversed(order):           # libpcap links each block in at the front
            levels[b.level].append(b)
        self.levels = levels

    def by_level(self, lowest=0):
        for level in range(self.root.level, lowest - 1, -1):
            yield from self.levels[level]

    def find_dom(self):
        allset = (1 << len(self.blocks)) - 1
        for b in self.blocks:
            b.dom = allset
        self.root.dom = 0
        for b in self.by_level():
            b.dom |= 1 << b.id
            if b.et.succ is not None:
                b.et.succ.dom &= b.dom
                b.ef.succ.dom &= b.dom
        if len(self.blocks) > _DOM_TREE_MIN_BLOCKS:
            self.number_dom_tree()

    def number_dom_tree(self):
        """dom_lo..dom_hi: a block's interval in a depth-first numbering of the
        dominator tree, so 'a dominates b' is a comparison (dominates()), not a bit of
        a bitset as long as the program (pullup asks it at every step of its walks).
        b's proper dominators are exactly dom(idom(b)), which names the parent."""
        by_dom, children = {}, {}
        for b in self.blocks:
            b.dom_lo = b.dom_hi = -1
        for b in self.by_level():
            by_dom[b.dom] = b
            if b is not self.root:
                children.setdefault(id(by_dom[b.dom ^ 1 << b.id]), []).append(b)
        n, stack = 0, [(self.root, False)]
        while stack:
            b, leaving = stack.pop()
            if leaving:
                b.dom_hi = n
                continue
            b.dom_lo, n = n, n + 1
            stack.append((b, True))
            stack.extend((c, False) for c in children.get(id(b), ()))

    @staticmethod
    def dominates(a, b):
        """a dominates b, by find_dom's bitsets (as they were when it ran)."""
        if b.dom_lo < 0:            # not reachable then: find_dom left it the full set
            return bool(b.dom >> a.id & 1)
        return a.dom_lo <= b.dom_lo < a.dom_hi

    def find_edom(self):
        allset = (1 << len(self.edges)) - 1
        for e in self.edges:
            e.edom = allset
        self.root.et.edom = self.root.ef.edom = 0
        for b in self.by_level():
            for ep in (b.et, b.ef):
                ep.edom |= 1 << ep.id
                if ep.succ is not None:
                    ep.succ.et.edom &= ep.edom
                    ep.succ.ef.edom &= ep.edom

    def find_ud(self):
        """Which registers each block uses before defining, and needs on exit."""
        for b in self.by_level():
            use = defs = kill = 0
            for s in b.stmts + ([b.s] if _cls(b.s.code) == BPF_JMP else []):
                atom = _atomuse(s)
                if atom == _AX_ATOM:
                    for a in (_X_ATOM, _A_ATOM):
                        if not defs >> a & 1:
                            use |= 1 << a
                elif atom >= 0:
                    if not defs >> atom & 1:
                        use |= 1 << atom
                if s is b.s:
                    continue
                atom = _atomdef(s)
                if atom >= 0:
                    if not use >> atom & 1:
                        kill |= 1 << atom
                    defs |= 1 << atom
            b.kill, b.in_use, b.out_use = kill, use, 0
        for level in range(1, self.root.level + 1):
            for b in self.levels[level]:
                b.out_use |= b.et.succ.in_use | b.ef.succ.in_use
                b.in_use |= b.out_use & ~b.kill

    def find_inedges(self):
        for b in self.blocks:
            b.in_edges = None
        for level in range(self.root.level, 0, -1):
            for b in self.levels[level]:
                for ep in (b.et, b.ef):
                    ep.next = ep.succ.in_edges
                    ep.succ.in_edges = ep

    # -- value numbering -----------------------------------------------------
    def init_val(self):
        self.curval = 0
        self.vtable = {}
        self.const = {}

    def F(self, code, v0, v1):
        key = (code, v0, v1)
        val = self.vtable.get(key)
        if val is None:
            self.curval += 1
            val = self.vtable[key] = self.curval
            if code & BPF_MODE_MASK == BPF_IMM and _cls(code) in (BPF_LD, BPF_LDX):
                self.const[val] = v0
        return val

    def K(self, k):
        return self.F(BPF_LD | BPF_IMM | BPF_W, k & U32_MAX, 0)

    def changed(self):
        self.non_branch_movement_performed = True
        self.done = False

    def vstore(self, s, val, atom, newval, alter):
        if alter and newval != _VAL_UNKNOWN and val[atom] == newval:
            s.code = NOP
        else:
            val[atom] = newval

    def fold_op(self, s, v0, v1):
        a, b = self.const[v0], self.const[v1]
        op = s.code & BPF_OP_MASK
        if op == BPF_ADD:
            a += b
        elif op == BPF_SUB:
            a -= b
        elif op == BPF_MUL:
            a *= b
        elif op == BPF_DIV:
            if b == 0:
                self.error("division by zero")
            a //= b
        elif op == BPF_MOD:
            if b == 0:
                self.error("modulus by zero")
            a %= b
        elif op == BPF_AND:
            a &= b
        elif op == BPF_OR:
            a |= b
        elif op == BPF_XOR:
            a ^= b
        elif op == BPF_LSH:
            a = a << b if b < 32 else 0
        elif op == BPF_RSH:
            a = a >> b if b < 32 else 0
        s.k = a & U32_MAX
        s.code = BPF_LD | BPF_IMM
        self.changed()

    def opt_stmt(self, s, val, alter):
        """Symbolically execute s, updating val; with alter, simplify s too."""
        c = s.code
        cls, mode = _cls(c), c & BPF_MODE_MASK
        const = self.const
        if cls == BPF_LD and mode == BPF_ABS:
            self.vstore(s, val, _A_ATOM, self.F(c, s.k, 0), alter)
        elif cls == BPF_LD and mode == BPF_IND:
            v = val[_X_ATOM]
            if alter and v in const:
                s.code = BPF_LD | BPF_ABS | (c & BPF_SIZE_MASK)
                s.k = (s.k + const[v]) & U32_MAX
                v = self.F(s.code, s.k, 0)
                self.changed()
            else:
                v = self.F(c, s.k, v)
            self.vstore(s, val, _A_ATOM, v, alter)
        elif c == BPF_LD | BPF_LEN:
            self.vstore(s, val, _A_ATOM, self.F(c, 0, 0), alter)
        elif c == BPF_LD | BPF_IMM:
            self.vstore(s, val, _A_ATOM, self.K(s.k), alter)
        elif c == BPF_LDX | BPF_IMM:
            self.vstore(s, val, _X_ATOM, self.K(s.k), alter)
        elif c == BPF_LDX | BPF_MSH | BPF_B:
            self.vstore(s, val, _X_ATOM, self.F(c, s.k, 0), alter)
        elif c == BPF_ALU | BPF_NEG:
            if alter and val[_A_ATOM] in const:
                s.code = BPF_LD | BPF_IMM
                s.k = (-const[val[_A_ATOM]]) & U32_MAX
                val[_A_ATOM] = self.K(s.k)
            else:
                val[_A_ATOM] = self.F(c, val[_A_ATOM], 0)
        elif cls == BPF_ALU and c & BPF_X == BPF_K and c & BPF_OP_MASK in _ALU_NAMES:
            op = c & BPF_OP_MASK
            if alter:
                if s.k == 0:
                    # 'sub #0' stays: the peephole pass needs it.
                    if op in (BPF_ADD, BPF_LSH, BPF_RSH, BPF_OR, BPF_XOR):
                        s.code = NOP
                        return
                    if op in (BPF_MUL, BPF_AND):
                        s.code = BPF_LD | BPF_IMM
                        val[_A_ATOM] = self.K(s.k)
                        return
                    if op == BPF_DIV:
                        self.error("division by zero")
                    if op == BPF_MOD:
                        self.error("modulus by zero")
                if val[_A_ATOM] in const:
                    self.fold_op(s, val[_A_ATOM], self.K(s.k))
                    val[_A_ATOM] = self.K(s.k)
                    return
            val[_A_ATOM] = self.F(c, val[_A_ATOM], self.K(s.k))
        elif cls == BPF_ALU and c & BPF_X and c & BPF_OP_MASK in _ALU_NAMES:
            op = c & BPF_OP_MASK
            if alter and val[_X_ATOM] in const:
                if val[_A_ATOM] in const:
                    self.fold_op(s, val[_A_ATOM], val[_X_ATOM])
                    val[_A_ATOM] = self.K(s.k)
                else:
                    s.code = BPF_ALU | BPF_K | op
                    s.k = const[val[_X_ATOM]]
                    if op in (BPF_LSH, BPF_RSH) and s.k > 31:
                        self.error("shift by more than 31 bits")
                    self.changed()
                    val[_A_ATOM] = self.F(s.code, val[_A_ATOM], self.K(s.k))
                return
            if alter and const.get(val[_A_ATOM], 1) == 0:
                if op in (BPF_ADD, BPF_OR, BPF_XOR):
                    s.code = BPF_MISC | BPF_TXA
                    self.vstore(s, val, _A_ATOM, val[_X_ATOM], alter)
                    return
                if op in (BPF_MUL, BPF_DIV, BPF_MOD, BPF_AND, BPF_LSH, BPF_RSH):
                    s.code = BPF_LD | BPF_IMM
                    s.k = 0
                    self.vstore(s, val, _A_ATOM, self.K(s.k), alter)
                    return
            val[_A_ATOM] = self.F(c, val[_A_ATOM], val[_X_ATOM])
        elif c == BPF_MISC | BPF_TXA:
            self.vstore(s, val, _A_ATOM, val[_X_ATOM], alter)
        elif c in (BPF_LD | BPF_MEM, BPF_LDX | BPF_MEM):
            v = val[s.k]
            if alter and v in const:
                s.code = BPF_LD | BPF_IMM if c == BPF_LD | BPF_MEM else BPF_LDX | BPF_IMM
                s.k = const[v]
                self.changed()
            self.vstore(s, val, _A_ATOM if c == BPF_LD | BPF_MEM else _X_ATOM, v, alter)
        elif c == BPF_MISC | BPF_TAX:
            self.vstore(s, val, _X_ATOM, val[_A_ATOM], alter)
        elif c == BPF_ST:
            self.vstore(s, val, s.k, val[_A_ATOM], alter)
        elif c == BPF_STX:
            self.vstore(s, val, s.k, val[_X_ATOM], alter)

    def opt_peep(self, b):
        stmts = b.stmts
        if not stmts:
            return
        n = len(stmts)

        def this_op(i):
            while i < n and stmts[i].code == NOP:
                i += 1
            return i if i < n else None

        last = stmts[0]
        i = 0
        while True:
            i = this_op(i)
            if i is None:
                break
            j = this_op(i + 1)
            if j is None:
                break
            s, nxt = stmts[i], stmts[j]
            last = nxt
            i_next = j
            # st M[k]; ldx M[k]  ->  st M[k]; tax
            if s.code == BPF_ST and nxt.code == BPF_LDX | BPF_MEM and s.k == nxt.k:
                self.changed()
                nxt.code = BPF_MISC | BPF_TAX
            # ld #k; tax  ->  ldx #k; txa
            if s.code == BPF_LD | BPF_IMM and nxt.code == BPF_MISC | BPF_TAX:
                s.code = BPF_LDX | BPF_IMM
                nxt.code = BPF_MISC | BPF_TXA
                self.changed()
            # ld #k; [ldxms]; add x; tax; ld [x+j]  ->  [ldxms]; ld [x+j+k]  (tcp[k] etc.)
            if s.code == BPF_LD | BPF_IMM and not b.out_use >> _X_ATOM & 1:
                add_i = j if nxt.code != BPF_LDX | BPF_MSH | BPF_B else this_op(j + 1)
                if add_i is None or stmts[add_i].code != BPF_ALU | BPF_ADD | BPF_X:
                    i = i_next
                    continue
                tax_i = this_op(add_i + 1)
                if tax_i is None or stmts[tax_i].code != BPF_MISC | BPF_TAX:
                    i = i_next
                    continue
                ild_i = this_op(tax_i + 1)
                if ild_i is None or _cls(stmts[ild_i].code) != BPF_LD or \
                        stmts[ild_i].code & BPF_MODE_MASK != BPF_IND:
                    i = i_next
                    continue
                stmts[ild_i].k = (stmts[ild_i].k + s.k) & U32_MAX
                s.code = stmts[add_i].code = stmts[tax_i].code = NOP
                self.changed()
            i = i_next
        const = self.const
        if b.s.code == _jmp(BPF_JEQ) and not b.out_use >> _A_ATOM & 1:
            if last.code == BPF_ALU | BPF_SUB | BPF_X:
                val = b.val[_X_ATOM]
                if val in const:
                    # sub x; jeq #y  ->  jeq #(x+y)
                    b.s.k = (b.s.k + const[val]) & U32_MAX
                    last.code = NOP
                    self.changed()
                elif b.s.k == 0:
                    # sub x; jeq #0  ->  jeq x
                    last.code = NOP
                    b.s.code = BPF_JMP | BPF_JEQ | BPF_X
                    self.changed()
            elif last.code == BPF_ALU | BPF_SUB | BPF_K:
                last.code = NOP
                b.s.k = (b.s.k + last.k) & U32_MAX
                self.changed()
            elif last.code == BPF_ALU | BPF_AND | BPF_K and b.s.k == 0:
                # and #k; jeq #0  ->  jset #k, branches swapped
                b.s.k = last.k
                b.s.code = _jmp(BPF_JSET)
                last.code = NOP
                self.changed()
                b.et.succ, b.ef.succ = b.ef.succ, b.et.succ
        if b.s.code == _jmp(BPF_JSET):
            if b.s.k == 0:
                b.et.succ = b.ef.succ
            if b.s.k == U32_MAX:
                b.ef.succ = b.et.succ
        val = b.val[_X_ATOM]
        if val in const and b.s.code & BPF_X:
            b.s.code &= ~BPF_X
            b.s.k = const[val]
        val = b.val[_A_ATOM]
        if val in const and not b.s.code & BPF_X:
            v, k, op = const[val], b.s.k, b.s.code & BPF_OP_MASK
            if op == BPF_JEQ:
                v = v == k
            elif op == BPF_JGT:
                v = v > k
            elif op == BPF_JGE:
                v = v >= k
            elif op == BPF_JSET:
                v &= k
            else:
                raise AssertionError(op)
            if b.ef.succ is not b.et.succ:
                self.changed()
            if v:
                b.ef.succ = b.et.succ
            else:
                b.et.succ = b.ef.succ

    def opt_deadstores(self, b):
        last = [None] * _N_ATOMS

        def deadstmt(s):
            atom = _atomuse(s)
            if atom >= 0:
                if atom == _AX_ATOM:
                    last[_X_ATOM] = last[_A_ATOM] = None
                else:
                    last[atom] = None
            atom = _atomdef(s)
            if atom >= 0:
                if last[atom] is not None:
                    self.changed()
                    last[atom].code = NOP
                last[atom] = s

        for s in b.stmts:
            deadstmt(s)
        deadstmt(b.s)
        for atom in range(_N_ATOMS):
            if last[atom] is not None and not b.out_use >> atom & 1:
                last[atom].code = NOP
                self.changed()

    def opt_blk(self, b, do_stmts):
        p = b.in_edges
        if p is None:
            b.val = [0] * _N_ATOMS
        else:
            # Registers keep a value number only where all predecessors agree.
            b.val = list(p.pred.val)
            p = p.next
            while p is not None:
                pv = p.pred.val
                for i in range(_N_ATOMS):
                    if b.val[i] != pv[i]:
                        b.val[i] = 0
                p = p.next
        aval, xval = b.val[_A_ATOM], b.val[_X_ATOM]
        for s in b.stmts:
            self.opt_stmt(s, b.val, do_stmts)
        if do_stmts and ((b.out_use == 0 and aval != _VAL_UNKNOWN and b.val[_A_ATOM] == aval
                          and xval != _VAL_UNKNOWN and b.val[_X_ATOM] == xval)
                         or _cls(b.s.code) == BPF_RET):
            if b.stmts:
                b.stmts = []
                self.changed()
        else:
            self.opt_peep(b)
            self.opt_deadstores(b)
        b.oval = self.K(b.s.k) if not b.s.code & BPF_X else b.val[_X_ATOM]
        b.et.code = b.s.code
        b.ef.code = -b.s.code

    # -- branches ------------------------------------------------------------
    @staticmethod
    def use_conflict(b, succ):
        use = succ.out_use
        return any(b.val[atom] != succ.val[atom] for atom in _bits(use) if atom < _N_ATOMS)

    @staticmethod
    def fold_edge(child, ep):
        """Where child goes when entered along ep, if the test on ep decides it."""
        code, sense = (ep.code, True) if ep.code >= 0 else (-ep.code, False)
        if child.s.code != code:
            return None
        if child.val[_A_ATOM] != ep.pred.val[_A_ATOM]:
            return None
        if child.oval == ep.pred.oval:
            return child.et.succ if sense else child.ef.succ
        if sense and code == _jmp(BPF_JEQ):
            return child.ef.succ
        return None

    def opt_j(self, ep):
        succ = ep.succ
        if succ.et.succ is None:
            return
        if succ.et.succ is succ.ef.succ and not self.use_conflict(ep.pred, succ.et.succ):
            self.changed()
            ep.succ = succ.et.succ
        while True:
            child, deciding = ep.succ, ep.edom
            if self.same_test is not None:
                key = (child.s.code, child.val[_A_ATOM])
                deciding &= self.same_test.get(key + (child.oval,), 0) | \
                    (self.jeq_true.get(key, 0) if child.s.code == _jmp(BPF_JEQ) else 0)
            for k in _bits(deciding):
                target = self.fold_edge(child, self.edges[k])
                if target is not None and not self.use_conflict(ep.pred, target):
                    self.done = False
                    ep.succ = target
                    if target.et.succ is not None:
                        break
                    return
            else:
                return

    def pullup(self, b, branch):
        """or_pullup (branch 'et') / and_pullup ('ef'): hoist a repeated test of the
        same value to the top of a chain of tests that all lead to the same place."""
        ep = b.in_edges
        if ep is None:
            return
        val = ep.pred.val[_A_ATOM]
        e = ep.next
        while e is not None:
            if e.pred.val[_A_ATOM] != val:
                return
            e = e.next
        # The walks below are libpcap's, and as long as the chain of tests: written
        # out per branch, with dominates() inlined, because on a long 'or' they are
        # most of the optimiser's time.
        pred, or_, dominates = b.in_edges.pred, branch == "et", self.dominates
        lo, hi = b.dom_lo, b.dom_hi
        diffp = pred.et if pred.et.succ is b else pred.ef
        at_top = True
        target = b.et.succ if or_ else b.ef.succ
        while True:
            d = diffp.succ
            if d is None or (d.et.succ if or_ else d.ef.succ) is not target or \
                    not (lo <= d.dom_lo < hi if d.dom_lo >= 0 else dominates(b, d)):
                return
            if d.val[_A_ATOM] != val:
                break
            diffp = d.ef if or_ else d.et
            at_top = False
        samep = diffp.succ.ef if or_ else diffp.succ.et
        while True:
            d = samep.succ
            if d is None or (d.et.succ if or_ else d.ef.succ) is not target or \
                    not (lo <= d.dom_lo < hi if d.dom_lo >= 0 else dominates(b, d)):
                return
            if d.val[_A_ATOM] == val:
                break
            samep = d.ef if or_ else d.et
        pull = samep.succ
        pull_other = pull.ef if or_ else pull.et
        samep.succ = pull_other.succ
        pull_other.succ = diffp.succ
        if at_top:
            e = b.in_edges
            while e is not None:
                if e.pred.et.succ is b:
                    e.pred.et.succ = pull
                else:
                    e.pred.ef.succ = pull
                e = e.next
        else:
            diffp.succ = pull
        self.done = False

    def opt_blks(self, do_stmts):
        self.init_val()
        self.find_inedges()
        for b in self.by_level():
            self.opt_blk(b, do_stmts)
        if do_stmts:
            return      # moving branches now could not change anything
        self.same_test = self.jeq_true = None
        if len(self.edges) > _FOLD_MASKS_MIN_EDGES:
            self.fold_masks()
        for level in range(1, self.root.level + 1):
            for b in self.levels[level]:
                self.opt_j(b.et)
                self.opt_j(b.ef)
        self.find_inedges()
        for level in range(1, self.root.level + 1):
            for b in self.levels[level]:
                self.pullup(b, "et")
                self.pullup(b, "ef")

    def fold_masks(self):
        """opt_j tries the edge dominators of an edge in order, and fold_edge(child, e)
        decides only when e has child's test and A, and child's operand or is a
        'jeq' taken: those edges as bitsets like edom, so opt_j ANDs instead of trying
        every dominator (quadratic in a long 'or'). Branch moves change neither."""
        same_test, jeq_true = self.same_test, self.jeq_true = {}, {}
        for e in self.edges:
            if e.pred.val is not None:
                key = (abs(e.code), e.pred.val[_A_ATOM])
                bit = 1 << e.id
                same_test[key + (e.pred.oval,)] = same_test.get(key + (e.pred.oval,), 0) | bit
                if e.code == _jmp(BPF_JEQ):
                    jeq_true[key] = jeq_true.get(key, 0) | bit

    def loop(self, do_stmts):
        loop_count = 0
        while True:
            self.done = True
            self.non_branch_movement_performed = False
            self.find_levels()
            self.find_dom()
            self.find_ud()
            self.find_edom()
            self.opt_blks(do_stmts)
            if self.done:
                break
            # Branch movement alone can cycle; libpcap gives up after 100 rounds.
            if self.non_branch_movement_performed:
                loop_count = 0
            else:
                loop_count += 1
                if loop_count >= 100:
                    break

    # -- clean-up ------------------------------------------------------------
    def intern_blocks(self):
        """Merge blocks that are equal (same statements, test and successors).

        libpcap merges the blocks equal as they stand, redirects the branches and
        starts over until nothing changes: one round per level of the graph. What
        it ends with is the same as numbering the classes bottom up, successors'
        classes in the key, in one pass: each class is kept as its member that
        comes last in self.blocks (a merge keeps the later block), and every
        branch goes to the class's keeper."""
        cls, classes, keeper = {}, {}, {}
        for b in _postorder(self.root, first_false=False):      # successors first
            succ = (None, None) if b.et.succ is None else \
                (cls[id(b.et.succ)], cls[id(b.ef.succ)])
            c = classes.setdefault((b.s.code, b.s.k, succ, tuple(
                (s.code, s.k) for s in b.stmts if s.code != NOP)), len(classes))
            cls[id(b)] = c
            if c not in keeper or keeper[c].id < b.id:
                keeper[c] = b
        for b in keeper.values():
            if b.et.succ is not None:
                b.et.succ = keeper[cls[id(b.et.succ)]]
                b.ef.succ = keeper[cls[id(b.ef.succ)]]
        root = self.root
        if root.et.succ is not None:        # the root is kept even if merged: no branch
            root.et.succ = keeper[cls[id(root.et.succ)]]    # goes to it
            root.ef.succ = keeper[cls[id(root.ef.succ)]]

    def opt_root(self):
        b = self.root
        s = b.stmts
        b.stmts = []
        while _cls(b.s.code) == BPF_JMP and b.et.succ is b.ef.succ:
            b = b.et.succ
        b.stmts = s + b.stmts
        if _cls(b.s.code) == BPF_RET:
            b.stmts = []
        return b


###############################################################################
# 7.8 Entry points ############################################################
# provides: compile_filter, FILTER_MAX_CHARS

# Bounds on one expression, checked before the work they bound (README, Rules). The
# optimiser's passes are quadratic in the blocks (dominator bitsets, libpcap's chain
# walks), so the blocks parsing generates bound its time and memory: at the limit,
# about a second on a 2-core VM (tests/bench.py, "Rules at scale"). The text is
# checked before it is even lexed; a limit in characters is one an operator can
# check by eye, and with ~12 blocks per 'host' term (IPv4, ARP and RARP, each
# source and destination) the block limit binds first for the common 'or' lists:
# ~340 'host' terms or ~180 'port' terms (23 blocks: TCP/UDP/SCTP over IPv4/IPv6).
FILTER_MAX_CHARS = 8192
FILTER_MAX_BLOCKS = 4096


def compile_filter(expr, kernel=False, snaplen=SNAPLEN_FULL, optimize=True, names=None):
    """Compile a pcap-filter expression to a classic BPF program for Ethernet.

    kernel=False: the frame as pcap_offline_filter sees it (VLAN tags in the data);
    kernel=True: as an AF_PACKET socket filter sees it (outer VLAN tag in metadata).
    names: a list to append the names the expression looked up to (the program
    depends on nothing else than its text when there are none).
    Raises FilterError for every expression libpcap 1.10 rejects, and FilterTooLarge
    beyond FILTER_MAX_CHARS or FILTER_MAX_BLOCKS."""
    if len(expr) > FILTER_MAX_CHARS:
        raise FilterTooLarge(f"{len(expr)} characters", FILTER_MAX_CHARS)
    gen = _Gen(kernel, snaplen)
    if names is not None:
        gen.names = names
    try:
        b = _Parser(expr, gen).parse_prog()
    except RecursionError:
        raise FilterError("expression nested too deeply", 1) from None
    root = gen.retblk(snaplen) if b is None else gen.finish(b)
    blocks = _reachable(root)
    if len(blocks) > FILTER_MAX_BLOCKS:
        raise FilterTooLarge(f"{len(blocks)} blocks of code", FILTER_MAX_BLOCKS)
    if optimize and not gen.no_optimize:
        root = _Optimizer(root, blocks).run()
        if root.s.code == BPF_RET | BPF_K and root.s.k == 0:
            raise FilterError("expression rejects all packets", 1)
    return _linearize(root)


###############################################################################
# 8 Filter matcher: classic BPF translated to Python ##########################
###############################################################################
# provides: make_rules_counter
###############################################################################
# Translation to Python
#
# A program without backward jumps is a DAG, so it becomes one tree of nested
# if/elif/else: every path from the entry is straight-line code ending in a
# `return`, with constants inlined and no dispatch at run time. A join point
# reached from several places is duplicated into each, unless the copies would
# grow too big; then it becomes a helper function the paths call (a Python call
# costs about two packet loads, so only big tails are worth it). Loads do no
# length check: indexing past the end raises IndexError, unpack_from raises
# struct.error and a zero divisor raises ZeroDivisionError, and one `try`
# (free until it fires, since Python 3.11) turns all three into "reject",
# exactly when bpf_filter would.
# Programs that jump backwards (libpcap's protochain) become a small state
# machine instead. make_rules_counter puts every rule into one function (one
# per _RULES_PER_FUNCTION rules, for a big rule set): loads
# several rules make (absolute ones, 'ldxb 4*([14]&0xf)' and the transport
# header loads at [x + k] after it) are cached in locals, so the 2nd..nth rule
# pays a None test instead of a load; and the ethertype is tested once, with
# every rule specialised under each common value, which removes the rules that
# cannot match a frame of that type (most of them, for ARP or IPv6 frames in an
# IPv4 rule set) and the ethertype tests from the others.

_REJECTS = (IndexError, struct.error, ZeroDivisionError)
_DUP_BUDGET = 256           # instructions one join point may be copied into its paths
_MAX_INDENT = 40            # Python refuses source nested beyond 100 levels
_FOLD_RUN = 3               # statements folded into one `elif (A := ...)` condition

_JUMP_OPS = {BPF_JEQ: "==", BPF_JGT: ">", BPF_JGE: ">=", BPF_JSET: "&"}
_ALU_OPS = {BPF_ADD: "+", BPF_SUB: "-", BPF_MUL: "*", BPF_DIV: "//", BPF_MOD: "%",
            BPF_OR: "|", BPF_AND: "&", BPF_XOR: "^", BPF_LSH: "<<", BPF_RSH: ">>"}
_REJECT_STMT = object()          # a statement that rejects wherever it is reached


def _insn_text(insn, pc):
    """One instruction as 'tcpdump -d' prints it, padding folded, for generated comments."""
    return " ".join(_image(insn, pc).split())


def _jump_target(prog, pc):
    """Successor pcs of a jump at pc (the ja offset sign-extended, as libpcap does)."""
    code, jt, jf, k = prog[pc]
    if code == BPF_JMP | BPF_JA:
        return (pc + 1 + (k - (1 << 32) if k & 0x80000000 else k),)
    return pc + 1 + jt, pc + 1 + jf


def _is_cond_jump(code):
    return _cls(code) == BPF_JMP and code & BPF_OP_MASK in _JUMP_OPS and code <= 0xFF


def _successors(prog, pc):
    code = prog[pc][0]
    if _cls(code) == BPF_RET:
        return ()
    if code == BPF_JMP | BPF_JA or _is_cond_jump(code):
        return _jump_target(prog, pc)
    return (pc + 1,)


def _has_backward_jump(prog):
    return any(t <= pc for pc in range(len(prog)) for t in _successors(prog, pc))


def _predecessor_counts(prog):
    preds = [0] * (len(prog) + 1)
    for pc in range(len(prog)):
        for t in set(_successors(prog, pc)):
            if 0 <= t < len(prog):
                preds[t] += 1
    return preds


def _helper_points(prog):
    """Join points whose copies would exceed _DUP_BUDGET: they become helper functions."""
    preds, helpers = _predecessor_counts(prog), set()
    size = [1] * (len(prog) + 1)
    for pc in range(len(prog) - 1, -1, -1):
        succ = [t for t in set(_successors(prog, pc)) if 0 <= t < len(prog)]
        size[pc] = 1 + sum(1 if t in helpers else size[t] for t in succ)
        if preds[pc] > 1 and size[pc] * (preds[pc] - 1) > _DUP_BUDGET:
            helpers.add(pc)
    return helpers


def _load_expr(size, index):
    """Source of a big-endian load at `index` (a source snippet); raises past the end."""
    if size == 1:
        return f"data[{index}]"
    return f"_H(data, {index})[0]" if size == 2 else f"_W(data, {index})[0]"


_ANCILLARY_SRC = {
    SKF_AD_PKTTYPE: ("pkttype & 7", 7),
    SKF_AD_VLAN_TAG: ("0 if vlan_tci is None else vlan_tci & 0xffff", 0xFFFF),
    SKF_AD_VLAN_TAG_PRESENT: ("0 if vlan_tci is None else 1", 1),
    SKF_AD_PROTOCOL: ("_skb_protocol(data)", 0xFFFF),
}


def _statement(insn, bound_a, bound_x, cache=None, x_msh=None):
    """(target, expression, bound) for a non-jump, non-return instruction, or _REJECT_STMT.

    The expression refers to the accumulator as '{a}' so runs of accumulator
    statements can be folded into one walrus expression. `bound_*` are upper
    bounds of A and X; an arithmetic result below 2**32 needs no mask. `cache`
    maps shareable loads to the local caching them: ("ld", size, k) for
    absolute loads, ("msh", 1, k) for 'ldxb 4*([k]&0xf)' and, when X is known
    to hold that ('x_msh'), ("ind", x_msh, size, k) for loads at [x + k].
    """
    code, _, _, k = insn
    if code > 0xFF:
        return _REJECT_STMT
    cls, size = _cls(code), _LOAD_SIZES.get(code & BPF_SIZE_MASK)
    if cls == BPF_LD:
        mode = code & BPF_MODE_MASK
        if mode == BPF_ABS and size:
            if k >= SKF_AD_OFF:
                src = _ANCILLARY_SRC.get(k - SKF_AD_OFF)
                return _REJECT_STMT if src is None else ("A",) + src
            expr = _load_expr(size, k)
            name = cache.get(("ld", size, k)) if cache else None
            if name:
                expr = f"{name} if {name} is not None else ({name} := {expr})"
            return "A", expr, (1 << 8 * size) - 1
        if mode == BPF_IND and size:
            expr = _load_expr(size, f"X + {k}" if k else "X")
            name = cache.get(("ind", x_msh, size, k)) if cache and x_msh is not None else None
            if name:
                expr = f"{name} if {name} is not None else ({name} := {expr})"
            return "A", expr, (1 << 8 * size) - 1
        if code == BPF_LD | BPF_IMM:
            return "A", str(k), k
        if code == BPF_LD | BPF_W | BPF_LEN:
            return "A", "wirelen", U32_MAX
        if code == BPF_LD | BPF_MEM and k < BPF_MEMWORDS:
            return "A", f"m{k}", U32_MAX
        return _REJECT_STMT
    if cls == BPF_LDX:
        if code == BPF_LDX | BPF_IMM:
            return "X", str(k), k
        if code == BPF_LDX | BPF_LEN:
            return "X", "wirelen", U32_MAX
        if code == BPF_LDX | BPF_MEM and k < BPF_MEMWORDS:
            return "X", f"m{k}", U32_MAX
        if code == BPF_LDX | BPF_B | BPF_MSH:
            expr = f"(data[{k}] & 15) << 2"
            name = cache.get(("msh", 1, k)) if cache else None
            if name:
                expr = f"{name} if {name} is not None else ({name} := {expr})"
            return "X", expr, 60
        return _REJECT_STMT
    if cls in (BPF_ST, BPF_STX):
        if code & ~BPF_CLASS_MASK or k >= BPF_MEMWORDS:
            return _REJECT_STMT
        return f"m{k}", "{a}" if cls == BPF_ST else "X", bound_a if cls == BPF_ST else bound_x
    if cls == BPF_ALU:
        return _alu_statement(code, k, bound_a, bound_x)
    if code == BPF_MISC | BPF_TAX:
        return "X", "{a}", bound_a
    if code == BPF_MISC | BPF_TXA:
        return "A", "X", bound_x
    return _REJECT_STMT


def _alu_statement(code, k, bound_a, bound_x):
    op = code & BPF_OP_MASK
    if code == BPF_ALU | BPF_NEG:
        return "A", f"-{{a}} & {U32_MAX}", U32_MAX
    if op not in _ALU_OPS:
        return _REJECT_STMT
    by_x = code & BPF_X
    v, bound_v = ("X", bound_x) if by_x else (str(k), k)
    if op == BPF_LSH and not by_x:
        if k >= 32:
            return "A", "0", 0
    elif op == BPF_LSH:
        return "A", f"({{a}} << X) & {U32_MAX} if X < 32 else 0", U32_MAX
    if op in (BPF_DIV, BPF_MOD) and not by_x and k == 0:
        return _REJECT_STMT
    bound = _alu_bound(op, bound_a, bound_v, by_x, k)
    if op in (BPF_DIV, BPF_MOD, BPF_RSH, BPF_AND, BPF_OR, BPF_XOR):
        return "A", f"{{a}} {_ALU_OPS[op]} {v}", bound
    if bound <= U32_MAX:
        return "A", f"{{a}} {_ALU_OPS[op]} {v}", bound
    return "A", f"({{a}} {_ALU_OPS[op]} {v}) & {U32_MAX}", U32_MAX


def _resolve(insn, fact):
    """Outcome (True/False) of a conditional jump on A if `fact` about A decides it, else None.

    A fact is ("eq", v): A == v, or ("ne", values): A is none of them.
    """
    code, _, _, k = insn
    if fact is None or code & BPF_X:
        return None
    op = code & BPF_OP_MASK
    if fact[0] == "eq":
        return _jump_taken(op, fact[1], k)
    return False if op == BPF_JEQ and k in fact[1] else None


def _after_jump(insn, fact, taken):
    """What is known about A on the taken / not-taken edge of a conditional jump."""
    code, _, _, k = insn
    if code & BPF_X or code & BPF_OP_MASK != BPF_JEQ or (fact and fact[0] == "eq"):
        return fact
    if taken:
        return "eq", k
    return "ne", (fact[1] if fact and fact[0] == "ne" else frozenset()) | {k}


class _MatchTree:
    """Emits one forward-only program as nested if/elif/else source lines.

    `leaf(value_src)` gives the statement that ends a path with that return
    value ('return ...' for a matcher, the counting statements for a rule); helpers holds the
    join points turned into functions named `prefix + pc`. Along each path the
    emitter knows facts about A from the jumps taken, so a test a path has
    already decided costs nothing; `ethertype` is such a fact about the
    'ldh [12]' a rule set dispatches on before its rules run.
    """

    def __init__(self, prog, leaf, prefix, cache=None, helpers=None, ethertype=None, args=None):
        self.prog, self.leaf, self.prefix, self.cache = prog, leaf, prefix, cache
        self.helpers = _helper_points(prog) if helpers is None else helpers
        self.ethertype = ethertype
        self.args = _state_args(prog) if args is None else args
        self.lines = []

    def emit(self, depth, text):
        self.lines.append("    " * depth + text)

    def call(self, pc):
        self.helpers.add(pc)
        return f"{self.prefix}{pc}(data, wirelen, pkttype, vlan_tci{self.args})"

    def statement(self, insn, ba, bx, xk):
        """(_statement, fact about A after it, MSH offset X holds after it or None)."""
        code, k = insn[0], insn[3]
        if code == BPF_LDX | BPF_B | BPF_MSH:
            return _statement(insn, ba, bx, self.cache), None, k
        if self.ethertype and code == BPF_LD | BPF_H | BPF_ABS and k == 12:
            if self.ethertype[0] == "eq":
                return ("A", "c_h12", 0xFFFF), self.ethertype, xk
            return _statement(insn, ba, bx, self.cache), self.ethertype, xk
        st = _statement(insn, ba, bx, self.cache, xk)
        if st is not _REJECT_STMT and st[0] == "X":
            xk = None
        return st, (("eq", k) if code == BPF_LD | BPF_IMM else None), xk

    def path(self, pc, depth, ba=U32_MAX, bx=U32_MAX, fact=None, entry=False, xk=None):
        """Straight-line code from pc up to its branch or leaf."""
        prog = self.prog
        while True:
            if not 0 <= pc < len(prog):
                return self.emit(depth, self.leaf("0"))
            if (pc in self.helpers and not entry) or depth > _MAX_INDENT:
                return self.emit(depth, self.leaf(self.call(pc)))
            entry = False
            code, _, _, k = insn = prog[pc]
            if _cls(code) == BPF_RET:
                value = str(k) if code == BPF_RET | BPF_K else \
                    "A" if code == BPF_RET | BPF_A else "0"
                return self.emit(depth, self.leaf(value) + f"  # ({pc})")
            if code == BPF_JMP | BPF_JA:
                pc = _jump_target(prog, pc)[0]
                continue
            if _is_cond_jump(code):
                t, f = _jump_target(prog, pc)
                known = _resolve(insn, fact)
                if t == f or known is not None:
                    fact = _after_jump(insn, fact, t == f or known) if t != f else fact
                    pc = t if t == f or known else f
                    continue
                return self.branch(insn, t, f, depth, ba, bx, fact, pc, xk)
            st, new_fact, xk = self.statement(insn, ba, bx, xk)
            if st is _REJECT_STMT:
                return self.emit(depth, self.leaf("0") + f"  # ({pc}) rejects")
            target, expr, bound = st
            self.emit(depth, f"{target} = {expr.format(a='A')}  # {_insn_text(insn, pc)}")
            if target == "A":
                ba, fact = bound, new_fact
            elif target == "X":
                bx = bound
            pc += 1

    @staticmethod
    def condition(insn, a_src):
        code, _, _, k = insn
        value = "X" if code & BPF_X else str(k)
        return f"{a_src} {_JUMP_OPS[code & BPF_OP_MASK]} {value}"

    def fold(self, pc, ba, bx, xk):
        """(jump pc, source of A for its condition, ba, fact) when the code at pc is a
        run of accumulator statements ending in a conditional jump, so it can be an
        `elif`."""
        prog, a_src, run, fact = self.prog, "A", 0, None
        while 0 <= pc < len(prog) and pc not in self.helpers:
            insn = prog[pc]
            if _is_cond_jump(insn[0]):
                return pc, f"(A := {a_src})" if run else "A", ba, fact
            st, fact, _ = self.statement(insn, ba, bx, xk)
            # a statement that ignores A would drop the ones before it, and with
            # them a load that may be out of bounds
            if st is _REJECT_STMT or st[0] != "A" or run == _FOLD_RUN or \
                    (run and "{a}" not in st[1]):
                return None
            a_src, ba, run = st[1].format(a=f"({a_src})" if run else "A"), st[2], run + 1
            pc += 1
        return None

    def skip_decided(self, pc, fact):
        """Follow the jumps at pc that `fact` already decides: (new pc, fact there)."""
        prog = self.prog
        while 0 <= pc < len(prog) and pc not in self.helpers:
            insn = prog[pc]
            if insn[0] == BPF_JMP | BPF_JA:
                pc = _jump_target(prog, pc)[0]
                continue
            if not _is_cond_jump(insn[0]):
                break
            t, f = _jump_target(prog, pc)
            known = True if t == f else _resolve(insn, fact)
            if known is None:
                break
            fact = _after_jump(insn, fact, known) if t != f else fact
            pc = t if known else f
        return pc, fact

    def jeq_run(self, insn, pc, t, f, fact):
        """'jeq #k' tests that all go to t when equal, each the next one's 'else' (how
        libpcap tests for one of several values, e.g. TCP, UDP or SCTP for 'port'):
        (their ks, their comment, the 'else' of the last, the fact there). One
        `A in {...}` instead of t's code copied under each."""
        ks, text, fact = [insn[3]], _insn_text(insn, pc), _after_jump(insn, fact, False)
        while insn[0] == BPF_JMP | BPF_JEQ | BPF_K:
            g, gfact = self.skip_decided(f, fact)
            if not 0 <= g < len(self.prog) or g in self.helpers:
                break
            insn = self.prog[g]
            if insn[0] != BPF_JMP | BPF_JEQ | BPF_K or _jump_target(self.prog, g)[0] != t:
                break
            ks.append(insn[3])
            text += "; " + _insn_text(insn, g)
            f, fact = _jump_target(self.prog, g)[1], _after_jump(insn, gfact, False)
        return ks, text, f, fact

    def branch(self, insn, t, f, depth, ba, bx, fact, pc, xk):
        keyword, a_src = "if", "A"
        while True:
            ks, text, f_run, f_fact = self.jeq_run(insn, pc, t, f, fact)
            if len(ks) == 1:
                cond, t_fact = self.condition(insn, a_src), _after_jump(insn, fact, True)
            else:
                # Taken, A is one of ks: what was known before (A is none of a set) holds.
                cond, t_fact = f"{a_src} in {{{', '.join(map(str, ks))}}}", fact
            self.emit(depth, f"{keyword} {cond}:  # {text}")
            self.path(t, depth + 1, ba, bx, t_fact, xk=xk)
            f, fact = self.skip_decided(f_run, f_fact)
            folded = self.fold(f, ba, bx, xk)
            if folded is None:
                break
            jpc, ja_src, jba, jfact = folded
            jinsn = self.prog[jpc]
            jt, jf = _jump_target(self.prog, jpc)
            if jpc != f:                        # statements ran: facts come from them
                if jt == jf or _resolve(jinsn, jfact) is not None:
                    break
            else:
                jfact = fact
            insn, a_src, pc, t, f = jinsn, ja_src, jpc, jt, jf
            ba, fact, keyword = jba, jfact, "elif"
        if self.leaf("0") != "pass" or not self.rejects_at_once(f):
            self.emit(depth, "else:")
            self.path(f, depth + 1, ba, bx, fact, xk=xk)

    def rejects_at_once(self, pc):
        return 0 <= pc < len(self.prog) and self.prog[pc][0] == BPF_RET | BPF_K \
            and self.prog[pc][3] == 0


def _state_args(prog):
    """', A, X, m0...' — the registers a helper function needs passed in."""
    used = _scratch_used(prog)
    return ", A" + (", X" if _uses_x(prog) else "") + "".join(f", m{i}" for i in used)


def _scratch_used(prog):
    return sorted({k for code, _, _, k in prog if k < BPF_MEMWORDS and code in (
        BPF_ST, BPF_STX, BPF_LD | BPF_MEM, BPF_LDX | BPF_MEM)})


def _uses_x(prog):
    return any(_cls(code) in (BPF_LDX, BPF_STX) or code in (BPF_MISC | BPF_TXA,)
               or (_cls(code) in (BPF_ALU, BPF_JMP) and code & BPF_X)
               or (_cls(code) == BPF_LD and code & BPF_MODE_MASK == BPF_IND)
               for code, _, _, _ in prog)


def _reads_writes(insn):
    """(registers read, registers written) by one instruction: 'A', 'X', 'm0'..'m15'."""
    code, _, _, k = insn
    cls, mem = _cls(code), f"m{k}"
    uses_x = bool(code & BPF_X) if cls in (BPF_ALU, BPF_JMP) else \
        cls == BPF_LD and code & BPF_MODE_MASK == BPF_IND
    reads = {"X"} if uses_x else set()
    if cls == BPF_LD:
        return reads | ({mem} if code == BPF_LD | BPF_MEM else set()), {"A"}
    if cls == BPF_LDX:
        return ({mem} if code == BPF_LDX | BPF_MEM else set()), {"X"}
    if cls in (BPF_ST, BPF_STX):
        return {"A" if cls == BPF_ST else "X"}, {mem}
    if cls == BPF_ALU:
        return reads | {"A"}, {"A"}
    if cls == BPF_JMP:
        return (reads | {"A"}) if code != BPF_JMP | BPF_JA else set(), set()
    if cls == BPF_RET:
        return ({"A"} if code == BPF_RET | BPF_A else set()), set()
    return ({"A"}, {"X"}) if code == BPF_MISC | BPF_TAX else ({"X"}, {"A"})


def _read_before_written(prog):
    """Registers some path may read before writing; they must start at 0.

    Forward-only programs are in topological order, so one pass intersecting
    what is definitely written on every incoming edge suffices; with backward
    jumps every register the program mentions is zeroed.
    """
    everything = {"A", "X"} | {f"m{i}" for i in _scratch_used(prog)}
    if _has_backward_jump(prog):
        return everything
    written, unset = [None] * len(prog), set()
    written[0] = frozenset()
    for pc, insn in enumerate(prog):
        if written[pc] is None:
            continue                                    # unreachable
        reads, writes = _reads_writes(insn)
        unset |= reads - written[pc]
        after = written[pc] | writes
        for t in _successors(prog, pc):
            if 0 <= t < len(prog):
                written[t] = after if written[t] is None else written[t] & after
    return unset & everything


def _register_init(prog, indent, all_state=False, unset=None):
    """Zero the registers and scratch words a program may read before writing
    (all of them when helper functions are passed the whole state); unset is
    _read_before_written(prog) if known."""
    order = ["A", "X"] + [f"m{i}" for i in range(BPF_MEMWORDS)]
    if all_state:
        needed = _state_args(prog).split(", ")[1:]
    else:
        needed = _read_before_written(prog) if unset is None else unset
    names = [r for r in order if r in needed]
    return [f"{indent}{' = '.join(names)} = 0"] if names else []


def _machine_lines(prog, leaf, depth):
    """A state machine for a program with backward jumps: one `if pc == n` per
    basic block inside a loop; backward jumps are counted and capped."""
    jumps = [pc for pc in range(len(prog)) if _cls(prog[pc][0]) == BPF_JMP]
    leaders = {0} | {t for pc in jumps for t in _successors(prog, pc) if 0 <= t < len(prog)}
    leaders |= {pc + 1 for pc in range(len(prog)) if _cls(prog[pc][0]) in (BPF_RET, BPF_JMP)}
    leaders = sorted(x for x in leaders if x < len(prog))
    ind = "    " * depth
    lines = [f"{ind}pc = back = 0", f"{ind}while True:"]
    for n, start in enumerate(leaders):
        lines.append(f"{ind}    {'if' if n == 0 else 'elif'} pc == {start}:")
        lines += _block_lines(prog, start, leaders, leaf, ind + "        ")
    lines.append(f"{ind}    else:")
    lines.append(f"{ind}        {leaf('0')}")
    return lines


def _goto(pc, target, ind):
    if target <= pc:
        return [f"{ind}back += 1", f"{ind}if back > {_MAX_BACKWARD_JUMPS}:",
                f"{ind}    pc = -1", f"{ind}else:", f"{ind}    pc = {target}"]
    return [f"{ind}pc = {target}"]


def _block_lines(prog, pc, leaders, leaf, ind):
    lines = []
    while True:
        code, _, _, k = insn = prog[pc]
        if _cls(code) == BPF_RET:
            value = str(k) if code == BPF_RET | BPF_K else "A" if code == BPF_RET | BPF_A else "0"
            return lines + [f"{ind}{leaf(value)}"]
        if code == BPF_JMP | BPF_JA:
            return lines + _goto(pc, _jump_target(prog, pc)[0], ind)
        if _is_cond_jump(code):
            t, f = _jump_target(prog, pc)
            return lines + [f"{ind}if {_MatchTree.condition(insn, 'A')}:"] + \
                _goto(pc, t, ind + "    ") + [f"{ind}else:"] + _goto(pc, f, ind + "    ")
        st = _statement(insn, U32_MAX, U32_MAX)
        if st is _REJECT_STMT:
            return lines + [f"{ind}{leaf('0')}"]
        lines.append(f"{ind}{st[0]} = {st[1].format(a='A')}  # {_insn_text(insn, pc)}")
        pc += 1
        if pc in leaders or pc >= len(prog):
            return lines + [f"{ind}pc = {pc}"]


_MATCHER_HEADER = "def {name}(data, wirelen, pkttype=0, vlan_tci=None):"


def matcher_source(prog, name="match"):
    """Python source of the function make_matcher builds (for debugging)."""
    prog = [tuple(int(v) for v in insn) for insn in prog]
    if not prog:
        return f"{_MATCHER_HEADER.format(name=name)}\n    return 0\n"
    body = [_MATCHER_HEADER.format(name=name)]
    if _has_backward_jump(prog):
        body += _register_init(prog, "    ") + ["    try:"]
        body += _machine_lines(prog, lambda v: f"return {v}", 2)
        helpers = []
    else:
        tree = _MatchTree(prog, lambda v: f"return {v}", f"_{name}_")
        tree.path(0, 2, entry=True)
        body += _register_init(prog, "    ", bool(tree.helpers)) + ["    try:"] + tree.lines
        helpers = list(_helper_sources(tree).values())
    body += ["    except _REJECTS:", "        return 0"]
    return "\n".join(helpers + body) + "\n"


def _helper_sources(tree):
    """{name: source} of the helper functions a tree calls, each its own small tree."""
    out = {}
    while tree.helpers - set(out):
        pc = min(tree.helpers - set(out))
        sub = _MatchTree(tree.prog, lambda v: f"return {v}", tree.prefix, helpers=tree.helpers)
        sub.path(pc, 1, entry=True)
        out[pc] = "\n".join([f"def {tree.prefix}{pc}(data, wirelen, pkttype, vlan_tci{tree.args}):"]
                            + sub.lines) + "\n"
    return {f"{tree.prefix}{pc}": source for pc, source in out.items()}


def _matcher_namespace():
    # generated code runs in its own namespace, so short names cost nothing to lpd
    return {"_H": _UNPACK_H, "_W": _UNPACK_W, "_REJECTS": _REJECTS,
            "_skb_protocol": _skb_protocol}


def _compile_matcher(source, name, label):
    namespace = _matcher_namespace()
    exec(compile(source, f"<bpf {label}>", "exec"), namespace)
    fn = namespace[name]
    fn.source = source
    return fn


def make_matcher(prog):
    """Compile `prog` to a function f(data, wirelen, pkttype=0, vlan_tci=None) -> int
    returning exactly what bpf_interpret returns; f.source is its Python text."""
    return _compile_matcher(matcher_source(prog), "match", "matcher")


def _shared_loads(progs):
    """{(kind, size, k): local name} for absolute loads that two or more rules make."""
    seen = {}
    for prog in progs:
        keys = set()
        for code, _, _, k in prog:
            if code & BPF_MODE_MASK == BPF_ABS and _cls(code) == BPF_LD and k < SKF_AD_OFF \
                    and code & BPF_SIZE_MASK in _LOAD_SIZES:
                keys.add(("ld", _LOAD_SIZES[code & BPF_SIZE_MASK], k))
            elif code == BPF_LDX | BPF_B | BPF_MSH:
                keys.add(("msh", 1, k))
        msh = {key[2] for key in keys if key[0] == "msh"}
        for code, _, _, k in prog:              # [x + k] after 'ldxb 4*([m]&0xf)'
            if _cls(code) == BPF_LD and code & BPF_MODE_MASK == BPF_IND and code & BPF_SIZE_MASK in _LOAD_SIZES:
                keys.update(("ind", m, _LOAD_SIZES[code & BPF_SIZE_MASK], k) for m in msh)
        for key in keys:
            seen[key] = seen.get(key, 0) + 1
    return {key: _cache_name(key) for key, n in sorted(seen.items()) if n > 1}


def _cache_name(key):
    """c_h12: ldh [12]; c_x14: ldxb 4*([14]&0xf); c_h16x14: ldh [x + 16] with that X."""
    letter = "x" if key[0] == "msh" else {1: "b", 2: "h", 4: "w"}[key[-2]]
    return f"c_{letter}{key[-1]}" + (f"x{key[1]}" if key[0] == "ind" else "")


def _hit(i):
    """The statements counting the frame for rule i."""
    return f"rb[{i}] += wirelen; rp[{i}] += 1"


def _rule_leaf(i):
    """Leaves of a rule: count the frame for rule i when the value is non-zero."""
    def leaf(value):
        if value == "0":
            return "pass"
        return _hit(i) if value.isdigit() else f"if {value}: {_hit(i)}"
    return leaf


_COMMON_ETHERTYPES = (0x0800, 0x86DD, 0x0806, 0x8100)   # tried first, in this order
_MAX_DISPATCH = 6


def _dispatch_ethertypes(progs):
    """Ethertypes worth a branch of their own: compared right after 'ldh [12]' in 2+ rules."""
    count = {}
    for prog in progs:
        seen = set()
        for pc, insn in enumerate(prog):
            if insn[0] == BPF_LD | BPF_H | BPF_ABS and insn[3] == 12:
                q = pc + 1
                while 0 <= q < len(prog) and prog[q][0] == BPF_JMP | BPF_JEQ | BPF_K:
                    seen.add(prog[q][3])
                    q += 1 + prog[q][2]
        for k in seen:
            count[k] = count.get(k, 0) + 1
    rank = {k: i for i, k in enumerate(_COMMON_ETHERTYPES)}
    chosen = sorted((k for k, n in count.items() if n > 1),
                    key=lambda k: (rank.get(k, len(rank)), -count[k], k))
    return chosen[:_MAX_DISPATCH]


def _rule_analysis(prog):
    """What _rule_lines needs to know of prog whatever the ethertype branch, worked
    out once per rule: (_helper_points, _read_before_written, _state_args), or None
    when prog is empty or jumps backwards."""
    if not prog or _has_backward_jump(prog):
        return None
    return _helper_points(prog), _read_before_written(prog), _state_args(prog)


def _rule_lines(i, prog, cache, depth, ethertype, helpers, analysis):
    """Source lines evaluating rule i in place; helper functions go into `helpers`.
    analysis: _rule_analysis(prog)."""
    ind = "    " * depth
    if not prog:
        return [f"{ind}pass  # rule {i} is empty"]
    if analysis is None:
        helpers.setdefault(f"_r{i}", matcher_source(prog, f"_r{i}"))
        return [f"{ind}if _r{i}(data, wirelen, pkttype, vlan_tci):  # rule {i}",
                f"{ind}    {_hit(i)}"]
    join_points, unset, args = analysis
    tree = _MatchTree(prog, _rule_leaf(i), f"_r{i}_", cache=cache, helpers=set(join_points),
                      ethertype=ethertype, args=args)
    tree.path(0, depth + 1, entry=True)
    if not any(_hit(i) in line for line in tree.lines):
        return []                   # cannot match here: the ethertype decided it
    helpers.update(_helper_sources(tree))
    return [f"{ind}# rule {i}"] + _register_init(prog, ind, bool(tree.helpers), unset) + \
        [f"{ind}try:"] + tree.lines + [f"{ind}except _REJECTS:", f"{ind}    pass"]


# Rules per generated function. compile() of one function holding 10,000 rules
# peaked at 2 GB (syntax tree, code generator) that CPython then kept; compiled a
# slice at a time the peak is that of one slice, and its memory is reused for the
# next. Each function loops over the block's frames itself, so per frame a slice
# costs a tuple unpack and its ethertype load: a few per cent of its rules' time.
_RULES_PER_FUNCTION = 128


def _rules_function_source(progs, first, name):
    """One counting function for progs, rules first, first + 1, ... (see
    rules_counter_source)."""
    progs = [[tuple(int(v) for v in insn) for insn in prog] for prog in progs]
    analyses = [_rule_analysis(p) for p in progs]
    plain = [p for p, analysis in zip(progs, analyses) if p and analysis is not None]
    cache = _shared_loads(plain)
    ethertypes = _dispatch_ethertypes(plain)
    if ethertypes:
        cache[("ld", 2, 12)] = "c_h12"
    helpers = {}
    body = [f"def {name}(frames, rb, rp):",
            "    for data, wirelen, pkttype, vlan_tci in frames:"]
    if cache:
        body.append(f"        {' = '.join(sorted(cache.values()))} = None")
    if not ethertypes:
        for i, prog in enumerate(progs, first):
            body += _rule_lines(i, prog, cache, 2, None, helpers, analyses[i - first])
    else:
        body += ["        try:", "            c_h12 = _H(data, 12)[0]", "        except _REJECTS:",
                 "            pass"]
        branches = [(f"{'if' if n == 0 else 'elif'} c_h12 == {ethertype}:", ("eq", ethertype))
                    for n, ethertype in enumerate(ethertypes)]
        branches.append(("else:", ("ne", frozenset(ethertypes))))
        for head, known in branches:
            lines = [line for i, prog in enumerate(progs, first)
                     for line in _rule_lines(i, prog, cache, 3, known, helpers,
                                             analyses[i - first])]
            # Every rule may vanish from a branch (none can match its ethertype).
            body += [f"        {head}"] + (lines or ["            pass"])
    if len(body) == 2:
        body.append("        pass")
    return "\n".join(list(helpers.values()) + body) + "\n"


def _rules_counter_parts(progs, name):
    """The source of each function make_rules_counter compiles, in order: up to
    _RULES_PER_FUNCTION rules, `name` itself; beyond, one function per slice, then
    `name` calling them in turn."""
    if len(progs) <= _RULES_PER_FUNCTION:
        yield _rules_function_source(progs, 0, name)
        return
    parts = []
    for first in range(0, len(progs), _RULES_PER_FUNCTION):
        parts.append(f"_{name}_{first}")
        yield _rules_function_source(progs[first:first + _RULES_PER_FUNCTION], first, parts[-1])
    yield "\n".join([f"def {name}(frames, rb, rp):"] +
                     [f"    {part}(frames, rb, rp)" for part in parts]) + "\n"


def rules_counter_source(progs, name="count_rules"):
    """Python source of the function(s) make_rules_counter builds (for debugging).

    When two or more rules test the same ethertypes, the frame's ethertype is
    loaded once and each such ethertype gets a branch holding every rule
    specialised for it: rules that cannot match it vanish from that branch and
    the others skip their ethertype tests.
    """
    return "\n".join(_rules_counter_parts(list(progs), name))


class _RulesCount:
    """make_rules_counter's function, with .source made when asked: kept, the text
    would be the biggest part of a large rule set (~1 KB per rule)."""
    __slots__ = ("count", "progs")

    def __init__(self, count, progs):
        self.count, self.progs = count, progs

    def __call__(self, frames, rb, rp):
        self.count(frames, rb, rp)

    @property
    def source(self):
        return rules_counter_source(self.progs)


def make_rules_counter(progs):
    """One function f(frames, rb, rp) that, for each (data, wirelen, pkttype,
    vlan_tci) in frames and each program i of `progs` accepting it, adds wirelen
    to rb[i] and 1 to rp[i].

    Equivalent to running bpf_interpret per program, but absolute loads several
    rules make are done once per frame, and the loop over a block's frames and the
    counting are in the generated code: no call and no list per frame.
    f.source is its text, generated again when asked.
    """
    progs = tuple(progs)
    namespace = _matcher_namespace()
    for source in _rules_counter_parts(progs, "count_rules"):
        exec(compile(source, "<bpf rules>", "exec"), namespace)
    return _RulesCount(namespace["count_rules"], progs)


###############################################################################
# 9 Snapshots: what the capture thread publishes ##############################
###############################################################################
# provides: _add, AddressSnapshot, InterfaceSnapshot, _merge_keyed, Published, RemoteSnapshot,
#   RuleSnapshot, RX_BYTES, RX_PACKETS, TX_BYTES, TX_PACKETS
#
# Every stage turns its counters into an immutable snapshot; the capture thread
# (the only writer of any counter) publishes them together once per --interval,
# and on demand for a socket dump. Exporters read the latest publication and never
# take a lock the capture thread waits on. Snapshots of one kind merge by adding,
# which is what fanout workers will send to a parent.

TX_BYTES, TX_PACKETS, RX_BYTES, RX_PACKETS = range(4)


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b))


def _merge_keyed(rows_a, rows_b, key_len):
    """Rows of (key..., number...) summed per key; order: a's keys, then b's new ones."""
    merged = {}
    for row in rows_a + rows_b:
        key, values = row[:key_len], row[key_len:]
        merged[key] = _add(merged[key], values) if key in merged else values
    return tuple(key + values for key, values in merged.items())


class InterfaceSnapshot(NamedTuple):
    """Every frame read from the capture, whether or not it was attributed."""
    frames: int = 0
    totals: tuple = (0, 0, 0, 0)           # TX_BYTES .. RX_PACKETS
    malformed: tuple = ()                  # ((reason, count), ...) in MALFORMED_REASONS order
    drops: int = 0
    up: bool = False
    gso_frames: int = 0                    # super-frames counted as the frames the wire carried
    gso_unsplit: int = 0                   # super-frames whose headers did not allow that
    # (bytes, packets) of local addresses' traffic the eBPF engine's tables had no room
    # for: counted in the totals, not per address (a frame counts once per local end)
    unattributed: tuple = (0, 0)

    def merge(self, other):
        return InterfaceSnapshot(self.frames + other.frames, _add(self.totals, other.totals),
                                 _merge_keyed(self.malformed, other.malformed, 1),
                                 self.drops + other.drops, self.up or other.up,
                                 self.gso_frames + other.gso_frames,
                                 self.gso_unsplit + other.gso_unsplit,
                                 _add(self.unattributed, other.unattributed))

    def retired(self):
        """What stays of a dead worker's: its counts, not its interface up."""
        return self._replace(up=False)


class AddressSnapshot(NamedTuple):
    """Per local address: ((version, raw key), tx_b, tx_p, rx_b, rx_p, tx_bps, rx_bps)."""
    rows: tuple = ()
    evictions: int = 0                     # addresses dropped because the table was full

    def merge(self, other):
        return AddressSnapshot(_merge_keyed(self.rows, other.rows, 1),
                               self.evictions + other.evictions)

    def retired(self):
        """What stays of a dead worker's: its counters, not its rates."""
        return self._replace(rows=tuple(r[:1 + RX_PACKETS + 1] + (0, 0) for r in self.rows))


class RemoteSnapshot(NamedTuple):
    """Per tracked remote: ((version, raw key), tx_b, tx_p, rx_b, rx_p, error), where
    error bounds the bytes it carried before it was (last) tracked; and the exact
    totals of every frame between a local and a remote address, tracked or not."""
    rows: tuple = ()
    totals: tuple = (0, 0, 0, 0)           # TX_BYTES .. RX_PACKETS
    evictions: int = 0
    floor: int = 0                         # bytes an untracked remote carried at most

    def merge(self, other):
        return RemoteSnapshot(_merge_keyed(self.rows, other.rows, 1), _add(self.totals, other.totals),
                              self.evictions + other.evictions, self.floor + other.floor)


class RuleSnapshot(NamedTuple):
    """Per rule, in file order: (id, bytes, packets)."""
    rows: tuple = ()

    def merge(self, other):
        return RuleSnapshot(_merge_keyed(self.rows, other.rows, 1))


class Published:
    """The one object the capture thread shares: the latest snapshots by stage name.

    publish() is a reference swap; readers keep what latest() returned as long as
    they like. fresh() asks the capture thread for a publication made after the
    call and waits for it, bounded: the rule socket's dump must include every frame
    counted before the client connected.
    """

    def __init__(self):
        self._latest = {}
        self._done = threading.Event()
        self.requested = False
        self._wake = lambda: None

    def set_waker(self, wake):
        """How fresh() wakes the capture thread (its poll loop's pipe)."""
        self._wake = wake

    def publish(self, snapshots):
        self._latest = dict(snapshots)
        done, self._done = self._done, threading.Event()
        done.set()

    def latest(self):
        return self._latest

    def fresh(self, timeout):
        """A publication made after this call, or after `timeout` s the latest one."""
        done = self._done                   # taken before asking: the next publish sets it
        self.requested = True
        self._wake()
        done.wait(timeout)
        return self._latest


###############################################################################
# 10 Sources: where ring blocks come from #####################################
###############################################################################
# provides: PcapSource, Ring
#
# Every source hands TPACKET_V3 blocks to process(buf, base): the live ring, a pcap
# file laid out as blocks, or synthetic blocks built from the same FRAME layout the
# kernel writes. There is one decode path, whatever the source.

# pcap file header magic -> (byte order, timestamp divisor); read as little-endian.
PCAP_MAGICS = {
    0xA1B2C3D4: ("<", 1_000_000), 0xD4C3B2A1: (">", 1_000_000),
    0xA1B23C4D: ("<", 1_000_000_000), 0x4D3CB2A1: (">", 1_000_000_000),
}
PCAP_MAGIC_LEN, PCAP_FILE_HDR_LEN, PCAP_LINKTYPE_OFF, PCAP_RECORD_HDR_LEN = 4, 24, 20, 16
LINKTYPE_ETHERNET = 1
LINKTYPE_MASK = 0xFFFF                      # LT_LINKTYPE(): the upper bits are FCS flags

# pcapng (IETF draft-ietf-opsawg-pcapng): a file is blocks of (type, total length, body,
# total length again), in sections that each begin with a Section Header Block whose
# byte-order magic says how that section's numbers read. The SHB's type is the file's
# magic, a palindrome, so it reads the same in either order.
PCAPNG_MAGIC = PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_IDB, PCAPNG_PB, PCAPNG_SPB, PCAPNG_EPB = 1, 2, 3, 6     # PB: the obsolete Packet Block
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_BYTE_ORDERS = {struct.pack(o + "I", PCAPNG_BYTE_ORDER_MAGIC): o for o in "<>"}
PCAPNG_VERSION_MAJOR = 1
# Enough of every block to know its type, its length and (in an SHB) the byte order;
# no block is shorter (type, length, trailer).
PCAPNG_HEAD_LEN = 12
PCAPNG_BODY_OFF, PCAPNG_TRAILER_LEN = 8, 4
# Each block type's fixed fields, after type and length: the SHB's byte-order magic,
# version and section length; the IDB's link type, reserved and snap length; a packet
# block's interface, timestamp (high, low word), captured and original length (the PB
# has a 16-bit interface and a drop count); the SPB's original length.
PCAPNG_FIXED = {PCAPNG_SHB: "IHHq", PCAPNG_IDB: "HHI", PCAPNG_EPB: "IIIII", PCAPNG_PB: "HHIIII",
                PCAPNG_SPB: "I"}
PCAPNG_OPTION = "HH"                        # code, length; the value padded to 4 bytes
PCAPNG_ALIGNMENT = 4
# libpcap's bound on any block (INITIAL_MAX_BLOCKSIZE): a longer length field is
# corrupt, and no read of a hostile file allocates more than this.
PCAPNG_BLOCK_MAX = 16 * 1024 * 1024
PCAPNG_OPT_ENDOFOPT, PCAPNG_IF_TSRESOL, PCAPNG_IF_TSOFFSET = 0, 9, 14
PCAPNG_TSRESOL_BASE2 = 0x80                 # if_tsresol's high bit: a power of 2, not of 10
PCAPNG_TSRESOL_DEFAULT = 6                  # no if_tsresol: microseconds
PCAPNG_TSOFFSET = "q"                       # if_tsoffset's value: seconds to add, signed


class CaptureCut(Exception):
    """The file ends inside a record: a capture still being written, or cut short."""

    def __init__(self, what, offset, got, want, records):
        super().__init__(f"{what} at byte {offset} is cut short ({got} of {want} bytes); "
                         f"read the {records} packets before it")


def read_pcap(path):
    """Yield (timestamp, wirelen, data) for each packet of a classic pcap or pcapng file,
    Ethernet only. A file ending inside a record yields what came before and warns once,
    as tcpdump does ("truncated dump file"): it may well be still being written."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise os_failure(e, path) from None
    with f:
        head = f.read(PCAP_MAGIC_LEN)
        magic = struct.unpack("<I", head)[0] if len(head) == PCAP_MAGIC_LEN else None
        if magic == PCAPNG_MAGIC:
            packets = read_pcapng_packets(path, f, head)
        elif magic in PCAP_MAGICS or magic is None:
            packets = read_pcap_records(path, f, head)
        else:
            raise ConfigError(f"{path}: not a pcap file (magic 0x{magic:08x})")
        try:
            yield from packets
        except CaptureCut as e:
            log(LOG_WARNING, f"{path}: truncated dump file: {e}")


def read_pcap_records(path, f, head):
    """read_pcap() of a classic pcap file, whose first bytes `head` are read already."""
    head += f.read(PCAP_FILE_HDR_LEN - len(head))
    if len(head) < PCAP_FILE_HDR_LEN:
        raise ConfigError(f"{path}: not a pcap file (only {len(head)} header bytes)")
    order, div = PCAP_MAGICS[struct.unpack_from("<I", head)[0]]
    linktype = struct.unpack_from(order + "I", head, PCAP_LINKTYPE_OFF)[0] & LINKTYPE_MASK
    if linktype != LINKTYPE_ETHERNET:
        raise ConfigError(f"{path}: link type {linktype} is not Ethernet (DLT_EN10MB)")
    rec = struct.Struct(order + "IIII")
    off, n = PCAP_FILE_HDR_LEN, 0
    while True:
        h = f.read(PCAP_RECORD_HDR_LEN)
        if not h:
            return
        if len(h) < PCAP_RECORD_HDR_LEN:
            raise CaptureCut(f"record {n + 1}", off, len(h), PCAP_RECORD_HDR_LEN, n)
        sec, frac, caplen, wirelen = rec.unpack(h)
        if caplen > SNAPLEN_FULL:           # before reading: the length may be any 32 bits
            raise ConfigError(f"{path}: byte {off}: record {n + 1}: capture length {caplen} "
                              f"is corrupt (more than {SNAPLEN_FULL})")
        data = f.read(caplen)
        if len(data) < caplen:
            raise CaptureCut(f"record {n + 1}", off, PCAP_RECORD_HDR_LEN + len(data),
                             PCAP_RECORD_HDR_LEN + caplen, n)
        off += PCAP_RECORD_HDR_LEN + caplen
        n += 1
        yield sec + frac / div, wirelen, data


def pcapng_options(block, pos, end, order):
    """{code: value} of the options in block[pos:end]; ValueError if one overruns it."""
    opt = struct.Struct(order + PCAPNG_OPTION)
    options = {}
    while pos + opt.size <= end:
        code, length = opt.unpack_from(block, pos)
        if code == PCAPNG_OPT_ENDOFOPT:
            break
        pos += opt.size
        if pos + length > end:
            raise ValueError(f"option {code} of {length} bytes overruns its block")
        options[code] = block[pos:pos + length]
        pos += _align(length, PCAPNG_ALIGNMENT)
    return options


def pcapng_clock(options, order):
    """(units per second, seconds to add) of an interface's timestamps, from its options."""
    shift = struct.Struct(order + PCAPNG_TSOFFSET)
    resol = options.get(PCAPNG_IF_TSRESOL, bytes([PCAPNG_TSRESOL_DEFAULT]))
    offset = options.get(PCAPNG_IF_TSOFFSET, bytes(shift.size))
    if len(resol) != 1 or len(offset) != shift.size:
        raise ValueError("if_tsresol or if_tsoffset of the wrong length")
    exp = resol[0] & ~PCAPNG_TSRESOL_BASE2
    units = 2 ** exp if resol[0] & PCAPNG_TSRESOL_BASE2 else 10 ** exp
    return units, shift.unpack(offset)[0]


def pcapng_length_error(blen, least):
    """Why a block's length field is corrupt, or None."""
    if blen % PCAPNG_ALIGNMENT:
        return f"length {blen} is not a multiple of {PCAPNG_ALIGNMENT}"
    if blen < least:
        return f"length {blen} is shorter than its header ({least})"
    if blen > PCAPNG_BLOCK_MAX:
        return f"length {blen} is more than {PCAPNG_BLOCK_MAX}"
    return None


def pcapng_cut(path, off, got, want, packets):
    """What to raise when a pcapng file ends `got` bytes into a block of `want` at `off`."""
    if not off:             # as a classic file's header: without its SHB it is no capture
        return ConfigError(f"{path}: section header cut short ({got} of {want} bytes)")
    return CaptureCut("block", off, got, want, packets)


def read_pcapng_packets(path, f, head):
    """read_pcap() of a pcapng file, whose first bytes `head` (the SHB's type) are read.

    Packets are Enhanced, Simple and obsolete Packet Blocks; Interface Description
    Blocks give their interfaces' clocks and snap lengths; any other block is skipped.
    An SPB has no timestamp: it takes the one before it, so the packet clock that
    paces intervals and connection timeouts never jumps back to 1970.
    """
    order, fields, ifaces, off, n, ts = "<", {}, [], 0, 0, 0.0
    head += f.read(PCAPNG_HEAD_LEN - len(head))
    while head:
        if len(head) < PCAPNG_HEAD_LEN:
            raise pcapng_cut(path, off, len(head), PCAPNG_HEAD_LEN, n)
        btype = struct.unpack_from(order + "I", head)[0]
        if btype == PCAPNG_SHB:
            order = PCAPNG_BYTE_ORDERS.get(head[PCAPNG_BODY_OFF:])
            if order is None:
                raise ConfigError(f"{path}: byte {off}: not pcapng (byte-order magic "
                                  f"0x{head[PCAPNG_BODY_OFF:].hex()})")
            fields = {t: struct.Struct(order + v) for t, v in PCAPNG_FIXED.items()}
            ifaces = []
        fixed = PCAPNG_BODY_OFF + (fields[btype].size if btype in fields else 0)
        blen = struct.unpack_from(order + "I", head, U32.size)[0]
        error = pcapng_length_error(blen, fixed + PCAPNG_TRAILER_LEN)
        if error:
            raise ConfigError(f"{path}: byte {off}: block of type 0x{btype:x}: {error}")
        block = head + f.read(blen - PCAPNG_HEAD_LEN)
        if len(block) < blen:
            raise pcapng_cut(path, off, len(block), blen, n)
        end = blen - PCAPNG_TRAILER_LEN
        if block[end:] != block[U32.size:PCAPNG_BODY_OFF]:
            raise ConfigError(f"{path}: byte {off}: block of type 0x{btype:x}: its two "
                              "lengths differ")
        data = None
        if btype == PCAPNG_EPB or btype == PCAPNG_PB:
            # A PB has its drop count between interface and timestamp.
            iface, *_, hi, lo, caplen, wirelen = fields[btype].unpack_from(block, PCAPNG_BODY_OFF)
            if iface >= len(ifaces):
                raise ConfigError(f"{path}: byte {off}: a packet of interface {iface}, but "
                                  f"the section describes {len(ifaces)}")
            if caplen > min(SNAPLEN_FULL, end - fixed):
                raise ConfigError(f"{path}: byte {off}: capture length {caplen} is corrupt "
                                  f"(more than {min(SNAPLEN_FULL, end - fixed)})")
            units, shift, _ = ifaces[iface]
            sec, frac = divmod(hi << 32 | lo, units)
            ts = sec + shift + frac / units      # as read_pcap_records: the same float
            data = block[fixed:fixed + caplen]
        elif btype == PCAPNG_SPB:
            if not ifaces:
                raise ConfigError(f"{path}: byte {off}: a simple packet block before any "
                                  "interface description")
            wirelen = fields[btype].unpack_from(block, PCAPNG_BODY_OFF)[0]
            snaplen = ifaces[0][2]          # an SPB's interface is the section's first
            caplen = min(wirelen, end - fixed, snaplen or wirelen)
            if caplen > SNAPLEN_FULL:
                raise ConfigError(f"{path}: byte {off}: capture length {caplen} is corrupt "
                                  f"(more than {SNAPLEN_FULL})")
            data = block[fixed:fixed + caplen]
        elif btype == PCAPNG_SHB:
            major, minor = fields[btype].unpack_from(block, PCAPNG_BODY_OFF)[1:3]
            if major != PCAPNG_VERSION_MAJOR:
                raise ConfigError(f"{path}: byte {off}: pcapng version {major}.{minor}, "
                                  f"not {PCAPNG_VERSION_MAJOR}.x")
        elif btype == PCAPNG_IDB:
            linktype, _, snaplen = fields[btype].unpack_from(block, PCAPNG_BODY_OFF)
            if linktype != LINKTYPE_ETHERNET:
                raise ConfigError(f"{path}: interface {len(ifaces)} (byte {off}): link type "
                                  f"{linktype} is not Ethernet (DLT_EN10MB)")
            try:
                clock = pcapng_clock(pcapng_options(block, fixed, end, order), order)
            except ValueError as e:
                raise ConfigError(f"{path}: byte {off}: interface {len(ifaces)}: {e}") from None
            ifaces.append(clock + (snaplen,))       # (units per second, shift, snaplen)
        off += blen
        if data is not None:
            n += 1
            yield ts, wirelen, data
        head = f.read(PCAPNG_HEAD_LEN)


class SynthFrame(NamedTuple):
    """One frame as the kernel hands it over: `data` as captured (a VLAN tag the NIC
    stripped is not in it but in vlan_tci), `wirelen` as tp_len reports it."""
    data: bytes
    wirelen: int
    pkttype: int = PACKET_HOST
    vlan_tci: Optional[int] = None           # set: the tag was stripped (TP_STATUS_VLAN_VALID)
    vlan_tpid: int = ETH_P_8021Q
    ts: float = 0.0
    gso: Optional[tuple] = None              # virtio_net_hdr's (gso_type, gso_size, hdr_len)


def _frame_fields(f, next_offset, mac):
    """FRAME's fields for one SynthFrame, as tpacket_rcv() fills them."""
    status = TP_STATUS_USER
    if f.vlan_tci is not None:
        status |= TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID
    sec = int(f.ts)
    proto = U16BE.unpack_from(f.data, ETH_TYPE_OFF)[0] if len(f.data) >= ETH_HLEN else 0
    return (next_offset, sec, int((f.ts - sec) * 1e9), len(f.data), f.wirelen, status,
            mac, mac + ETH_HLEN, 0, f.vlan_tci or 0,
            f.vlan_tpid if f.vlan_tci is not None else 0,
            socket.AF_PACKET, socket.htons(proto), 0, ARPHRD_ETHER, f.pkttype, ETH_ALEN,
            bytes(f.data[ETH_SRC]).ljust(SLL_ADDR_LEN, b"\0"))


def frames_to_blocks(frames, block_size=RING_BLOCK_BYTES, vnet=False):
    """Lay frames ((data, wirelen) pairs or SynthFrames) out exactly as a TPACKET_V3 ring
    does (tpacket_rcv, prb_close_block): every header field set, data at the kernel's
    offset, frames 8-aligned, the last one's next_offset 0; with `vnet`, as on a socket
    with PACKET_VNET_HDR, a virtio_net_hdr before each frame. Yields a bytearray per block.

    Offline replay, the tests and the benchmark push these through the same decode
    the live ring feeds, so there is one decode and accounting path.
    """
    mac = FRAME_NET_OFF + (VIRTIO_NET_HDR.size if vnet else 0) - ETH_HLEN
    block, seq, last_frame = bytearray(block_size), 1, None
    frames_in, pos, first, last = 0, BLOCK_FIRST_FRAME, 0.0, 0.0
    for f in frames:
        if type(f) is not SynthFrame:
            f = SynthFrame(*f)
        need = _align(mac + len(f.data), V3_ALIGNMENT)
        if need > block_size - BLOCK_FIRST_FRAME:
            raise ValueError(f"frame of {len(f.data)} bytes does not fit a {block_size}-byte block")
        if pos + need > block_size:
            yield _close_block(block, seq, frames_in, pos, first, last, last_frame)
            block, seq, frames_in, pos = bytearray(block_size), seq + 1, 0, BLOCK_FIRST_FRAME
        if not frames_in:
            first = f.ts
        last, last_frame = f.ts, pos
        FRAME.pack_into(block, pos, *_frame_fields(f, need, mac))
        if vnet:
            gso_type, gso_size, hdr_len = f.gso or (VIRTIO_NET_HDR_GSO_NONE, 0, 0)
            VIRTIO_NET_HDR.pack_into(block, pos + mac - VIRTIO_NET_HDR.size,
                                     VIRTIO_NET_HDR_F_NEEDS_CSUM if f.gso else 0,
                                     gso_type, hdr_len, gso_size, 0, 0)
        block[pos + mac:pos + mac + len(f.data)] = f.data
        pos += need
        frames_in += 1
    if frames_in:
        yield _close_block(block, seq, frames_in, pos, first, last, last_frame)


def _close_block(block, seq, count, length, first, last, last_frame):
    """The block descriptor, as the kernel writes it when it retires a block."""
    U32.pack_into(block, last_frame, 0)             # tp_next_offset of the last frame
    fs, ls = int(first), int(last)
    BLOCK.pack_into(block, 0, TPACKET_V3, 0, TP_STATUS_USER, count, BLOCK_FIRST_FRAME, length, seq,
                    fs, int((first - fs) * 1e9), ls, int((last - ls) * 1e9))
    return block


class PcapSource:
    """A pcap or pcapng file as ring blocks (offline replay). With `interval`, a block
    never spans a multiple of it on the file's clock (counted from the first frame),
    as a live ring's blocks retire before each tick: a replay's stages tick on the
    same grid a daemon's do."""

    def __init__(self, path, interval=None):
        self.path, self.interval = path, interval

    def drain(self, process):
        """process(view, base) for every block of the file; returns how many."""
        records = (SynthFrame(data, wirelen, ts=ts) for ts, wirelen, data in read_pcap(self.path))
        if self.interval is None:
            chunks = (records,)
        else:
            start = []

            def period(f):
                if not start:
                    start.append(f.ts)
                return math.floor((f.ts - start[0]) / self.interval)
            chunks = (chunk for _, chunk in itertools.groupby(records, period))
        blocks = 0
        for chunk in chunks:
            for block in frames_to_blocks(chunk):
                process(memoryview(block), 0)
                blocks += 1
        return blocks


def ring_geometry(ring_bytes):
    """(block_size, block_nr) for a ring of about ring_bytes."""
    block = RING_BLOCK_BYTES
    while block > mmap.PAGESIZE and ring_bytes // block < 4:
        block //= 2
    return block, max(ring_bytes // block, 2)


class Ring:
    """An AF_PACKET socket with a mapped TPACKET_V3 receive ring on one interface."""

    def __init__(self, ifname, ring_bytes, prog, promisc=False, fanout=None, ebpf=None):
        self.ifname = ifname
        self.ifindex = interface_index(ifname)
        if self.ifindex is None:
            raise ConfigError(f"{ifname}: no such interface")
        try:
            # Protocol 0: nothing is queued until bind(), after the filter is attached,
            # so no unfiltered frame ever reaches the ring.
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        except PermissionError:
            raise NoPermission(f"capturing on {ifname} needs CAP_NET_RAW (run as root "
                               "or grant the capability)") from None
        try:
            self.attach(prog)
            self.vnet = self._enable_vnet_header()
            self.mtu = interface_mtu(ifname)
            if ebpf is not None:         # --engine ebpf: its program replaces `prog`, unbound yet
                self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF,
                                     struct.pack("=i", ebpf(self.vnet, self.mtu)))
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            self.block_size, self.block_nr = ring_geometry(ring_bytes)
            self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, TPACKET_REQ3.pack(
                self.block_size, self.block_nr, TPACKET_FRAME_SIZE,
                self.block_size // TPACKET_FRAME_SIZE * self.block_nr, RING_RETIRE_MS, 0, 0))
            self.map = mmap.mmap(self.sock.fileno(), self.block_size * self.block_nr,
                                 mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.view = memoryview(self.map)
            self.sock.bind((ifname, ETH_P_ALL))
            if promisc:
                self.sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MREQ.pack(
                    self.ifindex, PACKET_MR_PROMISC, 0, b""))
            if fanout is not None:       # (group id, mode and flags): one ring of several
                self.sock.setsockopt(SOL_PACKET, PACKET_FANOUT, U32.pack(fanout))
        except OSError as e:
            if hasattr(self, "view"):
                self.view.release()
                self.map.close()
            self.sock.close()
            if e.errno == errno.ENODEV:
                raise ConfigError(f"{ifname}: no such interface") from None
            if e.errno == errno.ENOMEM:
                size = f"{ring_bytes >> 20} MiB" if ring_bytes >= 1 << 20 else f"{ring_bytes >> 10} KiB"
                raise ConfigError(f"{ifname}: cannot set up a capture ring of {size}: {e.strerror} "
                                  "(a smaller -b may fit)") from None
            raise ConfigError(f"{ifname}: cannot set up the capture ring: {e.strerror}") from None
        self.next_block = 0
        self.drops = 0
        self.zeros = memoryview(bytes(self.block_size))

    def fileno(self):
        return self.sock.fileno()

    def _enable_vnet_header(self):
        """Ask for a virtio_net_hdr before each frame (before the ring exists: the kernel
        refuses it after): it tells how many frames a GSO/GRO super-frame stands for."""
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            return True
        except OSError:
            return False                 # an old kernel: super-frames count as one

    def attach(self, prog):
        """Replace the kernel filter; a single SO_ATTACH_FILTER swaps it atomically."""
        # sock_fprog holds a pointer: the instructions need an address, which only a
        # ctypes-visible buffer has; the kernel copies them before setsockopt returns.
        insns = bytearray(pack_filter(prog))
        addr = ctypes.addressof(ctypes.c_char.from_buffer(insns))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, SOCK_FPROG.pack(len(prog), addr))

    def _status(self, i):
        return U32.unpack_from(self.view, i * self.block_size + BLOCK_STATUS_OFF)[0]

    def ready(self):
        """Whether the next block is the kernel's no more: drain() would take it."""
        return bool(self._status(self.next_block) & TP_STATUS_USER)

    def queued_blocks(self):
        """Blocks that may hold frames the kernel has already filtered: those handed
        to userspace and not yet drained, and the one the kernel is filling."""
        n = 0
        while n < self.block_nr and self._status((self.next_block + n) % self.block_nr) & TP_STATUS_USER:
            n += 1
        return min(n + 1, self.block_nr)

    def drain(self, process):
        """Hand every block the kernel has released to process(view, base); return how many."""
        view, size, nr = self.view, self.block_size, self.block_nr
        done = 0
        while done < nr:
            base = self.next_block * size
            if not U32.unpack_from(view, base + BLOCK_STATUS_OFF)[0] & TP_STATUS_USER:
                break
            process(view, base)
            if self.vnet:
                # With PACKET_VNET_HDR the kernel may reserve a frame's slot and then
                # drop the frame (a GSO type virtio_net_hdr cannot describe) leaving the
                # slot's header unwritten: zeroed here, it reads as tp_mac 0 next time,
                # never as a frame of an earlier pass.
                used = U32.unpack_from(view, base + BLOCK_LEN_OFF)[0]
                view[base + BLOCK_FIRST_FRAME:base + used] = self.zeros[:used - BLOCK_FIRST_FRAME]
            U32.pack_into(view, base + BLOCK_STATUS_OFF, TP_STATUS_KERNEL)
            self.next_block = (self.next_block + 1) % nr
            done += 1
        return done

    def read_stats(self):
        """Accumulate the kernel's counters (reading them resets them)."""
        try:
            _, drops, _ = TPACKET_STATS_V3.unpack(
                self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS_V3.size))
        except OSError:
            return
        self.drops += drops

    def socket_error(self):
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

    def close(self):
        self.read_stats()
        self.view.release()
        self.map.close()
        self.sock.close()


###############################################################################
# 11 Decode: one flat loop per block ##########################################
###############################################################################
# provides: Batch, Consumer, Decoder, ETHERTYPE_IPV4_BYTES, frames_in_order, ICMP_COUNTERPARTS,
#   IP_FRAGMENT, ip_tos_vlan, IPV4_FRAG_MASK, IPV4_MORE_FRAGMENTS, IPV6_EXT_LEN, L4_PORTS,
#   LOCALITY_CACHE_MAX, not_on_ports, parse_l4, PLAIN_IPV4_PORTS, WANT_*
#
# Decoder.process_block walks a block once. It counts the interface totals and the
# local addresses inline (measured: a call or a tuple per frame for them would cost
# more than the counting), and fills only the per-frame lists some consumer asked
# for in its `wants`; a consumer that is not there costs nothing per frame. Then
# every consumer gets the batch, once per block.

WANT_RAW = "raw"    # (data, wirelen, pkttype, vlan_tci or None): frame bytes, tag re-inserted
# (remote key, bytes, frames) of each IP frame between a local and a remote address,
# in remote_tx (local -> remote) or remote_rx (remote -> local).
WANT_REMOTE = "remote"
# With WANT_RAW: `ts`, the kernel's timestamp of each raw frame (a float), in step with it.
WANT_TS = "ts"


class Batch:
    """What one block decoded into. Its lists hold views of the ring: a consumer
    copies whatever it keeps beyond consume(). `gso` holds the WANT_RAW tuples of
    super-frames, with the bytes and frames the wire carried for each, its timestamp and
    its place among the raw frames (how many came before it).
    `time` is the block's last frame's timestamp: the packet clock."""
    __slots__ = ("raw", "ts", "gso", "remote_tx", "remote_rx", "frames", "time")

    def __init__(self):
        self.raw, self.ts, self.gso, self.remote_tx, self.remote_rx = [], [], [], [], []
        self.frames, self.time = 0, 0.0


def frames_in_order(batch):
    """(data, ts, wire bytes, frames, link header length) of every frame of a batch with
    timestamps (WANT_TS), in capture order: super-frames go back among the plain ones
    where they came (a FIN must not overtake the data before it)."""
    supers = iter(batch.gso)
    nxt = next(supers, None)
    for i, ((data, wirelen, _, tci), ts) in enumerate(zip(batch.raw, batch.ts)):
        while nxt is not None and nxt[7] <= i:
            yield nxt[0], nxt[6], nxt[4], nxt[5], ETH_HLEN + (VLAN_TAG_LEN if nxt[3] is not None else 0)
            nxt = next(supers, None)
        yield data, ts, wirelen, 1, ETH_HLEN + (VLAN_TAG_LEN if tci is not None else 0)
    while nxt is not None:
        yield nxt[0], nxt[6], nxt[4], nxt[5], ETH_HLEN + (VLAN_TAG_LEN if nxt[3] is not None else 0)
        nxt = next(supers, None)


# GSO type -> (IP versions it can carry, transport protocol, whether each frame on the
# wire repeats the transport header: UFO's are IP fragments, which repeat only IP's).
GSO_KINDS = {
    VIRTIO_NET_HDR_GSO_TCPV4: ((4,), IPPROTO_TCP, True),
    VIRTIO_NET_HDR_GSO_TCPV6: ((6,), IPPROTO_TCP, True),
    VIRTIO_NET_HDR_GSO_UDP_L4: ((4, 6), IPPROTO_UDP, True),
    VIRTIO_NET_HDR_GSO_UDP: ((4, 6), IPPROTO_UDP, False),
}


def gso_split(data, wirelen, tag_len, gso_type, gso_size):
    """What a GSO/GRO super-frame is on the wire: (bytes, frames, src key, dst key),
    or None when its headers do not make a consistent one (then it counts as one).

    Each frame on the wire repeats the link, IP and (but for UFO) transport headers
    and carries gso_size bytes of the payload; `tag_len` is a VLAN tag the kernel
    stripped, which every one of them carries too. lpd reads the header lengths
    from the frame itself: virtio_net_hdr's hdr_len is the skb's linear part, which
    need not end where the headers do.
    """
    kind = GSO_KINDS.get(gso_type & VIRTIO_NET_HDR_GSO_TYPE_MASK)
    if kind is None or gso_size <= 0 or len(data) < ETH_HLEN:
        return None
    versions, proto, repeats_l4 = kind
    q, et = ETH_HLEN, U16BE.unpack_from(data, ETH_TYPE_OFF)[0]
    while et in VLAN_TPIDS and q + VLAN_TAG_LEN <= len(data):
        et = U16BE.unpack_from(data, q + 2)[0]
        q += VLAN_TAG_LEN
    wire_ip = wirelen - tag_len - q            # what the frame holds from the IP header on
    # The hot loop's checks: a header that fails them is malformed, not a super-frame.
    if et == ETHERTYPE_IPV4 and 4 in versions and len(data) >= q + 20:
        vihl, tlen, src, dst = IPV4_HDR.unpack_from(data, q)
        l3, got = (vihl & 15) * 4, data[q + IPV4_PROTO_OFF]
        if vihl >> 4 != 4 or l3 < 20 or not l3 <= tlen <= wire_ip:
            return None
    elif et == ETHERTYPE_IPV6 and 6 in versions and len(data) >= q + IPV6_HDR_LEN:
        vtc, plen, src, dst = IPV6_HDR.unpack_from(data, q)
        l3, got = IPV6_HDR_LEN, data[q + IPV6_NEXT_OFF]
        if vtc >> 4 != 6 or IPV6_HDR_LEN + plen > wire_ip:
            return None
    else:
        return None
    if got != proto:
        return None                                  # extension headers, tunnels: not split
    l4 = 0
    if repeats_l4:
        if proto == IPPROTO_UDP:
            l4 = UDP_HDR_LEN
        elif len(data) > q + l3 + TCP_DOFF_OFF:
            l4 = (data[q + l3 + TCP_DOFF_OFF] >> 4) * 4
            if l4 < TCP_MIN_HDR_LEN:
                return None                          # a corrupt data offset
        if not l4:
            return None                              # cut before the TCP header
    hdr = q + l3 + l4 + tag_len
    payload = wirelen - hdr
    segments = -(-payload // gso_size)
    if payload <= 0 or segments > GSO_MAX_SEGS:
        return None
    return wirelen + (segments - 1) * hdr, segments, src, dst


class Consumer:
    """A stage fed by the decoder. The capture thread is the only caller of every
    method but snapshot()'s result, which is immutable. Its name keys its snapshot in a
    publication, its log and a worker's messages (STAGES lists the stages)."""
    name = ""
    snapshot_type = None           # the NamedTuple snapshot() returns
    wants = frozenset()            # WANT_* lists this stage reads
    # Its last tick() ran out of budget with work still due: the capture loop gives it
    # another pass as soon as the ring is drained, not one tick later (a backlog of
    # 10^5 timeouts would otherwise take 25 ticks at 4096 a pass).
    behind = False

    def snaplen(self):
        """Leading bytes of each frame this stage reads; the kernel copies the maximum."""
        return 0

    # Whether it reads whole, whatever snaplen(), every TCP segment (any port) whose
    # payload begins a TLS handshake record (whole_frames_program, CopyPlan)
    whole_handshakes = False

    def whole_ports(self):
        """(TCP ports, UDP ports) whose frames this stage reads whole, whatever snaplen()."""
        return (), ()

    def consume(self, batch):
        """One block's frames."""

    def tick(self, now):
        """Close an interval: rates, expiry (bounded work)."""

    def snapshot(self):
        raise NotImplementedError

    def finish(self):
        """The end of capture: what is still open ends (as in Zeek). True when the
        snapshot may have changed, so the daemon publishes once more."""
        return False


class Decoder:
    """Interface totals, malformed frames and the local-address counters, per block."""

    def __init__(self, local, consumers=(), vnet=False, mtu=None, counted=False):
        """counted: the kernel has counted every frame (--engine ebpf): addresses and
        remotes included, so the frames copied for the stages are only read
        (LocalityOnly neither admits nor counts, and no remote is handed on)."""
        self.local, self.counted = local, counted
        self.attribution = LocalityOnly(local) if counted else local
        self.set_link(vnet, mtu)
        self.frames = 0
        self.totals = [0, 0, 0, 0]                   # TX_BYTES .. RX_PACKETS
        self.malformed = dict.fromkeys(MALFORMED_REASONS, 0)
        self.gso_frames = self.gso_unsplit = 0
        self.time = 0.0                              # the packet clock: the last block's last frame
        self.set_consumers(consumers)

    def set_link(self, vnet, mtu=None):
        """What the capture socket hands over: whether a virtio_net_hdr precedes each
        frame (PACKET_VNET_HDR), and the link's MTU. Reading that header costs the hot
        loop several times a length test (measured: +6 % per frame against +1 %), so
        it is read only for a frame longer than the link carries (MTU, Ethernet header,
        two VLAN tags): only a super-frame can be. One shorter than that (segments
        under half the MTU, two or three of them) counts as one frame."""
        self.vnet = vnet
        if not vnet:
            self.gso_above = GSO_NEVER
        elif mtu is None:
            self.gso_above = 0                                     # every frame
        else:
            self.gso_above = mtu + ETH_HLEN + 2 * VLAN_TAG_LEN

    def set_consumers(self, consumers):
        """Between blocks only (the capture thread swaps stages at a block boundary)."""
        self.consumers = tuple(consumers)
        wants = frozenset().union(*(c.wants for c in self.consumers))
        self.want_raw = WANT_RAW in wants or WANT_TS in wants
        self.want_ts = WANT_TS in wants
        # counted: the kernel counts the remotes too (KernelAccounting._drain_remotes)
        self.want_remote = WANT_REMOTE in wants and not self.counted

    def snaplen(self):
        return max([SNAPLEN_ACCOUNTING] + [c.snaplen() for c in self.consumers])

    def snapshot(self, drops=0, up=True):
        return InterfaceSnapshot(self.frames, tuple(self.totals), tuple(self.malformed.items()),
                                 drops, up, self.gso_frames, self.gso_unsplit)

    def super_frame(self, buf, p, caplen, wl, pkttype, status, tci, tpid, batch, frame):
        """A GSO/GRO super-frame (the hot loop's slow path): count the frames the wire
        carried, for the interface, the local addresses and the rules. False when it
        cannot be split: the hot loop then counts it as one frame."""
        _, gso_type, _, gso_size, _, _ = VIRTIO_NET_HDR.unpack_from(buf, p - VIRTIO_NET_HDR.size)
        sec, nsec = FRAME_TS.unpack_from(buf, frame + FRAME_TS_OFF)
        ts = sec + nsec * 1e-9
        tagged = status & TP_STATUS_VLAN_VALID or tci
        data = buf[p:p + caplen]                 # a view: kept only until consume() returns
        split = gso_split(data, wl, VLAN_TAG_LEN if tagged else 0, gso_type, gso_size)
        if split is None:
            self.gso_unsplit += 1
            return False
        nbytes, segments, src, dst = split
        self.gso_frames += 1
        direction = TX_BYTES if pkttype == PACKET_OUTGOING else RX_BYTES
        self.totals[direction] += nbytes
        self.totals[direction + 1] += segments
        local = self.attribution
        ends = []
        for key, at in ((src, TX_BYTES), (dst, RX_BYTES)):
            cache = local.cache4 if type(key) is int else local.cache6
            e = cache.get(key)
            if e is None:
                e = local.locate(key)
            if e:
                e[at] += nbytes
                e[at + 1] += segments
            ends.append(bool(e))
        if self.want_remote and ends[0] != ends[1]:
            (batch.remote_tx.append((dst, nbytes, segments)) if ends[0]
             else batch.remote_rx.append((src, nbytes, segments)))
        if self.want_raw:
            if tagged:
                tag = VLAN_TAG.pack(tpid if status & TP_STATUS_VLAN_TPID_VALID else ETH_P_8021Q, tci)
                data = b"".join((data[:ETH_TYPE_OFF], tag, data[ETH_TYPE_OFF:]))
            # len(batch.raw): where it came among the plain frames, for stages that need order
            batch.gso.append((data, wl, pkttype, tci if tagged else None, nbytes, segments, ts,
                              len(batch.raw)))
        return True

    def process_block(self, buf, base):
        """Count every frame of one TPACKET_V3 block. The hot loop: deliberately flat.

        A byte is the frame's length as libpcap reports it: a VLAN tag the kernel
        stripped into the frame header counts its 4 bytes back in, and rules see the
        tag re-inserted, exactly like pcap_offline_filter on libpcap's capture.
        Constants and counters are locals: each global or attribute lookup here
        costs more than the arithmetic it guards.
        """
        frame_hdr = FRAME_HDR.unpack_from
        eth_ip4 = ETH_IPV4_HDR.unpack_from
        u16 = U16BE.unpack_from
        ip4 = IPV4_HDR.unpack_from
        ip6 = IPV6_HDR.unpack_from
        malformed, tpids, tag = self.malformed, VLAN_TPIDS, VLAN_TAG.pack
        vlan_valid, tpid_valid, outgoing = TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID, PACKET_OUTGOING
        et_ip4, et_ip6, plain4, dot1q = ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPV4_VIHL_PLAIN, ETH_P_8021Q
        gso_above = self.gso_above
        gso_back, super_frame = VIRTIO_GSO_TYPE_BACK, self.super_frame
        local = self.attribution
        get4, get6, locate = local.cache4.get, local.cache6.get, local.locate
        batch = Batch()
        want_raw, raw = self.want_raw, batch.raw.append
        want_remote, remote_tx, remote_rx = self.want_remote, batch.remote_tx.append, batch.remote_rx.append
        want_ts, stamp, frame_ts, ts_off = self.want_ts, batch.ts.append, FRAME_TS.unpack_from, FRAME_TS_OFF
        (_, _, _, count, first, _, _, _, _, last_sec, last_nsec) = BLOCK.unpack_from(buf, base)
        pos = base + first
        tx_b = tx_p = rx_b = rx_p = 0
        for _ in range(count):
            nxt, caplen, flen, status, mac, tci, tpid, pkttype = frame_hdr(buf, pos)
            p = pos + mac
            pos += nxt
            if not mac:
                continue          # a slot the kernel reserved and dropped (see Ring.drain)
            tagged = status & vlan_valid or tci
            wl = flen + 4 if tagged else flen
            # virtio_net_hdr.gso_type: a super-frame, counted as the frames the wire
            # carried by the slow path; one it cannot split goes on as one frame.
            if flen > gso_above and buf[p - gso_back] and \
                    super_frame(buf, p, caplen, wl, pkttype, status, tci, tpid, batch, p - mac):
                continue
            if pkttype == outgoing:
                tx_b += wl
                tx_p += 1
            else:
                rx_b += wl
                rx_p += 1
            if want_raw:
                if tagged:
                    raw((b"".join((buf[p:p + 12], tag(tpid if status & tpid_valid else dot1q, tci),
                                   buf[p + 12:p + caplen])), wl, pkttype, tci))
                else:
                    raw((buf[p:p + caplen], wl, pkttype, None))
                if want_ts:
                    sec, nsec = frame_ts(buf, p - mac + ts_off)
                    stamp(sec + nsec * 1e-9)
            # The common frame, untagged IPv4 without options, is one unpack and
            # one test; everything else takes the general path below, which
            # either ends the frame (malformed, not IP) or leaves a valid header's
            # addresses and its family's locality cache for the attribution.
            if caplen >= 34:
                et, vihl, tlen, src, dst = eth_ip4(buf, p)
                general = et != et_ip4 or vihl != plain4 or tlen < 20 or tlen + 14 > flen
            elif caplen >= 14:
                et, general = u16(buf, p + 12)[0], True
            else:
                malformed["truncated"] += 1
                continue
            if general:
                end = p + caplen
                q = p + 14
                while et in tpids:
                    if q + 4 > end:
                        et = -1
                        break
                    et = u16(buf, q + 2)[0]
                    q += 4
                if et == et_ip4:
                    if q + 20 > end:
                        malformed["truncated"] += 1
                        continue
                    vihl, tlen, src, dst = ip4(buf, q)
                    if vihl >> 4 != 4:
                        malformed["version"] += 1
                        continue
                    if vihl & 15 < 5:
                        malformed["ihl"] += 1
                        continue
                    if tlen < (vihl & 15) << 2 or q - p + tlen > flen:
                        malformed["length"] += 1
                        continue
                    get = get4
                elif et == et_ip6:
                    if q + 40 > end:
                        malformed["truncated"] += 1
                        continue
                    vtc, plen, src, dst = ip6(buf, q)
                    if vtc >> 4 != 6:
                        malformed["version"] += 1
                        continue
                    if q - p + 40 + plen > flen:
                        malformed["length"] += 1
                        continue
                    get = get6
                else:
                    if et == -1:
                        malformed["truncated"] += 1
                    continue
            else:
                get = get4
            # One attribution for both families. Cached: the counter list (local),
            # 0 (remote) or None (unseen).
            es = get(src)
            if es:
                es[0] += wl
                es[1] += 1
            elif es is None:
                es = locate(src)
                if es:
                    es[0] += wl
                    es[1] += 1
            ed = get(dst)
            if ed:
                ed[2] += wl
                ed[3] += 1
            elif ed is None:
                ed = locate(dst)
                if ed:
                    ed[2] += wl
                    ed[3] += 1
            # Exactly one end local: the frame counts for the other, a remote.
            if want_remote:
                if es:
                    if not ed:
                        remote_tx((dst, wl, 1))
                elif ed:
                    remote_rx((src, wl, 1))
        totals = self.totals
        totals[0] += tx_b
        totals[1] += tx_p
        totals[2] += rx_b
        totals[3] += rx_p
        self.frames += count
        batch.frames, batch.time = count, last_sec + last_nsec * 1e-9
        if batch.time > self.time:
            self.time = batch.time
        for consumer in self.consumers:
            consumer.consume(batch)


LOCALITY_CACHE_MAX = 1 << 16      # remote addresses remembered as "not local"


class LocalityOnly:
    """The decoder's attribution where the kernel counted the frame (--engine ebpf with
    frames copied for a stage): the hot loop's caches and locate() as LocalAddresses
    has them, but every address gets one scratch list, so the decoder's increments go
    nowhere and no address is admitted (the kernel's tables decide that, flood-proof;
    LocalAddresses takes their counts at each tick). Nothing tells local from remote
    here: the kernel counts the remote addresses too (emit_remote)."""

    def __init__(self, local):
        self.local = local
        self.cache4, self.cache6 = {}, {}
        self.scratch = [0, 0, 0, 0]

    def locate(self, key):
        cache = self.cache4 if type(key) is int else self.cache6
        if len(cache) >= LOCALITY_CACHE_MAX:
            cache.clear()
        cache[key] = self.scratch
        return self.scratch



# The transport header a stage reads of a frame (parse_l4), past tags and IPv6 extension
# headers: the connections, HTTP, names and TLS stages each read it of the frames they
# take, and not_on_ports spares most of the others that parse at fixed offsets.

IPV4_L4_HDR = struct.Struct("!BxHHHxB2x4s4s")      # version/IHL, total length, id, flags/fragment, protocol, src, dst
IPV6_L4_HDR = struct.Struct("!B3xHBx16s16s")       # version, payload length, next header, src, dst
IPV4_FRAG_MASK = 0x1FFF                             # fragment offset: a later fragment has no ports
IPV4_MORE_FRAGMENTS = 0x2000
IP_FRAGMENT = -1                  # parse_l4's first field for a later fragment
IPPROTO_FRAGMENT = 44
# IPv6 extension headers before TCP or UDP: next header -> its length from its second
# byte (hop-by-hop, routing and destination options in 8-octet units beyond the first 8,
# fragment fixed, AH in 4-octet units beyond the first 8).
IPV6_EXT_LEN = {0: lambda n: (n + 1) * 8, 43: lambda n: (n + 1) * 8, 60: lambda n: (n + 1) * 8,
                IPPROTO_FRAGMENT: lambda n: 8, 51: lambda n: (n + 2) * 4}
IPV6_EXT_MIN = 8
IPV6_EXT_MAX = 8                    # headers followed at most: a chain is short or hostile
IPV6_FRAG_OFFSET = 0xFFF8
IPV6_MORE_FRAGMENTS = 0x0001
IPV6_FRAG_HDR = struct.Struct("!HI")                # offset and flags, identification
TCP_HDR = struct.Struct("!HHIIBBH")                 # ports, seq, ack, data offset, flags, window
UDP_HDR = struct.Struct("!HHH")                     # ports, length
ICMP_HDR_LEN = 8                  # type, code, checksum and the 4 bytes each type defines
# Zeek's ICMP{4,6}_counterpart: a request's type pairs with its reply's, so that both
# share one connection (orig_p the type, resp_p its counterpart); a one-way message has
# its code as resp_p.
ICMP_COUNTERPARTS = {
    IPPROTO_ICMP: {0: 8, 8: 0, 9: 10, 10: 9, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17},
    IPPROTO_ICMPV6: {128: 129, 129: 128, 130: 131, 131: 130, 133: 134, 134: 133, 135: 136,
                     136: 135, 139: 140, 140: 139, 144: 145, 145: 144},
}


def past_tags(data):
    """(where the network header starts, its ethertype, the outermost VLAN id or 0) of
    a frame of at least ETH_HLEN bytes, past every VLAN tag (tags re-inserted)."""
    n, q, et, vlan = len(data), ETH_HLEN, U16BE.unpack_from(data, ETH_TYPE_OFF)[0], 0
    while et in VLAN_TPIDS and q + VLAN_TAG_LEN <= n:
        tci, et = VLAN_TAG.unpack_from(data, q)
        vlan = vlan or tci & VLAN_VID_MASK
        q += VLAN_TAG_LEN
    return q, et, vlan


def ip_tos_vlan(data):
    """A frame's IP class of service (IPv4 TOS, IPv6 traffic class) and outermost VLAN
    id, for its flow's record (a frame parse_l4 read)."""
    q, et, vlan = past_tags(data)
    if et == ETHERTYPE_IPV4:
        return data[q + IPV4_TOS_OFF], vlan
    return U16BE.unpack_from(data, q)[0] >> IPV6_TCLASS_SHIFT & IP_TOS_MASK, vlan


def parse_l4(data, wirelen=None):
    """A frame's (proto, src, dst, sport, dport, ip_len, payload_len, flags, seq, ack,
    window, fragment id, payload offset) for any IP packet over IPv4 or IPv6 (tags
    re-inserted), or None: ICMP's ports are its type and counterpart (ICMP_COUNTERPARTS),
    another protocol's 0 and 0, and its payload all that follows the IP headers.
    Addresses are raw bytes; the payload length comes from the IP length, not the frame
    (padding), and a frame whose IP length runs past its `wirelen` is refused, as the
    decoder counts it malformed. The fragment id is set on a first fragment (IPv4 or IPv6); a
    later one is (IP_FRAGMENT, src, dst, id, proto, its payload bytes, its IP length)."""
    n = len(data)
    if n < ETH_HLEN:
        return None
    q, et, _ = past_tags(data)
    if et == ETHERTYPE_IPV4 and n >= q + 20:
        vihl, ip_len, ident, frag, proto, src, dst = IPV4_L4_HDR.unpack_from(data, q)
        hl = (vihl & 15) * 4
        if vihl >> 4 != 4 or hl < 20 or ip_len < hl or (wirelen is not None and q + ip_len > wirelen):
            return None
        if frag & IPV4_FRAG_MASK:
            return IP_FRAGMENT, src, dst, ident, proto, ip_len - hl, ip_len
        l4, end = q + hl, ip_len - hl
        frag_id = ident if frag & IPV4_MORE_FRAGMENTS else None
    elif et == ETHERTYPE_IPV6 and n >= q + IPV6_HDR_LEN:
        vtc, plen, proto, src, dst = IPV6_L4_HDR.unpack_from(data, q)
        if vtc >> 4 != 6 or (wirelen is not None and q + IPV6_HDR_LEN + plen > wirelen):
            return None
        l4, end, ip_len, frag_id = q + IPV6_HDR_LEN, plen, plen + IPV6_HDR_LEN, None
        for _ in range(IPV6_EXT_MAX):
            if proto not in IPV6_EXT_LEN or n < l4 + IPV6_EXT_MIN:
                break
            if proto == IPPROTO_FRAGMENT:
                offset, ident = IPV6_FRAG_HDR.unpack_from(data, l4 + 2)
                if offset & IPV6_FRAG_OFFSET:      # a later fragment: no ports in it
                    return (IP_FRAGMENT, src, dst, ident, data[l4], end - IPV6_EXT_MIN,
                            ip_len)
                if offset & IPV6_MORE_FRAGMENTS:
                    frag_id = ident
            size = IPV6_EXT_LEN[proto](data[l4 + 1])
            proto, l4, end = data[l4], l4 + size, end - size
        if end < 0:
            return None
    else:
        return None
    if proto == IPPROTO_TCP and n >= l4 + TCP_MIN_HDR_LEN:
        sport, dport, seq, ack, off, flags, window = TCP_HDR.unpack_from(data, l4)
        doff = (off >> 4) * 4
        if doff < TCP_MIN_HDR_LEN or doff > end:
            return None
        return (proto, src, dst, sport, dport, ip_len, end - doff, flags, seq, ack, window, frag_id,
                l4 + doff)
    if proto == IPPROTO_UDP and n >= l4 + UDP_HDR_LEN:
        sport, dport, length = UDP_HDR.unpack_from(data, l4)
        return (proto, src, dst, sport, dport, ip_len, max(0, length - UDP_HDR_LEN), 0, 0, 0, 0,
                frag_id, l4 + UDP_HDR_LEN)
    if proto in ICMP_COUNTERPARTS:
        if n < l4 + 2 or end < ICMP_HDR_LEN:
            return None
        kind, code = data[l4], data[l4 + 1]
        return (proto, src, dst, kind, ICMP_COUNTERPARTS[proto].get(kind, code), ip_len,
                end - ICMP_HDR_LEN, 0, 0, 0, 0, frag_id, l4 + ICMP_HDR_LEN)
    if proto in (IPPROTO_TCP, IPPROTO_UDP):
        return None                                # its header cut short
    return proto, src, dst, 0, 0, ip_len, end, 0, 0, 0, 0, frag_id, l4


L4_PORTS = struct.Struct("!HH")     # source and destination port, in TCP's header as UDP's
PLAIN_IPV4_PORTS = ETH_HLEN + 20    # where they are in untagged IPv4 without options
ETHERTYPE_IPV4_BYTES = ETHERTYPE_IPV4.to_bytes(2, "big")


def not_on_ports(data, ports):
    """True when a frame is judged at fixed offsets not to be to or from any of `ports`
    ({transport protocol: its ports}, one call for all of a stage's): plain IPv4
    (untagged, no options), most of the frames a stage is handed that are not its own
    (measured: parsing each frame whole cost the drain two thirds of its rate); False:
    it may be, parse_l4 says."""
    if len(data) < PLAIN_IPV4_PORTS + L4_PORTS.size or data[ETH_TYPE_OFF:ETH_HLEN] != ETHERTYPE_IPV4_BYTES \
            or data[ETH_HLEN] != IPV4_VIHL_PLAIN:
        return False
    theirs = ports.get(data[ETH_HLEN + IPV4_PROTO_OFF])
    if theirs is None:
        return True
    sport, dport = L4_PORTS.unpack_from(data, PLAIN_IPV4_PORTS)
    return sport not in theirs and dport not in theirs

###############################################################################
# 12 Enrichment: background pollers (NIC mapping, GeoIP, processes, Docker) ####
###############################################################################
# provides: NicMapping, open_docker, open_geoip, ProcessTable, remote_labeller
#
# Labels that come from outside (the NIC mapping service, GeoIP databases, /proc,
# the container engine) are fetched by a Poller in a thread of its own: it keeps the
# last good answer, counts failures and logs each change of state once. Capture never
# waits on one; exporters read `current` whole.

class Poller:
    """Periodic fetch of one outside source. Subclasses define fetch() and describe()."""
    name = "poller"

    def __init__(self, log, period, initial=None):
        self.log, self.period = log, period
        self.current = initial             # replaced whole on success, read whole
        self.errors = 0
        self.last_success = 0.0
        self._state = None                 # last logged state: "ok" or the error's kind

    def fetch(self):
        """The new value; raises OSError, ValueError, HTTPException or LpdError on failure."""
        raise NotImplementedError

    def describe(self, exc):
        return str(exc) or type(exc).__name__

    def fetch_once(self):
        """One poll; True on success. A failure keeps the last good value."""
        try:
            value = self.fetch()
        except (OSError, ValueError, http.client.HTTPException, LpdError) as e:
            self._failed(type(e).__name__, f"{self.describe(e)}; {self.keeping}")
            return False
        self._succeeded(value)
        return True

    def _succeeded(self, value):
        self.current = value
        self.last_success = time.time()
        if self._state != "ok":
            if self._state is not None:
                self.log(LOG_INFO, f"{self.name}: {self.where()}: answering again")
            self._state = "ok"

    @property
    def keeping(self):
        return f"keeping the last good {self.name}"

    def where(self):
        return ""

    def _failed(self, kind, message):
        self.errors += 1
        if self._state != kind:
            self._state = kind
            self.log(LOG_WARNING, f"{self.name}: {self.where()}: {message}")

    def run(self, stop):
        while not stop.is_set():
            try:
                self.fetch_once()
            except Exception as e:        # never let one odd answer end the poller
                self._failed(type(e).__name__, f"unexpected {type(e).__name__}: {e}")
            stop.wait(self.period)


MAPPING_TIMEOUT = 2.0
MAPPING_MAX_BYTES = 1 << 20


class MappingError(ValueError):
    """The mapping service answered something lpd cannot use."""


def parse_mapping(body):
    """The /status document -> ({canonical address: nic}, default nic).

    {"config": {"lan": "eth2", "wan0": "eth0", "wan1": "eth1"},
     "mappings": {"10.40.0.3": "wan1"}}: a mapped address is labelled with the
    device its wan names; every other address with config["wan0"]'s.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise MappingError(f"invalid JSON: {e}") from None
    except RecursionError:
        # json's decoder recurses per nesting level; '[' * 100000 exhausts the stack.
        raise MappingError("invalid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise MappingError("expected a JSON object")
    config, mappings = doc.get("config"), doc.get("mappings", {})
    if not isinstance(config, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in config.items()):
        raise MappingError("'config' must be an object of strings")
    if "wan0" not in config:
        raise MappingError("'config' has no 'wan0'")
    if not isinstance(mappings, dict):
        raise MappingError("'mappings' must be an object")
    table = {}
    for addr, wan in mappings.items():
        if wan not in config:
            raise MappingError(f"mapping of {addr} names unknown wan {wan!r}")
        try:
            table[ipaddress.ip_address(addr)] = config[wan]
        except ValueError:
            raise MappingError(f"mapping key {addr!r} is not an IP address") from None
    return table, config["wan0"]




class _DeadlineSocket(socket.socket):
    """A TCP socket whose every wait ends at one deadline. http.client reads headers
    and body in many small recv()s; a timeout per call would let a server that
    drips a byte a second hold a fetch for ever."""
    deadline = 0.0
    limit = MAPPING_TIMEOUT          # what the deadline was set to, for the message

    def _bounded(self, call, *args):
        if self.deadline is None:        # unbounded from now on (a stream)
            return call(self, *args)
        late = socket.timeout(f"no complete answer within {self.limit:g} s")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise late
        self.settimeout(left)
        try:
            return call(self, *args)
        except socket.timeout:
            raise late from None

    def connect(self, address):
        return self._bounded(socket.socket.connect, address)

    def sendall(self, data, flags=0):
        return self._bounded(socket.socket.sendall, data, flags)

    def recv_into(self, buffer, nbytes=0, flags=0):
        return self._bounded(socket.socket.recv_into, buffer, nbytes, flags)


class _DeadlineHTTPConnection(http.client.HTTPConnection):
    """HTTPConnection on a _DeadlineSocket: connect, request and the whole answer share
    one deadline. (Name resolution is not under it: the C resolver cannot be bounded.)"""

    def __init__(self, host, deadline, **kw):
        super().__init__(host, **kw)
        self.deadline = deadline

    def connect(self):
        error = OSError(f"{self.host}: no address")
        for family, addr in stream_addresses(self.host, self.port):
            sock = _DeadlineSocket(family, socket.SOCK_STREAM)
            sock.deadline = self.deadline
            try:
                sock.connect(addr)
            except OSError as e:
                sock.close()
                error = e
                continue
            self.sock = sock
            return
        raise error


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    """urllib's http:// handler (redirects, proxies, HTTPError) on _DeadlineHTTPConnection."""

    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_DeadlineHTTPConnection, deadline=self.deadline), req)


class NicMapping(Poller):
    """The NIC label of each local address, from the mapping service."""
    name = "mapping"

    def __init__(self, url, fallback_nic, log, period=10.0, configured=True):
        super().__init__(log, period, ({}, None))   # (table, default nic)
        self.url, self.fallback = url, fallback_nic
        # The default URL, not given: failures count only once it has answered.
        self.configured = configured

    def _failed(self, kind, message):
        if self.configured or self.last_success:
            super()._failed(kind, message)

    def _succeeded(self, value):
        if not self.configured and not self.last_success:
            self.log(LOG_INFO, f"{self.name}: {self.url} answered: NIC labels follow it "
                               "(--mapping-url none turns it off)")
        super()._succeeded(value)

    def where(self):
        return self.url

    def fetch(self):
        # MAPPING_TIMEOUT bounds the whole fetch (connect, request, every byte of the
        # answer) for http://; other schemes keep urllib's timeout per blocking call.
        opener = urllib.request.build_opener(
            _DeadlineHTTPHandler(time.monotonic() + MAPPING_TIMEOUT))
        with opener.open(self.url, timeout=MAPPING_TIMEOUT) as resp:
            return parse_mapping(resp.read(MAPPING_MAX_BYTES))

    def describe(self, exc):
        if isinstance(exc, urllib.error.HTTPError):
            return f"HTTP {exc.code}"
        if isinstance(exc, urllib.error.URLError):
            return str(exc.reason)
        return super().describe(exc)

    def labeller(self):
        """A consistent (table, default) pair for one scrape."""
        table, default = self.current
        if default is None:
            return lambda addr: self.fallback
        return lambda addr: table.get(addr, default)


GEOIP_UNKNOWN = "Unknown"          # ip_traffic_monitor_cli's label for "no database, no entry"
GEOIP_FALLBACK_LANG = "en"
# How often the databases' files are checked: geoipupdate replaces them in place weekly.
GEOIP_CHECK_PERIOD = 60.0
GEOIP_CACHE_MAX = 1 << 18          # remotes whose labels are remembered; then it starts over
GEOIP_INSTALL = ("needs the maxminddb module: apt install python3-maxminddb (Debian, Ubuntu), "
                 f"or pip install '{DISTRIBUTION}[geoip]'")
# option -> (attribute of the options, what its database_type must contain)
GEOIP_DATABASES = {
    "--geoip-db": ("geoip_db", ("City", "Country", "Enterprise")),
    "--geoip-isp-db": ("geoip_isp_db", ("ISP", "ASN")),
}


def open_mmdb(path, option, kinds):
    """A maxminddb Reader of the right kind, or a ConfigError naming the file."""
    try:
        import maxminddb
    except ImportError:
        raise ConfigError(f"{option}: GeoIP {GEOIP_INSTALL}") from None
    try:
        reader = maxminddb.open_database(path)
    except OSError as e:
        raise os_failure(e, f"{option} {path}") from None
    except (maxminddb.InvalidDatabaseError, ValueError) as e:
        raise ConfigError(f"{option} {path}: not a MaxMind DB file ({e})") from None
    db_type = reader.metadata().database_type
    if not any(k in db_type for k in kinds):
        reader.close()
        raise ConfigError(f"{option} {path}: a {db_type} database; {option} takes "
                          f"{' or '.join(kinds)} databases")
    return reader


def _file_identity(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _geo_name(record, *path, lang):
    """record[path...]["names"][lang], falling back to English, then Unknown."""
    for step in path:
        record = record.get(step) if isinstance(record, dict) else None
        if isinstance(record, list):               # subdivisions: the first is the province
            record = record[0] if record else None
    names = record.get("names") if isinstance(record, dict) else None
    if not isinstance(names, dict):
        return GEOIP_UNKNOWN
    name = names.get(lang) or names.get(GEOIP_FALLBACK_LANG)
    return name if isinstance(name, str) and name else GEOIP_UNKNOWN


class GeoIP(Poller):
    """country, province (first subdivision), city and isp of remote addresses, from
    MaxMind databases. Looked up once per address (cached), on the exporters' side:
    never per frame, never on the capture thread. A database replaced on disk (or a
    SIGHUP) is reopened; one that fails to reopen keeps the last good one."""
    name = "geoip"

    def __init__(self, paths, lang, log, period=GEOIP_CHECK_PERIOD):
        super().__init__(log, period)
        self.paths, self.lang = paths, lang          # {option: path}
        self.current = self.fetch()                  # at start a bad database is fatal

    def where(self):
        return ", ".join(self.paths.values())

    def fetch(self, force=False):
        """(readers by option, file identities, cache): the same as now unless a file changed."""
        now = self.current
        identities = {}
        for option, path in self.paths.items():
            try:
                identities[option] = _file_identity(path)
            except OSError as e:
                raise ConfigError(f"{option} {path}: {e.strerror}") from None
        if now is not None and not force and identities == now[1]:
            return now
        readers = {option: open_mmdb(path, option, GEOIP_DATABASES[option][1])
                   for option, path in self.paths.items()}
        if now is not None:
            self.log(LOG_INFO, f"geoip: reopened {self.where()}")
        return readers, identities, {}

    def reopen(self):
        """SIGHUP: read the databases again even if their files look the same."""
        try:
            self.current = self.fetch(force=True)
        except LpdError as e:
            self._failed(type(e).__name__, f"{e}; keeping the last good {self.name}")

    def labels(self, key):
        """(country, province, city, isp) of a (version, raw key) remote."""
        readers, _, cache = self.current
        got = cache.get(key)
        if got is None:
            if len(cache) >= GEOIP_CACHE_MAX:
                cache.clear()
            got = cache[key] = self._lookup(address(key), readers)
        return got

    def _lookup(self, addr, readers):
        found = {}
        for option, reader in readers.items():
            try:
                found[option] = reader.get(addr)
            except ValueError:              # an IPv6 address in an IPv4-only database
                pass
            except Exception as e:          # a corrupt data section: this remote stays Unknown
                self._failed(type(e).__name__, f"{self.paths[option]}: lookup of {addr} failed: {e}")
        city, isp = found.get("--geoip-db"), found.get("--geoip-isp-db")
        if not isinstance(city, dict):
            city = {}
        country = _geo_name(city, "country", lang=self.lang)
        if country == GEOIP_UNKNOWN:       # anycast and satellite ranges carry only this
            country = _geo_name(city, "registered_country", lang=self.lang)
        name = None
        if isinstance(isp, dict):
            name = isp.get("isp") or isp.get("autonomous_system_organization")
        return (country, _geo_name(city, "subdivisions", lang=self.lang),
                _geo_name(city, "city", lang=self.lang),
                name if isinstance(name, str) and name else GEOIP_UNKNOWN)


# /proc/net tables by (protocol, IP version): local and remote "ADDR:PORT" in hex, the
# address as the kernel's 32-bit words in host order, and the socket's inode.
PROC_NET_TABLES = {(IPPROTO_TCP, 4): "net/tcp", (IPPROTO_TCP, 6): "net/tcp6",
                   (IPPROTO_UDP, 4): "net/udp", (IPPROTO_UDP, 6): "net/udp6"}
PROC_NET_LOCAL, PROC_NET_REMOTE, PROC_NET_INODE = 1, 2, 9       # columns
PROC_POLL_PERIOD = 0.5
# At most one scan of /proc per this many seconds, whatever the connection rate: a storm
# of new connections waits for the next scan instead of making one each.
PROC_REFRESH_MIN = 1.0
PROC_PENDING_MAX = 4096            # connections waiting for a scan; beyond, the oldest go unnamed
IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")


def _proc_addr(text):
    """'0100007F:1F90' -> (b'\\x7f\\0\\0\\x01', 8080)."""
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    return b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)), int(port, 16)


def read_proc_sockets(root="/proc"):
    """{(proto, local (addr, port), remote (addr, port)): inode} of this network
    namespace's sockets; IPv4 addresses on IPv6 sockets are given as IPv4."""
    sockets = {}
    for (proto, _), name in PROC_NET_TABLES.items():
        try:
            with open(os.path.join(root, name)) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue                               # no IPv6, or no such table
        for line in lines:
            fields = line.split()
            try:
                local, remote = _proc_addr(fields[PROC_NET_LOCAL]), _proc_addr(fields[PROC_NET_REMOTE])
                inode = int(fields[PROC_NET_INODE])
            except (IndexError, ValueError):
                continue
            if not inode:
                continue                           # TIME_WAIT: no socket any more
            unmapped = [(a[len(IPV4_MAPPED_PREFIX):] if a.startswith(IPV4_MAPPED_PREFIX) else a, port)
                        for a, port in (local, remote)]
            sockets[proto, unmapped[0], unmapped[1]] = inode
    return sockets


def socket_owners(inodes, root="/proc"):
    """{inode: (pid, comm)} for the sockets of `inodes` that a process holds open."""
    owners, wanted = {}, set(inodes)
    for pid in os.listdir(root):
        if not pid.isdigit() or not wanted:
            continue
        fd_dir = os.path.join(root, pid, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue                               # gone, or not ours to read
        for fd in fds:
            try:
                m = SOCKET_LINK.fullmatch(os.readlink(os.path.join(fd_dir, fd)))
            except OSError:
                continue
            if m and int(m.group(1)) in wanted:
                inode = int(m.group(1))
                wanted.discard(inode)
                try:
                    with open(os.path.join(root, pid, "comm"), "rb") as f:
                        # any process may name itself any bytes (PR_SET_NAME)
                        comm = f.read().strip().decode("utf-8", "replace")
                except OSError:
                    comm = ""
                owners[inode] = (int(pid), comm)
    return owners


class ProcessTable(Poller):
    """pid and command of the local socket of new connections, from /proc/net/* and
    /proc/<pid>/fd, on a thread of its own: the capture thread only queues connections
    (want()); each is looked up once, at the next scan, and handed back (deliver)."""
    name = "processes"

    def __init__(self, log, period=PROC_POLL_PERIOD, root="/proc"):
        super().__init__(log, period, {})
        self.root = root
        self.pending = collections.deque(maxlen=PROC_PENDING_MAX)
        self.deliver = lambda conn: None
        self.last_scan = -math.inf
        self.scans = 0

    def want(self, conn):
        self.pending.append(conn)

    def fetch(self):
        if not self.pending or time.monotonic() - self.last_scan < PROC_REFRESH_MIN:
            return self.current
        self.last_scan = time.monotonic()
        self.scans += 1
        conns = []
        while self.pending:
            conns.append(self.pending.popleft())
        sockets = read_proc_sockets(self.root)
        found = {}
        for c in conns:
            a, b = (c.orig_h, c.orig_p), (c.resp_h, c.resp_p)
            for local, remote in ((a, b), (b, a)):
                inode = sockets.get((c.proto, local, remote))
                if inode is None and c.proto == IPPROTO_UDP:
                    # an unconnected UDP socket: bound to the port, any peer
                    wild = bytes(len(local[0]))
                    inode = sockets.get((c.proto, local, (wild, 0))) or \
                        sockets.get((c.proto, (wild, local[1]), (wild, 0))) or \
                        sockets.get((c.proto, (bytes(16), local[1]), (bytes(16), 0)))
                if inode is not None:
                    found[c] = inode
                    break
        owners = socket_owners(found.values(), self.root) if found else {}
        for c, inode in found.items():
            if inode in owners:
                c.pid, c.comm = owners[inode]
                self.deliver(c)
        return self.current


# Container names: the Docker Engine API (and podman's compatible one) on a unix socket.
DOCKER_SOCKET = "/var/run/docker.sock"
# Paths carry a version. Docker 29 refuses anything below 1.44; bookworm's docker.io
# 20.10 and podman up to 5.4 speak at most 1.41 (their /_ping says so). Every field
# lpd reads exists since 1.21.
DOCKER_API_MAX = (1, 44)
DOCKER_API_UNSAID = (1, 41)        # a /_ping without the header
DOCKER_TIMEOUT = 5.0               # one whole request; the events stream has none
DOCKER_MAX_BYTES = 64 << 20        # a container listing larger than this is garbage
DOCKER_EVENT_MAX_BYTES = 1 << 20   # one event line
DOCKER_PING_MAX_BYTES = 1 << 10    # "OK"
DOCKER_REFRESH = 30.0              # full re-list even when no event came
DOCKER_DEBOUNCE = 0.2              # events come in bursts (die, stop, network disconnect)
DOCKER_BACKOFF = (0.5, 5.0)        # first and longest wait between reconnects
# A stopped container's addresses keep its name this long (or until another container
# takes them): requests it was serving still finish under its name.
DOCKER_KEEP = 600.0
# Actions after which addresses or names may have changed. Podman says `remove` where
# Docker says `destroy`; its network events name the container, Docker's the network.
DOCKER_CONTAINER_ACTIONS = frozenset(("start", "restart", "die", "stop", "kill", "destroy",
                                      "remove", "rename", "create", "unpause"))
DOCKER_EVENTS = "/events?filters=" + urllib.parse.quote(
    json.dumps({"type": ["container", "network"]}, separators=(",", ":")))


class DockerError(ValueError):
    """The engine answered something lpd cannot use."""


class Container(NamedTuple):
    name: str
    image: str
    id: str


def container_name(names, cid):
    """Docker's Names hold '/web1' plus, for legacy links, '/other/alias': the one
    with a single slash, without it."""
    names = [n for n in names if isinstance(n, str) and n] if isinstance(names, list) else []
    for n in names:
        if n.count("/") == 1 and n.startswith("/"):
            return n[1:]
    return names[0].lstrip("/") if names else cid[:12]


def parse_containers(body):
    """GET /containers/json -> {raw address: Container} over every network of every
    container (IPv4 and global IPv6; a container without an address of its own,
    --network host or container:X, gives none)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise DockerError(f"container list: invalid JSON ({str(e)[:80]})") from None
    if not isinstance(doc, list):
        raise DockerError("container list: expected a JSON array")
    table = {}
    for c in doc:
        if not isinstance(c, dict) or not isinstance(c.get("Id"), str):
            raise DockerError("container list: an entry without an Id")
        image = c.get("Image") if isinstance(c.get("Image"), str) else ""
        entry = Container(container_name(c.get("Names"), c["Id"]), image, c["Id"])
        networks = (c.get("NetworkSettings") or {}).get("Networks") if \
            isinstance(c.get("NetworkSettings"), dict) else None
        for net in (networks or {}).values() if isinstance(networks, dict) else ():
            if not isinstance(net, dict):
                continue
            for field in ("IPAddress", "GlobalIPv6Address"):
                text = net.get(field)
                if isinstance(text, str) and text:
                    try:
                        table.setdefault(ipaddress.ip_address(text).packed, entry)
                    except ValueError:
                        raise DockerError(f"container {entry.name}: {field} {text!r} "
                                          f"is not an address") from None
    return table


def docker_api_version(header):
    """The version lpd speaks: the engine's (its /_ping's Api-Version), at most
    DOCKER_API_MAX."""
    if not header:
        return DOCKER_API_UNSAID
    m = re.fullmatch(r"\s*([0-9]{1,3})\.([0-9]{1,3})\s*", header)
    if not m:
        raise DockerError(f"/_ping: API version {header[:40]!r}")
    return min((int(m[1]), int(m[2])), DOCKER_API_MAX)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix stream socket; with a deadline, connect, request and
    the whole answer share it (an engine that hangs must not hold the poller)."""

    def __init__(self, socket_path, deadline=None):
        super().__init__("localhost")          # the engine wants some Host header
        self.socket_path, self.deadline = socket_path, deadline

    def connect(self):
        if self.deadline is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            sock = _DeadlineSocket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.deadline, sock.limit = self.deadline, DOCKER_TIMEOUT
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def docker_get(socket_path, path, limit=DOCKER_MAX_BYTES):
    """(body, headers) of GET path; DockerError for an answer other than 200."""
    conn = _UnixHTTPConnection(socket_path, time.monotonic() + DOCKER_TIMEOUT)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read(limit + 1)
        if len(body) > limit:
            raise DockerError(f"GET {path.split('?')[0]}: answer over {limit} bytes")
        if resp.status != http.HTTPStatus.OK:
            try:
                message = json.loads(body).get("message", "")
            except (ValueError, AttributeError, RecursionError):
                message = ""
            raise DockerError(f"GET {path.split('?')[0]}: HTTP {resp.status} {message}"[:200])
        return body, resp.headers
    finally:
        conn.close()


class DockerEngine(Poller):
    """Container names of local addresses, from the engine's API: listed on start,
    re-listed after every event that can move an address (the /events stream, read
    on a thread of its own) and every DOCKER_REFRESH s. The capture thread reads
    `names` (address -> name), replaced whole; exporters read `current`."""
    name = "docker"

    def __init__(self, socket_path, log):
        super().__init__(log, DOCKER_REFRESH, {})   # raw address -> Container, running only
        self.socket_path = socket_path
        self.names = {}                  # raw address -> name, running or lately stopped
        self.gone = {}                   # raw address -> (Container, when it went)
        self.api_version = None
        self.up = False
        self._changed = threading.Event()
        self._stream = None

    keeping = "keeping the last good names"

    def where(self):
        return self.socket_path

    def describe(self, exc):
        if isinstance(exc, FileNotFoundError):
            return "no engine (no such socket); servers are labelled ip:port until one starts"
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused"
        return super().describe(exc)

    def name_of(self, raw):
        return self.names.get(raw, "")

    def version_path(self, path):
        return f"/v{self.api_version[0]}.{self.api_version[1]}{path}"

    def fetch(self):
        if self.api_version is None:
            _, headers = docker_get(self.socket_path, "/_ping", DOCKER_PING_MAX_BYTES)
            self.api_version = docker_api_version(headers.get("Api-Version"))
        body, _ = docker_get(self.socket_path, self.version_path("/containers/json"))
        return parse_containers(body)

    def _succeeded(self, table):
        now = time.monotonic()
        for raw, c in self.current.items():          # stopped since the last list
            if raw not in table:
                self.gone[raw] = (c, now)
        gone = {raw: cw for raw, cw in self.gone.items()
                if raw not in table and cw[1] + DOCKER_KEEP > now}
        names = {raw: c.name for raw, (c, _) in gone.items()}
        names.update((raw, c.name) for raw, c in table.items())
        self.gone, self.names = gone, names
        self.up = True
        super()._succeeded(table)

    def _failed(self, kind, message):
        self.up = False
        self.api_version = None          # renegotiated: the engine may come back upgraded
        # One line per outage: a dying engine resets the connection, then its socket goes.
        super()._failed("down", message)

    # -- the events stream ----------------------------------------------------

    def _open_stream(self):
        conn = _UnixHTTPConnection(self.socket_path, time.monotonic() + DOCKER_TIMEOUT)
        conn.request("GET", self.version_path(DOCKER_EVENTS))
        resp = conn.getresponse()
        if resp.status != http.HTTPStatus.OK:
            conn.close()
            raise DockerError(f"GET /events: HTTP {resp.status}")
        conn.sock.settimeout(None)       # a quiet engine sends nothing for hours
        conn.sock.deadline = None
        return conn, resp

    def _follow(self, conn, resp):
        """The stream's thread: any event that can move an address asks for a re-list;
        the end of the stream (the engine went away) too, so the poller notices."""
        try:
            while True:
                line = resp.readline(DOCKER_EVENT_MAX_BYTES)
                if not line or not line.endswith(b"\n"):
                    break
                try:
                    ev = json.loads(line)
                    relevant = ev.get("Type") == "network" or (
                        ev.get("Type") == "container" and ev.get("Action") in DOCKER_CONTAINER_ACTIONS)
                except (ValueError, AttributeError, RecursionError):
                    relevant = True                      # unreadable: look for ourselves
                if relevant:
                    self._changed.set()
        except Exception:                # whatever it was, the stream is over: re-list
            pass
        finally:
            conn.close()
            if self._stream is conn:
                self._stream = None
                self._changed.set()

    def run(self, stop):
        wait = DOCKER_BACKOFF[0]
        while not stop.is_set():
            try:
                if self._stream is None:
                    # the stream first, then the list: nothing falls between them
                    _, headers = docker_get(self.socket_path, "/_ping", DOCKER_PING_MAX_BYTES)
                    self.api_version = docker_api_version(headers.get("Api-Version"))
                    conn, resp = self._open_stream()
                    self._stream = conn
                    threading.Thread(target=self._follow, args=(conn, resp),
                                     name="docker-events", daemon=True).start()
                ok = self.fetch_once()
            except (OSError, ValueError, http.client.HTTPException, LpdError) as e:
                self._failed(type(e).__name__, f"{self.describe(e)}; {self.keeping}")
                ok = False
            except Exception as e:        # never let one odd answer end the poller
                self._failed(type(e).__name__, f"unexpected {type(e).__name__}: {e}")
                ok = False
            if not ok:
                self._drop_stream()
                stop.wait(wait)
                wait = min(wait * 2, DOCKER_BACKOFF[1])
                continue
            wait = DOCKER_BACKOFF[0]
            if self._changed.wait(self.period) and not stop.is_set():
                stop.wait(DOCKER_DEBOUNCE)
            self._changed.clear()
        self._drop_stream()

    def _drop_stream(self):
        conn, self._stream = self._stream, None
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wake(self):
        """Stop: the poller's wait ends at once."""
        self._changed.set()


def open_docker(opts, replaying=False):
    """The engine the options name: --docker-socket, else the default one while
    capturing with --http (a replay asks only when told to). None: no names."""
    path = opts.docker_socket
    if path == "none" or not opts.http or (path is None and replaying):
        return None
    return DockerEngine(path or DOCKER_SOCKET, log)


def open_geoip(opts):
    """The GeoIP databases the options name (fatal if one is unusable), or None."""
    paths = {option: getattr(opts, attr) for option, (attr, _) in GEOIP_DATABASES.items()
             if getattr(opts, attr)}
    return GeoIP(paths, opts.geoip_lang, log) if paths else None


def remote_labeller(geo):
    """key -> (country, province, city, isp); Unknown everywhere without databases."""
    if geo is None:
        unknown = (GEOIP_UNKNOWN,) * 4
        return lambda key: unknown
    return geo.labels


###############################################################################
# 13 Presentation: documents, metric families, logs, the stage row ############
###############################################################################
# provides: _amount, API_ROWS_DEFAULT, API_ROWS_MAX, _biggest, capture_metrics, _columns,
#   containers_document, _cut, docker_metrics, _envelope, _first, human_bytes,
#   interface_document, _io, _io_cells, IO_COLUMNS, JsonLog, metric_family, Presentation, scaled,
#   Stage, STAGES, Wiring
#
# The common parts of what every stage shows: one JSON document per kind, built from a
# publication by the thread that serves it (GET /api/<kind>?top=N on the metrics port;
# `--output json` prints them all as {kind: document}; `--output table` as columns);
# Prometheus families built afresh on every scrape; JSON logs; and the row each stage
# adds to STAGES (chapter 14) to say how the options build it and what shows it.
# Document fields are stable: `lpd top` and dashboards read them. Rows come sorted by
# bytes (tx + rx), biggest first.
#
# An answer is bounded whatever the tables hold: with 163k open connections an uncut
# /api/connections was 62 MB and 184 MiB of the server thread's memory. A document's rows
# are its first `top`, API_ROWS_DEFAULT when not asked, never more than API_ROWS_MAX; it
# says how many there were ("total") and whether some were left out ("truncated").
# `--output json` stays whole: the one answer a replay is run for, printed once by a
# process that holds those tables anyway, with no server to keep responsive.

API_ROWS_DEFAULT = 1000            # rows of an /api document without ?top=N


API_ROWS_MAX = 10000               # rows of any /api document, whatever ?top=N asks


class Presentation(NamedTuple):
    """What turns snapshots into labelled rows, beside the snapshots themselves."""
    nic: str
    label: Callable                    # local address -> NIC label (the mapping)
    geo: Callable                      # remote key -> (country, province, city, isp)
    threshold: int                     # bytes a remote exceeds to get its own series
    docker: object = None              # the DockerEngine, or None: no container names


def _envelope(snap, how):
    return {"nic": how.nic, "time": snap.get("time", 0.0)}


def _io(r):
    """The four counters of a snapshot row whose key is r[0]."""
    return {"tx_bytes": r[1 + TX_BYTES], "tx_packets": r[1 + TX_PACKETS],
            "rx_bytes": r[1 + RX_BYTES], "rx_packets": r[1 + RX_PACKETS]}


def _first(rows, top, key):
    """The first `top` of rows ordered by key (all of them: top None), without sorting
    what is left out: 1000 of 163k connections cost a heap of 1000."""
    return sorted(rows, key=key) if top is None else heapq.nsmallest(top, rows, key=key)


def _cut(kept, total):
    """The fields that say whether a document's rows are all of them."""
    return {"total": total, "truncated": len(kept) < total}


def _biggest(rows, top):
    """Rows by tx + rx bytes, then by key; the first `top` of them."""
    return _first(rows, top, lambda r: (-(r[1 + TX_BYTES] + r[1 + RX_BYTES]), r[0]))


def interface_document(snap, how, top=None):
    iface = snap.get("interface", InterfaceSnapshot())
    return {**_envelope(snap, how), "up": iface.up, "frames": iface.frames, "drops": iface.drops,
            **_io((None, *iface.totals)), "malformed": dict(iface.malformed),
            "gso_frames": iface.gso_frames, "gso_unsplit": iface.gso_unsplit,
            "unattributed_bytes": iface.unattributed[0],
            "unattributed_packets": iface.unattributed[1]}


def containers_document(snap, how, top=None):
    """/api/containers: the engine's state and the address of every running container."""
    engine = how.docker
    if engine is None:
        return None
    version = engine.api_version
    rows = sorted(({"ip": raw_address(raw), "container": c.name, "image": c.image, "id": c.id}
                   for raw, c in engine.current.items()), key=lambda r: (r["container"], r["ip"]))
    kept = rows if top is None else rows[:top]
    return {**_envelope(snap, how),
            "engine": {"socket": engine.socket_path, "up": engine.up, "errors": engine.errors,
                       "api_version": f"{version[0]}.{version[1]}" if version else None},
            "containers": kept, **_cut(kept, len(rows))}


BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
UNIT_STEP = 1024


def scaled(value, step, units):
    """(value in the largest unit it reaches, that unit's index): 1536, 1024 -> (1.5, 1)."""
    value, unit = float(value), 0
    while value >= step and unit < len(units) - 1:
        value /= step
        unit += 1
    return value, unit


def human_bytes(n):
    """1536 -> '1.5 KiB': for people, always beside the exact number."""
    value, unit = scaled(n, UNIT_STEP, BINARY_UNITS)
    return f"{n} B" if unit == 0 else f"{value:.1f} {BINARY_UNITS[unit]}"


def _columns(header, rows, right):
    """Aligned lines: `right` names the columns aligned right (numbers)."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    lines = []
    for r in [header] + rows:
        cells = [c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(r, widths, header)]
        lines.append("  ".join(cells).rstrip() + "\n")
    return lines


def _amount(n, unit=""):
    return f"{n}{unit} ({human_bytes(n)})" if n >= UNIT_STEP else f"{n}{unit}"


IO_COLUMNS = ("tx bytes", "tx pkts", "rx bytes", "rx pkts")   # a table's counter columns


def _io_cells(d):
    """A document row's four counters as table cells (IO_COLUMNS)."""
    return [_amount(d["tx_bytes"]), str(d["tx_packets"]), _amount(d["rx_bytes"]),
            str(d["rx_packets"])]


INTERFACE_COUNTERS = (
    ("lpd_interface_transmit_bytes", TX_BYTES, "Bytes of frames the interface sent."),
    ("lpd_interface_transmit_packets", TX_PACKETS, "Frames the interface sent."),
    ("lpd_interface_receive_bytes", RX_BYTES, "Bytes of frames the interface received."),
    ("lpd_interface_receive_packets", RX_PACKETS, "Frames the interface received."))


def metric_family(cls, name, doc, labels, rows):
    """A family of cls (CounterMetricFamily, ...): rows of (label values, value)."""
    fam = cls(name, doc, labels=labels)
    for values, v in rows:
        fam.add_metric(values, v)
    return fam


def capture_metrics(c, snap):
    """The interface's and the capture processes' families, and the NIC mapping's. c: the
    Collector (its nic, mapping); snap: the publication."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    family, nic = metric_family, c.nic
    iface = snap.get("interface", InterfaceSnapshot())
    for name, i, doc in INTERFACE_COUNTERS:
        yield family(CounterMetricFamily, name, doc, ["nic"], [((nic,), iface.totals[i])])
    # Per capture process: one process is worker "0"; with --workers, one series each
    # (sum by (nic) for the interface's).
    workers = snap.get("workers") or ((0, iface.frames, iface.drops),)
    yield family(CounterMetricFamily, "lpd_capture_packets",
                 "Frames copied to lpd through the ring (not those the eBPF engine "
                 "counted in the kernel).", ["nic", "worker"], [((nic, str(i)), f) for i, f, _ in workers])
    yield family(CounterMetricFamily, "lpd_capture_drops", "Frames the kernel dropped (ring full).",
                 ["nic", "worker"], [((nic, str(i)), d) for i, _, d in workers])
    yield family(CounterMetricFamily, "lpd_worker_restarts",
                 "Capture workers that ended and were started again (--workers).", [],
                 [((), snap.get("worker_restarts", 0))])
    yield family(CounterMetricFamily, "lpd_gso_frames",
                 "GSO/GRO super-frames counted as the frames the wire carried.",
                 ["nic"], [((nic,), iface.gso_frames)])
    yield family(CounterMetricFamily, "lpd_gso_unsplit",
                 "GSO/GRO super-frames counted as one frame (headers not splittable).",
                 ["nic"], [((nic,), iface.gso_unsplit)])
    malformed = dict(iface.malformed)
    yield family(CounterMetricFamily, "lpd_packets_malformed", "Frames not attributed: malformed.",
                 ["reason"], [((r,), malformed.get(r, 0)) for r in MALFORMED_REASONS])
    yield family(GaugeMetricFamily, "lpd_interface_up", "1 while lpd captures on the interface.",
                 ["nic"], [((nic,), 1.0 if iface.up else 0.0)])
    yield family(CounterMetricFamily, "lpd_mapping_errors", "Failed NIC mapping fetches.",
                 [], [((), c.mapping.errors)])
    yield family(GaugeMetricFamily, "lpd_mapping_last_success_timestamp_seconds",
                 "Unix time of the last good NIC mapping (0: never).", [],
                 [((), c.mapping.last_success)])


def docker_metrics(engine):
    """The container engine's families (--docker-socket)."""
    from prometheus_client.core import CounterMetricFamily as counter, GaugeMetricFamily as gauge
    family = metric_family
    containers = sorted((raw_address(raw), c.name, c.image) for raw, c in engine.current.items())
    yield family(gauge, "lpd_container_info",
                 "1 per address of a running container: joins local_ip to its name.",
                 ["local_ip", "container", "image"], [(row, 1.0) for row in containers])
    yield family(gauge, "lpd_docker_up", "1 while the container engine answers.", [],
                 [((), 1.0 if engine.up else 0.0)])
    yield family(counter, "lpd_docker_errors", "Failed requests to the container engine.",
                 [], [((), engine.errors)])
    yield family(gauge, "lpd_docker_last_success_timestamp_seconds",
                 "Unix time of the last good container list (0: never).", [],
                 [((), engine.last_success)])


JSON_LOG_BUFFER = 1 << 16     # bytes of whole lines gathered before one write(2)


class JsonLog:
    """--conn-log and --http-log: one JSON object per line, Zeek's field names. The
    capture thread writes it and reopens it after a SIGHUP (logrotate); a write that
    fails (disk full) is counted and logged once, and capture goes on. Lines are gathered
    and written whole with one write(2) on an O_APPEND descriptor at each flush (and when
    JSON_LOG_BUFFER is reached): a reader polling the file never finds half a line, as it
    could behind a buffered file object that writes out whenever its buffer fills."""

    def __init__(self, path, option="--conn-log"):
        self.path, self.option = path, option
        self.errors = 0
        self._failing = False
        self.pending, self.pending_bytes = [], 0
        self.fd = None if path == "-" else self._open()

    def _open(self):
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o644)
        except OSError as e:
            raise os_failure(e, f"{self.option} {self.path}") from None

    def write(self, record):
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        self.pending.append(line)
        self.pending_bytes += len(line)
        if self.pending_bytes >= JSON_LOG_BUFFER:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        data = memoryview(b"".join(self.pending))
        self.pending, self.pending_bytes = [], 0
        try:
            if self.fd is None:             # beside --output's text: through sys.stdout
                sys.stdout.write(bytes(data).decode())
                sys.stdout.flush()
                return
            while data:
                data = data[os.write(self.fd, data):]
            self._failing = False
        except OSError as e:
            self.errors += 1
            if not self._failing:
                log(LOG_ERR, f"{self.option} {self.path}: {e.strerror}; dropping records")
            self._failing = True

    def reopen(self):
        if self.fd is None:
            return
        self.flush()                    # what was written before the rotation stays there
        try:
            new = self._open()
        except ConfigError as e:
            log(LOG_ERR, f"{e}; writing on to the old file")
            return
        old, self.fd = self.fd, new
        try:
            os.close(old)
        except OSError:
            self.errors += 1

    def close(self):
        self.flush()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Stage(NamedTuple):
    """One row of STAGES."""
    consumer: type                 # the Consumer subclass: its name, its snapshot_type
    build: Callable                # (opts, Wiring, the stages built before it by name) ->
                                   # an instance, or None: the options leave it off
    documents: tuple               # ((kind, document function), ...): /api/<kind>, --output json's
    metrics: Callable              # (Collector, publication) -> its metric families
    table: Callable                # its document -> --output table's lines
    log: str = ""                  # the option naming its JSON log, "" for none
    live_documents: tuple = ()     # /api only: what is worth asking a running daemon

    @property
    def name(self):
        return self.consumer.name

    def log_path(self, opts):
        """The path its log option names (--conn-log: opts.conn_log), or None."""
        return getattr(opts, self.log[2:].replace("-", "_")) if self.log else None


class Wiring(NamedTuple):
    """What the stages are built with beside the options (choose_stages)."""
    local_nets: list               # the interface's networks, --local-net's or a replay's
    idle_timeout: float            # the local addresses' bounds (a replay keeps every one)
    local_max: int
    rules: object                  # load_rules()'s RuleCounter, or None (no -f)
    logs: dict                     # stage name -> its log (open_logs; a worker's ShippedLog)
    names: object = None           # .name_of(raw address): HTTP servers' container names
    pollers: list = None           # a stage's background Pollers are added here; None: none (-r)


# Every stage, in the order they are built, fed, published and shown: each sub-chapter
# of 14 appends its row. The local addresses come first: the decoder counts them inline,
# every other stage it feeds.
STAGES = []


###############################################################################
# 14 Stages ###################################################################
###############################################################################
# provides: connection_uid, Connections, conn_key, exported_remotes, format_rule_lines,
#   LIVE_STATES, LOCAL_EVICT_FRACTION, LocalAddresses, OFFLOAD_*, parse_filter_file,
#   proto_name, REMOTE_TRIM_FACTOR, REMOTE_WEIGHT, RemoteAddresses, RuleCounter, SEQ_HALF,
#   SEQ_MOD, TH_*
#
# Where a new stage goes: one sub-chapter here. It holds the Consumer subclass (11) with
# its name (the key of its snapshot, document, log and worker pipe) and snapshot_type,
# what it wants decoded, consume/tick/snapshot/finish; then its documents, its metric
# families, its lines of the table, the function that builds it from the options, and
# last its row, STAGES.append(Stage(...)). The daemon, the workers, -r, /api, --output
# and /metrics take it from there (18.1).


###############################################################################
# 14.1 Local addresses ########################################################
# provides: LOCAL_EVICT_FRACTION, LocalAddresses

LOCAL_EVICT_FRACTION = 8          # a full table evicts this fraction of itself at once


def _prefixes(nets, family):
    return [(int(n.network_address), int(n.netmask)) for n in nets if n.version == family.version]


def _is_local(key, prefixes):
    """key: a hot-loop key (an int for IPv4, 16 bytes for IPv6)."""
    value = family_of_key(key).key_to_int(key)
    return any(value & mask == net for net, mask in prefixes)


class _LocalTable:
    """One family's local addresses: counters, locality cache, and what changed."""
    __slots__ = ("hosts", "cache", "remote", "prefixes", "dirty", "prev", "active", "rows", "bps")

    def __init__(self, family, nets, old=None):
        self.prefixes = _prefixes(nets, family)
        self.hosts = old.hosts if old else {}      # key -> [tx_b, tx_p, rx_b, rx_p]
        self.remote = {}                            # key -> 0: seen, not local
        # key -> counter list (local) or 0 (remote): what the hot loop looks up. Local
        # keys leave it at every tick, so their next frame goes through locate(),
        # which notes them in `dirty`: a tick then works on what changed only.
        self.cache = {}
        self.dirty = set(self.hosts)                # local keys counted since the last tick
        self.prev = old.prev if old else {}         # key -> (tx_b, rx_b) at the last change
        self.active = old.active if old else collections.OrderedDict()   # key -> last change
        self.rows = old.rows if old else {}         # key -> its snapshot row
        self.bps = old.bps if old else {}           # key -> rates of the last interval, if moving


class LocalAddresses(Consumer):
    """Per-local-address counters, the legacy *_bps rates and idle expiry, bounded.

    The decoder counts into these lists inline: the locality caches map every
    address seen to its counter list (local) or 0 (remote), so the hot loop pays two
    dict lookups per IP frame whatever the number of local networks.

    At most `local_max` addresses are kept: a flood of spoofed sources inside a local
    network evicts the addresses with the least traffic (the spoofed ones), never the
    busy hosts, and the interface totals count every frame whatever was evicted. A
    tick works on the addresses that changed since the last one, not on the table.
    """
    name = "addresses"
    snapshot_type = AddressSnapshot

    def __init__(self, local_nets, idle_timeout=DEFAULT_IDLE_TIMEOUT, local_max=DEFAULT_LOCAL_MAX):
        self.idle_timeout, self.local_max = idle_timeout, local_max
        self.tables = {}
        self.last_tick = None
        self.evictions = 0
        self.work = 0                   # addresses the last tick looked at
        self.set_local_nets(local_nets)

    def set_local_nets(self, nets):
        """Adopt new local networks (between blocks). No counter is dropped: an
        address that is no longer local stops counting and expires like any idle one."""
        self.local_nets = list(nets)
        self.tables = {v: _LocalTable(f, self.local_nets, self.tables.get(v))
                       for v, f in FAMILIES.items()}
        self._caches()

    def _caches(self):
        self.cache4, self.cache6 = self.tables[4].cache, self.tables[6].cache

    @property
    def hosts4(self):
        return self.tables[4].hosts

    @property
    def hosts6(self):
        return self.tables[6].hosts

    def tracked(self):
        """How many local addresses are kept (not __len__: an empty table is no less
        a stage)."""
        return sum(len(t.hosts) for t in self.tables.values())

    def locate(self, key):
        """Slow path of the hot loop: an address not in the cache (first sight, or
        first frame since the last tick)."""
        version = family_of_key(key).version
        t = self.tables[version]
        if not _is_local(key, t.prefixes):
            if len(t.remote) >= LOCALITY_CACHE_MAX:
                # Forget the remote addresses seen so far; local ones come back on
                # their next frame.
                t.remote.clear()
                t.cache.clear()
            t.remote[key] = t.cache[key] = 0    # remote: falsy, but not None (unseen)
            return 0
        entry = t.hosts.get(key)
        if entry is None:
            entry = self.admit(version, key)
        t.dirty.add(key)
        t.cache[key] = entry
        return entry

    def admit(self, version, key):
        """A new address's counter list: the decoder's, or the eBPF engine's when the
        kernel counted it. A full table evicts first."""
        if self.tracked() >= self.local_max:
            self.evict()
        entry = self.tables[version].hosts[key] = [0, 0, 0, 0]
        return entry

    def evict(self):
        """The table is full: drop the addresses with the least traffic, an eighth of
        the table at once (so a flood costs a sort per local_max/8 newcomers)."""
        keep = self.local_max - max(1, self.local_max // LOCAL_EVICT_FRACTION)
        by_traffic = sorted((e[TX_BYTES] + e[RX_BYTES], v, k)
                            for v, t in self.tables.items() for k, e in t.hosts.items())
        for _, version, key in by_traffic[:max(0, len(by_traffic) - keep)]:
            self.forget(version, key)
            self.evictions += 1

    def forget(self, version, key):
        """Drop an address (idle or evicted): its series disappear from the exporters."""
        t = self.tables[version]
        for table in (t.hosts, t.cache, t.prev, t.active, t.rows, t.bps):
            table.pop(key, None)
        t.dirty.discard(key)

    def _row(self, version, key, bps):
        return ((version, key), *self.tables[version].hosts[key], *bps)

    def tick(self, now, covered=None):
        """Close an interval: bits per second over it, and idle expiry (an address
        that goes quiet reads 0, then disappears). `covered`, when the caller knows it,
        is when the counts end: a ring's last retired block, up to RING_RETIRE_MS before
        `now`; the rates divide by the time the counts cover, so an interval holding 12
        of the blocks and the next 13 both read the stream's rate."""
        end = now if covered is None else min(covered, now)
        elapsed = None if self.last_tick is None else end - self.last_tick
        self.last_tick = end
        work = 0
        for version, t in self.tables.items():
            moving = {}
            # In key order: a row's place in the tables is where it was first counted,
            # the same on every run (a set's order of bytes keys is the hash seed's).
            for key in sorted(t.dirty):
                e = t.hosts[key]
                tx0, rx0 = t.prev.get(key, (0, 0))
                if e[TX_BYTES] == tx0 and e[RX_BYTES] == rx0:
                    continue
                t.prev[key] = (e[TX_BYTES], e[RX_BYTES])
                t.active[key] = now
                t.active.move_to_end(key)
                moving[key] = ((e[TX_BYTES] - tx0) * 8 / elapsed,
                               (e[RX_BYTES] - rx0) * 8 / elapsed) if elapsed and elapsed > 0 \
                    else (0.0, 0.0)
                t.rows[key] = self._row(version, key, moving[key])
            for key in t.bps.keys() - moving.keys():         # moved last time, not now
                t.rows[key] = self._row(version, key, (0.0, 0.0))
            work += len(t.dirty) + len(t.bps)
            t.bps, t.dirty = moving, set()
            while t.active:
                key, last = next(iter(t.active.items()))
                if now - last < self.idle_timeout:
                    break
                self.forget(version, key)
                work += 1
            t.cache = dict(t.remote)            # local keys come back through locate()
        self._caches()
        self.work = work

    def snapshot(self):
        rows = []
        for version, t in self.tables.items():
            for key in sorted(t.dirty):         # counted since the tick: the counts now
                t.rows[key] = self._row(version, key, t.bps.get(key, (0.0, 0.0)))
            rows += t.rows.values()
        return AddressSnapshot(tuple(rows), self.evictions)


def addresses_document(snap, how, top=None):
    addresses = snap.get("addresses", AddressSnapshot())
    rows = []
    for r in _biggest(addresses.rows, top):
        a = address(r[0])
        rows.append({"address": str(a), "nic": how.label(a), **_io(r),
                     "tx_bps": r[5], "rx_bps": r[6]})
    return {**_envelope(snap, how), "tracked": len(addresses.rows),
            "evictions": addresses.evictions, "addresses": rows, **_cut(rows, len(addresses.rows))}


# (name, row index, help) of the per-address and per-interface counters.
ADDRESS_COUNTERS = (
    ("lpd_transmit_bytes", TX_BYTES, "Bytes sent by a local address."),
    ("lpd_transmit_packets", TX_PACKETS, "Packets sent by a local address."),
    ("lpd_receive_bytes", RX_BYTES, "Bytes received by a local address."),
    ("lpd_receive_packets", RX_PACKETS, "Packets received by a local address."))


# (name, index into (tx_bps, rx_bps), help) of localpacketdump's gauges.
RATE_GAUGES = (
    ("network_ip_tx_bps", 0, "Bits per second sent by a local address.",
     "network_ip_tx_bps_total", "Bits per second sent, per NIC."),
    ("network_ip_rx_bps", 1, "Bits per second received by a local address.",
     "network_ip_rx_bps_total", "Bits per second received, per NIC."))


def addresses_metrics(c, snap):
    """The local addresses' families (a row of STAGES): localpacketdump's rates, lpd's
    counters, what the eBPF engine could not attribute; then the interface's and the
    capture's, which the decoder counts inline with them (capture_metrics)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    family = metric_family
    label = c.mapping.labeller()
    addresses = snap.get("addresses", AddressSnapshot())
    hosts = []
    for row in addresses.rows:
        a = address(row[0])
        hosts.append((str(a), label(a), row[1:]))
    for name, i, doc, total_name, total_doc in RATE_GAUGES:
        yield family(GaugeMetricFamily, name, doc, ["local_ip", "nic"],
                     [((a, n), r[4 + i]) for a, n, r in hosts])
        per_nic = {}
        for _, n, r in hosts:
            per_nic[n] = per_nic.get(n, 0.0) + r[4 + i]
        yield family(GaugeMetricFamily, total_name, total_doc, ["nic"],
                     [((n,), v) for n, v in per_nic.items()])
    for name, i, doc in ADDRESS_COUNTERS:
        yield family(CounterMetricFamily, name, doc, ["local_ip", "nic"],
                     [((a, n), r[i]) for a, n, r in hosts])
    yield family(GaugeMetricFamily, "lpd_local_addresses", "Local addresses tracked.",
                 [], [((), len(addresses.rows))])
    yield family(CounterMetricFamily, "lpd_local_evictions",
                 "Local addresses dropped, least traffic first, because --local-max was reached.",
                 [], [((), addresses.evictions)])
    iface = snap.get("interface", InterfaceSnapshot())
    for unit, n in zip(("bytes", "packets"), iface.unattributed):
        yield family(CounterMetricFamily, f"lpd_local_unattributed_{unit}",
                     f"The {unit} of local addresses the eBPF engine's tables had no room "
                     "for (in the interface totals, not per address).", ["nic"], [((c.nic,), n)])
    yield from capture_metrics(c, snap)


def addresses_table(doc):
    """--output table's local addresses."""
    return ([f"\nlocal addresses: {doc['tracked']}\n"] +
            _columns(("local address",) + IO_COLUMNS,
                     [[d["address"]] + _io_cells(d) for d in doc["addresses"]], IO_COLUMNS))


def _local_addresses(opts, w, built):
    return LocalAddresses(w.local_nets, w.idle_timeout, w.local_max)


STAGES.append(Stage(LocalAddresses, _local_addresses, (("addresses", addresses_document),),
                    addresses_metrics, addresses_table))


###############################################################################
# 14.2 Remote addresses #######################################################
# provides: exported_remotes, REMOTE_TRIM_FACTOR, REMOTE_WEIGHT, RemoteAddresses

# The table trims to --remote-max when it holds this many times as many: a sort per
# remote_max newcomers, so a flood of spoofed sources costs O(log n) per address.
REMOTE_TRIM_FACTOR = 2
REMOTE_WEIGHT = 4                 # entry index: bytes inherited when it entered the table


class RemoteAddresses(Consumer):
    """Bytes and frames per remote address, both directions, in bounded memory.

    Space-saving (Metwally, Agrawal, El Abbadi 2005), trimmed in batches: a newcomer
    inherits `floor`, the most bytes any evicted remote had (counted plus inherited),
    and a full table keeps the remote_max heaviest by that weight. So for every remote
    its exported bytes (counted since it last entered) <= its true bytes <= exported +
    its inherited `error`, and a remote that is not tracked carried at most `floor`
    bytes: a big talker stays, a flood of one-frame sources churns below it. The
    totals count every frame, whatever was evicted.

    consume() touches the table through `cache`, the entries counted since the last
    snapshot: a snapshot rebuilds the rows of those only. A follower (--names, 15.2,
    calls follow()) takes at its tick the entries counted since it last took them
    (take_counted()): `cache`, and `counted`, where each snapshot leaves its cache.
    """
    name = "remotes"
    snapshot_type = RemoteSnapshot
    wants = frozenset((WANT_REMOTE,))

    def __init__(self, remote_max=DEFAULT_REMOTE_MAX):
        self.remote_max = remote_max
        self.table = {}                 # key -> [tx_b, tx_p, rx_b, rx_p, inherited bytes]
        self.cache = {}                 # key -> entry, for keys counted since the last snapshot
        self.rows = {}                  # key -> its snapshot row
        self.totals = [0, 0, 0, 0]
        self.evictions = 0
        self.floor = 0
        self.counted = None             # key -> entry counted since take_counted(), with a follower

    def follow(self):
        self.counted = {}

    def take_counted(self):
        """key -> entry of (at least) every remote counted since the last call, which
        may have evicted some since: a follower compares the entry with the table's."""
        counted, self.counted = self.counted, {}
        counted.update(self.cache)
        return counted

    def consume(self, batch):
        get, touch, totals = self.cache.get, self.touch, self.totals
        for at, frames in ((TX_BYTES, batch.remote_tx), (RX_BYTES, batch.remote_rx)):
            nbytes = nframes = 0
            for key, b, n in frames:
                e = get(key)
                if e is None:
                    e = touch(key)
                e[at] += b
                e[at + 1] += n
                nbytes += b
                nframes += n
            totals[at] += nbytes
            totals[at + 1] += nframes

    def touch(self, key):
        """The entry of a remote not counted since the last snapshot (new ones enter)."""
        e = self.table.get(key)
        if e is None:
            if len(self.table) >= REMOTE_TRIM_FACTOR * self.remote_max:
                self.trim()
            e = self.table[key] = [0, 0, 0, 0, self.floor]
        self.cache[key] = e
        return e

    def trim(self):
        """Keep the remote_max heaviest; the heaviest evicted one raises the floor."""
        def weight(item):
            e = item[1]
            return e[TX_BYTES] + e[RX_BYTES] + e[REMOTE_WEIGHT]
        ranked = sorted(self.table.items(), key=weight, reverse=True)
        evicted = ranked[self.remote_max:]
        if evicted:
            self.floor = max(self.floor, weight(evicted[0]))
        for key, _ in evicted:
            del self.table[key]
            self.cache.pop(key, None)
            self.rows.pop(key, None)
            if self.counted is not None:
                self.counted.pop(key, None)
        self.evictions += len(evicted)

    def tracked(self):
        return len(self.table)

    def snapshot(self):
        rows = self.rows
        for key, e in self.cache.items():
            rows[key] = ((family_of_key(key).version, key), *e)
        if self.counted is not None:
            self.counted.update(self.cache)
        self.cache = {}
        return RemoteSnapshot(tuple(rows.values()), tuple(self.totals), self.evictions, self.floor)


def remotes_document(snap, how, top=None):
    remotes = snap.get("remotes")
    if remotes is None:
        return None
    names = snap.get("names")               # --names (15.3): the name each was looked up by
    named = names.by_key() if names is not None else None
    rows = []
    for r in _biggest(remotes.rows, top):
        country, province, city, isp = how.geo(r[0])
        rows.append({"address": str(address(r[0])),
                     **({"name": named.get(r[0], "")} if named is not None else {}),
                     "country": country, "province": province,
                     "city": city, "isp": isp, **_io(r), "error_bytes": r[5]})
    return {**_envelope(snap, how), "tracked": len(remotes.rows), "evictions": remotes.evictions,
            "error_bound_bytes": remotes.floor, "threshold_bytes": how.threshold,
            "totals": _io((None, *remotes.totals)), "remotes": rows, **_cut(rows, len(remotes.rows))}


# ip_traffic_monitor_cli's series: (name, row index, help), labels REMOTE_LABELS.
REMOTE_SERIES = (
    ("ip_traffic_tx_bytes", 1 + TX_BYTES, "Total transmitted bytes per IP address"),
    ("ip_traffic_rx_bytes", 1 + RX_BYTES, "Total received bytes per IP address"))


REMOTE_LABELS = ["remote_ip", "country", "province", "city", "isp"]


REMOTE_TOTALS = (
    ("lpd_remote_transmit_bytes", TX_BYTES, "Bytes sent to remote addresses (every one, tracked or not)."),
    ("lpd_remote_transmit_packets", TX_PACKETS, "Packets sent to remote addresses."),
    ("lpd_remote_receive_bytes", RX_BYTES, "Bytes received from remote addresses (every one)."),
    ("lpd_remote_receive_packets", RX_PACKETS, "Packets received from remote addresses."))


def exported_remotes(c, remotes):
    """The rows of the remotes with their own ip_traffic_* series (past -t)."""
    return [r for r in remotes.rows if r[1 + TX_BYTES] + r[1 + RX_BYTES] > c.threshold]


def remotes_metrics(c, snap):
    """The remote addresses' families (a row of STAGES): ip_traffic_monitor_cli's series
    of the remotes past the threshold, lpd's totals; none without --remote."""
    from prometheus_client.core import CounterMetricFamily as counter, GaugeMetricFamily as gauge
    remotes = snap.get("remotes")
    if remotes is None:
        return
    family, geo, nic = metric_family, remote_labeller(c.geo), c.nic
    exported = [(r, (str(address(r[0])), *geo(r[0]))) for r in exported_remotes(c, remotes)]
    for name, i, doc in REMOTE_SERIES:
        yield family(counter, name, doc, REMOTE_LABELS, [(labels, r[i]) for r, labels in exported])
    for name, i, doc in REMOTE_TOTALS:
        yield family(counter, name, doc, ["nic"], [((nic,), remotes.totals[i])])
    yield family(gauge, "lpd_remote_addresses", "Remote addresses tracked.", ["nic"],
                 [((nic,), len(remotes.rows))])
    yield family(counter, "lpd_remote_evictions",
                 "Remote addresses dropped from the table (space-saving: the lightest).",
                 ["nic"], [((nic,), remotes.evictions)])
    yield family(gauge, "lpd_remote_error_bound_bytes",
                 "Most bytes an untracked remote carried; an exported one may lack up to this.",
                 ["nic"], [((nic,), remotes.floor)])
    if c.geo is not None:
        yield family(counter, "lpd_geoip_errors",
                     "GeoIP failures: databases that failed to reopen, lookups that failed.",
                     [], [((), c.geo.errors)])


def remotes_table(doc):
    """--output table's remote addresses, with their GeoIP labels (and names, where
    --names gave any)."""
    named = any(d.get("name") for d in doc["remotes"])
    return ([f"\nremote addresses: {doc['tracked']} tracked, "
             f"{doc['evictions']} evicted; all remotes: "
             f"tx {_amount(doc['totals']['tx_bytes'], ' bytes')}, "
             f"rx {_amount(doc['totals']['rx_bytes'], ' bytes')}\n"] +
            _columns(("remote address",) + ("name",) * named + ("country", "province", "city", "isp")
                     + IO_COLUMNS,
                     [[d["address"]] + [d.get("name", "")] * named + [d["country"], d["province"], d["city"],
                                                              d["isp"]] +
                      _io_cells(d) for d in doc["remotes"]], IO_COLUMNS))


def _remote_addresses(opts, w, built):
    return RemoteAddresses(opts.remote_max) if opts.remote else None


STAGES.append(Stage(RemoteAddresses, _remote_addresses, (("remotes", remotes_document),),
                    remotes_metrics, remotes_table))


###############################################################################
# 14.3 Connections (Zeek's conn.log semantics) ################################
# provides: connection_uid, Connections, conn_key, LIVE_STATES, OFFLOAD_*, proto_name,
#   SEQ_HALF, SEQ_MOD, TH_*
#
# One entry per TCP or UDP connection, whichever way a frame travels, with Zeek's
# endpoint state machine, history letters, payload sizes from sequence numbers,
# orientation and timers (src/analyzer/protocol/tcp, scripts/base/protocols/conn in
# zeek/zeek), on the packet clock. What lpd leaves out: checksums are not verified
# (Zeek's -C), and nothing here reassembles streams, so no 'G' letters, missed
# bytes or application-layer role flips.

FRAGMENTS_MAX = 4096              # datagrams whose later fragments lpd waits for; then it starts over
TH_FIN, TH_SYN, TH_RST, TH_ACK = 0x01, 0x02, 0x04, 0x10
SEQ_MOD = 1 << 32
SEQ_HALF = 1 << 31
SEQ_JUMP_MAX = 1 << 20          # a SYN or RST this far from the last seq, or an ACK 0, is not a step
# Every IP protocol has connections (flows: addresses and protocol); TCP, UDP and ICMP
# (both families, Zeek's one "icmp") are Zeek's transports, with ports, states and
# conn.log lines. A connection's transport keys its timeout, its place among the active
# and its counts; any other protocol is TRANSPORT_OTHER, outside the 8-bit protocol range.
TRANSPORT_OTHER = 256
TRANSPORTS = {IPPROTO_TCP: IPPROTO_TCP, IPPROTO_UDP: IPPROTO_UDP, IPPROTO_ICMP: IPPROTO_ICMP,
              IPPROTO_ICMPV6: IPPROTO_ICMP}
PROTO_NAMES = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_ICMP: "icmp",
               TRANSPORT_OTHER: "other"}


def proto_name(proto):
    """Zeek's name of a protocol's transport (tcp, udp, icmp), else its number."""
    transport = TRANSPORTS.get(proto)
    return PROTO_NAMES[transport] if transport else str(proto)


# TCP endpoint states (Zeek's TCP_ENDPOINT_*); UDP uses INACTIVE and ACTIVE.
(TCP_INACTIVE, TCP_SYN_SENT, TCP_SYN_ACK_SENT, TCP_PARTIAL, TCP_ESTABLISHED, TCP_CLOSED,
 TCP_RESET) = range(7)
UDP_ACTIVE = TCP_ESTABLISHED
TCP_NO_SYN_ACK = (TCP_INACTIVE, TCP_PARTIAL)         # conn_state's "inactive" sides

# Zeek's timers (init-bare.zeek): a closed connection lingers for late frames; an
# unanswered SYN gives up; then the inactivity timeouts (--conn-timeout-*).
CONN_CLOSE_DELAY = 5.0
CONN_ATTEMPT_DELAY = 5.0
CONN_LARGEST_KEPT = 20           # finished connections kept for the tables, biggest first
# A timer's heap entry dies when its connection ends, is re-armed or is answered (an
# attempt timer): it stays in the heap until popped, at no cost to the expiry budget, and
# the heap is swept once the dead exceed this fraction of it (and TIMERS_MIN). So a flood
# leaves at most a quarter of dead entries for a pass to skip, nothing keeps an evicted
# connection in memory, and a sweep's O(n) is paid for by the n/4 deaths before it.
TIMERS_DEAD_FRACTION = 4
TIMERS_MIN = 64
# Live timers one expiry pass handles at most (most end a connection: a log record): the
# rest wait for the next pass, so a mass timeout never holds the ring for seconds.
EXPIRE_BUDGET = 4096

# History letters (Zeek's HIST_* masks): orig's bit, resp's is 16 higher; a letter is
# added once per side, but SYN, FIN and RST again for a new sequence number, and the
# scaled ones (T, W) again at 10, 100, 1000 ... occurrences.
HIST_SYN, HIST_FIN, HIST_RST, HIST_FIN_RST, HIST_DATA, HIST_ACK, HIST_MULTI = (
    0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40)
HIST_RESP_SHIFT = 16
HIST_SCALE = 10
HISTORY_MAX = 256                 # letters kept per connection (Zeek's histories are a dozen)

# Zeek's likely_server_ports with the default scripts: a first frame that is not a
# pure SYN, sent from one of these, is taken for the responder's.
LIKELY_SERVER_PORTS = {
    IPPROTO_TCP: frozenset((21, 22, 25, 53, 79, 80, 81, 88, 135, 139, 143, 389, 443, 445, 465, 502,
                            514, 563, 585, 587, 614, 631, 636, 989, 990, 992, 993, 995, 1080, 1434,
                            1883, 2811, 3128, 3268, 3306, 3389, 5222, 5223, 5269, 5432, 6379, 6666,
                            6667, 6668, 6669, 8000, 8080, 8888, 20000)),
    IPPROTO_UDP: frozenset((53, 67, 88, 123, 137, 161, 162, 389, 443, 514, 1812, 2123, 2152, 3389,
                            3544, 4011, 4754, 4789, 5060, 5072, 5353, 5355, 6081, 20000)),
}
IPV4_BROADCAST = b"\xff\xff\xff\xff"
RSTOS0_HISTORY = re.compile(r"\^?S[^HAFGIQ]*R.*")
CONN_STATES = ("S0", "S1", "SF", "REJ", "S2", "S3", "RSTO", "RSTR", "RSTOS0", "RSTRH", "SH", "SHR", "OTH")
LIVE_STATES = ("connecting", "established", "closing", "reset")
EVICTION_REASONS = ("half_open", "oldest")
# Why a connection's flow report is made: RFC 5102's flowEndReason values (IPFIX's 136).
END_IDLE, END_ACTIVE, END_DETECTED, END_FORCED, END_EVICTED = 1, 2, 3, 4, 5

# Services (Zeek's conn.log `service`): the protocols a connection's payload shows, as
# Zeek's dynamic protocol detection (base/frameworks/dpd, each protocol's dpd.sig) names
# them, not its ports. Zeek matches a direction's reassembled stream, its analyzer parses
# on to confirm; here each direction's first payload-bearing packet is looked at, once (its
# first SERVICE_BYTES): a connection that opens with something else (STARTTLS, a proxy's
# CONNECT) shows only that. Zeek's port-registered UDP analyzers become structural checks
# of the first datagram, on their ports where the payload cannot tell (NTP's 48 bytes: a
# DNS query passes; DHCP: its cookie at 236 is past the copy). SERVICE_BYTES, and so what
# --connections copies past the headers: the most a check reads, TLS's ServerHello behind
# an alert (Zeek's dpd_ssl_server: 7 bytes of alert, then record header, handshake type and
# length, version: 11); the longest HTTP method and its space take 17, DNS 13, QUIC 6.
SERVICE_BYTES = 18
_HTTP_METHODS = (b"OPTIONS|GET|HEAD|POST|PUT|DELETE|ACL|BASELINE-CONTROL|BIND|CHECKIN|CHECKOUT|CONNECT|"
                 b"COPY|LABEL|LINK|LOCK|MERGE|MKACTIVITY|MKCALENDAR|MKCOL|MKREDIRECTREF|MOVE|ORDERPATCH|"
                 b"PATCH|PROPFIND|PROPPATCH|REBIND|REPORT|SEARCH|TRACE|UNBIND|UNCHECKOUT|UNLINK|UNLOCK|"
                 b"UPDATE|VERSION-CONTROL|BCOPY|BDELETE|BMOVE|BPROPFIND|BPROPPATCH|NOTIFY|POLL|"
                 b"SUBSCRIBE|UNSUBSCRIBE|X-MS-ENUMATTS|MKWORKSPACE|RPC_IN_DATA|RPC_OUT_DATA")
SERVICE_DNS_HDR = struct.Struct("!HHHHHH")   # id, flags, questions, answers, authority, additional
DNS_OPCODES = frozenset((0, 1, 2, 4, 5))     # query, inverse, status, notify, update
DNS_QUERY_CLEAR = 0x804F                     # flags a query has clear: QR, Z, RCODE
DNS_LABEL = re.compile(rb"[-_0-9A-Za-z]*")   # a label's bytes in a host or service name
NTP_MIN, DHCP_MIN = 48, 240                  # an NTP time packet; BOOTP's fixed part and cookie
NTP_MODE_MIN = {6: 12, 7: 8}                 # control and private messages: their headers' lengths
DHCP_STARTS = (b"\x01\x01\x06", b"\x02\x01\x06")   # op 1 or 2, Ethernet, 6-byte addresses


def _starts(pattern):
    """A check that a direction's first bytes match a dpd.sig payload regex (Zeek's
    [[:space:]] is \\s) from their start."""
    match = re.compile(pattern, re.DOTALL).match
    return lambda head, size: match(head) is not None


def _dns_query(head, size):
    """A DNS query (Zeek's DNS analyzer confirms by parsing): QR, Z and RCODE clear, a
    known opcode, one question, under 256 records in each other section, a name that is
    the root or starts with a label of a host name's characters (as far as the copy goes)."""
    if len(head) <= SERVICE_DNS_HDR.size:
        return False
    _, flags, qd, an, ns, ar = SERVICE_DNS_HDR.unpack_from(head)
    n, at = head[SERVICE_DNS_HDR.size], SERVICE_DNS_HDR.size + 1
    return not flags & DNS_QUERY_CLEAR and flags >> 11 & 15 in DNS_OPCODES and qd == 1 and \
        (an | ns | ar) < 256 and n < 64 and DNS_LABEL.fullmatch(head[at:at + n]) is not None


def _ntp(head, size):
    """NTP versions 1-4: a time packet (modes 1-5, 48 bytes or more, stratum at most 16),
    or a control or private message (modes 6, 7) as long as its header."""
    mode = head[0] & 7 if len(head) > 1 and 1 <= head[0] >> 3 & 7 <= 4 else 0
    return size >= NTP_MODE_MIN[mode] if mode in NTP_MODE_MIN else \
        mode != 0 and size >= NTP_MIN and head[1] <= 16


def _dhcp(head, size):
    return size >= DHCP_MIN and head[:3] in DHCP_STARTS


# service -> transport, ports (None: any; else one end's must be one), checks of the
# originator's and the responder's first payloads (None: not looked at; a check takes its
# first SERVICE_BYTES and the payload's length), whether both must pass (Zeek's
# requires-reverse-signature) or either will do.
SERVICES = (
    ("ssh", IPPROTO_TCP, None, _starts(rb"[sS][sS][hH]-"), _starts(rb"[sS][sS][hH]-"), True),
    ("http", IPPROTO_TCP, None, _starts(rb"\s*(" + _HTTP_METHODS + rb") "),
     _starts(rb"[hH][tT][tT][pP]/[0-9]"), False),
    ("ssl", IPPROTO_TCP, None,
     _starts(rb"\x16\x03[\x00-\x03]..\x01...\x03[\x00-\x03]|...?\x01[\x00\x03][\x00-\x03]"),
     _starts(rb"(\x15\x03[\x00-\x03]....)?\x16\x03[\x00-\x03]..\x02...\x03[\x00-\x03]|...?\x04..\x00\x02"),
     True),
    ("smtp", IPPROTO_TCP, None, _starts(rb"\s*([hH][eE][lL][oO]|[eE][hH][lL][oO])"),
     _starts(rb"\s*220[\s-]"), True),
    ("ftp", IPPROTO_TCP, None, _starts(rb" *[uU][sS][eE][rR] "),
     _starts(rb"[\n\r ]*(120|220)[^0-9]"), True),
    ("dns", IPPROTO_UDP, None, _dns_query, None, False),
    ("ntp", IPPROTO_UDP, frozenset((123,)), _ntp, _ntp, False),
    ("dhcp", IPPROTO_UDP, frozenset((67, 68)), _dhcp, _dhcp, False),
    # QUIC v1: a client's Initial (long header, type 0, DCID <= 20 bytes), a long header back
    ("quic", IPPROTO_UDP, None, _starts(rb"[\xc0-\xcf]\x00\x00\x00\x01[\x00-\x14]"),
     _starts(rb"[\xc0-\xff]\x00\x00\x00\x01"), True),
)
# What the stage reads: Ethernet, two tags, the longest IPv4 and TCP headers, SERVICE_BYTES.
CONN_SNAPLEN = ETH_HLEN + 2 * VLAN_TAG_LEN + 60 + 60 + SERVICE_BYTES


UID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
UID_BITS = 96                       # Zeek's uid: "C" and 96 random bits in base 62
# Fixed, so that a capture replayed gives the same uids on every run (-r's output is
# reproducible, as its counts are); a uid shows nothing its log line does not.
UID_SALT = b"lpd connection uid"


def connection_uid(key, first):
    """Zeek's uid ("C" + base 62) of the connection with table key `key` that began at
    `first`: computed, not stored, the same wherever it is asked for (conn.log, dns.log,
    /api/connections), so the logs join on it as Zeek's do. first None: the key's alone
    (a stage that sees a flow without --connections)."""
    digest = hashlib.blake2b(repr((key, first)).encode(), key=UID_SALT,
                             digest_size=UID_BITS // 8).digest()
    n, out = int.from_bytes(digest, "big"), []
    while n:
        n, d = divmod(n, len(UID_ALPHABET))
        out.append(UID_ALPHABET[d])
    return "C" + "".join(reversed(out))


def conn_key(proto, src, sport, dst, dport):
    """The connection table's key of a packet: the same both ways."""
    return (proto, src, sport, dst, dport) if (src, sport) <= (dst, dport) else \
        (proto, dst, dport, src, sport)


def _seq_delta(a, b):
    """a - b in sequence space (signed 32-bit)."""
    d = (a - b) % SEQ_MOD
    return d - SEQ_MOD if d >= SEQ_HALF else d


class _End:
    """One side of a connection: Zeek's TCP_Endpoint (or a UDP side), and its counts.
    Besides Zeek's counts (pkts and ip_bytes count a fragmented datagram once, whole), a
    flow's (RFC 7012: every packet, its IP length) and what the last flow report took."""
    __slots__ = ("state", "prev", "start", "last", "ack", "seq_wraps", "ack_wraps", "fins",
                 "did_close", "pkts", "ip_bytes", "wire_bytes", "payload_bytes", "last_syn",
                 "last_fin", "last_rst", "scaled", "frag_pkts", "frag_hdr_bytes", "since",
                 "until", "flags", "tos", "vlan", "icmp", "reported_pkts", "reported_bytes",
                 "head")

    def __init__(self):
        self.state = self.prev = TCP_INACTIVE
        self.start = self.last = self.ack = 0
        self.seq_wraps = self.ack_wraps = self.fins = 0
        self.did_close = False
        self.pkts = self.ip_bytes = self.wire_bytes = self.payload_bytes = 0
        self.last_syn = self.last_fin = self.last_rst = 0
        self.scaled = None                          # letter -> occurrences (T, W), once there are any
        self.frag_pkts = self.frag_hdr_bytes = 0    # later fragments: packets, IP headers
        self.since = None                           # first frame since the last report, or None
        self.until = 0.0                            # last frame
        self.flags = 0                              # TCP flags since the last report
        self.tos = self.vlan = self.icmp = 0        # of its first frame (ICMP: type << 8 | code)
        self.reported_pkts = self.reported_bytes = 0
        self.head = None                            # (first SERVICE_BYTES of payload, length); () judged

    def flow_counts(self):
        """(packets, octets) as a flow counts them: every packet, its whole IP length."""
        return self.pkts + self.frag_pkts, self.ip_bytes + self.frag_hdr_bytes

    def set_state(self, state):
        if state != self.state:
            self.prev, self.state = self.state, state

    def init_seq(self, seq, syn):
        """The first frame this side sends (Zeek's init_endpoint): a partial connection
        pretends a SYN one below its first byte."""
        self.start = self.ack = seq if syn else (seq - 1) % SEQ_MOD
        self.last = seq if not syn else self.start

    def move_last(self, end):
        if end < self.last:
            self.seq_wraps += 1
        self.last = end

    def move_ack(self, ack):
        if ack < self.ack:
            self.ack_wraps += 1
        self.ack = ack

    def size(self, peer):
        """Payload bytes from sequence numbers (Zeek's TCP_Endpoint::Size)."""
        if self.prev == TCP_SYN_SENT and self.state == TCP_RESET and peer.state == TCP_INACTIVE \
                and _seq_delta(self.ack, self.start) > 1:
            return 0                                # a RST injected into a half-open connection
        size = max((self.seq_wraps << 32) + self.last, (self.ack_wraps << 32) + self.ack) - self.start
        if size:
            size -= 1                               # the SYN's octet
        if self.fins and size:
            size -= 1                               # the FIN's octet
        return max(size, 0)


def connection_services(c):
    """The services (SERVICES) c's first payloads confirm, comma-joined as Zeek's conn.log
    writes them, or None; asked once per direction, when its first payload comes."""
    o, r, found = c.o.head, c.r.head, []
    for name, transport, ports, orig, resp, both in SERVICES:
        if transport != c.proto or both and (o is None or r is None) or \
                ports and c.orig_p not in ports and c.resp_p not in ports:
            continue                               # another transport, a side to wait for, other ports
        ok_o = o is not None and orig(*o)
        if (ok_o and resp(*r)) if both else (ok_o or resp is not None and r is not None and resp(*r)):
            found.append(name)
    return ",".join(found) or None


# Connection.offloaded: which of its directions the kernel counts (FlowOffload).
OFFLOAD_ORIG, OFFLOAD_RESP = 1, 2


class Connection:
    """One connection: its originator and responder ends and its history."""
    __slots__ = ("key", "proto", "transport", "orig_h", "orig_p", "resp_h", "resp_p", "o", "r",
                 "history", "seen", "first", "last", "midstream", "live", "pid", "comm", "timer",
                 "attempt", "half_open", "offloaded", "since", "service")

    def __init__(self, key, proto, src, sport, dst, dport, ts):
        self.key, self.proto = key, proto
        self.transport = TRANSPORTS.get(proto, TRANSPORT_OTHER)
        self.since = ts                              # the current flow report's start
        self.orig_h, self.orig_p, self.resp_h, self.resp_p = src, sport, dst, dport
        self.o, self.r = _End(), _End()
        self.history, self.seen = [], 0
        self.first = self.last = ts
        self.midstream = False
        self.live = "connecting"
        self.pid = self.comm = None
        self.timer = 0                               # the seq of its armed heap entry; 0: none
        self.attempt = False                         # that entry is the attempt timer
        self.half_open = False
        self.offloaded = 0                           # OFFLOAD_ORIG | OFFLOAD_RESP: counted in the kernel
        self.service = None                          # "ssl", "dns,..." once confirmed (SERVICES)

    def flip(self):
        """Zeek's FlipRoles: the ends and addresses swap, the history's seen-bits do not."""
        self.orig_h, self.orig_p, self.resp_h, self.resp_p = self.resp_h, self.resp_p, self.orig_h, self.orig_p
        self.o, self.r = self.r, self.o
        self.add("^")

    def add(self, letter):
        """A history letter; a hostile peer repeating FINs or RSTs stops at HISTORY_MAX."""
        if len(self.history) < HISTORY_MAX:
            self.history.append(letter)

    def check(self, mask, letter, is_orig):
        """Add a letter once per side; True if it was there already."""
        bit = mask if is_orig else mask << HIST_RESP_SHIFT
        if self.seen & bit:
            return True
        self.seen |= bit
        self.add(letter if is_orig else letter.lower())
        return False

    def scaled(self, end, letter, is_orig):
        """T and W: again at 10, 100, 1000 ... occurrences."""
        if end.scaled is None:
            end.scaled = {}
        n = end.scaled.get(letter, 0) + 1
        end.scaled[letter] = n
        while n % HIST_SCALE == 0:
            n //= HIST_SCALE
        if n == 1:
            self.add(letter if is_orig else letter.lower())

    def conn_state(self):
        """Zeek's conn_state (base/protocols/conn/main.zeek)."""
        o, r = self.o.state, self.r.state
        if self.proto == IPPROTO_UDP:
            if o == UDP_ACTIVE:
                return "SF" if r == UDP_ACTIVE else "S0"
            return "SHR" if r == UDP_ACTIVE else "OTH"
        if self.proto != IPPROTO_TCP:
            return "OTH"
        o_inactive, r_inactive = o in TCP_NO_SYN_ACK, r in TCP_NO_SYN_ACK
        if r == TCP_RESET:
            if o in (TCP_SYN_SENT, TCP_SYN_ACK_SENT) or \
                    (o == TCP_RESET and self.orig_bytes() == 0 and self.resp_bytes() == 0):
                return "REJ"
            return "RSTRH" if o_inactive else "RSTR"
        if o == TCP_RESET:
            if r_inactive:
                return "RSTOS0" if RSTOS0_HISTORY.fullmatch("".join(self.history)) else "OTH"
            return "RSTO"
        if o == TCP_CLOSED and r == TCP_CLOSED:
            return "SF"
        if o == TCP_CLOSED:
            return "SH" if r_inactive else "S2"
        if r == TCP_CLOSED:
            return "SHR" if o_inactive else "S3"
        if o == TCP_SYN_SENT and r == TCP_INACTIVE:
            return "S0"
        if o == TCP_ESTABLISHED and r == TCP_ESTABLISHED:
            return "S1"
        return "OTH"

    def orig_bytes(self):
        if self.proto != IPPROTO_TCP:
            return self.o.payload_bytes
        return self.o.size(self.r)

    def resp_bytes(self):
        if self.proto != IPPROTO_TCP:
            return self.r.payload_bytes
        return self.r.size(self.o)

    def closed_fully(self):
        """Zeek's complete close: a RST, both FINs, or a FIN from one side of a peer
        that never sent."""
        o, r = self.o, self.r
        if not (o.did_close or r.did_close):
            return False
        return TCP_RESET in (o.state, r.state) or (o.did_close and r.did_close) or \
            (o.did_close and r.state == TCP_INACTIVE) or (r.did_close and o.state == TCP_INACTIVE)

    def live_state(self):
        """XNet's view: connecting, established, closing or reset."""
        o, r = self.o.state, self.r.state
        if self.proto != IPPROTO_TCP:
            return "established" if o == r == UDP_ACTIVE else "connecting"
        if TCP_RESET in (o, r):
            return "reset"
        if TCP_CLOSED in (o, r):
            return "closing"
        if (o in (TCP_SYN_SENT, TCP_SYN_ACK_SENT) or r in (TCP_SYN_SENT, TCP_SYN_ACK_SENT)) and \
                TCP_ESTABLISHED not in (o, r):
            return "connecting"
        return "established"

    def record(self):
        """The conn.log line, Zeek's field names (duration and sizes only when > 0 s,
        service when one was confirmed)."""
        rec = {"ts": round(self.first, 6), "uid": connection_uid(self.key, self.first),
               "id.orig_h": raw_address(self.orig_h), "id.orig_p": self.orig_p,
               "id.resp_h": raw_address(self.resp_h), "id.resp_p": self.resp_p,
               "proto": PROTO_NAMES[self.transport]}
        if self.service:
            rec["service"] = self.service
        duration = self.last - self.first
        if duration > 0:
            rec.update({"duration": round(duration, 6), "orig_bytes": self.orig_bytes(),
                        "resp_bytes": self.resp_bytes()})
        rec.update({"conn_state": self.conn_state(), "history": "".join(self.history),
                    "orig_pkts": self.o.pkts, "orig_ip_bytes": self.o.ip_bytes,
                    "resp_pkts": self.r.pkts, "resp_ip_bytes": self.r.ip_bytes})
        if self.pid is not None:
            rec["pid"], rec["comm"] = self.pid, self.comm
        return rec

    def row(self):
        """The snapshot row of an open connection."""
        return (self.key, self.proto, self.orig_h, self.orig_p, self.resp_h, self.resp_p,
                self.live, "".join(self.history), self.orig_bytes(), self.resp_bytes(),
                self.o.pkts, self.r.pkts, self.o.wire_bytes, self.r.wire_bytes,
                self.first, self.last, self.midstream, self.pid, self.comm, self.service)


class ConnectionSnapshot(NamedTuple):
    """Open connections (Connection.row() tuples), how many per (proto, live state),
    finished per (proto, conn_state) and evicted per reason, and the biggest finished."""
    rows: tuple = ()
    live: tuple = ()                       # ((proto name, state, n), ...)
    closed: tuple = ()                     # ((proto name, conn_state, n), ...)
    evictions: tuple = ()                  # ((reason, n), ...)
    largest: tuple = ()                    # conn.log records, biggest first

    def merge(self, other):
        return ConnectionSnapshot(self.rows + other.rows, _merge_keyed(self.live, other.live, 2),
                                  _merge_keyed(self.closed, other.closed, 2),
                                  _merge_keyed(self.evictions, other.evictions, 1),
                                  tuple(sorted(self.largest + other.largest, key=_record_bytes,
                                               reverse=True)[:CONN_LARGEST_KEPT]))

    def retired(self):
        """What stays of a dead worker's: its finished connections, not its open ones."""
        return self._replace(rows=(), live=())


def _record_bytes(rec):
    return rec["orig_ip_bytes"] + rec["resp_ip_bytes"]


class Connections(Consumer):
    """The flow table: Zeek's per-packet TCP processing in the order Zeek does it
    (orientation, reuse, sequence init, history, window, time, ACK, last seq, state
    machine, counts), timers on the packet clock, and a bound that evicts half-open
    connections (a SYN flood) before any other.

    `finished(record)` receives every finished connection's conn.log record (TCP, UDP
    and ICMP: Zeek's scope; another protocol's connection has none);
    `wants_process(conn)` (optional) is told of each new one, for pid and comm;
    `report(conn, reason)` (optional: flow export) is told what a connection counted
    since its last report, once `active_timeout` seconds of it have gone by (before
    the frame that crosses it is counted) and when it ends (reason: END_*).
    `offload` (set by the eBPF engine: FlowOffload) takes a UDP direction on its second
    frame, to count it in the kernel from then on: take(c, is_orig, src, dst, sport,
    dport), refresh(c) (True when the kernel counted more since), release(c) (the
    kernel's last counts, before c's record); it reports what it counted through
    credited(c).
    """
    name = "connections"
    snapshot_type = ConnectionSnapshot
    wants = frozenset((WANT_RAW, WANT_TS))

    def __init__(self, conn_max=DEFAULT_CONN_MAX, timeout_tcp=DEFAULT_CONN_TIMEOUT_TCP,
                 timeout_udp=DEFAULT_CONN_TIMEOUT_UDP, finished=None, wants_process=None):
        self.conn_max = conn_max
        # Zeek's: ICMP's inactivity timeout is UDP's; so is any other protocol's here.
        self.timeouts = {IPPROTO_TCP: timeout_tcp, IPPROTO_UDP: timeout_udp,
                         IPPROTO_ICMP: timeout_udp, TRANSPORT_OTHER: timeout_udp}
        self.finished, self.wants_process = finished, wants_process
        self.report, self.active_timeout = None, math.inf
        # conns by the start of their current report, oldest first (flow export only):
        # a quiet one is reported by tick(), a busy one by its next frame
        self.reporting = collections.OrderedDict()
        self.table = {}
        # proto -> OrderedDict key -> conn, least recently active first: idle expiry and
        # the "oldest" eviction look at the front only.
        self.activity = {p: collections.OrderedDict() for p in PROTO_NAMES}
        self.half_open = collections.OrderedDict()   # connections no responder answered, least active first
        self.timers = []                              # heap of (due, seq, conn)
        self.timers_dead = 0                          # entries whose seq is not their conn's timer
        self.timer_seq = 0
        self.next_due = math.inf
        self.live = {(p, s): 0 for p in PROTO_NAMES for s in LIVE_STATES}
        self.closed = {(p, s): 0 for p in PROTO_NAMES for s in CONN_STATES}
        self.evictions = dict.fromkeys(EVICTION_REASONS, 0)
        self.largest = []                             # heap of (bytes, seq, record)
        self.rows = {}
        self.touched = set()
        self.refreshed = collections.deque()          # conns given a pid by another thread
        self.fragments = {}                           # (src, dst, IPv4 id, proto) -> conn key
        self.now = 0.0
        self.offload = None

    def snaplen(self):
        return CONN_SNAPLEN

    def tracked(self):
        return len(self.table)

    # -- per frame ------------------------------------------------------------

    def consume(self, batch):
        packet = self.packet
        for data, ts, wire_bytes, frames, l2_len in frames_in_order(batch):
            packet(data, ts, wire_bytes, frames, l2_len)

    def packet(self, data, ts, wire_bytes, frames, l2_len):
        if ts >= self.next_due:
            self.expire(ts)
        if ts > self.now:
            self.now = ts
        f = parse_l4(data, wire_bytes if frames == 1 else None)
        if f is None:
            return
        if f[0] == IP_FRAGMENT:
            self.fragment(f, wire_bytes)
            return
        proto, src, dst, sport, dport, ip_len, plen, flags, seq, ack, window, frag_id, at = f
        key = conn_key(proto, src, sport, dst, dport)
        c = self.table.get(key)
        if c is not None:
            if proto == IPPROTO_TCP and flags & TH_SYN and self._reused(c, src, sport, flags, seq):
                self.end(c, END_DETECTED)
                c = None
            elif ts - c.since >= self.active_timeout:
                self.report_active(c, ts)
        if c is None:
            c = self._open(key, proto, src, sport, dst, dport, flags, ts)
        is_orig = src == c.orig_h and sport == c.orig_p
        e, p = (c.o, c.r) if is_orig else (c.r, c.o)
        states = c.o.state, c.r.state
        if proto == IPPROTO_TCP:
            self._tcp(c, e, p, is_orig, flags, seq, ack, window, plen, ts)
        else:
            if e.state == TCP_INACTIVE:
                e.set_state(UDP_ACTIVE)
                if proto == IPPROTO_UDP:
                    c.check(HIST_DATA, "D", is_orig)
            elif self.offload is not None and proto == IPPROTO_UDP and \
                    not c.offloaded & (OFFLOAD_ORIG if is_orig else OFFLOAD_RESP):
                self.offload.take(c, is_orig, src, dst, sport, dport)
            e.payload_bytes += plen
            c.last = ts
        # the counts follow the roles as they are after this frame (a flip moves them)
        e = c.o if (src == c.orig_h and sport == c.orig_p) else c.r
        if plen and e.head is None:                # once per direction: its first payload
            e.head = bytes(data[at:at + min(plen, SERVICE_BYTES)]), plen   # a copy: data is the ring's
            c.service = connection_services(c)
            if c.o.head is not None and c.r.head is not None:
                c.o.head = c.r.head = ()           # both judged: their bytes are not needed again
        if e.since is None:
            e.since = ts
            e.tos, e.vlan = ip_tos_vlan(data)
            if c.transport == IPPROTO_ICMP:
                e.icmp = sport << 8 | (dport if sport not in ICMP_COUNTERPARTS[proto] else 0)
        e.until = ts
        e.flags |= flags
        e.pkts += frames
        # IP bytes: the IP length field (a short frame's padding is not IP); a super-frame's
        # wire frames each carry l2_len of link header
        e.ip_bytes += ip_len if frames == 1 else wire_bytes - frames * l2_len
        e.wire_bytes += wire_bytes
        if c.half_open:
            if c.r.pkts and c.o.pkts:
                c.half_open = False                # both sides have sent: answered
                self.half_open.pop(key, None)
            else:
                self.half_open.move_to_end(key)
        if (c.o.state, c.r.state) != states:
            live = c.live_state()
            if live != c.live:
                self.live[c.transport, c.live] -= 1
                self.live[c.transport, live] += 1
                c.live = live
        self.activity[c.transport].move_to_end(key)
        self.touched.add(key)
        if frag_id is not None:
            if len(self.fragments) >= FRAGMENTS_MAX:
                self.fragments.clear()
            self.fragments[src, dst, frag_id, proto] = key

    def fragment(self, f, wire_bytes):
        """A later IPv4 fragment: its bytes join its datagram's connection, as if
        reassembled (Zeek counts the datagram once, with its whole IP length)."""
        _, src, dst, ident, proto, size, ip_len = f
        c = self.table.get(self.fragments.get((src, dst, ident, proto)))
        if c is None:
            return                                 # its first fragment was not seen
        e = c.o if src == c.orig_h else c.r
        e.ip_bytes += size
        e.frag_pkts += 1
        e.frag_hdr_bytes += ip_len - size
        e.wire_bytes += wire_bytes
        self.touched.add(c.key)

    def _open(self, key, proto, src, sport, dst, dport, flags, ts):
        if len(self.table) >= self.conn_max:
            self.evict()
        c = Connection(key, proto, src, sport, dst, dport, ts)
        transport = c.transport
        pure_syn = proto == IPPROTO_TCP and flags & (TH_SYN | TH_ACK) == TH_SYN
        if not pure_syn and proto in LIKELY_SERVER_PORTS:
            # Joined mid-stream (or a reply first): Zeek's port heuristic picks the server.
            c.midstream = proto == IPPROTO_TCP and not flags & TH_SYN
            servers = LIKELY_SERVER_PORTS[proto]
            if sport in servers and dst != IPV4_BROADCAST:
                if dport not in servers:
                    c.flip()
                elif proto == IPPROTO_TCP and flags & (TH_SYN | TH_ACK) != TH_SYN | TH_ACK and sport < dport:
                    c.flip()
        # Unanswered until both sides have sent: a flood of spoofed SYNs, SYN-ACK or RST
        # backscatter or one-way datagrams is evicted before any answered connection.
        c.half_open = True
        self.half_open[key] = c
        self.table[key] = c
        self.activity[transport][key] = c
        if self.report is not None:
            self.reporting[key] = c
        self.next_due = min(self.next_due, ts + self.timeouts[transport])  # its idle deadline
        self.live[transport, c.live] += 1
        if self.wants_process is not None:
            self.wants_process(c)
        return c

    def _reused(self, c, src, sport, flags, seq):
        """A SYN on a known 5-tuple that starts a new connection (Zeek's IsReuse)."""
        o, r = c.o, c.r
        if flags & TH_ACK and o.state != TCP_INACTIVE:
            return False                           # a SYN-ACK is only compared while orig is unseen
        if o.did_close or r.did_close:
            return True
        if not flags & TH_ACK:
            if o.state == TCP_INACTIVE:
                return False
            if o.state == TCP_SYN_ACK_SENT and r.state == TCP_INACTIVE and seq == r.start:
                return False                       # the SYN/SYN-ACK reversal
            return seq != o.start
        if o.state == TCP_INACTIVE and r.state != TCP_INACTIVE:
            return seq != r.start
        return False

    def _tcp(self, c, e, p, is_orig, flags, seq, ack, window, plen, ts):
        syn, fin, rst, has_ack = flags & TH_SYN, flags & TH_FIN, flags & TH_RST, flags & TH_ACK
        seg_len = plen + (1 if syn else 0) + (1 if fin else 0)
        if rst:
            seg_len -= plen                          # a RST's data is never counted
        if e.state == TCP_INACTIVE:
            e.init_seq(seq, syn)
        rel_seq = (seq - e.start) % SEQ_MOD
        # history
        n = (1 if syn else 0) + (1 if fin else 0) + (1 if rst else 0)
        if n > 1:
            c.check(HIST_FIN_RST if fin and rst else HIST_MULTI, "I" if fin and rst else "Q", is_orig)
        elif syn:
            if c.check(HIST_SYN, "H" if has_ack else "S", is_orig) and rel_seq != e.last_syn:
                c.add(("H" if has_ack else "S") if is_orig else ("h" if has_ack else "s"))
            e.last_syn = rel_seq
        elif fin:
            if c.check(HIST_FIN, "F", is_orig) and (rel_seq + plen) % SEQ_MOD != e.last_fin:
                c.add("F" if is_orig else "f")
            e.last_fin = (rel_seq + plen) % SEQ_MOD
        elif rst:
            if c.check(HIST_RST, "R", is_orig) and rel_seq != e.last_rst:
                c.add("R" if is_orig else "r")
            e.last_rst = rel_seq
        elif plen or has_ack:
            if len(c.history) == 1 and c.history[0] == "H":
                # Opened by a SYN-ACK: its sender was the responder after all.
                c.flip()
                c.history[:] = ["^", "h"]
                is_orig = not is_orig
            mask = HIST_DATA if plen else HIST_ACK
            if not c.seen & (mask if is_orig else mask << HIST_RESP_SHIFT):   # most frames: seen
                c.check(mask, "D" if plen else "A", is_orig)
        if window == 0 and not rst and p.state != TCP_CLOSED and e.state != TCP_RESET:
            c.scaled(e, "W", is_orig)
        if not (c.o.did_close and c.r.did_close):
            c.last = ts
        if has_ack:
            if p.state == TCP_INACTIVE:
                p.start = p.last = p.ack = (ack - 1) % SEQ_MOD
            elif not rst:
                d = (ack - p.ack) % SEQ_MOD                  # _seq_delta, inlined: every frame
                if 0 < d < SEQ_HALF and not (ack == 0 and d > SEQ_JUMP_MAX):
                    p.move_ack(ack)
        end = (seq + seg_len) % SEQ_MOD
        delta = (end - e.last) % SEQ_MOD
        if delta >= SEQ_HALF:
            delta -= SEQ_MOD
        if e.state != TCP_RESET:
            if delta <= 0:
                if plen and not ((syn or rst) and abs(delta) > SEQ_JUMP_MAX) and \
                        not (fin and e.last == (e.start + 1) % SEQ_MOD):
                    c.scaled(e, "T", is_orig)
            elif not ((syn or rst) and delta > SEQ_JUMP_MAX):
                e.move_last(end)
        if fin:
            e.fins += 1
        if syn or fin or rst or e.state == TCP_INACTIVE:     # otherwise no state changes
            self._state(c, e, p, is_orig, syn, fin, rst, has_ack, plen, ts)

    def _state(self, c, e, p, is_orig, syn, fin, rst, has_ack, plen, ts):
        """Zeek's endpoint state machine, for the sending end e (peer p)."""
        s = e.state
        close = False
        if s == TCP_INACTIVE:
            if syn:
                if is_orig:
                    e.set_state(TCP_SYN_ACK_SENT if has_ack else TCP_SYN_SENT)
                    self._timer(c, ts + CONN_ATTEMPT_DELAY, attempt=True)
                elif not has_ack and p.state == TCP_SYN_ACK_SENT:
                    c.flip()                       # the SYN/SYN-ACK reversal
                    p.set_state(TCP_ESTABLISHED)
                    e.set_state(TCP_ESTABLISHED)
                else:
                    if p.state == TCP_SYN_SENT:
                        p.set_state(TCP_ESTABLISHED)
                    e.set_state(TCP_ESTABLISHED)
            if fin:
                e.set_state(TCP_CLOSED)
                close = True
            if rst:
                e.set_state(TCP_RESET)
                close = True
            if not (syn or fin or rst):
                if not is_orig and not plen and c.o.state == TCP_SYN_SENT:
                    pass                           # an ACK before the SYN-ACK
                elif has_ack and p.state == TCP_ESTABLISHED:
                    e.set_state(TCP_ESTABLISHED)
                else:
                    e.set_state(TCP_PARTIAL)
        elif s in (TCP_SYN_SENT, TCP_SYN_ACK_SENT):
            if fin:
                e.set_state(TCP_CLOSED)
                close = True
            if rst:
                e.set_state(TCP_RESET)
                close = True
        elif s in (TCP_ESTABLISHED, TCP_PARTIAL):
            if syn and not has_ack and s == TCP_PARTIAL and p.state == TCP_INACTIVE:
                e.set_state(TCP_SYN_SENT)
            if fin and not rst:
                e.set_state(TCP_CLOSED)
                if p.state == TCP_RESET and p.prev == TCP_CLOSED:
                    p.set_state(TCP_CLOSED)
                close = True
            elif rst:
                e.set_state(TCP_RESET)
                close = True
        elif s == TCP_CLOSED:
            if rst and p.state != TCP_CLOSED:
                e.set_state(TCP_RESET)
                close = not e.did_close
                self._timer(c, ts + CONN_CLOSE_DELAY)     # Zeek's tcp_reset_delay
        if close:
            e.did_close = True
            if e.state == TCP_RESET or p.did_close or p.state == TCP_INACTIVE:
                self._timer(c, c.last + CONN_CLOSE_DELAY)
        if c.attempt and c.timer and c.r.state != TCP_INACTIVE and not c.closed_fully():
            # Answered: the attempt timer can only disarm when it pops (a responder never
            # goes back to INACTIVE, and a close arms a timer of its own), so it dies now
            # rather than cost a pass its budget; a flood answered by SYN-ACKs (SYN
            # cookies) would otherwise hold every close behind it.
            self._disarm(c)

    def _timer(self, c, due, attempt=False):
        self._disarm(c)
        self.timer_seq += 1
        c.timer, c.attempt = self.timer_seq, attempt
        heapq.heappush(self.timers, (due, self.timer_seq, c))
        if due < self.next_due:
            self.next_due = due

    def _disarm(self, c):
        """c's armed timer, if any, is dead from now on."""
        if not c.timer:
            return
        c.timer, c.attempt = 0, False
        self.timers_dead += 1
        timers = self.timers
        if self.timers_dead > max(TIMERS_MIN, len(timers) // TIMERS_DEAD_FRACTION):
            timers[:] = [t for t in timers if t[2].timer == t[1]]    # in place: expire() holds it
            heapq.heapify(timers)
            self.timers_dead = 0

    # -- ends ----------------------------------------------------------------

    def expire(self, now):
        """Timers due by `now` (packet time): closes, unanswered SYNs, idle connections."""
        timers, budget = self.timers, EXPIRE_BUDGET
        while timers and timers[0][0] <= now and budget:
            _, seq, c = heapq.heappop(timers)
            if c.timer != seq:
                self.timers_dead -= 1              # ended, re-armed or answered: no work
                continue
            budget -= 1
            c.timer, c.attempt = 0, False
            if c.closed_fully():
                self.end(c, END_DETECTED)          # the close delay is over
            elif c.o.state in (TCP_SYN_SENT, TCP_SYN_ACK_SENT) and c.r.state == TCP_INACTIVE:
                self.end(c, END_IDLE)              # the attempt timer: no answer
        for transport, active in self.activity.items():
            timeout = self.timeouts[transport]
            while active and budget:
                c = next(iter(active.values()))
                if c.last + timeout > now:
                    break
                budget -= 1
                if c.offloaded and self.offload.refresh(c) and c.last + timeout > now:
                    self.credited(c)               # the kernel counted it since the tick
                    continue
                self.end(c, END_IDLE)
        self.behind = not budget
        if not budget:
            self.next_due = now                    # more are due: the next frame or pass goes on
            return
        due = [timers[0][0]] if timers else []
        for transport, active in self.activity.items():
            if active:
                due.append(next(iter(active.values())).last + self.timeouts[transport])
        self.next_due = min(due, default=math.inf)

    def evict(self):
        """The table is full: the least active unanswered connection, else the least
        active one."""
        if self.half_open:
            c = next(iter(self.half_open.values()))
            reason = "half_open"
        else:
            fronts = [next(iter(a.values())) for a in self.activity.values() if a]
            c = min(fronts, key=lambda x: x.last)
            reason = "oldest"
        self.evictions[reason] += 1
        self.end(c, END_EVICTED)

    def credited(self, c):
        """The offload counted frames of c: what packet() does for a frame besides the
        counts (its place among the active, answered or not, a row to publish)."""
        key = c.key
        if c.half_open:
            if c.r.pkts and c.o.pkts:
                c.half_open = False
                self.half_open.pop(key, None)
            else:
                self.half_open.move_to_end(key)
        self.activity[c.transport].move_to_end(key)
        self.touched.add(key)

    def report_active(self, c, now):
        """c's flow report is due (--flow-active-timeout): what it counted since the last."""
        if c.offloaded:
            self.offload.refresh(c)
        self.report(c, END_ACTIVE)
        c.since = now
        self.reporting.move_to_end(c.key)

    def end(self, c, reason=END_FORCED):
        """A connection ends: its state counted, its record logged, its last flow report
        made (reason: END_*), its entry gone."""
        if c.offloaded:
            self.offload.release(c)
        self._disarm(c)
        del self.table[c.key]
        self.activity[c.transport].pop(c.key, None)
        self.half_open.pop(c.key, None)
        self.rows.pop(c.key, None)
        self.touched.discard(c.key)
        self.live[c.transport, c.live] -= 1
        if self.report is not None:
            self.report(c, reason)
            self.reporting.pop(c.key, None)
        rec = c.record()
        self.closed[c.transport, rec["conn_state"]] += 1
        self.timer_seq += 1
        item = (_record_bytes(rec), self.timer_seq, rec)
        if len(self.largest) < CONN_LARGEST_KEPT:
            heapq.heappush(self.largest, item)
        elif item > self.largest[0]:
            heapq.heapreplace(self.largest, item)
        if self.finished is not None and c.transport != TRANSPORT_OTHER:
            self.finished(rec)

    def finish(self):
        """End of a replay (or of capture): every open connection is finished."""
        for c in sorted(self.table.values(), key=lambda x: x.first):
            self.end(c)
        return True

    def tick(self, now):
        if now >= self.next_due:
            self.expire(now)
        reporting = self.reporting
        while reporting:
            c = next(iter(reporting.values()))
            if now - c.since < self.active_timeout:
                break
            self.report_active(c, now)

    def snapshot(self):
        while self.refreshed:
            c = self.refreshed.popleft()
            if self.table.get(c.key) is c:
                self.touched.add(c.key)
        for key in self.touched:
            self.rows[key] = self.table[key].row()
        self.touched = set()
        names = PROTO_NAMES
        return ConnectionSnapshot(
            tuple(self.rows.values()),
            tuple((names[p], s, n) for (p, s), n in self.live.items()),
            tuple((names[p], s, n) for (p, s), n in self.closed.items()),
            tuple(self.evictions.items()),
            tuple(rec for _, _, rec in sorted(self.largest, reverse=True)))


def connections_document(snap, how, top=None, state=None):
    conns = snap.get("connections")
    if conns is None:
        return None
    now = snap.get("time", 0.0)
    rows = [r for r in conns.rows if state is None or r[6] == state]
    out = []
    for r in _first(rows, top, lambda r: (-(r[12] + r[13]), r[14])):
        (key, proto, oh, op, rh, rp, live, history, ob, rb, opk, rpk, owb, rwb, first, last,
         midstream, pid, comm, service) = r
        out.append({"uid": connection_uid(key, first), "proto": proto_name(proto),
                    "orig_h": raw_address(oh), "orig_p": op,
                    "resp_h": raw_address(rh), "resp_p": rp, "service": service,
                    "state": live, "history": history,
                    "orig_bytes": ob, "resp_bytes": rb, "orig_pkts": opk, "resp_pkts": rpk,
                    "orig_wire_bytes": owb, "resp_wire_bytes": rwb, "start": first,
                    "age": max(0.0, now - first), "idle": max(0.0, now - last),
                    "midstream": midstream, "pid": pid, "comm": comm})
    counts, closed = {}, {}
    for proto, live, n in conns.live:
        counts.setdefault(proto, {})[live] = n
    for proto, cs, n in conns.closed:
        closed.setdefault(proto, {})[cs] = n
    return {**_envelope(snap, how), "open": len(conns.rows), "counts": counts, "closed": closed,
            "evictions": dict(conns.evictions), "connections": out,
            "largest_closed": list(conns.largest), **_cut(out, len(rows))}


def connections_metrics(c, snap):
    """The connections' families (a row of STAGES); none without --connections."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    conns, family = snap.get("connections"), metric_family
    if conns is None:
        return
    yield family(GaugeMetricFamily, "lpd_connections", "Open connections by live state.",
                 ["proto", "state"], [((p, st), n) for p, st, n in conns.live])
    yield family(CounterMetricFamily, "lpd_connections_closed",
                 "Finished connections by Zeek conn_state.", ["proto", "conn_state"],
                 [((p, cs), n) for p, cs, n in conns.closed])
    yield family(CounterMetricFamily, "lpd_connection_evictions",
                 "Connections finished early because --conn-max was reached.",
                 ["reason"], [((r,), n) for r, n in conns.evictions])


CONN_TABLE_TOP = 20                # connections a table lists


def connections_table(conns):
    """XNet's summary: counts by state, the biggest connections with state and bytes."""
    out = [f"\nconnections: {conns['open']} open"]
    for proto, by_state in sorted(conns["counts"].items()):
        live = ", ".join(f"{s} {n}" for s, n in by_state.items() if n)
        if live:
            out.append(f"; {proto}: {live}")
    out.append("\n")
    for proto, by_state in sorted(conns["closed"].items()):
        done = ", ".join(f"{s} {n}" for s, n in by_state.items() if n)
        if done:
            out.append(f"finished {proto}: {done}\n")
    evicted = ", ".join(f"{r} {n}" for r, n in conns["evictions"].items() if n)
    if evicted:
        out.append(f"evicted: {evicted}\n")
    header = ("proto", "originator", "responder", "service", "state", "history", "orig bytes",
              "resp bytes", "orig pkts", "resp pkts")
    numbers = header[6:]
    rows = [[d["proto"], f"{d['orig_h']}:{d['orig_p']}", f"{d['resp_h']}:{d['resp_p']}",
             d.get("service") or "-", d["state"] + (" (mid-stream)" if d["midstream"] else ""),
             d["history"], _amount(d["orig_bytes"]), _amount(d["resp_bytes"]), str(d["orig_pkts"]),
             str(d["resp_pkts"])] for d in conns["connections"][:CONN_TABLE_TOP]]
    if rows:
        out.append("open connections, biggest first:\n")
        out += _columns(header, rows, numbers)
    done = [[r["proto"], f"{r['id.orig_h']}:{r['id.orig_p']}", f"{r['id.resp_h']}:{r['id.resp_p']}",
             r.get("service", "-"), r["conn_state"], r["history"], _amount(r.get("orig_bytes", 0)),
             _amount(r.get("resp_bytes", 0)), str(r["orig_pkts"]), str(r["resp_pkts"])]
            for r in conns["largest_closed"][:CONN_TABLE_TOP]]
    if done:
        out.append("finished connections, biggest first:\n")
        out += _columns(header[:4] + ("conn_state",) + header[5:], done, numbers)
    return out


def _connections(opts, w, built):
    """--connections, with the processes behind local sockets where a Poller may run."""
    if not opts.connections:
        return None
    log_ = w.logs.get(Connections.name)
    procs = ProcessTable(log) if w.pollers is not None else None
    conns = Connections(opts.conn_max, opts.conn_timeout_tcp, opts.conn_timeout_udp,
                        log_.write if log_ is not None else None,
                        procs.want if procs is not None else None)
    if procs is not None:
        procs.deliver = conns.refreshed.append
        w.pollers.append(procs)
    return conns


STAGES.append(Stage(Connections, _connections, (("connections", connections_document),),
                    connections_metrics, connections_table, log="--conn-log"))


###############################################################################
# 14.4 Rules (bpfcountd-compatible filter files) ##############################
# provides: format_rule_lines, parse_filter_file, RuleCounter
#
# A filter file is bpfcountd's `<id>;<bpf expression>` per line, minus its bugs
# (see parse_filter_text). Every rule that matches a frame counts it.
#
# Counting: the decoder hands the rules the block's frames (WANT_RAW); one generated
# function (make_rules_counter) loops over them and adds to `bytes[i]` and
# `packets[i]` where rule i matches. Plain lists indexed by int are the cheapest
# mutable counters CPython has.
#
# Reload: a new RuleCounter is compiled off the capture thread; the capture thread
# carries the counts over and swaps it in between two blocks (Reloader.swap_rules),
# so no frame is counted by the old set after its counts were copied.
#
# The unix socket: bpfcountd wrote its lines in reverse file order (it prepended
# to a list); lpd writes them in file order.

class Rule(NamedTuple):
    """One filter-file line: its id, the fully expanded expression, its line number,
    and its userspace program, compiled once per load (host names in it were resolved
    then: a reload compiles, and so resolves, again)."""
    id: str
    expr: str
    lineno: int
    prog: tuple = ()


def format_mac(mac):
    """Any 'aa:bb:..' / 'AA-BB-..' text -> 'aa:bb:cc:dd:ee:ff' (None stays None)."""
    if mac is None:
        return None
    return mac.replace("-", ":").lower()


def _split_lines(text):
    """Lines of text with their numbers; '\\n' only (str.splitlines would also split on
    form feeds and U+2028, and the numbers would then disagree with editors)."""
    return [(n, line[:-1] if line.endswith("\r") else line)
            for n, line in enumerate(text.split("\n"), 1)]


# An id is written raw as the first field of a socket line and as the `rule` label.
# Bounded so that one line of a filter file cannot make every dump and scrape huge;
# bpfcountd's label-style ids (type="arp",subtype="request",who="me") are far shorter.
RULE_ID_MAX_CHARS = 256
# C0, DEL and C1: they would end or garble a reader's line (NUL, ESC sequences).
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _rule_id_problem(rule_id):
    """Why rule_id is unusable as a socket-line id, or None."""
    if not rule_id:
        return "empty identifier before ';'"
    if len(rule_id) > RULE_ID_MAX_CHARS:
        # Not quoted: the id itself may be a megabyte.
        return f"identifier of {len(rule_id)} characters (at most {RULE_ID_MAX_CHARS})"
    if ":" in rule_id:
        # ':' separates the fields of the socket line; readers split on it.
        return f"identifier {rule_id!r} contains ':'"
    if any(c.isspace() for c in rule_id):
        return f"identifier {rule_id!r} contains whitespace"
    control = _CONTROL_CHAR.search(rule_id)
    if control:
        return f"identifier {rule_id!r} contains control character U+{ord(control.group()):04X}"
    return None


_REF = re.compile(r"\$\{([^}]*)\}|\$MAC")


def _expand(expr, mac, earlier, defined_at, lineno):
    """Substitute $MAC and ${id} in one left-to-right pass (substituted text is not
    rescanned); returns (text, first problem or None)."""
    problems = []
    # A rule may use an earlier one several times, so each line could double the
    # text: past FILTER_MAX_CHARS only the length is counted, nothing is built.
    length = [len(expr)]

    def put(m, text):
        length[0] += len(text) - len(m.group(0))
        return text if length[0] <= FILTER_MAX_CHARS else ""

    def sub(m):
        ref = m.group(1)
        if ref is None:
            if mac is None:
                problems.append("$MAC used but no MAC address is known: give -i IFACE "
                                "(its address) or --mac MAC")
                return m.group(0)
            return put(m, f"({mac})")
        if ref in earlier:
            return put(m, f"({earlier[ref]})")
        at = defined_at.get(ref)
        if at == lineno:
            problems.append(f"${{{ref}}} refers to its own rule")
        elif at is not None:
            problems.append(f"${{{ref}}} refers to a rule defined later (line {at})")
        else:
            problems.append(f"${{{ref}}} refers to an unknown rule")
        return m.group(0)

    text = _REF.sub(sub, expr)
    if length[0] > FILTER_MAX_CHARS:
        return text, FilterTooLarge(f"{length[0]} characters once $MAC and ${{...}} are "
                                    "expanded", FILTER_MAX_CHARS).reason
    return text, (problems[0] if problems else None)


def compile_rule_expr(expr, names=None):
    """Userspace program for expr as a tuple of (code, jt, jf, k). Raises FilterError.
    names: see compile_filter."""
    return tuple(tuple(insn) for insn in compile_filter(expr, names=names))


class _Programs:
    """The programs of one parse of a filter file, one object per distinct
    instruction (most of a rule's are in others too: 'ldh [12]', 'jeq #0x800', the
    returns; sharing them saves 2/3 of the programs' memory).

    Those of expressions that name nothing are kept for the next parse, so a SIGHUP
    compiles only the lines that changed (10,000 unchanged rules: ~8 s less). An
    expression with a name (host, network, port, protocol, MAC) depends on /etc and
    DNS, not on its text alone: it is compiled, and so resolved, at every load."""
    last = {}           # expression -> program, from the last parse that succeeded

    def __init__(self):
        self.now, self.insns = {}, {}

    def get(self, expr):
        prog = self.now.get(expr)
        if prog is None and expr in _Programs.last:
            prog = tuple(self.insns.setdefault(i, i) for i in _Programs.last[expr])
            self.now[expr] = prog
        return prog

    def add(self, expr, prog, names):
        """prog, compiled from expr after looking up `names`, as this parse keeps it."""
        prog = tuple(self.insns.setdefault(i, i) for i in prog)
        if not names:
            self.now[expr] = prog
        return prog

    def keep(self):
        _Programs.last = self.now


def _compile(expr, expanded, programs=None):
    """(program, None) if expr compiles, else (None, a one-line reason); programs: a
    _Programs to reuse and record them in."""
    where = f"expanded expression {expr!r}" if expanded else "expression"
    if programs is not None:
        prog = programs.get(expr)
        if prog is not None:
            return prog, None
    names = []
    try:
        prog = compile_rule_expr(expr, names)
        return (prog if programs is None else programs.add(expr, prog, names)), None
    except FilterTooLarge as e:
        # Not quoted: it may be kilobytes.
        return None, e.reason
    except FilterError as e:
        return None, f"{where} does not compile: {e}"
    except Exception as e:  # a compiler bug must not take a running daemon down on reload
        return None, f"{where} does not compile: internal compiler error: {e!r}"


def _defined_at(lines):
    """id -> line of its first definition, for naming forward references."""
    found = {}
    for n, line in lines:
        s = line.strip()
        if s and not s.startswith("#") and ";" in s:
            found.setdefault(s.split(";", 1)[0].strip(), n)
    return found


def _parse_line(line, lineno, mac, expanded_by_id, defined_at, programs=None):
    """(id, expanded expression, program) of one rule line, or a reason for the error;
    programs: see _compile."""
    s = line.strip()
    if ";" not in s:
        return "missing ';' between identifier and expression"
    rule_id, expr = (part.strip() for part in s.split(";", 1))
    problem = _rule_id_problem(rule_id)
    if problem:
        return problem
    if rule_id in expanded_by_id:
        return f"duplicate identifier {rule_id!r} (first defined on line {defined_at[rule_id]})"
    if not expr:
        return f"empty expression for {rule_id!r}"
    if len(expr) > FILTER_MAX_CHARS:        # before anything reads it: it may be megabytes
        return FilterTooLarge(f"{len(expr)} characters", FILTER_MAX_CHARS).reason
    full, problem = _expand(expr, mac, expanded_by_id, defined_at, lineno)
    if problem:
        return problem
    prog, problem = _compile(full, full != expr, programs)
    return problem or (rule_id, full, prog)


def parse_filter_text(text, source, mac):
    """Parse filter-file text into Rules; raises ConfigError('source:line: reason').

    bpfcountd's format with its defects fixed: '#' comments and blank lines are
    skipped, CRLF works, a last line without newline is whole, id and expression
    are trimmed; bad ids, duplicates, empty or uncompilable expressions and
    references to unknown or later rules are errors. `mac` may be None (offline
    mode), then $MAC is an error.
    """
    mac = format_mac(mac)
    lines = _split_lines(text)
    defined_at = _defined_at(lines)
    rules, expanded_by_id, programs = [], {}, _Programs()
    for n, line in lines:
        if not line.strip() or line.strip().startswith("#"):
            continue
        got = _parse_line(line, n, mac, expanded_by_id, defined_at, programs)
        if isinstance(got, str):
            raise ConfigError(f"{source}:{n}: {got}")
        rule_id, expr, prog = got
        expanded_by_id[rule_id] = expr
        rules.append(Rule(rule_id, expr, n, prog))
    programs.keep()
    return rules


def parse_filter_file(path, mac):
    """Read and parse a filter file (see parse_filter_text); ConfigError on any problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise os_failure(e, f"{path}: cannot read filter file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{lineno}: not valid UTF-8") from None
    return parse_filter_text(text, path, mac)



class RuleCounter(Consumer):
    """Compiled rules, their combined counting function and per-rule counters."""
    name = "rules"
    snapshot_type = RuleSnapshot
    wants = frozenset((WANT_RAW,))

    def __init__(self, rules=()):
        self.rules = tuple(rules)
        self.ids = tuple(r.id for r in self.rules)
        self.progs = [r.prog or compile_rule_expr(r.expr) for r in self.rules]
        self.count = make_rules_counter(self.progs)
        # Computed here, on the reload thread: the capture thread asks for it on swaps.
        self._snaplen = max([0] + [program_snaplen(p) for p in self.progs])
        self.bytes = [0] * len(self.rules)
        self.packets = [0] * len(self.rules)

    def __len__(self):
        return len(self.rules)

    def snaplen(self):
        return self._snaplen

    def consume(self, batch):
        self.count(batch.raw, self.bytes, self.packets)
        for data, wirelen, pkttype, vlan_tci, nbytes, segments, _, _ in batch.gso:
            # Judged once, as the frame it is; counted as the frames the wire carried.
            hit = [0] * len(self.rules)
            self.count(((data, wirelen, pkttype, vlan_tci),), [0] * len(self.rules), hit)
            for i, n in enumerate(hit):
                if n:
                    self.bytes[i] += nbytes
                    self.packets[i] += segments

    def carry_counts_from(self, old):
        """Take over old's counts for rules whose id and expanded expression are
        unchanged (the capture thread, right before swapping)."""
        prev = {(r.id, r.expr): i for i, r in enumerate(old.rules)}
        for i, r in enumerate(self.rules):
            j = prev.get((r.id, r.expr))
            if j is not None:
                self.bytes[i] = old.bytes[j]
                self.packets[i] = old.packets[j]

    def snapshot(self):
        return RuleSnapshot(tuple(zip(self.ids, self.bytes, self.packets)))


def format_rule_lines(rows):
    """bpfcountd's socket text: '<id>:<bytes>:<packets>\\n' per rule, in the given order."""
    return "".join(f"{rid}:{b}:{p}\n" for rid, b, p in rows)


def rules_document(snap, how, top=None):
    rules = snap.get("rules")
    if rules is None:
        return None
    ranked = _first(enumerate(rules.rows), top, lambda ir: (-ir[1][1], ir[0]))
    rows = [{"id": r[0], "bytes": r[1], "packets": r[2]} for _, r in ranked]
    return {**_envelope(snap, how), "rules": rows, **_cut(rows, len(rules.rows))}


def rules_metrics(c, snap):
    """The rules' families (a row of STAGES), without samples when there are none."""
    from prometheus_client.core import CounterMetricFamily
    rules = snap.get("rules", RuleSnapshot()).rows
    yield metric_family(CounterMetricFamily, "lpd_rule_packets", "Packets matching a rule.",
                        ["rule"], [((r,), p) for r, _, p in rules])
    yield metric_family(CounterMetricFamily, "lpd_rule_bytes", "Bytes of packets matching a rule.",
                        ["rule"], [((r,), b) for r, b, _ in rules])


def rules_table(doc):
    """--output table's rules, in the file's order of counting."""
    return ([f"\nrules: {len(doc['rules'])}\n"] +
            _columns(("rule", "bytes", "packets"),
                     [[d["id"], _amount(d["bytes"]), str(d["packets"])] for d in doc["rules"]],
                     ("bytes", "packets")))


def _rules(opts, w, built):
    """-f's rules, loaded by the caller: a reload loads them again (load_rules)."""
    return w.rules


STAGES.append(Stage(RuleCounter, _rules, (("rules", rules_document),), rules_metrics,
                    rules_table))


###############################################################################
# 14.5 Flow export (IPFIX) ####################################################
# provides: -
#
# The connection table (14.3) as IPFIX (RFC 7011) for the collectors fleets run
# (nfdump's nfcapd, pmacct's nfacctd, goflow2): one record per direction a connection
# carried (uniflow), or one per connection with RFC 5103's reverse elements
# (--ipfix-biflow), made when --flow-active-timeout has gone by and when it ends, each
# with what it counted since its last: octets and packets as RFC 7012 counts them
# (every packet's IP length, a later fragment's too), absolute millisecond times (152,
# 153: relative SysUpTime fields break goflow2 and older nfacctd), flowEndReason.
#
# Sending never waits: a UDP datagram goes or is counted as an error (a collector that
# is down answers with ICMP port unreachable, which the next send reports); a TCP
# collector's bytes wait in a bounded buffer while it reads slowly, and one that goes
# away is dialled again after a back-off. Records wait for the next tick, or until
# IPFIX_FLUSH_RECORDS have gathered; a collector that cannot take them (not connected,
# its buffer full, a send refused) loses them, counted per collector, never stored.
#
# Sequence numbers (RFC 7011 3.1): per collector, the data records sent to it before
# this message; a TCP reconnection is a new transport session: 0 again, templates first.

IPFIX_VERSION = 10
IPFIX_HEADER = struct.Struct("!HHIII")        # version, length, export time, sequence, domain
IPFIX_SET = struct.Struct("!HH")              # set id, length
IPFIX_FIELD = struct.Struct("!HH")            # element id, length (the template's, per field)
IPFIX_PEN = struct.Struct("!I")               # an enterprise element's number
IPFIX_TEMPLATE_SET_ID = 2
IPFIX_ENTERPRISE_BIT = 0x8000
IPFIX_REVERSE_PEN = 29305                     # RFC 5103: the reverse of an element, same id
IPFIX_MESSAGE_MAX = 1472                      # a 1500-byte Ethernet frame's UDP payload
IPFIX_MESSAGE_MIN = 512
IPFIX_FLUSH_RECORDS = 1024                    # records that are sent without waiting for a tick
IPFIX_TCP_BUFFER = 4 << 20                    # bytes a TCP collector may be behind
IPFIX_RETRY_MIN, IPFIX_RETRY_MAX = 1.0, 60.0  # seconds between TCP connection attempts
IPFIX_FINISH_WAIT = 2.0                       # seconds the end waits for TCP collectors to read
IP_MTU, IPV6_MTU = 14, 24                     # getsockopt: a connected socket's path MTU
IP_UDP_OVERHEAD = {socket.AF_INET: 20 + UDP_HDR_LEN, socket.AF_INET6: IPV6_HDR_LEN + UDP_HDR_LEN}
MS_PER_S = 1000

# IANA's Information Elements lpd sends: name -> (element id, its struct format).
IPFIX_ELEMENTS = {
    "octetDeltaCount": (1, "Q"), "packetDeltaCount": (2, "Q"), "protocolIdentifier": (4, "B"),
    "ipClassOfService": (5, "B"), "tcpControlBits": (6, "H"), "sourceTransportPort": (7, "H"),
    "sourceIPv4Address": (8, "4s"), "ingressInterface": (10, "I"),
    "destinationTransportPort": (11, "H"), "destinationIPv4Address": (12, "4s"),
    "sourceIPv6Address": (27, "16s"), "destinationIPv6Address": (28, "16s"),
    "icmpTypeCodeIPv4": (32, "H"), "vlanId": (58, "H"), "flowEndReason": (136, "B"),
    "icmpTypeCodeIPv6": (139, "H"), "flowStartMilliseconds": (152, "Q"),
    "flowEndMilliseconds": (153, "Q"),
}
# What a direction counted, the part a biflow record repeats in reverse.
IPFIX_COUNTS = ("flowStartMilliseconds", "flowEndMilliseconds", "octetDeltaCount",
                "packetDeltaCount", "tcpControlBits", "ipClassOfService")


class Template(NamedTuple):
    """One record layout: its id (never another layout's), its fields, how a record packs."""
    id: int
    fields: tuple                  # (element name, RFC 5103's reverse of it?)
    record: struct.Struct

    def spec(self):
        """The template record: id, field count, each field's id and length."""
        out = [IPFIX_FIELD.pack(self.id, len(self.fields))]
        for name, reverse in self.fields:
            element, fmt = IPFIX_ELEMENTS[name]
            out.append(IPFIX_FIELD.pack(element | (IPFIX_ENTERPRISE_BIT if reverse else 0),
                                        struct.calcsize("!" + fmt)))
            if reverse:
                out.append(IPFIX_PEN.pack(IPFIX_REVERSE_PEN))
        return b"".join(out)


def _template(tid, family, biflow):
    v = "IPv4" if family == 4 else "IPv6"
    names = (IPFIX_COUNTS[:4] + (f"source{v}Address", f"destination{v}Address",
                                 "sourceTransportPort", "destinationTransportPort",
                                 "protocolIdentifier") + IPFIX_COUNTS[4:] +
             (f"icmpTypeCode{v}", "flowEndReason", "ingressInterface", "vlanId"))
    fields = tuple((n, False) for n in names) + \
        (tuple((n, True) for n in IPFIX_COUNTS) if biflow else ())
    return Template(tid, fields, struct.Struct("!" + "".join(IPFIX_ELEMENTS[n][1] for n, _ in fields)))


# (family, biflow) -> its template: one id per layout, for good.
TEMPLATES = {(4, False): _template(256, 4, False), (6, False): _template(257, 6, False),
             (4, True): _template(258, 4, True), (6, True): _template(259, 6, True)}


def _direction(e):
    """What end e counted since its last report, as IPFIX_COUNTS, and marks it reported;
    None when nothing."""
    pkts, octets = e.flow_counts()
    if pkts == e.reported_pkts or e.since is None:
        return None
    counts = (round(e.since * MS_PER_S), round(e.until * MS_PER_S), octets - e.reported_bytes,
              pkts - e.reported_pkts, e.flags, e.tos)
    e.reported_pkts, e.reported_bytes = pkts, octets
    e.since, e.flags = None, 0
    return counts


def flow_records(c, reason, biflow, ifindex):
    """c's records since its last report: [(template, packed record)]."""
    family = 4 if len(c.orig_h) == 4 else 6
    icmp = c.transport == IPPROTO_ICMP
    ported = c.transport in (IPPROTO_TCP, IPPROTO_UDP)

    def fields(e, src, dst, sport, dport, counts, vlan):
        """One direction's fields, in the templates' order (their reverse part aside)."""
        return (*counts[:4], src, dst, sport if ported else 0, dport if ported else 0, c.proto,
                *counts[4:], e.icmp if icmp else 0, reason, ifindex, vlan)
    if biflow:
        forward, reverse = _direction(c.o), _direction(c.r)
        if forward is None and reverse is None:
            return []
        t, nothing = TEMPLATES[family, True], (0,) * len(IPFIX_COUNTS)
        return [(t, t.record.pack(*fields(c.o, c.orig_h, c.resp_h, c.orig_p, c.resp_p,
                                          forward or nothing, c.o.vlan or c.r.vlan),
                                  *(reverse or nothing)))]
    t, out = TEMPLATES[family, False], []
    for e, src, dst, sport, dport in ((c.o, c.orig_h, c.resp_h, c.orig_p, c.resp_p),
                                      (c.r, c.resp_h, c.orig_h, c.resp_p, c.orig_p)):
        counts = _direction(e)
        if counts is not None:
            out.append((t, t.record.pack(*fields(e, src, dst, sport, dport, counts, e.vlan))))
    return out


class _Collector:
    """One collector: its socket, the sequence of its transport session, when it last
    had the templates, and its counters. UDP unless `transport` is "tcp"."""

    def __init__(self, transport, host, port):
        bracketed = f"[{host}]" if ":" in host else host
        self.transport, self.name = transport, f"{transport}://{bracketed}:{port}"
        kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
        try:
            self.family, _, _, _, self.address = socket.getaddrinfo(host, port, type=kind)[0]
        except (OSError, UnicodeError) as e:
            raise ConfigError(f"--ipfix {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
        self.sock = None
        self.size = IPFIX_MESSAGE_MAX
        self.sequence = 0
        self.sent_templates, self.templates_at = None, -math.inf   # messages since, when
        self.buffer = bytearray()                  # TCP: bytes not yet taken by the kernel
        self.connected = False
        self.retry_at, self.retry = 0.0, IPFIX_RETRY_MIN
        self.messages = self.records = self.errors = self.dropped = 0
        if transport == "udp":
            self._open_udp()

    def _open_udp(self):
        self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(self.address)            # connected: ICMP errors come back to it
        level, option = (socket.IPPROTO_IP, IP_MTU) if self.family == socket.AF_INET else \
            (socket.IPPROTO_IPV6, IPV6_MTU)
        try:
            mtu = self.sock.getsockopt(level, option)
            self.size = max(IPFIX_MESSAGE_MIN, min(IPFIX_MESSAGE_MAX, mtu - IP_UDP_OVERHEAD[self.family]))
        except OSError:
            pass
        self.connected = True

    def ready(self, now):
        """True when messages can be queued: UDP always; TCP once connected (dialled
        here, without waiting, after the back-off)."""
        if self.transport == "udp" or self.connected:
            return True
        if self.sock is None:
            if now < self.retry_at:
                return False
            self.sock = socket.socket(self.family, socket.SOCK_STREAM)
            self.sock.setblocking(False)
            err = self.sock.connect_ex(self.address)
            if err not in (0, errno.EINPROGRESS):
                self._broken(now, err)
                return False
        if not select.select([], [self.sock], [], 0)[1]:
            return False                           # still connecting
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._broken(now, err)
            return False
        self.connected, self.retry = True, IPFIX_RETRY_MIN
        self.sequence, self.sent_templates = 0, None   # a new transport session
        log(LOG_INFO, f"--ipfix {self.name}: connected")
        return True

    def _broken(self, now, err):
        if self.connected or self.retry == IPFIX_RETRY_MIN:
            log(LOG_WARNING, f"--ipfix {self.name}: {os.strerror(err)}; "
                             f"trying again in {self.retry:g} s")
        self.errors += 1
        if self.sock is not None:
            self.sock.close()
        self.sock, self.connected, self.buffer = None, False, bytearray()
        self.retry_at = now + self.retry
        self.retry = min(self.retry * 2, IPFIX_RETRY_MAX)

    def templates_due(self, now, interval):
        if self.sent_templates is None:
            return True
        return self.transport == "udp" and (self.sent_templates >= IPFIX_TEMPLATE_EVERY or
                                            now - self.templates_at >= interval)

    def send(self, message, records, now):
        """One message; False if it was not taken (counted, its records dropped)."""
        if self.transport == "udp":
            try:
                self.sock.send(message)
            except OSError:                        # refused (ICMP), no buffer, no route
                self.errors += 1
                self.dropped += records
                return False
        else:
            if len(self.buffer) + len(message) > IPFIX_TCP_BUFFER:
                self.errors += 1
                self.dropped += records
                return False
            self.buffer += message
            self.pump(now)
        self.messages += 1
        self.records += records
        self.sequence = (self.sequence + records) % (1 << 32)
        return True

    def pump(self, now):
        """TCP: what the kernel takes of the buffer now."""
        while self.buffer and self.connected:
            try:
                n = self.sock.send(self.buffer)
            except BlockingIOError:
                return
            except OSError as e:
                self._broken(now, e.errno)
                return
            del self.buffer[:n]

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class IpfixSnapshot(NamedTuple):
    collectors: tuple = ()         # (name, messages, records, send errors, records dropped)
    domain: int = 0

    def merge(self, other):
        """Workers' sums: each sends to the same collectors under its own domain."""
        mine = {name: row for name, *row in self.collectors}
        for name, *row in other.collectors:
            mine[name] = [a + b for a, b in zip(mine.get(name, (0,) * len(row)), row)]
        return IpfixSnapshot(tuple((name, *row) for name, row in mine.items()), self.domain)


class FlowExport(Consumer):
    """--ipfix: Connections.report hands it each connection's flow report; tick() and
    finish() send what waits, in messages no larger than each collector's path MTU."""
    name = "ipfix"
    snapshot_type = IpfixSnapshot

    def __init__(self, collectors, domain, biflow=False, template_interval=DEFAULT_IPFIX_TEMPLATE_INTERVAL,
                 ifindex=0):
        self.collectors = [_Collector(*c) for c in collectors]
        self.domain, self.biflow, self.ifindex = domain, biflow, ifindex
        self.template_interval = template_interval
        self.pending = collections.defaultdict(list)  # template -> packed records
        self.waiting = 0
        self.now = 0.0
        # one template set: both families' layouts of the record kind sent
        specs = b"".join(t.spec() for (_, bi), t in TEMPLATES.items() if bi == biflow)
        self.templates = IPFIX_SET.pack(IPFIX_TEMPLATE_SET_ID, IPFIX_SET.size + len(specs)) + specs

    def report(self, c, reason):
        """Connections.report: c's records since its last report wait for the next send."""
        records = flow_records(c, reason, self.biflow, self.ifindex)
        if c.last > self.now:
            self.now = c.last
        for template, record in records:
            self.pending[template].append(record)
        self.waiting += len(records)
        if self.waiting >= IPFIX_FLUSH_RECORDS:
            self.send(self.now)

    def send(self, now):
        """Every waiting record to every collector that can take it."""
        pending, waiting = self.pending, self.waiting
        self.pending, self.waiting = collections.defaultdict(list), 0
        for col in self.collectors:
            if col.ready(now):
                self._messages(col, pending, now)
            else:
                col.dropped += waiting
            col.pump(now)

    def _messages(self, col, pending, now):
        templates = col.templates_due(now, self.template_interval)
        if not pending and not templates:
            return
        body, size, count = [], IPFIX_HEADER.size, 0

        def emit():
            nonlocal body, size, count
            message = IPFIX_HEADER.pack(IPFIX_VERSION, size, int(now), col.sequence,
                                        self.domain) + b"".join(body)
            col.send(message, count, now)
            if col.sent_templates is not None:
                col.sent_templates += 1
            body, size, count = [], IPFIX_HEADER.size, 0

        if templates:
            body.append(self.templates)
            size += len(self.templates)
            col.sent_templates, col.templates_at = 0, now
        for template, records in pending.items():
            step = template.record.size
            i = 0
            while i < len(records):
                room = (col.size - size - IPFIX_SET.size) // step
                if room <= 0:
                    emit()
                    continue
                chunk = records[i:i + room]
                body.append(IPFIX_SET.pack(template.id, IPFIX_SET.size + step * len(chunk)))
                body.extend(chunk)
                size += IPFIX_SET.size + step * len(chunk)
                count += len(chunk)
                i += len(chunk)
        if body:
            emit()

    def tick(self, now):
        if now > self.now:
            self.now = now
        self.send(self.now)

    def finish(self):
        """The end: what waits is sent; TCP collectors get IPFIX_FINISH_WAIT to read it."""
        self.send(self.now)
        deadline = time.monotonic() + IPFIX_FINISH_WAIT
        for col in self.collectors:
            while col.buffer and col.connected and time.monotonic() < deadline:
                select.select([], [col.sock], [], max(0.0, deadline - time.monotonic()))
                col.pump(self.now)
        return True

    def snapshot(self):
        return IpfixSnapshot(tuple((c.name, c.messages, c.records, c.errors, c.dropped)
                                   for c in self.collectors), self.domain)


def ipfix_document(snap, how, top=None):
    ipfix = snap.get("ipfix")
    if ipfix is None:
        return None
    return {**_envelope(snap, how), "domain": ipfix.domain,
            "collectors": [{"collector": name, "messages": m, "records": r, "send_errors": e,
                            "flows_dropped": d} for name, m, r, e, d in ipfix.collectors]}


def ipfix_metrics(c, snap):
    """The flow export's families (a row of STAGES); none without --ipfix."""
    from prometheus_client.core import CounterMetricFamily
    ipfix = snap.get("ipfix")
    if ipfix is None:
        return
    for i, (name, doc) in enumerate((
            ("messages", "IPFIX messages sent."),
            ("records", "IPFIX data records sent."),
            ("send_errors", "IPFIX messages a collector did not take (refused, unreachable, "
                            "its buffer full) and failed TCP connections."),
            ("flows_dropped", "Flow records a collector lost: not connected, its buffer full, "
                              "a send refused."))):
        yield metric_family(CounterMetricFamily, f"lpd_ipfix_{name}", doc, ["collector"],
                            [((row[0],), row[1 + i]) for row in ipfix.collectors])


def ipfix_table(doc):
    """--output table's flow export: per collector, what went."""
    header = ("collector", "messages", "records", "send errors", "flows dropped")
    return ([f"\nIPFIX, observation domain {doc['domain']}:\n"] +
            _columns(header, [[d["collector"], str(d["messages"]), str(d["records"]),
                               str(d["send_errors"]), str(d["flows_dropped"])]
                              for d in doc["collectors"]], header[1:]))


def default_domain(interface, worker=0):
    """A stable observation domain of this host and interface (one per worker)."""
    return (zlib.crc32(f"{socket.gethostname()}/{interface or ''}".encode()) + worker) % (1 << 31)


def _flow_export(opts, w, built):
    """--ipfix: reports of the connections stage (built before it) go to the collectors."""
    if not opts.ipfix:
        return None
    worker = opts.worker_of[0] if opts.worker_of else 0
    domain = default_domain(opts.interface) if opts.ipfix_domain is None else opts.ipfix_domain
    try:
        ifindex = socket.if_nametoindex(opts.interface) if opts.interface and not opts.read_file else 0
    except OSError:
        ifindex = 0                                # not there yet (--wait-interface)
    export = FlowExport(opts.ipfix, (domain + worker) % (1 << 32), opts.ipfix_biflow,
                        opts.ipfix_template_interval, ifindex)
    conns = built[Connections.name]
    conns.report, conns.active_timeout = export.report, opts.flow_active_timeout
    return export


STAGES.append(Stage(FlowExport, _flow_export, (("ipfix", ipfix_document),), ipfix_metrics,
                    ipfix_table))


###############################################################################
# 15 Names: passive DNS and TLS ###############################################
###############################################################################
# provides: DNS_PORT, names_ports, TLS_HANDSHAKE_START, TLS_HELLOS_MAX, TLS_RECORD,
#   TLS_RECORD_LEN_OFF
#
# Who the remotes are, from the DNS answers the local hosts receive and the TLS hellos
# that name a connection's server (issue 27): the DNS messages (15.1), the hellos (15.2),
# the stage that names remote addresses and writes dns.log (15.3), and the one that
# reads the hellos on every TCP port, names their servers and writes ssl.log (15.4).
# A stage like those of 14 (its row in STAGES), a chapter of its own because 14 is full.


###############################################################################
# 15.1 DNS messages (RFC 1035, read from bytes lpd did not write) ############
# provides: DNS_ADDRESS_LEN, DnsError, parse_dns
#
# RFC 1035 messages as a resolver's answers carry them, read from bytes lpd did not
# write: every length checked against what is there, a name's compression pointers
# followed only backwards (each to an offset before the one it left: a loop or a
# forward chain cannot run, whatever the bytes), a name at most 255 octets, a label 63.
# What does not hold stops the reading with its reason (the message's `error`, for its
# caller to count), never an exception of another kind; what was read before it stays.

DNS_HEADER = struct.Struct("!HHHHHH")       # id, flags, questions, answers, authority, additional
DNS_QUESTION = struct.Struct("!HH")         # type, class
DNS_RR = struct.Struct("!HHIH")             # type, class, TTL, data length
DNS_POINTER = 0xC0                          # a length byte with both top bits: a pointer
DNS_POINTER_MASK = 0x3FFF
DNS_NAME_MAX = 255                          # octets of a name, its length bytes included
DNS_RCODE_MASK = 0xF
DNS_RECORDS_MAX = 256                       # records read per message (a reply holds a few)
DNS_A, DNS_CNAME, DNS_AAAA = 1, 5, 28
DNS_ADDRESS_LEN = {DNS_A: 4, DNS_AAAA: 16}
# The fixed fields before what dns.log writes of a record (RFC 1035, 2782, 3403, 4034,
# 4255, 1876): MX's preference, SRV's priority, weight and port, then the ones read
DNS_MX_SKIP, DNS_SRV_SKIP = 2, 6
DNS_NAPTR_HEAD = struct.Struct("!HH")       # order, preference
DNS_RRSIG_HEAD = struct.Struct("!HBBIIIH")  # type covered, algorithm, labels, TTL, times, key tag
DNS_DNSKEY_HEAD = struct.Struct("!HBB")     # flags, protocol, algorithm
DNS_DS_HEAD = struct.Struct("!HBB")         # key tag, algorithm, digest type
DNS_SSHFP_HEAD = struct.Struct("!BB")       # algorithm, fingerprint type
DNS_LOC_HEAD = struct.Struct("!BBBB")       # version, size, horizontal and vertical precision
DNS_ROOT_SIGNER = "<Root>"                  # Zeek's RRSIG signer when it is the root


class DnsError(ValueError):
    """A message that is not one: its reason (truncated, label, name_too_long, pointer)."""


class DnsRecord(NamedTuple):
    name: str
    type: int
    ttl: int
    value: object                  # A/AAAA: raw address bytes; an answer's dns.log text ("": none)


class DnsMessage(NamedTuple):
    id: int
    flags: int
    question: tuple                # (name, type, class), or () for none
    answers: tuple                 # DnsRecords of the answer section
    others: tuple                  # and of the authority and additional sections
    error: str = None              # why reading stopped early (DnsError's reasons), or None

    @property
    def rcode(self):
        return self.flags & DNS_RCODE_MASK


def dns_name(buf, off):
    """(the name at off as text, the offset after it where it sits): labels in ASCII
    lower case, escaped as Zeek prints them (a byte outside printable ASCII, a dot in a
    label: \\xHH), "" for the root."""
    labels, size, end, floor = [], 0, None, off
    while True:
        if off >= len(buf):
            raise DnsError("truncated")
        n = buf[off]
        if n & DNS_POINTER == DNS_POINTER:
            if off + 2 > len(buf):
                raise DnsError("truncated")
            target = (n << 8 | buf[off + 1]) & DNS_POINTER_MASK
            if target >= floor:
                raise DnsError("pointer")          # forwards or onto itself: a loop
            if end is None:
                end = off + 2
            off = floor = target
            continue
        if n & DNS_POINTER:
            raise DnsError("label")               # 0x40 and 0x80: extended labels, unused
        if n == 0:
            return ".".join(labels), off + 1 if end is None else end
        if off + 1 + n > len(buf):
            raise DnsError("truncated")
        size += n + 1
        if size > DNS_NAME_MAX:
            raise DnsError("name_too_long")
        labels.append("".join(chr(b).lower() if 0x20 < b < 0x7F and b != 0x2E else f"\\x{b:02x}"
                              for b in buf[off + 1:off + 1 + n]))
        off += 1 + n


def _rdata_name(buf, off, end, skip=0):
    """The name `skip` octets into a record's data, which must hold it."""
    if off + skip > end:
        raise DnsError("rdata")
    name, after = dns_name(buf, off + skip)
    if after > end:
        raise DnsError("rdata")
    return name


def _rdata_fixed(buf, off, end, layout):
    """The fixed fields (a struct.Struct) a record's data starts with."""
    if off + layout.size > end:
        raise DnsError("rdata")
    return layout.unpack_from(buf, off)


def _rdata_string(buf, off, end):
    """(one character-string (RFC 1035 3.3: a length octet, the bytes) as Zeek's JSON
    writer prints bytes: printable ASCII as is, others \\xHH; the offset after it)."""
    if off >= end or off + 1 + buf[off] > end:
        raise DnsError("rdata")
    n = buf[off]
    return "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}"
                   for b in buf[off + 1:off + 1 + n]), off + 1 + n


def _rdata_txt(buf, off, end, kind):
    """TXT and SPF: each string as "KIND <length> <string>", one space between."""
    out = []
    while off < end:
        text, after = _rdata_string(buf, off, end)
        out.append(f"{kind} {buf[off]} {text}")
        off = after
    return " ".join(out)


def _rdata_naptr(buf, off, end):
    """RFC 3403 as Zeek's dns_NAPTR_reply joins it: "NAPTR order preference flags service
    regexp replacement" (regexp and replacement each only when not empty)."""
    order, preference = _rdata_fixed(buf, off, end, DNS_NAPTR_HEAD)
    off += DNS_NAPTR_HEAD.size
    strings = []
    for _ in range(3):                     # flags, service, regexp
        text, off = _rdata_string(buf, off, end)
        strings.append(text)
    flags, service, regexp = strings
    tail = " ".join(t for t in (regexp, _rdata_name(buf, off, end)) if t)
    return f"NAPTR {order} {preference} {flags} {service} {tail}"


def _rdata_rrsig(buf, off, end, owner):
    covered = _rdata_fixed(buf, off, end, DNS_RRSIG_HEAD)[0]
    return f"RRSIG {covered} {_rdata_name(buf, off, end, DNS_RRSIG_HEAD.size) or DNS_ROOT_SIGNER}"


def _rdata_sshfp(buf, off, end, owner):
    _rdata_fixed(buf, off, end, DNS_SSHFP_HEAD)
    return f"SSHFP: {bytes(buf[off + DNS_SSHFP_HEAD.size:end]).hex()}"


# dns.log's `answers` text of each record type as Zeek's base/protocols/dns/main.zeek
# writes it (its dns_*_reply handlers): fn(buf, rdata offset, rdata end, owner name).
# A type Zeek's analyzer parses without a handler that writes text is DNS_RDATA_SILENT;
# one it does not know at all is "<unknown type=N>" (dns_unknown_reply).
DNS_RDATA_TEXT = {
    2: lambda b, o, e, n: _rdata_name(b, o, e),                     # NS
    DNS_CNAME: lambda b, o, e, n: _rdata_name(b, o, e),
    12: lambda b, o, e, n: _rdata_name(b, o, e),                    # PTR
    6: lambda b, o, e, n: _rdata_name(b, o, e),                     # SOA: its mname
    15: lambda b, o, e, n: _rdata_name(b, o, e, DNS_MX_SKIP),       # MX: the exchange only
    33: lambda b, o, e, n: _rdata_name(b, o, e, DNS_SRV_SKIP),      # SRV: the target only
    16: lambda b, o, e, n: _rdata_txt(b, o, e, "TXT"),
    99: lambda b, o, e, n: _rdata_txt(b, o, e, "SPF"),
    35: lambda b, o, e, n: _rdata_naptr(b, o, e),
    46: _rdata_rrsig,
    48: lambda b, o, e, n: f"DNSKEY {_rdata_fixed(b, o, e, DNS_DNSKEY_HEAD)[2]}",
    47: lambda b, o, e, n: f"NSEC {n} {_rdata_name(b, o, e)}",
    50: lambda b, o, e, n: "NSEC3",
    51: lambda b, o, e, n: "NSEC3PARAM",
    43: lambda b, o, e, n: "DS {1} {2}".format(*_rdata_fixed(b, o, e, DNS_DS_HEAD)),
    65534: lambda b, o, e, n: "BIND9 signing signal",
    44: _rdata_sshfp,
    29: lambda b, o, e, n: "LOC:  {1} {2} {3}".format(*_rdata_fixed(b, o, e, DNS_LOC_HEAD)),
}
# WKS, HINFO, NetBIOS NBSTAT, OPT, A6, TKEY, TSIG, SVCB, HTTPS, CAA: parsed, not written
DNS_RDATA_SILENT = frozenset((11, 13, 32, 38, 41, 249, 250, 64, 65, 257))


def dns_rdata_text(buf, off, end, rtype, owner):
    """A record's data as dns.log's `answers` writes it, "" for none (DNS_RDATA_TEXT)."""
    if rtype in DNS_RDATA_SILENT:
        return ""
    text = DNS_RDATA_TEXT.get(rtype)
    return text(buf, off, end, owner) if text is not None else f"<unknown type={rtype}>"


def parse_dns(buf):
    """A DNS message (UDP payload, or a TCP message without its length prefix): its
    header, first question and records (DNS_RECORDS_MAX at most) up to the first thing
    that does not hold, whose reason is its `error` (a capture cut short still gives the
    answers before the cut). DnsError when not even the header is there."""
    if len(buf) < DNS_HEADER.size:
        raise DnsError("truncated")
    ident, flags, qd, an, ns, ar = DNS_HEADER.unpack_from(buf)
    question, records, error = (), [], None
    try:
        off = DNS_HEADER.size
        for i in range(qd):
            name, off = dns_name(buf, off)
            if off + DNS_QUESTION.size > len(buf):
                raise DnsError("truncated")
            qtype, qclass = DNS_QUESTION.unpack_from(buf, off)
            off += DNS_QUESTION.size
            if i == 0:
                question = (name, qtype, qclass)
        for i in range(min(an + ns + ar, DNS_RECORDS_MAX)):
            name, off = dns_name(buf, off)
            if off + DNS_RR.size > len(buf):
                raise DnsError("truncated")
            rtype, _, ttl, size = DNS_RR.unpack_from(buf, off)
            off += DNS_RR.size
            if off + size > len(buf):
                raise DnsError("truncated")
            if rtype in DNS_ADDRESS_LEN:
                if size != DNS_ADDRESS_LEN[rtype]:
                    raise DnsError("rdata")
                value = bytes(buf[off:off + size])
            elif i < an:                  # the answer section's: dns.log writes those only
                value = dns_rdata_text(buf, off, off + size, rtype, name)
            else:
                value = None
            records.append(DnsRecord(name, rtype, ttl, value))
            off += size
    except DnsError as e:
        error = str(e)
    return DnsMessage(ident, flags, question, tuple(records[:an]), tuple(records[an:]), error)


###############################################################################
# 15.2 TLS handshakes (ClientHello, ServerHello, JA4) #########################
# provides: ja4, read_tls_hello, tls_cipher_name, TLS_CLIENT_HELLO, TLS_HANDSHAKE_START,
#   TLS_HELLO_MAX, TLS_NOT_HELLO, TLS_PARSE_ERRORS, TLS_RECORD, TLS_RECORD_LEN_OFF,
#   tls_version, tls_version_name
#
# The first handshake message of each direction of a TLS connection, read from bytes
# lpd did not write: the ClientHello (RFC 8446 4.1.2; RFC 5246 7.4.1.2 before it) and
# the ServerHello (4.1.3), with what names a connection (SNI, ALPN), what Zeek's ssl.log
# prints (version, cipher) and the JA4 client fingerprint (FoxIO's technical_details/
# JA4.md). A direction's stream is handed over from its first byte: the message may span
# several records and a record several segments, so the reading answers the number of
# bytes it needs when they are not all there yet, and never looks at more than
# TLS_HELLO_MAX. Every length is checked against what is there and against what holds
# it; what does not fit is a reason (TLS_PARSE_ERRORS), never an exception.

TLS_RECORD = struct.Struct("!BBBH")         # content type, version major, minor, length
TLS_RECORD_LEN_OFF = 3                      # ... the length's offset in it
TLS_HANDSHAKE_HEADER = struct.Struct("!I")  # the type in the top byte, then a 24-bit length
TLS_U16 = struct.Struct("!H")
TLS_CONTENT_HANDSHAKE = 22
TLS_MAJOR = 3                               # SSL 3.0 ... TLS 1.3 records all say 3.x
TLS_MINOR_MAX = 4                           # no stack sends a record version past 3.4
TLS_HANDSHAKE_START = bytes((TLS_CONTENT_HANDSHAKE, TLS_MAJOR))   # how every handshake record begins
# RFC 5246 6.2.3: a record's fragment is at most 2^14 bytes, 2^14 + 2048 once protected.
# A hello's record should keep to 2^14; the record layer's own bound is the one checked,
# so that no stack's record is taken for something else.
TLS_RECORD_MAX = (1 << 14) + 2048
TLS_CLIENT_HELLO, TLS_SERVER_HELLO = 1, 2
TLS_LENGTH_MASK = 0xFFFFFF
TLS_HELLOS = (TLS_CLIENT_HELLO, TLS_SERVER_HELLO)
# A hello past 2^14 bytes (one plaintext record's worth) is no client's or server's: the
# largest real ones, a ClientHello with a post-quantum key share (X25519MLKEM768: 1,216
# bytes) and padding, are under 2 KiB. A hello split into more than TLS_HELLO_RECORDS
# records is refused too (stacks use one or two), so TLS_HELLO_MAX, the most of a
# direction's stream kept waiting for the whole message, is that message and the headers
# of its records: 16,464 bytes.
TLS_HELLO_BODY_MAX = 1 << 14
TLS_HELLO_RECORDS = 16
TLS_HELLO_MAX = TLS_HELLO_BODY_MAX + TLS_HELLO_RECORDS * TLS_RECORD.size
# not a handshake record or not a hello; lengths that do not agree; past TLS_HELLO_MAX
TLS_NOT_HELLO = "not_hello"
TLS_PARSE_ERRORS = (TLS_NOT_HELLO, "malformed", "too_long")
TLS_RANDOM_LEN = 32
TLS_SESSION_ID_MAX = 32
TLS_BYTE = 1                                # SNI's name type; a ServerHello's compression method
TLS_LEN8, TLS_LEN16 = 1, 2                  # a vector's length prefix: <..2^8-1>, <..2^16-1>
TLS_EXT_SERVER_NAME, TLS_EXT_ALPN, TLS_EXT_SIGNATURE_ALGORITHMS = 0, 16, 13
TLS_EXT_SUPPORTED_VERSIONS = 43
TLS_SNI_HOST_NAME = 0                       # RFC 6066 3: the only name type defined
TLS_SERVER_NAME_MAX = 255                   # a DNS name's octets: a longer SNI is cut there
# RFC 8701: GREASE values are 0x?A?A with both bytes equal; ignored wherever JA4 counts
TLS_GREASE_MASK, TLS_GREASE_BITS = 0x0F0F, 0x0A0A
TLS_BYTE_BITS = 8
TLS_BYTE_MASK = 0xFF
# Zeek's ssl.log names (base/protocols/ssl/consts.zeek, version_strings); TLS 1.3's
# drafts (0x7Fnn) and the rest print as Zeek prints them
TLS_VERSION_NAMES = {0x0002: "SSLv2", 0x0300: "SSLv3", 0x0301: "TLSv10", 0x0302: "TLSv11",
                     0x0303: "TLSv12", 0x0304: "TLSv13", 0xFEFF: "DTLSv10", 0xFEFD: "DTLSv12",
                     0xFEFC: "DTLSv13"}
TLS_DRAFT_DIVISOR, TLS_DRAFT_QUOTIENT, TLS_DRAFT_MODULUS = 0xFF, 0x7F, 0x7F
# Zeek's cipher_desc names (IANA's) of the suites clients and servers send today, and the
# two signalling values; any other prints as Zeek prints it
TLS_CIPHER_NAMES = {
    0x0004: "TLS_RSA_WITH_RC4_128_MD5", 0x0005: "TLS_RSA_WITH_RC4_128_SHA",
    0x000A: "TLS_RSA_WITH_3DES_EDE_CBC_SHA", 0x0013: "TLS_DHE_DSS_WITH_3DES_EDE_CBC_SHA",
    0x0016: "TLS_DHE_RSA_WITH_3DES_EDE_CBC_SHA", 0x002F: "TLS_RSA_WITH_AES_128_CBC_SHA",
    0x0032: "TLS_DHE_DSS_WITH_AES_128_CBC_SHA", 0x0033: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA",
    0x0035: "TLS_RSA_WITH_AES_256_CBC_SHA", 0x0038: "TLS_DHE_DSS_WITH_AES_256_CBC_SHA",
    0x0039: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA", 0x003C: "TLS_RSA_WITH_AES_128_CBC_SHA256",
    0x003D: "TLS_RSA_WITH_AES_256_CBC_SHA256", 0x0040: "TLS_DHE_DSS_WITH_AES_128_CBC_SHA256",
    0x0066: "TLS_DHE_DSS_WITH_RC4_128_SHA", 0x0067: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA256",
    0x006A: "TLS_DHE_DSS_WITH_AES_256_CBC_SHA256", 0x006B: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA256",
    0x009C: "TLS_RSA_WITH_AES_128_GCM_SHA256", 0x009D: "TLS_RSA_WITH_AES_256_GCM_SHA384",
    0x009E: "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", 0x009F: "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    0x00A2: "TLS_DHE_DSS_WITH_AES_128_GCM_SHA256", 0x00A3: "TLS_DHE_DSS_WITH_AES_256_GCM_SHA384",
    0x00FF: "TLS_EMPTY_RENEGOTIATION_INFO_SCSV",
    0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256", 0x1304: "TLS_AES_128_CCM_SHA256",
    0x1305: "TLS_AES_128_CCM_8_SHA256", 0x5600: "TLS_FALLBACK_SCSV",
    0xC007: "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA", 0xC008: "TLS_ECDHE_ECDSA_WITH_3DES_EDE_CBC_SHA",
    0xC009: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", 0xC00A: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    0xC011: "TLS_ECDHE_RSA_WITH_RC4_128_SHA", 0xC012: "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    0xC013: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", 0xC014: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    0xC023: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    0xC024: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
    0xC027: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
    0xC028: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCAA: "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}
# JA4.md "TLS and DTLS Version": two characters per version, "00" for any other
TLS_JA4_VERSIONS = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3",
                    0x0002: "s2", 0xFEFF: "d1", 0xFEFD: "d2", 0xFEFC: "d3"}
TLS_JA4_COUNT_MAX = 99                      # a count past two digits prints as 99
TLS_JA4_HASH_LEN = 12                       # hex digits of sha256 kept
TLS_JA4_EMPTY = "0" * TLS_JA4_HASH_LEN      # the hash of an empty list, JA4.md says
TLS_JA4_NO_ALPN = TLS_JA4_NO_VERSION = "00"
TLS_JA4_LEFT_OUT = (TLS_EXT_SERVER_NAME, TLS_EXT_ALPN)   # in JA4_a already, not in JA4_c


class TlsError(ValueError):
    """Inside the reading of a hello: its reason, one of TLS_PARSE_ERRORS."""


class TlsHello(NamedTuple):
    kind: int                      # TLS_CLIENT_HELLO or TLS_SERVER_HELLO
    legacy_version: int
    versions: tuple                # supported_versions: a client's as on the wire, a server's pick
    ciphers: tuple                 # a client's suites as on the wire (GREASE too), a server's one
    extensions: tuple              # extension types in wire order
    server_name: str               # SNI's first host_name, "" for none
    alpn: tuple                    # ALPN protocol names as text
    signature_algorithms: tuple    # wire order
    alpn_first: bytes              # the first ALPN name's bytes, as JA4 reads them


def tls_record_start(payload):
    """Whether a segment's payload begins with a TLS handshake record's header: cheap,
    for every candidate frame."""
    return (len(payload) >= TLS_RECORD.size and payload[0] == TLS_CONTENT_HANDSHAKE
            and payload[1] == TLS_MAJOR and payload[2] <= TLS_MINOR_MAX
            and 0 < (payload[3] << TLS_BYTE_BITS | payload[4]) <= TLS_RECORD_MAX)


def tls_grease(value):
    return (value & TLS_GREASE_MASK == TLS_GREASE_BITS
            and value >> TLS_BYTE_BITS == value & TLS_BYTE_MASK)


def tls_vector(buf, off, end, width):
    """(start, stop) of the vector at off whose length takes `width` bytes (TLS_LEN8 or
    TLS_LEN16), which must end by `end`."""
    if off + width > end:
        raise TlsError("malformed")
    n = buf[off] if width == TLS_LEN8 else TLS_U16.unpack_from(buf, off)[0]
    if off + width + n > end:
        raise TlsError("malformed")
    return off + width, off + width + n


def tls_u16s(buf, start, stop):
    if (stop - start) % TLS_U16.size:
        raise TlsError("malformed")
    return tuple(TLS_U16.unpack_from(buf, i)[0] for i in range(start, stop, TLS_U16.size))


def tls_text(raw):
    """Untrusted bytes as text: ASCII, anything else replaced."""
    return bytes(raw).decode("ascii", errors="replace")


def tls_server_name(buf, start, stop):
    """RFC 6066 3: the first host_name of server_name's list, cut to TLS_SERVER_NAME_MAX."""
    off, end = tls_vector(buf, start, stop, TLS_LEN16)
    if end != stop:
        raise TlsError("malformed")
    while off < end:                        # each entry takes 3 bytes at least
        kind = buf[off]
        name_start, name_stop = tls_vector(buf, off + TLS_BYTE, end, TLS_LEN16)
        if kind == TLS_SNI_HOST_NAME:
            return tls_text(buf[name_start:min(name_stop, name_start + TLS_SERVER_NAME_MAX)])
        off = name_stop
    return ""


def tls_alpn(buf, start, stop):
    """RFC 7301 3.1: the protocol names' bytes, in order."""
    off, end = tls_vector(buf, start, stop, TLS_LEN16)
    if end != stop:
        raise TlsError("malformed")
    names = []
    while off < end:                        # each name takes 1 byte at least
        name_start, off = tls_vector(buf, off, end, TLS_LEN8)
        names.append(bytes(buf[name_start:off]))
    return names


def tls_extensions(buf, off, end, kind):
    """The extensions block from off to end: (types, their fields as TlsHello's)."""
    types, fields = [], {}
    if off == end:
        return types, fields                # none at all: a pre-TLS 1.2 hello may end here
    off, stop = tls_vector(buf, off, end, TLS_LEN16)
    if stop != end:
        raise TlsError("malformed")
    while off < end:                        # each extension takes 4 bytes at least
        if off + 2 * TLS_U16.size > end:
            raise TlsError("malformed")
        ext = TLS_U16.unpack_from(buf, off)[0]
        start, off = tls_vector(buf, off + TLS_U16.size, end, TLS_LEN16)
        types.append(ext)
        # a repeat (RFC 8446 4.2 forbids it: the first counts); a server's SNI is empty
        if ext in fields or ext == TLS_EXT_SERVER_NAME and kind == TLS_SERVER_HELLO:
            continue
        if ext == TLS_EXT_SERVER_NAME:
            fields[ext] = tls_server_name(buf, start, off)
        elif ext == TLS_EXT_ALPN:
            fields[ext] = tls_alpn(buf, start, off)
        elif ext == TLS_EXT_SIGNATURE_ALGORITHMS:
            inner, after = tls_vector(buf, start, off, TLS_LEN16)
            if after != off:
                raise TlsError("malformed")
            fields[ext] = tls_u16s(buf, inner, after)
        elif ext == TLS_EXT_SUPPORTED_VERSIONS:
            if kind == TLS_CLIENT_HELLO:
                start, after = tls_vector(buf, start, off, TLS_LEN8)
                if after != off or after == start:
                    raise TlsError("malformed")
            fields[ext] = tls_u16s(buf, start, off)
    return types, fields


def tls_hello(buf, kind):
    """The hello message body buf (its handshake header taken off) as a TlsHello."""
    end = len(buf)
    if end < TLS_U16.size + TLS_RANDOM_LEN:
        raise TlsError("malformed")
    legacy_version = TLS_U16.unpack_from(buf, 0)[0]
    start, off = tls_vector(buf, TLS_U16.size + TLS_RANDOM_LEN, end, TLS_LEN8)
    if off - start > TLS_SESSION_ID_MAX:
        raise TlsError("malformed")
    if kind == TLS_CLIENT_HELLO:
        start, off = tls_vector(buf, off, end, TLS_LEN16)
        ciphers = tls_u16s(buf, start, off)
        start, off = tls_vector(buf, off, end, TLS_LEN8)       # compression methods
        if not ciphers or off == start:
            raise TlsError("malformed")
    else:
        if off + TLS_U16.size + TLS_BYTE > end:
            raise TlsError("malformed")
        ciphers = (TLS_U16.unpack_from(buf, off)[0],)
        off += TLS_U16.size + TLS_BYTE                  # the suite, the compression method
    types, fields = tls_extensions(buf, off, end, kind)
    alpn = fields.get(TLS_EXT_ALPN, ())
    versions = fields.get(TLS_EXT_SUPPORTED_VERSIONS, ())
    if kind == TLS_SERVER_HELLO and TLS_EXT_SUPPORTED_VERSIONS in fields and len(versions) != 1:
        raise TlsError("malformed")                     # a server selects one
    return TlsHello(kind, legacy_version, versions, ciphers, tuple(types),
                    fields.get(TLS_EXT_SERVER_NAME, ""), tuple(tls_text(a) for a in alpn),
                    fields.get(TLS_EXT_SIGNATURE_ALGORITHMS, ()), alpn[0] if alpn else b"")


def read_tls_hello(buf):
    """A direction's stream from its first byte: (TlsHello, None) when its first handshake
    message is there whole; (None, n) when it is not yet, n > len(buf) the bytes it
    needs at least (exactly, when the rest comes in one record); (None, reason) when it
    is no hello or not one that holds. Reads TLS_HELLO_MAX bytes at most."""
    try:
        hello, need = tls_records(buf)
    except TlsError as e:
        return None, str(e)
    if hello is None and need > TLS_HELLO_MAX:
        return None, "too_long"
    return hello, need


def tls_records(buf):
    """read_tls_hello's answer, the records walked one by one; raises TlsError."""
    message, off, need = bytearray(), 0, None
    for _ in range(TLS_HELLO_RECORDS):
        # the message bytes still missing: all its own once its header is read, else
        # (a lower bound) the rest of that header
        missing = (need or TLS_HANDSHAKE_HEADER.size) - len(message)
        if off + TLS_RECORD.size > len(buf):
            return None, off + TLS_RECORD.size + missing
        ctype, major, minor, size = TLS_RECORD.unpack_from(buf, off)
        if ctype != TLS_CONTENT_HANDSHAKE or major != TLS_MAJOR or minor > TLS_MINOR_MAX:
            # RFC 8446 5.1: no other record inside a handshake message
            raise TlsError(TLS_NOT_HELLO if off == 0 else "malformed")
        if size == 0 or size > TLS_RECORD_MAX:
            raise TlsError("malformed")
        off += TLS_RECORD.size
        message += buf[off:min(off + size, len(buf))]
        if message and message[0] not in TLS_HELLOS:
            raise TlsError(TLS_NOT_HELLO)
        if need is None and len(message) >= TLS_HANDSHAKE_HEADER.size:
            word = TLS_HANDSHAKE_HEADER.unpack_from(message)[0]
            need = TLS_HANDSHAKE_HEADER.size + (word & TLS_LENGTH_MASK)
            if need > TLS_HELLO_BODY_MAX:
                raise TlsError("too_long")
        if need is not None and len(message) >= need:
            body = memoryview(message)[TLS_HANDSHAKE_HEADER.size:need]
            return tls_hello(body, message[0]), None
        if off + size > len(buf):           # this record is cut: the rest of it, then more
            missing = (need or TLS_HANDSHAKE_HEADER.size) - len(message)
            cut = off + size - len(buf)
            if missing <= cut:
                return None, len(buf) + missing
            return None, off + size + TLS_RECORD.size + missing - cut
        off += size
    raise TlsError("too_long")


def tls_version(hello):
    """The version RFC 8446 4.2.1 makes it: a server's supported_versions choice, a
    client's highest offer (GREASE aside), else the hello's legacy_version."""
    offered = [v for v in hello.versions if not tls_grease(v)]
    return max(offered) if offered else hello.legacy_version


def tls_version_name(version):
    if version in TLS_VERSION_NAMES:
        return TLS_VERSION_NAMES[version]
    if version // TLS_DRAFT_DIVISOR == TLS_DRAFT_QUOTIENT:
        return f"TLSv13-draft{version % TLS_DRAFT_MODULUS}"
    return f"unknown-{version}"


def tls_cipher_name(cipher):
    if cipher in TLS_CIPHER_NAMES:
        return TLS_CIPHER_NAMES[cipher]
    return f"grease_0x{cipher:04X}" if tls_grease(cipher) else f"unknown-{cipher}"


def ja4_hash(text):
    """JA4.md: sha256 of the list's text, its first 12 hex digits; twelve 0s for an
    empty list."""
    if not text:
        return TLS_JA4_EMPTY
    return hashlib.sha256(text.encode()).hexdigest()[:TLS_JA4_HASH_LEN]


def ja4_alpn(name):
    """JA4.md "ALPN Extension Value": the first and last characters of the first ALPN
    name when both are ASCII letters or digits, else the first and last of its hex."""
    if not name:
        return TLS_JA4_NO_ALPN
    ends = bytes((name[0], name[-1]))
    return ends.decode() if ends.isalnum() else name.hex()[0] + name.hex()[-1]   # ASCII only


def ja4(hello, transport="t"):
    """A ClientHello's JA4 (FoxIO's technical_details/JA4.md): transport "t" (TCP), "q"
    (QUIC) or "d" (DTLS); GREASE ignored everywhere."""
    ciphers = [f"{c:04x}" for c in hello.ciphers if not tls_grease(c)]
    extensions = [e for e in hello.extensions if not tls_grease(e)]
    version = TLS_JA4_VERSIONS.get(tls_version(hello), TLS_JA4_NO_VERSION)
    a = (f"{transport}{version}{'d' if TLS_EXT_SERVER_NAME in extensions else 'i'}"
         f"{min(len(ciphers), TLS_JA4_COUNT_MAX):02d}{min(len(extensions), TLS_JA4_COUNT_MAX):02d}"
         f"{ja4_alpn(hello.alpn_first)}")
    kept = ",".join(sorted(f"{e:04x}" for e in extensions if e not in TLS_JA4_LEFT_OUT))
    algorithms = ",".join(f"{s:04x}" for s in hello.signature_algorithms if not tls_grease(s))
    if algorithms:                          # none: the list ends without the "_"
        kept += "_" + algorithms
    return f"{a}_{ja4_hash(','.join(sorted(ciphers)))}_{ja4_hash(kept)}"


###############################################################################
# 15.3 Names (--names) ########################################################
# provides: DNS_PORT, finish_expired, hot_key, Names, names_ports
#
# The DNS answers the hosts receive on port 53, UDP and TCP (UDP 5353 with --names-mdns),
# read with parse_dns (15.1): each answer is matched to its query (client and server
# address and port, transaction id) for Zeek's dns.log (--dns-log) and its rtt, each A/AAAA
# answer names its address: the query name the host looked up, and the CNAME chain's end
# (the owner of the address record). A name lasts its TTL plus DNS_NAME_GRACE: a host
# connects after its resolver's answer, and keeps a connection past the TTL.
#
# The names table is bounded (--names-max) and segmented (SLRU): a new name enters the
# probationary segment; it is promoted to the protected one (at most
# NAMES_PROTECTED_FRACTION of the table) when a local host sends to its address (in the
# interval before the answer, or while the name is still on probation) or looks it up
# again in a matched answer. A new name only ever evicts the probationary segment's least
# recent one, and a protected name leaves only by expiry or when other promotions push
# it back to probation: a flood of answers, unmatched or of addresses no local host then
# talks to, churns the probationary segment and cannot touch the names of the remotes in
# use. len(table) <= --names-max always. What the flood can take: a name whose address
# is first used only after more newer answers than probation holds.
#
# Both engines hand this stage its ports' frames whole (whole_ports: the classic
# kernel program's judge, the eBPF CopyPlan's ports and udp_ports). Over TCP each
# direction's bytes are read in sequence order, a resent segment's new bytes only; an
# early segment (a hole) ends the reading of that stream, counted as a gap, as does a
# stream pushed out by DNS_TCP_STREAMS_MAX newer ones. The classic engine hands it the
# remotes a local host sends to in each batch; the eBPF engine counts them in the kernel,
# so with --remote the stage also reads, at each tick, the bytes the remote stage counted
# per remote in the interval (RemoteDeltas, either engine): one sent to is in use. Under
# ebpf without --remote a name is promoted by a matched re-lookup only.

DNS_PORT, MDNS_PORT = 53, 5353
DNS_QR = 0x8000                             # the header's flags: a response
DNS_AA, DNS_TC, DNS_RD, DNS_RA = 0x0400, 0x0200, 0x0100, 0x0080
DNS_Z_SHIFT, DNS_Z_MASK = 4, 0x7
DNS_NAME_GRACE = 300.0                      # seconds a name outlives its TTL
DNS_PENDING_MAX = 4096                      # queries waiting for their answer; the oldest goes
DNS_QUERY_TIMEOUT = 30.0                    # a query unanswered this long is logged without one
DNS_TICK_WORK = 4096                        # timed-out queries logged per tick
NAMES_PROTECTED_FRACTION = 0.8
# 15.1's reasons; then a TCP stream's: bytes missing (its messages are skipped until it
# ends), dropped for room (DNS_TCP_STREAMS_MAX)
DNS_PARSE_ERRORS = ("truncated", "label", "name_too_long", "pointer", "rdata", "gap", "evicted")
DNS_TCP_LENGTH = struct.Struct("!H")        # RFC 1035 4.2.2: each message over TCP after its length
# TCP streams read at once, each holding at most one message in part (64 KiB): 16 MiB
DNS_TCP_STREAMS_MAX = 256
# Zeek's names (base/protocols/dns/consts.zeek); others print as Zeek does: query-N, ...
DNS_QTYPE_NAMES = {1: "A", 2: "NS", 3: "MD", 4: "MF", 5: "CNAME", 6: "SOA", 7: "MB", 8: "MG",
                   9: "MR", 10: "NULL", 11: "WKS", 12: "PTR", 13: "HINFO", 14: "MINFO", 15: "MX",
                   16: "TXT", 17: "RP", 18: "AFSDB", 24: "SIG", 25: "KEY", 28: "AAAA", 29: "LOC",
                   33: "SRV", 35: "NAPTR", 36: "KX", 37: "CERT", 38: "A6", 39: "DNAME", 41: "OPT",
                   42: "APL", 43: "DS", 44: "SSHFP", 45: "IPSECKEY", 46: "RRSIG", 47: "NSEC",
                   48: "DNSKEY", 49: "DHCID", 50: "NSEC3", 51: "NSEC3PARAM", 52: "TLSA",
                   53: "SMIMEA", 55: "HIP", 59: "CDS", 60: "CDNSKEY", 61: "OPENPGPKEY",
                   64: "SVCB", 65: "HTTPS", 99: "SPF", 249: "TKEY", 250: "TSIG", 251: "IXFR",
                   252: "AXFR", 253: "MAILB", 254: "MAILA", 255: "*", 256: "URI", 257: "CAA",
                   32768: "TA", 32769: "DLV"}
DNS_QCLASS_NAMES = {1: "C_INTERNET", 3: "C_CHAOS", 4: "C_HESIOD", 254: "C_NONE", 255: "C_ANY"}
DNS_RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
                   5: "REFUSED", 6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH",
                   10: "NOTZONE"}
# dns.log's fields in Zeek's order; a record has those it knows (no rtt without an answer)
DNS_LOG_FIELDS = ("ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto",
                  "trans_id", "rtt", "query", "qclass", "qclass_name", "qtype", "qtype_name",
                  "rcode", "rcode_name", "AA", "TC", "RD", "RA", "Z", "answers", "TTLs", "rejected")


def hot_key(raw):
    """4 or 16 raw address bytes -> the decoder's key (an int for IPv4, bytes for IPv6)."""
    return int.from_bytes(raw, "big") if len(raw) == 4 else bytes(raw)


class NameTable:
    """address key -> [query name, CNAME target or "", expiry, answer time]: the SLRU of the
    chapter's head, len() <= size."""

    def __init__(self, size):
        self.size = size
        self.protected_max = min(size - 1, int(size * NAMES_PROTECTED_FRACTION))
        self.probation = collections.OrderedDict()
        self.protected = collections.OrderedDict()
        self.evictions = 0
        self.changed = True

    def __len__(self):
        return len(self.probation) + len(self.protected)

    def get(self, key):
        e = self.protected.get(key)
        return self.probation.get(key) if e is None else e

    def answer(self, key, query, target, expires, promote, used=False, seen=0.0):
        """An address record's name, answered at `seen`; promote: a matched answer (a
        local host asked), which protects a name already there; used: a local host has
        just sent to the address, which protects it at once."""
        self.changed = True
        e = self.protected.get(key)
        if e is not None:
            e[:] = query, target, max(e[2], expires), seen
            self.protected.move_to_end(key)
            return
        e = self.probation.pop(key, None)
        if e is not None:
            e[:] = query, target, max(e[2], expires), seen
            if promote:
                self._protect(key, e)
            else:
                self.probation[key] = e
            return
        if len(self) >= self.size:
            self.probation.popitem(last=False)       # never empty: protected_max < size
            self.evictions += 1
        e = [query, target, expires, seen]
        if used:
            self._protect(key, e)
        else:
            self.probation[key] = e

    def used(self, key, until):
        """A local host sent to key: its name, if any, is protected and lasts until then."""
        e = self.protected.get(key)
        if e is not None:
            self.protected.move_to_end(key)
        else:
            e = self.probation.pop(key, None)
            if e is None:
                return
            self._protect(key, e)
        if until > e[2]:
            e[2] = until
            self.changed = True

    def _protect(self, key, e):
        self.changed = True
        self.protected[key] = e
        if len(self.protected) > self.protected_max:
            old, oe = self.protected.popitem(last=False)
            self.probation[old] = oe                  # back to probation, its most recent

    def expire(self, now):
        for seg in (self.probation, self.protected):
            dead = [k for k, e in seg.items() if e[2] <= now]
            for k in dead:
                del seg[k]
            if dead:
                self.changed = True


class RemoteDeltas:
    """The bytes each remote carried since the last take(), from the remote stage's
    table (14.2) whichever engine counted them: the classic decoder's batches or the
    kernel's maps, drained into it at the tick (17.4). One pass over the remotes
    counted in the interval, nothing per frame. An entry evicted and entered again
    counts from zero: what it carried between the last take and its eviction is lost
    with it, as in the remote table (within its error bound)."""

    def __init__(self, remotes):
        self.remotes = remotes
        remotes.follow()
        self.seen = {}                  # key -> (entry, tx bytes, rx bytes) at the last take

    def take(self):
        """[(key, tx bytes, rx bytes)] of the remotes that carried any since the last call."""
        out, seen = [], self.seen
        for key, e in self.remotes.take_counted().items():
            tx, rx = e[TX_BYTES], e[RX_BYTES]
            last = seen.get(key)
            if last is not None and last[0] is e:
                dtx, drx = tx - last[1], rx - last[2]
            else:
                dtx, drx = tx, rx
            seen[key] = (e, tx, rx)
            if dtx or drx:
                out.append((key, dtx, drx))
        if len(seen) > REMOTE_TRIM_FACTOR * len(self.remotes.table) + self.remotes.remote_max:
            table = self.remotes.table      # amortised: entries evicted since are forgotten
            self.seen = {k: v for k, v in seen.items() if table.get(k) is v[0]}
        return out


def merge_domains(a, b):
    """Workers' domain rows summed by domain (each worker has its K: at most K per worker)."""
    sums = {}
    for domain, tx, rx in a + b:
        e = sums.setdefault(domain, [0, 0])
        e[0] += tx
        e[1] += rx
    other = sums.pop(DOMAIN_OTHER, None)
    return tuple((d, *e) for d, e in sums.items()) + (((DOMAIN_OTHER, *other),) if other else ())


class NamesSnapshot(NamedTuple):
    names: tuple = ()              # ((version, key), query, target, expiry, answered), protected first
    parse_errors: tuple = ()       # (reason, count)
    evictions: int = 0
    pending_evictions: int = 0     # queries dropped unanswered to keep DNS_PENDING_MAX
    unmatched: int = 0             # responses to no query lpd saw
    queries: int = 0
    responses: int = 0
    domains: tuple = ()            # (domain, tx bytes, rx bytes), DOMAIN_OTHER's last (DomainTraffic)

    def merge(self, other):
        """Workers' union: each saw its own flows' answers."""
        errors = dict(self.parse_errors)
        for r, n in other.parse_errors:
            errors[r] = errors.get(r, 0) + n
        return NamesSnapshot(self.names + other.names, tuple(errors.items()),
                             self.evictions + other.evictions,
                             self.pending_evictions + other.pending_evictions,
                             self.unmatched + other.unmatched, self.queries + other.queries,
                             self.responses + other.responses,
                             merge_domains(self.domains, other.domains))

    def by_key(self):
        """(version, key) -> the name the remote was last looked up by (workers' tables
        may both hold one: the later answer's)."""
        latest = {}
        for k, q, _, _, seen in self.names:
            if k not in latest or seen >= latest[k][1]:
                latest[k] = q, seen
        return {k: q for k, (q, _) in latest.items()}


def finish_expired(pending, before, finish, work):
    """finish(record) for the records of `pending` (an OrderedDict, oldest first) whose
    "ts" is before `before`, at most `work` of them; True when work ran out first."""
    for _ in range(work):
        if not pending or next(iter(pending.values()))["ts"] > before:
            return False
        finish(pending.popitem(last=False)[1])
    return bool(pending)


# Registered domains (eTLD+1) by the Public Suffix List (publicsuffix.org/list), read
# from Debian's `publicsuffix` package when it is installed: once, at the first name,
# its ICANN section only. The PRIVATE section lists hosting platforms' customer zones
# (cloudfront.net, github.io, s3.amazonaws.com ...): counted by it, one platform's bytes
# would split over as many domains as it has customers, each wanting a slot of K; by the
# ICANN section they count under the platform, the service the operator asks about.
# Without the file, the last two labels (a ccTLD's second level, example.co.uk, then
# counts as co.uk). A name with no label left of its public suffix has no domain: its
# bytes count as `other`.
PUBLIC_SUFFIX_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"
PSL_PRIVATE_MARK = "===BEGIN PRIVATE DOMAINS==="
FALLBACK_DOMAIN_LABELS = 2


class PublicSuffixList:
    """The PSL's rules (normal, *. wildcard, ! exception) and its algorithm: the
    prevailing rule is an exception if one matches, else the matching rule of most
    labels, else "*"; an exception's suffix is itself less its leftmost label."""

    def __init__(self, lines, private=False):
        self.exact, self.wild, self.exceptions = set(), set(), set()
        self.nodes = set()                  # every suffix of every rule: where a walk goes on
        for line in lines:
            if PSL_PRIVATE_MARK in line and not private:
                break
            words = line.split()            # a rule ends at the first white space
            if not words or words[0].startswith("//"):
                continue
            rule = psl_ascii(words[0])
            if rule.startswith("!"):
                rule = rule[1:]
                self.exceptions.add(rule)
            elif rule.startswith("*."):
                rule = rule[2:]
                self.wild.add(rule)
            else:
                self.exact.add(rule)
            parts = rule.split(".")
            self.nodes.update(".".join(parts[i:]) for i in range(len(parts)))

    def public_suffix_labels(self, labels):
        """How many of the labels (a name split at its dots) its public suffix has: the
        walk goes from the top label down while a rule lies below (`nodes`), so a
        name costs a lookup or three, not one per label."""
        n, best = len(labels), 1            # the default rule, "*"
        for j in range(1, n + 1):           # the suffix of the last j labels
            suffix = ".".join(labels[n - j:])
            if suffix in self.exceptions:
                return j - 1
            if suffix in self.exact:
                best = j
            if j < n and suffix in self.wild:
                best = j + 1                # *.suffix: one label more
            if suffix not in self.nodes:
                break
        return best

    def registered(self, name):
        """name's registered domain (its public suffix and one label more), or None."""
        if not name or name.startswith(".") or name.endswith(".."):
            return None
        labels = name.lower().rstrip(".").split(".")
        if "" in labels:
            return None
        k = self.public_suffix_labels(labels)
        return ".".join(labels[-k - 1:]) if len(labels) > k else None


def psl_ascii(rule):
    """A rule as names are on the wire: its Unicode labels in punycode (IDNA), lower case."""
    try:
        return rule.encode("idna").decode("ascii").lower()
    except UnicodeError:                   # a label IDNA 2003 refuses: never on the wire as is
        return rule.lower()


_psl = []                                   # [the list, or None without the file]: read once


def public_suffix_list():
    if not _psl:
        try:
            with open(PUBLIC_SUFFIX_LIST, encoding="utf-8") as f:
                _psl.append(PublicSuffixList(f))
        except OSError:
            _psl.append(None)
    return _psl[0]


def registered_domain(name):
    """The domain a name's traffic counts under (the PSL's, else its last two labels), or
    None (no label left of the suffix)."""
    psl = public_suffix_list()
    if psl is not None:
        return psl.registered(name)
    labels = [p for p in name.lower().split(".") if p]
    return ".".join(labels[-FALLBACK_DOMAIN_LABELS:]) if len(labels) >= FALLBACK_DOMAIN_LABELS else None


# Per-domain traffic (--names-domains K): the bytes of each named remote, per tick, under
# its name's registered domain. K domains have their own counters, `other` the rest. A
# domain keeps its counter while it carries bytes, so none decreases; one that carried
# nothing for DOMAIN_SLOT_IDLE frees its slot and its series disappears; admitted again
# within as long, it resumes its counts; later (an hour past Prometheus' 5-minute
# staleness) it is a new series from zero. A slot frees at most once per DOMAIN_SLOT_IDLE,
# so at most K freed domains are remembered.
# The domains without a slot are candidates, at most DOMAIN_CANDIDATES_MAX (trimmed to
# the heaviest when twice as many, as 14.2's table); at each tick a free slot goes to
# the candidate with the most bytes (this tick's counted in), which counts from that
# tick on (what it carried in earlier ticks stays in `other`). A candidate that carried
# nothing for DOMAIN_SLOT_IDLE is dropped.
# Memory: 2 K + 2 DOMAIN_CANDIDATES_MAX domains; series: 2 (K + 1) per capture process.
DOMAIN_SLOT_IDLE = 3600.0                   # seconds without bytes before a slot frees
DOMAIN_CANDIDATES_MAX = 1024
DOMAIN_OTHER = "other"


class DomainTraffic:
    """The K domains' counters ([tx bytes, rx bytes, last bytes at]) and `other`'s."""

    def __init__(self, k, names_max):
        """names_max: the names table's size, the most distinct names a tick brings:
        their domains are remembered (a PSL walk per name and tick cost 0.4 s at 65536)."""
        self.k = k
        self.domain_of = {}                 # name -> its domain, at most names_max
        self.names_max = names_max
        self.slots = {}                     # domain -> [tx, rx, last time it carried bytes]
        self.other = [0, 0]
        self.candidates = {}                # domain -> [bytes while without a slot, last time]
        self.retired = {}                   # domain -> (tx, rx, freed at): ~K (see above)

    def count(self, now, traffic):
        """traffic: (name, tx bytes, rx bytes) of the tick's named remotes. The tick's
        domains are candidates before the free slots are given, so a domain admitted
        now counts this tick's bytes; one admitted later counts from then on."""
        tick = {}                          # domain -> [tx, rx] of this tick
        domain_of = self.domain_of
        for name, tx, rx in traffic:
            if name in domain_of:
                domain = domain_of[name]
            else:
                if len(domain_of) >= self.names_max:
                    domain_of.clear()      # names that left the table go with the rest
                domain = domain_of[name] = registered_domain(name)
            e = tick.setdefault(domain, [0, 0])
            e[0] += tx
            e[1] += rx
        self.release(now, tick)
        self.nominate(now, tick)
        self.admit(now)
        other = self.other
        for domain, (tx, rx) in tick.items():
            e = self.slots.get(domain)
            if e is None:
                other[0] += tx
                other[1] += rx
            else:
                e[0] += tx
                e[1] += rx
                e[2] = now

    def nominate(self, now, tick):
        """The tick's domains without a slot join the candidates (bounded: the heaviest)."""
        slots, candidates = self.slots, self.candidates
        for domain, (tx, rx) in tick.items():
            if domain is not None and domain not in slots:
                c = candidates.setdefault(domain, [0, now])
                c[0] += tx + rx
                c[1] = now
        if len(candidates) > REMOTE_TRIM_FACTOR * DOMAIN_CANDIDATES_MAX:
            self.candidates = dict(heapq.nlargest(DOMAIN_CANDIDATES_MAX, candidates.items(),
                                                  key=lambda item: item[1][0]))

    def release(self, now, busy):
        """Slots and candidates idle for DOMAIN_SLOT_IDLE (and without bytes in this
        tick, `busy`) go; a freed slot's counts are kept as long again (`retired`), so
        a domain back within that time resumes them."""
        for domain in [d for d, e in self.slots.items()
                       if now - e[2] >= DOMAIN_SLOT_IDLE and d not in busy]:
            tx, rx, _ = self.slots.pop(domain)
            self.retired[domain] = (tx, rx, now)
        for table, at in ((self.candidates, 1), (self.retired, 2)):
            for domain in [d for d, e in table.items() if now - e[at] >= DOMAIN_SLOT_IDLE]:
                del table[domain]

    def admit(self, now):
        """Free slots to the heaviest candidates, from zero or from their retired counts."""
        room = self.k - len(self.slots)
        if room <= 0 or not self.candidates:
            return
        for domain, _ in heapq.nlargest(room, self.candidates.items(), key=lambda item: item[1][0]):
            del self.candidates[domain]
            tx, rx, _ = self.retired.pop(domain, (0, 0, now))
            self.slots[domain] = [tx, rx, now]

    def rows(self):
        """((domain, tx, rx) of each slot, then `other`'s)."""
        return tuple((d, e[0], e[1]) for d, e in self.slots.items()) + \
            ((DOMAIN_OTHER, *self.other),)


class Names(Consumer):
    """--names: DNS queries and answers on `ports` (UDP; TCP too for port 53: each
    direction's bytes in sequence order, a gap ends the reading of a stream), a NameTable
    of the answered addresses, `logged(record)` per query as a dns.log record."""
    name = "names"
    snapshot_type = NamesSnapshot
    wants = frozenset((WANT_RAW, WANT_TS, WANT_REMOTE))

    def __init__(self, ports=(DNS_PORT,), size=DEFAULT_NAMES_MAX, logged=None, conns=None,
                 remotes=None, domains=0):
        """conns: the Connections stage (--connections), whose uids the records take;
        remotes: the RemoteAddresses stage (--remote), whose bytes per tick protect the
        names in use under either engine (RemoteDeltas) and count under their domains,
        `domains` of them with their own counters (DomainTraffic; 0: none)."""
        self.ports = frozenset(ports)
        self.tcp_ports = self.ports & {DNS_PORT}   # mDNS is UDP only
        self.judged = {IPPROTO_UDP: self.ports, IPPROTO_TCP: self.tcp_ports}   # not_on_ports'
        self.streams = collections.OrderedDict()   # (src, sport, dst, dport) -> [next seq, bytes]
        self.table = NameTable(size)
        self.logged = logged
        self.conns = conns
        self.pending = collections.OrderedDict()  # (proto, client, cport, server, sport, id) -> record
        self.errors = dict.fromkeys(DNS_PARSE_ERRORS, 0)
        self.pending_evictions = self.unmatched = self.queries = self.responses = 0
        # Remotes local hosts sent to this interval and the last (each set at most the
        # table's size): an answer for one is protected at once, whichever of the answer
        # and the traffic the batch's lists hand over first.
        self.sent, self.sent_before = set(), set()
        self.now = 0.0
        self.rows = ()
        self.deltas = RemoteDeltas(remotes) if remotes is not None else None
        self.domains = DomainTraffic(domains, size) if domains and remotes is not None else None

    def whole_ports(self):
        return tuple(sorted(self.tcp_ports)), tuple(sorted(self.ports))

    def consume(self, batch):
        if batch.remote_tx:
            used, sent, until = self.table.used, self.sent, batch.time + DNS_NAME_GRACE
            for key, _, _ in batch.remote_tx:
                used(key, until)
                if len(sent) >= self.table.size:
                    self.sent_before, self.sent = sent, set()
                    sent = self.sent
                sent.add(key)
        ports = self.judged
        for data, ts, _, frames, _ in frames_in_order(batch):
            if not not_on_ports(data, ports):
                self.packet(data, ts, frames)

    def packet(self, data, ts, frames=1):
        """frames: how many the wire carried (a super-frame's UDP is segments, not a message)."""
        f = parse_l4(data)
        if f is None or f[0] == IP_FRAGMENT:       # a later fragment: no ports, no message
            return
        proto, src, dst, sport, dport, _, plen, flags, seq, *_, at = f
        if ts > self.now:
            self.now = ts
        if proto == IPPROTO_UDP and frames == 1 and (sport in self.ports or dport in self.ports):
            self.message(data[at:at + plen], ts, proto, src, sport, dst, dport)
        elif proto == IPPROTO_TCP and (sport in self.tcp_ports or dport in self.tcp_ports):
            payload = memoryview(data)[at:at + plen]
            if len(payload) < plen:
                payload = None                    # cut short: a gap
            self.segment(ts, src, sport, dst, dport, flags, seq, payload)

    def segment(self, ts, src, sport, dst, dport, flags, seq, payload):
        """One direction of a TCP stream: its bytes in order, then each whole message."""
        key = (src, sport, dst, dport)
        s = self.streams.get(key)
        if flags & TH_SYN:
            s = None
            self.streams.pop(key, None)
            seq = (seq + 1) % SEQ_MOD
        if s is None:
            if not (payload or flags & TH_SYN) or flags & TH_RST:
                return
            if len(self.streams) >= DNS_TCP_STREAMS_MAX:
                self.streams.popitem(last=False)
                self.errors["evicted"] += 1
            s = self.streams[key] = [seq, bytearray()]  # joined mid-stream: at a message, hopefully
        self.streams.move_to_end(key)
        if payload is None:
            self.errors["gap"] += 1
            del self.streams[key]
            return
        off = (seq - s[0]) % SEQ_MOD
        if off >= SEQ_HALF:                        # starts before what was read: its rest only
            payload = payload[SEQ_MOD - off:]
            off = 0
        if off:
            self.errors["gap"] += 1                # an early segment: DNS streams are short, not held
            del self.streams[key]
            return
        buf = s[1]
        buf += payload
        s[0] = (s[0] + len(payload)) % SEQ_MOD
        while len(buf) >= DNS_TCP_LENGTH.size:
            end = DNS_TCP_LENGTH.size + DNS_TCP_LENGTH.unpack_from(buf)[0]
            if len(buf) < end:
                break
            self.message(bytes(buf[DNS_TCP_LENGTH.size:end]), ts, IPPROTO_TCP, src, sport, dst, dport)
            del buf[:end]
        if flags & (TH_FIN | TH_RST):
            del self.streams[key]

    def message(self, payload, ts, proto, src, sport, dst, dport):
        try:
            msg = parse_dns(payload)
        except DnsError as e:
            self.errors[str(e)] += 1
            return
        if msg.error:
            self.errors[msg.error] += 1
        if msg.flags & DNS_QR:
            self.response(msg, ts, proto, src, sport, dst, dport)
        else:
            self.query(msg, ts, proto, src, sport, dst, dport)

    def _record(self, msg, ts, proto, ch, cp, sh, sp):
        name, qtype, qclass = msg.question or ("", None, None)
        rec = {"ts": round(ts, 6), "uid": self.uid(conn_key(proto, ch, cp, sh, sp)),
               "id.orig_h": raw_address(ch), "id.orig_p": cp, "id.resp_h": raw_address(sh),
               "id.resp_p": sp, "proto": proto_name(proto), "trans_id": msg.id}
        if msg.question:
            rec.update({"query": name, "qclass": qclass,
                        "qclass_name": DNS_QCLASS_NAMES.get(qclass, f"qclass-{qclass}"),
                        "qtype": qtype, "qtype_name": DNS_QTYPE_NAMES.get(qtype, f"query-{qtype}")})
        # as Zeek: the query's flags until the answer says its own (RD stays the query's)
        flags = msg.flags
        rec.update({"AA": False, "TC": bool(flags & DNS_TC), "RD": bool(flags & DNS_RD), "RA": False,
                    "Z": flags >> DNS_Z_SHIFT & DNS_Z_MASK, "rejected": False})
        return rec

    def uid(self, key):
        """The uid conn.log gives the flow (its connection is tracked before this stage
        reads the frame), else one of the 5-tuple's alone."""
        c = self.conns.table.get(key) if self.conns is not None else None
        return connection_uid(key, c.first if c is not None else None)

    def query(self, msg, ts, proto, src, sport, dst, dport):
        self.queries += 1
        key = (proto, src, sport, dst, dport, msg.id)
        if key in self.pending:
            self.finish_query(self.pending.pop(key))   # a retry: Zeek logs each query
        elif len(self.pending) >= DNS_PENDING_MAX:
            self.pending_evictions += 1
            self.finish_query(self.pending.popitem(last=False)[1])
        self.pending[key] = self._record(msg, ts, proto, src, sport, dst, dport)

    def response(self, msg, ts, proto, src, sport, dst, dport):
        self.responses += 1
        rec = self.pending.pop((proto, dst, dport, src, sport, msg.id), None)
        matched = rec is not None
        if matched:
            rec["rtt"] = round(ts - rec["ts"], 6)
        else:
            self.unmatched += 1
            rec = self._record(msg, ts, proto, dst, dport, src, sport)
        flags = msg.flags
        rec.update({"rcode": msg.rcode, "rcode_name": DNS_RCODE_NAMES.get(msg.rcode, f"rcode-{msg.rcode}"),
                    "AA": bool(flags & DNS_AA), "TC": bool(flags & DNS_TC), "RA": bool(flags & DNS_RA),
                    # Zeek's dns_rejected: a reply without a record in any section
                    "rejected": not msg.answers and not msg.others})
        answers = [r for r in msg.answers if r.value]    # as Zeek: a record without text is not written
        if answers:
            rec["answers"] = [raw_address(r.value) if r.type in DNS_ADDRESS_LEN else r.value
                              for r in answers]
            rec["TTLs"] = [float(r.ttl) for r in answers]
        query = msg.question[0] if msg.question else ""
        for r in answers:
            if r.type in DNS_ADDRESS_LEN:
                key = hot_key(r.value)
                self.table.answer(key, query or r.name, r.name if r.name != query else "",
                                  ts + r.ttl + DNS_NAME_GRACE, matched,
                                  key in self.sent or key in self.sent_before, ts)
        self.finish_query(rec)

    def finish_query(self, rec):
        if self.logged is not None:
            self.logged({k: rec[k] for k in DNS_LOG_FIELDS if k in rec})

    def tick(self, now):
        if now > self.now:
            self.now = now
        if not self.behind:                        # an interval's end, not an extra pass
            if self.deltas is not None:
                self.interval_bytes(self.deltas.take())
            self.sent_before, self.sent = self.sent, set()
        self.behind = finish_expired(self.pending, self.now - DNS_QUERY_TIMEOUT,
                                     self.finish_query, DNS_TICK_WORK)

    def interval_bytes(self, deltas):
        """The remote stage's bytes of the interval, per remote: one that received from
        a local host is in use (under ebpf the only way this stage learns it); each
        named one's bytes count under its name's domain."""
        used, sent, until = self.table.used, self.sent, self.now + DNS_NAME_GRACE
        for key, tx, _ in deltas:
            if tx:
                used(key, until)
                if len(sent) < self.table.size:
                    sent.add(key)
        if self.domains is not None:
            get, named = self.table.get, []
            for key, tx, rx in deltas:
                e = get(key)
                if e is not None:
                    named.append((e[0], tx, rx))
            self.domains.count(self.now, named)

    def finish(self):
        while self.pending:
            self.finish_query(self.pending.popitem(last=False)[1])
        return False

    def snapshot(self):
        t = self.table
        t.expire(self.now)
        if t.changed:
            self.rows = tuple(((family_of_key(k).version, k), *e)
                              for seg in (t.protected, t.probation) for k, e in seg.items())
            t.changed = False
        return NamesSnapshot(self.rows, tuple(self.errors.items()), t.evictions,
                             self.pending_evictions, self.unmatched, self.queries, self.responses,
                             self.domains.rows() if self.domains is not None else ())


def names_document(snap, how, top=None):
    names = snap.get("names")
    if names is None:
        return None
    rows = [{"address": str(address(k)), "name": q, "cname": t, "expires": round(x, 3)}
            for k, q, t, x, _ in _first(names.names, top, lambda r: (r[1], r[0][0], r[0][1]))]
    return {**_envelope(snap, how), "names": rows, "evictions": names.evictions,
            "queries": names.queries, "responses": names.responses, "unmatched": names.unmatched,
            "pending_evictions": names.pending_evictions, "parse_errors": dict(names.parse_errors),
            "domains": [{"domain": d, "tx_bytes": tx, "rx_bytes": rx} for d, tx, rx in names.domains],
            **_cut(rows, len(names.names))}


def names_metrics(c, snap):
    """The names' families (a row of STAGES); none without --names."""
    from prometheus_client.core import CounterMetricFamily as counter, GaugeMetricFamily as gauge
    names = snap.get("names")
    if names is None:
        return
    yield metric_family(gauge, "lpd_names", "Remote addresses with a name from DNS answers.",
                        [], [((), len(names.names))])
    yield metric_family(counter, "lpd_name_evictions",
                        "Names dropped for room (probationary ones: see --names-max).",
                        [], [((), names.evictions)])
    yield metric_family(counter, "lpd_dns_parse_errors",
                        "DNS messages read only in part or not at all, by reason.", ["reason"],
                        [((r,), n) for r, n in names.parse_errors])
    yield metric_family(counter, "lpd_dns_pending_evictions",
                        "DNS queries given up unanswered to bound the pending ones.", [],
                        [((), names.pending_evictions)])
    yield metric_family(counter, "lpd_dns_unmatched_responses",
                        "DNS responses to no query lpd saw.", [], [((), names.unmatched)])
    remotes = snap.get("remotes")
    if remotes is not None:
        yield remote_info_family(c, remotes, names)
    if names.domains:
        for name, i, doc in DOMAIN_SERIES:
            yield metric_family(counter, name, doc, ["domain"], [((r[0],), r[i]) for r in names.domains])


# (name, index in a domain row, help): --names-domains' families
DOMAIN_SERIES = (
    ("lpd_domain_transmit_bytes", 1, "Bytes sent to the named remotes of a registered domain "
                                     "(the K busiest; 'other': the rest)."),
    ("lpd_domain_receive_bytes", 2, "Bytes received from the named remotes of a registered domain."))


def remote_info_family(c, remotes, names):
    """lpd_remote_info: a join, not a dimension: a series only for a remote that has its
    own ip_traffic_* ones (exported_remotes), labelled with its name, so the series
    stay as many as the remote table exports; joined in PromQL on remote_ip."""
    from prometheus_client.core import GaugeMetricFamily as gauge
    named = names.by_key()
    rows = [((str(address(r[0])), named[r[0]]), 1) for r in exported_remotes(c, remotes)
            if named.get(r[0])]
    return metric_family(gauge, "lpd_remote_info",
                         "A remote address's name from DNS answers (--names): always 1.",
                         ["remote_ip", "name"], rows)


def names_table(doc):
    """--output table's names: address, the name looked up, the CNAME chain's end."""
    bad = ", ".join(f"{r} {n}" for r, n in doc["parse_errors"].items() if n)
    return ([f"\nnames: {len(doc['names'])}, {doc['evictions']} evicted; DNS queries "
             f"{doc['queries']}, responses {doc['responses']} ({doc['unmatched']} unmatched)"
             f"{'; parse errors: ' + bad if bad else ''}\n"] +
            _columns(("address", "name", "cname"),
                     [[d["address"], d["name"], d["cname"]] for d in doc["names"]], ()) +
            domains_table(doc["domains"]))


def domains_table(domains):
    """--names-domains' counters, the busiest first (`other` last), when there are any."""
    if not domains:
        return []
    ranked = sorted(domains[:-1], key=lambda d: d["tx_bytes"] + d["rx_bytes"], reverse=True)
    return ["\ntraffic by domain (named remotes)\n"] + _columns(
        ("domain", "tx bytes", "rx bytes"),
        [[d["domain"], str(d["tx_bytes"]), str(d["rx_bytes"])] for d in ranked + domains[-1:]],
        ("tx bytes", "rx bytes"))


def names_ports(opts):
    """The UDP ports --names reads."""
    return (DNS_PORT, MDNS_PORT) if opts.names_mdns else (DNS_PORT,)


def _names(opts, w, built):
    if not opts.names:
        return None
    log_ = w.logs.get(Names.name)
    return Names(names_ports(opts), opts.names_max, log_.write if log_ is not None else None,
                 built.get(Connections.name), built.get(RemoteAddresses.name), opts.names_domains)


STAGES.append(Stage(Names, _names, (("names", names_document),), names_metrics, names_table,
                    log="--dns-log"))


# 15.4 TLS hellos (--names, --ssl-log) ########################################
# provides: TLS_HELLOS_MAX
#
# Most traffic is encrypted, but a TLS ClientHello names its server in clear text (SNI),
# and says what the client offers (versions, ciphers, ALPN: its JA4); the ServerHello
# says what was chosen. lpd reads them on every TCP port, recognised by the record
# header (TLS_HANDSHAKE_START), not the port: both engines copy whole every segment
# whose payload begins one (HANDSHAKE_EXPRESSION, CopyPlan.handshakes), so the stage
# sees the hellos and none of the bulk. A hello longer than its first segment (today's
# browsers' ~1.8 KB with a post-quantum key share) is read from the segments that
# follow: under ebpf the program keeps the direction in its hellos map (LRU,
# TLS_HELLOS_MAX) until the record's end and copies those whole too (one map lookup
# per TCP data segment: 30-40 ns more in the kernel program, the bench's names
# series); the classic program has no state, so there a later segment is cut and ends
# the hello, counted as "cut", unless the receiving NIC or GRO merged the segments into
# one super-frame (the usual case on a router, and on a host's own outgoing hellos).
#
# Each hello's bytes are kept per direction until read_tls_hello (15.2) has the whole
# handshake message: TLS_HELLOS_MAX directions at once, each at most TLS_HELLO_MAX
# bytes (a direction that would hold more, or is pushed out for room, is counted and
# dropped): 4096 * 16 KiB, 64 MiB at worst, a few KiB in practice. A ClientHello waits
# for its ServerHello in a session (TLS_SESSIONS_MAX, TLS_SESSION_TIMEOUT) and is then
# one ssl.log record (--ssl-log), Zeek's fields; the server name names the server's
# address in the names table (15.3) as a DNS answer would, used at once (a local host
# is talking to it) and lasting TLS_NAME_LIFETIME past the hello.

TLS_HELLOS_MAX = 4096                    # directions with a hello in part, read at once
TLS_SESSIONS_MAX = 16384                 # ClientHellos waiting for their ServerHello
TLS_SESSION_TIMEOUT = 30.0               # ... this long at most: then logged without it
TLS_HELLO_TIMEOUT = 10.0                 # a hello in part waits this long for its segments
TLS_READ_MAX = 2 * TLS_SESSIONS_MAX     # directions remembered as read (both of a session)
TLS_TICK_WORK = 4096                     # sessions logged per tick
TLS_NAME_LIFETIME = 3600.0               # a server name's life past its hello (no TTL says)
# read_tls_hello's reasons, then the stream's: bytes missing (an early segment), a
# segment the kernel copied in part, pushed out for room
TLS_STREAM_ERRORS = ("gap", "cut", "evicted", "timeout")
# ssl.log's fields in Zeek's order (ja4: FoxIO's Zeek package's field)
SSL_LOG_FIELDS = ("ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "version",
                  "cipher", "server_name", "next_protocol", "established", "ja4")
# untagged IPv4 without options: where its addresses and its TCP header's length are
PLAIN_IPV4_SRC, PLAIN_IPV4_DST = ETH_HLEN + IPV4_SRC_OFF, ETH_HLEN + IPV4_SRC_OFF + 4
PLAIN_IPV4_TCP_HLEN = PLAIN_IPV4_PORTS + TCP_DOFF_OFF


def not_handshake(data, streams):
    """True when a frame is judged at fixed offsets (plain IPv4) to be neither a TCP
    segment beginning TLS_HANDSHAKE_START nor one of `streams`' directions (keyed as
    TlsSessions keys them): most frames; False: it may be, parse_l4 says."""
    if len(data) <= PLAIN_IPV4_TCP_HLEN or data[ETH_TYPE_OFF:ETH_HLEN] != ETHERTYPE_IPV4_BYTES \
            or data[ETH_HLEN] != IPV4_VIHL_PLAIN:
        return False
    if data[ETH_HLEN + IPV4_PROTO_OFF] != IPPROTO_TCP:
        return True
    at = PLAIN_IPV4_PORTS + (data[PLAIN_IPV4_TCP_HLEN] >> 4) * 4
    if data[at:at + len(TLS_HANDSHAKE_START)] == TLS_HANDSHAKE_START:
        return False
    if not streams:
        return True
    sport, dport = L4_PORTS.unpack_from(data, PLAIN_IPV4_PORTS)
    return (bytes(data[PLAIN_IPV4_SRC:PLAIN_IPV4_DST]), sport,
            bytes(data[PLAIN_IPV4_DST:PLAIN_IPV4_PORTS]), dport) not in streams


class TlsSnapshot(NamedTuple):
    client_hellos: int = 0
    server_hellos: int = 0
    parse_errors: tuple = ()       # (reason, count)
    session_evictions: int = 0     # ClientHellos logged early to keep TLS_SESSIONS_MAX

    def merge(self, other):
        errors = dict(self.parse_errors)
        for r, n in other.parse_errors:
            errors[r] = errors.get(r, 0) + n
        return TlsSnapshot(self.client_hellos + other.client_hellos,
                           self.server_hellos + other.server_hellos, tuple(errors.items()),
                           self.session_evictions + other.session_evictions)


class TlsSessions(Consumer):
    """The hellos of every TCP port, reassembled per direction (bounded); a ClientHello
    names its server in `names` (the Names stage's table) and waits for the
    ServerHello to be one ssl.log record, `logged(record)`."""
    name = "tls"
    snapshot_type = TlsSnapshot
    wants = frozenset((WANT_RAW, WANT_TS))
    whole_handshakes = True

    def __init__(self, names, logged=None):
        """names: the Names stage, whose table the server names go to and whose uids
        (conn.log's, with --connections) the records take."""
        self.names = names
        self.logged = logged
        self.streams = collections.OrderedDict()   # (src, sport, dst, dport) -> [next seq, bytes, ts]
        self.sessions = collections.OrderedDict()  # (client, cport, server, sport) -> record
        # Directions whose first handshake message was read: their later handshake records
        # (a certificate, TLS 1.2's key exchange and encrypted Finished) are not hellos
        self.read = collections.OrderedDict()
        self.errors = dict.fromkeys(TLS_PARSE_ERRORS + TLS_STREAM_ERRORS, 0)
        self.client_hellos = self.server_hellos = self.session_evictions = 0
        self.now = 0.0

    def consume(self, batch):
        streams = self.streams
        for data, ts, _, _, _ in frames_in_order(batch):
            if not not_handshake(data, streams):
                self.packet(data, ts)

    def packet(self, data, ts):
        f = parse_l4(data)
        if f is None or f[0] != IPPROTO_TCP:
            return
        _, src, dst, sport, dport, _, plen, flags, seq, *_, at = f
        if ts > self.now:
            self.now = ts
        key = (src, sport, dst, dport)
        if flags & TH_SYN:
            self.read.pop(key, None)                 # the 4-tuple's new connection
        elif key in self.read:
            return
        payload = memoryview(data)[at:at + plen]
        s = self.streams.get(key)
        if s is None:
            if len(payload) < len(TLS_HANDSHAKE_START) or payload[:len(TLS_HANDSHAKE_START)] != TLS_HANDSHAKE_START:
                return
            if len(self.streams) >= TLS_HELLOS_MAX:
                self.streams.popitem(last=False)
                self.errors["evicted"] += 1
            s = self.streams[key] = [seq, bytearray(), ts]
        if flags & TH_RST or not plen:
            if flags & (TH_RST | TH_FIN):
                del self.streams[key]
            return
        off = (seq - s[0]) % SEQ_MOD
        if off >= SEQ_HALF:                        # starts before what was read: its rest only
            payload = payload[SEQ_MOD - off:]
            plen -= SEQ_MOD - off
            off = 0
        reason = "gap" if off else "cut" if len(payload) < plen else None
        if reason is None and len(s[1]) + len(payload) > TLS_HELLO_MAX:
            reason = "too_long"
        if reason is not None:
            self.errors[reason] += 1
            del self.streams[key]
            return
        s[1] += payload
        s[0] = (s[0] + len(payload)) % SEQ_MOD
        hello, more = read_tls_hello(s[1])
        if hello is not None or not isinstance(more, int):
            del self.streams[key]
            self.read[key] = None
            if len(self.read) > TLS_READ_MAX:
                self.read.popitem(last=False)
            if hello is None:
                if more != TLS_NOT_HELLO:            # another handshake message: not ours
                    self.errors[more] += 1
            elif hello.kind == TLS_CLIENT_HELLO:
                self.client_hello(hello, s[2], src, sport, dst, dport)
            else:
                self.server_hello(hello, dst, dport, src, sport)

    def client_hello(self, hello, ts, src, sport, dst, dport):
        self.client_hellos += 1
        if hello.server_name:
            k = hot_key(dst)
            until = ts + TLS_NAME_LIFETIME
            self.names.table.answer(k, hello.server_name, "", until, True, True, ts)
        key = (src, sport, dst, dport)
        old = self.sessions.pop(key, None)
        if old is not None:
            self.finish_session(old)                 # the 4-tuple again, its hello unanswered
        elif len(self.sessions) >= TLS_SESSIONS_MAX:
            self.session_evictions += 1
            self.finish_session(self.sessions.popitem(last=False)[1])
        uid = self.names.uid(conn_key(IPPROTO_TCP, src, sport, dst, dport))
        self.sessions[key] = {
            "ts": round(ts, 6), "uid": uid, "id.orig_h": raw_address(src), "id.orig_p": sport,
            "id.resp_h": raw_address(dst), "id.resp_p": dport, "version": None, "cipher": None,
            "server_name": hello.server_name or None, "next_protocol": None,
            "established": False, "ja4": ja4(hello)}

    def server_hello(self, hello, client, cport, server, sport):
        self.server_hellos += 1
        rec = self.sessions.pop((client, cport, server, sport), None)
        if rec is None:
            return                                   # its ClientHello was not seen: no record
        rec["version"] = tls_version_name(tls_version(hello))
        rec["cipher"] = tls_cipher_name(hello.ciphers[0]) if hello.ciphers else None
        rec["next_protocol"] = hello.alpn[0] if hello.alpn else None
        rec["established"] = True
        self.finish_session(rec)

    def finish_session(self, rec):
        if self.logged is not None:
            self.logged({k: rec[k] for k in SSL_LOG_FIELDS if rec.get(k) is not None})

    def tick(self, now):
        if now > self.now:
            self.now = now
        # hellos in part, oldest first (streams keep their start order)
        streams = self.streams
        for _ in range(TLS_TICK_WORK):
            if not streams or next(iter(streams.values()))[2] > self.now - TLS_HELLO_TIMEOUT:
                break
            streams.popitem(last=False)
            self.errors["timeout"] += 1
        self.behind = finish_expired(self.sessions, self.now - TLS_SESSION_TIMEOUT,
                                     self.finish_session, TLS_TICK_WORK)

    def finish(self):
        while self.sessions:
            self.finish_session(self.sessions.popitem(last=False)[1])
        return False

    def snapshot(self):
        return TlsSnapshot(self.client_hellos, self.server_hellos, tuple(self.errors.items()),
                           self.session_evictions)


def tls_document(snap, how, top=None):
    tls = snap.get("tls")
    if tls is None:
        return None
    return {**_envelope(snap, how), "client_hellos": tls.client_hellos,
            "server_hellos": tls.server_hellos, "session_evictions": tls.session_evictions,
            "parse_errors": dict(tls.parse_errors)}


def tls_metrics(c, snap):
    """The TLS hellos' families (a row of STAGES); none without --names."""
    from prometheus_client.core import CounterMetricFamily as counter
    tls = snap.get("tls")
    if tls is None:
        return
    yield metric_family(counter, "lpd_tls_hellos", "TLS hellos read whole, by kind.", ["kind"],
                        [(("client",), tls.client_hellos), (("server",), tls.server_hellos)])
    yield metric_family(counter, "lpd_tls_parse_errors",
                        "TLS hellos read in part or not at all, by reason.", ["reason"],
                        [((r,), n) for r, n in tls.parse_errors])


def tls_table(doc):
    bad = ", ".join(f"{r} {n}" for r, n in doc["parse_errors"].items() if n)
    return [f"\nTLS: {doc['client_hellos']} ClientHellos, {doc['server_hellos']} ServerHellos"
            f"{'; parse errors: ' + bad if bad else ''}\n"]


def _tls(opts, w, built):
    names = built.get(Names.name)
    if names is None:
        return None
    log_ = w.logs.get(TlsSessions.name)
    return TlsSessions(names, log_.write if log_ is not None else None)


STAGES.append(Stage(TlsSessions, _tls, (("tls", tls_document),), tls_metrics, tls_table,
                    log="--ssl-log"))


###############################################################################
# 16 HTTP: requests, HTTP/2 and gRPC ##########################################
###############################################################################
# provides: GRPC_OK
#
# HTTP read from packets: HTTP/1.x, HTTP/2 in clear text (h2c, RFC 9113) and gRPC over it,
# on the same ports and connections. The parts in the order they depend on each other:
# HPACK (16.1), the header compression every HTTP/2 header block goes through, a state
# per direction of a connection that a capture may join late; HTTP/2 connections (16.2):
# frames, streams as requests, gRPC's calls; and last the HTTP stage (16.3), whose TCP
# reassembly feeds both HTTP/1 framing and, once a connection turns out to speak it,
# HTTP/2.


# 16.1 HPACK (RFC 7541, header compression) ###################################
# provides: HPACK_ERRORS, HPACK_UNKNOWN, HpackDecoder, HpackError
#
# A header block's decoder (RFC 7541), from bytes lpd did not write: integers with a
# bound on their bytes (5.1), string literals plain or Huffman-coded (5.2, Appendix B),
# the static table (Appendix A), the dynamic table with its size accounting, eviction and
# size updates (4, 6.3) bounded by the SETTINGS_HEADER_TABLE_SIZE lpd assumes, and the
# field representations (6.1, 6.2). Each representation consumes at least one byte and
# a Huffman string costs a few steps per byte, so a block costs work in proportion to its
# length whatever it holds; fields past HPACK_HEADER_LIST_MAX bytes (counted as
# SETTINGS_MAX_HEADER_LIST_SIZE counts them) or HPACK_FIELDS_MAX are not returned. What
# does not hold raises HpackError with one of HPACK_ERRORS for the caller to count, never
# an exception of another kind.
#
# Names and values are str, decoded latin-1: one character per byte, so no byte sequence
# can fail to decode and none is lost (bytes(value, "latin-1") gives the wire's bytes
# back), while what lpd compares and labels (pseudo-headers, content-type, gRPC's ASCII
# metadata: binary "-bin" metadata is base64 on the wire) is text, as the HTTP/1 stage
# (14.4) decodes its heads.
#
# Capture joined mid-connection (the usual case for long-lived gRPC channels): the
# dynamic table then holds entries inserted before lpd saw anything. The decoder keeps
# the entries inserted since it began (newest first) and, behind them, an unknown tail
# of which it knows only a bound on the size. Whatever the encoder did, its table is the
# newest part of that list: an insertion puts an entry in front and eviction removes the
# oldest, so the unknown entries go first. An index into the known part is therefore
# exact (a conforming encoder refers to entries its table holds); one past it, while the
# tail may still hold entries, is HPACK_UNKNOWN (the caller shows _OTHER); the tail's
# bound shrinks with every insertion and size update (the whole table fits the maximum
# size), and once it is below one entry's size (32) the decoder knows the table again
# and an index past it is an error. A name taken from an unknown entry is unknown and
# its length too, so that entry's size counts as a lower bound: the bounds stay sound
# (an entry is dropped only when the table certainly no longer holds it), never a guess.
# The real maximum size, unknown mid-connection until a size update says it, is taken at
# its bound, the SETTINGS value: the known part may then keep entries the encoder already
# evicted, which it never refers to. Should the peer have announced a larger SETTINGS
# value than the decoder was given, the table outgrows the bound: that shows as errors
# (an index past the table, a size update above it), never as a wrong field. A block
# that cannot be read to its end (an error, or one lost by the capture: lost()) leaves
# insertions unseen, so the decoder starts over as if capture began after it.

HPACK_ERRORS = ("integer", "huffman", "index", "table_size", "truncated", "too_long",
                "too_many")
HPACK_UNKNOWN = None            # a name or value in an entry inserted before capture began
HPACK_TABLE_SIZE = 4096         # SETTINGS_HEADER_TABLE_SIZE's initial value (RFC 9113 6.5.2)
HPACK_ENTRY_OVERHEAD = 32       # an entry's size: its name's and value's octets plus 32 (4.1)
HPACK_HEADER_LIST_MAX = 65536   # the fields returned per block, counted as above (a
                                # SETTINGS_MAX_HEADER_LIST_SIZE of 64 KiB)
HPACK_FIELDS_MAX = 1024         # and their number (a request carries tens)
# 5.1: an integer's continuation bytes carry 7 bits each; 4 of them reach 2^28 past the
# prefix, more than any index, string length or table size lpd accepts, and a fifth is
# an error rather than a loop over 0xff 0xff ...
HPACK_INT_BYTES_MAX = 4
HPACK_INT_MORE = 0x80           # a continuation byte's flag; its low 7 bits are the value
HPACK_HUFFMAN_FLAG = 0x80       # a string literal's first bit: Huffman-coded (5.2)
# 6.1-6.3: a field's first byte says its representation by its top bits, and the width
# of the integer prefix that follows them.
HPACK_INDEXED, HPACK_INDEXED_PREFIX = 0x80, 7
HPACK_INCREMENTAL, HPACK_INCREMENTAL_PREFIX = 0x40, 6
HPACK_SIZE_UPDATE, HPACK_SIZE_UPDATE_PREFIX = 0x20, 5
HPACK_LITERAL_PREFIX = 4        # without indexing (0000) and never indexed (0001)
HPACK_STRING_PREFIX = 7

HPACK_STATIC_TABLE = (          # Appendix A: index 1 is the first
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"),
    (":path", "/index.html"), (":scheme", "http"), (":scheme", "https"), (":status", "200"),
    (":status", "204"), (":status", "206"), (":status", "304"), (":status", "400"),
    (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""),
    ("accept", ""), ("access-control-allow-origin", ""), ("age", ""), ("allow", ""),
    ("authorization", ""), ("cache-control", ""), ("content-disposition", ""),
    ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
    ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""),
    ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""),
    ("max-forwards", ""), ("proxy-authenticate", ""), ("proxy-authorization", ""),
    ("range", ""), ("referer", ""), ("refresh", ""), ("retry-after", ""), ("server", ""),
    ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
    ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
)
HPACK_STATIC_LEN = len(HPACK_STATIC_TABLE)

HPACK_HUFFMAN_CODES = (    # (code, length in bits) of symbols 0-255, then EOS
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28),                 # 0-3
    (0xfffffe4, 28), (0xfffffe5, 28), (0xfffffe6, 28), (0xfffffe7, 28),             # 4-7
    (0xfffffe8, 28), (0xffffea, 24), (0x3ffffffc, 30), (0xfffffe9, 28),             # 8-11
    (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28), (0xfffffec, 28),            # 12-15
    (0xfffffed, 28), (0xfffffee, 28), (0xfffffef, 28), (0xffffff0, 28),             # 16-19
    (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28),            # 20-23
    (0xffffff4, 28), (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28),             # 24-27
    (0xffffff8, 28), (0xffffff9, 28), (0xffffffa, 28), (0xffffffb, 28),             # 28-31
    (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12),                               # 32-35
    (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11),                                # 36-39
    (0x3fa, 10), (0x3fb, 10), (0xf9, 8), (0x7fb, 11),                               # 40-43
    (0xfa, 8), (0x16, 6), (0x17, 6), (0x18, 6),                                     # 44-47
    (0x0, 5), (0x1, 5), (0x2, 5), (0x19, 6),                                        # 48-51
    (0x1a, 6), (0x1b, 6), (0x1c, 6), (0x1d, 6),                                     # 52-55
    (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8),                                     # 56-59
    (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10),                              # 60-63
    (0x1ffa, 13), (0x21, 6), (0x5d, 7), (0x5e, 7),                                  # 64-67
    (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7),                                     # 68-71
    (0x63, 7), (0x64, 7), (0x65, 7), (0x66, 7),                                     # 72-75
    (0x67, 7), (0x68, 7), (0x69, 7), (0x6a, 7),                                     # 76-79
    (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7),                                     # 80-83
    (0x6f, 7), (0x70, 7), (0x71, 7), (0x72, 7),                                     # 84-87
    (0xfc, 8), (0x73, 7), (0xfd, 8), (0x1ffb, 13),                                  # 88-91
    (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14), (0x22, 6),                           # 92-95
    (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5),                                    # 96-99
    (0x24, 6), (0x5, 5), (0x25, 6), (0x26, 6),                                      # 100-103
    (0x27, 6), (0x6, 5), (0x74, 7), (0x75, 7),                                      # 104-107
    (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5),                                      # 108-111
    (0x2b, 6), (0x76, 7), (0x2c, 6), (0x8, 5),                                      # 112-115
    (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7),                                      # 116-119
    (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15),                                  # 120-123
    (0x7fc, 11), (0x3ffd, 14), (0x1ffd, 13), (0xffffffc, 28),                       # 124-127
    (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20),                    # 128-131
    (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22), (0x7fffd9, 23),                 # 132-135
    (0x3fffd6, 22), (0x7fffda, 23), (0x7fffdb, 23), (0x7fffdc, 23),                 # 136-139
    (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23),                 # 140-143
    (0xffffec, 24), (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23),                 # 144-147
    (0xffffee, 24), (0x7fffe1, 23), (0x7fffe2, 23), (0x7fffe3, 23),                 # 148-151
    (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23),                 # 152-155
    (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24),                 # 156-159
    (0x3fffda, 22), (0x1fffdd, 21), (0xfffe9, 20), (0x3fffdb, 22),                  # 160-163
    (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21),                 # 164-167
    (0x7fffea, 23), (0x3fffdd, 22), (0x3fffde, 22), (0xfffff0, 24),                 # 168-171
    (0x1fffdf, 21), (0x3fffdf, 22), (0x7fffeb, 23), (0x7fffec, 23),                 # 172-175
    (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21),                 # 176-179
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23),                 # 180-183
    (0xfffea, 20), (0x3fffe2, 22), (0x3fffe3, 22), (0x3fffe4, 22),                  # 184-187
    (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23),                 # 188-191
    (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20), (0x7fff1, 19),                 # 192-195
    (0x3fffe7, 22), (0x7ffff2, 23), (0x3fffe8, 22), (0x1ffffec, 25),                # 196-199
    (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27),             # 200-203
    (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25),              # 204-207
    (0x7fff2, 19), (0x1fffe3, 21), (0x3ffffe6, 26), (0x7ffffe0, 27),                # 208-211
    (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27), (0xfffff2, 24),              # 212-215
    (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26),               # 216-219
    (0xffffffd, 28), (0x7ffffe3, 27), (0x7ffffe4, 27), (0x7ffffe5, 27),             # 220-223
    (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21),                   # 224-227
    (0x3fffe9, 22), (0x1fffe7, 21), (0x1fffe8, 21), (0x7ffff3, 23),                 # 228-231
    (0x3fffea, 22), (0x3fffeb, 22), (0x1ffffee, 25), (0x1ffffef, 25),               # 232-235
    (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),                # 236-239
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26),             # 240-243
    (0x7ffffe7, 27), (0x7ffffe8, 27), (0x7ffffe9, 27), (0x7ffffea, 27),             # 244-247
    (0x7ffffeb, 27), (0xffffffe, 28), (0x7ffffec, 27), (0x7ffffed, 27),             # 248-251
    (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27), (0x3ffffee, 26),             # 252-255
    (0x3fffffff, 30),                                                               # 256: EOS
)

HPACK_HUFFMAN_BITS = 30         # the longest code, EOS's
HPACK_HUFFMAN_EOS = 256         # a symbol the decoder must never produce (5.2)
HPACK_PADDING_MAX = 7           # bits of EOS's prefix that may end a string (5.2)


def _huffman_intervals():
    """Every code left-justified to HPACK_HUFFMAN_BITS, sorted: (starts, lengths, symbols).
    The code is prefix-free and complete, so the 30-bit values a code begins are one
    interval, the intervals tile 0 .. 2^30 - 1, and the symbol a bit string begins with is
    the one whose interval holds its first 30 bits: one bisect per symbol, in C."""
    rows = sorted((code << (HPACK_HUFFMAN_BITS - bits), bits, symbol)
                  for symbol, (code, bits) in enumerate(HPACK_HUFFMAN_CODES))
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows)


HPACK_HUFFMAN_STARTS, HPACK_HUFFMAN_LENGTHS, HPACK_HUFFMAN_SYMBOLS = _huffman_intervals()
HPACK_HUFFMAN_SHORT_BITS = 8


def _huffman_short():
    """By the first 8 bits of a bit string: length << 8 | symbol of the code it begins
    with when that code is at most 8 bits long (the letters, digits and common punctuation:
    most of what headers hold), 0 when it is longer and the bisect decides."""
    short, shift = [], HPACK_HUFFMAN_BITS - HPACK_HUFFMAN_SHORT_BITS
    for byte in range(1 << HPACK_HUFFMAN_SHORT_BITS):
        i = bisect.bisect_right(HPACK_HUFFMAN_STARTS, byte << shift) - 1
        length = HPACK_HUFFMAN_LENGTHS[i]
        fits = length <= HPACK_HUFFMAN_SHORT_BITS
        short.append(length << 8 | HPACK_HUFFMAN_SYMBOLS[i] if fits else 0)
    return tuple(short)


HPACK_HUFFMAN_SHORT = _huffman_short()


class HpackError(ValueError):
    """A header block that cannot be read: its reason, one of HPACK_ERRORS."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def hpack_huffman(data):
    """The octets a Huffman-coded string literal stands for (5.2, Appendix B). EOS in
    it, or a padding that is longer than 7 bits or not EOS's first bits (all 1s), is an
    error. Bits are taken a byte at a time and decoded while 30 of them are there (the
    longest code): a code of 8 bits or fewer by a lookup of its first byte, a longer one
    by a bisect, so each byte costs a step or two whatever the data."""
    starts, lengths, symbols = HPACK_HUFFMAN_STARTS, HPACK_HUFFMAN_LENGTHS, HPACK_HUFFMAN_SYMBOLS
    short, short_shift = HPACK_HUFFMAN_SHORT, HPACK_HUFFMAN_BITS - HPACK_HUFFMAN_SHORT_BITS
    top, out, acc, nbits = HPACK_HUFFMAN_BITS, bytearray(), 0, 0
    for byte in data:
        acc = acc << 8 | byte
        nbits += 8
        while nbits >= top:
            peek = acc >> (nbits - top)
            code = short[peek >> short_shift]
            if not code:
                i = bisect.bisect_right(starts, peek) - 1
                if symbols[i] == HPACK_HUFFMAN_EOS:
                    raise HpackError("huffman")
                code = lengths[i] << 8 | symbols[i]
            out.append(code & 0xFF)
            nbits -= code >> 8
            acc &= (1 << nbits) - 1
    while nbits:                    # fewer bits than the longest code are left: as if 0s followed
        i = bisect.bisect_right(starts, acc << (top - nbits)) - 1
        if lengths[i] > nbits:      # (EOS among them: 30 bits)
            break
        out.append(symbols[i])
        nbits -= lengths[i]
        acc &= (1 << nbits) - 1
    if nbits > HPACK_PADDING_MAX or acc != (1 << nbits) - 1:
        raise HpackError("huffman")
    return bytes(out)


def hpack_integer(block, pos, prefix):
    """(the integer at block[pos] with a `prefix`-bit prefix (5.1), the offset after it).
    At most HPACK_INT_BYTES_MAX continuation bytes: past them, "integer"."""
    if pos >= len(block):
        raise HpackError("truncated")
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    for shift in range(0, 7 * HPACK_INT_BYTES_MAX, 7):
        if pos >= len(block):
            raise HpackError("truncated")
        byte = block[pos]
        pos += 1
        value += (byte & ~HPACK_INT_MORE) << shift
        if not byte & HPACK_INT_MORE:
            return value, pos
    raise HpackError("integer")


def hpack_string(block, pos):
    """(the string literal at block[pos] (5.2) as text, decoded latin-1, the offset after
    it)."""
    length, start = hpack_integer(block, pos, HPACK_STRING_PREFIX)
    end = start + length
    if end > len(block):
        raise HpackError("truncated")
    octets = block[start:end]
    if block[pos] & HPACK_HUFFMAN_FLAG:
        octets = hpack_huffman(octets)
    return octets.decode("latin-1"), end


class HpackDecoder:
    """One direction's decoding context (2.2): the dynamic table its header blocks build,
    fed every block in the order the encoder sent them. max_table_size: the
    SETTINGS_HEADER_TABLE_SIZE the decoder's side announced (no size update may exceed
    it). mid_stream: capture began after the connection did (see above); unknown_fields
    counts the fields returned with a name or value HPACK_UNKNOWN."""

    def __init__(self, max_table_size=HPACK_TABLE_SIZE, mid_stream=False):
        self.settings = max_table_size
        self.unknown_fields = 0
        self._entries = collections.deque()     # (name, value, size), the newest first
        self._size = 0              # their sizes' sum: a lower bound where a name is unknown
        self._max = max_table_size  # the maximum size (mid-stream: its bound until an update)
        self._tail = 0              # the unknown entries behind them take at most this size
        if mid_stream:
            self.lost()

    @property
    def complete(self):
        """Whether the decoder knows every entry the table holds: no unknown tail is left
        (a name an entry took from the tail stays unknown in it)."""
        return not self._tail

    @property
    def table(self):
        """The known entries as (name, value), the newest (index 62) first."""
        return [entry[:2] for entry in self._entries]

    @property
    def size(self):
        """The known entries' size (4.1): a lower bound where a name is unknown."""
        return self._size

    def lost(self):
        """A header block went by unread (a gap in the capture, or a block that could not
        be read to its end): what it inserted and resized is unknown, so the table is, as
        when capture begins mid-connection, an unknown tail of at most the SETTINGS
        size."""
        self._entries.clear()
        self._size = 0
        self._max = self._tail = self.settings
        self._shrink()

    def decode(self, block):
        """The (name, value) fields of one header block (a HEADERS or PUSH_PROMISE frame's
        fragment and its CONTINUATIONs, joined), in order. Raises HpackError: "too_long"
        and "too_many" after reading the block to its end (the table stays right: they are
        lpd's bounds, not the encoder's fault), any other reason as soon as it is found
        (the decoder then starts over as lost() says)."""
        try:
            fields, over = self._fields(bytes(block))
        except HpackError:
            self.lost()
            raise
        if over:
            raise HpackError(over)
        return fields

    def _fields(self, block):
        fields, listed, over = [], 0, None
        entry, literal = self._entry, self._literal
        pos, end = 0, len(block)
        while pos < end:
            first = block[pos]
            if first & HPACK_INDEXED:                               # 6.1
                index, pos = hpack_integer(block, pos, HPACK_INDEXED_PREFIX)
                name, value = entry(index)
            elif first & HPACK_INCREMENTAL:                         # 6.2.1
                name, value, pos = literal(block, pos, HPACK_INCREMENTAL_PREFIX)
                self._insert(name, value)
            elif first & HPACK_SIZE_UPDATE:                         # 6.3
                if listed:                  # only before a block's first field (4.2)
                    raise HpackError("table_size")
                size, pos = hpack_integer(block, pos, HPACK_SIZE_UPDATE_PREFIX)
                self._resize(size)
                continue
            else:                                                   # 6.2.2, 6.2.3
                name, value, pos = literal(block, pos, HPACK_LITERAL_PREFIX)
            if name is HPACK_UNKNOWN or value is HPACK_UNKNOWN:
                self.unknown_fields += 1
                listed += HPACK_ENTRY_OVERHEAD + len(name or "") + len(value or "")
            else:
                listed += HPACK_ENTRY_OVERHEAD + len(name) + len(value)
            if over is None:
                if listed > HPACK_HEADER_LIST_MAX:
                    over = "too_long"
                elif len(fields) == HPACK_FIELDS_MAX:
                    over = "too_many"
                else:
                    fields.append((name, value))
        return fields, over

    def _entry(self, index):
        """(name, value) at an index of the static and dynamic tables (2.3.3)."""
        if 0 < index <= HPACK_STATIC_LEN:
            return HPACK_STATIC_TABLE[index - 1]
        known = index - HPACK_STATIC_LEN - 1
        if 0 <= known < len(self._entries):
            name, value, _ = self._entries[known]
            return name, value
        if index and known - len(self._entries) < self._tail // HPACK_ENTRY_OVERHEAD:
            return HPACK_UNKNOWN, HPACK_UNKNOWN
        raise HpackError("index")

    def _literal(self, block, pos, prefix):
        """(name, value, the offset after them) of a literal field (6.2): its name by
        index, or a string when the index is 0."""
        index, pos = hpack_integer(block, pos, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = hpack_string(block, pos)
        value, pos = hpack_string(block, pos)
        return name, value, pos

    def _insert(self, name, value):
        size = HPACK_ENTRY_OVERHEAD + len(value)    # a lower bound when the name is unknown
        if name is not HPACK_UNKNOWN:
            size += len(name)
        if size > self._max:        # 4.4: the table empties and takes nothing (and no tail)
            self._entries.clear()
            self._size = self._tail = 0
            return
        self._entries.appendleft((name, value, size))
        self._size += size
        self._shrink()

    def _resize(self, size):
        if size > self.settings:    # 6.3: above the SETTINGS value is an error
            raise HpackError("table_size")
        self._max = size
        self._shrink()

    def _shrink(self):
        """Evict the oldest known entries while the table is over its size (4.3, 4.4), and
        bound the unknown tail by the room left: the whole table fits its maximum size,
        and the tail's entries, the oldest, go first."""
        while self._size > self._max:
            self._size -= self._entries.pop()[2]
        self._tail = min(self._tail, self._max - self._size)
        if self._tail < HPACK_ENTRY_OVERHEAD:
            self._tail = 0


###############################################################################
# 16.2 HTTP/2 connections (frames, streams, gRPC calls) #######################
# provides: GRPC_OK, GRPC_STATUS_NAMES, H2_PARSE_ERRORS, H2_UNDECIDED, HTTP_OTHER, HTTP_TEXT_MAX,
#   Http2Connection
#
# A connection the HTTP stage (16.3) hands over once it speaks HTTP/2: the client's
# preface (prior knowledge), a 101 answer to `Upgrade: h2c` (the upgraded request is
# stream 1), or, on a connection open before capture began, frame headers that hold up
# where a segment starts (any frame shorter than 64 KiB begins with a 0 byte, which
# HTTP/1 text never does, so the two cannot be confused). Each direction's bytes come in
# order from the stage's reassembly and are cut into frames (RFC 9113 4.1). DATA is
# counted as it streams by, never held. A header block (HEADERS or PUSH_PROMISE and its
# CONTINUATIONs) is held up to H2_HEADER_BLOCK_MAX and then read by that direction's
# HPACK context; a longer one (a CONTINUATION flood) is dropped as it comes and the
# context starts over (lost()): what it would have said is unknown, never guessed.
# SETTINGS carries the table size the peer's encoder may use; the other frames are
# checked for their size and passed over. A request is a stream: it starts with the
# client's HEADERS (or the server's PUSH_PROMISE) and ends with the server's END_STREAM
# or a RST_STREAM from either side; streams are bounded per connection and over all.
# gRPC (content-type application/grpc...): the method from :path, the status from the
# trailers' grpc-status, or, without trailers, from the :status or the RST_STREAM code as
# gRPC's PROTOCOL-HTTP2.md and http-grpc-status-mapping.md map them; the length-prefixed
# messages counted each way.

HTTP_TEXT_MAX = 1024              # characters of a uri, Host or message kept per request
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_FRAME_HEADER = struct.Struct("!HBBBI")   # length (24 bits: 16 + 8), type, flags, stream
H2_STREAM_MASK = 0x7FFFFFFF                 # the stream identifier's reserved bit cleared
(H2_DATA, H2_HEADERS, H2_PRIORITY, H2_RST_STREAM, H2_SETTINGS, H2_PUSH_PROMISE, H2_PING,
 H2_GOAWAY, H2_WINDOW_UPDATE, H2_CONTINUATION) = range(10)
H2_END_STREAM = H2_ACK = 0x1
H2_END_HEADERS, H2_PADDED, H2_PRIORITY_FLAG = 0x4, 0x8, 0x20
H2_PRIORITY_LEN = 5                         # a HEADERS frame's priority fields (6.2)
H2_GOAWAY_LEN = 8                           # last stream and error code (6.8)
H2_STREAM_ID_LEN = 4                        # PUSH_PROMISE's promised stream, GOAWAY's last
H2_RST_STREAM_LEN = 4                       # its error code (6.4)
H2_PING_LEN = 8                             # opaque data (6.7)
H2_WINDOW_UPDATE_LEN = 4                    # the increment (6.9)
H2_SETTING = struct.Struct("!HI")           # one setting: identifier, value (6.5.1)
H2_SETTINGS_HEADER_TABLE_SIZE = 1
# Frames lpd reads whole: every peer accepts frames this long (SETTINGS_MAX_FRAME_SIZE's
# initial value, 6.5.2) and HEADERS, SETTINGS and the like are not sent longer in practice;
# a longer control frame is passed over unread, a longer header fragment ends its block.
H2_FRAME_READ_MAX = 16384
H2_HEADER_BLOCK_MAX = 64 << 10              # a header block held (HPACK_HEADER_LIST_MAX's 64 KiB)
H2_BLOCKS_TOTAL_MAX = 64 << 20              # and over every connection at once
H2_STREAMS_MAX = 1024                       # open streams per connection (servers allow ~100)
H2_STREAMS_TOTAL_MAX = 65536                # and over every connection
H2_SETTINGS_PENDING_MAX = 16                # SETTINGS a side sent that wait for the peer's ACK
H2_SYNC_SEGMENTS = 64                       # segments looked at for a frame boundary, joined late
# (type: (flags it defines, whether its stream is 0 (True), not 0 (False) or either (None),
#  its length when fixed)): what a frame header must hold to be taken for one, joined late
H2_FRAME_RULES = {
    H2_DATA: (H2_END_STREAM | H2_PADDED, False, None),
    H2_HEADERS: (H2_END_STREAM | H2_END_HEADERS | H2_PADDED | H2_PRIORITY_FLAG, False, None),
    H2_PRIORITY: (0, False, H2_PRIORITY_LEN),
    H2_RST_STREAM: (0, False, H2_RST_STREAM_LEN),
    H2_SETTINGS: (H2_ACK, True, None),
    H2_PUSH_PROMISE: (H2_END_HEADERS | H2_PADDED, False, None),
    H2_PING: (H2_ACK, True, H2_PING_LEN),
    H2_GOAWAY: (0, True, None),
    H2_WINDOW_UPDATE: (0, None, H2_WINDOW_UPDATE_LEN),
    H2_CONTINUATION: (H2_END_HEADERS, False, None),
}
H2_PARSE_ERRORS = ("h2_protocol", "h2_header_block_too_large", "h2_too_many_streams",
                   "hpack_unknown")
H2_UNDECIDED = "undecided"                  # take(): more bytes are needed to tell
# How an HTTP/1 request line (a method token and a space) or status line begins, or
# the part of one a segment may end in: a joined connection's bytes that match are HTTP/1's.
H2_HTTP1_START = re.compile(rb"HTTP/1\.|[-!#$%&'*+.^_`|~0-9A-Za-z]{1,20}(?: |\Z)|"
                            rb"H(?:T(?:T(?:P(?:/1?)?)?)?)?\Z")
HTTP_OTHER = "_OTHER"      # OpenTelemetry's name for a method (path, status) not known

GRPC_CONTENT_TYPE = "application/grpc"      # and "application/grpc+proto" and the like
GRPC_PREFIX = 5                             # a message's compressed flag and 4-byte length
GRPC_STATUS_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                     "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                     "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
                     "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
GRPC_OK = GRPC_STATUS_NAMES[0]              # the one status that is no error
(GRPC_CANCELLED, GRPC_UNKNOWN, GRPC_PERMISSION_DENIED, GRPC_RESOURCE_EXHAUSTED,
 GRPC_UNIMPLEMENTED, GRPC_INTERNAL, GRPC_UNAVAILABLE, GRPC_UNAUTHENTICATED) = (
    GRPC_STATUS_NAMES.index(n) for n in (
        "CANCELLED", "UNKNOWN", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED",
        "INTERNAL", "UNAVAILABLE", "UNAUTHENTICATED"))
# PROTOCOL-HTTP2.md, "Errors": a RST_STREAM's code as the call's status; any other code
# (NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, ...) is INTERNAL.
GRPC_FROM_RST = {0x7: GRPC_UNAVAILABLE,          # REFUSED_STREAM
                 0x8: GRPC_CANCELLED,            # CANCEL
                 0xB: GRPC_RESOURCE_EXHAUSTED,   # ENHANCE_YOUR_CALM
                 0xC: GRPC_PERMISSION_DENIED}    # INADEQUATE_SECURITY
# http-grpc-status-mapping.md: a response without grpc-status, by its :status.
GRPC_FROM_HTTP = {400: GRPC_INTERNAL, 401: GRPC_UNAUTHENTICATED, 403: GRPC_PERMISSION_DENIED,
                  404: GRPC_UNIMPLEMENTED, 429: GRPC_UNAVAILABLE, 502: GRPC_UNAVAILABLE,
                  503: GRPC_UNAVAILABLE, 504: GRPC_UNAVAILABLE}
HTTP_OK = 200


def h2_frames_hold(buf):
    """Whether buf, taken to begin at a frame boundary, reads as frames: every frame
    header in it keeps H2_FRAME_RULES. None while not even the first frame is complete
    (more bytes decide); the last frame may run on past buf's end."""
    pos, end, frames = 0, len(buf), 0
    while end - pos >= H2_FRAME_HEADER.size:
        high, low, kind, flags, stream = H2_FRAME_HEADER.unpack_from(buf, pos)
        length = high << 8 | low
        rules = H2_FRAME_RULES.get(kind)
        if rules is None or length > H2_FRAME_READ_MAX or stream > H2_STREAM_MASK:
            return False
        defined, zero, fixed = rules
        if flags & ~defined or (zero is not None and zero != (stream == 0)) or \
                (fixed is not None and length != fixed):
            return False
        pos += H2_FRAME_HEADER.size + length
        frames += 1
        if pos > end:
            return True if frames > 1 else None
    return True if frames else None


class GrpcCall:
    """What a stream says as a gRPC call: its method, status (None: not known), message
    and the length-prefixed messages each way (index 0: the request's, 1: the response's)."""
    __slots__ = ("method", "status", "said", "message", "messages", "message_bytes", "prefix",
                 "left")

    def __init__(self, method):
        self.method = method
        self.status = self.message = None
        self.said = False                       # a grpc-status field came (known or not)
        self.messages, self.message_bytes = [0, 0], [0, 0]
        self.prefix = [b"", b""]                # a message prefix read in part, each way
        self.left = [0, 0]                      # bytes of the current message still to come

    def data(self, way, chunk):
        """Count the messages a DATA payload's bytes begin (5.1 of PROTOCOL-HTTP2.md)."""
        pos, end = 0, len(chunk)
        while pos < end:
            left = self.left[way]
            if left:
                step = min(left, end - pos)
                self.left[way] = left - step
                pos += step
                continue
            prefix = self.prefix[way] + bytes(chunk[pos:pos + GRPC_PREFIX - len(self.prefix[way])])
            pos += len(prefix) - len(self.prefix[way])
            if len(prefix) < GRPC_PREFIX:
                self.prefix[way] = prefix
                break
            self.prefix[way] = b""
            length = int.from_bytes(prefix[1:], "big")
            self.messages[way] += 1
            self.message_bytes[way] += length
            self.left[way] = length


class H2Request:
    """One stream as a request, with the fields the HTTP stage records (16.3's
    _HttpRequest's, plus the stream and the gRPC call when it is one)."""
    __slots__ = ("ts", "method", "uri", "host", "depth", "req_body", "resp_body", "status",
                 "ttfb", "end", "stream", "rpc", "rst", "unsure")
    version = "2"

    def __init__(self, ts, stream, depth):
        self.ts, self.stream, self.depth = ts, stream, depth
        self.method = self.uri = HTTP_OTHER
        self.host = self.ttfb = self.end = self.rpc = self.rst = None
        self.req_body = self.resp_body = self.status = 0
        self.unsure = False                 # a response field's name was not known

    def request_fields(self, fields):
        for name, value in fields:
            if name == ":method":
                self.method = HTTP_OTHER if value is HPACK_UNKNOWN else value
            elif name == ":path":
                self.uri = HTTP_OTHER if value is HPACK_UNKNOWN else value
            elif name == ":authority" and value is not HPACK_UNKNOWN:
                self.host = value
            elif name == "content-type":
                self._content_type(value)

    def _content_type(self, value):
        if value is not HPACK_UNKNOWN and value.startswith(GRPC_CONTENT_TYPE) and self.rpc is None:
            path = self.uri
            self.rpc = GrpcCall(path[1:] if path.startswith("/") and path != HTTP_OTHER
                                else HTTP_OTHER)

    def response_fields(self, fields, ts):
        """A response's HEADERS (or its trailers): False for an interim (1xx) one."""
        status = None
        for name, value in fields:
            if name is HPACK_UNKNOWN:
                self.unsure = True          # it may have been grpc-status
            elif name == ":status":
                status = value
            elif name == "content-type":
                self._content_type(value)
            elif name == "grpc-status" and self.rpc is not None:
                self.rpc.status = int(value) if value is not HPACK_UNKNOWN and \
                    value.isdigit() and int(value) < len(GRPC_STATUS_NAMES) else None
                self.rpc.said = True
            elif name == "grpc-message" and self.rpc is not None and value is not HPACK_UNKNOWN:
                self.rpc.message = urllib.parse.unquote(value[:HTTP_TEXT_MAX])
        if status is None:
            return True                     # trailers
        if status is HPACK_UNKNOWN or not (status.isdigit() and len(status) == 3):
            code = 0
        else:
            code = int(status)
            if 100 <= code < 200:
                return False
        if self.ttfb is None:
            self.status, self.ttfb = code, ts - self.ts
        return True

    def finish(self, ts, seen):
        """The stream is over: its end, and a gRPC status the trailers did not give.
        seen: its end was on the wire (END_STREAM, RST_STREAM), not the connection's
        end or the capture's, after which the status is not known."""
        self.end = ts
        rpc = self.rpc
        if rpc is None or rpc.said or self.unsure:
            return
        if self.rst is not None:
            rpc.status = GRPC_FROM_RST.get(self.rst, GRPC_INTERNAL)
        elif self.status and self.status != HTTP_OK:
            rpc.status = GRPC_FROM_HTTP.get(self.status, GRPC_UNKNOWN)
        elif seen and self.status == HTTP_OK:
            rpc.status = GRPC_INTERNAL      # ended without trailers, as gRPC's clients say


class _H2Side:
    """One direction of an HTTP/2 connection: its HPACK context, the frame being read and
    the header block being gathered."""
    __slots__ = ("hpack", "synced", "tries", "left", "pad", "target", "flags", "data_stream",
                 "block", "block_stream", "block_end", "block_promised", "block_over", "pending")

    def __init__(self, mid_stream):
        self.hpack = HpackDecoder(mid_stream=mid_stream)
        self.synced = not mid_stream        # at a frame boundary
        self.tries = 0
        self.left = self.pad = 0            # a DATA payload's bytes to count, then padding
        self.target = None                  # the request a DATA payload is counted into
        self.flags = self.data_stream = 0   # the DATA frame's (0 for a frame passed over)
        self.block = None                   # a header block's fragments, joined
        self.block_stream = self.block_promised = 0
        self.block_end = self.block_over = False
        self.pending = collections.deque(maxlen=H2_SETTINGS_PENDING_MAX)   # table sizes sent


class Http2Connection:
    """The HTTP/2 side of one of the HTTP stage's connections (its _HttpStream `s`):
    data() reads each direction's bytes, the stage's record() gets each request when it
    ends, end() finishes what is left."""

    def __init__(self, stage, s, mid_stream, upgraded=None):
        self.stage, self.conn = stage, s
        self.client, self.server = _H2Side(mid_stream), _H2Side(mid_stream)
        self.client_preface = upgraded is not None      # the client's comes after the 101
        self.streams = {}                   # stream id -> H2Request
        self.last_stream = 0                # the client's highest: a lower one is over
        self.depth = s.depth
        if upgraded is not None:            # RFC 9113 3.2 (7540's): the request is stream 1
            request = H2Request(upgraded.ts, 1, upgraded.depth)
            request.method, request.uri, request.host = upgraded.method, upgraded.uri, upgraded.host
            request.req_body = upgraded.req_body
            self._open(request)
            self.last_stream = 1

    @classmethod
    def take(cls, stage, s, to_server, d):
        """An HTTP/2 reader for the connection, from the first bytes of one direction:
        the client's preface, or (joined late) frames; H2_UNDECIDED while the bytes do
        not tell yet (a connection joined late whose segment starts inside a message:
        they are let go, and the next segment's start decides); None for HTTP/1."""
        buf = d.buf
        if to_server and H2_PREFACE.startswith(bytes(buf[:len(H2_PREFACE)])):
            if len(buf) < len(H2_PREFACE):
                return H2_UNDECIDED
            del buf[:len(H2_PREFACE)]
            return cls(stage, s, False)
        if not s.joined or H2_HTTP1_START.match(buf):
            return None
        holds = h2_frames_hold(buf)
        if holds:
            return cls(stage, s, True)
        if holds is False:
            buf.clear()
        return H2_UNDECIDED

    def data(self, to_server, d, ts):
        """Read the frames of d.buf (one direction's bytes in order). False: this
        direction cannot be read further (counted)."""
        side = self.client if to_server else self.server
        buf = d.buf
        if to_server and self.client_preface:
            if len(buf) < len(H2_PREFACE):
                return H2_PREFACE.startswith(bytes(buf)) or self._error("h2_protocol")
            if buf[:len(H2_PREFACE)] != H2_PREFACE:
                return self._error("h2_protocol")
            del buf[:len(H2_PREFACE)]
            self.client_preface = False
        if not side.synced:
            holds = h2_frames_hold(buf)
            if holds is None:
                return True
            if not holds:
                buf.clear()                 # wait for a segment that starts with a frame
                side.tries += 1
                return side.tries < H2_SYNC_SEGMENTS or self._error("h2_protocol")
            side.synced = True
        pos, end = 0, len(buf)
        try:
            while pos < end:
                if side.left or side.pad:
                    pos = self._payload(side, to_server, buf, pos, end, ts)
                    continue
                if end - pos < H2_FRAME_HEADER.size:
                    break
                high, low, kind, flags, stream = H2_FRAME_HEADER.unpack_from(buf, pos)
                length, stream = high << 8 | low, stream & H2_STREAM_MASK
                if kind == H2_DATA:
                    if flags & H2_PADDED:
                        if end - pos < H2_FRAME_HEADER.size + 1:
                            break
                        side.pad = buf[pos + H2_FRAME_HEADER.size]
                        if side.pad >= length:
                            return self._error("h2_protocol")
                        length -= 1 + side.pad
                        pos += 1
                    if side.block is not None:
                        return self._error("h2_protocol")
                    pos += H2_FRAME_HEADER.size
                    side.left, side.flags, side.data_stream = length, flags, stream
                    side.target = self.streams.get(stream)
                    if not length and not side.pad:
                        self._data_end(side, to_server, ts)
                    continue
                if length > H2_FRAME_READ_MAX:  # passed over; a header block ends unread
                    if kind in (H2_HEADERS, H2_PUSH_PROMISE, H2_CONTINUATION):
                        self._block_over(side)
                        side.block_stream = stream
                        if flags & H2_END_HEADERS:
                            side.block, side.block_over = None, False
                    pos += H2_FRAME_HEADER.size
                    side.left, side.target, side.flags, side.data_stream = length, None, 0, 0
                    continue
                if end - pos < H2_FRAME_HEADER.size + length:
                    break
                start = pos + H2_FRAME_HEADER.size
                pos = start + length
                if not self._frame(side, to_server, kind, flags, stream,
                                   memoryview(buf)[start:pos], ts):
                    return False
        finally:
            del buf[:pos]
        return True

    def _payload(self, side, to_server, buf, pos, end, ts):
        """A DATA frame's bytes (or a frame passed over), counted as they come."""
        if side.left:
            step = min(side.left, end - pos)
            target = side.target
            if target is not None:
                if to_server:
                    target.req_body += step
                else:
                    target.resp_body += step
                if target.rpc is not None:
                    target.rpc.data(0 if to_server else 1, memoryview(buf)[pos:pos + step])
            side.left -= step
            pos += step
        if not side.left:
            step = min(side.pad, end - pos)
            side.pad -= step
            pos += step
            if not side.pad and side.data_stream:
                self._data_end(side, to_server, ts)
        return pos

    def _data_end(self, side, to_server, ts):
        stream, side.data_stream = side.data_stream, 0
        if side.flags & H2_END_STREAM and not to_server:
            request = self.streams.get(stream)
            if request is not None:
                self._close(request, ts)

    def _frame(self, side, to_server, kind, flags, stream, payload, ts):
        """One whole frame other than DATA. False: the direction cannot be read further."""
        if side.block is not None and (kind != H2_CONTINUATION or stream != side.block_stream):
            return self._error("h2_protocol")          # 6.10: nothing between fragments
        if kind == H2_PUSH_PROMISE and to_server:
            return self._error("h2_protocol")          # 8.4: only servers push
        if kind in (H2_HEADERS, H2_PUSH_PROMISE):
            pad = 0
            if flags & H2_PADDED:
                if not payload:
                    return self._error("h2_protocol")
                pad, payload = payload[0], payload[1:]
            skip = H2_STREAM_ID_LEN if kind == H2_PUSH_PROMISE else \
                H2_PRIORITY_LEN if flags & H2_PRIORITY_FLAG else 0
            if pad + skip > len(payload) or stream == 0:
                return self._error("h2_protocol")
            promised = int.from_bytes(payload[:skip], "big") & H2_STREAM_MASK \
                if kind == H2_PUSH_PROMISE else 0
            side.block, side.block_stream, side.block_promised = bytearray(), stream, promised
            side.block_end, side.block_over = bool(flags & H2_END_STREAM), False
            self._fragment(side, payload[skip:len(payload) - pad])
        elif kind == H2_CONTINUATION:
            if side.block is None:          # its block began before capture (or never)
                self.stage.errors["h2_protocol"] += 1
                side.hpack.lost()
                side.block, side.block_stream, side.block_over = bytearray(), stream, True
            self._fragment(side, payload)
        elif kind == H2_SETTINGS:
            if flags & H2_ACK:
                other = self.server if to_server else self.client
                if other.pending:               # the peer's sizes apply once acknowledged
                    size = other.pending.popleft()
                    if size is not None:
                        side.hpack.settings = size
                return True
            if len(payload) % H2_SETTING.size:
                return self._error("h2_protocol")
            size = None
            for at in range(0, len(payload), H2_SETTING.size):
                ident, value = H2_SETTING.unpack_from(payload, at)
                if ident == H2_SETTINGS_HEADER_TABLE_SIZE:
                    size = value
            other = self.server if to_server else self.client
            side.pending.append(size)
            if size is not None and size > other.hpack.settings:
                other.hpack.settings = size         # a larger one may be used at once
            return True
        elif kind == H2_RST_STREAM:
            request = self.streams.get(stream)
            if request is not None and len(payload) == H2_RST_STREAM_LEN:
                request.rst = int.from_bytes(payload, "big")
                self._close(request, ts)
            return True
        elif kind == H2_GOAWAY:
            if len(payload) >= H2_GOAWAY_LEN and not to_server:
                last = int.from_bytes(payload[:H2_STREAM_ID_LEN], "big") & H2_STREAM_MASK
                for sid in [sid for sid, r in self.streams.items() if sid > last and r.ttfb is None]:
                    self._drop(sid)         # never processed: the client asks again elsewhere
            return True
        else:
            return True                     # PRIORITY, PING, WINDOW_UPDATE, extensions
        if flags & H2_END_HEADERS:
            self._block_done(side, to_server, ts)
        return True

    def _fragment(self, side, fragment):
        if side.block_over:
            return
        if len(side.block) + len(fragment) > H2_HEADER_BLOCK_MAX or \
                self.stage.h2_blocks + len(fragment) > H2_BLOCKS_TOTAL_MAX:
            self._block_over(side)
            return
        side.block += fragment
        self.stage.h2_blocks += len(fragment)

    def _block_over(self, side):
        """A header block past the bounds: dropped, and the HPACK context with it."""
        if not side.block_over:
            self.stage.errors["h2_header_block_too_large"] += 1
            side.hpack.lost()
        self.stage.h2_blocks -= len(side.block or b"")
        side.block, side.block_over = bytearray(), True

    def _block_done(self, side, to_server, ts):
        block, over, stream = side.block, side.block_over, side.block_stream
        self.stage.h2_blocks -= len(block)
        side.block, side.block_over = None, False
        if over:
            return
        unknown = side.hpack.unknown_fields
        try:
            fields = side.hpack.decode(block)
        except HpackError as e:
            self.stage.errors["hpack_" + e.reason] += 1
            if e.reason not in ("too_long", "too_many"):
                return
            fields = ()
        if side.hpack.unknown_fields != unknown:
            self.stage.errors["hpack_unknown"] += side.hpack.unknown_fields - unknown
        if side.block_promised:             # a pushed request (8.4): its response follows
            request = self._new(side.block_promised, ts)
            if request is not None:
                request.request_fields(fields)
            return
        request = self.streams.get(stream)
        if to_server:
            if request is None and stream > self.last_stream:
                self.last_stream = stream
                request = self._new(stream, ts)
                if request is not None:
                    request.request_fields(fields)
        elif request is not None:
            if request.response_fields(fields, ts) and side.block_end:
                self._close(request, ts)

    def _new(self, stream, ts):
        stage = self.stage
        if len(self.streams) >= H2_STREAMS_MAX or stage.h2_streams >= H2_STREAMS_TOTAL_MAX:
            stage.errors["h2_too_many_streams"] += 1
            return None
        self.depth += 1
        request = H2Request(ts, stream, self.depth)
        self._open(request)
        return request

    def _open(self, request):
        self.streams[request.stream] = request
        self.stage.h2_streams += 1

    def _drop(self, stream):
        del self.streams[stream]
        self.stage.h2_streams -= 1

    def _close(self, request, ts, seen=True):
        self._drop(request.stream)
        request.finish(ts, seen)
        self.stage.record(self.conn, request)

    def _error(self, reason):
        self.stage.errors[reason] += 1
        return False

    def end(self, ts):
        """The connection is over: streams left are recorded unanswered (or as far as they
        went), a block being gathered is let go."""
        for side in (self.client, self.server):
            if side.block is not None:
                self.stage.h2_blocks -= len(side.block)
                side.block = None
        for request in list(self.streams.values()):
            self._close(request, ts, False)


###############################################################################
# 16.3 HTTP requests (TCP reassembly, HTTP/1.x, the stage) ####################
# provides: -
#
# Per TCP connection to or from an --http-ports port: each direction's bytes in sequence
# order (retransmissions dropped, out-of-order segments held in a bounded buffer, a gap
# that never fills ends parsing of the connection), then HTTP/1.x framing as RFC 9112
# section 6 has it: requests and responses matched in order (pipelining), bodies skipped
# by length or by chunks, never buffered. Timing comes from the segments' timestamps.
# Before its first HTTP/1 request a connection may show it speaks HTTP/2 (16.2's take():
# the preface, or frames where capture joined it late), or switch to it by a 101 answer
# to `Upgrade: h2c`: from then on its bytes go to its Http2Connection. HTTP/2 requests
# and gRPC calls are recorded here as HTTP/1's are: the log, /api/requests, OpenTelemetry's
# histograms (gRPC calls in rpc_server_call_duration_seconds, semantic conventions
# v1.40.0, not in the HTTP one), and their messages counted.

HTTP_MAX_HEAD = 64 << 10          # a request or response head beyond this is not HTTP we read
HTTP_OOO_MAX = 256 << 10          # out-of-order bytes held per direction; beyond: a gap
HTTP_OOO_TOTAL_MAX = 64 << 20     # and over every connection: a flood of early segments is gaps
HTTP_PENDING_MAX = 1024           # requests waiting for responses on one connection
HTTP_OOO_SEGMENTS = 1024          # early segments held per direction (each fill scans them)
HTTP_RECENT_SERVERS = 128         # servers with /api/requests history: worst case ~256 MiB
HTTP_SERVERS_MAX = 4096           # servers with their own series and /api/requests; the rest: other
HTTP_STREAMS_MAX = 65536          # connections parsed at once; then the least active one goes
HTTP_IDLE_TIMEOUT = DEFAULT_CONN_TIMEOUT_TCP
HTTP_RECENT = 1000                # requests kept per server for /api/requests
HTTP_ROUTES_MAX = 50              # routes per server with their own series; the rest: other
HTTP_LATENCY_SAMPLES = 100_000    # durations kept per server for the table's percentiles
# OpenTelemetry's http.server.request.duration buckets (seconds).
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                          "PATCH"))
HTTP_PARSE_ERRORS = ("gap", "head_too_large", "bad_request", "bad_response", "bad_chunk",
                     "unmatched_response", "too_many_pending") + H2_PARSE_ERRORS + \
    tuple("hpack_" + reason for reason in HPACK_ERRORS)
HTTP_H2C = "h2c"                  # the Upgrade token of HTTP/2 in clear text (RFC 7540 3.2)
RPC_SYSTEM = "grpc"               # rpc.system.name
HTTP_ID_SEGMENT = re.compile(r"[0-9]+|[0-9a-fA-F]{8,}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                             r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
HTTP_HEAD_END = re.compile(rb"\r?\n\r?\n")
HTTP_CHUNK_LINE = re.compile(rb"\r?\n")
HTTP_CHUNK_SIZE_RE = re.compile(rb"[0-9a-fA-F]{1,16}")
HTTP_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
HTTP_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})")
# parser states, per direction
(HTTP_HEAD, HTTP_BODY, HTTP_CHUNK_SIZE, HTTP_CHUNK_DATA, HTTP_CHUNK_END, HTTP_TRAILER,
 HTTP_UNTIL_CLOSE, HTTP_STOPPED) = range(8)


def http_route(uri):
    """The path without query, ids (numbers, long hex, UUIDs) as :id."""
    path = uri.split("?", 1)[0].split("#", 1)[0]
    if "://" in path:                                  # absolute-form (a proxy request)
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    parts = [":id" if HTTP_ID_SEGMENT.fullmatch(p) else p for p in path.split("/")]
    return "/".join(parts) or "/"


def _headers(block):
    """Header fields of a head (after its first line): {lower-case name: last value}."""
    fields = {}
    for line in block.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return fields


class _HttpDir:
    """One direction of a connection: reassembly, then the framing state."""
    __slots__ = ("next_seq", "ooo", "ooo_bytes", "buf", "buf_ts", "state", "left", "fin",
                 "last_data", "scanned")

    def __init__(self):
        self.last_data = 0.0                 # when the last in-order payload byte was had
        self.scanned = 0                     # bytes of buf searched for a line or head end
        self.next_seq = None
        self.ooo = {}                       # seq -> (bytes, ts)
        self.ooo_bytes = 0
        self.buf = bytearray()              # bytes not yet framed
        self.buf_ts = 0.0                   # timestamp of the first byte in buf
        self.state, self.left, self.fin = HTTP_HEAD, 0, False


class _HttpRequest:
    __slots__ = ("ts", "method", "uri", "host", "depth", "req_body", "resp_body", "status",
                 "ttfb", "end", "head", "connect", "version", "upgrade")
    stream = rpc = None                         # an HTTP/2 request's (16.2's H2Request)

    def __init__(self, ts, method, uri, host, depth, version, upgrade):
        self.ts, self.method, self.uri, self.host, self.depth = ts, method, uri, host, depth
        self.version, self.upgrade = version, upgrade
        self.req_body = self.resp_body = self.status = 0
        self.ttfb = self.end = None
        self.head, self.connect = method == "HEAD", method == "CONNECT"


class _HttpStream:
    __slots__ = ("key", "client", "server", "to_server", "to_client", "pending", "depth",
                 "last", "current_request", "response", "joined", "h2")

    def __init__(self, key, client, server, joined):
        self.key, self.client, self.server = key, client, server
        self.joined = joined                    # capture began after the connection did
        self.h2 = None                          # its Http2Connection once it speaks HTTP/2
        self.to_server, self.to_client = _HttpDir(), _HttpDir()
        self.pending = collections.deque()      # requests waiting for their response
        self.depth = 0
        self.last = 0.0
        self.current_request = None             # being received (its body)
        self.response = None                    # (request, final?) being received


class HttpSnapshot(NamedTuple):
    """Histogram rows ((labels), bucket counts, sum, count), parse errors, the recent
    requests per server (newest first) and per-server summaries for the table; the same
    for gRPC calls, and their messages."""
    histogram: tuple = ()
    parse_errors: tuple = ()
    recent: tuple = ()                     # ((server, (record, ...)), ...)
    servers: tuple = ()                    # ((server, requests, errors, (durations...), ((route, n), ...)), ...)
    rpc_histogram: tuple = ()
    rpc_messages: tuple = ()               # ((method, direction, server, port, container), messages, bytes)
    rpc_servers: tuple = ()                # ((server, calls, ((status, n), ...), (durations...), ((method, n), ...)), ...)

    def merge(self, other):
        recent = {}
        for srv, recs in self.recent + other.recent:
            recent[srv] = recent.get(srv, ()) + recs
        summary = {}
        for srv, n, errors, durations, routes in self.servers + other.servers:
            if srv in summary:
                n0, e0, d0, r0 = summary[srv]
                summary[srv] = (n0 + n, e0 + errors, (d0 + durations)[-HTTP_LATENCY_SAMPLES:],
                                _merge_keyed(r0, routes, 1))
            else:
                summary[srv] = (n, errors, durations, routes)
        calls = {}
        for srv, n, statuses, durations, methods in self.rpc_servers + other.rpc_servers:
            if srv in calls:
                n0, s0, d0, m0 = calls[srv]
                calls[srv] = (n0 + n, _merge_keyed(s0, statuses, 1),
                              (d0 + durations)[-HTTP_LATENCY_SAMPLES:], _merge_keyed(m0, methods, 1))
            else:
                calls[srv] = (n, statuses, durations, methods)
        return HttpSnapshot(
            _merge_histograms(self.histogram, other.histogram),
            _merge_keyed(self.parse_errors, other.parse_errors, 1),
            tuple((srv, tuple(sorted(recs, key=_finished_at, reverse=True)[:HTTP_RECENT]))
                  for srv, recs in itertools.islice(recent.items(), HTTP_RECENT_SERVERS)),
            tuple((srv, *v) for srv, v in summary.items()),
            _merge_histograms(self.rpc_histogram, other.rpc_histogram),
            _merge_keyed(self.rpc_messages, other.rpc_messages, 5),
            tuple((srv, *v) for srv, v in calls.items()))


def _finished_at(rec):
    return rec["ts"] + rec["duration"]


def _observe(histogram, labels, value):
    """One observation into {labels: [a count per HTTP_BUCKETS bucket and one above the
    last, sum, count]}."""
    h = histogram.get(labels)
    if h is None:
        h = histogram[labels] = [0] * (len(HTTP_BUCKETS) + 3)
    h[bisect.bisect_left(HTTP_BUCKETS, value)] += 1
    h[-2] += value
    h[-1] += 1


def _histogram_rows(histogram):
    return tuple((k, tuple(v[:-2]), v[-2], v[-1]) for k, v in histogram.items())


def _merge_histograms(a, b):
    """Histogram rows ((labels), bucket counts, sum, count) of two snapshots, summed."""
    hist = {}
    for labels, counts, total, n in a + b:
        if labels in hist:
            c, t, m = hist[labels]
            hist[labels] = (_add(c, counts), t + total, m + n)
        else:
            hist[labels] = (counts, total, n)
    return tuple((k, c, t, n) for k, (c, t, n) in hist.items())


class HttpRequests(Consumer):
    """HTTP/1.x requests on --http-ports, from the frames: `finished(record)` gets each
    request as an http.log record (Zeek's names where they exist)."""
    name = "http"
    snapshot_type = HttpSnapshot
    wants = frozenset((WANT_RAW, WANT_TS))

    def __init__(self, ports=DEFAULT_HTTP_PORTS, finished=None, container=None):
        self.ports = frozenset(ports)
        self.judged = {IPPROTO_TCP: self.ports}      # not_on_ports'
        self.finished = finished
        self.container = container or (lambda addr: "")
        self.streams = collections.OrderedDict()
        self.errors = dict.fromkeys(HTTP_PARSE_ERRORS, 0)
        self.histogram = {}                      # labels -> [bucket counts..., sum, count]
        self.recent = {}                         # server -> deque of records
        self.routes = {}                         # server -> {route: requests}
        self.summary = {}                        # server -> [requests, errors, durations]
        self.ooo_total = 0                       # out-of-order bytes held, every connection
        self.rpc_histogram = {}                  # as histogram, for gRPC calls
        self.rpc_methods = {}                    # server -> {method: calls}
        self.rpc_messages = {}                   # (method, direction, server, port, container) -> [n, bytes]
        self.rpc_summary = {}                    # server -> [calls, {status: n}, durations]
        self.h2_blocks = 0                       # HTTP/2 header block bytes held, every connection
        self.h2_streams = 0                      # and HTTP/2 streams open

    def snaplen(self):
        """Nothing of other frames: the kernel program returns this stage's frames whole
        (kernel_program's `whole`), and a replay has them whole."""
        return 0

    def whole_ports(self):
        return tuple(sorted(self.ports)), ()

    def consume(self, batch):
        ports = self.judged
        for data, ts, wire_bytes, frames, l2_len in frames_in_order(batch):
            if frames == 1 and len(data) < wire_bytes:
                continue                         # a frame cut short: its bytes are a gap
            if not not_on_ports(data, ports):
                self.packet(data, ts)

    def packet(self, data, ts):
        f = parse_l4(data)
        if f is None or f[0] != IPPROTO_TCP:
            return
        _, src, dst, sport, dport, ip_len, plen, flags, seq, ack, window, _, at = f
        if dport in self.ports:
            key, to_server = (src, sport, dst, dport), True
        elif sport in self.ports:
            key, to_server = (dst, dport, src, sport), False
        else:
            return
        s = self.streams.get(key)
        if s is not None and flags & (TH_SYN | TH_ACK) == TH_SYN and to_server and \
                s.to_server.next_seq not in (None, (seq + 1) % SEQ_MOD):
            self.end(s)                            # a new connection on the same ports
            s = None
        if s is None:
            if flags & TH_RST or not (plen or flags & TH_SYN):
                return
            if len(self.streams) >= HTTP_STREAMS_MAX:
                self.end(next(iter(self.streams.values())))
            s = self.streams[key] = _HttpStream(key, (src, sport) if to_server else (dst, dport),
                                                (dst, dport) if to_server else (src, sport),
                                                not flags & TH_SYN)
        self.streams.move_to_end(key)
        s.last = ts
        d = s.to_server if to_server else s.to_client
        if flags & TH_SYN:
            d.next_seq = (seq + 1) % SEQ_MOD
        elif plen or flags & TH_FIN:
            payload = memoryview(data)[at:at + plen]
            if d.next_seq is None:
                d.next_seq = seq                  # joined mid-stream
            self._segment(s, d, to_server, seq, payload, bool(flags & TH_FIN), ts)
        if flags & TH_RST or (s.to_server.fin and s.to_client.fin):
            self.end(s)

    def _segment(self, s, d, to_server, seq, payload, fin, ts):
        """Reassembly: deliver what continues the stream, hold what comes early."""
        if d.state == HTTP_STOPPED:
            return
        off = (seq - d.next_seq) % SEQ_MOD
        if off >= SEQ_HALF:                      # starts before next_seq: drop what was seen
            cut = SEQ_MOD - off
            if cut >= len(payload) and not (fin and cut == len(payload)):
                return
            payload, seq = payload[cut:], d.next_seq
            off = 0
        if off:
            held = d.ooo.get(seq)
            if held is None and len(d.ooo) >= HTTP_OOO_SEGMENTS:
                self._gap(s, d)                    # bare FINs and slivers count too
                return
            if held is None or len(held[0]) < len(payload):
                if held is not None:
                    d.ooo_bytes -= len(held[0])
                    self.ooo_total -= len(held[0])
                d.ooo[seq] = (bytes(payload), ts, fin)
                d.ooo_bytes += len(payload)
                self.ooo_total += len(payload)
            if d.ooo_bytes > HTTP_OOO_MAX or self.ooo_total > HTTP_OOO_TOTAL_MAX:
                self._gap(s, d)
            return
        self._deliver(s, d, to_server, payload, fin, ts)
        while d.ooo and d.state != HTTP_STOPPED:
            exact = d.ooo.pop(d.next_seq, None)
            if exact is not None:                  # the common case: no scan
                data, t, f = exact
                d.ooo_bytes -= len(data)
                self.ooo_total -= len(data)
                self._deliver(s, d, to_server, data, f, max(t, ts))
                continue
            for k in list(d.ooo):
                o = (k - d.next_seq) % SEQ_MOD
                if o == 0 or o >= SEQ_HALF:
                    data, t, f = d.ooo.pop(k)
                    d.ooo_bytes -= len(data)
                    self.ooo_total -= len(data)
                    if o >= SEQ_HALF:
                        data = data[SEQ_MOD - o:]
                        if not data and not f:
                            break
                    # held bytes are had now, when the gap before them filled
                    self._deliver(s, d, to_server, data, f, max(t, ts))
                    break
            else:
                break

    def _gap(self, s, d):
        self.errors["gap"] += 1
        d.state = HTTP_STOPPED
        self._drop_held(d)

    def _drop_held(self, d):
        self.ooo_total -= d.ooo_bytes
        d.ooo.clear()
        d.ooo_bytes = 0
        d.buf.clear()

    def _deliver(self, s, d, to_server, payload, fin, ts):
        d.next_seq = (d.next_seq + len(payload) + (1 if fin else 0)) % SEQ_MOD
        if payload:
            d.last_data = ts
            if not d.buf:
                d.buf_ts = ts
            d.buf += payload
            if s.h2 is None and not s.depth:
                h2 = Http2Connection.take(self, s, to_server, d)
                if h2 is H2_UNDECIDED:
                    return
                s.h2 = h2
            if s.h2 is None:
                (self._client_bytes if to_server else self._server_bytes)(s, d, ts)
            elif not s.h2.data(to_server, d, ts):
                d.state = HTTP_STOPPED
                d.buf.clear()
        if fin:
            d.fin = True
            if not to_server and d.state == HTTP_UNTIL_CLOSE and s.response:
                self._response_done(s, d.last_data)     # its last byte, not the FIN
            d.state = HTTP_STOPPED                      # nothing comes after a FIN

    # -- framing --------------------------------------------------------------

    def _head(self, d):
        """A complete head at the start of d.buf, or None (waiting, or no HTTP)."""
        m = HTTP_HEAD_END.search(d.buf, max(0, d.scanned - 3))   # a head trickling in: once
        if m is None:
            d.scanned = len(d.buf)
            if len(d.buf) > HTTP_MAX_HEAD:
                self.errors["head_too_large"] += 1
                d.state = HTTP_STOPPED
            return None
        d.scanned = 0
        head = bytes(d.buf[:m.start()])
        del d.buf[:m.end()]
        return head

    def _client_bytes(self, s, d, ts):
        while d.buf and d.state != HTTP_STOPPED:
            if d.state == HTTP_HEAD:
                while d.buf[:2] == b"\r\n" or d.buf[:1] == b"\n":      # blank lines between
                    del d.buf[:2 if d.buf[:2] == b"\r\n" else 1]
                if not d.buf:
                    return
                first_ts = d.buf_ts
                head = self._head(d)
                if head is None:
                    return
                parts = head.split(b"\n", 1)[0].split()
                if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                    self.errors["bad_request"] += 1
                    d.state = HTTP_STOPPED
                    return
                fields = _headers(head)
                if len(s.pending) >= HTTP_PENDING_MAX:
                    self.errors["too_many_pending"] += 1
                    d.state = HTTP_STOPPED
                    return
                s.depth += 1
                host = fields.get("host")
                r = _HttpRequest(first_ts, parts[0].decode("latin-1")[:HTTP_TEXT_MAX],
                                 parts[1].decode("latin-1")[:HTTP_TEXT_MAX],
                                 host[:HTTP_TEXT_MAX] if host is not None else None, s.depth,
                                 parts[2][len(b"HTTP/"):].decode("latin-1"),
                                 fields.get("upgrade", "").lower() == HTTP_H2C)
                s.pending.append(r)
                s.current_request = r
                d.buf_ts = ts
                self._frame_body(d, fields, parts[2] == b"HTTP/1.1", None)
            elif not self._body_bytes(d, lambda n: setattr(s.current_request, "req_body",
                                                          s.current_request.req_body + n)):
                return
            if d.state == HTTP_HEAD:
                d.buf_ts = ts

    def _frame_body(self, d, fields, http11, no_body):
        """After a head: what the body is (RFC 9112 6.3)."""
        te = fields.get("transfer-encoding", "").lower()
        if no_body:
            d.state = HTTP_HEAD
        elif te and te.rsplit(",", 1)[-1].strip() == "chunked":
            d.state = HTTP_CHUNK_SIZE
        elif "content-length" in fields:
            # RFC 9112 6.3: digits only; a list of one value repeated is that value
            values = {v.strip() for v in fields["content-length"].split(",")}
            value = values.pop() if len(values) == 1 else ""
            d.left = int(value) if HTTP_CONTENT_LENGTH.fullmatch(value) else -1
            if d.left < 0:
                self.errors["bad_request" if no_body is None else "bad_response"] += 1
                d.state = HTTP_STOPPED
                return
            d.state = HTTP_BODY if d.left else HTTP_HEAD
        elif no_body is None:
            d.state = HTTP_HEAD                  # a request without a length has no body
        else:
            d.state = HTTP_UNTIL_CLOSE

    def _line(self, d, error):
        """The next CRLF-ended line of d.buf, taken from it; None while incomplete (or
        when it grew past HTTP_MAX_HEAD: counted as `error`, the stream stopped)."""
        m = HTTP_CHUNK_LINE.search(d.buf, max(0, d.scanned - 1))
        d.scanned = 0 if m else len(d.buf)
        if m is None:
            if len(d.buf) > HTTP_MAX_HEAD:
                self.errors[error] += 1
                d.state = HTTP_STOPPED
            return None
        line = bytes(d.buf[:m.start()])
        del d.buf[:m.end()]
        return line

    def _body_bytes(self, d, add):
        """Consume body bytes from d.buf in the current state; add(n) counts them.
        False when it must wait for more bytes (a size line or CRLF not complete)."""
        if d.state in (HTTP_BODY, HTTP_CHUNK_DATA):
            n = min(d.left, len(d.buf))
            del d.buf[:n]
            add(n)
            d.left -= n
            if not d.left:
                d.state = HTTP_HEAD if d.state == HTTP_BODY else HTTP_CHUNK_END
        elif d.state == HTTP_CHUNK_SIZE:
            line = self._line(d, "bad_chunk")
            if line is None:
                return False
            line = line.split(b";", 1)[0].strip()
            if not HTTP_CHUNK_SIZE_RE.fullmatch(line):      # int(x, 16) takes 0x5, +5, -5, 0_5
                self.errors["bad_chunk"] += 1
                d.state = HTTP_STOPPED
                return False
            d.left = int(line, 16)
            d.state = HTTP_CHUNK_DATA if d.left else HTTP_TRAILER
        elif d.state == HTTP_CHUNK_END:
            m = HTTP_CHUNK_LINE.match(d.buf)
            if m is None:
                if len(d.buf) >= 2 or d.buf[:1] not in (b"\r", b"\n"):
                    self.errors["bad_chunk"] += 1
                    d.state = HTTP_STOPPED
                return False
            del d.buf[:m.end()]
            d.state = HTTP_CHUNK_SIZE
        elif d.state == HTTP_TRAILER:
            line = self._line(d, "head_too_large")
            if line is None:
                return False
            if not line.strip():
                d.state = HTTP_HEAD              # the blank line ends the trailers
        elif d.state == HTTP_UNTIL_CLOSE:
            add(len(d.buf))
            d.buf.clear()
        return True

    def _server_bytes(self, s, d, ts):
        while d.buf and d.state != HTTP_STOPPED:
            if d.state == HTTP_HEAD:
                first_ts = d.buf_ts
                head = self._head(d)
                if head is None:
                    return
                m = HTTP_STATUS_LINE.match(head)
                if m is None:
                    self.errors["bad_response"] += 1
                    d.state = HTTP_STOPPED
                    return
                code = int(m.group(2))
                if not s.pending:
                    self.errors["unmatched_response"] += 1
                    d.state = HTTP_STOPPED
                    return
                r = s.pending[0]
                if 100 <= code < 200 and code != 101:
                    d.buf_ts = ts
                    continue                     # interim (100 Continue): the request goes on
                if code == 101 and r.upgrade and len(s.pending) == 1:
                    s.pending.popleft()          # HTTP/2 from here; the request is stream 1
                    s.current_request = None
                    s.h2 = Http2Connection(self, s, False, r)
                    if not s.h2.data(False, d, ts):
                        d.state = HTTP_STOPPED
                    if s.to_server.buf and not s.h2.data(True, s.to_server, ts):
                        s.to_server.state = HTTP_STOPPED
                    return
                r.status, r.ttfb = code, first_ts - r.ts
                s.response = r
                fields = _headers(head)
                no_body = r.head or code in (204, 304) or code == 101 or \
                    (r.connect and 200 <= code < 300)
                self._frame_body(d, fields, m.group(1) == b"1", no_body)
                if d.state == HTTP_HEAD:
                    self._response_done(s, ts)
                if code == 101 or (r.connect and 200 <= code < 300):
                    d.state = s.to_server.state = HTTP_STOPPED     # a tunnel: not HTTP any more
                    return
            else:
                r = s.response
                if r is None:                     # bytes after the response that ran to the close
                    d.state = HTTP_STOPPED
                    return
                if not self._body_bytes(d, lambda n: setattr(r, "resp_body", r.resp_body + n)):
                    return
                if d.state == HTTP_HEAD:
                    self._response_done(s, ts)
            d.buf_ts = ts

    def _response_done(self, s, ts):
        r = s.response
        s.response = None
        if s.pending and s.pending[0] is r:
            s.pending.popleft()
        r.end = ts
        self.record(s, r)

    # -- ends -----------------------------------------------------------------

    def end(self, s):
        """The connection is over: a response running to the close ends, requests left
        unanswered finish with status 0, an unfilled gap is counted."""
        self.streams.pop(s.key, None)
        if s.h2 is not None:
            s.h2.end(s.last)
        if s.response is not None and s.to_client.state == HTTP_UNTIL_CLOSE:
            self._response_done(s, s.to_client.last_data)
        for d in (s.to_server, s.to_client):
            if d.ooo and d.state != HTTP_STOPPED:
                self._gap(s, d)
            self._drop_held(d)
        while s.pending:
            r = s.pending.popleft()
            r.end = s.last
            r.status = 0 if r.ttfb is None else r.status
            self.record(s, r)

    def finish(self):
        """End of a replay (or of capture): every stream's pending requests are recorded."""
        for s in list(self.streams.values()):
            self.end(s)
        return True

    def tick(self, now):
        while self.streams:
            s = next(iter(self.streams.values()))
            if s.last + HTTP_IDLE_TIMEOUT > now:
                break
            self.end(s)

    def record(self, s, r):
        (ch, cp), (sh, sp) = s.client, s.server
        server_h = raw_address(sh)
        server = f"{server_h}:{sp}"
        container = self.container(sh)
        if container:
            server = container
        if server not in self.routes and len(self.routes) >= HTTP_SERVERS_MAX:
            server_label = port_label = server = "other"      # a scan of many servers
        else:
            server_label, port_label = server_h, str(sp)
        rec = {"ts": round(r.ts, 6), "id.orig_h": raw_address(ch), "id.orig_p": cp, "id.resp_h": server_h,
               "id.resp_p": sp, "trans_depth": r.depth, "method": r.method}
        if r.host is not None:
            rec["host"] = r.host
        rec.update({"uri": r.uri, "version": r.version, "status_code": r.status,
                    "request_body_len": r.req_body, "response_body_len": r.resp_body})
        if r.stream is not None:
            rec["stream_id"] = r.stream
        if r.ttfb is not None:
            rec["ttfb"] = round(r.ttfb, 6)
        duration = r.end - r.ts
        rec.update({"duration": round(duration, 6), "container": container})
        rpc = r.rpc
        if rpc is not None:
            rec.update({"rpc_method": rpc.method, "grpc_status": rpc.status})
            if rpc.message is not None:
                rec["grpc_message"] = rpc.message
            rec.update({"request_messages": rpc.messages[0],
                        "response_messages": rpc.messages[1]})
            self._call(server, rpc, duration, (server_label, port_label, container))
        else:
            self._request(server, r, duration, (server_label, port_label, container))
        if server in self.recent or len(self.recent) < HTTP_RECENT_SERVERS:
            self.recent.setdefault(server, collections.deque(maxlen=HTTP_RECENT)).appendleft(rec)
        if self.finished is not None:
            self.finished(rec)

    def _request(self, server, r, duration, where):
        routes = self.routes.setdefault(server, {})
        route = http_route(r.uri)
        if route not in routes and len(routes) >= HTTP_ROUTES_MAX:
            route = "other"
        routes[route] = routes.get(route, 0) + 1
        method = r.method if r.method in HTTP_METHODS else HTTP_OTHER
        _observe(self.histogram, (method, str(r.status), route, r.version) + where, duration)
        summary = self.summary.setdefault(server, [0, 0, collections.deque(maxlen=HTTP_LATENCY_SAMPLES)])
        summary[0] += 1
        summary[1] += r.status == 0 or r.status >= 500
        summary[2].append(duration)

    def _call(self, server, rpc, duration, where):
        """A gRPC call: its histogram (methods bounded per server as routes are), its
        messages, the server's summary by status."""
        methods = self.rpc_methods.setdefault(server, {})
        method = rpc.method
        if method not in methods and len(methods) >= HTTP_ROUTES_MAX:
            method = "other"
        methods[method] = methods.get(method, 0) + 1
        status = HTTP_OTHER if rpc.status is None else GRPC_STATUS_NAMES[rpc.status]
        _observe(self.rpc_histogram, (RPC_SYSTEM, method, status) + where, duration)
        for way, direction in enumerate(("request", "response")):
            key = (method, direction) + where
            counts = self.rpc_messages.setdefault(key, [0, 0])
            counts[0] += rpc.messages[way]
            counts[1] += rpc.message_bytes[way]
        summary = self.rpc_summary.setdefault(
            server, [0, {}, collections.deque(maxlen=HTTP_LATENCY_SAMPLES)])
        summary[0] += 1
        summary[1][status] = summary[1].get(status, 0) + 1
        summary[2].append(duration)

    def snapshot(self):
        return HttpSnapshot(_histogram_rows(self.histogram),
                            tuple(self.errors.items()),
                            tuple((srv, tuple(q)) for srv, q in self.recent.items()),
                            tuple((srv, n, e, tuple(lat), tuple(self.routes.get(srv, {}).items()))
                                  for srv, (n, e, lat) in self.summary.items()),
                            _histogram_rows(self.rpc_histogram),
                            tuple(k + tuple(v) for k, v in self.rpc_messages.items()),
                            tuple((srv, n, tuple(st.items()), tuple(lat),
                                   tuple(self.rpc_methods.get(srv, {}).items()))
                                  for srv, (n, st, lat) in self.rpc_summary.items()))


def _percentile(sorted_values, q):
    """The q-quantile (nearest rank) of sorted values; 0 for none."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def http_document(snap, how, top=None):
    """--output json's "http": per server requests, errors (status 0 or 5xx), latency
    percentiles and routes; parse errors. `top`: the busiest servers, and routes each."""
    http = snap.get("http")
    if http is None:
        return None
    servers = {}
    for server, n, errors, durations, routes in _first(http.servers, top, lambda s: (-s[1], s[0])):
        lat = sorted(durations)
        ranked = sorted(routes, key=lambda rn: (-rn[1], rn[0]))
        servers[server] = {"requests": n, "errors": errors, "p50": _percentile(lat, 0.5),
                           "p95": _percentile(lat, 0.95), "p99": _percentile(lat, 0.99),
                           "routes": dict(ranked if top is None else ranked[:top])}
    rpc = {}
    for server, n, statuses, durations, methods in _first(http.rpc_servers, top,
                                                           lambda s: (-s[1], s[0])):
        lat = sorted(durations)
        ranked = sorted(methods, key=lambda mn: (-mn[1], mn[0]))
        rpc[server] = {"calls": n, "errors": n - dict(statuses).get(GRPC_OK, 0),
                       "statuses": dict(sorted(statuses, key=lambda sn: (-sn[1], sn[0]))),
                       "p50": _percentile(lat, 0.5), "p95": _percentile(lat, 0.95),
                       "p99": _percentile(lat, 0.99),
                       "methods": dict(ranked if top is None else ranked[:top])}
    return {**_envelope(snap, how), "servers": servers, "rpc": rpc,
            "rpc_total": len(http.rpc_servers), "parse_errors": dict(http.parse_errors),
            **_cut(servers, len(http.servers))}


def requests_document(snap, how, top=None, server=None, rows=None):
    """/api/requests: the last requests per server, newest first (`top`: at most N each);
    `rows`: at most that many in all, servers in the order lpd first saw them."""
    http = snap.get("http")
    if http is None:
        return None
    recent, kept, total = {}, 0, 0
    for srv, recs in http.recent:
        if server is not None and srv != server:
            continue
        n = len(recs) if top is None else min(top, len(recs))
        if rows is not None:
            n = min(n, rows - kept)
        recent[srv] = list(recs[:n])
        kept, total = kept + n, total + len(recs)
    return {**_envelope(snap, how), "servers": recent, "total": total, "truncated": kept < total}


def http_metrics(c, snap):
    """The HTTP requests' families (a row of STAGES): OpenTelemetry's duration
    histogram, parse errors; none without --http."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
    http = snap.get("http")
    if http is None:
        return
    bounds = [f"{b:g}" for b in HTTP_BUCKETS] + ["+Inf"]
    for name, doc, labels, rows in (
            ("http_server_request_duration_seconds",
             "Duration of HTTP server requests, from packets (OpenTelemetry semantic "
             "conventions).", ["http_request_method", "http_response_status_code",
                               "http_route", "network_protocol_version"], http.histogram),
            ("rpc_server_call_duration_seconds",
             "Duration of gRPC calls a server answered, from packets (OpenTelemetry "
             "semantic conventions v1.40.0).",
             ["rpc_system_name", "rpc_method", "rpc_response_status_code"], http.rpc_histogram)):
        fam = HistogramMetricFamily(name, doc, labels=labels + ["server_address", "server_port",
                                                                "container"])
        for values, counts, total, n in rows:
            fam.add_metric(list(values), list(zip(bounds, itertools.accumulate(counts))), total)
        yield fam
    labels = ["rpc_method", "direction", "server_address", "server_port", "container"]
    yield metric_family(CounterMetricFamily, "lpd_rpc_messages",
                        "gRPC messages (length-prefixed) of the calls, by direction.", labels,
                        [(row[:5], row[5]) for row in http.rpc_messages])
    yield metric_family(CounterMetricFamily, "lpd_rpc_message_bytes",
                        "Bytes of gRPC messages (without their 5-byte prefixes), by direction.",
                        labels, [(row[:5], row[6]) for row in http.rpc_messages])
    yield metric_family(CounterMetricFamily, "lpd_http_parse_errors",
                        "HTTP streams lpd stopped parsing, by reason.", ["reason"],
                        [((r,), n) for r, n in http.parse_errors])


HTTP_TABLE_ROUTES = 5              # routes a table lists per server


def http_table(doc):
    """--output table's HTTP servers: requests, errors, latency, the busiest routes."""
    out = [f"\nHTTP servers: {len(doc['servers'])}\n"]
    header = ("server", "requests", "error %", "p50 s", "p95 s", "p99 s", "top routes")
    rows = [[srv, str(d["requests"]), f"{100 * d['errors'] / max(1, d['requests']):.1f}",
             f"{d['p50']:.4f}", f"{d['p95']:.4f}", f"{d['p99']:.4f}",
             ", ".join(f"{r} {n}" for r, n in list(d["routes"].items())[:HTTP_TABLE_ROUTES])]
            for srv, d in sorted(doc["servers"].items(), key=lambda kv: -kv[1]["requests"])]
    out += _columns(header, rows, header[1:6])
    if doc["rpc"]:
        out.append(f"\ngRPC servers: {doc['rpc_total']}\n")
        header = ("server", "calls", "error %", "p50 s", "p95 s", "p99 s", "statuses",
                  "top methods")
        rows = [[srv, str(d["calls"]), f"{100 * d['errors'] / max(1, d['calls']):.1f}",
                 f"{d['p50']:.4f}", f"{d['p95']:.4f}", f"{d['p99']:.4f}",
                 ", ".join(f"{st} {n}" for st, n in d["statuses"].items()),
                 ", ".join(f"{m} {n}" for m, n in list(d["methods"].items())[:HTTP_TABLE_ROUTES])]
                for srv, d in sorted(doc["rpc"].items(), key=lambda kv: -kv[1]["calls"])]
        out += _columns(header, rows, header[1:6])
    bad = ", ".join(f"{r} {n}" for r, n in doc["parse_errors"].items() if n)
    if bad:
        out.append(f"parse errors: {bad}\n")
    return out


def _http_requests(opts, w, built):
    if not opts.http:
        return None
    log_ = w.logs.get(HttpRequests.name)
    return HttpRequests(opts.http_ports, log_.write if log_ is not None else None,
                        w.names.name_of if w.names else None)


STAGES.append(Stage(HttpRequests, _http_requests, (("http", http_document),), http_metrics,
                    http_table, log="--http-log", live_documents=(("requests", requests_document),)))


###############################################################################
# 17 eBPF engine: accounting and rules as one kernel program (--engine ebpf) ####
###############################################################################
# provides: build_program, CopyPlan, disassemble, ebpf_available, emit_rule, Gen, KernelAccounting,
#   Label, MAP_NAMES, overflow_slots, Untranslatable
#
# The decoder and every rule, emitted as one BPF_PROG_TYPE_SOCKET_FILTER program and
# attached with SO_ATTACH_BPF to the capture socket: it counts per local address
# (a per-CPU hash), per rule and per interface (per-CPU arrays) and returns 0, so no
# frame is copied unless a userspace stage needs it. The program reads the frame as
# userspace does (a stripped VLAN tag put back in a stack copy of its first bytes)
# and mirrors Decoder.process_block test for test; the rules are lpd's own classic
# programs translated as the kernel's bpf_convert_filter does, with lpd's interpreter
# semantics where the two differ. Loaded with bpf(2) through ctypes: no compiler,
# no libbpf, no BTF.


###############################################################################
# 17.1 Assembler ##############################################################
# provides: alu32_imm, alu32_reg, alu64_imm, alu64_reg, assemble, atomic_add, call, disassemble,
#   endian_be, exit_insn, ja, jmp_imm, jmp_reg, Label, ld_map_fd, ldx, mov32_imm, mov32_reg,
#   mov64_imm, mov64_reg, st_imm, stx



class Insn(tuple):
    """One eBPF instruction before assembly: (code, dst, src, off, imm). `off` may be a
    label name (a jump), resolved by assemble(); ld_imm64 is one Insn with a 64-bit imm."""
    __slots__ = ()

    def __new__(cls, code, dst=0, src=0, off=0, imm=0):
        return tuple.__new__(cls, (code, dst, src, off, imm))


class Label(str):
    """A position in the instruction list; jumps name it."""
    __slots__ = ()


def is_ld_imm64(code):
    return code == EBPF_LD | EBPF_DW | EBPF_IMM


# Constructors: the kernel's filter.h macros, same names lowercased.
def alu64_imm(op, dst, imm):
    return Insn(EBPF_ALU64 | op | EBPF_K, dst, 0, 0, imm)


def alu64_reg(op, dst, src):
    return Insn(EBPF_ALU64 | op | EBPF_X, dst, src)


def alu32_imm(op, dst, imm):
    return Insn(EBPF_ALU | op | EBPF_K, dst, 0, 0, imm)


def alu32_reg(op, dst, src):
    return Insn(EBPF_ALU | op | EBPF_X, dst, src)


def mov64_imm(dst, imm):
    return alu64_imm(EBPF_MOV, dst, imm)


def mov64_reg(dst, src):
    return alu64_reg(EBPF_MOV, dst, src)


def mov32_imm(dst, imm):
    """dst = imm as u32, zero-extended (imm is taken as 32 bits, any sign)."""
    return alu32_imm(EBPF_MOV, dst, _s32(imm))


def mov32_reg(dst, src):
    return alu32_reg(EBPF_MOV, dst, src)


def endian_be(dst, bits):
    """dst = htobe<bits>(dst): a byte swap on x86, and zero-extension to `bits`."""
    return Insn(EBPF_ALU | EBPF_END | EBPF_TO_BE, dst, 0, 0, bits)


def ldx(size, dst, src, off):
    return Insn(EBPF_LDX | size | EBPF_MEM, dst, src, off)


def stx(size, dst, src, off):
    return Insn(EBPF_STX | size | EBPF_MEM, dst, src, off)


def st_imm(size, dst, off, imm):
    return Insn(EBPF_ST | size | EBPF_MEM, dst, 0, off, imm)


def atomic_add(size, dst, src, off):
    """*(size *)(dst + off) += src, atomically (BPF_XADD's encoding, imm = BPF_ADD)."""
    return Insn(EBPF_STX | size | EBPF_ATOMIC, dst, src, off, EBPF_ADD)


def jmp_imm(op, dst, imm, label, wide=True):
    return Insn((EBPF_JMP if wide else EBPF_JMP32) | op | EBPF_K, dst, 0, label, imm)


def jmp_reg(op, dst, src, label, wide=True):
    return Insn((EBPF_JMP if wide else EBPF_JMP32) | op | EBPF_X, dst, src, label)


def ja(label):
    return Insn(EBPF_JMP | EBPF_JA, 0, 0, label)


def call(helper):
    return Insn(EBPF_JMP | EBPF_CALL, 0, 0, 0, HELPER[helper] if isinstance(helper, str) else helper)


def exit_insn():
    return Insn(EBPF_JMP | EBPF_EXIT)


def ld_imm64(dst, imm, src=0):
    return Insn(EBPF_LD | EBPF_DW | EBPF_IMM, dst, src, 0, imm)


def ld_map_fd(dst, fd):
    """dst = the map behind fd (the verifier replaces the fd by the map's address)."""
    return ld_imm64(dst, fd, BPF_PSEUDO_MAP_FD)


class AsmError(ValueError):
    pass


def _is_jump(code):
    return _cls(code) in (EBPF_JMP, EBPF_JMP32) and code & 0xF0 not in (EBPF_CALL, EBPF_EXIT)


def prune(items):
    """Drop the instructions no path reaches: the verifier refuses a program with any
    ('unreachable insn N'), and the generators emit some freely (a slow path for a load
    that can only take it, a ja after a rule's last ret). Labels stay where they are."""
    insns = [i for i, it in enumerate(items) if not isinstance(it, Label)]
    where, pending = {}, []
    for i, it in enumerate(items):                 # label -> index of the next instruction
        if isinstance(it, Label):
            pending.append(it)
        else:
            for lab in pending:
                where[lab] = i
            pending = []
    nxt = {a: b for a, b in zip(insns, insns[1:])}
    seen, todo = set(), [insns[0]] if insns else []
    while todo:
        i = todo.pop()
        if i in seen or i is None:
            continue
        seen.add(i)
        code, _, _, off, _ = items[i]
        op = code & 0xF0
        if _cls(code) in (EBPF_JMP, EBPF_JMP32) and op == EBPF_EXIT:
            continue
        if _is_jump(code):
            if off in where:
                todo.append(where[off])
            elif isinstance(off, str):
                raise AsmError(f"jump to undefined label {off!r}")
            if op == EBPF_JA:
                continue
        todo.append(nxt.get(i))
    return [it for i, it in enumerate(items) if isinstance(it, Label) or i in seen]


def assemble(items):
    """[Insn | Label, ...] -> (bytes of struct bpf_insn, {label: slot}).

    Unreachable instructions are dropped first (prune). Then two passes: slots (ld_imm64
    takes two), then each jump's `off` becomes target - (slot + 1). A conditional jump's
    offset is s16, as is ja's here (no gotol)."""
    items = prune(items)
    labels, slot = {}, 0
    for it in items:
        if isinstance(it, Label):
            if it in labels:
                raise AsmError(f"label {it!r} defined twice")
            labels[it] = slot
        else:
            slot += 2 if is_ld_imm64(it[0]) else 1
    out, slot = bytearray(), 0
    for it in items:
        if isinstance(it, Label):
            continue
        code, dst, src, off, imm = it
        if isinstance(off, str):
            if off not in labels:
                raise AsmError(f"jump to undefined label {off!r}")
            off = labels[off] - (slot + 1)
            if not S16_MIN <= off <= S16_MAX:
                raise AsmError(f"jump to {it[3]!r} out of s16 range ({off})")
        if is_ld_imm64(code):
            out += BPF_INSN.pack(code, src << 4 | dst, 0, _s32(imm))
            out += BPF_INSN.pack(0, 0, 0, _s32(imm >> 32))
            slot += 2
        else:
            out += BPF_INSN.pack(code, src << 4 | dst, off, _s32(imm))
            slot += 1
    return bytes(out), labels


def decode(image):
    """bytes -> [(slot, code, dst, src, off, imm)], ld_imm64 merged (imm 64-bit)."""
    out, n, i = [], len(image) // BPF_INSN_SIZE, 0
    while i < n:
        code, regs, off, imm = BPF_INSN.unpack_from(image, i * BPF_INSN_SIZE)
        dst, src = regs & 0xF, regs >> 4
        if is_ld_imm64(code) and i + 1 < n:
            hi = BPF_INSN.unpack_from(image, (i + 1) * BPF_INSN_SIZE)[3]
            out.append((i, code, dst, src, off, (imm & 0xFFFFFFFF) | (hi << 32)))
            i += 2
        else:
            out.append((i, code, dst, src, off, imm))
            i += 1
    return out


# Disassembly in the verifier log's own notation (kernel/bpf/disasm.c), so a `-d --engine
# ebpf` listing reads like the log of a load that failed.
_ALU_SYM = {EBPF_ADD: "+=", EBPF_SUB: "-=", EBPF_MUL: "*=", EBPF_DIV: "/=", EBPF_OR: "|=",
            EBPF_AND: "&=", EBPF_LSH: "<<=", EBPF_RSH: ">>=", EBPF_MOD: "%=", EBPF_XOR: "^=",
            EBPF_MOV: "=", EBPF_ARSH: "s>>="}
_JMP_SYM = {EBPF_JEQ: "==", EBPF_JGT: ">", EBPF_JGE: ">=", EBPF_JSET: "&", EBPF_JNE: "!=",
            EBPF_JSGT: "s>", EBPF_JSGE: "s>=", EBPF_JLT: "<", EBPF_JLE: "<=", EBPF_JSLT: "s<",
            EBPF_JSLE: "s<="}
_SIZE_C = {EBPF_W: "u32", EBPF_H: "u16", EBPF_B: "u8", EBPF_DW: "u64"}


def _imm_text(imm):
    return f"{imm}" if -512 <= imm <= 512 else f"{imm:#x}" if imm >= 0 else f"-{-imm:#x}"


def disasm_one(code, dst, src, off, imm, slot=0, names=None):
    """One instruction as text. names: {slot: label} to print jump targets by name."""
    cls = _cls(code)
    if cls in (EBPF_ALU, EBPF_ALU64):
        r = "r" if cls == EBPF_ALU64 else "w"
        op = code & 0xF0
        if op == EBPF_END:
            return f"r{dst} = {'be' if code & EBPF_TO_BE else 'le'}{imm} r{dst}"
        if op == EBPF_NEG:
            return f"{r}{dst} = -{r}{dst}"
        operand = f"{r}{src}" if code & EBPF_X else _imm_text(imm)
        return f"{r}{dst} {_ALU_SYM.get(op, '?=')} {operand}"
    if cls in (EBPF_JMP, EBPF_JMP32):
        op = code & 0xF0
        target = slot + 1 + off
        where = names.get(target) if names else None
        dest = f"{where} (pc{off:+d})" if where else f"pc{off:+d}"
        if op == EBPF_EXIT:
            return "exit"
        if op == EBPF_CALL:
            if src == BPF_PSEUDO_CALL:
                return f"call pc{imm:+d}"
            return f"call bpf_{HELPERS.get(imm, 'unknown')}#{imm}"
        if op == EBPF_JA:
            return f"goto {dest}"
        r = "r" if cls == EBPF_JMP else "w"
        operand = f"{r}{src}" if code & EBPF_X else _imm_text(imm)
        return f"if {r}{dst} {_JMP_SYM.get(op, '??')} {operand} goto {dest}"
    size = _SIZE_C.get(code & 0x18, "?")
    mode = code & 0xE0
    if cls == EBPF_LDX and mode == EBPF_MEM:
        return f"r{dst} = *({size} *)(r{src} {off:+d})"
    if cls == EBPF_STX and mode == EBPF_MEM:
        return f"*({size} *)(r{dst} {off:+d}) = r{src}"
    if cls == EBPF_ST and mode == EBPF_MEM:
        return f"*({size} *)(r{dst} {off:+d}) = {_imm_text(imm)}"
    if cls == EBPF_STX and mode == EBPF_ATOMIC:
        return f"lock *({size} *)(r{dst} {off:+d}) += r{src}" if imm == EBPF_ADD else \
            f"atomic {imm:#x} *({size} *)(r{dst} {off:+d}), r{src}"
    if cls == EBPF_LD and is_ld_imm64(code):
        return f"r{dst} = map[fd:{imm}] ll" if src == BPF_PSEUDO_MAP_FD else f"r{dst} = {imm:#x} ll"
    if cls == EBPF_LD and mode in (EBPF_ABS, EBPF_IND):
        where = f"{imm}" if mode == EBPF_ABS else f"r{src} + {imm}"
        return f"r0 = *({size} *)skb[{where}]"
    return f"unknown {code:#04x}"


def disassemble(image, labels=None):
    """The whole program, one line per instruction, labels on lines of their own."""
    names = {slot: name for name, slot in (labels or {}).items()}
    lines = []
    for slot, code, dst, src, off, imm in decode(image):
        if slot in names:
            lines.append(f"{names[slot]}:")
        lines.append(f"  {slot:4d}: ({code:02x}) {disasm_one(code, dst, src, off, imm, slot, names)}")
    return "\n".join(lines) + "\n"


###############################################################################
# 17.2 Syscalls: bpf(2), maps, programs, test runs ############################
# provides: attach, load_program, Map, Program, _round8, _syscall

LOG_SIZE = 1 << 22                                   # verifier log: 4 MiB is plenty for lpd's programs
LOG_LEVEL_BRANCHES = 1

U64 = struct.Struct("=Q")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_uint)


class BpfError(OSError):
    """A failed bpf(2) command; `log` holds the verifier's words for a failed load."""

    def __init__(self, err, what, log=""):
        super().__init__(err, f"{what}: {os.strerror(err)}" + (f"\n{log}" if log else ""))
        self.log = log


def _buf(data_or_size):
    if isinstance(data_or_size, int):
        return ctypes.create_string_buffer(data_or_size)
    return ctypes.create_string_buffer(bytes(data_or_size), len(data_or_size))


def _addr(buf):
    return ctypes.addressof(buf) if buf is not None else 0


def bpf(cmd, attr, what):
    """bpf(cmd, attr): the result (an fd or 0); raises BpfError. attr: a ctypes buffer,
    written back by the kernel for the commands that answer in it."""
    r = _syscall(NR_BPF, cmd, ctypes.addressof(attr), len(attr))
    if r < 0:
        raise BpfError(ctypes.get_errno(), what)
    return r


def possible_cpus(path="/sys/devices/system/cpu/possible"):
    """Per-CPU map values come one per *possible* CPU (not online, not nproc): '0-3,8-11'."""
    with open(path) as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def _round8(n):
    return (n + 7) & ~7




class Map:
    """A BPF map by fd. Per-CPU maps read as a list of per-CPU values, each value
    round_up(value_size, 8) bytes apart (kernel/bpf/syscall.c bpf_map_value_size)."""

    def __init__(self, map_type, key_size, value_size, max_entries, name="", flags=0):
        self.type, self.key_size, self.value_size = map_type, key_size, value_size
        self.max_entries = max_entries
        self.percpu = map_type in (BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY)
        self.ncpus = possible_cpus() if self.percpu else 1
        self.stride = _round8(value_size) if self.percpu else value_size
        self.buf_size = self.stride * self.ncpus
        attr = _buf(ATTR_MAP_CREATE.pack(map_type, key_size, value_size, max_entries, flags, 0, 0,
                                         name.encode()[:BPF_OBJ_NAME_LEN - 1]))
        self.fd = bpf(BPF_MAP_CREATE, attr, f"BPF_MAP_CREATE {name}")

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _elem(self, cmd, key, value_buf=None, flags=0, what="map"):
        kbuf = _buf(key) if key is not None else None
        attr = _buf(ATTR_MAP_ELEM.pack(self.fd, _addr(kbuf), _addr(value_buf), flags))
        return bpf(cmd, attr, what)

    def lookup(self, key):
        """Raw value bytes (all CPUs' for a per-CPU map), or None."""
        vbuf = _buf(self.buf_size)
        try:
            self._elem(BPF_MAP_LOOKUP_ELEM, key, vbuf, what="BPF_MAP_LOOKUP_ELEM")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return vbuf.raw

    def update(self, key, value, flags=0):
        """value: bytes of buf_size (a per-CPU map takes one value per possible CPU)."""
        self._elem(BPF_MAP_UPDATE_ELEM, key, _buf(value), flags, "BPF_MAP_UPDATE_ELEM")

    def insert(self, key, value):
        """Add a key that is absent, where there is room: False when it is there already
        or the map is full, the two answers a bounded table expects."""
        try:
            self.update(key, value, BPF_NOEXIST)
        except BpfError as e:
            if e.errno not in (errno.E2BIG, errno.EEXIST):
                raise
            return False
        return True

    def delete(self, key):
        self._elem(BPF_MAP_DELETE_ELEM, key, what="BPF_MAP_DELETE_ELEM")

    def pop(self, key):
        """The value as it was when the key went (one syscall, Linux 5.14+ for hash
        maps: a program's add lands before or in what it returns), or None if absent.
        Lookup then delete where the kernel lacks it."""
        if getattr(self, "_pop_ok", True):
            vbuf = _buf(self.buf_size)
            try:
                self._elem(BPF_MAP_LOOKUP_AND_DELETE_ELEM, key, vbuf,
                           what="BPF_MAP_LOOKUP_AND_DELETE_ELEM")
                return vbuf.raw
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    return None
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, ENOTSUPP):
                    raise
                self._pop_ok = False
        value = self.lookup(key)
        if value is not None:
            self.delete(key)
        return value

    def keys(self):
        """Every key, by GET_NEXT_KEY (a NULL key gives the first)."""
        out, key = [], None
        nbuf = _buf(self.key_size)
        while True:
            kbuf = _buf(key) if key is not None else None
            attr = _buf(ATTR_MAP_ELEM.pack(self.fd, _addr(kbuf), _addr(nbuf), 0))
            try:
                bpf(BPF_MAP_GET_NEXT_KEY, attr, "BPF_MAP_GET_NEXT_KEY")
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    return out
                raise
            key = nbuf.raw
            out.append(key)

    def items_slow(self):
        """[(key, value bytes)] by GET_NEXT_KEY + LOOKUP_ELEM: 2 syscalls per entry, and an
        entry deleted between the two is skipped (LOOKUP answers ENOENT)."""
        out = []
        for key in self.keys():
            v = self.lookup(key)
            if v is not None:
                out.append((key, v))
        return out

    def items_batch(self, chunk=256):
        """[(key, value bytes)] by BPF_MAP_LOOKUP_BATCH: one syscall per `chunk` entries.
        Raises BpfError(EINVAL/ENOTSUPP) where the kernel or the map type lacks it."""
        out = []
        keys, vals = _buf(self.key_size * chunk), _buf(self.buf_size * chunk)
        # The batch cursor is opaque, as big as a key for hash maps (u32 for arrays).
        inb, outb = _buf(max(self.key_size, 4)), _buf(max(self.key_size, 4))
        first = True
        while True:
            attr = _buf(ATTR_MAP_BATCH.pack(0 if first else _addr(inb), _addr(outb), _addr(keys),
                                            _addr(vals), chunk, self.fd, 0, 0))
            done = False
            try:
                bpf(BPF_MAP_LOOKUP_BATCH, attr, "BPF_MAP_LOOKUP_BATCH")
            except BpfError as e:
                if e.errno != errno.ENOENT:      # ENOENT: the last (possibly partial) batch
                    raise
                done = True
            n = U32.unpack_from(attr.raw, ATTR_MAP_BATCH_COUNT_OFF)[0]
            kr, vr = keys.raw, vals.raw
            for i in range(n):
                out.append((kr[i * self.key_size:(i + 1) * self.key_size],
                            vr[i * self.buf_size:(i + 1) * self.buf_size]))
            if done:
                return out
            ctypes.memmove(inb, outb, len(outb))
            first = False

    def items(self):
        """The batch read where this kernel has it (Linux 5.6+), else the slow path."""
        if getattr(self, "_batch_ok", True):
            try:
                return self.items_batch()
            except BpfError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, ENOTSUPP):
                    raise
                self._batch_ok = False
        return self.items_slow()

    def write_batch(self, cmd, keys, value=None, chunk=256):
        """BPF_MAP_UPDATE_BATCH every key to `value` (bytes of buf_size: all CPUs' for a
        per-CPU map), or BPF_MAP_DELETE_BATCH them: one syscall per `chunk` keys. Key by
        key where the kernel lacks the batch commands, or for the rest of a chunk the
        kernel stopped in (a key already gone: deleting it is done)."""
        for at in range(0, len(keys), chunk):
            part = keys[at:at + chunk]
            done = 0
            if getattr(self, "_write_batch_ok", True):
                kbuf = _buf(b"".join(part))
                vbuf = _buf(value * len(part)) if value is not None else None
                attr = _buf(ATTR_MAP_BATCH.pack(0, 0, _addr(kbuf), _addr(vbuf), len(part),
                                                self.fd, 0, 0))
                try:
                    bpf(cmd, attr, "BPF_MAP_UPDATE_BATCH" if value is not None
                        else "BPF_MAP_DELETE_BATCH")
                    continue
                except BpfError as e:
                    if e.errno in (errno.EINVAL, errno.ENOTSUP, ENOTSUPP):
                        self._write_batch_ok = False          # refused whole: nothing done
                    else:                                     # stopped at a key: the rest
                        done = U32.unpack_from(attr.raw, ATTR_MAP_BATCH_COUNT_OFF)[0]
            for key in part[done:]:
                try:
                    if value is None:
                        self.delete(key)
                    else:
                        self.update(key, value)
                except BpfError as e:
                    if e.errno != errno.ENOENT:
                        raise

    def sum_u64(self, value):
        """A per-CPU value (bytes) -> the u64 fields summed over CPUs."""
        n = self.value_size // 8
        fmt = struct.Struct(f"={n}Q")
        totals = [0] * n
        for c in range(self.ncpus):
            for i, v in enumerate(fmt.unpack_from(value, c * self.stride)):
                totals[i] += v
        return totals


class Program:
    """A loaded program: fd, the image it was loaded from, and its labels (for -d)."""

    def __init__(self, image, labels=None, name="lpd", prog_type=BPF_PROG_TYPE_SOCKET_FILTER,
                 license="GPL", log_level=0):
        self.image, self.labels = image, labels or {}
        self.fd = load_program(image, name, prog_type, license, log_level)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def info(self):
        buf = _buf(PROG_INFO_SIZE)
        attr = _buf(ATTR_INFO.pack(self.fd, PROG_INFO_SIZE, _addr(buf)))
        bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "BPF_OBJ_GET_INFO_BY_FD")
        raw = buf.raw
        return {"jited_len": U32.unpack_from(raw, PROG_INFO_JITED_LEN_OFF)[0],
                "verified_insns": U32.unpack_from(raw, PROG_INFO_VERIFIED_INSNS_OFF)[0],
                "xlated_len": U32.unpack_from(raw, PROG_INFO_XLATED_LEN_OFF)[0],
                "run_time_ns": U64.unpack_from(raw, PROG_INFO_RUN_TIME_OFF)[0],
                "run_cnt": U64.unpack_from(raw, PROG_INFO_RUN_CNT_OFF)[0]}


def load_program(image, name="lpd", prog_type=BPF_PROG_TYPE_SOCKET_FILTER, license="GPL",
                 log_level=0):
    """BPF_PROG_LOAD -> fd. Loads without a log first (a log costs the verifier time and
    a big buffer); on failure loads again with log_level 1 and raises BpfError with the
    verifier's log, whose last lines say why."""
    ibuf, lic = _buf(image), _buf(license.encode() + b"\0")
    for level in ((log_level,) if log_level else (0, LOG_LEVEL_BRANCHES)):
        log = _buf(LOG_SIZE) if level else None
        attr = _buf(ATTR_PROG_LOAD.pack(prog_type, len(image) // BPF_INSN_SIZE, _addr(ibuf), _addr(lic),
                                        level, LOG_SIZE if level else 0, _addr(log), 0, 0,
                                        name.encode()[:BPF_OBJ_NAME_LEN - 1]))
        r = _syscall(NR_BPF, BPF_PROG_LOAD, ctypes.addressof(attr), len(attr))
        if r >= 0:
            if log is not None and log.value and log_level:
                Program.last_log = log.value.decode(errors="replace")
            return r
        err = ctypes.get_errno()
        text = log.value.decode(errors="replace") if log is not None else ""
        if level:
            raise BpfError(err, "BPF_PROG_LOAD", _log_tail(text))
    raise AssertionError("unreachable")


def _log_tail(text, lines=40):
    """The part of a verifier log that tells why: its last lines."""
    t = text.rstrip("\n").split("\n")
    return "\n".join(t[-lines:]) if len(t) > lines else text


# BPF_PROG_TEST_RUN of a socket filter (net/bpf/test_run.c bpf_prog_test_run_skb): the skb
# is built from data_in by eth_type_trans() on the namespace's loopback device, which pulls
# the Ethernet header: unlike on an AF_PACKET socket, skb->data starts at the *network*
# header. lpd's programs expect the MAC header first, so test_run() prepends a dummy
# Ethernet header that eth_type_trans eats; its destination sets skb->pkt_type
# (broadcast 1, multicast 2, another host 3, lo's own 00:..:00 host 0; never OUTGOING).
TEST_RUN_ETHERTYPE = 0x88B5                          # IEEE local experimental: no IP set-up
TEST_RUN_DST = {PACKET_HOST: b"\0" * 6, PACKET_BROADCAST: b"\xff" * 6,
                PACKET_MULTICAST: b"\x01\x00\x5e\0\0\x01", PACKET_OTHERHOST: b"\x02\0\0\0\0\x01"}
TEST_RUN_SRC = b"\x02\0\0\0\0\x02"


# ctx_in: a struct __sk_buff whose few settable fields test_run copies into the skb
# (convert___skb_to_skb: mark, priority, ifindex, cb, tstamp, wire_len, gso_segs, gso_size,
# hwtstamp; everything else must be zero). Not pkt_type, not the VLAN fields.
SKB_CTX_SIZE = 192                                   # sizeof(struct __sk_buff) on 6.x


def test_run(prog_fd, frame, pkttype=PACKET_HOST, repeat=1, raw=False, gso=None):
    """(retval, duration ns) of one run on `frame` (as an AF_PACKET program sees it unless
    raw). gso: (gso_size, gso_segs) for the skb, through ctx_in."""
    data = frame if raw else TEST_RUN_DST[pkttype] + TEST_RUN_SRC + \
        TEST_RUN_ETHERTYPE.to_bytes(2, "big") + frame
    din, dout = _buf(data), _buf(len(data) + 256)
    cin = cout = None
    if gso:
        ctx = bytearray(SKB_CTX_SIZE)
        U32.pack_into(ctx, SKB_GSO_SIZE, gso[0])
        U32.pack_into(ctx, SKB_GSO_SEGS, gso[1])
        cin, cout = _buf(bytes(ctx)), _buf(SKB_CTX_SIZE)
    attr = _buf(ATTR_TEST_RUN.pack(prog_fd, 0, len(data), len(dout), _addr(din), _addr(dout),
                                   repeat, 0, SKB_CTX_SIZE if gso else 0, SKB_CTX_SIZE if gso else 0,
                                   _addr(cin), _addr(cout), 0, 0, 0))
    bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    raw_attr = attr.raw
    return U32.unpack(raw_attr[ATTR_TEST_RUN_RETVAL])[0], U32.unpack(raw_attr[ATTR_TEST_RUN_DURATION])[0]


def attach(sock, prog_fd):
    """SO_ATTACH_BPF: the program replaces the socket's filter (classic or eBPF) in one
    pointer swap (sk_attach_prog -> __sk_attach_prog: rcu_assign_pointer), so every frame
    runs exactly one of the old and the new program."""
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, struct.pack("=i", prog_fd))




###############################################################################
# 17.3 Programs: the decoder and the rules in eBPF ############################
# provides: ADDR_KEY, build_program, CopyPlan, emit_rule, FLOW_KEY, FLOW_MAP_MAX, FLOW_SUMS,
#   FLOW_VALUE, Gen, GENERATIONS, IFACE_FIELDS, make_maps, MAP_NAMES, NS_PER_S, overflow_slots,
#   OVERFLOW_VALUE, REMOTE_FIELDS, REMOTE_MAP_MIN, RULE_VALUE, Untranslatable

# -- the accounting program: the decoder's tests in eBPF ----------------------

# What the program keeps (userspace reads it at every tick: KernelAccounting.sync):
#   known0, known1:   PERCPU_HASH key ADDR_KEY (family 4|6, 3 pad, 16 address bytes; IPv4
#                     in the first 4, the rest zero) -> ADDR_VALUE, 4 x u64 (tx_bytes,
#                     tx_packets, rx_bytes, rx_packets): the addresses LocalAddresses
#                     tracks. Only userspace adds and removes keys; the program counts.
#   newcomers0, newcomers1: HASH, the same keys and values: a local address not in
#                     known, inserted by the program. Shared by the CPUs (atomic adds):
#                     an address stays at most one interval, and a flood fills it whole,
#                     which per CPU would cost the table's size times the CPUs.
#   overflow0, overflow1: PERCPU_ARRAY [overflow_slots(local_max)] -> OVERFLOW_VALUE
#                     (an ADDR_KEY padded to 8 bytes, a weight in bytes): the addresses
#                     that found no room in newcomers, one per slot by a keyed hash of
#                     the address, the heaviest holding its slot (Boyer-Moore's majority
#                     vote, by bytes): userspace lets them in at the next tick
#   generation:       ARRAY [1] -> u32: which set (known, newcomers, overflow) the
#                     program counts in
#   iface:            PERCPU_ARRAY [1] -> IFACE_FIELDS x u64; an address that finds no
#                     room in newcomers counts in its unattributed_{bytes,packets}
#   rules:            PERCPU_ARRAY [n] -> (bytes, packets) per rule
#   flows:            PERCPU_HASH key FLOW_KEY (family, IP protocol, 2 pad, source and
#                     destination address as ADDR_KEY holds them, source and destination
#                     port as the wire has them) -> FLOW_VALUE (packets, IP bytes, wire
#                     bytes, payload bytes, the last frame's CLOCK_MONOTONIC ns): one
#                     direction of a UDP conversation that --connections handed to the
#                     kernel (FlowOffload). Only userspace adds and removes keys; a frame
#                     the program counts there is not copied for connection tracking.
# Per-CPU values need no atomic instruction: a socket program runs with bottom halves
# off (packet_rcv from the rx softirq, dev_queue_xmit_nit under rcu_read_lock_bh), so
# nothing else runs it on the same CPU meanwhile.
ADDR_KEY = struct.Struct("=B3x16s")
ADDR_VALUE = struct.Struct("=4Q")
REMOTE_FIELDS = ("remote_tx_bytes", "remote_tx_packets", "remote_rx_bytes", "remote_rx_packets")
IFACE_FIELDS = ("tx_bytes", "tx_packets", "rx_bytes", "rx_packets") + \
    tuple("malformed_" + r for r in MALFORMED_REASONS) + \
    ("unattributed_bytes", "unattributed_packets", "gso_frames", "gso_unsplit") + \
    REMOTE_FIELDS + ("remote_unfitted_bytes",)
IFACE = {name: 8 * i for i, name in enumerate(IFACE_FIELDS)}
MALFORMED_OFF = {r: IFACE["malformed_" + r] for r in MALFORMED_REASONS}
RULE_VALUE = struct.Struct("=2Q")
FLOW_KEY = struct.Struct("=BB2x16s16s2s2s")
FLOW_VALUE = struct.Struct("=5Q")
HELLO_VALUE = struct.Struct("=Q")              # the hellos map's: where a hello's record ends (seq)
FLOW_SUMS = 4                                  # the value's fields that add up (the last one is a time)
NS_PER_S = 1_000_000_000                       # the kernel's clocks count ns
FLOW_PKTS, FLOW_IP_BYTES, FLOW_WIRE_BYTES, FLOW_PAYLOAD, FLOW_LAST = range(0, FLOW_VALUE.size, 8)
FLOW_SRC_OFF, FLOW_DST_OFF, FLOW_PORTS_OFF = 4, 20, 36
# Directions of UDP conversations counted in the kernel at most: the map is read whole
# at every tick (BPF_MAP_LOOKUP_BATCH), which bounds that read; a direction that finds
# no room stays with userspace, counted as exactly, at the classic path's cost.
FLOW_MAP_MAX = 16384
ADDR_TX, ADDR_RX = 0, 16                      # value offsets: tx (source) and rx (destination)
GENERATIONS = 2
ADDRESS_MAPS = tuple(f"{table}{gen}" for table in ("known", "newcomers")
                     for gen in range(GENERATIONS))
OVERFLOW_MAPS = tuple(f"overflow{gen}" for gen in range(GENERATIONS))
# The kernel's remotes map holds an interval's distinct remotes: --remote-max of them,
# and at least this many, so that a small table's bounds stay those of the classic path
# unless an interval brings more remotes than this (preallocated: ~100 bytes an entry).
REMOTE_MAP_MIN = 4096
MAP_NAMES = ("generation", "iface", "rules") + ADDRESS_MAPS + OVERFLOW_MAPS
# An overflow slot: the address as the stack holds it (an ADDR_KEY in whole u64 words,
# the padding zero), then its weight.
OVERFLOW_KEY_SIZE = _round8(ADDR_KEY.size)
OVERFLOW_VALUE = struct.Struct(f"={OVERFLOW_KEY_SIZE}sQ")
OVERFLOW_WEIGHT = OVERFLOW_KEY_SIZE            # the weight's offset
# The sample's multiplier where nothing draws one (tests, -d): odd, the golden ratio's
# (Knuth's multiplicative hashing).
SAMPLE_HASH = 0x9E3779B1
U32_BITS = 32


OVERFLOW_MIN_BITS = 4                          # 16 slots, whatever the table's size


def overflow_slots(local_max):
    """Slots of the overflow sample: a power of two (the hash's top bits), about the room
    one eviction makes (the most a tick lets in from it)."""
    room = max(1, local_max // LOCAL_EVICT_FRACTION)
    return 1 << max(OVERFLOW_MIN_BITS, (room - 1).bit_length())


# Registers, for the whole program. The classic translation keeps the kernel converter's
# A = r0, X = r7, CTX = r6 (r0 is also what helpers return, which is why a packet load's
# slow path, a helper call, is free for A and costs a spill for X's loads).
REG_A, REG_X, REG_CTX = R0, R7, R6
REG_VLEN = R8                                  # bytes of the view (below) that hold frame data
REG_WL = R9                                    # the frame's wire length, lpd's definition
REG_IFACE = R7                                 # the decoder's iface counters (X is dead then)

# The stack (r10-relative). M[] where the kernel's converter puts it (-(4k + 4)); the view
# of the frame's head is what every load of the program reads.
# M[k] at -(4k + 4), k < 16: the 64 bytes below the frame pointer
KEY_SRC, KEY_DST = -88, -112                   # ADDR_KEY for the source and the destination
VALUE_NEW = -144                               # an ADDR_VALUE for a new entry
TMP = -152                                     # a map index; a slow load's bytes
A_SAVE = -160                                  # A across a helper call (ldx msh)
VERDICTS = -168                                # test builds: bit i = rule i matched (the retval)
CNT_BYTES, CNT_FRAMES = -176, -184             # what this frame counts for: (wl, 1), or a
                                               # GSO super-frame's (bytes, frames) on the wire
COPY = -192                                    # how much of the frame userspace gets (CopyPlan)
REMOTE_KEY = -224                              # ADDR_KEY of the frame's remote end (--remote)
VIEW_DATA = SNAPLEN_ACCOUNTING             # what lpd's userspace decoder sees of a frame
VIEW_BYTES = VIEW_DATA + VLAN_TAG_LEN      # ... plus a stripped tag put back in
VIEW = -(224 + _round8(VIEW_BYTES))            # view[i] at VIEW + i
FLOW_AT = VIEW - FLOW_KEY.size                 # FLOW_KEY of the frame (UDP, with --connections)
FLOW_IP_LEN, FLOW_PAYLOAD_LEN = FLOW_AT - 8, FLOW_AT - 16   # what it counts for there
HELLO_SEQ = FLOW_IP_LEN                        # a TCP frame's sequence number (hellos map)
STACK_DEPTH = -FLOW_PAYLOAD_LEN
assert STACK_DEPTH <= EBPF_STACK_MAX

# The view: the first VIEW_BYTES of the frame as lpd's userspace sees it, i.e. with a VLAN
# tag the kernel stripped into skb->vlan_tci put back after the MAC addresses (libpcap
# does the same), so the decoder and every rule read the bytes userspace would. It is
# copied to the stack once per frame with bpf_skb_load_bytes (socket programs have no
# direct packet access), because:
#   - LD_ABS/LD_IND end the *whole program* (returning 0) on a load past the end: one
#     rule's miss would skip the others and the accounting; a helper returns an error;
#   - the stack wants aligned multi-byte accesses ("misaligned stack access"), so the
#     view is read byte by byte and assembled big-endian, which is what the frame's
#     network byte order wants anyway;
#   - a frame longer than the view is read past it with one skb_load_bytes per load
#     (rules only: the decoder, like userspace, sees VIEW_DATA bytes).


class Gen:
    """Collects instructions and hands out unique labels."""

    def __init__(self):
        self.items = []
        self.n = 0

    def label(self, hint):
        self.n += 1
        return Label(f"{hint}_{self.n}")

    def __call__(self, *insns):
        self.items.extend(insns)

    def at(self, label):
        self.items.append(label)


def emit_view_load_be(g, dst, ptr, off, size, tmp):
    """dst = big-endian `size`-byte value at ptr + off, by byte loads (the stack wants
    aligned multi-byte accesses; the view is at any offset)."""
    g(ldx(EBPF_B, dst, ptr, off))
    for i in range(1, size):
        g(alu64_imm(EBPF_LSH, dst, 8), ldx(EBPF_B, tmp, ptr, off + i), alu64_reg(EBPF_OR, dst, tmp))


def emit_view_header(g, size, short):
    """r4 = the view at offset r2 (a header's start), if `size` bytes from there on are
    inside the view and the frame (userspace: q + size > end), else to `short`. The
    first, constant bound is the verifier's: the second implies it (r8 <= VIEW_BYTES).
    Uses r3."""
    g(jmp_imm(EBPF_JGT, R2, VIEW_BYTES - size, short),
      mov64_reg(R3, R2), alu64_imm(EBPF_ADD, R3, size), jmp_reg(EBPF_JGT, R3, REG_VLEN, short),
      mov64_reg(R4, FP), alu64_imm(EBPF_ADD, R4, VIEW), alu64_reg(EBPF_ADD, R4, R2))


def emit_tag_walk(g, short, cut=None):
    """The userspace decoder's walk over the VLAN tags, on the view: r1 = the ethertype
    after them, r2 = q (the offset of what follows it). A view shorter than an Ethernet
    header goes to `short`; a tag cut short to `cut`, or with None ends the walk there
    (r1 the tag's TPID, r2 its offset). Uses r3, r4."""
    walk, tag, walked = g.label("walk"), g.label("tag"), g.label("walked")
    g(jmp_imm(EBPF_JLT, REG_VLEN, ETH_HLEN, short))
    emit_view_load_be(g, R1, FP, VIEW + ETH_TYPE_OFF, 2, R3)
    g(mov64_imm(R2, ETH_HLEN))
    g.at(walk)
    for tpid in sorted(VLAN_TPIDS):
        g(jmp_imm(EBPF_JEQ, R1, tpid, tag))
    g(ja(walked))
    g.at(tag)
    emit_view_header(g, VLAN_TAG_LEN, walked if cut is None else cut)
    emit_view_load_be(g, R1, R4, 2, 2, R3)
    g(alu64_imm(EBPF_ADD, R2, VLAN_TAG_LEN), ja(walk))
    g.at(walked)


def emit_prologue(g):
    """r6 = ctx, r9 = wire length, the view on the stack, r8 = its length."""
    g(mov64_reg(REG_CTX, R1),
      ldx(EBPF_W, REG_WL, REG_CTX, SKB_LEN),
      ldx(EBPF_W, R1, REG_CTX, SKB_VLAN_PRESENT))
    untagged, short, done = g.label("untagged"), g.label("short_view"), g.label("viewed")
    g(jmp_imm(EBPF_JEQ, R1, 0, untagged, wide=False),
      # Tagged: [0, 12) from the frame, the tag, then the frame from its byte 12 on.
      alu64_imm(EBPF_ADD, REG_WL, VLAN_TAG_LEN),
      mov64_reg(REG_VLEN, REG_WL))
    clamp = g.label("clamp")
    g(jmp_imm(EBPF_JLE, REG_VLEN, VIEW_BYTES, clamp), mov64_imm(REG_VLEN, VIEW_BYTES))
    g.at(clamp)
    g(mov64_reg(R1, REG_CTX), mov64_imm(R2, 0), mov64_reg(R3, FP), alu64_imm(EBPF_ADD, R3, VIEW),
      mov64_imm(R4, ETH_TYPE_OFF), call("skb_load_bytes"),
      jmp_imm(EBPF_JNE, R0, 0, short),
      # __sk_buff.vlan_proto holds skb->vlan_proto as it is, network order: stored as a
      # host u16 it lands as the two wire bytes. vlan_tci is host order: swapped first.
      ldx(EBPF_W, R1, REG_CTX, SKB_VLAN_PROTO), stx(EBPF_H, FP, R1, VIEW + ETH_TYPE_OFF),
      ldx(EBPF_W, R1, REG_CTX, SKB_VLAN_TCI), endian_be(R1, 16),
      stx(EBPF_H, FP, R1, VIEW + ETH_TYPE_OFF + 2),
      jmp_imm(EBPF_JLE, REG_VLEN, ETH_TYPE_OFF + VLAN_TAG_LEN, short),
      mov64_reg(R4, REG_VLEN), alu64_imm(EBPF_SUB, R4, ETH_TYPE_OFF + VLAN_TAG_LEN),
      mov64_reg(R1, REG_CTX), mov64_imm(R2, ETH_TYPE_OFF), mov64_reg(R3, FP),
      alu64_imm(EBPF_ADD, R3, VIEW + ETH_TYPE_OFF + VLAN_TAG_LEN),
      call("skb_load_bytes"), ja(done))
    g.at(untagged)
    clamp = g.label("clamp")
    g(mov64_reg(REG_VLEN, REG_WL),
      jmp_imm(EBPF_JLE, REG_VLEN, VIEW_DATA, clamp), mov64_imm(REG_VLEN, VIEW_DATA))
    g.at(clamp)
    g(jmp_imm(EBPF_JEQ, REG_VLEN, 0, short),
      mov64_reg(R1, REG_CTX), mov64_imm(R2, 0), mov64_reg(R3, FP), alu64_imm(EBPF_ADD, R3, VIEW),
      mov64_reg(R4, REG_VLEN), call("skb_load_bytes"), ja(done))
    # A frame too short for the view's loads (never on Ethernet, but the verifier asks):
    # zeros, so that every path leaves all of the view initialised.
    g.at(short)
    for off in range(0, _round8(VIEW_BYTES), 8):
        g(st_imm(EBPF_DW, FP, VIEW + off, 0))
    g.at(done)


def emit_normalise(g):
    """Reload r8 and r9 from the skb: past a join the verifier then sees the same (unknown,
    bounded) values on every path and prunes, instead of re-verifying everything after
    the join once per distinct range the paths before it left in these registers."""
    g(ldx(EBPF_W, REG_WL, REG_CTX, SKB_LEN), ldx(EBPF_W, R1, REG_CTX, SKB_VLAN_PRESENT),
      alu64_imm(EBPF_AND, R1, 1), alu64_imm(EBPF_LSH, R1, 2), alu64_reg(EBPF_ADD, REG_WL, R1),
      mov64_reg(REG_VLEN, REG_WL), alu64_imm(EBPF_ADD, R1, VIEW_DATA))
    ok = g.label("vlen")
    g(jmp_reg(EBPF_JLE, REG_VLEN, R1, ok), mov64_reg(REG_VLEN, R1))
    g.at(ok)


def emit_count(g, ptr, off):
    """*(u64 *)(ptr + off) += bytes; *(u64 *)(ptr + off + 8) += frames (this CPU's value),
    the frame's counts (CNT_BYTES, CNT_FRAMES: see emit_gso)."""
    g(ldx(EBPF_DW, R1, ptr, off), ldx(EBPF_DW, R2, FP, CNT_BYTES), alu64_reg(EBPF_ADD, R1, R2),
      stx(EBPF_DW, ptr, R1, off),
      ldx(EBPF_DW, R1, ptr, off + 8), ldx(EBPF_DW, R2, FP, CNT_FRAMES), alu64_reg(EBPF_ADD, R1, R2),
      stx(EBPF_DW, ptr, R1, off + 8))


def emit_count_shared(g, ptr, off):
    """emit_count for a value every CPU writes (a newcomer): atomic adds."""
    g(ldx(EBPF_DW, R1, FP, CNT_BYTES), atomic_add(EBPF_DW, ptr, R1, off),
      ldx(EBPF_DW, R1, FP, CNT_FRAMES), atomic_add(EBPF_DW, ptr, R1, off + 8))


def emit_bump(g, ptr, off):
    g(ldx(EBPF_DW, R1, ptr, off), alu64_imm(EBPF_ADD, R1, 1), stx(EBPF_DW, ptr, R1, off))


def emit_gso(g, gso_above, iface_fd):
    """CNT_BYTES/CNT_FRAMES for this frame: (wl, 1), or for a GSO/GRO super-frame what the
    wire carried, as lpd's gso_split computes it from the virtio_net_hdr: each frame on
    the wire repeats the link + IP + transport headers (hdr) and carries gso_size bytes of
    the payload, so frames = ceil((wl - hdr) / gso_size), bytes = wl + (frames - 1) * hdr.

    A socket program cannot read gso_type (not in __sk_buff), only gso_size and gso_segs:
    the kind is taken from the IP header (TCP: TCPV4/TCPV6; UDP: UDP_L4, repeating the
    UDP header; UFO, which does not, is gone from Linux since 4.14 but for VM taps).
    gso_above: userspace reads the virtio_net_hdr only for frames longer than this
    (Decoder.set_link: MTU + Ethernet + 2 tags; a shorter super-frame counts as one), and
    the same bound keeps the numbers equal; None: no split (lpd without PACKET_VNET_HDR).
    Uses (and at the end leaves to the iface counters) r1-r5, r0 and REG_IFACE."""
    g(stx(EBPF_DW, FP, REG_WL, CNT_BYTES), st_imm(EBPF_DW, FP, CNT_FRAMES, 1))
    if gso_above is None:
        return
    done, unsplit, bump = g.label("gso_done"), g.label("gso_unsplit"), g.label("gso_bump")
    ip4, ip6, l3ok, tcp, l4ok = (g.label("gso_" + n) for n in ("ip4", "ip6", "l3", "tcp", "l4"))
    g(ldx(EBPF_W, R1, REG_CTX, SKB_GSO_SIZE), jmp_imm(EBPF_JEQ, R1, 0, done),
      ldx(EBPF_W, R1, REG_CTX, SKB_LEN), jmp_imm(EBPF_JLE, R1, gso_above, done))
    # as the decoder's walk, but a tag cut short ends the walk
    emit_tag_walk(g, unsplit)
    # r5 = wire_ip (what the frame holds from the IP header on), r1 = l3, r3 = protocol
    g(mov64_reg(R5, REG_WL), alu64_reg(EBPF_SUB, R5, R2),
      jmp_imm(EBPF_JEQ, R1, ETHERTYPE_IPV4, ip4), jmp_imm(EBPF_JEQ, R1, ETHERTYPE_IPV6, ip6),
      ja(unsplit))
    g.at(ip4)
    emit_view_header(g, 20, unsplit)
    g(ldx(EBPF_B, R1, R4, 0), mov64_reg(R3, R1), alu64_imm(EBPF_RSH, R3, 4),
      jmp_imm(EBPF_JNE, R3, 4, unsplit), alu64_imm(EBPF_AND, R1, 0x0F), alu64_imm(EBPF_LSH, R1, 2),
      jmp_imm(EBPF_JLT, R1, 20, unsplit))
    emit_view_load_be(g, R3, R4, 2, 2, R0)
    g(jmp_reg(EBPF_JLT, R3, R1, unsplit), jmp_reg(EBPF_JGT, R3, R5, unsplit),
      ldx(EBPF_B, R3, R4, IPV4_PROTO_OFF), ja(l3ok))
    g.at(ip6)
    emit_view_header(g, IPV6_HDR_LEN, unsplit)
    g(ldx(EBPF_B, R1, R4, 0), alu64_imm(EBPF_RSH, R1, 4), jmp_imm(EBPF_JNE, R1, 6, unsplit))
    emit_view_load_be(g, R3, R4, 4, 2, R0)
    g(alu64_imm(EBPF_ADD, R3, IPV6_HDR_LEN), jmp_reg(EBPF_JGT, R3, R5, unsplit),
      ldx(EBPF_B, R3, R4, IPV6_NEXT_OFF), mov64_imm(R1, IPV6_HDR_LEN))
    g.at(l3ok)
    # r2 = q + l3 (the transport header); r1 = its length
    g(alu64_reg(EBPF_ADD, R2, R1), jmp_imm(EBPF_JEQ, R3, IPPROTO_TCP, tcp),
      jmp_imm(EBPF_JNE, R3, IPPROTO_UDP, unsplit), mov64_imm(R1, UDP_HDR_LEN), ja(l4ok))
    g.at(tcp)
    # userspace: len(data) > q + l3 + 12, else cut before the TCP header: not split
    g(jmp_imm(EBPF_JGT, R2, VIEW_BYTES - TCP_DOFF_OFF - 1, unsplit),
      mov64_reg(R3, R2), alu64_imm(EBPF_ADD, R3, TCP_DOFF_OFF), jmp_reg(EBPF_JGE, R3, REG_VLEN, unsplit),
      mov64_reg(R4, FP), alu64_imm(EBPF_ADD, R4, VIEW), alu64_reg(EBPF_ADD, R4, R2),
      ldx(EBPF_B, R1, R4, TCP_DOFF_OFF), alu64_imm(EBPF_RSH, R1, 4), alu64_imm(EBPF_LSH, R1, 2),
      jmp_imm(EBPF_JLT, R1, TCP_MIN_HDR_LEN, unsplit))
    g.at(l4ok)
    # r2 = hdr, r3 = payload, r4 = gso_size, r3 = frames
    g(alu64_reg(EBPF_ADD, R2, R1), mov64_reg(R3, REG_WL), alu64_reg(EBPF_SUB, R3, R2),
      jmp_imm(EBPF_JSLE, R3, 0, unsplit),
      ldx(EBPF_W, R4, REG_CTX, SKB_GSO_SIZE), alu64_reg(EBPF_ADD, R3, R4), alu64_imm(EBPF_SUB, R3, 1),
      alu64_reg(EBPF_DIV, R3, R4), jmp_imm(EBPF_JGT, R3, GSO_MAX_SEGS, unsplit),
      stx(EBPF_DW, FP, R3, CNT_FRAMES), alu64_imm(EBPF_SUB, R3, 1), alu64_reg(EBPF_MUL, R3, R2),
      alu64_reg(EBPF_ADD, R3, REG_WL), stx(EBPF_DW, FP, R3, CNT_BYTES),
      mov64_imm(R1, IFACE["gso_frames"]), ja(bump))
    g.at(unsplit)
    g(mov64_imm(R1, IFACE["gso_unsplit"]))
    g.at(bump)
    # iface[r1] += 1 (r1: the field's offset, kept on the stack across the lookup)
    g(stx(EBPF_DW, FP, R1, A_SAVE), st_imm(EBPF_W, FP, TMP, 0), ld_map_fd(R1, iface_fd),
      mov64_reg(R2, FP), alu64_imm(EBPF_ADD, R2, TMP), call("map_lookup_elem"),
      jmp_imm(EBPF_JEQ, R0, 0, done), ldx(EBPF_DW, R1, FP, A_SAVE), alu64_reg(EBPF_ADD, R0, R1))
    emit_bump(g, R0, 0)
    g.at(done)


def _prefix_words(net):
    """An IPv4/IPv6 network as [(word index, mask, value)] over its big-endian u32 words,
    only the words its prefix covers."""
    nwords = net.max_prefixlen // 32
    value, plen = int(net.network_address), net.prefixlen
    out = []
    for i in range(nwords):
        bits = max(0, min(32, plen - 32 * i))
        if bits:
            mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
            word = (value >> (32 * (nwords - 1 - i))) & 0xFFFFFFFF
            out.append((i, mask, word & mask))
    return out


def emit_address(g, hdr, off, nwords, key, nets):
    """Copy the address at hdr + off (nwords big-endian u32) into key's address and set
    key's family byte to the version if it is inside one of `nets`, else to 0.

    Word i of the address is kept in WORD_REGS[i] while the prefixes are tested: each
    prefix is a few compares of a masked word (3 instructions per word)."""
    regs = (R1, R2, R3, R5)[:nwords]
    for i, r in enumerate(regs):
        emit_view_load_be(g, r, hdr, off + 4 * i, 4, R0)
    yes, done = g.label("local"), g.label("addr_done")
    for net in nets:
        nxt = g.label("next_net")
        for i, mask, word in _prefix_words(net):
            if mask == 0xFFFFFFFF:
                g(jmp_imm(EBPF_JNE, regs[i], _s32(word), nxt, wide=False))
            else:
                g(mov64_reg(R0, regs[i]), alu32_imm(EBPF_AND, R0, _s32(mask)),
                  jmp_imm(EBPF_JNE, R0, _s32(word), nxt, wide=False))
        g(ja(yes))
        g.at(nxt)
    g(st_imm(EBPF_B, FP, key, 0), ja(done))
    g.at(yes)
    g(st_imm(EBPF_B, FP, key, 4 if nwords == 1 else 6))
    g.at(done)
    for i, r in enumerate(regs):
        g(endian_be(r, 32), stx(EBPF_W, FP, r, key + 4 + 4 * i))


def emit_addresses(g, src_off, nwords, nets):
    """KEY_SRC and KEY_DST from the IP header at view offset r2, whose source address
    (nwords u32) is at src_off and the destination right after it (emit_address)."""
    for key in (KEY_SRC, KEY_DST):
        for off in range(0, _round8(ADDR_KEY.size), 8):
            g(st_imm(EBPF_DW, FP, key + off, 0))
    g(mov64_reg(R4, FP), alu64_imm(EBPF_ADD, R4, VIEW), alu64_reg(EBPF_ADD, R4, R2))
    # r4 (the header) survives emit_address: it uses r0-r3, r5.
    emit_address(g, R4, src_off, nwords, KEY_SRC, nets)
    emit_address(g, R4, src_off + 4 * nwords, nwords, KEY_DST, nets)


def emit_overflow_sample(g, overflow, key, sample_hash, done):
    """The address in `key` found no room: its bytes to its slot of this CPU's overflow
    sample. Slot: the top bits of (the address's u32 words xored) * sample_hash, an odd
    multiplier drawn at start (multiply-shift hashing: which addresses share a slot is
    not known outside). Boyer-Moore's majority vote weighted by bytes: the holder gains
    its own bytes and loses everyone else's, and whoever brings more than it has left
    takes the slot, so an address with more than half of a slot's bytes holds it."""
    other, weaken = g.label("sample_other"), g.label("sample_weaken")
    bits = overflow.max_entries.bit_length() - 1
    g(ldx(EBPF_W, R1, FP, key + 4))
    for word in range(1, 4):
        g(ldx(EBPF_W, R2, FP, key + 4 + 4 * word), alu64_reg(EBPF_XOR, R1, R2))
    g(alu32_imm(EBPF_MUL, R1, _s32(sample_hash)), alu32_imm(EBPF_RSH, R1, U32_BITS - bits),
      stx(EBPF_W, FP, R1, TMP), ld_map_fd(R1, overflow.fd), mov64_reg(R2, FP),
      alu64_imm(EBPF_ADD, R2, TMP), call("map_lookup_elem"), jmp_imm(EBPF_JEQ, R0, 0, done))
    for off in range(0, OVERFLOW_KEY_SIZE, 8):
        g(ldx(EBPF_DW, R1, R0, off), ldx(EBPF_DW, R2, FP, key + off),
          jmp_reg(EBPF_JNE, R1, R2, other))
    g(ldx(EBPF_DW, R1, R0, OVERFLOW_WEIGHT), ldx(EBPF_DW, R2, FP, CNT_BYTES),
      alu64_reg(EBPF_ADD, R1, R2), stx(EBPF_DW, R0, R1, OVERFLOW_WEIGHT), ja(done))
    g.at(other)
    g(ldx(EBPF_DW, R1, R0, OVERFLOW_WEIGHT), ldx(EBPF_DW, R2, FP, CNT_BYTES),
      jmp_reg(EBPF_JGT, R1, R2, weaken),
      alu64_reg(EBPF_SUB, R2, R1), stx(EBPF_DW, R0, R2, OVERFLOW_WEIGHT))
    for off in range(0, OVERFLOW_KEY_SIZE, 8):
        g(ldx(EBPF_DW, R1, FP, key + off), stx(EBPF_DW, R0, R1, off))
    g(ja(done))
    g.at(weaken)
    g(alu64_reg(EBPF_SUB, R1, R2), stx(EBPF_DW, R0, R1, OVERFLOW_WEIGHT))


def emit_find_or_insert(g, fd, key, slot, counted, full):
    """The frame's counts (CNT_BYTES, CNT_FRAMES) to the half at `slot` of the entry the
    key at FP + key has in the hash map fd, which every CPU writes (atomic adds): found,
    or inserted with BPF_NOEXIST, or found after another CPU inserted it meanwhile; then
    on to `counted`, or to `full` where the map has no room for it."""
    shared = g.label("fi_shared")
    g(ld_map_fd(R1, fd), mov64_reg(R2, FP), alu64_imm(EBPF_ADD, R2, key),
      call("map_lookup_elem"), jmp_imm(EBPF_JNE, R0, 0, shared))
    for off in range(0, ADDR_VALUE.size, 8):
        g(st_imm(EBPF_DW, FP, VALUE_NEW + off, 0))
    g(ldx(EBPF_DW, R1, FP, CNT_BYTES), stx(EBPF_DW, FP, R1, VALUE_NEW + slot),
      ldx(EBPF_DW, R1, FP, CNT_FRAMES), stx(EBPF_DW, FP, R1, VALUE_NEW + slot + 8),
      ld_map_fd(R1, fd), mov64_reg(R2, FP), alu64_imm(EBPF_ADD, R2, key),
      mov64_reg(R3, FP), alu64_imm(EBPF_ADD, R3, VALUE_NEW), mov64_imm(R4, BPF_NOEXIST),
      call("map_update_elem"), jmp_imm(EBPF_JEQ, R0, 0, counted),
      jmp_imm(EBPF_JNE, R0, EEXIST_NEG, full),
      ld_map_fd(R1, fd), mov64_reg(R2, FP), alu64_imm(EBPF_ADD, R2, key),
      call("map_lookup_elem"), jmp_imm(EBPF_JEQ, R0, 0, full))
    g.at(shared)
    emit_count_shared(g, R0, slot)
    g(ja(counted))


def emit_attribute(g, known_fd, newcomers_fd, overflow, sample_hash, key, slot):
    """The frame's counts (CNT_BYTES, CNT_FRAMES) to the tx or rx half of the address in
    `key`, if its family byte says it is local: in known if it is there, else in
    newcomers (emit_find_or_insert); where newcomers is full, in iface's
    unattributed_{bytes,packets} and the overflow sample."""
    skip, newcomer, unattributed = (g.label("attr_" + n) for n in ("skip", "new", "unattributed"))
    g(ldx(EBPF_B, R1, FP, key), jmp_imm(EBPF_JEQ, R1, 0, skip),
      ld_map_fd(R1, known_fd), mov64_reg(R2, FP), alu64_imm(EBPF_ADD, R2, key),
      call("map_lookup_elem"), jmp_imm(EBPF_JEQ, R0, 0, newcomer))
    emit_count(g, R0, slot)
    g(ja(skip))
    g.at(newcomer)
    emit_find_or_insert(g, newcomers_fd, key, slot, skip, unattributed)
    g.at(unattributed)
    emit_count(g, REG_IFACE, IFACE["unattributed_bytes"])
    emit_overflow_sample(g, overflow, key, sample_hash, skip)
    g.at(skip)


def emit_remote(g, remotes_fd):
    """--remote: a frame with exactly one local end counts for the other, a remote, in
    iface's remote_{tx,rx} totals (exact) and in `remotes` (emit_find_or_insert); where
    remotes is full, in the totals only. tx: the local end sent (the remote is the
    destination). The remote's key takes the family byte of the local end (the same
    frame, the same family)."""
    skip, unfitted, src_remote = g.label("rem_skip"), g.label("rem_unfitted"), g.label("rem_src")
    g(ldx(EBPF_B, R1, FP, KEY_SRC), ldx(EBPF_B, R2, FP, KEY_DST),
      jmp_imm(EBPF_JEQ, R1, 0, src_remote), jmp_imm(EBPF_JNE, R2, 0, skip))
    for remote, family, slot, field in ((KEY_DST, R1, ADDR_TX, "remote_tx_bytes"),
                                        (KEY_SRC, R2, ADDR_RX, "remote_rx_bytes")):
        if remote == KEY_SRC:
            g.at(src_remote)
            g(jmp_imm(EBPF_JEQ, R2, 0, skip))
        for off in range(0, _round8(ADDR_KEY.size), 8):
            g(ldx(EBPF_DW, R3, FP, remote + off), stx(EBPF_DW, FP, R3, REMOTE_KEY + off))
        g(stx(EBPF_B, FP, family, REMOTE_KEY))
        emit_count(g, REG_IFACE, IFACE[field])
        emit_find_or_insert(g, remotes_fd, REMOTE_KEY, slot, skip, unfitted)  # full: totals only
    g.at(unfitted)
    g(ldx(EBPF_DW, R1, REG_IFACE, IFACE["remote_unfitted_bytes"]), ldx(EBPF_DW, R2, FP, CNT_BYTES),
      alu64_reg(EBPF_ADD, R1, R2), stx(EBPF_DW, REG_IFACE, R1, IFACE["remote_unfitted_bytes"]))
    g.at(skip)


def emit_attribution(g, maps, sample_hash, done):
    """Both ends of the frame (KEY_SRC, KEY_DST) into the generation userspace selected:
    read once, so a frame counts in one pair of tables whatever a flip does meanwhile.
    Each generation gets its own copy of the code, so each lookup names one map (the
    verifier inlines a lookup only when every path to it passes the same map)."""
    gens = [g.label(f"generation{gen}") for gen in range(GENERATIONS)]
    g(st_imm(EBPF_W, FP, TMP, 0), ld_map_fd(R1, maps["generation"].fd), mov64_reg(R2, FP),
      alu64_imm(EBPF_ADD, R2, TMP), call("map_lookup_elem"), jmp_imm(EBPF_JEQ, R0, 0, gens[0]),
      ldx(EBPF_W, R1, R0, 0))
    for gen in range(1, GENERATIONS):
        g(jmp_imm(EBPF_JEQ, R1, gen, gens[gen]))
    for gen, label in enumerate(gens):
        g.at(label)
        for key, slot in ((KEY_SRC, ADDR_TX), (KEY_DST, ADDR_RX)):
            emit_attribute(g, maps[f"known{gen}"].fd, maps[f"newcomers{gen}"].fd,
                           maps[f"overflow{gen}"], sample_hash, key, slot)
        if f"remotes{gen}" in maps:
            emit_remote(g, maps[f"remotes{gen}"].fd)
        g(ja(done))


def emit_decoder(g, maps, nets, sample_hash, done):
    """lpd's Decoder.process_block for one frame: interface totals by packet type, then
    the Ethernet/VLAN/IP headers, malformed reasons, and the local addresses' counters.
    Mirrors the userspace hot loop's general path, test for test (see the spec)."""
    nets4 = [n for n in nets if n.version == 4]
    nets6 = [n for n in nets if n.version == 6]
    g(st_imm(EBPF_W, FP, TMP, 0), ld_map_fd(R1, maps["iface"].fd), mov64_reg(R2, FP),
      alu64_imm(EBPF_ADD, R2, TMP), call("map_lookup_elem"), jmp_imm(EBPF_JEQ, R0, 0, done),
      mov64_reg(REG_IFACE, R0),
      ldx(EBPF_W, R1, REG_CTX, SKB_PKT_TYPE))
    tx, decode = g.label("tx"), g.label("decode")
    g(jmp_imm(EBPF_JEQ, R1, PACKET_OUTGOING, tx, wide=False))
    emit_count(g, REG_IFACE, IFACE["rx_bytes"])
    g(ja(decode))
    g.at(tx)
    emit_count(g, REG_IFACE, IFACE["tx_bytes"])
    g.at(decode)
    bad = {r: g.label("m_" + r) for r in MALFORMED_REASONS}
    ip4, ip6, attribute = g.label("ip4"), g.label("ip6"), g.label("attribute")
    # r1 = ethertype, r2 = q, both kept until the IP header; a tag cut short: truncated
    emit_tag_walk(g, bad["truncated"], bad["truncated"])
    g(jmp_imm(EBPF_JEQ, R1, ETHERTYPE_IPV4, ip4), jmp_imm(EBPF_JEQ, R1, ETHERTYPE_IPV6, ip6),
      ja(done))                                      # not IP: counted in the totals only
    # IPv4: header inside the view; version; IHL >= 5; IHL*4 <= total length; the total
    # length inside the wire length (q + tlen > wl -> 'length', as userspace's
    # q - p + tlen > flen with the stripped tag counted on both sides).
    g.at(ip4)
    emit_view_header(g, 20, bad["truncated"])
    g(ldx(EBPF_B, R1, R4, 0), mov64_reg(R3, R1), alu64_imm(EBPF_RSH, R3, 4),
      jmp_imm(EBPF_JNE, R3, 4, bad["version"]),
      alu64_imm(EBPF_AND, R1, 0x0F), jmp_imm(EBPF_JLT, R1, 5, bad["ihl"]), alu64_imm(EBPF_LSH, R1, 2))
    emit_view_load_be(g, R3, R4, 2, 2, R5)
    g(jmp_reg(EBPF_JLT, R3, R1, bad["length"]), alu64_reg(EBPF_ADD, R3, R2),
      jmp_reg(EBPF_JGT, R3, REG_WL, bad["length"]))
    emit_addresses(g, IPV4_SRC_OFF, 1, nets4)
    g(ja(attribute))
    # IPv6: the fixed header inside the view; version; 40 + payload length inside the wire
    # length. No extension header is walked (userspace does not either).
    g.at(ip6)
    emit_view_header(g, IPV6_HDR_LEN, bad["truncated"])
    g(ldx(EBPF_B, R1, R4, 0), alu64_imm(EBPF_RSH, R1, 4), jmp_imm(EBPF_JNE, R1, 6, bad["version"]))
    emit_view_load_be(g, R3, R4, 4, 2, R5)
    g(alu64_imm(EBPF_ADD, R3, IPV6_HDR_LEN), alu64_reg(EBPF_ADD, R3, R2),
      jmp_reg(EBPF_JGT, R3, REG_WL, bad["length"]))
    emit_addresses(g, IPV6_SRC_OFF, 4, nets6)
    g.at(attribute)
    emit_attribution(g, maps, sample_hash, done)
    for reason, label in bad.items():
        g.at(label)
        emit_bump(g, REG_IFACE, MALFORMED_OFF[reason])
        g(ja(done))


# -- classic BPF -> eBPF, one rule inlined after another ----------------------

# bpf_convert_filter (net/core/filter.c) maps A to r0, X to r7, M[k] to the stack at
# -(4k + 4), classic ALU to 32-bit eBPF ALU, jumps to jumps (jf == 0: one jump; jt == 0:
# the inverted jump; else a jump and a ja), RET to exit. What differs here, and why:
#   - RET does not exit: the rule's verdict jumps to its counting (nonzero) or past it,
#     and the next rule starts with A = X = 0 and the M[] cells it reads zeroed (lpd's
#     interpreter starts M at 0; the kernel's checker forbids reading an unwritten cell);
#   - packet loads read the view (see above) and, past it, bpf_skb_load_bytes; a load past
#     the frame is the rule's reject, not the program's return 0 as the kernel's LD_ABS;
#   - lpd's semantics where libpcap's and the kernel's differ: a shift by X >= 32 gives 0
#     (x86 would shift by X & 31), division by X == 0 rejects (eBPF would give 0);
#     ancillary loads are lpd's (pkttype, vlan_tci, vlan present, protocol as
#     eth_type_trans would derive it from the frame with the tag put back); others reject;
#   - compares use JMP32 with the 32-bit k (the kernel instead moves a k >= 2^31 into a
#     register, from before JMP32 existed);
#   - backward ja (libpcap's protochain) is refused: Untranslatable, the rule stays in
#     userspace.

class Untranslatable(ValueError):
    pass


_JMP_INVERSE = {BPF_JEQ: EBPF_JNE, BPF_JGT: EBPF_JLE, BPF_JGE: EBPF_JLT}
_JMP_OP = {BPF_JEQ: EBPF_JEQ, BPF_JGT: EBPF_JGT, BPF_JGE: EBPF_JGE, BPF_JSET: EBPF_JSET}
# Classic ALU ops that map to the eBPF op of the same number, 32-bit.
_ALU_PLAIN = {BPF_ADD, BPF_SUB, BPF_MUL, BPF_OR, BPF_AND, BPF_XOR}
_LOAD_SIZE = {BPF_W: 4, BPF_H: 2, BPF_B: 1}
_EBPF_SIZE = {4: EBPF_W, 2: EBPF_H, 1: EBPF_B}
FRAME_MAX = (1 << 31) - 1          # no frame is longer: a load beyond is a static reject


def emit_slow_load(g, dst, off_reg, size, reject, save_a):
    """dst = the `size` bytes at view offset off_reg (beyond the view) by skb_load_bytes:
    reject unless off + size <= wl; the frame's offset is off - (wl - skb->len), the tag
    put back (offsets that far are past it). Clobbers r1-r5 and r0 (A: spilled if save_a)."""
    g(mov64_reg(R2, off_reg), alu64_imm(EBPF_ADD, R2, size), jmp_reg(EBPF_JGT, R2, REG_WL, reject),
      ldx(EBPF_W, R3, REG_CTX, SKB_LEN), mov64_reg(R2, off_reg), alu64_reg(EBPF_ADD, R2, R3),
      alu64_reg(EBPF_SUB, R2, REG_WL))
    if save_a:
        g(stx(EBPF_DW, FP, REG_A, A_SAVE))
    g(mov64_reg(R1, REG_CTX), mov64_reg(R3, FP), alu64_imm(EBPF_ADD, R3, TMP), mov64_imm(R4, size),
      call("skb_load_bytes"))
    if save_a:
        g(mov64_reg(R1, R0), ldx(EBPF_DW, REG_A, FP, A_SAVE))
        g(jmp_imm(EBPF_JNE, R1, 0, reject))
    else:
        g(jmp_imm(EBPF_JNE, R0, 0, reject))
    g(ldx(_EBPF_SIZE[size], dst, FP, TMP))
    if size > 1:
        g(endian_be(dst, 8 * size))


def emit_packet_load(g, dst, size, k, indirect, reject, save_a=False):
    """dst = the big-endian `size` bytes at k (or X + k) of the frame as userspace sees it,
    or jump to reject when they are past its end (lpd's _load_packet)."""
    if k + size > FRAME_MAX:
        g(ja(reject))
        return
    slow, done = g.label("slow"), g.label("loaded")
    if not indirect:
        if k + size <= VIEW_DATA:
            # r8 = min(wl, VIEW_DATA + tag) < k + size <= VIEW_DATA: the frame is shorter.
            g(jmp_imm(EBPF_JLT, REG_VLEN, k + size, reject))
            emit_view_load_be(g, dst, FP, VIEW + k, size, R1)
            return
        if k + size <= VIEW_BYTES:
            g(jmp_imm(EBPF_JLT, REG_VLEN, k + size, slow))
            emit_view_load_be(g, dst, FP, VIEW + k, size, R1)
            g(ja(done))
        g.at(slow)
        g(mov64_imm(R5, k))
        emit_slow_load(g, dst, R5, size, reject, save_a)
        g.at(done)
        return
    # X + k in 64 bits: X is a zero-extended u32 and k < 2^31, so it cannot wrap.
    g(mov64_reg(R5, REG_X), alu64_imm(EBPF_ADD, R5, k),
      jmp_imm(EBPF_JGT, R5, VIEW_BYTES - size, slow),        # the verifier's bound
      mov64_reg(R2, R5), alu64_imm(EBPF_ADD, R2, size), jmp_reg(EBPF_JGT, R2, REG_VLEN, slow),
      mov64_reg(R3, FP), alu64_imm(EBPF_ADD, R3, VIEW), alu64_reg(EBPF_ADD, R3, R5))
    emit_view_load_be(g, dst, R3, 0, size, R4)
    g(ja(done))
    g.at(slow)
    emit_slow_load(g, dst, R5, size, reject, save_a)
    g.at(done)


def emit_raw_load(g, dst, size, k, indirect, reject, save_a=False):
    """emit_packet_load for -F's kernel program: the `size` bytes at k (or X + k) of the
    skb's data as the kernel's classic filter reads them (an outer tag the kernel
    stripped is not in it), by skb_load_bytes; past its end, reject (the classic
    filter's load past the end returns 0: the frame is dropped)."""
    if k + size > FRAME_MAX:
        g(ja(reject))
        return
    g(mov64_imm(R5, k) if not indirect else mov64_reg(R5, REG_X))
    if indirect:                   # X + k in 64 bits: X is a zero-extended u32, k < 2^31
        g(alu64_imm(EBPF_ADD, R5, k))
    g(mov64_reg(R2, R5), alu64_imm(EBPF_ADD, R2, size), ldx(EBPF_W, R3, REG_CTX, SKB_LEN),
      jmp_reg(EBPF_JGT, R2, R3, reject))
    if save_a:
        g(stx(EBPF_DW, FP, REG_A, A_SAVE))
    g(mov64_reg(R1, REG_CTX), mov64_reg(R2, R5), mov64_reg(R3, FP), alu64_imm(EBPF_ADD, R3, TMP),
      mov64_imm(R4, size), call("skb_load_bytes"))
    if save_a:
        g(mov64_reg(R1, R0), ldx(EBPF_DW, REG_A, FP, A_SAVE), jmp_imm(EBPF_JNE, R1, 0, reject))
    else:
        g(jmp_imm(EBPF_JNE, R0, 0, reject))
    g(ldx(_EBPF_SIZE[size], dst, FP, TMP))
    if size > 1:
        g(endian_be(dst, 8 * size))


def emit_raw_ancillary(g, dst, k, reject):
    """emit_ancillary for -F's kernel program: skb->protocol as the kernel has it (read,
    not derived from the view: the kernel's classic filter reads the field)."""
    if k - SKF_AD_OFF == SKF_AD_PROTOCOL:
        g(ldx(EBPF_W, dst, REG_CTX, SKB_PROTOCOL), endian_be(dst, 16))
    else:
        emit_ancillary(g, dst, k, reject)


def emit_protocol(g, dst):
    """lpd's _skb_protocol: what eth_type_trans() leaves in skb->protocol, from the view."""
    done = g.label("proto_done")
    g(mov32_imm(dst, 0), jmp_imm(EBPF_JLT, REG_VLEN, ETH_HLEN, done))
    emit_view_load_be(g, dst, FP, VIEW + ETH_TYPE_OFF, 2, R1)
    g(jmp_imm(EBPF_JGE, dst, 0x0600, done), mov32_imm(dst, 0x0004),      # ETH_P_802_2
      jmp_imm(EBPF_JLT, REG_VLEN, 16, done))
    emit_view_load_be(g, R1, FP, VIEW + ETH_HLEN, 2, R2)
    g(jmp_imm(EBPF_JNE, R1, 0xFFFF, done), mov32_imm(dst, 0x0001))      # ETH_P_802_3
    g.at(done)


def emit_ancillary(g, dst, k, reject):
    off = k - SKF_AD_OFF
    if off == SKF_AD_PKTTYPE:
        g(ldx(EBPF_W, dst, REG_CTX, SKB_PKT_TYPE), alu32_imm(EBPF_AND, dst, _PKT_TYPE_MAX))
    elif off == SKF_AD_VLAN_TAG:
        g(ldx(EBPF_W, dst, REG_CTX, SKB_VLAN_TCI), alu32_imm(EBPF_AND, dst, 0xFFFF))
    elif off == SKF_AD_VLAN_TAG_PRESENT:
        g(ldx(EBPF_W, dst, REG_CTX, SKB_VLAN_PRESENT), alu32_imm(EBPF_AND, dst, 1))
    elif off == SKF_AD_PROTOCOL:
        emit_protocol(g, dst)
    else:
        g(ja(reject))


def _reads_memory(prog):
    return sorted({k for code, _, _, k in prog
                   if code in (BPF_LD | BPF_MEM, BPF_LDX | BPF_W | BPF_MEM)
                   and k < BPF_MEMWORDS})


def emit_rule(g, prog, index, rules_fd, mark=False, gate=None):
    """One rule: its classic program translated; a nonzero verdict adds (wl, 1) to
    rules[index] (and with `mark` sets bit index of VERDICTS, for the differential test).
    Labels are per rule, so rules follow each other in one program.
    gate: a label; then `prog` is -F's kernel program (compile_filter kernel=True), run
    on the frame as the kernel's classic filter would (emit_raw_load), and a frame it
    rejects jumps to gate, one it accepts goes on."""
    n = len(prog)
    pcs = [g.label(f"r{index}_pc{pc}") for pc in range(n)]
    no, yes, end = g.label(f"r{index}_no"), g.label(f"r{index}_yes"), g.label(f"r{index}_end")
    raw = gate is not None
    if raw:
        no = gate
    a, x = REG_A, REG_X
    if raw:
        def emit_packet_load(g, dst, size, k, indirect, reject, save_a=False):
            emit_raw_load(g, dst, size, k, indirect, reject, save_a)

        def emit_ancillary(g, dst, k, reject):
            emit_raw_ancillary(g, dst, k, reject)
    else:
        emit_packet_load, emit_ancillary = globals()["emit_packet_load"], globals()["emit_ancillary"]
    length = (lambda dst: ldx(EBPF_W, dst, REG_CTX, SKB_LEN)) if raw else \
        (lambda dst: mov32_reg(dst, REG_WL))

    def target(pc):
        return pcs[pc] if 0 <= pc < n else no     # out of the program: lpd rejects

    g(mov32_imm(a, 0), mov32_imm(x, 0))
    for k in _reads_memory(prog):
        g(st_imm(EBPF_W, FP, -(4 * k + 4), 0))
    for pc, (code, jt, jf, k) in enumerate(prog):
        g.at(pcs[pc])
        cls, mode, size = code & 0x07, code & BPF_MODE_MASK, code & BPF_SIZE_MASK
        op = code & BPF_OP_MASK
        if code > 0xFF:
            g(ja(no))
        elif cls == BPF_RET:
            if code == BPF_RET | BPF_K:
                g(ja(yes if k else no))
            elif code == BPF_RET | BPF_A:
                g(jmp_imm(EBPF_JEQ, a, 0, no, wide=False), ja(yes))
            else:
                g(ja(no))
        elif cls == BPF_LD:
            if mode == BPF_ABS and size in _LOAD_SIZE:
                if k >= SKF_AD_OFF:
                    emit_ancillary(g, a, k, no)
                else:
                    emit_packet_load(g, a, _LOAD_SIZE[size], k, False, no)
            elif mode == BPF_IND and size in _LOAD_SIZE:
                emit_packet_load(g, a, _LOAD_SIZE[size], k, True, no)
            elif code == BPF_LD | BPF_IMM:
                g(mov32_imm(a, k))
            elif code == BPF_LD | BPF_W | BPF_LEN:
                g(length(a))
            elif code == BPF_LD | BPF_MEM and k < BPF_MEMWORDS:
                g(ldx(EBPF_W, a, FP, -(4 * k + 4)))
            else:
                g(ja(no))
        elif cls == BPF_LDX:
            if code == BPF_LDX | BPF_W | BPF_IMM:
                g(mov32_imm(x, k))
            elif code == BPF_LDX | BPF_W | BPF_LEN:
                g(length(x))
            elif code == BPF_LDX | BPF_W | BPF_MEM and k < BPF_MEMWORDS:
                g(ldx(EBPF_W, x, FP, -(4 * k + 4)))
            elif code == BPF_LDX | BPF_B | BPF_MSH:
                # X = 4 * (P[k] & 0xf); A is spilled around the slow path's helper call.
                emit_packet_load(g, x, 1, k, False, no, save_a=True)
                g(alu32_imm(EBPF_AND, x, 0x0F), alu32_imm(EBPF_LSH, x, 2))
            else:
                g(ja(no))
        elif cls in (BPF_ST, BPF_STX):
            if code & ~BPF_CLASS_MASK or k >= BPF_MEMWORDS:
                g(ja(no))
            else:
                g(stx(EBPF_W, FP, a if cls == BPF_ST else x, -(4 * k + 4)))
        elif cls == BPF_ALU:
            by_x = code & BPF_X
            if code == BPF_ALU | BPF_NEG:
                g(alu32_imm(EBPF_NEG, a, 0))
            elif op in _ALU_PLAIN:
                g(alu32_reg(op, a, x) if by_x else alu32_imm(op, a, _s32(k)))
            elif op in (BPF_DIV, BPF_MOD):
                if by_x:
                    g(jmp_imm(EBPF_JEQ, x, 0, no, wide=False), alu32_reg(op, a, x))
                elif k == 0:
                    g(ja(no))
                else:
                    g(alu32_imm(op, a, _s32(k)))
            elif op in (BPF_LSH, BPF_RSH):
                if by_x:
                    big, done = g.label("shift_big"), g.label("shifted")
                    g(jmp_imm(EBPF_JGE, x, 32, big, wide=False), alu32_reg(op, a, x), ja(done))
                    g.at(big)
                    g(mov32_imm(a, 0))
                    g.at(done)
                elif k >= 32:
                    g(mov32_imm(a, 0))
                else:
                    g(alu32_imm(op, a, k))
            else:
                g(ja(no))
        elif cls == BPF_JMP:
            if code == BPF_JMP | BPF_JA:
                off = _s32(k)
                if off < 0:
                    raise Untranslatable(f"backward ja at {pc} (protochain)")
                g(ja(target(pc + 1 + off)))
            elif op in _JMP_OP:
                by_x = code & BPF_X
                t, f = target(pc + 1 + jt), target(pc + 1 + jf)

                def j(eop, label):
                    return jmp_reg(eop, a, x, label, wide=False) if by_x else \
                        jmp_imm(eop, a, _s32(k), label, wide=False)
                if jf == 0:
                    g(j(_JMP_OP[op], t))
                elif jt == 0 and op in _JMP_INVERSE:
                    g(j(_JMP_INVERSE[op], f))
                else:
                    g(j(_JMP_OP[op], t), ja(f))
            else:
                g(ja(no))
        elif code == BPF_MISC | BPF_TAX:
            g(mov32_reg(x, a))
        elif code == BPF_MISC | BPF_TXA:
            g(mov32_reg(a, x))
        else:
            g(ja(no))
    g(ja(no))                                       # falling off the end: lpd rejects
    g.at(yes)
    if raw:
        return
    if mark:
        g(ldx(EBPF_W, R1, FP, VERDICTS), alu32_imm(EBPF_OR, R1, 1 << index), stx(EBPF_W, FP, R1, VERDICTS))
    g(st_imm(EBPF_W, FP, TMP, index), ld_map_fd(R1, rules_fd), mov64_reg(R2, FP),
      alu64_imm(EBPF_ADD, R2, TMP), call("map_lookup_elem"), jmp_imm(EBPF_JEQ, R0, 0, end))
    emit_count(g, R0, 0)
    g.at(no)
    g.at(end)


def make_maps(nrules, local_max=DEFAULT_LOCAL_MAX, remote_max=0, flow_max=0, hellos=False):
    """The program's maps (see above). known holds what LocalAddresses holds, at most
    local_max; newcomers takes as many, the most a tick can admit to the table.
    flow_max: room in flows (0: no flows map, no connection tracking).
    hellos: the TLS hellos whose later segments are copied whole (CopyPlan.handshakes)."""
    maps = {"generation": Map(BPF_MAP_TYPE_ARRAY, 4, 4, 1, "lpd_generation"),
            "iface": Map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8 * len(IFACE_FIELDS), 1, "lpd_iface"),
            "rules": Map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, RULE_VALUE.size, max(1, nrules), "lpd_rules")}
    for gen in range(GENERATIONS):
        maps[f"known{gen}"] = Map(BPF_MAP_TYPE_PERCPU_HASH, ADDR_KEY.size, ADDR_VALUE.size,
                                  local_max, f"lpd_known{gen}")
        maps[f"newcomers{gen}"] = Map(BPF_MAP_TYPE_HASH, ADDR_KEY.size, ADDR_VALUE.size,
                                      local_max, f"lpd_newcomers{gen}")
        maps[f"overflow{gen}"] = Map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, OVERFLOW_VALUE.size,
                                     overflow_slots(local_max), f"lpd_overflow{gen}")
        if remote_max:
            # Shared, as newcomers: a remote stays one interval, and a flood fills it whole
            maps[f"remotes{gen}"] = Map(BPF_MAP_TYPE_HASH, ADDR_KEY.size, ADDR_VALUE.size,
                                        remote_max, f"lpd_remotes{gen}")
    if flow_max:
        maps["flows"] = Map(BPF_MAP_TYPE_PERCPU_HASH, FLOW_KEY.size, FLOW_VALUE.size, flow_max,
                            "lpd_flows")
    if hellos:
        # LRU: a hello whose segments never all come leaves when newer ones need room
        maps["hellos"] = Map(BPF_MAP_TYPE_LRU_HASH, FLOW_KEY.size, HELLO_VALUE.size,
                             TLS_HELLOS_MAX, "lpd_hellos")
    return maps


VERDICT_MASK = "mask"


class CopyPlan(NamedTuple):
    """What the userspace stages read of each frame under --engine ebpf, so that the
    program copies each frame only as far as some stage reads it (the classic path's
    kernel_program does the same per branch): `every` bytes of every frame (--remote,
    until remote addresses are counted in the kernel), `l4` bytes of every IPv4 and
    IPv6 frame (connection tracking parses them all: its flows are every IP packet's),
    TCP to or from `ports` whole (--http), UDP to or from `udp_ports` whole (--names),
    with `handshakes` any TCP segment whose payload begins a TLS handshake record
    (TLS_HANDSHAKE_START: --names reads ClientHellos on every port) whole.
    A frame the view is too short to judge (stacked tags, a header cut short) gets the
    most any stage reads, as judge_guard gives it on the classic path: no stage misses
    a frame it would have read."""
    every: int = 0
    l4: int = 0
    ports: tuple = ()
    udp_ports: tuple = ()
    handshakes: bool = False

    def constant(self):
        """The copy length if every frame gets the same, else None."""
        return None if self.l4 or self.wholes() else self.every

    def wholes(self):
        """Whether some frames come whole."""
        return bool(self.ports or self.udp_ports or self.handshakes)

    def l4_len(self):
        return max(self.every, self.l4)

    def most(self):
        return SNAPLEN_FULL if self.wholes() else self.l4_len()

    def ports_of(self, proto):
        """The ports whose frames of this transport protocol come whole."""
        return self.ports if proto == IPPROTO_TCP else self.udp_ports if proto == IPPROTO_UDP else ()


def copy_length(plan, view, hellos=None):
    """What the program's copy decision (emit_copy_length) returns for a frame whose
    view (its first VIEW_DATA bytes as userspace sees them, a stripped tag put back) is
    `view`: its reference, for tests. hellos: a dict standing for the hellos map (the
    frames of one run in order: a hello's record running past its segment makes its
    direction's segments up to the record's end come whole)."""
    n, u16 = len(view), U16BE.unpack_from
    if n < ETH_HLEN:
        return plan.most()
    q, et = ETH_HLEN, u16(view, ETH_TYPE_OFF)[0]
    while et in VLAN_TPIDS:
        if q + VLAN_TAG_LEN > n:
            return plan.most()
        et = u16(view, q + 2)[0]
        q += VLAN_TAG_LEN
    if et == ETHERTYPE_IPV4:
        if q + 20 > n:
            return plan.most()
        proto = view[q + IPV4_PROTO_OFF]
        ports, hs = plan.ports_of(proto), plan.handshakes and proto == IPPROTO_TCP
        if not (ports or hs) or u16(view, q + 6)[0] & IPV4_FRAG_MASK:
            return plan.l4_len()
        at = q + (view[q] & 0x0F) * 4
        l4_len = u16(view, q + 2)[0] - (at - q)
    elif et == ETHERTYPE_IPV6:
        if q + IPV6_HDR_LEN > n:
            return plan.most()
        nh = view[q + IPV6_NEXT_OFF]
        if plan.wholes() and nh in IPV6_EXT_LEN:
            return SNAPLEN_FULL
        ports, hs = plan.ports_of(nh), plan.handshakes and nh == IPPROTO_TCP
        if not (ports or hs):
            return plan.l4_len()
        at, l4_len = q + IPV6_HDR_LEN, u16(view, q + 4)[0]
    else:
        return plan.every
    if at + 4 > n:
        return plan.most()
    sport, dport = L4_PORTS.unpack_from(view, at)
    if sport in ports or dport in ports:
        return SNAPLEN_FULL
    if not hs:
        return plan.l4_len()
    # a TLS handshake record's first bytes (the IP length says whether the payload has them)
    if at + TCP_DOFF_OFF + 1 > n:
        return plan.most()
    hlen = (view[at + TCP_DOFF_OFF] >> 4) * 4
    if l4_len - hlen < len(TLS_HANDSHAKE_START):
        return plan.l4_len()
    p = at + hlen
    if p + len(TLS_HANDSHAKE_START) > n:
        return plan.most()
    if hellos is None:
        return SNAPLEN_FULL if view[p:p + len(TLS_HANDSHAKE_START)] == TLS_HANDSHAKE_START \
            else plan.l4_len()
    # the key as emit_hello_key builds it: by the IP header's version field
    version = view[q] >> 4
    src, size = (IPV4_SRC_OFF, 4) if version == 4 else (IPV6_SRC_OFF, 16)
    key = None if q + (20 if version == 4 else IPV6_HDR_LEN) > n else \
        (version == 4, bytes(view[q + src:q + src + 2 * size]), sport, dport)
    seq = int.from_bytes(view[at + TCP_SEQ_OFF:at + TCP_SEQ_OFF + 4], "big")
    if view[p:p + len(TLS_HANDSHAKE_START)] == TLS_HANDSHAKE_START:
        if p + TLS_RECORD.size <= n and key is not None:
            end = u16(view, p + TLS_RECORD_LEN_OFF)[0] + TLS_RECORD.size
            if end > l4_len - hlen:
                hellos[key] = (seq + end) % SEQ_MOD
        return SNAPLEN_FULL
    return SNAPLEN_FULL if key in hellos and (seq - hellos[key]) % SEQ_MOD >= SEQ_HALF \
        else plan.l4_len()


def emit_copy_length(g, plan, flows_fd=None, hellos_fd=None):
    """COPY := copy_length(plan, the view), test for test the same walk (tags, the IP
    header's protocol, a TCP header's ports) on the view; uses r0-r5 and r7.
    flows_fd: the flows map; a UDP frame whose direction it holds is counted there and
    copied as far as `every` (emit_flow). hellos_fd: the hellos map (plan.handshakes):
    copy_length's `hellos`."""
    undecided, every, l4, whole, decided = (g.label(n) for n in
                                            ("c_most", "c_every", "c_l4", "c_whole", "c_done"))
    udp4 = udp6 = l4
    if flows_fd is not None:
        udp4, udp6 = g.label("c_udp4"), g.label("c_udp6")
    # UDP to or from udp_ports: judged first, whole; any other UDP goes on as before
    # (to the flows map or `l4`), r2 and r4 as the walk left them
    udp4_in, udp6_in = (g.label("c_udp4_ports"), g.label("c_udp6_ports")) if plan.udp_ports \
        else (udp4, udp6)
    ip4, ip6, ports = g.label("c_ip4"), g.label("c_ip6"), g.label("c_ports")
    emit_tag_walk(g, undecided, undecided)
    g(jmp_imm(EBPF_JEQ, R1, ETHERTYPE_IPV4, ip4), jmp_imm(EBPF_JEQ, R1, ETHERTYPE_IPV6, ip6),
      ja(every))
    g.at(ip4)
    emit_view_header(g, 20, undecided)
    g(ldx(EBPF_B, R1, R4, IPV4_PROTO_OFF))
    tcp_whole = plan.ports or plan.handshakes
    if tcp_whole:
        # r0 := the IP payload's length (the TCP segment's), for the handshake test
        tcp4 = g.label("c_tcp4")
        g(jmp_imm(EBPF_JEQ, R1, IPPROTO_TCP, tcp4), jmp_imm(EBPF_JEQ, R1, IPPROTO_UDP, udp4_in), ja(l4))
        g.at(tcp4)
        emit_view_load_be(g, R3, R4, 6, 2, R5)
        g(alu64_imm(EBPF_AND, R3, IPV4_FRAG_MASK), jmp_imm(EBPF_JNE, R3, 0, l4))
        emit_view_load_be(g, R0, R4, 2, 2, R5)
        g(ldx(EBPF_B, R3, R4, 0), alu64_imm(EBPF_AND, R3, 0x0F), alu64_imm(EBPF_LSH, R3, 2),
          mov64_reg(R7, R2), alu64_reg(EBPF_SUB, R0, R3), alu64_reg(EBPF_ADD, R2, R3), ja(ports))
    else:
        g(jmp_imm(EBPF_JEQ, R1, IPPROTO_UDP, udp4_in), ja(l4))
    g.at(ip6)
    emit_view_header(g, IPV6_HDR_LEN, undecided)
    g(ldx(EBPF_B, R1, R4, IPV6_NEXT_OFF))
    for nh in sorted(IPV6_EXT_LEN):
        g(jmp_imm(EBPF_JEQ, R1, nh, whole if plan.wholes() else l4))
    if tcp_whole:
        g(jmp_imm(EBPF_JEQ, R1, IPPROTO_UDP, udp6_in), jmp_imm(EBPF_JNE, R1, IPPROTO_TCP, l4))
        emit_view_load_be(g, R0, R4, 4, 2, R5)
        g(mov64_reg(R7, R2), alu64_imm(EBPF_ADD, R2, IPV6_HDR_LEN))
        g.at(ports)
        emit_view_header(g, 4, undecided)      # the TCP ports
        emit_view_load_be(g, R1, R4, 0, 2, R5)
        emit_view_load_be(g, R3, R4, 2, 2, R5)
        for port in plan.ports:
            g(jmp_imm(EBPF_JEQ, R1, port, whole), jmp_imm(EBPF_JEQ, R3, port, whole))
        if plan.handshakes:
            emit_handshake_test(g, undecided, l4, whole, hellos_fd)
        else:
            g(ja(l4))
    else:
        g(jmp_imm(EBPF_JEQ, R1, IPPROTO_UDP, udp6_in), ja(l4))
    if plan.udp_ports:
        g.at(udp4_in)
        emit_view_load_be(g, R3, R4, 6, 2, R5)
        g(alu64_imm(EBPF_AND, R3, IPV4_FRAG_MASK), jmp_imm(EBPF_JNE, R3, 0, udp4),
          ldx(EBPF_B, R3, R4, 0), alu64_imm(EBPF_AND, R3, 0x0F), alu64_imm(EBPF_LSH, R3, 2))
        emit_udp_ports(g, plan.udp_ports, R3, 20, udp4, undecided, whole)
        g.at(udp6_in)
        g(mov64_imm(R3, IPV6_HDR_LEN))
        emit_udp_ports(g, plan.udp_ports, R3, IPV6_HDR_LEN, udp6, undecided, whole)
    if flows_fd is not None:
        emit_flow(g, flows_fd, udp4, udp6, l4, every)
    for label, value in ((undecided, plan.most()), (every, plan.every), (l4, plan.l4_len()),
                         (whole, SNAPLEN_FULL)):
        g.at(label)
        g(st_imm(EBPF_W, FP, COPY, value), ja(decided))
    g.at(decided)


def emit_handshake_test(g, short, other, whole, hellos_fd=None):
    """r7 = the IP header's offset in the view, r2 = the TCP header's, r0 = the
    segment's length (IP's say): to `whole` if its payload begins TLS_HANDSHAKE_START,
    or (hellos_fd) continues a hello the hellos map holds; to `other` if neither or if
    it has fewer bytes than that; to `short` if the view ends before them (copy_length's
    test). The length is signed: an IP length shorter than the headers is no payload."""
    emit_view_header(g, TCP_DOFF_OFF + 1, short)
    if hellos_fd is not None:
        # the direction's key (addresses later: emit_hello_key) and its sequence number
        for off in range(0, FLOW_KEY.size, 8):
            g(st_imm(EBPF_DW, FP, FLOW_AT + off, 0))
        g(st_imm(EBPF_B, FP, FLOW_AT + 1, IPPROTO_TCP))
        emit_flow_key_bytes(g, R4, 0, FLOW_AT + FLOW_PORTS_OFF, 4)
        emit_view_load_be(g, R1, R4, TCP_SEQ_OFF, 4, R5)
        g(stx(EBPF_DW, FP, R1, HELLO_SEQ))
    g(ldx(EBPF_B, R3, R4, TCP_DOFF_OFF), alu64_imm(EBPF_RSH, R3, 4), alu64_imm(EBPF_LSH, R3, 2),
      alu64_reg(EBPF_SUB, R0, R3), jmp_imm(EBPF_JSLT, R0, len(TLS_HANDSHAKE_START), other),
      alu64_reg(EBPF_ADD, R2, R3))
    emit_view_header(g, len(TLS_HANDSHAKE_START), short)
    later = g.label("h_later") if hellos_fd is not None else other
    for i, byte in enumerate(TLS_HANDSHAKE_START):
        g(ldx(EBPF_B, R1, R4, i), jmp_imm(EBPF_JNE, R1, byte, later))
    if hellos_fd is None:
        g(ja(whole))
        return
    # A record running past this segment: its direction's later segments, up to the
    # record's end, come whole too (the map's value: that end's sequence number)
    emit_view_header(g, TLS_RECORD.size, whole)
    emit_view_load_be(g, R1, R4, TLS_RECORD_LEN_OFF, 2, R5)
    g(alu64_imm(EBPF_ADD, R1, TLS_RECORD.size), jmp_reg(EBPF_JLE, R1, R0, whole),
      ldx(EBPF_DW, R3, FP, HELLO_SEQ), alu64_reg(EBPF_ADD, R3, R1), mov32_reg(R3, R3),
      stx(EBPF_DW, FP, R3, HELLO_SEQ))
    emit_hello_key(g, whole)
    g(ld_map_fd(R1, hellos_fd), mov64_reg(R2, FP), alu64_imm(EBPF_ADD, R2, FLOW_AT),
      mov64_reg(R3, FP), alu64_imm(EBPF_ADD, R3, HELLO_SEQ), mov64_imm(R4, BPF_ANY),
      call("map_update_elem"), ja(whole))
    # Any other segment with a payload: whole while it begins before the end of a hello
    # its direction started (sequence space: signed 32-bit difference)
    g.at(later)
    emit_hello_key(g, other)
    g(ld_map_fd(R1, hellos_fd), mov64_reg(R2, FP), alu64_imm(EBPF_ADD, R2, FLOW_AT),
      call("map_lookup_elem"), jmp_imm(EBPF_JEQ, R0, 0, other),
      ldx(EBPF_W, R1, R0, 0), ldx(EBPF_DW, R3, FP, HELLO_SEQ), alu64_reg(EBPF_SUB, R3, R1),
      alu64_imm(EBPF_LSH, R3, 32), alu64_imm(EBPF_ARSH, R3, 32),
      jmp_imm(EBPF_JSLT, R3, 0, whole), ja(other))


def emit_hello_key(g, short):
    """The addresses of the FLOW_KEY at FLOW_AT (its ports and protocol are there),
    from the IP header at r7 in the view; to `short` if the view does not hold it."""
    v6 = g.label("hk_v6")
    done = g.label("hk_done")
    g(mov64_reg(R2, R7))
    emit_view_header(g, 20, short)
    g(ldx(EBPF_B, R1, R4, 0), alu64_imm(EBPF_RSH, R1, 4), jmp_imm(EBPF_JNE, R1, 4, v6),
      st_imm(EBPF_B, FP, FLOW_AT, 4))
    emit_flow_key_bytes(g, R4, IPV4_SRC_OFF, FLOW_AT + FLOW_SRC_OFF, 4)
    emit_flow_key_bytes(g, R4, IPV4_SRC_OFF + 4, FLOW_AT + FLOW_DST_OFF, 4)
    g(ja(done))
    g.at(v6)
    emit_view_header(g, IPV6_HDR_LEN, short)
    g(st_imm(EBPF_B, FP, FLOW_AT, 6))
    emit_flow_key_bytes(g, R4, IPV6_SRC_OFF, FLOW_AT + FLOW_SRC_OFF, 16)
    emit_flow_key_bytes(g, R4, IPV6_SRC_OFF + 16, FLOW_AT + FLOW_DST_OFF, 16)
    g.at(done)


def emit_udp_ports(g, ports, hlen, ip_len, other, short, whole):
    """r2 = q, r4 = the view at the IP header (ip_len bytes of it there), hlen (a
    register) the IP header's length: to `whole` if the UDP header's ports hold one of
    `ports`, to `short` if the view ends before them, else to `other` with r2 and r4 as
    they came. r0 keeps q meanwhile (nothing before emit_flow holds anything in it)."""
    g(mov64_reg(R0, R2), alu64_reg(EBPF_ADD, R2, hlen))
    emit_view_header(g, 4, short)
    emit_view_load_be(g, R1, R4, 0, 2, R5)
    emit_view_load_be(g, R3, R4, 2, 2, R5)
    for port in ports:
        g(jmp_imm(EBPF_JEQ, R1, port, whole), jmp_imm(EBPF_JEQ, R3, port, whole))
    g(mov64_reg(R2, R0))
    emit_view_header(g, ip_len, short)               # passed before: r4 back at the IP header
    g(ja(other))


def emit_flow_key_bytes(g, src, src_off, dst_off, n):
    """n bytes from src + src_off to the stack at dst_off, byte by byte (the view is at
    any offset, the stack wants aligned wider stores)."""
    for i in range(n):
        g(ldx(EBPF_B, R5, src, src_off + i), stx(EBPF_B, FP, R5, dst_off + i))


def emit_flow(g, flows_fd, udp4, udp6, copy, counted):
    """At udp4/udp6 (r2 = q, r4 = the view at the IP header, which the walk found to hold
    a whole IPv4 or IPv6 header): a UDP frame parse_l4 would take whole, as one frame on
    the wire, whose direction the flows map holds, counts there and goes to `counted`;
    any other goes to `copy`, to be tracked in userspace. The tests are parse_l4's, so
    the kernel counts a frame only where userspace would have counted the same: the IP
    length within the frame, no fragment, no IPv6 extension header (the walk sends
    those elsewhere), the UDP header inside the view."""
    key = g.label("f_key")
    g.at(udp4)
    g(ldx(EBPF_DW, R1, FP, CNT_FRAMES), jmp_imm(EBPF_JNE, R1, 1, copy),
      ldx(EBPF_B, R1, R4, 0), mov64_reg(R3, R1), alu64_imm(EBPF_RSH, R3, 4),
      jmp_imm(EBPF_JNE, R3, 4, copy), alu64_imm(EBPF_AND, R1, 0x0F), alu64_imm(EBPF_LSH, R1, 2),
      jmp_imm(EBPF_JLT, R1, 20, copy))
    emit_view_load_be(g, R3, R4, 2, 2, R5)               # the IP length
    g(jmp_reg(EBPF_JLT, R3, R1, copy),
      mov64_reg(R5, R2), alu64_reg(EBPF_ADD, R5, R3), jmp_reg(EBPF_JGT, R5, REG_WL, copy),
      stx(EBPF_DW, FP, R3, FLOW_IP_LEN))
    emit_view_load_be(g, R3, R4, 6, 2, R5)
    g(alu64_imm(EBPF_AND, R3, IPV4_MORE_FRAGMENTS | IPV4_FRAG_MASK), jmp_imm(EBPF_JNE, R3, 0, copy))
    for off in range(0, FLOW_KEY.size, 8):
        g(st_imm(EBPF_DW, FP, FLOW_AT + off, 0))
    g(st_imm(EBPF_B, FP, FLOW_AT, 4))
    emit_flow_key_bytes(g, R4, IPV4_SRC_OFF, FLOW_AT + FLOW_SRC_OFF, 4)
    emit_flow_key_bytes(g, R4, IPV4_SRC_OFF + 4, FLOW_AT + FLOW_DST_OFF, 4)
    g(alu64_reg(EBPF_ADD, R2, R1), ja(key))
    g.at(udp6)
    g(ldx(EBPF_DW, R1, FP, CNT_FRAMES), jmp_imm(EBPF_JNE, R1, 1, copy),
      ldx(EBPF_B, R1, R4, 0), alu64_imm(EBPF_RSH, R1, 4), jmp_imm(EBPF_JNE, R1, 6, copy))
    emit_view_load_be(g, R3, R4, 4, 2, R5)               # the payload length
    g(alu64_imm(EBPF_ADD, R3, IPV6_HDR_LEN),
      mov64_reg(R5, R2), alu64_reg(EBPF_ADD, R5, R3), jmp_reg(EBPF_JGT, R5, REG_WL, copy),
      stx(EBPF_DW, FP, R3, FLOW_IP_LEN))
    for off in range(0, FLOW_KEY.size, 8):
        g(st_imm(EBPF_DW, FP, FLOW_AT + off, 0))
    g(st_imm(EBPF_B, FP, FLOW_AT, 6))
    emit_flow_key_bytes(g, R4, IPV6_SRC_OFF, FLOW_AT + FLOW_SRC_OFF, 16)
    emit_flow_key_bytes(g, R4, IPV6_SRC_OFF + 16, FLOW_AT + FLOW_DST_OFF, 16)
    g(alu64_imm(EBPF_ADD, R2, IPV6_HDR_LEN))
    g.at(key)
    # r2 = the UDP header's offset in the view
    g(st_imm(EBPF_B, FP, FLOW_AT + 1, IPPROTO_UDP))
    emit_view_header(g, UDP_HDR_LEN, copy)
    emit_flow_key_bytes(g, R4, 0, FLOW_AT + FLOW_PORTS_OFF, 4)
    emit_view_load_be(g, R3, R4, 4, 2, R5)               # the UDP length
    positive = g.label("f_plen")
    g(alu64_imm(EBPF_SUB, R3, UDP_HDR_LEN), jmp_imm(EBPF_JSGE, R3, 0, positive), mov64_imm(R3, 0))
    g.at(positive)
    g(stx(EBPF_DW, FP, R3, FLOW_PAYLOAD_LEN),
      ld_map_fd(R1, flows_fd), mov64_reg(R2, FP), alu64_imm(EBPF_ADD, R2, FLOW_AT),
      call("map_lookup_elem"), jmp_imm(EBPF_JEQ, R0, 0, copy),
      mov64_reg(R7, R0), call("ktime_get_ns"), stx(EBPF_DW, R7, R0, FLOW_LAST))
    emit_bump(g, R7, FLOW_PKTS)
    for field, slot in ((FLOW_IP_BYTES, FLOW_IP_LEN), (FLOW_PAYLOAD, FLOW_PAYLOAD_LEN)):
        g(ldx(EBPF_DW, R1, R7, field), ldx(EBPF_DW, R2, FP, slot), alu64_reg(EBPF_ADD, R1, R2),
          stx(EBPF_DW, R7, R1, field))
    g(ldx(EBPF_DW, R1, R7, FLOW_WIRE_BYTES), alu64_reg(EBPF_ADD, R1, REG_WL),
      stx(EBPF_DW, R7, R1, FLOW_WIRE_BYTES), ja(counted))


def build_program(maps, nets=(), rules=(), decoder=True, verdict=0, gso_above=None,
                  sample_hash=SAMPLE_HASH, prefilter=None):
    """The whole socket program: (image, labels). rules: classic programs (lpd's
    compile_filter output, kernel=False: they see the frame as userspace does).
    prefilter: -F's kernel program (kernel=True), a gate before everything: a frame it
    rejects is neither counted nor copied, as on the classic path, where it never
    reaches lpd.
    gso_above: split GSO super-frames longer than this (see emit_gso); None: never.
    sample_hash: the overflow sample's multiplier (emit_overflow_sample).
    verdict: what it returns: 0 (no frame copied to userspace), a snapshot length, a
    CopyPlan (each frame copied as far as the userspace stages read it), or VERDICT_MASK
    (test builds, at most 32 rules: bit i set when rule i matched)."""
    g = Gen()
    done = Label("done")
    if isinstance(verdict, CopyPlan) and verdict.constant() is not None:
        verdict = verdict.constant()
    plan = verdict if isinstance(verdict, CopyPlan) else None
    mark = verdict == VERDICT_MASK
    if mark and len(rules) > 32:
        raise ValueError("VERDICT_MASK: at most 32 rules")
    dropped = Label("dropped")
    if prefilter is not None:          # first: a frame it drops costs no view
        g(mov64_reg(REG_CTX, R1))
        emit_rule(g, prefilter, "F", 0, gate=dropped)
        g(mov64_reg(R1, REG_CTX))      # what the prologue expects, as at the entry
    emit_prologue(g)
    emit_gso(g, gso_above, maps["iface"].fd)
    if mark:
        g(st_imm(EBPF_W, FP, VERDICTS, 0))
    for i, prog in enumerate(rules):
        # Per rule, not once: a rule's compares narrow r8/r9 differently on each of its
        # paths, and without the reload the verifier walks each following rule once per
        # such narrowing (measured: 100 rules exceed the 1M-instruction limit; with it,
        # 100 rules take 29k, 400 rules 117k).
        emit_normalise(g)
        emit_rule(g, prog, i, maps["rules"].fd, mark)
    emit_normalise(g)                  # after the GSO block's or the last rule's narrowing
    if plan is not None:
        emit_copy_length(g, plan, maps["flows"].fd if "flows" in maps else None,
                         maps["hellos"].fd if "hellos" in maps else None)
        emit_normalise(g)
    if decoder:
        emit_decoder(g, maps, list(nets), sample_hash, done)
    g.at(done)
    if mark:
        g(ldx(EBPF_W, R0, FP, VERDICTS))
    elif plan is not None:
        g(ldx(EBPF_W, R0, FP, COPY))
    else:
        g(mov32_imm(R0, verdict))
    g(exit_insn())
    if prefilter is not None:
        g.at(dropped)
        g(mov32_imm(R0, 0), exit_insn())
    return assemble(g.items)


def read_counters(maps, nrules=0):
    """(iface {field: n}, {(family, address text): [tx_b, tx_p, rx_b, rx_p]}, [(bytes, pkts)])"""
    iface_map = maps["iface"]
    iface = dict(zip(IFACE_FIELDS, iface_map.sum_u64(iface_map.lookup(U32.pack(0)))))
    addrs = {}
    for m in (maps[name] for name in ADDRESS_MAPS):
        for key, value in m.items():
            fam, raw = ADDR_KEY.unpack(key)
            addr = ipaddress.ip_address(raw[:4] if fam == 4 else raw)
            addrs[(fam, str(addr))] = [a + b for a, b in zip(addrs.get((fam, str(addr)), [0] * 4),
                                                            m.sum_u64(value))]
    rules = []
    rm = maps["rules"]
    for i in range(nrules):
        rules.append(tuple(rm.sum_u64(rm.lookup(U32.pack(i)))))
    return iface, addrs, rules


###############################################################################
# 17.4 Accounting: the kernel tables behind the stages ########################
# provides: ebpf_available, KernelAccounting

# How long the old program of a reload may still be running on another CPU after
# SO_ATTACH_BPF returned (an RCU grace period is milliseconds): its rules map is read
# for the last time at the first tick after this.
EBPF_RETIRE_AFTER = 0.2


def ebpf_available():
    """None if this process can load socket programs and make maps, else why not (an
    LpdError: NoPermission without CAP_BPF)."""
    try:
        m = Map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, "lpd_probe")
    except OSError as e:
        return os_failure(e, "cannot create a BPF map")
    try:
        image, _ = assemble([mov32_imm(R0, 0), exit_insn()])
        os.close(load_program(image, "lpd_probe"))
    except OSError as e:
        return os_failure(e, "cannot load a socket program")
    finally:
        m.close()
    return None


def grace_period():
    """Return once no socket program still counts in a generation it read before this
    call: membarrier(MEMBARRIER_CMD_GLOBAL) (see the Linux ABI). Where that is refused
    (nohz_full CPUs, a seccomp filter), a wait of EBPF_RETIRE_AFTER, the bound a reload
    trusts for the same question."""
    if NR_MEMBARRIER is None or _syscall(NR_MEMBARRIER, MEMBARRIER_CMD_GLOBAL, None, 0) < 0:
        time.sleep(EBPF_RETIRE_AFTER)


def pack_address(version, key):
    """LocalAddresses' key of an address -> the program's ADDR_KEY."""
    return ADDR_KEY.pack(version, key.to_bytes(4, "big") if version == 4 else key)


def unpack_address(packed):
    """The program's ADDR_KEY -> (version, LocalAddresses' key)."""
    version, raw = ADDR_KEY.unpack(packed)
    return version, int.from_bytes(raw[:4], "big") if version == 4 else raw


# A direction the kernel counted nothing for in this many ticks goes back to userspace,
# which makes room for busier ones (a quiet flow costs userspace little).
FLOW_IDLE_TICKS = 2


class _Flow:
    """One direction of a connection in the flows map: what has been read of it."""
    __slots__ = ("conn", "bit", "seen", "idle")

    def __init__(self, conn, bit):
        self.conn, self.bit = conn, bit
        self.seen = (0,) * FLOW_SUMS       # packets, IP bytes, wire bytes, payload bytes
        self.idle = 0


class FlowOffload:
    """--connections under --engine ebpf: UDP directions counted in the kernel (the flows
    map, emit_flow), so that connection tracking costs userspace the frames that can
    change a connection's state, not every frame.

    Connections hands a direction over at its second frame (take): from then on the
    program counts it and copies it no further than other stages read. Its counters
    only grow, and userspace keeps what it read of them, so a read is never racing a
    reset: at every tick (drain) each direction's growth is added to its connection's
    end, its last frame's time becomes the connection's last activity and Connections
    orders it among the active as packet() would (credited). A direction that counted
    nothing for FLOW_IDLE_TICKS ticks leaves the map (Map.pop: its last counts come with
    it) and its next frame is tracked in userspace again; so does every direction of a
    connection that ends (release, before its record is made). Idle expiry asks the
    kernel first (refresh): a connection is idle only if the kernel saw nothing either.
    Bounds: FLOW_MAP_MAX directions (beyond it a direction stays in userspace); the
    kernel's clock is CLOCK_MONOTONIC, turned into the ring's wall clock at each read."""

    def __init__(self, flows, conns):
        self.map, self.conns = flows, conns
        self.entries = {}                  # packed key -> _Flow
        self.by_conn = {}                  # connection key -> [packed key, ...]
        self.zero = bytes(flows.buf_size)

    def take(self, c, is_orig, src, dst, sport, dport):
        if len(self.entries) >= self.map.max_entries:
            return
        key = FLOW_KEY.pack(4 if len(src) == 4 else 6, c.proto, src, dst,
                            sport.to_bytes(2, "big"), dport.to_bytes(2, "big"))
        bit = OFFLOAD_ORIG if is_orig else OFFLOAD_RESP
        if key in self.entries or not self.map.insert(key, self.zero):
            return
        self.entries[key] = _Flow(c, bit)
        self.by_conn.setdefault(c.key, []).append(key)
        c.offloaded |= bit

    def _credit(self, flow, value, clock):
        """What the kernel counted for flow since the last read, added to its end; True
        if anything. clock: the wall clock minus CLOCK_MONOTONIC, in seconds."""
        m = self.map
        sums, last = [0] * FLOW_SUMS, 0
        for cpu in range(m.ncpus):
            v = FLOW_VALUE.unpack_from(value, cpu * m.stride)
            for i in range(FLOW_SUMS):
                sums[i] += v[i]
            last = max(last, v[FLOW_SUMS])
        seen = flow.seen
        if sums[0] == seen[0]:
            return False
        c = flow.conn
        e = c.o if flow.bit == OFFLOAD_ORIG else c.r
        e.pkts += sums[0] - seen[0]
        e.ip_bytes += sums[1] - seen[1]
        e.wire_bytes += sums[2] - seen[2]
        e.payload_bytes += sums[3] - seen[3]
        flow.seen = tuple(sums)
        c.last = max(c.last, last / NS_PER_S + clock)
        return True

    def drain(self):
        """The tick's read of the whole map (KernelAccounting.sync)."""
        clock = time.time() - time.monotonic()
        moved, idle = {}, []
        for key, value in self.map.items():
            flow = self.entries.get(key)
            if flow is None:
                continue
            if self._credit(flow, value, clock):
                flow.idle = 0
                moved[id(flow.conn)] = flow.conn
            else:
                flow.idle += 1
                if flow.idle >= FLOW_IDLE_TICKS:
                    idle.append(key)
        for c in sorted(moved.values(), key=lambda x: x.last):
            self.conns.credited(c)
        for key in idle:
            c = self.entries[key].conn
            if self._remove(key, clock):
                self.conns.credited(c)

    def _remove(self, key, clock):
        """The direction leaves the map with its last counts; True if they were new."""
        flow = self.entries.pop(key)
        c = flow.conn
        keys = self.by_conn[c.key]
        keys.remove(key)
        if not keys:
            del self.by_conn[c.key]
        c.offloaded &= ~flow.bit
        value = self.map.pop(key)
        return value is not None and self._credit(flow, value, clock)

    def refresh(self, c):
        clock = time.time() - time.monotonic()
        changed = False
        for key in self.by_conn.get(c.key, ()):
            value = self.map.lookup(key)
            if value is not None and self._credit(self.entries[key], value, clock):
                changed = True
        return changed

    def release(self, c):
        clock = time.time() - time.monotonic()
        for key in list(self.by_conn.get(c.key, ())):
            self._remove(key, clock)


class _Prepared(NamedTuple):
    """A reload's program, loaded by the reload thread (KernelAccounting.prepare)."""
    rules: object
    nets: list
    maps: dict
    program: object
    gso_above: object


class KernelAccounting:
    """--engine ebpf: the program and its maps, standing in for the decoder's counting.

    Local addresses, exact and bounded whatever a flood does. The program counts an
    address in `known` if LocalAddresses tracks it, else in `newcomers` while there is
    room, else in the interface's unattributed counters and the `overflow` sample; in
    the generation (of two) that `generation` names. At every tick, sync():
      1. the active generation's newcomers, read live, join LocalAddresses with what
         they counted so far (a full table evicts its least busy eighth, as on the
         classic path);
      2. the idle generation's known gets LocalAddresses' keys (evicted and idle ones
         deleted, new ones inserted at zero): from the flip on, every tracked address
         counts in known, where only userspace inserts, so a flood cannot take its room;
      3. the heaviest addresses of the active overflow sample go into the idle
         newcomers at zero, where the flood's first-come inserts cannot beat them;
      4. flip, then a grace period (grace_period): no program counts in the old
         generation any more;
      5. the old generation is drained exactly: known's values are added to the table
         and zeroed, not deleted (its keys serve its next turn); newcomers' (less what
         step 1 took) are added and its entries deleted, which empties it for its next
         turn; the sample is zeroed. A newcomer that came after step 1 goes into the
         active known at once.
    So a tracked address is counted exactly throughout, a new one from its first frame
    if newcomers had room, else from the next tick if it held its sample slot.
    LocalAddresses keeps the rates, idle expiry and snapshots as on the classic path;
    what it forgets leaves known at the next two ticks. No LRU map: its evictions would
    lose counts. Rules: one per-CPU array slot each; a reload loads a new program with
    a new rules map (the other maps stay), swaps it in one SO_ATTACH_BPF, and carries
    the old counts by (id, expression) as RuleCounter does."""

    def __init__(self, local, rules, verdict=0, prefilter=None, remotes=None):
        self.local, self.rules, self.verdict = local, rules, verdict
        self.prefilter = prefilter     # -F's kernel program: the program's gate
        self.remotes = remotes         # --remote: RemoteAddresses, fed from the remotes maps
        self.maps = make_maps(len(rules) if rules else 0, local.local_max,
                              max(remotes.remote_max, REMOTE_MAP_MIN) if remotes else 0,
                              FLOW_MAP_MAX if isinstance(verdict, CopyPlan) and verdict.l4 else 0,
                              isinstance(verdict, CopyPlan) and verdict.handshakes)
        self.flows = None              # --connections: FlowOffload, once track() is called
        self.base = [(0, 0)] * (len(rules) if rules else 0)   # carried from older programs
        self.carried = []              # (old rules map, [(new i, old j, old base)], retire at)
        self.gso_above = None
        self.program = None
        self.active = 0                # the generation the program counts in
        # What the kernel counted per tracked address, drained: LocalAddresses' lists
        # are set from these, so what the decoder adds to them (a userspace stage
        # copies frames) never counts twice. {version: {key: [tx_b, tx_p, rx_b, rx_p]}}
        self.totals = {version: {} for version in FAMILIES}
        # The keys each generation's known holds: {version: set of keys}, per generation.
        self.known = [{version: set() for version in FAMILIES} for _ in range(GENERATIONS)]
        self.sample_hash = int.from_bytes(os.urandom(4), "little") | 1
        self.sampled_at = 0            # unattributed packets when the sample was last read
        self.remote_unfitted = 0       # remote_unfitted_bytes already in RemoteAddresses' bounds

    def track(self, conns):
        """--connections: UDP directions counted in the flows map (FlowOffload)."""
        self.flows = conns.offload = FlowOffload(self.maps["flows"], conns)

    def program_for(self, vnet, mtu):
        """The program for a socket: built (again) when the link's GSO threshold changed."""
        gso_above = (mtu + ETH_HLEN + 2 * VLAN_TAG_LEN if mtu else 0) if vnet else None
        if self.program is None or gso_above != self.gso_above:
            self.gso_above = gso_above
            self._load(self.local.local_nets, self.rules, self.maps)
        return self.program.fd

    def _load(self, nets, rules, maps):
        old, self.program = self.program, self._build(nets, rules, maps, self.gso_above)
        if old is not None:
            old.close()

    def _build(self, nets, rules, maps, gso_above):
        """The program, loaded (the verifier runs here): any thread."""
        image, labels = build_program(maps, nets, rules.progs if rules else (), True,
                                      self.verdict, gso_above, self.sample_hash, self.prefilter)
        return Program(image, labels)

    def prepare(self, rules, nets):
        """The slow half of a reload, for the reload thread: the new rules map and the
        program built, loaded and verified (milliseconds to seconds with many rules).
        Nothing the capture thread reads changes; swap() or discard() takes the result."""
        maps = dict(self.maps, rules=Map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, RULE_VALUE.size,
                                         max(1, len(rules) if rules else 0), "lpd_rules"))
        gso_above = self.gso_above
        try:
            program = self._build(nets, rules, maps, gso_above)
        except BaseException:
            maps["rules"].close()
            raise
        return _Prepared(rules, list(nets), maps, program, gso_above)

    def discard(self, prepared):
        prepared.program.close()
        prepared.maps["rules"].close()

    def swap(self, sock, prepared):
        """The capture thread's half: one SO_ATTACH_BPF, then the counts carried by
        (id, expression); the old rules map is read one last time after
        EBPF_RETIRE_AFTER. A failed attach leaves everything as it was (OSError)."""
        program = prepared.program
        if prepared.gso_above != self.gso_above:
            # the link changed its GSO threshold since prepare() (program_for): rare,
            # so built again here rather than swapping in a program that splits wrong
            program.close()
            program = self._build(prepared.nets, prepared.rules, prepared.maps, self.gso_above)
        if sock is not None:
            try:
                attach(sock, program.fd)
            except OSError:
                program.close()
                prepared.maps["rules"].close()
                raise
        old_rules, old_map, old_base = self.rules, self.maps["rules"], self.base
        rules = prepared.rules
        prev = {(r.id, r.expr): j for j, r in enumerate(old_rules.rules)} if old_rules else {}
        pairs = [(i, prev[(r.id, r.expr)]) for i, r in enumerate(rules.rules)
                 if (r.id, r.expr) in prev] if rules else []
        old, self.program = self.program, program
        if old is not None:
            old.close()
        self.maps, self.rules = prepared.maps, rules
        self.base = [(0, 0)] * (len(rules) if rules else 0)
        for i, j in pairs:
            self.base[i] = old_base[j]
        self.carried.append((old_map, pairs, time.monotonic() + EBPF_RETIRE_AFTER))

    def _rule_counts(self, m, n):
        return [tuple(m.sum_u64(m.lookup(U32.pack(i)))) for i in range(n)]

    def sync(self):
        """Copy the kernel's counters into the stages' tables (the capture thread, before
        a tick or a publication)."""
        now = time.monotonic()
        for entry in list(self.carried):
            old_map, pairs, at = entry
            if now >= at:
                counts = self._rule_counts(old_map, max([j + 1 for _, j in pairs] + [0]))
                for i, j in pairs:
                    self.base[i] = _add(self.base[i], counts[j])
                old_map.close()
                self.carried.remove(entry)
        self.sync_addresses()
        if self.flows is not None:
            self.flows.drain()

    def sync_addresses(self):
        """Steps 1 to 5 of the class's description: LocalAddresses gets everything the
        kernel counted up to the flip."""
        old, idle = self.active, (self.active + 1) % GENERATIONS
        newcomers = self.maps[f"newcomers{old}"]
        taken = {}                     # what step 1 credited: value bytes by key
        for key, value in newcomers.items():
            taken[key] = value
            self._credit(key, newcomers.sum_u64(value))
        self._mirror(idle)
        sampled = self._let_in_overflow(old, idle)
        self.maps["generation"].update(U32.pack(0), U32.pack(idle))
        grace_period()
        self.active = idle
        if sampled:
            overflow = self.maps[f"overflow{old}"]
            overflow.write_batch(BPF_MAP_UPDATE_BATCH,
                                 [U32.pack(i) for i in range(overflow.max_entries)],
                                 bytes(overflow.buf_size))
        known = self.maps[f"known{old}"]
        zero, moved = bytes(known.buf_size), []
        for key, value in known.items():
            if value != zero:                   # most of the table is quiet in a tick
                self._credit(key, known.sum_u64(value))
                moved.append(key)
        known.write_batch(BPF_MAP_UPDATE_BATCH, moved, zero)
        drained, late = newcomers.items(), []
        for key, value in drained:
            before = taken.get(key)
            if before is None:
                late.append(key)
                self._credit(key, newcomers.sum_u64(value))
            elif value != before:       # counted again since step 1: the rest
                self._credit(key, [n - b for n, b in zip(newcomers.sum_u64(value),
                                                          newcomers.sum_u64(before))])
        newcomers.write_batch(BPF_MAP_DELETE_BATCH, [key for key, _ in drained])
        self._insert_known(self.active, late)
        if self.remotes is not None:
            self._drain_remotes(old)

    def _drain_remotes(self, old):
        """--remote: the old generation's remotes (idle since the grace period) into
        RemoteAddresses as one weighted update each (space-saving takes weights as they
        come), and deleted. Its totals are the kernel's exact ones. What found no room
        in the map (remote_unfitted_bytes) is in no entry, so it widens every bound:
        each entry's error and the floor grow by those bytes, which keeps "exported <=
        true <= exported + error" for every remote (only a flood of more remotes an
        interval than --remote-max makes any)."""
        m = self.maps[f"remotes{old}"]
        drained = m.items()
        batch = Batch()
        for packed, value in drained:
            _, key = unpack_address(packed)
            tx_b, tx_p, rx_b, rx_p = m.sum_u64(value)
            if tx_p:
                batch.remote_tx.append((key, tx_b, tx_p))
            if rx_p:
                batch.remote_rx.append((key, rx_b, rx_p))
        m.write_batch(BPF_MAP_DELETE_BATCH, [packed for packed, _ in drained])
        # Heaviest first: the map's order is its hash's, and a table that fills during
        # the update would otherwise let a light remote in before a heavy one, which
        # would then enter with an inherited error the classic path (frames in order,
        # the heavy one's first) never gives it.
        for frames in (batch.remote_tx, batch.remote_rx):
            frames.sort(key=lambda e: e[1], reverse=True)
        r = self.remotes
        r.consume(batch)
        c = self.interface()
        lost = c["remote_unfitted_bytes"] - self.remote_unfitted
        if lost:
            self.remote_unfitted += lost
            r.floor += lost
            for e in r.table.values():
                e[REMOTE_WEIGHT] += lost
            r.cache.update(r.table)            # every row's error changed
        r.totals[:] = [c[f] for f in REMOTE_FIELDS]

    def _let_in_overflow(self, old, idle):
        """Step 3: the addresses the old generation's overflow sample holds (read live:
        a slot torn by a write meanwhile gives an address that counts nothing) go into
        the idle generation's newcomers at zero, the heaviest first, as many as one
        eviction makes room for: counted from the flip on, where the kernel's first-come
        inserts could lose them to a flood again. True if there was a sample to read
        (something went unattributed since the last tick)."""
        unattributed = self.interface()["unattributed_packets"]
        if unattributed == self.sampled_at:
            return False
        self.sampled_at = unattributed
        overflow = self.maps[f"overflow{old}"]
        weights = {}
        for _, value in overflow.items():
            for cpu in range(overflow.ncpus):
                key, weight = OVERFLOW_VALUE.unpack_from(value, cpu * overflow.stride)
                if weight:
                    packed = key[:ADDR_KEY.size]
                    weights[packed] = weights.get(packed, 0) + weight
        room = max(1, self.local.local_max // LOCAL_EVICT_FRACTION)
        newcomers = self.maps[f"newcomers{idle}"]
        zero = bytes(newcomers.buf_size)
        for packed in heapq.nlargest(room, weights, key=weights.get):
            version, key = unpack_address(packed)
            if version in FAMILIES and key not in self.local.tables[version].hosts:
                newcomers.insert(packed, zero)
        return True

    def _credit(self, packed, counts):
        """Add what the kernel counted for an address to its totals and its list in
        LocalAddresses; an address the table does not hold (new, or forgotten since)
        enters it from zero."""
        if not any(counts):
            return
        version, key = unpack_address(packed)
        t = self.local.tables[version]
        totals = self.totals[version]
        entry, total = t.hosts.get(key), totals.get(key)
        if entry is None or total is None:
            if entry is None:
                entry = self.local.admit(version, key)
            total = totals[key] = [0, 0, 0, 0]
        for i, n in enumerate(counts):
            total[i] += n
        entry[:] = total
        t.dirty.add(key)

    def _mirror(self, gen):
        """known{gen} := the keys LocalAddresses holds (gen is idle: no program reads it).
        Deletions first: the table holds at most local_max, known's size."""
        m, held = self.maps[f"known{gen}"], self.known[gen]
        want = {version: t.hosts.keys() for version, t in self.local.tables.items()}
        for version, keys in held.items():
            gone = keys - want[version]
            m.write_batch(BPF_MAP_DELETE_BATCH, [pack_address(version, k) for k in gone])
            keys -= gone
        for version, keys in held.items():
            new = want[version] - keys
            m.write_batch(BPF_MAP_UPDATE_BATCH, [pack_address(version, k) for k in new],
                          bytes(m.buf_size))
            keys |= new

    def _insert_known(self, gen, packed_keys):
        """Tracked addresses into the active known, at zero, while programs count in it:
        safe, as only userspace inserts there. Where it is full (it still holds what
        the table evicted since its last turn) they stay newcomers until the next tick."""
        m, held = self.maps[f"known{gen}"], self.known[gen]
        zero = bytes(m.buf_size)
        for packed in packed_keys:
            version, key = unpack_address(packed)
            if key in self.local.tables[version].hosts and key not in held[version] and \
                    m.insert(packed, zero):
                held[version].add(key)

    def expire(self):
        """After LocalAddresses' tick: the totals of what it forgot (idle or evicted) go,
        so a returning address starts from 0 as on the classic path; its known entries
        go at the next two ticks (_mirror)."""
        for version, t in self.local.tables.items():
            totals = self.totals[version]
            for key in totals.keys() - t.hosts.keys():
                del totals[key]

    def interface(self):
        m = self.maps["iface"]
        return dict(zip(IFACE_FIELDS, m.sum_u64(m.lookup(U32.pack(0)))))

    def interface_snapshot(self, frames, drops, up):
        """frames: what the ring handed to userspace (0 unless a userspace stage needs
        frames: lpd_capture_packets_total says how much was copied)."""
        c = self.interface()
        totals = tuple(c[f] for f in IFACE_FIELDS[:4])
        return InterfaceSnapshot(frames, totals,
                                 tuple((r, c["malformed_" + r]) for r in MALFORMED_REASONS),
                                 drops, up, c["gso_frames"], c["gso_unsplit"],
                                 (c["unattributed_bytes"], c["unattributed_packets"]))

    def rule_snapshot(self):
        if self.rules is None:
            return RuleSnapshot()
        counts = self._rule_counts(self.maps["rules"], len(self.rules))
        for old_map, pairs, _ in self.carried:      # not yet retired: their live counts
            old = self._rule_counts(old_map, max([j + 1 for _, j in pairs] + [0]))
            for i, j in pairs:
                counts[i] = _add(counts[i], old[j])
        return RuleSnapshot(tuple((rid, b0 + b, p0 + p) for rid, (b0, p0), (b, p)
                                  in zip(self.rules.ids, self.base, counts)))

    def close(self):
        for m in list(self.maps.values()) + [c[0] for c in self.carried]:
            m.close()
        if self.program is not None:
            self.program.close()




###############################################################################
# 18 Exporters ################################################################
###############################################################################
# provides: all_documents, api_answer, choose_stages, Collector,
#   decoder_stages, format_table, make_metrics_server, open_logs, RuleSocketServer



###############################################################################
# 18.1 The stage table at work ################################################
# provides: all_documents, api_answer, choose_stages,
#   Collector, decoder_stages, format_table, open_logs
#
# Everything that handles stages iterates STAGES: choose_stages() (the daemon, each
# worker and -r), publishing and finishing (19), the workers' pipes and their merge
# (20), the documents, the table and the Collector below.

def choose_stages(opts, wiring):
    """The stages the options ask for, by name in STAGES' order: the one place that
    decides, for the daemon, each worker and -r."""
    stages = {}
    for row in STAGES:
        stage = row.build(opts, wiring, stages)
        if stage is not None:
            stages[row.name] = stage
    return stages


def decoder_stages(stages, kernel=None):
    """What the decoder feeds, in STAGES' order: not the local addresses (it counts them
    inline), nor rules when there are none or the kernel counts them (--engine ebpf), nor
    a stage that reads no frame (flow export)."""
    return [s for s in stages.values() if s.wants and s.name != LocalAddresses.name and
            (s.name != RuleCounter.name or (len(s) and kernel is None))]


def open_logs(opts):
    """The JSON logs the options name (--conn-log, --http-log), by stage name."""
    return {row.name: JsonLog(row.log_path(opts), row.log) for row in STAGES
            if row.log_path(opts)}


# /api/<kind>: a document, or None where the stage is off (404): the interface's, every
# stage's, the container engine's.
DOCUMENTS = {"interface": interface_document,
             **{kind: make for row in STAGES for kind, make in row.documents + row.live_documents},
             "containers": containers_document}
LIVE_DOCUMENTS = {kind for row in STAGES for kind, _ in row.live_documents}


API_TOP = re.compile(r"[0-9]{1,9}")        # ASCII digits only: str.isdigit() takes '²'


def api_answer(path, query, published, presentation):
    """(HTTP status, JSON body) for GET /api/..., or None for another path."""
    kind = path[len("/api/"):] if path.startswith("/api/") else None
    if kind not in DOCUMENTS:
        return None
    top, filters = None, {}
    asked = False
    for part in query.split("&") if query else ():
        name, _, value = part.partition("=")
        if name == "top":
            if not API_TOP.fullmatch(value):
                return 400, json.dumps({"error": f"top must be a whole number, got {value!r}"})
            top, asked = int(value), True
        elif name == "limit" and kind == "requests":
            if not API_TOP.fullmatch(value):
                return 400, json.dumps({"error": f"limit must be a whole number, got {value!r}"})
            top, asked = int(value), True
        elif name == "server" and kind == "requests":
            filters["server"] = urllib.parse.unquote(value)
        elif name == "state" and kind == "connections":
            if value not in LIVE_STATES:
                return 400, json.dumps({"error": f"state must be one of {', '.join(LIVE_STATES)}, "
                                                 f"got {value!r}"})
            filters["state"] = value
    rows = API_ROWS_MAX if asked else API_ROWS_DEFAULT
    if kind == "requests":
        filters["rows"] = rows            # `limit` is per server; the document's bound is this
    else:
        top = min(rows, API_ROWS_DEFAULT if top is None else top)
    doc = DOCUMENTS[kind](published.latest(), presentation(), top, **filters)
    if doc is None:
        return 404, json.dumps({"error": f"{kind}: that stage is not enabled"})
    return 200, json.dumps(doc, ensure_ascii=False)


def all_documents(snap, how):
    """--output json: every enabled stage's document, by kind."""
    docs = {kind: make(snap, how) for kind, make in DOCUMENTS.items() if kind not in LIVE_DOCUMENTS}
    return {kind: doc for kind, doc in docs.items() if doc is not None}


def format_table(docs):
    """--output table: the interface, then each enabled stage's lines (STAGES' order)."""
    iface = docs["interface"]
    # frames: what reached lpd itself (lpd_capture_packets_total), which the eBPF engine,
    # counting in the kernel, keeps near 0: the packets are what the interface carried.
    out = [f"interface {iface['nic']}: "
           f"tx {_amount(iface['tx_bytes'], ' bytes')} in {iface['tx_packets']} packets, "
           f"rx {_amount(iface['rx_bytes'], ' bytes')} in {iface['rx_packets']} packets; "
           f"{iface['frames']} frames copied to lpd\n"]
    for stage in STAGES:
        doc = docs.get(stage.name)
        if doc is not None:
            out += stage.table(doc)
    return "".join(out)


class Collector:
    """Builds fresh metric families on every scrape from the latest publication: every
    stage's (STAGES; the local addresses' row brings the interface's and the capture's,
    which the decoder counts inline with them), the container engine's and lpd's own."""

    def __init__(self, published, mapping, nic, rule_socket=None, geo=None,
                 threshold=DEFAULT_EXPORT_THRESHOLD, docker=None):
        self.published, self.mapping, self.nic = published, mapping, nic
        self.rule_socket = rule_socket      # its own counters, read as it counts them
        self.geo, self.threshold, self.docker = geo, threshold, docker
        self.engine = "cbpf"                # what counts: set by build_daemon

    def presentation(self):
        """One consistent set of labellers for a scrape or a document."""
        return Presentation(self.nic, self.mapping.labeller(), remote_labeller(self.geo),
                            self.threshold, self.docker)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        snap = self.published.latest()
        for row in STAGES:
            yield from row.metrics(self, snap)
        if self.docker is not None:
            yield from docker_metrics(self.docker)
        if self.rule_socket is not None:
            yield metric_family(CounterMetricFamily, "lpd_rule_socket_truncated",
                                "Rule socket dumps cut off: the client did not read them in time.",
                                [], [((), self.rule_socket.truncated)])
        yield metric_family(GaugeMetricFamily, "lpd_build_info", "lpd's version and counting engine.",
                            ["version", "engine"], [((__version__, self.engine), 1.0)])




###############################################################################
# 18.2 One selector server (the metrics endpoint, the rule socket) ############
# provides: _Client, SelectorServer

# When accept() fails (EMFILE, ENFILE, ENOBUFS, ...) the connection stays queued and the
# listener stays readable: polling it again at once spins a core and floods the log.
# The listener rests this long instead, then accept() is tried again. One policy for
# both servers (the metrics endpoint rested 1 s, the rule socket 0.5 s): the shorter
# one, because a rest costs one failed accept() at its end, nothing, while a client
# queued behind it waits up to a whole rest after a descriptor has come free.
ACCEPT_BACKOFF_SECONDS = 0.5
# Seconds shutdown() waits for the serving thread: one held up in a collection or a
# snapshot must not hold lpd's exit hostage (it is a daemon thread; it ends with lpd).
SERVER_STOP_SECONDS = 5.0


class _Client:
    """One connection being served: its socket and descriptor, the answer left to send
    (None while there is none) and the time it is cut off."""
    __slots__ = ("sock", "fd", "out", "deadline")

    def __init__(self, sock, deadline):
        self.sock, self.fd, self.deadline = sock, sock.fileno(), deadline
        self.out = None


class SelectorServer:
    """One thread, one selector over a listening socket and non-blocking clients, each
    with its own answer to send and its own deadline: a client that never reads, reads
    slowly, vanishes or breaks costs one slot for a bounded time, never a thread of its
    own nor the server.

    It accepts (resting ACCEPT_BACKOFF_SECONDS when accept() fails), keeps the table of
    clients, sends, cuts off what is past its deadline, guards each client, and stops by
    its wake pair. A subclass says what a client is: _admit() takes what was accepted,
    _readable() reads, _sent() follows an answer sent, _expire() cuts one off; _room(),
    _due() and _events_handled() shape the round. serve_forever(), shutdown() and
    server_close() are socketserver's.
    """

    def __init__(self, sock, name, max_clients):
        self.socket, self._name, self._max_clients = sock, name, max_clients
        self._clients = {}              # fd -> _Client, oldest first
        self._accept_at = None          # while the listener rests: when it resumes
        self._accept_failing = False    # logged once per run of failures
        self._listening = True          # the listener is in the selector
        self._stop = False
        self._thread = None             # the one in serve_forever()
        sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(sock, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    def serve_forever(self):
        """Serve until shutdown()."""
        self._thread = threading.current_thread()
        while not self._stop:
            self._round()

    def shutdown(self):
        """Make serve_forever() return, and wait until it has (SERVER_STOP_SECONDS at most)."""
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass                        # awake already (full), or closed
        if self._thread is not None:
            self._thread.join(SERVER_STOP_SECONDS)

    def server_close(self):
        """Close the listener and every client."""
        for c in list(self._clients.values()):
            self._close(c)
        self._sel.close()
        for s in (self.socket, self._wake_r, self._wake_w):
            s.close()

    # -- the serving thread --------------------------------------------------

    def _round(self):
        """One select(): accept, read, send; then the subclass's end of the events, the
        clients past their deadline cut off, the listener polled again if it may be."""
        for key, mask in self._sel.select(self._wait()):
            c = key.data
            if c == "wake":
                return
            try:
                if c == "listen":
                    self._accept()
                elif self._clients.get(c.fd) is c:      # else closed earlier this round
                    self._ready(c, mask)
            except Exception:
                # Never let one client end the thread: the listener would stay bound but
                # silent until restart.
                log(LOG_WARNING, f"{self._name}: unexpected error: "
                                 f"{traceback.format_exc(limit=-1).strip()!r}")
                if c != "listen":
                    self._close(c)
        self._events_handled()
        now = time.monotonic()
        for c in [c for c in self._clients.values() if c.deadline <= now]:
            self._expire(c)
        if self._accept_at is not None and self._accept_at <= now:
            self._accept_at = None
        self._poll_listener()

    def _wait(self):
        """Seconds select() may sleep: until the first deadline, the end of the listener's
        rest or the subclass's next timed work."""
        due = [c.deadline for c in self._clients.values()]
        due += [at for at in (self._accept_at, self._due()) if at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _accept(self):
        """Accept what _room() allows, then hand the batch to _admit(): a round takes a
        table's worth at most, so its reads are not starved."""
        accepted = []
        for _ in range(self._room()):
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue                # that client gave up while queued: not our failure
            except OSError as e:
                self._accept_failed(e)
                break
            if self._accept_failing:
                self._accept_failing = False
                log(LOG_NOTICE, f"{self._name}: accepting connections again")
            sock.setblocking(False)
            accepted.append(sock)
        if accepted:
            self._admit(accepted)

    def _accept_failed(self, e):
        """EMFILE and friends: the rest stay queued in the backlog while the listener rests;
        one line when the failures start, one (in _accept) when they end."""
        self._accept_at = time.monotonic() + ACCEPT_BACKOFF_SECONDS
        if not self._accept_failing:
            self._accept_failing = True
            log(LOG_WARNING, f"{self._name}: accept failed: {e.strerror or e}; clients wait "
                             f"in the backlog, retrying every {ACCEPT_BACKOFF_SECONDS:g} s")

    def _poll_listener(self):
        """Poll the listener unless it rests or there is no room (the backlog waits)."""
        on = self._accept_at is None and self._room() > 0
        if on != self._listening:
            self._listening = on
            if on:
                self._sel.register(self.socket, selectors.EVENT_READ, "listen")
            else:
                self._sel.unregister(self.socket)

    def _add(self, c, events):
        """Serve c, polled for events."""
        self._clients[c.fd] = c
        self._sel.register(c.sock, events, c)

    def _ready(self, c, mask):
        if mask & selectors.EVENT_WRITE:
            if self._send(c):
                self._sent(c)
        else:
            self._readable(c)

    def _respond(self, c, answer):
        """Send what the socket takes now, the rest as it drains."""
        c.out = memoryview(answer)
        if self._send(c):
            self._sent(c)
        else:
            self._sel.modify(c.sock, selectors.EVENT_WRITE, c)

    def _send(self, c):
        """True when the answer is sent or the client is gone."""
        try:
            while c.out:
                c.out = c.out[c.sock.send(c.out, socket.MSG_NOSIGNAL):]
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            pass            # EPIPE / ECONNRESET: the client left; nothing to report
        return True

    def _forget(self, c):
        """Take c out of the table and the selector; False if it was out already (its
        descriptor may be another client's now)."""
        if self._clients.get(c.fd) is not c:
            return False
        del self._clients[c.fd]
        self._sel.unregister(c.sock)
        return True

    def _close(self, c, abort=False):
        """Forget and close a client; `abort` resets it, so the kernel drops what a stalled
        reader never took instead of keeping it queued."""
        if not self._forget(c):
            return
        if abort:
            try:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass                # reset by the client already
        c.sock.close()

    # -- what a subclass says ------------------------------------------------

    def _room(self):
        """How many connections the next round may accept; at none the listener is not
        polled and newcomers wait in the kernel's backlog."""
        return self._max_clients - len(self._clients)

    def _admit(self, socks):
        """Serve these accepted, non-blocking sockets (or close them)."""
        raise NotImplementedError

    def _readable(self, c):
        """c sent something; only a client polled for reading gets here."""
        raise NotImplementedError

    def _sent(self, c):
        """c's answer is sent, or c is gone."""
        self._close(c)

    def _expire(self, c):
        """c is past its deadline."""
        self._close(c, abort=c.out is not None)

    def _due(self):
        """Monotonic time of the subclass's next timed work, or None."""
        return None

    def _events_handled(self):
        """Every event of this round is handled."""


###############################################################################
# 18.3 The metrics endpoint ###################################################
# provides: make_metrics_server
#
# Exporters read Published.latest(): a scrape never waits for capture, and capture
# never waits for a scrape.

LANDING_PAGE = (b"<html><head><title>lpd</title></head><body><h1>lpd</h1>"
                b"<p><a href=\"/metrics\">Metrics</a></p>"
                b"<p>JSON: <a href=\"/api/interface\">interface</a>, "
                b"<a href=\"/api/addresses\">addresses</a>, <a href=\"/api/remotes\">remotes</a>, "
                b"<a href=\"/api/rules\">rules</a></p></body></html>\n")


# Limits of the metrics endpoint. A scraper sends a small request at once and reads
# the answer at once; a slower or bigger client is broken or hostile, and these make it
# cost one slot of a fixed table for a bounded time, never a thread of its own.
# A burst of scrapes waits in the kernel's accept queue instead of in SYN retries of a
# second or more (the kernel caps this at net.core.somaxconn).
ENDPOINT_BACKLOG = socket.SOMAXCONN
# Open connections, one descriptor each: with the rule socket's 512 it stays under
# systemd's default soft limit of 1024. Beyond it one connection is refused (endpoint_victim).
ENDPOINT_MAX_CONNECTIONS = 256
# Seconds a refused client is asked to wait (Retry-After of its 503): a burst is over by
# then, and a scraper retries at its next interval anyway.
ENDPOINT_RETRY_AFTER = 1
ENDPOINT_HEAD_TIMEOUT = 5.0     # seconds to receive a whole request head, however it trickles in
# Seconds to send an answer: three times Prometheus's default scrape_timeout, so only a
# client that stopped reading runs into it.
ENDPOINT_SEND_TIMEOUT = 30.0
ENDPOINT_MAX_HEAD_BYTES = 8192  # request line and headers; a scrape's are a few hundred bytes
# Seconds an answered connection waits for the client to close, dropping what it still
# sends: closing on unread input would reset the connection and lose the answer.
ENDPOINT_LINGER_TIMEOUT = 2.0

_HTTP_HEAD_END = re.compile(rb"\n\r?\n")


def http_head_end(data, start=0):
    """Length of the request head at the start of data, blank line included; -1 if partial.
    `start` is where a terminator may begin (bytes before it were searched already)."""
    m = _HTTP_HEAD_END.search(data, max(0, start))
    return m.end() if m else -1


def http_request_line(head):
    """(method, path, query) of an HTTP/1.x request head; None if malformed."""
    parts = head.split(b"\n", 1)[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    path, _, query = parts[1].decode("latin-1").partition("?")
    return parts[0].decode("latin-1"), path, query


def http_response(code, ctype, body, head_only=False, headers=()):
    """A whole HTTP/1.0 answer; the connection closes after it."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    head = (f"HTTP/1.0 {code} {http.HTTPStatus(code).phrase}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


# What a connection refused for room gets instead of a silent close: one small write.
ENDPOINT_BUSY = http_response(503, "text/plain", b"too many connections; retry\n",
                          headers=(("Retry-After", ENDPOINT_RETRY_AFTER),))


def endpoint_victim(conns):
    """The table is full and a connection comes: (the connection to give up or None for
    the newcomer, whether it gets ENDPOINT_BUSY). `conns` oldest first. One answered and
    waiting for its client to hang up goes silently; else the oldest still sending its
    request is refused, so idle or slow clients never lock scrapes out; if every slot
    is sending an answer, the newcomer is refused rather than one cut mid-answer."""
    reading = None
    for c in conns:
        if c.head is None and c.out is None:
            return c, False
        if reading is None and c.head is not None:
            reading = c
    return reading, True


def endpoint_refuse(sock):
    """ENDPOINT_BUSY and close, in non-blocking steps: what the client sent is read first
    (closing on unread input would reset the connection, and could lose the answer),
    then the answer (it fits any fresh socket's buffer) and our end."""
    try:
        sock.recv(ENDPOINT_MAX_HEAD_BYTES)
    except OSError:
        pass                        # nothing there yet (EAGAIN), or the client has gone
    try:
        sock.send(ENDPOINT_BUSY, socket.MSG_NOSIGNAL)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


# The answer of a client whose /metrics request waits for this round's collection:
# not None, so it is not taken for answered (endpoint_victim).
ENDPOINT_ANSWER_PENDING = memoryview(b"")


class _EndpointClient(_Client):
    """An HTTP connection: also its request head so far, None once complete. Its answer is
    ENDPOINT_ANSWER_PENDING until made; head and answer both None: answered, waiting for the
    client to close."""
    __slots__ = ("head",)

    def __init__(self, sock, deadline):
        super().__init__(sock, deadline)
        self.head = bytearray()


class MetricsServer(SelectorServer):
    """The metrics endpoint: a SelectorServer of at most ENDPOINT_MAX_CONNECTIONS.

    Each request head is read within ENDPOINT_HEAD_TIMEOUT in total; only a complete request
    is answered, within ENDPOINT_SEND_TIMEOUT, then the connection closes. The /metrics
    requests completed in one round share one metrics() call.
    """

    def __init__(self, sock, metrics, metrics_type, api=None):
        super().__init__(sock, "metrics", ENDPOINT_MAX_CONNECTIONS)
        self.server_address = sock.getsockname()
        self._metrics, self._metrics_type = metrics, metrics_type
        self._api = api                 # (path, query) -> (status, JSON text) or None
        self._scrapes = []              # this round's (client, head_only) for /metrics

    # -- the serving thread --------------------------------------------------

    def _room(self):
        """A table's worth every round: a full table makes room itself (endpoint_victim)."""
        return self._max_clients

    def _admit(self, socks):
        for sock in socks:
            if len(self._clients) >= self._max_clients:
                victim, busy = endpoint_victim(self._clients.values())
                if victim is None:
                    endpoint_refuse(sock)
                    continue
                if busy:
                    self._refuse(victim)
                else:
                    self._close(victim)
            self._add(_EndpointClient(sock, time.monotonic() + ENDPOINT_HEAD_TIMEOUT), selectors.EVENT_READ)

    def _refuse(self, c):
        """Forget c and answer it ENDPOINT_BUSY (endpoint_refuse)."""
        if self._forget(c):
            endpoint_refuse(c.sock)

    def _readable(self, c):
        if c.head is not None:
            self._read(c)
        else:
            self._discard(c)

    def _read(self, c):
        """Take what the client sent; route the request once its head is complete."""
        seen = len(c.head)
        try:
            data = c.sock.recv(ENDPOINT_MAX_HEAD_BYTES + 1 - seen)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(c)
            return
        c.head += data
        end = http_head_end(c.head, seen - 2)
        if 0 <= end <= ENDPOINT_MAX_HEAD_BYTES:
            self._route(c, bytes(c.head[:end]))
        elif len(c.head) > ENDPOINT_MAX_HEAD_BYTES:
            self._respond(c, http_response(431, "text/plain", b"request head too large\n"))

    def _route(self, c, head):
        request = http_request_line(head)
        c.head = None               # no longer reading: not the first to give up
        if request is None:
            self._respond(c, http_response(400, "text/plain", b"bad request\n"))
            return
        method, path, query = request
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            self._respond(c, http_response(501, "text/plain", b"not implemented\n"))
        elif path == "/metrics":
            c.out = ENDPOINT_ANSWER_PENDING
            self._scrapes.append((c, head_only))
        elif path == "/":
            self._respond(c, http_response(200, "text/html; charset=utf-8", LANDING_PAGE, head_only))
        else:
            answer = self._api(path, query) if self._api else None
            if answer is None:
                self._respond(c, http_response(404, "text/plain", b"not found\n", head_only))
            else:
                self._respond(c, http_response(answer[0], "application/json; charset=utf-8",
                                               answer[1].encode() + b"\n", head_only))

    def _events_handled(self):
        """One exposition, made after every one of this round's requests arrived, answers
        them all."""
        scrapes, self._scrapes = self._scrapes, []
        if not scrapes:
            return
        try:
            page = 200, self._metrics_type, self._metrics()
        except Exception:
            log(LOG_WARNING, f"metrics: collecting failed: "
                             f"{traceback.format_exc(limit=-1).strip()!r}")
            page = 500, "text/plain", b"collecting the metrics failed\n"
        answers = http_response(*page), http_response(*page, head_only=True)
        for c, head_only in scrapes:
            if self._clients.get(c.fd) is c:
                self._respond(c, answers[head_only])

    def _respond(self, c, answer):
        """The answer, by ENDPOINT_SEND_TIMEOUT."""
        c.head, c.deadline = None, time.monotonic() + ENDPOINT_SEND_TIMEOUT
        super()._respond(c, answer)

    def _sent(self, c):
        """The answer is sent: end our side, then wait (bounded) for the client's end."""
        c.out = None
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(c)          # the client is gone already
            return
        c.deadline = time.monotonic() + ENDPOINT_LINGER_TIMEOUT
        self._sel.modify(c.sock, selectors.EVENT_READ, c)

    def _discard(self, c):
        """Drop what an answered client still sends; close at its end."""
        try:
            if c.sock.recv(ENDPOINT_MAX_HEAD_BYTES):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(c)


def make_metrics_server(host, port, registry, api=None):
    """The /metrics endpoint (a landing page on /, JSON on /api/*): a MetricsServer,
    not yet serving."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    try:
        addresses = stream_addresses(host, port)
    except socket.gaierror as e:
        raise ConfigError(f"--web.listen-address {host}:{port}: {e.strerror}") from None
    for i, (family, address) in enumerate(addresses):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # A restart must not fail on the last run's connections still in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(ENDPOINT_BACKLOG)
            break
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(f"--web.listen-address {host}:{port}: address already in use") from None
            # A host without IPv4 (or IPv6) on loopback: its other address still serves.
            if e.errno == errno.EADDRNOTAVAIL and i + 1 < len(addresses):
                continue
            raise os_failure(e, f"--web.listen-address {host}:{port}") from None
    try:
        return MetricsServer(sock, functools.partial(generate_latest, registry), CONTENT_TYPE_LATEST,
                             api)
    except OSError as e:              # its wake-up pair: out of descriptors
        sock.close()
        raise ConfigError(f"--web.listen-address {host}:{port}: {e.strerror or e}") from None


###############################################################################
# 18.4 The rule socket (bpfcountd's unix socket) ##############################
# provides: RuleSocketServer

# Dumps cut off at a client's deadline are logged at most this often, as a count.
TRUNCATED_REPORT_SECONDS = 60.0


class RuleSocketServer(SelectorServer):
    """bpfcountd's unix socket: each client gets the rule lines of one snapshot, then EOF.

    A SelectorServer in a background thread of its own: a client that never reads, reads
    slowly or vanishes costs only its own deadline, and capture never waits on it. At
    max_clients, newcomers wait in the backlog. `snapshot` is a callable returning
    [(id, bytes, packets)]; the daemon's asks the capture thread for a fresh publication,
    waiting a bounded time.
    """

    def __init__(self, path, snapshot, group=None, mode=0o660, client_timeout=10.0,
                 max_clients=512):
        gid = resolve_group(group)
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        except OSError as e:
            raise os_failure(e, f"{path}: cannot create directory") from None
        _clear_stale_socket(path)
        sock = _bind_unix_socket(path, mode, gid)
        st = os.stat(path)
        super().__init__(sock, "rule socket", max_clients)
        self.path, self._identity = path, (st.st_dev, st.st_ino)
        self._snapshot = snapshot
        self._timeout = client_timeout
        self._closed = False
        self.truncated = 0                  # dumps cut off at the deadline (a counter)
        self._truncated_reported = 0
        self._truncated_report_at = None    # monotonic time of the last report line

    def start(self):
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="lpd-rule-socket",
                                        daemon=True)
        self._thread.start()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stop serving, drop clients, remove the socket file if it is still ours."""
        if self._closed:
            return
        self._closed = True
        self.shutdown()
        self.server_close()
        try:
            st = os.stat(self.path)
            # Another lpd may have replaced a socket we thought stale; leave theirs.
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except OSError:
            pass

    # -- the serving thread --------------------------------------------------

    def _payload(self):
        """Encoded rule lines of one fresh snapshot (None if the snapshot failed)."""
        try:
            return format_rule_lines(self._snapshot()).encode("utf-8")
        except Exception:
            log(LOG_WARNING, f"rule socket: snapshot failed: {traceback.format_exc(limit=-1).strip()!r}")
            return None

    def _admit(self, socks):
        """One snapshot serves the whole batch; a failed one closes it (EOF, no lines)."""
        payload = self._payload()
        for sock in socks:
            if payload is None:
                sock.close()
                continue
            c = _Client(sock, time.monotonic() + self._timeout)
            self._add(c, selectors.EVENT_WRITE)
            self._respond(c, payload)

    def _expire(self, c):
        """A dump cut off at the deadline (never-reading or stalled readers): counted."""
        self.truncated += 1
        super()._expire(c)

    def _due(self):
        """The next report of cut-off dumps: at once for the first, else one
        TRUNCATED_REPORT_SECONDS after the last line; None with nothing to report."""
        if self.truncated == self._truncated_reported:
            return None
        if self._truncated_report_at is None:
            return time.monotonic()
        return self._truncated_report_at + TRUNCATED_REPORT_SECONDS

    def _events_handled(self):
        """One line per TRUNCATED_REPORT_SECONDS at most, counting the dumps cut off
        since the last line: a client that never reads must not flood the log either."""
        now = time.monotonic()
        new = self.truncated - self._truncated_reported
        if not new or (self._truncated_report_at is not None and
                       now < self._truncated_report_at + TRUNCATED_REPORT_SECONDS):
            return
        self._truncated_reported, self._truncated_report_at = self.truncated, now
        log(LOG_WARNING, f"rule socket: {new} dump{'s' if new > 1 else ''} cut off, not read "
                         f"within {self._timeout:g} s ({self.truncated} in all)")


###############################################################################
# 19 Daemon: wiring, signals, reload ##########################################
###############################################################################
# provides: build_capture, build_daemon, build_exporters, capture_interface, Daemon,
#   interface_local_nets, kernel_program, Lifecycle, load_rules, SOCKET_FRESH_TIMEOUT,
#   status_line, WAITING_LINE, whole_frames_program
#
# The capture thread (the main one) drains the ring, runs the decoder and the
# consumers, and is the only writer of every counter. Beside it: the HTTP server,
# the mapping poller, the rule socket and, during a reload, the thread compiling
# the new rules. They meet the capture thread only through Published and through
# the Reloader's `pending`, a reference the reload thread sets and the capture
# thread takes. The Daemon wires the parts and runs the loop; the Reloader (the
# reload state machine) and the InterfaceWatch (the interface lost and back) act
# on its parts from that loop.

INTERFACE_CHECK_PERIOD = 1.0
WAITING_LINE = "no such interface yet; waiting for it (counting starts when it appears)"
SOCKET_FRESH_TIMEOUT = 1.0          # how long a socket dump waits for a fresh publication
# After widening the kernel snapshot, frames the old program cut short may still sit
# in the block the kernel is filling; it retires within RING_RETIRE_MS of its first
# frame, so by then every such frame has been drained through the old rules.
WIDEN_DRAIN_SECONDS = 4 * RING_RETIRE_MS / 1000


def interface_local_nets(ifname):
    """The networks of the interface's own addresses."""
    index = interface_index(ifname)
    if index is None:
        raise ConfigError(f"{ifname}: no such interface")
    try:
        return interface_networks(index)
    except OSError as e:
        raise ConfigError(f"{ifname}: cannot read its addresses: {e.strerror}") from None


# $MAC while the interface does not exist yet (--wait-interface): the file is checked and
# the engine chosen with it; the rules are compiled again with the real address before
# the first frame is read.
MAC_NOT_YET = "00:00:00:00:00:00"


def load_rules(opts, ifname, awaiting=False):
    """The filter file's rules, parsed and compiled (slow: not on a capture thread that
    reads frames); None without -f, or with --filter-file-optional while the file does
    not exist. `awaiting`: the interface is not there yet (--wait-interface)."""
    if not opts.filter_file:
        return None
    if opts.filter_file_optional and not os.path.exists(opts.filter_file):
        return None
    if opts.mac:
        mac = opts.mac
    elif ifname is None:
        mac = None                    # -r without -i: $MAC is an error
    else:
        mac = MAC_NOT_YET if awaiting else interface_mac(ifname)
    return RuleCounter(parse_filter_file(opts.filter_file, mac))


def rule_rows(published):
    """The rule socket's dump: counts including every frame drained before the call."""
    return published.fresh(SOCKET_FRESH_TIMEOUT).get("rules", RuleSnapshot()).rows


# A TCP segment whose payload begins TLS_HANDSHAKE_START, in tcpdump's syntax: libpcap
# indexes tcp[] in IPv4 only, so IPv6's (no extension header, as the eBPF CopyPlan's
# test) is written with ip6[] from the fixed header's end.
HANDSHAKE_EXPRESSION = (
    "(tcp[((tcp[12:1] & 0xf0) >> 2):2] = {start}) or "
    "(ip6[6] = 6 and ip6[(40 + ((ip6[52:1] & 0xf0) >> 2)):2] = {start})").format(
        start=f"0x{TLS_HANDSHAKE_START.hex()}")


def whole_frames_program(ports, udp_ports=(), handshakes=False):
    """A kernel program accepting TCP to or from any of `ports`, UDP to or from any of
    `udp_ports` and, with `handshakes`, a TCP segment beginning a TLS handshake record
    on any port: the frames --http and --names read whole."""
    return compile_filter(" or ".join([f"tcp port {p}" for p in ports] +
                                      [f"udp port {p}" for p in udp_ports] +
                                      [HANDSHAKE_EXPRESSION] * handshakes), kernel=True)


def whole_frames(stages):
    """(TCP ports, UDP ports, handshakes) whose frames some stage reads whole
    (Consumer.whole_ports, Consumer.whole_handshakes): whole_frames_program's and
    CopyPlan's arguments."""
    tcp, udp = set(), set()
    for stage in stages:
        t, u = stage.whole_ports()
        tcp.update(t)
        udp.update(u)
    return tuple(sorted(tcp)), tuple(sorted(udp)), any(s.whole_handshakes for s in stages)


def judge_guard(whole):
    """The instructions before `whole` that keep it from dropping a frame.

    `whole` only chooses between "whole" and "cut to snaplen", but a classic-BPF load
    past the end of a frame ends the program with 0, i.e. drops it: an IPv4 header cut
    short or a 16-byte IPv6 stub would never reach the accounting. A frame shorter than
    the last byte `whole` may load (program_snaplen bounds its loads, [X + k] included)
    skips it and is copied whole: that costs at most those few bytes, and whatever the
    judge would have said, neither the accounting nor the HTTP stage misses one."""
    needed = program_snaplen(whole)
    if needed == 0:
        return []
    return [(BPF_LD | BPF_W | BPF_LEN, 0, 0, 0),            # A = the frame's length
            (_jmp(BPF_JGE), 1, 0, needed),                   # long enough: on to the judge
            (BPF_RET | BPF_K, 0, 0, SNAPLEN_FULL)]           # too short to judge: whole


def kernel_program(prefilter, snaplen, whole=None):
    """The socket filter: -F's program (or accept-all) returning `snaplen` bytes. With
    `whole` (whole_frames_program), a frame -F accepts is then judged by it: returned
    whole if it accepts, else cut to `snaplen` — a return value per branch, so only the
    HTTP ports' frames are copied whole. Only -F drops frames (as libpcap would, a load
    past the end included): the judge's rejects return `snaplen`, and judge_guard keeps
    a frame too short for its loads from reaching it."""
    if whole is None:
        if prefilter is None:
            return accept_all(snaplen)
        return [(c, jt, jf, snaplen if c == BPF_RET | BPF_K and k else k) for c, jt, jf, k in prefilter]
    tail = judge_guard(whole) + \
        [(c, jt, jf, (SNAPLEN_FULL if k else snaplen) if c == BPF_RET | BPF_K else k) for c, jt, jf, k in whole]
    if prefilter is None:
        return tail
    n = len(prefilter)
    head = [(BPF_JMP | BPF_JA, 0, 0, n - i - 1) if c == BPF_RET | BPF_K and k else (c, jt, jf, k)
            for i, (c, jt, jf, k) in enumerate(prefilter)]    # accept: on to the judge
    return head + tail


def status_line(ifname, snap, uptime):
    """SIGUSR1's report, from the latest publication (at most one --interval old)."""
    iface = snap.get("interface", InterfaceSnapshot())
    workers = f"{len(snap['workers'])} workers, " if "workers" in snap else ""
    frames = iface.totals[TX_PACKETS] + iface.totals[RX_PACKETS]    # as the wire carried them
    return (f"status: {ifname} {'up' if iface.up else 'down'}, {workers}{frames} frames, "
            f"{iface.drops} drops, tx {iface.totals[TX_BYTES]} bytes, "
            f"rx {iface.totals[RX_BYTES]} bytes, "
            f"{len(snap.get('addresses', AddressSnapshot()).rows)} local addresses, "
            f"{len(snap['remotes'].rows) if 'remotes' in snap else 'no'} remote addresses, "
            f"{len(snap.get('rules', RuleSnapshot()).rows)} rules, "
            f"uptime {int(uptime)} s")


class Lifecycle:
    """What the daemon and the workers' parent share: signals turned into flags that the
    loop acts on, a wake pipe it polls beside its own sources, and the exporters (the
    metrics endpoint, the enrichment pollers, the rule socket) started once capture is
    up and stopped in one order. A subclass provides _start() (before the exporters:
    open capture, or spawn workers), _ready() (the start-up line), _loop(), _stop()
    (first on the way out: the workers) and _stopped() (last: the ring, the stages,
    the logs). exp: build_exporters()'s, or None (a worker's: its parent serves)."""

    def __init__(self, opts, published, exp):
        self.opts, self.published = opts, published
        self.exp = exp if exp is not None else Exporters(*(None,) * len(Exporters._fields))
        self.pollers = []                # the stages' own threads (the process table)
        self.stop_requested = self.reload_requested = self.status_requested = False
        self.started = time.monotonic()
        self.stop_event = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        published.set_waker(self._wake)

    def _wake(self):
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass                         # already awake (full), or stopped (closed)

    def _on_signal(self, signum, frame):
        # Only flags: the loop acts on them. Logging here could re-enter a write to
        # stderr the main thread was in the middle of.
        if signum == signal.SIGHUP:
            self.reload_requested = True
        elif signum == signal.SIGUSR1:
            self.status_requested = True
        else:
            self.stop_requested = True

    def _threads(self):
        exp = self.exp
        threads = [threading.Thread(target=exp.metrics.serve_forever, name="metrics", daemon=True)] \
            if exp.metrics is not None else []
        for name, poller, on in (("mapping", exp.mapping, self.opts.mapping_url),
                                 ("geoip", exp.geo, True),
                                 *((p.name, p, True) for p in self.pollers),
                                 ("docker", exp.docker, True)):
            if poller is not None and on:
                threads.append(threading.Thread(target=poller.run, args=(self.stop_event,),
                                                name=name, daemon=True))
        return threads

    def run(self):
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        # Its default action kills lpd without cleanup (the socket file stays): a stray
        # kill -USR2, or a log rotator's, must not take the daemon down.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        self.poller = select.poll()
        self.poller.register(self._wake_r, select.POLLIN)
        exp, threads = self.exp, self._threads()
        try:
            self._start()
            for t in threads:
                t.start()
            if exp.rule_server:
                exp.rule_server.start()
            self._ready()
            sd_notify("READY=1")
            self._loop()
        finally:
            sd_notify("STOPPING=1")
            self._stop()
            self.stop_event.set()
            if exp.docker is not None:
                exp.docker.wake()
            if exp.metrics is not None:
                if threads[0].is_alive():
                    exp.metrics.shutdown()
                exp.metrics.server_close()
            if exp.rule_server:
                exp.rule_server.close()
            self._stopped()
            signal.set_wakeup_fd(old_wakeup)
            self.published.set_waker(lambda: None)
            os.close(self._wake_r)
            os.close(self._wake_w)
        return 0

    def _stop(self):
        """On the way out, before the exporters stop."""

    def _stopped(self):
        """On the way out, after the exporters stopped."""


class Adoption(NamedTuple):
    """What the capture thread adopts between two blocks: rules and local networks, the
    eBPF program built for them on the reload thread (None: the classic path, or not
    built yet), and the start of the line logged when they are adopted."""
    rules: object                      # a RuleCounter, or None (no rules)
    nets: list                         # the local networks (empty: the running ones stay)
    prepared: object = None            # KernelAccounting.prepare()'s, or None
    done: str = "reloaded"
    awaiting: bool = False             # compiled while the interface was awaited


class _Widening(NamedTuple):
    """New rules waiting for the frames the old snapshot length cut to drain."""
    rules: object
    deadline: float


class Reloader:
    """The reload state machine: new rules (a SIGHUP, or the interface back with another
    $MAC) or new interface networks, made ready on a thread of their own and adopted by
    the capture thread between two blocks. One at a time, in these states:

      idle       nothing under way.
      compiling  the reload thread runs a job (compile_rules, or InterfaceWatch.
                 prepare_nets): parsing, compiling, DNS, netlink, the eBPF program's
                 build and verification. A job that fails logs why and ends in idle:
                 the running configuration stays.
      pending    the job's Adoption waits in `pending`; advance() adopts it.
      widening   adopted rules that need a longer snapshot than the running ones: the
                 kernel program copies more already, and the frames it cut short (the
                 blocks queued then, or WIDEN_DRAIN_SECONDS with the kernel's block not
                 retired) drain through the old rules before the new ones count.

    `requested`: a reload is owed. start() begins one from idle only, so a request made
    in any other state runs once more afterwards, with the file as it is then.

    Threads: the reload thread runs only the job; its one write is `pending` (or
    `requested`, to run again), then it wakes the loop. Every other method is the
    capture thread's, which alone changes what counts and what is published (the rules
    stage, the kernel program, the local networks)."""

    def __init__(self, daemon, wake, compile_step=None):
        """daemon: the Daemon whose capture it changes; wake: wakes its loop (called on
        the reload thread); compile_step: the job a request runs, returning an Adoption
        or None (compile_rules; a test's fake)."""
        self.daemon, self.wake = daemon, wake
        self.compile_step = compile_step or self.compile_rules
        self.requested = False
        self.thread = None               # the reload thread, running or done
        self.pending = None              # an Adoption from the reload thread
        self.widening = None             # a _Widening while old frames drain
        self.widen_blocks = 0            # blocks queued at the widening, not yet read

    def idle(self):
        return (self.thread is None or not self.thread.is_alive()) and \
            self.pending is None and self.widening is None

    # -- the reload thread ------------------------------------------------------

    def compile_rules(self):
        """Everything slow (parsing, compiling, DNS, netlink). While the interface is
        awaited its networks stay as they are and $MAC is a stand-in:
        InterfaceWatch.appeared() reads both when it comes."""
        d = self.daemon
        if d.geo is not None:
            d.geo.reopen()
        awaiting = d.watch.awaiting
        try:
            rules = load_rules(d.opts, d.ifname, awaiting)
            nets = d.opts.local_nets or \
                (d.local.local_nets if awaiting else interface_local_nets(d.ifname))
        except Exception as e:            # whatever went wrong, the running rules stay
            reason = str(e) if isinstance(e, LpdError) else f"{type(e).__name__}: {e}"
            log(LOG_ERR, f"reload failed, keeping the running configuration: {reason}")
            return None
        if awaiting and not d.watch.awaiting:
            # The interface appeared meanwhile: these rules have the stand-in $MAC.
            self.requested = True
            return None
        prepared = None
        if d.kernel is not None:
            # Built, loaded and verified here: the capture thread only attaches it.
            try:
                prepared = d.kernel.prepare(rules, nets or d.local.local_nets)
            except (OSError, Untranslatable) as e:
                log(LOG_ERR, f"reload: eBPF program: {e}; keeping the running rules")
                return None
        return Adoption(rules, nets, prepared, awaiting=awaiting)

    def _run(self, job, *args):
        adoption = job(*args)
        if adoption is not None:
            self.pending = adoption
        self.wake()                       # a request that came meanwhile starts the next one

    # -- the capture thread -----------------------------------------------------

    def start(self):
        """A requested reload begins, from idle only (see `requested`)."""
        if not self.idle():
            return False
        self.requested = False
        self.run(self.compile_step)
        return True

    def run(self, job, *args):
        """job(*args) on the reload thread (the caller found idle()); its Adoption, if
        any, goes to `pending`."""
        self.thread = threading.Thread(target=self._run, args=(job, *args), name="reload",
                                       daemon=True)
        self.thread.start()

    def advance(self, now):
        """Between blocks: finish a widening whose old frames have drained, then adopt
        what is pending."""
        w, ring = self.widening, self.daemon.ring
        if w is not None and self.widen_blocks <= 1 and now >= w.deadline and \
                (ring is None or not ring.ready()):
            self.swap_rules(w.rules)      # the kernel's block holds no frame cut short
        if self.pending is not None and self.widening is None:
            self.adopt(self.pending)

    def adopt(self, adoption):
        """Between blocks: adopt `adoption`, in place of any pending one."""
        d = self.daemon
        kernel, local = d.kernel, d.local
        rules, nets, prepared, done, awaiting = adoption
        self.pending = None
        if awaiting and not d.watch.awaiting:
            # The interface appeared after compile_rules() looked (during a slow eBPF
            # prepare, say): these rules have the stand-in $MAC and no networks, and
            # appearing has installed the real ones. Compiled again, with them.
            if prepared is not None:
                kernel.discard(prepared)
            self.requested = True
            return
        if kernel is not None and prepared is None:   # not from the reload thread
            try:
                prepared = kernel.prepare(rules, nets or local.local_nets)
            except (OSError, Untranslatable) as e:
                log(LOG_ERR, f"reload: eBPF program: {e}; keeping the running rules")
                return
        if nets and nets != local.local_nets:
            local.set_local_nets(nets)
        log(LOG_INFO, f"{done}: {len(rules) if rules else 0} rules, {len(nets)} local networks")
        if kernel is not None:           # one program holds rules and networks: swap it whole
            try:
                kernel.swap(d.ring.sock if d.ring else None, prepared)
            except (OSError, Untranslatable) as e:
                log(LOG_ERR, f"reload: eBPF program: {e}; keeping the running rules")
                return
            d.rules = rules
            d.publish()
            return
        if rules is None:
            return
        new = max(SNAPLEN_ACCOUNTING, rules.snaplen())
        if d.ring is not None and new > d.decoder.snaplen():
            # Widen first, and let the frames already cut to the old length drain
            # through the old rules: a new rule must never judge a frame cut short.
            if not self._attach(new):
                log(LOG_ERR, "reload: keeping the running rules")
                return
            self.widen_blocks = d.ring.queued_blocks()
            self.widening = _Widening(rules, time.monotonic() + WIDEN_DRAIN_SECONDS)
            return
        self.swap_rules(rules)

    def block_read(self):
        """After each block read while widening."""
        self.widen_blocks -= 1
        if self.widen_blocks <= 0:
            self.swap_rules(self.widening.rules)

    def capture_lost(self):
        """The ring is closed, drained: no frame cut short is left."""
        if self.widening is not None:
            self.swap_rules(self.widening.rules)

    def swap_rules(self, rules):
        """Counts carried over and the stage swapped between two blocks: no frame is
        counted by the old set after its counts were copied."""
        d = self.daemon
        self.widening = None
        if d.rules is not None:          # else the first rules (-f --filter-file-optional)
            rules.carry_counts_from(d.rules)
        old = d.decoder.snaplen()
        d.rules = rules
        d.decoder.set_consumers(d.consumers())
        new = d.decoder.snaplen()
        if d.ring is not None and new < old:      # narrow last: old rules kept theirs
            self._attach(new)
        d.publish()

    def _attach(self, snaplen):
        d = self.daemon
        try:
            d.ring.attach(kernel_program(d.prefilter, snaplen, d.whole))
            return True
        except OSError as e:
            log(LOG_ERR, f"reload: cannot replace the kernel filter: {e.strerror}")
            return False


class InterfaceWatch:
    """The capture interface coming and going, checked once a second (check()): a ring
    is opened on it while it is there and up, closed when it goes (the counters stay),
    and opened again when it is back; its networks are read again when they change.
    States:

      awaiting   --wait-interface, and it was not there at start: no ring, $MAC a
                 stand-in, the networks unread. When it appears (appeared()) both are
                 read and the rules compiled again, before its first frame.
      capturing  a ring is open on it (Daemon.ring).
      lost       it went away, went down or was replaced, or the socket failed: the
                 ring was drained and closed, its drops kept in past_drops. A new ring
                 opens once it is back and up ("capturing again"); back with another
                 address, rules written with $MAC are reloaded.

    New networks under --engine ebpf need a new program: built by check() itself while
    no ring is open (no frame waits), else by prepare_nets on the reload thread and
    adopted between blocks, through the Reloader.

    Threads: prepare_nets runs on the reload thread; everything else on the capture
    thread."""

    def __init__(self, daemon, awaiting):
        """awaiting: --wait-interface and the interface was not there at start (whoever
        built the daemon's parts says so, from capture_interface())."""
        self.daemon = daemon
        self.awaiting = awaiting
        self.captured = False            # a ring was open once: a new one is "capturing again"
        self.mac = None                  # the interface's address when capture last opened
        self.past_drops = 0              # from rings closed when the interface went away

    def open(self):
        """A ring on the interface: at start-up, or once it is back."""
        d = self.daemon
        mac = interface_mac(d.ifname)
        if self.mac is not None and mac != self.mac and d.opts.filter_file and not d.opts.mac:
            # The interface came back as another device (a new USB NIC, a re-created
            # wg0): rules written with $MAC must name the new address.
            log(LOG_NOTICE, f"{d.ifname}: its address is now {mac}: reloading the rules")
            d.reloader.requested = True
        self.mac = mac
        d.open_ring()
        self.captured = True

    def lose(self, why):
        d = self.daemon
        log(LOG_WARNING, f"{d.ifname}: {why}; counters kept, retrying every second")
        ring = d.ring
        d.poller.unregister(ring.fileno())
        ring.drain(d.process_block)
        ring.close()                      # reads the kernel's last drop count
        self.past_drops += ring.drops     # one step for scrapes: the drop counter never dips
        d.ring = None
        d.reloader.capture_lost()
        d.publish()

    def appeared(self):
        """--wait-interface: what start-up would have read from the interface (its
        networks, its address as $MAC) read now, before its first frame."""
        d = self.daemon
        nets = d.opts.local_nets or interface_local_nets(d.ifname)
        try:
            rules = load_rules(d.opts, d.ifname)
        except LpdError as e:
            log(LOG_ERR, f"{e}; no rules until a SIGHUP loads a good file")
            rules = None
        self.awaiting = False
        d.reloader.adopt(Adoption(rules, nets, None, f"{d.ifname} appeared"))

    def check(self):
        d = self.daemon
        index, flags = interface_index(d.ifname), interface_flags(d.ifname)
        present = index is not None and flags is not None and flags & IFF_UP
        if self.awaiting and index is not None:
            try:
                self.appeared()
            except LpdError as e:             # gone again at once: the next check retries
                log(LOG_DEBUG, f"{d.ifname}: not yet: {e}")
        if d.ring is not None:
            d.ring.read_stats()
            if not present:
                self.lose("interface is gone or down")
            elif index != d.ring.ifindex:
                self.lose("interface was replaced")
        if d.ring is None and present:
            try:
                self.refresh_nets()
                again = " again" if self.captured else ""
                self.open()
                log(LOG_NOTICE, f"{d.ifname}: capturing{again}")
                d.publish()
            except LpdError as e:
                log(LOG_DEBUG, f"{d.ifname}: not yet: {e}")
        elif present and not d.local.local_nets:
            # An interface that came up before its addresses (DHCP on a new link):
            # no address is local until they are read.
            try:
                self.refresh_nets()
            except LpdError as e:
                log(LOG_DEBUG, f"{d.ifname}: no addresses yet: {e}")

    def refresh_nets(self):
        """The interface's networks read again (without --local-net); addresses may come
        back after the link, so an interface without any keeps the old ones."""
        d = self.daemon
        if d.opts.local_nets:
            return
        nets = interface_local_nets(d.ifname)
        if not nets or nets == d.local.local_nets:
            return
        if d.kernel is None:
            d.local.set_local_nets(nets)
        elif d.ring is None:
            # About to open a ring (no frame waits for this thread meanwhile), which must
            # count by these networks from its first frame: built here.
            try:
                d.kernel.swap(None, d.kernel.prepare(d.rules, nets))
            except (OSError, Untranslatable) as e:
                log(LOG_ERR, f"{d.ifname}: eBPF program for the new networks: {e}; "
                             "keeping the old ones")
                return
            d.local.set_local_nets(nets)
        elif d.reloader.idle():
            # Capturing: the program is built on the reload thread as a reload's is,
            # and adopted between blocks. Behind a running reload, the next check (a
            # second later) asks again.
            d.reloader.run(self.prepare_nets, d.rules, nets)

    def prepare_nets(self, rules, nets):
        """The reload thread, for new interface networks under --engine ebpf."""
        d = self.daemon
        try:
            prepared = d.kernel.prepare(rules, nets)
        except (OSError, Untranslatable) as e:
            log(LOG_ERR, f"{d.ifname}: eBPF program for the new networks: {e}; "
                         "keeping the old ones")
            return None
        return Adoption(rules, nets, prepared, f"{d.ifname}: new networks")


class Daemon(Lifecycle):
    """The capture loop in the main thread, wired from build_capture()'s and
    build_exporters()'s parts; HTTP, the pollers and the rule socket beside it. Reloads
    are the Reloader's (self.reloader), the interface's comings and goings the
    InterfaceWatch's (self.watch): both change the parts held here (the ring, the rules
    stage, the kernel program) from the loop, between blocks."""

    def __init__(self, opts, ifname, capture, published, exporters=None, logs=None,
                 awaiting=False):
        """capture: build_capture()'s parts; exporters: build_exporters()'s, or None (a
        worker's: its parent serves); logs: the stages' JSON logs by name (open_logs);
        awaiting: --wait-interface and the interface is not there yet."""
        super().__init__(opts, published, exporters)
        self.ifname = ifname
        self.decoder, self.local = capture.decoder, capture.decoder.local
        self.stages = dict(capture.stages)   # name -> stage, in STAGES' order (rules: see below)
        self.pollers = capture.pollers
        exp = self.exp
        self.mapping, self.geo, self.docker = exp.mapping, exp.geo, exp.docker
        self.rule_server, self.collector, self.metrics = exp.rule_server, exp.collector, exp.metrics
        tcp, udp, handshakes = whole_frames(self.stages.values())
        self.whole = whole_frames_program(tcp, udp, handshakes) if tcp or udp or handshakes else None
        self.logs = list((logs or {}).values())
        self.clock = 0.0                 # the packet clock (see now())
        self.covered = None              # when the ring last handed over blocks, since the tick
        self.stopped_for_duration = False
        self.prefilter = capture.prefilter
        self.ring = None                 # open while capturing (InterfaceWatch)
        self.fanout = None               # a worker's PACKET_FANOUT argument
        self.kernel = capture.kernel     # --engine ebpf: the KernelAccounting
        self.engine = capture.engine     # which counts, and why (the start-up line)
        self.control = {}                # fd -> handler, polled beside the ring (a worker's pipe)
        self.reloader = Reloader(self, self._wake)
        self.watch = InterfaceWatch(self, awaiting)

    # -- snapshots ------------------------------------------------------------

    @property
    def rules(self):
        """The rules stage as it is now (a reload swaps it), or None."""
        return self.stages.get(RuleCounter.name)

    @rules.setter
    def rules(self, rules):
        stages = dict(self.stages)
        stages[RuleCounter.name] = rules
        self.stages = {row.name: stages[row.name] for row in STAGES
                       if stages.get(row.name) is not None}

    def consumers(self):
        """The decoder's stages (decoder_stages), with the rules as they are now."""
        return decoder_stages(self.stages, self.kernel)

    def now(self):
        """The packet clock: the kernel's timestamp of the last frame drained, moving on
        with the wall clock while none comes, and never backwards."""
        self.clock = max(self.clock, self.decoder.time, time.time())
        return self.clock

    def publish(self, tables=True):
        """Every stage's snapshot; a socket dump's (tables=False) skips the address and
        remote tables, which can be large and which the dump does not show."""
        ring, kernel = self.ring, self.kernel
        latest = self.published.latest()
        drops = self.watch.past_drops + (ring.drops if ring else 0)
        snaps = {
            "time": self.now(),
            "interface": kernel.interface_snapshot(self.decoder.frames, drops, ring is not None)
            if kernel
            else self.decoder.snapshot(drops, ring is not None),
        }
        # No filter file: no rules stage (/api/rules 404s). The rules are always fresh
        # (the dump is theirs), and counted by the kernel where it counts.
        for name, stage in self.stages.items():
            if stage is self.rules and kernel:
                snaps[name] = kernel.rule_snapshot()
            elif tables or stage is self.rules or name not in latest:
                snaps[name] = stage.snapshot()
            else:
                snaps[name] = latest[name]
        self.published.publish(snaps)

    def tick(self):
        now = self.now()
        if self.kernel is not None:
            self.kernel.sync()
        covered, self.covered = self.covered, None
        self.local.tick(now, covered)
        for stage in self.stages.values():
            if stage is not self.local:
                stage.tick(now)
        if self.kernel is not None:
            self.kernel.expire()
        for log_ in self.logs:
            log_.flush()
        self.publish()

    # -- capture --------------------------------------------------------------

    def process_block(self, buf, base):
        self.decoder.process_block(buf, base)
        if self.reloader.widening is not None:
            self.reloader.block_read()

    def open_ring(self):
        """A ring on the interface, with the kernel program for what counts now."""
        self.ring = Ring(self.ifname, self.opts.ring_bytes,
                         kernel_program(self.prefilter, self.decoder.snaplen(), self.whole),
                         self.opts.promisc, self.fanout,
                         self.kernel.program_for if self.kernel else None)
        if not self.ring.vnet and self.decoder.vnet is not False:
            log(LOG_WARNING, f"{self.ifname}: the kernel gives no PACKET_VNET_HDR: a GSO/GRO "
                             "super-frame counts as one frame (turn offloads off for exact counts)")
        self.decoder.set_link(self.ring.vnet, self.ring.mtu)
        self.poller.register(self.ring.fileno(), select.POLLIN | select.POLLERR)

    # -- main loop ------------------------------------------------------------

    def status_line(self):
        return status_line(self.ifname, self.published.latest(), time.monotonic() - self.started)

    def _start(self):
        for fd in self.control:
            self.poller.register(fd, select.POLLIN)
        if self.watch.awaiting and not self.opts.worker_of:   # the parent says it, once
            log(LOG_WARNING, f"{self.ifname}: {WAITING_LINE}")
        else:
            self.watch.open()
        self.tick()

    def _ready(self):
        doing = "waiting for" if self.watch.awaiting else "capturing on"
        if self.metrics is not None:
            log(LOG_INFO, f"{doing} {self.ifname} ({self.engine}); metrics on "
                          f"http://{self.opts.listen[0]}:{self.opts.listen[1]}/metrics")
        else:
            log(LOG_DEBUG, f"{doing} {self.ifname} ({self.engine})")

    def _stopped(self):
        if self.ring is not None:
            self.ring.close()
        # Open connections end with capture, as in Zeek (every stage finishes: a
        # list, not any()'s short cut); a stage that ended some publishes them.
        if any([stage.finish() for stage in self.stages.values()]):
            self.publish()
        for log_ in self.logs:
            log_.close()

    def _loop(self):
        interval = self.opts.interval
        now = time.monotonic()
        next_tick, next_check = now + interval, now + INTERFACE_CHECK_PERIOD
        end = now + self.opts.duration if self.opts.duration else None
        while not self.stop_requested:
            due = min(next_tick, next_check)
            if end is not None:
                if now >= end:
                    self.finish_duration()
                    break
                due = min(due, end)
            if self.reloader.widening is not None:
                due = min(due, self.reloader.widening.deadline)
            behind = [stage for stage in self.decoder.consumers if stage.behind]
            if behind:
                due = now                 # drain the ring, then their next pass
            for fd, events in self.poller.poll(max(0.0, due - time.monotonic()) * 1000):
                if fd == self._wake_r:
                    while True:
                        try:
                            if not os.read(self._wake_r, 512):
                                break
                        except BlockingIOError:
                            break
                elif fd in self.control:
                    self.control[fd]()
                elif self.ring is not None and fd == self.ring.fileno() and events & select.POLLERR:
                    err = self.ring.socket_error()
                    self.watch.lose(os.strerror(err) if err else "socket error")
            # The kernel's own counts (--engine ebpf) are current at the tick: only
            # counts from the ring end at its last retired block.
            if self.ring is not None and self.ring.drain(self.process_block) and self.kernel is None:
                self.covered = time.time()
            now = time.monotonic()
            self.reloader.advance(now)
            if now >= next_check:
                self.watch.check()
                next_check = now + INTERFACE_CHECK_PERIOD
            if now >= next_tick:
                self.published.requested = False
                self.tick()
                next_tick = max(next_tick + interval, now + interval / 2)
            else:
                if behind:
                    clock = self.now()
                    for stage in behind:
                        stage.tick(clock)
                if self.published.requested:
                    self.published.requested = False
                    self.publish(tables=False)
            if self.reload_requested:         # SIGHUP: a reload is owed
                self.reload_requested, self.reloader.requested = False, True
            if self.reloader.requested and self.reloader.idle():
                for log_ in self.logs:
                    log_.reopen()
                self.reloader.start()
            if self.status_requested:
                self.status_requested = False
                log(LOG_INFO, self.status_line())

    def finish_duration(self):
        """--duration ran out: drain what the ring holds, then print the output."""
        if self.ring is not None:
            # The block the kernel is filling retires within RING_RETIRE_MS.
            time.sleep(2 * RING_RETIRE_MS / 1000)
            self.ring.drain(self.process_block)
        self.tick()
        self.stopped_for_duration = True


def capture_interface(opts):
    """(the capture interface, whether it is to be awaited): decided once, so the parts
    built from it agree even if it appears meanwhile."""
    ifname = opts.interface or default_interface()
    if interface_index(ifname) is not None:
        return ifname, False
    if not opts.wait_interface:
        raise ConfigError(f"{ifname}: no such interface (--wait-interface waits for it)")
    return ifname, True


class CaptureParts(NamedTuple):
    """What one capturing process counts with: the decoder and the stages it feeds."""
    decoder: object
    stages: dict                       # name -> stage, in STAGES' order (choose_stages)
    prefilter: object = None           # -F's kernel program, or None
    kernel: object = None              # KernelAccounting (--engine ebpf), or None
    engine: str = "engine cbpf"        # which engine counts, and why, for the log
    pollers: tuple = ()                # the stages' background Pollers (the process table)


def build_capture(opts, ifname, awaiting, names, logs):
    """Decoder and stages from the options; stage records go to logs (by stage name) and
    HTTP servers are named by names.name_of (None: no names). `awaiting`: the interface
    is not there yet, and what is read from it (networks, $MAC) is read when it comes."""
    rules = load_rules(opts, ifname, awaiting)
    # Compiled once, before anything is bound; only its accept length changes later.
    prefilter = compile_filter(opts.prefilter, kernel=True) if opts.prefilter else None
    nets = opts.local_nets or ([] if awaiting else interface_local_nets(ifname))
    if not nets and not awaiting:
        log(LOG_WARNING, f"{ifname}: no addresses and no --local-net: no address is local")
    pollers = []
    stages = choose_stages(opts, Wiring(nets, opts.idle_timeout or DEFAULT_IDLE_TIMEOUT,
                                        opts.local_max or DEFAULT_LOCAL_MAX, rules, logs, names,
                                        pollers))
    local, conns = stages[LocalAddresses.name], stages.get(Connections.name)
    kernel, engine = choose_engine(opts, local, rules,
                                   copy_plan(conns, stages.values()), prefilter,
                                   stages.get(RemoteAddresses.name))
    if kernel is not None and conns is not None:
        kernel.track(conns)
    decoder = Decoder(local, decoder_stages(stages, kernel),
                      vnet=None, counted=kernel is not None)   # the ring will tell
    return CaptureParts(decoder, stages, prefilter, kernel, engine, tuple(pollers))


def copy_plan(conns, stages):
    """What --engine ebpf copies of each frame for these stages (see CopyPlan); the
    remote addresses are counted in the kernel (emit_remote): nothing copied for them."""
    return CopyPlan(0, max(SNAPLEN_ACCOUNTING, conns.snaplen()) if conns else 0, *whole_frames(stages))


def ebpf_unsuitable(prefilter):
    """Why the options need the classic path, or None. prefilter: -F's kernel program."""
    if prefilter is not None:
        try:
            emit_rule(Gen(), prefilter, "F", 0, gate=Label("dropped"))
        except Untranslatable as e:
            return f"-F uses what the eBPF translation lacks ({e})"
    return None


def choose_engine(opts, local, rules, plan=CopyPlan(), prefilter=None, remotes=None):
    """The KernelAccounting for --engine ebpf (or auto where it can), else None (cbpf);
    says which in the log. plan: what the userspace stages read of each frame;
    prefilter: -F's kernel program; remotes: --remote's table, fed by the kernel."""
    why = ebpf_unsuitable(prefilter) if opts.engine != "cbpf" else "--engine cbpf"
    if why is None:
        why = ebpf_available()
    kernel = None
    if why is None:
        kernel = KernelAccounting(local, rules, plan, prefilter, remotes)
        try:
            kernel.program_for(False, None)          # verified now, not at the first bind
        except Untranslatable as e:
            why = f"a rule uses what the eBPF translation lacks ({e})"
        except OSError as e:             # the verifier's log follows its first line
            why = f"the kernel refused the program: {str(e).splitlines()[0]}"
        if why is not None:
            kernel.close()
            kernel = None
    if kernel is None and opts.engine == "ebpf":
        raise (type(why) if isinstance(why, LpdError) else ConfigError)(f"--engine ebpf: {why}")
    return kernel, "engine ebpf" if kernel else f"engine cbpf: {why}"


class Exporters(NamedTuple):
    """What publishes: the metrics port, the rule socket and the enrichment behind them."""
    mapping: object
    geo: object
    docker: object
    rule_server: object
    collector: object
    metrics: object                    # the metrics endpoint (MetricsServer), or None


def build_exporters(opts, ifname, published, docker):
    from prometheus_client import CollectorRegistry
    geo = open_geoip(opts)
    mapping = NicMapping(opts.mapping_url, ifname, log, opts.mapping_interval,
                         opts.mapping_configured)
    registry = CollectorRegistry(auto_describe=False)
    rule_server = None
    # --duration: a one-shot run beside the service makes no socket unless -u asks.
    if opts.socket_path or (opts.filter_file and not opts.duration):
        path = opts.socket_path or default_socket_path(ifname)
        rule_server = RuleSocketServer(path, functools.partial(rule_rows, published),
                                       opts.socket_group)
    collector = Collector(published, mapping, ifname, rule_server, geo, opts.export_threshold,
                          docker)
    registry.register(collector)
    try:
        metrics = make_metrics_server(*opts.listen, registry,
                                   functools.partial(api_answer, published=published,
                                                     presentation=collector.presentation)) \
            if opts.serve else None
    except LpdError:
        if rule_server:
            rule_server.close()
        raise
    return Exporters(mapping, geo, docker, rule_server, collector, metrics)


def build_daemon(opts):
    """Every part of a daemon, from the options; the Daemon itself builds none."""
    ifname, awaiting = capture_interface(opts)
    published = Published()
    docker = open_docker(opts)
    logs = open_logs(opts)
    cap = build_capture(opts, ifname, awaiting, docker, logs)
    exp = build_exporters(opts, ifname, published, docker)
    daemon = Daemon(opts, ifname, cap, published, exp, logs, awaiting)
    exp.collector.engine = "ebpf" if cap.kernel else "cbpf"
    return daemon


###############################################################################
# 20 Workers: one capture process per core behind PACKET_FANOUT ###############
###############################################################################
# provides: build_supervisor, run_worker
#
# --workers N: N worker processes each capture on a ring of one fanout group and run
# the decoder and stages; the parent owns every exporter (metrics port, rule socket,
# logs, NIC mapping, GeoIP, Docker). The kernel hashes each flow (both directions the
# same; fragments reassembled first) to one worker, so connection tracking and HTTP
# reassembly stay whole. A worker ships each publication (every --interval, and at
# once when the parent asks for a socket dump) with the log records made since, as
# one pickled message on a pipe; the parent publishes the merge (snapshots of a kind
# add up). Pipes rather than shared memory: a publication is a few hundred bytes to
# a few MB once per interval, pickling it costs the worker less than one interval's
# frames, and a pipe's end tells the parent when a worker died.

WORKER_MSG = struct.Struct("=I")   # length of the pickled message that follows
WORKER_READ_BYTES = 1 << 20
WORKER_STOP_GRACE = 10.0           # SIGTERM to SIGKILL for a worker that does not end
WORKER_RESTART_DELAY = 1.0         # a worker that dies at once must not spin the parent
WORKER_POLL = 0.2                  # the parent's loop period when nothing arrives
WORKER_START_TIMEOUT = 30.0        # for every worker's first publication (a large rule file)
PR_SET_PDEATHSIG = 1
SNAPSHOT_TYPES = {"interface": InterfaceSnapshot,
                  **{row.name: row.consumer.snapshot_type for row in STAGES}}


def send_message(fd, obj):
    """One length-prefixed pickle, written whole (the reader waits for all of it)."""
    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    view = memoryview(WORKER_MSG.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def take_messages(buf):
    """Complete messages at the front of buf (a bytearray), removed from it."""
    out = []
    while len(buf) >= WORKER_MSG.size:
        n = WORKER_MSG.unpack_from(buf)[0]
        if len(buf) < WORKER_MSG.size + n:
            break
        out.append(pickle.loads(bytes(buf[WORKER_MSG.size:WORKER_MSG.size + n])))
        del buf[:WORKER_MSG.size + n]
    return out


def plain_snapshots(snaps):
    """A publication as builtins only: parent and worker may know lpd under
    different module names (lpd, __main__)."""
    return {k: v if k == "time" else tuple(v) for k, v in snaps.items()}


def typed_snapshots(plain):
    return {k: v if k == "time" else SNAPSHOT_TYPES[k](*v) for k, v in plain.items()}


def merge_publications(pubs):
    merged = {}
    for pub in pubs:
        for k, v in pub.items():
            if k not in merged:
                merged[k] = v
            elif k == "time":
                merged[k] = max(merged[k], v)
            else:
                merged[k] = merged[k].merge(v)
    return merged


def retired(pub):
    """What stays of a dead worker's last publication: its counters. Its gauges (rates,
    open connections) ended with it: a snapshot that has any says what stays (retired())."""
    return {k: v.retired() if hasattr(v, "retired") else v for k, v in pub.items()}


class ShippedLog:
    """A worker's --conn-log / --http-log: records go to the parent with the next
    publication; the parent writes the file."""

    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

    def take(self):
        records, self.records = self.records, []
        return records

    def flush(self):
        pass

    reopen = close = flush


class ShippedNames:
    """The parent's container names, for a worker's HTTP stage."""

    def __init__(self):
        self.names = {}

    def name_of(self, raw):
        return self.names.get(raw, "")


class WorkerPublished(Published):
    """A worker's publications, each also shipped to the parent."""

    def __init__(self, fd, logs, engine):
        super().__init__()
        self.fd, self.logs, self.engine = fd, logs, engine
        self.answering = False           # the next publication answers a fresh request

    def publish(self, snapshots):
        super().publish(snapshots)
        fresh, self.answering = self.answering, False
        send_message(self.fd, {"snaps": plain_snapshots(snapshots), "fresh": fresh,
                               "engine": self.engine,
                               "logs": {k: log_.take() for k, log_ in self.logs.items()}})


def run_worker(opts):
    """One worker: the daemon's capture loop with no exporters; publications go to the
    parent, which it outlives by nothing (PR_SET_PDEATHSIG)."""
    index, group, control, data, parent = opts.worker_of
    LOG_NAME[0] = f"lpd worker {index}"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:           # the parent died before prctl took effect
        return 0
    if opts.workers_pin:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[index % len(cpus)]})
    ifname, awaiting = capture_interface(opts)
    logs = {row.name: ShippedLog() for row in STAGES if row.log_path(opts)}
    names = ShippedNames()
    cap = build_capture(opts, ifname, awaiting, names, logs)
    published = WorkerPublished(data, logs, "ebpf" if cap.kernel else "cbpf")
    opts.mapping_url = None              # the parent's
    daemon = Daemon(opts, ifname, cap, published, None, logs, awaiting)
    daemon.fanout = group | (PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG) << 16
    buf = bytearray()

    def from_parent():
        try:
            chunk = os.read(control, WORKER_READ_BYTES)
        except BlockingIOError:
            return
        if not chunk:                    # the parent is gone
            daemon.stop_requested = True
            daemon.poller.unregister(control)
            return
        buf.extend(chunk)
        for msg in take_messages(buf):
            if msg.get("fresh"):
                published.answering = published.requested = True
            if "names" in msg:
                names.names = msg["names"]
    os.set_blocking(control, False)
    daemon.control[control] = from_parent
    return daemon.run()


class WorkerProc:
    """The parent's view of one worker."""

    def __init__(self, index, proc, control, data):
        self.index, self.proc, self.control, self.data = index, proc, control, data
        self.buf = bytearray()
        self.latest = {}                 # its last publication (typed)
        self.eof = False


class Supervisor(Lifecycle):
    """--workers N: the parent. Spawns and restarts the workers, merges what they
    publish, and runs the exporters on the merge."""

    def __init__(self, opts, argv, ifname, published, exp, logs):
        super().__init__(opts, published, exp)
        self.argv, self.ifname = argv, ifname
        self.collector = exp.collector
        self.logs = logs                 # stage name -> its JSON log (open_logs)
        self.workers = {}
        self.base = {}                   # what dead workers counted
        self.restarts = 0
        self.respawn = {}                # index -> monotonic time to start it again
        self.group = os.getpid() & PACKET_FANOUT_GROUP_MASK
        self.stopping = False
        self.fresh_pending = set()
        self.fresh_deadline = 0.0
        self.names_sent = None
        self.stopped_for_duration = False
        self.awaiting = False            # the interface is not there yet (build_supervisor)
        self.engines = {}                # worker index -> the engine it counts with

    def spawn(self, index):
        control_r, control_w = os.pipe2(os.O_CLOEXEC)
        data_r, data_w = os.pipe2(os.O_CLOEXEC)
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        argv = [sys.executable, os.path.abspath(__file__), *self.argv, "--worker-of",
                f"{index},{self.group},{control_r},{data_w},{os.getpid()}"]
        try:
            proc = subprocess.Popen(argv, pass_fds=(control_r, data_w), env=env)
        finally:
            os.close(control_r)
            os.close(data_w)
        os.set_blocking(data_r, False)
        w = self.workers[index] = WorkerProc(index, proc, control_w, data_r)
        self.poller.register(data_r, select.POLLIN)
        if self.exp.docker is not None:
            self._tell(w, {"names": self.exp.docker.names})

    def _tell(self, w, msg):
        try:
            send_message(w.control, msg)
        except OSError:
            pass                         # it is dying: its pipe's end will say so

    def engine_chosen(self, index, engine):
        """lpd_build_info{engine} is what the workers count with; the same options give
        them the same, unless one fell back (it says why in its own line)."""
        self.engines[index] = engine
        chosen = set(self.engines.values())
        if len(chosen) > 1:
            log(LOG_WARNING, f"workers count with different engines: {', '.join(sorted(chosen))}")
        self.exp.collector.engine = "+".join(sorted(chosen))

    def _read(self, w):
        while True:
            try:
                chunk = os.read(w.data, WORKER_READ_BYTES)
            except BlockingIOError:
                break
            if not chunk:
                w.eof = True
                self.poller.unregister(w.data)
                break
            w.buf.extend(chunk)
        for msg in take_messages(w.buf):
            w.latest = typed_snapshots(msg["snaps"])
            if self.engines.get(w.index) != msg["engine"]:
                self.engine_chosen(w.index, msg["engine"])
            for name, records in msg["logs"].items():
                log_ = self.logs.get(name)
                for rec in records if log_ is not None else ():
                    log_.write(rec)
            if msg["fresh"]:
                self.fresh_pending.discard(w.index)
            if not self.fresh_pending:
                self.publish()

    def publish(self):
        live = [w.latest for w in self.workers.values() if w.latest]
        merged = merge_publications([self.base] + live if self.base else live)
        merged["workers"] = tuple((w.index, w.latest["interface"].frames, w.latest["interface"].drops)
                                  for w in sorted(self.workers.values(), key=lambda w: w.index)
                                  if "interface" in w.latest)
        merged["worker_restarts"] = self.restarts
        self.published.publish(merged)
        for log_ in self.logs.values():
            log_.flush()

    def _reap(self, w):
        """A worker's pipe ended: gone for good (stopping), or restarted."""
        code = w.proc.wait()
        os.close(w.data)
        os.close(w.control)
        del self.workers[w.index]
        self.fresh_pending.discard(w.index)
        # stopped, or its --duration ran out: its last publication stands whole
        ended = self.stopping or (self.opts.duration and code == 0)
        if w.latest:
            kept = w.latest if ended else retired(w.latest)
            self.base = merge_publications([self.base, kept]) if self.base else kept
        if ended:
            return
        self.restarts += 1
        log(LOG_WARNING, f"worker {w.index} (pid {w.proc.pid}) ended "
                         f"({'signal ' + str(-code) if code < 0 else 'exit ' + str(code)}); "
                         f"its counts since its last publication are lost; restarting it")
        self.respawn[w.index] = time.monotonic() + WORKER_RESTART_DELAY

    def _signal_workers(self, sig):
        for w in self.workers.values():
            try:
                w.proc.send_signal(sig)
            except OSError:
                pass

    def _start(self):
        for i in range(self.opts.workers):
            self.spawn(i)
        # Ready (and scraped) once every worker captures: its first publication
        # comes after its ring is bound.
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while time.monotonic() < deadline and not self.stop_requested and \
                not all(w.latest for w in self.workers.values()):
            self._poll(WORKER_POLL)
        self.publish()

    def _ready(self):
        serving = f"; metrics on http://{self.opts.listen[0]}:{self.opts.listen[1]}/metrics" \
            if self.exp.metrics else ""
        if self.awaiting:
            log(LOG_WARNING, f"{self.ifname}: {WAITING_LINE}")
        doing = "waiting for" if self.awaiting else "capturing on"
        log(LOG_INFO, f"{doing} {self.ifname} with {self.opts.workers} workers{serving}")

    def _stop(self):
        self.stopping = True
        self._stop_workers()
        self.publish()

    def _stopped(self):
        for log_ in self.logs.values():
            log_.close()

    def _stop_workers(self):
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_GRACE
        while self.workers and time.monotonic() < deadline:
            self._poll(min(WORKER_POLL, max(0.0, deadline - time.monotonic())))
        self._signal_workers(signal.SIGKILL)
        for w in list(self.workers.values()):
            self._read(w)
            self._reap(w)

    def _poll(self, timeout):
        by_fd = {w.data: w for w in self.workers.values()}
        for fd, _ in self.poller.poll(timeout * 1000):
            if fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            elif fd in by_fd:
                self._read(by_fd[fd])
        for w in list(self.workers.values()):
            if w.eof:
                self._reap(w)

    def _loop(self):
        while not self.stop_requested:
            self._poll(WORKER_POLL)
            now = time.monotonic()
            for index, when in list(self.respawn.items()):
                if now >= when:
                    del self.respawn[index]
                    self.spawn(index)
            if self.opts.duration and not self.workers and not self.respawn:
                self.stopped_for_duration = True
                break
            if self.published.requested and not self.fresh_pending:
                self.published.requested = False
                self.fresh_pending = set(self.workers)
                self.fresh_deadline = now + SOCKET_FRESH_TIMEOUT / 2
                for w in self.workers.values():
                    self._tell(w, {"fresh": True})
            elif self.fresh_pending and now >= self.fresh_deadline:
                self.fresh_pending = set()   # a worker that does not answer: what we have
                self.publish()
            docker = self.exp.docker
            if docker is not None and docker.names is not self.names_sent:
                self.names_sent = docker.names
                for w in self.workers.values():
                    self._tell(w, {"names": docker.names})
            if self.reload_requested:
                self.reload_requested = False
                for log_ in self.logs.values():
                    log_.reopen()
                if self.exp.geo is not None:
                    self.exp.geo.reopen()
                self._signal_workers(signal.SIGHUP)
            if self.status_requested:
                self.status_requested = False
                log(LOG_INFO, status_line(self.ifname, self.published.latest(),
                                          time.monotonic() - self.started))


def build_supervisor(opts, argv):
    ifname, awaiting = capture_interface(opts)
    load_rules(opts, ifname, awaiting)       # a bad file is the parent's error, once
    published = Published()
    docker = open_docker(opts)
    logs = open_logs(opts)
    exp = build_exporters(opts, ifname, published, docker)
    supervisor = Supervisor(opts, argv, ifname, published, exp, logs)
    supervisor.awaiting = awaiting
    return supervisor


###############################################################################
# 21 Offline replay and filter dumps ##########################################
###############################################################################
# provides: dump_filter, replay, write_output

EVERY_ADDRESS = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def replay_local_nets(opts):
    """A replay's local networks: --local-net, else -i's, else every address (a replay
    prints every address: its table is the output) but with --remote, where that
    would leave no address remote."""
    if opts.local_nets:
        return opts.local_nets
    if opts.interface:
        return interface_local_nets(opts.interface)
    if opts.remote:
        raise UsageError("-r with --remote needs --local-net (or -i): which addresses are local")
    return EVERY_ADDRESS


def replay(opts, out=sys.stdout):
    """-r FILE: the same decode, consumers and exporters as live capture, on the packet
    clock: stages tick every --interval of the file's own time, so rates and idle
    timeouts come out the same on every run. Then the output (--output)."""
    # $MAC names the capture interface's address (or --mac): never a made-up one.
    rules = load_rules(opts, opts.interface)
    nets = replay_local_nets(opts)
    geo = open_geoip(opts)
    logs = open_logs(opts)
    docker = open_docker(opts, replaying=True)
    if docker is not None:
        docker.fetch_once()                   # the names as they are now (a warning if none)
    # Every address kept, never idle: the table is the output. No process table: the
    # sockets of a recorded capture are gone.
    stages = choose_stages(opts, Wiring(nets, opts.idle_timeout or math.inf,
                                        opts.local_max or sys.maxsize, rules, logs, docker))
    local = stages[LocalAddresses.name]
    decoder = Decoder(local, decoder_stages(stages))
    ticking = tuple(stages.values())
    grid = []                                # [start, end of the current interval]

    def tick(now):
        for stage in ticking:
            stage.tick(now)

    def process(buf, base):
        first = BLOCK_TS_FIRST.unpack_from(buf, base + BLOCK_TS_FIRST_OFF)
        first = first[0] + first[1] * 1e-9
        if not grid:
            grid[:] = [first, first + opts.interval]
            tick(first)
        elif first >= grid[1]:               # a new interval: close the ones before it
            grid[1] = grid[0] + (math.floor((first - grid[0]) / opts.interval)) * opts.interval
            tick(grid[1])
            grid[1] += opts.interval
        decoder.process_block(buf, base)
    PcapSource(opts.read_file, opts.interval).drain(process)
    if grid:
        tick(grid[1])                         # the end of the file closes the last interval
    for stage in stages.values():
        stage.finish()                        # the end of the capture ends every connection
    for log_ in logs.values():
        log_.close()
    published = Published()
    published.publish({"time": decoder.time, "interface": decoder.snapshot(up=True),
                       **{name: stage.snapshot() for name, stage in stages.items()}})
    nic = opts.interface or os.path.basename(opts.read_file)
    collector = Collector(published, NicMapping(None, nic, log), nic, geo=geo,
                          threshold=opts.export_threshold, docker=docker)
    write_output(opts.output, published, collector, out)
    if local.evictions:
        log(LOG_WARNING, f"{opts.read_file}: {local.evictions} addresses evicted by "
                         f"--local-max {opts.local_max}: the table lacks them")
    return 0


def write_output(kind, published, collector, out):
    """--output of -r and --duration: the table, the exposition a scrape would get now
    (the live collector's own code), or every /api document in one JSON object."""
    if kind == "metrics":
        from prometheus_client import CollectorRegistry, generate_latest
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        out.write(generate_latest(registry).decode())
        return
    docs = all_documents(published.latest(), collector.presentation())
    if kind == "json":
        out.write(json.dumps(docs, ensure_ascii=False, indent=1) + "\n")
    else:
        out.write(format_table(docs))


def dump_filter(opts, out=sys.stdout):
    """-d/-dd/-ddd EXPR: the program in tcpdump's formats (with --http: the kernel
    program a daemon attaches)."""
    expr = " ".join(opts.expression)
    if opts.engine == "ebpf":
        # the socket program a daemon attaches, with EXPR as its one rule (map fds as 0:
        # nothing is loaded to print it)
        slots = overflow_slots(opts.local_max or DEFAULT_LOCAL_MAX)
        maps = {k: types.SimpleNamespace(fd=0, max_entries=slots) for k in MAP_NAMES}
        rules = [compile_filter(expr)] if expr else []
        image, labels = build_program(maps, opts.local_nets or (), rules, True, 0, None)
        out.write(disassemble(image, labels))
        return 0
    if opts.http or opts.names:
        # the program a daemon with --http or --names attaches: EXPR as -F, their ports
        # returned whole
        prefilter = compile_filter(expr, kernel=True) if expr else None
        prog = kernel_program(prefilter, SNAPLEN_ACCOUNTING,
                              whole_frames_program(
                                  tuple(opts.http_ports if opts.http else ()) +
                                  ((DNS_PORT,) if opts.names else ()),
                                  names_ports(opts) if opts.names else (), opts.names))
    else:
        prog = compile_filter(expr, kernel=opts.kernel)
    out.write(format_program(prog, min(opts.dump, 3)))
    return 0


###############################################################################
# 22 Operator view: lpd top ###################################################
###############################################################################
# provides: top_main
#
# A terminal view of a running lpd, built on its /api/* documents only: no capture,
# no privileges, any number of them beside the daemon. Rates of cumulative counters
# (remotes, rules, connections, HTTP requests) come from the difference of two fetches;
# the local addresses carry the daemon's own per-interval rates. curses draws what
# frame() returns: plain lines, so --once prints exactly what the screen would show.
#
# Whatever answers on --url is untrusted: each answer is read under a size cap and one
# deadline per fetch, decoded with bounded nesting and numbers, and checked against
# TOP_SCHEMA before a pane looks at it. What fails becomes one short reason on screen
# ("lpd answered garbage: ..." or "stopped answering"), never a traceback, and the
# panes keep the last good answer, dimmed.

TOP_REFRESH = 1.0                  # s between fetches
TOP_REFRESH_POLL = 0.1             # s: how often keys are read between fetches
TOP_TIMEOUT = 3.0                  # s for one fetch: every document, connect to last byte
TOP_MAX_ANSWER = 4 << 20           # bytes of one answer (head and body) read at most
TOP_READ_CHUNK = 64 << 10          # bytes asked of one recv()
# Rows asked of each document (?top=N): more than a screen holds, and what keeps a
# daemon with 262144 connections from answering 100 MB. Sorting by rate or name then
# orders the N biggest by bytes (the daemon ranks by bytes).
TOP_FETCH_ROWS = 200
TOP_INT_DIGITS = 24                # a longer integer is no counter (2**64 has 20 digits)
TOP_REASON_MAX = 120               # characters of a failure's reason kept
TOP_VALUE_SHOWN = 30               # characters of a wrong value a reason quotes
TOP_HISTORY = 20                   # samples behind each address's bar
TOP_BAR = " .:-=+*#%@"             # ASCII levels: a bar that any terminal shows
TOP_KINDS = ("interface", "addresses", "remotes", "rules", "connections", "http")
TOP_REQUIRED = ("interface", "addresses")   # every lpd serves these; the rest may be off (404)
TOP_PANES = ("addresses", "remotes", "rules", "connections", "http")
TOP_SORTS = ("rate", "total", "name")
# What each sort orders a pane by, as its title says.
TOP_SORT_LABELS = {
    "addresses": {"rate": "tx+rx bit/s", "total": "tx+rx bytes", "name": "address"},
    "remotes": {"rate": "bit/s", "total": "bytes", "name": "address"},
    "rules": {"rate": "bit/s", "total": "bytes", "name": "rule"},
    "connections": {"rate": "bit/s", "total": "bytes", "name": "originator"},
    "http": {"rate": "req/s", "total": "requests", "name": "server"},
    "rpc": {"rate": "calls/s", "total": "calls", "name": "server"},
}
# What a pane whose document the daemon does not serve (404: the stage is off) shows.
TOP_OFF = {
    "remotes": "remote addresses: off (lpd --remote)",
    "rules": "rules: none (lpd -f FILTERFILE)",
    "connections": "connections: off (lpd --connections)",
    "http": "HTTP: off (lpd --http)",
}
TOP_KEYS = "keys: 1-5/Tab pane  s sort  p pause  q quit"
TOP_ONCE_ROWS = 10                 # --once: the biggest rows of each pane
# gRPC servers (the HTTP pane, below the HTTP servers): each server's row, then a line of
# its statuses other than OK and a line of its busiest methods (at most this many; the
# screen's width cuts the line as it cuts any).
TOP_RPC_METHODS = 5
# A remote's name (--names) is cut to this many characters, its left end first: the
# registered domain is at the right, and the pane keeps room for an IPv6 address (39),
# rate, total, country and ISP on a 132-column terminal.
TOP_NAME_WIDTH = 32
TOP_NAME_CUT = ".."                # what stands for the left end cut off (ASCII)
TOP_CLOCK = "%H:%M:%S"             # local time on screen
# A listen-on-all address names this machine: reached on loopback, as localhost is.
TOP_UNSPECIFIED = ("", "::", "0.0.0.0")
TOP_HOST = re.compile(r"[A-Za-z0-9._:%-]*")   # what may go into a Host header as it is
TOP_HTTP_PORT = 80
SI_STEP = 1000
BIT_UNITS = ("bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s")

# frame()'s line roles; the screen gives each its attributes.
TOP_ALERT, TOP_TITLE, TOP_STATUS, TOP_PANE, TOP_KEYLINE = "alert", "title", "status", "pane", "keys"
TOP_ATTRS = {TOP_ALERT: ("A_BOLD", "A_REVERSE"), TOP_TITLE: ("A_BOLD",), TOP_KEYLINE: ("A_REVERSE",)}


class TopError(LpdError):
    """The daemon cannot be shown; `reason` is short enough for one screen line."""

    def __init__(self, reason):
        self.reason = str(reason)[:TOP_REASON_MAX]
        super().__init__(self.reason)


class TopDown(TopError):
    """Nothing answers at --url: refused, reset, or no whole answer in time."""

    def __str__(self):
        return f"not answering ({self.reason})"


class TopGarbage(TopError):
    """Something answers at --url, but not with lpd's documents."""

    def __str__(self):
        return f"lpd answered garbage: {self.reason}"


def human_bits(bps):
    """1234567 -> '1.23 Mbit/s' (SI, as link speeds are said)."""
    value, unit = scaled(bps, SI_STEP, BIT_UNITS)
    return f"{value:.0f} {BIT_UNITS[unit]}" if unit == 0 else f"{value:.2f} {BIT_UNITS[unit]}"


# -- where the daemon is ------------------------------------------------------------

class TopTarget(NamedTuple):
    hosts: tuple                       # addresses (or one name) tried in turn
    port: int
    host_header: str
    prefix: str                        # path before /api/ (a daemon behind a proxy)
    label: str                         # --url as the operator wrote it


def top_hosts(host):
    """The addresses to try for a host of --url: loopback for localhost (RFC 6761: no
    resolver asked) and for a listen-on-all address; anything else as it is."""
    if is_localhost(host) or host in TOP_UNSPECIFIED:
        return tuple(address for _, address in LOOPBACK_ADDRESSES)
    return (host,)


def top_target(text):
    """--url: 'http://HOST:PORT[/prefix]', or HOST:PORT as --web.listen-address takes it
    ('localhost:59122', ':59122', '[::1]:59122')."""
    if "://" in text:
        parts = urllib.parse.urlsplit(text)
        try:
            port = parts.port or TOP_HTTP_PORT
        except ValueError:
            raise UsageError(f"--url: bad port in {text!r}") from None
        if parts.scheme != "http" or not parts.hostname:
            raise UsageError(f"--url: expected http://HOST:PORT (lpd serves plain HTTP), got {text!r}")
        host, prefix = parts.hostname, urllib.parse.quote(parts.path.rstrip("/"), safe="/%")
    else:
        try:
            host, port = parse_listen_address(text)
        except UsageError:
            raise UsageError(f"--url: expected HOST:PORT or http://HOST:PORT, got {text!r}") from None
        prefix = ""
    if not TOP_HOST.fullmatch(host):
        raise UsageError(f"--url: bad host {host!r}")
    shown = "localhost" if host in TOP_UNSPECIFIED else f"[{host}]" if ":" in host else host
    return TopTarget(top_hosts(host), port, f"{shown}:{port}", prefix, text.rstrip("/"))


# -- one bounded GET -----------------------------------------------------------------

def resolve_within(host, port, timeout):
    """getaddrinfo's addresses for a name within `timeout`: the resolver has no timeout of
    its own (a dead DNS server holds it 5 s a try), so it asks on a daemon thread left
    behind if it has not answered (socket.timeout)."""
    answer = []

    def ask():
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            answer.append(e)
    asking = threading.Thread(target=ask, name="resolve", daemon=True)
    asking.start()
    asking.join(timeout)
    if not answer:
        raise socket.timeout(f"{host}: the resolver did not answer in time")
    if isinstance(answer[0], OSError):
        raise answer[0]
    return [(family, address) for family, _, _, _, address in answer[0]]


def _connect(host, port, timeout):
    """A connected socket, within `timeout` whatever the resolver does: an address
    literal goes straight to connect(), a name through resolve_within()."""
    deadline = time.monotonic() + timeout
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        addresses = [(family, (host, port))]
    except ValueError:
        addresses = resolve_within(host, port, timeout)
    error = OSError(f"{host}: no address")
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(address)
            return sock
        except socket.timeout:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            error = e
    raise error


def _left(deadline):
    """Seconds until `deadline`; socket.timeout once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("deadline")
    return left


def top_connect(target, deadline):
    """A socket to the first of the target's hosts that accepts (localhost: 127.0.0.1, or
    ::1 where only that listens). socket.timeout past the deadline, TopDown when none accepts."""
    errors = {}                          # reason -> the hosts that gave it
    for host in target.hosts:
        try:
            return _connect(host, target.port, _left(deadline))
        except socket.timeout:
            raise
        except OSError as e:
            errors.setdefault(e.strerror or str(e), []).append(host)
    raise TopDown("; ".join(f"{', '.join(hosts)}: {reason}" for reason, hosts in errors.items()))


def top_read(sock, deadline, cap):
    """Everything the peer sends until it closes: at most `cap` bytes (TopGarbage past it),
    each recv() waiting only as long as the deadline leaves (socket.timeout past it)."""
    parts, size = [], 0
    while True:
        sock.settimeout(_left(deadline))
        data = sock.recv(TOP_READ_CHUNK)
        if not data:
            return b"".join(parts)
        size += len(data)
        if size > cap:
            raise TopGarbage(f"an answer larger than {human_bytes(cap)}")
        parts.append(data)


class _Received:
    """A whole answer, as http.client reads one from a socket."""

    def __init__(self, raw):
        self.raw = raw

    def makefile(self, *args, **kwargs):
        import io
        return io.BytesIO(self.raw)


def top_parse_answer(raw):
    """(status, body) of one whole HTTP answer."""
    if not raw:
        raise TopDown("connection closed without an answer")
    resp = http.client.HTTPResponse(_Received(raw))
    try:
        resp.begin()
        return resp.status, resp.read()
    except (http.client.HTTPException, ValueError) as e:
        raise TopGarbage(f"not HTTP ({type(e).__name__})") from None


def top_get(target, path, deadline, cap=TOP_MAX_ANSWER):
    """(status, body) of GET `path`: TopDown when nothing answers, socket.timeout when
    the answer is not whole by the deadline, TopGarbage for one past `cap` or no HTTP."""
    with top_connect(target, deadline) as sock:
        request = (f"GET {path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
                   f"Accept: application/json\r\nConnection: close\r\n\r\n")
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(request.encode("ascii"))
            raw = top_read(sock, deadline, cap)
        except socket.timeout:
            raise
        except OSError as e:                  # reset: the daemon died while answering
            raise TopDown(e.strerror or e) from None
    return top_parse_answer(raw)


# -- what an answer must be ----------------------------------------------------------

class TopKind(NamedTuple):
    """A leaf of TOP_SCHEMA: what it is called in a reason, and its test."""
    what: str
    test: Callable


class TopOptional(NamedTuple):
    """A field that may be absent (a stage option the daemon runs without: `name` needs
    --names), and is `spec` when there."""
    spec: object


class TopMap(NamedTuple):
    """An object of any keys whose every value is `value` (HTTP servers, states)."""
    value: object


def _count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _rate(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


TOP_COUNT = TopKind("a whole number >= 0", _count)
TOP_RATE = TopKind("a finite number >= 0", _rate)
TOP_TEXT = TopKind("a string", lambda v: isinstance(v, str))
TOP_FLAG = TopKind("true or false", lambda v: isinstance(v, bool))
TOP_MAYBE_TEXT = TopKind("a string or null", lambda v: v is None or isinstance(v, str))
TOP_MAYBE_COUNT = TopKind("a whole number or null", lambda v: v is None or _count(v))

# The fields the panes read, per document: {field: spec} is an object with at least
# these fields, [spec] an array of spec. Other fields are not looked at (a newer lpd
# may add some).
TOP_SCHEMA = {
    "interface": {"nic": TOP_TEXT, "up": TOP_FLAG, "tx_bytes": TOP_COUNT, "rx_bytes": TOP_COUNT,
                  "drops": TOP_COUNT},
    "addresses": {"tracked": TOP_COUNT, "addresses": [
        {"address": TOP_TEXT, "tx_bytes": TOP_COUNT, "rx_bytes": TOP_COUNT, "tx_bps": TOP_RATE,
         "rx_bps": TOP_RATE}]},
    "remotes": {"tracked": TOP_COUNT, "remotes": [
        {"address": TOP_TEXT, "tx_bytes": TOP_COUNT, "rx_bytes": TOP_COUNT, "country": TOP_TEXT,
         "isp": TOP_TEXT, "name": TopOptional(TOP_TEXT)}]},
    "rules": {"rules": [{"id": TOP_TEXT, "bytes": TOP_COUNT, "packets": TOP_COUNT}]},
    "connections": {"open": TOP_COUNT, "counts": TopMap(TopMap(TOP_COUNT)), "connections": [
        {"proto": TOP_TEXT, "orig_h": TOP_TEXT, "orig_p": TOP_COUNT, "resp_h": TOP_TEXT,
         "resp_p": TOP_COUNT, "state": TOP_TEXT, "orig_wire_bytes": TOP_COUNT,
         "resp_wire_bytes": TOP_COUNT, "pid": TOP_MAYBE_COUNT, "comm": TOP_MAYBE_TEXT}]},
    "http": {"servers": TopMap({"requests": TOP_COUNT, "errors": TOP_COUNT, "p50": TOP_RATE,
                                "p95": TOP_RATE}),
             # gRPC calls per server (an lpd before HTTP/2 sends no "rpc")
             "rpc": TopOptional(TopMap({"calls": TOP_COUNT, "errors": TOP_COUNT,
                                        "statuses": TopMap(TOP_COUNT), "p50": TOP_RATE,
                                        "p95": TOP_RATE, "p99": TOP_RATE,
                                        "methods": TopMap(TOP_COUNT)}))},
}


def _json_type(v):
    """How a reason names a value: its JSON type, and a scalar's text."""
    if isinstance(v, (dict, list)):
        return f"{'an object' if isinstance(v, dict) else 'an array'} of {len(v)}"
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    kind = "a string" if isinstance(v, str) else "a number"
    text = repr(v)
    return f"{kind} {text if len(text) <= TOP_VALUE_SHOWN else text[:TOP_VALUE_SHOWN] + '...'}"


def top_shape_error(value, spec, where):
    """Where `value` departs from `spec`, as 'where: expected ..., got ...'; None where it
    does not. Recurses as deep as the schema, never as deep as the value."""
    if isinstance(spec, TopKind):
        return None if spec.test(value) else f"{where}: expected {spec.what}, got {_json_type(value)}"
    want = list if isinstance(spec, list) else dict
    if not isinstance(value, want):
        return f"{where}: expected {'an array' if want is list else 'an object'}, got {_json_type(value)}"
    if isinstance(spec, list):
        items = ((f"{where}[{i}]", v, spec[0]) for i, v in enumerate(value))
    elif isinstance(spec, TopMap):
        items = ((f"{where}[{k!r}]", v, spec.value) for k, v in value.items())
    else:
        missing = [name for name, sub in spec.items()
                   if name not in value and not isinstance(sub, TopOptional)]
        if missing:
            return f"{where}.{missing[0]}: missing"
        items = ((f"{where}.{name}", value[name], sub.spec if isinstance(sub, TopOptional) else sub)
                 for name, sub in spec.items() if name in value)
    return next((e for e in (top_shape_error(v, sub, w) for w, v, sub in items) if e), None)


def _bounded_int(text):
    # int() of a megabyte of digits takes minutes on Python 3.9 (3.11 refuses it)
    if len(text) > TOP_INT_DIGITS:
        raise ValueError(f"a {len(text)}-digit number")
    return int(text)


def _no_constant(name):
    raise ValueError(f"{name} is no JSON number")


def top_decode(body):
    """JSON, with NaN, Infinity and huge integers refused; TopGarbage for anything else."""
    try:
        return json.loads(body, parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError:            # json's own limit on nesting ([[[[...]]]])
        raise TopGarbage("JSON nested too deep") from None
    except ValueError as e:           # JSONDecodeError, UnicodeDecodeError, the hooks'
        raise TopGarbage(f"not JSON ({e})") from None


def top_document(kind, status, body):
    """A document the panes can read, or None for a stage that is off (404)."""
    if status == http.HTTPStatus.NOT_FOUND and kind not in TOP_REQUIRED:
        return None
    if status != http.HTTPStatus.OK:
        raise TopGarbage(f"/api/{kind}: HTTP {status}")
    try:
        doc = top_decode(body)
    except TopGarbage as e:
        raise TopGarbage(f"/api/{kind}: {e.reason}") from None
    error = top_shape_error(doc, TOP_SCHEMA[kind], kind)
    if error:
        raise TopGarbage(f"/api/{kind}: {error}")
    return doc


def top_fetch(target, timeout=TOP_TIMEOUT, cap=TOP_MAX_ANSWER):
    """{kind: checked document or None (that stage is off)}, all within `timeout`;
    TopDown or TopGarbage otherwise."""
    deadline = time.monotonic() + timeout
    docs = {}
    for kind in TOP_KINDS:
        try:
            status, body = top_get(target, f"{target.prefix}/api/{kind}?top={TOP_FETCH_ROWS}",
                                   deadline, cap)
        except socket.timeout:
            raise TopDown(f"no whole answer within {timeout:g} s") from None
        docs[kind] = top_document(kind, status, body)
    return docs


def _conn_key(c):
    return c["proto"], c["orig_h"], c["orig_p"], c["resp_h"], c["resp_p"]


def _top_total(doc, rows):
    """How many rows a document had before ?top=N cut them: its "total", where it has a
    valid one (an older lpd sends none), else the rows it sent."""
    total = doc.get("total")
    return total if _count(total) else len(rows)


def _conn_bytes(c):
    return c["orig_wire_bytes"] + c["resp_wire_bytes"]


def _index_docs(docs):
    """Each cumulative document keyed for rate(): remotes and rules by name, connections
    by their five-tuple, HTTP by server (a gRPC server by ("rpc", server))."""
    if docs.get("remotes"):
        docs["remotes"]["_index"] = {r["address"]: {"bytes": r["tx_bytes"] + r["rx_bytes"]}
                                     for r in docs["remotes"]["remotes"]}
    if docs.get("rules"):
        docs["rules"]["_index"] = {r["id"]: {"bytes": r["bytes"]} for r in docs["rules"]["rules"]}
    if docs.get("connections"):
        docs["connections"]["_index"] = {_conn_key(c): {"bytes": _conn_bytes(c)}
                                         for c in docs["connections"]["connections"]}
    if docs.get("http"):
        docs["http"]["_index"] = {s: {"requests": v["requests"]} for s, v in docs["http"]["servers"].items()}
        docs["http"]["_index"].update((("rpc", s), {"calls": v["calls"]})
                                      for s, v in docs["http"].get("rpc", {}).items())
    return docs


# -- the screen ----------------------------------------------------------------------

def _top_name(name):
    """A remote's name in at most TOP_NAME_WIDTH characters, cut at the left."""
    if len(name) <= TOP_NAME_WIDTH:
        return name
    return TOP_NAME_CUT + name[len(name) - TOP_NAME_WIDTH + len(TOP_NAME_CUT):]


def _width(title, cells):
    """A column as wide as its widest cell (an IPv6 address: 39), at least its title."""
    return max([len(title)] + [len(c) for c in cells])


def _bar(values, top):
    if not top:
        return " " * len(values)
    return "".join(TOP_BAR[min(len(TOP_BAR) - 1, int(v / top * (len(TOP_BAR) - 1) + 0.5))]
                   for v in values)


def _printable(text):
    """A daemon's strings on a terminal: control characters (escapes) as '?'."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _clock(wall):
    return time.strftime(TOP_CLOCK, time.localtime(wall))


class TopFailure(NamedTuple):
    kind: type                         # TopDown or TopGarbage
    reason: str
    since: float                       # wall clock of the first failed fetch in a row


class TopView:
    """What the screen shows, from successive fetches (pure: no terminal here)."""

    def __init__(self, label, refresh=TOP_REFRESH):
        self.label, self.refresh = label, refresh
        self.docs, self.prev, self.t, self.prev_t = None, None, 0.0, 0.0
        self.history = {}                # address -> deque of tx+rx bit rates
        self.pane, self.sort = TOP_PANES[0], TOP_SORTS[0]
        self.paused = False
        self.failure = None              # a TopFailure while fetches fail
        self.last_good = None            # wall clock of the last good answer
        self.stale_shown = "dimmed below"    # what the screen does with an old answer

    def update(self, docs, now, wall):
        """A good fetch: `now` (monotonic) times rates, `wall` is shown."""
        self.prev, self.prev_t = self.docs, self.t
        self.docs, self.t = docs, now
        self.failure, self.last_good = None, wall
        rows = docs["addresses"]["addresses"]
        # only the addresses in the answer keep a bar: the table stays as big as a document
        self.history = {a["address"]: self.history.get(a["address"]) or
                        collections.deque(maxlen=TOP_HISTORY) for a in rows}
        for a in rows:
            self.history[a["address"]].append(a["tx_bps"] + a["rx_bps"])

    def fail(self, error, wall):
        """A failed fetch; the banner keeps the time of the first of a row of the same kind."""
        same = self.failure is not None and self.failure.kind is type(error)
        self.failure = TopFailure(type(error), error.reason, self.failure.since if same else wall)

    @property
    def stale(self):
        """The panes show an older answer than the last fetch's."""
        return self.failure is not None

    def rate(self, kind, key, field, value):
        """Per-second rate of a cumulative field between the last two fetches."""
        if self.prev is None or not self.prev.get(kind) or self.t <= self.prev_t:
            return 0.0
        old = self.prev[kind].get("_index", {}).get(key)
        if old is None:
            return 0.0
        return max(0.0, (value - old.get(field, 0)) / (self.t - self.prev_t))

    def key(self, ch):
        """One key press; False to quit."""
        if ch in ("q", "Q"):
            return False
        if ch and ch in "12345":
            self.pane = TOP_PANES[int(ch) - 1]
        elif ch == "\t":
            self.pane = TOP_PANES[(TOP_PANES.index(self.pane) + 1) % len(TOP_PANES)]
        elif ch == "s":
            self.sort = TOP_SORTS[(TOP_SORTS.index(self.sort) + 1) % len(TOP_SORTS)]
        elif ch == "p":
            self.paused = not self.paused
        return True

    # -- the panes: each (heading lines, rows) of its document -----------------------

    def _sorted(self, rows, rate, total, name):
        if self.sort == "name":
            return sorted(rows, key=name)
        return sorted(rows, key=lambda r: -(rate(r) if self.sort == "rate" else total(r)))

    def _title(self, pane, text):
        return f"{text} - sorted by: {TOP_SORT_LABELS[pane][self.sort]}"

    def addresses(self, doc):
        rows = self._sorted(doc["addresses"], lambda a: a["tx_bps"] + a["rx_bps"],
                            lambda a: a["tx_bytes"] + a["rx_bytes"], lambda a: a["address"])
        peak = max([max(h) for h in self.history.values() if h] + [0])
        w = _width("local address", (a["address"] for a in rows))
        # one char per good fetch: a refresh apart, unless fetches failed or were paused
        legend = (f"history: 1 char = {self.refresh:g} s, last {TOP_HISTORY * self.refresh:g} s, "
                  f"newest right; {TOP_BAR[1:]} up to {human_bits(peak)}")
        head = f"{'local address':<{w}} {'tx':>13} {'rx':>13}  history"
        return [self._title("addresses", f"local addresses: {doc['tracked']}"), legend, head], [
            f"{a['address']:<{w}} {human_bits(a['tx_bps']):>13} {human_bits(a['rx_bps']):>13}  "
            f"{_bar(self.history.get(a['address'], ()), peak)}" for a in rows]

    def remotes(self, doc):
        rate = lambda r: self.rate("remotes", r["address"], "bytes", r["tx_bytes"] + r["rx_bytes"]) * 8  # noqa: E731
        rows = self._sorted(doc["remotes"], rate, lambda r: r["tx_bytes"] + r["rx_bytes"],
                            lambda r: r["address"])
        w = _width("remote address", (r["address"] for r in rows))
        names = [_top_name(r.get("name", "")) for r in rows]
        # a name column only where the daemon names remotes (--names) and some are named
        wn = _width("name", names) + 1 if any(names) else 0
        return [self._title("remotes", f"remote addresses: {doc['tracked']} tracked"),
                f"{'remote address':<{w}} {'name ' if wn else '':<{wn}}{'rate':>13} {'total':>10} "
                f"{'country':<14} isp"], [
            f"{r['address']:<{w}} {name + ' ' if wn else '':<{wn}}{human_bits(rate(r)):>13} "
            f"{human_bytes(r['tx_bytes'] + r['rx_bytes']):>10} {r['country'][:14]:<14} {r['isp']}"
            for r, name in zip(rows, names)]

    def rules(self, doc):
        rate = lambda r: self.rate("rules", r["id"], "bytes", r["bytes"]) * 8  # noqa: E731
        rows = self._sorted(doc["rules"], rate, lambda r: r["bytes"], lambda r: r["id"])
        return [self._title("rules", f"rules: {_top_total(doc, doc['rules'])}"),
                f"{'rule':<32} {'rate':>13} {'packets':>12} {'bytes':>12}"], [
            f"{r['id'][:32]:<32} {human_bits(rate(r)):>13} {r['packets']:>12} {r['bytes']:>12}"
            for r in rows]

    def connections(self, doc):
        counts = ", ".join(f"{proto} {state} {n}" for proto, states in sorted(doc["counts"].items())
                           for state, n in sorted(states.items()) if n)
        rate = lambda c: self.rate("connections", _conn_key(c), "bytes", _conn_bytes(c)) * 8  # noqa: E731
        rows = self._sorted(doc["connections"], rate, _conn_bytes, lambda c: (c["orig_h"], c["orig_p"]))
        orig = [f"{c['orig_h']}:{c['orig_p']}" for c in rows]
        resp = [f"{c['resp_h']}:{c['resp_p']}" for c in rows]
        wo, wr = _width("originator", orig), _width("responder", resp)
        return [self._title("connections", f"connections: {doc['open']} open ({counts or 'none'})"),
                f"{'proto':<5} {'originator':<{wo}} {'responder':<{wr}} {'state':<11} "
                f"{'rate':>13} {'bytes':>10} process"], [
            f"{c['proto']:<5} {o:<{wo}} {r:<{wr}} {c['state']:<11} {human_bits(rate(c)):>13} "
            f"{human_bytes(_conn_bytes(c)):>10} "
            f"{(c['comm'] or '') + ('[' + str(c['pid']) + ']' if c['pid'] else '')}"
            for c, o, r in zip(rows, orig, resp)]

    def http(self, doc):
        servers = doc["servers"]
        rate = lambda s: self.rate("http", s, "requests", servers[s]["requests"])  # noqa: E731
        names = self._sorted(list(servers), rate, lambda s: servers[s]["requests"], lambda s: s)
        return [self._title("http", f"HTTP servers: {_top_total(doc, servers)}"),
                f"{'server':<30} {'req/s':>8} {'requests':>9} {'errors':>7} {'p50':>9} {'p95':>9}"], [
            f"{s[:30]:<30} {rate(s):>8.1f} {servers[s]['requests']:>9} "
            f"{servers[s]['errors'] / servers[s]['requests'] if servers[s]['requests'] else 0:>7.1%} "
            f"{servers[s]['p50'] * 1e3:>7.1f}ms {servers[s]['p95'] * 1e3:>7.1f}ms" for s in names]

    def rpc(self, doc):
        """The gRPC servers of the HTTP document (below its HTTP servers): a row each of
        calls, error share and latency, then its statuses other than OK and its busiest
        methods, one line each (a row of three lines: --once cuts whole rows)."""
        servers = doc.get("rpc") or {}
        rate = lambda s: self.rate("http", ("rpc", s), "calls", servers[s]["calls"])  # noqa: E731
        names = self._sorted(list(servers), rate, lambda s: servers[s]["calls"], lambda s: s)
        rows = []
        for s in names:
            d = servers[s]
            errors = ", ".join(f"{st} {n}" for st, n in sorted(
                d["statuses"].items(), key=lambda sn: (-sn[1], sn[0])) if st != GRPC_OK and n)
            methods = ", ".join(f"{m} {n}" for m, n in sorted(
                d["methods"].items(), key=lambda mn: (-mn[1], mn[0]))[:TOP_RPC_METHODS])
            rows.append((f"{s[:24]:<24} {rate(s):>8.1f} {d['calls']:>8} "
                         f"{d['errors'] / d['calls'] if d['calls'] else 0:>7.1%} "
                         f"{d['p50'] * 1e3:>7.1f}ms {d['p95'] * 1e3:>7.1f}ms {d['p99'] * 1e3:>7.1f}ms",
                         f"  errors: {errors or 'none'}", f"  methods: {methods or 'none'}"))
        total = doc.get("rpc_total")
        return [self._title("rpc", f"gRPC servers: {total if _count(total) else len(servers)}"),
                f"{'server':<24} {'calls/s':>8} {'calls':>8} {'errors':>7} {'p50':>9} {'p95':>9} "
                f"{'p99':>9}"], rows

    def sections(self, pane, doc):
        """A pane's parts, each (heading lines, rows); a row is a line or a tuple of lines
        kept together. The HTTP pane has its gRPC servers below, where there are some."""
        parts = [getattr(self, pane)(doc)]
        if pane == "http" and doc.get("rpc"):
            parts.append(self.rpc(doc))
        return parts

    # -- the whole screen -------------------------------------------------------------

    def header(self):
        """The two top lines: what is shown and how fresh, or why it is stale."""
        f = self.failure
        if f is not None:                     # the alert first, then what the panes are
            last = (f"last answer {_clock(self.last_good)}, {self.stale_shown}" if self.last_good
                    else "no answer yet")
            then = f"{last}; retrying every {self.refresh:g} s - {self.label}"
            if f.kind is TopGarbage:          # the reason first: it is what a line has room for
                return [(TOP_ALERT, f"lpd answered garbage: {f.reason}"),
                        (TOP_STATUS, f"since {_clock(f.since)}; {then}")]
            # "at": the time of the first failed fetch; the last good one is on the next line
            return [(TOP_ALERT, f"lpd stopped answering at {_clock(f.since)}: {f.reason}"),
                    (TOP_STATUS, then)]
        if self.docs is None:
            return [(TOP_TITLE, f"lpd top - {self.label}"), (TOP_STATUS, "connecting...")]
        i = self.docs["interface"]
        state = "up" if i["up"] else "DOWN"
        head = (f"lpd top - {self.label} - {i['nic']} {state} - tx {human_bytes(i['tx_bytes'])} "
                f"rx {human_bytes(i['rx_bytes'])} - drops {i['drops']}")
        if self.paused:
            status = f"paused, showing {_clock(self.last_good)} (p resumes)"
        else:
            status = (f"pane {TOP_PANES.index(self.pane) + 1}/{len(TOP_PANES)} {self.pane} - "
                      f"updated {_clock(self.last_good)}, every {self.refresh:g} s")
        return [(TOP_TITLE, head), (TOP_STATUS, status)]

    def frame(self, width, height=None, panes=None, rows=None, keys=True):
        """The screen as (role, text) lines, each at most `width` characters: the header,
        the panes (`rows`: at most that many rows each; `height`: cut to fit), then the
        key line."""
        lines = self.header()
        body = []
        if self.docs is not None:
            for pane in panes or (self.pane,):
                doc = self.docs.get(pane)
                for head, part in ([([TOP_OFF[pane]], [])] if doc is None
                                   else self.sections(pane, doc)):
                    for row in [""] + head + (part if rows is None else part[:rows]):
                        body += [row] if isinstance(row, str) else list(row)
        if height is not None:
            body = body[:max(0, height - len(lines) - keys)]
        lines += [(TOP_PANE, text) for text in body]
        if keys:
            lines.append((TOP_KEYLINE, TOP_KEYS))
        return [(role, _printable(text[:width])) for role, text in lines]


# -- running it ----------------------------------------------------------------------

def top_parser():
    p = _ArgParser(prog="lpd top", description="A live view of a running lpd (its /api/*).")
    p.add_argument("--url", default=DEFAULT_LISTEN, metavar="URL",
                   help=f"the daemon's metrics address: http://HOST:PORT or HOST:PORT as "
                        f"--web.listen-address takes it (default {DEFAULT_LISTEN})")
    p.add_argument("--once", action="store_true",
                   help="print one frame (every pane) as plain text and exit; no line wider than $COLUMNS")
    p.add_argument("--refresh", type=_positive_float, default=TOP_REFRESH, metavar="SECONDS",
                   help="seconds between fetches (default 1)")
    return p


def top_once(opts, target, out):
    """Two fetches a refresh apart (rates need two), then every pane."""
    view = TopView(target.label, opts.refresh)
    try:
        view.update(_index_docs(top_fetch(target)), time.monotonic(), time.time())
        time.sleep(opts.refresh)
        view.update(_index_docs(top_fetch(target)), time.monotonic(), time.time())
    except TopError as e:             # one line, and exit 1
        raise LpdError(f"top: {target.label}: {e}") from None
    width = shutil.get_terminal_size((80, 24)).columns
    lines = view.frame(width, panes=TOP_PANES, rows=TOP_ONCE_ROWS, keys=False)
    out.write("\n".join(text for _, text in lines) + "\n")
    return 0


def top_terminal_problem():
    """Why curses cannot draw here, in a few words; None where it can."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return "not a terminal"
    try:
        import curses
    except ImportError:
        return "this Python has no curses"
    term = os.environ.get("TERM", "")
    try:
        curses.setupterm(term or "unknown", sys.stdout.fileno())
    except curses.error:
        return f"TERM={term!r} is not a terminal this system knows"
    if not curses.tigetstr("cup"):           # "dumb" and its kind cannot place text
        return f"TERM={term!r} cannot move the cursor"
    return None


def _put(scr, curses, y, text, width, attr):
    try:
        scr.addnstr(y, 0, text, width, attr)
    except curses.error:                 # the terminal shrank since getmaxyx()
        pass


def _top_draw(scr, curses, view):
    height, width = scr.getmaxyx()
    if height < 1 or width < 2:
        return
    usable = width - 1                   # curses fails writing the bottom-right cell
    can_dim = bool(curses.termattrs() & curses.A_DIM)
    view.stale_shown = "dimmed below" if can_dim else "hidden"
    lines = view.frame(usable, height)
    keyline = lines.pop()
    attrs = {role: functools.reduce(lambda a, name: a | getattr(curses, name), names, 0)
             for role, names in TOP_ATTRS.items()}
    scr.erase()
    for y, (role, text) in enumerate(lines[:height - 1]):
        if role == TOP_PANE and view.stale and not can_dim:
            continue                     # an old answer must not pass for a live one
        attr = curses.A_DIM if role == TOP_PANE and view.stale else attrs.get(role, 0)
        _put(scr, curses, y, text, usable, attr)
    if height > 1:
        _put(scr, curses, height - 1, keyline[1], usable, attrs[TOP_KEYLINE])
    scr.refresh()


def top_screen(opts, target):
    import curses
    view = TopView(target.label, opts.refresh)

    def loop(scr):
        try:
            curses.curs_set(0)
        except curses.error:                   # a terminal that cannot hide its cursor
            pass
        scr.timeout(int(TOP_REFRESH_POLL * 1000))
        next_fetch = 0.0
        while True:
            if time.monotonic() >= next_fetch and not view.paused:
                try:
                    view.update(_index_docs(top_fetch(target)), time.monotonic(), time.time())
                except TopError as e:         # down, restarting or garbage: shown, tried again
                    view.fail(e, time.time())
                next_fetch = time.monotonic() + opts.refresh
            _top_draw(scr, curses, view)
            try:
                ch = scr.get_wch()
            except curses.error:
                continue                       # no key within the poll
            if ch == curses.KEY_RESIZE:
                # a terminal that grows brings back lines of its scrollback (tmux, xterm):
                # repaint all, not only what curses believes changed
                scr.clear()
            elif isinstance(ch, str) and not view.key(ch):
                return 0
    return curses.wrapper(loop)


def top_main(argv):
    opts = top_parser().parse_args(argv)
    target = top_target(opts.url)
    if opts.once:
        return top_once(opts, target, sys.stdout)
    problem = top_terminal_problem()
    if problem:
        log(LOG_NOTICE, f"top: {problem}: printing one frame as --once does")
        return top_once(opts, target, sys.stdout)
    return top_screen(opts, target)


###############################################################################
# 23 main #####################################################################
###############################################################################
# provides: -


# CPython collects its youngest generation every 700 allocations and the oldest every
# 100 of those, each time walking every tracked object; the flow table keeps hundreds of
# thousands of long-lived ones, and a SYN flood allocates several per frame. Measured on
# a 400,000-SYN flood: 18 us per frame with the defaults, 11 with these (10 with no
# collection at all). lpd makes few reference cycles for the collector to find.
GC_THRESHOLDS = (50_000, 20, 100)


def main(argv=None):
    gc.set_threshold(*GC_THRESHOLDS)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["top"]:
            return top_main(argv[1:])
        opts = parse_args(argv)
        if opts.dump:
            return dump_filter(opts)
        if opts.read_file:
            return replay(opts)
        if opts.worker_of:
            return run_worker(opts)
        if opts.workers > 1:
            daemon = build_supervisor(opts, argv)
        else:
            daemon = build_daemon(opts)
        code = daemon.run()
        if daemon.stopped_for_duration:
            write_output(opts.output, daemon.published, daemon.collector, sys.stdout)
        return code
    except FilterError as e:
        log(LOG_ERR, f"filter: {e}")
        return e.exit_code
    except LpdError as e:
        log(LOG_ERR, str(e))
        return e.exit_code
    except ModuleNotFoundError as e:
        if e.name != "prometheus_client":
            raise
        log(LOG_ERR, "needs the prometheus_client module: apt install python3-prometheus-client "
                     f"(Debian, Ubuntu), or pip install {DISTRIBUTION}")
        return ConfigError.exit_code
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
