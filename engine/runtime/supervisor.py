"""`baton serve`'s supervision of its accountant child process.

The accountant is a child of the engine (engine/cli/baton.py starts it). If it dies
(a crash, the OOM killer, kill -9), billing must not stop silently: the
supervisor notices within `POLL_SECONDS`, reaps it (no zombie), logs the
exit and starts a new one after a back-off (`BACKOFF`: 0.5 s, 1 s, 2 s, ...
at most 30 s; back to 0.5 s once an accountant has run `STABLE_SECONDS`).
A new accountant waits for the ring's accountant lock before it loads any
state (engine/accounting/lock.py), so a restart never overlaps another
accountant's work.

It also keeps what /metrics, the gRPC health of `baton.v1.Billing` and
`baton top` show: whether the accountant is up (its process runs and holds
the lock), how often it was restarted, and the stamp-to-ledger lag (how long
the oldest record the accountant has not yet committed has been in the
ring), sampled from the ring's cursors with no work on the stamping path.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import signal
import subprocess
import time
from collections.abc import Callable

from engine.accounting.lock import lock_holder

log = logging.getLogger("baton.supervisor")

__all__ = ["AccountantSupervisor", "BACKOFF", "STABLE_SECONDS"]

BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_SECONDS = 60.0
POLL_SECONDS = 0.05
STOP_SECONDS = 20.0
_MARKS_MAX = 100_000


class AccountantSupervisor:
    """Runs `spawn()` (which returns a started `subprocess.Popen`) and keeps it
    running until `stop()`. `on_change(up)` is called (on the loop) whenever
    the accountant comes up or goes down. Use from the event loop's thread:
    the child's parent-death signal belongs to the thread that forked it."""

    def __init__(self, spawn: Callable[[], subprocess.Popen], lock_file: str, stamper=None,
                 on_change: Callable[[bool], object] | None = None) -> None:
        self.spawn = spawn
        self.lock_file = lock_file
        self.stamper = stamper
        self.on_change = on_change
        self.proc: subprocess.Popen | None = None
        self.up = False
        self.restarts = 0
        self.lag_seconds = 0.0
        self._failures = 0               # consecutive short-lived runs: the back-off step
        self._started_at = 0.0
        self._marks: collections.deque = collections.deque()   # (last seq written, monotonic)
        self._stopping = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._launch()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def _launch(self) -> None:
        self.proc = self.spawn()
        self._started_at = time.monotonic()

    async def _watch(self) -> None:
        while not self._stopping:
            self._sample_lag()
            code = self.proc.poll()          # reaps a dead child: no zombie
            if code is not None:
                await self._changed(False)
                await self._restart(code)
                continue
            await self._changed(lock_holder(self.lock_file) == self.proc.pid)
            await asyncio.sleep(POLL_SECONDS)

    async def _restart(self, code: int) -> None:
        ran = time.monotonic() - self._started_at
        self._failures = 0 if ran >= STABLE_SECONDS else self._failures + 1
        delay = BACKOFF[min(max(self._failures - 1, 0), len(BACKOFF) - 1)]
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        log.warning("accountant (pid %d) stopped after %.1f s (%s): restarting it in %.1f s "
                    "(restart %d)", self.proc.pid, ran, how, delay, self.restarts + 1)
        end = time.monotonic() + delay
        while not self._stopping and time.monotonic() < end:
            self._sample_lag()
            await asyncio.sleep(min(POLL_SECONDS, max(0.0, end - time.monotonic())))
        if self._stopping:
            return
        self.restarts += 1
        self._launch()
        log.info("accountant restarted (pid %d)", self.proc.pid)

    async def _changed(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            log.info("accountant (pid %d) is up", self.proc.pid)
        if self.on_change is not None:
            result = self.on_change(up)
            if asyncio.iscoroutine(result):
                await result

    def _sample_lag(self) -> None:
        w = getattr(self.stamper, "writer", None)
        if w is None:
            return
        try:
            written, fill = w.written, w.fill
        except ValueError:         # the writer was closed: the engine is stopping
            return
        now = time.monotonic()
        marks = self._marks
        if not marks or marks[-1][0] != written:
            marks.append((written, now))
            if len(marks) > _MARKS_MAX:
                marks.popleft()
        if fill <= 0:
            self.lag_seconds = 0.0
            return
        oldest = written + 1 - fill          # the first record not yet committed
        while len(marks) > 1 and marks[0][0] < oldest:
            marks.popleft()
        self.lag_seconds = now - marks[0][1]

    async def stop(self) -> None:
        """Stop supervising, then ask the accountant to drain the ring and stop
        (SIGTERM), killing it if it takes longer than STOP_SECONDS."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), STOP_SECONDS)
        except asyncio.TimeoutError:
            proc.kill()
            proc.wait()
