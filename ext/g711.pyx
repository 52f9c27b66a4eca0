"""G.711 μ-law and A-law codec (ITU-T G.711), table driven.

Bit-exact twin of `ext/g711_py.py`. Encoding indexes a 16384-entry
(μ-law) or 8192-entry (A-law) table by the top bits of the sample, decoding
a 256-entry table; the tables are built once at import from the same
segment algorithm as the reference.
"""
import sys

import numpy

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int16_t, int32_t, uint8_t, uint16_t

# μ-law quantises 14-bit magnitudes and A-law 13-bit ones, so the decision
# depends only on the top 14 / 13 bits of a 16-bit sample.
cdef uint8_t _ULAW_ENC[16384]
cdef uint8_t _ALAW_ENC[8192]
cdef int16_t _ULAW_DEC[256]
cdef int16_t _ALAW_DEC[256]
cdef bint _BIG_ENDIAN = sys.byteorder == "big"


cdef uint8_t _ulaw_compress(int32_t x) noexcept nogil:
    # G.191 STL ulaw_compress: one's complement for negatives keeps the halves symmetric.
    cdef int32_t absno = ((~x if x < 0 else x) >> 2) + 33
    cdef int32_t seg = 0
    if absno > 0x1FFF:
        absno = 0x1FFF
    while (absno >> (seg + 6)) != 0:
        seg += 1
    cdef int32_t code = (~((seg << 4) | ((absno >> (seg + 1)) & 0x0F))) & 0x7F
    return <uint8_t>(code | 0x80 if x >= 0 else code)


cdef uint8_t _alaw_compress(int32_t x) noexcept nogil:
    cdef int32_t ix = (~x if x < 0 else x) >> 4
    cdef int32_t seg = 1
    if ix > 15:
        # Segments 0 and 1 share the smallest step (G.711 Table 1a), so the
        # magnitude is the code below 32; above it, halve until it fits.
        while ix > 31:
            ix >>= 1
            seg += 1
        ix = ((seg << 4) | (ix & 0x0F))
    if x >= 0:
        ix |= 0x80
    return <uint8_t>(ix ^ 0x55)   # even-bit inversion on the line


cdef int16_t _ulaw_expand(uint8_t code) noexcept nogil:
    cdef int32_t u = (~code) & 0xFF
    cdef int32_t t = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)
    return <int16_t>(0x84 - t if u & 0x80 else t - 0x84)


cdef int16_t _alaw_expand(uint8_t code) noexcept nogil:
    cdef int32_t a = code ^ 0x55
    cdef int32_t seg = (a >> 4) & 0x07
    cdef int32_t t = (a & 0x0F) << 4
    if seg == 0:
        t += 8
    else:
        t = (t + 0x108) << (seg - 1)
    return <int16_t>(t if a & 0x80 else -t)


cdef void _build_tables() noexcept nogil:
    cdef int32_t i
    for i in range(16384):
        # Index is the top 14 bits read as unsigned; sign-extend back.
        _ULAW_ENC[i] = _ulaw_compress(<int16_t><uint16_t>(i << 2))
    for i in range(8192):
        _ALAW_ENC[i] = _alaw_compress(<int16_t><uint16_t>(i << 3))
    for i in range(256):
        _ULAW_DEC[i] = _ulaw_expand(<uint8_t>i)
        _ALAW_DEC[i] = _alaw_expand(<uint8_t>i)


_build_tables()


cdef uint8_t ulaw_encode_sample(int16_t x) noexcept nogil:
    return _ULAW_ENC[(<uint16_t>x) >> 2]


cdef int16_t ulaw_decode_sample(uint8_t code) noexcept nogil:
    return _ULAW_DEC[code]


cdef uint8_t alaw_encode_sample(int16_t x) noexcept nogil:
    return _ALAW_ENC[(<uint16_t>x) >> 3]


cdef int16_t alaw_decode_sample(uint8_t code) noexcept nogil:
    return _ALAW_DEC[code]


cdef void ulaw_encode_buffer(const int16_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = _ULAW_ENC[(<uint16_t>src[i]) >> 2]


cdef void ulaw_decode_buffer(const uint8_t* src, int16_t* dst, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = _ULAW_DEC[src[i]]


cdef void alaw_encode_buffer(const int16_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = _ALAW_ENC[(<uint16_t>src[i]) >> 3]


cdef void alaw_decode_buffer(const uint8_t* src, int16_t* dst, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = _ALAW_DEC[src[i]]


cdef void ulaw_encode_view(const int16_t[::1] src, uint8_t[::1] dst) noexcept nogil:
    if src.shape[0]:
        ulaw_encode_buffer(&src[0], &dst[0], src.shape[0])


cdef void ulaw_decode_view(const uint8_t[::1] src, int16_t[::1] dst) noexcept nogil:
    if src.shape[0]:
        ulaw_decode_buffer(&src[0], &dst[0], src.shape[0])


cdef void alaw_encode_view(const int16_t[::1] src, uint8_t[::1] dst) noexcept nogil:
    if src.shape[0]:
        alaw_encode_buffer(&src[0], &dst[0], src.shape[0])


cdef void alaw_decode_view(const uint8_t[::1] src, int16_t[::1] dst) noexcept nogil:
    if src.shape[0]:
        alaw_decode_buffer(&src[0], &dst[0], src.shape[0])


cdef object _pcm(object pcm):
    """A native-order int16 buffer for bytes (little-endian PCM) or an int16 array."""
    cdef object arr
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        raw = memoryview(pcm).cast("B")
        if raw.nbytes % 2:
            raise ValueError("16-bit PCM needs an even number of bytes")
        if _BIG_ENDIAN:
            return numpy.frombuffer(raw, dtype="<i2").astype(numpy.int16)
        return raw.cast("h")
    arr = numpy.asarray(pcm)
    if arr.dtype.kind != "i" or arr.dtype.itemsize != 2:
        raise TypeError(f"expected bytes or an int16 array, not {arr.dtype}")
    return numpy.ascontiguousarray(arr.reshape(-1), dtype=numpy.int16)


cdef bytes _decoded(const uint8_t[::1] src, const int16_t* table):
    cdef Py_ssize_t i, n = src.shape[0]
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 2 * n)
    cdef int16_t* dst = <int16_t*>PyBytes_AS_STRING(out)
    cdef uint16_t v
    with nogil:
        for i in range(n):
            dst[i] = table[src[i]]
        if _BIG_ENDIAN:  # the wire format is little-endian
            for i in range(n):
                v = <uint16_t>dst[i]
                dst[i] = <int16_t>(((v >> 8) | (v << 8)) & 0xFFFF)
    return out


cdef bytes _encoded(object pcm, const uint8_t* table, int shift):
    cdef const int16_t[::1] src = _pcm(pcm)
    cdef Py_ssize_t i, n = src.shape[0]
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(out)
    with nogil:
        for i in range(n):
            dst[i] = table[(<uint16_t>src[i]) >> shift]
    return out


def ulaw_encode(pcm):
    """Encode 16-bit linear PCM (little-endian bytes or int16 array) to μ-law, one byte per sample."""
    return _encoded(pcm, _ULAW_ENC, 2)


def ulaw_decode(data):
    """Decode μ-law bytes to 16-bit linear PCM, returned as little-endian bytes."""
    return _decoded(memoryview(data).cast("B"), _ULAW_DEC)


def alaw_encode(pcm):
    """Encode 16-bit linear PCM (little-endian bytes or int16 array) to A-law, one byte per sample."""
    return _encoded(pcm, _ALAW_ENC, 3)


def alaw_decode(data):
    """Decode A-law bytes to 16-bit linear PCM, returned as little-endian bytes."""
    return _decoded(memoryview(data).cast("B"), _ALAW_DEC)
