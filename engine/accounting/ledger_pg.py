"""The ledger in PostgreSQL through psycopg 3 (an optional `schema=NAME` query
parameter of the URL selects, and creates, a schema); several accountants may
share it, serialised by an advisory lock and fenced (`Ledger.acquire_fence`)."""
from __future__ import annotations

import contextlib
import re
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

from engine.accounting.ledger import (_DDL, _PG_GUARDS, _PG_LOCK, DEFAULT_NODE, SCHEMA_VERSION,
                                      TXN_ROW_COLUMNS, Ledger, LedgerError, _split_sql)


_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _pg_conninfo(url: str) -> tuple[str, str | None]:
    """Split `schema=NAME` out of a postgresql:// URL."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schema = None
    rest = []
    for k, v in query:
        if k == "schema":
            schema = v
        else:
            rest.append((k, v))
    if schema is not None and not _SCHEMA_NAME.match(schema):
        raise LedgerError(f"schema {schema!r} is not a plain SQL identifier")
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest))), schema


class PostgresLedger(Ledger):
    """The ledger in PostgreSQL through psycopg 3; rows are loaded with COPY."""

    _FOR_UPDATE = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError as exc:  # pragma: no cover - psycopg is a dependency
            raise LedgerError("the PostgreSQL ledger needs psycopg 3 (pip install "
                              "'psycopg[binary]')") from exc
        self._psycopg = psycopg
        self.url = url
        conninfo, self.schema = _pg_conninfo(url)
        self._lock = threading.RLock()
        self._classes: dict[tuple, int] = {}
        self._conn = psycopg.connect(conninfo, autocommit=True, row_factory=dict_row)
        with self._tx():
            # Processes starting together (every node's accountant, the nodes'
            # reservations) would race on CREATE ... IF NOT EXISTS: one at a time.
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
            if self.schema:
                self._conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                self._conn.execute(f'SET search_path TO "{self.schema}"')
            for stmt in _split_sql(_DDL.format(entries_suffix="", state_suffix="", blob="BYTEA",
                                               id_type="BIGINT",
                                               create_view="CREATE OR REPLACE VIEW")):
                self._conn.execute(stmt)
            self._conn.execute(_PG_GUARDS)
            self._conn.execute("INSERT INTO meta (name, value) VALUES ('schema_version', %s) "
                               "ON CONFLICT DO NOTHING", (str(SCHEMA_VERSION),))

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        with self._conn.transaction():
            yield

    def _next_id(self) -> int:
        # Writers are serialised so ids are dense and allocated without a sequence.
        self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
        return super()._next_id()

    def _exec(self, sql: str, params: Sequence = ()) -> None:
        self._conn.execute(sql.replace("?", "%s"), params)

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)

    def _query(self, sql: str, params: Sequence = ()) -> list[dict[str, Any]]:
        return list(self._conn.execute(sql.replace("?", "%s"), params).fetchall())

    def _insert_txns(self, first_id: int, rows: list[tuple]) -> None:
        with self._conn.cursor() as cur:
            with cur.copy(f"COPY txns (id, {', '.join(TXN_ROW_COLUMNS)}) FROM STDIN") as cp:
                for i, row in enumerate(rows, first_id):
                    cp.write_row((i,) + row)

    def _is_conflict(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.UniqueViolation)

    def try_lock_writer(self, node: str = DEFAULT_NODE) -> bool:
        """Take the session-level lock that makes this the only accountant of
        `node` writing to the schema; False if another holds it. Accountants of
        other nodes write beside it (their batches serialised per transaction)."""
        row = self._query("SELECT pg_try_advisory_lock(hashtext(current_schema()), "
                          "hashtext(%s)) AS ok", (node,))
        return bool(row[0]["ok"])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None  # type: ignore[assignment]


_PERIOD_USAGE_DDL = """
CREATE TABLE IF NOT EXISTS period_usage (
    account TEXT NOT NULL,
    target TEXT NOT NULL,
    period TEXT NOT NULL,
    used BIGINT NOT NULL,
    PRIMARY KEY (account, target, period)
);
CREATE TABLE IF NOT EXISTS period_claims (
    key TEXT PRIMARY KEY,
    prior BIGINT NOT NULL
);
"""


class PeriodUsage:
    """The period usage counters of a shared ledger (docs/cluster.md "Limits across
    nodes"): what plans with a cap, period tiers or volume tiers count, per account,
    target (module or module:action) and period, summed over every node's accountant.

    A rated line claims its quantity's place on the period's axis (`claim`): the
    counter grows by the quantity under its row lock and the line is priced from the
    usage before it, so the lines of all nodes cover the axis once, in the order they
    were rated, and tiers, volume and caps price the cluster's total. A claim is kept
    under the line's ledger key, so a line rated again (an accountant restarted
    before its batch was committed) gets the same place."""

    def __init__(self, url: str) -> None:
        import psycopg

        self._psycopg = psycopg
        self._conninfo, self._schema = _pg_conninfo(url)
        self._lock = threading.Lock()
        self._conn = None
        self._connect()

    def _connect(self):
        """The connection, (re)opened when PostgreSQL was lost."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = self._psycopg.connect(self._conninfo, autocommit=True)
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
                if self._schema:
                    conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
                    conn.execute(f'SET search_path TO "{self._schema}"')
                for stmt in _split_sql(_PERIOD_USAGE_DDL):
                    conn.execute(stmt)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _lost(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def claim(self, key: str, account: str, target: str, period: str, quantity: int) -> int:
        """The cluster's usage of `target` in `period` before this line (`key`), having
        added its `quantity` to the counter (once per key)."""
        with self._lock:
            try:
                conn = self._connect()
                with conn.transaction():
                    row = conn.execute("SELECT prior FROM period_claims WHERE key = %s",
                                       (key,)).fetchone()
                    if row is not None:
                        return int(row[0])
                    used = conn.execute(
                        "INSERT INTO period_usage (account, target, period, used) "
                        "VALUES (%s, %s, %s, %s) ON CONFLICT (account, target, period) "
                        "DO UPDATE SET used = period_usage.used + EXCLUDED.used RETURNING used",
                        (account, target, period, quantity)).fetchone()[0]
                    prior = int(used) - quantity
                    conn.execute("INSERT INTO period_claims (key, prior) VALUES (%s, %s)",
                                 (key, prior))
                    return prior
            except self._psycopg.Error:
                self._lost()        # the batch fails and is rated again: the claim is kept
                raise

    def used(self, period: str) -> dict[tuple[str, str, str], int]:
        """Every counter of `period`: (account, target, period) -> units used."""
        with self._lock:
            try:
                rows = self._connect().execute(
                    "SELECT account, target, used FROM period_usage WHERE period = %s",
                    (period,)).fetchall()
            except self._psycopg.Error:
                self._lost()
                raise
        return {(a, t, period): int(u) for a, t, u in rows}

    def close(self) -> None:
        with self._lock:
            self._lost()
