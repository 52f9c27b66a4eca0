"""The texts APIs against a real `baton serve`: gRPC `Messages` (Send, Get, List,
Watch) and the REST API's `Messages.json` driven by the official `twilio` client,
each text delivered by SIP MESSAGE to a raw UDP socket registered as the user;
the status callback checked with Twilio's RequestValidator; bad input named,
refused recipients, other accounts' texts not found."""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest

twilio = pytest.importorskip("twilio")
from twilio.base.exceptions import TwilioRestException  # noqa: E402
from twilio.request_validator import RequestValidator  # noqa: E402
from twilio.rest import Client  # noqa: E402

from tests.helpers import EngineProcess, UdpClient, free_port  # noqa: E402
from tests.test_messaging import answer, message, next_request  # noqa: E402
from tests.test_messaging_services import register  # noqa: E402
from tests.test_rest import app_server, raw, wait_for  # noqa: E402,F401  (a fixture)

SID = "AC0123456789abcdef0123456789abcdef"
TOKEN = "acme-auth-token-0123456789abcdef"
OTHER = "ACfedcba9876543210fedcba9876543210"
OTHER_TOKEN = "other-auth-token-0123456789abcdef"
API = "acme-grpc-token-0123456789abcdef"
OTHER_API = "other-grpc-token-0123456789abcdef"
PASSWORD = "alice-secret-0123"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("messages") / "messages.toml"
    path.write_text(f"""
[media]
address = "127.0.0.1"

[security]
fetch_allow = ["127.0.0.1/32"]      # the status callbacks' server runs on this machine

[accounts.acme]
sid = "{SID}"
auth_token = "{TOKEN}"
api_tokens = ["{API}"]

[accounts.acme.numbers]
"1000" = {{ messaging = {{ module = "baton.bot", reply = "bot heard: {{Body}}" }} }}
"1001" = {{ module = "baton.hold", messaging = "http://127.0.0.1:9/sms" }}
"1002" = {{ module = "baton.hold" }}

[accounts.other]
sid = "{OTHER}"
auth_token = "{OTHER_TOKEN}"
api_tokens = ["{OTHER_API}"]

[accounts.other.numbers]
"4999" = {{ module = "baton.hold" }}

[users.alice]
password = "{PASSWORD}"
""")
    http_port = free_port()
    eng = EngineProcess(str(path), extra=["--http-addr", f"127.0.0.1:{http_port}"])
    eng.http_url = f"http://127.0.0.1:{http_port}"
    with eng:
        wait_for(lambda: raw(eng, "GET", "/health", auth=None)[0] == 200, what="HTTP")
        yield eng
        eng.stop()


def bearer(token: str = API) -> tuple:
    return (("authorization", f"Bearer {token}"),)


async def alice(engine) -> UdpClient:
    c = UdpClient("127.0.0.1", engine.port)
    await register(c, engine.port, "alice", PASSWORD)
    return c


async def test_grpc_send_get_list_watch(engine):
    from proto import pb

    mp = pb.messages_pb2
    c = await alice(engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.grpc_port}") as ch:
            api = pb.messages_pb2_grpc.MessagesStub(ch)
            sent = await api.Send(mp.MessagesSendRequest(to="alice", body="héllo alice",
                                                         **{"from": "1000"}), metadata=bearer())
            assert sent.sid.startswith("SM") and sent.status == "queued"
            assert (sent.account, sent.direction, sent.module) == ("acme", "outbound",
                                                                   "baton.messages")
            watch = api.Watch(mp.MessagesWatchRequest(sid=sent.sid), metadata=bearer())
            req = await next_request(c, timeout=5)
            assert req.body.decode() == "héllo alice" and "sip:1000@" in req.get("from")
            answer(c, req, 200)
            statuses = [m.status async for m in watch]
            assert statuses[-1] == "delivered"
            got = await api.Get(mp.MessagesGetRequest(sid=sent.sid), metadata=bearer())
            assert (got.status, got.sip_code, got.segments) == ("delivered", 200, 1)

            # An inbound text to the account's number, and the bot's reply, on one session.
            c.send(message(c, b"hi bot", number="1000"))
            await c.expect(202)
            reply = await next_request(c, timeout=5)
            assert reply.body == b"bot heard: hi bot"
            answer(c, reply, 202)
            listed = await api.List(mp.MessagesListRequest(direction="inbound"),
                                    metadata=bearer())
            (inbound,) = listed.messages
            assert inbound.body == "hi bot" and inbound.session_id
            conv = await api.List(mp.MessagesListRequest(session_id=inbound.session_id),
                                  metadata=bearer())
            assert [m.direction for m in conv.messages][-1] == "inbound"
            assert len(conv.messages) == 2
            everything = await api.List(mp.MessagesListRequest(), metadata=bearer())
            assert sent.sid in {m.sid for m in everything.messages}

            # Another account sees none of them.
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await api.Get(mp.MessagesGetRequest(sid=sent.sid), metadata=bearer(OTHER_API))
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
            theirs = await api.List(mp.MessagesListRequest(), metadata=bearer(OTHER_API))
            assert not theirs.messages

            # Bad input names its field; an unknown token is refused.
            for req_kw, field in (({"to": "", "body": "x"}, "to"),
                                  ({"to": "alice", "body": ""}, "body"),
                                  ({"to": "alice", "body": "x" * 5000}, "body"),
                                  ({"to": "sip:bad uri@", "body": "x"}, "to"),
                                  ({"to": "alice", "body": "x", "from": "4999"}, "from"),
                                  ({"to": "alice", "body": "x", "trunk": "nope"}, "trunk")):
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await api.Send(mp.MessagesSendRequest(**req_kw), metadata=bearer())
                assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert exc.value.details().startswith(field + ":"), exc.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await api.List(mp.MessagesListRequest(limit=5000), metadata=bearer())
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await api.Get(mp.MessagesGetRequest(sid=sent.sid), metadata=bearer("nope"))
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Elsewhere than this engine: the account's outbound rules refuse it.
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await api.Send(mp.MessagesSendRequest(to="sip:mallory@203.0.113.7", body="x"),
                               metadata=bearer())
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # A user who never registered: accepted, then failed with 404.
            bob = await api.Send(mp.MessagesSendRequest(to="bob", body="anyone?"),
                                 metadata=bearer())
            final = [m async for m in api.Watch(mp.MessagesWatchRequest(sid=bob.sid),
                                                metadata=bearer())][-1]
            assert (final.status, final.sip_code) == ("failed", 404)
    finally:
        c.close()


def client_for(engine, sid=SID, token=TOKEN) -> Client:
    c = Client(sid, token)
    c.api.base_url = engine.http_url
    return c


async def test_rest_messages_with_the_twilio_client(engine, app_server):
    c = await alice(engine)
    client = client_for(engine)
    try:
        callback = f"{app_server.url}/status"
        msg = client.messages.create(to="sip:alice@127.0.0.1", from_="1000", body="your table",
                                     status_callback=callback)
        assert msg.sid.startswith("SM") and msg.status in ("queued", "sending")
        assert msg.account_sid == SID and msg.num_segments == "1"
        req = await next_request(c, timeout=5)
        assert req.body == b"your table"
        answer(c, req, 202)           # accepted, not known delivered: "sent"
        await asyncio.to_thread(wait_for, lambda: [
            f for _, f, _ in app_server.callbacks if f.get("MessageSid") == msg.sid],
            10, "the status callback")
        (url, form, signature), = [cb for cb in app_server.callbacks
                                   if cb[1].get("MessageSid") == msg.sid]
        assert RequestValidator(TOKEN).validate(url, form, signature)
        assert form["MessageStatus"] == form["SmsStatus"] == "sent"
        assert (form["AccountSid"], form["From"], form["To"]) == (SID, "1000",
                                                                  "sip:alice@127.0.0.1")
        assert "ErrorCode" not in form
        fetched = client.messages(msg.sid).fetch()
        assert fetched.status == "sent" and fetched.body == "your table"
        assert msg.sid in {m.sid for m in client.messages.list(to="sip:alice@127.0.0.1")}

        # Refused recipients, a From of no number of the account, missing parameters.
        with pytest.raises(TwilioRestException) as exc:
            client.messages.create(to="sip:mallory@203.0.113.7", from_="1000", body="x")
        assert (exc.value.status, exc.value.code) == (403, 21610)
        with pytest.raises(TwilioRestException) as exc:
            client.messages.create(to="alice", from_="4999", body="x")
        assert (exc.value.status, exc.value.code) == (400, 21606)
        with pytest.raises(TwilioRestException) as exc:
            client.messages.create(to="alice", from_="1000", body="")
        assert exc.value.status == 400 and "Body" in exc.value.msg
        # Another account's text is not there for this one.
        with pytest.raises(TwilioRestException) as exc:
            client_for(engine, OTHER, OTHER_TOKEN).messages(msg.sid).fetch()
        assert exc.value.status == 404
        assert not client_for(engine, OTHER, OTHER_TOKEN).messages.list()
        # The engine goes on: the next text still goes out.
        again = client.messages.create(to="alice", from_="1000", body="still here")
        answer(c, await next_request(c, timeout=5), 200)
        await asyncio.to_thread(wait_for, lambda: client.messages(again.sid).fetch().status
                                == "delivered", 10, "delivered")
    finally:
        c.close()


def test_numbers_show_their_sms_capability_with_the_twilio_client(engine):
    numbers = {n.phone_number: n for n in client_for(engine).incoming_phone_numbers.list()}
    # Every number of the account, those for texts only too; never another account's.
    assert set(numbers) == {"1000", "1001", "1002"}
    texts_only, both, voice_only = numbers["1000"], numbers["1001"], numbers["1002"]
    assert texts_only.capabilities == {"voice": False, "sms": True, "mms": False, "fax": False}
    assert both.capabilities == {"voice": True, "sms": True, "mms": False, "fax": False}
    assert voice_only.capabilities == {"voice": True, "sms": False, "mms": False, "fax": False}
    # An instruction app answering texts is the number's SmsUrl, as Twilio names it.
    assert (both.sms_url, both.sms_method) == ("http://127.0.0.1:9/sms", "POST")
    assert texts_only.sms_url is None and voice_only.sms_url is None
    assert texts_only.voice_url is None and texts_only.sms_application_sid is None
    status, _, body = raw(engine, "GET", f"/2010-04-01/Accounts/{SID}/IncomingPhoneNumbers.json",
                          auth=(SID, TOKEN))
    rows = {r["phone_number"]: r for r in json.loads(body)["incoming_phone_numbers"]}
    assert status == 200
    assert rows["1000"]["baton_messaging_target"] == {"kind": "module", "target": "baton.bot",
                                                      "module": "baton.bot"}
    assert rows["1000"]["baton_target"] is None
    assert rows["1002"]["baton_messaging_target"] is None
    other = client_for(engine, OTHER, OTHER_TOKEN).incoming_phone_numbers.list()
    assert [(n.phone_number, n.capabilities["sms"]) for n in other] == [("4999", False)]
