"""Accounting: metering, usage plans, a double-entry ledger, invoices and payouts.

The accountant (`accountant.Accountant`, `python -m engine.accounting.accountant`)
drains the engine's call-control ring, meters time in control per module
(`meter`), prices it with usage plans (`plans`, `rater`) and posts it to an
append-only double-entry ledger in SQLite or PostgreSQL (`ledger`); `invoices`
sums the ledger into invoices and vendor payouts. Money is integer micro-units
(`money`). docs/billing.md describes the configuration and the guarantees.
"""
from __future__ import annotations

from engine.accounting.config import BillingConfig, BillingConfigError
from engine.accounting.ledger import Ledger, LedgerError, Line
from engine.accounting.ledger_pg import PostgresLedger
from engine.accounting.ledger_sqlite import SqliteLedger
from engine.accounting.ledgers import open_ledger
from engine.accounting.meter import Action, Meter, Segment, SessionEnd
from engine.accounting.money import MICRO, MoneyError, format_money, parse_money, round_half_up
from engine.accounting.plans import PlanError, UsagePlan, parse_plan
from engine.accounting.rater import Rater

__all__ = [
    "BillingConfig", "BillingConfigError", "Ledger", "LedgerError", "Line", "PostgresLedger",
    "SqliteLedger", "open_ledger", "Action", "Meter", "Segment", "SessionEnd", "MICRO",
    "MoneyError", "format_money", "parse_money", "round_half_up", "PlanError", "UsagePlan",
    "parse_plan", "Rater",
]
