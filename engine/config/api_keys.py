"""API keys (`[api_keys.ID]`): bearer tokens that act for one account under a usage
agreement. Parsed and checked here with the rest of the config; metered by
`control.metering.ApiMeter`.

Config (checked by `load_api_keys`, errors name the key):

    [api_keys.partner1]
    account = "demo"
    token_sha256 = "9f86d0...e08"      # or token = "..." (16 characters at least)
    plan = "api-calls"                # [plans.NAME] pricing each call (optional)
    quota = 1000                      # calls per period
    period = "month"                  # month or day (UTC); default billing.period
    auto_top_up = { calls = 500, price = "5.00" }   # optional
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from engine.accounting.money import MoneyError, parse_money
from engine.accounting.plans import PlanError, parse_plan
from engine.common.errors import ConfigError

__all__ = ["ApiKey", "TopUp", "load_api_keys", "API_MODULE_PREFIX", "token_digest"]

API_MODULE_PREFIX = "baton.api."
MIN_TOKEN = 16
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEYS = ("account", "token", "token_sha256", "plan", "quota", "period", "auto_top_up",
         "description")


def token_digest(token: str) -> str:
    """The hex SHA-256 of a token, as `token_sha256` holds it."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TopUp:
    """An agreement's automatic top-up: `calls` more for `price` micro-units."""

    calls: int
    price: int


@dataclass(frozen=True)
class ApiKey:
    """One `[api_keys.ID]`: whose it is, how its calls are priced and limited."""

    id: str
    account: str
    digest: str                       # hex SHA-256 of the token
    quota: int
    period: str = "month"
    plan: str = ""
    currency: str = "USD"
    top_up: TopUp | None = None
    description: str = ""

    @property
    def module(self) -> str:
        """The module code its usage is stamped and invoiced under."""
        return API_MODULE_PREFIX + self.id


def load_api_keys(raw: dict, path: str = "<dict>") -> dict[str, ApiKey]:
    """Parse and check `[api_keys.ID]` tables of a config dict; ConfigError names the key."""
    tables = raw.get("api_keys", {})
    if not isinstance(tables, dict):
        raise ConfigError(path, "api_keys", "expected a table of API keys ([api_keys.ID])")
    accounts = raw.get("accounts", {}) if isinstance(raw.get("accounts", {}), dict) else {}
    billing = raw.get("billing", {}) if isinstance(raw.get("billing", {}), dict) else {}
    plans = raw.get("plans", {}) if isinstance(raw.get("plans", {}), dict) else {}
    default_period = billing.get("period", "month")
    default_currency = billing.get("currency", "USD")
    account_tokens = {t for a in accounts.values() if isinstance(a, dict)
                      for t in (a.get("api_tokens") or []) if isinstance(t, str)}
    keys: dict[str, ApiKey] = {}
    digests: dict[str, str] = {}
    for kid, t in tables.items():
        where = f"api_keys.{kid}"
        if not _KEY_ID.match(kid):
            raise ConfigError(path, where, "a key id is 1 to 64 letters, digits, _ or -")
        if not isinstance(t, dict):
            raise ConfigError(path, where, "expected a table")
        for k in t:
            if k not in _KEYS:
                raise ConfigError(path, f"{where}.{k}", f"unknown key (known: {', '.join(sorted(_KEYS))})")
        account = t.get("account")
        if not isinstance(account, str) or not account:
            raise ConfigError(path, f"{where}.account", "the account the key acts for is required")
        if account not in accounts:
            raise ConfigError(path, f"{where}.account", f"no account {account!r} in [accounts]")
        acc = accounts[account] if isinstance(accounts[account], dict) else {}
        currency = acc.get("currency", default_currency)
        if ("token" in t) == ("token_sha256" in t):
            raise ConfigError(path, where, "needs exactly one of token or token_sha256")
        if "token" in t:
            token = t["token"]
            if not isinstance(token, str) or len(token) < MIN_TOKEN:
                raise ConfigError(path, f"{where}.token", f"a string of at least {MIN_TOKEN} characters")
            if token in account_tokens:
                raise ConfigError(path, f"{where}.token", "is also an account's api_tokens entry")
            digest = token_digest(token)
        else:
            digest = t["token_sha256"]
            if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
                raise ConfigError(path, f"{where}.token_sha256",
                                  "64 hex digits: the SHA-256 of the token (sha256sum)")
            digest = digest.lower()
        if digest in digests:
            raise ConfigError(path, f"{where}.token", f"the same token as api_keys.{digests[digest]}")
        digests[digest] = kid
        quota = t.get("quota")
        if isinstance(quota, bool) or not isinstance(quota, int) or quota < 0:
            raise ConfigError(path, f"{where}.quota", "the calls allowed per period, an integer >= 0")
        period = t.get("period", default_period)
        if period not in ("month", "day"):
            raise ConfigError(path, f"{where}.period", f"month or day (UTC), not {period!r}")
        plan = t.get("plan", "")
        if plan:
            if not isinstance(plan, str) or plan not in plans:
                raise ConfigError(path, f"{where}.plan", f"no plan {plan!r} in [plans]")
            try:
                p = parse_plan(plan, plans[plan])
            except PlanError as exc:
                raise ConfigError(path, exc.key, exc.problem) from None
            if p.is_time:
                raise ConfigError(path, f"{where}.plan", f"plan {plan!r} prices time "
                                                         f"({p.unit}); an API plan counts calls "
                                                         "(unit = \"action\")")
            if p.currency != currency:
                raise ConfigError(path, f"{where}.plan", f"plan {plan!r} is priced in {p.currency}, "
                                                         f"but account {account} bills in {currency}")
        top_up = None
        if "auto_top_up" in t:
            tu = t["auto_top_up"]
            if not isinstance(tu, dict) or set(tu) - {"calls", "price"}:
                raise ConfigError(path, f"{where}.auto_top_up", "a table { calls = N, price = \"5.00\" }")
            calls = tu.get("calls")
            if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
                raise ConfigError(path, f"{where}.auto_top_up.calls",
                                  "the calls one top-up adds, an integer >= 1")
            if "price" not in tu:
                raise ConfigError(path, f"{where}.auto_top_up.price", "the price of one top-up is required")
            try:
                price = parse_money(tu["price"], f"{where}.auto_top_up.price", currency=currency)
            except MoneyError as exc:
                raise ConfigError(path, exc.key, exc.problem) from None
            top_up = TopUp(calls, price)
        desc = t.get("description", "")
        if not isinstance(desc, str):
            raise ConfigError(path, f"{where}.description", "expected a string")
        keys[kid] = ApiKey(kid, account, digest, quota, period, plan, currency, top_up, desc)
    return keys
