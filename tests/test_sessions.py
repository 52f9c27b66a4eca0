"""Sessions passing between modules: apps and outlets, bridging, events, API transitions,
policy, fallback, and RTP continuity for the caller across every change."""
from __future__ import annotations

import asyncio
import socket
import struct

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from tests.helpers import SDP_OFFER, Call, UdpClient, engine_config, running_engine  # noqa: E402


def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def rtp_packet(seq, ts, payload=b"\x55" * 160, pt=0, ssrc=0xABCD, marker=False):
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                       ts & 0xFFFFFFFF, ssrc) + payload


def dtmf_packets(seq, ts, digit_code):
    out = []
    for i, (dur, end) in enumerate([(160, False), (320, False), (480, True), (480, True)]):
        out.append(rtp_packet(seq + i, ts, bytes([digit_code, (0x80 if end else 0) | 10]) +
                              struct.pack("!H", dur), pt=101, marker=i == 0))
    return out


def drain(sock):
    out = []
    while True:
        try:
            out.append(sock.recv(2048))
        except BlockingIOError:
            return out


class Caller:
    """A raw SIP + RTP caller that keeps what it receives."""

    def __init__(self, eng, number):
        self.c = UdpClient("127.0.0.1", eng.sip_port)
        self.media = udp()
        self.call = Call(self.c, number)
        self.remote = None
        self.seq = 1000
        self.ts = 50000
        self.received = []

    async def dial(self, expect=200):
        self.c.send(self.call.request("INVITE", SDP_OFFER.format(port=self.media.getsockname()[1])))
        m = await self.c.expect(expect, timeout=5)
        self.call.to_tag = m.to_tag
        if expect == 200:
            self.c.send(self.call.request("ACK"))
            port = int(m.body.split(b"m=audio ")[1].split()[0])
            self.remote = ("127.0.0.1", port)
        return m

    async def talk(self, seconds, payload=b"\x55" * 160):
        for _ in range(int(seconds / 0.02)):
            self.media.sendto(rtp_packet(self.seq, self.ts, payload), self.remote)
            self.seq += 1
            self.ts += 160
            await asyncio.sleep(0.02)
            self.received += drain(self.media)

    async def press(self, digit_code):
        for p in dtmf_packets(self.seq, self.ts, digit_code):
            self.media.sendto(p, self.remote)
            self.seq += 1
            await asyncio.sleep(0.02)
        self.ts += 480

    async def bye(self):
        self.call.cseq += 1
        self.c.send(self.call.request("BYE"))
        await self.c.expect(200)

    def close(self):
        self.c.close()
        self.media.close()


def callee_config():
    raw = engine_config()
    base = raw["media"]["rtp_port_min"] + 6000
    raw["media"].update(rtp_port_min=base, rtp_port_max=base + 200)
    raw["accounts"]["demo"]["numbers"]["1001"] = {"module": "baton.echo"}
    raw["accounts"]["demo"]["numbers"]["1005"] = {"module": "baton.hold", "ring_seconds": 30}
    return raw


def headers(pkts):
    return [struct.unpack("!BBHII", p[:12]) for p in pkts]


async def test_endpoint_number_bridges_and_relays_both_ways():
    async with running_engine(callee_config()) as callee:
        raw = engine_config()
        raw["accounts"]["demo"]["numbers"]["1002"] = {
            "endpoint": f"sip:1001@127.0.0.1:{callee.sip_port}"}
        async with running_engine(raw) as eng:
            caller = Caller(eng, "1002")
            await caller.dial()
            session = next(iter(eng.sessions.values()))
            assert session.module.code == "baton.bridge" and session.level == "basic"
            payload = bytes(range(1, 161)).replace(b"\x7f", b"\x7e")  # μ-law -0 is not kept
            await caller.talk(0.6, payload)
            await asyncio.sleep(0.1)
            caller.received += drain(caller.media)
            echoed = [p for p in caller.received if p[12:] == payload]
            assert len(echoed) > 10, "the caller must hear itself through bridge -> echo -> bridge"
            assert len({h[4] for h in headers(caller.received)}) == 1
            await caller.bye()
            await asyncio.sleep(0.2)
            assert eng.sessions == {} and callee.sessions == {}
            assert eng.ports.in_use == 0
            caller.close()


async def test_endpoint_failure_is_passed_back_to_the_caller():
    async with running_engine(callee_config()) as callee:
        raw = engine_config()
        raw["accounts"]["demo"]["numbers"]["1002"] = {
            "endpoint": f"sip:9999@127.0.0.1:{callee.sip_port}"}
        async with running_engine(raw) as eng:
            caller = Caller(eng, "1002")
            await caller.dial(expect=404)
            await asyncio.sleep(0.1)
            assert eng.sessions == {} and eng.ports.in_use == 0
            caller.close()


def app_config(callee_port):
    raw = engine_config()
    raw["apps"] = {"support": {
        "start": "menu",
        "vars": {"company": "Acme"},
        "nodes": {
            "menu": {"module": "baton.menu",
                     "params": {"prompt": "Press one for the echo desk.", "timeout": 3},
                     "outlets": {"1": "desk", "2": "hold", "timeout": "bye"}},
            "desk": {"module": "baton.bridge",
                     "params": {"to": f"sip:1001@127.0.0.1:{callee_port}", "timeout": 5},
                     "outlets": {"busy": "bye", "failed": "bye", "no-answer": "bye"},
                     "events": {"dialled-hangup": "survey"}},
            "hold": {"module": "baton.hold"},
            "survey": {"module": "baton.play", "params": {"text": "Thank you."}},
            "bye": {"module": "baton.play", "params": {"text": "Goodbye."}},
        }}}
    raw["accounts"]["demo"]["numbers"]["2000"] = {"app": "support"}
    return raw


async def test_app_menu_bridge_then_post_call_module_on_dialled_hangup():
    async with running_engine(callee_config()) as callee:
        async with running_engine(app_config(callee.sip_port)) as eng:
            caller = Caller(eng, "2000")
            await caller.dial()
            session = next(iter(eng.sessions.values()))
            await caller.talk(0.3)
            await caller.press(1)  # RFC 4733 digit 1
            await caller.talk(0.5, bytes(range(1, 161)))
            assert session.module.code == "baton.bridge"
            assert len(callee.sessions) == 1
            # The dialled party hangs up: the caller goes to the post-call module.
            next(iter(callee.sessions.values())).end("api")
            for _ in range(100):
                if session.module.code == "baton.play":
                    break
                await asyncio.sleep(0.02)
            # The caller hears the thank-you and then the call ends with a BYE.
            while True:
                m = await caller.c.recv(timeout=10)
                if m.is_request and m.method == "BYE":
                    break
            hist = [(h.module, h.reason) for h in session.history]
            assert hist == [("baton.menu", "initial"), ("baton.bridge", "outlet:1"),
                            ("baton.play", "event:dialled-hangup")], hist
            assert session.vars == {"company": "Acme"}
            spans = session.history
            assert all(a.end_mono == b.start_mono or b.start_mono >= a.end_mono
                       for a, b in zip(spans, spans[1:]))
            caller.close()


async def test_menu_timeout_and_api_transition():
    async with running_engine(callee_config()) as callee:
        raw = app_config(callee.sip_port)
        raw["apps"]["support"]["nodes"]["menu"]["params"]["timeout"] = 0.3
        raw["apps"]["support"]["nodes"]["menu"]["params"]["retries"] = 0
        async with running_engine(raw) as eng:
            caller = Caller(eng, "2000")
            await caller.dial()
            session = next(iter(eng.sessions.values()))
            # An API transition while the menu runs (the seed's asynchronous transition).
            assert eng.transition(session.id, "baton.echo")
            assert session.module.code == "baton.echo"
            assert session.history[-1].reason == "api"
            assert not eng.transition("no-such-session", "baton.echo")
            await caller.talk(0.2)
            await caller.bye()
            caller.close()


async def test_policy_denial_follows_denied_outlet():
    raw = engine_config()
    raw["apps"] = {"a": {"start": "first", "nodes": {
        "first": {"module": "baton.echo", "outlets": {"denied": "second"}},
        "second": {"module": "baton.hold"}}}}
    raw["accounts"]["demo"]["numbers"]["2001"] = {"app": "a"}
    raw["policy"] = {"deny_modules": {"demo": ["baton.echo"]}}
    async with running_engine(raw) as eng:
        caller = Caller(eng, "2001")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        assert session.module.code == "baton.hold"
        hist = [(h.module, h.reason) for h in session.history]
        assert hist == [("policy-denied:baton.echo", "policy-denied"),
                        ("baton.hold", "policy-denied")], hist
        await caller.bye()
        caller.close()


async def test_unknown_module_follows_fallback():
    raw = engine_config()
    raw["apps"] = {"a": {"start": "first", "nodes": {
        "first": {"module": "acme.gone", "outlets": {"fallback": "second"}},
        "second": {"module": "baton.hold"}}}}
    raw["accounts"]["demo"]["numbers"]["2002"] = {"app": "a"}
    async with running_engine(raw) as eng:
        caller = Caller(eng, "2002")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        assert session.module.code == "baton.hold"
        assert session.history[-1].reason == "fallback"
        await caller.bye()
        caller.close()


async def test_transitions_are_seamless_for_the_caller():
    """hold -> echo -> hold -> echo by API: one SSRC, sequence +1 every packet,
    no gap longer than one packet time, no re-INVITE towards the caller."""
    raw = engine_config()
    async with running_engine(raw) as eng:
        caller = Caller(eng, "1000")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        await caller.talk(0.3)
        for target in ("baton.echo", "baton.hold", "baton.echo", "baton.hold"):
            eng.transition(session.id, target)
            await caller.talk(0.3, bytes(range(1, 161)))
        await asyncio.sleep(0.05)
        caller.received += drain(caller.media)
        hs = headers(caller.received)
        assert len(hs) > 60
        assert len({h[4] for h in hs}) == 1, "one SSRC across every module"
        seqs = [h[2] for h in hs]
        assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:])), "no gap, no repeat"
        tss = [h[3] for h in hs]
        assert all((b - a) & 0xFFFFFFFF == 160 for a, b in zip(tss, tss[1:])), \
            "20 ms of timeline per packet: no audio gap"
        # No request (re-INVITE) reached the caller.
        with pytest.raises(asyncio.TimeoutError):
            await caller.c.recv(timeout=0.2)
        assert [h.module for h in session.history] == ["baton.hold", "baton.echo", "baton.hold",
                                                      "baton.echo", "baton.hold"]
        await caller.bye()
        caller.close()


def record_config(**params):
    raw = engine_config()
    raw["apps"] = {"vm": {"start": "rec", "nodes": {
        "rec": {"module": "baton.record",
                "params": {"beep": True, "silence": 0.6, "max_length": 3, "finish_on_key": "#",
                           **params},
                "outlets": {"done": "after"}},
        "after": {"module": "baton.hold"}}}}
    raw["accounts"]["demo"]["numbers"]["3000"] = {"app": "vm"}
    return raw


@pytest.mark.parametrize("how,expect_reason", [("silence", "silence"), ("key", "finish-key"),
                                               ("length", "max-length")])
async def test_record_module_finishes_and_writes_wav(how, expect_reason):
    import wave

    import numpy as np

    from ext.g711_py import ulaw_encode

    params = {"max_length": 1.0} if how == "length" else {}
    async with running_engine(record_config(**params)) as eng:
        caller = Caller(eng, "3000")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        t = np.arange(160) / 8000
        loud = ulaw_encode((8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16))
        await caller.talk(0.4, b"\xff" * 160)   # the beep plays meanwhile
        await caller.talk(0.8, loud)             # the message
        if how == "key":
            await caller.press(11)               # '#'
        await caller.talk(1.4, b"\xff" * 160)   # quiet: ends the silence case
        for _ in range(100):
            if session.module.code == "baton.hold":
                break
            await asyncio.sleep(0.02)
        assert session.module.code == "baton.hold", [h.module for h in session.history]
        path = session.params["RecordingPath"]
        with wave.open(path) as w:
            assert w.getframerate() == 8000 and w.getnchannels() == 1
            frames = w.getnframes()
        assert 0.3 * 8000 < frames <= 1.2 * 8000, frames
        assert session.params["RecordingDuration"] > 0.3
        assert session.history[-1].reason == "outlet:done"
        assert session.params["RecordingReason"] == expect_reason
        await caller.bye()
        caller.close()


async def test_every_change_of_control_is_stamped_into_the_ring():
    import os

    import msgpack

    from ext.kernels import ring

    raw = engine_config()
    async with running_engine(raw) as eng:
        caller = Caller(eng, "1000")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        eng.transition(session.id, "baton.echo")
        eng.transition(session.id, "baton.hold")
        await caller.talk(0.1)
        await caller.bye()
        await asyncio.sleep(0.05)
        path = os.path.join(eng.cfg.data_dir, "ring", "ring.dat")
        reader = ring.RingReader(path, 0)
        records = [msgpack.unpackb(b) for _, b in reader.read(100)]
        reader.close()
        caller.close()
    mine = [r for r in records if r.get("session") == session.id]
    kinds = [(r["type"], r.get("kind") or r.get("to")) for r in mine]
    assert kinds == [("session", "start"), ("transition", "baton.hold"),
                     ("transition", "baton.echo"), ("transition", "baton.hold"),
                     ("session", "end")], kinds
    seqs = [r["seq"] for r in mine]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    trans = [r for r in mine if r["type"] == "transition"]
    assert [t["mono_ns"] for t in trans] == [h.start_mono for h in session.history]
    assert [t["reason"] for t in trans] == ["initial", "api", "api"]
    assert trans[0]["from"] == "" and trans[1]["from"] == "baton.hold"
    # The segments add up to the session exactly: start .. transitions .. end.
    start, end = mine[0]["mono_ns"], mine[-1]["mono_ns"]
    assert trans[0]["mono_ns"] >= start
    edges = [t["mono_ns"] for t in trans] + [end]
    assert sum(b - a for a, b in zip(edges, edges[1:])) == end - trans[0]["mono_ns"]
    assert all(r["node"] == eng.cfg.node_id and r["account"] == "demo" for r in mine)


async def test_no_way_forward_apologises_then_hangs_up():
    raw = engine_config()
    raw["apps"] = {"a": {"start": "first", "nodes": {
        "first": {"module": "baton.hold", "outlets": {"1": "acme.nowhere"}}}}}
    raw["accounts"]["demo"]["numbers"]["2005"] = {"app": "a"}
    async with running_engine(raw) as eng:
        caller = Caller(eng, "2005")
        await caller.dial()
        session = next(iter(eng.sessions.values()))
        session.follow("1")  # leads to a vendor module that is not attached, and no fallback
        bye = None
        while bye is None:
            await caller.talk(0.2)
            try:
                m = await caller.c.recv(timeout=0.01)
                if m.is_request and m.method == "BYE":
                    bye = m
            except asyncio.TimeoutError:
                pass
        loud = [p for p in caller.received if p[12:] != b"\xff" * 160]
        assert len(loud) > 20, "the caller heard the spoken apology before the BYE"
        assert session.end_reason == "error"
        caller.close()
