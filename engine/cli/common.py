"""What several `baton` subcommands share: the event loop they run on and how a
session's history is printed."""
from __future__ import annotations

import asyncio

__all__ = ["print_session_history", "run_loop"]


def run_loop(coro):
    """Run a coroutine to its end on uvloop (asyncio's own loop when uvloop is missing)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def print_session_history(row: dict) -> None:
    """One session and its history of control, as `baton sessions history` prints it."""
    print(f"session {row['id']}  account {row['account']}  from {row['from_uri']}  "
          f"to {row['to_uri']}  {'live' if row['live'] else 'ended: ' + str(row['end_reason'])}")
    print(f"{'#':<3} {'MODULE':<22} {'LEVEL':<12} {'REASON':<26} {'SECONDS':>9}")
    for i, h in enumerate(row["history"], 1):
        end = h["end_mono_ns"]
        secs = f"{(end - h['start_mono_ns']) / 1e9:.3f}" if end is not None else "…"
        print(f"{i:<3} {h['module']:<22} {h['level']:<12} {h['reason']:<26} {secs:>9}")
