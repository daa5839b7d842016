"""The TLS hellos stage offline (--names, --ssl-log, -r): real hellos, made by Python's
ssl module (OpenSSL) over memory BIOs, carried in hand-built TCP segments: a ClientHello
in several whole segments is read as one, a resent segment's new bytes only; a hole, a
segment cut short, a hello past TLS_HELLO_MAX and a flood of hellos that never finish
are counted and bounded, never guessed; tshark's dissection of the same trace is the
oracle for what is read (server name, ALPN, version, cipher); the server name names
the server's address in the names table, and holds it against a flood of DNS answers."""
import json
import os
import random
import re
import ssl
import subprocess
import sys

import pytest

import lpd
from harness import LPD, memory_handshake, self_signed, write_pcap
from packets import ETH_IP, ETH_IP6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_PUSH, TCP_SYN, \
    ether, ipv4, ipv6, tcp, udp

pytestmark = pytest.mark.offline

T0 = 1_700_000_000
MAC_C, MAC_S = "02:00:00:00:00:0c", "02:00:00:00:00:0d"
CLIENT, SERVER, CLIENT6, SERVER6 = "10.1.0.2", "203.0.113.7", "fd00::2", "2001:db8::7"
PORT = 9443                    # a port no protocol owns: the record header says TLS
MSS = 100                      # small: every hello is several segments
RECORD_MAX = 1 << 14           # a TLS record's most plaintext bytes


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed(str(tmp_path_factory.mktemp("cert")))


def hellos(certificate, name="app.tls.test", alpn=("h2", "http/1.1"), tls12=False):
    """(ClientHello bytes, the server's first flight) of one in-memory handshake."""
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    if alpn:
        cctx.set_alpn_protocols(list(alpn))
    if tls12:
        cctx.maximum_version = ssl.TLSVersion.TLSv1_2
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(*certificate)
    sctx.set_alpn_protocols(["http/1.1"])
    return memory_handshake(cctx, sctx, name)


def segments(src, dst, sport, dport, data, seq, mss=MSS, flags=TCP_ACK | TCP_PUSH):
    """data in TCP segments of at most mss bytes: (frame, seq) each."""
    out = []
    for i in range(0, len(data), mss):
        out.append((frame(src, dst, sport, dport, data[i:i + mss], seq + i, flags), seq + i))
    return out


def frame(src, dst, sport, dport, payload, seq, flags=TCP_ACK | TCP_PUSH):
    seg = tcp(sport, dport, flags, seq=seq, ack=1, payload=payload)
    if ":" in src:
        return ether(MAC_S, MAC_C, ETH_IP6, ipv6(src, dst, PROTO_TCP, seg))
    return ether(MAC_S, MAC_C, ETH_IP, ipv4(src, dst, PROTO_TCP, seg))


def conversation(client_hello, server_flight, client=CLIENT, server=SERVER, cport=40000,
                 mss=MSS, order=None):
    """SYN, SYN-ACK, the ClientHello in segments (in `order` if given), the server's
    flight: frames in capture order."""
    out = [frame(client, server, cport, PORT, b"", 99, TCP_SYN),
           frame(server, client, PORT, cport, b"", 499, TCP_SYN | TCP_ACK)]
    segs = [f for f, _ in segments(client, server, cport, PORT, client_hello, 100, mss)]
    out += [segs[i] for i in order] if order else segs
    out += [f for f, _ in segments(server, client, PORT, cport, server_flight, 500, 1400)]
    return out


def records(frames, step_us=1000):
    """pcap records of frames (bytes, or (bytes, wire length): cut short), step_us apart."""
    out = []
    for i, f in enumerate(frames):
        data, *wirelen = f if isinstance(f, tuple) else (f,)
        sec, us = divmod(i * step_us, 1_000_000)
        out.append((T0 + sec, us, data, *wirelen))
    return out


def run(tmp_path, frames, *args, name="t"):
    pcap = tmp_path / f"{name}.pcap"
    write_pcap(pcap, records(frames))
    log = tmp_path / f"{name}.log"
    p = subprocess.run([sys.executable, LPD, "-r", str(pcap), "--ssl-log", str(log), "--output",
                        "json", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), [json.loads(x) for x in log.read_text().splitlines()], pcap


def tshark_fields(pcap):
    """tshark's ClientHello server names and ALPN lists, the ServerHello's cipher name."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-d", f"tcp.port=={PORT},tls", "-Y",
                          "tls.handshake.type == 1", "-T", "fields", "-e",
                          "tls.handshake.extensions_server_name", "-e",
                          "tls.handshake.extensions_alpn_str"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    verbose = subprocess.run(["tshark", "-r", str(pcap), "-d", f"tcp.port=={PORT},tls", "-Y",
                              "tls.handshake.type == 2", "-V"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    return ([tuple(line.split("\t")) for line in out.splitlines()],
            re.findall(r"Cipher Suite: (\S+) \(0x[0-9a-f]{4}\)", verbose))


@pytest.mark.parametrize("tls12", (False, True))
@pytest.mark.parametrize("server", (SERVER, SERVER6))
def test_a_hello_in_segments_is_read_whole(certificate, tmp_path, tls12, server):
    client = CLIENT6 if ":" in server else CLIENT
    hello, flight = hellos(certificate, tls12=tls12)
    assert len(hello) > 2 * MSS                           # three segments at least
    doc, records, pcap = run(tmp_path, conversation(hello, flight, client, server))
    assert doc["tls"]["client_hellos"] == doc["tls"]["server_hellos"] == 1, doc["tls"]
    assert not any(doc["tls"]["parse_errors"].values())
    (r,) = records
    (sni_alpn,), ciphers = tshark_fields(pcap)
    assert (r["server_name"], "h2,http/1.1") == sni_alpn
    assert r["cipher"] == ciphers[0]
    assert r["version"] == ("TLSv12" if tls12 else "TLSv13") and r["established"] is True
    if tls12:
        assert r["next_protocol"] == "http/1.1"       # the ServerHello's, in clear in 1.2
    assert (r["id.orig_h"], r["id.resp_h"], r["id.resp_p"]) == (client, server, PORT)
    assert r["ja4"].startswith("t12d" if tls12 else "t13d") and r["ja4"][8:10] == "h2"
    names = {n["address"]: n["name"] for n in doc["names"]["names"]}
    assert names == {server: "app.tls.test"}


def test_a_resent_segment_adds_its_new_bytes_only(certificate, tmp_path):
    hello, flight = hellos(certificate)
    segs = segments(CLIENT, SERVER, 40000, PORT, hello, 100)
    # the first segment again, then one overlapping the first two
    frames = conversation(hello, flight)[:2] + [segs[0][0], segs[0][0]]
    frames.append(frame(CLIENT, SERVER, 40000, PORT, hello[MSS // 2:2 * MSS], 100 + MSS // 2))
    frames += [f for f, _ in segs[2:]]
    frames += [f for f, _ in segments(SERVER, CLIENT, PORT, 40000, flight, 500, 1400)]
    doc, records, _ = run(tmp_path, frames)
    assert doc["tls"]["client_hellos"] == 1 and len(records) == 1, doc["tls"]


def test_what_cannot_be_read_whole_is_counted_not_guessed(certificate, tmp_path):
    """A hole (the second segment after the third), a segment cut short (as the kernel
    program cuts a continuation it does not know), a hello past TLS_HELLO_MAX: no
    record, no name, each counted by its reason."""
    hello, flight = hellos(certificate)
    n = -(-len(hello) // MSS)
    assert n >= 3
    gap = conversation(hello, flight, cport=40001, order=[0, 2, 1] + list(range(3, n)))
    cut = conversation(hello, flight, cport=40002)
    cut[3] = (cut[3][:-20], len(cut[3]))                  # the second segment, cut short
    # one handshake message longer than TLS_HELLO_MAX, in records of RECORD_MAX
    body = b"\x01" + lpd.TLS_HELLO_MAX.to_bytes(3, "big") + bytes(lpd.TLS_HELLO_MAX)
    big = b"".join(b"\x16\x03\x01" + len(c).to_bytes(2, "big") + c
                   for c in (body[i:i + RECORD_MAX] for i in range(0, len(body), RECORD_MAX)))
    long_ = conversation(big, b"", cport=40003, mss=1400)
    doc, records, _ = run(tmp_path, gap + cut + long_)
    errors = doc["tls"]["parse_errors"]
    assert (errors["gap"], errors["cut"], errors["too_long"]) == (1, 1, 1), errors
    assert doc["tls"]["client_hellos"] == 0 and records == [] and not doc["names"]["names"]


def test_a_flood_of_hellos_is_bounded_and_busy_names_stay(certificate, tmp_path):
    """10^4 ClientHellos that never finish (their first segment only) and 10^4 bogus
    ones (random bytes after a record header), then a real hello: lpd stays under its
    bound (prlimit), counts what it dropped, reads the real one; a name from SNI,
    protected (its server is in use), survives a flood of DNS answers."""
    rng = random.Random(27)
    hello, flight = hellos(certificate)
    frames = []
    for i in range(10_000):
        src = f"10.{2 + i // 60000}.{i // 250 % 240}.{i % 250 + 1}"
        frames.append(frame(src, SERVER, 1024 + i % 60000, PORT, hello[:MSS], 1000))
        junk = b"\x16\x03\x01" + rng.randbytes(2) + rng.randbytes(rng.randrange(1, 200))
        frames.append(frame(src, SERVER, 30000 + i % 30000, PORT, junk, 1000))
    frames += conversation(hello, flight)
    for i in range(3 * lpd.DEFAULT_NAMES_MAX // 64):            # a flood of DNS answers
        answer = (i.to_bytes(2, "big") + b"\x81\x80\0\0\0\1\0\0\0\0" + b"\x01x\x00" +
                  b"\0\1\0\1\0\0\1\0\0\4" + bytes([198, 18, i >> 8 & 255, i & 255]))
        frames.append(ether(MAC_S, MAC_C, ETH_IP, ipv4("10.1.0.1", CLIENT, PROTO_UDP,
                                                       udp(53, 5353 + i % 100, answer))))
    pcap = tmp_path / "flood.pcap"
    write_pcap(pcap, records(frames, 100))
    log = tmp_path / "ssl.log"
    p = subprocess.run(["prlimit", f"--as={2 << 30}", sys.executable, LPD, "-r", str(pcap),
                        "--ssl-log", str(log), "--names-max", "256", "--output", "json"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    tls = doc["tls"]
    assert tls["parse_errors"]["evicted"] >= 10_000 - lpd.TLS_HELLOS_MAX, tls
    assert tls["client_hellos"] >= 1 and sum(tls["parse_errors"].values()) >= 10_000, tls
    assert any(json.loads(x).get("server_name") == "app.tls.test"
               for x in log.read_text().splitlines())
    names = {n["address"]: n["name"] for n in doc["names"]["names"]}
    assert names.get(SERVER) == "app.tls.test" and len(names) <= 256


def test_the_classic_program_copies_whole_the_segments_beginning_a_handshake():
    """The classic kernel program with --names' judge (HANDSHAKE_EXPRESSION, which the
    libpcap differential tests compile: it is in filter_expressions.txt) copies whole
    the frames the eBPF program's stateless test does (copy_length without hellos), on
    every corpus frame and hand-built hellos, but for IPv6 frames with an extension
    header, which the eBPF program copies whole unjudged (as for --http's ports: lpd's
    userspace walks extension headers, libpcap's `tcp[]`/`ip6[6]` do not); a frame
    shorter than the judge's loads is copied whole unjudged (judge_guard), so those
    are left out."""
    from conftest import CORPUS
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "filter_expressions.txt")) as f:
        assert lpd.HANDSHAKE_EXPRESSION in f.read().splitlines()
    whole = lpd.whole_frames_program((), (), True)
    prog = lpd.kernel_program(None, lpd.SNAPLEN_ACCOUNTING, whole)
    guard = lpd.program_snaplen(whole)
    plan = lpd.CopyPlan(0, 0, (), (), True)
    frames = []
    for name in sorted(os.listdir(CORPUS)):
        if name.endswith(".pcap"):
            try:
                frames += [bytes(d) for _, _, d in lpd.read_pcap(os.path.join(CORPUS, name))]
            except lpd.LpdError:
                continue
    tls = [frame(CLIENT, SERVER, 40000, PORT, b"\x16\x03\x01\x02\x00" + bytes(600), 1),
           frame(CLIENT6, SERVER6, 40000, PORT, b"\x16\x03\x03\x00\x40" + bytes(600), 1),
           frame(CLIENT, SERVER, 40000, PORT, b"\x17\x03\x03\x00\x40" + bytes(600), 1)]
    judged = whole_n = 0
    for data in frames + tls:
        if len(data) <= guard:
            continue
        judged += 1
        classic = min(lpd.bpf_interpret(prog, data, len(data)), len(data)) == len(data)
        ebpf = lpd.copy_length(plan, data[:lpd.VIEW_DATA]) == lpd.SNAPLEN_FULL
        if classic != ebpf:
            q = lpd.past_tags(data)[0]
            assert ebpf and data[12:14] == b"\x86\xdd" and \
                data[q + lpd.IPV6_NEXT_OFF] in lpd.IPV6_EXT_LEN, data.hex()
        whole_n += classic
    assert judged > 500 and whole_n >= 2, (judged, whole_n)
