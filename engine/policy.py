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
