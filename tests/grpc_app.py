#!/usr/bin/python3
"""A gRPC server and scripted client for lpd's live gRPC test (tests/test_grpc_live.py).

Standalone: runs under Debian's /usr/bin/python3 with python3-grpcio (1.51) and nothing
else, no protoc. Messages are raw bytes (identity serializers, generic handlers).

Service `lpd.test.Echo`:
    Unary         echo the request
    ServerStream  request b"N" or b"N:SIZE": N replies of SIZE bytes (default 16)
    BidiStream    echo each request message, in order
    NotFound      abort NOT_FOUND with NOT_FOUND_MESSAGE
    Unavailable   abort UNAVAILABLE with UNAVAILABLE_MESSAGE
    Slow          sleep up to SLOW_SECONDS (until the call is cancelled), then echo

    grpc_app.py serve [--port 50051]
        insecure (h2c) on [::]:PORT and 0.0.0.0:PORT, until SIGTERM/SIGINT.
    grpc_app.py client TARGET [--script NAME] [--hold DIR] [--out FILE]
        one channel to TARGET (e.g. 172.29.0.2:50051); runs the script's calls in order
        and prints (and with --out writes) a JSON summary:
            {"phases": [[call, ...], ...], "calls": [call, ...], ...}
        call = {"method": "lpd.test.Echo/Unary", "status": "OK", "code": 0,
                "details": str|null, "sent": n, "received": n,
                "sent_bytes": [len, ...], "received_bytes": [len, ...]}
        (plus "target", "local_ip": this end's address toward the target, and "started",
        "ended": the run's start and end, time.time())
        --hold DIR: after phase 1, write DIR/held, wait (at most HOLD_TIMEOUT s) for DIR/go
        to appear, then run phase 2 on the same channel (the same HTTP/2 connection).
Every wait is bounded; a failure is an exit status other than 0 with a message on stderr.
"""
import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

import grpc

SERVICE = "lpd.test.Echo"
PORT = 50051
NOT_FOUND_MESSAGE = "item 42: not found (100% sure, d\u00e9j\u00e0 vu)"
UNAVAILABLE_MESSAGE = "try again later"
SLOW_SECONDS = 3.0                 # Slow sleeps at most this long
SLOW_DEADLINE = 0.3                # the client's deadline on Slow
BIG = 100_000                      # bytes of a large message (several frames and segments)
CALL_TIMEOUT = 10.0                # every other call's deadline
HOLD_TIMEOUT = 60.0                # --hold: longest wait for DIR/go
READY_TIMEOUT = 10.0               # the channel must be ready within this
MAX_MESSAGE = 4 << 20


def payload(n, seed=0):
    """n deterministic bytes (not all one value: nothing compresses them away)."""
    block = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (block * (n // 256 + 1))[:n]


# --- server -------------------------------------------------------------------------------

def _unary(request, context):
    return request


def _server_stream(request, context):
    text = request.decode()
    n, _, size = text.partition(":")
    for i in range(int(n)):
        yield payload(int(size or 16), i)


def _bidi(request_iterator, context):
    for msg in request_iterator:
        yield msg


def _not_found(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, NOT_FOUND_MESSAGE)


def _unavailable(request, context):
    context.abort(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE)


def _slow(request, context):
    done = threading.Event()
    context.add_callback(done.set)          # called when the RPC ends (or is cancelled)
    done.wait(SLOW_SECONDS)
    return request


def _ident(b):
    return b


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(_unary, _ident, _ident),
    "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream, _ident, _ident),
    "BidiStream": grpc.stream_stream_rpc_method_handler(_bidi, _ident, _ident),
    "NotFound": grpc.unary_unary_rpc_method_handler(_not_found, _ident, _ident),
    "Unavailable": grpc.unary_unary_rpc_method_handler(_unavailable, _ident, _ident),
    "Slow": grpc.unary_unary_rpc_method_handler(_slow, _ident, _ident),
}


def serve(port):
    from concurrent import futures
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                  ("grpc.max_send_message_length", MAX_MESSAGE)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, HANDLERS),))
    bound = server.add_insecure_port(f"[::]:{port}")
    if bound != port:
        print(f"grpc_app: cannot bind port {port}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"grpc_app: serving {SERVICE} on port {port}", flush=True)
    while not stop.wait(1.0):
        pass
    server.stop(1).wait(5)
    return 0


# --- client -------------------------------------------------------------------------------

def _summary(method, code, details, sent, received):
    return {"method": f"{SERVICE}/{method}", "status": code.name, "code": code.value[0],
            "details": details, "sent": len(sent), "received": len(received),
            "sent_bytes": [len(m) for m in sent], "received_bytes": [len(m) for m in received]}


class Caller:
    def __init__(self, channel):
        self.channel = channel

    def _stub(self, kind, method):
        make = getattr(self.channel, kind)
        return make(f"/{SERVICE}/{method}", request_serializer=_ident,
                    response_deserializer=_ident)

    def unary(self, method, msg, timeout=CALL_TIMEOUT):
        got = []
        try:
            got.append(self._stub("unary_unary", method)(msg, timeout=timeout))
            code, details = grpc.StatusCode.OK, None
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        return _summary(method, code, details, [msg], got)

    def server_stream(self, method, msg, timeout=CALL_TIMEOUT):
        got = []
        call = self._stub("unary_stream", method)(msg, timeout=timeout)
        try:
            for reply in call:
                got.append(reply)
            code, details = grpc.StatusCode.OK, None
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        return _summary(method, code, details, [msg], got)

    def bidi(self, method, msgs, timeout=CALL_TIMEOUT):
        """Each message sent after the previous one's echo came back (a real ping-pong)."""
        got, sent = [], []
        lock = threading.Condition()

        def requests():
            for m in msgs:
                with lock:
                    if not lock.wait_for(lambda: len(got) == len(sent), CALL_TIMEOUT):
                        return
                    sent.append(m)
                yield m

        call = self._stub("stream_stream", method)(requests(), timeout=timeout)
        try:
            for reply in call:
                with lock:
                    got.append(reply)
                    lock.notify_all()
            code, details = grpc.StatusCode.OK, None
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        return _summary(method, code, details, sent, got)


def script_calls(name):
    """[(phase, kind, method, argument, timeout)] of a script."""
    s = []
    if name == "full":
        s += [(1, "unary", "Unary", b"hello", CALL_TIMEOUT),
              (1, "unary", "Unary", payload(BIG, 1), CALL_TIMEOUT),       # 100 KB each way
              (1, "server_stream", "ServerStream", b"5:1000", CALL_TIMEOUT),
              (1, "server_stream", "ServerStream", b"3:%d" % BIG, CALL_TIMEOUT),
              (1, "bidi", "BidiStream", [payload(10, i) for i in range(4)], CALL_TIMEOUT),
              (1, "bidi", "BidiStream", [payload(BIG, 9), b"tail"], CALL_TIMEOUT),
              (1, "unary", "NotFound", b"42", CALL_TIMEOUT),
              (1, "unary", "NotFound", b"43", CALL_TIMEOUT),
              (1, "unary", "Unavailable", b"", CALL_TIMEOUT),
              (1, "unary", "Slow", b"zzz", SLOW_DEADLINE),
              (1, "unary", "Unary", b"bye", CALL_TIMEOUT)]
    elif name == "hold":
        # phase 1: before lpd; phase 2: after. BidiStream and NotFound only in phase 2 (new
        # :path values, sent literally); Unary in both (indexed from the dynamic table).
        s += [(1, "unary", "Unary", b"before-1", CALL_TIMEOUT),
              (1, "unary", "Unary", b"before-2", CALL_TIMEOUT),
              (1, "server_stream", "ServerStream", b"2:100", CALL_TIMEOUT),
              (2, "unary", "Unary", b"after-1", CALL_TIMEOUT),
              (2, "bidi", "BidiStream", [b"a", b"bb", b"ccc"], CALL_TIMEOUT),
              (2, "unary", "NotFound", b"7", CALL_TIMEOUT),
              (2, "server_stream", "ServerStream", b"3:50", CALL_TIMEOUT),
              (2, "unary", "Unary", b"after-2", CALL_TIMEOUT)]
    else:
        raise SystemExit(f"grpc_app: no script {name!r}")
    return s


def _wait_file(path, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def local_ip(target):
    """This end's address toward `target` (HOST:PORT, [V6]:PORT): a UDP socket's connect()
    picks the route and sends nothing."""
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect((host, int(port)))
        return s.getsockname()[0]


def client(target, script, hold, out):
    started = time.time()
    channel = grpc.insecure_channel(target, options=[
        ("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE)])
    try:
        grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT)
    except grpc.FutureTimeoutError:
        print(f"grpc_app: {target} not ready within {READY_TIMEOUT}s", file=sys.stderr)
        return 2
    caller = Caller(channel)
    phases = {}
    for phase, kind, method, arg, timeout in script_calls(script):
        if phase == 2 and 2 not in phases and hold:
            open(os.path.join(hold, "held"), "w").close()
            if not _wait_file(os.path.join(hold, "go"), HOLD_TIMEOUT):
                print(f"grpc_app: no {hold}/go within {HOLD_TIMEOUT}s", file=sys.stderr)
                return 3
        phases.setdefault(phase, []).append(getattr(caller, kind)(method, arg, timeout))
    channel.close()
    doc = {"target": target, "local_ip": local_ip(target), "started": started,
           "ended": time.time(),
           "phases": [phases[p] for p in sorted(phases)],
           "calls": [c for p in sorted(phases) for c in phases[p]]}
    text = json.dumps(doc)
    if out:
        with open(out + ".tmp", "w") as f:
            f.write(text + "\n")
        os.rename(out + ".tmp", out)
    print(text, flush=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=PORT)
    c = sub.add_parser("client")
    c.add_argument("target")
    c.add_argument("--script", default="full")
    c.add_argument("--hold", help="directory: write held, wait for go between phases")
    c.add_argument("--out", help="also write the JSON summary here")
    a = ap.parse_args(argv)
    if a.mode == "serve":
        return serve(a.port)
    return client(a.target, a.script, a.hold, a.out)


if __name__ == "__main__":
    sys.exit(main())
