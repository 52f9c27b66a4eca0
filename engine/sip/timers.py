"""SIP timers as sorted deadline queues, one per duration.

Every SIP timer has one of a few fixed durations (T1·2^k, T4, 64·T1), so a
FIFO per duration is always sorted by deadline: arming is an append, expiry
a popleft, and nothing is cancelled — the callback checks whether the
object still is in the state that armed it (a generation number). One
periodic tick serves every timer of every transaction, instead of one
event-loop timer handle per timer.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

# RFC 3261 17.1.1.1
T1 = 0.5
T2 = 4.0
T4 = 5.0
TIMER_64T1 = 64 * T1
TICK = 0.02
_PLAIN = object()   # marks an entry armed with arm(): the callback takes only the arg


class TimerQueues:
    __slots__ = ("_queues", "_handle", "_loop", "_now", "clock", "sweepers")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, clock=time.monotonic):
        self._queues: dict[float, deque] = {}
        self._handle = None
        self._loop = loop
        self.clock = clock
        self.sweepers: list = []    # callables(now) run at every tick, before the timers

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle = loop.call_later(TICK, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def arm(self, duration: float, callback, arg) -> None:
        """Call `callback(arg)` once `duration` seconds have passed."""
        q = self._queues.get(duration)
        if q is None:
            q = self._queues[duration] = deque()
        q.append((self.clock() + duration, callback, _PLAIN, arg))

    def arm_method(self, duration: float, function, obj, arg) -> None:
        """Call `function(obj, arg)` once `duration` seconds have passed.

        The same as arm(duration, obj.method, arg) without a bound method per
        timer: one allocation less, and one object less for the garbage
        collector to walk while the timer waits (up to 64*T1)."""
        q = self._queues.get(duration)
        if q is None:
            q = self._queues[duration] = deque()
        q.append((self.clock() + duration, function, obj, arg))

    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def run_expired(self) -> None:
        now = self.clock()
        for sweep in self.sweepers:
            sweep(now)
        for q in list(self._queues.values()):
            while q and q[0][0] <= now:
                _, callback, obj, arg = q.popleft()
                try:
                    if obj is _PLAIN:
                        callback(arg)
                    else:
                        callback(obj, arg)
                except Exception:  # one bad timer must not stop the others
                    loop = self._loop
                    if loop is not None:
                        loop.call_exception_handler({
                            "message": "SIP timer callback failed",
                            "exception": __import__("sys").exc_info()[1],
                        })
                    else:
                        raise

    def _tick(self) -> None:
        try:
            self.run_expired()
        finally:
            if self._handle is not None:
                self._handle = self._loop.call_later(TICK, self._tick)
