"""HTTP/2 conversations for the HTTP stage without sockets: the `h2` library (python3-h2)
plays client and server, its bytes go through TCP segments built by packets.py, and the
stage (lpd.HttpRequests) reads the frames as it would from a ring."""
import h2.config
import h2.connection
import h2.events

import lpd
from packets import ETH_IP, PROTO_TCP, ether, ipv4, tcp

CLIENT, SERVER = ("10.0.0.1", 40000), ("10.0.0.2", 8080)
SYN, ACK, PSH, FIN, RST = 0x02, 0x10, 0x08, 0x01, 0x04
MSS = 1400
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


class Wire:
    """One TCP connection between CLIENT and SERVER fed to a stage, segment by segment:
    `send(to_server, data)` cuts data at MSS; the clock moves 1 ms a segment."""

    def __init__(self, stage=None, handshake=True, port=SERVER[1], t=100.0, client_port=CLIENT[1]):
        self.records = []
        self.stage = stage or lpd.HttpRequests((port,), self.records.append)
        self.server, self.client = (SERVER[0], port), (CLIENT[0], client_port)
        self.seq = {True: 1000, False: 5000}
        self.t = t
        self.frames = []                    # (time, frame): what a pcap of it holds
        self.muted = False                  # bytes sent now are not seen (before capture)
        if handshake:
            self.segment(True, b"", SYN)
            self.seq[True] += 1
            self.segment(False, b"", SYN | ACK)
            self.seq[False] += 1

    def segment(self, to_server, payload, flags=ACK | PSH):
        src, dst = (self.client, self.server) if to_server else (self.server, self.client)
        seg = tcp(src[1], dst[1], flags, self.seq[to_server] % 2**32,
                  self.seq[not to_server] % 2**32, payload=payload)
        frame = ether(MAC_A, MAC_B, ETH_IP, ipv4(src[0], dst[0], PROTO_TCP, seg))
        self.t += 0.001
        self.frames.append((self.t, frame))
        self.stage.packet(frame, self.t)

    def send(self, to_server, data, mss=MSS):
        if self.muted:
            self.skip(to_server, len(data))
            return
        for at in range(0, len(data), mss):
            self.segment(to_server, data[at:at + mss])
            self.seq[to_server] += len(data[at:at + mss])

    def skip(self, to_server, n):
        """n bytes the capture never shows."""
        self.seq[to_server] += n

    def close(self):
        for to_server in (True, False):
            self.segment(to_server, b"", FIN | ACK)
            self.seq[to_server] += 1


class Peers:
    """An h2 client and server talking; what each sends is handed to a Wire."""

    def __init__(self, wire, settings=None, mss=MSS):
        self.wire, self.mss = wire, mss
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None))
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        if settings:
            self.client.local_settings.update(settings)
        self.client.initiate_connection()
        self.flush()
        self.server.initiate_connection()
        self.flush()

    def flush(self, mss=None):
        """Move what both sides have to send, both ways, until they are quiet."""
        mss = mss or self.mss
        for _ in range(10):
            c = self.client.data_to_send()
            if c:
                self.wire.send(True, c, mss)
                self._received(self.server, c)
            s = self.server.data_to_send()
            if s:
                self.wire.send(False, s, mss)
                self._received(self.client, s)
            if not c and not s:
                return

    @staticmethod
    def _received(conn, data):
        """Feed conn; hand flow-control credit back at once (windows never close)."""
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def request(self, headers, body=b"", end=True):
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=not body and end)
        self._body(self.client, sid, body, end)
        self.flush()
        return sid

    def respond(self, sid, headers, body=b"", trailers=None):
        self.server.send_headers(sid, headers, end_stream=not body and not trailers)
        self._body(self.server, sid, body, not trailers)
        if trailers:
            self.server.send_headers(sid, trailers, end_stream=True)
        self.flush()

    def _body(self, conn, sid, body, end):
        """DATA frames of at most the peer's frame size, flushed one by one (the
        windows reopen as the peer reads them)."""
        step = conn.max_outbound_frame_size
        for at in range(0, len(body), step):
            conn.send_data(sid, body[at:at + step], end_stream=end and at + step >= len(body))
            self.flush()


def grpc_message(payload):
    return b"\0" + len(payload).to_bytes(4, "big") + payload
