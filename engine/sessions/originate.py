"""Placing an outbound call for an API caller: gRPC `Sessions.Originate` and the
REST `POST Calls.json` both run this.

`Origination(engine, ...)` makes the session at once (its id is the CallSid
the REST API answers before the far end does); `await run()` dials, waits for
the outcome and, when answered, starts the session in its app or module.
`route` (optional) is where the INVITE goes when not to the URI's host: a
trunk's proxy or a registered user's binding; `destination()` works out the
Request-URI, route and outbound grant of what the caller dialled, the same way for
both APIs. `progress` (optional) hears each step: "ringing", "answered", or the failure
outcome ("busy", "no-answer", "failed", "canceled").
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

from engine.common import clock
from engine.common.net import format_hostport
from engine.media.ports import PortsExhausted
from engine.sessions import apps as apps_mod
from engine.sessions.apps import Node
from engine.sessions.dialing import OutboundDenied, permit, trunk_route
from engine.sessions.session import Leg, Session
from engine.sip import sdp
from engine.sip.errors import SdpError
from engine.sip.uac import OutgoingCall, UacOwner

log = logging.getLogger("baton.originate")

__all__ = ["Origination", "PortsExhausted", "BUSY", "NO_ANSWER", "outcome_of", "destination",
           "Undialable"]

BUSY = (486, 600, 603)
NO_ANSWER = (408, 480, 487)
_NUMBER = re.compile(r"\+?[0-9*#]{1,32}")


class Undialable(Exception):
    """What the caller asked to dial cannot be dialled. `field` names the request's
    field; `kind` is "invalid" (malformed), "denied" (the account may not dial it) or
    "unregistered" (a user with no binding now); each API maps it to its own answer."""

    def __init__(self, field: str, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.field = field
        self.message = message
        self.kind = kind


def destination(engine, account: str, to: str, trunk: str = "",
                fields: tuple[str, str] = ("to", "trunk")) -> tuple[str, dict, object]:
    """(Request-URI, OutgoingCall route, outbound Grant) of dialling `to` for
    `account`, as `Dial` reaches it: a number of this engine, a registered user
    (`client:NAME`, a `[users]` name, or `sip:NAME@` this engine with a binding), a
    SIP URI, or a phone number through a trunk (`trunk`, else the first of the
    account's `outbound.trunks`), each checked by `dialing.permit`. Undialable when
    not. `fields` are the API's names of the two fields, for its errors."""
    from engine.sip.uri import parse_uri, sip_uri

    cfg = engine.cfg
    own = format_hostport(cfg.advertise, engine.sip_port)
    low = to.lower()
    if low.startswith("client:") or (to in cfg.users and to not in cfg.numbers):
        user = to.split(":", 1)[1] if low.startswith("client:") else to
        return _registered(engine, account, to, user, f"sip:{user}@{own}", fields[0])
    if low.startswith(("sip:", "sips:")):
        try:
            sip_uri(to, fields[0])
            u = parse_uri(to)
        except ValueError as exc:
            raise Undialable(fields[0], f"{to[:60]!r} is not a SIP URI ({exc})") from None
        host = (u.host or "").lower().strip("[]")
        if u.user and host in (cfg.advertise.lower(), cfg.sip_host.lower()) \
                and u.user not in cfg.numbers and _bindings(engine, to, u.user):
            return _registered(engine, account, to, u.user, to, fields[0])
        if trunk:
            raise Undialable(fields[1], "a SIP URI is dialled directly, not through a trunk")
        return to, {}, _permit(engine, account, to, to, None, fields[0])
    number = to[4:] if low.startswith("tel:") else to
    if not _NUMBER.fullmatch(number):
        raise Undialable(fields[0], f"{to[:60]!r} is not a phone number, client or SIP URI")
    if number in cfg.numbers:
        if trunk:
            raise Undialable(fields[1], f"{number} is a number of this engine, not dialled "
                                      "through a trunk")
        uri = f"sip:{number}@{own}"
        return uri, {}, _permit(engine, account, to, uri, None, fields[0])
    perm = getattr(cfg.accounts.get(account), "outbound", None)
    order = perm.trunk_order if perm is not None else ()
    name = trunk or (order[0] if order else "")
    if not name:
        raise Undialable(fields[0], f"{number} is not a number of this engine and account "
                               f"{account} may dial through no trunk", "denied")
    grant = _permit(engine, account, to, number, name, fields[0])
    try:
        uri, dest, transport, creds, _ = trunk_route(cfg, name, number)
    except ValueError as exc:
        if grant is not None:
            grant.release()
        raise Undialable(fields[0], f"{number}: {exc}") from None
    return uri, {"destination": dest, "transport": transport, "credentials": creds}, grant


def _bindings(engine, aor: str, user: str) -> list:
    reg = engine.sip.registrar
    if reg is None:
        return []
    return reg.bindings_of(user) or reg.lookup(aor)


def _registered(engine, account: str, to: str, user: str, aor: str, field: str):
    """A registered user of this engine: dialled where their newest binding is."""
    from engine.sip.uri import check_user_part

    try:
        check_user_part(user, field)
    except ValueError as exc:
        raise Undialable(field, str(exc)) from None
    found = _bindings(engine, aor, user)
    if not found:
        raise Undialable(field, f"{user[:60]!r} is not registered with this engine now",
                         "unregistered")
    b = max(found, key=lambda b: b.expires_at)
    grant = _permit(engine, account, to, aor, None, field)
    return b.contact, {"destination": b.source, "transport": b.transport}, grant


def _permit(engine, account: str, to: str, dialled: str, trunk: str | None, field: str):
    """`dialing.permit` (the toll-fraud checks every dial passes)."""
    try:
        return permit(engine, account, dialled, trunk)
    except OutboundDenied as exc:
        raise Undialable(field, f"{to[:60]}: {exc}", "denied") from None


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
