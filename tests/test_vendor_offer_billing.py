"""An offer is not control: a vendor module is metered from its Take.

A real `baton` engine, a real vendor process over gRPC (tests/vendor_procs/
basic.py) that never answers, declines, or takes after a wait, a SIP caller,
then the ring drained by the accountant into a SQLite ledger: the invoice and
the vendor's payout statement hold the module's time from the Take only.
"""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from tests.vendor_procs.harness import (SECRET_A, control_config, spawn_vendor, stop,  # noqa: E402
                                        wait_attached, with_app)

from engine.accounting.accountant import Accountant  # noqa: E402
from engine.accounting.invoices import invoice, payouts  # noqa: E402
from tests.helpers import period_now, running_engine  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402

# 2,000 µUSD a second of acme.survey, 60 % of it the vendor's; the fallback is free.
PRICE_PER_S = 2_000


def billed_config() -> dict:
    raw = with_app(control_config(), "fb", "4200", {
        "v": {"module": "acme.survey", "outlets": {"fallback": "hold", "done": "hold"}},
        "hold": {"module": "baton.hold"}}, "v")
    raw["plans"] = {"survey": {"price": "0.12", "unit": "minute", "increment": "1/1"}}
    raw["vendors"]["acme"].update(revenue_share=0.6, plans={"acme.survey": "survey"})
    return raw


async def call_through(mode: str, *args: str, hold: float = 0.5):
    """One call to 4200 with the vendor process in `mode`; the data directory,
    the config and the session's summary once the engine stopped."""
    raw = billed_config()
    async with running_engine(raw) as eng:
        proc = spawn_vendor("basic.py", eng, "acme.survey", SECRET_A, "--mode", mode, *args)
        try:
            await wait_attached(eng, "acme.survey", proc=proc)
            caller = Caller(eng, "4200")
            await caller.dial()
            await caller.talk(hold)
            session = next(iter(eng.sessions.values()))
            await caller.bye()
            caller.close()
            summary = session.summary()
        finally:
            out = stop(proc)
    assert "Traceback" not in out, out
    return raw["engine"]["data_dir"], raw, summary


def ledger_of(data_dir: str, raw: dict) -> dict:
    """The demo account's invoice, the payouts, the acme.survey time lines'
    (quantity s, metered ns) and the stamped vendor actions, after a drain."""
    period = period_now()
    with Accountant(data_dir, raw) as acct:
        acct.drain()
        assert acct.ledger.check() == []
        inv = invoice(acct.ledger, "demo", period)
        pay = payouts(acct.ledger, period, "acme")
    db = sqlite3.connect(f"{data_dir}/accounting/ledger.db")
    try:
        rows = db.execute("SELECT c.item, t.quantity, t.usage, t.amount, t.vendor_amount "
                          "FROM txns t JOIN classes c ON c.id = t.class_id "
                          "WHERE c.module = 'acme.survey'").fetchall()
    finally:
        db.close()
    return {"invoice": inv, "payouts": pay, "rows": rows}


def survey_amount(got: dict) -> int:
    return sum(ln["amount_micro"] for ln in got["invoice"]["lines"]
               if ln["module"] == "acme.survey" and ln["item"] == "time")


@pytest.mark.parametrize("mode,why", [("silent", "offer-expired"), ("decline", "declined")])
async def test_an_offer_nobody_took_costs_nothing_and_pays_nothing(mode, why):
    data_dir, raw, summary = await call_through(mode)
    # The history still records the offer, and why it ended.
    hist = [(h["module"], h["reason"], h["end_reason"]) for h in summary["history"]]
    assert hist[0] == ("acme.survey", "initial", f"fallback:{why}"), hist
    assert hist[1][:2] == ("baton.hold", f"fallback:{why}")
    got = ledger_of(data_dir, raw)
    # No time of acme.survey is billed: not to the customer, not to the vendor.
    assert survey_amount(got) == 0, got["invoice"]
    assert [r for r in got["rows"] if r[0] == "time" and (r[3] or r[4])] == [], got["rows"]
    assert got["payouts"]["total_micro"] == 0, got["payouts"]


async def test_a_vendor_that_takes_late_is_metered_from_its_take():
    data_dir, raw, _ = await call_through("hold", "--take-after", "0.6", hold=1.2)
    got = ledger_of(data_dir, raw)
    time_rows = [r for r in got["rows"] if r[0] == "time"]
    actions = {r[0]: r[1] for r in got["rows"] if r[0] != "time"}
    # The engine stamped how long the offer waited and how long the vendor held control.
    wait_ms, control_ms = actions["vendor_offer_wait_ms"], actions["vendor_control_ms"]
    assert wait_ms >= 500, actions
    # One time line, its metered time the vendor's control time (from Take), not the wait.
    assert len(time_rows) == 1, got["rows"]
    _, seconds, ns, amount, vendor_amount = time_rows[0]
    assert abs(ns / 1e6 - control_ms) < 100, (ns, control_ms, wait_ms)
    assert seconds == -(-ns // 1_000_000_000)
    assert amount == seconds * PRICE_PER_S == survey_amount(got)
    assert vendor_amount == amount * 6 // 10 == got["payouts"]["total_micro"]
