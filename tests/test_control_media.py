"""ModuleHost media commands over real gRPC on loopback: gather with barge-in,
DTMF both ways, play, record, conference, dial (and the offer that resumes
after it), and the commands an engine without a service refuses."""
from __future__ import annotations

import asyncio
import os
import wave

import numpy as np
import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from tests.vendor_procs.harness import (SECRET_A, control_config, target, wait_until,  # noqa: E402
                                        with_app)

from control.sdk import (CostWarning, Dtmf, LegAnswered, Money, NotFound, Say,  # noqa: E402
                         Unimplemented, VendorClient)
from ext.dtmf_py import DtmfDetector  # noqa: E402
from ext.g711_py import ulaw_decode, ulaw_encode  # noqa: E402
from tests.helpers import running_engine  # noqa: E402
from tests.test_sessions import Caller, callee_config, drain  # noqa: E402

NO_EVENTS_SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                 "m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")

SILENCE = (b"\xff" * 160, b"\x7f" * 160)


def tone(freq: float = 440.0) -> bytes:
    t = np.arange(160) / 8000
    return ulaw_encode((8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16))


async def vendor_with_calls(eng) -> tuple[VendorClient, list]:
    v = VendorClient(target(eng), "acme.survey", SECRET_A)
    calls: list = []

    @v.on_offer
    async def on(offer):
        calls.append(await offer.take())

    await v.start()
    return v, calls


async def test_gather_with_prompt_barge_in_and_digits_both_ways():
    async with running_engine(control_config()) as eng:
        v, calls = await vendor_with_calls(eng)
        caller = Caller(eng, "4000")
        dial = asyncio.ensure_future(caller.dial())
        await wait_until(lambda: calls)
        call = calls[0]
        gather = asyncio.ensure_future(call.gather(
            num_digits=2, timeout=3, prompt=Say("Please enter two digits.")))
        await dial
        await caller.talk(0.4)
        assert any(p[12:] not in SILENCE for p in caller.received), "the prompt is heard"
        await caller.press(4)
        await caller.talk(0.1)
        n = len(caller.received)
        await caller.talk(0.2)
        assert all(p[12:] in SILENCE for p in caller.received[n:]), "barge-in stops the prompt"
        await caller.press(2)
        result = await asyncio.wait_for(gather, 2)
        assert (result.digits, result.reason) == ("42", "num-digits")
        assert eng.sessions[call.session_id].params["Digits"] == "42"
        seen = []
        while not call.events.empty():
            seen.append(call.events.get_nowait())
        assert LegAnswered("caller") in seen
        assert [e.digit for e in seen if isinstance(e, Dtmf)] == ["4", "2"]
        # Finish key and timeout.
        g2 = asyncio.ensure_future(call.gather(timeout=2, finish_on_key="#"))
        await caller.talk(0.1)
        await caller.press(7)
        await caller.press(11)   # '#'
        r2 = await asyncio.wait_for(g2, 2)
        assert (r2.digits, r2.reason) == ("7", "finish-key")
        r3 = await call.gather(timeout=0.3)
        assert (r3.digits, r3.reason) == ("", "timeout")
        # Digits to the caller: RFC 4733 with three end packets per digit.
        caller.received.clear()
        sent = asyncio.ensure_future(call.send_digits("1#", duration_ms=60, gap_ms=40))
        await caller.talk(0.5)
        ack = await sent
        assert ack.result == {"method": "rfc4733", "digits": "1#"}
        ev = [p for p in caller.received if p[1] & 0x7F == 101]
        ends = [(p[12], p[13] & 0x80) for p in ev if p[13] & 0x80]
        assert ends == [(1, 0x80)] * 3 + [(11, 0x80)] * 3, ends
        await caller.bye()
        caller.close()
        await v.close()


async def test_play_file_loop_stop_and_missing_file(tmp_path):
    path = str(tmp_path / "tone.wav")
    pcm = (6000 * np.sin(2 * np.pi * 600 * np.arange(1600) / 8000)).astype(np.int16)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(pcm.tobytes())
    raw = control_config()
    raw["vendors"]["acme"]["files_dir"] = str(tmp_path)   # the only files acme may play
    async with running_engine(raw) as eng:
        v, calls = await vendor_with_calls(eng)
        caller = Caller(eng, "4000")
        dial = asyncio.ensure_future(caller.dial())
        await wait_until(lambda: calls)
        call = calls[0]
        done = await asyncio.wait_for(asyncio.gather(call.play(path, wait=True), dial), 3)
        assert done[0].interrupted is False
        # Cached now: the second play starts synchronously.
        ack = await call.play(path, loop=0)
        assert ack.result == {"playing": True}
        await caller.talk(0.3)
        stopped = await call.stop_media()
        assert stopped.result == {}
        seen = []
        while not call.events.empty():
            seen.append(call.events.get_nowait())
        assert any(getattr(e, "interrupted", False) for e in seen)
        # Outside its directory, missing and unreadable are one answer: no file probing.
        answers = []
        for other in (str(tmp_path / "missing.wav"), "/etc/passwd", "/nonexistent/x.wav",
                      str(tmp_path / ".." / ".." / "etc" / "passwd"),
                      os.path.join(eng.cfg.data_dir, "sessions.db")):
            with pytest.raises(NotFound) as err:
                await call.play(other)
            answers.append((err.value.field, str(err.value)))
        assert len(set(answers)) == 1 and answers[0][0] == "play.url", answers
        assert "passwd" not in answers[0][1]
        await caller.bye()
        caller.close()
        await v.close()


async def test_record_ends_on_finish_key_and_reports_the_file():
    async with running_engine(control_config()) as eng:
        v, calls = await vendor_with_calls(eng)
        caller = Caller(eng, "4000")
        dial = asyncio.ensure_future(caller.dial())
        await wait_until(lambda: calls)
        call = calls[0]
        rec = asyncio.ensure_future(call.record(max_length=5, silence=0, beep=True))
        await dial
        await caller.talk(0.4, b"\xff" * 160)   # the beep plays meanwhile
        await caller.talk(0.8, tone())
        await caller.press(11)
        ready = await asyncio.wait_for(rec, 3)
        assert ready.reason == "finish-key" and ready.digits == "#"
        assert 0.3 < ready.duration <= 1.5 and os.path.exists(ready.path)
        assert eng.sessions[call.session_id].params["RecordingPath"] == ready.path
        await caller.bye()
        caller.close()
        await v.close()


async def test_conference_mixes_two_callers_and_ends_with_control():
    async with running_engine(control_config()) as eng:
        v, calls = await vendor_with_calls(eng)
        one, two = Caller(eng, "4000"), Caller(eng, "4000")
        d1 = asyncio.ensure_future(one.dial())
        await wait_until(lambda: len(calls) == 1)
        d2 = asyncio.ensure_future(two.dial())
        await wait_until(lambda: len(calls) == 2)
        a1 = await calls[0].join_conference("room")
        a2 = await calls[1].join_conference("room", listen_only=True)
        assert (a1.result["participants"], a2.result["participants"]) == (1, 2)
        await asyncio.gather(d1, d2)
        await asyncio.gather(one.talk(0.6, tone()), two.talk(0.6))
        assert sum(p[12:] not in SILENCE for p in two.received) > 10, "two hears one"
        assert all(p[12:] in SILENCE for p in one.received[5:]), "listen-only adds nothing"
        key = ("demo", "room")
        assert eng.control.hub.conferences[key][1] == 2
        await calls[0].release("done")     # no outlet: the call ends, it leaves the room
        await wait_until(lambda: eng.control.hub.conferences.get(key, [None, 0])[1] == 1)
        await two.bye()
        await wait_until(lambda: key not in eng.control.hub.conferences)
        one.close()
        two.close()
        await v.close()


async def test_dial_bridges_and_comes_back_as_a_new_offer():
    async with running_engine(callee_config()) as callee:
        raw = with_app(control_config(), "d", "4300", {
            "v": {"module": "acme.survey", "outlets": {"done": "hold", "fallback": "hold"}},
            "hold": {"module": "baton.hold"}}, "v")
        async with running_engine(raw) as eng:
            v = VendorClient(target(eng), "acme.survey", SECRET_A)
            offers, calls = [], []
            echo = f"sip:1001@127.0.0.1:{callee.sip_port}"
            nobody = f"sip:9999@127.0.0.1:{callee.sip_port}"

            @v.on_offer
            async def on(offer):
                offers.append(offer)
                call = await offer.take()
                calls.append(call)
                if offer.reason == "initial":
                    await call.answer()
                    await call.dial(echo, timeout=5, resume={"step": 2})
                elif offer.resume == {"step": 2}:
                    await call.dial(nobody, timeout=5, resume={"step": 3})
                else:
                    await call.release("done")

            await v.start()
            caller = Caller(eng, "4300")
            await caller.dial()
            session = next(iter(eng.sessions.values()))
            await wait_until(lambda: session.module.code == "baton.bridge" and callee.sessions)
            payload = bytes(range(1, 161)).replace(b"\x7f", b"\x7e")
            await caller.talk(0.4, payload)
            assert [p for p in caller.received if p[12:] == payload], "bridged to the echo"
            next(iter(callee.sessions.values())).end("api")   # the dialled party hangs up
            await wait_until(lambda: len(offers) == 3 and session.module.code == "baton.hold")
            hist = [(h.module, h.reason) for h in session.history]
            assert hist == [("acme.survey", "initial"), ("baton.bridge", "dial"),
                            ("acme.survey", "event:dialled-hangup"), ("baton.bridge", "dial"),
                            ("acme.survey", "outlet:failed"), ("baton.hold", "outlet:done")], hist
            back1, back2 = offers[1], offers[2]
            assert back1.module_params["DialCallStatus"] == "completed"
            assert back1.resume == {"step": 2} and back1.outlets == ["done", "fallback"]
            assert back2.module_params["DialCallStatus"] == "failed"
            assert back2.resume == {"step": 3}
            revoked = await calls[0].revoked
            assert (revoked.reason, revoked.next_module, revoked.by_vendor) == \
                ("dial", "baton.bridge", True)
            caller.received += drain(caller.media)
            await caller.bye()
            caller.close()
            await v.close()


async def test_enqueue_without_the_call_centre_is_unimplemented():
    async with running_engine(control_config()) as eng:
        v, calls = await vendor_with_calls(eng)
        caller = Caller(eng, "4000")
        dial = asyncio.ensure_future(caller.dial())
        await wait_until(lambda: calls)
        with pytest.raises(Unimplemented) as err:
            await calls[0].enqueue("support")
        assert "call-centre" in err.value.message
        await calls[0].answer()
        await dial
        await caller.bye()
        caller.close()
        await v.close()


def write_wav(path: str, seconds: float = 0.2, freq: float = 600.0) -> None:
    n = int(8000 * seconds)
    pcm = (6000 * np.sin(2 * np.pi * freq * np.arange(n) / 8000)).astype(np.int16)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(pcm.tobytes())


async def test_play_from_a_url_inband_digits_and_cost_warning(tmp_path):
    import functools
    import http.server
    import threading

    write_wav(str(tmp_path / "hello.wav"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    raw = control_config()
    # The vendor's audio server runs on loopback: allowed by the operator.
    raw["security"] = {"fetch_allow": [f"127.0.0.1:{httpd.server_address[1]}"]}
    try:
        async with running_engine(raw) as eng:
            v, calls = await vendor_with_calls(eng)
            caller = Caller(eng, "4000")
            # A caller that negotiates no telephone-event: digits go in-band.
            caller.c.send(caller.call.request("INVITE", NO_EVENTS_SDP.format(
                port=caller.media.getsockname()[1])))
            await wait_until(lambda: calls)
            call = calls[0]
            url = f"http://127.0.0.1:{httpd.server_address[1]}/hello.wav"
            done = asyncio.ensure_future(call.play(url, wait=True))
            m = await caller.c.expect(200, timeout=5)
            caller.call.to_tag = m.to_tag
            caller.c.send(caller.call.request("ACK"))
            caller.remote = ("127.0.0.1", int(m.body.split(b"m=audio ")[1].split()[0]))
            await caller.talk(0.4)
            assert (await done).interrupted is False
            assert any(p[12:] not in SILENCE for p in caller.received), "the URL's audio"
            caller.received.clear()
            sent = asyncio.ensure_future(call.send_digits("15", duration_ms=80, gap_ms=80))
            ack = await sent
            assert ack.result["method"] == "inband"
            await caller.talk(0.6)
            audio = b"".join(p[12:] for p in caller.received if p[1] & 0x7F == 0)
            pcm = np.frombuffer(ulaw_decode(audio), dtype="<i2")
            assert [d for d, _ in DtmfDetector().feed(pcm)] == ["1", "5"]
            assert eng.control.hub.cost_warning(call.session_id, 1_500_000, "USD", 1_000_000)
            assert not eng.control.hub.cost_warning("S-nobody", 1_500_000, "USD", 1_000_000)
            with pytest.raises(TypeError):
                eng.control.hub.cost_warning(call.session_id, 1.5, "USD", 1.0)
            await wait_until(lambda: any(isinstance(e, CostWarning)
                                         for e in list(call.events._queue)))
            warning = next(e for e in list(call.events._queue) if isinstance(e, CostWarning))
            assert (warning.cost.micros, warning.cost.amount, warning.currency) == \
                (1_500_000, "1.50", "USD")
            assert warning.threshold == Money(1_000_000, "USD", "1.00")
            await caller.bye()
            caller.close()
            await v.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
