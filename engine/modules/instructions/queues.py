"""Named call queues (TwiML `<Enqueue>`, `<Dial><Queue>`, `<Leave>`).

Queues are per account and per engine, created on first use and dropped
when empty. They know nothing about SIP or media: a member is a session id
with a `connect` future that whoever takes the member from the queue
resolves with what it connects to, so a call-centre service can reuse them
(`Queues.take` to pick the next caller, `Queues.wait_member` to wait for one).
`verb_enqueue` and `dial_queue` are the TwiML verbs on them, run for an
instructions `Runner` (verbs.py); a connected caller and agent meet in a
private conference room (conference.py).
"""
from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from engine.modules.instructions.conference import Room, RoomFull, hold, in_room
from engine.modules.instructions.flow import STOP, Fetch
from engine.modules.instructions.parser import Verb

__all__ = ["Queues", "CallQueue", "Member", "QueueFull"]

DEFAULT_MAX_SIZE = 100


class QueueFull(Exception):
    """The queue already holds its maximum number of members."""


@dataclass(eq=False)
class Member:
    """One waiting session. `connect` resolves with whatever dequeued it."""
    session_id: str
    account: str
    queue: str
    enqueued: float = field(default_factory=time.monotonic)
    connect: asyncio.Future | None = None
    info: dict = field(default_factory=dict)

    @property
    def waited(self) -> float:
        return time.monotonic() - self.enqueued


class CallQueue:
    """One named queue: members in arrival order, plus average wait statistics."""

    def __init__(self, account: str, name: str, max_size: int = DEFAULT_MAX_SIZE):
        self.account = account
        self.name = name
        self.sid = "QU" + secrets.token_hex(16)
        self.max_size = max_size
        self.members: OrderedDict[str, Member] = OrderedDict()
        self.waiters: list[asyncio.Future] = []    # takers waiting for a member
        self.served = 0
        self.total_wait = 0.0
        self.abandoned = 0         # members that hung up while waiting
        self.pinned = False        # kept (with its statistics) even when empty

    @property
    def longest_wait(self) -> float:
        """Seconds the member at the front has waited (0 when empty)."""
        for m in self.members.values():
            return m.waited
        return 0.0

    def __len__(self) -> int:
        return len(self.members)

    @property
    def average_wait(self) -> float:
        return self.total_wait / self.served if self.served else 0.0

    def position(self, member: Member) -> int:
        """1-based position of `member`, 0 when it is no longer queued."""
        for i, sid in enumerate(self.members, 1):
            if sid == member.session_id:
                return i
        return 0

    def stats(self, member: Member | None = None) -> dict:
        """Twilio's wait parameters (QueuePosition, QueueTime, CurrentQueueSize, ...)."""
        d = {"QueueSid": self.sid, "CurrentQueueSize": len(self.members),
             "MaxQueueSize": self.max_size, "AvgQueueTime": int(self.average_wait)}
        if member is not None:
            d["QueuePosition"] = self.position(member)
            d["QueueTime"] = int(member.waited)
        return d


class Queues:
    """Every queue of one engine, by (account, name)."""

    def __init__(self):
        self.queues: dict[tuple[str, str], CallQueue] = {}

    def get(self, account: str, name: str, create: bool = False,
            max_size: int | None = None) -> CallQueue | None:
        key = (account, name)
        q = self.queues.get(key)
        if q is None and create:
            q = self.queues[key] = CallQueue(account, name, max_size or DEFAULT_MAX_SIZE)
        elif q is not None and max_size:
            q.max_size = max_size
        return q

    def enqueue(self, account: str, name: str, session_id: str,
                max_size: int | None = None, info: dict | None = None) -> Member:
        """Add a session at the back; raises QueueFull."""
        q = self.get(account, name, create=True, max_size=max_size)
        if len(q.members) >= q.max_size:
            if not q.members and not q.waiters:
                self._drop_if_empty(q)
            raise QueueFull(f"queue {name!r} is full ({q.max_size})")
        m = Member(session_id, account, name, connect=asyncio.get_running_loop().create_future(),
                   info=dict(info or {}))
        q.members[session_id] = m
        # A taker already waiting gets this member at once.
        while q.waiters:
            w = q.waiters.pop(0)
            if not w.done():
                w.set_result(None)
                break
        return m

    def take(self, account: str, name: str) -> Member | None:
        """Remove and return the member at the front, or None."""
        q = self.get(account, name)
        if q is None or not q.members:
            return None
        _, m = q.members.popitem(last=False)
        q.served += 1
        q.total_wait += m.waited
        self._drop_if_empty(q)
        return m

    async def wait_member(self, account: str, name: str, timeout: float) -> Member | None:
        """Take the front member, waiting up to `timeout` seconds for one to arrive."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.take(account, name)
            if m is not None:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            q = self.get(account, name, create=True)
            w = asyncio.get_running_loop().create_future()
            q.waiters.append(w)
            try:
                await asyncio.wait_for(w, left)
            except asyncio.TimeoutError:
                pass
            finally:
                if w in q.waiters:
                    q.waiters.remove(w)
                self._drop_if_empty(q)

    def serve(self, member: Member) -> bool:
        """Take `member` out wherever it stands and count it served (a taker
        that picks members out of order, like an agent answering)."""
        q = self.get(member.account, member.queue)
        if q is None or q.members.get(member.session_id) is not member:
            return False
        del q.members[member.session_id]
        q.served += 1
        q.total_wait += member.waited
        self._drop_if_empty(q)
        return True

    def requeue_front(self, member: Member) -> None:
        """Put a member that was taken but never connected back at the front."""
        q = self.get(member.account, member.queue, create=True)
        q.members[member.session_id] = member
        q.members.move_to_end(member.session_id, last=False)
        q.served -= 1
        q.total_wait -= member.waited
        while q.waiters:
            w = q.waiters.pop(0)
            if not w.done():
                w.set_result(None)
                break

    def leave(self, member: Member) -> bool:
        """Take `member` out (it left, hung up or failed); False if it was not queued."""
        q = self.get(member.account, member.queue)
        if q is None or q.members.get(member.session_id) is not member:
            return False
        del q.members[member.session_id]
        self._drop_if_empty(q)
        return True

    def _drop_if_empty(self, q: CallQueue) -> None:
        if not q.members and not q.waiters and not q.pinned and \
                self.queues.get((q.account, q.name)) is q:
            # Keep statistics only while the queue is in use.
            del self.queues[(q.account, q.name)]

    def snapshot(self) -> list[dict[str, Any]]:
        """Every queue's name, size and average wait (for the API)."""
        return [{"account": q.account, "name": q.name, "size": len(q.members),
                 "max_size": q.max_size, "average_wait": q.average_wait}
                for q in self.queues.values()]


# -- <Enqueue> and <Dial><Queue> (Runner `run` of verbs.py) ----------------------------


async def verb_enqueue(run, verb: Verb):
    if not run.answer():
        return STOP
    name = verb.text or str(verb.get("workflowSid"))
    queues = run.shared.queues
    account = run.session.account
    t0 = time.monotonic()
    result = "system-error"
    qsid = ""
    try:
        member = queues.enqueue(account, name, run.session.id, verb.get("maxQueueSize"))
    except QueueFull:
        result = "queue-full"
        member = None
    if member is not None:
        run.member = member
        q = queues.get(account, name)
        qsid = q.sid if q is not None else ""
        run.note("queue", {"event": "enqueued", "queue": name, "position":
                           q.position(member) if q is not None else 0})

        def stats() -> dict:
            cq = queues.get(account, name)
            return cq.stats(member) if cq is not None else {}

        wait = verb.get("waitUrl")
        how = await hold(run, run.resolve(wait) if wait else None,
                         verb.get("waitUrlMethod", "POST"), member.connect, stats)
        if not run.active:
            return STOP
        if member.connect.done() and not member.connect.cancelled():
            room: Room = member.connect.result()
            part = _join_private(run, room, member.info.get("agent", ""))
            if part is not None:
                run.participant = part
                run.note("queue", {"event": "bridged", "queue": name,
                                   "agent": member.info.get("agent", "")})
                await in_room(run, Verb("Dial", {}, "", 0), part)
                run.participant = None
                result = "bridged"
        else:
            queues.leave(member)
            result = "leave" if how == "leave" else "hangup" if how == "hangup" \
                else "system-error"
        run.member = None
    if not run.active:
        return STOP
    params = {"QueueResult": result, "QueueSid": qsid,
              "QueueTime": int(time.monotonic() - t0)}
    run.session.params["QueueResult"] = result
    run.note("queue", {"event": "result", "queue": name, "result": result})
    action = verb.get("action")
    if action:
        return Fetch(run.resolve(action), verb.get("method", "POST"), params)
    return None


def _join_private(run, room: Room, agent: str):
    try:
        return room.join(run.session.id, run.ctl.caller.channel, end_on_exit=True,
                         beep="false")
    except (RoomFull, ValueError) as exc:
        run.error({"code": 13225, "reason": f"queue connection failed: {exc}"})
        room.end()
        return None


async def dial_queue(run, verb: Verb, noun: Verb):
    if not run.answer():
        return STOP
    queues = run.shared.queues
    account = run.session.account
    timeout = float(verb.get("timeout", 30))
    deadline = run.loop.time() + timeout
    while run.active:
        member = await queues.wait_member(account, noun.text,
                                          max(0.0, deadline - run.loop.time()))
        if not run.active:
            if member is not None:
                # Taken while this call ended: the caller keeps its place.
                queues.requeue_front(member)
            return STOP
        if member is None:
            return run.dial_done(verb, "no-answer", 0, "")
        other = run.engine.sessions.get(member.session_id)
        if other is None or other.ended or member.connect.done():
            continue
        room = run.shared.rooms.private(2)
        part = room.join(run.session.id, run.ctl.caller.channel, end_on_exit=True,
                         beep="false")
        member.info["agent"] = run.session.id
        member.connect.set_result(room)
        run.participant = part
        run.note("queue", {"event": "dequeued", "queue": noun.text,
                           "caller": member.session_id})
        t0 = time.monotonic()
        await in_room(run, verb, part)
        run.participant = None
        if not run.active:
            return STOP
        return run.dial_done(verb, "completed", int(round(time.monotonic() - t0)),
                             member.session_id)
    return STOP
