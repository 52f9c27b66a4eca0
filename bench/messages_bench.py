#!/usr/bin/env python3
"""Texts per second: inbound SIP MESSAGEs answered by a module and by an instruction app,
with the time from each MESSAGE to its 202 and to the reply text, against Kamailio's
stateless responder under the same load in the same run.

Set-up: `baton serve` (no accountant) with two messaging numbers: 8000 runs `baton.bot`
(`reply = "{Body}"`), 8001 an instruction app on a local aiohttp server (a child process)
answering every text with `<Response><Message>{Body}</Message></Response>`; and Kamailio
from bench/baseline/kamailio-responder.cfg, which answers MESSAGE `202` statelessly.

The load is this process's own UDP pager client (SIPp cannot take the reply: Baton sends
it as a new MESSAGE, in a transaction of its own with its own Call-ID). At each offered
rate it sends `rate x seconds` MESSAGEs evenly paced, each from one of `--senders`
addresses-of-record (so conversations are reused, as a phone's are), each body a token;
it notes the 202 and the reply MESSAGE carrying the same token (answered 200), so every
text's two latencies are known. A step is good when every text got its 202 and its reply
and the replies kept up (>= 97 % of the offered rate). Kamailio gets the same stream (202
only), and the same rate once more from SIPp (a MESSAGE scenario: the rate Kamailio answers from a
C load generator; SIPp's own response times tick in whole milliseconds, so this client's
202 times are the latency baseline).

Per target the ramp stops at its first bad step. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
from common import BenchError  # noqa: E402

BEST_MIN_ACHIEVED = 0.97
MODULE_NUMBER = "8000"
APP_NUMBER = "8001"

SIPP_SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="MESSAGE, 202">
  <send retrans="500" start_rtd="1">
    <![CDATA[

      MESSAGE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:u[call_number]@[local_ip]:[local_port]>;tag=[pid]m[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 MESSAGE
      Max-Forwards: 70
      Content-Type: text/plain
      Content-Length: [len]

      bench [call_number]
    ]]>
  </send>
  <recv response="202" rtd="1"/>
</scenario>
"""


def config(path: Path, app_port: int) -> None:
    app_url = f"http://{common.LOOPBACK}:{app_port}/sms"
    path.write_text(f"""
[engine]
transports = ["udp"]

[security]
fetch_allow = ["{common.LOOPBACK}:{app_port}"]

[media]
address = "127.0.0.1"

[accounts.bench.numbers]
"{MODULE_NUMBER}" = {{ messaging = {{ module = "baton.bot", reply = "{{Body}}" }} }}
"{APP_NUMBER}" = {{ messaging = "{app_url}" }}
""")


def run_app(port: int) -> int:
    """The instruction app: a MessagingResponse echoing each text's Body."""
    from xml.sax.saxutils import escape

    from aiohttp import web

    async def sms(request):
        form = await request.post()
        doc = f"<Response><Message>{escape(form.get('Body', ''))}</Message></Response>"
        return web.Response(text=doc, content_type="application/xml")

    app = web.Application()
    app.router.add_post("/sms", sms)
    app.router.add_get("/health", lambda _r: web.Response(text="ok"))
    web.run_app(app, host=common.LOOPBACK, port=port, access_log=None, print=None)
    return 0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def _headers(data: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    out: dict[str, str] = {}
    vias = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = {"v": "via", "f": "from", "t": "to", "i": "call-id", "l": "content-length"}.get(
            name.strip().lower(), name.strip().lower())
        if key == "via":
            vias.append(value.strip())
        out.setdefault(key, value.strip())
    out["via"] = "\r\nVia: ".join(vias)
    return lines[0], out, body


class Pager(asyncio.DatagramProtocol):
    """The load: sends MESSAGEs, notes their 202s and the reply MESSAGEs (answered 200)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.local: tuple[str, int] = ("", 0)
        self.sent: dict[int, float] = {}
        self.accepted: dict[int, float] = {}
        self.replied: dict[int, float] = {}
        self.refused: dict[int, int] = {}
        self.calls: dict[str, int] = {}
        self.run = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.local = sock.getsockname()[:2]

    def reset(self, run: int) -> None:
        self.run = run
        for d in (self.sent, self.accepted, self.replied, self.refused, self.calls):
            d.clear()

    def send(self, target: tuple[str, int], number: str, seq: int, sender: int) -> None:
        host, port = self.local
        call_id = f"b{self.run}-{seq}@bench"
        body = f"bench {self.run} {seq}".encode()
        self.calls[call_id] = seq
        msg = (f"MESSAGE sip:{number}@{target[0]}:{target[1]} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{self.run}x{seq};rport\r\n"
               f"From: <sip:u{sender}@{host}:{port}>;tag=t{self.run}x{seq}\r\n"
               f"To: <sip:{number}@{target[0]}:{target[1]}>\r\n"
               f"Call-ID: {call_id}\r\nCSeq: 1 MESSAGE\r\nMax-Forwards: 70\r\n"
               f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.sent[seq] = time.perf_counter()
        assert self.transport is not None
        self.transport.sendto(msg + body, target)

    def datagram_received(self, data: bytes, addr) -> None:
        now = time.perf_counter()
        try:
            first, h, body = _headers(data)
        except ValueError:
            return
        if first.startswith("SIP/2.0 "):
            seq = self.calls.get(h.get("call-id", ""))
            if seq is None:
                return
            code = int(first.split()[1])
            if code == 202 or code == 200:
                self.accepted.setdefault(seq, now)
            elif code >= 300:
                self.refused[seq] = code
            return
        if not first.startswith("MESSAGE "):
            return
        # The reply text: answer 200 (RFC 3428 7), then match its token.
        to = h.get("to", "")
        resp = (f"SIP/2.0 200 OK\r\nVia: {h['via']}\r\nFrom: {h.get('from', '')}\r\n"
                f"To: {to}{'' if 'tag=' in to else ';tag=bench'}\r\n"
                f"Call-ID: {h.get('call-id', '')}\r\nCSeq: {h.get('cseq', '')}\r\n"
                f"Content-Length: 0\r\n\r\n").encode()
        assert self.transport is not None
        self.transport.sendto(resp, addr)
        parts = body.decode("utf-8", "replace").split()
        if len(parts) == 3 and parts[0] == "bench" and parts[1] == str(self.run):
            try:
                self.replied.setdefault(int(parts[2]), now)
            except ValueError:
                pass


async def offer(pager: Pager, target: tuple[str, int], number: str, rate: float,
                seconds: float, senders: int, drain: float, run: int,
                reply: bool) -> dict[str, Any]:
    """One step: RATE texts/s for SECONDS, then up to DRAIN seconds for the answers."""
    pager.reset(run)
    total = max(1, round(rate * seconds))
    start = time.perf_counter()
    seq = 0
    while seq < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while seq < due:
            pager.send(target, number, seq, seq % senders)
            seq += 1
        await asyncio.sleep(0.001)
    send_s = time.perf_counter() - start
    deadline = time.perf_counter() + drain
    while time.perf_counter() < deadline:
        done = len(pager.accepted) + len(pager.refused)
        if done >= total and (not reply or len(pager.replied) >= total):
            break
        await asyncio.sleep(0.01)
    acc = [(pager.accepted[s] - t) * 1000 for s, t in pager.sent.items() if s in pager.accepted]
    rep = [(pager.replied[s] - t) * 1000 for s, t in pager.sent.items() if s in pager.replied]
    answered = len(pager.replied) if reply else len(pager.accepted)
    ends = list((pager.replied if reply else pager.accepted).values())
    span = (max(ends) - start) if ends else 0.0
    achieved = answered / max(span, send_s) if answered else 0.0
    ok = answered == total and not pager.refused and achieved >= BEST_MIN_ACHIEVED * rate
    out: dict[str, Any] = {
        "offered_rate": rate, "sent": total, "accepted": len(pager.accepted),
        "refused": len(pager.refused), "replied": len(pager.replied) if reply else None,
        "achieved_rate": round(achieved, 1), "ok": ok,
        "accept_p50_ms": _ms(statistics.median(acc) if acc else None),
        "accept_p99_ms": _ms(percentile(acc, 99)),
    }
    if reply:
        out["reply_p50_ms"] = _ms(statistics.median(rep) if rep else None)
        out["reply_p99_ms"] = _ms(percentile(rep, 99))
    if pager.refused:
        out["refused_codes"] = sorted(set(pager.refused.values()))
    return out


def _ms(v: float | None) -> float | None:
    return round(v, 3) if v is not None else None


def sipp_step(address: tuple[str, int], rate: float, seconds: float, work: Path,
              scenario: Path) -> dict[str, Any]:
    """The same rate of MESSAGEs from SIPp (the C load generator), answered 202."""
    run_dir = work / f"sipp-{rate:g}"
    # SIPp's response times tick in milliseconds here (0 or 4 ms): this client's
    # figures are the latency baseline, SIPp's the rate.
    r = common.run_sipp(address, rate, seconds, run_dir, service=MODULE_NUMBER,
                        scenario=scenario)
    ok = not r.error and r.failed == 0 and r.cps >= BEST_MIN_ACHIEVED * rate
    return {"offered_rate": rate, "sent": r.calls, "accepted": r.successful,
            "failed": r.failed, "achieved_rate": round(r.cps, 1), "ok": ok,
            "error": r.error or None}


def best(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    good = [s for s in steps if s.get("ok")]
    return max(good, key=lambda s: s["offered_rate"]) if good else None


async def measure(a, engine_addr, kamailio, work: Path, progress) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    _, pager = await loop.create_datagram_endpoint(Pager, local_addr=(common.LOOPBACK, 0))
    targets = [("module", engine_addr, MODULE_NUMBER, True),
               ("instructions", engine_addr, APP_NUMBER, True)]
    if kamailio is not None:
        targets.append(("kamailio", kamailio.address, MODULE_NUMBER, False))
    scenario = work / "message.xml"
    scenario.write_text(SIPP_SCENARIO)
    steps: dict[str, list[dict[str, Any]]] = {t[0]: [] for t in targets}
    if kamailio is not None:
        steps["kamailio_sipp"] = []
    stopped: set[str] = set()
    cpu: dict[str, list[float]] = {}
    run = 0
    n_steps = len(a.rate_list) * (len(targets) + (1 if kamailio is not None else 0))
    done = 0
    # Warm up: each conversation started once, the app's HTTP pool opened.
    for _, addr, number, reply in targets[:2]:
        run += 1
        await offer(pager, addr, number, min(a.senders, 200), a.senders / min(a.senders, 200),
                    a.senders, a.drain, run, reply)
    for rate in a.rate_list:
        for name, addr, number, reply in targets:
            done += 1
            if name in stopped:
                continue
            run += 1
            server_pids = kamailio.pids() if name == "kamailio" else a.engine_pids()
            meter = common.CpuMeter(lambda p=server_pids: common.process_tree(p)).start()
            step = await offer(pager, addr, number, rate, a.seconds, a.senders, a.drain, run,
                               reply)
            used = meter.stop()
            step["cpu_us_per_message"] = (round(used * 1e6 / step["sent"], 1)
                                          if used is not None else None)
            steps[name].append(step)
            progress.show(done, f"{name} {rate:g}/s")
            progress.note(_describe(name, step))
            if not step["ok"]:
                stopped.add(name)
            await asyncio.sleep(a.settle)
        if kamailio is not None and "kamailio_sipp" not in stopped:
            done += 1
            step = await loop.run_in_executor(None, sipp_step, kamailio.address, rate,
                                              a.seconds, work, scenario)
            steps["kamailio_sipp"].append(step)
            progress.show(done, f"kamailio (SIPp) {rate:g}/s")
            progress.note(_describe("kamailio (SIPp)", step))
            if not step["ok"]:
                stopped.add("kamailio_sipp")
    del cpu
    pager.transport.close()
    out: dict[str, Any] = {"steps": steps}
    for name in steps:
        b = best(steps[name])
        first = steps[name][0] if steps[name] else {}
        out[name] = {"best_rate": b["achieved_rate"] if b else None,
                     "best_offered": b["offered_rate"] if b else None,
                     "accept_p99_ms": b.get("accept_p99_ms") if b else None,
                     "reply_p50_ms": b.get("reply_p50_ms") if b else None,
                     "reply_p99_ms": b.get("reply_p99_ms") if b else None,
                     "cpu_us_per_message": b.get("cpu_us_per_message") if b else None,
                     # At the first (lowest) rate: latency without the knee's queueing.
                     "first_rate": first.get("offered_rate"),
                     "first_reply_p99_ms": first.get("reply_p99_ms"),
                     "first_accept_p99_ms": first.get("accept_p99_ms")}
    # Kamailio's 202 p99 at the rate each Baton target's figure was measured at.
    for name in ("module", "instructions"):
        rate = out[name]["best_offered"]
        same = [s for s in steps.get("kamailio", []) if s["offered_rate"] == rate]
        out[name]["kamailio_accept_p99_ms"] = same[0]["accept_p99_ms"] if same else None
    return out


def _describe(name: str, s: dict[str, Any]) -> str:
    text = (f"{name:>16} {s['offered_rate']:>6g}/s offered: {s['achieved_rate']:8.1f}/s, "
            f"{s['accepted']}/{s['sent']} accepted")
    if s.get("replied") is not None:
        text += f", {s['replied']} replied, reply p99 {s.get('reply_p99_ms')} ms"
    if s.get("accept_p99_ms") is not None:
        text += f", 202 p99 {s['accept_p99_ms']} ms"
    text += f"  {'ok' if s['ok'] else 'FAIL'}"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="250,500,1000,1500,2000,3000,4000",
                    help="offered texts/s, rising, comma-separated (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each step")
    ap.add_argument("--senders", type=int, default=100,
                    help="distinct senders (conversations per number; default 100)")
    ap.add_argument("--drain", type=float, default=5.0,
                    help="seconds to wait for the last answers of a step (default 5)")
    ap.add_argument("--settle", type=float, default=0.5, help="pause between steps")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure Kamailio's stateless responder (default: on)")
    ap.add_argument("--quick", action="store_true", help="rates 50,100 for 1 s: a smoke run")
    ap.add_argument("--role", choices=("app",), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    common.add_result_file_args(ap)
    a = ap.parse_args(argv)
    if a.role == "app":
        return run_app(a.port)
    if a.quick:
        a.rates, a.seconds, a.senders = "50,100", 1.0, min(a.senders, 20)
    try:
        a.rate_list = sorted({float(r) for r in a.rates.split(",") if r.strip()})
    except ValueError:
        ap.error("--rates takes numbers separated by commas")
    if not a.rate_list or a.rate_list[0] <= 0 or a.seconds <= 0 or a.senders < 1:
        ap.error("--rates, --seconds and --senders must be positive")
    common.install_cleanup()
    common.find_binary("sipp")
    work = Path(tempfile.mkdtemp(prefix="baton-bench-messages-"))
    sip, grpc_port, metrics, app_port = (common.free_port() for _ in range(4))
    cfg = work / "messages.toml"
    config(cfg, app_port)
    app = common.spawn([sys.executable, __file__, "--role", "app", "--port", app_port],
                       log=work / "app.log")
    engine = None
    kamailio = None
    errors: list[str] = []
    result: dict[str, Any] = {}
    progress = common.Progress(total=len(a.rate_list) * 4)
    try:
        engine = common.start_ready(
            [sys.executable, "-m", "engine.cli", "serve", "--config", cfg,
             "--sip-addr", f"{common.LOOPBACK}:{sip}",
             "--grpc-addr", f"{common.LOOPBACK}:{grpc_port}",
             "--metrics-addr", f"{common.LOOPBACK}:{metrics}",
             "--data-dir", work / "data", "--no-accountant", "--log-level", "warning"],
            work / "engine.log", (common.LOOPBACK, sip), 60.0)
        a.engine_pids = lambda: [engine.pid]
        if a.baseline:
            kamailio = common.KamailioResponder(workdir=work / "kamailio")
            (work / "kamailio").mkdir()
            kamailio.start()
        _wait_http(f"http://{common.LOOPBACK}:{app_port}/health", app)
        result = asyncio.run(measure(a, (common.LOOPBACK, sip), kamailio, work, progress))
    except BenchError as exc:
        errors.append(str(exc))
        print(f"messages bench: {exc}\n{common.log_tail(work / 'engine.log')}", file=sys.stderr)
    finally:
        progress.close()
        if kamailio is not None:
            kamailio.stop()
        if engine is not None:
            common.stop_process(engine)
        common.stop_process(app)
        shutil.rmtree(work, ignore_errors=True)
    mod, ins = result.get("module") or {}, result.get("instructions") or {}
    kam, ksipp = result.get("kamailio") or {}, result.get("kamailio_sipp") or {}
    out = {"benchmark": "messages",
           "module_rate": mod.get("best_rate"),
           "module_reply_p50_ms": mod.get("reply_p50_ms"),
           "module_reply_p99_ms": mod.get("reply_p99_ms"),
           "module_accept_p99_ms": mod.get("accept_p99_ms"),
           "module_cpu_us_per_message": mod.get("cpu_us_per_message"),
           "module_reply_p99_ms_at_first_rate": mod.get("first_reply_p99_ms"),
           "kamailio_accept_p99_ms_at_module_rate": mod.get("kamailio_accept_p99_ms"),
           "instructions_rate": ins.get("best_rate"),
           "instructions_reply_p50_ms": ins.get("reply_p50_ms"),
           "instructions_reply_p99_ms": ins.get("reply_p99_ms"),
           "instructions_accept_p99_ms": ins.get("accept_p99_ms"),
           "instructions_cpu_us_per_message": ins.get("cpu_us_per_message"),
           "instructions_reply_p99_ms_at_first_rate": ins.get("first_reply_p99_ms"),
           "kamailio_accept_p99_ms_at_instructions_rate": ins.get("kamailio_accept_p99_ms"),
           "kamailio_rate": kam.get("best_rate"),
           "kamailio_accept_p99_ms": kam.get("accept_p99_ms"),
           "kamailio_accept_p99_ms_at_first_rate": kam.get("first_accept_p99_ms"),
           "kamailio_cpu_us_per_message": kam.get("cpu_us_per_message"),
           "kamailio_sipp_rate": ksipp.get("best_rate"),
           "rates": a.rate_list, "seconds": a.seconds, "senders": a.senders,
           "steps": result.get("steps"), "errors": errors,
           "machine": common.machine_info(), "quick": a.quick}
    common.report_line("messages", out, a)
    return 1 if errors else 0


def _wait_http(url: str, proc) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError("the instruction app exited")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{url} did not answer")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
