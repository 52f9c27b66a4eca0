"""Call-control ring: the engine stamps every change of call control into it and
the accountant, a separate process, reads each record exactly once.

Pure-Python twin of `ext/ring.pyx` and the reference for the file format
(docs/ring.md). One writer process and one reader process share an mmap'd
file of fixed-size slots; when the ring is full or a record does not fit a
slot, records go to an append-only overflow file next to it, so nothing is
ever dropped.

The opening, locking, validation and crash recovery of a ring, and the
parsing of the overflow file, live here only: `ext.ring` calls them, so both
implementations agree on every cold path by construction. The C twin has its
own hot paths (slot writes and reads, spilling, the typed stamps).

Memory ordering: this module stores and loads the shared 64-bit cursors
through a memoryview cast to 'Q', i.e. with one aligned 8-byte memcpy each.
On x86-64 (total store order) that gives the acquire/release semantics the
protocol needs; on weakly ordered CPUs only the C twin is correct.
"""
from __future__ import annotations

import fcntl
import mmap
import operator
import os
import struct
import sys
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import msgpack

__all__ = [
    "RingWriter", "RingReader", "RingError", "RingFormatError", "RingBusyError",
    "RingCorruptionError", "ring_paths", "ring_info", "retained", "MAGIC", "VERSION",
]

MAGIC = b"BATNRING"
VERSION = 1
HEADER_SIZE = 4096
SLOT_HEADER = 12          # uint64 seq, uint32 length
OVF_HEADER = 16           # uint64 seq, uint32 length, uint32 crc32
DEFAULT_SLOTS = 65536
DEFAULT_SLOT_SIZE = 256
MIN_SLOT_SIZE = 32
MAX_SLOT_SIZE = 1 << 20
MAX_SLOTS = 1 << 26
MAX_RECORD = 1 << 24      # 16 MiB: larger is a caller bug, and bounds a torn length field
NODE_ID_MAX = 64

# Byte offsets in the header; each shared cursor owns a 64-byte cache line so
# the writer's stores never invalidate the line the reader writes, and back.
CURSOR_OFF = 128          # writer: next seq to publish
RELEASED_OFF = 192        # reader: every seq below may be overwritten
OVF_WRITTEN_OFF = 256     # writer: logical end of the published overflow bytes
OVF_BASE_OFF = 264        # writer: logical offset of the overflow file's byte 0
SPILLED_OFF = 272         # writer: records ever spilled (informational)
OVF_CONSUMED_OFF = 320    # reader: logical end of the released overflow bytes

_CUR, _REL = CURSOR_OFF // 8, RELEASED_OFF // 8
_OW, _OB, _SPL = OVF_WRITTEN_OFF // 8, OVF_BASE_OFF // 8, SPILLED_OFF // 8
_OC = OVF_CONSUMED_OFF // 8

_STATIC = struct.Struct("<8sIIIII4x64s")   # magic version header_size slot_size slots node_len node
_SLOT = struct.Struct("<QI")
_OVF = struct.Struct("<QII")
_SEQLEN = struct.Struct("<QI")
_CHUNK = 1 << 20
_QUEUE_MAX = 8192
_INT64 = (-(1 << 63), (1 << 63) - 1)


class RingError(Exception):
    """Base class of the ring's errors."""


class RingFormatError(RingError):
    """The file is not a ring this code can open (magic, version, geometry)."""


class RingBusyError(RingError):
    """Another process already holds the ring's writer (or reader) side."""


class RingCorruptionError(RingError):
    """A published record is missing or damaged; never skipped silently."""


def ring_paths(path: str) -> tuple[str, str, str, str]:
    """(ring, overflow, writer lock, reader lock) paths for a ring file path.

    `DATA/ring/ring.dat` gives `ring.overflow`, `ring.writer.lock` and
    `ring.reader.lock` in the same directory.
    """
    path = os.fspath(path)
    stem = os.path.splitext(path)[0]
    return path, stem + ".overflow", stem + ".writer.lock", stem + ".reader.lock"


def _check_geometry(slots: int, slot_size: int, node_id: str) -> bytes:
    if not 2 <= slots <= MAX_SLOTS or slots & (slots - 1):
        raise ValueError(f"slots must be a power of two in [2, {MAX_SLOTS}], not {slots}")
    if not MIN_SLOT_SIZE <= slot_size <= MAX_SLOT_SIZE or slot_size % 8:
        raise ValueError(f"slot_size must be a multiple of 8 in [{MIN_SLOT_SIZE}, "
                         f"{MAX_SLOT_SIZE}], not {slot_size}")
    if not isinstance(node_id, str):
        raise TypeError("node_id must be a str")
    node = node_id.encode()
    if not 1 <= len(node) <= NODE_ID_MAX:
        raise ValueError(f"node_id must be 1..{NODE_ID_MAX} bytes of UTF-8")
    return node


def _lock(path: str, side: str) -> int:
    # flock belongs to the open file description: the kernel drops it when the
    # holder dies, even by SIGKILL, so a restarted process never finds it stale.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RingBusyError(f"another process holds the {side} side of the ring ({path})") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _create(ring: str, ovf: str, slots: int, slot_size: int, node: bytes) -> None:
    # The overflow file exists before the ring does, and the ring appears by
    # rename: a crash during creation never leaves a half-written header.
    os.close(os.open(ovf, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644))
    hdr = bytearray(HEADER_SIZE)
    _STATIC.pack_into(hdr, 0, MAGIC, VERSION, HEADER_SIZE, slot_size, slots, len(node), node)
    struct.pack_into("<Q", hdr, CURSOR_OFF, 1)
    struct.pack_into("<Q", hdr, RELEASED_OFF, 1)
    tmp = f"{ring}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _pwrite_all(fd, hdr, 0)
        os.ftruncate(fd, HEADER_SIZE + slots * slot_size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, ring)
    _fsync_dir(ring)


def _read_static(fd: int, path: str) -> tuple[int, int, str]:
    raw = os.pread(fd, _STATIC.size, 0)
    if len(raw) < _STATIC.size:
        raise RingFormatError(f"{path}: too short to be a ring file")
    magic, version, hsize, slot_size, slots, nlen, node = _STATIC.unpack(raw)
    if magic != MAGIC:
        raise RingFormatError(f"{path}: not a Baton ring file (bad magic {magic!r})")
    if version != VERSION:
        raise RingFormatError(f"{path}: ring layout version {version}; this build reads "
                              f"version {VERSION} only")
    try:
        if hsize != HEADER_SIZE or not 1 <= nlen <= NODE_ID_MAX:
            raise ValueError("header size or node id length")
        _check_geometry(slots, slot_size, node[:nlen].decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RingFormatError(f"{path}: damaged ring header ({exc})") from None
    size = os.fstat(fd).st_size
    if size != HEADER_SIZE + slots * slot_size:
        raise RingFormatError(f"{path}: {size} bytes, expected {HEADER_SIZE + slots * slot_size} "
                              f"for {slots} slots of {slot_size}")
    return slot_size, slots, node[:nlen].decode()


def _scan(fd: int, pos: int, end: int, base: int) -> Iterator[tuple[int, bytes, int]]:
    """Intact overflow records between logical offsets pos and end, as
    (seq, payload, end offset); stops at the first torn or damaged one."""
    while pos < end:
        buf = memoryview(os.pread(fd, min(end - pos, _CHUNK), pos - base))
        off = 0
        while len(buf) - off >= OVF_HEADER:
            seq, n, crc = _OVF.unpack_from(buf, off)
            size = OVF_HEADER + n
            if n > MAX_RECORD or pos + off + size > end:
                return
            if off + size > len(buf):
                if off:
                    break                      # finish it in the next chunk
                buf = memoryview(os.pread(fd, size, pos - base))  # larger than a chunk
                if len(buf) < size:
                    return
                continue
            body = buf[off + OVF_HEADER:off + size]
            if zlib.crc32(body, zlib.crc32(buf[off:off + SLOT_HEADER])) != crc:
                return
            off += size
            yield seq, bytes(body), pos + off
        if not off:
            return                             # file shorter than advertised
        pos += off


def _header_view(mm: mmap.mmap) -> memoryview:
    return memoryview(mm)[:HEADER_SIZE].cast("Q")


def _recover(ring_fd: int, ovf_fd: int, ovf_path: str) -> None:
    """Writer-side recovery at open: drop the overflow records of a crashed
    writer that were written but never published (seq >= cursor), and a torn
    tail beyond the published end; reset the file when all of it is consumed."""
    with mmap.mmap(ring_fd, HEADER_SIZE) as mm:
        q = _header_view(mm)
        try:
            cursor, released = q[_CUR], q[_REL]
            written, base, consumed = q[_OW], q[_OB], q[_OC]
            if not (1 <= released <= cursor and base <= consumed <= written):
                raise RingCorruptionError(
                    f"inconsistent ring header: cursor={cursor} released={released} "
                    f"overflow base={base} consumed={consumed} written={written}")
            if consumed == written:
                # Order matters for a crash in between: an empty file with the
                # old base still reads as "nothing pending".
                os.ftruncate(ovf_fd, 0)
                q[_OB] = written
                return
            keep = consumed
            for seq, _payload, end in _scan(ovf_fd, consumed, written, base):
                if seq >= cursor:
                    break
                keep = end
            else:
                # Every byte below `written` was complete before it was
                # published, so a damaged record there is not a crash artefact.
                if keep < written:
                    raise RingCorruptionError(
                        f"{ovf_path}: published overflow record at offset {keep} is damaged")
            # Publish the shorter end before cutting the file: a crash between
            # the two leaves extra bytes, never a hole.
            q[_OW] = keep
            os.ftruncate(ovf_fd, keep - base)
        finally:
            q.release()


class _Files:
    """The descriptors of one open side of a ring."""

    __slots__ = ("path", "ring_fd", "ovf_fd", "lock_fd", "slots", "slot_size", "node_id")

    def __init__(self, path: str) -> None:
        self.path = path
        self.ring_fd = self.ovf_fd = self.lock_fd = -1
        self.slots = self.slot_size = 0
        self.node_id = ""

    def close(self) -> None:
        for name in ("ring_fd", "ovf_fd", "lock_fd"):   # the lock goes last
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def __del__(self) -> None:
        # An endpoint dropped without close() must not keep its side locked.
        self.close()


def _check_platform() -> None:
    if sys.byteorder != "little":
        raise RingError("the ring file format is little-endian; this machine is not")


def _open_writer(path: str, slots: int, slot_size: int, node_id: str) -> _Files:
    _check_platform()
    node = _check_geometry(slots, slot_size, node_id)
    ring, ovf, wlock, _ = ring_paths(path)
    os.makedirs(os.path.dirname(ring) or ".", exist_ok=True)
    files = _Files(ring)
    try:
        files.lock_fd = _lock(wlock, "writer")
        if not os.path.exists(ring):
            _create(ring, ovf, slots, slot_size, node)
        files.ring_fd = os.open(ring, os.O_RDWR | os.O_CLOEXEC)
        got = _read_static(files.ring_fd, ring)
        if got != (slot_size, slots, node_id):
            raise RingFormatError(
                f"{ring} was created with slot_size={got[0]}, slots={got[1]}, node_id={got[2]!r}; "
                f"asked for slot_size={slot_size}, slots={slots}, node_id={node_id!r} "
                f"(drain the ring and remove it to change them)")
        files.slot_size, files.slots, files.node_id = got
        files.ovf_fd = os.open(ovf, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _recover(files.ring_fd, files.ovf_fd, ovf)
    except BaseException:
        files.close()
        raise
    return files


def _open_reader(path: str) -> _Files:
    _check_platform()
    ring, ovf, _, rlock = ring_paths(path)
    if not os.path.exists(ring):
        raise FileNotFoundError(f"no ring at {ring}")
    files = _Files(ring)
    try:
        files.lock_fd = _lock(rlock, "reader")
        files.ring_fd = os.open(ring, os.O_RDWR | os.O_CLOEXEC)
        files.slot_size, files.slots, files.node_id = _read_static(files.ring_fd, ring)
        try:
            files.ovf_fd = os.open(ovf, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RingCorruptionError(f"the ring's overflow file {ovf} is missing") from None
    except BaseException:
        files.close()
        raise
    return files


def ring_info(path: str) -> dict[str, Any]:
    """The header of a ring as a dict, read without taking either side's lock."""
    ring = ring_paths(path)[0]
    fd = os.open(ring, os.O_RDONLY | os.O_CLOEXEC)
    try:
        slot_size, slots, node_id = _read_static(fd, ring)
        raw = os.pread(fd, HEADER_SIZE, 0)
    finally:
        os.close(fd)

    def u64(off: int) -> int:
        return struct.unpack_from("<Q", raw, off)[0]

    cursor, released = u64(CURSOR_OFF), u64(RELEASED_OFF)
    written, consumed = u64(OVF_WRITTEN_OFF), u64(OVF_CONSUMED_OFF)
    return {"version": VERSION, "slots": slots, "slot_size": slot_size, "node_id": node_id,
            "cursor": cursor, "released": released, "overflow_written": written,
            "overflow_base": u64(OVF_BASE_OFF), "overflow_consumed": consumed,
            "written": cursor - 1, "spilled": u64(SPILLED_OFF), "fill": cursor - released,
            "overflow_pending": written - consumed}


def retained(path: str) -> list[tuple[int, bytes]]:
    """The published records the ring still holds, as (seq, payload) in seq
    order, read without taking either side's lock and without moving the
    reader's position (the accountant's).

    Released records stay in their slots until the writer laps the ring, and
    in the overflow file until it is emptied: this is that window, up to the
    last `slots - 1` records of the slots and what the overflow file still
    has. Call it while no writer appends (before the writer opens): it reads
    the slots without the acquire/release protocol. A slot
    that holds another seq, and spilled records whose bytes are gone, are
    simply not part of the window.
    """
    ring, ovf, _, _ = ring_paths(path)
    fd = os.open(ring, os.O_RDONLY | os.O_CLOEXEC)
    try:
        slot_size, slots, _node = _read_static(fd, ring)
        head = os.pread(fd, HEADER_SIZE, 0)
        cursor, written, base = (struct.unpack_from("<Q", head, off)[0]
                                 for off in (CURSOR_OFF, OVF_WRITTEN_OFF, OVF_BASE_OFF))
        # Seq cursor - slots shares its slot with the unpublished seq `cursor`.
        first = max(1, cursor - slots + 1)
        spilled: dict[int, bytes] = {}
        try:
            ofd = os.open(ovf, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            ofd = -1
        if ofd >= 0:
            try:
                for seq, payload, _end in _scan(ofd, base, written, base):
                    if seq >= cursor:
                        break
                    spilled[seq] = payload
            finally:
                os.close(ofd)
        out = [(s, p) for s, p in spilled.items() if s < first]
        cap = slot_size - SLOT_HEADER
        mask = slots - 1
        with mmap.mmap(fd, HEADER_SIZE + slots * slot_size, prot=mmap.PROT_READ) as mm:
            for s in range(first, cursor):
                payload = spilled.get(s)
                if payload is None:
                    off = HEADER_SIZE + (s & mask) * slot_size
                    seq, n = _SLOT.unpack_from(mm, off)
                    if seq != s or n > cap:
                        continue
                    payload = mm[off + SLOT_HEADER:off + SLOT_HEADER + n]
                out.append((s, payload))
        out.sort(key=operator.itemgetter(0))
        return out
    finally:
        os.close(fd)


class _OverflowQueue:
    """The reader's view of the overflow file: records parsed but not yet
    returned (`queue`), and records returned or skipped but not yet released
    (`done`, with the logical offset just past each)."""

    __slots__ = ("fd", "pos", "queue", "done")

    def __init__(self, fd: int, consumed: int) -> None:
        self.fd = fd
        self.pos = consumed
        self.queue: deque[tuple[int, bytes, int]] = deque()
        self.done: deque[tuple[int, int]] = deque()

    def fill(self, next_seq: int, cursor: int, written: int, base: int) -> None:
        """Parse published records (seq < cursor) from `pos`; those below
        next_seq were processed before the reader's restart: mark them done."""
        # A record at or past the cursor may belong to a writer that died
        # before publishing it and will be replaced: never parse past one.
        for seq, payload, end in _scan(self.fd, self.pos, written, base):
            if seq >= cursor:
                break
            if seq < next_seq:
                self.done.append((seq, end))
            else:
                self.queue.append((seq, payload, end))
            self.pos = end
            if len(self.queue) >= _QUEUE_MAX:
                break

    def take(self) -> tuple[int, bytes]:
        seq, payload, end = self.queue.popleft()
        self.done.append((seq, end))
        return seq, payload

    def release(self, seq: int) -> int:
        """Forget the records <= seq; the offset past the last of them, or -1."""
        end = -1
        done = self.done
        while done and done[0][0] <= seq:
            end = done.popleft()[1]
        return end


def _str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    return value


def _int64(value: object) -> int:
    v = operator.index(value)
    if not _INT64[0] <= v <= _INT64[1]:
        raise OverflowError("value out of range of a 64-bit signed integer")
    return v


class RingWriter:
    """The engine's side of the ring: appends records, each under the next
    sequence number (1, 2, ... continuing across restarts).

    `RingWriter(path, slots=65536, slot_size=256, node_id="node1")` creates the
    ring at `path` (e.g. `DATA/ring/ring.dat`) or reopens it; reopening with a
    different geometry or node id raises RingFormatError. Only one writer may
    hold a ring (RingBusyError otherwise). A record is published, and will be
    read exactly once, when the append call returns; an interrupted append
    leaves no trace.
    """

    def __init__(self, path: str, slots: int = DEFAULT_SLOTS, slot_size: int = DEFAULT_SLOT_SIZE,
                 node_id: str = "node1") -> None:
        self._files = files = _open_writer(path, slots, slot_size, node_id)
        try:
            self._mm = mmap.mmap(files.ring_fd, HEADER_SIZE + slots * slot_size)
        except BaseException:
            files.close()
            raise
        self._q = q = _header_view(self._mm)
        self._fd = files.ovf_fd
        self._slots, self._slot_size, self._mask = slots, slot_size, slots - 1
        self._cap = slot_size - SLOT_HEADER
        self._node = node_id
        self._next = q[_CUR]
        self._released = q[_REL]
        self._ow, self._ob = q[_OW], q[_OB]

    # -- properties ---------------------------------------------------------
    @property
    def path(self) -> str:
        """The ring file."""
        return self._files.path

    @property
    def node_id(self) -> str:
        """The node id stored in the ring and in every typed record."""
        return self._node

    @property
    def slots(self) -> int:
        """Number of slots."""
        return self._slots

    @property
    def slot_size(self) -> int:
        """Bytes per slot; a record of up to slot_size - 12 bytes fits one."""
        return self._slot_size

    @property
    def next_seq(self) -> int:
        """The sequence number the next append will get."""
        self._check()
        return self._next

    @property
    def written(self) -> int:
        """Records ever published to this ring (by every writer incarnation)."""
        self._check()
        return self._q[_CUR] - 1

    @property
    def spilled(self) -> int:
        """Records ever published through the overflow file."""
        self._check()
        return self._q[_SPL]

    @property
    def fill(self) -> int:
        """Published records the reader has not released (cursor - released)."""
        self._check()
        return self._q[_CUR] - self._q[_REL]

    @property
    def overflow_pending(self) -> int:
        """Overflow bytes published but not yet released by the reader."""
        self._check()
        return self._q[_OW] - self._q[_OC]

    def stats(self) -> dict[str, int]:
        """written, spilled, fill and overflow_pending at once."""
        return {"written": self.written, "spilled": self.spilled, "fill": self.fill,
                "overflow_pending": self.overflow_pending}

    # -- appending ----------------------------------------------------------
    def _check(self) -> None:
        if self._mm is None:
            raise ValueError("the ring writer is closed")

    def _ring_offset(self, n: int) -> int:
        """Byte offset of the slot for the next record, or -1 to spill it."""
        if n > self._cap:
            return -1
        s = self._next
        if s - self._released >= self._slots:
            # Reloaded only when the stale copy says full: about once per lap.
            self._released = self._q[_REL]
            if self._ob != self._ow:
                self._maybe_reset_overflow()
            if s - self._released >= self._slots:
                return -1
        return HEADER_SIZE + (s & self._mask) * self._slot_size

    def _maybe_reset_overflow(self) -> None:
        # Once the reader has released all of the file, its position equals
        # the published end and it reads nothing more from the file: it can be
        # emptied. The new base is stored before any later end, so a reader
        # that sees that end sees the base too.
        if self._q[_OC] == self._ow:
            os.ftruncate(self._fd, 0)
            self._q[_OB] = self._ob = self._ow

    def _spill(self, s: int, payload) -> None:
        if self._ob != self._ow:
            self._maybe_reset_overflow()
        n = len(payload)
        head = _SEQLEN.pack(s, n)
        rec = head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload
        _pwrite_all(self._fd, rec, self._ow - self._ob)
        q = self._q
        self._ow += len(rec)
        q[_OW] = self._ow          # the bytes are in the file before their end is published,
        q[_CUR] = s + 1            # and the end before the cursor that makes the seq readable
        q[_SPL] += 1

    def _publish(self, payload) -> int:
        n = len(payload)
        if n > MAX_RECORD:
            raise ValueError(f"record of {n} bytes exceeds the {MAX_RECORD}-byte limit")
        s = self._next
        off = self._ring_offset(n)
        if off >= 0:
            mm = self._mm
            _SLOT.pack_into(mm, off, s, n)
            mm[off + SLOT_HEADER:off + SLOT_HEADER + n] = payload
            self._q[_CUR] = s + 1  # publish: the slot's stores are already visible (TSO)
        else:
            self._spill(s, payload)
        self._next = s + 1
        return s

    def append(self, payload: bytes | bytearray | memoryview) -> int:
        """Publish one record of raw bytes; return its sequence number."""
        self._check()
        if not isinstance(payload, bytes):
            payload = bytes(memoryview(payload))
        return self._publish(payload)

    def append_record(self, obj: Mapping[str, Any]) -> int:
        """Publish `{"seq": seq, "node": node_id, **obj}` packed with msgpack;
        return seq. The keys "seq" and "node" are reserved (ValueError)."""
        self._check()
        if not isinstance(obj, Mapping):
            raise TypeError("append_record takes a mapping")
        if "seq" in obj or "node" in obj:
            raise ValueError('"seq" and "node" are set by the ring; remove them from the record')
        rec = {"seq": self._next, "node": self._node}
        rec.update(obj)
        return self._publish(msgpack.packb(rec))

    def stamp_transition(self, session_id: str, account: str, from_module: str, to_module: str,
                         level: str, reason: str, mono_ns: int, wall_ns: int) -> int:
        """Publish a change of the module in control of a call:
        {"type": "transition", "seq", "node", "session", "account", "from", "to",
        "level", "reason", "mono_ns", "wall_ns"}; return its seq."""
        self._check()
        rec = {"type": "transition", "seq": self._next, "node": self._node,
               "session": _str("session_id", session_id), "account": _str("account", account),
               "from": _str("from_module", from_module), "to": _str("to_module", to_module),
               "level": _str("level", level), "reason": _str("reason", reason),
               "mono_ns": _int64(mono_ns), "wall_ns": _int64(wall_ns)}
        return self._publish(msgpack.packb(rec))

    def stamp_session(self, kind: str, session_id: str, account: str, mono_ns: int, wall_ns: int,
                      reason: str = "") -> int:
        """Publish the start or end of a call: {"type": "session", "seq", "node",
        "kind" ("start" | "end"), "session", "account", "reason", "mono_ns",
        "wall_ns"}; return its seq."""
        self._check()
        if kind != "start" and kind != "end":
            raise ValueError(f'kind must be "start" or "end", not {kind!r}')
        rec = {"type": "session", "seq": self._next, "node": self._node, "kind": kind,
               "session": _str("session_id", session_id), "account": _str("account", account),
               "reason": _str("reason", reason), "mono_ns": _int64(mono_ns),
               "wall_ns": _int64(wall_ns)}
        return self._publish(msgpack.packb(rec))

    def stamp_action(self, session_id: str, account: str, module: str, action: str,
                     count: int) -> int:
        """Publish a metered action: {"type": "action", "seq", "node", "session",
        "account", "module", "action", "count"}; return its seq."""
        self._check()
        rec = {"type": "action", "seq": self._next, "node": self._node,
               "session": _str("session_id", session_id), "account": _str("account", account),
               "module": _str("module", module), "action": _str("action", action),
               "count": _int64(count)}
        return self._publish(msgpack.packb(rec))

    # -- lifetime -----------------------------------------------------------
    def flush(self) -> None:
        """msync the ring and fsync the overflow file. Published records already
        survive a crash of the process; this is for a crash of the machine."""
        self._check()
        self._mm.flush()
        os.fsync(self._fd)

    def close(self) -> None:
        """Unmap the ring and give up the writer side. Idempotent."""
        if self._mm is not None:
            self._q.release()
            self._mm.close()
            self._mm = None
            self._files.close()

    def __enter__(self) -> RingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_mm", None) is not None:
            self.close()


class RingReader:
    """The accountant's side of the ring: returns every record once, in order.

    `RingReader(path, start_seq)` resumes after `start_seq`, the last seq the
    caller has durably processed (its own storage keeps it); None resumes at
    the ring's released position. `release(seq)` hands records up to seq back
    to the writer: call it only after the caller's commit, because a restarted
    reader can only resume from a seq that has not been released.
    """

    def __init__(self, path: str, start_seq: int | None = None) -> None:
        self._files = files = _open_reader(path)
        self._mm = None
        try:
            self._mm = mmap.mmap(files.ring_fd, HEADER_SIZE + files.slots * files.slot_size)
            self._q = q = _header_view(self._mm)
            cursor, released = q[_CUR], q[_REL]
            nxt = released if start_seq is None else operator.index(start_seq) + 1
            if nxt < released:
                raise ValueError(f"start_seq {start_seq} was already released (the ring keeps seq "
                                 f">= {released} only); resume from your committed position")
            if nxt > cursor:
                raise ValueError(f"start_seq {start_seq} is ahead of the ring, whose last "
                                 f"record is {cursor - 1}")
            self._ovf = _OverflowQueue(files.ovf_fd, q[_OC])
            # The end before the base (see _maybe_reset_overflow). Records
            # already processed are skipped but remembered, for release.
            written = q[_OW]
            self._ovf.fill(nxt, nxt, written, q[_OB])
        except BaseException:
            self.close()
            raise
        self._slots, self._slot_size, self._mask = files.slots, files.slot_size, files.slots - 1
        self._cap = files.slot_size - SLOT_HEADER
        self._next = nxt
        self._broken = False

    @property
    def path(self) -> str:
        """The ring file."""
        return self._files.path

    @property
    def node_id(self) -> str:
        """The writer's node id, from the ring header."""
        return self._files.node_id

    @property
    def slots(self) -> int:
        """Number of slots."""
        return self._slots

    @property
    def slot_size(self) -> int:
        """Bytes per slot."""
        return self._slot_size

    @property
    def position(self) -> int:
        """The last seq returned by read() (or start_seq)."""
        return self._next - 1

    @property
    def available(self) -> int:
        """Records published and not yet returned."""
        self._check()
        return self._q[_CUR] - self._next

    @property
    def written(self) -> int:
        """Records ever published to this ring."""
        self._check()
        return self._q[_CUR] - 1

    @property
    def spilled(self) -> int:
        """Records ever published through the overflow file."""
        self._check()
        return self._q[_SPL]

    @property
    def fill(self) -> int:
        """Published records not yet released (cursor - released)."""
        self._check()
        return self._q[_CUR] - self._q[_REL]

    @property
    def overflow_pending(self) -> int:
        """Overflow bytes published but not yet released."""
        self._check()
        return self._q[_OW] - self._q[_OC]

    def stats(self) -> dict[str, int]:
        """written, spilled, fill, overflow_pending and position at once."""
        return {"written": self.written, "spilled": self.spilled, "fill": self.fill,
                "overflow_pending": self.overflow_pending, "position": self.position}

    def _check(self) -> None:
        if self._mm is None:
            raise ValueError("the ring reader is closed")

    def read(self, max_records: int = 4096) -> list[tuple[int, bytes]]:
        """The next published records, at most max_records, as (seq, payload)
        in seq order; [] when there is none. Never waits."""
        self._check()
        if self._broken:
            raise RingCorruptionError("the reader hit a damaged record; reopen it")
        q = self._q
        cursor = q[_CUR]          # loaded first: every record below it is complete
        nxt = self._next
        if nxt >= cursor or max_records <= 0:
            return []
        # Loaded after the cursor, end before base: they cover every spilled seq < cursor.
        written, base = q[_OW], q[_OB]
        end = min(cursor, nxt + max_records)
        ovf = self._ovf
        mm, cap, mask, size = self._mm, self._cap, self._mask, self._slot_size
        unpack = _SLOT.unpack_from
        out: list[tuple[int, bytes]] = []
        while nxt < end:
            if not ovf.queue and ovf.pos < written:
                ovf.fill(nxt, cursor, written, base)
            stop = end
            if ovf.queue:
                head = ovf.queue[0][0]
                if head == nxt:
                    out.append(ovf.take())
                    nxt += 1
                    continue
                if head < nxt:
                    self._broken = True
                    raise RingCorruptionError(f"overflow record {head} out of order at {nxt}")
                stop = min(end, head)
            # A published seq that is not next in the overflow is in its slot,
            # which the writer cannot reuse before we release it.
            for s in range(nxt, stop):
                off = HEADER_SIZE + (s & mask) * size
                seq, n = unpack(mm, off)
                if seq != s or n > cap:
                    self._broken = True
                    raise RingCorruptionError(f"record {s} is missing (its slot holds seq {seq})")
                out.append((s, mm[off + SLOT_HEADER:off + SLOT_HEADER + n]))
            nxt = stop
        self._next = nxt
        return out

    def release(self, seq: int) -> None:
        """Let the writer reuse everything up to and including seq. Call it only
        once seq is durable in the caller's own storage."""
        self._check()
        seq = operator.index(seq)
        if seq >= self._next:
            raise ValueError(f"release({seq}) is past the last record read ({self._next - 1})")
        q = self._q
        if seq < q[_REL]:
            return
        end = self._ovf.release(seq)
        if end > q[_OC]:
            q[_OC] = end
        q[_REL] = seq + 1     # after our last load of the released slots' bytes

    def close(self) -> None:
        """Unmap the ring and give up the reader side. Idempotent."""
        if self._mm is not None:
            if getattr(self, "_q", None) is not None:
                self._q.release()
            self._mm.close()
            self._mm = None
        self._files.close()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_files", None) is not None:
            self.close()
