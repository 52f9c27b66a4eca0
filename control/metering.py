"""Metered API access: API keys under a usage agreement, with a quota per period.

A third-party application calls the control API with an API key (`[api_keys.ID]`):
a bearer token that acts for one account. Every call it makes to a control
service (`baton.v1.Sessions`, `baton.v1.Billing` and the other `baton.v1`
services; vendors' `ModuleHost` streams are not metered) is

- counted against the key's quota for the current period (a UTC month or
  day). Alone, the check is local: the counts live in the engine, in
  `DATA/api_keys.db` (SQLite, written before the call proceeds), so a
  restarted engine goes on from where it stopped. In a cluster (`[cluster]
  redis`, docs/cluster.md) every node counts in the cluster's Redis instead,
  one atomic script per call (`SharedCounts`), so the quota holds for the
  whole cluster; Redis unreachable: the key's calls are refused
  (`UNAVAILABLE`, REST 503), never served uncounted;
- refused with `RESOURCE_EXHAUSTED` once the quota is used, unless the key's
  agreement tops up automatically: then a block of `auto_top_up.calls` more
  calls is added and charged `auto_top_up.price`;
- stamped into the ring as a counted action (`api_call`, module
  `baton.api.ID`) with the key's plan, so the accountant rates it and it
  shows on the account's invoice, one line per key. A top-up is stamped as
  the action `api_top_up` with its price and a ledger key of its own
  (`apitopup:NODE:ID:PERIOD:N`), which the accountant posts once: the engine
  stamps the latest top-up of each key again when it starts, in case it
  stopped between counting a top-up and stamping it.

Account tokens (`accounts.ID.api_tokens`) are not metered.

The keys' config (`[api_keys.ID]`) is parsed and checked in `engine/config/api_keys.py`.
"""
from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import time
from typing import Any

from engine.accounting.config import PeriodClock
from engine.accounting.money import format_money
from engine.common import clock
from engine.config.api_keys import ApiKey, token_digest

log = logging.getLogger("baton.control.metering")

__all__ = ["ApiMeter", "SharedCounts", "CountsUnavailable", "COUNTED", "bearer",
           "metering_interceptor"]

# A request one node counted and forwards to the session's owner carries a one-time ticket
# under this name (gRPC metadata, HTTP header): the owner redeems it instead of counting
# the call again. Tickets live in the cluster's Redis only, 128 random bits, used once.
COUNTED = "baton-counted"
TICKET_TTL_MS = 30_000

# Services of the control API a key's calls are metered on; vendors attach
# with their own secrets and are billed for time in control instead.
METERED_PREFIX = "/baton.v1."
UNMETERED = ("/baton.v1.ModuleHost/",)


# KEYS[1]: the key's counts of one period (a hash: calls, top_ups). ARGV: quota,
# calls per top-up (0: none), seconds the counts outlive their last call. Check and
# count in one script: Redis runs it whole, so two nodes never both take the last call.
_COUNT = """
local calls = tonumber(redis.call('HGET', KEYS[1], 'calls') or '0')
local tops = tonumber(redis.call('HGET', KEYS[1], 'top_ups') or '0')
local quota, block = tonumber(ARGV[1]), tonumber(ARGV[2])
local topped = 0
if calls >= quota + tops * block then
  if block == 0 then return {0, calls, tops, 0} end
  tops = tops + 1
  topped = 1
end
redis.call('HSET', KEYS[1], 'calls', calls + 1, 'top_ups', tops)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {1, calls + 1, tops, topped}
"""
# A period's counts are kept a little past its end (then the next period's key is used).
_KEEP = {"month": 40 * 86400, "day": 2 * 86400}


class CountsUnavailable(Exception):
    """The cluster's shared counts cannot be reached: the call is not counted."""


class SharedCounts:
    """API-key counts shared by a cluster's nodes: `PREFIX apikey:ID:PERIOD` in Redis.

    After a failure the counts are taken as down for `retry` seconds, so that the
    calls refused meanwhile do not each wait for a timeout.
    """

    def __init__(self, url: str, prefix: str, timeout: float = 1.0, retry: float = 1.0) -> None:
        import redis.asyncio as aioredis

        self.prefix = prefix
        self.redis = aioredis.from_url(url, socket_timeout=timeout,
                                       socket_connect_timeout=timeout)
        self.script = self.redis.register_script(_COUNT)
        self.retry = retry
        self.down_until = 0.0
        self.down = False                 # logged once per outage

    def key(self, key_id: str, period: str) -> str:
        return f"{self.prefix}apikey:{key_id}:{period}"

    async def count(self, key: ApiKey, period: str) -> tuple[bool, int, int, bool]:
        """Count one call: (admitted, calls, top-ups, whether this call took a top-up)."""
        if time.monotonic() < self.down_until:
            raise CountsUnavailable("the cluster's API-key counts are unreachable")
        block = key.top_up.calls if key.top_up else 0
        try:
            ok, calls, tops, topped = await self.script(
                keys=[self.key(key.id, period)],
                args=[key.quota, block, _KEEP[key.period]])
        except Exception as exc:     # any Redis failure: refuse, never serve uncounted
            self.down_until = time.monotonic() + self.retry
            if not self.down:
                log.warning("API-key quotas: Redis unavailable (%s); calls made with API "
                            "keys are refused until it answers", exc)
            self.down = True
            raise CountsUnavailable(str(exc)) from exc
        if self.down:
            log.info("API-key quotas: Redis answers again")
            self.down = False
        return bool(ok), int(calls), int(tops), bool(topped)

    async def ticket(self) -> str | None:
        """A one-time ticket saying "counted already" for a forwarded request (None:
        Redis did not take it, and the owner counts the request again)."""
        t = secrets.token_hex(16)
        try:
            await self.redis.set(f"{self.prefix}counted:{t}", b"1", px=TICKET_TTL_MS)
        except Exception:
            return None
        return t

    async def redeem(self, ticket: str) -> bool:
        """Whether `ticket` was issued by a node and not used yet (it is used now)."""
        if not ticket or len(ticket) > 64:
            return False
        try:
            return await self.redis.getdel(f"{self.prefix}counted:{ticket}") is not None
        except Exception:
            return False

    async def close(self) -> None:
        await self.redis.aclose()


class ApiMeter:
    """Counts each key's calls per period and decides whether a call may proceed.

    `admit(key)` is synchronous and does no I/O but one SQLite write, so on
    the event loop the check and the count cannot interleave with another
    call's. Counts are in `path` (None: in memory only). With `counts` (a
    cluster's `SharedCounts`), `admit_async` counts there instead, and the
    SQLite file keeps the top-ups this node took (to stamp them again).
    """

    def __init__(self, keys: dict[str, ApiKey], path: str | None, node: str, stamper_of,
                 counts: SharedCounts | None = None) -> None:
        self.keys = keys
        self.counts = counts
        self.by_digest = {k.digest: k for k in keys.values()}
        self.node = node
        self._stamper_of = stamper_of        # () -> the engine's current Stamper
        self._clocks = {p: PeriodClock(p) for p in ("month", "day")}
        self.usage: dict[tuple[str, str], list[int]] = {}   # (key, period) -> [calls, top_ups]
        self.refused = 0
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.db = sqlite3.connect(path or ":memory:", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # A count survives the engine being killed once the statement returns
        # (the WAL is in the OS); a power cut may lose the last ones, as the ring would.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS usage (key TEXT NOT NULL, period TEXT NOT NULL, "
                        "calls INTEGER NOT NULL, top_ups INTEGER NOT NULL, "
                        "PRIMARY KEY (key, period))")
        # In a cluster: the top-ups this node took (numbered across the cluster).
        self.db.execute("CREATE TABLE IF NOT EXISTS own_top_ups (key TEXT NOT NULL, "
                        "period TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (key, period))")
        if counts is None:
            for key, period, calls, top_ups in self.db.execute(
                    "SELECT key, period, calls, top_ups FROM usage"):
                self.usage[(key, period)] = [calls, top_ups]

    @classmethod
    def for_engine(cls, engine) -> ApiMeter:
        """The meter of an engine: its config's keys, counts in DATA/api_keys.db."""
        cfg = engine.cfg
        keys = getattr(cfg, "api_keys", None) or {}
        path = os.path.join(cfg.data_dir, "api_keys.db") if keys else None
        c = getattr(cfg, "cluster", None)
        counts = None
        if keys and c is not None and c.redis and c.shared_quotas:
            counts = SharedCounts(c.redis, c.prefix)
        return cls(keys, path, cfg.node_id, lambda: engine.stamper, counts)

    @classmethod
    def shared(cls, engine) -> ApiMeter:
        """The engine's one meter, made on first use: the gRPC server and the
        REST API count a key's calls together."""
        meter = getattr(engine, "api_meter", None)
        if meter is None or meter.db is None:
            meter = engine.api_meter = cls.for_engine(engine)
        return meter

    # -- tokens -------------------------------------------------------------------
    def key_for_token(self, token: str) -> ApiKey | None:
        """The API key a bearer token is, or None (an account token, or unknown)."""
        if not self.by_digest:
            return None
        return self.by_digest.get(token_digest(token))

    # -- counting -------------------------------------------------------------------
    def period(self, key: ApiKey, wall_ns: int | None = None) -> str:
        """The key's current quota period ("2026-11", or "2026-11-26")."""
        return self._clocks[key.period].of(clock.wall_ns() if wall_ns is None else wall_ns)

    def limit(self, key: ApiKey, period: str) -> int:
        """The calls the key may make in `period`: its quota plus its top-ups so far."""
        top_ups = self.usage.get((key.id, period), (0, 0))[1]
        return key.quota + top_ups * (key.top_up.calls if key.top_up else 0)

    def used(self, key: ApiKey, period: str | None = None) -> int:
        """Calls counted in a period (default: the current one)."""
        return self.usage.get((key.id, period or self.period(key)), (0, 0))[0]

    async def admit_async(self, key: ApiKey, method: str = "") -> str | None:
        """`admit`, counted in the cluster's shared counts when there are some.
        Raises CountsUnavailable (or sqlite3.Error) when the call cannot be counted."""
        if self.counts is None:
            return self.admit(key, method)
        wall = clock.wall_ns()
        period = self.period(key, wall)
        ok, calls, top_ups, topped = await self.counts.count(key, period)
        self.usage[(key.id, period)] = [calls, top_ups]
        if not ok:
            self.refused += 1
            return (f"API key {key.id!r} has used its quota of {self.limit(key, period)} "
                    f"calls for {period}" + (f" ({key.quota} + top-ups)" if top_ups else "")
                    + " across the cluster")
        if topped:
            # The top-up's number is the cluster's: its ledger key is unique to it.
            self.db.execute("INSERT INTO own_top_ups (key, period, n) VALUES (?, ?, ?) "
                            "ON CONFLICT (key, period) DO UPDATE SET n = excluded.n",
                            (key.id, period, top_ups))
            log.info("API key %s: quota used, topped up %d calls for %s (top-up %d of %s, "
                     "across the cluster)", key.id, key.top_up.calls,
                     format_money(key.top_up.price, key.currency), top_ups, period)
            self._stamp_top_up(key, period, top_ups, wall)
        self._stamp_call(key, method, wall)
        return None

    async def ticket_for(self, token: str | None) -> str | None:
        """A ticket for forwarding a request made with bearer/basic secret `token` to
        another node, when this node counted it in the shared counts; else None."""
        if self.counts is None or not token or self.key_for_token(token) is None:
            return None
        return await self.counts.ticket()

    async def forwarded_counted(self, ticket: str | None) -> bool:
        """Whether a forwarded request was counted by the node that forwarded it."""
        return bool(ticket) and self.counts is not None and await self.counts.redeem(ticket)

    def admit(self, key: ApiKey, method: str = "") -> str | None:
        """Count one call of `key`; None when it may proceed, else the refusal
        (a message naming the key and its quota)."""
        wall = clock.wall_ns()
        period = self.period(key, wall)
        u = self.usage.get((key.id, period))
        if u is None:
            u = self.usage[(key.id, period)] = [0, 0]
        calls, top_ups = u
        topped = False
        if calls >= self.limit(key, period):
            if key.top_up is None:
                self.refused += 1
                return (f"API key {key.id!r} has used its quota of {self.limit(key, period)} "
                        f"calls for {period}" + (f" ({key.quota} + top-ups)" if top_ups else ""))
            top_ups += 1
            topped = True
        self.db.execute("INSERT INTO usage (key, period, calls, top_ups) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (key, period) DO UPDATE SET calls = excluded.calls, "
                        "top_ups = excluded.top_ups", (key.id, period, calls + 1, top_ups))
        u[0], u[1] = calls + 1, top_ups
        if topped:
            log.info("API key %s: quota used, topped up %d calls for %s (top-up %d of %s)",
                     key.id, key.top_up.calls, format_money(key.top_up.price, key.currency),
                     top_ups, period)
            self._stamp_top_up(key, period, top_ups, wall)
        self._stamp_call(key, method, wall)
        return None

    def _stamp_call(self, key: ApiKey, method: str, wall: int) -> None:
        stamper = self._stamper_of()
        if stamper is not None:
            fields: dict[str, Any] = {"api_key": key.id, "wall_ns": wall}
            if key.plan:
                fields["plan"] = key.plan
            if method:
                fields["method"] = method
            stamper.record_action(key.account, key.module, "api_call", 1, **fields)

    def _stamp_top_up(self, key: ApiKey, period: str, n: int, wall: int) -> None:
        stamper = self._stamper_of()
        if stamper is None or key.top_up is None:
            return
        stamper.record_action(key.account, key.module, "api_top_up", 1, api_key=key.id,
                              wall_ns=wall, price=key.top_up.price, calls=key.top_up.calls,
                              plan=f"top-up {key.top_up.calls} calls",
                              key=f"apitopup:{self.node}:{key.id}:{period}:{n}")

    def restamp_top_ups(self) -> int:
        """Stamp each key's latest top-up of its current period again (the
        accountant posts a top-up once, by its ledger key): a stop between
        counting a top-up and stamping it must not leave it unbilled."""
        n = 0
        for key in self.keys.values():
            period = self.period(key)
            if self.counts is not None:
                row = self.db.execute("SELECT n FROM own_top_ups WHERE key = ? AND period = ?",
                                      (key.id, period)).fetchone()
                top_ups = row[0] if row else 0
            else:
                top_ups = self.usage.get((key.id, period), (0, 0))[1]
            if top_ups and key.top_up is not None:
                self._stamp_top_up(key, period, top_ups, clock.wall_ns())
                n += 1
        return n

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None  # type: ignore[assignment]

    async def aclose(self) -> None:
        self.close()
        if self.counts is not None:
            await self.counts.close()


def bearer(metadata) -> str | None:
    for k, v in metadata or ():
        if k.lower() == "authorization":
            v = v.decode() if isinstance(v, bytes) else v
            scheme, _, token = v.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def metering_interceptor(meter: ApiMeter):
    """A grpc.aio server interceptor that meters the control calls made with API keys.

    Calls with any other credentials pass untouched (the service itself
    authenticates them); so do calls of unknown methods. (grpc is imported
    here, not when the config is read: control/server.py sets its fork
    option before the first import.)
    """
    import grpc

    class MeteringInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            method = details.method or ""
            handler = await continuation(details)
            if handler is None or not method.startswith(METERED_PREFIX) or \
                    method.startswith(UNMETERED) or not meter.keys:
                return handler
            token = bearer(details.invocation_metadata)
            key = meter.key_for_token(token) if token else None
            if key is None:
                return handler
            ticket = next((v for k, v in details.invocation_metadata or () if k == COUNTED),
                          None)
            if ticket is not None and await meter.forwarded_counted(ticket):
                return handler                # counted by the node that forwarded it
            try:
                refusal = await meter.admit_async(key, method)
            except (sqlite3.Error, CountsUnavailable) as exc:
                # The count cannot be kept: refuse rather than serve unmetered.
                if isinstance(exc, sqlite3.Error):
                    log.error("API key %s: cannot record the call: %s", key.id, exc)
                return _refusing(handler, grpc.StatusCode.UNAVAILABLE,
                                 "API usage cannot be recorded; retry later")
            if refusal is None:
                return handler
            return _refusing(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)

    return MeteringInterceptor()


def _refusing(handler, code, message: str):
    """A handler of the same shape as `handler` that ends the call with a status."""
    import grpc

    async def refuse(_request, context):
        await context.abort(code, message)

    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    return grpc.stream_stream_rpc_method_handler(refuse, **kw)
