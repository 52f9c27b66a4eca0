"""The session journal (engine/sessions/journal.py): batched snapshots, latest state wins."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from engine.sessions import journal as store
from engine.sessions.session import ControlSpan


def _session(sid: str) -> SimpleNamespace:
    return SimpleNamespace(id=sid, account="acme", number="1000", from_uri="<sip:a@x>",
                           to_uri="<sip:1000@x>", direction="inbound", app=None, module=None,
                           level=None, started_wall=1, ended_wall=None, end_reason=None,
                           history=[])


async def test_a_session_recorded_twice_in_a_batch_is_written_in_its_latest_state(tmp_path):
    s = store.SessionStore(str(tmp_path / "sessions.db"))
    live, done = _session("S1"), _session("S2")
    span = ControlSpan("baton.hold", "basic", "initial", "number:1000")
    for sess in (live, done):
        sess.module = SimpleNamespace(code="baton.hold")
        sess.level = "basic"
        sess.history.append(span)
        s.record(sess)
    span.close("hangup", span.start_mono + 5, span.start_wall + 5)
    done.ended_wall, done.end_reason = 9, "hangup"
    s.record(done)
    assert len(s.pending) == 2
    await asyncio.sleep(store.BATCH_SECONDS * 3)
    s.close()
    rows = {r["id"]: r for r in store.list_sessions(str(tmp_path))}
    assert rows["S2"]["end_reason"] == "hangup" and not rows["S2"]["live"]
    assert rows["S2"]["history"] == [span.as_dict()]
    assert rows["S1"]["module"] == "baton.hold"
    assert store.get_session(str(tmp_path), "S1")["account"] == "acme"


def test_without_a_loop_every_record_is_handed_over_at_once(tmp_path):
    s = store.SessionStore(str(tmp_path / "sessions.db"))
    s.record(_session("S3"))
    assert not s.pending
    s.close()
    assert store.get_session(str(tmp_path), "S3")["history"] == []
