#!/usr/bin/env python3
"""The machine's ceiling for relaying RTP-sized UDP packets on loopback.

Runs bench/baseline/relay.c (recvmmsg/sendmmsg, batches of 64, one thread) between the C
generator and the C sink, and reports what each stage counted and the relay's CPU time
per packet.  A Baton relay is measured by handing another common.RelayUnderTest to
common.run_gen_sink(): same generator, same sink, same accounting.

Prints one JSON line on stdout and writes it, with a plot, to bench/results/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BenchError, CRelay, Progress  # noqa: E402


def plot(runs: Sequence[dict[str, Any]], path: Path) -> bool:
    """Packets per second at each stage, one group of bars per run."""
    plt = common.pyplot()
    if plt is None or not runs:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(runs)), 4.5))
    stages = (("sent_pps", "generator sent"), ("relay_pps", "relay forwarded"),
              ("delivered_pps", "sink received"))
    width = 0.8 / len(stages)
    for i, (key, label) in enumerate(stages):
        xs = [n + (i - 1) * width for n in range(len(runs))]
        ax.bar(xs, [float(r.get(key) or 0) / 1000 for r in runs], width, label=label)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([f"{r['rate_pps']} pps\nrun {r['rep'] + 1}" for r in runs])
    ax.set_ylabel("thousand packets/s")
    ax.set_title(f"UDP relay ceiling ({runs[0]['relay']}, {runs[0]['size']}-byte packets)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    return common.save_figure(plt, fig, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="UDP relay ceiling: C recvmmsg relay between a C generator and sink.")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="generator run time per measurement (default: %(default)s)")
    p.add_argument("--rates", default="0",
                   help="offered packets/s, comma-separated; 0 sends flat out "
                        "(default: %(default)s)")
    p.add_argument("--size", type=int, default=172,
                   help="datagram size: 12-byte RTP header + 20 ms G.711 = 172 "
                        "(default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measurements per rate; medians are reported (default: %(default)s)")
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
    total = len(args.rate_list) * args.repeat
    progress = Progress(total=total * args.seconds)
    try:
        for name in ("relay", "gen", "sink"):
            common.build_baseline(name)
        done = 0
        for rate in args.rate_list:
            for rep in range(args.repeat):
                base = done * args.seconds
                label = f"{rate or 'max'} pps #{rep + 1}"

                def tick(elapsed: float, base: float = base, label: str = label) -> None:
                    progress.show(base + min(elapsed, args.seconds), label)

                with tempfile.TemporaryDirectory(prefix="baton-crelay-") as tmp:
                    run = common.run_gen_sink(CRelay(Path(tmp)), args.seconds, rate,
                                              args.size, tick=tick)
                run["rep"] = rep
                runs.append(run)
                done += 1
                progress.note(f"relay {label}: sent {run['sent_pps']} pps, relayed "
                              f"{run['relay_pps']} pps, delivered {run['delivered_pps']} pps, "
                              f"loss {run['loss_pct']} %, {run['relay_cpu_ns_per_pkt']} ns "
                              f"CPU/packet")
        progress.close()
    except KeyboardInterrupt:
        errors.append("interrupted")
        sys.stderr.write("\nudp_relay_ceiling: interrupted\n")
    except BenchError as exc:
        errors.append(str(exc))
        sys.stderr.write(f"udp_relay_ceiling: {exc}\n")

    keys = ("sent_pps", "relay_pps", "delivered_pps", "loss_pct", "relay_cpu_ns_per_pkt")
    by_rate: dict[str, dict[str, Any]] = {}
    for rate in args.rate_list:
        rows = [r for r in runs if r["rate_pps"] == (rate or "max")]
        if rows:
            by_rate[str(rate or "max")] = {
                k: common.summarize([float(r[k]) for r in rows if r.get(k) is not None])
                for k in keys}
    # The headline is the flat-out run when there is one: that is the ceiling.
    head_rate = "max" if "max" in by_rate else (list(by_rate)[-1] if by_rate else None)
    head = by_rate.get(head_rate, {}) if head_rate else {}
    result: dict[str, Any] = {
        "bench": "udp_relay_ceiling",
        "relay": CRelay.name,
        "seconds": args.seconds,
        "size": args.size,
        "rate_pps": head_rate,
        "repeat": args.repeat,
        **{k: (head[k]["median"] if head.get(k) else None) for k in keys},
        "by_rate": by_rate,
        "runs": runs,
        "errors": errors,
    }
    common.report("udp_relay_ceiling", result, args, started, argv,
                  lambda png: plot(runs, png))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
