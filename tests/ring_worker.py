"""Helper processes for the multi-process ring tests (tests/test_ring.py).

    ring_worker.py writer PATH --impl c|py [--count N] [--rate R] [--log FILE]
                          [--slots S --slot-size B]
    ring_worker.py reader PATH --impl c|py (--db FILE | --checksum) [--stop-file FILE] [--until SEQ]

The writer appends payload_for(seq) records (sizes vary, some larger than a
slot); --count 0 means until killed. With --log it appends "start FIRST" once
open, then "SEQ" after every 500th append returned, i.e. once SEQ is published,
and the last seq at a clean end, when it also prints one JSON line (last seq,
CRC of everything it appended).

The reader with --db is the accountant's pattern: it keeps its position in
SQLite, inserts every record it reads into a table keyed by seq in the same
transaction, then releases. A seq read twice breaks the primary key (exit 3),
a wrong payload exits 4, a gap exits 5. It stops once its position reaches
--until or the number in --stop-file. With --checksum it keeps no state and
prints a JSON line with the count and CRC of what it read.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

EXIT_DUPLICATE, EXIT_PAYLOAD, EXIT_GAP = 3, 4, 5


def payload_for(seq: int) -> bytes:
    """Deterministic payload of seq: mostly 0..200 bytes, every 37th 300..1300."""
    h = (seq * 2654435761) & 0xFFFFFFFF
    size = 300 + h % 1000 if seq % 37 == 0 else h % 201
    return (seq.to_bytes(8, "little") * (size // 8 + 1))[:size]


def _impl(name: str):
    if name == "c":
        from ext import ring
        return ring
    from ext import ring_py
    return ring_py


def run_writer(a: argparse.Namespace) -> int:
    mod = _impl(a.impl)
    log = os.open(a.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if a.log else -1
    crc = 0
    done = 0
    start = time.monotonic()
    with mod.RingWriter(a.path, slots=a.slots, slot_size=a.slot_size) as w:
        first = w.next_seq
        if log >= 0:
            os.write(log, b"start %d\n" % first)
        while a.count == 0 or done < a.count:
            seq = w.next_seq
            data = payload_for(seq)
            got = w.append(data)
            if got != seq:
                print(f"append returned {got}, expected {seq}", file=sys.stderr)
                return 2
            crc = zlib.crc32(data, crc)
            done += 1
            if log >= 0 and done % 500 == 0:
                os.write(log, b"%d\n" % seq)
            if a.rate and done % 100 == 0:
                ahead = done / a.rate - (time.monotonic() - start)
                if ahead > 0.002:
                    time.sleep(ahead)
        stats = w.stats()
    if log >= 0:
        os.write(log, b"%d\n" % (first + done - 1))
        os.close(log)
    print(json.dumps({"first": first, "last": first + done - 1, "crc": crc, **stats}), flush=True)
    return 0


def _stop_at(a: argparse.Namespace) -> int | None:
    if a.until:
        return a.until
    if a.stop_file and os.path.exists(a.stop_file):
        text = open(a.stop_file).read().strip()
        if text:
            return int(text)
    return None


def run_reader_db(a: argparse.Namespace) -> int:
    mod = _impl(a.impl)
    db = sqlite3.connect(a.db, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS seen (seq INTEGER PRIMARY KEY, size INTEGER NOT NULL)")
    db.execute("CREATE TABLE IF NOT EXISTS position (id INTEGER PRIMARY KEY CHECK (id = 0), "
               "seq INTEGER NOT NULL)")
    row = db.execute("SELECT seq FROM position WHERE id = 0").fetchone()
    pos = row[0] if row else 0
    with mod.RingReader(a.path, start_seq=pos) as r:
        while True:
            batch = r.read(a.batch)
            if not batch:
                stop = _stop_at(a)
                if stop is not None and pos >= stop:
                    return 0
                time.sleep(0.001)
                continue
            for seq, data in batch:
                pos += 1
                if seq != pos:
                    print(f"gap: got {seq}, expected {pos}", file=sys.stderr)
                    return EXIT_GAP
                if data != payload_for(seq):
                    print(f"payload of {seq} differs", file=sys.stderr)
                    return EXIT_PAYLOAD
            try:
                db.execute("BEGIN")
                db.executemany("INSERT INTO seen (seq, size) VALUES (?, ?)",
                               [(s, len(d)) for s, d in batch])
                db.execute("INSERT OR REPLACE INTO position (id, seq) VALUES (0, ?)", (pos,))
                db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                print(f"read twice: {exc}", file=sys.stderr)
                return EXIT_DUPLICATE
            r.release(pos)    # only after the commit


def run_reader_checksum(a: argparse.Namespace) -> int:
    mod = _impl(a.impl)
    crc = count = 0
    pos = 0
    with mod.RingReader(a.path, start_seq=0) as r:
        while True:
            batch = r.read(a.batch)
            if not batch:
                stop = _stop_at(a)
                if stop is not None and pos >= stop:
                    break
                time.sleep(0.0005)
                continue
            for seq, data in batch:
                pos += 1
                if seq != pos:
                    print(f"gap: got {seq}, expected {pos}", file=sys.stderr)
                    return EXIT_GAP
                if data != payload_for(seq):
                    print(f"payload of {seq} differs", file=sys.stderr)
                    return EXIT_PAYLOAD
                crc = zlib.crc32(data, crc)
            count += len(batch)
            r.release(pos)
        stats = r.stats()
    print(json.dumps({"count": count, "last": pos, "crc": crc, **stats}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("role", choices=("writer", "reader"))
    ap.add_argument("path")
    ap.add_argument("--impl", choices=("c", "py"), default="py")
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.0, help="records/s, 0 = as fast as possible")
    ap.add_argument("--log")
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--slot-size", type=int, default=256)
    ap.add_argument("--db")
    ap.add_argument("--checksum", action="store_true")
    ap.add_argument("--stop-file")
    ap.add_argument("--until", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1000)
    a = ap.parse_args(argv)
    if a.role == "writer":
        return run_writer(a)
    if a.db:
        return run_reader_db(a)
    return run_reader_checksum(a)


if __name__ == "__main__":
    sys.exit(main())
