"""Crash test: the accountant is SIGKILLed at random moments while it drains a
ring (and its overflow); after restarts the ledger equals, to the micro-unit,
an independent computation from the known stamps: nothing lost, nothing doubled."""
from __future__ import annotations

import heapq
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from fractions import Fraction
from math import ceil, floor

import pytest

from ext.kernels import ring
from engine.accounting.ledger_sqlite import SqliteLedger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 1_000_000_000
WALL0 = 1_793_491_200 * S          # 2026-11-01T00:00:00Z

CONFIG = """
[plans.bridge]
price = "0.001"
unit = "minute"
increment = "60/60"
connect_fee = "0.0005"

[plans.menu]
price = "0.01"
unit = "minute"
increment = "6/6"

[plans.survey]
kind = "graduated"
tier_scope = "session"
unit = "minute"
tiers = [{{ up_to = 120, price = "0.05" }}, {{ price = "0.02" }}]

[plans.msg]
price = "0.0075"
unit = "action"

[billing]
level_plans = {{ basic = "bridge", application = "menu" }}
action_plans = {{ message = "msg" }}
batch_records = 50
batch_ms = 20
pipeline = {pipeline}

[vendors.acme]
revenue_share = "0.7"
modules = ["acme.survey"]
plans = {{ "acme.survey" = "survey" }}
"""

MODULES = [("baton.bridge", "basic"), ("baton.menu", "application"), ("acme.survey", "service")]


def generate(rng: random.Random, sessions: int) -> list[tuple]:
    """Stamps of many interleaved calls in time order: ("start"|"end", sid, acc, t),
    ("go", sid, acc, from, to, level, t), ("act", sid, acc, module, count)."""
    heap: list[tuple[int, int, str]] = []
    plans: dict[str, list[tuple]] = {}
    for i in range(sessions):
        sid = f"C{i:05d}"
        acc = f"acct{rng.randrange(7)}"
        t = rng.randrange(0, 3600 * S)
        steps: list[tuple] = [("start",)]
        frm = ""
        for _ in range(rng.randint(1, 5)):
            mod, level = rng.choice(MODULES)
            steps.append(("go", frm, mod, level, rng.choice((0, rng.randrange(1, 400 * S)))))
            frm = mod
            if rng.random() < 0.3:
                steps.append(("act", mod, rng.randint(1, 3)))
        if rng.random() < 0.85:
            steps.append(("end", rng.randrange(0, 300 * S)))
        plans[sid] = [acc, steps]
        heapq.heappush(heap, (t, i, sid))
    out: list[tuple] = []
    seq = 0
    while heap:
        t, _, sid = heapq.heappop(heap)
        acc, steps = plans[sid]
        step = steps.pop(0)
        seq += 1
        if step[0] == "start":
            out.append(("start", sid, acc, t))
        elif step[0] == "go":
            out.append(("go", sid, acc, step[1], step[2], step[3], t))
        elif step[0] == "act":
            out.append(("act", sid, acc, step[1], step[2]))
        else:
            out.append(("end", sid, acc, t))
        if steps:
            nxt = steps[0]
            dt = nxt[4] if nxt[0] == "go" else nxt[1] if nxt[0] == "end" else 0
            heapq.heappush(heap, (t + dt, seq + sessions, sid))
    return out


def _half_up(x: Fraction) -> int:
    return floor(x + Fraction(1, 2))


def expected_ledger(stamps: list[tuple]) -> dict[str, tuple[int, int]]:
    """key -> (amount, vendor part), computed straight from the plans above."""
    out: dict[str, tuple[int, int]] = {}
    open_: dict[str, list] = {}   # sid -> [module, seg_start, survey seconds so far]

    def rate(module: str, ns: int, sess: list) -> tuple[int, int]:
        if module == "baton.bridge":
            billed = 0 if ns == 0 else 60 if ns <= 60 * S else 60 + ceil((ns - 60 * S) / (60 * S)) * 60
            return _half_up(Fraction(billed * 1000, 60)) + 500, 0
        if module == "baton.menu":
            billed = 0 if ns == 0 else 6 if ns <= 6 * S else 6 + ceil((ns - 6 * S) / (6 * S)) * 6
            return _half_up(Fraction(billed * 10000, 60)), 0
        billed = ceil(ns / S)
        prior = sess[2]
        low = max(0, min(prior + billed, 120) - prior)
        amount = _half_up(Fraction(low * 50000, 60) + Fraction((billed - low) * 20000, 60))
        sess[2] += billed
        return amount, _half_up(Fraction(amount * 7, 10))

    for seq, st in enumerate(stamps, 1):
        kind, sid = st[0], st[1]
        if kind == "start":
            open_[sid] = ["", st[3], 0]
        elif kind == "go":
            sess = open_[sid]
            t = st[6]
            if sess[0]:
                out[f"n1:{seq}"] = rate(sess[0], t - sess[1], sess)
                sess[1] = t
            sess[0] = st[4]
        elif kind == "act":
            amount = 7500 * st[4]
            vendor = _half_up(Fraction(amount * 7, 10)) if st[3] == "acme.survey" else 0
            out[f"n1:{seq}"] = (amount, vendor)
        else:
            sess = open_.pop(sid)
            if sess[0]:
                out[f"n1:{seq}"] = rate(sess[0], st[3] - sess[1], sess)
    return out


def _position(db: str) -> int:
    if not os.path.exists(db):
        return 0
    conn = sqlite3.connect(db, timeout=10)
    try:
        row = conn.execute("SELECT seq FROM positions WHERE node = 'n1'").fetchone()
    except sqlite3.OperationalError:
        row = None
    finally:
        conn.close()
    return row[0] if row else 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pipeline", ["false", "true"])
def test_sigkill_at_random_moments_loses_and_doubles_nothing(tmp_path, pipeline):
    rng = random.Random(20261126)
    stamps = generate(rng, 2400)
    data = tmp_path / "data"
    cfg = tmp_path / "baton.toml"
    cfg.write_text(CONFIG.format(pipeline=pipeline))
    db = str(data / "accounting" / "ledger.db")
    # A small ring, so bursts spill into the overflow file.
    w = ring.RingWriter(str(data / "ring" / "ring.dat"), slots=512, slot_size=256, node_id="n1")
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "engine.accounting.accountant", "--data-dir", str(data),
           "--config", str(cfg), "--log-level", "error"]

    def write(part: list[tuple]) -> None:
        for st in part:
            if st[0] in ("start", "end"):
                seq = w.stamp_session(st[0], st[1], st[2], st[3], WALL0 + st[3])
            elif st[0] == "go":
                seq = w.stamp_transition(st[1], st[2], st[3], st[4], st[5], "r", st[6],
                                         WALL0 + st[6])
            else:
                seq = w.stamp_action(st[1], st[2], st[3], "message", st[4])
            assert seq == write.n + 1
            write.n = seq
    write.n = 0

    chunks = 8
    size = -(-len(stamps) // chunks)
    parts = [stamps[i:i + size] for i in range(0, len(stamps), size)]
    interrupted = 0
    # The process needs a moment to start (longer on a loaded machine); the kill lands
    # before, during or after its drain. The delay is drawn between the longest one
    # that found nothing drained yet and the shortest one that found all drained, so
    # the kills close in on the drain, however slow the start or quick the drain.
    early, late = 0.05, 0.6
    for part in parts[:-1]:
        write(part)
        for _attempt in range(4):
            before = _position(db)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
            delay = rng.uniform(early, late)
            if rng.random() < 0.5:
                time.sleep(delay)
            else:
                # Or kill the moment a commit shows, whatever the machine's speed: the
                # drain is then surely under way.
                until = time.monotonic() + late + 1.0
                while time.monotonic() < until and _position(db) == before:
                    time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            after = _position(db)
            if before < after < write.n:
                interrupted += 1
                break
            if after == before:        # killed before it drained anything: wait longer
                early = delay
                late = max(late, early + 0.2)
            else:                      # it drained everything first: kill sooner
                late = delay
                early = min(early, max(0.02, late - 0.2))
                break
    write(parts[-1])
    assert w.spilled > 0, "the test should exercise the overflow file"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while _position(db) < write.n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _position(db) == write.n
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    w.close()

    want = expected_ledger(stamps)
    led = SqliteLedger(db)
    try:
        got = {t["key"]: (t["amount"], t["vendor_amount"]) for t in led.transactions()}
        assert led.check() == []
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        assert not missing and not extra, (missing, extra)
        wrong = [(k, got[k], want[k]) for k in want if got[k] != want[k]][:5]
        assert not wrong
        assert sum(a for a, _ in got.values()) == sum(a for a, _ in want.values())
        assert led.count() == len(want)
    finally:
        led.close()
    # Most kills should land while there was work in flight.
    print(f"kills: {chunks - 1}, interrupted mid-drain: {interrupted}, records: {write.n}")
    assert interrupted >= 1
