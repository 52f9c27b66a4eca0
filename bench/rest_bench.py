#!/usr/bin/env python3
"""The REST API under load: call creations per second through `POST Calls.json`
(each call really placed and answered), and the latency of `GET Calls/{Sid}.json`
with N live calls, next to aiohttp serving a static JSON body in the same run.

Set-up: `baton serve` (no accountant) with one account and number 1000 (baton.hold,
which answers at once). This process is the client (aiohttp, one connection pool):

1. creations: N calls `POST Calls.json` To=1000 with a TwiML `<Pause>`, `--concurrency`
   requests in flight; the rate is N over the time from the first request to the moment
   the engine lists all N `in-progress` (answered by the far end, running their TwiML);
2. latency: `--requests` sequential `GET Calls/{Sid}.json` of random live calls, while
   all N calls are up (their media clock ticking); the engine's late media ticks over
   the same time are reported too;
3. the baseline: the same number of sequential GETs of a JSON body of the same size from
   a plain aiohttp server (a child process, so it does not share the client's loop);
4. every call is ended with `Status=completed`.

Prints one JSON line and writes bench/results/rest-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

SID = "ACbe0c4000000000000000000000000001"
TOKEN = "bench-auth-token-0123456789abcdef"
TWIML = '<Response><Pause length="3600"/></Response>'


def config(path: Path) -> None:
    path.write_text(f"""
[media]
address = "127.0.0.1"
rtp_timeout = 3600

[accounts.bench]
sid = "{SID}"
auth_token = "{TOKEN}"

[accounts.bench.outbound]
max_concurrent = 100000

[accounts.bench.numbers]
"1000" = {{ module = "baton.hold" }}
""")


def run_static(port: int, size: int) -> int:
    """The baseline: aiohttp answering a static JSON body of `size` bytes."""
    from aiohttp import web

    body = json.dumps({"pad": "x" * max(0, size - 11)}).encode()

    async def static(_request):
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/static.json", static)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
    return 0


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def sequential_gets(session, urls: list[str]) -> list[float]:
    out = []
    for url in urls:
        t = time.perf_counter()
        async with session.get(url) as r:
            await r.read()
            if r.status != 200:
                raise common.BenchError(f"GET {url}: HTTP {r.status}")
        out.append((time.perf_counter() - t) * 1000)
    return out


async def late_ticks(session, metrics: str) -> float:
    async with session.get(metrics) as r:
        m = re.search(r"^baton_media_late_ticks_total (\S+)$", await r.text(), re.M)
    return float(m.group(1)) if m else float("nan")


async def measure(a, http: str, metrics: str, static: str, progress) -> dict:
    import aiohttp

    auth = "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    base = f"{http}/2010-04-01/Accounts/{SID}"
    conn = aiohttp.TCPConnector(limit=max(8, a.concurrency))
    async with aiohttp.ClientSession(connector=conn, headers={"Authorization": auth}) as s:
        sem = asyncio.Semaphore(a.concurrency)
        sids: list[str] = []

        async def create():
            async with sem:
                async with s.post(base + "/Calls.json", data={"To": "1000", "From": "+15550000",
                                                             "Twiml": TWIML}) as r:
                    body = await r.json()
                    if r.status != 201:
                        raise common.BenchError(f"POST Calls.json: {r.status} {body}")
                    sids.append(body["sid"])

        async def live() -> int:
            """How many of our calls the engine lists in progress (pages of 1000)."""
            mine, n = set(sids), 0
            url = base + "/Calls.json?Status=in-progress&PageSize=1000"
            while url:
                async with s.get(url) as r:
                    body = await r.json()
                n += sum(1 for c in body["calls"] if c["sid"] in mine)
                nxt = body.get("next_page_uri")
                url = http + nxt if nxt else None
            return n

        progress.show(0, f"creating {a.calls} calls")
        t0 = time.perf_counter()
        await asyncio.gather(*(create() for _ in range(a.calls)))
        t_posted = time.perf_counter() - t0
        answered = 0
        deadline = time.perf_counter() + a.answer_timeout
        while time.perf_counter() < deadline:
            answered = await live()
            if answered >= a.calls:
                break
            await asyncio.sleep(0.05)
        t_answered = time.perf_counter() - t0
        if answered < a.calls:
            raise common.BenchError(f"only {answered} of {a.calls} calls answered within "
                                    f"{a.answer_timeout:g} s")
        progress.show(1, f"{a.calls} calls up: GET latency")
        await asyncio.sleep(1.0)        # the last answers settle
        urls = [f"{base}/Calls/{random.choice(sids)}.json" for _ in range(a.requests)]
        size = 0
        async with s.get(urls[0]) as r:
            size = len(await r.read())
        ticks0 = await late_ticks(s, metrics)
        rest = await sequential_gets(s, urls)
        late = await late_ticks(s, metrics) - ticks0
        progress.show(2, "the static baseline")
        async with aiohttp.ClientSession() as plain:
            await sequential_gets(plain, [static] * 20)      # warm
            base_ms = await sequential_gets(plain, [static] * a.requests)
        progress.show(3, "ending the calls")

        async def end(sid):
            async with sem:
                async with s.post(f"{base}/Calls/{sid}.json", data={"Status": "completed"}) as r:
                    await r.read()

        await asyncio.gather(*(end(x) for x in sids))
    return {
        "calls": a.calls, "answered": answered, "concurrency": a.concurrency,
        "posted_s": round(t_posted, 3), "answered_s": round(t_answered, 3),
        "creations_per_s": round(a.calls / t_answered, 1),
        "requests": a.requests, "body_bytes": size,
        "get_p50_ms": round(statistics.median(rest), 3),
        "get_p99_ms": round(percentile(rest, 99), 3),
        "static_p50_ms": round(statistics.median(base_ms), 3),
        "static_p99_ms": round(percentile(base_ms, 99), 3),
        "late_media_ticks": late,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=500, help="live calls (default 500)")
    ap.add_argument("--requests", type=int, default=2000,
                    help="sequential GETs for each latency figure (default 2000)")
    ap.add_argument("--concurrency", type=int, default=50, help="POSTs in flight (default 50)")
    ap.add_argument("--answer-timeout", type=float, default=120.0)
    ap.add_argument("--quick", action="store_true", help="20 calls, 200 requests: a smoke run")
    ap.add_argument("--role", choices=("static",), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=1000, help=argparse.SUPPRESS)
    common.add_result_file_args(ap)
    a = ap.parse_args(argv)
    if a.role == "static":
        return run_static(a.port, a.size)
    if a.quick:
        a.calls, a.requests = min(a.calls, 20), min(a.requests, 200)
    common.install_cleanup()
    work = Path(tempfile.mkdtemp(prefix="baton-bench-rest-"))
    cfg = work / "rest.toml"
    config(cfg)
    sip, grpc_port, http, metrics, static = (common.free_port() for _ in range(5))
    engine = common.spawn([sys.executable, "-m", "engine.cli", "serve", "--config", cfg,
                           "--sip-addr", f"127.0.0.1:{sip}", "--grpc-addr", f"127.0.0.1:{grpc_port}",
                           "--http-addr", f"127.0.0.1:{http}", "--metrics-addr",
                           f"127.0.0.1:{metrics}", "--data-dir", work / "data", "--no-accountant",
                           "--log-level", "warning"], log=work / "engine.log", cwd=ROOT)
    plain = common.spawn([sys.executable, __file__, "--role", "static", "--port", static,
                          "--size", "1000"], log=work / "static.log")
    progress = common.Progress(total=4)
    try:
        result = asyncio.run(_run(a, engine, http, metrics, static, progress))
    except common.BenchError as exc:
        print(f"rest bench: {exc}\n{common.log_tail(work / 'engine.log')}", file=sys.stderr)
        return 1
    finally:
        progress.close()
        common.stop_process(plain)
        common.stop_process(engine)
    result = {"benchmark": "rest", **result, "machine": common.machine_info(),
              "quick": a.quick}
    common.report_line("rest", result, a)
    return 0


async def _run(a, engine, http_port, metrics_port, static_port, progress) -> dict:
    import aiohttp

    http = f"http://127.0.0.1:{http_port}"
    static = f"http://127.0.0.1:{static_port}/static.json"
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        for url in (http + "/health", static):
            while True:
                if engine.poll() is not None:
                    raise common.BenchError("the engine exited")
                try:
                    async with s.get(url) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise common.BenchError(f"{url} did not answer")
                await asyncio.sleep(0.1)
    return await measure(a, http, f"http://127.0.0.1:{metrics_port}/metrics", static, progress)


if __name__ == "__main__":
    sys.exit(main())
