#!/usr/bin/env python3
"""Media kernel density: real-time DTMF channels per core and G.711 throughput,
of the C implementation (or, with --impl py, of the numpy twin). Prints one JSON line.

DTMF: 10 s of one channel's audio (digits in noise) is fed in 20 ms frames,
repeatedly; channels_per_core = audio_seconds / cpu_seconds. The same audio
fed in one call shows the kernel without per-frame call overhead. G.711: 10 s of
PCM encoded / decoded in one call, and again frame by frame; MB/s counts the
16-bit linear PCM side. --min-seconds is the CPU time each figure is measured over.
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

RATE = 8000
FRAME = 160
SECONDS = 10.0


def audio() -> np.ndarray:
    """10 s: a digit every 200 ms (60 ms on) over -40 dBm0-ish noise."""
    rng = np.random.default_rng(1)
    n = int(SECONDS * RATE)
    x = rng.normal(0, 150, n)
    t = np.arange(int(0.06 * RATE)) / RATE
    rows, cols = (697, 770, 852, 941), (1209, 1336, 1477, 1633)
    for k, start in enumerate(range(800, n - 600, 1600)):
        fr, fc = rows[k % 4], cols[(k // 4) % 4]
        x[start:start + len(t)] += 7000 * (np.sin(2 * np.pi * fr * t) + np.sin(2 * np.pi * fc * t))
    return np.clip(x, -32768, 32767).astype(np.int16)


def cpu(fn, min_seconds: float = 1.0) -> float:
    """CPU seconds per call of fn, over at least min_seconds."""
    fn()
    calls, start = 0, time.process_time()
    while True:
        fn()
        calls += 1
        spent = time.process_time() - start
        if spent >= min_seconds:
            return spent / calls


def _modules(impl: str):
    if impl == "c":
        from ext import dtmf, g711
    else:
        from ext import dtmf_py as dtmf, g711
    return dtmf, g711


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", choices=("c", "py"), default="c",
                    help="the C extensions or the numpy twins (default: c)")
    ap.add_argument("--min-seconds", type=float, default=1.0,
                    help="CPU seconds each figure is measured over (default: %(default)s)")
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--no-files", action="store_true", help="print only, write no result file")
    args = ap.parse_args(argv)
    try:
        dtmf, g711 = _modules(args.impl)
    except ImportError as exc:
        print(f"the C extensions are not built ({exc}); build them or use --impl py",
              file=sys.stderr)
        return 2
    steps = 8
    progress = common.Progress(total=steps)
    done = 0

    def step(name: str) -> None:
        nonlocal done
        done += 1
        progress.show(done, name)

    t = args.min_seconds
    pcm = audio()
    frames = [pcm[i:i + FRAME] for i in range(0, len(pcm), FRAME)]
    det = dtmf.DtmfDetector(RATE)
    found = []

    def run_dtmf():
        det.reset()
        found.clear()
        for f in frames:
            found.extend(det.feed(f))

    per_run = cpu(run_dtmf, 2.0 * t)
    step("dtmf frames")
    bulk = dtmf.DtmfDetector(RATE)

    def run_bulk():
        bulk.reset()
        bulk.feed(pcm)

    per_bulk = cpu(run_bulk, t)
    step("dtmf bulk")
    raw = pcm.tobytes()
    codes = g711.ulaw_encode(raw)
    acodes = g711.alaw_encode(raw)
    fcodes = [codes[i:i + FRAME] for i in range(0, len(codes), FRAME)]
    fraw = [raw[i:i + 2 * FRAME] for i in range(0, len(raw), 2 * FRAME)]
    mb = len(raw) / 1e6
    g = {}
    for name, fn in (("g711_ulaw_encode_MBps", lambda: g711.ulaw_encode(raw)),
                     ("g711_ulaw_decode_MBps", lambda: g711.ulaw_decode(codes)),
                     ("g711_alaw_encode_MBps", lambda: g711.alaw_encode(raw)),
                     ("g711_alaw_decode_MBps", lambda: g711.alaw_decode(acodes)),
                     ("g711_ulaw_encode_frames_MBps",
                      lambda: [g711.ulaw_encode(f) for f in fraw]),
                     ("g711_ulaw_decode_frames_MBps",
                      lambda: [g711.ulaw_decode(f) for f in fcodes])):
        g[name] = round(mb / cpu(fn, t), 1)
        step(name)
    progress.close()
    result = {
        "bench": "media_density",
        "implementation": args.impl,
        "dtmf_channels_per_core": round(SECONDS / per_run),
        "dtmf_channels_per_core_one_call": round(SECONDS / per_bulk),
        "dtmf_digits_per_run": len(found),
        **g,
        "mb_basis": "16-bit linear PCM",
        "machine": common.machine_info(),
    }
    common.report_line("dtmf_density", result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
