"""Issue 15, over the wire: the registrar (agent takeover, an unbounded table, password
guessing), CR/LF injection into SIP headers, and idle SIP/TCP connections."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile

import pytest

from engine.sip.digest import authorize
from tests.helpers import (DEMO, ROOT, SDP_OFFER, Call, EngineProcess, UdpClient, engine_config,
                           free_port, running_engine)

DEMO_TOKEN = "demo-api-token-change-me-0123456789"


def register(c, user: str | None, host: str, *, contact: str | None = None,
             expires: str = "600", extra: str = "", call: Call | None = None) -> bytes:
    """A REGISTER for `sip:user@host` (`sip:host` when user is None)."""
    call = call or Call(c, user or "x")
    aor = f"sip:{user}@{host}" if user else f"sip:{host}"
    branch = "z9hG4bK" + secrets.token_hex(6)
    contact = contact or f"<sip:{user or 'x'}@{c.local_host}:{c.local_port}>"
    return (f"REGISTER sip:{host} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {c.local_host}:{c.local_port};branch={branch}\r\n"
            f"Max-Forwards: 70\r\nTo: <{aor}>\r\nFrom: <{aor}>;tag={call.from_tag}\r\n"
            f"Call-ID: {call.call_id}\r\nCSeq: {call.cseq} REGISTER\r\n"
            f"Contact: {contact}\r\nExpires: {expires}\r\n{extra}Content-Length: 0\r\n\r\n"
            ).encode()


# -- High 1: call-centre agent takeover -------------------------------------------------

def test_register_without_user_part_cannot_take_over_an_agent():
    import grpc

    from control import pb

    with EngineProcess(DEMO) as eng:
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        attacker.bind(("127.0.0.1", 0))
        attacker.settimeout(3)
        c = UdpClient("127.0.0.1", eng.port)
        c.local_port = attacker.getsockname()[1]
        from engine.sip.parser_py import parse_message

        # `sip:agent1` names no user: refused (RFC 3261 10.3), nothing bound.
        attacker.sendto(register(c, None, "agent1",
                                 contact=f"<sip:attacker@127.0.0.1:{c.local_port}>"),
                        ("127.0.0.1", eng.port))
        m = parse_message(attacker.recv(65535))
        assert m.status == 403 and "User Part" in m.reason, (m.status, m.reason)
        # agent1's own address still needs agent1's password.
        attacker.sendto(register(c, "agent1", "127.0.0.1",
                                 contact=f"<sip:attacker@127.0.0.1:{c.local_port}>"),
                        ("127.0.0.1", eng.port))
        assert parse_message(attacker.recv(65535)).status == 401

        with grpc.insecure_channel(f"127.0.0.1:{eng.grpc_port}") as ch:
            stub = pb.call_center_pb2_grpc.CallCenterStub(ch)
            r = stub.ListAgents(pb.call_center_pb2.ListAgentsRequest(),
                                metadata=(("authorization", f"Bearer {DEMO_TOKEN}"),))
            agents = {a.name: a for a in r.agents}
        assert agents["agent1"].state == "offline"
        assert "attacker" not in str(r)

        # A caller to 6100 waits in the queue: the attacker is never rung.
        caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        caller.bind(("127.0.0.1", 0))
        caller.settimeout(5)
        cc = UdpClient("127.0.0.1", eng.port)
        cc.local_port = caller.getsockname()[1]
        call = Call(cc, "6100")
        caller.sendto(call.request("INVITE", SDP_OFFER.format(port=free_port(even=True))),
                      ("127.0.0.1", eng.port))
        while True:
            m = parse_message(caller.recv(65535))
            if not m.is_request and m.status >= 200:
                break
        assert m.status == 200
        attacker.settimeout(3)
        with pytest.raises(socket.timeout):
            data = attacker.recv(65535)
            pytest.fail(f"the attacker got {data[:80]!r}")
        call.to_tag = m.to_tag
        caller.sendto(call.request("ACK"), ("127.0.0.1", eng.port))
        call.cseq += 1
        caller.sendto(call.request("BYE"), ("127.0.0.1", eng.port))
        for s in (attacker, caller):
            s.close()
        c.close()
        cc.close()
        assert eng.stop() == 0
        assert "Traceback" not in eng.output()


# -- Medium 7 and Low: a bounded registrar, throttled per source ----------------------

def registrar_config(mode="open", **limits) -> dict:
    raw = engine_config()
    raw["registrar"] = {"mode": mode, "realm": "baton.test", **limits}
    raw["users"] = {"agent1": {"password": "agent1-secret"}, "alice": {"password": "wonderland"}}
    # A short idle timeout makes the engine's housekeeping sweep run often.
    raw["sip"] = {"tcp_idle_timeout": 2}
    return raw


async def test_unauthenticated_registers_leave_the_table_unchanged():
    async with running_engine(registrar_config(rate=1000, burst=100000)) as eng:
        reg = eng.sip.registrar
        c = UdpClient("127.0.0.1", eng.sip_port)
        host = f"127.0.0.1:{eng.sip_port}"
        before = (reg.count, len(reg.bindings))
        statuses = set()
        for i in range(800):
            # No credentials for a configured user; no user part; a bad Contact;
            # a too-brief interval: none of them leaves a trace in the table.
            for data in (register(c, "agent1", "127.0.0.1"),
                         register(c, None, f"host{i}.example"),
                         register(c, f"v{i}", "127.0.0.1", contact="<sip:broken"),
                         register(c, f"w{i}", "127.0.0.1", expires="5")):
                c.send(data)
            for _ in range(4):
                statuses.add((await c.recv(timeout=5)).status)
        assert statuses == {401, 403, 400, 423}, statuses
        assert (reg.count, len(reg.bindings)) == before == (0, 0)
        c.close()


async def test_registrations_are_rate_limited_capped_and_expire():
    async with running_engine(registrar_config(burst=20, rate=0.01, max_bindings=15)) as eng:
        reg = eng.sip.registrar
        c = UdpClient("127.0.0.1", eng.sip_port)
        answers = []
        for i in range(200):
            c.send(register(c, f"visitor{i}", "127.0.0.1", expires="60"))
            answers.append(await c.recv(timeout=5))
        ok = [m for m in answers if m.status == 200]
        full = [m for m in answers if m.status == 503 and m.reason == "Registrar Full"]
        slow = [m for m in answers if m.status == 503 and m.reason == "Too Many Registrations"]
        # The burst passes the rate limit, the table holds max_bindings of it.
        assert (len(ok), len(full), len(slow)) == (15, 5, 180)
        assert all(m.get("retry-after").isdigit() for m in full + slow)
        assert reg.count == 15 and len(reg.bindings) == 15
        # Expired bindings go on the engine's own timer, without any lookup.
        start = reg.clock()
        reg.clock = lambda: start + 61
        for _ in range(100):
            if reg.count == 0:
                break
            await asyncio.sleep(0.1)
        assert reg.count == 0 and not reg.bindings
        c.close()


async def test_unknown_and_known_users_get_the_same_answers_and_guessing_is_throttled():
    raw = registrar_config(mode="auth", max_auth_failures=4, auth_lockout=600)
    async with running_engine(raw) as eng:
        reg = eng.sip.registrar
        c = UdpClient("127.0.0.1", eng.sip_port)
        uri = "sip:127.0.0.1"   # register()'s Request-URI

        async def attempt(user, password):
            call = Call(c, user)
            c.send(register(c, user, "127.0.0.1", call=call))
            ch = await c.recv()
            if ch.status != 401:
                return ch, None
            call.cseq += 1
            auth = authorize(ch.get_all("www-authenticate")[0], "REGISTER", uri, user,
                             password, nc=call.cseq)
            c.send(register(c, user, "127.0.0.1", call=call,
                            extra=f"Authorization: {auth}\r\n"))
            return ch, await c.recv()

        known_ch, known = await attempt("alice", "guess")
        unknown_ch, unknown = await attempt("mallory", "guess")
        # The same challenge, then the same refusal: nothing tells the users apart.
        shape = lambda m: [v.split("nonce=")[0] for v in m.get_all("www-authenticate")]  # noqa: E731
        assert (known_ch.status, unknown_ch.status) == (401, 401)
        assert shape(known_ch) == shape(unknown_ch)
        assert (known.status, known.reason) == (unknown.status, unknown.reason) == (403, "Forbidden")
        await attempt("alice", "guess-2")
        _, fourth = await attempt("mallory", "guess-3")
        assert fourth.status == 403
        # Four failures from this source: locked out, even with the right password.
        locked, _ = await attempt("alice", "wonderland")
        assert locked.status == 503 and int(locked.get("retry-after")) > 500
        assert reg.count == 0
        start = reg.clock()
        reg.clock = lambda: start + 601
        _, ok = await attempt("alice", "wonderland")
        assert ok.status == 200 and reg.count == 1
        c.close()
