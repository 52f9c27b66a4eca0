"""`baton.v1.Messages`: send a text, read one, list them, watch their statuses.

Authenticated like `Sessions` (an account API token as `authorization: Bearer
TOKEN`); an account sees only its own texts, another account's are NOT_FOUND
exactly as ones that never existed. A platform operator's token reads every
account's; `Send` needs the account it acts for (`x-baton-account: ID`).

`send_text` is the one way an API caller texts: it checks the request (each
refusal names its field), passes the account's outbound rules as a dial does
(PERMISSION_DENIED) and hands the text to the engine's messaging, metered as
the `baton.messages` module's `message_out`. The REST API's `POST
Messages.json` (control/rest_messages.py) runs it too.
"""
from __future__ import annotations

import asyncio
import re

import grpc

from engine.common.segments import parts
from engine.sessions.dialing import OutboundDenied, permit
from engine.sip.uri import check_uri_text, sip_uri
from proto import pb
from control.auth import AuthError, Authority

mp = pb.messages_pb2

MODULE = "baton.messages"       # the module an API caller's texts are metered as
MAX_RESULTS = 1000
MAX_ADDRESS = 256
MAX_SID = 64
WATCH_QUEUE = 1000              # status changes a slow watcher may fall behind by
FINAL = ("sent", "delivered", "undelivered", "failed", "received")
STATUSES = ("received", "queued", "sending", "sent", "delivered", "undelivered", "failed")
_USER = re.compile(r"\+?[A-Za-z0-9._~-]{1,64}")
_E164 = re.compile(r"\+[0-9]{2,32}")


class TextRefused(Exception):
    """A text an API caller may not send: the gRPC code, the field, why."""

    def __init__(self, code: grpc.StatusCode, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.code = code
        self.field = field
        self.message = message


def _bad(field: str, message: str) -> TextRefused:
    return TextRefused(grpc.StatusCode.INVALID_ARGUMENT, field, message)


def send_text(engine, account: str, to: str, frm: str, body: str, trunk: str = "",
              on_status=None):
    """Queue a text from `account` to `to` (a SIP URI, a user registered here, or a
    number through `trunk`; a `+` number goes through the account's first trunk when
    no trunk is named); the TextMessage at once, TextRefused otherwise (a body longer
    than the trunk's `message_max` is refused naming `body`)."""
    cfg = engine.cfg
    to, frm, trunk = to.strip(), frm.strip(), trunk.strip()
    if not body:
        raise _bad("body", "a text is required")
    limit = int((cfg.messaging or {}).get("max_bytes", 4096))
    if len(body.encode("utf-8", "surrogatepass")) > limit:
        raise _bad("body", f"longer than {limit} bytes")
    if not to:
        raise _bad("to", "required")
    if len(to) > MAX_ADDRESS:
        raise _bad("to", f"longer than {MAX_ADDRESS} characters")
    if not trunk and _E164.fullmatch(to) and to not in cfg.users and to not in cfg.numbers:
        # A phone number goes out through the account's first trunk, as a call does.
        perm = getattr(cfg.accounts.get(account), "outbound", None)
        order = perm.trunk_order if perm is not None else ()
        trunk = order[0] if order else ""
    if trunk:
        if trunk not in cfg.trunks:
            raise _bad("trunk", f"no trunk {trunk[:40]!r}")
        if not _USER.fullmatch(to):
            raise _bad("to", f"{to[:60]!r} is not a number to send through a trunk")
        t = cfg.trunks[trunk]
        try:
            parts(body, t.message_split, t.message_max)
        except ValueError as exc:
            raise _bad("body", f"trunk {trunk}: {exc}") from None
    elif to.lower().startswith(("sip:", "sips:")):
        try:
            sip_uri(to, "to")
        except ValueError as exc:
            raise _bad("to", f"{to[:60]!r} is not a SIP URI ({exc})") from None
    elif _USER.fullmatch(to):
        # A user registered here, by name (RFC 3261 10: found in the registrar).
        to = f"sip:{to}@{cfg.advertise or cfg.sip_host}"
    else:
        raise _bad("to", f"{to[:60]!r} is not a SIP URI or a user name")
    if frm:
        try:
            check_uri_text(frm, "from")
        except ValueError as exc:
            raise _bad("from", str(exc)) from None
        texting = cfg.messaging_numbers.get(frm)
        if frm not in cfg.accounts[account].numbers and \
                (texting is None or texting.account != account):
            raise _bad("from", f"{frm[:40]!r} is not a number of this account")
    try:
        permit(engine, account, to, trunk or None, count=False)
    except OutboundDenied as exc:
        raise TextRefused(grpc.StatusCode.PERMISSION_DENIED, "to", f"{to}: {exc}") from None
    return engine.messaging.notify(account, to, body, module=MODULE, frm=frm,
                                   trunk=trunk or None, on_status=on_status)


def message_pb(m) -> "mp.TextMessage":
    return mp.TextMessage(
        sid=m.sid, account=m.account, session_id=m.session, direction=m.direction,
        to=m.to, body=m.body, status=m.status, sip_code=m.sip_code, error=m.error,
        module=m.module, segments=m.segments, encoding=m.encoding,
        created_wall_ns=m.created_wall_ns, updated_wall_ns=m.updated_wall_ns,
        **{"from": m.frm})


def find(engine, account: str | None, sid: str):
    """The text `sid` when `account` (None: any) may see it, else None."""
    m = engine.messaging.get(sid)
    if m is None or (account is not None and m.account != account):
        return None
    return m


def listing(engine, account: str | None, *, to: str = "", frm: str = "", status: str = "",
            session: str = "", direction: str = "") -> list:
    """The texts `account` (None: every account) may see, newest first, filtered."""
    out = []
    for m in reversed(engine.messaging.messages.values()):
        if account is not None and m.account != account:
            continue
        if (to and m.to != to) or (frm and m.frm != frm) or (status and m.status != status) \
                or (session and m.session != session) or (direction and m.direction != direction):
            continue
        out.append(m)
    return out


class MessagesService(pb.messages_pb2_grpc.MessagesServicer):
    def __init__(self, engine, authority: Authority):
        self.engine = engine
        self.authority = authority

    async def _scope(self, context, one: bool = False) -> str | None:
        md = context.invocation_metadata()
        try:
            return self.authority.account(md) if one else self.authority.scope(md)
        except AuthError as exc:
            await context.abort(exc.code, exc.message)

    async def Send(self, request, context) -> "mp.TextMessage":
        account = await self._scope(context, one=True)
        try:
            m = send_text(self.engine, account, request.to, getattr(request, "from"),
                          request.body, request.trunk)
        except TextRefused as exc:
            await context.abort(exc.code, str(exc))
        return message_pb(m)

    async def Get(self, request, context) -> "mp.TextMessage":
        account = await self._scope(context)
        sid = request.sid.strip()
        if not sid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sid: required")
        if len(sid) > MAX_SID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"sid: longer than {MAX_SID} characters")
        m = find(self.engine, account, sid)
        if m is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"sid: no text {sid!r} in this account")
        return message_pb(m)

    async def List(self, request, context) -> "mp.MessagesListResponse":
        account = await self._scope(context)
        bad = grpc.StatusCode.INVALID_ARGUMENT
        limit = request.limit or 100
        if not 1 <= limit <= MAX_RESULTS:
            await context.abort(bad, f"limit: from 1 to {MAX_RESULTS}")
        if request.status and request.status not in STATUSES:
            await context.abort(bad, f"status: one of {', '.join(STATUSES)}")
        if request.direction not in ("", "inbound", "outbound"):
            await context.abort(bad, "direction: inbound or outbound")
        for name in ("to", "from", "session_id"):
            if len(getattr(request, name)) > MAX_ADDRESS:
                await context.abort(bad, f"{name}: longer than {MAX_ADDRESS} characters")
        found = listing(self.engine, account, to=request.to, frm=getattr(request, "from"),
                        status=request.status, session=request.session_id,
                        direction=request.direction)
        return mp.MessagesListResponse(messages=[message_pb(m) for m in found[:limit]])

    async def Watch(self, request, context):
        account = await self._scope(context)
        sid = request.sid.strip()
        if len(sid) > MAX_SID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"sid: longer than {MAX_SID} characters")
        queue: asyncio.Queue = asyncio.Queue(WATCH_QUEUE)

        def watch(m) -> None:
            if (account is None or m.account == account) and (not sid or m.sid == sid):
                try:
                    queue.put_nowait(message_pb(m))
                except asyncio.QueueFull:
                    pass        # a watcher that does not read loses changes, not the engine
        messaging = self.engine.messaging
        messaging.watchers.append(watch)
        try:
            if sid:
                m = find(self.engine, account, sid)
                if m is None:
                    await context.abort(grpc.StatusCode.NOT_FOUND,
                                        f"sid: no text {sid!r} in this account")
                # Its status now, then each change until the final one. The status is
                # read from the snapshot sent: the text may reach its final status while
                # the client reads it, and that change is then in the queue.
                now = message_pb(m)
                yield now
                if now.status in FINAL:
                    return
            while True:
                out = await queue.get()
                yield out
                if sid and out.status in FINAL:
                    return
        finally:
            messaging.watchers.remove(watch)


__all__ = ["MessagesService", "TextRefused", "send_text", "message_pb", "find", "listing",
           "MODULE"]
