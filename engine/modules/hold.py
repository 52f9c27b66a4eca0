"""`baton.hold`: answer the call and hold it (media answered, silence) until the caller hangs up."""
from __future__ import annotations

import logging

from .base import Module, PortsExhausted, SdpError, answer_media

log = logging.getLogger("baton.modules.hold")


class HoldModule(Module):
    code = "baton.hold"
    level = "basic"

    def take(self, session, leg) -> None:
        dialog = leg.dialog
        try:
            answer = answer_media(self.engine, leg, dialog.remote_sdp)
        except SdpError as exc:
            log.info("session %s: unusable SDP offer: %s", session.id, exc)
            dialog.reject(488, why="sdp")
            return
        except PortsExhausted:
            log.warning("session %s: no RTP ports left", session.id)
            dialog.reject(503, headers=[("retry-after", "5")], why="no-ports")
            return
        ring = float(self.params.get("ring_seconds", 0) or 0)
        if ring > 0:
            dialog.provisional(180)
            self.engine.loop.call_later(ring, self._answer, leg, answer)
        else:
            self._answer(leg, answer)

    def _answer(self, leg, answer: bytes) -> None:
        if leg.dialog is None:
            return  # cancelled while ringing
        leg.dialog.answer(answer)
        if leg.stream is not None:
            self.media_ready(leg)
