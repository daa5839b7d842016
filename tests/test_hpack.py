"""HPACK (issue 28, its first part: the header decoder the HTTP/2 stage will use): RFC 7541's
Appendix C examples byte for byte, Python's hpack package (Debian's python3-hpack) as the
oracle on generated header lists and table size changes, capture joined mid-connection
(what lpd resolves is exactly the oracle's, what it calls unknown is exactly what refers
to entries inserted before it began), and hostile blocks (HpackError with its reason,
never another exception, in bounded time)."""
import time

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lpd

pytestmark = pytest.mark.unit

UNKNOWN = lpd.HPACK_UNKNOWN
HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


def hx(text):
    return bytes.fromhex("".join(text.split()))


def integer(value, prefix, first=0):
    """An HPACK integer (RFC 7541 5.1), written here to make hostile blocks."""
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes((first | value,))
    out, value = [first | mask], value - mask
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + [value])


def reason(block, decoder=None):
    decoder = decoder or lpd.HpackDecoder()
    with pytest.raises(lpd.HpackError) as e:
        decoder.decode(block)
    assert e.value.reason in lpd.HPACK_ERRORS
    return e.value.reason


# -- RFC 7541 Appendix C ------------------------------------------------------------------

def test_c1_integers():
    assert lpd.hpack_integer(b"\x0a", 0, 5) == (10, 1)                  # C.1.1
    assert lpd.hpack_integer(b"\x1f\x9a\x0a", 0, 5) == (1337, 3)        # C.1.2
    assert lpd.hpack_integer(b"\x2a", 0, 8) == (42, 1)                  # C.1.3
    assert integer(1337, 5) == b"\x1f\x9a\x0a"


@pytest.mark.parametrize("block, fields, table", [
    ("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",       # C.2.1
     [("custom-key", "custom-header")], [("custom-key", "custom-header")]),
    ("040c 2f73 616d 706c 652f 7061 7468", [(":path", "/sample/path")], []),   # C.2.2
    ("1008 7061 7373 776f 7264 0673 6563 7265 74", [("password", "secret")], []),  # C.2.3
    ("82", [(":method", "GET")], []),                                         # C.2.4
])
def test_c2_representations(block, fields, table):
    d = lpd.HpackDecoder()
    assert d.decode(hx(block)) == fields
    assert d.table == table
    assert d.size == sum(len(n) + len(v) + 32 for n, v in table)


REQUESTS = [
    [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")],
    [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com"),
     ("cache-control", "no-cache")],
    [(":method", "GET"), (":scheme", "https"), (":path", "/index.html"),
     (":authority", "www.example.com"), ("custom-key", "custom-value")],
]
REQUEST_TABLES = [
    ([(":authority", "www.example.com")], 57),
    ([("cache-control", "no-cache"), (":authority", "www.example.com")], 110),
    ([("custom-key", "custom-value"), ("cache-control", "no-cache"),
      (":authority", "www.example.com")], 164),
]
C3 = ["8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
      "8286 84be 5808 6e6f 2d63 6163 6865",
      "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"]
C4 = ["8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
      "8286 84be 5886 a8eb 1064 9cbf",
      "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"]

DATE1, DATE2 = "Mon, 21 Oct 2013 20:13:21 GMT", "Mon, 21 Oct 2013 20:13:22 GMT"
LOCATION = "https://www.example.com"
COOKIE = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
RESPONSES = [
    [(":status", "302"), ("cache-control", "private"), ("date", DATE1), ("location", LOCATION)],
    [(":status", "307"), ("cache-control", "private"), ("date", DATE1), ("location", LOCATION)],
    [(":status", "200"), ("cache-control", "private"), ("date", DATE2), ("location", LOCATION),
     ("content-encoding", "gzip"), ("set-cookie", COOKIE)],
]
RESPONSE_TABLES = [
    ([("location", LOCATION), ("date", DATE1), ("cache-control", "private"), (":status", "302")],
     222),
    ([(":status", "307"), ("location", LOCATION), ("date", DATE1), ("cache-control", "private")],
     222),
    ([("set-cookie", COOKIE), ("content-encoding", "gzip"), ("date", DATE2)], 215),
]
C5 = ["4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133"
      "2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70"
      "6c65 2e63 6f6d",
      "4803 3330 37c1 c0bf",
      "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d"
      "54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049"
      "5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e"
      "3d31"]
C6 = ["4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6"
      "2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
      "4883 640e ffc1 c0bf",
      "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab"
      "77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f"
      "9587 3160 65c0 03ed 4ee5 b106 3d50 07"]


@pytest.mark.parametrize("blocks, lists, tables, table_size", [
    (C3, REQUESTS, REQUEST_TABLES, 4096), (C4, REQUESTS, REQUEST_TABLES, 4096),
    (C5, RESPONSES, RESPONSE_TABLES, 256), (C6, RESPONSES, RESPONSE_TABLES, 256),
], ids=["C.3", "C.4", "C.5", "C.6"])
def test_appendix_c_sequences(blocks, lists, tables, table_size):
    d = lpd.HpackDecoder(max_table_size=table_size)
    for block, fields, (table, size) in zip(blocks, lists, tables):
        assert d.decode(hx(block)) == fields
        assert d.table == table
        assert d.size == size
        assert d.complete and d.unknown_fields == 0


# -- hpack as the oracle -------------------------------------------------------------------

STATIC_NAMES = sorted({n for n, _ in lpd.HPACK_STATIC_TABLE})
names = st.one_of(st.sampled_from(STATIC_NAMES),
                  st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12),
                  st.sampled_from(["grpc-status", "grpc-message", "te", "x-b3-traceid"]))
values = st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"GET", b"/", b"200",
                                                             b"application/grpc", b"trailers"]))
fields_ = st.tuples(names.map(str.encode), values, st.booleans())      # (name, value, sensitive)
# A block: its fields, a table size change before it (or none), Huffman or not.
blocks_ = st.tuples(st.lists(st.one_of(fields_, fields_.map(lambda f: (f[0], f[1], False))),
                             max_size=12),
                    st.one_of(st.none(), st.integers(0, 4096), st.sampled_from([0, 64, 256, 4096])),
                    st.booleans())


def encode(blocks):
    """The wire blocks hpack's Encoder writes for them, and the oracle's decoding."""
    encoder, oracle, out = hpack.Encoder(), hpack.Decoder(), []
    for fields, table_size, huffman in blocks:
        if table_size is not None:
            encoder.header_table_size = table_size
        wire = encoder.encode([(n, v, s) for n, v, s in fields], huffman=huffman)
        decoded = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in oracle.decode(wire, raw=True)]
        out.append((wire, decoded))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(blocks_, min_size=1, max_size=10))
def test_oracle_sequences(blocks):
    d = lpd.HpackDecoder()
    for wire, decoded in encode(blocks):
        assert d.decode(wire) == decoded
        assert d.complete and d.unknown_fields == 0


def test_oracle_evicts_across_a_long_connection():
    # Many distinct entries through a 256-byte table: every eviction path, then a size
    # update down to 0 and back up.
    blocks = [([(b"x-key-%d" % i, b"v" * (i % 50), False)] * 2, None, i % 2 == 0) for i in range(300)]
    blocks[100] = (blocks[100][0], 0, True)
    blocks[101] = (blocks[101][0], 4096, False)
    blocks[200] = (blocks[200][0], 100, False)
    d = lpd.HpackDecoder()
    for wire, decoded in encode(blocks):
        assert d.decode(wire) == decoded
    assert d.size <= 100


# -- Huffman -------------------------------------------------------------------------------

def test_huffman_table_is_hpacks_and_its_intervals_tile_30_bits():
    # The bisect decoder's premise: each code, left-justified, begins an interval of
    # 2^(30 - length) values, and the intervals follow each other from 0 to 2^30.
    assert lpd.HPACK_HUFFMAN_CODES == tuple(zip(REQUEST_CODES, REQUEST_CODES_LENGTH))
    end = 0
    for start, length in zip(lpd.HPACK_HUFFMAN_STARTS, lpd.HPACK_HUFFMAN_LENGTHS):
        assert start == end
        end = start + (1 << (lpd.HPACK_HUFFMAN_BITS - length))
    assert end == 1 << lpd.HPACK_HUFFMAN_BITS
    assert lpd.HPACK_HUFFMAN_SYMBOLS[-1] == lpd.HPACK_HUFFMAN_EOS      # all 1s: the last
    # The first-byte lookup: every code of 8 bits or fewer, under each byte it begins.
    for byte, entry in enumerate(lpd.HPACK_HUFFMAN_SHORT):
        if entry:
            code, length = lpd.HPACK_HUFFMAN_CODES[entry & 0xFF]
            assert length == entry >> 8 and code == byte >> (8 - length)
    assert sum(1 for e in lpd.HPACK_HUFFMAN_SHORT if e) == \
        sum(1 << (8 - n) for _, n in lpd.HPACK_HUFFMAN_CODES if n <= 8)  # each under 2^(8-n) bytes


def test_huffman_every_byte_round_trips():
    for b in range(256):
        one = bytes((b,))
        assert lpd.hpack_huffman(HUFFMAN.encode(one)) == one, b
        assert lpd.hpack_huffman(HUFFMAN.encode(one * 7)) == one * 7, b
    every = bytes(range(256)) * 3
    assert lpd.hpack_huffman(HUFFMAN.encode(every)) == every


@given(st.binary(max_size=300))
def test_huffman_random_round_trips(data):
    assert lpd.hpack_huffman(HUFFMAN.encode(data)) == data


@pytest.mark.parametrize("data, why", [
    (b"\xff", "8 bits of padding"),
    (b"\x1f\xff", "'a' then 11 bits of padding"),
    (b"\xff\xff\xff\xff", "EOS (30 ones) decoded"),
    (b"\xff\xff\xff\xfc", "EOS's code but for its last bits"),
    (b"\x18", "'a' (00011) then padding 000, not EOS's first bits"),
    (b"\x1e", "'a' then padding 110"),
    (b"\x00", "'0' (00000) then padding 000"),
])
def test_huffman_bad_padding_and_eos(data, why):
    with pytest.raises(lpd.HpackError) as e:
        lpd.hpack_huffman(data)
    assert e.value.reason == "huffman", why


def test_huffman_good_padding():
    assert lpd.hpack_huffman(b"\x1f") == b"a"          # 00011 + 111
    assert lpd.hpack_huffman(b"") == b""
    assert lpd.hpack_huffman(b"\x07") == b"0"           # 00000 + 111


@given(st.binary(max_size=64))
def test_huffman_agrees_with_hpack_on_any_bytes(data):
    try:
        want = decode_huffman(data)
    except hpack.HPACKDecodingError:
        want = None
    try:
        got = lpd.hpack_huffman(data)
    except lpd.HpackError as e:
        assert e.reason == "huffman"
        got = None
    # hpack accepts a padding of all 1s up to 7 bits as lpd does; it may also let EOS
    # pass where RFC 7541 5.2 says an error: lpd is the stricter of the two there.
    if got is not None:
        assert got == want


# -- capture joined mid-connection --------------------------------------------------------

class Provenance:
    """A decoder written here, for the tests only: it follows the same blocks as hpack and
    lpd, and tells for each field whether its name and value come from an entry inserted
    before capture began (forget() marks the table's entries so)."""

    def __init__(self):
        self.table, self.max = [], 4096       # [name, value, size, name_known, value_known]

    def forget(self):
        for e in self.table:
            e[3] = e[4] = False

    def _int(self, b, pos, prefix):
        mask = (1 << prefix) - 1
        v, pos = b[pos] & mask, pos + 1
        if v < mask:
            return v, pos
        shift = 0
        while True:
            v += (b[pos] & 0x7F) << shift
            shift, pos = shift + 7, pos + 1
            if not b[pos - 1] & 0x80:
                return v, pos

    def _str(self, b, pos):
        huff = b[pos] & 0x80
        n, pos = self._int(b, pos, 7)
        s = b[pos:pos + n]
        return (decode_huffman(s) if huff else s).decode("latin-1"), pos + n

    def _entry(self, i):
        if i <= len(lpd.HPACK_STATIC_TABLE):
            return list(lpd.HPACK_STATIC_TABLE[i - 1]) + [0, True, True]
        return self.table[i - 62]

    def _evict(self):
        while sum(e[2] for e in self.table) > self.max:
            self.table.pop()

    def decode(self, b):
        out, pos = [], 0
        while pos < len(b):
            c = b[pos]
            if c & 0x80:
                i, pos = self._int(b, pos, 7)
                e = self._entry(i)
                out.append((e[0], e[1], e[3], e[4]))
                continue
            if c & 0xE0 == 0x20:
                self.max, pos = self._int(b, pos, 5)
                self._evict()
                continue
            i, pos = self._int(b, pos, 6 if c & 0x40 else 4)
            if i:
                e = self._entry(i)
                name, name_known = e[0], e[3]
            else:
                (name, pos), name_known = self._str(b, pos), True
            value, pos = self._str(b, pos)
            out.append((name, value, name_known, True))
            if c & 0x40:
                size = len(name) + len(value) + 32
                if size > self.max:
                    self.table = []
                else:
                    self.table.insert(0, [name, value, size, name_known, True])
                    self._evict()
        return out


def run_mid_stream(blocks, k):
    """Encode all of blocks, start lpd at block k with mid_stream=True, and check every
    block from there: exact where it resolves, HPACK_UNKNOWN exactly where the field
    refers to an entry from before k. Returns lpd's decoder."""
    encoded = encode(blocks)
    ref = Provenance()
    for wire, _ in encoded[:k]:
        ref.decode(wire)
    ref.forget()
    d = lpd.HpackDecoder(mid_stream=True)
    unknown = 0
    for wire, decoded in encoded[k:]:
        was_complete = d.complete
        got = d.decode(wire)
        want = [(n if nk else UNKNOWN, v if vk else UNKNOWN) for n, v, nk, vk in ref.decode(wire)]
        assert got == want
        for (n, v), (on, ov) in zip(got, decoded):     # what lpd resolves is the oracle's
            assert n in (UNKNOWN, on) and v in (UNKNOWN, ov)
        unknown += sum(1 for n, v in got if n is UNKNOWN or v is UNKNOWN)
        if was_complete:    # the table turned over: no value is unknown any more (a name
            assert all(v is not UNKNOWN for _, v in got)    # taken from one before may be)
    assert d.unknown_fields == unknown
    return d


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(blocks_, min_size=1, max_size=10), st.data())
def test_mid_stream_resolves_exactly_what_can_be_known(blocks, data):
    k = data.draw(st.integers(0, len(blocks)))
    run_mid_stream(blocks, k)


def test_mid_stream_unknown_tail_then_turnover():
    # Before capture: three entries. After: the indexed references to them are unknown,
    # new entries exact; then enough new entries to fill 4096 bytes prove the old gone.
    before = [([(b"x-old-%d" % i, b"old", False) for i in range(3)], None, False),
              ([(b"x-old-%d" % i, b"old", False) for i in range(3)], None, False)]
    after = [([(b"x-old-1", b"old", False), (b"x-new", b"new", False)], None, True),
             ([(b"x-new", b"new", False), (b"x-old-2", b"old", False)], None, True)]
    fill = [([(b"x-fill-%d" % i, b"f" * 100, False)], None, True) for i in range(40)]
    tail = [([(b"x-fill-39", b"f" * 100, False), (b"x-new-2", b"2", False)], None, False)]
    d = run_mid_stream(before + after + fill + tail, len(before))
    assert d.complete and d.unknown_fields == 2


def test_mid_stream_size_update_to_zero_makes_the_table_known():
    d = lpd.HpackDecoder(mid_stream=True)
    assert not d.complete
    assert d.decode(b"\xbe\x82") == [(UNKNOWN, UNKNOWN), (":method", "GET")]
    assert d.unknown_fields == 1
    assert d.decode(integer(0, 5, 0x20) + integer(4096, 5, 0x20) + b"\x82") == [(":method", "GET")]
    assert d.complete
    assert reason(b"\xbe", d) == "index"        # nothing is left to refer to


def test_mid_stream_bounds_the_unknown_indexes():
    # 4096 bytes hold at most 128 entries of 32: an index past them is an error even
    # mid-connection.
    d = lpd.HpackDecoder(mid_stream=True)
    assert d.decode(integer(61 + 128, 7, 0x80)) == [(UNKNOWN, UNKNOWN)]
    assert reason(integer(61 + 129, 7, 0x80), lpd.HpackDecoder(mid_stream=True)) == "index"


def test_mid_stream_unknown_name_is_inserted_with_a_known_value():
    d = lpd.HpackDecoder(mid_stream=True)
    # Literal with incremental indexing, name from index 62 (before capture), value "v".
    assert d.decode(integer(62, 6, 0x40) + b"\x01v") == [(UNKNOWN, "v")]
    assert d.table == [(UNKNOWN, "v")]
    assert d.decode(b"\xbe\xbf") == [(UNKNOWN, "v"), (UNKNOWN, UNKNOWN)]


def test_an_entry_larger_than_the_table_empties_it():
    # 4.4: the table empties and the entry is not added; mid-connection that also proves
    # the unknown tail gone.
    big = b"\x40\x01a" + integer(4096, 7) + b"v" * 4096          # 4129 bytes with 'a' and 32
    for d in (lpd.HpackDecoder(), lpd.HpackDecoder(mid_stream=True)):
        d.decode(hx(C3[0]))
        assert d.decode(big) == [("a", "v" * 4096)]
        assert d.table == [] and d.size == 0 and d.complete
        assert reason(b"\xbe", d) == "index"


def test_lost_block_forgets_the_table():
    d = lpd.HpackDecoder()
    d.decode(hx(C3[0]))
    assert d.decode(b"\xbe") == [(":authority", "www.example.com")]
    d.lost()
    assert not d.complete and d.decode(b"\xbe") == [(UNKNOWN, UNKNOWN)]


# -- hostile blocks ------------------------------------------------------------------------

def test_hostile_integers():
    assert reason(b"\xff" + b"\xff" * 10) == "integer"            # no end to the continuation
    assert reason(b"\xff\xff\xff\xff\xff\x0f") == "integer"       # a fifth continuation byte
    assert reason(b"\xff\xff\xff\xff\x0f") == "index"             # 4 are read: a huge index
    assert reason(b"\xff\x80") == "truncated"
    assert reason(b"\x40\x7f") == "truncated"                     # a name length cut short
    assert reason(b"\x40\x05ab") == "truncated"                   # a name shorter than said
    assert reason(b"\x40\x01a") == "truncated"                    # no value


def test_hostile_indexes():
    assert reason(b"\x80") == "index"                             # index 0 (6.1)
    assert reason(b"\xbe") == "index"                             # 62: an empty table
    assert reason(b"\x7e\x01a") == "index"                        # a literal's name at 62


def test_hostile_table_size_updates():
    assert lpd.HpackDecoder().decode(integer(4096, 5, 0x20)) == []
    assert reason(integer(4097, 5, 0x20)) == "table_size"
    assert reason(integer(257, 5, 0x20), lpd.HpackDecoder(max_table_size=256)) == "table_size"
    assert reason(b"\x82" + integer(0, 5, 0x20)) == "table_size"  # after a field (4.2)


def test_hostile_huffman():
    assert reason(b"\x40\x81\xff\x01a") == "huffman"              # a name of 8 padding bits
    assert reason(b"\x00\x01a\x84\xff\xff\xff\xff") == "huffman"  # a value with EOS


def test_too_long_and_too_many_keep_the_table():
    d = lpd.HpackDecoder()
    big = b"\x00\x01a" + integer(lpd.HPACK_HEADER_LIST_MAX, 7) + b"x" * lpd.HPACK_HEADER_LIST_MAX
    assert reason(hx(C3[0]) + big, d) == "too_long"
    assert d.decode(b"\xbe") == [(":authority", "www.example.com")]     # its insertion stayed
    assert reason(b"\x82" * (lpd.HPACK_FIELDS_MAX + 1), d) == "too_many"
    assert len(d.decode(b"\x82" * lpd.HPACK_FIELDS_MAX)) == lpd.HPACK_FIELDS_MAX
    assert d.complete


def test_an_error_leaves_the_decoder_mid_stream():
    d = lpd.HpackDecoder()
    d.decode(hx(C3[0]))
    assert reason(b"\x80", d) == "index"
    assert not d.complete and d.decode(b"\xbe") == [(UNKNOWN, UNKNOWN)]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=5), st.booleans())
def test_random_bytes_raise_only_hpack_errors(blocks, mid_stream):
    d = lpd.HpackDecoder(mid_stream=mid_stream)
    for block in blocks:
        try:
            fields = d.decode(block)
        except lpd.HpackError as e:
            assert e.reason in lpd.HPACK_ERRORS
        else:
            assert all(isinstance(n, str) or n is UNKNOWN for n, _ in fields)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"\x82", b"\xbe", b"\x40\x01a\x01b", b"\x7e\x01v", b"\x3f\xe1\x1f",
                                 b"\x20", b"\x40\x81\x1f\x81\x1f", b"\xff\xff", b"\x00\x00\x00",
                                 b"\x10\x01k\x83\x1f\xff\xff", b"\x3f\xe2\x1f"]), max_size=30),
       st.booleans())
def test_random_representations_raise_only_hpack_errors(pieces, mid_stream):
    d = lpd.HpackDecoder(mid_stream=mid_stream)
    try:
        d.decode(b"".join(pieces))
    except lpd.HpackError as e:
        assert e.reason in lpd.HPACK_ERRORS


# Eight 'a's (00011 each) fill five bytes exactly: repeated, a megabyte of them (hpack's
# encoder would take minutes on one megabyte).
HUFFMAN_MB = HUFFMAN.encode(b"a" * 8) * (1 << 17)


@pytest.mark.parametrize("block", [
    b"\x82" * (1 << 20),                                       # a million indexed fields
    b"\x00\x01a" + integer(len(HUFFMAN_MB), 7, 0x80) + HUFFMAN_MB,    # a megabyte of 'a'
    b"\x40\x01a\x01b" * (1 << 18),                             # a quarter million insertions
    (integer(0, 5, 0x20) + integer(4096, 5, 0x20)) * (1 << 17),  # size updates, churning
], ids=["indexed", "huffman", "insertions", "size-updates"])
def test_large_blocks_cost_time_in_proportion(block):
    start = time.monotonic()
    try:
        lpd.HpackDecoder().decode(block)
    except lpd.HpackError as e:
        assert e.reason in lpd.HPACK_ERRORS
    assert time.monotonic() - start < 10, "a megabyte block should take about a second"
