"""A private Docker engine for the tests: its own containerd and dockerd, its own bridge,
its own images, all gone at the end.

Plain module (no pytest import):

    with docker_engine.Engine() as eng:
        bb = eng.busybox_image()                   # "lpdtest/bb:1": busybox httpd on :80
        eng.docker("run", "-d", "--name", "web1", bb)
        ip4, ip6 = eng.addresses("web1")
        eng.kill_dockerd(); eng.start_dockerd()    # containers live on (--live-restore)

Everything lives under one directory, /tmp/lpd-docker-<pid>-<random>/: containerd with
its own `--address`, `--root` and `--state`, dockerd with its own socket (`eng.socket`),
`--data-root`, `--exec-root`, `--pidfile` and `--containerd` pointing at that containerd,
so dockerd can be killed and restarted without touching anything else. The engine's
default bridge is one this module creates first, `lpdd0` (BRIDGE), with an IPv4 /24 out of
172.29.0.0/16 and an IPv6 ULA /64 that no route of the host already covers; dockerd gets
`--bridge lpdd0 --ipv6 --fixed-cidr-v6` on it, `--ip-forward=false` and `--iptables=false`
(the host's forwarding and firewall are left as they are; published ports still work
through docker-proxy), and `--live-restore` (containers, and their addresses, outlive a
dockerd that is killed).

Images come without a registry: `busybox-static` is fetched with `apt-get download` into
CACHE (never installed: it conflicts with the `busybox` package other tests use) and
unpacked; "lpdtest/bb:1" is /bin/busybox plus /www/index.html (`hello\\n`) running
`httpd -f -p 80 -h /www`; "lpdtest/usr:1" has only the usrmerge symlinks (bin, sbin, lib,
lib64 -> usr/...) and empty directories, to run with the host's /usr mounted read-only
(`eng.usr_run_args()`), e.g. /usr/bin/python3 with a script mounted in.

Teardown (`close()`, the `with` block, atexit, and for a run that was killed outright
`cleanup_stale()` the next time, for directories and a bridge whose owner PID, in the
directory's name and the bridge's alias `lpd-docker-<pid>`, is dead): every container
removed, dockerd and containerd stopped by their PIDs, any process still started from our
directory (shims: it is in their command line) or in one of its containers (by cgroup)
killed by PID, the mounts under the directory unmounted, the bridge deleted, the
directory removed. Nothing here ever signals a process by name.

Failure never degrades silently: without root, without dockerd/containerd, or when the
engine does not answer `/_ping` in time, EngineError (with the tail of dockerd's log).
"""
import atexit
import glob
import http.client
import io
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time

DOCKERD = "dockerd"
CONTAINERD = "containerd"
DOCKER = "docker"                       # the CLI; DOCKER_HOST points it at our socket
BRIDGE = "lpdd0"
PREFIX = "/tmp/lpd-docker-"
ALIAS = "lpd-docker-"                   # the bridge's alias: lpd-docker-<owner pid>
CACHE = os.environ.get("LPD_TEST_CACHE", "/var/cache/lpd-tests")
BB_IMAGE, USR_IMAGE = "lpdtest/bb:1", "lpdtest/usr:1"
INDEX = b"hello\n"                      # /www/index.html of the busybox image
PYTHON = "/usr/bin/python3"             # Debian's, under the /usr the "usr" image mounts
READY_TIMEOUT = 30.0                    # seconds for /_ping to say OK
CMD_TIMEOUT = 60.0                      # any one docker CLI command
STOP_GRACE = 10.0                       # SIGTERM, then this long, then SIGKILL
LOG_TAIL = 4000                         # characters of dockerd's log in an error


class EngineError(RuntimeError):
    """The private engine could not be started or driven."""


def _run(cmd, check=True, timeout=CMD_TIMEOUT, **kw):
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise EngineError(f"timed out after {timeout}s: {' '.join(cmd)}") from e
    except FileNotFoundError as e:
        raise EngineError(f"not installed: {cmd[0]}") from e
    if check and cp.returncode != 0:
        raise EngineError(f"exit {cp.returncode}: {' '.join(cmd)}: {cp.stderr.strip()[-2000:]}")
    return cp


def _alive(pid):
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.02)
    return not any(_alive(p) for p in pids)


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc, sig=signal.SIGTERM, grace=STOP_GRACE):
    """Signal one of our Popens by its PID; SIGKILL if it is still there `grace` s later."""
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def _container_ids(directory):
    """Ids of the containers an engine rooted at `directory` has (running or not)."""
    try:
        return {n for n in os.listdir(os.path.join(directory, "data", "containers"))
                if len(n) == 64}
    except OSError:
        return set()


def _pids_of(directory):
    """PIDs of the processes started from `directory` (it is in their command line:
    dockerd, containerd, the shims with `-address <dir>/containerd.sock`) and of the
    processes of its containers (their cgroup path ends in a container id of
    <dir>/data/containers; their root is the container's, so it says nothing)."""
    me, out = os.getpid(), []
    mark = directory.rstrip("/") + "/"
    ids = _container_ids(directory)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace").replace("\0", " ")
            with open(f"/proc/{entry}/cgroup") as f:
                cgroups = {line.rstrip("\n").rsplit("/", 1)[-1] for line in f}
        except OSError:
            continue
        if mark in cmdline + " " or cgroups & ids:
            out.append(int(entry))
    return out


def _mounts_under(directory):
    """Mount points at or below `directory`, deepest first."""
    mark = directory.rstrip("/")
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == mark or point.startswith(mark + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def _unmount_all(directory):
    for _ in range(3):
        points = _mounts_under(directory)
        if not points:
            return True
        for point in points:
            _run(["umount", point], check=False, timeout=20)
        for point in _mounts_under(directory):
            _run(["umount", "-l", point], check=False, timeout=20)
    return not _mounts_under(directory)


def _remove_dir(directory):
    """rm -r, but never through a mount point (a container's bind mount of /usr, say)."""
    if not directory.startswith(PREFIX) or not os.path.isdir(directory):
        return
    if not _unmount_all(directory):
        raise EngineError(f"mounts left under {directory}: {_mounts_under(directory)}")
    shutil.rmtree(directory, ignore_errors=True)


def _kill_tree_of(directory, grace=STOP_GRACE):
    for _ in range(3):
        pids = _pids_of(directory)
        if not pids:
            return
        for pid in pids:
            _signal(pid, signal.SIGCONT)
            _signal(pid, signal.SIGKILL)
        _wait_gone(pids, grace)


def _link_exists(name):
    return os.path.exists(f"/sys/class/net/{name}")


def cleanup_stale():
    """Remove what runs whose process is dead left behind: their processes (by PID), mounts,
    directories, and the bridge if no live run owns it."""
    for directory in glob.glob(PREFIX + "*"):
        owner = directory[len(PREFIX):].split("-", 1)[0]
        if not owner.isdigit() or int(owner) == os.getpid() or \
                os.path.exists(f"/proc/{owner}"):
            continue
        _kill_tree_of(directory)
        try:
            _remove_dir(directory)
        except EngineError:
            pass
    # The bridge says whose it is (its alias, set at creation): only a dead run's goes.
    owner = _bridge_owner(BRIDGE)
    if owner is not None and owner != os.getpid() and not os.path.exists(f"/proc/{owner}"):
        _run(["ip", "link", "del", BRIDGE], check=False)


def _bridge_owner(name):
    """The PID in `name`'s alias `lpd-docker-<pid>`, or None (no such link, not ours)."""
    try:
        with open(f"/sys/class/net/{name}/ifalias") as f:
            alias = f.read().strip()
    except OSError:
        return None
    tail = alias[len(ALIAS):] if alias.startswith(ALIAS) else ""
    return int(tail) if tail.isdigit() else None


def _host_networks():
    """Every network the host already routes (IPv4 and IPv6), to stay clear of them."""
    nets = []
    for fam in ("-4", "-6"):
        cp = _run(["ip", "-j", fam, "route", "show", "table", "all"], check=False)
        try:
            routes = json.loads(cp.stdout or "[]")
        except ValueError:
            routes = []
        for r in routes:
            dst = r.get("dst", "")
            if dst in ("", "default"):
                continue
            try:
                nets.append(ipaddress.ip_network(dst, strict=False))
            except ValueError:
                pass
    return nets


def _pick_networks():
    taken = _host_networks()

    def free(net):
        return not any(net.version == t.version and net.overlaps(t) and t.prefixlen > 0
                       for t in taken)

    for third in [29] + list(range(30, 250)):
        net4 = ipaddress.ip_network(f"172.29.{third}.0/24")
        net6 = ipaddress.ip_network(f"fd29:1dd:{third:x}::/64")
        if free(net4) and free(net6):
            return net4, net6
    raise EngineError("no free 172.29.x.0/24 for the engine's bridge")


_engines = []
_engines_lock = threading.Lock()


class Engine:
    """containerd + dockerd of our own on bridge BRIDGE; see the module docstring."""

    def __init__(self, live_restore=True, ready_timeout=READY_TIMEOUT):
        if os.geteuid() != 0:
            raise EngineError("a private Docker engine needs root (run the tests as root)")
        for prog in (DOCKERD, CONTAINERD, DOCKER, "ip"):
            if shutil.which(prog) is None:
                raise EngineError(f"not installed: {prog} (make deps installs docker.io)")
        self.live_restore, self.ready_timeout = live_restore, ready_timeout
        self.started = False
        self.containerd = self.dockerd = None
        self._logs = []
        cleanup_stale()
        if _link_exists(BRIDGE):
            raise EngineError(f"interface {BRIDGE} already exists (another test run?)")
        self.dir = f"{PREFIX}{os.getpid()}-{random.randrange(16**6):06x}"
        os.makedirs(self.dir, mode=0o711)
        self.socket = os.path.join(self.dir, "docker.sock")
        self.containerd_socket = os.path.join(self.dir, "containerd.sock")
        self.pidfile = os.path.join(self.dir, "docker.pid")
        self.dockerd_log = os.path.join(self.dir, "dockerd.log")
        self.containerd_log = os.path.join(self.dir, "containerd.log")
        self.env = {**os.environ, "DOCKER_HOST": "unix://" + self.socket}
        self.env.pop("DOCKER_CONTEXT", None)
        self.env.pop("DOCKER_CONFIG", None)
        self.env["DOCKER_CONFIG"] = os.path.join(self.dir, "cli")     # no user config read
        self.net4, self.net6 = _pick_networks()
        self.gw4 = str(self.net4.network_address + 1)
        self.gw6 = str(self.net6.network_address + 1)
        self.bridge = BRIDGE
        with _engines_lock:
            _engines.append(self)
        self.started = True
        try:
            self._make_bridge()
            self._start_containerd()
            self.start_dockerd()
        except BaseException:
            self.close()
            raise

    # --- context manager -------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the pieces ------------------------------------------------------------------
    def _make_bridge(self):
        b = self.bridge
        _run(["ip", "link", "add", b, "type", "bridge"])
        _run(["ip", "link", "set", b, "alias", f"{ALIAS}{os.getpid()}"])
        # No DAD (the address is usable at once), no router solicitations from the host.
        for key, val in (("accept_dad", "0"), ("router_solicitations", "0"), ("accept_ra", "0")):
            _run(["sysctl", "-q", "-w", f"net.ipv6.conf.{b}.{key}={val}"], check=False)
        _run(["ip", "addr", "add", f"{self.gw4}/{self.net4.prefixlen}", "dev", b])
        _run(["ip", "-6", "addr", "add", f"{self.gw6}/{self.net6.prefixlen}", "dev", b, "nodad"])
        _run(["ip", "link", "set", b, "up"])

    def _start_containerd(self):
        log = open(self.containerd_log, "ab")
        self._logs.append(log)
        self.containerd = subprocess.Popen(
            [CONTAINERD, "--address", self.containerd_socket,
             "--root", os.path.join(self.dir, "containerd-root"),
             "--state", os.path.join(self.dir, "containerd-state")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while not os.path.exists(self.containerd_socket):
            if self.containerd.poll() is not None or time.monotonic() > deadline:
                raise EngineError(f"containerd did not start (exit {self.containerd.poll()}): "
                                  f"{self._tail(self.containerd_log)}")
            time.sleep(0.02)

    def dockerd_argv(self):
        argv = [DOCKERD, "-H", "unix://" + self.socket,
                "--data-root", os.path.join(self.dir, "data"),
                "--exec-root", os.path.join(self.dir, "exec"),
                "--pidfile", self.pidfile,
                "--containerd", self.containerd_socket,
                "--ip-forward=false", "--iptables=false",
                "--bridge", self.bridge, "--ipv6", "--fixed-cidr-v6", str(self.net6),
                "--log-level", "info"]
        if self.live_restore:
            argv.append("--live-restore")
        return argv

    def start_dockerd(self):
        """Start dockerd (first time, or after kill_dockerd) and wait for /_ping."""
        if self.dockerd is not None and self.dockerd.poll() is None:
            raise EngineError("dockerd is already running")
        try:
            os.unlink(self.pidfile)     # left by a SIGKILLed dockerd: it refuses to start
        except FileNotFoundError:
            pass
        argv = self.dockerd_argv()
        log = open(self.dockerd_log, "ab")
        self._logs.append(log)
        self.dockerd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=self.env)
        self.wait_ready()

    def wait_ready(self, timeout=None):
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        last = None
        while time.monotonic() < deadline:
            if self.dockerd.poll() is not None:
                raise EngineError(f"dockerd exited {self.dockerd.returncode}:\n"
                                  f"{self._tail(self.dockerd_log)}")
            try:
                status, body, _ = self.api("GET", "/_ping", timeout=2)
                if status == 200 and body == b"OK":
                    return
                last = f"HTTP {status} {body[:100]!r}"
            except OSError as e:
                last = str(e)
            time.sleep(0.05)
        raise EngineError(f"dockerd did not answer /_ping within {timeout or self.ready_timeout}"
                          f" s ({last}):\n{self._tail(self.dockerd_log)}")

    def kill_dockerd(self, sig=signal.SIGKILL):
        """Signal dockerd by its PID and wait until it is gone. Its docker-proxy children
        die with it (published ports stop answering until it is back); containers and
        their addresses stay (live-restore)."""
        p = self.dockerd
        if p is None or p.poll() is not None:
            raise EngineError("dockerd is not running")
        _stop(p, sig)

    def dockerd_pid(self):
        return self.dockerd.pid if self.dockerd is not None else None

    def _tail(self, path, n=LOG_TAIL):
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError as e:
            return f"({path}: {e})"

    def log_tail(self, n=LOG_TAIL):
        return self._tail(self.dockerd_log, n)

    # --- talking to it ---------------------------------------------------------------
    def api(self, method, path, body=None, timeout=10.0):
        """(status, body bytes, headers) of one Engine API request over the unix socket."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket)
            conn = http.client.HTTPConnection("localhost", timeout=timeout)
            conn.sock = sock
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            return resp.status, resp.read(), dict(resp.getheaders())
        finally:
            sock.close()

    def api_json(self, path):
        status, body, _ = self.api("GET", path)
        if status != 200:
            raise EngineError(f"GET {path}: HTTP {status} {body[:200]!r}")
        return json.loads(body)

    def docker(self, *args, check=True, timeout=CMD_TIMEOUT, input=None):
        """Run the docker CLI against our engine; returns its stdout, stripped."""
        cp = _run([DOCKER, *args], check=False, timeout=timeout, env=self.env, input=input)
        if check and cp.returncode != 0:
            raise EngineError(f"exit {cp.returncode}: docker {' '.join(args)}: "
                              f"{cp.stderr.strip()[-2000:]}")
        return cp.stdout.strip()

    def inspect(self, name):
        return self.api_json(f"/containers/{name}/json")

    def addresses(self, name, network="bridge"):
        """(IPv4, global IPv6) of container `name` on `network`."""
        net = self.inspect(name)["NetworkSettings"]["Networks"][network]
        return net["IPAddress"], net["GlobalIPv6Address"]

    def container_id(self, name):
        return self.inspect(name)["Id"]

    def containers(self, all_=True):
        return self.api_json("/containers/json" + ("?all=1" if all_ else ""))

    def remove(self, *names):
        if names:
            self.docker("rm", "-f", *names, check=False)

    def remove_all(self):
        try:
            ids = [c["Id"] for c in self.containers()]
        except (OSError, EngineError, ValueError):
            return
        if ids:
            self.docker("rm", "-f", *ids, check=False, timeout=120)

    def wait_http(self, host, port=80, timeout=10.0, path="/"):
        """Poll until http://host:port/path answers (a container's server is up)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(1.0)
            try:
                s.connect((host, port))
                return True
            except OSError as e:
                last = e
            finally:
                s.close()
            time.sleep(0.05)
        raise EngineError(f"nothing answers on {host}:{port} after {timeout}s ({last})")

    # --- images ----------------------------------------------------------------------
    def _busybox_binary(self):
        """/bin/busybox of Debian's busybox-static, fetched once into CACHE, not installed."""
        os.makedirs(CACHE, exist_ok=True)
        target = os.path.join(CACHE, "busybox-static", "bin", "busybox")
        if os.path.exists(target):
            return target
        debs = sorted(glob.glob(os.path.join(CACHE, "busybox-static_*.deb")))
        if not debs:
            cp = _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                       "busybox-static"], check=False, timeout=120, cwd=CACHE)
            debs = sorted(glob.glob(os.path.join(CACHE, "busybox-static_*.deb")))
            if not debs:
                raise EngineError("apt-get download busybox-static failed (run `apt-get "
                                  f"update` first?): {cp.stderr.strip()[-1000:]}")
        tmp = os.path.join(CACHE, f"busybox-static.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _run(["dpkg-deb", "-x", debs[-1], tmp])
        if not os.path.exists(os.path.join(tmp, "bin", "busybox")):
            raise EngineError(f"{debs[-1]} has no /bin/busybox")
        shutil.rmtree(os.path.join(CACHE, "busybox-static"), ignore_errors=True)
        os.rename(tmp, os.path.join(CACHE, "busybox-static"))
        return target

    def _import(self, tag, members, changes=()):
        """docker import of a tar built from `members` [(name, kind, data)]; kind is
        'dir', 'file' (data bytes or a path to copy), 'link' (data = target)."""
        tar_path = os.path.join(self.dir, tag.replace("/", "_").replace(":", "_") + ".tar")
        with tarfile.open(tar_path, "w") as tar:
            for name, kind, data in members:
                info = tarfile.TarInfo(name)
                info.mtime = int(time.time())
                if kind == "dir":
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                elif kind == "link":
                    info.type, info.linkname = tarfile.SYMTYPE, data
                    tar.addfile(info)
                else:
                    if isinstance(data, bytes):
                        info.size, info.mode = len(data), 0o644
                        tar.addfile(info, io.BytesIO(data))
                    else:
                        info.size, info.mode = os.path.getsize(data), 0o755
                        with open(data, "rb") as f:
                            tar.addfile(info, f)
        args = ["import"]
        for c in changes:
            args += ["-c", c]
        self.docker(*args, tar_path, tag, timeout=120)
        os.unlink(tar_path)
        return tag

    def busybox_image(self, tag=BB_IMAGE):
        """busybox httpd on port 80 serving /www (index.html = INDEX)."""
        bb = self._busybox_binary()
        return self._import(tag, [
            ("bin", "dir", None), ("bin/busybox", "file", bb), ("bin/sh", "link", "busybox"),
            ("www", "dir", None), ("www/index.html", "file", INDEX),
            ("tmp", "dir", None), ("etc", "dir", None), ("proc", "dir", None),
            ("sys", "dir", None), ("dev", "dir", None)],
            ['CMD ["/bin/busybox","httpd","-f","-p","80","-h","/www"]'])

    def usr_image(self, tag=USR_IMAGE):
        """Only the usrmerge symlinks and empty directories: run with usr_run_args()."""
        members = [(d, "dir", None) for d in ("usr", "etc", "tmp", "proc", "sys", "dev", "run")]
        members += [(n, "link", t) for n, t in (("bin", "usr/bin"), ("sbin", "usr/sbin"),
                                                 ("lib", "usr/lib"), ("lib64", "usr/lib64"))]
        return self._import(tag, members)

    @staticmethod
    def usr_run_args():
        """docker run options that make the "usr" image a Debian userland: the host's
        /usr, read-only."""
        if not os.path.exists(PYTHON):
            raise EngineError(f"{PYTHON} is missing: the usr image runs the host's Python")
        return ["-v", "/usr:/usr:ro"]

    # --- teardown --------------------------------------------------------------------
    def close(self):
        """Everything gone: containers, dockerd, containerd (by PID), leftovers rooted in
        or started from our directory (by PID), mounts, the bridge, the directory."""
        if not self.started:
            return
        self.started = False
        try:
            if self.dockerd is not None and self.dockerd.poll() is None:
                self.remove_all()
                _stop(self.dockerd)
            # With live-restore (or a dockerd that was killed) containers may still run:
            # their shims and processes are ours, found by our directory.
            pids = [p for p in _pids_of(self.dir)
                    if self.containerd is None or p != self.containerd.pid]
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            _wait_gone(pids, STOP_GRACE)
            if self.containerd is not None and self.containerd.poll() is None:
                _stop(self.containerd)
            _kill_tree_of(self.dir)
        finally:
            for log in self._logs:
                log.close()
            self._logs = []
            if _link_exists(self.bridge):
                _run(["ip", "link", "del", self.bridge], check=False)
            _remove_dir(self.dir)
            with _engines_lock:
                if self in _engines:
                    _engines.remove(self)


def _close_all():
    with _engines_lock:
        engines = list(_engines)
    for e in engines:
        try:
            e.close()
        except Exception:
            pass


atexit.register(_close_all)
