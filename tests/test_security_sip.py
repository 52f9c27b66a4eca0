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

    from proto import pb

    with EngineProcess(DEMO) as eng:
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        attacker.bind(("127.0.0.1", 0))
        attacker.settimeout(3)
        c = UdpClient("127.0.0.1", eng.port)
        c.local_port = attacker.getsockname()[1]
        from ext.sip_py import parse_message

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
        assert m.status == 200, (m.status, m.reason, eng.output()[-2500:])
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
    if limits:
        # A short idle timeout makes the engine's housekeeping sweep run often.
        raw["sip"] = {"tcp_idle_timeout": 2}
    return raw


async def test_unauthenticated_registers_leave_the_table_unchanged():
    async with running_engine(registrar_config()) as eng:
        reg = eng.sip.registrar
        held = lambda: (sum(map(len, reg.bindings.values())), len(reg.bindings))  # noqa: E731
        c = UdpClient("127.0.0.1", eng.sip_port)
        host = f"127.0.0.1:{eng.sip_port}"
        before = held()
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
        # Answered as they deserve, or 503 once the source is over its budget.
        assert {401, 403, 400, 423, 503} >= statuses >= {401, 403, 503}, statuses
        assert held() == before == (0, 0) and reg.count == 0
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


# -- Medium 3: CR/LF injection into SIP headers ----------------------------------------

def test_the_message_builder_refuses_control_characters():
    from engine.sip import build
    from engine.sip.errors import HeaderInjectionError
    from ext.sip_py import parse_message

    via = ("via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1")
    for headers in ([via, ("from", "<sip:1234\r\nP-Asserted-Identity: <sip:x@y>>")],
                    [via, ("from", "<sip:a@b>\nX: y")], [via, ("x-bad\r\nX", "v")],
                    [via, ("subject", "nul\x00here")]):
        with pytest.raises(HeaderInjectionError):
            build.request("INVITE", "sip:a@b", headers)
    with pytest.raises(HeaderInjectionError):
        build.request("INVITE", "sip:a@b\r\nX: y", [via])
    # HTAB stays allowed (RFC 3261 25.1 LWS).
    assert build.request("OPTIONS", "sip:a@b", [via, ("subject", "a\tb")])
    req = parse_message(build.request("OPTIONS", "sip:a@b", [
        via, ("from", "<sip:a@b>;tag=1"), ("to", "<sip:a@b>"), ("call-id", "c"),
        ("cseq", "1 OPTIONS")]))
    with pytest.raises(HeaderInjectionError):
        build.response(req, 200, ("127.0.0.1", 5060), headers=[("contact", "<sip:a@b>\r\nX: y")])
    with pytest.raises(HeaderInjectionError):
        build.response(req, 200, ("127.0.0.1", 5060), reason="OK\r\nX: y")


class Trunk(asyncio.DatagramProtocol):
    """A fake trunk: a UDP socket the test owns, keeping every datagram."""

    def __init__(self):
        self.received: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data, addr):
        from engine.sip import build
        from ext.sip_py import parse_message

        self.received.append(data)
        msg = parse_message(data)
        if msg.is_request and msg.method == "INVITE":
            self.transport.sendto(build.response(msg, 486, addr, "trunk1"), addr)


async def test_caller_id_injection_never_reaches_the_trunk():
    from tests.test_sessions import Caller
    from tests.twiml_apps import AppServer, instructions_engine

    pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")
    loop = asyncio.get_running_loop()
    transport, trunk = await loop.create_datagram_endpoint(Trunk, local_addr=("127.0.0.1", 0))
    injected = "1234&#13;&#10;P-Asserted-Identity: &lt;sip:+15550000@carrier.example&gt;"
    app = AppServer()
    app.twiml("/clean", '<Response><Dial callerId="1234"><Number>+15550100</Number></Dial>'
                        '</Response>')
    app.twiml("/inject", f'<Response><Dial callerId="{injected}"><Number>+15550100</Number>'
                         f'</Dial></Response>')
    await app.start()
    raw = engine_config()
    raw["trunks"] = {"pstn": {"proxy": f"127.0.0.1:{trunk.port}", "domain": "trunk.test"}}
    raw["accounts"]["demo"]["outbound"] = {"trunks": ["pstn"], "allow": ["+1555"]}
    nums = raw["accounts"]["demo"]["numbers"]
    nums["4000"] = {"instructions": app.url + "/clean", "trunk": "pstn"}
    nums["4001"] = {"instructions": app.url + "/inject", "trunk": "pstn"}
    try:
        async with instructions_engine(raw) as eng:
            # The same document with a plain caller id reaches the trunk...
            caller = Caller(eng, "4000")
            await caller.dial()
            for _ in range(250):
                if trunk.received:
                    break
                await asyncio.sleep(0.02)
            assert trunk.received and b"From: <sip:1234@trunk.test>" in trunk.received[0]
            caller.close()
            trunk.received.clear()
            # ...the injected one is refused as a document error: nothing is dialled.
            caller = Caller(eng, "4001")
            c = caller.c
            c.send(caller.call.request("INVITE", SDP_OFFER.format(
                port=caller.media.getsockname()[1])))
            await app.wait_for("/inject")
            await asyncio.sleep(1.0)
            assert not any(b"P-Asserted-Identity" in d for d in trunk.received)
            assert not any(d.startswith(b"INVITE") for d in trunk.received)
            caller.close()
    finally:
        transport.close()
        await app.stop()


async def test_originate_and_verify_refuse_crlf_in_from():
    import grpc

    from proto import pb
    from tests.vendor_procs.harness import bearer, control_config, target

    async with running_engine(control_config()) as eng:
        async with grpc.aio.insecure_channel(target(eng)) as ch:
            sessions = pb.sessions_pb2_grpc.SessionsStub(ch)
            verify = pb.services_pb2_grpc.VerifyStub(ch)
            to = f"sip:1000@127.0.0.1:{eng.sip_port}"
            for frm in ("sip:campaign@example.com\r\nP-Charge-Info: <sip:victim@x>",
                        "sip:a@b>;x=<sip:c@d", "sip:a@b\nX: y"):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await sessions.Originate(pb.sessions_pb2.OriginateRequest(
                        to=to, target="baton.echo", **{"from": frm}), metadata=bearer())
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details().startswith("from:")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await verify.Create(pb.services_pb2.VerifyCreateRequest(
                        to=to, channel="call", **{"from": frm}), metadata=bearer())
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details().startswith("from:")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await sessions.Originate(pb.sessions_pb2.OriginateRequest(
                    to=to + "\r\nX: y", target="baton.echo"), metadata=bearer())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("to:")
        assert not eng.sessions


# -- Medium 5: idle SIP/TCP connections ------------------------------------------------

@pytest.mark.netns
def test_idle_tcp_connections_are_capped_per_source_and_closed():
    from tests.netns import Netns, NetnsUnavailable

    try:
        ns = Netns().create()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    cap, idle = 8, 2
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(f'[media]\naddress = "127.0.0.1"\n\n[sip]\ntcp_max_per_source = {cap}\n'
              f'tcp_idle_timeout = {idle}\n\n[accounts.demo.numbers]\n'
              f'"1000" = {{ module = "baton.hold" }}\n')
    cfg.close()
    eng = EngineProcess(cfg.name, port=5070, netns=ns.name)
    try:
        eng.wait_ready()
        r = ns.run([sys.executable, os.path.join(ROOT, "tests", "tcp_limits_peer.py"),
                    "127.0.0.1", "5070", str(cap), str(idle)],
                   capture_output=True, text=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": ROOT})
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        # One source holding its share cannot open more; another still gets answers;
        # idle connections are closed; then the first source is welcome again.
        assert out["over_cap_closed"], out
        assert out["other_source_answered"], out
        assert out["held_closed"] == cap, out
        assert out["same_source_after"], out
        assert eng.stop() == 0
        assert "Traceback" not in eng.output()
    finally:
        if eng.proc.poll() is None:
            eng.proc.kill()
            eng.proc.wait()
        ns.destroy()
        os.unlink(cfg.name)
