"""SDP parsing and audio negotiation (RFC 8866, RFC 3264) as units."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sip import sdp
from engine.sip.errors import SdpError

OFFER = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
         b"m=audio 40000 RTP/AVP 8 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"
         b"a=fmtp:101 0-16\r\na=ptime:20\r\n")


def negotiate(body: bytes):
    return sdp.negotiate(sdp.parse(body))[0]


def test_offer_is_negotiated():
    n = negotiate(OFFER)
    assert (n.remote_addr, n.remote_port, n.payload_type, n.codec, n.dtmf_pt, n.ptime,
            n.direction, n.hold) == ("127.0.0.1", 40000, 8, "PCMA", 101, 20, "sendrecv", False)


def test_free_text_in_another_charset_is_carried():
    # A session name in Latin-1 from older equipment: the offer is still answered.
    n = negotiate(OFFER.replace(b"s=-", b"s=Caf\xe9 Zentrale"))
    assert n.codec == "PCMA"


@pytest.mark.parametrize("addr", [b"media.example.com", b"12750.0.1", b"127.0.0.1%",
                                  b"::1::2", b"256.1.1.1"])
def test_media_address_must_be_an_ip_literal(addr):
    with pytest.raises(SdpError, match="is not an IP address"):
        negotiate(OFFER.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 " + addr))


def test_ipv6_and_media_level_connection():
    body = OFFER.replace(b"c=IN IP4 127.0.0.1\r\n", b"").replace(
        b"a=ptime:20\r\n", b"a=ptime:20\r\nc=IN IP6 ::1\r\n")
    assert negotiate(body).remote_addr == "::1"
    with pytest.raises(SdpError, match="no c= line"):
        negotiate(OFFER.replace(b"c=IN IP4 127.0.0.1\r\n", b""))


def test_hold_forms():
    assert negotiate(OFFER.replace(b"c=IN IP4 127.0.0.1", b"c=IN IP4 0.0.0.0")).hold
    n = negotiate(OFFER + b"a=sendonly\r\n")
    assert n.hold and n.direction == "recvonly"


@pytest.mark.parametrize("body, why", [
    (OFFER.replace(b"RTP/AVP 8 0 101", b"RTP/AVP 18"), "no common audio codec"),
    (OFFER.replace(b"m=audio 40000", b"m=audio 99999"), "bad media port"),
    (OFFER.replace(b"m=audio 40000", b"m=audio \xc2\xb2"), "bad media port"),
    (OFFER.replace(b"v=0", b"v=1"), "unsupported SDP version"),
    (OFFER.replace(b"v=0\r\n", b""), "without v= line"),
    (OFFER.replace(b"c=IN IP4 127.0.0.1", b"c=IN 127.0.0.1"), "malformed c= line"),
    (OFFER + b"garbage\r\n", "malformed SDP line"),
])
def test_unusable_offers_name_the_problem(body, why):
    with pytest.raises(SdpError, match=why):
        negotiate(body)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(0, len(OFFER)), st.integers(0, 40))
def test_any_octets_give_an_answer_or_sdp_error(noise, at, cut):
    # Whatever arrives, the result is an answer or SdpError (answered 488), never a crash.
    for body in (noise, OFFER[:at] + noise + OFFER[at + cut:]):
        try:
            negotiate(body)
        except SdpError:
            pass


@pytest.mark.parametrize("ptime, expect", [(b"30", 30), (b"0", 20), (b"100000", 20)])
def test_ptime_outside_10_to_120_ms_keeps_the_default(ptime, expect):
    assert negotiate(OFFER.replace(b"a=ptime:20", b"a=ptime:" + ptime)).ptime == expect
