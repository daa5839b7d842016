"""Flow export (--ipfix, issue 26) into the collectors fleets run: nfdump's nfcapd and
pmacct's nfacctd (Debian's packages) receive what lpd sends and decode it themselves;
tshark's reading of the same capture is the oracle of every flow's octets and packets
(the IP length of every IP packet, as RFC 7012 counts them: no Ethernet padding, no
frame whose IP length runs past it). nfcapd reports sequence errors itself.

Offline: lpd -r on a capture built here (TCP, UDP, ICMP and ICMPv6 pairs, a one-way
ICMP error, GRE behind a VLAN tag, IPv4 and IPv6 fragments, padding, a malformed frame,
ARP), a ten-minute flow against --flow-active-timeout, a spoofed flood against
--conn-max, collectors that are not there. Live (root): lpd on a veth pair under both
engines against tcpdump's capture of the same interface, and a collector that starts
late and restarts."""
import collections
import json
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

import lpd
import netns
from harness import (COLLECTOR_START, LPD, Lpd, Nfcapd, children, free_port, metrics, value,
                     wait_for, write_pcap)
from packets import (ETH_IP, ETH_IP6, PROTO_TCP, PROTO_UDP, ether, fragment6, icmp, icmp6, ipv4,
                     ipv6, tcp, udp, vlan_tag)

A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
SYN, ACK, FIN, PSH = 0x02, 0x10, 0x01, 0x08
T0 = 1_700_000_000
MS = 0.001


# --- pmacct's collector, as a process (nfcapd's is in harness.py) ----------------------------

class Nfacctd:
    """pmacct's nfacctd with its print plugin writing JSON lines, stopped by PID."""

    def __init__(self, tmp_path, port):
        self.out = tmp_path / "nfacctd.json"
        conf = tmp_path / "nfacctd.conf"
        conf.write_text(f"""daemonize: false
nfacctd_ip: 127.0.0.1
nfacctd_port: {port}
plugins: print
print_output: json
print_output_file: {self.out}
print_output_file_append: true
print_refresh_time: 1
aggregate: src_host, dst_host, src_port, dst_port, proto, tos, timestamp_start, timestamp_end
""")
        self.log_path = tmp_path / "nfacctd.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["nfacctd", "-f", str(conf)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        assert wait_for(lambda: b"waiting for NetFlow/IPFIX data" in self.log_path.read_bytes(),
                        COLLECTOR_START), self.log_path.read_text()

    def stop(self):
        """Its records: SIGINT is pmacct's "purge the caches and exit"."""
        stop_nfacctd(self.proc)
        self.log.close()
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]


def stop_nfacctd(proc):
    """SIGINT (pmacct's "purge the caches and exit"); one that does not end in 10 s is
    killed with its plugin processes, by PID, and the test fails."""
    plugins = children(proc.pid)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        for pid in (proc.pid, *plugins):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(5)
        raise AssertionError("nfacctd did not stop on SIGINT") from None


# --- the oracle: tshark's reading of the capture ---------------------------------------------

TSHARK_FIELDS = ("frame.time_epoch", "frame.len", "vlan.id", "ip.src", "ip.dst", "ip.len",
                 "ip.proto", "ip.frag_offset", "ipv6.src", "ipv6.dst", "ipv6.plen",
                 "ipv6.fraghdr.offset", "tcp.srcport", "tcp.dstport", "udp.srcport",
                 "udp.dstport", "icmp.type", "icmp.code", "icmpv6.type", "icmpv6.code")


class Packet(collections.namedtuple("Packet", "ts src dst octets proto sport dport icmp fragment")):
    """One IP packet as tshark reads it (the outermost header): its IP length, its
    transport's ports (ICMP: type and code in `icmp`), whether it is a fragment."""


def ip_packets(pcap):
    """Every IP packet of a capture with the octets a flow counts for it; a packet
    whose IP length runs past its frame has none (left out)."""
    cmd = ["tshark", "-r", str(pcap), "-n", "-o", "ip.defragment:FALSE", "-o",
           "ipv6.defragment:FALSE", "-T", "fields", "-E", "separator=|", "-E", "occurrence=a"]
    for f in TSHARK_FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    packets = []
    for line in out.splitlines():
        f = dict(zip(TSHARK_FIELDS, line.split("|")))
        first = {k: v.split(",")[0] for k, v in f.items()}
        l2 = 14 + 4 * len([v for v in f["vlan.id"].split(",") if v])
        if first["ip.src"]:
            src, dst, octets = first["ip.src"], first["ip.dst"], int(first["ip.len"])
            proto = int(first["ip.proto"])
            fragment = first["ip.frag_offset"] not in ("", "0") or proto == PROTO_UDP and not first["udp.srcport"]
        elif first["ipv6.src"]:
            src, dst, octets = first["ipv6.src"], first["ipv6.dst"], 40 + int(first["ipv6.plen"])
            proto = None
            fragment = bool(first["ipv6.fraghdr.offset"])
        else:
            continue
        if l2 + octets > int(first["frame.len"]):
            continue                                 # malformed: no flow's
        sport = first["tcp.srcport"] or first["udp.srcport"]
        dport = first["tcp.dstport"] or first["udp.dstport"]
        kind = first["icmp.type"] or first["icmpv6.type"]
        code = first["icmp.code"] or first["icmpv6.code"]
        packets.append(Packet(float(first["frame.time_epoch"]), src, dst, octets, proto,
                              int(sport) if sport else None, int(dport) if dport else None,
                              (int(kind), int(code)) if kind else None, fragment))
    return packets


def by_pair(rows):
    """{(src, dst): [octets, packets]}"""
    out = collections.defaultdict(lambda: [0, 0])
    for src, dst, octets, pkts in rows:
        out[src, dst][0] += octets
        out[src, dst][1] += pkts
    return dict(out)


def nfdump_rows(flows):
    return [(f.get("src4_addr") or f.get("src6_addr"), f.get("dst4_addr") or f.get("dst6_addr"),
             f["in_bytes"], f["in_packets"]) for f in flows]


def epoch(text):
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()


# --- captures built here ---------------------------------------------------------------------

def t4(src, dst, sport, dport, flags, seq=1, ack=0, data=b"", tos=0):
    return ether(B, A, ETH_IP, ipv4(src, dst, PROTO_TCP, tcp(sport, dport, flags=flags, seq=seq,
                                                             ack=ack, payload=data), tos=tos))


def mixed_frames():
    """(seconds after T0, frame) of every kind of IP packet a flow counts, and some
    that no flow counts."""
    c, s = "10.1.0.1", "10.1.0.2"
    frames = [
        # a TCP conversation, small frames padded to 60 bytes by the link
        (0.000, t4(c, s, 40000, 80, SYN, 100, tos=0x10)),
        (0.001, t4(s, c, 80, 40000, SYN | ACK, 500, 101)),
        (0.002, t4(c, s, 40000, 80, ACK, 101, 501)),
        (0.003, t4(c, s, 40000, 80, PSH | ACK, 101, 501, b"GET / HTTP/1.0\r\n\r\n")),
        (0.010, t4(s, c, 80, 40000, PSH | ACK, 501, 119, b"x" * 1200)),
        (0.011, t4(c, s, 40000, 80, FIN | ACK, 119, 1701)),
        (0.012, t4(s, c, 80, 40000, FIN | ACK, 1701, 120)),
        (0.013, t4(c, s, 40000, 80, ACK, 120, 1702)),
        # UDP over IPv6 with a traffic class
        (0.100, ether(B, A, ETH_IP6, ipv6("fd00:1::1", "fd00:1::2", PROTO_UDP,
                                          udp(5353, 53, b"q" * 30), tclass=0xB8))),
        (0.101, ether(A, B, ETH_IP6, ipv6("fd00:1::2", "fd00:1::1", PROTO_UDP,
                                          udp(53, 5353, b"a" * 90)))),
        # a one-way ICMP error (its code is the responder's port), then ICMPv6 echo
        (0.300, ether(A, B, ETH_IP, ipv4(s, c, 1, icmp(3, 3, b"\0" * 4 + b"e" * 28)))),
        (0.400, ether(B, A, ETH_IP6, ipv6("fd00:1::1", "fd00:1::2", 58, icmp6(128, 0, b"p" * 60)))),
        (0.401, ether(A, B, ETH_IP6, ipv6("fd00:1::2", "fd00:1::1", 58, icmp6(129, 0, b"p" * 60)))),
        # GRE behind a VLAN tag: addresses and protocol only
        (0.500, ether(B, A, ETH_IP, ipv4("10.7.0.1", "10.7.0.2", 47, b"g" * 100), tags=[vlan_tag(7)])),
        # a UDP datagram in two IPv4 fragments, and one in two IPv6 fragments
        (0.600, ether(B, A, ETH_IP, ipv4(c, s, PROTO_UDP, udp(7000, 7001, b"f" * 32)[:40], ident=77,
                                         mf=True))),
        (0.601, ether(B, A, ETH_IP, ipv4(c, s, PROTO_UDP, b"f" * 24, ident=77, frag_offset=5))),
        (0.700, ether(B, A, ETH_IP6, ipv6("fd00:1::1", "fd00:1::2", PROTO_UDP,
                                          udp(7002, 7003, b"h" * 32)[:24],
                                          exts=[fragment6(0, True, 99)]))),
        (0.701, ether(B, A, ETH_IP6, ipv6("fd00:1::1", "fd00:1::2", PROTO_UDP, b"h" * 16,
                                          exts=[fragment6(3, False, 99)]))),
        # an IP length past the frame: malformed, no flow's; ARP: not IP
        (0.800, ether(B, A, ETH_IP, ipv4(c, s, PROTO_UDP, udp(1, 2, b"m" * 10), total_length=1000))),
        (0.900, ether(B, A, 0x0806, b"\0" * 28)),
    ]
    # ICMP echo, three rounds: one connection (request type 8, reply type 0)
    for i in range(3):
        frames.append((0.200 + i * 0.01, ether(B, A, ETH_IP, ipv4(c, s, 1, icmp(8, 0, bytes(4) + b"p" * 52)))))
        frames.append((0.201 + i * 0.01, ether(A, B, ETH_IP, ipv4(s, c, 1, icmp(0, 0, bytes(4) + b"p" * 52)))))
    return sorted(frames, key=lambda f: f[0])


def write_frames(path, frames, t0=T0):
    write_pcap(path, [(t0 + int(t), round((t - int(t)) * 1e6), data) for t, data in frames])


def replay(pcap, *args, prefix=(), timeout=300):
    p = subprocess.run([*prefix, sys.executable, LPD, "-r", str(pcap), *args], capture_output=True,
                       text=True, timeout=timeout)
    assert "Traceback" not in p.stderr, p.stderr
    return p


# --- offline ---------------------------------------------------------------------------------

@pytest.mark.offline
def test_both_collectors_decode_every_packet_octet_for_octet(tmp_path):
    pcap = tmp_path / "mixed.pcap"
    write_frames(pcap, mixed_frames())
    oracle = ip_packets(pcap)
    assert len(oracle) == len(mixed_frames()) - 2     # the malformed frame and ARP are not IP's
    nfcapd = Nfcapd(tmp_path, free_port())
    nfacctd = Nfacctd(tmp_path, free_port())
    p = replay(pcap, "--ipfix", f"127.0.0.1:{nfcapd_port(nfcapd)}",
               "--ipfix", f"127.0.0.1:{nfacctd_port(tmp_path)}", "--output", "json")
    assert p.returncode == 0, p.stderr
    flows, accounted = nfcapd.stop(), nfacctd.stop()
    assert nfcapd.sequence_errors() == 0

    # every packet's octets, per address pair and in all, in nfdump's decoding
    want = by_pair((x.src, x.dst, x.octets, 1) for x in oracle)
    assert by_pair(nfdump_rows(flows)) == want
    assert sum(f["in_bytes"] for f in flows) == sum(x.octets for x in oracle)
    # and in nfacctd's
    assert by_pair((r["ip_src"], r["ip_dst"], r["bytes"], r["packets"]) for r in accounted) == want

    # each flow: its transport, ports or ICMP type and code, times within its packets
    def key(f):
        return (f.get("src4_addr") or f.get("src6_addr"), f.get("dst4_addr") or f.get("dst6_addr"),
                f["proto"], f.get("src_port", 0), f.get("dst_port", 0), f.get("icmp_type"))
    records = {key(f): f for f in flows}
    assert len(records) == len(flows)                 # uniflow: one record per direction
    tcp_out = records["10.1.0.1", "10.1.0.2", 6, 40000, 80, None]
    sent = [x for x in oracle if x.src == "10.1.0.1" and x.sport == 40000]
    assert (tcp_out["in_packets"], tcp_out["in_bytes"]) == (len(sent), sum(x.octets for x in sent))
    assert sent[0].ts - MS <= epoch(tcp_out["first"]) and epoch(tcp_out["last"]) <= sent[-1].ts + MS
    assert tcp_out["tcp_flags"].replace(".", "") and set(tcp_out["tcp_flags"]) >= set("APSF")
    assert tcp_out["src_tos"] == 0x10
    echo = [f for f in flows if f["proto"] == 1 and f.get("icmp_type") == 8]
    reply = [f for f in flows if f["proto"] == 1 and f.get("icmp_type") == 0]
    assert [(f["in_packets"], f["in_bytes"]) for f in echo] == [(3, 3 * (20 + 4 + 56))]
    assert [(f["in_packets"], f["in_bytes"]) for f in reply] == [(3, 3 * (20 + 4 + 56))]
    unreachable = [f for f in flows if f["proto"] == 1 and f.get("icmp_type") == 3]
    assert [(f["icmp_code"], f["in_bytes"]) for f in unreachable] == [(3, 20 + 4 + 32)]
    echo6 = sorted((f["icmp_type"], f["in_bytes"]) for f in flows if f["proto"] == 58)
    assert echo6 == [(128, 40 + 64), (129, 40 + 64)]
    gre = [f for f in flows if f["proto"] == 47]
    assert [(f["src4_addr"], f["in_bytes"], f["src_vlan"]) for f in gre] == [("10.7.0.1", 120, 7)]
    dns = records["fd00:1::1", "fd00:1::2", 17, 5353, 53, None]
    assert (dns["in_bytes"], dns["src_tos"]) == (40 + 8 + 30, 0xB8)
    # a fragmented datagram is one flow: the first fragment's ports, every fragment's octets
    frag4 = records["10.1.0.1", "10.1.0.2", 17, 7000, 7001, None]
    assert (frag4["in_packets"], frag4["in_bytes"]) == (2, 60 + 44)
    frag6 = records["fd00:1::1", "fd00:1::2", 17, 7002, 7003, None]
    assert (frag6["in_packets"], frag6["in_bytes"]) == (2, (40 + 8 + 24) + (40 + 8 + 16))
    # ICMP and other protocols are in the table too, and conn.log keeps Zeek's scope
    doc = json.loads(p.stdout)
    assert doc["ipfix"]["collectors"][0]["records"] == len(flows)
    assert {c["proto"] for c in doc["connections"]["largest_closed"]} <= {"tcp", "udp", "icmp", "other"}


def nfcapd_port(collector):
    return int(collector.dir.name.rsplit("-", 1)[1])


def nfacctd_port(tmp_path):
    conf = (tmp_path / "nfacctd.conf").read_text()
    return int(conf.split("nfacctd_port: ")[1].split()[0])


@pytest.mark.offline
def test_the_dist_example_for_nfacctd_collects_lpds_flows(tmp_path):
    """dist/nfacctd.conf as shipped (its port, output file and refresh changed for the
    test): nfacctd accepts it and prints every flow with the exporting box's address."""
    port = free_port()
    conf = (Path(LPD).parent / "dist" / "nfacctd.conf").read_text()
    out = tmp_path / "flows.json"
    conf = conf.replace("nfacctd_port: 4739", f"nfacctd_port: {port}\nnfacctd_ip: 127.0.0.1")
    conf = re.sub(r"print_output_file: .*", f"print_output_file: {out}", conf)
    conf = conf.replace("print_refresh_time: 60", "print_refresh_time: 1")
    (tmp_path / "dist.conf").write_text(conf)
    log = open(tmp_path / "dist.log", "wb")
    proc = subprocess.Popen(["nfacctd", "-f", str(tmp_path / "dist.conf")], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: b"waiting for NetFlow/IPFIX data" in (tmp_path / "dist.log").read_bytes(),
                        COLLECTOR_START), (tmp_path / "dist.log").read_text()
        pcap = tmp_path / "mixed.pcap"
        write_frames(pcap, mixed_frames())
        assert replay(pcap, "--ipfix", f"127.0.0.1:{port}").returncode == 0
    finally:
        stop_nfacctd(proc)
        log.close()
    rows = [json.loads(line) for f in tmp_path.glob("flows.json*") for line in f.read_text().splitlines()
            if line.strip()]
    assert {r["peer_ip_src"] for r in rows} == {"127.0.0.1"}
    assert sum(r["bytes"] for r in rows) == sum(x.octets for x in ip_packets(pcap))


@pytest.mark.offline
def test_two_boxes_one_collector_top_talkers_byte_exact(tmp_path):
    """The issue's "done when": two lpds (two observation domains, as two hosts have)
    export to one nfcapd configured with nothing but its port, and `nfdump -R dir -s
    ip/bytes` gives every address's bytes as the two captures carry them."""
    one, two = tmp_path / "one.pcap", tmp_path / "two.pcap"
    write_frames(one, mixed_frames())
    write_frames(two, [(i * 0.01, ether(B, A, ETH_IP, ipv4("10.1.0.1", f"10.9.0.{i % 20 + 1}", PROTO_UDP,
                                                         udp(3000 + i, 443, b"w" * (i * 7 % 900)))))
                       for i in range(400)], t0=T0 + 5)
    port = free_port()
    nfcapd = Nfcapd(tmp_path, port)
    for pcap, domain in ((one, "1"), (two, "2")):
        assert replay(pcap, "--ipfix", f"127.0.0.1:{port}", "--ipfix-domain", domain).returncode == 0
    nfcapd.stop()
    assert nfcapd.sequence_errors() == 0
    out = subprocess.run(["nfdump", "-R", str(nfcapd.dir), "-s", "ip/bytes", "-n", "0", "-o", "csv"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    lines = out.split("\n\n")[0].splitlines()
    header = lines[0].split(",")
    top = {row[header.index("val")]: int(row[header.index("byt")])
           for row in (line.split(",") for line in lines[1:])}
    want = collections.Counter()
    for x in ip_packets(one) + ip_packets(two):
        want[x.src] += x.octets
        want[x.dst] += x.octets
    assert top == dict(want)


@pytest.mark.offline
def test_biflow_records_carry_both_directions(tmp_path):
    pcap = tmp_path / "mixed.pcap"
    write_frames(pcap, mixed_frames())
    oracle = ip_packets(pcap)
    port = free_port()
    nfcapd = Nfcapd(tmp_path, port)
    p = replay(pcap, "--ipfix", f"127.0.0.1:{port}", "--ipfix-biflow")
    assert p.returncode == 0, p.stderr
    flows = nfcapd.stop()
    assert nfcapd.sequence_errors() == 0
    tcp_flow = [f for f in flows if f["proto"] == 6]
    assert len(tcp_flow) == 1                         # one record for the conversation
    out = [x for x in oracle if x.sport == 40000]
    back = [x for x in oracle if x.dport == 40000]
    assert tcp_flow[0]["in_bytes"] == sum(x.octets for x in out)
    assert tcp_flow[0]["out_bytes"] == sum(x.octets for x in back)
    assert sum(f["in_bytes"] + f.get("out_bytes", 0) for f in flows) == sum(x.octets for x in oracle)


@pytest.mark.offline
def test_many_messages_keep_their_sequence_and_their_size(tmp_path):
    """3000 flows: many messages, each within a 1500-byte MTU, numbered as RFC 7011 says
    (nfcapd counts no sequence error; a plain socket beside it checks each header)."""
    frames = [(i * 0.001, ether(B, A, ETH_IP, ipv4(f"10.2.{i // 250}.{i % 250 + 1}", "10.3.0.1",
                                                   PROTO_UDP, udp(1000 + i % 5000, 9, b"d" * (i % 50)))))
              for i in range(3000)]
    pcap = tmp_path / "many.pcap"
    write_frames(pcap, frames)
    port = free_port()
    nfcapd = Nfcapd(tmp_path, port)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    p = replay(pcap, "--ipfix", f"127.0.0.1:{port}", "--ipfix", f"127.0.0.1:{raw.getsockname()[1]}")
    assert p.returncode == 0, p.stderr
    flows = nfcapd.stop()
    assert nfcapd.sequence_errors() == 0
    assert len(flows) == 3000
    assert sum(f["in_bytes"] for f in flows) == sum(x.octets for x in ip_packets(pcap))
    raw.settimeout(1)
    sequence, messages = 0, 0
    while True:
        try:
            msg = raw.recv(65536)
        except socket.timeout:
            break
        version, length, _, seq, _ = struct.unpack_from("!HHIII", msg)
        assert (version, length) == (10, len(msg)) and len(msg) <= lpd.IPFIX_MESSAGE_MAX
        assert seq == sequence                        # records sent before this message
        off = 16
        while off < length:
            set_id, set_len = struct.unpack_from("!HH", msg, off)
            if set_id >= 256:
                sequence += (set_len - 4) // record_size(set_id)
            off += set_len
        messages += 1
    raw.close()
    assert messages > 10 and sequence == 3000


def record_size(template_id):
    """Bytes of one record of lpd's templates (8+8+8+8 counts, addresses, 2+2 ports, 1
    protocol, 2 flags, 1 class, 2 ICMP, 1 reason, 4 interface, 2 VLAN)."""
    addresses = {256: 8, 257: 32}[template_id]
    return 32 + addresses + 4 + 1 + 2 + 1 + 2 + 1 + 4 + 2


@pytest.mark.offline
def test_a_long_flow_is_reported_every_active_timeout(tmp_path):
    """Ten minutes of one UDP flow, a datagram every 2 s, --flow-active-timeout 60: at
    least ten records, each at most 60 s long, summing to the flow (times from the file,
    as softflowd -r has them)."""
    frames = [(i * 2.0, ether(B, A, ETH_IP, ipv4("10.4.0.1", "10.4.0.2", PROTO_UDP,
                                                udp(4000, 4001, b"v" * 100))))
              for i in range(300)]
    pcap = tmp_path / "long.pcap"
    write_frames(pcap, frames)
    port = free_port()
    nfcapd = Nfcapd(tmp_path, port)
    p = replay(pcap, "--ipfix", f"127.0.0.1:{port}", "--flow-active-timeout", "60",
               "--conn-timeout-udp", "120")
    assert p.returncode == 0, p.stderr
    flows = sorted(nfcapd.stop(), key=lambda f: f["first"])
    assert nfcapd.sequence_errors() == 0
    assert len(flows) >= 10
    assert sum(f["in_packets"] for f in flows) == 300
    assert sum(f["in_bytes"] for f in flows) == 300 * (20 + 8 + 100)
    for f in flows:
        assert epoch(f["last"]) - epoch(f["first"]) < 60
    for a, b in zip(flows, flows[1:]):
        assert epoch(a["last"]) < epoch(b["first"])   # deltas: no packet twice
    assert epoch(flows[0]["first"]) == T0 and epoch(flows[-1]["last"]) == T0 + 598


@pytest.mark.offline
def test_a_collector_that_is_not_there_costs_a_counter(tmp_path):
    """UDP to a closed port (ICMP port unreachable comes back) and TCP to a closed port:
    lpd ends as usual, its counts intact, the collectors' errors counted, one line each."""
    pcap = tmp_path / "mixed.pcap"
    write_frames(pcap, mixed_frames())
    udp_port, tcp_port = free_port(), free_port()
    p = replay(pcap, "--ipfix", f"127.0.0.1:{udp_port}", "--ipfix", f"tcp://127.0.0.1:{tcp_port}",
               "--output", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    cols = {c["collector"]: c for c in doc["ipfix"]["collectors"]}
    tcp_col, udp_col = cols[f"tcp://127.0.0.1:{tcp_port}"], cols[f"udp://127.0.0.1:{udp_port}"]
    assert tcp_col["records"] == 0 and tcp_col["send_errors"] >= 1
    assert tcp_col["flows_dropped"] == udp_col["records"] + udp_col["flows_dropped"] > 0
    assert doc["interface"]["rx_packets"] + doc["interface"]["tx_packets"] == len(mixed_frames())
    assert len([line for line in p.stderr.splitlines() if "--ipfix" in line]) <= 2
    bad = replay(pcap, "--ipfix", "no-such-host.invalid:4739")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert "--ipfix" in bad.stderr


@pytest.mark.offline
def test_a_tcp_collector_reads_whole_messages_templates_first(tmp_path):
    """tcp://: one stream of messages, each whole (its header's length), the templates
    first, sequence numbers from 0 (a new transport session)."""
    pcap = tmp_path / "mixed.pcap"
    write_frames(pcap, mixed_frames())
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(30)
    port = listener.getsockname()[1]
    proc = subprocess.Popen([sys.executable, LPD, "-r", str(pcap), "--ipfix", f"tcp://127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    conn, _ = listener.accept()
    conn.settimeout(15)
    data = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    conn.close()
    listener.close()
    assert proc.wait(30) == 0, proc.stderr.read()
    off, sequence, first = 0, 0, True
    while off < len(data):
        version, length, _, seq, _ = struct.unpack_from("!HHIII", data, off)
        assert version == 10 and off + length <= len(data)
        assert seq == sequence
        set_id = struct.unpack_from("!H", data, off + 16)[0]
        if first:
            assert set_id == 2                       # templates before any data
            first = False
        inner = off + 16
        while inner < off + length:
            sid, slen = struct.unpack_from("!HH", data, inner)
            if sid >= 256:
                sequence += (slen - 4) // record_size(sid)
            inner += slen
        off += length
    assert off == len(data) and sequence > 0


@pytest.mark.offline
def test_a_spoofed_flood_stays_bounded_and_every_octet_is_reported(tmp_path):
    """10^5 one-packet flows from random sources through --conn-max 2000: connections are
    evicted (and reported: flowEndReason 'lack of resources'), memory stays bounded
    (prlimit), and the collector sums exactly what the capture carried."""
    rnd = random.Random(7)
    frames = []
    for i in range(100_000):
        src = f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
        frames.append((i * 1e-5, ether(B, A, ETH_IP, ipv4(src, "10.200.0.1", PROTO_UDP,
                                                           udp(rnd.randrange(1024, 65535), 53)))))
    pcap = tmp_path / "flood.pcap"
    write_frames(pcap, frames)
    port = free_port()
    nfcapd = Nfcapd(tmp_path, port)
    p = replay(pcap, "--ipfix", f"127.0.0.1:{port}", "--conn-max", "2000", "--output", "json",
               prefix=("prlimit", f"--as={2 << 30}"), timeout=600)
    assert p.returncode == 0, p.stderr
    flows = nfcapd.stop()
    doc = json.loads(p.stdout)
    assert doc["ipfix"]["collectors"][0]["flows_dropped"] == 0
    assert nfcapd.sequence_errors() == 0
    assert sum(f["in_packets"] for f in flows) == 100_000
    assert sum(f["in_bytes"] for f in flows) == 100_000 * (20 + 8)
    assert doc["connections"]["evictions"]["half_open"] > 90_000


# --- live ------------------------------------------------------------------------------------

def traffic(pair, seconds=3.0):
    """ICMP, UDP and TCP between the namespaces, both families, for about `seconds`."""
    code = r"""
import socket, sys, time
host4, host6, end = sys.argv[1], sys.argv[2], time.time() + float(sys.argv[3])
while time.time() < end:
    for host, fam in ((host4, socket.AF_INET), (host6, socket.AF_INET6)):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.sendto(b"u" * 200, (host, 9))
        s.close()
    time.sleep(0.05)
"""
    udp_proc = pair.popen(pair.ns_a, [sys.executable, "-c", code, pair.ip4_b, pair.ip6_b, str(seconds)])
    pair.ping(pair.ns_a, pair.ip4_b, count=int(seconds / 0.2))
    pair.ping(pair.ns_a, pair.ip6_b, count=3)
    udp_proc.wait(seconds + 10)


@pytest.mark.live
@pytest.mark.usefixtures("engine")
@pytest.mark.parametrize("workers", [1, 2])
def test_live_export_equals_the_interfaces_ip_bytes(pair, tmp_path, workers):
    """lpd on veth-b, both engines, one process or two workers (each its own observation
    domain): what nfcapd decodes is, per address pair, exactly the IP packets tcpdump
    captured on the same interface."""
    port = free_port()
    nfcapd = Nfcapd(tmp_path, port, pair, pair.ns_b)
    cap = tmp_path / "veth-b.pcap"
    dump = netns.start_tcpdump(pair.ns_b, pair.if_b, ["-U", "-w", str(cap)])
    run = Lpd(pair, "--ipfix", f"127.0.0.1:{port}", "--interval", "0.5", "--workers", str(workers))
    try:
        traffic(pair)
        pair.settle()
    finally:
        assert run.stop() == 0, run.stderr()
        netns.stop(dump)
    flows = nfcapd.stop()
    assert nfcapd.sequence_errors() == 0
    oracle = ip_packets(cap)
    assert oracle and by_pair(nfdump_rows(flows)) == by_pair((x.src, x.dst, x.octets, 1) for x in oracle)
    assert {f["proto"] for f in flows} >= {1, 17, 58}
    domains = [line for line in nfcapd.log_path.read_text().splitlines() if "New ipfix exporter" in line]
    assert len(domains) == workers, domains


@pytest.mark.live
def test_a_collector_that_starts_late_and_restarts_gets_the_templates_again(pair, tmp_path):
    """Over UDP a collector that was not there gets the templates again within
    --ipfix-template-interval and decodes from then on; lpd only counted errors."""
    port = free_port()
    run = Lpd(pair, "--ipfix", f"127.0.0.1:{port}", "--ipfix-template-interval", "1",
              "--flow-active-timeout", "1", "--interval", "0.5")
    try:
        traffic(pair, 2.0)                           # nobody listens: port unreachable
        m = metrics(pair)
        assert value(m, "lpd_ipfix_send_errors_total", collector=f"udp://127.0.0.1:{port}") >= 1
        first = Nfcapd(tmp_path, port, pair, pair.ns_b, "first")
        traffic(pair, 3.0)
        early = first.stop()
        assert early, "records decoded once the templates came again"
        second = Nfcapd(tmp_path, port, pair, pair.ns_b, "second")
        traffic(pair, 3.0)
        time.sleep(2)
    finally:
        assert run.stop() == 0, run.stderr()
    late = second.stop()
    assert late and {f["proto"] for f in late} >= {1, 17}
    assert "Traceback" not in run.stderr()
