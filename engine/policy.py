"""The policy hook asked before every transition.

The real policy engine (funds, paid periods, bans, allow-lists, caps) lives
with the accountant; the engine asks a local snapshot so the check costs no
round trip. `AllowAll` is the hook until one is configured.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str = ""
    limit: float | None = None   # seconds of use allowed, None for no limit


ALLOW = Decision(True)


class AllowAll:
    def check(self, session, node, module) -> Decision:
        return ALLOW


class Rules:
    """A simple local policy: deny lists and per-account module allow-lists.

    `deny_modules`: {account: [codes]}, `allow_modules`: {account: [codes]}
    (when present for an account, only those codes), `banned_callers`: [substrings
    of the From URI], `limits`: {code: seconds}.
    """

    def __init__(self, deny_modules=None, allow_modules=None, banned_callers=(), limits=None):
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


class Snapshot:
    """The accountant's policy snapshot (DATA/policy.json), re-read when it changes
    (checked at most once a second), in front of the local rules."""

    def __init__(self, path: str, rules=None, clock=None):
        import time

        self.path = path
        self.rules = rules or AllowAll()
        self.clock = clock or time.monotonic
        self.accounts: dict = {}
        self._mtime = None
        self._checked = -1e9

    def _refresh(self) -> None:
        import json
        import os

        now = self.clock()
        if now - self._checked < 1.0:
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

    def check(self, session, node, module) -> Decision:
        self._refresh()
        acc = self.accounts.get(session.account)
        if acc is not None:
            if acc.get("banned"):
                return Decision(False, f"account {session.account} is banned")
            if acc.get("out_of_funds"):
                return Decision(False, f"account {session.account} has no funds left")
            if module.code in acc.get("deny", ()):
                return Decision(False, f"{module.code}: cap reached or period not paid")
        return self.rules.check(session, node, module)
