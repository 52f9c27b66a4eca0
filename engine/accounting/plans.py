"""Usage plans: how a quantity of use turns into an amount of money.

A plan is parsed from a TOML table (`[plans.NAME]`) by `parse_plan`. Every
plan prices a *base quantity*: whole seconds for a time unit (second, minute,
hour), a count for the unit `action`. A segment of time in control is first
rounded up by the plan's billing increment ("60/60", "6/6", "1/1"); an action
record's count is taken as is (with a time unit it is a number of seconds,
e.g. `recording_seconds`).

Kinds:

- `per_unit`: `price` per `unit`, plus `connect_fee` per segment and a
  `minimum` per rated line.
- `graduated`: `tiers`, each priced for the part of the usage that falls in
  it, counted within a session or within the billing period (`tier_scope`).
- `volume`: `tiers`; the whole period's volume is priced at the tier it has
  reached. Each line is the change in the period's (rounded) total, so a line
  can be negative when a cheaper tier is reached.
- `subscription`: a `fee` per period; usage within a paid period is recorded
  at zero price.

Any kind but `volume` takes a `cap` per period: beyond it usage is denied
(`at_cap = "deny"`, recorded at zero and reported to the engine's policy) or
billed at `overage_price` (`at_cap = "overage"`).

Rating works on exact rationals (integer numerators over `DEN`) and rounds
once per rated line, half-up, with `money.round_half_up`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from engine.accounting.money import MoneyError, check_currency, parse_money, round_half_up

__all__ = [
    "PlanError", "UsagePlan", "PerUnitPlan", "GraduatedPlan", "VolumePlan", "SubscriptionPlan",
    "Tier", "Increment", "parse_plan", "parse_plans", "UNIT_SECONDS", "DEN", "FREE", "FREE_ACTION",
]

UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "action": 1}
TIME_UNITS = ("second", "minute", "hour")
# Every per-unit price becomes a price per base unit over this denominator:
# per second *3600, per minute *60, per hour *1, per action *3600.
DEN = 3600
UNIT_SCALE = {"second": DEN, "minute": DEN // 60, "hour": DEN // 3600, "action": DEN}
_SCALE = UNIT_SCALE
NS = 1_000_000_000
KINDS = ("per_unit", "graduated", "volume", "subscription")
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|sec|min|seconds?|minutes?|hours?)?\s*$")
_DUR_FACTOR = {None: 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60,
               "minute": 60, "minutes": 60, "h": 3600, "hour": 3600, "hours": 3600}


class PlanError(ValueError):
    """A plan table that cannot be used; `key` is the dotted config key at fault."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Increment:
    """Billing increment "first/next" in whole seconds: a segment is billed at
    least `first` seconds, then in steps of `next` (a zero-length segment is 0)."""

    first: int = 1
    next: int = 1

    def bill(self, ns: int) -> int:
        """Billed whole seconds for a duration in nanoseconds."""
        if ns <= 0:
            return 0
        first_ns = self.first * NS
        if ns <= first_ns:
            return self.first
        step = self.next * NS
        return self.first + -(-(ns - first_ns) // step) * self.next

    def completed(self, ns: int) -> int:
        """Billed seconds at the last increment boundary reached by `ns` (for running costs)."""
        if ns < self.first * NS or ns <= 0:
            return 0
        return self.first + (ns - self.first * NS) // (self.next * NS) * self.next

    def __str__(self) -> str:
        return f"{self.first}/{self.next}"


@dataclass(frozen=True, slots=True)
class Tier:
    """One tier: usage up to `up_to` base units (None: no upper bound) at
    `price` micro-units per `unit`, plus `flat` once the tier is entered."""

    up_to: int | None
    price: int
    unit: str
    flat: int = 0

    @property
    def scale(self) -> int:
        return _SCALE[self.unit]


@dataclass(frozen=True, slots=True)
class Charge:
    """The priced outcome of one line: amount in micro-units, the unit price
    when the plan has a single one, and a note (cap, unpaid...)."""

    amount: int
    unit_price: int | None = None
    note: str = ""


@dataclass(frozen=True)
class UsagePlan:
    """Common part of every plan. `rate()` prices `quantity` base units."""

    name: str
    kind: str
    currency: str = "USD"
    unit: str = "minute"
    increment: Increment = field(default_factory=Increment)
    minimum: int = 0
    connect_fee: int = 0
    cap: int | None = None
    at_cap: str = "deny"
    overage_price: int = 0
    description: str = ""

    @property
    def is_time(self) -> bool:
        """True when the plan's unit is a unit of time."""
        return self.unit in TIME_UNITS

    @property
    def overage_scaled(self) -> int:
        """The overage price per base unit, over `DEN` (as `Tier.scale` scales a tier's)."""
        return self.overage_price * _SCALE[self.unit]

    def segment_quantity(self, ns: int) -> int:
        """Base quantity of a segment: billed seconds, or 1 use for an action unit."""
        return self.increment.bill(ns) if self.is_time else 1

    def rate(self, quantity: int, *, prior_period: int = 0, prior_session: int = 0,
             segment: bool = False, paid: bool = True) -> Charge:
        """Price `quantity` base units, given the usage already rated this
        period and this session (same account and module). `segment` adds the
        connect fee; `paid` matters to subscriptions only."""
        within, beyond = quantity, 0
        if self.cap is not None:
            room = max(0, self.cap - prior_period)
            within, beyond = min(quantity, room), max(0, quantity - room)
        num, unit_price, note = self._num(within, prior_period, prior_session, paid)
        if beyond:
            if self.at_cap == "overage":
                num += beyond * self.overage_scaled
                note = note or "overage"
                if not within or unit_price == self.overage_price:
                    unit_price = self.overage_price
                else:
                    unit_price = None
            else:
                note = note or "over-cap"
        if segment:
            num += self.connect_fee * DEN
        amount = round_half_up(num, DEN)
        if self.minimum and amount < self.minimum:
            amount = self.minimum
        return Charge(amount, unit_price, note)

    def _num(self, q: int, prior_period: int, prior_session: int,
             paid: bool) -> tuple[int, int | None, str]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The plan as plain data, for docs and the CLI."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "currency": self.currency,
                               "unit": self.unit}
        if self.is_time:
            out["increment"] = str(self.increment)
        for k in ("minimum", "connect_fee"):
            if getattr(self, k):
                out[k] = getattr(self, k)
        if self.cap is not None:
            out.update(cap=self.cap, at_cap=self.at_cap)
        return out


@dataclass(frozen=True)
class PerUnitPlan(UsagePlan):
    """`price` micro-units per `unit`."""

    price: int = 0

    def _num(self, q, prior_period, prior_session, paid):
        return q * self.price * _SCALE[self.unit], self.price, ""


def _tiered_num(lo: int, hi: int, tiers: tuple[Tier, ...]) -> int:
    """Numerator (over DEN) of usage [lo, hi) priced tier by tier, with each
    tier's flat amount once its first unit is used."""
    num, start = 0, 0
    for t in tiers:
        end = t.up_to
        a, b = max(lo, start), hi if end is None else min(hi, end)
        if b > a:
            num += (b - a) * t.price * t.scale
            if t.flat and a == start:
                num += t.flat * DEN
        if end is None or end >= hi:
            break
        start = end
    return num


@dataclass(frozen=True)
class GraduatedPlan(UsagePlan):
    """Each tier prices the part of the usage within it; `tier_scope` says
    whether usage counts from the start of the session or of the period."""

    tiers: tuple[Tier, ...] = ()
    tier_scope: str = "period"

    def _num(self, q, prior_period, prior_session, paid):
        prior = prior_session if self.tier_scope == "session" else prior_period
        return _tiered_num(prior, prior + q, self.tiers), None, ""


@dataclass(frozen=True)
class VolumePlan(UsagePlan):
    """The whole period's volume is priced at the tier it reaches."""

    tiers: tuple[Tier, ...] = ()

    def period_total(self, volume: int) -> int:
        """The rounded amount of a period's whole volume."""
        if volume <= 0:
            return 0
        for t in self.tiers:
            if t.up_to is None or volume <= t.up_to:
                return round_half_up(volume * t.price * t.scale + t.flat * DEN, DEN)
        raise AssertionError("the last tier is unbounded")

    def rate(self, quantity, *, prior_period=0, prior_session=0, segment=False, paid=True):
        # The rounding point is the period total: lines telescope to it exactly.
        amount = self.period_total(prior_period + quantity) - self.period_total(prior_period)
        if segment:
            amount += self.connect_fee
        return Charge(amount, None, "")


@dataclass(frozen=True)
class SubscriptionPlan(UsagePlan):
    """`fee` per period; usage is free while the period is paid. With
    `unpaid = "charge"` the fee is posted at the period's first use, which
    pays it; with `unpaid = "deny"` only `paid_periods` of the account count
    and stray usage of an unpaid period is recorded at zero, noted "unpaid"."""

    fee: int = 0
    unpaid: str = "charge"

    def _num(self, q, prior_period, prior_session, paid):
        return 0, 0, "" if paid else "unpaid"


FREE = PerUnitPlan(name="free", kind="per_unit", price=0, description="usage with no plan")
# Counted actions with no plan: free, and counted as what they are (not as minutes).
FREE_ACTION = PerUnitPlan(name="free", kind="per_unit", price=0, unit="action",
                          description="actions with no plan")


# -- parsing -----------------------------------------------------------------

_COMMON = {"kind", "description", "currency", "unit"}
_ALLOWED = {
    "per_unit": _COMMON | {"price", "increment", "minimum", "connect_fee", "cap", "at_cap",
                           "overage_price"},
    "graduated": _COMMON | {"tiers", "tier_scope", "increment", "minimum", "connect_fee", "cap",
                            "at_cap", "overage_price"},
    "volume": _COMMON | {"tiers", "increment", "connect_fee"},
    "subscription": _COMMON | {"fee", "unpaid", "increment", "cap", "at_cap", "overage_price"},
}


def _money(table: dict, key: str, where: str, currency: str, default: int | None = None) -> int:
    if key not in table:
        if default is None:
            raise PlanError(f"{where}.{key}", "required (an amount such as \"0.01\")")
        return default
    try:
        return parse_money(table[key], f"{where}.{key}", currency=currency)
    except MoneyError as exc:
        raise PlanError(exc.key, exc.problem) from None


def _unit(value: object, key: str) -> str:
    if value not in UNIT_SECONDS:
        raise PlanError(key, f"unit must be one of {', '.join(UNIT_SECONDS)}, not {value!r}")
    return str(value)


def parse_quantity(value: object, key: str, unit: str) -> int:
    """A tier bound or a cap in base units: an int (seconds, or actions), or for
    time plans a duration string such as "10m", "600s", "2h"."""
    if isinstance(value, bool):
        raise PlanError(key, f"expected a whole number, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m is None or (m.group(2) and unit not in TIME_UNITS):
            hint = ' or a duration such as "10m"' if unit in TIME_UNITS else ""
            raise PlanError(key, f"expected a whole number{hint}, got {value!r}")
        n = int(m.group(1)) * _DUR_FACTOR[m.group(2) and m.group(2).lower()]
    else:
        raise PlanError(key, f"expected a whole number, got {type(value).__name__}")
    if n <= 0:
        raise PlanError(key, f"must be positive, got {value!r}")
    return n


def parse_increment(value: object, key: str) -> Increment:
    """"60/60", "6/6", "1/1" (first/next seconds), or an int N for "N/N"."""
    if isinstance(value, int) and not isinstance(value, bool):
        first = nxt = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*/\s*\d+\s*", value):
        first, nxt = (int(x) for x in value.split("/"))
    else:
        raise PlanError(key, f"expected \"FIRST/NEXT\" in seconds such as \"60/60\", \"6/6\" "
                             f"or \"1/1\", got {value!r}")
    if nxt < 1 or first < 0:
        raise PlanError(key, f"the increments must be at least 0/1 seconds, got {value!r}")
    return Increment(first, nxt)


def _tiers(table: dict, where: str, unit: str, currency: str) -> tuple[Tier, ...]:
    raw = table.get("tiers")
    if not isinstance(raw, list) or not raw:
        raise PlanError(f"{where}.tiers", "required: a list of tables such as "
                                          "[{up_to = 600, price = \"0.10\"}, {price = \"0.05\"}]")
    tiers: list[Tier] = []
    prev = 0
    for i, t in enumerate(raw):
        key = f"{where}.tiers[{i}]"
        if not isinstance(t, dict):
            raise PlanError(key, "expected a table {up_to = ..., price = ..., unit = ...}")
        for k in t:
            if k not in ("up_to", "price", "unit", "flat"):
                raise PlanError(f"{key}.{k}", "unknown key (known: flat, price, unit, up_to)")
        tunit = _unit(t.get("unit", unit), f"{key}.unit")
        if (tunit in TIME_UNITS) != (unit in TIME_UNITS):
            raise PlanError(f"{key}.unit", f"{tunit!r} does not measure the same thing as the "
                                           f"plan's unit {unit!r}")
        if "price" not in t and "flat" not in t:
            raise PlanError(f"{key}.price", "a tier needs a price, a flat amount or both")
        price = _money(t, "price", key, currency, 0)
        flat = _money(t, "flat", key, currency, 0)
        up_to = None
        if "up_to" in t:
            up_to = parse_quantity(t["up_to"], f"{key}.up_to", unit)
            if up_to <= prev:
                raise PlanError(f"{key}.up_to", f"tiers must rise: {up_to} is not above {prev}")
            prev = up_to
        elif i != len(raw) - 1:
            raise PlanError(f"{key}.up_to", "only the last tier may omit up_to")
        tiers.append(Tier(up_to, price, tunit, flat))
    if tiers[-1].up_to is not None:
        raise PlanError(f"{where}.tiers[{len(raw) - 1}]",
                        "the last tier must have no up_to (it takes all usage above)")
    return tuple(tiers)


def parse_plan(name: str, table: dict[str, Any], *, where: str | None = None) -> UsagePlan:
    """Build a UsagePlan from its TOML table; PlanError names the bad key
    (e.g. `plans.basic.increment`)."""
    where = where or f"plans.{name}"
    if not isinstance(table, dict):
        raise PlanError(where, "expected a table")
    kind = table.get("kind", "per_unit")
    if kind not in KINDS:
        raise PlanError(f"{where}.kind", f"must be one of {', '.join(KINDS)}, not {kind!r}")
    for k in table:
        if k not in _ALLOWED[kind]:
            raise PlanError(f"{where}.{k}", f"unknown key for a {kind} plan "
                                            f"(known: {', '.join(sorted(_ALLOWED[kind]))})")
    try:
        currency = check_currency(table.get("currency", "USD"), f"{where}.currency")
    except MoneyError as exc:
        raise PlanError(exc.key, exc.problem) from None
    default_unit = "minute"
    if kind in ("graduated", "volume") and isinstance(table.get("tiers"), list) and table["tiers"] \
            and isinstance(table["tiers"][0], dict) and "unit" in table["tiers"][0]:
        default_unit = table["tiers"][0]["unit"]
    unit = _unit(table.get("unit", default_unit), f"{where}.unit")
    common: dict[str, Any] = {"name": name, "kind": kind, "currency": currency, "unit": unit,
                              "description": str(table.get("description", ""))}
    if "increment" in table:
        if unit not in TIME_UNITS:
            raise PlanError(f"{where}.increment", "only plans with a unit of time have an increment")
        common["increment"] = parse_increment(table["increment"], f"{where}.increment")
    if "connect_fee" in table:
        if unit not in TIME_UNITS:
            raise PlanError(f"{where}.connect_fee", "only plans with a unit of time have a "
                                                    "connect fee (it is charged per segment)")
        common["connect_fee"] = _money(table, "connect_fee", where, currency)
    if "minimum" in table:
        common["minimum"] = _money(table, "minimum", where, currency)
    if "cap" in table:
        common["cap"] = parse_quantity(table["cap"], f"{where}.cap", unit)
        at_cap = table.get("at_cap", "deny")
        if at_cap not in ("deny", "overage"):
            raise PlanError(f"{where}.at_cap", f"must be deny or overage, not {at_cap!r}")
        common["at_cap"] = at_cap
        if at_cap == "overage":
            common["overage_price"] = _money(table, "overage_price", where, currency)
        elif "overage_price" in table:
            raise PlanError(f"{where}.overage_price", "only with at_cap = \"overage\"")
    elif "at_cap" in table or "overage_price" in table:
        key = "at_cap" if "at_cap" in table else "overage_price"
        raise PlanError(f"{where}.{key}", "needs a cap")

    if kind == "per_unit":
        return PerUnitPlan(price=_money(table, "price", where, currency), **common)
    if kind == "graduated":
        scope = table.get("tier_scope", "period")
        if scope not in ("session", "period"):
            raise PlanError(f"{where}.tier_scope", f"must be session or period, not {scope!r}")
        return GraduatedPlan(tiers=_tiers(table, where, unit, currency), tier_scope=scope,
                             **common)
    if kind == "volume":
        return VolumePlan(tiers=_tiers(table, where, unit, currency), **common)
    unpaid = table.get("unpaid", "charge")
    if unpaid not in ("charge", "deny"):
        raise PlanError(f"{where}.unpaid", f"must be charge or deny, not {unpaid!r}")
    return SubscriptionPlan(fee=_money(table, "fee", where, currency), unpaid=unpaid, **common)


def parse_plans(tables: dict[str, Any], where: str = "plans") -> dict[str, UsagePlan]:
    """Every `[plans.NAME]` table of a config, by name."""
    if not isinstance(tables, dict):
        raise PlanError(where, "expected a table of plans")
    return {name: parse_plan(name, t, where=f"{where}.{name}") for name, t in tables.items()}
