"""Outbound permissions: which trunks, numbers and SIP hosts a session may dial.

Every path that places an outbound leg asks `permit` first: `baton.bridge` (so a
TwiML `<Dial>`, a `<Redirect>` to the bridge, an outlet naming a `sip:` URI, a
calling card and a vendor's `dial` all pass here), a vendor's `dial` and
`transfer` (with the vendor's own permissions too) and the gRPC `Originate`.
Deny by default: an account or vendor without `[accounts.ID.outbound]`
(`[vendors.ID.outbound]`) may use no trunk and dial only this engine's own
address. Premium-rate prefixes are refused even where their country is allowed,
unless `premium = true` or an `allow` entry names them (docs/security.md,
"Toll fraud").

`OPERATOR_PARAMS` are module parameters only the operator's TOML may set:
`operator_params` finds them in what a document, a vendor or an API caller passes.
"""
from __future__ import annotations

import collections
import logging
import re
from dataclasses import dataclass

log = logging.getLogger("baton.dialing")

# Premium-rate and revenue-share ranges, refused unless allowed (docs/security.md).
PREMIUM_PREFIXES = (
    "+1900", "+1976",                      # NANP premium rate
    "+4487", "+449", "+4470",              # UK revenue share, premium, personal numbers
    "+3389",                               # France: premium rate (08 9x)
    "+49137", "+49900",                    # Germany: televoting, premium rate
    "+39899", "+3489", "+3280", "+3290",   # Italy, Spain, Belgium premium rate
    "+870", "+881", "+882", "+883",        # Inmarsat, satellite, international networks
    "+979", "+808",                        # international premium rate, shared cost
)
# Module parameters that configure the engine rather than describe the call.
OPERATOR_PARAMS = frozenset({"trunk", "sounds_dir", "timeout", "connect_timeout",
                             "fallback_url", "fallback_method"})
_NUMBER = re.compile(r"\+?[0-9*#]{1,32}")


class OutboundDenied(Exception):
    """A dial attempt the account's or vendor's outbound permissions refuse;
    `kind` is the metrics label (trunk, destination, premium, sip_host,
    concurrent, spend)."""

    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind = kind


@dataclass(frozen=True)
class Outbound:
    """One account's (or vendor's) `outbound` table."""
    trunks: frozenset = frozenset()
    allow: tuple = ()
    deny: tuple = ()
    premium: bool = False
    sip_hosts: tuple = ()
    max_concurrent: int | None = None
    max_spend_per_hour: int | None = None   # micro-units of the account's currency
    trunk_order: tuple = ()     # the same trunks in the config's order (the first is the default)


DENY_ALL = Outbound()

KEYS = {
    "trunks": ("list of strings", "[trunks.NAME] this account may dial through (default: none; "
                                  "the first is the REST API's trunk when a call names none)"),
    "allow": ("list of strings", "E.164 prefixes it may dial through a trunk, e.g. \"+1\", "
                                 "\"+44\" (default: none)"),
    "deny": ("list of strings", "E.164 prefixes refused even when allowed, e.g. \"+1268\""),
    "premium": ("bool", "allow the built-in premium-rate prefixes too (default false)"),
    "sip_hosts": ("list of strings", "SIP hosts it may dial directly: HOST, HOST:PORT or "
                                     ".DOMAIN (default: only this engine's own address)"),
    "max_concurrent": ("integer", "outbound calls up at once (accounts only; default: no cap)"),
    "max_spend_per_hour": ("string", "new outbound calls are refused once the account spent "
                                     "this much in the last hour, e.g. \"5.00\" (accounts only)"),
}


def parse(table, where: str, account: bool = True) -> Outbound:
    """An `outbound` table; ValueError("KEY: problem") names the bad key."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table (keys: {', '.join(KEYS)})")
    for k in table:
        if k not in KEYS:
            raise ValueError(f"{where}.{k}: unknown key (known: {', '.join(sorted(KEYS))})")
        if not account and k in ("max_concurrent", "max_spend_per_hour"):
            raise ValueError(f"{where}.{k}: an account's limit, not a vendor's")

    def strings(key):
        v = table.get(key, [])
        if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
            raise ValueError(f"{where}.{key}: a list of strings")
        return [s.strip() for s in v]

    prefixes = {}
    for key in ("allow", "deny"):
        out = []
        for p in strings(key):
            n = normalize(p)
            if n is None or not n.startswith("+"):
                raise ValueError(f"{where}.{key}: {p!r} is not an E.164 prefix such as \"+44\"")
            out.append(n)
        prefixes[key] = tuple(out)
    premium = table.get("premium", False)
    if not isinstance(premium, bool):
        raise ValueError(f"{where}.premium: true or false")
    conc = table.get("max_concurrent")
    if conc is not None and (isinstance(conc, bool) or not isinstance(conc, int) or conc < 0):
        raise ValueError(f"{where}.max_concurrent: a whole number of calls, 0 or more")
    spend = table.get("max_spend_per_hour")
    micro = None
    if spend is not None:
        from decimal import Decimal, InvalidOperation

        try:
            amount = Decimal(str(spend)) if isinstance(spend, str) else None
        except InvalidOperation:
            amount = None
        if amount is None or not amount.is_finite() or amount < 0:
            raise ValueError(f"{where}.max_spend_per_hour: an amount such as \"5.00\"")
        micro = int(amount * 1_000_000)
    return Outbound(trunks=frozenset(strings("trunks")), trunk_order=tuple(strings("trunks")),
                    allow=prefixes["allow"],
                    deny=prefixes["deny"], premium=premium,
                    sip_hosts=tuple(h.lower() for h in strings("sip_hosts")),
                    max_concurrent=conc, max_spend_per_hour=micro)


def normalize(number: str) -> str | None:
    """A dialled number without `tel:` and visual separators, `00` read as `+`;
    None when it is no number."""
    n = re.sub(r"[\s\-.()]", "", number.strip())
    if n.lower().startswith("tel:"):
        n = n[4:]
    if n.startswith("00"):
        n = "+" + n[2:]
    return n if _NUMBER.fullmatch(n) else None


def operator_params(params) -> list[str]:
    """The operator-only parameters in `params` (from a document, vendor or API caller)."""
    return sorted(k for k in (params or {}) if k in OPERATOR_PARAMS)


def check(perm: Outbound, to: str, trunk: str | None, own: tuple) -> None:
    """Raise OutboundDenied unless `perm` lets `to` be dialled (through `trunk`).
    `own` is (host, port) of this engine."""
    if trunk:
        if trunk not in perm.trunks:
            raise OutboundDenied("trunk", f"trunk {trunk!r} is not allowed")
        number = normalize(to)
        if number is None:
            raise OutboundDenied("destination", f"{to!r} is not a number to dial through a trunk")
        if any(number.startswith(d) for d in perm.deny):
            raise OutboundDenied("destination", f"{number} is a denied destination")
        allowed = [a for a in perm.allow if number.startswith(a)]
        if not allowed:
            raise OutboundDenied("destination", f"{number} is not an allowed destination")
        for p in PREMIUM_PREFIXES:
            if number.startswith(p) and not perm.premium \
                    and not any(a.startswith(p) for a in allowed):
                raise OutboundDenied("premium", f"{number} is a premium-rate destination")
        return
    from engine.sip.uri import parse_uri

    try:
        uri = parse_uri(to.strip().strip("<>"))
    except ValueError:
        raise OutboundDenied("sip_host", f"{to!r} is not a SIP URI") from None
    host = (uri.host or "").lower().strip("[]")
    if host in own:
        return      # this engine itself: its numbers and registered users
    port = uri.port or 5060
    for h in perm.sip_hosts:
        if h == host or h == f"{host}:{port}" or (h.startswith(".") and host.endswith(h)):
            return
    raise OutboundDenied("sip_host", f"SIP host {host}:{port} is not allowed")


class Grant:
    """One outbound call counted against its account's `max_concurrent` until released."""
    __slots__ = ("counts", "account")

    def __init__(self, counts, account):
        self.counts = counts
        self.account = account

    def release(self) -> None:
        if self.counts is not None:
            self.counts[self.account] -= 1
            self.counts = None


def _spent(engine, account: str) -> int | None:
    snap = getattr(engine.policy, "account", None)
    entry = snap(account) if snap is not None else None
    return entry.get("spend_last_hour_micro") if entry else None


def permit(engine, account: str, to: str, trunk: str | None = None,
           vendor: str | None = None, count: bool = True) -> Grant | None:
    """Check one outbound leg of `account` (placed for `vendor`, when given) against
    their outbound permissions and the account's caps; a Grant to keep while the
    leg is up when `count`. Denials are logged and counted in /metrics."""
    cfg = engine.cfg
    acc = cfg.accounts.get(account)
    perm = getattr(acc, "outbound", None) or DENY_ALL
    own = {cfg.advertise.lower(), cfg.sip_host.lower()}
    try:
        check(perm, to, trunk, tuple(own))
        if vendor is not None:
            check(cfg.vendor_outbound.get(vendor, DENY_ALL), to, trunk, tuple(own))
        counts = engine.outbound_calls
        if perm.max_concurrent is not None and counts[account] >= perm.max_concurrent:
            raise OutboundDenied("concurrent", f"account {account} has {counts[account]} "
                                               f"outbound calls up (max_concurrent)")
        if perm.max_spend_per_hour is not None:
            spent = _spent(engine, account)
            if spent is not None and spent >= perm.max_spend_per_hour:
                raise OutboundDenied("spend", f"account {account} spent {spent / 1e6:.2f} in "
                                              f"the last hour (max_spend_per_hour)")
    except OutboundDenied as exc:
        who = f"vendor {vendor} for account {account}" if vendor else f"account {account}"
        log.warning("outbound call to %s denied for %s: %s", to, who, exc,
                    extra={"event": "outbound.denied", "account": account,
                           "reason": exc.kind})
        engine.outbound_denials[(account, exc.kind)] += 1
        raise
    if not count:
        return None
    counts[account] += 1
    return Grant(counts, account)


def trunk_route(cfg, name: str, to: str) -> tuple[str, tuple, str, tuple | None, str]:
    """(Request-URI, (host, port), transport, credentials, domain) of dialling the
    number `to` through `[trunks.NAME]`; ValueError for an unknown trunk or a bad number."""
    from engine.sip.uri import check_user_part

    trunk = cfg.trunks.get(name)
    if trunk is None:
        raise ValueError(f"no trunk {name!r}")
    number = to[4:] if to.startswith("tel:") else to
    if trunk.prefix and number.startswith("+"):
        number = number[1:]  # the prefix (e.g. "00") stands for the "+"
    number = trunk.prefix + number
    check_user_part(number, "to")
    creds = (trunk.username, trunk.password) if trunk.username else None
    return (f"sip:{number}@{trunk.domain}", (trunk.host, trunk.port), trunk.transport.upper(),
            creds, trunk.domain)


def new_counters():
    """(calls up per account, denials per (account, reason)) for the engine."""
    return collections.Counter(), collections.Counter()
