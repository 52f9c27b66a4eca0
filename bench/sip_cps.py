#!/usr/bin/env python3
"""SIP calls-per-second benchmark: Baton against the Kamailio stateless responder.

For each offered rate SIPp runs its built-in uac scenario (INVITE, 200, ACK, BYE, 200, no
pause) first against Baton and then against Kamailio answering statelessly from
bench/baseline/kamailio-responder.cfg, the machine's ceiling for the same SIP work.  Both
servers are measured the same way: achieved calls per second, failed calls, and the CPU
time all of the server's processes spent per completed call.

By default Baton is started here (`baton serve --config examples/demo.toml`, which answers
number 1000); --target points at an engine that is already running instead, with
--target-pids naming its processes for the CPU figures.

Prints one JSON line on stdout and writes it, with a plot, to bench/results/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BenchError, KamailioResponder, Progress  # noqa: E402

BEST_MIN_ACHIEVED = 0.97  # a step counts only if it delivered this share of the offered rate
PCAP_AUDIO = Path("/usr/share/sip-tester/g711a.pcap")  # shipped with Debian's sip-tester


class Server(Protocol):
    name: str
    address: tuple[str, int]

    def pids(self) -> list[int]: ...

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


@dataclass
class ExternalServer:
    """An engine that was already running: only measured, never started or stopped."""

    name: str
    address: tuple[str, int]
    root_pids: list[int]

    def pids(self) -> list[int]:
        return common.process_tree(self.root_pids)

    def alive(self) -> bool:
        # Without pids there is nothing to check; a dead server shows up as failed calls.
        return not self.root_pids or bool(self.pids())

    def stop(self) -> None:
        pass


class BatonServer:
    """`baton serve` started by the benchmark on a free loopback port."""

    name = "baton"

    def __init__(self, baton: Path, config: Path, ready_timeout: float) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="baton-cps-"))
        self.address = (common.LOOPBACK, common.free_port())
        self.log = self.workdir / "baton.log"
        # A gRPC port of its own too: the config's fixed one may be taken by another engine.
        self.metrics_port = common.free_port()
        config = self._one_source(config)
        argv = [baton, "serve", "--config", config,
                "--metrics-addr", f"{common.LOOPBACK}:{self.metrics_port}",
                "--sip-addr", f"{self.address[0]}:{self.address[1]}",
                "--grpc-addr", f"{common.LOOPBACK}:{common.free_port()}",
                "--data-dir", self.workdir / "data"]
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.proc = common.start_ready(argv, self.log, self.address, ready_timeout)
        except BenchError:
            self.stop()
            raise

    def _one_source(self, config: Path) -> Path:
        """The config, with the per-source limit on INVITEs in setup lifted: every SIPp
        call comes from one address, which a careful operator's config (the demo's
        `[security] max_setup_per_source`) would rightly throttle as one caller."""
        text = Path(config).read_text()
        lifted, n = re.subn(r"(?m)^max_setup_per_source\s*=.*$", "max_setup_per_source = 0", text)
        if not n:
            return config
        copy = self.workdir / Path(config).name
        copy.write_text(lifted)
        return copy

    def pids(self) -> list[int]:
        return common.process_tree([self.proc.pid]) if self.proc else []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            rc = common.stop_process(self.proc, timeout=15.0)
            if rc not in (0, -15, 143):
                sys.stderr.write(f"baton exited with {rc}; log: {common.log_tail(self.log, 5)}\n")
            self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


class KamailioServer(KamailioResponder):
    name = "kamailio"


# --------------------------------------------------------------------------- RTP scenario


def write_rtp_scenario(workdir: Path, rtp_seconds: float) -> Path:
    """A uac scenario that offers G.711 A-law and plays RTP_SECONDS of it after the ACK.

    The audio is the start of the g711a.pcap that sip-tester ships, cut to length, so the
    call lasts about as long as its media.
    """
    if not PCAP_AUDIO.is_file():
        raise BenchError(f"{PCAP_AUDIO} not found (Debian package sip-tester)")
    data = PCAP_AUDIO.read_bytes()
    endian = "<" if data[:4] == b"\xd4\xc3\xb2\xa1" else ">"
    out, offset, first = bytearray(data[:24]), 24, None
    while offset + 16 <= len(data):
        sec, usec, incl, _orig = struct.unpack(endian + "IIII", data[offset:offset + 16])
        stamp = sec + usec / 1e6
        first = stamp if first is None else first
        if stamp - first > rtp_seconds:
            break
        out += data[offset:offset + 16 + incl]
        offset += 16 + incl
    pcap = workdir / "audio.pcap"
    pcap.write_bytes(bytes(out))
    pause_ms = int(rtp_seconds * 1000)
    scenario = workdir / "uac_rtp.xml"
    scenario.write_text(f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="uac with G.711 media">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=sipp 1 1 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 8
      a=rtpmap:8 PCMA/8000
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true"/>
  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <nop><action><exec play_pcap_audio="{pcap}"/></action></nop>
  <pause milliseconds="{pause_ms}"/>
  <send retrans="500">
    <![CDATA[
      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
""")
    return scenario


# --------------------------------------------------------------------------- measuring


def run_step(server: Server, rate: float, args: argparse.Namespace, rep: int,
             workdir: Path, scenario: Path | None,
             tick: Callable[[float], None]) -> dict[str, Any]:
    """One SIPp run at RATE against SERVER, with the server's CPU time around it."""
    step: dict[str, Any] = {"server": server.name, "offered_rate": rate, "rep": rep}
    if not server.alive():
        step.update(ok=False, error=f"{server.name} is not running")
        return step
    # An external engine given without --target-pids has no CPU figure at all.
    meter = common.CpuMeter(server.pids).start() if server.pids() else None
    before = overload_counters(server)
    limit = args.call_limit
    if limit is None and scenario is not None:
        # Calls with media stay up for their audio: allow for that many more in flight.
        limit = int(max(1000, rate * (3 + args.rtp_seconds)))
    result = run_sipps(server.address, rate, args, workdir / f"{server.name}-{rate:g}-{rep}",
                       limit, scenario, tick)
    cpu = meter.stop() if meter is not None else None
    after = overload_counters(server)
    if before is not None and after is not None:
        # What the engine's overload control did during the step (docs/operators-guide.md).
        step["overload"] = {k: after[k] - before.get(k, 0) for k in after}
    ok = (not result.error and result.failed == 0 and result.successful > 0
          and result.cps >= BEST_MIN_ACHIEVED * rate)
    step.update(
        calls=result.calls, successful=result.successful, failed=result.failed,
        retransmissions=result.retransmissions, wall_s=round(result.wall_s, 3),
        cps=round(result.cps, 1), achieved_pct=round(100 * result.cps / rate, 1),
        cpu_s=round(cpu, 3) if cpu is not None else None,
        cpu_us_per_call=(round(cpu * 1e6 / result.successful, 1)
                         if cpu is not None and result.successful else None),
        ok=ok)
    if result.error:
        step["error"] = result.error
    return step


def overload_counters(server: Server) -> dict[str, int] | None:
    """The engine's overload counters from its /metrics (a self-started Baton only)."""
    port = getattr(server, "metrics_port", None)
    if port is None or not server.alive():
        return None
    try:
        with urllib.request.urlopen(f"http://{common.LOOPBACK}:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r'^baton_sip_overload_(refused|absorbed|entered)_total(?:\{cause="(\w+)"\})? '
                     r'([0-9.e+]+)$', line)
        if m:
            key = m.group(1) if m.group(2) is None else f"entered_{m.group(2)}"
            out[key] = int(float(m.group(3)))
    return out


def run_sipps(address: tuple[str, int], rate: float, args: argparse.Namespace, workdir: Path,
              limit: int | None, scenario: Path | None,
              tick: Callable[[float], None]) -> common.SippResult:
    """Offer RATE with as many SIPp processes as --sipp-max asks (one SIPp process tops out
    near 6,000 calls/s on 2 cores), all at once, and add up what they saw."""
    n = max(1, math.ceil(rate / args.sipp_max))
    share = rate / n

    def one(i: int) -> common.SippResult:
        return common.run_sipp(address, share, args.seconds, workdir / f"sipp{i}",
                               service=args.service,
                               call_limit=None if limit is None else max(1, limit // n),
                               recv_timeout_ms=args.call_timeout_ms, scenario=scenario,
                               hold_s=args.rtp_seconds if scenario is not None else 0.0,
                               tick=tick if i == 0 else None)

    if n == 1:
        return one(0)
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        parts = list(pool.map(one, range(n)))
    total = common.SippResult(
        offered_rate=rate, calls=sum(r.calls for r in parts),
        successful=sum(r.successful for r in parts), failed=sum(r.failed for r in parts),
        wall_s=max(r.wall_s for r in parts),
        returncode=None if any(r.returncode is None for r in parts)
        else max(r.returncode for r in parts),
        retransmissions=sum(r.retransmissions for r in parts),
        timed_out=any(r.timed_out for r in parts),
        error="; ".join(r.error for r in parts if r.error), hold_s=parts[0].hold_s)
    return total


def ramp_summary(steps: Sequence[dict[str, Any]], knee: float | None,
                 over: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """The knee (best offered rate Baton carried with no failed call) and, for each server,
    its goodput and CPU per call at the knee and at the rates past it."""
    out: dict[str, Any] = {"knee_offered": knee}
    for server in dict.fromkeys(s["server"] for s in steps):
        rows = {s["offered_rate"]: s for s in steps if s["server"] == server}
        at_knee = rows.get(knee) if knee is not None else None
        base = at_knee.get("cps") if at_knee else None
        entry: dict[str, Any] = {"knee_cps": base,
                                 "knee_cpu_us_per_call": at_knee.get("cpu_us_per_call")
                                 if at_knee else None}
        for name, rate in over:
            st = rows.get(rate)
            if st is None:
                continue
            entry[name] = {"offered": rate, "cps": st.get("cps"), "failed": st.get("failed"),
                           "cpu_us_per_call": st.get("cpu_us_per_call"),
                           "goodput_pct_of_knee": round(100 * st["cps"] / base, 1)
                           if base and st.get("cps") is not None else None}
        out[server] = entry
    return out


def best_of(steps: Sequence[dict[str, Any]], server: str) -> dict[str, Any] | None:
    """The highest offered rate at which every repetition had zero failures and >= 97 %."""
    by_rate: dict[float, list[dict[str, Any]]] = {}
    for s in steps:
        if s["server"] == server:
            by_rate.setdefault(s["offered_rate"], []).append(s)
    good = [r for r, runs in by_rate.items() if runs and all(s.get("ok") for s in runs)]
    if not good:
        return None
    rate = max(good)
    runs = by_rate[rate]
    cpu = [s["cpu_us_per_call"] for s in runs if s.get("cpu_us_per_call") is not None]
    return {"offered_rate": rate,
            "cps": common.summarize([s["cps"] for s in runs]),
            "cpu_us_per_call": common.summarize(cpu) if cpu else None}


def median_of(best: dict[str, Any] | None, key: str) -> float | None:
    if best is None or best.get(key) is None:
        return None
    return best[key]["median"]


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def plot(steps: Sequence[dict[str, Any]], path: Path, title: str,
         labels: dict[str, str] | None = None) -> bool:
    """Achieved CPS against offered, and CPU per call, for each server (medians of reps)."""
    plt = common.pyplot()
    if plt is None:
        return False
    fig, (ax_cps, ax_cpu) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"baton": "tab:blue", "kamailio": "tab:orange"}
    offered_all = sorted({s["offered_rate"] for s in steps})
    for server in dict.fromkeys(s["server"] for s in steps):
        rows = [s for s in steps if s["server"] == server and s.get("cps") is not None]
        rates = sorted({s["offered_rate"] for s in rows})
        cps, cpu, bad = [], [], []
        for r in rates:
            runs = [s for s in rows if s["offered_rate"] == r]
            cps.append(common.summarize([s["cps"] for s in runs])["median"])  # type: ignore[index]
            us = [s["cpu_us_per_call"] for s in runs if s.get("cpu_us_per_call") is not None]
            cpu.append(common.summarize(us)["median"] if us else float("nan"))  # type: ignore[index]
            bad.append(not all(s.get("ok") for s in runs))
        color = colors.get(server, None)
        name = (labels or {}).get(server, server)
        ax_cps.plot(rates, cps, "o-", color=color, label=name)
        ax_cpu.plot(rates, cpu, "o-", color=color, label=name)
        # Steps with failed calls or a shortfall are crossed out.
        for r, c, u, b in zip(rates, cps, cpu, bad):
            if b:
                ax_cps.plot([r], [c], "x", color="red", markersize=10)
                ax_cpu.plot([r], [u], "x", color="red", markersize=10)
    if offered_all:
        ax_cps.plot(offered_all, offered_all, "--", color="grey", linewidth=1, label="offered")
    ax_cps.set_xlabel("offered calls/s")
    ax_cps.set_ylabel("achieved calls/s")
    ax_cps.set_title("Achieved CPS (x = failed calls or < 97 %)")
    ax_cpu.set_xlabel("offered calls/s")
    ax_cpu.set_ylabel("server CPU µs per completed call")
    ax_cpu.set_title("Server CPU per call (all processes)")
    ax_cpu.set_ylim(bottom=0)
    for ax in (ax_cps, ax_cpu):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return common.save_figure(plt, fig, path)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="SIP calls-per-second: Baton against a Kamailio stateless responder, "
                    "driven by SIPp's uac scenario at rising rates.")
    p.add_argument("--rates", default="500,1000,1500,2000,3000",
                   help="offered calls/s, comma-separated, run in rising order "
                        "(default: %(default)s)")
    p.add_argument("--ramp", action="store_true",
                   help="ignore --rates: from --start, add --step calls/s until Baton fails "
                        "a call or falls short (the knee is the last rate before), then offer "
                        "1.5x, 2x and 3x the knee; Kamailio gets the same rates")
    p.add_argument("--start", type=float, default=1000.0,
                   help="--ramp: first offered rate (default: %(default)s)")
    p.add_argument("--step", type=float, default=500.0,
                   help="--ramp: added to the offered rate per step (default: %(default)s)")
    p.add_argument("--max-rate", type=float, default=15000.0,
                   help="--ramp: the ramp stops here even without a failure; that rate "
                        "counts as the knee (default: %(default)s)")
    p.add_argument("--sipp-max", type=float, default=2500.0,
                   help="calls/s one SIPp process offers at most; higher rates run several "
                        "at once (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="length of each rate step (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each step per server; the best step is reported as "
                        "median/min/max over them (default: %(default)s)")
    p.add_argument("--target", metavar="HOST:PORT",
                   help="measure an engine that is already running there instead of "
                        "starting Baton")
    p.add_argument("--target-pids", metavar="PID,PID",
                   help="processes of the --target engine (their descendants are included) "
                        "for the CPU figures; without it CPU is not measured")
    p.add_argument("--service", default="1000",
                   help="number called, the SIPp -s value (default: %(default)s)")
    p.add_argument("--config", type=Path, default=common.REPO_DIR / "examples" / "demo.toml",
                   help="config for the self-started Baton (default: examples/demo.toml)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the Kamailio stateless responder (default: on)")
    p.add_argument("--rtp", action=argparse.BooleanOptionalAction, default=False,
                   help="calls carry G.711 media from SIPp for --rtp-seconds each; SIPp's "
                        "built-in uac has none (default: off)")
    p.add_argument("--rtp-seconds", type=float, default=1.0,
                   help="media per call with --rtp (default: %(default)s)")
    p.add_argument("--call-limit", type=int, default=None,
                   help="SIPp -l, calls in flight at most (default: 3 s worth, at least 1000)")
    p.add_argument("--call-timeout-ms", type=int, default=5000,
                   help="a call with no answer for this long fails (default: %(default)s)")
    common.add_baton_args(p)
    p.add_argument("--settle", type=float, default=1.0,
                   help="pause between runs, seconds (default: %(default)s)")
    common.add_result_file_args(p)
    args = p.parse_args(argv)
    try:
        rates = {float(r) for r in args.rates.split(",") if r.strip()}
        args.rate_list = sorted(int(r) if r.is_integer() else r for r in rates)
    except ValueError:
        p.error("--rates takes numbers separated by commas")
    if not args.rate_list or min(args.rate_list) <= 0:
        p.error("--rates needs at least one positive rate")
    if args.seconds <= 0 or args.repeat < 1:
        p.error("--seconds must be positive and --repeat at least 1")
    args.knee, args.over = None, []
    if args.ramp and (args.start <= 0 or args.step <= 0 or args.max_rate < args.start):
        p.error("--ramp needs a positive --start and --step, and --max-rate >= --start")
    if args.sipp_max <= 0:
        p.error("--sipp-max must be positive")
    if args.target_pids and not args.target:
        p.error("--target-pids goes with --target")
    try:
        args.pid_list = [int(x) for x in (args.target_pids or "").split(",") if x.strip()]
    except ValueError:
        p.error("--target-pids takes pids separated by commas")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_cleanup()
    result: dict[str, Any] = {"bench": "sip_cps"}
    errors: list[str] = []
    servers: list[Server] = []
    steps: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="baton-sip-cps-"))
    started = time.time()
    try:
        common.find_binary("sipp")
        scenario = write_rtp_scenario(work, args.rtp_seconds) if args.rtp else None

        if args.target:
            host, port = common.parse_hostport(args.target)
            servers.append(ExternalServer("baton", (host, port), args.pid_list))
        else:
            try:
                servers.append(BatonServer(args.baton, args.config, args.ready_timeout))
            except (BenchError, OSError) as exc:
                # The baseline is still worth measuring when the engine cannot start.
                errors.append(str(exc))
                sys.stderr.write(f"sip_cps: {exc}\n")
        if args.baseline:
            kam = KamailioServer()
            servers.append(kam)  # listed first, so that it is stopped whatever happens
            try:
                kam.start(args.ready_timeout)
            except (BenchError, OSError) as exc:
                servers.remove(kam)
                errors.append(str(exc))
                sys.stderr.write(f"sip_cps: {exc}\n")
        if not servers:
            raise BenchError("no server to measure")

        if args.ramp:
            n_ramp = int((args.max_rate - args.start) // args.step) + 3
            runs_total = n_ramp * args.repeat * len(servers)
        else:
            runs_total = len(args.rate_list) * args.repeat * len(servers)
        progress = Progress(total=runs_total * args.seconds)
        done = 0
        for rate in ramp_rates(args, steps) if args.ramp else args.rate_list:
            for rep in range(args.repeat):
                for server in servers:
                    label = f"{server.name} {rate:g} cps"
                    if args.repeat > 1:
                        label += f" #{rep + 1}"
                    base = done * args.seconds

                    def tick(elapsed: float, base: float = base, label: str = label) -> None:
                        progress.show(base + min(elapsed, args.seconds),
                                      f"{label} {elapsed:4.1f}s")

                    step = run_step(server, rate, args, rep, work, scenario, tick)
                    steps.append(step)
                    done += 1
                    progress.show(done * args.seconds, label)
                    progress.note(_describe(step))
                    time.sleep(args.settle)
        progress.close()
    except KeyboardInterrupt:
        errors.append("interrupted")
        sys.stderr.write("\nsip_cps: interrupted, stopping servers\n")
    except BenchError as exc:
        errors.append(str(exc))
        sys.stderr.write(f"sip_cps: {exc}\n")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    if args.ramp:
        result["ramp"] = ramp_summary(steps, args.knee, args.over)
    baton_best = best_of(steps, "baton")
    kam_best = best_of(steps, "kamailio")
    baton_cps, kam_cps = median_of(baton_best, "cps"), median_of(kam_best, "cps")
    baton_cpu = median_of(baton_best, "cpu_us_per_call")
    kam_cpu = median_of(kam_best, "cpu_us_per_call")
    result.update({
        "steps": steps,
        "best_zero_fail_cps": baton_cps,
        "kamailio_cps": kam_cps,
        "cps_ratio": ratio(baton_cps, kam_cps),
        "baton_cpu_us_per_call": baton_cpu,
        "kamailio_cpu_us_per_call": kam_cpu,
        "cpu_ratio": ratio(baton_cpu, kam_cpu),
        "best": {"baton": baton_best, "kamailio": kam_best},
        "target": args.target or "self-started baton",
        "rates": sorted({s["offered_rate"] for s in steps}) if args.ramp else args.rate_list,
        "seconds": args.seconds,
        "repeat": args.repeat,
        "rtp": args.rtp,
        "errors": errors,
    })
    labels = {"baton": f"target {args.target}"} if args.target else None
    title = f"SIP calls per second, SIPp uac, {args.seconds:g} s per step"
    common.report(
        "sip_cps", result, args, started, argv,
        lambda png: bool(steps) and plot(steps, png, title, labels),
        meta=lambda: {
            "sipp": common.tool_version([common.find_binary("sipp"), "-v"]),
            "kamailio": (common.tool_version([common.find_binary("kamailio"), "-v"])
                         if args.baseline else None)})
    return 0 if not errors else 1


def ramp_rates(args: argparse.Namespace, steps: list[dict[str, Any]]):
    """The offered rates of --ramp, decided as the steps come in (a generator reading STEPS):
    up by --step while Baton carries every call, then 1.5x and 2x the knee."""
    args.knee, args.over = None, []
    rate = args.start
    while rate <= args.max_rate:
        yield rate
        mine = [s for s in steps if s["server"] == "baton" and s["offered_rate"] == rate]
        if not mine or not all(s.get("ok") for s in mine):
            break
        args.knee = rate
        rate += args.step
    if args.knee is None:
        return
    for name, factor in (("at_1_5x", 1.5), ("at_2x", 2.0), ("at_3x", 3.0)):
        over = round(args.knee * factor)
        args.over.append((name, over))
        yield over


def _describe(step: dict[str, Any]) -> str:
    if "cps" not in step:
        return f"{step['server']:>8} {step['offered_rate']:>7g} cps  skipped: {step.get('error')}"
    cpu = step.get("cpu_us_per_call")
    cpu_text = f"{cpu:7.1f} µs/call" if cpu is not None else "    - µs/call"
    mark = "ok" if step.get("ok") else "FAIL"
    text = (f"{step['server']:>8} {step['offered_rate']:>7g} cps offered: "
            f"{step['cps']:8.1f} achieved, {step['failed']} failed, {cpu_text}  {mark}")
    if step.get("error"):
        text += f"  ({step['error'].splitlines()[0][:120]})"
    return text


if __name__ == "__main__":
    sys.exit(main())
