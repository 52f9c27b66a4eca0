"""The accountant's lock: at most one accountant drains a ring at any moment.

`DATA/ring/accountant.lock` (beside the ring file) is held with `flock` for
the accountant's whole life. The kernel drops it when the holder dies, even
by SIGKILL, so a restarted accountant never finds it stale. An accountant
takes it BEFORE it loads any state from the ledger: one that has to wait
loads the state its predecessor committed last, never an older copy. The
holder writes its pid into the file, for the messages of those that wait and
for `baton serve`'s supervisor.

The lock fences accountants on one machine; `Ledger.acquire_fence` fences
them on a shared ledger too (a generation number checked in every posting
transaction).
"""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable

__all__ = ["AccountantLock", "lock_path", "lock_holder"]

LOCK_NAME = "accountant.lock"
POLL_SECONDS = 0.02


def lock_path(ring_file: str) -> str:
    """The accountant lock of a ring file (`DATA/ring/ring.dat` -> `DATA/ring/accountant.lock`)."""
    return os.path.join(os.path.dirname(os.path.abspath(ring_file)), LOCK_NAME)


def lock_holder(path: str) -> int | None:
    """The pid written by the accountant that holds (or last held) the lock, or None."""
    try:
        with open(path, "rb") as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class AccountantLock:
    """One process's hold on an accountant lock file."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.held = False

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True if this process now holds it."""
        if self.held:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        self.held = True
        return True

    def acquire(self, timeout: float | None, give_up: Callable[[], bool] | None = None) -> bool:
        """Wait for the lock: at most `timeout` seconds (None: for ever), and no
        longer than `give_up()` (asked every few milliseconds) stays false."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.try_acquire():
            if (end is not None and time.monotonic() >= end) or (give_up is not None and give_up()):
                return False
            time.sleep(POLL_SECONDS)
        return True

    def close(self) -> None:
        """Let go of the lock (closing the descriptor releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.held = False
