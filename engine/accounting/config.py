"""The billing sections of the engine's TOML config, parsed and checked.

Sections read (all optional): `[plans.NAME]`, `[billing]`, `[billing.listings]`,
`[vendors.NAME]` (with `[vendors.NAME.plans]`) and, per account,
`accounts.ID.currency` and `[accounts.ID.billing]`. docs/billing.md describes
every key. Errors name the key: `BillingConfigError("vendors.acme.revenue_share: ...")`.
"""
from __future__ import annotations

import calendar
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from engine.accounting.money import MoneyError, check_currency, parse_money, parse_ratio
from engine.accounting.plans import FREE, FREE_ACTION, PlanError, SubscriptionPlan, UsagePlan, parse_plans
from engine.common import clock
from engine.common.levels import LEVELS

__all__ = ["BillingConfig", "BillingConfigError", "AccountBilling", "Vendor", "PeriodClock",
           "ACTIONS", "LEVELS"]

ACTIONS = ("api_call", "message", "tts_characters", "recording_seconds",
           # texts (engine/sessions/conversations.py): per message and per carrier segment
           "message_in", "message_out", "message_in_segments", "message_out_segments")
PLATFORM = ""   # the vendor name of the platform's own (baton.*) modules

_BILLING_KEYS = {
    "default_plan": "plan for time in control when nothing more specific applies",
    "level_plans": "table level -> plan for time in control (basic, application, service)",
    "action_plans": "table action -> plan for counted actions",
    "listings": "table module (or module:action) -> listing default plan",
    "currency": "currency of accounts that do not set one",
    "period": "billing period: month or day (UTC)",
    "default_revenue_share": "vendor share of modules of vendors with no [vendors.NAME]",
    "store": "ledger store: a SQLite path or a postgresql:// URL",
    "batch_records": "records per ledger transaction at most",
    "batch_ms": "milliseconds a batch may collect records",
    "commit_ms": "milliseconds per ledger transaction while records keep coming, after a burst of four: under load fewer, larger commits (each one an fsync with SQLite), at most this much more lag",
    "policy_interval": "seconds between writes of DATA/policy.json",
    "pipeline": "post batches from a writer process (SQLite; a thread for PostgreSQL) while the next is rated: more throughput, a few ms more lag",
}
_ACCOUNT_KEYS = ("plans", "prepaid_balance", "credit_limit", "paid_periods", "banned")
_VENDOR_KEYS = ("name", "revenue_share", "modules", "plans",
                "secret", "offer_timeout", "outbound", "files_dir")  # the last four are the engine's


class BillingConfigError(ValueError):
    """A billing section that cannot be used; the message starts with the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass
class AccountBilling:
    """One account's billing settings."""

    id: str
    currency: str = "USD"
    plans: dict[str, str] = field(default_factory=dict)
    prepaid_balance: int | None = None
    credit_limit: int | None = None
    paid_periods: frozenset[str] = frozenset()
    banned: bool = False


@dataclass
class Vendor:
    """A module vendor and the share of its modules' revenue it is paid."""

    name: str
    revenue_share: Fraction = Fraction(0)
    modules: tuple[str, ...] = ()
    display_name: str = ""


class PeriodClock:
    """Billing periods of wall-clock time: calendar months ("2026-11") or days
    ("2026-11-05"), in UTC. Caches the current period's bounds because
    nearly every lookup falls into it."""

    def __init__(self, kind: str = "month") -> None:
        if kind not in ("month", "day"):
            raise ValueError(f"period must be month or day, not {kind!r}")
        self.kind = kind
        self._lo = self._hi = 0
        self._label = ""

    def of(self, wall_ns: int) -> str:
        """The period label of a wall-clock time in ns since the epoch."""
        if self._lo <= wall_ns < self._hi:
            return self._label
        tm = time.gmtime(wall_ns // 1_000_000_000)
        if self.kind == "month":
            lo = calendar.timegm((tm.tm_year, tm.tm_mon, 1, 0, 0, 0))
            ny, nm = (tm.tm_year + 1, 1) if tm.tm_mon == 12 else (tm.tm_year, tm.tm_mon + 1)
            hi = calendar.timegm((ny, nm, 1, 0, 0, 0))
            label = f"{tm.tm_year:04d}-{tm.tm_mon:02d}"
        else:
            lo = calendar.timegm((tm.tm_year, tm.tm_mon, tm.tm_mday, 0, 0, 0))
            hi = lo + 86400
            label = f"{tm.tm_year:04d}-{tm.tm_mon:02d}-{tm.tm_mday:02d}"
        self._lo, self._hi, self._label = lo * 1_000_000_000, hi * 1_000_000_000, label
        return label

    def now(self) -> str:
        """The current period."""
        return self.of(clock.wall_ns())


def _table(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise BillingConfigError(where, "expected a table")
    return value


def _plan_map(value: object, where: str, plans: dict[str, UsagePlan]) -> dict[str, str]:
    if not isinstance(value, dict):
        raise BillingConfigError(where, "expected a table of module (or module:action) = plan")
    out = {}
    for target, name in value.items():
        key = f"{where}.\"{target}\""
        if not isinstance(name, str) or name not in plans:
            raise BillingConfigError(key, f"no plan {name!r} (plans: {', '.join(sorted(plans)) or 'none'})")
        module, _, action = target.partition(":")
        if "." not in module:
            raise BillingConfigError(key, "a module code has a vendor prefix, e.g. acme.survey")
        if action and action not in ACTIONS:
            raise BillingConfigError(key, f"unknown action {action!r} (actions: {', '.join(ACTIONS)})")
        out[target] = name
    return out


def _money(value: object, key: str, currency: str, allow_negative: bool = False) -> int:
    try:
        return parse_money(value, key, currency=currency, allow_negative=allow_negative)
    except MoneyError as exc:
        raise BillingConfigError(exc.key, exc.problem) from None


class BillingConfig:
    """Plans, plan assignments, vendors and accounts: everything rating needs.

    `BillingConfig.from_dict(raw)` takes the engine's whole TOML dict.
    """

    def __init__(self) -> None:
        self.plans: dict[str, UsagePlan] = {}
        self.default_plan: str | None = None
        self.level_plans: dict[str, str] = {}
        self.action_plans: dict[str, str] = {}
        self.listings: dict[str, str] = {}
        self.currency = "USD"
        self.period = "month"
        self.default_share = Fraction(0)
        self.store: str | None = None
        self.batch_records = 5000
        self.batch_ms = 50.0
        self.commit_ms = 25.0
        self.policy_interval = 1.0
        self.pipeline = False
        self.vendors: dict[str, Vendor] = {}
        self.module_vendor: dict[str, str] = {}
        self.accounts: dict[str, AccountBilling] = {}
        self._plan_cache: dict[tuple[str, str, str], UsagePlan] = {}
        self._vendor_cache: dict[str, tuple[str, Fraction]] = {}

    # -- loading -------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> BillingConfig:
        """Parse and check the billing sections of a config dict."""
        cfg = cls()
        raw = raw or {}
        try:
            cfg.plans = parse_plans(_table(raw, "plans", "plans"))
        except PlanError as exc:
            raise BillingConfigError(exc.key, exc.problem) from None
        b = _table(raw, "billing", "billing")
        for k in b:
            if k not in _BILLING_KEYS:
                raise BillingConfigError(f"billing.{k}", f"unknown key (known: {', '.join(sorted(_BILLING_KEYS))})")
        try:
            cfg.currency = check_currency(b.get("currency", "USD"), "billing.currency")
        except MoneyError as exc:
            raise BillingConfigError(exc.key, exc.problem) from None
        cfg.period = b.get("period", "month")
        if cfg.period not in ("month", "day"):
            raise BillingConfigError("billing.period", f"must be month or day, not {cfg.period!r}")
        if "default_plan" in b:
            if b["default_plan"] not in cfg.plans:
                raise BillingConfigError("billing.default_plan", f"no plan {b['default_plan']!r}")
            cfg.default_plan = b["default_plan"]
        lp = b.get("level_plans", {})
        if not isinstance(lp, dict):
            raise BillingConfigError("billing.level_plans", "expected a table level = plan")
        for level, name in lp.items():
            if level not in LEVELS:
                raise BillingConfigError(f"billing.level_plans.{level}", f"unknown level (levels: {', '.join(LEVELS)})")
            if name not in cfg.plans:
                raise BillingConfigError(f"billing.level_plans.{level}", f"no plan {name!r}")
        cfg.level_plans = dict(lp)
        ap = b.get("action_plans", {})
        if not isinstance(ap, dict):
            raise BillingConfigError("billing.action_plans", "expected a table action = plan")
        for action, name in ap.items():
            if action not in ACTIONS:
                raise BillingConfigError(f"billing.action_plans.{action}", f"unknown action (actions: {', '.join(ACTIONS)})")
            if name not in cfg.plans:
                raise BillingConfigError(f"billing.action_plans.{action}", f"no plan {name!r}")
        cfg.action_plans = dict(ap)
        cfg.listings = _plan_map(b.get("listings", {}), "billing.listings", cfg.plans)
        try:
            cfg.default_share = parse_ratio(b.get("default_revenue_share", 0), "billing.default_revenue_share")
        except MoneyError as exc:
            raise BillingConfigError(exc.key, exc.problem) from None
        store = b.get("store")
        if store is not None and not isinstance(store, str):
            raise BillingConfigError("billing.store", "expected a path or a postgresql:// URL")
        cfg.store = store
        pipeline = b.get("pipeline", False)
        if not isinstance(pipeline, bool):
            raise BillingConfigError("billing.pipeline", "expected true or false")
        cfg.pipeline = pipeline
        for key, lo in (("batch_records", 1), ("batch_ms", 1), ("commit_ms", 0),
                        ("policy_interval", 0.05)):
            if key in b:
                v = b[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo:
                    raise BillingConfigError(f"billing.{key}", f"expected a number >= {lo}, got {v!r}")
                setattr(cfg, key, int(v) if key == "batch_records" else float(v))

        for vname, v in _table(raw, "vendors", "vendors").items():
            where = f"vendors.{vname}"
            if not isinstance(v, dict):
                raise BillingConfigError(where, "expected a table")
            for k in v:
                if k not in _VENDOR_KEYS:
                    raise BillingConfigError(f"{where}.{k}", f"unknown key (known: {', '.join(_VENDOR_KEYS)})")
            if vname == "baton":
                raise BillingConfigError(where, "baton.* modules belong to the platform")
            try:
                share = parse_ratio(v.get("revenue_share", 0), f"{where}.revenue_share")
            except MoneyError as exc:
                raise BillingConfigError(exc.key, exc.problem) from None
            mods = v.get("modules", [])
            if not isinstance(mods, list) or not all(isinstance(m, str) and "." in m for m in mods):
                raise BillingConfigError(f"{where}.modules", "expected a list of module codes such as [\"acme.survey\"]")
            for m in mods:
                if m.startswith("baton."):
                    raise BillingConfigError(f"{where}.modules", f"{m} is a platform module")
                if m in cfg.module_vendor:
                    raise BillingConfigError(f"{where}.modules", f"{m} is already sold by vendor {cfg.module_vendor[m]!r}")
                cfg.module_vendor[m] = vname
            vplans = _plan_map(v.get("plans", {}), f"{where}.plans", cfg.plans)
            for target in vplans:
                module = target.partition(":")[0]
                owner = cfg.module_vendor.get(module) or module.partition(".")[0]
                if owner != vname:
                    raise BillingConfigError(f"{where}.plans.\"{target}\"", f"{module} is not a module of vendor {vname}")
                if target in cfg.listings:
                    raise BillingConfigError(f"{where}.plans.\"{target}\"", "also listed in billing.listings")
                cfg.listings[target] = vplans[target]
            cfg.vendors[vname] = Vendor(vname, share, tuple(mods), str(v.get("name", vname)))

        for acc_id, acc in _table(raw, "accounts", "accounts").items():
            if not isinstance(acc, dict):
                continue
            where = f"accounts.{acc_id}.billing"
            try:
                currency = check_currency(acc.get("currency", cfg.currency), f"accounts.{acc_id}.currency")
            except MoneyError as exc:
                raise BillingConfigError(exc.key, exc.problem) from None
            ab = AccountBilling(acc_id, currency)
            bill = acc.get("billing", {})
            if not isinstance(bill, dict):
                raise BillingConfigError(where, "expected a table")
            for k in bill:
                if k not in _ACCOUNT_KEYS:
                    raise BillingConfigError(f"{where}.{k}", f"unknown key (known: {', '.join(_ACCOUNT_KEYS)})")
            ab.plans = _plan_map(bill.get("plans", {}), f"{where}.plans", cfg.plans)
            if "prepaid_balance" in bill:
                ab.prepaid_balance = _money(bill["prepaid_balance"], f"{where}.prepaid_balance", currency)
            if "credit_limit" in bill:
                ab.credit_limit = _money(bill["credit_limit"], f"{where}.credit_limit", currency)
            pp = bill.get("paid_periods", [])
            if not isinstance(pp, list) or not all(isinstance(p, str) for p in pp):
                raise BillingConfigError(f"{where}.paid_periods", "expected a list of periods such as [\"2026-11\"]")
            ab.paid_periods = frozenset(pp)
            banned = bill.get("banned", False)
            if not isinstance(banned, bool):
                raise BillingConfigError(f"{where}.banned", "expected true or false")
            ab.banned = banned
            cfg.accounts[acc_id] = ab
        cfg._check_currencies()
        return cfg

    def _check_currencies(self) -> None:
        shared = [("billing.default_plan", self.default_plan)]
        shared += [(f"billing.level_plans.{k}", v) for k, v in self.level_plans.items()]
        shared += [(f"billing.action_plans.{k}", v) for k, v in self.action_plans.items()]
        shared += [(f"listings \"{k}\"", v) for k, v in self.listings.items()]
        accounts = list(self.accounts.values()) or [AccountBilling("*", self.currency)]
        if not any(a.id == "*" for a in accounts):
            accounts.append(AccountBilling("*", self.currency))
        for acc in accounts:
            own = [(f"accounts.{acc.id}.billing.plans.\"{k}\"", v) for k, v in acc.plans.items()]
            for where, name in shared + own:
                if name is not None and self.plans[name].currency != acc.currency:
                    who = "accounts without a currency" if acc.id == "*" else f"account {acc.id}"
                    raise BillingConfigError(
                        where, f"plan {name!r} is priced in {self.plans[name].currency}, but "
                               f"{who} bill in {acc.currency}")

    # -- lookups -------------------------------------------------------------
    def account(self, account: str) -> AccountBilling:
        """The billing settings of an account (defaults for an unknown one)."""
        acc = self.accounts.get(account)
        if acc is None:
            acc = self.accounts[account] = AccountBilling(account, self.currency)
        return acc

    def plan_for(self, account: str, module: str, level: str = "", action: str = "") -> UsagePlan:
        """The plan pricing a module's time in control (action "") or one of its
        actions for an account: the account's own plan for it, else the
        module's listing default, else the platform default (per level for
        time, per action for actions), else the free plan."""
        ck = (account, module if not action else f"{module}:{action}", level)
        plan = self._plan_cache.get(ck)
        if plan is not None:
            return plan
        target = ck[1]
        acc = self.accounts.get(account)
        name = acc.plans.get(target) if acc is not None else None
        if name is None:
            name = self.listings.get(target)
        if name is None:
            name = self.action_plans.get(action) if action else \
                (self.level_plans.get(level) or self.default_plan)
        plan = self.plans[name] if name is not None else (FREE_ACTION if action else FREE)
        self._plan_cache[ck] = plan
        return plan

    def vendor_of(self, module: str) -> tuple[str, Fraction]:
        """(vendor name, vendor share) of a module; ("", 0) for the platform's own."""
        got = self._vendor_cache.get(module)
        if got is None:
            if module.startswith("baton.") or "." not in module:
                got = (PLATFORM, Fraction(0))
            else:
                name = self.module_vendor.get(module) or module.partition(".")[0]
                v = self.vendors.get(name)
                got = (name, v.revenue_share if v is not None else self.default_share)
            self._vendor_cache[module] = got
        return got

    def subscription_paid_externally(self, account: str, period: str) -> bool:
        """True when the account's `paid_periods` lists the period."""
        acc = self.accounts.get(account)
        return acc is not None and period in acc.paid_periods

    def subscriptions_of(self, account: str) -> list[tuple[str, SubscriptionPlan]]:
        """(target, plan) of the account's own subscription plans."""
        acc = self.accounts.get(account)
        if acc is None:
            return []
        return [(t, self.plans[n]) for t, n in acc.plans.items()
                if isinstance(self.plans[n], SubscriptionPlan)]

    def capped_targets(self, account: str) -> list[tuple[str, UsagePlan]]:
        """(target, plan) of every plan with a cap that the account's own
        assignments, the listings or the defaults name."""
        acc = self.accounts.get(account)
        targets = dict(self.listings)
        if acc is not None:
            targets.update(acc.plans)
        return [(t, self.plans[n]) for t, n in targets.items() if self.plans[n].cap is not None]
