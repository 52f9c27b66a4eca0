"""Services that text: the verification code delivered by SIP MESSAGE to a raw UDP
socket registered as the user, and proven with Verify.Check; conversations that
outlive the idle timeout."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from engine.sip import digest
from tests.helpers import Call, UdpClient, running_engine
from tests.test_messaging import answer, message, next_request, text_config
from tests.vendor_procs.harness import bearer, control_config, target


async def register(c: UdpClient, port: int, user: str, password: str) -> None:
    """REGISTER `user` from `c` (answering the digest challenge)."""
    call = Call(c, user)
    uri = f"sip:127.0.0.1:{port}"
    c.send(call.request("REGISTER", uri=uri, extra="Expires: 300\r\n"))
    ch = await c.expect(401)
    call.cseq += 1
    value = digest.authorize(ch.get("www-authenticate"), "REGISTER", uri, user, password)
    c.send(call.request("REGISTER", uri=uri,
                        extra=f"Expires: 300\r\nAuthorization: {value}\r\n"))
    await c.expect(200)


async def test_verification_code_is_texted_to_the_registered_user():
    from proto import pb

    sv = pb.services_pb2
    raw = control_config()
    raw["users"] = {"alice": {"password": "alice-secret-1"}}
    async with running_engine(raw) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        await register(c, eng.sip_port, "alice", "alice-secret-1")
        async with grpc.aio.insecure_channel(target(eng)) as ch:
            verify = pb.services_pb2_grpc.VerifyStub(ch)
            v = await verify.Create(sv.VerifyCreateRequest(
                to="sip:alice@127.0.0.1", channel="sms"), metadata=bearer())
            assert v.channel == "sms" and v.code == ""       # never in the answer
            req = await next_request(c, timeout=5)
            text = req.body.decode()
            assert text.startswith("Your verification code is ") and req.get("from")
            answer(c, req)
            code = text.rsplit(" ", 1)[1].rstrip(".")
            assert len(code) == 6 and code.isdigit()
            # The text's status goes on the verification.
            for _ in range(100):
                got = await verify.Get(sv.VerifyGetRequest(verification_id=v.verification_id),
                                       metadata=bearer())
                if got.call_outcome == "delivered":
                    break
                await asyncio.sleep(0.02)
            assert got.call_outcome == "delivered"
            wrong = str((int(code[0]) + 1) % 10) + code[1:]
            r = await verify.Check(sv.VerifyCheckRequest(
                verification_id=v.verification_id, code=wrong), metadata=bearer())
            assert not r.valid
            r = await verify.Check(sv.VerifyCheckRequest(
                verification_id=v.verification_id, code=code), metadata=bearer())
            assert r.valid
            # Metered as the verification module's text.
            (m,) = [m for m in eng.messaging.messages.values() if m.direction == "outbound"]
            assert (m.module, m.session, m.account) == ("baton.verify", "", "demo")
            # Elsewhere than this engine's users: the account's outbound rules refuse it.
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await verify.Create(sv.VerifyCreateRequest(
                    to="sip:mallory@203.0.113.7", channel="message"), metadata=bearer())
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        c.close()


async def test_texts_further_apart_than_the_idle_timeout_are_two_conversations():
    async with running_engine(text_config(idle_timeout=0.3)) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        for text in ("one", "two"):
            c.send(message(c, text.encode()))
            await c.expect(202)
            answer(c, await next_request(c))
        await asyncio.sleep(0.6)
        c.send(message(c, b"three"))
        await c.expect(202)
        answer(c, await next_request(c))
        convs = sorted((s for s in list(eng.sessions.values()) + list(eng.finished)
                        if s.kind == "messaging"), key=lambda s: s.started_mono)
        assert len(convs) == 2
        first, second = convs
        assert first.ended and first.end_reason == "idle" and len(first.messages) == 4
        assert not second.ended and len(second.messages) == 2
        c.close()


async def test_call_centre_texts_its_agents_when_a_caller_waits_too_long():
    from tests.helpers import SDP_OFFER, free_port

    raw = control_config()
    raw["users"] = {"alice": {"password": "alice-secret-1"}}
    raw["call_center"] = {"agents": {"alice": {"user": "alice"}},
                          "queues": {"q": {"account": "demo", "agents": ["alice"],
                                           "ring_timeout": 60, "text_agents_after": 1,
                                           "announce_position": False}}}
    raw["apps"] = {"cc": {"start": "n", "nodes": {"n": {"module": "baton.call_center",
                                                        "params": {"queue": "q"}}}}}
    raw["accounts"]["demo"]["numbers"]["3000"] = {"app": "cc"}
    async with running_engine(raw) as eng:
        agent = UdpClient("127.0.0.1", eng.sip_port)
        caller = UdpClient("127.0.0.1", eng.sip_port)
        try:
            await register(agent, eng.sip_port, "alice", "alice-secret-1")
            call = Call(caller, "3000")
            caller.send(call.request("INVITE", body=SDP_OFFER.format(port=free_port())))
            ok = await caller.expect(200, timeout=5)
            call.to_tag = ok.get("to").split("tag=")[1]
            caller.send(call.request("ACK", cseq=call.cseq))
            # The agent is rung (and does not pick up); after a second, a text.
            req = await next_request(agent, timeout=5)
            assert req.body.decode() == "A caller has waited 1 s in queue q (1 waiting)."
            answer(agent, req)
            for _ in range(100):
                (m,) = [m for m in eng.messaging.messages.values() if m.direction == "outbound"]
                if m.status == "delivered":
                    break
                await asyncio.sleep(0.02)
            assert (m.status, m.module, m.account, m.session) == (
                "delivered", "baton.call_center", "demo", "")
            call.cseq += 1
            caller.send(call.request("BYE"))
            await caller.expect(200)
        finally:
            agent.close()
            caller.close()


SURVEY = {
    "intro": "Two quick questions.", "outro": "Thank you!",
    "invalid_prompt": "Sorry, that is not a valid answer.",
    "questions": [
        {"id": "resolved", "say": "Was it solved? Press 1 for yes, 2 for no.",
         "text": "Was it solved? Reply 1 for yes, 2 for no.", "allowed": "12"},
        {"id": "score", "say": "From 0 to 10, how likely are you to recommend us?",
         "min": 0, "max": 10},
    ]}


async def test_survey_runs_over_texts():
    """The survey by text: the first text starts it (and is no answer), wrong answers
    get the invalid prompt and the question again, the answers are stored and the
    run is completed; a second sender's run is its own."""
    from engine.modules.services.survey import store_for

    raw = text_config()
    raw["accounts"]["demo"]["numbers"]["2200"] = {"messaging": {"app": "feedback"}}
    # The module straight on a number, its params the number's other keys.
    raw["accounts"]["demo"]["numbers"]["2201"] = {"messaging": "baton.survey", "name": "quick",
                                                  **SURVEY}
    raw["apps"]["feedback"] = {"start": "survey", "nodes": {
        "survey": {"module": "baton.survey", "params": {"name": "csat", **SURVEY}}}}
    async with running_engine(raw) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)

        async def say(body: bytes, from_user: str = "alice") -> bytes:
            c.send(message(c, body, number="2200", from_user=from_user))
            await c.expect(202)
            req = await next_request(c)
            answer(c, req)
            return req.body

        # "2" would answer the first question: sent first, it only starts the survey.
        assert await say(b"2") == b"Two quick questions.\nWas it solved? Reply 1 for yes, 2 for no."
        assert await say(b"yes") == (b"Sorry, that is not a valid answer.\n"
                                     b"Was it solved? Reply 1 for yes, 2 for no.")
        assert await say(b" 1 ") == b"From 0 to 10, how likely are you to recommend us?"
        assert await say(b"11") == (b"Sorry, that is not a valid answer.\n"
                                    b"From 0 to 10, how likely are you to recommend us?")
        assert await say(b"9#") == b"Thank you!"
        # The survey released the conversation (done, not wired: it ended).
        await asyncio.sleep(0.1)
        assert not [s for s in eng.sessions.values() if s.number == "2200"]
        # Bob leaves after the first question: his run is abandoned when the
        # conversation ends.
        assert (await say(b"hello", "bob")).endswith(b"Reply 1 for yes, 2 for no.")
        bob, = [s for s in eng.sessions.values() if s.number == "2200"]
        bob.end("idle")
        store = store_for(eng)
        await asyncio.to_thread(lambda: store.submit(lambda: None).result(5))
        runs = {r["caller"].split("@")[0]: r for r in store.results("demo", survey="csat")}
        assert runs["sip:alice"]["status"] == "completed"
        assert [(a["question"], a["answer"], a["attempts"]) for a in
                runs["sip:alice"]["answers"]] == [("resolved", "1", 2), ("score", "9", 2)]
        assert runs["sip:bob"]["status"] == "abandoned" and runs["sip:bob"]["answers"] == []
        c.send(message(c, b"hi", number="2201", from_user="carol"))
        await c.expect(202)
        req = await next_request(c)
        answer(c, req)
        assert req.body == b"Two quick questions.\nWas it solved? Reply 1 for yes, 2 for no."
        c.close()
