"""200 concurrent calls from SIPp, every one controlled by one vendor process
(a separate process): offered, taken, greeted, released, ended cleanly."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

from tests.vendor_procs.harness import (SECRET_A, control_config, spawn_vendor, stop,  # noqa: E402
                                        wait_attached, wait_until, with_app)

from tests.helpers import free_port, running_engine  # noqa: E402

SIPP = shutil.which("sipp")
CALLS = 200
# About five seconds of speech: every call is placed within the first second, so all 200
# overlap under the vendor's control, and each has four seconds to spare before SIPp's BYE.
GREETING = "Welcome to the load test. This greeting keeps the vendor in control for a moment."

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(SIPP is None, reason="sipp is not installed")]


async def test_two_hundred_concurrent_sessions_one_vendor_process(tmp_path):
    raw = with_app(control_config(), "load", "4500", {
        "v": {"module": "acme.survey", "outlets": {"done": "hold", "fallback": "hold"}},
        "hold": {"module": "baton.hold"}}, "v")
    raw["vendors"]["acme"]["offer_timeout"] = 3.0
    async with running_engine(raw) as eng:
        proc = spawn_vendor("basic.py", eng, "acme.survey", SECRET_A, "--mode", "say-release",
                            "--text", GREETING)
        try:
            await wait_attached(eng, "acme.survey", proc=proc)
            module = eng.control.hub.modules["acme.survey"]
            vendor_proc = module.processes[0]
            peak = {"held": 0, "sessions": 0}

            async def sample():
                while True:
                    peak["held"] = max(peak["held"], len(vendor_proc.held))
                    peak["sessions"] = max(peak["sessions"], len(eng.sessions))
                    await asyncio.sleep(0.02)

            sampler = asyncio.ensure_future(sample())
            cmd = [SIPP, "-sn", "uac", f"127.0.0.1:{eng.sip_port}", "-s", "4500",
                   "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
                   "-mp", str(free_port(even=True)), "-r", "200", "-m", str(CALLS),
                   "-l", str(CALLS), "-d", "9000", "-max_socket", "600", "-nostdin",
                   "-timeout", "60s", "-timeout_error", "-trace_err",
                   "-error_file", str(tmp_path / "err.log")]
            sipp = await asyncio.create_subprocess_exec(
                *cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
            _, err = await asyncio.wait_for(sipp.communicate(), 90)
            sampler.cancel()
            errors = (tmp_path / "err.log").read_text(errors="replace") \
                if (tmp_path / "err.log").exists() else ""
            assert sipp.returncode == 0, f"sipp exit {sipp.returncode}: {err!r}\n{errors[-3000:]}"
            await wait_until(lambda: not eng.sessions, 10)
            stats = module.stats
            assert stats["offered"] == CALLS and stats["taken"] == CALLS, stats
            assert stats["expired"] == 0 and stats["lost"] == 0 and stats["fallbacks"] == 0
            assert peak["held"] >= CALLS * 0.9, peak
            assert peak["sessions"] == CALLS, peak
            ended = [s for s in eng.finished if s.number == "4500"]
            assert len(ended) == CALLS
            for s in ended:
                assert [(h.module, h.reason) for h in s.history] == [
                    ("acme.survey", "initial"), ("baton.hold", "outlet:done")], s.summary()
                assert s.end_reason == "hangup" and s.control is not None
            assert eng.ports.in_use == 0
        finally:
            out = stop(proc)
        line = next(ln for ln in out.splitlines() if ln.startswith("STATS "))
        vstats = json.loads(line[6:])
        assert vstats == {"offers": CALLS, "taken": CALLS, "released": CALLS, "lost": 0,
                          "errors": 0}, out[-2000:]
