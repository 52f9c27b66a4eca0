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

Plan caps (`cap` with `at_cap = "deny"`, per account, module and period) are held the
same way, in base units (billed seconds) instead of money (`reserve_units`, table
`cap_reservations`): what a session may still use of a capped module is

    cap - the period's usage of the module posted to the shared ledger (all nodes)
        - every outstanding cap reservation (this session's earlier grants included)

and a grant takes at most `[cluster] cap_slice` seconds of it; a live session asks for the
next slice when it has used the last one (engine/sessions/policy.py `Snapshot.renew`).

PostgreSQL unreachable: a prepaid or capped grant is denied (never unlimited by accident); calls of
accounts without a prepaid balance do not ask.

Every statement runs on one worker thread the Reservations own (`run`), never on the
engine's event loop: a slow or unreachable PostgreSQL delays the grants that wait for it,
not the node's other calls, SIP and media. One thread and one connection, so the jobs run
in the order they were submitted (a session's `ended` after its grant). A grant that waited
in the queue longer than the timeout is refused without asking (`run(..., grant=True)`), so
a PostgreSQL that stopped answering cannot pile up a backlog of calls.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
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
CREATE TABLE IF NOT EXISTS cap_reservations (
    account TEXT NOT NULL,
    target TEXT NOT NULL,
    period TEXT NOT NULL,
    session TEXT NOT NULL,
    node TEXT NOT NULL,
    units BIGINT NOT NULL,
    end_seq BIGINT,
    expires_ns BIGINT NOT NULL,
    PRIMARY KEY (account, target, period, session)
);
CREATE INDEX IF NOT EXISTS cap_reservations_node ON cap_reservations (node);
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
        # (session, account, target, period) of this node's live sessions -> cap units held
        self.units: dict[tuple[str, str, str, str], int] = {}
        self.capped: set[str] = set()      # sessions with cap units reserved
        self.asked = 0                     # reservations taken (for the bench)
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None

    # -- off the event loop ------------------------------------------------------------
    def run(self, fn, *args, grant: bool = False) -> asyncio.Future:
        """`fn(*args)` (a method of this object, or a function calling them) on the
        reservations' worker thread: an asyncio future of its result, for the running
        loop. `grant`: a grant, refused with ReservationError when it waited longer than
        the timeout for the thread (writes that end or refresh a reservation always run)."""
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="baton-reservations")
        if grant:
            args = (time.monotonic() + self.timeout, fn, *args)
            fn = self._before
        return asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _before(self, deadline: float, fn, *args):
        if time.monotonic() > deadline:
            raise ReservationError("PostgreSQL busy: the grant waited past the timeout")
        return fn(*args)

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
        """Finish the queued jobs (the ended sessions' writes), then disconnect. Blocks:
        call it off the loop."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
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

    def reserve_units(self, account: str, target: str, period: str, session: str,
                      cap: int, want: int, item: str = "time") -> int:
        """Reserve up to `want` more units of `account`'s capped `target` (a module) in
        `period` for `session`. Returns the units the session now holds in all (its
        earlier grants of the period included); the same as before when nothing was free."""
        import psycopg

        with self.lock:
            try:
                conn = self._connect()
                with conn.transaction():
                    lock = f"cap\x1f{account}\x1f{target}\x1f{period}"
                    conn.execute("INSERT INTO prepaid_locks (account) VALUES (%s) "
                                 "ON CONFLICT DO NOTHING", (lock,))
                    conn.execute("SELECT account FROM prepaid_locks WHERE account = %s "
                                 "FOR UPDATE", (lock,))
                    now = time.time_ns()
                    mine = conn.execute(
                        "SELECT units FROM cap_reservations WHERE account = %s AND target = %s "
                        "AND period = %s AND session = %s",
                        (account, target, period, session)).fetchone()
                    mine = int(mine[0]) if mine else 0
                    if self._ledger(conn):
                        used = conn.execute(
                            "SELECT COALESCE(SUM(s.quantity), 0) FROM summary s "
                            "JOIN classes c ON c.id = s.class_id WHERE c.account = %s AND "
                            "c.period = %s AND c.module = %s AND c.item = %s",
                            (account, period, target, item)).fetchone()[0]
                        held = conn.execute(
                            "SELECT COALESCE(SUM(r.units), 0) FROM cap_reservations r "
                            "LEFT JOIN positions p ON p.node = r.node "
                            "WHERE r.account = %s AND r.target = %s AND r.period = %s "
                            "AND r.session <> %s AND r.expires_ns > %s "
                            "AND (r.end_seq IS NULL OR p.seq IS NULL OR p.seq < r.end_seq)",
                            (account, target, period, session, now)).fetchone()[0]
                    else:                  # no accountant has posted yet
                        used = 0
                        held = conn.execute(
                            "SELECT COALESCE(SUM(units), 0) FROM cap_reservations WHERE "
                            "account = %s AND target = %s AND period = %s AND session <> %s "
                            "AND expires_ns > %s",
                            (account, target, period, session, now)).fetchone()[0]
                    # The session's own grants count whole: the part of them already
                    # posted is counted twice (a re-entered module gets less, never more).
                    free = cap - int(used) - int(held) - mine
                    got = mine + max(0, min(want, free))
                    if got > mine:
                        conn.execute(
                            "INSERT INTO cap_reservations (account, target, period, session, "
                            "node, units, end_seq, expires_ns) VALUES (%s, %s, %s, %s, %s, %s, "
                            "NULL, %s) ON CONFLICT (account, target, period, session) DO UPDATE "
                            "SET units = EXCLUDED.units, node = EXCLUDED.node, end_seq = NULL, "
                            "expires_ns = EXCLUDED.expires_ns",
                            (account, target, period, session, self.node, got,
                             now + self.ttl_ns))
            except psycopg.Error as exc:
                self._lost()
                raise ReservationError(str(exc)) from exc
            if got:
                self.units[(session, account, target, period)] = got
                self.capped.add(session)
            self.asked += 1
            return got

    def ended(self, session: str, end_seq: int | None) -> None:
        """`session` ended with ring record `end_seq`: its reservations last until this
        node's accountant has posted past it."""
        seq = end_seq if end_seq is not None else 0
        if self.held.pop(session, None) is not None:
            self._write("UPDATE reservations SET end_seq = %s WHERE session = %s AND node = %s",
                        (seq, session, self.node))
        if session in self.capped:
            self.capped.discard(session)
            for key in [k for k in self.units if k[0] == session]:
                del self.units[key]
            self._write("UPDATE cap_reservations SET end_seq = %s WHERE session = %s AND "
                        "node = %s", (seq, session, self.node))

    def holds(self, session: str) -> bool:
        """`session` holds a reservation of this node (funds or cap units)."""
        return session in self.held or session in self.capped

    def refresh(self, live: list[str]) -> None:
        """Keep the live sessions' reservations from expiring; forget the posted ones."""
        now = time.time_ns()
        for table, mine in (("reservations", self.held), ("cap_reservations", self.capped)):
            ids = [s for s in live if s in mine]
            if ids:
                self._write(f"UPDATE {table} SET expires_ns = %s WHERE node = %s AND "
                            "session = ANY(%s)", (now + self.ttl_ns, self.node, ids))
            self._write(f"DELETE FROM {table} WHERE expires_ns < %s", (now - self.ttl_ns,))
            self._write(f"DELETE FROM {table} r USING positions p WHERE r.node = %s AND "
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
