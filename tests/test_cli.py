"""The command line as an operator meets it: filter dumps beside tcpdump's, usage errors."""
import os
import re
import subprocess
import sys

import pytest

LPD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lpd.py")


def lpd(*args):
    return subprocess.run([sys.executable, LPD, *args], capture_output=True, text=True, timeout=60)


def tcpdump(flag, expr):
    cp = subprocess.run(["tcpdump", "-y", "EN10MB", flag, expr],
                        capture_output=True, text=True, timeout=60)
    # Without a savefile tcpdump still prints the program before complaining about it.
    assert cp.stdout, cp.stderr
    return cp.stdout


@pytest.mark.parametrize("flag", ["-d", "-dd", "-ddd"])
@pytest.mark.parametrize("expr", ["tcp port 80", "vlan 10 and udp", "icmp6 or arp",
                                  "ip[6:2] & 0x1fff = 0 and tcp[tcpflags] & tcp-syn != 0"])
def test_dump_equals_tcpdump(flag, expr):
    cp = lpd(flag, *expr.split())
    assert cp.returncode == 0 and cp.stderr == ""
    assert cp.stdout == tcpdump(flag, expr)


def test_bad_expression_is_one_line_exit_64():
    cp = lpd("-d", "tcp port foo")
    assert cp.returncode == 64
    assert cp.stderr == "lpd: filter: 1:10: expected a port number after 'port', got 'foo'\n"
    assert cp.stdout == ""


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
def test_usage_errors(args, code, text):
    cp = lpd(*args)
    assert cp.returncode == code, cp.stderr
    assert text in cp.stderr and cp.stderr.count("\n") == 1 and cp.stderr.startswith("lpd: ")


def test_version_and_help():
    assert lpd("--version").stdout.startswith("lpd ")
    out = lpd("-h").stdout
    # Each flag as a whole word: "-i" must not be found inside "--idle-timeout".
    shown = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w.-]*)", out))
    for flag in ("-i", "--local-net", "--web.listen-address", "--interval", "--mapping-url",
                 "-b", "--promisc", "-r", "-f", "-F", "-u", "--socket-group", "-d", "--kernel"):
        assert flag in shown, flag
