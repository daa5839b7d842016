"""-r reads pcapng as it reads classic pcap, and reads a capture cut short up to the cut.

The oracle is Wireshark's own tools, not a writer of ours checking itself: editcap and
mergecap make the pcapng files the corpus replays from, tshark and capinfos read the
files these tests build by hand (block kinds editcap never writes), and tshark says how
many packets a cut file holds.
"""
import glob
import io
import os
import shutil
import struct
import subprocess
import sys

import pytest

import lpd
from conftest import CORPUS
from harness import LPD, bare_udp4, independent_records, write_pcap

pytestmark = pytest.mark.offline

PCAPS = sorted(glob.glob(os.path.join(CORPUS, "*.pcap")))
WIRESHARK = ("editcap", "mergecap", "tshark", "capinfos")


def test_the_oracles_are_here():
    """Wireshark's tools and the corpus are this file's oracle and input: missing, the
    suite fails (make deps installs tshark), never skips."""
    assert all(shutil.which(t) for t in WIRESHARK), "apt-get install tshark"
    assert PCAPS, f"no corpus in {CORPUS}"

EVERY_LOCAL = ["--local-net", "0.0.0.0/0", "--local-net", "::/0"]
VARIANTS = [[], ["--output", "json"], ["--output", "json", "--remote", "--connections", "--http"]]
# Capped so that a read allocating what a hostile length field asks for fails.
AS_LIMIT = 1_000_000_000


def run(*argv, cut=False):
    """A Wireshark tool's output; `cut`: the file is cut short, as the tool must say."""
    cp = subprocess.run(list(argv), capture_output=True, timeout=120)
    if cut:
        assert b"cut short in the middle of a packet" in cp.stderr, (argv, cp.stderr)
    else:
        assert cp.returncode == 0, (argv, cp.stderr)
    return cp.stdout.decode()


def replay_text(path, *extra):
    """What 'lpd -r path' prints, in-process: the replay with its output."""
    out = io.StringIO()
    assert lpd.replay(lpd.parse_args(["-r", str(path), *EVERY_LOCAL, *extra]), out) == 0
    return out.getvalue()


def lpd_cli(path, *extra, limit=None):
    argv = [sys.executable, LPD, "-r", str(path), *extra]
    if limit:
        argv = ["prlimit", f"--as={limit}"] + argv
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def same_name_in(directory, path):
    """`path`'s basename under `directory`: lpd names the interface after the file, so
    two replays compare byte for byte only under one name."""
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, os.path.basename(path))


# ---- pcapng by hand, for what editcap never writes ---------------------------------
# Spelled from the pcapng specification, not from lpd's constants.
SHB, IDB, PB, SPB, NRB, ISB, EPB, DSB, CUSTOM = \
    0x0A0D0D0A, 1, 2, 3, 4, 5, 6, 0x0000000A, 0x00000BAD
OPT_END, OPT_COMMENT, IF_TSRESOL, IF_TSOFFSET = 0, 1, 9, 14


def block(order, btype, body, length=None):
    body += bytes(-len(body) % 4)
    n = len(body) + 12 if length is None else length
    return struct.pack(order + "II", btype, n) + body + struct.pack(order + "I", n)


def options(order, *opts):
    out = b"".join(struct.pack(order + "HH", code, len(value)) + value + bytes(-len(value) % 4)
                   for code, value in opts)
    return out + struct.pack(order + "HH", OPT_END, 0) if opts else b""


def shb(order, major=1, minor=0):
    return block(order, SHB, struct.pack(order + "IHHq", 0x1A2B3C4D, major, minor, -1)
                 + options(order, (OPT_COMMENT, b"hand-built")))


def idb(order, linktype=1, snaplen=0, tsresol=None, tsoffset=None):
    opts = []
    if tsresol is not None:
        opts.append((IF_TSRESOL, bytes([tsresol])))
    if tsoffset is not None:
        opts.append((IF_TSOFFSET, struct.pack(order + "q", tsoffset)))
    return block(order, IDB, struct.pack(order + "HHI", linktype, 0, snaplen) + options(order, *opts))


def epb(order, iface, ticks, data, wirelen=None, comment=None):
    body = struct.pack(order + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(data),
                       len(data) if wirelen is None else wirelen) + data + bytes(-len(data) % 4)
    return block(order, EPB, body + (options(order, (OPT_COMMENT, comment)) if comment else b""))


def pb(order, iface, ticks, data):
    return block(order, PB, struct.pack(order + "HHIIII", iface, 0, ticks >> 32, ticks & 0xFFFFFFFF,
                                        len(data), len(data)) + data)


def spb(order, data, wirelen=None):
    return block(order, SPB, struct.pack(order + "I", len(data) if wirelen is None else wirelen) + data)


def classic_records(path):
    """(seconds, fraction, wirelen, data) per record of a microsecond classic pcap."""
    raw = open(path, "rb").read()
    order = "<" if raw[:4] == b"\xd4\xc3\xb2\xa1" else ">"
    off = 24
    while off + 16 <= len(raw):
        sec, frac, incl, orig = struct.unpack_from(order + "IIII", raw, off)
        yield sec, frac, orig, raw[off + 16:off + 16 + incl]
        off += 16 + incl


def tshark_packets(path):
    """(epoch as tshark prints it, wire length, captured length) per packet. tshark shows
    a custom block as a frame too: only Ethernet's are packets. An SPB has no time: None."""
    out = run("tshark", "-r", str(path), "-Y", "eth", "-T", "fields", "-e", "frame.time_epoch",
              "-e", "frame.len", "-e", "frame.cap_len")
    rows = (line.split("\t") for line in out.splitlines())
    return [(float(t) if t else None, int(w), int(c)) for t, w, c in rows]


# ---- the corpus through editcap and mergecap ------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{kind: (reference dir, pcapng dir)}: each corpus capture beside editcap's pcapng of
    it, under one name; 'nsec' is the same through nanosecond pcap (if_tsresol 9)."""
    root = tmp_path_factory.mktemp("corpus")
    dirs = {"usec": (root / "pcap", root / "pcapng"), "nsec": (root / "nsec", root / "nsecng")}
    for path in PCAPS:
        ref, ng = dirs["usec"]
        os.symlink(path, same_name_in(ref, path))
        run("editcap", "-F", "pcapng", path, same_name_in(ng, path))
        ref, ng = dirs["nsec"]
        run("editcap", "-F", "nsecpcap", path, same_name_in(ref, path))
        run("editcap", "-F", "pcapng", same_name_in(ref, path), same_name_in(ng, path))
    return dirs


@pytest.mark.parametrize("kind", ["usec", "nsec"])
def test_every_corpus_capture_as_pcapng_replays_byte_identical(converted, kind):
    ref, ng = converted[kind]
    name = os.path.basename(PCAPS[0])
    if kind == "nsec":      # the oracle's own word that the pcapng has nanosecond ticks
        assert "Time precision = nanoseconds (9)" in run("capinfos", str(ng / name))
    assert open(ng / name, "rb").read(4) == b"\x0a\x0d\x0d\x0a"
    for path in PCAPS:
        name = os.path.basename(path)
        for extra in VARIANTS:
            assert replay_text(ng / name, *extra) == replay_text(ref / name, *extra), (name, extra)


def test_cli_reads_pcapng_as_it_reads_pcap(converted):
    ref, ng = converted["usec"]
    for name in ("mptcp-v0.pcap", "afs.pcap"):
        args = [*EVERY_LOCAL, "--output", "json", "--remote", "--connections", "--http",
                "--interval", "0.5"]
        got, want = lpd_cli(ng / name, *args), lpd_cli(ref / name, *args)
        assert (got.returncode, got.stderr) == (0, "")
        assert got.stdout == want.stdout and '"connections"' in got.stdout


@pytest.mark.parametrize("a,b", [("mptcp-v0.pcap", "afs.pcap"), ("arp-oobr.pcap", "ptp_ethernet.pcap"),
                                 ("pim-packet-assortment.pcap", "mptcp-v0.pcap")])
def test_merged_captures_with_several_interfaces(tmp_path, a, b):
    """mergecap keeping each file's interface (-I none), the second file's at nanosecond
    resolution: one pcapng of two interfaces with different clocks, against mergecap's
    nanosecond classic pcap of the same packets."""
    a, b = os.path.join(CORPUS, a), os.path.join(CORPUS, b)
    nsec = str(tmp_path / "b.nsec.pcap")
    run("editcap", "-F", "nsecpcap", b, nsec)
    ng, ref = str(tmp_path / "ng" / "merged"), str(tmp_path / "ref" / "merged")
    os.makedirs(os.path.dirname(ng))
    os.makedirs(os.path.dirname(ref))
    run("mergecap", "-I", "none", "-F", "pcapng", "-w", ng, a, nsec)
    run("mergecap", "-F", "nsecpcap", "-w", ref, a, nsec)
    info = run("capinfos", ng)
    assert "Number of interfaces in file: 2" in info and "nanoseconds (9)" in info \
        and "microseconds (6)" in info
    for extra in VARIANTS:
        assert replay_text(ng, *extra) == replay_text(ref, *extra)


# ---- hand-built pcapng, read by tshark too ------------------------------------------

FRAMES = [bare_udp4("10.0.0.1", "192.0.2.9", b"x" * n) for n in (10, 100, 300, 70)]
T0 = 1_700_000_000


def hand_built():
    """Every block kind and clock editcap does not write: a big-endian section with two
    interfaces (nanoseconds; 2^-20 s with an if_tsoffset), the obsolete PB, NRB, ISB,
    DSB and custom blocks; then a little-endian section with a 64-byte snap length
    (microseconds by default), SPBs of packets longer and shorter than it, an EPB with
    a comment."""
    be, le = ">", "<"
    return b"".join([
        shb(be), idb(be, tsresol=9), idb(be, tsresol=0x80 | 20, tsoffset=T0),
        block(be, CUSTOM, struct.pack(be + "I", 32473) + b"opaque"),
        block(be, NRB, struct.pack(be + "HH", 1, 8) + bytes([10, 0, 0, 1]) + b"h\0\0\0"
              + struct.pack(be + "HH", 0, 0)),
        epb(be, 0, T0 * 10**9 + 123_456_789, FRAMES[0]),
        epb(be, 1, 5 * 2**20 + 3 * 2**18, FRAMES[1]),           # T0 + 5.75 s
        block(be, ISB, struct.pack(be + "III", 0, 0, 0)),
        pb(be, 1, 6 * 2**20, FRAMES[2]),
        block(be, DSB, struct.pack(be + "II", 0x544c534b, 0)),
        shb(le), idb(le, snaplen=64),
        spb(le, FRAMES[2][:64], len(FRAMES[2])),
        epb(le, 0, (T0 + 9) * 10**6 + 250_000, FRAMES[3][:64], len(FRAMES[3]), comment=b"why"),
        spb(le, FRAMES[0]),
        block(le, 0x12345, b"unknown to everyone"),
    ])


def test_hand_built_pcapng_reads_as_tshark_reads_it(tmp_path):
    path = tmp_path / "hand.pcapng"
    path.write_bytes(hand_built())
    got = list(lpd.read_pcap(str(path)))
    want = tshark_packets(path)
    assert [(w, len(d)) for _, w, d in got] == [(w, c) for _, w, c in want] == [
        (len(FRAMES[0]), len(FRAMES[0])), (len(FRAMES[1]), len(FRAMES[1])),
        (len(FRAMES[2]), len(FRAMES[2])), (len(FRAMES[2]), 64), (len(FRAMES[3]), 64),
        (len(FRAMES[0]), len(FRAMES[0]))]
    # Timestamps as tshark reads them, but an SPB's: it has none (tshark: 0), lpd
    # carries the one before it.
    stamps = [t for t, _, _ in got]
    for i in (0, 1, 2, 4):
        assert abs(stamps[i] - want[i][0]) < 1e-6, i
    assert stamps == [T0 + 0.123456789, T0 + 5.75, T0 + 6, T0 + 6, T0 + 9.25, T0 + 9.25]
    # The captured bytes, as tshark copies the packets into a classic pcap.
    flat = tmp_path / "flat.pcap"
    run("tshark", "-r", str(path), "-Y", "eth", "-F", "pcap", "-w", str(flat))
    assert [(w, d) for _, w, d in got] == list(independent_records(flat))


def test_hand_built_sections_replay_as_the_classic_capture(tmp_path):
    """A corpus capture rewritten by hand as three sections (big-, little-, big-endian),
    each with its own interface and clock, unknown blocks between the packets: the
    replay equals the classic file's, every stage on."""
    src = os.path.join(CORPUS, "mptcp-v0.pcap")
    records = list(classic_records(src))
    thirds = len(records) // 3
    clocks = [(">", 6, 10**6), ("<", None, 10**6), (">", 9, 10**9)]      # None: the default
    out = []
    for i, (order, tsresol, units) in enumerate(clocks):
        out += [shb(order), block(order, CUSTOM, b"first"), idb(order, tsresol=tsresol)]
        for sec, usec, wirelen, data in records[i * thirds:None if i == 2 else (i + 1) * thirds]:
            out += [epb(order, 0, sec * units + usec * (units // 10**6), data, wirelen),
                    block(order, ISB, bytes(12))]
    ng = same_name_in(tmp_path / "ng", src)
    open(ng, "wb").write(b"".join(out))
    assert tshark_packets(ng) == tshark_packets(src)       # the builder, by the oracle
    for extra in VARIANTS:
        assert replay_text(ng, *extra) == replay_text(src, *extra)


def test_clock_of_an_interface():
    le = "<"
    assert lpd.pcapng_clock({}, le) == (10**6, 0)
    assert lpd.pcapng_clock({9: bytes([9])}, le) == (10**9, 0)
    assert lpd.pcapng_clock({9: bytes([0x80 | 10])}, le) == (1024, 0)
    assert lpd.pcapng_clock({9: bytes([3]), 14: struct.pack("<q", -5)}, le) == (1000, -5)
    with pytest.raises(ValueError):
        lpd.pcapng_clock({9: b"\x06\x00"}, le)


def test_options_stop_at_their_end_and_refuse_an_overrun():
    be = ">"
    body = options(be, (9, b"\x09"), (2, b"eth0")) + b"junk after the end"
    assert lpd.pcapng_options(body, 0, len(body), be) == {9: b"\x09", 2: b"eth0"}
    with pytest.raises(ValueError, match="overruns"):
        lpd.pcapng_options(struct.pack(be + "HH", 2, 40) + b"eth0", 0, 8, be)


# ---- cut short ---------------------------------------------------------------------

def record_starts(path):
    """Byte offsets of a capture's packet records (classic) or blocks (pcapng), and its end."""
    raw = open(path, "rb").read()
    if raw[:4] == b"\x0a\x0d\x0d\x0a":
        order = "<" if raw[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
        starts, off = [], 0
        while off < len(raw):
            btype, n = struct.unpack_from(order + "II", raw, off)
            if btype in (EPB, SPB, PB):
                starts.append(off)
            off += n
        return starts, len(raw)
    order = "<" if raw[:4] == b"\xd4\xc3\xb2\xa1" else ">"
    starts, off = [], 24
    while off < len(raw):
        starts.append(off)
        off += 16 + struct.unpack_from(order + "I", raw, off + 8)[0]
    return starts, len(raw)


def first_records(src, k, dst):
    """The first k packets of src in a file of their own, by editcap."""
    run("editcap", "-r", str(src), str(dst), f"1-{k}")


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("record,into", [(7, 5), (7, 12), (7, 16 + 9), (40, -1), (100, 3)])
def test_capture_cut_short_is_read_up_to_the_cut(tmp_path, capsys, fmt, record, into):
    """Cut `into` bytes into packet record `record` (negative: from its end): mid record
    header, mid block header, mid body, the last byte."""
    src = os.path.join(CORPUS, "mptcp-v0.pcap")
    if fmt == "pcapng":
        src_ng = str(tmp_path / "full.pcapng")
        run("editcap", "-F", "pcapng", src, src_ng)
        src = src_ng
    starts, size = record_starts(src)
    end = starts[record + 1] if record + 1 < len(starts) else size
    cut = (starts[record] if into >= 0 else end) + into
    cut_path = same_name_in(tmp_path / "cut", "capture")
    open(cut_path, "wb").write(open(src, "rb").read()[:cut])
    # The oracle's count of the whole packets before the cut.
    assert len(run("tshark", "-r", cut_path, "-T", "fields", "-e", "frame.number", cut=True).split()) \
        == record
    whole = same_name_in(tmp_path / "whole", "capture")
    first_records(src, record, whole)
    for extra in VARIANTS:
        got = replay_text(cut_path, *extra)
        err = capsys.readouterr().err
        assert got == replay_text(whole, *extra) and capsys.readouterr().err == ""
        assert err.count("\n") == 1 and err.startswith(f"lpd: {cut_path}: truncated dump file: ")
        assert f"at byte {starts[record]} is cut short" in err
        assert f"read the {record} packets before it" in err


def test_cut_capture_from_the_command_line(tmp_path):
    src = os.path.join(CORPUS, "afs.pcap")
    ng = tmp_path / "afs.pcapng"
    run("editcap", "-F", "pcapng", src, str(ng))
    ng.write_bytes(ng.read_bytes()[:-50])
    cp = lpd_cli(ng, *EVERY_LOCAL)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr
    assert cp.stderr.count("\n") == 1 and "truncated dump file" in cp.stderr and str(ng) in cp.stderr
    assert cp.stdout.splitlines()[0].endswith("; 600 frames copied to lpd"), cp.stdout


def test_a_capture_cut_at_a_record_boundary_is_whole(tmp_path, capsys):
    path = tmp_path / "x.pcap"
    write_pcap(path, [(i, 5, FRAMES[0]) for i in range(2)])
    assert lpd.main(["-r", str(path)]) == 0
    assert capsys.readouterr().err == ""
    ng = tmp_path / "x.pcapng"
    ng.write_bytes(shb("<") + idb("<") + epb("<", 0, 1, FRAMES[0]))
    assert lpd.main(["-r", str(ng)]) == 0
    assert capsys.readouterr().err == ""


# ---- corrupt -----------------------------------------------------------------------

LE = "<"
HEAD = shb(LE) + idb(LE)
AT = f"byte {len(HEAD)}: "                  # the block after HEAD
CORRUPT = {
    "classic caplen 2^31": (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
                            + struct.pack("<IIII", 1, 0, 2**31, 2**31) + bytes(64),
                            "byte 24: record 1: capture length 2147483648 is corrupt"),
    "block length 2^31": (HEAD + struct.pack("<II", EPB, 2**31) + bytes(64),
                          AT + "block of type 0x6: length 2147483648 is more than"),
    "block length 4 GiB - 4": (HEAD + struct.pack("<II", CUSTOM, 2**32 - 4) + bytes(64),
                               "length 4294967292 is more than"),
    "length not a multiple of 4": (HEAD + struct.pack("<II", CUSTOM, 13) + bytes(64),
                                   AT + "block of type 0xbad: length 13 is not a multiple of 4"),
    "length shorter than a block": (HEAD + struct.pack("<II", CUSTOM, 8) + bytes(64),
                                    "length 8 is shorter than its header (12)"),
    "EPB shorter than its header": (HEAD + block(LE, EPB, bytes(8)),
                                    "length 20 is shorter than its header (32)"),
    "EPB caplen 2^31": (HEAD + block(LE, EPB, struct.pack("<IIIII", 0, 0, 0, 2**31, 2**31) + bytes(64)),
                        AT + "capture length 2147483648 is corrupt"),
    "EPB caplen past its block": (HEAD + block(LE, EPB, struct.pack("<IIIII", 0, 0, 0, 80, 80) + bytes(64)),
                                  "capture length 80 is corrupt (more than 64)"),
    "byte-order magic": (block(LE, SHB, struct.pack("<IHHq", 0x12345678, 1, 0, -1)),
                         "byte 0: not pcapng (byte-order magic 0x78563412)"),
    "lengths differ": (HEAD + block(LE, CUSTOM, bytes(8))[:-4] + struct.pack("<I", 24),
                       AT + "block of type 0xbad: its two lengths differ"),
    "version 2": (shb(LE, major=2), "byte 0: pcapng version 2.0, not 1.x"),
    "interface not described": (HEAD + epb(LE, 3, 0, FRAMES[0]),
                                AT + "a packet of interface 3, but the section describes 1"),
    "interface of the last section": (HEAD + shb(LE) + epb(LE, 0, 0, FRAMES[0]),
                                      "a packet of interface 0, but the section describes 0"),
    "SPB before any interface": (shb(LE) + spb(LE, FRAMES[0]),
                                 "simple packet block before any interface description"),
    "option overruns": (shb(LE) + block(LE, IDB, struct.pack("<HHIHH", 1, 0, 0, 9, 40) + bytes(4)),
                        "interface 0: option 9 of 40 bytes overruns its block"),
    "raw IP interface": (HEAD + idb(LE, linktype=101),
                         f"interface 1 (byte {len(HEAD)}): link type 101 is not Ethernet (DLT_EN10MB)"),
    "section header cut": (shb(LE)[:20], f"section header cut short (20 of {len(shb(LE))} bytes)"),
    "section header head cut": (shb(LE)[:7], "section header cut short (7 of 12 bytes)"),
}


def test_the_memory_limit_bites():
    """Without this, the corrupt-file runs below would not notice a huge allocation."""
    cp = subprocess.run(["prlimit", f"--as={AS_LIMIT}", sys.executable, "-c", "bytearray(2**31)"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode != 0 and "MemoryError" in cp.stderr


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_capture_is_one_line_exit_78(tmp_path, case):
    content, message = CORRUPT[case]
    path = tmp_path / "bad.pcapng"
    path.write_bytes(content)
    cp = lpd_cli(path, limit=AS_LIMIT)
    assert cp.returncode == 78, cp.stderr
    assert cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr
    assert cp.stderr.startswith(f"lpd: {path}: ") and message in cp.stderr, cp.stderr
    assert cp.stdout == ""
