#!/usr/bin/env python3
"""How many calls one box holds: memory per session, and calls with media without loss.

`baton serve` answers number 1000 with `baton.echo` (a session that sends back what it
receives, so a call without RTP costs no media work). Three measurements, each on a fresh
engine:

1. idle: SIPp's uac holds --idle calls open without RTP; the engine's RSS before and with
   them all up gives the memory per idle held session (the floor: 10,000 in under 2 GB).
   Each session holds one socket (RTP; its RTCP socket is bound only once RTP arrives),
   so the process's descriptor limit must allow the sessions and a few thousand more. The
   engine raises its soft limit to the hard one at start; where it may (root with
   CAP_SYS_RESOURCE, as in CI), this script first raises the hard limit that SIPp and the
   engine inherit (prlimit); the result gives the limits it ran with (`fd_limit`).
2. media: for each count in --media, SIPp holds that many calls, each playing G.711 A-law
   (sip-tester's g711a.pcap) that the engine echoes back; with every call up, the engine's
   /metrics give packets lost on the way in (RFC 3550 A.3) and late 20 ms media ticks. The
   most calls with no failed call, no loss and no late tick is the figure; the RSS gives the
   memory per session with media.

Prints one JSON line on stdout and writes it, with a plot, to bench/results/.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BenchError  # noqa: E402
from sip_cps import write_rtp_scenario  # noqa: E402

CONFIG = """[engine]
transports = ["udp"]
node_id = "capacity"
metrics_addr = "127.0.0.1:{metrics}"

[media]
address = "127.0.0.1"
rtp_port_min = {port_min}
rtp_port_max = {port_max}
rtp_timeout = 3600
rtp_hold_timeout = 3600

[overload]
max_calls_in_setup = 100000

[security]
# One SIPp source places every call: its burst is not a flood from one caller.
max_setup_per_source = 0

[accounts.bench.numbers."1000"]
module = "baton.echo"
"""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Engine:
    """A fresh `baton serve` with /metrics, on free loopback ports."""

    def __init__(self, baton: Path, ports: int, ready_timeout: float) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="baton-capacity-"))
        self.metrics_port = common.free_port()
        self.address = (common.LOOPBACK, common.free_port())
        config = self.workdir / "capacity.toml"
        config.write_text(CONFIG.format(metrics=self.metrics_port, port_min=20000,
                                        port_max=20000 + ports - 1))
        self.log = self.workdir / "baton.log"
        argv = [baton, "serve", "--config", config, "--no-accountant",
                "--sip-addr", f"{self.address[0]}:{self.address[1]}",
                "--grpc-addr", f"{common.LOOPBACK}:{common.free_port()}",
                "--data-dir", self.workdir / "data"]
        try:
            self.proc = common.start_ready(argv, self.log, self.address, ready_timeout)
        except BenchError:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def metrics(self) -> dict[str, float]:
        return common.scrape_metrics(f"http://127.0.0.1:{self.metrics_port}/metrics", 10)

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            common.stop_process(self.proc, timeout=30.0)
            self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def refusals(m: dict[str, float]) -> dict[str, Any]:
    """What overload control refused (a held-calls figure is only good without refusals)."""
    return {"refused_503": int(m.get("baton_sip_overload_refused_total", 0)),
            "overload_entered": {k.split('"')[1]: int(v) for k, v in m.items()
                                 if k.startswith("baton_sip_overload_entered_total{")}}


def hold_calls(eng: Engine, calls: int, rate: float, hold_ms: int, workdir: Path,
               scenario: Path | None, up_timeout: float) -> tuple[subprocess.Popen[bytes], bool]:
    """Start SIPp placing CALLS calls that each stay up HOLD_MS; wait until all are up."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv: list[Any] = [common.find_binary("sipp"), f"{eng.address[0]}:{eng.address[1]}"]
    argv += ["-sf", scenario] if scenario else ["-sn", "uac", "-d", str(hold_ms)]
    argv += ["-s", "1000", "-r", f"{rate:g}", "-m", str(calls), "-l", str(calls),
             "-i", common.LOOPBACK, "-p", str(common.free_port(tcp_too=False)),
             "-mi", common.LOOPBACK, "-mp", str(common.free_port(tcp_too=False)),
             "-max_socket", "100", "-recv_timeout", "20000", "-nostdin",
             "-trace_stat", "-stf", workdir / "stat.csv", "-fd", "1"]
    proc = common.spawn(argv, log=workdir / "sipp.log", cwd=workdir)
    deadline = time.monotonic() + up_timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if eng.metrics().get("baton_sip_dialogs", 0) >= calls:
            return proc, True
        time.sleep(0.5)
    return proc, False


def raise_fd_limit(sessions: int) -> dict[str, Any]:
    """Descriptors for `sessions` held calls (two sockets each, plus the engine's own and
    SIPp's): the soft limit up to the hard one, and, when privileged, the hard limit up
    (children inherit both). What the limits were and became."""
    want = 2 * sessions + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out: dict[str, Any] = {"fd_limit_before": [soft, hard]}
    if hard < want and os.geteuid() == 0:
        try:
            resource.prlimit(0, resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError) as exc:   # above fs.nr_open, or no CAP_SYS_RESOURCE
            out["fd_limit_error"] = str(exc)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(want, hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    out["fd_limit"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    return out


def write_inactive_scenario(workdir: Path, hold_ms: int) -> Path:
    """A uac scenario whose offer is `a=inactive` (RFC 3264 6.1: the caller holds the call):
    neither side sends RTP; BYE after HOLD_MS."""
    workdir.mkdir(parents=True, exist_ok=True)
    head = """      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>{to_tag}
      Call-ID: [call_id]
      CSeq: {cseq}
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70"""
    scenario = workdir / "uac_inactive.xml"
    scenario.write_text(f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="uac holding the call without media">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
{head.format(to_tag="", cseq="1 INVITE")}
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=sipp 1 1 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
      a=inactive
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true"/>
  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
{head.format(to_tag="[peer_tag_param]", cseq="1 ACK")}
      Content-Length: 0
    ]]>
  </send>
  <pause milliseconds="{hold_ms}"/>
  <send retrans="500">
    <![CDATA[
      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
{head.format(to_tag="[peer_tag_param]", cseq="2 BYE")}
      Content-Length: 0
    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
""")
    return scenario


def idle_run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    limits = raise_fd_limit(args.idle)
    scenario = write_inactive_scenario(work / "idle", 3_600_000) if args.idle_inactive else None
    # Spare pairs: ports other processes hold in the range are skipped, not waited for.
    eng = Engine(args.baton, 2 * args.idle + 2048, args.ready_timeout)
    try:
        time.sleep(1.0)
        rss0 = eng.rss()
        proc, up = hold_calls(eng, args.idle, args.idle_rate, 3_600_000, work / "idle", scenario,
                              args.idle / args.idle_rate * 3 + 30)
        time.sleep(1.0)
        m = eng.metrics()
        rss1 = eng.rss()
        held = int(m.get("baton_sip_dialogs", 0))
        common.stop_process(proc, timeout=5.0)
        stat = common._parse_sipp_stat(work / "idle" / "stat.csv")
        return {"calls": args.idle, "held": held, "all_up": up,
                "offer": "a=inactive" if args.idle_inactive else "sendrecv",
                "engine_rtp_out": int(m.get('baton_rtp_packets_total{direction="out"}', 0)),
                "failed": int(stat.get("FailedCall(C)", "0") or 0), **refusals(m),
                # each session holds its RTP socket: the descriptors bound the count
                "fd_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1], **limits,
                "rss_before_mb": round(rss0 / 2**20, 1), "rss_held_mb": round(rss1 / 2**20, 1),
                "kb_per_session": round((rss1 - rss0) / max(held, 1) / 1024, 1),
                "under_2gb": rss1 < 2 * 2**30}
    finally:
        eng.stop()


def media_run(args: argparse.Namespace, calls: int, work: Path) -> dict[str, Any]:
    scenario = write_rtp_scenario(work, args.media_seconds)
    eng = Engine(args.baton, 2 * calls + 64, args.ready_timeout)
    try:
        time.sleep(1.0)
        rss0 = eng.rss()
        # All placed within two seconds, so that all are up at once for a while.
        rate = max(min(float(calls), args.media_rate), calls / 2.0)
        m0 = eng.metrics()
        proc, up = hold_calls(eng, calls, rate, 0, work / f"media-{calls}", scenario,
                              calls / rate + 10)
        # Every call up: let the media run, then read loss and late ticks while they are.
        time.sleep(min(2.0, args.media_seconds / 3))
        m1 = eng.metrics()
        rss1 = eng.rss()
        common.wait_for(proc, args.media_seconds + calls / rate + 30)
        stat = common._parse_sipp_stat(work / f"media-{calls}" / "stat.csv")
        failed = int(stat.get("FailedCall(C)", "0") or 0)
        lost = m1.get("baton_rtp_lost_packets_total", 0) - m0.get("baton_rtp_lost_packets_total", 0)
        expected = (m1.get("baton_rtp_expected_packets_total", 0)
                    - m0.get("baton_rtp_expected_packets_total", 0))
        late = m1.get("baton_media_late_ticks_total", 0) - m0.get("baton_media_late_ticks_total", 0)
        held = int(m1.get("baton_sip_dialogs", 0))
        return {"calls": calls, "all_up": up, "held": held, "failed": failed, **refusals(m1),
                "rtp_expected": int(expected), "rtp_lost": int(lost), "late_ticks": int(late),
                "rss_mb": round(rss1 / 2**20, 1),
                "kb_per_session": round((rss1 - rss0) / max(held, 1) / 1024, 1),
                "clean": up and failed == 0 and lost == 0 and late == 0 and expected > 0}
    finally:
        eng.stop()


def _clean_from_below(rows: list[dict[str, Any]]) -> int | None:
    best = None
    for r in rows:
        if not r["clean"]:
            break
        best = r["calls"]
    return best


def plot(result: dict[str, Any], path: Path) -> bool:
    plt = common.pyplot()
    if plt is None or not result["media"]:
        return False
    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    rows = result["media"]
    xs = [r["calls"] for r in rows]
    ax_l.plot(xs, [r["rtp_lost"] for r in rows], "o-", label="RTP packets lost")
    ax_l.plot(xs, [r["late_ticks"] for r in rows], "s-", label="late media ticks")
    ax_l.set_xlabel("concurrent calls with media")
    ax_l.set_title("Loss and late ticks")
    ax_m.plot(xs, [r["kb_per_session"] for r in rows], "o-", label="KiB per call with media")
    if result.get("idle"):
        ax_m.axhline(result["idle"]["kb_per_session"], color="grey", linestyle="--",
                     label=f"KiB per idle held call ({result['idle']['calls']} held)")
    ax_m.set_xlabel("concurrent calls with media")
    ax_m.set_title("Engine memory per session")
    ax_m.set_ylim(bottom=0)
    for ax in (ax_l, ax_m):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("How many calls one box holds")
    return common.save_figure(plt, fig, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Memory per held session and the most calls with "
                                            "media without loss or late ticks.")
    p.add_argument("--idle", type=int, default=10000,
                   help="calls held without media (default: %(default)s; 0: skip)")
    p.add_argument("--idle-rate", type=float, default=500.0,
                   help="calls/s placing them (default: %(default)s)")
    p.add_argument("--idle-inactive", action="store_true",
                   help="the held calls offer a=inactive (held by the caller: no RTP either "
                        "way); by default they offer sendrecv and send nothing, and the engine "
                        "sends its module's silence")
    p.add_argument("--media", default="100,200,400,600,800",
                   help="concurrent calls with media, comma-separated, each measured on a "
                        "fresh engine (default: %(default)s)")
    p.add_argument("--media-rate", type=float, default=200.0,
                   help="calls/s placing the calls with media, at least half the count "
                        "(default: %(default)s)")
    p.add_argument("--media-seconds", type=float, default=6.0,
                   help="media per call, at most 7 (the pcap's length) (default: %(default)s)")
    common.add_baton_args(p)
    common.add_result_file_args(p)
    args = p.parse_args(argv)
    try:
        args.media_list = sorted({int(x) for x in args.media.split(",") if x.strip()})
    except ValueError:
        p.error("--media takes whole numbers separated by commas")
    if args.idle < 0 or args.idle_rate <= 0 or args.media_rate <= 0:
        p.error("--idle must be >= 0 and the rates positive")
    if not 0 < args.media_seconds <= 7:
        p.error("--media-seconds must be in (0, 7]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_cleanup()
    result: dict[str, Any] = {"bench": "capacity", "idle": None, "media": []}
    errors: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="baton-capacity-run-"))
    started = time.time()
    try:
        common.find_binary("sipp")
        if args.idle:
            result["idle"] = idle_run(args, work)
            sys.stderr.write(f"capacity: idle {result['idle']}\n")
        for calls in args.media_list:
            row = media_run(args, calls, work)
            result["media"].append(row)
            sys.stderr.write(f"capacity: media {row}\n")
    except BenchError as exc:
        errors.append(str(exc))
        sys.stderr.write(f"capacity: {exc}\n")
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    clean = [r for r in result["media"] if r["clean"]]
    result.update({
        "idle_kb_per_session": result["idle"]["kb_per_session"] if result["idle"] else None,
        "idle_rss_mb": result["idle"]["rss_held_mb"] if result["idle"] else None,
        # the most calls of a clean level below which every level was clean too: on a shared
        # machine one late tick can be someone else's, so each level is reported as well
        "max_media_calls_clean": max((r["calls"] for r in clean), default=None),
        "max_media_calls_clean_from_below": _clean_from_below(result["media"]),
        "media_kb_per_session": clean[-1]["kb_per_session"] if clean else None,
        "errors": errors,
    })
    common.report("capacity", result, args, started, argv, lambda png: plot(result, png))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
