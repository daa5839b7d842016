"""Names from passive DNS (issue 27, --names): the dns.log records of every corpus DNS
capture against tshark's dissection of the same frames (ids, query names, rcodes, the
answer section's records in Zeek's words, and TTLs), and of a hand-built trace of the other
record types Zeek writes; a hand-built trace whose answered
addresses then carry traffic shows their names in the remotes document; the names
table's bound and its policy under a flood of answers."""
import ipaddress
import json
import os
import struct
import subprocess
import sys

import pytest

import lpd
from conftest import CORPUS
from harness import LPD, json_values, write_pcap
from packets import ETH_IP, ETH_IP6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_PUSH, TCP_SYN, \
    ether, ipv4, ipv6, tcp, udp

DNS_PCAPS = ("dns_udp.pcap", "dns_udp_2.pcap", "dns_fwdptr.pcap", "dnssec.pcap", "edns-opts.pcap",
             "dns-uri.pcap", "dns-badlabel.pcap", "dns-badvers.pcap", "dns_tcp.pcap")
# Their responses are ones tshark too reads in part only (a forward pointer, a bad label).
UNREADABLE = ("dns_fwdptr.pcap", "dns-badlabel.pcap")
T0 = 1_700_000_000
MAC_C, MAC_R = "02:00:00:00:00:0c", "02:00:00:00:00:0d"
CLIENT, RESOLVER = "10.1.0.2", "10.1.0.1"
CLIENT6, RESOLVER6 = "fd00::2", "fd00::1"


# --- DNS messages, built here (not with lpd) ----------------------------------------------

def qname(name):
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"


def message(ident, flags, question, answers=(), rcode=0):
    """A DNS message: `question` (name, type), answers (owner, type, ttl, rdata bytes); the
    owner is a pointer to the question name when it is that name."""
    name, qtype = question
    out = struct.pack("!HHHHHH", ident, flags | rcode, 1, len(answers), 0, 0) + qname(name) + \
        struct.pack("!HH", qtype, 1)
    for owner, rtype, ttl, rdata in answers:
        out += (b"\xc0\x0c" if owner == name else qname(owner)) + \
            struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata
    return out


def frame(src, dst, sport, dport, payload):
    if ":" in src:
        return ether(MAC_R, MAC_C, ETH_IP6, ipv6(src, dst, PROTO_UDP, udp(sport, dport, payload)))
    return ether(MAC_R, MAC_C, ETH_IP, ipv4(src, dst, PROTO_UDP, udp(sport, dport, payload)))


QUERY, RESPONSE = 0x0100, 0x8180            # RD; QR RD RA


def run(tmp_path, records, *args):
    pcap = tmp_path / "t.pcap"
    write_pcap(pcap, records)
    log = tmp_path / "dns.log"
    p = subprocess.run([sys.executable, LPD, "-r", str(pcap), "--names", "--dns-log", str(log),
                        "--output", "json", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json_values(p.stdout)[-1]
    return doc, [json.loads(line) for line in log.read_text().splitlines()]


# --- against tshark ------------------------------------------------------------------------

def tshark_messages(pcap):
    """[(frame number, its DNS layer as (key, value) pairs)] of DNS frames on port 53."""
    out = subprocess.run(["tshark", "-r", pcap, "-n", "-Y", "dns && (udp.port == 53 || tcp.port == 53)",
                          "-T", "json",
                          "-J", "frame dns"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    rows = json.loads(out, object_pairs_hook=lambda pairs: pairs)
    result = []
    for row in rows:
        layers = dict(dict(dict(row)["_source"])["layers"])
        num = int(dict(layers["frame"])["frame.number"])
        dns = layers["dns"]
        result.append((num, dict(dns) if not isinstance(dns, list) or
                       all(isinstance(p, tuple) for p in dns) else {}))
    return result


def _name(rr, field):
    name = _first(rr[field]).lower()
    return "" if name == "<root>" else name


# tshark's fields of each record type, written as Zeek's dns.log writes the type
# (base/protocols/dns/main.zeek's dns_*_reply handlers): by dns.resp.type
TSHARK_ANSWER = {
    1: lambda rr: rr["dns.a"], 28: lambda rr: rr["dns.aaaa"],
    5: lambda rr: _name(rr, "dns.cname"), 2: lambda rr: _name(rr, "dns.ns"),
    12: lambda rr: _name(rr, "dns.ptr.domain_name"), 6: lambda rr: _name(rr, "dns.soa.mname"),
    15: lambda rr: _name(rr, "dns.mx.mail_exchange"), 33: lambda rr: _name(rr, "dns.srv.target"),
    16: lambda rr: " ".join(f"TXT {len(t)} {t}" for t in _strings(rr["dns.txt"])),
    44: lambda rr: "SSHFP: " + rr["dns.sshfp.fingerprint"].replace(":", ""),
    46: lambda rr: f"RRSIG {rr['dns.rrsig.type_covered']} {_name(rr, 'dns.rrsig.signers_name') or '<Root>'}",
    48: lambda rr: f"DNSKEY {rr['dns.dnskey.algorithm']}",
    43: lambda rr: f"DS {rr['dns.ds.algorithm']} {rr['dns.ds.digest_type']}",
    47: lambda rr: f"NSEC {_name(rr, 'dns.resp.name')} {_name(rr, 'dns.nsec.next_domain_name')}",
    50: lambda rr: "NSEC3", 51: lambda rr: "NSEC3PARAM",
    35: lambda rr: "NAPTR {} {} {} {} {}".format(
        rr["dns.naptr.order"], rr["dns.naptr.preference"], rr["dns.naptr.flags"],
        rr["dns.naptr.service"], " ".join(t for t in (rr["dns.naptr.regex"],
                                                       _name(rr, "dns.naptr.replacement")) if t)),
}
# Types Zeek's analyzer parses (DNS.cc's ParseAnswer) without writing them to dns.log:
# WKS, HINFO, NBSTAT, A6, OPT, SVCB, HTTPS, TKEY, TSIG, CAA; any other is "<unknown type=N>"
ZEEK_SILENT = {11, 13, 32, 38, 41, 64, 65, 249, 250, 257}


def _fields(pairs):
    """A record's (field, value) pairs as a dict, a repeated field's values as a list."""
    out = {}
    for k, v in pairs:
        out[k] = out[k] + [v] if isinstance(out.get(k), list) else [out[k], v] if k in out else v
    return out


def _first(value):
    """A field's value (the record's own: an NSEC's type bitmap repeats dns.resp.type)."""
    return value[0] if isinstance(value, list) else value


def _strings(value):
    return value if isinstance(value, list) else [value]


def tshark_answers(dns):
    """The answer section as dns.log lists it, with its TTLs (a record Zeek writes no
    text for, or empty text, is left out as Zeek leaves it out)."""
    answers, ttls = [], []
    for _, rr in dns.get("Answers", ()):
        rr = _fields(rr)
        rtype = int(_first(rr["dns.resp.type"]))
        if rtype in ZEEK_SILENT:
            continue
        text = TSHARK_ANSWER[rtype](rr) if rtype in TSHARK_ANSWER else f"<unknown type={rtype}>"
        if text:
            answers.append(text)
            ttls.append(float(_first(rr["dns.resp.ttl"])))
    return answers, ttls


@pytest.mark.offline
@pytest.mark.parametrize("name", DNS_PCAPS)
def test_dns_log_says_what_tshark_reads(name, tmp_path):
    """Every response's record: trans_id, query, rcode, QR's flags, and answers and TTLs
    of the answer section, as tshark dissects the frame (a response tshark finds
    malformed is skipped: lpd keeps what it read before the fault, tshark shows less)."""
    assert compared_with_tshark(os.path.join(CORPUS, name), tmp_path) or name in UNREADABLE, name


@pytest.mark.offline
def test_record_types_beyond_addresses_are_written_as_zeek_does(tmp_path):
    """NS, PTR, MX, SOA, SRV, TXT, NAPTR, DNSKEY, DS, NSEC answers, one Zeek writes
    nothing for (HINFO) and one it does not know (URI, 256), in a hand-built trace:
    as tshark reads them, in Zeek's words; and the words themselves, checked here."""
    pcap = tmp_path / "types.pcap"
    write_pcap(pcap, record_types_trace())
    assert compared_with_tshark(str(pcap), tmp_path) == len(RECORD_TYPES)
    log = [json.loads(line) for line in (tmp_path / "dns.log").read_text().splitlines()]
    assert [r.get("answers") for r in log] == [[text] if text else None for *_, text in RECORD_TYPES]


def _name_rdata(name, head=b""):
    return head + qname(name)


def _strings_rdata(*strings):
    return b"".join(bytes([len(t)]) + t for t in strings)


# (type, rdata, the answer as Zeek's dns.log writes it)
RECORD_TYPES = (
    (2, _name_rdata("ns1.example.test"), "ns1.example.test"),
    (12, _name_rdata("host.example.test"), "host.example.test"),
    (15, _name_rdata("mx.example.test", struct.pack("!H", 10)), "mx.example.test"),
    (6, _name_rdata("ns1.example.test") + qname("admin.example.test") + struct.pack("!5I", 1, 2, 3, 4, 5),
     "ns1.example.test"),
    (33, _name_rdata("sip.example.test", struct.pack("!HHH", 1, 2, 5060)), "sip.example.test"),
    (16, _strings_rdata(b"v=spf1 -all", b"hello world"), "TXT 11 v=spf1 -all TXT 11 hello world"),
    (35, struct.pack("!HH", 100, 10) + _strings_rdata(b"u", b"E2U+sip", b"!^.*$!sip:a@example.test!")
     + b"\0", "NAPTR 100 10 u E2U+sip !^.*$!sip:a@example.test!"),
    (48, struct.pack("!HBB", 257, 3, 8) + b"k" * 8, "DNSKEY 8"),
    (43, struct.pack("!HBB", 1234, 8, 2) + b"d" * 32, "DS 8 2"),
    (47, _name_rdata("next.example.test") + b"\0\x01\x40", "NSEC q.example.test next.example.test"),
    (13, _strings_rdata(b"cpu", b"os"), None),
    (256, struct.pack("!HH", 10, 1) + b"http://example.test/", "<unknown type=256>"),
)


def record_types_trace():
    """One query and its answer per RECORD_TYPES row, each for q.example.test."""
    recs = []
    for i, (rtype, rdata, _) in enumerate(RECORD_TYPES):
        q = ("q.example.test", rtype)
        recs += [(T0 + i, 0, frame(CLIENT, RESOLVER, 42000 + i, 53, message(100 + i, QUERY, q))),
                 (T0 + i, 1000, frame(RESOLVER, CLIENT, 53, 42000 + i,
                                      message(100 + i, RESPONSE, q, [(q[0], rtype, 60, rdata)])))]
    return recs


def compared_with_tshark(pcap, tmp_path):
    """How many responses lpd's dns.log and tshark agree on (an assertion when not)."""
    log = tmp_path / "dns.log"
    p = subprocess.run([sys.executable, LPD, "-r", pcap, "--names", "--dns-log", str(log)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    answered = {(r["trans_id"], r.get("query", "")): r for r in records if "rcode" in r}
    compared = 0
    for _, dns in tshark_messages(pcap):
        flags = dict(dns.get("dns.flags_tree", ()))
        if not dns or flags.get("dns.flags.response") != "1" or "_ws.malformed" in dns:
            continue
        queries = [dict(q) for _, q in dns.get("Queries", ())]
        query = queries[0]["dns.qry.name"].lower() if queries else ""
        if query == "<root>":
            query = ""
        elif query.startswith("<"):
            continue                  # tshark could not read it either ("<name too long>")
        rec = answered.get((int(dns["dns.id"], 16), query))
        assert rec is not None, (dns["dns.id"], query, list(answered))
        answers, ttls = tshark_answers(dns)
        assert rec.get("answers", []) == answers
        assert rec.get("TTLs", []) == ttls
        assert rec["rcode"] == int(flags["dns.flags.rcode"])
        for field, flag in (("AA", "authoritative"), ("TC", "truncated"), ("RA", "recavail")):
            assert rec[field] == (flags[f"dns.flags.{flag}"] == "1"), field
        compared += 1
    return compared


# --- names in the remotes document ---------------------------------------------------------

A_RR, AAAA_RR, CNAME_RR = 1, 28, 5


def lookup_trace():
    """A client looks up www.example.test (a CNAME to edge.cdn.test, an IPv4 and an IPv6
    address) and nx.example.test (NXDOMAIN), then talks to both addresses."""
    www = ("www.example.test", A_RR)
    www6 = ("www.example.test", AAAA_RR)
    chain = [("www.example.test", CNAME_RR, 300, qname("edge.cdn.test"))]
    recs = [
        (T0, 0, frame(CLIENT, RESOLVER, 40000, 53, message(7, QUERY, www))),
        (T0, 2500, frame(RESOLVER, CLIENT, 53, 40000, message(7, RESPONSE, www, chain + [
            ("edge.cdn.test", A_RR, 60, ipaddress.ip_address("192.0.2.80").packed)]))),
        (T0, 3000, frame(CLIENT, RESOLVER, 40001, 53, message(8, QUERY, www6))),
        (T0, 4000, frame(RESOLVER, CLIENT, 53, 40001, message(8, RESPONSE, www6, chain + [
            ("edge.cdn.test", AAAA_RR, 60, ipaddress.ip_address("2001:db8::80").packed)]))),
        (T0, 5000, frame(CLIENT, RESOLVER, 40002, 53, message(9, QUERY, ("nx.example.test", A_RR)))),
        (T0, 6000, frame(RESOLVER, CLIENT, 53, 40002, message(9, RESPONSE, ("nx.example.test", A_RR),
                                                            rcode=3))),
        (T0 + 1, 0, frame(CLIENT, "192.0.2.80", 50000, 443, b"x" * 100)),
        (T0 + 1, 10, frame(CLIENT6, "2001:db8::80", 50001, 443, b"y" * 100)),
        # a response cut short: counted, never raised
        (T0 + 1, 20, frame(RESOLVER, CLIENT, 53, 40003, message(10, RESPONSE, www)[:20])),
    ]
    return recs


@pytest.mark.offline
def test_answered_addresses_carry_their_names(tmp_path):
    doc, log = run(tmp_path, lookup_trace(), "--remote", "--local-net", "10.1.0.0/24",
                   "--local-net", "fd00::/64")
    names = {r["address"]: r["name"] for r in doc["remotes"]["remotes"]}
    assert names["192.0.2.80"] == names["2001:db8::80"] == "www.example.test"
    table = {r["address"]: (r["name"], r["cname"]) for r in doc["names"]["names"]}
    assert table == {"192.0.2.80": ("www.example.test", "edge.cdn.test"),
                     "2001:db8::80": ("www.example.test", "edge.cdn.test")}
    assert doc["names"]["parse_errors"]["truncated"] == 1
    by_id = {r["trans_id"]: r for r in log}
    assert by_id[7]["answers"] == ["edge.cdn.test", "192.0.2.80"] and by_id[7]["TTLs"] == [300.0, 60.0]
    assert by_id[7]["rtt"] == pytest.approx(0.0025, abs=1e-6) and by_id[7]["ts"] == pytest.approx(T0)
    assert by_id[8]["answers"] == ["edge.cdn.test", "2001:db8::80"] and by_id[8]["qtype_name"] == "AAAA"
    assert (by_id[9]["rcode_name"], by_id[9]["rejected"], "answers" in by_id[9]) == \
        ("NXDOMAIN", True, False)
    assert by_id[10]["rcode_name"] == "NOERROR" and "query" not in by_id[10] and "rtt" not in by_id[10]
    assert {r["uid"][0] for r in log} == {"C"} and len({r["uid"] for r in log}) == len(log)
    assert set(log[0]) == set(lpd.DNS_LOG_FIELDS)


@pytest.mark.offline
def test_dns_log_joins_conn_log_on_uid(tmp_path):
    """With --connections, a DNS record's uid is its flow's conn.log uid (Zeek's join);
    /api/connections rows carry the same uid."""
    conn_log = tmp_path / "conn.log"
    doc, log = run(tmp_path, lookup_trace(), "--conn-log", str(conn_log), "--local-net", "10.1.0.0/24",
                   "--local-net", "fd00::/64")
    conns = [json.loads(line) for line in conn_log.read_text().splitlines()]
    by_flow = {(c["id.orig_h"], c["id.orig_p"], c["id.resp_h"], c["id.resp_p"]): c["uid"] for c in conns}
    assert len(set(by_flow.values())) == len(conns)
    for r in log:
        assert r["uid"] == by_flow[r["id.orig_h"], r["id.orig_p"], r["id.resp_h"], r["id.resp_p"]], r
    assert {c["uid"] for c in doc["connections"]["connections"]} <= set(by_flow.values())


def tcp_frame(src, dst, sport, dport, flags, seq, payload=b""):
    return ether(MAC_R, MAC_C, ETH_IP, ipv4(src, dst, PROTO_TCP, tcp(sport, dport, flags, seq,
                                                                     payload=payload)))


@pytest.mark.offline
def test_dns_over_tcp_is_read_across_segments(tmp_path):
    """Port 53 over TCP: a response split in three segments (one resent), two queries in
    one segment, and a stream with a hole, whose messages after the hole are not read and
    which is counted as a gap."""
    q1 = message(21, QUERY, ("a.tcp.test", A_RR))
    q2 = message(22, QUERY, ("b.tcp.test", A_RR))
    r1 = message(21, RESPONSE, ("a.tcp.test", A_RR),
                 [("a.tcp.test", A_RR, 30, bytes([192, 0, 2, 21]))])
    r2 = message(22, RESPONSE, ("b.tcp.test", A_RR),
                 [("b.tcp.test", A_RR, 30, bytes([192, 0, 2, 22]))])
    framed = [struct.pack("!H", len(m)) + m for m in (q1, q2, r1, r2)]
    c, cs, s, ss = CLIENT, 41000, RESOLVER, 53
    cseq, sseq = 1000, 5000
    resp = framed[2] + framed[3]
    cuts = (5, 40)
    recs = [(T0, 0, tcp_frame(c, s, cs, ss, TCP_SYN, cseq - 1)),
            (T0, 100, tcp_frame(s, c, ss, cs, TCP_SYN | TCP_ACK, sseq - 1)),
            (T0, 200, tcp_frame(c, s, cs, ss, TCP_PUSH | TCP_ACK, cseq, framed[0] + framed[1])),
            (T0, 300, tcp_frame(s, c, ss, cs, TCP_ACK, sseq, resp[:cuts[0]])),
            (T0, 400, tcp_frame(s, c, ss, cs, TCP_ACK, sseq, resp[:cuts[0]])),      # resent
            (T0, 500, tcp_frame(s, c, ss, cs, TCP_ACK, sseq + cuts[0], resp[cuts[0]:cuts[1]])),
            (T0, 600, tcp_frame(s, c, ss, cs, TCP_PUSH | TCP_FIN | TCP_ACK, sseq + cuts[1], resp[cuts[1]:])),
            # another stream: its response's first bytes never seen
            (T0, 700, tcp_frame(c, s, cs + 1, ss, TCP_SYN, cseq - 1)),
            (T0, 800, tcp_frame(c, s, cs + 1, ss, TCP_PUSH | TCP_ACK, cseq, framed[0])),
            (T0, 900, tcp_frame(s, c, ss, cs + 1, TCP_SYN | TCP_ACK, sseq - 1)),
            (T0, 950, tcp_frame(s, c, ss, cs + 1, TCP_ACK, sseq + 3, framed[2][3:]))]
    doc, log = run(tmp_path, recs)
    done = {(r["id.orig_p"], r["trans_id"]): r for r in log}
    assert done[cs, 21]["answers"] == ["192.0.2.21"] and done[cs, 22]["answers"] == ["192.0.2.22"]
    assert {r["proto"] for r in log} == {"tcp"}
    # from the query's segment to the one that completes the answer (as Zeek: once reassembled)
    assert done[cs, 21]["rtt"] == pytest.approx(400e-6, abs=1e-6)
    assert "rcode" not in done[cs + 1, 21]                  # its answer was in the hole
    assert doc["names"]["parse_errors"]["gap"] == 1
    assert {r["address"] for r in doc["names"]["names"]} == {"192.0.2.21", "192.0.2.22"}


@pytest.mark.offline
def test_table_shows_the_names(tmp_path):
    pcap = tmp_path / "t.pcap"
    write_pcap(pcap, lookup_trace())
    p = subprocess.run([sys.executable, LPD, "-r", str(pcap), "--names", "--remote",
                        "--local-net", "10.1.0.0/24", "--local-net", "fd00::/64"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["remote", "address"])
    assert lines[header].split()[2] == "name"
    assert any(line.startswith("192.0.2.80") and "www.example.test" in line for line in lines[header:])


# --- the bound and the policy --------------------------------------------------------------

@pytest.mark.unit
def test_a_flood_of_answers_cannot_push_out_busy_names():
    """Busy remotes (a local host sent to each after the answer) keep their names through
    a flood of ten tables' worth of answers for random addresses, matched or not; the
    table never holds more than its size, and the flood is what gets evicted."""
    size = 1000
    names = lpd.Names(size=size)
    table = names.table
    busy = [lpd.hot_key(ipaddress.ip_address(f"198.51.100.{i}").packed) for i in range(1, 201)]
    for i, key in enumerate(busy):
        table.answer(key, f"busy{i}.test", "", T0 + 3600, False)
        table.used(key, T0 + 3600)
    for n in range(10 * size):
        raw = (0x0A000000 + n).to_bytes(4, "big")
        table.answer(lpd.hot_key(raw), f"flood{n}.test", "", T0 + 3600, n % 2 == 0)
        assert len(table) <= size
    assert [table.get(k)[0] for k in busy] == [f"busy{i}.test" for i in range(200)]
    assert table.evictions == 200 + 10 * size - size
    rows = names.snapshot().names
    assert len(rows) == size and sum(r[1].startswith("busy") for r in rows) == 200


FLOOD_NAMES_MAX = 1000
FLOOD_ANSWERS = 50 * FLOOD_NAMES_MAX
BUSY = 100
AS_LIMIT = 1 << 30                  # RLIMIT_AS of the lpd under flood: a leak fails the run


@pytest.mark.offline
def test_a_replayed_flood_keeps_the_busy_names_in_bounded_memory(tmp_path):
    """End to end under prlimit: a client looks up BUSY names and sends to each answer
    (the decoder hands the stage those remotes: promoted), then 50 tables' worth of
    answers for addresses nobody talks to arrive, half of them to queries the client
    did send. The table ends at --names-max with every busy name in it, and the remotes
    document names the busy remotes."""
    recs, t = [], [T0, 0]

    def at():
        t[1] += 10
        return t[0] + t[1] // 1_000_000, t[1] % 1_000_000
    busy = [f"198.51.100.{i + 1}" for i in range(BUSY)]
    for i, addr in enumerate(busy):
        q = (f"busy{i}.test", A_RR)
        recs.append((*at(), frame(CLIENT, RESOLVER, 20000 + i, 53, message(i, QUERY, q))))
        recs.append((*at(), frame(RESOLVER, CLIENT, 53, 20000 + i, message(
            i, RESPONSE, q, [(q[0], A_RR, 3600, ipaddress.ip_address(addr).packed)]))))
        recs.append((*at(), frame(CLIENT, addr, 40000, 443, b"x" * 100)))
    for n in range(FLOOD_ANSWERS):
        q = (f"flood{n}.test", A_RR)
        ident, port = n & 0xFFFF, 30000 + n % 20000
        if n % 2:
            recs.append((*at(), frame(CLIENT, RESOLVER, port, 53, message(ident, QUERY, q))))
        addr = ipaddress.ip_address(ipaddress.ip_address("100.64.0.0") + n).packed
        recs.append((*at(), frame(RESOLVER, CLIENT, 53, port, message(
            ident, RESPONSE, q, [(q[0], A_RR, 3600, addr)]))))
    pcap = tmp_path / "flood.pcap"
    write_pcap(pcap, recs)
    p = subprocess.run(["prlimit", f"--as={AS_LIMIT}", sys.executable, LPD, "-r", str(pcap),
                        "--names", "--names-max", str(FLOOD_NAMES_MAX), "--remote",
                        "--local-net", "10.1.0.0/24", "--output", "json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json_values(p.stdout)[-1]
    names = {r["address"]: r["name"] for r in doc["names"]["names"]}
    assert len(names) == FLOOD_NAMES_MAX
    assert doc["names"]["evictions"] == BUSY + FLOOD_ANSWERS - FLOOD_NAMES_MAX
    assert all(names[a] == f"busy{i}.test" for i, a in enumerate(busy))
    remotes = {r["address"]: r["name"] for r in doc["remotes"]["remotes"]}
    assert all(remotes[a] == f"busy{i}.test" for i, a in enumerate(busy))


@pytest.mark.unit
def test_names_expire_after_their_ttl_and_the_grace():
    names = lpd.Names(size=10)
    key = lpd.hot_key(bytes([192, 0, 2, 1]))
    names.table.answer(key, "a.test", "", T0 + 60 + lpd.DNS_NAME_GRACE, False)
    names.now = T0 + 59 + lpd.DNS_NAME_GRACE
    assert len(names.snapshot().names) == 1
    names.now = T0 + 61 + lpd.DNS_NAME_GRACE
    assert names.snapshot().names == ()


@pytest.mark.unit
def test_pending_queries_are_bounded():
    logged = []
    names = lpd.Names(logged=logged.append)
    for i in range(lpd.DNS_PENDING_MAX + 10):
        msg = message(i & 0xFFFF, QUERY, ("q.test", A_RR))
        names.packet(frame(CLIENT, RESOLVER, 1024 + i % 60000, 53, msg), T0 + i * 1e-3)
    assert len(names.pending) == lpd.DNS_PENDING_MAX and names.pending_evictions == 10
    assert len(logged) == 10 and all("rtt" not in r for r in logged)
    names.finish()
    assert len(logged) == lpd.DNS_PENDING_MAX + 10 and not names.pending


@pytest.mark.unit
def test_workers_tables_merge_to_the_later_answer():
    """Two workers may each name an address (their flows' answers): the union names it
    by the later answer, whichever worker's snapshot comes first."""
    key = (4, lpd.hot_key(bytes([192, 0, 2, 7])))
    early = lpd.NamesSnapshot(names=((key, "old.test", "", T0 + 900, T0),))
    late = lpd.NamesSnapshot(names=((key, "new.test", "", T0 + 900, T0 + 5),))
    assert early.merge(late).by_key() == late.merge(early).by_key() == {key: "new.test"}


@pytest.mark.offline
def test_mdns_answers_name_their_owners_with_names_mdns(tmp_path):
    """An mDNS announcement (no question, the answer's owner is the name) names its
    address with --names-mdns only; the metrics say how many names there are."""
    announce = struct.pack("!HHHHHH", 0, 0x8400, 0, 1, 0, 0) + qname("printer.local") + \
        struct.pack("!HHIH", A_RR, 0x8001, 120, 4) + bytes([10, 1, 0, 5])
    recs = [(T0, 0, frame("10.1.0.5", "224.0.0.251", lpd.MDNS_PORT, lpd.MDNS_PORT, announce))]
    doc, _ = run(tmp_path, recs, "--names-mdns")
    assert [(r["address"], r["name"]) for r in doc["names"]["names"]] == [("10.1.0.5", "printer.local")]
    doc, _ = run(tmp_path, recs)
    assert doc["names"]["names"] == []
    pcap = tmp_path / "t.pcap"
    p = subprocess.run([sys.executable, LPD, "-r", str(pcap), "--names-mdns", "--output", "metrics"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in p.stdout.splitlines()
               if line.startswith(("lpd_names ", "lpd_name_evictions_total", "lpd_dns_parse_errors_total"))}
    assert samples["lpd_names"] == 1 and samples["lpd_name_evictions_total"] == 0
    assert samples['lpd_dns_parse_errors_total{reason="truncated"}'] == 0


def metrics(tmp_path, records, *args):
    """`-r --output metrics` of a trace: {(family, labels text): value}, and the text."""
    pcap = tmp_path / "m.pcap"
    write_pcap(pcap, records)
    p = subprocess.run([sys.executable, LPD, "-r", str(pcap), "--output", "metrics", *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    samples = {}
    for line in p.stdout.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            samples[name, labels.rstrip("}")] = float(value)
    return samples


@pytest.mark.offline
def test_remote_info_joins_the_exported_remotes_only(tmp_path):
    """lpd_remote_info{remote_ip,name} 1 for a named remote with its own ip_traffic_*
    series, none for one below -t (its frame is 142 bytes, the IPv6 one's 162): the
    series are as many as ip_traffic_tx_bytes' named ones, never more."""
    samples = metrics(tmp_path, lookup_trace(), "--names", "--remote", "-t", "150",
                      "--local-net", "10.1.0.0/24", "--local-net", "fd00::/64")
    info = {labels: v for (name, labels), v in samples.items() if name == "lpd_remote_info"}
    assert info == {'name="www.example.test",remote_ip="2001:db8::80"': 1.0}
    traffic = {labels for name, labels in samples if name == "ip_traffic_tx_bytes_total"}
    assert len(traffic) == 1 and 'remote_ip="2001:db8::80"' in next(iter(traffic))
    samples = metrics(tmp_path, lookup_trace(), "--names", "--remote", "-t", "0",
                      "--local-net", "10.1.0.0/24", "--local-net", "fd00::/64")
    assert len([1 for name, _ in samples if name == "lpd_remote_info"]) == 2
    samples = metrics(tmp_path, lookup_trace(), "--names", "--local-net", "10.1.0.0/24")
    assert not [1 for name, _ in samples if name == "lpd_remote_info"]     # no --remote: no join


@pytest.mark.unit
def test_remote_deltas_are_each_interval_bytes_whatever_the_snapshots():
    """RemoteDeltas: per take, the bytes each remote carried since the last one, whether
    or not snapshots ran in between; an evicted remote that comes back counts from zero;
    a remote sent to marks its name used (the engines' common path, issue 27)."""
    remotes = lpd.RemoteAddresses(remote_max=2)
    names = lpd.Names(remotes=remotes)
    deltas = names.deltas

    def batch(tx=(), rx=()):
        b = lpd.Batch()
        b.remote_tx.extend(tx)
        b.remote_rx.extend(rx)
        remotes.consume(b)
    batch(tx=[(1, 100, 1)], rx=[(2, 50, 1)])
    assert sorted(deltas.take()) == [(1, 100, 0), (2, 0, 50)]
    batch(tx=[(1, 10, 1)])
    remotes.snapshot()                      # the cache is gone; the follower still sees it
    batch(rx=[(1, 5, 1)])
    assert deltas.take() == [(1, 10, 5)]
    assert deltas.take() == []
    for key in range(3, 9):                 # a flood trims the table: 1 and 2 are light
        batch(tx=[(key, 1000, 1)])
    deltas.take()
    assert 2 not in remotes.table
    batch(rx=[(2, 7, 1)])
    assert deltas.take() == [(2, 0, 7)]     # counted since it entered again
    names.table.answer(9, "busy.test", "", 10.0, False, seen=0.0)
    batch(tx=[(9, 1, 1)])
    names.tick(20.0)
    assert 9 in names.table.protected and names.table.get(9)[2] == 20.0 + lpd.DNS_NAME_GRACE


# --- registered domains and per-domain traffic (--names-domains) ---------------------------

# A selection of the Public Suffix List's own test vectors, tests/test_psl.txt of
# github.com/publicsuffix/list at e8c9a2b2b2856b6449999dd0ec0d118f364ed0cd (dedicated to
# the public domain, CC0 1.0): (name, registered domain or None). Unicode names are
# given to lpd as the wire carries them, in punycode (the file lists both forms).
PSL_VECTORS = (
    ("COM", None), ("example.COM", "example.com"), ("WwW.example.COM", "example.com"),
    (".com", None), (".example", None), (".example.com", None), (".example.example", None),
    ("example", None), ("example.example", "example.example"),
    ("b.example.example", "example.example"), ("a.b.example.example", "example.example"),
    ("biz", None), ("domain.biz", "domain.biz"), ("b.domain.biz", "domain.biz"),
    ("a.b.domain.biz", "domain.biz"), ("com", None), ("example.com", "example.com"),
    ("b.example.com", "example.com"), ("a.b.example.com", "example.com"), ("uk.com", None),
    ("example.uk.com", "example.uk.com"), ("b.example.uk.com", "example.uk.com"),
    ("a.b.example.uk.com", "example.uk.com"), ("test.ac", "test.ac"),
    ("mm", None), ("c.mm", None), ("b.c.mm", "b.c.mm"), ("a.b.c.mm", "b.c.mm"),
    ("jp", None), ("test.jp", "test.jp"), ("www.test.jp", "test.jp"), ("ac.jp", None),
    ("test.ac.jp", "test.ac.jp"), ("www.test.ac.jp", "test.ac.jp"), ("kyoto.jp", None),
    ("test.kyoto.jp", "test.kyoto.jp"), ("ide.kyoto.jp", None),
    ("b.ide.kyoto.jp", "b.ide.kyoto.jp"), ("a.b.ide.kyoto.jp", "b.ide.kyoto.jp"),
    ("c.kobe.jp", None), ("b.c.kobe.jp", "b.c.kobe.jp"), ("a.b.c.kobe.jp", "b.c.kobe.jp"),
    ("city.kobe.jp", "city.kobe.jp"), ("www.city.kobe.jp", "city.kobe.jp"),
    ("ck", None), ("test.ck", None), ("b.test.ck", "b.test.ck"), ("a.b.test.ck", "b.test.ck"),
    ("www.ck", "www.ck"), ("www.www.ck", "www.ck"),
    ("us", None), ("test.us", "test.us"), ("www.test.us", "test.us"), ("ak.us", None),
    ("test.ak.us", "test.ak.us"), ("www.test.ak.us", "test.ak.us"), ("k12.ak.us", None),
    ("test.k12.ak.us", "test.k12.ak.us"), ("www.test.k12.ak.us", "test.k12.ak.us"),
    ("食狮.com.cn", "食狮.com.cn"), ("食狮.公司.cn", "食狮.公司.cn"),
    ("www.食狮.公司.cn", "食狮.公司.cn"), ("shishi.公司.cn", "shishi.公司.cn"), ("公司.cn", None),
    ("食狮.中国", "食狮.中国"), ("www.食狮.中国", "食狮.中国"), ("shishi.中国", "shishi.中国"),
    ("中国", None),
    ("xn--85x722f.com.cn", "xn--85x722f.com.cn"),
    ("xn--85x722f.xn--55qx5d.cn", "xn--85x722f.xn--55qx5d.cn"),
    ("www.xn--85x722f.xn--55qx5d.cn", "xn--85x722f.xn--55qx5d.cn"),
    ("shishi.xn--55qx5d.cn", "shishi.xn--55qx5d.cn"), ("xn--55qx5d.cn", None),
    ("xn--85x722f.xn--fiqs8s", "xn--85x722f.xn--fiqs8s"),
    ("www.xn--85x722f.xn--fiqs8s", "xn--85x722f.xn--fiqs8s"),
    ("shishi.xn--fiqs8s", "shishi.xn--fiqs8s"), ("xn--fiqs8s", None),
)
# The rules those vectors need, as the list writes them (uk.com is a PRIVATE one).
PSL_RULES = """// ===BEGIN ICANN DOMAINS===
com
biz
ac
*.mm
jp
ac.jp
kyoto.jp
ide.kyoto.jp
*.kobe.jp
!city.kobe.jp
*.ck
!www.ck
us
ak.us
k12.ak.us
cn
com.cn
公司.cn
中国
// ===END ICANN DOMAINS===
// ===BEGIN PRIVATE DOMAINS===
uk.com
// ===END PRIVATE DOMAINS===
"""


def wire(name):
    """A name as DNS carries it: each Unicode label in punycode."""
    return name if name.isascii() else name.encode("idna").decode()


def check_psl(psl):
    for name, expected in PSL_VECTORS:
        got = psl.registered(wire(name))
        assert got == (wire(expected) if expected else None), (name, got, expected)


@pytest.mark.unit
def test_public_suffix_list_algorithm_meets_the_lists_own_test_vectors():
    """The PSL algorithm (normal, wildcard and exception rules, the default "*") on its
    test vectors, with both sections as the vectors assume; lpd reads the ICANN section
    only, under which uk.com is no suffix (its customers count as uk.com)."""
    check_psl(lpd.PublicSuffixList(PSL_RULES.splitlines(), private=True))
    icann = lpd.PublicSuffixList(PSL_RULES.splitlines())
    assert icann.registered("a.b.example.uk.com") == "uk.com"
    assert icann.registered("www.city.kobe.jp") == "city.kobe.jp"


@pytest.mark.unit
def test_without_the_list_a_domain_is_the_last_two_labels(monkeypatch):
    monkeypatch.setattr(lpd, "_psl", [None])
    assert [lpd.registered_domain(n) for n in ("a.b.example.co.uk", "example.com.", "com")] == \
        ["co.uk", "example.com", None]


@pytest.mark.unit
@pytest.mark.skipif(not os.path.exists(lpd.PUBLIC_SUFFIX_LIST), reason="Debian's publicsuffix")
def test_debians_public_suffix_list_meets_the_test_vectors():
    with open(lpd.PUBLIC_SUFFIX_LIST, encoding="utf-8") as f:
        check_psl(lpd.PublicSuffixList(f, private=True))
    assert lpd.registered_domain("a.b.example.co.uk") == "example.co.uk"
    assert lpd.registered_domain("d1.cloudfront.net") == "cloudfront.net"   # ICANN section only


def domain_trace():
    """Answers for four names (two under example.com), then traffic in both directions
    over three intervals of 1 s to those addresses and to an unnamed one. Returns the
    records and the bytes by (name, direction) from the records' own lengths."""
    answers = (("v1.video.example.com", "192.0.2.1"), ("v2.video.example.com", "192.0.2.2"),
               ("www.example.co.uk", "192.0.2.3"), ("api.service.test", "192.0.2.4"))
    recs, sums = [], {}
    for i, (name, addr) in enumerate(answers):
        q = (name, A_RR)
        recs += [(T0, 10 * i, frame(CLIENT, RESOLVER, 43000 + i, 53, message(200 + i, QUERY, q))),
                 (T0, 10 * i + 5, frame(RESOLVER, CLIENT, 53, 43000 + i, message(
                     200 + i, RESPONSE, q, [(name, A_RR, 600, ipaddress.ip_address(addr).packed)])))]
    sizes = {"192.0.2.1": 1200, "192.0.2.2": 900, "192.0.2.3": 60, "192.0.2.4": 400, "192.0.2.9": 700}
    names = {addr: name for name, addr in answers}
    for second in range(1, 4):
        for j, (addr, size) in enumerate(sizes.items()):
            for k, (src, dst, way) in enumerate(((CLIENT, addr, "tx"), (addr, CLIENT, "rx"))):
                data = frame(src, dst, 50000 + j, 443, b"p" * (size + second * 7 + k))
                recs.append((T0 + second, 100 * j + k, data))
                key = (names.get(addr), way)
                sums[key] = sums.get(key, 0) + len(data)
    return recs, sums


def domains_of(doc):
    return {d["domain"]: (d["tx_bytes"], d["rx_bytes"]) for d in doc["names"]["domains"]}


@pytest.mark.offline
def test_named_traffic_counts_under_its_registered_domain(tmp_path):
    """-r of domain_trace: each domain's bytes are exactly its names' frames (both
    example.com names under one), the unnamed remote's are in none; with K 2 the two
    busiest domains have counters, the third is `other`; the metrics say the same."""
    recs, sums = domain_trace()
    uk = "example.co.uk" if lpd.public_suffix_list() is not None else "co.uk"
    want = {"example.com": tuple(sums["v1.video.example.com", w] + sums["v2.video.example.com", w]
                                 for w in ("tx", "rx")),
            uk: (sums["www.example.co.uk", "tx"], sums["www.example.co.uk", "rx"]),
            "service.test": (sums["api.service.test", "tx"], sums["api.service.test", "rx"])}
    args = ("--remote", "-t", "0", "--local-net", "10.1.0.0/24")
    doc, _ = run(tmp_path, recs, *args)
    assert domains_of(doc) == {**want, "other": (0, 0)}
    doc, _ = run(tmp_path, recs, *args, "--names-domains", "2")
    assert domains_of(doc) == {"example.com": want["example.com"],
                               "service.test": want["service.test"], "other": want[uk]}
    samples = metrics(tmp_path, recs, "--names", *args, "--names-domains", "2")
    for way, family in (("tx", "lpd_domain_transmit_bytes_total"), ("rx", "lpd_domain_receive_bytes_total")):
        got = {labels: v for (name, labels), v in samples.items() if name == family}
        i = ("tx", "rx").index(way)
        assert got == {'domain="example.com"': want["example.com"][i],
                       'domain="service.test"': want["service.test"][i], 'domain="other"': want[uk][i]}
    doc, _ = run(tmp_path, recs, *args, "--names-domains", "0")
    assert doc["names"]["domains"] == []


@pytest.mark.unit
def test_domain_counters_are_bounded_and_never_decrease():
    """Many domains over many ticks (a new one every tick, a few busy ones throughout,
    some coming back after idling): never more than K slots, nor more candidates than the
    bound; no exported counter decreases while exported, nor `other`; every byte is in a
    slot, in `other` or in a freed slot's last counts; a slot idle for DOMAIN_SLOT_IDLE
    frees and goes to the busiest candidate; one back within as long resumes its counts."""
    k, tick = 4, 60.0
    d = lpd.DomainTraffic(k, 1000)
    fed, freed_total, last, now = 0, 0, {}, 0.0
    for step in range(400):
        now = step * tick
        traffic = [(f"h{step}.flood{step}.test", 10, 10)]                 # a new domain each tick
        traffic += [(f"www.busy{b}.test", 1000, 500) for b in range(2)]
        if step < 50 or step > 150:                                       # idles past the bound
            traffic.append(("cdn.returning.test", 300, 300))
        traffic += [(f"x.many{(step * 37 + j) % 5000}.test", 1, 2) for j in range(30)]
        fed += sum(tx + rx for _, tx, rx in traffic)
        d.count(now, traffic)
        rows = {dom: (tx, rx) for dom, tx, rx in d.rows()}
        assert len(rows) <= k + 1 and len(d.candidates) <= 2 * lpd.DOMAIN_CANDIDATES_MAX
        for dom, (tx, rx) in rows.items():
            if dom in last:
                assert tx >= last[dom][0] and rx >= last[dom][1], (step, dom)
        freed_total += sum(sum(v) for dom, v in last.items() if dom not in rows)
        last = rows
        # (no freed domain gets a slot back while its counts are remembered, here)
        assert fed == sum(map(sum, rows.values())) + freed_total
        assert len(d.retired) <= k
    assert {"busy0.test", "busy1.test", "returning.test"} <= set(last)
    d.count(now + tick, [(f"a.burst{i}.test", 1, 1) for i in range(3 * lpd.DOMAIN_CANDIDATES_MAX)])
    assert len(d.candidates) <= lpd.DOMAIN_CANDIDATES_MAX and len(d.slots) <= k


@pytest.mark.unit
def test_a_domain_back_soon_after_its_slot_freed_resumes_its_counts():
    idle = lpd.DOMAIN_SLOT_IDLE
    d = lpd.DomainTraffic(2, 1000)
    d.count(0.0, [("a.one.test", 100, 1), ("b.two.test", 100, 1)])
    d.count(idle, [("b.two.test", 10, 0)])                      # one.test idle: freed
    assert [r[0] for r in d.rows()] == ["two.test", "other"]
    d.count(idle + 1, [("a.one.test", 5, 0)])
    assert dict((r[0], r[1:]) for r in d.rows())["one.test"] == (105, 1)
    d.count(3 * idle, [("b.two.test", 1, 0)])                   # one.test freed, forgotten an idle later
    d.count(4 * idle + 1, [("c.three.test", 1, 0)])
    d.count(4 * idle + 2, [("a.one.test", 7, 0)])
    assert dict((r[0], r[1:]) for r in d.rows())["one.test"] == (7, 0)


@pytest.mark.unit
def test_workers_domain_counters_sum_by_domain():
    """Each worker has its own K: the parent's rows are their sums by domain, `other` last."""
    a = lpd.NamesSnapshot(domains=(("one.test", 10, 1), ("two.test", 5, 0), ("other", 3, 3)))
    b = lpd.NamesSnapshot(domains=(("two.test", 1, 1), ("three.test", 2, 2), ("other", 1, 0)))
    assert a.merge(b).domains == (("one.test", 10, 1), ("two.test", 6, 1), ("three.test", 2, 2),
                                  ("other", 4, 3))
    assert lpd.NamesSnapshot().merge(lpd.NamesSnapshot()).domains == ()
