"""The pipeline without a socket: synthetic ring blocks (every header field set) through
the decoder into the consumers, their snapshots and merges, and publication (the reload
swap at a block boundary: test_reload)."""
import io
import ipaddress
import json
import threading
import time

import pytest

import lpd
import packets
from harness import write_pcap

pytestmark = pytest.mark.offline

NET = ipaddress.ip_network("10.0.0.0/8")
NET6 = ipaddress.ip_network("2001:db8::/32")


def udp4(src, dst, payload=b"x" * 20):
    return packets.ether("02:00:00:00:00:02", "02:00:00:00:00:01", packets.ETH_IP,
                         packets.ipv4(src, dst, packets.PROTO_UDP, packets.udp(1000, 2000, payload)))


def udp6(src, dst, payload=b"y" * 20):
    return packets.ether("02:00:00:00:00:02", "02:00:00:00:00:01", packets.ETH_IP6,
                         packets.ipv6(src, dst, packets.PROTO_UDP, packets.udp(1000, 2000, payload)))


def decode(frames, local=None, consumers=(), block_size=lpd.RING_BLOCK_BYTES):
    local = local or lpd.LocalAddresses([NET, NET6])
    dec = lpd.Decoder(local, consumers)
    for block in lpd.frames_to_blocks(frames, block_size):
        dec.process_block(memoryview(block), 0)
    return dec


def rows(local):
    return {str(lpd.address(r[0])): tuple(r[1:5]) for r in local.snapshot().rows}


def rules(text):
    return lpd.RuleCounter(lpd.parse_filter_text(text, "t", None))


# --- synthetic blocks: one FRAME layout, read and built ------------------------------

def test_synthetic_blocks_carry_every_header_field():
    f = lpd.SynthFrame(udp4("10.0.0.1", "10.0.0.2"), 90, pkttype=lpd.PACKET_OUTGOING,
                       vlan_tci=0x2007, vlan_tpid=0x88A8, ts=1700000000.25)
    g = lpd.SynthFrame(udp6("2001:db8::1", "2001:db8::2"), 200, ts=1700000001.5)
    [block] = list(lpd.frames_to_blocks([f, g]))
    b = dict(zip([n for n, _ in lpd.BLOCK_FIELDS], lpd.BLOCK.unpack_from(block)))
    assert b["block_status"] & lpd.TP_STATUS_USER and b["num_pkts"] == 2
    assert b["offset_to_first_pkt"] == lpd.BLOCK_FIRST_FRAME == 48 and b["seq_num"] == 1
    assert (b["first_sec"], b["first_nsec"]) == (1700000000, 250000000)
    assert (b["last_sec"], b["last_nsec"]) == (1700000001, 500000000)
    names = [n for n, _ in lpd.FRAME_FIELDS if n is not None]
    pos, seen, nexts = b["offset_to_first_pkt"], [], []
    for want in (f, g):
        h = dict(zip(names, lpd.FRAME.unpack_from(block, pos)))
        nexts.append(h["next_offset"])
        data = bytes(block[pos + h["mac"]:pos + h["mac"] + h["snaplen"]])
        assert data == want.data and h["len"] == want.wirelen
        assert h["sll_pkttype"] == want.pkttype and h["sll_hatype"] == lpd.ARPHRD_ETHER
        assert h["sec"] + h["nsec"] / 1e9 == pytest.approx(want.ts)
        assert h["sll_addr"][:6] == want.data[6:12] and h["sll_halen"] == 6
        assert (h["mac"], h["net"]) == (82, 96)       # tpacket_rcv's offsets for Ethernet
        seen.append((h["status"], h["vlan_tci"], h["vlan_tpid"]))
        pos += h["next_offset"]
    vlan = lpd.TP_STATUS_VLAN_VALID | lpd.TP_STATUS_VLAN_TPID_VALID
    assert seen == [(lpd.TP_STATUS_USER | vlan, 0x2007, 0x88A8), (lpd.TP_STATUS_USER, 0, 0)]
    assert nexts[0] % 8 == 0 and nexts[1] == 0        # 8-aligned; the last one 0
    assert b["blk_len"] == b["offset_to_first_pkt"] + nexts[0] + -(-(82 + len(g.data)) // 8) * 8
    # The hot loop's layout is the same declaration with fields left out.
    hot = lpd.FRAME_HDR.unpack_from(block, b["offset_to_first_pkt"])
    assert hot == (nexts[0], len(f.data), 90, seen[0][0], 82, 0x2007, 0x88A8,
                   lpd.PACKET_OUTGOING)


def test_blocks_split_when_full_and_every_frame_is_decoded():
    frames = [(udp4("10.0.0.1", "192.0.2.1", b"z" * 900), 942)] * 100
    blocks = list(lpd.frames_to_blocks(frames, 16384))
    assert len(blocks) > 1
    assert sum(lpd.BLOCK_HDR.unpack_from(b, lpd.BLOCK_HDR_OFF)[0] for b in blocks) == 100
    dec = decode(frames, block_size=16384)
    assert dec.frames == 100 and dec.totals == [0, 0, 942 * 100, 100]


# --- the decoder and the local-address consumer ---------------------------------------

def test_direction_comes_from_the_packet_type():
    out = lpd.SynthFrame(udp4("10.0.0.1", "192.0.2.9"), 62, pkttype=lpd.PACKET_OUTGOING)
    back = lpd.SynthFrame(udp4("192.0.2.9", "10.0.0.1"), 62, pkttype=lpd.PACKET_HOST)
    dec = decode([out, out, back])
    assert dec.totals == [124, 2, 62, 1]                  # interface: by packet type
    assert rows(dec.local) == {"10.0.0.1": (124, 2, 62, 1)}   # address: by source/destination


def test_stripped_vlan_tag_counts_its_bytes_and_rules_see_it_reinserted():
    data = udp4("10.0.0.1", "10.0.0.2")
    tagged = lpd.SynthFrame(data, len(data), vlan_tci=7)
    qinq = lpd.SynthFrame(data, len(data), vlan_tci=100, vlan_tpid=0x88A8)
    rc = rules("v7;vlan 7\nad;ether[12:2] = 0x88a8\nany;vlan\nplain;ip\n")
    dec = decode([tagged, qinq, (data, len(data))], consumers=[rc])
    wl = len(data) + lpd.VLAN_TAG_LEN
    assert dec.totals[2:] == [2 * wl + len(data), 3]
    assert rows(dec.local)["10.0.0.1"] == (2 * wl + len(data), 3, 0, 0)
    assert rc.snapshot().rows == (("v7", wl, 1), ("ad", wl, 1), ("any", 2 * wl, 2),
                                  ("plain", len(data), 1))


def test_malformed_frames_are_counted_by_reason_and_not_attributed():
    good = udp4("10.0.0.1", "10.0.0.2")
    bad = {
        "ihl": good[:14] + bytes([0x43]) + good[15:],
        "version": good[:14] + bytes([0x55]) + good[15:],
        "length": good[:16] + (2000).to_bytes(2, "big") + good[18:],
        "truncated": good[:24],
    }
    dec = decode([(f, len(f)) for f in bad.values()] + [(b"\0" * 10, 10)])
    assert dec.malformed == {"truncated": 2, "version": 1, "ihl": 1, "length": 1}
    assert rows(dec.local) == {}
    assert dict(dec.snapshot().malformed) == dec.malformed


class Recorder(lpd.Consumer):
    """A stage that records what the decoder hands it."""
    name = "recorder"

    def __init__(self, wants):
        self.wants, self.raw, self.batches = frozenset(wants), [], []

    def consume(self, batch):
        self.raw += [(bytes(d), w, t, v) for d, w, t, v in batch.raw]
        self.batches.append((batch.frames, batch.time))


def test_consumers_get_only_what_they_asked_for():
    data = udp4("10.0.0.1", "192.0.2.1")
    frames = [lpd.SynthFrame(data, 62, pkttype=lpd.PACKET_OUTGOING, ts=5.0),
              lpd.SynthFrame(data, 62, vlan_tci=9, ts=6.0),
              lpd.SynthFrame(b"\xff" * 60, 60, ts=7.0)]                   # not IP: still a frame
    raw, none = Recorder([lpd.WANT_RAW]), Recorder([])
    dec = decode(frames, consumers=[raw, none])
    tag = (0x8100).to_bytes(2, "big") + (9).to_bytes(2, "big")
    assert raw.raw == [(data, 62, lpd.PACKET_OUTGOING, None),
                       (data[:12] + tag + data[12:], 66, lpd.PACKET_HOST, 9),
                       (b"\xff" * 60, 60, lpd.PACKET_HOST, None)]
    assert raw.batches == none.batches == [(3, 7.0)]      # one batch per block, its clock
    assert dec.want_raw
    quiet = Recorder([])
    alone = decode(frames, consumers=[quiet])
    assert not alone.want_raw and quiet.raw == [] and quiet.batches == [(3, 7.0)]    # nobody asked: no per-frame tuple is built


def test_locality_cache_is_bounded_and_local_counts_stay_exact(monkeypatch):
    monkeypatch.setattr(lpd, "LOCALITY_CACHE_MAX", 64)
    local = lpd.LocalAddresses([NET])
    me = udp4("10.0.0.1", "10.0.0.2")
    frames = []
    for i in range(1000):                           # 1000 remote peers, then our host again
        frames.append((udp4(f"192.0.{i // 250}.{i % 250 + 1}", "10.0.0.1"), 62))
        frames.append((me, len(me)))
    decode(frames, local)
    assert len(local.cache4) <= 64 + len(local.hosts4) + 1
    assert rows(local)["10.0.0.1"] == (1000 * len(me), 1000, 1000 * 62, 1000)
    assert rows(local)["10.0.0.2"] == (0, 0, 1000 * len(me), 1000)
    assert len(local.hosts4) == 2


def test_rates_and_idle_expiry_follow_the_clock_they_are_given():
    local = lpd.LocalAddresses([NET], idle_timeout=10.0)
    frame = udp4("10.0.0.1", "192.0.2.1")
    local.tick(100.0)
    decode([(frame, 1000)] * 5, local)              # 5000 bytes sent
    local.tick(102.0)
    snap = {str(lpd.address(r[0])): r for r in local.snapshot().rows}
    assert snap["10.0.0.1"][5:] == (5000 * 8 / 2.0, 0.0)
    local.tick(105.0)                               # quiet: reads 0, still there
    assert [r[5:] for r in local.snapshot().rows] == [(0.0, 0.0)]
    local.tick(111.9)
    assert len(local.snapshot().rows) == 1
    local.tick(112.0)                               # 10 s after its last traffic
    assert local.snapshot().rows == () and local.hosts4 == {}
    assert int(ipaddress.ip_address("10.0.0.1")) not in local.cache4
    decode([(frame, 1000)], local)                  # comes back from zero
    assert rows(local) == {"10.0.0.1": (1000, 1, 0, 0)}


def test_new_local_nets_keep_counters_and_stop_counting_old_ones():
    local = lpd.LocalAddresses([NET])
    frame = udp4("10.0.0.1", "172.16.0.1")
    decode([(frame, 100)], local)
    local.set_local_nets([ipaddress.ip_network("172.16.0.0/12")])
    decode([(frame, 100)], local)
    assert rows(local) == {"10.0.0.1": (100, 1, 0, 0), "172.16.0.1": (0, 0, 100, 1)}


# --- snapshots and publication -----------------------------------------------------------

def test_snapshots_merge_to_what_one_pass_counts():
    frames = [(udp4(f"10.0.0.{i % 7 + 1}", f"192.0.2.{i % 3 + 1}"), 60 + i) for i in range(50)]
    frames += [(udp6("2001:db8::1", "2001:db8::99"), 90)] * 4 + [(b"\0" * 20, 20)] * 3
    text = "u;udp\nsix;ip6\nbig;greater 80\n"

    def run(part):
        rc = rules(text)
        dec = decode(part, consumers=[rc])
        return dec.snapshot(), dec.local.snapshot(), rc.snapshot()

    whole = run(frames)
    halves = [run(frames[::2]), run(frames[1::2])]
    merged = [a.merge(b) for a, b in zip(*halves)]
    assert merged[0] == whole[0]
    assert dict((r[0], r[1:]) for r in merged[1].rows) == dict((r[0], r[1:]) for r in whole[1].rows)
    assert merged[2] == whole[2]


def test_fresh_waits_for_a_publication_made_after_the_call():
    pub = lpd.Published()
    pub.publish({"n": 0})
    published = []

    def capture():                                  # the capture thread's part of the deal
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not published:
            if pub.requested:
                pub.requested = False
                pub.publish({"n": 1})
                published.append(1)
            time.sleep(0.01)

    t = threading.Thread(target=capture)
    t.start()
    assert pub.fresh(5.0) == {"n": 1}
    t.join(5)
    t0 = time.monotonic()
    assert pub.fresh(0.2) == {"n": 1}               # nobody publishes: bounded, the latest
    assert 0.15 < time.monotonic() - t0 < 2


# --- GSO/GRO super-frames: counted as what the wire carried -------------------------------

def tcp4_super(payload_len, options=b"\x01" * 12, src="10.0.0.1", dst="192.0.2.1"):
    seg = packets.tcp(40000, 80, packets.TCP_ACK, options=options, payload=b"p" * payload_len)
    return packets.ether("02:00:00:00:00:02", "02:00:00:00:00:01", packets.ETH_IP,
                         packets.ipv4(src, dst, packets.PROTO_TCP, seg), pad=False)


def super_frames(frames):
    """Frames as a PACKET_VNET_HDR ring hands them over, cut to the accounting snaplen."""
    return list(lpd.frames_to_blocks(frames, vnet=True))


def test_a_tcp_super_frame_counts_the_segments_the_wire_carried():
    mss, payload = 1448, 10 * 1448 + 100            # 11 segments, the last one short
    data = tcp4_super(payload)
    hdr = 14 + 20 + 32                              # Ethernet, IPv4, TCP with 12 option bytes
    assert len(data) == hdr + payload
    sf = lpd.SynthFrame(data[:lpd.SNAPLEN_ACCOUNTING], len(data), pkttype=lpd.PACKET_OUTGOING,
                        gso=(lpd.VIRTIO_NET_HDR_GSO_TCPV4, mss, hdr))
    rc = rules("web;tcp port 80\nbig;greater 2000\n")
    local = lpd.LocalAddresses([NET])
    dec = lpd.Decoder(local, [rc], vnet=True)
    for block in super_frames([sf]):
        dec.process_block(memoryview(block), 0)
    wire = payload + 11 * hdr                       # what 11 frames on the wire add up to
    assert dec.totals == [wire, 11, 0, 0] and dec.gso_frames == 1 and dec.gso_unsplit == 0
    assert rows(local) == {"10.0.0.1": (wire, 11, 0, 0)}
    # judged once, as the frame it is ('greater 2000' is true of it), counted 11 times
    assert rc.snapshot().rows == (("web", wire, 11), ("big", wire, 11))


def test_super_frames_of_every_kind_and_vlan():
    v6 = packets.ether("02:00:00:00:00:02", "02:00:00:00:00:01", packets.ETH_IP6,
                       packets.ipv6("2001:db8::1", "2001:db8::2", packets.PROTO_TCP,
                                    packets.tcp(1, 2, packets.TCP_ACK, payload=b"q" * 3000)), pad=False)
    u4 = packets.ether("02:00:00:00:00:02", "02:00:00:00:00:01", packets.ETH_IP,
                       packets.ipv4("10.0.0.1", "10.0.0.2", packets.PROTO_UDP,
                                    packets.udp(1, 2, b"u" * 2500)), pad=False)
    cases = [
        # (frame, gso_type, gso_size, tag stripped?) -> (segments, bytes each repeats)
        (v6, lpd.VIRTIO_NET_HDR_GSO_TCPV6, 1000, False, 3, 14 + 40 + 20),
        (u4, lpd.VIRTIO_NET_HDR_GSO_UDP_L4, 1000, False, 3, 14 + 20 + 8),
        (u4, lpd.VIRTIO_NET_HDR_GSO_UDP, 1480, False, 2, 14 + 20),        # UFO: IP fragments
        (tcp4_super(3000), lpd.VIRTIO_NET_HDR_GSO_TCPV4 | lpd.VIRTIO_NET_HDR_GSO_ECN,
         1448, True, 3, 14 + 20 + 32 + 4),                                 # tag on every frame
    ]
    for data, kind, size, tagged, segs, hdr in cases:
        wl = len(data) + (4 if tagged else 0)
        got = lpd.gso_split(data[:lpd.SNAPLEN_ACCOUNTING], wl, 4 if tagged else 0, kind, size)
        assert got is not None and got[:2] == (wl + (segs - 1) * hdr, segs), (kind, got)
        sf = lpd.SynthFrame(data[:lpd.SNAPLEN_ACCOUNTING], len(data), gso=(kind, size, 0),
                            vlan_tci=5 if tagged else None)
        dec = lpd.Decoder(lpd.LocalAddresses([NET, NET6]), vnet=True)
        for block in super_frames([sf]):
            dec.process_block(memoryview(block), 0)
        assert dec.totals[2:] == [wl + (segs - 1) * hdr, segs]


def test_inconsistent_super_frames_count_as_one_and_are_counted():
    data = tcp4_super(3000)
    bad = [
        (lpd.VIRTIO_NET_HDR_GSO_TCPV6, 1448),      # says IPv6, is IPv4
        (lpd.VIRTIO_NET_HDR_GSO_UDP_L4, 1448),     # says UDP, is TCP
        (lpd.VIRTIO_NET_HDR_GSO_TCPV4, 0),         # no segment size
        (0x42, 1448),                              # a type lpd does not know
    ]
    frames = [lpd.SynthFrame(data[:128], len(data), gso=(t, s, 0)) for t, s in bad]
    frames.append(lpd.SynthFrame(data[:30], len(data), gso=(lpd.VIRTIO_NET_HDR_GSO_TCPV4, 1448, 0)))
    dec = lpd.Decoder(lpd.LocalAddresses([NET]), vnet=True)
    for block in super_frames(frames):
        dec.process_block(memoryview(block), 0)
    assert dec.gso_unsplit == 5 and dec.gso_frames == 0
    assert dec.totals[2:] == [5 * len(data), 5]    # each as the one frame it is
    assert dict(dec.snapshot().malformed)["truncated"] == 1


def test_plain_frames_on_a_vnet_ring_count_as_before():
    frames = [(udp4("10.0.0.1", "10.0.0.2"), 62)] * 3 + [(udp6("2001:db8::1", "2001:db8::2"), 82)]
    plain = decode(frames)
    dec = lpd.Decoder(lpd.LocalAddresses([NET, NET6]), vnet=True)
    for block in lpd.frames_to_blocks(frames, vnet=True):
        dec.process_block(memoryview(block), 0)
    assert dec.totals == plain.totals and rows(dec.local) == rows(plain.local)
    assert dec.gso_frames == dec.gso_unsplit == 0


# --- floods of spoofed sources inside a local net -----------------------------------------

def test_a_spoofed_flood_is_bounded_and_leaves_busy_hosts_exact():
    local = lpd.LocalAddresses([NET], local_max=1000)
    legit_out, legit_in = udp4("10.0.0.1", "192.0.2.1"), udp4("192.0.2.1", "10.0.0.1")
    frames, n = [], 100_000
    for i in range(n):
        frames.append((udp4(f"10.{1 + i // 65536}.{i // 256 % 256}.{i % 256}", "192.0.2.9"), 62))
        if i % 50 == 0:
            frames += [(legit_out, len(legit_out)), (legit_in, len(legit_in))]
    legit = n // 50
    dec = decode(frames, local)
    assert local.tracked() <= 1000 and local.evictions >= n - 1000
    assert rows(local)["10.0.0.1"] == (legit * len(legit_out), legit, legit * len(legit_in), legit)
    assert dec.totals[2:] == [n * 62 + legit * (len(legit_out) + len(legit_in)), n + 2 * legit]
    snap = local.snapshot()
    assert len(snap.rows) <= 1000 and snap.evictions == local.evictions


def test_an_ipv6_flood_in_a_64_is_bounded_too():
    local = lpd.LocalAddresses([ipaddress.ip_network("2001:db8::/64")], local_max=500)
    me = udp6("2001:db8::1", "2001:db8:ffff::1")
    frames = [(udp6(f"2001:db8::{i >> 16:x}:{i & 0xffff:x}:1", "2001:db8:ffff::2"), 82)
              for i in range(1, 20_001)]
    frames = [f for pair in zip(frames, [(me, len(me))] * len(frames)) for f in pair]
    decode(frames, local)
    assert local.tracked() <= 500 and local.evictions > 19_000
    assert rows(local)["2001:db8::1"] == (20_000 * len(me), 20_000, 0, 0)


def test_a_tick_works_on_what_changed_not_on_the_table():
    local = lpd.LocalAddresses([NET], idle_timeout=100.0)
    many = [(udp4(f"10.0.{i // 256}.{i % 256}", "192.0.2.1"), 62) for i in range(5000)]
    local.tick(0.0)
    decode(many, local)
    local.tick(1.0)
    assert local.work >= 5000                     # all of them moved
    local.tick(2.0)
    assert local.work == 5000                     # each goes from moving to still: once
    local.tick(3.0)
    assert local.work == 0                        # nothing moved: nothing to do
    one = udp4("10.0.0.7", "192.0.2.1")
    decode([(one, len(one))], local)
    local.tick(4.0)
    assert local.work == 1 and len(local.snapshot().rows) == 5000
    snap = {str(lpd.address(r[0])): r for r in local.snapshot().rows}
    assert snap["10.0.0.7"][1:5] == (62 + len(one), 2, 0, 0) and snap["10.0.0.7"][5] > 0
    assert snap["10.0.0.8"][5:] == (0.0, 0.0)
    local.tick(101.5)                             # 100 s after the flood's last frame
    assert len(local.snapshot().rows) == 1 and local.work == 5000


def test_super_frames_with_bad_headers_are_left_to_the_hot_loop():
    good = tcp4_super(3000)
    bad_tlen = good[:16] + (len(good) + 100).to_bytes(2, "big") + good[18:]   # beyond the frame
    v6 = packets.ether("02:00:00:00:00:02", "02:00:00:00:00:01", packets.ETH_IP6,
                       packets.ipv6("2001:db8::1", "2001:db8::2", packets.PROTO_TCP,
                                    packets.tcp(1, 2, packets.TCP_ACK, payload=b"q" * 3000)), pad=False)
    bad_version = v6[:14] + bytes([0x50 | v6[14] & 15]) + v6[15:]
    bad_doff = good[:14 + 20 + 12] + bytes([0x30]) + good[14 + 20 + 13:]    # data offset 3 words
    for data, kind in ((bad_tlen, lpd.VIRTIO_NET_HDR_GSO_TCPV4), (bad_doff, lpd.VIRTIO_NET_HDR_GSO_TCPV4),
                       (bad_version, lpd.VIRTIO_NET_HDR_GSO_TCPV6)):
        assert lpd.gso_split(data[:128], len(data), 0, kind, 1000) is None
    assert lpd.gso_split(good[:128], len(good), 0, lpd.VIRTIO_NET_HDR_GSO_TCPV4 | 0x10, 1448)[1] == 3
    dec = lpd.Decoder(lpd.LocalAddresses([NET, NET6]), vnet=True)
    for block in super_frames([lpd.SynthFrame(d[:128], len(d), gso=(k, 1000, 0)) for d, k in
                               ((bad_tlen, 1), (bad_version, 4))]):
        dec.process_block(memoryview(block), 0)
    assert dec.gso_unsplit == 2 and dict(dec.snapshot().malformed)["length"] == 1
    assert dict(dec.snapshot().malformed)["version"] == 1 and rows(dec.local) == {}


def test_a_slot_the_kernel_abandoned_is_skipped_and_a_vnet_ring_is_zeroed_when_drained():
    frame = udp4("10.0.0.1", "10.0.0.2")
    [block] = list(lpd.frames_to_blocks([(frame, len(frame))] * 3, 4096, vnet=True))
    first = lpd.BLOCK_FIRST_FRAME
    nxt = lpd.U32.unpack_from(block, first)[0]
    block[first + 4:first + nxt] = bytes(nxt - 4)       # as tpacket_rcv leaves a dropped frame
    ring = object.__new__(lpd.Ring)                     # the drain logic, without a socket
    ring.view, ring.block_size, ring.block_nr, ring.next_block = memoryview(block), 4096, 1, 0
    ring.vnet, ring.zeros = True, memoryview(bytes(4096))
    dec = lpd.Decoder(lpd.LocalAddresses([NET]), vnet=True)
    assert ring.drain(dec.process_block) == 1
    assert dec.frames == 3 and dec.totals[2:] == [2 * len(frame), 2]    # the slot: not a frame
    assert rows(dec.local)["10.0.0.1"] == (2 * len(frame), 2, 0, 0)
    assert not any(block[first:]) and lpd.U32.unpack_from(block, lpd.BLOCK_STATUS_OFF)[0] == 0


def test_replay_prints_every_address_unless_bounded(tmp_path, capsys):
    path = tmp_path / "many.pcap"
    write_pcap(path, ((0, 0, udp4(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "192.0.2.1"))
                      for i in range(20_001)))

    def replay(*extra):
        out = io.StringIO()
        assert lpd.replay(lpd.parse_args(["-r", str(path), "--local-net", "10.0.0.0/8",
                                          "--output", "json", *extra]), out) == 0
        return json.loads(out.getvalue())["addresses"]["addresses"]
    assert len(replay()) == 20_001 and capsys.readouterr().err == ""
    assert len(replay("--local-max", "100")) <= 100
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evicted by --local-max 100" in err
