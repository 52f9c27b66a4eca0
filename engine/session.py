"""Sessions and legs.

A session is one call with an id that never changes while modules change;
a leg is one SIP dialog plus its media. Control history records which
module held the session, from when to when, and why it got control.
"""
from __future__ import annotations

import itertools
import os
import time

from .sip import sdp
from .sip.dialog import DialogOwner

_counter = itertools.count(1)
_prefix = os.urandom(3).hex()


def new_session_id() -> str:
    return f"S{_prefix}{next(_counter):08x}"


class ControlSpan:
    __slots__ = ("module", "level", "start_mono", "start_wall", "end_mono", "end_wall", "reason")

    def __init__(self, module, level, reason):
        self.module = module
        self.level = level
        self.reason = reason
        self.start_mono = time.monotonic_ns()
        self.start_wall = time.time_ns()
        self.end_mono = None
        self.end_wall = None

    def close(self) -> None:
        if self.end_mono is None:
            self.end_mono = time.monotonic_ns()
            self.end_wall = time.time_ns()

    def as_dict(self) -> dict:
        return {"module": self.module, "level": self.level, "reason": self.reason,
                "start_mono_ns": self.start_mono, "end_mono_ns": self.end_mono,
                "start_wall_ns": self.start_wall, "end_wall_ns": self.end_wall}


class Session:
    __slots__ = ("id", "account", "number", "from_uri", "to_uri", "direction", "params",
                 "legs", "module", "history", "ended", "end_reason", "engine")

    def __init__(self, engine, account: str, number: str, from_uri: str, to_uri: str,
                 direction: str = "inbound"):
        self.id = new_session_id()
        self.engine = engine
        self.account = account
        self.number = number
        self.from_uri = from_uri
        self.to_uri = to_uri
        self.direction = direction
        self.params: dict = {}
        self.legs: list = []
        self.module = None
        self.history: list[ControlSpan] = []
        self.ended = False
        self.end_reason = None

    def give_control(self, module, level: str, reason: str) -> None:
        if self.history:
            self.history[-1].close()
        self.module = module
        self.history.append(ControlSpan(module.code, level, reason))

    def end(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.end_reason = reason
        if self.history:
            self.history[-1].close()
        for leg in self.legs:
            leg.hangup(reason)
        self.engine.session_ended(self)


class Leg(DialogOwner):
    """One call leg: a dialog and its RTP ports."""

    __slots__ = ("session", "dialog", "ports", "negotiated", "sdp_id", "sdp_version")

    def __init__(self, session: Session, dialog):
        self.session = session
        self.dialog = dialog
        self.ports = None
        self.negotiated = None
        self.sdp_id = sdp.new_session_id()
        self.sdp_version = 0
        dialog.owner = self
        dialog.session = session
        session.legs.append(self)

    def hangup(self, reason: str) -> None:
        d = self.dialog
        if d is not None and d.owner is self:
            d.bye(reason=reason)
        self.release()

    def release(self) -> None:
        if self.ports is not None:
            self.ports.release()
            self.ports = None

    # DialogOwner
    def dialog_terminated(self, dialog, reason: str) -> None:
        self.release()
        self.dialog = None
        self.session.end(reason)

    def dialog_reoffer(self, dialog, body: bytes) -> bytes:
        module = self.session.module
        return module.reoffer(self, body)
