"""The accountant process: drains the call-control ring into the ledger.

Loop: read records from the ring (`DATA/ring/ring.dat`, overflow included),
meter them, rate them, and post the lines in batches (up to
`billing.batch_records` records or `billing.batch_ms` per database
transaction). Each batch commits its ledger rows, the ring position of its
last record and the working state (open sessions, period usage counters) in
one database transaction; only then is the ring released up to that record.
After a crash the accountant resumes from the committed position with the
committed state, so every record is accounted exactly once. With
`billing.pipeline = true` a second thread commits each batch while the next
one is rated; the ring is still released only after each commit.

One accountant at a time: before it loads any state, the accountant takes
the lock `DATA/ring/accountant.lock` (engine/accounting/lock.py), waiting
for it if another accountant holds it, and then takes the ledger over with a
fencing token (`Ledger.acquire_fence`) that every one of its posts carries:
a post from an accountant that was taken over is refused, and that
accountant stops. Started by `baton serve` (`--parent-pid`), it stops
within a few tens of milliseconds of its engine's death (even by kill -9),
leaving the ring to the next engine's accountant.

It also writes `DATA/policy.json` (atomically, every `billing.policy_interval`
seconds) for the engine's policy hook: per account the balance and funds
left, whether subscription periods are paid, bans and caps reached.

CLI: `python -m engine.accounting.accountant --data-dir DIR [--config PATH]
[--store URL]` runs it; `python -m engine.accounting.accountant bill ...`
runs `bill_main` (invoices and payouts).
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
import tomllib
from typing import Any

import msgpack

from engine.accounting.config import BillingConfig, BillingConfigError
from engine.accounting.invoices import FORMATS, invoice, payouts, render
from engine.accounting.ledger import DEFAULT_NODE, Ledger, LedgerError, LedgerFenced, Line
from engine.accounting.ledger_pg import PeriodUsage, PostgresLedger
from engine.accounting.ledgers import open_ledger
from engine.accounting.lock import AccountantLock, lock_holder, lock_path
from engine.accounting.meter import Meter, OpenSession
from engine.accounting.money import format_money
from engine.accounting.rater import Rater
from engine.common import clock

__all__ = ["Accountant", "AccountantBusy", "main", "bill_main", "ring_path", "policy_path",
           "tune_gc"]

log = logging.getLogger("baton.accountant")

_SEP = "\x1f"


STOP_DRAIN_SECONDS = 10.0   # at most this long draining the ring when asked to stop
PR_SET_PDEATHSIG = 1


class AccountantBusy(LedgerError):
    """Another accountant holds the ring's accountant lock."""


COMMIT_BURST = 4       # commits in a row before `billing.commit_ms` paces them


def ring_path(data_dir: str) -> str:
    """Where the engine's ring lives in a data directory."""
    return os.path.join(data_dir, "ring", "ring.dat")


def policy_path(data_dir: str) -> str:
    """Where the accountant writes the policy snapshot."""
    return os.path.join(data_dir, "policy.json")


def _on_parent_death(handler) -> None:
    """Have the kernel send SIGUSR1 to this process when its parent dies, and
    call `handler` for it (Linux; elsewhere the getppid() checks remain)."""
    signal.signal(signal.SIGUSR1, handler)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR1))
    except (OSError, AttributeError):
        pass


def tune_gc() -> None:
    """Collector settings for a process that runs the accountant: records make
    many short-lived objects but no reference cycles, so collect rarely, and
    freeze what exists (the state loaded at start) out of the scans."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def _ring_module():
    from ext.kernels import ring
    return ring


class _Batch:
    """Lines of a batch of records with the position and state committed with them."""

    __slots__ = ("lines", "position", "state", "n", "posted")

    def __init__(self, lines: list[Line], position: tuple[str, int],
                 state: dict[tuple[str, str], bytes | None], n: int) -> None:
        self.lines = lines
        self.position = position
        self.state = state
        self.n = n
        self.posted = 0


class _Committer:
    """Posts batches in order on a thread of its own, so the database's work
    (done with the GIL released) overlaps metering and rating the next batch.

    After a failed batch it posts nothing more (later batches come back as
    "skipped") until `barrier()`, because they were rated on top of the
    failed one.
    """

    def __init__(self, ledger: Ledger, fence: int | None = None,
                 fence_node: str = DEFAULT_NODE) -> None:
        self.fence = fence
        self.fence_node = fence_node
        # SQLite posts through a writer process (ledger_sqlite.LedgerWriter): the thread
        # then only waits for it, and binding and writing run on another core.
        self.ledger = ledger.poster()
        self.inbox: queue.Queue = queue.Queue(maxsize=2)
        self.results: queue.Queue = queue.Queue()
        self.in_flight = 0
        # The GIL changes hands at each statement: a short switch interval keeps
        # the committer from waiting 5 ms for it behind the busy main thread.
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._interval, 0.0005))
        self.thread = threading.Thread(target=self._run, name="accountant-commit", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        failed = False
        while True:
            item = self.inbox.get()
            if item is None:
                return
            if item == "barrier":
                failed = False
                self.results.put(("barrier", None, None))
                continue
            if failed:
                self.results.put(("skipped", item, None))
                continue
            try:
                item.posted = self.ledger.post(item.lines, position=item.position,
                                               state=item.state, checked=True, fence=self.fence,
                                               fence_node=self.fence_node)
                self.results.put(("ok", item, None))
            except BaseException as exc:  # handed to the main thread, which re-raises
                failed = True
                self.results.put(("error", item, exc))

    def submit(self, batch: _Batch) -> None:
        self.in_flight += 1
        self.inbox.put(batch)

    def barrier(self) -> None:
        """Wait until the thread is idle, and let it post again after a failure."""
        self.inbox.put("barrier")
        while True:
            kind, _batch, _exc = self.results.get()
            if kind == "barrier":
                return

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join()
        sys.setswitchinterval(self._interval)
        if not isinstance(self.ledger, Ledger):
            self.ledger.close()


class Accountant:
    """Meters, rates and posts the ring's records; see the module docstring.

    `Accountant(data_dir, config_dict, store_url=None)`: `config_dict` is the
    engine's whole TOML config as a dict (only its billing sections are read);
    `store_url` defaults to `billing.store`, else SQLite at
    `DATA/accounting/ledger.db`.

    It first takes the ring's accountant lock, waiting at most `lock_wait`
    seconds (None: until `give_up()` says so) and raising AccountantBusy
    without it; only then does it open the ledger, take its fencing token
    (`self.fence`) and load the committed state.
    """

    def __init__(self, data_dir: str, config: dict[str, Any] | None = None,
                 store_url: str | None = None, *, ring: str | None = None,
                 pipeline: bool | None = None, lock_wait: float | None = 0.0,
                 give_up=None) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.book = BillingConfig.from_dict(config or {})
        self.ring_path = ring or ring_path(self.data_dir)
        self.lock = AccountantLock(lock_path(self.ring_path))
        if not self.lock.try_acquire():
            log.info("waiting for the accountant lock %s (held by pid %s)", self.lock.path,
                     lock_holder(self.lock.path))
            if not self.lock.acquire(lock_wait, give_up):
                self.lock.close()
                raise AccountantBusy(f"another accountant (pid {lock_holder(self.lock.path)}) "
                                     f"drains this ring (lock {self.lock.path})")
        try:
            self.ledger: Ledger = open_ledger(store_url or self.book.store, self.data_dir)
        except BaseException:
            self.lock.close()
            raise
        # The engine node whose ring this is: its fence and its state rows are its own, so
        # the accountants of several nodes post into one ledger side by side.
        self.fence_node = str((config or {}).get("engine", {}).get("node_id") or DEFAULT_NODE)
        if isinstance(self.ledger, PostgresLedger) and \
                not self.ledger.try_lock_writer(self.fence_node):
            self.ledger.close()
            self.lock.close()
            raise LedgerError(f"another accountant of node {self.fence_node} is writing to "
                              f"this PostgreSQL ledger")
        self.fence = self.ledger.acquire_fence(self.fence_node)
        # Caps and period tiers count every node's usage in a shared ledger.
        self.period_usage = PeriodUsage(self.ledger.url) \
            if isinstance(self.ledger, PostgresLedger) else None
        self.batch_records = self.book.batch_records
        self.batch_seconds = self.book.batch_ms / 1000.0
        self.commit_seconds = self.book.commit_ms / 1000.0
        self._commit_credit = float(COMMIT_BURST)   # commits that may go without a pause
        self._credit_at = time.monotonic()
        self.reader = None
        self.node = ""
        self.records = 0
        self.posted = 0
        self.batches = 0
        self.bad_records = 0
        # For /metrics (engine/common/metrics.py): (ring seq, stamp wall ns) of the last record
        # of each chunk read, and the stamp-to-ledger lag of the last commit.
        self._marks: collections.deque = collections.deque()
        self.lag_seconds = 0.0
        self.last_commit = 0.0
        self._stop = threading.Event()
        self._signalled = False
        self.parent_pid: int | None = None  # stop when this process is no longer our parent
        self.gone = False                   # the engine died: stop without draining
        self.fenced = False                 # another accountant took the ledger over
        self._last_policy = 0.0
        self.calls: queue.SimpleQueue = queue.SimpleQueue()  # work other threads hand the loop
        self.looping = False             # run_forever runs `calls` between batches
        self.on_snapshot: list = []      # callables(snapshot) after each policy write
        self._restore()
        if pipeline is None:
            pipeline = self.book.pipeline
        self._committer = _Committer(self.ledger, self.fence, self.fence_node) \
            if pipeline else None

    # -- state ---------------------------------------------------------------
    def _restore(self) -> None:
        """(Re)build the in-memory state from what the ledger store committed."""
        self.meter = Meter()
        self.rater = Rater(self.book)
        self.rater.shared = self.period_usage
        rows = self.ledger.load_state()
        # In a shared ledger, the open sessions of other fenced nodes are their
        # accountants' to close, not this one's.
        others = self.ledger.fenced_nodes() - {self.fence_node}
        sessions, nodes = [], {}
        for (kind, key), value in rows.items():
            if kind == "session":
                o = OpenSession.load(msgpack.unpackb(value))
                if o.node not in others:
                    sessions.append(o)
            elif kind == "node" and key not in others:
                nodes[key] = msgpack.unpackb(value)
        self.meter.load(sessions, nodes)
        self.rater.load(*Rater.parse_state(rows))
        # charges[account][currency] = (all time, {period: amount})
        self.charges: dict[str, dict[str, list[Any]]] = {}
        for r in self.ledger.charges():
            per = self.charges.setdefault(r["account"], {}).setdefault(r["currency"], [0, {}])
            per[0] += int(r["amount"])
            per[1][r["period"]] = per[1].get(r["period"], 0) + int(r["amount"])
        # account -> (commit wall seconds, micro-units) of the last hour's charges, for
        # the engine's `max_spend_per_hour` (counted from this process's start).
        self.recent: dict[str, collections.deque] = {}

    def _state_delta(self) -> dict[tuple[str, str], bytes | None]:
        delta: dict[tuple[str, str], bytes | None] = {}
        sessions, nodes = self.meter.take_dirty()
        pack = msgpack.Packer().pack          # one packer for the batch: cheaper than packb
        for key in sessions:
            o = self.meter.sessions.get(key)
            delta[("session", key[0] + _SEP + key[1])] = pack(o.dump()) if o is not None else None
        for node in nodes:
            delta[("node", node)] = pack(self.meter.nodes[node])
        delta.update(self.rater.take_dirty())
        return delta

    def _open_reader(self) -> bool:
        if self.reader is not None:
            return True
        if not os.path.exists(self.ring_path):
            return False
        ring = _ring_module()
        # The node id is in the ring's header; the committed position is per node.
        reader = ring.RingReader(self.ring_path)
        self.node = reader.node_id
        start = self.ledger.position(self.node)
        if start is not None and start != reader.position:
            reader.close()
            reader = ring.RingReader(self.ring_path, start)
        self.reader = reader
        log.info("reading ring %s (node %s) after seq %s", self.ring_path, self.node, start)
        return True

    def _reset(self) -> None:
        """Drop everything not committed: wait for the batches in flight,
        reopen the ring at the committed position and reload the committed state."""
        self._settle(raise_errors=False)
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.meter.take_dirty()
        self.rater.take_dirty()
        self._restore()

    # -- the loop ------------------------------------------------------------
    def step(self) -> int:
        """Read, meter and rate one batch and hand it to the ledger; the ring
        is released up to a batch only once that batch is committed. Returns
        the number of records read (0: the ring is empty)."""
        if self._committer is not None and self._committer.in_flight:
            self._reap(block=False)
        if not self._open_reader():
            return 0
        reader = self.reader
        events: list = []
        lines: list[Line] = []
        deadline = time.monotonic() + self.batch_seconds
        try:
            last, n = self._collect(reader, self.meter, self.rater, msgpack.unpackb, events,
                                    lines, self.batch_records, deadline)
        except Exception:
            self._reset()
            raise
        if last is None:
            return 0
        batch = _Batch(lines, (self.node, last), self._state_delta(), n)
        if self._committer is None:
            try:
                batch.posted = self.ledger.post(lines, position=batch.position, state=batch.state,
                                                checked=True, fence=self.fence,
                                                fence_node=self.fence_node)
            except Exception:
                self._reset()
                raise
            self._committed(batch)
        else:
            self._committer.submit(batch)      # waits while two batches are in flight
            self._reap(block=False)
        return n

    def _committed(self, batch: _Batch) -> None:
        self.reader.release(batch.position[1])
        self.records += batch.n
        self.posted += batch.posted
        self.batches += 1
        marks, wall = self._marks, None
        while marks and marks[0][0] <= batch.position[1]:
            wall = marks.popleft()[1]
        self.last_commit = clock.wall()
        if wall is not None:
            self.lag_seconds = max(0.0, self.last_commit - wall / 1e9)
        charges = self.charges
        for (account, currency, period), amount in Line.sum_amounts(batch.lines).items():
            per = charges.get(account)
            if per is None:
                per = charges[account] = {}
            cur = per.get(currency)
            if cur is None:
                cur = per[currency] = [0, {}]
            cur[0] += amount
            cur[1][period] = cur[1].get(period, 0) + amount
            if amount and currency == self.book.account(account).currency:
                self.recent.setdefault(account, collections.deque()).append(
                    (self.last_commit, amount))

    def _reap(self, block: bool) -> None:
        """Take the committer's results: release what is committed; on a
        failed batch, drop all uncommitted work and raise its error."""
        c = self._committer
        error = None
        while c.in_flight:
            try:
                kind, batch, exc = c.results.get(block=block or error is not None)
            except queue.Empty:
                break
            c.in_flight -= 1
            if kind == "ok":
                self._committed(batch)
            elif error is None:
                error = exc
        if error is not None:
            c.barrier()
            self._reset()
            raise error

    def _settle(self, raise_errors: bool = True) -> None:
        """Wait until every batch handed to the committer is committed (or failed)."""
        c = self._committer
        if c is None:
            return
        if raise_errors:
            self._reap(block=True)
            return
        while c.in_flight:
            kind, batch, _exc = c.results.get()
            c.in_flight -= 1
            if kind == "ok":
                self._committed(batch)
        c.barrier()

    def _collect(self, reader, meter, rater, unpack, events, lines, limit, deadline):
        last = None
        n = 0
        rec = None
        while n < limit:
            recs = reader.read(min(4096, limit - n))
            if not recs:
                break
            # The ring's seq is the idempotency key; a bad record must not stop billing.
            for seq, exc in meter.feed_payloads(recs, self.node, events, unpack):
                self.bad_records += 1
                log.error("ring record %d is unusable and skipped: %s", seq, exc)
            rec = meter.last_record
            last = recs[-1][0]
            n += len(recs)
            if isinstance(rec, dict) and rec.get("wall_ns"):
                self._marks.append((last, rec["wall_ns"]))
            if events:
                rater.rate(events, lines)
                events.clear()
            if time.monotonic() >= deadline:
                break
        return last, n

    def drain(self) -> int:
        """Process batches until the ring is empty and all is committed; the
        records processed."""
        total = 0
        while True:
            n = self.step()
            if not n:
                self._settle()
                if self.reader is None or not self.reader.available:
                    return total
                continue
            total += n

    def flush(self) -> None:
        """Wait until every batch read so far is committed and released."""
        self._settle()

    def close_stale(self, node: str | None = None, at_mono_ns: int | None = None) -> int:
        """Close the open sessions of a restarted engine node (default: this
        ring's node) and post their last segments; the sessions closed."""
        self._settle()
        node = node or self.node
        events = self.meter.close_stale(node, at_mono_ns)
        lines: list[Line] = []
        self.rater.rate(events, lines)
        self.ledger.post(lines, state=self._state_delta(), fence=self.fence,
                         fence_node=self.fence_node)
        return sum(1 for e in events if e.__class__.__name__ == "SessionEnd")

    def stop(self) -> None:
        """Ask run_forever to finish its batch and return."""
        self._stop.set()

    def _on_signal(self, *_args) -> None:
        self._signalled = True

    def _on_engine_death(self, *_args) -> None:
        self.gone = True

    def engine_gone(self) -> bool:
        """Whether the engine that started this accountant (`parent_pid`) has died
        (its death signal arrived, or this process was handed to another parent)."""
        if not self.gone and self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.gone = True
        return self.gone

    def watch_parent(self, pid: int | None) -> None:
        """Stop when process `pid`, this one's parent, dies: the kernel sends
        SIGUSR1 at its death (Linux PR_SET_PDEATHSIG) and the loop also compares
        getppid() with it at every turn; both end the loop within a batch."""
        self.parent_pid = pid
        if pid is None:
            return
        if threading.current_thread() is threading.main_thread():
            _on_parent_death(self._on_engine_death)
        self.engine_gone()          # it may have died before the signal was armed

    def _pause(self, seconds: float) -> None:
        """Sleep, waking early for stop(), a signal or the engine's death
        (time.sleep, not Event.wait: see run_forever)."""
        end = time.monotonic() + seconds
        while not self._signalled and not self._stop.is_set() and not self.engine_gone():
            self.run_calls()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))

    def run_forever(self, idle_sleep: float = 0.005,
                    install_signals: bool = True) -> None:
        """Drain the ring until SIGTERM/SIGINT (or stop()); write the policy
        snapshot every policy_interval seconds. A database error is logged,
        the uncommitted work dropped and retried after a pause."""
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                # A plain flag: Event.set() from a signal handler deadlocks when the
                # signal lands while this thread waits on the same Event's lock.
                signal.signal(sig, self._on_signal)
        backoff = 0.0
        self.looping = True
        while not self._stop.is_set() and not self._signalled:
            if self.engine_gone():
                # The engine that started us is gone (even by kill -9): stop after
                # the committed batches; the next engine's accountant drains the rest.
                log.info("engine %d is gone: stopping", self.parent_pid)
                break
            self.run_calls()
            try:
                n = self.step()
                backoff = 0.0
            except LedgerFenced as exc:
                self._fenced_off(exc)
                break
            except Exception:
                log.exception("accounting batch failed; retrying from the committed position")
                backoff = min(5.0, backoff * 2 or 0.1)
                self._pause(backoff)
                continue
            now = time.monotonic()
            if now - self._last_policy >= self.book.policy_interval:
                self._last_policy = now
                try:
                    self.write_policy()
                except OSError:
                    log.exception("cannot write the policy snapshot")
            if not n:
                try:
                    self._settle()
                except LedgerFenced as exc:
                    self._fenced_off(exc)
                    break
                except Exception:
                    log.exception("accounting batch failed; retrying from the committed position")
                self._pause(idle_sleep)
            elif n < self.batch_records and self.commit_seconds > 0:
                # The ring is drained but the calls go on: commits are paced to one per
                # `commit_ms` (each is an fsync), with a burst of COMMIT_BURST allowed, so
                # a quiet node still commits a call's few records at once; a full batch
                # (a backlog) is followed at once.
                now = time.monotonic()
                credit = min(COMMIT_BURST, self._commit_credit +
                             (now - self._credit_at) / self.commit_seconds) - 1.0
                self._commit_credit, self._credit_at = credit, now
                if credit < 0:
                    self._pause(-credit * self.commit_seconds)
        self.looping = False
        if self.fenced or self.gone:
            # Nothing more of ours may reach the ledger or the policy file: another
            # accountant owns them (or will, once the engine is back).
            self._settle(raise_errors=False)
            return
        try:
            # A stop first drains what the ring holds now: `baton serve` asks only after
            # the engine's last stamp, so its invoices are whole when it has exited. The
            # bound keeps an engine that is still stamping from holding the stop up.
            deadline = time.monotonic() + STOP_DRAIN_SECONDS
            while time.monotonic() < deadline:
                try:
                    if not self.step():
                        break
                except Exception:
                    log.exception("accounting batch failed while stopping; the ring keeps it")
                    break
            self._settle()
        finally:
            self.write_policy()

    def _fenced_off(self, exc: LedgerFenced) -> None:
        # The refused batches stay in the ring, for the accountant that owns it now.
        log.error("stopping: %s", exc)
        self.fenced = True

    def run_calls(self) -> None:
        """Run what other threads handed to this loop (the Billing service,
        engine/accounting/service.py): between batches, the state is whole."""
        while True:
            try:
                call = self.calls.get_nowait()
            except queue.Empty:
                return
            call()

    # -- live views ----------------------------------------------------------
    def running_cost(self, session_id: str, now_mono_ns: int | None = None) -> int | None:
        """Micro-units a live session has cost its current payer so far, to the
        last completed billing increment of its current module (what an earlier
        payer was charged, maybe in another currency, is that payer's); None if
        it is not open."""
        o = self.meter.find(session_id)
        if o is None:
            return None
        return self.rater.running_cost(o, time.monotonic_ns() if now_mono_ns is None else now_mono_ns,
                                       payer_only=True)

    def policy_snapshot(self, now_mono_ns: int | None = None,
                        now_wall_ns: int | None = None) -> dict[str, Any]:
        """What the engine's policy needs, per account: balance and funds left
        (with live sessions' running costs), period paid, banned, caps."""
        now_mono = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
        wall = clock.wall_ns() if now_wall_ns is None else now_wall_ns
        period = self.rater.clock.of(wall)
        live: dict[str, int] = {}
        limited = {a for a, acc in self.book.accounts.items()
                   if acc.prepaid_balance is not None or acc.credit_limit is not None}
        of = self.rater.clock.of
        unposted: dict[str, int] = {}
        for o in self.meter:
            cost = self.rater.running_cost(o, now_mono) - o.charged
            unposted[o.account] = unposted.get(o.account, 0) + cost
            if o.account in limited:
                # A postpaid balance is this period's invoice so far: a live segment
                # belongs to the period it began in (docs/billing.md), as its line will.
                acc = self.book.account(o.account)
                if acc.prepaid_balance is None and of(o.seg_wall or wall) != period:
                    continue
                live[o.account] = live.get(o.account, 0) + cost
        hour_ago = wall / 1e9 - 3600
        for recent in self.recent.values():
            while recent and recent[0][0] < hour_ago:
                recent.popleft()
        caps = self.rater.caps(period)
        accounts: dict[str, Any] = {}
        for acc_id in sorted(set(self.book.accounts) | set(self.charges)):
            acc = self.book.account(acc_id)
            per = self.charges.get(acc_id, {}).get(acc.currency, [0, {}])
            all_time, this_period = per[0], per[1].get(period, 0)
            running = live.get(acc_id, 0)
            if acc.prepaid_balance is not None:
                balance = acc.prepaid_balance - all_time - running
                left = balance + (acc.credit_limit or 0)
            else:
                balance = -(this_period + running)
                left = (acc.credit_limit + balance) if acc.credit_limit is not None else None
            subs = {}
            for target, plan in self.book.subscriptions_of(acc_id):
                paid = (self.book.subscription_paid_externally(acc_id, period)
                        or f"sub:{acc_id}:{plan.name}:{period}" in self.rater.fees)
                subs[target] = {"plan": plan.name, "paid": paid, "unpaid": plan.unpaid}
            acc_caps = caps.get(acc_id, {})
            deny = sorted({t for t, c in acc_caps.items() if c["reached"] and c["at_cap"] == "deny"}
                          | {t for t, s in subs.items() if not s["paid"] and s["unpaid"] == "deny"})
            accounts[acc_id] = {
                "currency": acc.currency,
                "balance": format_money(balance), "balance_micro": balance,
                "funds_left": format_money(left) if left is not None else None,
                "funds_left_micro": left,
                "out_of_funds": left is not None and left <= 0,
                "period": period, "period_charges_micro": this_period,
                "period_paid": all(s["paid"] for s in subs.values()) if subs else None,
                "subscriptions": subs,
                "banned": acc.banned,
                "caps": acc_caps,
                "caps_reached": sorted(t for t, c in acc_caps.items() if c["reached"]),
                "deny": deny,
                "live_sessions_cost_micro": running,
                # What the last hour cost: charges committed since, and live sessions'
                # unposted costs (the engine's max_spend_per_hour).
                "spend_last_hour_micro": sum(a for _, a in self.recent.get(acc_id, ())) +
                unposted.get(acc_id, 0),
            }
        return {"generated_wall_ns": wall, "period": period, "node": self.node,
                "position": self.reader.position if self.reader is not None else None,
                "accounts": accounts}

    def write_policy(self, path: str | None = None) -> str:
        """Write the policy snapshot atomically (temp file + rename)."""
        path = path or policy_path(self.data_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        snap = self.policy_snapshot()
        with open(tmp, "w") as f:
            json.dump(snap, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        for hook in list(self.on_snapshot):
            try:
                hook(snap)
            except Exception:
                log.exception("policy snapshot hook failed")
        return path

    def stats(self) -> dict[str, Any]:
        """Counters of this run."""
        return {"records": self.records, "posted": self.posted, "batches": self.batches,
                "bad_records": self.bad_records, "open_sessions": len(self.meter.sessions),
                "position": self.reader.position if self.reader is not None else None}

    def close(self) -> None:
        """Commit what is in flight, then close the ring reader and the ledger."""
        try:
            self._settle(raise_errors=not (self.fenced or self.gone))
        finally:
            if self._committer is not None:
                self._committer.stop()
                self._committer = None
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.ledger.close()
        if self.period_usage is not None:
            self.period_usage.close()
        self.lock.close()

    def __enter__(self) -> Accountant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- command line ---------------------------------------------------------------

def _load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def _data_dir(args: argparse.Namespace, raw: dict[str, Any]) -> str:
    return args.data_dir or raw.get("engine", {}).get("data_dir") or ".baton"


def main(argv: list[str] | None = None) -> int:
    """`baton accountant --data-dir DIR [--config PATH] [--store URL] [--once]`."""
    p = argparse.ArgumentParser(prog="baton accountant",
                                description="Drain the engine's call-control ring into the "
                                            "ledger; SIGTERM stops it after the current batch.")
    p.add_argument("--data-dir", metavar="DIR", help="the engine's data directory "
                                                     "(default: engine.data_dir, else .baton)")
    p.add_argument("--config", metavar="PATH", help="the engine's TOML config (billing sections)")
    p.add_argument("--store", metavar="URL", help="ledger store: a SQLite path or postgresql://... "
                                                  "(default: billing.store, else DATA/accounting/ledger.db)")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--once", action="store_true", help="drain the ring, write the policy "
                                                       "snapshot and exit")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="text (default), or json: one JSON object per line")
    p.add_argument("--node-id", metavar="ID",
                   help="the engine node whose ring this is (overrides engine.node_id): its "
                        "fence in a ledger shared by several nodes")
    p.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve Prometheus /metrics here (default: engine.accountant_metrics_addr)")
    args = p.parse_args(argv)
    from engine.common.guard import PRIVATE_UMASK
    from engine.common.logs import setup as setup_logs

    os.umask(PRIVATE_UMASK)    # the ledger and its journal are the engine user's only

    setup_logs(args.log_level, args.log_format or "text")
    # While it waits for the accountant lock, a stop or the engine's death ends the wait.
    stopping: list[int] = []
    started: list[Accountant] = []

    def stop_waiting(signum, _frame) -> None:
        stopping.append(signum)
        if started and signum != signal.SIGUSR1:
            # A stop that lands after start-up checked for one but before run_forever
            # put in its own handler still stops the loop (a plain flag, as there).
            started[0]._on_signal()

    if not args.once:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop_waiting)
    parent = args.parent_pid
    if parent is not None:
        _on_parent_death(stop_waiting)

    def give_up() -> bool:
        return bool(stopping) or (parent is not None and os.getppid() != parent)

    try:
        raw = _load_config(args.config)
        if args.node_id:
            raw.setdefault("engine", {})["node_id"] = args.node_id
        # --once never waits: it is for when no other accountant runs.
        acct = Accountant(_data_dir(args, raw), raw, args.store,
                          lock_wait=0.0 if args.once else None, give_up=give_up)
    except AccountantBusy as exc:
        if give_up():
            log.info("stopped while waiting for the accountant lock")
            return 0
        print(f"baton accountant: {exc}", file=sys.stderr)
        return 2
    except (OSError, tomllib.TOMLDecodeError, BillingConfigError, LedgerError) as exc:
        print(f"baton accountant: {exc}", file=sys.stderr)
        return 2
    log.info("holding the accountant lock %s, fencing token %d", acct.lock.path, acct.fence)
    tune_gc()
    acct.watch_parent(parent)
    started.append(acct)
    if any(sig != signal.SIGUSR1 for sig in stopping):
        acct.stop()                    # asked to stop while it was starting
    service = None
    metrics_addr = args.metrics_addr or raw.get("engine", {}).get("accountant_metrics_addr")
    stop_metrics = None
    if metrics_addr and not args.once:
        from engine.common.metrics import serve_accountant_metrics

        try:
            _url, stop_metrics = serve_accountant_metrics(acct, metrics_addr)
        except (OSError, ValueError) as exc:
            print(f"baton accountant: metrics address {metrics_addr}: {exc}", file=sys.stderr)
            acct.close()
            return 2
    try:
        if args.once:
            acct.drain()
            acct.write_policy()
        else:
            from engine.accounting.service import BackgroundService

            service = BackgroundService(acct, raw)      # Billing API and notifications
            log.info("accountant running on %s", acct.data_dir)
            acct.run_forever()
        log.info("accountant stopped: %s", json.dumps(acct.stats()))
        if acct.fenced:
            return 3
    finally:
        if service is not None:
            service.stop()
        if stop_metrics is not None:
            stop_metrics()
        acct.close()
    return 0


def bill_main(argv: list[str] | None = None) -> int:
    """`baton bill invoice --account A --period P [--format F]` and
    `baton bill payouts --period P [--vendor V] [--format F]`."""
    p = argparse.ArgumentParser(prog="baton bill", description="Invoices and vendor payouts "
                                                               "from the ledger")
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    inv = sub.add_parser("invoice", help="one account's invoice for a period")
    inv.add_argument("--account", required=True)
    inv.add_argument("--notify", action="store_true",
                     help="also send the invoice.ready webhook (docs/billing.md)")
    pay = sub.add_parser("payouts", help="vendor payout statements for a period")
    pay.add_argument("--vendor", help="only this vendor")
    for sp in (inv, pay):
        sp.add_argument("--period", required=True, help="e.g. 2026-11")
        sp.add_argument("--format", choices=FORMATS, default="table")
        sp.add_argument("--data-dir", metavar="DIR", help="the engine's data directory")
        sp.add_argument("--config", metavar="PATH", help="the engine's TOML config")
        sp.add_argument("--store", metavar="URL", help="ledger store (default: billing.store, "
                                                       "else DATA/accounting/ledger.db)")
    args = p.parse_args(argv)
    try:
        raw = _load_config(args.config)
        book = BillingConfig.from_dict(raw)
        store = args.store or book.store
        data_dir = _data_dir(args, raw)
        if store is None and not os.path.exists(os.path.join(data_dir, "accounting", "ledger.db")):
            print(f"baton bill: no ledger in {data_dir} (run the accountant, or give --store)",
                  file=sys.stderr)
            return 2
        ledger = open_ledger(store, data_dir)
    except (OSError, tomllib.TOMLDecodeError, BillingConfigError, LedgerError) as exc:
        print(f"baton bill: {exc}", file=sys.stderr)
        return 2
    try:
        if args.what == "invoice":
            currency = book.account(args.account).currency
            doc = invoice(ledger, args.account, args.period, currency)
        else:
            doc = payouts(ledger, args.period, args.vendor)
    finally:
        ledger.close()
    sys.stdout.write(render(doc, args.format))
    if getattr(args, "notify", False):
        from engine.accounting.service import notify_invoice_now

        return notify_invoice_now(raw, data_dir, doc)
    return 0


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "bill":
        return bill_main(argv[1:])
    if argv and argv[0] == "accountant":
        argv = argv[1:]
    return main(argv)

if __name__ == "__main__":
    sys.exit(_dispatch(sys.argv[1:]))
