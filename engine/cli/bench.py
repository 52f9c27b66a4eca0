"""`baton bench SCENARIO`: run a benchmark of bench/ with a progress bar, repeat it, and
report median/min/max next to the baseline measured in the same command.

Each scenario is one of the drivers in bench/ (their own `--help` lists every option; pass
them after `--`).  The driver runs as a child process, once per repetition, and prints one
JSON line; this command folds the figures of every repetition into one result, writes it to
bench/results/SCENARIO-TIMESTAMP.json with a PNG plot beside it, and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO_DIR / "bench"


@dataclass(frozen=True)
class Figure:
    """One reported number: where it is in the driver's JSON and what it is compared with."""

    key: str
    path: str
    label: str
    unit: str
    baseline: str | None = None        # dotted path of the same figure for the baseline
    baseline_label: str = ""
    higher_is_better: bool = True


@dataclass(frozen=True)
class Scenario:
    name: str
    driver: str
    measures: str
    baseline: str
    figures: tuple[Figure, ...]
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    reference: tuple[str, ...] | None = None   # extra args of a second run: the baseline
    engine: bool = False                       # takes --engine HOST:PORT
    minutes: str = ""                          # how long a default run takes here
    notes: tuple[str, ...] = field(default=())


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario(
        "cps-ramp", "sip_cps.py",
        "SIP calls per second answered and released (SIPp uac: INVITE, 200, ACK, BYE, 200) "
        "against number 1000, ramped up until Baton fails a call (the knee), then at 1.5x and "
        "2x the knee (several SIPp processes where one cannot offer enough): goodput, failed "
        "calls, server CPU µs per call at every step",
        "Kamailio as a stateless responder (bench/baseline/kamailio-responder.cfg) under the "
        "same SIPp load at the same rates, started in the same run",
        (Figure("cps", "best_zero_fail_cps", "calls/s with no failed call (the knee)",
                "calls/s", "kamailio_cps", "Kamailio stateless"),
         Figure("goodput_2x", "ramp.baton.at_2x.cps", "goodput at 2x the knee", "calls/s",
                "ramp.kamailio.at_2x.cps", "Kamailio stateless"),
         Figure("cpu_per_call", "baton_cpu_us_per_call", "server CPU per call", "µs",
                "kamailio_cpu_us_per_call", "Kamailio stateless", higher_is_better=False)),
        args=("--ramp",),
        quick=("--ramp", "--start", "100", "--step", "100", "--max-rate", "200",
               "--seconds", "2", "--settle", "0.3"),
        engine=True, minutes="3-6"),
    Scenario(
        "capacity", "capacity.py",
        "how many calls one box holds: engine memory per idle held session (10,000 held "
        "without media by default; the floor is under 2 GB) and per session with media, and "
        "the most concurrent calls with G.711 media (SIPp playing a pcap, baton.echo sending "
        "it back) with no failed call, no packet lost and no late media tick",
        "none: absolute figures of this machine (the CPS figures' Kamailio is the reference "
        "for signalling)",
        (Figure("idle_kb", "idle_kb_per_session", "memory per idle held session", "KiB",
                higher_is_better=False),
         Figure("media_calls", "max_media_calls_clean",
                "calls with media, no loss, no late tick", "calls"),
         Figure("media_kb", "media_kb_per_session", "memory per session with media", "KiB",
                higher_is_better=False)),
        quick=("--idle", "200", "--idle-rate", "200", "--media", "20", "--media-seconds", "6"),
        minutes="2"),
    Scenario(
        "density", "rtp_density.py",
        "concurrent bridged G.711 calls (both legs, 20 ms ptime) Baton's RTP relay carries "
        "under 0.1 % packet loss; load from bench/baseline/rtpload.c",
        "the C recvmmsg/sendmmsg relay (bench/baseline/relay.c): its CPU per packet at the "
        "same packet rate",
        (Figure("calls", "max_calls_under_0_1pct_loss", "bridged calls under 0.1 % loss",
                "calls"),
         Figure("cpu_per_packet", "baseline.baton_density_cpu_ns_per_pkt",
                "relay CPU per packet", "ns", "baseline.c_cpu_ns_per_pkt", "C relay",
                higher_is_better=False)),
        quick=("--calls", "50,100", "--seconds", "2", "--baseline-seconds", "1"),
        minutes="2"),
    Scenario(
        "relay", "rtp_relay.py",
        "packets per second through Baton's relay between a C generator and a C sink, flat "
        "out; CPU ns per packet",
        "the C recvmmsg/sendmmsg relay (bench/baseline/relay.c) between the same generator "
        "and sink, alternating with Baton's",
        (Figure("pps", "by_rate.max.baton_delivered_pps", "delivered packets/s, flat out",
                "packets/s", "by_rate.max.c_delivered_pps", "C relay"),
         Figure("cpu_per_packet", "by_rate.max.baton_cpu_ns_per_pkt", "relay CPU per packet",
                "ns", "by_rate.max.c_cpu_ns_per_pkt", "C relay", higher_is_better=False)),
        args=("--rates", "0", "--repeat", "1"),
        quick=("--seconds", "1"),
        minutes="0.3"),
    Scenario(
        "transitions", "transitions.py",
        "time from a transition request to the new module having control, with live SIPp "
        "calls carrying media; late media ticks meanwhile",
        "none (no other system does this); the figure is compared with itself across "
        "repetitions",
        (Figure("p50", "p50_us", "transition latency p50", "µs", higher_is_better=False),
         Figure("p99", "p99_us", "transition latency p99", "µs", higher_is_better=False),
         Figure("late_ticks", "late_media_ticks", "late media ticks", "ticks",
                higher_is_better=False)),
        quick=("--sessions", "50", "--transitions", "500"),
        minutes="0.5"),
    Scenario(
        "dtmf", "dtmf_density.py",
        "real-time in-band DTMF channels per core (20 ms frames) and G.711 encode/decode "
        "throughput of the C kernels",
        "the numpy twins (ext/dtmf_py.py, g711.py), run in the same command",
        (Figure("channels", "dtmf_channels_per_core", "DTMF channels per core", "channels",
                "reference.dtmf_channels_per_core", "numpy twin"),
         Figure("ulaw_encode", "g711_ulaw_encode_MBps", "μ-law encode", "MB/s",
                "reference.g711_ulaw_encode_MBps", "numpy twin"),
         Figure("ulaw_decode", "g711_ulaw_decode_MBps", "μ-law decode", "MB/s",
                "reference.g711_ulaw_decode_MBps", "numpy twin")),
        quick=("--min-seconds", "0.1"),
        reference=("--impl", "py"),
        minutes="0.3"),
    Scenario(
        "mixer", "mixer_density.py",
        "conference participants one core mixes in real time (decode, mix-minus, encode; "
        "every participant talking)",
        "the numpy twin (ext/mix_py.py), run in the same command on a tenth of the ticks",
        (Figure("participants", "participants_per_core", "participants per core",
                "participants", "reference.participants_per_core", "numpy twin"),),
        quick=("--conferences", "10", "--ticks", "50"),
        reference=("--impl", "py", "--ticks", "50"),
        minutes="0.2"),
    Scenario(
        "ring", "ring_bench.py",
        "ring records per second stamped by one process and drained by another",
        "the pure-Python twin of the ring (ext/ring_py.py), in the same run",
        (Figure("end_to_end", "results.c.end_to_end_rate", "records/s written and drained",
                "records/s", "results.py.end_to_end_rate", "Python twin"),
         Figure("write", "results.c.write_rate", "records/s written", "records/s",
                "results.py.write_rate", "Python twin")),
        quick=("--records", "50000"),
        minutes="0.3"),
    Scenario(
        "accountant", "accountant_bench.py",
        "transitions metered, rated and posted to the double-entry ledger per second "
        "(SQLite and PostgreSQL)",
        "the same stream metered and rated without posting (the CPU part alone), same run",
        (Figure("sqlite", "sqlite_transitions_per_s", "transitions/s into SQLite",
                "transitions/s", "meter_rate_only_records_per_s", "meter+rate only"),
         Figure("postgresql", "postgresql_transitions_per_s", "transitions/s into PostgreSQL",
                "transitions/s", "meter_rate_only_records_per_s", "meter+rate only")),
        quick=("--transitions", "20000", "--live", "200", "--stores", "sqlite"),
        minutes="1"),
    Scenario(
        "rest", "rest_bench.py",
        "REST API: call creations per second through POST Calls.json (each placed and "
        "answered by the engine's own number), and GET Calls/{Sid}.json latency p50/p99 "
        "under N live calls (default 500)",
        "aiohttp serving a static JSON body of the same size on this machine, same run",
        (Figure("creations", "creations_per_s", "call creations/s (placed and answered)",
                "calls/s"),
         Figure("get_p50", "get_p50_ms", "GET Calls/{Sid}.json p50", "ms", "static_p50_ms",
                "aiohttp static JSON", higher_is_better=False),
         Figure("get_p99", "get_p99_ms", "GET Calls/{Sid}.json p99", "ms", "static_p99_ms",
                "aiohttp static JSON", higher_is_better=False),
         Figure("late_ticks", "late_media_ticks", "late media ticks meanwhile", "ticks",
                higher_is_better=False)),
        quick=("--quick",),
        minutes="0.5"),
    Scenario(
        "messages", "messages_bench.py",
        "inbound SIP MESSAGEs per second answered by a module (baton.bot) and by an "
        "instruction app (a MessagingResponse on a local aiohttp server), at rising rates "
        "until a text goes unanswered or the replies fall behind; p50/p99 from each MESSAGE "
        "to its 202 and to the reply text Baton sends back (this driver's UDP client answers "
        "it 200), at the highest rate carried and at the first; server CPU per text",
        "Kamailio's stateless responder (bench/baseline/kamailio-responder.cfg, 202 for "
        "MESSAGE) under the same MESSAGE stream from the same client, and the same rates "
        "from SIPp, in the same run",
        (Figure("module_rate", "module_rate", "texts/s answered by a module (reply sent)",
                "texts/s", "kamailio_sipp_rate", "Kamailio stateless (SIPp, 202)"),
         Figure("instructions_rate", "instructions_rate",
                "texts/s answered by an instruction app", "texts/s", "kamailio_sipp_rate",
                "Kamailio stateless (SIPp, 202)"),
         Figure("module_p99", "module_reply_p99_ms", "module: MESSAGE to reply p99", "ms",
                "kamailio_accept_p99_ms_at_module_rate", "Kamailio 202 p99, same rate",
                higher_is_better=False),
         Figure("instructions_p99", "instructions_reply_p99_ms",
                "instruction app: MESSAGE to reply p99", "ms",
                "kamailio_accept_p99_ms_at_instructions_rate", "Kamailio 202 p99, same rate",
                higher_is_better=False),
         Figure("module_p99_low", "module_reply_p99_ms_at_first_rate",
                "module: reply p99 at the first rate", "ms",
                "kamailio_accept_p99_ms_at_first_rate", "Kamailio 202 p99, same rate",
                higher_is_better=False)),
        quick=("--quick",),
        minutes="3"),
    Scenario(
        "accountant-lag", "accountant_lag.py",
        "lag from a stamp to its committed ledger row (SQLite) p50/p99 with SIPp calling "
        "`baton serve` at 1,000 calls/s (calls of 1 s); accountant CPU share",
        "the same engine and ledger at an idle 10 calls/s, just before, in the same run",
        (Figure("p50", "lag_p50_ms", "stamp-to-ledger lag p50", "ms", "idle_lag_p50_ms",
                "idle 10 CPS", higher_is_better=False),
         Figure("p99", "lag_p99_ms", "stamp-to-ledger lag p99", "ms", "idle_lag_p99_ms",
                "idle 10 CPS", higher_is_better=False),
         Figure("accountant_cpu", "accountant_cpu_pct", "accountant CPU", "% of a core",
                higher_is_better=False)),
        quick=("--quick",),
        minutes="0.6"),
    Scenario(
        "load", "load_bench.py",
        "the load generator: `baton load` against SIPp on the same targets in the same run. "
        "Signalling (Kamailio's stateless responder): SIPp uac vs `baton load` answer-hold "
        "--hold 0 up a ladder of rates, the highest with every call answered and the rate "
        "kept, and generator CPU per call. Media (Baton's echo): SIPp uac with the "
        "sip-tester G.711 pcap vs `baton load` echo-check, the most concurrent calls with "
        "RTP under 0.1 % loss, and generator CPU per call. Media against baresip's echo "
        "module: `baton load` echo-check alone, the most concurrent calls under 0.1 % loss",
        "SIPp (uac, and uac with pcap media) against the same Kamailio and the same engine, "
        "in the same run",
        (Figure("cps", "baton_best_cps", "calls/s with no generator-side failure", "calls/s",
                "sipp_best_cps", "SIPp uac"),
         Figure("signalling_cpu", "baton_signalling_cpu_us_per_call",
                "generator CPU per call, signalling", "µs",
                "sipp_signalling_cpu_us_per_call", "SIPp uac", higher_is_better=False),
         Figure("media_calls", "baton_media_calls", "concurrent calls with media < 0.1 % loss",
                "calls", "sipp_media_calls", "SIPp uac + pcap"),
         Figure("media_cpu", "baton_media_cpu_us_per_call", "generator CPU per media call",
                "µs", "sipp_media_cpu_us_per_call", "SIPp uac + pcap",
                higher_is_better=False)),
        quick=("--rates", "50,100", "--seconds", "1.5", "--media", "10",
               "--media-seconds", "3", "--baresip", "10"),
        minutes="3-6"),
    Scenario(
        "cluster", "cluster_cps.py",
        "calls per second through Kamailio's dispatcher to 1, 2 and 3 nodes (`baton cluster "
        "up`), CPU per call per node and Kamailio's own, PostgreSQL rows and Redis commands "
        "per call",
        "the same single node called directly, without Kamailio, in the same run",
        (Figure("cps", "cps_3", "calls/s through Kamailio to 3 nodes", "calls/s",
                "direct_cps", "1 node direct"),
         Figure("nodes_cpu", "nodes_cpu_us_per_call_3", "all 3 nodes' CPU per call", "µs",
                "direct_cpu_us_per_call", "1 node direct", higher_is_better=False),
         Figure("kamailio_cpu", "kamailio_cpu_us_per_call_3", "Kamailio CPU per call", "µs",
                higher_is_better=False)),
        quick=("--nodes", "1,2", "--seconds", "3"),
        minutes="3"),
)}

# Drivers that take a results directory get a scratch one: this command writes the files.
_NO_FILES = "--no-files"


class BenchUsage(Exception):
    """A usage error: exit code 2."""


# --------------------------------------------------------------------------- progress


class Bar:
    """The whole command's progress on stderr: a redrawn bar on a terminal, else plain
    lines (each note, and every tenth of the way)."""

    def __init__(self, total: int, label: str, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.total = max(1, total)
        self.label = label
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._last_tenth = -1
        self._start = time.monotonic()

    def update(self, done: float, note: str = "") -> None:
        frac = min(1.0, max(0.0, done / self.total))
        elapsed = time.monotonic() - self._start
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw < 0.1:
                return
            self._last_draw = now
            width = 28
            filled = int(frac * width)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{frac * 100:5.1f}% {elapsed:5.0f}s {note[:60]}\x1b[K")
            self.stream.flush()
            return
        tenth = int(frac * 10)
        if tenth > self._last_tenth:
            self._last_tenth = tenth
            self.stream.write(f"{self.label}: {tenth * 10:3d}% after {elapsed:.0f} s"
                              f"{' - ' + note if note else ''}\n")
            self.stream.flush()

    def note(self, message: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"{message}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# --------------------------------------------------------------------------- running


def _bench_common():
    """bench/common.py (the benchmarks' shared layer), importable from the checkout."""
    if not (BENCH_DIR / "common.py").is_file():
        raise BenchUsage(f"{BENCH_DIR} not found: `baton bench` runs from a source checkout")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    import common  # type: ignore[import-not-found]

    return common


def run_driver(argv: list[str], bar: Bar, base: float, prefix: str,
               estimate_s: float) -> tuple[int | None, dict[str, Any] | None, str]:
    """Run one driver; returns (exit code, its JSON line, the tail of its stderr).

    Its stderr is read as it comes: `@progress FRACTION NOTE` lines move the bar, others
    are shown as notes.  A driver that reports no progress moves the bar by its elapsed
    time against ESTIMATE_S.
    """
    common = _bench_common()
    env = dict(os.environ, **{common.PROGRESS_ENV: "1", "PYTHONUNBUFFERED": "1"})
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.PIPE, cwd=REPO_DIR, env=env,
                                start_new_session=True)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.stderr is not None
            for raw in iter(proc.stderr.readline, b""):
                lines.put(raw.decode(errors="replace").rstrip("\n"))
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        tail: list[str] = []
        frac, reported = 0.0, False
        start = time.monotonic()
        try:
            while True:
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line.startswith(common.PROGRESS_PREFIX):
                    value, _, note = line[len(common.PROGRESS_PREFIX):].partition(" ")
                    try:
                        frac, reported = float(value), True
                    except ValueError:
                        pass
                    bar.update(base + frac, f"{prefix} {note}")
                    continue
                if line.strip():
                    tail = (tail + [line])[-20:]
                    bar.note(f"  {prefix} {line}")
                if not reported:
                    frac = min(0.95, (time.monotonic() - start) / max(1.0, estimate_s))
                bar.update(base + frac, f"{prefix} {time.monotonic() - start:.0f}s")
            proc.wait()
        except KeyboardInterrupt:
            # The driver runs in a session of its own: SIGTERM makes it stop its servers
            # and print what it has.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            reader.join(timeout=5)
        out.seek(0)
        result = None
        for text in reversed(out.read().decode(errors="replace").splitlines()):
            if text.strip().startswith("{"):
                try:
                    result = json.loads(text)
                    break
                except ValueError:
                    continue
    return proc.returncode, result, "\n".join(tail[-5:])


def driver_argv(scenario: Scenario, args: argparse.Namespace, reference: bool) -> list[str]:
    argv = [sys.executable, str(BENCH_DIR / scenario.driver), *scenario.args]
    if args.quick:
        argv += scenario.quick
    if scenario.engine and args.engine:
        argv += ["--target", args.engine]
        if args.engine_pids:
            argv += ["--target-pids", args.engine_pids]
    argv.append(_NO_FILES)
    if reference and scenario.reference:
        argv += scenario.reference
    argv += args.driver_args
    return argv


def _estimate(scenario: Scenario, quick: bool) -> float:
    if quick:
        return 20.0
    try:
        return float(scenario.minutes or 1) * 60
    except ValueError:
        return 60.0


def summarize_runs(scenario: Scenario, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure: median/min/max over the repetitions, the baseline's, and their ratio."""
    common = _bench_common()
    figures: dict[str, Any] = {}
    for fig in scenario.figures:
        values = [common.dig(r, f"result.{fig.path}") for r in runs]
        entry: dict[str, Any] = {"label": fig.label, "unit": fig.unit,
                                 "higher_is_better": fig.higher_is_better,
                                 **(common.spread(values) or {"median": None, "min": None,
                                                              "max": None, "values": []})}
        if fig.baseline:
            path = (fig.baseline if fig.baseline.startswith("reference.")
                    else f"result.{fig.baseline}")
            base = [common.dig(r, path) for r in runs]
            entry["baseline"] = {"label": fig.baseline_label,
                                 **(common.spread(base) or {"median": None, "min": None,
                                                            "max": None, "values": []})}
            ratios = [v / b for v, b in zip(values, base)
                      if isinstance(v, (int, float)) and isinstance(b, (int, float)) and b]
            spread = common.spread([round(x, 3) for x in ratios])
            entry["ratio"] = ({k: round(v, 3) for k, v in spread.items() if k != "values"}
                              if spread else None)
        figures[fig.key] = entry
    return figures


def curve_panels(scenario: Scenario, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Line charts of the steps a ramp went through, one line per repetition (and server)."""
    series: list[dict[str, Any]] = []
    if scenario.name == "cps-ramp":
        for run in runs:
            steps = (run.get("result") or {}).get("steps") or []
            for color, server in enumerate(("baton", "kamailio")):
                rows = [s for s in steps if s.get("server") == server and s.get("cps") is not None]
                if rows:
                    series.append({"label": f"{server} #{run['rep']}", "color": color,
                                   "x": [s["offered_rate"] for s in rows],
                                   "y": [s["cps"] for s in rows]})
        return [{"label": "achieved against offered", "unit": "calls/s",
                 "xlabel": "offered calls/s", "series": series}] if series else []
    if scenario.name == "density":
        for run in runs:
            levels = (run.get("result") or {}).get("levels") or []
            if levels:
                series.append({"label": f"relay CPU #{run['rep']}", "color": 0,
                               "x": [lv["calls"] for lv in levels],
                               "y": [lv["relay_cpu_pct"] for lv in levels]})
        return [{"label": "relay process CPU by bridged calls", "unit": "% of one core",
                 "xlabel": "bridged calls", "series": series}] if series else []
    return []


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{int(value):,}"


def render_summary(record: dict[str, Any]) -> str:
    rows = [f"baton bench {record['scenario']}: {record['repeat']} run(s)"
            f"{' (quick)' if record['quick'] else ''}, median [min .. max]"]
    for fig in record["figures"].values():
        line = (f"  {fig['label']:<34} {_fmt(fig['median']):>12} {fig['unit']:<13} "
                f"[{_fmt(fig['min'])} .. {_fmt(fig['max'])}]")
        base = fig.get("baseline")
        if base is not None:
            ratio = fig.get("ratio") or {}
            line += (f"   {base['label']}: {_fmt(base['median'])}, ratio "
                     f"{_fmt(ratio.get('median'))}")
        rows.append(line)
    if record["quick"]:
        rows.append("  (--quick: a smoke run of a few seconds, start-up included; its figures "
                    "are not the ones to compare with the targets)")
    for err in record["errors"]:
        rows.append(f"  error: {err.splitlines()[0] if err else err}")
    if record.get("json"):
        rows.append(f"  result: {record['json']}")
    if record.get("png"):
        rows.append(f"  plot:   {record['png']}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    common = _bench_common()
    scenario = SCENARIOS[args.scenario]
    runs_per_rep = 2 if scenario.reference else 1
    bar = Bar(args.repeat * runs_per_rep, f"bench {scenario.name}")
    estimate = _estimate(scenario, args.quick)
    started = time.time()
    runs: list[dict[str, Any]] = []
    errors: list[str] = []
    interrupted = False
    try:
        done = 0
        for rep in range(args.repeat):
            entry: dict[str, Any] = {"rep": rep + 1}
            for reference in ((False, True) if scenario.reference else (False,)):
                prefix = f"#{rep + 1}{' baseline' if reference else ''}"
                argv = driver_argv(scenario, args, reference)
                t0 = time.monotonic()
                rc, result, tail = run_driver(argv, bar, done, prefix, estimate)
                done += 1
                bar.update(done, prefix)
                if rc != 0 or result is None:
                    errors.append(f"run {prefix}: {scenario.driver} exited with {rc}"
                                  f"{': ' + tail if tail else ''}")
                if reference:
                    entry["reference"] = result
                else:
                    entry.update(argv=argv[1:], returncode=rc,
                                 seconds=round(time.monotonic() - t0, 2), result=result)
                if result is not None and isinstance(result.get("errors"), list):
                    errors.extend(f"run {prefix}: {e}" for e in result["errors"])
            runs.append(entry)
    except KeyboardInterrupt:
        interrupted = True
        errors.append("interrupted")
    finally:
        bar.close()
    record: dict[str, Any] = {
        "scenario": scenario.name,
        "driver": f"bench/{scenario.driver}",
        "measures": scenario.measures,
        "baseline": scenario.baseline,
        "engine": (args.engine or "self-started") if scenario.engine else None,
        "quick": args.quick,
        "repeat": args.repeat,
        "completed": len(runs),
        "figures": summarize_runs(scenario, runs),
        "errors": errors,
        "runs": runs,
        "meta": {**common.machine_info(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                 "wall_s": round(time.time() - started, 1),
                 "command": ["baton", "bench", *args.argv]},
    }
    if not args.no_files and runs:
        json_path, png_path = common.result_paths(scenario.name.replace("-", "_"),
                                                  args.results_dir)
        panels = []
        for fig in record["figures"].values():
            bars = [{"label": "Baton", "values": fig["values"]}]
            if fig.get("baseline") is not None:
                bars.append({"label": fig["baseline"]["label"],
                             "values": fig["baseline"]["values"]})
            better = "higher" if fig["higher_is_better"] else "lower"
            panels.append({"label": f"{fig['label']} ({better} is better)",
                           "unit": fig["unit"], "bars": bars})
        panels += curve_panels(scenario, runs)
        title = (f"baton bench {scenario.name}: {len(runs)} run(s), median and min..max"
                 f"{' (quick)' if args.quick else ''}")
        if common.summary_plot(png_path, title, panels):
            record["png"] = str(png_path)
        elif common.pyplot() is None:
            print("baton bench: no plot: matplotlib is not installed "
                  "(.venv/bin/pip install -e '.[bench]')", file=sys.stderr)
        record["json"] = str(json_path)
        common.write_json(json_path, record)
    if args.json:
        print(json.dumps(record), flush=True)
    else:
        print(render_summary(record), flush=True)
    if interrupted:
        return 130
    return 1 if errors else 0


# --------------------------------------------------------------------------- CLI


def describe() -> str:
    lines = ["Scenarios (`baton bench SCENARIO --help` for the options; the driver's own "
             "options go after `--`):", ""]
    for s in SCENARIOS.values():
        lines.append(f"{s.name}  (bench/{s.driver}, about {s.minutes} min; --quick: seconds)")
        lines.append(f"  measures: {s.measures}")
        lines.append(f"  baseline: {s.baseline}")
        if s.engine:
            lines.append("  --engine HOST:PORT measures a running engine instead of starting one")
        lines.append("")
    return "\n".join(lines).rstrip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="baton bench",
        description="Run a benchmark with a progress bar, next to the machine's baseline "
                    "measured in the same command; write bench/results/SCENARIO-TIME.json and "
                    ".png; with --repeat N report median/min/max.",
        epilog="Arguments after `--` go to the driver, e.g. "
               "`baton bench cps-ramp -- --rates 1000,2000,3000 --seconds 10`. "
               f"Scenarios: {', '.join(SCENARIOS)}.")
    p.add_argument("scenario", nargs="?", metavar="SCENARIO",
                   help=f"one of: {', '.join(SCENARIOS)}")
    p.add_argument("--list", action="store_true", help="describe every scenario and exit")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run N times, report median/min/max (default: 1)")
    p.add_argument("--quick", action="store_true",
                   help="a small size that finishes in seconds (checks the setup, not the "
                        "machine)")
    p.add_argument("--engine", metavar="HOST:PORT",
                   help="measure an engine already running there (cps-ramp) instead of "
                        "starting one")
    p.add_argument("--engine-pids", metavar="PID,PID",
                   help="processes of the --engine, for the CPU figures")
    p.add_argument("--results-dir", type=Path, default=None, metavar="DIR",
                   help="where the JSON and PNG go (default: bench/results)")
    p.add_argument("--no-files", action="store_true", help="write no result files")
    p.add_argument("--json", action="store_true",
                   help="print the whole result as one JSON line instead of the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, driver_args = argv, []
    if "--" in argv:
        cut = argv.index("--")
        own, driver_args = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(own)
    args.driver_args, args.argv = driver_args, argv
    if args.list:
        print(describe())
        return 0
    try:
        if not args.scenario:
            raise BenchUsage(f"which scenario? (known: {', '.join(SCENARIOS)}; "
                             f"--list describes them)")
        if args.scenario not in SCENARIOS:
            raise BenchUsage(f"unknown scenario {args.scenario!r} "
                             f"(known: {', '.join(SCENARIOS)})")
        if args.repeat < 1:
            raise BenchUsage("--repeat must be at least 1")
        scenario = SCENARIOS[args.scenario]
        if (args.engine or args.engine_pids) and not scenario.engine:
            with_engine = [s.name for s in SCENARIOS.values() if s.engine]
            raise BenchUsage(f"--engine applies to {', '.join(with_engine)} only; "
                             f"{scenario.name} runs its own components")
        if args.engine_pids and not args.engine:
            raise BenchUsage("--engine-pids goes with --engine")
        if args.engine:
            from engine.common.net import parse_hostport

            try:
                parse_hostport(args.engine)
            except ValueError as exc:
                raise BenchUsage(f"--engine: {exc}") from None
        _bench_common()
    except BenchUsage as exc:
        print(f"baton bench: {exc}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
