"""The call-control ring (ext/ring.pyx and its twin ext/ring_py.py).

Billing reads this ring: every test here comes down to "each published record
is read exactly once, in order, and nothing else is". Unit tests cover the
paths one by one, a hypothesis model random interleavings, and subprocesses
the cross-process and SIGKILL cases. The C tests skip when ext.ring is not
built or BATON_NO_EXTENSIONS=1.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext import ring_py

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "ring_worker.py")
sys.path.insert(0, HERE)
from ring_worker import EXIT_DUPLICATE, payload_for  # noqa: E402

try:
    if os.environ.get("BATON_NO_EXTENSIONS"):
        raise ImportError("extensions disabled")
    from ext import ring as c_ring
except ImportError:
    c_ring = None

_NO_C = pytest.mark.skipif(c_ring is None, reason="ext.ring not built or disabled")
IMPLS = [pytest.param(c_ring, id="c", marks=_NO_C), pytest.param(ring_py, id="py")]
IMPL_NAMES = [pytest.param("c", id="c", marks=_NO_C), pytest.param("py", id="py")]
PAIRS = [pytest.param(w, r, id=f"{w}-{r}",
                      marks=[_NO_C] if "c" in (w, r) else [])
         for w in ("c", "py") for r in ("c", "py")]
AVAILABLE = [m for m in (c_ring, ring_py) if m is not None]


def by_name(name: str):
    return c_ring if name == "c" else ring_py


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "ring" / "ring.dat")


def drain(r, batch: int = 1000, release: bool = True) -> list[tuple[int, bytes]]:
    out = []
    while True:
        got = r.read(batch)
        if not got:
            return out
        out += got
        if release:
            r.release(got[-1][0])


def ovf_size(path: str) -> int:
    return os.path.getsize(ring_py.ring_paths(path)[1])


# ---------------------------------------------------------------- basics


@pytest.mark.parametrize("mod", IMPLS)
def test_round_trip(mod, path):
    with mod.RingWriter(path, slots=16, slot_size=64) as w, mod.RingReader(path, 0) as r:
        assert r.read() == []
        assert w.next_seq == 1
        assert w.append(b"one") == 1
        assert w.append(bytearray(b"two")) == 2
        assert w.append(memoryview(b"xthreex")[1:-1]) == 3
        assert w.append(b"") == 4
        assert r.available == 4
        assert r.read(2) == [(1, b"one"), (2, b"two")]
        assert r.read(0) == []
        assert r.read() == [(3, b"three"), (4, b"")]
        assert r.position == 4 and r.read() == []
        assert (w.node_id, r.node_id, r.slots, r.slot_size) == ("node1", "node1", 16, 64)
        with pytest.raises(TypeError):
            w.append(12)


@pytest.mark.parametrize("mod", IMPLS)
def test_wraps_around_many_times(mod, path):
    rng = random.Random(7)
    with mod.RingWriter(path, slots=8, slot_size=64) as w, mod.RingReader(path, 0) as r:
        sent, got = [], []
        for _ in range(400):
            for _ in range(rng.randint(0, 8 - w.fill)):
                data = rng.randbytes(rng.randint(0, 52))
                sent.append((w.append(data), data))
            batch = r.read(rng.randint(1, 8))
            got += batch
            if batch:
                r.release(batch[-1][0])
        got += drain(r)
        assert got == sent and len(sent) > 1000
        assert w.spilled == 0 and w.fill == 0 and w.overflow_pending == 0


@pytest.mark.parametrize("mod", IMPLS)
def test_full_ring_spills_in_order_then_returns_to_ring(mod, path):
    with mod.RingWriter(path, slots=8, slot_size=64) as w, mod.RingReader(path, 0) as r:
        sent = [(w.append(b"r%d" % i), b"r%d" % i) for i in range(20)]
        assert w.stats() == {"written": 20, "spilled": 12, "fill": 20,
                             "overflow_pending": 12 * 16 + sum(len(d) for _, d in sent[8:])}
        got = r.read(5)
        r.release(5)
        # Slots are reused by seq: 21 - 6 >= 8, so this one still spills.
        sent.append((w.append(b"late"), b"late"))
        assert w.spilled == 13
        got += r.read(14)
        r.release(19)
        # 22 - 20 < 8: back in the ring while 20 and 21 wait in the overflow.
        sent.append((w.append(b"ring"), b"ring"))
        assert w.spilled == 13 and w.overflow_pending > 0
        got += r.read(100)
        assert got == sent                     # merged by seq: 20, 21 spilled, 22 from the ring
        r.release(got[-1][0])
        assert (w.fill, w.overflow_pending) == (0, 0)
        for i in range(8):                     # a lap later the released overflow is reset
            sent.append((w.append(b"lap%d" % i), b"lap%d" % i))
        assert w.spilled == 13
        assert ovf_size(path) == 0
        assert r.read() == sent[-8:]


@pytest.mark.parametrize("mod", IMPLS)
def test_oversized_records_go_to_overflow(mod, path):
    big = [os.urandom(100_000) for _ in range(12)] + [os.urandom(2_500_000)]  # past 1 MiB chunks
    with mod.RingWriter(path, slots=64, slot_size=64) as w, mod.RingReader(path, 0) as r:
        sent = [(w.append(b"small"), b"small")]
        for data in big:
            sent.append((w.append(data), data))
            sent.append((w.append(b"after"), b"after"))   # in the ring, after the spilled one
        assert w.spilled == len(big)
        assert drain(r, batch=3) == sent
        with pytest.raises(ValueError):
            w.append(bytes(ring_py.MAX_RECORD + 1))
        assert w.next_seq == len(sent) + 1


@pytest.mark.parametrize("mod", IMPLS)
def test_counters(mod, path):
    with mod.RingWriter(path, slots=4, slot_size=32) as w, mod.RingReader(path, 0) as r:
        for i in range(6):
            w.append(b"%d" % i)
        assert (w.written, w.spilled, w.fill) == (6, 2, 6)
        assert w.overflow_pending == 2 * (16 + 1)
        assert r.stats() == {"written": 6, "spilled": 2, "fill": 6,
                             "overflow_pending": 34, "position": 0}
        r.read()
        r.release(6)
        assert (w.fill, w.overflow_pending, r.position) == (0, 0, 6)


@pytest.mark.parametrize("mod", IMPLS)
def test_closed_and_locked(mod, path):
    w = mod.RingWriter(path, slots=8, slot_size=64)
    r = mod.RingReader(path)
    with pytest.raises(ring_py.RingBusyError):
        mod.RingWriter(path, slots=8, slot_size=64)
    with pytest.raises(ring_py.RingBusyError):
        mod.RingReader(path)
    w.close()
    w.close()
    r.close()
    with pytest.raises(ValueError):
        w.append(b"x")
    with pytest.raises(ValueError):
        r.read()
    with mod.RingWriter(path, slots=8, slot_size=64) as w2, mod.RingReader(path) as r2:
        w2.append(b"x")
        assert r2.read() == [(1, b"x")]


# ---------------------------------------------------------------- restarts


@pytest.mark.parametrize("wmod", IMPLS)
@pytest.mark.parametrize("rmod", IMPLS)
def test_writer_restart_continues_seq(wmod, rmod, path):
    with wmod.RingWriter(path, slots=8, slot_size=64) as w:
        for i in range(12):                    # 4 of them spilled
            w.append(b"a%d" % i)
    with rmod.RingReader(path, 0) as r:
        got = r.read(3)
        r.release(3)
        with wmod.RingWriter(path, slots=8, slot_size=64) as w:
            assert w.next_seq == 13
            assert w.append(b"b") == 13
            assert w.spilled == 5
        got += drain(r)
    assert got == [(i + 1, b"a%d" % i) for i in range(12)] + [(13, b"b")]


@pytest.mark.parametrize("wmod", IMPLS)
@pytest.mark.parametrize("rmod", IMPLS)
def test_reader_restart_from_its_position(wmod, rmod, path):
    with wmod.RingWriter(path, slots=8, slot_size=64) as w:
        sent = [(w.append(b"%d" % i * (i % 5)), b"%d" % i * (i % 5)) for i in range(30)]
        with rmod.RingReader(path, 0) as r:
            assert r.read(10) == sent[:10]
            r.release(6)                       # committed up to 6, read up to 10
        for start in (6, 9, 14, 25, 30):       # ring and overflow positions
            with rmod.RingReader(path, start) as r:
                assert drain(r, release=False) == sent[start:]
        with rmod.RingReader(path) as r:       # None: from the released position
            assert r.position == 6 and r.read(1) == [sent[6]]
        with pytest.raises(ValueError, match="already released"):
            rmod.RingReader(path, 4)
        with pytest.raises(ValueError, match="ahead"):
            rmod.RingReader(path, 31)
        with rmod.RingReader(path, 6) as r:
            r.read(20)
            with pytest.raises(ValueError, match="past the last record"):
                r.release(27)
            r.release(26)
            assert w.fill == 4
        with rmod.RingReader(path, 26) as r:
            assert drain(r) == sent[26:]
        assert (w.fill, w.overflow_pending) == (0, 0)


@pytest.mark.parametrize("mod", IMPLS)
def test_unpublished_writes_of_a_dead_writer_are_not_there(mod, path):
    with mod.RingWriter(path, slots=8, slot_size=64) as w:
        w.append(b"one")
    # A writer that died between filling slot 2 and publishing it.
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, struct.pack("<QI", 2, 5) + b"ghost", ring_py.HEADER_SIZE + 2 * 64)
    os.close(fd)
    with mod.RingWriter(path, slots=8, slot_size=64) as w, mod.RingReader(path, 0) as r:
        assert r.read() == [(1, b"one")]
        assert w.append(b"two") == 2
        assert r.read() == [(2, b"two")]
        for i in range(8):
            w.append(b"x")                     # 3..10, the last ones spilled
        assert w.spilled > 0
    # A writer that died after appending seq 11 to the overflow and publishing
    # the overflow end, but before publishing the cursor.
    info = ring_py.ring_info(path)
    rec = b"ghost2"
    head = struct.pack("<QI", 11, len(rec))
    ovf = ring_py.ring_paths(path)[1]
    with open(ovf, "ab") as f:
        f.write(head + struct.pack("<I", zlib.crc32(rec, zlib.crc32(head))) + rec)
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, struct.pack("<Q", info["overflow_written"] + 16 + len(rec)),
              ring_py.OVF_WRITTEN_OFF)
    os.close(fd)
    with mod.RingReader(path, 2) as r:
        assert [s for s, _ in drain(r, release=False)] == list(range(3, 11))
        with mod.RingWriter(path, slots=8, slot_size=64) as w:
            assert w.append(b"eleven") == 11
        assert r.read() == [(11, b"eleven")]


@pytest.mark.parametrize("mod", IMPLS)
def test_torn_overflow_tail_is_ignored(mod, path):
    with mod.RingWriter(path, slots=4, slot_size=32) as w:
        sent = [(w.append(b"rec%d" % i), b"rec%d" % i) for i in range(10)]
    ovf = ring_py.ring_paths(path)[1]
    published = os.path.getsize(ovf)
    with open(ovf, "ab") as f:                 # a record cut short by a crash
        f.write(struct.pack("<QII", 11, 500, 0) + b"partial")
    with mod.RingReader(path, 0) as r:
        assert r.read() == sent
        with mod.RingWriter(path, slots=4, slot_size=32) as w:
            assert os.path.getsize(ovf) == published
            sent.append((w.append(b"next"), b"next"))
        assert r.read() == sent[-1:]


@pytest.mark.parametrize("mod", IMPLS)
def test_damaged_published_record_is_an_error_not_a_skip(mod, path):
    with mod.RingWriter(path, slots=4, slot_size=32) as w:
        for i in range(8):
            w.append(b"rec%d" % i)
    ovf = ring_py.ring_paths(path)[1]
    with open(ovf, "r+b") as f:
        f.seek(16 + 2)
        f.write(b"X")                          # inside the payload of seq 5
    with mod.RingReader(path, 0) as r:
        assert [s for s, _ in r.read(4)] == [1, 2, 3, 4]
        with pytest.raises(ring_py.RingCorruptionError):
            r.read()
        with pytest.raises(ring_py.RingCorruptionError):
            r.read()
    with pytest.raises(ring_py.RingCorruptionError, match="damaged"):
        mod.RingWriter(path, slots=4, slot_size=32)


@pytest.mark.parametrize("mod", IMPLS)
def test_bad_files_are_refused_clearly(mod, path, tmp_path):
    with mod.RingWriter(path, slots=8, slot_size=64):
        pass
    good = open(path, "rb").read()

    def put(data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)

    put(b"NOTARING" + good[8:])
    for opener in (lambda: mod.RingReader(path), lambda: mod.RingWriter(path, 8, 64)):
        with pytest.raises(ring_py.RingFormatError, match="bad magic"):
            opener()
    put(good[:8] + struct.pack("<I", 99) + good[12:])
    for opener in (lambda: mod.RingReader(path), lambda: mod.RingWriter(path, 8, 64)):
        with pytest.raises(ring_py.RingFormatError, match="version 99"):
            opener()
    put(good[:-64])
    with pytest.raises(ring_py.RingFormatError, match="expected"):
        mod.RingReader(path)
    put(good)
    with pytest.raises(ring_py.RingFormatError, match="slots=8"):
        mod.RingWriter(path, slots=16, slot_size=64)
    with pytest.raises(ring_py.RingFormatError, match="node_id"):
        mod.RingWriter(path, slots=8, slot_size=64, node_id="node2")
    with pytest.raises(ValueError):
        mod.RingWriter(str(tmp_path / "x.dat"), slots=12)
    with pytest.raises(ValueError):
        mod.RingWriter(str(tmp_path / "x.dat"), slot_size=100)
    with pytest.raises(FileNotFoundError):
        mod.RingReader(str(tmp_path / "none.dat"))


# ---------------------------------------------------------------- typed records


def _advance(w, r, seq: int) -> None:
    while w.next_seq < seq:
        w.append(b"")
        if w.fill >= 4:
            r.release(r.read()[-1][0])
    drain(r)


TEXTS = ["", "ivr", "x" * 31, "y" * 32, "z" * 255, "w" * 256, "ü€😀" * 30, "v" * 70000]
INTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1,
        -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]


@pytest.mark.parametrize("mod", IMPLS)
def test_typed_stamps_decode_to_the_documented_maps(mod, path):
    with mod.RingWriter(path, slots=8, slot_size=256, node_id="edge-7") as w, \
            mod.RingReader(path, 0) as r:
        for target in (1, 120, 200, 300, 70000):   # every width of the seq field
            _advance(w, r, target)
            for k in range(len(INTS)):             # every width of every field
                t = [TEXTS[(k + j) % len(TEXTS)] for j in range(6)]
                i = [INTS[(k + 7 * j) % len(INTS)] for j in range(3)]
                s1 = w.stamp_transition(t[0], t[1], t[2], t[3], t[4], t[5], i[0], i[1])
                s2 = w.stamp_session("start", t[0], t[1], i[0], i[1])
                s3 = w.stamp_session("end", t[1], t[0], i[1], i[2], reason=t[5])
                s4 = w.stamp_action(t[0], t[1], t[2], t[3], i[2])
                want = {
                    s1: {"type": "transition", "seq": s1, "node": "edge-7", "session": t[0],
                         "account": t[1], "from": t[2], "to": t[3], "level": t[4],
                         "reason": t[5], "mono_ns": i[0], "wall_ns": i[1]},
                    s2: {"type": "session", "seq": s2, "node": "edge-7", "kind": "start",
                         "session": t[0], "account": t[1], "reason": "", "mono_ns": i[0],
                         "wall_ns": i[1]},
                    s3: {"type": "session", "seq": s3, "node": "edge-7", "kind": "end",
                         "session": t[1], "account": t[0], "reason": t[5], "mono_ns": i[1],
                         "wall_ns": i[2]},
                    s4: {"type": "action", "seq": s4, "node": "edge-7", "session": t[0],
                         "account": t[1], "module": t[2], "action": t[3], "count": i[2]},
                }
                for seq, data in drain(r):
                    assert msgpack.unpackb(data) == want[seq]
                    assert list(msgpack.unpackb(data)) == list(want[seq])   # key order too
                    assert data == msgpack.packb(want[seq])                # byte for byte


@pytest.mark.parametrize("mod", IMPLS)
def test_typed_stamps_reject_bad_arguments(mod, path):
    with mod.RingWriter(path, slots=8, slot_size=256) as w:
        with pytest.raises(ValueError):
            w.stamp_session("middle", "s", "a", 1, 2)
        with pytest.raises(TypeError):
            w.stamp_action(None, "a", "m", "x", 1)
        with pytest.raises(TypeError):
            w.stamp_transition("s", "a", "f", "t", "l", "r", 1.5, 2)
        with pytest.raises(OverflowError):
            w.stamp_action("s", "a", "m", "x", 2**63)
        assert w.next_seq == 1                 # nothing was published


@pytest.mark.parametrize("mod", IMPLS)
def test_append_record(mod, path):
    with mod.RingWriter(path, slots=8, slot_size=64, node_id="n9") as w, \
            mod.RingReader(path, 0) as r:
        s = w.append_record({"type": "custom", "n": [1, 2], "blob": b"\x00\x01"})
        big = w.append_record({"text": "t" * 500})
        (s1, d1), (s2, d2) = r.read()
        assert (s1, s2) == (s, big)
        assert msgpack.unpackb(d1) == {"seq": s, "node": "n9", "type": "custom", "n": [1, 2],
                                       "blob": b"\x00\x01"}
        assert msgpack.unpackb(d2) == {"seq": big, "node": "n9", "text": "t" * 500}
        for bad in ({"seq": 1}, {"node": "x"}):
            with pytest.raises(ValueError):
                w.append_record(bad)
        with pytest.raises(TypeError):
            w.append_record([1, 2])


def test_implementation_chooser():
    code = "from ext.kernels import ring; print(ring.IMPLEMENTATION, ring.RingWriter.__module__)"
    env = dict(os.environ, BATON_NO_EXTENSIONS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["py", "ext.ring_py"]
    if c_ring is not None:
        env.pop("BATON_NO_EXTENSIONS")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout.split()
        assert out == ["c", "ext.ring"]


# ---------------------------------------------------------------- model (hypothesis)

_OPS = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 52) | st.integers(53, 400)),
    st.tuples(st.just("burst"), st.integers(1, 20)),
    st.tuples(st.just("read"), st.integers(1, 12)),
    st.tuples(st.just("commit"), st.none()),
    st.tuples(st.just("release"), st.none()),
    st.tuples(st.just("reopen_writer"), st.sampled_from(AVAILABLE)),
    st.tuples(st.just("reopen_reader"), st.sampled_from(AVAILABLE)),
    st.tuples(st.just("reopen_reader_released"), st.sampled_from(AVAILABLE)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_OPS, max_size=150), wmod=st.sampled_from(AVAILABLE),
       rmod=st.sampled_from(AVAILABLE))
def test_model_exactly_once(ops, wmod, rmod):
    """Random appends (oversized too), reads, commits, releases and reopenings
    of either side with either implementation: the reader returns exactly the
    appended payloads in order, from its committed position, each once."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ring.dat")
        geometry = {"slots": 8, "slot_size": 64}
        w = wmod.RingWriter(path, **geometry)
        r = rmod.RingReader(path, 0)
        sent: list[bytes] = []
        pos = committed = released = 0

        def append(size: int) -> None:
            data = (w.next_seq.to_bytes(8, "little") * (size // 8 + 1))[:size]
            assert w.append(data) == len(sent) + 1
            sent.append(data)

        try:
            for op, arg in ops:
                if op == "append":
                    append(arg)
                elif op == "burst":
                    for k in range(arg):
                        append(k * 7 % 50)
                elif op == "read":
                    got = r.read(arg)
                    want = [(s, sent[s - 1]) for s in range(pos + 1, min(pos + arg, len(sent)) + 1)]
                    assert got == want
                    pos += len(got)
                elif op == "commit":
                    committed = pos
                elif op == "release":
                    if committed > released:
                        r.release(committed)
                        released = committed
                    assert w.fill == len(sent) - released
                elif op == "reopen_writer":
                    w.close()
                    w = arg.RingWriter(path, **geometry)
                    assert w.next_seq == len(sent) + 1
                else:
                    r.close()
                    start = committed if op == "reopen_reader" else None
                    r = arg.RingReader(path, start)
                    pos = committed if start is not None else released
                    committed = pos
            while True:
                got = r.read(5)
                if not got:
                    break
                assert got == [(s, sent[s - 1]) for s in range(pos + 1, pos + len(got) + 1)]
                pos += len(got)
            assert pos == len(sent)
            if pos:
                r.release(pos)
            assert (w.fill, w.overflow_pending) == (0, 0)
        finally:
            w.close()
            r.close()


# ---------------------------------------------------------------- processes


def _worker(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, *args], cwd=ROOT, text=True, **kw)


def _finish(p: subprocess.Popen, timeout: float = 60) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"worker exited {p.returncode}: {err}"
    return out


@pytest.mark.parametrize("wimpl,rimpl", PAIRS)
def test_two_processes_200k_records(path, wimpl, rimpl):
    """One process writes 200,000 records of 0..1300 bytes into a 1024-slot
    ring while another drains it: it spills, and every record arrives once."""
    n = 200_000
    with ring_py.RingWriter(path, slots=1024, slot_size=256):
        pass
    reader = _worker("reader", path, "--impl", rimpl, "--checksum", "--until", str(n),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    writer = _worker("writer", path, "--impl", wimpl, "--count", str(n), "--slots", "1024",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wrote = json.loads(_finish(writer))
    read = json.loads(_finish(reader))
    assert (wrote["first"], wrote["last"]) == (1, n)
    assert (read["count"], read["last"], read["crc"]) == (n, n, wrote["crc"])
    assert read["spilled"] > 0 and read["fill"] == 0 and read["overflow_pending"] == 0


def _db_rows(db: str) -> tuple[int, int, int, int]:
    con = sqlite3.connect(db)
    try:
        count, lo, hi = con.execute("SELECT count(*), min(seq), max(seq) FROM seen").fetchone()
        pos = con.execute("SELECT seq FROM position").fetchone()[0]
    finally:
        con.close()
    return count, lo, hi, pos


def _check_log(log: str) -> int:
    """Every seq a writer logged (its append had returned) is below the cursor
    the next writer started from: a crash lost no published record. Returns
    the highest logged seq."""
    top = 0
    with open(log) as f:
        for line in f:
            word = line.split()
            if len(word) == 2 and word[0] == "start" and word[1].isdigit():
                assert top < int(word[1]), f"{top} was published, yet a writer restarted at {word[1]}"
            elif len(word) == 1 and word[0].isdigit():
                top = max(top, int(word[0]))
    return top


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_kill9_writer_loses_and_repeats_nothing(tmp_path, path, impl):
    """SIGKILL the writer at random moments while it appends flat out (into
    slots, into the overflow, during its recovery at start), restart it, go on:
    a concurrent reader gets seqs 1..cursor-1 once each, in order, each with
    its own payload, and no seq an append had returned is missing."""
    rng = random.Random(0x5EED ^ len(impl))
    stop, log = str(tmp_path / "stop"), str(tmp_path / "log")
    geometry = ("--slots", "64", "--slot-size", "128")
    with ring_py.RingWriter(path, slots=64, slot_size=128):
        pass
    reader = _worker("reader", path, "--impl", impl, "--checksum", "--stop-file", stop,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(12):
            w = _worker("writer", path, "--impl", impl, "--log", log, *geometry,
                        stdout=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.1, 0.4))
            w.send_signal(signal.SIGKILL)
            w.wait()
        final = json.loads(_finish(_worker("writer", path, "--impl", impl, "--count", "2000",
                                           "--log", log, *geometry, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE)))
        info = ring_py.ring_info(path)
        last = info["written"]
        assert final["last"] == last
        assert _check_log(log) == last
        with open(stop, "w") as f:
            f.write(str(last))
        read = json.loads(_finish(reader))
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert (read["count"], read["last"]) == (last, last)
    assert last > 5_000 and info["spilled"] > 0
    assert ring_py.ring_info(path)["fill"] == 0


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_kill9_reader_reads_each_record_once(tmp_path, path, impl):
    """SIGKILL the accountant at random moments (mid-transaction, between its
    commit and its release, ...): restarted from its SQLite position it still
    records every seq exactly once (a second insert of a seq fails)."""
    rng = random.Random(0xACC ^ len(impl))
    db, stop = str(tmp_path / "acct.db"), str(tmp_path / "stop")
    n = 60_000
    with ring_py.RingWriter(path, slots=64, slot_size=128):
        pass
    writer = _worker("writer", path, "--impl", impl, "--count", str(n), "--rate", "25000",
                     "--slots", "64", "--slot-size", "128", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    try:
        kills = 0
        while writer.poll() is None or kills < 6:
            r = _worker("reader", path, "--impl", impl, "--db", db, "--batch", "300",
                        stderr=subprocess.PIPE)
            time.sleep(rng.uniform(0.05, 0.5))
            if r.poll() is not None:
                pytest.fail(f"reader exited {r.returncode}: {r.stderr.read()}")
            r.send_signal(signal.SIGKILL)
            r.wait()
            r.stderr.close()
            kills += 1
        wrote = json.loads(_finish(writer))
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert wrote["last"] == n and wrote["spilled"] > 0
    with open(stop, "w") as f:
        f.write(str(n))
    reader = _worker("reader", path, "--impl", impl, "--db", db, "--stop-file", stop,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = reader.communicate(timeout=60)
    assert reader.returncode != EXIT_DUPLICATE, err
    assert reader.returncode == 0, err
    assert _db_rows(db) == (n, 1, n, n)
    info = ring_py.ring_info(path)
    assert (info["fill"], info["overflow_pending"]) == (0, 0)


@pytest.mark.parametrize("mod", IMPLS)
def test_retained_reads_the_window_beside_the_reader(mod, path):
    """What the engine repairs its journal from: the published records the ring
    still holds, released or not, without taking or moving the reader's side."""
    w = mod.RingWriter(path, slots=8, slot_size=64)
    payloads = [b"r%02d" % i for i in range(1, 13)]
    for p in payloads:
        w.append(p)                        # 1..8 fill the slots, 9..12 spill
    with ring_py.RingReader(path) as r:    # the reader side is held meanwhile
        want = [(s, payloads[s - 1]) for s in range(6, 13)]   # the last slots - 1
        assert [(s, bytes(p)) for s, p in ring_py.retained(path)] == want
        assert r.position == 0
        assert len(drain(r)) == 12
    w.close()
    # Released and its overflow emptied by the writer's recovery: the slots remain.
    mod.RingWriter(path, slots=8, slot_size=64).close()
    assert [(s, bytes(p)) for s, p in ring_py.retained(path)] == want[:3]
