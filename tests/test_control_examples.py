"""The example vendor programs (examples/vendors/) as separate processes,
driven by a caller pressing keys over RTP (RFC 4733)."""
from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from tests.vendor_procs.harness import (SECRET_A, control_config, spawn_vendor, stop,  # noqa: E402
                                        wait_attached, wait_until, with_app)

from tests.helpers import ROOT, running_engine  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402

EXAMPLES = os.path.join(ROOT, "examples", "vendors")
SILENCE = (b"\xff" * 160, b"\x7f" * 160)


async def until_speech(caller: Caller, timeout: float = 5.0) -> None:
    """Talk (silence) until the caller hears something that is not silence."""
    mark = len(caller.received)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await caller.talk(0.02)
        if any(p[12:] not in SILENCE for p in caller.received[mark:]):
            return
    raise AssertionError("no prompt was heard")


async def until_module(caller: Caller, session, code: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while session.module.code != code and time.monotonic() < deadline:
        await caller.talk(0.02)
    assert session.module.code == code, [(h.module, h.reason) for h in session.history]


async def test_survey_example_asks_collects_and_releases():
    raw = with_app(control_config(), "post", "4600", {
        "survey": {"module": "acme.survey", "outlets": {"done": "hold", "fallback": "hold"}},
        "hold": {"module": "baton.hold"}}, "survey")
    async with running_engine(raw) as eng:
        proc = spawn_vendor(os.path.join(EXAMPLES, "survey.py"), eng, "acme.survey", SECRET_A,
                            "--timeout", "3")
        try:
            await wait_attached(eng, "acme.survey", proc=proc)
            caller = Caller(eng, "4600")
            await caller.dial()
            session = next(iter(eng.sessions.values()))
            await until_speech(caller)
            await caller.press(4)                 # satisfaction: 4 (barging in)
            await caller.talk(0.3)
            await until_speech(caller)
            await caller.press(7)                 # not a valid answer: asked again
            await caller.talk(0.3)
            await until_speech(caller)
            await caller.press(1)                 # recommend: yes
            await until_module(caller, session, "baton.hold")
            assert [(h.module, h.reason) for h in session.history] == [
                ("acme.survey", "initial"), ("baton.hold", "outlet:done")]
            assert session.params["survey.satisfaction"] == "4"
            assert session.params["survey.recommend"] == "1"
            assert session.control.params["survey_recommend"] == "1"
            await caller.bye()
            caller.close()
        finally:
            out = stop(proc)
        record = json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))
        assert record["answers"] == {"satisfaction": "4", "recommend": "1"}, out
        assert record["caller"] == "tester" and record["session"] == session.id


async def test_lookup_example_says_the_balance_or_passes_to_an_agent():
    raw = with_app(control_config(), "bal", "4700", {
        "lookup": {"module": "acme.lookup",
                   "outlets": {"done": "hold", "agent": "agent", "fallback": "hold"}},
        "agent": {"module": "baton.echo"},
        "hold": {"module": "baton.hold"}}, "lookup")
    async with running_engine(raw) as eng:
        proc = spawn_vendor(os.path.join(EXAMPLES, "lookup.py"), eng, "acme.lookup", SECRET_A,
                            "--timeout", "3")
        try:
            await wait_attached(eng, "acme.lookup", proc=proc)
            first, second = Caller(eng, "4700"), Caller(eng, "4700")
            await first.dial()
            s1 = next(iter(eng.sessions.values()))
            await second.dial()
            s2 = next(s for s in eng.sessions.values() if s is not s1)
            await asyncio.gather(until_speech(first), until_speech(second))
            await asyncio.gather(first.press(1), second.press(2))
            await asyncio.gather(until_module(first, s1, "baton.hold"),
                                 until_module(second, s2, "baton.echo"))
            assert s1.params["balance"] == 42.5
            assert s1.control.params["lookup"] == "balance"
            assert [(h.module, h.reason) for h in s2.history] == [
                ("acme.lookup", "initial"), ("baton.echo", "outlet:agent")]
            for c in (first, second):
                await c.bye()
                c.close()
            await wait_until(lambda: not eng.sessions)
        finally:
            out = stop(proc)
        assert f"{s1.id} tester 42.50" in out, out
