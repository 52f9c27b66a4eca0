"""Interoperability with baresip over loopback: baresip (tests/baresip_ua.py)
dials the engine over UDP and TCP."""
from __future__ import annotations

import re
import time

import pytest

from tests.baresip_ua import Baresip, needs_baresip
from tests.helpers import EngineProcess

pytestmark = [pytest.mark.interop, needs_baresip]

BYE_OK = re.compile(r"SIP/2\.0 200 OK\r?\n(?:[^\r\n]+\r?\n)*?CSeq: *\d+ BYE")


def finish_engine(engine: EngineProcess) -> None:
    """The engine survived the peer: it answers OPTIONS, stops cleanly on
    SIGTERM and logged no traceback."""
    answered = any(engine._options_answered() for _ in range(5))
    code = engine.stop()
    out = engine.output()
    assert answered, f"engine stopped answering OPTIONS:\n{out}"
    assert code == 0, f"engine exited with {code} on SIGTERM:\n{out}"
    assert "Traceback" not in out, out


def _addresses(text: str) -> set[str]:
    return set(re.findall(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])", text))


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_call_established_and_hung_up(tmp_path, transport):
    with EngineProcess() as engine, Baresip(tmp_path) as ua:
        uri = f"sip:1000@127.0.0.1:{engine.port}"
        if transport == "tcp":
            uri += ";transport=tcp"
        mark = len(ua.output())
        ua.command(f"/dial {uri}")
        ua.wait_for(r"Call established: " + re.escape(uri), 10, mark)
        out = ua.output()[mark:]
        # The answer: G.711 on loopback.
        answer = re.search(r"SIP/2\.0 200 OK\r?\n.*?CSeq: *\d+ INVITE.*?\r?\n\r?\n"
                           r"(.*?m=audio[^\r\n]*)", out, re.S)
        assert answer, out
        assert "c=IN IP4 127.0.0.1" in answer.group(1), answer.group(1)
        assert re.search(r"m=audio \d+ RTP/AVP (0|8)\b", answer.group(1)), answer.group(1)
        time.sleep(1.0)  # RTP both ways for a moment

        mark = len(ua.output())
        ua.command("/hangup")
        ua.wait_for(r"Call with " + re.escape(uri) + r" terminated", 10, mark)
        # The engine answered the BYE (it saw it and ended the call).
        ua.wait_for(BYE_OK, 10, mark)
        assert ua.quit() == 0, ua.output()[-4000:]

        trace = ua.output()
        assert _addresses(trace) == {"127.0.0.1"}, sorted(_addresses(trace))
        assert f"SIP/2.0/{transport.upper()} 127.0.0.1:{ua.port}" in trace, trace[-4000:]
        finish_engine(engine)


def test_unknown_number_is_404(tmp_path):
    with EngineProcess() as engine, Baresip(tmp_path) as ua:
        uri = f"sip:9999@127.0.0.1:{engine.port}"
        mark = len(ua.output())
        ua.command(f"/dial {uri}")
        ua.wait_for(re.escape(uri) + r": session closed: 404 Not Found", 10, mark)
        assert "Call established" not in ua.output()[mark:]
        assert ua.quit() == 0, ua.output()[-4000:]
        finish_engine(engine)
