"""Bad app servers: hanging, 500, garbage, billion laughs, 10 MB, bad verbs and loops.
Each failure is an error event naming its reason, the fallback URL is tried with
ErrorCode/ErrorUrl, else the caller hears an apology; the engine survives and
other calls carry on unaffected."""
from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")
twiml = pytest.importorskip("twilio.twiml.voice_response")

from tests.helpers import engine_config  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402
from tests.twiml_apps import (AppServer, Events, billion_laughs, garbage, hang,  # noqa: E402
                              instructions_engine, pcm_of, rms, status_500, ten_megabytes)


def fallback_doc(_p, _r):
    r = twiml.VoiceResponse()
    r.say("Fallback.")
    r.hangup()
    return r


def good_app(p, _r):
    r = twiml.VoiceResponse()
    g = twiml.Gather(num_digits=1, action="/good-done", timeout=5)
    g.say("Good app.")
    r.append(g)
    return r


def good_done(_p, _r):
    return str(twiml.VoiceResponse().hangup())


BAD = {"/hang": (hang, 11205), "/500": (status_500, 11200), "/garbage": (garbage, 12100),
       "/lol": (billion_laughs, 12100), "/big": (ten_megabytes, 11750)}


async def wait_bye(caller, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        m = await caller.c.recv(timeout=max(0.05, deadline - loop.time()))
        if m.is_request and m.method == "BYE":
            return


def app_with_everything() -> AppServer:
    app = AppServer()
    for path, (fn, _code) in BAD.items():
        app.route(path, fn)
    app.route("/fallback", fallback_doc)
    app.route("/good", good_app)
    app.route("/good-done", good_done)
    return app


def config(url: str) -> dict:
    raw = engine_config()
    nums = raw["accounts"]["demo"]["numbers"]
    for i, path in enumerate(BAD):
        nums[f"50{i}"] = {"instructions": url + path, "fallback_url": url + "/fallback",
                          "timeout": 1.0}
        nums[f"60{i}"] = {"instructions": url + path, "timeout": 1.0}
    nums["7000"] = {"instructions": url + "/good"}
    return raw


@pytest.mark.parametrize("path", list(BAD))
async def test_bad_app_server_takes_the_fallback_url(path):
    app = app_with_everything()
    await app.start()
    async with instructions_engine(config(app.url)) as eng:
        events = Events(eng)
        i = list(BAD).index(path)
        t0 = time.monotonic()
        caller = Caller(eng, f"50{i}")
        await caller.dial()           # answered by the fallback document
        fb = (await app.wait_for("/fallback"))[0]
        assert time.monotonic() - t0 < 3.0
        code = BAD[path][1]
        assert fb.params["ErrorCode"] == str(code)
        assert fb.params["ErrorUrl"] == app.url + path
        errors = events.of("error")
        assert errors and errors[0]["code"] == code, errors
        assert errors[0]["url"] == app.url + path and errors[0]["reason"]
        await caller.talk(0.3)
        await wait_bye(caller)
        session = eng.find_session(fb.params["CallSid"])
        assert session.end_reason == "instructions-hangup"
        assert events.of("fallback", session.id)[0]["url"] == app.url + "/fallback"
        caller.close()
    await app.stop()


async def test_without_fallback_the_caller_hears_an_apology_and_the_call_ends():
    app = app_with_everything()
    await app.start()
    async with instructions_engine(config(app.url)) as eng:
        events = Events(eng)
        caller = Caller(eng, "601")            # /500, no fallback_url
        await caller.dial()
        await caller.talk(1.0)
        await wait_bye(caller)
        assert rms(pcm_of(caller.received)) > 100, "the apology was spoken"
        session = eng.finished[-1]
        assert session.end_reason == "instructions-error"
        assert events.of("error", session.id)[0]["status"] == 500
        assert events.of("fallback", session.id) == [{"default": "apology"}]
        caller.close()
    await app.stop()


async def test_every_bad_server_at_once_while_a_good_call_carries_on():
    app = app_with_everything()
    await app.start()
    async with instructions_engine(config(app.url)) as eng:
        late0 = eng.media.late_ticks
        good = Caller(eng, "7000")
        await good.dial()
        bad = [Caller(eng, f"60{i}") for i in range(len(BAD))]
        for c in bad:
            c.c.send(c.call.request("INVITE", _offer(c)))
        # The good call's prompt keeps playing on time while the bad ones fail.
        await good.talk(1.5)
        hs = [p for p in good.received if (p[1] & 0x7F) == 0]
        assert len(hs) >= 60, len(hs)
        await good.press(5)
        req = (await app.wait_for("/good-done"))[0]
        assert req.params["Digits"] == "5"
        await wait_bye(good)
        # Every bad call ended with the apology (or was still speaking it) and nothing leaked.
        deadline = asyncio.get_running_loop().time() + 10
        while any(s.number.startswith("60") for s in eng.sessions.values()):
            for c in bad:
                _drain_sip(c)
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
        ended = [s for s in eng.finished if s.number.startswith("60")]
        assert len(ended) == len(BAD)
        assert all(s.end_reason == "instructions-error" for s in ended), \
            [(s.number, s.end_reason) for s in ended]
        # A little lateness is tolerated on a loaded CI machine, a stall is not.
        assert eng.media.late_ticks - late0 < 10
        for c in [good] + bad:
            c.close()
    await app.stop()


def _offer(c):
    from tests.helpers import SDP_OFFER

    return SDP_OFFER.format(port=c.media.getsockname()[1])


def _drain_sip(c):
    try:
        while True:
            c.c.sock.recv(65535)
    except BlockingIOError:
        pass


@pytest.mark.parametrize("doc,line,attribute,words", [
    ("<Response>\n<Say>Hi</Say>\n<Gather numDigits=\"many\"/>\n</Response>", 3, "numDigits",
     "whole number"),
    ("<Response>\n\n<Dance/>\n</Response>", 3, None, "unknown verb <Dance>"),
    ("<Response><Gather><Record/></Gather></Response>", 1, None, "not allowed inside"),
])
async def test_bad_documents_are_error_events_naming_line_and_attribute(doc, line, attribute,
                                                                        words):
    app = AppServer()
    app.twiml("/doc", doc)
    app.route("/fallback", fallback_doc)
    await app.start()
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["4000"] = {"instructions": app.url + "/doc",
                                                  "fallback_url": app.url + "/fallback"}
    async with instructions_engine(raw) as eng:
        events = Events(eng)
        caller = Caller(eng, "4000")
        await caller.dial()
        fb = (await app.wait_for("/fallback"))[0]
        assert fb.params["ErrorCode"] == "12200"
        err = events.of("error")[0]
        assert err["line"] == line and err.get("attribute") == attribute
        assert words in err["reason"] and err["reason"].startswith(f"line {line}:")
        await wait_bye(caller)
        caller.close()
    await app.stop()


async def test_redirect_loop_is_stopped():
    app = AppServer()
    app.twiml("/loop", "<Response><Redirect>/loop</Redirect></Response>")
    await app.start()
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["4000"] = {"instructions": app.url + "/loop"}
    async with instructions_engine(raw) as eng:
        events = Events(eng)
        caller = Caller(eng, "4000")
        await caller.dial()
        await wait_bye(caller)
        assert 20 <= len(app.got("/loop")) <= 30
        assert "Redirect loop" in events.of("error")[0]["reason"]
        caller.close()
    await app.stop()


async def test_unreachable_app_server_is_a_connection_error():
    from tests.helpers import free_port

    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["4000"] = {
        "instructions": f"http://127.0.0.1:{free_port()}/nothing"}
    async with instructions_engine(raw) as eng:
        events = Events(eng)
        caller = Caller(eng, "4000")
        await caller.dial()
        await wait_bye(caller)
        err = events.of("error")[0]
        assert err["code"] == 11205 and "cannot connect" in err["reason"]
        caller.close()
