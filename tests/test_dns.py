"""DNS messages (issue 27, its first part: the parser the names stage will use): every
DNS message in tcpdump's corpus read as tshark reads it (query name, answers' addresses,
CNAME targets, TTLs), hostile bytes never raising anything but DnsError, compression
pointer loops refused."""
import ipaddress
import os
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lpd
from conftest import CORPUS

DNS_PCAPS = ("dns_udp.pcap", "dns_udp_2.pcap", "dns_fwdptr.pcap", "dnssec.pcap", "edns-opts.pcap",
             "dns-uri.pcap", "dns-badlabel.pcap", "dns-badvers.pcap")
FIELDS = ("frame.number", "udp.srcport", "dns.id", "dns.qry.name", "dns.a", "dns.aaaa",
          "dns.cname", "dns.resp.ttl", "_ws.malformed")


def udp_payloads(pcap):
    """{frame number: the UDP payload of a frame to or from port 53}, read here."""
    out = {}
    for i, (_, data) in enumerate(lpd_frames(pcap), 1):
        f = lpd.parse_l4(data)
        if f and f[0] == lpd.IPPROTO_UDP and 53 in (f[3], f[4]):
            out[i] = bytes(data[f[12]:f[12] + f[6]])
    return out


def lpd_frames(pcap):
    import harness
    return harness.timed_frames(pcap)


def tshark(pcap):
    cmd = ["tshark", "-r", pcap, "-n", "-Y", "dns && udp", "-T", "fields", "-E", "separator=|",
           "-E", "occurrence=a", "-E", "aggregator=;"]
    for f in FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    return [dict(zip(FIELDS, line.split("|"))) for line in out.splitlines()]


def values(text):
    return [v for v in text.split(";") if v]


@pytest.mark.offline
@pytest.mark.parametrize("name", DNS_PCAPS)
def test_every_corpus_dns_message_reads_as_tshark_reads_it(name):
    pcap = os.path.join(CORPUS, name)
    payloads = udp_payloads(pcap)
    rows = tshark(pcap)
    assert rows and payloads
    compared = cut = 0
    for row in rows:
        payload = payloads[int(row["frame.number"])]
        msg = lpd.parse_dns(payload)
        assert msg.id == int(row["dns.id"], 16)
        queries = values(row["dns.qry.name"])
        if msg.question:
            assert msg.question[0] == queries[0].lower().replace("<root>", "")
        else:
            assert msg.error and queries and "<" in queries[0], (msg, row)   # tshark: <Name too long>
        records = msg.answers + msg.others
        ours = [str(ipaddress.ip_address(r.value)) for r in records if r.type in (1, 28)]
        theirs = [str(ipaddress.ip_address(a)) for a in values(row["dns.a"]) + values(row["dns.aaaa"])]
        cnames = [r.value for r in records if r.type == 5]
        ttls = [r.ttl for r in records if r.type != 41]
        if msg.error is None:
            assert not row["_ws.malformed"], row
            assert sorted(ours) == sorted(theirs)
            assert cnames == [c.lower() for c in values(row["dns.cname"])]
        else:
            # cut short (a snap length) or broken: what lpd read is what tshark read first
            assert set(ours) <= set(theirs) and len(records) < len(values(row["dns.resp.ttl"])) + 1
            cut += 1
        assert ttls == [int(t) for t in values(row["dns.resp.ttl"])][:len(ttls)]
        compared += 1
    assert compared


@pytest.mark.offline
def test_every_port_53_payload_of_the_corpus_reads_without_raising():
    """tcpdump's 447 captures, malformed ones (the zlip pointer loops) included: a
    message or a DnsError for a payload shorter than a header, nothing else."""
    n = 0
    for name in sorted(os.listdir(CORPUS)):
        for payload in udp_payloads(os.path.join(CORPUS, name)).values():
            try:
                lpd.parse_dns(payload)
            except lpd.DnsError:
                assert len(payload) < 12
            n += 1
    assert n > 50


def header(an=0, qd=1):
    return struct.pack("!HHHHHH", 0x1234, 0x8180, qd, an, 0, 0)


@pytest.mark.unit
def test_compression_pointers_are_followed_backwards_only():
    def error(data):
        return lpd.parse_dns(data).error

    q = header(an=2) + b"\x03www\x07example\x03com\x00" + struct.pack("!HH", 1, 1)
    # answer 1: a pointer to the question's name (offset 12), a CNAME to "cdn" + pointer
    # to "example.com" (offset 16); answer 2: the CNAME target's A record
    a1_rdata = b"\x03cdn\xc0\x10"
    a1 = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 300, len(a1_rdata)) + a1_rdata
    cname_at = len(q) + 2 + 10
    a2 = struct.pack("!H", 0xC000 | cname_at) + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 7])
    msg = lpd.parse_dns(q + a1 + a2)
    assert msg.question == ("www.example.com", 1, 1)
    assert msg.answers == (lpd.DnsRecord("www.example.com", 5, 300, "cdn.example.com"),
                           lpd.DnsRecord("cdn.example.com", 1, 60, bytes([192, 0, 2, 7])))
    loop = header(qd=1) + b"\xc0\x0c" + struct.pack("!HH", 1, 1)       # points at itself
    assert error(loop) == "pointer" and lpd.parse_dns(loop).question == ()
    ahead = header(qd=1) + b"\xc0\x0e\x00" + struct.pack("!HH", 1, 1)  # points forwards
    assert error(ahead) == "pointer"
    long_name = header(qd=1) + (b"\x3f" + b"a" * 63) * 4 + b"\x00" + struct.pack("!HH", 1, 1)
    assert error(long_name) == "name_too_long"
    cut = lpd.parse_dns(q + a1 + a2[:-3])
    assert (cut.error, cut.answers) == ("truncated", msg.answers[:1])     # what came before the cut
    with pytest.raises(lpd.DnsError):
        lpd.parse_dns(q[:11])


@pytest.mark.unit
@settings(max_examples=3000, deadline=200)
@given(st.binary(max_size=600))
def test_any_bytes_give_a_message_or_a_dns_error(data):
    try:
        msg = lpd.parse_dns(data)
    except lpd.DnsError:
        return
    assert len(msg.answers) <= lpd.DNS_RECORDS_MAX
    for r in msg.answers:
        assert len(r.name) <= 4 * lpd.DNS_NAME_MAX              # escaped, at most 4 chars a byte
