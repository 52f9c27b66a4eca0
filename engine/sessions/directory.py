"""The cluster's session directory: live session id -> the node that owns it, in Redis
(`[cluster] redis`, docs/cluster.md).

Each node announces itself as `PREFIX node:NODE_ID` = {"node": NODE_ID, "grpc": HOST:PORT}
(and "http": HOST:PORT when it serves the REST API), so the cluster-wide views find every
node, with calls or not, and writes `PREFIX session:ID` = the same value when a session starts and deletes it when the session ends; every key carries a TTL (`[cluster]
directory_ttl`) that the node refreshes while the session is live, so the entries of a node
that died expire by themselves. Writes go through one background task in pipelined
batches: the call path never waits for Redis. The directory routes control requests only,
it is never the truth for money: when Redis is lost the node logs it once and goes on
(calls and stamps are untouched), and rewrites every live session when Redis is back.

A node with a gRPC API also reads the other nodes' entries at the same pace: the
cluster's nodes, told to vendor processes so that one that attaches to a node learns
every node it should attach to (`known_nodes`, `on_nodes`; docs/cluster.md, Vendors).
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("baton.directory")

BATCH = 500              # writes per pipeline


class DirectoryUnavailable(Exception):
    """Redis did not answer a lookup."""


@dataclass(frozen=True)
class Owner:
    node: str
    grpc: str
    http: str = ""          # the node's REST API (HOST:PORT), when it serves one


class SessionDirectory:
    """One node's view of (and writer into) the Redis session directory."""

    def __init__(self, url: str, prefix: str, node: str, grpc: str,
                 live_ids: Callable[[], Iterable[str]], ttl: float = 30.0,
                 timeout: float = 1.0, http: str = ""):
        import redis.asyncio as aioredis

        self.prefix = prefix
        self.node = node
        self.grpc = grpc
        self.ttl = ttl
        self.live_ids = live_ids
        entry = {"node": node, "grpc": grpc, **({"http": http} if http else {})}
        self.value = json.dumps(entry, separators=(",", ":"))
        self.redis = aioredis.from_url(url, socket_timeout=timeout,
                                       socket_connect_timeout=timeout, decode_responses=True)
        self.pending: dict[str, bool] = {}     # session id -> True: write, False: delete
        self.wake = asyncio.Event()
        self.announce = True                   # (re)write this node's own entry
        self.down = False                      # Redis failed the last write
        self.writes = 0                        # Redis commands sent (for the bench)
        self.tasks: list[asyncio.Task] = []
        # Set by close(): the loops stop even when a Redis call swallowed their
        # cancellation (redis-py may turn it into a connection error).
        self.closing = asyncio.Event()
        self.known_nodes: dict[str, str] = {}  # the cluster's nodes: node id -> gRPC address
        # Called with the new `known_nodes` whenever a node joins or leaves (the vendor hub).
        self.on_nodes: Callable[[dict[str, str]], Any] | None = None

    def key(self, sid: str) -> str:
        return f"{self.prefix}session:{sid}"

    def node_key(self, node: str) -> str:
        return f"{self.prefix}node:{node}"

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._writer()),
                      asyncio.ensure_future(self._refresher())]
        if self.grpc:
            self.tasks.append(asyncio.ensure_future(self._members()))
        self.wake.set()                    # this node's own entry, at once

    async def close(self) -> None:
        """Write what is pending (at most one timeout's wait), take this node's entry
        out, then let go of Redis."""
        self.closing.set()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.pending:
            await self._flush()
        if self.tasks and not self.down:
            try:
                await self.redis.delete(self.node_key(self.node))
            except Exception:     # it expires by itself
                pass
        await self.redis.aclose()

    # -- the owner's side: called on the event loop, never waits ----------------------
    def add(self, sid: str) -> None:
        self.pending[sid] = True
        self.wake.set()

    def remove(self, sid: str) -> None:
        self.pending[sid] = False
        self.wake.set()

    async def _writer(self) -> None:
        while not self.closing.is_set():
            await self.wake.wait()
            self.wake.clear()
            await self._flush()
            if self.pending or (self.announce and self.node):   # Redis is away: try again later
                await self._pause(min(1.0, self.ttl / 3))
                self.wake.set()

    async def _flush(self) -> None:
        if self.announce and self.node:
            self.announce = not await self._send([], announce=True)
        batch, self.pending = self.pending, {}
        items = list(batch.items())
        for i in range(0, len(items), BATCH):
            chunk = items[i:i + BATCH]
            if not await self._send(chunk):
                # Keep what was not written; a newer change of the same id wins.
                for sid, add in items[i:]:
                    self.pending.setdefault(sid, add)
                return

    async def _send(self, chunk: list[tuple[str, bool]], announce: bool = False) -> bool:
        ttl_ms = int(self.ttl * 1000)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if announce:
                    pipe.set(self.node_key(self.node), self.value, px=ttl_ms)
                for sid, add in chunk:
                    if add:
                        pipe.set(self.key(sid), self.value, px=ttl_ms)
                    else:
                        pipe.delete(self.key(sid))
                await pipe.execute()
        except Exception as exc:   # any Redis failure: routing suffers, never a call
            if not self.down:
                log.warning("session directory: Redis unavailable (%s); calls go on, "
                            "control requests for other nodes' sessions cannot be routed", exc)
            self.down = True
            return False
        self.writes += len(chunk) + announce
        if self.down:
            self.down = False
            log.info("session directory: Redis is back")
            for sid in self.live_ids():      # whatever Redis lost while away
                self.pending.setdefault(sid, True)
            self.wake.set()
        return True

    async def _refresher(self) -> None:
        # Refresh each live entry at a third of its TTL: one missed round never expires it.
        while True:
            await self._pause(self.ttl / 3)
            if self.closing.is_set():
                return
            for sid in self.live_ids():
                self.pending.setdefault(sid, True)
            self.announce = True
            self.wake.set()

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less if the directory is closing."""
        try:
            await asyncio.wait_for(self.closing.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # -- the cluster's nodes, for the vendor hub ------------------------------------------
    async def _members(self) -> None:
        # Read the others' entries at the pace of the refresh: a node that joins is seen
        # within a third of the TTL, one that died leaves the list when its entry expires.
        while not self.closing.is_set():
            try:
                await self.cluster_nodes()
            except DirectoryUnavailable:
                pass       # the writer logs the outage once; the last list stands meanwhile
            except Exception as exc:
                log.debug("session directory: node list: %s", exc)
            await self._pause(self.ttl / 3)

    async def cluster_nodes(self) -> dict[str, str]:
        """The cluster's nodes now (node id -> gRPC address), read from Redis; `on_nodes`
        is told when they changed. Raises DirectoryUnavailable (the last list stands)."""
        found = {node: o.grpc for node, o in (await self.nodes()).items() if o.grpc}
        if self.grpc:
            found.setdefault(self.node, self.grpc)    # this node, whatever Redis says
        if found != self.known_nodes:
            self.known_nodes = found
            if self.on_nodes is not None:
                try:
                    self.on_nodes(dict(found))
                except Exception:
                    log.exception("session directory: the node list's listener failed")
        return dict(found)

    # -- any node's side: lookups ---------------------------------------------------------
    async def owner(self, sid: str) -> Owner | None:
        """Where session `sid` lives, or None if no node holds it."""
        try:
            raw = await self.redis.get(self.key(sid))
        except Exception as exc:
            raise DirectoryUnavailable(str(exc)) from exc
        return _owner(raw)

    async def entries(self, limit: int = 100_000) -> dict[str, Owner]:
        """Every live session of the cluster: session id -> owner."""
        out: dict[str, Owner] = {}
        head = len(self.key(""))
        try:
            keys = []
            async for k in self.redis.scan_iter(match=self.key("*"), count=1000):
                keys.append(k)
                if len(keys) >= limit:
                    break
            for i in range(0, len(keys), BATCH):
                chunk = keys[i:i + BATCH]
                for k, raw in zip(chunk, await self.redis.mget(chunk)):
                    o = _owner(raw)
                    if o is not None:
                        out[k[head:]] = o
        except Exception as exc:
            raise DirectoryUnavailable(str(exc)) from exc
        return out


    async def nodes(self) -> dict[str, Owner]:
        """Every node that announced itself (its entry outlives it by at most the TTL)."""
        out: dict[str, Owner] = {}
        try:
            keys = [k async for k in self.redis.scan_iter(match=self.node_key("*"), count=1000)]
            for i in range(0, len(keys), BATCH):
                chunk = keys[i:i + BATCH]
                for raw in await self.redis.mget(chunk):
                    o = _owner(raw)
                    if o is not None:
                        out[o.node] = o
        except Exception as exc:
            raise DirectoryUnavailable(str(exc)) from exc
        return out


def _owner(raw: str | None) -> Owner | None:
    if not raw:
        return None
    try:
        d = json.loads(raw)
        return Owner(str(d["node"]), str(d["grpc"]), str(d.get("http") or ""))
    except (ValueError, KeyError, TypeError):
        return None
