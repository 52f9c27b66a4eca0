"""A registrar (RFC 3261 10.3): bindings of an address-of-record to contacts.

Modes: `open` accepts registrations for any address-of-record except those
of a configured user, which need that user's digest credentials; `auth` requires
digest credentials of a configured user for every registration, and only for
the user's own address (RFC 3261 10.3, 22, RFC 8760); `off` answers 405.

Bindings are keyed by the parsed user and host of the address-of-record; an
address without a user part is refused. The table is bounded (in all and per
address), expired bindings are purged, and each source address gets a budget of
REGISTERs and of failed digest responses (docs/security.md).
"""
from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass

from engine.sip.digest import DigestServer
from ext.sip_py import parse_name_addr
from engine.sip.uri import check_uri_text, parse_uri, strip_brackets

DEFAULT_EXPIRES = 3600
MIN_EXPIRES = 60
MAX_EXPIRES = 86400
MAX_CONTACTS = 10
MAX_SOURCES = 65536     # source addresses whose budgets are remembered at once


@dataclass
class RegistrarLimits:
    """The registrar's bounds (`[registrar]` in the config, docs/security.md)."""

    max_bindings: int = 10000       # bindings in the whole table
    max_contacts: int = MAX_CONTACTS  # bindings per address-of-record
    rate: float = 5.0               # REGISTERs per second per source address, sustained
    burst: int = 50                 # ... and in a burst
    max_auth_failures: int = 10     # failed digest responses per source before a lockout
    auth_lockout: float = 300.0     # seconds a source is refused after that


# RFC 3261 19.1.4: these URI parameters take part in comparison even when only one side has them.
_COMPARED_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def contact_key(uri: str) -> str:
    """A key under which equivalent contact URIs (RFC 3261 19.1.4) coincide."""
    try:
        u = parse_uri(uri)
    except ValueError:
        return uri
    params = ";".join(f"{k}={u.params[k].lower()}" for k in _COMPARED_PARAMS if k in u.params)
    port = u.port or (5061 if u.scheme == "sips" else 5060)
    return f"{u.scheme}:{u.user or ''}@{u.host.lower()}:{port};{params}"


def aor_key(uri) -> tuple[str, str] | None:
    """The key of an address-of-record: its parsed (user, host), or None when it
    is not a SIP/SIPS URI with a user part."""
    if uri.scheme not in ("sip", "sips") or not uri.user:
        return None
    return uri.user, uri.host.lower()


class Binding:
    __slots__ = ("contact", "expires_at", "call_id", "cseq", "source", "transport", "user")

    def __init__(self, contact, expires_at, call_id, cseq, source, transport, user=""):
        self.contact = contact
        self.expires_at = expires_at
        self.call_id = call_id
        self.cseq = cseq
        self.source = source
        self.transport = transport
        self.user = user        # the parsed user part of the address-of-record


class _Budget:
    """Per-source token bucket plus digest-failure count."""

    __slots__ = ("tokens", "stamp", "failures", "failed_since", "locked_until")

    def __init__(self, tokens: float, now: float):
        self.tokens = tokens
        self.stamp = now
        self.failures = 0
        self.failed_since = now
        self.locked_until = 0.0


class Registrar:
    def __init__(self, mode: str = "open", realm: str = "baton", users=None,
                 secret: bytes = b"", clock=time.time, limits: RegistrarLimits | None = None):
        self.mode = mode
        self.users = users or {}   # username -> password
        self.limits = limits or RegistrarLimits()
        secret = secret or _random_secret()
        self.digest = DigestServer(realm=realm, secret=secret)
        # Unknown users are checked against a password nobody knows, so they get
        # exactly the answers a known user with a wrong password gets.
        self._decoy_key = hmac.new(secret, b"decoy", hashlib.sha256).digest()
        self.bindings: dict[tuple[str, str], dict[str, Binding]] = {}
        # Configured user -> keys of their addresses with bindings: the call
        # centre's index (never a scan of the table).
        self.by_user: dict[str, set] = {}
        self.count = 0
        self.clock = clock
        self._budgets: dict[str, _Budget] = {}

    # -- the table ---------------------------------------------------------
    def lookup(self, aor: str) -> list[Binding]:
        """Live bindings of an address-of-record (a SIP URI); expired ones are dropped."""
        try:
            key = aor_key(parse_uri(aor))
        except ValueError:
            return []
        return self._live(key, self.clock()) if key else []

    def bindings_of(self, user: str) -> list[Binding]:
        """Live bindings of a configured user's addresses, oldest first."""
        now = self.clock()
        found = [b for key in list(self.by_user.get(user, ())) for b in self._live(key, now)]
        found.sort(key=lambda b: b.expires_at)
        return found

    def _live(self, key, now: float) -> list[Binding]:
        current = self.bindings.get(key)
        if not current:
            return []
        expired = [k for k, b in current.items() if b.expires_at <= now]
        for k in expired:
            self._remove(key, current, k)
        return list(current.values())

    def _remove(self, key, current: dict, contact: str) -> None:
        if current.pop(contact, None) is not None:
            self.count -= 1
        if not current:
            self._drop_aor(key)

    def _drop_aor(self, key) -> None:
        self.bindings.pop(key, None)
        keys = self.by_user.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.by_user[key[0]]

    def purge(self, now: float | None = None) -> int:
        """Remove every expired binding; returns how many went."""
        now = self.clock() if now is None else now
        before = self.count
        for key in list(self.bindings):
            self._live(key, now)
        return before - self.count

    # -- per-source budgets ------------------------------------------------
    def _budget(self, source: str, now: float) -> _Budget:
        b = self._budgets.get(source)
        lim = self.limits
        if b is None:
            if len(self._budgets) >= MAX_SOURCES:
                self._forget_sources(now)
            b = self._budgets[source] = _Budget(float(lim.burst), now)
            return b
        b.tokens = min(float(lim.burst), b.tokens + (now - b.stamp) * lim.rate)
        b.stamp = now
        if b.failures and now - b.failed_since > lim.auth_lockout:
            b.failures = 0
        return b

    def _forget_sources(self, now: float) -> None:
        lim = self.limits
        full = lim.burst / lim.rate if lim.rate > 0 else 0.0
        for src, b in list(self._budgets.items()):
            if b.locked_until <= now and now - b.stamp >= full and not b.failures:
                del self._budgets[src]
        if len(self._budgets) >= MAX_SOURCES:
            # Still full of active sources: keep the locked-out ones.
            self._budgets = {s: b for s, b in self._budgets.items() if b.locked_until > now}

    def _failed(self, budget: _Budget, now: float) -> None:
        if not budget.failures:
            budget.failed_since = now
        budget.failures += 1
        if budget.failures >= self.limits.max_auth_failures:
            budget.locked_until = now + self.limits.auth_lockout
            budget.failures = 0

    def _password(self, username, realm):
        found = self.users.get(username)
        if found is None:
            return hmac.new(self._decoy_key, username.encode("utf-8", "surrogateescape"),
                            hashlib.sha256).hexdigest()
        return found

    # -- REGISTER ----------------------------------------------------------
    def on_register(self, core, msg, st) -> None:
        now = self.clock()
        budget = self._budget(st.flow.addr[0], now)
        if budget.locked_until > now:
            # Too many failed digest responses from this source (like fail2ban).
            self._unavailable(core, msg, st, budget.locked_until - now, "Too Many Failed Attempts")
            return
        if budget.tokens < 1.0:
            rate = self.limits.rate
            wait = (1.0 - budget.tokens) / rate if rate > 0 else self.limits.auth_lockout
            self._unavailable(core, msg, st, wait, "Too Many Registrations")
            return
        budget.tokens -= 1.0
        na = parse_name_addr(msg.get("to", ""))
        try:
            aor_uri = parse_uri(na[1]) if na else None
        except ValueError:
            aor_uri = None
        if aor_uri is None or aor_uri.scheme not in ("sip", "sips"):
            # RFC 4475 3.3.4: the To is the address-of-record, a SIP or SIPS URI.
            core.respond(st, msg, 400, reason="Bad To header")
            return
        key = aor_key(aor_uri)
        if key is None:
            # RFC 3261 10.3 steps 3-4: `sip:host` names a domain, not an address any
            # user may register (a user part is what the registrar authorises).
            core.respond(st, msg, 403, reason="Address-of-Record Needs a User Part")
            return
        user = key[0]
        auth = msg.get("authorization")
        # `auth` mode authenticates every registration; `open` mode still does for an
        # address-of-record whose user has a password here (the config's users are
        # never open to anyone); RFC 4475 3.3.7: an unknown scheme gets a fresh challenge.
        owned = user in self.users
        if self.mode == "auth" or owned or \
                (auth is not None and not auth.lower().startswith("digest")):
            if auth is None:
                self._challenge(core, msg, st)
                return
            result = self.digest.verify("REGISTER", auth, self._password)
            if result.ok and result.uri is not None and result.uri != msg.uri:
                # RFC 3261 22.4: the credentials must be for this Request-URI.
                core.respond(st, msg, 400, reason="Authorization URI mismatch")
                return
            if not result.ok:
                if result.reason in ("bad response", "unknown user"):
                    # A wrong password, for a known or an unknown user alike
                    # (Asterisk's alwaysauthreject): 403, and counted.
                    self._failed(budget, now)
                    core.respond(st, msg, 403)
                    return
                self._challenge(core, msg, st, stale=result.stale)
                return
            if result.username != user or user not in self.users:
                # A user registers their own address only (RFC 3261 10.3 step 3).
                core.respond(st, msg, 403, reason="Credentials Not For This Address")
                return
        contacts = msg.headers.get("contact", [])
        expires_hdr = msg.get("expires")
        current = self.bindings.get(key)
        if contacts == ["*"]:
            # RFC 3261 10.3 step 6: remove all bindings (needs Expires: 0).
            if expires_hdr != "0":
                core.respond(st, msg, 400, reason="Wildcard Contact needs Expires 0")
                return
            if current:
                self.count -= len(current)
                self._drop_aor(key)
        else:
            # Every contact is checked before anything changes (RFC 3261 10.3 step 7
            # is all or nothing); entries are created only then.
            changes = []
            for c in contacts:
                na = parse_name_addr(c)
                if na is None:
                    core.respond(st, msg, 400, reason="Bad Contact")
                    return
                uri = strip_brackets(c) if "<" in c else na[1]
                try:
                    # A binding is written back in the 200 and in every INVITE to it.
                    check_uri_text(uri, "Contact")
                except ValueError:
                    core.respond(st, msg, 400, reason="Bad Contact")
                    return
                exp = dict(na[2]).get("expires") or expires_hdr
                try:
                    seconds = int(exp) if exp is not None else DEFAULT_EXPIRES
                except ValueError:
                    seconds = DEFAULT_EXPIRES
                if 0 < seconds < MIN_EXPIRES:
                    # RFC 3261 10.3 step 7: too brief.
                    core.respond(st, msg, 423, reason="Interval Too Brief",
                                 headers=[("min-expires", str(MIN_EXPIRES))])
                    return
                ckey = contact_key(uri)
                old = current.get(ckey) if current else None
                if old is not None and old.call_id == msg.call_id and old.cseq >= msg.cseq:
                    core.respond(st, msg, 500, reason="Out of order REGISTER")
                    return
                changes.append((ckey, uri, min(seconds, MAX_EXPIRES)))
            live = {k for k, b in current.items() if b.expires_at > now} if current else set()
            added = {ckey for ckey, _, s in changes if s} - live
            kept = live - {ckey for ckey, _, s in changes if not s}
            if len(kept | added) > self.limits.max_contacts and added:
                core.respond(st, msg, 403, reason="Too Many Contacts For This Address")
                return
            if added and self.count + len(added) > self.limits.max_bindings:
                self.purge(now)
                if self.count + len(added) > self.limits.max_bindings:
                    self._unavailable(core, msg, st, 60.0, "Registrar Full")
                    return
            for ckey, uri, seconds in changes:
                if seconds == 0:
                    if current:
                        self._remove(key, current, ckey)
                        current = self.bindings.get(key)
                    continue
                if current is None:
                    current = self.bindings[key] = {}
                    if user in self.users:
                        self.by_user.setdefault(user, set()).add(key)
                if ckey not in current:
                    self.count += 1
                current[ckey] = Binding(uri, now + seconds, msg.call_id, msg.cseq,
                                        st.flow.addr, st.flow.transport.name, user)
        live = self._live(key, now)
        headers = [("contact", f"<{b.contact}>;expires={int(b.expires_at - now)}") for b in live]
        headers.append(("date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())))
        core.respond(st, msg, 200, headers=headers)

    def authenticate(self, core, msg, st) -> str | None:
        """The configured user whose digest credentials `msg` carries (for its
        method and Request-URI), or None once `msg` has been answered: 401 with
        a challenge, or 403 for wrong credentials (counted toward the source's
        lockout, as for REGISTER)."""
        now = self.clock()
        budget = self._budget(st.flow.addr[0], now)
        if budget.locked_until > now:
            core.respond(st, msg, 403)
            return None
        auth = msg.get("authorization")
        if auth is None:
            self._challenge(core, msg, st)
            return None
        result = self.digest.verify(msg.method, auth, self._password)
        if result.ok and (result.uri is None or result.uri == msg.uri) \
                and result.username in self.users:
            return result.username
        if result.ok or result.reason in ("bad response", "unknown user"):
            self._failed(budget, now)
            core.respond(st, msg, 403)
            return None
        self._challenge(core, msg, st, stale=result.stale)
        return None

    def _challenge(self, core, msg, st, stale: bool = False) -> None:
        headers = [("www-authenticate", v) for v in self.digest.challenge(stale=stale)]
        core.respond(st, msg, 401, headers=headers)

    @staticmethod
    def _unavailable(core, msg, st, seconds: float, reason: str) -> None:
        # RFC 3261 21.5.4: 503 with Retry-After, SIP's way of saying "slow down".
        core.respond(st, msg, 503, reason=reason,
                     headers=[("retry-after", str(max(1, math.ceil(seconds))))])


def _random_secret() -> bytes:
    import os

    return os.urandom(32)


__all__ = ["Registrar", "RegistrarLimits", "Binding", "contact_key", "aor_key"]
