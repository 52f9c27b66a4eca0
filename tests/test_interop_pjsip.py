"""Interoperability with PJSIP (pjsua2) over loopback.

Each scenario runs `tests/pjsip_peer.py` in a child process against a real
`baton serve`: PJSIP allows one Endpoint per process and a crash in it must
not take the test run down. The child prints a JSON summary of the call
(states, status codes, SDP of the answers, stream info) and keeps PJSIP's
message log in a file that failures show.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT, EngineProcess

pytest.importorskip("pjsua2")

pytestmark = pytest.mark.interop

PEER = os.path.join(ROOT, "tests", "pjsip_peer.py")


def finish_engine(engine: EngineProcess) -> None:
    """The engine survived the peer: it answers OPTIONS, stops cleanly on
    SIGTERM and logged no traceback."""
    answered = any(engine._options_answered() for _ in range(5))
    code = engine.stop()
    out = engine.output()
    assert answered, f"engine stopped answering OPTIONS:\n{out}"
    assert code == 0, f"engine exited with {code} on SIGTERM:\n{out}"
    assert "Traceback" not in out, out


def run_peer(scenario: str, engine: EngineProcess, tmp_path) -> dict:
    log = tmp_path / f"pjsip-{scenario}.log"
    try:
        proc = subprocess.run(
            [sys.executable, PEER, scenario, "--engine", f"127.0.0.1:{engine.port}",
             "--log", str(log)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"PJSIP peer hung in {scenario!r}:\n{exc.stdout}\n{exc.stderr}\n"
                    f"{_tail(log)}\nengine:\n{engine.output()}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    context = (f"exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}\n"
               f"PJSIP log:\n{_tail(log)}\nengine:\n{engine.output()[-3000:]}")
    assert lines, f"PJSIP peer printed no result\n{context}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in result, f"{result['error']}\n{result.get('traceback', '')}\n{context}"
    assert proc.returncode == 0, context
    result["_context"] = context
    return result


def _tail(path, n: int = 12000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"


def _audio_line(sdp: str) -> list[str]:
    m = re.search(r"^m=audio (\d+) RTP/AVP ([\d ]+?)\r?$", sdp, re.M)
    assert m, f"no audio m-line in\n{sdp}"
    return m.group(2).split()


def test_call_answer_hold_unhold_hangup(tmp_path):
    with EngineProcess() as engine:
        r = run_peer("basic", engine, tmp_path)
        ctx = r["_context"]
        assert r["states"][-1] == "DISCONNECTED" and "CONFIRMED" in r["states"], ctx

        # The answer: G.711 on loopback, and the stream PJSIP built from it.
        sdp = r["answer_sdp"]
        assert "c=IN IP4 127.0.0.1" in sdp, sdp
        assert _audio_line(sdp)[0] in ("0", "8"), sdp
        assert re.search(r"a=rtpmap:(0 PCMU|8 PCMA)/8000", sdp), sdp
        assert r["stream"]["codec"] in ("PCMU", "PCMA"), r["stream"]
        assert r["stream"]["clock_rate"] == 8000, r["stream"]
        assert r["stream"]["remote_rtp"].startswith("127.0.0.1:"), r["stream"]
        assert r["media_after_answer"] == "ACTIVE", ctx

        # setHold() offers a=sendonly: the answer must be a=recvonly
        # (RFC 3264 8.4), which PJSIP shows as local hold.
        assert r["hold_status"] == 200, ctx
        assert "a=recvonly" in r["hold_sdp"], r["hold_sdp"]
        assert r["media_after_hold"] == "LOCAL_HOLD", ctx
        # Same session, newer version (RFC 3264 8): o= id kept, version up.
        o1 = re.search(r"^o=\S+ (\d+) (\d+)", sdp, re.M).groups()
        o2 = re.search(r"^o=\S+ (\d+) (\d+)", r["hold_sdp"], re.M).groups()
        assert o1[0] == o2[0] and int(o2[1]) > int(o1[1]), (sdp, r["hold_sdp"])

        assert r["unhold_status"] == 200, ctx
        assert "a=sendrecv" in r["unhold_sdp"], r["unhold_sdp"]
        assert r["media_after_unhold"] == "ACTIVE", ctx

        # PJSIP reports DISCONNECTED when it sends the BYE; the engine's 200
        # to it is in the message log.
        assert r["last_status"] == 200, ctx
        assert r["bye_responses"] == [200], ctx
        assert r["addresses"] == ["127.0.0.1"], ctx
        assert r["sent_over"] == [f"UDP 127.0.0.1:{engine.port}"], ctx
        finish_engine(engine)


def test_unknown_number_is_404(tmp_path):
    with EngineProcess() as engine:
        r = run_peer("notfound", engine, tmp_path)
        assert r["states"] == ["CALLING", "DISCONNECTED"], r["_context"]
        assert r["last_status"] == 404, r["_context"]
        assert r["addresses"] == ["127.0.0.1"], r["_context"]
        finish_engine(engine)


def test_call_over_tcp(tmp_path):
    with EngineProcess() as engine:
        r = run_peer("tcp", engine, tmp_path)
        ctx = r["_context"]
        assert "CONFIRMED" in r["states"] and r["states"][-1] == "DISCONNECTED", ctx
        assert "c=IN IP4 127.0.0.1" in r["answer_sdp"], r["answer_sdp"]
        # The engine's Contact keeps the dialog on TCP (RFC 3261 12.1.2),
        # so ACK and BYE go over TCP too, on the same port.
        assert "transport=tcp" in r["contact"].lower(), r["contact"]
        assert r["sent_over"] == [f"TCP 127.0.0.1:{engine.port}"], ctx
        assert r["bye_responses"] == [200], ctx
        assert r["last_status"] == 200, ctx
        assert r["addresses"] == ["127.0.0.1"], ctx
        finish_engine(engine)
