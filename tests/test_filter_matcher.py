"""lpd's BPF interpreter and generated matchers against libpcap's C bpf_filter.

Every program here is libpcap's own compilation of an expression from
filter_expressions.txt (or a hand-written / random program), so these tests pin
down the evaluators independently of lpd's compiler: bpf_interpret and
make_matcher must return exactly what libpcap returns, on every corpus frame and
on generated ones; make_rules_counter must equal the programs run one by one.
"""
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libpcap_oracle as oracle
import lpd
import packets

pytestmark = pytest.mark.offline

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "shared", "corpus", "pcaps")
SKF_AD_OFF = 0xFFFFF000
PACKET_HOST, PACKET_BROADCAST, PACKET_OUTGOING = 0, 1, 4


def _expressions():
    with open(os.path.join(HERE, "filter_expressions.txt")) as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def _compiled():
    """(expression, oracle.Program) for every expression libpcap accepts."""
    out = []
    for expr in _expressions():
        try:
            out.append((expr, oracle.Program(expr)))
        except oracle.OracleError:
            pass
    return out


def _has_ancillary(insns):
    return any(code & 0xE0 == 0x20 and code & 0x07 == 0 and k >= SKF_AD_OFF
               for code, _, _, k in insns)


def _corpus():
    frames = []
    for name in sorted(os.listdir(CORPUS)):
        if name.endswith(".pcap"):
            frames += [(data, wirelen) for _, wirelen, data in
                       lpd.read_pcap(os.path.join(CORPUS, name))]
    return frames


COMPILED = _compiled()
# libpcap's userspace bpf_filter has no socket metadata and rejects ancillary
# loads, so programs using them (inbound/outbound) are checked against the
# kernel's semantics below instead of against libpcap.
PLAIN = [(e, p) for e, p in COMPILED if not _has_ancillary(p.insns)]
ANCILLARY = [(e, p) for e, p in COMPILED if _has_ancillary(p.insns)]
MATCHERS = {e: lpd.make_matcher(p.insns) for e, p in COMPILED}
CORPUS_FRAMES = _corpus()


def test_inputs_are_substantial():
    assert len(_expressions()) >= 330
    assert len(COMPILED) >= 300 and len(CORPUS_FRAMES) > 1000
    assert any(lpd._has_backward_jump(p.insns) for _, p in COMPILED)   # protochain


def test_libpcap_protochain_loop_is_detected_and_rejected():
    # an AH at offset 40 whose length field (8) makes libpcap set X = (8 + 2) * 4 = 40
    ah = packets.ipv6_ext(packets.PROTO_AH, bytes(36))
    assert len(ah[1]) + 1 == 40 and ah[1][0] == 8
    frame = packets.ether("ff:ff:ff:ff:ff:ff", "00:60:08:9f:b1:f3", packets.ETH_IP6,
                          packets.ipv6("fe80::1", "ff02::1", packets.PROTO_TCP, exts=(ah, ah)))
    prog = oracle.compile("ip6 protochain 6")
    assert _libpcap_loops(prog, frame, len(frame))
    assert not _libpcap_loops(prog, frame[:40], 40)
    assert lpd.bpf_interpret(prog, frame, len(frame)) == 0
    assert lpd.make_matcher(prog)(frame, len(frame)) == 0
    assert ANCILLARY


class _LoopDetector:
    """Stands in for lpd._MAX_BACKWARD_JUMPS during one bpf_interpret run.

    libpcap 1.10 compiles 'protochain' to a loop, and its AH step sets X to the
    header length instead of adding it, so some IPv6 chains make libpcap's C
    interpreter loop forever. A run that terminates visits each offset once, so
    more backward jumps than the frame has bytes means libpcap would hang there.
    bpf_interpret compares `back > _MAX_BACKWARD_JUMPS`; Python reflects that to
    __lt__ here.
    """

    def __init__(self, limit):
        self.limit, self.hit = limit, False

    def __lt__(self, back):
        self.hit = self.hit or back > self.limit
        return self.hit


def _libpcap_loops(insns, data, wirelen):
    if not lpd._has_backward_jump(insns):
        return False
    saved, lpd._MAX_BACKWARD_JUMPS = lpd._MAX_BACKWARD_JUMPS, _LoopDetector(len(data) + 2)
    try:
        detector = lpd._MAX_BACKWARD_JUMPS
        lpd.bpf_interpret(insns, data, wirelen)
        return detector.hit
    finally:
        lpd._MAX_BACKWARD_JUMPS = saved


def _libpcap_filter(prog, data, wirelen):
    """libpcap's verdict; where libpcap would never return, lpd's: reject."""
    if _libpcap_loops(prog.insns, data, wirelen):
        return 0
    return prog.filter(data, wirelen)


def _check_frame(expr, prog, data, wirelen):
    want = _libpcap_filter(prog, data, wirelen)
    got_i = lpd.bpf_interpret(prog.insns, data, wirelen)
    got_m = MATCHERS[expr](data, wirelen)
    assert (got_i, got_m) == (want, want), (expr, data.hex(), wirelen)


@pytest.mark.parametrize("expr,prog", PLAIN, ids=[e for e, _ in PLAIN])
def test_corpus_frames_match_libpcap(expr, prog):
    matcher, insns = MATCHERS[expr], prog.insns
    for data, wirelen in CORPUS_FRAMES:
        want = _libpcap_filter(prog, data, wirelen)
        if lpd.bpf_interpret(insns, data, wirelen) != want or matcher(data, wirelen) != want:
            _check_frame(expr, prog, data, wirelen)


def test_seeded_frames_match_libpcap():
    rng = random.Random(4)
    frames = [packets.random_frame(rng) for _ in range(1500)]
    for expr, prog in PLAIN:
        for data, wirelen in frames:
            _check_frame(expr, prog, data, wirelen)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(packets.frames())
def test_generated_frames_match_libpcap(frame):
    data, wirelen = frame
    for expr, prog in PLAIN:
        _check_frame(expr, prog, data, wirelen)


@settings(max_examples=200, deadline=None)
@given(packets.short_frames())
def test_runts_match_libpcap(frame):
    for expr, prog in PLAIN:
        _check_frame(expr, prog, *frame)


# --- rule sets -----------------------------------------------------------------------------

def _expected_hits(progs, data, wirelen, pkttype, vlan_tci):
    return [i for i, p in enumerate(progs)
            if lpd.bpf_interpret(p, data, wirelen, pkttype, vlan_tci)]


def rules_matcher(progs):
    """f(data, wirelen, pkttype, vlan_tci) -> the indices of the rules
    make_rules_counter counts that frame for (and each by its wire length)."""
    count = lpd.make_rules_counter(progs)

    def hits(data, wirelen, pkttype=0, vlan_tci=None):
        rb, rp = [0] * len(progs), [0] * len(progs)
        count([(data, wirelen, pkttype, vlan_tci)], rb, rp)
        assert all(p in (0, 1) and b == wirelen * p for b, p in zip(rb, rp))
        return [i for i, p in enumerate(rp) if p]
    hits.source = count.source
    return hits


def test_rules_counter_counts_a_whole_batch():
    """One call per block: every frame of the batch is counted, per rule."""
    progs = [oracle.compile(e) for e in ("ip", "udp", "arp")]
    count = lpd.make_rules_counter(progs)
    rng = random.Random(3)
    batch = [(d, w, rng.choice([0, 4]), None) for d, w in CORPUS_FRAMES[::3]]
    rb, rp = [0] * 3, [0] * 3
    count(batch, rb, rp)
    for i, prog in enumerate(progs):
        hit = [w for d, w, t, _ in batch if lpd.bpf_interpret(prog, d, w, t)]
        assert (rb[i], rp[i]) == (sum(hit), len(hit))
    assert all(rp)


@pytest.mark.parametrize("size", [1, 2, 10, 50])
def test_rules_matcher_equals_programs_one_by_one(size):
    rng = random.Random(size)
    frames = CORPUS_FRAMES[::7] + [packets.random_frame(rng) for _ in range(400)]
    for _ in range(10):
        progs = [p.insns for _, p in rng.sample(COMPILED, size)]
        rules = rules_matcher(progs)
        for data, wirelen in frames:
            pkttype, tci = rng.choice([0, 1, 3, 4]), rng.choice([None, 5, 0x2064])
            assert list(rules(data, wirelen, pkttype, tci)) == \
                _expected_hits(progs, data, wirelen, pkttype, tci), (progs, data.hex())


def test_rules_matcher_counts_every_matching_rule():
    progs = [oracle.compile(e) for e in ("ip", "udp", "port 53", "ip6", "udp port 53")]
    frame = packets.ether("ff:ff:ff:ff:ff:ff", "00:60:08:9f:b1:f3", packets.ETH_IP,
                          packets.ipv4("10.0.0.1", "10.0.0.2", 17, packets.udp(1024, 53)))
    assert list(rules_matcher(progs)(frame, len(frame))) == [0, 1, 2, 4]
    assert list(rules_matcher(progs)(frame[:20], len(frame))) == [0]


def test_rules_matcher_shares_loads_between_rules():
    progs = [oracle.compile(e) for e in ("tcp port 22", "udp port 53", "icmp")]
    source = lpd.rules_counter_source(progs)
    assert "c_h12" in source and "c_b23" in source
    # a frame too short for the shared load rejects in every rule that makes it
    assert list(rules_matcher(progs)(b"\0" * 13, 13)) == []


def test_rules_matcher_caches_transport_loads_only_while_x_holds_the_header_length():
    msh = (0xB1, 0, 0, 14)                                  # ldxb 4*([14]&0xf)
    plain = [msh, (0x48, 0, 0, 14), (0x16, 0, 0, 0)]        # ldh [x+14]; ret a
    moved = [msh, (0x87, 0, 0, 0), (0x04, 0, 0, 2), (0x07, 0, 0, 0),   # txa; add #2; tax
             (0x48, 0, 0, 14), (0x16, 0, 0, 0)]
    progs = [plain, moved, plain, moved]
    rules = rules_matcher(progs)
    rng = random.Random(7)
    for data, wirelen in CORPUS_FRAMES[::13] + [packets.random_frame(rng) for _ in range(300)]:
        assert list(rules(data, wirelen)) == _expected_hits(progs, data, wirelen, 0, None)


def test_rules_matcher_with_rejecting_and_looping_programs():
    progs = [[], oracle.compile("ip6 protochain 17"), [(0x06, 0, 0, 0)], oracle.compile("ip6")]
    frame = packets.ether("ff:ff:ff:ff:ff:ff", "00:60:08:9f:b1:f3", packets.ETH_IP6,
                          packets.ipv6("fe80::1", "ff02::1", 17, packets.udp(1, 2),
                                       exts=(packets.ipv6_ext(packets.PROTO_HOPOPTS),)))
    assert list(rules_matcher(progs)(frame, len(frame))) == [1, 3]


# --- ancillary loads: the kernel's semantics ----------------------------------------------

def _anc_program(size_code, offset):
    """ld{size} [SKF_AD_OFF + offset]; ret a"""
    return [(0x20 | size_code, 0, 0, SKF_AD_OFF + offset), (0x16, 0, 0, 0)]


def _both(prog, data=b"\0" * 60, wirelen=60, pkttype=0, vlan_tci=None):
    a = lpd.bpf_interpret(prog, data, wirelen, pkttype, vlan_tci)
    b = lpd.make_matcher(prog)(data, wirelen, pkttype, vlan_tci)
    assert a == b, (prog, pkttype, vlan_tci)
    return a


@pytest.mark.parametrize("size_code", [0x00, 0x08, 0x10])
def test_pkttype_load_is_masked_like_the_kernel(size_code):
    prog = _anc_program(size_code, 4)
    for pkttype in range(16):
        assert _both(prog, pkttype=pkttype) == pkttype & 7


@pytest.mark.parametrize("size_code", [0x00, 0x08, 0x10])
def test_vlan_loads_like_the_kernel(size_code):
    tag, present = _anc_program(size_code, 44), _anc_program(size_code, 48)
    assert _both(tag) == 0 and _both(present) == 0
    for tci in (0, 1, 100, 0x1000 | 100, 0xE000 | 4095, 0xFFFF):
        assert _both(tag, vlan_tci=tci) == tci      # whole TCI, DEI bit included
        assert _both(present, vlan_tci=tci) == 1


def test_protocol_load_is_the_ethertype():
    prog = _anc_program(0x08, 0)
    ip = packets.ether("ff:ff:ff:ff:ff:ff", "00:60:08:9f:b1:f3", packets.ETH_IP6)
    assert _both(prog, ip, len(ip)) == packets.ETH_IP6
    llc = packets.llc("01:80:c2:00:00:00", "00:60:08:9f:b1:f3")
    assert _both(prog, llc, len(llc)) == 0x0004                     # ETH_P_802_2
    raw = llc[:14] + b"\xff\xff" + llc[16:]
    assert _both(prog, raw, len(raw)) == 0x0001                     # ETH_P_802_3


@pytest.mark.parametrize("offset", [8, 12, 20, 52, 56, 60, 0xFFC])
def test_other_ancillary_loads_reject(offset):
    assert _both(_anc_program(0x00, offset), pkttype=4, vlan_tci=5) == 0


_IS_TCP = oracle.Program("tcp")
_DIRECTION = {   # expression -> expected verdict from (pkttype, frame)
    "inbound": lambda t, d, w: t != PACKET_OUTGOING,
    "outbound": lambda t, d, w: t == PACKET_OUTGOING,
    "not inbound": lambda t, d, w: t == PACKET_OUTGOING,
    "inbound and tcp": lambda t, d, w: t != PACKET_OUTGOING and bool(_IS_TCP.filter(d, w)),
}


@pytest.mark.parametrize("expr,prog", ANCILLARY, ids=[e for e, _ in ANCILLARY])
def test_libpcap_direction_programs(expr, prog):
    """inbound/outbound: the kernel's PACKET_OUTGOING (4) is the only outbound type."""
    expect = _DIRECTION.get(expr)
    for data, wirelen in CORPUS_FRAMES[::50]:
        for pkttype in range(8):
            got = lpd.bpf_interpret(prog.insns, data, wirelen, pkttype)
            assert MATCHERS[expr](data, wirelen, pkttype) == got
            if expect:
                assert bool(got) == expect(pkttype, data, wirelen), (expr, pkttype)


def test_kernel_style_vlan_program():
    """What libpcap emits for 'vlan 100' on a live Linux socket (tags stripped)."""
    prog = [(0x30, 0, 0, SKF_AD_OFF + 48), (0x15, 0, 4, 1),        # ldb [vlanp]; jeq #1
            (0x30, 0, 0, SKF_AD_OFF + 44), (0x54, 0, 0, 0xFFF),     # ldb [vlan]; and #0xfff
            (0x15, 0, 1, 100), (0x06, 0, 0, 262144), (0x06, 0, 0, 0)]
    for tci, want in ((None, 0), (100, 262144), (0x1000 | 100, 262144), (0xE064, 262144),
                      (101, 0), (0, 0)):
        assert _both(prog, vlan_tci=tci) == want


# --- hand-written and random programs against libpcap's C interpreter -------------------

EDGE_PROGRAMS = {
    "div by X zero": [(0x01, 0, 0, 0), (0x00, 0, 0, 7), (0x3C, 0, 0, 0), (0x16, 0, 0, 0)],
    "mod by X zero": [(0x01, 0, 0, 0), (0x00, 0, 0, 7), (0x9C, 0, 0, 0), (0x06, 0, 0, 1)],
    "mod by X": [(0x01, 0, 0, 5), (0x80, 0, 0, 0), (0x9C, 0, 0, 0), (0x16, 0, 0, 0)],
    "lsh by X 32": [(0x01, 0, 0, 32), (0x00, 0, 0, 7), (0x6C, 0, 0, 0), (0x16, 0, 0, 0)],
    "rsh by X 40": [(0x01, 0, 0, 40), (0x00, 0, 0, 7), (0x7C, 0, 0, 0), (0x16, 0, 0, 0)],
    "lsh wraps": [(0x20, 0, 0, 0), (0x64, 0, 0, 31), (0x16, 0, 0, 0)],
    "neg": [(0x28, 0, 0, 12), (0x84, 0, 0, 0), (0x16, 0, 0, 0)],
    "sub wraps": [(0x30, 0, 0, 0), (0x14, 0, 0, 300), (0x16, 0, 0, 0)],
    "mul wraps": [(0x20, 0, 0, 0), (0x24, 0, 0, 0x10001), (0x16, 0, 0, 0)],
    "len": [(0x80, 0, 0, 0), (0x16, 0, 0, 0)],
    "ldx len, txa": [(0x81, 0, 0, 0), (0x87, 0, 0, 0), (0x16, 0, 0, 0)],
    "scratch": [(0x28, 0, 0, 12), (0x02, 0, 0, 15), (0x00, 0, 0, 0), (0x60, 0, 0, 15),
                (0x07, 0, 0, 0), (0x03, 0, 0, 3), (0x61, 0, 0, 3), (0x87, 0, 0, 0),
                (0x16, 0, 0, 0)],
    "ind at end": [(0x80, 0, 0, 0), (0x14, 0, 0, 2), (0x07, 0, 0, 0), (0x48, 0, 0, 0),
                   (0x16, 0, 0, 0)],
    "ind past end": [(0x80, 0, 0, 0), (0x14, 0, 0, 1), (0x07, 0, 0, 0), (0x48, 0, 0, 0),
                     (0x16, 0, 0, 0)],
    "ind huge k": [(0x01, 0, 0, 1), (0x50, 0, 0, 0xFFFFFFFF), (0x16, 0, 0, 0)],
    "abs huge k": [(0x20, 0, 0, 0x7FFFFFFF), (0x16, 0, 0, 0)],
    "msh": [(0xB1, 0, 0, 14), (0x87, 0, 0, 0), (0x16, 0, 0, 0)],
    "msh past end": [(0xB1, 0, 0, 100000), (0x06, 0, 0, 1)],
    "jset x": [(0x01, 0, 0, 0x80), (0x30, 0, 0, 0), (0x4D, 0, 1, 0), (0x06, 0, 0, 1),
               (0x06, 0, 0, 2)],
    "jgt jge": [(0x30, 0, 0, 0), (0x25, 1, 0, 0x7F), (0x35, 0, 1, 0x10), (0x06, 0, 0, 1),
                (0x06, 0, 0, 2)],
    "ja forward": [(0x05, 0, 0, 1), (0x06, 0, 0, 1), (0x06, 0, 0, 2)],
    "ja backward": [(0x01, 0, 0, 0), (0x87, 0, 0, 0), (0x04, 0, 0, 1), (0x07, 0, 0, 0),
                    (0x50, 0, 0, 0), (0x15, 1, 0, 0xFF), (0x05, 0, 0, 0xFFFFFFFA),
                    (0x87, 0, 0, 0), (0x16, 0, 0, 0)],
    "ret a": [(0x28, 0, 0, 12), (0x16, 0, 0, 0)],
}


@pytest.mark.parametrize("name", sorted(EDGE_PROGRAMS))
def test_edge_programs_match_libpcap(name):
    prog, matcher = EDGE_PROGRAMS[name], lpd.make_matcher(EDGE_PROGRAMS[name])
    rng = random.Random(name)
    frames = [(b"", 0), (b"\xff", 1), (b"\x45" * 13, 13)] + CORPUS_FRAMES[::97] + \
        [packets.random_frame(rng) for _ in range(200)]
    frames += [(bytes([0xFF] * 20 + [i % 256 for i in range(40)]), 99)]
    for data, wirelen in frames:
        want = oracle.bpf_filter(prog, data, wirelen)
        assert lpd.bpf_interpret(prog, data, wirelen) == want, (name, data.hex())
        assert matcher(data, wirelen) == want, (name, data.hex())


def test_invalid_instructions_reject_instead_of_crashing():
    for bad in [(0x0E, 0, 0, 0), (0x08, 0, 0, 1), (0x55, 0, 0, 0), (0x0D, 0, 0, 0), (0x8C, 0, 0, 0),
                (0x60, 0, 0, 16), (0x02, 0, 0, 99), (0xFFFF, 0, 0, 0), (0x34, 0, 0, 0)]:
        prog = [bad, (0x06, 0, 0, 1)]
        assert _both(prog) == 0, bad
    assert _both([(0x15, 5, 5, 0), (0x06, 0, 0, 1)]) == 0           # jump out of the program
    assert _both([(0x00, 0, 0, 3)]) == 0                             # falls off the end
    assert _both([]) == 0


# Valid, loop-free programs libpcap's interpreter can run without undefined behaviour:
# random loads, arithmetic (no constant zero divisor, no constant shift >= 32),
# scratch memory, and forward jumps that stay inside the program.
_SIMPLE = [0x20, 0x28, 0x30, 0x40, 0x48, 0x50, 0x80, 0x00, 0x01, 0x81, 0xB1, 0x07, 0x87,
           0x84] + [0x04 | op | src for op in (0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70,
                                               0x90, 0xA0) for src in (0x00, 0x08)]


@st.composite
def programs(draw):
    n = draw(st.integers(1, 14))
    prog = []
    for pc in range(n):
        room = n - pc - 1                       # instructions between this one and the final ret
        kind = draw(st.sampled_from(["op", "op", "jump", "mem", "ret"]))
        if kind == "jump" and room:
            code = 0x05 | draw(st.sampled_from([0x10, 0x20, 0x30, 0x40])) | \
                draw(st.sampled_from([0x00, 0x08]))
            prog.append((code, draw(st.integers(0, room)), draw(st.integers(0, room)),
                         draw(st.sampled_from([0, 1, 6, 17, 0x800, 0xFFFFFFFF]) |
                              st.integers(0, 2**32 - 1))))
        elif kind == "mem":
            prog.append((draw(st.sampled_from([0x02, 0x03, 0x60, 0x61])), 0, 0,
                         draw(st.integers(0, 15))))
        elif kind == "ret":
            prog.append((draw(st.sampled_from([0x06, 0x16])), 0, 0, draw(st.integers(0, 3))))
        else:
            code = draw(st.sampled_from(_SIMPLE))
            k = draw(st.sampled_from([0, 1, 2, 12, 14, 23, 31, 59, 60, 1514]) |
                     st.integers(0, 2**32 - 1))
            if code & 0x07 == 0x04 and not code & 0x08:
                if code & 0xF0 in (0x30, 0x90):
                    k = k or 1
                if code & 0xF0 in (0x60, 0x70):
                    k %= 32
            prog.append((code, 0, 0, k))
    prog.append((draw(st.sampled_from([0x06, 0x16])), 0, 0, draw(st.integers(0, 2**32 - 1))))
    # libpcap's scratch memory starts as stack garbage; zero it the way lpd assumes
    return [(0x02, 0, 0, i) for i in range(16)] + prog


@settings(max_examples=1500, deadline=None)
@given(programs(), packets.frames())
def test_random_programs_match_libpcap(prog, frame):
    data, wirelen = frame
    want = oracle.bpf_filter(prog, data, wirelen)
    assert lpd.bpf_interpret(prog, data, wirelen) == want
    assert lpd.make_matcher(prog)(data, wirelen) == want
    assert list(rules_matcher([prog, prog])(data, wirelen)) == ([0, 1] if want else [])


# --- generated source ------------------------------------------------------------------

def test_long_chains_stay_within_python_nesting_limits():
    """Hundreds of alternatives: deep if/elif trees must still compile and agree."""
    for expr in (" or ".join(f"port {p}" for p in range(1, 120)),
                 " or ".join(f"host 10.0.{i // 250}.{i % 250 + 1}" for i in range(300)),
                 " and ".join(f"not port {p}" for p in range(1, 120))):
        prog = oracle.Program(expr)
        assert len(prog.insns) > 200 and not lpd._has_backward_jump(prog.insns)
        matcher = lpd.make_matcher(prog.insns)
        rng = random.Random(expr)
        for data, wirelen in CORPUS_FRAMES[::11] + [packets.random_frame(rng) for _ in range(300)]:
            assert matcher(data, wirelen) == prog.filter(data, wirelen)


def test_helper_functions_for_join_points_give_the_same_results(monkeypatch):
    """With no duplication allowed every join point becomes a helper function."""
    monkeypatch.setattr(lpd, "_DUP_BUDGET", 0)
    rng = random.Random(11)
    frames = CORPUS_FRAMES[::23] + [packets.random_frame(rng) for _ in range(200)]
    chosen = rng.sample(COMPILED, 40)
    for expr, prog in chosen:
        matcher = lpd.make_matcher(prog.insns)
        for data, wirelen in frames:
            assert matcher(data, wirelen) == lpd.bpf_interpret(prog.insns, data, wirelen), expr
    progs = [p.insns for _, p in chosen]
    rules = rules_matcher(progs)
    assert "def _r" in rules.source
    for data, wirelen in frames:
        assert list(rules(data, wirelen, 4, 7)) == _expected_hits(progs, data, wirelen, 4, 7)


def test_source_is_kept_for_debugging():
    prog = oracle.compile("tcp port 80")
    assert lpd.make_matcher(prog).source == lpd.matcher_source(prog)
    assert "def match(" in lpd.matcher_source(prog)
    assert "rb[0] += wirelen" in lpd.make_rules_counter([prog]).source


def test_rules_matcher_when_no_rule_survives_a_branch():
    # Both rules need IPv4: the branch for every other ethertype is left empty.
    progs = [oracle.compile("tcp and ip[6:2] & 0x1fff = 0"), oracle.compile("ether proto \\ip")]
    rules = rules_matcher(progs)
    for data, wirelen in CORPUS_FRAMES[::5]:
        assert list(rules(data, wirelen, 0, None)) == _expected_hits(progs, data, wirelen, 0, None)
