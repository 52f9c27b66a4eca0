"""The ledger in one SQLite file, and the writer process that posts to it
(`LedgerWriter`), so the accountant's rating and its database work use two cores."""
from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any

import msgpack

from engine.accounting.ledger import (_DDL, _ROWS_PER_INSERT, _SQLITE_GUARDS, DEFAULT_NODE,
                                      SCHEMA_VERSION, TXN_ROW_COLUMNS, Ledger, LedgerError,
                                      LedgerFenced, Line)


class SqliteLedger(Ledger):
    """The ledger in one SQLite file (WAL, synchronous=FULL: a commit survives
    a power cut, and batching keeps the fsyncs few)."""

    def __init__(self, path: str, *, synchronous: str = "FULL") -> None:
        self.path = os.path.abspath(path)
        self.url = f"sqlite://{self.path}"
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._lock = threading.RLock()
        self._classes: dict[tuple, int] = {}
        self._insert_sql: dict[tuple[str, int, str], str] = {}
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                     timeout=30, cached_statements=256)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA busy_timeout=30000")
        # executescript commits any open transaction, so the script brings its own.
        self._conn.executescript(
            "BEGIN IMMEDIATE;" + _DDL.format(
                entries_suffix=" WITHOUT ROWID", state_suffix=" WITHOUT ROWID", blob="BLOB",
                id_type="INTEGER",
                create_view="CREATE VIEW IF NOT EXISTS")
            + _SQLITE_GUARDS + "INSERT OR IGNORE INTO meta (name, value) VALUES "
            f"('schema_version', '{SCHEMA_VERSION}'); COMMIT;")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _exec(self, sql: str, params: Sequence = ()) -> None:
        self._conn.execute(sql, params)

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        self._conn.executemany(sql, rows)

    def _query(self, sql: str, params: Sequence = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn.execute(sql, params)]

    def _insert_txns(self, first_id: int, rows: list[tuple]) -> None:
        # The ids are SQLite's own rowids, which continue from the largest.
        self._insert_values("txns", TXN_ROW_COLUMNS, rows)
        last = self._conn.execute("SELECT MAX(id) FROM txns").fetchone()[0]
        if last != first_id + len(rows) - 1:
            raise LedgerError(f"transaction ids {first_id}..{last} for {len(rows)} lines: "
                              f"another writer?")

    def _insert_values(self, table: str, columns: tuple[str, ...], rows: list[tuple],
                       suffix: str = "") -> None:
        # Many rows per statement: one sqlite3_step inserts them all with the
        # GIL released, instead of one release per row as executemany does.
        # The statements have a few fixed sizes (a power of two of rows, at
        # most _ROWS_PER_INSERT), so each is prepared once and then comes
        # from the connection's statement cache: preparing a statement of
        # thousands of parameters costs as much as running it.
        execute = self._conn.execute
        i, n = 0, len(rows)
        while i < n:
            size = min(_ROWS_PER_INSERT, 1 << ((n - i).bit_length() - 1))
            sql = self._insert_sql.get((table, size, suffix))
            if sql is None:
                one = "(" + ", ".join("?" * len(columns)) + ")"
                sql = self._insert_sql[(table, size, suffix)] = (
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                    + ", ".join([one] * size) + suffix)
            execute(sql, list(chain.from_iterable(rows[i:i + size])))
            i += size

    def _upsert_state(self, rows: list[tuple]) -> None:
        self._insert_values("state", ("kind", "key", "value"), rows,
                            " ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value")

    def _is_conflict(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)

    def poster(self) -> LedgerWriter:
        """A writer process posting to this file (see LedgerWriter): SQLite
        binds and writes with the GIL held for part of the time, which a
        second thread would take turns on with the rating."""
        return LedgerWriter(self.path)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None  # type: ignore[assignment]


class LedgerWriter:
    """`post()` of a SQLite ledger, run in a child process: the batch's rows
    are bound and written there, so a pipelined accountant's rating and its
    database work use two cores instead of taking turns on one interpreter.

    The batch (lines, ring position, state) travels as one msgpack frame on a
    pipe, the child posts it in ONE database transaction exactly as
    `SqliteLedger.post` does, and answers with the number posted or the
    error, which `post()` raises here. The child dies with its parent
    (PR_SET_PDEATHSIG, and end of input), so a killed accountant leaves no
    writer behind; what it committed is committed with its position.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._start()                 # it starts while the first batch is rated

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from engine.accounting.ledger_sqlite import "
                 "_writer_main; sys.exit(_writer_main(sys.argv[1], int(sys.argv[2])))",
                 self.path, str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        return self.proc

    def post(self, lines: Iterable[Line], *, position: tuple[str, int] | None = None,
             state: Mapping[tuple[str, str], bytes | None] | None = None,
             checked: bool = False, fence: int | None = None,
             fence_node: str = DEFAULT_NODE) -> int:
        """As `Ledger.post`, in the writer process."""
        flat: list[Any] = []
        for (kind, key), value in (state or {}).items():
            flat.extend((kind, key, value))
        frame = msgpack.packb([list(position) if position is not None else None, flat,
                               lines if isinstance(lines, list) else list(lines), checked, fence,
                               fence_node])
        with self._lock:
            proc = self._start()
            problem = "it closed its output"
            try:
                _write_frame(proc.stdin, frame)
                reply = _read_frame(proc.stdout)
            except OSError as exc:
                reply, problem = None, str(exc)
            if reply is None:
                self._kill()
                raise LedgerError(f"the ledger writer process stopped: {problem}")
        ok, value = msgpack.unpackb(reply)
        if not ok:
            raise (LedgerFenced if value.startswith("LedgerFenced:") else LedgerError)(value)
        return value

    def _kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        """End the writer process (after the batch it is posting)."""
        with self._lock:
            if self.proc is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._kill()
                self.proc = None


def _write_frame(f, data: bytes) -> None:
    f.write(len(data).to_bytes(4, "big"))
    view = memoryview(data)
    while view:
        n = f.write(view)
        view = view[n:]


def _read_frame(f) -> bytes | None:
    head = _read_exact(f, 4)
    if head is None:
        return None
    return _read_exact(f, int.from_bytes(head, "big"))


def _read_exact(f, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        chunk = f.read(left)
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _writer_main(path: str, parent: int) -> int:
    """The writer process: post each batch read from stdin, answer on stdout."""
    with contextlib.suppress(Exception):     # Linux: die with the parent, even by SIGKILL
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)      # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:               # the parent died before that took effect
        return 0
    import gc
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)        # rows make no reference cycles
    ledger = SqliteLedger(path)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    new = tuple.__new__
    try:
        while True:
            frame = _read_frame(stdin)
            if frame is None:
                return 0
            position, flat, rows, checked, fence, fence_node = msgpack.unpackb(frame,
                                                                               use_list=False)
            state = {(flat[i], flat[i + 1]): flat[i + 2] for i in range(0, len(flat), 3)}
            try:
                n = ledger.post([new(Line, r) for r in rows],
                                position=tuple(position) if position is not None else None,
                                state=state, checked=checked, fence=fence,
                                fence_node=fence_node)
                reply = msgpack.packb([True, n])
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
                reply = msgpack.packb([False, f"{type(exc).__name__}: {exc}"])
            _write_frame(stdout, reply)
    finally:
        ledger.close()
