"""Texts and vendor processes: a conversation moves from a bot module to a vendor's
module over gRPC and back, the vendor receives the texts (`TextReceived`) and sends
its own (`SendMessage`, `MessageStatus`), and its payout has a line for them."""
from __future__ import annotations

import pytest

from engine.accounting.accountant import Accountant
from engine.accounting.invoices import invoice, payouts
from tests.helpers import UdpClient, period_now, running_engine
from tests.test_messaging import answer, message, next_request
from tests.vendor_procs.harness import (SECRET_B, control_config, spawn_vendor, stop,
                                        wait_attached, wait_until)


def desk_config() -> dict:
    raw = control_config()
    raw["vendors"]["globex"]["revenue_share"] = "0.7"
    raw["accounts"]["demo"]["numbers"]["2000"] = {"messaging": "texts"}
    raw["apps"] = {"texts": {"start": "bot", "nodes": {
        "bot": {"module": "baton.bot",
                "params": {"reply": "bot heard: {Body}", "keywords": {"AGENT": "agent"}},
                "outlets": {"agent": "desk"}},
        "desk": {"module": "globex.desk", "outlets": {"back": "bot"}},
    }}}
    raw["plans"] = {"desk-text": {"price": "0.05", "unit": "action"}}
    raw["accounts"]["demo"]["billing"] = {"plans": {"globex.desk:message_out": "desk-text"}}
    return raw


async def exchange(c: UdpClient, text: str) -> str:
    """Text 2000, expect the 202, and return the reply (answered 200)."""
    c.send(message(c, text.encode()))
    await c.expect(202, timeout=5)
    req = await next_request(c, timeout=10)
    answer(c, req)
    return req.body.decode()


async def test_conversation_moves_from_bot_to_vendor_module_and_back():
    raw = desk_config()
    async with running_engine(raw) as eng:
        proc = spawn_vendor("texts.py", eng, "globex.desk", SECRET_B)
        try:
            await wait_attached(eng, "globex.desk", proc=proc)
            c = UdpClient("127.0.0.1", eng.sip_port)
            replies = [await exchange(c, t) for t in ("hello", "AGENT", "need help")]
            # The text that moved the conversation reaches the vendor after its Take.
            assert replies == ["bot heard: hello", "desk heard: AGENT", "desk heard: need help"]
            # BOT: the vendor releases through `back`; the bot has the next text.
            c.send(message(c, b"BOT"))
            await c.expect(202)
            s = next(s for s in eng.sessions.values() if s.kind == "messaging")
            assert await wait_until(lambda: s.module.code == "baton.bot")
            assert await exchange(c, "again") == "bot heard: again"
            c.close()
            (s,) = [s for s in eng.sessions.values() if s.kind == "messaging"]
            assert [(h.module, h.reason) for h in s.history] == [
                ("baton.bot", "initial"), ("globex.desk", "outlet:agent"),
                ("baton.bot", "outlet:back")]
            out = [m for m in eng.messaging.messages.values()
                   if m.direction == "outbound" and m.module == "globex.desk"]
            assert [m.body for m in out] == ["desk heard: AGENT", "desk heard: need help"]
            assert await wait_until(lambda: all(m.status == "delivered" for m in out))
            data_dir = eng.cfg.data_dir
        finally:
            output = stop(proc)
    assert output.count("STATUS ") == 2 and "delivered 200" in output, output
    assert "TEXT" in output and "RELEASED" in output, output
    with Accountant(data_dir, raw) as acct:
        acct.drain()
        period = period_now()
        inv = invoice(acct.ledger, "demo", period)
        rep = payouts(acct.ledger, period, "globex")
    lines = {(ln["module"], ln["item"]): ln for ln in inv["lines"]}
    assert (lines["globex.desk", "message_out"]["quantity"],
            lines["globex.desk", "message_out"]["amount"]) == ("2", "0.10")
    assert ("globex.desk", "time") in lines
    (st,) = rep["statements"]
    texts = [ln for ln in st["lines"] if ln["item"] == "message_out"]
    assert [(ln["module"], ln["gross"], ln["payout"]) for ln in texts] == \
        [("globex.desk", "0.10", "0.07")]
    assert any(ln["item"] == "time" for ln in st["lines"])


async def test_send_message_is_checked_like_a_dial():
    from control.sdk import InvalidArgument, PermissionDenied
    from tests.vendor_procs.harness import taking_client

    raw = desk_config()
    async with running_engine(raw) as eng:
        client, calls = await taking_client(eng, "globex.desk", SECRET_B)
        try:
            c = UdpClient("127.0.0.1", eng.sip_port)
            await exchange(c, "hi")
            c.send(message(c, b"AGENT"))
            await c.expect(202)
            assert await wait_until(lambda: calls)
            call = calls[0]
            with pytest.raises(PermissionDenied):
                await call.send_message("premium", to="+19005550100")
            with pytest.raises(InvalidArgument):
                await call.send_message("")
            with pytest.raises(InvalidArgument):
                await call.send_message("x", from_="a\r\nVia: evil")
            ack = await call.send_message("ok")
            assert ack.result["message_sid"].startswith("SM")
            req = await next_request(c)
            assert req.body == b"ok"
            answer(c, req)
            c.close()
        finally:
            await client.close()
