"""The policy hook asked before every transition.

The real policy engine (funds, paid periods, bans, allow-lists, caps) lives
with the accountant; the engine asks a local snapshot so the check costs no
round trip. `AllowAll` is the hook until one is configured.

Prepaid balances and credit limits: when an account's snapshot entry has
`funds_left_micro`, `Snapshot.check` returns the longest time (`Decision.limit`,
seconds) that the funds allow in the target module, priced by the account's
usage plan for it (`BillingConfig.plan_for`, with its increment, minimum and
connect fee), and a warning time before the limit (`Decision.warn_before`).
The session cuts control off at the limit and warns before it (engine/sessions/session.py,
engine/sessions/warning.py). How the funds are counted is conservative on purpose; see
`Snapshot.available` and docs/billing.md ("Prepaid balances and limits"); what a time
in control costs at most, and so how long the funds last, is engine/sessions/prepaid.py.

In a cluster with `[cluster] reservations`, a prepaid grant or a capped module's time is
reserved in PostgreSQL first (engine/sessions/reservations.py): `Snapshot.check` then
returns a `Pending` decided off the event loop, and every other check stays synchronous.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

from engine.sessions.prepaid import GUARD, HORIZON, affordable, limit_seconds, segment_cost

log = logging.getLogger("baton.policy")

DEFAULT_WARN_BEFORE = 30.0


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str = ""
    limit: float | None = None   # seconds of use allowed, None for no limit
    warn_before: float = 0.0     # warn this many seconds before the limit (0: never)
    warning: str = ""            # spoken to the caller with the warning ("": nothing)
    voice: str = "en"
    cost: int = 0                # micro-units the limit may cost at most


ALLOW = Decision(True)


class Pending:
    """A decision that waits for the cluster's PostgreSQL (docs/cluster.md): what
    `Snapshot.check` (or `renew`) returns instead of a Decision when a reservation must be
    taken first. The reservation runs off the event loop; `then(fn)` calls `fn` with the
    Decision on the loop once it is known (a denial if the check failed); `await` gives it
    too. Other checks, and every check of a node without a cluster, return the Decision
    itself: a caller tests `decision.__class__ is Pending` and goes on at once otherwise.

    Invariant: `fn` is called once, on the loop, after the reservation was written (or
    failed)."""

    __slots__ = ("task",)

    def __init__(self, coro):
        self.task = asyncio.get_running_loop().create_task(coro)

    def then(self, fn) -> None:
        def done(task):
            try:
                result = task.result()
            except BaseException as exc:    # cancelled with the loop, or a bug: never allow
                if not isinstance(exc, asyncio.CancelledError):
                    log.error("policy check failed", exc_info=exc)
                result = Decision(False, "policy check failed")
            fn(result)
        self.task.add_done_callback(done)

    def __await__(self):
        return self.task.__await__()


def when_decided(decision, fn) -> None:
    """`fn(decision)` now, or once a Pending one is known."""
    if decision.__class__ is Pending:
        decision.then(fn)
    else:
        fn(decision)


class AllowAll:
    def check(self, session, node, module) -> Decision:
        return ALLOW


class Rules:
    """A simple local policy: deny lists and per-account module allow-lists.

    `deny_modules`: {account: [codes]}, `allow_modules`: {account: [codes]}
    (when present for an account, only those codes), `banned_callers`: [substrings
    of the From URI], `limits`: {code: seconds}. The prepaid warning settings
    of `[policy]` (`warn_before`, `warning_text`, `warning_voice`, `accounts`)
    are read by `Snapshot`, not here.
    """

    def __init__(self, deny_modules=None, allow_modules=None, banned_callers=(), limits=None,
                 warn_before=None, warning_text=None, warning_voice=None, accounts=None):
        self.deny_modules = {k: set(v) for k, v in (deny_modules or {}).items()}
        self.allow_modules = {k: set(v) for k, v in (allow_modules or {}).items()}
        self.banned_callers = tuple(banned_callers)
        self.limits = dict(limits or {})

    def check(self, session, node, module) -> Decision:
        code = module.code
        if any(b in session.from_uri for b in self.banned_callers):
            return Decision(False, "caller banned")
        if code in self.deny_modules.get(session.account, ()):
            return Decision(False, f"module {code} denied for account {session.account}")
        allowed = self.allow_modules.get(session.account)
        if allowed is not None and code not in allowed:
            return Decision(False, f"module {code} not in the allow-list of {session.account}")
        limit = self.limits.get(code)
        return Decision(True, limit=limit) if limit is not None else ALLOW


# -- the snapshot ---------------------------------------------------------------------

class _CapGrant:
    """A session's grant of a capped module's time from the cluster (docs/cluster.md):
    the units it held before its current span (`base`), the units it holds now, and the
    rest of its decision (the limit set by funds or rules, its warning)."""

    __slots__ = ("target", "period", "cap", "plan", "base", "units", "other", "decision",
                 "first")

    def __init__(self, target, period, cap, plan, base, units, first):
        self.target, self.period, self.cap, self.plan = target, period, cap, plan
        self.base, self.units, self.first = base, units, first
        self.other: float | None = None     # the limit of funds or rules (seconds)
        self.decision: Decision | None = None

    def seconds(self) -> float:
        """Seconds of the current span the units held pay for: the largest billed
        quantity on the plan's increment grid within them, less the guard."""
        room = self.units - self.base
        inc = self.plan.increment
        if room < inc.first:
            return 0.0
        return inc.first + (room - inc.first) // inc.next * inc.next - GUARD



class _Hold:
    """What the engine counts against an account beyond the snapshot for one
    session: the cost of its granted limit, and costs already incurred that
    the snapshot may not show yet, each with the ring seq that covers it."""

    __slots__ = ("session", "reserved", "account", "pending", "split")

    def __init__(self, session):
        self.session = session
        self.reserved = 0
        self.account = session.account      # whose funds `reserved` holds
        # (ring seq, micro-units, account): a session's payer may change.
        self.pending: list[tuple[int, int, str]] = []
        self.split = False                  # the payer just changed: no closing cost to add


class Snapshot:
    """The accountant's policy snapshot (DATA/policy.json), re-read when it changes
    (checked at most every `interval` seconds), in front of the local rules."""

    interval = 0.25

    def __init__(self, path: str, rules=None, clock=None):
        self.path = path
        self.rules = rules or AllowAll()
        self.clock = clock or time.monotonic
        self.accounts: dict = {}
        self.position: int | None = None    # the last ring seq the snapshot covers
        self.node: str = ""
        self.generated_wall_ns = 0
        self._mtime = None
        self._checked = -1e9
        self._book = None
        self._book_of = None
        self._holds: dict[str, _Hold] = {}
        self.cluster = None     # engine/sessions/reservations.py: funds shared by a cluster
        self.cap_slice = 60     # seconds of a capped module reserved per grant ([cluster])
        self._caps: dict[str, _CapGrant] = {}

    # -- reading ----------------------------------------------------------------------
    def _refresh(self, force: bool = False) -> None:
        import json
        import os

        now = self.clock()
        if not force and now - self._checked < self.interval:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return
        if mtime == self._mtime:
            return
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return  # a snapshot being replaced: keep the last good one
        self._mtime = mtime
        self.accounts = data.get("accounts", {})
        self.position = data.get("position")
        self.node = data.get("node") or ""
        self.generated_wall_ns = data.get("generated_wall_ns") or 0

    def refresh(self) -> None:
        """Re-read the snapshot file now if it changed."""
        self._refresh(force=True)

    def covers(self, seq: int | None, node: str = "") -> bool:
        """True when the snapshot was written after the accountant read ring
        record `seq` (of `node`, when given), so its charges include it."""
        if seq is None:
            return True
        if self.position is None or (node and self.node and node != self.node):
            return False
        return self.position >= seq

    def account(self, account: str) -> dict | None:
        """The snapshot's entry of an account (balance, funds left, ...), or None."""
        return self.accounts.get(account)

    def billing(self, engine):
        """The billing config (plans) of the engine's TOML, parsed once per config."""
        cfg = engine.cfg
        if self._book_of is not cfg:
            from engine.accounting.config import BillingConfig

            self._book_of = cfg
            try:
                self._book = BillingConfig.from_dict(cfg.raw)
            except ValueError as exc:
                log.error("billing config unusable, prepaid limits are off: %s", exc)
                self._book = None
        return self._book

    # -- funds ------------------------------------------------------------------------
    def _ring_seq(self, engine) -> int | None:
        writer = getattr(engine.stamper, "writer", None)
        return writer.next_seq if writer is not None else None

    def available(self, session, funds: int) -> int:
        """Funds an account has for a new grant to `session`: the snapshot's
        funds left (posted charges and the current segments of live sessions
        already taken off), minus, for the same account,
        - what every other live session's granted limit may still cost (its
          reservation, counted whole even though the snapshot already took off
          part of it),
        - costs the engine knows of and the snapshot may not show yet (segments
          closed, sessions ended since), until a snapshot that covers them,
        - the closing cost of the session's own current segment, rated up to
          now with its increment rounding (counted twice for the part the
          snapshot shows).
        So a session may get less time than the funds allow, never more."""
        engine = session.engine
        account = session.account
        node = engine.stamper.node_id
        seq_now = self._ring_seq(engine)
        for sid, h in list(self._holds.items()):
            s = h.session
            if s.ended and h.reserved:
                # Its final segments are rated by now or soon: keep counting the
                # reservation (it bounds them) until a snapshot covers its end.
                h.pending.append((seq_now - 1 if seq_now else 0, h.reserved, h.account))
                h.reserved = 0
            if h.pending:
                h.pending = [p for p in h.pending if not self.covers(p[0], node)]
            if s.ended and not h.pending:
                del self._holds[sid]
                continue
            funds -= sum(p[1] for p in h.pending if p[2] == account)
            if s is not session and h.account == account:
                funds -= h.reserved
        funds -= self._current_cost(session)
        return funds

    def _current_cost(self, session) -> int:
        ctl = session.control
        if ctl is None or not ctl.active or ctl.span is None or session.module is None:
            return 0
        book = self.billing(session.engine)
        if book is None:
            return 0
        plan = book.plan_for(session.account, session.module.code, session.module.level)
        if not plan.is_time:
            return 0
        q = plan.segment_quantity(max(0, time.monotonic_ns() - ctl.span.start_mono))
        return segment_cost(plan, q)

    def limit_for(self, session, code: str, level: str, funds: int | None = None):
        """(billed seconds the account can afford in module `code` now or None
        for no limit, the funds counted, the plan); `funds` defaults to what
        `available` counts."""
        acc = self.accounts.get(session.account)
        book = self.billing(session.engine)
        if acc is None or acc.get("funds_left_micro") is None or book is None:
            return None, None, None
        if funds is None:
            funds = self.available(session, int(acc["funds_left_micro"]))
        plan = book.plan_for(session.account, code, level)
        prior = 0
        cap = (acc.get("caps") or {}).get(code)
        if cap:
            prior = int(cap.get("used", 0))
        return affordable(plan, funds, prior), funds, plan

    def _grant(self, session, cost: int, split: bool = False) -> None:
        """Remember the new grant of `session` and the closing cost of its
        current segment, which the transition about to be stamped closes."""
        h = self._holds.get(session.id)
        # Just after a payer change the segment was closed for the previous
        # payer (payer_changing); the new one has not run yet.
        closing = 0 if split else self._current_cost(session)
        if h is None:
            if not cost and not closing:
                return
            h = self._holds[session.id] = _Hold(session)
        h.reserved = cost
        h.account = session.account
        if closing:
            seq = self._ring_seq(session.engine)
            h.pending.append((seq if seq is not None else 0, closing, session.account))

    def payer_changing(self, session) -> None:
        """`session`'s payer is about to change (Session.set_account): the
        current segment closes for the account paying now, which also no
        longer holds the reservation of its grant."""
        closing = self._current_cost(session)
        h = self._holds.get(session.id)
        if h is None:
            if not closing:
                return
            h = self._holds[session.id] = _Hold(session)
        if closing:
            seq = self._ring_seq(session.engine)
            h.pending.append((seq if seq is not None else 0, closing, session.account))
        h.reserved = 0
        h.split = True

    # -- the check --------------------------------------------------------------------
    def check(self, session, node, module) -> Decision | Pending:
        """The Decision on giving `session` to `module` at `node`; a Pending one when a
        cluster's reservation must be taken first (a prepaid account's funds, a capped
        module's time): only those wait for PostgreSQL, off the event loop."""
        self._refresh()
        h = self._holds.get(session.id)
        split = h is not None and h.split
        if split:
            h.split = False
        acc = self.accounts.get(session.account)
        if acc is not None:
            if acc.get("banned"):
                return Decision(False, f"account {session.account} is banned")
            if acc.get("out_of_funds"):
                return Decision(False, f"account {session.account} has no funds left")
            if module.code in acc.get("deny", ()):
                return Decision(False, f"{module.code}: cap reached or period not paid")
        decision = self.rules.check(session, node, module)
        if not decision.allow:
            return decision
        if self.cluster is not None:
            try:
                capped = self._capped(session, module)
            except Exception:
                log.exception("session %s: no cap reservation for %s", session.id, module.code)
                return Decision(False, f"{module.code}: cap usage unavailable")
            shared = self._cluster_funds(session)
            if capped is not None or shared is not None:
                return Pending(self._check_cluster(session, node, module, decision, acc, split,
                                                   capped, shared))
        if acc is None or acc.get("funds_left_micro") is None:
            return decision
        try:
            billed, _funds, plan = self.limit_for(session, module.code, module.level)
        except Exception:
            # Never unlimited by accident: a limit that cannot be computed denies.
            log.exception("session %s: no prepaid limit for %s", session.id, module.code)
            return Decision(False, f"account {session.account}: limit unavailable")
        return self._limited(session, node, module, decision, billed, plan, split, None)

    def _limited(self, session, node, module, decision, billed, plan, split, grant) -> Decision:
        """The decision once the funds' limit (`billed` seconds, None: none) is known."""
        if plan is None:
            if grant is not None:
                grant.decision = decision
            return decision
        if billed == 0:
            return Decision(False, f"account {session.account}: funds left do not pay for the "
                                   f"first increment of {module.code}")
        limit = limit_seconds(billed)
        cost = segment_cost(plan, billed) if billed is not None else 0
        self._grant(session, cost, split)
        if grant is not None:
            grant.other = self._min(grant.other, limit)
        if decision.limit is not None and (limit is None or decision.limit < limit):
            limit = decision.limit
        if limit is None:
            return decision
        warn_before, text, voice = self.warning_settings(session, node)
        decision = Decision(True, decision.reason, limit, warn_before, text, voice, cost)
        if grant is not None:
            grant.decision = decision
        return decision

    async def _check_cluster(self, session, node, module, decision, acc, split, capped,
                             shared) -> Decision:
        """The rest of `check` when the cluster is asked: each reservation awaited on the
        Reservations' worker thread. A session that ended meanwhile gets a denial, and what
        was reserved for it is released (its node's accountant posts nothing more for it)."""
        grant = None
        if capped is not None:
            try:
                grant = await self._cluster_cap(session, module, *capped)
            except Exception:
                log.exception("session %s: no cap reservation for %s", session.id, module.code)
                return self._left(session) or Decision(False, f"{module.code}: cap usage "
                                                               "unavailable")
            if session.ended:
                return self._left(session)
            self._caps[session.id] = grant
            if grant.seconds() <= 0:
                return Decision(False, f"{module.code}: cap of account {session.account} "
                                       f"reached across the cluster")
            grant.other = decision.limit
            decision = dataclasses.replace(decision, limit=self._min(
                decision.limit, grant.seconds()))
        if shared is None and (acc is None or acc.get("funds_left_micro") is None):
            grant.decision = decision
            return decision
        try:
            if shared is not None:
                billed, plan = await self._cluster_limit(session, module, acc, shared)
            else:
                billed, _funds, plan = self.limit_for(session, module.code, module.level)
        except Exception:
            # Never unlimited by accident: a limit that cannot be computed denies.
            log.exception("session %s: no prepaid limit for %s", session.id, module.code)
            return self._left(session) or Decision(False, f"account {session.account}: "
                                                           "limit unavailable")
        if session.ended:
            return self._left(session)
        return self._limited(session, node, module, decision, billed, plan, split, grant)

    def _left(self, session) -> Decision | None:
        """`session` ended while the cluster was asked: release what it holds now (the
        engine's `session_ended` saw nothing to release then). None while it is live."""
        if not session.ended:
            return None
        self._caps.pop(session.id, None)
        res = self.cluster
        if res is not None and res.holds(session.id):
            seq = self._ring_seq(session.engine)
            res.run(res.ended, session.id, seq - 1 if seq is not None else None)
        return Decision(False, "the session ended during the policy check")

    @staticmethod
    def _min(a: float | None, b: float | None) -> float | None:
        return b if a is None else a if b is None else min(a, b)

    # -- a cluster's shared caps (docs/cluster.md) --------------------------------------
    def _capped(self, session, module):
        """(plan, period) of a module whose time is reserved from the cluster (a plan with
        a `cap` and `at_cap = "deny"`); None when the module has no such cap."""
        book = self.billing(session.engine)
        if book is None:
            return None
        plan = book.plan_for(session.account, module.code, module.level)
        if plan.cap is None or plan.at_cap != "deny" or not plan.is_time:
            return None
        from engine.accounting.config import PeriodClock
        from engine.common import clock

        return plan, PeriodClock(book.period).of(clock.wall_ns())

    async def _cluster_cap(self, session, module, plan, period) -> _CapGrant:
        """Reserve the next slice of a capped module's time from the cluster."""
        res = self.cluster
        key = (session.id, session.account, module.code, period)

        def reserve():             # on the worker thread, after any earlier job of the session
            base = res.units.get(key, 0)
            # A slice shorter than the first increment would never pay for it.
            return base, res.reserve_units(session.account, module.code, period, session.id,
                                           plan.cap, max(self.cap_slice, plan.increment.first))

        base, units = await res.run(reserve, grant=True)
        return _CapGrant(module.code, period, plan.cap, plan, base, units,
                         session.module is None)

    def renew(self, session, ctl) -> Pending | None:
        """`session` used up the limit of its current grant: when that limit was the
        cluster's cap slice, reserve the next one. None: the limit stands; else a Pending
        whose Decision is the new one (its limit counted from the start of the span, as
        at the grant), or None."""
        grant = self._caps.get(session.id)
        if (grant is None or grant.decision is None or self.cluster is None
                or session.module is None or session.module.code != grant.target):
            return None
        had = grant.seconds()
        if grant.other is not None and grant.other <= had:
            return None         # funds or rules, not the cap, set this limit
        return Pending(self._renew(session, grant, had))

    async def _renew(self, session, grant: _CapGrant, had: float) -> Decision | None:
        res = self.cluster
        try:
            units = await res.run(
                res.reserve_units, session.account, grant.target, grant.period, session.id,
                grant.cap, max(self.cap_slice, grant.plan.increment.next), grant=True)
        except Exception:
            log.exception("session %s: no cap reservation for %s", session.id, grant.target)
            return None
        if session.ended or self._caps.get(session.id) is not grant:
            self._left(session)
            return None
        grant.units = units
        now = grant.seconds()
        if now <= had:
            return None
        d = grant.decision
        limit = self._min(grant.other, now)
        # Warn only before the limit of funds (the cap's slices renew unheard).
        warn = d.warn_before if grant.other is not None and limit == grant.other else 0.0
        grant.decision = dataclasses.replace(d, limit=limit, warn_before=warn)
        return grant.decision

    def spent(self, session, ctl) -> float:
        """Seconds of the current span's limit used: from the span's start, or for the
        session's first module from the session's (the meter bills it from there)."""
        grant = self._caps.get(session.id)
        start = ctl.span.start_mono if ctl.span is not None else session.started_mono
        if grant is not None and grant.first:
            start = session.started_mono
        return max(0, time.monotonic_ns() - start) / 1e9

    def ended(self, session) -> None:
        """Forget a session's cap grant."""
        self._caps.pop(session.id, None)

    # -- a cluster's shared funds (docs/cluster.md) -------------------------------------
    def _cluster_funds(self, session) -> int | None:
        """The account's prepaid balance and credit when a cluster reserves them."""
        if self.cluster is None:
            return None
        book = self.billing(session.engine)
        if book is None:
            return None
        ab = book.account(session.account)
        if ab.prepaid_balance is None:
            return None
        return ab.prepaid_balance + (ab.credit_limit or 0)

    async def _cluster_limit(self, session, module, acc, total: int):
        """(billed seconds or None, plan) of a grant whose cost is reserved from the
        cluster's funds first; (0, plan) when nothing could be."""
        book = self.billing(session.engine)
        plan = book.plan_for(session.account, module.code, module.level)
        local = None
        if acc is not None and acc.get("funds_left_micro") is not None:
            local = self.available(session, int(acc["funds_left_micro"]))
        cap = ((acc or {}).get("caps") or {}).get(module.code)
        prior = int(cap.get("used", 0)) if cap else 0
        out = [0, 0]

        def grant(free: int) -> int:
            funds = out[1] = free if local is None else min(local, free)
            billed = out[0] = affordable(plan, funds, prior)
            if billed == 0:
                return 0
            return segment_cost(plan, billed if billed is not None else HORIZON)

        # `grant` runs on the worker thread under the row lock: it reads only the values
        # taken above.
        got = await self.cluster.run(self.cluster.reserve, session.account, session.id, total,
                                     grant, grant=True)
        if got is None:
            if out[0] is None:          # free time: nothing to reserve
                return None, plan
            return 0, plan
        if local is not None and not session.ended:
            # Other grants of the account on this node may have been taken while this one
            # waited: never more than the funds the node counts now.
            now = self.available(session, int(acc["funds_left_micro"]))
            if now < local:
                return affordable(plan, min(now, out[1]), prior), plan
        return out[0], plan

    def warning_settings(self, session, node) -> tuple[float, str, str]:
        """(warn_before, warning text, voice): the node's params `warn_before` /
        `warning_text`, else `[policy.accounts.ID]`, else `[policy]`."""
        pol = session.engine.cfg.policy or {}
        per = (pol.get("accounts") or {}).get(session.account) or {}
        params = getattr(node, "params", None) or {}

        def pick(key, default):
            for src in (params, per, pol):
                if key in src:
                    return src[key]
            return default

        try:
            warn_before = max(0.0, float(pick("warn_before", DEFAULT_WARN_BEFORE)))
        except (TypeError, ValueError):     # a node param no module checked
            warn_before = DEFAULT_WARN_BEFORE
        return warn_before, str(pick("warning_text", "")), str(pick("warning_voice", "en"))
