"""TLS hellos (15.2): the ClientHellos and ServerHellos lpd reads from bytes it did not
write, and the JA4 client fingerprint.

- JA4 against FoxIO's published values: ClientHellos from the pcaps of FoxIO-LLC/ja4
  (commit 0e54bc83, pcap/), each with the JA4 its Rust implementation's snapshot
  (rust/ja4/src/snapshots/ja4__insta@<pcap>.snap, matched by the stream's ports) gives;
  and the JA4 its ja4plus-mapping.csv lists for Python, from this Python's own ssl module.
  JA4 (TLS client fingerprinting) is Copyright (c) 2023, FoxIO, LLC, BSD 3-Clause; the
  hello bytes below are data from its repository's captures, quoted with their source.
- Field by field against tshark: hellos that OpenSSL (Python's ssl module, in memory)
  writes in TLS 1.0-1.3 with and without SNI and ALPN, written to a pcap here and dissected
  by tshark; the JA4 computed from tshark's fields by JA4.md's rules. tcpdump's corpus has
  no TLS handshake (tshark finds none in its 447 captures), so from it only: every TCP
  payload reads without raising.
- Zeek's version and cipher names (consts.zeek); the cipher names also equal tshark's.
- Live: openssl s_client against openssl s_server on loopback (TLS 1.2 and 1.3, ALPN,
  SNI or none, a HelloRetryRequest, a ClientHello in two records, one in three TCP
  segments), captured with tcpdump, each direction's stream read from its first byte and
  compared with tshark's dissection.
- Hostile bytes (hypothesis) and every truncation and record split of real hellos: never
  an exception, a need-more count never past what is needed, never a bogus hello.
"""
import hashlib
import os
import signal
import socket
import ssl
import struct
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import harness
import lpd
import packets
from conftest import CORPUS

FOXIO = [
    # tls-handshake.pcapng frame 1: Chrome: GREASE ciphers and extensions, ALPN h2 (the spec's own example)
    ("tls-handshake.pcapng", 1, "t13d1516h2_8daaf6152771_e5627efa2ab1",
     "1603010200010001fc03030f9e38acb9a54a7c6e00e29a70ac2feee180ff76d7f25dca84932a66a42d1e5a20"
     "bc58b92f865e6b9aa4a6371cadcb0afe1da1c0f705209a11d52357f56d5dd9620020aaaa130113021303c02b"
     "c02fc02cc030cca9cca8c013c014009c009d002f0035010001939a9a0000ff010001000033002b00290a0a00"
     "0100001d0020cf55af2603e92f59eb321779706a18fa6b96b16c16404c2264ed687a59401878002d00020101"
     "000500050100000000446900050003026832000d00120010040308040401050308050501080606010010000e"
     "000c02683208687474702f312e3100230000001b0003020002002b0007060a0a030403030000002200200000"
     "1d636c69656e7473657276696365732e676f6f676c65617069732e636f6d00120000000a000a00080a0a001d"
     "0017001800170000000b000201006a6a000100001500ba000000000000000000000000000000000000000000"
     "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "000000000000000000000000000000000000000000000000000000000000000000"),
    # tls-handshake.pcapng frame 24: Chrome without ALPN
    ("tls-handshake.pcapng", 24, "t13d151400_8daaf6152771_de4a06bb82e3",
     "1603010200010001fc0303554ec83cae046898f73292a02c9850a0189083f0ae3f068ff48f1199cae4733920"
     "0d8a5d83e0bf08a2b208de442a12235d924174c1669294c652a881d885248f920020aaaa130113021303c02b"
     "c02fc02cc030cca9cca8c013c014009c009d002f0035010001931a1a00000033002b00291a1a000100001d00"
     "20ee3adc5abf132c803e2a783d35ad5438cdeacb660293f6079b3f68eb6f9cff73002b0007069a9a03040303"
     "001b00030200020000001500130000106d74616c6b2e676f6f676c652e636f6d00120000002d00020101000d"
     "0012001004030804040105030805050108060601000a000a00081a1a001d0017001800050005010000000000"
     "23000000170000ff01000100000b00020100caca000100001500e20000000000000000000000000000000000"
     "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "000000000000000000000000000000000000000000000000000000000000000000"),
    # https-connect.pcap frame 8: TLS 1.2 only, no SNI, no ALPN (through an HTTP CONNECT proxy, port 8080)
    ("https-connect.pcap", 8, "t12i860500_e18388e7f3a3_a1e935682795",
     "160301011c010001180303a3073873f429ef8ad6c13fa035798a93be55208aec5ffe09c5736f4f32c15e4b00"
     "00acc030c02cc028c024c014c00a00a500a300a1009f006b006a006900680039003800370036008800870086"
     "0085c032c02ec02ac026c00fc005009d003d00350084c02fc02bc027c023c013c00900a400a200a0009e0067"
     "0040003f003e0033003200310030009a0099009800970045004400430042c031c02dc029c025c00ec004009c"
     "003c002f00960041c012c008001600130010000dc00dc003000a0007c011c007c00cc0020005000400ff0100"
     "0043000b000403000102000a000a0008001700190018001600230000000d0020001e06010602060305010502"
     "0503040104020403030103020303020102020203000f000101"),
    # latest.pcapng frame 75: TLS 1.2 only with SNI, no ALPN
    ("latest.pcapng", 75, "t12d190800_d83cc789557e_7af1ed941c26",
     "16030300b8010000b4030364960ddb84e92e8d5a9be477e2f7112257269dc742143793732813c25ec65af000"
     "0026c02cc02bc030c02fc024c023c028c027c00ac009c014c013009d009c003d003c0035002f000a01000065"
     "0000001b0019000016646973636f766572792e63656d2e636c6f75642e7573000500050100000000000a0008"
     "0006001d00170018000b00020100000d001a0018080408050806040105010201040305030203020206010603"
     "0023000000170000ff01000100"),
    # tls12.pcap frame 1: Firefox: no GREASE, delegated_credentials (more signature algorithms, not counted)
    ("tls12.pcap", 1, "t13d1715h2_5b57614c22b0_3d5424432f57",
     "1603010200010001fc0303ecb2691addb2bf6c599c7aaae23de5f42561cc04eb41029acc6fc050a16ac1d220"
     "46f8617b580ac9358e2aa44e306d52466bcc989c87c8ca64309f5faf50ba7b4d0022130113031302c02bc02f"
     "cca9cca8c02cc030c00ac009c013c014009c009d002f00350100019100000021001f00001c636f6e74696c65"
     "2e73657276696365732e6d6f7a696c6c612e636f6d00170000ff01000100000a000e000c001d001700180019"
     "01000101000b00020100002300000010000e000c02683208687474702f312e31000500050100000000002200"
     "0a000804030503060302030033006b0069001d00208909858fbeb6ed2f1248ba5b9e2978bead0e840110192c"
     "61daed0096798b184400170041044d183d91f5eed35791fa982464e3b0214aaa5f5d1b78616d9b9fbebc22d1"
     "1f535b2f94c686143136aa795e6e5a875d6c08064ad5b76d44caad766e2483012748002b0005040304030300"
     "0d0018001604030503060308040805080604010501060102030201002d00020101001c000240010015007a00"
     "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "000000000000000000000000000000000000000000000000000000000000000000"),
    # badcurveball.pcap frame 4: GREASE, session ticket
    ("badcurveball.pcap", 4, "t13d1615h2_46e7e9700bed_45f260be83e2",
     "1603010200010001fc0303c5b08a8a5a1a1f31e5bcd0853b6f59944dfec2900a712a2a6059b827c58cf48020"
     "078a389ef1767da304d9e10cc7a9441a734513694d3a353ed9522ac47f9c8aa40022aaaa130113021303c02b"
     "c02fc02cc030cca9cca8c013c014009c009d002f0035000a010001914a4a00000000001a0018000015626164"
     "2e637572766562616c6c746573742e636f6d00170000ff01000100000a000a0008caca001d00170018000b00"
     "020100002300000010000e000c02683208687474702f312e31000500050100000000000d0014001204030804"
     "0401050308050501080606010201001200000033002b0029caca000100001d0020ec9c731ae0f83a315ec38e"
     "d8cc94912502ab3ca913a29b7d037d7c0ae6a6e81a002d00020101002b000b0a2a2a0304030303020301001b"
     "00030200027a7a000100001500c3000000000000000000000000000000000000000000000000000000000000"
     "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "000000000000000000000000000000000000000000000000000000000000000000"),
    # ipv6.pcapng frame 4: TLS 1.2, 46 ciphers, over IPv6
    ("ipv6.pcapng", 4, "t12d4605h2_85626a9a5f7f_aaf95bb78ec9",
     "16030100e8010000e40303858226c04fbaeddef4246093b4cfdab38f9dcfef145360e417686575cac49c7000"
     "005cc030c02cc028c024c014c00a009f006b0039cca9cca8ccaaff8500c400880081009d003d003500c00084"
     "c02fc02bc027c023c013c009009e0067003300be0045009c003c002f00ba0041c011c00700050004c012c008"
     "0016000a00ff0100005f0000001700150000127777772e636c6f7564666c6172652e636f6d000b0002010000"
     "0a00080006001d00170018000d001c001a06010603efef0501050304010403eeeeeded030103030201020300"
     "10000e000c02683208687474702f312e31"),
]
NON_ASCII_ALPN = (
    "1603010200010001fc03030f9e38acb9a54a7c6e00e29a70ac2feee180ff76d7f25dca84932a66a42d1e5a20"
    "bc58b92f865e6b9aa4a6371cadcb0afe1da1c0f705209a11d52357f56d5dd9620020aaaa130113021303c02b"
    "c02fc02cc030cca9cca8c013c014009c009d002f0035010001939a9a0000ff010001000033002b00290a0a00"
    "0100001d0020cf55af2603e92f59eb321779706a18fa6b96b16c16404c2264ed687a59401878002d00020101"
    "000500050100000000446900050003026832000d00120010040308040401050308050501080606010010000e"
    "000c02baad08687474702f312e3100230000001b0003020002002b0007060a0a030403030000002200200000"
    "1d636c69656e7473657276696365732e676f6f676c65617069732e636f6d00120000000a000a00080a0a001d"
    "0017001800170000000b000201006a6a000100001500ba000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000")


def hello_of(hexstr):
    hello, why = lpd.read_tls_hello(bytes.fromhex(hexstr))
    assert why is None, why
    return hello


GREASE = {0x0A0A + 0x1010 * i for i in range(16)}


# --- FoxIO's values -------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("source,frame,expected,data", FOXIO, ids=[f"{s}#{f}" for s, f, *_ in FOXIO])
def test_ja4_is_foxios(source, frame, expected, data):
    hello = hello_of(data)
    assert hello.kind == lpd.TLS_CLIENT_HELLO
    assert lpd.ja4(hello) == expected
    raw = bytes.fromhex(data)
    assert lpd.tls_record_start(raw)
    # a memoryview into a larger buffer, or a bytearray, reads the same
    assert lpd.read_tls_hello(memoryview(b"xx" + raw)[2:]) == lpd.read_tls_hello(bytearray(raw)) == (hello, None)


@pytest.mark.unit
def test_foxio_vectors_cover_grease_no_sni_no_alpn_and_tls12():
    hellos = [hello_of(data) for *_, data in FOXIO]
    assert any(GREASE & set(h.ciphers) and GREASE & set(h.extensions) for h in hellos)
    assert any(h.server_name == "" and 0 not in h.extensions for h in hellos)
    assert any(not h.alpn and 16 not in h.extensions for h in hellos)
    assert any(lpd.tls_version(h) == 0x0303 and not h.versions for h in hellos)
    first = hellos[0]
    assert first.server_name == "clientservices.googleapis.com"
    assert first.alpn == ("h2", "http/1.1") and first.alpn_first == b"h2"
    assert first.versions == (0x0A0A, 0x0304, 0x0303)        # GREASE kept, as on the wire
    assert lpd.tls_version(first) == 0x0304 and first.legacy_version == 0x0303


@pytest.mark.unit
def test_a_non_ascii_alpn_prints_as_ja4_md_says():
    """FoxIO's tls-non-ascii-alpn.pcapng frame 1: ALPN 0xBA 0xAD. JA4.md ("ALPN Extension
    Value"): first or last byte not an ASCII letter or digit, print the first and last
    characters of its hex: "bd". FoxIO's own implementations print "99" here (Rust:
    snapshot t13d151699_..., the non-ASCII replaced with '9'); lpd follows the document."""
    hello = hello_of(NON_ASCII_ALPN)
    assert hello.alpn_first == b"\xba\xad" and hello.alpn == ("\ufffd\ufffd", "http/1.1")
    assert lpd.ja4(hello) == "t13d1516bd_8daaf6152771_e5627efa2ab1"


# JA4.md's example: its lists, then its results
SPEC_CIPHERS = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013,
                0xC014, 0x009C, 0x009D, 0x002F, 0x0035]
SPEC_EXTENSIONS = [0x001B, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002D, 0x000D, 0x0005, 0x0023,
                   0x0012, 0x002B, 0xFF01, 0x000B, 0x000A, 0x0015]
SPEC_SIGNATURES = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]


def spec_hello(**changes):
    hello = lpd.TlsHello(lpd.TLS_CLIENT_HELLO, 0x0303, (0x0304, 0x0303), tuple(SPEC_CIPHERS),
                         tuple(SPEC_EXTENSIONS), "example.com", ("h2",),
                         tuple(SPEC_SIGNATURES), b"h2")
    return hello._replace(**changes)


@pytest.mark.unit
def test_ja4_md_example_and_edge_rules():
    assert lpd.ja4(spec_hello()) == "t13d1516h2_8daaf6152771_e5627efa2ab1"
    # no signature algorithms: the extension list alone, no "_"
    assert lpd.ja4(spec_hello(signature_algorithms=())).endswith("_6d807ffa2a79")
    # GREASE anywhere changes nothing
    grease = spec_hello(ciphers=(0x2A2A,) + tuple(SPEC_CIPHERS),
                        extensions=(0xDADA,) + tuple(SPEC_EXTENSIONS) + (0x1A1A,),
                        signature_algorithms=(0x7A7A,) + tuple(SPEC_SIGNATURES),
                        versions=(0xBABA, 0x0304))
    assert lpd.ja4(grease) == lpd.ja4(spec_hello())
    # empty lists hash to twelve 0s: no ciphers; no extensions but SNI and ALPN
    assert lpd.ja4(spec_hello(ciphers=(0x0A0A,))).split("_")[1] == "000000000000"
    bare = spec_hello(extensions=(0, 16), signature_algorithms=())
    assert lpd.ja4(bare) == "t13d1502h2_8daaf6152771_000000000000"
    # counts past 99 print 99; protocol letters
    many = spec_hello(ciphers=tuple(range(1, 121)))
    assert lpd.ja4(many).startswith("t13d9916h2_")
    assert lpd.ja4(spec_hello(), "q").startswith("q13d") and lpd.ja4(spec_hello(), "d")[0] == "d"
    # SNI: the extension's presence; versions: supported_versions' highest, else legacy
    assert lpd.ja4(spec_hello(extensions=tuple(e for e in SPEC_EXTENSIONS if e)))[3:8] == "i1515"
    for versions, legacy, text in [((), 0x0303, "12"), ((), 0x0301, "10"), ((), 0x0300, "s3"),
                                   ((), 0x0002, "s2"), ((0x0302, 0x0301), 0x0301, "11"),
                                   ((), 0xFEFD, "d2"), ((0xFEFC,), 0xFEFD, "d3"),
                                   ((), 0x0305, "00"), ((0x0A0A,), 0x0303, "12")]:
        assert lpd.ja4(spec_hello(versions=versions, legacy_version=legacy))[1:3] == text


@pytest.mark.unit
@pytest.mark.parametrize("alpn,text", [
    (b"", "00"), (b"h2", "h2"), (b"http/1.1", "h1"), (b"h", "hh"), (b"h3-29", "h9"),
    # JA4.md's own table for a first or last byte that is not alphanumeric
    (b"\xab", "ab"), (b"\x20", "20"), (b"\xab\xcd", "ad"), (b"\x20\x61", "21"),
    (b"\x30\xab", "3b"), (b"\x61\x20", "60"), (b"\x30\x31\xab\xcd", "3d"),
    (b"\x30\xab\xcd\x31", "01")])
def test_ja4_alpn_characters(alpn, text):
    assert lpd.ja4(spec_hello(alpn_first=alpn))[8:10] == text


# --- Zeek's names ---------------------------------------------------------------------

@pytest.mark.unit
def test_version_and_cipher_names_are_zeeks():
    # base/protocols/ssl/consts.zeek: version_strings and its &default; cipher_desc
    assert [lpd.tls_version_name(v) for v in (0x0300, 0x0301, 0x0302, 0x0303, 0x0304)] == \
        ["SSLv3", "TLSv10", "TLSv11", "TLSv12", "TLSv13"]
    assert lpd.tls_version_name(0x0002) == "SSLv2" and lpd.tls_version_name(0xFEFD) == "DTLSv12"
    assert lpd.tls_version_name(0x7F12) == "TLSv13-draft18"
    assert lpd.tls_version_name(0x0305) == "unknown-773" and lpd.tls_version_name(0x0A0A) == "unknown-2570"
    assert lpd.tls_cipher_name(0x1301) == "TLS_AES_128_GCM_SHA256"
    assert lpd.tls_cipher_name(0x1303) == "TLS_CHACHA20_POLY1305_SHA256"
    assert lpd.tls_cipher_name(0xC02F) == "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
    assert lpd.tls_cipher_name(0xCCA9) == "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
    assert lpd.tls_cipher_name(0x009F) == "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384"
    assert lpd.tls_cipher_name(0x002F) == "TLS_RSA_WITH_AES_128_CBC_SHA"
    assert lpd.tls_cipher_name(0x00FF) == "TLS_EMPTY_RENEGOTIATION_INFO_SCSV"
    assert lpd.tls_cipher_name(0x5600) == "TLS_FALLBACK_SCSV"
    assert lpd.tls_cipher_name(0xAAAA) == "grease_0xAAAA"
    assert lpd.tls_cipher_name(0x0A0B) == "unknown-2571"
    assert all(n.startswith("TLS_") and n.isupper() for n in lpd.TLS_CIPHER_NAMES.values())


@pytest.mark.offline
def test_cipher_names_are_tsharks_too():
    """Zeek's names are IANA's, as tshark's are: every suite lpd names, tshark names alike."""
    out = subprocess.run(["tshark", "-G", "values"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    theirs = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if parts[:2] == ["V", "tls.handshake.ciphersuite"]:
            theirs[int(parts[2], 0)] = parts[3]
    assert {c: theirs.get(c) for c in lpd.TLS_CIPHER_NAMES} == lpd.TLS_CIPHER_NAMES


@pytest.mark.unit
def test_tls_version_follows_rfc_8446():
    assert lpd.tls_version(spec_hello()) == 0x0304
    assert lpd.tls_version(spec_hello(versions=(0x0A0A, 0x0303, 0x0304))) == 0x0304
    assert lpd.tls_version(spec_hello(versions=(), legacy_version=0x0301)) == 0x0301
    server = spec_hello(kind=lpd.TLS_SERVER_HELLO, versions=(0x0304,), ciphers=(0x1301,))
    assert lpd.tls_version(server) == 0x0304
    assert lpd.tls_version(server._replace(versions=())) == 0x0303


# --- Hellos built here ----------------------------------------------------------------

def vec(width, body):
    return len(body).to_bytes(width, "big") + body


def ext(kind, body):
    return struct.pack("!HH", kind, len(body)) + body


def u16s(values):
    return b"".join(struct.pack("!H", v) for v in values)


def client_hello(extensions=None, ciphers=(0x1301, 0xC02F), session=b"\x11" * 32,
                 legacy=0x0303, compression=b"\x00", handshake_type=1, trailer=b""):
    body = struct.pack("!H", legacy) + bytes(range(32)) + vec(1, session) + vec(2, u16s(ciphers)) \
        + vec(1, compression)
    if extensions is not None:
        body += vec(2, b"".join(extensions))
    body += trailer
    return bytes([handshake_type]) + len(body).to_bytes(3, "big") + body


def records(message, sizes=(), content=22, version=(3, 1)):
    """message in TLS records: the first len(sizes) of the given sizes, the rest in one."""
    out, off = b"", 0
    for size in list(sizes) + [len(message)]:
        chunk = message[off:off + size]
        if not chunk:
            break
        out += bytes([content, *version]) + struct.pack("!H", len(chunk)) + chunk
        off += len(chunk)
    return out


def sni(*names):
    return ext(0, vec(2, b"".join(bytes([kind]) + vec(2, name) for kind, name in names)))


def alpn(*names):
    return ext(16, vec(2, b"".join(vec(1, n) for n in names)))


@pytest.mark.unit
def test_hellos_built_here():
    extensions = [sni((0, b"www.example.com")), alpn(b"h2", b"http/1.1"),
                  ext(13, vec(2, u16s([0x0403, 0x0804]))), ext(43, vec(1, u16s([0x3A3A, 0x0304, 0x0303]))),
                  ext(0xFF01, b"\x00")]
    hello, why = lpd.read_tls_hello(records(client_hello(extensions)) + b"\x17\x03\x03garbage after")
    assert why is None
    assert hello == lpd.TlsHello(1, 0x0303, (0x3A3A, 0x0304, 0x0303), (0x1301, 0xC02F),
                                 (0, 16, 13, 43, 0xFF01), "www.example.com", ("h2", "http/1.1"),
                                 (0x0403, 0x0804), b"h2")
    # no extensions block at all (TLS 1.0 clients may end the hello there)
    old, _ = lpd.read_tls_hello(records(client_hello(None, legacy=0x0301)))
    assert old.extensions == () and old.server_name == "" and lpd.tls_version(old) == 0x0301
    # SNI: the first host_name; untrusted bytes replaced; cut at 255
    odd, _ = lpd.read_tls_hello(records(client_hello([sni((1, b"x"), (0, b"a\xffb\x00c"))])))
    assert odd.server_name == "a\ufffdb\x00c"
    long, _ = lpd.read_tls_hello(records(client_hello([sni((0, b"a" * 1000))])))
    assert long.server_name == "a" * 255
    none, _ = lpd.read_tls_hello(records(client_hello([sni((1, b"x"))])))
    assert none.server_name == "" and none.extensions == (0,)
    # a ServerHello
    server_body = struct.pack("!H", 0x0303) + bytes(32) + vec(1, b"\x01" * 32) + u16s([0x1302]) + b"\x00" \
        + vec(2, ext(43, u16s([0x0304])) + ext(51, bytes(36)) + alpn(b"h2"))
    server, _ = lpd.read_tls_hello(records(b"\x02" + len(server_body).to_bytes(3, "big") + server_body,
                                           version=(3, 3)))
    assert server == lpd.TlsHello(2, 0x0303, (0x0304,), (0x1302,), (43, 51, 16), "", ("h2",), (), b"h2")


@pytest.mark.unit
@pytest.mark.parametrize("stream,reason", [
    (records(client_hello([]), content=23), "not_hello"),                  # application data
    (records(client_hello([], handshake_type=11)), "not_hello"),           # a Certificate
    (b"GET / HTTP/1.1\r\n\r\n", "not_hello"),
    (records(client_hello([]), version=(2, 0)), "not_hello"),
    (records(client_hello([], trailer=b"\x00")), "malformed"),             # past its extensions
    (records(client_hello([ext(0, b"\x00\x05\x00\x00\x01a")])), "malformed"),   # SNI inside too short
    (records(client_hello([], session=b"\x00" * 33)), "malformed"),
    (records(client_hello([], ciphers=())), "malformed"),
    (records(client_hello([], compression=b"")), "malformed"),
    (records(client_hello([ext(43, b"\x00")])), "malformed"),              # no version offered
    (records(client_hello([ext(13, b"\x00\x03\x04\x03\x08")])), "malformed"),   # odd length
    (b"\x16\x03\x01\x00\x00", "malformed"),                                # an empty record
    (records(client_hello([])[:10]) + records(client_hello([])[10:], content=21), "malformed"),
    (b"\x16\x03\x01\x00\x04\x01\x00\x40\x01", "too_long"),                 # 16 KiB + 1
    (records(client_hello([ext(21, bytes(200))]), sizes=[1] * 16), "too_long"),   # 17 records
])
def test_what_is_no_hello_says_why(stream, reason):
    assert lpd.read_tls_hello(stream) == (None, reason)
    assert reason in lpd.TLS_PARSE_ERRORS


@pytest.mark.unit
def test_tls_record_start():
    assert lpd.tls_record_start(b"\x16\x03\x01\x02\x00")
    assert lpd.tls_record_start(memoryview(b"\x16\x03\x04\x48\x00rest"))           # 2^14 + 2048
    for no in (b"\x16\x03\x01\x02", b"\x17\x03\x01\x02\x00", b"\x16\x02\x01\x02\x00",
               b"\x16\x03\x05\x02\x00", b"\x16\x03\x01\x00\x00", b"\x16\x03\x01\x48\x01", b""):
        assert not lpd.tls_record_start(no)


def need_is_sound(stream, whole):
    """Every cut of a stream whose first `whole` bytes hold the hello: a need-more count
    past the cut and within `whole`, never a hello or a reason before `whole`."""
    for cut in range(whole):
        hello, need = lpd.read_tls_hello(stream[:cut])
        assert hello is None and isinstance(need, int) and cut < need <= whole, (cut, need, whole)
    assert lpd.read_tls_hello(stream[:whole])[0] is not None


@pytest.mark.unit
@pytest.mark.parametrize("data", [d for *_, d in FOXIO[:3]] + [NON_ASCII_ALPN])
def test_every_truncation_of_a_real_hello_asks_for_more(data):
    stream = bytes.fromhex(data)
    need_is_sound(stream, len(stream))


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.sampled_from([d for *_, d in FOXIO]), st.lists(st.integers(1, 300), max_size=12),
       st.binary(max_size=40))
def test_a_hello_split_into_records_reads_the_same(data, sizes, after):
    message = bytes.fromhex(data)[5:]                   # its handshake message, unwrapped
    stream = records(message, sizes)
    hello, why = lpd.read_tls_hello(stream + after)
    assert why is None and hello == hello_of(data)
    # the last record is the one that completes the message: the cut points are exact or low
    need_is_sound(stream + after, len(stream))


@pytest.mark.unit
@settings(max_examples=3000, deadline=200)
@given(st.binary(max_size=700))
def test_any_bytes_give_a_hello_a_need_or_a_reason(data):
    check_answer(data)


@pytest.mark.unit
@settings(max_examples=3000, deadline=200)
@given(st.sampled_from([1, 2]), st.integers(0, 3000), st.binary(max_size=700))
def test_any_bytes_behind_hello_headers(kind, length, data):
    body = bytes([kind]) + length.to_bytes(3, "big") + data
    check_answer(b"\x16\x03\x01" + struct.pack("!H", min(len(body), 0xFFFF)) + body)


def check_answer(data):
    hello, answer = lpd.read_tls_hello(data)
    if hello is not None:
        assert answer is None and lpd.tls_record_start(data)
        assert hello.kind in (1, 2) and len(hello.server_name) <= 255
        lpd.ja4(hello), lpd.tls_version_name(lpd.tls_version(hello))
        [lpd.tls_cipher_name(c) for c in hello.ciphers]
    elif isinstance(answer, int):
        assert len(data) < answer <= lpd.TLS_HELLO_MAX
    else:
        assert answer in lpd.TLS_PARSE_ERRORS


@pytest.mark.offline
def test_every_tcp_payload_of_the_corpus_reads_without_raising():
    n = 0
    for name in sorted(os.listdir(CORPUS)):
        for _, frame in harness.timed_frames(os.path.join(CORPUS, name)):
            f = lpd.parse_l4(frame)
            if f and f[0] == lpd.IPPROTO_TCP and len(f) > 12 and f[6]:
                check_answer(bytes(frame[f[12]:f[12] + f[6]]))
                n += 1
    assert n > 300


# --- tshark as the oracle -------------------------------------------------------------

TSHARK_FIELDS = ("frame.number", "tcp.srcport", "tcp.dstport", "tls.handshake.type",
                 "tls.handshake.version", "tls.handshake.ciphersuite",
                 "tls.handshake.extension.type", "tls.handshake.extensions_server_name",
                 "tls.handshake.extensions_alpn_str", "tls.handshake.sig_hash_alg",
                 "tls.handshake.extensions.supported_version")


def tshark(pcap, *args):
    cmd = ["tshark", "-r", pcap, "-n", *args, "-Y", "tls.handshake.type == 1 || tls.handshake.type == 2",
           "-T", "fields", "-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=;"]
    for f in TSHARK_FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    return [dict(zip(TSHARK_FIELDS, line.split("|"))) for line in out.splitlines()]


def numbers(text):
    return [int(v, 0) for v in text.split(";") if v]


def ja4_from_tshark(row):
    """JA4 by JA4.md's rules from tshark's fields: an oracle written apart from lpd's."""
    def sha(text):
        return hashlib.sha256(text.encode()).hexdigest()[:12] if text else "0" * 12
    ciphers = [c for c in numbers(row["tls.handshake.ciphersuite"]) if c not in GREASE]
    exts = [e for e in numbers(row["tls.handshake.extension.type"]) if e not in GREASE]
    offered = [v for v in numbers(row["tls.handshake.extensions.supported_version"]) if v not in GREASE]
    version = max(offered) if offered else numbers(row["tls.handshake.version"])[0]
    alpn = row["tls.handshake.extensions_alpn_str"].split(";")[0]
    sigs = ",".join(f"{s:04x}" for s in numbers(row["tls.handshake.sig_hash_alg"]) if s not in GREASE)
    kept = ",".join(sorted(f"{e:04x}" for e in exts if e not in (0, 16))) + ("_" + sigs if sigs else "")
    return (f"t{ {0x0304: '13', 0x0303: '12', 0x0302: '11', 0x0301: '10'}.get(version, '00') }"
            f"{'d' if 0 in exts else 'i'}{min(len(ciphers), 99):02d}{min(len(exts), 99):02d}"
            f"{alpn[0] + alpn[-1] if alpn else '00'}_"
            f"{sha(','.join(sorted(f'{c:04x}' for c in ciphers)))}_{sha(kept)}")


def compare_with_tshark(hello, row):
    """One hello as lpd reads it against tshark's dissection of the same bytes."""
    assert int(row["tls.handshake.type"].split(";")[0]) == hello.kind
    assert numbers(row["tls.handshake.version"])[0] == hello.legacy_version
    assert tuple(numbers(row["tls.handshake.extension.type"])) == hello.extensions
    assert tuple(numbers(row["tls.handshake.extensions.supported_version"])) == hello.versions
    assert row["tls.handshake.extensions_alpn_str"].split(";") == list(hello.alpn or [""])
    if hello.kind == lpd.TLS_CLIENT_HELLO:
        assert tuple(numbers(row["tls.handshake.ciphersuite"])) == hello.ciphers
        assert row["tls.handshake.extensions_server_name"] == hello.server_name
        assert tuple(numbers(row["tls.handshake.sig_hash_alg"])) == hello.signature_algorithms
        assert lpd.ja4(hello) == ja4_from_tshark(row)
    else:
        assert numbers(row["tls.handshake.ciphersuite"])[:1] == list(hello.ciphers)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return harness.self_signed(str(tmp_path_factory.mktemp("tls")), "lpd.test")


# (name, SNI, ALPN offered, lowest and highest version, OpenSSL cipher list for TLS <= 1.2)
VARIANTS = [
    ("tls13", "www.example.com", ["h2", "http/1.1"], ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3, None),
    ("tls13-bare", None, [], ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3, None),
    ("tls12", "lpd.test", ["http/1.1"], ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2,
     "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:AES256-SHA"),
    ("tls10-12", "old.example", ["spdy/3", "http/1.1"], ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_2,
     "DEFAULT:@SECLEVEL=0"),
    ("many-alpn", "x" * 60 + ".example", ["h3", "h2", "http/1.1", "acme-tls/1", "x" * 200],
     ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3, None),
]


def handshake(certificate, sni, offered, low, high, ciphers):
    """(ClientHello bytes, the server's first flight) as OpenSSL writes them, in memory."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.minimum_version, client.maximum_version = low, high
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*certificate)
    server.minimum_version = ssl.TLSVersion.TLSv1
    if ciphers:
        client.set_ciphers(ciphers)
        server.set_ciphers("DEFAULT:@SECLEVEL=0")
    if offered:
        client.set_alpn_protocols(offered)
        server.set_alpn_protocols(["h2", "http/1.1"])
    return harness.memory_handshake(client, server, sni)


def tcp_frame(sport, dport, seq, payload):
    return packets.ether("02:00:00:00:00:02", "02:00:00:00:00:01", packets.ETH_IP,
                         packets.ipv4("192.0.2.1" if dport == 443 else "192.0.2.2",
                                      "192.0.2.2" if dport == 443 else "192.0.2.1", packets.PROTO_TCP,
                                      packets.tcp(sport, dport, 0x18, seq, 1, payload=payload)))


@pytest.mark.offline
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated:DeprecationWarning")
def test_openssls_hellos_read_as_tshark_reads_them(certificate, tmp_path):
    frames, expect = [], {}
    for i, (name, sni_, offered, low, high, ciphers) in enumerate(VARIANTS):
        first, flight = handshake(certificate, sni_, offered, low, high, ciphers)
        port = 40000 + i
        frames += [tcp_frame(port, 443, 1, first), tcp_frame(443, port, 1, flight)]
        expect[port] = name, sni_, offered, high, first, flight
    pcap = str(tmp_path / "hellos.pcap")
    harness.write_pcap(pcap, [(1, i, f) for i, f in enumerate(frames)])
    rows = tshark(pcap)
    assert len(rows) == 2 * len(VARIANTS)
    for row in rows:
        sport, dport = int(row["tcp.srcport"]), int(row["tcp.dstport"])
        name, sni_, offered, high, first, flight = expect[sport if dport == 443 else dport]
        hello, why = lpd.read_tls_hello(first if dport == 443 else flight)
        assert why is None, (name, why)
        compare_with_tshark(hello, row)
        if dport == 443:
            assert hello.server_name == (sni_ or "") and list(hello.alpn) == offered
            assert lpd.tls_record_start(first)
        else:
            assert lpd.tls_version(hello) == (0x0304 if high == ssl.TLSVersion.TLSv1_3 else 0x0303)
            assert lpd.tls_version_name(lpd.tls_version(hello)) in ("TLSv12", "TLSv13")
            assert not lpd.tls_cipher_name(hello.ciphers[0]).startswith("unknown")
            need_is_sound(flight, hello_end(flight))


def hello_end(stream):
    """Where the first handshake message ends in a stream whose first record holds it."""
    return 5 + 4 + int.from_bytes(stream[6:9], "big")


@pytest.mark.offline
def test_pythons_ssl_gives_foxios_python_fingerprint():
    """FoxIO's ja4plus-mapping.csv lists t13i181000_85036bcba153_d41ae481755e as Python's:
    this Python's ssl module, on OpenSSL 3, sends exactly that without SNI; with SNI one
    extension more (the csv's t13d181000 row is another build's: one extension fewer)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    for sni_, expected in ((None, "t13i181000_85036bcba153_d41ae481755e"),
                           ("lpd.test", "t13d181100_85036bcba153_d41ae481755e")):
        out = ssl.MemoryBIO()
        with pytest.raises(ssl.SSLWantReadError):
            ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=sni_).do_handshake()
        hello, _ = lpd.read_tls_hello(out.read())
        assert lpd.ja4(hello) == expected


# --- Live: openssl s_client and s_server on loopback ----------------------------------

def streams(pcap):
    """{(sport, dport): (the direction's TCP payload from its SYN on, in order, and the
    lengths of the segments it came in)}."""
    segments, isn = {}, {}
    for _, frame in harness.timed_frames(pcap):
        f = lpd.parse_l4(frame)
        if not f or f[0] != lpd.IPPROTO_TCP:
            continue
        key, flags, seq = (f[3], f[4]), f[7], f[8]
        if flags & 0x02:
            isn[key] = seq + 1
        elif f[6]:
            segments.setdefault(key, {})[seq] = bytes(frame[f[12]:f[12] + f[6]])
    out = {}
    for key, parts in segments.items():
        data, sizes, at = b"", [], isn[key]
        for _ in range(len(parts)):
            if at not in parts:
                break
            data += parts[at]
            sizes.append(len(parts[at]))
            at = (at + len(parts[at])) & 0xFFFFFFFF
        out[key] = data, sizes
    return out


MANY_ALPN = ",".join(f"proto-{i:02d}-of-many" for i in range(30)) + ",h2"   # one the server has
# s_client's options; the server offers h2 and http/1.1 and key shares for X25519 or P-256
CLIENTS = [("-servername", "lpd.test", "-alpn", "h2,http/1.1"),
           ("-servername", "www.lpd.test", "-alpn", "http/1.1", "-no_tls1_3"),
           ("-noservername", "-no_tls1_3"),
           ("-noservername", "-alpn", "h2"),
           # a key share the server has no group for: its first answer is a HelloRetryRequest
           ("-servername", "retry.lpd.test", "-groups", "P-384:X25519"),
           # records of 512 bytes at most: the ClientHello spans two
           ("-servername", "records.lpd.test", "-max_send_frag", "512", "-alpn", MANY_ALPN)]
SEGMENT = 200                           # bytes a send: the ClientHello spans three segments


def small_segment_client(port):
    """A handshake (Python's ssl, OpenSSL beneath) whose bytes go SEGMENT at a time, each
    its own segment (TCP_NODELAY, a pause between)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="segments.lpd.test")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(10):                             # a handshake takes two round trips
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                data = outgoing.read()
                for i in range(0, len(data), SEGMENT):
                    sock.sendall(data[i:i + SEGMENT])
                    time.sleep(0.02)
                got = sock.recv(1 << 16)
                if not got:
                    break
                incoming.write(got)
        sock.sendall(outgoing.read())


@pytest.mark.live
def test_openssl_s_client_hellos_on_loopback(certificate, tmp_path):
    port = harness.free_port()
    pcap = str(tmp_path / "lo.pcap")
    dump = subprocess.Popen(["tcpdump", "-i", "lo", "--immediate-mode", "-U", "-w", pcap, "-s", "0",
                             f"tcp port {port}"], stderr=subprocess.PIPE, text=True)
    server = None
    try:
        assert "listening on" in dump.stderr.readline()
        server = subprocess.Popen(["openssl", "s_server", "-accept", str(port), "-cert", certificate[0],
                                   "-key", certificate[1], "-alpn", "h2,http/1.1", "-groups",
                                   "X25519:P-256", "-naccept", str(len(CLIENTS) + 1), "-quiet"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        harness.wait_for(lambda: subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                                text=True).stdout.strip(), timeout=10, what="s_server")
        for args in CLIENTS:
            subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
        small_segment_client(port)
        server.wait(timeout=20)
        # each connection's two directions written (tcpdump -U writes each packet as it comes)
        harness.wait_for(lambda: len(streams(pcap)) >= 2 * (len(CLIENTS) + 1), timeout=10,
                         what="tcpdump")
    finally:
        for proc in (server, dump):
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGINT if proc is dump else signal.SIGTERM)
                proc.wait(timeout=10)
    rows, client_hellos = {}, {}
    for r in tshark(pcap, "-d", f"tcp.port=={port},tls"):
        key = int(r["tcp.srcport"]), int(r["tcp.dstport"])
        rows.setdefault(key, r)                         # a direction's first hello
        client_hellos[key] = client_hellos.get(key, 0) + ("1" in r["tls.handshake.type"].split(";"))
    hellos = {}
    for key, (data, sizes) in streams(pcap).items():
        hello, why = lpd.read_tls_hello(data)
        assert why is None, (key, why)
        compare_with_tshark(hello, rows[key])
        hellos[key] = hello, data, sizes
    clients = {k: v for k, v in hellos.items() if k[1] == port}
    servers = {k: v for k, v in hellos.items() if k[0] == port}
    assert len(clients) == len(servers) == len(CLIENTS) + 1
    by_name = {h.server_name: (k, h, d, sizes) for k, (h, d, sizes) in clients.items()}
    assert set(by_name) == {"lpd.test", "www.lpd.test", "", "retry.lpd.test", "records.lpd.test",
                            "segments.lpd.test"}
    assert {lpd.ja4(h)[1:3] for h, *_ in clients.values()} == {"12", "13"}
    # the hello of two records, the one of three segments, the retried one
    key, hello, data, _ = by_name["records.lpd.test"]
    assert len(hello.alpn) == 31 and struct.unpack_from("!H", data, 3)[0] == 512
    _, hello, data, sizes = by_name["segments.lpd.test"]
    assert sum(sizes[:2]) < hello_end(data) <= len(data)
    key = by_name["retry.lpd.test"][0]
    assert client_hellos[key] == 2
    retry = servers[key[::-1]][0]
    assert retry.kind == lpd.TLS_SERVER_HELLO and lpd.tls_version(retry) == 0x0304
