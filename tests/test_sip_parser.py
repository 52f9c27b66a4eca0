"""SIP parser tests, run against both implementations (ids `c` and `py`).

`ext/sip_py.py` is the specification; `ext/sip.pyx` must give the
same `as_dict()` for every input, raise `SipParseError` for exactly the same
inputs and nothing else ever. The differential tests at the end check that
on generated, mutated and random input.
"""
from __future__ import annotations

import os
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext import sip_py as parser_py
from ext.sip_message import (COMPACT, FIELDS, MAX_HEADERS, MAX_LINE, MAX_MESSAGE,
                                SipMessage, SipParseError)

try:
    from ext import sip as sip_c
    _C_MISSING = None
except ImportError as exc:  # not built: only the reference is tested
    sip_c = None
    _C_MISSING = f"ext.sip is not importable ({exc}); build it with BATON_EXT=sip setup.py build_ext --inplace"

if os.environ.get("BATON_NO_EXTENSIONS") and _C_MISSING is None:
    _C_MISSING = "BATON_NO_EXTENSIONS=1: the Cython parser is switched off for this run"

IMPLS = [
    pytest.param(sip_c, id="c", marks=pytest.mark.skipif(_C_MISSING is not None, reason=str(_C_MISSING))),
    pytest.param(parser_py, id="py"),
]
needs_c = pytest.mark.skipif(_C_MISSING is not None, reason=str(_C_MISSING))

DATA = pathlib.Path(__file__).parent / "data" / "rfc4475"


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def msg(*lines: str, body: bytes = b"", eol: bytes = b"\r\n") -> bytes:
    return eol.join(ln.encode("utf-8") for ln in lines) + eol + eol + body


BASE = (
    "OPTIONS sip:bob@example.com SIP/2.0",
    "Via: SIP/2.0/UDP client.example.com:5060;branch=z9hG4bK776asdhds",
    "To: Bob <sip:bob@example.com>",
    'From: "Alice" <sip:alice@example.com>;tag=1928301774',
    "Call-ID: a84b4c76e66710@client.example.com",
    "CSeq: 314159 OPTIONS",
    "Max-Forwards: 70",
)


def options(*extra: str, body: bytes = b"", via: str | None = None) -> bytes:
    lines = list(BASE)
    if via is not None:
        lines[1] = "Via: " + via
    return msg(*lines, *extra, body=body)


def with_line(line: str) -> bytes:
    """BASE with `line` replacing the header of the same name, or appended."""
    name = line.split(":")[0] + ":"
    lines = [line if ln.startswith(name) else ln for ln in BASE]
    return msg(*lines) if line in lines else msg(*BASE, line)


SDP = (b"v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
       b"t=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
INVITE = msg(
    "INVITE sip:service@127.0.0.1:5060 SIP/2.0",
    "Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0",
    "From: sipp <sip:sipp@127.0.0.1:5061>;tag=4242SIPpTag001",
    "To: service <sip:service@127.0.0.1:5060>",
    "Call-ID: 1-4242@127.0.0.1",
    "CSeq: 1 INVITE",
    "Contact: sip:sipp@127.0.0.1:5061",
    "Max-Forwards: 70",
    "Subject: Performance Test",
    "Content-Type: application/sdp",
    f"Content-Length: {len(SDP)}",
    body=SDP,
)


# -- RFC 4475 torture messages ------------------------------------------------------
# Parse-level outcome only; the application answers (416, 420, 505...) come later.
DROP = {"bigcode"}                      # SipParseError: nothing may be sent back
RESPONSE_ERROR = {"scalarlg": "CSeq number too large"}
BAD_REQUEST = {
    "badinv01": "Malformed Via",
    "clerr": "Content-Length exceeds the message",
    "ncl": "Bad Content-Length",
    "scalar02": "CSeq number too large",
    "quotbal": "Malformed To header",
    "ltgtruri": "Malformed Request-Line",
    "lwsruri": "Malformed Request-Line",
    "lwsstart": "Malformed Request-Line",
    "trws": "Malformed Request-Line",
    "mismatch01": "CSeq method does not match the Request-Line",
    "mismatch02": "CSeq method does not match the Request-Line",
    "insuf": "Missing to header",
    "multi01": "Multiple cseq header fields",
    "mcl01": "Multiple content-length header fields",
}
ACCEPTED_INVALID = {
    "badbranch", "unkscm", "novelsc", "unksm2", "bext01", "invut", "regaut01", "zeromf",
    "cparam01", "cparam02", "regescrt", "sdp01", "inv2543", "escruri", "baddate", "regbadct",
    "badaspec", "baddn", "badvers",
    "bcast",  # a well-formed response; the transport never answers toward broadcast
}
TORTURE = sorted(DATA.glob("*/*.dat"))


def test_torture_files_are_all_classified():
    assert len(TORTURE) == 49 and (DATA / "README.md").is_file()
    for path in TORTURE:
        name = path.stem
        if path.parent.name == "valid":
            assert name not in DROP | set(RESPONSE_ERROR) | set(BAD_REQUEST) | ACCEPTED_INVALID
        else:
            assert name in DROP | set(RESPONSE_ERROR) | set(BAD_REQUEST) | ACCEPTED_INVALID, name
    # CRLF files, as in the RFC (a re-saved copy would change every message)
    assert b"\r\n" in (DATA / "valid" / "wsinv.dat").read_bytes()


@pytest.mark.parametrize("path", TORTURE, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_torture(impl, path):
    data = path.read_bytes()
    name = path.stem
    if name in DROP:
        with pytest.raises(SipParseError):
            impl.parse_message(data)
        return
    m = impl.parse_message(data)
    assert type(m) is SipMessage
    if name in RESPONSE_ERROR:
        assert not m.is_request and m.error == (400, RESPONSE_ERROR[name])
    elif name in BAD_REQUEST:
        assert m.is_request and m.error == (400, BAD_REQUEST[name])
    else:
        assert m.error is None, m.error


def _torture(impl, name: str) -> SipMessage:
    return impl.parse_message((DATA / "valid" / f"{name}.dat").read_bytes())


def test_wsinv_fields(impl):
    m = _torture(impl, "wsinv")
    assert (m.method, m.uri, m.version) == ("INVITE", "sip:vivekg@chair-dnrc.example.com;unknownparam", "SIP/2.0")
    assert m.to_tag == "1918181833n" and m.from_tag == "98asjd8"
    assert m.max_forwards == 68 and (m.cseq, m.cseq_method) == (9, "INVITE")
    assert m.call_id == "wsinv.ndaksdj@192.0.2.1"
    assert (m.via_transport, m.via_host, m.via_port, m.via_branch) == ("UDP", "192.0.2.2", 0, "390skdjuw")
    assert len(m.headers["via"]) == 3
    assert m.headers["newfangledheader"] == ["newfangled value continued newfangled value"]
    assert m.headers["subject"] == [""]          # "s :" is the compact Subject, empty
    assert m.content_length == 150 and len(m.body) == 150


def test_dblreq_takes_only_the_first_request(impl):
    m = _torture(impl, "dblreq")
    assert m.method == "REGISTER" and m.error is None
    assert m.content_length == 0 and m.body == b""
    assert m.call_id == "dblreq.0ha0isndaksdj99sdfafnl3lk233412"


def test_intmeth_method(impl):
    m = _torture(impl, "intmeth")
    assert m.method == "!interesting-Method0123456789_*+`.%indeed'~" == m.cseq_method
    assert m.headers["extensionheader-!.%*+_`'~"] == ["\ufeff\u5927\u505c\u96fb"]  # UTF-8 with a BOM
    assert m.via_branch == "z9hG4bK-.!%66*_+`'~"


def test_longreq_counts(impl):
    m = _torture(impl, "longreq")
    assert len(m.headers["via"]) == 34
    assert len(m.headers) == 10 and all(len(v) == 1 for k, v in m.headers.items() if k != "via")
    assert m.from_tag == "1" + "298" * 50 + "2424" and m.via_transport == "TCP"


def test_transports_via_list(impl):
    m = _torture(impl, "transports")
    assert len(m.headers["via"]) == 5
    assert [v.split()[0] for v in m.headers["via"]] == [
        "SIP/2.0/UDP", "SIP/2.0/SCTP", "SIP/2.0/TLS", "SIP/2.0/UNKNOWN", "SIP/2.0/TCP"]
    assert m.content_length == 0     # "l: 0"


def test_responses(impl):
    m = _torture(impl, "unreason")
    assert (m.is_request, m.status) == (False, 200)
    assert m.reason == "= 2**3 * 5**2 но сто девяносто девять - простое"
    m = _torture(impl, "noreason")
    assert (m.status, m.reason, m.error) == (100, "", None)


# -- hand-written cases ----------------------------------------------------------------
def test_typical_invite(impl):
    m = impl.parse_message(INVITE)
    assert type(m) is SipMessage and m.error is None
    assert m.as_dict() == {
        "is_request": True, "method": "INVITE", "uri": "sip:service@127.0.0.1:5060",
        "version": "SIP/2.0", "status": 0, "reason": "",
        "headers": {
            "via": ["SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0"],
            "from": ["sipp <sip:sipp@127.0.0.1:5061>;tag=4242SIPpTag001"],
            "to": ["service <sip:service@127.0.0.1:5060>"],
            "call-id": ["1-4242@127.0.0.1"], "cseq": ["1 INVITE"],
            "contact": ["sip:sipp@127.0.0.1:5061"], "max-forwards": ["70"],
            "subject": ["Performance Test"], "content-type": ["application/sdp"],
            "content-length": [str(len(SDP))],
        },
        "body": SDP, "call_id": "1-4242@127.0.0.1", "cseq": 1, "cseq_method": "INVITE",
        "from_tag": "4242SIPpTag001", "to_tag": None, "max_forwards": 70,
        "content_length": len(SDP), "via_transport": "UDP", "via_host": "127.0.0.1",
        "via_port": 5061, "via_branch": "z9hG4bK-4242-1-0", "via_rport": None,
        "via_received": None, "error": None,
    }


def test_compact_forms(impl):
    data = msg(
        "INVITE sip:bob@example.com SIP/2.0",
        "v: SIP/2.0/UDP h.example.com;branch=z9hG4bK1",
        "f: <sip:a@example.com>;tag=a1",
        "T: <sip:bob@example.com>;tag=b2",
        "i: cid@example.com",
        "CSeq: 1 INVITE",
        "m: <sip:a@h.example.com>, <sip:a@h2.example.com>",
        "c: application/sdp",
        "K: timer, 100rel",
        "s: hello",
        "l: 4",
        body=b"body",
    )
    m = impl.parse_message(data)
    assert m.error is None
    assert set(m.headers) == {"via", "from", "to", "call-id", "cseq", "contact", "content-type",
                              "supported", "subject", "content-length"}
    assert m.headers["supported"] == ["timer", "100rel"]
    assert m.headers["contact"] == ["<sip:a@h.example.com>", "<sip:a@h2.example.com>"]
    assert (m.from_tag, m.to_tag, m.call_id) == ("a1", "b2", "cid@example.com")
    assert (m.content_length, m.body) == (4, b"body")


def test_every_compact_form(impl):
    for letter, full in COMPACT.items():
        m = impl.parse_message(options(f"{letter.upper()}: x", f"{letter}: y"))
        assert m.get_all(full)[-2:] == ["x", "y"], letter
        assert letter not in m.headers and letter.upper() not in m.headers


def test_list_headers_split_outside_quotes_and_brackets(impl):
    m = impl.parse_message(options(
        'Contact: "Doe, John" <sip:j@example.com;a=1,2>;q=0.5 , <sip:k@example.com>',
        "Allow: INVITE,ACK , BYE", "Record-Route: <sip:p1;lr>", "Record-Route: <sip:p2;lr>",
        "Warning: 399 h \"a, b\""))
    assert m.headers["contact"] == ['"Doe, John" <sip:j@example.com;a=1,2>;q=0.5', "<sip:k@example.com>"]
    assert m.headers["allow"] == ["INVITE", "ACK", "BYE"]
    assert m.headers["record-route"] == ["<sip:p1;lr>", "<sip:p2;lr>"]
    assert m.headers["warning"] == ['399 h "a, b"']       # not a list header


def test_folding(impl):
    data = (b"OPTIONS sip:bob@example.com SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP\r\n  client.example.com\r\n\t;branch=z9hG4bKf\r\n"
            b"To: <sip:bob@example.com>\r\nFrom: <sip:a@example.com>\r\n ;tag=99\r\n"
            b"Call-ID: f@x\r\nCSeq: 1\r\n OPTIONS\r\n"
            b"Subject: one\r\n two \t\r\n\t three\r\n"
            b"X-Folded-Name\r\n : value\r\n\r\n")
    m = impl.parse_message(data)
    assert m.error is None
    assert m.headers["subject"] == ["one two three"]
    assert m.headers["x-folded-name"] == ["value"]
    assert (m.via_host, m.via_branch, m.from_tag, m.cseq, m.cseq_method) == (
        "client.example.com", "z9hG4bKf", "99", 1, "OPTIONS")


def test_continuation_before_first_header(impl):
    m = impl.parse_message(msg(BASE[0], " folded", *BASE[1:]))
    assert m.error == (400, "Continuation line before the first header")


def test_lf_line_endings_and_leading_crlf(impl):
    data = msg(*BASE, "Content-Length: 4", body=b"body", eol=b"\n")
    for prefix in (b"", b"\r\n", b"\n\n", b"\r\n\r\n"):
        m = impl.parse_message(prefix + data)
        assert (m.error, m.body, m.via_branch) == (None, b"body", "z9hG4bK776asdhds"), prefix


def test_ipv6_via(impl):
    m = impl.parse_message(options(
        via="SIP/2.0/UDP [2001:DB8::10]:5070;branch=z9hG4bKv6;rport;received=[2001:db8::1]"))
    assert m.error is None
    assert (m.via_host, m.via_port, m.via_rport, m.via_received) == ("[2001:db8::10]", 5070, -1, "[2001:db8::1]")
    for bad in ("[2001:db8::zz]:5070", "[]", "[2001:db8::10", "[::1] :5060", "[::1]:70000", "[fe80::1%eth0]"):
        m = impl.parse_message(options(via=f"SIP/2.0/UDP {bad};branch=z9hG4bK"))
        assert m.error == (400, "Malformed Via"), bad
        assert m.via_host == ""


def test_rport_received(impl):
    m = impl.parse_message(options(
        via="SIP/2.0/TCP Host.Example.COM ;RPort=5062; received=192.0.2.7;branch=z9hG4bKr"))
    assert (m.via_transport, m.via_host, m.via_port) == ("TCP", "host.example.com", 0)
    assert (m.via_rport, m.via_received, m.via_branch) == (5062, "192.0.2.7", "z9hG4bKr")
    m = impl.parse_message(options(via="SIP/2.0/udp h:5080;rport=abc;received;branch"))
    assert (m.via_transport, m.via_port) == ("UDP", 5080)
    assert (m.via_rport, m.via_received, m.via_branch) == (None, None, None)
    assert m.error is None


def test_tags(impl):
    m = impl.parse_message(with_line('To: "B\\"ob" <sip:bob@example.com;tag=uri>;TAG="q"'))
    assert (m.to_tag, m.from_tag, m.error) == ('"q"', "1928301774", None)
    m = impl.parse_message(with_line("To: sip:bob@example.com;tag=x;tag=y"))
    assert (m.to_tag, m.error) == ("x", None)
    m = impl.parse_message(with_line("To: sip:bob@example.com;tag;tag=y"))
    assert (m.to_tag, m.error) == (None, None)
    m = impl.parse_message(with_line('To: "Bob <sip:bob@example.com>'))
    assert m.error == (400, "Malformed To header")


@pytest.mark.parametrize("line, error", [
    ("Call-ID: a b", "Bad Call-ID"),
    ("Max-Forwards: 256", "Bad Max-Forwards"),
    ("Expires: 4294967296", "Expires too large"),
    ("Content-Length: 5", "Content-Length exceeds the message"),
    ("Content-Length: -1", "Bad Content-Length"),
    ("X-No-Colon", "Malformed header line"),
    ("Bad Name: x", "Malformed header name"),
    ("Via: SIP/2.0/UDP h;branch=1, SIP/2.0/UDP", "Malformed Via"),
])
def test_field_errors(impl, line, error):
    assert impl.parse_message(with_line(line)).error == (400, error)


def test_multiple_single_headers(impl):
    m = impl.parse_message(options("Call-ID: second@x", "i: third@x"))
    assert m.error == (400, "Multiple call-id header fields")
    assert m.call_id == "a84b4c76e66710@client.example.com" and len(m.headers["call-id"]) == 3


def test_cseq_limits(impl):
    m = impl.parse_message(with_line("CSeq: 2147483647 OPTIONS"))
    assert (m.cseq, m.error) == (2 ** 31 - 1, None)
    m = impl.parse_message(with_line("CSeq: 2147483648 OPTIONS"))
    assert (m.cseq, m.cseq_method, m.error) == (0, "OPTIONS", (400, "CSeq number too large"))
    m = impl.parse_message(with_line("CSeq: 1  INVITE"))
    assert (m.cseq, m.error) == (1, (400, "CSeq method does not match the Request-Line"))
    m = impl.parse_message(with_line("CSeq: 1"))
    assert (m.cseq, m.cseq_method, m.error) == (0, "", (400, "Bad CSeq"))


def test_datagram_without_blank_line(impl):
    data = options()[:-2]             # headers end with the datagram
    m = impl.parse_message(data)
    assert m.error is None and m.body == b""
    with pytest.raises(SipParseError):
        impl.parse_message(data, stream=True)
    with pytest.raises(SipParseError):
        impl.parse_message(data[:-2])


@pytest.mark.parametrize("data", [
    b"", b"\r\n\r\n", b"garbage\r\n\r\n", b" INVITE sip:a@b SIP/2.0\r\n\r\n",
    b"INVITE\r\n\r\n", b"SIP/2.0\r\n\r\n", b"SIP/2.0 20 OK\r\n\r\n", b"SIP/2.0 099 x\r\n\r\n",
    b"SIP/2.0 700 Big\r\n\r\n", b"IN\xc3\xa9 sip:a@b SIP/2.0\r\n\r\n",
])
def test_drop(impl, data):
    with pytest.raises(SipParseError):
        impl.parse_message(data)


# -- stream framing (RFC 3261 18.3) ---------------------------------------------------------
def test_frame_pipelined(impl):
    first = options("Content-Length: 4", body=b"abcd")
    second = INVITE
    buf = first + second
    n = impl.frame_length(buf)
    assert n == len(first)
    m = impl.parse_message(buf[:n], stream=True)
    assert (m.error, m.body) == (None, b"abcd")
    assert impl.frame_length(buf[n:]) == len(second)
    assert impl.parse_message(buf[n:], stream=True).body == SDP
    assert impl.frame_length(bytearray(buf)) == len(first)


def test_frame_fragmented(impl):
    for cut in range(len(INVITE)):
        assert impl.frame_length(INVITE[:cut]) == 0, cut
    assert impl.frame_length(INVITE) == len(INVITE)
    assert impl.frame_length(INVITE + b"\r\n") == len(INVITE)


def test_frame_keepalive(impl):
    # RFC 3261 7.5 / RFC 5626 3.5.1: CRLFs before a message are not a message.
    assert impl.frame_length(b"\r\n\r\n") == 0
    assert impl.frame_length(b"\r\n\r\n" + INVITE) == 4 + len(INVITE)
    assert impl.parse_message(b"\r\n\r\n" + INVITE, stream=True).body == SDP


@pytest.mark.parametrize("data", [
    options(),                                                  # no Content-Length
    options("Content-Length: x"),
    options("Content-Length: 1234567890"),
    options("Content-Length: 1", "l: 1", body=b"x"),
    options("Content-Length: 65535"),                           # over the size limit
])
def test_frame_errors(impl, data):
    with pytest.raises(SipParseError):
        impl.frame_length(data)


def test_stream_missing_content_length(impl):
    assert impl.parse_message(options(), stream=True).error == (400, "Missing Content-Length")
    assert impl.parse_message(options()).error is None


# -- limits ------------------------------------------------------------------------
def test_message_size_limit(impl):
    filler = "X-Pad: " + "p" * 8000
    big = options(*[filler] * 8, body=b"b" * 2000)
    assert len(big) > MAX_MESSAGE
    with pytest.raises(SipParseError):
        impl.parse_message(big)
    with pytest.raises(SipParseError):
        impl.frame_length(b"INVITE sip:a@b SIP/2.0\r\nX: " + b"y" * MAX_MESSAGE)
    assert impl.frame_length(b"INVITE sip:a@b SIP/2.0\r\nX: " + b"y" * 60000) == 0
    at_limit = options(body=b"b" * (MAX_MESSAGE - len(options())))
    assert len(at_limit) == MAX_MESSAGE and impl.parse_message(at_limit).error is None


def test_header_count_limit(impl):
    # MAX_HEADERS counts header fields (logical lines), the start line excluded
    room = MAX_HEADERS - (len(BASE) - 1)
    assert impl.parse_message(options(*[f"X-H{i}: v" for i in range(room)])).error is None
    with pytest.raises(SipParseError):
        impl.parse_message(options(*[f"X-H{i}: v" for i in range(room + 1)]))
    # continuation lines are part of their header field, not new fields
    folded = options("Subject: s" + "\r\n s" * 300)
    assert impl.parse_message(folded).headers["subject"] == [" ".join(["s"] * 301)]


def test_line_length_limit(impl):
    head = "X-Long: "
    ok = options(head + "v" * (MAX_LINE - len(head)))
    assert impl.parse_message(ok).error is None
    with pytest.raises(SipParseError):
        impl.parse_message(options(head + "v" * (MAX_LINE - len(head) + 1)))
    # unfolding joins physical lines into one logical line, which is what is limited
    half = "v" * (MAX_LINE // 2)
    with pytest.raises(SipParseError):
        impl.parse_message(options(head + half + "\r\n " + half))


# -- reference fixes: ASCII-only case folding and LWS ------------------------------------
def test_ascii_only_case_folding(impl):
    # U+212A KELVIN SIGN lower-cases to "k" (compact Supported) under str.lower()
    m = impl.parse_message(options("\u212a: 100rel"))
    assert m.error == (400, "Malformed header name") and "supported" not in m.headers
    # U+017F LATIN SMALL LETTER LONG S upper-cases to "S"
    m = impl.parse_message(options().replace(b"SIP/2.0\r\nVia", "\u017fip/2.0\r\nVia".encode()))
    assert (m.version, m.error) == ("\u017fIP/2.0", (400, "Malformed Request-Line"))
    m = impl.parse_message(options(via="\u017fIP/2.0/UDP h;branch=z9hG4bK1"))
    assert m.error == (400, "Malformed Via")
    m = impl.parse_message(options().replace(b"SIP/2.0\r\nVia", b"sip/2.0\r\nVia"))
    assert (m.version, m.error) == ("SIP/2.0", None)


def test_only_sp_and_htab_are_lws(impl):
    m = impl.parse_message(options("Subject: a\u00a0b\x0bc\u3000d\t e  f"))
    assert m.headers["subject"] == ["a\u00a0b\x0bc\u3000d e f"]


def test_parser_selection():
    from ext.kernels import sip as parser
    if os.environ.get("BATON_NO_EXTENSIONS"):
        assert parser.IMPLEMENTATION == "py" and parser.parse_message is parser_py.parse_message
    elif sip_c is not None:
        assert parser.IMPLEMENTATION == "c"
        assert parser.parse_message is sip_c.parse_message and parser.frame_length is sip_c.frame_length


@needs_c
def test_c_accepts_buffers():
    m = sip_c.parse_message(bytearray(INVITE))
    assert m.as_dict() == parser_py.parse_message(INVITE).as_dict()
    assert sip_c.frame_length(memoryview(INVITE)) == len(INVITE)
    with pytest.raises(TypeError):
        sip_c.parse_message("INVITE sip:a@b SIP/2.0\r\n\r\n")


# -- differential: the Cython parser against the reference -------------------------------------
def _snapshot(m: SipMessage) -> dict:
    assert type(m) is SipMessage
    # type-strict: True == 1 and b"" == bytearray() must not hide a difference
    return {f: (type(getattr(m, f)).__name__, getattr(m, f)) for f in FIELDS}


def _outcome(mod, data: bytes, stream: bool):
    try:
        return "ok", _snapshot(mod.parse_message(data, stream))
    except SipParseError as e:
        return "drop", str(e)


def _frame(mod, data: bytes):
    try:
        return "ok", mod.frame_length(data)
    except SipParseError as e:
        return "drop", str(e)


def assert_same(data: bytes):
    # Identical fields, or the same SipParseError text; any other exception fails the test.
    for stream in (False, True):
        assert _outcome(sip_c, data, stream) == _outcome(parser_py, data, stream), (stream, data)
    assert _frame(sip_c, data) == _frame(parser_py, data), data


FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_GOOD_METHODS = ["INVITE", "ACK", "BYE", "OPTIONS", "REGISTER", "NEWMETHOD", "!odd-Method_*+`.%'~"]
_METHODS = _GOOD_METHODS + ["invite", "INV ITE", "", "IN\u00e9"]
_WS = st.sampled_from(["", " ", " ", " ", "  ", "\t", " \t "])
_SP = st.sampled_from([" ", " ", " ", " ", "  ", "\t", ""])
_TEXT = st.text(alphabet=st.sampled_from(list("aZ09 \t;,:=\"<>@[]/\\.-_~%*!\u00e9\u212a\u00a0\x00\x7f")), max_size=24)
_EOL_FOLD = ["\r\n ", "\r\n\t", "\r\n  ", "\n "]
_TRAIL = ["", "", " ", "\t"]
_URIS = ["sip:bob@example.com", "sips:[2001:db8::1]:5061", "<sip:x@y>", "tel:+1555", "sip:a b@c", "x",
         ":nope", "1sip:a", "sip:%41@h"]
_VERSIONS = ["SIP/2.0", "sip/2.0", "SIP/7.0", "HTTP/1.1", "", "SIP/2.0 ", "\u017fip/2.0"]
_STATUS_VERSIONS = ["SIP/2.0", "SIP/2.0", "sip/2.0", "SIP/2.0\u00e9"]
_CODES = ["100", "180", "200", "404", "699", "700", "099", "20", "2000", "abc"]
_REASONS = ["", " ", " OK", " Ringing now", " \u043e\u043a"]


# Generators for the differential tests. The value pools mix well-formed and
# broken spellings so that every error branch of both parsers is reached; the
# weights keep most start lines valid, since only the first error is reported.
@st.composite
def _via(draw):
    proto = draw(st.sampled_from(["SIP", "SIP", "sip", "SIPP", "S IP", "\u017fip", ""]))
    ver = draw(st.sampled_from(["2.0", "2.0", " 2.0 ", "", "7.0/x"]))
    transport = draw(st.sampled_from(["UDP", "tcp", "TLS", "SCTP", "WS", "", "U\u00e9"]))
    host = draw(st.sampled_from(["192.0.2.1", "Example.COM", "[2001:DB8::10]", "[::1]", "[zz]",
                                 "[]", "[::1", "bad_host", "", "h\u00e9", "[\u0130]"]))
    port = draw(st.sampled_from(["", "", ":5060", ":5070", ": 5061", ":99999", ":abc", ":", ":0000000005060"]))
    params = draw(st.lists(st.sampled_from([
        ";branch=z9hG4bK776", ";branch=z9hG4bK2", ";rport", ";rport=5060", ";rport=123456", ";rport=x",
        ";received=192.0.2.9", ";received", ";branch", ";", " ; ttl = 1 ", ';x="q;v"', ';x="open',
        ";maddr=[::1]", ";a=b=c", ";=x", ";ÿ=1", ";RPORT=7"]), max_size=4))
    w = draw(st.lists(_WS, min_size=5, max_size=5))
    return f"{proto}{w[0]}/{w[1]}{ver}/{w[2]}{transport} {w[3]}{host}{port}{w[4]}{''.join(params)}"


@st.composite
def _name_addr(draw):
    display = draw(st.sampled_from(["", "Bob ", '"Bob" ', '"B\\"o,b" ', '"open ', '"x"', "<", "a;b "]))
    uri = draw(st.sampled_from(["sip:bob@example.com", "sip:a@b;lr", "", "nocolon", "sip:x@y?h=v"]))
    bracket = draw(st.booleans())
    params = draw(st.lists(st.sampled_from([
        ";tag=abc", ";tag", ";TAG=x", ';tag="q"', ";=x", ";a=", ";a b=c", " ; tag = x ", ";tag=a<b"]), max_size=3))
    return f"{display}<{uri}>{''.join(params)}" if bracket else f"{display}{uri}{''.join(params)}"


_VALUES = {
    "Via": st.lists(_via(), min_size=1, max_size=3).map(", ".join),
    "From": _name_addr(), "To": _name_addr(), "Contact": st.one_of(_name_addr(), st.just("*")),
    "Call-ID": st.sampled_from(["abc@host", "a b", "", "x\u00e9y", "c\tid"]),
    # "{M}" becomes the request's method, so that most CSeq values match it
    "CSeq": st.tuples(
        st.sampled_from(["1", "1", "0009", "2147483647", "2147483648", "999999999999999", "", "-1", "x"]),
        _SP, st.sampled_from(["{M}", "{M}", "{M}"] + _METHODS)).map("".join),
    "Max-Forwards": st.sampled_from(["70", "0", "255", "256", "0068", "", "x", "9999999999"]),
    "Expires": st.sampled_from(["3600", "4294967295", "4294967296", "99999999999", "", "x"]),
    "Route": st.lists(_name_addr(), min_size=1, max_size=2).map(",".join),
    "Subject": _TEXT, "X-Custom": _TEXT, "Warning": _TEXT,
}
_NAMES = {
    "Via": ["Via", "v", "V", "VIA", "via "], "From": ["From", "f", "FROM"], "To": ["To", "t", "tO"],
    "Contact": ["Contact", "m"], "Call-ID": ["Call-ID", "i", "call-id"], "CSeq": ["CSeq", "cseq"],
    "Max-Forwards": ["Max-Forwards", "MaX-fOrWaRdS"], "Expires": ["Expires"], "Route": ["Route"],
    "Subject": ["Subject", "s"],
    "X-Custom": ["X-Custom", "Unknown-Header.x", "Bad Name", "\u212a", "N\u00e9", "k"],
    "Warning": ["Warning", ""],
}


@st.composite
def _header(draw):
    kind = draw(st.sampled_from(sorted(_VALUES)))
    name = draw(st.sampled_from(_NAMES[kind]))
    value = draw(_VALUES[kind])
    line = f"{name}{draw(_WS)}:{draw(_WS)}{value}{draw(st.sampled_from(_TRAIL))}"
    if draw(st.integers(0, 3)) == 0 and len(line) > 1:   # fold at a random point
        cut = draw(st.integers(1, len(line) - 1))
        line = line[:cut] + draw(st.sampled_from(_EOL_FOLD)) + line[cut:]
    return line


@st.composite
def sip_messages(draw):
    shape = draw(st.sampled_from(["request", "request", "request", "response", "random"]))
    method = draw(st.sampled_from(_GOOD_METHODS))
    if shape == "request":
        start = f"{method} {draw(st.sampled_from(_URIS[:4]))} SIP/2.0"
    elif shape == "response":
        start = f"SIP/2.0 {draw(st.sampled_from(_CODES[:5]))}{draw(st.sampled_from(_REASONS))}"
    elif draw(st.booleans()):
        method = draw(st.sampled_from(_METHODS))
        start = (method + draw(_SP) + draw(st.sampled_from(_URIS)) + draw(_SP)
                 + draw(st.sampled_from(_VERSIONS)))
    else:
        start = (draw(st.sampled_from(_STATUS_VERSIONS)) + " " + draw(st.sampled_from(_CODES))
                 + draw(st.sampled_from(_REASONS)))
    lines = [start]
    if draw(st.integers(0, 2)):   # the header fields every request needs, most of them well-formed
        lines += [draw(st.sampled_from([ln, ln, ln, ln.replace(": ", ":\r\n ")])) for ln in BASE[1:6]]
        lines += draw(st.lists(_header(), max_size=5))
    else:
        lines += draw(st.lists(_header(), max_size=12))
    lines = [ln.replace("{M}", method).replace("OPTIONS", method) if ln.startswith(("CSeq", "cseq")) else ln
             for ln in lines]
    body = draw(st.sampled_from([b"", b"", SDP, b"x" * 7, b"\r\n\r\nINVITE"]))
    # RFC 3261 18.3: a datagram body may be shorter (400) or longer (ignored) than announced.
    cl = draw(st.sampled_from([None, "exact", "exact", "more", "less", "junk", "dup"]))
    if cl is not None:
        n = {"more": len(body) + 5, "less": max(len(body) - 1, 0)}.get(cl, len(body))
        value = {"junk": "1e3"}.get(cl, str(n))
        lines.append(f"{draw(st.sampled_from(['Content-Length', 'l', 'content-length ']))}: {value}")
        if cl == "dup":
            lines.append(f"l: {n}")
    eol = draw(st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"]))
    lead = draw(st.sampled_from(["", "", "\r\n", "\n\n"]))
    blank = draw(st.sampled_from([eol, eol, eol, "", "\r\n", "\n"]))
    data = (lead + eol.join(lines) + eol + blank).encode("utf-8") + body
    if draw(st.integers(0, 5)) == 0:          # octets that are not UTF-8
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe2\x84", b"\xed\xa0\x80"])) + data[pos:]
    return data


@st.composite
def torture_mutations(draw):
    # The RFC 4475 messages already sit on the edges of the grammar; small
    # edits push them over in every direction.
    data = bytearray(draw(st.sampled_from(TORTURE)).read_bytes())
    inserts = [b"\r", b"\n", b" ", b";", b",", b'"', b"<", b">", b"\t", b"\\", b":", b"=", b"/",
               b"[", b"]", b"\r\n ", b"\r\n\r\n", b"\x00", b"\xff", "\u212a".encode()]
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from(inserts))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 12))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@needs_c
@pytest.mark.parametrize("path", TORTURE, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_differential_torture(path):
    data = path.read_bytes()
    assert_same(data)
    assert_same(data.replace(b"\r\n", b"\n"))


@needs_c
def test_differential_hand_written():
    for data in (INVITE, options(), options("\u212a: x"), b"\r\n\r\n" + INVITE, INVITE[:-20],
                 INVITE.replace(b"\r\n", b"\n"), options("Subject: a\t\tb\r\n  c")):
        assert_same(data)


@needs_c
@FUZZ
@given(sip_messages())
def test_differential_structured(data):
    assert_same(data)


@needs_c
@FUZZ
@given(torture_mutations())
def test_differential_torture_mutations(data):
    assert_same(data)


@needs_c
@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=400))
def test_differential_random_bytes(data):
    assert_same(data)


@needs_c
@settings(max_examples=800, deadline=None)
# a valid start or header block followed by noise, with plenty of line breaks
@given(st.sampled_from([b"", INVITE[:45], options()[:200]]),
       st.binary(max_size=200).map(lambda b: b.replace(b"\x00", b"\r\n")))
def test_differential_prefix_plus_bytes(prefix, tail):
    assert_same(prefix + tail)
