"""Call-control ring, the hot-path twin of ext/ring_py.py (see docs/ring.md).

Same file format and API as the reference. Opening, locking, validation, crash
recovery and overflow parsing are the reference's own functions; this module
does the per-record work in C: slot writes published with a release store of
the write cursor, acquire-load reads, spilling with a C CRC-32, and typed
stamps encoded straight into the slot as msgpack.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from cpython.exc cimport PyErr_SetFromErrno
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.number cimport PyNumber_Index
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.mman cimport MAP_FAILED, MAP_SHARED, MS_SYNC, PROT_READ, PROT_WRITE, mmap, msync, munmap
from posix.types cimport off_t
from posix.unistd cimport fsync, ftruncate, pwrite

from ext.includes.ring_atomic cimport ring_load_acquire, ring_store_release

import operator
from collections.abc import Mapping

import msgpack

from ext import ring_py as _py
from ext.ring_py import RingBusyError, RingCorruptionError, RingError, RingFormatError

__all__ = ["RingWriter", "RingReader", "RingError", "RingFormatError", "RingBusyError",
           "RingCorruptionError"]

cdef enum:
    HEADER_SIZE = 4096
    SLOT_HEADER = 12
    OVF_HEADER = 16
    CURSOR_OFF = 128
    RELEASED_OFF = 192
    OVF_WRITTEN_OFF = 256
    OVF_BASE_OFF = 264
    SPILLED_OFF = 272
    OVF_CONSUMED_OFF = 320

cdef size_t MAX_RECORD = _py.MAX_RECORD

if (HEADER_SIZE, SLOT_HEADER, OVF_HEADER, CURSOR_OFF, RELEASED_OFF, OVF_WRITTEN_OFF, OVF_BASE_OFF,
        SPILLED_OFF, OVF_CONSUMED_OFF) != (
        _py.HEADER_SIZE, _py.SLOT_HEADER, _py.OVF_HEADER, _py.CURSOR_OFF, _py.RELEASED_OFF,
        _py.OVF_WRITTEN_OFF, _py.OVF_BASE_OFF, _py.SPILLED_OFF, _py.OVF_CONSUMED_OFF):
    raise ImportError("ext.ring is out of step with ext.ring_py: rebuild it")

# ---------------------------------------------------------------- CRC-32 (zlib's)

cdef uint32_t _crc_table[256]


cdef void _crc_init() noexcept:
    cdef uint32_t c, i, k
    for i in range(256):
        c = i
        for k in range(8):
            c = (c >> 1) ^ (0xEDB88320 if c & 1 else 0)
        _crc_table[i] = c


cdef uint32_t _crc32(uint32_t crc, const unsigned char* p, size_t n) noexcept nogil:
    crc = ~crc
    while n:
        crc = _crc_table[(crc ^ p[0]) & 0xff] ^ (crc >> 8)
        p += 1
        n -= 1
    return ~crc


_crc_init()

# ---------------------------------------------------------------- msgpack encoding
# Minimal forms, as msgpack.packb chooses them, so the stamps are byte-identical.

cdef inline size_t _str_len(size_t n) noexcept nogil:
    if n < 32:
        return 1 + n
    if n < 256:
        return 2 + n
    if n < 65536:
        return 3 + n
    return 5 + n


cdef inline size_t _uint_len(uint64_t v) noexcept nogil:
    if v < 128:
        return 1
    if v < 256:
        return 2
    if v < 65536:
        return 3
    if v < 4294967296ULL:
        return 5
    return 9


cdef inline size_t _int_len(int64_t v) noexcept nogil:
    if v >= 0:
        return _uint_len(<uint64_t>v)
    if v >= -32:
        return 1
    if v >= -128:
        return 2
    if v >= -32768:
        return 3
    if v >= -2147483648LL:
        return 5
    return 9


cdef inline unsigned char* _put_be(unsigned char* p, uint64_t v, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        p[i] = <unsigned char>(v >> (8 * (n - 1 - i)))
    return p + n


cdef inline unsigned char* _put_raw(unsigned char* p, bytes b) noexcept:
    cdef size_t n = <size_t>PyBytes_GET_SIZE(b)
    memcpy(p, PyBytes_AS_STRING(b), n)
    return p + n


cdef inline unsigned char* _put_str(unsigned char* p, const char* s, size_t n) noexcept nogil:
    if n < 32:
        p[0] = <unsigned char>(0xa0 | n)
        p += 1
    elif n < 256:
        p[0] = 0xd9
        p[1] = <unsigned char>n
        p += 2
    elif n < 65536:
        p[0] = 0xda
        p = _put_be(p + 1, n, 2)
    else:
        p[0] = 0xdb
        p = _put_be(p + 1, n, 4)
    memcpy(p, s, n)
    return p + n


cdef inline unsigned char* _put_uint(unsigned char* p, uint64_t v) noexcept nogil:
    if v < 128:
        p[0] = <unsigned char>v
        return p + 1
    if v < 256:
        p[0] = 0xcc
        p[1] = <unsigned char>v
        return p + 2
    if v < 65536:
        p[0] = 0xcd
        return _put_be(p + 1, v, 2)
    if v < 4294967296ULL:
        p[0] = 0xce
        return _put_be(p + 1, v, 4)
    p[0] = 0xcf
    return _put_be(p + 1, v, 8)


cdef inline unsigned char* _put_int(unsigned char* p, int64_t v) noexcept nogil:
    if v >= 0:
        return _put_uint(p, <uint64_t>v)
    if v >= -32:
        p[0] = <unsigned char>(<uint64_t>v & 0xff)   # negative fixint 0xe0..0xff
        return p + 1
    if v >= -128:
        p[0] = 0xd0
        p[1] = <unsigned char>(<uint64_t>v & 0xff)
        return p + 2
    if v >= -32768:
        p[0] = 0xd1
        return _put_be(p + 1, <uint64_t>v, 2)
    if v >= -2147483648LL:
        p[0] = 0xd2
        return _put_be(p + 1, <uint64_t>v, 4)
    p[0] = 0xd3
    return _put_be(p + 1, <uint64_t>v, 8)


# Key fragments of the typed records: map header + type + "seq" key, then keys.
cdef bytes _TRANSITION = b"\x8b\xa4type\xaatransition\xa3seq"
cdef bytes _SESSION = b"\x89\xa4type\xa7session\xa3seq"
cdef bytes _ACTION = b"\x88\xa4type\xa6action\xa3seq"
cdef bytes _K_SESSION = b"\xa7session"
cdef bytes _K_ACCOUNT = b"\xa7account"
cdef bytes _K_FROM = b"\xa4from"
cdef bytes _K_TO = b"\xa2to"
cdef bytes _K_LEVEL = b"\xa5level"
cdef bytes _K_REASON = b"\xa6reason"
cdef bytes _K_MONO = b"\xa7mono_ns"
cdef bytes _K_WALL = b"\xa7wall_ns"
cdef bytes _K_MODULE = b"\xa6module"
cdef bytes _K_ACTION = b"\xa6action"
cdef bytes _K_COUNT = b"\xa5count"
cdef bytes _KIND_START = b"\xa4kind\xa5start"
cdef bytes _KIND_END = b"\xa4kind\xa3end"

# ---------------------------------------------------------------- helpers


cdef int _pwrite_all(int fd, const unsigned char* p, size_t n, uint64_t off) except -1:
    cdef Py_ssize_t k
    while n:
        k = pwrite(fd, p, n, <off_t>off)
        if k < 0:
            if errno == EINTR:
                continue
            PyErr_SetFromErrno(OSError)
            return -1
        p += k
        n -= <size_t>k
        off += <uint64_t>k
    return 0


cdef unsigned char* _map_ring(int fd, size_t length) except NULL:
    cdef void* m = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if m == MAP_FAILED:
        PyErr_SetFromErrno(OSError)
        return NULL
    return <unsigned char*>m


cdef inline const char* _utf8(str s, Py_ssize_t* n) except NULL:
    return PyUnicode_AsUTF8AndSize(s, n)


cdef inline int64_t _i64(object v) except? -1:
    # __index__ only, as the reference does: a float is refused, not truncated.
    return PyNumber_Index(v)


# ---------------------------------------------------------------- writer


cdef class RingWriter:
    """The engine's side of the ring: appends records, each under the next
    sequence number (1, 2, ... continuing across restarts).

    `RingWriter(path, slots=65536, slot_size=256, node_id="node1")` creates the
    ring at `path` (e.g. `DATA/ring/ring.dat`) or reopens it; reopening with a
    different geometry or node id raises RingFormatError. Only one writer may
    hold a ring (RingBusyError otherwise). A record is published, and will be
    read exactly once, when the append call returns; an interrupted append
    leaves no trace.
    """

    def __cinit__(self):
        self._map = NULL
        self._scratch = NULL
        self._ovf_fd = -1

    def __init__(self, path, slots=_py.DEFAULT_SLOTS, slot_size=_py.DEFAULT_SLOT_SIZE,
                 node_id="node1"):
        if self._map != NULL:
            raise RuntimeError("RingWriter is already initialised")
        files = _py._open_writer(path, slots, slot_size, node_id)
        try:
            self._map_len = HEADER_SIZE + <size_t>files.slots * <size_t>files.slot_size
            self._map = _map_ring(files.ring_fd, self._map_len)
        except BaseException:
            files.close()
            raise
        self._files = files
        self._slots_p = self._map + HEADER_SIZE
        self._cursor_p = <uint64_t*>(self._map + CURSOR_OFF)
        self._released_p = <uint64_t*>(self._map + RELEASED_OFF)
        self._ow_p = <uint64_t*>(self._map + OVF_WRITTEN_OFF)
        self._ob_p = <uint64_t*>(self._map + OVF_BASE_OFF)
        self._spilled_p = <uint64_t*>(self._map + SPILLED_OFF)
        self._oc_p = <uint64_t*>(self._map + OVF_CONSUMED_OFF)
        self._slots = files.slots
        self._mask = self._slots - 1
        self._slot_size = files.slot_size
        self._cap = self._slot_size - SLOT_HEADER
        self._ovf_fd = files.ovf_fd
        self._node = files.node_id
        self._node_frag = b"\xa4node" + msgpack.packb(self._node)
        # Only this process writes the cursor and the overflow end; the
        # reader's fields may only have grown since we load them.
        self._next = ring_load_acquire(self._cursor_p)
        self._released = ring_load_acquire(self._released_p)
        self._ow = ring_load_acquire(self._ow_p)
        self._ob = ring_load_acquire(self._ob_p)
        self._grow_scratch(4096)

    def __dealloc__(self):
        if self._map != NULL:
            munmap(self._map, self._map_len)
            self._map = NULL
        if self._scratch != NULL:
            PyMem_Free(self._scratch)
            self._scratch = NULL

    # -- internals ----------------------------------------------------------
    cdef int _grow_scratch(self, size_t n) except -1:
        cdef size_t size = self._scratch_len if self._scratch_len else 4096
        cdef void* p
        while size < n:
            size *= 2
        p = PyMem_Realloc(self._scratch, size)
        if p == NULL:
            raise MemoryError()
        self._scratch = <unsigned char*>p
        self._scratch_len = size
        return 0

    cdef int _maybe_reset_overflow(self) except -1:
        # Once the reader has released all of the file, its position equals
        # the published end and it reads nothing more from the file: it can be
        # emptied. The base is stored before any later end, so a reader that
        # acquires that end also sees the new base.
        if ring_load_acquire(self._oc_p) != self._ow:
            return 0
        if ftruncate(self._ovf_fd, 0) != 0:
            PyErr_SetFromErrno(OSError)
            return -1
        self._ob = self._ow
        ring_store_release(self._ob_p, self._ow)
        return 0

    cdef unsigned char* _reserve(self, size_t n) except NULL:
        """Where to encode the next record of n bytes: its slot, or the spill
        buffer when the ring is full or the record does not fit a slot."""
        cdef uint64_t s = self._next
        if self._map == NULL:
            raise ValueError("the ring writer is closed")
        if n > MAX_RECORD:
            raise ValueError(f"record of {n} bytes exceeds the {MAX_RECORD}-byte limit")
        if n <= self._cap:
            if s - self._released >= self._slots:
                # Acquire pairs with the reader's release store: its copies out
                # of the slot we are about to reuse are complete. Reloaded only
                # when the stale copy says full, about once per lap.
                self._released = ring_load_acquire(self._released_p)
                if self._ob != self._ow:
                    self._maybe_reset_overflow()
            if s - self._released < self._slots:
                self._in_ring = True
                return self._slots_p + (s & self._mask) * self._slot_size + SLOT_HEADER
        if self._ob != self._ow:
            self._maybe_reset_overflow()
        self._in_ring = False
        if self._scratch_len < n + OVF_HEADER:
            self._grow_scratch(n + OVF_HEADER)
        return self._scratch + OVF_HEADER

    cdef uint64_t _commit(self, size_t n) except 0:
        """Publish the n bytes placed by _reserve; return their seq."""
        cdef uint64_t s = self._next
        cdef uint32_t n32 = <uint32_t>n
        cdef uint32_t crc
        cdef unsigned char* rec
        if self._in_ring:
            rec = self._slots_p + (s & self._mask) * self._slot_size
            (<uint64_t*>rec)[0] = s
            (<uint32_t*>(rec + 8))[0] = n32
            # Release: the slot's plain stores above become visible no later
            # than the cursor that lets the reader look at them.
            ring_store_release(self._cursor_p, s + 1)
        else:
            rec = self._scratch
            memcpy(rec, &s, 8)
            memcpy(rec + 8, &n32, 4)
            crc = _crc32(_crc32(0, rec, 12), rec + OVF_HEADER, n)
            memcpy(rec + 12, &crc, 4)
            _pwrite_all(self._ovf_fd, rec, n + OVF_HEADER, self._ow - self._ob)
            self._ow += n + OVF_HEADER
            # The bytes are in the file before their end is published, and the
            # end before the cursor that makes the seq readable.
            ring_store_release(self._ow_p, self._ow)
            ring_store_release(self._cursor_p, s + 1)
            ring_store_release(self._spilled_p, self._spilled_p[0] + 1)
        self._next = s + 1
        return s

    cdef uint64_t append_c(self, const unsigned char* data, size_t n) except 0:
        """Publish n bytes; return the seq."""
        cdef unsigned char* dst = self._reserve(n)
        memcpy(dst, data, n)
        return self._commit(n)

    cdef int _check(self) except -1:
        if self._map == NULL:
            raise ValueError("the ring writer is closed")
        return 0

    # -- properties ---------------------------------------------------------
    @property
    def path(self):
        """The ring file."""
        return self._files.path

    @property
    def node_id(self):
        """The node id stored in the ring and in every typed record."""
        return self._node

    @property
    def slots(self):
        """Number of slots."""
        return self._slots

    @property
    def slot_size(self):
        """Bytes per slot; a record of up to slot_size - 12 bytes fits one."""
        return self._slot_size

    @property
    def next_seq(self):
        """The sequence number the next append will get."""
        self._check()
        return self._next

    @property
    def written(self):
        """Records ever published to this ring (by every writer incarnation)."""
        self._check()
        return ring_load_acquire(self._cursor_p) - 1

    @property
    def spilled(self):
        """Records ever published through the overflow file."""
        self._check()
        return ring_load_acquire(self._spilled_p)

    @property
    def fill(self):
        """Published records the reader has not released (cursor - released)."""
        self._check()
        return ring_load_acquire(self._cursor_p) - ring_load_acquire(self._released_p)

    @property
    def overflow_pending(self):
        """Overflow bytes published but not yet released by the reader."""
        self._check()
        return ring_load_acquire(self._ow_p) - ring_load_acquire(self._oc_p)

    def stats(self):
        """written, spilled, fill and overflow_pending at once."""
        return {"written": self.written, "spilled": self.spilled, "fill": self.fill,
                "overflow_pending": self.overflow_pending}

    # -- appending ----------------------------------------------------------
    def append(self, payload):
        """Publish one record of raw bytes; return its sequence number."""
        cdef Py_buffer view
        if PyBytes_CheckExact(payload):
            return self.append_c(<const unsigned char*>PyBytes_AS_STRING(payload),
                                 <size_t>PyBytes_GET_SIZE(payload))
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            return self.append_c(<const unsigned char*>view.buf, <size_t>view.len)
        finally:
            PyBuffer_Release(&view)

    def append_record(self, obj):
        """Publish `{"seq": seq, "node": node_id, **obj}` packed with msgpack;
        return seq. The keys "seq" and "node" are reserved (ValueError)."""
        self._check()
        if not isinstance(obj, Mapping):
            raise TypeError("append_record takes a mapping")
        if "seq" in obj or "node" in obj:
            raise ValueError('"seq" and "node" are set by the ring; remove them from the record')
        rec = {"seq": self._next, "node": self._node}
        rec.update(obj)
        cdef bytes packed = msgpack.packb(rec)
        return self.append_c(<const unsigned char*>PyBytes_AS_STRING(packed),
                             <size_t>PyBytes_GET_SIZE(packed))

    def stamp_transition(self, str session_id not None, str account not None,
                         str from_module not None, str to_module not None, str level not None,
                         str reason not None, mono_ns, wall_ns):
        """Publish a change of the module in control of a call:
        {"type": "transition", "seq", "node", "session", "account", "from", "to",
        "level", "reason", "mono_ns", "wall_ns"}; return its seq."""
        cdef Py_ssize_t l_sid, l_acc, l_from, l_to, l_lvl, l_rsn
        cdef const char* p_sid = _utf8(session_id, &l_sid)
        cdef const char* p_acc = _utf8(account, &l_acc)
        cdef const char* p_from = _utf8(from_module, &l_from)
        cdef const char* p_to = _utf8(to_module, &l_to)
        cdef const char* p_lvl = _utf8(level, &l_lvl)
        cdef const char* p_rsn = _utf8(reason, &l_rsn)
        cdef int64_t mono = _i64(mono_ns), wall = _i64(wall_ns)
        self._check()
        cdef uint64_t seq = self._next
        cdef size_t n = (
            PyBytes_GET_SIZE(_TRANSITION) + _uint_len(seq) + PyBytes_GET_SIZE(self._node_frag)
            + PyBytes_GET_SIZE(_K_SESSION) + _str_len(l_sid)
            + PyBytes_GET_SIZE(_K_ACCOUNT) + _str_len(l_acc)
            + PyBytes_GET_SIZE(_K_FROM) + _str_len(l_from)
            + PyBytes_GET_SIZE(_K_TO) + _str_len(l_to)
            + PyBytes_GET_SIZE(_K_LEVEL) + _str_len(l_lvl)
            + PyBytes_GET_SIZE(_K_REASON) + _str_len(l_rsn)
            + PyBytes_GET_SIZE(_K_MONO) + _int_len(mono)
            + PyBytes_GET_SIZE(_K_WALL) + _int_len(wall))
        cdef unsigned char* p = self._reserve(n)
        p = _put_uint(_put_raw(p, _TRANSITION), seq)
        p = _put_raw(p, self._node_frag)
        p = _put_str(_put_raw(p, _K_SESSION), p_sid, l_sid)
        p = _put_str(_put_raw(p, _K_ACCOUNT), p_acc, l_acc)
        p = _put_str(_put_raw(p, _K_FROM), p_from, l_from)
        p = _put_str(_put_raw(p, _K_TO), p_to, l_to)
        p = _put_str(_put_raw(p, _K_LEVEL), p_lvl, l_lvl)
        p = _put_str(_put_raw(p, _K_REASON), p_rsn, l_rsn)
        p = _put_int(_put_raw(p, _K_MONO), mono)
        _put_int(_put_raw(p, _K_WALL), wall)
        return self._commit(n)

    def stamp_session(self, str kind not None, str session_id not None, str account not None,
                      mono_ns, wall_ns, str reason not None = ""):
        """Publish the start or end of a call: {"type": "session", "seq", "node",
        "kind" ("start" | "end"), "session", "account", "reason", "mono_ns",
        "wall_ns"}; return its seq."""
        cdef bytes kind_frag
        if kind == "start":
            kind_frag = _KIND_START
        elif kind == "end":
            kind_frag = _KIND_END
        else:
            raise ValueError(f'kind must be "start" or "end", not {kind!r}')
        cdef Py_ssize_t l_sid, l_acc, l_rsn
        cdef const char* p_sid = _utf8(session_id, &l_sid)
        cdef const char* p_acc = _utf8(account, &l_acc)
        cdef const char* p_rsn = _utf8(reason, &l_rsn)
        cdef int64_t mono = _i64(mono_ns), wall = _i64(wall_ns)
        self._check()
        cdef uint64_t seq = self._next
        cdef size_t n = (
            PyBytes_GET_SIZE(_SESSION) + _uint_len(seq) + PyBytes_GET_SIZE(self._node_frag)
            + PyBytes_GET_SIZE(kind_frag)
            + PyBytes_GET_SIZE(_K_SESSION) + _str_len(l_sid)
            + PyBytes_GET_SIZE(_K_ACCOUNT) + _str_len(l_acc)
            + PyBytes_GET_SIZE(_K_REASON) + _str_len(l_rsn)
            + PyBytes_GET_SIZE(_K_MONO) + _int_len(mono)
            + PyBytes_GET_SIZE(_K_WALL) + _int_len(wall))
        cdef unsigned char* p = self._reserve(n)
        p = _put_uint(_put_raw(p, _SESSION), seq)
        p = _put_raw(_put_raw(p, self._node_frag), kind_frag)
        p = _put_str(_put_raw(p, _K_SESSION), p_sid, l_sid)
        p = _put_str(_put_raw(p, _K_ACCOUNT), p_acc, l_acc)
        p = _put_str(_put_raw(p, _K_REASON), p_rsn, l_rsn)
        p = _put_int(_put_raw(p, _K_MONO), mono)
        _put_int(_put_raw(p, _K_WALL), wall)
        return self._commit(n)

    def stamp_action(self, str session_id not None, str account not None, str module not None,
                     str action not None, count):
        """Publish a metered action: {"type": "action", "seq", "node", "session",
        "account", "module", "action", "count"}; return its seq."""
        cdef Py_ssize_t l_sid, l_acc, l_mod, l_act
        cdef const char* p_sid = _utf8(session_id, &l_sid)
        cdef const char* p_acc = _utf8(account, &l_acc)
        cdef const char* p_mod = _utf8(module, &l_mod)
        cdef const char* p_act = _utf8(action, &l_act)
        cdef int64_t cnt = _i64(count)
        self._check()
        cdef uint64_t seq = self._next
        cdef size_t n = (
            PyBytes_GET_SIZE(_ACTION) + _uint_len(seq) + PyBytes_GET_SIZE(self._node_frag)
            + PyBytes_GET_SIZE(_K_SESSION) + _str_len(l_sid)
            + PyBytes_GET_SIZE(_K_ACCOUNT) + _str_len(l_acc)
            + PyBytes_GET_SIZE(_K_MODULE) + _str_len(l_mod)
            + PyBytes_GET_SIZE(_K_ACTION) + _str_len(l_act)
            + PyBytes_GET_SIZE(_K_COUNT) + _int_len(cnt))
        cdef unsigned char* p = self._reserve(n)
        p = _put_uint(_put_raw(p, _ACTION), seq)
        p = _put_raw(p, self._node_frag)
        p = _put_str(_put_raw(p, _K_SESSION), p_sid, l_sid)
        p = _put_str(_put_raw(p, _K_ACCOUNT), p_acc, l_acc)
        p = _put_str(_put_raw(p, _K_MODULE), p_mod, l_mod)
        p = _put_str(_put_raw(p, _K_ACTION), p_act, l_act)
        _put_int(_put_raw(p, _K_COUNT), cnt)
        return self._commit(n)

    # -- lifetime -----------------------------------------------------------
    def flush(self):
        """msync the ring and fsync the overflow file. Published records already
        survive a crash of the process; this is for a crash of the machine."""
        self._check()
        if msync(self._map, self._map_len, MS_SYNC) != 0 or fsync(self._ovf_fd) != 0:
            PyErr_SetFromErrno(OSError)

    def close(self):
        """Unmap the ring and give up the writer side. Idempotent."""
        if self._map != NULL:
            munmap(self._map, self._map_len)
            self._map = NULL
            self._ovf_fd = -1
            self._files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- reader


cdef class RingReader:
    """The accountant's side of the ring: returns every record once, in order.

    `RingReader(path, start_seq)` resumes after `start_seq`, the last seq the
    caller has durably processed (its own storage keeps it); None resumes at
    the ring's released position. `release(seq)` hands records up to seq back
    to the writer: call it only after the caller's commit, because a restarted
    reader can only resume from a seq that has not been released.
    """

    def __cinit__(self):
        self._map = NULL

    def __init__(self, path, start_seq=None):
        cdef uint64_t cursor, released, nxt, written, base
        if self._map != NULL:
            raise RuntimeError("RingReader is already initialised")
        files = _py._open_reader(path)
        try:
            self._map_len = HEADER_SIZE + <size_t>files.slots * <size_t>files.slot_size
            self._map = _map_ring(files.ring_fd, self._map_len)
        except BaseException:
            files.close()
            raise
        self._files = files
        self._slots_p = self._map + HEADER_SIZE
        self._cursor_p = <uint64_t*>(self._map + CURSOR_OFF)
        self._released_p = <uint64_t*>(self._map + RELEASED_OFF)
        self._ow_p = <uint64_t*>(self._map + OVF_WRITTEN_OFF)
        self._ob_p = <uint64_t*>(self._map + OVF_BASE_OFF)
        self._spilled_p = <uint64_t*>(self._map + SPILLED_OFF)
        self._oc_p = <uint64_t*>(self._map + OVF_CONSUMED_OFF)
        self._mask = <uint64_t>files.slots - 1
        self._slot_size = files.slot_size
        self._cap = self._slot_size - SLOT_HEADER
        try:
            cursor = ring_load_acquire(self._cursor_p)
            released = ring_load_acquire(self._released_p)
            if start_seq is None:
                nxt = released
            else:
                start = operator.index(start_seq)
                if start + 1 < released:
                    raise ValueError(
                        f"start_seq {start_seq} was already released (the ring keeps seq >= "
                        f"{released} only); resume from your committed position")
                if start + 1 > cursor:
                    raise ValueError(f"start_seq {start_seq} is ahead of the ring, whose last "
                                     f"record is {cursor - 1}")
                nxt = start + 1
            self._ovf = _py._OverflowQueue(files.ovf_fd, ring_load_acquire(self._oc_p))
            # The end before the base: a base older than the end it goes with
            # would misplace every byte. Records already processed are skipped
            # but remembered, for release.
            written = ring_load_acquire(self._ow_p)
            base = ring_load_acquire(self._ob_p)
            self._ovf.fill(nxt, nxt, written, base)
        except BaseException:
            self.close()
            raise
        self._next = nxt

    def __dealloc__(self):
        if self._map != NULL:
            munmap(self._map, self._map_len)
            self._map = NULL

    cdef int _check(self) except -1:
        if self._map == NULL:
            raise ValueError("the ring reader is closed")
        return 0

    @property
    def path(self):
        """The ring file."""
        return self._files.path

    @property
    def node_id(self):
        """The writer's node id, from the ring header."""
        return self._files.node_id

    @property
    def slots(self):
        """Number of slots."""
        return self._mask + 1

    @property
    def slot_size(self):
        """Bytes per slot."""
        return self._slot_size

    @property
    def position(self):
        """The last seq returned by read() (or start_seq)."""
        return self._next - 1

    @property
    def available(self):
        """Records published and not yet returned."""
        self._check()
        return ring_load_acquire(self._cursor_p) - self._next

    @property
    def written(self):
        """Records ever published to this ring."""
        self._check()
        return ring_load_acquire(self._cursor_p) - 1

    @property
    def spilled(self):
        """Records ever published through the overflow file."""
        self._check()
        return ring_load_acquire(self._spilled_p)

    @property
    def fill(self):
        """Published records not yet released (cursor - released)."""
        self._check()
        return ring_load_acquire(self._cursor_p) - ring_load_acquire(self._released_p)

    @property
    def overflow_pending(self):
        """Overflow bytes published but not yet released."""
        self._check()
        return ring_load_acquire(self._ow_p) - ring_load_acquire(self._oc_p)

    def stats(self):
        """written, spilled, fill, overflow_pending and position at once."""
        return {"written": self.written, "spilled": self.spilled, "fill": self.fill,
                "overflow_pending": self.overflow_pending, "position": self.position}

    cdef int _ring_into(self, list out, uint64_t s, uint64_t stop) except -1:
        # A published seq that is not next in the overflow is in its slot,
        # which the writer cannot reuse before we release it: no torn copy.
        cdef unsigned char* slot
        cdef uint64_t seq
        cdef uint32_t n
        while s < stop:
            slot = self._slots_p + (s & self._mask) * self._slot_size
            seq = (<uint64_t*>slot)[0]
            n = (<uint32_t*>(slot + 8))[0]
            if seq != s or n > self._cap:
                self._broken = True
                raise RingCorruptionError(f"record {s} is missing (its slot holds seq {seq})")
            out.append((s, PyBytes_FromStringAndSize(<char*>slot + SLOT_HEADER, n)))
            s += 1
        return 0

    def read(self, Py_ssize_t max_records=4096):
        """The next published records, at most max_records, as (seq, payload)
        in seq order; [] when there is none. Never waits."""
        self._check()
        if self._broken:
            raise RingCorruptionError("the reader hit a damaged record; reopen it")
        # Acquire: every slot and overflow byte of a seq below the loaded cursor
        # is visible from here on.
        cdef uint64_t cursor = ring_load_acquire(self._cursor_p)
        cdef uint64_t nxt = self._next
        if nxt >= cursor or max_records <= 0:
            return []
        cdef uint64_t end = cursor if cursor - nxt <= <uint64_t>max_records else nxt + max_records
        # Loaded after the cursor: the writer publishes a spilled record's end
        # before its cursor, so these cover every spilled seq below the cursor.
        cdef uint64_t written = ring_load_acquire(self._ow_p)
        cdef uint64_t base = ring_load_acquire(self._ob_p)
        cdef list out = []
        cdef uint64_t head, stop
        ovf = self._ovf
        queue = ovf.queue
        if not queue and ovf.pos >= written:
            self._ring_into(out, nxt, end)       # no spilled record pending: all in the ring
            self._next = end
            return out
        while nxt < end:
            if not queue and ovf.pos < written:
                ovf.fill(nxt, cursor, written, base)
            stop = end
            if queue:
                head = queue[0][0]
                if head == nxt:
                    out.append(ovf.take())
                    nxt += 1
                    continue
                if head < nxt:
                    self._broken = True
                    raise RingCorruptionError(f"overflow record {head} out of order at {nxt}")
                if head < stop:
                    stop = head
            self._ring_into(out, nxt, stop)
            nxt = stop
        self._next = nxt
        return out

    def release(self, seq):
        """Let the writer reuse everything up to and including seq. Call it only
        once seq is durable in the caller's own storage."""
        self._check()
        seq = operator.index(seq)
        if seq >= self._next:
            raise ValueError(f"release({seq}) is past the last record read ({self._next - 1})")
        if seq < ring_load_acquire(self._released_p):
            return
        end = self._ovf.release(seq)
        if end > <object>self._oc_p[0]:
            ring_store_release(self._oc_p, end)
        # Release: our copies out of these slots are done before the writer
        # can see that it may overwrite them.
        ring_store_release(self._released_p, seq + 1)

    def close(self):
        """Unmap the ring and give up the reader side. Idempotent."""
        if self._map != NULL:
            munmap(self._map, self._map_len)
            self._map = NULL
        if self._files is not None:
            self._files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
