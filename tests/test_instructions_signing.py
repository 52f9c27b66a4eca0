"""Request signing: X-Baton-Signature (HMAC-SHA256 with a replay window) and the
Twilio-compatible X-Twilio-Signature, checked against Twilio's own validator."""
from __future__ import annotations

import time

import pytest

from engine.modules.instructions.fetch import (baton_signature, signed_headers,
                                               twilio_signature, verify_baton_signature,
                                               with_query)

validator_mod = pytest.importorskip("twilio.request_validator")

SECRET = "12345678901234567890"
URL = "https://app.example.com/voice?tenant=7"
PARAMS = {"CallSid": "S1", "From": "+15550001", "To": "4000", "Digits": "1#",
          "Body": "a b&c=d", "Ünïcode": "é"}


def test_twilio_signature_matches_twilio_library():
    v = validator_mod.RequestValidator(SECRET)
    sig = twilio_signature(SECRET, URL, PARAMS)
    assert sig == v.compute_signature(URL, PARAMS)
    assert v.validate(URL, PARAMS, sig)
    assert not v.validate(URL, {**PARAMS, "Digits": "2"}, sig)
    assert not validator_mod.RequestValidator("other-secret").validate(URL, PARAMS, sig)


def test_get_requests_sign_the_url_with_its_query():
    v = validator_mod.RequestValidator(SECRET)
    full = with_query(URL, PARAMS)
    assert full.startswith(URL + "&")
    h = signed_headers(full, {}, SECRET, True)
    assert v.validate(full, {}, h["X-Twilio-Signature"])
    assert verify_baton_signature(SECRET, full, {}, h)


def test_baton_signature_and_replay_window():
    now = time.time()
    h = signed_headers(URL, PARAMS, SECRET, False, now=now)
    assert "X-Twilio-Signature" not in h
    assert h["X-Baton-Signature"].startswith("v1=") and len(h["X-Baton-Signature"]) == 67
    assert h["X-Baton-Signature"] == baton_signature(SECRET, URL, PARAMS, h["X-Baton-Timestamp"])
    assert verify_baton_signature(SECRET, URL, PARAMS, h, now=now)
    assert verify_baton_signature(SECRET, URL, PARAMS, h, now=now + 299)
    # Replayed later than the window, or stamped in the future: refused.
    assert not verify_baton_signature(SECRET, URL, PARAMS, h, now=now + 301)
    assert not verify_baton_signature(SECRET, URL, PARAMS, h, now=now - 301)
    assert not verify_baton_signature(SECRET, URL, PARAMS, h, now=now + 61, window=60)
    # Any change to the URL, a parameter, the timestamp or the secret breaks it.
    assert not verify_baton_signature(SECRET, URL + "&x=1", PARAMS, h, now=now)
    assert not verify_baton_signature(SECRET, URL, {**PARAMS, "To": "4001"}, h, now=now)
    forged = dict(h, **{"X-Baton-Timestamp": str(int(now) + 1)})
    assert not verify_baton_signature(SECRET, URL, PARAMS, forged, now=now)
    # A forged signature with any characters is a plain "no", never an exception.
    garbled = dict(h, **{"X-Baton-Signature": "v1=é" + h["X-Baton-Signature"][4:]})
    assert not verify_baton_signature(SECRET, URL, PARAMS, garbled, now=now)
    assert not verify_baton_signature("wrong", URL, PARAMS, h, now=now)
    assert not verify_baton_signature(SECRET, URL, PARAMS, {}, now=now)
    # Order of the form does not matter: the body is signed sorted.
    rev = dict(reversed(list(PARAMS.items())))
    assert verify_baton_signature(SECRET, URL, rev, h, now=now)


def test_no_secret_means_no_signature():
    h = signed_headers(URL, PARAMS, None, True)
    assert set(h) == {"X-Baton-Timestamp"}


async def test_engine_requests_carry_both_signatures_and_get_requests_too():
    pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")
    from tests.helpers import engine_config
    from tests.test_sessions import Caller
    from tests.twiml_apps import AppServer, instructions_engine

    app = AppServer(secret=SECRET)
    app.twiml("/get", "<Response><Redirect method='POST'>/post?x=1</Redirect></Response>")
    app.twiml("/post", "<Response><Hangup/></Response>")
    await app.start()
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["4000"] = {"instructions": app.url + "/get?a=b",
                                                  "method": "GET", "campaign": "spring"}
    async with instructions_engine(raw, secret=SECRET, twilio=True) as eng:
        caller = Caller(eng, "4000")
        await caller.dial(expect=480)     # a Hangup before answering
        post = (await app.wait_for("/post"))[0]
        get = app.got("/get")[0]
        assert get.method == "GET" and get.params["a"] == "b"
        assert get.params["campaign"] == "spring", "module params are sent"
        assert post.method == "POST" and post.params["x"] == "1"
        for r in (get, post):
            assert r.twilio_valid is True and r.baton_valid is True
            assert abs(int(r.headers["X-Baton-Timestamp"]) - time.time()) < 5
        caller.close()
    await app.stop()


async def test_twilio_header_only_when_the_account_asks_for_it():
    pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")
    from tests.helpers import engine_config
    from tests.test_sessions import Caller
    from tests.twiml_apps import AppServer, instructions_engine

    app = AppServer(secret=SECRET)
    app.twiml("/doc", "<Response><Reject reason='busy'/></Response>")
    await app.start()
    raw = engine_config()
    raw["accounts"]["demo"]["numbers"]["4000"] = {"instructions": app.url + "/doc"}
    async with instructions_engine(raw, secret=SECRET, twilio=False) as eng:
        caller = Caller(eng, "4000")
        await caller.dial(expect=486)
        r = app.got("/doc")[0]
        assert "X-Twilio-Signature" not in r.headers
        assert r.baton_valid is True
        caller.close()
    await app.stop()
