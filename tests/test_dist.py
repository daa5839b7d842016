"""dist/: the systemd template unit and the node_exporter textfile script."""
import os
import pathlib
import re
import shutil
import socket
import stat
import subprocess
import threading

import pytest

import lpd

DIST = pathlib.Path(__file__).resolve().parent.parent / "dist"
UNIT = DIST / "lpd@.service"
TEXTFILE = DIST / "lpd-textfile.sh"


# --- systemd unit -------------------------------------------------------------------

def verify(unit_text, tmp_path, instance="eth0"):
    """systemd-analyze verify on the unit instantiated as lpd@<instance>.service.

    `lpd` is not installed where the test runs, so ExecStart's bare `lpd` is pointed at
    a stand-in executable (only that word changes). Returns the problems reported:
    verify exits 0 on unknown keys, so anything it prints counts as a problem.
    """
    fake = tmp_path / "bin" / "lpd"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = re.sub(r"(?m)^ExecStart=lpd ", f"ExecStart={fake} ", unit_text)
    path = tmp_path / f"lpd@{instance}.service"
    path.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    problems = (r.stdout + r.stderr).strip()
    if r.returncode != 0 and not problems:
        problems = f"exit {r.returncode}"
    return problems


def unit_settings():
    """[section] -> {key: [values]} of the unit file (repeated keys kept)."""
    out, section = {}, None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        k, v = line.split("=", 1)
        section.setdefault(k, []).append(v)
    return out


@pytest.fixture(scope="module")
def analyze():
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is required (apt-get install systemd)")


def test_unit_verifies(analyze, tmp_path):
    assert verify(UNIT.read_text(), tmp_path) == ""


def test_unit_verifies_for_an_escaped_interface_name(analyze, tmp_path):
    # systemctl start lpd@$(systemd-escape br-lan)  ->  lpd@br\x2dlan.service
    assert verify(UNIT.read_text(), tmp_path, instance="br\\x2dlan") == ""


BREAKAGES = [
    ("unknown key", lambda t: t.replace("Type=notify", "Type=notify\nCapabilitySet=CAP_NET_RAW")),
    ("bad value", lambda t: t.replace("Type=notify", "Type=notifyy")),
    ("missing executable", lambda t: t.replace("ExecStart=lpd ", "ExecStart=/nonexistent/lpd ")),
    ("relative path in EnvironmentFile",
     lambda t: t.replace("EnvironmentFile=-/etc/default/lpd", "EnvironmentFile=etc/default/lpd")),
]


@pytest.mark.parametrize("name,breakit", BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_verify_catches_a_broken_unit(analyze, tmp_path, name, breakit):
    broken = breakit(UNIT.read_text())
    assert broken != UNIT.read_text()
    assert verify(broken, tmp_path) != ""


def test_unit_contract():
    u = unit_settings()
    unit, svc = u["Unit"], u["Service"]
    assert svc["Type"] == ["notify"]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["Restart"] == ["on-failure"]
    assert set(svc["RestartPreventExitStatus"][0].split()) == {"78", "64"}
    assert lpd.ConfigError.exit_code == 78 and lpd.UsageError.exit_code == 64
    assert svc["DynamicUser"] == ["yes"]
    assert svc["AmbientCapabilities"] == ["CAP_NET_RAW"]
    assert svc["CapabilityBoundingSet"] == ["CAP_NET_RAW"]
    assert unit["BindsTo"] == ["sys-subsystem-net-devices-%i.device"]
    assert "sys-subsystem-net-devices-%i.device" in unit["After"][0].split()
    assert svc["EnvironmentFile"] == ["-/etc/default/lpd", "-/etc/lpd/%I.env"]
    assert svc["Environment"] == ['"LPD_FILTER_ARGS=-f /etc/lpd/%I.filters"']
    exec_start = svc["ExecStart"][0].split()
    assert exec_start[:3] == ["lpd", "-i", "%I"]
    assert "$LPD_FILTER_ARGS" in exec_start and "$LPD_ARGS" in exec_start
    # One instance stopping must not delete the shared /run/lpd with the others' sockets.
    assert svc["RuntimeDirectory"] == ["lpd"]
    assert svc["RuntimeDirectoryPreserve"] == ["yes"]
    assert svc["User"] == ["lpd"]            # all instances share one dynamic user
    assert lpd.default_socket_path("%I") == "/run/lpd/%I.sock"


# --- textfile script ----------------------------------------------------------------

def run_textfile(*args, env=None, shell="sh"):
    return subprocess.run([shell, str(TEXTFILE), *args], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})})


@pytest.fixture
def server(tmp_path):
    servers = []

    def start(snap, name="eth0.sock"):
        srv = lpd.RuleSocketServer(str(tmp_path / name), lambda: list(snap)).start()
        servers.append(srv)
        return srv.path
    yield start
    for s in servers:
        s.close()


SNAP = [('type="arp",subtype="request",who="me"', 450, 10),
        ('type="icmp6",subtype="neigh-sol"', 100, 4),
        ("arp-req", 120, 30),
        ('we"ird\\id', 1, 2)]
# bpfcountd's prometheus_txtfile.sh lines (packets first, then bytes, per rule), ids that
# are no label list as rule="..." (bpfcountd's text there was unparseable).
WANT = """\
bpfcountd_packets{iface="eth0",type="arp",subtype="request",who="me"} 10
bpfcountd_bytes{iface="eth0",type="arp",subtype="request",who="me"} 450
bpfcountd_packets{iface="eth0",type="icmp6",subtype="neigh-sol"} 4
bpfcountd_bytes{iface="eth0",type="icmp6",subtype="neigh-sol"} 100
bpfcountd_packets{iface="eth0",rule="arp-req"} 30
bpfcountd_bytes{iface="eth0",rule="arp-req"} 120
bpfcountd_packets{iface="eth0",rule="we\\"ird\\\\id"} 2
bpfcountd_bytes{iface="eth0",rule="we\\"ird\\\\id"} 1
"""


@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_textfile_stdout(server, shell):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    r = run_textfile(server(SNAP), shell=shell)
    assert r.returncode == 0, r.stderr
    assert r.stdout == WANT


def test_textfile_parses_as_prometheus_text(server):
    parser = pytest.importorskip("prometheus_client.parser")
    r = run_textfile(server(SNAP))
    samples = {(s.name, s.labels.get("rule"), s.labels.get("type")): s.value
               for f in parser.text_string_to_metric_families(r.stdout) for s in f.samples}
    assert len(samples) == 2 * len(SNAP)
    assert samples[("bpfcountd_bytes", "arp-req", None)] == 120
    assert samples[("bpfcountd_packets", 'we"ird\\id', None)] == 2


def test_textfile_iface_from_bpfcountd_style_path(server):
    r = run_textfile(server(SNAP[:1], name="bpfcountd.eth0.100.sock"))
    assert r.stdout.splitlines()[0].startswith('bpfcountd_packets{iface="eth0.100",')
    r = run_textfile(server(SNAP[:1], name="x.sock"), env={"IFACE": "wan"})
    assert r.stdout.splitlines()[0].startswith('bpfcountd_packets{iface="wan",')


def test_textfile_writes_atomically(server, tmp_path):
    out_dir = tmp_path / "textfile"
    out_dir.mkdir()
    out = out_dir / "lpd-eth0.prom"
    out.write_text("old\n")
    ino = out.stat().st_ino
    r = run_textfile(server(SNAP), str(out))
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert out.read_text() == WANT
    assert out.stat().st_ino != ino                            # replaced by rename, not rewritten
    assert stat.S_IMODE(out.stat().st_mode) == 0o644           # node_exporter can read it
    assert os.listdir(out_dir) == ["lpd-eth0.prom"]            # no temporary left


def test_textfile_keeps_old_file_when_lpd_is_down(tmp_path):
    out = tmp_path / "lpd-eth0.prom"
    out.write_text("old\n")
    r = run_textfile(str(tmp_path / "nothing.sock"), str(out))
    assert r.returncode != 0
    assert out.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["lpd-eth0.prom"]


def one_shot_server(path, payload):
    """A unix socket that sends payload to one client (a broken 'lpd')."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(10)

    def serve():
        try:
            c, _ = srv.accept()
            c.sendall(payload)
            c.close()
        finally:
            srv.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("payload", [b"a:1:1\nb:2\n", b"a:1:x\n", b":1:1\n", b"garbage\n"])
def test_textfile_keeps_old_file_on_a_malformed_dump(tmp_path, payload):
    sock = str(tmp_path / "eth0.sock")
    t = one_shot_server(sock, payload)
    out = tmp_path / "lpd-eth0.prom"
    out.write_text("old\n")
    r = run_textfile(sock, str(out))
    t.join(10)
    assert r.returncode != 0 and "malformed" in r.stderr
    assert out.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["eth0.sock", "lpd-eth0.prom"]


def test_textfile_with_no_rules_writes_an_empty_file(server, tmp_path):
    out = tmp_path / "lpd.prom"
    r = run_textfile(server([]), str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_text() == ""
