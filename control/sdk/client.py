"""The vendor process's side of `baton.v1.ModuleHost.Attach`.

    client = VendorClient("127.0.0.1:50051", "acme.survey", secret)

    @client.on_offer
    async def handle(offer: Offer) -> None:
        call = await offer.take()
        await call.answer()
        result = await call.gather(num_digits=1, prompt=Say("Press a key"))
        await call.release("done", {"key": result.digits})

    await client.run()          # connects, registers, reconnects with backoff

With `discover=True` the client also attaches to every other node of the engine's
cluster (the nodes the engine lists in `Registered` and whenever one joins), one
stream per node, all offers going to the same handler: a vendor attaches once and
serves the whole cluster (docs/cluster.md, Vendors).

Each offer runs its handler in a task of its own. Every command is awaitable:
it returns the engine's `Ack` or raises a typed `ControlError`; once control
of the session ends, pending and later commands raise `ControlLost`.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from proto import pb
from control.sdk.errors import ControlLost, Disconnected, RegistrationError, error_for
from control.sdk.types import (Ack, ControlRevoked, Event, GatherResult, MessageStatus, OfferInfo,
                    Play, PlaybackFinished, Prompt, RecordingReady, Say, event_from_pb)

log = logging.getLogger("baton.sdk")

mh = pb.module_host_pb2
OfferHandler = Callable[["Offer"], Awaitable[None]]
EventHandler = Callable[["Call", Event], Awaitable[None] | None]

FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
         grpc.StatusCode.INVALID_ARGUMENT)
CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 2000),
                   ("grpc.keepalive_permit_without_calls", 1)]


class Offer(OfferInfo):
    """A session offered to this process: `take()` it or `decline()` it before the deadline."""

    _client: "VendorClient"

    async def take(self) -> "Call":
        """Take control; returns the `Call` to command. Raises FailedPrecondition when
        the offer expired or was withdrawn."""
        client = self._client
        call = Call(client, self)
        client._calls[self.offer_id] = call
        try:
            await client._request("take", mh.Take(offer_id=self.offer_id,
                                                  session_id=self.session_id),
                                  self.session_id, self.offer_id)
        except BaseException:
            client._calls.pop(self.offer_id, None)
            raise
        return call

    async def decline(self, reason: str = "") -> Ack:
        """Refuse the session: the engine offers it to another process, or falls back."""
        return await self._client._request(
            "decline", mh.Decline(offer_id=self.offer_id, session_id=self.session_id,
                                  reason=reason), self.session_id, self.offer_id)


class Call:
    """A session this process controls (from a taken offer)."""

    def __init__(self, client: "VendorClient", offer: Offer):
        self.client = client
        self.offer = offer
        self.session_id = offer.session_id
        self.active = True
        self.revoked: asyncio.Future[ControlRevoked] = client._loop.create_future()
        self.events: asyncio.Queue[Event] = asyncio.Queue(1000)
        self._waiters: dict[tuple[str, str], asyncio.Future] = {}

    @property
    def params(self) -> dict[str, Any]:
        """The per-call values at the time of the offer."""
        return self.offer.call_params

    # -- commands -------------------------------------------------------------------
    async def command(self, command_id: str | None = None, **action: Any) -> Ack:
        """Send one command (`answer=mh.Answer()`, `play=mh.Play(...)`...) and await its Ack.

        Reuse `command_id` to retry a command safely: the engine acts once."""
        if not self.active:
            raise ControlLost(f"this process no longer controls session {self.session_id}",
                              session_id=self.session_id)
        cid = command_id or self.client._next_id()
        msg = mh.Command(command_id=cid, session_id=self.session_id, **action)
        return await self.client._request("command", msg, self.session_id, cid)

    async def answer(self, command_id: str | None = None) -> Ack:
        """Answer the call (media commands do it when needed too)."""
        return await self.command(command_id, answer=mh.Answer())

    async def play(self, url: str, loop: int = 1, wait: bool = False,
                   command_id: str | None = None) -> Ack | PlaybackFinished:
        """Play a WAV (file path or http(s) URL on the engine's side); `loop` -1 for
        ever. With `wait`, returns once it finished (or was interrupted)."""
        return await self._media(command_id, wait,
                                 play=mh.Play(url=url, loop=_loop_count(loop)))

    async def say(self, text: str, voice: str = "", loop: int = 1, wait: bool = False,
                  command_id: str | None = None) -> Ack | PlaybackFinished:
        """Speak `text`; with `wait`, returns once it has been said."""
        return await self._media(command_id, wait,
                                 say=mh.Say(text=text, voice=voice, loop=_loop_count(loop)))

    async def _media(self, command_id, wait: bool, **action) -> Ack | PlaybackFinished:
        cid = command_id or self.client._next_id()
        fut = self._expect("playback", cid) if wait else None
        try:
            ack = await self.command(cid, **action)
        except BaseException:
            _discard(self._waiters.pop(("playback", cid), fut))
            raise
        if fut is None:
            return ack
        return await fut

    async def gather(self, num_digits: int = 0, timeout: float = 5.0, finish_on_key: str = "#",
                     prompt: Prompt | None = None, command_id: str | None = None) -> GatherResult:
        """Collect digits (with an optional prompt) and return them."""
        g = mh.Gather(num_digits=num_digits, timeout=timeout, finish_on_key=finish_on_key)
        if isinstance(prompt, Say):
            g.say.CopyFrom(mh.Say(text=prompt.text, voice=prompt.voice,
                                  loop=_loop_count(prompt.loop)))
        elif isinstance(prompt, Play):
            g.play.CopyFrom(mh.Play(url=prompt.url, loop=_loop_count(prompt.loop)))
        cid = command_id or self.client._next_id()
        fut = self._expect("gather", cid)
        try:
            await self.command(cid, gather=g)
        except BaseException:
            _discard(self._waiters.pop(("gather", cid), fut))
            raise
        return await fut

    async def record(self, max_length: float = 120.0, silence: float = 5.0,
                     finish_on_key: str = "#", beep: bool = True, trim: bool = True,
                     command_id: str | None = None) -> RecordingReady:
        """Record the caller; returns once the WAV is written on the engine's side."""
        cid = command_id or self.client._next_id()
        fut = self._expect("recording", cid)
        try:
            await self.command(cid, record=mh.Record(max_length=max_length, silence=silence,
                                                     finish_on_key=finish_on_key, beep=beep,
                                                     trim=trim))
        except BaseException:
            _discard(self._waiters.pop(("recording", cid), fut))
            raise
        return await fut

    async def dial(self, to: str, timeout: float = 30.0, caller_id: str = "", trunk: str = "",
                   time_limit: float = 0.0, resume: dict | None = None,
                   command_id: str | None = None) -> Ack:
        """Bridge the caller to `to`. Control passes to the engine for the call and
        comes back as a new offer (DialCallStatus in module_params, `resume` echoed)."""
        return await self.command(command_id, dial=mh.Dial(
            to=to, timeout=timeout, caller_id=caller_id, trunk=trunk, time_limit=time_limit,
            resume=pb.to_struct(resume or {})))

    async def enqueue(self, queue: str, priority: int = 0, command_id: str | None = None) -> Ack:
        return await self.command(command_id, enqueue=mh.Enqueue(queue=queue, priority=priority))

    async def join_conference(self, name: str, muted: bool = False, listen_only: bool = False,
                              command_id: str | None = None) -> Ack:
        return await self.command(command_id, join_conference=mh.JoinConference(
            name=name, muted=muted, listen_only=listen_only))

    async def send_digits(self, digits: str, duration_ms: int = 100, gap_ms: int = 60,
                          command_id: str | None = None) -> Ack:
        """Send DTMF to the caller; returns once every digit was sent."""
        return await self.command(command_id, send_digits=mh.SendDigits(
            digits=digits, duration_ms=duration_ms, gap_ms=gap_ms))

    async def set_value(self, key: str, value: Any, command_id: str | None = None) -> Ack:
        """Set `session.params[key]` (seen by later modules and the API)."""
        return await self.command(command_id, set_value=mh.SetValue(key=key,
                                                                    value=pb.to_value(value)))

    async def send_message(self, body: str, to: str = "", from_: str = "", wait: bool = False,
                           command_id: str | None = None) -> Ack | MessageStatus:
        """Text the session's other party (or `to`, which the account's outbound rules
        must allow); with `wait`, return its final `MessageStatus`. Texts received on
        the session arrive in `events` as `TextReceived`."""
        cid = command_id or self.client._next_id()
        fut = self._expect("message", cid) if wait else None
        try:
            ack = await self.command(cid, send_message=mh.SendMessage(
                body=body, to=to, **{"from": from_}))
        except BaseException:
            _discard(self._waiters.pop(("message", cid), fut))
            raise
        return await fut if fut is not None else ack

    async def stop_media(self, command_id: str | None = None) -> Ack:
        return await self.command(command_id, stop_media=mh.StopMedia())

    async def hangup(self, reason: str = "", command_id: str | None = None) -> Ack:
        return await self.command(command_id, hangup=mh.Hangup(reason=reason))

    async def transfer(self, target: str, params: dict | None = None,
                       command_id: str | None = None) -> Ack:
        """Hand the session to a module code, node, SIP/tel URI or instruction URI."""
        return await self.command(command_id, transfer=mh.Transfer(
            target=target, params=pb.to_struct(params or {})))

    async def release(self, outlet: str = "done", params: dict | None = None,
                      command_id: str | None = None) -> Ack:
        """Leave through `outlet` of this node, passing `params` on."""
        return await self.command(command_id, release=mh.Release(
            outlet=outlet, params=pb.to_struct(params or {})))

    # -- events ---------------------------------------------------------------------
    def _expect(self, kind: str, cid: str) -> asyncio.Future:
        fut = self.client._loop.create_future()
        self._waiters[(kind, cid)] = fut
        return fut

    def _on_event(self, ev: Event) -> None:
        key = None
        if isinstance(ev, GatherResult):
            key = ("gather", ev.command_id)
        elif isinstance(ev, PlaybackFinished):
            key = ("playback", ev.command_id)
        elif isinstance(ev, RecordingReady):
            key = ("recording", ev.command_id)
        elif isinstance(ev, MessageStatus):
            key = ("message", ev.command_id)
        if key is not None:
            fut = self._waiters.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_result(ev)
        if isinstance(ev, ControlRevoked):
            self._lose(ControlLost(f"control of session {self.session_id} ended: {ev.reason}",
                                   session_id=self.session_id), ev)
        if self.events.full():
            self.events.get_nowait()  # nobody reads them: keep the latest
        self.events.put_nowait(ev)

    def _lose(self, exc: ControlLost, ev: ControlRevoked | None = None) -> None:
        self.active = False
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiters.clear()
        if not self.revoked.done():
            if ev is not None:
                self.revoked.set_result(ev)
            else:
                self.revoked.set_exception(exc)
                self.revoked.exception()  # retrieved: nobody has to await it
        self.client._calls.pop(self.offer.offer_id, None)


def _discard(fut: asyncio.Future | None) -> None:
    """Drop a waiter nobody will await (its exception, if any, counts as seen)."""
    if fut is None:
        return
    if not fut.done():
        fut.cancel()
    elif not fut.cancelled():
        fut.exception()


def _loop_count(n: int) -> int:
    """The SDK's loop count (1 once, 0 or negative for ever) as the proto's."""
    return -1 if n <= 0 else n


class VendorClient:
    """One vendor process's connection to an engine, for one module code.

    `target` is the engine's gRPC address (host:port); `credentials` are
    `grpc.ssl_channel_credentials(...)` for TLS (None: plaintext). With `discover`,
    `target` is one node of a cluster and the client attaches to every node the
    cluster lists, with the same settings (`peers`, `nodes`).
    """

    def __init__(self, target: str, module_code: str, secret: str, *, vendor: str = "",
                 instance: str = "", max_sessions: int = 0,
                 credentials: grpc.ChannelCredentials | None = None,
                 secret_in_metadata: bool = False, reconnect: bool = True,
                 backoff_initial: float = 0.2, backoff_max: float = 10.0,
                 ack_timeout: float = 30.0, discover: bool = False):
        self.target = target
        self.module_code = module_code
        self.vendor = vendor
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.max_sessions = max_sessions
        self.credentials = credentials
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.ack_timeout = ack_timeout
        self.process_id = ""
        self.offer_timeout_ms = 0
        self.registered = asyncio.Event()
        self.connections = 0
        self.discover = discover
        self.node_id = ""           # the node this stream is attached to (from Registered)
        # With `discover`: the clients of the cluster's other nodes, by node id.
        self.peers: dict[str, VendorClient] = {}
        self._listed: dict[str, str] = {}     # the cluster's last list: node id -> address
        self._root: VendorClient = self
        self._secret = secret
        self._secret_in_metadata = secret_in_metadata
        self._offer_handler: OfferHandler | None = None
        self._event_handler: EventHandler | None = None
        self._calls: dict[str, Call] = {}
        self._pending: dict[tuple[str, str], list[asyncio.Future]] = {}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self._out: asyncio.Queue | None = None
        self._closing = False
        self._run_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stream = None
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    # -- handlers -------------------------------------------------------------------
    def on_offer(self, fn: OfferHandler) -> OfferHandler:
        """Decorator: `async def fn(offer)` runs for every offer, in a task of its own.
        Without a handler, offers are declined."""
        self._offer_handler = fn
        return fn

    def on_event(self, fn: EventHandler) -> EventHandler:
        """Decorator: `fn(call, event)` (plain or async) for every event of every call."""
        self._event_handler = fn
        return fn

    @property
    def calls(self) -> dict[str, Call]:
        """The calls this process controls now, by offer id (on every node)."""
        out = dict(self._calls)
        for peer in self.peers.values():
            out.update(peer._calls)
        return out

    @property
    def nodes(self) -> dict[str, str]:
        """The nodes this client is registered with now: node id -> gRPC address."""
        out = {self.node_id: self.target} if self.registered.is_set() else {}
        for node, peer in self.peers.items():
            if peer.registered.is_set():
                out[node] = peer.target
        return out

    # -- running --------------------------------------------------------------------
    async def start(self, timeout: float = 10.0) -> None:
        """Run in the background and return once registered (raises RegistrationError
        or TimeoutError)."""
        self._run_task = asyncio.get_running_loop().create_task(self.run())
        waiter = asyncio.ensure_future(self.registered.wait())
        done, _ = await asyncio.wait({waiter, self._run_task}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._run_task in done:
            waiter.cancel()
            self._run_task.result()
            raise RegistrationError(grpc.StatusCode.UNAVAILABLE, "the client stopped")
        if waiter not in done:
            waiter.cancel()
            raise TimeoutError(f"not registered with {self.target} within {timeout:g} s")

    async def run(self) -> None:
        """Connect, register and serve until `close()`; reconnects with exponential
        backoff (with jitter) when the stream breaks. Raises RegistrationError when
        the engine refuses the registration."""
        self._loop = asyncio.get_running_loop()
        failures = 0
        while not self._closing:
            try:
                await self._connect_once()
                failures = 0
            except RegistrationError:
                raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("stream to %s ended: %s", self.target, exc)
            if self._closing or not self.reconnect:
                return
            if self._root is not self and not self._root._keeps(self):
                return                # a peer whose node the cluster no longer lists
            delay = min(self.backoff_max, self.backoff_initial * (2 ** failures))
            failures += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def run_until_signalled(self, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
        """`run()` until one of `signals` arrives (then `close()`), for a vendor
        program's main; a refused registration is raised as by `run()`."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        runner = loop.create_task(self.run())
        stopper = loop.create_task(stop.wait())
        try:
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            for sig in signals:
                loop.remove_signal_handler(sig)
            await self.close()
        if runner.done() and not runner.cancelled() and runner.exception() is not None:
            raise runner.exception()

    async def close(self) -> None:
        """Close the stream, and every peer's (sessions held follow their fallback on
        the engine)."""
        self._closing = True
        peers, self.peers = list(self.peers.values()), {}
        for peer in peers:
            await peer.close()
        stream = self._stream
        if stream is not None:
            stream.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self._run_task is not None:
            self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._run_task

    async def __aenter__(self) -> "VendorClient":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- the stream -----------------------------------------------------------------
    def _channel(self) -> grpc.aio.Channel:
        if self.credentials is not None:
            return grpc.aio.secure_channel(self.target, self.credentials, options=CHANNEL_OPTIONS)
        return grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)

    async def _connect_once(self) -> None:
        loop = self._loop
        metadata = None
        if self._secret_in_metadata:
            metadata = (("x-baton-module", self.module_code), ("x-baton-secret", self._secret))
            if self.vendor:
                metadata += (("x-baton-vendor", self.vendor),)
        out: asyncio.Queue = asyncio.Queue()
        async with self._channel() as channel:
            stub = pb.module_host_pb2_grpc.ModuleHostStub(channel)
            stream = stub.Attach(metadata=metadata)
            self._stream = stream
            writer = None
            try:
                await stream.write(mh.VendorMessage(register=mh.Register(
                    module_code=self.module_code,
                    secret="" if self._secret_in_metadata else self._secret,
                    vendor=self.vendor, instance=self.instance, max_sessions=self.max_sessions)))
                try:
                    first = await stream.read()
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in FATAL:
                        raise RegistrationError(exc.code(), exc.details() or "") from None
                    raise
                if first is grpc.aio.EOF or first.WhichOneof("kind") != "registered":
                    raise ConnectionError("the engine closed the stream before registering")
                reg = first.registered
                self.process_id = reg.process_id
                self.node_id = reg.node_id
                self.offer_timeout_ms = reg.offer_timeout_ms
                self.connections += 1
                self._out = out
                self.registered.set()
                log.info("registered %s as %s with %s (node %s)", self.module_code,
                         reg.process_id, self.target, reg.node_id)
                self._root._cluster(reg.cluster_nodes)
                writer = loop.create_task(self._write_loop(stream, out))
                while True:
                    msg = await stream.read()
                    if msg is grpc.aio.EOF:
                        break
                    self._handle(msg)
            finally:
                self.registered.clear()
                self._out = None
                self._stream = None
                if writer is not None:
                    writer.cancel()
                self._disconnected()

    async def _write_loop(self, stream, out: asyncio.Queue) -> None:
        try:
            while True:
                msg = await out.get()
                await stream.write(msg)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            log.info("stream write failed: %s", exc)
            stream.cancel()

    def _disconnected(self) -> None:
        exc = Disconnected("the stream to the engine was lost")
        for waiting in self._pending.values():
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(exc)
        self._pending.clear()
        for call in list(self._calls.values()):
            call._lose(Disconnected(f"the stream to the engine was lost; session "
                                    f"{call.session_id} follows its fallback",
                                    session_id=call.session_id))
        self._calls.clear()

    def _next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def _request(self, kind: str, msg, sid: str, cid: str) -> Ack:
        out = self._out
        if out is None:
            raise Disconnected("not connected to the engine", command_id=cid, session_id=sid)
        key = (sid, cid)
        fut = self._loop.create_future()
        # A retry of a command id still in flight waits in line: each Ack answers one.
        self._pending.setdefault(key, []).append(fut)
        out.put_nowait(mh.VendorMessage(**{kind: msg}))
        try:
            return await asyncio.wait_for(fut, self.ack_timeout)
        finally:
            waiting = self._pending.get(key)
            if waiting is not None and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self._pending[key]

    def _handle(self, msg) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "ack":
            a = msg.ack
            key = (a.session_id, a.command_id)
            waiting = self._pending.get(key)
            if not waiting:
                return
            fut = waiting.pop(0)
            if not waiting:
                del self._pending[key]
            if fut.done():
                return
            if a.code == 0:
                fut.set_result(Ack(a.command_id, a.session_id, pb.from_struct(a.result),
                                   a.duplicate))
            else:
                fut.set_exception(error_for(a.code, a.message, a.field, a.command_id,
                                            a.session_id))
        elif kind == "event":
            ev = event_from_pb(msg.event)
            if ev is None:
                return
            call = self._calls.get(msg.event.offer_id)
            if call is not None:
                call._on_event(ev)
                if self._root._event_handler is not None:
                    self._spawn(self._call_event_handler(call, ev))
        elif kind == "offer":
            info = OfferInfo.from_pb(msg.offer)
            offer = Offer(**info.__dict__)
            offer._client = self
            self._spawn(self._serve_offer(offer))
        elif kind == "offer_withdrawn":
            log.debug("offer %s withdrawn: %s", msg.offer_withdrawn.offer_id,
                      msg.offer_withdrawn.reason)
        elif kind == "cluster_nodes":
            self._root._cluster(msg.cluster_nodes.nodes)

    # -- the cluster's other nodes (discover) -----------------------------------------
    def _cluster(self, nodes) -> None:
        """Attach to every listed node not attached yet; let go of a peer the cluster no
        longer lists only while it is not attached (a live stream is never cut: it
        holds sessions)."""
        if not self.discover or self._closing:
            return
        listed = {n.node_id: n.grpc_addr for n in nodes if n.node_id and n.grpc_addr}
        self._listed = listed
        for node, addr in listed.items():
            if node == self.node_id:
                continue
            old = self.peers.get(node)
            if old is not None:
                if old.target == addr or old.registered.is_set():
                    continue
                del self.peers[node]             # back at another address
                self._spawn(old.close())
            peer = VendorClient(addr, self.module_code, self._secret, vendor=self.vendor,
                                instance=self.instance, max_sessions=self.max_sessions,
                                credentials=self.credentials,
                                secret_in_metadata=self._secret_in_metadata,
                                backoff_initial=self.backoff_initial,
                                backoff_max=self.backoff_max, ack_timeout=self.ack_timeout)
            peer._root = self
            self.peers[node] = peer
            log.info("cluster node %s at %s: attaching %s there too", node, addr,
                     self.module_code)
            peer._run_task = self._loop.create_task(self._run_peer(node, peer))
        for node, peer in list(self.peers.items()):
            if node not in listed and not peer.registered.is_set():
                log.info("cluster node %s left: no longer attaching to %s", node, peer.target)
                del self.peers[node]
                self._spawn(peer.close())

    def _keeps(self, peer: "VendorClient") -> bool:
        """Whether `peer`, whose stream just went down, should reconnect: only while the
        cluster still lists its node at its address (a node that left is let go)."""
        node = next((n for n, p in self.peers.items() if p is peer), None)
        if node is not None and self._listed.get(node) == peer.target and not self._closing:
            return True
        if node is not None:
            del self.peers[node]
            log.info("cluster node %s (%s) is listed no more: not reconnecting", node,
                     peer.target)
        return False

    async def _run_peer(self, node: str, peer: "VendorClient") -> None:
        try:
            await peer.run()
        except RegistrationError as exc:   # that node refuses what the first accepted
            log.warning("cluster node %s (%s) refused the registration: %s", node,
                        peer.target, exc)

    def _spawn(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call_event_handler(self, call: Call, ev: Event) -> None:
        try:
            r = self._root._event_handler(call, ev)
            if asyncio.iscoroutine(r):
                await r
        except Exception:
            log.exception("event handler failed")

    async def _serve_offer(self, offer: Offer) -> None:
        handler = self._root._offer_handler
        try:
            if handler is None:
                await offer.decline("no offer handler")
                return
            await handler(offer)
        except ControlLost as exc:
            log.info("session %s: %s", offer.session_id, exc)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("offer handler failed for session %s", offer.session_id)
