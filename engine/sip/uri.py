"""SIP and tel URIs (RFC 3261 19.1, RFC 3966), enough for routing and dialogs."""
from __future__ import annotations

import re
from urllib.parse import unquote

from ext.sip_py import parse_hostport

SUPPORTED_SCHEMES = ("sip", "sips", "tel")


class Uri:
    __slots__ = ("scheme", "user", "password", "host", "port", "params", "headers", "raw")

    def __init__(self, scheme, user, password, host, port, params, headers, raw):
        self.scheme = scheme
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self.params = params
        self.headers = headers
        self.raw = raw

    @property
    def transport(self) -> str:
        t = self.params.get("transport")
        if t:
            return t.upper()
        return "TLS" if self.scheme == "sips" else "UDP"

    def __repr__(self):
        return f"<Uri {self.raw}>"


# Characters a URI headed for a SIP header may never hold: controls (CR/LF would end
# the header, RFC 3261 25.1), spaces, and the `<>"` that delimit a name-addr.
_UNSAFE_URI = re.compile(r'[\x00-\x20\x7f<>"]')
# RFC 3261 25.1 user: unreserved / escaped / user-unreserved.
_USER_PART = re.compile(r"[A-Za-z0-9\-_.!~*'()%&=+$,;?/]+")


def check_uri_text(text: str, what: str = "URI") -> None:
    """ValueError unless `text` can stand as a URI in a SIP header."""
    bad = _UNSAFE_URI.search(text)
    if bad:
        raise ValueError(f"{what}: {bad.group()!r} is not allowed in a SIP URI")


def check_user_part(text: str, what: str = "user") -> None:
    """ValueError unless `text` is a URI user part (RFC 3261 25.1), e.g. a caller id."""
    if not _USER_PART.fullmatch(text):
        raise ValueError(f"{what}: {text[:40]!r} is not a SIP user part (letters, digits "
                         f"and -_.!~*'()%&=+$,;?/ only)")


def sip_uri(text: str, what: str = "URI") -> "Uri":
    """A sip:/sips: URI with a host, checked for header use; ValueError otherwise."""
    check_uri_text(text, what)
    try:
        uri = parse_uri(text)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if uri.scheme not in ("sip", "sips") or not uri.host:
        raise ValueError(f"{what}: not a sip: or sips: URI")
    return uri


def from_address(text: str, what: str = "from") -> str:
    """A caller-supplied From address (`sip:…` or `<sip:…>`) as a name-addr `<sip:…>`."""
    bare = text[1:-1] if text.startswith("<") and text.endswith(">") else text
    sip_uri(bare, what)
    return f"<{bare}>"


def parse_uri(text: str) -> Uri:
    """Parse a sip:/sips:/tel: URI; raises ValueError on anything else."""
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"unsupported URI {text[:60]!r}")
    if scheme == "tel":
        number, _, params = rest.partition(";")
        return Uri(scheme, unquote(number), None, "", 0, _params(params), {}, text)
    rest, _, hdrs = rest.partition("?")
    at = rest.rfind("@")
    user = password = None
    if at >= 0:
        userinfo = rest[:at]
        rest = rest[at + 1:]
        user, _, pw = userinfo.partition(":")
        user = unquote(user)
        password = unquote(pw) if pw else None
    hostport, _, params = rest.partition(";")
    host, port = parse_hostport(hostport)
    if host is None:
        raise ValueError(f"bad host in URI {text[:60]!r}")
    headers = {}
    if hdrs:
        for item in hdrs.split("&"):
            k, _, v = item.partition("=")
            headers[unquote(k)] = unquote(v)
    return Uri(scheme, user, password, host, port, _params(params), headers, text)


def _params(text: str) -> dict:
    out = {}
    if text:
        for item in text.split(";"):
            if item:
                k, _, v = item.partition("=")
                out[k.strip().lower()] = v.strip()
    return out


def strip_brackets(addr: str) -> str:
    """The URI inside a name-addr (`"Bob" <sip:bob@x>;tag=1` -> `sip:bob@x`)."""
    lt = addr.find("<")
    if lt >= 0:
        gt = addr.find(">", lt)
        return addr[lt + 1:gt if gt > 0 else None].strip()
    return addr.split(";", 1)[0].strip()


def party(addr: str) -> str:
    """Twilio's From/To of an address: a phone number when the user part is one,
    else the SIP URI (without display name, brackets or parameters)."""
    uri = strip_brackets(addr)
    user = uri.split(":", 1)[-1].split("@", 1)[0]
    if user and re.fullmatch(r"\+?[0-9]{2,20}", user):
        return user
    return uri.split(";", 1)[0]
