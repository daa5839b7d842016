"""`lpd top` (issue 16): the live view of a running lpd, driven in a real tmux against
a live lpd in a network namespace with known traffic; and --once as plain text.
tmux runs on a private socket of this test (-L) and its server is killed at the end."""
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

import netns
from test_daemon import LPD, Lpd, wait_for

URL = "http://127.0.0.1:59122"
RULES = "udp;udp\nping;icmp or icmp6\n"
RATE_FRAMES, RATE_PAYLOAD = 20, 1000           # a burst every RATE_PERIOD s
RATE_PERIOD = 0.05


class Sender:
    """UDP from A to B at a steady rate until stopped (bounded: at most `limit` s)."""

    def __init__(self, pair, limit=60.0):
        self.pair, self.stop_at = pair, time.monotonic() + limit
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        sport = 40000
        while not self.stopped.is_set() and time.monotonic() < self.stop_at:
            self.pair.udp_send(self.pair.ns_a, self.pair.ip4_a, self.pair.ip4_b,
                               [RATE_PAYLOAD] * RATE_FRAMES, sport=sport)
            sport = 40000 + (sport - 39999) % 50
            time.sleep(RATE_PERIOD)

    def stop(self):
        self.stopped.set()
        self.thread.join(10)


def start_lpd(pair, tmp):
    (tmp / "rules").write_text(RULES)
    return Lpd(pair, "--mapping-url", "none", "--remote", "-t", "0", "--local-net",
               f"{pair.ip4_b}/32", "--connections", "-f", str(tmp / "rules"),
               "-u", str(tmp / "r.sock"))


def top_once(pair, columns=80):
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(netns.ns_argv(pair.ns_b, [sys.executable, LPD, "top", "--once",
                                                    "--url", URL]),
                          capture_output=True, text=True, timeout=30, env=env)


@pytest.fixture
def pair():
    with netns.Pair() as p:
        yield p


def test_once_shows_the_traffic_and_fits_the_width(pair, tmp_path):
    lpd = start_lpd(pair, tmp_path)
    sender = Sender(pair)
    try:
        time.sleep(2.5)                              # two intervals of steady traffic
        out = top_once(pair, columns=60)
    finally:
        sender.stop()
        lpd.stop()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(len(line) <= 60 for line in lines), [line for line in lines if len(line) > 60]
    text = out.stdout
    for heading in ("local addresses: 1", "remote addresses:", "rules: 2", "connections:", "HTTP: off"):
        assert heading in text, (heading, text)
    row = next(line for line in lines if line.startswith(pair.ip4_b))
    # rx of B: RATE_FRAMES frames of frame_len(RATE_PAYLOAD) bytes per period (less the
    # sender's own overhead: it is a lower bound on the period) -> at most this rate
    top = RATE_FRAMES * netns.frame_len(RATE_PAYLOAD) * 8 / RATE_PERIOD
    value, unit = row.split()[3], row.split()[4]
    scale = {"bit/s": 1, "kbit/s": 1e3, "Mbit/s": 1e6}[unit]
    assert 0.1 * top < float(value) * scale <= 1.05 * top, row
    assert any(line.startswith(pair.ip4_a) for line in lines), text       # the remote
    assert any(line.startswith("udp ") and "bit/s" in line for line in lines), text


def test_once_without_a_daemon_is_one_line_and_fails(pair):
    out = top_once(pair)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "not answering" in out.stderr, out.stderr


class Tmux:
    """A tmux server of this test's own, one 80x24 session running lpd top in ns_b."""

    def __init__(self, ns, width=80, height=24):
        if shutil.which("tmux") is None:
            raise AssertionError("tmux is required (apt-get install tmux)")
        self.sock = f"lpdtest-{os.getpid()}"
        cmd = " ".join(netns.ns_argv(ns, [sys.executable, LPD, "top", "--url", URL]))
        self.tmux("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height),
                  f"TERM=screen {cmd}; sleep 30")

    def tmux(self, *args):
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True,
                              timeout=10)

    def screen(self):
        return self.tmux("capture-pane", "-p", "-t", "top").stdout

    def keys(self, *keys):
        self.tmux("send-keys", "-t", "top", *keys)

    def shows(self, text, timeout=8):
        return wait_for(lambda: text in self.screen(), timeout, 0.1)

    def close(self):
        self.tmux("kill-server")


def test_keys_panes_pause_resize_and_a_killed_daemon(pair, tmp_path):
    lpd = start_lpd(pair, tmp_path)
    sender = Sender(pair)
    tmux = Tmux(pair.ns_b)
    try:
        assert tmux.shows(pair.ip4_b), tmux.screen()
        assert tmux.shows("bit/s") and "local addresses: 1" in tmux.screen()
        assert "q quit" in tmux.screen()                      # the keys are on screen
        screen = tmux.screen().splitlines()
        assert len(screen) <= 24 and all(len(line) <= 80 for line in screen)
        tmux.keys("2")
        assert tmux.shows("remote addresses:"), tmux.screen()
        assert pair.ip4_a in tmux.screen()
        tmux.keys("3")
        assert tmux.shows("rules: 2"), tmux.screen()
        tmux.keys("4")
        assert tmux.shows("connections:"), tmux.screen()
        tmux.keys("Tab")
        assert tmux.shows("HTTP: off"), tmux.screen()
        tmux.keys("1", "s")
        assert tmux.shows("sort total"), tmux.screen()
        tmux.keys("p")
        assert tmux.shows("paused"), tmux.screen()
        tmux.keys("p")
        assert tmux.shows("pane addresses"), tmux.screen()
        tmux.tmux("resize-window", "-t", "top", "-x", "60", "-y", "15")
        assert wait_for(lambda: max(map(len, tmux.screen().splitlines() or [""])) <= 60 and
                        "q quit" in tmux.screen(), 5), tmux.screen()
        # the daemon goes away: said on screen, no traceback; it comes back: reconnected
        sender.stop()
        lpd.stop()
        assert tmux.shows("not answering"), tmux.screen()
        assert "Traceback" not in tmux.screen()
        lpd = start_lpd(pair, tmp_path)
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100] * 5)
        assert tmux.shows(pair.ip4_b, 10) and tmux.shows("pane addresses"), tmux.screen()
        tmux.keys("q")
        assert wait_for(lambda: "lpd top" not in tmux.screen(), 5), tmux.screen()
    finally:
        tmux.close()
        sender.stop()
        lpd.stop()
