"""The texts' record: every text message and its status in SQLite (`DATA/messages.db`).

Like the session journal (journal.py), the engine never waits for it: a text
is marked when it is kept and at each change of its status, and the marked
texts go to a writer thread once per BATCH_SECONDS, each written once in its
latest state. At start the newest texts are read back, so the APIs
(`Messages.Get`/`List`, REST `Messages/{Sid}.json`, `Messages.json`) answer
for texts of earlier runs; an outbound text an earlier run left `queued` or
`sending` never got a final status: it is made `failed` (STOPPED) first.
"""
from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading

log = logging.getLogger("baton.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    sid TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    account TEXT NOT NULL,
    direction TEXT NOT NULL,
    from_addr TEXT NOT NULL,
    to_addr TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    sip_code INTEGER NOT NULL,
    module TEXT NOT NULL,
    error TEXT NOT NULL,
    segments INTEGER NOT NULL,
    encoding TEXT NOT NULL,
    created_wall_ns INTEGER NOT NULL,
    updated_wall_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_created ON messages (created_wall_ns);
"""

# The table's columns in order, named as TextMessage's fields (from_addr, to_addr: frm, to).
COLUMNS = ("sid", "session", "account", "direction", "frm", "to", "body", "status",
           "sip_code", "module", "error", "segments", "encoding", "created_wall_ns",
           "updated_wall_ns")
BATCH_SECONDS = 0.1
STOPPED = "the engine stopped before the text was sent"


class MessageStore:
    def __init__(self, path: str, loop=None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.loop = loop
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: dict = {}         # sid -> TextMessage, until the next flush
        self.written = 0
        conn = _connect(path)
        try:
            conn.executescript(SCHEMA)
            # Texts an earlier run left on their way never got a final status.
            with conn:
                self.ended = conn.execute(
                    "UPDATE messages SET status = 'failed', error = ? WHERE direction = "
                    "'outbound' AND status IN ('queued', 'sending')", (STOPPED,)).rowcount
        finally:
            conn.close()
        # Reads (a text older than those kept in memory) happen on the loop's thread.
        self._reader = _connect(path)
        self.thread = threading.Thread(target=self._run, name="baton-message-store",
                                       daemon=True)
        self.thread.start()

    def newest(self, limit: int) -> list[dict]:
        """The newest `limit` texts, oldest first."""
        rows = self._reader.execute(
            "SELECT * FROM (SELECT * FROM messages ORDER BY created_wall_ns DESC, rowid DESC "
            "LIMIT ?) ORDER BY created_wall_ns, rowid", (limit,)).fetchall()
        return [dict(zip(COLUMNS, r)) for r in rows]

    def get(self, sid: str) -> dict | None:
        r = self._reader.execute("SELECT * FROM messages WHERE sid = ?", (sid,)).fetchone()
        return dict(zip(COLUMNS, r)) if r is not None else None

    def record(self, m) -> None:
        """Mark text `m` to be written (its state when the batch is handed over)."""
        if not self.pending and self.loop is not None:
            self.loop.call_later(BATCH_SECONDS, self.flush)
        self.pending[m.sid] = m
        if self.loop is None:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            texts, self.pending = self.pending, {}
            self.queue.put([_row(m) for m in texts.values()])

    def close(self, timeout: float = 5.0) -> None:
        self.flush()
        self.queue.put(None)
        self.thread.join(timeout)
        self._reader.close()

    def _run(self) -> None:
        conn = _connect(self.path)
        try:
            while True:
                rows = self.queue.get()
                if rows is None:
                    if self.queue.empty():
                        return
                    continue
                try:
                    with conn:
                        conn.executemany(
                            f"INSERT OR REPLACE INTO messages VALUES "
                            f"({','.join('?' * len(COLUMNS))})", rows)
                    self.written += len(rows)
                except sqlite3.Error:       # never let one batch stop the record
                    log.exception("message store: a batch of %d could not be written",
                                  len(rows))
        finally:
            conn.close()


def _row(m) -> tuple:
    return (m.sid, m.session, m.account, m.direction, m.frm, m.to, m.body, m.status,
            m.sip_code, m.module, m.error, m.segments, m.encoding, m.created_wall_ns,
            m.updated_wall_ns)


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


__all__ = ["MessageStore", "COLUMNS"]
