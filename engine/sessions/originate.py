"""Placing an outbound call for an API caller: gRPC `Sessions.Originate` and the
REST `POST Calls.json` both run this.

`Origination(engine, ...)` makes the session at once (its id is the CallSid
the REST API answers before the far end does); `await run()` dials, waits for
the outcome and, when answered, starts the session in its app or module.
`route` (optional) is where the INVITE goes when not to the URI's host: a
trunk's proxy or a registered user's binding. `progress` (optional) hears each step: "ringing", "answered", or the failure
outcome ("busy", "no-answer", "failed", "canceled").
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from engine.common import clock
from engine.media.ports import PortsExhausted
from engine.sessions import apps as apps_mod
from engine.sessions.apps import Node
from engine.sessions.session import Leg, Session
from engine.sip import sdp
from engine.sip.errors import SdpError
from engine.sip.uac import OutgoingCall, UacOwner

log = logging.getLogger("baton.originate")

__all__ = ["Origination", "PortsExhausted", "BUSY", "NO_ANSWER", "outcome_of"]

BUSY = (486, 600, 603)
NO_ANSWER = (408, 480, 487)


def outcome_of(status: int) -> str:
    """The outcome of a final non-2xx answer: busy, no-answer or failed."""
    return "busy" if status in BUSY else "no-answer" if status in NO_ANSWER else "failed"


class Origination(UacOwner):
    """One outbound call: the session exists from the start, live once answered."""

    def __init__(self, engine, account: str, to: str, user: str, from_uri: str, target: str,
                 app, params: dict, ring: float, grant,
                 progress: Callable[[str], None] | None = None, route: dict | None = None):
        self.engine = engine
        # OutgoingCall's destination, transport and credentials: a trunk's proxy, or
        # where a registered user's binding came from.
        self.route = route or {}
        self.to = to
        self.target = target
        self.app = app
        self.params = params
        self.ring = ring
        self.grant = grant
        self.progress = progress
        self.session = Session(engine, account, user, from_uri, f"<{to}>",
                               direction="outbound", app=app)
        self.call: OutgoingCall | None = None
        self.canceled = False
        self.done: asyncio.Future = engine.loop.create_future()

    # -- UacOwner ---------------------------------------------------------------------
    def call_progress(self, call, status, msg) -> None:
        if status in (180, 183) and self.progress is not None:
            self.progress("ringing")

    def call_answered(self, call, msg) -> None:
        if not self.done.done():
            self.done.set_result((200, msg))

    def call_failed(self, call, status, msg) -> None:
        if not self.done.done():
            self.done.set_result((status, msg))

    def cancel(self) -> bool:
        """Give up a call not answered yet (REST `Status=canceled`); False once answered."""
        if self.done.done() and self.done.result()[0] == 200:
            return False
        self.canceled = True
        if self.call is not None:
            self.call.cancel()
        elif not self.done.done():
            self.done.set_result((487, None))
        return True

    # -- placing it -------------------------------------------------------------------
    async def run(self) -> tuple[str, int]:
        """Dial and wait: ("answered", 200) with the session started, else
        (outcome, SIP status). PortsExhausted when no RTP ports are left."""
        engine, session = self.engine, self.session
        leg = Leg(session, role="caller")
        leg.outbound = self.grant
        try:
            leg.ports = engine.ports.allocate()
        except PortsExhausted:
            leg.release()
            raise
        leg.sdp_version = 1
        offer = sdp.build(engine.media_address, leg.ports.port, None, leg.sdp_id, 1)
        call = OutgoingCall(engine.sip, self.to, from_uri=session.from_uri, sdp=offer, owner=self,
                            **self.route)
        leg.call = call
        if self.canceled:
            leg.release()
            return self._failed("canceled", 487)
        self.call = call
        await call.start()
        try:
            status, msg = await asyncio.wait_for(asyncio.shield(self.done), self.ring)
        except asyncio.TimeoutError:
            call.cancel()
            try:
                status, msg = await asyncio.wait_for(asyncio.shield(self.done), 5)
            except asyncio.TimeoutError:
                status, msg = 408, None
            if status == 200:
                # The answer crossed our CANCEL: the call was ended with BYE already.
                status = 487
        except asyncio.CancelledError:
            call.hangup()
            leg.release()
            raise
        if status != 200:
            leg.ended = True
            leg.release()
            return self._failed("canceled" if self.canceled else outcome_of(status), status)
        try:
            neg, _ = sdp.negotiate(sdp.parse(msg.body))
        except SdpError as exc:
            log.info("originate to %s: unusable SDP answer: %s", self.to, exc)
            call.hangup()
            leg.release()
            return self._failed("failed", 488)
        leg.attach_dialog(call.dialog)
        leg.answered = True
        leg.apply_media(neg)
        session.started_mono, session.started_wall = time.monotonic_ns(), clock.wall_ns()
        engine.session_added(session)
        if self.progress is not None:
            self.progress("answered")
        if self.app is not None:
            node = apps_mod.resolve(self.app, self.app.start, self.params)
        else:
            node = Node(name=f"originate:{self.target}", module=self.target, params=self.params)
        session.start(node)
        return "answered", 200

    def _failed(self, outcome: str, status: int) -> tuple[str, int]:
        if self.progress is not None:
            self.progress(outcome)
        return outcome, status
