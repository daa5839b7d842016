"""The rule socket with real clients: Python sockets and openbsd `nc -U`.

Every wait is bounded in time and count; a hung server fails the test instead of
hanging the suite.
"""
import grp
import os
import socket
import stat
import subprocess
import threading
import time

import pytest

import lpd
from harness import wait_for


def rules(n, width=20):
    """A snapshot of n rules with ids long enough to make dumps of useful size."""
    return [(f"rule-{i:05d}-" + "x" * width, i * 1000 + 7, i) for i in range(n)]


def expected(snap):
    return "".join(f"{r}:{b}:{p}\n" for r, b, p in snap).encode()


def read_all(path, timeout=10.0):
    """Connect, read to EOF, return the bytes (bounded by timeout)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            b = s.recv(65536)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
        raise AssertionError("dump did not end in time")
    finally:
        s.close()


@pytest.fixture
def sockpath(tmp_path):
    return str(tmp_path / "run" / "lpd" / "eth0.sock")


@pytest.fixture
def serve(sockpath):
    """serve(snapshot_list_or_callable, **kw) -> started server; closed after the test."""
    servers = []

    def start(snap, path=sockpath, **kw):
        fn = snap if callable(snap) else (lambda: list(snap))
        srv = lpd.RuleSocketServer(path, fn, **kw).start()
        servers.append(srv)
        return srv
    yield start
    for s in servers:
        s.close()


@pytest.mark.unit
def test_python_client_gets_exact_lines_in_file_order(serve, sockpath):
    snap = [("arp-req", 450, 10), ("icmp6", 100, 4), ('type="arp",who="me"', 120, 30)]
    serve(snap)
    assert read_all(sockpath) == b"arp-req:450:10\nicmp6:100:4\ntype=\"arp\",who=\"me\":120:30\n"
    assert read_all(sockpath) == expected(snap)          # every connection gets a dump


@pytest.mark.unit
def test_nc_client(serve, sockpath):
    snap = rules(50)
    serve(snap)
    out = subprocess.run(["nc", "-U", sockpath], stdin=subprocess.DEVNULL,
                         capture_output=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected(snap)


@pytest.mark.unit
def test_no_rules_means_empty_dump(serve, sockpath):
    serve([])
    assert read_all(sockpath) == b""


@pytest.mark.unit
def test_socket_mode_group_and_parent_dir(serve, sockpath):
    gid = os.getgid()
    serve([], group=grp.getgrgid(gid).gr_name)
    st = os.stat(sockpath)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == gid
    # No temporary bind name is left next to it.
    assert os.listdir(os.path.dirname(sockpath)) == ["eth0.sock"]


@pytest.mark.live
@pytest.mark.skipif(os.geteuid() != 0, reason="chown to a foreign gid needs root")
def test_numeric_socket_group(serve, sockpath):
    serve([], group="4242")
    assert os.stat(sockpath).st_gid == 4242


@pytest.mark.unit
def test_unknown_group_is_a_config_error(sockpath):
    with pytest.raises(lpd.ConfigError, match="no such group"):
        lpd.RuleSocketServer(sockpath, list, group="no-such-group-lpd-test")
    assert not os.path.exists(sockpath)


@pytest.mark.unit
def test_stale_socket_file_is_replaced(serve, sockpath):
    os.makedirs(os.path.dirname(sockpath))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sockpath)           # bound, never listening, then closed: a crash leftover
    dead.close()
    os.chmod(sockpath, 0o700)
    serve([("a", 1, 1)])
    assert read_all(sockpath) == b"a:1:1\n"
    assert stat.S_IMODE(os.stat(sockpath).st_mode) == 0o660     # ours, not the leftover


@pytest.mark.unit
def test_live_socket_is_an_error(serve, sockpath):
    first = serve([("a", 1, 1)])
    with pytest.raises(lpd.ConfigError, match="another lpd is serving this socket"):
        lpd.RuleSocketServer(sockpath, list)
    assert read_all(sockpath) == b"a:1:1\n"               # the first one is untouched
    first.close()
    assert not os.path.exists(sockpath)


@pytest.mark.unit
def test_a_regular_file_is_never_replaced(sockpath):
    os.makedirs(os.path.dirname(sockpath))
    with open(sockpath, "w") as f:
        f.write("precious")
    with pytest.raises(lpd.ConfigError, match="not a socket"):
        lpd.RuleSocketServer(sockpath, list)
    assert open(sockpath).read() == "precious"


@pytest.mark.unit
def test_close_removes_the_file_only_if_it_is_still_ours(sockpath):
    srv = lpd.RuleSocketServer(sockpath, list).start()
    assert os.path.exists(sockpath)
    srv.close()
    assert not os.path.exists(sockpath)
    srv.close()                                           # idempotent
    srv = lpd.RuleSocketServer(sockpath, list).start()
    os.unlink(sockpath)                                   # someone else took the path over
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(sockpath)
    try:
        srv.close()
        assert os.path.exists(sockpath)
    finally:
        other.close()


@pytest.mark.unit
def test_never_reading_client_does_not_stall_others(serve, sockpath):
    snap = rules(20000)                       # ~700 kB: far more than a socket buffer
    srv = serve(snap, client_timeout=2.0)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.connect(sockpath)                   # ...and never reads
    try:
        t0 = time.monotonic()
        for _ in range(5):
            assert read_all(sockpath, timeout=5) == expected(snap)
        assert time.monotonic() - t0 < 2.0, "other clients waited for the stuck one"
        # After its deadline the stuck client is dropped: EOF (or reset) after a partial dump.
        wait_for(lambda: not srv._clients, timeout=6, what="stuck client dropped", step=0.01)
        got = b""
        stuck.settimeout(5)
        try:
            for _ in range(10000):
                b = stuck.recv(65536)
                if not b:
                    break
                got += b
        except ConnectionResetError:
            pass
        assert len(got) < len(expected(snap))
        assert expected(snap).startswith(got)
    finally:
        stuck.close()
    assert read_all(sockpath) == expected(snap)


@pytest.mark.unit
def test_slow_reader_gets_a_complete_dump(serve, sockpath):
    snap = rules(6000)                        # ~200 kB
    serve(snap)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sockpath)
    got = []
    fast = []
    for i in range(5000):
        b = s.recv(4096)
        if not b:
            break
        got.append(b)
        if i == 3:                            # meanwhile a fast client is served in full
            fast.append(read_all(sockpath, timeout=5))
        time.sleep(0.001)
    s.close()
    assert b"".join(got) == expected(snap)
    assert fast == [expected(snap)]


@pytest.mark.unit
def test_clients_vanishing_mid_dump(serve, sockpath):
    snap = rules(20000)
    srv = serve(snap)
    for i in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sockpath)
        if i % 2:
            s.recv(1000)                      # read a little, then vanish
        if i % 3 == 0:
            # RST-like close: unread data pending on our side.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()
    assert read_all(sockpath) == expected(snap)
    wait_for(lambda: not srv._clients, timeout=5, what="vanished clients forgotten", step=0.01)
    assert srv._thread.is_alive()


@pytest.mark.unit
def test_hundred_concurrent_clients_get_complete_dumps(serve, sockpath):
    snap = rules(3000)                        # ~100 kB each
    serve(snap)
    # Connect all first (they queue in the backlog), then read all in parallel.
    socks = []
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(15)
        s.connect(sockpath)
        socks.append(s)
    results = [None] * 100

    def reader(i):
        chunks = []
        try:
            for _ in range(100000):
                b = socks[i].recv(65536)
                if not b:
                    break
                chunks.append(b)
            results[i] = b"".join(chunks)
        except OSError as e:
            results[i] = e
        finally:
            socks[i].close()
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    want = expected(snap)
    assert sum(r == want for r in results) == 100, [type(r) for r in results if r != want][:5]


@pytest.mark.unit
def test_hundred_nc_clients_at_once(serve, sockpath):
    snap = rules(500)
    serve(snap)
    procs = [subprocess.Popen(["nc", "-U", sockpath], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(100)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        outs.append(out)
    assert all(o == expected(snap) for o in outs)


@pytest.mark.unit
def test_each_dump_is_one_consistent_snapshot(serve, sockpath):
    """Counters move between and during dumps; each dump shows one instant."""
    rs_bytes, rs_packets = [0, 0, 0], [0, 0, 0]
    ids = ["a", "b", "c"]
    lock = threading.Lock()
    stop = threading.Event()

    def snapshot():
        with lock:
            return list(zip(ids, rs_bytes, rs_packets))

    def capture():
        while not stop.is_set():
            with lock:
                for i in range(3):
                    rs_bytes[i] += 60
                    rs_packets[i] += 1
    serve(snapshot)
    t = threading.Thread(target=capture)
    t.start()
    try:
        for _ in range(50):
            lines = read_all(sockpath).decode().splitlines()
            vals = [tuple(line.split(":")[1:]) for line in lines]
            assert [line.split(":")[0] for line in lines] == ids
            assert len(set(vals)) == 1, lines
    finally:
        stop.set()
        t.join(5)


@pytest.mark.unit
def test_snapshot_failure_closes_client_and_keeps_serving(serve, sockpath):
    calls = []

    def snapshot():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [("a", 1, 1)]
    srv = serve(snapshot)
    assert read_all(sockpath) == b""
    assert read_all(sockpath) == b"a:1:1\n"
    assert srv._thread.is_alive()


def connect_stuck(srv, sockpath, n):
    """n clients that connect and never read, once the server holds all of them."""
    stuck = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sockpath)
        stuck.append(s)
    wait_for(lambda: len(srv._clients) == n, timeout=5, what="clients accepted", step=0.01)
    return stuck


@pytest.mark.unit
def test_close_is_prompt_with_stuck_clients(sockpath):
    srv = lpd.RuleSocketServer(sockpath, lambda: rules(20000)).start()
    stuck = connect_stuck(srv, sockpath, 5)
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 2
    assert not srv._thread.is_alive()
    assert not os.path.exists(sockpath)
    for s in stuck:
        s.close()


@pytest.mark.unit
def test_socket_path_too_long(tmp_path):
    path = str(tmp_path / ("x" * 120) / "eth0.sock")
    with pytest.raises(lpd.ConfigError, match="longer than 107 bytes"):
        lpd.RuleSocketServer(path, list)


@pytest.mark.unit
def test_default_socket_path():
    assert lpd.default_socket_path("eth0") == "/run/lpd/eth0.sock"


@pytest.mark.unit
def test_client_limit_queues_instead_of_refusing(serve, sockpath):
    snap = rules(20000)
    srv = serve(snap, client_timeout=1.0, max_clients=3)
    stuck = connect_stuck(srv, sockpath, 3)
    t0 = time.monotonic()
    assert read_all(sockpath, timeout=10) == expected(snap)    # waits in the backlog
    assert time.monotonic() - t0 >= 0.5                        # ...until the stuck ones expire
    for s in stuck:
        s.close()


# --- dumps cut off ------------------------------------------------------------


@pytest.mark.unit
def test_never_reading_clients_are_counted_and_logged_once_per_period(serve, sockpath, capsys,
                                                                      monkeypatch):
    period = 3.0                              # room for the second cut-off on a busy machine
    monkeypatch.setattr(lpd, "TRUNCATED_REPORT_SECONDS", period)
    snap = rules(20000)                       # ~700 kB: far more than a socket buffer
    srv = serve(snap, client_timeout=0.3)
    logged = []

    def report_lines():
        logged.extend(line for line in capsys.readouterr().err.splitlines() if "cut off" in line)
        return logged

    def stuck_until_cut_off(n):
        stuck = connect_stuck(srv, sockpath, n)
        wait_for(lambda: not srv._clients, timeout=5, what="stuck clients cut off", step=0.01)
        for s in stuck:
            s.close()

    assert read_all(sockpath) == expected(snap)              # a complete dump is not counted
    stuck_until_cut_off(1)
    assert srv.truncated == 1
    wait_for(lambda: len(report_lines()) == 1, timeout=5, what="the first report", step=0.01)
    assert logged[0] == "lpd: rule socket: 1 dump cut off, not read within 0.3 s (1 in all)"
    stuck_until_cut_off(2)                                   # within the period: counted, not logged
    assert srv.truncated == 3 and len(report_lines()) == 1
    # Reported when the period is over, with no further event to trigger it.
    wait_for(lambda: len(report_lines()) == 2, timeout=period + 5, what="the second report",
             step=0.01)
    assert logged[1] == "lpd: rule socket: 2 dumps cut off, not read within 0.3 s (3 in all)"
    time.sleep(period + 0.2)
    assert len(report_lines()) == 2                          # nothing new: no line


@pytest.mark.unit
def test_truncated_dumps_are_a_metric(serve, sockpath):
    from prometheus_client import CollectorRegistry, generate_latest
    srv = serve(rules(20000), client_timeout=0.3)
    stuck = connect_stuck(srv, sockpath, 1)
    wait_for(lambda: not srv._clients, timeout=5, what="stuck client cut off", step=0.01)
    stuck[0].close()
    registry = CollectorRegistry(auto_describe=False)
    mapping = lpd.NicMapping(None, "eth0", lambda *a: None)
    registry.register(lpd.Collector(lpd.Published(), mapping, "eth0", srv))
    text = generate_latest(registry).decode()
    assert "\nlpd_rule_socket_truncated_total 1.0\n" in text, text
    registry = CollectorRegistry(auto_describe=False)
    registry.register(lpd.Collector(lpd.Published(), mapping, "eth0"))
    assert "lpd_rule_socket_truncated" not in generate_latest(registry).decode()
