#!/usr/bin/env python3
"""Baton's RTP relay next to the C relay ceiling, with the same generator and sink.

Baton's relay (ext.rtp: RtpHub + two RtpStreams under uvloop, bench/relay_node.py) and
bench/baseline/relay.c are each put between the C generator and the C sink by
common.run_gen_sink(), C and Baton runs alternating, at every offered rate (0 = flat out).
Reported per rate and relay: median delivered packets/s, loss and relay CPU time per
delivered packet; and the headline

  ratio     = Baton delivered pps / C delivered pps, flat out   (target >= 0.8)
  cpu_ratio = Baton CPU ns/packet / C CPU ns/packet, flat out

Both relays get the same socket receive buffer (16 MiB, relay.c's) unless --rcvbuf says
otherwise, so the comparison is of the relaying code, not of queue depth.

Prints one JSON line on stdout and writes it, with a plot, to bench/results/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402
from common import BenchError, CRelay, Progress, RelayUnderTest  # noqa: E402

RELAY_NODE = BENCH_DIR / "relay_node.py"
C_RCVBUF = 16 << 20          # what bench/baseline/relay.c asks for
TARGET_RATIO = 0.8
KEYS = ("sent_pps", "relay_pps", "delivered_pps", "loss_pct", "relay_cpu_ns_per_pkt",
        "packets_per_wakeup")


class BatonRelay:
    """bench/relay_node.py in its one-direction mode: RtpStream A relays to RtpStream B."""

    name = "baton-rtphub-uvloop"

    def __init__(self, workdir: Path, rcvbuf: int = C_RCVBUF) -> None:
        self.workdir = workdir
        self.rcvbuf = rcvbuf
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = workdir / "relay_node.out"
        self.report: dict[str, Any] = {}

    def start(self, sink: tuple[str, int]) -> tuple[str, int]:
        in_port = common.free_port(tcp_too=False)
        self.proc = common.spawn([sys.executable, RELAY_NODE, "--in-port", in_port,
                                  "--out-port", sink[1], "--rcvbuf", self.rcvbuf,
                                  "--max-seconds", 600], log=self._log)
        # relay_node binds the input port only once the hub is on the loop.
        try:
            common.wait_udp_bound(in_port, 20.0, self.proc)
        except BenchError as exc:
            raise BenchError(f"{exc}\n{common.log_tail(self._log)}") from None
        return common.LOOPBACK, in_port

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        # SIGTERM makes it print its report and exit.
        common.stop_process(self.proc, timeout=5.0)
        self.proc = None
        self.report = common.last_json_line(self._log) or {}
        return self.report


def make_relay(kind: str, workdir: Path, rcvbuf: int) -> RelayUnderTest:
    return CRelay(workdir) if kind == "c" else BatonRelay(workdir, rcvbuf)


def summarize_rate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {k: common.summarize([float(r[k]) for r in rows if r.get(k) is not None])
            for k in KEYS}


def median(summary: dict[str, Any], key: str) -> float | None:
    value = summary.get(key)
    return value["median"] if value else None


def ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num is not None and den else None


def plot(by_rate: dict[str, dict[str, Any]], path: Path) -> bool:
    """Delivered packets/s and CPU ns/packet per rate, C beside Baton, min-max whiskers."""
    plt = common.pyplot()
    if plt is None or not by_rate:
        return False
    rates = list(by_rate)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.38
    for i, (kind, label) in enumerate((("c", CRelay.name), ("baton", BatonRelay.name))):
        xs = [n + (i - 0.5) * width for n in range(len(rates))]
        for ax, key, scale in ((ax1, "delivered_pps", 1000.0),
                               (ax2, "relay_cpu_ns_per_pkt", 1.0)):
            stats = [by_rate[r][kind].get(key) or {"median": 0, "min": 0, "max": 0}
                     for r in rates]
            mid = [s["median"] / scale for s in stats]
            err = [[(s["median"] - s["min"]) / scale for s in stats],
                   [(s["max"] - s["median"]) / scale for s in stats]]
            ax.bar(xs, mid, width, yerr=err, capsize=3, label=label)
    for ax, ylabel, title in ((ax1, "thousand packets/s delivered", "Throughput"),
                              (ax2, "relay CPU ns per delivered packet", "CPU cost")):
        ax.set_xticks(range(len(rates)))
        ax.set_xticklabels([f"{r} pps" if r != "max" else "flat out" for r in rates])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle("RTP relay: Baton (ext.rtp under uvloop) vs C recvmmsg relay, "
                 "172-byte packets")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Baton's RTP relay vs the C relay ceiling, same generator and sink.")
    p.add_argument("--rates", default="0,100000,200000",
                   help="offered packets/s, comma-separated; 0 sends flat out "
                        "(default: %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="generator run time per measurement (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3,
                   help="measurements per rate and relay; medians are reported "
                        "(default: %(default)s)")
    p.add_argument("--size", type=int, default=172,
                   help="datagram size: 12-byte RTP header + 20 ms G.711 = 172 "
                        "(default: %(default)s)")
    p.add_argument("--rcvbuf", type=int, default=C_RCVBUF,
                   help="Baton's socket receive buffer in bytes; 0 = kernel default, as "
                        "the engine runs (default: %(default)s, the C relay's)")
    common.add_result_file_args(p)
    args = p.parse_args(argv)
    common.check_rate_args(p, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_cleanup()
    runs: list[dict[str, Any]] = []
    errors: list[str] = []
    started = time.time()
    loadavg_start = list(os.getloadavg())
    progress = Progress(total=len(args.rate_list) * args.repeat * 2 * args.seconds)
    try:
        for name in ("relay", "gen", "sink"):
            common.build_baseline(name)
        done = 0
        for rate in args.rate_list:
            for rep in range(args.repeat):
                # Strict alternation, so drift in the machine's load hits both alike.
                for kind in ("c", "baton"):
                    base = done * args.seconds
                    label = f"{kind} {rate or 'max'} pps #{rep + 1}"

                    def tick(elapsed: float, base: float = base, label: str = label) -> None:
                        progress.show(base + min(elapsed, args.seconds), label)

                    with tempfile.TemporaryDirectory(prefix="baton-rtprelay-") as tmp:
                        relay = make_relay(kind, Path(tmp), args.rcvbuf)
                        run = common.run_gen_sink(relay, args.seconds, rate, args.size,
                                                  tick=tick)
                    run.update(kind=kind, rep=rep, loadavg_1m=os.getloadavg()[0])
                    if isinstance(relay, BatonRelay):
                        # How many packets one trip through the event loop carried.
                        run["hub_wakeups"] = relay.report.get("wakeups")
                        run["packets_per_wakeup"] = relay.report.get("packets_per_wakeup")
                    runs.append(run)
                    done += 1
                    progress.note(f"{label}: sent {run['sent_pps']}, relayed "
                                  f"{run['relay_pps']}, delivered {run['delivered_pps']} pps, "
                                  f"loss {run['loss_pct']} %, "
                                  f"{run['relay_cpu_ns_per_pkt']} ns CPU/packet")
        progress.close()
    except KeyboardInterrupt:
        errors.append("interrupted")
        sys.stderr.write("\nrtp_relay: interrupted\n")
    except BenchError as exc:
        errors.append(str(exc))
        sys.stderr.write(f"rtp_relay: {exc}\n")

    by_rate: dict[str, dict[str, Any]] = {}
    compact: dict[str, dict[str, Any]] = {}
    for rate in args.rate_list:
        key = str(rate or "max")
        if not any(r["rate_pps"] == (rate or "max") for r in runs):
            continue
        per_kind = {kind: summarize_rate([r for r in runs if r["kind"] == kind
                                          and r["rate_pps"] == (rate or "max")])
                    for kind in ("c", "baton")}
        by_rate[key] = per_kind
        c, b = per_kind["c"], per_kind["baton"]
        compact[key] = {
            "c_delivered_pps": median(c, "delivered_pps"),
            "baton_delivered_pps": median(b, "delivered_pps"),
            "c_loss_pct": median(c, "loss_pct"),
            "baton_loss_pct": median(b, "loss_pct"),
            "c_cpu_ns_per_pkt": median(c, "relay_cpu_ns_per_pkt"),
            "baton_cpu_ns_per_pkt": median(b, "relay_cpu_ns_per_pkt"),
            "pps_ratio": ratio(median(b, "delivered_pps"), median(c, "delivered_pps")),
            "cpu_ratio": ratio(median(b, "relay_cpu_ns_per_pkt"),
                               median(c, "relay_cpu_ns_per_pkt")),
            "baton_packets_per_wakeup": median(b, "packets_per_wakeup"),
        }
    flat = compact.get("max", {})
    result: dict[str, Any] = {
        "bench": "rtp_relay",
        "relays": {"c": CRelay.name, "baton": BatonRelay.name},
        "seconds": args.seconds,
        "size": args.size,
        "repeat": args.repeat,
        "baton_rcvbuf": args.rcvbuf,
        "ratio": flat.get("pps_ratio"),
        "cpu_ratio": flat.get("cpu_ratio"),
        "target_ratio": TARGET_RATIO,
        "meets_target": (flat["pps_ratio"] >= TARGET_RATIO
                         if flat.get("pps_ratio") is not None else None),
        "by_rate": compact,
        "loadavg": [loadavg_start, list(os.getloadavg())],
        "errors": errors,
    }
    common.report("rtp_relay", result, args, started, argv, lambda png: plot(by_rate, png),
                  {"summary": by_rate, "runs": runs})
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
