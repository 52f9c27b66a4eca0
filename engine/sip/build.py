"""Serialising SIP responses and requests."""
from __future__ import annotations

import os
import secrets

from .message import pretty

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

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, INFO, UPDATE"
# No option tags are claimed: session timers (RFC 4028), Replaces and 100rel are not implemented.
SUPPORTED = ""
_TAG_BYTES = 6


def new_tag() -> str:
    return secrets.token_hex(_TAG_BYTES)


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


def response(msg, status: int, source, to_tag: str | None = None, reason: str | None = None,
             headers: list | tuple = (), body: bytes = b"", server: str = "") -> bytes:
    """A response to request `msg` received from `source` (RFC 3261 8.2.6.2)."""
    if reason is None:
        reason = REASONS.get(status, "Unknown")
    h = msg.headers
    out = [f"SIP/2.0 {status} {reason}"]
    vias = h.get("via")
    if vias:
        if msg.via_host:
            out.append("Via: " + top_via(msg, source))
        else:
            out.append("Via: " + vias[0])
        for v in vias[1:]:
            out.append("Via: " + v)
    frm = h.get("from")
    if frm:
        out.append("From: " + frm[0])
    to = h.get("to")
    if to:
        to = to[0]
        if to_tag is not None and msg.to_tag is None and status != 100:
            to = f"{to};tag={to_tag}"
        out.append("To: " + to)
    cid = h.get("call-id")
    if cid:
        out.append("Call-ID: " + cid[0])
    cseq = h.get("cseq")
    if cseq:
        out.append("CSeq: " + cseq[0])
    if server:
        out.append("Server: " + server)
    for name, value in headers:
        out.append(f"{pretty(name)}: {value}")
    out.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(out) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def request(method: str, uri: str, headers: list, body: bytes = b"") -> bytes:
    """A request; `headers` is an ordered list of (name, value), Via first."""
    out = [f"{method} {uri} SIP/2.0"]
    for name, value in headers:
        out.append(f"{pretty(name)}: {value}")
    out.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(out) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
