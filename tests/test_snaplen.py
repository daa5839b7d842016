"""program_snaplen(): cutting a frame to the computed length never changes a program's
verdict. Checked on libpcap's own programs (so it holds whatever compiled them) and on
lpd's, over the corpus and generated frames, with libpcap's C interpreter as the judge."""
import glob
import os
import random

import pytest

import libpcap_oracle as oracle
import lpd
import packets
from conftest import CORPUS

pytestmark = pytest.mark.offline

EXPRESSIONS = os.path.join(os.path.dirname(__file__), "filter_expressions.txt")


def expressions():
    with open(EXPRESSIONS) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def corpus_frames():
    frames = []
    for path in sorted(glob.glob(os.path.join(CORPUS, "*.pcap"))):
        frames += [(data, wirelen) for _, wirelen, data in lpd.read_pcap(path)]
    rng = random.Random(4)
    frames = rng.sample(frames, min(len(frames), 2500))     # every program meets every frame:
    frames += [packets.random_frame(rng, truncated=False) for _ in range(1500)]   # keep it bounded
    return frames


def programs():
    """Each distinct program once: libpcap's and lpd's are mostly the same instructions."""
    seen = set()
    for expr in expressions():
        for compile_ in (oracle.compile, lpd.compile_filter):
            try:
                prog = tuple(tuple(insn) for insn in compile_(expr))
            except (oracle.OracleError, lpd.FilterError):
                continue
            if prog not in seen:
                seen.add(prog)
                yield expr, list(prog)


def test_cut_frames_decide_like_whole_frames():
    frames = corpus_frames()
    checked, lengths = 0, set()
    for expr, prog in programs():
        n = lpd.program_snaplen(prog)
        lengths.add(n)
        for data, wirelen in frames:
            if len(data) > n:
                assert oracle.bpf_filter(prog, data[:n], wirelen) == oracle.bpf_filter(prog, data, wirelen), \
                    (expr, n, data.hex())
        checked += 1
    assert checked >= 350
    assert min(lengths) < 64 and max(lengths) == lpd.SNAPLEN_FULL   # bounds are real, loops are not


def test_known_bounds():
    assert lpd.program_snaplen(lpd.compile_filter("ip")) == 14          # ethertype only
    assert lpd.program_snaplen(lpd.compile_filter("greater 100")) == 0   # the length is not a byte
    # tcp port 80: IPv6 ports at 54..58; IPv4 at [x + 16] with x <= 60 -> 78
    assert lpd.program_snaplen(lpd.compile_filter("tcp port 80")) == 78
    assert lpd.program_snaplen(lpd.compile_filter("ip6 protochain 6")) == lpd.SNAPLEN_FULL
