"""The engine side of vendor modules: the offer protocol and the command stream.

A vendor process attaches (control/server.py) and becomes a `VendorProcess`
of the `VendorModule` of its code, which the registry resolves like any
built-in module. When a session reaches that code, `take()` offers it to one
process (round-robin, skipping full ones); the process takes or declines it
before its deadline, else the next process is asked, then the node's
`fallback` outlet is followed. While a process holds a session, its commands
act on the session through the session's `Control`, on the engine's loop,
with no thread hop to the media; media events go back as `Event`s.

Control ends through the engine's ordinary paths (release -> outlet,
transfer, an API transition, the end of the call), all of which call
`revoke()`, which tells the process `ControlRevoked`. A process whose stream
dies loses its sessions at once: each follows its `fallback` outlet (or the
call ends), so the caller waits for nothing.

`Offers` is that protocol; `VendorModule` (control/vendor/commands.py) adds
the per-command handlers (`_cmd_<action>`) and the media they start
(`_stop_media`, `media_event`), which `Offers` calls.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import logging
import time
from typing import Any

import grpc
from google.protobuf import unknown_fields

from engine import __version__
from engine.modules.base import Module

from control import vendor_texts
from proto import pb

log = logging.getLogger("baton.control.vendor")

mh = pb.module_host_pb2

OK = 0
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]

ACK_CACHE = 50_000          # command ids remembered per module code (idempotent retries)
LOST_MEMORY = 10_000        # sessions a process remembers having lost (for clearer errors)
MAX_OUTBOX = 100_000        # messages queued for a process that does not read them

_process_ids = itertools.count(1)


class CommandError(Exception):
    """A command refused: the gRPC status code, the reason, and the field at fault."""

    def __init__(self, code: int, message: str, field: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def invalid(field: str, why: str) -> CommandError:
    return CommandError(INVALID_ARGUMENT, f"{field}: {why}", field)


def _event(session_id: str, offer_id: str, **kind) -> mh.EngineMessage:
    return mh.EngineMessage(event=mh.Event(session_id=session_id, offer_id=offer_id,
                                           time_ns=time.time_ns(), **kind))


def _ack(cid: str, sid: str, code: int, message: str = "", field: str = "",
         result: dict | None = None) -> mh.EngineMessage:
    ack = mh.Ack(command_id=cid, session_id=sid, code=code, message=message, field=field)
    if result:
        ack.result.CopyFrom(pb.to_struct(result))
    return mh.EngineMessage(ack=ack)


class _HandedOver:
    """Returned by commands that already sent their Ack."""


_HANDED_OVER = _HandedOver()


class VendorProcess:
    """One attached vendor process (one Attach stream)."""

    def __init__(self, hub, code: str, vendor: str, instance: str,
                 max_sessions: int, offer_timeout: float, peer: str = ""):
        self.hub = hub
        self.id = f"P{next(_process_ids)}"
        self.code = code
        self.vendor = vendor
        self.instance = instance
        self.peer = peer
        self.max_sessions = max_sessions
        self.offer_timeout = offer_timeout
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.held: dict[str, Any] = {}        # session id -> Control it holds
        self.offers: dict[str, Any] = {}      # offer id -> Control offered to it
        self.lost: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.closed_offers: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.closed = False
        self.module = None             # its VendorModule, once attached

    def send(self, msg: mh.EngineMessage) -> None:
        if self.closed:
            return
        self.outbox.put_nowait(msg)
        if self.outbox.qsize() > MAX_OUTBOX:
            # The process does not read its stream: treat it as gone.
            log.warning("vendor process %s is %d messages behind: detaching it", self.label(),
                        MAX_OUTBOX)
            self.hub.detach(self, "not reading")
            self.outbox.put_nowait(None)

    def full(self) -> bool:
        return bool(self.max_sessions) and len(self.held) + len(self.offers) >= self.max_sessions

    def forget_offer(self, offer_id: str, reason: str) -> None:
        self.offers.pop(offer_id, None)
        self.closed_offers[offer_id] = reason
        if len(self.closed_offers) > LOST_MEMORY:
            self.closed_offers.popitem(last=False)

    def lose(self, session_id: str, reason: str) -> None:
        self.held.pop(session_id, None)
        self.lost[session_id] = reason
        if len(self.lost) > LOST_MEMORY:
            self.lost.popitem(last=False)

    def label(self) -> str:
        return f"{self.id}({self.instance or self.peer})"


class VendorState:
    """What the vendor module keeps per Control (one offer / one period of control)."""

    __slots__ = ("offer_id", "process", "holder", "tried", "offer_timer", "offered_ns",
                 "taken_ns", "player", "player_cmd", "player_kind", "gather", "recording",
                 "recording_cmd", "conference", "tasks", "by_vendor", "resume", "prefer",
                 "media_seq", "detecting", "dtmf_out", "why", "texts")

    def __init__(self):
        self.offer_id = ""
        self.process: VendorProcess | None = None   # the process the open offer went to
        self.holder: VendorProcess | None = None    # the process that took it
        self.tried: set[str] = set()
        self.offer_timer = None
        self.offered_ns = 0
        self.taken_ns = 0
        self.player = None
        self.player_cmd = ""
        self.player_kind = ""
        self.gather = None             # a media.commands.gather.Gather
        self.recording = None
        self.recording_cmd = ""
        self.conference = None
        self.tasks: set[asyncio.Task] = set()
        self.by_vendor = False
        self.resume: dict | None = None
        self.prefer = ""
        self.media_seq = 0
        self.detecting = False
        self.dtmf_out = None
        self.why = "no-vendor-process"   # why nobody holds it, if nobody takes it
        self.texts = None                # texts that came before the Take (vendor_texts)

class Offers(Module):
    """The module behind one vendor module code: offers, take and decline, losing
    control, and the command stream with its acks (the commands: `VendorModule`)."""

    level = "service"
    outlets = ("any the node wires", "fallback")
    metered_from_take = True      # docs/vendors.md: billed "from the moment you Take"
    texting = True                # texts reach the holder as TextReceived (vendor_texts)

    def __init__(self, hub, code: str, level: str = "service"):
        super().__init__(hub.engine, {})
        self.hub = hub
        self.code = code
        self.level = level
        self.processes: list[VendorProcess] = []
        self._rr = 0
        self.acks: collections.OrderedDict = collections.OrderedDict()
        self.stats: collections.Counter = collections.Counter()

    # -- offers ---------------------------------------------------------------------
    def take(self, ctl) -> None:
        state = VendorState()
        ctl.state = state
        self.stats["sessions"] += 1
        resume = self.hub.resume.pop(ctl.session.id, None)
        if resume is not None and resume[0] == ctl.node.module:
            state.prefer, state.resume = resume[1], resume[2]
        self._offer_next(ctl)

    def _pick(self, state: VendorState) -> VendorProcess | None:
        procs = self.processes
        if state.prefer:
            for p in procs:
                if p.id == state.prefer and p.id not in state.tried and not p.full():
                    return p
        n = len(procs)
        for i in range(n):
            p = procs[(self._rr + i) % n]
            if p.id not in state.tried and not p.full():
                self._rr = (self._rr + i + 1) % max(n, 1)
                return p
        return None

    def _offer_next(self, ctl) -> None:
        state = ctl.state
        proc = self._pick(state)
        if proc is None:
            # Not from inside take(): the transition that called us is still running.
            self.engine.loop.call_soon(self._no_taker, ctl, state.why)
            return
        session = ctl.session
        node = ctl.node
        state.tried.add(proc.id)
        state.offer_id = self.hub.new_offer_id()
        state.process = proc
        state.offered_ns = time.monotonic_ns()
        proc.offers[state.offer_id] = ctl
        prev = session.history[-2].module if len(session.history) > 1 else ""
        offer = mh.Offer(
            offer_id=state.offer_id, session_id=session.id, account=session.account,
            module_code=node.module, call_params=pb.to_struct(session.params),
            module_params=pb.to_struct(ctl.params), outlets=list(node.outlets),
            events=list(node.events), reason=ctl.span.reason if ctl.span else "",
            previous_module=prev, node=node.name,
            app=session.app.name if session.app is not None else "",
            from_uri=session.from_uri, to_uri=session.to_uri, number=session.number or "",
            direction=session.direction, answered=bool(session.legs and ctl.caller.answered),
            deadline_ms=int(proc.offer_timeout * 1000))
        if state.resume is not None:
            offer.resume.CopyFrom(pb.to_struct(state.resume))
        proc.send(mh.EngineMessage(offer=offer))
        self.stats["offered"] += 1
        state.offer_timer = ctl.later(proc.offer_timeout, self._offer_expired, ctl, state.offer_id)
        self._notify(session, "offered", proc, state.offer_id)

    def _offer_expired(self, ctl, offer_id: str) -> None:
        state = ctl.state
        if state.offer_id != offer_id or state.holder is not None:
            return
        proc = state.process
        state.process = None
        if proc is not None:
            proc.forget_offer(offer_id, "expired")
            proc.send(mh.EngineMessage(offer_withdrawn=mh.OfferWithdrawn(
                offer_id=offer_id, session_id=ctl.session.id, reason="expired")))
        self.stats["expired"] += 1
        state.why = "offer-expired"
        log.info("session %s: %s did not answer offer %s in time", ctl.session.id,
                 proc.label() if proc else "?", offer_id)
        self._notify(ctl.session, "declined", proc, offer_id, "expired")
        self._offer_next(ctl)

    def _no_taker(self, ctl, why: str) -> None:
        if not ctl.active or ctl.state.holder is not None:
            return
        self.stats["fallbacks"] += 1
        self._to_fallback(ctl, why)

    def _to_fallback(self, ctl, why: str) -> None:
        """Leave through `fallback` (or end the call): nobody serves this session now."""
        session = ctl.session
        node = ctl.node
        session.params["VendorError"] = why
        if node is not None and "fallback" in node.outlets:
            session.follow("fallback", {"VendorError": why}, reason=f"fallback:{why}")
        else:
            session.end(f"vendor-{why}")

    def on_take(self, proc: VendorProcess, take) -> dict:
        ctl = self._offered(proc, take.offer_id, take.session_id, "take")
        state = ctl.state
        if state.offer_timer is not None:
            state.offer_timer.cancel()
        state.process = None
        state.holder = proc
        state.taken_ns = time.monotonic_ns()
        proc.offers.pop(take.offer_id, None)
        proc.held[ctl.session.id] = ctl
        self.stats["taken"] += 1
        waited_ms = (state.taken_ns - state.offered_ns) // 1_000_000
        self.engine.stamper.action(ctl.session, self.code, "vendor_offer_wait_ms", int(waited_ms))
        ctl.session.taken(ctl)
        self._notify(ctl.session, "taken", proc, take.offer_id)
        # After the Take's Ack: the texts that came while the offer was open.
        self.engine.loop.call_soon(self._texts_to, ctl, vendor_texts.flush(state))
        return {"session_id": ctl.session.id,
                "answered": bool(ctl.session.legs and ctl.caller.answered)}

    def on_decline(self, proc: VendorProcess, decline) -> dict:
        ctl = self._offered(proc, decline.offer_id, decline.session_id, "decline")
        state = ctl.state
        if state.offer_timer is not None:
            state.offer_timer.cancel()
        state.process = None
        proc.forget_offer(decline.offer_id, "declined")
        self.stats["declined"] += 1
        state.why = "declined"
        self._notify(ctl.session, "declined", proc, decline.offer_id, decline.reason or "declined")
        self._offer_next(ctl)
        return {}

    def _offered(self, proc: VendorProcess, offer_id: str, session_id: str, what: str):
        if not offer_id:
            raise invalid(f"{what}.offer_id", "required")
        ctl = proc.offers.get(offer_id)
        if ctl is None:
            why = proc.closed_offers.get(offer_id)
            if why is not None:
                raise CommandError(FAILED_PRECONDITION, f"offer {offer_id} is closed ({why})")
            raise CommandError(PERMISSION_DENIED, f"offer {offer_id} was not made to this process")
        if session_id and session_id != ctl.session.id:
            raise invalid(f"{what}.session_id", f"offer {offer_id} is for session {ctl.session.id}")
        if not ctl.active:
            proc.forget_offer(offer_id, "withdrawn")
            raise CommandError(FAILED_PRECONDITION, f"offer {offer_id} was withdrawn")
        return ctl

    # -- losing control -------------------------------------------------------------
    def revoke(self, ctl, reason: str) -> None:
        state = ctl.state
        if state is None:
            return
        self._stop_media(ctl, state)
        session = ctl.session
        proc = state.holder
        if proc is None:
            p = state.process
            if p is not None and state.offer_id in p.offers:
                p.forget_offer(state.offer_id, "withdrawn")
                p.send(mh.EngineMessage(offer_withdrawn=mh.OfferWithdrawn(
                    offer_id=state.offer_id, session_id=session.id,
                    reason=session.end_reason if session.ended else reason)))
            return
        control_ms = (time.monotonic_ns() - state.taken_ns) // 1_000_000
        self.engine.stamper.action(session, self.code, "vendor_control_ms", int(control_ms))
        if proc.held.get(session.id) is ctl:
            proc.lose(session.id, reason)
        if session.ended:
            proc.send(_event(session.id, state.offer_id, leg_ended=mh.LegEnded(
                leg="caller", reason=session.end_reason or reason)))
        nxt = "" if session.ended or session.module is None else session.module.code
        why = (session.end_reason or reason) if session.ended else reason
        proc.send(_event(session.id, state.offer_id, control_revoked=mh.ControlRevoked(
            reason=why, next_module=nxt, by_vendor=state.by_vendor, control_ms=control_ms)))

    def stream_lost(self, proc: VendorProcess) -> None:
        """`proc`'s stream ended: re-offer its open offers, send its sessions to fallback."""
        if proc in self.processes:
            self.processes.remove(proc)
        if self.hub.stopping:
            return
        for offer_id, ctl in list(proc.offers.items()):
            proc.forget_offer(offer_id, "stream-lost")
            state = ctl.state
            if ctl.active and state.holder is None and state.offer_id == offer_id:
                if state.offer_timer is not None:
                    state.offer_timer.cancel()
                state.process = None
                state.why = "stream-lost"
                self._offer_next(ctl)
        for sid, ctl in list(proc.held.items()):
            proc.lose(sid, "stream-lost")
            if not ctl.active:
                continue
            self.stats["lost"] += 1
            log.warning("session %s: vendor process %s of %s is gone: fallback", sid,
                        proc.label(), self.code)
            self._notify(ctl.session, "control-lost", proc, ctl.state.offer_id, "stream-lost")
            self._stop_media(ctl, ctl.state)
            self._to_fallback(ctl, "stream-lost")
    # -- commands -------------------------------------------------------------------
    def dispatch(self, proc: VendorProcess, kind: str, msg) -> None:
        """Handle a Take, Decline or Command from `proc`; exactly one Ack goes back."""
        if kind == "command":
            cid, sid = msg.command_id, msg.session_id
        else:
            cid, sid = msg.offer_id, msg.session_id
        if not cid:
            field = "command_id" if kind == "command" else f"{kind}.offer_id"
            proc.send(mh.EngineMessage(ack=mh.Ack(
                command_id=cid, session_id=sid, code=INVALID_ARGUMENT,
                message=f"{field}: required", field=field)))
            return
        # Per process instance: a reconnected process retrying gets its first Ack
        # back; another process never sees it.
        key = (proc.instance or proc.id, sid, cid)
        cached = self.acks.get(key)
        if cached is not None:
            self.stats["duplicates"] += 1
            if isinstance(cached, asyncio.Future):
                cached.add_done_callback(lambda f: self._send_duplicate(proc, f.result()))
            else:
                self._send_duplicate(proc, cached)
            return
        self.stats["commands"] += 1
        try:
            if kind == "take":
                result = self.on_take(proc, msg)
            elif kind == "decline":
                result = self.on_decline(proc, msg)
            else:
                result = self._command(proc, msg)
        except CommandError as exc:
            self._finish(proc, key, _ack(cid, sid, exc.code, exc.message, exc.field))
            return
        except Exception as exc:
            log.exception("command %s on %s failed", cid, sid)
            self._finish(proc, key, _ack(cid, sid, INTERNAL, f"internal error: {exc}"))
            return
        if result is _HANDED_OVER:
            return
        if inspect.isawaitable(result):
            fut = self.engine.loop.create_future()
            self._remember(key, fut)
            task = self.engine.loop.create_task(self._complete(proc, key, result, fut))
            ctl = proc.held.get(sid)
            if ctl is not None and ctl.state is not None:
                ctl.state.tasks.add(task)
                task.add_done_callback(ctl.state.tasks.discard)
            return
        self._finish(proc, key, _ack(cid, sid, OK, result=result))

    async def _complete(self, proc, key, awaitable, fut) -> None:
        _, sid, cid = key
        try:
            result = await awaitable
            ack = _ack(cid, sid, OK, result=result)
        except CommandError as exc:
            ack = _ack(cid, sid, exc.code, exc.message, exc.field)
        except asyncio.CancelledError:
            ack = _ack(cid, sid, FAILED_PRECONDITION,
                       f"control of session {sid} was lost before the command completed")
        except Exception as exc:
            log.exception("command %s on %s failed", cid, sid)
            ack = _ack(cid, sid, INTERNAL, f"internal error: {exc}")
        if not fut.done():
            fut.set_result(ack)
        self._finish(proc, key, ack)

    def _finish(self, proc: VendorProcess, key, ack: mh.EngineMessage) -> None:
        self._remember(key, ack)
        proc.send(ack)

    def _remember(self, key, value) -> None:
        self.acks[key] = value
        if len(self.acks) > ACK_CACHE:
            self.acks.popitem(last=False)

    @staticmethod
    def _send_duplicate(proc: VendorProcess, ack: mh.EngineMessage) -> None:
        dup = mh.EngineMessage()
        dup.CopyFrom(ack)
        dup.ack.duplicate = True
        proc.send(dup)

    def _held(self, proc: VendorProcess, sid: str):
        if not sid:
            raise invalid("session_id", "required")
        ctl = proc.held.get(sid)
        if ctl is not None and ctl.active:
            return ctl
        why = proc.lost.get(sid)
        if why is not None or ctl is not None:
            raise CommandError(FAILED_PRECONDITION,
                               f"this process no longer controls session {sid} ({why or 'ended'})")
        raise CommandError(PERMISSION_DENIED,
                           f"session {sid} was not offered to and taken by this process")

    def _command(self, proc: VendorProcess, cmd):
        ctl = self._held(proc, cmd.session_id)
        action = cmd.WhichOneof("action")
        if action is None:
            unknown = sorted({f.field_number for f in unknown_fields.UnknownFieldSet(cmd)})
            if unknown:
                # A newer proto's action: the engine lacks it, the command is not malformed.
                raise CommandError(UNIMPLEMENTED, f"action: field {unknown[0]} of Command is "
                                   f"not an action this engine knows (engine {__version__})",
                                   "action")
            raise invalid("action", "a command needs one action (answer, play, say, ...)")
        handler = getattr(self, "_cmd_" + action)
        return handler(ctl, ctl.state, proc, cmd)
    def _notify(self, session, kind: str, proc: VendorProcess | None, offer_id: str,
                reason: str = "") -> None:
        engine = self.engine
        if engine.listeners:
            engine.notify(session, kind, {"module_code": self.code, "offer_id": offer_id,
                                          "process": proc.id if proc else "",
                                          "instance": proc.instance if proc else "",
                                          "reason": reason})
