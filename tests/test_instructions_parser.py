"""Instruction documents: Twilio's own output parses; bad documents are refused with
the line and attribute named; the parser is safe against entity expansion and size."""
from __future__ import annotations

import pytest

from engine.modules.instructions.parser import (MAX_BYTES, MAX_DEPTH, MAX_ELEMENTS,
                                                DocumentError, parse)
from tests.twiml_apps import BILLION_LAUGHS

twiml = pytest.importorskip("twilio.twiml.voice_response")


def test_every_verb_twilio_writes_parses():
    r = twiml.VoiceResponse()
    g = twiml.Gather(input="dtmf", action="/menu", method="GET", num_digits=2, timeout=3,
                     finish_on_key="*")
    g.say("Press a key", voice="alice", language="en-GB", loop=2)
    g.play("http://example.com/a.wav", loop=1)
    g.pause(length=1)
    r.append(g)
    r.record(action="/rec", max_length=30, play_beep=False, trim="do-not-trim", timeout=2,
             finish_on_key="#", recording_status_callback="/status")
    d = twiml.Dial(action="/dialled", timeout=20, caller_id="+15550001", time_limit=60,
                   hangup_on_star=True)
    d.number("+15551234")
    r.append(d)
    d2 = twiml.Dial()
    d2.sip("sip:bob@example.com")
    r.append(d2)
    d3 = twiml.Dial()
    d3.conference("room", muted=True, beep="onEnter", start_conference_on_enter=False,
                  end_conference_on_exit=True, max_participants=3)
    r.append(d3)
    d4 = twiml.Dial()
    d4.queue("support")
    r.append(d4)
    r.enqueue("support", wait_url="/wait", max_queue_size=5, action="/q")
    r.leave()
    r.play(digits="12w#")
    r.redirect("module:acme.survey?outlet=done", method="POST")
    r.reject(reason="busy")
    r.hangup()
    doc = parse(str(r), "http://example.com/app")
    names = [v.name for v in doc.verbs]
    assert names == ["Gather", "Record", "Dial", "Dial", "Dial", "Dial", "Enqueue", "Leave",
                     "Play", "Redirect", "Reject", "Hangup"]
    gather = doc.verbs[0]
    assert gather.attrs == {"input": "dtmf", "action": "/menu", "method": "GET",
                            "numDigits": 2, "timeout": 3, "finishOnKey": "*"}
    assert [c.name for c in gather.children] == ["Say", "Play", "Pause"]
    assert gather.children[0].get("loop") == 2 and gather.children[0].text == "Press a key"
    rec = doc.verbs[1]
    assert rec.get("playBeep") is False and rec.get("maxLength") == 30
    assert doc.verbs[2].children[0].text == "+15551234"
    assert doc.verbs[2].get("hangupOnStar") is True
    conf = doc.verbs[4].children[0]
    assert conf.attrs == {"muted": True, "beep": "onEnter", "startConferenceOnEnter": False,
                          "endConferenceOnExit": True, "maxParticipants": 3}
    assert doc.verbs[6].get("maxQueueSize") == 5
    assert doc.verbs[8].get("digits") == "12w#"
    assert doc.verbs[10].get("reason") == "busy"
    assert doc.url == "http://example.com/app"


def test_ssml_inside_say_is_read_as_text():
    doc = parse("<Response><Say>Hello <break time='1s'/><emphasis>world</emphasis></Say>"
                "</Response>")
    assert doc.verbs[0].text == "Hello world"


def test_empty_response_and_unknown_attributes():
    assert parse("<Response/>").verbs == []
    doc = parse('<Response><Say whatever="1">hi</Say></Response>')
    assert doc.verbs[0].text == "hi" and "whatever" in doc.warnings[0]


@pytest.mark.parametrize("xml,line,attribute,code,words", [
    ("<Response>\n<Say>hi</Say>\n<Gather numDigits='x'/>\n</Response>", 3, "numDigits", 12200,
     "whole number"),
    ("<Response>\n<Gather timeout='-1'/></Response>", 2, "timeout", 12200, "between"),
    ("<Response><Gather finishOnKey='ab'/></Response>", 1, "finishOnKey", 12200, "key"),
    ("<Response>\n\n<Say voice='klingon!'>x</Say></Response>", 3, "voice", 12200, "voice"),
    ("<Response><Reject reason='nope'/></Response>", 1, "reason", 12200, "busy"),
    ("<Response><Conference>room</Conference></Response>", 1, None, 12200, "only allowed"),
    ("<Response><Dance/></Response>", 1, None, 12200, "unknown verb <Dance>"),
    ("<Response><Connect/></Response>", 1, None, 12200, "not supported"),
    ("<Response><Gather><Gather/></Gather></Response>", 1, None, 12200, "not allowed inside"),
    ("<Response><Say><Play>x</Play></Say></Response>", 1, None, 12200, "not allowed inside"),
    ("<Response><Redirect/></Response>", 1, None, 12200, "needs text"),
    ("<Response><Hangup>now</Hangup></Response>", 1, None, 12200, "takes no text"),
    ("<Response><Dial/></Response>", 1, None, 12200, "nothing to dial"),
    ("<Response><Gather input='speech'/></Response>", 1, "input", 12200, "speech"),
    ("<Hello/>", 1, None, 12200, "not <Response>"),
    ("<Response>\n<Say>unclosed</Response>", 2, None, 12100, "malformed XML"),
    ("", 1, None, 12100, "malformed XML"),
])
def test_bad_documents_name_line_and_attribute(xml, line, attribute, code, words):
    with pytest.raises(DocumentError) as info:
        parse(xml)
    err = info.value
    assert err.code == code
    assert err.line == line, str(err)
    assert err.attribute == attribute
    assert words in str(err)
    assert str(err).startswith(f"line {line}: ")
    d = err.detail()
    assert d["code"] == code and d["line"] == line


def test_billion_laughs_and_external_entities_are_refused_before_expansion():
    with pytest.raises(DocumentError, match="DOCTYPE"):
        parse(BILLION_LAUGHS)
    xxe = ('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
           "<Response><Say>&x;</Say></Response>")
    with pytest.raises(DocumentError, match="DOCTYPE"):
        parse(xxe)
    with pytest.raises(DocumentError, match="malformed"):
        parse("<Response><Say>&undefined;</Say></Response>")


def test_size_depth_and_element_caps():
    big = b"<Response>" + b" " * MAX_BYTES + b"</Response>"
    with pytest.raises(DocumentError) as info:
        parse(big)
    assert info.value.code == 11750
    deep = "<Response>" + "<Say>" * MAX_DEPTH + "</Say>" * MAX_DEPTH + "</Response>"
    with pytest.raises(DocumentError, match="deeper"):
        parse(deep)
    many = "<Response>" + "<Pause/>" * MAX_ELEMENTS + "</Response>"
    with pytest.raises(DocumentError, match="more than"):
        parse(many)
    ok = "<Response>" + "<Pause/>" * (MAX_ELEMENTS - 1) + "</Response>"
    assert len(parse(ok).verbs) == MAX_ELEMENTS - 1
