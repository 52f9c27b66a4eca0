"""Stamps every change of control into the ring the accountant drains.

The engine never blocks on the accountant: a stamp is a write into shared
memory (or the overflow file when the ring is full).
"""
from __future__ import annotations

import collections
import logging
import os
import time
from engine.common import clock

log = logging.getLogger("baton.stamper")


class Stamper:
    def __init__(self, ring_path: str | None, node_id: str):
        self.node_id = node_id
        self.writer = None
        self.stamps = 0
        # Plain counters read by /metrics at scrape time (engine/common/metrics.py).
        self.started = 0
        self.ended = 0
        self.started_by_account: collections.Counter = collections.Counter()
        self.transitions: collections.Counter = collections.Counter()  # (to module, level)
        self._retained: list[dict] = []
        if ring_path is not None:
            from ext.kernels import ring

            os.makedirs(os.path.dirname(ring_path), exist_ok=True)
            # Read before the writer opens: its recovery empties an overflow
            # file the accountant has released, which still holds stamps.
            self._retained = _retained(ring_path)
            self.writer = ring.RingWriter(ring_path, node_id=node_id)
            # Tells the accountant this node (re)started: sessions it still had
            # open from a previous run are closed at the last moment seen.
            self.writer.append_record({"type": "node", "kind": "start",
                                       "mono_ns": time.monotonic_ns(), "wall_ns": clock.wall_ns()})

    def retained(self) -> list[dict]:
        """The session and transition stamps the ring held from earlier runs when
        this stamper opened it (read beside the accountant, never moving its
        position), decoded, in seq order: what the session journal is repaired
        from. Handed over once."""
        out, self._retained = self._retained, []
        return out

    def session_start(self, session) -> None:
        self.stamps += 1
        self.started += 1
        self.started_by_account[session.account] += 1
        if self.writer is not None:
            self.writer.stamp_session("start", session.id, session.account,
                                      session.started_mono, session.started_wall, "")

    def session_end(self, session) -> None:
        self.stamps += 1
        self.ended += 1
        if self.writer is not None:
            self.writer.stamp_session("end", session.id, session.account,
                                      session.ended_mono, session.ended_wall,
                                      session.end_reason or "")

    def transition(self, session, from_module: str, to_module: str, level: str,
                   reason: str, at: tuple[int, int] | None = None) -> None:
        """Stamp a change of control at the start of the session's last span,
        or at `at` (monotonic, wall ns)."""
        self.stamps += 1
        self.transitions[to_module, level] += 1
        if self.writer is not None:
            if at is None:
                span = session.history[-1]
                at = (span.start_mono, span.start_wall)
            self.writer.stamp_transition(session.id, session.account, from_module, to_module,
                                         level, reason, at[0], at[1])

    def action(self, session, module: str, action: str, count: int) -> None:
        self.stamps += 1
        if self.writer is not None:
            self.writer.stamp_action(session.id, session.account, module, action, count)

    def record_action(self, account: str, module: str, action: str, count: int,
                      **fields) -> None:
        """Stamp a counted action that belongs to no session (an API key's
        call, control/metering.py); `fields` go into the record as they are."""
        self.stamps += 1
        if self.writer is not None:
            self.writer.append_record({"type": "action", "session": "", "account": account,
                                       "module": module, "action": action, "count": count,
                                       **fields})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _retained(ring_path: str) -> list[dict]:
    """The session and transition records of the ring at `ring_path`, if any."""
    import msgpack

    from ext.kernels import ring

    if not os.path.exists(ring_path):
        return []
    try:
        records = ring.retained(ring_path)
    except (OSError, ring.RingError) as exc:
        log.warning("the ring's retained stamps could not be read: %s", exc)
        return []
    out = []
    for _seq, payload in records:
        try:
            rec = msgpack.unpackb(payload)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:   # not the engine's
            log.warning("ring record %s is not msgpack the engine wrote: %s", _seq, exc)
            continue
        if isinstance(rec, dict) and rec.get("type") in ("session", "transition"):
            out.append(rec)
    return out
