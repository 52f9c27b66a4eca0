#!/usr/bin/env python3
"""Transition latency under load: time from a transition request to the new module
having control, with N concurrent live sessions held up by SIPp.

The engine runs in this process (its own uvloop); SIPp places N long calls to
number 1000 over loopback; then sessions are moved back and forth between
`baton.hold` and `baton.echo` through the engine's asynchronous API transition,
while the media clock keeps sending every caller 50 packets a second.

Prints one JSON line and writes JSON + PNG into bench/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else None


async def run(args) -> dict:
    from engine.config.load import from_dict
    from engine.runtime.server import Engine

    port = common.free_port()
    data = tempfile.mkdtemp(prefix="baton-bench-")
    cfg = from_dict({
        "engine": {"sip_addr": f"127.0.0.1:{port}", "data_dir": data, "log_level": "warning"},
        "media": {"address": "127.0.0.1", "rtp_port_min": 30000, "rtp_port_max": 40000},
        "accounts": {"bench": {"numbers": {"1000": {"module": "baton.hold"}}}},
    }, "<bench>")
    eng = Engine(cfg)
    await eng.start()
    work = Path(tempfile.mkdtemp(prefix="baton-sipp-"))
    rate = max(50, args.sessions // 5)
    sipp = subprocess.Popen(
        [common.find_binary("sipp"), "-sn", "uac", f"127.0.0.1:{port}", "-s", "1000",
         "-i", "127.0.0.1", "-p", str(common.free_port()), "-r", str(rate),
         "-m", str(args.sessions), "-l", str(args.sessions), "-d", str(600_000),
         "-max_socket", "4096", "-trace_err", "-error_file", str(work / "err.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=work, start_new_session=True)
    # Half the bar for the calls coming up, half for the transitions.
    progress = common.Progress(total=2.0)
    try:
        deadline = time.monotonic() + 60
        while len(eng.sessions) < args.sessions and time.monotonic() < deadline:
            progress.show(len(eng.sessions) / args.sessions, f"{len(eng.sessions)} calls up")
            await asyncio.sleep(0.1)
        live = len(eng.sessions)
        if live < args.sessions:
            raise common.BenchError(f"only {live} of {args.sessions} sessions came up")
        await asyncio.sleep(1.0)
        ids = list(eng.sessions)
        lat = []
        cpu0 = time.process_time()
        late0 = eng.media.late_ticks
        t_start = time.monotonic()
        targets = ("baton.echo", "baton.hold")
        for i in range(args.transitions):
            sid = random.choice(ids)
            s = eng.sessions.get(sid)
            if s is None:
                continue
            target = targets[0] if s.module.code != targets[0] else targets[1]
            t0 = time.perf_counter_ns()
            eng.transition(sid, target)
            t1 = time.perf_counter_ns()
            assert s.module.code == target
            lat.append((t1 - t0) / 1000.0)
            # Spread the requests: the reactor keeps carrying media between them.
            if i % 50 == 49:
                progress.show(1.0 + i / args.transitions, f"{i + 1} transitions")
                await asyncio.sleep(0.01)
        progress.close()
        wall = time.monotonic() - t_start
        cpu = time.process_time() - cpu0
        return {
            "bench": "transitions", "sessions": live, "transitions": len(lat),
            "p50_us": round(pct(lat, 0.50), 1), "p99_us": round(pct(lat, 0.99), 1),
            "max_us": round(max(lat), 1), "mean_us": round(sum(lat) / len(lat), 1),
            "wall_s": round(wall, 2), "engine_cpu_s": round(cpu, 2),
            "late_media_ticks": eng.media.late_ticks - late0,
            "frames_sent": eng.media.clock.frames_sent,
            "latencies_us": lat,
        }
    finally:
        common.stop_process(sipp, timeout=5.0)
        await eng.stop(timeout=1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=500, help="concurrent live sessions")
    p.add_argument("--transitions", type=int, default=5000)
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--no-files", action="store_true", help="print only, write no result files")
    args = p.parse_args(argv)
    import uvloop

    common.install_cleanup()
    result = uvloop.run(run(args))
    lat = result.pop("latencies_us")
    if not args.no_files:
        jpath, ppath = common.result_paths("transitions", args.results_dir)
        result["json"], result["png"] = str(jpath), str(ppath)
        plt = common.pyplot()
        if plt is not None:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.hist(lat, bins=60)
            ax.set_xlabel("transition request -> new module in control (µs)")
            ax.set_ylabel("transitions")
            ax.set_title(f"{result['sessions']} live sessions: p50 {result['p50_us']} µs, "
                         f"p99 {result['p99_us']} µs")
            fig.tight_layout()
            fig.savefig(ppath, dpi=100)
            plt.close(fig)
        common.write_json(jpath, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
