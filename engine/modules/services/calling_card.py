"""`baton.calling_card`: a prepaid calling card.

    [apps.card.nodes.card]
    module = "baton.calling_card"
    outlets = { done = "hangup" }
    [apps.card.nodes.card.params]
    pins = { "4321" = "card-1001" }     # PIN -> the card's account (or kv.card_pin)
    dial = "sip:{digits}@{self}"        # what the entered digits become
    warning_text = "Your balance is about to run out."
    warn_before = 10

The caller is answered and asked for a PIN (digits, then #). A wrong PIN is
asked again; after `max_attempts` wrong PINs the caller hears `locked_text`
and the node's `failed` outlet is followed (the call ends when it is not
wired). PINs come from `pins` (PIN -> account) and from every account whose
key/value store has the PIN under `pin_key` (default `card_pin`); they are
compared in constant time, all of them on every try.

Once the PIN is known the session's paying account becomes the card's
(`Session.set_account`): the time before is billed to the number's account,
the rest of the session (service time and bridged time) to the card's. The
caller hears the balance and how long it lasts at the bridge rate (from the
policy snapshot), then enters the destination (digits, then #). The call is
handed down to `baton.bridge` (the basic level, billed at the bridge rate)
with the policy's time limit: the warning `warn_before` seconds before the
funds run out (`warning_text`, spoken over the bridge) and the cut-off at
zero, which ends the call. When the far end hangs up (or is busy, does not
answer, fails) control comes back here: the caller hears the outcome and the
new balance, read from a snapshot that covers the call just made (waiting
up to `balance_wait` seconds for the accountant), and "press 1 to make
another call"; any other key or no key: `goodbye_text` and the `done` outlet.

Wrong PINs are also counted across calls (`LockoutBook`, a SQLite file in
`DATA_DIR/services/calling_card.db` written on its own thread), twice:
- per source (the From user): `lockout_after` wrong PINs within
  `lockout_window` seconds lock that caller out for `lockout_seconds`, even
  with the right PIN (`lockout_text`, the `locked` outlet). It never locks a
  card: its owner, calling from elsewhere, is not locked out.
- per card: a wrong PIN names no card, so it is a guess at every card the
  node accepts, and counts against the node's `guess_budget`, from every
  caller (a From made up per call does not reset it). Past the budget every
  PIN is checked only after a back-off (`backoff_seconds`, doubled for each
  further wrong PIN in the window, at most `backoff_max`), and a wrong PIN
  ends the call: guessing slows down for everyone, but the right PIN from a
  caller who is not locked out is still accepted, only later.

Outlets: `done`, `failed` (wrong PINs), `locked` (locked out), `denied` (the
card has no funds).
Each step is a `calling_card.step` session event (Watch) with `step` in its detail.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from engine.sessions.apps import Node
from engine.sessions.policy import when_decided
from engine.modules.services.prompting import (PromptingModule, check_bool, check_common, check_keys, check_number,
                        check_text)
from engine.modules.services.verify import user_of

log = logging.getLogger("baton.services.calling_card")

KEY = "baton.calling_card"
BRIDGE = "baton.bridge"
TEXTS = {
    "pin_prompt": "Please enter your PIN, then press hash.",
    "pin_invalid_text": "That PIN is not valid.",
    "locked_text": "Too many wrong PINs. Goodbye.",
    "lockout_text": "Too many wrong PINs. Please try again later. Goodbye.",
    "balance_text": "Your balance is {balance}.",
    "time_text": "That is enough for {time} of calling.",
    "destination_prompt": "Please enter the number you want to call, then press hash.",
    "destination_invalid_text": "That number is not valid.",
    "another_prompt": "Press 1 to make another call.",
    "completed_text": "Your call has ended.",
    "busy_text": "The number is busy.",
    "no_answer_text": "There is no answer.",
    "failed_text": "The call could not be completed.",
    "no_funds_text": "Your balance is too low to make a call. Goodbye.",
    "goodbye_text": "Thank you for calling. Goodbye.",
}
PARAM_KEYS = tuple(TEXTS) + (
    "pins", "pin_key", "pin_min", "pin_max", "max_attempts", "lockout_after",
    "lockout_window", "lockout_seconds", "guess_budget", "backoff_seconds", "backoff_max", "dial", "trunk", "ring_timeout",
    "min_digits", "max_digits", "min_call_seconds", "balance_wait", "announce_time",
    "warn_before", "warning_text", "warning_voice", "voice", "language", "timeout", "retries")
PIN = re.compile(r"^[0-9]{1,32}$")
DIGITS = re.compile(r"^[0-9*]+$")
# Lockout defaults and bounds (seconds).
LOCKOUT_AFTER, LOCKOUT_WINDOW, LOCKOUT_SECONDS = 6, 3600, 900
MAX_LOCKOUT_AFTER, MAX_LOCKOUT_WINDOW, MAX_LOCKOUT_SECONDS = 100, 86400, 7 * 86400
# Wrong PINs at a node (every caller) before its PINs are checked only after a back-off.
GUESS_BUDGET, BACKOFF_SECONDS, BACKOFF_MAX = 20, 2, 60
PIN_MIN = 4               # shorter PINs are too easy to guess
MAX_CALLER = 128          # characters of a caller key (From users are the caller's own)
_UNITS = {"USD": ("dollar", "dollars", "cent", "cents"),
          "EUR": ("euro", "euros", "cent", "cents"),
          "GBP": ("pound", "pounds", "penny", "pence")}


def spoken_money(micro: int, currency: str) -> str:
    """An amount as words for the speech engine, rounded down to the cent
    (a card never hears more than it has): "2 dollars and 5 cents"."""
    micro = max(0, int(micro))
    units, cents = micro // 1_000_000, (micro % 1_000_000) // 10_000
    words = _UNITS.get(currency)
    if words is None:
        return f"{units}.{cents:02d} {currency}"
    one, many, c_one, c_many = words
    parts = []
    if units or not cents:
        parts.append(f"{units} {one if units == 1 else many}")
    if cents:
        parts.append(f"{cents} {c_one if cents == 1 else c_many}")
    return " and ".join(parts)


def spoken_time(seconds: int) -> str:
    """ "3 minutes and 20 seconds" (whole seconds)."""
    m, s = divmod(max(0, int(seconds)), 60)
    parts = []
    if m:
        parts.append(f"{m} minute{'s' if m != 1 else ''}")
    if s or not m:
        parts.append(f"{s} second{'s' if s != 1 else ''}")
    return " and ".join(parts)


def _digest(pin: str) -> bytes:
    return hashlib.sha256(pin.encode()).digest()


def caller_key(from_uri: str | None) -> str:
    """The key a caller's wrong PINs are counted under: the From URI's user
    (the calling number), or the whole URI when it has none."""
    uri = (from_uri or "").strip()
    if "<" in uri:
        uri = uri[uri.find("<") + 1:].split(">", 1)[0]
    user = user_of(uri).lower() if uri else ""
    return "caller:" + (user or uri.lower() or "anonymous")[:MAX_CALLER]


_LOCKOUT_SCHEMA = """
CREATE TABLE IF NOT EXISTS failures (key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS failures_key ON failures (key, at);
CREATE TABLE IF NOT EXISTS locks (key TEXT PRIMARY KEY, until REAL NOT NULL);
"""


def backoff(guesses: int, budget: int, first: float, most: float) -> float:
    """Seconds a PIN waits before it is checked, after `guesses` wrong PINs at
    a node within the window: none within the budget, then `first`, doubled
    for each further wrong PIN, at most `most`."""
    if budget <= 0 or guesses < budget:
        return 0.0
    return float(min(most, first * 2 ** min(guesses - budget, 32)))


class LockoutBook:
    """Wrong PINs and lockouts across calls, by key (`caller:15551234`,
    `cards:card/card`), in SQLite so that they outlive a restart.

    Times are wall-clock seconds, passed in (`now`), so a lockout survives a
    restart and tests choose the clock. The methods are blocking: the module
    runs them through `submit`, on the book's one thread, in the order asked
    (a failure is counted before the next call's check reads it). The file
    stays bounded: failures older than the longest window and ended locks are
    deleted as new ones are written, and past `max_rows` the oldest go."""

    PRUNE_EVERY = 64

    def __init__(self, path: str, max_rows: int = 100_000):
        self.path = path
        self.max_rows = max_rows
        self._lock = threading.Lock()
        # Opened by the first method that needs it: on the book's thread, not the loop.
        self._db: sqlite3.Connection | None = None
        self._writes = 0
        self._worker: ThreadPoolExecutor | None = None
        self.closed = False

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            if self.closed:
                raise RuntimeError("the lockout book is closed")
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_LOCKOUT_SCHEMA)
            self._db = db
        return self._db

    def submit(self, fn, *args) -> Future:
        """Run `fn(*args)` on the book's thread, after everything submitted before
        (a failure is logged, and left in the Future)."""
        if self.closed:
            fut: Future = Future()
            fut.set_exception(RuntimeError("the lockout book is closed"))
            return fut
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-card")
        fut = self._worker.submit(fn, *args)
        fut.add_done_callback(_log_failure)
        return fut

    def check(self, caller: str, pool: str, now: float, window: float) -> tuple[dict, int]:
        """(`locked([caller], now)`, wrong PINs counted under `pool` within the
        last `window` seconds)."""
        locked = self.locked([caller], now)
        with self._lock:
            n = self._open().execute("SELECT COUNT(*) FROM failures WHERE key = ? AND at > ?",
                                     (pool, now - window)).fetchone()[0]
        return locked, n

    def note(self, key: str, now: float) -> None:
        """Count one wrong PIN under `key`, which is never locked (a node's cards)."""
        with self._lock:
            self._open().execute("INSERT INTO failures (key, at) VALUES (?, ?)", (key, now))
            self._wrote(now)

    def guess(self, caller: str, pool: str, now: float, after: int, window: float,
              lock_for: float) -> float:
        """A wrong PIN: `note(pool)` and `fail(caller, ...)`, whose result it returns."""
        self.note(pool, now)
        return self.fail(caller, now, after, window, lock_for)

    def locked(self, keys, now: float) -> dict[str, float]:
        """The keys locked at `now`: key -> seconds left."""
        keys = list(keys)
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        with self._lock:
            rows = self._open().execute(f"SELECT key, until FROM locks WHERE key IN ({marks}) "
                                    "AND until > ?", (*keys, now)).fetchall()
        return {k: until - now for k, until in rows}

    def fail(self, key: str, now: float, after: int, window: float, lock_for: float) -> float:
        """Count one wrong PIN under `key`; when that makes `after` within the
        last `window` seconds, lock `key` for `lock_for` seconds (its count
        starts again) and return the lock's seconds, else 0."""
        with self._lock:
            self._open().execute("INSERT INTO failures (key, at) VALUES (?, ?)", (key, now))
            n = self._db.execute("SELECT COUNT(*) FROM failures WHERE key = ? AND at > ?",
                                 (key, now - window)).fetchone()[0]
            locked = n >= after
            if locked:
                self._lock_key(key, now + lock_for)
                self._db.execute("DELETE FROM failures WHERE key = ?", (key,))
            self._wrote(now)
        return float(lock_for) if locked else 0.0

    def _lock_key(self, key: str, until: float) -> None:
        self._db.execute("INSERT INTO locks (key, until) VALUES (?, ?) ON CONFLICT (key) "
                         "DO UPDATE SET until = MAX(until, excluded.until)", (key, until))

    def _wrote(self, now: float) -> None:
        self._writes += 1
        if self._writes % self.PRUNE_EVERY:
            return
        db = self._db
        db.execute("DELETE FROM failures WHERE at <= ?", (now - MAX_LOCKOUT_WINDOW,))
        db.execute("DELETE FROM locks WHERE until <= ?", (now,))
        for table, col in (("failures", "at"), ("locks", "until")):
            extra = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] - self.max_rows
            if extra > 0:
                db.execute(f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "
                           f"ORDER BY {col} LIMIT ?)", (extra,))

    def close(self) -> None:
        self.closed = True
        if self._worker is not None:
            self._worker.shutdown(wait=True)      # what was asked so far lands first
            self._worker = None
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _log_failure(fut: Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("calling card lockout book: %s", fut.exception())


def book_for(engine) -> LockoutBook:
    """The engine's lockout book (opened on first use)."""
    book = getattr(engine, "calling_card_lockouts", None)
    if book is None:
        book = LockoutBook(os.path.join(engine.cfg.data_dir, "services", "calling_card.db"))
        engine.calling_card_lockouts = book
    return book


class CallingCardModule(PromptingModule):
    code = "baton.calling_card"
    level = "service"
    outlets = ("done", "failed", "locked", "denied")

    # -- config -------------------------------------------------------------------
    @classmethod
    def check_params(cls, params: dict) -> None:
        check_keys(params, PARAM_KEYS)
        check_common(params)
        for k in TEXTS:
            check_text(params, k)
        check_text(params, "warning_text")
        pins = params.get("pins", {})
        if not isinstance(pins, dict):
            raise ValueError("pins: a table of PIN = account, e.g. { \"4321\" = \"card-1001\" }")
        for pin, account in pins.items():
            if not PIN.match(pin):
                raise ValueError(f"pins.{pin}: a PIN is 1 to 32 digits")
            if not isinstance(account, str) or not account:
                raise ValueError(f"pins.{pin}: the card's account id (a non-empty string)")
        pk = params.get("pin_key", "card_pin")
        if not isinstance(pk, str) or not pk:
            raise ValueError("pin_key: the key/value store key holding an account's PIN")
        check_number(params, "pin_min", 1, 32, integer=True)
        check_number(params, "pin_max", 1, 32, integer=True)
        pin_min = params.get("pin_min", PIN_MIN)
        if pin_min > params.get("pin_max", 32):
            raise ValueError("pin_min: more than pin_max")
        for pin in pins:
            if len(pin) < pin_min:
                raise ValueError(f"pins.{pin}: shorter than pin_min ({pin_min} digits)")
        check_number(params, "max_attempts", 1, 10, integer=True)
        check_number(params, "lockout_after", 0, MAX_LOCKOUT_AFTER, integer=True)
        check_number(params, "lockout_window", 1, MAX_LOCKOUT_WINDOW)
        check_number(params, "lockout_seconds", 1, MAX_LOCKOUT_SECONDS)
        check_number(params, "guess_budget", 0, 100_000, integer=True)
        check_number(params, "backoff_seconds", 0.1, 3600)
        check_number(params, "backoff_max", 0.1, 3600)
        if params.get("backoff_seconds", BACKOFF_SECONDS) > params.get("backoff_max", BACKOFF_MAX):
            raise ValueError("backoff_seconds: more than backoff_max")
        check_number(params, "min_digits", 1, 32, integer=True)
        check_number(params, "max_digits", 1, 32, integer=True)
        if params.get("min_digits", 1) > params.get("max_digits", 20):
            raise ValueError("min_digits: more than max_digits")
        check_number(params, "ring_timeout", 1, 300)
        check_number(params, "min_call_seconds", 0, 3600)
        check_number(params, "balance_wait", 0, 60)
        check_number(params, "warn_before", 0, 3600)
        check_bool(params, "announce_time")
        trunk = params.get("trunk")
        if trunk is not None and (not isinstance(trunk, str) or not trunk):
            raise ValueError("trunk: the name of a [trunks.NAME] to dial through")
        dial = params.get("dial", "sip:{digits}@{self}")
        if not isinstance(dial, str) or "{digits}" not in dial:
            raise ValueError("dial: a template with {digits}, e.g. \"sip:{digits}@{self}\" "
                             "(or \"{digits}\" with a trunk)")
        if trunk is None and not dial.startswith(("sip:", "sips:")):
            raise ValueError("dial: a sip: URI template, unless a trunk is given")

    # -- helpers ------------------------------------------------------------------
    def _p(self, ctl, key: str, default=None):
        v = ctl.params.get(key)
        if v is None:
            return TEXTS.get(key, default) if default is None else default
        return v

    def _ask(self, ctl, texts, callback, **kw) -> None:
        p = ctl.params
        ctl.state.ask([(t, None) for t in texts if t], callback,
                      timeout=float(p.get("timeout", 8)), voice=p.get("voice", "en"),
                      language=p.get("language"), **kw)

    def _say(self, ctl, texts, then) -> None:
        p = ctl.params
        ctl.state.say([(t, None) for t in texts if t], lambda _d, _r: then(),
                      voice=p.get("voice", "en"), language=p.get("language"))

    def _event(self, ctl, step: str, **detail) -> None:
        if ctl.engine.listeners:
            ctl.engine.notify(ctl.session, "calling_card.step", {"step": step, **detail})

    # -- the calls ----------------------------------------------------------------
    def take(self, ctl) -> None:
        if self.begin(ctl) is None:
            return
        saved = ctl.session.saved.get(KEY)
        if saved is not None and saved.get("account"):
            self._after_call(ctl, saved)
            return
        ctl.session.saved[KEY] = {"account": None, "attempts": 0, "calls": 0,
                                  "node": ctl.node}
        self._ask_pin(ctl)

    # PIN
    def _ask_pin(self, ctl, before: str | None = None) -> None:
        self._event(ctl, "pin")
        self._ask(ctl, [before, self._p(ctl, "pin_prompt")],
                  lambda d, why: self._pin_entered(ctl, d, why),
                  max_digits=int(ctl.params.get("pin_max", 32)), finish_on_key="#")

    def _candidates(self, ctl) -> list[tuple[bytes, str]]:
        out = [(_digest(str(pin)), acc) for pin, acc in (ctl.params.get("pins") or {}).items()]
        key = ctl.params.get("pin_key", "card_pin")
        for acc_id, acc in ctl.engine.cfg.accounts.items():
            pin = acc.kv.get(key)
            if pin is not None:
                out.append((_digest(str(pin)), acc_id))
        return out

    def verify(self, ctl, digits: str) -> str | None:
        """The card account of a PIN, or None; every candidate is compared,
        in constant time, whatever matches."""
        entered = _digest(digits)
        found = None
        for digest, account in self._candidates(ctl):
            if hmac.compare_digest(digest, entered) and found is None:
                found = account
        lo = int(ctl.params.get("pin_min", PIN_MIN))
        return found if len(digits) >= lo else None

    def _pin_entered(self, ctl, digits: str, why: str) -> None:
        account = self.verify(ctl, digits) if digits else None
        if int(ctl.params.get("lockout_after", LOCKOUT_AFTER)) <= 0:
            self._pin_checked(ctl, account)
            return
        # The lockout book is SQLite: asked on its own thread, the call waits.
        ctl.state.task = ctl.engine.loop.create_task(self._lockout_check(ctl, account))

    async def _lockout_check(self, ctl, account: str | None) -> None:
        p = ctl.params
        caller = caller_key(ctl.session.from_uri)
        node = ctl.node
        pool = f"cards:{node.app.name if node.app is not None else ''}/{node.name}"
        window = float(p.get("lockout_window", LOCKOUT_WINDOW))
        now = time.time()
        try:
            book = book_for(ctl.engine)
            locked, guesses = await asyncio.wrap_future(
                book.submit(book.check, caller, pool, now, window))
        except Exception:
            # The book cannot be read: the per-call limit still holds.
            log.exception("session %s: calling card lockout book failed", ctl.session.id)
            if ctl.active:
                self._pin_checked(ctl, account)
            return
        if not ctl.active:
            return
        # Past the node's budget of wrong PINs (every caller's), a PIN waits
        # before it is checked, the right one too: slower, never refused.
        delay = backoff(guesses, int(p.get("guess_budget", GUESS_BUDGET)),
                        float(p.get("backoff_seconds", BACKOFF_SECONDS)),
                        float(p.get("backoff_max", BACKOFF_MAX)))
        if delay:
            self._event(ctl, "backoff", seconds=delay, guesses=guesses)
            await asyncio.sleep(delay)
            if not ctl.active:
                return
            now = time.time()
        if caller in locked:
            # The per-source limit: refused, the right PIN too, so the answer never
            # tells a guesser it was right; the card stays open to its owner.
            if account is None:
                book.submit(book.note, pool, now)
            self._locked_out(ctl, locked[caller])
            return
        if account is not None:
            self._pin_checked(ctl, account)
            return
        lock_for = float(p.get("lockout_seconds", LOCKOUT_SECONDS))
        try:
            seconds = await asyncio.wrap_future(book.submit(
                book.guess, caller, pool, now, int(p.get("lockout_after", LOCKOUT_AFTER)),
                window, lock_for))
        except Exception:
            log.exception("session %s: calling card lockout book failed", ctl.session.id)
            seconds = 0.0
        if not ctl.active:
            return
        if seconds or delay:
            ctl.session.saved[KEY]["attempts"] += 1
            self._event(ctl, "pin-invalid", attempts=ctl.session.saved[KEY]["attempts"])
            if seconds:
                self._locked_out(ctl, seconds)
            else:
                # Under back-off one wrong PIN per call: guessing costs a call each time.
                self._failed(ctl)
            return
        self._pin_checked(ctl, None)

    def _locked_out(self, ctl, seconds_left: float) -> None:
        self._event(ctl, "lockout", seconds_left=round(seconds_left, 3))
        self._say(ctl, [self._p(ctl, "lockout_text")], lambda: ctl.release("locked"))

    def _failed(self, ctl) -> None:
        self._event(ctl, "locked")
        self._say(ctl, [self._p(ctl, "locked_text")], lambda: ctl.release("failed"))

    def _pin_checked(self, ctl, account: str | None) -> None:
        saved = ctl.session.saved[KEY]
        if account is None:
            saved["attempts"] += 1
            self._event(ctl, "pin-invalid", attempts=saved["attempts"])
            if saved["attempts"] >= int(ctl.params.get("max_attempts", 3)):
                self._failed(ctl)
                return
            self._ask_pin(ctl, self._p(ctl, "pin_invalid_text"))
            return
        saved["account"] = account
        saved["attempts"] = 0
        decision = ctl.session.set_account(account, reason="calling-card:pin")
        self._event(ctl, "authenticated", account=account)
        # In a cluster the card's funds are reserved first, off the loop (docs/cluster.md).
        when_decided(decision, lambda d: self._card_decided(ctl, d))

    def _card_decided(self, ctl, decision) -> None:
        if not ctl.active:
            return
        if not decision.allow:
            self._no_funds(ctl, decision.reason)
            return
        self._balance_then_destination(ctl, [])

    # balance and destination
    def _balance_texts(self, ctl) -> list[str]:
        """The balance (and the time it lasts at the bridge rate) to speak, from
        the policy snapshot; nothing when no accountant reports on the card."""
        policy = ctl.engine.policy
        acc = policy.account(ctl.session.account) if hasattr(policy, "account") else None
        if acc is None or acc.get("balance_micro") is None:
            return []
        out = [self._p(ctl, "balance_text").replace(
            "{balance}", spoken_money(acc["balance_micro"], acc.get("currency", "USD")))]
        if ctl.params.get("announce_time", True):
            billed, _funds, _plan = policy.limit_for(ctl.session, BRIDGE, "basic")
            if billed is not None:
                from engine.sessions.prepaid import limit_seconds

                out.append(self._p(ctl, "time_text").replace(
                    "{time}", spoken_time(int(limit_seconds(billed) or 0))))
        return out

    def _balance_then_destination(self, ctl, before: list) -> None:
        texts = before + self._balance_texts(ctl)
        self._ask_destination(ctl, texts)

    def _ask_destination(self, ctl, before: list) -> None:
        self._event(ctl, "destination")
        self._ask(ctl, before + [self._p(ctl, "destination_prompt")],
                  lambda d, why: self._destination_entered(ctl, d, why),
                  max_digits=int(ctl.params.get("max_digits", 20)), finish_on_key="#")

    def _destination_entered(self, ctl, digits: str, why: str) -> None:
        saved = ctl.session.saved[KEY]
        lo = int(ctl.params.get("min_digits", 1))
        if not digits or not DIGITS.match(digits) or len(digits) < lo:
            saved["attempts"] += 1
            if saved["attempts"] > int(ctl.params.get("retries", 2)):
                self._goodbye(ctl)
                return
            self._ask_destination(ctl, [self._p(ctl, "destination_invalid_text")])
            return
        saved["attempts"] = 0
        policy = ctl.engine.policy
        if hasattr(policy, "limit_for"):
            billed, funds, _plan = policy.limit_for(ctl.session, BRIDGE, "basic")
            need = float(ctl.params.get("min_call_seconds", 10))
            if billed is not None and billed < max(need, 1):
                self._no_funds(ctl, f"{billed} s affordable")
                return
        self._dial(ctl, digits)

    def _dial(self, ctl, digits: str) -> None:
        saved = ctl.session.saved[KEY]
        p = ctl.params
        card = saved["node"]
        to = str(p.get("dial", "sip:{digits}@{self}")).replace("{digits}", digits)
        params = {"to": to, "timeout": p.get("ring_timeout", 30)}
        for k in ("trunk", "warn_before", "warning_text", "warning_voice"):
            if k in p:
                params[k] = p[k]
        back = {o: card for o in ("busy", "no-answer", "failed", "done", "denied")}
        node = Node(name=f"{card.name}:call", module=BRIDGE, params=params, outlets=back,
                    events={"dialled-hangup": card}, app=card.app)
        saved["calls"] += 1
        ctl.session.params["CallingCardDestination"] = digits
        self._event(ctl, "dialling", destination=digits, call=saved["calls"])
        ctl.transfer(node, reason="calling-card:dial")

    # after a call
    def _after_call(self, ctl, saved) -> None:
        reason = ctl.span.reason if ctl.span is not None else ""
        status = ctl.params.get("DialCallStatus")
        if reason == "policy-denied":
            self._no_funds(ctl, "bridge denied")
            return
        outcome = {"busy": "busy_text", "no-answer": "no_answer_text",
                   "failed": "failed_text"}.get(status, "completed_text")
        writer = getattr(ctl.engine.stamper, "writer", None)
        # The transition back here closed the bridged segment: its ring seq.
        seq = writer.next_seq - 1 if writer is not None else None
        self._event(ctl, "after-call", outcome=status or "completed")
        ctl.state.task = ctl.engine.loop.create_task(
            self._announce_after(ctl, seq, self._p(ctl, outcome)))

    async def _announce_after(self, ctl, seq, outcome: str) -> None:
        policy = ctl.engine.policy
        if seq is not None and hasattr(policy, "covers"):
            # Wait for a snapshot written after the accountant read the record
            # that closed the call, so the balance includes the call.
            deadline = ctl.engine.loop.time() + float(ctl.params.get("balance_wait", 5))
            node = ctl.engine.stamper.node_id
            while ctl.active and ctl.engine.loop.time() < deadline:
                policy.refresh()
                if policy.covers(seq, node):
                    break
                await asyncio.sleep(0.05)
            else:
                if ctl.active:
                    log.info("session %s: no policy snapshot covers the call yet",
                             ctl.session.id)
        if not ctl.active:
            return
        texts = [outcome] + self._balance_texts(ctl)
        self._event(ctl, "another", balance_micro=(policy.account(ctl.session.account) or {})
                    .get("balance_micro") if hasattr(policy, "account") else None)
        self._ask(ctl, texts + [self._p(ctl, "another_prompt")],
                  lambda d, why: self._another(ctl, d), max_digits=1)

    def _another(self, ctl, digits: str) -> None:
        if digits == "1":
            self._ask_destination(ctl, [])
            return
        self._goodbye(ctl)

    def _goodbye(self, ctl) -> None:
        self._event(ctl, "goodbye")
        self._say(ctl, [self._p(ctl, "goodbye_text")], lambda: ctl.release("done"))

    def _no_funds(self, ctl, why: str) -> None:
        log.info("session %s: calling card %s: %s", ctl.session.id, ctl.session.account, why)
        self._event(ctl, "no-funds", reason=why)
        self._say(ctl, [self._p(ctl, "no_funds_text")], lambda: ctl.release("denied"))


__all__ = ["CallingCardModule", "LockoutBook", "backoff", "book_for", "caller_key", "spoken_money",
           "spoken_time"]
