"""Pure-numpy reference N-1 ("mix-minus") conference mixer.

This is the specification that `ext/mix.pyx` must match bit for bit. Once
per media tick every participant hears the sum of all other talkers,
saturated to int16 (clipped, never wrapped) and encoded in its own law. The
sum of every talker is taken once in int32 and each talker's own frame is
subtracted from it, so a tick is O(N) frames; everyone who is not talking
hears the same clipped sum.

A talker is a participant that is neither muted nor listen-only and put a
frame this tick; anyone else contributes silence. Laws: "pcm" (16-bit
little-endian linear), "ulaw" and "alaw" (G.711, one byte per sample).
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from ext import g711_py as g711

__all__ = ["Conference", "mix_minus", "LAWS", "MAX_PARTICIPANTS_LIMIT"]

LAWS = ("pcm", "ulaw", "alaw")
# int32 accumulation of this many full-scale talkers cannot overflow.
MAX_PARTICIPANTS_LIMIT = 65535

_DECODE = {"ulaw": g711.ulaw_decode, "alaw": g711.alaw_decode}
_ENCODE = {"ulaw": g711.ulaw_encode, "alaw": g711.alaw_encode}


@dataclass
class _Participant:
    law: str
    muted: bool
    listen_only: bool
    slot: int
    frame: np.ndarray | None = None   # this tick's decoded input, int16


def _saturate(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -32768, 32767).astype(np.int16)


def _encoded(pcm: np.ndarray, law: str) -> bytes:
    if law == "pcm":
        return pcm.astype("<i2", copy=False).tobytes()
    return _ENCODE[law](pcm)


class Conference:
    """One conference: up to max_participants parties, frames of `frame` samples.

    Each tick, put() every participant's input that arrived, then mix() once:
    everyone hears the sum of all other active participants, saturated to
    int16 and encoded in their own law ("pcm": 16-bit little-endian linear,
    "ulaw"/"alaw": G.711, one byte per sample).  Muted and listen-only
    participants contribute nothing but hear everyone; a participant that
    put nothing this tick contributes silence.  Not thread-safe.
    """

    def __init__(self, max_participants: int = 64, frame: int = 160) -> None:
        if not 1 <= max_participants <= MAX_PARTICIPANTS_LIMIT:
            raise ValueError(f"max_participants must be between 1 and {MAX_PARTICIPANTS_LIMIT}, "
                             f"not {max_participants}")
        if frame < 1:
            raise ValueError(f"frame must be at least 1 sample, not {frame}")
        self.max_participants = max_participants
        self.frame = frame
        # dicts keep insertion order: participants() and mix() list in joining order.
        self._parts: dict[Hashable, _Participant] = {}

    def add(self, pid: Hashable, law: str = "pcm", muted: bool = False,
            listen_only: bool = False) -> int:
        """Add participant PID speaking and hearing LAW ("pcm", "ulaw" or "alaw").

        Returns its slot: the lowest index in [0, max_participants) no one
        holds, the index the C-level API of ext/mix.pxd takes.  Raises ValueError if PID is already in, LAW is unknown or
        the conference already has max_participants participants.
        """
        if pid in self._parts:
            raise ValueError(f"participant {pid!r} is already in the conference")
        if law not in LAWS:
            raise ValueError(f"unknown law {law!r}: expected one of {', '.join(LAWS)}")
        if len(self._parts) >= self.max_participants:
            raise ValueError(f"conference is full: max_participants={self.max_participants}")
        held = {p.slot for p in self._parts.values()}
        slot = next(s for s in range(self.max_participants) if s not in held)
        self._parts[pid] = _Participant(law, bool(muted), bool(listen_only), slot)
        return slot

    def _get(self, pid: Hashable) -> _Participant:
        try:
            return self._parts[pid]
        except KeyError:
            raise KeyError(f"no participant {pid!r} in the conference") from None

    def remove(self, pid: Hashable) -> None:
        """Take participant PID out; KeyError if it is not in the conference."""
        self._get(pid)
        del self._parts[pid]

    def slot(self, pid: Hashable) -> int:
        """The slot of participant PID; KeyError if it is not in the conference."""
        return self._get(pid).slot

    def set_muted(self, pid: Hashable, muted: bool) -> None:
        """Mute or unmute PID: while muted it contributes nothing but still hears."""
        self._get(pid).muted = bool(muted)

    def set_listen_only(self, pid: Hashable, listen_only: bool) -> None:
        """Make PID listen-only (contributes nothing, hears everyone) or a talker again."""
        self._get(pid).listen_only = bool(listen_only)

    def is_muted(self, pid: Hashable) -> bool:
        """Whether PID is muted."""
        return self._get(pid).muted

    def is_listen_only(self, pid: Hashable) -> bool:
        """Whether PID is listen-only."""
        return self._get(pid).listen_only

    def law(self, pid: Hashable) -> str:
        """PID's law: "pcm", "ulaw" or "alaw"."""
        return self._get(pid).law

    def participants(self) -> list:
        """Participant ids in joining order."""
        return list(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def __contains__(self, pid: object) -> bool:
        return pid in self._parts

    def put(self, pid: Hashable, frame) -> None:
        """Give PID's input for this tick; a second put() in the same tick replaces it.

        For "ulaw"/"alaw" participants FRAME is `frame` bytes of G.711; for
        "pcm" it is 2 * `frame` bytes of little-endian int16 or an int16
        array of `frame` samples.  ValueError on a wrong length, TypeError on
        a PCM array that is not int16.
        """
        p = self._get(pid)
        if p.law != "pcm":
            n = memoryview(frame).cast("B").nbytes
            if n != self.frame:
                raise ValueError(f"participant {pid!r}: a {p.law} frame is {self.frame} bytes, "
                                 f"got {n}")
            p.frame = np.frombuffer(_DECODE[p.law](frame), dtype="<i2").astype(np.int16)
            return
        if isinstance(frame, (bytes, bytearray, memoryview)):
            raw = memoryview(frame).cast("B")
            if raw.nbytes != 2 * self.frame:
                raise ValueError(f"participant {pid!r}: a pcm frame is {2 * self.frame} bytes "
                                 f"({self.frame} samples), got {raw.nbytes} bytes")
            p.frame = np.frombuffer(raw, dtype="<i2").astype(np.int16)
            return
        arr = np.asarray(frame)
        if arr.dtype.kind != "i" or arr.dtype.itemsize != 2:
            raise TypeError(f"participant {pid!r}: pcm frames are bytes or an int16 array, "
                            f"not {arr.dtype}")
        if arr.size != self.frame:
            raise ValueError(f"participant {pid!r}: a pcm frame is {self.frame} samples, "
                             f"got {arr.size}")
        # A copy: the caller may reuse its buffer before mix().
        p.frame = arr.reshape(-1).astype(np.int16, copy=True)

    def mix(self) -> dict:
        """Mix this tick and clear the inputs: {pid: bytes heard, in pid's law}."""
        talkers = {pid for pid, p in self._parts.items()
                   if p.frame is not None and not p.muted and not p.listen_only}
        total = np.zeros(self.frame, dtype=np.int32)
        for pid in talkers:
            total += self._parts[pid].frame
        heard_by_all = _saturate(total)
        shared: dict[str, bytes] = {}
        result = {}
        for pid, p in self._parts.items():
            if pid in talkers:
                # The sum is exact in int32, so removing oneself before
                # clipping gives the same result as summing the others.
                result[pid] = _encoded(_saturate(total - p.frame), p.law)
            else:
                if p.law not in shared:
                    shared[p.law] = _encoded(heard_by_all, p.law)
                result[pid] = shared[p.law]
            p.frame = None
        return result


def mix_minus(frames, active) -> np.ndarray:
    """Mix-minus of a block: out[i] = int16-saturated sum of frames[j] for active j != i.

    FRAMES is an int16 array [N, F], ACTIVE a boolean array [N]; an inactive
    row contributes nothing but still gets the sum of all active rows.
    Returns a new int16 array [N, F].
    """
    f = np.asarray(frames)
    if f.dtype != np.int16:
        raise TypeError(f"frames must be an int16 array, not {f.dtype}")
    if f.ndim != 2:
        raise ValueError(f"frames must be 2-dimensional [participants, samples], not {f.shape}")
    a = np.asarray(active, dtype=np.bool_)
    if a.shape != (f.shape[0],):
        raise ValueError(f"active must have shape ({f.shape[0]},) to match frames, not {a.shape}")
    own = np.where(a[:, None], f.astype(np.int32), 0)
    total = own.sum(axis=0, dtype=np.int32)
    return _saturate(total[None, :] - own)
