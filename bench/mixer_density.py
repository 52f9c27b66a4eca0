#!/usr/bin/env python3
"""Conference mixer density: how many participants one core mixes in real time.

Runs CONFERENCES conferences of PARTICIPANTS μ-law participants for TICKS media
ticks of 20 ms through the Python API of the mixer, every participant talking
every tick (the worst case: each one needs its own mix).  A tick is what the
media loop does: put() each participant's 160 μ-law bytes (decoded), mix()
(sum, N-1, clip, encode).  The CPU time of the process gives

    participants_per_core = participants x (ticks x 0.02 s) / cpu_seconds

Prints one JSON line on stdout and writes it to bench/results/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import common  # noqa: E402

TICK_S = 0.020
FRAME = 160
TARGET_PER_CORE = 2000


def speech_like_frames(count: int, seed: int = 1) -> list[bytes]:
    """μ-law frames of noisy tones at speech levels, one per participant."""
    from ext import g711_py as g711

    rng = np.random.default_rng(seed)
    t = np.arange(FRAME)
    frames = []
    for _ in range(count):
        amp, period = rng.uniform(1000, 12000), rng.uniform(8, 60)
        x = amp * np.sin(2 * np.pi * t / period) + rng.normal(0, 300, FRAME)
        frames.append(g711.ulaw_encode(np.clip(x, -32768, 32767).astype(np.int16)))
    return frames


def run(module, conferences: int, participants: int, ticks: int,
        progress: common.Progress | None = None) -> float:
    """CPU seconds for TICKS ticks of every conference."""
    confs = []
    inputs = speech_like_frames(participants)
    for _ in range(conferences):
        conf = module.Conference(max_participants=participants, frame=FRAME)
        for pid in range(participants):
            conf.add(pid, "ulaw")
        confs.append((conf, list(enumerate(inputs))))
    # One tick outside the measurement: first-call costs are not steady state.
    for conf, feed in confs:
        for pid, frame in feed:
            conf.put(pid, frame)
        conf.mix()
    start = time.process_time()
    for tick in range(ticks):
        for conf, feed in confs:
            put = conf.put
            for pid, frame in feed:
                put(pid, frame)
            conf.mix()
        if progress is not None and tick % 50 == 0:
            progress.show(tick, f"tick {tick}")
    return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conferences", type=int, default=100)
    ap.add_argument("--participants", type=int, default=10, help="per conference")
    ap.add_argument("--ticks", type=int, default=500)
    ap.add_argument("--impl", choices=("c", "py"), default="c")
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--no-files", action="store_true", help="print only, write no result file")
    args = ap.parse_args(argv)

    if args.impl == "c":
        try:
            from ext import mix as module
        except ImportError as exc:
            print(f"ext.mix is not built ({exc}); build it or use --impl py", file=sys.stderr)
            return 2
    else:
        from ext import mix_py as module

    progress = common.Progress(total=args.ticks)
    cpu = run(module, args.conferences, args.participants, args.ticks, progress)
    progress.close()
    total = args.conferences * args.participants
    per_core = total * args.ticks * TICK_S / cpu if cpu > 0 else float("inf")
    result = {
        "benchmark": "mixer_density",
        "implementation": args.impl,
        "law": "ulaw",
        "conferences": args.conferences,
        "participants_per_conference": args.participants,
        "participants": total,
        "ticks": args.ticks,
        "audio_seconds": round(args.ticks * TICK_S, 3),
        "cpu_seconds": round(cpu, 4),
        "ns_per_participant_tick": round(cpu * 1e9 / (total * args.ticks), 1),
        "participants_per_core": round(per_core),
        "target_per_core": TARGET_PER_CORE,
        "meets_target": per_core >= TARGET_PER_CORE,
        "machine": common.machine_info(),
    }
    common.report_line("mixer_density", result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
