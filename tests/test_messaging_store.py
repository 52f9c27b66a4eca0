"""Texts outlive the engine: `baton serve` restarted on the same data directory still
answers `GET Messages/{Sid}.json` and `GET Messages.json` (the official `twilio` client)
for the texts of the run before, with their status, segments and conversation; a text
the stopped engine never finished sending is `failed`."""
from __future__ import annotations

import asyncio
import json
import tempfile

import pytest

twilio = pytest.importorskip("twilio")
from twilio.rest import Client  # noqa: E402

from tests.helpers import EngineProcess, UdpClient, free_port  # noqa: E402
from tests.test_messaging import answer, message, next_request  # noqa: E402
from tests.test_messaging_services import register  # noqa: E402
from tests.test_rest import raw, wait_for  # noqa: E402

SID = "AC0123456789abcdef0123456789abcd01"
TOKEN = "store-auth-token-0123456789abcdef"
PASSWORD = "alice-secret-0123"
LONG = "x" * 170        # GSM-7, over 160 characters: two segments


def start(path, data_dir) -> EngineProcess:
    http_port = free_port()
    eng = EngineProcess(str(path), extra=["--data-dir", data_dir, "--no-accountant",
                                          "--http-addr", f"127.0.0.1:{http_port}"])
    eng.http_url = f"http://127.0.0.1:{http_port}"
    eng.wait_ready()
    wait_for(lambda: raw(eng, "GET", "/health", auth=None)[0] == 200, what="HTTP")
    return eng


def get(engine, sid: str) -> tuple[int, dict]:
    status, _, body = raw(engine, "GET", f"/2010-04-01/Accounts/{SID}/Messages/{sid}.json",
                          auth=(SID, TOKEN))
    return status, json.loads(body)


def client_for(engine) -> Client:
    c = Client(SID, TOKEN)
    c.api.base_url = engine.http_url
    return c


async def test_texts_survive_a_restart(tmp_path):
    path = tmp_path / "store.toml"
    path.write_text(f"""
[media]
address = "127.0.0.1"

[accounts.acme]
sid = "{SID}"
auth_token = "{TOKEN}"

[accounts.acme.numbers]
"1000" = {{ messaging = {{ module = "baton.bot", reply = "bot heard: {{Body}}" }} }}

[users.alice]
password = "{PASSWORD}"
""")
    data_dir = tempfile.mkdtemp(prefix="baton-data-", dir=tmp_path)
    first = start(path, data_dir)
    try:
        c = UdpClient("127.0.0.1", first.port)
        await register(c, first.port, "alice", PASSWORD)
        # A conversation: alice's long text, the bot's reply (delivered: answered 200).
        c.send(message(c, LONG.encode(), number="1000", from_user="alice"))
        await c.expect(202)
        reply = await next_request(c, timeout=5)
        assert reply.body == f"bot heard: {LONG}".encode()
        answer(c, reply, 200)
        client = client_for(first)
        await asyncio.to_thread(wait_for, lambda: [
            m for m in client.messages.list() if m.status == "delivered"], 10, "delivered")
        # A text the engine is still sending when it stops (alice never answers it).
        pending = client.messages.create(to="alice", from_="1000", body="are you there?")
        assert (await next_request(c, timeout=5)).body == b"are you there?"
        before = {m.sid: m for m in client.messages.list()}
        assert len(before) == 3
        inbound, = [m for m in before.values() if m.direction == "inbound"]
        out, = [m for m in before.values() if m.body.startswith("bot heard")]
        assert before[pending.sid].status in ("queued", "sending")
        assert inbound.num_segments == out.num_segments == "2"
        status, was = get(first, out.sid)
        assert status == 200 and was["baton_session_sid"] and was["num_segments"] == "2"
        c.close()
    finally:
        assert first.stop() == 0, first.output()

    second = start(path, data_dir)
    with second:
        client = client_for(second)
        after = {m.sid: m for m in client.messages.list()}
        assert set(after) == set(before)
        for sid in (inbound.sid, out.sid):
            m = client.messages(sid).fetch()
            assert (m.status, m.body, m.num_segments, m.direction, m.from_, m.to) == \
                (before[sid].status, before[sid].body, "2", before[sid].direction,
                 before[sid].from_, before[sid].to)
            assert m.date_created == before[sid].date_created
        assert client.messages(inbound.sid).fetch().status == "received"
        assert client.messages(out.sid).fetch().status == "delivered"
        # Both texts of the conversation keep its session id (Baton's field in the JSON).
        status, now = get(second, out.sid)
        assert status == 200 and now == was
        status, theirs = get(second, inbound.sid)
        assert status == 200 and theirs["baton_session_sid"] == was["baton_session_sid"]
        # Never finished by the run that sent it: failed, saying why.
        gone = client.messages(pending.sid).fetch()
        assert gone.status == "failed" and "engine stopped" in gone.error_message
        assert gone.error_code == 30008
        assert get(second, "SM" + "0" * 32)[0] == 404
        assert second.stop() == 0, second.output()


async def test_a_text_no_longer_in_memory_is_read_from_the_file(monkeypatch):
    from engine.sessions import conversations
    from tests.helpers import engine_config, running_engine

    monkeypatch.setattr(conversations, "MAX_KEPT", 2)
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["2000"] = {"messaging": "baton.bot"}   # no reply
    async with running_engine(raw) as eng:
        c = UdpClient("127.0.0.1", eng.sip_port)
        for body in (b"one", b"two", b"three"):
            c.send(message(c, body, number="2000"))
            await c.expect(202)
        await asyncio.sleep(0.3)            # the writer's batch
        kept = list(eng.messaging.messages.values())
        assert [m.body for m in kept] == ["two", "three"]
        (first,) = [r for r in eng.messaging.store.newest(10) if r["body"] == "one"]
        m = eng.messaging.get(first["sid"])
        assert (m.body, m.status, m.direction, m.session) == ("one", "received", "inbound",
                                                              kept[0].session)
        assert eng.messaging.get("SM" + "0" * 32) is None
        c.close()
