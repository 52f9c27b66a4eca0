"""The ledger: double-entry, append-only, idempotent, in SQLite or PostgreSQL.

Every rated line is one transaction (`txns` row) with its entries
(`entries` rows): the customer's account is debited the amount, the module's
vendor and the platform are credited their shares, so every transaction's
debits equal its credits. A negative line (a volume discount, a reversal)
mirrors the sides.

The entries are derived in SQL from the transaction rows of each batch, in
the same database transaction, and so is the `summary` table (running sums
per account, period and line class) that invoices and payouts read; the
`batches` table records each commit. Rows of `txns`, `entries` and `batches`
are never updated or deleted (triggers refuse it). A correction is two new
transactions: the exact reversal of the original and the fixed line
(`correct()`).

Each transaction has a unique `key`; a line from the ring has the key
"NODE:SEQ" of the record that produced it, so posting the same records again
posts nothing. The accountant commits ledger rows, its ring read position and
its working state (open sessions, period usage) in ONE database transaction
(`post(lines, position=..., state=...)`), so a crash at any moment leaves the
three consistent.

This module holds what both backends share: the schema, `Line`, and `Ledger`
(posting, corrections, reads, checks). The backends are `SqliteLedger`
(engine/accounting/ledger_sqlite.py: WAL, one file, posted through a writer
process) and `PostgresLedger` (engine/accounting/ledger_pg.py: psycopg 3);
`open_ledger(url)` (engine/accounting/ledgers.py) picks one.
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import msgpack

from engine.common import clock
from engine.accounting.money import split_share

__all__ = ["DEFAULT_NODE", "Line", "Ledger", "LedgerError", "LedgerFenced", "TXN_COLUMNS",
           "ENTRY_COLUMNS"]

TXN_COLUMNS = ("id", "key", "kind", "node", "seq", "session", "account", "module", "item", "level",
               "period", "wall_ns", "usage", "quantity", "unit", "plan", "unit_price", "amount",
               "currency", "vendor", "vendor_amount", "corrects", "note")
ENTRY_COLUMNS = ("txn_id", "leg", "account", "debit", "credit", "currency")
KINDS = ("usage", "action", "fee", "reversal", "correction")
SCHEMA_VERSION = 1
_ROWS_PER_INSERT = 512       # rows per multi-row INSERT (12 columns: 6,144 parameters)
_STATE_LOG_MIN = 64         # state rows of a batch from which they are logged as one row
_STATE_LOG_MAX = 32         # logged batches folded into the state table at once
_PG_LOCK = 0x6261746f6e   # advisory lock id serialising ledger writers ("baton")


class LedgerError(Exception):
    """A ledger operation that cannot be done (bad correction, broken invariant...)."""


class LedgerFenced(LedgerError):
    """A post from a writer whose fencing token is no longer the ledger's: another
    accountant took the ledger over since (see `Ledger.acquire_fence`)."""

class Line(tuple):
    """One rated line, posted as one transaction: an immutable tuple of the
    `txns` columns from `key` to `note` (fields readable by name).

    quantity is in base units (billed seconds, or a count); usage is the raw
    measure (nanoseconds in control, or the action's count); amount and
    vendor_amount are micro-units of `currency`.
    """

    __slots__ = ()
    FIELDS = TXN_COLUMNS[1:]

    def __new__(cls, key: str, kind: str, node: str, seq: int | None, session: str,
                account: str, module: str, item: str, level: str, period: str, wall_ns: int,
                usage: int, quantity: int, unit: str, plan: str, unit_price: int | None,
                amount: int, currency: str, vendor: str, vendor_amount: int,
                corrects: int | None = None, note: str = "") -> Line:
        return tuple.__new__(cls, (key, kind, node, seq, session, account, module, item, level,
                                   period, wall_ns, usage, quantity, unit, plan, unit_price,
                                   amount, currency, vendor, vendor_amount, corrects, note))

    def as_dict(self) -> dict[str, Any]:
        """The line as a dict of its fields."""
        return dict(zip(self.FIELDS, self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Line:
        """A line from a dict of its fields (extra keys such as id are ignored)."""
        return cls(**{k: d[k] for k in cls.FIELDS if k in d})

    def replace(self, **changes: Any) -> Line:
        """A copy with some fields changed."""
        return self.from_dict({**self.as_dict(), **changes})

    def __repr__(self) -> str:
        return f"Line({self.key} {self.account} {self.module} {self.item} {self.amount})"

    @staticmethod
    def sum_amounts(lines: Iterable[Line]) -> dict[tuple[str, str, str], int]:
        """Amounts of lines summed per (account, currency, period)."""
        if not isinstance(lines, (list, tuple)):
            lines = list(lines)
        sums: dict[tuple[str, str, str], int] = {}
        get = sums.get
        for k, a in zip(map(_charge_key, lines), map(_amount_of, lines)):
            sums[k] = get(k, 0) + a
        return sums


for _i, _name in enumerate(Line.FIELDS):
    setattr(Line, _name, property(operator.itemgetter(_i), doc=f"the {_name} column"))
del _i, _name
# Positions of the fields the hot paths read.
_ACCOUNT, _PERIOD, _MODULE, _ITEM, _PLAN, _UNIT, _UPRICE = 5, 9, 6, 7, 14, 13, 15
_QTY, _USAGE, _AMOUNT, _CUR, _VENDOR, _VAMOUNT = 12, 11, 16, 17, 18, 19
_charge_key = operator.itemgetter(_ACCOUNT, _CUR, _PERIOD)
_amount_of = operator.itemgetter(_AMOUNT)


def _check_line(line: Line) -> None:
    a, v = line[_AMOUNT], line[_VAMOUNT]
    if a.__class__ is not int or v.__class__ is not int:
        if not isinstance(a, int) or not isinstance(v, int):
            raise LedgerError(f"{line.key}: amounts are integers of micro-units")
    if (a >= 0 and not 0 <= v <= a) or (a < 0 and not a <= v <= 0):
        raise LedgerError(f"{line.key}: the vendor's part {v} is not within the amount {a}")
    if v and not line[_VENDOR]:
        raise LedgerError(f"{line.key}: a vendor part without a vendor")
    if line[1] not in KINDS:
        raise LedgerError(f"{line.key}: unknown kind {line.kind!r}")


def entries_of(txn_id: int, line: Line) -> list[tuple]:
    """The entry rows a line must have, (txn_id, leg, account, debit, credit,
    currency): what the ledger's SQL derives, written out for checking it."""
    a, v, cur, vendor = line[_AMOUNT], line[_VAMOUNT], line[_CUR], line[_VENDOR]
    p = a - v
    if a >= 0:
        rows = [(txn_id, 0, "customer:" + line[_ACCOUNT], a, 0, cur),
                (txn_id, 1, "platform", 0, p, cur)]
        if vendor:
            rows.append((txn_id, 2, "vendor:" + vendor, 0, v, cur))
    else:
        rows = [(txn_id, 0, "customer:" + line[_ACCOUNT], 0, -a, cur),
                (txn_id, 1, "platform", -p, 0, cur)]
        if vendor:
            rows.append((txn_id, 2, "vendor:" + vendor, -v, 0, cur))
    return rows


# A line's descriptive columns (account, module, plan...) repeat across many
# lines: they live once in `classes`, the narrow `txns` row points to its class,
# and the `lines` view shows every transaction with all its columns.
CLASS_COLUMNS = ("node", "account", "period", "currency", "vendor", "module", "item", "plan",
                 "unit", "unit_price", "level")
TXN_ROW_COLUMNS = ("key", "kind", "seq", "session", "wall_ns", "usage", "quantity", "amount",
                   "vendor_amount", "corrects", "note", "class_id")
NO_PRICE = -1    # unit_price of a class whose lines have none (a key column is never NULL)

_DDL = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fence (name TEXT PRIMARY KEY, generation BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS classes (
    id {id_type} PRIMARY KEY,
    node TEXT NOT NULL,
    account TEXT NOT NULL,
    period TEXT NOT NULL,
    currency TEXT NOT NULL,
    vendor TEXT NOT NULL,
    module TEXT NOT NULL,
    item TEXT NOT NULL,
    plan TEXT NOT NULL,
    unit TEXT NOT NULL,
    unit_price BIGINT NOT NULL,
    level TEXT NOT NULL,
    UNIQUE (account, period, node, currency, vendor, module, item, plan, unit, unit_price, level)
);
CREATE INDEX IF NOT EXISTS classes_period ON classes (period, vendor);
CREATE TABLE IF NOT EXISTS txns (
    id {id_type} PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    seq BIGINT,
    session TEXT NOT NULL,
    class_id BIGINT NOT NULL,
    wall_ns BIGINT NOT NULL,
    usage BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    amount BIGINT NOT NULL,
    vendor_amount BIGINT NOT NULL,
    corrects BIGINT,
    note TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id BIGINT PRIMARY KEY,
    first_txn BIGINT,
    last_txn BIGINT,
    node TEXT,
    position BIGINT,
    posted_ns BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    txn_id BIGINT NOT NULL,
    leg SMALLINT NOT NULL,
    account TEXT NOT NULL,
    debit BIGINT NOT NULL CHECK (debit >= 0),
    credit BIGINT NOT NULL CHECK (credit >= 0),
    currency TEXT NOT NULL,
    PRIMARY KEY (txn_id, leg)
){entries_suffix};
CREATE TABLE IF NOT EXISTS summary (
    class_id BIGINT PRIMARY KEY,
    quantity BIGINT NOT NULL,
    usage BIGINT NOT NULL,
    amount BIGINT NOT NULL,
    vendor_amount BIGINT NOT NULL,
    n BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS positions (
    node TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    updated_ns BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value {blob} NOT NULL,
    PRIMARY KEY (kind, key)
){state_suffix};
CREATE TABLE IF NOT EXISTS state_log (
    id BIGINT PRIMARY KEY,
    rows {blob} NOT NULL
);
{create_view} lines AS
SELECT t.id, t.key, t.kind, c.node, t.seq, t.session, c.account, c.module, c.item, c.level,
       c.period, t.wall_ns, t.usage, t.quantity, c.unit, c.plan,
       NULLIF(c.unit_price, -1) AS unit_price, t.amount, c.currency, c.vendor,
       t.vendor_amount, t.corrects, t.note
FROM txns t JOIN classes c ON c.id = t.class_id;
"""

_SQLITE_GUARDS = """
CREATE TRIGGER IF NOT EXISTS txns_append_only_u BEFORE UPDATE ON txns
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: txns rows are never updated'); END;
CREATE TRIGGER IF NOT EXISTS txns_append_only_d BEFORE DELETE ON txns
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: txns rows are never deleted'); END;
CREATE TRIGGER IF NOT EXISTS classes_append_only_u BEFORE UPDATE ON classes
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: classes are never updated'); END;
CREATE TRIGGER IF NOT EXISTS classes_append_only_d BEFORE DELETE ON classes
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: classes are never deleted'); END;
CREATE TRIGGER IF NOT EXISTS batches_append_only_u BEFORE UPDATE ON batches
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: batches are never updated'); END;
CREATE TRIGGER IF NOT EXISTS batches_append_only_d BEFORE DELETE ON batches
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: batches are never deleted'); END;
CREATE TRIGGER IF NOT EXISTS entries_append_only_u BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: entries are never updated'); END;
CREATE TRIGGER IF NOT EXISTS entries_append_only_d BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: entries are never deleted'); END;
"""

_PG_GUARDS = """
CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the ledger is append-only: % on % refused', TG_OP, TG_TABLE_NAME; END $$;
CREATE OR REPLACE TRIGGER txns_append_only BEFORE UPDATE OR DELETE ON txns
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE OR REPLACE TRIGGER txns_no_truncate BEFORE TRUNCATE ON txns
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE OR REPLACE TRIGGER classes_append_only BEFORE UPDATE OR DELETE ON classes
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE OR REPLACE TRIGGER batches_append_only BEFORE UPDATE OR DELETE ON batches
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE OR REPLACE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE OR REPLACE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
"""

_INSERT_BATCH = ("INSERT INTO batches (id, first_txn, last_txn, node, position, posted_ns) "
                 "SELECT COALESCE(MAX(id), 0) + 1, CAST(? AS BIGINT), CAST(? AS BIGINT), "
                 "CAST(? AS TEXT), CAST(? AS BIGINT), CAST(? AS BIGINT) FROM batches")
_UPSERT_STATE = ("INSERT INTO state (kind, key, value) VALUES (?, ?, ?) "
                 "ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value")
_DELETE_STATE = "DELETE FROM state WHERE kind = ? AND key = ?"
_SUMMARY_SUMS = ("quantity", "usage", "amount", "vendor_amount", "n")
# "WHERE true" keeps SQLite from reading ON CONFLICT as a join clause.
_DERIVE_SUMMARY = (
    "INSERT INTO summary (class_id, quantity, usage, amount, vendor_amount, n) "
    "SELECT class_id, SUM(quantity), SUM(usage), SUM(amount), SUM(vendor_amount), COUNT(*) "
    "FROM txns WHERE id BETWEEN ? AND ? GROUP BY class_id "
    "ON CONFLICT (class_id) DO UPDATE SET "
    + ", ".join(f"{c} = summary.{c} + excluded.{c}" for c in _SUMMARY_SUMS))
# The entries of a batch of transactions: the customer is debited the amount,
# the platform and the vendor are credited their parts; negative amounts
# swap the sides, so no column is ever negative. One statement produces them,
# in (txn_id, leg) order as it scans the transactions, so each row lands at
# the end of the entries b-tree instead of splitting pages in its middle.
_DERIVE_ENTRIES = (
    "WITH legs (leg) AS (VALUES (0), (1), (2)) "
    "INSERT INTO entries (txn_id, leg, account, debit, credit, currency) "
    "SELECT t.id, l.leg, "
    "CASE l.leg WHEN 0 THEN 'customer:' || c.account WHEN 1 THEN 'platform' "
    "ELSE 'vendor:' || c.vendor END, "
    "CASE WHEN t.amount >= 0 THEN CASE WHEN l.leg = 0 THEN t.amount ELSE 0 END "
    "ELSE CASE l.leg WHEN 0 THEN 0 WHEN 1 THEN t.vendor_amount - t.amount "
    "ELSE -t.vendor_amount END END, "
    "CASE WHEN t.amount >= 0 THEN CASE l.leg WHEN 0 THEN 0 WHEN 1 THEN t.amount - t.vendor_amount "
    "ELSE t.vendor_amount END "
    "ELSE CASE WHEN l.leg = 0 THEN -t.amount ELSE 0 END END, c.currency "
    "FROM txns t JOIN classes c ON c.id = t.class_id CROSS JOIN legs l "
    "WHERE t.id BETWEEN ? AND ? AND (l.leg < 2 OR c.vendor <> '')",
)
_CLASS_OF = f"SELECT id FROM classes WHERE {' AND '.join(f'{c} = ?' for c in CLASS_COLUMNS)}"
_INSERT_CLASS = (f"INSERT INTO classes (id, {', '.join(CLASS_COLUMNS)}) "
                 f"VALUES (?, {', '.join('?' * len(CLASS_COLUMNS))})")
_CLASS_CACHE_MAX = 100_000
# A Line's class (the CLASS_COLUMNS) and its txns row but the class id.
_class_key = operator.itemgetter(2, 5, 9, 17, 18, 6, 7, 14, 13, 15, 8)
_row_body = operator.itemgetter(0, 1, 3, 4, 10, 11, 12, 16, 19, 20, 21)
DEFAULT_NODE = "node1"    # engine.node_id's default: the fence row of a lone accountant
_CHECK_FENCE = "SELECT generation FROM fence WHERE name = ?"
_UPSERT_POSITION = ("INSERT INTO positions (node, seq, updated_ns) VALUES (?, ?, ?) "
                    "ON CONFLICT (node) DO UPDATE SET seq = excluded.seq, "
                    "updated_ns = excluded.updated_ns")


class Ledger:
    """The interface both backends implement (same SQL, different drivers)."""

    url: str
    _FOR_UPDATE = ""     # PostgreSQL locks the fence row it reads

    # -- driver hooks ---------------------------------------------------------
    def _tx(self) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def _exec(self, sql: str, params: Sequence = ()) -> None:
        raise NotImplementedError

    def _query(self, sql: str, params: Sequence = ()) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _insert_txns(self, first_id: int, rows: list[tuple]) -> None:
        raise NotImplementedError

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        raise NotImplementedError

    def _upsert_state(self, rows: list[tuple]) -> None:
        self._executemany(_UPSERT_STATE, rows)

    def _is_conflict(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def poster(self) -> Any:
        """What a pipelined accountant posts its batches through on its second
        thread: an object with this `post()` (and `close()`)."""
        return self

    def close(self) -> None:
        """Close the connection."""
        raise NotImplementedError

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------
    def post(self, lines: Iterable[Line], *, position: tuple[str, int] | None = None,
             state: Mapping[tuple[str, str], bytes | None] | None = None,
             checked: bool = False, fence: int | None = None,
             fence_node: str = DEFAULT_NODE) -> int:
        """Post lines as transactions, with the reader's ring position and the
        caller's working state (None values delete), in one database
        transaction. Lines whose key is already in the ledger are skipped.
        `checked=True` skips re-validating lines the rater built (amounts
        within bounds, keys unique within the batch). With `fence` (a token
        from `acquire_fence`), the same transaction first checks that the
        token is still `fence_node`'s, and raises LedgerFenced (posting
        nothing) if another writer of that node has taken over since. Returns the
        number of transactions posted."""
        if checked:
            todo = lines if isinstance(lines, list) else list(lines)
        else:
            batch: dict[str, Line] = {}
            for line in lines:
                _check_line(line)
                if line[0] not in batch:
                    batch[line[0]] = line
            todo = list(batch.values())
        with self._lock:
            try:
                with self._tx():
                    self._check_fence(fence, fence_node)
                    return self._post(todo, position, state, False)
            except Exception as exc:
                self._classes.clear()          # it may hold classes of the rolled-back batch
                if not self._is_conflict(exc):
                    raise
            # Some keys are already posted (a re-post): filter them out, then
            # post the rest with the same position and state.
            try:
                with self._tx():
                    self._check_fence(fence, fence_node)
                    return self._post(todo, position, state, True)
            except Exception:
                self._classes.clear()
                raise

    # -- fencing ------------------------------------------------------------------
    # One fence row per node: the accountants of several engine nodes post into one
    # ledger side by side, and each fences off only the earlier accountants of its
    # own node (a node restarted, or its ring taken over elsewhere).
    def acquire_fence(self, node: str = DEFAULT_NODE) -> int:
        """Take the ledger over as `node`'s one writing accountant: increment the
        node's fence generation and return it, the token to
        `post(..., fence=token, fence_node=node)` with. Every writer of that node
        that took a smaller token is refused from now on; other nodes' writers
        are not affected."""
        with self._lock:
            with self._tx():
                self._exec("INSERT INTO fence (name, generation) VALUES (?, 0) "
                           "ON CONFLICT (name) DO NOTHING", (node,))
                self._exec("UPDATE fence SET generation = generation + 1 WHERE name = ?", (node,))
                return self._query(_CHECK_FENCE, (node,))[0]["generation"]

    def fence_generation(self, node: str = DEFAULT_NODE) -> int:
        """The token of `node`'s accountant that took the ledger last (0: none yet)."""
        rows = self._query(_CHECK_FENCE, (node,))
        return rows[0]["generation"] if rows else 0

    def fenced_nodes(self) -> set[str]:
        """The nodes whose accountants hold (or held) a fence on this ledger."""
        return {r["name"] for r in self._query("SELECT name FROM fence")}

    def _check_fence(self, fence: int | None, node: str) -> None:
        # In the posting transaction: a writer fenced off between the check and the
        # commit cannot happen (SQLite: BEGIN IMMEDIATE; PostgreSQL: FOR UPDATE).
        if fence is None:
            return
        rows = self._query(_CHECK_FENCE + self._FOR_UPDATE, (node,))
        current = rows[0]["generation"] if rows else 0
        if current != fence:
            raise LedgerFenced(f"this accountant's fencing token {fence} is stale: node {node}'s "
                               f"ledger writer is the accountant with token {current}")

    def _post(self, lines: list[Line], position, state, filter_known: bool) -> int:
        if filter_known and lines:
            known = self._known_keys([ln.key for ln in lines])
            lines = [ln for ln in lines if ln.key not in known]
        n = 0
        if lines:
            next_id = self._next_id()
            n = len(lines)
            classes = self._classes
            get = classes.get
            rows = []
            add = rows.append
            for ln in lines:
                ck = _class_key(ln)
                cid = get(ck)
                if cid is None:
                    cid = self._class_id(ck)
                add(_row_body(ln) + (cid,))
            self._insert_txns(next_id, rows)
            # Entries and the summary are derived in SQL from the rows just
            # inserted, inside the same database transaction.
            span = (next_id, next_id + n - 1)
            for sql in _DERIVE_ENTRIES:
                self._exec(sql, span)
            self._exec(_DERIVE_SUMMARY, span)
        if n or position is not None:
            node, seq = position if position is not None else (None, None)
            self._exec(_INSERT_BATCH, (next_id if n else None, next_id + n - 1 if n else None,
                                       node, seq, clock.wall_ns()))
        if position is not None:
            self._exec(_UPSERT_POSITION, (position[0], position[1], clock.wall_ns()))
        if state:
            self._write_state(state)
        return n

    # -- working state ----------------------------------------------------------
    # A batch's state rows (the open sessions it touched: thousands) go into
    # `state_log` as ONE row, instead of one upsert each; every _STATE_LOG_MAX
    # batches the log is folded into `state` (one upsert per distinct key),
    # in the transaction of the batch that fills it. load_state() reads
    # `state` with the log applied in order, so what it returns is the same.
    def _write_state(self, state: Mapping[tuple[str, str], bytes | None]) -> None:
        logged = self._state_log_rows()
        if not logged and len(state) < _STATE_LOG_MIN:
            ups = [(k[0], k[1], v) for k, v in state.items() if v is not None]
            dels = [(k[0], k[1]) for k, v in state.items() if v is None]
            if ups:
                self._upsert_state(ups)
            if dels:
                self._executemany(_DELETE_STATE, dels)
            return
        flat: list[Any] = []
        add = flat.extend
        for (kind, key), value in state.items():
            if value is not None and value.__class__ is not bytes:
                if not isinstance(value, (bytearray, memoryview)):
                    raise LedgerError(f"state {kind}/{key}: the value must be bytes, "
                                      f"not {type(value).__name__}")
                value = bytes(value)
            add((kind, key, value))
        self._exec("INSERT INTO state_log (id, rows) SELECT COALESCE(MAX(id), 0) + 1, ? "
                   "FROM state_log", (msgpack.packb(flat),))
        if logged + 1 >= _STATE_LOG_MAX:
            self._fold_state_log()

    def _state_log_rows(self) -> int:
        # Counted each time (a few rows): another Ledger on the same store (the
        # writer process, ledger_sqlite.LedgerWriter) may have logged batches since.
        return self._query("SELECT COUNT(*) AS n FROM state_log")[0]["n"]

    def _read_state_log(self) -> dict[tuple[str, str], bytes | None]:
        merged: dict[tuple[str, str], bytes | None] = {}
        for r in self._query("SELECT rows FROM state_log ORDER BY id"):
            flat = msgpack.unpackb(bytes(r["rows"]))
            for i in range(0, len(flat), 3):
                merged[(flat[i], flat[i + 1])] = flat[i + 2]
        return merged

    def _fold_state_log(self) -> None:
        merged = self._read_state_log()
        ups = [(k[0], k[1], v) for k, v in merged.items() if v is not None]
        dels = [(k[0], k[1]) for k, v in merged.items() if v is None]
        if ups:
            self._upsert_state(ups)
        if dels:
            self._executemany(_DELETE_STATE, dels)
        self._exec("DELETE FROM state_log")

    def _next_id(self) -> int:
        return self._query("SELECT COALESCE(MAX(id), 0) AS m FROM txns")[0]["m"] + 1

    def _class_id(self, ck: tuple) -> int:
        """The id of a line class, inserted if new (inside the caller's transaction;
        the cache is cleared when that transaction fails)."""
        values = ck[:9] + (NO_PRICE if ck[9] is None else ck[9],) + ck[10:]
        rows = self._query(_CLASS_OF, values)
        if rows:
            cid = rows[0]["id"]
        else:
            cid = self._query("SELECT COALESCE(MAX(id), 0) + 1 AS m FROM classes")[0]["m"]
            self._exec(_INSERT_CLASS, (cid,) + values)
        if len(self._classes) >= _CLASS_CACHE_MAX:
            self._classes.clear()
        self._classes[ck] = cid
        return cid

    def _known_keys(self, keys: list[str]) -> set[str]:
        known: set[str] = set()
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            rows = self._query(f"SELECT key FROM txns WHERE key IN ({', '.join('?' * len(chunk))})",
                               chunk)
            known.update(r["key"] for r in rows)
        return known

    def correct(self, txn_id: int, *, void: bool = False, note: str = "correction",
                **changes: Any) -> tuple[int, int | None]:
        """Correct transaction `txn_id`: post its exact reversal and, unless
        `void`, the fixed line (the original with `changes` applied, e.g.
        amount=..., quantity=..., plan=..., vendor_amount=...). When the amount
        changes and vendor_amount is not given, the vendor keeps the original's
        share. A transaction is corrected once (correct the fixed one to
        correct again). Returns (reversal id, fixed id or None)."""
        bad = set(changes) - set(Line.FIELDS) - {"share"}
        bad |= set(changes) & {"key", "kind", "corrects"}
        if bad:
            raise LedgerError(f"cannot change {', '.join(sorted(bad))} in a correction")
        with self._lock:
            try:
                return self._correct(txn_id, void, note, changes)
            except Exception:
                self._classes.clear()
                raise

    def _correct(self, txn_id: int, void: bool, note: str,
                 changes: dict[str, Any]) -> tuple[int, int | None]:
        with self._tx():
            rows = self._query("SELECT * FROM lines WHERE id = ?", (txn_id,))
            if not rows:
                raise LedgerError(f"no transaction {txn_id}")
            orig = rows[0]
            if orig["kind"] == "reversal":
                raise LedgerError(f"transaction {txn_id} is a reversal; correct the original's fix")
            if self._known_keys([f"rev:{txn_id}"]):
                raise LedgerError(f"transaction {txn_id} was already corrected; correct its fix")
            rev = Line.from_dict(orig).replace(
                key=f"rev:{txn_id}", kind="reversal", corrects=txn_id, note=note,
                amount=-orig["amount"], vendor_amount=-orig["vendor_amount"],
                quantity=-orig["quantity"], usage=-orig["usage"])
            lines = [rev]
            if not void:
                share = changes.pop("share", None)
                fix = Line.from_dict(orig).replace(key=f"fix:{txn_id}", kind="correction",
                                                   corrects=txn_id, note=note, **changes)
                if "vendor_amount" not in changes:
                    if share is None:
                        share = Fraction(orig["vendor_amount"], orig["amount"]) \
                            if orig["amount"] else Fraction(0)
                    fix = fix.replace(vendor_amount=split_share(fix.amount, Fraction(share))
                                      if fix.vendor else 0)
                lines.append(fix)
            for ln in lines:
                _check_line(ln)
            first = self._next_id()
            self._post(lines, None, None, False)
        return first, (first + 1 if not void else None)

    # -- reading ----------------------------------------------------------------
    def position(self, node: str) -> int | None:
        """The last ring seq of `node` committed with the ledger, or None."""
        rows = self._query("SELECT seq FROM positions WHERE node = ?", (node,))
        return rows[0]["seq"] if rows else None

    def positions(self) -> dict[str, int]:
        """Every node's committed ring position."""
        return {r["node"]: r["seq"] for r in self._query("SELECT node, seq FROM positions")}

    def load_state(self, kind: str | None = None) -> dict[tuple[str, str], bytes]:
        """The working state rows, by (kind, key)."""
        with self._lock:
            if kind is None:
                rows = self._query("SELECT kind, key, value FROM state")
            else:
                rows = self._query("SELECT kind, key, value FROM state WHERE kind = ?", (kind,))
            out = {(r["kind"], r["key"]): bytes(r["value"]) for r in rows}
            for k, v in self._read_state_log().items():
                if kind is not None and k[0] != kind:
                    continue
                if v is None:
                    out.pop(k, None)
                else:
                    out[k] = v
            return out

    def transaction(self, txn_id: int) -> dict[str, Any] | None:
        """One transaction with its entries, or None."""
        rows = self._query("SELECT * FROM lines WHERE id = ?", (txn_id,))
        if not rows:
            return None
        t = rows[0]
        t["entries"] = self.entries(txn_id)
        return t

    def transactions(self, *, account: str | None = None, period: str | None = None,
                     session: str | None = None) -> list[dict[str, Any]]:
        """Transactions in id order, filtered."""
        where, params = [], []
        for col, val in (("account", account), ("period", period), ("session", session)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        sql = "SELECT * FROM lines" + (" WHERE " + " AND ".join(where) if where else "")
        return self._query(sql + " ORDER BY id", params)

    def entries(self, txn_id: int | None = None) -> list[dict[str, Any]]:
        """Entries in (txn_id, leg) order, of one transaction or of all."""
        if txn_id is None:
            return self._query("SELECT * FROM entries ORDER BY txn_id, leg")
        return self._query("SELECT * FROM entries WHERE txn_id = ? ORDER BY leg", (txn_id,))

    def count(self) -> int:
        """Number of transactions."""
        return self._query("SELECT COUNT(*) AS n FROM txns")[0]["n"]

    def charges(self) -> list[dict[str, Any]]:
        """Sum of amounts per (account, currency, period): balances and period charges."""
        return self._query(
            "SELECT c.account AS account, c.currency AS currency, c.period AS period, "
            "SUM(s.amount) AS amount, SUM(s.n) AS n FROM summary s "
            "JOIN classes c ON c.id = s.class_id GROUP BY c.account, c.currency, c.period")

    def invoice_rows(self, account: str, period: str) -> list[dict[str, Any]]:
        """An account's transactions of a period summed per (module, level, item,
        plan, unit, unit price, currency), from the summary table."""
        rows = self._query(
            "SELECT c.module AS module, c.level AS level, c.item AS item, c.plan AS plan, "
            "c.unit AS unit, "
            "c.unit_price AS unit_price, c.currency AS currency, SUM(s.quantity) AS quantity, "
            "SUM(s.usage) AS usage, SUM(s.amount) AS amount, SUM(s.n) AS n "
            "FROM summary s JOIN classes c ON c.id = s.class_id "
            "WHERE c.account = ? AND c.period = ? "
            "GROUP BY c.module, c.level, c.item, c.plan, c.unit, c.unit_price, c.currency "
            "ORDER BY c.module, c.level, c.item, c.plan, c.unit, c.unit_price",
            (account, period))
        for r in rows:
            if r["unit_price"] == NO_PRICE:
                r["unit_price"] = None
        return rows

    def payout_rows(self, period: str, vendor: str | None = None) -> list[dict[str, Any]]:
        """Per (vendor, currency, module, item) of a period: gross amount and vendor
        part, so a module's time and its counted actions (texts) are lines apart."""
        sql = ("SELECT c.vendor AS vendor, c.currency AS currency, c.module AS module, "
               "c.item AS item, "
               "SUM(s.amount) AS amount, SUM(s.vendor_amount) AS vendor_amount, SUM(s.n) AS n, "
               "COUNT(DISTINCT c.account) AS accounts FROM summary s "
               "JOIN classes c ON c.id = s.class_id WHERE c.period = ? AND c.vendor <> ''")
        params: list[Any] = [period]
        if vendor is not None:
            sql += " AND c.vendor = ?"
            params.append(vendor)
        return self._query(sql + " GROUP BY c.vendor, c.currency, c.module, c.item "
                                 "ORDER BY c.vendor, c.currency, c.module, c.item", params)

    def accounts_in(self, period: str) -> list[str]:
        """Accounts with transactions in a period."""
        return [r["account"] for r in self._query(
            "SELECT DISTINCT account FROM classes WHERE period = ? ORDER BY account", (period,))]

    def check(self) -> list[str]:
        """Invariant violations (empty when sound): unbalanced transactions,
        entries that disagree with their transaction, transactions without
        entries, a summary that disagrees with the transactions."""
        problems = []
        for r in self._query("SELECT txn_id, SUM(debit) AS d, SUM(credit) AS c FROM entries "
                             "GROUP BY txn_id HAVING SUM(debit) <> SUM(credit)"):
            problems.append(f"txn {r['txn_id']}: debits {r['d']} != credits {r['c']}")
        for r in self._query(
                "SELECT t.id, t.amount, e.debit - e.credit AS net FROM txns t "
                "JOIN entries e ON e.txn_id = t.id AND e.leg = 0 WHERE e.debit - e.credit <> t.amount"):
            problems.append(f"txn {r['id']}: customer entry {r['net']} != amount {r['amount']}")
        for r in self._query(
                "SELECT t.id, t.vendor_amount, e.credit - e.debit AS net FROM txns t "
                "JOIN entries e ON e.txn_id = t.id AND e.leg = 2 "
                "WHERE e.credit - e.debit <> t.vendor_amount"):
            problems.append(f"txn {r['id']}: vendor entry {r['net']} != {r['vendor_amount']}")
        for r in self._query("SELECT id FROM txns t WHERE NOT EXISTS "
                             "(SELECT 1 FROM entries e WHERE e.txn_id = t.id)"):
            problems.append(f"txn {r['id']}: no entries")
        sums = ", ".join(f"SUM({c}) AS {c}" for c in _SUMMARY_SUMS[:-1])
        from_txns = {r["class_id"]: tuple(int(r[c]) for c in _SUMMARY_SUMS) for r in self._query(
            f"SELECT class_id, {sums}, COUNT(*) AS n FROM txns GROUP BY class_id")}
        summary = {r["class_id"]: tuple(int(r[c]) for c in _SUMMARY_SUMS)
                   for r in self._query("SELECT * FROM summary")}
        if from_txns != summary:
            diff = sorted(set(from_txns.items()) ^ set(summary.items()))[:3]
            problems.append(f"the summary disagrees with the transactions: {diff}")
        return problems


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
