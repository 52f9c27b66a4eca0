#!/usr/bin/env python3
"""Application-level calls: how many concurrent calls running instruction documents
the engine holds with no late audio frame.

Every call runs the loop `<Gather timeout=1><Say>…</Say></Gather><Redirect/>`
against a local app server (aiohttp, in its own process), so each call fetches
a document every ~1.7 s while the media clock plays its prompt at 50 packets
a second. SIPp places the calls (no RTP from the callers: in-band DTMF
detection still runs on every call, since SIPp's SDP has no telephone-event).
The engine runs in this process; for each step of concurrent calls the run
measures, over a steady window: the media clock's late ticks
(`engine.media.late_ticks`), the engine process's CPU per call, the
document fetch latency seen by the engine, and the full (generation 2)
garbage collections with their longest pause, the usual cause of a late tick.
`--gc-freeze` shows what freezing the long-lived objects would change.

Prints one JSON line and writes bench/results/instructions-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

LOOP_DOC = ('<?xml version="1.0" encoding="UTF-8"?><Response>'
            '<Gather input="dtmf" numDigits="1" timeout="1" action="/loop">'
            '<Say>Hello.</Say></Gather><Redirect>/loop</Redirect></Response>')


# -- the app server (a child process) ------------------------------------------------

def serve_app(port: int) -> None:
    """The benchmark's app server: one document for every request."""
    from aiohttp import web

    async def loop_doc(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=LOOP_DOC, content_type="text/xml")

    app = web.Application()
    app.router.add_route("*", "/loop", loop_doc)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                handle_signals=True)


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else None


# -- the run ------------------------------------------------------------------------

async def step(eng, fetcher, sip_port: int, calls: int, seconds: float, work: Path,
               gc_freeze: bool = False) -> dict:
    """One step: `calls` concurrent calls, measured for `seconds` once all are up."""
    sipp = subprocess.Popen(
        [common.find_binary("sipp"), "-sn", "uac", f"127.0.0.1:{sip_port}", "-s", "4000",
         "-i", "127.0.0.1", "-p", str(common.free_port()), "-r", str(max(50, calls // 4)),
         "-m", str(calls), "-l", str(calls), "-d", str(600_000), "-max_socket", "4096",
         "-bg", "-trace_err", "-error_file", str(work / f"err-{calls}.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=work, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            up = sum(1 for s in eng.sessions.values() if s.legs and s.legs[0].answered)
            if up >= calls:
                break
            await asyncio.sleep(0.2)
        up = sum(1 for s in eng.sessions.values() if s.legs and s.legs[0].answered)
        if up < calls:
            raise common.BenchError(f"only {up} of {calls} calls were answered")
        await asyncio.sleep(3.0)     # every call is into its loop
        if gc_freeze:
            # Long-lived objects out of the collector's way: full collections stay short.
            gc.freeze()
        pauses: list[float] = []
        started: list[float] = []

        def gc_probe(phase, info):
            if info["generation"] != 2:
                return
            if phase == "start":
                started.append(time.perf_counter())
            elif started:
                pauses.append(time.perf_counter() - started.pop())

        gc.callbacks.append(gc_probe)
        late0 = eng.media.late_ticks
        cpu0 = time.process_time()
        req0, fail0 = fetcher.requests, fetcher.failures
        lat0 = fetcher.latency_count
        t0 = time.monotonic()
        frames0 = eng.media.clock.frames_sent
        await asyncio.sleep(seconds)
        wall = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        gc.callbacks.remove(gc_probe)
        if gc_freeze:
            gc.unfreeze()
        new = min(fetcher.latency_count - lat0, len(fetcher.latencies))
        lat = [x * 1000 for x in list(fetcher.latencies)[-new:]] if new else []
        alive = sum(1 for s in eng.sessions.values() if not s.ended)
        return {
            "calls": calls, "alive_at_end": alive,
            "late_ticks": eng.media.late_ticks - late0,
            "engine_cpu_percent": round(100 * cpu / wall, 1),
            "cpu_ms_per_call_second": round(1000 * cpu / wall / calls, 3),
            "fetches_per_s": round((fetcher.requests - req0) / wall, 1),
            "fetch_failures": fetcher.failures - fail0,
            "fetch_p50_ms": round(pct(lat, 0.5), 2) if lat else None,
            "fetch_p99_ms": round(pct(lat, 0.99), 2) if lat else None,
            "fetch_max_ms": round(max(lat), 2) if lat else None,
            "gc_full_collections": len(pauses),
            "gc_full_max_ms": round(1000 * max(pauses), 1) if pauses else 0.0,
            "frames_per_s": round((eng.media.clock.frames_sent - frames0) / wall),
            "wall_s": round(wall, 2),
        }
    finally:
        common.stop_process(sipp, timeout=3.0)
        for s in list(eng.sessions.values()):
            s.end("bench")
        await asyncio.sleep(1.0)


async def run(args) -> dict:
    from engine.config.load import from_dict
    from engine.modules.instructions import InstructionsModule, shutdown
    from engine.modules.instructions.verbs import shared_for
    from engine.runtime.server import Engine

    app_port = common.free_port()
    app_log = Path(tempfile.mkdtemp(prefix="baton-bench-app-")) / "app.log"
    app = common.spawn([sys.executable, __file__, "--serve-app", str(app_port)], log=app_log)
    port = common.free_port()
    data = tempfile.mkdtemp(prefix="baton-bench-")
    cfg = from_dict({
        "engine": {"sip_addr": f"127.0.0.1:{port}", "data_dir": data, "log_level": "warning",
                   "grpc": False},
        "media": {"address": "127.0.0.1", "rtp_port_min": 30000, "rtp_port_max": 40000,
                  "rtp_timeout": 3600},
        "accounts": {"bench": {"numbers": {
            "4000": {"instructions": f"http://127.0.0.1:{app_port}/loop"}}}},
        # The app server runs on loopback: allowed by port, as an operator would.
        "security": {"fetch_allow": [f"127.0.0.1:{app_port}"], "max_setup_per_source": 0},
    }, "<bench>")
    eng = Engine(cfg)
    eng.registry.builtins.setdefault("baton.instructions", InstructionsModule)
    await eng.start()
    work = Path(tempfile.mkdtemp(prefix="baton-sipp-"))
    steps: list[dict] = []
    best = 0
    try:
        for _ in range(100):
            try:
                import urllib.request

                urllib.request.urlopen(f"http://127.0.0.1:{app_port}/loop", timeout=1).read()
                break
            except OSError:
                await asyncio.sleep(0.1)
        fetcher = shared_for(eng).fetcher
        for calls in args.steps:
            result = await step(eng, fetcher, port, calls, args.seconds, work, args.gc_freeze)
            steps.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
            if result["late_ticks"] == 0 and result["alive_at_end"] >= calls:
                best = calls
            elif not args.all_steps:
                break
        last = next((s for s in steps if s["calls"] == best), steps[-1] if steps else {})
        return {
            "bench": "instructions",
            "max_calls_no_late_audio": best,
            "cpu_ms_per_call_second": last.get("cpu_ms_per_call_second"),
            "fetch_p50_ms": last.get("fetch_p50_ms"),
            "fetch_p99_ms": last.get("fetch_p99_ms"),
            "document": "Gather(timeout=1, Say) + Redirect loop",
            "window_s": args.seconds,
            "gc_freeze": args.gc_freeze,
            "steps": steps,
            "machine": common.machine_info(),
        }
    finally:
        await shutdown(eng)
        await eng.stop(timeout=1.0)
        common.stop_process(app, timeout=3.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")],
                   default=[200, 400, 600, 700, 800, 900, 1000, 1200],
                   help="concurrent calls per step, comma-separated")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window per step")
    p.add_argument("--all-steps", action="store_true", help="go on after a step with late audio")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() once the calls are up (what an engine-wide freeze would give)")
    p.add_argument("--no-files", action="store_true", help="print only, write no result file")
    p.add_argument("--serve-app", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_app:
        serve_app(args.serve_app)
        return 0
    import uvloop

    common.install_cleanup()
    result = uvloop.run(run(args))
    if not args.no_files:
        jpath, _ = common.result_paths("instructions")
        result["json"] = str(jpath)
        common.write_json(jpath, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("steps", "machine")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
