"""Sessions, legs and the passing of control between modules.

A session is one call with an id that never changes while modules change.
A leg is one SIP dialog plus its RTP stream. Control is held through a
`Control` token: a module acts on the session only while its token is
active, so a module that lost control (a transition, an API call, a hang-up)
can never touch the session again by mistake.

Every change of control is checked by the policy hook, recorded in the
session's history and stamped into the ring for the accountant.
"""
from __future__ import annotations

import itertools
import logging
import os
import time

from engine.sessions import apps as apps_mod
from engine.sessions.policy import Pending
from engine.common.logs import SESSION as _LOG_SESSION
from engine.sip import sdp
from engine.sip.errors import SdpError
from engine.sip.dialog import DialogOwner
from engine.common import clock
from engine.common.levels import OFFER
from engine.common.guard import media_trusted
from engine.media.engine import LAW_OF_PT
from engine.media.wav import AudioError

log = logging.getLogger("baton.session")

_counter = itertools.count(1)
_prefix = os.urandom(3).hex()

APOLOGY = "We are sorry, this call cannot be completed. Goodbye."


def new_session_id() -> str:
    return f"S{_prefix}{next(_counter):08x}"


class ControlSpan:
    """One module's time in control of a session."""

    __slots__ = ("module", "level", "node", "start_mono", "start_wall", "end_mono", "end_wall",
                 "reason", "end_reason")

    def __init__(self, module: str, level: str, reason: str, node: str = ""):
        self.module = module
        self.level = level
        self.node = node
        self.reason = reason
        self.start_mono = time.monotonic_ns()
        self.start_wall = clock.wall_ns()
        self.end_mono = None
        self.end_wall = None
        self.end_reason = None

    def close(self, reason: str, mono: int, wall: int) -> None:
        if self.end_mono is None:
            self.end_mono = mono
            self.end_wall = wall
            self.end_reason = reason

    def as_dict(self) -> dict:
        return {"module": self.module, "level": self.level, "node": self.node,
                "reason": self.reason, "start_mono_ns": self.start_mono,
                "end_mono_ns": self.end_mono, "start_wall_ns": self.start_wall,
                "end_wall_ns": self.end_wall, "end_reason": self.end_reason}


class Control:
    """What a module holds while it controls a session.

    Invariant: at most one Control of a session is `active`; every action of
    an inactive one is a no-op that returns False.
    """

    __slots__ = ("session", "node", "module", "params", "active", "state", "limit",
                 "timers", "span", "limit_timers")

    def __init__(self, session: "Session", node, module, params: dict):
        self.session = session
        self.node = node
        self.module = module
        self.params = params
        self.active = True
        self.state = None
        self.limit = None          # seconds of use the policy allows, or None
        self.timers = []
        self.span = None
        self.limit_timers = ()     # the policy limit's cut-off and warning

    @property
    def caller(self) -> "Leg":
        return self.session.legs[0]

    @property
    def engine(self):
        return self.session.engine

    @property
    def node_configured(self) -> bool:
        """The node in control is one the operator configured (apps.configured)."""
        return self.node is not None and apps_mod.configured(self.session.engine, self.node)

    def release(self, outlet: str, **params) -> bool:
        """Leave through a named outlet of this node."""
        if not self.active:
            return False
        self.session.follow(outlet, params, reason=f"outlet:{outlet}")
        return True

    def transfer(self, target: str, reason: str = "instruction", **params) -> bool:
        """Hand the session to a module code, URI or node."""
        if not self.active:
            return False
        self.session.transition(target, reason, params)
        return True

    def event(self, name: str, default_outlet: str | None = None) -> bool:
        """Something happened (e.g. `dialled-hangup`): follow the event mapping of
        the node (or the app), else `default_outlet`. False if nothing follows."""
        if not self.active:
            return False
        return self.session.on_event(name, default_outlet)

    def hangup(self, reason: str = "hangup") -> None:
        if self.active:
            self.session.end(reason)

    def later(self, seconds: float, fn, *args):
        """A timer that only fires while this control is active."""
        def fire():
            timers = self.timers
            if h in timers:
                timers.remove(h)
            if self.active:
                fn(*args)
        timers = self.timers
        if len(timers) >= 32:
            # Re-armed timers (a prompt's timeout per key) are cancelled, not
            # fired: drop them so a long call does not keep every handle.
            timers[:] = [t for t in timers if not t.cancelled()]
        h = self.session.engine.loop.call_later(seconds, fire)
        timers.append(h)
        return h

    def deactivate(self) -> None:
        self.active = False
        for h in self.timers:
            h.cancel()
        self.timers.clear()


class Session:
    __slots__ = ("id", "account", "number", "from_uri", "to_uri", "direction", "params",
                 "legs", "module", "history", "ended", "end_reason", "engine", "app", "node",
                 "control", "vars", "started_mono", "started_wall", "ended_mono",
                 "ended_wall", "transitions", "saved", "kind", "messages", "peer",
                 "last_text", "pending")

    def __init__(self, engine, account: str, number: str, from_uri: str, to_uri: str,
                 direction: str = "inbound", app=None, kind: str = "call"):
        self.id = new_session_id()
        # "call", or "messaging" for a text conversation (no legs; its messages
        # reach the module in control through `Module.on_text`).
        self.kind = kind
        self.messages: list = []       # the conversation's history (TextMessage sids)
        self.peer = None               # where replies of a conversation go
        self.last_text = 0.0           # loop time of the conversation's last message
        self.engine = engine
        self.account = account
        self.number = number
        self.from_uri = from_uri
        self.to_uri = to_uri
        self.direction = direction
        self.params: dict = {"From": from_uri, "To": to_uri, "account": account,
                             "direction": direction, "number": number}
        self.legs: list = []
        self.module = None
        self.history: list[ControlSpan] = []
        self.ended = False
        self.end_reason = None
        self.app = app
        self.node = None
        self.control: Control | None = None
        self.vars = dict(app.vars) if app is not None else {}
        self.started_mono = time.monotonic_ns()
        self.started_wall = clock.wall_ns()
        self.ended_mono = None
        self.ended_wall = None
        self.transitions = 0
        # Per-module state kept while another module holds control, so a module
        # that gets the session back resumes where it left off (e.g. the rest of
        # an instruction document after a Dial).
        self.saved: dict = {}
        # A transition whose policy check waits for the cluster (policy.Pending): no
        # module is in control until it is decided.
        self.pending = None

    @property
    def caller(self) -> "Leg":
        return self.legs[0]

    @property
    def kv(self) -> dict:
        """The account's key/value store, readable (and writable) by every module."""
        acc = self.engine.cfg.accounts.get(self.account)
        return acc.kv if acc is not None else {}

    @property
    def level(self) -> str | None:
        return self.module.level if self.module is not None else None

    # -- passing control --------------------------------------------------------
    def start(self, node, reason: str = "initial") -> None:
        self.engine.stamper.session_start(self)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session %s started", self.id,
                      extra={"event": "session.started", "account": self.account,
                             "number": self.number, "direction": self.direction,
                             "module_code": node.module})
        self._give(node, reason, None)

    def follow(self, outlet: str, params: dict | None = None, reason: str | None = None) -> None:
        node = self.node
        target = node.outlets.get(outlet) if node is not None else None
        if target is None:
            if outlet == "fallback":
                self.fail("no fallback outlet")
                return
            if outlet in ("done", "hangup"):
                self.end(f"outlet:{outlet}")
                return
            # An outlet that is not wired: the fallback outlet, else the end of the call.
            target = node.outlets.get("fallback") if node is not None else None
            if target is None:
                self.end(f"outlet:{outlet}")
                return
            reason = "fallback"
        self.transition(target, reason or f"outlet:{outlet}", params)

    def on_event(self, name: str, default_outlet: str | None = None) -> bool:
        node = self.node
        target = None
        if node is not None:
            target = node.events.get(name)
        if target is None and self.app is not None:
            target = self.app.events.get(name)
        if target is not None:
            self.transition(target, f"event:{name}")
            return True
        if default_outlet is not None:
            self.follow(default_outlet)
            return True
        return False

    def transition(self, target, reason: str, params: dict | None = None) -> None:
        """Move control to `target` (a Node, node name, module code or URI)."""
        if self.ended:
            return
        if isinstance(target, apps_mod.Node):
            node = target
        else:
            node = apps_mod.resolve(self.app, str(target), params)
        if node == apps_mod.HANGUP:
            self.end(reason)
            return
        if node is None:
            log.warning("session %s: target %r does not resolve", self.id, target)
            if self.node is not None and "fallback" in self.node.outlets:
                self.follow("fallback")
            else:
                self.fail(f"target {target!r} does not resolve")
            return
        self._give(node, reason, params)

    def _give(self, node, reason: str, params: dict | None) -> None:
        engine = self.engine
        self.pending = None            # a later transition replaces one still waiting
        module = engine.registry.resolve(node.module)
        if module is None:
            # The module is unknown or gone: the node's fallback outlet.
            log.warning("session %s: module %r is not available", self.id, node.module)
            fb = node.outlets.get("fallback")
            if fb is not None and self.transitions < 64:
                self.transitions += 1
                self.node = node
                self.transition(fb, "fallback")
            else:
                self.fail(f"module {node.module} is not available")
            return
        decision = engine.policy.check(self, node, module)
        if decision.__class__ is Pending:
            # The cluster's PostgreSQL is asked off the loop. Control has passed: the old
            # module acts no more, and the new one starts only once the grant is known.
            if self.control is not None:
                self.control.deactivate()
            self.pending = decision
            decision.then(lambda d: self._decided(decision, d, node, module, reason, params))
            return
        self._pass(decision, node, module, reason, params)

    def _decided(self, pending, decision, node, module, reason: str, params) -> None:
        if self.pending is not pending or self.ended:
            return                     # replaced by a later transition, or hung up
        self.pending = None
        self._pass(decision, node, module, reason, params)

    def _pass(self, decision, node, module, reason: str, params: dict | None) -> None:
        engine = self.engine
        if not decision.allow:
            log.info("session %s: policy denied %s: %s", self.id, module.code, decision.reason,
                     extra={"event": "policy.denied", "module_code": module.code,
                            "reason": decision.reason})
            engine.denials[module.code] += 1
            self._record("policy-denied:" + module.code, module.level, "policy-denied", node,
                         closed=True)
            denied = node.outlets.get("denied")
            if denied is not None and self.transitions < 64:
                self.transitions += 1
                self.transition(denied, "policy-denied")
            else:
                self.fail(f"not allowed: {decision.reason}")
            return
        self.transitions += 1
        if self.transitions > 10000:
            self.fail("too many transitions")
            return
        old = self.control
        merged = {**node.params, **(params or {})}
        ctl = Control(self, node, module, merged)
        ctl.limit = decision.limit
        self.control = ctl
        self.node = node
        prev_module = self.module.code if self.module is not None else ""
        self.module = module
        ctl.span = self._record(module.code, module.level, reason, node)
        # A module that must accept the session first (a vendor's: Offer, then
        # Take) is metered from its `taken()`; until then its time is the offer's.
        level = OFFER if module.metered_from_take else module.level
        engine.stamper.transition(self, prev_module, module.code, level, reason)
        engine.journal(self)
        if engine.listeners:
            engine.notify(self, "transition", {"from": prev_module, "to": module.code,
                                               "level": module.level, "reason": reason})
        # The first module's metered time runs from the session's start (the meter
        # bills the whole session), so what passed before this transition (the
        # policy check itself, a cluster's reservation) is spent from its limit.
        self._arm_limit(ctl, decision, 0.0 if prev_module else
                        max(0, ctl.span.start_mono - self.started_mono) / 1e9)
        # The new module attaches its media first; the old one lets go after.
        if old is not None:
            old.deactivate()
        # Lines the module logs (and tasks it starts) are about this session.
        log_token = _LOG_SESSION.set(self)
        try:
            module.take(ctl)
        except Exception:
            log.exception("session %s: module %s failed to take control", self.id, module.code)
            if ctl.active:
                fb = node.outlets.get("fallback")
                if fb is not None and self.transitions < 64:
                    self.transition(fb, "fallback")
                else:
                    self.fail(f"module {module.code} failed")
        finally:
            _LOG_SESSION.reset(log_token)
        if old is not None:
            try:
                old.module.revoke(old, reason)
            except Exception:
                log.exception("session %s: module %s failed to let go", self.id, old.module.code)

    def _limit_reached(self, ctl: Control) -> None:
        # A limit set by a cluster's cap slice is renewed while the cap has room.
        renew = getattr(self.engine.policy, "renew", None)
        if renew is not None and ctl.active and not self.ended:
            decision = renew(self, ctl)
            if decision.__class__ is Pending:
                decision.then(lambda d: self._renewed(ctl, d))
                return
            if decision is not None:
                self._arm_limit(ctl, decision, self.engine.policy.spent(self, ctl))
                return
        if not ctl.event("limit"):
            self.end("limit")

    def _renewed(self, ctl: Control, decision) -> None:
        if not ctl.active or self.ended:
            return
        if decision is not None and decision.allow:
            self._arm_limit(ctl, decision, self.engine.policy.spent(self, ctl))
        elif not ctl.event("limit"):
            self.end("limit")

    def _arm_limit(self, ctl: Control, decision, spent: float = 0.0) -> None:
        """The policy's usage limit: the cut-off at zero, and the warning
        `decision.warn_before` seconds before it (at once when less is left);
        `spent`: seconds of the limit already used (metered before now)."""
        ctl.limit = decision.limit
        # A new decision (the account changed) replaces the earlier limit.
        for h in ctl.limit_timers:
            h.cancel()
        ctl.limit_timers = ()
        if decision.limit is None:
            return
        left = max(0.0, decision.limit - spent)
        timers = [ctl.later(left, self._limit_reached, ctl)]
        warn_before = getattr(decision, "warn_before", 0)
        if warn_before and warn_before > 0:
            from engine.sessions.warning import warn

            timers.append(ctl.later(max(0.0, left - warn_before), warn, ctl, decision))
        ctl.limit_timers = tuple(timers)

    def taken(self, ctl: Control, reason: str = "take") -> None:
        """`ctl`'s module (one `metered_from_take`) accepted the session: its
        metered time starts now. Stamped as a transition from the offer to the
        module at its level; the history keeps one span, from the offer."""
        if self.ended or not ctl.active or ctl is not self.control:
            return
        module = ctl.module
        self.engine.stamper.transition(self, module.code, module.code, module.level, reason,
                                       at=(time.monotonic_ns(), clock.wall_ns()))

    def set_account(self, account: str, reason: str = "account"):
        """Bill the rest of the session to `account` (e.g. a calling card's,
        once its PIN is known). The current module keeps control, but its time
        is split here: a new span of the same module starts and is stamped as
        a transition, so the accountant bills the time before to the old
        account and the time after to the new one. The policy is asked again
        for the new account: returns its Decision (a policy.Pending one while a
        cluster's reservation is taken), and arms its limit."""
        from engine.sessions.policy import ALLOW

        if self.ended or account == self.account or self.module is None:
            return ALLOW
        changing = getattr(self.engine.policy, "payer_changing", None)
        if changing is not None:
            changing(self)      # the time so far is the previous account's
        previous = self.account
        self.account = account
        self.params["account"] = account
        module, ctl = self.module, self.control
        span = self._record(module.code, module.level, reason, self.node)
        if ctl is not None:
            ctl.span = span
        self.engine.stamper.transition(self, module.code, module.code, module.level, reason)
        self.engine.journal(self)
        if self.engine.listeners:
            self.engine.notify(self, "transition", {"from": module.code, "to": module.code,
                                                    "level": module.level, "reason": reason,
                                                    "account": account, "previous_account": previous})
        decision = self.engine.policy.check(self, self.node, module)
        if decision.__class__ is Pending:
            # The module keeps control meanwhile; the caller waits for the decision too
            # (policy.when_decided).
            decision.then(lambda d: self._account_decided(ctl, d))
        else:
            self._account_decided(ctl, decision)
        return decision

    def _account_decided(self, ctl, decision) -> None:
        if decision.allow and ctl is not None and ctl.active and not self.ended:
            self._arm_limit(ctl, decision)

    def _record(self, code, level, reason, node, closed=False) -> ControlSpan:
        mono, wall = time.monotonic_ns(), clock.wall_ns()
        if self.history and self.history[-1].end_mono is None and not closed:
            self.history[-1].close(reason, mono, wall)
        span = ControlSpan(code, level, reason, getattr(node, "name", ""))
        if closed:
            span.close(reason, span.start_mono, span.start_wall)
        self.history.append(span)
        return span

    def fail(self, why: str) -> None:
        """No way forward: a spoken apology when possible, then the end of the call."""
        log.warning("session %s: %s", self.id, why)
        if self.ended:
            return
        self.pending = None
        caller = self.legs[0] if self.legs else None
        if caller is None or self.engine.speech is None:
            self.end("error")
            return
        if not caller.answered:
            if caller.dialog is not None:
                caller.dialog.reject(500, reason="Service Unavailable Here", why="error")
            else:
                self.end("error")
            return
        if self.control is not None:
            self.control.deactivate()
        self.engine.loop.create_task(self._apologise())

    async def _apologise(self) -> None:
        from ext.kernels import rtp

        caller = self.legs[0]
        try:
            pcm = await self.engine.speech.say(APOLOGY, voice="en-us")
        except AudioError as exc:
            log.info("session %s: apology not spoken: %s", self.id, exc)
            pcm = None
        ch = caller.open_channel() if not self.ended else None
        if pcm is None or ch is None:
            self.end("error")
            return
        ch.play(rtp.Player(pcm, 1))
        self.engine.loop.call_later(len(pcm) / 8000 + 0.3, self.end, "error")

    # -- ending -----------------------------------------------------------------
    def end(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.end_reason = reason
        self.pending = None    # a grant still waiting is released by the policy when decided
        self.ended_mono, self.ended_wall = time.monotonic_ns(), clock.wall_ns()
        ctl = self.control
        if self.history and self.history[-1].end_mono is None:
            self.history[-1].close(reason, self.ended_mono, self.ended_wall)
        if ctl is not None:
            ctl.deactivate()
            try:
                ctl.module.revoke(ctl, "hangup")
            except Exception:
                log.exception("session %s: module %s failed to let go", self.id, ctl.module.code)
        for leg in list(self.legs):
            leg.hangup(reason)
        self.engine.stamper.session_end(self)
        self.engine.journal(self)
        if self.engine.listeners:
            self.engine.notify(self, "ended", {"reason": reason})
        self.engine.session_ended(self)

    def forget(self) -> None:
        """Let go of the legs and the control of an ended session the engine no longer
        keeps: they point back at it, and without this each such cycle would wait for a
        full garbage collection (a pause that grows with the call rate) instead of
        going with its last reference."""
        self.legs = []
        self.control = None

    def summary(self) -> dict:
        return {"id": self.id, "account": self.account, "number": self.number,
                "from": self.from_uri, "to": self.to_uri, "direction": self.direction,
                "module": self.module.code if self.module else None, "level": self.level,
                "started_wall_ns": self.started_wall, "ended_wall_ns": self.ended_wall,
                "end_reason": self.end_reason, "kind": self.kind,
                "history": [s.as_dict() for s in self.history]}


class Leg(DialogOwner):
    """One call leg: a dialog (or an outbound call on its way) and its RTP."""

    __slots__ = ("session", "dialog", "ports", "negotiated", "sdp_id", "sdp_version",
                 "stream", "channel", "on_hold", "role", "call", "answered", "ended",
                 "rtcp_report", "outbound")

    def __init__(self, session: Session, dialog=None, role: str = "caller"):
        self.session = session
        self.dialog = dialog
        self.ports = None
        self.negotiated = None
        self.sdp_id = sdp.new_session_id()
        self.sdp_version = 0
        self.stream = None
        self.channel = None
        self.on_hold = False
        self.role = role
        self.call = None
        self.answered = False
        self.ended = False
        self.rtcp_report = None    # the far end's last RTCP reception report
        self.outbound = None       # sessions.dialing.Grant: counted while the leg is up
        if dialog is not None:
            dialog.owner = self
            dialog.session = session
        session.legs.append(self)

    def attach_dialog(self, dialog) -> None:
        self.dialog = dialog
        dialog.owner = self
        dialog.session = self.session

    def hangup(self, reason: str) -> None:
        d = self.dialog
        if d is not None and d.owner is self:
            d.bye(reason=reason)
        elif self.call is not None and not self.ended:
            self.call.hangup()
        self.ended = True
        self.release()

    def apply_media(self, neg) -> None:
        """Point the leg's RTP stream at what SDP negotiated (create it on first use)."""
        media = self.session.engine.media
        self.negotiated = neg
        self.on_hold = neg.hold
        if self.stream is None:
            self.stream = media.stream(self.ports.rtp, neg.payload_type, neg.dtmf_pt,
                                       self.ports.rtcp_socket, self)
            media.watch_inactivity(self.stream, self)
        else:
            self.stream.payload_type = neg.payload_type
            self.stream.law = LAW_OF_PT.get(neg.payload_type, LAW_OF_PT[0])
            if neg.dtmf_pt is not None:
                self.stream.dtmf_pt = neg.dtmf_pt
        # RFC 3264 8.4: on hold the far end gets nothing (a=sendonly/inactive from them,
        # or c=0.0.0.0); symmetric RTP re-latches after any change.
        if neg.hold and neg.direction in ("inactive", "recvonly"):
            self.stream.set_remote("0.0.0.0", 0)
        else:
            # An SDP address alone must not aim media at a third party: unless it is
            # where the signalling came from (or a trusted trunk), wait for the far
            # end's first packet and answer where it came from (RFC 4961 latching).
            d = self.dialog
            source = d.source[0] if d is not None and d.source else ""
            wait = not media_trusted(self.session.engine.cfg, source, neg.remote_addr)
            self.stream.set_remote(neg.remote_addr, neg.remote_port, wait)

    def media_stats(self) -> dict:
        """RTP counters of this leg, with loss and jitter as the far end reported them."""
        if self.stream is None:
            return {}
        stats = self.stream.stats()
        if self.rtcp_report is not None:
            stats["remote_fraction_lost"] = self.rtcp_report["fraction_lost"]
            stats["remote_cumulative_lost"] = self.rtcp_report["cumulative_lost"]
            stats["remote_jitter"] = self.rtcp_report["jitter"]
        return stats

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
        if self.outbound is not None:
            self.outbound.release()
            self.outbound = None
        self.close_channel()
        if self.stream is not None:
            media.release(self.stream)
            self.stream = None
        if self.ports is not None:
            self.ports.release()
            self.ports = None

    # media callbacks
    def media_event(self, channel_id: int, kind: str, detail) -> None:
        ctl = self.session.control
        if ctl is not None and ctl.active:
            ctl.module.media_event(ctl, self, kind, detail)

    def media_inactive(self, stream) -> None:
        log.info("session %s: no RTP on the %s leg: ending the call", self.session.id, self.role)
        if self.role == "caller":
            self.session.end("rtp-timeout")
        else:
            self.hangup("rtp-timeout")
            self.dialog_terminated(None, "rtp-timeout")

    # DialogOwner
    def dialog_terminated(self, dialog, reason: str) -> None:
        if dialog is not None:
            self.dialog = None
        self.ended = True
        self.release()
        session = self.session
        if self.role == "caller":
            session.end("hangup" if reason == "bye" else reason)
            return
        ctl = session.control
        if ctl is not None and ctl.active:
            ctl.module.leg_ended(ctl, self, reason)

    def dialog_reoffer(self, dialog, body: bytes) -> bytes:
        ctl = self.session.control
        if ctl is not None and ctl.active:
            return ctl.module.reoffer(ctl, self, body)
        return answer_media(self.session.engine, self, body)

    def dialog_confirmed(self, dialog) -> None:
        if self.role == "caller":
            self.session.engine.setup_done(self.session.id)
        # A late offer (INVITE without SDP): the caller's answer came in the ACK.
        if self.negotiated is None and dialog.remote_sdp:
            try:
                neg, _ = sdp.negotiate(sdp.parse(dialog.remote_sdp))
            except SdpError as exc:
                log.info("session %s: the SDP answer in the ACK is unusable (%s): ending the call",
                         self.session.id, exc)
                self.session.end("sdp")
                return
            self.apply_media(neg)
            ctl = self.session.control
            if ctl is not None and ctl.active:
                ctl.module.media_ready(ctl, self)

    def dialog_request(self, dialog, msg) -> int:
        return 200


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
