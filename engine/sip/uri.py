"""SIP and tel URIs (RFC 3261 19.1, RFC 3966), enough for routing and dialogs."""
from __future__ import annotations

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
