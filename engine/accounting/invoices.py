"""Invoices and payout statements, as dicts and rendered as table, JSON or CSV.

An invoice is one account's period: a line per (module, item, plan, unit,
unit price) with the quantity in the plan's unit and the amount, and the
total. Amounts are summed from the ledger's lines, never re-rounded, so the
total is exactly what the customer's ledger account was debited.

A payout statement is one vendor's period in one currency, summed over all
accounts: per module and item (its time, each kind of counted action such
as texts) the gross amount customers paid, the platform's share
and the vendor's payout (gross minus the platform share).
"""
from __future__ import annotations

import csv
import io
import json
from fractions import Fraction
from typing import Any

from engine.accounting.ledger import Ledger
from engine.accounting.money import format_money, format_quantity
from engine.accounting.plans import UNIT_SECONDS

__all__ = ["invoice", "payouts", "render", "FORMATS"]

FORMATS = ("table", "json", "csv")


def _quantity(quantity: int, unit: str) -> str:
    per = UNIT_SECONDS.get(unit, 1)
    return format_quantity(Fraction(quantity, per))


def invoice(ledger: Ledger, account: str, period: str, currency: str | None = None) -> dict[str, Any]:
    """The consolidated invoice of `account` for `period` as a dict.

    `currency` is reported when the period has no lines (default USD).
    Amounts appear both formatted ("0.023") and in micro-units (`*_micro`).
    """
    lines = []
    totals: dict[str, int] = {}
    for r in ledger.invoice_rows(account, period):
        up = r["unit_price"]
        cur = r["currency"]
        amount = int(r["amount"])
        lines.append({
            "module": r["module"], "level": r["level"], "item": r["item"], "plan": r["plan"],
            "quantity": _quantity(int(r["quantity"]), r["unit"]), "unit": r["unit"],
            "unit_price": format_money(int(up)) if up is not None else None,
            "price": format_money(int(up)) if up is not None else r["plan"],
            "amount": format_money(amount), "amount_micro": amount, "currency": cur,
            "transactions": int(r["n"]),
        })
        totals[cur] = totals.get(cur, 0) + amount
    if not totals:
        totals[currency or "USD"] = 0
    single = next(iter(totals)) if len(totals) == 1 else None
    return {
        "type": "invoice", "account": account, "period": period, "currency": single,
        "lines": lines,
        "total": format_money(totals[single]) if single else None,
        "total_micro": totals[single] if single else None,
        "totals": {c: format_money(v) for c, v in totals.items()},
    }


def payouts(ledger: Ledger, period: str, vendor: str | None = None) -> dict[str, Any]:
    """Payout statements of `period` (of one vendor, or all), one per vendor
    and currency, in a report dict with the grand total per currency."""
    statements: dict[tuple[str, str], dict[str, Any]] = {}
    for r in ledger.payout_rows(period, vendor):
        key = (r["vendor"], r["currency"])
        st = statements.get(key)
        if st is None:
            st = statements[key] = {"type": "payout", "vendor": r["vendor"], "period": period,
                                    "currency": r["currency"], "lines": [], "gross_micro": 0,
                                    "platform_share_micro": 0, "total_micro": 0}
        gross, paid = int(r["amount"]), int(r["vendor_amount"])
        st["lines"].append({"module": r["module"], "item": r["item"], "transactions": int(r["n"]),
                            "accounts": int(r["accounts"]), "gross": format_money(gross),
                            "platform_share": format_money(gross - paid),
                            "payout": format_money(paid), "gross_micro": gross,
                            "platform_share_micro": gross - paid, "payout_micro": paid})
        st["gross_micro"] += gross
        st["platform_share_micro"] += gross - paid
        st["total_micro"] += paid
    totals: dict[str, int] = {}
    out = []
    for st in statements.values():
        st["gross"] = format_money(st["gross_micro"])
        st["platform_share"] = format_money(st["platform_share_micro"])
        st["total"] = format_money(st["total_micro"])
        totals[st["currency"]] = totals.get(st["currency"], 0) + st["total_micro"]
        out.append(st)
    single = next(iter(totals)) if len(totals) == 1 else None
    return {"type": "payouts", "period": period, "vendor": vendor, "statements": out,
            "currency": single,
            "total": format_money(totals[single]) if single else ("0.00" if not totals else None),
            "total_micro": totals[single] if single else (0 if not totals else None),
            "totals": {c: format_money(v) for c, v in totals.items()}}


def _align_decimals(rows: list[list[str]], cols: set[int]) -> None:
    """Pad numbers on the right so their decimal points line up."""
    for i in cols:
        places = [len(r[i]) - r[i].index(".") - 1 for r in rows if "." in r[i]]
        if not places:
            continue
        width = max(places)
        for r in rows:
            cell = r[i]
            if cell and cell.replace(".", "", 1).lstrip("-").isdigit():
                have = len(cell) - cell.index(".") - 1 if "." in cell else -1
                r[i] = cell + " " * (width - have)


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    _align_decimals(rows, right)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [fmt(headers)] + [fmt(r) for r in rows]


def _render_table(doc: dict[str, Any]) -> str:
    out: list[str] = []
    if doc["type"] == "invoice":
        out.append(f"Invoice  account {doc['account']}  period {doc['period']}  "
                   f"currency {doc['currency'] or ', '.join(doc['totals'])}")
        rows = [[ln["module"], ln["item"], ln["plan"], ln["quantity"], ln["unit"], ln["price"],
                 ln["amount"]] for ln in doc["lines"]]
        out += _table(["MODULE", "ITEM", "PLAN", "QUANTITY", "UNIT", "UNIT PRICE", "AMOUNT"],
                      rows + [["", "", "", "", "", "TOTAL", doc["total"] or "-"]], {3, 6})
        if doc["currency"] is None:
            out += [f"total {c}: {v}" for c, v in doc["totals"].items()]
        return "\n".join(out) + "\n"
    for st in doc["statements"]:
        out.append(f"Payout  vendor {st['vendor']}  period {st['period']}  currency {st['currency']}")
        rows = [[ln["module"], ln["item"], str(ln["transactions"]), str(ln["accounts"]),
                 ln["gross"], ln["platform_share"], ln["payout"]] for ln in st["lines"]]
        rows.append(["TOTAL", "", "", "", st["gross"], st["platform_share"], st["total"]])
        out += _table(["MODULE", "ITEM", "TXNS", "ACCOUNTS", "GROSS", "PLATFORM SHARE", "PAYOUT"],
                      rows, {2, 3, 4, 5, 6})
        out.append("")
    if not doc["statements"]:
        out.append(f"No payouts for period {doc['period']}.")
    return "\n".join(out).rstrip("\n") + "\n"


def _render_csv(doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if doc["type"] == "invoice":
        w.writerow(["account", "period", "module", "item", "plan", "quantity", "unit",
                    "unit_price", "amount", "currency"])
        for ln in doc["lines"]:
            w.writerow([doc["account"], doc["period"], ln["module"], ln["item"], ln["plan"],
                        ln["quantity"], ln["unit"], ln["unit_price"] or "", ln["amount"],
                        ln["currency"]])
        for cur, total in doc["totals"].items():
            w.writerow([doc["account"], doc["period"], "TOTAL", "", "", "", "", "", total, cur])
        return buf.getvalue()
    w.writerow(["vendor", "period", "currency", "module", "item", "transactions", "accounts",
                "gross", "platform_share", "payout"])
    for st in doc["statements"]:
        for ln in st["lines"]:
            w.writerow([st["vendor"], st["period"], st["currency"], ln["module"], ln["item"],
                        ln["transactions"], ln["accounts"], ln["gross"], ln["platform_share"],
                        ln["payout"]])
        w.writerow([st["vendor"], st["period"], st["currency"], "TOTAL", "", "", "", st["gross"],
                    st["platform_share"], st["total"]])
    return buf.getvalue()


def render(doc: dict[str, Any], fmt: str = "table") -> str:
    """Render an invoice or a payouts report as "table", "json" or "csv"."""
    if fmt == "json":
        return json.dumps(doc, indent=2) + "\n"
    if fmt == "csv":
        return _render_csv(doc)
    if fmt == "table":
        return _render_table(doc)
    raise ValueError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
