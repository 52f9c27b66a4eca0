"""What a load run tells: the live view, the JSON summary, the per-call CSV, the plots."""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
from pathlib import Path

from engine.load.call import CallRecord

CSV_FIELDS = [f.name for f in dataclasses.fields(CallRecord) if f.name != "path"] + ["loss_pct"]


def percentile(values: list, q: float):
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, max(0, math.ceil(q / 100.0 * len(v)) - 1))], 3)


def _pcts(values: list) -> dict:
    return {f"p{q}": percentile(values, q) for q in (50, 90, 95, 99)} | {
        "max": round(max(values), 3) if values else None}


def summary(gen) -> dict:
    recs: list[CallRecord] = sorted(gen.records, key=lambda r: r.index)
    opts = gen.opts
    codes = collections.Counter(str(r.code or r.error or "none") for r in recs)
    answered = [r for r in recs if r.answered]
    with_media = [r for r in answered if r.rtp_expected > 0]
    expected = sum(r.rtp_expected for r in with_media)
    lost = sum(r.rtp_lost for r in with_media)
    mos = [r.mos for r in answered if r.mos is not None]
    launch = getattr(gen, "launch_end", gen.elapsed) or gen.elapsed
    achieved = gen.started / launch if launch > 0 else 0.0
    wanted = opts.rate
    offered_total = (opts.calls if opts.calls is not None else None)
    held = [r.duration_s - r.planned_s for r in answered
            if r.duration_s is not None and r.ended_by == "local" and "max-call" not in r.path]
    dtmf_sent = sum(len(r.dtmf_sent) for r in answered)
    dtmf_ok = sum(len(r.dtmf_sent) for r in answered if r.dtmf_sent and r.dtmf_sent in r.dtmf_detected)
    ramp_calls = opts.rate * opts.ramp / 2.0
    steady = launch - opts.ramp
    steady_rate = (gen.started - ramp_calls) / steady if steady > 0.5 else achieved
    short = (not gen.interrupted and gen.started > 20 and steady_rate < 0.9 * wanted)
    return {
        "target": gen.request_uri, "transport": gen.transport,
        "scenario": gen.scenario.name,
        "rate": {"offered": wanted, "achieved": round(achieved, 2),
                 "achieved_steady": round(steady_rate, 2),
                 "short_of_offered": short, "ramp_s": opts.ramp},
        "calls": {"planned": offered_total, "started": gen.started, "completed": len(recs),
                  "answered": len(answered),
                  # Answered with no SDP (a signalling-only target): up, but no media.
                  "answered_without_sdp": sum(1 for r in answered if not r.codec),
                  "asr_pct": round(100.0 * len(answered) / len(recs), 2) if recs else None,
                  "codes": dict(sorted(codes.items())),
                  "max_concurrent": max((s[3] for s in gen.samples), default=0),
                  "interrupted": gen.interrupted},
        "pdd_ms": {"t100": _pcts([r.t100 for r in recs if r.t100 is not None]),
                   "t180": _pcts([r.t180 for r in recs if r.t180 is not None]),
                   "t200": _pcts([r.t200 for r in answered if r.t200 is not None])},
        "duration_error_s": _pcts([abs(x) for x in held]),
        "rtp": {"sent": sum(r.rtp_sent for r in answered),
                "received": sum(r.rtp_received for r in answered),
                "expected": expected, "lost": lost,
                "loss_pct": round(100.0 * lost / expected, 3) if expected else None,
                "reordered": sum(r.rtp_reordered for r in answered),
                "duplicate": sum(r.rtp_duplicate for r in answered),
                "jitter_ms": _pcts([r.jitter_ms for r in answered if r.jitter_ms is not None]),
                "delay_ms": _pcts([r.delay_ms for r in answered if r.delay_ms is not None])},
        "audio": dict(collections.Counter(r.audio or "none" for r in answered)),
        "quality": {"mos": _pcts(mos) | {"mean": round(sum(mos) / len(mos), 3) if mos else None},
                    "r_factor_mean": round(sum(r.r_factor for r in answered if r.r_factor is not None)
                                           / len(mos), 2) if mos else None,
                    "mos_histogram": _histogram(mos)},
        "dtmf": {"sent": dtmf_sent, "detected": dtmf_ok,
                 "detected_pct": round(100.0 * dtmf_ok / dtmf_sent, 2) if dtmf_sent else None},
        "echo": {"checked": sum(1 for r in answered if r.echo_correlation is not None),
                 "passed": sum(1 for r in answered if r.delay_ms is not None)},
        "outcomes": dict(collections.Counter(r.outcome for r in answered).most_common(10)),
        # Ticks of the generator's own media clock it ran too late to send: when not 0,
        # the generator (not the target) lost audio, and the media figures say so.
        "generator_late_ticks": gen.media.late_ticks if gen.media is not None else None,
        "calls_with_late_ticks": sum(1 for r in answered if r.late_ticks),
        # A frame that came after the generator's tick was heard as 20 ms of silence (and
        # the stream runs 20 ms later from there): what it recorded slipped.
        "calls_with_slips": sum(1 for r in answered if r.slips),
        "elapsed_s": round(gen.elapsed, 3),
        # Unix time of the run's start: a call's `started` (s) is counted from it.
        "started_unix": round(gen.wall_start, 3),
    }


def _histogram(mos: list) -> dict:
    bins = collections.Counter(f"{math.floor(m * 4) / 4:.2f}" for m in mos)
    return dict(sorted(bins.items()))


def live_line(gen) -> str:
    """One line of the live view: progress, rate, concurrency, failures by code, PDD, MOS."""
    recs = gen.records
    t = gen.elapsed
    rate = gen.achieved_rate
    fails = collections.Counter(str(r.code or r.error or "none") for r in recs if not r.answered)
    pdd = [r.t200 for r in recs[-2000:] if r.t200 is not None]
    mos = [r.mos for r in recs[-2000:] if r.mos is not None]
    total = gen.opts.calls
    progress = (f"{len(recs)}/{total}" if total is not None
                else f"{t:.0f}/{gen.opts.duration:g}s")
    fail_txt = " ".join(f"{c}:{n}" for c, n in fails.most_common(4)) or "-"
    mos_txt = (f"MOS p50 {percentile(mos, 50):.2f} min {min(mos):.2f}" if mos else "MOS -")
    pdd_txt = (f"PDD p50 {percentile(pdd, 50):.0f} p95 {percentile(pdd, 95):.0f} ms"
               if pdd else "PDD -")
    return (f"[{t:6.1f}s] done {progress}  rate {rate:6.1f}/{gen.opts.rate:g} cps  "
            f"up {len(gen.active):4d}  failed {fail_txt}  {pdd_txt}  {mos_txt}")


def write(gen, data: dict, directory: str) -> list[str]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
    with open(out / "calls.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in sorted(gen.records, key=lambda r: r.index):
            # The fields as they are (dataclasses.asdict deep-copies: ~1 ms a call).
            row = {k: getattr(r, k) for k in CSV_FIELDS[:-1]}
            row["loss_pct"] = None if r.loss_pct is None else round(r.loss_pct, 3)
            w.writerow(row)
    written = [str(out / "summary.json"), str(out / "calls.csv")]
    written += plots(gen, out)
    return written


def plots(gen, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = sorted(gen.records, key=lambda r: r.index)
    secs = int(math.ceil(gen.elapsed)) + 1
    started = [0] * secs
    for r in recs:
        started[min(int(r.started), secs - 1)] += 1
    offered = []
    from engine.load.generator import due_time

    n_total = gen.started
    counts = [0] * secs
    for i in range(n_total):
        counts[min(int(due_time(i, gen.opts.rate, gen.opts.ramp)), secs - 1)] += 1
    offered = counts
    fig, axes = plt.subplots(3, 2, figsize=(12, 10))
    ax = axes[0][0]
    ax.plot(range(secs), offered, label="offered")
    ax.plot(range(secs), started, label="achieved")
    ax.set_title("call rate (calls/s)")
    ax.set_xlabel("s")
    ax.legend()
    ax = axes[0][1]
    ax.plot([s[0] for s in gen.samples], [s[3] for s in gen.samples])
    ax.set_title("concurrent calls")
    ax.set_xlabel("s")
    ax = axes[1][0]
    by_sec = collections.defaultdict(list)
    for r in recs:
        if r.t200 is not None:
            by_sec[int(r.started)].append(r.t200)
    xs = sorted(by_sec)
    for q in (50, 95, 99):
        ax.plot(xs, [percentile(by_sec[x], q) for x in xs], label=f"p{q}")
    ax.set_title("time to 200 (ms) by second of the INVITE")
    ax.set_xlabel("s")
    ax.legend()
    ax = axes[1][1]
    mos = [r.mos for r in recs if r.mos is not None]
    ax.hist(mos, bins=[1 + i * 0.1 for i in range(36)])
    ax.set_title("MOS (E-model) per call")
    ax = axes[2][0]
    loss = collections.defaultdict(lambda: [0, 0])
    for r in recs:
        if r.rtp_expected and r.duration_s is not None:
            sec = int(r.started + (r.t200 or 0) / 1000 + r.duration_s)
            loss[sec][0] += r.rtp_lost
            loss[sec][1] += r.rtp_expected
    xs = sorted(loss)
    ax.plot(xs, [100.0 * loss[x][0] / loss[x][1] for x in xs], marker=".")
    ax.set_title("RTP loss (%) of calls ending each second")
    ax.set_xlabel("s")
    ax = axes[2][1]
    codes = collections.Counter(str(r.code or r.error or "none") for r in recs)
    ax.bar(list(codes), list(codes.values()))
    ax.set_title("final responses")
    fig.tight_layout()
    path = out / "load.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [str(path)]
