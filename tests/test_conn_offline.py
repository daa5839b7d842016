"""Connection tracking (issue 12) in a replay: hand-built pcaps, scenario by scenario, and the
exact Zeek conn.log fields `--conn-log` gives for them.

Expectations follow Zeek's code as distilled in /work/notes/zeek-conn-spec.md (the § numbers
below are that file's). Where Zeek's own test suite has a baseline row (spec §7), the packet
sequence here rebuilds it and the row's figures (history, conn_state, bytes, pkts/ip_bytes)
are asserted as quoted. Every other expectation is derived from the spec's rules, the ip byte
counts from the frames built here (IP total length for IPv4, payload length + 40 for IPv6: the
Ethernet padding to 60 bytes must never count). Checksums are left zero: lpd, like `zeek -C`,
does not validate them.

Timestamps are whole microseconds after T0 and the pcaps use nanosecond resolution, so `ts` and
`duration` are exact up to float rounding (compared at 1 µs).
"""
import collections
import json
import re

import pytest

import lpd
from harness import PCAP_NS, json_values, run_cli, write_pcap
from packets import (ETH_IP, ETH_IP6, PROTO_DSTOPTS, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN,
                     TCP_PUSH, TCP_RST, TCP_SYN, ether, ipv4, ipv6, ipv6_ext, tcp, udp)

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
T0 = 1_700_000_000                  # an epoch-like base time, as a real capture has
W32 = 2 ** 32

pytestmark = pytest.mark.offline

SYN, ACK, FIN, RST, PSH = TCP_SYN, TCP_ACK, TCP_FIN, TCP_RST, TCP_PUSH
SA, PA, FA, RA = SYN | ACK, PSH | ACK, FIN | ACK, RST | ACK

MSS = b"\x02\x04\x05\xb4"                                   # 4 option bytes
OPT8 = b"\x02\x04\x05\xb4\x01\x01\x04\x02"                  # MSS, NOP, NOP, SACK-permitted
OPT12 = b"\x02\x04\x05\xb4\x01\x01\x04\x02\x01\x03\x03\x07"  # ... NOP, window scale 7
TSOPT = b"\x01\x01\x08\x0a" + bytes(8)                      # NOP, NOP, timestamps (12 bytes)

# The client and the servers most scenarios use: 80/tcp is a likely server port (§5.1),
# 5555 is not; 40000 never is.
C = ("10.0.0.1", 40000)
S = ("10.0.0.2", 80)
S_ODD = ("10.0.0.2", 5555)

DUR = ("duration", "orig_bytes", "resp_bytes")
FIELDS = ("ts", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "duration",
          "orig_bytes", "resp_bytes", "conn_state", "history", "orig_pkts", "orig_ip_bytes",
          "resp_pkts", "resp_ip_bytes")


# --- building traces ---------------------------------------------------------------------

def ip_len(frame):
    """What Zeek's ConnSize counts for a packet (§0 step 11): IPv4 total length, IPv6
    payload length + 40 — read from the frame built here, never from lpd."""
    q = 12
    while frame[q:q + 2] in (b"\x81\x00", b"\x88\xa8"):      # VLAN tags
        q += 4
    et, ip = frame[q:q + 2], q + 2
    if et == b"\x08\x00":
        return int.from_bytes(frame[ip + 2:ip + 4], "big")
    assert et == b"\x86\xdd"
    return 40 + int.from_bytes(frame[ip + 4:ip + 6], "big")


def _ip(src, dst, proto, seg, exts=()):
    if ":" in src:
        return ether(MAC_A, MAC_B, ETH_IP6, ipv6(src, dst, proto, seg, exts=exts))
    return ether(MAC_A, MAC_B, ETH_IP, ipv4(src, dst, proto, seg))


def us(t):
    """Offset in seconds -> absolute time in microseconds."""
    return T0 * 1_000_000 + round(t * 1_000_000)


class Trace:
    """The frames of a pcap, in time order, with who sent each (to compute expectations)."""

    def __init__(self):
        self.pkts = []                      # (time µs, src, dst, frame)

    def add(self, t, src, dst, frame):
        at = us(t)
        assert not self.pkts or at >= self.pkts[-1][0], "a trace is in time order"
        self.pkts.append((at, src, dst, frame))

    def tcp(self, t, src, dst, flags, seq=0, ack=0, payload=b"", window=65535, options=b""):
        seg = tcp(src[1], dst[1], flags, seq % W32, ack % W32, window, options, payload)
        self.add(t, src, dst, _ip(src[0], dst[0], PROTO_TCP, seg))

    def udp(self, t, src, dst, payload=b"", exts=()):
        self.add(t, src, dst, _ip(src[0], dst[0], PROTO_UDP, udp(src[1], dst[1], payload), exts))

    def handshake(self, t, c, s, ci, si, options=MSS):
        """SYN, SYN-ACK, ACK at t, t+10 ms, t+20 ms: 'ShA', both ESTABLISHED."""
        self.tcp(t, c, s, SYN, ci, options=options)
        self.tcp(t + 0.01, s, c, SA, si, ci + 1, options=options)
        self.tcp(t + 0.02, c, s, ACK, ci + 1, si + 1)

    def data(self, t, c, s, ci, si):
        """100 bytes c -> s at seq ci, s's ACK of them, 300 bytes back at seq si, at t,
        t+10 ms, t+20 ms: 'Dad' (the next sequence numbers: ci + 100 and si + 300)."""
        self.tcp(t, c, s, PA, ci, si, b"q" * 100)
        self.tcp(t + 0.01, s, c, ACK, si, ci + 100)
        self.tcp(t + 0.02, s, c, PA, si, ci + 100, b"r" * 300)

    def close(self, t, c, s, ci, si):
        """FIN c -> s at seq ci, s's FIN at seq si, c's last ACK, at t, t+10 ms, t+20 ms:
        'Ff', both closed at t+10 ms (where `duration` ends, §0 step 7)."""
        self.tcp(t, c, s, FA, ci, si)
        self.tcp(t + 0.01, s, c, FA, si, ci + 1)
        self.tcp(t + 0.02, c, s, ACK, ci + 1, si + 1)

    def write(self, path):              # nanosecond pcap, little-endian, Ethernet
        write_pcap(path, [(at // 1_000_000, at % 1_000_000 * 1000, frame)
                          for at, _, _, frame in self.pkts], PCAP_NS)

    def expect(self, orig, resp, history, state, bytes=None, proto=None, since=None, until=None,
               last=None):
        """The conn.log record of the connection orig -> resp made of this trace's packets
        between them in [since, until] (offsets, inclusive). `last` is the offset of the
        packet that ends `duration` (default the last packet): in TCP last_time stops once
        both sides closed (§0 step 7). `bytes` = (orig_bytes, resp_bytes), needed exactly
        when duration > 0 (otherwise Zeek leaves all three fields out, §4)."""
        sel = [p for p in self.pkts if {p[1], p[2]} == {orig, resp}
               and (since is None or p[0] >= us(since)) and (until is None or p[0] <= us(until))]
        assert sel, "no packet of that connection in the trace"
        if proto is None:
            proto = "tcp" if sel[0][3][23 if sel[0][3][12:14] == b"\x08\x00" else 20] == 6 else "udp"
        first = sel[0][0]
        end = sel[-1][0] if last is None else us(last)
        rec = {"ts": round(first / 1e6, 6), "id.orig_h": orig[0], "id.orig_p": orig[1],
               "id.resp_h": resp[0], "id.resp_p": resp[1], "proto": proto,
               "conn_state": state, "history": history,
               "orig_pkts": sum(1 for p in sel if p[1] == orig),
               "orig_ip_bytes": sum(ip_len(p[3]) for p in sel if p[1] == orig),
               "resp_pkts": sum(1 for p in sel if p[1] == resp),
               "resp_ip_bytes": sum(ip_len(p[3]) for p in sel if p[1] == resp)}
        if end > first:
            assert bytes is not None, "a connection with a duration needs its byte counts"
            rec["duration"] = round((end - first) / 1e6, 6)
            rec["orig_bytes"], rec["resp_bytes"] = bytes
        else:
            assert bytes in (None, (0, 0))
        return rec

    def expect_apart(self, orig, resp, history, state, bytes, gap, entries):
        """The records of a flow orig -> resp of one packet at 0 and one `gap` s later: one
        record with `bytes` (entries 1), or two of one packet each (entries 2: the flow
        ended between them)."""
        if entries == 1:
            return [self.expect(orig, resp, history, state, bytes)]
        return [self.expect(orig, resp, history, state, until=0),
                self.expect(orig, resp, history, state, since=gap)]


# --- running lpd -------------------------------------------------------------------------

def norm(rec):
    """A logged record reduced to the conn.log fields (plus pid/comm, which a replay must
    never have), floats at µs precision."""
    out = {k: rec[k] for k in FIELDS + ("pid", "comm") if k in rec}
    for k in ("ts", "duration"):
        if isinstance(out.get(k), float):
            out[k] = round(out[k], 6)
    return out


def order(recs):
    return sorted(recs, key=lambda r: (r["ts"], r["id.orig_h"], r["id.orig_p"], r["id.resp_p"]))


def raw_log(tmp_path, trace, *args):
    pcap, log = tmp_path / "t.pcap", tmp_path / "conn.json"
    trace.write(pcap)
    if log.exists():
        log.unlink()
    assert lpd.main(["-r", str(pcap), "--conn-log", str(log), "--output", "json", *args]) == 0
    lines = log.read_text().splitlines()
    assert all(line.strip() for line in lines), "one JSON object per line, no blank lines"
    return [json.loads(line) for line in lines]


def conns(tmp_path, trace, *args):
    """The replay's conn log, normalised and in ts order."""
    return order(norm(r) for r in raw_log(tmp_path, trace, *args))


def one(tmp_path, trace, *args):
    recs = conns(tmp_path, trace, *args)
    assert len(recs) == 1, recs
    return recs[0]


def pkts_ip_bytes(rec):
    """orig_pkts, orig_ip_bytes, resp_pkts, resp_ip_bytes: a baseline's `1/52 1/40`."""
    return rec["orig_pkts"], rec["orig_ip_bytes"], rec["resp_pkts"], rec["resp_ip_bytes"]


def closed_counts(recs):
    counts = collections.defaultdict(collections.Counter)
    for r in recs:
        counts[r["proto"]][r["conn_state"]] += 1
    return {p: dict(c) for p, c in counts.items()}


def nonzero(closed):
    return {p: {s: n for s, n in d.items() if n} for p, d in closed.items()
            if any(d.values())}


# --- TCP: the full life cycle -------------------------------------------------------------

def sf_trace(c=C, s=S, ci=1000, si=5000, t=0.0):
    """Handshake, 100 bytes orig->resp, 300 bytes back, FIN each way, last ACK 0.5 s later."""
    tr = Trace()
    tr.handshake(t, c, s, ci, si)
    tr.data(t + 0.03, c, s, ci + 1, si + 1)                      # D a d
    tr.tcp(t + 0.06, c, s, ACK, ci + 101, si + 301)
    tr.tcp(t + 0.07, c, s, FA, ci + 101, si + 301)               # F
    tr.tcp(t + 0.08, s, c, FA, si + 301, ci + 102)               # f: both closed now
    tr.tcp(t + 0.58, c, s, ACK, ci + 102, si + 302)              # after both closed: no last_time
    return tr


def test_sf_handshake_data_and_fin_both_ways(tmp_path):
    """ShADadFf SF (baseline core.tcp.reassembly-known-ports): payload bytes exact from the
    sequence numbers; ts = the SYN's time; duration ends at the second FIN, not at the
    final ACK 0.5 s later (§0 step 7: last_time stops once both sides did_close)."""
    tr = sf_trace()
    rec = one(tmp_path, tr)
    assert rec == tr.expect(C, S, "ShADadFf", "SF", (100, 300), last=0.08)
    assert rec["ts"] == round(T0, 6) and rec["duration"] == 0.08
    # 6 orig packets: SYN(44) ACK data(140) ACK FIN ACK; 4 resp: SYN-ACK(44) ACK data(340) FIN
    assert pkts_ip_bytes(rec) == (6, 44 + 40 + 140 + 40 + 40 + 40, 4, 44 + 40 + 340 + 40)


def test_retransmitted_data_adds_T_and_t_and_is_not_counted_twice(tmp_path):
    """A data segment retransmitted by each side: 'T' (orig) and 't' (resp) after the data
    letters (§3: end <= last_seq with payload), bytes from sequence numbers: 100 and 300."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, C, S, PA, 1001, 5001, b"q" * 100)      # D
    tr.tcp(0.23, C, S, PA, 1001, 5001, b"q" * 100)      # T
    tr.tcp(0.24, S, C, ACK, 5001, 1101)                 # a
    tr.tcp(0.25, S, C, PA, 5001, 1101, b"r" * 300)      # d
    tr.tcp(0.45, S, C, PA, 5001, 1101, b"r" * 300)      # t
    tr.tcp(0.46, C, S, ACK, 1101, 5301)
    tr.close(0.47, C, S, 1101, 5301)                    # F f
    assert one(tmp_path, tr) == tr.expect(C, S, "ShADTadtFf", "SF", (100, 300), last=0.48)


def test_ten_retransmissions_scale_the_T(tmp_path):
    """Scaled letters (§3): 'T' at the 1st and the 10th retransmission, not at the 2nd..9th
    nor at the 11th."""
    tr = Trace()
    tr.handshake(0, C, S_ODD, 1000, 5000)
    tr.tcp(0.03, C, S_ODD, PA, 1001, 5001, b"q" * 100)
    for i in range(11):
        tr.tcp(0.1 + i * 0.1, C, S_ODD, PA, 1001, 5001, b"q" * 100)
    tr.tcp(1.3, S_ODD, C, ACK, 5001, 1101)
    tr.tcp(1.4, C, S_ODD, FA, 1101, 5001)
    tr.tcp(1.5, S_ODD, C, FA, 5001, 1102)
    tr.tcp(1.6, C, S_ODD, ACK, 1102, 5002)
    assert one(tmp_path, tr) == tr.expect(C, S_ODD, "ShADTTaFf", "SF", (100, 0), last=1.5)


def test_overlap_out_of_order_and_keepalives(tmp_path):
    """Retransmission rules of §3, against the highest end seen: a segment overlapping old
    and new data is no retransmission (it ends beyond last_seq) and adds only its new bytes;
    a segment filling a hole after a later one was seen is 'T' (Zeek's rule, not a real
    retransmission); a 0-byte keep-alive (seq = snd.nxt - 1) adds nothing; a 1-byte
    keep-alive is a retransmission too, but the counter is then at 2 and 'T' repeats only at
    10 — so one 'T' in all. Bytes: 1001..1351, 350."""
    tr = Trace()
    tr.handshake(0, C, S_ODD, 1000, 5000)
    tr.tcp(0.03, C, S_ODD, PA, 1001, 5001, b"a" * 100)   # D, last 1101
    tr.tcp(0.04, C, S_ODD, PA, 1051, 5001, b"b" * 100)   # overlaps 50, last 1151: not T
    tr.tcp(0.05, C, S_ODD, PA, 1251, 5001, b"c" * 100)   # out of order: last 1351
    tr.tcp(0.06, C, S_ODD, PA, 1151, 5001, b"d" * 100)   # fills the hole: T (counter 1)
    tr.tcp(0.07, S_ODD, C, ACK, 5001, 1351)              # a
    tr.tcp(0.08, C, S_ODD, ACK, 1350, 5001)              # 0-byte keep-alive: nothing
    tr.tcp(0.09, C, S_ODD, PA, 1350, 5001, b"k")         # 1-byte keep-alive: counter 2
    tr.tcp(0.10, C, S_ODD, FA, 1351, 5001)               # F
    tr.tcp(0.11, S_ODD, C, FA, 5001, 1352)               # f
    assert one(tmp_path, tr) == tr.expect(C, S_ODD, "ShADTaFf", "SF", (350, 0))


def test_zero_window_adds_scaled_w(tmp_path):
    """Zero window advertised by resp in 10 ACKs: 'a' then 'w' (letter order D/A before W,
    §3), a second 'w' at the 10th; the window update and the later data add only 'd'."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, C, S, PA, 1001, 5001, b"q" * 100)
    for i in range(10):
        tr.tcp(0.04 + i * 0.01, S, C, ACK, 5001, 1101, window=0)
    tr.tcp(0.20, S, C, ACK, 5001, 1101)
    tr.tcp(0.21, S, C, PA, 5001, 1101, b"r" * 30)
    tr.tcp(0.22, C, S, FA, 1101, 5031)
    tr.tcp(0.23, S, C, FA, 5031, 1102)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShADawwdFf", "SF", (100, 30))


def test_s1_established_never_closed(tmp_path):
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.data(0.03, C, S, 1001, 5001)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShADad", "S1", (100, 300))


def test_sh_s1_baseline(tmp_path):
    """`Sh S1 1470->25 0.346950 0 0 1/48 1/48` (netcontrol.packetfilter)."""
    c, s = ("10.0.0.1", 1470), ("10.0.0.2", 25)
    tr = Trace()
    tr.tcp(0, c, s, SYN, 77, options=OPT8)
    tr.tcp(0.346950, s, c, SA, 99, 78, options=OPT8)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(c, s, "Sh", "S1", (0, 0))
    assert (rec["duration"], rec["orig_ip_bytes"], rec["resp_ip_bytes"]) == (0.34695, 48, 48)


def test_s2_orig_fin_unanswered(tmp_path):
    """orig CLOSED, resp ESTABLISHED -> S2 (resp's ACK of the FIN is its first 'a')."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, C, S, FA, 1001, 5001)
    tr.tcp(0.04, S, C, ACK, 5001, 1002)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShAFa", "S2", (0, 0))


def test_s3_resp_fin_unanswered(tmp_path):
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, C, S, PA, 1001, 5001, b"q" * 10)
    tr.tcp(0.04, S, C, ACK, 5001, 1011)
    tr.tcp(0.05, S, C, PA, 5001, 1011, b"r" * 20)
    tr.tcp(0.06, S, C, FA, 5021, 1011)
    tr.tcp(0.07, C, S, ACK, 1011, 5022)              # last_time still moves: only resp closed
    assert one(tmp_path, tr) == tr.expect(C, S, "ShADadf", "S3", (10, 20))


def test_fin_carrying_data(tmp_path):
    """FIN+ACK+data: 'F' only, no 'D' (§3), and its data counted (seg_len = len + 1)."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, C, S, FA | PSH, 1001, 5001, b"q" * 30)
    tr.tcp(0.04, S, C, FA, 5001, 1032)
    tr.tcp(0.05, C, S, ACK, 1032, 5002)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShAFf", "SF", (30, 0), last=0.04)


def test_retransmitted_fin_adds_no_letter(tmp_path):
    """A FIN repeated at the same sequence number: one 'F', no 'T' (no payload), bytes 0
    although FIN_cnt is 2."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, C, S, FA, 1001, 5001)
    tr.tcp(0.23, C, S, FA, 1001, 5001)
    tr.tcp(0.30, S, C, FA, 5001, 1002)
    tr.tcp(0.31, C, S, ACK, 1002, 5002)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShAFf", "SF", (0, 0), last=0.30)


def test_half_closed_connection_lives_until_idle(tmp_path):
    """S2 is a half close that is not complete (the peer is ESTABLISHED, §6.1): neither the
    attempt timer (only for SYN_SENT/SYN_ACK_SENT orig with INACTIVE resp, §6.2) nor the
    half-close check (needs both closed, a RESET or an INACTIVE side, §6.3) removes it, so
    resp's data 100 s later still belongs to it."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, C, S, FA, 1001, 5001)                 # F
    tr.tcp(0.04, S, C, ACK, 5001, 1002)                # a
    tr.tcp(100.0, S, C, PA, 5001, 1002, b"r" * 50)     # d
    tr.tcp(100.01, C, S, ACK, 1002, 5051)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShAFad", "S2", (0, 50))


def test_half_closed_by_resp_lives_until_idle(tmp_path):
    """The same for S3: orig's data 100 s after resp's FIN joins the connection."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, S, C, FA, 5001, 1001)                 # f
    tr.tcp(0.04, C, S, ACK, 1001, 5002)
    tr.tcp(100.0, C, S, PA, 1001, 5002, b"q" * 40)     # D
    tr.tcp(100.01, S, C, ACK, 5002, 1041)              # a
    # the handshake's ACK comes before resp's FIN: "ShAfDa"
    assert one(tmp_path, tr) == tr.expect(C, S, "ShAfDa", "S3", (40, 0))


def test_vlan_tagged_frames_count_ip_bytes_only(tmp_path):
    """A VLAN tag is link layer: ip_bytes are IP lengths, as untagged."""
    from packets import vlan_tag
    s = ("10.0.0.2", 9999)
    tr = Trace()
    for t, a, b, n in ((0, C, s, 25), (0.5, s, C, 75)):
        tr.add(t, a, b, ether(MAC_A, MAC_B, ETH_IP, ipv4(a[0], b[0], PROTO_UDP,
                                                           udp(a[1], b[1], b"v" * n)),
                              tags=[vlan_tag(100)]))
    rec = one(tmp_path, tr)
    assert rec == tr.expect(C, s, "Dd", "SF", (25, 75), proto="udp")
    assert (rec["orig_ip_bytes"], rec["resp_ip_bytes"]) == (53, 103)


# --- TCP: rejects and resets --------------------------------------------------------------

def test_rej_baseline(tmp_path):
    """`Sr REJ 26242->110 0.050692 0 0 1/52 1/40` (pop3.basic): a SYN with 12 option bytes,
    answered by RST-ACK with seq 0 (what Linux sends for a closed port; its start_seq
    wraps to 2^32-1 and its size is still 0)."""
    c, s = ("10.0.0.1", 26242), ("10.0.0.2", 110)
    tr = Trace()
    tr.tcp(0, c, s, SYN, 3_000_000_000, options=OPT12)
    tr.tcp(0.050692, s, c, RA, 0, 3_000_000_001)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(c, s, "Sr", "REJ", (0, 0))
    assert pkts_ip_bytes(rec) == (1, 52, 1, 40)


def test_rsto_after_data(tmp_path):
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, C, S, PA, 1001, 5001, b"q" * 50)
    tr.tcp(0.04, S, C, ACK, 5001, 1051)
    tr.tcp(0.05, C, S, RA, 1051, 5001)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShADaR", "RSTO", (50, 0))


def test_rsto_baseline_shr(tmp_path):
    """`ShR RSTO 60293->502 0.117322 0 0 2/80 1/44` (modbus): SYN (no options), SYN-ACK
    with MSS, orig RST."""
    c, s = ("10.0.0.1", 60293), ("10.0.0.2", 502)
    tr = Trace()
    tr.tcp(0, c, s, SYN, 7000)
    tr.tcp(0.05, s, c, SA, 9000, 7001, options=MSS)
    tr.tcp(0.117322, c, s, RST, 7001)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(c, s, "ShR", "RSTO", (0, 0))
    assert pkts_ip_bytes(rec) == (2, 80, 1, 44)


def test_rstr_after_data(tmp_path):
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.data(0.03, C, S, 1001, 5001)
    tr.tcp(0.06, S, C, RA, 5301, 1101)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShADadr", "RSTR", (100, 300))


def test_orig_fin_then_resp_rst_is_rstr(tmp_path):
    """`ShADadFr RSTR` (ssh.basic): orig CLOSED, resp RESET."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.data(0.03, C, S, 1001, 5001)
    tr.tcp(0.06, C, S, FA, 1101, 5301)
    tr.tcp(0.07, S, C, RA, 5301, 1102)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShADadFr", "RSTR", (100, 300))


def test_orig_fin_then_orig_rst_is_rsto(tmp_path):
    """`ShADadFR RSTO` (ldap.starttls): a RST after the own FIN while the peer is not
    CLOSED turns CLOSED into RESET (§1 CLOSED row)."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.data(0.03, C, S, 1001, 5001)
    tr.tcp(0.06, C, S, FA, 1101, 5301)
    tr.tcp(0.07, C, S, RST, 1102)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShADadFR", "RSTO", (100, 300))


def test_fin_rst_then_peer_fin_is_sf(tmp_path):
    """`ShADadFRf SF` (irc.starttls): orig FIN, orig RST, then resp FIN — the peer's FIN
    turns the RESET whose prev_state was CLOSED back into CLOSED (§1 ESTABLISHED row)."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.data(0.03, C, S, 1001, 5001)
    tr.tcp(0.06, C, S, FA, 1101, 5301)
    tr.tcp(0.07, C, S, RST, 1102)
    tr.tcp(0.08, S, C, FA, 5301, 1102)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShADadFRf", "SF", (100, 300))


def test_fin_and_rst_in_one_packet_is_I_and_rsto(tmp_path):
    """FIN+RST in one packet: 'I' and no F/R letter (§3, n>1); ESTABLISHED + RST -> RESET.
    orig_bytes 0: seg_len counts the FIN octet and FIN_cnt is 1 (spec §4; Zeek counts
    FIN_cnt for every FIN-flagged packet), so SYN and FIN octets are both taken off."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, C, S, FIN | RST | ACK, 1001, 5001)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShAI", "RSTO", (0, 0))


@pytest.mark.parametrize("case", ["SR", "SaR", "SaFR"])
def test_rst_behaviour_baselines(tmp_path, case):
    """conn_state-RST-behavior: `SR RSTOS0`, `SaR RSTOS0`, `SaFR OTH` (the RSTOS0 pattern
    ^?S[^HAFGIQ]*R.* allows resp letters but no orig 'F' before the R)."""
    tr = Trace()
    tr.tcp(0, C, S_ODD, SYN, 1000)
    if case == "SR":
        tr.tcp(0.5, C, S_ODD, RST, 1001)
    else:
        tr.tcp(0.1, S_ODD, C, ACK, 7777, 1001)   # an ACK before any SYN-ACK: resp stays INACTIVE
        if case == "SaFR":
            tr.tcp(0.2, C, S_ODD, FA, 1001, 7777)
            tr.tcp(0.3, C, S_ODD, RST, 1002)
        else:
            tr.tcp(0.2, C, S_ODD, RST, 1001)
    state = "OTH" if case == "SaFR" else "RSTOS0"
    assert one(tmp_path, tr) == tr.expect(C, S_ODD, case, state, (0, 0))


def test_ack_before_syn_ack_stays_s0(tmp_path):
    """`Sa S0` (§7, derived): resp's bare ACK leaves it INACTIVE."""
    tr = Trace()
    tr.tcp(0, C, S_ODD, SYN, 1000)
    tr.tcp(0.1, S_ODD, C, ACK, 7777, 1001)
    assert one(tmp_path, tr) == tr.expect(C, S_ODD, "Sa", "S0", (0, 0))


@pytest.mark.parametrize("flip", [False, True])
def test_lone_rst(tmp_path, flip):
    """`R OTH 1576->80 1/40 0/0` and, from the server port, `^r RSTRH 0/0 1/40`
    (core.tunnels.teredo); one packet: no duration, no byte fields."""
    c, s = ("10.0.0.1", 1576), ("10.0.0.2", 80)
    tr = Trace()
    if flip:
        tr.tcp(0, s, c, RA, 500, 600)
    else:
        tr.tcp(0, c, s, RA, 600, 500)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(c, s, "^r" if flip else "R", "RSTRH" if flip else "OTH")
    assert not set(DUR) & set(rec)


def test_rst_payload_is_not_counted(tmp_path):
    """A RST carrying 20 bytes: its data is never counted (§0 step 3: seg_len drops it),
    its IP bytes are. History 'R' and then 'T': update_last_seq runs before the state
    machine (§0 steps 9-10), so the sender is not RESET yet, and the segment ends at
    last_seq with payload > 0 — a "retransmission" by Zeek's rule (§3)."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, C, S, PA, 1001, 5001, b"q" * 50)
    tr.tcp(0.04, S, C, ACK, 5001, 1051)
    tr.tcp(0.05, C, S, RA, 1051, 5001, b"junk" * 5)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(C, S, "ShADaRT", "RSTO", (50, 0))
    assert rec["orig_ip_bytes"] == 44 + 40 + 90 + 60


def test_reset_connection_lingers_then_ends(tmp_path):
    """After orig's RST the close is complete: the connection is deleted 5 s after
    last_time (§6.1). resp's data 2 s later joins it ('d', counted; last_time still moves,
    only one side closed); orig's data 10 s after the RST is a new connection."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, C, S, PA, 1001, 5001, b"q" * 50)
    tr.tcp(0.04, S, C, ACK, 5001, 1051)
    tr.tcp(0.05, C, S, RA, 1051, 5001)
    tr.tcp(2.05, S, C, PA, 5001, 1051, b"r" * 20)
    tr.tcp(10.05, C, S, PA, 1051, 5021, b"q" * 5)
    assert conns(tmp_path, tr) == [
        tr.expect(C, S, "ShADaRd", "RSTO", (50, 20), until=2.05),
        tr.expect(C, S, "D", "OTH", since=10.05)]


def test_caret_h_then_orig_rst_is_rsto(tmp_path):
    """`^hR` ⇒ RSTO (§7, derived): a SYN-ACK from 80 flips at creation (resp ESTABLISHED,
    orig INACTIVE); orig's RST makes it RESET with an active resp."""
    tr = Trace()
    tr.tcp(0, S, C, SA, 5000, 1001)
    tr.tcp(0.01, C, S, RST, 1001)
    assert one(tmp_path, tr) == tr.expect(C, S, "^hR", "RSTO", (0, 0))


def test_syn_rst_in_one_packet_is_Q_oth(tmp_path):
    """SYN+RST: 'Q'; orig RESET but the RSTOS0 pattern needs an 'S' -> OTH (§7, derived)."""
    tr = Trace()
    tr.tcp(0, C, S_ODD, SYN | RST, 1000)
    assert one(tmp_path, tr) == tr.expect(C, S_ODD, "Q", "OTH")


def test_data_then_rst_is_rstrh_baseline(tmp_path):
    """`Dr RSTRH 60293->502 0.000054 109 0 1/149 1/40` (modbus): mid-stream data from a
    client port to a likely server port (no flip), answered by RST."""
    c, s = ("10.0.0.1", 60293), ("10.0.0.2", 502)
    tr = Trace()
    tr.tcp(0, c, s, PA, 50000, 90000, b"m" * 109)
    tr.tcp(0.000054, s, c, RA, 90000, 50109)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(c, s, "Dr", "RSTRH", (109, 0))
    assert (rec["orig_ip_bytes"], rec["resp_ip_bytes"], rec["duration"]) == (149, 40, 0.000054)


def test_syn_ack_then_rst_is_rej(tmp_path):
    """`Hr` ⇒ REJ (§7, derived): a SYN-ACK from a port that is not a likely server port
    opens the connection unflipped (orig SYN_ACK_SENT); the other side's RST adds 'r' and no
    '^h' flip (only A/D letters flip, §5.2)."""
    tr = Trace()
    tr.tcp(0, S_ODD, C, SA, 5000, 1001)
    tr.tcp(0.01, C, S_ODD, RST, 1001)
    assert one(tmp_path, tr) == tr.expect(S_ODD, C, "Hr", "REJ", (0, 0))


# --- TCP: half-open and half-closed -----------------------------------------------------

def test_single_syn_is_s0_without_duration(tmp_path):
    tr = Trace()
    tr.tcp(0, C, S, SYN, 1000, options=MSS)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(C, S, "S", "S0")
    assert not set(DUR) & set(rec) and rec["orig_ip_bytes"] == 44


def test_syn_retransmitted_with_the_same_isn_is_one_s0(tmp_path):
    """`S S0 2/80 0/0` (cisco-fabric-path): a SYN repeated with the same ISN within the
    attempt delay: one entry, 2 packets, one 'S' (same rel_seq, §3), bytes 0."""
    tr = Trace()
    tr.tcp(0, C, S_ODD, SYN, 1000)
    tr.tcp(1.0, C, S_ODD, SYN, 1000)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(C, S_ODD, "S", "S0", (0, 0))
    assert (rec["orig_pkts"], rec["orig_ip_bytes"], rec["duration"]) == (2, 80, 1.0)


def test_syn_and_fin_in_one_packet_is_Q_sh(tmp_path):
    """SYN+FIN: 'Q' only; SYN_SENT then CLOSED in the same packet; resp INACTIVE -> SH."""
    tr = Trace()
    tr.tcp(0, C, S_ODD, SYN | FIN, 1000)
    assert one(tmp_path, tr) == tr.expect(C, S_ODD, "Q", "SH")


def test_syn_then_fin_is_sh(tmp_path):
    tr = Trace()
    tr.tcp(0, C, S_ODD, SYN, 1000)
    tr.tcp(1.0, C, S_ODD, FIN, 1001)
    assert one(tmp_path, tr) == tr.expect(C, S_ODD, "SF", "SH", (0, 0))


def test_fin_answered_by_ack_is_sh_baseline(tmp_path):
    """`Fa SH 1577->80 0.079208 0 0 1/40 1/40` (teredo)."""
    c, s = ("10.0.0.1", 1577), ("10.0.0.2", 80)
    tr = Trace()
    tr.tcp(0, c, s, FA, 100, 200)
    tr.tcp(0.079208, s, c, ACK, 200, 101)
    assert one(tmp_path, tr) == tr.expect(c, s, "Fa", "SH", (0, 0))


def test_fin_from_server_port_is_flipped_shr_baseline(tmp_path):
    """`^fA SHR 1576->80 0.000357 0 0 1/40 1/40` (teredo): a FIN from 80 flips at creation."""
    c, s = ("10.0.0.1", 1576), ("10.0.0.2", 80)
    tr = Trace()
    tr.tcp(0, s, c, FA, 200, 100)
    tr.tcp(0.000357, c, s, ACK, 100, 201)
    assert one(tmp_path, tr) == tr.expect(c, s, "^fA", "SHR", (0, 0))


# --- TCP: orientation --------------------------------------------------------------------

def test_midstream_from_server_port_is_flipped_oth(tmp_path):
    """Joined mid-stream: the first packet is data from 80 to 40000, so 80 is resp and the
    history starts '^d' (§5.1); both sides PARTIAL -> OTH; bytes exact both ways (a partial
    endpoint starts at its first seq - 1 as if a SYN had been seen, §4)."""
    tr = Trace()
    tr.tcp(0, S, C, PA, 5000, 1000, b"r" * 200)      # ^d
    tr.tcp(0.01, C, S, ACK, 1000, 5200)             # A
    tr.tcp(0.02, C, S, PA, 1000, 5200, b"q" * 50)   # D
    tr.tcp(0.03, S, C, ACK, 5200, 1050)             # a
    assert one(tmp_path, tr) == tr.expect(C, S, "^dADa", "OTH", (50, 200))


def test_midstream_dda_baseline(tmp_path):
    """`DdA OTH 35634->80 0.061329 463 350 2/567 1/402` (opt.basic), timestamps options."""
    c, s = ("10.0.0.1", 35634), ("10.0.0.2", 80)
    tr = Trace()
    tr.tcp(0, c, s, PA, 1, 1, b"g" * 463, options=TSOPT)
    tr.tcp(0.03, s, c, PA, 1, 464, b"h" * 350, options=TSOPT)
    tr.tcp(0.061329, c, s, ACK, 464, 351, options=TSOPT)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(c, s, "DdA", "OTH", (463, 350))
    assert pkts_ip_bytes(rec) == (2, 567, 1, 402)


@pytest.mark.parametrize("sport,dport,flip", [
    (80, 40000, True), (443, 40000, True), (22, 51000, True), (3306, 40000, True),
    (8888, 40000, True), (20000, 40000, True), (1883, 40000, True),
    (110, 40000, False),        # POP3 is not in the default list (§5.1)
    (8443, 40000, False), (40000, 80, False), (3000, 40000, False),
    (80, 8080, True),           # both likely: flip only if src < dst (not a SYN-ACK)
    (8080, 80, False),
])
def test_tcp_data_first_packet_orientation(tmp_path, sport, dport, flip):
    a, b = ("10.0.0.1", sport), ("10.0.0.2", dport)
    tr = Trace()
    tr.tcp(0, a, b, PA, 100, 200, b"x" * 10)
    want = tr.expect(b, a, "^d", "OTH") if flip else tr.expect(a, b, "D", "OTH")
    assert one(tmp_path, tr) == want


@pytest.mark.parametrize("flags,sport,dport,flip", [
    (SYN, 80, 40000, False),    # a pure SYN never flips
    (SA, 443, 40000, True),
    (SA, 80, 8080, False),      # both likely and a SYN-ACK: no flip
    (SA, 8080, 80, False),
    (SA, 5555, 40000, False),
])
def test_tcp_syn_first_packet_orientation(tmp_path, flags, sport, dport, flip):
    """One SYN or SYN-ACK: 'S' S0, 'H' OTH (orig SYN_ACK_SENT, resp INACTIVE is OTH, not
    S0, §2) or, flipped, '^h' OTH."""
    a, b = ("10.0.0.1", sport), ("10.0.0.2", dport)
    tr = Trace()
    tr.tcp(0, a, b, flags, 100, 0 if flags == SYN else 201, options=OPT8)
    if flags == SYN:
        want = tr.expect(a, b, "S", "S0")
    else:
        want = tr.expect(b, a, "^h", "OTH") if flip else tr.expect(a, b, "H", "OTH")
    assert one(tmp_path, tr) == want


@pytest.mark.parametrize("server,client", [(("10.0.0.2", 80), ("10.0.0.1", 6669)),
                                           (("10.0.0.2", 5555), ("10.0.0.1", 40000))])
def test_syn_ack_first_flips_to_caret_h_on_the_first_ack(tmp_path, server, client):
    """`^hADadFf SF` (core.tcp.flip-without-syn, 6669->80: both likely ports and a SYN-ACK,
    so no flip at creation): the SYN was missed; the connection opens with 'H' from the
    server, and the client's ACK rewrites the history to '^h' and flips (§5.2). The client
    ends orig PARTIAL, the server resp SYN_ACK_SENT; both FINs -> SF. Packet counts follow
    the flip (the SYN-ACK is the server's, i.e. resp's)."""
    tr = Trace()
    tr.tcp(0, server, client, SA, 5000, 1001, options=MSS)    # H
    tr.tcp(0.01, client, server, ACK, 1001, 5001)            # ^h + A
    tr.data(0.02, client, server, 1001, 5001)                # D a d
    tr.close(0.05, client, server, 1101, 5301)               # F f
    assert one(tmp_path, tr) == tr.expect(client, server, "^hADadFf", "SF", (100, 300),
                                          last=0.06)


def test_syn_syn_ack_reversal(tmp_path):
    """`Hs^ADadFf` (core.connection_flipped, there with -b; here 5555 is no likely server
    port, so the SYN-ACK opens unflipped): the SYN arrives after its SYN-ACK; its sender,
    resp until now, becomes orig: 's' is recorded first, then '^' (§1 row 2, §3 letter
    order). The SYN's seq is resp's start (ack - 1 of the SYN-ACK): no reuse (§6.5)."""
    tr = Trace()
    tr.tcp(0, S_ODD, C, SA, 5000, 1001, options=MSS)        # H
    tr.tcp(0.01, C, S_ODD, SYN, 1000, options=MSS)          # s^
    tr.tcp(0.02, C, S_ODD, ACK, 1001, 5001)                 # A
    tr.data(0.03, C, S_ODD, 1001, 5001)                     # D a d
    tr.close(0.06, C, S_ODD, 1101, 5301)                    # F f
    assert one(tmp_path, tr) == tr.expect(C, S_ODD, "Hs^ADadFf", "SF", (100, 300), last=0.07)


def test_one_sided_server_traffic_after_a_syn_ack(tmp_path):
    """`^hadf SHR` (ssh.half-duplex-server): only the server's side is captured. Its own
    ACK after the SYN-ACK flips (history "H" -> "^h", §5.2) and is recorded as resp's 'a';
    it stays SYN_ACK_SENT, orig INACTIVE; its FIN closes it -> SHR. 300 bytes from its
    sequence numbers."""
    tr = Trace()
    tr.tcp(0, S_ODD, C, SA, 5000, 1001)
    tr.tcp(0.01, S_ODD, C, ACK, 5001, 1001)
    tr.tcp(0.02, S_ODD, C, PA, 5001, 1001, b"r" * 300)
    tr.tcp(0.03, S_ODD, C, FA, 5301, 1001)
    assert one(tmp_path, tr) == tr.expect(C, S_ODD, "^hadf", "SHR", (0, 300))


# --- TCP: timers --------------------------------------------------------------------------

@pytest.mark.parametrize("gap,isn2,entries", [
    (1.0, 1000, 1),     # a retransmission: same connection
    (6.0, 1000, 2),     # the attempt timer removed the first 5 s after its SYN (§6.2)
    (1.0, 2000, 2),     # a new ISN is a new connection at once (reuse check, §6.5)
    (6.0, 2000, 2),
])
def test_attempt_timer_and_syn_reuse(tmp_path, gap, isn2, entries):
    tr = Trace()
    tr.tcp(0, C, S, SYN, 1000)
    tr.tcp(gap, C, S, SYN, isn2)
    assert conns(tmp_path, tr) == tr.expect_apart(C, S, "S", "S0", (0, 0), gap, entries)


def test_syn_after_rej_starts_a_new_connection(tmp_path):
    """A SYN retransmitted after the RST: the old connection did_close, so the SYN is a new
    connection even within the close delay (§6.5)."""
    tr = Trace()
    tr.tcp(0, C, S_ODD, SYN, 1000)
    tr.tcp(0.01, S_ODD, C, RA, 0, 1001)
    tr.tcp(1.0, C, S_ODD, SYN, 1000)
    assert conns(tmp_path, tr) == [tr.expect(C, S_ODD, "Sr", "REJ", (0, 0), until=0.01),
                                   tr.expect(C, S_ODD, "S", "S0", since=1.0)]


@pytest.mark.parametrize("closed", [False, True])
def test_port_reuse_with_a_new_isn_starts_a_new_connection(tmp_path, closed):
    """A client reusing its port: a pure SYN with another ISN on an established 5-tuple,
    or on one closed by FINs less than 5 s ago (TIME_WAIT reuse), ends the old entry and
    opens a new one at once (§6.5)."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    if closed:
        tr.close(0.03, C, S, 1001, 5001)
        first = tr.expect(C, S, "ShAFf", "SF", (0, 0), until=0.05, last=0.04)
    else:
        first = tr.expect(C, S, "ShA", "S1", (0, 0), until=0.02)
    tr.tcp(1.0, C, S, SYN, 900000)
    assert conns(tmp_path, tr) == [first, tr.expect(C, S, "S", "S0", since=1.0)]


def test_half_duplex_client_attempt_timer_then_partial(tmp_path):
    """`SAD S0` then `DAF SH` for the same 5-tuple (ssh.half-duplex-client): only the client's
    side is captured; the attempt timer removes the connection 5 s after the SYN (orig still
    SYN_SENT, resp INACTIVE), and the data after that is a new, partial connection. resp's
    bytes stay 0: an INACTIVE endpoint is re-initialised by every ACK (§4)."""
    c, s = ("10.0.0.1", 51880), ("10.0.0.2", 22)
    tr = Trace()
    tr.tcp(0, c, s, SYN, 1000)
    tr.tcp(0.2, c, s, ACK, 1001, 9001)
    tr.tcp(0.4, c, s, PA, 1001, 9001, b"a" * 100)
    tr.tcp(1.0, c, s, PA, 1101, 9001, b"b" * 200)
    tr.tcp(6.0, c, s, PA, 1301, 9001, b"c" * 50)
    tr.tcp(6.5, c, s, ACK, 1351, 9050)
    tr.tcp(7.0, c, s, FA, 1351, 9050)
    assert conns(tmp_path, tr) == [tr.expect(c, s, "SAD", "S0", (300, 0), until=1.0),
                                   tr.expect(c, s, "DAF", "SH", (50, 0), since=6.0)]


def test_close_delay_late_rst_joins_later_packet_is_new(tmp_path):
    """`ShADadfFr SF` (xmpp.starttls): after both FINs the connection lives on for
    tcp_close_delay (5 s after last_time, §6.1): a RST 2 s later joins it (letter 'r', one
    more resp packet, no state change, no duration change: both sides closed), an ACK 10 s
    later is a new connection ('A', OTH)."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.data(0.03, C, S, 1001, 5001)
    tr.tcp(0.06, S, C, FA, 5301, 1101)             # f
    tr.tcp(0.07, C, S, FA, 1101, 5302)             # F: both closed, last_time 0.07
    tr.tcp(0.08, S, C, ACK, 5302, 1102)
    tr.tcp(2.07, S, C, RST, 5302)                  # joins: r
    tr.tcp(12.07, C, S, ACK, 1102, 5302)           # 12 s after: a new connection
    assert conns(tmp_path, tr) == [
        tr.expect(C, S, "ShADadfFr", "SF", (100, 300), until=2.07, last=0.07),
        tr.expect(C, S, "A", "OTH", since=12.07)]


@pytest.mark.parametrize("gap,args,entries", [
    (200, (), 1), (301, (), 2),
    (101, ("--conn-timeout-tcp", "100"), 2), (99, ("--conn-timeout-tcp", "100"), 1),
])
def test_tcp_idle_timeout_on_the_pcap_clock(tmp_path, gap, args, entries):
    """An established connection idle for longer than --conn-timeout-tcp (300 s default)
    ends (S1); the data after it is a new, mid-stream connection ('D' OTH)."""
    tr = Trace()
    tr.handshake(0, C, S_ODD, 1000, 5000)
    tr.tcp(0.02 + gap, C, S_ODD, PA, 1001, 5001, b"q" * 100)
    if entries == 1:
        want = [tr.expect(C, S_ODD, "ShAD", "S1", (100, 0))]
    else:
        want = [tr.expect(C, S_ODD, "ShA", "S1", (0, 0), until=0.02),
                tr.expect(C, S_ODD, "D", "OTH", since=0.02 + gap)]
    assert conns(tmp_path, tr, *args) == want


@pytest.mark.parametrize("gap,entries", [(299, 1), (301, 2)])
def test_tcp_idle_timeout_without_any_handshake(tmp_path, gap, entries):
    """The same for a connection joined mid-stream that never armed a Zeek timer (no SYN,
    FIN or RST): idle for longer than 300 s, it ends all the same (§6.4)."""
    tr = Trace()
    tr.tcp(0, C, S_ODD, PA, 1000, 7000, b"q" * 10)
    tr.tcp(gap, C, S_ODD, PA, 1010, 7000, b"q" * 10)
    assert conns(tmp_path, tr) == tr.expect_apart(C, S_ODD, "D", "OTH", (20, 0), gap, entries)


def test_udp_idle_timeout_after_other_traffic_ended(tmp_path):
    """A TCP connection comes and goes first (its timers fire and leave none armed), then
    a UDP flow with a 61 s gap: two UDP entries."""
    s = ("10.0.0.2", 9999)
    tr = Trace()
    tr.tcp(0, C, S, SYN, 1000)                  # S0, gone at 5 s by the attempt timer
    tr.udp(10, C, s, b"x" * 10)
    tr.udp(71, C, s, b"x" * 10)
    assert conns(tmp_path, tr) == [tr.expect(C, S, "S", "S0"),
                                   tr.expect(C, s, "D", "S0", until=10),
                                   tr.expect(C, s, "D", "S0", since=71)]


# --- TCP: sequence space ---------------------------------------------------------------

def test_sequence_numbers_wrapping_past_2_32(tmp_path):
    """Both ISNs just below 2^32: the transfers cross the wrap (and one segment crossing it
    is retransmitted: 'T', still counted once). Bytes exact."""
    ci, si = W32 - 30, W32 - 20
    tr = Trace()
    tr.handshake(0, C, S, ci, si)
    tr.tcp(0.03, C, S, PA, ci + 1, si + 1, b"a" * 100)      # crosses 2^32
    tr.tcp(0.04, C, S, PA, ci + 101, si + 1, b"b" * 100)
    tr.tcp(0.05, C, S, PA, ci + 201, si + 1, b"c" * 100)
    tr.tcp(0.055, C, S, PA, ci + 1, si + 1, b"a" * 100)     # T
    tr.tcp(0.06, S, C, ACK, si + 1, ci + 301)
    tr.tcp(0.07, S, C, PA, si + 1, ci + 301, b"d" * 50)     # crosses 2^32
    tr.tcp(0.08, C, S, ACK, ci + 301, si + 51)
    tr.close(0.09, C, S, ci + 301, si + 51)
    assert one(tmp_path, tr) == tr.expect(C, S, "ShADTadFf", "SF", (300, 50), last=0.10)


def test_byte_counts_are_64_bit(tmp_path):
    """Sizes come from sequence numbers, so bytes that were never captured but were ACKed
    count (§4, baseline core.tcp.miss-end-data) and the counts are 64-bit (5416666670 in
    core.tcp.large-file-reassembly). Mid-stream (both PARTIAL, so no 'G' letters, §3):
    six 1000-byte segments 2^30 apart, each ACKed: 5*2^30 + 1000 bytes, the sequence space
    wrapping once."""
    tr = Trace()
    for k in range(6):
        seq = 1000 + k * 2 ** 30
        tr.tcp(k * 0.1, C, S_ODD, PA, seq, 7000, b"z" * 1000)
        tr.tcp(k * 0.1 + 0.05, S_ODD, C, ACK, 7000, seq + 1000)
    assert one(tmp_path, tr) == tr.expect(C, S_ODD, "Da", "OTH", (5 * 2 ** 30 + 1000, 0))


# --- UDP ---------------------------------------------------------------------------------

def test_udp_request_response_baseline(tmp_path):
    """`Dd SF 43927->53 0.000435 38 89 1/66 1/117` (rxmit-history conn-2.log)."""
    c, s = ("10.0.0.1", 43927), ("10.0.0.2", 53)
    tr = Trace()
    tr.udp(0, c, s, b"q" * 38)
    tr.udp(0.000435, s, c, b"r" * 89)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(c, s, "Dd", "SF", (38, 89))
    assert (rec["orig_ip_bytes"], rec["resp_ip_bytes"], rec["duration"]) == (66, 117, 0.000435)


def test_udp_several_each_way(tmp_path):
    """'D' and 'd' once each however many packets; bytes are the payload sums."""
    tr = Trace()
    for i in range(3):
        tr.udp(i, C, ("10.0.0.2", 9999), b"q" * (10 + i))
        if i < 2:
            tr.udp(i + 0.5, ("10.0.0.2", 9999), C, b"r" * 100)
    assert one(tmp_path, tr) == tr.expect(C, ("10.0.0.2", 9999), "Dd", "SF", (33, 200))


def test_udp_one_way_empty_payload_baseline(tmp_path):
    """`D S0 57005->48879 0.000926 0 0 2/56 0/0` (cisco-fabric-path): an empty payload is
    still 'D'."""
    c, s = ("10.0.0.1", 57005), ("10.0.0.2", 48879)
    tr = Trace()
    tr.udp(0, c, s)
    tr.udp(0.000926, c, s)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(c, s, "D", "S0", (0, 0))
    assert (rec["orig_pkts"], rec["orig_ip_bytes"]) == (2, 56)


def test_udp_single_packet_both_ports_likely_baseline(tmp_path):
    """`D S0 5353->5353 - - - 1/73 0/0`: both ports likely, no flip (UDP has no tie-break)."""
    a, b = ("10.0.0.1", 5353), ("224.0.0.251", 5353)
    tr = Trace()
    tr.udp(0, a, b, b"m" * 45)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(a, b, "D", "S0")
    assert rec["orig_ip_bytes"] == 73 and not set(DUR) & set(rec)


def test_udp_from_server_port_is_flipped_shr_baseline(tmp_path):
    """`^d SHR 53796->5072 - - - 0/0 1/176` (tunnels.ayiya)."""
    c, s = ("10.0.0.1", 53796), ("10.0.0.2", 5072)
    tr = Trace()
    tr.udp(0, s, c, b"y" * 148)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(c, s, "^d", "SHR")
    assert (rec["resp_pkts"], rec["resp_ip_bytes"]) == (1, 176)


def test_udp_flipped_then_answered_is_sf(tmp_path):
    c, s = ("10.0.0.1", 40000), ("10.0.0.2", 53)
    tr = Trace()
    tr.udp(0, s, c, b"r" * 60)
    tr.udp(0.2, c, s, b"q" * 30)
    assert one(tmp_path, tr) == tr.expect(c, s, "^dD", "SF", (30, 60))


@pytest.mark.parametrize("sport,dport,dst,flip", [
    (53, 40000, "10.0.0.2", True), (123, 40000, "10.0.0.2", True),
    (67, 68, "10.0.0.2", True),        # 68/udp is not a likely server port
    (68, 67, "10.0.0.2", False),
    (53, 5353, "10.0.0.2", False),     # both likely: UDP never flips
    (853, 40000, "10.0.0.2", False),   # DoQ is not in the list
    (40000, 53, "10.0.0.2", False),
    # Zeek never flips towards 255.255.255.255 (§5.1; read as the packet's destination,
    # which is the would-be responder before the flip).
    (67, 68, "255.255.255.255", False),
])
def test_udp_first_packet_orientation(tmp_path, sport, dport, dst, flip):
    a, b = ("10.0.0.1", sport), (dst, dport)
    tr = Trace()
    tr.udp(0, a, b, b"u" * 20)
    want = tr.expect(b, a, "^d", "SHR") if flip else tr.expect(a, b, "D", "S0")
    assert one(tmp_path, tr) == want


@pytest.mark.parametrize("gap,args,entries", [
    (61, (), 2), (59, (), 1),
    (11, ("--conn-timeout-udp", "10"), 2), (9, ("--conn-timeout-udp", "10"), 1),
])
def test_udp_idle_timeout_on_the_pcap_clock(tmp_path, gap, args, entries):
    s = ("10.0.0.2", 9999)
    tr = Trace()
    tr.udp(0, C, s, b"x" * 10)
    tr.udp(gap, C, s, b"x" * 10)
    assert conns(tmp_path, tr, *args) == tr.expect_apart(C, s, "D", "S0", (20, 0), gap, entries)


def test_same_timestamp_leaves_duration_and_bytes_out(tmp_path):
    """duration 0 (all packets at one ts): duration, orig_bytes, resp_bytes are not logged
    (§4), though bytes were exchanged."""
    s = ("10.0.0.2", 9999)
    tr = Trace()
    tr.udp(5.0, C, s, b"q" * 40)
    tr.udp(5.0, s, C, b"r" * 70)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(C, s, "Dd", "SF")
    assert not set(DUR) & set(rec)


# --- IPv6 --------------------------------------------------------------------------------

def test_ipv6_tcp_sf(tmp_path):
    c, s = ("2001:db8::1", 40000), ("2001:db8::2", 443)
    tr = sf_trace(c, s)
    rec = one(tmp_path, tr)
    assert rec == tr.expect(c, s, "ShADadFf", "SF", (100, 300), last=0.08)
    assert rec["orig_ip_bytes"] == 64 + 60 + 160 + 60 + 60 + 60       # 40 + TCP per packet


def test_ipv6_udp_with_an_extension_header(tmp_path):
    """ip_bytes = payload length + 40, the destination-options header included; the UDP
    byte count is the UDP length - 8."""
    c, s = ("fd00::1", 5000), ("fd00::2", 53)
    tr = Trace()
    tr.udp(0, c, s, b"q" * 30)
    tr.udp(0.01, s, c, b"r" * 90, exts=(ipv6_ext(PROTO_DSTOPTS),))
    rec = one(tmp_path, tr)
    assert rec == tr.expect(c, s, "Dd", "SF", (30, 90), proto="udp")
    assert (rec["orig_ip_bytes"], rec["resp_ip_bytes"]) == (78, 40 + 8 + 98)


def test_fragmented_udp_datagram_counts_once_reassembled(tmp_path):
    """Beyond the spec, from Zeek's code (src/Frag.cc, on by default): IPv4 fragments are
    reassembled before the transport analyzers see them, so a datagram sent in two
    fragments is one packet whose IP length is the reassembled one (20 + 8 + 1000)."""
    s = ("10.0.0.2", 53)
    data = udp(C[1], s[1], b"f" * 1000)
    tr = Trace()
    tr.add(0, C, s, ether(MAC_A, MAC_B, ETH_IP, ipv4(C[0], s[0], PROTO_UDP, data[:504],
                                                      ident=7, mf=True)))
    tr.add(0, C, s, ether(MAC_A, MAC_B, ETH_IP, ipv4(C[0], s[0], PROTO_UDP, data[504:],
                                                      ident=7, frag_offset=63)))
    tr.udp(0.5, s, C, b"r" * 40)
    rec = one(tmp_path, tr)
    assert rec == {**tr.expect(C, s, "Dd", "SF", (1000, 40), proto="udp"),
                   "orig_pkts": 1, "orig_ip_bytes": 1028}


# --- the log itself, the CLI and the JSON document ------------------------------------------

def test_exact_fields_and_types(tmp_path):
    """Zeek's names and nothing else in a replay (no pid/comm: no process is known); the
    three duration fields only when duration > 0; a uid per connection in Zeek's form."""
    tr = sf_trace()
    tr.tcp(1.0, ("10.0.0.3", 41000), S, SYN, 1)
    recs = order(raw_log(tmp_path, tr))
    assert [set(r) for r in recs] == [set(FIELDS) | {"uid"}, (set(FIELDS) | {"uid"}) - set(DUR)]
    assert all(re.fullmatch("C[0-9A-Za-z]{10,17}", r["uid"]) for r in recs)
    assert len({r["uid"] for r in recs}) == len(recs)
    for r in recs:
        assert isinstance(r["ts"], float) and r["proto"] == "tcp"
        for k in ("id.orig_p", "id.resp_p", "orig_pkts", "orig_ip_bytes", "resp_pkts",
                  "resp_ip_bytes") + (("orig_bytes", "resp_bytes") if "duration" in r else ()):
            assert type(r[k]) is int, k
        assert isinstance(r["id.orig_h"], str) and isinstance(r["history"], str)
    assert isinstance(recs[0]["duration"], float)


def test_connections_flag_with_conn_log(tmp_path):
    tr = sf_trace()
    assert conns(tmp_path, tr, "--connections") == \
        [tr.expect(C, S, "ShADadFf", "SF", (100, 300), last=0.08)]


def mixed_trace():
    tr = sf_trace()                                                  # tcp SF
    tr.tcp(1.0, ("10.0.0.3", 41000), S, SYN, 1)                      # tcp REJ
    tr.tcp(1.01, S, ("10.0.0.3", 41000), RA, 0, 2)
    tr.tcp(1.5, ("10.0.0.4", 41001), S, SYN, 1)                      # tcp S0
    tr.udp(2.0, ("10.0.0.5", 43927), ("10.0.0.2", 53), b"q" * 38)    # udp SF
    tr.udp(2.1, ("10.0.0.2", 53), ("10.0.0.5", 43927), b"r" * 89)
    tr.udp(3.0, ("10.0.0.6", 50000), ("10.0.0.2", 9999), b"x")       # udp S0
    tr.udp(3.1, ("10.0.0.7", 50000), ("10.0.0.2", 9999), b"x")       # udp S0
    return tr


def mixed_expect(tr):
    return order([
        tr.expect(C, S, "ShADadFf", "SF", (100, 300), last=0.08),
        tr.expect(("10.0.0.3", 41000), S, "Sr", "REJ", (0, 0)),
        tr.expect(("10.0.0.4", 41001), S, "S", "S0"),
        tr.expect(("10.0.0.5", 43927), ("10.0.0.2", 53), "Dd", "SF", (38, 89)),
        tr.expect(("10.0.0.6", 50000), ("10.0.0.2", 9999), "D", "S0"),
        tr.expect(("10.0.0.7", 50000), ("10.0.0.2", 9999), "D", "S0"),
    ])


def test_cli_conn_log_to_stdout(tmp_path):
    """`--conn-log -`: the log lines on stdout (whatever else the replay prints there)."""
    tr = mixed_trace()
    rc, out, err = run_cli(tmp_path, tr, "--conn-log", "-", "--output", "json")
    assert rc == 0, err
    values = json_values(out)
    recs = [v for v in values if isinstance(v, dict) and "conn_state" in v]
    assert order(norm(r) for r in recs) == mixed_expect(tr)
    lines = [line for line in out.splitlines() if line.startswith("{") and line.endswith("}")]
    assert order(norm(json.loads(line)) for line in lines) == mixed_expect(tr)  # one per line


def test_json_document_closed_counts_agree_with_the_log(tmp_path):
    tr = mixed_trace()
    log = tmp_path / "conn.json"
    rc, out, err = run_cli(tmp_path, tr, "--conn-log", str(log), "--output", "json")
    assert rc == 0, err
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert order(norm(r) for r in recs) == mixed_expect(tr)
    doc = json.loads(out)
    assert nonzero(doc["connections"]["closed"]) == closed_counts(recs) == \
        {"tcp": {"SF": 1, "REJ": 1, "S0": 1}, "udp": {"SF": 1, "S0": 2}}


def test_eviction_takes_half_open_connections_first(tmp_path):
    """--conn-max 2: an established connection and three SYN-only ones arriving one after
    another. Each SYN beyond the bound pushes out a half-open one, never the established
    connection: it is logged once with all its packets; every SYN is logged once (S0) and
    two evictions are counted."""
    tr = Trace()
    tr.handshake(0, C, S, 1000, 5000)
    tr.tcp(0.03, C, S, PA, 1001, 5001, b"q" * 100)
    syns = [("10.0.0.3", 50001 + i) for i in range(3)]
    for i, a in enumerate(syns):
        tr.tcp(1 + i, a, S, SYN, 77 + i)
    tr.tcp(4.0, S, C, ACK, 5001, 1101)
    tr.tcp(4.1, C, S, FA, 1101, 5001)
    tr.tcp(4.2, S, C, FA, 5001, 1102)
    tr.tcp(4.3, C, S, ACK, 1102, 5002)
    log = tmp_path / "conn.json"
    rc, out, err = run_cli(tmp_path, tr, "--conn-max", "2", "--conn-log", str(log),
                           "--output", "json")
    assert rc == 0, err
    recs = order(norm(json.loads(line)) for line in log.read_text().splitlines())
    assert recs == order([tr.expect(C, S, "ShADaFf", "SF", (100, 0), last=4.2)]
                         + [tr.expect(a, S, "S", "S0") for a in syns])
    doc = json.loads(out)["connections"]
    assert sum(doc["evictions"].values()) == 2
    assert nonzero(doc["closed"]) == {"tcp": {"SF": 1, "S0": 3}}


def test_eviction_without_half_open_takes_the_least_recently_active(tmp_path):
    """--conn-max 2 and three answered UDP flows: the third pushes out the flow idle the
    longest (lpd's documented "oldest" choice when no unanswered connection is left),
    logged like any other; the other two are logged whole at the end."""
    s = ("10.0.0.2", 9999)
    u1, u2, u3 = (("10.0.0.5", 50001 + i) for i in range(3))
    tr = Trace()
    tr.udp(0, u1, s, b"x" * 10)
    tr.udp(0.1, s, u1, b"y" * 10)
    tr.udp(1, u2, s, b"x" * 10)
    tr.udp(1.1, s, u2, b"y" * 10)
    tr.udp(2, u1, s, b"x" * 10)
    tr.udp(3, u3, s, b"x" * 10)
    tr.udp(3.1, s, u3, b"y" * 10)
    log = tmp_path / "conn.json"
    rc, out, err = run_cli(tmp_path, tr, "--conn-max", "2", "--conn-log", str(log),
                           "--output", "json")
    assert rc == 0, err
    lines = log.read_text().splitlines()
    assert norm(json.loads(lines[0])) == tr.expect(u2, s, "Dd", "SF", (10, 10))   # finished first
    assert order(norm(json.loads(line)) for line in lines) == order([
        tr.expect(u1, s, "Dd", "SF", (20, 10)), tr.expect(u2, s, "Dd", "SF", (10, 10)),
        tr.expect(u3, s, "Dd", "SF", (10, 10))])
    assert json.loads(out)["connections"]["evictions"] == {"half_open": 0, "oldest": 1}


def test_eviction_takes_unanswered_flows_before_answered_ones(tmp_path):
    """Backscatter or one-way datagrams are evicted before an answered flow, however idle:
    the least recently active unanswered one first."""
    s = ("10.0.0.2", 9999)
    u1, u2, u3 = (("10.0.0.5", 50001 + i) for i in range(3))
    tr = Trace()
    tr.udp(0, u1, s, b"x" * 10)
    tr.udp(0.1, s, u1, b"y" * 10)                    # answered, then idle
    tr.udp(1, u2, s, b"x" * 10)                      # never answered
    tr.udp(3, u3, s, b"x" * 10)
    log = tmp_path / "conn.json"
    rc, out, err = run_cli(tmp_path, tr, "--conn-max", "2", "--conn-log", str(log),
                           "--output", "json")
    assert rc == 0, err
    first = norm(json.loads(log.read_text().splitlines()[0]))
    assert first == tr.expect(u2, s, "D", "S0")
    assert json.loads(out)["connections"]["evictions"] == {"half_open": 1, "oldest": 0}
