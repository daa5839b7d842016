"""A flood of spoofed sources inside a local network, on a live lpd: the table stays
bounded, legitimate hosts keep their exact counts during and after it, the interface
totals equal the veth's own counters, and lpd keeps answering."""
import os
import threading

import netns
from test_daemon import Lpd, metrics, pair, scrape, value, wait_for  # noqa: F401 (pair: fixture)

SPOOFED = 30_000
LOCAL_MAX = 2000
LEGIT = [200] * 300


def spoofed_frames(pair, n):
    """n frames from n different addresses inside 10.199.0.0/16 to a remote address:
    each one a new local address for lpd, none of them for B's own IP."""
    return [netns.udp_frame(pair.mac_a, pair.mac_b, f"10.199.{1 + i // 250}.{i % 250 + 1}",
                            "192.0.2.1", 64) for i in range(n)]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_spoofed_flood_inside_a_local_net(pair):
    # cbpf: eviction of the least busy addresses is the userspace table's; the eBPF
    # engine's kernel table is bounded without eviction (README, Engines)
    lpd = Lpd(pair, "--engine", "cbpf", "--mapping-url", "none", "--local-net", "10.199.0.0/16",
              "--local-max", str(LOCAL_MAX))
    pair.settle()
    before = pair.link_stats(pair.ns_b, pair.if_b)
    flood = threading.Thread(target=pair.inject, args=(pair.ns_a, pair.if_a,
                                                       spoofed_frames(pair, SPOOFED)))
    flood.start()
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, LEGIT)        # during the flood
    pair.udp_send(pair.ns_b, pair.ip4_b, pair.ip4_a, LEGIT[:100])
    flood.join(120)
    assert not flood.is_alive()
    pair.udp_send(pair.ns_a, pair.ip4_a, pair.ip4_b, [500])        # and after it
    link = netns.stats_delta(pair.link_stats(pair.ns_b, pair.if_b), before)
    sent_ab = sum(netns.frame_len(n) for n in LEGIT) + netns.frame_len(500)
    sent_ba = sum(netns.frame_len(n) for n in LEGIT[:100])
    lbl = {"nic": pair.if_b}

    def settled():
        m = metrics(pair)
        return value(m, "lpd_interface_receive_bytes_total", **lbl) == link["rx_bytes"] and m
    m = wait_for(settled, 15, 0.5)
    assert m, (link, value(metrics(pair), "lpd_interface_receive_bytes_total", **lbl))
    assert value(m, "lpd_interface_receive_packets_total", **lbl) == link["rx_packets"]
    assert value(m, "lpd_interface_transmit_bytes_total", **lbl) == link["tx_bytes"]
    b = {"local_ip": pair.ip4_b, **lbl}
    a = {"local_ip": pair.ip4_a, **lbl}
    assert value(m, "lpd_receive_bytes_total", **b) == sent_ab
    assert value(m, "lpd_receive_packets_total", **b) == len(LEGIT) + 1
    assert value(m, "lpd_transmit_bytes_total", **b) == sent_ba
    assert value(m, "lpd_transmit_bytes_total", **a) == sent_ab
    assert value(m, "lpd_local_addresses") <= LOCAL_MAX
    assert value(m, "lpd_local_evictions_total") >= SPOOFED - LOCAL_MAX
    assert len(scrape(pair)) < 2 * 1024 * 1024              # the page stays small
    assert rss_kib(lpd.proc.pid) < 200 * 1024, rss_kib(lpd.proc.pid)
    assert value(m, "lpd_capture_drops_total", worker="0", **lbl) == 0
    assert lpd.stop() == 0
