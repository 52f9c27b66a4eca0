"""Text conversations over SIP MESSAGE (RFC 3428): inbound checks, sessions, replies."""
from __future__ import annotations

import asyncio
import secrets

import pytest

from tests.helpers import Call, UdpClient, engine_config, running_engine


def text_config(**messaging) -> dict:
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["2000"] = {
        "messaging": {"app": "texts"}}
    raw["accounts"]["demo"]["numbers"]["1000"]["messaging"] = "baton.bot"
    raw["accounts"]["demo"]["numbers"]["1000"]["reply"] = "number 1000 heard: {Body}"
    raw["apps"] = {"texts": {"start": "bot", "nodes": {
        "bot": {"module": "baton.bot",
                "params": {"reply": "bot heard: {Body}", "keywords": {"AGENT": "agent"}},
                "outlets": {"agent": "desk"}},
        "desk": {"module": "baton.bot",
                 "params": {"reply": "desk heard: {Body}", "keywords": {"BOT": "back"}},
                 "outlets": {"back": "bot"}},
    }}}
    if messaging:
        raw["messaging"] = messaging
    # The tests' messaging apps run on this machine: let documents fetch from loopback.
    raw["security"] = {"fetch_allow": ["127.0.0.1/32"]}
    return raw


def message(c: UdpClient, body: bytes, number: str = "2000", ctype: str | None = "text/plain",
            from_user: str = "alice", extra: str = "", call: Call | None = None) -> bytes:
    call = call or Call(c, number)
    head = call.request("MESSAGE", extra=extra, to_tag=True).split(b"Content-Length")[0]
    if ctype is not None:
        head += f"Content-Type: {ctype}\r\n".encode()
    head = head.replace(b"sip:tester@", f"sip:{from_user}@".encode())
    return head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


async def next_request(c: UdpClient, method: str = "MESSAGE", timeout: float = 3.0):
    while True:
        m = await c.recv(timeout)
        if m.is_request and m.method == method:
            return m


def answer(c: UdpClient, req, status: int = 200) -> None:
    vias = "".join(f"Via: {v}\r\n" for v in req.headers["via"])
    c.send((f"SIP/2.0 {status} OK\r\n{vias}From: {req.get('from')}\r\n"
            f"To: {req.get('to')};tag={secrets.token_hex(4)}\r\nCall-ID: {req.call_id}\r\n"
            f"CSeq: {req.cseq} MESSAGE\r\nContent-Length: 0\r\n\r\n").encode())


async def test_bad_input_gets_sip_answers():
    async with running_engine(text_config(max_bytes=200)) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        c.send(message(c, b"hi", number="9999"))
        await c.expect(404)
        c.send(message(c, b"<cpim/>", ctype="message/cpim"))
        m = await c.expect(415)
        assert m.get("accept") == "text/plain"
        c.send(message(c, b"x" * 201))
        await c.expect(413)
        c.send(message(c, b"", ctype=None))
        await c.expect(400)
        c.send(message(c, b"caf\xe9"))
        m = await c.expect(400)
        assert "UTF-8" in m.reason
        c.send(message(c, b"hi", extra="Content-Encoding: gzip\r\n"))
        m = await c.expect(415)
        assert m.get("accept-encoding") == "identity"
        assert not eng.messaging.messages      # nothing refused was kept or billed
        # The engine goes on: a good text still gets its 202.
        c.send(message(c, "olá".encode()))
        await c.expect(202)
        c.close()


async def test_conversation_passes_between_modules_and_back():
    async with running_engine(text_config()) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        replies = []
        for text in ("hello", "AGENT", "where am I", "BOT", "again"):
            c.send(message(c, text.encode()))
            await c.expect(202)
            req = await next_request(c)
            answer(c, req)
            replies.append(req.body.decode())
            assert req.get("content-type").startswith("text/plain")
        assert replies == ["bot heard: hello", "desk heard: AGENT", "desk heard: where am I",
                           "bot heard: BOT", "bot heard: again"]
        # One conversation, one session, with its module history.
        (session,) = [s for s in eng.sessions.values() if s.kind == "messaging"]
        assert [h.node for h in session.history] == ["bot", "desk", "bot"]
        assert [h.reason for h in session.history] == ["initial", "outlet:agent", "outlet:back"]
        assert len(session.messages) == 10
        await asyncio.sleep(0.1)
        out = [m for m in eng.messaging.messages.values() if m.direction == "outbound"]
        assert {m.status for m in out} == {"delivered"} and {m.sip_code for m in out} == {200}
        # Another sender is another conversation.
        c.send(message(c, b"hi", from_user="bob"))
        await c.expect(202)
        answer(c, await next_request(c))
        assert len([s for s in eng.sessions.values() if s.kind == "messaging"]) == 2
        c.close()


SECRET = "messaging-app-secret-0123"


async def test_twilio_messaging_response_app_and_back_to_the_bot():
    """An app written with twilio's MessagingResponse, signed requests, status callbacks,
    and `<Redirect>outlet:...` back to a built-in module."""
    from twilio.twiml.messaging_response import MessagingResponse

    from tests.twiml_apps import AppServer

    app = AppServer(secret=SECRET)

    def sms(params, _req):
        r = MessagingResponse()
        if params["Body"] == "BYE":
            r.redirect("outlet:bot")
            return str(r)
        r.message(f"You said {params['Body']} ({params['NumSegments']} segment)",
                  action="/status")
        return str(r)

    app.route("/sms", sms)
    app.route("/status", lambda _p, _r: "")
    await app.start()
    raw = text_config()
    raw["accounts"]["demo"]["numbers"]["3000"] = {"messaging": app.url + "/sms"}
    raw["apps"]["texts"]["nodes"]["bot"]["outlets"]["agent"] = "app"
    raw["apps"]["texts"]["nodes"]["app"] = {"module": "baton.instructions",
                                            "params": {"url": app.url + "/sms"},
                                            "outlets": {"bot": "bot"}}
    try:
        async with running_engine(raw) as eng:
            eng.cfg.raw["accounts"]["demo"].update(secret=SECRET, twilio_signature=True)
            c = UdpClient("127.0.0.1", eng.sip_port)
            c.send(message(c, "héllo".encode(), number="3000"))
            await c.expect(202)
            req = await next_request(c)
            answer(c, req, 202)
            assert req.body.decode() == "You said héllo (1 segment)"
            (got,) = app.got("/sms")
            p = got.params
            assert got.twilio_valid is True and got.baton_valid is True
            assert p["From"] == "alice" or p["From"].startswith("sip:alice@")
            assert (p["To"], p["Body"], p["NumSegments"], p["NumMedia"], p["SmsStatus"],
                    p["ApiVersion"]) == ("3000", "héllo", "1", "0", "received", "2010-04-01")
            assert p["MessageSid"].startswith("SM") and p["AccountSid"] == "demo"
            assert p["SessionSid"] in eng.sessions
            (status,) = await app.wait_for("/status")
            assert status.params["MessageStatus"] == "sent"
            assert status.twilio_valid is True
            # From the bot to the app and back by the app's Redirect.
            for text, want in (("AGENT", "You said AGENT (1 segment)"), ("BYE", "bot heard: BYE")):
                c.send(message(c, text.encode()))
                await c.expect(202)
                req = await next_request(c)
                answer(c, req)
                assert req.body.decode() == want
            s = next(s for s in eng.sessions.values() if s.number == "2000")
            assert [h.module for h in s.history] == ["baton.bot", "baton.instructions", "baton.bot"]
            c.close()
    finally:
        await app.stop()


async def test_message_inside_a_call_is_that_sessions_text():
    from tests.helpers import SDP_OFFER

    async with running_engine(text_config()) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        call = Call(c, "1000")
        c.send(call.request("INVITE", SDP_OFFER.format(port=40000)))
        ok = await c.expect(200)
        call.to_tag = ok.to_tag
        call.cseq += 1
        c.send(call.request("ACK", cseq=1))
        (session,) = eng.sessions.values()
        c.send(message(c, b"during the call", call=call))
        await c.expect(202)
        (m,) = eng.messaging.messages.values()
        assert (m.session, m.body, m.module) == (session.id, "during the call", "baton.hold")
        # A MESSAGE naming a dialog that does not exist is 481, not a new conversation.
        ghost = Call(c, "2000")
        ghost.to_tag = "nosuchtag"
        c.send(message(c, b"lost", call=ghost))
        await c.expect(481)
        assert len(eng.messaging.messages) == 1
        c.close()


async def test_digest_auth_when_configured():
    from engine.sip import digest

    raw = text_config(auth=True)
    raw["users"] = {"alice": {"password": "alice-secret"}}
    async with running_engine(raw) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        call = Call(c, "2000")
        c.send(message(c, b"hi", call=call))
        ch = await c.expect(401)
        uri = f"sip:2000@127.0.0.1:{eng.sip_port}"
        value = digest.authorize(ch.get("www-authenticate"), "MESSAGE", uri, "alice", "wrong")
        call.cseq += 1
        c.send(message(c, b"hi", call=call, extra=f"Authorization: {value}\r\n"))
        await c.expect(403)
        assert not eng.messaging.messages
        value = digest.authorize(ch.get("www-authenticate"), "MESSAGE", uri, "alice",
                                 "alice-secret")
        call.cseq += 1
        c.send(message(c, b"hi", call=call, extra=f"Authorization: {value}\r\n"))
        await c.expect(202)
        c.close()


async def test_policy_denial_is_403_and_outbound_is_checked():
    raw = text_config()
    raw["policy"] = {"deny_modules": {"demo": ["baton.instructions"]}}
    raw["accounts"]["demo"]["numbers"]["3000"] = {"messaging": "http://127.0.0.1:9/x"}
    async with running_engine(raw) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        c.send(message(c, b"hi", number="3000"))
        m = await c.expect(403)
        assert not eng.messaging.messages
        # A module may text anyone only as the account's outbound rules allow
        # (deny by default): no toll fraud by text.
        c.send(message(c, b"hi"))
        await c.expect(202)
        answer(c, await next_request(c))
        s = next(s for s in eng.sessions.values() if s.kind == "messaging")
        sent = eng.messaging.send(s, "premium", to="+19005550100", trunk=None)
        assert (sent.status, sent.sip_code) == ("failed", 403)
        sent = eng.messaging.send(s, "elsewhere", to="sip:bob@203.0.113.9")
        assert (sent.status, sent.sip_code) == ("failed", 403)
        assert eng.outbound_denials
        c.close()


async def test_texts_are_stamped_per_message_and_segment():
    async with running_engine(text_config()) as eng:
        stamps = []
        eng.stamper.action = lambda s, module, action, count: stamps.append((module, action, count))
        c = UdpClient("127.0.0.1", eng.sip_port)
        c.send(message(c, ("x" * 300).encode()))     # GSM-7, 2 segments; the reply 3
        await c.expect(202)
        answer(c, await next_request(c))
        await asyncio.sleep(0.05)
        assert stamps == [("baton.bot", "message_in", 1), ("baton.bot", "message_in_segments", 2),
                          ("baton.bot", "message_out", 1), ("baton.bot", "message_out_segments", 3)]
        c.close()


async def test_udp_retransmits_and_records_undelivered():
    async with running_engine(text_config()) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        c.send(message(c, b"hello"))
        await c.expect(202)
        first = await next_request(c)
        again = await next_request(c)        # RFC 3261 17.1.2.2 Timer E: the same request
        assert again.call_id == first.call_id and again.cseq == first.cseq
        answer(c, again, 480)
        for _ in range(50):
            out = [m for m in eng.messaging.messages.values() if m.direction == "outbound"]
            if out and out[0].status == "undelivered":
                break
            await asyncio.sleep(0.02)
        assert (out[0].status, out[0].sip_code) == ("undelivered", 480)
        c.close()


def test_segments_follow_the_carrier_rule():
    from engine.common.segments import encoding, segments, split

    assert [segments("a" * n) for n in (1, 160, 161, 306, 307)] == [1, 1, 2, 2, 3]
    assert [segments("ж" * n) for n in (70, 71, 134, 135)] == [1, 2, 2, 3]
    assert (encoding("€uro"), segments("€" * 80), segments("€" * 81)) == ("GSM-7", 1, 2)
    assert "".join(split("ж" * 135)) == "ж" * 135
    assert segments("😀" * 35) == 1 and segments("😀" * 36) == 2


async def test_number_keys_are_the_messaging_modules_params():
    """A number entry's other keys go to its messaging module as to its voice module;
    a key of the messaging table itself wins."""
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"].update({
        "2100": {"messaging": "baton.bot", "reply": "texts only: {Body}"},
        "2101": {"module": "baton.hold", "messaging": {"module": "baton.bot"},
                 "reply": "shared: {Body}", "keywords": {"STOP": "done"}},
        "2102": {"messaging": {"module": "baton.bot", "reply": "own: {Body}"},
                 "reply": "not this"},
    })
    async with running_engine(raw) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        for number, want in (("2100", b"texts only: hi"), ("2101", b"shared: hi"),
                             ("2102", b"own: hi")):
            c.send(message(c, b"hi", number=number))
            await c.expect(202)
            req = await next_request(c)
            assert req.body == want, number
            answer(c, req)
        # The number's keywords too: STOP leaves the bot through its outlet (the number's
        # node has none, so the conversation ends) and gets no reply.
        (first,) = {m.session for m in eng.messaging.messages.values() if m.to == "2101"}
        assert first in eng.sessions
        c.send(message(c, b"stop", number="2101"))
        await c.expect(202)
        await asyncio.sleep(0.2)
        assert first not in eng.sessions
        assert not [m for m in eng.messaging.messages.values()
                    if m.session == first and m.body == "shared: stop"]
        c.close()


def test_number_keys_are_checked_as_the_messaging_modules_params():
    from engine.config.load import ConfigError, from_dict

    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["2100"] = {"messaging": "baton.bot", "reply": 7}
    with pytest.raises(ConfigError) as exc:
        from_dict(raw, "t.toml")
    assert "accounts.demo.numbers.2100.messaging.reply" in str(exc.value)
