"""`open_ledger(url)`: the ledger a URL names, SQLite or PostgreSQL."""
from __future__ import annotations

import os

from engine.accounting.ledger import Ledger, LedgerError
from engine.accounting.ledger_pg import PostgresLedger
from engine.accounting.ledger_sqlite import SqliteLedger


def open_ledger(url: str | None, data_dir: str | None = None) -> Ledger:
    """Open (and create) a ledger: None for `DATA/accounting/ledger.db`, a path
    or `sqlite:///PATH` for SQLite, `postgresql://...` for PostgreSQL."""
    if url is None:
        if data_dir is None:
            raise LedgerError("no ledger store: give a URL or a data directory")
        return SqliteLedger(os.path.join(data_dir, "accounting", "ledger.db"))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresLedger(url)
    if url.startswith("sqlite:///"):
        return SqliteLedger(url[len("sqlite://"):])
    if "://" in url:
        raise LedgerError(f"unknown ledger store {url!r} (a path, sqlite:///PATH or postgresql://...)")
    return SqliteLedger(url)
