"""The session journal (engine/sessions/journal.py): batched snapshots, latest state wins."""
from __future__ import annotations

import asyncio
import json
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


# -- repair from the ring after a crash ---------------------------------------------------
def _stamps(w, sid: str, *steps, account: str = "acme") -> None:
    """Stamp a session: ("start", t), ("go", from, to, level, reason, t), ("end", reason, t)."""
    for st in steps:
        if st[0] == "start":
            w.stamp_session("start", sid, account, st[1], 1_000 + st[1])
        elif st[0] == "go":
            w.stamp_transition(sid, account, st[1], st[2], st[3], st[4], st[5], 1_000 + st[5])
        else:
            w.stamp_session("end", sid, account, st[2], 1_000 + st[2], st[1])


def test_the_journal_is_repaired_from_the_stamps_the_ring_retains(tmp_path):
    from ext.kernels import ring
    from engine.sessions.stamper import Stamper

    path = str(tmp_path / "ring" / "ring.dat")
    w = ring.RingWriter(path, node_id="n1")
    # S1 ended and was journaled; S2 was journaled live with its first module only;
    # S3 and S4 never reached the journal (S4 even ended); S5 is older than the ring.
    _stamps(w, "S1", ("start", 10), ("go", "", "baton.hold", "basic", "initial", 11),
            ("end", "hangup", 20))
    _stamps(w, "S2", ("start", 30), ("go", "", "baton.menu", "application", "initial", 31),
            ("go", "baton.menu", "baton.bridge", "basic", "outlet:1", 40))
    _stamps(w, "S3", ("start", 50), ("go", "", "baton.hold", "basic", "initial", 51))
    _stamps(w, "S4", ("start", 60), ("go", "", "baton.echo", "basic", "initial", 61),
            ("end", "hangup", 70))
    # The accountant read and released all of it: the engine reads beside it.
    with ring.RingReader(path) as r:
        r.release(r.read()[-1][0])
    w.close()
    conn = store._connect(str(tmp_path / "sessions.db"))
    conn.executescript(store.SCHEMA)
    hold = {"module": "baton.hold", "level": "basic", "node": "number:1000", "reason": "initial",
            "start_mono_ns": 11, "end_mono_ns": 20, "start_wall_ns": 1011, "end_wall_ns": 1020,
            "end_reason": "hangup"}
    menu = {"module": "baton.menu", "level": "application", "node": "menu", "reason": "initial",
            "start_mono_ns": 31, "end_mono_ns": None, "start_wall_ns": 1031, "end_wall_ns": None,
            "end_reason": None}
    s5 = dict(menu, start_mono_ns=5, start_wall_ns=1005)
    rows = [("S1", 1010, 1020, "hangup", [hold]), ("S2", 1030, None, None, [menu]),
            ("S5", 1004, None, None, [s5])]
    for sid, started, ended, reason, history in rows:
        conn.execute("INSERT INTO sessions (id, account, number, started_wall_ns, ended_wall_ns,"
                     " end_reason, history) VALUES (?,?,?,?,?,?,?)",
                     (sid, "acme", "1000", started, ended, reason, json.dumps(history)))
    conn.commit()
    conn.close()

    stamper = Stamper(path, "n1")       # what the restarted engine does
    try:
        s = store.SessionStore(str(tmp_path / "sessions.db"), stamper.retained())
        s.close()
        assert s.repaired == 4
        with ring.RingReader(path) as r:   # the accountant's position did not move
            assert [rec[0] for rec in r.read()] == [12]   # only the new node-start stamp
    finally:
        stamper.close()
    rows = {r["id"]: r for r in store.list_sessions(str(tmp_path), limit=10)}
    assert set(rows) == {"S1", "S2", "S3", "S4", "S5"}
    assert rows["S1"]["history"] == [hold] and rows["S1"]["end_reason"] == "hangup"
    s2 = rows["S2"]
    assert (s2["end_reason"], s2["ended_wall_ns"]) == (store.ENGINE_STOPPED, 1040)
    assert [(h["module"], h["node"], h["start_mono_ns"], h["end_mono_ns"], h["end_reason"])
            for h in s2["history"]] == [("baton.menu", "menu", 31, 40, "outlet:1"),
                                        ("baton.bridge", "", 40, 40, store.ENGINE_STOPPED)]
    assert s2["module"] == "baton.bridge" and s2["number"] == "1000"
    s3 = rows["S3"]
    assert (s3["account"], s3["started_wall_ns"], s3["ended_wall_ns"], s3["end_reason"]) == \
        ("acme", 1050, 1051, store.ENGINE_STOPPED)
    assert [(h["module"], h["start_wall_ns"], h["end_wall_ns"]) for h in s3["history"]] == \
        [("baton.hold", 1051, 1051)]
    s4 = rows["S4"]
    assert (s4["ended_wall_ns"], s4["end_reason"], s4["module"]) == (1070, "hangup", "baton.echo")
    assert s4["history"][0]["end_reason"] == "hangup"
    s5 = rows["S5"]
    assert (s5["ended_wall_ns"], s5["end_reason"]) == (1005, store.ENGINE_STOPPED)
    # A second start finds nothing left to repair.
    stamper = Stamper(path, "n1")
    try:
        again = store.SessionStore(str(tmp_path / "sessions.db"), stamper.retained())
        again.close()
    finally:
        stamper.close()
    assert again.repaired == 0
