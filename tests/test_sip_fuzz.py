"""Mutated SIP over UDP and TCP against `baton serve` in a loopback-only network
namespace (messages name foreign hosts, so nothing may leave the machine).

The engine must keep answering, log no traceback or error, and keep journaling
sessions. Fixed seeds: a failure is reproduced by running the peer again with
the seed it printed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import pytest

from engine.sessions.journal import list_sessions
from tests.helpers import DEMO, EngineProcess
from tests.netns import Netns, NetnsUnavailable

pytestmark = pytest.mark.netns

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sip_fuzz_peer.py")


@pytest.fixture
def netns():
    ns = Netns("baton-fuzz")
    try:
        ns.create()
    except NetnsUnavailable as exc:
        pytest.skip(f"needs a loopback-only network namespace: {exc}")
    try:
        yield ns
    finally:
        ns.destroy()


@pytest.mark.parametrize("mode, seed, count", [("udp", 4475, 2000), ("tcp", 3261, 1000)])
def test_mutated_sip_is_answered_without_a_fault(netns, mode, seed, count):
    eng = EngineProcess(DEMO, port=5070, netns=netns.name)
    try:
        eng.wait_ready()
        r = netns.run([sys.executable, PEER, mode, "127.0.0.1:5070", str(seed), str(count)],
                      capture_output=True, text=True, timeout=240)
        # Let the media timers (RTCP every 5 s, inactivity) run over the calls the
        # fuzz left up: a fault there is a traceback too.
        time.sleep(6.0)
        log = eng.output()
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\nengine:\n{log[-4000:]}"
        assert json.loads(r.stdout)["alive_at_end"]
        assert eng.proc.poll() is None, log[-4000:]
        faults = [ln for ln in log.splitlines()
                  if "Traceback" in ln or " ERROR " in ln or " CRITICAL " in ln
                  or "Exception in callback" in ln]
        if faults:
            lines = log.splitlines()
            at = next(i for i, ln in enumerate(lines) if ln in faults)
            raise AssertionError("\n".join(lines[at:at + 40]))
        assert eng.stop(timeout=15) == 0, eng.output()[-3000:]
        # The journal took the sessions the fuzz made (its writer did not die).
        if mode == "udp":
            assert list_sessions(eng.data_dir, limit=5)
    finally:
        if eng.proc.poll() is None:
            eng.proc.kill()
            eng.proc.wait()
        shutil.rmtree(eng.data_dir, ignore_errors=True)
