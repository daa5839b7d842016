"""The namespace harness itself works: the capture tests stand on it.

Needs root and `ip netns`; without them Pair() raises, so these fail (never skip).
"""
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import netns  # noqa: E402

PROBE_ETHERTYPE = 0x88B5        # IEEE "local experimental": nothing else sends it


pytestmark = pytest.mark.live
# One pair for the module's tests.
pair = pytest.fixture(harness.veth_pair, scope="module", name="pair")


def namespaces():
    return netns.run(None, ["ip", "netns", "list"]).stdout


def test_ping_both_families(pair):
    assert pair.ping(pair.ns_a, pair.ip4_b)
    assert pair.ping(pair.ns_b, pair.ip6_a)


def test_names_are_unique_and_prefixed(pair):
    assert pair.ns_a.startswith(f"lpdt-{os.getpid()}-")
    assert pair.ns_a != pair.ns_b
    assert pair.ns_a in namespaces() and pair.ns_b in namespaces()


def test_offloads_are_off(pair):
    out = netns.run(pair.ns_b, ["ethtool", "-k", pair.if_b]).stdout
    for feature in ("tcp-segmentation-offload", "generic-segmentation-offload",
                    "generic-receive-offload"):
        assert f"{feature}: off" in out


def test_udp_counters_match_frame_lengths(pair):
    pair.settle()
    sizes4 = [1, 100, 1000, 1472]          # 1472 + 28 = MTU 1500: no fragments
    sizes6 = [1, 100, 1000, 1452]          # 1452 + 48 = MTU 1500
    tx0, rx0 = pair.link_stats(pair.ns_a, pair.if_a), pair.link_stats(pair.ns_b, pair.if_b)
    assert pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, sizes4) == sizes4
    assert pair.udp_send(pair.ns_a, pair.ip6_a, pair.ip6_b, sizes6) == sizes6
    expected = (sum(netns.frame_len(s) for s in sizes4)
                + sum(netns.frame_len(s, ipv6=True) for s in sizes6))
    tx = netns.stats_delta(pair.link_stats(pair.ns_a, pair.if_a), tx0)
    rx = netns.stats_delta(pair.link_stats(pair.ns_b, pair.if_b), rx0)
    assert (tx["tx_packets"], tx["tx_bytes"]) == (8, expected)
    assert (rx["rx_packets"], rx["rx_bytes"]) == (8, expected)
    assert rx["tx_packets"] == 0, "the sink must keep the receiver silent (no ICMP replies)"


def test_injected_frames_seen_by_tcpdump_in_peer(pair):
    probe = [netns.eth_frame(pair.mac_b, pair.mac_a, PROBE_ETHERTYPE, bytes([i]) * 60)
             for i in range(3)]
    tagged = netns.udp_frame(pair.mac_a, pair.mac_b, pair.ip4_a, pair.ip4_b, 200,
                             vlans=[(netns.ETH_P_8021Q, 42)])
    tcpdump = netns.start_tcpdump(pair.ns_b, pair.if_b, ["-e", "-c", "4",
                                  f"ether proto {PROBE_ETHERTYPE} or vlan 42"])
    assert pair.inject(pair.ns_a, pair.if_a, probe + [tagged]) == [74, 74, 74, 200]
    out, _ = tcpdump.communicate(timeout=10)
    lines = [line for line in out.splitlines() if line and not line[0].isspace()]  # no hex
    assert len(lines) == 4, out
    assert sum(f"0x{PROBE_ETHERTYPE:04x}" in line for line in lines) == 3
    assert "vlan 42" in lines[3] and "length 200" in lines[3] and f"{pair.ip4_b}.9" in lines[3]


def test_udp_frame_builder_checksums_are_valid(pair):
    frames = [netns.udp_frame(pair.mac_a, pair.mac_b, src, dst, 300)
              for src, dst in ((pair.ip4_a, pair.ip4_b), (pair.ip6_a, pair.ip6_b))]
    tcpdump = netns.start_tcpdump(pair.ns_b, pair.if_b, ["-vv", "-c", "2", "udp port 9"])
    pair.inject(pair.ns_a, pair.if_a, frames)
    out, _ = tcpdump.communicate(timeout=10)
    assert "bad" not in out.lower() and out.count("[udp sum ok]") == 2, out


def test_popen_runs_inside_namespace(pair):
    p = netns.popen(pair.ns_b, ["ip", "-o", "-4", "addr", "show", "dev", pair.if_b],
                    stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=10)
    assert f"{pair.ip4_b}/24" in out


def test_delete_and_recreate_link():
    with netns.Pair() as p:
        p.udp_send(p.ns_a, p.ip4_a, p.ip4_b, [500] * 5)
        assert p.link_stats(p.ns_b, p.if_b)["rx_packets"] >= 5
        p.delete_link()
        assert netns.operstate(p.ns_b, p.if_b) == "absent"
        p.create_link()
        p.settle()
        assert p.link_stats(p.ns_b, p.if_b)["rx_bytes"] < 5 * netns.frame_len(500)  # new device
        assert p.ping(p.ns_a, p.ip6_b)
        p.recreate_link(gap=0.1)
        assert p.ping(p.ns_b, p.ip4_a)


def test_teardown_deletes_namespaces_and_stops_processes():
    with netns.Pair() as p:
        names = (p.ns_a, p.ns_b)
        sleeper = p.popen(p.ns_b, ["sleep", "600"])
        time.sleep(0.1)
        assert sleeper.poll() is None
    assert sleeper.poll() is not None
    listed = namespaces()
    assert names[0] not in listed and names[1] not in listed


def test_failure_raises_instead_of_skipping(monkeypatch):
    monkeypatch.setattr(netns, "IP", "/nonexistent/ip")
    with pytest.raises(netns.NetnsError):
        netns.Pair()


def test_http_get_reaches_a_server_inside_the_namespace(pair):
    server = pair.popen(pair.ns_b, [sys.executable, "-u", "-m", "http.server", "--bind",
                                    "127.0.0.1", "18080"], stdout=subprocess.PIPE, text=True,
                        cwd=os.path.dirname(os.path.abspath(__file__)))
    assert "Serving HTTP" in server.stdout.readline()
    status, body = netns.http_get(pair.ns_b, "127.0.0.1", 18080, "/netns.py")
    assert status == 200 and b"class Pair" in body
    with pytest.raises(OSError):          # the other namespace has no such server
        netns.http_get(pair.ns_a, "127.0.0.1", 18080, "/")
    netns.stop(server)
