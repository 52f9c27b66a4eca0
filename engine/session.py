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

    __slots__ = ("session", "dialog", "ports", "negotiated", "sdp_id", "sdp_version",
                 "stream", "channel", "on_hold")

    def __init__(self, session: Session, dialog):
        self.session = session
        self.dialog = dialog
        self.ports = None
        self.negotiated = None
        self.sdp_id = sdp.new_session_id()
        self.sdp_version = 0
        self.stream = None
        self.channel = None
        self.on_hold = False
        dialog.owner = self
        dialog.session = session
        session.legs.append(self)

    def hangup(self, reason: str) -> None:
        d = self.dialog
        if d is not None and d.owner is self:
            d.bye(reason=reason)
        self.release()

    def apply_media(self, neg) -> None:
        """Point the leg's RTP stream at what SDP negotiated (create it on first use)."""
        media = self.session.engine.media
        self.negotiated = neg
        self.on_hold = neg.hold
        if self.stream is None:
            self.stream = media.stream(self.ports.rtp, neg.payload_type, neg.dtmf_pt)
            media.watch_inactivity(self.stream, self)
        else:
            self.stream.payload_type = neg.payload_type
            self.stream.law = 1 if neg.payload_type == 8 else 0
            if neg.dtmf_pt is not None:
                self.stream.dtmf_pt = neg.dtmf_pt
        # RFC 3264 8.4: on hold the far end gets nothing (a=sendonly/inactive from them,
        # or c=0.0.0.0); symmetric RTP re-latches after any change.
        if neg.hold and neg.direction in ("inactive", "recvonly"):
            self.stream.set_remote("0.0.0.0", 0)
        else:
            self.stream.set_remote(neg.remote_addr, neg.remote_port)

    def open_channel(self):
        """Put this leg on the media clock (terminate its RTP here)."""
        if self.channel is None and self.stream is not None:
            self.channel = self.session.engine.media.channel(self.stream, self)
        return self.channel

    def close_channel(self) -> None:
        if self.channel is not None:
            self.session.engine.media.drop_channel(self.channel)
            self.channel = None

    def release(self) -> None:
        media = self.session.engine.media
        self.close_channel()
        if self.stream is not None:
            media.release(self.stream)
            self.stream = None
        if self.ports is not None:
            self.ports.release()
            self.ports = None

    # media callbacks
    def media_event(self, channel_id: int, kind: str, detail) -> None:
        module = self.session.module
        handler = getattr(module, "media_event", None)
        if handler is not None:
            handler(self, kind, detail)

    def media_inactive(self, stream) -> None:
        self.session.end("rtp-timeout")

    def dialog_confirmed(self, dialog) -> None:
        # A late offer (INVITE without SDP): the caller's answer came in the ACK.
        if self.negotiated is None and dialog.remote_sdp:
            try:
                neg, _ = sdp.negotiate(sdp.parse(dialog.remote_sdp))
            except Exception:
                self.session.end("sdp")
                return
            self.apply_media(neg)
            self.session.module.media_ready(self)

    # DialogOwner
    def dialog_terminated(self, dialog, reason: str) -> None:
        self.release()
        self.dialog = None
        self.session.end(reason)

    def dialog_reoffer(self, dialog, body: bytes) -> bytes:
        module = self.session.module
        return module.reoffer(self, body)
