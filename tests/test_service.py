"""conn.log's `service` (issue 27): the protocols a connection's first payload bytes each way
show, as Zeek's dynamic protocol detection names them (ssh, http, ssl, smtp, ftp, dns, ntp,
dhcp, quic), never its ports.

- unit: lpd.SERVICES' checks on the bytes real clients and servers send first, and the copy
  length that --connections asks of both engines (it reaches SERVICE_BYTES of payload).
- offline: hand-built traces replayed with -r --conn-log, one per service, the same
  protocols on unusual ports (ssh on 8022, plain http on 443), a port-53 flow that is not
  DNS and a TLS port that carries something else (no service); each direction judged once;
  the -r table and JSON show it too.
- offline: corpus captures against tshark's dissection (see CORPUS below).
- live: real clients in network namespaces under both engines (the `engine` fixture): an
  SSH banner exchange on 8022, curl against python's http.server on 443, DNS lookups
  against dnsmasq, in conn.log and (ssh, while open) /api/connections.
"""
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import lpd
from harness import PCAP_NS, Lpd, api, read_log, wait_for, write_pcap
from packets import ETH_IP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_PUSH, TCP_SYN, ether, ipv4, tcp, udp

SYN, ACK, SA, PA, FA = TCP_SYN, TCP_ACK, TCP_SYN | TCP_ACK, TCP_PUSH | TCP_ACK, TCP_FIN | TCP_ACK
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
T0 = 1_700_000_000
C, S = "10.0.0.1", "10.0.0.2"

# First payloads in the form real peers send them (written here after OpenSSH's, curl's,
# python's http.server's, Postfix's and vsftpd's greetings and commands; TLS, DNS, NTP,
# DHCP and QUIC headers with their fixed fields as the RFCs give them, the rest zero).
SSH_CLIENT = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
SSH_SERVER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: 10.0.0.2\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
HTTP_REPLY = b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.2\r\n\r\n"
TLS_CLIENT_HELLO = bytes.fromhex("16030100f5010000f10303") + bytes(32) + b"\x00" * 40
TLS_SERVER_HELLO = bytes.fromhex("160303007a0200007603033f") + bytes(31) + b"\x00" * 40
SMTP_BANNER, SMTP_EHLO = b"220 mail.example ESMTP Postfix\r\n", b"EHLO client.example\r\n"
FTP_BANNER, FTP_USER = b"220 (vsFTPd 3.0.3)\r\n", b"USER anonymous\r\n"
DNS_QUERY = bytes.fromhex("1a2b01000001000000000001") + b"\x07example\x03com\x00\x00\x01\x00\x01"
DNS_REPLY = bytes.fromhex("1a2b81800001000100000000") + b"\x07example\x03com\x00\x00\x01\x00\x01"
NTP_CLIENT = bytes([0x23]) + bytes(47)                 # version 4, mode 3
NTP_SERVER = bytes([0x24, 2]) + bytes(46)              # version 4, mode 4
DHCP_DISCOVER = b"\x01\x01\x06\x00" + bytes(232) + b"\x63\x82\x53\x63\x35\x01\x01\xff"
QUIC_INITIAL = b"\xc3\x00\x00\x00\x01\x08" + bytes(8) + b"\x00" + bytes(1185)
QUIC_SERVER = b"\xc1\x00\x00\x00\x01\x00\x08" + bytes(8) + bytes(100)
NOT_DNS = b"hello, this is not a DNS message at all\n"

# Corpus captures (../shared/corpus/pcaps, from tcpdump's tests) whose connections tshark
# dissects as one of SERVICES' protocols. tshark picks a dissector by port, then parses the
# payload (a frame it cannot parse is "_ws.malformed"): on these captures its dissection
# says the payload is the protocol, and lpd, from the payload alone, must say the same of
# every connection (and nothing of the others). Chosen so: the protocol's first payloads
# are in the capture (not joined mid-stream), it is one lpd names (not DHCPv6, DNS over TCP)
# and tshark finds nothing malformed; dns_udp_8053 is DNS off its port.
CORPUS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "shared", "corpus", "pcaps")
# Over the whole corpus (365 TCP and UDP connections, 2026-12) the two agree on 353; the rest
# are DNS over TCP (not named here), NetBIOS name service on 137 (Zeek's DNS analyzer parses
# it and names it "dns", as lpd does; tshark says "nbns"), SSH joined mid-stream (tshark by
# port; no banner here), fuzzed BOOTP, and SOME/IP that tshark takes for DNS.
CORPUS = {"ssh.pcap": "ssh", "ipv4_tcp_http_xml.pcap": "http", "accecn_handshake.pcap": "http",
          "dns_udp.pcap": "dns", "dnssec.pcap": "dns", "dns_udp_8053.pcap": "dns",
          "ntp.pcap": "ntp", "ntp-mode7.pcap": "ntp", "dhcp-rfc3004.pcap": "dhcp",
          "dhcp-option-33.pcap": "dhcp"}
TSHARK_NAMES = {"ssh": "ssh", "http": "http", "tls": "ssl", "dns": "dns", "ntp": "ntp",
                "dhcp": "dhcp", "bootp": "dhcp", "smtp": "smtp", "ftp": "ftp", "quic": "quic"}


# --- building traces ---------------------------------------------------------------------

class Trace:
    def __init__(self):
        self.pkts = []

    def add(self, src, dst, proto, seg):
        t = T0 * 10 ** 9 + len(self.pkts) * 10 ** 7          # 10 ms apart
        self.pkts.append((t // 10 ** 9, t % 10 ** 9, ether(MAC_A, MAC_B, ETH_IP, ipv4(src, dst, proto, seg))))

    def tcp(self, cport, sport, first=b"", answer=b"", server_first=False):
        """A whole TCP connection C:cport -> S:sport: handshake, `first` from the client and
        `answer` from the server (the server's first when server_first), FINs."""
        ci, si = 1000, 5000
        self.add(C, S, PROTO_TCP, tcp(cport, sport, SYN, ci))
        self.add(S, C, PROTO_TCP, tcp(sport, cport, SA, si, ci + 1))
        self.add(C, S, PROTO_TCP, tcp(cport, sport, ACK, ci + 1, si + 1))
        ci, si = ci + 1, si + 1
        order = [(False, answer), (True, first)] if server_first else [(True, first), (False, answer)]
        for from_client, data in order:
            if not data:
                continue
            if from_client:
                self.add(C, S, PROTO_TCP, tcp(cport, sport, PA, ci, si, payload=data))
                ci += len(data)
                self.add(S, C, PROTO_TCP, tcp(sport, cport, ACK, si, ci))
            else:
                self.add(S, C, PROTO_TCP, tcp(sport, cport, PA, si, ci, payload=data))
                si += len(data)
                self.add(C, S, PROTO_TCP, tcp(cport, sport, ACK, ci, si))
        self.add(C, S, PROTO_TCP, tcp(cport, sport, FA, ci, si))
        self.add(S, C, PROTO_TCP, tcp(sport, cport, FA, si, ci + 1))
        self.add(C, S, PROTO_TCP, tcp(cport, sport, ACK, ci + 1, si + 1))

    def udp(self, cport, sport, first, answer=None):
        self.add(C, S, PROTO_UDP, udp(cport, sport, first))
        if answer is not None:
            self.add(S, C, PROTO_UDP, udp(sport, cport, answer))

    def write(self, path):
        write_pcap(path, self.pkts, PCAP_NS)


def replay(tmp_path, trace):
    """The conn.log records of the trace replayed, in the log's order (fields in order)."""
    pcap, log = tmp_path / "t.pcap", tmp_path / "conn.json"
    trace.write(pcap)
    with open(os.devnull, "w") as out:
        opts = lpd.parse_args(["-r", str(pcap), "--conn-log", str(log), "--output", "json"])
        assert lpd.replay(opts, out) == 0
    return [json.loads(line) for line in log.read_text().splitlines()]


# --- unit: the checks on what real peers send first ---------------------------------------

def services_of(proto, orig, resp, oport=40000, rport=40001):
    c = lpd.Connection(None, proto, b"\x0a\0\0\1", oport, b"\x0a\0\0\2", rport, 0.0)
    if orig is not None:
        c.o.head = orig[:lpd.SERVICE_BYTES], len(orig)
    if resp is not None:
        c.r.head = resp[:lpd.SERVICE_BYTES], len(resp)
    return lpd.connection_services(c)


@pytest.mark.unit
@pytest.mark.parametrize("proto, orig, resp, ports, want", [
    (PROTO_TCP, SSH_CLIENT, SSH_SERVER, (), "ssh"),
    (PROTO_TCP, SSH_CLIENT, None, (), None),              # Zeek: requires-reverse-signature
    (PROTO_TCP, HTTP_REQUEST, None, (), "http"),          # each side on its own (zeek#343)
    (PROTO_TCP, None, HTTP_REPLY, (), "http"),
    (PROTO_TCP, b"GETX / HTTP/1.1\r\n", None, (), None),
    (PROTO_TCP, b"BASELINE-CONTROL /x HTTP/1.1\r\n", None, (), "http"),   # the longest method
    (PROTO_TCP, TLS_CLIENT_HELLO, TLS_SERVER_HELLO, (), "ssl"),
    (PROTO_TCP, TLS_CLIENT_HELLO, b"\x15\x03\x03\x00\x02\x02\x28" + TLS_SERVER_HELLO, (), "ssl"),
    (PROTO_TCP, TLS_CLIENT_HELLO, b"\x15\x03\x03\x00\x02\x02\x28", (), None),
    (PROTO_TCP, TLS_CLIENT_HELLO, None, (), None),
    (PROTO_TCP, SMTP_EHLO, SMTP_BANNER, (), "smtp"),
    (PROTO_TCP, FTP_USER, FTP_BANNER, (), "ftp"),
    (PROTO_TCP, FTP_USER, SMTP_BANNER, (), "ftp"),        # a 220 greeting is both's
    (PROTO_UDP, DNS_QUERY, DNS_REPLY, (), "dns"),
    (PROTO_UDP, DNS_QUERY, None, (), "dns"),
    (PROTO_UDP, DNS_REPLY, DNS_QUERY, (), None),          # orig must ask
    (PROTO_UDP, NOT_DNS, None, (53, 53), None),
    (PROTO_TCP, DNS_QUERY, None, (), None),               # DNS over TCP: not looked at
    (PROTO_UDP, NTP_CLIENT, NTP_SERVER, (40000, 123), "ntp"),
    (PROTO_UDP, None, NTP_SERVER, (40000, 123), "ntp"),
    (PROTO_UDP, NTP_CLIENT, NTP_SERVER, (), None),        # NTP only on 123, as Zeek's analyzer
    (PROTO_UDP, NTP_CLIENT[:47], None, (40000, 123), None),
    (PROTO_UDP, bytes([0x3b]) + bytes(47), None, (40000, 123), None),     # version 7
    (PROTO_UDP, bytes([0x16, 2, 0, 1]) + bytes(8), None, (40000, 123), "ntp"),  # control message
    (PROTO_UDP, DNS_QUERY + bytes(30), None, (40000, 123), "dns"),   # not ntp
    (PROTO_UDP, DHCP_DISCOVER, None, (68, 67), "dhcp"),
    (PROTO_UDP, DHCP_DISCOVER, None, (40000, 40001), None),   # its ports stand for the cookie
    (PROTO_UDP, DHCP_DISCOVER[:200], None, (68, 67), None),
    (PROTO_UDP, QUIC_INITIAL, QUIC_SERVER, (), "quic"),
    (PROTO_UDP, QUIC_INITIAL, None, (), None),
    (PROTO_UDP, b"", b"", (), None),
], ids=lambda v: v if isinstance(v, str) else None)
def test_checks(proto, orig, resp, ports, want):
    assert services_of(proto, orig, resp, *ports) == want


@pytest.mark.unit
def test_the_checks_decide_within_service_bytes():
    """On these first payloads (the longest each check reads) every check gives the same
    verdict on the first SERVICE_BYTES as on the whole payload (the constant is long
    enough), and one byte less changes a verdict (it is no longer than it needs to be)."""
    cases = [(PROTO_TCP, SSH_CLIENT, SSH_SERVER), (PROTO_TCP, HTTP_REQUEST, HTTP_REPLY),
             (PROTO_TCP, b"BASELINE-CONTROL /x HTTP/1.1\r\n", None),
             (PROTO_TCP, TLS_CLIENT_HELLO, b"\x15\x03\x03\x00\x02\x02\x28" + TLS_SERVER_HELLO),
             (PROTO_UDP, DNS_QUERY, DNS_REPLY), (PROTO_UDP, QUIC_INITIAL, QUIC_SERVER)]

    def verdict(proto, orig, resp, n):
        c = lpd.Connection(None, proto, b"a", 40000, b"b", 40001, 0.0)
        c.o.head = orig[:n], len(orig)
        if resp is not None:
            c.r.head = resp[:n], len(resp)
        return lpd.connection_services(c)
    shorter = []
    for proto, orig, resp in cases:
        whole = verdict(proto, orig, resp, None)
        assert whole is not None and verdict(proto, orig, resp, lpd.SERVICE_BYTES) == whole
        shorter.append(verdict(proto, orig, resp, lpd.SERVICE_BYTES - 1) != whole)
    assert any(shorter)


@pytest.mark.unit
def test_the_first_bytes_are_kept_only_until_both_sides_are_judged():
    """A one-way flow keeps its first bytes (the answer may come), a copy: a frame is a
    view of the ring, which must not stay exported (its close would fail) nor be read
    after the kernel reuses it. Once both sides have sent, the connection holds none."""
    conns = lpd.Connections()

    def frame(src, dst, sport, dport, payload):
        return ether(MAC_A, MAC_B, ETH_IP, ipv4(src, dst, PROTO_UDP, udp(sport, dport, payload)))
    for i, f in enumerate([frame(C, S, 40000, 53, DNS_QUERY), frame(S, C, 53, 40000, DNS_REPLY),
                           frame(C, S, 40001, 53, DNS_QUERY)]):
        conns.packet(memoryview(f), T0 + i, len(f), 1, lpd.ETH_HLEN)
    answered, one_way = sorted(conns.table.values(), key=lambda c: c.orig_p)
    assert (answered.o.head, answered.r.head, answered.service) == ((), (), "dns")
    assert one_way.o.head == (DNS_QUERY[:lpd.SERVICE_BYTES], len(DNS_QUERY)) and one_way.r.head is None
    assert type(one_way.o.head[0]) is bytes
    assert one_way.service == "dns"


@pytest.mark.unit
def test_connections_copy_the_payload_bytes_both_engines_need():
    """The classic program's snaplen (Connections.snaplen) and the eBPF plan's l4 reach
    SERVICE_BYTES past the longest IPv4 and TCP headers behind two tags."""
    longest = lpd.ETH_HLEN + 2 * lpd.VLAN_TAG_LEN + 60 + 60
    assert lpd.Connections().snaplen() == longest + lpd.SERVICE_BYTES
    plan = lpd.copy_plan(lpd.Connections(), [])
    assert plan.l4 >= longest + lpd.SERVICE_BYTES


# --- offline: hand-built traces ----------------------------------------------------------

@pytest.mark.offline
def test_each_service_from_payload(tmp_path):
    t = Trace()
    t.tcp(40001, 22, SSH_CLIENT, SSH_SERVER, server_first=True)
    t.tcp(40002, 8022, SSH_CLIENT, SSH_SERVER, server_first=True)     # ssh on 8022
    t.tcp(40003, 80, HTTP_REQUEST, HTTP_REPLY)
    t.tcp(40004, 443, HTTP_REQUEST, HTTP_REPLY)                       # plain http on 443
    t.tcp(40005, 8443, TLS_CLIENT_HELLO, TLS_SERVER_HELLO)
    t.tcp(40006, 2525, SMTP_EHLO, SMTP_BANNER, server_first=True)
    t.tcp(40007, 2121, FTP_USER, FTP_BANNER, server_first=True)
    t.tcp(40008, 443, b"\x00\x01\x02 not tls\r\n", b"nor this\r\n")  # the TLS port, no TLS
    t.tcp(40009, 22)                                                  # no payload at all
    t.udp(40010, 53, DNS_QUERY, DNS_REPLY)
    t.udp(40011, 5300, DNS_QUERY, DNS_REPLY)                          # DNS on 5300
    t.udp(40012, 53, NOT_DNS, NOT_DNS)                                # port 53, not DNS
    t.udp(40013, 123, NTP_CLIENT, NTP_SERVER)
    t.udp(68, 67, DHCP_DISCOVER)
    t.udp(40014, 4433, QUIC_INITIAL, QUIC_SERVER)
    t.udp(40015, 123, NOT_DNS)                                        # port 123, too short
    by_orig = {}
    for r in replay(tmp_path, t):
        by_orig[r["id.orig_p"]] = r.get("service")
        if "service" in r:
            keys = list(r)
            assert keys.index("service") == keys.index("proto") + 1, keys    # Zeek's column
    assert by_orig == {40001: "ssh", 40002: "ssh", 40003: "http", 40004: "http", 40005: "ssl",
                       40006: "smtp", 40007: "ftp", 40008: None, 40009: None, 40010: "dns",
                       40011: "dns", 40012: None, 40013: "ntp", 68: "dhcp", 40014: "quic",
                       40015: None}


@pytest.mark.offline
def test_no_service_field_when_none_confirmed(tmp_path):
    """Zeek's JSON logs leave an unset &optional field out: no "service": null."""
    t = Trace()
    t.udp(40012, 53, NOT_DNS, NOT_DNS)
    t.tcp(40009, 8022)
    recs = replay(tmp_path, t)
    assert len(recs) == 2 and not any("service" in r for r in recs)


@pytest.mark.offline
def test_a_later_payload_decides_nothing(tmp_path):
    """Each direction is judged on its first payload only: a connection that opens with
    something else and speaks HTTP after has no service (as it would not in Zeek's
    signature engine, which anchors at the stream's start)."""
    t = Trace()
    ci, si = 1001, 5001
    t.add(C, S, PROTO_TCP, tcp(40020, 80, SYN, 1000))
    t.add(S, C, PROTO_TCP, tcp(80, 40020, SA, 5000, 1001))
    t.add(C, S, PROTO_TCP, tcp(40020, 80, PA, ci, si, payload=b"hello\r\n"))
    t.add(C, S, PROTO_TCP, tcp(40020, 80, PA, ci + 7, si, payload=HTTP_REQUEST))
    (rec,) = replay(tmp_path, t)
    assert "service" not in rec


@pytest.mark.offline
def test_judged_once_per_direction(tmp_path, monkeypatch):
    """The checks run on a direction's first payload only: a long exchange costs its
    later frames nothing (two calls per connection, one for a one-way flow)."""
    calls = collections.Counter()
    real = lpd.connection_services

    def counting(c):
        calls[c.key] += 1
        return real(c)
    monkeypatch.setattr(lpd, "connection_services", counting)
    t = Trace()
    t.tcp(40001, 22, SSH_CLIENT * 3, SSH_SERVER * 5, server_first=True)
    t.udp(40002, 53, DNS_QUERY, DNS_REPLY)
    for _ in range(20):
        t.udp(40002, 53, DNS_QUERY, DNS_REPLY)
    t.udp(40003, 9999, NOT_DNS)
    recs = replay(tmp_path, t)
    assert sorted(calls.values()) == [1, 2, 2]
    assert [r.get("service") for r in recs] == ["ssh", "dns", None]


@pytest.mark.offline
def test_the_table_and_the_document_show_it(tmp_path):
    """-r's table has a service column (a replay ends every connection: its finished
    ones), its JSON the records with the field."""
    t = Trace()
    t.tcp(40002, 8022, SSH_CLIENT, SSH_SERVER, server_first=True)
    t.tcp(40003, 8080)
    pcap = tmp_path / "t.pcap"
    t.write(pcap)
    p = subprocess.run([sys.executable, lpd.__file__, "-r", str(pcap), "--connections"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    head = [line for line in lines if line.startswith("proto ")]
    assert head and all(line.split()[3] == "service" for line in head), lines
    assert [line.split()[3] for line in lines if ":8022 " in line] == ["ssh"], lines
    assert [line.split()[3] for line in lines if ":8080 " in line] == ["-"], lines
    p = subprocess.run([sys.executable, lpd.__file__, "-r", str(pcap), "--connections",
                        "--output", "json"], capture_output=True, text=True, timeout=120)
    docs = json.loads(p.stdout)
    conns = docs["connections"]
    assert [c["service"] for c in conns["largest_closed"] if c["id.resp_p"] == 8022] == ["ssh"]


# --- offline: corpus captures against tshark ---------------------------------------------

def tshark_services(path):
    """{frozenset of the two (address, port) ends: the SERVICES names tshark's dissection
    gives any of the connection's frames}, TCP and UDP over IPv4 and IPv6."""
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-E", "separator=|",
                          "-e", "ip.src", "-e", "ip.dst", "-e", "ipv6.src", "-e", "ipv6.dst",
                          "-e", "tcp.srcport", "-e", "tcp.dstport", "-e", "udp.srcport",
                          "-e", "udp.dstport", "-e", "frame.protocols"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    conns = collections.defaultdict(set)
    for line in out.splitlines():
        src, dst, src6, dst6, tsp, tdp, usp, udp_, protos = line.split("|")
        src, dst = src or src6, dst or dst6
        sport, dport = (tsp, tdp) if tsp else (usp, udp_)
        if not src or "," in src or not sport:
            continue                                    # not TCP or UDP, or tunnelled
        key = frozenset([(src, int(sport.split(",")[0])), (dst, int(dport.split(",")[0]))])
        conns[key] |= {TSHARK_NAMES[p] for p in protos.split(":") if p in TSHARK_NAMES}
        assert "_ws.malformed" not in protos, (path, line)
    return conns


@pytest.mark.offline
@pytest.mark.skipif(not shutil.which("tshark"), reason="needs tshark")
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_against_tshark(name, tmp_path):
    path = os.path.join(CORPUS_DIR, name)
    if not os.path.exists(path):
        pytest.skip(f"{CORPUS_DIR} is absent")
    log = tmp_path / "conn.json"
    with open(os.devnull, "w") as out:
        assert lpd.replay(lpd.parse_args(["-r", path, "--conn-log", str(log)]), out) == 0
    ours = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        if r["proto"] != "icmp":
            ours[frozenset([(r["id.orig_h"], r["id.orig_p"]), (r["id.resp_h"], r["id.resp_p"])])] = \
                set(filter(None, r.get("service", "").split(",")))
    theirs = tshark_services(path)
    assert ours and set(ours) == set(theirs)
    assert ours == dict(theirs)
    assert CORPUS[name] in set().union(*ours.values())      # the capture shows what it was chosen for


# --- live: real clients in namespaces, both engines ---------------------------------------

# An SSH server's side of the banner exchange (RFC 4253 4.2: each side sends its
# identification string first thing), on a port Zeek has no analyzer for.
SSH_PEER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(10)
c.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
got = b""
while not got.endswith(b"\n"):
    b = c.recv(4096)
    if not b:
        break
    got += b
c.close()
print(got.decode(errors="replace").strip(), flush=True)
"""
SSH_PORT, HTTP_PORT = 8022, 443          # unusual ports: ssh off 22, plain http on TLS's port
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
ZONE, HOST = "svc.test", "www.svc.test"
LIVE_WAIT = 10.0


def _ready(proc, word=b"ready", timeout=10.0):
    """The first line of a helper's stdout, once it says `word`."""
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline and word not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert word in line, f"helper not ready: {line!r}"


@pytest.mark.live
def test_live_services(pair, engine, tmp_path):
    """ssh (python's banner exchange, nc as the client) on 8022, curl against python's
    http.server on 443, glibc's resolver against dnsmasq on 53: conn.log and
    /api/connections name each, while they are open and after."""
    log = tmp_path / "conn.json"
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello\n")
    lpd_ = Lpd(pair, "--mapping-url", "none", "--interval", "1", "--conn-log", str(log),
               "--conn-timeout-udp", "2")
    if engine == "auto":
        assert "(engine ebpf)" in lpd_.stderr(), lpd_.stderr()
    # ssh: server in ns_a, nc in ns_b sends its banner and holds the connection open
    sshd = pair.popen(pair.ns_a, [sys.executable, "-c", SSH_PEER, pair.ip4_a, str(SSH_PORT)],
                      stdout=subprocess.PIPE)
    _ready(sshd)
    nc = pair.popen(pair.ns_b, ["nc", pair.ip4_a, str(SSH_PORT)], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE)
    assert nc.stdout.readline().startswith(b"SSH-2.0-")
    nc.stdin.write(b"SSH-2.0-OpenSSH_9.2p1 client\r\n")
    nc.stdin.flush()
    assert sshd.stdout.readline().startswith(b"SSH-2.0-OpenSSH_9.2p1 client")

    def open_ssh():
        _, doc = api(pair, "/api/connections")
        rows = [r for r in doc["connections"] if r["resp_p"] == SSH_PORT]
        return rows if rows and rows[0]["service"] == "ssh" else None
    assert wait_for(open_ssh, LIVE_WAIT, 0.2), api(pair, "/api/connections")
    nc.stdin.close()
    nc.wait(10)
    # http: curl against python's http.server, plain, on 443
    httpd = pair.popen(pair.ns_a, [sys.executable, "-u", "-m", "http.server", "--bind", pair.ip4_a,
                                   "--directory", str(www), str(HTTP_PORT)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _ready(httpd, b"Serving")
    got = pair.run(pair.ns_b, ["curl", "-sS", "--max-time", "10",
                               f"http://{pair.ip4_a}:{HTTP_PORT}/index.html"]).stdout
    assert got.strip() == "hello"
    # dns: dnsmasq in ns_a answers ns_b's resolver
    etc = f"/etc/netns/{pair.ns_b}"
    os.makedirs(etc)
    try:
        with open(f"{etc}/resolv.conf", "w") as f:
            f.write(f"nameserver {pair.ip4_a}\noptions timeout:2 attempts:2\n")
        pair.popen(pair.ns_a, [DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                               "--no-poll", "--bind-interfaces", f"--listen-address={pair.ip4_a}",
                               "--except-interface=lo", "--pid-file=", "--user=root",
                               f"--local=/{ZONE}/", f"--host-record={HOST},192.0.2.7,600"],
                   stderr=tempfile.TemporaryFile())
        code = ("import socket\n"
                f"print(socket.getaddrinfo({HOST + '.'!r}, 9, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0])")
        assert wait_for(lambda: pair.run(pair.ns_b, [sys.executable, "-c", code], check=False)
                        .stdout.strip() == "192.0.2.7", LIVE_WAIT, 0.5)
    finally:
        shutil.rmtree(etc, ignore_errors=True)

    def logged():
        recs = read_log(log, whole=False)
        by = {}
        for r in recs:
            by.setdefault(r["id.resp_p"], []).append(r)
        return by if all(p in by for p in (SSH_PORT, HTTP_PORT, 53)) else None
    by = wait_for(logged, 20, 0.5)                   # TCP: the close delay; UDP: 2 s idle
    assert by, read_log(log, whole=False)
    assert [r.get("service") for r in by[SSH_PORT]] == ["ssh"], by[SSH_PORT]
    assert [r.get("service") for r in by[HTTP_PORT]] == ["http"], by[HTTP_PORT]
    assert by[53] and {r.get("service") for r in by[53]} == {"dns"}, by[53]
    assert lpd_.stop() == 0, lpd_.stderr()
    for r in read_log(log):
        if r["id.resp_p"] not in (SSH_PORT, HTTP_PORT, 53):
            assert "service" not in r, r                # nothing else is named
