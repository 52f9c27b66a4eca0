"""Interoperability with SIPp over loopback.

SIPp's built-in `uac` scenario as load (UDP, TCP with one connection for
all calls and with one connection per call), and our own scenarios in
`tests/sipp/` for hold/resume, an unknown number, OPTIONS, an unknown method
and a retransmitted INVITE. SIPp exits 0 only when every call succeeded;
the statistics file is checked too, and failures show SIPp's error log,
its final screen and the engine's output.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess

import pytest

from tests.helpers import ROOT, EngineProcess, free_port

SIPP = shutil.which("sipp")
SCENARIOS = os.path.join(ROOT, "tests", "sipp")

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(SIPP is None, reason="sipp is not installed"),
]


def finish_engine(engine: EngineProcess) -> None:
    """The engine survived the peer: it answers OPTIONS, stops cleanly on
    SIGTERM and logged no traceback."""
    answered = any(engine._options_answered() for _ in range(5))
    code = engine.stop()
    out = engine.output()
    assert answered, f"engine stopped answering OPTIONS:\n{out}"
    assert code == 0, f"engine exited with {code} on SIGTERM:\n{out}"
    assert "Traceback" not in out, out


def _read(path) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return "(none)"


def run_sipp(engine: EngineProcess, tmp_path, *args, scenario: str | None = None,
             calls: int = 1, transport: str = "u1", timeout: float = 60.0) -> dict:
    """Run SIPp in the foreground against the engine; fail with its logs
    unless every one of `calls` calls succeeded. Returns the final
    cumulative statistics, and under "messages" SIPp's message trace."""
    name = scenario or "uac"
    work = tmp_path / f"sipp-{name}-{transport}-{len(list(tmp_path.iterdir()))}"
    work.mkdir()
    err, stat, screen, msgs = (work / "errors.log", work / "stat.csv", work / "screen.log",
                               work / "messages.log")
    cmd = [SIPP, f"127.0.0.1:{engine.port}",
           *(("-sf", os.path.join(SCENARIOS, scenario)) if scenario else ("-sn", "uac")),
           "-i", "127.0.0.1", "-p", str(free_port()),
           "-mi", "127.0.0.1", "-mp", str(free_port(even=True)),
           "-t", transport, "-m", str(calls),
           "-timeout", "20s", "-timeout_error",
           # SIPp refuses to start when its socket budget exceeds the fd limit.
           "-max_socket", "200",
           "-trace_err", "-error_file", str(err),
           "-trace_stat", "-stf", str(stat), "-fd", "1",
           "-trace_screen", "-screen_file", str(screen),
           "-trace_msg", "-message_file", str(msgs),
           "-nostdin", *args]
    try:
        proc = subprocess.run(cmd, cwd=work, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sipp hung: {' '.join(cmd)}\nerrors:\n{_read(err)}\n"
                    f"engine:\n{engine.output()[-4000:]}")
    stats = _final_stats(stat)
    report = (f"{' '.join(cmd)}\nexit {proc.returncode}\n"
              f"errors:\n{_read(err)[-6000:]}\nscreen:\n{_read(screen)[-4000:]}\n"
              f"stderr:\n{proc.stderr.decode(errors='replace')[-2000:]}\n"
              f"messages (tail):\n{_read(msgs)[-6000:]}\n"
              f"engine:\n{engine.output()[-4000:]}")
    assert proc.returncode == 0, report
    assert stats.get("FailedCall(C)") == "0", report
    assert stats.get("SuccessfulCall(C)") == str(calls), report
    stats["messages"] = _read(msgs)
    stats["report"] = report
    return stats


def _final_stats(path) -> dict:
    """The last row of SIPp's `-trace_stat` CSV (';'-separated)."""
    try:
        with open(path, newline="", errors="replace") as f:
            rows = list(csv.reader(f, delimiter=";"))
    except OSError:
        return {}
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1]))


# -- the built-in uac scenario: INVITE, 200, ACK, pause -d, BYE, 200 -----------
def test_uac_udp_load(tmp_path):
    with EngineProcess() as engine:
        run_sipp(engine, tmp_path, "-s", "1000", "-r", "25", "-d", "0", calls=50)
        finish_engine(engine)


def test_uac_udp_calls_held_two_seconds(tmp_path):
    with EngineProcess() as engine:
        run_sipp(engine, tmp_path, "-s", "1000", "-r", "25", "-d", "2000", calls=50)
        finish_engine(engine)


@pytest.mark.parametrize("transport", [
    # All calls over one connection: the engine must answer each request on
    # the connection it came in on and keep it open between calls.
    "t1",
    # A new connection per call.
    "tn",
])
def test_uac_tcp_load(tmp_path, transport):
    with EngineProcess() as engine:
        run_sipp(engine, tmp_path, "-s", "1000", "-r", "25", "-d", "0", calls=50,
                 transport=transport)
        finish_engine(engine)


# -- our scenarios ----------------------------------------------------------------
@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_hold_and_resume(tmp_path, transport):
    with EngineProcess() as engine:
        run_sipp(engine, tmp_path, "-s", "1000", scenario="hold.xml", calls=3,
                 transport=transport)
        finish_engine(engine)


def test_unknown_number_404(tmp_path):
    with EngineProcess() as engine:
        # -nr keeps SIPp from answering a retransmitted 404 by itself, so the
        # trace shows whether the engine kept retransmitting after the ACK
        # (it must stop: RFC 3261 17.2.1, Timer G ends in Confirmed).
        r = run_sipp(engine, tmp_path, "-nr", scenario="notfound.xml", calls=3)
        assert r["messages"].count("SIP/2.0 404 ") == 3, r["report"]
        finish_engine(engine)


@pytest.mark.parametrize("transport", ["u1", "t1"])
def test_options(tmp_path, transport):
    with EngineProcess() as engine:
        run_sipp(engine, tmp_path, scenario="options.xml", calls=3, transport=transport)
        finish_engine(engine)


def test_unknown_method_501(tmp_path):
    with EngineProcess() as engine:
        run_sipp(engine, tmp_path, scenario="unknown_method.xml", calls=3)
        finish_engine(engine)


def test_invite_retransmission_is_one_call(tmp_path):
    with EngineProcess() as engine:
        # -nr: see tests/sipp/retrans.xml.
        run_sipp(engine, tmp_path, "-s", "1000", "-nr", scenario="retrans.xml", calls=3)
        finish_engine(engine)
