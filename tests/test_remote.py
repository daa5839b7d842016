"""Remote addresses (issue 11) without a socket: the decoder's attribution, the
space-saving table's bounds, a spoofed flood replayed under a memory limit, GeoIP
through real MMDB files, and the outputs every stage shares (--output, /api)."""
import contextlib
import http.client
import io
import ipaddress
import json
import os
import random
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import geoip_db
import lpd
from harness import LPD, write_pcap
from packets import ETH_IP, ETH_IP6, PROTO_UDP, ether, ipv4, ipv6, udp

pytestmark = pytest.mark.offline

NETS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]
A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
LOCAL4, LOCAL4_2, LOCAL6 = "10.0.0.1", "10.0.0.2", "fd00::1"
FAR4, FAR4_2, FAR6 = "198.51.100.7", "203.0.113.9", "2001:db8:100::7"


def udp4(src, dst, n=10):
    return ether(A, B, ETH_IP, ipv4(src, dst, PROTO_UDP, udp(1, 2, b"x" * n)))


def udp6(src, dst, n=10):
    return ether(A, B, ETH_IP6, ipv6(src, dst, PROTO_UDP, udp(1, 2, b"x" * n)))


def key(text):
    a = ipaddress.ip_address(text)
    return a.version, (int(a) if a.version == 4 else a.packed)


def decode(frames, remote_max=lpd.DEFAULT_REMOTE_MAX, vnet=False):
    remotes = lpd.RemoteAddresses(remote_max)
    dec = lpd.Decoder(lpd.LocalAddresses(NETS), [remotes], vnet=vnet)
    for block in lpd.frames_to_blocks(frames, vnet=vnet):
        dec.process_block(memoryview(block), 0)
    return dec, remotes


def rows(snap):
    return {str(lpd.address(r[0])): tuple(r[1:5]) for r in snap.rows}


def test_tx_is_local_to_remote_rx_remote_to_local_and_other_frames_count_for_none():
    out4, in4, out6 = udp4(LOCAL4, FAR4, 100), udp4(FAR4, LOCAL4, 30), udp6(LOCAL6, FAR6, 7)
    between_remotes, between_locals = udp4(FAR4, FAR4_2), udp4(LOCAL4, LOCAL4_2)
    tagged = lpd.SynthFrame(udp4(FAR4_2, LOCAL4, 50), len(udp4(FAR4_2, LOCAL4, 50)), vlan_tci=7)
    frames = [(out4, len(out4)), (out4, len(out4)), (in4, len(in4)), (out6, len(out6)),
              (between_remotes, len(between_remotes)), (between_locals, len(between_locals)),
              tagged]
    dec, remotes = decode(frames)
    snap = remotes.snapshot()
    # A stripped VLAN tag counts its 4 bytes back in, as everywhere in lpd.
    assert rows(snap) == {FAR4: (2 * len(out4), 2, len(in4), 1), FAR6: (len(out6), 1, 0, 0),
                          FAR4_2: (0, 0, len(tagged.data) + 4, 1)}
    assert snap.totals == (2 * len(out4) + len(out6), 3, len(in4) + len(tagged.data) + 4, 2)
    assert snap.evictions == 0 and snap.floor == 0


def test_a_super_frame_counts_for_its_remote_as_the_frames_the_wire_carried():
    from packets import tcp
    payload = b"y" * 4000
    data = ether(A, B, ETH_IP, ipv4(LOCAL4, FAR4, 6, tcp(1, 2, payload=payload)))
    mss = 1000
    sf = lpd.SynthFrame(data[:128], len(data), pkttype=lpd.PACKET_OUTGOING,
                        gso=(lpd.VIRTIO_NET_HDR_GSO_TCPV4, mss, 0))
    _, remotes = decode([sf], vnet=True)
    hdr = 14 + 20 + 20
    assert rows(remotes.snapshot())[FAR4] == (len(data) + 3 * hdr, 4, 0, 0)


def test_without_the_stage_the_decoder_builds_no_remote_lists():
    dec = lpd.Decoder(lpd.LocalAddresses(NETS))
    assert not dec.want_remote
    seen = []

    class Spy(lpd.Consumer):
        def consume(self, batch):
            seen.append((len(batch.remote_tx), len(batch.remote_rx)))
    dec.set_consumers([Spy()])
    out = udp4(LOCAL4, FAR4)
    for block in lpd.frames_to_blocks([(out, len(out))]):
        dec.process_block(memoryview(block), 0)
    assert seen == [(0, 0)]


def feed(remotes, stream):
    """stream: (key, bytes, tx?) tuples, one batch per 100."""
    for i in range(0, len(stream), 100):
        batch = lpd.Batch()
        for k, n, tx in stream[i:i + 100]:
            (batch.remote_tx if tx else batch.remote_rx).append((k, n, 1))
        remotes.consume(batch)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(1, 1500), st.booleans()),
                min_size=1, max_size=3000),
       st.integers(1, 40), st.integers(0, 4))
def test_space_saving_bounds_hold_for_any_stream(stream, remote_max, snapshots):
    """exported <= true <= exported + error for every tracked remote, and an untracked
    one carried at most the floor: the bounds the README states."""
    remotes = lpd.RemoteAddresses(remote_max)
    true = {}
    chunk = max(1, len(stream) // (snapshots + 1))
    for i in range(0, len(stream), chunk):
        part = stream[i:i + chunk]
        feed(remotes, part)
        remotes.snapshot()
        for k, n, _ in part:
            true[k] = true.get(k, 0) + n
    snap = remotes.snapshot()
    got = {r[0][1]: r for r in snap.rows}
    assert len(got) <= lpd.REMOTE_TRIM_FACTOR * remote_max
    assert sum(snap.totals[::2]) == sum(true.values())
    for k, n in true.items():
        if k in got:
            shown = got[k][1] + got[k][3]
            assert shown <= n <= shown + got[k][5]
        else:
            assert n <= snap.floor
    assert snap.evictions >= len(true) - len(got)          # a remote may leave more than once


def test_heavy_hitters_survive_a_flood_with_exact_bytes():
    remotes = lpd.RemoteAddresses(1000)
    rng = random.Random(5)
    heavy = [1 << 24 | i for i in range(5)]
    stream, sent = [], dict.fromkeys(heavy, 0)
    for i in range(100_000):
        if i % 10 == 0:
            k = heavy[i // 10 % 5]
            sent[k] += 1400
            stream.append((k, 1400, True))
        else:
            stream.append((rng.getrandbits(32) | 1 << 31, 60, False))
    feed(remotes, stream)
    snap = remotes.snapshot()
    got = {r[0][1]: r for r in snap.rows}
    for k in heavy:
        assert got[k][1] == sent[k] and got[k][5] == 0      # tracked from its first frame
    assert snap.evictions > 80_000 and len(got) <= 2000
    assert snap.totals == (sum(sent.values()), 10_000, 90_000 * 60, 90_000)


FLOOD_SPOOFED = 1_000_000
FLOOD_HEAVY = ("198.51.100.7", "198.51.100.8", "2001:db8:100::7")
FLOOD_HEAVY_EVERY = 50            # one heavy frame per this many
FLOOD_AS_LIMIT = 2 << 30          # the replaying child's address space (bytes)


def write_flood(path):
    """10^6 spoofed one-frame sources to a local address, a few heavy remotes among them.
    -> {heavy address: bytes sent to it}, total rx bytes, total tx bytes."""
    rng = random.Random(11)
    heavy = {}
    frames = {h: (udp4(LOCAL4, h, 1200) if ":" not in h else udp6(LOCAL6, h, 1200)) for h in FLOOD_HEAVY}
    template = bytearray(udp4("0.0.0.0", LOCAL4, 10))
    rx = tx = 0

    def records():
        nonlocal rx, tx
        for i in range(FLOOD_SPOOFED):
            if i % FLOOD_HEAVY_EVERY == 0:
                h = FLOOD_HEAVY[i // FLOOD_HEAVY_EVERY % len(FLOOD_HEAVY)]
                data = frames[h]
                heavy[h] = heavy.get(h, 0) + len(data)
                tx += len(data)
                yield i // 1000, i % 1000, data
            # distinct sources outside 10/8: 100.0.0.0 + i (never repeats)
            template[26:30] = (0x64000000 + i).to_bytes(4, "big")
            rx += len(template)
            yield i // 1000, i % 1000, template
    write_pcap(path, records())
    del rng
    return heavy, rx, tx


def run_replay(path, *extra):
    """lpd -r in a child under an address-space limit: (exposition, peak RSS in KiB)."""
    code = ("import resource, runpy, sys\n"
            f"sys.argv = ['lpd', '-r', {str(path)!r}] + {list(extra)!r}\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0] if False else %r, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    rc = e.code\n"
            "sys.stderr.write('maxrss=%%d\\n' %% resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            "sys.exit(rc)\n") % LPD
    p = subprocess.run(["prlimit", f"--as={FLOOD_AS_LIMIT}", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rss = int(p.stderr.rsplit("maxrss=", 1)[1])
    return p.stdout, rss


def samples(exposition):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(exposition) for s in fam.samples}


def test_spoofed_flood_keeps_memory_bounded_heavies_exported_and_totals_exact(tmp_path):
    path = tmp_path / "flood.pcap"
    heavy, rx, tx = write_flood(path)
    args = ["--remote", "--local-net", "10.0.0.0/8", "--local-net", "fd00::/8",
            "--output", "metrics", "-t", str(100 << 10)]
    out, rss = run_replay(path, *args)
    small = tmp_path / "small.pcap"
    lpd_frames = [udp4(LOCAL4, FAR4)]
    write_pcap(small, [(0, 0, d) for d in lpd_frames])
    _, baseline = run_replay(small, *args)
    m = samples(out)
    nic = (("nic", "flood.pcap"),)
    exported = {dict(k[1])["remote_ip"]: v for k, v in m.items() if k[0] == "ip_traffic_tx_bytes_total"}
    assert exported == {h: float(n) for h, n in heavy.items()}        # every heavy, exact
    assert m[("lpd_remote_receive_bytes_total", nic)] == rx
    assert m[("lpd_remote_receive_packets_total", nic)] == FLOOD_SPOOFED
    assert m[("lpd_remote_transmit_bytes_total", nic)] == tx
    tracked = m[("lpd_remote_addresses", nic)]
    assert tracked <= lpd.REMOTE_TRIM_FACTOR * lpd.DEFAULT_REMOTE_MAX
    assert m[("lpd_remote_evictions_total", nic)] == FLOOD_SPOOFED + len(heavy) - tracked
    # 10^6 entries would take several hundred MiB; the bounded table takes tens.
    assert rss - baseline < 160 << 10, (rss, baseline)


# ---- GeoIP ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mmdb")
    return {"city": geoip_db.write_city(d / "city.mmdb"), "isp": geoip_db.write_isp(d / "isp.mmdb"),
            "asn": geoip_db.write_asn(d / "asn.mmdb"),
            "country": geoip_db.write_city(d / "country.mmdb", "GeoLite2-Country")}


def geo(dbs, lang="en", city="city", isp="isp"):
    paths = {}
    if city:
        paths["--geoip-db"] = str(dbs[city])
    if isp:
        paths["--geoip-isp-db"] = str(dbs[isp])
    return lpd.GeoIP(paths, lang, lambda *a: None)


def test_labels_in_english_and_chinese_with_fallbacks(dbs):
    en, zh = geo(dbs), geo(dbs, "zh-CN")
    assert en.labels(key(FAR4)) == ("United States", "California", "Mountain View", "Example Transit")
    assert zh.labels(key(FAR4)) == ("美国", "加利福尼亚州", "芒廷维尤", "Example Transit")
    assert zh.labels(key(FAR4_2)) == ("中国", "江苏省", "南京市", "China Telecom")
    assert zh.labels(key("192.0.2.1")) == ("日本", "东京都", "Chiyoda", "Unknown")     # no zh-CN city
    assert zh.labels(key(FAR6)) == ("德国", "黑森", "法兰克福", "Deutsche Beispiel")
    assert zh.labels(key("2001:db8:200::1")) == ("法国", "Unknown", "Unknown", "Unknown")
    assert zh.labels(key("100.64.0.1")) == ("Unknown",) * 4                          # no entry
    assert geo(dbs, "fr").labels(key(FAR4))[0] == "United States"                    # no such language
    assert geo(dbs, isp="asn").labels(key(FAR6))[3] == "BEISPIEL-AS"
    assert geo(dbs, city=None, isp="asn").labels(key(FAR4)) == ("Unknown", "Unknown", "Unknown", "EXAMPLE-AS")
    assert geo(dbs, city="country", isp=None).labels(key(FAR4))[0] == "United States"


def test_lookups_are_cached_and_a_replaced_database_is_reopened(dbs, tmp_path):
    path = tmp_path / "city.mmdb"
    path.write_bytes(dbs["city"].read_bytes())
    g = lpd.GeoIP({"--geoip-db": str(path)}, "en", lambda *a: None)
    assert g.labels(key(FAR4))[0] == "United States"
    first = g.current
    g.fetch_once()
    assert g.current is first                                # unchanged file: kept as is
    other = dict(geoip_db.CITY)
    other["198.51.100.0/24"] = (("Canada", "加拿大"), None, None)
    new = tmp_path / "new.mmdb"
    geoip_db.write_city(new, city=other)
    os.replace(new, path)                                    # as geoipupdate does
    assert g.fetch_once() and g.labels(key(FAR4))[0] == "Canada"
    path.write_bytes(b"garbage")                             # a broken update: keep the last good
    assert not g.fetch_once() and g.errors == 1
    assert g.labels(key(FAR4))[0] == "Canada"
    g.reopen()                                               # SIGHUP: the same, logged once
    assert g.errors == 2 and g.labels(key(FAR4))[0] == "Canada"


def run_lpd(*args, env_code="pass"):
    code = f"import sys; {env_code}; sys.argv = ['lpd'] + {list(args)!r}; import runpy; " \
           f"runpy.run_path({LPD!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", ["no module", "missing", "garbage", "empty", "wrong type", "wrong isp type"])
def test_geoip_errors_are_one_line_and_exit_78(dbs, tmp_path, case):
    pcap = tmp_path / "x.pcap"
    write_pcap(pcap, [])
    garbage = tmp_path / "garbage.mmdb"
    garbage.write_bytes(b"\x89PNG not a database at all" * 10)
    empty = tmp_path / "empty.mmdb"
    empty.write_bytes(b"")
    args, env_code, want = {
        "no module": (["-g", str(dbs["city"])], "sys.modules['maxminddb'] = None",
                      "python3-maxminddb (Debian, Ubuntu), or pip install 'lpd-netacct[geoip]'"),
        "missing": (["-g", str(tmp_path / "nope.mmdb")], "pass", "No such file or directory"),
        "garbage": (["-g", str(garbage)], "pass", "not a MaxMind DB file"),
        "empty": (["--geoip-isp-db", str(empty)], "pass", "not a MaxMind DB file"),
        "wrong type": (["-g", str(dbs["asn"])], "pass", "a GeoLite2-ASN database; --geoip-db takes"),
        "wrong isp type": (["--geoip-isp-db", str(dbs["city"])], "pass",
                           "a GeoLite2-City database; --geoip-isp-db takes"),
    }[case]
    p = run_lpd("-r", str(pcap), "--local-net", "10.0.0.0/8", *args, env_code=env_code)
    assert p.returncode == 78, p.stderr
    assert p.stderr.count("\n") == 1 and want in p.stderr, p.stderr
    if case not in ("no module",):
        assert os.path.basename(args[1]) in p.stderr


# ---- outputs ----------------------------------------------------------------------

def write_paced(path, frames, step=0.1):
    """A pcap of `frames`, one every `step` s from 1_700_000_000."""
    times = [1_700_000_000 + i * step for i in range(len(frames))]
    write_pcap(path, [(int(t), round((t % 1) * 1e6) % 1_000_000, d) for t, d in zip(times, frames)])


# Frame lengths: 1000, 142, 562 and 60 (the smallest frame is padded to Ethernet's minimum).
TRAFFIC = [udp4(LOCAL4, FAR4, 958)] * 20 + [udp4(FAR4, LOCAL4, 100)] * 5 + \
    [udp6(LOCAL6, FAR6, 500)] * 3 + [udp4(LOCAL4, FAR4_2, 10)]


def replay(path, *extra):
    out = io.StringIO()
    opts = lpd.parse_args(["-r", str(path), "--remote", "--local-net", "10.0.0.0/8",
                           "--local-net", "fd00::/8", *extra])
    assert lpd.replay(opts, out) == 0
    return out.getvalue()


def test_metrics_output_is_the_live_collectors_exposition_with_the_seed_labels(tmp_path, dbs):
    path = tmp_path / "t.pcap"
    write_paced(path, TRAFFIC)
    text = replay(path, "--output", "metrics", "-t", "1000", "-g", str(dbs["city"]),
                  "--geoip-isp-db", str(dbs["isp"]), "--geoip-lang", "zh-CN")
    m = samples(text)
    # (prometheus_client >= 0.20 sorts labels in the text; Prometheus ignores their order)
    assert m[("ip_traffic_tx_bytes_total", tuple(sorted({
        "remote_ip": FAR4, "country": "美国", "province": "加利福尼亚州", "city": "芒廷维尤",
        "isp": "Example Transit"}.items())))] == 20000
    rx = {dict(k[1])["remote_ip"]: v for k, v in m.items() if k[0] == "ip_traffic_rx_bytes_total"}
    assert rx == {FAR4: 5 * 142.0, FAR6: 0.0}                 # FAR4_2 (60 bytes) is under -t
    nic = (("nic", "t.pcap"),)
    assert m[("lpd_remote_transmit_bytes_total", nic)] == 20000 + 3 * 562 + 60
    assert m[("lpd_remote_receive_packets_total", nic)] == 5
    assert ("lpd_receive_bytes_total", (("local_ip", LOCAL4), ("nic", "t.pcap"))) in m


def test_seed_series_declare_the_seeds_label_order():
    published = lpd.Published()
    _, remotes = decode([(f, len(f)) for f in TRAFFIC])
    published.publish({"remotes": remotes.snapshot()})
    c = lpd.Collector(published, lpd.NicMapping(None, "eth9", lambda *a: None), "eth9", threshold=0)
    fams = {f.name: f for f in c.collect()}
    for name in ("ip_traffic_tx_bytes", "ip_traffic_rx_bytes"):
        assert fams[name].type == "counter"
        assert [list(s.labels) for s in fams[name].samples][0] == \
            ["remote_ip", "country", "province", "city", "isp"]


def test_threshold_means_exceed_and_zero_exports_every_remote(tmp_path):
    path = tmp_path / "t.pcap"
    write_paced(path, TRAFFIC)

    def exported(t):
        return sorted({dict(k[1])["remote_ip"] for k in samples(replay(path, "--output", "metrics", "-t", t))
                       if k[0] == "ip_traffic_tx_bytes_total"})
    assert exported("0") == sorted([FAR4, FAR4_2, FAR6])
    assert exported("60") == sorted([FAR4, FAR6])              # 60 bytes do not exceed 60
    assert exported(str(20000 + 5 * 142)) == []


def test_json_output_is_every_api_document_and_the_same_on_every_run(tmp_path):
    path = tmp_path / "t.pcap"
    write_paced(path, TRAFFIC)
    first, second = replay(path, "--output", "json"), replay(path, "--output", "json")
    assert first == second
    docs = json.loads(first)
    assert set(docs) == {"interface", "addresses", "remotes"}
    r = docs["remotes"]
    assert [d["address"] for d in r["remotes"]] == [FAR4, FAR6, FAR4_2]      # by bytes
    assert r["remotes"][0] == {"address": FAR4, "country": "Unknown", "province": "Unknown",
                               "city": "Unknown", "isp": "Unknown", "tx_bytes": 20000,
                               "tx_packets": 20, "rx_bytes": 710, "rx_packets": 5, "error_bytes": 0}
    assert r["totals"]["tx_bytes"] == 20000 + 3 * 562 + 60 and r["tracked"] == 3
    assert docs["interface"]["rx_packets"] == len(TRAFFIC)
    # The packet clock: 29 frames 0.1 s apart, ticks on a 1 s grid from the first.
    assert docs["addresses"]["time"] == pytest.approx(1_700_000_002.8)


def test_rates_in_a_replay_come_from_the_files_clock(tmp_path):
    path = tmp_path / "rate.pcap"
    write_paced(path, [udp4(LOCAL4, FAR4, 958)] * 50)                # 10 frames of 1000 B per s
    docs = json.loads(replay(path, "--output", "json"))
    row = docs["addresses"]["addresses"][0]
    assert row["tx_bps"] == pytest.approx(80_000)
    slow = json.loads(replay(path, "--output", "json", "--interval", "2.5"))
    assert slow["addresses"]["addresses"][0]["tx_bps"] == pytest.approx(80_000)


def test_table_output_is_aligned_sorted_and_shows_exact_and_human_bytes(tmp_path):
    path = tmp_path / "t.pcap"
    write_paced(path, TRAFFIC)
    rules = tmp_path / "r.filters"
    rules.write_text("v6;ip6\nudp;udp\n")
    text = replay(path, "-f", str(rules))
    lines = text.splitlines()
    head = lines.index(next(l for l in lines if l.split()[:3] == ["remote", "address", "country"]))
    remote_rows = lines[head + 1:head + 4]
    assert [l.split()[0] for l in remote_rows] == [FAR4, FAR6, FAR4_2]
    assert "20000 (19.5 KiB)" in remote_rows[0]
    widths = {len(l) for l in lines[head:head + 4]}
    assert len(widths) == 1                                   # right-aligned numbers end together
    assert any(l.split()[:1] == ["udp"] for l in lines) and "Unknown" in remote_rows[0]


def test_remote_replay_needs_local_networks(tmp_path):
    path = tmp_path / "t.pcap"
    write_paced(path, TRAFFIC)
    assert lpd.main(["-r", str(path), "--remote"]) == 64


# ---- /api over a real socket --------------------------------------------------------

@contextlib.contextmanager
def api_server(snaps, geo=None):
    published = lpd.Published()
    published.publish(snaps)
    collector = lpd.Collector(published, lpd.NicMapping(None, "eth9", lambda *a: None), "eth9", geo=geo)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    srv = lpd.make_metrics_server("127.0.0.1", 0, registry,
                               lambda path, query: lpd.api_answer(path, query, published,
                                                                  collector.presentation))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.getheader("Content-Type"), json.loads(r.read())
    finally:
        c.close()


def test_api_documents_with_top_and_errors(dbs):
    dec, remotes = decode([(f, len(f)) for f in TRAFFIC])
    snaps = {"time": 12.5, "interface": dec.snapshot(up=True), "addresses": dec.local.snapshot(),
             "remotes": remotes.snapshot(), "rules": lpd.RuleSnapshot((("a", 5, 1), ("b", 9, 2)))}
    with api_server(snaps, geo(dbs, "zh-CN")) as port:
        status, ctype, doc = get(port, "/api/remotes?top=1")
        assert status == 200 and ctype.startswith("application/json")
        assert doc["nic"] == "eth9" and doc["time"] == 12.5
        assert [(d["address"], d["country"], d["tx_bytes"]) for d in doc["remotes"]] == [(FAR4, "美国", 20000)]
        assert get(port, "/api/remotes")[2]["tracked"] == 3
        _, _, doc = get(port, "/api/addresses?top=5")
        assert [d["address"] for d in doc["addresses"]] == [LOCAL4, LOCAL6]
        assert doc["addresses"][0]["tx_bytes"] == 20000 + 60 and doc["addresses"][0]["nic"] == "eth9"
        assert [d["id"] for d in get(port, "/api/rules")[2]["rules"]] == ["b", "a"]
        assert get(port, "/api/interface")[2]["frames"] == len(TRAFFIC)
        assert get(port, "/api/remotes?top=x")[0] == 400
    del snaps["remotes"]
    with api_server(snaps) as port:
        status, _, doc = get(port, "/api/remotes")
        assert status == 404 and "not enabled" in doc["error"]


def test_a_database_with_a_corrupt_data_section_labels_unknown_and_counts(dbs, tmp_path):
    """It opens (the header is sound), but every lookup fails: the remote stays Unknown,
    the failure is counted, and the scrape and the replay go on (found in review: one
    such database turned every scrape into a 500)."""
    import maxminddb
    data = bytearray(dbs["city"].read_bytes())
    md = maxminddb.open_database(str(dbs["city"])).metadata()
    start = md.record_size * 2 // 8 * md.node_count + 16       # the data section, after the tree
    end = data.rfind(b"\xab\xcd\xefMaxMind.com")
    data[start:end] = b"\xff" * (end - start)
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(bytes(data))
    g = lpd.GeoIP({"--geoip-db": str(bad)}, "en", lambda *a: None)
    assert g.labels(key(FAR4)) == ("Unknown",) * 4 and g.errors == 1
    path = tmp_path / "t.pcap"
    write_paced(path, TRAFFIC)
    m = samples(replay(path, "--output", "metrics", "-t", "0", "-g", str(bad)))
    assert m[("lpd_geoip_errors_total", ())] >= 1
    assert {dict(k[1])["country"] for k in m if k[0] == "ip_traffic_tx_bytes_total"} == {"Unknown"}
