"""Signed webhooks with an outbox: notifications that survive restarts.

A message is `{"id", "type", "created", "data"}` as JSON, POSTed with

    Baton-Webhook-Id: msg_...            (the same on every attempt: dedupe by it)
    Baton-Webhook-Timestamp: 1795000000  (seconds, the time of this attempt)
    Baton-Signature: v1=<hex HMAC-SHA256 over "ID.TIMESTAMP." + body>

Every message is written to a small SQLite outbox (`DATA/webhooks/NAME.db`)
before `send()` returns, and deleted only after a 2xx answer; anything else
(a 5xx, a refused connection, a timeout) is retried with exponential backoff
up to `webhooks.max_attempts` times, after which the message stays in the
outbox as failed. A message that was due when the process stopped is sent
when it starts again, so nothing is lost; a receiver may see one twice and
dedupes by its id.

Two senders share the outbox format: `Webhooks` runs on the engine's asyncio
loop (aiohttp), `SyncWebhooks` on a thread of its own (urllib) for the
accountant, which is not asyncio. Both take the `[webhooks]` settings of the
config (`WebhookSettings`) and the per-account `accounts.ID.webhook_url` /
`webhook_secret`.

Events: `session.started`, `session.ended` (the engine), `balance.low`,
`cap.reached`, `invoice.ready` (the accountant). docs/billing.md describes
the settings and how a receiver checks a signature (`verify()`).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("baton.webhooks")

__all__ = ["sign", "verify", "EVENTS", "WebhookSettings", "Outbox", "Webhooks", "SyncWebhooks",
           "check_config", "HEADER_ID", "HEADER_TIMESTAMP", "HEADER_SIGNATURE", "AccountEvent",
           "EngineHooks", "payload_of"]

EVENTS = ("session.started", "session.ended", "balance.low", "cap.reached", "invoice.ready")
HEADER_ID = "Baton-Webhook-Id"
HEADER_TIMESTAMP = "Baton-Webhook-Timestamp"
HEADER_SIGNATURE = "Baton-Signature"
MAX_BODY = 256 * 1024          # a payload larger than this is a bug, not a notification
MIN_SECRET = 16

_KEYS = {
    "url": "where messages are POSTed (http:// or https://)",
    "secret": "HMAC-SHA256 key that signs them (at least 16 characters)",
    "events": "the event types sent (default: all)",
    "max_attempts": "attempts per message before it is kept as failed (default 12)",
    "retry_base": "seconds before the first retry; doubles each time (default 2)",
    "retry_max": "longest pause between attempts in seconds (default 900)",
    "timeout": "seconds an attempt may take (default 10)",
    "low_balance": "funds left below which balance.low is sent (an amount; default off)",
}
_ACCOUNT_KEYS = ("webhook_url", "webhook_secret", "low_balance")


# -- signing ------------------------------------------------------------------------------

def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of `f"{msg_id}.{timestamp}.".encode() + body` under `secret`."""
    mac = hmac.new(secret.encode(), f"{msg_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    return mac.hexdigest()


def verify(secret: str, headers, body: bytes, *, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """A receiver's check: the signature header holds a `v1=` signature of
    this id, timestamp and body under `secret`, and the timestamp is within
    `tolerance` seconds of now (replays of old deliveries are refused).
    `headers` is any case-insensitive mapping (aiohttp's, or a dict)."""
    get = headers.get
    msg_id = get(HEADER_ID) or get(HEADER_ID.lower())
    ts = get(HEADER_TIMESTAMP) or get(HEADER_TIMESTAMP.lower())
    sigs = get(HEADER_SIGNATURE) or get(HEADER_SIGNATURE.lower())
    if not msg_id or not ts or not sigs:
        return False
    try:
        timestamp = int(ts)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    want = sign(secret, msg_id, timestamp, body)
    # Several space-separated signatures are allowed (a secret being rotated).
    # Bytes: compare_digest raises on a str with non-ASCII characters (a forged header).
    return any(part.startswith("v1=") and hmac.compare_digest(part[3:].encode(), want.encode())
               for part in sigs.split())


def new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex


# -- settings -----------------------------------------------------------------------------

@dataclass
class WebhookSettings:
    """`[webhooks]` and the accounts' webhook keys, checked."""

    url: str = ""
    secret: str = ""
    events: frozenset = frozenset(EVENTS)
    max_attempts: int = 12
    retry_base: float = 2.0
    retry_max: float = 900.0
    timeout: float = 10.0
    low_balance: str | None = None
    accounts: dict = field(default_factory=dict)   # id -> {"url", "secret", "low_balance"}

    @classmethod
    def from_raw(cls, raw: dict | None, path: str = "<config>") -> WebhookSettings:
        """From the whole TOML dict; a problem raises config.ConfigError naming the key."""
        check_config(raw or {}, path)
        raw = raw or {}
        w = raw.get("webhooks", {})
        s = cls(url=w.get("url", ""), secret=w.get("secret", ""),
                events=frozenset(w.get("events", EVENTS)),
                max_attempts=w.get("max_attempts", 12), retry_base=float(w.get("retry_base", 2.0)),
                retry_max=float(w.get("retry_max", 900.0)), timeout=float(w.get("timeout", 10.0)),
                low_balance=_amount_str(w.get("low_balance")))
        for acc_id, acc in (raw.get("accounts") or {}).items():
            if not isinstance(acc, dict):
                continue
            entry = {k: acc[k] for k in _ACCOUNT_KEYS if k in acc}
            if "low_balance" in entry:
                entry["low_balance"] = _amount_str(entry["low_balance"])
            if entry:
                s.accounts[acc_id] = entry
        return s

    @property
    def configured(self) -> bool:
        """Whether any message can have a destination."""
        return bool(self.url) or any(a.get("webhook_url") for a in self.accounts.values())

    def destination(self, account: str | None) -> tuple[str, str]:
        """(url, secret) of an account's messages: its own, else the global ones."""
        url, ref = self.destination_ref(account)
        return url, self.secret_of(ref) or ""

    def destination_ref(self, account: str | None) -> tuple[str, str]:
        """(url, key reference) of an account's messages: the outbox keeps the
        reference, and the key is looked up when a message is signed."""
        acc = self.accounts.get(account or "", {})
        if acc.get("webhook_url"):
            return acc["webhook_url"], f"account:{account}"
        return self.url, "global"

    def secret_of(self, ref: str) -> str | None:
        """The signing key a reference names (None: not known now)."""
        if ref == "global":
            return self.secret or None
        if ref.startswith("account:"):
            return self.accounts.get(ref[8:], {}).get("webhook_secret")
        return None

    def low_balance_of(self, account: str) -> str | None:
        """The account's low-balance threshold as a decimal string, or None."""
        acc = self.accounts.get(account, {})
        return acc.get("low_balance", self.low_balance)

    def delay(self, attempts: int) -> float:
        """Seconds before attempt `attempts + 1`: doubling, capped, with ±20 % jitter
        so that many messages failing together do not retry in step."""
        d = min(self.retry_max, self.retry_base * (2 ** max(0, attempts - 1)))
        return d * random.uniform(0.8, 1.2)


def _amount_str(v) -> str | None:
    if v is None:
        return None
    return repr(v) if isinstance(v, float) else str(v)


def check_config(raw: dict, path: str) -> None:
    """Check `[webhooks]` and the accounts' webhook keys (called by engine.config.load)."""
    from engine.common.errors import ConfigError

    w = raw.get("webhooks", {})
    if not isinstance(w, dict):
        raise ConfigError(path, "webhooks", "expected a table")
    for k in w:
        if k not in _KEYS:
            raise ConfigError(path, f"webhooks.{k}", f"unknown key (known: {', '.join(sorted(_KEYS))})")
    if "url" in w:
        _check_url(path, "webhooks.url", w["url"])
        if "secret" not in w:
            raise ConfigError(path, "webhooks.secret", "required when webhooks.url is set "
                                                       "(every message is signed)")
    if "secret" in w:
        _check_secret(path, "webhooks.secret", w["secret"])
    if "events" in w:
        ev = w["events"]
        if not isinstance(ev, list) or not all(isinstance(e, str) for e in ev):
            raise ConfigError(path, "webhooks.events", "a list of event types")
        bad = [e for e in ev if e not in EVENTS]
        if bad:
            raise ConfigError(path, "webhooks.events", f"unknown event {bad[0]!r} "
                                                       f"(events: {', '.join(EVENTS)})")
    if "max_attempts" in w:
        n = w["max_attempts"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 100:
            raise ConfigError(path, "webhooks.max_attempts", "an integer from 1 to 100")
    for k, lo, hi in (("retry_base", 0.001, 3600), ("retry_max", 0.001, 86400), ("timeout", 0.1, 120)):
        if k in w:
            v = w[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ConfigError(path, f"webhooks.{k}", f"seconds between {lo:g} and {hi:g}")
    if "low_balance" in w:
        _check_amount(path, "webhooks.low_balance", w["low_balance"])
    accounts = raw.get("accounts", {})
    if not isinstance(accounts, dict):
        return
    for acc_id, acc in accounts.items():
        if not isinstance(acc, dict):
            continue
        key = f"accounts.{acc_id}"
        if "webhook_url" in acc:
            _check_url(path, f"{key}.webhook_url", acc["webhook_url"])
            # The platform's key must never sign what goes to a tenant's receiver.
            if "webhook_secret" not in acc:
                raise ConfigError(path, f"{key}.webhook_secret",
                                  "required when webhook_url is set (the account's own key)")
        if "webhook_secret" in acc:
            _check_secret(path, f"{key}.webhook_secret", acc["webhook_secret"])
        if "low_balance" in acc:
            _check_amount(path, f"{key}.low_balance", acc["low_balance"])


def _check_url(path, key, url) -> None:
    from urllib.parse import urlsplit

    from engine.common.errors import ConfigError

    if not isinstance(url, str) or not url.startswith(("http://", "https://")) \
            or not urlsplit(url).hostname:
        raise ConfigError(path, key, f"an http:// or https:// URL, not {url!r}")


def _check_secret(path, key, secret) -> None:
    from engine.common.errors import ConfigError

    if not isinstance(secret, str) or len(secret) < MIN_SECRET:
        raise ConfigError(path, key, f"a string of at least {MIN_SECRET} characters")


def _check_amount(path, key, value) -> None:
    from engine.accounting.money import MoneyError, parse_money
    from engine.common.errors import ConfigError

    try:
        parse_money(value, key)
    except MoneyError as exc:
        raise ConfigError(path, key, exc.problem) from None


# -- the outbox ---------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    event TEXT NOT NULL,
    account TEXT,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,       -- a reference to the signing key, never the key
    body BLOB NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_at);
CREATE TABLE IF NOT EXISTS marks (key TEXT PRIMARY KEY, at REAL NOT NULL);
"""


@dataclass
class Message:
    id: str
    event: str
    account: str | None
    url: str
    secret: str        # the key's reference (global, account:ID, key:FINGERPRINT)
    body: bytes
    attempts: int = 0


class Outbox:
    """The undelivered messages of one sender, in SQLite (thread-safe)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def exists(self) -> bool:
        """Whether anything was ever stored (the file is created on first use)."""
        return self._conn is not None or os.path.exists(self.path)

    @property
    def _db(self) -> sqlite3.Connection:
        # Opened on first use: an engine without webhooks never creates the file.
        if self._conn is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL with synchronous=NORMAL survives a process crash (not a power cut)
            # without an fsync per message.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    def add(self, m: Message | None, now: float, once: str | None = None) -> bool:
        """Store a message (None: only the mark); with `once`, only if that key
        was never marked, and mark it in the same transaction. False if it was."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if once is not None and db.execute("INSERT OR IGNORE INTO marks (key, at) "
                                                   "VALUES (?, ?)", (once, now)).rowcount == 0:
                    db.execute("ROLLBACK")
                    return False
                if m is not None:
                    db.execute("INSERT OR IGNORE INTO outbox (id, event, account, url, secret, "
                               "body, created, next_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (m.id, m.event, m.account, m.url, m.secret, m.body, now, now))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return True

    def marked(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM marks WHERE key = ?", (key,)).fetchone() is not None

    def unmark(self, key: str) -> bool:
        """Forget a `once` key (e.g. a balance back above its threshold)."""
        with self._lock:
            return self._db.execute("DELETE FROM marks WHERE key = ?", (key,)).rowcount > 0

    def due(self, now: float, limit: int, skip: set | frozenset = frozenset()) -> list[Message]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, event, account, url, secret, body, attempts FROM outbox "
                "WHERE state = 'pending' AND next_at <= ? ORDER BY next_at LIMIT ?",
                (now, limit + len(skip))).fetchall()
        return [Message(*r) for r in rows if r[0] not in skip][:limit]

    def next_due(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_at) FROM outbox WHERE state = 'pending'").fetchone()
        return row[0]

    def delivered(self, msg_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (msg_id,))

    def retry(self, m: Message, error: str, next_at: float | None) -> None:
        """Record a failed attempt: due again at next_at, or failed for good (None)."""
        with self._lock:
            self._db.execute("UPDATE outbox SET attempts = ?, last_error = ?, next_at = ?, "
                             "state = ? WHERE id = ?",
                             (m.attempts, error[:500], next_at if next_at is not None else 0,
                              "pending" if next_at is not None else "failed", m.id))

    def pending(self) -> list[dict]:
        """Every message not delivered yet (pending and failed), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, event, account, url, attempts, state, last_error, "
                                    "created, next_at FROM outbox ORDER BY created").fetchall()
        keys = ("id", "event", "account", "url", "attempts", "state", "last_error", "created",
                "next_at")
        return [dict(zip(keys, r)) for r in rows]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# -- the senders --------------------------------------------------------------------------

class _Sender:
    """What both senders share: building, signing and the outbox bookkeeping."""

    def __init__(self, settings: WebhookSettings, data_dir: str, name: str) -> None:
        self.settings = settings
        self.outbox = Outbox(os.path.join(data_dir, "webhooks", f"{name}.db"))
        self.listeners: list[Callable[[str, dict, str | None, str], None]] = []
        self.keys: dict[str, str] = {}   # key:FINGERPRINT -> a key a caller passed to send()
        self.sent = 0
        self.delivered = 0
        self.failed = 0

    def _enqueue(self, event: str, payload: dict, url: str | None, secret: str | None,
                 account: str | None, once: str | None = None) -> tuple[str, bool]:
        if event not in EVENTS and not event.count("."):
            raise ValueError(f"event: {event!r} is not an event type such as session.started")
        if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            raise ValueError(f"url: an http:// or https:// URL, not {url!r}")
        msg_id = new_message_id()
        now = time.time()
        if once is not None and self.outbox.marked(once):
            return "", False
        for listener in list(self.listeners):
            try:
                listener(event, payload, account, msg_id)
            except Exception:
                log.exception("webhook listener failed")
        s = self.settings
        if url is None:
            if event not in s.events:
                if once is not None:
                    self.outbox.add(None, now, once)
                return msg_id, False
            url, ref = s.destination_ref(account)
        else:
            ref = s.destination_ref(account)[1]
        if secret:
            ref = self._key_ref(secret)
        if not url:
            if once is not None:
                self.outbox.add(None, now, once)
            return msg_id, False
        if not self._secret(ref):
            raise ValueError(f"secret: a webhook to {url} needs a signing secret")
        secret = ref
        body = json.dumps({"id": msg_id, "type": event,
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                           "data": payload}, separators=(",", ":"), default=str).encode()
        if len(body) > MAX_BODY:
            raise ValueError(f"payload: {len(body)} bytes is more than {MAX_BODY}")
        if not self.outbox.add(Message(msg_id, event, account, url, secret, body), now, once):
            return "", False
        self.sent += 1
        return msg_id, True

    def _key_ref(self, secret: str) -> str:
        """A key passed to send() is kept in memory only; rows name its fingerprint."""
        ref = "key:" + hashlib.sha256(b"baton-webhook-key\0" + secret.encode()).hexdigest()[:32]
        self.keys[ref] = secret
        return ref

    def _secret(self, ref: str) -> str | None:
        if ref.startswith("key:"):
            return self.keys.get(ref)
        if ref == "global" or ref.startswith("account:"):
            return self.settings.secret_of(ref)
        return ref or None     # a row written before references: the key itself

    def _headers(self, m: Message) -> dict[str, str]:
        secret = self._secret(m.secret)
        if secret is None:
            # A key passed to send() before a restart, not passed again yet.
            raise LookupError("the signing key is not known to this process")
        ts = int(time.time())
        return {"Content-Type": "application/json", "User-Agent": "Baton-Webhooks",
                HEADER_ID: m.id, HEADER_TIMESTAMP: str(ts),
                HEADER_SIGNATURE: "v1=" + sign(secret, m.id, ts, m.body)}

    def _result(self, m: Message, error: str | None) -> None:
        if error is None:
            self.outbox.delivered(m.id)
            self.delivered += 1
            return
        m.attempts += 1
        s = self.settings
        if m.attempts >= s.max_attempts:
            log.warning("webhook %s (%s) to %s failed %d times, giving up: %s",
                        m.id, m.event, m.url, m.attempts, error)
            self.outbox.retry(m, error, None)
            self.failed += 1
        else:
            log.info("webhook %s (%s) to %s failed (attempt %d): %s", m.id, m.event, m.url,
                     m.attempts, error)
            self.outbox.retry(m, error, time.time() + s.delay(m.attempts))

    def pending(self) -> list[dict]:
        """The outbox: messages not delivered yet."""
        return self.outbox.pending()

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "delivered": self.delivered, "failed": self.failed}


class Webhooks(_Sender):
    """The engine's sender, on its asyncio loop.

    `send()` may be called from the loop's thread at any time (before
    `start()` too: messages wait in the outbox); delivery runs as a task of
    the loop, at most `CONCURRENCY` requests at a time.
    """

    CONCURRENCY = 16
    BATCH = 64

    def __init__(self, settings: WebhookSettings, data_dir: str, name: str = "engine") -> None:
        super().__init__(settings, data_dir, name)
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._http = None
        self._inflight: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._sem: asyncio.Semaphore | None = None

    def send(self, event: str, payload: dict, *, url: str | None = None,
             secret: str | None = None, account: str | None = None,
             once: str | None = None) -> str:
        """Queue a message and return its id; it is stored before this returns.
        Without `url`, the account's (else the global) webhook is used, and an
        event not in `webhooks.events` is only shown to listeners (Watch).
        With `once`, a key: nothing happens (and "" is returned) if a message
        with that key was sent before, by this process or an earlier one."""
        msg_id, queued = self._enqueue(event, payload, url, secret, account, once)
        if queued and self._wake is not None:
            self._wake.set()
        return msg_id

    async def start(self) -> None:
        self._stopping = False
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(self.CONCURRENCY)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        import aiohttp

        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout))
        wake = self._wake
        while True:
            if not self.outbox.exists():
                # Nothing was ever sent: sleep until send() stores the first message.
                await wake.wait()
                wake.clear()
                continue
            now = time.time()
            for m in self.outbox.due(now, self.BATCH, self._inflight):
                self._inflight.add(m.id)
                t = asyncio.get_running_loop().create_task(self._deliver(m))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
            nxt = self.outbox.next_due()
            now = time.time()
            if nxt is None:
                wait = 1.0
            elif nxt > now:
                wait = min(1.0, nxt - now)
            else:
                # Due ones are in flight: each delivery's end wakes this loop.
                wait = 1.0 if self._inflight else 0.0
            wake.clear()
            if self._stopping:
                return
            # asyncio.timeout, not wait_for: on 3.11 wait_for returns the result when a
            # cancel lands as the wait completes (a cancelled delivery sets `wake`),
            # and the loop would outlive stop().
            try:
                async with asyncio.timeout(wait):
                    await wake.wait()
            except TimeoutError:
                pass

    async def _deliver(self, m: Message) -> None:
        try:
            async with self._sem:
                error = None
                try:
                    async with self._http.post(m.url, data=m.body, headers=self._headers(m),
                                               allow_redirects=False) as resp:
                        await resp.read()
                        if not 200 <= resp.status < 300:
                            error = f"HTTP {resp.status}"
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self._result(m, error)
        finally:
            self._inflight.discard(m.id)
            if self._wake is not None:
                self._wake.set()

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is due or in flight (tests, graceful stop)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self._inflight and not self.outbox.exists():
                return True
            nxt = self.outbox.next_due()
            if not self._inflight and (nxt is None or nxt > time.time()):
                return True
            await asyncio.sleep(0.02)
        return False

    async def stop(self, grace: float = 1.0) -> None:
        """Deliver what is due for up to `grace` seconds; the rest stays in the
        outbox for the next start."""
        if self._task is not None:
            await self.flush(grace)
            self._stopping = True
            self._task.cancel()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(self._task, *self._tasks, return_exceptions=True)
            self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        self.outbox.close()


class SyncWebhooks(_Sender):
    """A sender for a process without an event loop (the accountant): `send()`
    stores the message and returns; a daemon thread delivers it (urllib)."""

    def __init__(self, settings: WebhookSettings, data_dir: str, name: str = "accountant") -> None:
        super().__init__(settings, data_dir, name)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None

    def send(self, event: str, payload: dict, *, url: str | None = None,
             secret: str | None = None, account: str | None = None,
             once: str | None = None) -> str:
        """As `Webhooks.send`; callable from any thread."""
        msg_id, queued = self._enqueue(event, payload, url, secret, account, once)
        if queued:
            self._idle.clear()
            self._wake.set()
        return msg_id

    def start(self) -> SyncWebhooks:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="baton-webhooks", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            due = self.outbox.due(time.time(), 32)
            for m in due:
                if self._stop.is_set():
                    return
                self._result(m, self._post(m))
            if due:
                continue
            nxt = self.outbox.next_due()
            self._idle.set()
            wait = 1.0 if nxt is None else max(0.0, min(1.0, nxt - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

    def _post(self, m: Message) -> str | None:
        try:
            req = urllib.request.Request(m.url, data=m.body, headers=self._headers(m),
                                         method="POST")
            with _OPENER.open(req, timeout=self.settings.timeout) as resp:
                resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if 200 <= status < 300 else f"HTTP {status}"

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is due (tests, a graceful stop)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            nxt = self.outbox.next_due()
            if (nxt is None or nxt > time.time()) and (self._thread is None or self._idle.is_set()):
                return True
            self._wake.set()
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.outbox.close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect is an answer, not a delivery
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def payload_of(session, *, ended: bool = False) -> dict[str, Any]:
    """The `data` of session.started / session.ended."""
    d = {"session_id": session.id, "account": session.account, "number": session.number or "",
         "from": session.from_uri or "", "to": session.to_uri or "",
         "direction": session.direction, "started_wall_ns": session.started_wall}
    if ended:
        d.update(reason=session.end_reason or "", ended_wall_ns=session.ended_wall or 0,
                 duration_ms=((session.ended_mono or 0) - (session.started_mono or 0)) // 1_000_000
                 if getattr(session, "ended_mono", None) else 0,
                 modules=[s.module for s in session.history])
    else:
        d["module"] = session.module.code if session.module is not None else ""
    return d


class AccountEvent:
    """What an engine listener sees as the "session" of an account-wide event
    (balance.low, cap.reached, invoice.ready): no id, no module."""

    __slots__ = ("account", "id", "module", "ended")

    def __init__(self, account: str) -> None:
        self.account = account
        self.id = ""
        self.module = None
        self.ended = True


class EngineHooks:
    """An engine listener that turns session events into session.started /
    session.ended: a webhook message (when one is configured) and the same
    event for the other listeners (Watch streams)."""

    def __init__(self, engine, webhooks: Webhooks) -> None:
        self.engine = engine
        self.webhooks = webhooks
        self._settings = None       # the settings `_configured` was worked out for
        self._configured = False

    def __call__(self, session, event: str, detail: dict) -> None:
        if event == "transition":
            if detail.get("from"):
                return
            kind, payload = "session.started", None
        elif event == "ended":
            kind, payload = "session.ended", None
        else:
            return
        engine = self.engine
        # Someone else wants session.started / session.ended (a Watch stream); a
        # listener that never does says so with `session_events = False`.
        watched = False
        for listener in engine.listeners:
            if listener is not self and getattr(listener, "session_events", True):
                watched = True
                break
        # Twice per call: `configured` walks every account, so it is kept per settings object.
        settings = self.webhooks.settings
        if settings is not self._settings:
            self._settings, self._configured = settings, settings.configured
        configured = self._configured
        if not (configured or watched):
            return
        payload = payload_of(session, ended=kind == "session.ended")
        if configured:
            self.webhooks.send(kind, payload, account=session.account)
        if watched:
            engine.notify(session, kind, payload)
