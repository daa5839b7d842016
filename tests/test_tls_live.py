"""TLS hellos on a running lpd (--names, --ssl-log), with real servers and clients:
`openssl s_server` in ns_a (one certificate for every name) on port 8443, which no
protocol owns (lpd knows TLS by its record header, not by the port), at addresses ns_b
routes there; in ns_b curl (TLS 1.3, ALPN h2 and http/1.1) and `openssl s_client`
(TLS 1.2 with ALPN, TLS 1.3 over IPv6, one without SNI) ask for it by name. lpd watches
veth-b: /api/remotes shows each server address by the name its client asked for,
ssl.log says what was offered and chosen and joins conn.log on uid, and a tcpdump
capture of the same frames is the oracle: tshark's dissection of it agrees field by
field (server name, the client's ALPN, the server's version, cipher and ALPN), and lpd
replaying the capture (-r) writes the same ssl.log. Under both engines (the `engine`
fixture: each copies the segments beginning a handshake record whole, and no other).
Every wait is bounded; processes are stopped by PID (netns.Pair's popen)."""
import json
import re
import subprocess
import sys
import tempfile

import pytest

import netns
from harness import LPD, Lpd, api, self_signed, wait_for

pytestmark = [pytest.mark.live, pytest.mark.usefixtures("engine")]

PORT = 8443
CERT_NAME = "tls.test"
# (address lpd sees as a remote, the name its client asks for, client)
SERVED_A, SERVED_B, SERVED_6 = "198.51.100.11", "198.51.100.12", "2001:db8:443::1"
NAME_A, NAME_B, NAME_6 = "a.tls.test", "b.tls.test", "six.tls.test"
SERVED_NOSNI = "198.51.100.13"
INTERVAL = 0.3
WAIT = 15.0
VERSIONS = {"0x0303": "TLSv12", "0x0304": "TLSv13"}


@pytest.fixture
def servers(pair, tmp_path):
    """s_server on ns_a's IPv4 and IPv6 addresses (port 8443), ALPN http/1.1 and h2;
    ns_b routes the served addresses to ns_a, which holds them."""
    cert, key = self_signed(str(tmp_path), CERT_NAME, f"DNS:*.{CERT_NAME}")
    for addr in (SERVED_A, SERVED_B, SERVED_NOSNI):
        pair.run(pair.ns_a, ["ip", "addr", "add", f"{addr}/32", "dev", "lo"])
        pair.run(pair.ns_b, ["ip", "route", "add", f"{addr}/32", "via", pair.ip4_a])
    pair.run(pair.ns_a, ["ip", "-6", "addr", "add", f"{SERVED_6}/128", "dev", "lo"])
    pair.run(pair.ns_b, ["ip", "-6", "route", "add", f"{SERVED_6}/128", "via", pair.ip6_a])
    for family in ("-4", "-6"):
        pair.popen(pair.ns_a, ["openssl", "s_server", family, "-accept", str(PORT), "-cert",
                               str(cert), "-key", str(key), "-www", "-alpn", "http/1.1,h2",
                               "-quiet"], stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile())
    assert wait_for(lambda: client(pair, SERVED_A, NAME_A, "-tls1_3").returncode == 0, 10), \
        "s_server did not answer"


def client(pair, addr, name, *args):
    """openssl s_client in ns_b: one handshake with `addr` asking for `name` (None: no
    SNI), then it closes."""
    host = f"[{addr}]" if ":" in addr else addr
    sni = ["-servername", name] if name else ["-noservername"]
    return pair.run(pair.ns_b, ["openssl", "s_client", "-connect", f"{host}:{PORT}", *sni,
                                *args], check=False, input="")


def curl(pair, addr, name):
    return pair.run(pair.ns_b, ["curl", "-sk", "--max-time", "10", "--tlsv1.3", "--resolve",
                                f"{name}:{PORT}:{addr}", f"https://{name}:{PORT}/"], check=False)


def tshark_hellos(pcap):
    """What tshark reads of each hello in the capture: ClientHellos by (client port,
    server address) -> (server name, the client's ALPN list); ServerHellos by (client
    port) -> (version, cipher name, ALPN)."""
    fields = ["tcp.srcport", "tcp.dstport", "ip.dst", "ipv6.dst", "tls.handshake.type",
              "tls.handshake.extensions_server_name", "tls.handshake.extensions_alpn_str",
              "tls.handshake.extensions.supported_version"]
    out = subprocess.run(["tshark", "-r", str(pcap), "-d", f"tcp.port=={PORT},tls", "-Y",
                          "tls.handshake.type == 1 or tls.handshake.type == 2", "-T", "fields",
                          "-E", "separator=|", *sum((["-e", f] for f in fields), [])],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    # the cipher's name as tshark prints it (-T fields has only its number)
    verbose = subprocess.run(["tshark", "-r", str(pcap), "-d", f"tcp.port=={PORT},tls", "-Y",
                              "tls.handshake.type == 2", "-V", "-T", "text"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    ciphers = re.findall(r"Cipher Suite: (\S+) \(0x[0-9a-f]{4}\)", verbose)
    clients, servers = {}, {}
    for line in out.splitlines():
        sport, dport, dst4, dst6, kinds, sni, alpn, version = line.split("|")
        if kinds.split(",")[0] == "1":
            clients[(int(sport), dst4 or dst6)] = (sni, alpn.split(","))
        else:
            servers[int(dport)] = (VERSIONS[version.split(",")[0]] if version else "TLSv12",
                                   ciphers[len(servers)], alpn or None)
    return clients, servers


@pytest.mark.parametrize("workers", (1, 2))
def test_a_server_is_named_by_the_name_its_client_asked_for(pair, servers, engine, workers,
                                                             tmp_path):
    log, conn_log, pcap = tmp_path / "ssl.log", tmp_path / "conn.log", tmp_path / "tls.pcap"
    dump = netns.start_tcpdump(pair.ns_b, pair.if_b, ["-U", "-w", str(pcap), "tcp"])
    lpd = Lpd(pair, "--names", "--remote", "--ssl-log", str(log), "--conn-log", str(conn_log),
              "--interval", str(INTERVAL), "--workers", str(workers))
    if engine == "auto":
        assert "(engine ebpf)" in lpd.stderr(), lpd.stderr()
    assert curl(pair, SERVED_A, NAME_A).returncode == 0
    assert client(pair, SERVED_B, NAME_B, "-tls1_2", "-alpn", "http/1.1").returncode == 0
    assert client(pair, SERVED_6, NAME_6, "-tls1_3", "-alpn", "h2").returncode == 0
    assert client(pair, SERVED_NOSNI, None, "-tls1_3").returncode == 0

    def named():
        _, doc = api(pair, "/api/remotes")
        rows = {r["address"]: r.get("name") for r in doc["remotes"]}
        return rows if all(rows.get(a) for a in (SERVED_A, SERVED_B, SERVED_6)) else None
    assert wait_for(named, WAIT), api(pair, "/api/remotes")
    assert (named()[SERVED_A], named()[SERVED_B], named()[SERVED_6]) == (NAME_A, NAME_B, NAME_6)
    assert not named().get(SERVED_NOSNI)
    assert wait_for(lambda: api(pair, "/api/tls")[1]["server_hellos"] == 4, WAIT), \
        api(pair, "/api/tls")
    _, tls = api(pair, "/api/tls")
    assert tls["client_hellos"] == tls["server_hellos"] == 4, tls
    assert not any(tls["parse_errors"].values()), tls
    assert lpd.stop() == 0, lpd.stderr()
    netns.stop(dump)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 4, records
    by_server = {r["id.resp_h"]: r for r in records}
    clients, answers = tshark_hellos(pcap)
    assert len(clients) == len(answers) == 4, (clients, answers)
    for (cport, server), (sni, alpn) in clients.items():
        r = by_server[server]
        assert r["id.orig_p"] == cport and r["id.resp_p"] == PORT and r["established"] is True
        assert r.get("server_name", "") == sni
        version, cipher, chosen = answers[cport]
        assert (r["version"], r["cipher"], r.get("next_protocol")) == (version, cipher, chosen), r
        assert re.fullmatch(r"t1[23][di]\d{4}[0-9a-z]{2}_[0-9a-f]{12}_[0-9a-f]{12}", r["ja4"]), r
        assert r["ja4"][3] == ("d" if sni else "i")
        assert r["ja4"][8:10] == ("00" if not alpn[0] else alpn[0][0] + alpn[0][-1]), (r, alpn)
    assert by_server[SERVED_B]["version"] == "TLSv12" and by_server[SERVED_B]["ja4"].startswith("t12")
    assert by_server[SERVED_B]["next_protocol"] == "http/1.1"   # TLS 1.2: in the ServerHello
    # ssl.log joins conn.log on uid, as Zeek's do
    conns = {(c["id.orig_h"], c["id.orig_p"], c["id.resp_h"], c["id.resp_p"]): c["uid"]
             for c in map(json.loads, conn_log.read_text().splitlines())}
    assert all(conns[r["id.orig_h"], r["id.orig_p"], r["id.resp_h"], r["id.resp_p"]] == r["uid"]
               for r in records)
    # the capture replayed gives the same log
    replayed = tmp_path / "replayed.log"
    subprocess.run([sys.executable, LPD, "-r", str(pcap), "--ssl-log", str(replayed),
                    "--connections"], check=True, capture_output=True, timeout=60)
    # (tcpdump's socket stamps a frame apart from lpd's by a few µs: the times, and the
    # uids they key, are compared apart)
    again = [json.loads(line) for line in replayed.read_text().splitlines()]
    key = lambda r: (r["id.resp_h"], r["id.orig_p"])
    again, records = sorted(again, key=key), sorted(records, key=key)
    assert [abs(a["ts"] - r["ts"]) < 0.01 for a, r in zip(again, records)] == [True] * 4
    strip = lambda r: {k: v for k, v in r.items() if k not in ("ts", "uid")}
    assert [strip(a) for a in again] == [strip(r) for r in records]


def test_a_hello_longer_than_a_segment(engine, tmp_path):
    """A ClientHello of ~3 KB (a long ALPN list: as a post-quantum key share makes
    today's browsers' ~1.8 KB) is several segments. With the host's offloads on (the
    client's write leaves as one super-frame, as GRO hands a router the segments
    merged) lpd reads it whole under both engines; with them off, the eBPF program
    copies the segments that finish the record (its hellos map), and the classic
    program, which has no state, cuts them: the hello is counted, not guessed."""
    alpn = ",".join(f"proto-{i:04d}-{'x' * 40}" for i in range(60)) + ",http/1.1"
    for offloads in (True, False):
        with netns.Pair(offloads=offloads) as pair:
            pair.run(pair.ns_a, ["ip", "addr", "add", f"{SERVED_A}/32", "dev", "lo"])
            pair.run(pair.ns_b, ["ip", "route", "add", f"{SERVED_A}/32", "via", pair.ip4_a])
            log = tmp_path / f"ssl-{offloads}.log"
            cert, key = self_signed(str(tmp_path), CERT_NAME)
            pair.popen(pair.ns_a, ["openssl", "s_server", "-4", "-accept", str(PORT), "-cert",
                                   str(cert), "-key", str(key), "-www", "-quiet"],
                       stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile())
            lpd = Lpd(pair, "--names", "--remote", "--ssl-log", str(log), "--interval",
                      str(INTERVAL))
            ebpf = "(engine ebpf)" in lpd.stderr()
            assert ebpf == (engine == "auto"), lpd.stderr()
            assert wait_for(lambda: client(pair, SERVED_A, NAME_A, "-tls1_3", "-alpn",
                                           alpn).returncode == 0, 10)

            def counted():
                _, tls = api(pair, "/api/tls")
                return tls if tls["client_hellos"] or tls["parse_errors"]["cut"] else None
            assert wait_for(counted, WAIT)
            tls = counted()
            assert lpd.stop() == 0, lpd.stderr()
            records = [json.loads(line) for line in log.read_text().splitlines()]
            if offloads or ebpf:
                assert tls["client_hellos"] == 1 and len(records) == 1, tls
                assert records[0]["server_name"] == NAME_A and records[0]["established"], records
            else:
                assert tls["client_hellos"] == 0 and tls["parse_errors"]["cut"] >= 1, tls
                assert records == []
