#!/usr/bin/env python3
"""Call-control ring throughput: records/s stamped by one process and drained by another.

A writer process stamps RECORDS transition records (stamp_transition, about
120 bytes of msgpack each, session ids varying) as fast as it can; a separate
reader process drains them in batches, checks that the seqs are contiguous and
releases each batch, as the accountant does (without its database). The clock
is CLOCK_MONOTONIC, shared by both processes:

    write_rate       = records / (writer's last append - writer's first append)
    end_to_end_rate  = records / (reader's last record  - writer's first append)

The reader polls without sleeping, so its CPU per record includes the polling.

Runs the C implementation and the pure-Python twin (--impl to choose), prints
ONE JSON line and writes it to bench/results/ring-TIMESTAMP.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import common  # noqa: E402

TARGET_C = 1_000_000
DEFAULT_RECORDS = {"c": 3_000_000, "py": 300_000}
SESSIONS = 1024


def _module(impl: str):
    if impl == "c":
        from ext import ring
        return ring
    from ext import ring_py
    return ring_py


def stamp_args(i: int) -> tuple:
    """The arguments of the i-th transition stamp (session ids cycle over 1024 calls)."""
    return (f"s{i % SESSIONS:07x}", f"a{i % 97:04d}", "ivr", "queue", "info", "",
            12_000_000_000 + i * 1000, 1_764_000_000_000_000_000 + i * 1000)


def record_bytes(impl: str) -> int:
    """Size of a typical stamp, measured on a scratch ring."""
    mod = _module(impl)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ring.dat")
        with mod.RingWriter(path, slots=8, slot_size=256) as w, mod.RingReader(path, 0) as r:
            for _ in range(70_000):            # a seq of the size the run will have
                w.append(b"")
                if w.fill >= 4:
                    r.release(r.read()[-1][0])
            w.stamp_transition(*stamp_args(12345))
            return len(r.read()[-1][1])


def run_writer(a: argparse.Namespace) -> int:
    mod = _module(a.impl)
    args = [stamp_args(i) for i in range(SESSIONS)]
    n = a.records
    with mod.RingWriter(a.path, slots=a.slots, slot_size=a.slot_size) as w:
        stamp = w.stamp_transition
        cpu0 = time.process_time()
        t0 = time.monotonic_ns()
        for i in range(n):
            sid, acct, frm, to, level, reason, mono, wall = args[i & (SESSIONS - 1)]
            stamp(sid, acct, frm, to, level, reason, mono + i, wall + i)
        t1 = time.monotonic_ns()
        cpu = time.process_time() - cpu0
        stats = w.stats()
    print(json.dumps({"t0": t0, "t1": t1, "cpu": cpu, **stats}), flush=True)
    return 0


def run_reader(a: argparse.Namespace) -> int:
    mod = _module(a.impl)
    n = a.records
    got = 0
    with mod.RingReader(a.path, 0) as r:
        Path(a.ready).touch()
        read, release = r.read, r.release
        cpu0 = time.process_time()
        while got < n:
            batch = read(a.batch)
            if not batch:
                continue                       # busy poll: the reader has a core of its own
            last = batch[-1][0]
            if batch[0][0] != got + 1 or last != got + len(batch):
                print(f"seqs {batch[0][0]}..{last} after {got}", file=sys.stderr)
                return 3
            got = last
            release(last)
        t = time.monotonic_ns()
        cpu = time.process_time() - cpu0
    print(json.dumps({"t_done": t, "cpu": cpu, "records": got}), flush=True)
    return 0


def measure(impl: str, records: int, slots: int, slot_size: int, batch: int) -> dict:
    """One writer process and one reader process over a fresh ring."""
    mod = _module(impl)
    me = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="ring-bench-") as d:
        work = Path(d)
        path = str(work / "ring" / "ring.dat")
        with mod.RingWriter(path, slots=slots, slot_size=slot_size):
            pass
        common_args = [path, "--impl", impl, "--records", str(records), "--slots", str(slots),
                       "--slot-size", str(slot_size), "--batch", str(batch)]
        ready = work / "ready"
        reader = common.spawn([sys.executable, me, "--role", "reader", *common_args,
                               "--ready", ready], log=work / "reader.log")
        deadline = time.monotonic() + 30
        while not ready.exists():
            if reader.poll() is not None or time.monotonic() > deadline:
                tail = common.log_tail(work / "reader.log")
                raise common.BenchError(f"reader did not start: {tail}")
            time.sleep(0.01)
        writer = common.spawn([sys.executable, me, "--role", "writer", *common_args],
                              log=work / "writer.log")
        for proc, name in ((writer, "writer"), (reader, "reader")):
            rc, _ = common.wait_for(proc, timeout=600)
            if rc != 0:
                raise common.BenchError(f"{name} failed ({rc}): "
                                        f"{common.log_tail(work / (name + '.log'))}")
        w = common.last_json_line(work / "writer.log")
        r = common.last_json_line(work / "reader.log")
    if not w or not r or r["records"] != records:
        raise common.BenchError("a side did not report")
    write_s = (w["t1"] - w["t0"]) / 1e9
    e2e_s = (r["t_done"] - w["t0"]) / 1e9
    return {
        "records": records,
        "record_bytes": record_bytes(impl),
        "slots": slots,
        "slot_size": slot_size,
        "batch": batch,
        "write_rate": round(records / write_s),
        "end_to_end_rate": round(records / e2e_s),
        "seconds": round(e2e_s, 3),
        "writer_cpu_ns_per_record": round(w["cpu"] * 1e9 / records, 1),
        "reader_cpu_ns_per_record": round(r["cpu"] * 1e9 / records, 1),
        "spilled": w["spilled"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", choices=("c", "py", "both"), default="both")
    ap.add_argument("--records", type=int, default=0,
                    help=f"per implementation (default {DEFAULT_RECORDS})")
    ap.add_argument("--slots", type=int, default=65536)
    ap.add_argument("--slot-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4096, help="records per read()")
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--no-files", action="store_true", help="print only, write no result file")
    ap.add_argument("--role", choices=("writer", "reader"), help=argparse.SUPPRESS)
    ap.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.role == "writer":
        return run_writer(a)
    if a.role == "reader":
        return run_reader(a)

    common.install_cleanup()
    impls = ["c", "py"] if a.impl == "both" else [a.impl]
    results: dict[str, dict] = {}
    progress = common.Progress(total=len(impls))
    for n, impl in enumerate(impls):
        progress.show(n, f"{impl} ring")
        try:
            _module(impl)
        except ImportError as exc:
            if a.impl != "both":
                print(f"ext.ring is not built ({exc}); build it or use --impl py", file=sys.stderr)
                return 2
            results[impl] = {"skipped": f"not built: {exc}"}
            continue
        results[impl] = measure(impl, a.records or DEFAULT_RECORDS[impl], a.slots, a.slot_size,
                                a.batch)
        progress.note(f"{impl}: {results[impl]['end_to_end_rate']:,} records/s end to end")
    progress.close()
    c = results.get("c", {})
    result = {
        "benchmark": "ring",
        "results": results,
        "target_c_records_per_s": TARGET_C,
        "meets_target": c.get("end_to_end_rate", 0) >= TARGET_C if "c" in results else None,
        "machine": common.machine_info(),
    }
    common.report_line("ring", result, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
