"""The Sessions service over real gRPC on loopback: Watch, Get, History,
Transition, Cost, and Originate to a SIPp UAS and to a second engine."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from tests.vendor_procs.harness import (OTHER_TOKEN, SECRET_A, bearer, control_config,  # noqa: E402
                                        target, wait_until)

import grpc  # noqa: E402

from proto import pb  # noqa: E402
from control.sdk import VendorClient  # noqa: E402
from tests.helpers import free_port, running_engine  # noqa: E402
from tests.test_sessions import Caller, callee_config  # noqa: E402

sp = pb.sessions_pb2
SIPP = shutil.which("sipp")


async def watch(stub, events: list, metadata=None, **req) -> asyncio.Task:
    async def run():
        async for ev in stub.Watch(sp.WatchRequest(**req), metadata=metadata or bearer()):
            events.append((ev.session_id, ev.kind, ev.module, pb.from_struct(ev.detail)))
    return asyncio.ensure_future(run())


async def test_watch_get_history_transition_and_cost():
    async with running_engine(control_config()) as eng:
        v = VendorClient(target(eng), "acme.survey", SECRET_A)

        @v.on_offer
        async def on(offer):
            call = await offer.take()
            await call.answer()
            await call.set_value("seen", "yes")

        await v.start()
        async with grpc.aio.insecure_channel(target(eng)) as ch:
            stub = pb.sessions_pb2_grpc.SessionsStub(ch)
            everything, only_end, other = [], [], []
            n = len(eng.listeners)
            tasks = [await watch(stub, everything),
                     await watch(stub, only_end, kinds=["ended"]),
                     await watch(stub, other, metadata=bearer(OTHER_TOKEN))]
            await wait_until(lambda: len(eng.listeners) == n + 3)
            caller = Caller(eng, "4000")
            await caller.dial()
            sid = next(iter(eng.sessions))
            await wait_until(lambda: eng.sessions[sid].params.get("seen") == "yes")
            one = []
            tasks.append(await watch(stub, one, session_ids=[sid], kinds=["transition"]))
            await wait_until(lambda: len(eng.listeners) == n + 4)
            r = await stub.Transition(sp.TransitionRequest(session_id=sid, target="baton.echo",
                                                           params=pb.to_struct({"x": 1})),
                                      metadata=bearer())
            assert r.session.module == "baton.echo"
            info = await stub.Get(sp.GetRequest(session_id=sid), metadata=bearer())
            assert info.live and info.direction == "inbound" and info.number == "4000"
            assert pb.from_struct(info.params)["seen"] == "yes"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Cost(sp.CostRequest(session_id=sid), metadata=bearer())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE     # no accountant runs
            assert "accountant" in err.value.details()

            class MicroAccountant:          # the accountant's answer: integer micro-units
                address = "test"

                async def running_cost(self, session_id):
                    bp = pb.billing_pb2
                    return bp.SessionCost(session_id=sid, account="demo", live=True,
                                          cost=bp.Money(micros=1_234_567, amount="1.234567",
                                                        currency="EUR"))

            client, eng.accountant_client = eng.accountant_client, MicroAccountant()
            cost = await stub.Cost(sp.CostRequest(session_id=sid), metadata=bearer())
            assert (cost.amount_micros, cost.amount_decimal, cost.currency, cost.live) == \
                (1_234_567, "1.234567", "EUR", True)
            eng.accountant_client = client
            await stub.Transition(sp.TransitionRequest(session_id=sid, target="hangup"),
                                  metadata=bearer())
            m = await caller.c.recv(timeout=2)
            assert m.is_request and m.method == "BYE"
            # Each Watch stream is its own gRPC call: wait for the end on all of them.
            await wait_until(lambda: only_end and len(one) == 1 and
                             any(e[0] == sid and e[1] == "ended" for e in everything))
            # (the notification kinds, session.started/ended, are test_webhooks.py's)
            everything = [e for e in everything if "." not in e[1]]
            kinds = [(k, mod) for s, k, mod, d in everything if s == sid]
            assert kinds == [("transition", "acme.survey"), ("offered", "acme.survey"),
                             ("taken", "acme.survey"), ("transition", "baton.echo"),
                             ("ended", "")], kinds
            assert everything[0][3]["reason"] == "initial"
            assert everything[3][3] == {"from": "acme.survey", "to": "baton.echo",
                                        "level": "basic", "reason": "api"}
            assert only_end == [(sid, "ended", "", {"reason": "api"})]
            assert [k for _, k, _, _ in one] == ["transition"]
            assert other == [], "another account's watcher sees nothing"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Transition(sp.TransitionRequest(session_id=sid, target="baton.hold"),
                                      metadata=bearer())
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            # History, from memory and then from the journal.
            h = await stub.History(sp.HistoryRequest(session_id=sid), metadata=bearer())
            assert not h.live and h.end_reason == "api"
            assert [(s.module, s.reason, s.end_reason) for s in h.spans] == [
                ("acme.survey", "initial", "api"), ("baton.echo", "api", "api")]
            assert all(s.duration_ns > 0 for s in h.spans)
            eng.finished.clear()
            h2 = await stub.History(sp.HistoryRequest(session_id=sid), metadata=bearer())
            assert [(s.module, s.reason) for s in h2.spans] == [(s.module, s.reason)
                                                                 for s in h.spans]
            g = await stub.Get(sp.GetRequest(session_id=sid), metadata=bearer())
            assert not g.live and g.end_reason == "api"
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            caller.close()
        await v.close()


def _udp_bound(port: int) -> bool:
    want = f":{port:04X}"
    with open("/proc/net/udp") as f:
        return any(line.split()[1].endswith(want) for line in f.readlines()[1:])


@pytest.mark.interop
@pytest.mark.skipif(SIPP is None, reason="sipp is not installed")
async def test_originate_to_sipp_uas_runs_the_vendor_module(tmp_path):
    port = free_port()
    sipp = subprocess.Popen([SIPP, "-sn", "uas", "-i", "127.0.0.1", "-p", str(port),
                             "-mi", "127.0.0.1", "-mp", str(free_port(even=True)), "-rtp_echo",
                             "-m", "1", "-nostdin", "-timeout", "30s"], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        assert await wait_until(lambda: _udp_bound(port), 5)
        async with running_engine(control_config()) as eng:
            v = VendorClient(target(eng), "acme.survey", SECRET_A)
            offers = []

            @v.on_offer
            async def on(offer):
                offers.append(offer)
                call = await offer.take()
                await call.say("This is an outbound call.", wait=True)
                await call.hangup("done-talking")

            await v.start()
            async with grpc.aio.insecure_channel(target(eng)) as ch:
                stub = pb.sessions_pb2_grpc.SessionsStub(ch)
                t0 = time.monotonic()
                r = await stub.Originate(sp.OriginateRequest(
                    to=f"sip:service@127.0.0.1:{port}", target="acme.survey",
                    params=pb.to_struct({"campaign": "spring"})), metadata=bearer())
            assert r.outcome == "answered" and r.sip_status == 200, r
            assert r.session.direction == "outbound" and r.session.module == "acme.survey"
            assert r.session.account == "demo" and r.session.number == "service"
            await wait_until(lambda: offers)
            assert offers[0].direction == "outbound"
            assert offers[0].module_params["campaign"] == "spring"
            assert offers[0].answered
            # The vendor talks, then hangs up: SIPp gets the BYE and counts a success.
            rc = await asyncio.get_running_loop().run_in_executor(None, sipp.wait, 20)
            assert rc == 0, sipp.stderr.read().decode(errors="replace")
            assert time.monotonic() - t0 < 20
            s = eng.find_session(r.session.session_id)
            assert s.ended and s.end_reason == "done-talking"
            stream_stats = s.legs[0].media_stats() if s.legs[0].stream is not None else None
            assert stream_stats is None   # released with the call
            await v.close()
    finally:
        if sipp.poll() is None:
            sipp.kill()
            sipp.wait()


async def test_originate_to_a_second_engine_and_failures():
    async with running_engine(callee_config()) as callee:
        async with running_engine(control_config()) as eng:
            async with grpc.aio.insecure_channel(target(eng)) as ch:
                stub = pb.sessions_pb2_grpc.SessionsStub(ch)
                r = await stub.Originate(sp.OriginateRequest(
                    to=f"sip:1001@127.0.0.1:{callee.sip_port}", target="baton.echo",
                    **{"from": "sip:campaign@example.com"}), metadata=bearer())
                assert r.outcome == "answered"
                sid = r.session.session_id
                s = eng.sessions[sid]
                assert s.module.code == "baton.echo" and s.legs[0].answered
                assert len(callee.sessions) == 1
                far = next(iter(callee.sessions.values()))
                assert "campaign@example.com" in far.from_uri
                far.end("api")      # the dialled party hangs up: our session ends too
                await wait_until(lambda: s.ended)
                assert s.end_reason == "hangup"
                r = await stub.Originate(sp.OriginateRequest(
                    to=f"sip:9999@127.0.0.1:{callee.sip_port}", target="baton.echo"),
                    metadata=bearer())
                assert (r.outcome, r.sip_status) == ("failed", 404)
                r = await stub.Originate(sp.OriginateRequest(
                    to=f"sip:1005@127.0.0.1:{callee.sip_port}", target="baton.echo",
                    ring_timeout=0.5), metadata=bearer())
                assert r.outcome == "no-answer"
                await wait_until(lambda: not callee.sessions)
            assert eng.ports.in_use == 0


async def test_originate_dials_numbers_through_trunks_as_rest_does():
    """gRPC Originate reaches what REST's Calls.json reaches, by the same rules: a
    phone number goes out through the account's first trunk (or the one named), a
    trunk the account may not use is PERMISSION_DENIED, a user with no binding
    FAILED_PRECONDITION, a malformed destination INVALID_ARGUMENT naming `to`."""
    from tests.helpers import UdpClient
    from tests.test_rest_more import busy

    trunk = UdpClient("127.0.0.1", 9)            # plays the trunk: answers busy
    raw = control_config()
    raw["trunks"] = {"carrier": {"proxy": f"127.0.0.1:{trunk.local_port}"},
                     "spare": {"proxy": f"127.0.0.1:{trunk.local_port}", "prefix": "00"},
                     "closed": {"proxy": f"127.0.0.1:{trunk.local_port}"}}
    raw["users"] = {"alice": {"password": "alice-secret-1"}}
    raw["accounts"]["demo"]["outbound"] = {"trunks": ["carrier", "spare"], "allow": ["+1"]}
    try:
        async with running_engine(raw) as eng:
            async with grpc.aio.insecure_channel(target(eng)) as ch:
                stub = pb.sessions_pb2_grpc.SessionsStub(ch)
                for trunk_name, uri in (("", "sip:+15551234567@127.0.0.1"),
                                        ("spare", "sip:0015551234567@127.0.0.1")):
                    call = asyncio.ensure_future(stub.Originate(sp.OriginateRequest(
                        to="+15551234567", target="baton.echo", trunk=trunk_name),
                        metadata=bearer()))
                    while True:
                        req = await trunk.recv(5.0)
                        if req.is_request and req.method == "INVITE":
                            break
                    assert req.uri == uri
                    busy(trunk, req, eng.sip_port)
                    r = await call
                    assert (r.outcome, r.sip_status) == ("busy", 486)
                for req, code, field in (
                        (dict(to="+15551234567", trunk="closed"), "PERMISSION_DENIED", "to"),
                        (dict(to="+445551234567"), "PERMISSION_DENIED", "to"),
                        (dict(to="client:alice"), "FAILED_PRECONDITION", "to"),
                        (dict(to="not a destination"), "INVALID_ARGUMENT", "to"),
                        (dict(to="1000", trunk="carrier"), "INVALID_ARGUMENT", "trunk")):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Originate(sp.OriginateRequest(target="baton.echo", **req),
                                             metadata=bearer())
                    assert err.value.code().name == code, (req, err.value.details())
                    assert err.value.details().startswith(f"{field}:"), err.value.details()
            assert eng.ports.in_use == 0
    finally:
        trunk.close()
