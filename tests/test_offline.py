"""Offline mode (-r): every corpus capture replays through the live block path, and the
totals agree with an independent reading of the same files."""
import glob
import io
import ipaddress
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lpd
import packets
from conftest import CORPUS
from harness import PCAP_NS, PCAP_US, bare_udp4, independent_records, write_pcap

pytestmark = pytest.mark.offline

PCAPS = sorted(glob.glob(os.path.join(CORPUS, "*.pcap")))


def well_formed_ip(data, wirelen):
    """The IP frames lpd must attribute: complete IPv4/IPv6 headers whose lengths fit."""
    if len(data) < 14:
        return False
    off = 12
    while data[off:off + 2] in (b"\x81\x00", b"\x88\xa8", b"\x91\x00"):
        off += 4
        if off + 2 > len(data):
            return False
    et = data[off:off + 2]
    ip = off + 2
    if et == b"\x08\x00":
        if len(data) < ip + 20 or data[ip] >> 4 != 4 or data[ip] & 15 < 5:
            return False
        total = int.from_bytes(data[ip + 2:ip + 4], "big")
        return (data[ip] & 15) * 4 <= total and ip + total <= wirelen
    if et == b"\x86\xdd":
        if len(data) < ip + 40 or data[ip] >> 4 != 6:
            return False
        return ip + 40 + int.from_bytes(data[ip + 4:ip + 6], "big") <= wirelen
    return False


def replay(path, *extra):
    """The replay's JSON document (--output json), every address local."""
    out = io.StringIO()
    opts = lpd.parse_args(["-r", path, "--local-net", "0.0.0.0/0", "--local-net", "::/0",
                           "--output", "json", *extra])
    assert lpd.replay(opts, out) == 0
    return json.loads(out.getvalue())


def address_rows(docs):
    """{address: (tx_bytes, tx_packets, rx_bytes, rx_packets)}"""
    return {ipaddress.ip_address(d["address"]): (d["tx_bytes"], d["tx_packets"], d["rx_bytes"],
                                                 d["rx_packets"]) for d in docs["addresses"]["addresses"]}


def table_totals(docs):
    rows = address_rows(docs).values()
    return sum(r[0] for r in rows), sum(r[2] for r in rows)


@pytest.mark.skipif(not PCAPS, reason="corpus ../shared/corpus/pcaps absent")
def test_every_corpus_pcap_replays_with_exact_totals():
    checked = 0
    for path in PCAPS:
        expect = sum(w for w, d in independent_records(path) if well_formed_ip(d, w))
        tx, rx = table_totals(replay(path))
        assert tx == expect, os.path.basename(path)
        assert rx == expect, os.path.basename(path)   # every address is local: each byte twice
        checked += 1
    assert checked == len(PCAPS) >= 400


@pytest.mark.parametrize("magic,order", [(PCAP_US, "<"), (PCAP_US, ">"), (PCAP_NS, "<"), (PCAP_NS, ">")])
def test_byte_orders_and_nanosecond_magic(tmp_path, magic, order):
    frame = bare_udp4("10.0.0.1", "192.0.2.9")
    path = tmp_path / "x.pcap"
    write_pcap(path, [(0, 5, frame), (1, 5, frame[:40], len(frame)), (2, 5, frame[:30], len(frame))],
               magic, order)
    rows = address_rows(replay(str(path), "--local-net", "10.0.0.0/8"))
    # record 2 lost its payload to the snap length but has its IP header: counted;
    # record 3 lost part of the IP header: malformed, not attributed
    assert rows[ipaddress.ip_address("10.0.0.1")][:2] == (2 * len(frame), 2)


@pytest.mark.parametrize("content,message", [
    (b"\x0a\x0d\x0d\x0a" + bytes(40), "byte 0: not pcapng (byte-order magic 0x00000000)"),
    (b"GIF89a" + bytes(30), "not a pcap file (magic 0x"),
    (b"\xd4\xc3\xb2\xa1", "not a pcap file (only 4 header bytes)"),
])
def test_bad_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pcap"
    path.write_bytes(content)
    assert lpd.main(["-r", str(path)]) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and message in err


def test_truncated_record_is_read_up_to_the_cut_with_one_warning(tmp_path, capsys):
    """A capture still being written, or cut short: the records before the cut count."""
    path = tmp_path / "cut.pcap"
    frame = bare_udp4("10.0.0.1", "10.0.0.2")
    write_pcap(path, [(i, 5, frame) for i in range(3)])
    path.write_bytes(path.read_bytes()[:-5])
    assert lpd.main(["-r", str(path)]) == 0
    assert capsys.readouterr().err == (f"lpd: {path}: truncated dump file: record 3 at byte {24 + 2 * (16 + len(frame))} "
                   f"is cut short ({16 + len(frame) - 5} of {16 + len(frame)} bytes); read the 2 "
                   "packets before it\n")


def test_non_ethernet_link_type_is_refused(tmp_path, capsys):
    path = tmp_path / "raw.pcap"
    write_pcap(path, [], linktype=101)
    assert lpd.main(["-r", str(path)]) == 78
    assert "link type 101 is not Ethernet" in capsys.readouterr().err


RULE_EXPRS = ["ip", "ip6", "arp", "tcp", "udp", "icmp", "icmp6", "vlan", "mpls", "pppoes",
              "tcp port 80", "udp port 53", "port 22 or port 23", "ip[6:2] & 0x1fff != 0",
              "tcp[tcpflags] & (tcp-syn|tcp-fin) != 0", "greater 1000", "less 64",
              "ether broadcast", "ether multicast", "ip multicast", "net 192.168.0.0/16",
              "ip6 protochain 58", "portrange 1-1023", "ip proto 47", "sctp", "igmp",
              "vlan and ip", "not ip and not ip6", "ether[0] & 1 = 0 and ip[8] > 32",
              "icmp[icmptype] = icmp-echo"]


@pytest.mark.skipif(not PCAPS, reason="corpus ../shared/corpus/pcaps absent")
def test_rule_lines_on_the_corpus_equal_libpcap(tmp_path):
    import libpcap_oracle as oracle
    rules = tmp_path / "corpus.filters"
    rules.write_text("".join(f"r{i};{e}\n" for i, e in enumerate(RULE_EXPRS)))
    progs = [oracle.Program(e) for e in RULE_EXPRS]
    for path in PCAPS:
        by_id = {d["id"]: d for d in replay(path, "-f", str(rules))["rules"]["rules"]}
        got = [f"{i}:{by_id[i]['bytes']}:{by_id[i]['packets']}" for i in (f"r{n}" for n in range(len(progs)))]
        want = [0, 0] * len(progs)
        for wirelen, data in independent_records(path):
            for i, p in enumerate(progs):
                if p.filter(data, wirelen):
                    want[2 * i] += wirelen
                    want[2 * i + 1] += 1
        assert got == [f"r{i}:{want[2 * i]}:{want[2 * i + 1]}" for i in range(len(progs))], \
            os.path.basename(path)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(packets.short_frames(), packets.frames()), min_size=1, max_size=40))
def test_any_frame_is_counted_and_never_raises(frames):
    """Garbage, runts, cut headers: every frame reaches the interface totals, none raises,
    and a frame is either attributed or counted as malformed/other, never both."""
    local = lpd.LocalAddresses([ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")])
    dec = lpd.Decoder(local)
    for block in lpd.frames_to_blocks(frames):
        dec.process_block(memoryview(block), 0)
    assert dec.frames == len(frames)
    assert dec.totals[2:] == [sum(w for _, w in frames), len(frames)]
    attributed = sum(e[1] for e in local.hosts4.values()) + sum(e[1] for e in local.hosts6.values())
    expect = sum(1 for d, w in frames if well_formed_ip(d, w))
    assert attributed == expect


def test_new_local_nets_never_drop_counters():
    """An interface coming back before its addresses, or a reload while it is gone,
    must not wipe what was counted (issue 3: every counter kept)."""
    frame = bare_udp4("10.0.0.1", "192.0.2.9")
    local = lpd.LocalAddresses([ipaddress.ip_network("10.0.0.0/8")])
    dec = lpd.Decoder(local)

    def feed():
        for block in lpd.frames_to_blocks([(frame, len(frame))]):
            dec.process_block(memoryview(block), 0)

    def rows():
        return [(lpd.address(r[0]), list(r[1:5])) for r in local.snapshot().rows]
    feed()
    local.set_local_nets([])
    feed()
    assert rows() == [(ipaddress.ip_address("10.0.0.1"), [len(frame), 1, 0, 0])]   # kept, not counting
    local.set_local_nets([ipaddress.ip_network("10.0.0.0/8")])
    feed()
    assert rows()[0][1] == [2 * len(frame), 2, 0, 0]                                # and counting again


@pytest.mark.skipif(not PCAPS, reason="corpus ../shared/corpus/pcaps absent")
def test_output_is_the_same_whatever_the_hash_seed():
    """IPv6 addresses are bytes, whose hashes change with PYTHONHASHSEED: the rows of
    -r's output must not follow a set's order (they did, for local addresses first
    counted in the same interval)."""
    import subprocess
    import sys
    pcap = os.path.join(CORPUS, "hncp.pcap")
    outs = {subprocess.run([sys.executable, lpd.__file__, "-r", pcap, "--remote", "--connections",
                            "--local-net", "fe80::/10", "--output", "metrics"],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
            for seed in (1, 2, 3, 4)}
    assert len(outs) == 1 and "network_ip_tx_bps{" in outs.pop()
