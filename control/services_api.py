"""`baton.v1.Survey` and `baton.v1.Verify`: the service modules' own APIs.

Authenticated like `Sessions` (an account API token as `authorization:
Bearer TOKEN`); an account sees only its own survey runs and verifications,
another account's are NOT_FOUND exactly as ones that never existed. A
platform operator's token (`[engine] operator_tokens`) reads every
account's; `Verify.Create` needs the account it acts for
(`x-baton-account: ID` metadata).
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from engine.modules.services import survey as survey_mod
from engine.sessions.dialing import OutboundDenied, permit
from engine.modules.services import verify as verify_mod
from engine.sip.uri import from_address, sip_uri

from proto import pb
from control.auth import AuthError, Authority

log = logging.getLogger("baton.control.services")

sv = pb.services_pb2
MAX_RESULTS = 1000
# Lengths of request strings: ids are "VE" + 24 hex digits, addresses as in
# `verify.VerifyService.create`; longer input is refused before any lookup.
MAX_ID = 64
MAX_ADDRESS = 256
MAX_NAME = 128


async def _account(authority: Authority, context) -> str:
    try:
        return authority.account(context.invocation_metadata())
    except AuthError as exc:
        await context.abort(exc.code, exc.message)


async def _scope(authority: Authority, context) -> str | None:
    """The caller's account, or None for an operator (every account)."""
    try:
        return authority.scope(context.invocation_metadata())
    except AuthError as exc:
        await context.abort(exc.code, exc.message)


class SurveyService(pb.services_pb2_grpc.SurveyServicer):
    def __init__(self, engine, authority: Authority):
        self.engine = engine
        self.authority = authority

    async def Results(self, request, context) -> sv.SurveyResultsResponse:
        account = await _scope(self.authority, context)
        bad = grpc.StatusCode.INVALID_ARGUMENT
        limit = request.limit or 100
        if not 1 <= limit <= MAX_RESULTS:
            await context.abort(bad, f"limit: from 1 to {MAX_RESULTS}")
        if request.since_wall_ns < 0:
            await context.abort(bad, "since_wall_ns: nanoseconds since the Unix epoch, not negative")
        if len(request.session_id) > 128:
            await context.abort(bad, "session_id: too long")
        if len(request.survey) > 64:
            await context.abort(bad, "survey: too long")
        store = survey_mod.store_for(self.engine)
        accounts = [account] if account is not None else list(self.engine.cfg.accounts)

        def read() -> list[dict]:
            runs = [r for a in accounts for r in store.results(
                a, request.session_id, request.survey, request.since_wall_ns, limit)]
            # Several accounts' runs merged: newest first, as for one.
            runs.sort(key=lambda r: (r["started_wall_ns"], r["run_id"]), reverse=True)
            return runs[:limit]
        # On the store's thread: after the writes of every run that ended before.
        runs = await asyncio.wrap_future(store.submit(read))
        out = sv.SurveyResultsResponse()
        for r in runs:
            out.runs.append(sv.SurveyRun(
                run_id=r["run_id"], session_id=r["session_id"], survey=r["survey"],
                node=r["node"], status=r["status"], caller=r["caller"], number=r["number"],
                started_wall_ns=r["started_wall_ns"], ended_wall_ns=r["ended_wall_ns"],
                answers=[sv.SurveyAnswer(question=a["question"], answer=a["answer"] or "",
                                         attempts=a["attempts"],
                                         answered_wall_ns=a["answered_wall_ns"],
                                         answered=a["answer"] is not None)
                         for a in r["answers"]]))
        return out


async def _check_lengths(context, request) -> None:
    """INVALID_ARGUMENT for a verification id or address longer than any real one."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if len(request.verification_id) > MAX_ID:
        await context.abort(bad, f"verification_id: longer than {MAX_ID} characters")
    if len(getattr(request, "to", "")) > MAX_ADDRESS:
        await context.abort(bad, f"to: longer than {MAX_ADDRESS} characters")


class _Background:
    """What `SessionsService._originate` needs of a gRPC context, for a call
    placed after the RPC that asked for it has returned."""

    async def abort(self, code, message):
        raise RuntimeError(message)


def verification_message(v: verify_mod.Verification, code: str = "") -> sv.Verification:
    return sv.Verification(
        verification_id=v.id, account=v.account, to=v.to, channel=v.channel, status=v.status,
        attempts=v.attempts, max_attempts=v.max_attempts, attempts_left=v.attempts_left,
        created_wall_ns=v.created_wall_ns, expires_wall_ns=v.expires_wall_ns,
        session_id=v.session_id, call_outcome=v.call_outcome, code=code, code_length=v.length)


class VerifyService(pb.services_pb2_grpc.VerifyServicer):
    def __init__(self, engine, authority: Authority, sessions):
        self.engine = engine
        self.authority = authority
        self.sessions = sessions
        self.calls: set[asyncio.Task] = set()

    @property
    def service(self) -> verify_mod.VerifyService:
        return verify_mod.service_for(self.engine)

    async def Create(self, request, context) -> sv.Verification:
        account = await _account(self.authority, context)
        engine = self.engine
        bad = grpc.StatusCode.INVALID_ARGUMENT
        channel = request.channel or "call"
        to = request.to.strip()
        app = None
        for name, value, most in (("to", request.to, MAX_ADDRESS),
                                  ("from", getattr(request, "from"), MAX_ADDRESS),
                                  ("app", request.app, MAX_NAME), ("channel", channel, MAX_NAME),
                                  ("code", request.code, verify_mod.MAX_LENGTH + 16)):
            if len(value) > most:
                await context.abort(bad, f"{name}: longer than {most} characters")
        if channel == "call" or channel in verify_mod.TEXT_CHANNELS:
            # The engine reaches out: a SIP address the account's outbound rules allow.
            try:
                uri = sip_uri(to, "to")
            except ValueError as exc:
                what = "call" if channel == "call" else "text"
                await context.abort(bad, f"to: {to[:60]!r} is not a SIP URI to {what} ({exc})")
            try:
                permit(engine, account, to, count=False)
            except OutboundDenied as exc:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"to: {to}: {exc}")
        if channel == "call":
            ring = request.ring_timeout or 30.0
            if not 0 < ring <= 300:
                await context.abort(bad, "ring_timeout: seconds between 0 and 300")
            from_uri = getattr(request, "from").strip()
            if from_uri:
                try:
                    from_uri = from_address(from_uri)
                except ValueError as exc:
                    await context.abort(bad, f"from: {from_uri[:60]!r} is not a SIP URI ({exc})")
            else:
                from engine.common.net import format_hostport

                from_uri = f"<sip:{account}@{format_hostport(engine.cfg.advertise, engine.sip_port)}>"
            if request.app:
                app = engine.cfg.apps.get(request.app)
                if app is None:
                    await context.abort(bad, f"app: no app {request.app!r}")
        if channel != "call" and (request.app or request.ring_timeout or getattr(request, "from")):
            field = "app" if request.app else "ring_timeout" if request.ring_timeout else "from"
            await context.abort(bad, f"{field}: only for channel \"call\"")
        if request.code_length < 0 or request.ttl_seconds < 0 or request.max_attempts < 0:
            field = "code_length" if request.code_length < 0 else \
                "ttl_seconds" if request.ttl_seconds < 0 else "max_attempts"
            await context.abort(bad, f"{field}: must not be negative")
        svc = self.service
        try:
            # The store's SQLite work runs on its own thread, in order with every other.
            v, code = await svc.run(
                svc.create, account, to, channel, code=request.code.strip(),
                length=request.code_length or 6, ttl=request.ttl_seconds or 600,
                max_attempts=request.max_attempts or 5)
        except verify_mod.VerifyError as exc:
            await context.abort(bad, str(exc))
        if channel in verify_mod.TEXT_CHANNELS:
            self._text(account, v, to, code)
            return verification_message(v)
        if channel != "call":
            return verification_message(v, code)
        svc.to_speak[v.id] = code
        await svc.run(svc.attach_call, v.id, outcome="calling")
        v.call_outcome = "calling"
        task = asyncio.get_running_loop().create_task(
            self._call(account, v, to, uri.user or "", app, from_uri, ring))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)
        return verification_message(v)

    def _text(self, account, v, to, code) -> None:
        """Text the code; the text's final status goes on the verification."""
        svc = self.service

        def done(m) -> None:
            svc.submit(svc.attach_call, v.id, outcome=m.status)
        m = self.engine.messaging.notify(account, to, verify_mod.MESSAGE.format(code=code),
                                         module="baton.verify", on_status=done)
        v.call_outcome = m.status

    async def _call(self, account, v, to, user, app, from_uri, ring) -> None:
        """Place the call that speaks the code; its outcome goes on the verification."""
        params = {"mode": "speak", "verification_id": v.id}
        target = app.name if app is not None else "baton.verify"
        try:
            grant = permit(self.engine, account, to)
        except OutboundDenied as exc:
            log.warning("verification %s: the call to %s is not allowed: %s", v.id, to, exc)
            grant = None
            outcome, sid = "failed", ""
        try:
            if grant is not None:
                resp = await self.sessions._originate(grant, _Background(), account, to, user,
                                                      target, app, from_uri, params, ring)
                outcome, sid = resp.outcome, resp.session.session_id
        except Exception as exc:
            log.warning("verification %s: the call to %s failed: %s", v.id, to, exc)
            outcome, sid = "failed", ""
        svc = self.service
        if outcome != "answered":
            svc.to_speak.pop(v.id, None)
        try:
            await svc.run(svc.attach_call, v.id, session_id=sid, outcome=outcome)
        except RuntimeError:
            log.info("verification %s: closed before the call's outcome was stored", v.id)

    async def _find(self, context, account: str | None, vid: str, to: str = ""):
        svc = self.service
        if not vid and not to:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "verification_id: required (or to)")
        accounts = list(self.engine.cfg.accounts) if account is None else [account]

        def lookup():
            # An operator: whichever account has it (the newest one for `to`).
            found = [v for v in (svc.get(a, vid) if vid else svc.latest_for(a, to)
                                 for a in accounts) if v is not None]
            return max(found, key=lambda v: v.created_wall_ns) if found else None
        v = await svc.run(lookup)
        if v is None and vid:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"verification_id: no verification {vid!r} in this account")
        if v is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"to: no verification for {to!r} in this account")
        return v

    async def Check(self, request, context) -> sv.VerifyCheckResponse:
        account = await _scope(self.authority, context)
        await _check_lengths(context, request)
        code = request.code.strip()
        if not code:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "code: required")
        if not code.isascii() or not code.isdigit() or len(code) > verify_mod.MAX_LENGTH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"code: up to {verify_mod.MAX_LENGTH} digits")
        v = await self._find(context, account, request.verification_id.strip(), request.to.strip())
        svc = self.service
        v, ok = await svc.run(svc.check, v.account, v.id, code)
        return sv.VerifyCheckResponse(valid=ok, verification=verification_message(v))

    async def Get(self, request, context) -> sv.Verification:
        account = await _scope(self.authority, context)
        await _check_lengths(context, request)
        vid = request.verification_id.strip()
        if not vid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "verification_id: required")
        return verification_message(await self._find(context, account, vid))

    def close(self) -> None:
        for t in list(self.calls):
            t.cancel()


__all__ = ["SurveyService", "VerifyService", "verification_message"]
