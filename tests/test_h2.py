"""HTTP/2 and gRPC in the HTTP stage (issue 28), without sockets: the `h2` library plays
client and server (an implementation lpd shares nothing with), its bytes go through TCP
segments (tests/h2wire.py) into lpd.HttpRequests, and what the stage records is checked
against what the two peers said to each other.

Checked: prior knowledge and `Upgrade: h2c`; multiplexed streams answered out of order;
the same records whatever the segment sizes; padding and priority fields; PUSH_PROMISE;
RST_STREAM and GOAWAY; gRPC unary, server-streaming and bidi calls, trailers-only
errors, statuses synthesised from RST_STREAM and :status, messages and their bytes each
way, a large message across frames and segments; the metric families and documents;
capture joined mid-connection (exact where HPACK can know, `_OTHER` where it cannot,
never a wrong value); bounds: CONTINUATION flood, SETTINGS flood, streams per
connection and over all, header block bytes over all; garbage never raises; a pcap of
the same frames replayed with `lpd -r` gives the same records."""
import json
import random
import subprocess
import sys
import types

import h2.events
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import lpd
from h2wire import MSS, Peers, Wire, grpc_message
from harness import LPD, write_pcap, PCAP_NS

pytestmark = pytest.mark.unit

GRPC_REQ = [(":method", "POST"), (":scheme", "http"), (":authority", "svc:50051"),
            ("content-type", "application/grpc"), ("te", "trailers")]
OK_HEAD = [(":status", "200"), ("content-type", "application/grpc")]


def get(path, authority="web.test", method="GET"):
    return [(":method", method), (":path", path), (":scheme", "http"), (":authority", authority)]


def grpc(path):
    return GRPC_REQ[:1] + [(":path", path)] + GRPC_REQ[1:]


def fields(rec, *names):
    return tuple(rec.get(n) for n in names)


# --- HTTP/2 requests -----------------------------------------------------------------------

def test_prior_knowledge_requests_multiplexed_and_answered_out_of_order():
    w = Wire()
    p = Peers(w)
    a = p.request(get("/a"))
    b = p.request(get("/items/42", method="HEAD"))
    c = p.request(get("/upload", method="POST"), body=b"x" * 3000)
    p.respond(c, [(":status", "201")], b"made")
    p.respond(b, [(":status", "404")])
    p.respond(a, [(":status", "200"), ("content-type", "text/plain")], b"y" * 20000)
    w.close()
    got = [fields(r, "stream_id", "trans_depth", "method", "uri", "host", "version", "status_code",
                  "request_body_len", "response_body_len") for r in w.records]
    assert got == [(5, 3, "POST", "/upload", "web.test", "2", 201, 3000, 4),
                   (3, 2, "HEAD", "/items/42", "web.test", "2", 404, 0, 0),
                   (1, 1, "GET", "/a", "web.test", "2", 200, 0, 20000)]
    assert all(r["ttfb"] <= r["duration"] and "rpc_method" not in r for r in w.records)
    assert not any(w.stage.errors.values()), w.stage.errors
    snap = w.stage.snapshot()
    versions = {labels[3] for labels, *_ in snap.histogram}
    assert versions == {"2"} and not snap.rpc_histogram


def conversation(mss, pad=0):
    w = Wire()
    p = Peers(w, mss=mss)
    sids = [p.request(get(f"/p/{i}")) for i in range(4)]
    for i, sid in enumerate(reversed(sids)):
        p.server.send_headers(sid, [(":status", "200")], end_stream=False)
        p.server.send_data(sid, b"z" * (100 * i + 1), end_stream=True, pad_length=pad or None)
        p.flush()
    w.close()
    return [{k: v for k, v in r.items() if k not in ("ts", "ttfb", "duration")}
            for r in w.records], w.stage.errors


@pytest.mark.parametrize("mss", [1, 5, 9, 10, 100, 1400])
def test_the_same_records_whatever_the_segments(mss):
    want, _ = conversation(MSS)
    got, errors = conversation(mss)
    assert got == want and len(got) == 4 and not any(errors.values())
    assert [r["response_body_len"] for r in got] == [1, 101, 201, 301]


def test_padding_is_not_counted_as_body():
    got, errors = conversation(MSS, pad=17)
    assert [r["response_body_len"] for r in got] == [1, 101, 201, 301]
    assert not any(errors.values())


def test_h2c_upgrade_makes_the_request_stream_1():
    w = Wire()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    settings_header = client.initiate_upgrade_connection()
    w.send(True, b"GET /up HTTP/1.1\r\nHost: up.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                 b"Upgrade: h2c\r\nHTTP2-Settings: " + settings_header + b"\r\n\r\n")
    server.initiate_upgrade_connection(settings_header)
    w.send(False, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
           + server.data_to_send())
    p = Peers.__new__(Peers)
    p.wire, p.mss, p.client, p.server = w, MSS, client, server
    preface = client.data_to_send()            # the client's preface, after the 101
    w.send(True, preface)
    p._received(server, preface)
    p.respond(1, [(":status", "200")], b"upgraded!")
    sid = p.request(get("/after"))
    p.respond(sid, [(":status", "204")])
    w.close()
    got = [fields(r, "stream_id", "method", "uri", "host", "version", "status_code",
                  "response_body_len") for r in w.records]
    assert got == [(1, "GET", "/up", "up.test", "2", 200, 9), (3, "GET", "/after", "web.test", "2", 204, 0)]
    assert not any(w.stage.errors.values()), w.stage.errors


def test_websocket_upgrade_is_still_a_tunnel():
    w = Wire()
    w.send(True, b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    w.send(False, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello")
    w.close()
    assert [fields(r, "uri", "version", "status_code") for r in w.records] == [("/ws", "1.1", 101)]


def test_push_promise_is_a_request_of_its_own():
    w = Wire()
    p = Peers(w)
    sid = p.request(get("/page"))
    pushed = p.server.get_next_available_stream_id()
    p.server.push_stream(sid, pushed, get("/style.css"))
    p.respond(sid, [(":status", "200")], b"<html>")
    p.respond(pushed, [(":status", "200")], b"css")
    w.close()
    got = sorted(fields(r, "stream_id", "uri", "status_code", "response_body_len") for r in w.records)
    assert got == [(1, "/page", 200, 6), (2, "/style.css", 200, 3)]


def test_reset_before_an_answer_and_streams_past_goaway():
    w = Wire()
    p = Peers(w)
    a = p.request(get("/gone"))
    p.client.reset_stream(a)
    p.flush()
    b = p.request(get("/late"))
    p.server.close_connection(last_stream_id=a)     # b was never processed
    p.flush()
    w.close()
    assert [fields(r, "uri", "status_code") for r in w.records] == [("/gone", 0)]
    assert b == 3


# --- gRPC --------------------------------------------------------------------------------

def grpc_calls():
    """Every kind of call, and what lpd must say of each: (method, status, messages each way,
    message bytes each way)."""
    w = Wire(port=50051)
    p = Peers(w)
    want = []
    sid = p.request(grpc("/lpd.test.Echo/Unary"), grpc_message(b"ping"))
    p.respond(sid, OK_HEAD, grpc_message(b"pong!"), [("grpc-status", "0")])
    want.append(("lpd.test.Echo/Unary", 0, None, 1, 1))
    sid = p.request(grpc("/lpd.test.Echo/ServerStream"), grpc_message(b"n=3"))
    p.respond(sid, OK_HEAD, b"".join(grpc_message(b"r%d" % i) for i in range(3)),
              [("grpc-status", "0")])
    want.append(("lpd.test.Echo/ServerStream", 0, None, 1, 3))
    sid = p.request(grpc("/lpd.test.Echo/Bidi"), grpc_message(b"a"), end=False)
    p.server.send_headers(sid, OK_HEAD)
    p.flush()
    for i in range(5):
        p.client.send_data(sid, grpc_message(b"m" * i))
        p.server.send_data(sid, grpc_message(b"e" * i))
        p.flush()
    p.client.end_stream(sid)
    p.server.send_headers(sid, [("grpc-status", "0")], end_stream=True)
    p.flush()
    want.append(("lpd.test.Echo/Bidi", 0, None, 6, 5))
    sid = p.request(grpc("/lpd.test.Echo/NotFound"), grpc_message(b""))
    p.respond(sid, OK_HEAD + [("grpc-status", "5"), ("grpc-message", "no%20such%20thing")])
    want.append(("lpd.test.Echo/NotFound", 5, "no such thing", 1, 0))
    sid = p.request(grpc("/lpd.test.Echo/Big"), grpc_message(b"B" * 100_000))
    p.respond(sid, OK_HEAD, grpc_message(b"b" * 70_000), [("grpc-status", "0")])
    want.append(("lpd.test.Echo/Big", 0, None, 1, 1))
    sid = p.request(grpc("/lpd.test.Echo/Slow"), grpc_message(b"x"))
    p.client.reset_stream(sid, error_code=0x8)      # the client's deadline: CANCEL
    p.flush()
    want.append(("lpd.test.Echo/Slow", 1, None, 1, 0))
    sid = p.request(grpc("/lpd.test.Echo/Refused"), grpc_message(b"x"))
    p.server.reset_stream(sid, error_code=0x7)      # REFUSED_STREAM
    p.flush()
    want.append(("lpd.test.Echo/Refused", 14, None, 1, 0))
    sid = p.request(grpc("/lpd.test.Echo/Proxy"), grpc_message(b"x"))
    p.respond(sid, [(":status", "503"), ("content-type", "text/plain")], b"down")
    want.append(("lpd.test.Echo/Proxy", 14, None, 1, 0))
    sid = p.request(grpc("/lpd.test.Echo/Broken"), grpc_message(b"x"))
    p.server.reset_stream(sid, error_code=0x2)      # INTERNAL_ERROR
    p.flush()
    want.append(("lpd.test.Echo/Broken", 13, None, 1, 0))
    w.close()
    return w, want


def test_grpc_calls_their_status_and_messages():
    w, want = grpc_calls()
    got = [(r["rpc_method"], r["grpc_status"], r.get("grpc_message"), r["request_messages"],
            r["response_messages"]) for r in w.records]
    assert got == want
    assert all(r["version"] == "2" and r["id.resp_p"] == 50051 for r in w.records)
    big = next(r for r in w.records if r["rpc_method"].endswith("Big"))
    assert (big["request_body_len"], big["response_body_len"]) == (100_005, 70_005)
    assert not any(w.stage.errors.values()), w.stage.errors


def test_grpc_metric_families():
    w, want = grpc_calls()
    text = lpd_exposition(w.stage)
    from prometheus_client.parser import text_string_to_metric_families
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    calls = {}
    for s in fams["rpc_server_call_duration_seconds"].samples:
        if s.name.endswith("_count"):
            calls[(s.labels["rpc_method"], s.labels["rpc_response_status_code"])] = s.value
            assert (s.labels["rpc_system_name"], s.labels["server_address"],
                    s.labels["server_port"], s.labels["container"]) == ("grpc", "10.0.0.2", "50051", "")
    assert calls == {(m, lpd.GRPC_STATUS_NAMES[st]): 1 for m, st, *_ in want}
    http = [s for s in fams["http_server_request_duration_seconds"].samples if s.name.endswith("_count")]
    assert not http, "gRPC calls are not HTTP requests in OpenTelemetry's families"
    msgs = {(s.labels["rpc_method"], s.labels["direction"]): s.value
            for s in fams["lpd_rpc_messages"].samples if s.name.endswith("_total")}
    assert msgs[("lpd.test.Echo/Bidi", "request")] == 6 and msgs[("lpd.test.Echo/Bidi", "response")] == 5
    sizes = {(s.labels["rpc_method"], s.labels["direction"]): s.value
             for s in fams["lpd_rpc_message_bytes"].samples if s.name.endswith("_total")}
    assert sizes[("lpd.test.Echo/Big", "request")] == 100_000
    assert sizes[("lpd.test.Echo/ServerStream", "response")] == 6


def lpd_exposition(stage):
    from prometheus_client import CollectorRegistry, generate_latest

    class C:
        def collect(self):
            yield from lpd.http_metrics(None, {"http": stage.snapshot()})
    reg = CollectorRegistry()
    reg.register(C())
    return generate_latest(reg).decode()


def test_documents_and_table_show_the_grpc_servers():
    w, want = grpc_calls()
    snap = {"http": w.stage.snapshot().merge(lpd.HttpSnapshot())}
    doc = lpd.http_document(snap, types.SimpleNamespace(nic="test"))
    rpc = doc["rpc"]["10.0.0.2:50051"]
    assert rpc["calls"] == len(want) and rpc["errors"] == sum(1 for _, st, *_ in want if st)
    assert rpc["statuses"]["OK"] == 4 and rpc["methods"]["lpd.test.Echo/Unary"] == 1
    text = "".join(lpd.http_table(doc))
    assert "gRPC servers: 1" in text and "NOT_FOUND 1" in text


# --- capture joined mid-connection ----------------------------------------------------------

def test_joined_mid_connection_exact_where_known_other_where_not():
    w = Wire(port=50051, handshake=False)
    w.muted = True                         # the channel opens and calls before capture
    p = Peers(w)
    for path in ("/svc.A/Old", "/svc.A/Old"):
        sid = p.request(grpc(path), grpc_message(b"q"))
        p.respond(sid, OK_HEAD, grpc_message(b"r"), [("grpc-status", "0")])
    w.muted = False
    truth = []
    for path, status in (("/svc.A/Old", "0"), ("/svc.B/New", "0"), ("/svc.B/New", "5"),
                         ("/svc.A/Old", "0")):
        sid = p.request(grpc(path), grpc_message(b"q"))
        p.respond(sid, OK_HEAD, grpc_message(b"r"), [("grpc-status", status)])
        truth.append((sid, path[1:], int(status)))
    w.close()
    assert len(w.records) == len(truth)
    for rec, (sid, method, status) in zip(w.records, truth):
        assert rec["stream_id"] == sid
        assert rec["uri"] in ("/" + method, "_OTHER"), rec
        if "rpc_method" in rec:
            assert rec["rpc_method"] in (method, "_OTHER")
            assert rec["grpc_status"] in (status, None)
        assert rec["method"] in ("POST", "_OTHER")
    news = [r for r in w.records if r["uri"] == "/svc.B/New"]
    assert len(news) == 2, w.records       # inserted since capture began: exact
    assert [r["uri"] for r in w.records if r not in news] == ["_OTHER", "_OTHER"], \
        "the old path was indexed before capture"
    # content-type was indexed before capture too: that these are gRPC calls is not known
    # from what the capture holds, so none is said to be one (never a guess)
    assert not any("rpc_method" in r for r in w.records)
    assert w.stage.errors["hpack_unknown"] > 0


def test_joined_mid_connection_a_new_channel_value_is_exact():
    """Fields the encoder sends as literals after capture began are exact: a content-type
    of its own on a new method makes it a gRPC call with its status."""
    w = Wire(port=50051, handshake=False)
    w.muted = True
    p = Peers(w)
    sid = p.request(grpc("/svc.A/Old"), grpc_message(b"q"))
    p.respond(sid, OK_HEAD, grpc_message(b"r"), [("grpc-status", "0")])
    w.muted = False
    head = grpc("/svc.D/Proto")
    head[head.index(("content-type", "application/grpc"))] = ("content-type", "application/grpc+proto")
    sid = p.request(head, grpc_message(b"q"))
    p.respond(sid, [(":status", "200"), ("content-type", "application/grpc+proto")],
              grpc_message(b"r"), [("grpc-status", "7")])
    w.close()
    rec, = w.records
    assert (rec["uri"], rec["rpc_method"], rec["request_messages"], rec["response_messages"]) == \
        ("/svc.D/Proto", "svc.D/Proto", 1, 1)
    assert rec["grpc_status"] in (7, None)     # its name may be an entry from before capture


def test_joined_where_a_segment_starts_mid_frame():
    """The first segment seen starts inside a frame: nothing is read until one starts on a
    frame boundary; then the calls after it are read."""
    w = Wire(port=50051, handshake=False)
    w.muted = True
    p = Peers(w)
    w.muted = False
    sid = p.request(grpc("/svc.C/Fresh"), grpc_message(b"q" * 5000))   # several segments
    w2 = Wire(port=50051, handshake=False)
    for t, frame in w.frames[1:]:          # the first segment of it is lost
        w2.stage.packet(frame, t)
    p.wire = w2
    w2.seq = w.seq
    p.respond(sid, OK_HEAD, grpc_message(b"r"), [("grpc-status", "0")])
    sid = p.request(grpc("/svc.C/Later"), grpc_message(b"q"))
    p.respond(sid, OK_HEAD, grpc_message(b"r"), [("grpc-status", "0")])
    w2.close()
    assert [r["uri"] for r in w2.records] == ["/svc.C/Later"]


# --- bounds ---------------------------------------------------------------------------------

def frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


SERVER_PREFACE = frame(lpd.H2_SETTINGS, 0, 0)


def test_continuation_flood_is_dropped_as_it_comes():
    w = Wire()
    w.send(True, lpd.H2_PREFACE + frame(lpd.H2_SETTINGS, 0, 0))
    w.send(False, SERVER_PREFACE)
    w.send(True, frame(lpd.H2_HEADERS, 0, 1, b"\x82\x84"))    # GET /, no END_HEADERS
    held = []
    for _ in range(400):
        w.send(True, frame(lpd.H2_CONTINUATION, 0, 1, b"\x40\x01a\x81a" * 200))
        held.append(w.stage.h2_blocks)
    assert max(held) <= lpd.H2_HEADER_BLOCK_MAX
    assert w.stage.errors["h2_header_block_too_large"] == 1
    w.send(True, frame(lpd.H2_CONTINUATION, lpd.H2_END_HEADERS, 1, b""))
    assert w.stage.h2_blocks == 0
    # the connection goes on: a literal request is read exactly
    w.send(True, frame(lpd.H2_HEADERS, lpd.H2_END_HEADERS | lpd.H2_END_STREAM, 3,
                       b"\x82\x04\x05/next\x86"))
    w.send(False, frame(lpd.H2_HEADERS, lpd.H2_END_HEADERS | lpd.H2_END_STREAM, 3, b"\x88"))
    w.close()
    assert [fields(r, "stream_id", "method", "uri", "status_code") for r in w.records] == \
        [(3, "GET", "/next", 200)]


def test_settings_flood_and_stream_flood_are_bounded():
    w = Wire()
    w.send(True, lpd.H2_PREFACE + frame(lpd.H2_SETTINGS, 0, 0, b"\x00\x01\x00\x00\x10\x00" * 10) * 5000)
    conn = next(iter(w.stage.streams.values())).h2
    assert len(conn.client.pending) <= lpd.H2_SETTINGS_PENDING_MAX
    block = b"\x82\x84\x86"                 # GET / http, all static
    w.send(True, b"".join(frame(lpd.H2_HEADERS, lpd.H2_END_HEADERS | lpd.H2_END_STREAM, 2 * i + 1, block)
                          for i in range(lpd.H2_STREAMS_MAX + 50)))
    assert len(conn.streams) == lpd.H2_STREAMS_MAX == w.stage.h2_streams
    assert w.stage.errors["h2_too_many_streams"] == 50
    w.close()
    assert w.stage.h2_streams == 0 and len(w.records) == lpd.H2_STREAMS_MAX
    assert all(r["status_code"] == 0 for r in w.records)


def test_bounded_over_every_connection(monkeypatch):
    monkeypatch.setattr(lpd, "H2_STREAMS_TOTAL_MAX", 10)
    monkeypatch.setattr(lpd, "H2_BLOCKS_TOTAL_MAX", 3000)
    stage = lpd.HttpRequests((8080,))
    conns = []
    for port in (40001, 40002, 40003):
        w = Wire(stage=stage, client_port=port)
        w.send(True, lpd.H2_PREFACE + frame(lpd.H2_SETTINGS, 0, 0))
        w.send(True, b"".join(frame(lpd.H2_HEADERS, lpd.H2_END_HEADERS, 2 * i + 1, b"\x82\x84\x86")
                              for i in range(5)))
        w.send(True, frame(lpd.H2_HEADERS, 0, 11, b"\x40\x01a\x81a" * 400))   # 2 KB held
        conns.append(w)
    assert stage.h2_streams == 10 and stage.errors["h2_too_many_streams"] == 5
    assert stage.h2_blocks <= 3000 and stage.errors["h2_header_block_too_large"] >= 1
    for w in conns:
        w.close()
    assert stage.h2_streams == 0 and stage.h2_blocks == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=30),
       st.booleans())
def test_garbage_after_the_preface_never_raises(chunks, mid):
    w = Wire(handshake=not mid)
    if not mid:
        w.send(True, lpd.H2_PREFACE)
    for to_server, data in chunks:
        w.send(to_server, b"\0" + data if mid else data)
    w.close()
    assert w.stage.h2_streams == 0 and w.stage.h2_blocks == 0


def test_frames_from_real_peers_cut_at_random_never_raise():
    rng = random.Random(7)
    w, _ = grpc_calls()
    payloads = [(f, t) for t, f in w.frames]
    for _ in range(30):
        stage = lpd.HttpRequests((50051,))
        for f, t in payloads:
            if rng.random() < 0.1:
                continue                   # lost
            if rng.random() < 0.1:
                f = bytearray(f)
                f[rng.randrange(54, len(f))] ^= 0xFF if len(f) > 54 else 0
                f = bytes(f)
            stage.packet(f, t)
        stage.finish()
        assert stage.h2_streams == 0 and stage.h2_blocks == 0


# --- replay ---------------------------------------------------------------------------------

def test_a_pcap_of_the_frames_replayed_gives_the_same_log(tmp_path):
    w, _ = grpc_calls()
    pcap, log = tmp_path / "g.pcap", tmp_path / "http.json"
    write_pcap(pcap, [(int(t), round(t % 1 * 1e9), f) for t, f in w.frames], PCAP_NS)
    p = subprocess.run([sys.executable, LPD, "-r", str(pcap), "--http", "--http-log", str(log),
                        "--output", "json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got = [json.loads(line) for line in log.read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("ts", "ttfb", "duration")}
    assert [strip(r) for r in got] == [strip(r) for r in w.records]
    out = json.loads(p.stdout)
    assert out["http"]["rpc"]["10.0.0.2:50051"]["calls"] == len(w.records)


def test_grpc_without_trailers_is_internal_and_unended_is_unknown():
    w = Wire(port=50051)
    p = Peers(w)
    sid = p.request(grpc("/s.S/NoTrailers"), grpc_message(b"q"))
    p.respond(sid, OK_HEAD, grpc_message(b"r"))          # END_STREAM on DATA, no trailers
    p.request(grpc("/s.S/Hanging"), grpc_message(b"q"))
    w.close()                                            # the connection ends mid-call
    assert [(r["rpc_method"], r["grpc_status"], r["status_code"]) for r in w.records] == \
        [("s.S/NoTrailers", 13, 200), ("s.S/Hanging", None, 0)]
    text = lpd_exposition(w.stage)
    assert 'rpc_response_status_code="_OTHER"' in text and 'rpc_response_status_code="INTERNAL"' in text


def test_a_continuation_whose_block_began_before_capture_is_let_go():
    w = Wire(handshake=False)
    w.send(True, frame(lpd.H2_CONTINUATION, lpd.H2_END_HEADERS, 1, b"\x40\x01a\x01b"))
    w.send(True, frame(lpd.H2_HEADERS, lpd.H2_END_HEADERS | lpd.H2_END_STREAM, 3,
                       b"\x82\x04\x02/x\x86"))
    w.send(False, frame(lpd.H2_HEADERS, lpd.H2_END_HEADERS | lpd.H2_END_STREAM, 3, b"\x88"))
    w.close()
    assert [fields(r, "stream_id", "method", "uri", "status_code") for r in w.records] == \
        [(3, "GET", "/x", 200)]
    assert w.stage.errors["h2_protocol"] == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["/a.S/One", "/a.S/Two", "/b.T/Three", "/web/page"]),
                          st.sampled_from(["0", "5", "14"]),
                          st.sampled_from(["application/grpc", "application/grpc+proto", None]),
                          st.binary(max_size=40)),
                min_size=1, max_size=25),
       st.integers(min_value=0, max_value=25))
def test_joined_anywhere_a_field_is_exact_or_unknown_never_wrong(calls, muted):
    """Capture begins after `muted` calls: every later call is recorded once, and each of
    its fields is the truth or says it is not known."""
    w = Wire(port=50051, handshake=False)
    w.muted = True
    p = Peers(w)
    truth = {}
    for i, (path, status, ctype, payload) in enumerate(calls):
        if i == muted:
            w.muted = False
        head = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "a")]
        if ctype:
            head.append(("content-type", ctype))
        sid = p.request(head, grpc_message(payload))
        resp = [(":status", "200")] + ([("content-type", ctype)] if ctype else [])
        p.respond(sid, resp, grpc_message(payload[::-1]), [("grpc-status", status)])
        if not w.muted:
            truth[sid] = (path, int(status) if ctype else None)
    w.close()
    assert sorted(r["stream_id"] for r in w.records) == sorted(truth)
    for r in w.records:
        path, status = truth[r["stream_id"]]
        assert r["method"] in ("POST", "_OTHER") and r["uri"] in (path, "_OTHER"), r
        assert r["status_code"] in (200, 0), r
        if "rpc_method" in r:
            assert status is not None, ("not a gRPC call", r)
            assert r["rpc_method"] in (path[1:], "_OTHER") and r["grpc_status"] in (status, None), r
            assert r["request_messages"] == r["response_messages"] == 1


def test_worker_snapshots_merge_calls_messages_and_servers():
    """--workers: each worker's snapshot of the same calls, merged, counts them twice."""
    w, want = grpc_calls()
    one = w.stage.snapshot()
    both = one.merge(one)
    assert {k: n for k, _, _, n in both.rpc_histogram} == {k: 2 * n for k, _, _, n in one.rpc_histogram}
    assert [row[5:] for row in both.rpc_messages] == [(2 * a, 2 * b) for *_, a, b in one.rpc_messages]
    (server, calls, statuses, durations, methods), = both.rpc_servers
    assert calls == 2 * len(want) and dict(statuses)["OK"] == 8 and len(durations) == 2 * len(want)
    assert lpd.HttpSnapshot().merge(one) == one.merge(lpd.HttpSnapshot())
