"""Collecting DTMF keys: one implementation behind <Gather>, the vendor `gather`
command and the service modules' prompts.

A `Gather` ends, exactly once, with `on_done(gather)`:
- `num-digits`  when `num_digits` keys were collected (0: no limit);
- `finish-key`  on a key of `finish_on_key` (the key is not among the digits);
- `timeout`     `timeout` seconds after the prompt ended (`arm()`) or after the last key;
- `stopped`     when the front-end stops it (another command, control leaving).
The clock starts at `arm()`, not at creation: while a prompt plays, the caller
is not yet late. The front-end plays the prompt and stops it on the first key
(barge-in) if it wants to.
"""
from __future__ import annotations

from collections.abc import Callable

NUM_DIGITS = "num-digits"
FINISH_KEY = "finish-key"
TIMEOUT = "timeout"
STOPPED = "stopped"


class Gather:
    """One collection of keys on one leg (see the module docstring).

    `later(seconds, fn, *args)` makes a cancellable timer (a `Control.later`, so no
    timer fires once control has left). With `leading_finish=False` a finish key
    before any digit is ignored: it is the tail of the previous entry (`11#` where
    two digits were already enough), not an empty answer.
    """

    __slots__ = ("later", "num_digits", "finish_on_key", "timeout", "on_done",
                 "leading_finish", "digits", "reason", "finished_on", "armed", "_timer")

    def __init__(self, later: Callable, *, num_digits: int = 0, finish_on_key: str = "",
                 timeout: float = 5.0, on_done: Callable[["Gather"], None] | None = None,
                 leading_finish: bool = True):
        self.later = later
        self.num_digits = num_digits
        self.finish_on_key = finish_on_key
        self.timeout = timeout
        self.on_done = on_done
        self.leading_finish = leading_finish
        self.digits = ""
        self.reason = ""           # empty while collecting
        self.finished_on = ""      # the finish key that ended it, if one did
        self.armed = False
        self._timer = None

    @property
    def done(self) -> bool:
        return bool(self.reason)

    def arm(self) -> None:
        """The prompt is over (or there is none): the timeout runs from now."""
        if self.done:
            return
        self.armed = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.later(self.timeout, self._expire)

    def key(self, key: str) -> None:
        """One key pressed by the caller."""
        if self.done:
            return
        if key and key in self.finish_on_key:
            if self.digits or self.leading_finish:
                self.finished_on = key
                self._end(FINISH_KEY)
            return
        self.digits += key
        if self.num_digits and len(self.digits) >= self.num_digits:
            self._end(NUM_DIGITS)
            return
        self.arm()   # the timeout runs again from each key

    def stop(self, reason: str = STOPPED) -> None:
        self._end(reason)

    def _expire(self) -> None:
        self._end(TIMEOUT)

    def _end(self, reason: str) -> None:
        if self.done:
            return
        self.reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        cb, self.on_done = self.on_done, None
        if cb is not None:
            cb(self)
