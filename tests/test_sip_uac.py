"""The engine as UAC: outbound INVITEs against a second engine and a challenging UAS."""
from __future__ import annotations

import asyncio

from engine.sip import build
from engine.sip.digest import DigestServer
from ext.sip_py import parse_message
from engine.sip.uac import CallState, OutgoingCall, UacOwner
from tests.helpers import SDP_OFFER, engine_config, running_engine


class Recorder(UacOwner):
    def __init__(self):
        self.events = []
        self.done = asyncio.get_running_loop().create_future()

    def call_progress(self, call, status, msg):
        self.events.append(("progress", status))

    def call_answered(self, call, msg):
        self.events.append(("answered", msg.status))
        if not self.done.done():
            self.done.set_result("answered")

    def call_failed(self, call, status, msg):
        self.events.append(("failed", status))
        if not self.done.done():
            self.done.set_result(status)


def caller_config():
    raw = engine_config()
    base = raw["media"]["rtp_port_min"] + 4000
    raw["media"].update(rtp_port_min=base, rtp_port_max=base + 100)
    return raw


async def test_outbound_call_answered_then_bye():
    async with running_engine() as callee, running_engine(caller_config()) as caller:
        rec = Recorder()
        call = OutgoingCall(caller.sip, f"sip:1000@127.0.0.1:{callee.sip_port}",
                            from_uri="<sip:caller@127.0.0.1>",
                            sdp=SDP_OFFER.format(port=42000).encode(), owner=rec)
        await call.start()
        assert await asyncio.wait_for(rec.done, 3) == "answered"
        assert call.state == CallState.ANSWERED and call.dialog is not None
        assert b"m=audio" in call.dialog.remote_sdp
        await asyncio.sleep(0.1)
        assert len(callee.sessions) == 1  # the callee got the ACK and holds the call
        session = next(iter(callee.sessions.values()))
        assert session.legs[0].dialog.ok_data is None  # ACK arrived: no 2xx retransmission
        call.hangup()
        for _ in range(50):
            if not callee.sessions:
                break
            await asyncio.sleep(0.02)
        assert callee.sessions == {} and session.end_reason == "hangup"


async def test_outbound_call_rejected_is_acked():
    async with running_engine() as callee, running_engine(caller_config()) as caller:
        rec = Recorder()
        call = OutgoingCall(caller.sip, f"sip:9999@127.0.0.1:{callee.sip_port}",
                            from_uri="<sip:caller@127.0.0.1>",
                            sdp=SDP_OFFER.format(port=42000).encode(), owner=rec)
        await call.start()
        assert await asyncio.wait_for(rec.done, 3) == 404
        await asyncio.sleep(0.1)
        # The callee's INVITE server transaction saw the ACK: Confirmed, no Timer G resends.
        states = [st.state.name for st in callee.sip.transactions.server.values() if st.is_invite]
        assert states in ([], ["CONFIRMED"])


async def test_outbound_call_cancelled_while_ringing():
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["1005"] = {"module": "baton.hold", "ring_seconds": 10}
    async with running_engine(raw) as callee, running_engine(caller_config()) as caller:
        rec = Recorder()
        call = OutgoingCall(caller.sip, f"sip:1005@127.0.0.1:{callee.sip_port}",
                            from_uri="<sip:caller@127.0.0.1>",
                            sdp=SDP_OFFER.format(port=42000).encode(), owner=rec)
        await call.start()
        for _ in range(100):
            if ("progress", 180) in rec.events:
                break
            await asyncio.sleep(0.02)
        assert ("progress", 180) in rec.events
        call.cancel()
        assert await asyncio.wait_for(rec.done, 3) == 487
        assert call.state == CallState.CANCELLED
        await asyncio.sleep(0.05)
        assert callee.sessions == {}


async def test_outbound_call_over_tcp():
    async with running_engine() as callee, running_engine(caller_config()) as caller:
        rec = Recorder()
        call = OutgoingCall(caller.sip, f"sip:1000@127.0.0.1:{callee.sip_port};transport=tcp",
                            from_uri="<sip:caller@127.0.0.1>",
                            sdp=SDP_OFFER.format(port=42000).encode(), owner=rec)
        await call.start()
        assert await asyncio.wait_for(rec.done, 3) == "answered"
        assert call.flow.reliable
        call.hangup()
        for _ in range(50):
            if not callee.sessions:
                break
            await asyncio.sleep(0.02)
        assert callee.sessions == {}


async def test_outbound_call_answers_digest_challenge():
    """A UAS on a raw socket challenges the INVITE (401), then checks the credentials."""
    server = DigestServer(realm="trunk.test", secret=b"0123456789abcdef0123")
    loop = asyncio.get_running_loop()
    seen = []

    class Uas(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.t = transport

        def datagram_received(self, data, addr):
            msg = parse_message(data)
            seen.append(msg.method)
            resp = None
            if msg.method == "INVITE":
                auth = msg.get("authorization")
                if auth is None:
                    resp = build.response(msg, 401, addr, "t401", headers=[
                        ("www-authenticate", v) for v in server.challenge()])
                else:
                    result = server.verify("INVITE", auth,
                                           lambda u, r: "s3cret" if u == "acme" else None)
                    status = 200 if result.ok else 403
                    resp = build.response(msg, status, addr, "t200", headers=[
                        ("contact", f"<sip:trunk@127.0.0.1:{port}>"),
                        ("content-type", "application/sdp")],
                        body=SDP_OFFER.format(port=43000).encode() if status == 200 else b"")
            elif msg.method == "BYE":
                resp = build.response(msg, 200, addr)
            if resp is not None:
                self.t.sendto(resp, addr)

    transport, _ = await loop.create_datagram_endpoint(Uas, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        async with running_engine(caller_config()) as caller:
            rec = Recorder()
            call = OutgoingCall(caller.sip, f"sip:+15551234@127.0.0.1:{port}",
                                from_uri="<sip:acme@127.0.0.1>", credentials=("acme", "s3cret"),
                                sdp=SDP_OFFER.format(port=42000).encode(), owner=rec)
            await call.start()
            assert await asyncio.wait_for(rec.done, 3) == "answered"
            assert seen[:3] == ["INVITE", "ACK", "INVITE"]  # 401 ACKed, then the retry
            await asyncio.sleep(0.05)
            assert seen.count("ACK") == 2
            call.hangup()
            await asyncio.sleep(0.1)
            assert "BYE" in seen
    finally:
        transport.close()
