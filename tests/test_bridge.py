"""baton.bridge against a scripted far end: trunks with digest, ring-back, outcomes, time limit."""
from __future__ import annotations

import asyncio
import logging

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from engine.sip import build  # noqa: E402
from engine.sip.digest import DigestServer  # noqa: E402
from ext.sip_py import parse_message  # noqa: E402
from tests.helpers import SDP_OFFER, engine_config, running_engine  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402


class FarEnd(asyncio.DatagramProtocol):
    """A scripted UAS: optional digest challenge, 180, then `final` after `delay`."""

    def __init__(self, final=200, delay=0.3, secret=None, hangup_after=None):
        self.final = final
        self.delay = delay
        self.server = DigestServer(realm="trunk.test", secret=b"0123456789abcdef0123") if secret else None
        self.secret = secret
        self.hangup_after = hangup_after
        self.seen = []
        self.invites = []
        self.byes = 0

    def connection_made(self, transport):
        self.t = transport
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data, addr):
        msg = parse_message(data)
        if not msg.is_request:
            return
        self.seen.append(msg.method)
        loop = asyncio.get_running_loop()
        if msg.method == "INVITE":
            self.invites.append(msg)
            if self.server is not None:
                auth = msg.get("authorization")
                if auth is None or not self.server.verify(
                        "INVITE", auth, lambda u, r: self.secret if u == "acme" else None).ok:
                    self.t.sendto(build.response(msg, 401, addr, "c1", headers=[
                        ("www-authenticate", v) for v in self.server.challenge()]), addr)
                    return
            self.t.sendto(build.response(msg, 180, addr, "far1"), addr)
            loop.call_later(self.delay, self._final, msg, addr)
        elif msg.method == "BYE":
            self.byes += 1
            self.t.sendto(build.response(msg, 200, addr), addr)
        elif msg.method == "CANCEL":
            self.t.sendto(build.response(msg, 200, addr), addr)

    def _final(self, msg, addr):
        if self.final == 200:
            self.t.sendto(build.response(msg, 200, addr, "far1", headers=[
                ("contact", f"<sip:far@127.0.0.1:{self.port}>"), ("content-type", "application/sdp")],
                body=SDP_OFFER.format(port=self.port + 2).encode()), addr)
            if self.hangup_after is not None:
                asyncio.get_running_loop().call_later(self.hangup_after, self._bye, msg, addr)
        elif self.final:
            self.t.sendto(build.response(msg, self.final, addr, "far1"), addr)

    def _bye(self, invite, addr):
        to = invite.get("from")
        self.t.sendto(build.request("BYE", invite.get("contact").strip("<>"), [
            ("via", f"SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bKfarbye"),
            ("max-forwards", "70"), ("from", invite.get("to") + ";tag=far1"), ("to", to),
            ("call-id", invite.call_id), ("cseq", "1 BYE")]), addr)


async def far_end(**kw):
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: FarEnd(**kw),
                                                          local_addr=("127.0.0.1", 0))
    return transport, proto


async def test_trunk_with_digest_ringback_and_bridge():
    transport, far = await far_end(secret="s3cret")
    raw = engine_config()
    raw["trunks"] = {"pstn": {"proxy": f"127.0.0.1:{far.port}", "username": "acme",
                              "password": "s3cret", "prefix": "00", "domain": "trunk.test"}}
    raw["accounts"]["demo"]["numbers"]["1003"] = {"endpoint": "+15551234", "trunk": "pstn"}
    raw["accounts"]["demo"]["outbound"] = {"trunks": ["pstn"], "allow": ["+1"]}
    try:
        async with running_engine(raw) as eng:
            caller = Caller(eng, "1003")
            caller.c.send(caller.call.request(
                "INVITE", SDP_OFFER.format(port=caller.media.getsockname()[1])))
            statuses = []
            while True:
                m = await caller.c.recv(timeout=5)
                statuses.append(m.status)
                if m.status >= 200:
                    break
            assert 180 in statuses and statuses[-1] == 200  # ring-back passed on
            caller.call.to_tag = m.to_tag
            caller.c.send(caller.call.request("ACK"))
            inv = far.invites[-1]
            assert inv.uri == "sip:0015551234@trunk.test"
            assert inv.get("authorization", "").startswith("Digest ")
            assert far.seen.count("INVITE") == 2  # challenged once, then authorised
            # The trunk leg was offered the caller's codec only (no transcoding in the relay).
            assert b"m=audio" in inv.body and b"RTP/AVP 0 101" in inv.body
            await caller.bye()
            await asyncio.sleep(0.2)
            assert far.byes == 1 and eng.sessions == {} and eng.ports.in_use == 0
            caller.close()
    finally:
        transport.close()


@pytest.mark.parametrize("final,status", [(486, 486), (603, 603), (500, 500)])
async def test_plain_b2bua_passes_the_failure_back(final, status):
    transport, far = await far_end(final=final, delay=0.05)
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["1002"] = {"endpoint": f"sip:bob@127.0.0.1:{far.port}"}
    try:
        async with running_engine(raw) as eng:
            caller = Caller(eng, "1002")
            await caller.dial(expect=status)
            await asyncio.sleep(0.1)
            assert eng.sessions == {} and eng.ports.in_use == 0
            caller.close()
    finally:
        transport.close()


async def test_no_answer_timeout_follows_outlet():
    transport, far = await far_end(final=None)  # rings forever
    raw = engine_config()
    raw["apps"] = {"a": {"start": "dial", "nodes": {
        "dial": {"module": "baton.bridge",
                 "params": {"to": f"sip:bob@127.0.0.1:{far.port}", "timeout": 0.5},
                 "outlets": {"no-answer": "after"}},
        "after": {"module": "baton.hold"}}}}
    raw["accounts"]["demo"]["numbers"]["2003"] = {"app": "a"}
    try:
        async with running_engine(raw) as eng:
            caller = Caller(eng, "2003")
            await caller.dial()  # answered by the next node (hold) after the timeout
            session = next(iter(eng.sessions.values()))
            assert [(h.module, h.reason) for h in session.history] == [
                ("baton.bridge", "initial"), ("baton.hold", "outlet:no-answer")]
            await asyncio.sleep(0.1)
            assert "CANCEL" in far.seen
            await caller.bye()
            caller.close()
    finally:
        transport.close()


async def test_time_limit_and_dialled_hangup_event():
    transport, far = await far_end(delay=0.05, hangup_after=0.4)
    raw = engine_config()
    raw["apps"] = {"a": {"start": "dial", "nodes": {
        "dial": {"module": "baton.bridge", "params": {"to": f"sip:bob@127.0.0.1:{far.port}"},
                 "events": {"dialled-hangup": "after"}},
        "after": {"module": "baton.hold"}}}}
    raw["accounts"]["demo"]["numbers"]["2004"] = {"app": "a"}
    try:
        async with running_engine(raw) as eng:
            caller = Caller(eng, "2004")
            await caller.dial()
            session = next(iter(eng.sessions.values()))
            for _ in range(100):
                if session.module.code == "baton.hold":
                    break
                await asyncio.sleep(0.02)
            assert [(h.module, h.reason) for h in session.history] == [
                ("baton.bridge", "initial"), ("baton.hold", "event:dialled-hangup")]
            await caller.bye()
            caller.close()
    finally:
        transport.close()
    transport, far = await far_end(delay=0.05)
    raw["apps"]["a"]["nodes"]["dial"]["params"].update(to=f"sip:bob@127.0.0.1:{far.port}",
                                                         time_limit=0.5)
    raw["apps"]["a"]["nodes"]["dial"]["events"] = {"time-limit": "after"}
    try:
        async with running_engine(raw) as eng:
            caller = Caller(eng, "2004")
            await caller.dial()
            session = next(iter(eng.sessions.values()))
            await asyncio.sleep(0.9)
            assert far.byes == 1, "the time limit hangs up the dialled leg"
            assert session.history[-1].reason == "event:time-limit"
            await caller.bye()
            caller.close()
    finally:
        transport.close()


async def test_caller_gone_from_tcp_before_the_answer(caplog):
    # The caller's TCP connection closes while the far end rings; when the far end
    # answers, the 200 for the caller has nowhere to go. It is lost like a datagram
    # would be (RFC 3261 17.2.4): nothing fails, and the answered leg is ACKed.
    from tests.test_sip_core import TcpPeer, offer
    from tests.helpers import Call

    caplog.set_level(logging.INFO, logger="baton.sip")
    transport, far = await far_end(delay=0.3)
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["1002"] = {"endpoint": f"sip:bob@127.0.0.1:{far.port}"}
    try:
        async with running_engine(raw) as eng:
            p = TcpPeer("127.0.0.1", eng.sip_port)
            call = Call(p, "1002", transport="TCP")
            p.send(call.request("INVITE", offer()))
            await p.recv()                                  # 100 Trying
            p.sock.close()
            for _ in range(100):
                if "ACK" in far.seen and any("dropped" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.02)
            assert "ACK" in far.seen, far.seen
            errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
            assert errors == [], [r.getMessage() for r in errors]
            assert any("dropped" in r.getMessage() for r in caplog.records)
    finally:
        transport.close()
