"""`baton.bridge`: the basic level. A B2BUA leg to a dialled endpoint, media relayed in C.

Params: `to` (SIP URI, or a number with `trunk`; `{self}` stands for this
engine's own address), `trunk` (the operator's only), `timeout` (ring
seconds, default 30), `time_limit` (seconds once answered), `caller_id`.
Outlets: `busy`, `no-answer`, `failed` (the call was not answered) and
`done` (the dialled party hung up). The event `dialled-hangup` can map the
dialled party's hang-up elsewhere, e.g. to a post-call survey. A module
that placed the call and got the answer itself (the call centre's agent leg)
gives the leg to the next bridge with `hand_over` instead of dialling.
Every dial is first checked against the account's outbound permissions
(`dialing.permit`): a refused one takes the `failed` outlet.

Nothing runs per packet while bridged: both RTP streams relay to each other
inside the Cython hub, rewritten onto each far end's own SSRC and timeline.
"""
from __future__ import annotations

import logging

from engine.media.ports import PortsExhausted
from engine.sip import sdp
from engine.sip.errors import SdpError
from engine.sip.uac import OutgoingCall, UacOwner
from engine.sip.uri import check_user_part, sip_uri
from engine.modules.base import Module, answer_media
from engine.sessions.dialing import OutboundDenied, permit, trunk_route

log = logging.getLogger("baton.modules.bridge")

BUSY = (486, 600, 603)
NO_ANSWER = (408, 480, 487)
ADOPT_KEY = "baton.bridge:adopt"


def hand_over(session, leg) -> None:
    """Give the next `baton.bridge` to take `session` an already answered leg
    (e.g. a call-centre agent's) to bridge the caller to, instead of dialling."""
    session.saved[ADOPT_KEY] = leg


class BridgeState(UacOwner):
    """One dial attempt of one session."""

    def __init__(self, ctl, module):
        self.ctl = ctl
        self.module = module
        self.leg = None
        self.call = None
        self.answered = False
        self.ended = False
        self.ringing = False
        self.status = 0
        self.player = None

    # UacOwner
    def call_progress(self, call, status, msg) -> None:
        self.module.progress(self.ctl, self, status, msg)

    def call_answered(self, call, msg) -> None:
        self.module.answered(self.ctl, self, msg)

    def call_failed(self, call, status, msg) -> None:
        self.module.failed(self.ctl, self, status)


class BridgeModule(Module):
    code = "baton.bridge"
    level = "basic"
    forwards = True
    outlets = ("busy", "no-answer", "failed", "done")

    def take(self, ctl) -> None:
        from engine.sessions.session import Leg

        engine = self.engine
        session = ctl.session
        caller = ctl.caller
        adopted = session.saved.pop(ADOPT_KEY, None)
        if adopted is not None:
            self._adopt(ctl, adopted)
            return
        try:
            target, destination, transport, credentials, domain, to = self._target(ctl)
            caller_id = ctl.params.get("caller_id")
            if caller_id:
                # It becomes the From's user part: nothing that could end the header.
                check_user_part(str(caller_id), "caller_id")
            grant = permit(engine, session.account, to, ctl.params.get("trunk"))
        except ValueError as exc:
            log.info("session %s: bridge: %s", session.id, exc)
            self._outcome(ctl, None, "failed", 404)
            return
        except OutboundDenied:
            # The account may not dial this: the node's failed outlet (a <Dial>'s
            # DialCallStatus=failed), or 403 to a caller not yet answered.
            self._outcome(ctl, None, "failed", 403)
            return
        neg = caller.negotiated
        if neg is None and caller.dialog is not None and caller.dialog.remote_sdp:
            try:
                neg, _ = sdp.negotiate(sdp.parse(caller.dialog.remote_sdp))
            except SdpError as exc:
                if not caller.answered:
                    # The offer is answered only once the far end answers: one that
                    # could never be answered is refused now, before anyone is rung.
                    log.info("session %s: unusable SDP offer: %s", session.id, exc)
                    caller.dialog.reject(488, why="sdp")
                    return
        state = BridgeState(ctl, self)
        ctl.state = state
        leg = Leg(session, role="dialled")
        leg.outbound = grant
        state.leg = leg
        try:
            leg.ports = engine.ports.allocate()
        except PortsExhausted:
            leg.release()
            self._outcome(ctl, state, "failed", 503)
            return
        offer = self._offer(neg, leg)
        from_uri = ctl.params.get("caller_id")
        from_uri = f"<sip:{from_uri}@{domain}>" if from_uri else session.from_uri.split(";tag=")[0]
        mf = 70
        if caller.dialog is not None and caller.dialog.invite is not None:
            mf = max(caller.dialog.invite.max_forwards - 1, 0) if caller.dialog.invite.max_forwards > 0 else 70
        call = OutgoingCall(engine.sip, target, from_uri=from_uri, sdp=offer,
                            destination=destination, transport=transport,
                            credentials=credentials, max_forwards=mf, owner=state)
        state.call = call
        leg.call = call
        ctl.later(float(ctl.params.get("timeout", 30)), self._ring_timeout, ctl, state)
        if caller.answered:
            self._ringback(ctl, state)
        engine.loop.create_task(call.start())

    def _adopt(self, ctl, leg) -> None:
        """Bridge the answered caller to a leg another module dialled and got answered."""
        state = BridgeState(ctl, self)
        ctl.state = state
        state.leg = leg
        state.call = leg.call
        state.answered = True
        if state.call is not None:
            state.call.owner = state
        if leg.ended or leg.stream is None:
            state.ended = True
            self._after_call(ctl, "dialled-hangup")
            return
        caller = ctl.caller
        caller.close_channel()
        if caller.stream is not None:
            caller.stream.relay_to(leg.stream)
            leg.stream.relay_to(caller.stream)
        limit = ctl.params.get("time_limit") or ctl.params.get("timeLimit")
        if limit:
            ctl.later(float(limit), self._time_limit, ctl, state)

    def _target(self, ctl):
        to = str(ctl.params.get("to", "")).strip()
        if "{self}" in to:
            # This engine's own address, so a config can dial back into itself.
            from engine.common.net import format_hostport

            to = to.replace("{self}", format_hostport(self.engine.cfg.advertise, self.engine.sip_port))
        if not to:
            raise ValueError("no `to` to dial")
        trunk_name = ctl.params.get("trunk")
        cfg = self.engine.cfg
        if trunk_name:
            return (*trunk_route(cfg, trunk_name, to), to)
        if not to.startswith(("sip:", "sips:")):
            raise ValueError(f"cannot dial {to[:60]!r} without a trunk")
        sip_uri(to, "to")
        return to, None, None, None, self.engine.cfg.advertise, to

    def _offer(self, neg, leg) -> bytes:
        """Offer the dialled party what the caller uses (`neg`, None when the caller
        made no offer), so the relay never transcodes."""
        addr = self.engine.media_address
        leg.sdp_version += 1
        if neg is None:
            return sdp.build(addr, leg.ports.port, None, leg.sdp_id, leg.sdp_version)
        offer = sdp.Negotiated()
        offer.payload_type, offer.codec, offer.dtmf_pt = neg.payload_type, neg.codec, neg.dtmf_pt
        offer.direction = "sendrecv"
        return sdp.build(addr, leg.ports.port, offer, leg.sdp_id, leg.sdp_version)

    def _ringback(self, ctl, state) -> None:
        ch = ctl.caller.open_channel()
        if ch is not None and self.engine.ringback is not None:
            from ext.kernels import rtp

            state.player = rtp.Player(self.engine.ringback, 0)
            ch.play(state.player)

    # -- the dialled leg's progress ---------------------------------------------
    def progress(self, ctl, state, status, msg) -> None:
        if not ctl.active:
            return
        caller = ctl.caller
        if not caller.answered and caller.dialog is not None and status in (180, 183) \
                and not state.ringing:
            state.ringing = True
            caller.dialog.provisional(180)  # ring-back passed on

    def answered(self, ctl, state, msg) -> None:
        leg = state.leg
        if not ctl.active or state.ended:
            if state.call is not None:
                state.call.hangup()
            return
        session = ctl.session
        leg.attach_dialog(state.call.dialog)
        leg.answered = True
        try:
            neg, _ = sdp.negotiate(sdp.parse(msg.body))
        except SdpError as exc:
            log.info("session %s: dialled party's SDP unusable: %s", session.id, exc)
            leg.hangup("sdp")
            self._outcome(ctl, state, "failed", 488)
            return
        leg.apply_media(neg)
        caller = ctl.caller
        if not caller.answered:
            try:
                answer = answer_media(self.engine, caller, caller.dialog.remote_sdp)
            except (SdpError, PortsExhausted):
                # The caller first: ending the dialled leg first would end the session
                # and take the caller's dialog with it.
                caller.dialog.reject(488, why="sdp")
                leg.hangup("sdp")
                return
            caller.dialog.answer(answer)
            caller.answered = True
        state.answered = True
        state.player = None
        # Bridge: each stream relays into the other; the caller leaves the media clock.
        caller.close_channel()
        if caller.stream is not None and leg.stream is not None:
            caller.stream.relay_to(leg.stream)
            leg.stream.relay_to(caller.stream)
        limit = ctl.params.get("time_limit") or ctl.params.get("timeLimit")
        if limit:
            ctl.later(float(limit), self._time_limit, ctl, state)

    def failed(self, ctl, state, status) -> None:
        state.status = status
        if state.ended:
            return
        state.ended = True
        if state.leg is not None:
            state.leg.ended = True
            state.leg.release()
        outlet = "busy" if status in BUSY else "no-answer" if status in NO_ANSWER else "failed"
        self._outcome(ctl, state, outlet, status)

    def _ring_timeout(self, ctl, state) -> None:
        if state.answered or state.ended:
            return
        state.status = 408
        if state.call is not None:
            state.call.cancel()
        state.ended = True
        if state.leg is not None:
            state.leg.ended = True
            state.leg.release()
        self._outcome(ctl, state, "no-answer", 408)

    def _time_limit(self, ctl, state) -> None:
        if state.leg is not None and not state.leg.ended and not state.ended:
            state.ended = True  # our own hang-up: not a dialled-hangup
            self._unbridge(ctl, state)
            state.leg.hangup("time-limit")
            self._after_call(ctl, "time-limit")

    def _outcome(self, ctl, state, outlet: str, status: int) -> None:
        """The dialled party never answered: follow the outlet, or refuse the caller."""
        if not ctl.active:
            return
        caller = ctl.caller
        node = ctl.node
        if outlet in node.outlets or (node.app is not None and "fallback" in node.outlets):
            ctl.release(outlet, DialCallStatus=_dial_status(outlet))
            return
        if not caller.answered and caller.dialog is not None:
            # A plain B2BUA: the caller gets the dialled party's answer.
            code = status if 400 <= status < 700 else 480
            caller.dialog.reject(code, why=f"dial-{outlet}")
            return
        ctl.hangup(f"dial-{outlet}")

    # -- after the call ---------------------------------------------------------
    def leg_ended(self, ctl, leg, reason) -> None:
        state = ctl.state
        if state is None or leg is not state.leg or state.ended:
            return
        state.ended = True
        self._unbridge(ctl, state)
        self._after_call(ctl, "dialled-hangup")

    def _after_call(self, ctl, why: str) -> None:
        # Event mapping first (e.g. dialled-hangup -> survey), then the `done` outlet.
        if not ctl.event(why, default_outlet="done" if "done" in ctl.node.outlets else None):
            ctl.hangup(why)

    def _unbridge(self, ctl, state) -> None:
        caller = ctl.caller
        if caller.stream is not None:
            caller.stream.terminate()
            caller.open_channel()
        if state.leg is not None and state.leg.stream is not None:
            state.leg.stream.idle()

    def revoke(self, ctl, reason: str) -> None:
        state = ctl.state
        if state is None:
            return
        if not state.ended:
            state.ended = True
            if state.leg is not None:
                if state.answered:
                    self._unbridge(ctl, state)
                state.leg.hangup(reason)
        ch = ctl.caller.channel
        if ch is not None and state.player is not None and ch.player is state.player:
            ch.silence()

    def reoffer(self, ctl, leg, body: bytes) -> bytes:
        return answer_media(self.engine, leg, body)


def _dial_status(outlet: str) -> str:
    return {"busy": "busy", "no-answer": "no-answer", "failed": "failed",
            "done": "completed"}.get(outlet, outlet)
