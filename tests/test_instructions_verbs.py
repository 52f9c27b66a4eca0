"""Verb by verb: Redirect to modules (policy, outlets back), Play (URL, digits), Pause
before answering, Gather details, Reject, Record on hang-up, queues and conferences
edge cases, code aliases and app outlets."""
from __future__ import annotations

import asyncio
import io
import struct
import time
import wave

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from aiohttp import web  # noqa: E402

from tests.helpers import engine_config  # noqa: E402
from tests.test_sessions import Caller, drain  # noqa: E402
from tests.twiml_apps import (AppServer, Events, band_level, instructions_engine,  # noqa: E402
                              pcm_of, tone_payload)


async def wait_bye(caller, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        m = await caller.c.recv(timeout=max(0.05, deadline - loop.time()))
        if m.is_request and m.method == "BYE":
            return


async def wait_until(pred, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def numbers(url: str, **more) -> dict:
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["4000"] = {"instructions": url}
    raw["accounts"]["demo"]["numbers"].update(more)
    return raw


async def serve(docs: dict) -> AppServer:
    app = AppServer()
    for path, doc in docs.items():
        if callable(doc):
            app.route(path, doc)
        else:
            app.twiml(path, doc)
    return await app.start()


async def test_redirect_to_module_and_back_through_an_outlet():
    app = await serve({
        "/start": "<Response><Say>One.</Say>"
                  "<Redirect>module:baton.play?text=Two.&amp;outlet=done</Redirect>"
                  "<Say>Three.</Say><Hangup/></Response>"})
    async with instructions_engine(numbers(app.url + "/start")) as eng:
        caller = Caller(eng, "4000")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        await caller.talk(0.5)
        await wait_until(lambda: session.ended, 15)
        hist = [(h.module, h.reason) for h in session.history]
        assert hist == [("baton.instructions", "initial"),
                        ("baton.play", "instruction:Redirect"),
                        ("baton.instructions", "outlet:done")], hist
        assert session.end_reason == "instructions-hangup"
        assert len(app.got("/start")) == 1
        caller.close()
    await app.stop()


async def test_redirect_to_a_denied_module_is_refused_by_policy_and_comes_back():
    app = await serve({
        "/start": "<Response><Redirect>module:baton.echo</Redirect><Redirect>/next</Redirect>"
                  "</Response>",
        "/next": "<Response><Hangup/></Response>"})
    raw = numbers(app.url + "/start")
    raw["policy"] = {"deny_modules": {"demo": ["baton.echo"]}}
    async with instructions_engine(raw) as eng:
        events = Events(eng)
        caller = Caller(eng, "4000")
        await caller.dial(expect=480)
        await app.wait_for("/next")
        session = eng.finished[-1]
        hist = [(h.module, h.reason) for h in session.history]
        assert hist == [("baton.instructions", "initial"),
                        ("policy-denied:baton.echo", "policy-denied"),
                        ("baton.instructions", "policy-denied")], hist
        assert "policy-denied" in events.of("error")[0]["reason"]
        caller.close()
    await app.stop()


async def test_redirect_to_module_hands_over_for_good_and_outlet_targets():
    app = await serve({"/start": "<Response><Redirect>module:baton.echo</Redirect></Response>"})
    async with instructions_engine(numbers(app.url + "/start")) as eng:
        caller = Caller(eng, "4000")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        await wait_until(lambda: session.module.code == "baton.echo")
        assert session.level == "basic"
        payload = bytes(range(1, 161)).replace(b"\x7f", b"\x7e")
        await caller.talk(0.5, payload)
        assert sum(1 for p in caller.received if p[12:] == payload) > 5
        await caller.bye()
        caller.close()
    await app.stop()


async def test_outlet_redirect_follows_the_app_node_outlet():
    app = await serve({"/a": "<Response><Redirect>outlet:sales?team=east</Redirect>"
                             "</Response>"})
    raw = engine_config()
    raw["apps"] = {"front": {"start": "ivr", "nodes": {
        "ivr": {"module": "baton.instructions", "params": {"url": app.url + "/a"},
                "outlets": {"sales": "desk"}},
        "desk": {"module": "baton.hold"}}}}
    raw["accounts"]["demo"]["numbers"]["4000"] = {"app": "front"}
    async with instructions_engine(raw) as eng:
        caller = Caller(eng, "4000")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        await wait_until(lambda: session.module.code == "baton.hold")
        assert session.history[-1].reason == "outlet:sales"
        assert session.control.params["team"] == "east"
        await caller.bye()
        caller.close()
    await app.stop()


async def test_module_code_alias_runs_the_instruction_uri():
    app = await serve({"/ivr": "<Response><Say>Acme.</Say><Hangup/></Response>"})
    raw = engine_config()
    raw["modules"] = {"acme.ivr": {"uri": app.url + "/ivr"}}
    raw["accounts"]["demo"]["numbers"]["4000"] = {"module": "acme.ivr"}
    async with instructions_engine(raw) as eng:
        caller = Caller(eng, "4000")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        assert session.module.code == "acme.ivr" and session.level == "application"
        await wait_bye(caller)
        assert app.got("/ivr")[0].params["CallSid"] == session.id
        caller.close()
    await app.stop()


def _wav(freq: float, seconds: float) -> bytes:
    import numpy as np

    t = np.arange(int(16000 * seconds)) / 16000
    pcm = (8000 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


async def test_play_url_loops_and_sends_digits():
    wav = _wav(1000, 0.3)
    app = await serve({
        "/p": "<Response><Play digits='1#'/><Play loop='2'>/tone.wav</Play>"
              "<Play>/missing.wav</Play><Hangup/></Response>",
        "/tone.wav": lambda _p, _r: web.Response(body=wav, content_type="audio/wav")})
    async with instructions_engine(numbers(app.url + "/p")) as eng:
        events = Events(eng)
        caller = Caller(eng, "4000")
        await caller.dial()
        await caller.talk(1.2)
        await wait_bye(caller)
        caller.received += drain(caller.media)
        events_in = [p for p in caller.received if (p[1] & 0x7F) == 101]
        codes = [p[12] for p in events_in]
        assert codes and set(codes) == {1, 11}, codes
        ends = [p for p in events_in if p[13] & 0x80]
        assert len(ends) == 6, "three end packets per digit (RFC 4733 2.5.1.4)"
        heard = pcm_of(caller.received)
        assert band_level(heard, 1000) > 500
        assert len(app.got("/tone.wav")) == 1, "the audio is fetched once and cached"
        err = events.of("error")[0]
        assert err["code"] == 11200 and "missing.wav" in err["reason"]
        caller.close()
    await app.stop()


async def test_pause_first_delays_the_answer():
    app = await serve({"/p": "<Response><Pause length='1'/><Hangup/></Response>"})
    async with instructions_engine(numbers(app.url + "/p")) as eng:
        caller = Caller(eng, "4000")
        t0 = time.monotonic()
        await caller.dial(expect=480)
        assert time.monotonic() - t0 >= 0.9
        caller.close()
    await app.stop()


async def test_gather_collects_until_finish_key_and_falls_through_on_silence():
    app = await serve({
        "/g": "<Response><Gather numDigits='5' finishOnKey='#' timeout='3' action='/got'>"
              "<Say>Enter your code.</Say></Gather></Response>",
        "/got": "<Response><Gather timeout='1'><Say>Anything else?</Say></Gather>"
                "<Say>Bye.</Say><Hangup/></Response>"})
    async with instructions_engine(numbers(app.url + "/g")) as eng:
        caller = Caller(eng, "4000")
        await caller.dial()
        await caller.talk(0.2)
        for code in (4, 2, 11):      # 4 2 # (the first key interrupts the prompt)
            await caller.press(code)
            await caller.talk(0.1)
        req = (await app.wait_for("/got"))[0]
        assert req.params["Digits"] == "42" and req.params["FinishedOnKey"] == "#"
        await caller.talk(0.5)
        await wait_bye(caller, 15)     # nothing entered: on to Say and Hangup
        assert len(app.got("/got")) == 1
        caller.close()
    await app.stop()


async def test_reject_rejected_is_603():
    app = await serve({"/r": "<Response><Reject/></Response>"})
    async with instructions_engine(numbers(app.url + "/r")) as eng:
        caller = Caller(eng, "4000")
        await caller.dial(expect=603)
        caller.close()
    await app.stop()


async def test_record_hangup_still_posts_the_action():
    app = await serve({
        "/r": "<Response><Record action='/done' playBeep='false' timeout='0'/></Response>",
        "/done": "<Response><Say>ignored</Say></Response>"})
    async with instructions_engine(numbers(app.url + "/r")) as eng:
        caller = Caller(eng, "4000")
        await caller.dial()
        for n in range(30):
            await caller.talk(0.02, tone_payload(500, n))
        await caller.bye()
        req = (await app.wait_for("/done"))[0]
        assert req.params["Digits"] == "hangup"
        assert req.params["CallStatus"] == "completed"
        assert req.params["RecordingUrl"].endswith(req.params["RecordingSid"])
        caller.close()
    await app.stop()


async def test_enqueue_leave_and_queue_full_and_empty_queue_dial():
    app = await serve({
        "/in": "<Response><Enqueue waitUrl='/wait' action='/out' maxQueueSize='1'>q"
               "</Enqueue></Response>",
        "/wait": "<Response><Pause length='0.3'/><Leave/></Response>",
        "/out": "<Response><Hangup/></Response>",
        "/agent": "<Response><Dial timeout='1' action='/agent-out'><Queue>empty</Queue></Dial>"
                  "</Response>",
        "/agent-out": "<Response><Hangup/></Response>"})
    raw = numbers(app.url + "/in", **{"4001": {"instructions": app.url + "/agent"}})
    async with instructions_engine(raw) as eng:
        a, b = Caller(eng, "4000"), Caller(eng, "4000")
        await a.dial()
        await app.wait_for("/wait")
        await b.dial()
        outs = await app.wait_for("/out", 2)
        results = sorted(r.params["QueueResult"] for r in outs)
        assert results == ["leave", "queue-full"], results
        agent = Caller(eng, "4001")
        await agent.dial()
        req = (await app.wait_for("/agent-out"))[0]
        assert req.params["DialCallStatus"] == "no-answer"
        for c in (a, b, agent):
            c.close()
        assert eng.registry.resolve("baton.instructions").shared.queues.queues == {}
    await app.stop()


async def test_conference_waits_for_the_moderator_and_ends_with_them():
    app = await serve({
        "/guest": "<Response><Dial><Conference startConferenceOnEnter='false' beep='false' "
                  "muted='true'>"
                  "board</Conference></Dial><Say>The meeting has ended.</Say><Hangup/>"
                  "</Response>",
        "/chair": "<Response><Dial hangupOnStar='true'><Conference endConferenceOnExit='true'"
                  " beep='true'>board</Conference></Dial><Hangup/></Response>"})
    raw = numbers(app.url + "/guest", **{"4001": {"instructions": app.url + "/chair"}})
    async with instructions_engine(raw) as eng:
        events = Events(eng)
        guest = Caller(eng, "4000")
        await guest.dial()
        await app.wait_for("/guest")
        rooms = eng.registry.resolve("baton.instructions").shared.rooms.rooms
        await wait_until(lambda: ("demo", "board") in rooms)
        room = rooms[("demo", "board")]
        # The guest alone waits outside the mix until the chair starts the conference.
        await guest.talk(0.2)
        assert not room.started and not room.participants[guest_sid(eng)].mixing
        chair = Caller(eng, "4001")
        await chair.dial()
        await wait_until(lambda: len(events.of("conference")) >= 2)
        mark = len(guest.received)
        for n in range(40):
            chair.media.sendto(_pkt(chair, tone_payload(800, n, 4000)), chair.remote)
            guest.media.sendto(_pkt(guest, tone_payload(300, n, 4000)), guest.remote)
            await asyncio.sleep(0.02)
            guest.received += drain(guest.media)
            chair.received += drain(chair.media)
        assert room.started
        assert band_level(pcm_of(guest.received[mark + 10:]), 800) > 1000
        assert band_level(pcm_of(chair.received[-30:]), 300) < 100, "the muted guest is not heard"
        # The chair presses * (hangupOnStar): the conference ends for the guest too.
        await chair.press(10)
        await wait_bye(guest, 10)
        await wait_bye(chair, 10)
        leaves = [e for e in events.of("conference") if e["event"] == "leave"]
        assert sorted(e["reason"] for e in leaves) == ["conference-ended", "hangup-on-star"]
        assert eng.registry.resolve("baton.instructions").shared.rooms.rooms == {}
        guest.close()
        chair.close()
    await app.stop()


def guest_sid(eng) -> str:
    return next(s.id for s in eng.sessions.values() if s.number == "4000")


def _pkt(c, payload):
    pkt = struct.pack("!BBHII", 0x80, 0, c.seq & 0xFFFF, c.ts & 0xFFFFFFFF, 0xABCD) + payload
    c.seq += 1
    c.ts += 160
    return pkt


async def test_dial_number_of_this_engine_loops_back_in():
    app = await serve({
        "/a": "<Response><Dial timeLimit='1' action='/after'><Number>1001</Number></Dial>"
              "</Response>",
        "/after": "<Response><Hangup/></Response>"})
    raw = numbers(app.url + "/a", **{"1001": {"module": "baton.echo"}})
    async with instructions_engine(raw) as eng:
        caller = Caller(eng, "4000")
        await caller.dial()
        await caller.talk(0.2)
        req = (await app.wait_for("/after", timeout=10))[0]
        assert req.params["DialCallStatus"] == "completed"
        assert int(req.params["DialCallDuration"]) >= 1
        caller.close()
    await app.stop()


async def test_redirect_module_outlet_targets_map_outlets_to_urls():
    app = await serve({
        "/start": "<Response><Redirect>module:baton.menu?prompt=Press%20one.&amp;timeout=3"
                  "&amp;outlet.1=/one&amp;outlet.timeout=hangup</Redirect></Response>",
        "/one": "<Response><Hangup/></Response>"})
    async with instructions_engine(numbers(app.url + "/start")) as eng:
        caller = Caller(eng, "4000")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        await wait_until(lambda: session.module.code == "baton.menu")
        await caller.talk(0.3)
        await caller.press(1)
        req = (await app.wait_for("/one"))[0]
        assert req.params["Digits"] == "1"
        await wait_until(lambda: session.ended)
        assert [(h.module, h.reason) for h in session.history] == [
            ("baton.instructions", "initial"), ("baton.menu", "instruction:Redirect"),
            ("baton.instructions", "outlet:1")]
        caller.close()
    await app.stop()
