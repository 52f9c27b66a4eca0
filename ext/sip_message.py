"""SIP message model shared by the Cython parser and its pure-Python twin.

Both parsers produce an object with exactly the attributes of `SipMessage`
(`FIELDS` lists them); the differential tests compare `as_dict()` of both.
Header names are canonical: lower case, compact forms expanded (RFC 3261 7.3.3).
List-valued headers are split at top-level commas, so `headers["via"]` holds
one entry per Via value, topmost first.
"""
from __future__ import annotations

# RFC 3261 7.3.3 compact forms, plus the ones registered later (RFC 3265, 3515, 3841, 4028).
COMPACT = {
    "v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact",
    "l": "content-length", "c": "content-type", "e": "content-encoding",
    "k": "supported", "s": "subject", "o": "event", "u": "allow-events",
    "r": "refer-to", "b": "referred-by", "x": "session-expires", "j": "reject-contact",
    "a": "accept-contact", "d": "request-disposition", "y": "identity", "n": "identity-info",
}

# Headers whose value is a comma-separated list (RFC 3261 7.3.1): split into entries.
LIST_HEADERS = frozenset((
    "via", "route", "record-route", "contact", "require", "proxy-require", "supported",
    "unsupported", "allow", "accept", "accept-encoding", "accept-language",
    "content-encoding", "allow-events", "path", "service-route",
))

# Headers that may appear at most once (RFC 3261 20, table 2): a repeat is a 400.
SINGLE_HEADERS = frozenset((
    "to", "from", "call-id", "cseq", "max-forwards", "content-length", "content-type",
))

# Canonical spellings for serialisation.
PRETTY = {
    "via": "Via", "from": "From", "to": "To", "call-id": "Call-ID", "cseq": "CSeq",
    "contact": "Contact", "max-forwards": "Max-Forwards", "content-length": "Content-Length",
    "content-type": "Content-Type", "www-authenticate": "WWW-Authenticate",
    "proxy-authenticate": "Proxy-Authenticate", "authorization": "Authorization",
    "proxy-authorization": "Proxy-Authorization", "record-route": "Record-Route",
    "route": "Route", "allow": "Allow", "supported": "Supported", "require": "Require",
    "unsupported": "Unsupported", "accept": "Accept", "user-agent": "User-Agent",
    "server": "Server", "expires": "Expires", "retry-after": "Retry-After",
    "rseq": "RSeq", "rack": "RAck", "reason": "Reason",
}

MAX_MESSAGE = 65535          # TCP framing limit and UDP datagram maximum
MAX_HEADERS = 128            # header fields per message
MAX_LINE = 8192              # bytes per (unfolded) header line
MAX_CSEQ = 2 ** 31 - 1       # RFC 3261 8.1.1.5: CSeq number < 2**31
MAX_EXPIRES = 2 ** 32 - 1    # RFC 3261 20.19: delta-seconds fit 32 bits

FIELDS = (
    "is_request", "method", "uri", "version", "status", "reason", "headers", "body",
    "call_id", "cseq", "cseq_method", "from_tag", "to_tag", "max_forwards",
    "content_length", "via_transport", "via_host", "via_port", "via_branch",
    "via_rport", "via_received", "error",
)


def pretty(name: str) -> str:
    p = PRETTY.get(name)
    if p is not None:
        return p
    return "-".join(part[:1].upper() + part[1:] for part in name.split("-"))


class SipParseError(Exception):
    """A message that cannot be framed or whose start line is not SIP at all.

    Nothing is sent back for these (RFC 4475 3.1.2: never respond to an
    address taken from an unparseable message)."""


class SipMessage:
    """A parsed SIP request or response.

    `error` is None, or (status, reason) for a request that parsed far enough
    to be answered but violates the grammar or a hard limit; the core answers
    it with that status instead of processing it.
    `via_port` is 0 when the top Via names no port; `via_rport` is None
    (absent), -1 (present without value) or the port number.
    """

    __slots__ = FIELDS

    def __init__(self):
        self.is_request = True
        self.method = ""
        self.uri = ""
        self.version = ""
        self.status = 0
        self.reason = ""
        self.headers = {}
        self.body = b""
        self.call_id = ""
        self.cseq = 0
        self.cseq_method = ""
        self.from_tag = None
        self.to_tag = None
        self.max_forwards = -1
        self.content_length = -1
        self.via_transport = ""
        self.via_host = ""
        self.via_port = 0
        self.via_branch = None
        self.via_rport = None
        self.via_received = None
        self.error = None

    # -- access -----------------------------------------------------------
    def get(self, name: str, default=None):
        values = self.headers.get(name)
        return values[0] if values else default

    def get_all(self, name: str) -> list:
        return self.headers.get(name, [])

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in FIELDS}

    def __repr__(self):
        if self.is_request:
            return f"<SipMessage {self.method} {self.uri} call-id={self.call_id}>"
        return f"<SipMessage {self.status} {self.reason} call-id={self.call_id}>"


def valid_text(s: str) -> str:
    """Header text as valid Unicode for what leaves the SIP layer (journal, gRPC, JSON,
    HTTP): octets that were not UTF-8, kept by the parser as surrogate escapes so that
    messages are relayed byte for byte, become U+FFFD."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
