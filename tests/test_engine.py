"""--engine ebpf (issue 15): lpd's own eBPF socket program against lpd's userspace.

Differential: the accounting program with random rules translated from lpd's classic
programs runs on every corpus frame through BPF_PROG_TEST_RUN; each rule's verdict,
the interface totals, the malformed counts and every local address's counters must be
those of lpd's classic interpreter and Decoder. Live: a cbpf and an ebpf lpd on the
same veth at the same time must publish the same numbers; reload and interface loss
keep every count; nothing is copied to userspace."""
import ipaddress
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import lpd
import netns
from conftest import CORPUS
from harness import LPD, Instance, metrics, parse_lines, read_socket, twin_run, wait_for

pytestmark = pytest.mark.live

HERE = os.path.dirname(os.path.abspath(__file__))
EXPRESSIONS = os.path.join(HERE, "filter_expressions.txt")
TEST_RUN_MAX = 3000        # data_in must fit a page with the skb's head and tail room
DIFF_NETS = [ipaddress.ip_network(n) for n in
             ("10.0.0.0/8", "192.168.0.0/16", "172.16.0.0/12", "131.151.32.0/21", "224.0.0.0/4",
              "fe80::/10", "ff02::/16", "2001:db8::/32", "3ffe:500::/24")]
# test_run cannot make OUTGOING frames or VLAN metadata: those are checked live
PKTTYPES = (lpd.PACKET_HOST, lpd.PACKET_MULTICAST, lpd.PACKET_OTHERHOST)
# loads at the view's edge and past it, ancillary loads: in every run
EDGE_RULES = ("ether[127:4] = 0", "ether[128:2] != 0x1234", "ether[130:4] != 0", "ip[200] = 0",
              "ip6[110:4] != 7", "ether[1400] = 0", "len >= 129 and len <= 133",
              "vlan or ether proto 0x9100", "ether multicast")
MAX_MASK_RULES = 32        # VERDICT_MASK: a bit per rule


def corpus_frames():
    out = []
    for name in sorted(os.listdir(CORPUS)):
        if not name.endswith(".pcap"):
            continue
        try:
            out += [bytes(d) for _, _, d in lpd.read_pcap(os.path.join(CORPUS, name))
                    if len(d) <= TEST_RUN_MAX]
        except lpd.LpdError:
            continue
    assert len(out) > 5000, f"only {len(out)} corpus frames under {CORPUS}"
    return out


def edge_frames(rng):
    """Every length 0..140 of an IPv4 and an IPv6 UDP frame, stacked tags to the view's
    end, header bytes flipped at random."""
    a, b = netns.MAC_A, netns.MAC_B
    u4 = netns.udp_frame(a, b, "10.1.2.3", "192.168.7.8", 200)
    u6 = netns.udp_frame(a, b, "fe80::1", "2001:db8::9", 200)
    out = [u4[:n] for n in range(141)] + [u6[:n] for n in range(141)]
    for ntags in range(32):
        tags = [(rng.choice((0x8100, 0x88A8, 0x9100)), rng.randrange(4096)) for _ in range(ntags)]
        out.append(netns.udp_frame(a, b, "10.1.2.3", "10.9.9.9", 300, vlans=tags))
        out.append(netns.udp_frame(a, b, "fe80::2", "ff02::1", 300, vlans=tags))
    for _ in range(200):
        f = bytearray(rng.choice((u4, u6)))
        for _ in range(3):
            f[rng.randrange(12, 60)] = rng.randrange(256)
        out.append(bytes(f))
    return out


def pick_rules(n, seed):
    rng = random.Random(seed)
    with open(EXPRESSIONS) as f:
        exprs = [e.strip() for e in f if e.strip() and not e.startswith("#")]
    rng.shuffle(exprs)
    picked, refused = [], []
    for e in exprs:
        try:
            prog = lpd.compile_filter(e)
        except lpd.FilterError:
            continue
        try:
            lpd.emit_rule(lpd.Gen(), prog, 0, 0)
        except lpd.Untranslatable:
            refused.append(e)
            continue
        picked.append((e, prog))
        if len(picked) == n:
            break
    return picked, refused


def userspace(frames, nets):
    """lpd's Decoder + LocalAddresses on the frames as the ring hands them."""
    local = lpd.LocalAddresses(nets)
    dec = lpd.Decoder(local, [local])
    synth = [lpd.SynthFrame(d[:lpd.SNAPLEN_ACCOUNTING], len(d), pt) for d, pt in frames]
    for block in lpd.frames_to_blocks(synth):
        dec.process_block(block, 0)
    addrs = {}
    for v, t in local.tables.items():
        for key, e in t.hosts.items():
            if any(e):
                addrs[(v, str(lpd.address((v, key))))] = list(e)
    return dec.totals, dict(dec.malformed), addrs


@pytest.mark.parametrize("seed", [15, 1504])
def test_translated_rules_and_decoder_match_userspace_on_the_corpus(seed):
    rng = random.Random(seed)
    frames = [(d, rng.choice(PKTTYPES)) for d in corpus_frames() + edge_frames(rng)]
    rules, refused = pick_rules(MAX_MASK_RULES - len(EDGE_RULES), seed)
    rules += [(e, lpd.compile_filter(e)) for e in EDGE_RULES]
    progs = [p for _, p in rules]
    maps = lpd.make_maps(len(progs))
    try:
        image, labels = lpd.build_program(maps, DIFF_NETS, progs, verdict=lpd.VERDICT_MASK)
        prog = lpd.Program(image, labels, name="lpd_diff")
        mismatches, expect = [], [[0, 0] for _ in progs]
        for data, pt in frames:
            mask, _ = lpd.test_run(prog.fd, data, pt)
            for i, p in enumerate(progs):
                want = lpd.bpf_interpret(p, data, len(data), pt) != 0
                if want:
                    expect[i][0] += len(data)
                    expect[i][1] += 1
                if want != bool(mask >> i & 1):
                    mismatches.append((rules[i][0], len(data), pt, want))
        assert not mismatches, mismatches[:10]
        assert sum(p for _, p in expect) > 1000, "the rules matched almost nothing"
        iface, addrs, got = lpd.read_counters(maps, len(progs))
        assert [tuple(e) for e in expect] == got
        totals, malformed, uaddrs = userspace(frames, DIFF_NETS)
        assert [iface[f] for f in lpd.IFACE_FIELDS[:4]] == totals
        assert {r: iface["malformed_" + r] for r in lpd.MALFORMED_REASONS} == malformed
        assert sum(malformed.values()) > 0
        assert addrs == uaddrs and len(addrs) > 50
        prog.close()
    finally:
        for m in maps.values():
            m.close()


# --- the address tables under a flood, offline: BPF_PROG_TEST_RUN and sync() ticks ----

FLOOD_NETS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "fd00::/8")]
FLOOD_LOCAL_MAX = 64
FLOOD_PER_TICK = 400          # new spoofed sources an interval: several times the table
FLOOD_TICKS = 4
SPOOF_SIZE, BUSY_SIZE, NEW_SIZE = 64, 200, 300
BUSY = ("10.9.0.1", "fd00::9")
NEWCOMER_DURING, NEWCOMER_AFTER = "10.200.0.1", "fd00::200"
# An interval, each newcomer: 3,000 bytes, more than all the flood's bytes its sample
# slot gets (the flood's unattributed ~340 frames over 16 slots, ~21 each: 1,350 bytes)
NEWCOMER_FRAMES = 10


def frame_from(src, size, dst="192.0.2.1"):
    """A frame from a local address to a remote one (one local end: one attribution)."""
    return netns.udp_frame(netns.MAC_A, netns.MAC_B, src, "2001:db8::1" if ":" in src else dst,
                           size)


class Engines:
    """The same frames through the kernel program (KernelAccounting, frames by
    BPF_PROG_TEST_RUN) and the classic path's Decoder, each ticking its own table of
    FLOOD_LOCAL_MAX addresses at the same points."""

    def __init__(self):
        self.klocal = lpd.LocalAddresses(FLOOD_NETS, local_max=FLOOD_LOCAL_MAX)
        self.kernel = lpd.KernelAccounting(self.klocal, None)
        self.kernel.sample_hash = lpd.SAMPLE_HASH      # the same slots at every run
        self.fd = self.kernel.program_for(False, None)
        self.ulocal = lpd.LocalAddresses(FLOOD_NETS, local_max=FLOOD_LOCAL_MAX)
        self.decoder = lpd.Decoder(self.ulocal, [])
        self.now = 0.0

    def interval(self, frames):
        for f in frames:
            lpd.test_run(self.fd, f)
        for block in lpd.frames_to_blocks([lpd.SynthFrame(f, len(f)) for f in frames]):
            self.decoder.process_block(block, 0)
        self.now += 1.0
        self.kernel.sync()
        for local in (self.klocal, self.ulocal):
            local.tick(self.now)
        self.kernel.expire()

    @staticmethod
    def counts(local, ip):
        a = ipaddress.ip_address(ip)
        return local.tables[a.version].hosts.get(int(a) if a.version == 4 else a.packed)

    def spoofed_held(self, local, spoofed):
        """Spoofed addresses the table held at some point: tracked now, or evicted."""
        tracked = sum(1 for v, t in local.tables.items() for k in t.hosts
                      if str(lpd.address((v, k))) in spoofed)
        return local.evictions + tracked

    def close(self):
        self.kernel.close()


def test_kernel_tables_keep_busy_hosts_exact_and_let_newcomers_in_under_a_flood():
    """A sustained flood of spoofed local sources, several tables' worth an interval:
    the busy hosts keep every frame (as on the classic path), a host that starts
    during the flood is counted exactly from the next tick (the overflow sample lets
    it in), one that starts after it from its first frame; what went unattributed is
    exactly what no table held, and the interface totals are every frame."""
    rng = random.Random(7)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})    # one CPU's values, one CPU's sample slots
    e = Engines()
    try:
        busy_sent = dict.fromkeys(BUSY, 0)
        e.interval([frame_from(ip, BUSY_SIZE) for ip in BUSY])
        for ip in BUSY:
            busy_sent[ip] += BUSY_SIZE
        spoofed, sent, newcomer_after_tick = [], [], 0
        for tick in range(FLOOD_TICKS):
            sources = [f"10.1.{(len(spoofed) + i) // 250}.{(len(spoofed) + i) % 250 + 1}"
                       if i % 2 else f"fd00::1:{len(spoofed) + i:x}" for i in range(FLOOD_PER_TICK)]
            spoofed += sources
            frames = [frame_from(ip, SPOOF_SIZE) for ip in sources]
            # The newcomer's frames all come once newcomers is full: only the sample sees it
            for _ in range(NEWCOMER_FRAMES):
                frames.insert(rng.randrange(2 * FLOOD_LOCAL_MAX, len(frames)),
                              frame_from(NEWCOMER_DURING, NEW_SIZE))
            for ip in BUSY:
                for _ in range(3):
                    frames.insert(rng.randrange(len(frames)), frame_from(ip, BUSY_SIZE))
                    busy_sent[ip] += BUSY_SIZE
            sent += frames
            e.interval(frames)
            if tick:
                newcomer_after_tick += NEWCOMER_FRAMES * NEW_SIZE
        for ip in BUSY:
            assert e.counts(e.klocal, ip)[lpd.TX_BYTES] == busy_sent[ip]
            assert e.counts(e.ulocal, ip)[lpd.TX_BYTES] == busy_sent[ip]
        assert e.counts(e.klocal, NEWCOMER_DURING)[lpd.TX_BYTES] == newcomer_after_tick
        assert e.klocal.tracked() <= FLOOD_LOCAL_MAX
        iface = e.kernel.interface()
        spoofed = set(spoofed)
        lost_newcomer = NEWCOMER_FRAMES                 # its first interval, before the sample
        assert iface["unattributed_packets"] == \
            len(spoofed) - e.spoofed_held(e.klocal, spoofed) + lost_newcomer
        assert iface["unattributed_bytes"] == (iface["unattributed_packets"] - lost_newcomer) * \
            SPOOF_SIZE + lost_newcomer * NEW_SIZE
        assert [iface[f] for f in lpd.IFACE_FIELDS[:4]] == e.decoder.totals
        # After the flood: a new host is counted from its first frame
        e.interval([frame_from(NEWCOMER_AFTER, NEW_SIZE)] * NEWCOMER_FRAMES)
        assert e.counts(e.klocal, NEWCOMER_AFTER)[lpd.TX_BYTES] == NEWCOMER_FRAMES * NEW_SIZE
        assert e.kernel.interface()["unattributed_packets"] == iface["unattributed_packets"]
    finally:
        e.close()
        os.sched_setaffinity(0, cpus)


def test_a_reload_builds_and_verifies_off_the_capture_thread(monkeypatch):
    """KernelAccounting.prepare (the reload thread) builds, loads and verifies the new
    program; swap (the capture thread) only attaches it and carries the counts: no
    build_program or BPF_PROG_LOAD on the capture thread. The reload thread's
    Reloader.compile_rules hands it over in `pending`."""
    import threading
    import types
    local = lpd.LocalAddresses(FLOOD_NETS)
    rules = lpd.RuleCounter(lpd.parse_filter_text("udp;udp\nbig;greater 150\n", "t", None))
    kernel = lpd.KernelAccounting(local, rules)
    try:
        fd = kernel.program_for(False, None)
        frame = frame_from("10.0.0.1", 200)
        lpd.test_run(fd, frame)
        new = lpd.RuleCounter(lpd.parse_filter_text("big;greater 150\nsmall;less 100\n", "t", None))
        where = []
        real_build = lpd.build_program

        def build(*args, **kw):
            where.append(threading.current_thread().name)
            return real_build(*args, **kw)
        monkeypatch.setattr(lpd, "build_program", build)
        daemon = types.SimpleNamespace(geo=None, opts=types.SimpleNamespace(local_nets=FLOOD_NETS),
                                       ifname="x", kernel=kernel, local=local,
                                       watch=types.SimpleNamespace(awaiting=False))
        monkeypatch.setattr(lpd, "load_rules", lambda opts, ifname, awaiting=False: new)
        reloader = lpd.Reloader(daemon, lambda: None)
        assert reloader.start()
        reloader.thread.join(60)
        assert where == ["reload"]
        got_rules, prepared = reloader.pending.rules, reloader.pending.prepared
        assert got_rules is new and prepared.program.fd > 0
        assert kernel.program.fd == fd                      # nothing swapped yet
        lpd.test_run(fd, frame)                             # still the old program's
        monkeypatch.setattr(lpd, "build_program", None)     # the capture thread cannot build
        monkeypatch.setattr(lpd, "load_program", None)
        kernel.swap(None, prepared)
        assert kernel.program is prepared.program and kernel.rules is new
        lpd.test_run(kernel.program.fd, frame)
        time.sleep(lpd.EBPF_RETIRE_AFTER)
        kernel.sync()
        size = len(frame)
        assert kernel.rule_snapshot().rows == (("big", 3 * size, 3), ("small", 0, 0))
    finally:
        kernel.close()


REMOTE_MAX = 32


def remote_engines(frames_per_tick):
    """The same frames, tick by tick, through the kernel program (BPF_PROG_TEST_RUN,
    KernelAccounting feeding RemoteAddresses) and the classic Decoder's RemoteAddresses:
    (kernel remotes, classic remotes, true bytes per remote key)."""
    klocal = lpd.LocalAddresses(FLOOD_NETS)
    kremotes = lpd.RemoteAddresses(REMOTE_MAX)
    kernel = lpd.KernelAccounting(klocal, None, remotes=kremotes)
    fd = kernel.program_for(False, None)
    ulocal = lpd.LocalAddresses(FLOOD_NETS)
    uremotes = lpd.RemoteAddresses(REMOTE_MAX)
    dec = lpd.Decoder(ulocal, [uremotes])
    true = {}
    try:
        for now, frames in enumerate(frames_per_tick):
            for f in frames:
                lpd.test_run(fd, f)
            for block in lpd.frames_to_blocks([lpd.SynthFrame(f, len(f)) for f in frames]):
                dec.process_block(block, 0)
            kernel.sync()
            for local, remotes in ((klocal, kremotes), (ulocal, uremotes)):
                local.tick(float(now))
                remotes.tick(float(now))
            kernel.expire()
        for block in lpd.frames_to_blocks([lpd.SynthFrame(f, len(f))
                                           for frames in frames_per_tick for f in frames]):
            counter = lpd.RemoteAddresses(1 << 20)          # big enough: exact per remote
            lpd.Decoder(lpd.LocalAddresses(FLOOD_NETS), [counter]).process_block(block, 0)
            for key, e in counter.table.items():
                true[key] = true.get(key, 0) + e[lpd.TX_BYTES] + e[lpd.RX_BYTES]
        return kremotes.snapshot(), uremotes.snapshot(), true
    finally:
        kernel.close()


def to_remote(src, size, dst):
    return netns.udp_frame(netns.MAC_A, netns.MAC_B, src, dst, size)


def test_kernel_remotes_equal_the_classic_table_while_they_fit():
    """--remote under ebpf: the program counts the remote end of every frame with one
    local end in its map; drained at each tick into RemoteAddresses they give the
    classic path's rows and exact totals (both directions, both families)."""
    ticks = []
    for t in range(3):
        frames = []
        for i in range(REMOTE_MAX // 2):
            frames.append(to_remote("10.0.0.1", 100 + i + t, f"192.0.2.{i + 1}"))
            frames.append(to_remote(f"192.0.2.{i + 1}", 300, "10.0.0.2"))
        frames += [to_remote("fd00::1", 500, "2001:db8::7"), to_remote("10.0.0.1", 80, "10.0.0.9"),
                   to_remote("192.0.2.1", 90, "198.51.100.1")]          # local-local, remote-remote
        ticks.append(frames)
    k, u, _ = remote_engines(ticks)
    assert k.totals == u.totals and k.totals[lpd.TX_PACKETS] == 3 * (REMOTE_MAX // 2 + 1)
    assert sorted(k.rows) == sorted(u.rows) and len(k.rows) == REMOTE_MAX // 2 + 1
    assert k.floor == u.floor == 0


def test_kernel_remotes_keep_exact_totals_and_true_bounds_under_a_flood(monkeypatch):
    """More remotes an interval than the map holds: the totals stay exact, what found no
    room widens every bound instead of vanishing (exported <= true <= exported + error
    for every tracked remote, true <= floor for every other), and a heavy remote stays."""
    monkeypatch.setattr(lpd, "REMOTE_MAP_MIN", 0)          # a map of REMOTE_MAX entries
    heavy = "198.51.100.77"
    ticks = []
    for t in range(3):
        frames = [to_remote("10.0.0.1", 1400, heavy) for _ in range(3)]      # first in the map
        frames += [to_remote(f"203.0.{t}.{i}", 64, "10.0.0.2") for i in range(1, 4 * REMOTE_MAX)]
        ticks.append(frames)
    k, u, true = remote_engines(ticks)
    assert k.totals == u.totals
    rows = {key: row for (_, key), *row in k.rows}
    assert len(rows) <= lpd.REMOTE_TRIM_FACTOR * REMOTE_MAX and k.floor > 0
    for key, bytes_ in true.items():
        row = rows.get(key)
        if row is None:
            assert bytes_ <= k.floor, key
        else:
            exported = row[lpd.TX_BYTES] + row[lpd.RX_BYTES]
            assert exported <= bytes_ <= exported + row[lpd.REMOTE_WEIGHT], (key, row, bytes_)
    h = int(ipaddress.ip_address(heavy))
    assert rows[h][lpd.TX_BYTES] == 3 * 3 * 1400


def test_protochain_is_refused_not_mistranslated():
    with pytest.raises(lpd.Untranslatable):
        lpd.emit_rule(lpd.Gen(), lpd.compile_filter("ip protochain 6"), 0, 0)


def test_dump_prints_the_program():
    out = subprocess.run([sys.executable, LPD, "-d", "--engine", "ebpf", "--local-net",
                          "10.0.0.0/8", "udp port 53"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "call bpf_skb_load_bytes" in text and "call bpf_map_lookup_elem" in text
    assert text.rstrip().endswith("exit") and len(text.splitlines()) > 100


# --- live: the same frames through both engines at once --------------------------------

RULES = "udp;udp\nbig;greater 500\nping;icmp or icmp6\narp;arp\nv6;ip6\ntagged;vlan\n"
HTTP_PORT = 8080


def inject_odd_frames(pair):
    """VLAN-tagged and malformed frames, from ns_a onto the wire."""
    a, b = pair.mac_a, pair.mac_b
    frames = [netns.udp_frame(a, b, pair.ip4_a, pair.ip4_b, 200, vlans=[(0x8100, 7)]),
              netns.udp_frame(a, b, pair.ip6_a, pair.ip6_b, 300, vlans=[(0x88A8, 9), (0x8100, 3)])]
    good = netns.udp_frame(a, b, pair.ip4_a, pair.ip4_b, 120)
    bad_version = bytearray(good)
    bad_version[14] = 0x65                               # IPv6 in an IPv4 ethertype
    bad_ihl = bytearray(good)
    bad_ihl[14] = 0x43
    bad_len = bytearray(good)
    bad_len[16:18] = (1400).to_bytes(2, "big")
    arp = netns.eth_frame(b, a, 0x0806, bytes(28))
    frames += [bytes(bad_version), bytes(bad_ihl), bytes(bad_len), good[:20], arp]
    pair.inject(pair.ns_a, pair.if_a, frames)


def traffic(pair):
    for sport in range(40000, 40012):
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100, 900], sport=sport)
        pair.udp_send(pair.ns_b, pair.ip4_b, pair.ip4_a, [300], sport=sport)
        pair.udp_send(pair.ns_a, pair.ip6_a, pair.ip6_b, [1200], sport=sport)
    assert pair.ping(pair.ns_a, pair.ip4_b) and pair.ping(pair.ns_a, pair.ip6_b)
    inject_odd_frames(pair)


SAME = ("lpd_transmit_", "lpd_receive_", "lpd_interface_transmit", "lpd_interface_receive",
        "lpd_rule_", "lpd_packets_malformed", "lpd_gso_")


def same_part(m):
    return {k: v for k, v in m.items() if k[0].startswith(SAME)}


@pytest.fixture(params=[False, True], ids=["offloads-off", "offloads-on"])
def both(request, tmp_path):
    rules = tmp_path / "rules"
    rules.write_text(RULES)
    with netns.Pair(offloads=request.param) as pair:
        lpds = {}
        try:
            for engine, port in (("cbpf", 59150), ("ebpf", 59151)):
                lpds[engine] = Instance(pair, port, "--engine", engine, "--mapping-url", "none",
                                        "--interval", "0.5", "-f", str(rules),
                                        "-u", str(tmp_path / f"{engine}.sock"))
            time.sleep(0.5)
            yield pair, lpds, tmp_path, rules, request.param
        finally:
            for x in lpds.values():
                x.stop()


def read_both(pair):
    time.sleep(1.5)
    return {e: metrics(pair, port=p) for e, p in (("cbpf", 59150), ("ebpf", 59151))}


def test_both_engines_count_the_same(both):
    pair, lpds, tmp, _, offloads = both
    traffic(pair)
    if offloads:                                       # super-frames: TCP through the offloads
        srv = pair.popen(pair.ns_a, [sys.executable, "-c",
                                     "import socket;s=socket.create_server(('0.0.0.0',7009));"
                                     "c,_=s.accept();n=0\nwhile (d:=c.recv(65536)): n+=len(d)\n"
                                     "print(n)"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        sock = netns.socket_in(pair.ns_b, __import__("socket").AF_INET, __import__("socket").SOCK_STREAM)
        sock.connect((pair.ip4_a, 7009))
        sock.sendall(b"x" * (2 << 20))
        sock.close()
        assert srv.communicate(timeout=10)[0].strip() == str(2 << 20)
    m = read_both(pair)
    one, two = same_part(m["cbpf"]), same_part(m["ebpf"])
    assert set(one) == set(two)
    diff = {k: (one[k], two[k]) for k in one if one[k] != two[k]}
    assert not diff, diff
    mal = {dict(k[1])["reason"]: v for k, v in two.items() if k[0] == "lpd_packets_malformed_total"}
    assert all(mal[r] > 0 for r in ("truncated", "version", "ihl", "length")), mal
    rules = {dict(k[1])["rule"]: v for k, v in two.items() if k[0] == "lpd_rule_packets_total"}
    assert all(v > 0 for v in rules.values()), rules
    if offloads:
        gso = [v for k, v in two.items() if k[0] == "lpd_gso_frames_total"]
        assert gso and gso[0] > 0, "no super-frame was split"
    # the socket says the same
    assert parse_lines(read_socket(str(tmp / "cbpf.sock"))) == \
        parse_lines(read_socket(str(tmp / "ebpf.sock")))
    # nothing was copied to the ebpf lpd; the cbpf one read every frame
    copied = {e: sum(v for k, v in m[e].items() if k[0] == "lpd_capture_packets_total") for e in m}
    assert copied["ebpf"] == 0 and copied["cbpf"] > 0, copied
    engines = {e: [dict(k[1])["engine"] for k in m[e] if k[0] == "lpd_build_info"] for e in m}
    assert engines == {"cbpf": ["cbpf"], "ebpf": ["ebpf"]}


def test_reload_swaps_rules_in_the_kernel_without_losing_a_frame(both):
    pair, lpds, tmp, rules, _ = both
    for sport in range(41000, 41010):
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [600], sport=sport)
    for e in lpds:                   # the first ten counted by both before the reload
        assert wait_for(lambda: ("big", 10) in [(r, p) for r, _, p in
                                                parse_lines(read_socket(str(tmp / f"{e}.sock")))], 5)
    rules.write_text(RULES + "six;udp and greater 550\n")
    for x in lpds.values():
        x.proc.send_signal(signal.SIGHUP)
    sock = str(tmp / "ebpf.sock")
    assert wait_for(lambda: "six" in read_socket(sock), 10), lpds["ebpf"].stderr()
    assert wait_for(lambda: "six" in read_socket(str(tmp / "cbpf.sock")), 10)
    for sport in range(41000, 41010):
        pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [600], sport=sport)
    time.sleep(1.0)
    rows = {r: (b, p) for r, b, p in parse_lines(read_socket(sock))}
    assert rows["big"][1] == 20 and rows["udp"][1] >= 20, rows   # carried across the swap
    assert rows["six"][1] == 10, rows                            # counted from the swap on
    assert rows == {r: (b, p) for r, b, p in parse_lines(read_socket(str(tmp / "cbpf.sock")))}


def test_interface_loss_keeps_the_kernel_counts(both):
    pair, lpds, tmp, _, _ = both
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100, 200])
    key = ("lpd_receive_bytes_total", frozenset({("local_ip", pair.ip4_b), ("nic", pair.if_b)}))
    first = netns.frame_len(100) + netns.frame_len(200)
    assert wait_for(lambda: metrics(pair, port=59151).get(key) == first, 5)
    pair.delete_link()
    up = ("lpd_interface_up", frozenset({("nic", pair.if_b)}))
    assert wait_for(lambda: metrics(pair, port=59151).get(up) == 0, 5)
    assert metrics(pair, port=59151).get(key) == first
    before = read_both(pair)
    assert same_part(before["cbpf"]) == same_part(before["ebpf"])
    pair.create_link()
    pair.settle()
    for port in (59150, 59151):
        assert wait_for(lambda: metrics(pair, port=port).get(up) == 1, 5)
    # Each lpd finds the new link on its own interface check (up to a second apart), and
    # the kernel's MLD reports after link-up reach whichever is attached: compare what
    # both counted from the moment both are back.
    pair.settle()
    back = read_both(pair)
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [300])
    assert wait_for(lambda: metrics(pair, port=59151).get(key) == first + netns.frame_len(300), 5)
    m = read_both(pair)
    delta = {e: {k: v - back[e].get(k, 0) for k, v in same_part(m[e]).items()} for e in m}
    assert delta["cbpf"] == delta["ebpf"]
    assert delta["ebpf"][key] == netns.frame_len(300)


# --- every stage on: the same numbers from both engines ------------------------------

STAGE_PORTS = {"cbpf": 59156, "auto": 59157}


@pytest.fixture(scope="module")
def staged():
    """A cbpf lpd and an auto (ebpf) lpd with every stage on (-f, --remote, --connections,
    --http) on the same veth at once: the same frames, so every number, conn.log and
    http.log record must be the same."""
    return twin_run({e: (port, ("--engine", e)) for e, port in STAGE_PORTS.items()},
                    extra_traffic=inject_odd_frames)


def test_every_stage_on_ebpf_counts_what_cbpf_counts(staged):
    """`lpd --http --remote --connections -f rules` runs on ebpf under auto, with the
    numbers, the conn.log and the http.log of the classic path."""
    assert "(engine ebpf)" in staged["auto"]["stderr"], staged["auto"]["stderr"]
    engines = {e: [dict(k[1])["engine"] for k in staged[e]["all"] if k[0] == "lpd_build_info"]
               for e in staged}
    assert engines == {"cbpf": ["cbpf"], "auto": ["ebpf"]}
    one, two = staged["cbpf"]["metrics"], staged["auto"]["metrics"]
    assert one and set(one) == set(two)
    diff = {k: (one[k], two[k]) for k in one if one[k] != two[k]}
    assert not diff, diff
    for prefix in ("lpd_receive_bytes_total", "lpd_rule_bytes_total", "lpd_remote_",
                   "lpd_connections", "http_server_request_duration_seconds_count"):
        assert sum(v for k, v in one.items() if k[0].startswith(prefix)) > 0, prefix
    assert staged["cbpf"]["socket"] == staged["auto"]["socket"]
    assert staged["cbpf"]["conns"] == staged["auto"]["conns"] and len(staged["cbpf"]["conns"]) > 20
    assert any('"conn_state": "SF"' in c for c in staged["auto"]["conns"])
    assert staged["cbpf"]["http"] == staged["auto"]["http"] and len(staged["cbpf"]["http"]) == 6


def test_ebpf_copies_each_frame_as_far_as_a_stage_reads_it():
    """The program's copy length per frame (BPF_PROG_TEST_RUN on the corpus and the edge
    frames) is copy_length()'s, and it serves the stages: every frame parse_l4 reads
    gets at least the connection stage's snapshot, every TCP frame of an HTTP port and
    every UDP frame of a DNS port (--names) comes whole, and frames no stage reads are
    not copied."""
    rng = random.Random(24)
    frames = corpus_frames() + edge_frames(rng)
    maps = lpd.make_maps(0)
    conn_len = lpd.Connections().snaplen()
    whole_udp = {}
    ports = (80, 8080)
    dns = (lpd.DNS_PORT, lpd.MDNS_PORT)
    try:
        for plan in (lpd.CopyPlan(0, conn_len, ()), lpd.CopyPlan(0, 0, ports),
                     lpd.CopyPlan(lpd.SNAPLEN_ACCOUNTING, conn_len, ports),
                     lpd.CopyPlan(0, 0, (), dns), lpd.CopyPlan(0, conn_len, ports, dns)):
            image, labels = lpd.build_program(maps, DIFF_NETS, [], verdict=plan)
            prog = lpd.Program(image, labels, name="lpd_copy")
            seen = {}
            for data in frames:
                got, _ = lpd.test_run(prog.fd, data)
                assert got == lpd.copy_length(plan, data[:lpd.VIEW_DATA]), (plan, data.hex())
                seen[got] = seen.get(got, 0) + 1
                f = lpd.parse_l4(data)
                if f is not None and f[0] == lpd.IP_FRAGMENT and \
                        f[4] not in (lpd.IPPROTO_TCP, lpd.IPPROTO_UDP):
                    f = None                 # no connection has it (Connections.fragment)
                if plan.l4 and f is not None:
                    assert got >= conn_len, data.hex()
                if plan.ports and f is not None and f[0] == lpd.IPPROTO_TCP and \
                        (f[3] in ports or f[4] in ports):
                    assert got == lpd.SNAPLEN_FULL, data.hex()
                if f is not None and f[0] == lpd.IPPROTO_UDP and (f[3] in plan.udp_ports or
                                                                  f[4] in plan.udp_ports):
                    whole_udp[plan] = whole_udp.get(plan, 0) + 1
                    assert got == lpd.SNAPLEN_FULL, data.hex()
            prog.close()
            assert seen.get(plan.every, 0) > 1000, seen          # most frames: not (or less) copied
            assert len(seen) >= 2, seen
    finally:
        for m in maps.values():
            m.close()
    assert all(whole_udp.get(p, 0) > 50 for p in (lpd.CopyPlan(0, 0, (), dns),
                                                   lpd.CopyPlan(0, conn_len, ports, dns))), whole_udp


def hello_frames(rng):
    """TCP conversations whose ClientHello record runs over several segments (IPv4, IPv6,
    a VLAN tag, one resent, one after the sequence number wraps), beside bulk data of
    other connections and random bytes after a record header: frames in order."""
    from packets import ETH_IP, ETH_IP6, PROTO_TCP, TCP_ACK, TCP_PUSH, ether, ipv4, ipv6, tcp, \
        vlan_tag
    out = []
    for i, (src, dst, seq, tags) in enumerate((
            ("10.1.0.2", "203.0.113.7", 1000, ()), ("fd00::2", "2001:db8::7", 5000, ()),
            ("10.1.0.3", "203.0.113.8", 2 ** 32 - 700, ()),
            ("10.1.0.4", "203.0.113.9", 77, (vlan_tag(7),)))):
        record = b"\x16\x03\x01" + (1700).to_bytes(2, "big") + rng.randbytes(1700)
        chunks = [record[j:j + 600] for j in range(0, len(record), 600)]
        if i == 1:
            chunks.insert(2, chunks[1])                         # resent
        off = 0
        for j, c in enumerate(chunks):
            at = record.index(c) if j != 2 or i != 1 else 600
            seg = tcp(40000 + i, 443 + i, TCP_ACK | TCP_PUSH, seq=(seq + at) % 2 ** 32, payload=c)
            l3 = ipv6(src, dst, PROTO_TCP, seg) if ":" in src else ipv4(src, dst, PROTO_TCP, seg)
            out.append(ether("02:00:00:00:00:01", "02:00:00:00:00:02",
                             ETH_IP6 if ":" in src else ETH_IP, l3, tags=tags))
            # the server's answer and another connection's data between the segments
            out.append(ether("02:00:00:00:00:02", "02:00:00:00:00:01", ETH_IP,
                             ipv4("203.0.113.50", "10.1.0.9", PROTO_TCP,
                                  tcp(9000, 50000, TCP_ACK, seq=j * 1000, payload=rng.randbytes(900)))))
            off += len(c)
        # past the record's end: the direction's next data is not copied whole
        seg = tcp(40000 + i, 443 + i, TCP_ACK | TCP_PUSH, seq=(seq + len(record)) % 2 ** 32,
                  payload=b"\x17\x03\x03" + rng.randbytes(300))
        l3 = ipv6(src, dst, PROTO_TCP, seg) if ":" in src else ipv4(src, dst, PROTO_TCP, seg)
        out.append(ether("02:00:00:00:00:01", "02:00:00:00:00:02",
                         ETH_IP6 if ":" in src else ETH_IP, l3, tags=tags))
    for _ in range(200):
        junk = b"\x16\x03" + rng.randbytes(rng.randrange(0, 40))
        out.append(ether("02:00:00:00:00:01", "02:00:00:00:00:02", ETH_IP,
                         ipv4("10.1.0.5", "203.0.113.10", PROTO_TCP,
                              tcp(rng.randrange(1, 65536), 443, TCP_ACK, seq=rng.getrandbits(32),
                                  payload=junk))))
    return out


def test_ebpf_copies_hellos_whole_and_the_segments_that_finish_them():
    """CopyPlan.handshakes (--names): a TCP segment beginning a TLS handshake record comes
    whole on any port, and when its record runs past it, the direction's later
    segments up to the record's end (the hellos map) — copy_length(plan, view, hellos)
    frame for frame over the corpus, the edge frames and hand-built hellos; bulk data
    is not copied."""
    rng = random.Random(27)
    tls = hello_frames(rng)
    frames = corpus_frames() + edge_frames(rng) + tls
    for plan in (lpd.CopyPlan(0, 0, (), (lpd.DNS_PORT,), True),
                 lpd.CopyPlan(0, lpd.Connections().snaplen(), (80,), (lpd.DNS_PORT,), True)):
        maps = lpd.make_maps(0, hellos=True)
        try:
            image, labels = lpd.build_program(maps, DIFF_NETS, [], verdict=plan)
            prog = lpd.Program(image, labels, name="lpd_hellos")
            hellos, whole = {}, 0
            for data in frames:
                got, _ = lpd.test_run(prog.fd, data)
                assert got == lpd.copy_length(plan, data[:lpd.VIEW_DATA], hellos), (plan, data.hex())
                whole += got == lpd.SNAPLEN_FULL
            got = [lpd.test_run(prog.fd, d)[0] for d in tls]
            prog.close()
        finally:
            for m in maps.values():
                m.close()
        assert {k[2] for k in hellos} >= set(range(40000, 40004)), hellos
        # each hello's segments whole (the resent one too), the answers' bulk and the
        # data past the record's end not
        hello_segments = [g for g, d in zip(got, tls) if b"\x02\x00\x00\x00\x00\x01" == d[:6]]
        assert hello_segments[:4] == [lpd.SNAPLEN_FULL] * 3 + [plan.l4_len()], got[:8]
        assert all(g != lpd.SNAPLEN_FULL for g, d in zip(got, tls) if d[:6] == b"\x02\0\0\0\0\x02")
        assert whole > 200, whole


def flow_key(f):
    """The flows map's key for parse_l4's tuple f: the frame's own direction."""
    _, src, dst, sport, dport = f[:5]
    return lpd.FLOW_KEY.pack(4 if len(src) == 4 else 6, f[0], src, dst, sport.to_bytes(2, "big"),
                             dport.to_bytes(2, "big"))


def kernel_may_count(data, whole_ports=()):
    """What emit_flow promises to count: a UDP frame parse_l4 takes whole (its IP length
    inside the frame), not a fragment, no IPv6 extension header, its UDP header in the
    view, not to or from whole_ports (a stage reads those frames: copied whole)."""
    f = lpd.parse_l4(data, len(data))
    if f is None or f[0] != lpd.IPPROTO_UDP or f[11] is not None or \
            f[3] in whole_ports or f[4] in whole_ports:
        return None
    udp_at = f[12] - lpd.UDP_HDR_LEN
    q, et = lpd.ETH_HLEN, int.from_bytes(data[12:14], "big")
    while et in lpd.VLAN_TPIDS:
        et, q = int.from_bytes(data[q + 2:q + 4], "big"), q + lpd.VLAN_TAG_LEN
    if et == lpd.ETHERTYPE_IPV6 and data[q + lpd.IPV6_NEXT_OFF] != lpd.IPPROTO_UDP:
        return None
    if udp_at + lpd.UDP_HDR_LEN > lpd.VIEW_DATA:
        return None
    return f


def test_the_kernel_counts_the_udp_directions_connection_tracking_hands_it():
    """--connections under ebpf: a UDP frame whose direction is in the flows map is
    counted there (packets, IP length, wire length, UDP payload as parse_l4 reads them)
    and not copied; every other frame is copied as copy_length() says. On every corpus
    and edge frame, with every frame's own direction in the map (BPF_PROG_TEST_RUN)."""
    rng = random.Random(26)
    frames = corpus_frames() + edge_frames(rng)
    maps = lpd.make_maps(0, flow_max=1 << 16)
    plan = lpd.CopyPlan(0, lpd.Connections().snaplen(), (80, 8080), (lpd.DNS_PORT,))
    flows = maps["flows"]
    zero = bytes(flows.buf_size)
    try:
        image, labels = lpd.build_program(maps, DIFF_NETS, [], verdict=plan)
        prog = lpd.Program(image, labels, name="lpd_flows")
        counted = copied = 0
        for data in frames:
            f = lpd.parse_l4(data, len(data))
            key = flow_key(f) if f is not None and f[0] == lpd.IPPROTO_UDP else None
            if key is not None:
                flows.insert(key, zero)
            before = flows.sum_u64(flows.lookup(key))[:lpd.FLOW_SUMS] if key else None
            got, _ = lpd.test_run(prog.fd, data)
            after = flows.sum_u64(flows.lookup(key))[:lpd.FLOW_SUMS] if key else None
            want = kernel_may_count(data, plan.udp_ports)
            if want is not None:
                counted += 1
                assert got == plan.every, data.hex()
                assert [a - b for a, b in zip(after, before)] == \
                    [1, want[5], len(data), want[6]], data.hex()
            else:
                copied += 1
                assert before == after, data.hex()
                assert got == lpd.copy_length(plan, data[:lpd.VIEW_DATA]), data.hex()
        prog.close()
        assert counted > 100 and copied > 1000, (counted, copied)
    finally:
        for m in maps.values():
            m.close()


PREFILTERS = ("udp", "tcp port 80 or arp", "vlan and udp", "ip6 and len > 100",
              "ip[9] = 17 and ip[6:2] & 0x1fff = 0", "tcp[tcpflags] & tcp-syn != 0",
              "ether broadcast or ether multicast", "ip[200] = 0 or icmp6", "greater 1400")


@pytest.mark.parametrize("expr", PREFILTERS)
def test_the_prefilter_gates_the_program_as_the_classic_filter_gates_the_ring(expr):
    """-F under ebpf: its kernel program (compile_filter kernel=True) translated as the
    program's gate. On every corpus and edge frame (BPF_PROG_TEST_RUN) the program
    copies nothing of a frame -F rejects and counts only what it accepts: the
    interface totals are the Decoder's on the frames the classic filter lets through."""
    rng = random.Random(expr)
    frames = [(d, rng.choice(PKTTYPES)) for d in corpus_frames() + edge_frames(rng)]
    prefilter = lpd.compile_filter(expr, kernel=True)
    maps = lpd.make_maps(0)
    try:
        image, labels = lpd.build_program(maps, DIFF_NETS, [], verdict=lpd.SNAPLEN_ACCOUNTING,
                                          prefilter=prefilter)
        prog = lpd.Program(image, labels, name="lpd_gate")
        passed, wrong = [], []
        for data, pt in frames:
            want = lpd.bpf_interpret(prefilter, data, len(data), pt) != 0
            got, _ = lpd.test_run(prog.fd, data, pt)
            if (got == lpd.SNAPLEN_ACCOUNTING) != want or got not in (0, lpd.SNAPLEN_ACCOUNTING):
                wrong.append((len(data), pt, want, got))
            if want:
                passed.append((data, pt))
        prog.close()
        assert not wrong, wrong[:10]
        assert 0 < len(passed) < len(frames)
        iface, addrs, _ = lpd.read_counters(maps)
        totals, malformed, uaddrs = userspace(passed, DIFF_NETS)
        assert [iface[f] for f in lpd.IFACE_FIELDS[:4]] == totals
        assert {r: iface["malformed_" + r] for r in lpd.MALFORMED_REASONS} == malformed
        assert addrs == uaddrs
    finally:
        for m in maps.values():
            m.close()


def test_an_untranslatable_prefilter_keeps_the_classic_path():
    """A kernel program has no backward jump (the compiler refuses protochain for the
    kernel), but a program the translation refuses would fall back with one line: a
    userspace protochain program stands in for one."""
    assert lpd.ebpf_unsuitable(None) is None
    assert lpd.ebpf_unsuitable(lpd.compile_filter("udp", kernel=True)) is None
    why = lpd.ebpf_unsuitable(lpd.compile_filter("ip6 protochain 17"))
    assert why.startswith("-F uses what the eBPF translation lacks") and "\n" not in why


class Remotes(lpd.Consumer):
    """What the decoder hands the remote stage."""
    wants = frozenset((lpd.WANT_REMOTE,))

    def __init__(self):
        self.tx, self.rx = [], []

    def consume(self, batch):
        self.tx += batch.remote_tx
        self.rx += batch.remote_rx


def test_frames_the_kernel_counted_are_read_not_counted_again():
    """Decoder(counted=True), the ebpf engine's decoder of copied frames: the classic
    decoder hands the remote stage its remotes and admits the local addresses; this
    one neither (the kernel counted both; a flood's addresses are not admitted by the
    back door), and its stages still get the frames."""
    rng = random.Random(5)
    frames = [(d, rng.choice(PKTTYPES)) for d in corpus_frames() + edge_frames(rng)]
    blocks = list(lpd.frames_to_blocks([lpd.SynthFrame(d[:lpd.SNAPLEN_ACCOUNTING], len(d), pt)
                                        for d, pt in frames]))
    out = {}
    for counted in (False, True):
        local, remotes, rules = lpd.LocalAddresses(DIFF_NETS), Remotes(), \
            lpd.RuleCounter(lpd.parse_filter_text("udp;udp\n", "t", None))
        dec = lpd.Decoder(local, [remotes, rules], counted=counted)
        for block in blocks:
            dec.process_block(block, 0)
        out[counted] = (local, remotes, rules.snapshot().rows)
    (classic, want, urules), (kernel, got, krules) = out[False], out[True]
    assert classic.tracked() > 50 and len(want.tx) + len(want.rx) > 500
    assert got.tx == got.rx == [] and kernel.tracked() == 0
    assert urules == krules and urules[0][2] > 100


def test_engine_choice_is_said(tmp_path):
    with netns.Pair() as pair:
        http = Instance(pair, 59152, "--mapping-url", "none", "--http", "--connections")
        auto = Instance(pair, 59153, "--mapping-url", "none")
        remote = Instance(pair, 59154, "--mapping-url", "none", "--remote",
                          "--local-net", "10.199.0.2/32")
        cbpf = Instance(pair, 59155, "--mapping-url", "none", "--remote", "--engine", "cbpf",
                        "--local-net", "10.199.0.2/32")
        try:
            # auto takes ebpf whatever stages are on: they get their frames copied
            assert "(engine ebpf)" in http.stderr()
            assert "(engine ebpf)" in auto.stderr()
            assert "(engine ebpf)" in remote.stderr()
            assert "(engine cbpf: --engine cbpf)" in cbpf.stderr()
            pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [100] * 3)
            key = ("lpd_remote_receive_packets_total", frozenset({("nic", pair.if_b)}))
            assert wait_for(lambda: metrics(pair, port=59155).get(key) == 3, 5)
            assert wait_for(lambda: metrics(pair, port=59154).get(key) == 3, 5)
        finally:
            for x in (http, auto, remote, cbpf):
                x.stop()
        chain = tmp_path / "chain.filters"
        chain.write_text("chain;ip6 protochain 17\n")          # loops backwards: untranslatable
        p = pair.popen(pair.ns_b, [sys.executable, LPD, "-i", pair.if_b, "--engine", "ebpf",
                                   "-f", str(chain), "-u", str(tmp_path / "chain.sock"),
                                   "--mapping-url", "none"],
                       stderr=subprocess.PIPE, text=True)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 78 and err.count("\n") == 1 and "--engine ebpf" in err, err


def test_map_reads_batch_and_one_by_one_agree():
    """BPF_MAP_LOOKUP_BATCH where the kernel has it, GET_NEXT_KEY + LOOKUP_ELEM
    otherwise: the same entries, values summed over CPUs."""
    m = lpd.Map(lpd.BPF_MAP_TYPE_PERCPU_HASH, lpd.ADDR_KEY.size, lpd.ADDR_VALUE.size, 4096, "lpd_t")
    try:
        keys = [lpd.ADDR_KEY.pack(4, i.to_bytes(4, "big") + bytes(12)) for i in range(1000)]
        for i, k in enumerate(keys):
            m.update(k, lpd.ADDR_VALUE.pack(i, 1, 2 * i, 2) * m.ncpus)
        batch, slow = dict(m.items_batch(chunk=64)), dict(m.items_slow())
        assert set(batch) == set(slow) == set(keys)
        assert {k: m.sum_u64(v) for k, v in batch.items()} == \
            {k: m.sum_u64(v) for k, v in slow.items()}
        assert m.sum_u64(batch[keys[7]]) == [7 * m.ncpus, m.ncpus, 14 * m.ncpus, 2 * m.ncpus]
        m.delete(keys[7])
        assert keys[7] not in dict(m.items())
    finally:
        m.close()


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "key-by-key"])
def test_map_writes_batch_and_one_by_one_agree(batch):
    """write_batch: BPF_MAP_UPDATE_BATCH / DELETE_BATCH where the kernel has them, one
    key at a time otherwise; a key already gone stops the kernel's batch, and the rest
    is still deleted."""
    m = lpd.Map(lpd.BPF_MAP_TYPE_PERCPU_HASH, lpd.ADDR_KEY.size, lpd.ADDR_VALUE.size, 4096, "lpd_t")
    try:
        m._write_batch_ok = batch
        keys = [lpd.ADDR_KEY.pack(4, i.to_bytes(4, "big") + bytes(12)) for i in range(1000)]
        m.write_batch(lpd.BPF_MAP_UPDATE_BATCH, keys, lpd.ADDR_VALUE.pack(1, 2, 3, 4) * m.ncpus,
                      chunk=64)
        assert {k: m.sum_u64(v) for k, v in m.items()} == \
            {k: [m.ncpus, 2 * m.ncpus, 3 * m.ncpus, 4 * m.ncpus] for k in keys}
        m.write_batch(lpd.BPF_MAP_UPDATE_BATCH, keys[:500], bytes(m.buf_size), chunk=64)
        m.delete(keys[700])
        m.write_batch(lpd.BPF_MAP_DELETE_BATCH, keys[500:], chunk=64)
        assert {k: m.sum_u64(v) for k, v in m.items()} == {k: [0, 0, 0, 0] for k in keys[:500]}
    finally:
        m.close()
