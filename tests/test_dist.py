"""dist/: the systemd template unit and the node_exporter textfile script."""
import grp
import inspect
import os
import pathlib
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

import lpd
import netns

DIST = pathlib.Path(__file__).resolve().parent.parent / "dist"
LPD = str(DIST.parent / "lpd.py")
UNIT = DIST / "lpd@.service"
TEXTFILE = DIST / "lpd-textfile.sh"


# --- systemd unit -------------------------------------------------------------------

def instantiate(unit_text, tmp_path, instance="eth0"):
    """The unit written as tmp_path/lpd@<instance>.service, for systemd-analyze.

    lpd is not installed where the test runs, so ExecStart's /usr/sbin/lpd is pointed
    at a stand-in executable (only that word changes, as `make install` changes it).
    """
    fake = tmp_path / "bin" / "lpd"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = re.sub(r"(?m)^ExecStart=/usr/sbin/lpd ", f"ExecStart={fake} ", unit_text)
    path = tmp_path / f"lpd@{instance}.service"
    path.write_text(text)
    return path


def verify(unit_text, tmp_path, instance="eth0"):
    """systemd-analyze verify on the unit instantiated as lpd@<instance>.service.

    Returns the problems reported: verify exits 0 on unknown keys, so anything it
    prints counts as a problem. It also runs `man` on Documentation=man:lpd(8): the
    repository's page, as installed, is the one it finds.
    """
    path = instantiate(unit_text, tmp_path, instance)
    man8 = tmp_path / "man" / "man8"
    man8.mkdir(parents=True, exist_ok=True)
    shutil.copy(DIST / "lpd.8", man8 / "lpd.8")
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0",
                                                   "MANPATH": str(man8.parent)})
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


@pytest.mark.offline
def test_unit_verifies(analyze, tmp_path):
    assert verify(UNIT.read_text(), tmp_path) == ""


@pytest.mark.offline
def test_unit_verifies_for_an_escaped_interface_name(analyze, tmp_path):
    # systemctl start lpd@$(systemd-escape br-lan)  ->  lpd@br\x2dlan.service
    assert verify(UNIT.read_text(), tmp_path, instance="br\\x2dlan") == ""


BREAKAGES = [
    ("unknown key", lambda t: t.replace("Type=notify", "Type=notify\nCapabilitySet=CAP_NET_RAW")),
    ("bad value", lambda t: t.replace("Type=notify", "Type=notifyy")),
    ("missing executable",
     lambda t: t.replace("ExecStart=/usr/sbin/lpd ", "ExecStart=/nonexistent/lpd ")),
    ("missing man page", lambda t: t.replace("man:lpd(8)", "man:lpd-nonexistent(8)")),
    ("relative path in EnvironmentFile",
     lambda t: t.replace("EnvironmentFile=-/etc/default/lpd", "EnvironmentFile=etc/default/lpd")),
    ("unknown system call group",
     lambda t: t.replace("SystemCallFilter=@system-service", "SystemCallFilter=@system-servic")),
    ("bad LimitNOFILE", lambda t: t.replace("LimitNOFILE=1024", "LimitNOFILE=lots")),
]


@pytest.mark.offline
@pytest.mark.parametrize("name,breakit", BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_verify_catches_a_broken_unit(analyze, tmp_path, name, breakit):
    broken = breakit(UNIT.read_text())
    assert broken != UNIT.read_text()
    assert verify(broken, tmp_path) != ""


@pytest.mark.offline
def test_unit_contract():
    u = unit_settings()
    unit, svc = u["Unit"], u["Service"]
    assert svc["Type"] == ["notify"]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["Restart"] == ["on-failure"]
    assert set(svc["RestartPreventExitStatus"][0].split()) == {"78", "64"}
    assert lpd.ConfigError.exit_code == 78 and lpd.UsageError.exit_code == 64
    assert svc["DynamicUser"] == ["yes"]
    # CAP_BPF and CAP_PERFMON: the eBPF engine (--engine auto), which falls back to cbpf
    # without them (tests/test_deb.py runs it under this unit in a booted Debian).
    assert svc["AmbientCapabilities"] == ["CAP_NET_RAW CAP_BPF CAP_PERFMON"]
    assert svc["CapabilityBoundingSet"] == ["CAP_NET_RAW CAP_BPF CAP_PERFMON"]
    assert unit["After"] == ["network.target"]
    assert svc["EnvironmentFile"] == ["-/etc/default/lpd", "-/etc/lpd/%I.env"]
    assert unit["Documentation"] == ["man:lpd(8)"]
    # An absolute path (`make install` writes its own PREFIX there); the interface may
    # come later and the filter file may be missing: both are waited for, not exit 78.
    exec_start = svc["ExecStart"][0].split()
    assert exec_start == ["/usr/sbin/lpd", "-i", "%I", "--wait-interface",
                          "-f", "/etc/lpd/%I.filters", "--filter-file-optional", "$LPD_ARGS"]
    assert "Environment" not in svc
    # One instance stopping must not delete the shared /run/lpd with the others' sockets.
    assert svc["RuntimeDirectory"] == ["lpd"]
    assert svc["RuntimeDirectoryPreserve"] == ["yes"]
    assert svc["User"] == ["lpd"]            # all instances share one dynamic user
    assert lpd.default_socket_path("%I") == "/run/lpd/%I.sock"


# Every dependency that ties the service to another unit's state or orders it.
DEPENDENCY_KEYS = ("Requires", "Requisite", "Wants", "BindsTo", "PartOf", "Upholds",
                   "After", "Before", "Conflicts", "OnFailure", "OnSuccess", "PropagatesStopTo",
                   "StopPropagatedFrom", "JoinsNamespaceOf")


@pytest.mark.offline
def test_unit_does_not_depend_on_the_device_unit():
    # lpd waits for its interface itself (keeping its counters while it is gone); a
    # device dependency stops it for good when the interface goes and, without udev
    # (containers), fails the start with "Dependency failed".
    u = unit_settings()
    for key in DEPENDENCY_KEYS:
        for v in u["Unit"].get(key, []):
            assert not any(w.endswith(".device") for w in v.split()), f"{key}={v}"


@pytest.mark.offline
def test_unit_limits_file_descriptors():
    limit = unit_settings()["Service"]["LimitNOFILE"]
    assert len(limit) == 1 and limit[0].isdigit(), limit   # one number: soft = hard
    # Far below the default hard limit (524288), yet room for lpd's own fds, every
    # rule-socket client lpd keeps (max_clients) and hundreds of metrics connections;
    # test_unit_syscall_filter_admits_a_live_lpd measures lpd's own.
    max_clients = inspect.signature(lpd.RuleSocketServer).parameters["max_clients"].default
    assert max_clients + 256 <= int(limit[0]) <= 65536


@pytest.mark.offline
def test_unit_filters_system_calls():
    svc = unit_settings()["Service"]
    assert svc["SystemCallFilter"][0] == "@system-service"
    assert svc["SystemCallArchitectures"] == ["native"]


def exposure(unit_text, tmp_path):
    """(overall exposure, report) of systemd-analyze security --offline on the unit."""
    path = instantiate(unit_text, tmp_path)
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"})
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m.group(1)), r.stdout


@pytest.mark.offline
def test_unit_security_exposure(analyze, tmp_path):
    score, report = exposure(UNIT.read_text(), tmp_path)
    # Issue 23 asks for 3.0 at most; measured 1.9 (systemd 252) with ProtectProc=,
    # PrivateMounts= and MemoryDenyWriteExecute=: a setting lost shows here.
    assert score <= 2.0, report
    assert "does not filter system calls" not in report, report
    # The filter is worth something only if the score sees it: without it, worse.
    without = "\n".join(line for line in UNIT.read_text().splitlines()
                        if not line.startswith("SystemCallFilter="))
    assert exposure(without, tmp_path)[0] > score


def syscall_groups():
    """{"@group": [members]} as this systemd defines them (systemd-analyze syscall-filter)."""
    r = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True,
                       text=True, timeout=60, check=True)
    groups, members = {}, None
    for line in r.stdout.splitlines():
        item = line.strip()
        if line.startswith("@"):
            members = groups.setdefault(item, [])
        elif item and not item.startswith("#") and members is not None:
            members.append(item)
    assert "@system-service" in groups and "bpf" in groups["@privileged"], r.stdout[:500]
    return groups


def expand(names, groups):
    out = set()
    for name in names:
        out |= expand(groups[name], groups) if name.startswith("@") else {name}
    return out


def allowed_syscalls(svc, groups):
    """What the unit's SystemCallFilter= lines let through: an allow list first, then
    each further line adds to it, or with '~' takes away (systemd's merging)."""
    lines = svc["SystemCallFilter"]
    assert not lines[0].startswith("~"), "the first SystemCallFilter= must be an allow list"
    allowed = set()
    for line in lines:
        deny = line.startswith("~")
        names = expand(line.lstrip("~").split(), groups)
        allowed = allowed - names if deny else allowed | names
    return allowed


STRACE_CALL = re.compile(r"^\d+\s+([A-Za-z_][A-Za-z0-9_]*)\(", re.M)


def wait_until(predicate, timeout, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


@pytest.mark.live
@pytest.mark.parametrize("workers", [[], ["--workers", "2", "--workers-pin"]],
                         ids=["one-process", "workers"])
def test_unit_syscall_filter_admits_a_live_lpd(analyze, tmp_path, workers):
    """Run lpd under strace -f through what the unit's lpd does (notify, capture with
    a kernel filter and promiscuous mode, rules, metrics, rule socket with a group,
    SIGHUP, interface loss and return, SIGTERM) and check every system call it made
    against the unit's SystemCallFilter=. A new call outside the filter (bpf(2) for an
    eBPF feature, sched_setaffinity, ...) fails here instead of killing the service
    with SIGSYS. Also checks LimitNOFILE= against the descriptors lpd holds."""
    if shutil.which("strace") is None:
        pytest.fail("strace is required (apt-get install strace)")
    svc = unit_settings()["Service"]
    assert "SystemCallFilter" in svc, "the unit sets no SystemCallFilter="
    allowed = allowed_syscalls(svc, syscall_groups())
    rules = tmp_path / "rules"
    rules.write_text("udp;udp\nicmp;icmp\nv6;ip6\nme;ether src $MAC\nlo;host localhost\n")
    trace, sock_path = tmp_path / "trace", str(tmp_path / "veth-b.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    err = tempfile.TemporaryFile()
    port = 59131
    with notify, err, netns.Pair() as pair:
        proc = pair.popen(pair.ns_b, [
            "strace", "-f", "-qq", "-o", str(trace), sys.executable, LPD,
            "-i", pair.if_b, "-f", str(rules), "-F", "ip or ip6 or arp", "--promisc",
            "-u", sock_path, "--socket-group", grp.getgrgid(os.getgid()).gr_name,
            "--web.listen-address", f"127.0.0.1:{port}", *workers],
            stderr=err, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})

        def stderr():
            err.seek(0)
            return err.read().decode(errors="replace")

        def dump():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.settimeout(5)
                c.connect(sock_path)
                out = b""
                while chunk := c.recv(65536):
                    out += chunk
            return out.decode()

        try:
            assert notify.recv(4096) == b"READY=1", stderr()
        except socket.timeout:
            pytest.fail(f"lpd never became ready: {stderr()}")
        children = pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        pid = int(children[0])                    # python lpd.py, strace's only child
        own_fds = len(os.listdir(f"/proc/{pid}/fd"))

        assert pair.ping(pair.ns_a, pair.ip4_b) and pair.ping(pair.ns_a, pair.ip6_b)
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100, 200])
        status, body = netns.http_get(pair.ns_b, "127.0.0.1", port, "/metrics")
        assert status == 200 and b"lpd_build_info" in body
        assert wait_until(lambda: "udp:0:0" not in dump(), 5), dump()

        rules.write_text(rules.read_text() + "tcp;tcp\n")
        os.kill(pid, signal.SIGHUP)
        assert wait_until(lambda: "tcp:0:0" in dump(), 20), stderr()

        pair.delete_link()
        assert wait_until(lambda: "counters kept" in stderr(), 20), stderr()
        pair.create_link()
        pair.settle()
        assert wait_until(lambda: "capturing again" in stderr(), 20), stderr()
        assert pair.ping(pair.ns_a, pair.ip4_b)

        os.kill(pid, signal.SIGTERM)
        assert proc.wait(30) == 0, stderr()

    text = trace.read_text()
    made = set(STRACE_CALL.findall(text))
    # The trace saw the real thing: the ring, its filter, the device, the netlink watch.
    assert {"socket", "setsockopt", "mmap", "ioctl", "bind", "sendto", "accept4"} <= made
    for needle in ("AF_PACKET", "PACKET_RX_RING", "SO_ATTACH_FILTER", "PACKET_ADD_MEMBERSHIP",
                   "AF_NETLINK", "READY=1") + (("PACKET_FANOUT", "sched_setaffinity") if workers else ()):
        assert needle in text, needle
    assert made & {"chown", "fchown", "fchownat", "lchown"}, "--socket-group's chown not traced"
    outside = sorted(made - allowed)
    assert not outside, f"lpd calls outside the unit's SystemCallFilter: {outside}"

    limit = int(svc["LimitNOFILE"][0])
    max_clients = inspect.signature(lpd.RuleSocketServer).parameters["max_clients"].default
    assert own_fds + max_clients + 256 <= limit, (own_fds, max_clients, limit)


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


@pytest.mark.offline
@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_textfile_stdout(server, shell):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    r = run_textfile(server(SNAP), shell=shell)
    assert r.returncode == 0, r.stderr
    assert r.stdout == WANT


@pytest.mark.offline
def test_textfile_parses_as_prometheus_text(server):
    parser = pytest.importorskip("prometheus_client.parser")
    r = run_textfile(server(SNAP))
    samples = {(s.name, s.labels.get("rule"), s.labels.get("type")): s.value
               for f in parser.text_string_to_metric_families(r.stdout) for s in f.samples}
    assert len(samples) == 2 * len(SNAP)
    assert samples[("bpfcountd_bytes", "arp-req", None)] == 120
    assert samples[("bpfcountd_packets", 'we"ird\\id', None)] == 2


# Ids that are no label list node_exporter accepts beside iface="...": pasted into the
# braces as bpfcountd's script does, each one makes node_exporter drop the whole file
# ("text format parsing error"). The script writes them as rule="<id>". (id, labels)
# with the labels node_exporter must end up with.
HARD = [
    ("type=arp", {"rule": "type=arp"}),                          # value not quoted
    ('a="1",a="2"', {"rule": 'a="1",a="2"'}),                    # a label twice
    ('iface="lan"', {"rule": 'iface="lan"'}),                    # clashes with our iface
    ('__name__="x"', {"rule": '__name__="x"'}),                  # reserved name
    ('__x="1"', {"rule": '__x="1"'}),                            # reserved prefix
    ('9a="1"', {"rule": '9a="1"'}),                              # bad label name
    ('ä="1"', {"rule": 'ä="1"'}),                                # bad label name
    ('a="1"}x{b="2"', {"rule": 'a="1"}x{b="2"'}),                # breaks out of the braces
    ('a="open', {"rule": 'a="open'}),                            # unterminated value
    ('a="1",', {"rule": 'a="1",'}),                              # trailing comma
    ('a="1"b="2"', {"rule": 'a="1"b="2"'}),                      # no comma
    ('a="t\\tab"', {"rule": 'a="t\\tab"'}),                      # escape the parser refuses
    ("x=", {"rule": "x="}),
    ("x:y", {"rule": "x:y"}),                                    # bpfcountd ids may hold ':'
    # label lists that are fine stay as they are
    ('q="say \\"hi\\" \\\\ bye\\n"', {"q": 'say "hi" \\ bye\n'}),
    ('v="ä"', {"v": "ä"}),
    ('e=""', {"e": ""}),
]
HARD_SNAP = [(i, 10 * n, n) for n, (i, _) in enumerate(HARD, 1)]
HARD_WANT = "".join(
    f'bpfcountd_packets{{iface="eth0",{lab}}} {n}\nbpfcountd_bytes{{iface="eth0",{lab}}} {10 * n}\n'
    for n, lab in enumerate(
        [i if "rule" not in want else 'rule="' + i.replace("\\", "\\\\").replace('"', '\\"') + '"'
         for i, want in HARD], 1))


@pytest.mark.offline
def test_textfile_writes_unacceptable_ids_as_rule_labels(server):
    r = run_textfile(server(HARD_SNAP))
    assert r.returncode == 0, r.stderr
    assert r.stdout == HARD_WANT
    parser = pytest.importorskip("prometheus_client.parser")
    got = [(s.name, s.labels, s.value)
           for f in parser.text_string_to_metric_families(r.stdout) for s in f.samples]
    want = []
    for n, (_, labels) in enumerate(HARD, 1):
        want += [("bpfcountd_packets", {"iface": "eth0", **labels}, n),
                 ("bpfcountd_bytes", {"iface": "eth0", **labels}, 10 * n)]
    assert got == want


AWKS = {"mawk": ["mawk"], "busybox": ["busybox", "awk"]}


@pytest.mark.offline
@pytest.mark.parametrize("awk", sorted(AWKS))
def test_textfile_with_each_awk(server, tmp_path, awk):
    # Debian's awk is mawk, OpenWrt's busybox: the same bytes from each.
    argv = AWKS[awk]
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} not installed")
    wrapper = tmp_path / "awk"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(argv) + ' "$@"\n')
    wrapper.chmod(0o755)
    r = run_textfile(server(SNAP + HARD_SNAP), env={"AWK": str(wrapper)})
    assert r.returncode == 0, r.stderr
    assert r.stdout == WANT + HARD_WANT


def node_exporter_binary():
    for name in ("prometheus-node-exporter", "node_exporter"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("node_exporter is required (apt-get install prometheus-node-exporter)")


def node_exporter_scrape(textfile_dir):
    """One scrape of a real node_exporter that runs only its textfile collector on
    textfile_dir, listening on a free loopback port; stopped by PID afterwards."""
    log = tempfile.TemporaryFile()
    p = subprocess.Popen([node_exporter_binary(), "--collector.disable-defaults",
                          "--collector.textfile", f"--collector.textfile.directory={textfile_dir}",
                          "--web.listen-address=127.0.0.1:0"],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        def port():
            log.seek(0)
            m = re.search(rb'msg="Listening on" address=127\.0\.0\.1:(\d+)', log.read())
            return m and int(m.group(1))
        assert wait_until(lambda: port() or p.poll() is not None, 15) and port(), \
            (log.seek(0), log.read())
        with urllib.request.urlopen(f"http://127.0.0.1:{port()}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        log.seek(0)
        return body, log.read().decode(errors="replace")
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
        log.close()


@pytest.mark.offline
def test_textfile_output_is_accepted_by_node_exporter(server, tmp_path):
    # What node_exporter itself makes of the file (its parser is Go's expfmt, stricter
    # than prometheus_client's): read without error, every rule's two samples there.
    parser = pytest.importorskip("prometheus_client.parser")
    out_dir = tmp_path / "textfile"
    out_dir.mkdir()
    r = run_textfile(server(SNAP + HARD_SNAP), str(out_dir / "lpd-eth0.prom"))
    assert r.returncode == 0, r.stderr
    body, log = node_exporter_scrape(out_dir)
    samples = [s for f in parser.text_string_to_metric_families(body) for s in f.samples]
    errors = [s.value for s in samples if s.name == "node_textfile_scrape_error"]
    assert errors == [0], log
    # node_exporter fills the labels a series lacks with "" (all series of a metric
    # get the same label names): compare without those.
    got = sorted((s.name, sorted((k, v) for k, v in s.labels.items() if v), s.value)
                 for s in samples if s.name.startswith("bpfcountd_"))
    want = []
    snap_labels = [{"type": "arp", "subtype": "request", "who": "me"},
                   {"type": "icmp6", "subtype": "neigh-sol"}, {"rule": "arp-req"},
                   {"rule": 'we"ird\\id'}]
    for (_, b, pk), labels in zip(SNAP + HARD_SNAP, snap_labels + [lab for _, lab in HARD]):
        lab = sorted((k, v) for k, v in {"iface": "eth0", **labels}.items() if v)
        want += [("bpfcountd_packets", lab, pk), ("bpfcountd_bytes", lab, b)]
    assert got == sorted(want)


@pytest.mark.offline
def test_textfile_iface_from_bpfcountd_style_path(server):
    r = run_textfile(server(SNAP[:1], name="bpfcountd.eth0.100.sock"))
    assert r.stdout.splitlines()[0].startswith('bpfcountd_packets{iface="eth0.100",')
    r = run_textfile(server(SNAP[:1], name="x.sock"), env={"IFACE": "wan"})
    assert r.stdout.splitlines()[0].startswith('bpfcountd_packets{iface="wan",')
    r = run_textfile(server(SNAP[:1], name="y.sock"), env={"IFACE": 'w"a\\n'})
    assert r.stdout.splitlines()[0].startswith('bpfcountd_packets{iface="w\\"a\\\\n",')


@pytest.mark.offline
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


@pytest.mark.offline
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


@pytest.mark.offline
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


@pytest.mark.offline
def test_textfile_with_no_rules_writes_an_empty_file(server, tmp_path):
    out = tmp_path / "lpd.prom"
    r = run_textfile(server([]), str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_text() == ""
