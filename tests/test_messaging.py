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
    raw["accounts"]["demo"]["numbers"]["1000"]["reply"] = "unused voice param"
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
