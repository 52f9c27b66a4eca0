"""G.711 μ-law and A-law (ITU-T G.711): both implementations against the standard.

The reference here is written from the tables of G.711 itself (Table 1a for
A-law, Table 2a for μ-law: segment end points, step sizes and decoder output
values), not from the bias-and-shift formulation the codecs use. Linear
samples are 16-bit; G.711 works on 13-bit (A-law) and 14-bit (μ-law) uniform
codes, so a sample's magnitude is its top 13 / 14 bits and decoder outputs
are scaled back up by 8 / 4. Negative samples are quantised through their
one's complement (-x - 1), as the ITU-T G.191 Software Tool Library does, so
that the negative half is the exact mirror of the positive one.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ext import g711_py as g711_py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_PCM = np.arange(-32768, 32768, dtype=np.int32)


def _c_module():
    if os.environ.get("BATON_NO_EXTENSIONS"):
        pytest.skip("BATON_NO_EXTENSIONS=1: the reference twin only")
    return pytest.importorskip("ext.g711", reason="ext.g711 not built")


@pytest.fixture(params=["c", "py"])
def codec(request):
    return _c_module() if request.param == "c" else g711_py


# --- Independent reference, from the G.711 tables -------------------------

def _ulaw_intervals():
    """The 128 μ-law quantisation intervals of Table 2a, 14-bit units.

    Segment s (0..7) ends at decision value 2^(s+6) - 33 (31, 95, ..., 8159)
    and has 16 intervals of 2^(s+1); the decoder outputs the middle of each.
    The first interval of segment 0 straddles zero, so its output is 0.
    """
    lower, out = [], []
    for s in range(8):
        start = 2 ** (s + 5) - 33
        for m in range(16):
            lo = start + m * 2 ** (s + 1)
            lower.append(lo)
            out.append(lo + 2 ** s)
    return np.array(lower), np.array(out)


def _alaw_intervals():
    """The 128 A-law quantisation intervals of Table 1a, 13-bit magnitude units.

    Segments 0 and 1 both have steps of 2 (0..32, 32..64); segment s >= 1
    spans 2^(s+4) .. 2^(s+5) in steps of 2^s. The decoder outputs the middle.
    """
    lower, out = [], []
    for s in range(8):
        step = 2 if s == 0 else 2 ** s
        start = 0 if s == 0 else 2 ** (s + 4)
        for m in range(16):
            lo = start + m * step
            lower.append(lo)
            out.append(lo + step // 2)
    return np.array(lower), np.array(out)


def ref_ulaw_encode(x: np.ndarray) -> np.ndarray:
    lower, _ = _ulaw_intervals()
    mag = np.where(x < 0, -x - 1, x) >> 2
    i = np.searchsorted(lower, mag, side="right") - 1   # overload falls in the last interval
    return np.where(x >= 0, 0xFF - i, 0x7F - i).astype(np.uint8)


def ref_ulaw_decode(code: np.ndarray) -> np.ndarray:
    _, out = _ulaw_intervals()
    code = code.astype(np.int32)
    i = 0x7F - (code & 0x7F)
    return np.where(code & 0x80, 4 * out[i], -4 * out[i]).astype(np.int16)


def ref_alaw_encode(x: np.ndarray) -> np.ndarray:
    lower, _ = _alaw_intervals()
    mag = np.where(x < 0, -x - 1, x) >> 3
    i = np.searchsorted(lower, mag, side="right") - 1
    return (np.where(x >= 0, 0x80 | i, i) ^ 0x55).astype(np.uint8)


def ref_alaw_decode(code: np.ndarray) -> np.ndarray:
    _, out = _alaw_intervals()
    a = code.astype(np.int32) ^ 0x55
    i = a & 0x7F
    return np.where(a & 0x80, 8 * out[i], -8 * out[i]).astype(np.int16)


def _pcm_out(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<i2")


def _codes_out(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8)


# Decoder outputs of G.711 Tables 1a and 2a, scaled to 16 bits (x8, x4).
ULAW_DECODE_KNOWN = [
    (0x00, -32124), (0x01, -31100), (0x0F, -16764), (0x10, -15996), (0x1F, -8316),
    (0x20, -7932), (0x2F, -4092), (0x30, -3900), (0x3F, -1980), (0x40, -1884),
    (0x4F, -924), (0x50, -876), (0x5F, -396), (0x60, -372), (0x6F, -132),
    (0x70, -120), (0x7E, -8), (0x7F, 0), (0x80, 32124), (0x8F, 16764),
    (0x90, 15996), (0xA0, 7932), (0xC0, 1884), (0xEF, 132), (0xF0, 120),
    (0xFD, 16), (0xFE, 8), (0xFF, 0),
]
ALAW_DECODE_KNOWN = [
    (0x55, -8), (0xD5, 8), (0x54, -24), (0xD4, 24), (0x5A, -248),
    (0xDA, 248), (0x45, -264), (0xC5, 264), (0x75, -528), (0xF5, 528),
    (0x65, -1056), (0xE5, 1056), (0x15, -2112), (0x95, 2112), (0x05, -4224),
    (0x85, 4224), (0x35, -8448), (0xB5, 8448), (0x2A, -32256), (0xAA, 32256),
    (0x2B, -31232), (0xAB, 31232), (0x7F, -848), (0x00, -5504), (0x80, 5504),
]
# Inputs on both sides of decision values (G.711 Tables 1a / 2a, column "decision value").
ULAW_ENCODE_KNOWN = [
    (0, 0xFF), (3, 0xFF), (4, 0xFE), (11, 0xFE), (12, 0xFD),
    (123, 0xF0), (124, 0xEF), (139, 0xEF), (140, 0xEE), (379, 0xE0),
    (380, 0xDF), (891, 0xD0), (892, 0xCF), (16251, 0x90), (16252, 0x8F),
    (31611, 0x81), (31612, 0x80), (32767, 0x80),
    (-1, 0x7F), (-4, 0x7F), (-5, 0x7E), (-12, 0x7E), (-13, 0x7D),
    (-124, 0x70), (-125, 0x6F), (-32768, 0x00), (-31613, 0x00), (-31612, 0x01),
]
ALAW_ENCODE_KNOWN = [
    (0, 0xD5), (15, 0xD5), (16, 0xD4), (255, 0xDA), (256, 0xC5),
    (511, 0xCA), (512, 0xF5), (1023, 0xFA), (1024, 0xE5), (2048, 0x95),
    (4096, 0x85), (8192, 0xB5), (16384, 0xA5), (31743, 0xAB), (31744, 0xAA),
    (32767, 0xAA),
    (-1, 0x55), (-16, 0x55), (-17, 0x54), (-256, 0x5A), (-257, 0x45),
    (-513, 0x75), (-32768, 0x2A), (-31745, 0x2A), (-31744, 0x2B),
]


# --- The reference against the standard's own numbers -------------------

def test_reference_reproduces_known_values():
    for code, lin in ULAW_DECODE_KNOWN:
        assert ref_ulaw_decode(np.array([code]))[0] == lin, hex(code)
    for code, lin in ALAW_DECODE_KNOWN:
        assert ref_alaw_decode(np.array([code]))[0] == lin, hex(code)
    for lin, code in ULAW_ENCODE_KNOWN:
        assert ref_ulaw_encode(np.array([lin]))[0] == code, lin
    for lin, code in ALAW_ENCODE_KNOWN:
        assert ref_alaw_encode(np.array([lin]))[0] == code, lin


def test_reference_tables_have_the_standard_shape():
    # μ-law: 14-bit outputs 0..8031, segment ends 31, 95, ..., 8159.
    lower, out = _ulaw_intervals()
    assert out[0] == 0 and out[-1] == 8031
    assert [lower[16 * s] + 16 * 2 ** (s + 1) for s in range(8)] == [
        31, 95, 223, 479, 991, 2015, 4063, 8159]
    # A-law: 13-bit (sign + 12) outputs 1..4032, segment ends 32, 64, ..., 4096.
    lower, out = _alaw_intervals()
    assert out[0] == 1 and out[-1] == 4032
    assert np.all(np.diff(out) > 0) and np.all(np.diff(lower) > 0)


# --- Both implementations ------------------------------------------------

@pytest.mark.parametrize("code,lin", ULAW_DECODE_KNOWN)
def test_ulaw_decode_known(codec, code, lin):
    assert _pcm_out(codec.ulaw_decode(bytes([code])))[0] == lin


@pytest.mark.parametrize("code,lin", ALAW_DECODE_KNOWN)
def test_alaw_decode_known(codec, code, lin):
    assert _pcm_out(codec.alaw_decode(bytes([code])))[0] == lin


@pytest.mark.parametrize("lin,code", ULAW_ENCODE_KNOWN)
def test_ulaw_encode_known(codec, lin, code):
    assert codec.ulaw_encode(np.array([lin], dtype=np.int16)) == bytes([code])


@pytest.mark.parametrize("lin,code", ALAW_ENCODE_KNOWN)
def test_alaw_encode_known(codec, lin, code):
    assert codec.alaw_encode(np.array([lin], dtype=np.int16)) == bytes([code])


def test_decode_tables_match_itu(codec):
    codes = np.arange(256)
    assert np.array_equal(_pcm_out(codec.ulaw_decode(bytes(range(256)))), ref_ulaw_decode(codes))
    assert np.array_equal(_pcm_out(codec.alaw_decode(bytes(range(256)))), ref_alaw_decode(codes))
    # The μ-law table is odd around the two zeros; A-law has no zero code.
    u = _pcm_out(codec.ulaw_decode(bytes(range(256)))).astype(np.int32)
    assert np.array_equal(u[:128], -u[128:])
    a = _pcm_out(codec.alaw_decode(bytes(range(256)))).astype(np.int32)
    assert np.array_equal(a[:128], -a[128:]) and np.all(a != 0)


def test_encode_every_sample_matches_itu(codec):
    pcm = ALL_PCM.astype(np.int16)
    assert np.array_equal(_codes_out(codec.ulaw_encode(pcm)), ref_ulaw_encode(ALL_PCM))
    assert np.array_equal(_codes_out(codec.alaw_encode(pcm)), ref_alaw_encode(ALL_PCM))


def test_c_and_py_agree_on_every_sample():
    c = _c_module()
    pcm = ALL_PCM.astype(np.int16)
    raw = pcm.astype("<i2").tobytes()
    for law in ("ulaw", "alaw"):
        enc_c = getattr(c, law + "_encode")(raw)
        assert enc_c == getattr(g711_py, law + "_encode")(raw)
        assert getattr(c, law + "_decode")(enc_c) == getattr(g711_py, law + "_decode")(enc_c)


def test_decode_then_encode_is_identity(codec):
    codes = bytes(range(256))
    u = _codes_out(codec.ulaw_encode(_pcm_out(codec.ulaw_decode(codes))))
    expect = np.arange(256)
    # μ-law has two zeros (0xFF and 0x7F, G.711 Table 2a note); 0 encodes as +0.
    expect[0x7F] = 0xFF
    assert np.array_equal(u, expect)
    a = _codes_out(codec.alaw_encode(_pcm_out(codec.alaw_decode(codes))))
    assert np.array_equal(a, np.arange(256))


def test_encode_then_decode_error_within_half_step(codec):
    pcm = ALL_PCM.astype(np.int16)
    for law, lsb in (("ulaw", 4), ("alaw", 8)):
        out = _pcm_out(getattr(codec, law + "_decode")(getattr(codec, law + "_encode")(pcm)))
        err = np.abs(out.astype(np.int32) - ALL_PCM)
        mag = np.abs(ALL_PCM)
        # Largest step is 256 (μ-law) / 128 (A-law) uniform codes; below the
        # overload point the error is at most half a step plus one LSB of truncation.
        limit = 128 * lsb // 2 if law == "alaw" else 256 * lsb // 2
        inside = mag < (32000 if law == "ulaw" else 31700)
        assert err[inside].max() <= limit + lsb
        # Small signals keep the finest resolution: step 2 uniform codes.
        small = mag < 64
        assert err[small].max() <= 2 * lsb


def test_alaw_even_bit_inversion(codec):
    # G.711 5.2: the even bits of A-law code words are inverted for transmission.
    pcm = np.arange(0, 32768, 8, dtype=np.int16)
    line = _codes_out(codec.alaw_encode(pcm)).astype(np.int32)
    natural = line ^ 0x55
    assert np.all(natural >= 0x80)                 # sign bit 1 = positive
    assert np.all(np.diff(natural) >= 0)           # magnitude order once un-inverted
    assert natural[0] == 0x80 and natural[-1] == 0xFF
    assert line[0] == 0xD5                         # silence is 11010101 on the line
    neg = _codes_out(codec.alaw_encode((-pcm.astype(np.int32) - 1).astype(np.int16))) ^ 0x55
    assert np.array_equal(neg, natural & 0x7F)     # negative half mirrors the positive


def test_ulaw_bit_inversion(codec):
    # G.711 Table 2a: μ-law sends the whole character inverted; silence is 0xFF.
    pcm = np.arange(0, 32768, 4, dtype=np.int16)
    natural = (~_codes_out(codec.ulaw_encode(pcm)).astype(np.int32)) & 0xFF
    assert natural[0] == 0 and np.all(np.diff(natural) >= 0) and natural[-1] == 0x7F


def test_sine_quantisation_snr(codec):
    # A -10 dBm0 tone through either law keeps roughly G.711's 38 dB SQNR.
    t = np.arange(8000)
    x = (22826 * 10 ** (-10 / 20) * np.sin(2 * np.pi * 1004 * t / 8000)).astype(np.int16)
    for law in ("ulaw", "alaw"):
        y = _pcm_out(getattr(codec, law + "_decode")(getattr(codec, law + "_encode")(x)))
        noise = (y.astype(np.float64) - x) ** 2
        snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean(noise))
        assert 33 < snr < 42, (law, snr)


def test_input_forms(codec):
    rng = np.random.default_rng(7)
    pcm = rng.integers(-32768, 32768, 999, dtype=np.int16)
    raw = pcm.astype("<i2").tobytes()
    for law in ("ulaw", "alaw"):
        enc = getattr(codec, law + "_encode")
        dec = getattr(codec, law + "_decode")
        ref = enc(pcm)
        assert len(ref) == 999
        assert enc(raw) == ref
        assert enc(bytearray(raw)) == ref
        assert enc(memoryview(raw)) == ref
        assert enc(pcm.astype(">i2")) == ref                 # byte order of arrays is honoured
        assert enc(np.repeat(pcm, 2)[::2]) == ref            # strided view
        assert enc(b"") == b"" and dec(b"") == b""
        assert dec(bytearray(ref)) == dec(ref) == dec(memoryview(ref))
        assert len(dec(ref)) == 2 * len(ref)
        with pytest.raises(ValueError):
            enc(raw[:-1])
        with pytest.raises(TypeError):
            enc(pcm.astype(np.float32))


@pytest.mark.parametrize("env,expect", [({"BATON_NO_EXTENSIONS": "1"}, "py"), ({}, None)])
def test_codecs_selection(env, expect):
    base = {k: v for k, v in os.environ.items() if k != "BATON_NO_EXTENSIONS"}
    out = subprocess.run(
        [sys.executable, "-c",
         "from ext.kernels import g711 as m; print(m.IMPLEMENTATION, m.ulaw_encode.__module__)"],
        cwd=ROOT, env={**base, **env}, capture_output=True, text=True, check=True).stdout.split()
    if expect is None:
        try:
            import ext.g711  # noqa: F401
            expect = "c"
        except ImportError:
            expect = "py"
    assert out[0] == expect
    assert out[1] == ("ext.g711" if expect == "c" else "ext.g711_py")
