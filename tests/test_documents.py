"""The /api documents' bound (issue 24): without ?top=N an answer holds API_ROWS_DEFAULT
rows, with it never more than API_ROWS_MAX, and says how many there were and whether some
were left out; --output json stays whole. Snapshots are built directly (and one from a
real Connections stage), the answers are api_answer's, as the metrics server sends them."""
import json

import pytest

import lpd
from packets import ETH_IP, PROTO_UDP, ether, ipv4, udp

pytestmark = pytest.mark.unit

A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
HOW = lpd.Presentation("eth0", lambda a: "eth0", lambda k: ("Unknown",) * 4, 0)
MORE = 7                    # rows beyond a bound: enough to be cut, few to build


def _io_rows(n, extra):
    """n address or remote rows, the i-th with i + 1 bytes each way: a known order."""
    return tuple(((4, 0x0A000000 + i), i + 1, 1, i + 1, 1) + extra for i in range(n))


def snapshots(n):
    """A publication with n rows in every stage that has rows."""
    conns = lpd.Connections(conn_max=n + 1)
    for i in range(n):
        f = ether(A, B, ETH_IP, ipv4("10.0.0.1", "10.0.0.2", PROTO_UDP,
                                     udp(1024 + i % 60000, 53 + i // 60000, b"q" * (i % 100))))
        conns.packet(f, 100.0 + i * 1e-6, len(f), 1, lpd.ETH_HLEN)
    recent = (("10.0.0.2:80", tuple({"n": i} for i in range(n))), ("10.0.0.3:80", ({"n": -1},)))
    servers = tuple((f"10.0.{i // 256}.{i % 256}:80", i + 1, 0, (0.001,), (("/", i + 1),))
                    for i in range(n))
    return {"time": 1.0,
            "addresses": lpd.AddressSnapshot(_io_rows(n, (0.0, 0.0))),
            "remotes": lpd.RemoteSnapshot(_io_rows(n, (0,))),
            "rules": lpd.RuleSnapshot(tuple((f"r{i}", i, 1) for i in range(n))),
            "connections": conns.snapshot(),
            "http": lpd.HttpSnapshot(recent=recent, servers=servers)}


# kind -> the document's rows
ROWS = {"addresses": lambda d: d["addresses"], "remotes": lambda d: d["remotes"],
        "rules": lambda d: d["rules"], "connections": lambda d: d["connections"],
        "http": lambda d: list(d["servers"]),
        "requests": lambda d: [r for recs in d["servers"].values() for r in recs]}


def answer(published, kind, query=""):
    status, body = lpd.api_answer(f"/api/{kind}", query, published, lambda: HOW)
    assert status == 200, body
    return json.loads(body)


@pytest.fixture(scope="module")
def many():
    """More rows than the hard maximum in every stage."""
    published = lpd.Published()
    published.publish(snapshots(lpd.API_ROWS_MAX + MORE))
    return published


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_a_document_without_top_is_cut_to_the_default_and_says_so(many, kind):
    n = lpd.API_ROWS_MAX + MORE + (1 if kind == "requests" else 0)
    doc = answer(many, kind)
    assert len(ROWS[kind](doc)) == lpd.API_ROWS_DEFAULT
    assert (doc["total"], doc["truncated"]) == (n, True)
    if kind == "addresses":                      # the biggest are the ones kept, in order
        assert [a["tx_bytes"] for a in doc["addresses"][:2]] == [n, n - 1]
    if kind == "connections":
        sizes = [c["orig_wire_bytes"] + c["resp_wire_bytes"] for c in doc["connections"]]
        every = sorted((r[12] + r[13] for r in many.latest()["connections"].rows), reverse=True)
        assert sizes == every[:lpd.API_ROWS_DEFAULT]


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_top_is_obeyed_up_to_the_hard_maximum(many, kind):
    top = 3 if kind != "requests" else lpd.API_ROWS_MAX   # requests: `top` is per server
    assert len(ROWS[kind](answer(many, kind, f"top={top}"))) == \
        (top if kind != "requests" else lpd.API_ROWS_MAX)
    huge = answer(many, kind, "top=999999999")
    assert len(ROWS[kind](huge)) == lpd.API_ROWS_MAX and huge["truncated"]


def test_requests_limit_is_per_server_and_the_document_still_bounded(many):
    doc = answer(many, "requests", "limit=2")
    assert doc["servers"] == {"10.0.0.2:80": [{"n": 0}, {"n": 1}], "10.0.0.3:80": [{"n": -1}]}
    assert doc["truncated"]
    one = answer(many, "requests", "server=10.0.0.3%3A80")
    assert (one["servers"], one["total"], one["truncated"]) == ({"10.0.0.3:80": [{"n": -1}]}, 1, False)


def test_a_small_document_is_whole_and_says_so():
    published = lpd.Published()
    published.publish(snapshots(MORE))
    for kind, rows in ROWS.items():
        doc = answer(published, kind)
        n = MORE + (1 if kind == "requests" else 0)
        assert (len(rows(doc)), doc["total"], doc["truncated"]) == (n, n, False), kind


def test_output_json_stays_whole():
    """-r's --output json is the answer a replay is run for: never cut."""
    n = lpd.API_ROWS_DEFAULT + MORE
    docs = lpd.all_documents(snapshots(n), HOW)
    for kind in ("addresses", "remotes", "rules", "connections", "http"):
        assert len(ROWS[kind](docs[kind])) == n and not docs[kind]["truncated"], kind
