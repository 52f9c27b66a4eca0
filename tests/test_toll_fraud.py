"""Toll fraud (issue 15, High 2): which trunk, number or SIP host a call may reach.

Two tenants on one engine: `acme` may dial +1 through the trunk `pstn` (a fake
trunk: a scripted UDP far end on loopback that records every request),
`mallory` may dial nothing. Documents, vendors and API callers try to reach the
trunk anyway; the trunk must receive nothing from them.
"""
from __future__ import annotations

import asyncio
import contextlib
import urllib.parse

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

import grpc  # noqa: E402

from proto import pb  # noqa: E402
from control.sdk.errors import PermissionDenied  # noqa: E402
from engine.sessions.dialing import Outbound, OutboundDenied, check, parse  # noqa: E402
from tests.helpers import SDP_OFFER, engine_config, running_engine  # noqa: E402
from tests.test_bridge import far_end  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402
from tests.twiml_apps import AppServer, instructions_engine  # noqa: E402
from tests.vendor_procs.harness import (TOKEN, bearer, control_config, taken_call,  # noqa: E402
                                        target, wait_until)

sp = pb.sessions_pb2
TRUNK_USER = "acme"     # the digest user tests.test_bridge.FarEnd accepts


def two_tenants(raw: dict, far_port: int, app_url: str = "") -> dict:
    """`acme` (demo's numbers) may use the trunk for +1; `mallory` may not."""
    raw["trunks"] = {"pstn": {"proxy": f"127.0.0.1:{far_port}", "username": TRUNK_USER,
                              "password": "s3cret", "prefix": "00",
                              "domain": "carrier.example"}}
    raw["accounts"]["acme"] = {"numbers": {}, "outbound": {
        "trunks": ["pstn"], "allow": ["+1"], "max_concurrent": 1}}
    raw["accounts"]["mallory"] = {"numbers": {}}
    if app_url:
        # The operator gives both tenants' documents the trunk for <Dial>: only
        # acme's outbound permissions let it be used.
        raw["accounts"]["acme"]["numbers"]["5001"] = {"instructions": app_url + "/acme",
                                                      "trunk": "pstn"}
        raw["accounts"]["mallory"]["numbers"]["6001"] = {"instructions": app_url + "/mallory",
                                                         "trunk": "pstn"}
    return raw


def denials(eng, account: str, kind: str) -> int:
    return eng.outbound_denials[(account, kind)]


@contextlib.asynccontextmanager
async def trunk_and_apps(docs: dict):
    """The fake trunk (answering after a digest challenge) and the tenants' documents."""
    transport, far = await far_end(secret="s3cret", delay=0.05)
    app = AppServer()
    for path, doc in docs.items():
        app.twiml(path, doc)
    await app.start()
    try:
        yield far, app
    finally:
        transport.close()
        await app.stop()


async def test_a_document_cannot_reach_a_trunk_its_account_may_not_use():
    """The probe: a tenant without a trunk names another tenant's trunk in a
    Redirect to the bridge, and dials through a trunk its account may not use."""
    to = urllib.parse.quote("+19005550100")
    async with trunk_and_apps({
        "/mallory": f"<Response><Redirect>module:baton.bridge?to={to}&amp;trunk=pstn"
                    f"&amp;outlet=failed</Redirect>"
                    f"<Dial action=\"/mallory-dialled\">+15551234</Dial></Response>",
        "/mallory-dialled": "<Response><Hangup/></Response>"}) as (far, app):
        async with instructions_engine(two_tenants(_base(), far.port, app.url)) as eng:
            caller = Caller(eng, "6001")
            caller.c.send(caller.call.request(
                "INVITE", _offer(caller)))
            (req,) = await app.wait_for("/mallory-dialled")
            assert req.params["DialCallStatus"] == "failed"
            await asyncio.sleep(0.3)
            assert far.seen == []       # the trunk heard nothing from mallory
            assert denials(eng, "mallory", "trunk") == 1
            assert eng.outbound_calls["mallory"] == 0
            caller.close()


async def test_premium_denied_where_the_country_is_allowed_and_allowed_number_goes_out():
    async with trunk_and_apps({
        "/acme": "<Response><Dial action=\"/premium\">+19005550100</Dial></Response>",
        "/premium": "<Response><Dial action=\"/allowed\">+15551234</Dial></Response>",
        "/allowed": "<Response><Hangup/></Response>"}) as (far, app):
        async with instructions_engine(two_tenants(_base(), far.port, app.url)) as eng:
            caller = Caller(eng, "5001")
            caller.c.send(caller.call.request("INVITE", _offer(caller)))
            (req,) = await app.wait_for("/premium")
            assert req.params["DialCallStatus"] == "failed"
            assert denials(eng, "acme", "premium") == 1
            await wait_until(lambda: far.invites, 5)
            inv = far.invites[-1]
            assert inv.uri == "sip:0015551234@carrier.example"
            assert inv.get("authorization", "").startswith("Digest ")
            assert all("900555" not in i.uri for i in far.invites)
            caller.close()


async def test_concurrent_outbound_calls_are_capped_per_account():
    """acme's max_concurrent = 1: a second call is refused while the first is up,
    and a call is possible again once it has ended."""
    async with trunk_and_apps({
            "/acme": "<Response><Dial action=\"/after\">+15551234</Dial></Response>",
            "/after": "<Response><Hangup/></Response>"}) as (far, app):
        async with instructions_engine(two_tenants(_base(), far.port, app.url)) as eng:
            first = Caller(eng, "5001")
            await first.dial()
            await wait_until(lambda: eng.outbound_calls["acme"] == 1, 5)
            second = Caller(eng, "5001")
            second.c.send(second.call.request("INVITE", _offer(second)))
            (req,) = await app.wait_for("/after")
            assert req.params["DialCallStatus"] == "failed"
            assert denials(eng, "acme", "concurrent") == 1
            assert len([i for i in far.invites if i.get("authorization")]) == 1
            await first.bye()
            await wait_until(lambda: eng.outbound_calls["acme"] == 0, 5)
            third = Caller(eng, "5001")
            await third.dial()
            await wait_until(lambda: eng.outbound_calls["acme"] == 1, 5)
            await third.bye()
            for c in (first, second, third):
                c.close()


async def test_vendor_dial_and_transfer_params_and_api_params_are_refused():
    transport, far = await far_end(secret="s3cret", delay=0.05)
    raw = control_config()
    raw = two_tenants(raw, far.port)
    # The demo account (the vendor's session) may use the trunk; the vendor may not.
    raw["accounts"]["demo"]["outbound"] = {"trunks": ["pstn"], "allow": ["+1"]}
    try:
        async with running_engine(raw) as eng:
            v, call, caller = await taken_call(eng)
            with pytest.raises(PermissionDenied) as err:
                await call.dial("+15551234", trunk="pstn")
            assert "+15551234" in err.value.message and "trunk 'pstn'" in err.value.message
            with pytest.raises(PermissionDenied) as err:
                await call.transfer("baton.bridge", {"to": "+15551234", "trunk": "pstn"})
            assert "trunk" in err.value.message
            with pytest.raises(PermissionDenied):
                await call.release("done", {"sounds_dir": "/"})
            assert denials(eng, "demo", "trunk") == 1
            sid = call.session_id
            async with grpc.aio.insecure_channel(target(eng)) as ch:
                stub = pb.sessions_pb2_grpc.SessionsStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Transition(sp.TransitionRequest(
                        session_id=sid, target="baton.bridge",
                        params=pb.to_struct({"to": "+15551234", "trunk": "pstn"})),
                        metadata=bearer(TOKEN))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "trunk" in err.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Originate(sp.OriginateRequest(
                        to=f"sip:0019005550100@127.0.0.1:{far.port}", target="baton.echo",
                        params=pb.to_struct({"trunk": "pstn"})), metadata=bearer(TOKEN))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Originate(sp.OriginateRequest(
                        to="sip:0019005550100@carrier.example", target="baton.echo"),
                        metadata=bearer(TOKEN))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "carrier.example" in err.value.details()
            await asyncio.sleep(0.2)
            assert far.seen == []
            caller.close()
            await v.close()
    finally:
        transport.close()


async def test_spend_per_hour_cap_reads_the_accountants_snapshot():
    """Once the accountant's snapshot shows the hour's spend at the cap, Originate is
    refused; below it, the call is placed."""
    import json
    import os

    raw = control_config()
    raw["accounts"]["demo"]["outbound"] = {"max_spend_per_hour": "0.50"}
    async with running_engine(raw) as eng:
        path = os.path.join(eng.cfg.data_dir, "policy.json")

        def spent(micro):
            with open(path, "w") as f:
                json.dump({"accounts": {"demo": {"spend_last_hour_micro": micro}}}, f)
            os.utime(path, ns=(micro + 1, micro + 1))
            eng.policy.refresh()

        async with grpc.aio.insecure_channel(target(eng)) as ch:
            stub = pb.sessions_pb2_grpc.SessionsStub(ch)
            spent(500_000)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Originate(sp.OriginateRequest(
                    to=f"sip:1000@127.0.0.1:{eng.sip_port}", target="baton.echo"),
                    metadata=bearer(TOKEN))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "max_spend_per_hour" in err.value.details()
            assert denials(eng, "demo", "spend") == 1
            spent(499_999)
            r = await stub.Originate(sp.OriginateRequest(
                to=f"sip:1000@127.0.0.1:{eng.sip_port}", target="baton.echo"),
                metadata=bearer(TOKEN))
            assert r.outcome == "answered"
            eng.sessions[r.session.session_id].end("api")


def test_the_accountant_counts_the_last_hours_spend(tmp_path):
    from engine.accounting.accountant import Accountant

    acct = Accountant(str(tmp_path), {"accounts": {"demo": {}}})
    now = 1_000_000.0
    acct.recent = {"demo": __import__("collections").deque([(now - 4000, 7), (now - 10, 5)])}
    snap = acct.policy_snapshot(now_wall_ns=int(now * 1e9))
    assert snap["accounts"]["demo"]["spend_last_hour_micro"] == 5


def test_the_permission_rules():
    perm = parse({"trunks": ["pstn"], "allow": ["+1", "+44"], "deny": ["+1268"],
                  "sip_hosts": ["sbc.example.net:5080", ".partner.example"]}, "x")
    own = ("127.0.0.1",)

    def kind(to, trunk=None, p=perm):
        try:
            check(p, to, trunk, own)
        except OutboundDenied as exc:
            return exc.kind
        return "ok"

    assert kind("+15551234", "pstn") == "ok"
    assert kind("0015551234", "pstn") == "ok"           # 00 reads as +
    assert kind("tel:+44 20 7946 0000", "pstn") == "ok"
    assert kind("+15551234", "other") == "trunk"
    assert kind("+33123456789", "pstn") == "destination"
    assert kind("+12685551234", "pstn") == "destination"     # denied inside +1
    for premium in ("+19005550100", "+19765551234", "+447012345678", "+882123456"):
        assert kind(premium, "pstn") in ("premium", "destination"), premium
    assert kind("+19005550100", "pstn") == "premium"
    assert kind("+19005550100", "pstn", Outbound(frozenset({"pstn"}), ("+1900",))) == "ok"
    assert kind("sip:1001@127.0.0.1:5099") == "ok"          # this engine
    assert kind("sip:x@sbc.example.net:5080") == "ok"
    assert kind("sip:x@sbc.example.net") == "sip_host"       # another port
    assert kind("sip:x@gw.partner.example") == "ok"
    assert kind("sip:0019005550100@carrier.example") == "sip_host"
    assert kind("sip:1001@127.0.0.1", p=Outbound()) == "ok"
    assert kind("+15551234", "pstn", Outbound()) == "trunk"   # deny by default


def _base() -> dict:
    return engine_config()


def _offer(caller) -> str:
    return SDP_OFFER.format(port=caller.media.getsockname()[1])
