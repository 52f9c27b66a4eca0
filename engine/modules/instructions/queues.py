"""Named call queues (TwiML `<Enqueue>`, `<Dial><Queue>`, `<Leave>`).

Queues are per account and per engine, created on first use and dropped
when empty. They know nothing about SIP or media: a member is a session id
with a `connect` future that whoever takes the member from the queue
resolves with what it connects to, so a call-centre service can reuse them
(`Queues.take` to pick the next caller, `Queues.wait_member` to wait for one).
"""
from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

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
