"""The session journal: every session and its history of control in SQLite.

The engine never waits for it: snapshots go onto a queue and a writer thread
commits them in batches (WAL mode, so `baton sessions` can read while the
engine writes). It serves operators; billing reads the ring, not this.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading

log = logging.getLogger("baton.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    number TEXT,
    from_uri TEXT,
    to_uri TEXT,
    direction TEXT,
    app TEXT,
    module TEXT,
    level TEXT,
    started_wall_ns INTEGER,
    ended_wall_ns INTEGER,
    end_reason TEXT,
    history TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_started ON sessions (started_wall_ns);
"""

BATCH_SECONDS = 0.1


class SessionStore:
    def __init__(self, path: str, stamps=()):
        """`stamps`: the ring records still retained from earlier runs (decoded
        maps, in seq order); the journal is repaired from them (`repair`)."""
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self.written = 0
        self.pending: dict = {}        # session id -> session, until the next flush
        try:
            import asyncio

            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None
        conn = _connect(path)
        conn.executescript(SCHEMA)
        try:
            self.repaired = repair(conn, stamps)
        finally:
            conn.close()
        self.thread = threading.Thread(target=self._run, name="baton-session-store", daemon=True)
        self.thread.start()

    def record(self, session) -> None:
        """Queue a snapshot of `session` (called at start, each transition, end).

        Sessions gather on the loop and go to the writer thread once per
        BATCH_SECONDS: waking a thread per snapshot would cost the loop more
        than the snapshot itself. The snapshot is taken when the batch is
        handed over, once per session however often it was recorded in the
        batch (only its latest state would be written anyway)."""
        pending = self.pending
        if not pending:
            loop = self.loop
            if loop is not None:
                loop.call_later(BATCH_SECONDS, self.flush)
        pending[session.id] = session
        if self.loop is None:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            sessions, self.pending = self.pending, {}
            self.queue.put([_snapshot(s) for s in sessions.values()])

    def close(self, timeout: float = 5.0) -> None:
        self.flush()
        self._stop.set()
        self.queue.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        conn = _connect(self.path)
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    if self.queue.empty():
                        return
                    continue
                try:
                    self._write(conn, item)
                except Exception:       # never let one batch stop the journal
                    log.exception("session journal: a batch of %d could not be written",
                                  len(item))
        finally:
            conn.close()

    def _write(self, conn, batch) -> None:
        # A session seen several times in one batch is written once, in its latest state.
        latest = {}
        for item in batch:
            latest[item[0]] = item
        rows = []
        dumps = json.dumps
        for item in latest.values():
            *fields, history = item
            fields.append(dumps([dict(zip(_SPAN_KEYS, h)) for h in history]))
            rows.append(fields)
        try:
            with conn:
                conn.executemany(
                    "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE "
                    "SET module=excluded.module, level=excluded.level, "
                    "ended_wall_ns=excluded.ended_wall_ns, end_reason=excluded.end_reason, "
                    "history=excluded.history", rows)
            self.written += len(rows)
        except sqlite3.Error:
            log.exception("session journal write failed (%d rows)", len(rows))


_SPAN_KEYS = ("module", "level", "node", "reason", "start_mono_ns", "end_mono_ns",
              "start_wall_ns", "end_wall_ns", "end_reason")


def _snapshot(session) -> tuple:
    """The row of `session` as it is now, its history as tuples (JSON is made by the writer)."""
    return (
        session.id, session.account, session.number, session.from_uri, session.to_uri,
        session.direction, session.app.name if session.app is not None else None,
        session.module.code if session.module is not None else None, session.level,
        session.started_wall, session.ended_wall, session.end_reason,
        [(s.module, s.level, s.node, s.reason, s.start_mono, s.end_mono, s.start_wall,
          s.end_wall, s.end_reason) for s in session.history])


# -- repair after a crash ---------------------------------------------------------------
ENGINE_STOPPED = "engine-stopped"


def repair(conn: sqlite3.Connection, stamps) -> int:
    """Finish the journal of an engine that stopped without ending its sessions.

    The journal is written in batches, so a `kill -9` loses its last moments;
    the ring (which billing reads) does not. From the ring's retained stamps
    (`stamps`: decoded records of type "session" and "transition", in seq
    order), every session they name gets its row, its history of control and
    its end: the end stamp's reason and time when the engine stamped one,
    else `engine-stopped` at the session's last stamp. Rows still live that
    no stamp names end `engine-stopped` at their last known moment (the
    start of their last span). Returns the number of rows written; running it
    again changes nothing."""
    found: dict[str, dict] = {}
    for rec in stamps:
        typ = rec.get("type")
        if typ != "session" and typ != "transition":
            continue
        sid = rec.get("session")
        if not sid:
            continue
        st = found.get(sid)
        if st is None:
            st = found[sid] = {"account": rec.get("account", ""), "start": None, "end": None,
                               "spans": [], "last": None}
        mono, wall = rec.get("mono_ns", 0), rec.get("wall_ns", 0)
        st["last"] = (mono, wall)
        if typ == "transition":
            st["spans"].append({"module": rec.get("to", ""), "level": rec.get("level", ""),
                                "node": "", "reason": rec.get("reason", ""),
                                "start_mono_ns": mono, "end_mono_ns": None,
                                "start_wall_ns": wall, "end_wall_ns": None,
                                "end_reason": None})
        elif rec.get("kind") == "start":
            st["start"] = (mono, wall)
        else:
            st["end"] = (mono, wall, rec.get("reason") or "hangup")
    rows = []
    with conn:
        for sid, st in found.items():
            row = conn.execute("SELECT ended_wall_ns, history FROM sessions WHERE id = ?",
                               (sid,)).fetchone()
            if row is not None and row[0] is not None:
                continue                # its end reached the journal: nothing was lost
            history = json.loads(row[1]) if row is not None else []
            # The journal's spans know their app node; the ring's, anything newer.
            latest = history[-1]["start_mono_ns"] if history else None
            if st["start"] is not None or latest is None:
                by_start = {(h["module"], h["start_mono_ns"]): h for h in history}
                history = [by_start.get((sp["module"], sp["start_mono_ns"]), sp)
                           for sp in st["spans"]] or history
            else:
                history += [sp for sp in st["spans"] if sp["start_mono_ns"] > latest]
            if st["end"] is not None:
                end_mono, end_wall, reason = st["end"]
            else:
                (end_mono, end_wall), reason = st["last"], ENGINE_STOPPED
            _close_history(history, end_mono, end_wall, reason)
            module = history[-1]["module"] if history else None
            level = history[-1]["level"] if history else None
            if row is None:
                started = st["start"][1] if st["start"] is not None else (
                    history[0]["start_wall_ns"] if history else end_wall)
                conn.execute("INSERT INTO sessions (id, account, started_wall_ns, module, level,"
                             " ended_wall_ns, end_reason, history) VALUES (?,?,?,?,?,?,?,?)",
                             (sid, st["account"], started, module, level, end_wall, reason,
                              json.dumps(history)))
            else:
                conn.execute("UPDATE sessions SET module = ?, level = ?, ended_wall_ns = ?, "
                             "end_reason = ?, history = ? WHERE id = ?",
                             (module, level, end_wall, reason, json.dumps(history), sid))
            rows.append(sid)
        # Live rows the ring no longer covers: ended at the last moment the journal saw.
        for sid, started, raw in conn.execute(
                "SELECT id, started_wall_ns, history FROM sessions WHERE ended_wall_ns IS NULL"
                ).fetchall():
            history = json.loads(raw)
            mono, wall = ((history[-1]["start_mono_ns"], history[-1]["start_wall_ns"])
                          if history else (None, started))
            _close_history(history, mono, wall, ENGINE_STOPPED)
            conn.execute("UPDATE sessions SET ended_wall_ns = ?, end_reason = ?, history = ? "
                         "WHERE id = ?", (wall, ENGINE_STOPPED, json.dumps(history), sid))
            rows.append(sid)
    if rows:
        log.info("session journal repaired from the ring: %d sessions the engine did not end",
                 len(rows))
    return len(rows)


def _close_history(history: list, mono, wall, reason: str) -> None:
    """Chain the spans (each ends where the next begins, with the next's reason)
    and end the last one at (mono, wall) with `reason`."""
    for h, nxt in zip(history, history[1:]):
        if h["end_mono_ns"] is None:
            h["end_mono_ns"], h["end_wall_ns"] = nxt["start_mono_ns"], nxt["start_wall_ns"]
            h["end_reason"] = nxt["reason"]
    if history and history[-1]["end_mono_ns"] is None:
        last = history[-1]
        last["end_mono_ns"] = max(mono, last["start_mono_ns"]) if mono is not None \
            else last["start_mono_ns"]
        last["end_wall_ns"] = max(wall, last["start_wall_ns"])
        last["end_reason"] = reason


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


# -- reading (the CLI) ----------------------------------------------------------------
def open_readonly(data_dir: str) -> sqlite3.Connection:
    path = os.path.join(data_dir, "sessions.db")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no session journal in {data_dir} (has the engine run there?)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


def list_sessions(data_dir: str, live: bool | None = None, limit: int = 50,
                  account: str | None = None) -> list[dict]:
    conn = open_readonly(data_dir)
    where, args = [], []
    if live is True:
        where.append("ended_wall_ns IS NULL")
    elif live is False:
        where.append("ended_wall_ns IS NOT NULL")
    if account:
        where.append("account = ?")
        args.append(account)
    sql = "SELECT * FROM sessions"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY started_wall_ns DESC LIMIT ?"
    args.append(limit)
    try:
        return [_row(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def get_session(data_dir: str, session_id: str) -> dict | None:
    conn = open_readonly(data_dir)
    try:
        r = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return _row(r) if r is not None else None
    finally:
        conn.close()


def _row(r) -> dict:
    d = dict(r)
    d["history"] = json.loads(d["history"])
    d["live"] = d["ended_wall_ns"] is None
    return d
