"""WAV in and out for Play, Say and Record.

The media engine plays and records 8 kHz 16-bit mono PCM held in numpy int16
arrays (`ext.rtp.Player`, `ext.rtp.Recorder`). `read_wav` takes any PCM, float
or G.711 WAV and resamples it (engine/media/signals.py); the async helpers
(`load_wav`, `write_wav`) keep file I/O and resampling off the event loop
that carries live calls.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import io
import os
import struct
import uuid
import wave
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable, Union

import numpy as np

from engine.media.signals import RATE, resample_source, to_int16

MAX_SECONDS = 3600.0
"""Longest audio file `read_wav` accepts, unless told otherwise per call."""

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]


class AudioError(ValueError):
    """Audio that cannot be read, written or rendered; the message says why."""


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
    except Exception:   # `wave` raises anything (even RuntimeError) on mangled input
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
                    out[a:z] = to_int16(read(a, z))
                return out
            return to_int16(resample_source(read, info.frames, info.rate, RATE))
        except OSError as e:
            raise AudioError(f"{name}: cannot read: {e}") from e
        except AudioError:
            raise
        except ValueError as e:          # a rate pair whose filter bank would be absurd
            raise AudioError(f"{name}: {e}") from e


# --------------------------------------------------------------------------
# Caches shared by load_wav and SpeechCache


class LRU:
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


async def shared_load(inflight: dict, key: Hashable, factory: Callable[[], Awaitable[np.ndarray]]) -> np.ndarray:
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


def readonly(pcm: np.ndarray) -> np.ndarray:
    pcm.flags.writeable = False      # cached arrays are shared between calls
    return pcm


_wav_cache = LRU(max_items=32, max_bytes=64 << 20)
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
            _wav_cache.put(key, readonly(out))
            return out
        pcm = await shared_load(_wav_loads, key, load)
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
    return to_int16(x)


def write_wav_sync(path: str, pcm: np.ndarray, rate: int) -> None:
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
        await loop.run_in_executor(None, write_wav_sync, os.fspath(path), x, int(rate))
    except OSError as e:
        raise AudioError(f"{os.fspath(path)}: cannot write: {e.strerror or e}") from e
