"""From a real call to an invoice: engine -> ring -> accountant (child process) -> ledger -> bill."""
from __future__ import annotations

import json
import os
import subprocess
import time

from tests.helpers import BATON, BlockingPeer, DEMO, EngineProcess, period_now


def run(*args, timeout=60):
    return subprocess.run([BATON, *args], capture_output=True, text=True, timeout=timeout)


def call(eng, number, seconds):
    peer = BlockingPeer(eng, timeout=5)
    c = peer.answered_call(number)
    time.sleep(seconds)
    peer.hang_up(c)
    peer.close()


def test_calls_end_up_on_one_invoice():
    eng = EngineProcess(DEMO)
    with eng:
        call(eng, "1000", 1.2)   # hold: basic level
        call(eng, "1002", 1.5)   # bridge to the engine's own echo: two sessions
        assert eng.stop(timeout=20) == 0
    assert "Traceback" not in eng.output()
    log = os.path.join(eng.data_dir, "accountant.log")
    assert os.path.exists(log), "serve starts the accountant"
    period = period_now()
    r = run("bill", "invoice", "--account", "demo", "--period", period, "--format", "json",
            "--data-dir", eng.data_dir, "--config", DEMO)
    assert r.returncode == 0, r.stderr + open(log).read()
    inv = json.loads(r.stdout)
    lines = {ln["module"]: ln for ln in inv["lines"]}
    assert {"baton.hold", "baton.bridge", "baton.echo"} <= set(lines), inv
    # Whole seconds at $0.001/min: 1.2 s of hold -> 2 s billed (1/1 increments round up).
    hold = lines["baton.hold"]
    assert hold["plan"] == "bridge-basic" and hold["amount_micro"] > 0
    total = sum(ln["amount_micro"] for ln in inv["lines"])
    assert inv["total_micro"] == total
    r = run("bill", "invoice", "--account", "demo", "--period", period, "--format", "table",
            "--data-dir", eng.data_dir, "--config", DEMO)
    assert "TOTAL" in r.stdout and "baton.bridge" in r.stdout
