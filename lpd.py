#!/usr/bin/env python3
"""lpd — per-address and per-rule network accounting from an AF_PACKET ring.

One module, standard library plus prometheus_client. Sections, in dependency
order: errors and options, capture, decode, filter compiler, accounting,
exporters, daemon, main().
"""
import argparse
import ctypes
import errno
import fcntl
import ipaddress
import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.1.0"

###############################################################################
# Errors ######################################################################
###############################################################################


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


###############################################################################
# Options #####################################################################
###############################################################################

DEFAULT_LISTEN = "localhost:59122"
DEFAULT_MAPPING_URL = "http://localhost:32599/status"
DEFAULT_RING_BYTES = 16 << 20


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as UsageError (exit 64), not exit 2."""

    def error(self, message):
        raise UsageError(message)


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _size(text):
    """A byte count, with an optional k/m/g suffix (binary)."""
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    value = int(text[:-1] if mult > 1 else text, 0) * mult
    if value < 1 << 16:
        raise argparse.ArgumentTypeError(f"ring size must be at least 64 KiB, got {text!r}")
    return value


def _network(text):
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_listen_address(text):
    """'HOST:PORT', ':PORT' (all addresses) or '[v6]:PORT' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--web.listen-address: expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    return host or "::", int(port)


def build_parser():
    p = _Parser(prog="lpd", description="Per-address and per-rule network accounting "
                "from an AF_PACKET ring, exported to Prometheus and a unix socket.")
    p.add_argument("-i", dest="interface", metavar="IFACE",
                   help="capture interface (default: the default route's, else the first up one)")
    p.add_argument("--local-net", dest="local_nets", metavar="CIDR", action="append", type=_network,
                   help="a local network (repeatable; default: the interface's own networks)")
    p.add_argument("--web.listen-address", dest="listen", metavar="HOST:PORT", default=DEFAULT_LISTEN,
                   help=f"Prometheus endpoint (default {DEFAULT_LISTEN})")
    p.add_argument("--interval", type=_positive_float, default=1.0, metavar="SECONDS",
                   help="period of the *_bps gauges (default 1)")
    p.add_argument("--idle-timeout", type=_positive_float, default=300.0, metavar="SECONDS",
                   help="forget an address after this long without traffic (default 300)")
    p.add_argument("--mapping-url", default=DEFAULT_MAPPING_URL, metavar="URL",
                   help="NIC mapping service, or 'none' (default %(default)s)")
    p.add_argument("-b", dest="ring_bytes", type=_size, default=DEFAULT_RING_BYTES, metavar="BYTES",
                   help="capture ring size (default 16m)")
    p.add_argument("--promisc", action="store_true", help="put the interface in promiscuous mode")
    p.add_argument("-f", dest="filter_file", metavar="FILTERFILE",
                   help="rules: lines of '<identifier>;<bpf expression>'")
    p.add_argument("-F", dest="prefilter", metavar="EXPR",
                   help="kernel prefilter: only matching packets reach lpd")
    p.add_argument("-u", dest="socket_path", metavar="SOCKETPATH",
                   help="rule counters socket (default /run/lpd/<iface>.sock)")
    p.add_argument("--socket-group", metavar="GROUP", help="group owning the rule socket")
    p.add_argument("-r", dest="read_file", metavar="FILE.pcap",
                   help="read a pcap file, print the totals and exit")
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
    opts.listen = parse_listen_address(opts.listen)
    if opts.mapping_url.lower() == "none":
        opts.mapping_url = None
    return opts


###############################################################################
# Offline capture files #######################################################
###############################################################################

# magic -> (byte order, timestamp divisor); the magic read as little-endian.
PCAP_MAGICS = {
    0xA1B2C3D4: ("<", 1_000_000), 0xD4C3B2A1: (">", 1_000_000),
    0xA1B23C4D: ("<", 1_000_000_000), 0x4D3CB2A1: (">", 1_000_000_000),
}
PCAPNG_MAGIC = 0x0A0D0D0A


def read_pcap(path):
    """Yield (timestamp, wirelen, data) for each record of a classic pcap file.

    Both byte orders, micro- and nanosecond magic; Ethernet link type only.
    """
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            raise ConfigError(f"{path}: not a pcap file (only {len(head)} header bytes)")
        magic = struct.unpack_from("<I", head)[0]
        if magic == PCAPNG_MAGIC:
            raise ConfigError(f"{path}: pcapng is not supported; convert with 'editcap -F pcap'")
        if magic not in PCAP_MAGICS:
            raise ConfigError(f"{path}: not a pcap file (magic 0x{magic:08x})")
        order, div = PCAP_MAGICS[magic]
        linktype = struct.unpack_from(order + "I", head, 20)[0] & 0xFFFF  # LT_LINKTYPE()
        if linktype != 1:
            raise ConfigError(f"{path}: link type {linktype} is not Ethernet (DLT_EN10MB)")
        rec = struct.Struct(order + "IIII")
        n = 0
        while True:
            h = f.read(16)
            if not h:
                return
            n += 1
            if len(h) < 16:
                raise ConfigError(f"{path}: record {n}: truncated record header")
            sec, frac, caplen, wirelen = rec.unpack(h)
            if caplen > 262144:
                raise ConfigError(f"{path}: record {n}: capture length {caplen} is corrupt")
            data = f.read(caplen)
            if len(data) < caplen:
                raise ConfigError(f"{path}: record {n}: truncated record data")
            yield sec + frac / div, wirelen, data


###############################################################################
# Capture: interfaces #########################################################
###############################################################################

SIOCGIFFLAGS = 0x8913
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFREQ = struct.Struct("16sH14x")

# rtnetlink, for the capture interface's own networks without iproute2.
NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
NLMSGHDR = struct.Struct("=IHHII")
IFADDRMSG = struct.Struct("=BBBBI")
RTATTR = struct.Struct("=HH")


def _ifreq(ifname, request):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s, request, IFREQ.pack(ifname.encode(), 0) + bytes(8))


def interface_flags(ifname):
    """The interface's IFF_* flags, or None when it does not exist (in this netns)."""
    try:
        return IFREQ.unpack_from(_ifreq(ifname, SIOCGIFFLAGS))[1]
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
    return ":".join(f"{b:02x}" for b in raw[18:24])


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
                    code = -struct.unpack_from("=i", data, off + NLMSGHDR.size)[0]
                    raise OSError(code, os.strerror(code))
                yield mtype, data[off + NLMSGHDR.size:off + length]
                off += (length + 3) & ~3


def _rtattrs(data, off):
    attrs = {}
    while off + RTATTR.size <= len(data):
        length, atype = RTATTR.unpack_from(data, off)
        if length < RTATTR.size:
            break
        attrs[atype] = data[off + RTATTR.size:off + length]
        off += (length + 3) & ~3
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


###############################################################################
# Capture: the TPACKET_V3 ring ################################################
###############################################################################

# Python's socket module has none of these (linux/if_packet.h, asm-generic/socket.h).
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC = 1, 1
PACKET_RX_RING, PACKET_STATISTICS, PACKET_AUXDATA, PACKET_VERSION = 5, 6, 8, 10
PACKET_FANOUT, PACKET_FANOUT_HASH = 18, 0
TPACKET_V3 = 2
SO_ATTACH_FILTER = 26
ETH_P_ALL = 0x0003
PACKET_HOST, PACKET_OUTGOING = 0, 4
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID = 0x10, 0x40

TPACKET_REQ3 = struct.Struct("=7I")
PACKET_MREQ = struct.Struct("=iHH8s")
TPACKET_STATS_V3 = struct.Struct("=III")
SOCK_FPROG = struct.Struct("=HxxxxxxQ")     # struct sock_fprog { u16 len; sock_filter *filter; }
SOCK_FILTER = struct.Struct("=HBBI")
# tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1 from block_status on.
BLOCK_STATUS_OFF = 8
BLOCK_HDR = struct.Struct("=II")          # num_pkts, offset_to_first_pkt (at +12)
BLOCK_HDR_OFF = 12
U32 = struct.Struct("=I")
# tpacket3_hdr (48 bytes) then sockaddr_ll: next_offset, snaplen, len, status, mac,
# vlan_tci, vlan_tpid, sll_pkttype. Skipped: timestamps, net, rxhash, padding, sll head.
FRAME_HDR = struct.Struct("=I8xIIIH2x4xIH2x8x10xB")
SYNTH_MAC_OFF = 80                         # where frames_to_blocks puts the frame data

RING_BLOCK_BYTES = 1 << 20
# A block goes to userspace when full or after this; at low rates it bounds how late a
# frame is counted, at high rates blocks fill long before (see README, Performance).
RING_RETIRE_MS = 20
SNAPLEN_ACCOUNTING = 128                   # Ethernet + stacked tags + IPv6 addresses


def accept_all(snaplen):
    """The default kernel filter: everything, cut to the bytes lpd reads."""
    return [(0x06, 0, 0, snaplen)]        # ret #snaplen


def pack_filter(prog):
    return b"".join(SOCK_FILTER.pack(*insn) for insn in prog)


def ring_geometry(ring_bytes):
    """(block_size, block_nr) for a ring of about ring_bytes."""
    block = RING_BLOCK_BYTES
    while block > mmap.PAGESIZE and ring_bytes // block < 4:
        block //= 2
    return block, max(ring_bytes // block, 2)


class Ring:
    """An AF_PACKET socket with a mapped TPACKET_V3 receive ring on one interface."""

    def __init__(self, ifname, ring_bytes, prog, promisc=False, fanout=None):
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
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            self.block_size, self.block_nr = ring_geometry(ring_bytes)
            frame = 2048
            self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, TPACKET_REQ3.pack(
                self.block_size, self.block_nr, frame, self.block_size // frame * self.block_nr,
                RING_RETIRE_MS, 0, 0))
            self.map = mmap.mmap(self.sock.fileno(), self.block_size * self.block_nr,
                                 mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.view = memoryview(self.map)
            self.sock.bind((ifname, ETH_P_ALL))
            if promisc:
                self.sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MREQ.pack(
                    self.ifindex, PACKET_MR_PROMISC, 0, b""))
            if fanout is not None:
                self.sock.setsockopt(SOL_PACKET, PACKET_FANOUT, fanout)
        except OSError as e:
            self.sock.close()
            if e.errno == errno.ENODEV:
                raise ConfigError(f"{ifname}: no such interface") from None
            raise ConfigError(f"{ifname}: cannot set up the capture ring: {e.strerror}") from None
        self.next_block = 0
        self.packets = self.drops = 0

    def fileno(self):
        return self.sock.fileno()

    def attach(self, prog):
        """Replace the kernel filter; a single SO_ATTACH_FILTER swaps it atomically."""
        buf = pack_filter(prog)
        self._fprog_buf = bytearray(buf)   # kept alive: the kernel copies it during the call
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._fprog_buf))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, SOCK_FPROG.pack(len(prog), addr))

    def drain(self, process):
        """Hand every block the kernel has released to process(view, base); return how many."""
        view, size, nr = self.view, self.block_size, self.block_nr
        done = 0
        while done < nr:
            base = self.next_block * size
            if not U32.unpack_from(view, base + BLOCK_STATUS_OFF)[0] & TP_STATUS_USER:
                break
            process(view, base)
            U32.pack_into(view, base + BLOCK_STATUS_OFF, TP_STATUS_KERNEL)
            self.next_block = (self.next_block + 1) % nr
            done += 1
        return done

    def read_stats(self):
        """Accumulate the kernel's counters (reading them resets them)."""
        try:
            packets, drops, _ = TPACKET_STATS_V3.unpack(
                self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS_V3.size))
        except OSError:
            return
        self.packets += packets
        self.drops += drops

    def socket_error(self):
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

    def close(self):
        self.read_stats()
        self.view.release()
        self.map.close()
        self.sock.close()


def frames_to_blocks(frames, block_size=RING_BLOCK_BYTES, pkttype=PACKET_HOST):
    """Lay (data, wirelen) frames out exactly as TPACKET_V3 ring blocks.

    Offline replay and the benchmark push these through the same process_block()
    the live ring feeds, so there is one decode and accounting path.
    """
    blocks, block, count, pos = [], bytearray(block_size), 0, 48

    def close():
        BLOCK_HDR.pack_into(block, BLOCK_HDR_OFF, count, 48)
        U32.pack_into(block, BLOCK_STATUS_OFF, TP_STATUS_USER)
        blocks.append(block)

    for data, wirelen in frames:
        need = (SYNTH_MAC_OFF + len(data) + 15) & ~15
        if need > block_size - 48:
            raise ValueError(f"frame of {len(data)} bytes does not fit a {block_size}-byte block")
        if pos + need > block_size:
            close()
            block, count, pos = bytearray(block_size), 0, 48
        struct.pack_into("=I8xII4xH", block, pos, need, len(data), wirelen, SYNTH_MAC_OFF)
        block[pos + 58] = pkttype
        block[pos + SYNTH_MAC_OFF:pos + SYNTH_MAC_OFF + len(data)] = data
        pos += need
        count += 1
    if count:
        close()
    return blocks


###############################################################################
# Decode ######################################################################
###############################################################################

ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806
VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100))    # 802.1Q, 802.1ad, old QinQ
VLAN_TAG = struct.Struct("!HH")
U16BE = struct.Struct("!H")
IPV4_HDR = struct.Struct("!BxH8xII")                 # version/IHL, total length, src, dst
IPV6_HDR = struct.Struct("!B3xH2xQQQQ")              # version, payload length, src, dst

# Why a frame was not attributed to an address: lpd_packets_malformed_total{reason}.
MALFORMED_REASONS = (
    "truncated",   # shorter than the Ethernet/VLAN/IP header it announces
    "version",     # IP version field disagrees with the ethertype
    "ihl",         # IPv4 header length below 5 words
    "length",      # IP total length beyond the frame's wire length (or below the header)
)


###############################################################################
# Filter compiler #############################################################
###############################################################################

# (The compiler, matcher and rules sections are merged here.)


###############################################################################
# Accounting ##################################################################
###############################################################################

TX_BYTES, TX_PACKETS, RX_BYTES, RX_PACKETS = range(4)
LOCALITY_CACHE_MAX = 1 << 16      # remote addresses remembered as "not local"
_MISS = object()


def _prefixes(nets, version):
    return [(int(n.network_address), int(n.netmask)) for n in nets if n.version == version]


class Accounting:
    """Per-address, per-interface and per-rule counters, fed one ring block at a time.

    Addresses are kept as integers in one table per family; the locality caches map
    every address seen to its counter list (local) or None (remote), so the hot loop
    pays two dict lookups per IP frame whatever the number of local networks.
    """

    def __init__(self, local_nets, rules=None, lock=None):
        self.lock = lock or threading.Lock()
        self.rules = rules
        self.totals = [0, 0, 0, 0]                   # by direction: TX_BYTES .. RX_PACKETS
        self.frames = 0
        self.malformed = dict.fromkeys(MALFORMED_REASONS, 0)
        self.hosts4, self.hosts6 = {}, {}             # int address -> [tx_b, tx_p, rx_b, rx_p]
        self.set_local_nets(local_nets)

    def set_local_nets(self, nets):
        """Adopt new local networks; counters of addresses still local are kept."""
        self.local_nets = list(nets)
        self._nets4, self._nets6 = _prefixes(nets, 4), _prefixes(nets, 6)
        for table, prefixes in ((self.hosts4, self._nets4), (self.hosts6, self._nets6)):
            for addr in [a for a in table if not any(a & m == n for n, m in prefixes)]:
                del table[addr]
        self.cache4, self.cache6 = dict(self.hosts4), dict(self.hosts6)

    def _locate(self, addr, cache, table, prefixes):
        """Slow path of the hot loop: first sight of an address."""
        if len(cache) >= LOCALITY_CACHE_MAX + len(table):
            cache.clear()
            cache.update(table)
        entry = None
        for net, mask in prefixes:
            if addr & mask == net:
                entry = table[addr] = [0, 0, 0, 0]
                break
        cache[addr] = entry
        return entry

    def forget(self, version, addr):
        """Drop an idle address (its series disappear from the exporter)."""
        table, cache = (self.hosts4, self.cache4) if version == 4 else (self.hosts6, self.cache6)
        table.pop(addr, None)
        cache.pop(addr, None)

    def process_block(self, buf, base):
        """Count every frame of one TPACKET_V3 block. The hot loop: deliberately flat.

        A byte is the frame's length as libpcap reports it: a VLAN tag the kernel
        stripped into the frame header counts its 4 bytes back in, and rules see the
        tag re-inserted, exactly like pcap_offline_filter on libpcap's capture.
        """
        count, first = BLOCK_HDR.unpack_from(buf, base + BLOCK_HDR_OFF)
        frame_hdr = FRAME_HDR.unpack_from
        u16 = U16BE.unpack_from
        ip4 = IPV4_HDR.unpack_from
        ip6 = IPV6_HDR.unpack_from
        cache4, cache6, hosts4, hosts6 = self.cache4, self.cache6, self.hosts4, self.hosts6
        nets4, nets6, locate = self._nets4, self._nets6, self._locate
        totals, malformed, tpids = self.totals, self.malformed, VLAN_TPIDS
        rules = self.rules
        if rules is not None:
            match, rule_bytes, rule_packets = rules.match, rules.bytes, rules.packets
        pos = base + first
        with self.lock:
            self.frames += count
            for _ in range(count):
                nxt, caplen, flen, status, mac, tci, tpid, pkttype = frame_hdr(buf, pos)
                p = pos + mac
                end = p + caplen
                wl = flen
                tagged = status & TP_STATUS_VLAN_VALID or tci
                if tagged:
                    wl += 4
                if pkttype == PACKET_OUTGOING:
                    totals[0] += wl
                    totals[1] += 1
                else:
                    totals[2] += wl
                    totals[3] += 1
                if rules is not None:
                    if tagged:
                        data = b"".join((buf[p:p + 12], VLAN_TAG.pack(
                            tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100, tci),
                            buf[p + 12:end]))
                    else:
                        data = buf[p:end]
                    for i in match(data, wl, pkttype, tci if tagged else None):
                        rule_bytes[i] += wl
                        rule_packets[i] += 1
                pos += nxt
                if caplen < 14:
                    malformed["truncated"] += 1
                    continue
                et = u16(buf, p + 12)[0]
                q = p + 14
                while et in tpids:
                    if q + 4 > end:
                        et = -1
                        break
                    et = u16(buf, q + 2)[0]
                    q += 4
                if et == 0x0800:
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
                    e = cache4.get(src, _MISS)
                    if e is _MISS:
                        e = locate(src, cache4, hosts4, nets4)
                    if e is not None:
                        e[0] += wl
                        e[1] += 1
                    e = cache4.get(dst, _MISS)
                    if e is _MISS:
                        e = locate(dst, cache4, hosts4, nets4)
                    if e is not None:
                        e[2] += wl
                        e[3] += 1
                elif et == 0x86DD:
                    if q + 40 > end:
                        malformed["truncated"] += 1
                        continue
                    vtc, plen, sh, sl, dh, dl = ip6(buf, q)
                    if vtc >> 4 != 6:
                        malformed["version"] += 1
                        continue
                    if q - p + 40 + plen > flen:
                        malformed["length"] += 1
                        continue
                    src = sh << 64 | sl
                    e = cache6.get(src, _MISS)
                    if e is _MISS:
                        e = locate(src, cache6, hosts6, nets6)
                    if e is not None:
                        e[0] += wl
                        e[1] += 1
                    dst = dh << 64 | dl
                    e = cache6.get(dst, _MISS)
                    if e is _MISS:
                        e = locate(dst, cache6, hosts6, nets6)
                    if e is not None:
                        e[2] += wl
                        e[3] += 1
                elif et == -1:
                    malformed["truncated"] += 1

    def host_counters(self):
        """[(ip_address, [tx_b, tx_p, rx_b, rx_p])] copied; call with the lock held."""
        return ([(ipaddress.IPv4Address(a), list(e)) for a, e in self.hosts4.items()] +
                [(ipaddress.IPv6Address(a), list(e)) for a, e in self.hosts6.items()])


class Rates:
    """The legacy *_bps gauges: bits per address over the last completed interval,
    and idle expiry (an address that goes quiet reads 0, then disappears)."""

    def __init__(self, idle_timeout):
        self.idle_timeout = idle_timeout
        self.prev = {}        # (version, int) -> (tx_bytes, rx_bytes, last_active)
        self.bps = {}         # ip_address -> (tx_bps, rx_bps)
        self.last_tick = None

    def tick(self, acct, now):
        """Close an interval; call with acct.lock held."""
        elapsed = None if self.last_tick is None else now - self.last_tick
        self.last_tick = now
        bps, prev = {}, {}
        for version, table, cls in ((4, acct.hosts4, ipaddress.IPv4Address),
                                    (6, acct.hosts6, ipaddress.IPv6Address)):
            for addr, e in list(table.items()):
                key = (version, addr)
                tx0, rx0, active = self.prev.get(key, (0, 0, now))
                if e[TX_BYTES] != tx0 or e[RX_BYTES] != rx0:
                    active = now
                elif now - active >= self.idle_timeout:
                    acct.forget(version, addr)
                    continue
                prev[key] = (e[TX_BYTES], e[RX_BYTES], active)
                if elapsed:
                    bps[cls(addr)] = ((e[TX_BYTES] - tx0) * 8 / elapsed,
                                      (e[RX_BYTES] - rx0) * 8 / elapsed)
                else:
                    bps[cls(addr)] = (0.0, 0.0)
        self.prev, self.bps = prev, bps


###############################################################################
# Exporters: NIC mapping ######################################################
###############################################################################

MAPPING_PERIOD = 10.0
MAPPING_TIMEOUT = 2.0


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


class NicMapping:
    """Background poller of the mapping service; never blocks capture."""

    def __init__(self, url, fallback_nic, log):
        self.url, self.fallback, self.log = url, fallback_nic, log
        self.table, self.default = {}, None
        self.errors = 0
        self.last_success = 0.0
        self._state = None                 # last logged state: "ok" or the error's kind

    def label(self, addr):
        if self.default is None:
            return self.fallback
        return self.table.get(addr, self.default)

    def labeller(self):
        """A consistent (table, default) pair for one scrape."""
        table, default = self.table, self.default
        if default is None:
            return lambda addr: self.fallback
        return lambda addr: table.get(addr, default)

    def fetch_once(self):
        try:
            with urllib.request.urlopen(self.url, timeout=MAPPING_TIMEOUT) as resp:
                table, default = parse_mapping(resp.read(1 << 20))
        except (OSError, MappingError, ValueError) as e:
            self.errors += 1
            kind = type(e).__name__
            if self._state != kind:
                self._state = kind
                self.log(4, f"mapping: {self.url}: {_describe(e)}; keeping the last good mapping")
            return False
        self.table, self.default = table, default     # swapped as a pair under the GIL
        self.last_success = time.time()
        if self._state != "ok":
            if self._state is not None:
                self.log(6, f"mapping: {self.url}: answering again")
            self._state = "ok"
        return True

    def run(self, stop):
        while not stop.is_set():
            self.fetch_once()
            stop.wait(MAPPING_PERIOD)


def _describe(exc):
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


###############################################################################
# Exporters: Prometheus #######################################################
###############################################################################

LANDING_PAGE = (b"<html><head><title>lpd</title></head><body><h1>lpd</h1>"
                b"<p><a href=\"/metrics\">Metrics</a></p></body></html>\n")


class Collector:
    """Builds fresh metric families on every scrape from one locked snapshot."""

    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        d = self.daemon
        snap = d.snapshot()
        label = d.mapping.labeller()
        nic = d.ifname

        def family(cls, name, doc, labels, rows):
            fam = cls(name, doc, labels=labels)
            for values, value in rows:
                fam.add_metric(values, value)
            return fam

        hosts = [(str(a), label(a), e) for a, e in snap["hosts"]]
        rates = [(str(a), label(a), r) for a, r in snap["bps"].items()]
        yield family(GaugeMetricFamily, "network_ip_tx_bps", "Bits per second sent by a local address.",
                     ["local_ip", "nic"], [((a, n), r[0]) for a, n, r in rates])
        yield family(GaugeMetricFamily, "network_ip_rx_bps", "Bits per second received by a local address.",
                     ["local_ip", "nic"], [((a, n), r[1]) for a, n, r in rates])
        per_nic = {}
        for _, n, r in rates:
            t = per_nic.setdefault(n, [0.0, 0.0])
            t[0] += r[0]
            t[1] += r[1]
        yield family(GaugeMetricFamily, "network_ip_tx_bps_total", "Bits per second sent, per NIC.",
                     ["nic"], [((n,), t[0]) for n, t in per_nic.items()])
        yield family(GaugeMetricFamily, "network_ip_rx_bps_total", "Bits per second received, per NIC.",
                     ["nic"], [((n,), t[1]) for n, t in per_nic.items()])
        for name, idx, doc in (("lpd_transmit_bytes", TX_BYTES, "Bytes sent by a local address."),
                               ("lpd_transmit_packets", TX_PACKETS, "Packets sent by a local address."),
                               ("lpd_receive_bytes", RX_BYTES, "Bytes received by a local address."),
                               ("lpd_receive_packets", RX_PACKETS, "Packets received by a local address.")):
            yield family(CounterMetricFamily, name, doc, ["local_ip", "nic"],
                         [((a, n), e[idx]) for a, n, e in hosts])
        t = snap["totals"]
        for name, idx, doc in (
                ("lpd_interface_transmit_bytes", TX_BYTES, "Bytes of frames the interface sent."),
                ("lpd_interface_transmit_packets", TX_PACKETS, "Frames the interface sent."),
                ("lpd_interface_receive_bytes", RX_BYTES, "Bytes of frames the interface received."),
                ("lpd_interface_receive_packets", RX_PACKETS, "Frames the interface received.")):
            yield family(CounterMetricFamily, name, doc, ["nic"], [((nic,), t[idx])])
        yield family(CounterMetricFamily, "lpd_capture_packets", "Frames lpd read from the ring.",
                     ["nic"], [((nic,), snap["frames"])])
        yield family(CounterMetricFamily, "lpd_capture_drops", "Frames the kernel dropped (ring full).",
                     ["nic"], [((nic,), snap["drops"])])
        yield family(CounterMetricFamily, "lpd_packets_malformed", "Frames not attributed: malformed.",
                     ["reason"], [((r,), v) for r, v in snap["malformed"].items()])
        yield family(GaugeMetricFamily, "lpd_interface_up", "1 while lpd captures on the interface.",
                     ["nic"], [((nic,), 1.0 if snap["up"] else 0.0)])
        yield family(CounterMetricFamily, "lpd_mapping_errors", "Failed NIC mapping fetches.",
                     [], [((), d.mapping.errors)])
        yield family(GaugeMetricFamily, "lpd_mapping_last_success_timestamp_seconds",
                     "Unix time of the last good NIC mapping (0: never).", [],
                     [((), d.mapping.last_success)])
        rules = snap["rules"]
        yield family(CounterMetricFamily, "lpd_rule_packets", "Packets matching a rule.",
                     ["rule"], [((r,), p) for r, _, p in rules])
        yield family(CounterMetricFamily, "lpd_rule_bytes", "Bytes of packets matching a rule.",
                     ["rule"], [((r,), b) for r, b, _ in rules])
        yield family(GaugeMetricFamily, "lpd_build_info", "lpd's version.", ["version"],
                     [((__version__,), 1.0)])


def make_http_server(host, port, registry):
    """The /metrics endpoint (and a landing page on /), served from a thread."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
            elif path == "/":
                body, ctype, code = LANDING_PAGE, "text/html; charset=utf-8", 200
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ConfigError(f"--web.listen-address {host}:{port}: {e.strerror}") from None

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    try:
        return Server((host, port), Handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(f"--web.listen-address {host}:{port}: address already in use") from None
        raise ConfigError(f"--web.listen-address {host}:{port}: {e.strerror}") from None


###############################################################################
# Daemon ######################################################################
###############################################################################

LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG = 3, 4, 5, 6, 7
SNAPLEN_FULL = 262144
INTERFACE_CHECK_PERIOD = 1.0


def log(priority, message):
    """One line on stderr; journald reads the <N> priority prefix."""
    prefix = f"<{priority}>" if os.environ.get("JOURNAL_STREAM") else ""
    try:
        sys.stderr.write(f"{prefix}lpd: {message}\n")
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


class Daemon:
    """Capture loop in the main thread; HTTP, mapping poller and rule socket beside it."""

    def __init__(self, opts):
        from prometheus_client import CollectorRegistry
        self.opts = opts
        self.ifname = opts.interface or default_interface()
        if interface_index(self.ifname) is None:
            raise ConfigError(f"{self.ifname}: no such interface")
        self.lock = threading.Lock()
        self.rules = self.load_rules() if opts.filter_file else None
        self.acct = Accounting(self.local_nets(), self.rules, self.lock)
        if not self.acct.local_nets:
            log(LOG_WARNING, f"{self.ifname}: no addresses and no --local-net: no address is local")
        self.rates = Rates(opts.idle_timeout)
        self.mapping = NicMapping(opts.mapping_url, self.ifname, log)
        self.ring = None
        self.past_drops = 0              # from rings closed when the interface went away
        self.stop_requested = self.reload_requested = False
        self.stop_event = threading.Event()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(self))
        self.http = make_http_server(*opts.listen, registry)
        self.rule_server = None
        if opts.filter_file or opts.socket_path:
            path = opts.socket_path or f"/run/lpd/{self.ifname}.sock"
            self.rule_server = RuleSocketServer(path, self.rule_snapshot, opts.socket_group)

    # -- configuration --------------------------------------------------------

    def local_nets(self):
        if self.opts.local_nets:
            return self.opts.local_nets
        try:
            return interface_networks(interface_index(self.ifname))
        except OSError as e:
            raise ConfigError(f"{self.ifname}: cannot read its addresses: {e.strerror}") from None

    def load_rules(self, previous=None):
        rules = parse_filter_file(self.opts.filter_file, interface_mac(self.ifname))
        return RuleSet(rules, previous)

    def kernel_program(self):
        snaplen = SNAPLEN_ACCOUNTING if self.rules is None else SNAPLEN_FULL
        if self.opts.prefilter:
            return compile_filter(self.opts.prefilter, kernel=True, snaplen=snaplen)
        return accept_all(snaplen)

    def reload(self):
        """SIGHUP: new rules and local networks; a broken file changes nothing."""
        try:
            rules = self.load_rules(self.rules) if self.opts.filter_file else None
            nets = self.local_nets()
        except LpdError as e:
            log(LOG_ERR, f"reload failed, keeping the running configuration: {e}")
            return
        with self.lock:
            self.rules = self.acct.rules = rules
            if nets != self.acct.local_nets:
                self.acct.set_local_nets(nets)
        if self.ring is not None:
            self.ring.attach(self.kernel_program())
        log(LOG_INFO, f"reloaded: {len(rules.ids) if rules else 0} rules, "
                      f"{len(nets)} local networks")

    # -- snapshots for the exporters ------------------------------------------

    def snapshot(self):
        with self.lock:
            ring = self.ring
            return {
                "hosts": self.acct.host_counters(),
                "bps": dict(self.rates.bps),
                "totals": list(self.acct.totals),
                "frames": self.acct.frames,
                "drops": self.past_drops + (ring.drops if ring else 0),
                "malformed": dict(self.acct.malformed),
                "up": ring is not None,
                "rules": self.rules.snapshot() if self.rules else [],
            }

    def rule_snapshot(self):
        with self.lock:
            return self.rules.snapshot() if self.rules else []

    # -- capture --------------------------------------------------------------

    def open_capture(self):
        self.ring = Ring(self.ifname, self.opts.ring_bytes, self.kernel_program(), self.opts.promisc)
        self.poller.register(self.ring.fileno(), select.POLLIN | select.POLLERR)

    def lose_capture(self, why):
        log(LOG_WARNING, f"{self.ifname}: {why}; counters kept, retrying every second")
        ring, self.ring = self.ring, None
        self.poller.unregister(ring.fileno())
        ring.drain(self.acct.process_block)
        ring.close()
        self.past_drops += ring.drops

    def check_interface(self):
        index, flags = interface_index(self.ifname), interface_flags(self.ifname)
        present = index is not None and flags is not None and flags & IFF_UP
        if self.ring is not None:
            self.ring.read_stats()
            if not present:
                self.lose_capture("interface is gone or down")
            elif index != self.ring.ifindex:
                self.lose_capture("interface was replaced")
        if self.ring is None and present:
            try:
                if not self.opts.local_nets:
                    nets = self.local_nets()
                    if nets != self.acct.local_nets:
                        with self.lock:
                            self.acct.set_local_nets(nets)
                self.open_capture()
                log(LOG_NOTICE, f"{self.ifname}: capturing again")
            except LpdError as e:
                log(LOG_DEBUG, f"{self.ifname}: not yet: {e}")

    # -- main loop ------------------------------------------------------------

    def _on_signal(self, signum, frame):
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stop_requested = True

    def run(self):
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.poller = select.poll()
        self.poller.register(rfd, select.POLLIN)
        threads = [threading.Thread(target=self.http.serve_forever, name="http", daemon=True)]
        if self.opts.mapping_url:
            threads.append(threading.Thread(target=self.mapping.run, args=(self.stop_event,),
                                            name="mapping", daemon=True))
        try:
            self.open_capture()
            for t in threads:
                t.start()
            if self.rule_server:
                self.rule_server.start()
            log(LOG_INFO, f"capturing on {self.ifname}; metrics on "
                          f"http://{self.opts.listen[0]}:{self.opts.listen[1]}/metrics")
            sd_notify("READY=1")
            self._loop(rfd)
        finally:
            sd_notify("STOPPING=1")
            self.stop_event.set()
            if threads[0].is_alive():
                self.http.shutdown()
            self.http.server_close()
            if self.rule_server:
                self.rule_server.close()
            if self.ring is not None:
                self.ring.close()
            signal.set_wakeup_fd(old_wakeup)
            os.close(rfd)
            os.close(wfd)
        return 0

    def _loop(self, wakeup_fd):
        interval = self.opts.interval
        now = time.monotonic()
        next_tick, next_check = now + interval, now + INTERFACE_CHECK_PERIOD
        with self.lock:
            self.rates.tick(self.acct, now)
        while not self.stop_requested:
            timeout = max(0.0, min(next_tick, next_check) - time.monotonic())
            for fd, events in self.poller.poll(timeout * 1000):
                if fd == wakeup_fd:
                    while True:
                        try:
                            if not os.read(wakeup_fd, 512):
                                break
                        except BlockingIOError:
                            break
                elif self.ring is not None and fd == self.ring.fileno():
                    if events & select.POLLERR:
                        err = self.ring.socket_error()
                        self.lose_capture(os.strerror(err) if err else "socket error")
                    else:
                        self.ring.drain(self.acct.process_block)
            if self.ring is not None:
                self.ring.drain(self.acct.process_block)
            now = time.monotonic()
            if now >= next_check:
                self.check_interface()
                next_check = now + INTERFACE_CHECK_PERIOD
            if now >= next_tick:
                with self.lock:
                    self.rates.tick(self.acct, now)
                next_tick = max(next_tick + interval, now + interval / 2)
            if self.reload_requested:
                self.reload_requested = False
                self.reload()



###############################################################################
# Offline replay and filter dumps #############################################
###############################################################################

EVERY_ADDRESS = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def replay(opts, out=sys.stdout):
    """-r FILE: the same block path as live capture, then a table of totals."""
    rules = None
    if opts.filter_file:
        mac = interface_mac(opts.interface) if opts.interface else "00:00:00:00:00:00"
        rules = RuleSet(parse_filter_file(opts.filter_file, mac))
    acct = Accounting(opts.local_nets or EVERY_ADDRESS, rules)
    frames = ((data, wirelen) for _, wirelen, data in read_pcap(opts.read_file))
    for block in frames_to_blocks(frames):
        acct.process_block(memoryview(block), 0)
    rows = sorted(acct.host_counters(), key=lambda r: (r[0].version, r[0]))
    width = max([len(str(a)) for a, _ in rows] + [len("local_ip")])
    out.write(f"{'local_ip':<{width}}  direction  {'bytes':>12}  {'packets':>9}\n")
    for addr, e in rows:
        out.write(f"{str(addr):<{width}}  {'tx':<9}  {e[TX_BYTES]:>12}  {e[TX_PACKETS]:>9}\n")
        out.write(f"{str(addr):<{width}}  {'rx':<9}  {e[RX_BYTES]:>12}  {e[RX_PACKETS]:>9}\n")
    if rules is not None:
        out.write(format_rule_lines(rules.snapshot()))
    return 0


def dump_filter(opts, out=sys.stdout):
    """-d/-dd/-ddd EXPR: the program in tcpdump's formats."""
    prog = compile_filter(" ".join(opts.expression), kernel=opts.kernel)
    out.write(format_program(prog, min(opts.dump, 3)) + "\n")
    return 0


###############################################################################
# main ########################################################################
###############################################################################


def main(argv=None):
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        if opts.dump:
            return dump_filter(opts)
        if opts.read_file:
            return replay(opts)
        return Daemon(opts).run()
    except FilterError as e:
        log(LOG_ERR, f"filter: {e}")
        return e.exit_code
    except LpdError as e:
        log(LOG_ERR, str(e))
        return e.exit_code
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
