"""`baton.v1.Sessions`: originate calls, move sessions, read them and watch them.

Every call is authenticated with an account API token (`authorization:
Bearer TOKEN`) and sees only that account's sessions: another account's
session is NOT_FOUND, exactly as one that never existed. A platform
operator's token (`[engine] operator_tokens`) sees and acts on every
account's sessions; `Originate` then needs the account it bills.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator

import grpc

from engine.sessions import apps as apps_mod
from engine.sessions.dialing import operator_params
from engine.sessions.originate import Origination, PortsExhausted, Undialable, destination
from engine.sip.uri import from_address, parse_uri

from proto import pb
from control.auth import AuthError, Authority, _bearer, in_scope
from control.forward import Forwarder
from control.metering import token_digest
from engine.common import clock

log = logging.getLogger("baton.control.sessions")

sp = pb.sessions_pb2
cp = pb.common_pb2

WATCH_KINDS = ("transition", "ended", "offered", "taken", "declined", "control-lost",
               # the notifications also sent as webhooks (engine/common/webhooks.py)
               "session.started", "session.ended", "balance.low", "cap.reached", "invoice.ready",
               # the service modules' events (docs/services/)
               "phone_tree.menu", "survey.result", "verify.result", "calling_card.step",
               # the policy's warning before a prepaid limit (docs/billing.md)
               "limit-warning")
WATCH_QUEUE = 10_000


async def _caller_params(context, params: dict) -> dict:
    """Params an API caller passes on: never the operator's own (a trunk, a
    sounds directory, timeouts), refused with PERMISSION_DENIED naming them."""
    bad = operator_params(params)
    if bad:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"params: operator-only parameters: {', '.join(bad)}")
    return params


def session_info(session) -> cp.SessionInfo:
    """A live or finished `Session` as a SessionInfo message."""
    live = not session.ended
    info = cp.SessionInfo(
        session_id=session.id, account=session.account, number=session.number or "",
        from_uri=session.from_uri or "", to_uri=session.to_uri or "",
        direction=session.direction, live=live,
        module=session.module.code if live and session.module is not None else "",
        level=(session.level or "") if live else "",
        node=session.node.name if live and session.node is not None else "",
        started_wall_ns=session.started_wall, ended_wall_ns=session.ended_wall or 0,
        end_reason=session.end_reason or "", params=pb.to_struct(session.params),
        app=session.app.name if session.app is not None else "")
    return info


def span_message(span) -> cp.ControlSpan:
    end_mono = span.end_mono
    return cp.ControlSpan(module=span.module, level=span.level or "", node=span.node or "",
                          reason=span.reason or "", start_wall_ns=span.start_wall,
                          end_wall_ns=span.end_wall or 0, end_reason=span.end_reason or "",
                          duration_ns=(end_mono - span.start_mono) if end_mono else 0)


def _row_info(row: dict) -> cp.SessionInfo:
    return cp.SessionInfo(session_id=row["id"], account=row["account"],
                          number=row.get("number") or "", from_uri=row.get("from_uri") or "",
                          to_uri=row.get("to_uri") or "", direction=row.get("direction") or "",
                          live=False, started_wall_ns=row.get("started_wall_ns") or 0,
                          ended_wall_ns=row.get("ended_wall_ns") or 0,
                          end_reason=row.get("end_reason") or "", app=row.get("app") or "")


def _row_spans(row: dict) -> list[cp.ControlSpan]:
    out = []
    for h in row["history"]:
        end = h.get("end_mono_ns")
        out.append(cp.ControlSpan(
            module=h["module"], level=h.get("level") or "", node=h.get("node") or "",
            reason=h.get("reason") or "", start_wall_ns=h.get("start_wall_ns") or 0,
            end_wall_ns=h.get("end_wall_ns") or 0, end_reason=h.get("end_reason") or "",
            duration_ns=(end - h["start_mono_ns"]) if end else 0))
    return out


class SessionsService(pb.sessions_pb2_grpc.SessionsServicer):
    """The Sessions service of one engine."""

    def __init__(self, engine, authority: Authority, hub):
        self.engine = engine
        self.authority = authority
        self.hub = hub
        self.watchers: set[asyncio.Queue] = set()
        self.watch_counts: dict[str, int] = {}   # token digest -> open Watch streams
        self.forwarder = Forwarder(engine)       # sessions other nodes own (docs/cluster.md)

    # -- helpers ----------------------------------------------------------------------
    async def _account(self, context) -> str | None:
        """The caller's account, or None for an operator (every account)."""
        try:
            return self.authority.scope(context.invocation_metadata())
        except AuthError as exc:
            await context.abort(exc.code, exc.message)

    async def _find(self, context, account: str | None, sid: str, live_only: bool = False):
        """The account's session `sid` (live or recently ended); NOT_FOUND otherwise."""
        if not sid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id: required")
        s = self.engine.find_session(sid)
        if s is None or not in_scope(account, s.account):
            return None
        if live_only and s.ended:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"session {sid} has ended ({s.end_reason})")
        return s

    async def _journal(self, context, sid: str) -> dict | None:
        from engine.sessions import journal as store

        journal = self.engine.store
        busy = False
        if journal is not None:
            busy = bool(journal.pending) or not journal.queue.empty()
            journal.flush()
        loop = asyncio.get_running_loop()
        # Snapshots are written by the journal's thread: give a fresh one a moment.
        for attempt in range(10 if busy else 1):
            try:
                row = await loop.run_in_executor(None, store.get_session,
                                                 self.engine.cfg.data_dir, sid)
            except FileNotFoundError:  # no journal yet: the engine has not written one
                row = None
            except sqlite3.Error:
                # A journal that cannot be read is our fault, not an unknown session.
                log.exception("session %s: the session journal could not be read", sid)
                await context.abort(grpc.StatusCode.INTERNAL, "the session journal could not be read")
            if row is not None:
                return row
            if attempt < 9 and busy:
                await asyncio.sleep(0.05)
        return None

    async def _elsewhere(self, context, method: str, request):
        """Another node's answer about a session this node does not hold (the cluster's
        session directory), or NOT_FOUND."""
        reply = await self.forwarder.elsewhere(context, method, request, request.session_id)
        if reply is None:
            await self._not_found(context, request.session_id)
        return reply

    @staticmethod
    async def _not_found(context, sid: str):
        await context.abort(grpc.StatusCode.NOT_FOUND, f"session_id: no session {sid!r} "
                                                       "in this account")

    # -- the RPCs -----------------------------------------------------------------------
    async def Get(self, request, context) -> cp.SessionInfo:
        account = await self._account(context)
        s = await self._find(context, account, request.session_id)
        if s is not None:
            return session_info(s)
        row = await self._journal(context, request.session_id)
        if row is None or not in_scope(account, row["account"]):
            return await self._elsewhere(context, "Get", request)
        return _row_info(row)

    async def History(self, request, context) -> sp.HistoryResponse:
        account = await self._account(context)
        s = await self._find(context, account, request.session_id)
        if s is not None:
            return sp.HistoryResponse(session_id=s.id, live=not s.ended,
                                      end_reason=s.end_reason or "",
                                      spans=[span_message(h) for h in s.history])
        row = await self._journal(context, request.session_id)
        if row is None or not in_scope(account, row["account"]):
            return await self._elsewhere(context, "History", request)
        return sp.HistoryResponse(session_id=row["id"], live=row["live"],
                                  end_reason=row.get("end_reason") or "", spans=_row_spans(row))

    async def Transition(self, request, context) -> sp.TransitionResponse:
        account = await self._account(context)
        target = request.target.strip()
        if not target:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "target: a module code, node, URI or 'hangup' is required")
        s = await self._find(context, account, request.session_id, live_only=True)
        if s is None:
            return await self._elsewhere(context, "Transition", request)
        params = await _caller_params(context, pb.from_struct(request.params))
        if apps_mod.resolve(s.app, target, params) is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"target: {target!r} is neither a node of the session's app nor "
                                "a module code or URI")
        self.engine.transition(s.id, target, params)
        return sp.TransitionResponse(session=session_info(s))

    async def Cost(self, request, context) -> sp.CostResponse:
        account = await self._account(context)
        s = await self._find(context, account, request.session_id)
        if s is None:
            row = await self._journal(context, request.session_id)
            if row is None or not in_scope(account, row["account"]):
                return await self._elsewhere(context, "Cost", request)
        from control.billing import session_cost

        # The accountant prices sessions (control/billing.py); money stays integral.
        cost = await session_cost(self.engine, context, request.session_id,
                                  s if s is not None and not s.ended else None)
        return sp.CostResponse(session_id=request.session_id, currency=cost.cost.currency,
                               amount_micros=cost.cost.micros, amount_decimal=cost.cost.amount,
                               live=cost.live)

    async def Originate(self, request, context) -> sp.OriginateResponse:
        account = await self._account(context)
        engine = self.engine
        abort = context.abort
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if account is None:
            # An operator: the call is billed to the account it names.
            account = request.account.strip()
            if not account:
                await abort(bad, "account: an operator token must name the account the call "
                                 "is billed to")
            if account not in engine.cfg.accounts:
                await abort(bad, f"account: no account {account!r}")
        if request.account and request.account != account:
            await abort(grpc.StatusCode.PERMISSION_DENIED,
                        f"account: the token belongs to account {account!r}")
        to = request.to.strip()
        if not to:
            await abort(bad, "to: a destination is required")
        target = request.target.strip()
        if not target:
            await abort(bad, "target: an app name or module code is required")
        app = engine.cfg.apps.get(target)
        if app is None:
            if "." not in target:
                await abort(bad, f"target: {target!r} is neither an app nor a module code")
            if engine.registry.resolve(target) is None:
                await abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"target: module {target!r} is not available now")
        ring = request.ring_timeout or 30.0
        if not 0 < ring <= 300:
            await abort(bad, "ring_timeout: seconds between 0 and 300")
        from_uri = getattr(request, "from").strip()
        if from_uri:
            try:
                from_uri = from_address(from_uri)
            except ValueError as exc:
                await abort(bad, f"from: {from_uri[:60]!r} is not a SIP URI ({exc})")
        else:
            from engine.common.net import format_hostport

            from_uri = f"<sip:{account}@{format_hostport(engine.cfg.advertise, engine.sip_port)}>"
        params = await _caller_params(context, pb.from_struct(request.params))
        try:
            to_uri, route, grant = destination(engine, account, to, request.trunk.strip())
        except Undialable as exc:
            code = {"denied": grpc.StatusCode.PERMISSION_DENIED,
                    "unregistered": grpc.StatusCode.FAILED_PRECONDITION}.get(exc.kind, bad)
            await abort(code, f"{exc.field}: {exc.message}")
        try:
            user = parse_uri(to_uri).user or ""
        except ValueError:
            user = ""
        return await self._originate(grant, context, account, to_uri, user, target, app,
                                     from_uri, params, ring, route)

    async def _originate(self, grant, context, account, to, user, target, app, from_uri, params,
                         ring, route=None) -> sp.OriginateResponse:
        o = Origination(self.engine, account, to, user, from_uri, target, app, params, ring, grant,
                        route=route)
        try:
            outcome, status = await o.run()
        except PortsExhausted:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no RTP ports left")
        if outcome != "answered":
            return sp.OriginateResponse(outcome=outcome, sip_status=status)
        return sp.OriginateResponse(outcome="answered", sip_status=200,
                                    session=session_info(o.session))

    async def List(self, request, context) -> sp.ListResponse:
        account = await self._account(context)
        limit = request.limit or 1000
        if not 0 < limit <= 10_000:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "limit: between 1 and 10000 (0: the default, 1000)")
        if account is None and request.account:
            account = request.account       # an operator looking at one account
            if account not in self.engine.cfg.accounts:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"account: no account {account!r}")
        elif request.account and request.account != account:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"account: the token belongs to account {account!r}")
        mine = [s for s in self.engine.sessions.values()
                if in_scope(account, s.account) and not s.ended]
        mine.sort(key=lambda s: s.started_mono)
        infos = []
        for s in mine[:limit]:
            info = session_info(s)
            info.ClearField("params")
            infos.append(info)
        started = self.engine.stamper.started_by_account
        return sp.ListResponse(sessions=infos, live=len(mine), now_wall_ns=clock.wall_ns(),
                               started_total=sum(started.values()) if account is None
                               else started[account])

    async def Watch(self, request, context) -> AsyncIterator[sp.SessionEvent]:
        account = await self._account(context)
        if account is None and request.account:
            account = request.account       # an operator watching one account
            if account not in self.engine.cfg.accounts:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"account: no account {account!r}")
        elif request.account and request.account != account:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"account: the token belongs to account {account!r}")
        kinds = set(request.kinds)
        unknown = kinds - set(WATCH_KINDS)
        if unknown:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"kinds: unknown {', '.join(sorted(unknown))} "
                                f"(known: {', '.join(WATCH_KINDS)})")
        ids = set(request.session_ids)
        # Each stream is a listener on every session event: a cap per token.
        token = token_digest(_bearer(context.invocation_metadata()))
        limit = self.engine.cfg.guard.watch_streams_per_token
        if limit and self.watch_counts.get(token, 0) >= limit:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"at most {limit} Watch streams per token "
                                "(security.watch_streams_per_token)")
        self.watch_counts[token] = self.watch_counts.get(token, 0) + 1
        queue: asyncio.Queue = asyncio.Queue(WATCH_QUEUE)
        overflow = []

        def listener(session, event: str, detail: dict) -> None:
            if not in_scope(account, session.account) or (ids and session.id not in ids) or \
                    (kinds and event not in kinds):
                return
            module = session.module.code if session.module is not None and not session.ended \
                else ""
            try:
                queue.put_nowait(sp.SessionEvent(
                    session_id=session.id, account=session.account, kind=event, module=module,
                    detail=pb.to_struct(detail), time_ns=time.time_ns()))
            except asyncio.QueueFull:
                overflow.append(1)

        engine = self.engine
        engine.listeners.append(listener)
        self.watchers.add(queue)
        try:
            while True:
                ev = await queue.get()
                if ev is None:
                    return
                if overflow:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"the watcher fell more than {WATCH_QUEUE} events behind")
                yield ev
        finally:
            self.watchers.discard(queue)
            if listener in engine.listeners:
                engine.listeners.remove(listener)
            n = self.watch_counts.pop(token, 1) - 1
            if n > 0:
                self.watch_counts[token] = n

    def close(self) -> None:
        """End every Watch stream (the engine is stopping)."""
        for q in list(self.watchers):
            try:
                q.put_nowait(None)
            except asyncio.QueueFull:
                pass
