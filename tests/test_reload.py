"""The reload state machine (Reloader) and the interface's comings and goings
(InterfaceWatch) without a socket: a Daemon built in-process from its parts, a fake ring,
fake compile steps and a fake interface, driven the way the capture loop drives them."""
import ipaddress
import threading
import time

import pytest

import lpd
import packets

pytestmark = pytest.mark.unit

NET = ipaddress.ip_network("10.0.0.0/8")
NET2 = ipaddress.ip_network("192.0.2.0/24")
MAC = "02:00:00:00:00:02"                       # the source of udp4's frames


def udp4(src, dst, payload=b"x" * 20):
    return packets.ether("02:00:00:00:00:01", MAC, packets.ETH_IP,
                         packets.ipv4(src, dst, packets.PROTO_UDP, packets.udp(1000, 2000, payload)))


def rules(text):
    return lpd.RuleCounter(lpd.parse_filter_text(text, "t", None))


class FakeRing:
    """The parts of Ring the reload and the interface watch use."""

    def __init__(self, queued=1, ifindex=1):
        self.programs, self.queued, self.ifindex = [], queued, ifindex
        self.filling = False             # the kernel's block holds frames, not yet retired
        self.drops, self.closed, self.sock = 0, False, None

    def attach(self, prog):
        self.programs.append(prog)

    def queued_blocks(self):
        return self.queued

    def ready(self):
        return self.filling

    def fileno(self):
        return 1000 + self.ifindex

    def read_stats(self):
        pass

    def drain(self, process_block):
        return False

    def close(self):
        self.closed = True


class FakePoller:
    def __init__(self):
        self.fds = set()

    def register(self, fd, events=0):
        self.fds.add(fd)

    def unregister(self, fd):
        self.fds.remove(fd)


def daemon(rule_counter, awaiting=False, kernel=None, compile_step=None):
    opts = lpd.parse_args(["--mapping-url", "none"])
    dec = lpd.Decoder(lpd.LocalAddresses([NET]), [rule_counter] if rule_counter else [])
    # as choose_stages() builds them: a stage the options leave off is not there
    stages = {"addresses": dec.local, **({"rules": rule_counter} if rule_counter else {})}
    d = lpd.Daemon(opts, "lo", lpd.CaptureParts(dec, stages, kernel=kernel), lpd.Published(),
                   awaiting=awaiting)
    if compile_step is not None:
        d.reloader.compile_step = compile_step
    return d


def feed(d, frames):
    for block in lpd.frames_to_blocks(frames):
        d.process_block(memoryview(block), 0)


def compiled(d, timeout=5):
    """The reload thread's job done (as the loop finds it when woken)."""
    d.reloader.thread.join(timeout)
    assert not d.reloader.thread.is_alive()


class Steps:
    """A fake compile step: each call (on the reload thread) waits for go.release() and
    hands over the next of `results` (None: a compile that failed)."""

    def __init__(self, *results):
        self.results, self.threads = list(results), []
        self.started, self.go = threading.Semaphore(0), threading.Semaphore(0)

    def __call__(self):
        self.threads.append(threading.current_thread().name)
        self.started.release()
        self.go.acquire(timeout=5)
        return self.results.pop(0)


# --- the reload state machine -------------------------------------------------------------

def test_a_reload_requested_while_one_compiles_runs_once_more_afterwards():
    first, second = rules("first;ip\n"), rules("second;ip\n")
    step = Steps(lpd.Adoption(first, [NET]), lpd.Adoption(second, [NET]))
    d = daemon(rules("old;ip\n"), compile_step=step)
    r = d.reloader
    r.requested = True
    assert r.idle() and r.start() and not r.requested
    assert step.started.acquire(timeout=5)
    r.requested = True                              # SIGHUP while it compiles
    r.requested = True                              # and another: still one more, not two
    assert not r.idle() and not r.start() and r.requested
    step.go.release()
    compiled(d)
    assert r.pending is not None and not r.start()  # compiled, not adopted: still not idle
    assert d.rules is not first
    r.advance(time.monotonic())
    assert d.rules is first and r.idle() and r.requested
    assert r.start() and not r.requested            # the one owed
    assert step.started.acquire(timeout=5)
    step.go.release()
    compiled(d)
    r.advance(time.monotonic())
    assert d.rules is second and r.idle() and not r.requested
    assert step.threads == ["reload", "reload"]


def test_a_failed_compile_keeps_the_running_configuration(monkeypatch, capsys):
    old = rules("old;ip\n")
    d = daemon(old)
    d.opts.filter_file, d.opts.local_nets = "/nonexistent/rules", [NET]
    r = d.reloader
    assert r.start()
    compiled(d)
    assert r.pending is None and r.idle()           # nothing handed over
    r.advance(time.monotonic())
    assert d.rules is old
    err = capsys.readouterr().err
    assert "lpd: reload failed, keeping the running configuration: /nonexistent/rules: " \
        "cannot read filter file" in err and "reloaded" not in err

    def broken(opts, ifname, awaiting=False):       # not an LpdError: named by its type
        raise KeyError("x")
    monkeypatch.setattr(lpd, "load_rules", broken)
    assert r.start()
    compiled(d)
    assert r.pending is None and r.idle()
    assert "reload failed, keeping the running configuration: KeyError: 'x'" in \
        capsys.readouterr().err
    frame = udp4("10.0.0.1", "10.0.0.2")
    feed(d, [(frame, len(frame))] * 2)              # the old rules still count
    assert old.snapshot().rows == (("old", 2 * len(frame), 2),)
    monkeypatch.setattr(lpd, "load_rules", lambda opts, ifname, awaiting=False: rules("new;ip\n"))
    assert r.start()                                # and the next reload works
    compiled(d)
    r.advance(time.monotonic())
    assert d.rules.ids == ("new",)
    assert d.rules.snapshot().rows == (("new", 0, 0),)   # no rule of that name before


def test_compiled_rules_count_only_from_the_block_after_the_capture_thread_adopts_them():
    old, new = rules("r;ip\n"), rules("r;ip\nudp;udp\n")
    step = Steps(lpd.Adoption(new, [NET]))
    d = daemon(old, compile_step=step)
    step.go.release()
    assert d.reloader.start()
    compiled(d)
    frame = udp4("10.0.0.1", "10.0.0.2")
    feed(d, [(frame, len(frame))] * 3)              # blocks read before the loop comes round
    assert d.rules is old
    d.reloader.advance(time.monotonic())            # between blocks
    feed(d, [(frame, len(frame))] * 2)
    assert d.rules is new
    assert new.snapshot().rows == (("r", 5 * len(frame), 5), ("udp", 2 * len(frame), 2))


def test_a_reload_requested_while_widening_starts_after_the_drain():
    old = rules("all;ip\n")
    d = daemon(old)
    ring = d.ring = FakeRing(queued=2)
    big = rules("all;ip\nbig;ether[300] = 1\n")
    d.reloader.adopt(lpd.Adoption(big, [NET]))
    r = d.reloader
    assert r.widening is not None and not r.idle()
    r.requested = True
    assert not r.start() and r.requested            # behind the widening
    ring.filling = True
    r.advance(r.widening.deadline + 1)              # past the deadline, two blocks queued
    assert d.rules is old
    frame = udp4("10.0.0.1", "10.0.0.2")
    feed(d, [(frame, len(frame))])                  # the first queued block
    r.advance(r.widening.deadline + 1)              # the kernel's block not retired yet
    assert d.rules is old
    ring.filling = False
    r.advance(r.widening.deadline)                  # drained: the widened rules count
    assert d.rules is big and r.idle()
    third = rules("third;ip\n")
    r.compile_step = Steps(lpd.Adoption(third, [NET]))
    r.compile_step.go.release()
    assert r.start()
    compiled(d)
    r.advance(time.monotonic())
    assert d.rules is third


def test_a_compile_begun_while_awaiting_the_interface_runs_again_once_it_appeared(monkeypatch,
                                                                                   tmp_path):
    """Rules compiled with the stand-in $MAC are never adopted over the real ones."""
    path = tmp_path / "rules"
    path.write_text("me;ether src $MAC\n")
    link = Link(monkeypatch, index=7, mac=MAC)
    release = threading.Event()
    real_load = lpd.load_rules

    def load(opts, ifname, awaiting=False):
        if awaiting:
            release.wait(5)                         # the reload thread, slow
        return real_load(opts, ifname, awaiting)
    monkeypatch.setattr(lpd, "load_rules", load)
    d = daemon(None, awaiting=True)
    d.opts.filter_file, d.opts.local_nets = str(path), [NET]
    r = d.reloader
    assert r.start()
    d.watch.appeared()                              # the capture thread, meanwhile
    assert not d.watch.awaiting and d.rules.ids == ("me",)
    appeared = d.rules
    release.set()
    compiled(d)
    assert r.pending is None and r.requested        # thrown away, and owed again
    r.advance(time.monotonic())
    assert d.rules is appeared
    assert r.start()
    compiled(d)
    r.advance(time.monotonic())
    frame = udp4("10.0.0.1", "10.0.0.2")
    feed(d, [(frame, len(frame))])
    assert d.rules.snapshot().rows == (("me", len(frame), 1),)    # $MAC: the real address


def test_a_result_compiled_while_awaiting_is_dropped_if_the_interface_appeared_before_adoption(
        monkeypatch, tmp_path):
    """The window after compile_rules() looked (a slow eBPF prepare): the interface
    appears, then the stale result comes; the capture thread drops it and compiles
    again instead of adopting rules with the stand-in $MAC over the real ones."""
    path = tmp_path / "rules"
    path.write_text("me;ether src $MAC\n")
    Link(monkeypatch, index=7, mac=MAC)
    d = daemon(None, awaiting=True)
    d.opts.filter_file, d.opts.local_nets = str(path), [NET]
    stale = lpd.Adoption(rules("stale;ip\n"), [NET], awaiting=True)
    d.watch.appeared()
    appeared = d.rules
    d.reloader.adopt(stale)
    assert d.rules is appeared and d.reloader.requested


def test_widening_reload_lets_frames_cut_short_drain_through_the_old_rules():
    old = rules("all;ip\n")
    d = daemon(old)
    ring = d.ring = FakeRing(queued=2)
    whole = udp4("10.0.0.1", "10.0.0.2", b"\x42" * 400)
    cut = whole[:d.decoder.snaplen()]               # what the old kernel program copied
    new = rules("all;ip\nbig;ether[300] = 0x42\n")
    d.reloader.adopt(lpd.Adoption(new, [NET]))
    assert ring.programs == [lpd.kernel_program(None, new.snaplen())] and new.snaplen() >= 301
    assert d.rules is old and d.reloader.widening is not None   # widened, not yet swapped
    feed(d, [(cut, len(whole))] * 3)                          # queued before the widening
    assert d.rules is old
    feed(d, [(cut, len(whole))] * 2)                          # the kernel's half-full block
    assert d.rules is new and d.reloader.widening is None
    assert new.snapshot().rows == (("all", 5 * len(whole), 5), ("big", 0, 0))
    feed(d, [(whole, len(whole))] * 4)                        # after: whole frames
    assert new.snapshot().rows == (("all", 9 * len(whole), 9), ("big", 4 * len(whole), 4))


def test_narrowing_reload_swaps_first_then_narrows_the_kernel_program():
    old = rules("big;ether[300] = 0x42\n")
    d = daemon(old)
    ring = d.ring = FakeRing(queued=3)
    wide = d.decoder.snaplen()
    d.reloader.adopt(lpd.Adoption(rules("all;ip\n"), [NET]))
    assert d.reloader.widening is None and d.rules.ids == ("all",)
    assert ring.programs == [lpd.kernel_program(None, lpd.SNAPLEN_ACCOUNTING)]
    assert wide > lpd.SNAPLEN_ACCOUNTING


def test_widening_ends_by_deadline_when_the_kernel_block_stays_empty():
    d = daemon(rules("all;ip\n"))
    d.ring = FakeRing(queued=1)                    # nothing queued, the kernel's block empty
    d.reloader.adopt(lpd.Adoption(rules("big;ether[300] = 1\n"), [NET]))
    assert d.reloader.widening is not None and d.reloader.widen_blocks == 1
    time.sleep(lpd.WIDEN_DRAIN_SECONDS + 0.01)
    d.reloader.advance(time.monotonic())
    assert d.reloader.widening is None and d.rules.ids == ("big",)


def test_reload_compiles_off_the_capture_thread(monkeypatch, tmp_path):
    """The capture thread never waits for a compile (nor for DNS): the slow part runs in
    the reload thread and only a finished result is handed over."""
    started, release = threading.Event(), threading.Event()
    slow = rules("all;ip\n")

    def load(opts, ifname, awaiting=False):
        started.set()
        release.wait(5)
        return slow

    monkeypatch.setattr(lpd, "load_rules", load)
    d = daemon(rules("old;ip\n"))
    d.opts.filter_file, d.opts.local_nets = str(tmp_path / "f"), [NET]
    assert d.reloader.start()
    assert started.wait(5)
    frame = udp4("10.0.0.1", "10.0.0.2")
    feed(d, [(frame, len(frame))] * 3)              # capture goes on meanwhile
    assert d.reloader.pending is None and d.rules.snapshot().rows == (("old", 3 * len(frame), 3),)
    release.set()
    d.reloader.thread.join(5)
    assert d.reloader.pending is not None
    d.reloader.advance(time.monotonic())
    assert d.rules is slow


def test_a_widening_the_kernel_refuses_keeps_the_running_rules():
    old = rules("all;ip\n")
    d = daemon(old)
    ring = d.ring = FakeRing(queued=1)

    def refuse(prog):
        raise OSError(12, "Cannot allocate memory")
    ring.attach = refuse
    d.reloader.adopt(lpd.Adoption(rules("big;ether[300] = 1\n"), [NET]))
    assert d.rules is old and d.reloader.widening is None
    assert d.decoder.snaplen() == lpd.SNAPLEN_ACCOUNTING     # still what the kernel copies
    ring.attach = ring.programs.append                       # the next reload tries again
    d.reloader.adopt(lpd.Adoption(rules("big;ether[300] = 1\n"), [NET]))
    assert d.reloader.widening is not None and len(ring.programs) == 1


def test_the_interface_appearing_supersedes_a_compile_made_with_the_stand_in_mac(monkeypatch,
                                                                                  tmp_path):
    path = tmp_path / "rules"
    path.write_text("me;ether src $MAC\n")
    link = Link(monkeypatch, index=None, mac=MAC)
    d = daemon(None, awaiting=True)
    d.opts.filter_file, d.opts.local_nets = str(path), [NET]
    assert d.reloader.start()                       # SIGHUP while awaited
    compiled(d)
    assert d.reloader.pending is not None           # the stand-in $MAC's, not adopted yet
    link.index = 3
    d.watch.appeared()
    assert d.reloader.pending is None and d.reloader.idle()
    d.reloader.advance(time.monotonic())
    frame = udp4("10.0.0.1", "10.0.0.2")
    feed(d, [(frame, len(frame))])
    assert d.rules.snapshot().rows == (("me", len(frame), 1),)


# --- the interface: lost, back, awaited, new networks ----------------------------------------

class Link:
    """The interface as the watch reads it (netlink and ioctls, here attributes)."""

    def __init__(self, monkeypatch, index=None, up=True, mac=MAC, nets=(NET,)):
        self.index, self.up, self.mac, self.nets = index, up, mac, list(nets)
        monkeypatch.setattr(lpd, "interface_index", lambda name: self.index)
        monkeypatch.setattr(lpd, "interface_flags", lambda name: None if self.index is None
                            else lpd.IFF_UP if self.up else 0)
        monkeypatch.setattr(lpd, "interface_mac", self.address)
        monkeypatch.setattr(lpd, "interface_local_nets", self.networks)

    def address(self, name):
        if self.index is None:
            raise lpd.ConfigError(f"{name}: no such interface")
        return self.mac

    def networks(self, name):
        self.address(name)
        return list(self.nets)


def watched(d, link):
    """d's rings are FakeRings on the link's index as it is when one opens."""
    d.poller, d.opened = FakePoller(), []

    def open_ring():
        d.ring = FakeRing(ifindex=link.index)
        d.poller.register(d.ring.fileno())
        d.opened.append(d.ring)
    d.open_ring = open_ring
    return d


def test_an_interface_lost_and_back_keeps_its_counters_and_captures_again(monkeypatch, capsys):
    link = Link(monkeypatch, index=5)
    d = watched(daemon(rules("all;ip\n")), link)
    d.watch.open()                                  # as start-up does
    first = d.ring
    first.drops = 3
    frame = udp4("10.0.0.1", "10.0.0.2")
    feed(d, [(frame, len(frame))] * 2)
    link.index = None                               # gone
    d.watch.check()
    assert d.ring is None and first.closed and d.watch.past_drops == 3 and not d.poller.fds
    assert d.published.latest()["interface"].drops == 3
    d.watch.check()                                 # still gone: nothing
    link.index, link.up = 6, False                  # back, down
    d.watch.check()
    assert d.ring is None
    link.up = True
    d.watch.check()
    second = d.ring
    assert second is not None and second.ifindex == 6 and d.poller.fds == {second.fileno()}
    second.drops = 1
    link.index = 8                                  # replaced: reopened in the same check
    d.watch.check()
    assert second.closed and d.ring.ifindex == 8 and d.watch.past_drops == 4
    assert d.rules.snapshot().rows == (("all", 2 * len(frame), 2),)    # counters kept
    err = capsys.readouterr().err
    assert err.count("lpd: lo: interface is gone or down; counters kept, retrying every "
                     "second\n") == 1
    assert err.count("lpd: lo: interface was replaced; counters kept") == 1
    assert err.count("lpd: lo: capturing again\n") == 2 and "lpd: lo: capturing\n" not in err
    assert not d.reloader.requested                 # the same address: no reload


def test_a_widening_ends_when_the_interface_is_lost(monkeypatch):
    link = Link(monkeypatch, index=5)
    d = watched(daemon(rules("all;ip\n")), link)
    d.watch.open()
    d.ring.queued = 3
    big = rules("all;ip\nbig;ether[300] = 1\n")
    d.reloader.adopt(lpd.Adoption(big, [NET]))
    assert d.reloader.widening is not None
    link.index = None
    d.watch.check()                                 # the ring drained and closed: nothing
    assert d.rules is big and d.reloader.idle()     # cut short is left


def test_an_interface_back_with_another_address_reloads_rules_naming_dollar_mac(monkeypatch,
                                                                                 capsys):
    link = Link(monkeypatch, index=5)
    d = watched(daemon(rules("all;ip\n")), link)
    d.watch.open()
    link.index = None
    d.watch.check()
    link.index, link.mac = 6, "02:00:00:00:00:99"
    d.watch.check()
    assert not d.reloader.requested                 # no filter file: nothing names $MAC
    link.index = None
    d.watch.check()
    d.opts.filter_file = "rules"
    link.index, link.mac = 7, MAC
    d.watch.check()
    assert d.reloader.requested and d.ring is not None
    assert f"lpd: lo: its address is now {MAC}: reloading the rules" in capsys.readouterr().err


def test_an_awaited_interface_reads_its_address_and_networks_before_its_first_frame(
        monkeypatch, tmp_path, capsys):
    path = tmp_path / "rules"
    path.write_text("me;ether src $MAC\nall;ip\n")
    link = Link(monkeypatch, index=None, nets=(NET, NET2))
    d = daemon(None, awaiting=True)
    d.opts.filter_file = str(path)
    watched(d, link)
    d.watch.check()
    assert d.watch.awaiting and d.ring is None and d.rules is None
    link.index = 4
    d.watch.check()
    assert not d.watch.awaiting and d.opened == [d.ring]
    assert d.local.local_nets == [NET, NET2]
    frame = udp4("10.0.0.1", "192.0.2.1")
    feed(d, [(frame, len(frame))])
    assert d.rules.snapshot().rows == (("me", len(frame), 1), ("all", len(frame), 1))
    err = capsys.readouterr().err
    assert "lpd: lo appeared: 2 rules, 2 local networks\nlpd: lo: capturing\n" in err


class FakeKernel:
    """--engine ebpf's KernelAccounting as the reload sees it: where each step ran."""

    def __init__(self):
        self.calls = []

    def prepare(self, rules, nets):
        self.calls.append(("prepare", threading.current_thread().name, list(nets)))
        return ("program", list(nets))

    def swap(self, sock, prepared):
        self.calls.append(("swap", threading.current_thread().name, prepared[1]))

    def interface_snapshot(self, frames, drops, up):
        return lpd.InterfaceSnapshot(drops=drops, up=up)

    def rule_snapshot(self):
        return lpd.RuleSnapshot()


def test_new_networks_under_ebpf_are_built_on_the_reload_thread_and_adopted_between_blocks(
        monkeypatch, capsys):
    link = Link(monkeypatch, index=5)
    kernel = FakeKernel()
    d = watched(daemon(None, kernel=kernel), link)
    d.watch.open()
    link.nets = [NET, NET2]                         # an address added while capturing
    d.watch.refresh_nets()
    compiled(d)
    assert kernel.calls == [("prepare", "reload", [NET, NET2])]
    assert d.local.local_nets == [NET]              # not before the capture thread adopts
    d.reloader.advance(time.monotonic())
    assert kernel.calls[1:] == [("swap", threading.current_thread().name, [NET, NET2])]
    assert d.local.local_nets == [NET, NET2] and d.reloader.idle()
    assert "lpd: lo: new networks: 0 rules, 2 local networks" in capsys.readouterr().err
    link.index = None                               # lost: the next ring's program is
    d.watch.check()                                 # built before it opens, at once
    link.index, link.nets = 6, [NET2]
    d.watch.check()
    assert kernel.calls[2:] == [("prepare", threading.current_thread().name, [NET2]),
                                ("swap", threading.current_thread().name, [NET2])]
    assert d.local.local_nets == [NET2] and d.ring is not None
