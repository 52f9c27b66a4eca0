"""The meter: turns the ring's record stream into segments of time in control
and counted actions.

A session's segments run from each transition's `mono_ns` to the next
transition's (or the session end's) `mono_ns`; the first one starts at the
session start's timestamp when the start record was seen. Segments are
chained, each starting exactly where the previous one ended, so those of an
ended session add up exactly to `end.mono_ns - start.mono_ns`. A timestamp that
runs backwards (which the engine never stamps) is clamped to the previous
one, so no segment is negative.

Segments are closed only by the record that ends them, so sessions still
open are carried across batches (and across restarts of the accountant, in
the ledger store's state table). Records of many sessions may interleave
freely. Each record is processed once: a record whose seq is not above the
last one seen from its node is ignored.

Engine restarts: a restarted engine never ends the sessions it had open.
When the accountant learns that a node restarted (a `{"type": "node",
"kind": "start"}` record, or a call of `close_stale`), `close_stale(node)`
closes each of that node's open sessions at the last moment the node is
known to have been alive (the largest `mono_ns` seen from it), the tightest
bound the records prove.
"""
from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["Meter", "Segment", "Action", "SessionEnd", "OpenSession"]

_ENDED_MEMORY = 65536


_new = tuple.__new__


class Segment(tuple):
    """One module's time in control of a session, closed by record `seq` of
    `node` (seq None: closed by `close_stale`). A tuple: (node, seq, session,
    account, module, level, start_mono, end_mono, start_wall, end_wall, owner),
    `owner` being the session's OpenSession, for rating."""

    __slots__ = ()
    FIELDS = ("node", "seq", "session", "account", "module", "level", "start_mono", "end_mono",
              "start_wall", "end_wall", "owner")

    def __new__(cls, node: str, seq: int | None, session: str, account: str, module: str,
                level: str, start_mono: int, end_mono: int, start_wall: int, end_wall: int,
                owner: OpenSession | None = None) -> Segment:
        return _new(cls, (node, seq, session, account, module, level, start_mono, end_mono,
                          start_wall, end_wall, owner))

    @property
    def duration_ns(self) -> int:
        """Time in control in nanoseconds."""
        return self[7] - self[6]

    @property
    def key(self) -> str:
        """The ledger's idempotency key of this segment's line."""
        if self[1] is None:
            return f"{self[0]}:stale:{self[2]}"
        return f"{self[0]}:{self[1]}"

    def __repr__(self) -> str:
        return f"Segment({self[0]}:{self[1]} {self[2]} {self[4]} {self.duration_ns}ns)"


for _i, _name in enumerate(Segment.FIELDS):
    setattr(Segment, _name, property(operator.itemgetter(_i)))
del _i, _name


class Action:
    """A counted action (api_call, message, tts_characters, recording_seconds).

    Optional, from the record: `plan` names the plan that prices it (an API
    key's); `price` makes it a fee of that many micro-units per count (an API
    key's top-up); `ledger_key` is its own idempotency key, for an action the
    engine may stamp more than once (a top-up), posted once whatever its seq.
    """

    __slots__ = ("node", "seq", "session", "account", "module", "action", "count", "wall_ns",
                 "owner", "plan", "price", "ledger_key")

    def __init__(self, node: str, seq: int, session: str, account: str, module: str,
                 action: str, count: int, wall_ns: int) -> None:
        self.node = node
        self.seq = seq
        self.session = session
        self.account = account
        self.module = module
        self.action = action
        self.count = count
        self.wall_ns = wall_ns
        self.owner: OpenSession | None = None
        self.plan: str | None = None
        self.price: int | None = None
        self.ledger_key: str | None = None

    @property
    def key(self) -> str:
        """The ledger's idempotency key of this action's line."""
        if self.ledger_key is not None:
            return self.ledger_key
        return f"{self.node}:{self.seq}"

    def __repr__(self) -> str:
        return f"Action({self.node}:{self.seq} {self.session} {self.module} {self.action}x{self.count})"


class SessionEnd:
    """A session is over: its duration (None when its start was never seen)
    and the time its segments cover."""

    __slots__ = ("node", "seq", "session", "account", "duration_ns", "metered_ns", "reason")

    def __init__(self, node: str, seq: int | None, session: str, account: str,
                 duration_ns: int | None, metered_ns: int, reason: str) -> None:
        self.node = node
        self.seq = seq
        self.session = session
        self.account = account
        self.duration_ns = duration_ns
        self.metered_ns = metered_ns
        self.reason = reason

    def __repr__(self) -> str:
        return f"SessionEnd({self.session} {self.duration_ns}ns {self.reason})"


class OpenSession:
    """A session with no end record yet, and what rating carries for it:
    `charged` (micro-units posted so far) and `usage` (base quantity per
    paying account and module so far, keyed "ACCOUNT\x1fMODULE", for tiers
    counted within a session)."""

    __slots__ = ("node", "session", "account", "start_mono", "start_wall", "module", "level",
                 "seg_mono", "seg_wall", "last_mono", "last_wall", "charged_by", "usage",
                 "metered")

    def __init__(self, node: str, session: str, account: str) -> None:
        self.node = node
        self.session = session
        self.account = account
        self.start_mono: int | None = None
        self.start_wall = 0
        self.module = ""
        self.level = ""
        self.seg_mono = 0
        self.seg_wall = 0
        self.last_mono = 0
        self.last_wall = 0
        # Micro-units posted so far, per paying account (a payer can change mid-session).
        self.charged_by: dict[str, int] = {}
        self.usage: dict[str, int] = {}
        self.metered = 0

    @property
    def charged(self) -> int:
        """Micro-units posted so far, to every payer."""
        return sum(self.charged_by.values())

    def charge(self, account: str, amount: int) -> None:
        """Micro-units posted for this session, to `account`."""
        self.charged_by[account] = self.charged_by.get(account, 0) + amount

    def dump(self) -> list[Any]:
        """The state as a list of plain values (msgpack-able)."""
        return [self.node, self.session, self.account, self.start_mono, self.start_wall,
                self.module, self.level, self.seg_mono, self.seg_wall, self.last_mono,
                self.last_wall, self.charged, self.usage, self.metered, self.charged_by]

    @classmethod
    def load(cls, data: list[Any]) -> OpenSession:
        """Rebuild an OpenSession from `dump()`."""
        o = cls(data[0], data[1], data[2])
        (o.start_mono, o.start_wall, o.module, o.level, o.seg_mono, o.seg_wall, o.last_mono,
         o.last_wall, charged, usage, o.metered) = data[3:14]
        o.usage = dict(usage)
        # A state saved before the split by payer: all of it is the payer's it names.
        o.charged_by = dict(data[14]) if len(data) > 14 else \
            ({o.account: charged} if charged else {})
        return o


class Meter:
    """Feeds on decoded ring records and returns Segment, Action and
    SessionEnd events. Single-threaded; `dirty` names the sessions whose
    state changed since `take_dirty()` so only those need persisting."""

    def __init__(self) -> None:
        self.sessions: dict[tuple[str, str], OpenSession] = {}
        self.nodes: dict[str, list[int]] = {}          # node -> [last seq, last mono, last wall]
        self.dirty: set[tuple[str, str]] = set()
        self.dirty_nodes: set[str] = set()
        self._ended: set[tuple[str, str]] = set()
        self._ended_order: deque[tuple[str, str]] = deque()
        self.skipped = 0
        self.last_record: Any = None      # the last record feed_payloads decoded

    # -- the stream ----------------------------------------------------------
    def feed(self, rec: dict[str, Any], out: list) -> None:
        """Process one record, appending the events it produces to `out`."""
        node = rec.get("node", "")
        seq = rec.get("seq")
        st = self.nodes.get(node)
        if st is None:
            st = self.nodes[node] = [0, 0, 0]
        if seq is not None:
            if seq <= st[0]:
                self.skipped += 1
                return
            st[0] = seq
            self.dirty_nodes.add(node)
        typ = rec.get("type")
        if typ == "transition":
            self._transition(node, seq, rec, st, out)
        elif typ == "action":
            sid = rec["session"]
            o = self.sessions.get((node, sid))
            wall = rec.get("wall_ns") or (o.last_wall if o is not None and o.last_wall else st[2])
            act = Action(node, seq, sid, rec.get("account", ""), rec["module"], rec["action"],
                         rec.get("count", 1), wall)
            if o is not None:
                act.owner = o
                self.dirty.add((node, sid))
            if "plan" in rec or "price" in rec or "key" in rec:
                act.plan = rec.get("plan")
                price = rec.get("price")
                if price is not None and (price.__class__ is not int or price < 0):
                    raise ValueError(f"price {price!r}: micro-units, an integer >= 0")
                act.price = price
                act.ledger_key = rec.get("key")
            out.append(act)
        elif typ == "session":
            if rec.get("kind") == "start":
                self._start(node, rec, st)
            else:
                self._end(node, seq, rec, st, out)
        elif typ == "node":
            if rec.get("kind") in ("start", "restart"):
                self.close_stale(node, out=out)
        else:
            self.skipped += 1

    def feed_payloads(self, records: Iterable[tuple[int, bytes]], node: str, out: list,
                      unpack: Callable[[bytes], Any]) -> list[tuple[int, Exception]]:
        """Decode and process ring records `(seq, payload)` in order; the ring's
        seq is the record's seq, `node` the node of records that name none.
        Appends the events to `out`; returns the records that could not be
        used, as (seq, exception), having skipped them.

        The same as `feed` on each decoded record, with the common case (a
        transition of an open session) inlined: this loop runs once per
        stamp, so it avoids the calls and the dict lookups it can.
        """
        bad: list[tuple[int, Exception]] = []
        nodes = self.nodes
        sessions = self.sessions
        dirty_add = self.dirty.add
        dirty_nodes = self.dirty_nodes
        feed = self.feed
        last_node, st, rec = None, None, None
        for seq, payload in records:
            try:
                rec = unpack(payload)
                if rec.__class__ is not dict:
                    raise ValueError("not a map")
                n = rec.get("node")
                if n is None:
                    rec["node"] = n = node
                if rec.get("type") != "transition":
                    rec["seq"] = seq
                    feed(rec, out)
                    last_node = None            # feed may add or reset node states
                    continue
                if n != last_node:
                    st = nodes.get(n)
                    if st is None:
                        st = nodes[n] = [0, 0, 0]
                    dirty_nodes.add(n)
                    last_node = n
                if seq <= st[0]:
                    self.skipped += 1
                    continue
                st[0] = seq
                mono, wall = rec["mono_ns"], rec["wall_ns"]
                if mono > st[1]:
                    st[1] = mono
                if wall > st[2]:
                    st[2] = wall
                key = (n, rec["session"])
                o = sessions.get(key)
                if o is None or not o.module:
                    self._transition(n, seq, rec, st, out)
                    continue
                dirty_add(key)
                # As in _transition, for a session that has a module in control.
                seg = o.seg_mono
                end = mono if mono > seg else seg
                out.append(_new(Segment, (n, seq, o.session, o.account, o.module, o.level,
                                          seg, end, o.seg_wall, wall, o)))
                o.metered += end - seg
                o.seg_mono = o.last_mono = end
                o.seg_wall = o.last_wall = wall
                o.module = rec["to"]
                o.level = rec.get("level", "")
                account = rec.get("account")
                if account and account != o.account:
                    o.account = account         # the payer changed, as in _transition
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                last_node = None
                bad.append((seq, exc))
        self.last_record = rec
        return bad

    def feed_many(self, records: Iterable[dict[str, Any]]) -> list:
        """Process records in order; the events they produce."""
        out: list = []
        for rec in records:
            self.feed(rec, out)
        return out

    def _see(self, st: list[int], mono: int, wall: int) -> None:
        if mono > st[1]:
            st[1] = mono
        if wall > st[2]:
            st[2] = wall

    def _open(self, node: str, sid: str, account: str) -> OpenSession | None:
        key = (node, sid)
        o = self.sessions.get(key)
        if o is None:
            if key in self._ended:
                return None            # a stray record after the end: nothing to meter
            o = self.sessions[key] = OpenSession(node, sid, account)
        self.dirty.add(key)
        return o

    def _start(self, node: str, rec: dict[str, Any], st: list[int]) -> None:
        mono, wall = rec["mono_ns"], rec["wall_ns"]
        self._see(st, mono, wall)
        o = self._open(node, rec["session"], rec.get("account", ""))
        if o is None or o.start_mono is not None:
            return
        o.start_mono, o.start_wall = mono, wall
        if not o.module:
            o.last_mono, o.last_wall = mono, wall

    def _transition(self, node: str, seq: int, rec: dict[str, Any], st: list[int],
                    out: list) -> None:
        mono, wall = rec["mono_ns"], rec["wall_ns"]
        if mono > st[1]:
            st[1] = mono
        if wall > st[2]:
            st[2] = wall
        key = (node, rec["session"])
        o = self.sessions.get(key)
        if o is None:
            o = self._open(node, key[1], rec.get("account", ""))
            if o is None:
                return
        else:
            self.dirty.add(key)
        if o.module:
            end = mono if mono > o.seg_mono else o.seg_mono
            out.append(_new(Segment, (node, seq, o.session, o.account, o.module, o.level,
                                      o.seg_mono, end, o.seg_wall, wall, o)))
            o.metered += end - o.seg_mono
            o.seg_mono, o.seg_wall = end, wall
        elif o.start_mono is not None and o.start_mono <= mono:
            # The first module's time runs from the session start, so the
            # segments cover the whole session.
            o.seg_mono, o.seg_wall = o.start_mono, o.start_wall
        else:
            o.seg_mono, o.seg_wall = mono, wall
        o.module = rec["to"]
        o.level = rec.get("level", "")
        account = rec.get("account")
        if account and account != o.account:
            # The session's payer changed (e.g. a calling card's PIN was
            # entered): the segment closed above is the old account's.
            o.account = account
        o.last_mono = mono if mono > o.seg_mono else o.seg_mono
        o.last_wall = wall

    def _end(self, node: str, seq: int | None, rec: dict[str, Any], st: list[int],
             out: list) -> None:
        mono, wall = rec["mono_ns"], rec["wall_ns"]
        self._see(st, mono, wall)
        key = (node, rec["session"])
        o = self.sessions.pop(key, None)
        self.dirty.add(key)
        self._remember_ended(key)
        if o is None:
            out.append(SessionEnd(node, seq, key[1], rec.get("account", ""), None, 0,
                                  rec.get("reason", "")))
            return
        self._close(o, seq, mono, wall, rec.get("reason", ""), out)

    def _close(self, o: OpenSession, seq: int | None, mono: int, wall: int, reason: str,
               out: list) -> None:
        end = mono
        if o.module:
            if end < o.seg_mono:
                end = o.seg_mono
            out.append(Segment(o.node, seq, o.session, o.account, o.module, o.level, o.seg_mono,
                               end, o.seg_wall, wall, o))
            o.metered += end - o.seg_mono
        duration = None
        if o.start_mono is not None:
            duration = max(end, o.start_mono) - o.start_mono
        out.append(SessionEnd(o.node, seq, o.session, o.account, duration, o.metered, reason))

    def _remember_ended(self, key: tuple[str, str]) -> None:
        if key in self._ended:
            return
        self._ended.add(key)
        self._ended_order.append(key)
        if len(self._ended_order) > _ENDED_MEMORY:
            self._ended.discard(self._ended_order.popleft())

    # -- restarts ------------------------------------------------------------
    def close_stale(self, node: str, at_mono_ns: int | None = None, at_wall_ns: int | None = None,
                    reason: str = "node-restart", out: list | None = None) -> list:
        """End every open session of `node` because its engine restarted.

        Each is closed at `at_mono_ns`, by default the largest `mono_ns` seen
        from the node (never before the session's current segment began); the
        closing segments have seq None and the key "NODE:stale:SESSION".
        Returns the events (also appended to `out` when given).
        """
        events: list = [] if out is None else out
        st = self.nodes.get(node, [0, 0, 0])
        mono = st[1] if at_mono_ns is None else at_mono_ns
        wall = st[2] if at_wall_ns is None else at_wall_ns
        for key in [k for k in self.sessions if k[0] == node]:
            o = self.sessions.pop(key)
            self.dirty.add(key)
            self._remember_ended(key)
            self._close(o, None, max(mono, o.last_mono), max(wall, o.last_wall), reason, events)
        return events

    # -- state ---------------------------------------------------------------
    def open_session(self, node: str, session: str) -> OpenSession | None:
        """The open session (node, session), or None."""
        return self.sessions.get((node, session))

    def find(self, session: str) -> OpenSession | None:
        """An open session by id, on any node."""
        for (_node, sid), o in self.sessions.items():
            if sid == session:
                return o
        return None

    def take_dirty(self) -> tuple[set[tuple[str, str]], set[str]]:
        """The session keys and nodes changed since the last call, and forget them."""
        d, n = self.dirty, self.dirty_nodes
        self.dirty, self.dirty_nodes = set(), set()
        return d, n

    def load(self, sessions: Iterable[OpenSession], nodes: dict[str, list[int]]) -> None:
        """Restore the state persisted by an earlier run."""
        for o in sessions:
            self.sessions[(o.node, o.session)] = o
        for node, st in nodes.items():
            self.nodes[node] = list(st)

    def __iter__(self) -> Iterator[OpenSession]:
        return iter(self.sessions.values())
