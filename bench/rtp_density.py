#!/usr/bin/env python3
"""How many bridged calls Baton's RTP relay carries on one core without losing packets.

For each level of --calls (rising), bench/relay_node.py --calls N sets up N bridged calls
(2N RtpStreams in one RtpHub under uvloop), and bench/baseline/rtpload.c sends G.711-sized
RTP at a 20 ms ptime on both legs of every call (2N flows, 100 packets/s per call) for
--seconds, counting per flow what comes back through the relay.  Per level: loss, the
relay process's CPU share (CPU seconds / wall seconds, from /proc, sampled while the load
runs, between its warm-up and its drain), the load tool's own CPU and whether it kept its
schedule.  The sweep stops at the first level over --max-loss-pct loss, or where the load
tool fell behind (then the machine, not the relay, set the limit).

  max_calls_under_0_1pct_loss = the highest level passed before the sweep stopped

As a baseline, the same run measures the C relay (bench/baseline/relay.c) and Baton's
relay on a single flow, through common.run_gen_sink() as bench/rtp_relay.py does, at the
packet rate of the highest level passed: that is the least CPU per packet a relay spends
at that rate, with one socket instead of 2N.

Prints one JSON line on stdout and writes it, with a plot, to bench/results/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402
from common import BenchError, CpuMeter, CRelay, Progress  # noqa: E402
from rtp_relay import BatonRelay  # noqa: E402

RELAY_NODE = BENCH_DIR / "relay_node.py"
TARGET_CALLS = 1000
WARMUP_S = 0.2           # rtpload's latching pause before the first tick
SETUP_TIMEOUT_S = 60.0


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far, from the first line of /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_ports_file(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise BenchError(f"relay_node exited ({proc.returncode}) before it was ready")
        if time.monotonic() > deadline:
            raise BenchError(f"relay_node not ready within {timeout:.0f} s")
        time.sleep(0.05)


def sleep_until(deadline: float, proc: subprocess.Popen[bytes],
                tick: Callable[[float], None], t0: float) -> bool:
    """Sleep until DEADLINE (monotonic) unless PROC ends first; False if it did."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        tick(time.monotonic() - t0)
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    return True


def run_level(calls: int, seconds: float, ptime_ms: int, rcvbuf: int,
              tick: Callable[[float], None]) -> dict[str, Any]:
    """N bridged calls under rtpload for SECONDS: rtpload's counts plus the relay's CPU."""
    rtpload_bin = common.build_baseline("rtpload")
    with tempfile.TemporaryDirectory(prefix="baton-rtpdensity-") as tmp:
        work = Path(tmp)
        ports_file = work / "ports.json"
        relay_log, load_log = work / "relay_node.out", work / "rtpload.out"
        relay = common.spawn([sys.executable, RELAY_NODE, "--calls", calls,
                              "--ports-file", ports_file, "--rcvbuf", rcvbuf,
                              "--max-seconds", seconds + 120], log=relay_log)
        load: subprocess.Popen[bytes] | None = None
        rc: int | None = None
        try:
            try:
                wait_ports_file(ports_file, relay, SETUP_TIMEOUT_S)
            except BenchError as exc:
                raise BenchError(f"{exc}\n{common.log_tail(relay_log)}") from None
            load = common.spawn([rtpload_bin, ports_file, f"{seconds:g}", ptime_ms],
                                log=load_log)
            t0 = time.monotonic()
            # Sample inside the load: after the latching pause, before the last tick.
            win_start = t0 + WARMUP_S + min(0.3, seconds / 4)
            win_end = max(win_start + 0.1, t0 + WARMUP_S + seconds - 0.1)
            window: dict[str, float] = {}
            if sleep_until(win_start, load, tick, t0):
                relay_meter, load_meter = CpuMeter([relay.pid]).start(), CpuMeter(
                    [load.pid]).start()
                busy0, total0 = machine_busy()
                w0 = time.monotonic()
                if sleep_until(win_end, load, tick, t0):
                    wall = time.monotonic() - w0
                    busy1, total1 = machine_busy()
                    window = {"wall_s": wall, "relay_cpu_s": relay_meter.stop(),
                              "load_cpu_s": load_meter.stop(),
                              "machine_busy": (busy1 - busy0) / max(1.0, total1 - total0)}
            rc, _ = common.wait_for(load, seconds + 30,
                                    lambda _elapsed: tick(time.monotonic() - t0))
        finally:
            if load is not None:
                common.stop_process(load, timeout=3.0)
            common.stop_process(relay, timeout=10.0)
        load_report = common.last_json_line(load_log)
        relay_report = common.last_json_line(relay_log) or {}
        if rc != 0 or load_report is None:
            raise BenchError(f"rtpload failed (rc={rc}) at {calls} calls:\n"
                             f"{common.log_tail(load_log)}")
    if not window:
        raise BenchError(f"rtpload ended before the CPU sample at {calls} calls")
    offered_pps = 2 * calls * 1000 / ptime_ms
    wall = window["wall_s"]
    return {
        "calls": calls,
        "offered_pps": round(offered_pps),
        "loss_pct": round(float(load_report["loss_pct"]), 4),
        "relay_cpu_pct": round(100 * window["relay_cpu_s"] / wall, 1),
        "relay_cpu_ns_per_pkt": round(window["relay_cpu_s"] * 1e9 / (wall * offered_pps), 1),
        "rtpload_cpu_pct": round(100 * window["load_cpu_s"] / wall, 1),
        "machine_busy_pct": round(100 * window["machine_busy"], 1),
        "behind": bool(load_report.get("behind")),
        "late_ticks": load_report.get("late_ticks"),
        "latency_ms": load_report.get("latency_ms"),
        "sample_s": round(wall, 2),
        "loadavg_1m": os.getloadavg()[0],
        "rtpload": load_report,
        "relay": relay_report,
    }


def baseline(pps: float, seconds: float, tick: Callable[[float], None]) -> dict[str, Any]:
    """C relay and Baton's relay on one flow at PPS, through the generator and sink."""
    out: dict[str, Any] = {"rate_pps": round(pps), "seconds": seconds}
    for kind in ("c", "baton"):
        with tempfile.TemporaryDirectory(prefix="baton-rtpdensity-base-") as tmp:
            relay = CRelay(Path(tmp)) if kind == "c" else BatonRelay(Path(tmp))
            run = common.run_gen_sink(relay, seconds, pps, tick=tick)
        out[f"{kind}_cpu_ns_per_pkt"] = run["relay_cpu_ns_per_pkt"]
        out[f"{kind}_loss_pct"] = run["loss_pct"]
        out[f"{kind}_delivered_pps"] = run["delivered_pps"]
    return out


def plot(levels: Sequence[dict[str, Any]], max_loss: float, path: Path) -> bool:
    """Loss and CPU share against the number of calls."""
    plt = common.pyplot()
    if plt is None or not levels:
        return False
    calls = [lv["calls"] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax1.plot(calls, [lv["loss_pct"] for lv in levels], "o-", label="packet loss")
    ax1.axhline(max_loss, color="red", linestyle="--", linewidth=1,
                label=f"{max_loss:g} % limit")
    for lv in levels:
        if lv["behind"]:
            ax1.annotate("load tool\nbehind", (lv["calls"], lv["loss_pct"]), fontsize=8,
                         textcoords="offset points", xytext=(4, 6))
    ax1.set_xlabel("bridged calls (2 RTP streams each, 20 ms ptime)")
    ax1.set_ylabel("loss %")
    ax1.set_title("Packet loss through the relay")
    ax2.plot(calls, [lv["relay_cpu_pct"] for lv in levels], "o-", label="Baton relay process")
    ax2.plot(calls, [lv["rtpload_cpu_pct"] for lv in levels], "s--", label="rtpload (load tool)")
    cores = os.cpu_count() or 1
    ax2.plot(calls, [lv["machine_busy_pct"] * cores for lv in levels], ":", color="gray",
             label=f"whole machine ({cores} cores)")
    ax2.axhline(100, color="red", linestyle="--", linewidth=1, label="one core")
    ax2.set_xlabel("bridged calls")
    ax2.set_ylabel("CPU % of one core")
    ax2.set_title("CPU share")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Baton RTP relay density (ext.rtp RtpHub under uvloop)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Bridged calls Baton's RTP relay carries "
                                            "under 0.1 % loss.")
    p.add_argument("--calls", default="250,500,1000,1500,2000",
                   help="levels of concurrent calls, rising (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="load time per level (default: %(default)s)")
    p.add_argument("--ptime", type=int, default=20, help="ms per packet (default: 20)")
    p.add_argument("--max-loss-pct", type=float, default=0.1,
                   help="loss above which the sweep stops (default: %(default)s)")
    p.add_argument("--rcvbuf", type=int, default=0,
                   help="relay socket receive buffer in bytes; 0 = kernel default, as the "
                        "engine runs (default: %(default)s)")
    p.add_argument("--baseline-seconds", type=float, default=5.0,
                   help="C and single-flow Baton relay at the highest passed level's packet "
                        "rate, this long each; 0 skips it (default: %(default)s)")
    common.add_result_file_args(p)
    args = p.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.calls.split(",") if c.strip()]
    except ValueError:
        p.error("--calls takes integers separated by commas")
    if not args.levels or min(args.levels) < 1 or args.levels != sorted(set(args.levels)):
        p.error("--calls needs positive, rising levels")
    if args.seconds < 1 or not 1 <= args.ptime <= 1000 or args.baseline_seconds < 0:
        p.error("--seconds at least 1, --ptime 1..1000, --baseline-seconds 0 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_cleanup()
    started = time.time()
    loadavg_start = list(os.getloadavg())
    levels: list[dict[str, Any]] = []
    errors: list[str] = []
    base: dict[str, Any] | None = None
    stopped_by = "levels exhausted"
    per_level = args.seconds + WARMUP_S + 2.5
    progress = Progress(total=len(args.levels) * per_level + 2 * args.baseline_seconds)
    try:
        for name in ("rtpload", "relay", "gen", "sink"):
            common.build_baseline(name)
        for i, calls in enumerate(args.levels):
            def tick(elapsed: float, base_s: float = i * per_level, c: int = calls) -> None:
                progress.show(base_s + min(elapsed, per_level), f"{c} calls")

            level = run_level(calls, args.seconds, args.ptime, args.rcvbuf, tick)
            level["passed"] = level["loss_pct"] <= args.max_loss_pct and not level["behind"]
            levels.append(level)
            progress.note(f"{calls} calls: loss {level['loss_pct']} %, relay CPU "
                          f"{level['relay_cpu_pct']} %, rtpload CPU {level['rtpload_cpu_pct']} %, "
                          f"late ticks {level['late_ticks']}, p99 latency "
                          f"{(level['latency_ms'] or {}).get('p99')} ms, "
                          f"load {level['loadavg_1m']:.2f}")
            if level["behind"]:
                stopped_by = "load tool fell behind"
                break
            if not level["passed"]:
                stopped_by = "loss"
                break
        passed = [lv for lv in levels if lv["passed"]]
        if passed and args.baseline_seconds > 0:
            done = len(args.levels) * per_level

            def base_tick(elapsed: float) -> None:
                progress.show(done + min(elapsed, args.baseline_seconds), "baseline")

            base = baseline(passed[-1]["offered_pps"], args.baseline_seconds, base_tick)
            base["calls"] = passed[-1]["calls"]
            base["baton_density_cpu_ns_per_pkt"] = passed[-1]["relay_cpu_ns_per_pkt"]
            progress.note(f"baseline at {base['rate_pps']} pps: C relay "
                          f"{base['c_cpu_ns_per_pkt']} ns/packet, Baton one flow "
                          f"{base['baton_cpu_ns_per_pkt']} ns/packet, Baton "
                          f"{base['calls']} calls {base['baton_density_cpu_ns_per_pkt']} "
                          f"ns/packet")
        progress.close()
    except KeyboardInterrupt:
        errors.append("interrupted")
        stopped_by = "interrupted"
        sys.stderr.write("\nrtp_density: interrupted\n")
    except BenchError as exc:
        errors.append(str(exc))
        stopped_by = "error"
        sys.stderr.write(f"rtp_density: {exc}\n")

    # The levels rise and the sweep stops at the first failure, so the last pass is it.
    passed = [lv["calls"] for lv in levels if lv["passed"]]
    best = passed[-1] if passed else 0
    result: dict[str, Any] = {
        "bench": "rtp_density",
        "relay": BatonRelay.name,
        "seconds": args.seconds,
        "ptime_ms": args.ptime,
        "relay_rcvbuf": args.rcvbuf or "kernel default",
        "max_loss_pct": args.max_loss_pct,
        "max_calls_under_0_1pct_loss": best,
        "target_calls": TARGET_CALLS,
        "meets_target": best >= TARGET_CALLS,
        "stopped_by": stopped_by,
        "levels": [{k: lv[k] for k in ("calls", "offered_pps", "loss_pct", "relay_cpu_pct",
                                       "relay_cpu_ns_per_pkt", "rtpload_cpu_pct",
                                       "machine_busy_pct", "late_ticks", "behind",
                                       "latency_ms", "passed", "loadavg_1m")}
                   for lv in levels],
        "baseline": base,
        "loadavg": [loadavg_start, list(os.getloadavg())],
        "errors": errors,
    }
    common.report("rtp_density", result, args, started, argv,
                  lambda png: plot(levels, args.max_loss_pct, png), {"levels_full": levels})
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
