"""The filter compiler against libpcap 1.10 (the definition, through ctypes).

For every expression of filter_expressions.txt: libpcap rejects it => lpd raises FilterError;
otherwise lpd's optimised program and libpcap's accept the same frames with the same length,
on every frame of the corpus pcaps, on seeded random frames and on hypothesis frames (tagged,
fragmented, IPv6 extension headers, ARP, LLC, MPLS, PPPoE, truncated and runt frames).
Programs are evaluated with libpcap's own C interpreter (bpf_filter), so the comparison is of
the programs, not of two interpreters.
"""
import glob
import os
import random
import shutil
import subprocess

import pytest
from hypothesis import given, settings, HealthCheck, strategies as st

import libpcap_oracle as oracle
import lpd
import packets

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "corpus", "pcaps")
RET_SNAP = (lpd.BPF_RET | lpd.BPF_K, 0, 0, 262144)

# Expressions libpcap accepts that lpd deliberately rejects (none so far).
UNSUPPORTED = set()


def _expressions():
    with open(os.path.join(HERE, "filter_expressions.txt")) as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


EXPRESSIONS = _expressions()


def _corpus_frames():
    frames = []
    for path in sorted(glob.glob(os.path.join(CORPUS, "*.pcap"))):
        try:
            frames.extend((bytes(data), wirelen) for _, wirelen, data in lpd.read_pcap(path))
        except lpd.LpdError:
            continue        # pcapng or another link type: not filter input
    return frames


_FRAMES = []


def frames():
    """Corpus frames plus seeded random ones (truncated, tagged, runts...)."""
    if not _FRAMES:
        _FRAMES.extend(_corpus_frames())
        rng = random.Random(4)
        _FRAMES.extend(packets.random_frame(rng) for _ in range(3000))
        _FRAMES.extend((bytes(rng.getrandbits(8) for _ in range(n)), n) for n in range(0, 80, 3))
    return _FRAMES


class Compiled:
    """A program kept as a ctypes array so libpcap's bpf_filter can run it many times."""

    def __init__(self, insns):
        self.insns = insns
        self.arr = (oracle.bpf_insn * len(insns))(*[oracle.bpf_insn(*i) for i in insns])

    def run(self, data, wirelen):
        return oracle.lib.bpf_filter(self.arr, data, wirelen, len(data))


def both(expr, **kw):
    """(lpd's program or FilterError, libpcap's program or OracleError)."""
    try:
        mine = lpd.compile_filter(expr, **kw)
    except lpd.FilterError as e:
        mine = e
    try:
        theirs = oracle.compile(expr, **kw)
    except oracle.OracleError as e:
        theirs = e
    return mine, theirs


def ah_in_protochain(data):
    """True when libpcap 1.10.3's protochain loop never ends on this frame.

    Its AH step sets X to the header's length instead of adding it, so the walk
    restarts near the frame's start and cycles; bpf_filter then never returns. lpd's
    program is the same, and its evaluators cap the loop, but there is no libpcap
    verdict to compare with.
    """
    if data[12:14] == b"\x08\x00":
        return len(data) > 23 and data[23] == 51
    if data[12:14] != b"\x86\xdd" or len(data) < 21:
        return False
    nh, off = data[20], 54
    for _ in range(64):
        if nh == 51:
            return True
        if nh not in (0, 43, 44, 60) or off + 2 > len(data):
            return False
        nh, off = data[off], off + (data[off + 1] + 1) * 8
    return True


def assert_same_verdicts(expr, mine, theirs, frame_list):
    # Run both even when the instructions are identical: the test must not lean on it.
    a, b = Compiled(mine), Compiled(theirs)
    if "protochain" in expr:
        frame_list = [f for f in frame_list if not ah_in_protochain(f[0])]
    for data, wirelen in frame_list:
        got, want = a.run(data, wirelen), b.run(data, wirelen)
        assert got == want, (f"{expr!r}: lpd returns {got}, libpcap {want} for the frame "
                             f"{data[:64].hex()} (caplen {len(data)}, wirelen {wirelen})")


@pytest.mark.offline
@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_agrees_with_libpcap(expr):
    if expr in UNSUPPORTED:
        with pytest.raises(lpd.FilterError, match="not supported by lpd"):
            lpd.compile_filter(expr)
        return
    mine, theirs = both(expr)
    if isinstance(theirs, Exception):
        assert isinstance(mine, lpd.FilterError), f"libpcap rejects {expr!r} ({theirs}), lpd compiles it"
        return
    assert not isinstance(mine, Exception), f"lpd rejects {expr!r} ({mine}), libpcap compiles it"
    assert_same_verdicts(expr, mine, theirs, frames())


@pytest.mark.offline
@pytest.mark.parametrize("expr", EXPRESSIONS[::4])
def test_unoptimised_agrees_with_libpcap(expr):
    if expr in UNSUPPORTED:
        return
    mine, theirs = both(expr, optimize=False)
    assert isinstance(mine, Exception) == isinstance(theirs, Exception), (mine, theirs)
    if not isinstance(mine, Exception):
        assert_same_verdicts(expr, mine, theirs, frames()[::7])


def _accepted():
    out = []
    for expr in EXPRESSIONS:
        if expr in UNSUPPORTED:
            continue
        try:
            out.append((expr, Compiled(lpd.compile_filter(expr)), Compiled(oracle.compile(expr))))
        except (lpd.FilterError, oracle.OracleError):
            continue
    return out


_ACCEPTED = []


@pytest.mark.offline
@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=packets.frames(), pick=st.integers(min_value=0))
def test_hypothesis_frames(frame, pick):
    if not _ACCEPTED:
        _ACCEPTED.extend(_accepted())
    data, wirelen = frame
    # Each frame against a slice of the expressions, so every expression sees many frames.
    n = len(_ACCEPTED)
    for i in range(pick % 7, n, 7):
        expr, mine, theirs = _ACCEPTED[i]
        if "protochain" in expr and ah_in_protochain(data):
            continue                                  # libpcap never returns (see above)
        assert mine.run(data, wirelen) == theirs.run(data, wirelen), (expr, data.hex(), wirelen)


# A generated mix of the listed primitives: and/or/not, parentheses, inherited qualifiers.
def _random_expressions(n, seed):
    rng = random.Random(seed)
    atoms = [e for e in EXPRESSIONS if e not in UNSUPPORTED]
    ids = ["10.0.0.1", "80", "53", "fe80::1", "443", "10.1", "00:60:08:9f:b1:f3", "localhost"]

    def expr(depth=0):
        r = rng.random()
        if depth > 3 or r < 0.4:
            return rng.choice(atoms)
        if r < 0.55:
            return "not " + expr(depth + 1)
        if r < 0.65:
            return "(" + expr(depth + 1) + ")"
        if r < 0.72:
            return expr(depth + 1) + rng.choice([" and ", " or "]) + rng.choice(ids)
        return expr(depth + 1) + rng.choice([" and ", " or ", " && ", " || "]) + expr(depth + 1)
    return [expr() for _ in range(n)]


@pytest.mark.offline
def test_random_combinations_agree_with_libpcap():
    some = frames()[::5]
    for expr in _random_expressions(1500, seed=11):
        mine, theirs = both(expr)
        if isinstance(theirs, Exception):
            assert isinstance(mine, lpd.FilterError), (expr, theirs)
            continue
        assert not isinstance(mine, Exception), (expr, mine)
        assert_same_verdicts(expr, mine, theirs, some)


@pytest.mark.parametrize("expr", [
    # Loads libpcap's optimiser removes: a frame too short for them is still accepted.
    "ether[100] = 1 or 1 = 1", "ether[1000] * 0 = 0", "ip[100] = 1 or not ip[100] = 1",
    "tcp[50] > 5 or tcp[50] <= 5", "ip[80:4] - ip[80:4] = 0", "len - len = 0",
    "ether[200] & 0 = 0", "ip6[100] | 0 = ip6[100] or ip", "not (ether[3000] = 1 and 1 = 0)",
    "ether[90] = 1 and ether[90] = 2 or arp",
])
@pytest.mark.offline
def test_optimiser_semantics_on_short_frames(expr):
    mine, theirs = both(expr)
    short = [(bytes(range(n)), n) for n in range(0, 120)] + frames()[::13]
    assert_same_verdicts(expr, mine, theirs, short)


@pytest.mark.offline
def test_rejects_all_is_an_error():
    for expr in ("1 = 2", "ip and not ip", "tcp and udp", "ip and arp", "ip and icmp6"):
        with pytest.raises(lpd.FilterError, match="rejects all packets"):
            lpd.compile_filter(expr)


@pytest.mark.offline
def test_empty_expression_accepts_all():
    assert lpd.compile_filter("") == [RET_SNAP]
    assert lpd.compile_filter("  ") == [RET_SNAP]


@pytest.mark.offline
def test_snaplen_is_the_accept_length():
    prog = lpd.compile_filter("ip", snaplen=96)
    assert (lpd.BPF_RET | lpd.BPF_K, 0, 0, 96) in prog
    assert prog == oracle.compile("ip", snaplen=96)


@pytest.mark.offline
def test_inbound_outbound_use_the_packet_type():
    for expr, verdict_out in (("inbound", 0), ("outbound", 262144)):
        prog = lpd.compile_filter(expr)
        assert prog[0] == (lpd.BPF_LD | lpd.BPF_H | lpd.BPF_ABS, 0, 0,
                           lpd.SKF_AD_OFF + lpd.SKF_AD_PKTTYPE)
        assert prog == lpd.compile_filter(expr, kernel=True)


@pytest.mark.offline
def test_names_resolve_locally():
    assert lpd.compile_filter("host localhost") == oracle.compile("host localhost")
    assert lpd.compile_filter("port domain") == oracle.compile("port domain")
    assert lpd.compile_filter("tcp port ftp-data") == oracle.compile("tcp port ftp-data")
    with pytest.raises(lpd.FilterError, match="is tcp"):
        lpd.compile_filter("udp port ftp-data")      # a tcp-only service restricts to tcp
    assert lpd.compile_filter("ip proto \\tcp") == oracle.compile("ip proto \\tcp")
    assert lpd.compile_filter("ether proto \\arp") == oracle.compile("ether proto \\arp")


@pytest.mark.parametrize("expr, col, reason", [
    ("tcp port foo", 10, "expected a port number after 'port', got 'foo'"),
    ("port 65536", 6, "illegal port number 65536 > 65535"),
    ("ip and", 7, "got end of expression"),
    ("host 10.0.0.1 foo", 15, "got 'foo'"),
    ("ip[0:3] = 1", 6, "data size must be 1, 2, or 4"),
    ("vlan 4096", 6, "VLAN tag 4096 greater than maximum 4095"),
    ("ip broadcast", 4, "netmask not known"),
    ("gateway foo", 9, "'gateway' is not supported"),
    ("foo", 1, "before this address or name"),
    ("ip ; tcp", 4, "unexpected character ';'"),
    ("net 10.0.0.1/8", 5, 'non-network bits set in "10.0.0.1/8"'),
    ("ip6 host 10.0.0.1", 10, "'ip6' modifier applied to ip host"),
    ("1 = 2", 1, "expression rejects all packets"),
    ("ip[9] = 08", 9, "number 08 contains non-octal digit"),
])
@pytest.mark.offline
def test_error_column_and_reason(expr, col, reason):
    with pytest.raises(lpd.FilterError) as info:
        lpd.compile_filter(expr)
    e = info.value
    assert e.col == col and reason in e.reason, str(e)
    assert str(e) == f"1:{col}: {e.reason}" and "\n" not in str(e)
    assert isinstance(e, lpd.UsageError)


@pytest.mark.offline
def test_error_line_number():
    assert str(lpd.FilterError("bad", 3, line=7)) == "7:3: bad"


# --- the formatter: exactly tcpdump's -d / -dd / -ddd for any program -------------------

needs_tcpdump = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")


@pytest.mark.offline
@needs_tcpdump
@pytest.mark.parametrize("level, flag", [(1, "-d"), (2, "-dd"), (3, "-ddd")])
def test_format_program_matches_tcpdump(level, flag):
    checked = 0
    for expr in EXPRESSIONS[::3] + ["ip6 protochain 6", "inbound", "ifindex 3", "pppoes and inbound"]:
        try:
            prog = oracle.compile(expr)
        except oracle.OracleError:
            continue
        out = subprocess.run(["tcpdump", "-y", "EN10MB", flag, "--", expr],
                             capture_output=True, text=True, check=True).stdout
        assert lpd.format_program(prog, level) == out, expr
        checked += 1
    assert checked > 50


@pytest.mark.offline
def test_format_program_instruction_forms():
    prog = [(0x06, 0, 0, 0xffffffff), (0x16, 0, 0, 0), (0x20, 0, 0, lpd.SKF_AD_OFF + 44),
            (0x48, 0, 0, 2), (0xb1, 0, 0, 14), (0x87, 0, 0, 0), (0x05, 0, 0, 0xfffffff0),
            (0x1d, 1, 2, 0), (0x14, 0, 0, 0xfffffffe), (0x84, 0, 0, 0), (0x07, 0, 0, 0),
            (0xffff, 0, 0, 0), (0x75, 3, 4, 0)]
    assert lpd.format_program(prog, 1).splitlines() == [
        "(000) ret      #-1", "(001) ret      ", "(002) ld       [vlan_tci]",
        "(003) ldh      [x + 2]", "(004) ldxb     4*([14]&0xf)", "(005) txa      ",
        "(006) ja       -9", "(007) jeq      x                jt 9\tjf 10",
        "(008) sub      #-2", "(009) neg      ", "(010) tax      ", "(011) unimp    0xffff",
        "(012) unimp    0x75             jt 16\tjf 17"]


# --- the kernel target --------------------------------------------------------------------

def _tcpdump_live_program(expr):
    """libpcap's program for a live Linux capture on lo (an Ethernet device): what it would
    attach with SO_ATTACH_FILTER, outer VLAN tag in metadata."""
    r = subprocess.run(["tcpdump", "-i", "lo", "-ddd", "--", expr], capture_output=True, text=True)
    if r.returncode:
        return oracle.OracleError(r.stderr.strip())
    return [tuple(map(int, line.split())) for line in r.stdout.splitlines()[1:] if line.strip()]


@pytest.mark.live
@needs_tcpdump
@pytest.mark.skipif(os.geteuid() != 0, reason="opening lo for capture needs CAP_NET_RAW")
def test_kernel_target_matches_libpcap_live_capture():
    exprs = ["vlan", "vlan 5", "vlan and ip", "vlan 1 and vlan 2 and ip", "not vlan and ip",
             "vlan 10 or vlan 20", "ip or vlan 5 and tcp port 80", "vlan and mpls and ip",
             "vlan and pppoes and ip", "inbound", "outbound and tcp", "ifindex 1",
             "vlan and host 10.0.0.1"] + EXPRESSIONS[::6]
    for expr in exprs:
        if expr in UNSUPPORTED or "broadcast" in expr:     # lo's netmask is known to tcpdump
            continue
        theirs = _tcpdump_live_program(expr)
        try:
            mine = lpd.compile_filter(expr, kernel=True)
        except lpd.FilterError as e:
            # The kernel refuses backward jumps; libpcap then filters in userspace.
            assert isinstance(theirs, Exception) or "protochain" in expr, (expr, e)
            continue
        assert not isinstance(theirs, Exception), (expr, theirs)
        assert mine == theirs, expr


@pytest.mark.offline
def test_kernel_vlan_uses_ancillary_data():
    prog = lpd.compile_filter("vlan 5", kernel=True)
    ks = {k for _, _, _, k in prog}
    assert lpd.SKF_AD_OFF + lpd.SKF_AD_VLAN_TAG_PRESENT in ks
    assert lpd.SKF_AD_OFF + lpd.SKF_AD_VLAN_TAG in ks
    assert lpd.compile_filter("vlan 5") == oracle.compile("vlan 5")   # userspace: in the data
