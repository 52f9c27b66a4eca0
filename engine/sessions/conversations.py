"""Text conversations: SIP MESSAGE in and out as sessions (RFC 3428 pager mode).

Messages between the same two addresses (the sender's address-of-record and
the number texted) within `[messaging] idle_timeout` form one conversation:
one `Session` of kind "messaging", with the session id, module history,
transitions, policy checks and stamps every call has. The module in control
gets each message through `Module.on_text`; a module that takes the
conversation because of a message (a keyword outlet, a `<Redirect>`) gets that
message too.

Every message is a `TextMessage` with Twilio's statuses: inbound ones are
`received`; outbound ones go `queued` → `sending` → `sent` (202) or
`delivered` (200), else `undelivered` (the far end refused it, its SIP code
kept) or `failed` (never reached anyone: a timeout, no route, not allowed,
longer than its trunk takes: 413). A text to a trunk goes out by the trunk's
rule (`message_split`): with "segments", one MESSAGE per carrier segment, in
order, and it is sent or delivered only once every part was accepted;
registered users and SIP URIs get the whole body in one MESSAGE.
Each is stamped as two counted actions of the module in control:
`message_in` / `message_out` (1) and `message_in_segments` /
`message_out_segments` (its carrier segments), so plans price either.
"""
from __future__ import annotations

import collections
import logging
import re
import secrets
from dataclasses import dataclass, field

from engine.common import clock
from engine.common.segments import encoding, parts, segments
from engine.sessions.policy import Pending, when_decided
from engine.sessions.session import Session
from engine.sip import pager
from engine.sip.uri import parse_uri
from ext.sip_message import valid_text
from ext.sip_py import parse_name_addr

log = logging.getLogger("baton.messaging")

MAX_KEPT = 10000        # messages kept in memory for the API and tests
MAX_HANDOFFS = 8        # modules a single message may pass through
_E164 = re.compile(r"\+[0-9]{2,32}")


@dataclass
class TextMessage:
    sid: str
    session: str
    account: str
    direction: str              # inbound | outbound
    frm: str
    to: str
    body: str
    status: str                 # received | queued | sending | sent | delivered | undelivered | failed
    sip_code: int = 0
    module: str = ""
    error: str = ""
    segments: int = 1
    encoding: str = "GSM-7"
    created_wall_ns: int = field(default_factory=clock.wall_ns)
    updated_wall_ns: int = 0
    hops: int = 0               # modules it was handed to (bounded by MAX_HANDOFFS)

    def as_dict(self) -> dict:
        return {"sid": self.sid, "session": self.session, "account": self.account,
                "direction": self.direction, "from": self.frm, "to": self.to,
                "body": self.body, "status": self.status, "sip_code": self.sip_code,
                "module": self.module, "error": self.error, "segments": self.segments,
                "encoding": self.encoding, "created_wall_ns": self.created_wall_ns,
                "updated_wall_ns": self.updated_wall_ns}


@dataclass
class Peer:
    """Where a conversation's replies go: the sender's URI, and the flow its
    MESSAGE came on (the way back to a phone that never registered)."""
    uri: str
    flow: object = None


def new_sid() -> str:
    return "SM" + secrets.token_hex(16)


def aor(addr: str) -> str:
    """`sip:user@host` of a From/To value (the key of a conversation)."""
    na = parse_name_addr(addr)
    raw = na[1] if na else addr
    try:
        u = parse_uri(raw.strip().strip("<>"))
    except ValueError:
        return raw
    return f"{u.scheme}:{u.user}@{u.host}" if u.user else f"{u.scheme}:{u.host}"


class Messaging:
    """The engine's conversations and messages."""

    def __init__(self, engine):
        self.engine = engine
        self.settings = engine.cfg.messaging or {"idle_timeout": 14400.0, "max_bytes": 4096,
                                                 "auth": False}
        self.conversations: dict[tuple[str, str], Session] = {}
        self.messages: collections.OrderedDict[str, TextMessage] = collections.OrderedDict()
        self.counts = collections.Counter()     # (direction, status) for /metrics and tests
        # Called with each text when it is kept and at each change of its status
        # (the gRPC Messages.Watch streams, the REST status callbacks).
        self.watchers: list = []
        self.store = None       # DATA/messages.db (message_store.py), from open_store

    # -- the record ---------------------------------------------------------------
    def open_store(self, path: str) -> None:
        """Keep every text in `path` too, and take back the newest of earlier runs."""
        from engine.sessions.message_store import MessageStore

        self.store = MessageStore(path, self.engine.loop)
        for row in self.store.newest(MAX_KEPT):
            m = TextMessage(**row)
            self.messages[m.sid] = m
        if self.store.ended:
            log.info("%d texts of an earlier run were never sent: failed", self.store.ended)

    def close_store(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def get(self, sid: str) -> TextMessage | None:
        """Text `sid`: one of the newest MAX_KEPT, else from the record."""
        m = self.messages.get(sid)
        if m is None and self.store is not None:
            row = self.store.get(sid)
            m = TextMessage(**row) if row is not None else None
        return m

    # -- receiving ----------------------------------------------------------------
    def on_text(self, msg, st) -> None:
        """A MESSAGE outside any dialog: answer it, and hand it to its conversation."""
        engine = self.engine
        core = engine.sip
        core.overload.admitted()        # new work past the overload check, as a call's setup
        if self.settings.get("auth"):
            if core.registrar is None or core.registrar.authenticate(core, msg, st) is None:
                if core.registrar is None:
                    core.respond(st, msg, 403, reason="No Users To Authenticate")
                return
        text = pager.received_text(msg, int(self.settings["max_bytes"]))
        if isinstance(text, pager.Answer):
            self._refused(msg, text)
            core.respond(st, msg, text.status, reason=text.reason, headers=list(text.headers))
            return
        try:
            number = parse_uri(msg.uri).user or ""
        except ValueError:
            number = ""
        route = engine.cfg.messaging_numbers.get(number)
        if route is None:
            self.counts["inbound", "not-found"] += 1
            core.respond(st, msg, 404)
            return
        from_hdr = valid_text(msg.headers["from"][0])
        key = (aor(from_hdr), number)
        session = self.conversations.get(key)
        if session is not None and session.ended:
            session = None
        if session is None:
            session = self._start(route, number, from_hdr, valid_text(msg.headers["to"][0]), key)
            if session.pending is None:
                self._first_text(session, st, msg, from_hdr, number, text)
            else:       # the first module's grant waits for the cluster (docs/cluster.md)
                self._settled(session, lambda: self._first_text(session, st, msg, from_hdr,
                                                                number, text))
        elif session.pending is None:
            self._next_text(session, st, msg, from_hdr, number, text)
        else:           # the last text's transition still waits for the cluster
            self._settled(session, lambda: self._next_text(session, st, msg, from_hdr, number,
                                                           text))

    def _settled(self, session: Session, fn) -> None:
        """`fn()` once `session` is out of every transition waiting for the cluster's
        PostgreSQL (policy.Pending), or has ended. The session's own callback runs first."""
        p = session.pending
        if p is None or session.ended:
            fn()
        else:
            p.then(lambda _d: self._settled(session, fn))

    def _first_text(self, session: Session, st, msg, from_hdr: str, number: str, text) -> None:
        if session.ended:
            # The policy refused the first module and no `denied` outlet took over.
            self.counts["inbound", "denied"] += 1
            self.engine.sip.respond(st, msg, 403, reason="Messaging Not Allowed")
            return
        self._accept(session, st, msg, from_hdr, number, text)

    def _next_text(self, session: Session, st, msg, from_hdr: str, number: str, text) -> None:
        if session.ended:
            self._first_text(session, st, msg, from_hdr, number, text)
            return
        decision = self.engine.policy.check(session, session.node, session.module)
        if decision.__class__ is Pending:
            decision.then(lambda d: self._checked(session, st, msg, from_hdr, number, text, d))
        else:
            self._checked(session, st, msg, from_hdr, number, text, decision)

    def _checked(self, session: Session, st, msg, from_hdr: str, number: str, text,
                 decision) -> None:
        if session.ended:
            self._first_text(session, st, msg, from_hdr, number, text)
            return
        if not decision.allow:
            denied = session.node.outlets.get("denied") if session.node else None
            if denied is None:
                self.counts["inbound", "denied"] += 1
                log.info("conversation %s: message refused: %s", session.id, decision.reason)
                self.engine.sip.respond(st, msg, 403, reason="Messaging Not Allowed")
                return
            session.transition(denied, "policy-denied")
            if session.pending is not None:
                self._settled(session, lambda: self._accept(session, st, msg, from_hdr, number,
                                                            text))
                return
        self._accept(session, st, msg, from_hdr, number, text)

    def _accept(self, session: Session, st, msg, from_hdr: str, number: str, text) -> None:
        session.peer = Peer(from_hdr, st.flow)
        # RFC 3428 7: 202, accepted for processing (a 200 would claim delivery).
        self.engine.sip.respond(st, msg, 202)
        self.receive(session, from_hdr, number, text)

    def on_text_in_dialog(self, dialog, msg):
        """A MESSAGE inside a call's dialog: a text on that call's session (RFC 3428 2
        lets MESSAGE travel in a dialog; it never creates or changes one). The Answer, or
        a future of it while the policy check waits for the cluster's PostgreSQL."""
        text = pager.received_text(msg, int(self.settings["max_bytes"]))
        if isinstance(text, pager.Answer):
            self._refused(msg, text)
            return text
        session = getattr(dialog, "session", None)
        if session is None or session.ended or session.module is None:
            return pager.Answer(481)
        if session.pending is None:
            decision = self.engine.policy.check(session, session.node, session.module)
            if decision.__class__ is not Pending:
                return self._in_dialog(session, msg, text, decision)
        answer = self.engine.loop.create_future()

        def check():        # once the session's transition waiting for the cluster is decided
            if session.ended or session.module is None:
                answer.set_result(pager.Answer(481))
                return
            when_decided(self.engine.policy.check(session, session.node, session.module),
                         lambda d: answer.set_result(self._in_dialog(session, msg, text, d)))

        if session.pending is None:
            decision.then(lambda d: answer.set_result(self._in_dialog(session, msg, text, d)))
        else:
            self._settled(session, check)
        return answer

    def _in_dialog(self, session: Session, msg, text, decision) -> pager.Answer:
        if session.ended:
            return pager.Answer(481)
        if not decision.allow:
            return pager.Answer(403, reason="Messaging Not Allowed")
        self.receive(session, valid_text(msg.get("from", "")), session.number, text)
        return pager.Answer(202)

    def _refused(self, msg, answer: pager.Answer) -> None:
        self.counts["inbound", f"refused-{answer.status}"] += 1
        log.info("MESSAGE refused with %d %s", answer.status, answer.reason or "",
                 extra={"event": "message.refused"})

    def _start(self, route, number: str, from_hdr: str, to_hdr: str, key) -> Session:
        engine = self.engine
        app = engine.cfg.apps.get(route.target) if route.kind == "app" else None
        session = Session(engine, route.account, number, from_hdr, to_hdr, app=app,
                          kind="messaging")
        session.last_text = engine.loop.time()
        engine.session_added(session)
        self.conversations[key] = session
        session.start(engine.node_for(route))
        if not session.ended:
            engine.loop.call_later(float(self.settings["idle_timeout"]), self._idle, session)
        return session

    def _idle(self, session: Session) -> None:
        if session.ended:
            return
        timeout = float(self.settings["idle_timeout"])
        left = session.last_text + timeout - self.engine.loop.time()
        if left > 0:
            self.engine.loop.call_later(left, self._idle, session)
            return
        session.end("idle")

    def ended(self, session: Session) -> None:
        for key, s in list(self.conversations.items()):
            if s is session:
                del self.conversations[key]

    def receive(self, session: Session, frm: str, to: str, body: str) -> TextMessage:
        """Record an inbound text on `session`, stamp it, give it to the module in control."""
        m = self._keep(TextMessage(new_sid(), session.id, session.account, "inbound",
                                   _party(frm), to, body, "received",
                                   segments=segments(body), encoding=encoding(body)))
        session.last_text = self.engine.loop.time()
        self._stamp(session, m, "in")
        self._deliver(session, m)
        return m

    def handoff(self, session: Session, m: TextMessage) -> None:
        """`m` moved the conversation to another module (after the old one's
        asynchronous work): the module now in control gets it."""
        self._deliver(session, m)

    def _deliver(self, session: Session, m: TextMessage) -> None:
        seen = None
        while m.hops < MAX_HANDOFFS:
            m.hops += 1
            ctl = session.control
            if session.ended or ctl is None or not ctl.active or ctl is seen:
                return
            if not getattr(ctl.module, "texting", False):
                log.info("session %s: module %s does not take texts", session.id, ctl.module.code)
                return
            seen = ctl
            try:
                ctl.module.on_text(ctl, m)
            except Exception:
                log.exception("session %s: module %s failed on a text", session.id, ctl.module.code)
                return

    # -- sending ------------------------------------------------------------------
    def send(self, session: Session, body: str, *, to: str | None = None,
             frm: str | None = None, trunk: str | None = None, on_status=None) -> TextMessage:
        """Queue a text from `session`'s module: to `to` (default: the conversation's
        other party) from `frm` (default: the session's number). Returns the
        TextMessage at once; its status moves as the MESSAGE goes; `on_status(m)`
        is called at its final status."""
        engine = self.engine
        party = session.peer or _call_party(session)
        peer = party if to is None or (party and aor(to) == aor(party.uri)) else None
        target = to if to is not None else (peer.uri if peer else session.from_uri)
        number = frm or session.number
        if peer is None:
            trunk = self._trunk_for(session.account, target, trunk)
        m = self._keep(TextMessage(new_sid(), session.id, session.account, "outbound",
                                   number, _party(target), body, "queued",
                                   module=session.module.code if session.module else "",
                                   segments=segments(body), encoding=encoding(body)))
        # A text to anyone but who is talking to us passes the outbound check
        # calls pass: no toll fraud by text.
        if peer is not None or self._permitted(m, target, trunk, on_status):
            engine.loop.create_task(self._send(session, m, target, peer, trunk, on_status))
        return m

    def notify(self, account: str, to: str, body: str, *, module: str, frm: str = "",
               trunk: str | None = None, on_status=None) -> TextMessage:
        """A text of no conversation (a verification code, a notice to an agent): sent
        for `account` by `module` (metered as its `message_out`) from `frm` (default:
        the account id) to `to`, which the account's outbound rules must allow."""
        trunk = self._trunk_for(account, to, trunk)
        m = self._keep(TextMessage(new_sid(), "", account, "outbound", frm or account,
                                   _party(to), body, "queued", module=module,
                                   segments=segments(body), encoding=encoding(body)))
        if self._permitted(m, to, trunk, on_status):
            self.engine.loop.create_task(self._send(None, m, to, None, trunk, on_status))
        return m

    def _trunk_for(self, account: str, target: str, trunk: str | None) -> str | None:
        """`trunk`, else for a `+` number that is neither this engine's nor a user's the
        first of the account's `outbound.trunks` (as a call to it goes), else None."""
        if trunk:
            return trunk
        cfg = self.engine.cfg
        number = _bare(target)
        if not _E164.fullmatch(number) or number in cfg.numbers or number in cfg.users:
            return None
        perm = getattr(cfg.accounts.get(account), "outbound", None)
        order = perm.trunk_order if perm is not None else ()
        return order[0] if order else None

    def _permitted(self, m: TextMessage, target: str, trunk: str | None, on_status) -> bool:
        from engine.sessions import dialing

        try:
            dialing.permit(self.engine, m.account, _dialable(target), trunk, count=False)
        except dialing.OutboundDenied as exc:
            self._final(m, "failed", 403, str(exc), on_status)
            return False
        return True

    async def _send(self, session, m, target, peer, trunk, on_status) -> None:
        engine = self.engine
        core = engine.sip
        own = f"{engine.cfg.advertise or engine.cfg.sip_host}"
        from_uri = f"<sip:{m.frm}@{own}>"
        kw: dict = {}
        try:
            uri, kw = self._route(target, peer, trunk)
        except ValueError as exc:
            self._final(m, "failed", 404 if "registered" in str(exc) else 416, str(exc), on_status)
            return
        bodies = [m.body]
        if trunk:
            t = engine.cfg.trunks[trunk]
            try:
                bodies = parts(m.body, t.message_split, t.message_max)
            except ValueError as exc:
                self._final(m, "failed", 413, f"trunk {trunk}: {exc}", on_status)
                return
        self._status(m, "sending")
        self._stamp(session, m, "out")
        # A number sent through a trunk is addressed as the Request-URI names it.
        to_uri = f"<{uri}>" if trunk else f"<{_bare(target)}>"
        # One MESSAGE per part, each sent once the one before it was accepted: the
        # parts arrive in order, and the first refusal stops the rest.
        delivered, reason = True, ""
        for i, body in enumerate(bodies, 1):
            out = pager.OutgoingMessage(core, uri, from_uri=from_uri, body=body,
                                        to_uri=to_uri, **kw)
            status = await out.send()
            if not 200 <= status < 300:
                reason = out.reason if len(bodies) == 1 else \
                    f"part {i} of {len(bodies)}: {status} {out.reason}".rstrip()
                break
            delivered = delivered and status == 200
        if 200 <= status < 300:
            self._final(m, "delivered" if delivered else "sent", status, "", on_status)
        elif status in (408, 503, 416):
            self._final(m, "failed", status, reason, on_status)
        else:
            self._final(m, "undelivered", status, reason, on_status)

    def _route(self, target: str, peer, trunk: str | None) -> tuple[str, dict]:
        """(Request-URI, OutgoingMessage keywords) of a text to `target`."""
        engine = self.engine
        if trunk:
            from engine.sessions import dialing

            # The number as a call through this trunk dials it (its prefix for the "+").
            number = dialing.normalize(_dialable(target)) or ""
            uri, dest, transport, creds, _ = dialing.trunk_route(engine.cfg, trunk, number)
            return uri, {"destination": dest, "transport": transport,
                         "credentials": creds}
        bare = _bare(target)
        if peer is not None and peer.flow is not None:
            registrar = engine.sip.registrar
            found = registrar.lookup(bare) if registrar is not None else []
            if not found:
                return bare, {"flow": peer.flow}
        try:
            u = parse_uri(bare)
        except ValueError:
            if engine.sip.registrar is None:
                raise ValueError(f"{target!r} is not a SIP URI") from None
            u = None
        own = {engine.cfg.advertise.lower(), engine.cfg.sip_host.lower()}
        if u is None or (u.host or "").lower().strip("[]") in own:
            # One of this engine's users: where they registered (RFC 3261 10).
            registrar = engine.sip.registrar
            aor_uri = bare if u is not None else f"sip:{target}@{engine.cfg.sip_host}"
            found = registrar.lookup(aor_uri) if registrar is not None else []
            if not found:
                raise ValueError(f"{target} is not registered")
            b = max(found, key=lambda b: b.expires_at)
            return b.contact, {"destination": b.source, "transport": b.transport}
        return bare, {}

    def _keep(self, m: TextMessage) -> TextMessage:
        m.updated_wall_ns = m.created_wall_ns
        self.messages[m.sid] = m
        while len(self.messages) > MAX_KEPT:
            self.messages.popitem(last=False)
        s = self.engine.sessions.get(m.session)
        if s is not None:
            s.messages.append(m.sid)
        self.counts[m.direction, m.status] += 1
        if self.store is not None:
            self.store.record(m)
        self._notify(m)
        return m

    def _status(self, m: TextMessage, status: str, code: int = 0, error: str = "") -> None:
        m.status = status
        m.sip_code = code or m.sip_code
        m.error = error
        m.updated_wall_ns = clock.wall_ns()
        self.counts[m.direction, status] += 1
        if self.store is not None:
            self.store.record(m)
        self._notify(m)

    def _final(self, m, status, code, error, on_status) -> None:
        self._status(m, status, code, error)
        if status in ("failed", "undelivered"):
            log.info("text %s to %s %s: %s %s", m.sid, m.to, status, code, error,
                     extra={"event": "message." + status})
        if on_status is not None:
            try:
                on_status(m)
            except Exception:
                log.exception("status callback of %s failed", m.sid)

    def _notify(self, m: TextMessage) -> None:
        for watch in list(self.watchers):
            try:
                watch(m)
            except Exception:
                log.exception("a watcher of text %s failed", m.sid)
        engine = self.engine
        s = engine.sessions.get(m.session)
        if s is not None and engine.listeners:
            engine.notify(s, "message", m.as_dict())

    def _stamp(self, session: Session | None, m: TextMessage, way: str) -> None:
        stamper = self.engine.stamper
        if session is None:         # a text of no session (notify)
            stamper.record_action(m.account, m.module, f"message_{way}", 1)
            stamper.record_action(m.account, m.module, f"message_{way}_segments", m.segments)
            return
        module = session.module.code if session.module is not None else ""
        m.module = module
        stamper.action(session, module, f"message_{way}", 1)
        stamper.action(session, module, f"message_{way}_segments", m.segments)


def _call_party(session: Session) -> Peer | None:
    """A call's other party, the default recipient of a text the call's module
    sends (`<Message>` in a voice document): the caller of an inbound call, the
    called party of an outbound one, reached where they registered or else on
    the flow their dialog runs on."""
    if session.kind == "messaging" or not session.legs:
        return None
    dialog = session.caller.dialog
    uri = session.from_uri if session.direction == "inbound" else session.to_uri
    return Peer(uri, dialog.flow if dialog is not None else None)


def _bare(addr: str) -> str:
    na = parse_name_addr(addr)
    return (na[1] if na else addr).strip().strip("<>")


def _party(addr: str) -> str:
    """Twilio's From/To: a number when the user part is one, else the SIP URI."""
    bare = _bare(addr)
    try:
        u = parse_uri(bare)
    except ValueError:
        return bare
    user = u.user or ""
    if user and user.lstrip("+").isdigit():
        return user
    return f"{u.scheme}:{user}@{u.host}" if user else bare


def _dialable(target: str) -> str:
    bare = _bare(target)
    return bare if bare.startswith(("sip:", "sips:", "tel:")) or \
        bare.lstrip("+").isdigit() else f"sip:{bare}"


__all__ = ["Messaging", "TextMessage", "Peer", "aor", "new_sid"]
