"""Pure-numpy reference in-band DTMF detector (ITU-T Q.23 / Q.24).

This is the specification of `ext/dtmf.pyx`; both must report the same
digits at the same onsets for the same input, however it is chunked.

Analysis: a Hann window of 20 ms slides in 5 ms hops (160 / 40 samples at
8 kHz). For every window the DFT is taken at the eight DTMF frequencies and
their second harmonics. The phase advance of a bin between two consecutive
windows measures the tone's frequency offset to a few hertz, which is what
lets the detector accept a 1.5 % deviation yet reject 3.5 % (Q.24 leaves
the band between to the implementation; the limit here is 2.5 %).

A window is a *hit* for a digit when the strongest row and column bins pass:
  level      each tone >= -30 dBm0 (Q.24: operate from 0 to -25 dBm0 per tone)
  neighbour  6 dB above the other bins of its group
  frequency  within 2.5 % of nominal (from the phase advance)
  twist      column up to 9 dB below the row ("normal", 8 dB accepted)
             or up to 5 dB above it ("reverse", 4 dB accepted)
  energy     the two tones carry 88 % of the window's energy (their powers
             corrected for the window's loss at the measured offset)
  harmonic   no second harmonic within 10 dB of either tone
A digit is reported once ON_WINDOWS (4) consecutive hits agree and their
measured frequencies stay within 6 Hz of each other (speech glides, keys do
not). With 5 ms hops and a 20 ms window this accepts tones of 40 ms and
rejects 23 ms (the cut-off is near 28 ms). The digit ends after OFF_WINDOWS (9) windows without it, so a
20 ms dropout (one RTP frame lost or late) keeps the digit while a 40 ms pause ends it.
"""
from __future__ import annotations

import collections

import numpy as np

__all__ = ["DtmfDetector", "ROWS", "COLS", "KEYS", "DBM0_AMPLITUDE"]

ROWS = (697, 770, 852, 941)
COLS = (1209, 1336, 1477, 1633)
KEYS = "123A456B789C*0#D"          # KEYS[4 * row + column]

# G.711 convention: a full-scale sine is +3.14 dBm0, so 0 dBm0 is this peak in 16-bit PCM.
DBM0_AMPLITUDE = 32768.0 * 10.0 ** (-3.14 / 20.0)

FREQ_TOL = 0.025
TWIST_NORMAL_DB = 9.0
TWIST_REVERSE_DB = 5.0
MIN_LEVEL_DBM0 = -30.0
ENERGY_RATIO = 0.88
NEIGHBOUR_DB = 6.0
HARMONIC_DB = 10.0
DRIFT_HZ = 6.0
ON_WINDOWS = 4
OFF_WINDOWS = 9

_NEIGHBOUR = 10.0 ** (NEIGHBOUR_DB / 10.0)
_HARMONIC = 10.0 ** (HARMONIC_DB / 10.0)
_TWIST_NORMAL = 10.0 ** (-TWIST_NORMAL_DB / 10.0)
_TWIST_REVERSE = 10.0 ** (TWIST_REVERSE_DB / 10.0)
_PMIN = (DBM0_AMPLITUDE * 10.0 ** (MIN_LEVEL_DBM0 / 20.0)) ** 2 / 2.0


def hann_gain(d):
    """Amplitude response of a Hann window to a tone `d` bins off centre (1 bin = rate/W)."""
    d = np.asarray(d, dtype=np.float64)
    den = 1.0 - d * d
    safe = np.where(np.abs(den) < 1e-6, 1.0, den)
    return np.where(np.abs(den) < 1e-6, 0.5, np.abs(np.sinc(d) / safe))


class _Config:
    """Tables for one sample rate; the window is 20 ms and the hop 5 ms."""

    def __init__(self, rate: int):
        if rate % 200 or not 4000 <= rate <= 48000:
            raise ValueError("rate must be a multiple of 200 Hz between 4000 and 48000")
        self.rate = rate
        self.W = rate // 50
        self.H = rate // 200
        self.onset_bias = 17 * self.W // 160
        n = np.arange(self.W)
        w = 0.5 - 0.5 * np.cos(2.0 * np.pi * (n + 0.5) / self.W)
        self.freqs = np.array(ROWS + COLS + tuple(2 * f for f in ROWS + COLS), dtype=np.float64)
        om = 2.0 * np.pi * self.freqs / rate
        ang = om[None, :] * n[:, None]
        self.basis = np.concatenate([w[:, None] * np.cos(ang), w[:, None] * np.sin(ang)], axis=1)
        self.w2 = w * w
        self.norm_p = 2.0 / (w.sum() ** 2)      # |X|^2 -> mean power of a sine
        self.norm_e = 1.0 / self.w2.sum()       # windowed energy -> mean power
        self.rot = np.exp(-1j * om[:8] * self.H)  # expected phase advance per hop
        self.theta_max = 2.0 * np.pi * FREQ_TOL * self.freqs[:8] * self.H / rate
        self.hz_per_rad = rate / (2.0 * np.pi * self.H)


def _pcm(pcm) -> np.ndarray:
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        raw = memoryview(pcm).cast("B")
        if raw.nbytes % 2:
            raise ValueError("16-bit PCM needs an even number of bytes")
        return np.frombuffer(raw, dtype="<i2").astype(np.float64)
    arr = np.asarray(pcm)
    if arr.dtype.kind != "i" or arr.dtype.itemsize != 2:
        raise TypeError(f"expected bytes or an int16 array, not {arr.dtype}")
    return arr.reshape(-1).astype(np.float64)


class DtmfDetector:
    """Streaming DTMF detector for one channel of 16-bit linear PCM.

    `feed(pcm)` takes any number of samples (little-endian bytes or an int16
    array) and returns the digits whose detection completed in them, as
    `(digit, onset)` with `onset` the estimated first sample of the tone,
    counted from the start of the stream (or the last `reset()`), within
    about 3 ms (one 5 ms hop later for a tone already present at sample 0).
    Each key press is reported exactly once. One instance serves one
    channel and is not to be fed from two threads at once.
    """

    def __init__(self, rate: int = 8000):
        self._cfg = _Config(rate)
        self.reset()

    @property
    def rate(self) -> int:
        return self._cfg.rate

    def reset(self) -> None:
        """Forget all audio and any digit in progress; onsets restart at 0."""
        self._buf = np.zeros(0, dtype=np.float64)
        self._k = 0                 # index of the next window; it starts at sample k*H
        self._prev = None           # complex DFT of window k-1 at the fundamentals
        self._cand = -1
        self._run = 0
        self._first = 0
        self._on = -1
        self._miss = 0
        self._offs = collections.deque(maxlen=ON_WINDOWS)

    def feed(self, pcm) -> list[tuple[str, int]]:
        """Process more samples; return the newly detected `(digit, onset_sample)` pairs."""
        cfg = self._cfg
        x = _pcm(pcm)
        self._buf = np.concatenate([self._buf, x]) if self._buf.size else x
        if self._buf.size < cfg.W:
            return []
        nwin = (self._buf.size - cfg.W) // cfg.H + 1
        frames = np.lib.stride_tricks.sliding_window_view(self._buf, cfg.W)[::cfg.H][:nwin]
        hits, offs = self._classify(frames)
        first_k = self._k
        self._k += nwin
        self._buf = self._buf[nwin * cfg.H:].copy()
        return self._track(first_k, hits, offs)

    def _classify(self, frames: np.ndarray):
        cfg = self._cfg
        nwin = frames.shape[0]
        y = frames @ cfg.basis
        X = y[:, :16] - 1j * y[:, 16:]
        P = (X.real ** 2 + X.imag ** 2) * cfg.norm_p
        E = (frames * frames) @ cfg.w2 * cfg.norm_e
        prev = np.empty((nwin, 8), dtype=np.complex128)
        prev[1:] = X[:-1, :8]
        prev[0] = self._prev if self._prev is not None else 0.0
        valid = np.ones(nwin, dtype=bool)
        if self._prev is None:
            valid[0] = False        # the first window has no phase reference
        self._prev = X[-1, :8].copy()

        idx = np.arange(nwin)
        r = np.argmax(P[:, :4], axis=1)
        c = np.argmax(P[:, 4:8], axis=1)
        pr = P[idx, r]
        pc = P[idx, 4 + c]
        ok = valid & (pr >= _PMIN) & (pc >= _PMIN)
        # Neighbour check: the other bins of each group, masked where they are the peak.
        rows = P[:, :4].copy()
        rows[idx, r] = 0.0
        cols = P[:, 4:8].copy()
        cols[idx, c] = 0.0
        ok &= (rows.max(axis=1) * _NEIGHBOUR <= pr) & (cols.max(axis=1) * _NEIGHBOUR <= pc)

        # Frequency from the phase advance between consecutive windows.
        lr = X[idx, r] * np.conj(prev[idx, r]) * cfg.rot[r]
        lc = X[idx, 4 + c] * np.conj(prev[idx, 4 + c]) * cfg.rot[4 + c]
        ar = np.arctan2(lr.imag, lr.real)
        ac = np.arctan2(lc.imag, lc.real)
        ok &= (np.abs(ar) <= cfg.theta_max[r]) & (np.abs(ac) <= cfg.theta_max[4 + c])
        dr = ar * cfg.hz_per_rad
        dc = ac * cfg.hz_per_rad

        # Undo the window's loss for the measured offset, so powers are the tones'.
        bin_hz = cfg.rate / cfg.W
        pr_t = pr / hann_gain(dr / bin_hz) ** 2
        pc_t = pc / hann_gain(dc / bin_hz) ** 2
        ok &= (pc_t >= pr_t * _TWIST_NORMAL) & (pc_t <= pr_t * _TWIST_REVERSE)
        ok &= pr_t + pc_t >= ENERGY_RATIO * E

        # Second harmonics. A row's harmonic bin (1394-1882 Hz) also sees the
        # column tone through the window's main lobe; discount that leakage.
        hr = P[idx, 8 + r]
        hc = P[idx, 12 + c]
        fc = cfg.freqs[4 + c] + dc
        leak = np.sqrt(pc_t) * hann_gain((fc - cfg.freqs[8 + r]) / bin_hz)
        hr = np.maximum(np.sqrt(hr) - leak, 0.0) ** 2
        ok &= (hr * _HARMONIC <= pr_t) & (hc * _HARMONIC <= pc_t)

        hits = np.where(ok, 4 * r + c, -1)
        return hits, np.stack([dr, dc], axis=1)

    def _track(self, first_k: int, hits: np.ndarray, offs: np.ndarray) -> list[tuple[str, int]]:
        cfg = self._cfg
        out = []
        for i in range(hits.shape[0]):
            d = int(hits[i])
            k = first_k + i
            if d >= 0 and d == self._cand:
                self._run += 1
            else:
                self._cand = d
                self._run = 1 if d >= 0 else 0
                self._first = k
                self._offs.clear()
            if d >= 0:
                self._offs.append((float(offs[i, 0]), float(offs[i, 1])))
            if self._on >= 0:
                if d == self._on:
                    self._miss = 0
                else:
                    self._miss += 1
                    if self._miss >= OFF_WINDOWS:
                        self._on = -1
            if self._on < 0 and self._cand >= 0 and self._run >= ON_WINDOWS and self._steady():
                self._on = self._cand
                self._miss = 0
                out.append((KEYS[self._cand], self._first * cfg.H + cfg.onset_bias))
        return out

    def _steady(self) -> bool:
        # Both tones' offsets over the last ON_WINDOWS hits lie within DRIFT_HZ.
        r = [o[0] for o in self._offs]
        c = [o[1] for o in self._offs]
        return max(r) - min(r) <= DRIFT_HZ and max(c) - min(c) <= DRIFT_HZ

