"""Overload control: past its calls-in-setup mark the engine refuses new INVITEs with
503 + Retry-After before any transaction, dialog or session exists, answers the refused
INVITEs' retransmissions from memory, keeps serving calls it holds, OPTIONS and the gRPC
API, and accepts calls again once the load is gone (hysteresis).

The overload is made deterministic: a mark of 3 calls in setup and a far end that rings
forever, so three calls to it stay in setup until they are cancelled."""
from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from ext import sip_py
from ext.kernels import load
from tests.helpers import SDP_OFFER, UdpClient, engine_config, options, running_engine
from tests.test_bridge import far_end
from tests.test_sessions import Caller

IMPLS = [pytest.param(sip_py, id="py")]
if load("sip") is not None:
    IMPLS.insert(0, pytest.param(load("sip"), id="c"))

HEAD = "INVITE sip:1000@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("data,initial", [
    (HEAD + "To: <sip:1000@h>\r\nCall-ID: a\r\n\r\n", True),
    (HEAD + "To: <sip:1000@h>;tag=9\r\n\r\n", False),
    (HEAD + "t: <sip:1000@h> ; TAG = 9\r\n\r\n", False),           # compact form, spaces
    (HEAD + "To: \"Montag\" <sip:1000@h>\r\n\r\nv=0;tag=1", True),  # tag only in the body
    (HEAD.replace("INVITE", "BYE", 1) + "To: <sip:1000@h>\r\n\r\n", False),
    ("OPTIONS sip:h SIP/2.0\r\nTo: <sip:h>\r\n\r\n", False),
    ("INVITE", False),
])
def test_initial_invite_peek(impl, data, initial):
    assert impl.initial_invite(data.encode()) is initial


async def cancelled(c: Caller) -> None:
    """CANCEL a call in setup; wait for its 487 (RFC 3261 9.2)."""
    c.call.to_tag = None
    c.c.send(c.call.request("CANCEL", branch=c.call.branch))
    while True:
        m = await c.c.recv(timeout=3)
        if not m.is_request and m.cseq_method == "INVITE" and m.status >= 200:
            assert m.status == 487
            c.call.to_tag = m.to_tag
            c.c.send(c.call.request("ACK", branch=c.call.branch))
            return


def overload_config(far_port: int) -> dict:
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["2000"] = {"endpoint": f"sip:bob@127.0.0.1:{far_port}"}
    raw["overload"] = {"max_calls_in_setup": 3, "low_water": 0.5, "retry_after": 7,
                       "max_loop_lag_ms": 60000, "max_rx_queue_kb": 1 << 20}
    raw["accounts"]["demo"]["api_tokens"] = ["overload-token-0123456789abcdef"]
    return raw


async def test_overload_refuses_new_invites_and_keeps_the_rest_working():
    import grpc

    from proto import pb

    transport, far = await far_end(final=None)  # rings forever
    try:
        async with running_engine(overload_config(far.port)) as eng:
            ov = eng.sip.overload
            # A call answered before the overload (baton.hold on 1000).
            held = Caller(eng, "1000")
            await held.dial()
            assert ov.calls_in_setup == 0 and not ov.active

            # Three calls that stay in setup: the engine enters overload.
            ringing = [Caller(eng, "2000") for _ in range(3)]
            for c in ringing:
                c.c.send(c.call.request("INVITE", SDP_OFFER.format(port=c.media.getsockname()[1])))
                await c.c.expect(100, skip_provisional=False)
            assert ov.calls_in_setup == 3 and ov.active

            # A new INVITE: 503 with Retry-After, and no transaction, dialog or session.
            before = (len(eng.sip.transactions.server), len(eng.sip.dialogs), len(eng.sessions),
                      eng.sip.stats["invites"])
            new = Caller(eng, "1000")
            invite = new.call.request("INVITE", SDP_OFFER.format(port=new.media.getsockname()[1]))
            new.c.send(invite)
            m = await new.c.expect(503, skip_provisional=False)
            assert m.get("retry-after") == "7" and m.to_tag and m.call_id == new.call.call_id
            assert ov.refused == 1
            # Its retransmissions: the same 503 again, from memory, without new work.
            for n in range(3):
                new.c.send(invite)
                again = await new.c.expect(503, skip_provisional=False)
                assert again.to_tag == m.to_tag
            assert ov.refused == 1 and ov.absorbed == 3
            after = (len(eng.sip.transactions.server), len(eng.sip.dialogs), len(eng.sessions),
                     eng.sip.stats["invites"])
            assert after == before
            # The ACK of the 503 is taken quietly.
            new.call.to_tag = m.to_tag
            new.c.send(new.call.request("ACK", branch=new.call.branch))
            assert await new.c.silent(0.3)

            # The call held: a re-INVITE and an in-dialog OPTIONS are answered.
            held.call.cseq += 1
            held.c.send(held.call.request("INVITE", SDP_OFFER.format(
                port=held.media.getsockname()[1])))
            await held.c.expect(200)
            held.c.send(held.call.request("ACK"))
            held.call.cseq += 1
            held.c.send(held.call.request("OPTIONS", ""))
            await held.c.expect(200)
            # An out-of-dialog OPTIONS probe too.
            probe = UdpClient("127.0.0.1", eng.sip_port)
            probe.send(options("127.0.0.1", eng.sip_port, probe.local_port))
            await probe.expect(200)
            probe.close()
            # And the gRPC API.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{eng.grpc_port}") as ch:
                sp = pb.sessions_pb2
                stub = pb.sessions_pb2_grpc.SessionsStub(ch)
                listed = await stub.List(sp.ListRequest(), metadata=(
                    ("authorization", "Bearer overload-token-0123456789abcdef"),))
                assert len(listed.sessions) == len(eng.sessions) == 4

            # Load drops: one call cancelled leaves 2 in setup, still above the low mark.
            cancel = cancelled
            await cancel(ringing[0])
            assert ov.calls_in_setup == 2 and ov.active
            refused = Caller(eng, "1000")
            await refused.dial(expect=503)
            # Below the low mark (3 * 0.5): the engine leaves overload and takes calls.
            await cancel(ringing[1])
            assert ov.calls_in_setup == 1 and not ov.active and ov.entered == {"calls_in_setup": 1}
            fresh = Caller(eng, "1000")
            await fresh.dial()
            await fresh.bye()
            await held.bye()
            await cancel(ringing[2])
            assert ov.calls_in_setup == 0 and ov.refused == 2
            for c in [held, new, refused, fresh, *ringing]:
                c.c.close()
                c.media.close()
    finally:
        transport.close()


SIPP = shutil.which("sipp")


@pytest.mark.interop
@pytest.mark.skipif(SIPP is None, reason="sipp is not installed")
async def test_sipp_calls_get_503_while_overloaded_and_200_after(tmp_path):
    from tests.test_interop_sipp import SCENARIOS, run_sipp

    class Target:  # what run_sipp needs of an engine
        def __init__(self, eng):
            self.port = eng.sip_port

        def output(self):
            return ""

    transport, far = await far_end(final=None)
    try:
        async with running_engine(overload_config(far.port)) as eng:
            ringing = [Caller(eng, "2000") for _ in range(3)]
            for c in ringing:
                c.c.send(c.call.request("INVITE", SDP_OFFER.format(port=c.media.getsockname()[1])))
                await c.c.expect(100, skip_provisional=False)
            assert eng.sip.overload.active
            stats = await asyncio.to_thread(run_sipp, Target(eng), tmp_path, "-r", "20",
                                            scenario="overload_503.xml", calls=20)
            assert stats["messages"].count("SIP/2.0 503 Service Unavailable") >= 20
            assert eng.sip.overload.refused == 20 and eng.sip.stats["invites"] == 3
            for c in ringing:
                await cancelled(c)
                c.c.close()
                c.media.close()
            assert not eng.sip.overload.active
            # SIPp's own uac scenario: every call answered and released.
            await asyncio.to_thread(run_sipp, Target(eng), tmp_path, "-s", "1000", "-r", "20",
                                    calls=20)
            assert os.path.isdir(SCENARIOS)
    finally:
        transport.close()


async def test_overload_refuses_new_texts_and_keeps_texts_inside_calls():
    """Past the mark, a MESSAGE outside any dialog gets 503 + Retry-After before anything
    is made of it (no transaction, conversation or text), its retransmissions the same
    503 from memory; a MESSAGE inside a held call's dialog is still taken (202); the
    refusals are counted by method in /metrics; after the overload texts are taken again."""
    from tests.test_messaging import message
    from tests.test_metrics import scrape, value

    transport, far = await far_end(final=None)  # rings forever
    raw = overload_config(far.port)
    raw["engine"]["metrics_addr"] = "127.0.0.1:0"
    raw["accounts"]["demo"]["numbers"]["1000"].update(messaging="baton.bot",
                                                     reply="heard: {Body}")
    try:
        async with running_engine(raw) as eng:
            ov = eng.sip.overload
            held = Caller(eng, "1000")
            await held.dial()
            ringing = [Caller(eng, "2000") for _ in range(3)]
            for c in ringing:
                c.c.send(c.call.request("INVITE", SDP_OFFER.format(port=c.media.getsockname()[1])))
                await c.c.expect(100, skip_provisional=False)
            assert ov.active

            # A new text: 503 with Retry-After, and nothing made of it.
            texter = UdpClient("127.0.0.1", eng.sip_port)
            before = (len(eng.sip.transactions.server), len(eng.sessions),
                      len(eng.messaging.conversations))
            data = message(texter, b"are you there?", number="1000")
            texter.send(data)
            m = await texter.expect(503)
            assert m.get("retry-after") == "7" and m.cseq_method == "MESSAGE"
            for _ in range(2):          # its retransmissions (RFC 3261 17.1.2.2, Timer E)
                texter.send(data)
                again = await texter.expect(503)
                assert again.to_tag == m.to_tag
            assert (len(eng.sip.transactions.server), len(eng.sessions),
                    len(eng.messaging.conversations)) == before
            assert not eng.messaging.messages
            assert ov.refused_by == {"MESSAGE": 1} and ov.absorbed == 2 and ov.refused == 0
            # A text inside the held call's dialog goes its ordinary way.
            held.call.cseq += 1
            held.c.send(message(held.c, b"during the call", number="1000", call=held.call))
            await held.c.expect(202)
            (text,) = eng.messaging.messages.values()
            call = eng.sessions[text.session]
            assert text.body == "during the call" and call.kind != "messaging" \
                and call.number == "1000"
            # A new INVITE is refused too, counted apart.
            refused = Caller(eng, "1000")
            await refused.dial(expect=503)
            metrics = await scrape(eng.metrics.url)
            name = "baton_sip_overload_refused_requests_total"
            assert (value(metrics, name, method="MESSAGE"), value(metrics, name, method="INVITE"),
                    value(metrics, "baton_sip_overload_refused_total")) == (1, 1, 1)

            # The overload passes: a new text is taken (202) and answered by the bot.
            for c in ringing[:2]:
                await cancelled(c)
            assert not ov.active
            fresh = UdpClient("127.0.0.1", eng.sip_port)
            fresh.send(message(fresh, b"hello again", number="1000"))
            await fresh.expect(202)
            while True:
                req = await fresh.recv(3)
                if req.is_request and req.method == "MESSAGE":
                    assert req.body == b"heard: hello again"
                    break
            await held.bye()
            await cancelled(ringing[2])
            for c in [held, refused, *ringing]:
                c.c.close()
                c.media.close()
            texter.close()
            fresh.close()
    finally:
        transport.close()


def _with_oc(data: bytes, params: str = ";oc") -> bytes:
    """The request with RFC 7339 parameters added to its (only) Via."""
    head, sep, rest = data.partition(b"\r\nVia: ")
    via, crlf, tail = rest.partition(b"\r\n")
    return head + sep + via + params.encode() + crlf + tail


def _oc_params(m) -> dict:
    """The oc parameters the engine put in a response's top Via: from its `oc=` on (what
    the peer sent, a bare `oc` and its `oc-algo` list, comes before)."""
    via = m.headers["via"][0]
    if ";oc=" not in via:
        return {}
    out = {}
    for p in via[via.index(";oc=") + 1:].split(";"):
        name, _, value = p.partition("=")
        out[name.strip()] = value.strip()
    return out


async def test_rfc7339_oc_peers_are_told_the_loss_percentage_while_overloaded():
    import re

    transport, far = await far_end(final=None)  # rings forever
    try:
        async with running_engine(overload_config(far.port)) as eng:
            ov = eng.sip.overload
            # Not overloaded: an oc peer's call gets no oc parameters.
            calm = Caller(eng, "1000")
            calm.c.send(_with_oc(calm.call.request(
                "INVITE", SDP_OFFER.format(port=calm.media.getsockname()[1]))))
            m = await calm.c.expect(200)
            assert _oc_params(m) == {}
            calm.call.to_tag = m.to_tag
            calm.c.send(calm.call.request("ACK"))

            ringing = [Caller(eng, "2000") for _ in range(3)]
            for c in ringing:
                c.c.send(c.call.request("INVITE", SDP_OFFER.format(port=c.media.getsockname()[1])))
                await c.c.expect(100, skip_provisional=False)
            assert ov.active and ov.setup_full

            # An oc peer's refused INVITE: every new INVITE is refused, so 100 % (loss).
            new = Caller(eng, "1000")
            invite = _with_oc(new.call.request(
                "INVITE", SDP_OFFER.format(port=new.media.getsockname()[1])))
            new.c.send(invite)
            m = await new.c.expect(503, skip_provisional=False)
            oc = _oc_params(m)
            assert oc["oc"] == "100" and oc["oc-algo"] == '"loss"'
            assert oc["oc-validity"] == "500"
            assert re.fullmatch(r"\d{1,12}\.\d{1,5}", oc["oc-seq"])
            assert m.headers["via"][0].startswith(
                f"SIP/2.0/UDP 127.0.0.1:{new.c.local_port};branch={new.call.branch};oc;oc=100")
            seq_overloaded = float(oc["oc-seq"])
            # Its retransmission: the same 503 (from memory), the same parameters.
            new.c.send(invite)
            assert _oc_params(await new.c.expect(503, skip_provisional=False)) == oc

            # A peer without oc gets none; one whose oc-algo does not name loss neither.
            plain = Caller(eng, "1000")
            plain.c.send(plain.call.request(
                "INVITE", SDP_OFFER.format(port=plain.media.getsockname()[1])))
            assert _oc_params(await plain.c.expect(503, skip_provisional=False)) == {}
            other = Caller(eng, "1000")
            other.c.send(_with_oc(other.call.request(
                "INVITE", SDP_OFFER.format(port=other.media.getsockname()[1])),
                ';oc;oc-algo="rate"'))
            assert _oc_params(await other.c.expect(503, skip_provisional=False)) == {}
            # A peer listing loss among others is answered with loss.
            listing = Caller(eng, "1000")
            listing.c.send(_with_oc(listing.call.request(
                "INVITE", SDP_OFFER.format(port=listing.media.getsockname()[1])),
                ';oc;oc-algo="rate,loss"'))
            oc2 = _oc_params(await listing.c.expect(503, skip_provisional=False))
            assert oc2["oc"] == "100" and oc2["oc-algo"] == '"loss"'

            # Other responses to an oc peer carry it too (an out-of-dialog OPTIONS).
            probe = UdpClient("127.0.0.1", eng.sip_port)
            probe.send(_with_oc(options("127.0.0.1", eng.sip_port, probe.local_port)))
            assert _oc_params(await probe.expect(200))["oc"] == "100"

            # Overload over: the oc peer is told so (oc=0, validity 0) with a newer oc-seq.
            await cancelled(ringing[0])
            await cancelled(ringing[1])
            assert not ov.active
            after = Caller(eng, "1000")
            after.c.send(_with_oc(after.call.request(
                "INVITE", SDP_OFFER.format(port=after.media.getsockname()[1]))))
            m = await after.c.expect(200)
            oc3 = _oc_params(m)
            assert oc3["oc"] == "0" and oc3["oc-validity"] == "0" and oc3["oc-algo"] == '"loss"'
            assert float(oc3["oc-seq"]) > seq_overloaded
            after.call.to_tag = m.to_tag
            after.c.send(after.call.request("ACK"))
            await after.bye()
            await calm.bye()
            await cancelled(ringing[2])
            probe.close()
            for c in [calm, new, plain, other, listing, after, *ringing]:
                c.c.close()
                c.media.close()
    finally:
        transport.close()


def test_rfc7339_loss_percentage_follows_the_admitted_share():
    """Throttled: the share of offered new INVITEs the token bucket refuses is the loss
    percentage asked of oc peers; oc-seq grows with every change."""
    from engine.sip.overload import Overload

    ov = Overload()
    ov.throttled = ov.active = True
    ov.admit_rate, ov._offered = 100.0, 400.0
    ov._oc_look()
    assert ov.oc_reduction == 75
    first = float(ov.oc_seq)
    ov.admit_rate = 380.0
    ov._oc_look()
    assert ov.oc_reduction == 5 and float(ov.oc_seq) > first
    ov.throttled = ov.active = False
    ov._oc_look()
    assert ov.oc_reduction == 0 and ov.oc_until > 0
