"""Audio for Play, Say and Record: WAV in and out, resampling, tones, speech.

The media engine plays and records 8 kHz 16-bit mono PCM held in numpy int16
arrays (`ext.rtp.Player`, `ext.rtp.Recorder`). Everything here either is pure
computation on such arrays or, for the async helpers, keeps file I/O,
resampling and external programs off the event loop that carries live calls.

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

import asyncio
import collections
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import struct
import threading
import uuid
import wave
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable, Union

import numpy as np

__all__ = [
    "AudioError", "RATE", "MAX_SECONDS", "DBM0_FULL_SCALE",
    "read_wav", "load_wav", "write_wav", "resample",
    "tone", "beep", "silence", "trim_silence", "frame_energy_dbfs",
    "SpeechCache", "espeak_voice",
]

log = logging.getLogger("baton.media.audio")

RATE = 8000
"""Sample rate of everything the media engine plays and records."""

MAX_SECONDS = 3600.0
"""Longest audio file `read_wav` accepts, unless told otherwise per call."""

DBM0_FULL_SCALE = 3.14
"""Level in dBm0 of a full-scale (peak 32767) sine: 0 dBm0 is 3.14 dB below it (G.711)."""

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]


class AudioError(ValueError):
    """Audio that cannot be read, written or rendered; the message says why."""


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


def _resample_source(read: Callable[[int, int], np.ndarray], n_in: int,
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


def _to_int16(x: np.ndarray) -> np.ndarray:
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
        y = _resample_source(lambda a, z: src[a:z], len(src), int(rate_in), int(rate_out))
    return y if floating else _to_int16(y)


# --------------------------------------------------------------------------
# Reading WAV files


_PCM, _FLOAT, _ALAW, _ULAW, _EXTENSIBLE = 1, 3, 6, 7, 0xFFFE
_FORMAT_NAMES = {_PCM: "PCM", _FLOAT: "IEEE float", _ALAW: "A-law", _ULAW: "mu-law"}
_READ_FRAMES = 1 << 20


@dataclass
class _WavInfo:
    tag: int
    channels: int
    rate: int
    width: int           # bytes per sample of one channel
    offset: int          # file offset of the first sample
    frames: int


def _g711(name: str) -> Callable[[bytes], object]:
    from ext.kernels import g711

    return getattr(g711, name)


def _g711_to_float(raw: bytes, tag: int) -> np.ndarray:
    pcm = _g711("ulaw_decode" if tag == _ULAW else "alaw_decode")(raw)
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        return np.frombuffer(pcm, dtype="<i2").astype(np.float32)
    return np.asarray(pcm).astype(np.float32)


def _decode(raw: bytes, info: _WavInfo) -> np.ndarray:
    """Whole frames of raw sample data to float32 mono in int16 scale."""
    w, tag = info.width, info.tag
    if tag in (_ULAW, _ALAW):
        x = _g711_to_float(raw, tag)
    elif tag == _FLOAT:
        f = np.frombuffer(raw, dtype="<f4" if w == 4 else "<f8")
        # NaN and infinities would turn into arbitrary int16 values; overs just clip later.
        f = np.clip(np.nan_to_num(f, nan=0.0, posinf=1.0, neginf=-1.0), -8.0, 8.0)
        x = (f * 32768.0).astype(np.float32)
    elif w == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) * 256.0
    elif w == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32)
    elif w == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v & 0x800000, v - 0x1000000, v)
        x = v.astype(np.float32) / 256.0
    else:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 65536.0
    if info.channels > 1:
        # The mean rather than the sum: a full-scale stereo file must not clip.
        x = x.reshape(-1, info.channels).mean(axis=1, dtype=np.float32)
    return x


def _parse_riff(f: io.BufferedIOBase, size: int, name: str) -> _WavInfo:
    """Walk the RIFF chunks for what `wave` rejects: G.711, float, WAVE_FORMAT_EXTENSIBLE."""
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        if head[:4] == b"RIFX":
            raise AudioError(f"{name}: big-endian WAV (RIFX) is not supported")
        raise AudioError(f"{name}: not a WAV file (no RIFF/WAVE header)")
    fmt = None
    pos = 12
    while True:
        f.seek(pos)
        ch = f.read(8)
        if len(ch) < 8:
            break
        cid, csize = ch[:4], struct.unpack("<I", ch[4:])[0]
        if cid == b"fmt ":
            fmt = f.read(min(csize, 64))
            if len(fmt) < 16:
                raise AudioError(f"{name}: truncated fmt chunk")
        elif cid == b"data":
            if fmt is None:
                raise AudioError(f"{name}: data chunk before fmt chunk")
            return _fmt_info(fmt, pos + 8, min(csize, size - pos - 8), name)
        pos += 8 + csize + (csize & 1)       # chunks are padded to even sizes
    if fmt is None:
        raise AudioError(f"{name}: no fmt chunk")
    raise AudioError(f"{name}: no data chunk")


def _fmt_info(fmt: bytes, offset: int, nbytes: int, name: str) -> _WavInfo:
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == _EXTENSIBLE:
        if len(fmt) < 40:
            raise AudioError(f"{name}: truncated WAVE_FORMAT_EXTENSIBLE fmt chunk")
        # The sub-format GUID starts with the ordinary format tag.
        tag = struct.unpack("<H", fmt[24:26])[0]
    width = (bits + 7) // 8
    return _check_info(_WavInfo(tag, channels, rate, width, offset, 0), nbytes, name)


def _check_info(info: _WavInfo, nbytes: int, name: str) -> _WavInfo:
    fmt = _FORMAT_NAMES.get(info.tag)
    if fmt is None:
        raise AudioError(f"{name}: unsupported WAV format tag {info.tag:#06x} "
                         "(PCM, IEEE float, mu-law and A-law are supported)")
    widths = {_PCM: (1, 2, 3, 4), _FLOAT: (4, 8), _ALAW: (1,), _ULAW: (1,)}[info.tag]
    if info.width not in widths:
        raise AudioError(f"{name}: unsupported {fmt} sample size {info.width * 8} bits")
    if not 1 <= info.channels <= 64:
        raise AudioError(f"{name}: bad channel count {info.channels}")
    if not 1000 <= info.rate <= 768000:
        raise AudioError(f"{name}: unsupported sample rate {info.rate} Hz")
    info.frames = max(nbytes, 0) // (info.channels * info.width)
    return info


def _probe(f: io.BufferedIOBase, size: int, name: str) -> _WavInfo:
    try:
        w = wave.open(f, "rb")
    except Exception:
        # Anything `wave` cannot take (other formats, odd chunk sizes) gets the
        # stricter parser below, which also says precisely what is wrong.
        f.seek(0)
        return _parse_riff(f, size, name)
    # `wave` stops right after the data chunk header, so this is where samples begin.
    offset = f.tell()
    info = _WavInfo(_PCM, w.getnchannels(), w.getframerate(), w.getsampwidth(), offset, 0)
    # Streamed WAVs declare a huge data size: believe the file, not the header.
    nbytes = min(w.getnframes() * w.getnchannels() * w.getsampwidth(), size - offset)
    return _check_info(info, nbytes, name)


def _open(src: PathOrBytes) -> tuple[io.BufferedIOBase, int, str]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        return io.BytesIO(data), len(data), "WAV data"
    path = os.fspath(src)
    try:
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise AudioError(f"{path}: cannot read: {e.strerror or e}") from e
    return f, size, path


def read_wav(src: PathOrBytes, *, max_seconds: float | None = None) -> np.ndarray:
    """Decode a WAV file (path or bytes) to 8 kHz mono int16.

    Reads 8-bit unsigned, 16-, 24- and 32-bit PCM, 32/64-bit float, mu-law and
    A-law, plain or WAVE_FORMAT_EXTENSIBLE, any channel count (averaged to
    mono) and any sample rate from 1 kHz to 768 kHz (resampled to 8 kHz).
    Files longer than max_seconds (default `MAX_SECONDS`) are refused from
    the header, before any sample is decoded. Raises AudioError for anything
    unreadable. This is blocking: from the event loop use `load_wav`.
    """
    limit = MAX_SECONDS if max_seconds is None else max_seconds
    f, size, name = _open(src)
    with f:
        try:
            info = _probe(f, size, name)
        except OSError as e:
            raise AudioError(f"{name}: cannot read: {e}") from e
        if info.frames == 0:
            raise AudioError(f"{name}: no audio samples")
        seconds = info.frames / info.rate
        if seconds > limit:
            raise AudioError(f"{name}: {seconds:.1f} s long, longer than the {limit:g} s limit")
        frame_bytes = info.channels * info.width

        def read(a: int, z: int) -> np.ndarray:
            f.seek(info.offset + a * frame_bytes)
            raw = f.read((z - a) * frame_bytes)
            if len(raw) != (z - a) * frame_bytes:
                raise AudioError(f"{name}: file changed or truncated while reading")
            return _decode(raw, info)

        try:
            if info.rate == RATE:
                out = np.empty(info.frames, dtype=np.int16)
                for a in range(0, info.frames, _READ_FRAMES):
                    z = min(info.frames, a + _READ_FRAMES)
                    out[a:z] = _to_int16(read(a, z))
                return out
            return _to_int16(_resample_source(read, info.frames, info.rate, RATE))
        except OSError as e:
            raise AudioError(f"{name}: cannot read: {e}") from e
        except AudioError:
            raise
        except ValueError as e:          # a rate pair whose filter bank would be absurd
            raise AudioError(f"{name}: {e}") from e


# --------------------------------------------------------------------------
# Caches shared by load_wav and SpeechCache


class _LRU:
    """Least recently used arrays, bounded by count and by total bytes.

    Arrays over a quarter of the byte budget are not kept: one long file
    would otherwise push out everything else.
    """

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: collections.OrderedDict[Hashable, np.ndarray] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        v = self._items.get(key)
        if v is not None:
            self._items.move_to_end(key)
        return v

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes // 4 or self.max_items <= 0:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._items[key] = value
        self._bytes += value.nbytes
        while len(self._items) > self.max_items or self._bytes > self.max_bytes:
            _, v = self._items.popitem(last=False)
            self._bytes -= v.nbytes

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


def _settle(inflight: dict, key: Hashable, task: asyncio.Task) -> None:
    if inflight.get(key) is task:
        del inflight[key]
    if not task.cancelled():
        task.exception()        # retrieved here, so a failure nobody awaits is not reported


async def _shared(inflight: dict, key: Hashable, factory: Callable[[], Awaitable[np.ndarray]]) -> np.ndarray:
    """Await the one task producing `key`, starting it if nobody has.

    Callers are shielded from each other: one caller being cancelled does not
    cancel the work the others wait for.
    """
    loop = asyncio.get_running_loop()
    task = inflight.get(key)
    if task is None or task.get_loop() is not loop:
        task = loop.create_task(factory())
        inflight[key] = task
        task.add_done_callback(functools.partial(_settle, inflight, key))
    return await asyncio.shield(task)


def _readonly(pcm: np.ndarray) -> np.ndarray:
    pcm.flags.writeable = False      # cached arrays are shared between calls
    return pcm


_wav_cache = _LRU(max_items=32, max_bytes=64 << 20)
_wav_loads: dict[Hashable, asyncio.Task] = {}


async def load_wav(path: str | os.PathLike[str], loop: asyncio.AbstractEventLoop | None = None,
                   *, max_seconds: float | None = None) -> np.ndarray:
    """`read_wav` in the loop's default executor, cached by (path, mtime, size).

    The result is read-only and shared with other callers; copy it to modify.
    Concurrent loads of the same file decode it once.
    """
    loop = loop or asyncio.get_running_loop()
    limit = MAX_SECONDS if max_seconds is None else max_seconds
    name = os.path.abspath(os.fspath(path))
    try:
        st = await loop.run_in_executor(None, os.stat, name)
    except OSError as e:
        raise AudioError(f"{name}: cannot read: {e.strerror or e}") from e
    key = (name, st.st_mtime_ns, st.st_size)
    pcm = _wav_cache.get(key)
    if pcm is None:
        async def load() -> np.ndarray:
            # The file's own limit check uses the largest limit so one cache entry serves all callers.
            out = await loop.run_in_executor(None, functools.partial(read_wav, name, max_seconds=max(limit, MAX_SECONDS)))
            _wav_cache.put(key, _readonly(out))
            return out
        pcm = await _shared(_wav_loads, key, load)
    if len(pcm) > limit * RATE:
        raise AudioError(f"{name}: {len(pcm) / RATE:.1f} s long, longer than the {limit:g} s limit")
    return pcm


# --------------------------------------------------------------------------
# Writing


def _as_int16(pcm: object) -> np.ndarray:
    x = np.asarray(pcm)
    if x.ndim != 1:
        raise AudioError(f"expected mono (1-D) audio, got shape {x.shape}")
    if x.dtype == np.int16:
        return x
    if x.dtype.kind not in "iuf":
        raise AudioError(f"expected numeric samples, got {x.dtype}")
    return _to_int16(x)


def _write_wav_sync(path: str, pcm: np.ndarray, rate: int) -> None:
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    # O_EXCL on a fresh name, mode left to the umask as for any other file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            with wave.open(f, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(rate)
                w.writeframes(pcm.astype("<i2", copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


async def write_wav(path: str | os.PathLike[str], pcm: np.ndarray, rate: int = RATE) -> None:
    """Write 16-bit mono WAV in the default executor, atomically (temp file, then rename).

    Missing directories are created. Non-int16 samples are rounded and clipped.
    The array must not change until the write completes.
    """
    if not 1 <= rate <= 0xFFFFFFFF:
        raise AudioError(f"bad sample rate {rate}")
    x = _as_int16(pcm)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, _write_wav_sync, os.fspath(path), x, int(rate))
    except OSError as e:
        raise AudioError(f"{os.fspath(path)}: cannot write: {e.strerror or e}") from e


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
    return _to_int16(x)


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


# --------------------------------------------------------------------------
# Speech


_TWILIO_VOICES = {"man": "m3", "woman": "f3", "alice": "f2"}

# Polly and Google voice names: (gender, language). The name says the language.
_POLLY = {
    "joanna": ("f", "en-US"), "kendra": ("f", "en-US"), "kimberly": ("f", "en-US"),
    "salli": ("f", "en-US"), "ivy": ("f", "en-US"), "ruth": ("f", "en-US"),
    "joey": ("m", "en-US"), "justin": ("m", "en-US"), "kevin": ("m", "en-US"),
    "matthew": ("m", "en-US"), "stephen": ("m", "en-US"),
    "amy": ("f", "en-GB"), "emma": ("f", "en-GB"), "brian": ("m", "en-GB"), "arthur": ("m", "en-GB"),
    "nicole": ("f", "en-AU"), "olivia": ("f", "en-AU"), "russell": ("m", "en-AU"),
    "marlene": ("f", "de-DE"), "vicki": ("f", "de-DE"), "hans": ("m", "de-DE"), "daniel": ("m", "de-DE"),
    "celine": ("f", "fr-FR"), "céline": ("f", "fr-FR"), "lea": ("f", "fr-FR"), "léa": ("f", "fr-FR"),
    "mathieu": ("m", "fr-FR"), "remi": ("m", "fr-FR"), "rémi": ("m", "fr-FR"),
    "conchita": ("f", "es-ES"), "lucia": ("f", "es-ES"), "enrique": ("m", "es-ES"), "sergio": ("m", "es-ES"),
}

_LANGUAGES = {
    "en": "en-us", "en-us": "en-us", "en-gb": "en-gb", "en-au": "en-gb", "en-in": "en-gb",
    "de": "de", "de-de": "de", "fr": "fr", "fr-fr": "fr", "fr-ca": "fr",
    "es": "es", "es-es": "es", "es-mx": "es-419", "es-us": "es-419",
}

_VOICE_RE = re.compile(r"[a-z]{2,3}(-[a-z0-9]{1,8})*")
_VARIANT_RE = re.compile(r"[A-Za-z0-9_]{1,32}")


def _language(language: str) -> str:
    tag = language.strip().replace("_", "-").lower()
    v = _LANGUAGES.get(tag, tag)
    if not _VOICE_RE.fullmatch(v):
        raise AudioError(f"unknown language {language!r}")
    return v


def espeak_voice(voice: str = "en", language: str | None = None) -> str:
    """The espeak-ng voice (``-v``) for a Twilio-style voice and language.

    "man", "woman" and "alice" are espeak-ng variants (en+m3, en+f3, en+f2) of
    the language, which defaults to US English as in TwiML. "Polly.<Name>"
    and "Google.<lang>-..." carry their own language, and a gender picks m3 or
    f3. Anything else is taken as an espeak-ng voice ("en", "de", "en-us+f4");
    with a language given, its language part is replaced and its variant kept.
    Languages are BCP 47 tags ("en-US", "en-GB", "de-DE", "fr-FR", "es-ES"
    map to en-us, en-gb, de, fr, es; other tags are tried lower-cased).
    """
    v = voice.strip()
    low = v.lower()
    if low in _TWILIO_VOICES:
        return f"{_language(language or 'en-US')}+{_TWILIO_VOICES[low]}"
    if low.startswith("polly."):
        name = low[6:].split("-")[0]              # "Polly.Joanna-Neural" is Joanna
        gender, lang = _POLLY.get(name, ("f", language or "en-US"))
        return f"{_language(lang)}+{'m3' if gender == 'm' else 'f3'}"
    if low.startswith("google."):
        # Google.en-US-Standard-C: the language is the first two parts.
        parts = v[7:].split("-")
        lang = "-".join(parts[:2]) if len(parts) >= 2 else (language or "en-US")
        return f"{_language(lang)}+f3"
    base, _, variant = low.partition("+")
    variant = v.partition("+")[2]                 # variant file names are case-sensitive
    if language:
        base = _language(language)
    if not _VOICE_RE.fullmatch(base) or (variant and not _VARIANT_RE.fullmatch(variant)):
        raise AudioError(f"unknown voice {voice!r}")
    return f"{base}+{variant}" if variant else base


_CACHE_FORMAT = 1     # bump when rendering changes, so old cache files are not reused
_NO_VOICE = b"voice does not exist"


async def _run(cmd: list[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
    """Run a program without blocking the loop; kill it on timeout or cancellation."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        raise AudioError(f"cannot run {cmd[0]}: {e.strerror or e}") from e
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AudioError(f"{cmd[0]} took longer than {timeout:g} s") from None
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        raise
    return proc.returncode or 0, out, err


class SpeechCache:
    """Text to 8 kHz speech with espeak-ng, cached on disk and in memory.

    Rendered audio is stored as an 8 kHz WAV named by a hash of (text, espeak
    voice, rate, pitch) in cache_dir; the most recent results are also kept in
    memory. Identical concurrent requests share one rendering; at most
    max_concurrent espeak-ng processes run at once. The files on disk are
    bounded by `disk_bytes`: past it the least recently used go first (any
    caller's text lands here, so an unbounded cache would fill the disk).
    Counters: `characters`
    (text characters rendered by espeak-ng, i.e. cache misses), `renders`
    (espeak-ng runs) and `hits` (requests served from a cache).
    """

    def __init__(self, cache_dir: str | os.PathLike[str], max_concurrent: int = 2,
                 espeak: str = "espeak-ng", *, timeout: float = 30.0, max_chars: int = 4000,
                 memory_items: int = 64, memory_bytes: int = 32 << 20,
                 disk_bytes: int = 64 << 20) -> None:
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        self.disk_bytes = disk_bytes
        self._disk: collections.OrderedDict | None = None   # file name -> size, oldest first
        self._disk_total = 0
        self._disk_lock = threading.Lock()
        self.espeak = espeak
        self.timeout = timeout
        self.max_chars = max_chars
        self.characters = 0
        self.renders = 0
        self.hits = 0
        self._sem = asyncio.Semaphore(max_concurrent)
        self._memory = _LRU(memory_items, memory_bytes)
        self._inflight: dict[Hashable, asyncio.Task] = {}
        self._variants: frozenset[str] | None = None

    def path_for(self, text: str, voice: str = "en", rate_wpm: int = 160,
                 pitch: int | None = None, language: str | None = None) -> str:
        """The cache file a request is (or would be) stored in."""
        return os.path.join(self.cache_dir, self._key(text, espeak_voice(voice, language), rate_wpm, pitch) + ".wav")

    @staticmethod
    def _key(text: str, voice: str, rate: int, pitch: int | None) -> str:
        blob = json.dumps([_CACHE_FORMAT, text, voice, rate, pitch], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:40]

    async def say(self, text: str, voice: str = "en", rate_wpm: int = 160,
                  pitch: int | None = None, language: str | None = None) -> np.ndarray:
        """Speech for text as 8 kHz int16 (read-only, shared: copy to modify).

        voice and language are mapped by `espeak_voice`. rate_wpm is 80..450,
        pitch 0..99 (espeak-ng's default 50 when None). Raises AudioError for
        empty or over-long text, an unknown voice, or a failed or timed-out
        rendering.
        """
        if not isinstance(text, str) or not text.strip():
            raise AudioError("nothing to say: empty text")
        if len(text) > self.max_chars:
            raise AudioError(f"text is {len(text)} characters, over the {self.max_chars} limit")
        if not 80 <= rate_wpm <= 450:
            raise AudioError(f"speaking rate {rate_wpm} wpm is outside 80..450")
        if pitch is not None and not 0 <= pitch <= 99:
            raise AudioError(f"pitch {pitch} is outside 0..99")
        ev = espeak_voice(voice, language)
        key = self._key(text, ev, int(rate_wpm), pitch)
        pcm = self._memory.get(key)
        if pcm is not None:
            self.hits += 1
            return pcm
        return await _shared(self._inflight, key,
                             lambda: self._fetch(key, text, voice, ev, int(rate_wpm), pitch))

    async def _fetch(self, key: str, text: str, voice: str, ev: str, rate: int,
                     pitch: int | None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        path = os.path.join(self.cache_dir, key + ".wav")
        pcm = await loop.run_in_executor(None, _read_cached, path)
        if pcm is not None:
            self.hits += 1
            await loop.run_in_executor(None, self._disk_used, path)
        else:
            pcm = await self._render(text, voice, ev, rate, pitch, key)
            try:
                await loop.run_in_executor(None, _write_wav_sync, path, pcm, RATE)
                await loop.run_in_executor(None, self._disk_used, path)
            except OSError as e:
                # Still playable; only the disk cache misses out.
                log.warning("speech cache: cannot write %s: %s", path, e)
        self._memory.put(key, _readonly(pcm))
        return pcm

    def _disk_used(self, path: str) -> None:
        """Note a use of a cache file and remove the least recently used ones past
        `disk_bytes` (runs off the loop)."""
        with self._disk_lock:
            if self._disk is None:
                entries = []
                with os.scandir(self.cache_dir) as it:
                    for e in it:
                        if e.name.endswith(".wav") and not e.name.startswith("."):
                            st = e.stat()
                            entries.append((st.st_mtime_ns, e.name, st.st_size))
                self._disk = collections.OrderedDict((n, s) for _, n, s in sorted(entries))
                self._disk_total = sum(self._disk.values())
            name = os.path.basename(path)
            try:
                size = os.stat(path).st_size
            except OSError:
                return
            self._disk_total += size - self._disk.pop(name, 0)
            self._disk[name] = size
            while self._disk_total > self.disk_bytes and len(self._disk) > 1:
                old, old_size = self._disk.popitem(last=False)
                self._disk_total -= old_size
                try:
                    os.unlink(os.path.join(self.cache_dir, old))
                except OSError:
                    pass

    async def _render(self, text: str, voice: str, ev: str, rate: int, pitch: int | None,
                      key: str) -> np.ndarray:
        await self._check_variant(voice, ev)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, functools.partial(os.makedirs, self.cache_dir, exist_ok=True))
        tmp = os.path.join(self.cache_dir, f".render-{key}-{uuid.uuid4().hex}.wav")
        cmd = [self.espeak, "-v", ev, "-s", str(rate)]
        if pitch is not None:
            cmd += ["-p", str(int(pitch))]
        # Text on stdin, not argv: it stays out of `ps` and cannot look like an option.
        cmd += ["-w", tmp, "--stdin"]
        try:
            async with self._sem:
                self.renders += 1
                rc, _, err = await _run(cmd, text.encode("utf-8"), self.timeout)
            if rc != 0:
                if _NO_VOICE in err:
                    raise AudioError(f"unknown voice {voice!r}: espeak-ng has no voice {ev!r}")
                detail = err.decode("utf-8", "replace").strip()[-300:]
                raise AudioError(f"espeak-ng failed (exit {rc}) for voice {ev!r}: {detail}")
            try:
                pcm = await loop.run_in_executor(None, read_wav, tmp)
            except AudioError as e:
                raise AudioError(f"espeak-ng output unreadable: {e}") from None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self.characters += len(text)
        return pcm

    async def _check_variant(self, voice: str, ev: str) -> None:
        # espeak-ng silently ignores an unknown "+variant" and speaks with the
        # default one, so check variants against the installed list.
        variant = ev.partition("+")[2]
        if not variant:
            return
        if self._variants is None:
            try:
                rc, out, _ = await _run([self.espeak, "--voices=variant"], None, self.timeout)
            except AudioError:
                rc, out = 1, b""
            names = re.findall(rb"!v/(\S+)", out) if rc == 0 else []
            # An empty list means espeak-ng could not tell us: do not block on it.
            self._variants = frozenset(n.decode() for n in names)
        if self._variants and variant not in self._variants:
            raise AudioError(f"unknown voice {voice!r}: espeak-ng has no variant {variant!r}")


def _read_cached(path: str) -> np.ndarray | None:
    """A cached rendering, or None when absent or unusable (an unusable one is removed)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("speech cache: cannot read %s: %s", path, e)
        return None
    try:
        return read_wav(data)
    except AudioError as e:
        log.warning("speech cache: discarding %s: %s", path, e)
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
