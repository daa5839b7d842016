"""The Prometheus endpoint under abuse: real sockets on 127.0.0.1 against the real
server from make_metrics_server, served from a thread.

Every wait is bounded in time and count, and every socket is closed, so a server
that hangs or leaks fails the test instead of hanging the suite.
"""
import contextlib
import resource
import select
import socket
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

import lpd

pytestmark = pytest.mark.unit

GET = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
SAMPLE = b"lpd_test_scrapes_total 3.0\n"
SLACK = 1.0     # scheduling noise allowed around a server deadline, seconds


@pytest.fixture
def registry():
    reg = CollectorRegistry()
    Counter("lpd_test_scrapes", "A counter for the tests.", registry=reg).inc(3)
    return reg


@contextlib.contextmanager
def serving(registry):
    srv = lpd.make_metrics_server("127.0.0.1", 0, registry)
    thread = threading.Thread(target=srv.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        thread.join(5)
        srv.server_close()
    assert not thread.is_alive()


@pytest.fixture
def server(registry):
    with serving(registry) as srv:
        yield srv


def port_of(srv):
    return srv.server_address[1]


def exchange(port, data, timeout=5.0):
    """Send data, read the answer to EOF: (status, {lower-case header: value}, body).
    The whole exchange, connect included, is bounded by timeout."""
    deadline = time.monotonic() + timeout
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete answer in time")
            s.settimeout(left)
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def request(method, path):
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def thread_count():
    """Every thread of this process, Python's or not."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def closed_by_peer(s):
    """True once the server has closed s (EOF or reset); s is non-blocking."""
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


IDLE_CLIENTS = 1000


@pytest.fixture
def descriptors():
    """Room for 1000 clients and the server's own connections in this one process,
    whatever the soft limit the test runner inherited (often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE_CLIENTS + lpd.ENDPOINT_MAX_CONNECTIONS + 256          # and the runner's own
    for limit in (want, hard):                   # root may raise the hard limit; else up to it
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), max(hard, limit)))
            break
        except (ValueError, OSError):
            continue
    yield min(IDLE_CLIENTS, resource.getrlimit(resource.RLIMIT_NOFILE)[0]
              - lpd.ENDPOINT_MAX_CONNECTIONS - 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_connections_cost_no_thread_block_no_scrape_and_expire(server, descriptors):
    port = port_of(server)
    before = thread_count()
    socks = []
    try:
        opened = time.monotonic()
        assert descriptors >= 500, "too few file descriptors for the test"
        for _ in range(descriptors):
            assert time.monotonic() - opened < 10, "could not even open the connections"
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        time.sleep(0.5)                             # the server accepts the backlog
        assert thread_count() - before <= 2
        t0 = time.monotonic()
        status, _, body = exchange(port, GET, timeout=3)
        assert status == 200 and SAMPLE in body
        assert time.monotonic() - t0 < 3
        assert thread_count() - before <= 2

        poller = select.poll()
        open_ = {}
        for s in socks:
            s.setblocking(False)
            poller.register(s, select.POLLIN)
            open_[s.fileno()] = s
        deadline = opened + lpd.ENDPOINT_HEAD_TIMEOUT + SLACK
        while open_ and time.monotonic() < deadline:
            for fd, _ in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                if fd in open_ and closed_by_peer(open_[fd]):
                    poller.unregister(fd)
                    del open_[fd]
        assert not open_, f"{len(open_)} idle connections still open after the deadline"
    finally:
        for s in socks:
            s.close()


def test_slowloris_is_cut_off_at_the_head_deadline(server):
    # One byte every 0.5 s: each byte is progress, only a total deadline ends it.
    head = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 200
    budget = lpd.ENDPOINT_HEAD_TIMEOUT + 2 * SLACK
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=2) as s:
        t0 = time.monotonic()
        cut = None
        for i in range(int(budget / 0.5) + 1):
            try:
                s.send(head[i:i + 1])
                s.settimeout(0.5)
                if s.recv(1) == b"":
                    cut = time.monotonic() - t0
                    break
            except socket.timeout:
                continue
            except OSError:
                cut = time.monotonic() - t0
                break
    assert cut is not None, "a slowloris client was kept past the deadline"
    assert lpd.ENDPOINT_HEAD_TIMEOUT - SLACK <= cut <= lpd.ENDPOINT_HEAD_TIMEOUT + SLACK


def test_a_burst_fits_the_listen_backlog(registry):
    # Not serving: only the kernel's accept queue holds these connections.
    srv = lpd.make_metrics_server("127.0.0.1", 0, registry)
    socks = []
    try:
        for _ in range(128):
            s = socket.socket()
            s.setblocking(False)
            socks.append(s)
            s.connect_ex(srv.server_address)
        time.sleep(0.2)
        _, writable, _ = select.select([], socks, [], 0)
        connected = [s for s in writable if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0]
        assert len(connected) == len(socks)
    finally:
        for s in socks:
            s.close()
        srv.server_close()


def test_200_concurrent_scrapes_all_succeed(server):
    n = 200
    port = port_of(server)
    start = threading.Barrier(n, timeout=10)
    results = [None] * n

    def scrape(i):
        try:
            start.wait()
            results[i] = exchange(port, GET, timeout=3)
        except Exception as e:              # reported below, per scrape
            results[i] = e

    threads = [threading.Thread(target=scrape, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads)
    failed = [r for r in results if not (isinstance(r, tuple) and r[0] == 200 and SAMPLE in r[2])]
    assert not failed, f"{len(failed)} of {n} scrapes failed, e.g. {failed[0]!r}"


class Big:
    """An exposition of BIG bytes: far more than the kernel buffers on a connection."""
    BIG = 16 << 20

    def collect(self):
        fam = GaugeMetricFamily("lpd_test_big", "Long label values.", labels=["blob"])
        for i in range(16):
            fam.add_metric([f"{i}" + "x" * (self.BIG // 16)], 1.0)
        yield fam


def test_a_client_that_stops_reading_is_cut_off(monkeypatch):
    monkeypatch.setattr(lpd, "ENDPOINT_SEND_TIMEOUT", 1.0)
    reg = CollectorRegistry()
    reg.register(Big())
    with serving(reg) as srv, socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # the window stays small
        s.settimeout(5)
        s.connect(srv.server_address)
        s.sendall(GET)
        time.sleep(lpd.ENDPOINT_SEND_TIMEOUT + 2 * SLACK)             # reads nothing meanwhile
        got, ended = 0, None
        deadline = time.monotonic() + 10
        while ended is None and time.monotonic() < deadline:
            try:
                b = s.recv(1 << 20)
                got += len(b)
                ended = "eof" if not b else None
            except ConnectionResetError:
                ended = "reset"
    assert ended == "reset" and got < Big.BIG, (ended, got)


def test_head_answers_like_get_without_a_body(server):
    port = port_of(server)
    for path, status in (("/metrics", 200), ("/metrics?x=1", 200), ("/", 200), ("/nope", 404)):
        got = exchange(port, request("GET", path))
        head = exchange(port, request("HEAD", path))
        assert got[0] == head[0] == status, path
        assert int(got[1]["content-length"]) == len(got[2]) > 0, path
        for name in ("content-type", "content-length"):
            assert head[1][name] == got[1][name], (path, name)
        assert head[2] == b"", path


def test_an_oversized_head_is_refused(server):
    port = port_of(server)
    filler = b"".join(b"X-Fill-%d: %s\r\n" % (i, b"a" * 100) for i in range(lpd.ENDPOINT_MAX_HEAD_BYTES // 100))
    status, _, _ = exchange(port, b"GET /metrics HTTP/1.1\r\n" + filler + b"\r\n")
    assert status == 431
    status, _, body = exchange(port, GET)         # and the server carries on
    assert status == 200 and SAMPLE in body


def test_port_in_use_is_port_in_use(registry):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        with pytest.raises(lpd.PortInUse) as e:
            lpd.make_metrics_server("127.0.0.1", blocker.getsockname()[1], registry)
    assert e.value.exit_code == 69 and "address already in use" in str(e.value)


def test_a_full_table_gives_up_the_answered_then_the_oldest_reader_never_an_answer():
    """Who makes room for a new connection (issue 24): one already answered, silently;
    else the oldest still sending its request, with a 503; never one being answered or
    waiting for this round's collection: then the newcomer gets the 503."""
    from types import SimpleNamespace as C
    reading = lambda: C(head=bytearray(b"GET /me"), out=None)          # noqa: E731
    answered, sending = C(head=None, out=None), C(head=None, out=memoryview(b"HTTP/1.0 200"))
    pending = C(head=None, out=lpd.ENDPOINT_ANSWER_PENDING)
    first, second = reading(), reading()
    assert lpd.endpoint_victim([sending, first, answered, second]) == (answered, False)
    assert lpd.endpoint_victim([sending, pending, first, second]) == (first, True)
    assert lpd.endpoint_victim([sending, pending]) == (None, True)
    assert lpd.ENDPOINT_BUSY.startswith(b"HTTP/1.0 503 Service Unavailable\r\n")
    assert f"\r\nRetry-After: {lpd.ENDPOINT_RETRY_AFTER}\r\n".encode() in lpd.ENDPOINT_BUSY
