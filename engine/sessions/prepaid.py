"""Prepaid maths: what a time in control costs at most under a usage plan, and so
the longest time a prepaid account's funds pay for (the limit `Snapshot.check`
grants, engine/sessions/policy.py). Integers of micro-units throughout; see
docs/billing.md ("Prepaid balances and limits").
"""
from __future__ import annotations

from engine.accounting.plans import DEN, GraduatedPlan, PerUnitPlan, SubscriptionPlan, VolumePlan

# A limit ends this long before the boundary of the last increment the funds
# pay for, so the segment is closed (and rounded up) within that increment.
GUARD = 0.25
# Funds that last longer than this are no limit at all.
HORIZON = 7 * 86400


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def segment_cost(plan, q: int, prior_period: int = 0) -> int:
    """An upper bound (micro-units) of what one segment billed as `q` whole
    seconds costs under `plan`, connect fee and minimum included.

    Exact for per-unit plans (with the period's usage so far for a cap). For
    tiered plans the usage already rated this period or session is not known
    to the engine: tiers whose price never rises are priced from their first
    unit (the dearest), other tiered and volume plans at their dearest price
    for every unit plus every flat amount."""
    if q <= 0:
        return 0
    if isinstance(plan, PerUnitPlan):
        return plan.rate(q, prior_period=prior_period, segment=True).amount
    if isinstance(plan, (GraduatedPlan, VolumePlan)):
        tiers = plan.tiers
        prices = [t.price * t.scale for t in tiers]
        falling = all(a >= b for a, b in zip(prices, prices[1:])) and \
            not any(t.flat for t in tiers[1:])
        if isinstance(plan, GraduatedPlan) and falling and plan.cap is None:
            return plan.rate(q, segment=True).amount
        top = max(prices)
        if plan.cap is not None and plan.at_cap == "overage":
            top = max(top, plan.overage_scaled)
        num = q * top + sum(t.flat for t in tiers) * DEN + plan.connect_fee * DEN
        return max(_ceil_div(num, DEN), plan.minimum)
    return plan.rate(q, prior_period=prior_period, segment=True).amount


def affordable(plan, funds: int, prior_period: int = 0, horizon: int = HORIZON) -> int | None:
    """The longest billed time (whole seconds, on the plan's increment grid)
    whose segment cost stays within `funds` micro-units: 0 when not even the
    first increment (or the connect fee) is paid for, None when the funds
    last beyond `horizon` seconds (or time costs nothing)."""
    if isinstance(plan, SubscriptionPlan) or not plan.is_time:
        # Time is free within a paid subscription period; a per-action plan
        # prices a segment once, whatever its length.
        if isinstance(plan, SubscriptionPlan):
            return None
        cost = plan.rate(1, prior_period=prior_period, segment=True).amount
        return None if cost <= funds or cost == 0 else 0
    inc = plan.increment
    lo_k = 0 if inc.first > 0 else 1

    def q(k: int) -> int:
        return inc.first + k * inc.next

    def ok(k: int) -> bool:
        cost = segment_cost(plan, q(k), prior_period)
        return cost <= funds or cost == 0       # free time needs no funds

    if not ok(lo_k):
        return 0
    hi_k = max(lo_k, (horizon - inc.first) // inc.next)
    if ok(hi_k):
        return None
    lo = lo_k
    while hi_k - lo > 1:     # ok(lo), not ok(hi_k): the costs never fall as q grows
        mid = (lo + hi_k) // 2
        if ok(mid):
            lo = mid
        else:
            hi_k = mid
    return q(lo)


def limit_seconds(billed: int | None) -> float | None:
    """The time limit for `billed` affordable seconds: a guard before the
    boundary, so the segment is rounded up to `billed` at most."""
    if billed is None:
        return None
    return max(billed - GUARD, billed * 0.5)
