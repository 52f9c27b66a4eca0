"""The REST API's outbound reach and what outlives a call, on an engine in this
process: `POST Calls.json` to a phone number through a trunk the account may use
(a raw UDP socket plays the trunk), to a registered user (a raw UDP socket that
REGISTERed with `[users]` credentials), and the toll-fraud refusals."""
from __future__ import annotations

import asyncio
import base64
import secrets

import aiohttp

from tests.helpers import UdpClient, engine_config, free_port, running_engine
from tests.test_messaging_services import register

SID = "AC0123456789abcdef0123456789abcdef"
TOKEN = "acme-auth-token-0123456789abcdef"
OTHER = "ACfedcba9876543210fedcba9876543210"
OTHER_TOKEN = "other-auth-token-0123456789abcdef"
TWIML = "<Response><Pause length=\"5\"/></Response>"


def rest_config(trunk_port: int, **engine) -> dict:
    raw = engine_config(http_addr=f"127.0.0.1:{free_port(__import__('socket').SOCK_STREAM)}",
                        **engine)
    raw["registrar"] = {"mode": "auth"}
    raw["users"] = {"alice": {"password": "alice-secret-1"}}
    raw["trunks"] = {"carrier": {"proxy": f"127.0.0.1:{trunk_port}"},
                     "spare": {"proxy": f"127.0.0.1:{trunk_port}", "prefix": "00"}}
    raw["accounts"] = {
        "acme": {"sid": SID, "auth_token": TOKEN,
                 "numbers": {"1000": {"module": "baton.hold"}},
                 "outbound": {"trunks": ["carrier", "spare"], "allow": ["+1"]}},
        "other": {"sid": OTHER, "auth_token": OTHER_TOKEN},
    }
    return raw


class Rest:
    """Form-encoded requests to the engine's REST API, as the twilio client sends them."""

    def __init__(self, eng, sid=SID, token=TOKEN):
        self.base = f"{eng.http.url}/2010-04-01/Accounts/{sid}"
        self.headers = {"Authorization": "Basic " + base64.b64encode(
            f"{sid}:{token}".encode()).decode()}

    async def __call__(self, method: str, path: str, **form) -> tuple[int, dict]:
        async with aiohttp.ClientSession(headers=self.headers) as http:
            async with http.request(method, self.base + path, data=form or None) as r:
                body = await r.json(content_type=None) if r.status != 204 else {}
                return r.status, body


async def rung_busy(eng, peer: UdpClient, uri: str, **form) -> None:
    """POST Calls.json with `form`: `peer` gets the INVITE for `uri`, answers busy,
    and the call ends `busy`."""
    rest = Rest(eng)
    code, call = await rest("POST", "/Calls.json", From="+15550100", Twiml=TWIML, **form)
    assert code == 201, call
    while True:
        req = await peer.recv(5.0)
        if req.is_request and req.method == "INVITE":
            break
    assert req.uri == uri
    busy(peer, req, eng.sip_port)
    await until_status(rest, call["sid"], "busy")


def busy(peer: UdpClient, req, port: int) -> None:
    """486 to the engine's SIP `port`, from `peer`."""
    vias = "".join(f"Via: {v}\r\n" for v in req.headers["via"])
    peer.sock.sendto((f"SIP/2.0 486 Busy Here\r\n{vias}From: {req.get('from')}\r\n"
               f"To: {req.get('to')};tag={secrets.token_hex(4)}\r\nCall-ID: {req.call_id}\r\n"
               f"CSeq: {req.cseq} INVITE\r\nContent-Length: 0\r\n\r\n").encode(),
                     ("127.0.0.1", port))


async def until_status(rest: Rest, sid: str, status: str) -> dict:
    for _ in range(200):
        code, call = await rest("GET", f"/Calls/{sid}.json")
        assert code == 200, call
        if call["status"] == status:
            return call
        await asyncio.sleep(0.05)
    raise AssertionError(f"call {sid} is {call['status']}, not {status}")


async def test_calls_reach_trunks_and_registered_users_with_the_toll_fraud_checks():
    trunk = UdpClient("127.0.0.1", 9)          # sends nothing: only receives the trunk's INVITEs
    async with running_engine(rest_config(trunk.local_port)) as eng:
        rest = Rest(eng)
        # A number that is not the engine's goes out through the account's first trunk.
        await rung_busy(eng, trunk, "sip:+15551234567@127.0.0.1", To="+15551234567")
        # `Trunk` names another of the account's trunks (its prefix stands for the "+").
        await rung_busy(eng, trunk, "sip:0015551234567@127.0.0.1", To="+15551234567",
                        Trunk="spare")

        # The toll-fraud checks `Dial` passes: a destination outside `allow`, a
        # trunk the account may not use, an account with no trunk at all.
        code, err = await rest("POST", "/Calls.json", To="+442079460000", From="+15550100",
                               Twiml=TWIML)
        assert (code, err["code"]) == (403, 21215) and "allowed destination" in err["message"]
        code, err = await rest("POST", "/Calls.json", To="+15551234567", From="+15550100",
                               Twiml=TWIML, Trunk="nosuch")
        assert (code, err["code"]) == (403, 21215) and "nosuch" in err["message"]
        code, err = await Rest(eng, OTHER, OTHER_TOKEN)(
            "POST", "/Calls.json", To="+15551234567", From="+15550100", Twiml=TWIML)
        assert (code, err["code"]) == (403, 21215) and "no trunk" in err["message"]

        # A registered user is rung where they registered from.
        code, err = await rest("POST", "/Calls.json", To="client:alice", From="+15550100",
                               Twiml=TWIML)
        assert code == 400 and "not registered" in err["message"]
        alice = UdpClient("127.0.0.1", eng.sip_port)
        await register(alice, eng.sip_port, "alice", "alice-secret-1")
        for to in ("client:alice", "alice", "sip:alice@127.0.0.1"):
            await rung_busy(eng, alice, f"sip:tester@127.0.0.1:{alice.local_port}", To=to)
        # Nothing went to the trunk meanwhile, and no outbound call is left counted.
        while True:
            try:
                m = await trunk.recv(0.2)
            except asyncio.TimeoutError:
                break
            assert m.method == "ACK", m      # the 486s' ACKs, nothing else
        assert eng.outbound_calls["acme"] == 0
        alice.close()
    trunk.close()


async def recorded_call(eng) -> tuple[dict, str]:
    """A Record=true call to the engine's own number 1000 (held: it hears music on
    hold) that its TwiML ends after 2 s; (its recording's JSON, the media's URL)."""
    rest = Rest(eng)
    code, call = await rest("POST", "/Calls.json", To="1000", From="+15550100", Record="true",
                            Twiml='<Response><Pause length="2"/><Hangup/></Response>')
    assert code == 201, call
    await until_status(rest, call["sid"], "completed")
    for _ in range(100):
        code, page = await rest("GET", f"/Calls/{call['sid']}/Recordings.json")
        if page["recordings"]:
            break
        await asyncio.sleep(0.05)
    (rec,) = page["recordings"]
    assert rec["call_sid"] == call["sid"] and rec["source"] == "OutboundAPI"
    # The whole answered call: about the 2 s its TwiML kept it up.
    assert 1 <= int(rec["duration"]) <= 4, rec
    return rec, rec["media_url"]


async def test_record_true_records_the_whole_call_and_public_recordings_need_no_credentials():
    async with running_engine(rest_config(free_port())) as eng:
        rec, media = await recorded_call(eng)
        async with aiohttp.ClientSession() as http:
            async with http.get(media) as r:
                assert r.status == 401          # the default: the account's credentials
            async with http.get(media, headers=Rest(eng).headers) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "audio/wav"
                wav = await r.read()
        assert wav[:4] == b"RIFF" and len(wav) > 8000 * 2   # more than a second of 16-bit audio
        code, err = await Rest(eng)("POST", "/Calls.json", To="1000", From="+1555",
                                    Twiml="<Response/>", Record="maybe")
        assert code == 400 and err["code"] == 21229 and "Record" in err["message"]

    async with running_engine(rest_config(free_port(), rest_recordings_public=True)) as eng:
        rec, media = await recorded_call(eng)
        async with aiohttp.ClientSession() as http:
            async with http.get(media) as r:
                assert r.status == 200 and (await r.read())[:4] == b"RIFF"
            # Public media only: the recording's JSON, and other accounts' URLs, are not.
            async with http.get(media[:-4] + ".json") as r:
                assert r.status == 401
            async with http.get(media.replace(SID, OTHER)) as r:
                assert r.status == 404


async def test_status_callbacks_pending_at_stop_are_delivered_after_a_restart():
    import os
    import socket

    from aiohttp import web
    from twilio.request_validator import RequestValidator

    port = free_port(socket.SOCK_STREAM)
    url = f"http://127.0.0.1:{port}/status"      # nothing listens yet: every attempt fails
    raw = rest_config(free_port())
    async with running_engine(raw) as eng:
        rest = Rest(eng)
        code, call = await rest("POST", "/Calls.json", To="1000", From="+15550100",
                                Twiml="<Response><Hangup/></Response>", StatusCallback=url,
                                StatusCallbackEvent=["initiated", "answered", "completed"])
        assert code == 201, call
        await until_status(rest, call["sid"], "completed")
    outbox = os.path.join(raw["engine"]["data_dir"], "rest", "callbacks.db")
    assert os.stat(outbox).st_mode & 0o777 == 0o600

    got: list[tuple[dict, str]] = []

    async def status(request):
        got.append((dict(await request.post()), request.headers.get("X-Twilio-Signature", "")))
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/status", status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with running_engine(raw):
            for _ in range(200):
                if len(got) >= 3:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
    finally:
        await runner.cleanup()
    # Each once, in the call's order, signed as Twilio signs them.
    assert [(f["CallSid"], f["SequenceNumber"], f["CallStatus"]) for f, _ in got] == [
        (call["sid"], "0", "initiated"), (call["sid"], "1", "in-progress"),
        (call["sid"], "2", "completed")]
    validator = RequestValidator(TOKEN)
    assert all(validator.validate(url, form, sig) for form, sig in got)
