"""The command line as an operator meets it: filter dumps beside tcpdump's, usage errors."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

import lpd as lpd_module

from conftest import CORPUS
from harness import LPD


def lpd(*args):
    return subprocess.run([sys.executable, LPD, *args], capture_output=True, text=True, timeout=60)


def tcpdump(flag, expr):
    cp = subprocess.run(["tcpdump", "-y", "EN10MB", flag, expr],
                        capture_output=True, text=True, timeout=60)
    # Without a savefile tcpdump still prints the program before complaining about it.
    assert cp.stdout, cp.stderr
    return cp.stdout


@pytest.mark.offline
@pytest.mark.parametrize("flag", ["-d", "-dd", "-ddd"])
@pytest.mark.parametrize("expr", ["tcp port 80", "vlan 10 and udp", "icmp6 or arp",
                                  "ip[6:2] & 0x1fff = 0 and tcp[tcpflags] & tcp-syn != 0"])
def test_dump_equals_tcpdump(flag, expr):
    cp = lpd(flag, *expr.split())
    assert cp.returncode == 0 and cp.stderr == ""
    assert cp.stdout == tcpdump(flag, expr)


@pytest.mark.offline
def test_bad_expression_is_one_line_exit_64():
    cp = lpd("-d", "tcp port foo")
    assert cp.returncode == 64
    assert cp.stderr == "lpd: filter: 1:10: expected a port number after 'port', got 'foo'\n"
    assert cp.stdout == ""


@pytest.mark.offline
def test_kernel_target_uses_ancillary_vlan_loads():
    cp = lpd("-d", "--kernel", "vlan 7")
    assert cp.returncode == 0
    lines = cp.stdout.splitlines()
    # The tag is stripped before the kernel filter runs: its presence and TCI are
    # ancillary loads (SKF_AD_VLAN_TAG_PRESENT, SKF_AD_VLAN_TAG), as libpcap emits them.
    assert lines[0] == "(000) ldb      [vlanp]", cp.stdout
    assert any(line.endswith("ldb      [vlan_tci]") for line in lines), cp.stdout
    assert "vlanp" not in lpd("-d", "vlan 7").stdout


@pytest.mark.parametrize("args,code,text", [
    (["--no-such"], 64, "unrecognized arguments"),
    (["extra-word"], 64, "a filter expression goes with -d or -F"),
    (["--kernel"], 64, "--kernel goes with -d"),
    (["--web.listen-address", "nowhere"], 64, "expected HOST:PORT"),
    (["-b", "12"], 64, "ring size must be at least 64 KiB"),
    # tcpdump refuses 'net 10.0.0.1/8' too: the host bits are likely a typo. With -r, an
    # lpd that accepted the flag would fail on the file (78), never start capturing.
    (["-r", "/nonexistent.pcap", "--local-net", "10.0.0.1/8"], 64,
     "lpd: argument --local-net: 10.0.0.1/8 has host bits set (the network is 10.0.0.0/8)\n"),
    (["-r", "/nonexistent.pcap", "--local-net", "fd00:199::2/64"], 64,
     "lpd: argument --local-net: fd00:199::2/64 has host bits set (the network is fd00:199::/64)\n"),
    (["-r", "/nonexistent.pcap", "--local-net", "10.0.0.0/33"], 64, "argument --local-net: "),
    (["-r", "/nonexistent.pcap"], 78, "/nonexistent.pcap: No such file or directory"),
])
@pytest.mark.offline
def test_usage_errors(args, code, text):
    cp = lpd(*args)
    assert cp.returncode == code, cp.stderr
    assert text in cp.stderr and cp.stderr.count("\n") == 1 and cp.stderr.startswith("lpd: ")


@pytest.mark.offline
def test_version_and_help():
    assert lpd("--version").stdout.startswith("lpd ")
    out = lpd("-h").stdout
    # Each flag as a whole word: "-i" must not be found inside "--idle-timeout".
    shown = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w.-]*)", out))
    for flag in ("-i", "--local-net", "--web.listen-address", "--interval", "--mapping-url",
                 "-b", "--promisc", "-r", "-f", "-F", "-u", "--socket-group", "-d", "--kernel"):
        assert flag in shown, flag


# RLIMIT_AS in bytes: util-linux's prlimit crashes on its own suffixes ("512M") here.
AS_LIMIT = 512 << 20
PROMPT = 5.0              # seconds: parsing the command line, nothing more


def physical_memory():
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.live
def test_ring_beyond_the_memory_limit_is_refused_at_once():
    """-b 100g once stalled 52 s in the kernel, then the OOM killer took other processes."""
    sizes = [f"{(physical_memory() >> 30) + 1}g"]
    if physical_memory() < 400 << 30:
        sizes.append("100g")                  # the size, where it is too big
    for size in sizes:
        # In an empty network namespace an lpd that took the size would find no
        # interface (exit 78) before asking the kernel for the ring; RLIMIT_AS bounds
        # what the process itself could map.
        t0 = time.monotonic()
        cp = subprocess.run(["unshare", "--net", "prlimit", f"--as={AS_LIMIT}",
                             sys.executable, LPD, "-b", size],
                            capture_output=True, text=True, timeout=60)
        assert time.monotonic() - t0 < PROMPT
        assert cp.returncode == 64, cp.stderr
        assert cp.stderr.startswith(f"lpd: argument -b: ring size '{size}' is more than "
                                    f"1/{lpd_module.RING_MAX_MEMORY_DIVISOR} of physical memory")
        assert cp.stderr.count("\n") == 1


@pytest.mark.offline
def test_ring_limit_boundary():
    limit = physical_memory() // lpd_module.RING_MAX_MEMORY_DIVISOR
    # With -r on a missing file, a size that passes fails on the file (78), capturing nothing.
    assert lpd("-r", "/nonexistent.pcap", "-b", str(limit)).returncode == 78
    cp = lpd("-r", "/nonexistent.pcap", "-b", str(limit + 1))
    assert cp.returncode == 64 and "of physical memory" in cp.stderr


@pytest.mark.offline
def test_readme_documents_the_ring_limit():
    readme = os.path.join(os.path.dirname(LPD), "README.md")
    row = [line for line in open(readme) if line.startswith("| `-b BYTES`")]
    assert len(row) == 1
    assert f"1/{lpd_module.RING_MAX_MEMORY_DIVISOR} of physical memory" in row[0], row[0]


@pytest.mark.parametrize("expr,what,limit", [
    ("host 10.0.0.1 or " * 4000 + "arp", "characters", "FILTER_MAX_CHARS"),
    (" or ".join(f"port {i + 1}" for i in range(300)), "blocks of code", "FILTER_MAX_BLOCKS"),
])
@pytest.mark.offline
def test_too_large_expression_is_one_line_exit_64(expr, what, limit):
    """Refused before the work it would take: under a memory limit, promptly (the old
    compiler took minutes and gigabytes on expressions like these)."""
    cp = subprocess.run(["prlimit", f"--as={AS_LIMIT}", sys.executable, LPD, "-d", expr],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 64, cp.stderr[-300:]
    assert re.fullmatch(rf"lpd: filter: 1:1: expression too large \(\d+ {what}, "
                        rf"at most {getattr(lpd_module, limit)}\)\n", cp.stderr), cp.stderr
    assert cp.stdout == ""


@pytest.mark.offline
def test_help_names_top_signals_exit_codes_and_the_manual():
    cp = lpd("--help")
    assert cp.returncode == 0
    for needle in ("lpd top", "HUP", "USR1", "64 usage", "69 metrics port in use",
                   "77 no permission", "78 bad configuration", "man 8 lpd", "README.md",
                   "--wait-interface", "--filter-file-optional", "--mac"):
        assert needle in cp.stdout, needle


@pytest.mark.offline
def test_missing_prometheus_client_is_one_line():
    """python3 -S: no site-packages, so no prometheus_client, as on a box where only
    lpd.py was copied."""
    cp = subprocess.run([sys.executable, "-S", LPD, "-i", "lo", "--duration", "1",
                         "--engine", "cbpf"], capture_output=True, text=True, timeout=60)
    assert (cp.returncode, cp.stderr) == (78, (
        "lpd: needs the prometheus_client module: apt install python3-prometheus-client "
        "(Debian, Ubuntu), or pip install lpd-netacct\n"))


@pytest.mark.offline
def test_mac_names_dollar_mac_offline(tmp_path):
    """-r has no interface to take $MAC from: the error says what to give, and --mac
    gives it (matching what a frame to that address carries)."""
    rules = tmp_path / "r.filters"
    rules.write_text("to-me;ether dst $MAC\n")
    pcap = os.path.join(CORPUS, "DTP.pcap")
    missing = lpd("-r", pcap, "-f", str(rules))
    assert (missing.returncode, missing.stderr) == (78, (
        f"lpd: {rules}:1: $MAC used but no MAC address is known: give -i IFACE (its address) "
        "or --mac MAC\n"))
    bad = lpd("-r", pcap, "-f", str(rules), "--mac", "02:00:00")
    assert bad.returncode == 64 and "expected a MAC address" in bad.stderr
    with open(pcap, "rb") as f:
        dst = f.read(24 + 16 + 6)[-6:]           # the first record's destination MAC
    mac = ":".join(f"{b:02x}" for b in dst)
    out = lpd("-r", pcap, "-f", str(rules), "--mac", mac.upper().replace(":", "-"),
              "--output", "json")
    assert out.returncode == 0, out.stderr
    counts = {r["id"]: r["packets"] for r in json.loads(out.stdout)["rules"]["rules"]}
    oracle = subprocess.run(["tcpdump", "-nn", "-q", "-r", pcap, f"ether dst {mac}"],
                            capture_output=True, text=True, timeout=60).stdout
    assert counts["to-me"] == len(oracle.splitlines()) > 0


@pytest.mark.offline
def test_dollar_mac_offline_from_an_interface_that_is_not_there(tmp_path):
    """-r -i IFACE takes $MAC from IFACE: one that does not exist is an error, never a
    stand-in address (that is --wait-interface's, for a live lpd only)."""
    rules = tmp_path / "r.filters"
    rules.write_text("to-me;ether dst $MAC\n")
    cp = lpd("-r", os.path.join(CORPUS, "DTP.pcap"), "-i", "nosuch0", "--local-net", "10.0.0.0/8",
             "-f", str(rules))
    assert cp.returncode == 78 and cp.stderr.startswith("lpd: nosuch0: cannot read the MAC address"), \
        cp.stderr
