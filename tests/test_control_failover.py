"""Losing a vendor: a vendor process killed with SIGKILL mid-call (a separate
process), and the SDK reconnecting after the engine restarts."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from tests.vendor_procs.harness import (SECRET_A, control_config, spawn_vendor, stop,  # noqa: E402
                                        wait_attached, wait_until, with_app)

from control.sdk import VendorClient  # noqa: E402
from tests.helpers import free_port, running_engine  # noqa: E402
from tests.test_sessions import Caller, drain  # noqa: E402

SILENCE = (b"\xff" * 160, b"\x7f" * 160)


async def test_vendor_killed_mid_call_follows_fallback_within_two_seconds():
    raw = with_app(control_config(), "fo", "4400", {
        "v": {"module": "acme.survey", "outlets": {"fallback": "sorry"}},
        "sorry": {"module": "baton.play", "params": {"text": "Sorry, one moment please."},
                  "outlets": {"done": "hold"}},
        "hold": {"module": "baton.hold"}}, "v")
    async with running_engine(raw) as eng:
        proc = spawn_vendor("basic.py", eng, "acme.survey", SECRET_A, "--mode", "hold")
        try:
            await wait_attached(eng, "acme.survey", proc=proc)
            with_fb, no_fb = Caller(eng, "4400"), Caller(eng, "4000")
            await with_fb.dial()
            await no_fb.dial()
            s1 = next(s for s in eng.sessions.values() if s.number == "4400")
            s2 = next(s for s in eng.sessions.values() if s.number == "4000")
            await asyncio.gather(with_fb.talk(0.6), no_fb.talk(0.6))
            assert any(p[12:] not in SILENCE for p in with_fb.received), "the vendor speaks"
            with_fb.received.clear()
            killed = time.monotonic_ns()
            os.kill(proc.pid, signal.SIGKILL)
            empty_run = longest_empty = 0
            while time.monotonic_ns() - killed < 2.5e9:
                n = len(with_fb.received)
                await with_fb.talk(0.02)
                empty_run = 0 if len(with_fb.received) > n else empty_run + 1
                longest_empty = max(longest_empty, empty_run)
                if s1.module.code == "baton.play" and s2.ended and \
                        any(p[12:] not in SILENCE for p in with_fb.received):
                    break
            hist = [(h.module, h.reason) for h in s1.history]
            assert hist[:2] == [("acme.survey", "initial"), ("baton.play", "fallback:stream-lost")]
            assert s1.history[0].end_reason == "fallback:stream-lost"
            fell_back = (s1.history[1].start_mono - killed) / 1e9
            assert 0 < fell_back < 2.0, fell_back
            # No dead air: RTP kept flowing and the fallback prompt is heard within 2 s.
            assert longest_empty <= 5, f"{longest_empty * 20} ms without RTP"
            assert any(p[12:] not in SILENCE for p in with_fb.received), "fallback prompt heard"
            # Without a fallback outlet the call ends (the caller gets a BYE).
            assert s2.ended and s2.end_reason == "vendor-stream-lost"
            m = await no_fb.c.recv(timeout=2)
            assert m.is_request and m.method == "BYE"
            stats = eng.control.hub.modules["acme.survey"].stats
            assert stats["lost"] == 2 and "acme.survey" not in eng.registry.vendors
            await with_fb.bye()
            with_fb.received += drain(with_fb.media)
            with_fb.close()
            no_fb.close()
        finally:
            stop(proc)


async def test_sdk_reconnects_after_the_engine_restarts():
    port = free_port(socket.SOCK_STREAM)
    raw = control_config(grpc_addr=f"127.0.0.1:{port}")
    v = VendorClient(f"127.0.0.1:{port}", "acme.survey", SECRET_A, backoff_initial=0.1,
                     backoff_max=0.5)
    taken = []

    @v.on_offer
    async def on(offer):
        call = await offer.take()
        taken.append(call.session_id)
        await call.answer()

    async with running_engine(raw):
        await v.start()
        assert v.connections == 1
    assert await wait_until(lambda: not v.registered.is_set(), 3)
    async with running_engine(control_config(grpc_addr=f"127.0.0.1:{port}")) as eng2:
        assert await wait_until(lambda: v.registered.is_set(), 5)
        assert v.connections == 2 and eng2.grpc_port == port
        caller = Caller(eng2, "4000")
        await caller.dial()
        assert len(taken) == 1
        await caller.bye()
        caller.close()
        await v.close()
