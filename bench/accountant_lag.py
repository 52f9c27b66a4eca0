#!/usr/bin/env python3
"""Accountant lag: time from a stamp to its ledger row, under SIP load.

`baton serve` is started here (engine and its accountant child, the default SQLite
ledger, a temporary data directory, free ports) with a config that answers number 1000
with baton.hold and prices time in control.  SIPp's built-in uac scenario then calls it:
first an idle phase at a low rate (the baseline: 10 calls/s), then the load phase (1,000
calls/s, each call held for --hold-ms).  Every call ends in one `usage` transaction, the
segment of time in control that its session-end stamp closed.

Per transaction the lag is the commit time of its batch (`batches.posted_ns`, taken in
the database transaction that writes the rows, just before COMMIT) minus the wall time of
the stamp that closed it.  A segment's `txns.wall_ns` is when the segment BEGAN (the
period is the one it started in), so the closing stamp's wall time is `wall_ns + usage`
(usage: the segment's nanoseconds in control, from the monotonic stamps; over a call of a
second the wall and monotonic clocks agree to far below a millisecond).  Actions and fees
carry their own stamp's wall time in `wall_ns`.

The idle phase, in the same engine and the same run, is the floor the batching and the
commit set by themselves (`billing.batch_ms`, the idle poll, an fsync); the load figure
is read against it.  `--pipeline` runs the accountant with `billing.pipeline = true`.

Also reported: transactions per phase, failed calls, and the CPU share of the accountant
(its writer process included) and of the engine over the load phase, from /proc.

Prints one JSON line and writes it, with a PNG (lag CDF of both phases, lag over time of
the load phase), to bench/results/accountant-lag-TIMESTAMP.json/.png.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BenchError, Progress  # noqa: E402

from engine.common import clock  # noqa: E402

CONFIG = """\
[engine]
sip_addr = "127.0.0.1:{sip_port}"
grpc_addr = "127.0.0.1:{grpc_port}"
transports = ["udp"]
data_dir = "{data_dir}"
node_id = "lagbench"

[media]
address = "127.0.0.1"
rtp_port_min = {rtp_min}
rtp_port_max = {rtp_max}
rtp_timeout = 60

[security]
max_setup_per_source = 0       # SIPp's calls all come from one address

[plans.hold]
price = "0.01"
unit = "minute"
increment = "1/1"

[billing]
default_plan = "hold"
pipeline = {pipeline}

[accounts.bench]
currency = "USD"

[accounts.bench.numbers]
"1000" = {{ module = "baton.hold" }}
"""


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(min(rank, len(sorted_values))) - 1]


def lag_stats(lags_ms: list[float]) -> dict[str, Any]:
    lags = sorted(lags_ms)
    r = lambda v: round(v, 2) if v is not None else None  # noqa: E731
    return {"transactions": len(lags),
            "lag_p50_ms": r(percentile(lags, 50)), "lag_p90_ms": r(percentile(lags, 90)),
            "lag_p99_ms": r(percentile(lags, 99)), "lag_max_ms": r(lags[-1] if lags else None),
            "lag_mean_ms": r(sum(lags) / len(lags)) if lags else None,
            # Never below 0 when the closing stamp's wall time is derived right.
            "lag_min_ms": r(lags[0] if lags else None)}


class Ledger:
    """The accountant's SQLite ledger, read-only while the accountant writes it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)

    def max_txn(self) -> int:
        if not self.path.exists():
            return 0
        with self._connect() as db:
            try:
                return db.execute("SELECT COALESCE(MAX(id), 0) FROM txns").fetchone()[0]
            except sqlite3.OperationalError:
                return 0

    def lags(self, after: int, upto: int | None = None) -> list[tuple[int, str, int, int, float]]:
        """(txn id, kind, closing stamp wall ns, commit ns, usage / 1e6) of the txns with
        AFTER < id <= UPTO."""
        with self._connect() as db:
            batches = db.execute("SELECT first_txn, last_txn, posted_ns FROM batches "
                                 "WHERE first_txn IS NOT NULL ORDER BY first_txn").fetchall()
            rows = db.execute(
                "SELECT t.id, t.kind, t.wall_ns, t.usage, c.item FROM txns t "
                "JOIN classes c ON c.id = t.class_id WHERE t.id > ? AND t.id <= ? "
                "ORDER BY t.id", (after, upto if upto is not None else 1 << 62)).fetchall()
        firsts = [b[0] for b in batches]
        out = []
        for tid, kind, wall, usage, item in rows:
            i = bisect.bisect_right(firsts, tid) - 1
            if i < 0 or tid > batches[i][1]:
                continue
            # A segment of time in control: wall_ns is its start, usage its length in ns.
            closed = wall + usage if kind == "usage" and item == "time" else wall
            out.append((tid, kind, closed, batches[i][2], usage / 1e6))
        return out


class Engine:
    """`baton serve` with its accountant, on free loopback ports and a temp data dir."""

    def __init__(self, baton: Path, pipeline: bool, ready_timeout: float) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="baton-lag-"))
        self.data = self.workdir / "data"
        self.address = (common.LOOPBACK, common.free_port())
        # A block of RTP ports of its own, away from the defaults other engines use.
        rtp_min = random.randrange(30000, 38000, 2)
        self.config = self.workdir / "baton.toml"
        self.config.write_text(CONFIG.format(
            sip_port=self.address[1], grpc_port=common.free_port(), data_dir=self.data,
            rtp_min=rtp_min, rtp_max=rtp_min + 5998, pipeline=str(pipeline).lower()))
        self.log = self.workdir / "baton.log"
        self.proc = None
        try:
            self.proc = common.start_ready([baton, "serve", "--config", self.config,
                                            "--log-level", "warning"], self.log, self.address,
                                           ready_timeout)
        except BenchError:
            self.stop()
            raise
        self.ledger = Ledger(self.data / "accounting" / "ledger.db")

    def accountant_pids(self) -> list[int]:
        """The accountant child and its writer process (pipeline mode)."""
        roots = []
        for pid in common.process_tree([self.proc.pid]):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"engine.accounting.accountant" in cmd:
                roots.append(pid)
        return common.process_tree(roots) if roots else []

    def engine_pids(self) -> list[int]:
        return [self.proc.pid]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            common.stop_process(self.proc, timeout=20.0)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def settle(self, expect_more_than: int, quiet_s: float = 1.0, timeout: float = 30.0) -> int:
        """Wait until the ledger stops growing for QUIET_S; its last txn id."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_max = self.ledger.max_txn()
            if now_max != last:
                last, since = now_max, time.monotonic()
            elif now_max > expect_more_than and time.monotonic() - since >= quiet_s:
                break
            time.sleep(0.2)
        return last


def run_phase(engine: Engine, name: str, rate: float, seconds: float,
              args: argparse.Namespace, work: Path, progress: Progress,
              done_before: float) -> dict[str, Any]:
    """SIPp at RATE for SECONDS; the ledger rows of these calls and their lag."""
    before = engine.settle(-1, quiet_s=0.5, timeout=10)
    acct = common.CpuMeter(engine.accountant_pids).start()
    eng = common.CpuMeter(engine.engine_pids).start()
    t0 = time.monotonic()
    wall0 = clock.wall_ns()
    hold_s = args.hold_ms / 1000
    result = common.run_sipp(
        engine.address, rate, seconds, work / name, service="1000",
        call_limit=int(max(100, rate * (3 + hold_s))), recv_timeout_ms=args.call_timeout_ms,
        hold_s=hold_s, extra_args=["-d", str(args.hold_ms)],
        tick=lambda el: progress.show(done_before + min(el, seconds + hold_s),
                                      f"{name} {rate:g} cps"))
    sipp_wall = time.monotonic() - t0
    # Over the phase: the calls and the accountant's work on them until its last commit.
    upto = engine.settle(before, quiet_s=1.0)
    wall = time.monotonic() - t0
    acct_cpu, eng_cpu = acct.stop(), eng.stop()
    rows = engine.ledger.lags(before, upto)
    held = [ms for _t, kind, _c, _p, ms in rows if kind == "usage"]
    lags = [(commit - closed) / 1e6 for _tid, _kind, closed, commit, _ms in rows]
    kinds: dict[str, int] = {}
    for _tid, kind, _c, _p, _ms in rows:
        kinds[kind] = kinds.get(kind, 0) + 1
    phase: dict[str, Any] = {
        "offered_rate": rate, "seconds": seconds, "hold_ms": args.hold_ms,
        "calls": result.calls, "successful": result.successful, "failed": result.failed,
        "cps": round(result.cps, 1), "sipp_wall_s": round(sipp_wall, 2),
        **lag_stats(lags), "kinds": kinds,
        # The segments' length: the calls' hold time, a check that they were metered.
        "segment_ms_mean": round(sum(held) / len(held), 1) if held else None,
        "accountant_cpu_s": round(acct_cpu, 3),
        # CPU share over the SIPp run (calls placed, held and released) to the last commit.
        "accountant_cpu_pct": round(100 * acct_cpu / wall, 1) if wall else None,
        "engine_cpu_pct": round(100 * eng_cpu / wall, 1) if wall else None,
        "accountant_cpu_us_per_txn": round(acct_cpu * 1e6 / len(rows), 1) if rows else None,
        "measured_s": round(wall, 2),
    }
    if result.error:
        phase["error"] = result.error
    # Lag over time: seconds since the phase started, thinned to at most 4,000 points.
    step = max(1, len(rows) // 4000)
    phase["_series"] = [(round((closed - wall0) / 1e9, 3), round((commit - closed) / 1e6, 2))
                        for _t, _k, closed, commit, _ms in rows[::step]]
    phase["_lags"] = sorted(lags)
    return phase


def plot(path: Path, result: dict[str, Any]) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    fig, (ax_cdf, ax_time) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"idle": "tab:orange", "load": "tab:blue"}
    for name in ("idle", "load"):
        phase = result.get(name) or {}
        lags = phase.get("_lags") or []
        if not lags:
            continue
        n = len(lags)
        ax_cdf.plot(lags, [(i + 1) / n for i in range(n)], color=colors[name],
                    label=f"{name} {phase['offered_rate']:g} CPS (p99 {phase['lag_p99_ms']} ms)")
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("stamp → committed ledger row, ms (log)")
    ax_cdf.set_ylabel("share of transactions")
    ax_cdf.set_title("Lag CDF")
    ax_cdf.grid(True, alpha=0.3)
    ax_cdf.legend(fontsize=8)
    series = (result.get("load") or {}).get("_series") or []
    if series:
        ax_time.plot([s[0] for s in series], [s[1] for s in series], ".", markersize=2,
                     color=colors["load"])
    ax_time.set_xlabel("stamp time since the load phase began, s")
    ax_time.set_ylabel("lag, ms")
    ax_time.set_title("Lag over time, load phase")
    ax_time.set_ylim(bottom=0)
    ax_time.grid(True, alpha=0.3)
    mode = "pipeline" if result.get("pipeline") else "serial"
    fig.suptitle(f"Accountant lag (SQLite, {mode}), stamp to committed ledger row")
    return common.save_figure(plt, fig, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Lag from a stamp to its committed ledger row, with SIPp calls at a load "
                    "rate against an idle rate in the same engine.")
    p.add_argument("--rate", type=float, default=1000.0,
                   help="calls/s of the load phase (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="length of the load phase (default: %(default)s)")
    p.add_argument("--idle-rate", type=float, default=10.0,
                   help="calls/s of the idle phase, the baseline (default: %(default)s)")
    p.add_argument("--idle-seconds", type=float, default=5.0,
                   help="length of the idle phase (default: %(default)s)")
    p.add_argument("--hold-ms", type=int, default=1000,
                   help="how long each call stays up, SIPp -d (default: %(default)s)")
    p.add_argument("--pipeline", action="store_true",
                   help="run the accountant with billing.pipeline = true")
    p.add_argument("--quick", action="store_true",
                   help="200 calls/s for 3 s after 2 s at 10 calls/s, calls of 200 ms")
    p.add_argument("--call-timeout-ms", type=int, default=5000,
                   help="a call with no answer for this long fails (default: %(default)s)")
    common.add_baton_args(p)
    common.add_result_file_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.rate, args.seconds, args.idle_seconds, args.hold_ms = 200.0, 3.0, 2.0, 200
    if min(args.rate, args.seconds, args.idle_rate, args.idle_seconds) <= 0 or args.hold_ms < 0:
        p.error("rates and lengths must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_cleanup()
    result: dict[str, Any] = {"bench": "accountant_lag", "store": "sqlite",
                              "pipeline": args.pipeline,
                              "baseline": f"idle phase at {args.idle_rate:g} calls/s, same engine"}
    errors: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="baton-lag-sipp-"))
    engine: Engine | None = None
    started = time.time()
    load_start = list(os.getloadavg())
    hold_s = args.hold_ms / 1000
    progress = Progress(total=args.idle_seconds + args.seconds + 2 * hold_s)
    try:
        common.find_binary("sipp")
        engine = Engine(args.baton, args.pipeline, args.ready_timeout)
        result["idle"] = run_phase(engine, "idle", args.idle_rate, args.idle_seconds, args,
                                   work, progress, 0.0)
        result["load"] = run_phase(engine, "load", args.rate, args.seconds, args, work,
                                   progress, args.idle_seconds + hold_s)
        if not engine.alive():
            errors.append("baton exited during the run: " + common.log_tail(engine.log, 5))
    except (BenchError, OSError, sqlite3.Error) as exc:
        errors.append(str(exc))
        sys.stderr.write(f"accountant_lag: {exc}\n")
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        progress.close()
        if engine is not None:
            engine.stop()
        shutil.rmtree(work, ignore_errors=True)
    load, idle = result.get("load") or {}, result.get("idle") or {}
    for name, phase in (("idle", idle), ("load", load)):
        if phase.get("error"):
            errors.append(f"{name}: {phase['error']}")
        elif phase and not phase.get("transactions"):
            errors.append(f"{name}: no ledger transactions")
    result.update(
        lag_p50_ms=load.get("lag_p50_ms"), lag_p90_ms=load.get("lag_p90_ms"),
        lag_p99_ms=load.get("lag_p99_ms"), lag_max_ms=load.get("lag_max_ms"),
        transactions=load.get("transactions"), failed_calls=load.get("failed"),
        accountant_cpu_pct=load.get("accountant_cpu_pct"),
        idle_lag_p50_ms=idle.get("lag_p50_ms"), idle_lag_p99_ms=idle.get("lag_p99_ms"),
        idle_lag_max_ms=idle.get("lag_max_ms"),
        meta={**common.machine_info(), "loadavg": load_start, "loadavg_end": list(os.getloadavg()),
              "wall_s": round(time.time() - started, 1)},
        errors=errors)
    if not args.no_files and (load or idle):
        json_path, png_path = common.result_paths("accountant-lag", args.results_dir)
        if plot(png_path, result):
            result["png"] = str(png_path)
        result["json"] = str(json_path)
    for phase in (load, idle):
        phase.pop("_series", None)
        phase.pop("_lags", None)
    if not args.no_files and "json" in result:
        common.write_json(Path(result["json"]), result)
    print(json.dumps(result), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
