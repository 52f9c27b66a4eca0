"""ModuleHost over real gRPC on loopback: offers, take/release/transfer chains,
revocation, who may command what, idempotent command ids, argument errors and
offer deadlines. The engine runs in-process; vendors are SDK clients on the
same loop (tests/test_control_failover.py runs them as separate processes)."""
from __future__ import annotations

import asyncio
import struct
import time

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from tests.vendor_procs.harness import (SECRET_A, SECRET_B, RawVendor, bearer,  # noqa: E402
                                        control_config, taken_call, target, wait_until,
                                        with_app)

import grpc  # noqa: E402

from proto import pb  # noqa: E402
from control.sdk import (FailedPrecondition, InvalidArgument, PermissionDenied,  # noqa: E402
                         Play, VendorClient)
from tests.helpers import ROOT, running_engine  # noqa: E402
from tests.test_sessions import Caller, drain, headers  # noqa: E402

mh = pb.module_host_pb2


def chain_config() -> dict:
    return with_app(control_config(), "chain", "4100", {
        "a": {"module": "acme.survey", "outlets": {"next": "b", "fallback": "hold"}},
        "b": {"module": "globex.desk", "outlets": {"fallback": "hold"}},
        "hold": {"module": "baton.hold"}}, "a")


async def raw_command(client: VendorClient, sid: str, cid: str, **action):
    """A command sent without an SDK Call (as a misbehaving vendor would)."""
    return await client._request("command", mh.Command(command_id=cid, session_id=sid, **action),
                                 sid, cid)


async def test_take_release_transfer_chain_across_three_modules():
    """vendor A (acme.survey) -> vendor B (globex.desk) -> built-in baton.echo."""
    async with running_engine(chain_config()) as eng:
        a = VendorClient(target(eng), "acme.survey", SECRET_A, instance="A")
        b = VendorClient(target(eng), "globex.desk", SECRET_B, instance="B")
        seen: dict = {}

        @a.on_offer
        async def on_a(offer):
            seen["a_offer"] = offer
            call = await offer.take()
            await call.say("Hello from vendor A.")
            await call.set_value("survey", "started")
            await call.release("next", {"from_a": 1})
            seen["a_revoked"] = await call.revoked

        @b.on_offer
        async def on_b(offer):
            seen["b_offer"] = offer
            call = await offer.take()
            await call.transfer("baton.echo")
            seen["b_revoked"] = await call.revoked

        await a.start()
        await b.start()
        caller = Caller(eng, "4100")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        for _ in range(100):
            await caller.talk(0.02)
            if session.module.code == "baton.echo":
                break
        payload = bytes(range(1, 161)).replace(b"\x7f", b"\x7e")
        await caller.talk(0.5, payload)
        await asyncio.sleep(0.05)
        caller.received += drain(caller.media)
        hist = [(h.module, h.reason) for h in session.history]
        assert hist == [("acme.survey", "initial"), ("globex.desk", "outlet:next"),
                        ("baton.echo", "transfer")], hist
        a_offer, b_offer = seen["a_offer"], seen["b_offer"]
        assert a_offer.reason == "initial" and a_offer.outlets == ["next", "fallback"]
        assert a_offer.account == "demo" and a_offer.number == "4100" and not a_offer.answered
        assert b_offer.previous_module == "acme.survey" and b_offer.reason == "outlet:next"
        assert b_offer.module_params["from_a"] == 1
        assert b_offer.call_params["survey"] == "started" and b_offer.answered
        await wait_until(lambda: "b_revoked" in seen and "a_revoked" in seen)
        ra, rb = seen["a_revoked"], seen["b_revoked"]
        assert (ra.reason, ra.next_module, ra.by_vendor) == ("outlet:next", "globex.desk", True)
        assert (rb.reason, rb.next_module, rb.by_vendor) == ("transfer", "baton.echo", True)
        assert [p for p in caller.received if p[12:] == payload], "echo after the chain"
        assert len({h[4] for h in headers(caller.received)}) == 1, "one SSRC across modules"
        await caller.bye()
        caller.close()
        await a.close()
        await b.close()


async def test_async_transition_revokes_control_and_later_commands_fail():
    async with running_engine(control_config()) as eng:
        v = VendorClient(target(eng), "acme.survey", SECRET_A)
        calls = []

        @v.on_offer
        async def on(offer):
            call = await offer.take()
            await call.answer()
            calls.append(call)

        await v.start()
        caller = Caller(eng, "4000")
        await caller.dial()
        await wait_until(lambda: calls)
        call = calls[0]
        async with grpc.aio.insecure_channel(target(eng)) as ch:
            stub = pb.sessions_pb2_grpc.SessionsStub(ch)
            await stub.Transition(pb.sessions_pb2.TransitionRequest(
                session_id=call.session_id, target="baton.hold"), metadata=bearer())
        revoked = await asyncio.wait_for(call.revoked, 2)
        assert (revoked.reason, revoked.next_module, revoked.by_vendor) == \
            ("api", "baton.hold", False)
        assert not call.active
        call.active = True   # pretend the SDK missed it: the engine still refuses
        with pytest.raises(FailedPrecondition) as err:
            await call.answer()
        assert "no longer controls" in err.value.message
        await caller.bye()
        caller.close()
        await v.close()


async def test_vendor_cannot_command_a_session_it_does_not_hold():
    async with running_engine(control_config()) as eng:
        a = VendorClient(target(eng), "acme.survey", SECRET_A, instance="A")
        held, offers = [], []

        @a.on_offer
        async def on(offer):
            offers.append(offer)
            held.append(await offer.take())

        await a.start()
        caller = Caller(eng, "4000")
        caller.c.send(caller.call.request("INVITE", "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\n"
                                          "c=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                                          f"m=audio {caller.media.getsockname()[1]} RTP/AVP 0\r\n"))
        await wait_until(lambda: held)
        sid = held[0].session_id
        # Another vendor, and another process of the same code: neither took it.
        b = VendorClient(target(eng), "globex.desk", SECRET_B)
        a2 = VendorClient(target(eng), "acme.survey", SECRET_A, instance="A2")
        await b.start()
        await a2.start()
        for other in (b, a2):
            with pytest.raises(PermissionDenied) as err:
                await raw_command(other, sid, "x1", hangup=mh.Hangup())
            assert "not offered to and taken by this process" in err.value.message
        with pytest.raises(PermissionDenied):
            await a2._request("take", mh.Take(offer_id=offers[0].offer_id, session_id=sid),
                              sid, offers[0].offer_id)
        with pytest.raises(PermissionDenied):
            await raw_command(a, "S-no-such-session", "x2", answer=mh.Answer())
        assert eng.sessions[sid].module.code == "acme.survey" and not eng.sessions[sid].ended
        await held[0].hangup()
        caller.close()
        for c in (a, a2, b):
            await c.close()


async def test_command_ids_are_idempotent():
    async with running_engine(control_config()) as eng:
        v = VendorClient(target(eng), "acme.survey", SECRET_A)
        calls = []

        @v.on_offer
        async def on(offer):
            calls.append(await offer.take())

        await v.start()
        caller = Caller(eng, "4000")
        dial = asyncio.ensure_future(caller.dial())
        await wait_until(lambda: calls)
        call = calls[0]
        first = await call.set_value("k", 1, command_id="same")
        again = await call.set_value("k", 2, command_id="same")
        session = eng.sessions[call.session_id]
        assert not first.duplicate and again.duplicate and session.params["k"] == 1
        await call.answer()
        await dial
        # A retry while the first is still in flight (speech being rendered): one player.
        s1, s2 = await asyncio.gather(call.say("Once only.", command_id="say-1"),
                                      call.say("Once only.", command_id="say-1"))
        assert sorted([s1.duplicate, s2.duplicate]) == [False, True]
        # Digits sent twice under one id go out once.
        d1 = await call.send_digits("5", command_id="dig-1")
        d2 = await call.send_digits("5", command_id="dig-1")
        assert not d1.duplicate and d2.duplicate and d1.result["method"] == "rfc4733"
        await caller.talk(0.1)
        events = [p for p in caller.received if p[1] & 0x7F == 101]
        assert events and {p[12] for p in events} == {5}
        assert len({struct.unpack("!I", p[4:8])[0] for p in events}) == 1, "one event, once"
        assert sum(1 for p in events if p[13] & 0x80) == 3, "end packet sent three times"
        stats = eng.control.hub.modules["acme.survey"].stats
        assert stats["duplicates"] == 3
        await caller.bye()
        caller.close()
        await v.close()


async def test_invalid_arguments_name_the_field():
    async with running_engine(control_config()) as eng:
        v, call, caller = await taken_call(eng)
        cases = [
            (call.play(""), "play.url"),
            (call.play("ftp://127.0.0.1/hello.wav"), "play.url"),
            (call.play("file:///tmp/hello.wav"), "play.url"),
            (call.gather(prompt=Play("ftp://127.0.0.1/menu.wav")), "gather.play.url"),
            (call.say("  "), "say.text"),
            (call.gather(finish_on_key="x"), "gather.finish_on_key"),
            (call.gather(timeout=-1), "gather.timeout"),
            (call.record(max_length=-3), "record.max_length"),
            (call.send_digits("12x"), "send_digits.digits"),
            (call.send_digits("1", duration_ms=5), "send_digits.duration_ms"),
            (call.set_value("", 1), "set_value.key"),
            (call.dial("bob"), "dial.to"),
            (call.dial("sip:bob@127.0.0.1", trunk="nope"), "dial.trunk"),
            (call.join_conference(""), "join_conference.name"),
            (call.transfer("not a target"), "transfer.target"),
            (call.release(""), "release.outlet"),
            (call.command(), "action"),
        ]
        for coro, field in cases:
            with pytest.raises(InvalidArgument) as err:
                await coro
            assert err.value.field == field, (field, err.value.message)
            assert err.value.message.startswith(field), err.value.message
        with pytest.raises(InvalidArgument) as err:
            await raw_command(v, call.session_id, "", answer=mh.Answer())
        assert err.value.field == "command_id"
        with pytest.raises(InvalidArgument) as err:
            await raw_command(v, "", "c-1", answer=mh.Answer())
        assert err.value.field == "session_id"
        # The session is still the vendor's and works.
        assert (await call.set_value("ok", True)).result == {}
        await caller.bye()
        caller.close()
        await v.close()


def fallback_config() -> dict:
    return with_app(control_config(), "fb", "4200", {
        "v": {"module": "acme.survey", "outlets": {"fallback": "hold"}},
        "hold": {"module": "baton.hold"}}, "v")


async def test_unanswered_offer_goes_to_the_next_process_after_the_deadline():
    async with running_engine(fallback_config()) as eng:
        silent = VendorClient(target(eng), "acme.survey", SECRET_A, instance="silent")
        taker = VendorClient(target(eng), "acme.survey", SECRET_A, instance="taker")
        got: list = []

        @silent.on_offer
        async def ignore(offer):
            got.append(("silent", time.monotonic()))

        @taker.on_offer
        async def take(offer):
            got.append(("taker", time.monotonic()))
            call = await offer.take()
            await call.answer()

        await silent.start()   # registered first: the first offer goes to it
        await taker.start()
        caller = Caller(eng, "4200")
        await caller.dial()
        assert [g[0] for g in got] == ["silent", "taker"]
        waited = got[1][1] - got[0][1]
        assert 0.9 <= waited < 1.6, waited   # offer_timeout = 1 s
        session = next(iter(eng.sessions.values()))
        assert [(h.module, h.reason) for h in session.history] == [("acme.survey", "initial")]
        stats = eng.control.hub.modules["acme.survey"].stats
        assert (stats["offered"], stats["expired"], stats["taken"]) == (2, 1, 1)
        await caller.bye()
        caller.close()
        await silent.close()
        await taker.close()


async def test_unanswered_or_declined_offers_follow_fallback():
    async with running_engine(fallback_config()) as eng:
        silent = VendorClient(target(eng), "acme.survey", SECRET_A)

        @silent.on_offer
        async def ignore(offer):
            return None

        await silent.start()
        caller = Caller(eng, "4200")
        t0 = time.monotonic()
        await caller.dial()     # baton.hold answers once the offer expired
        assert 0.9 <= time.monotonic() - t0 < 2.0
        session = next(iter(eng.sessions.values()))
        assert [(h.module, h.reason) for h in session.history] == [
            ("acme.survey", "initial"), ("baton.hold", "fallback:offer-expired")]
        assert session.params["VendorError"] == "offer-expired"
        await caller.bye()
        caller.close()
        await silent.close()

        decliner = VendorClient(target(eng), "acme.survey", SECRET_A)

        @decliner.on_offer
        async def decline(offer):
            await offer.decline("busy")

        await decliner.start()
        caller = Caller(eng, "4200")
        t0 = time.monotonic()
        await caller.dial()
        assert time.monotonic() - t0 < 0.5
        session = next(iter(eng.sessions.values()))
        assert [(h.module, h.reason) for h in session.history] == [
            ("acme.survey", "initial"), ("baton.hold", "fallback:declined")]
        await caller.bye()
        caller.close()
        await decliner.close()
        # Nobody attached: the engine's own fallback for a module that is not there.
        await wait_until(lambda: "acme.survey" not in eng.registry.vendors)
        caller = Caller(eng, "4200")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        assert [(h.module, h.reason) for h in session.history] == [("baton.hold", "fallback")]
        await caller.bye()
        caller.close()


async def test_round_robin_spreads_offers():
    async with running_engine(control_config()) as eng:
        clients, counts = [], {}
        for name in ("p1", "p2", "p3"):
            c = VendorClient(target(eng), "acme.survey", SECRET_A, instance=name)

            def handler(name=name):
                async def on(offer):
                    counts[name] = counts.get(name, 0) + 1
                    call = await offer.take()
                    await call.hangup()
                return on
            c.on_offer(handler())
            await c.start()
            clients.append(c)
        for _ in range(6):
            caller = Caller(eng, "4000")
            caller.c.send(caller.call.request("INVITE", ""))
            await wait_until(lambda: not eng.sessions and sum(counts.values()) > 0, 2)
            await asyncio.sleep(0.05)
            caller.close()
        await wait_until(lambda: sum(counts.values()) == 6)
        assert counts == {"p1": 2, "p2": 2, "p3": 2}
        for c in clients:
            await c.close()


def handoff_config() -> dict:
    return with_app(control_config(), "handoff", "4300", {
        "a": {"module": "acme.survey", "outlets": {"done": "after", "fallback": "hold"}},
        "after": {"module": "baton.echo"},
        "hold": {"module": "baton.hold"}}, "a")


async def test_transfer_to_a_module_code_leaves_through_the_calling_nodes_outlets():
    """Two chained vendor processes, one on the SDK and one on the raw stubs: A transfers
    to the module code globex.desk (not a node of the app), whose `release("done")` goes
    on with the app at A's `done` target instead of ending the call."""
    async with running_engine(handoff_config()) as eng:
        a = VendorClient(target(eng), "acme.survey", SECRET_A)

        @a.on_offer
        async def on_a(offer):
            await (await offer.take()).transfer("globex.desk", {"topic": "billing"})

        await a.start()
        b = await RawVendor(eng, "globex.desk", SECRET_B).start()
        caller = Caller(eng, "4300")
        dial = asyncio.ensure_future(caller.dial())
        offer = await b.expect("offer")
        assert (offer.reason, list(offer.outlets)) == ("transfer", ["done", "fallback"])
        assert pb.from_struct(offer.module_params)["topic"] == "billing"
        sid = offer.session_id
        b.send(mh.VendorMessage(take=mh.Take(offer_id=offer.offer_id, session_id=sid)))
        assert (await b.expect("ack")).code == 0
        b.send(mh.VendorMessage(command=mh.Command(command_id="a1", session_id=sid,
                                                   answer=mh.Answer())))
        assert (await b.expect("ack")).code == 0
        await dial
        b.send(mh.VendorMessage(command=mh.Command(command_id="r1", session_id=sid,
                                                   release=mh.Release(outlet="done"))))
        ack = await b.expect("ack")
        assert (ack.command_id, ack.code) == ("r1", 0)
        revoked = (await b.expect("event")).control_revoked
        assert (revoked.reason, revoked.next_module) == ("outlet:done", "baton.echo")
        session = eng.sessions[sid]
        assert [(h.module, h.reason) for h in session.history] == [
            ("acme.survey", "initial"), ("globex.desk", "transfer"), ("baton.echo", "outlet:done")]
        assert not session.ended
        await caller.bye()
        caller.close()
        await b.close()
        await a.close()


async def test_unknown_action_is_unimplemented_and_an_empty_one_invalid():
    """A vendor built on a newer proto sends an action this engine does not know: the
    answer is UNIMPLEMENTED (the engine lacks it), not the INVALID_ARGUMENT of a command
    with no action at all; the session stays the vendor's."""
    async with running_engine(control_config()) as eng:
        v = await RawVendor(eng, "acme.survey", SECRET_A).start()
        caller = Caller(eng, "4000")
        dial = asyncio.ensure_future(caller.dial())
        offer = await v.expect("offer")
        sid = offer.session_id
        v.send(mh.VendorMessage(take=mh.Take(offer_id=offer.offer_id, session_id=sid)))
        assert (await v.expect("ack")).code == 0
        # Field 40 of Command: an action of a later proto (wire type 2, empty message).
        newer = mh.Command.FromString(
            mh.Command(command_id="n1", session_id=sid).SerializeToString() + b"\xc2\x02\x00")
        v.send(mh.VendorMessage(command=newer))
        ack = await v.expect("ack")
        assert (ack.command_id, ack.code, ack.field) == \
            ("n1", grpc.StatusCode.UNIMPLEMENTED.value[0], "action")
        assert ack.message.startswith("action: field 40"), ack.message
        v.send(mh.VendorMessage(command=mh.Command(command_id="e1", session_id=sid)))
        ack = await v.expect("ack")
        assert (ack.command_id, ack.code, ack.field) == \
            ("e1", grpc.StatusCode.INVALID_ARGUMENT.value[0], "action")
        v.send(mh.VendorMessage(command=mh.Command(command_id="a1", session_id=sid,
                                                   answer=mh.Answer())))
        assert (await v.expect("ack")).code == 0
        await dial
        await caller.bye()
        caller.close()
        await v.close()


async def test_offer_withdrawn_when_it_expires_as_the_docs_say():
    """An offer left unanswered past its deadline is withdrawn with reason "expired"
    (the proto and the guide say so); taking it then is FAILED_PRECONDITION."""
    async with running_engine(fallback_config()) as eng:
        v = await RawVendor(eng, "acme.survey", SECRET_A).start()
        caller = Caller(eng, "4200")
        dial = asyncio.ensure_future(caller.dial())
        offer = await v.expect("offer")
        gone = await v.expect("offer_withdrawn")
        assert (gone.offer_id, gone.session_id, gone.reason) == \
            (offer.offer_id, offer.session_id, "expired")
        v.send(mh.VendorMessage(take=mh.Take(offer_id=offer.offer_id,
                                             session_id=offer.session_id)))
        ack = await v.expect("ack")
        assert ack.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "expired" in ack.message
        await dial          # the session followed fallback to baton.hold
        await caller.bye()
        caller.close()
        await v.close()
    proto = open(f"{ROOT}/proto/baton/v1/module_host.proto").read()
    comment = proto.split("message OfferWithdrawn")[0].rsplit("}", 1)[1]
    assert "expire" in comment, comment
    guide = open(f"{ROOT}/docs/vendors.md").read().split("\n\n")
    assert any("expire" in p for p in guide if "OfferWithdrawn" in p)
