"""`baton demo` end to end, as a newcomer runs it: a subprocess that starts an
engine, its accountant and the example vendors, calls the tour app with PJSIP
and prints the sessions' history, the invoice and the vendor payouts."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from engine.cli import call as caller
from tests.helpers import BATON, ROOT, period_now

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(caller.pj is None, reason="pjsua2 is not installed"),
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"),
]


def _amount(line: str) -> float:
    """The last number of a table row (amounts are printed as decimals)."""
    return float(line.split()[-1])


def test_demo_tour_end_to_end(tmp_path):
    data = tmp_path / "data"
    try:
        p = subprocess.run([BATON, "demo", "--calls", "1", "--data-dir", str(data)], cwd=ROOT,
                           capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"baton demo hung:\n{exc.stdout}\n{exc.stderr}")
    out = p.stdout
    report = f"exit {p.returncode}\nstdout:\n{out}\nstderr:\n{p.stderr}"
    assert p.returncode == 0, report
    assert "Traceback" not in out + p.stderr, report

    # Progress as it went: the engine, the vendor processes, the call through the app.
    assert "engine up: SIP 127.0.0.1:" in out, report
    assert "attached acme.lookup over gRPC" in out, report
    assert "DTMF sent: 1 (RFC 4733)" in out, report
    assert "hung up by the far end" in out, report
    # The stream's counters are kept when the far end's BYE takes the stream away.
    m = re.search(r"media: (\d+) RTP packets sent, (\d+) received", out)
    assert m and int(m[1]) > 50 and int(m[2]) > 50, report
    assert re.search(r"engine stopped \(exit 0\)", out), report
    # One step through the REST API: the tour's call as the twilio client would read it.
    assert re.search(r"GET /2010-04-01/Accounts/AC\w+/Calls/S\w+\.json: status completed, "
                     r".* History\.json: baton\.menu -> acme\.lookup -> baton\.bridge", out), report

    # Each session's module history: the tour's whole chain, and the echo leg.
    hist = out.split("module history", 1)[1].split("== the consolidated invoice", 1)[0]
    tour = re.search(r"^session (\S+) .* to sip:4000@.*$", hist, re.M)
    assert tour, report
    rows = re.findall(r"^\d+\s+(\S+)\s+\S+\s+(\S+)\s+[\d.]+$", hist, re.M)
    modules = [m for m, _ in rows]
    survey = next(m for m in modules if m.endswith(".survey"))
    assert modules[:5] == ["baton.menu", "acme.lookup", "baton.bridge", survey, "baton.play"], \
        hist
    assert ("baton.echo", "initial") in rows, hist

    # The invoice: lines per module and a non-zero total.
    invoice = out.split("== the consolidated invoice", 1)[1].split("== the vendor payouts", 1)[0]
    assert "Invoice  account demo" in invoice, invoice
    for module in ("baton.menu", "acme.lookup", "baton.bridge"):
        assert module in invoice, invoice
    total = next(ln for ln in invoice.splitlines() if "TOTAL" in ln)
    assert _amount(total) > 0, invoice

    # The vendor's payout for the time its modules held the call.
    payouts = out.split("== the vendor payouts", 1)[1]
    assert "Payout  vendor acme" in payouts, payouts
    assert re.search(r"^acme\.lookup\s", payouts, re.M), payouts
    total = next(ln for ln in payouts.splitlines() if ln.startswith("TOTAL"))
    assert _amount(total) > 0, payouts

    # Every process it started logged no traceback.
    for log in ("engine.log", "accountant.log", "vendor-acme.lookup.log"):
        with open(data / log, errors="replace") as f:
            text = f.read()
        assert "Traceback" not in text, f"{log}:\n{text[-4000:]}"

    # The same from the ledger it left behind, as `baton bill` reads it.
    period = period_now()
    config = os.path.join(ROOT, "examples", "demo.toml")
    b = subprocess.run([BATON, "bill", "payouts", "--period", period, "--vendor", "acme",
                        "--format", "json", "--data-dir", str(data), "--config", config],
                       capture_output=True, text=True, timeout=30)
    assert b.returncode == 0, b.stderr
    statement = json.loads(b.stdout)["statements"][0]
    assert "acme.lookup" in [ln["module"] for ln in statement["lines"]], statement
    assert statement["total_micro"] > 0, statement
