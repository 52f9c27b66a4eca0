"""The one wall clock that billing reads.

Every wall-clock time that decides money — a stamp's `wall_ns`, the billing
period that is "now", the stamp-to-ledger lag — is read here, so that one
setting moves all of them together, in the engine and in the accountant:

- ``BATON_CLOCK_SHIFT_NS`` (an integer, default 0) is added to the system
  clock. The test suite uses it to run every process it starts at a fixed
  point in the calendar, whatever today's date; an operator can use it to
  replay a ring into a ledger as of another date. It is read once, when the
  process starts.
- In one process, a time-faking library that patches ``time.time_ns`` (the
  suite uses ``time-machine``) moves it too: `wall_ns` reads the system clock
  through the ``time`` module at every call.

Monotonic time (durations, what a module held a call for) is never shifted.
"""
from __future__ import annotations

import os
import time

SHIFT_ENV = "BATON_CLOCK_SHIFT_NS"


def _read_shift() -> int:
    raw = os.environ.get(SHIFT_ENV, "").strip()
    if not raw:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{SHIFT_ENV}: expected an integer number of nanoseconds, not {raw!r}")


SHIFT_NS = _read_shift()


def wall_ns() -> int:
    """Nanoseconds since the epoch, as billing sees them."""
    return time.time_ns() + SHIFT_NS


def wall() -> float:
    """Seconds since the epoch, as billing sees them."""
    return (time.time_ns() + SHIFT_NS) / 1e9


def shift_to(at_ns: int) -> int:
    """The shift that makes the clock read `at_ns` now (for a child's environment)."""
    return at_ns - time.time_ns()
