"""The same container names from podman's Docker-compatible API (issue 13: "the same
code must work against podman's compatible API"): a real `podman system service` on a
socket of its own, a busybox container on podman's bridge, lpd on that bridge.

podman 4.3 (Debian 12) lists with `Image: localhost/...`, says `API-Version`, removes
with `remove` and sends no network events at start/stop; lpd must follow all the same.
Fails, never skips, when podman cannot run a container here."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import docker_engine
from harness import free_port, read_log, wait_for

pytestmark = pytest.mark.docker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LPD = os.path.join(ROOT, "lpd.py")
PODMAN = "podman"
IMAGE = "localhost/lpdtest/podman-bb:1"
NAME1, NAME2 = "lpdp-web1", "lpdp-web2"
# The hard limits podman's defaults ask for are above this machine's: set our own.
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
WAIT = 15.0
HIST = "http_server_request_duration_seconds"


class Podman:
    """podman's CLI and a service of our own; images built like the Docker tests'."""
    _busybox_binary = docker_engine.Engine._busybox_binary
    _import = docker_engine.Engine._import

    def __init__(self, directory):
        if shutil.which(PODMAN) is None:
            raise AssertionError("podman is not installed (make deps installs it)")
        self.dir = directory
        self.socket = os.path.join(directory, "podman.sock")
        self.service = subprocess.Popen([PODMAN, "system", "service", "-t", "0",
                                         "unix://" + self.socket],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not wait_for(self.ping, 20):
            raise AssertionError(f"podman system service did not answer: {self.stop_service()}")

    def ping(self):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(self.socket)
                s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                return b"OK" in s.recv(4096)
        except OSError:
            return False

    def docker(self, *args, timeout=120, check=True):
        """The CLI (the name docker_engine's image builder calls)."""
        cp = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)
        if check and cp.returncode:
            raise AssertionError(f"podman {' '.join(args)}: {cp.stderr.strip()[-800:]}")
        return cp.stdout.strip()

    def busybox_image(self):
        bb = self._busybox_binary()
        return self._import(IMAGE, [
            ("bin", "dir", None), ("bin/busybox", "file", bb), ("bin/sh", "link", "busybox"),
            ("www", "dir", None), ("www/index.html", "file", docker_engine.INDEX),
            ("tmp", "dir", None), ("proc", "dir", None), ("sys", "dir", None), ("dev", "dir", None)],
            ['CMD ["/bin/busybox","httpd","-f","-p","80","-h","/www"]'])

    def run(self, name):
        self.docker("run", "-d", *ULIMITS, "--name", name, IMAGE)
        return self.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name)

    def bridge(self):
        nets = json.loads(self.docker("network", "inspect", "podman"))
        return nets[0]["network_interface"]

    def stop_service(self):
        if self.service.poll() is None:
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(10)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait(5)
        return self.service.stderr.read().decode(errors="replace")[-800:]

    def close(self):
        for name in (NAME1, NAME2):
            self.docker("rm", "-f", "-t", "0", name, check=False)
        self.docker("rmi", "-f", IMAGE, check=False)
        self.stop_service()


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


def containers(port):
    try:
        return {c["container"]: c for c in json.loads(get(port, "/api/containers"))["containers"]}
    except OSError:
        return None


FORWARD = "/proc/sys/net/ipv4/ip_forward"


def _links():
    return set(os.listdir("/sys/class/net"))


@pytest.fixture(scope="module")
def podman():
    """The host as it was afterwards: podman's CNI turns forwarding on and leaves its
    bridge behind."""
    with open(FORWARD) as f:
        forward = f.read()
    links = _links()
    with tempfile.TemporaryDirectory(prefix="lpd-podman-") as d:
        p = Podman(d)
        try:
            p.busybox_image()
            yield p
        finally:
            p.close()
            for link in _links() - links:
                subprocess.run(["ip", "link", "del", link], capture_output=True)
            with open(FORWARD, "w") as f:
                f.write(forward)


def test_names_from_podmans_api(podman, tmp_path):
    ip1 = podman.run(NAME1)
    bridge = podman.bridge()
    port, log_path = free_port(), tmp_path / "http.json"
    lpd = subprocess.Popen([sys.executable, LPD, "-i", bridge, "--http", "--http-log", str(log_path),
                            "--docker-socket", podman.socket, "--mapping-url", "none",
                            "--web.listen-address", f"127.0.0.1:{port}", "--interval", "0.5"],
                           stderr=subprocess.PIPE, text=True)
    try:
        seen = wait_for(lambda: (containers(port) or {}).get(NAME1), WAIT)
        assert seen and seen["ip"] == ip1 and seen["image"] == IMAGE, containers(port)
        engine = json.loads(get(port, "/api/containers"))["engine"]
        assert engine["up"] and engine["api_version"] == "1.41" and engine["socket"] == podman.socket

        out = subprocess.run(["curl", "-s", "-m", "5", f"http://{ip1}/"], capture_output=True)
        assert out.stdout == docker_engine.INDEX
        rec = wait_for(lambda: [r for r in read_log(log_path, whole=False)
                                if r["id.resp_h"] == ip1], WAIT)
        assert rec and rec[0]["container"] == NAME1 and rec[0]["status_code"] == 200, rec
        samples = [s for fam in text_string_to_metric_families(get(port, "/metrics"))
                   for s in fam.samples]
        info = [s.labels for s in samples if s.name == "lpd_container_info"]
        assert info == [{"local_ip": ip1, "container": NAME1, "image": IMAGE}], info
        counts = [s for s in samples if s.name == HIST + "_count"]
        assert [(s.labels["container"], s.value) for s in counts] == [(NAME1, 1.0)], counts
        assert NAME1 in json.loads(get(port, "/api/requests"))["servers"]

        # podman's events: a new container is named long before the 30 s re-list,
        # a removed one leaves the table
        t0 = time.monotonic()
        ip2 = podman.run(NAME2)
        assert wait_for(lambda: NAME2 in (containers(port) or {}), 10), containers(port)
        assert (containers(port) or {})[NAME2]["ip"] == ip2
        podman.docker("rm", "-f", "-t", "0", NAME1)
        assert wait_for(lambda: NAME1 not in (containers(port) or {NAME1: 1}), 10)
        assert time.monotonic() - t0 < 20
    finally:
        lpd.send_signal(signal.SIGTERM)
        try:
            code = lpd.wait(15)
        except subprocess.TimeoutExpired:
            lpd.kill()
            code = lpd.wait(5)
        err = lpd.stderr.read()
    assert code == 0, err
    assert "docker:" not in err, err          # no outage, nothing to warn about
