"""Twilio compatibility: apps written with the `twilio` library's VoiceResponse, served
by a real aiohttp server that validates Baton's X-Twilio-Signature with Twilio's own
RequestValidator, driven by raw SIP + RTP callers with RFC 4733 digits."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")
twiml = pytest.importorskip("twilio.twiml.voice_response")

from tests.helpers import engine_config, running_engine  # noqa: E402
from tests.test_sessions import Caller, callee_config, drain  # noqa: E402
from tests.twiml_apps import (AppServer, Events, band_level, fixed_sip_port,  # noqa: E402
                              instructions_engine, pcm_of, rms, tone_payload)

SECRET = "s3cret-auth-token-for-tests"


def number_config(url: str, number: str = "4000", **params) -> dict:
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"][number] = {"instructions": url, **params}
    return raw


async def wait_until(pred, timeout: float = 10.0, step: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


async def wait_bye(caller: Caller, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        m = await caller.c.recv(timeout=max(0.05, deadline - loop.time()))
        if m.is_request and m.method == "BYE":
            return


async def talk_until(caller: Caller, pred, timeout: float = 10.0, payload=b"\xff" * 160):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await caller.talk(0.1, payload)


async def test_ivr_menu_gather_action_say():
    app = AppServer(secret=SECRET)

    def start(_p, _r):
        r = twiml.VoiceResponse()
        g = twiml.Gather(input="dtmf", action="/menu", num_digits=1, timeout=5)
        g.say("Press one for sales, two for support.")
        r.append(g)
        r.say("We did not hear you.")
        return r

    def menu(p, _r):
        r = twiml.VoiceResponse()
        r.say({"1": "Sales.", "2": "Support."}.get(p.get("Digits"), "Unknown."))
        r.hangup()
        return r

    app.route("/ivr", start)
    app.route("/menu", menu)
    await app.start()
    async with instructions_engine(number_config(app.url + "/ivr"), secret=SECRET,
                                   twilio=True) as eng:
        caller = Caller(eng, "4000")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        assert session.module.code == "baton.instructions"
        assert session.level == "application"
        await caller.talk(0.5)
        await caller.press(2)
        got = await app.wait_for("/menu")
        await caller.talk(0.5)
        await wait_bye(caller)
        first, second = app.got("/ivr")[0], got[0]
        assert second.params["Digits"] == "2"
        for req in (first, second):
            assert req.method == "POST"
            assert req.twilio_valid is True, "Twilio's RequestValidator must accept Baton"
            assert req.baton_valid is True
            assert req.params["CallSid"] == session.id
            assert req.params["AccountSid"] == "demo"
            assert req.params["To"] == "4000"
            assert req.params["From"].startswith("sip:tester@")
            assert req.params["Direction"] == "inbound"
            assert req.params["ApiVersion"] == "2010-04-01"
            assert req.params["CallerName"] == "Test"
        assert first.params["CallStatus"] == "ringing"
        assert second.params["CallStatus"] == "in-progress"
        assert rms(pcm_of(caller.received)) > 100, "the prompt was heard"
        assert session.end_reason == "instructions-hangup"
        caller.close()
    await app.stop()


async def test_record_and_playback():
    import wave

    import aiohttp

    app = AppServer(secret=SECRET)

    def start(_p, _r):
        r = twiml.VoiceResponse()
        r.record(action="/recorded", max_length=5, timeout=3, finish_on_key="#",
                 play_beep=True, trim="do-not-trim", recording_status_callback="/status")
        return r

    def recorded(p, _r):
        r = twiml.VoiceResponse()
        r.play(p["RecordingUrl"])
        r.hangup()
        return r

    app.route("/rec", start)
    app.route("/recorded", recorded)
    app.route("/status", lambda _p, _r: "")
    await app.start()
    async with instructions_engine(number_config(app.url + "/rec"), secret=SECRET,
                                   twilio=True) as eng:
        caller = Caller(eng, "4000")
        await caller.dial()
        await caller.talk(0.4)                        # the beep
        for n in range(40):                           # 0.8 s of a 440 Hz tone
            await caller.talk(0.02, tone_payload(440, n))
        await caller.press(11)                        # '#'
        req = (await app.wait_for("/recorded"))[0]
        assert req.twilio_valid is True
        p = req.params
        assert p["Digits"] == "#"
        assert p["RecordingSid"].startswith("RE") and len(p["RecordingSid"]) == 34
        assert 0 <= int(p["RecordingDuration"]) <= 2
        url = p["RecordingUrl"]
        assert url.startswith("http://127.0.0.1:")
        status = (await app.wait_for("/status"))[0].params
        assert status["RecordingStatus"] == "completed" and status["RecordingUrl"] == url
        assert status["RecordingSid"] == p["RecordingSid"]
        # The recording is served back over HTTP by the engine.
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "audio/wav"
                body = await resp.read()
            async with http.get(url + ".wav") as resp:
                assert resp.status == 200
            async with http.get(url[:-1] + "0/../../sessions.db") as resp:
                assert resp.status == 404
        import io
        with wave.open(io.BytesIO(body)) as w:
            assert w.getframerate() == 8000
            assert 0.5 * 8000 < w.getnframes() < 1.5 * 8000
        # The caller hears its own tone played back.
        before = len(caller.received)
        await caller.talk(1.2)
        heard = pcm_of(caller.received[before:])
        assert band_level(heard, 440) > 1000, band_level(heard, 440)
        await wait_bye(caller)
        caller.close()
    await app.stop()


async def test_dial_and_return_runs_the_verb_after_dial_without_refetch():
    async with running_engine(fixed_sip_port(callee_config())) as callee:
        app = AppServer()

        def start(_p, _r):
            r = twiml.VoiceResponse()
            r.say("Connecting.")
            d = twiml.Dial(time_limit=2, timeout=10)
            d.sip(f"sip:1001@127.0.0.1:{callee.sip_port}")
            r.append(d)
            r.say("Welcome back.")
            r.hangup()
            return r

        app.route("/dial", start)
        await app.start()
        async with instructions_engine(number_config(app.url + "/dial")) as eng:
            events = Events(eng)
            caller = Caller(eng, "4000")
            await caller.dial()
            session = next(iter(eng.sessions.values()))
            await talk_until(caller, lambda: session.module.code == "baton.bridge")
            assert session.level == "basic"
            await talk_until(caller, lambda: len(callee.sessions) == 1)
            # Through the bridge to the echo number: the caller hears itself.
            before = len(caller.received)
            for n in range(30):
                await caller.talk(0.02, tone_payload(600, n))
            await caller.talk(0.3)
            assert band_level(pcm_of(caller.received[before:]), 600) > 500
            # timeLimit ends the dialled call; the verb after Dial runs.
            await talk_until(caller, lambda: session.ended, timeout=10)
            hist = [(h.module, h.level, h.reason) for h in session.history]
            assert hist[0] == ("baton.instructions", "application", "initial")
            assert hist[1] == ("baton.bridge", "basic", "instruction:Dial")
            assert hist[2][0] == "baton.instructions" and hist[2][1] == "application"
            assert hist[2][2].startswith(("event:", "outlet:")), hist
            assert len(app.got("/dial")) == 1, "no second fetch of the document"
            assert session.end_reason == "instructions-hangup"
            dial = events.of("dial", session.id)
            assert dial and dial[0]["status"] == "completed" and dial[0]["duration"] >= 1
            caller.close()
        await app.stop()


async def test_dial_action_gets_dial_status():
    async with running_engine(fixed_sip_port(callee_config())) as callee:
        app = AppServer()

        def start(_p, _r):
            r = twiml.VoiceResponse()
            d = twiml.Dial(action="/after", timeout=5)
            d.sip(f"sip:9999@127.0.0.1:{callee.sip_port}")     # 404 there
            r.append(d)
            r.say("Never reached.")
            return r

        def after(p, _r):
            r = twiml.VoiceResponse()
            r.hangup()
            return r

        app.route("/dial", start)
        app.route("/after", after)
        await app.start()
        async with instructions_engine(number_config(app.url + "/dial")) as eng:
            caller = Caller(eng, "4000")
            await caller.dial()
            req = (await app.wait_for("/after"))[0]
            assert req.params["DialCallStatus"] == "failed"
            assert req.params["DialCallDuration"] == "0"
            session = eng.find_session(req.params["CallSid"])
            await wait_until(lambda: session.ended)
            assert [h.reason for h in session.history] == ["initial", "instruction:Dial",
                                                           "outlet:failed"]
            caller.close()
        await app.stop()


async def test_conference_of_three_everyone_hears_the_others():
    app = AppServer(secret=SECRET)

    def join(_p, _r):
        r = twiml.VoiceResponse()
        d = twiml.Dial()
        d.conference("standup", beep=False, start_conference_on_enter=True,
                     max_participants=3)
        r.append(d)
        return r

    app.route("/conf", join)
    await app.start()
    async with instructions_engine(number_config(app.url + "/conf"), secret=SECRET,
                                   twilio=True) as eng:
        events = Events(eng)
        freqs = (400, 700, 1100)
        callers = [Caller(eng, "4000") for _ in freqs]
        for c in callers:
            await c.dial()
        await app.wait_for("/conf", 3)
        await wait_until(lambda: len(events.of("conference")) >= 3)
        # Everyone talks at once, each on its own frequency, for a second.
        marks = [len(c.received) for c in callers]
        for n in range(60):
            for c, f in zip(callers, freqs):
                c.media.sendto(_rtp(c, tone_payload(f, n, 4000)), c.remote)
            await asyncio.sleep(0.02)
            for c in callers:
                c.received += drain(c.media)
        await asyncio.sleep(0.1)
        for c in callers:
            c.received += drain(c.media)
        for i, c in enumerate(callers):
            heard = pcm_of(c.received[marks[i] + 10:])
            levels = {f: band_level(heard, f) for f in freqs}
            others = [f for f in freqs if f != freqs[i]]
            assert all(levels[f] > 1000 for f in others), (i, levels)
            assert levels[freqs[i]] < 300, ("nobody hears themselves", i, levels)
        assert all(r.twilio_valid for r in app.requests)
        for c in callers:
            await c.bye()
            c.close()
    await app.stop()


def _rtp(c: Caller, payload: bytes) -> bytes:
    from tests.test_sessions import rtp_packet

    pkt = rtp_packet(c.seq, c.ts, payload)
    c.seq += 1
    c.ts += 160
    return pkt


async def test_queue_caller_enqueued_agent_dials_queue_and_gets_connected():
    app = AppServer(secret=SECRET)

    def customer(_p, _r):
        r = twiml.VoiceResponse()
        r.enqueue("support", wait_url="/wait", action="/queue-done")
        return r

    def wait(p, _r):
        r = twiml.VoiceResponse()
        r.say(f"You are number {p.get('QueuePosition')} in line.")
        r.pause(length=5)
        return r

    def queue_done(p, _r):
        r = twiml.VoiceResponse()
        r.say("Thank you for calling.")
        r.hangup()
        return r

    def agent(_p, _r):
        r = twiml.VoiceResponse()
        d = twiml.Dial(action="/agent-done")
        d.queue("support")
        r.append(d)
        return r

    def agent_done(_p, _r):
        return str(twiml.VoiceResponse().hangup())

    for path, fn in (("/customer", customer), ("/wait", wait), ("/queue-done", queue_done),
                     ("/agent", agent), ("/agent-done", agent_done)):
        app.route(path, fn)
    await app.start()
    raw = number_config(app.url + "/customer")
    raw["accounts"]["demo"]["numbers"]["4001"] = {"instructions": app.url + "/agent"}
    async with instructions_engine(raw, secret=SECRET, twilio=True) as eng:
        events = Events(eng)
        cust = Caller(eng, "4000")
        await cust.dial()
        wait_req = (await app.wait_for("/wait"))[0]
        assert wait_req.params["QueuePosition"] == "1"
        assert wait_req.params["CurrentQueueSize"] == "1"
        cust_session = eng.find_session(wait_req.params["CallSid"])
        await cust.talk(0.5)
        agent_caller = Caller(eng, "4001")
        await agent_caller.dial()
        await wait_until(lambda: events.of("queue", cust_session.id)
                         and events.of("queue", cust_session.id)[-1]["event"] == "bridged")
        agent_session = next(s for s in eng.sessions.values() if s is not cust_session)
        # Connected: each hears the other.
        m1, m2 = len(cust.received), len(agent_caller.received)
        for n in range(40):
            cust.media.sendto(_rtp(cust, tone_payload(500, n, 4000)), cust.remote)
            agent_caller.media.sendto(_rtp(agent_caller, tone_payload(900, n, 4000)),
                                      agent_caller.remote)
            await asyncio.sleep(0.02)
            cust.received += drain(cust.media)
            agent_caller.received += drain(agent_caller.media)
        await asyncio.sleep(0.1)
        cust.received += drain(cust.media)
        agent_caller.received += drain(agent_caller.media)
        assert band_level(pcm_of(cust.received[m1 + 10:]), 900) > 1000
        assert band_level(pcm_of(agent_caller.received[m2 + 10:]), 500) > 1000
        # The agent hangs up: the customer's Enqueue action runs with QueueResult.
        await agent_caller.bye()
        done = (await app.wait_for("/queue-done"))[0]
        assert done.params["QueueResult"] == "bridged"
        assert done.params["CallSid"] == cust_session.id
        await wait_bye(cust)
        assert cust_session.ended and agent_session.ended
        # Both sessions stayed at the application level in the instructions module.
        assert [(h.module, h.reason) for h in cust_session.history] == \
            [("baton.instructions", "initial")]
        assert [(h.module, h.reason) for h in agent_session.history] == \
            [("baton.instructions", "initial")]
        assert cust_session.params["QueueResult"] == "bridged"
        kinds = [e["event"] for e in events.of("queue", cust_session.id)]
        assert kinds == ["enqueued", "bridged", "result"], kinds
        agent_events = events.of("queue", agent_session.id)
        assert agent_events[0]["event"] == "dequeued"
        assert agent_events[0]["caller"] == cust_session.id
        assert all(r.twilio_valid for r in app.requests)
        cust.close()
        agent_caller.close()
    await app.stop()
