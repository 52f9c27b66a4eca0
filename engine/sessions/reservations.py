"""Prepaid funds that span the nodes of a cluster: reservations in PostgreSQL
(`[cluster] reservations`, docs/cluster.md "Limits across nodes").

Each node's policy check (engine/sessions/policy.py) grants a prepaid session a time
limit; in a cluster the cost of that grant is first reserved in the shared PostgreSQL
database, in whole slices (`[cluster] slice`), under a row lock on the account, so two
nodes asking at once are served one after the other. What an account may still reserve:

    prepaid balance + credit limit
      - every charge posted to the shared ledger for the account (all nodes' accountants)
      - every other reservation still outstanding

A session's reservation stays outstanding while the session is live and, once it has
ended, until its node's accountant has posted past its end stamp (the ledger's
`positions` row of that node reaches the reservation's `end_seq`): from then on the
ledger's charges count what it cost, and the reservation no longer does. So the same
money is never free twice. Reservations of a node that died expire after
`[cluster] reservation_ttl` seconds without being refreshed; if its calls are posted only
after that (the node came back later), their cost was not held meanwhile. Each live
session's reservation is its grant's cost rounded up to a slice, hence the bound in
docs/cluster.md.

PostgreSQL unreachable: a prepaid grant is denied (never unlimited by accident); calls of
accounts without a prepaid balance do not ask.
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("baton.reservations")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS prepaid_locks (account TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS reservations (
    account TEXT NOT NULL,
    session TEXT NOT NULL,
    node TEXT NOT NULL,
    amount BIGINT NOT NULL,
    end_seq BIGINT,
    expires_ns BIGINT NOT NULL,
    PRIMARY KEY (account, session)
);
CREATE INDEX IF NOT EXISTS reservations_node ON reservations (node);
"""


class ReservationError(Exception):
    """PostgreSQL could not be asked: the grant is denied."""


class Reservations:
    """One node's client of the cluster's reservations table."""

    def __init__(self, url: str, node: str, slice_micro: int, ttl: float = 60.0,
                 timeout: float = 1.0):
        from engine.accounting.ledger_pg import _pg_conninfo

        self.conninfo, self.schema = _pg_conninfo(url)
        self.node = node
        self.slice = max(1, slice_micro)
        self.ttl_ns = int(ttl * 1e9)
        self.timeout = timeout
        self.lock = threading.Lock()
        self.conn = None
        self.held: dict[str, int] = {}     # this node's live sessions -> micro-units reserved
        self.asked = 0                     # reservations taken (for the bench)

    # -- the connection ----------------------------------------------------------------
    def _connect(self):
        import psycopg

        from engine.accounting.ledger_pg import _PG_LOCK

        if self.conn is not None and not self.conn.closed:
            return self.conn
        conn = None
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True,
                                   connect_timeout=max(1, int(self.timeout)),
                                   options=f"-c statement_timeout={int(self.timeout * 1000)}")
            with conn.transaction():
                # Nodes starting together would race on CREATE ... IF NOT EXISTS (a
                # unique violation in the catalog): one creates, the others (and the
                # accountants' ledger, which takes the same lock) wait.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
                if self.schema:
                    conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                    conn.execute(f'SET search_path TO "{self.schema}"')
                conn.execute(_SCHEMA)
        except psycopg.Error as exc:
            if conn is not None:
                conn.close()
            raise ReservationError(str(exc)) from exc
        self.conn = conn
        return conn

    def close(self) -> None:
        with self.lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

    # -- the grant ---------------------------------------------------------------------
    def reserve(self, account: str, session: str, funds_micro: int, grant) -> int | None:
        """Reserve the cost of a grant to `session` of `account` (funds: its prepaid
        balance and credit). `grant(free)` is called with the funds free in the cluster
        (the row lock held) and returns the cost to reserve (0: nothing granted). The
        reserved amount (the cost rounded up to a slice, at most what is free), or None
        when nothing could be reserved."""
        import psycopg

        with self.lock:
            try:
                conn = self._connect()
                with conn.transaction():
                    conn.execute("INSERT INTO prepaid_locks (account) VALUES (%s) "
                                 "ON CONFLICT DO NOTHING", (account,))
                    conn.execute("SELECT account FROM prepaid_locks WHERE account = %s "
                                 "FOR UPDATE", (account,))
                    now = time.time_ns()
                    if self._ledger(conn):
                        posted = conn.execute(
                            "SELECT COALESCE(SUM(s.amount), 0) FROM summary s "
                            "JOIN classes c ON c.id = s.class_id WHERE c.account = %s",
                            (account,)).fetchone()[0]
                        held = conn.execute(
                            "SELECT COALESCE(SUM(r.amount), 0) FROM reservations r "
                            "LEFT JOIN positions p ON p.node = r.node "
                            "WHERE r.account = %s AND r.session <> %s AND r.expires_ns > %s "
                            "AND (r.end_seq IS NULL OR p.seq IS NULL OR p.seq < r.end_seq)",
                            (account, session, now)).fetchone()[0]
                    else:                  # no accountant has posted yet
                        posted = 0
                        held = conn.execute(
                            "SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE "
                            "account = %s AND session <> %s AND expires_ns > %s",
                            (account, session, now)).fetchone()[0]
                    free = funds_micro - int(posted) - int(held)
                    cost = grant(max(0, free))
                    if cost <= 0 or free <= 0:
                        conn.execute("DELETE FROM reservations WHERE account = %s AND "
                                     "session = %s", (account, session))
                        self.held.pop(session, None)
                        return None
                    amount = min(free, -(-cost // self.slice) * self.slice)
                    conn.execute(
                        "INSERT INTO reservations (account, session, node, amount, end_seq, "
                        "expires_ns) VALUES (%s, %s, %s, %s, NULL, %s) "
                        "ON CONFLICT (account, session) DO UPDATE SET amount = EXCLUDED.amount, "
                        "node = EXCLUDED.node, end_seq = NULL, expires_ns = EXCLUDED.expires_ns",
                        (account, session, self.node, amount, now + self.ttl_ns))
            except psycopg.Error as exc:
                self._lost()
                raise ReservationError(str(exc)) from exc
            self.held[session] = amount
            self.asked += 1
            return amount

    def ended(self, session: str, end_seq: int | None) -> None:
        """`session` ended with ring record `end_seq`: its reservation lasts until this
        node's accountant has posted past it."""
        if self.held.pop(session, None) is None:
            return
        self._write("UPDATE reservations SET end_seq = %s WHERE session = %s AND node = %s",
                    (end_seq if end_seq is not None else 0, session, self.node))

    def refresh(self, live: list[str]) -> None:
        """Keep the live sessions' reservations from expiring; forget the posted ones."""
        now = time.time_ns()
        ids = [s for s in live if s in self.held]
        if ids:
            self._write("UPDATE reservations SET expires_ns = %s WHERE node = %s AND "
                        "session = ANY(%s)", (now + self.ttl_ns, self.node, ids))
        self._write("DELETE FROM reservations WHERE expires_ns < %s", (now - self.ttl_ns,))
        self._write("DELETE FROM reservations r USING positions p WHERE r.node = %s AND "
                    "p.node = r.node AND r.end_seq IS NOT NULL AND p.seq >= r.end_seq",
                    (self.node,), ledger=True)

    @staticmethod
    def _ledger(conn) -> bool:
        """The shared ledger's tables (engine/accounting/ledger.py) exist: read, never written."""
        return conn.execute("SELECT to_regclass('summary') IS NOT NULL AND "
                            "to_regclass('positions') IS NOT NULL").fetchone()[0]

    def _write(self, sql: str, args: tuple, ledger: bool = False) -> None:
        import psycopg

        with self.lock:
            try:
                conn = self._connect()
                if ledger and not self._ledger(conn):
                    return
                conn.execute(sql, args)
            except (psycopg.Error, ReservationError) as exc:
                self._lost()
                log.warning("reservations: %s (the row expires by itself)", exc)

    def _lost(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None
