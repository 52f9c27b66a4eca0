"""Who may use the control API: account API tokens, vendor secrets, TLS.

- `Sessions` calls carry `authorization: Bearer TOKEN` metadata; the token
  is one of an account's `api_tokens` and the call sees that account only.
- A vendor process proves itself when it attaches: the module code and the
  vendor's secret (`[vendors.ID] secret`) in its Register message or in
  `x-baton-module` / `x-baton-secret` metadata. A code belongs to a vendor
  when `[modules."CODE"] vendor = "ID"` says so or `[vendors.ID] modules`
  lists it.
- A platform operator's token (`[engine] operator_tokens`) sees every
  account and vendor: `scope()` is None for it. With `x-baton-account: ID`
  metadata it acts for that one account, as the account's own token would.
  Operator calls are not metered (control/metering.py meters API keys only).

Secrets and tokens are compared in constant time.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field

import grpc

log = logging.getLogger("baton.control.auth")

MIN_SECRET = 16
DEFAULT_OFFER_TIMEOUT = 2.0
# An operator token names the account it acts for in this metadata key.
ACCOUNT_HEADER = "x-baton-account"


class AuthError(Exception):
    """A refusal, with the gRPC status it maps to."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Vendor:
    """One `[vendors.ID]` table."""

    id: str
    secret: str
    modules: set = field(default_factory=set)
    offer_timeout: float = DEFAULT_OFFER_TIMEOUT


@dataclass(frozen=True)
class Acting:
    """The caller of a servicer method run by another front (the REST API,
    control/rest.py) that has authenticated it already: it acts for `account`.
    Only code in this process can make one; gRPC metadata never is one."""

    account: str


class ServicerContext:
    """What a gRPC servicer method needs of its context, for a call made from
    inside the engine on behalf of `account`: `abort` raises `Aborted`."""

    def __init__(self, account: str) -> None:
        self._metadata = Acting(account)

    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return "rest"

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        raise Aborted(code, details)


class Aborted(Exception):
    """A servicer's `context.abort(code, details)` in a `ServicerContext`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Authority:
    """Token and secret checks over the engine's config (read once at start)."""

    def __init__(self, cfg) -> None:
        self.tokens: list[tuple[bytes, str]] = []
        for acc in cfg.accounts.values():
            for token in getattr(acc, "api_tokens", ()) or ():
                self.tokens.append((token.encode(), acc.id))
        # API keys ([api_keys.ID], control/metering.py) act for their account too;
        # they are known by the SHA-256 of the token.
        self.key_accounts: dict[str, str] = {
            k.digest: k.account for k in (getattr(cfg, "api_keys", None) or {}).values()}
        # Platform operators: every account and vendor (engine.operator_tokens).
        self.operator_tokens: list[bytes] = [
            t.encode() for t in getattr(cfg, "operator_tokens", None) or ()]
        self.account_ids: set[str] = set(cfg.accounts)
        self.vendors: dict[str, Vendor] = {}
        for vid, table in (cfg.raw.get("vendors") or {}).items():
            if not isinstance(table, dict):
                log.warning("vendors.%s: expected a table; this vendor cannot attach", vid)
                continue
            secret = table.get("secret")
            if not isinstance(secret, str) or len(secret) < MIN_SECRET:
                log.warning("vendors.%s.secret: a string of at least %d characters is needed; "
                            "this vendor cannot attach", vid, MIN_SECRET)
                continue
            mods = table.get("modules", [])
            if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods):
                log.warning("vendors.%s.modules: expected a list of module codes", vid)
                mods = []
            timeout = table.get("offer_timeout", DEFAULT_OFFER_TIMEOUT)
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
                    not 0.05 <= timeout <= 60:
                log.warning("vendors.%s.offer_timeout: seconds between 0.05 and 60; using %g",
                            vid, DEFAULT_OFFER_TIMEOUT)
                timeout = DEFAULT_OFFER_TIMEOUT
            self.vendors[vid] = Vendor(vid, secret, set(mods), float(timeout))
        self.module_vendor: dict[str, str] = {
            code: entry["vendor"] for code, entry in cfg.modules.items()
            if isinstance(entry, dict) and entry.get("vendor")}

    # -- account tokens ----------------------------------------------------------
    def account_for_token(self, token: str) -> str | None:
        raw = token.encode()
        found = None
        for known, account in self.tokens:
            # Every token is compared, so timing says nothing about which matched.
            if hmac.compare_digest(known, raw):
                found = account
        if found is None and self.key_accounts:
            found = self.key_accounts.get(hashlib.sha256(raw).hexdigest())
        return found

    def is_operator_token(self, token: str) -> bool:
        """True when `token` is one of `engine.operator_tokens`."""
        raw = token.encode()
        found = False
        for known in self.operator_tokens:
            # Every token is compared, so timing says nothing about which matched.
            if hmac.compare_digest(known, raw):
                found = True
        return found

    def account(self, metadata) -> str:
        """The account of a call's bearer token; AuthError(UNAUTHENTICATED) otherwise.

        An operator token acts for the account its `x-baton-account` metadata
        names; without one it is INVALID_ARGUMENT (the call needs one account)."""
        scope = self.scope(metadata)
        if scope is None:
            raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{ACCOUNT_HEADER}: this call acts for one account; with an "
                            f"operator token name it in `{ACCOUNT_HEADER}: ID` metadata")
        return scope

    def scope(self, metadata) -> str | None:
        """The account a call may see: its token's account, or None for a platform
        operator (every account; `x-baton-account: ID` narrows it to ID).
        AuthError(UNAUTHENTICATED) for a missing or unknown token."""
        if isinstance(metadata, Acting):
            return metadata.account
        token = _bearer(metadata)
        acting = _metadata_value(metadata, ACCOUNT_HEADER)
        acting = acting.strip() if acting is not None else ""
        if self.is_operator_token(token):
            if not acting:
                return None
            if acting not in self.account_ids:
                raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{ACCOUNT_HEADER}: no account {acting!r}")
            return acting
        account = self.account_for_token(token)
        if account is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "unknown API token")
        if acting and acting != account:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            f"{ACCOUNT_HEADER}: the token belongs to account {account!r}")
        return account

    def operator(self, metadata) -> bool:
        """True when the call's bearer token is an operator's (no error otherwise)."""
        value = _metadata_value(metadata, "authorization")
        if value is None or not self.operator_tokens:
            return False
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and self.is_operator_token(token.strip())

    # -- vendor secrets ----------------------------------------------------------
    def vendor_for(self, code: str, secret: str, vendor_id: str = "") -> Vendor:
        """The vendor allowed to serve `code` with `secret`, or AuthError."""
        if not code:
            raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                            "register.module_code: a module code is required")
        if "." not in code:
            raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"register.module_code: {code!r} has no vendor prefix "
                            "(e.g. acme.survey)")
        if not secret:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED,
                            "no secret: send it in Register.secret or x-baton-secret metadata")
        if code.startswith("baton."):
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            f"module code {code!r} is reserved for built-in modules")
        if vendor_id:
            candidates = [self.vendors[vendor_id]] if vendor_id in self.vendors else []
        elif code in self.module_vendor:
            v = self.vendors.get(self.module_vendor[code])
            candidates = [v] if v is not None else []
        else:
            candidates = [v for v in self.vendors.values() if code in v.modules]
        matched = None
        for v in candidates:
            if hmac.compare_digest(v.secret.encode(), secret.encode()):
                matched = v
        if matched is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED,
                            f"bad secret for module code {code!r}")
        if code not in matched.modules and self.module_vendor.get(code) != matched.id:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            f"module code {code!r} does not belong to vendor {matched.id!r}")
        return matched


def in_scope(scope: str | None, account: str | None) -> bool:
    """Whether a call of `scope` (Authority.scope: an account, None for an
    operator) may see something of `account`."""
    return scope is None or (account is not None and account == scope)


def _bearer(metadata) -> str:
    """The bearer token of a call's metadata; AuthError(UNAUTHENTICATED) otherwise."""
    value = _metadata_value(metadata, "authorization")
    if value is None:
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED,
                        "missing `authorization: Bearer TOKEN` metadata")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED,
                        "the authorization metadata must be `Bearer TOKEN`")
    return token.strip()


def _metadata_value(metadata, key: str) -> str | None:
    for k, v in metadata or ():
        if k.lower() == key:
            return v.decode() if isinstance(v, bytes) else v
    return None


def metadata_value(metadata, key: str) -> str | None:
    """The first value of metadata `key` (case-insensitive), or None."""
    return _metadata_value(metadata, key)


def server_credentials(engine_cfg: dict):
    """TLS (or mutual TLS) credentials when `[engine] grpc_tls_cert/key` are set, else None."""
    cert_path = engine_cfg.get("grpc_tls_cert")
    key_path = engine_cfg.get("grpc_tls_key")
    if not cert_path and not key_path:
        return None
    if not cert_path or not key_path:
        raise ValueError("engine.grpc_tls_cert and engine.grpc_tls_key go together")
    with open(cert_path, "rb") as f:
        cert = f.read()
    with open(key_path, "rb") as f:
        key = f.read()
    ca = None
    ca_path = engine_cfg.get("grpc_tls_client_ca")
    if ca_path:
        with open(ca_path, "rb") as f:
            ca = f.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)
