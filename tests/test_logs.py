"""Structured logs: one JSON object per line with ts, level, logger, msg and the session
id on every line about a session (from `extra`, the message, or the context)."""
from __future__ import annotations

import io
import json
import logging
import time

import pytest

from engine.common import logs
from engine.config.load import ConfigError, from_dict
from tests.helpers import BlockingPeer, EngineProcess

SID = "S0a1b2c00000001"


def capture(fmt: str = "json"):
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(logs.SessionFilter())
    handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logs.TextFormatter())
    log = logging.getLogger(f"baton.test.{fmt}.{time.monotonic_ns()}")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    return log, out


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_the_session():
    log, out = capture()
    log.info("session %s: policy denied %s", SID, "acme.survey",
             extra={"event": "policy.denied", "module_code": "acme.survey"})
    log.warning("no session here")
    log.info("about", extra={"session": SID})
    log.info(f"session {SID} named in the text")
    with logs.session_context(SID):
        log.info("inside a module's take")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("session %s: module failed", SID)
    rows = lines(out)
    assert len(rows) == 6 == len(out.getvalue().splitlines())
    for r in rows:
        assert set(r) >= {"ts", "level", "logger", "msg", "session"}
        assert r["ts"].endswith("Z") and "T" in r["ts"]
    assert rows[0]["session"] == SID and rows[0]["level"] == "info"
    assert rows[0]["msg"] == f"session {SID}: policy denied acme.survey"
    assert (rows[0]["event"], rows[0]["module_code"]) == ("policy.denied", "acme.survey")
    assert rows[1]["session"] is None and rows[1]["level"] == "warning"
    assert [r["session"] for r in rows[2:]] == [SID] * 4
    assert "ValueError: boom" in rows[5]["exc"] and rows[5]["level"] == "error"


def test_an_ended_session_in_the_context_no_longer_counts():
    class Session:
        id = SID
        ended = False

    log, out = capture()
    s = Session()
    with logs.session_context(s):
        log.info("while live")
        s.ended = True
        log.info("after the end")
    assert [r["session"] for r in lines(out)] == [SID, None]


def test_text_format_adds_the_session_when_not_named():
    log, out = capture("text")
    log.info("about", extra={"session": SID})
    log.info("session %s: named", SID)
    first, second = out.getvalue().splitlines()
    assert first.endswith(f"about [session={SID}]")
    assert second.endswith(f"session {SID}: named")


def test_config_and_setup_reject_unknown_formats():
    assert from_dict({"engine": {"log_format": "json"}}).log_format == "json"
    with pytest.raises(ConfigError) as err:
        from_dict({"engine": {"log_format": "xml"}})
    assert err.value.key == "engine.log_format"
    with pytest.raises(ValueError):
        logs.setup("info", "xml")


def test_engine_json_log_names_the_session_of_a_call():
    pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")
    engine = EngineProcess(extra=["--log-format", "json", "--log-level", "debug"])
    with engine:
        peer = BlockingPeer(engine)
        call = peer.answered_call("1000")
        peer.hang_up(call)
        peer.close()
        assert engine.stop() == 0
    rows = []
    for line in engine.output().splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))        # every log line is one JSON object
    assert rows, engine.output()
    started = [r for r in rows if r.get("event") == "session.started"]
    assert len(started) == 1, rows
    sid = started[0]["session"]
    assert started[0]["number"] == "1000" and started[0]["module_code"] == "baton.hold"
    ended = [r for r in rows if r.get("event") == "session.ended"]
    assert len(ended) == 1 and ended[0]["session"] == sid and ended[0]["reason"] == "hangup"
    assert isinstance(ended[0]["duration_ms"], int)
    # Every line that names the session carries it in the `session` field.
    about = [r for r in rows if sid in r["msg"]]
    assert about and all(r["session"] == sid for r in about)
    assert any(r["logger"] == "baton.engine" and r["session"] is None for r in rows)
