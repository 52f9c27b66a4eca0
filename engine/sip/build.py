"""Serialising SIP responses and requests."""
from __future__ import annotations

import os
import re
import secrets

from engine.sip.errors import HeaderInjectionError
from ext.sip_message import pretty

# RFC 3261 25.1: no control characters but HTAB in a header line; CR or LF would
# end the header and let the value add others (header injection).
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_UNSAFE_NAME = re.compile(r"[\x00-\x20\x7f:]")


def has_control(value: str) -> bool:
    """Whether `value` holds a character no header the engine writes may carry."""
    return _UNSAFE.search(value) is not None


def check_header(name: str, value: str) -> None:
    """Raise HeaderInjectionError unless `name: value` is one header line."""
    if _UNSAFE_NAME.search(name) or not name:
        raise HeaderInjectionError(f"header name {name[:40]!r}", name)
    if _UNSAFE.search(value):
        raise HeaderInjectionError(f"{pretty(name)} header", value)


def check_text(what: str, value: str) -> None:
    """Raise HeaderInjectionError if `value` (headed for a SIP header) has CTLs."""
    if _UNSAFE.search(value):
        raise HeaderInjectionError(what, value)

REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    406: "Not Acceptable", 407: "Proxy Authentication Required", 408: "Request Timeout",
    415: "Unsupported Media Type", 416: "Unsupported URI Scheme", 420: "Bad Extension",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
    482: "Loop Detected", 483: "Too Many Hops", 486: "Busy Here",
    487: "Request Terminated", 488: "Not Acceptable Here", 491: "Request Pending",
    500: "Server Internal Error", 501: "Not Implemented", 503: "Service Unavailable",
    504: "Server Time-out", 505: "Version Not Supported", 513: "Message Too Large",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere",
}

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, INFO, UPDATE, MESSAGE"
# No option tags are claimed: session timers (RFC 4028), Replaces and 100rel are not implemented.
SUPPORTED = ""
_TAG_BYTES = 6
_TAG_CHARS = 2 * _TAG_BYTES
_TAG_POOL = 4096        # random octets fetched per refill of the tag pool
_tag_hex = ""
_tag_pos = 0


def new_tag() -> str:
    """48 random bits as 12 hex digits (RFC 3261 19.3 asks for at least 32).

    The octets come from the OS's CSPRNG a pool at a time rather than one
    getrandom() call per tag."""
    global _tag_hex, _tag_pos
    pos = _tag_pos
    if pos >= len(_tag_hex):
        _tag_hex = secrets.token_hex(_TAG_POOL)
        pos = 0
    _tag_pos = pos + _TAG_CHARS
    return _tag_hex[pos:pos + _TAG_CHARS]


_branch_prefix = "z9hG4bK" + os.urandom(4).hex()
_branch_counter = 0


def new_branch() -> str:
    """RFC 3261 8.1.1.7: unique across space and time, with the magic cookie."""
    global _branch_counter
    _branch_counter += 1
    return f"{_branch_prefix}.{_branch_counter:x}"


def top_via(msg, source) -> str:
    """The top Via of a request as the response must carry it:
    RFC 3261 18.2.1 `received` when sent-by differs from the source address,
    RFC 3581 4 `rport` filled in when the client asked for it."""
    via = msg.headers["via"][0]
    host = source[0]
    if msg.via_rport == -1:
        parts = [p for p in via.split(";") if p.strip().lower() != "rport"]
        via = ";".join(parts) + f";received={host};rport={source[1]}"
    elif msg.via_host != host and msg.via_received is None:
        via = f"{via};received={host}"
    return via


_SENT_KEYS: dict = {}


def sent_key(status) -> str:
    """The stats counter of responses sent with `status` (or requests of a method)."""
    key = _SENT_KEYS.get(status)
    if key is None:
        key = _SENT_KEYS[status] = f"sent_{status}"
    return key


_STATUS_LINES: dict = {}   # status -> "SIP/2.0 status reason" with the default reason


def _status_line(status: int, reason: str | None) -> str:
    if reason is not None:
        return f"SIP/2.0 {status} {reason}"
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"SIP/2.0 {status} {REASONS.get(status, 'Unknown')}"
    return line


def response(msg, status: int, source, to_tag: str | None = None, reason: str | None = None,
             headers: list | tuple = (), body: bytes = b"", server: str = "",
             via_params: str = "") -> bytes:
    """A response to request `msg` received from `source` (RFC 3261 8.2.6.2).
    `via_params` (";name=value..." of the engine's own making, e.g. RFC 7339 `oc`) are
    added to the top Via."""
    h = msg.headers
    if reason is not None:
        check_text("reason phrase", reason)
    out = [_status_line(status, reason)]
    append = out.append
    vias = h.get("via")
    if vias:
        if msg.via_host:
            append("Via: " + top_via(msg, source) + via_params)
        else:
            append("Via: " + vias[0] + via_params)
        if len(vias) > 1:
            for v in vias[1:]:
                append("Via: " + v)
    frm = h.get("from")
    if frm:
        append("From: " + frm[0])
    to = h.get("to")
    if to:
        to = to[0]
        if to_tag is not None and msg.to_tag is None and status != 100:
            append(f"To: {to};tag={to_tag}")
        else:
            append("To: " + to)
    cid = h.get("call-id")
    if cid:
        append("Call-ID: " + cid[0])
    cseq = h.get("cseq")
    if cseq:
        append("CSeq: " + cseq[0])
    if server:
        append("Server: " + server)
    for name, value in headers:
        check_header(name, value)
        append(f"{pretty(name)}: {value}")
    append(f"Content-Length: {len(body)}\r\n\r\n")
    data = "\r\n".join(out).encode("utf-8", "surrogateescape")
    return data + body if body else data


def request(method: str, uri: str, headers: list, body: bytes = b"") -> bytes:
    """A request; `headers` is an ordered list of (name, value), Via first.

    Raises HeaderInjectionError for a control character in the method, the URI or
    any header, whoever supplied it."""
    if _UNSAFE_NAME.search(method) or _UNSAFE.search(uri) or " " in uri:
        raise HeaderInjectionError("request line", f"{method} {uri}")
    # One search over all the names and one over all the values (joined by HTAB, which
    # a value may hold); only a message that fails them is checked header by header,
    # for the error that names the header.
    names = [name for name, _ in headers]
    if (not all(names) or _UNSAFE_NAME.search("".join(names))
            or _UNSAFE.search("\t".join([value for _, value in headers]))):
        for name, value in headers:
            check_header(name, value)
    out = [f"{method} {uri} SIP/2.0"]
    out += [f"{pretty(name)}: {value}" for name, value in headers]
    out.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(out) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
