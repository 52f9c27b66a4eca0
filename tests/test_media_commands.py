"""One media-command layer behind three front-ends: the same gather and the same digits,
asked for by a TwiML document (<Play digits>, <Gather>), by a vendor over gRPC
(`send_digits`, `gather`) and by a service (`baton.survey`, through its prompts),
reach the caller as identical RFC 4733 packets and end with identical results."""
from __future__ import annotations

import asyncio
import struct

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from control.sdk import Say  # noqa: E402
from engine.media.commands import gather as gathering  # noqa: E402
from engine.media.commands.digits import tones  # noqa: E402
from engine.media.commands.urlaudio import PcmCache  # noqa: E402
from ext.dtmf_py import DtmfDetector  # noqa: E402
from tests.test_control_media import vendor_with_calls  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402
from tests.twiml_apps import AppServer, instructions_engine  # noqa: E402
from tests.vendor_procs.harness import control_config, wait_until  # noqa: E402

PROMPT = "Enter your code."
DIGITS = "1#"
KEYS = (4, 2, 11)          # what the caller presses: 4 2 #
NUM_DIGITS, FINISH, TIMEOUT = 5, "#", 3
TELEPHONE_EVENT = 101      # the payload type of the test caller's offer


def rfc4733(received: list) -> list:
    """The caller's received telephone-event packets as (marker, payload type, event,
    end bit, volume, duration, sequence and timestamp relative to the first)."""
    pkts = [p for p in received if p[1] & 0x7F == TELEPHONE_EVENT]
    assert pkts, "no RFC 4733 packets reached the caller"
    _, _, seq0, ts0, _ = struct.unpack("!BBHII", pkts[0][:12])
    out = []
    for p in pkts:
        _, b1, seq, ts, _ = struct.unpack("!BBHII", p[:12])
        event, flags, duration = struct.unpack("!BBH", p[12:16])
        out.append((b1 >> 7, b1 & 0x7F, event, flags >> 7, flags & 0x3F, duration,
                    (seq - seq0) & 0xFFFF, (ts - ts0) & 0xFFFFFFFF))
    return out


def expected_events() -> list:
    """RFC 4733 for "1#", 100 ms keys, 60 ms gaps (docs/architecture.md, Media): per key
    four updates and the end packet three times, all with the key's timestamp; no
    audio packet between them (consecutive sequence numbers)."""
    out = []
    seq = 0
    for n, code in enumerate((1, 11)):
        for dur in (160, 320, 480, 640, 800, 800, 800):
            out.append((int(dur == 160), TELEPHONE_EVENT, code, int(dur == 800), 10, dur,
                        seq, 160 * n))
            seq += 1
    return out


async def listen_until(caller, cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "the caller did not hear what it waited for"
        await caller.talk(0.02)


def heard_prompt_after_events(caller) -> bool:
    """Audio that is not silence after the last telephone-event packet."""
    last = max((i for i, p in enumerate(caller.received) if p[1] & 0x7F == TELEPHONE_EVENT),
               default=None)
    start = 0 if last is None else last + 1
    return any(p[1] & 0x7F == 0 and p[12:] not in (b"\xff" * 160, b"\x7f" * 160)
               for p in caller.received[start:])


def ends(caller) -> int:
    return sum(1 for p in caller.received if p[1] & 0x7F == TELEPHONE_EVENT and p[13] & 0x80)


async def press_keys(caller) -> None:
    for code in KEYS:
        await caller.press(code)
        await caller.talk(0.1)


def config(app_url: str) -> dict:
    raw = control_config()
    numbers = raw["accounts"]["demo"]["numbers"]
    numbers["4100"] = {"instructions": app_url + "/start"}
    numbers["4200"] = {"app": "survey"}
    raw.setdefault("apps", {})["survey"] = {"start": "ask", "nodes": {
        "ask": {"module": "baton.survey", "outlets": {"done": "hold", "incomplete": "hold"},
                "params": {"name": "code", "timeout": TIMEOUT, "questions": [
                    {"id": "code", "say": PROMPT, "max_digits": NUM_DIGITS,
                     "finish_on_key": FINISH}]}},
        "hold": {"module": "baton.hold"}}}
    return raw


@pytest.fixture
def gathers(monkeypatch) -> list:
    """Every gather the layer ended, as (digits, reason, finish key)."""
    seen: list = []
    end = gathering.Gather._end

    def spy(self, reason):
        if not self.done:
            seen.append((self.digits, reason, self.finished_on))
        end(self, reason)

    monkeypatch.setattr(gathering.Gather, "_end", spy)
    return seen


async def test_same_gather_and_digits_through_twiml_vendor_and_service(gathers):
    app = AppServer()
    app.twiml("/start", f"<Response><Play digits='{DIGITS}'/>"
                        f"<Gather numDigits='{NUM_DIGITS}' finishOnKey='{FINISH}' "
                        f"timeout='{TIMEOUT}' action='/got'><Say>{PROMPT}</Say></Gather>"
                        "</Response>")
    app.twiml("/got", "<Response><Pause length='30'/></Response>")
    await app.start()
    results: dict = {}
    packets: dict = {}
    async with instructions_engine(config(app.url)) as eng:
        # 1. TwiML.
        caller = Caller(eng, "4100")
        await caller.dial()
        await listen_until(caller, lambda: ends(caller) == 6)
        await listen_until(caller, lambda: heard_prompt_after_events(caller))
        await press_keys(caller)
        req = (await app.wait_for("/got"))[0]
        results["twiml"] = (req.params["Digits"], req.params["FinishedOnKey"])
        packets["twiml"] = rfc4733(caller.received)
        await caller.bye()
        caller.close()

        # 2. A vendor over gRPC.
        v, calls = await vendor_with_calls(eng)
        caller = Caller(eng, "4000")
        dial = asyncio.ensure_future(caller.dial())
        assert await wait_until(lambda: calls)
        call = calls[0]
        await call.answer()
        await dial
        sent = asyncio.ensure_future(call.send_digits(DIGITS))
        await listen_until(caller, lambda: ends(caller) == 6)
        assert (await sent).result == {"method": "rfc4733", "digits": DIGITS}
        gather = asyncio.ensure_future(call.gather(num_digits=NUM_DIGITS, timeout=TIMEOUT,
                                                   finish_on_key=FINISH, prompt=Say(PROMPT)))
        await listen_until(caller, lambda: heard_prompt_after_events(caller))
        await press_keys(caller)
        got = await asyncio.wait_for(gather, 5)
        results["vendor"] = (got.digits, FINISH if got.reason == "finish-key" else "")
        packets["vendor"] = rfc4733(caller.received)
        await caller.bye()
        caller.close()
        await v.close()

        # 3. A service (baton.survey asks through the services' Prompter).
        caller = Caller(eng, "4200")
        await caller.dial()
        session = next(s for s in eng.sessions.values() if s.module.code == "baton.survey")
        await listen_until(caller, lambda: heard_prompt_after_events(caller))
        await press_keys(caller)
        assert await wait_until(lambda: "SurveyStatus" in session.params, 5)
        assert session.params["SurveyStatus"] == "completed"
        results["service"] = (session.params["SurveyAnswers"]["code"], FINISH)
        await caller.bye()
        caller.close()
    await app.stop()

    assert results == {"twiml": ("42", "#"), "vendor": ("42", "#"), "service": ("42", "#")}
    # One gather implementation ended all three, the same way.
    assert gathers == [("42", gathering.FINISH_KEY, "#")] * 3, gathers
    assert packets["twiml"] == packets["vendor"] == expected_events(), packets


async def test_gather_timeout_and_count_and_the_ignored_leading_finish_key():
    loop = asyncio.get_running_loop()
    done: list = []
    g = gathering.Gather(loop.call_later, num_digits=2, finish_on_key="#", timeout=0.05,
                         on_done=done.append, leading_finish=False)
    g.key("#")                        # the tail of an earlier entry: ignored
    g.key("1")
    g.key("2")
    assert (g.digits, g.reason, done) == ("12", gathering.NUM_DIGITS, [g])
    t = gathering.Gather(loop.call_later, timeout=0.05, on_done=done.append)
    t.key("7")                        # not armed by the key alone: the timeout runs from it
    await asyncio.sleep(0.2)
    assert (t.digits, t.reason) == ("7", gathering.TIMEOUT)
    e = gathering.Gather(loop.call_later, finish_on_key="#", on_done=done.append)
    e.key("#")
    assert (e.digits, e.reason, e.finished_on) == ("", gathering.FINISH_KEY, "#")
    e.key("5")                        # after the end: nothing
    assert len(done) == 3 and e.digits == ""


def test_inband_tones_are_the_q23_pairs_the_detector_hears():
    pcm = tones("1#5w9")
    det = DtmfDetector()
    assert "".join(d for d, _ in det.feed(pcm)) == "1#59"


def test_pcm_cache_is_lru_bounded_by_bytes():
    import numpy as np

    c = PcmCache(max_bytes=8000)
    for k in "abcd":
        c.put(k, np.zeros(1000, np.int16))       # 2000 bytes each: the cache is full
    assert c.get("a") is not None                # a is now the most recent
    c.put("e", np.zeros(1000, np.int16))
    assert c.get("b") is None and c.get("a") is not None and len(c) == 4
    c.put("big", np.zeros(1001, np.int16))       # over a quarter of the budget: not kept
    assert c.get("big") is None and len(c) == 4
