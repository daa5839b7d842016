"""The command line as an operator meets it: filter dumps beside tcpdump's, usage errors."""
import os
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
    assert "vlanp" in cp.stdout or "vlan_avail" in cp.stdout or "#0xfffff030" in cp.stdout, cp.stdout
    assert cp.stdout != lpd("-d", "vlan 7").stdout


@pytest.mark.parametrize("args,code,text", [
    (["--no-such"], 64, "unrecognized arguments"),
    (["extra-word"], 64, "a filter expression goes with -d or -F"),
    (["--kernel"], 64, "--kernel goes with -d"),
    (["--web.listen-address", "nowhere"], 64, "expected HOST:PORT"),
    (["-b", "12"], 64, "ring size must be at least 64 KiB"),
    (["-r", "/nonexistent.pcap"], 1, ""),
])
def test_usage_errors(args, code, text):
    cp = lpd(*args)
    if code == 1:
        assert cp.returncode != 0 and cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr
        return
    assert cp.returncode == code, cp.stderr
    assert text in cp.stderr and cp.stderr.count("\n") == 1 and cp.stderr.startswith("lpd: ")


def test_version_and_help():
    assert lpd("--version").stdout.startswith("lpd ")
    out = lpd("-h").stdout
    for flag in ("-i", "--local-net", "--web.listen-address", "--interval", "--mapping-url",
                 "-b", "--promisc", "-r", "-f", "-F", "-u", "--socket-group", "-d", "--kernel"):
        assert flag in out
