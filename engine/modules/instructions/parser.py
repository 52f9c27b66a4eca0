"""Instruction documents: safe XML parsing and validation into verbs.

The parser is expat driven directly, so it can refuse what makes XML
dangerous before any of it is expanded: a DOCTYPE (and with it every entity
declaration, the "billion laughs" and external entities) is an error, as is
a document over `MAX_BYTES`, deeper than `MAX_DEPTH` or with more than
`MAX_ELEMENTS` elements. Every element keeps its line number, so a bad
document is reported as "line 7: <Gather numDigits>: ...".

Validation follows the attributes Twilio documents for each verb: values
Baton acts on are checked and converted; documented attributes Baton does
not act on are accepted and ignored; attributes nobody documents are
ignored too (Twilio does the same), but reported in `Document.warnings`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable
from xml.parsers import expat

from engine.sip.uri import check_user_part

__all__ = ["DocumentError", "Document", "Verb", "parse", "MAX_BYTES", "MAX_DEPTH", "MAX_ELEMENTS"]

MAX_BYTES = 256 * 1024
MAX_DEPTH = 12
MAX_ELEMENTS = 2000
MAX_TEXT = 8192


class DocumentError(ValueError):
    """An unusable document. `code` is the Twilio-style error code (12100 parse
    failure, 12200 schema violation), `line` and `attribute` say where."""

    def __init__(self, message: str, code: int = 12100, line: int | None = None,
                 attribute: str | None = None, verb: str | None = None):
        where = f"line {line}: " if line else ""
        super().__init__(where + message)
        self.reason = message
        self.code = code
        self.line = line
        self.attribute = attribute
        self.verb = verb

    def detail(self) -> dict:
        """The error as an event payload."""
        d: dict[str, Any] = {"code": self.code, "reason": str(self)}
        if self.line is not None:
            d["line"] = self.line
        if self.attribute is not None:
            d["attribute"] = self.attribute
        if self.verb is not None:
            d["verb"] = self.verb
        return d


@dataclass
class Verb:
    """One verb (or noun) of a document, with converted attributes."""
    name: str
    attrs: dict
    text: str = ""
    line: int = 0
    children: list = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


@dataclass
class Document:
    """A parsed and validated document: the verbs of its <Response>."""
    verbs: list
    url: str = ""
    warnings: list = field(default_factory=list)


# -- raw XML -------------------------------------------------------------------

@dataclass
class _Element:
    tag: str
    attrs: dict
    line: int
    children: list = field(default_factory=list)
    text: list = field(default_factory=list)


class _Refused(Exception):
    pass


def _xml_tree(data: bytes) -> _Element:
    if len(data) > MAX_BYTES:
        raise DocumentError(f"document is {len(data)} bytes, over the {MAX_BYTES} byte limit",
                            code=11750)
    p = expat.ParserCreate()
    # Never read or expand anything from outside the document itself.
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[_Element] = []
    root: list[_Element] = []
    count = 0

    def refuse(what: str):
        def handler(*_args):
            raise _Refused(what)
        return handler

    def start(tag, attrs):
        nonlocal count
        count += 1
        if count > MAX_ELEMENTS:
            raise _Refused(f"more than {MAX_ELEMENTS} elements")
        if len(stack) >= MAX_DEPTH:
            raise _Refused(f"elements nested deeper than {MAX_DEPTH}")
        el = _Element(tag, attrs, p.CurrentLineNumber)
        if stack:
            stack[-1].children.append(el)
        elif root:
            raise _Refused("more than one root element")
        else:
            root.append(el)
        stack.append(el)

    def end(_tag):
        stack.pop()

    def chars(text):
        if stack:
            parts = stack[-1].text
            if sum(map(len, parts)) + len(text) > MAX_TEXT:
                raise _Refused(f"text of <{stack[-1].tag}> longer than {MAX_TEXT} characters")
            parts.append(text)

    p.StartElementHandler = start
    p.EndElementHandler = end
    p.CharacterDataHandler = chars
    p.StartDoctypeDeclHandler = refuse("a DOCTYPE is not allowed")
    p.EntityDeclHandler = refuse("entity declarations are not allowed")
    p.UnparsedEntityDeclHandler = refuse("entity declarations are not allowed")
    p.ExternalEntityRefHandler = refuse("external entities are not allowed")
    p.NotationDeclHandler = refuse("notation declarations are not allowed")
    try:
        p.Parse(data, True)
    except _Refused as exc:
        raise DocumentError(str(exc), code=12100, line=p.CurrentLineNumber) from None
    except expat.ExpatError as exc:
        raise DocumentError(f"malformed XML: {expat.ErrorString(exc.code)}", code=12100,
                            line=exc.lineno) from None
    if not root:
        raise DocumentError("no root element", code=12100)
    return root[0]


# -- attribute types -----------------------------------------------------------

def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no", ""):
        return False
    raise ValueError("expected true or false")


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def conv(v: str) -> int:
        try:
            n = int(float(v.strip()))
        except ValueError:
            raise ValueError("expected a whole number") from None
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return n
    return conv


def _float_range(lo: float, hi: float) -> Callable[[str], float]:
    def conv(v: str) -> float:
        try:
            n = float(v.strip())
        except ValueError:
            raise ValueError("expected a number") from None
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}")
        return n
    return conv


def _enum(*values: str, case: bool = False) -> Callable[[str], str]:
    def conv(v: str) -> str:
        s = v.strip()
        for allowed in values:
            if s == allowed or (not case and s.lower() == allowed.lower()):
                return allowed
        raise ValueError(f"must be one of {', '.join(values)}")
    return conv


def _method(v: str) -> str:
    m = v.strip().upper()
    if m not in ("GET", "POST"):
        raise ValueError("must be GET or POST")
    return m


_KEYS_RE = re.compile(r"[0-9*#]*")
_DIGITS_RE = re.compile(r"[0-9*#A-Dw]*", re.I)


def _keys(v: str) -> str:
    s = v.strip()
    if not _KEYS_RE.fullmatch(s):
        raise ValueError("only the keys 0-9, * and # are allowed")
    return s


def _one_key(v: str) -> str:
    s = _keys(v)
    if len(s) > 1:
        raise ValueError("a single key (0-9, * or #) or empty")
    return s


def _play_digits(v: str) -> str:
    s = v.strip()
    if not _DIGITS_RE.fullmatch(s) or len(s) > 64:
        raise ValueError("up to 64 of 0-9, *, #, A-D and w (a half-second pause)")
    return s


def _input(v: str) -> str:
    words = v.replace(",", " ").split()
    if not words or any(w not in ("dtmf", "speech") for w in words):
        raise ValueError("must be dtmf, speech or both")
    if "dtmf" not in words:
        raise ValueError("speech input is not supported: use dtmf")
    return " ".join(words)


def _beep(v: str) -> str:
    s = v.strip()
    if s.lower() in ("true", "false"):
        return s.lower()
    if s in ("onEnter", "onExit"):
        return s
    raise ValueError("must be true, false, onEnter or onExit")


def _voice(v: str) -> str:
    from engine.media.tts import AudioError, espeak_voice

    try:
        espeak_voice(v)
    except AudioError as exc:
        raise ValueError(str(exc)) from None
    return v.strip()


def _language(v: str) -> str:
    from engine.media.tts import AudioError, espeak_voice

    try:
        espeak_voice("en", v)
    except AudioError as exc:
        raise ValueError(str(exc)) from None
    return v.strip()


def _text(v: str) -> str:
    return v


_S = _text  # accepted, not acted on (documented by Twilio)


def _caller_id(v: str) -> str:
    # It becomes the user part of the dialled leg's From: nothing that could end
    # the header or the URI (CR/LF injection).
    v = v.strip()
    check_user_part(v, "callerId")
    return v

def _sender(v: str) -> str:
    # The user part of the text's From: nothing that could end the header or the URI.
    v = v.strip()
    check_user_part(v, "from")
    return v


def _address(v: str) -> str:
    # A number or a SIP URI; checked again by the outbound rules when sent.
    v = v.strip()
    if not v or any(ord(ch) < 0x21 or ch in "<>\"\x7f" for ch in v):
        raise ValueError("not a number or SIP URI")
    return v


_RECORD_DIAL = _enum("do-not-record", "record-from-answer", "record-from-ringing",
                     "record-from-answer-dual", "record-from-ringing-dual", "true", "false")

# verb -> (attributes {name: converter}, allowed children, text: "required"|"optional"|"none")
SCHEMA: dict[str, tuple[dict, tuple, str]] = {
    "Say": ({"voice": _voice, "language": _language, "loop": _int_range(0, 1000)},
            ("break", "emphasis", "lang", "p", "phoneme", "prosody", "s", "say-as", "sub", "w"),
            "optional"),
    "Play": ({"loop": _int_range(0, 1000), "digits": _play_digits}, (), "optional"),
    "Pause": ({"length": _float_range(0, 600)}, (), "none"),
    "Gather": ({"input": _input, "action": _text, "method": _method,
                "timeout": _int_range(0, 600), "finishOnKey": _one_key,
                "numDigits": _int_range(1, 128), "actionOnEmptyResult": _bool,
                "language": _S, "hints": _S, "speechTimeout": _S, "speechModel": _S,
                "profanityFilter": _S, "partialResultCallback": _S,
                "partialResultCallbackMethod": _S, "enhanced": _S, "bargeIn": _bool,
                "debug": _S, "maxSpeechTime": _S},
               ("Say", "Play", "Pause"), "none"),
    "Record": ({"action": _text, "method": _method, "timeout": _int_range(0, 600),
                "finishOnKey": _keys, "maxLength": _int_range(1, 14400),
                "playBeep": _bool, "trim": _enum("trim-silence", "do-not-trim"),
                "recordingStatusCallback": _text, "recordingStatusCallbackMethod": _method,
                "recordingStatusCallbackEvent": _S, "storageUrl": _S,
                "storageUrlMethod": _S, "transcribe": _bool, "transcribeCallback": _S},
               (), "none"),
    "Dial": ({"action": _text, "method": _method, "timeout": _int_range(1, 600),
              "callerId": _caller_id, "timeLimit": _int_range(1, 14400),
              "hangupOnStar": _bool, "record": _RECORD_DIAL, "answerOnBridge": _bool,
              "ringTone": _S, "recordingStatusCallback": _S,
              "recordingStatusCallbackMethod": _S, "recordingStatusCallbackEvent": _S,
              "recordingTrack": _S, "trim": _S, "sequential": _bool, "referUrl": _S,
              "referMethod": _S, "events": _S},
             ("Number", "Sip", "Conference", "Queue", "Client"), "optional"),
    "Number": ({"sendDigits": _play_digits, "url": _S, "method": _S, "statusCallback": _S,
                "statusCallbackEvent": _S, "statusCallbackMethod": _S, "byoc": _S,
                "machineDetection": _S, "amdStatusCallback": _S}, (), "required"),
    "Sip": ({"username": _S, "password": _S, "url": _S, "method": _S, "statusCallback": _S,
             "statusCallbackEvent": _S, "statusCallbackMethod": _S}, (), "required"),
    "Client": ({"url": _S, "method": _S, "statusCallback": _S, "statusCallbackEvent": _S,
                "statusCallbackMethod": _S}, ("Identity", "Parameter"), "optional"),
    "Identity": ({}, (), "required"),
    "Parameter": ({"name": _S, "value": _S}, (), "none"),
    "Conference": ({"muted": _bool, "beep": _beep, "startConferenceOnEnter": _bool,
                    "endConferenceOnExit": _bool, "maxParticipants": _int_range(2, 250),
                    "waitUrl": _text, "waitMethod": _method, "record": _S, "region": _S,
                    "trim": _S, "coach": _S, "statusCallback": _S,
                    "statusCallbackEvent": _S, "statusCallbackMethod": _S,
                    "recordingStatusCallback": _S, "recordingStatusCallbackMethod": _S,
                    "recordingStatusCallbackEvent": _S, "eventCallbackUrl": _S,
                    "jitterBufferSize": _S, "participantLabel": _S},
                   (), "required"),
    "Queue": ({"url": _S, "method": _S, "reservationSid": _S, "postWorkActivitySid": _S},
              (), "required"),
    "Enqueue": ({"action": _text, "method": _method, "waitUrl": _text,
                 "waitUrlMethod": _method, "maxQueueSize": _int_range(1, 5000),
                 "workflowSid": _S}, ("Task",), "optional"),
    "Task": ({"priority": _S, "timeout": _S}, (), "optional"),
    "Leave": ({}, (), "none"),
    "Hangup": ({}, (), "none"),
    "Redirect": ({"method": _method}, (), "required"),
    "Reject": ({"reason": _enum("rejected", "busy")}, (), "none"),
    # A text sent during the call (to the caller unless `to` says otherwise).
    "Message": ({"to": _address, "from": _sender, "action": _text, "method": _method,
                 "statusCallback": _text}, ("Body",), "optional"),
    "Sms": ({"to": _address, "from": _sender, "action": _text, "method": _method,
             "statusCallback": _text}, (), "required"),
    "Body": ({}, (), "required"),
}

TOP_LEVEL = ("Say", "Play", "Pause", "Gather", "Record", "Dial", "Enqueue", "Leave",
             "Hangup", "Redirect", "Reject", "Message", "Sms")
_SSML = SCHEMA["Say"][1]
UNSUPPORTED = ("Connect", "Stream", "Start", "Stop", "Pay", "Prompt", "Refer", "Siprec",
               "Echo", "Autopilot")


def _flat_text(el: _Element) -> str:
    """The text of an element and its SSML children, in order (SSML is read as plain text)."""
    parts = list(el.text)
    for c in el.children:
        parts.append(_flat_text(c))
    return "".join(parts)


def _verb(el: _Element, parent: str | None, warnings: list) -> Verb:
    spec = SCHEMA.get(el.tag)
    if parent is None and el.tag not in TOP_LEVEL:
        if el.tag in UNSUPPORTED:
            raise DocumentError(f"<{el.tag}> is not supported", code=12200, line=el.line,
                                verb=el.tag)
        if spec is not None:
            raise DocumentError(f"<{el.tag}> is only allowed inside another verb", code=12200,
                                line=el.line, verb=el.tag)
        raise DocumentError(f"unknown verb <{el.tag}>", code=12200, line=el.line, verb=el.tag)
    assert spec is not None
    conv, children_allowed, text_rule = spec
    attrs: dict[str, Any] = {}
    for name, value in el.attrs.items():
        c = conv.get(name)
        if c is None:
            warnings.append(f"line {el.line}: <{el.tag}> attribute {name!r} is unknown and ignored")
            continue
        try:
            attrs[name] = c(value)
        except ValueError as exc:
            raise DocumentError(f"<{el.tag} {name}=\"{value[:40]}\">: {exc}", code=12200,
                                line=el.line, attribute=name, verb=el.tag) from None
    kids: list[Verb] = []
    if el.tag == "Say":
        text = _flat_text(el).strip()
        for c in el.children:
            if c.tag not in _SSML:
                raise DocumentError(f"<{c.tag}> is not allowed inside <Say>", code=12200,
                                    line=c.line, verb=c.tag)
    else:
        text = "".join(el.text).strip()
        for c in el.children:
            if c.tag not in children_allowed:
                raise DocumentError(f"<{c.tag}> is not allowed inside <{el.tag}>", code=12200,
                                    line=c.line, verb=c.tag)
            kids.append(_verb(c, el.tag, warnings))
    if text_rule == "required" and not text:
        raise DocumentError(f"<{el.tag}> needs text content", code=12200, line=el.line,
                            verb=el.tag)
    if text_rule == "none" and text:
        raise DocumentError(f"<{el.tag}> takes no text", code=12200, line=el.line, verb=el.tag)
    v = Verb(el.tag, attrs, text, el.line, kids)
    _check(v)
    return v


def _check(v: Verb) -> None:
    """Rules that involve more than one attribute or the text."""
    if v.name == "Play" and not v.text and not v.get("digits"):
        raise DocumentError("<Play> needs a URL or a digits attribute", code=12200, line=v.line,
                            verb="Play")
    if v.name == "Say" and not v.text:
        raise DocumentError("<Say> has nothing to say", code=12200, line=v.line, verb="Say")
    if v.name == "Dial":
        nouns = [c for c in v.children if c.name in ("Number", "Sip", "Conference", "Queue",
                                                      "Client")]
        if v.text and nouns:
            raise DocumentError("<Dial> has both text and nouns", code=12200, line=v.line,
                                verb="Dial")
        if not v.text and not nouns:
            raise DocumentError("<Dial> has nothing to dial", code=12200, line=v.line,
                                verb="Dial")
        kinds = {c.name for c in nouns}
        if len(kinds & {"Conference", "Queue"}) and len(nouns) > 1:
            raise DocumentError("<Conference> and <Queue> must be the only noun of <Dial>",
                                code=12200, line=v.line, verb="Dial")
    if v.name == "Message" and not v.text and not any(c.name == "Body" for c in v.children):
        raise DocumentError("<Message> has no text", code=12200, line=v.line, verb="Message")
    if v.name == "Enqueue" and not v.text and not v.get("workflowSid"):
        raise DocumentError("<Enqueue> needs a queue name", code=12200, line=v.line,
                            verb="Enqueue")


def parse(data: bytes | str, url: str = "") -> Document:
    """Parse and validate a document; raises `DocumentError` naming line and attribute."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    root = _xml_tree(data)
    if root.tag != "Response":
        raise DocumentError(f"the root element is <{root.tag}>, not <Response>", code=12200,
                            line=root.line, verb=root.tag)
    if "".join(root.text).strip():
        raise DocumentError("text directly inside <Response>", code=12200, line=root.line)
    warnings: list[str] = []
    verbs = [_verb(el, None, warnings) for el in root.children]
    return Document(verbs, url, warnings)
