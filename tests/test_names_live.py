"""Names from passive DNS (--names) on a running lpd, with a real resolver: dnsmasq in
ns_a serves a local zone (a host record with an IPv4 and an IPv6 address, a CNAME to it,
NXDOMAIN for the rest of the zone); in ns_b, where lpd watches veth-b, glibc's
getaddrinfo looks the names up (over UDP, and once over TCP) (ns_b's resolv.conf names dnsmasq: `ip netns exec`
mounts /etc/netns/NS/resolv.conf), then the client sends to the answered addresses
(ns_a holds them, ns_b routes them there). lpd shows the looked-up name for those
remotes in /api/remotes, dns.log says what was asked and answered and joins conn.log on
uid; under both
engines (the `engine` fixture: the eBPF program must copy port-53 frames whole).
Every wait is bounded; processes are stopped by PID (netns.Pair's popen)."""
import json
import os
import shutil
import socket
import sys
import tempfile

import pytest

import netns
from harness import Lpd, api, wait_for

pytestmark = [pytest.mark.live, pytest.mark.usefixtures("engine")]

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
ZONE = "zone.test"
HOST, ALIAS, MISSING, BY_TCP = f"app.{ZONE}", f"www.{ZONE}", f"nx.{ZONE}", f"tcp.{ZONE}"
SERVED4, SERVED6, SERVED_TCP = "198.51.100.80", "2001:db8:80::80", "198.51.100.53"
# a name whose TTL runs out at once: only traffic to its address keeps it past the grace
BUSY, SERVED_BUSY, BUSY_TTL = f"busy.{ZONE}", "198.51.100.81", 1
# A CNAME chain of long names: its answer (~700 bytes) does not fit the 512 bytes of a
# UDP answer without EDNS, so dnsmasq sets TC and glibc asks again over TCP
CHAIN = [f"c{i}-{'x' * 50}.{ZONE}" for i in range(10)]
SERVED_LONG = "198.51.100.82"
SINK = 9                              # discard: what the client sends needs no listener
INTERVAL = 0.3
WAIT = 15.0


def lookup(pair, name, tcp=False):
    """getaddrinfo in ns_b: the addresses, or the error's name (EAI_NONAME for NXDOMAIN);
    tcp: glibc asks over TCP (RES_OPTIONS=use-vc)."""
    code = ("import socket, sys\n"
            "try:\n"
            f"    print(sorted({{a[4][0] for a in socket.getaddrinfo({name + '.'!r}, {SINK}, "
            "type=socket.SOCK_DGRAM)}))\n"
            "except socket.gaierror as e:\n"
            "    print(repr(e.args[0]))\n")
    env = ["env", "RES_OPTIONS=use-vc"] if tcp else []
    return pair.run(pair.ns_b, [*env, sys.executable, "-c", code]).stdout.strip()


def send_to(pair, addr, n=5):
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = netns.socket_in(pair.ns_b, family, socket.SOCK_DGRAM)
    try:
        for _ in range(n):
            s.sendto(b"x" * 100, (addr, SINK))
    finally:
        s.close()


@pytest.fixture
def resolver(pair):
    """dnsmasq on ns_a's addresses; ns_b resolves through it and routes the zone's
    addresses to ns_a, which holds them."""
    for cmd in (["ip", "addr", "add", f"{SERVED4}/32", "dev", "lo"],
                ["ip", "addr", "add", f"{SERVED_TCP}/32", "dev", "lo"],
                ["ip", "addr", "add", f"{SERVED_BUSY}/32", "dev", "lo"],
                ["ip", "addr", "add", f"{SERVED_LONG}/32", "dev", "lo"],
                ["ip", "-6", "addr", "add", f"{SERVED6}/128", "dev", "lo"]):
        pair.run(pair.ns_a, cmd)
    for cmd in (["ip", "route", "add", f"{SERVED4}/32", "via", pair.ip4_a],
                ["ip", "route", "add", f"{SERVED_TCP}/32", "via", pair.ip4_a],
                ["ip", "route", "add", f"{SERVED_BUSY}/32", "via", pair.ip4_a],
                ["ip", "route", "add", f"{SERVED_LONG}/32", "via", pair.ip4_a],
                ["ip", "-6", "route", "add", f"{SERVED6}/128", "via", pair.ip6_a]):
        pair.run(pair.ns_b, cmd)
    etc = f"/etc/netns/{pair.ns_b}"
    os.makedirs(etc)
    try:
        with open(f"{etc}/resolv.conf", "w") as f:
            f.write(f"nameserver {pair.ip4_a}\noptions timeout:2 attempts:2\n")
        proc = pair.popen(pair.ns_a, [
            DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
            "--bind-interfaces", f"--listen-address={pair.ip4_a}", "--except-interface=lo",
            "--pid-file=", "--user=root", f"--local=/{ZONE}/",
            f"--host-record={HOST},{SERVED4},{SERVED6},600", f"--cname={ALIAS},{HOST},600",
            f"--host-record={BY_TCP},{SERVED_TCP},600",
            f"--host-record={BUSY},{SERVED_BUSY},{BUSY_TTL}",
            f"--host-record={CHAIN[-1]},{SERVED_LONG},600",
            *(f"--cname={a},{b},600" for a, b in zip(CHAIN, CHAIN[1:]))],
            stderr=tempfile.TemporaryFile())
        assert wait_for(lambda: lookup(pair, HOST) != "-3", 10), "dnsmasq did not answer"
        yield proc
    finally:
        shutil.rmtree(etc, ignore_errors=True)


@pytest.mark.parametrize("workers", (1, 2))
def test_a_remote_is_named_by_what_the_host_looked_up(pair, resolver, engine, workers, tmp_path):
    """workers 2: each worker names what its flows answered, the parent shows the union
    (and each worker's dns.log records carry its own conn.log uids)."""
    log, conn_log = tmp_path / "dns.log", tmp_path / "conn.log"
    lpd = Lpd(pair, "--names", "--remote", "--dns-log", str(log), "--conn-log", str(conn_log),
              "--interval", str(INTERVAL), "--workers", str(workers))
    if engine == "auto":
        assert "(engine ebpf)" in lpd.stderr(), lpd.stderr()
    assert lookup(pair, ALIAS) == repr(sorted([SERVED4, SERVED6]))
    assert lookup(pair, BY_TCP, tcp=True) == repr([SERVED_TCP])
    assert lookup(pair, MISSING) == repr(socket.EAI_NONAME)
    send_to(pair, SERVED4)
    send_to(pair, SERVED6)
    send_to(pair, SERVED_TCP)

    def named():
        _, doc = api(pair, "/api/remotes")
        rows = {r["address"]: r.get("name") for r in doc["remotes"]}
        return rows if all(rows.get(a) for a in (SERVED4, SERVED6, SERVED_TCP)) else None
    assert wait_for(named, WAIT), api(pair, "/api/remotes")
    assert named()[SERVED4] == named()[SERVED6] == ALIAS and named()[SERVED_TCP] == BY_TCP
    _, names = api(pair, "/api/names")
    table = {r["address"]: (r["name"], r["cname"]) for r in names["names"]}
    assert table[SERVED4] == table[SERVED6] == (ALIAS, HOST)
    assert lpd.stop() == 0, lpd.stderr()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    answered = {(r["query"], r["qtype_name"]): r for r in records if "rcode" in r}
    a, aaaa = answered[(ALIAS, "A")], answered[(ALIAS, "AAAA")]
    assert (a["answers"], aaaa["answers"]) == ([HOST, SERVED4], [HOST, SERVED6])
    assert a["id.orig_h"] == pair.ip4_b and a["id.resp_h"] == pair.ip4_a and a["id.resp_p"] == 53
    assert 0 <= a["rtt"] < WAIT and a["RD"] and a["RA"] and a["AA"] and a["rcode_name"] == "NOERROR"
    assert {r["proto"] for r in records if r.get("query") == BY_TCP} == {"tcp"}
    assert answered[(BY_TCP, "A")]["answers"] == [SERVED_TCP] and answered[(BY_TCP, "A")]["rtt"] >= 0
    nx = [r for (q, _), r in answered.items() if q == MISSING]
    assert nx and {r["rcode_name"] for r in nx} == {"NXDOMAIN"}
    # dns.log joins conn.log on uid, as Zeek's do
    conns = {(c["id.orig_h"], c["id.orig_p"], c["id.resp_h"], c["id.resp_p"]): c["uid"]
             for c in map(json.loads, conn_log.read_text().splitlines())}
    assert all(conns[r["id.orig_h"], r["id.orig_p"], r["id.resp_h"], r["id.resp_p"]] == r["uid"]
               for r in records)


def test_traffic_to_a_remote_keeps_its_name(pair, resolver, engine, tmp_path):
    """A local host sending to an answered address keeps its name in use: the name is
    protected and lasts DNS_NAME_GRACE past the traffic, not past the answer. Under ebpf
    the kernel counts the remotes: the names stage learns them from the remote stage's
    bytes at its tick (issue 27), so both engines must move `expires` on; those bytes
    count under the name's domain."""
    lpd = Lpd(pair, "--names", "--remote", "--interval", str(INTERVAL))
    if engine == "auto":
        assert "(engine ebpf)" in lpd.stderr(), lpd.stderr()
    assert lookup(pair, BUSY) == repr([SERVED_BUSY])

    def expires():
        _, doc = api(pair, "/api/names")
        return {r["address"]: r["expires"] for r in doc["names"]}.get(SERVED_BUSY)
    assert wait_for(expires, WAIT), api(pair, "/api/names")
    answered = expires()
    sent = wait_for(lambda: (send_to(pair, SERVED_BUSY), expires() > answered + BUSY_TTL)[1], WAIT)
    assert sent, (answered, expires())
    # the same bytes, per tick, count under the name's domain (--names-domains)
    _, doc = api(pair, "/api/names")
    domains = {d["domain"]: d["tx_bytes"] for d in doc["domains"]}
    assert domains.get(ZONE, 0) > 0 and domains["other"] == 0, doc["domains"]
    assert lpd.stop() == 0, lpd.stderr()


def test_a_truncated_answer_is_asked_again_over_tcp_and_names_the_remote(pair, resolver, engine,
                                                                        tmp_path):
    """The chain's answer is truncated over UDP (TC: dns.log says so, and no name comes
    of it) and whole over TCP, where glibc asks again: the chain's end names the
    address, by the name the host asked for."""
    log = tmp_path / "dns.log"
    lpd = Lpd(pair, "--names", "--remote", "--dns-log", str(log), "--interval", str(INTERVAL))
    assert lookup(pair, CHAIN[0]) == repr([SERVED_LONG])
    send_to(pair, SERVED_LONG)

    def named():
        _, doc = api(pair, "/api/names")
        return {r["address"]: (r["name"], r["cname"]) for r in doc["names"]}.get(SERVED_LONG)
    assert wait_for(named, WAIT), api(pair, "/api/names")
    assert named() == (CHAIN[0], CHAIN[-1])
    assert lpd.stop() == 0, lpd.stderr()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    asked = [r for r in records if r.get("query") == CHAIN[0] and r.get("qtype_name") == "A"]
    udp = [r for r in asked if r["proto"] == "udp"]
    tcp = [r for r in asked if r["proto"] == "tcp"]
    assert udp and all(r["TC"] for r in udp), asked
    assert tcp and tcp[0]["answers"] == CHAIN[1:] + [SERVED_LONG] and not tcp[0]["TC"], asked
