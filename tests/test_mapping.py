"""The NIC mapping document and its poller, against a real HTTP server on loopback."""
import http.server
import ipaddress
import json
import socket
import threading
import time

import pytest

import lpd

pytestmark = pytest.mark.unit

GOOD = {"config": {"lan": "eth2", "wan0": "eth0", "wan1": "eth1"},
        "mappings": {"10.40.0.3": "wan1", "2001:DB8::0:1": "wan1"}}


def test_parse_mapping_labels_mapped_and_default_addresses():
    table, default = lpd.parse_mapping(json.dumps(GOOD))
    assert default == "eth0"
    assert table == {ipaddress.ip_address("10.40.0.3"): "eth1",
                     ipaddress.ip_address("2001:db8::1"): "eth1"}


@pytest.mark.parametrize("body,reason", [
    ("{", "invalid JSON"),
    ("[]", "expected a JSON object"),
    (json.dumps({"mappings": {}}), "'config' must be an object of strings"),
    (json.dumps({"config": {"lan": "eth2"}}), "'config' has no 'wan0'"),
    (json.dumps({"config": {"wan0": "eth0"}, "mappings": []}), "'mappings' must be an object"),
    (json.dumps({"config": {"wan0": "eth0"}, "mappings": {"10.0.0.1": "wan7"}}), "unknown wan 'wan7'"),
    (json.dumps({"config": {"wan0": "eth0"}, "mappings": {"host": "wan0"}}), "not an IP address"),
    (b"\xff\xfe{", "invalid JSON"),
])
def test_parse_mapping_rejects_wrong_shapes(body, reason):
    with pytest.raises(lpd.MappingError, match=reason.replace("(", r"\(").replace("[", r"\[")):
        lpd.parse_mapping(body)


class Service:
    """A real HTTP mapping service on loopback whose answer the test sets."""

    def __init__(self):
        self.body, self.status, self.delay = b"", 200, 0.0
        svc = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                time.sleep(svc.delay)
                self.send_response(svc.status)
                self.send_header("Content-Length", str(len(svc.body)))
                self.end_headers()
                self.wfile.write(svc.body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/status"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service():
    s = Service()
    yield s
    s.close()


def test_poller_keeps_the_last_good_mapping_and_logs_state_changes(service):
    lines = []
    m = lpd.NicMapping(service.url, "cap0", lambda prio, msg: lines.append(msg))
    addr = ipaddress.ip_address("10.40.0.3")
    other = ipaddress.ip_address("10.40.0.9")
    assert m.labeller()(addr) == "cap0"               # before the first good answer
    service.body = json.dumps(GOOD).encode()
    assert m.fetch_once()
    label = m.labeller()
    assert (label(addr), label(other)) == ("eth1", "eth0")
    assert m.last_success > time.time() - 5

    for body, status, delay in ((b"garbage", 200, 0), (b"{}", 500, 0), (b"{}", 200, 2.5)):
        service.body, service.status, service.delay = body, status, delay
        assert not m.fetch_once()
        assert m.labeller()(addr) == "eth1"
    assert m.errors == 3
    assert not m.fetch_once()                          # the same failure again: no new line
    assert len(lines) == 3, lines
    service.close()
    assert not m.fetch_once()                          # refused
    assert m.errors == 5 and m.labeller()(addr) == "eth1"
    assert "Connection refused" in lines[-1] and lines[-1].count("\n") == 0


def test_poller_recovers_and_follows_changes(service):
    lines = []
    m = lpd.NicMapping(service.url, "cap0", lambda prio, msg: lines.append(msg))
    service.body = b"not json"
    assert not m.fetch_once()
    service.body = json.dumps(GOOD).encode()
    assert m.fetch_once()
    assert "answering again" in lines[-1]
    changed = {"config": {"wan0": "ppp0", "wan1": "eth1"}, "mappings": {}}
    service.body = json.dumps(changed).encode()
    assert m.fetch_once()
    assert m.labeller()(ipaddress.ip_address("10.40.0.3")) == "ppp0"


def test_a_service_that_does_not_speak_http_is_an_error_not_the_end():
    """http.client raises BadStatusLine (not an OSError) for a non-HTTP answer; the
    poller must count it and keep going."""
    import socket as so
    srv = so.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            with c:
                c.recv(1024)
                c.sendall(b"HELLO I AM NOT HTTP\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    lines = []
    m = lpd.NicMapping(f"http://127.0.0.1:{srv.getsockname()[1]}/status", "cap0",
                       lambda prio, msg: lines.append(msg), period=0.05)
    t = threading.Thread(target=m.run, args=(stop,), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while m.errors < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert t.is_alive() and m.errors >= 3, (m.errors, lines)
    assert len(lines) == 1 and "keeping the last good mapping" in lines[0]
    stop.set()
    t.join(2)
    srv.close()


# --- answers that never end, answers nested too deeply ------------------------------

SLACK = 1.0               # seconds beyond MAPPING_TIMEOUT a fetch may take to give up
DRIP_PERIOD = 0.2         # seconds between the bytes a dripping server sends
DRIP_SECONDS = 10.0       # it gives up after this, so that no fetch can hang the suite


class Dripper:
    """A TCP server on loopback that reads the request, then sends its answer one byte
    per DRIP_PERIOD: every single read succeeds well within a per-read timeout."""

    def __init__(self, answer):
        self.answer, self.stop = answer, threading.Event()
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.srv.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.srv.getsockname()[1]}/status"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except OSError:
                continue
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn):
        with conn:
            conn.settimeout(DRIP_SECONDS)
            try:
                conn.recv(65536)
                end = time.monotonic() + DRIP_SECONDS
                for i in range(len(self.answer)):
                    if self.stop.is_set() or time.monotonic() > end:
                        return
                    conn.sendall(self.answer[i:i + 1])
                    time.sleep(DRIP_PERIOD)
            except OSError:
                pass                       # the client gave up: what the test wants

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.srv.close()


BODY = json.dumps(GOOD).encode() * 40     # long enough to outlast DRIP_SECONDS
DRIPS = {
    "status line": b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n{}",
    "body": b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY),
}


@pytest.mark.parametrize("where", sorted(DRIPS))
def test_a_dripping_server_fails_the_fetch_at_the_deadline(where):
    server = Dripper(DRIPS[where])
    lines = []
    try:
        m = lpd.NicMapping(server.url, "cap0", lambda prio, msg: lines.append(msg))
        for n in (1, 2):
            t0 = time.monotonic()
            assert not m.fetch_once()
            took = time.monotonic() - t0
            assert took < lpd.MAPPING_TIMEOUT + SLACK, f"fetch {n} took {took:.1f} s"
            assert m.errors == n
    finally:
        server.close()
    assert len(lines) == 1, lines                            # one line per state change
    assert f"no complete answer within {lpd.MAPPING_TIMEOUT:g} s" in lines[0], lines


def test_deeply_nested_json_is_a_mapping_error():
    with pytest.raises(lpd.MappingError, match="^invalid JSON: nested too deeply$"):
        lpd.parse_mapping("[" * 100000)
    with pytest.raises(lpd.MappingError, match="^invalid JSON: nested too deeply$"):
        lpd.parse_mapping('{"config": ' * 100000)


def test_a_deeply_nested_answer_is_counted_and_logged_once(service):
    lines = []
    m = lpd.NicMapping(service.url, "cap0", lambda prio, msg: lines.append(msg))
    service.body = json.dumps(GOOD).encode()
    assert m.fetch_once()
    service.body = b"[" * 100000
    for n in (1, 2, 3):
        assert not m.fetch_once()
        assert m.errors == n
    assert m.labeller()(ipaddress.ip_address("10.40.0.3")) == "eth1"      # the last good one
    assert lines == [f"mapping: {service.url}: invalid JSON: nested too deeply; "
                     "keeping the last good mapping"], lines


def test_the_default_service_is_asked_quietly_until_it_answers(service):
    """No --mapping-url: localpacketdump's default address is polled, but a first run on a
    host without that service neither warns nor counts errors (nor fires the
    LpdMappingFailing alert); once it has answered it is the service, failures and all."""
    lines = []
    m = lpd.NicMapping(service.url, "cap0", lambda prio, msg: lines.append(msg), configured=False)
    service.body = b"garbage"
    assert not m.fetch_once()
    service.status = 404
    assert not m.fetch_once()
    assert (m.errors, lines) == (0, [])
    service.body, service.status = json.dumps(GOOD).encode(), 200
    assert m.fetch_once()
    assert len(lines) == 1 and "answered: NIC labels follow it" in lines[0], lines
    service.body = b"garbage"
    assert not m.fetch_once()
    assert m.errors == 1 and "keeping the last good mapping" in lines[-1]
    assert m.labeller()(ipaddress.ip_address("10.40.0.3")) == "eth1"


def test_only_an_explicit_mapping_url_is_configured():
    assert not lpd.parse_args([]).mapping_configured
    opts = lpd.parse_args(["--mapping-url", lpd.DEFAULT_MAPPING_URL])
    assert opts.mapping_configured and opts.mapping_url == lpd.DEFAULT_MAPPING_URL
    assert lpd.parse_args(["--mapping-url", "none"]).mapping_url is None
