"""The engine side of vendor modules: a `Module` per module code, served by Attach streams.

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
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import unknown_fields

from engine import __version__
from engine.sessions import apps as apps_mod
from engine.sessions.apps import Node
from engine.media.commands import digits as dtmf_out
from engine.media.commands import gather as gathering
from engine.media.commands.digits import EVENTS as DTMF_KEYS
from engine.media.commands.urlaudio import PcmCache
from engine.media.files import NO_SUCH_FILE, confine, recording_path
from engine.modules.base import Module, answer_caller
from engine.modules.dialing import OutboundDenied, operator_params, permit
from engine.sip.uri import check_user_part, sip_uri

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

DIAL_OUTLETS = (("done", "completed"), ("busy", "busy"), ("no-answer", "no-answer"),
                ("failed", "failed"))
ACK_CACHE = 50_000          # command ids remembered per module code (idempotent retries)
LOST_MEMORY = 10_000        # sessions a process remembers having lost (for clearer errors)
MAX_OUTBOX = 100_000        # messages queued for a process that does not read them
URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")   # RFC 3986 3.1

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


def _caller_params(params: dict, field: str) -> dict:
    """Params a vendor passes on: never the operator's own (a trunk, a sounds
    directory, timeouts), refused with PERMISSION_DENIED naming them."""
    bad = operator_params(params)
    if bad:
        raise CommandError(PERMISSION_DENIED, f"{field}: operator-only parameters: "
                                              f"{', '.join(bad)}", field)
    return params


def _permit(engine, session, to: str, trunk: str | None, vendor: str) -> None:
    """A dial the vendor and the session's account may both place, else
    PERMISSION_DENIED naming the destination."""
    try:
        permit(engine, session.account, to, trunk, vendor=vendor, count=False)
    except OutboundDenied as exc:
        raise CommandError(PERMISSION_DENIED, f"dial {to}: {exc}", "dial.to") from None


class VendorProcess:
    """One attached vendor process (one Attach stream)."""

    def __init__(self, hub: "ControlHub", code: str, vendor: str, instance: str,
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
        self.module: VendorModule | None = None

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
        self.gather: gathering.Gather | None = None
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


class VendorModule(Module):
    """The module behind one vendor module code: offers, commands, events."""

    level = "service"
    outlets = ("any the node wires", "fallback")
    metered_from_take = True      # docs/vendors.md: billed "from the moment you Take"
    texting = True                # texts reach the holder as TextReceived (vendor_texts)

    def __init__(self, hub: "ControlHub", code: str, level: str = "service"):
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

    def _stop_media(self, ctl, state: VendorState) -> None:
        """Let go of everything this module started on the caller's channel."""
        for t in list(state.tasks):
            t.cancel()
        state.tasks.clear()
        g, state.gather = state.gather, None
        if g is not None:
            g.on_done = None
            g.stop()
        rec = state.recording
        if rec is not None and not rec.finished:
            rec.on_done = None
            rec.stop("stopped")
        state.recording = None
        leg = ctl.session.legs[0] if ctl.session.legs else None
        ch = leg.channel if leg is not None else None
        if state.conference is not None:
            self.hub.leave_conference(ctl.session.id, ch, state.conference)
            state.conference = None
        if ch is not None:
            if state.player is not None and ch.player is state.player:
                ch.silence()
            if state.detecting and ch.detecting:
                ch.detect_dtmf(False)
        state.player = None
        state.detecting = False

    # -- texts ------------------------------------------------------------------------
    def on_text(self, ctl, m) -> None:
        state = ctl.state
        if state is None:
            return
        if state.holder is None:
            vendor_texts.keep(state, m)
        else:
            self._texts_to(ctl, [m])

    def _texts_to(self, ctl, texts: list) -> None:
        state = ctl.state
        if not ctl.active or state is None or state.holder is None:
            return
        for m in texts:
            ev = vendor_texts.received(m)
            ev.session_id, ev.offer_id, ev.time_ns = ctl.session.id, state.offer_id, m.created_wall_ns
            state.holder.send(mh.EngineMessage(event=ev))

    def _cmd_send_message(self, ctl, state, proc, cmd):
        body, to, frm = vendor_texts.check(self.engine, cmd, invalid)
        offer_id, cid = state.offer_id, cmd.command_id
        queued: list = []

        def on_status(m):
            if not queued:
                return          # refused at once: the Ack says so
            ev = vendor_texts.status_event(cid, m)
            ev.session_id, ev.offer_id, ev.time_ns = ctl.session.id, offer_id, m.updated_wall_ns
            proc.send(mh.EngineMessage(event=ev))
        m = self.engine.messaging.send(ctl.session, body, to=to, frm=frm, on_status=on_status)
        if m.status == "failed":
            raise CommandError(PERMISSION_DENIED, f"send_message.to: {m.error}", "send_message.to")
        queued.append(m)
        return {"message_sid": m.sid, "status": m.status}

    # -- media events ---------------------------------------------------------------
    def media_event(self, ctl, leg, kind: str, detail) -> None:
        state = ctl.state
        if state is None or state.holder is None or leg is not ctl.caller:
            return
        proc = state.holder
        sid = ctl.session.id
        if kind == "dtmf":
            proc.send(_event(sid, state.offer_id, dtmf=mh.Dtmf(digit=detail)))
            rec = state.recording
            if rec is not None and rec.media_event(kind, detail):
                return
            if state.gather is not None:
                self._gather_digit(ctl, state, detail)
            return
        if kind == "play-done":
            rec = state.recording
            if rec is not None and rec.media_event(kind, detail):
                return   # the recording's beep
            ch = leg.channel
            if state.player is not None and (ch is None or ch.player is not state.player):
                cmd, what = state.player_cmd, state.player_kind
                state.player = None
                if what == "gather" and state.gather is not None:
                    state.gather.arm()
                elif what == "play":
                    proc.send(_event(sid, state.offer_id, playback_finished=mh.PlaybackFinished(
                        command_id=cmd)))
            return
        if state.recording is not None:
            state.recording.media_event(kind, detail)

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

    # -- media helpers --------------------------------------------------------------
    def _channel(self, ctl, state: VendorState, proc: VendorProcess):
        """The caller's channel on the media clock, answering the call first if needed."""
        leg = ctl.caller
        was = leg.answered
        if not answer_caller(ctl):
            raise CommandError(FAILED_PRECONDITION,
                               "the call could not be answered (unusable SDP offer or no RTP "
                               "ports left); it has ended")
        if not was and leg.answered:
            proc.send(_event(ctl.session.id, state.offer_id,
                             leg_answered=mh.LegAnswered(leg="caller")))
        ch = leg.channel
        if ch is None:
            raise CommandError(FAILED_PRECONDITION,
                               "the caller's media address is not known yet (late SDP offer)")
        neg = leg.negotiated
        if neg is not None and neg.dtmf_pt is None and not ch.detecting:
            ch.detect_dtmf(True)  # no RFC 4733 from this caller: listen for tones
            state.detecting = True
        return ch

    def _start_player(self, ctl, state: VendorState, proc: VendorProcess, pcm, loops: int,
                      cmd_id: str, kind: str) -> None:
        from ext.kernels import rtp

        ch = self._channel(ctl, state, proc)
        self._interrupt_player(ctl, state, proc, ch)
        if state.conference is not None:
            self.hub.leave_conference(ctl.session.id, ch, state.conference)
            state.conference = None
        player = rtp.Player(pcm, loops)
        ch.play(player)
        state.player, state.player_cmd, state.player_kind = player, cmd_id, kind
        trace = self.hub.trace
        if trace is not None:
            trace("media", ctl.session.id, cmd_id, time.monotonic_ns())

    def _interrupt_player(self, ctl, state: VendorState, proc: VendorProcess, ch) -> None:
        if state.player is not None and ch is not None and ch.player is state.player:
            ch.silence()
            if state.player_kind == "play":
                proc.send(_event(ctl.session.id, state.offer_id,
                                 playback_finished=mh.PlaybackFinished(
                                     command_id=state.player_cmd, interrupted=True)))
        state.player = None

    def _files_dir(self, vendor: str) -> str:
        v = self.engine.cfg.raw.get("vendors", {}).get(vendor, {})
        d = v.get("files_dir") if isinstance(v, dict) else None
        return d or os.path.join(self.engine.cfg.data_dir, "vendors", vendor)

    def _pcm_now(self, url: str, vendor: str):
        """(pcm, None) when `url` is a file whose audio is cached, else (None, awaitable)."""
        if url.lower().startswith(("http://", "https://")):
            pcm = self.hub.url_audio().cached(url)
            return (pcm, None) if pcm is not None else (None, self._fetch_url(url))
        scheme = URL_SCHEME.match(url)
        if scheme is not None:
            raise invalid("play.url", f"{scheme.group(1)}: URLs are not played; a file path "
                                      "or an http(s) URL is required")
        # A vendor reads its own directory only; outside it, missing and unreadable are
        # one answer, so a play cannot probe the machine's files.
        path = confine(url, [self._files_dir(vendor)])
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        if st is None:
            raise CommandError(NOT_FOUND, f"play.url: {NO_SUCH_FILE}", "play.url")
        key = (path, st.st_mtime_ns, st.st_size)
        pcm = self.hub.pcm_get(key)
        if pcm is not None:
            return pcm, None
        return None, self._load_file(path, key)

    async def _load_file(self, path: str, key):
        from engine.media import audio

        try:
            pcm = await audio.load_wav(path)
        except audio.AudioError as exc:
            raise invalid("play.url", f"not a playable WAV: {exc}") from None
        self.hub.pcm_put(key, pcm)
        return pcm

    async def _fetch_url(self, url: str):
        from engine.media import audio
        from engine.modules.instructions.fetch import FetchError
        from engine.modules.instructions.verbs import shared_for

        try:
            return await self.hub.url_audio().load(url)
        except audio.AudioError as exc:
            raise invalid("play.url", f"not a playable WAV: {exc}") from None
        except FetchError as exc:
            raise CommandError(FAILED_PRECONDITION, f"play.url: cannot fetch: {exc.reason}",
                               "play.url") from None

    async def _speech(self, ctl, text: str, voice: str, field: str):
        from engine.media import audio

        try:
            pcm = await self.engine.speech.say(text, voice=voice or "en")
        except audio.AudioError as exc:
            msg = str(exc)
            f = f"{field}.voice" if "voice" in msg else f"{field}.text"
            raise invalid(f, msg) from None
        self.engine.stamper.action(ctl.session, self.code, "tts_characters", len(text))
        return pcm

    def _media(self, ctl, state, proc, cmd_id: str, kind: str, loops: int, pcm, pending):
        """Start a player now, or once `pending` (an awaitable of PCM) is ready."""
        state.media_seq += 1
        if pending is None:
            self._start_player(ctl, state, proc, pcm, loops, cmd_id, kind)
            return {"playing": True}
        seq = state.media_seq

        async def later():
            data = await pending
            if not ctl.active:
                raise CommandError(FAILED_PRECONDITION, "control was lost while loading audio")
            if state.media_seq != seq:
                return {"playing": False, "superseded": True}
            self._start_player(ctl, state, proc, data, loops, cmd_id, kind)
            return {"playing": True}
        return later()

    # -- the commands -----------------------------------------------------------------
    def _cmd_answer(self, ctl, state, proc, cmd):
        self._channel(ctl, state, proc)
        return {"answered": True}

    def _cmd_play(self, ctl, state, proc, cmd):
        p = cmd.play
        if not p.url.strip():
            raise invalid("play.url", "a file path or http(s) URL is required")
        self._channel(ctl, state, proc)
        pcm, pending = self._pcm_now(p.url.strip(), proc.vendor)
        return self._media(ctl, state, proc, cmd.command_id, "play", _loops(p.loop), pcm, pending)

    def _cmd_say(self, ctl, state, proc, cmd):
        s = cmd.say
        if not s.text.strip():
            raise invalid("say.text", "text to say is required")
        self._channel(ctl, state, proc)
        return self._media(ctl, state, proc, cmd.command_id, "play", _loops(s.loop), None,
                           self._speech(ctl, s.text, s.voice, "say"))

    def _cmd_stop_media(self, ctl, state, proc, cmd):
        ch = ctl.caller.channel
        state.media_seq += 1
        self._interrupt_player(ctl, state, proc, ch)
        g = state.gather
        if g is not None:
            g.stop()
        rec = state.recording
        if rec is not None and not rec.finished:
            rec.stop("stopped")
        return {}

    def _cmd_gather(self, ctl, state, proc, cmd):
        g = cmd.gather
        if g.timeout < 0 or g.timeout > 3600:
            raise invalid("gather.timeout", "seconds between 0 and 3600")
        if g.num_digits > 128:
            raise invalid("gather.num_digits", "at most 128")
        finish = g.finish_on_key if g.finish_on_key else "#"
        if finish == "none":
            finish = ""
        if any(c not in DTMF_KEYS for c in finish):
            raise invalid("gather.finish_on_key", f"keys among {DTMF_KEYS} (or 'none')")
        which = g.WhichOneof("prompt")
        if which == "say" and not g.say.text.strip():
            raise invalid("gather.say.text", "text to say is required")
        if which == "play" and not g.play.url.strip():
            raise invalid("gather.play.url", "a file path or http(s) URL is required")
        self._channel(ctl, state, proc)
        if state.gather is not None:
            state.gather.stop()
        cid = cmd.command_id
        gather = gathering.Gather(ctl.later, num_digits=int(g.num_digits),
                                  finish_on_key=finish, timeout=g.timeout or 5.0,
                                  on_done=lambda done: self._gather_done(ctl, state, done, cid))
        state.gather = gather
        if which is None:
            # No prompt: whatever plays now goes on while digits are collected.
            gather.arm()
            return {"armed": True}
        if which == "say":
            pcm, pending = None, self._speech(ctl, g.say.text, g.say.voice, "gather.say")
            loops = _loops(g.say.loop)
        else:
            try:
                pcm, pending = self._pcm_now(g.play.url.strip(), proc.vendor)
            except CommandError as exc:
                state.gather = None
                raise CommandError(exc.code, "gather." + exc.message, "gather.play.url") from None
            loops = _loops(g.play.loop)
        started = self._media(ctl, state, proc, cmd.command_id, "gather", loops, pcm, pending)
        if inspect.isawaitable(started):
            async def armed():
                try:
                    r = await started
                except BaseException:
                    if state.gather is gather:
                        state.gather = None
                    raise
                if r.get("superseded") and state.gather is gather:
                    gather.arm()
                return {"armed": True}
            return armed()
        return {"armed": True}

    def _gather_digit(self, ctl, state: VendorState, digit: str) -> None:
        ch = ctl.caller.channel
        if state.player is not None and state.player_kind == "gather" and ch is not None \
                and ch.player is state.player:
            ch.silence()   # barge-in
            state.player = None
        state.gather.key(digit)

    def _gather_done(self, ctl, state: VendorState, g: gathering.Gather, cid: str) -> None:
        if state.gather is g:
            state.gather = None
        ch = ctl.caller.channel
        if state.player is not None and state.player_kind == "gather" and ch is not None \
                and ch.player is state.player:
            ch.silence()
            state.player = None
        ctl.session.params["Digits"] = g.digits
        if state.holder is not None:
            state.holder.send(_event(ctl.session.id, state.offer_id, gather_result=mh.GatherResult(
                command_id=cid, digits=g.digits, reason=g.reason)))

    def _cmd_record(self, ctl, state, proc, cmd):
        from engine.media.recording import Recording

        r = cmd.record
        max_length = r.max_length or 120.0
        if not 0 < max_length <= 3600:
            raise invalid("record.max_length", "seconds between 0 and 3600")
        silence = r.silence if r.HasField("silence") else 5.0
        if silence < 0:
            raise invalid("record.silence", "seconds, 0 for no silence detection")
        finish = r.finish_on_key if r.finish_on_key else "#"
        if finish == "none":
            finish = ""
        if any(c not in DTMF_KEYS for c in finish):
            raise invalid("record.finish_on_key", f"keys among {DTMF_KEYS} (or 'none')")
        ch = self._channel(ctl, state, proc)
        state.media_seq += 1
        self._interrupt_player(ctl, state, proc, ch)
        if state.recording is not None and not state.recording.finished:
            state.recording.on_done = None
            state.recording.stop("stopped")
        session = ctl.session
        self.stats["recordings"] += 1
        path = recording_path(self.engine.cfg.data_dir, session.account)
        cid = cmd.command_id

        def done(result: dict) -> None:
            if state.recording is rec:
                state.recording = None
            self.engine.stamper.action(session, self.code, "recording_seconds",
                                       int(round(result["duration"])))
            session.params["RecordingPath"] = result["path"]
            session.params["RecordingDuration"] = result["duration"]
            if ctl.active and state.holder is not None:
                state.holder.send(_event(session.id, state.offer_id,
                                         recording_ready=mh.RecordingReady(
                                             command_id=cid, path=result["path"],
                                             duration=result["duration"],
                                             reason=result["reason"], digits=result["digits"])))

        rec = Recording(ctl.caller, path, max_length=max_length, silence=silence,
                        finish_on_key=finish, beep=r.beep if r.HasField("beep") else True,
                        trim=r.trim if r.HasField("trim") else True, on_done=done)
        state.recording = rec
        state.recording_cmd = cid
        rec.start()
        return {"path": path}

    def _cmd_dial(self, ctl, state, proc, cmd):
        d = cmd.dial
        to = d.to.strip()
        cfg = self.engine.cfg
        if not to:
            raise invalid("dial.to", "a SIP URI (or a number with a trunk) is required")
        if d.trunk and d.trunk not in cfg.trunks:
            raise invalid("dial.trunk", f"no trunk {d.trunk!r} in the engine's config")
        if not d.trunk and not to.lower().startswith(("sip:", "sips:")):
            raise invalid("dial.to", "must be a sip: or sips: URI unless a trunk is given")
        try:
            if d.trunk:
                check_user_part(to[4:] if to.startswith("tel:") else to, "dial.to")
            else:
                sip_uri(to, "dial.to")
            if d.caller_id:
                check_user_part(d.caller_id, "dial.caller_id")
        except ValueError as exc:
            field, _, why = str(exc).partition(": ")
            raise invalid(field, why) from None
        if d.timeout < 0 or d.timeout > 600:
            raise invalid("dial.timeout", "seconds between 0 and 600")
        if d.time_limit < 0:
            raise invalid("dial.time_limit", "seconds, 0 for no limit")
        node = ctl.node
        session = ctl.session
        _permit(self.engine, session, to, d.trunk or None, proc.vendor)
        back: dict = {}
        for outlet, status in DIAL_OUTLETS:
            # Each outcome comes back to this module code as the same node, so the
            # vendor's outlets (and fallback) still hold after the call.
            back[outlet] = Node(name=node.name, module=node.module,
                                params={**node.params, "DialCallStatus": status, "DialTo": to},
                                outlets=node.outlets, events=node.events, app=node.app)
        if "fallback" in node.outlets:
            back["fallback"] = node.outlets["fallback"]
        params: dict = {"to": to, "timeout": d.timeout or 30}
        if d.trunk:
            params["trunk"] = d.trunk
        if d.caller_id:
            params["caller_id"] = d.caller_id
        if d.time_limit:
            params["time_limit"] = d.time_limit
        bridge = Node(name=f"dial:{node.name}", module="baton.bridge", params=params,
                      outlets=back, events={"dialled-hangup": back["done"]}, app=node.app)
        self.hub.remember_resume(session.id, node.module, proc.id, pb.from_struct(d.resume))
        self._hand_over(ctl, state, proc, cmd, lambda: session.transition(bridge, "dial"))
        return _HANDED_OVER

    def _cmd_enqueue(self, ctl, state, proc, cmd):
        e = cmd.enqueue
        if not e.queue:
            raise invalid("enqueue.queue", "a queue name is required")
        service = getattr(self.engine, "callcentre", None)
        if service is None or not hasattr(service, "enqueue"):
            raise CommandError(UNIMPLEMENTED, "enqueue: the call-centre service is not running "
                                              "on this engine")
        state.by_vendor = True
        return service.enqueue(ctl, e.queue, e.priority) or {}

    def _cmd_join_conference(self, ctl, state, proc, cmd):
        j = cmd.join_conference
        name = j.name.strip()
        if not name or len(name) > 128:
            raise invalid("join_conference.name", "a name of 1 to 128 characters is required")
        ch = self._channel(ctl, state, proc)
        state.media_seq += 1
        self._interrupt_player(ctl, state, proc, ch)
        if state.conference is not None:
            self.hub.leave_conference(ctl.session.id, ch, state.conference)
            state.conference = None
        key = (ctl.session.account, name)
        size = self.hub.join_conference(ctl.session.id, ch, key, j.muted, j.listen_only)
        state.conference = key
        return {"conference": name, "participants": size}

    def _cmd_send_digits(self, ctl, state, proc, cmd):
        s = cmd.send_digits
        digits = s.digits.upper()
        if not dtmf_out.valid(digits):
            raise invalid("send_digits.digits", f"digits among {DTMF_KEYS} and w (pause)")
        duration = s.duration_ms or 100
        if not 40 <= duration <= 2000:
            raise invalid("send_digits.duration_ms", "between 40 and 2000")
        gap = s.gap_ms or 60
        if gap > 2000:
            raise invalid("send_digits.gap_ms", "at most 2000")
        ch = self._channel(ctl, state, proc)
        if state.dtmf_out is not None and not state.dtmf_out.done():
            raise CommandError(FAILED_PRECONDITION, "digits are still being sent on this session")
        if not dtmf_out.rfc4733(ch):
            # No telephone-event negotiated: in-band tones through the player.
            pcm = dtmf_out.tones(digits, duration, gap)
            self._start_player(ctl, state, proc, pcm, 1, cmd.command_id, "digits")
            return {"method": "inband", "digits": digits}
        task = self._send_rfc4733(ch, digits, duration, gap)
        state.dtmf_out = task
        return task

    async def _send_rfc4733(self, ch, digits: str, duration_ms: int, gap_ms: int) -> dict:
        await dtmf_out.send_events(ch, digits, duration_ms, gap_ms)
        return {"method": "rfc4733", "digits": digits}

    def _cmd_set_value(self, ctl, state, proc, cmd):
        v = cmd.set_value
        if not v.key or len(v.key) > 256:
            raise invalid("set_value.key", "a key of 1 to 256 characters is required")
        ctl.session.params[v.key] = pb.from_value(v.value) if v.HasField("value") else None
        return {}

    def _cmd_hangup(self, ctl, state, proc, cmd):
        reason = cmd.hangup.reason or "vendor-hangup"
        self._hand_over(ctl, state, proc, cmd, lambda: ctl.session.end(reason))
        return _HANDED_OVER

    def _cmd_transfer(self, ctl, state, proc, cmd):
        t = cmd.transfer
        target = t.target.strip()
        if not target:
            raise invalid("transfer.target", "a module code, node, URI or 'hangup' is required")
        params = _caller_params(pb.from_struct(t.params), "transfer.params")
        node = apps_mod.resolve(ctl.session.app, target, params)
        if node is None:
            raise invalid("transfer.target", f"{target!r} is neither a node of the app nor a "
                                             "module code or URI")
        app = ctl.session.app
        if isinstance(node, Node) and (app is None or target not in app.nodes) \
                and node.module == target.removeprefix("module:"):
            # A bare module code has no outlets of its own: it leaves through the calling
            # node's, so its release("done") goes on with the app as this node's would.
            node = Node(name=node.name, module=node.module, params=node.params,
                        outlets=ctl.node.outlets, events=ctl.node.events, app=node.app)
        if isinstance(node, Node) and node.module == "baton.bridge" and node.params.get("to"):
            _permit(self.engine, ctl.session, str(node.params["to"]),
                    node.params.get("trunk"), proc.vendor)
        self._hand_over(ctl, state, proc, cmd,
                        lambda: ctl.session.transition(node, "transfer"))
        return _HANDED_OVER

    def _cmd_release(self, ctl, state, proc, cmd):
        r = cmd.release
        outlet = r.outlet.strip()
        if not outlet:
            raise invalid("release.outlet", "an outlet name is required (e.g. done)")
        params = _caller_params(pb.from_struct(r.params), "release.params")
        self._hand_over(ctl, state, proc, cmd,
                        lambda: ctl.session.follow(outlet, params, reason=f"outlet:{outlet}"))
        return _HANDED_OVER

    def _hand_over(self, ctl, state, proc, cmd, act: Callable[[], None]) -> None:
        """Ack first, then let control go: the Ack precedes ControlRevoked on the stream."""
        state.by_vendor = True
        key = (proc.instance or proc.id, cmd.session_id, cmd.command_id)
        self._finish(proc, key, _ack(cmd.command_id, cmd.session_id, OK))
        act()

    def _notify(self, session, kind: str, proc: VendorProcess | None, offer_id: str,
                reason: str = "") -> None:
        engine = self.engine
        if engine.listeners:
            engine.notify(session, kind, {"module_code": self.code, "offer_id": offer_id,
                                          "process": proc.id if proc else "",
                                          "instance": proc.instance if proc else "",
                                          "reason": reason})


class _HandedOver:
    """Returned by commands that already sent their Ack."""


_HANDED_OVER = _HandedOver()


def _loops(n: int) -> int:
    """The proto's loop (0/unset: once, negative: forever) as rtp.Player's (0: forever)."""
    if n == 0:
        return 1
    return 0 if n < 0 else n


def _ack(cid: str, sid: str, code: int, message: str = "", field: str = "",
         result: dict | None = None) -> mh.EngineMessage:
    ack = mh.Ack(command_id=cid, session_id=sid, code=code, message=message, field=field)
    if result:
        ack.result.CopyFrom(pb.to_struct(result))
    return mh.EngineMessage(ack=ack)


class ControlHub:
    """Every vendor module code of the engine, conferences, and shared caches."""

    def __init__(self, engine, authority):
        self.engine = engine
        self.authority = authority
        self.modules: dict[str, VendorModule] = {}
        self.processes: dict[str, VendorProcess] = {}
        self.conferences: dict[tuple, list] = {}      # (account, name) -> [Conference, count]
        self.resume: dict[str, tuple] = {}            # session id -> (code, process id, dict)
        self._offer_ids = itertools.count(1)
        self._prefix = os.urandom(2).hex()
        self._pcm = PcmCache()      # WAV files played by path
        self.stopping = False
        # A benchmark hook: trace(what, session_id, command_id, monotonic_ns) when media starts.
        self.trace: Callable[[str, str, str, int], None] | None = None

    def new_offer_id(self) -> str:
        return f"O{self._prefix}{next(self._offer_ids):x}"

    def module_for(self, code: str) -> VendorModule:
        m = self.modules.get(code)
        if m is None:
            entry = self.engine.cfg.modules.get(code, {})
            m = VendorModule(self, code, entry.get("level", "service"))
            self.modules[code] = m
        return m

    def attach(self, proc: VendorProcess) -> VendorModule:
        m = self.module_for(proc.code)
        proc.module = m
        m.processes.append(proc)
        self.processes[proc.id] = proc
        self.engine.registry.vendors[proc.code] = m
        log.info("vendor %s attached %s for %s (%d process(es))", proc.vendor, proc.label(),
                 proc.code, len(m.processes))
        return m

    def detach(self, proc: VendorProcess, why: str = "stream-lost") -> None:
        if proc.closed:
            return
        proc.closed = True
        self.processes.pop(proc.id, None)
        m = proc.module
        if m is None:
            return
        m.stream_lost(proc)
        if not m.processes and self.engine.registry.vendors.get(proc.code) is m:
            # Nobody serves the code now: new sessions follow their fallback outlet.
            del self.engine.registry.vendors[proc.code]
        log.info("vendor process %s of %s detached (%s)", proc.label(), proc.code, why)

    def cost_warning(self, session_id: str, cost_micros: int, currency: str,
                     threshold_micros: int) -> bool:
        """Tell the vendor process holding `session_id` that its running cost crossed
        `threshold` (the accountant's hook); amounts in integer micro-units, never
        floats. False when no vendor process holds it."""
        from engine.accounting.service import money_pb

        for micros in (cost_micros, threshold_micros):
            if not isinstance(micros, int) or isinstance(micros, bool):
                raise TypeError(f"cost_warning: amounts are int micro-units, not "
                                f"{type(micros).__name__}")
        for proc in list(self.processes.values()):
            ctl = proc.held.get(session_id)
            if ctl is not None and ctl.active:
                proc.send(_event(session_id, ctl.state.offer_id, cost_warning=mh.CostWarning(
                    currency=currency, cost=money_pb(cost_micros, currency),
                    threshold=money_pb(threshold_micros, currency))))
                return True
        return False

    def remember_resume(self, sid: str, code: str, proc_id: str, state: dict) -> None:
        if len(self.resume) > 1000:
            live = self.engine.sessions
            for k in [k for k in self.resume if k not in live]:
                del self.resume[k]
        self.resume[sid] = (code, proc_id, state or None)

    # -- cached audio ---------------------------------------------------------------
    def pcm_get(self, key):
        return self._pcm.get(key)

    def pcm_put(self, key, pcm) -> None:
        self._pcm.put(key, pcm)

    def url_audio(self):
        """The engine's one URL audio fetcher and cache (engine/media/commands/urlaudio.py),
        held by the instructions module's HTTP client, so its checks apply to vendors too."""
        from engine.modules.instructions import shared_for

        return shared_for(self.engine).fetcher.audio

    # -- conferences ----------------------------------------------------------------
    def join_conference(self, sid: str, ch, key: tuple, muted: bool, listen_only: bool) -> int:
        from ext.kernels import rtp
        Conference = rtp.Conference

        entry = self.conferences.get(key)
        if entry is None:
            entry = self.conferences[key] = [Conference(256), 0]
        conf = entry[0]
        try:
            slot = conf.add(sid, "pcm", muted, listen_only)
        except ValueError as exc:
            if entry[1] == 0:
                del self.conferences[key]
            raise CommandError(FAILED_PRECONDITION, f"join_conference: {exc}") from None
        entry[1] += 1
        self.engine.media.clock.join(ch, conf, slot)
        return entry[1]

    def leave_conference(self, sid: str, ch, key: tuple) -> None:
        entry = self.conferences.get(key)
        if entry is None:
            return
        conf = entry[0]
        if ch is not None and ch.conference is conf:
            self.engine.media.clock.leave(ch)
        if sid in conf:
            conf.remove(sid)
            entry[1] -= 1
        if entry[1] <= 0:
            del self.conferences[key]
