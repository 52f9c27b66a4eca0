#!/usr/bin/env python3
"""Accountant throughput: transitions metered, rated and posted per second.

A ring is filled beforehand (not timed) with the stamps of `--live` concurrent
calls and `--transitions` transitions among them, each closing one segment
of time in control. The accountant then drains it (`Accountant.drain`):
reading the ring, decoding, metering, rating with per-unit plans (three
modules, one of them a vendor's with a revenue share) and posting one
double-entry transaction per transition, in batches of `billing.batch_records`
with the ring position and working state in the same database transaction.
Timed: the drain, to the last commit. Each store is measured serially and
with the committer thread (`billing.pipeline = true`).

Also measured, in the same run as the baseline: the same stream metered and
rated without posting (the CPU part alone), to show where the time goes.

The machine is shared, so `--repeat N` runs each configuration N times (the
ring is filled once, the rounds interleaved) and reports the median, with
every run's figure and its process CPU time per transition (less sensitive
to other load than the wall clock). With `pipeline = true` a SQLite ledger is
written by a writer process, whose CPU time is not in that figure.

Prints one JSON line and writes it to bench/results/accountant-<timestamp>.json.
Target: >= 100,000 transitions/s into SQLite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402

from ext.kernels import ring  # noqa: E402
from engine.accounting.accountant import Accountant, tune_gc  # noqa: E402
from engine.accounting.config import BillingConfig  # noqa: E402
from engine.accounting.meter import Meter  # noqa: E402
from engine.accounting.rater import Rater  # noqa: E402

S = 1_000_000_000
WALL0 = 1_793_491_200 * S          # 2026-11-01T00:00:00Z
MODULES = [("baton.bridge", "basic"), ("baton.menu", "application"), ("acme.survey", "service")]
CONFIG = {
    "plans": {"bridge": {"price": "0.001", "unit": "minute", "increment": "60/60"},
              "app": {"price": "0.01", "unit": "minute", "increment": "6/6"},
              "survey": {"price": "0.05", "unit": "minute", "connect_fee": "0.01"}},
    "billing": {"level_plans": {"basic": "bridge", "application": "app"},
                "batch_records": 5000, "batch_ms": 50},
    "vendors": {"acme": {"revenue_share": "0.7", "modules": ["acme.survey"],
                         "plans": {"acme.survey": "survey"}}},
}


def fill_ring(path: str, transitions: int, live: int, seed: int) -> int:
    """Write the stamps; returns how many records."""
    rng = random.Random(seed)
    w = ring.RingWriter(path, slots=1 << 20, slot_size=256, node_id="bench")
    t = 0
    current = {}
    for i in range(live):
        sid, acc = f"S{i:06d}", f"acct{i % 100}"
        w.stamp_session("start", sid, acc, t, WALL0 + t)
        mod, level = MODULES[i % 3]
        w.stamp_transition(sid, acc, "", mod, level, "initial", t, WALL0 + t)
        current[sid] = mod
    for _ in range(transitions):
        t += rng.randrange(1, 20_000_000)
        i = rng.randrange(live)
        sid, acc = f"S{i:06d}", f"acct{i % 100}"
        mod, level = MODULES[rng.randrange(3)]
        w.stamp_transition(sid, acc, current[sid], mod, level, "next", t, WALL0 + t)
        current[sid] = mod
    n = w.written
    w.close()
    return n


def rate_only(ring_path: str) -> dict:
    """Decode, meter and rate everything in the ring without posting."""
    book = BillingConfig.from_dict(CONFIG)
    meter, rater = Meter(), Rater(book)
    lines: list = []
    events: list = []
    unpack = msgpack.unpackb
    with ring.RingReader(ring_path) as reader:
        tune_gc()
        t0 = time.perf_counter()
        n = 0
        while True:
            recs = reader.read(5000)
            if not recs:
                break
            meter.feed_payloads(recs, reader.node_id, events, unpack)   # as the accountant does
            rater.rate(events, lines)
            events.clear()
            n += len(recs)
            lines.clear()
        dt = time.perf_counter() - t0
    return {"records": n, "seconds": round(dt, 3), "records_per_s": round(n / dt)}


def run_store(kind: str, pipeline: bool, args, ring_src: str, records: int) -> dict:
    work = tempfile.mkdtemp(prefix="baton-acct-bench-")
    schema = None
    try:
        shutil.copytree(os.path.dirname(ring_src), os.path.join(work, "ring"))
        store = None
        if kind == "postgresql":
            schema = f"baton_bench_{uuid.uuid4().hex[:10]}"
            store = f"{args.pg_url}?schema={schema}"
        acct = Accountant(work, CONFIG, store, pipeline=pipeline)
        try:
            tune_gc()                      # as `baton accountant` does
            c0 = time.process_time()
            t0 = time.perf_counter()
            acct.drain()
            dt = time.perf_counter() - t0
            cpu = time.process_time() - c0
            stats = acct.stats()
            problems = acct.ledger.check() if args.check else []
        finally:
            acct.close()
        assert stats["records"] == records, stats
        return {"store": kind, "pipeline": pipeline, "transactions": stats["posted"],
                "batches": stats["batches"], "seconds": round(dt, 3),
                "transitions_per_s": round(stats["posted"] / dt),
                "records_per_s": round(records / dt),
                "cpu_us_per_transition": round(cpu / stats["posted"] * 1e6, 2),
                "invariants_ok": not problems}
    finally:
        if schema is not None:
            import psycopg

            with psycopg.connect(args.pg_url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transitions", type=int, default=300_000)
    p.add_argument("--live", type=int, default=2000, help="concurrent calls")
    p.add_argument("--stores", default="sqlite,postgresql")
    p.add_argument("--pg-url", default=os.environ.get("BATON_TEST_PG",
                                                      "postgresql://postgres@127.0.0.1:5432/test"))
    p.add_argument("--check", action="store_true", help="verify the ledger invariants after")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per store and mode, the median reported (`baton bench "
                        "accountant --repeat N` repeats the whole driver instead)")
    p.add_argument("--no-files", action="store_true", help="do not write bench/results/")
    args = p.parse_args(argv)

    src = tempfile.mkdtemp(prefix="baton-acct-ring-")
    try:
        ring_path = os.path.join(src, "ring", "ring.dat")
        records = fill_ring(ring_path, args.transitions, args.live, args.seed)
        baseline = []
        runs = []
        # Interleaved rounds, so that a burst of other load hits every mode alike.
        for _ in range(max(1, args.repeat)):
            baseline.append(rate_only(ring_path)["records_per_s"])
            for kind in args.stores.split(","):
                for pipeline in (False, True):
                    try:
                        runs.append(run_store(kind, pipeline, args, ring_path, records))
                    except Exception as exc:  # one store down must not hide the others
                        runs.append({"store": kind, "pipeline": pipeline, "error": str(exc)})
    finally:
        shutil.rmtree(src, ignore_errors=True)

    modes = {}
    for r in runs:
        if "transitions_per_s" in r:
            modes.setdefault((r["store"], r["pipeline"]), []).append(r["transitions_per_s"])
    median = {f"{s}{'_pipeline' if p else '_serial'}": round(statistics.median(v))
              for (s, p), v in modes.items()}
    best = {}
    for (s, _p), v in modes.items():
        best[s] = max(best.get(s, 0), round(statistics.median(v)))
    base = round(statistics.median(baseline))
    result = {
        "bench": "accountant", "ring": ring.IMPLEMENTATION,
        "transitions": args.transitions, "live_sessions": args.live, "records": records,
        "repeat": args.repeat,
        "meter_rate_only_records_per_s": base,
        "meter_rate_only_runs": baseline,
        # the better mode's median per store, and its ratio to the CPU-only baseline
        "sqlite_transitions_per_s": best.get("sqlite"),
        "postgresql_transitions_per_s": best.get("postgresql"),
        "sqlite_vs_meter_rate_only": round(best["sqlite"] / base, 3) if best.get("sqlite") else None,
        "median_transitions_per_s": median,
        "target_sqlite_per_s": 100_000,
        "runs": runs,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    line = json.dumps(result)
    print(line)
    if not args.no_files:
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"accountant-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
