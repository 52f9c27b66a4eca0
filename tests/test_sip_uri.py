"""Twilio's From/To of an address, as calls (engine.sip.uri.party) and texts
(engine.sessions.conversations._party) report it today.

The two agree on the common cases.  Calls keep the URI as it was written (port, password,
headers, case) and take 2 to 20 digits as a number; texts rebuild scheme:user@host from the
parsed URI and take any run of digits after '+' signs as a number.
"""
from __future__ import annotations

import pytest

from engine.sessions.conversations import _party
from engine.sip.uri import party

CASES = [
    # address, party (calls), _party (texts)
    ("sip:alice@example.com", "sip:alice@example.com", "sip:alice@example.com"),
    ("<sip:bob@h>", "sip:bob@h", "sip:bob@h"),
    ("sip:bob@example.com;transport=tcp", "sip:bob@example.com", "sip:bob@example.com"),
    ('"Alice" <sip:+15551234567@example.com:5070>;tag=1', "+15551234567", "+15551234567"),
    ("sip:+15551234567@10.0.0.1", "+15551234567", "+15551234567"),
    ("sip:12@h", "12", "12"),
    ("tel:+15551234567", "+15551234567", "+15551234567"),
    ("tel:1234;phone-context=x", "1234", "1234"),
    ("+15551234567", "+15551234567", "+15551234567"),
    ("bob", "bob", "bob"),
    ("sip:example.com", "sip:example.com", "sip:example.com"),
    ("sip:example.com:5060", "sip:example.com:5060", "sip:example.com:5060"),
    # where they differ: the port ...
    ("sip:alice@example.com:5070", "sip:alice@example.com:5070", "sip:alice@example.com"),
    ("<sip:alice@example.com:5070>;tag=ab", "sip:alice@example.com:5070",
     "sip:alice@example.com"),
    ("sip:bob@example.com:5080;transport=tcp", "sip:bob@example.com:5080",
     "sip:bob@example.com"),
    ("sips:bob@h:5061", "sips:bob@h:5061", "sips:bob@h"),
    ("sip:bob@[::1]:5060", "sip:bob@[::1]:5060", "sip:bob@[::1]"),
    # ... and what texts rebuild from the parsed URI ...
    ("SIP:bob@H", "SIP:bob@H", "sip:bob@h"),
    ("sip:bob:pw@h:5060", "sip:bob:pw@h:5060", "sip:bob@h"),
    ("sip:b%40b@h", "sip:b%40b@h", "sip:b@b@h"),
    ("sip:bob@h?subject=x", "sip:bob@h?subject=x", "sip:bob@h"),
    # ... and what counts as a number
    ("sip:1@h", "sip:1@h", "1"),
    ("sip:123456789012345678901@h", "sip:123456789012345678901@h", "123456789012345678901"),
    ("sip:++12@h", "sip:++12@h", "++12"),
]


@pytest.mark.parametrize("addr, call, text", CASES, ids=[c[0] for c in CASES])
def test_party_of_calls_and_texts(addr, call, text):
    assert party(addr) == call
    assert _party(addr) == text
