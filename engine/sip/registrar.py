"""A registrar (RFC 3261 10.3): bindings of an address-of-record to contacts.

Modes: `open` accepts registrations for any address-of-record except those
of a configured user, which need that user's digest credentials; `auth` requires
digest credentials of a configured user for every registration, and only for
the user's own address (RFC 3261 10.3, 22, RFC 8760); `off` answers 405.
"""
from __future__ import annotations

import time

from engine.sip.digest import DigestServer
from ext.sip_py import parse_name_addr
from engine.sip.uri import parse_uri, strip_brackets

DEFAULT_EXPIRES = 3600
MIN_EXPIRES = 60
MAX_EXPIRES = 86400
MAX_CONTACTS = 10


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


class Binding:
    __slots__ = ("contact", "expires_at", "call_id", "cseq", "source", "transport")

    def __init__(self, contact, expires_at, call_id, cseq, source, transport):
        self.contact = contact
        self.expires_at = expires_at
        self.call_id = call_id
        self.cseq = cseq
        self.source = source
        self.transport = transport


class Registrar:
    def __init__(self, mode: str = "open", realm: str = "baton", users=None,
                 secret: bytes = b"", clock=time.time):
        self.mode = mode
        self.users = users or {}   # username -> password
        self.digest = DigestServer(realm=realm, secret=secret or _random_secret())
        self.bindings: dict[str, dict[str, Binding]] = {}
        self.clock = clock

    def lookup(self, aor: str) -> list[Binding]:
        now = self.clock()
        found = self.bindings.get(aor, {})
        return [b for b in found.values() if b.expires_at > now]

    def _password(self, username, realm):
        return self.users.get(username)

    def on_register(self, core, msg, st) -> None:
        to = msg.get("to", "")
        na = parse_name_addr(to)
        try:
            aor_uri = parse_uri(na[1]) if na else None
        except ValueError:
            aor_uri = None
        if aor_uri is None:
            core.respond(st, msg, 400, reason="Bad To header")
            return
        auth = msg.get("authorization")
        # `auth` mode authenticates every registration; `open` mode still does for an
        # address-of-record whose user has a password here (the config's users are
        # never open to anyone); RFC 4475 3.3.7: an unknown scheme gets a fresh challenge.
        owned = aor_uri.user is not None and aor_uri.user in self.users
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
                if result.reason in ("unknown user",) and (self.mode == "auth" or owned):
                    core.respond(st, msg, 403)
                    return
                self._challenge(core, msg, st, stale=result.stale)
                return
            if result.username != aor_uri.user:
                # A user registers their own address only (RFC 3261 10.3 step 3).
                core.respond(st, msg, 403, reason="Credentials Not For This Address")
                return
        aor = f"{aor_uri.scheme}:{aor_uri.user}@{aor_uri.host}" if aor_uri.user else aor_uri.raw
        contacts = msg.headers.get("contact", [])
        expires_hdr = msg.get("expires")
        now = self.clock()
        current = self.bindings.setdefault(aor, {})
        if contacts == ["*"]:
            # RFC 3261 10.3 step 6: remove all bindings (needs Expires: 0).
            if expires_hdr != "0":
                core.respond(st, msg, 400, reason="Wildcard Contact needs Expires 0")
                return
            current.clear()
        else:
            for c in contacts:
                na = parse_name_addr(c)
                if na is None:
                    core.respond(st, msg, 400, reason="Bad Contact")
                    return
                uri = strip_brackets(c) if "<" in c else na[1]
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
                seconds = min(seconds, MAX_EXPIRES)
                key = contact_key(uri)
                old = current.get(key)
                if old is not None and old.call_id == msg.call_id and old.cseq >= msg.cseq:
                    core.respond(st, msg, 500, reason="Out of order REGISTER")
                    return
                if seconds == 0:
                    current.pop(key, None)
                elif len(current) < MAX_CONTACTS or key in current:
                    current[key] = Binding(uri, now + seconds, msg.call_id, msg.cseq,
                                           st.flow.addr, st.flow.transport.name)
        live = self.lookup(aor)
        headers = [("contact", f"<{b.contact}>;expires={int(b.expires_at - now)}") for b in live]
        headers.append(("date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())))
        core.respond(st, msg, 200, headers=headers)

    def _challenge(self, core, msg, st, stale: bool = False) -> None:
        headers = [("www-authenticate", v) for v in self.digest.challenge(stale=stale)]
        core.respond(st, msg, 401, headers=headers)


def _random_secret() -> bytes:
    import os

    return os.urandom(32)


__all__ = ["Registrar", "Binding", "contact_key"]
