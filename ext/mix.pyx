"""N-1 ("mix-minus") conference mixer.

Bit-exact twin of `ext/mix_py.py`.  Once per media tick every
participant hears the sum of all other talkers, saturated to int16 and
encoded in its own law.  The full sum is accumulated once in int32 and each
talker's own frame is subtracted from it, so a tick costs O(N) frames, not
O(N^2); everyone who is not talking hears the same clipped sum, which is
computed and encoded once per law.

G.711 conversion comes from `ext.g711`; the C-level API for media loops is
declared and documented in `ext/mix.pxd`.
"""
import sys

import numpy

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int16_t, int32_t, uint8_t, uint16_t
from libc.string cimport memcpy, memset

from ext.g711 cimport (alaw_decode_buffer, alaw_encode_buffer, ulaw_decode_buffer,
                       ulaw_encode_buffer)

__all__ = ["Conference", "mix_minus", "LAWS", "MAX_PARTICIPANTS_LIMIT"]

LAWS = ("pcm", "ulaw", "alaw")   # index = LAW_* code
_LAW_CODE = {"pcm": LAW_PCM, "ulaw": LAW_ULAW, "alaw": LAW_ALAW}
cdef bint _BIG_ENDIAN = sys.byteorder == "big"


# --------------------------------------------------------------------------- kernels


cdef inline void _accumulate(int32_t* acc, const int16_t* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        acc[i] += x[i]


cdef inline int16_t _sat16(int32_t v) noexcept nogil:
    return <int16_t>(32767 if v > 32767 else (-32768 if v < -32768 else v))


cdef inline void _clip(const int32_t* acc, int16_t* dst, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = _sat16(acc[i])


cdef inline void _clip_minus(const int32_t* acc, const int16_t* own, int16_t* dst,
                             Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = _sat16(acc[i] - own[i])


cdef inline void _encode(int law, const int16_t* pcm, uint8_t* dst, Py_ssize_t n) noexcept nogil:
    if law == LAW_ULAW:
        ulaw_encode_buffer(pcm, dst, n)
    elif law == LAW_ALAW:
        alaw_encode_buffer(pcm, dst, n)


cdef inline void _byteswap16(int16_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef uint16_t v
    for i in range(n):
        v = <uint16_t>p[i]
        p[i] = <int16_t>(((v >> 8) | (v << 8)) & 0xFFFF)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _mix_minus(const int16_t[:, ::1] frames, const uint8_t[::1] active,
                     int16_t[:, ::1] out, int32_t[::1] acc) noexcept nogil:
    cdef Py_ssize_t i, n = frames.shape[0], f = frames.shape[1]
    memset(&acc[0], 0, f * sizeof(int32_t))
    for i in range(n):
        if active[i]:
            _accumulate(&acc[0], &frames[i, 0], f)
    for i in range(n):
        if active[i]:
            _clip_minus(&acc[0], &frames[i, 0], &out[i, 0], f)
        else:
            _clip(&acc[0], &out[i, 0], f)


# --------------------------------------------------------------------------- C-level API


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline bint _in_use(Conference c, int slot) noexcept nogil:
    # Checked by hand: the C-level API takes slots from foreign code.
    return 0 <= slot < c.max_participants and c._used[slot]


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int conf_put_pcm(Conference c, int slot, const int16_t* pcm) noexcept nogil:
    if not _in_use(c, slot):
        return -1
    memcpy(&c._in[slot, 0], pcm, c.frame * sizeof(int16_t))
    c._has_input[slot] = 1
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int conf_put_coded(Conference c, int slot, const uint8_t* data) noexcept nogil:
    if not _in_use(c, slot):
        return -1
    # Decoding on arrival keeps conf_mix a pure int16 pass, whatever the laws.
    if c._law[slot] == LAW_ULAW:
        ulaw_decode_buffer(data, &c._in[slot, 0], c.frame)
    elif c._law[slot] == LAW_ALAW:
        alaw_decode_buffer(data, &c._in[slot, 0], c.frame)
    else:
        return -1
    c._has_input[slot] = 1
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int conf_mix(Conference c) noexcept nogil:
    cdef Py_ssize_t n = c.frame
    cdef int k, slot, talkers = 0
    cdef int32_t* acc = &c._acc[0]
    cdef bint listeners[3]
    listeners[0] = listeners[1] = listeners[2] = False
    memset(acc, 0, n * sizeof(int32_t))
    for k in range(c._count):
        slot = c._order[k]
        if c._has_input[slot] and not c._muted[slot] and not c._listen_only[slot]:
            _accumulate(acc, &c._in[slot, 0], n)
            c._out_kind[slot] = OUT_OWN
            talkers += 1
        else:
            c._out_kind[slot] = OUT_SHARED
            listeners[c._law[slot]] = True
        c._has_input[slot] = 0
    if listeners[LAW_PCM] or listeners[LAW_ULAW] or listeners[LAW_ALAW]:
        _clip(acc, &c._shared[0], n)
        if listeners[LAW_ULAW]:
            _encode(LAW_ULAW, &c._shared[0], &c._shared_coded[LAW_ULAW, 0], n)
        if listeners[LAW_ALAW]:
            _encode(LAW_ALAW, &c._shared[0], &c._shared_coded[LAW_ALAW, 0], n)
    for k in range(c._count):
        slot = c._order[k]
        if c._out_kind[slot] == OUT_OWN:
            # The sum is exact in int32, so removing oneself before clipping
            # gives the same result as summing the others.
            _clip_minus(acc, &c._in[slot, 0], &c._out[slot, 0], n)
            _encode(c._law[slot], &c._out[slot, 0], &c._coded[slot, 0], n)
    return talkers


@cython.boundscheck(False)
@cython.wraparound(False)
cdef const int16_t* conf_out_pcm(Conference c, int slot) noexcept nogil:
    if not _in_use(c, slot):
        return NULL
    if c._out_kind[slot] == OUT_OWN:
        return &c._out[slot, 0]
    if c._out_kind[slot] == OUT_SHARED:
        return &c._shared[0]
    return NULL


@cython.boundscheck(False)
@cython.wraparound(False)
cdef const uint8_t* conf_out_coded(Conference c, int slot) noexcept nogil:
    if not _in_use(c, slot) or c._out_kind[slot] == OUT_NONE:
        return NULL
    cdef int law = c._law[slot]
    if law == LAW_PCM:
        return <const uint8_t*>conf_out_pcm(c, slot)
    if c._out_kind[slot] == OUT_OWN:
        return &c._coded[slot, 0]
    return &c._shared_coded[law, 0]


# --------------------------------------------------------------------------- Python API


cdef class Conference:
    """One conference: up to max_participants parties, frames of `frame` samples.

    Each tick, put() every participant's input that arrived, then mix() once:
    everyone hears the sum of all other active participants, saturated to
    int16 and encoded in their own law ("pcm": 16-bit little-endian linear,
    "ulaw"/"alaw": G.711, one byte per sample).  Muted and listen-only
    participants contribute nothing but hear everyone; a participant that
    put nothing this tick contributes silence.  Not thread-safe.
    """

    def __cinit__(self, int max_participants=64, int frame=160):
        if not 1 <= max_participants <= MAX_PARTICIPANTS_LIMIT:
            raise ValueError(f"max_participants must be between 1 and {MAX_PARTICIPANTS_LIMIT}, "
                             f"not {max_participants}")
        if frame < 1:
            raise ValueError(f"frame must be at least 1 sample, not {frame}")
        self.max_participants = max_participants
        self.frame = frame
        self._count = 0
        self._in = numpy.zeros((max_participants, frame), dtype=numpy.int16)
        self._out = numpy.zeros((max_participants, frame), dtype=numpy.int16)
        self._coded = numpy.zeros((max_participants, frame), dtype=numpy.uint8)
        self._acc = numpy.zeros(frame, dtype=numpy.int32)
        self._shared = numpy.zeros(frame, dtype=numpy.int16)
        self._shared_coded = numpy.zeros((3, frame), dtype=numpy.uint8)
        self._law = numpy.zeros(max_participants, dtype=numpy.uint8)
        self._muted = numpy.zeros(max_participants, dtype=numpy.uint8)
        self._listen_only = numpy.zeros(max_participants, dtype=numpy.uint8)
        self._has_input = numpy.zeros(max_participants, dtype=numpy.uint8)
        self._used = numpy.zeros(max_participants, dtype=numpy.uint8)
        self._out_kind = numpy.zeros(max_participants, dtype=numpy.uint8)
        self._order = numpy.zeros(max_participants, dtype=numpy.int32)
        self._pid = [None] * max_participants
        self._slot = {}

    def add(self, pid, law="pcm", bint muted=False, bint listen_only=False):
        """Add participant PID speaking and hearing LAW ("pcm", "ulaw" or "alaw").

        Returns its slot: the lowest index in [0, max_participants) no one
        holds, the index the C-level API of ext/mix.pxd takes.
        Raises ValueError if PID is already in, LAW is unknown or the
        conference already has max_participants participants.
        """
        if pid in self._slot:
            raise ValueError(f"participant {pid!r} is already in the conference")
        code = _LAW_CODE.get(law)
        if code is None:
            raise ValueError(f"unknown law {law!r}: expected one of {', '.join(LAWS)}")
        if self._count >= self.max_participants:
            raise ValueError(f"conference is full: max_participants={self.max_participants}")
        cdef int slot = 0
        while self._used[slot]:
            slot += 1
        self._used[slot] = 1
        self._law[slot] = code
        self._muted[slot] = muted
        self._listen_only[slot] = listen_only
        self._has_input[slot] = 0
        self._out_kind[slot] = OUT_NONE
        self._order[self._count] = slot
        self._count += 1
        self._pid[slot] = pid
        self._slot[pid] = slot
        return slot

    def remove(self, pid):
        """Take participant PID out; KeyError if it is not in the conference."""
        cdef int slot = self.slot(pid)
        cdef int k = 0
        del self._slot[pid]
        while self._order[k] != slot:
            k += 1
        # Keep joining order: participants() and mix() list in it.
        while k + 1 < self._count:
            self._order[k] = self._order[k + 1]
            k += 1
        self._count -= 1
        self._used[slot] = 0
        self._has_input[slot] = 0
        self._pid[slot] = None

    cpdef int slot(self, object pid) except -1:
        """The slot of participant PID; KeyError if it is not in the conference."""
        s = self._slot.get(pid)
        if s is None:
            raise KeyError(f"no participant {pid!r} in the conference")
        return s

    def set_muted(self, pid, bint muted):
        """Mute or unmute PID: while muted it contributes nothing but still hears."""
        self._muted[self.slot(pid)] = muted

    def set_listen_only(self, pid, bint listen_only):
        """Make PID listen-only (contributes nothing, hears everyone) or a talker again."""
        self._listen_only[self.slot(pid)] = listen_only

    def is_muted(self, pid):
        """Whether PID is muted."""
        return bool(self._muted[self.slot(pid)])

    def is_listen_only(self, pid):
        """Whether PID is listen-only."""
        return bool(self._listen_only[self.slot(pid)])

    def law(self, pid):
        """PID's law: "pcm", "ulaw" or "alaw"."""
        return LAWS[self._law[self.slot(pid)]]

    def participants(self):
        """Participant ids in joining order."""
        cdef int k
        return [self._pid[self._order[k]] for k in range(self._count)]

    def __len__(self):
        return self._count

    def __contains__(self, pid):
        return pid in self._slot

    def put(self, pid, frame):
        """Give PID's input for this tick; a second put() in the same tick replaces it.

        For "ulaw"/"alaw" participants FRAME is `frame` bytes of G.711; for
        "pcm" it is 2 * `frame` bytes of little-endian int16 or an int16
        array of `frame` samples.  ValueError on a wrong length, TypeError on
        a PCM array that is not int16.
        """
        cdef int slot = self.slot(pid)
        cdef const uint8_t[::1] raw
        cdef const int16_t[::1] pcm
        cdef Py_ssize_t n
        if self._law[slot] != LAW_PCM:
            if type(frame) is bytes:
                # Fast path for the common case: no buffer acquisition.
                n = PyBytes_GET_SIZE(frame)
                if n == self.frame:
                    conf_put_coded(self, slot, <const uint8_t*>PyBytes_AS_STRING(frame))
                    return
            else:
                raw = memoryview(frame).cast("B")
                n = raw.shape[0]
                if n == self.frame:
                    conf_put_coded(self, slot, &raw[0])
                    return
            raise ValueError(f"participant {pid!r}: a {LAWS[self._law[slot]]} frame is "
                             f"{self.frame} bytes, got {n}")
        if isinstance(frame, (bytes, bytearray, memoryview)):
            raw = memoryview(frame).cast("B")
            n = raw.shape[0]
            if n != 2 * self.frame:
                raise ValueError(f"participant {pid!r}: a pcm frame is {2 * self.frame} bytes "
                                 f"({self.frame} samples), got {n} bytes")
            conf_put_pcm(self, slot, <const int16_t*>&raw[0])
            if _BIG_ENDIAN:  # the wire format is little-endian
                _byteswap16(&self._in[slot, 0], self.frame)
            return
        arr = numpy.asarray(frame)
        if arr.dtype.kind != "i" or arr.dtype.itemsize != 2:
            raise TypeError(f"participant {pid!r}: pcm frames are bytes or an int16 array, "
                            f"not {arr.dtype}")
        if arr.size != self.frame:
            raise ValueError(f"participant {pid!r}: a pcm frame is {self.frame} samples, "
                             f"got {arr.size}")
        pcm = numpy.ascontiguousarray(arr.reshape(-1), dtype=numpy.int16)
        conf_put_pcm(self, slot, &pcm[0])

    def mix(self):
        """Mix this tick and clear the inputs: {pid: bytes heard, in pid's law}."""
        cdef dict result = {}
        cdef list shared = [None, None, None]
        cdef int k, slot, law
        with nogil:
            conf_mix(self)
        for k in range(self._count):
            slot = self._order[k]
            law = self._law[slot]
            if self._out_kind[slot] == OUT_SHARED:
                # Every non-talker of a law hears the same bytes: build them once.
                out = shared[law]
                if out is None:
                    out = shared[law] = _output(self, slot)
            else:
                out = _output(self, slot)
            result[self._pid[slot]] = out
        return result

cdef bytes _output(Conference c, int slot):
    """SLOT's output of the last mix as the bytes mix() hands out."""
    cdef const uint8_t* p = conf_out_coded(c, slot)
    if c._law[slot] != LAW_PCM:
        return PyBytes_FromStringAndSize(<const char*>p, c.frame)
    cdef bytes out = PyBytes_FromStringAndSize(<const char*>p, 2 * c.frame)
    if _BIG_ENDIAN:  # fresh and not yet shared, so it may be written
        _byteswap16(<int16_t*>PyBytes_AS_STRING(out), c.frame)
    return out


def mix_minus(frames, active):
    """Mix-minus of a block: out[i] = int16-saturated sum of frames[j] for active j != i.

    FRAMES is an int16 array [N, F], ACTIVE a boolean array [N]; an inactive
    row contributes nothing but still gets the sum of all active rows.
    Returns a new int16 array [N, F].
    """
    f = numpy.asarray(frames)
    if f.dtype != numpy.int16:
        raise TypeError(f"frames must be an int16 array, not {f.dtype}")
    if f.ndim != 2:
        raise ValueError(f"frames must be 2-dimensional [participants, samples], not {f.shape}")
    a = numpy.asarray(active, dtype=numpy.bool_)
    if a.shape != (f.shape[0],):
        raise ValueError(f"active must have shape ({f.shape[0]},) to match frames, not {a.shape}")
    out = numpy.empty(f.shape, dtype=numpy.int16)
    if f.size == 0:
        return out
    cdef const int16_t[:, ::1] fv = numpy.ascontiguousarray(f)
    cdef const uint8_t[::1] av = numpy.ascontiguousarray(a).view(numpy.uint8)
    cdef int16_t[:, ::1] ov = out
    cdef int32_t[::1] acc = numpy.empty(f.shape[1], dtype=numpy.int32)
    with nogil:
        _mix_minus(fv, av, ov, acc)
    return out
