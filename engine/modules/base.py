"""The module interface every module sits behind."""
from __future__ import annotations

from ..media.ports import PortsExhausted
from ..sip import sdp
from ..sip.errors import SdpError


class Module:
    """A unit of application control, identified by its module code."""

    code = ""
    level = "basic"

    def __init__(self, engine, params: dict):
        self.engine = engine
        self.params = params

    def take(self, session, leg) -> None:
        """Take control of `session`; `leg` is the caller's leg."""
        raise NotImplementedError

    def media_ready(self, leg) -> None:
        """The leg's RTP stream is known (after a late offer's ACK): start media."""
        leg.open_channel()

    def reoffer(self, leg, body: bytes) -> bytes:
        """A new SDP offer on `leg` (re-INVITE/UPDATE, e.g. hold): return the answer."""
        return answer_media(self.engine, leg, body)


def answer_media(engine, leg, body: bytes | None) -> bytes:
    """Negotiate the caller's offer (or make an offer for a late-offer INVITE),
    allocating the leg's RTP ports on first use. Raises SdpError / PortsExhausted."""
    if not body:
        if leg.ports is None:
            leg.ports = engine.ports.allocate()
        return sdp.build(engine.media_address, leg.ports.port, None,
                         leg.sdp_id, _next_version(leg))
    offer = sdp.parse(body)
    neg, index = sdp.negotiate(offer)
    if leg.ports is None:
        leg.ports = engine.ports.allocate()
    leg.apply_media(neg)
    return sdp.build(engine.media_address, leg.ports.port, neg, leg.sdp_id,
                     _next_version(leg), offer, index)


def _next_version(leg) -> int:
    leg.sdp_version += 1
    return leg.sdp_version


__all__ = ["Module", "answer_media", "SdpError", "PortsExhausted"]
