"""`baton.v1.Billing` on the engine's control API, forwarded to the accountant.

The accountant owns the ledger and the live meter and serves Billing on a
unix socket (engine/accounting/service.py); this service checks who calls,
scopes the request to what they may see, and forwards it through the
engine's `BillingClient` (engine/accounting/client.py).

- Invoice, Balance, Cost, Events: an account API token (`authorization:
  Bearer TOKEN`); `account` defaults to the token's, another existing
  account is PERMISSION_DENIED, an unknown one INVALID_ARGUMENT. A session
  of another account is NOT_FOUND, as in `Sessions`.
- Payouts: a vendor's `x-baton-vendor` and `x-baton-secret` metadata; a
  vendor sees its own statement only.
- A platform operator's token (`[engine] operator_tokens`) sees everything:
  Invoice and Balance of the account it names, Cost of any session, Events
  of every account (or the one named), and Payouts of every vendor (no
  `vendor`: all of them, with the total) or of the vendor it names.
- No accountant running: UNAVAILABLE, saying so.
"""
from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator

import grpc

from engine.accounting.service import check_account, check_period, money_pb

from proto import pb
from control.auth import AuthError, Authority, in_scope, metadata_value

log = logging.getLogger("baton.control.billing")

bp = pb.billing_pb2
MAX_ID = 128        # session ids and vendor ids: longer ones are refused, not looked up

__all__ = ["BillingService", "session_cost"]


def _client(engine):
    return getattr(engine, "accountant_client", None)


async def _forward_error(context, exc: grpc.aio.AioRpcError, client) -> None:
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            "billing: the accountant is not running or not answering (on "
                            f"{client.address}); it starts with `baton serve`, or run "
                            "`baton accountant` on the same data directory")
    await context.abort(exc.code(), exc.details() or "billing: the accountant refused")


async def _call(engine, context, method: str, request):
    client = _client(engine)
    if client is None:
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            "billing: this engine has no link to the accountant")
    try:
        return await client.call(method, request)
    except grpc.aio.AioRpcError as exc:
        await _forward_error(context, exc, client)


async def session_cost(engine, context, session_id: str, live_session) -> bp.SessionCost:
    """A session's cost from the accountant (the caller has checked the session
    is the caller's). `live_session`: the engine's live Session, or None."""
    client = _client(engine)
    if client is None:
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            "cost: this engine has no link to the accountant, which prices "
                            "sessions")
    try:
        cost = await client.running_cost(session_id)
    except grpc.aio.AioRpcError as exc:
        await _forward_error(context, exc, client)
    if cost is None:
        if live_session is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"session_id: the accountant has no cost for session "
                                f"{session_id} (not metered yet)")
        # Live but not drained from the ring yet: nothing is owed so far.
        acc = engine.cfg.accounts.get(live_session.account)
        cost = bp.SessionCost(session_id=session_id, account=live_session.account, live=True,
                              cost=money_pb(0, acc.currency if acc is not None else "USD"))
    return cost


class BillingService(pb.billing_pb2_grpc.BillingServicer):
    """The Billing service of one engine."""

    def __init__(self, engine, authority: Authority, sessions=None):
        self.engine = engine
        self.authority = authority
        self.sessions = sessions      # the SessionsService: finding a caller's session

    async def _account(self, context, requested: str) -> str | None:
        """The token's account, checked against the request's `account`; for an
        operator the requested account (None: every account)."""
        try:
            account = self.authority.scope(context.invocation_metadata())
        except AuthError as exc:
            await context.abort(exc.code, exc.message)
        requested = requested.strip()
        if not requested:
            return account
        problem = check_account(requested)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if requested not in self.engine.cfg.accounts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"account: no account {requested!r}")
        if account is not None and requested != account:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"account: the token belongs to account {account!r}")
        return requested

    async def _one_account(self, context, requested: str) -> str:
        """`_account` for the calls about one account: an operator must name it."""
        account = await self._account(context, requested)
        if account is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "account: required with an operator token")
        return account

    async def Invoice(self, request, context) -> bp.AccountInvoice:
        account = await self._one_account(context, request.account)
        problem = check_period(request.period.strip())
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return await _call(self.engine, context, "Invoice",
                           bp.InvoiceRequest(account=account, period=request.period.strip()))

    async def Balance(self, request, context) -> bp.AccountBalance:
        account = await self._one_account(context, request.account)
        return await _call(self.engine, context, "Balance", bp.BalanceRequest(account=account))

    async def Cost(self, request, context) -> bp.SessionCost:
        account = await self._account(context, "")
        sid = request.session_id.strip()
        if not sid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id: required")
        if len(sid) > MAX_ID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"session_id: longer than {MAX_ID} characters")
        s = self.engine.find_session(sid)
        if s is None and self.sessions is not None:
            row = await self.sessions._journal(sid)
            owner = row["account"] if row is not None else None
        else:
            owner = s.account if s is not None else None
        if owner is None or not in_scope(account, owner):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"session_id: no session {sid!r} in this account")
        cost = await session_cost(self.engine, context, sid,
                                  s if s is not None and not s.ended else None)
        if cost.account and not in_scope(account, cost.account):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"session_id: no session {sid!r} in this account")
        return cost

    async def Payouts(self, request, context) -> bp.PayoutsReport:
        if len(request.vendor) > MAX_ID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"vendor: longer than {MAX_ID} characters")
        if self.authority.operator(context.invocation_metadata()):
            # The platform operator: every vendor's statements, or the one named.
            vendor = request.vendor.strip()
            if vendor and vendor not in (self.engine.cfg.raw.get("vendors") or {}):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"vendor: no vendor {vendor!r}")
        else:
            vendor = await self._vendor(context)
            if request.vendor and request.vendor != vendor:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"vendor: the credentials are vendor {vendor!r}'s")
        problem = check_period(request.period.strip())
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return await _call(self.engine, context, "Payouts",
                           bp.PayoutsRequest(period=request.period.strip(), vendor=vendor))

    async def _vendor(self, context) -> str:
        md = context.invocation_metadata()
        vid = metadata_value(md, "x-baton-vendor") or ""
        secret = metadata_value(md, "x-baton-secret") or ""
        if not vid or not secret:
            if metadata_value(md, "authorization") is not None:
                try:
                    self.authority.scope(md)
                except AuthError as exc:
                    # A token that is nobody's is UNAUTHENTICATED, as everywhere else.
                    await context.abort(exc.code, exc.message)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    "payouts: a vendor's statement needs the vendor's "
                                    "x-baton-vendor and x-baton-secret metadata, not an "
                                    "account token")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "payouts: missing x-baton-vendor and x-baton-secret metadata")
        v = self.authority.vendors.get(vid)
        # Compare even for an unknown vendor, so timing says nothing about which exist.
        known = v.secret if v is not None else "\0" * len(secret)
        if not hmac.compare_digest(known.encode(), secret.encode()) or v is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "payouts: bad vendor or secret")
        return vid

    async def Events(self, request, context) -> AsyncIterator[bp.BillingEvent]:
        account = await self._account(context, request.account)
        client = _client(self.engine)
        if client is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "billing: this engine has no link to the accountant")
        if not hasattr(client, "subscribe"):
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "billing: this engine has no link to the accountant")
        if not client.connected:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "billing: the accountant is not running or not answering (on "
                                f"{client.address}); it starts with `baton serve`, or run "
                                "`baton accountant` on the same data directory")
        # One stream to the accountant serves every watcher (each stream there
        # holds one of its few threads): its events, filtered here.
        q = client.subscribe()
        try:
            while True:
                ev = await q.get()
                if account is None or ev.account == account:
                    yield ev
        finally:
            client.unsubscribe(q)
