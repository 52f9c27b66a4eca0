"""Texts metered and billed end to end: a real engine writes the ring, the accountant
prices message actions with the account's plans, and the invoice shows message lines
beside call lines (a 500-text bundle with overage, a text sent from a voice call)."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from engine.accounting.accountant import Accountant  # noqa: E402
from engine.accounting.invoices import invoice  # noqa: E402
from tests.helpers import UdpClient, period_now  # noqa: E402
from tests.test_messaging import answer, message, text_config  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402
from tests.twiml_apps import AppServer, instructions_engine  # noqa: E402

VOICE = ('<Response><Play digits="1"/><Message>Thanks for calling</Message>'
         '<Sms statusCallback="/status">Your code is 4711</Sms>'
         '<Pause length="1"/><Hangup/></Response>')


def billing(raw: dict) -> dict:
    raw["plans"] = {
        "app-time": {"price": "0.01", "unit": "minute"},
        # The seed's "500 messages a month", then 0.01 each.
        "sms-500": {"kind": "subscription", "unit": "action", "fee": "5.00", "cap": 500,
                    "at_cap": "overage", "overage_price": "0.01"},
        "sms-out": {"price": "0.004", "unit": "action"},
        "voice-sms": {"price": "0.02", "unit": "action"},
    }
    raw["billing"] = {"level_plans": {"application": "app-time"}}
    raw["accounts"]["demo"]["billing"] = {"plans": {
        "baton.bot:message_in": "sms-500", "baton.bot:message_out_segments": "sms-out",
        "baton.instructions:message_out": "voice-sms"}}
    return raw


async def requests_of(c: UdpClient, method: str, n: int, timeout: float = 5.0) -> list:
    """The next `n` requests of `method` the engine sends `c`, each answered 200."""
    got = []
    while len(got) < n:
        m = await c.recv(timeout)
        if m.is_request and m.method == method:
            answer(c, m)
            got.append(m)
    return got


async def texts(c: UdpClient, n: int, batch: int = 20) -> None:
    """`n` texts from alice to 2000, each answered 202 and replied to by the bot."""
    for start in range(0, n, batch):
        k = min(batch, n - start)
        for i in range(start, start + k):
            # The first is long: the bot's reply to it takes two segments.
            c.send(message(c, ("x" * 200 if i == 0 else f"text {i}").encode()))
        accepted = replies = 0
        while accepted < k or replies < k:
            m = await c.recv(5.0)
            if m.is_request and m.method == "MESSAGE":
                answer(c, m)
                replies += 1
            elif not m.is_request and m.status == 202:
                accepted += 1


async def test_invoice_shows_texts_beside_calls_and_the_bundle_overage():
    app = AppServer()
    app.twiml("/voice", VOICE)
    app.route("/status", lambda _p, _r: "")
    await app.start()
    raw = billing(text_config())
    raw["accounts"]["demo"]["numbers"]["4000"] = {"instructions": app.url + "/voice"}
    try:
        async with instructions_engine(raw) as eng:
            # A call whose document texts the caller twice (<Message>, legacy <Sms>).
            caller = Caller(eng, "4000")
            await caller.dial()
            got = await requests_of(caller.c, "MESSAGE", 2)
            assert [m.body.decode() for m in got] == ["Thanks for calling", "Your code is 4711"]
            assert all(m.get("content-type").startswith("text/plain") for m in got)
            (status,) = await app.wait_for("/status")
            assert status.params["MessageStatus"] == "delivered"
            call = next(s for s in eng.sessions.values() if s.kind == "call")
            assert len(call.messages) == 2
            caller.close()
            # 501 texts in one conversation: the 501st is over the bundle.
            c = UdpClient("127.0.0.1", eng.sip_port)
            await texts(c, 501)
            c.close()
            data_dir = eng.cfg.data_dir
            await asyncio.sleep(0.05)
    finally:
        await app.stop()
    with Accountant(data_dir, raw) as acct:
        acct.drain()
        inv = invoice(acct.ledger, "demo", period_now())
        assert acct.ledger.check() == []
    lines = {(ln["module"], ln["item"], ln["unit_price"]): (ln["plan"], ln["quantity"],
                                                            ln["amount"]) for ln in inv["lines"]}
    # The bundle: its fee once, 500 texts included, the 501st at the overage price.
    assert lines["baton.bot", "subscription", "5.00"] == ("sms-500", "1", "5.00")
    assert lines["baton.bot", "message_in", "0.00"] == ("sms-500", "500", "0.00")
    assert lines["baton.bot", "message_in", "0.01"] == ("sms-500", "1", "0.01")
    # Outbound priced apart, per segment: 501 replies, the first in two segments.
    assert lines["baton.bot", "message_out_segments", "0.004"] == ("sms-out", "502", "2.008")
    # The module priced per text inside a voice call, beside that call's time.
    assert lines["baton.instructions", "message_out", "0.02"] == ("voice-sms", "2", "0.04")
    voice = [ln for ln in inv["lines"] if ln["module"] == "baton.instructions"
             and ln["item"] == "time"]
    assert voice and voice[0]["plan"] == "app-time" and voice[0]["amount_micro"] > 0
    assert inv["total_micro"] == sum(ln["amount_micro"] for ln in inv["lines"])
