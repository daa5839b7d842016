"""Remote addresses (--remote) on a running lpd: the remotes live in the peer namespace
(documentation addresses outside the veth's networks, given to ns_a and routed to from
ns_b through it), known UDP and ICMP traffic both ways, read back exactly from /metrics
and /api/remotes; the export threshold; GeoIP labels from real MaxMind DB files (zh-CN,
fallback to English, Unknown; SIGHUP reopens them); the same traffic replayed from a
tcpdump capture; --duration with each --output; the /api/* documents."""
import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import geoip_db
import netns
from harness import LPD, PORT, Lpd, add_remotes, metrics, value, wait_for

pytestmark = [pytest.mark.live, pytest.mark.usefixtures("engine")]   # cbpf, auto (ebpf)

# Remote addresses: documentation ranges, configured only inside the test namespaces.
R4 = "198.51.100.7"         # United States / California / Mountain View; Example Transit, AS64500
R4_CN = "203.0.113.9"       # China / Jiangsu / Nanjing; China Telecom, no AS
R4_JP = "192.0.2.5"         # Japan / Tokyo / Chiyoda (no zh-CN city name); no ISP, no AS
R4_NONE = "198.18.0.9"      # benchmarking range (RFC 2544): in no database
R6 = "2001:db8:100::7"      # Germany / Hesse / Frankfurt am Main; Deutsche Beispiel, AS64501
R6_FR = "2001:db8:200::7"   # France, no subdivision, no city; no ISP, no AS
R6_OTHER = "2001:db8:100::8"  # never configured: only the far end of a remote<->remote frame

IO = ("tx_bytes", "tx_packets", "rx_bytes", "rx_packets")
UNKNOWN = "Unknown"
DEFAULT_THRESHOLD = 1048576
DURATION_PORT = PORT + 5     # lpd --duration's own metrics port (inside the namespace anyway)
PING4_FRAME = 14 + 20 + 8 + 56      # ping's default 56 data bytes
PING6_FRAME = 14 + 40 + 8 + 56
OTHER_MAC = "02:00:0a:c7:00:99"     # neither end's


def zero():
    return dict.fromkeys(IO, 0)


def add(counts, more):
    return {k: counts[k] + more[k] for k in IO}


def exchange(pair, remote, tx=(), rx=()):
    """UDP datagrams of the given payload sizes from veth-b's address to `remote` (tx for
    the remote) and from `remote`, in ns_a, back to it (rx); what lpd must count for the
    remote."""
    v6 = ":" in remote
    local = pair.ip6_b if v6 else pair.ip4_b
    if tx:
        assert pair.udp_send(pair.ns_b, local, remote, tx) == list(tx)
    if rx:
        assert pair.udp_send(pair.ns_a, remote, local, rx) == list(rx)
    return {"tx_bytes": sum(netns.frame_len(n, v6) for n in tx), "tx_packets": len(tx),
            "rx_bytes": sum(netns.frame_len(n, v6) for n in rx), "rx_packets": len(rx)}


def api(pair, path, port=PORT):
    """(status, parsed JSON) of GET path on lpd's metrics port, from inside ns_b."""
    status, body = netns.http_get(pair.ns_b, "127.0.0.1", port, path)
    return status, json.loads(body)


def io(row):
    return {k: row[k] for k in IO}


def by_address(doc):
    return {r["address"]: r for r in doc["remotes"]}


def wait_remotes(pair, expect, timeout=8.0):
    """Poll /api/remotes until every remote of `expect` has exactly its counts."""
    def done():
        status, doc = api(pair, "/api/remotes")
        assert status == 200, doc
        rows = by_address(doc)
        return doc if all(a in rows and io(rows[a]) == c for a, c in expect.items()) else None
    doc = wait_for(done, timeout, 0.1)
    assert doc, f"expected {expect}, lpd has {api(pair, '/api/remotes')[1]}"
    return doc


def wait_metrics(pair, predicate, timeout=5.0):
    """Poll /metrics until predicate(parsed metrics); those metrics."""
    def check():
        m = metrics(pair)
        return predicate(m) and m
    m = wait_for(check, timeout, 0.2)
    assert m, "/metrics never got there"
    return m


def remote_series(m, name):
    """{remote_ip: (labels without remote_ip, value)} of one ip_traffic_* counter."""
    out = {}
    for (n, labels), v in m.items():
        if n == name:
            d = dict(labels)
            out[d.pop("remote_ip")] = (d, v)
    return out


def parse_exposition(text):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def geo_labels(country, province, city, isp):
    return {"country": country, "province": province, "city": city, "isp": isp}


def check_totals_are_the_rows(doc):
    """The totals count every remote frame: with nothing evicted, the sum of the rows."""
    rows = doc["remotes"]
    assert doc["evictions"] == 0 and doc["error_bound_bytes"] == 0
    assert doc["tracked"] == len(rows)
    assert doc["totals"] == {k: sum(r[k] for r in rows) for k in IO}
    assert all(r["error_bytes"] == 0 for r in rows)
    sizes = [r["tx_bytes"] + r["rx_bytes"] for r in rows]
    assert sizes == sorted(sizes, reverse=True), "rows come biggest first"


def test_per_remote_bytes_and_packets_are_exact(pair):
    add_remotes(pair, [R4, R4_CN, R6])
    lpd = Lpd(pair, "--mapping-url", "none", "--remote", "-t", "0", "--interval", "0.25")
    lbl = {"nic": pair.if_b}
    m0, link0 = metrics(pair), pair.link_stats(pair.ns_b, pair.if_b)
    # Frames that count for no remote: between two remotes and between two local
    # addresses. First: once the remotes' counts are there, so are these. B does not
    # forward and drops the IPv4 one silently; an IPv6 one addressed to B would make it
    # answer R6 with an ICMPv6 "no route" (a real frame to a remote), so that one goes
    # to another MAC: B's stack ignores it, lpd still sees it.
    pair.inject(pair.ns_a, pair.if_a, [
        netns.udp_frame(pair.mac_a, pair.mac_b, R4, R4_CN, 300),
        netns.udp_frame(pair.mac_a, OTHER_MAC, R6, R6_OTHER, 400)])
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [200])
    pair.udp_send(pair.ns_b, pair.ip6_b, pair.ip6_a, [222])
    expect = {
        R4: exchange(pair, R4, tx=[1, 100, 1472], rx=[555, 1000]),
        R4_CN: exchange(pair, R4_CN, tx=[64], rx=[10, 20, 30]),
        R6: exchange(pair, R6, tx=[10, 1000, 1452], rx=[20]),
    }

    doc = wait_remotes(pair, expect)
    rows = by_address(doc)
    assert R6_OTHER not in rows
    for a, want in expect.items():
        assert rows[a] == {"address": a, **geo_labels(*[UNKNOWN] * 4), **want, "error_bytes": 0}
    assert (doc["nic"], doc["threshold_bytes"]) == (pair.if_b, 0)
    assert doc["time"] > time.time() - 60
    check_totals_are_the_rows(doc)

    # /metrics says the same; with -t 0 every tracked remote has its series and the
    # exact totals are their sums (whatever else, such as multicast, counted as remote).

    def consistent():
        m = metrics(pair)
        tx, rx = (remote_series(m, f"ip_traffic_{d}_bytes_total") for d in ("tx", "rx"))
        ok = (set(tx) == set(rx) and
              value(m, "lpd_remote_transmit_bytes_total", **lbl) == sum(v for _, v in tx.values()) and
              value(m, "lpd_remote_receive_bytes_total", **lbl) == sum(v for _, v in rx.values()))
        return ok and (m, tx, rx)
    got = wait_for(consistent, 5, 0.2)
    assert got, "lpd_remote_*_bytes_total must be the sum of the ip_traffic_* series with -t 0"
    m, tx, rx = got
    for a, want in expect.items():
        assert tx[a] == (geo_labels(*[UNKNOWN] * 4), want["tx_bytes"]), a
        assert rx[a] == (geo_labels(*[UNKNOWN] * 4), want["rx_bytes"]), a
    assert value(m, "lpd_remote_addresses", **lbl) == len(tx)
    assert value(m, "lpd_remote_evictions_total", **lbl) == 0
    doc = api(pair, "/api/remotes")[1]
    check_totals_are_the_rows(doc)
    assert set(by_address(doc)) == set(tx)
    assert value(m, "lpd_remote_transmit_packets_total", **lbl) == doc["totals"]["tx_packets"]
    assert value(m, "lpd_remote_receive_packets_total", **lbl) == doc["totals"]["rx_packets"]

    # The same frames count for the local end too: B's IPv4 address talked only to the
    # two IPv4 remotes (and received one datagram from A).
    b4 = {"local_ip": pair.ip4_b, **lbl}
    assert value(m, "lpd_transmit_bytes_total", **b4) == \
        expect[R4]["tx_bytes"] + expect[R4_CN]["tx_bytes"]
    assert value(m, "lpd_receive_bytes_total", **b4) == \
        expect[R4]["rx_bytes"] + expect[R4_CN]["rx_bytes"] + netns.frame_len(200)
    assert value(m, "lpd_transmit_packets_total", **{"local_ip": pair.ip6_b, **lbl}) == \
        expect[R6]["tx_packets"] + 1
    # lpd saw every frame on the link, the ones that counted for no remote included.
    link = netns.stats_delta(pair.link_stats(pair.ns_b, pair.if_b), link0)
    for direction, key in (("receive", "rx"), ("transmit", "tx")):
        for unit in ("bytes", "packets"):
            name = f"lpd_interface_{direction}_{unit}_total"
            assert value(m, name, **lbl) - value(m0, name, **lbl) == link[f"{key}_{unit}"], name
    assert value(m, "lpd_capture_drops_total", worker="0", **lbl) == 0
    assert lpd.stop() == 0


def test_threshold_exports_only_the_heavy_remote_but_totals_count_all(pair):
    add_remotes(pair, [R4, R4_CN])
    heavy_sizes, light_sizes = ([1000, 1000], [500]), ([100], [58])
    light_bytes = netns.frame_len(100) + netns.frame_len(58)          # 242
    threshold = light_bytes           # "exceed": a remote at exactly the threshold stays out
    lpd = Lpd(pair, "--mapping-url", "none", "--remote", "-t", str(threshold),
              "--interval", "0.25")
    heavy = exchange(pair, R4, *heavy_sizes)
    light = exchange(pair, R4_CN, *light_sizes)
    assert light["tx_bytes"] + light["rx_bytes"] == threshold
    doc = wait_remotes(pair, {R4: heavy, R4_CN: light})
    assert doc["threshold_bytes"] == threshold
    check_totals_are_the_rows(doc)

    lbl = {"nic": pair.if_b}
    m = wait_metrics(pair, lambda m: value(m, "lpd_remote_addresses", **lbl) == doc["tracked"])
    tx, rx = (remote_series(m, f"ip_traffic_{d}_bytes_total") for d in ("tx", "rx"))
    assert R4 in tx and R4_CN not in tx and R4_CN not in rx
    assert (tx[R4][1], rx[R4][1]) == (heavy["tx_bytes"], heavy["rx_bytes"])
    big = {a for a, r in by_address(doc).items() if r["tx_bytes"] + r["rx_bytes"] > threshold}
    assert set(tx) == set(rx) == big
    # The exact totals include the remote without a series.
    assert value(m, "lpd_remote_transmit_bytes_total", **lbl) == doc["totals"]["tx_bytes"]
    assert value(m, "lpd_remote_receive_bytes_total", **lbl) == doc["totals"]["rx_bytes"]
    assert value(m, "lpd_remote_transmit_bytes_total", **lbl) >= heavy["tx_bytes"] + light["tx_bytes"]
    assert value(m, "lpd_remote_transmit_packets_total", **lbl) == doc["totals"]["tx_packets"]
    assert value(m, "lpd_remote_addresses", **lbl) >= 2

    # One more byte and the light remote exceeds the threshold: its series appears.
    light = add(light, exchange(pair, R4_CN, tx=[1]))
    wait_remotes(pair, {R4_CN: light})

    def exported():
        series = remote_series(metrics(pair), "ip_traffic_tx_bytes_total")
        return R4_CN in series and series
    series = wait_for(exported, 5, 0.2)
    assert series, "a remote past the threshold gets its series"
    assert series[R4_CN][1] == light["tx_bytes"]
    assert remote_series(metrics(pair), "ip_traffic_rx_bytes_total")[R4_CN][1] == light["rx_bytes"]
    assert lpd.stop() == 0


GEO_ADDRS = [R4, R4_CN, R4_JP, R4_NONE, R6, R6_FR]
# (country, province, city) in zh-CN, with English where the database has no zh-CN name.
GEO_ZH = {
    R4: ("美国", "加利福尼亚州", "芒廷维尤"),
    R4_CN: ("中国", "江苏省", "南京市"),
    R4_JP: ("日本", "东京都", "Chiyoda"),
    R4_NONE: (UNKNOWN, UNKNOWN, UNKNOWN),
    R6: ("德国", "黑森", "法兰克福"),
    R6_FR: ("法国", UNKNOWN, UNKNOWN),
}
GEO_ISP = {"isp": {R4: "Example Transit", R4_CN: "China Telecom", R6: "Deutsche Beispiel"},
           "asn": {R4: "EXAMPLE-AS", R6: "BEISPIEL-AS"}}
# The city database after the replacement: other names, some networks gone.
CITY_AFTER = {
    "198.51.100.0/24": (("Canada", "加拿大"), ("Ontario", "安大略省"), ("Toronto", "多伦多")),
    "2001:db8:100::/48": (("Austria", "奥地利"), ("Vienna", "维也纳"), ("Vienna", None)),
    "192.0.2.0/24": (("Japan", "日本"), ("Osaka", None), None),
}
GEO_ZH_AFTER = {
    R4: ("加拿大", "安大略省", "多伦多"),
    R4_CN: (UNKNOWN, UNKNOWN, UNKNOWN),
    R4_JP: ("日本", "Osaka", UNKNOWN),
    R4_NONE: (UNKNOWN, UNKNOWN, UNKNOWN),
    R6: ("奥地利", "维也纳", "Vienna"),
    R6_FR: (UNKNOWN, UNKNOWN, UNKNOWN),
}


def write_isp_db(kind, path):
    return geoip_db.write_isp(path) if kind == "isp" else geoip_db.write_asn(path)


def labels_now(pair):
    """{remote: labels} from /api/remotes and from /metrics (both series)."""
    doc = api(pair, "/api/remotes")[1]
    from_api = {a: {k: r[k] for k in ("country", "province", "city", "isp")}
                for a, r in by_address(doc).items()}
    m = metrics(pair)
    tx, rx = (remote_series(m, f"ip_traffic_{d}_bytes_total") for d in ("tx", "rx"))
    return from_api, {a: lbl for a, (lbl, _) in tx.items()}, {a: lbl for a, (lbl, _) in rx.items()}


@pytest.mark.parametrize("isp_kind", ["isp", "asn"])
def test_geoip_labels_in_chinese_and_reopened_on_sighup(pair, tmp_path, isp_kind):
    city = geoip_db.write_city(tmp_path / "city.mmdb")
    isp = write_isp_db(isp_kind, tmp_path / f"{isp_kind}.mmdb")
    add_remotes(pair, GEO_ADDRS)
    lpd = Lpd(pair, "--mapping-url", "none", "-g", str(city), "--geoip-isp-db", str(isp),
              "--geoip-lang", "zh-CN", "-t", "0", "--interval", "0.25")      # -g: --remote
    expect = {a: exchange(pair, a, tx=[100 + 10 * i], rx=[50 + i] if i % 2 else [])
              for i, a in enumerate(GEO_ADDRS)}
    doc = wait_remotes(pair, expect)
    check_totals_are_the_rows(doc)

    def want(table):
        return {a: geo_labels(*table[a], GEO_ISP[isp_kind].get(a, UNKNOWN)) for a in GEO_ADDRS}

    def labels_are(table):
        def check():
            got = labels_now(pair)
            return all({a: g[a] for a in GEO_ADDRS if a in g} == want(table) for g in got) and got
        return check
    got = wait_for(labels_are(GEO_ZH), 5, 0.2)
    assert got, (want(GEO_ZH), labels_now(pair))
    # Spot checks in plain words: the seed's names, the English fallback, Unknown.
    from_api = got[0]
    assert from_api[R4] == geo_labels("美国", "加利福尼亚州", "芒廷维尤",
                                      "Example Transit" if isp_kind == "isp" else "EXAMPLE-AS")
    assert from_api[R4_JP]["city"] == "Chiyoda"
    assert from_api[R4_NONE] == geo_labels(*[UNKNOWN] * 4)
    assert from_api[R6]["country"] == "德国"

    # Replace the city database (as geoipupdate does: a new file renamed over it) and
    # SIGHUP: the labels follow, the counts stay.
    new = geoip_db.write_city(tmp_path / "city.mmdb.new", city=CITY_AFTER)
    os.replace(new, city)
    lpd.proc.send_signal(signal.SIGHUP)
    got = wait_for(labels_are(GEO_ZH_AFTER), 8, 0.2)
    assert got, (want(GEO_ZH_AFTER), labels_now(pair), lpd.stderr())
    assert got[0][R4] == geo_labels("加拿大", "安大略省", "多伦多",
                                    "Example Transit" if isp_kind == "isp" else "EXAMPLE-AS")
    assert got[0][R6]["city"] == "Vienna"
    m = metrics(pair)
    tx = remote_series(m, "ip_traffic_tx_bytes_total")
    for a in GEO_ADDRS:
        assert tx[a][1] == expect[a]["tx_bytes"], a
    assert not any(dict(k[1]).get("country") == "美国" for k in m), "the old labels are gone"
    assert value(m, "lpd_geoip_errors_total") == 0
    wait_remotes(pair, expect)
    assert "geoip: reopened" in lpd.stderr()

    # A database that fails to reopen keeps the last good one, and is counted.
    broken = tmp_path / "city.mmdb.broken"
    broken.write_bytes(b"not a MaxMind DB" * 64)
    os.replace(broken, city)
    lpd.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: value(metrics(pair), "lpd_geoip_errors_total") == 1, 8, 0.2), \
        lpd.stderr()
    assert labels_are(GEO_ZH_AFTER)(), labels_now(pair)
    assert lpd.proc.poll() is None
    assert lpd.stop() == 0


def test_remote_max_bounds_the_table_and_keeps_the_heavy_hitter(pair):
    remote_max, light = 4, 60
    lpd = Lpd(pair, "--mapping-url", "none", "--remote", "--remote-max", str(remote_max),
              "-t", "0", "--interval", "0.25")
    # Received by B from remotes (sources outside its nets; B's sink takes them).
    heavy = [netns.udp_frame(pair.mac_a, pair.mac_b, R4, pair.ip4_b, 1000)] * 20
    flood = [netns.udp_frame(pair.mac_a, pair.mac_b, f"198.18.1.{i + 1}", pair.ip4_b, 64)
             for i in range(light)]
    pair.inject(pair.ns_a, pair.if_a, heavy + flood + heavy[:5])
    rx = {"rx_bytes": 25 * 1000 + light * 64, "rx_packets": 25 + light}

    def counted():
        status, doc = api(pair, "/api/remotes")
        return all(doc["totals"][k] == v for k, v in rx.items()) and doc
    doc = wait_for(counted, 8, 0.1)
    assert doc, api(pair, "/api/remotes")[1]
    rows = by_address(doc)
    assert io(rows[R4]) == {"tx_bytes": 0, "tx_packets": 0, "rx_bytes": 25000, "rx_packets": 25}
    assert rows[R4]["error_bytes"] == 0 and doc["remotes"][0]["address"] == R4
    assert doc["tracked"] == len(rows) <= 2 * remote_max
    assert doc["evictions"] >= light + 1 - 2 * remote_max
    assert doc["error_bound_bytes"] > 0
    for r in doc["remotes"]:             # counted <= true <= counted + its error
        if r["address"].startswith("198.18.1."):
            assert r["rx_bytes"] <= 64 <= r["rx_bytes"] + r["error_bytes"], r
            assert r["error_bytes"] <= doc["error_bound_bytes"]
    lbl = {"nic": pair.if_b}
    m = wait_metrics(pair, lambda m: value(m, "lpd_remote_evictions_total", **lbl) == doc["evictions"])
    assert value(m, "lpd_remote_receive_bytes_total", **lbl) == rx["rx_bytes"]
    assert value(m, "lpd_remote_receive_packets_total", **lbl) == rx["rx_packets"]
    assert value(m, "lpd_remote_addresses", **lbl) == doc["tracked"]
    assert value(m, "lpd_remote_error_bound_bytes", **lbl) == doc["error_bound_bytes"]
    assert remote_series(m, "ip_traffic_rx_bytes_total")[R4][1] == 25000
    assert lpd.stop() == 0


def interface_nets(pair):
    """The networks of veth-b's own addresses (lpd's default local nets), as CIDRs."""
    out = pair.run(pair.ns_b, ["ip", "-j", "addr", "show", "dev", pair.if_b]).stdout
    nets = []
    for info in json.loads(out)[0]["addr_info"]:
        net = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network
        if str(net) not in nets:
            nets.append(str(net))
    return nets


def test_replay_of_a_capture_gives_the_live_numbers(pair, tmp_path):
    city = geoip_db.write_city(tmp_path / "city.mmdb")
    isp = geoip_db.write_isp(tmp_path / "isp.mmdb")
    add_remotes(pair, [R4, R4_CN, R6])
    geo = ["-g", str(city), "--geoip-isp-db", str(isp)]          # English names
    lpd = Lpd(pair, "--mapping-url", "none", "-t", "0", "--interval", "0.25", *geo)
    pcap = tmp_path / "veth-b.pcap"
    dump = netns.start_tcpdump(pair.ns_b, pair.if_b, ["-U", "-w", str(pcap)])

    expect = {R4: exchange(pair, R4, tx=[1, 700, 1472], rx=[300, 1200]),
              R4_CN: exchange(pair, R4_CN, tx=[40], rx=[41, 42]),
              R6: exchange(pair, R6, tx=[900], rx=[10, 1452])}
    assert pair.ping(pair.ns_b, R4, count=2)                      # ICMP both ways
    expect[R4] = add(expect[R4], {"tx_bytes": 2 * PING4_FRAME, "tx_packets": 2,
                                  "rx_bytes": 2 * PING4_FRAME, "rx_packets": 2})
    assert pair.ping(pair.ns_b, R6, count=2)
    expect[R6] = add(expect[R6], {"tx_bytes": 2 * PING6_FRAME, "tx_packets": 2,
                                  "rx_bytes": 2 * PING6_FRAME, "rx_packets": 2})
    pair.inject(pair.ns_a, pair.if_a, [netns.udp_frame(pair.mac_a, pair.mac_b, R4, R4_CN, 300)])
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [123])
    live = wait_remotes(pair, expect)
    time.sleep(0.5)                                # two more intervals: nothing else comes
    live = wait_remotes(pair, expect)
    live_metrics = metrics(pair)
    assert netns.stop(dump) == 0                   # SIGTERM: tcpdump flushes and closes the file
    assert pcap.stat().st_size > 24
    check_totals_are_the_rows(live)
    rows = by_address(live)
    assert (rows[R4]["country"], rows[R4]["province"], rows[R4]["city"]) == \
        ("United States", "California", "Mountain View")
    assert rows[R6]["isp"] == "Deutsche Beispiel"

    nets = interface_nets(pair)
    assert pair.net4 in nets and pair.net6 in nets, nets
    args = [sys.executable, LPD, "-r", str(pcap), "--remote", "-t", "0", *geo]
    for net in nets:
        args += ["--local-net", net]
    cp = subprocess.run(args + ["--output", "json"], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    replayed = json.loads(cp.stdout)["remotes"]
    assert replayed["remotes"] == live["remotes"]            # every row: counts and labels
    for key in ("totals", "tracked", "evictions", "error_bound_bytes", "threshold_bytes"):
        assert replayed[key] == live[key], key

    # The replay's exposition has the live series (its nic label is the file's name).
    cp = subprocess.run(args + ["--output", "metrics"], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    offline = parse_exposition(cp.stdout)

    def remote_part(m):
        return {(name, frozenset((k, v) for k, v in labels if k != "nic")): v
                for (name, labels), v in m.items()
                if name.startswith(("ip_traffic_", "lpd_remote_"))}
    assert remote_part(offline) == remote_part(live_metrics)
    assert lpd.stop() == 0


def start_duration(pair, *args, seconds=3):
    """lpd --remote --duration in ns_b, stdout piped; returns (Popen, stderr file, start
    time) once it captures."""
    err = tempfile.TemporaryFile()
    started = time.monotonic()
    proc = pair.popen(pair.ns_b, [sys.executable, LPD, "-i", pair.if_b, "--mapping-url", "none",
                                  "--web.listen-address", f"127.0.0.1:{DURATION_PORT}",
                                  "--remote", "--duration", str(seconds), *args],
                      stdout=subprocess.PIPE, stderr=err)

    def stderr():
        err.seek(0)
        return err.read().decode(errors="replace")
    assert wait_for(lambda: "capturing on" in stderr() or proc.poll() is not None, 15, 0.05), \
        "lpd --duration did not start"
    assert proc.poll() is None, stderr()
    return proc, stderr, started


@pytest.mark.parametrize("output", ["json", "table", "metrics"])
def test_duration_captures_prints_and_exits(pair, output):
    add_remotes(pair, [R4, R6])
    seconds = 3              # traffic is sent within its first second
    extra = [] if output == "table" else ["--output", output]       # table: the default
    proc, stderr, started = start_duration(pair, "-t", "0", *extra, seconds=seconds)
    expect = {R4: exchange(pair, R4, tx=[100, 1400], rx=[321]),
              R6: exchange(pair, R6, tx=[7], rx=[8, 9])}
    try:
        out, _ = proc.communicate(timeout=seconds + 15)
    except subprocess.TimeoutExpired:
        netns.stop(proc)
        raise AssertionError(f"lpd --duration {seconds} still running: {stderr()}")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, stderr()
    assert elapsed < seconds + 10, elapsed
    text = out.decode()
    if output == "json":
        docs = json.loads(text)                 # one document, nothing after it
        assert set(docs) >= {"interface", "addresses", "remotes"}
        rows = by_address(docs["remotes"])
        for a, want in expect.items():
            assert io(rows[a]) == want, a
            assert rows[a]["country"] == UNKNOWN
        check_totals_are_the_rows(docs["remotes"])
        addresses = {r["address"]: r for r in docs["addresses"]["addresses"]}
        assert addresses[pair.ip4_b]["tx_bytes"] == expect[R4]["tx_bytes"]
    elif output == "metrics":
        m = parse_exposition(text)
        tx = remote_series(m, "ip_traffic_tx_bytes_total")
        rx = remote_series(m, "ip_traffic_rx_bytes_total")
        for a, want in expect.items():
            assert (tx[a][1], rx[a][1]) == (want["tx_bytes"], want["rx_bytes"]), a
        assert value(m, "lpd_remote_transmit_bytes_total", nic=pair.if_b) == \
            sum(v for _, v in tx.values())
    else:
        assert "remote addresses:" in text, text
        lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
        for a, want in expect.items():
            assert a in lines, text
            cells = lines[a].split()
            assert str(want["tx_bytes"]) in cells and str(want["rx_bytes"]) in cells, lines[a]
            assert cells[1:5] == [UNKNOWN] * 4, lines[a]


def test_api_documents_and_top(pair, tmp_path):
    rules = tmp_path / "r.filters"
    rules.write_text("udp;udp\nicmp;icmp\n")
    add_remotes(pair, [R4, R6])
    lpd = Lpd(pair, "--mapping-url", "none", "--remote", "-f", str(rules),
              "-u", str(tmp_path / "rules.sock"), "--interval", "0.25")     # default -t
    expect = {R4: exchange(pair, R4, tx=[1400] * 3, rx=[1000]),
              R6: exchange(pair, R6, tx=[10], rx=[20])}
    full = wait_remotes(pair, expect)
    assert full["threshold_bytes"] == DEFAULT_THRESHOLD

    status, doc = api(pair, "/api/remotes?top=1")
    assert status == 200
    assert [r["address"] for r in doc["remotes"]] == [R4]                  # the biggest
    assert io(doc["remotes"][0]) == expect[R4]
    assert doc["totals"] == full["totals"] and doc["tracked"] == full["tracked"]
    status, doc = api(pair, "/api/remotes?top=0")
    assert status == 200 and doc["remotes"] == []
    status, doc = api(pair, "/api/remotes?top=2")
    assert status == 200 and len(doc["remotes"]) == min(2, full["tracked"])
    assert doc["remotes"] == full["remotes"][:2]
    for bad in ("x", "-1", "", "1.5"):
        status, doc = api(pair, f"/api/remotes?top={bad}")
        assert status == 400 and "top" in doc["error"], (bad, doc)

    # Below the default threshold of 1 MiB: no series, but the totals.
    m = metrics(pair)
    assert remote_series(m, "ip_traffic_tx_bytes_total") == {}
    assert value(m, "lpd_remote_transmit_bytes_total", nic=pair.if_b) == full["totals"]["tx_bytes"]

    status, doc = api(pair, "/api/addresses")
    assert status == 200 and doc["nic"] == pair.if_b
    addresses = {r["address"]: r for r in doc["addresses"]}
    assert addresses[pair.ip4_b]["tx_bytes"] == expect[R4]["tx_bytes"]
    assert addresses[pair.ip4_b]["rx_bytes"] == expect[R4]["rx_bytes"]
    assert addresses[pair.ip6_b]["rx_packets"] == 1
    status, doc = api(pair, "/api/addresses?top=1")
    assert status == 200 and [r["address"] for r in doc["addresses"]] == [pair.ip4_b]

    status, doc = api(pair, "/api/rules")
    assert status == 200
    rule_rows = {r["id"]: r for r in doc["rules"]}
    udp = sum(expect[a][k] for a in expect for k in ("tx_bytes", "rx_bytes"))
    assert rule_rows["udp"]["bytes"] >= udp and rule_rows["udp"]["packets"] >= 6
    assert [r["id"] for r in doc["rules"]][0] == "udp"
    status, doc = api(pair, "/api/rules?top=1")
    assert status == 200 and [r["id"] for r in doc["rules"]] == ["udp"]

    status, doc = api(pair, "/api/interface")
    assert status == 200 and doc["up"] is True and doc["nic"] == pair.if_b
    assert doc["tx_bytes"] >= expect[R4]["tx_bytes"] + expect[R6]["tx_bytes"]
    status, body = netns.http_get(pair.ns_b, "127.0.0.1", PORT, "/api/nosuch")
    assert status == 404
    assert lpd.stop() == 0

    # Without --remote the remotes document is 404, as JSON; the others answer.
    lpd = Lpd(pair, "--mapping-url", "none")
    status, doc = api(pair, "/api/remotes")
    assert status == 404 and "remotes" in doc["error"], doc
    status, doc = api(pair, "/api/rules")             # no -f: no rules stage, as in a replay
    assert status == 404 and "not enabled" in doc["error"], (status, doc)
    for kind in ("interface", "addresses"):
        status, doc = api(pair, f"/api/{kind}")
        assert status == 200 and doc["nic"] == pair.if_b, (kind, doc)
    assert not any(name.startswith(("lpd_remote_", "ip_traffic_")) for name, _ in metrics(pair))
    assert lpd.stop() == 0
