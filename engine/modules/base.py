"""The module interface that built-in modules, instruction apps and gRPC vendors sit behind."""
from __future__ import annotations

import logging

from engine.media.ports import PortsExhausted
from engine.sip.errors import SdpError
from engine.sessions.apps import configured
from engine.sessions.session import answer_media

log = logging.getLogger("baton.modules")


def operator_param(ctl, key: str):
    """Module param `key` only as the operator's configuration set it: the module's own
    config or a configured number or app node, never a node that a document, a vendor or
    an API call made (their parameters must not reach internal settings)."""
    node = ctl.node
    if node is not None and key in node.params and configured(ctl.engine, node):
        return node.params[key]
    return ctl.module.params.get(key)


class Module:
    """A unit of application control, identified by its module code.

    One instance serves every session; per-session state lives on the
    `Control` (`ctl.state`). Every callback gets the Control it concerns and
    must do nothing once `ctl.active` is False.
    """

    code = ""
    level = "basic"
    forwards = False          # True for modules that place calls onward (Max-Forwards)
    outlets: tuple = ()       # the outlets this module may leave through (documentation)
    # True when the module is offered a session and must accept it first: its
    # time is metered from `Session.taken()`, the wait before is priced at nothing.
    metered_from_take = False
    texting = False           # True for modules that take text conversations (on_text)

    def __init__(self, engine, params: dict | None = None):
        self.engine = engine
        self.params = params or {}

    @classmethod
    def check_params(cls, params: dict) -> None:
        """Validate an app node's `params` at config load: raise
        `ValueError("KEY: PROBLEM")` naming the param, and the engine refuses
        to start with `FILE: apps.APP.nodes.NODE.params.KEY: PROBLEM`."""

    def take(self, ctl) -> None:
        """Take control of `ctl.session`."""
        raise NotImplementedError

    def revoke(self, ctl, reason: str) -> None:
        """Control has left this module (a transition or the end of the call):
        let go of what this module set up for the session. The next module's
        media is already attached when this runs."""
        if not ctl.session.legs:
            return      # a text conversation has no media
        channel = ctl.caller.channel
        if channel is not None and ctl.state is not None and \
                getattr(ctl.state, "player", None) is not None and channel.player is ctl.state.player:
            channel.silence()

    def on_text(self, ctl, message) -> None:
        """A text (`engine.sessions.conversations.TextMessage`) arrived on the
        session this module controls: a conversation's, or a MESSAGE inside a call."""

    def media_ready(self, ctl, leg) -> None:
        """The leg's RTP stream is known (after a late offer's ACK)."""
        leg.open_channel()

    def media_event(self, ctl, leg, kind: str, detail) -> None:
        """A media clock event on a leg: `dtmf`, `play-done`, `record-full`."""

    def leg_ended(self, ctl, leg, reason: str) -> None:
        """A leg other than the caller's ended while this module held control."""

    def reoffer(self, ctl, leg, body: bytes) -> bytes:
        """A new SDP offer on `leg` (re-INVITE/UPDATE, e.g. hold): return the answer."""
        return answer_media(self.engine, leg, body)


def answer_caller(ctl) -> bool:
    """Answer the caller's INVITE (if not yet) and put the caller on the media clock.

    Returns False (and ends the call) when the offer is unusable or no ports are left."""
    leg = ctl.caller
    if leg.answered:
        if leg.stream is not None:
            leg.open_channel()
        return True
    dialog = leg.dialog
    if dialog is None:
        return False
    try:
        answer = answer_media(ctl.engine, leg, dialog.remote_sdp)
    except SdpError as exc:
        log.info("session %s: unusable SDP offer: %s", ctl.session.id, exc)
        dialog.reject(488, why="sdp")
        return False
    except PortsExhausted:
        log.warning("session %s: no RTP ports left", ctl.session.id)
        dialog.reject(503, headers=[("retry-after", "5")], why="no-ports")
        return False
    dialog.answer(answer)
    leg.answered = True
    if leg.stream is not None:
        leg.open_channel()
    return True


__all__ = ["Module", "answer_media", "answer_caller", "SdpError", "PortsExhausted"]
