"""Filter files (bpfcountd's format and lpd's fixes) and RuleCounter counting/reload.

Counts are held to libpcap: every frame is run through pcap_offline_filter with
the rule's expanded expression (tests/libpcap_oracle.py).
"""
import pathlib
import re
import subprocess
import sys
import threading
import time

import pytest

import lpd
from harness import write_pcap
import libpcap_oracle as oracle
from packets import (ETH_ARP, ETH_IP, ETH_IP6, PROTO_ICMP6, PROTO_TCP, PROTO_UDP,
                     arp, ether, icmp6, ipv4, ipv6, tcp, udp, vlan_tag)

pytestmark = pytest.mark.offline

FILTERS = pathlib.Path(__file__).resolve().parent.parent / "filters"
MAC = "02:00:00:00:00:01"
OTHER = "02:00:00:00:00:02"
BCAST = "ff:ff:ff:ff:ff:ff"



def parse(text, mac=MAC):
    """Rules of text as (id, expr, lineno) tuples."""
    return [(r.id, r.expr, r.lineno) for r in lpd.parse_filter_text(text, "t.filters", mac)]


def parse_error(text, mac=MAC):
    """The ConfigError message parsing text raises."""
    with pytest.raises(lpd.ConfigError) as ei:
        lpd.parse_filter_text(text, "t.filters", mac)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


# (name, filter-file text, expected rules as (id, expr, lineno))
GOOD = [
    ("plain", "a;arp\nb;ip\n", [("a", "arp", 1), ("b", "ip", 2)]),
    # bpfcountd cut the last character of a last line without newline ("ip" -> "i").
    ("no final newline", "a;arp\nb;ip6", [("a", "arp", 1), ("b", "ip6", 2)]),
    # bpfcountd kept the '\r' in the expression and failed to compile it.
    ("crlf", "a;arp\r\nb;ip\r\n", [("a", "arp", 1), ("b", "ip", 2)]),
    ("crlf no final newline", "a;arp\r\nb;ip", [("a", "arp", 1), ("b", "ip", 2)]),
    # bpfcountd treated a blank line after the first as a rule and exited.
    ("blank lines", "\na;arp\n\n   \t\nb;ip\n\n", [("a", "arp", 2), ("b", "ip", 5)]),
    ("comments", "# rules\n  # indented\na;arp\n#b;ip\n", [("a", "arp", 3)]),
    ("trimming", "  a \t;  arp and ether broadcast  \n", [("a", "arp and ether broadcast", 1)]),
    ("empty file", "", []),
    ("only comments", "# nothing\n\n", []),
    ("label-style ids", 'type="arp",who="me";arp\n', [('type="arp",who="me"', "arp", 1)]),
    ("longest id", "x" * 256 + ";arp\n", [("x" * 256, "arp", 1)]),
    ("non-ASCII id", "zähler-ü;arp\n", [("zähler-ü", "arp", 1)]),
    ("$MAC lower case", "me;ether src $MAC\n", [("me", "ether src (02:00:00:00:00:01)", 1)]),
    ("reference", "a;arp\nb;${a} and ether broadcast\n",
     [("a", "arp", 1), ("b", "(arp) and ether broadcast", 2)]),
    ("nested references", "a;ether src $MAC\nb;${a} and arp\nc;${b} or ip\n",
     [("a", "ether src (02:00:00:00:00:01)", 1),
      ("b", "(ether src (02:00:00:00:00:01)) and arp", 2),
      ("c", "((ether src (02:00:00:00:00:01)) and arp) or ip", 3)]),
    ("reference after a blank line and comment", "a;arp\n\n# x\nb;not ${a}\n",
     [("a", "arp", 1), ("b", "not (arp)", 4)]),
]


@pytest.mark.parametrize("name,text,expected", GOOD, ids=[g[0] for g in GOOD])
def test_filter_file_accepts(name, text, expected):
    assert parse(text) == expected


def test_mac_given_in_upper_case_or_with_dashes():
    want = [("me", "ether src (aa:bb:cc:dd:ee:0f)", 1)]
    assert parse("me;ether src $MAC", mac="AA:BB:CC:DD:EE:0F") == want
    assert parse("me;ether src $MAC", mac="aa-bb-cc-dd-ee-0f") == want


# (name, filter-file text, line the error names, words the reason contains)
BAD = [
    ("missing semicolon", "a;arp\nb ip\n", 2, "missing ';'"),
    ("empty id", ";arp\n", 1, "empty identifier"),
    ("id with colon", "a:b;arp\n", 1, "contains ':'"),
    ("id with space", "a b;arp\n", 1, "whitespace"),
    ("id with tab", "a\tb;arp\n", 1, "whitespace"),
    # Written raw into socket lines and labels, these would end or garble a reader's line.
    ("id with NUL", "a;arp\na\x00b;ip\n", 2, "'a\\x00b' contains control character U+0000"),
    ("id with 0x01", "\x01;arp\n", 1, "contains control character U+0001"),
    ("id with DEL", "a\x7f;arp\n", 1, "contains control character U+007F"),
    ("id with C1 CSI", "a\x9b31m;arp\n", 1, "contains control character U+009B"),
    ("id with ESC", "a\x1b[31m;arp\n", 1, "contains control character U+001B"),
    ("id too long", "x" * 257 + ";arp\n", 1, "identifier of 257 characters (at most 256)"),
    ("id of 1 MB", "a;arp\n" + "x" * (1 << 20) + ";arp\n", 2,
     f"identifier of {1 << 20} characters (at most 256)"),
    ("duplicate id", "a;arp\nb;ip\na;ip6\n", 3, "duplicate identifier 'a' (first defined on line 1)"),
    ("empty expression", "a;arp\nb;\n", 2, "empty expression"),
    ("blank expression", "a;   \t\n", 1, "empty expression"),
    ("does not compile", "a;arp\n\nb;arp and\n", 3, "does not compile"),
    # bpfcountd silently dropped everything after a second ';'.
    ("second semicolon", "a;arp;ip\n", 1, "does not compile"),
    ("expanded does not compile", "a;arp\nb;${a} and and\n", 2,
     "expanded expression '(arp) and and' does not compile"),
    ("unknown reference", "a;${nope} and arp\n", 1, "${nope} refers to an unknown rule"),
    ("later reference", "a;${b} or ip\nb;arp\n", 1, "${b} refers to a rule defined later (line 2)"),
    ("self reference", "a;${a}\n", 1, "refers to its own rule"),
    ("crlf error line", "a;arp\r\n\r\nb;arp and\r\n", 3, "does not compile"),
]


@pytest.mark.parametrize("name,text,lineno,reason", BAD, ids=[b[0] for b in BAD])
def test_filter_file_rejects(name, text, lineno, reason):
    msg = parse_error(text)
    assert msg.startswith(f"t.filters:{lineno}: "), msg
    assert reason in msg, msg


def test_a_huge_id_is_not_quoted_in_the_error():
    assert len(parse_error("x" * (1 << 20) + ";arp\n")) < 100


def test_readme_states_the_id_limit():
    readme = (FILTERS.parent / "README.md").read_text()
    assert f"at most {lpd.RULE_ID_MAX_CHARS} characters" in readme


def test_mac_without_interface_mac_is_an_error():
    assert parse_error("a;arp\nme;ether src $MAC\n", mac=None).startswith("t.filters:2: $MAC")
    assert parse("a;arp\n", mac=None) == [("a", "arp", 1)]


def test_parse_filter_file_reads_bytes(tmp_path):
    p = tmp_path / "x.filters"
    p.write_bytes(b"a;arp\r\nb;ip6")
    rules = lpd.parse_filter_file(str(p), MAC)
    assert [(r.id, r.expr, r.lineno) for r in rules] == [("a", "arp", 1), ("b", "ip6", 2)]
    assert rules[0].id == "a" and rules[0].expr == "arp" and rules[0].lineno == 1


def test_parse_filter_file_errors_name_the_file(tmp_path):
    p = tmp_path / "x.filters"
    p.write_bytes(b"a;arp\nb;ip\n\xff;ip6\n")
    with pytest.raises(lpd.ConfigError, match=r"^.*x\.filters:3: not valid UTF-8$"):
        lpd.parse_filter_file(str(p), MAC)
    p.write_bytes(b"a;arp\nb;\n")
    with pytest.raises(lpd.ConfigError, match=rf"^{p}:2: empty expression"):
        lpd.parse_filter_file(str(p), MAC)
    with pytest.raises(lpd.ConfigError, match=r"missing\.filters: cannot read filter file"):
        lpd.parse_filter_file(str(tmp_path / "missing.filters"), MAC)


def test_config_error_exit_code_is_78():
    assert lpd.ConfigError.exit_code == 78


# --- frames -------------------------------------------------------------------------

def frames():
    """A mix hitting every example rule: ARP kinds, ND, DNS, DHCP, TCP, VLAN, short capture."""
    f = []
    f.append(ether(BCAST, OTHER, ETH_ARP, arp(op=1, sha=OTHER)))                 # request, other
    f.append(ether(BCAST, MAC, ETH_ARP, arp(op=1, sha=MAC)))                     # request, me
    f.append(ether(OTHER, MAC, ETH_ARP, arp(op=2, sha=MAC, tha=OTHER)))          # reply, me
    f.append(ether(MAC, OTHER, ETH_ARP, arp(op=2, sha=OTHER, tha=MAC)))          # reply, other
    f.append(ether(BCAST, OTHER, ETH_ARP, arp(op=2, sha=OTHER)))                 # gratuitous
    for t, src in ((133, OTHER), (134, MAC), (134, OTHER), (135, MAC), (135, OTHER),
                   (136, MAC), (136, OTHER)):
        f.append(ether("33:33:00:00:00:01", src, ETH_IP6,
                       ipv6("fe80::1", "ff02::1", PROTO_ICMP6, icmp6(t), hlim=255)))
    dns_q = b"\x12\x34\x01\x00" + b"\0" * 8
    dns_r = b"\x12\x34\x81\x80" + b"\0" * 8
    f.append(ether(MAC, OTHER, ETH_IP, ipv4("10.0.0.2", "10.0.0.1", PROTO_UDP, udp(5353, 53, dns_q))))
    f.append(ether(OTHER, MAC, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", PROTO_UDP, udp(53, 5353, dns_r))))
    f.append(ether(MAC, OTHER, ETH_IP6, ipv6("2001:db8::2", "2001:db8::1", PROTO_UDP, udp(5353, 53, dns_q))))
    f.append(ether(OTHER, MAC, ETH_IP6, ipv6("2001:db8::1", "2001:db8::2", PROTO_UDP, udp(53, 5353, dns_r))))
    f.append(ether(MAC, OTHER, ETH_IP, ipv4("10.0.0.2", "10.0.0.1", PROTO_TCP, tcp(40000, 53))))
    f.append(ether(BCAST, OTHER, ETH_IP, ipv4("0.0.0.0", "255.255.255.255", PROTO_UDP,
                                              udp(68, 67, b"\x01" + b"\0" * 240))))
    f.append(ether(OTHER, MAC, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", PROTO_UDP,
                                            udp(67, 68, b"\x02" + b"\0" * 240))))
    f.append(ether("33:33:00:01:00:02", OTHER, ETH_IP6, ipv6("fe80::2", "ff02::1:2", PROTO_UDP,
                                                             udp(546, 547, b"\x01\0\0\0"))))
    f.append(ether(OTHER, MAC, ETH_IP, ipv4("10.0.0.1", "10.0.0.9", PROTO_TCP, tcp(22, 50000)),
                   tags=[vlan_tag(7)]))
    out = [(d, len(d)) for d in f]
    big = ether(MAC, OTHER, ETH_IP, ipv4("10.0.0.9", "10.0.0.1", PROTO_TCP,
                                         tcp(443, 50001, payload=b"x" * 1400)))
    out.append((big[:96], len(big)))      # snapped capture: bytes count the wire length
    return out


def expected_counts(rules, frame_list):
    """{id: (bytes, packets)} as libpcap counts them, expanded expression per rule."""
    got = {}
    for r in rules:
        prog = oracle.Program(r.expr)
        hits = [w for d, w in frame_list if prog.filter(d, w)]
        got[r.id] = (sum(hits), len(hits))
    return got


def count_all(rc, frame_list):
    """Feed frames through a RuleCounter as the decoder does: one batch per block."""
    for block in lpd.frames_to_blocks(frame_list):
        lpd.Decoder(lpd.LocalAddresses([]), [rc]).process_block(memoryview(block), 0)


def as_dict(snapshot):
    return {rid: (b, p) for rid, b, p in snapshot.rows}


def reloaded(old, rules):
    """What the daemon does on SIGHUP: a new counter, the old counts carried over."""
    new = lpd.RuleCounter(rules)
    new.carry_counts_from(old)
    return new


EXAMPLES = sorted(FILTERS.glob("*.filters"))


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"bpfcountd-arp.filters", "bpfcountd-extended.filters", "router-in.filters",
            "router-out.filters", "dns-dhcp.filters"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_loads_and_counts_like_libpcap(path):
    rules = lpd.parse_filter_file(str(path), MAC)
    assert rules, f"{path.name} has no rules"
    rs = lpd.RuleCounter(rules)
    fl = frames()
    count_all(rs, fl)
    snap = rs.snapshot()
    assert [s[0] for s in snap.rows] == [r.id for r in rules]          # file order
    assert as_dict(snap) == expected_counts(rules, fl)
    assert any(p for _, _, p in snap.rows), "the test frames should hit some rule"


def test_extended_example_matches_bpfcountd_semantics():
    """Each ARP/ND kind in bpfcountd's extended file counts exactly its frames."""
    rs = lpd.RuleCounter(lpd.parse_filter_file(str(FILTERS / "bpfcountd-extended.filters"), MAC))
    count_all(rs, frames())
    got = {rid: p for rid, _, p in rs.snapshot().rows}
    assert got['type="arp",subtype="request",who="me"'] == 1
    assert got['type="arp",subtype="request",who="other"'] == 1
    assert got['type="arp",subtype="reply",gratious="true"'] == 1
    assert got['type="icmp6",subtype="neigh-sol",who="me"'] == 1
    assert got['type="icmp6",subtype="router-sol"'] == 1


# --- RuleCounter ------------------------------------------------------------------------

FILE_V1 = """\
all;ether dst $MAC or ether src $MAC
arp;arp
tcp;tcp
udp;udp
me-udp;${all} and udp
gone;icmp6
"""
# arp: unchanged; tcp: expression changed; udp unchanged but me-udp's referenced rule
# changed (so its expansion changed); gone removed; new added; order changed.
FILE_V2 = """\
new;ip6
udp;udp
arp;arp
all;ether src $MAC
tcp;tcp and port 53
me-udp;${all} and udp
"""


def test_reload_keeps_unchanged_counts_resets_changed_and_drops_removed():
    fl = frames()
    r1 = lpd.parse_filter_text(FILE_V1, "v1", MAC)
    rs1 = lpd.RuleCounter(r1)
    count_all(rs1, fl)
    before = as_dict(rs1.snapshot())
    assert before == expected_counts(r1, fl)
    r2 = lpd.parse_filter_text(FILE_V2, "v2", MAC)
    rs2 = reloaded(rs1, r2)
    snap = rs2.snapshot()
    assert [s[0] for s in snap.rows] == ["new", "udp", "arp", "all", "tcp", "me-udp"]
    got = as_dict(snap)
    assert got["udp"] == before["udp"] and got["arp"] == before["arp"]
    assert got["udp"][1] > 0 and got["arp"][1] > 0
    for rid in ("new", "all", "tcp", "me-udp"):
        assert got[rid] == (0, 0), rid
    assert "gone" not in got
    # Counting goes on: kept rules accumulate, the others count from their start.
    count_all(rs2, fl)
    after = as_dict(rs2.snapshot())
    fresh = expected_counts(r2, fl)
    for rid in ("udp", "arp"):
        assert after[rid] == (before[rid][0] + fresh[rid][0], before[rid][1] + fresh[rid][1])
    for rid in ("new", "all", "tcp", "me-udp"):
        assert after[rid] == fresh[rid]
    # The old set is untouched (a failed swap leaves it running as it was).
    assert as_dict(rs1.snapshot()) == before


def test_reload_with_a_new_mac_resets_rules_using_it():
    fl = frames()
    rs1 = lpd.RuleCounter(lpd.parse_filter_text(FILE_V1, "v1", MAC))
    count_all(rs1, fl)
    rs2 = reloaded(rs1, lpd.parse_filter_text(FILE_V1, "v1", OTHER))
    got = as_dict(rs2.snapshot())
    assert got["all"] == (0, 0) and got["me-udp"] == (0, 0)
    assert got["arp"] == as_dict(rs1.snapshot())["arp"] != (0, 0)


def test_broken_file_on_reload_raises_before_anything_changes():
    rs1 = lpd.RuleCounter(lpd.parse_filter_text(FILE_V1, "v1", MAC))
    count_all(rs1, frames())
    before = rs1.snapshot()
    with pytest.raises(lpd.ConfigError):
        reloaded(rs1, lpd.parse_filter_text(FILE_V1 + "bad;tcp and\n", "v3", MAC))
    assert rs1.snapshot() == before


def test_empty_rule_counter():
    rs = lpd.RuleCounter([])
    assert len(rs) == 0 and rs.snapshot().rows == ()
    count_all(rs, [(b"\0" * 60, 60)])
    assert rs.bytes == [] and lpd.format_rule_lines(rs.snapshot().rows) == ""


def test_count_and_format():
    rs = lpd.RuleCounter(lpd.parse_filter_text("a;arp\nb;ip\nc;not arp", "f", MAC))
    count_all(rs, frames())
    snap = rs.snapshot().rows
    text = lpd.format_rule_lines(snap)
    assert text.splitlines() == [f"{rid}:{b}:{p}" for rid, b, p in snap]
    assert text.endswith("\n") and [line.split(":")[0] for line in text.splitlines()] == ["a", "b", "c"]
    total = sum(w for _, w in frames())
    assert snap[0][1] + snap[2][1] == total          # arp and not arp partition the bytes


def test_snapshot_is_immutable_and_detached():
    """A published snapshot never changes while the capture thread counts on."""
    rs = lpd.RuleCounter(lpd.parse_filter_text("x;ip\ny;ip\n", "f", MAC))
    count_all(rs, frames())
    snap = rs.snapshot()
    frozen = tuple(snap.rows)
    count_all(rs, frames())
    assert snap.rows == frozen and rs.snapshot().rows != frozen
    with pytest.raises((TypeError, AttributeError)):
        snap.rows[0][1] = 0


def test_each_load_compiles_and_resolves_again():
    """A reload re-reads host names: programs are compiled per load, not cached by text."""
    text = "h;host localhost\n"
    a = lpd.parse_filter_text(text, "f", MAC)[0]
    b = lpd.parse_filter_text(text, "f", MAC)[0]
    assert a.prog == b.prog and a.prog is not b.prog


# --- bounds on one expression (FILTER_MAX_CHARS, FILTER_MAX_BLOCKS) -----------------------

LPD_PY = str(FILTERS.parent / "lpd.py")
# RLIMIT_AS in bytes (util-linux's prlimit here crashes on suffixes such as 2G): one 1 MB
# line once grew lpd to 24 GB. Far more than a failing parse needs, and a generous
# wall-clock bound: these must fail at once, never after minutes of compiling.
BIG_AS_LIMIT = 2_000_000_000
BIG_TIMEOUT = 60


def _offline_with(tmp_path, text):
    """lpd -r (an empty pcap) -f (a file holding text) under the memory limit."""
    rules = tmp_path / "big.filters"
    rules.write_text(text)
    pcap = tmp_path / "empty.pcap"
    write_pcap(pcap, [])
    cp = subprocess.run(["prlimit", f"--as={BIG_AS_LIMIT}", sys.executable, LPD_PY,
                         "-r", str(pcap), "-f", str(rules), "--local-net", "10.0.0.0/8"],
                        capture_output=True, text=True, timeout=BIG_TIMEOUT)
    return cp, str(rules)


def _or_of_hosts(n):
    return " or ".join(f"host 10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(n))


def test_a_one_megabyte_rule_line_fails_at_once(tmp_path):
    line = _or_of_hosts(70000)
    line = line[:line.rindex(" or ", 0, (1 << 20) - 64)]        # whole terms: it would compile
    line = line.replace(" or ", " or" + " " * ((1 << 20) - len(line) + 1), 1)   # 1 MiB
    assert len(line) == 1 << 20
    cp, path = _offline_with(tmp_path, f"a;arp\n# big\nb;{line}\n")
    assert cp.returncode == 78, cp.stderr[-500:]
    assert cp.stderr == (f"lpd: {path}:3: expression too large ({1 << 20} characters, "
                         f"at most {lpd.FILTER_MAX_CHARS})\n")
    assert cp.stdout == ""


@pytest.mark.parametrize("terms,what", [
    (5000, "characters"),
    # Short enough as text, but 23 blocks of code per 'port' term: the optimiser's work
    # is what FILTER_MAX_BLOCKS bounds.
    (300, "blocks of code"),
])
def test_an_expression_of_many_terms_fails_at_once(tmp_path, terms, what):
    expr = " or ".join(f"port {i + 1}" for i in range(terms))
    cp, path = _offline_with(tmp_path, f"a;arp\nb;{expr}\n")
    assert cp.returncode == 78, cp.stderr[-500:]
    limit = lpd.FILTER_MAX_CHARS if what == "characters" else lpd.FILTER_MAX_BLOCKS
    assert re.fullmatch(rf"lpd: {re.escape(path)}:2: expression too large "
                        rf"\(\d+ {what}, at most {limit}\)\n", cp.stderr), cp.stderr


def test_expression_limits_at_the_boundary():
    pad = "ip" + " " * (lpd.FILTER_MAX_CHARS - len("ip") - len("or ip")) + "or ip"
    assert len(pad) == lpd.FILTER_MAX_CHARS
    assert parse(f"a;{pad}\n", mac=None) == [("a", pad, 1)]
    assert lpd.compile_filter(pad) == lpd.compile_filter("ip or ip")
    with pytest.raises(lpd.FilterTooLarge, match=rf"\({lpd.FILTER_MAX_CHARS + 1} characters"):
        lpd.compile_filter(pad + " ")
    assert parse_error(f"a;{pad.replace('or', ' or')}\n", mac=None) == (
        f"t.filters:1: expression too large ({lpd.FILTER_MAX_CHARS + 1} characters, "
        f"at most {lpd.FILTER_MAX_CHARS})")
    # Each 'port' term is 23 blocks, the program's two returns 2 more: 178 terms are the limit.
    ports = [f"port {i + 1}" for i in range(179)]
    assert 23 * 178 + 2 == lpd.FILTER_MAX_BLOCKS
    assert lpd.compile_filter(" or ".join(ports[:178]))
    with pytest.raises(lpd.FilterTooLarge) as ei:
        lpd.compile_filter(" or ".join(ports), kernel=True)
    assert str(ei.value) == (f"1:1: expression too large ({23 * 179 + 2} blocks of code, "
                             f"at most {lpd.FILTER_MAX_BLOCKS})")


def test_references_cannot_double_an_expression_past_the_limit(tmp_path):
    # Each line doubles the text of the one before: 2**40 characters by the last line,
    # were it built (in a child under the memory limit: it must never be).
    lines = ["r0;ip"] + [f"r{i};${{r{i - 1}}} and ${{r{i - 1}}}" for i in range(1, 41)]
    cp, path = _offline_with(tmp_path, "\n".join(lines) + "\n")
    length, n = len("ip"), 0
    while length <= lpd.FILTER_MAX_CHARS:
        length, n = 2 * length + len("() and ()"), n + 1
    assert cp.returncode == 78, cp.stderr[-500:]
    assert cp.stderr == (f"lpd: {path}:{n + 1}: expression too large ({length} characters "
                         f"once $MAC and ${{...}} are expanded, at most {lpd.FILTER_MAX_CHARS})\n")


def test_readme_states_the_expression_limits():
    readme = (FILTERS.parent / "README.md").read_text()
    rules = readme.split("## Rules", 1)[1].split("\n## ", 1)[0]
    assert f"{lpd.FILTER_MAX_CHARS:,} characters" in rules
    assert f"{lpd.FILTER_MAX_BLOCKS:,} blocks of code" in rules


# --- rule sets at scale -------------------------------------------------------------------

def test_rules_beyond_one_generated_function_count_like_one_by_one(monkeypatch):
    """A big set is compiled a slice of rules at a time (one compile() of 10,000 rules
    took 2 GB); every slice must count its own rules and only them."""
    monkeypatch.setattr(lpd, "_RULES_PER_FUNCTION", 4)
    exprs = ["arp", "udp port 53", "ip6", "tcp", "vlan 7", "host 10.0.0.1", "icmp6",
             "ip6 protochain 17", "udp", "ether broadcast", "not ip"]
    rc = lpd.RuleCounter(lpd.parse_filter_text(
        "".join(f"r{i};{e}\n" for i, e in enumerate(exprs)), "f", MAC))
    source = rc.count.source
    assert source.count("\ndef _count_rules_") == 2 and source.startswith("def _count_rules_0(")
    fl = frames()
    count_all(rc, fl)
    for i, expr in enumerate(exprs):
        prog = oracle.Program(expr)
        hits = [w for d, w in fl if prog.filter(d, w)]
        assert (rc.bytes[i], rc.packets[i]) == (sum(hits), len(hits)), expr


def test_rules_share_their_instructions():
    """A rule set holds one object per distinct instruction, not one per rule."""
    rules = lpd.parse_filter_text("".join(f"p{i};port {i + 1}\n" for i in range(50)), "f", MAC)
    first = {insn: insn for insn in rules[0].prog}
    shared = [insn for insn in rules[1].prog if insn in first]
    assert len(shared) > len(rules[1].prog) // 2
    assert all(first[insn] is insn for insn in shared)


def test_a_reload_compiles_only_what_changed_and_what_names_something(monkeypatch):
    """An expression naming nothing is a function of its text: a SIGHUP reuses its
    program. One with a name is compiled, and so resolved, again."""
    text = "a;udp port 53\nb;host localhost\nc;tcp port domain\nd;ip6\ne;ip proto \\tcp\n"
    lpd.parse_filter_text(text, "f", MAC)
    compiled = []
    real = lpd.compile_filter
    monkeypatch.setattr(lpd, "compile_filter",
                        lambda e, *a, **k: compiled.append(e) or real(e, *a, **k))
    again = lpd.parse_filter_text(text + "f;arp\n", "f", MAC)
    assert compiled == ["host localhost", "tcp port domain", "ip proto \\tcp", "arp"]
    assert [r.prog for r in again] == [tuple(real(r.expr)) for r in again]
    compiled.clear()
    lpd.parse_filter_text("a;udp port 53\nf;arp\n", "f", MAC)
    assert compiled == []
