"""SIP Digest authentication (RFC 3261 22, RFC 7616, RFC 8760), both sides.

Server side: `DigestServer` issues stateless nonces and verifies
`Authorization` / `Proxy-Authorization` values for a registrar or UAS.
Client side: `authorize` answers a `WWW-Authenticate` / `Proxy-Authenticate`
challenge from a trunk, and `choose_challenge` picks one of several.

Algorithms: MD5, MD5-sess, SHA-256 and SHA-256-sess (RFC 8760 2.7 ABNF).
The server insists on qop=auth; the client also answers qop=auth-int and
qop-less RFC 2069 style challenges.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "ALGORITHMS", "AuthResult", "DigestServer", "Ha1", "Lookup", "authorize",
    "choose_challenge", "parse_auth_header",
]

# Canonical names (RFC 8760 2.7) mapped to the hash behind them.
_HASH_OF = {"MD5": "md5", "MD5-SESS": "md5", "SHA-256": "sha256", "SHA-256-SESS": "sha256"}
_CANONICAL = {"MD5": "MD5", "MD5-SESS": "MD5-sess",
              "SHA-256": "SHA-256", "SHA-256-SESS": "SHA-256-sess"}
ALGORITHMS: tuple[str, ...] = ("MD5", "MD5-sess", "SHA-256", "SHA-256-sess")
_HEX_LEN = {"md5": 32, "sha256": 64}
# Client preference between hash families (RFC 8760 2.4, RFC 7616 3.7).
_STRENGTH = {"md5": 1, "sha256": 2}

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789"
                   "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Unquoted values are tokens (RFC 7235 2.1); a few URI characters are
# tolerated because some UAs send e.g. uri=sip:host unquoted.
_BARE_VALUE = _TCHAR | frozenset(":/@?[]")
_WS = " \t"
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_HEX = re.compile(r"[0-9a-fA-F]+")
_NC = re.compile(r"[0-9a-fA-F]{8}")

_NONCE_TS = struct.Struct(">Q")
_NONCE_SALT = 8
_MAC_LEN = hashlib.sha256().digest_size
_NONCE_RAW = _NONCE_TS.size + _NONCE_SALT + _MAC_LEN
# Nonces minted by a peer process whose clock runs slightly ahead stay valid.
_FUTURE_SKEW_MS = 30_000


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _canonical_algorithm(name: str) -> str | None:
    return _CANONICAL.get(name.upper())


def _is_sess(algorithm: str) -> bool:
    return algorithm.endswith("-sess")


def _b(s: str) -> bytes:
    # Header text is decoded with surrogateescape (parser_py._decode), so this
    # hashes exactly the octets that were on the wire.
    return s.encode("utf-8", "surrogateescape")


def _h(hash_name: str, data: bytes) -> str:
    return hashlib.new(hash_name, data).hexdigest()


def _ha1_from_password(algorithm: str, username: str, realm: str, password: str) -> str:
    return _h(_HASH_OF[algorithm.upper()], b":".join((_b(username), _b(realm), _b(password))))


def _response(algorithm: str, ha1: str, method: str, uri: str, nonce: str,
              qop: str | None, nc: str | None, cnonce: str | None, body: bytes = b"") -> str:
    """Compute request-digest from the base HA1 (RFC 7616 3.4.1-3.4.3)."""
    hname = _HASH_OF[algorithm.upper()]
    if _is_sess(algorithm):
        # RFC 7616 3.4.2: the session key binds the nonce and cnonce.
        ha1 = _h(hname, b":".join((ha1.encode(), _b(nonce), _b(cnonce or ""))))
    if qop == "auth-int":
        a2 = b":".join((_b(method), _b(uri), _h(hname, body).encode()))
    else:
        a2 = b":".join((_b(method), _b(uri)))
    ha2 = _h(hname, a2)
    if qop is None:
        # RFC 2617 3.2.2.1: the RFC 2069 form, kept for old servers.
        return _h(hname, b":".join((ha1.encode(), _b(nonce), ha2.encode())))
    return _h(hname, b":".join((ha1.encode(), _b(nonce), _b(nc or ""), _b(cnonce or ""),
                                _b(qop), ha2.encode())))


def _quote(value: str) -> str:
    """Render a quoted-string, refusing characters that could split the header."""
    for ch in value:
        o = ord(ch)
        if (o < 0x20 and ch != "\t") or o == 0x7F:
            raise ValueError("control character in header parameter")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- parsing --------------------------------------------------------------

def parse_auth_header(value: str) -> tuple[str, dict[str, str]]:
    """Parse a challenge or credentials header value.

    Returns `(scheme, params)`: the scheme as written, and the parameters
    with lower-cased names and unquoted, unescaped values.  A scheme followed
    by a token68 (e.g. `Basic QWxh...==`) yields `{"": token68}`; a bare
    scheme yields `{}`.  Whitespace around `=` and `,` and empty list
    elements are tolerated (RFC 7230 7).  Raises `ValueError`, and only
    `ValueError`, for anything else, including duplicate parameter names
    (RFC 7235 2.1).
    """
    if not isinstance(value, str):
        raise ValueError("header value must be a str")
    s = value.strip(_WS)
    n = len(s)
    i = 0
    while i < n and s[i] in _TCHAR:
        i += 1
    scheme = s[:i]
    if not scheme:
        raise ValueError("missing auth scheme")
    if i == n:
        return scheme, {}
    if s[i] not in _WS:
        raise ValueError("auth scheme must be followed by whitespace")
    rest = s[i:].lstrip(_WS)
    if _TOKEN68.fullmatch(rest):
        return scheme, {"": rest}

    params: dict[str, str] = {}
    m = len(rest)
    pos = 0
    need_comma = False
    while pos < m:
        c = rest[pos]
        if c in _WS:
            pos += 1
            continue
        if c == ",":
            pos += 1
            need_comma = False
            continue
        if need_comma:
            raise ValueError(f"expected ',' at offset {pos}")
        start = pos
        while pos < m and rest[pos] in _TCHAR:
            pos += 1
        name = rest[start:pos]
        if not name:
            raise ValueError(f"expected parameter name at offset {start}")
        while pos < m and rest[pos] in _WS:
            pos += 1
        if pos >= m or rest[pos] != "=":
            raise ValueError(f"expected '=' after {name!r}")
        pos += 1
        while pos < m and rest[pos] in _WS:
            pos += 1
        if pos >= m:
            raise ValueError(f"missing value for {name!r}")
        if rest[pos] == '"':
            val, pos = _parse_quoted(rest, pos)
        else:
            start = pos
            while pos < m and rest[pos] in _BARE_VALUE:
                pos += 1
            val = rest[start:pos]
            if not val:
                raise ValueError(f"bad value for {name!r}")
        key = name.lower()
        if key in params:
            raise ValueError(f"duplicate parameter {key!r}")
        params[key] = val
        need_comma = True
    return scheme, params


def _parse_quoted(s: str, pos: int) -> tuple[str, int]:
    """Read the quoted-string starting at s[pos] == '"' (RFC 3261 25.1)."""
    out: list[str] = []
    pos += 1
    n = len(s)
    while pos < n:
        c = s[pos]
        if c == '"':
            return "".join(out), pos + 1
        if c == "\\":
            pos += 1
            if pos >= n:
                break
            c = s[pos]
        o = ord(c)
        if (o < 0x20 and c != "\t") or o == 0x7F:
            raise ValueError("control character in quoted-string")
        out.append(c)
        pos += 1
    raise ValueError("unterminated quoted-string")


def _qop_options(params: dict[str, str]) -> list[str]:
    return [q.strip().lower() for q in params["qop"].split(",") if q.strip()]


def _pick_qop(params: dict[str, str]) -> str | None:
    """qop to answer with, None for a qop-less challenge; ValueError if none fits."""
    if "qop" not in params:
        return None
    offered = _qop_options(params)
    if "auth" in offered:
        return "auth"
    if "auth-int" in offered:
        return "auth-int"
    raise ValueError("no supported qop offered")


def _usable_challenge(params: dict[str, str]) -> str:
    """Validate a parsed Digest challenge; return its canonical algorithm."""
    if "realm" not in params or "nonce" not in params:
        raise ValueError("challenge lacks realm or nonce")
    # RFC 7616 3.3: an absent algorithm means MD5.
    algorithm = _canonical_algorithm(params.get("algorithm", "MD5"))
    if algorithm is None:
        raise ValueError(f"unsupported algorithm {params.get('algorithm')!r}")
    qop = _pick_qop(params)
    if qop is None and _is_sess(algorithm):
        # -sess needs a cnonce, which only exists with qop (RFC 2617 3.2.2).
        raise ValueError("-sess algorithm without qop")
    return algorithm


# -- client ---------------------------------------------------------------

def choose_challenge(values: list[str]) -> str:
    """Pick the challenge to answer among several header values.

    Unparseable values, non-Digest schemes and unknown algorithms are skipped
    (RFC 7616 3.3).  SHA-256 is preferred over MD5, the local policy that
    RFC 8760 2.4 allows; among equals the topmost wins, as 2.4 asks.
    Raises `ValueError` when nothing is usable.
    """
    best: str | None = None
    best_rank = 0
    for value in values:
        try:
            scheme, params = parse_auth_header(value)
            if scheme.lower() != "digest":
                continue
            algorithm = _usable_challenge(params)
        except ValueError:
            continue
        rank = _STRENGTH[_HASH_OF[algorithm.upper()]]
        if rank > best_rank:
            best, best_rank = value, rank
    if best is None:
        raise ValueError("no usable Digest challenge")
    return best


def authorize(challenge_value: str, method: str, uri: str, username: str, password: str,
              nc: int = 1, cnonce: str | None = None, body: bytes = b"") -> str:
    """Answer a Digest challenge; return the Authorization header value.

    `challenge_value` is one WWW-Authenticate / Proxy-Authenticate value,
    `uri` the Request-URI of the retried request (RFC 3261 22.4) and `nc`
    the count of requests sent with this nonce, this one included.  qop=auth
    is used when offered, qop=auth-int (hashing `body`) when it is the only
    qop offered, and the RFC 2069 form when the challenge has no qop.  A
    random cnonce is made when none is given.  Raises `ValueError` for a
    challenge that is not a usable Digest challenge or for unsafe inputs.
    """
    scheme, params = parse_auth_header(challenge_value)
    if scheme.lower() != "digest":
        raise ValueError(f"not a Digest challenge: {scheme!r}")
    algorithm = _usable_challenge(params)
    qop = _pick_qop(params)
    realm = params["realm"]
    nonce = params["nonce"]
    try:
        ha1 = _ha1_from_password(algorithm, username, realm, password)
        if qop is None:
            response = _response(algorithm, ha1, method, uri, nonce, None, None, None)
        else:
            if not 1 <= nc <= 0xFFFFFFFF:
                raise ValueError("nc out of range")
            nc_value = f"{nc:08x}"
            if cnonce is None:
                cnonce = secrets.token_hex(16)
            response = _response(algorithm, ha1, method, uri, nonce, qop, nc_value, cnonce,
                                 body)
    except UnicodeEncodeError as exc:
        raise ValueError("parameter not encodable as UTF-8") from exc

    parts = [f"username={_quote(username)}", f"realm={_quote(realm)}",
             f"nonce={_quote(nonce)}", f"uri={_quote(uri)}", f'response="{response}"']
    if "algorithm" in params:
        # Echoed only when named, so a reply to an RFC 2069 style challenge
        # carries nothing that server did not ask for.
        parts.append(f"algorithm={algorithm}")
    if qop is not None:
        parts += [f"cnonce={_quote(cnonce)}", f"qop={qop}", f"nc={nc_value}"]
    if "opaque" in params:
        # RFC 7616 3.3: opaque is returned unchanged.
        parts.append(f"opaque={_quote(params['opaque'])}")
    return "Digest " + ", ".join(parts)


# -- server ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ha1:
    """A stored HA1, H(username:realm:password), for the base `algorithm`.

    `algorithm` is "MD5" or "SHA-256" (a "-sess" suffix is dropped: the
    session key is derived from the same value, RFC 7616 3.4.2).
    """

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        canon = _canonical_algorithm(self.algorithm) if isinstance(self.algorithm, str) else None
        if canon is None:
            raise ValueError(f"unsupported algorithm {self.algorithm!r}")
        base = canon.removesuffix("-sess")
        hex_value = self.hex.lower() if isinstance(self.hex, str) else ""
        if len(hex_value) != _HEX_LEN[_HASH_OF[base.upper()]] or not _HEX.fullmatch(hex_value):
            raise ValueError(f"HA1 is not a {base} hex digest")
        object.__setattr__(self, "algorithm", base)
        object.__setattr__(self, "hex", hex_value)

    @classmethod
    def from_password(cls, algorithm: str, username: str, realm: str, password: str) -> Ha1:
        """Precompute the HA1 to store instead of the plaintext password."""
        canon = _canonical_algorithm(algorithm)
        if canon is None:
            raise ValueError(f"unsupported algorithm {algorithm!r}")
        return cls(canon, _ha1_from_password(canon, username, realm, password))


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Outcome of `DigestServer.verify`.

    `stale` is True when the credentials were right but the nonce had expired:
    re-challenge with `challenge(stale=True)` (RFC 7616 3.3).  `uri` is the
    credentials' digest-uri, which the caller must compare with the
    Request-URI (RFC 3261 22.4).  `reason` is empty on success.
    """

    ok: bool
    username: str | None = None
    stale: bool = False
    reason: str = ""
    uri: str | None = None
    algorithm: str | None = None


#: lookup(username, realm) -> password, stored HA1(s), or None if unknown.
Lookup = Callable[[str, str], str | Ha1 | Iterable[Ha1] | None]


class DigestServer:
    """Digest challenger and verifier for one realm.

    Nonces are stateless: base64url(timestamp || salt || HMAC-SHA256(secret,
    timestamp || salt || realm)), so every process sharing `secret` accepts
    them until `nonce_ttl` seconds have passed.  The per-nonce nc high-water
    marks that stop replays are kept in memory, per process, for at most
    `max_tracked_nonces` (nonce, username) pairs.
    """

    def __init__(self, realm: str, secret: bytes,
                 algorithms: Iterable[str] = ("SHA-256", "MD5"),
                 nonce_ttl: float = 300.0,
                 clock: Callable[[], float] = time.time,
                 max_tracked_nonces: int = 65536) -> None:
        if not realm:
            raise ValueError("realm must not be empty")
        _quote(realm)  # refuses realms that would break the header
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
            raise ValueError("secret must be at least 16 bytes")
        canon: list[str] = []
        for name in algorithms:
            algorithm = _canonical_algorithm(name)
            if algorithm is None:
                raise ValueError(f"unsupported algorithm {name!r}")
            if algorithm not in canon:
                canon.append(algorithm)
        if not canon:
            raise ValueError("at least one algorithm is required")
        if not nonce_ttl > 0:
            raise ValueError("nonce_ttl must be positive")
        if max_tracked_nonces < 1:
            raise ValueError("max_tracked_nonces must be positive")
        self.realm = realm
        self.algorithms: tuple[str, ...] = tuple(canon)
        self.nonce_ttl = float(nonce_ttl)
        self._secret = bytes(secret)
        self._realm_b = _b(realm)
        self._clock = clock
        self._ttl_ms = int(self.nonce_ttl * 1000)
        self._max_tracked = max_tracked_nonces
        self._opaque = _b64(
            hmac.new(self._secret, b"opaque:" + self._realm_b, hashlib.sha256).digest()[:12])
        # (nonce, username) -> (issued_ms, highest nc accepted)
        self._nc: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        # Nonces issued at or before this were possibly evicted from _nc.
        self._evicted_upto_ms = -1
        self._next_sweep_ms = 0

    def _now_ms(self) -> int:
        return max(0, int(self._clock() * 1000))

    def _mac(self, head: bytes) -> bytes:
        return hmac.new(self._secret, head + self._realm_b, hashlib.sha256).digest()

    def make_nonce(self) -> str:
        """Mint a fresh nonce (normally via `challenge`)."""
        head = _NONCE_TS.pack(self._now_ms()) + secrets.token_bytes(_NONCE_SALT)
        return _b64(head + self._mac(head))

    def _nonce_issued_ms(self, nonce: str) -> int | None:
        """Issue time of a nonce this realm's secret minted, else None."""
        if not nonce.isascii() or len(nonce) > 2 * _NONCE_RAW:
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except ValueError:
            return None
        # The decoder skips stray characters; demanding the canonical spelling
        # keeps one nonce per value, which the nc bookkeeping relies on.
        if len(raw) != _NONCE_RAW or _b64(raw) != nonce:
            return None
        head, mac = raw[:-_MAC_LEN], raw[-_MAC_LEN:]
        if not hmac.compare_digest(mac, self._mac(head)):
            return None
        return _NONCE_TS.unpack_from(head)[0]

    def challenge(self, stale: bool = False) -> list[str]:
        """Header values for a 401/407: one challenge per algorithm, preferred first.

        All challenges share one nonce; RFC 8760 2.3 lets a UAS offer
        several algorithms as separate header fields.
        """
        nonce = self.make_nonce()
        tail = ", stale=true" if stale else ""
        return [f'Digest realm={_quote(self.realm)}, nonce="{nonce}", opaque="{self._opaque}", '
                f'algorithm={algorithm}, qop="auth"{tail}' for algorithm in self.algorithms]

    def _expected_ha1(self, found: object, algorithm: str, username: str,
                      realm: str) -> str | None:
        base = algorithm.removesuffix("-sess")
        if isinstance(found, str):
            return _ha1_from_password(base, username, realm, found)
        if isinstance(found, Ha1):
            found = (found,)
        try:
            for item in found:  # type: ignore[union-attr]
                if isinstance(item, Ha1) and item.algorithm == base:
                    return item.hex
        except TypeError:
            pass
        return None

    def verify(self, method: str, header_value: str, lookup: Lookup) -> AuthResult:
        """Check an Authorization / Proxy-Authorization header value.

        `lookup(username, realm)` returns the plaintext password, an `Ha1`
        (or several, one per algorithm), or None for an unknown user.
        Never raises for bad input; exceptions from `lookup` propagate.
        """
        try:
            scheme, params = parse_auth_header(header_value)
        except ValueError:
            return AuthResult(False, reason="malformed credentials")
        if scheme.lower() != "digest":
            return AuthResult(False, reason="unsupported scheme")
        if any(k not in params for k in ("username", "realm", "nonce", "uri", "response")):
            return AuthResult(False, reason="malformed credentials")
        username, uri, nonce = params["username"], params["uri"], params["nonce"]
        algorithm = _canonical_algorithm(params.get("algorithm", "MD5"))

        def fail(reason: str, stale: bool = False) -> AuthResult:
            return AuthResult(False, username=username, stale=stale, reason=reason, uri=uri,
                              algorithm=algorithm)

        if params["realm"] != self.realm:
            return fail("realm mismatch")
        if algorithm is None or algorithm not in self.algorithms:
            return fail("unsupported algorithm")
        # Every challenge offers qop="auth", which RFC 7616 3.4 makes mandatory.
        qop = params.get("qop", "").lower()
        if qop != "auth":
            return fail("unsupported qop")
        nc, cnonce = params.get("nc"), params.get("cnonce")
        if nc is None or cnonce is None or not _NC.fullmatch(nc):
            return fail("malformed credentials")

        found = lookup(username, self.realm)
        if found is None:
            return fail("unknown user")
        try:
            ha1 = self._expected_ha1(found, algorithm, username, self.realm)
            if ha1 is None:
                return fail("no credentials for algorithm")
            expected = _response(algorithm, ha1, method, uri, nonce, qop, nc, cnonce)
            digest_ok = hmac.compare_digest(expected.encode(), _b(params["response"].lower()))
        except UnicodeEncodeError:
            return fail("malformed credentials")

        issued = self._nonce_issued_ms(nonce)
        now = self._now_ms()
        if issued is None or issued > now + _FUTURE_SKEW_MS:
            # Not minted with our secret (tampered, or before a secret change).
            # A digest that is right for it still proves the password, so the
            # client may retry with a fresh nonce without asking the user
            # (RFC 7616 3.3, stale).
            return fail("bad nonce", stale=digest_ok)
        if "opaque" in params and params["opaque"] != self._opaque:
            # Also derived from the secret, so it gets the same treatment.
            return fail("opaque mismatch", stale=digest_ok)
        if not digest_ok:
            return fail("bad response")
        if now - issued > self._ttl_ms:
            return fail("nonce expired", stale=True)
        verdict = self._check_nc(nonce, username, issued, int(nc, 16), now)
        if verdict:
            return fail(verdict, stale=verdict == "nonce expired")
        return AuthResult(True, username=username, uri=uri, algorithm=algorithm)

    def _check_nc(self, nonce: str, username: str, issued: int, nc: int, now: int) -> str:
        """Record nc for the nonce; return a failure reason, or "" if fresh.

        RFC 7616 3.4 / RFC 2617 3.2.2: a repeated nc is a replay.  Keyed
        per username too, so one user cannot burn nc values of another's nonce.
        """
        if now >= self._next_sweep_ms:
            self._sweep(now)
        key = (nonce, username)
        entry = self._nc.get(key)
        if entry is None:
            if issued <= self._evicted_upto_ms:
                # Its high-water mark may have been dropped: make the client
                # fetch a fresh nonce rather than risk accepting a replay.
                return "nonce expired"
            if nc < 1:
                return "replayed nc"
            self._nc[key] = (issued, nc)
            while len(self._nc) > self._max_tracked:
                _, (old_issued, _) = self._nc.popitem(last=False)
                self._evicted_upto_ms = max(self._evicted_upto_ms, old_issued)
            return ""
        if nc <= entry[1]:
            return "replayed nc"
        self._nc[key] = (issued, nc)
        return ""

    def _sweep(self, now: int) -> None:
        """Forget high-water marks of nonces past their lifetime."""
        cutoff = now - self._ttl_ms
        for key in [k for k, (issued, _) in self._nc.items() if issued < cutoff]:
            del self._nc[key]
        self._next_sweep_ms = now + max(1, self._ttl_ms // 4)
