"""Signal helpers on 8 kHz 16-bit PCM (numpy int16 arrays): resampling, tones,
silence, levels and trimming. Pure computation, no I/O.

Resampling filter (`resample`): a rational polyphase FIR. With ``L/M`` the
output/input rate ratio in lowest terms, one Kaiser-windowed sinc low-pass is
designed at the virtual rate ``L * rate_in`` and split into ``L`` phases, so
each output sample costs ``T`` multiply-adds on the input and nothing is
computed for the zeros of the upsampled signal. Band edges are relative to
the slower of the two rates: passband to 0.425 of it (3.4 kHz at 8 kHz,
the telephone band), stopband from 0.5 of it (its Nyquist frequency), 80 dB
of stopband attenuation (Kaiser beta 7.86), length from Kaiser's formula.
Because the stopband starts at the output Nyquist frequency, nothing that
survives the filter can alias (downsampling) or image (upsampling). The
filter is linear phase and its delay is compensated, so output sample ``n``
is the input at time ``n / rate_out``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

RATE = 8000
"""Sample rate of everything the media engine plays and records."""

DBM0_FULL_SCALE = 3.14
"""Level in dBm0 of a full-scale (peak 32767) sine: 0 dBm0 is 3.14 dB below it (G.711)."""


# --------------------------------------------------------------------------
# Resampling


_PASS = 0.425          # passband edge, fraction of the slower rate
_STOP = 0.5            # stopband edge: the slower rate's Nyquist frequency
_ATTEN_DB = 80.0
_MAX_BANK = 1 << 22    # coefficients: odd rates above ~60 kHz, nothing real, exceed it
_BLOCK_OUT = 1 << 16   # output samples per block, bounds temporaries


@dataclass(frozen=True)
class _Bank:
    up: int              # L
    down: int            # M
    taps: int            # T, coefficients per phase
    rows: np.ndarray     # (L, T) float32, each phase reversed for a forward dot product
    phase: np.ndarray    # phase used by outputs n = r (mod L), r = 0..L-1
    base: np.ndarray     # newest input index used by output r


@functools.lru_cache(maxsize=16)
def _bank(rate_in: int, rate_out: int) -> _Bank:
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    fs_up = float(rate_in) * up
    slow = min(rate_in, rate_out)
    f_pass, f_stop = _PASS * slow, _STOP * slow
    beta = 0.1102 * (_ATTEN_DB - 8.7)
    dw = 2 * math.pi * (f_stop - f_pass) / fs_up
    n = int(math.ceil((_ATTEN_DB - 7.95) / (2.285 * dw))) + 1
    n |= 1                                   # odd length: the delay is a whole sample
    taps = -(-n // up)
    if taps * up > _MAX_BANK:
        raise ValueError(f"cannot resample {rate_in} Hz to {rate_out} Hz: "
                         f"the ratio {up}/{down} needs too large a filter bank")
    fc = (f_pass + f_stop) / 2 / fs_up
    center = (n - 1) // 2
    h = 2 * fc * np.sinc(2 * fc * (np.arange(n) - center)) * np.kaiser(n, beta)
    h *= up / h.sum()                        # unity gain at DC after zero stuffing
    h = np.concatenate([h, np.zeros(taps * up - n)])
    rows = np.ascontiguousarray(h.reshape(taps, up).T[:, ::-1], dtype=np.float32)
    r = np.arange(up, dtype=np.int64)
    return _Bank(up, down, taps, rows, (r * down + center) % up, (r * down + center) // up)


def resample_source(read: Callable[[int, int], np.ndarray], n_in: int,
                     rate_in: int, rate_out: int) -> np.ndarray:
    """Resample n_in samples fetched block by block with read(start, stop) -> float32."""
    b = _bank(rate_in, rate_out)
    L, M, T = b.up, b.down, b.taps
    n_out = -(-n_in * L // M)
    out = np.empty(n_out, dtype=np.float32)
    # Blocks start at multiples of L so every block sees the same phase pattern.
    block = L * max(1, _BLOCK_OUT // L)
    base = b.base.tolist()
    phase = b.phase.tolist()
    for na in range(0, n_out, block):
        nb = min(n_out, na + block)
        # Output na + r + k*L reads inputs shift + base[r] + k*M - (T-1) .. shift + base[r] + k*M.
        shift = na * M // L
        last = nb - 1 - na
        lo = shift + base[0] - (T - 1)
        hi = shift + (last // L) * M + base[last % L] + 1
        seg = _fetch(read, n_in, lo, hi)
        for r in range(min(L, nb - na)):
            k = (nb - na - r + L - 1) // L
            start = shift + base[r] - (T - 1) - lo
            # Row k is the input window of output na + r + k*L: a strided view, no copy.
            view = np.ndarray((k, T), np.float32, seg, start * 4, (M * 4, 4))
            out[na + r:nb:L] = view @ b.rows[phase[r]]
    return out


def _fetch(read: Callable[[int, int], np.ndarray], n_in: int, lo: int, hi: int) -> np.ndarray:
    """Samples lo..hi-1 of the source, zero outside 0..n_in-1."""
    a, z = max(lo, 0), min(hi, n_in)
    if lo >= 0 and hi <= n_in:
        return np.ascontiguousarray(read(a, z), dtype=np.float32)
    seg = np.zeros(hi - lo, dtype=np.float32)
    if z > a:
        seg[a - lo:z - lo] = read(a, z)
    return seg


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


def resample(pcm: np.ndarray, rate_in: int, rate_out: int = RATE) -> np.ndarray:
    """Resample mono audio from rate_in to rate_out Hz (see the module docstring for the filter).

    Integer input (int16 scale) gives int16, rounded and clipped; floating input
    gives float32 in the same scale, for callers that round once at the end.
    The output has ceil(len(pcm) * rate_out / rate_in) samples.
    """
    x = np.asarray(pcm)
    if x.ndim != 1:
        raise ValueError(f"resample wants mono (1-D) audio, got shape {x.shape}")
    if rate_in <= 0 or rate_out <= 0:
        raise ValueError(f"sample rates must be positive, got {rate_in} and {rate_out}")
    floating = x.dtype.kind == "f"
    if rate_in == rate_out:
        y = x.astype(np.float32)
    else:
        src = x.astype(np.float32, copy=False)
        y = resample_source(lambda a, z: src[a:z], len(src), int(rate_in), int(rate_out))
    return y if floating else to_int16(y)


# --------------------------------------------------------------------------
# Generated audio and levels


def tone(freq_hz: float, ms: float, level_dbm0: float = -10.0, rate: int = RATE,
         ramp_ms: float = 0.0) -> np.ndarray:
    """A sine of freq_hz lasting ms, at level_dbm0 (0 dBm0 = 3.14 dB below a full-scale sine).

    ramp_ms applies raised-cosine fades at both ends, which keeps the start and
    stop from clicking.
    """
    if not 0 < freq_hz < rate / 2:
        raise ValueError(f"tone frequency {freq_hz} Hz is outside 0..{rate / 2:g} Hz")
    if level_dbm0 > DBM0_FULL_SCALE:
        raise ValueError(f"tone level {level_dbm0} dBm0 is above full scale (+{DBM0_FULL_SCALE} dBm0)")
    n = max(0, int(round(rate * ms / 1000)))
    amp = 32767.0 * 10 ** ((level_dbm0 - DBM0_FULL_SCALE) / 20)
    x = amp * np.sin(2 * np.pi * freq_hz * np.arange(n) / rate)
    k = min(n // 2, int(round(rate * ramp_ms / 1000)))
    if k > 0:
        fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(k) / k)
        x[:k] *= fade
        x[n - k:] *= fade[::-1]
    return to_int16(x)


def beep() -> np.ndarray:
    """The Record verb's beep: 1 kHz for 250 ms at -10 dBm0, with 5 ms fades."""
    return tone(1000.0, 250.0, -10.0, RATE, ramp_ms=5.0)


def silence(ms: float, rate: int = RATE) -> np.ndarray:
    """ms of digital silence."""
    return np.zeros(max(0, int(round(rate * ms / 1000))), dtype=np.int16)


def frame_energy_dbfs(pcm: np.ndarray, frame: int | None = None) -> float | np.ndarray:
    """RMS level in dBFS (a full-scale square wave is 0 dBFS, a full-scale sine -3.01).

    With frame=None the whole array is one measurement and a float is returned;
    otherwise an array with one level per `frame` samples (the last frame may be
    short). Digital silence is -inf.
    """
    x = np.asarray(pcm, dtype=np.float64).reshape(-1)
    if frame is None:
        if len(x) == 0:
            return float("-inf")
        ms = float(np.mean(x * x))
        return 10 * math.log10(ms) - 20 * math.log10(32768.0) if ms > 0 else float("-inf")
    if frame <= 0:
        raise ValueError("frame must be positive")
    n = len(x)
    starts = np.arange(0, n, frame)
    sums = np.add.reduceat(x * x, starts) if n else np.zeros(0)
    counts = np.minimum(frame, n - starts)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(sums / counts) - 20 * math.log10(32768.0)


def trim_silence(pcm: np.ndarray, threshold_dbfs: float = -45.0, frame: int = 160,
                 margin: int = 1) -> np.ndarray:
    """Drop leading and trailing frames quieter than threshold_dbfs (Record trim="trim-silence").

    `margin` quiet frames are kept on each side so soft onsets and decays are
    not clipped. All-quiet audio trims to an empty array. Returns a view.
    """
    x = np.asarray(pcm)
    levels = frame_energy_dbfs(x, frame)
    loud = np.flatnonzero(levels > threshold_dbfs)
    if len(loud) == 0:
        return x[:0]
    first = max(0, int(loud[0]) - margin)
    last = min(len(levels) - 1, int(loud[-1]) + margin)
    return x[first * frame:min(len(x), (last + 1) * frame)]
