"""Pure-numpy reference G.711 codec (ITU-T G.711, μ-law and A-law).

This is the specification that `ext/g711.pyx` must match bit for bit. Linear
PCM is 16-bit two's complement; G.711 itself works on 14-bit (μ-law) and
13-bit (A-law) magnitudes, so the low 2 or 3 bits are dropped before
quantisation and decoded values are returned left-justified in 16 bits.

Negative samples are quantised by their one's complement (``~x``), as in the
ITU-T G.191 Software Tool Library: the two half-ranges are then exactly
symmetric and -1 maps to the negative-zero code.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ulaw_encode", "ulaw_decode", "alaw_encode", "alaw_decode"]

_ULAW_BIAS = 33       # G.711 Table 2a: segment ends 31, 95, ... are 2^(k+6) - 33 in 14-bit units
_ULAW_CLIP = 0x1FFF   # largest biased magnitude: code 0x80 / 0x00 (decoder output 8031)
# First biased magnitude of μ-law segments 1..7 (segment 0 starts at the bias).
_ULAW_SEG_START = np.array([64, 128, 256, 512, 1024, 2048, 4096], dtype=np.int32)
# First 12-bit magnitude of A-law segments 1..7 (G.711 Table 1a, 13-bit value / 2).
_ALAW_SEG_START = np.array([16, 32, 64, 128, 256, 512, 1024], dtype=np.int32)


def _pcm(pcm) -> np.ndarray:
    """int16 samples in native order from bytes (little-endian) or an int16 array."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        raw = memoryview(pcm).cast("B")
        if raw.nbytes % 2:
            raise ValueError("16-bit PCM needs an even number of bytes")
        return np.frombuffer(raw, dtype="<i2").astype(np.int16, copy=False)
    arr = np.asarray(pcm)
    if arr.dtype.kind != "i" or arr.dtype.itemsize != 2:
        raise TypeError(f"expected bytes or an int16 array, not {arr.dtype}")
    return arr.reshape(-1).astype(np.int16, copy=False)


def _codes(data) -> np.ndarray:
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


def _le_bytes(x: np.ndarray) -> bytes:
    return x.astype("<i2", copy=False).tobytes()


def _magnitude(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int32)
    return np.where(x < 0, ~x, x)


def ulaw_encode(pcm) -> bytes:
    """Encode 16-bit linear PCM (little-endian bytes or int16 array) to μ-law, one byte per sample."""
    x = _pcm(pcm)
    absno = np.minimum((_magnitude(x) >> 2) + _ULAW_BIAS, _ULAW_CLIP)
    seg = np.searchsorted(_ULAW_SEG_START, absno, side="right").astype(np.int32)
    mant = (absno >> (seg + 1)) & 0x0F
    # The code word carries the inverted segment and mantissa; bit 7 set is positive.
    code = (~((seg << 4) | mant)) & 0x7F
    code |= np.where(x >= 0, 0x80, 0)
    return code.astype(np.uint8).tobytes()


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    seg = (u >> 4) & 0x07
    t = (((u & 0x0F) << 3) + 0x84) << seg   # (2*mantissa + 33) * 2^seg * 4, i.e. mid-interval, 16-bit
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def ulaw_decode(data) -> bytes:
    """Decode μ-law bytes to 16-bit linear PCM, returned as little-endian bytes."""
    return _le_bytes(_ULAW_DEC[_codes(data)])


def alaw_encode(pcm) -> bytes:
    """Encode 16-bit linear PCM (little-endian bytes or int16 array) to A-law, one byte per sample."""
    x = _pcm(pcm)
    ix = _magnitude(x) >> 4                      # 12-bit magnitude: 13-bit A-law input / 2
    seg = np.searchsorted(_ALAW_SEG_START, ix, side="right").astype(np.int32)
    # Segments 0 and 1 share one step size, so their code is the magnitude itself.
    code = np.where(seg <= 1, ix, (seg << 4) | ((ix >> np.maximum(seg - 1, 0)) & 0x0F))
    code |= np.where(x >= 0, 0x80, 0)
    return (code ^ 0x55).astype(np.uint8).tobytes()   # G.711 inverts the even bits on the line


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a >> 4) & 0x07
    t = ((a & 0x0F) << 4) + np.where(seg == 0, 8, 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


def alaw_decode(data) -> bytes:
    """Decode A-law bytes to 16-bit linear PCM, returned as little-endian bytes."""
    return _le_bytes(_ALAW_DEC[_codes(data)])


_ULAW_DEC = _ulaw_table()
_ALAW_DEC = _alaw_table()
