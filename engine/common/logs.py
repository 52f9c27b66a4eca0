"""Structured logs: one line per event, with the session id on every line about a session.

`setup(level, fmt)` configures the root logger of `baton serve` and of the
accountant. `fmt` is `text` (the human format, unchanged, with
`[session=ID]` added when the message does not name the session) or `json`:
one JSON object per line, never spread over several lines (a traceback is
the `exc` field), with

    ts       ISO 8601 UTC time with milliseconds ("2026-11-26T05:12:09.123Z")
    level    debug, info, warning, error, critical
    logger   the logger's name ("baton.session", "baton.sip", ...)
    msg      the message
    session  the session id, or null for a line not about a session

and every field the call passed with `extra={...}` (e.g. `reason`,
`module`, `url`).

Which session a line is about is found, in this order, from:
1. `extra={"session": ID}` given by the caller;
2. a session id among the message's arguments or in its text (the engine's
   lines say "session %s: ...");
3. the `SESSION` context variable (a session id, or a Session, which counts
   only until it ends), set while a module takes control of a session and
   inherited by the tasks and timers it starts.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time

__all__ = ["SESSION", "session_context", "SessionFilter", "JsonFormatter", "TextFormatter",
           "setup", "FORMATS"]

FORMATS = ("text", "json")

SESSION: contextvars.ContextVar = contextvars.ContextVar("baton_session", default=None)

# engine/sessions/session.py: "S" + 6 hex of the process prefix + 8 hex of a counter.
_SID = re.compile(r"\bS[0-9a-f]{14}\b")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "session", "taskName"}


@contextlib.contextmanager
def session_context(session):
    """Log lines written inside (and by tasks started inside) are about `session`
    (an id, or a Session: then only while it has not ended)."""
    token = SESSION.set(session)
    try:
        yield
    finally:
        SESSION.reset(token)


def _session_of(record: logging.LogRecord) -> str | None:
    args = record.args
    if isinstance(args, tuple):
        for a in args:
            if isinstance(a, str) and len(a) == 15 and _SID.fullmatch(a):
                return a
    elif isinstance(args, dict):
        for a in args.values():
            if isinstance(a, str) and len(a) == 15 and _SID.fullmatch(a):
                return a
    try:
        m = _SID.search(record.getMessage())
    except Exception:       # a broken format string is the formatter's to report
        m = None
    if m is not None:
        return m.group(0)
    s = SESSION.get()
    if s is None or isinstance(s, str):
        return s
    # A Session: a timer or task it started may outlive it (or serve others later).
    return None if s.ended else s.id


class SessionFilter(logging.Filter):
    """Sets `record.session` (the session id or None) on every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        sid = record.__dict__.get("session")
        if sid is None:
            sid = _session_of(record)
        elif not isinstance(sid, str):
            sid = getattr(sid, "id", None) or str(sid)   # a Session passed as `extra`
        record.session = sid
        return True


def _ts(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
        f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _ts(record), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage(), "session": getattr(record, "session", None)}
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """The human format; `[session=ID]` is added when the message does not name it."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        sid = getattr(record, "session", None)
        if sid and sid not in record.message:
            text += f" [session={sid}]"
        return text


def setup(level: str = "info", fmt: str = "text", stream=None) -> logging.Handler:
    """Send every logger's records to `stream` (stderr) as `fmt` (text or json) from
    `level` up; replaces the root logger's handlers. Returns the handler."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(SessionFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    # `debug` is Baton's debug: the libraries' own stays out of it.
    for name in ("grpc", "aiohttp", "asyncio"):
        logging.getLogger(name).setLevel(max(root.level, logging.INFO))
    return handler
