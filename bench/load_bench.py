#!/usr/bin/env python3
"""Baton's load generator (`baton load`) against SIPp, in the same run, on the same targets.

1. Signalling: Kamailio as a stateless responder (bench/baseline/kamailio-responder.cfg)
   answers every INVITE with a 200 and no SDP. SIPp's built-in `uac` and `baton load`
   (answer-hold, --hold 0) each offer a ladder of call rates for a few seconds a step;
   a step passes when every call was answered and the generator kept up (at least 97 %
   of the offered rate). Figures: the highest passing rate of each, and each generator's
   CPU per call at the highest rate both passed.
2. Media: Baton's own echo (`baton serve`, number 1000 = baton.echo, a fresh engine per
   level). At each level of concurrent calls, SIPp's uac with media (the G.711 pcap that
   sip-tester ships, as bench/sip_cps.py cuts it) and `baton load` echo-check hold that
   many calls with RTP both ways at once. A level passes when every call was up at once
   with none failed and the RTP the engine received lost under 0.1 % (for `baton load` the
   echo it got back too: SIPp cannot tell). Figures: the most concurrent calls with media
   of each, and each generator's CPU per call at the largest level both passed.
3. Media against baresip: its `echo` module (it answers every call and sends back what it
   hears, through an `aubridge` device per call; a fresh baresip per level) and `baton
   load` echo-check alone, since SIPp cannot tell what came back and baresip keeps no
   counters to read: the most concurrent calls with every call answered and up at once
   and the echo `baton load` got back under 0.1 % loss, with its echo checks passed, MOS,
   jitter, round trip and CPU per call at each level.

A generator's CPU is that of its process while it places calls: SIPp's from the kernel's
accounting of the reaped child (start-up included, a few ms), `baton load`'s from its own
Prometheus /metrics (`process_cpu_seconds_total`, read from the first call placed to the
last one ended: the Python start-up and the plots after the run are not calls' work).

Prints one JSON line; writes bench/results/load-TIMESTAMP.json and .png unless --no-files.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import common
from capacity import Engine
from common import BenchError
from sip_cps import BEST_MIN_ACHIEVED, write_rtp_scenario

LOSS_LIMIT_PCT = 0.1


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _ended(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("baton_load_calls_ended_total"))


def run_baton_load(baton: Path, target: str, args: list[str], workdir: Path,
                   timeout: float) -> dict[str, Any]:
    """`baton load TARGET ARGS --json`; its summary plus the CPU it spent on its calls."""
    workdir.mkdir(parents=True, exist_ok=True)
    lo = common.free_port(tcp_too=False)
    lo -= lo % 2
    argv = [str(baton), "load", target, *args, "--json", "--quiet", "--metrics-addr",
            f"{common.LOOPBACK}:0", "--report", str(workdir / "report"),
            "--rtp-ports", f"{lo}-{min(lo + 8000, 65534)}"]
    out_file = open(workdir / "stdout.json", "w+")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_file,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    samples: list[dict[str, float]] = []
    errors: list[str] = []

    def watch() -> None:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            if "metrics at " in line:
                url = line.split()[-1]
                break
            errors.append(line.rstrip())
        if url is None:
            return
        # The metrics server stays up until the report is written: the last sample has
        # every call ended.
        while proc.poll() is None:
            try:
                samples.append(common.scrape_metrics(url, 5))
            except OSError:
                break
            time.sleep(0.25)
        errors.extend(x.rstrip() for x in proc.stderr.readlines())

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise BenchError(f"baton load did not finish within {timeout:.0f} s")
    finally:
        reader.join(5)
        out_file.seek(0)
        out = out_file.read()
        out_file.close()
    try:
        summary = json.loads(out[out.index("{"):])
    except ValueError:
        raise BenchError(f"baton load exited with {proc.returncode}: "
                         f"{' | '.join(errors[-5:])}") from None
    cpu = calls = None
    busy = [m for m in samples if m.get("baton_load_calls_started_total", 0) >= 1]
    if len(busy) >= 2:
        first, last = busy[0], busy[-1]
        calls = _ended(last) - _ended(first)
        cpu = last["process_cpu_seconds_total"] - first["process_cpu_seconds_total"]
    return {"summary": summary, "cpu_s": cpu, "cpu_calls": calls,
            "cpu_us_per_call": round(cpu / calls * 1e6, 1) if cpu is not None and calls else None,
            "returncode": proc.returncode}


# --------------------------------------------------------------------------- signalling


def sipp_signalling(kam, rate: float, seconds: float, work: Path) -> dict[str, Any]:
    cpu0 = children_cpu()
    r = common.run_sipp(kam.address, rate, seconds, work / f"sipp-{rate:g}", service="1000")
    cpu = children_cpu() - cpu0
    # SIPp's own count of calls placed per second of its run (its start-up aside).
    stat = common._parse_sipp_stat(work / f"sipp-{rate:g}" / "stat.csv")
    try:
        achieved = float(stat["CallRate(C)"])
    except (KeyError, ValueError):
        achieved = r.cps
    ok = (not r.error and r.failed == 0 and r.successful == r.calls
          and achieved >= BEST_MIN_ACHIEVED * rate)
    return {"generator": "sipp", "offered_rate": rate, "calls": r.calls,
            "answered": r.successful, "failed": r.failed, "achieved_rate": round(achieved, 1),
            "cpu_s": round(cpu, 3),
            "cpu_us_per_call": round(cpu / r.successful * 1e6, 1) if r.successful else None,
            "ok": ok, "error": r.error}


def baton_signalling(baton: Path, kam, rate: float, seconds: float,
                     work: Path) -> dict[str, Any]:
    calls = max(1, round(rate * seconds))
    r = run_baton_load(baton, f"{kam.host}:{kam.port}",
                       ["--number", "1000", "--rate", f"{rate:g}", "--calls", str(calls),
                        "--hold", "0", "--scenario", "answer-hold"],
                       work / f"baton-{rate:g}", timeout=seconds * 4 + 60)
    s = r["summary"]
    answered = s["calls"]["codes"].get("200", 0)
    achieved = s["rate"]["achieved_steady"]
    ok = answered == calls and achieved >= BEST_MIN_ACHIEVED * rate
    return {"generator": "baton", "offered_rate": rate, "calls": calls, "answered": answered,
            "failed": calls - answered, "codes": s["calls"]["codes"],
            "achieved_rate": achieved, "cpu_s": r["cpu_s"],
            "cpu_us_per_call": r["cpu_us_per_call"],
            "pdd_p50_ms": s["pdd_ms"]["t200"]["p50"], "pdd_p99_ms": s["pdd_ms"]["t200"]["p99"],
            "audio": s["audio"], "ok": ok, "error": ""}


def signalling(args: argparse.Namespace, work: Path, progress) -> dict[str, Any]:
    kam = common.KamailioResponder()
    kam.start()
    steps: list[dict[str, Any]] = []
    try:
        for name, step in (("sipp", lambda r: sipp_signalling(kam, r, args.seconds, work)),
                           ("baton", lambda r: baton_signalling(args.baton, kam, r,
                                                                args.seconds, work))):
            for rate in args.rate_list:
                progress(f"signalling {name} {rate:g} calls/s")
                row = step(rate)
                steps.append(row)
                sys.stderr.write(f"load bench: signalling {json.dumps(row)}\n")
                if not row["ok"]:
                    break           # past this generator's knee
    finally:
        kam.stop()
    best = {g: max((s["offered_rate"] for s in steps if s["generator"] == g and s["ok"]),
                   default=None) for g in ("baton", "sipp")}
    both = [s["offered_rate"] for s in steps if s["generator"] == "baton" and s["ok"]
            and any(t["generator"] == "sipp" and t["ok"] and t["offered_rate"] == s["offered_rate"]
                    for t in steps)]
    at = max(both, default=None)

    def cpu_at(gen: str) -> float | None:
        return next((s["cpu_us_per_call"] for s in steps
                     if s["generator"] == gen and s["offered_rate"] == at), None)

    return {"target": "kamailio stateless responder", "seconds_per_step": args.seconds,
            "steps": steps, "baton_best_cps": best["baton"], "sipp_best_cps": best["sipp"],
            "cpu_compared_at_cps": at, "baton_cpu_us_per_call": cpu_at("baton"),
            "sipp_cpu_us_per_call": cpu_at("sipp")}


# --------------------------------------------------------------------------- media


def _engine_rtp(m0: dict[str, float], m1: dict[str, float]) -> tuple[int, int, int]:
    def d(key: str) -> int:
        return int(m1.get(key, 0) - m0.get(key, 0))

    return (d("baton_rtp_expected_packets_total"), d("baton_rtp_lost_packets_total"),
            d("baton_media_late_ticks_total"))


def _pct(lost: int, expected: int) -> float | None:
    return round(100.0 * lost / expected, 4) if expected else None


def sipp_media(eng: Engine, calls: int, args: argparse.Namespace, scenario: Path,
               work: Path) -> dict[str, Any]:
    from capacity import hold_calls

    rate = max(float(calls) / 2.0, 1.0)
    cpu0 = children_cpu()
    m0 = eng.metrics()
    proc, up = hold_calls(eng, calls, rate, 0, work / f"sipp-media-{calls}", scenario,
                          calls / rate + 10)
    common.wait_for(proc, args.media_seconds + calls / rate + 30)
    cpu = children_cpu() - cpu0
    m1 = eng.metrics()
    stat = common._parse_sipp_stat(work / f"sipp-media-{calls}" / "stat.csv")
    failed = int(stat.get("FailedCall(C)", "0") or 0)
    expected, lost, late = _engine_rtp(m0, m1)
    loss = _pct(lost, expected)
    ok = up and failed == 0 and loss is not None and loss < LOSS_LIMIT_PCT
    return {"generator": "sipp", "calls": calls, "all_up": up, "failed": failed,
            "engine_rx_expected": expected, "engine_rx_loss_pct": loss,
            "return_loss_pct": None,      # SIPp plays a pcap: it cannot tell what came back
            "engine_late_ticks": late, "cpu_s": round(cpu, 3),
            "cpu_us_per_call": round(cpu / calls * 1e6, 1), "ok": ok}


def baton_media(args: argparse.Namespace, eng: Engine, calls: int,
                work: Path) -> dict[str, Any]:
    rate = max(float(calls) / 2.0, 1.0)
    m0 = eng.metrics()
    r = run_baton_load(args.baton, f"{eng.address[0]}:{eng.address[1]}",
                       ["--number", "1000", "--rate", f"{rate:g}", "--calls", str(calls),
                        "--concurrent", str(calls), "--hold", f"{args.media_seconds:g}",
                        "--scenario", "echo-check"],
                       work / f"baton-media-{calls}", timeout=args.media_seconds + calls / rate + 90)
    m1 = eng.metrics()
    s = r["summary"]
    expected, lost, late = _engine_rtp(m0, m1)
    loss = _pct(lost, expected)
    answered = s["calls"]["codes"].get("200", 0)
    back = s["rtp"]["loss_pct"]
    up = s["calls"]["max_concurrent"] >= calls
    ok = (answered == calls and up and loss is not None and loss < LOSS_LIMIT_PCT
          and back is not None and back < LOSS_LIMIT_PCT)
    return {"generator": "baton", "calls": calls, "all_up": up, "failed": calls - answered,
            "codes": s["calls"]["codes"], "engine_rx_expected": expected, "engine_rx_loss_pct": loss,
            "return_loss_pct": back, "engine_late_ticks": late,
            "generator_late_ticks": s["generator_late_ticks"],
            "echo_passed": s["echo"]["passed"], "mos_mean": s["quality"]["mos"]["mean"],
            "jitter_p50_ms": s["rtp"]["jitter_ms"]["p50"],
            "cpu_s": r["cpu_s"], "cpu_us_per_call": r["cpu_us_per_call"], "ok": ok}


def media(args: argparse.Namespace, work: Path, progress) -> dict[str, Any]:
    scenario = write_rtp_scenario(work, args.media_seconds)
    levels: list[dict[str, Any]] = []
    alive = {"sipp": True, "baton": True}
    for calls in args.media_list:
        if not any(alive.values()):
            break
        # A fresh engine per level: both generators meet the same one, one after the other.
        eng = Engine(args.baton, 4 * calls + 64, args.ready_timeout)
        try:
            time.sleep(0.5)
            for name in ("sipp", "baton"):
                if not alive[name]:
                    continue
                progress(f"media {name} {calls} calls")
                row = (sipp_media(eng, calls, args, scenario, work) if name == "sipp"
                       else baton_media(args, eng, calls, work))
                levels.append(row)
                sys.stderr.write(f"load bench: media {json.dumps(row)}\n")
                alive[name] = row["ok"]
                time.sleep(0.5)
        finally:
            eng.stop()
    best = {g: max((x["calls"] for x in levels if x["generator"] == g and x["ok"]),
                   default=None) for g in ("baton", "sipp")}
    both = [x["calls"] for x in levels if x["generator"] == "baton" and x["ok"]
            and any(y["generator"] == "sipp" and y["ok"] and y["calls"] == x["calls"]
                    for y in levels)]
    at = max(both, default=None)

    def cpu_at(gen: str) -> float | None:
        return next((x["cpu_us_per_call"] for x in levels
                     if x["generator"] == gen and x["calls"] == at), None)

    return {"target": "baton serve, number 1000 (baton.echo)",
            "media_seconds": args.media_seconds, "levels": levels,
            "baton_max_calls": best["baton"], "sipp_max_calls": best["sipp"],
            "cpu_compared_at_calls": at, "baton_cpu_us_per_call": cpu_at("baton"),
            "sipp_cpu_us_per_call": cpu_at("sipp")}


# --------------------------------------------------------------------------- baresip

BARESIP_MODULES = Path("/usr/lib/baresip/modules")
# baresip 1.0 numbers a user agent's calls 1 to 255 and answers the 256th with a 500
# ("could not assign linenumber"): above that a level would measure baresip.
BARESIP_MAX_CALLS = 255


class BaresipEcho:
    """A headless baresip on loopback whose `echo` module answers every call to
    sip:echo@127.0.0.1:PORT and sends back what it hears."""

    def __init__(self, work: Path, calls: int, timeout: float = 15.0):
        binary = common.find_binary("baresip")
        self.dir = work / f"baresip-{calls}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = common.free_port()
        rtp = common.free_port(tcp_too=False)
        rtp -= rtp % 2
        (self.dir / "config").write_text("\n".join([
            "poll_method epoll",
            f"sip_listen {common.LOOPBACK}:{self.port}",
            f"net_interface {common.LOOPBACK}",
            f"dns_server {common.LOOPBACK}:53",
            # baresip answers 486 beyond call_max_calls (default 4) calls at once.
            f"call_max_calls {calls + 16}",
            "audio_source aubridge,echo",
            "audio_player aubridge,echo",
            f"rtp_ports {rtp}-{min(rtp + 4 * calls + 64, 65534)}",
            f"module_path {BARESIP_MODULES}",
            "module g711.so",
            "module aubridge.so",
            "module_app account.so",
            "module_app echo.so",
            "",
        ]))
        (self.dir / "accounts").write_text(f"<sip:echo@{common.LOOPBACK}>;regint=0\n")
        (self.dir / "contacts").write_text("")
        self.proc = common.spawn([binary, "-f", self.dir], log=self.dir / "baresip.log",
                                 cwd=self.dir)
        try:
            common.wait_sip_ready(common.LOOPBACK, self.port, timeout, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        common.stop_process(self.proc)


def baresip_level(args: argparse.Namespace, calls: int, work: Path) -> dict[str, Any]:
    peer = BaresipEcho(work, calls)
    try:
        rate = max(float(calls) / 2.0, 1.0)
        r = run_baton_load(args.baton, f"{common.LOOPBACK}:{peer.port}",
                           ["--number", "echo", "--rate", f"{rate:g}", "--calls", str(calls),
                            "--concurrent", str(calls), "--hold", f"{args.media_seconds:g}",
                            "--scenario", "echo-check"],
                           work / f"baton-baresip-{calls}",
                           timeout=args.media_seconds + calls / rate + 90)
    finally:
        peer.stop()
    s = r["summary"]
    answered = s["calls"]["codes"].get("200", 0)
    back = s["rtp"]["loss_pct"]
    up = s["calls"]["max_concurrent"] >= calls
    ok = answered == calls and up and back is not None and back < LOSS_LIMIT_PCT
    return {"generator": "baton", "calls": calls, "all_up": up, "failed": calls - answered,
            "codes": s["calls"]["codes"], "return_loss_pct": back,
            "echo_checked": s["echo"]["checked"], "echo_passed": s["echo"]["passed"],
            "mos_mean": s["quality"]["mos"]["mean"],
            "jitter_p50_ms": s["rtp"]["jitter_ms"]["p50"],
            "delay_p50_ms": s["rtp"]["delay_ms"]["p50"],
            "generator_late_ticks": s["generator_late_ticks"],
            "cpu_s": r["cpu_s"], "cpu_us_per_call": r["cpu_us_per_call"], "ok": ok}


def baresip_media(args: argparse.Namespace, work: Path, progress) -> dict[str, Any]:
    if shutil.which("baresip") is None or not (BARESIP_MODULES / "echo.so").exists():
        sys.stderr.write("load bench: baresip (and its echo module) is not installed: "
                         "its part is skipped\n")
        return {"skipped": "baresip is not installed", "baton_max_calls": None}
    levels: list[dict[str, Any]] = []
    for calls in args.baresip_list:
        progress(f"baresip {calls} calls")
        row = baresip_level(args, calls, work)
        levels.append(row)
        sys.stderr.write(f"load bench: baresip {json.dumps(row)}\n")
        if not row["ok"]:
            break
    return {"target": "baresip, its echo module (aubridge)",
            "media_seconds": args.media_seconds, "levels": levels,
            "baton_max_calls": max((x["calls"] for x in levels if x["ok"]), default=None)}


# --------------------------------------------------------------------------- report


def plot(result: dict[str, Any], path: Path) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for gen, color in (("baton", "tab:blue"), ("sipp", "tab:orange")):
        rows = [s for s in (result.get("signalling") or {}).get("steps", [])
                if s["generator"] == gen and s["cpu_us_per_call"] is not None]
        if rows:
            a.plot([s["offered_rate"] for s in rows], [s["cpu_us_per_call"] for s in rows],
                   marker="o", color=color, label=gen)
            bad = [s for s in rows if not s["ok"]]
            a.scatter([s["offered_rate"] for s in bad], [s["cpu_us_per_call"] for s in bad],
                      marker="x", s=80, color="red")
        rows = [x for x in (result.get("media") or {}).get("levels", [])
                if x["generator"] == gen and x["cpu_us_per_call"] is not None]
        if rows:
            b.plot([x["calls"] for x in rows], [x["cpu_us_per_call"] for x in rows],
                   marker="o", color=color, label=gen)
            bad = [x for x in rows if not x["ok"]]
            b.scatter([x["calls"] for x in bad], [x["cpu_us_per_call"] for x in bad],
                      marker="x", s=80, color="red")
    a.set_title("signalling (Kamailio responder): generator CPU per call")
    a.set_xlabel("offered calls/s (x: failed step)")
    a.set_ylabel("µs per call")
    a.legend()
    b.set_title("media (Baton echo): generator CPU per call")
    b.set_xlabel("concurrent calls with RTP (x: failed level)")
    b.set_ylabel("µs per call")
    b.legend()
    fig.tight_layout()
    return common.save_figure(plt, fig, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="baton load against SIPp, same targets, same run.")
    p.add_argument("--rates", default="200,400,800,1200,1600,2400,3200",
                   help="signalling: call rates offered, each for --seconds, stopping a "
                        "generator at its first failed step (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=4.0,
                   help="signalling: seconds per rate step (default: %(default)s)")
    p.add_argument("--media", default="50,100,200,400,600,800,1000",
                   help="media: concurrent calls with RTP per level (default: %(default)s)")
    p.add_argument("--media-seconds", type=float, default=6.0,
                   help="media: seconds each call holds RTP, at most 7 (the pcap's length) "
                        "(default: %(default)s)")
    p.add_argument("--baresip", default="50,100,200",
                   help="media against baresip's echo: concurrent calls per level "
                        "(default: %(default)s)")
    p.add_argument("--skip", choices=("signalling", "media", "baresip"),
                   help="leave one part out")
    common.add_baton_args(p)
    common.add_result_file_args(p)
    args = p.parse_args(argv)
    try:
        args.rate_list = sorted({float(x) for x in args.rates.split(",") if x.strip()})
        args.media_list = sorted({int(x) for x in args.media.split(",") if x.strip()})
        args.baresip_list = sorted({int(x) for x in args.baresip.split(",") if x.strip()})
    except ValueError:
        p.error("--rates, --media and --baresip take numbers separated by commas")
    if not args.rate_list or min(args.rate_list) <= 0 or not args.media_list \
            or min(args.media_list) <= 0 or not args.baresip_list \
            or min(args.baresip_list) <= 0:
        p.error("--rates, --media and --baresip need positive numbers")
    if max(args.baresip_list) > BARESIP_MAX_CALLS:
        p.error(f"--baresip levels are at most {BARESIP_MAX_CALLS}: baresip numbers a user "
                f"agent's calls 1 to {BARESIP_MAX_CALLS} and refuses more")
    if not 0 < args.media_seconds <= 7:
        p.error("--media-seconds must be in (0, 7]")
    if args.seconds <= 0:
        p.error("--seconds must be above 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_cleanup()
    work = Path(tempfile.mkdtemp(prefix="baton-load-bench-"))
    started = time.time()
    errors: list[str] = []
    result: dict[str, Any] = {"bench": "load", "signalling": None, "media": None,
                              "baresip": None}
    total = (0 if args.skip == "signalling" else 2 * len(args.rate_list)) + \
        (0 if args.skip == "media" else 2 * len(args.media_list)) + \
        (0 if args.skip == "baresip" else len(args.baresip_list))
    bar = common.Progress(max(total, 1))
    done = [0]

    def progress(note: str) -> None:
        bar.show(done[0], note)
        done[0] += 1

    try:
        common.find_binary("sipp")
        if args.skip != "signalling":
            result["signalling"] = signalling(args, work, progress)
        if args.skip != "media":
            result["media"] = media(args, work, progress)
        if args.skip != "baresip":
            result["baresip"] = baresip_media(args, work, progress)
    except BenchError as exc:
        errors.append(str(exc))
        sys.stderr.write(f"load bench: {exc}\n")
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    sig, med = result["signalling"] or {}, result["media"] or {}
    result.update({
        "baton_best_cps": sig.get("baton_best_cps"), "sipp_best_cps": sig.get("sipp_best_cps"),
        "baton_signalling_cpu_us_per_call": sig.get("baton_cpu_us_per_call"),
        "sipp_signalling_cpu_us_per_call": sig.get("sipp_cpu_us_per_call"),
        "baton_media_calls": med.get("baton_max_calls"),
        "sipp_media_calls": med.get("sipp_max_calls"),
        "baton_media_cpu_us_per_call": med.get("baton_cpu_us_per_call"),
        "sipp_media_cpu_us_per_call": med.get("sipp_cpu_us_per_call"),
        "baton_baresip_calls": (result["baresip"] or {}).get("baton_max_calls"),
        "errors": errors,
    })
    common.report("load", result, args, started, argv, lambda png: plot(result, png))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
