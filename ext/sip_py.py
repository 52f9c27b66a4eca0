"""Pure-Python reference SIP parser (RFC 3261 section 7 and 25).

This is the specification that `ext/sip.pyx` must match exactly: the
differential tests feed both the same bytes and compare the results,
including which inputs raise `SipParseError` and the `error` of the message.

Parsing has two outcomes for bad input:
- `SipParseError`: no SIP start line, or no complete header block. Nothing
  may be sent back.
- a `SipMessage` with `error = (status, reason)`: the message is broken but
  carries enough to build a response (RFC 4475 3.1.2: answer 400).
Responses with any error are dropped by the caller (RFC 4475 3.1.2.5, 3.1.2.19).
"""
from __future__ import annotations

import re

from ext.sip_message import (COMPACT, LIST_HEADERS, MAX_CSEQ, MAX_EXPIRES, MAX_HEADERS,
                      MAX_LINE, MAX_MESSAGE, SINGLE_HEADERS, SipMessage, SipParseError)

_TOKEN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
_SCHEME_FIRST = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SCHEME = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-.")
_DIGITS = frozenset(b"0123456789")
_V6 = frozenset("0123456789abcdefABCDEF:.")
_WS = b" \t"
# RFC 3261 25.1: LWS is SP / HTAB only; other Unicode spaces are text.
_LWS_RUN = re.compile("[ \t]+")


def _is_token(s: str) -> bool:
    if not s:
        return False
    for ch in s.encode("utf-8", "surrogateescape"):
        if ch not in _TOKEN:
            return False
    return True


def _is_digits(s: str) -> bool:
    if not s:
        return False
    for ch in s.encode("utf-8", "surrogateescape"):
        if ch not in _DIGITS:
            return False
    return True


def _decode(b: bytes) -> str:
    # SIP is UTF-8 (RFC 3261 25.1); undecodable octets survive round-trips.
    return b.decode("utf-8", "surrogateescape")


def _ascii_upper(s: str) -> str:
    # RFC 3261 7.3.1 case-insensitivity is ASCII only: str.upper() would
    # turn "\u017fip/2.0" (long s) into "SIP/2.0".
    return s.encode("utf-8", "surrogateescape").upper().decode("utf-8", "surrogateescape")


def split_list(value: str) -> list:
    """Split a header value at commas that are outside quotes and <...>.

    Empty entries are kept (as "") so that the caller can reject them."""
    out = []
    depth = 0
    quoted = False
    start = 0
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<":
            depth += 1
        elif c == ">":
            if depth:
                depth -= 1
        elif c == "," and depth == 0:
            out.append(value[start:i].strip(" \t"))
            start = i + 1
        i += 1
    out.append(value[start:].strip(" \t"))
    return out


def parse_params(text: str):
    """Parse `;name=value;name` (text starts after the first ';').

    Returns a list of (name lower-cased, value or None), or None when a
    parameter is empty or not a token (RFC 3261 25.1 generic-param)."""
    out = []
    for raw in _split_outside_quotes(text, ";"):
        part = raw.strip(" \t")
        if not part:
            return None
        eq = part.find("=")
        if eq < 0:
            name, value = part, None
        else:
            name = part[:eq].rstrip(" \t")
            value = part[eq + 1:].strip(" \t")
            if not value:
                return None
            if value[0] == '"':
                if len(value) < 2 or value[-1] != '"' or not _balanced_quote(value):
                    return None
            elif not _is_param_value(value):
                return None
        if not _is_token(name):
            return None
        out.append((name.lower(), value))
    return out


def _is_param_value(v: str) -> bool:
    # token, host (IPv6 reference) or the escaped characters URIs carry.
    for ch in v:
        if ch in " \t;,\"<>":
            return False
    return True


def _balanced_quote(v: str) -> bool:
    i = 1
    n = len(v) - 1
    while i < n:
        if v[i] == "\\":
            i += 2
            continue
        if v[i] == '"':
            return False
        i += 1
    return i == n


def _split_outside_quotes(text: str, sep: str) -> list:
    out = []
    quoted = False
    start = 0
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == sep:
            out.append(text[start:i])
            start = i + 1
        i += 1
    out.append(text[start:])
    return out


def parse_via(value: str):
    """`SIP / 2.0 / UDP host[:port] *(;param)` -> (transport, host, port, params) or None."""
    semi = value.find(";")
    head = value if semi < 0 else value[:semi]
    params = [] if semi < 0 else parse_params(value[semi + 1:])
    if params is None:
        return None
    parts = head.split("/")
    if len(parts) != 3:
        return None
    proto = parts[0].strip(" \t")
    ver = parts[1].strip(" \t")
    rest = parts[2].strip(" \t")
    if _ascii_upper(proto) != "SIP" or not ver:
        return None
    sp = 0
    while sp < len(rest) and rest[sp] not in " \t":
        sp += 1
    transport = rest[:sp]
    sent_by = rest[sp:].strip(" \t")
    if not _is_token(transport) or not sent_by:
        return None
    host, port = parse_hostport(sent_by)
    if host is None:
        return None
    return transport.upper(), host, port, params


# A hostname or IPv4 address: ASCII letters and digits, '-' and '.'.
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


def parse_hostport(text: str):
    """host[:port] with IPv6 references in brackets -> (host, port) or (None, 0)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None, 0
        host = text[:end + 1]
        rest = text[end + 1:]
        # RFC 3261 25.1: IPv6reference = "[" IPv6address "]" (hex, ':' and '.').
        inner = host[1:-1]
        if ":" not in inner or any(ch not in _V6 for ch in inner):
            return None, 0
    else:
        colon = text.find(":")
        host = text if colon < 0 else text[:colon]
        rest = "" if colon < 0 else text[colon:]
        if not host:
            return None, 0
        if not _HOST_CHARS.issuperset(host):
            return None, 0
    port = 0
    if rest:
        if rest[0] != ":" or not _is_digits(rest[1:].strip(" \t")):
            return None, 0
        port = int(rest[1:].strip(" \t"))
        if port > 65535:
            return None, 0
    return host.lower(), port


def parse_name_addr(value: str):
    """name-addr / addr-spec with header params -> (display, uri, params) or None.

    RFC 3261 20.10: without <>, everything after the first ';' is a header
    parameter, never a URI parameter."""
    v = value.strip(" \t")
    display = ""
    if v.startswith('"'):
        i = 1
        n = len(v)
        while i < n:
            if v[i] == "\\":
                i += 2
                continue
            if v[i] == '"':
                break
            i += 1
        if i >= n:
            return None  # RFC 4475 3.1.2.6: unterminated quoted string
        display = v[1:i]
        v = v[i + 1:].lstrip(" \t")
        if not v.startswith("<"):
            return None
    lt = v.find("<")
    if lt >= 0:
        if not display:
            display = v[:lt].strip(" \t")
        gt = v.find(">", lt)
        if gt < 0:
            return None
        uri = v[lt + 1:gt].strip(" \t")
        rest = v[gt + 1:].strip(" \t")
    else:
        semi = v.find(";")
        uri = (v if semi < 0 else v[:semi]).strip(" \t")
        rest = "" if semi < 0 else v[semi:]
    if not uri or ":" not in uri:
        return None
    params = []
    if rest:
        if rest[0] != ";":
            return None
        params = parse_params(rest[1:])
        if params is None:
            return None
    return display, uri, params


def valid_request_uri(uri: str) -> bool:
    """absoluteURI shape: scheme ':' with no LWS, no <>, no controls."""
    colon = uri.find(":")
    if colon <= 0:
        return False
    b = uri.encode("utf-8", "surrogateescape")
    if b[0] not in _SCHEME_FIRST:
        return False
    for ch in b[:colon]:
        if ch not in _SCHEME:
            return False
    for ch in b:
        if ch <= 0x20 or ch in b"<>\"" or ch == 0x7F:
            return False
    return True


def _param(params, name):
    for k, v in params:
        if k == name:
            return v
    return None


def _skip_crlf(data: bytes) -> int:
    # RFC 3261 7.5: CRLFs before the start line are ignored (also on streams,
    # where they are keep-alives, RFC 5626 3.5.1).
    start = 0
    n = len(data)
    while start < n and data[start] in b"\r\n":
        start += 1
    return start


def _head_end(data: bytes, start: int = 0):
    """Offset of the blank line ending the header block, and its length."""
    i = data.find(b"\r\n\r\n", start)
    j = data.find(b"\n\n", start)
    if i < 0 and j < 0:
        return -1, 0
    if i >= 0 and (j < 0 or i < j + 1):
        return i, 4
    return j, 2


def frame_length(buf: bytes) -> int:
    """Stream framing (RFC 3261 18.3): length of the first complete message
    in `buf`, 0 if more bytes are needed. Raises SipParseError when the
    stream cannot be framed (no or bad Content-Length, over the size limit)."""
    start = _skip_crlf(buf)
    end, sep = _head_end(buf, start)
    if end < 0:
        if len(buf) > MAX_MESSAGE:
            raise SipParseError("header block exceeds the message size limit")
        return 0
    head = buf[start:end]
    length = -1
    for raw in head.split(b"\n"):
        line = raw.rstrip(b"\r")
        colon = line.find(b":")
        if colon <= 0 or line[:1] in (b" ", b"\t"):
            continue
        name = line[:colon].strip(b" \t").lower()
        if name == b"content-length" or name == b"l":
            val = line[colon + 1:].strip(b" \t")
            if not val.isdigit() or len(val) > 9 or length >= 0:
                raise SipParseError("stream message has a bad Content-Length")
            length = int(val)
    if length < 0:
        raise SipParseError("stream message has no Content-Length")
    total = end + sep + length
    if total > MAX_MESSAGE:
        raise SipParseError("message exceeds the size limit")
    return total if len(buf) >= total else 0


def parse_message(data: bytes, stream: bool = False) -> SipMessage:
    """Parse one SIP message from a datagram (or one framed stream message).

    On a datagram, octets past Content-Length are ignored (RFC 3261 18.3,
    RFC 4475 3.1.1.8); a body shorter than Content-Length is a 400.
    """
    if len(data) > MAX_MESSAGE:
        raise SipParseError("message exceeds the size limit")
    # RFC 3261 7.5: ignore empty lines before the start line (keep-alives).
    start = _skip_crlf(data)
    n = len(data)
    end, sep = _head_end(data, start)
    if end < 0:
        # A datagram is complete by itself: headers that end with the
        # datagram (no blank line) still form a message without a body.
        if stream or not data.endswith(b"\n"):
            raise SipParseError("no end of the header block")
        end = len(data.rstrip(b"\r\n"))
        sep = n - end
    lines = data[start:end].split(b"\n")
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
    first = _decode(lines[0])
    msg = SipMessage()
    err = None

    if first.startswith("SIP/"):
        msg.is_request = False
        parts = first.split(" ", 2)
        if len(parts) < 2 or len(parts[1]) != 3 or not _is_digits(parts[1]):
            raise SipParseError("malformed Status-Line")
        msg.version = _ascii_upper(parts[0])
        msg.status = int(parts[1])
        msg.reason = parts[2] if len(parts) == 3 else ""
        if msg.status < 100 or msg.status > 699:
            raise SipParseError("status code out of range")  # RFC 4475 3.1.2.19
    else:
        sp = first.find(" ")
        method = first[:sp] if sp > 0 else ""
        if not _is_token(method):
            raise SipParseError("not a SIP start line")
        msg.method = method
        parts = first.split(" ")
        # RFC 3261 25.1: Request-Line = Method SP Request-URI SP SIP-Version CRLF
        if len(parts) != 3 or not parts[1] or not parts[2]:
            err = (400, "Malformed Request-Line")
            msg.uri = parts[1] if len(parts) > 1 else ""
            msg.version = _ascii_upper(parts[-1]) if len(parts) > 2 else ""
        else:
            msg.uri = parts[1]
            msg.version = _ascii_upper(parts[2])
            if not msg.version.startswith("SIP/") or not valid_request_uri(msg.uri):
                err = (400, "Malformed Request-Line")

    # Unfold continuation lines (RFC 3261 7.3.1) into logical header lines.
    logical = []
    for ln in lines[1:]:
        if ln[:1] in (b" ", b"\t"):
            if not logical:
                err = err or (400, "Continuation line before the first header")
                continue
            logical[-1] = logical[-1] + b" " + ln.strip(b" \t")
        else:
            logical.append(ln)
    if len(logical) > MAX_HEADERS:
        raise SipParseError("too many header fields")
    headers = msg.headers
    seen_single = set()
    for ln in logical:
        if len(ln) > MAX_LINE:
            raise SipParseError("header line exceeds the length limit")
        colon = ln.find(b":")
        if colon <= 0:
            err = err or (400, "Malformed header line")
            continue
        name = _decode(ln[:colon]).rstrip(" \t")
        if not _is_token(name):
            err = err or (400, "Malformed header name")
            continue
        # Lower-case only after the token check: token is ASCII (RFC 3261 25.1),
        # and str.lower() maps U+212A (Kelvin sign) to the compact form "k".
        name = name.lower()
        name = COMPACT.get(name, name)
        value = _decode(ln[colon + 1:]).strip(" \t")
        # Collapse runs of LWS that folding left behind (RFC 3261 7.3.1).
        if "  " in value or "\t" in value:
            value = _LWS_RUN.sub(" ", value)
        if name in SINGLE_HEADERS:
            if name in seen_single:
                err = err or (400, f"Multiple {name} header fields")
            seen_single.add(name)
        if name in LIST_HEADERS:
            entries = split_list(value)
            if name == "contact" and value == "*":
                entries = ["*"]
            lst = headers.get(name)
            if lst is None:
                headers[name] = entries
            else:
                lst.extend(entries)
        else:
            lst = headers.get(name)
            if lst is None:
                headers[name] = [value]
            else:
                lst.append(value)

    # -- the fields every layer needs ---------------------------------------
    body_start = end + sep
    avail = n - body_start
    cl = headers.get("content-length")
    if cl is not None:
        v = cl[0]
        if not _is_digits(v) or len(v) > 9:
            err = err or (400, "Bad Content-Length")
            msg.body = data[body_start:]
        else:
            msg.content_length = int(v)
            if msg.content_length > avail:
                err = err or (400, "Content-Length exceeds the message")
                msg.body = data[body_start:]
            else:
                msg.body = data[body_start:body_start + msg.content_length]
    else:
        if stream:
            err = err or (400, "Missing Content-Length")
        msg.body = data[body_start:]

    cid = headers.get("call-id")
    if cid is not None:
        msg.call_id = cid[0]
        if not cid[0] or " " in cid[0]:
            err = err or (400, "Bad Call-ID")
    cseq = headers.get("cseq")
    if cseq is not None:
        parts = cseq[0].split(" ")
        if len(parts) != 2 or not _is_digits(parts[0]) or not _is_token(parts[1]):
            err = err or (400, "Bad CSeq")
        else:
            num = int(parts[0]) if len(parts[0]) <= 12 else MAX_CSEQ + 1
            msg.cseq_method = parts[1]
            if num > MAX_CSEQ:
                err = err or (400, "CSeq number too large")
            else:
                msg.cseq = num
            if msg.is_request and msg.method and parts[1] != msg.method:
                err = err or (400, "CSeq method does not match the Request-Line")
    mf = headers.get("max-forwards")
    if mf is not None:
        v = mf[0]
        if not _is_digits(v) or len(v) > 9 or int(v) > 255:
            err = err or (400, "Bad Max-Forwards")
        else:
            msg.max_forwards = int(v)
    exp = headers.get("expires")
    if exp is not None and exp[0] and (_is_digits(exp[0]) and (len(exp[0]) > 10 or int(exp[0]) > MAX_EXPIRES)):
        err = err or (400, "Expires too large")
    for hname, attr in (("from", "from_tag"), ("to", "to_tag")):
        hv = headers.get(hname)
        if hv is None:
            continue
        na = parse_name_addr(hv[0])
        if na is None:
            err = err or (400, f"Malformed {hname.title()} header")
            continue
        setattr(msg, attr, _param(na[2], "tag"))
    vias = headers.get("via")
    if vias:
        top = parse_via(vias[0])
        if top is None:
            err = err or (400, "Malformed Via")
        else:
            msg.via_transport, msg.via_host, msg.via_port, params = top
            msg.via_branch = _param(params, "branch")
            for k, v in params:
                if k == "rport":
                    if v is None:
                        msg.via_rport = -1
                    elif _is_digits(v) and len(v) <= 5:
                        msg.via_rport = int(v)
                elif k == "received":
                    msg.via_received = v
        for extra in vias[1:]:
            if parse_via(extra) is None:
                err = err or (400, "Malformed Via")
                break
    if msg.is_request:
        for required in ("to", "from", "call-id", "cseq", "via"):
            if required not in headers:
                err = err or (400, f"Missing {required} header")
                break
    msg.error = err
    return msg


_TO_TAG = re.compile(rb";[ \t]*tag[ \t]*=", re.I)


def initial_invite(data: bytes) -> bool:
    """The overload check's look at a raw datagram, before any parsing: False when it is
    surely not an out-of-dialog INVITE (another method, or a To header with a tag), True
    when it may be one (the parsed message decides)."""
    if not data.startswith(b"INVITE "):
        return False
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    for line in head.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() in (b"to", b"t"):
            return _TO_TAG.search(value) is None
    return True
