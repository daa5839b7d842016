"""SelectorServer, the one selector server under the metrics endpoint and the rule socket:
what they share, tested for both servers (running out of descriptors) or on a small
server of the test's own (the error guard, a bounded stop).

Every wait is bounded in time and count; a hung server fails the test instead of
hanging the suite.
"""
import contextlib
import os
import selectors
import socket
import subprocess
import sys
import threading
import time

import pytest

import lpd
from harness import wait_for

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLACK = 1.0     # scheduling noise allowed around a server deadline, seconds


def ask(port, data, timeout=5.0):
    """Send data, read to EOF; what came back (b"" also when the server reset us)."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        try:
            while b := s.recv(65536):
                chunks.append(b)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


class Echo(lpd.SelectorServer):
    """The smallest server: each client gets back what it sent first, then EOF. b"boom"
    breaks the handler; with fail_admit set, the next batch breaks accepting."""

    def __init__(self, sock):
        super().__init__(sock, "echo", max_clients=8)
        self.fail_admit = False

    def _admit(self, socks):
        if self.fail_admit:
            self.fail_admit = False
            raise RuntimeError("admit")
        for s in socks:
            self._add(lpd._Client(s, time.monotonic() + 5), selectors.EVENT_READ)

    def _readable(self, c):
        data = c.sock.recv(64)
        if data == b"boom":
            raise RuntimeError("boom")
        self._respond(c, data)


class Stuck(Echo):
    """Its handler waits for `release`: a serving thread held up in a callback, as in a
    slow collection or snapshot."""

    def __init__(self, sock):
        super().__init__(sock)
        self.entered, self.release = threading.Event(), threading.Event()

    def _readable(self, c):
        self.entered.set()
        self.release.wait(30)
        super()._readable(c)


@contextlib.contextmanager
def serving(cls):
    srv = cls(socket.create_server(("127.0.0.1", 0)))
    thread = threading.Thread(target=srv.serve_forever, name="test-serve", daemon=True)
    thread.start()
    try:
        yield srv, srv.socket.getsockname()[1]
    finally:
        srv.shutdown()
        thread.join(5)
        srv.server_close()
    assert not thread.is_alive()


def test_a_broken_client_costs_one_log_line_not_the_server(capsys):
    with serving(Echo) as (srv, port):
        assert ask(port, b"hi") == b"hi"
        assert ask(port, b"boom") == b""              # its handler failed: closed
        assert ask(port, b"hi again") == b"hi again"
        srv.fail_admit = True
        assert ask(port, b"lost") == b""              # accepted, never admitted: closed
        assert ask(port, b"after") == b"after"
        assert srv._thread.is_alive() and not srv._clients
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    for line, error in zip(lines, ("RuntimeError: boom", "RuntimeError: admit")):
        assert line.startswith("lpd: echo: unexpected error: ") and error in line, line


def test_shutdown_waits_a_bounded_time_for_a_thread_held_up(monkeypatch):
    monkeypatch.setattr(lpd, "SERVER_STOP_SECONDS", 0.5)
    with serving(Stuck) as (srv, port), socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"hi")
        assert srv.entered.wait(5)
        stopper = threading.Thread(target=srv.shutdown, daemon=True)
        t0 = time.monotonic()
        stopper.start()
        stopper.join(lpd.SERVER_STOP_SECONDS + 5)
        took = time.monotonic() - t0
        srv.release.set()                             # the thread comes back, sees the stop
        assert not stopper.is_alive(), "shutdown() waits for as long as the thread is held"
        assert took < lpd.SERVER_STOP_SECONDS + SLACK
        wait_for(lambda: not srv._thread.is_alive(), timeout=5, what="the serving thread's end",
                 step=0.01)


# --- running out of file descriptors ----------------------------------------------

# A server alone in a process of its own, so that its descriptor limit and CPU time are
# its own. A client holds one of its descriptors until its deadline (argv[4] s): the rule
# socket's dump is far larger than a socket buffer, and an idle HTTP client never
# completes its request head.
SERVER = r"""
import sys, threading
sys.path.insert(0, sys.argv[1])
import lpd
kind, path, timeout = sys.argv[2], sys.argv[3], float(sys.argv[4])
if kind == "rule socket":
    snap = [(f"rule-{i:05d}-" + "x" * 20, i * 1000 + 7, i) for i in range(20000)]
    srv = lpd.RuleSocketServer(path, lambda: snap, client_timeout=timeout).start()
    print("ready", flush=True)
    sys.stdin.read()          # until the test closes our stdin
    srv.close()
else:
    from prometheus_client import CollectorRegistry
    lpd.ENDPOINT_HEAD_TIMEOUT = timeout
    srv = lpd.make_metrics_server("127.0.0.1", 0, CollectorRegistry())
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    print("ready", srv.server_address[1], flush=True)
    sys.stdin.read()
    srv.shutdown()
    srv.server_close()
"""
NOFILE = 16               # the server's own few descriptors, then a handful of clients
MAX_CLIENTS = 64          # far more than NOFILE: the loop opening them is bounded
QUEUED = 3                # connections left waiting in the backlog
CPU_WINDOW = 2.0          # seconds the server's CPU time is measured over
CPU_BUDGET = 0.2          # seconds of CPU in that window: a spinning loop takes ~2
KEEP_STDERR = 4096        # bytes of the server's stderr kept; the rest is only counted
DUMP_LINES = 20000        # the rule socket's dump, as SERVER makes it


class Stderr:
    """Drains a pipe in a thread (a flood must never block the writer, which would hide
    a spin), counting lines and keeping the first KEEP_STDERR bytes."""

    def __init__(self, pipe):
        self.pipe, self.head, self.lines = pipe, b"", 0
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        fd = self.pipe.fileno()
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                return
            self.lines += b.count(b"\n")
            if len(self.head) < KEEP_STDERR:
                self.head += b[:KEEP_STDERR - len(self.head)]

    def text(self):
        return self.head.decode(errors="replace")


def cpu_seconds(pid):
    """utime + stime of a process, from /proc/PID/stat (after the parenthesised comm)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rule_socket_client(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def served(kind, address):
    """A new client gets a whole answer: the rule socket's dump, the metrics' page."""
    if kind == "rule socket":
        with rule_socket_client(address) as s:
            got = b""
            while b := s.recv(1 << 16):
                got += b
        return got.count(b"\n") == DUMP_LINES
    return ask(address[1], b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 OK\r\n")


@pytest.mark.parametrize("kind", ["rule socket", "metrics"])
def test_out_of_descriptors_the_accept_loop_rests_and_logs_once(kind, tmp_path):
    path = str(tmp_path / "lpd.sock")
    proc = subprocess.Popen(["prlimit", f"--nofile={NOFILE}", sys.executable, "-c", SERVER,
                             ROOT, kind, path, "30"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = Stderr(proc.stderr)
    clients = []
    try:
        ready = proc.stdout.readline().split()
        assert ready[:1] == [b"ready"], err.text()
        address = path if kind == "rule socket" else ("127.0.0.1", int(ready[1]))

        def connect():
            if kind == "rule socket":
                return rule_socket_client(address)
            return socket.create_connection(address, timeout=5)

        for _ in range(MAX_CLIENTS):                     # connect until accept() fails
            clients.append(connect())                    # queued in the backlog if need be
            deadline = time.monotonic() + 0.2
            while "accept failed" not in err.text() and time.monotonic() < deadline:
                time.sleep(0.01)
            if "accept failed" in err.text():
                break
        assert "Too many open files" in err.text(), (len(clients), err.text())
        # The first failure may come from an accept() with nothing queued (the kernel
        # checks the descriptor limit first): queue connections the server cannot take.
        clients += [connect() for _ in range(QUEUED)]
        before = cpu_seconds(proc.pid)
        time.sleep(CPU_WINDOW)
        spent = cpu_seconds(proc.pid) - before
        assert spent < CPU_BUDGET, f"{spent:.2f} s of CPU in {CPU_WINDOW} s: the accept loop spins"
        assert err.lines == 1, (err.lines, err.text())
        for s in clients:                                # the server's descriptors come back
            s.close()
        clients = []
        assert served(kind, address)
        wait_for(lambda: err.lines == 2, timeout=5, what="the 'accepting again' line", step=0.01)
        lines = err.text().splitlines()
        assert lines[0].startswith(f"lpd: {kind}: accept failed: Too many open files; clients "
                                   f"wait in the backlog, retrying every "
                                   f"{lpd.ACCEPT_BACKOFF_SECONDS:g} s"), lines
        assert lines[1] == f"lpd: {kind}: accepting connections again", lines
    finally:
        for s in clients:
            s.close()
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        err.thread.join(5)
    assert proc.returncode == 0, err.text()
