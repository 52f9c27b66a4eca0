"""The rater: prices metered segments and actions with the right plan.

The plan of a line is the account's own plan for the module (or
module:action), else the module's listing default, else the platform
default (see `BillingConfig.plan_for`). The rater keeps the period state
plans need: usage so far per (account, target, period), where target is the
module for time in control and "module:action" for actions, plus the
subscription fees already posted. A line's period is that of the wall-clock
time its segment began (or of its action).

With a shared PostgreSQL ledger (`shared`, engine/accounting/ledger_pg.py
`PeriodUsage`), the lines of plans that count the period (a cap, period tiers,
volume tiers) are priced from the usage of every node's accountant, so a cluster's
caps and tiers count its total, not each node's.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import msgpack

from engine.accounting.config import BillingConfig, PeriodClock
from engine.accounting.ledger import Line
from engine.accounting.money import split_share
from engine.common.levels import OFFER
from engine.accounting.meter import Action, OpenSession, Segment
from engine.accounting.plans import (DEN, NS, UNIT_SCALE, GraduatedPlan, PerUnitPlan,
                                     SubscriptionPlan, UsagePlan, VolumePlan)
from engine.common import clock

__all__ = ["Rater", "usage_key"]

log = logging.getLogger("baton.accountant")

_SEP = "\x1f"
# A session's own usage (`OpenSession.usage`, for tiers counted per session)
# is kept per paying account: after a payer change (a calling card's PIN) the
# new account's tiers start at its first unit.
SK = _SEP
_new = tuple.__new__


def usage_key(account: str, target: str, period: str) -> str:
    """The state-table key of a period usage counter."""
    return f"{account}{_SEP}{target}{_SEP}{period}"


class Rater:
    """Turns Segment and Action events into ledger Lines."""

    def __init__(self, book: BillingConfig) -> None:
        self.book = book
        self.clock = PeriodClock(book.period)
        self.usage: dict[tuple[str, str, str], int] = {}
        self.fees: set[str] = set()
        self.dirty: set[tuple[str, str, str]] = set()
        self.dirty_fees: set[str] = set()
        self._ctx: dict[tuple[str, str, str], tuple] = {}
        # The plan each (account, target) was last rated with, for cap reports.
        self.last_plan: dict[tuple[str, str], UsagePlan] = {}
        self.shared = None      # a cluster's period usage (ledger_pg.PeriodUsage), or None

    def _prior(self, plan: UsagePlan, key: str, uk: tuple[str, str, str], q: int) -> int:
        """The period's usage before a line: this accountant's count, or, for a plan
        that counts the period, the cluster's (the line's quantity claimed with it)."""
        shared = self.shared
        if shared is not None and (plan.cap is not None or plan.__class__ is VolumePlan or (
                plan.__class__ is GraduatedPlan and plan.tier_scope == "period")):
            return shared.claim(key, uk[0], uk[1], uk[2], q)
        return self.usage.get(uk, 0)

    # -- state ---------------------------------------------------------------
    def load(self, usage: dict[tuple[str, str, str], int], fees: Iterable[str]) -> None:
        """Restore period usage counters and the keys of posted fees."""
        self.usage.update(usage)
        self.fees.update(fees)

    def take_dirty(self) -> dict[tuple[str, str], bytes]:
        """State rows of the usage counters and fees changed since the last call."""
        pack = msgpack.packb
        out = {("usage", usage_key(*k)): pack(self.usage[k]) for k in self.dirty}
        for key in self.dirty_fees:
            out[("fee", key)] = b"\x01"
        self.dirty = set()
        self.dirty_fees = set()
        return out

    @staticmethod
    def parse_state(rows: dict[tuple[str, str], bytes]) -> tuple[dict[tuple[str, str, str], int],
                                                                 set[str]]:
        """Usage counters and posted fee keys from the state rows of `take_dirty`."""
        usage, fees = {}, set()
        for (kind, key), value in rows.items():
            if kind == "usage":
                a, t, p = key.split(_SEP)
                usage[(a, t, p)] = msgpack.unpackb(value)
            elif kind == "fee":
                fees.add(key)
        return usage, fees

    # -- rating ----------------------------------------------------------------
    def rate(self, events: Iterable[object], out: list[Line]) -> None:
        """Rate the Segment and Action events among `events` into `out`.

        The per-unit time plan without a cap (nearly every segment) is rated
        inline here, with the same integer arithmetic as `rate_segment`: this
        loop runs once per transition.
        """
        ctxs = self._ctx
        usage = self.usage
        dirty_add = self.dirty.add
        clock = self.clock
        append = out.append
        for ev in events:
            cls = ev.__class__
            if cls is not Segment:
                if cls is Action:
                    self.rate_action(ev, out)       # type: ignore[arg-type]
                continue
            node, seq, session, account, module, level, start, end, wall, _ew, o = ev
            if level == OFFER:
                continue                            # an offer not taken (yet) costs nothing
            ctx = ctxs.get((account, module, level)) or self._context(account, module, level)
            fast = ctx[5]
            if fast is None or seq is None:
                self.rate_segment(ev, out)          # type: ignore[arg-type]
                continue
            first_ns, next_ns, first, nxt, scaled, connect, minimum, unit, name, price = fast
            ns = end - start
            if ns <= 0:
                q = 0
            elif ns <= first_ns:
                q = first
            else:
                q = first + -(-(ns - first_ns) // next_ns) * nxt
            amount = (2 * (q * scaled + connect) + DEN) // (2 * DEN)
            if amount < minimum:
                amount = minimum
            period = clock._label if clock._lo <= wall < clock._hi else clock.of(wall)
            uk = (account, module, period)
            usage[uk] = usage.get(uk, 0) + q
            dirty_add(uk)
            if o is not None:
                u = o.usage
                sk = account + SK + module
                u[sk] = u.get(sk, 0) + q
                o.charge(account, amount)
            sn = ctx[3]
            append(_new(Line, (f"{node}:{seq}", "usage", node, seq, session, account, module,
                               "time", level, period, wall, ns, q, unit, name, price, amount,
                               ctx[1], ctx[2],
                               (2 * amount * sn + ctx[4]) // (2 * ctx[4]) if sn else 0,
                               None, "")))

    def _paid(self, account: str, module: str, plan: SubscriptionPlan, period: str, wall: int,
              node: str, seq: int | None, session: str, out: list[Line]) -> bool:
        """Whether the subscription's period is paid; posts the fee when the
        plan charges it at the period's first use."""
        if self.book.subscription_paid_externally(account, period):
            return True
        key = f"sub:{account}:{plan.name}:{period}"
        if key in self.fees:
            return True
        if plan.unpaid == "deny":
            return False
        self.fees.add(key)
        self.dirty_fees.add(key)
        vendor, share = self.book.vendor_of(module)
        out.append(Line(key, "fee", node, seq, session, account, module, "subscription", "",
                        period, wall, 1, 1, "period", plan.name, plan.fee, plan.fee,
                        self.book.account(account).currency, vendor, split_share(plan.fee, share)))
        return True

    def _context(self, account: str, module: str, level: str) -> tuple:
        """What rating a segment of (account, module, level) needs, looked up
        once: plan, currency, vendor, share, and for the common per-unit time
        plan without a cap the constants of its integer fast path."""
        book = self.book
        plan = book.plan_for(account, module, level)
        vendor, share = book.vendor_of(module)
        fast = None
        if plan.__class__ is PerUnitPlan and plan.cap is None and plan.is_time:
            inc = plan.increment
            fast = (inc.first * NS, inc.next * NS, inc.first, inc.next,
                    plan.price * UNIT_SCALE[plan.unit], plan.connect_fee * DEN, plan.minimum,
                    plan.unit, plan.name, plan.price)
        ctx = (plan, book.account(account).currency, vendor, share.numerator, share.denominator,
               fast)
        self._ctx[(account, module, level)] = ctx
        return ctx

    def rate_segment(self, seg: Segment, out: list[Line]) -> None:
        """Rate one segment of time in control."""
        node, seq, session, account, module, level, start, end, wall, _end_wall, o = seg
        if level == OFFER:
            return
        ctx = self._ctx.get((account, module, level)) or self._context(account, module, level)
        fast = ctx[5]
        if fast is None:
            self._rate_segment(seg, out)
            return
        # The per-unit plan inline: the same integer arithmetic as PerUnitPlan.rate.
        first_ns, next_ns, first, nxt, scaled, connect, minimum, unit, name, price = fast
        ns = end - start
        if ns <= 0:
            q = 0
        elif ns <= first_ns:
            q = first
        else:
            q = first + -(-(ns - first_ns) // next_ns) * nxt
        amount = (2 * (q * scaled + connect) + DEN) // (2 * DEN)
        if amount < minimum:
            amount = minimum
        clock = self.clock
        period = clock._label if clock._lo <= wall < clock._hi else clock.of(wall)
        uk = (account, module, period)
        usage = self.usage
        usage[uk] = usage.get(uk, 0) + q
        self.dirty.add(uk)
        if o is not None:
            u = o.usage
            sk = account + SK + module
            u[sk] = u.get(sk, 0) + q
            o.charge(account, amount)
        sn, sd = ctx[3], ctx[4]
        out.append(_new(Line, (f"{node}:{seq}" if seq is not None else seg.key, "usage",
                               node, seq, session, account, module, "time", level,
                               period, wall, ns, q, unit, name, price, amount, ctx[1], ctx[2],
                               (2 * amount * sn + sd) // (2 * sd) if sn else 0, None, "")))

    def _rate_segment(self, seg: Segment, out: list[Line]) -> None:
        account, module = seg.account, seg.module
        book = self.book
        plan = book.plan_for(account, module, seg.level)
        ns = seg.end_mono - seg.start_mono
        q = plan.segment_quantity(ns)
        period = self.clock.of(seg.start_wall)
        uk = (account, module, period)
        prior = self._prior(plan, seg.key, uk, q)
        o = seg.owner
        sk = account + SK + module
        prior_s = o.usage.get(sk, 0) if o is not None else 0
        paid = True
        if plan.__class__ is SubscriptionPlan:
            paid = self._paid(account, module, plan, period, seg.start_wall, seg.node, seg.seq,
                              seg.session, out)
        ch = plan.rate(q, prior_period=prior, prior_session=prior_s, segment=True, paid=paid)
        self.usage[uk] = prior + q
        self.dirty.add(uk)
        if plan.cap is not None:
            self.last_plan[(account, module)] = plan
        amount = ch.amount
        if o is not None:
            o.usage[sk] = prior_s + q
            o.charge(account, amount)
        vendor, share = book.vendor_of(module)
        out.append(Line(seg.key, "usage", seg.node, seg.seq, seg.session, account, module,
                        "time", seg.level, period, seg.start_wall, ns, q, plan.unit, plan.name,
                        ch.unit_price, amount, book.account(account).currency, vendor,
                        split_share(amount, share) if share else 0, None, ch.note))

    def rate_action(self, act: Action, out: list[Line]) -> None:
        """Rate one counted action (its count is the quantity): by the plan the
        record names when this config has it (an API key's), else by the
        account's, the listing's or the platform's plan. An action with a
        price is a fee (an API key's top-up); one with a ledger key of its own
        is rated once, however often it was stamped."""
        account, module = act.account, act.module
        book = self.book
        if act.ledger_key is not None:
            if act.ledger_key in self.fees:
                return
            self.fees.add(act.ledger_key)
            self.dirty_fees.add(act.ledger_key)
        if act.price is not None:
            self._rate_fee_action(act, out)
            return
        plan = book.plans.get(act.plan) if act.plan else None
        if plan is None:
            plan = book.plan_for(account, module, "", act.action)
        target = f"{module}:{act.action}"
        wall = act.wall_ns or clock.wall_ns()
        period = self.clock.of(wall)
        uk = (account, target, period)
        q = act.count
        prior = self._prior(plan, act.key, uk, q)
        o = act.owner
        sk = account + SK + target
        prior_s = o.usage.get(sk, 0) if o is not None else 0
        paid = True
        if plan.__class__ is SubscriptionPlan:
            paid = self._paid(account, module, plan, period, wall, act.node, act.seq,
                              act.session, out)
        ch = plan.rate(q, prior_period=prior, prior_session=prior_s, segment=False, paid=paid)
        self.usage[uk] = prior + q
        self.dirty.add(uk)
        if plan.cap is not None:
            self.last_plan[(account, target)] = plan
        if o is not None:
            o.usage[sk] = prior_s + q
            o.charge(account, ch.amount)
        vendor, share = book.vendor_of(module)
        out.append(Line(act.key, "action", act.node, act.seq, act.session, account, module,
                        act.action, "", period, wall, act.count, q, plan.unit, plan.name,
                        ch.unit_price, ch.amount, book.account(account).currency, vendor,
                        split_share(ch.amount, share) if share else 0, None, ch.note))

    def _rate_fee_action(self, act: Action, out: list[Line]) -> None:
        account, module = act.account, act.module
        wall = act.wall_ns or clock.wall_ns()
        period = self.clock.of(wall)
        target = f"{module}:{act.action}"
        uk = (account, target, period)
        self.usage[uk] = self.usage.get(uk, 0) + act.count
        self.dirty.add(uk)
        amount = act.price * act.count
        if act.owner is not None:
            act.owner.charge(account, amount)
        vendor, share = self.book.vendor_of(module)
        out.append(Line(act.key, "fee", act.node, act.seq, act.session, account, module,
                        act.action, "", period, wall, act.count, act.count, "action",
                        act.plan or act.action, act.price, amount,
                        self.book.account(account).currency, vendor,
                        split_share(amount, share) if share else 0, None, ""))

    # -- live sessions -------------------------------------------------------------
    def running_cost(self, o: OpenSession, now_mono_ns: int, payer_only: bool = False) -> int:
        """Micro-units a live session has cost so far: its posted lines plus
        its current segment rated up to the last completed billing increment
        (with the connect fee, the minimum, and a subscription fee the segment
        would trigger). `payer_only`: only what its current payer was charged
        (the posted lines of earlier payers left out). Changes nothing."""
        total = o.charged_by.get(o.account, 0) if payer_only else o.charged
        if not o.module or o.level == OFFER:
            return total
        plan = self.book.plan_for(o.account, o.module, o.level)
        elapsed = max(0, now_mono_ns - o.seg_mono)
        q = plan.increment.completed(elapsed) if plan.is_time else 1
        period = self.clock.of(o.seg_wall or clock.wall_ns())
        prior = self.usage.get((o.account, o.module, period), 0)
        paid = True
        if isinstance(plan, SubscriptionPlan):
            fees: list[Line] = []
            saved = (set(self.fees), set(self.dirty_fees))
            paid = self._paid(o.account, o.module, plan, period, o.seg_wall, o.node, None,
                              o.session, fees)
            self.fees, self.dirty_fees = saved
            total += sum(f.amount for f in fees)
        ch = plan.rate(q, prior_period=prior, prior_session=o.usage.get(o.account + SK + o.module, 0),
                       segment=True, paid=paid)
        return total + ch.amount

    def caps(self, period: str) -> dict[str, dict[str, dict[str, object]]]:
        """Per account, per capped target used this period: used, cap, at_cap
        and whether the cap is reached."""
        out: dict[str, dict[str, dict[str, object]]] = {}
        if self.shared is not None:
            # The cluster's counters (every node's rated usage): what the policy denies on.
            try:
                for uk, used in self.shared.used(period).items():
                    if used > self.usage.get(uk, 0):
                        self.usage[uk] = used
            except Exception as exc:
                log.warning("the cluster's period usage cannot be read: %s", exc)
        for (account, target, p), used in self.usage.items():
            if p != period:
                continue
            plan = self.last_plan.get((account, target)) or self.plan_of_target(account, target)
            if plan.cap is None:
                continue
            out.setdefault(account, {})[target] = {
                "used": used, "cap": plan.cap, "at_cap": plan.at_cap, "reached": used >= plan.cap}
        return out

    def plan_of_target(self, account: str, target: str) -> UsagePlan:
        """The plan of a usage target (module, or module:action), level aside."""
        module, _, action = target.partition(":")
        return self.book.plan_for(account, module, "", action)
