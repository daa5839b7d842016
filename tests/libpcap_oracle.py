"""libpcap through ctypes: the definition lpd's filter compiler is held to.

Test-only. Debian's libpcap0.8 provides the library; when it is missing this
module raises at import so the suite fails instead of silently skipping.
"""
import ctypes
import ctypes.util

DLT_EN10MB = 1
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF


def _load():
    for name in ("libpcap.so.0.8", ctypes.util.find_library("pcap"), "libpcap.so.1"):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise ImportError("libpcap not found: install Debian's libpcap0.8 (the filter-compiler oracle)")


class bpf_insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte),
                ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class bpf_program(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(bpf_insn))]


class timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class pcap_pkthdr(ctypes.Structure):
    _fields_ = [("ts", timeval), ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32)]


lib = _load()
lib.pcap_open_dead.restype = ctypes.c_void_p
lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
lib.pcap_compile.restype = ctypes.c_int
lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(bpf_program),
                             ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32]
lib.pcap_geterr.restype = ctypes.c_char_p
lib.pcap_geterr.argtypes = [ctypes.c_void_p]
lib.pcap_freecode.argtypes = [ctypes.POINTER(bpf_program)]
lib.pcap_offline_filter.restype = ctypes.c_int
lib.pcap_offline_filter.argtypes = [ctypes.POINTER(bpf_program),
                                    ctypes.POINTER(pcap_pkthdr), ctypes.c_char_p]
lib.bpf_filter.restype = ctypes.c_uint
lib.bpf_filter.argtypes = [ctypes.POINTER(bpf_insn), ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint]

_handles = {}


def _handle(snaplen):
    h = _handles.get(snaplen)
    if h is None:
        h = _handles[snaplen] = lib.pcap_open_dead(DLT_EN10MB, snaplen)
    return h


class OracleError(Exception):
    """libpcap rejected the expression; the message is libpcap's own."""


class Program:
    """A compiled libpcap program, kept alive for repeated filtering."""

    def __init__(self, expr, optimize=True, snaplen=262144, netmask=PCAP_NETMASK_UNKNOWN):
        self._prog = bpf_program()
        h = _handle(snaplen)
        if lib.pcap_compile(h, ctypes.byref(self._prog), expr.encode(), int(optimize), netmask) != 0:
            raise OracleError(lib.pcap_geterr(h).decode(errors="replace"))
        self.insns = [(i.code, i.jt, i.jf, i.k)
                      for i in self._prog.bf_insns[:self._prog.bf_len]]
        self._hdr = pcap_pkthdr()

    def __del__(self):
        try:
            lib.pcap_freecode(ctypes.byref(self._prog))
        except Exception:
            pass

    def filter(self, data, wirelen=None):
        """pcap_offline_filter: the accept length (0 = reject)."""
        self._hdr.caplen = len(data)
        self._hdr.len = len(data) if wirelen is None else wirelen
        return lib.pcap_offline_filter(ctypes.byref(self._prog), ctypes.byref(self._hdr), bytes(data))


def compile(expr, optimize=True, snaplen=262144):
    """Instructions as (code, jt, jf, k) tuples; raises OracleError with libpcap's message."""
    return Program(expr, optimize, snaplen).insns


def bpf_filter(insns, data, wirelen=None):
    """libpcap's C interpreter on an arbitrary program (the benchmark's C reference)."""
    arr = (bpf_insn * len(insns))(*[bpf_insn(*i) for i in insns])
    return lib.bpf_filter(arr, bytes(data), len(data) if wirelen is None else wirelen, len(data))
