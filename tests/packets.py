"""Ethernet frame builders and hypothesis strategies for filter and decoder tests.

Builders return ``bytes`` and nest: ``ether(dst, src, ETH_IP, ipv4(a, b, PROTO_TCP, tcp(1, 80)))``.
Checksums are filled in where BPF filters could never look at them anyway (IPv4 header
checksum), and left zero elsewhere: nothing in lpd verifies L4 checksums.

Strategies yield ``(data, wirelen)`` pairs, the shape ``bpf_filter`` and lpd's matcher take.
Addresses and ports come from small pools (``IP4_POOL``, ``PORT_POOL`` ...) that the expression
list in ``filter_expressions.txt`` also uses, so random frames match filters often instead of
almost never.

    from packets import frames, ether, ipv4, tcp
    @given(frames())
    def test_x(frame): data, wirelen = frame
"""
import ipaddress
import random
import struct

from hypothesis import strategies as st

# EtherTypes and IP protocol numbers used below.
ETH_IP, ETH_ARP, ETH_RARP, ETH_IP6 = 0x0800, 0x0806, 0x8035, 0x86DD
ETH_8021Q, ETH_8021AD, ETH_QINQ_OLD = 0x8100, 0x88A8, 0x9100
ETH_MPLS, ETH_MPLS_MC = 0x8847, 0x8848
ETH_PPPOED, ETH_PPPOES = 0x8863, 0x8864
PROTO_HOPOPTS, PROTO_ICMP, PROTO_IGMP, PROTO_TCP, PROTO_UDP = 0, 1, 2, 6, 17
PROTO_ROUTING, PROTO_FRAGMENT, PROTO_ESP, PROTO_AH, PROTO_ICMP6 = 43, 44, 50, 51, 58
PROTO_NONE, PROTO_DSTOPTS, PROTO_IGRP, PROTO_PIM, PROTO_VRRP, PROTO_SCTP = 59, 60, 9, 103, 112, 132
PPP_IP, PPP_IP6 = 0x0021, 0x0057

# Pools drawn from the corpus pcaps and the expression list: frames built from them hit
# `host`, `net`, `port` and `ether host` filters with useful probability.
IP4_POOL = ["10.0.0.1", "10.0.0.2", "10.0.0.20", "10.1.1.2", "10.2.1.2", "192.168.1.249",
            "192.168.1.172", "131.151.32.21", "127.0.0.1", "172.16.1.101", "224.0.0.13",
            "224.0.0.2", "224.0.0.18", "239.255.255.250", "255.255.255.255", "0.0.0.0",
            "192.168.1.255", "10.255.255.255"]
IP6_POOL = ["fe80::1", "fe80::2", "ff02::1:6", "ff02::5", "ff02::1", "10::1", "10::2", "::1",
            "2001:db8::1", "2001:db8:0:1::42", "fe80::e091:f5ff:fecc:7abd", "::"]
MAC_POOL = ["ff:ff:ff:ff:ff:ff", "00:60:08:9f:b1:f3", "00:e0:f9:cc:18:00", "01:00:5e:00:00:02",
            "33:33:00:01:00:06", "00:10:18:b3:8f:10", "00:00:00:00:00:00", "01:80:c2:00:00:00"]
PORT_POOL = [80, 53, 22, 443, 179, 20, 21, 23, 0, 7, 25, 67, 68, 123, 500, 1024, 1985, 2000,
             4500, 6633, 8080, 49152, 65535]
ETHERTYPE_POOL = [ETH_IP, ETH_ARP, ETH_RARP, ETH_IP6, ETH_8021Q, ETH_8021AD, ETH_QINQ_OLD,
                  ETH_MPLS, ETH_MPLS_MC, ETH_PPPOED, ETH_PPPOES, 0x0600, 0x05DC, 0x0026,
                  0x6003, 0x809B, 0x80F3, 0x8137, 0x88CC, 0x88F7, 0xFFFF]
IPPROTO_POOL = [PROTO_ICMP, PROTO_IGMP, PROTO_TCP, PROTO_UDP, PROTO_IGRP, PROTO_ESP, PROTO_AH,
                PROTO_ICMP6, PROTO_PIM, PROTO_VRRP, PROTO_SCTP, 4, 41, 47, 89, 255]


def mac(text):
    """'aa:bb:cc:dd:ee:ff' -> 6 bytes."""
    return bytes(int(x, 16) for x in text.split(":"))


def ip4(text):
    return ipaddress.IPv4Address(text).packed


def ip6(text):
    return ipaddress.IPv6Address(text).packed


def _csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# --- link layer --------------------------------------------------------------------------

def vlan_tag(vid, pcp=0, dei=0, tpid=ETH_8021Q):
    """One 802.1Q/802.1ad tag as (tpid, tci), for ether(tags=...)."""
    return tpid, (pcp << 13) | (dei << 12) | (vid & 0xFFF)


def ether(dst, src, ethertype, payload=b"", tags=(), pad=True):
    """Ethernet II frame; `tags` (outermost first) are (tpid, tci) pairs; padded to 60 bytes."""
    out = mac(dst) + mac(src)
    for tpid, tci in tags:
        out += struct.pack("!HH", tpid, tci)
    out += struct.pack("!H", ethertype) + payload
    if pad and len(out) < 60:
        out += bytes(60 - len(out))
    return out


def llc(dst, src, dsap=0x42, ssap=0x42, ctrl=0x03, payload=b""):
    """802.3 frame with a length field and an LLC header (STP, ISO, NetBEUI ...)."""
    body = bytes([dsap, ssap, ctrl]) + payload
    return ether(dst, src, len(body), body)


def mpls(labels, payload, ttl=64):
    """MPLS label stack (outermost first) followed by payload; bottom-of-stack set on the last."""
    out = b""
    for i, label in enumerate(labels):
        bos = 1 if i == len(labels) - 1 else 0
        out += struct.pack("!I", (label << 12) | (bos << 8) | ttl)
    return out + payload


def pppoe_discovery(code=0x09, session=0, tags=b""):
    """PPPoE discovery header (PADI=0x09, PADO=0x07 ...); ethertype ETH_PPPOED."""
    return struct.pack("!BBHH", 0x11, code, session, len(tags)) + tags


def pppoe_session(session, ppp_proto, payload):
    """PPPoE session header plus PPP protocol field; ethertype ETH_PPPOES."""
    return struct.pack("!BBHHH", 0x11, 0, session, len(payload) + 2, ppp_proto) + payload


def arp(op=1, sha="00:60:08:9f:b1:f3", spa="10.0.0.1", tha="00:00:00:00:00:00", tpa="10.0.0.2",
        htype=1, ptype=ETH_IP):
    """ARP/RARP body (op 1/2 ARP, 3/4 RARP); use ethertype ETH_ARP or ETH_RARP."""
    return (struct.pack("!HHBBH", htype, ptype, 6, 4, op) + mac(sha) + ip4(spa)
            + mac(tha) + ip4(tpa))


# --- network layer -----------------------------------------------------------------------

def ipv4(src, dst, proto, payload=b"", ttl=64, ident=0, df=False, mf=False, frag_offset=0,
         options=b"", tos=0, total_length=None, version=4, ihl=None):
    """IPv4 header + payload. frag_offset is in 8-byte units; options padded to 4 bytes.

    ihl/total_length/version override the computed fields for malformed-packet tests.
    """
    options += bytes(-len(options) % 4)
    hl = 5 + len(options) // 4 if ihl is None else ihl
    tl = 20 + len(options) + len(payload) if total_length is None else total_length
    flags = (0x4000 if df else 0) | (0x2000 if mf else 0) | (frag_offset & 0x1FFF)
    hdr = struct.pack("!BBHHHBBH4s4s", (version << 4) | (hl & 0xF), tos, tl & 0xFFFF, ident,
                      flags, ttl, proto, 0, ip4(src), ip4(dst)) + options
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + payload


def ipv6_ext(kind, body=b""):
    """An IPv6 extension header for ipv6(exts=...): (kind, body without next-header byte).

    kind: PROTO_HOPOPTS, PROTO_ROUTING, PROTO_DSTOPTS (length in 8-byte units, padded),
    PROTO_FRAGMENT (body = 7 bytes: reserved, offset/flags, id), PROTO_AH (length in
    4-byte units minus 2, as RFC 4302 and libpcap's protochain read it).
    """
    if kind == PROTO_FRAGMENT:
        return kind, (body + bytes(7))[:7]
    if kind == PROTO_AH:
        body += bytes(-(len(body) + 2) % 4)
        if len(body) < 10:
            body += bytes(10 - len(body))
        return kind, bytes([(len(body) + 2) // 4 - 2]) + body
    body += bytes(-(len(body) + 2) % 8)
    return kind, bytes([(len(body) + 2) // 8 - 1]) + body


def fragment6(offset=0, more=False, ident=0x1234):
    """IPv6 fragment extension header; offset in 8-byte units."""
    return ipv6_ext(PROTO_FRAGMENT, struct.pack("!BHI", 0, (offset << 3) | int(more), ident))


def ipv6(src, dst, nh, payload=b"", hlim=64, exts=(), tclass=0, flow=0, plen=None):
    """IPv6 header, extension headers `exts` (ipv6_ext values, in order), then payload."""
    chain = b""
    for i in range(len(exts) - 1, -1, -1):
        kind, body = exts[i]
        chain = bytes([nh]) + body + chain
        nh = kind
    rest = chain + payload
    first = (6 << 28) | (tclass << 20) | (flow & 0xFFFFF)
    return struct.pack("!IHBB", first, len(rest) if plen is None else plen, nh, hlim) \
        + ip6(src) + ip6(dst) + rest


# --- transport layer ---------------------------------------------------------------------

TCP_FIN, TCP_SYN, TCP_RST, TCP_PUSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)


def tcp(sport, dport, flags=TCP_SYN, seq=1, ack=0, window=65535, options=b"", payload=b""):
    options += bytes(-len(options) % 4)
    off = 5 + len(options) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, window, 0, 0) \
        + options + payload


def udp(sport, dport, payload=b""):
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def sctp(sport, dport, payload=b"", vtag=0):
    return struct.pack("!HHII", sport, dport, vtag, 0) + payload


def icmp(type_, code=0, payload=b"\0\0\0\0"):
    """ICMP (v4) message; echo request is icmp(8), reply icmp(0)."""
    return struct.pack("!BBH", type_, code, 0) + payload


def icmp6(type_, code=0, payload=b"\0\0\0\0"):
    """ICMPv6 message; echo request is icmp6(128), neighbor solicitation icmp6(135)."""
    return struct.pack("!BBH", type_, code, 0) + payload


def igmp(type_=0x16, group="224.0.0.2", max_resp=0):
    return struct.pack("!BBH", type_, max_resp, 0) + ip4(group)


def truncate(frame, caplen):
    """Snap a full frame: (data[:caplen], wirelen=len(frame)) — what a short snaplen gives."""
    return frame[:caplen], len(frame)


# --- hypothesis strategies ---------------------------------------------------------------

def _pool(values, fallback):
    """Mostly pool values (so filters match), sometimes anything (so they also miss)."""
    return st.one_of(st.sampled_from(values), st.sampled_from(values), st.sampled_from(values),
                     fallback)


macs = _pool(MAC_POOL, st.binary(min_size=6, max_size=6).map(lambda b: b.hex(":")))
ip4_addrs = _pool(IP4_POOL, st.integers(0, 2**32 - 1).map(
    lambda n: str(ipaddress.IPv4Address(n))))
ip6_addrs = _pool(IP6_POOL, st.integers(0, 2**128 - 1).map(
    lambda n: str(ipaddress.IPv6Address(n))))
ports = _pool(PORT_POOL, st.integers(0, 65535))
ethertypes = _pool(ETHERTYPE_POOL, st.integers(0, 65535))
# TCP and UDP carry most port/portrange primitives, so they get their own branch.
ip_protos = st.one_of(st.sampled_from([PROTO_TCP, PROTO_UDP]), st.sampled_from(IPPROTO_POOL),
                      st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_SCTP]),
                      st.integers(0, 255))
small_bytes = st.binary(max_size=24)


@st.composite
def transport(draw, proto):
    """A transport payload for `proto`: real header for TCP/UDP/SCTP/ICMP/IGMP, else bytes."""
    data = draw(small_bytes)
    if proto == PROTO_TCP:
        return tcp(draw(ports), draw(ports), draw(st.integers(0, 255)),
                   options=draw(st.sampled_from([b"", b"\x02\x04\x05\xb4", bytes(12)])),
                   payload=data)
    if proto == PROTO_UDP:
        return udp(draw(ports), draw(ports), data)
    if proto == PROTO_SCTP:
        return sctp(draw(ports), draw(ports), data)
    if proto in (PROTO_ICMP, PROTO_ICMP6):
        return icmp(draw(st.sampled_from([0, 3, 5, 8, 11, 128, 129, 133, 135, 136, 143])
                         | st.integers(0, 255)), draw(st.integers(0, 3)), data)
    if proto == PROTO_IGMP:
        return igmp(draw(st.sampled_from([0x11, 0x12, 0x16, 0x17, 0x22])), draw(ip4_addrs))
    return data


@st.composite
def ipv4_packets(draw, proto=None):
    """IPv4 packets: options, DF/MF, fragment offsets, odd IHL/version now and then."""
    proto = draw(ip_protos) if proto is None else proto
    frag = draw(st.sampled_from([(False, 0), (False, 0), (False, 0), (True, 0), (True, 185),
                                 (False, 185), (False, 1)]))
    options = draw(st.sampled_from([b"", b"", b"", b"\x94\x04\x00\x00", b"\x01" * 8,
                                    bytes(40)]))
    ihl = draw(st.sampled_from([None] * 8 + [0, 4, 15]))
    version = draw(st.sampled_from([4] * 10 + [6, 0]))
    return ipv4(draw(ip4_addrs), draw(ip4_addrs), proto, draw(transport(proto)),
                ttl=draw(st.sampled_from([1, 64, 255])), ident=draw(st.integers(0, 65535)),
                df=draw(st.booleans()), mf=frag[0], frag_offset=frag[1], options=options,
                tos=draw(st.integers(0, 255)), ihl=ihl, version=version)


ext_headers = st.sampled_from([
    ipv6_ext(PROTO_HOPOPTS), ipv6_ext(PROTO_HOPOPTS, bytes(12)), ipv6_ext(PROTO_DSTOPTS),
    ipv6_ext(PROTO_ROUTING, b"\x00\x00" + bytes(4)),
    ipv6_ext(PROTO_ROUTING, b"\x00\x01" + bytes(4) + ip6("2001:db8::1")),
    fragment6(), fragment6(offset=100, more=True), ipv6_ext(PROTO_AH, bytes(14)),
])


@st.composite
def ipv6_packets(draw, proto=None):
    """IPv6 packets with 0-3 extension headers (hop-by-hop, routing, fragment, dest-opts, AH)."""
    proto = draw(ip_protos | st.sampled_from([PROTO_NONE])) if proto is None else proto
    exts = draw(st.lists(ext_headers, max_size=3))
    return ipv6(draw(ip6_addrs), draw(ip6_addrs), proto, draw(transport(proto)),
                exts=tuple(exts), hlim=draw(st.sampled_from([1, 64, 255])))


@st.composite
def arp_packets(draw):
    """(ethertype, body): ARP or RARP with pool addresses, sometimes odd hardware sizes."""
    rarp = draw(st.booleans())
    body = arp(op=draw(st.sampled_from([3, 4] if rarp else [1, 2])), sha=draw(macs),
               spa=draw(ip4_addrs), tha=draw(macs), tpa=draw(ip4_addrs),
               ptype=draw(st.sampled_from([ETH_IP, ETH_IP, ETH_IP6])))
    return (ETH_RARP if rarp else ETH_ARP), body


@st.composite
def l3_payloads(draw):
    """(ethertype, payload) for everything that can follow an Ethernet/VLAN header."""
    kind = draw(st.sampled_from(["ip", "ip", "ip", "ip6", "ip6", "arp", "mpls", "pppoes",
                                 "pppoed", "raw"]))
    if kind == "ip":
        return ETH_IP, draw(ipv4_packets())
    if kind == "ip6":
        return ETH_IP6, draw(ipv6_packets())
    if kind == "arp":
        return draw(arp_packets())
    if kind == "mpls":
        inner = draw(st.sampled_from(["ip", "ip6", "raw"]))
        payload = (draw(ipv4_packets()) if inner == "ip" else
                   draw(ipv6_packets()) if inner == "ip6" else draw(small_bytes))
        labels = draw(st.lists(st.sampled_from([0, 3, 16, 100, 1024, 0xFFFFF]) |
                               st.integers(0, 0xFFFFF), min_size=1, max_size=3))
        return draw(st.sampled_from([ETH_MPLS, ETH_MPLS_MC])), mpls(labels, payload)
    if kind == "pppoes":
        ppp = draw(st.sampled_from([PPP_IP, PPP_IP6, 0xC021]))
        payload = (draw(ipv4_packets()) if ppp == PPP_IP else
                   draw(ipv6_packets()) if ppp == PPP_IP6 else draw(small_bytes))
        return ETH_PPPOES, pppoe_session(draw(st.sampled_from([0, 1, 0x1234, 0xFFFF])),
                                         ppp, payload)
    if kind == "pppoed":
        return ETH_PPPOED, pppoe_discovery(draw(st.sampled_from([0x09, 0x07, 0x19, 0xA7])),
                                           draw(st.sampled_from([0, 0x1234])))
    return draw(ethertypes), draw(st.binary(max_size=64))


vlan_tags = st.builds(vlan_tag, st.sampled_from([0, 1, 5, 10, 100, 200, 1213, 4095]) |
                      st.integers(0, 4095), st.integers(0, 7), st.integers(0, 1),
                      st.sampled_from([ETH_8021Q, ETH_8021Q, ETH_8021AD, ETH_QINQ_OLD]))


@st.composite
def full_frames(draw):
    """Untruncated Ethernet frames as bytes: untagged, VLAN-tagged (1-3 tags, 802.1Q/802.1ad/
    0x9100), 802.3/LLC, with any supported payload (IPv4/IPv6/ARP/MPLS/PPPoE/raw)."""
    shape = draw(st.sampled_from(["plain", "plain", "tagged", "tagged", "llc"]))
    if shape == "llc":
        return llc(draw(macs), draw(macs), payload=draw(small_bytes))
    ethertype, payload = draw(l3_payloads())
    tags = draw(st.lists(vlan_tags, min_size=1, max_size=3)) if shape == "tagged" else []
    return ether(draw(macs), draw(macs), ethertype, payload, tags=tags, pad=draw(st.booleans()))


# --- seeded generator ---------------------------------------------------------------------
# Hypothesis concentrates on a few shapes per run (it reuses choice prefixes), which left whole
# primitives (mpls, icmp6, port 53 ...) unhit in 1000 examples. A frame built from a seeded
# random.Random spreads evenly over every shape; hypothesis still picks and reports the seed.

def _pick(rng, pool, other):
    return rng.choice(pool) if rng.random() < 0.8 else other()


def _rand_ip4(rng):
    return _pick(rng, IP4_POOL, lambda: str(ipaddress.IPv4Address(rng.getrandbits(32))))


def _rand_ip6(rng):
    return _pick(rng, IP6_POOL, lambda: str(ipaddress.IPv6Address(rng.getrandbits(128))))


def _rand_mac(rng):
    return _pick(rng, MAC_POOL, lambda: rng.randbytes(6).hex(":"))


def _rand_port(rng):
    if rng.random() < 0.4:      # the ports most expressions name
        return rng.choice(PORT_POOL[:5])
    return _pick(rng, PORT_POOL, lambda: rng.randrange(65536))


def _rand_bytes(rng, n=24):
    return rng.randbytes(rng.randrange(n + 1))


def _rand_transport(rng, proto):
    data = _rand_bytes(rng)
    if proto == PROTO_TCP:
        return tcp(_rand_port(rng), _rand_port(rng), rng.choice(
            [TCP_SYN, TCP_ACK, TCP_SYN | TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST, rng.randrange(256)]),
            options=rng.choice([b"", b"\x02\x04\x05\xb4", bytes(12)]), payload=data)
    if proto == PROTO_UDP:
        return udp(_rand_port(rng), _rand_port(rng), data)
    if proto == PROTO_SCTP:
        return sctp(_rand_port(rng), _rand_port(rng), data)
    if proto in (PROTO_ICMP, PROTO_ICMP6):
        return icmp(rng.choice([0, 3, 5, 8, 11, 128, 129, 133, 135, 136, 143, rng.randrange(256)]),
                    rng.randrange(4), data)
    if proto == PROTO_IGMP:
        return igmp(rng.choice([0x11, 0x12, 0x16, 0x17, 0x22]), _rand_ip4(rng))
    return data


def _rand_proto(rng):
    return rng.choice([PROTO_TCP, PROTO_UDP, PROTO_TCP, PROTO_UDP, rng.choice(IPPROTO_POOL),
                       rng.choice(IPPROTO_POOL), rng.randrange(256)])


def random_ipv4(rng, proto=None):
    proto = _rand_proto(rng) if proto is None else proto
    mf, off = rng.choice([(False, 0)] * 4 + [(True, 0), (True, 185), (False, 185), (False, 1)])
    return ipv4(_rand_ip4(rng), _rand_ip4(rng), proto, _rand_transport(rng, proto),
                ttl=rng.choice([1, 64, 255]), ident=rng.randrange(65536), df=rng.random() < 0.5,
                mf=mf, frag_offset=off,
                options=rng.choice([b""] * 4 + [b"\x94\x04\x00\x00", b"\x01" * 8, bytes(40)]),
                tos=rng.randrange(256), ihl=rng.choice([None] * 12 + [0, 4, 15]),
                version=rng.choice([4] * 12 + [6, 0]))


_EXT6 = [ipv6_ext(PROTO_HOPOPTS), ipv6_ext(PROTO_HOPOPTS, bytes(12)), ipv6_ext(PROTO_DSTOPTS),
         ipv6_ext(PROTO_ROUTING, b"\x00\x00" + bytes(4)),
         ipv6_ext(PROTO_ROUTING, b"\x00\x01" + bytes(4) + ip6("2001:db8::1")),
         fragment6(), fragment6(offset=100, more=True), ipv6_ext(PROTO_AH, bytes(14))]


def random_ipv6(rng, proto=None):
    proto = (rng.choice([PROTO_ICMP6, PROTO_NONE]) if rng.random() < 0.2 else _rand_proto(rng)) \
        if proto is None else proto
    exts = [rng.choice(_EXT6) for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3]))]
    return ipv6(_rand_ip6(rng), _rand_ip6(rng), proto, _rand_transport(rng, proto),
                exts=tuple(exts), hlim=rng.choice([1, 64, 255]))


def random_l3(rng):
    """(ethertype, payload) for anything that can follow an Ethernet/VLAN header."""
    kind = rng.choice(["ip"] * 4 + ["ip6"] * 3 + ["arp", "rarp", "mpls", "pppoes", "pppoed",
                                                   "raw"])
    if kind == "ip":
        return ETH_IP, random_ipv4(rng)
    if kind == "ip6":
        return ETH_IP6, random_ipv6(rng)
    if kind in ("arp", "rarp"):
        return (ETH_ARP, ETH_RARP)[kind == "rarp"], arp(
            rng.choice([1, 2, 3, 4]), _rand_mac(rng), _rand_ip4(rng), _rand_mac(rng),
            _rand_ip4(rng), ptype=rng.choice([ETH_IP, ETH_IP, ETH_IP6]))
    if kind == "mpls":
        inner = rng.choice(["ip", "ip6", "raw"])
        payload = (random_ipv4(rng) if inner == "ip" else random_ipv6(rng) if inner == "ip6"
                   else _rand_bytes(rng))
        labels = [rng.choice([0, 3, 16, 100, 200, 1024, 0xFFFFF, rng.randrange(1 << 20)])
                  for _ in range(rng.choice([1, 1, 2, 3]))]
        return rng.choice([ETH_MPLS, ETH_MPLS, ETH_MPLS_MC]), mpls(labels, payload)
    if kind == "pppoes":
        ppp = rng.choice([PPP_IP, PPP_IP6, 0xC021])
        payload = (random_ipv4(rng) if ppp == PPP_IP else random_ipv6(rng) if ppp == PPP_IP6
                   else _rand_bytes(rng))
        return ETH_PPPOES, pppoe_session(rng.choice([0, 1, 0x1234, 0xFFFF]), ppp, payload)
    if kind == "pppoed":
        return ETH_PPPOED, pppoe_discovery(rng.choice([0x09, 0x07, 0x19, 0xA7]),
                                           rng.choice([0, 0x1234]))
    return _pick(rng, ETHERTYPE_POOL, lambda: rng.randrange(65536)), _rand_bytes(rng, 64)


def random_frame(rng, truncated=True):
    """(data, wirelen) from a random.Random: the frames() distribution without hypothesis."""
    shape = rng.choice(["plain"] * 5 + ["tagged"] * 3 + ["llc"])
    if shape == "llc":
        frame = llc(_rand_mac(rng), _rand_mac(rng), payload=_rand_bytes(rng))
    else:
        ethertype, payload = random_l3(rng)
        tags = [vlan_tag(rng.choice([0, 1, 5, 10, 100, 200, 1213, 4095, rng.randrange(4096)]),
                         rng.randrange(8), rng.randrange(2),
                         rng.choice([ETH_8021Q, ETH_8021Q, ETH_8021AD, ETH_QINQ_OLD]))
                for _ in range(rng.choice([1, 1, 2, 3]) if shape == "tagged" else 0)]
        frame = ether(_rand_mac(rng), _rand_mac(rng), ethertype, payload, tags=tags,
                      pad=rng.random() < 0.7)
    how = rng.choice(["full"] * 7 + ["snap", "cut", "wirelen"]) if truncated else "full"
    if how == "snap":
        return truncate(frame, rng.randrange(len(frame) + 1))
    if how == "cut":
        cut = frame[:rng.randrange(len(frame) + 1)]
        return cut, len(cut)
    if how == "wirelen":
        return frame, len(frame) + rng.randrange(1501)
    return frame, len(frame)


def frames(truncated=True):
    """Strategy for (data, wirelen): full frames and, when `truncated`, snapped or cut ones.

    A snapped frame keeps wirelen > len(data) (short snaplen); a cut frame has wirelen ==
    len(data) but ends early (a runt); both drive loads past the end of the buffer. Two thirds
    come from the seeded generator (even spread), one third from the structured strategies
    (which shrink to readable counterexamples).
    """
    seeded = st.integers(0, 2**64 - 1).map(
        lambda seed: random_frame(random.Random(seed), truncated))
    return st.one_of(seeded, seeded, structured_frames(truncated))


@st.composite
def structured_frames(draw, truncated=True):
    frame = draw(full_frames())
    if truncated:
        how = draw(st.sampled_from(["full"] * 6 + ["snap", "cut", "wirelen"]))
        if how == "snap":
            return truncate(frame, draw(st.integers(0, len(frame))))
        if how == "cut":
            cut = frame[:draw(st.integers(0, len(frame)))]
            return cut, len(cut)
        if how == "wirelen":
            return frame, len(frame) + draw(st.integers(0, 1500))
    return frame, len(frame)


def short_frames():
    """(data, wirelen) with 0-64 random bytes: runts and garbage."""
    return st.binary(max_size=64).map(lambda b: (b, len(b)))
