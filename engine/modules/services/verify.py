"""`baton.verify`: one-time codes for two-factor checks.

A verification is created over the API (`Verify.Create`) for a number or SIP
address, and proven in one of three ways:
- `channel = "call"`: the engine calls the address and speaks the code (this
  module in `speak` mode); the person types it into a web page, whose server
  sends it with `Verify.Check`;
- `channel = "inbound"`: Create returns the code (shown on a web page); the
  person calls an app whose node runs this module (in `collect` mode, the
  default) from that number and keys the code in;
- `channel = "none"`: Create returns the code, delivered some other way, and
  `Verify.Check` proves it;
- `channel = "sms"` (or `"message"`): the engine texts the code to the address
  (SIP MESSAGE, `message` param's wording), metered as `message_out` of this
  module; the person types it into a web page, proven with `Verify.Check`.

Codes are stored only as an HMAC-SHA256 (a per-engine key in
`DATA_DIR/services/verify.key` and a salt per code) in
`DATA_DIR/services/verify.db`, compared in constant time
(`hmac.compare_digest`), expire after `ttl_seconds` and allow `max_attempts`
wrong entries (the keypad and Check count together). Creating a code for an
address cancels its earlier pending codes. Every outcome (`verified`,
`failed`, `expired`) is a `verify.result` session event (Watch); the module
also leaves through the outlet of the same name.

An inbound call proves its number only where the From can be believed: the
call came from a trunk marked `trusted = true`, or the node sets `trust_from =
true` because an authenticating front door (an SBC) asserts the From before the
engine; otherwise the module ends `failed` (VerifyReason `untrusted-caller`).

Node params (collect mode): `trust_from`, `prompt`, `invalid_prompt`, `verified_prompt`,
`failed_prompt`, `expired_prompt`, `missing_prompt` (no code is pending for
the caller), `timeout` (seconds, default 10), `retries` (prompts repeated
when nothing is keyed in, default 2), `voice`, `language`. Keys end with `#`
or when the code's length is reached. Speak mode (`mode = "speak"`, set by
Create's call): `message` (default "Your verification code is {code}."),
`repeat` (default 2), then the `done` outlet.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from engine.common.guard import trusted_source
from engine.modules.services.prompting import (Prompter, PromptingModule, check_common, check_keys, check_number,
                        check_text)

log = logging.getLogger("baton.modules.verify")

EVENT = "verify.result"
CHANNELS = ("call", "inbound", "none", "sms", "message")
TEXT_CHANNELS = ("sms", "message")
FINAL = ("verified", "failed", "expired", "canceled")
MIN_LENGTH, MAX_LENGTH = 4, 10
MIN_TTL, MAX_TTL = 1, 86400
MAX_ATTEMPTS = 20
NODE_KEYS = ("mode", "prompt", "invalid_prompt", "verified_prompt", "failed_prompt",
             "expired_prompt", "missing_prompt", "message", "repeat", "timeout", "retries",
             "voice", "language", "verification_id", "trust_from")
PROMPTS = {
    "prompt": "Please enter your verification code, then press pound.",
    "invalid_prompt": "That code is not correct. Please try again.",
    "verified_prompt": "Thank you. Your code is verified.",
    "failed_prompt": "Sorry, the code could not be verified. Goodbye.",
    "expired_prompt": "Sorry, this code has expired. Goodbye.",
    "missing_prompt": "Sorry, there is no code to verify for this number. Goodbye.",
}
MESSAGE = "Your verification code is {code}."


class VerifyError(ValueError):
    """Bad input to create or check: `field: problem`."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


@dataclass
class Verification:
    id: str
    account: str
    to: str
    to_user: str
    channel: str
    length: int
    status: str
    attempts: int
    max_attempts: int
    created_wall_ns: int
    expires_wall_ns: int
    updated_wall_ns: int
    session_id: str = ""
    call_outcome: str = ""

    @property
    def attempts_left(self) -> int:
        return max(0, self.max_attempts - self.attempts) if self.status == "pending" else 0

    def as_dict(self) -> dict:
        return {"verification_id": self.id, "account": self.account, "to": self.to,
                "channel": self.channel, "status": self.status, "attempts": self.attempts,
                "max_attempts": self.max_attempts, "expires_wall_ns": self.expires_wall_ns,
                "session_id": self.session_id}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS verifications (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    to_addr TEXT NOT NULL,
    to_user TEXT NOT NULL,
    channel TEXT NOT NULL,
    length INTEGER NOT NULL,
    salt BLOB NOT NULL,
    code_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    created_wall_ns INTEGER NOT NULL,
    expires_wall_ns INTEGER NOT NULL,
    updated_wall_ns INTEGER NOT NULL,
    session_id TEXT NOT NULL DEFAULT '',
    call_outcome TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS verifications_to ON verifications (account, to_user, status);
"""
_COLS = ("id, account, to_addr, to_user, channel, length, status, attempts, max_attempts, "
         "created_wall_ns, expires_wall_ns, updated_wall_ns, session_id, call_outcome")


def user_of(address: str) -> str:
    """The part of an address a caller is matched by: the user of a SIP URI
    (without a leading +), or the number itself."""
    a = address.strip().strip("<>")
    low = a.lower()
    for scheme in ("sips:", "sip:", "tel:"):
        if low.startswith(scheme):
            a = a[len(scheme):]
            break
    a = a.split(";", 1)[0].split("@", 1)[0]
    return a.lstrip("+")


def spoken(code: str) -> str:
    return ", ".join(code)


class VerifyService:
    """The engine's verifications: store, keys, expiry timers and the events.

    The store is SQLite, and its methods block: the engine calls them through
    `run` (or `submit`), on the service's one thread, in the order asked, so
    the event loop never waits on the file and a Check sent after a Create
    sees the code Create wrote."""

    def __init__(self, engine, path: str | None = None):
        self.engine = engine
        base = os.path.join(engine.cfg.data_dir, "services")
        os.makedirs(base, exist_ok=True)
        self.key = _load_key(os.path.join(base, "verify.key"))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path or os.path.join(base, "verify.db"),
                                   check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        # Codes a call is about to speak, by verification id: in memory only,
        # dropped once spoken or expired.
        self.to_speak: dict[str, str] = {}
        self.closed = False
        # The engine's loop runs in this thread: events raised from another
        # (the store's own thread) are handed to it.
        self._loop_thread = threading.get_ident()
        self._worker: ThreadPoolExecutor | None = None

    def submit(self, fn, *args, **kwargs) -> Future:
        """Run `fn(*args, **kwargs)` on the store's thread, after everything
        submitted before."""
        if self.closed:
            fut: Future = Future()
            fut.set_exception(RuntimeError("the verification store is closed"))
            return fut
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-verify")
        return self._worker.submit(fn, *args, **kwargs)

    async def run(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` on the store's thread, awaited from the loop."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def _on_loop(self, fn, *args) -> None:
        """Call `fn(*args)` on the engine's loop, from whichever thread."""
        loop = self.engine.loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _hash(self, salt: bytes, code: str) -> str:
        return hmac.new(self.key, salt + b":" + code.encode(), hashlib.sha256).hexdigest()

    # -- create ---------------------------------------------------------------------
    def create(self, account: str, to: str, channel: str = "call", *, code: str = "",
               length: int = 6, ttl: float = 600, max_attempts: int = 5) -> tuple[Verification, str]:
        """A new pending verification and its code (the only time it exists in clear)."""
        to = (to or "").strip()
        if not to:
            raise VerifyError("to", "a number or SIP URI is required")
        if len(to) > 256:
            raise VerifyError("to", "longer than 256 characters")
        if channel not in CHANNELS:
            raise VerifyError("channel", f"one of {', '.join(CHANNELS)}, not {channel!r}")
        user = user_of(to)
        if not user:
            raise VerifyError("to", f"{to!r} has no number or user part")
        if code:
            if not code.isdigit() or not MIN_LENGTH <= len(code) <= MAX_LENGTH or not code.isascii():
                raise VerifyError("code", f"{MIN_LENGTH} to {MAX_LENGTH} digits")
            length = len(code)
        else:
            if not MIN_LENGTH <= length <= MAX_LENGTH:
                raise VerifyError("code_length", f"from {MIN_LENGTH} to {MAX_LENGTH} digits")
            code = "".join(secrets.choice("0123456789") for _ in range(length))
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise VerifyError("ttl_seconds", f"from {MIN_TTL} to {MAX_TTL} seconds")
        if not 1 <= max_attempts <= MAX_ATTEMPTS:
            raise VerifyError("max_attempts", f"from 1 to {MAX_ATTEMPTS}")
        now = time.time_ns()
        vid = "VE" + secrets.token_hex(12)
        salt = secrets.token_bytes(16)
        with self._lock:
            # One pending code per address: a new one replaces the old.
            replaced = [r[0] for r in self._db.execute(
                "SELECT id FROM verifications WHERE account = ? AND to_user = ? AND "
                "status = 'pending'", (account, user))]
            self._db.execute("UPDATE verifications SET status = 'canceled', updated_wall_ns = ? "
                             "WHERE account = ? AND to_user = ? AND status = 'pending'",
                             (now, account, user))
            self._db.execute(
                "INSERT INTO verifications (id, account, to_addr, to_user, channel, length, salt, "
                "code_hash, status, max_attempts, created_wall_ns, expires_wall_ns, "
                "updated_wall_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                (vid, account, to, user, channel, length, salt, self._hash(salt, code),
                 max_attempts, now, now + int(ttl * 1e9), now))
        for old in replaced:
            # A canceled code is never spoken: drop it from memory now.
            self.to_speak.pop(old, None)
        self._on_loop(self._arm_expiry, ttl + 0.05, vid)
        return self.get(account, vid), code

    def _arm_expiry(self, delay: float, vid: str) -> None:
        self.engine.loop.call_later(delay, self._expire_due, vid)

    # -- read -------------------------------------------------------------------------
    def _row(self, sql: str, args) -> Verification | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLS} FROM verifications WHERE {sql}", args).fetchone()
        return Verification(*row) if row is not None else None

    def get(self, account: str, vid: str) -> Verification | None:
        """The account's verification `vid` (expired when its time has passed)."""
        v = self._row("id = ? AND account = ?", (vid, account))
        if v is not None and v.status == "pending" and time.time_ns() >= v.expires_wall_ns:
            self._expire(v)
            v = self._row("id = ? AND account = ?", (vid, account))
        return v

    def pending_for(self, account: str, to: str) -> Verification | None:
        """The newest verification for an address that is still pending (or just expired)."""
        v = self._row("account = ? AND to_user = ? AND status IN ('pending', 'expired') "
                      "ORDER BY created_wall_ns DESC LIMIT 1", (account, user_of(to)))
        return self.get(account, v.id) if v is not None else None

    def latest_for(self, account: str, to: str) -> Verification | None:
        v = self._row("account = ? AND to_user = ? ORDER BY created_wall_ns DESC LIMIT 1",
                      (account, user_of(to)))
        return self.get(account, v.id) if v is not None else None

    # -- check ------------------------------------------------------------------------
    def check(self, account: str, vid: str, code: str, session=None) -> tuple[Verification, bool]:
        """One attempt at `code`: (the verification afterwards, whether it matched).
        A verification that is not pending is returned as it is (no attempt)."""
        now = time.time_ns()
        with self._lock:
            row = self._db.execute("SELECT salt, code_hash, status, attempts, max_attempts, "
                                   "expires_wall_ns FROM verifications WHERE id = ? AND "
                                   "account = ?", (vid, account)).fetchone()
            if row is None:
                raise VerifyError("verification_id", f"no verification {vid!r} in this account")
            salt, want, status, attempts, max_attempts, expires = row
            if status != "pending" or now >= expires:
                ok = None
            else:
                # Always hash and compare, in constant time, whatever was typed.
                ok = hmac.compare_digest(want, self._hash(salt, code if code.isdigit() else ""))
                attempts += 1
                status = "verified" if ok else ("failed" if attempts >= max_attempts else "pending")
                self._db.execute("UPDATE verifications SET attempts = ?, status = ?, "
                                 "updated_wall_ns = ? WHERE id = ?", (attempts, status, now, vid))
        if ok is None:
            v = self.get(account, vid)
            return v, False
        v = self.get(account, vid)
        if v.status in ("verified", "failed"):
            self._announce(v, session)
        return v, bool(ok)

    # -- expiry and events ------------------------------------------------------------
    def _expire_due(self, vid: str) -> None:
        # On the loop, at the code's expiry. Whatever became of it (spoken,
        # verified, canceled), its code is due out of memory now.
        self.to_speak.pop(vid, None)
        if not self.closed:
            self.submit(self._expire_if_due, vid)

    def _expire_if_due(self, vid: str) -> None:
        if self.closed:
            return
        v = self._row("id = ?", (vid,))
        if v is not None and v.status == "pending" and time.time_ns() >= v.expires_wall_ns:
            self._expire(v)

    def _expire(self, v: Verification) -> None:
        with self._lock:
            cur = self._db.execute("UPDATE verifications SET status = 'expired', updated_wall_ns = ? "
                                   "WHERE id = ? AND status = 'pending'", (time.time_ns(), v.id))
            changed = cur.rowcount == 1
        self.to_speak.pop(v.id, None)
        if changed:
            v.status = "expired"
            self._announce(v, None)

    def _announce(self, v: Verification, session) -> None:
        engine = self.engine
        if engine.loop is not None and threading.get_ident() != self._loop_thread:
            engine.loop.call_soon_threadsafe(self._announce, v, session)
            return
        if not engine.listeners:
            return
        if session is None:
            live = engine.sessions.get(v.session_id) if v.session_id else None
            if live is not None:
                session = live
            else:
                from engine.common.webhooks import AccountEvent

                session = AccountEvent(v.account)
        engine.notify(session, EVENT, v.as_dict())

    def attach_call(self, vid: str, session_id: str = "", outcome: str = "") -> None:
        """Record the call that delivers (or collects) a code."""
        with self._lock:
            if session_id:
                self._db.execute("UPDATE verifications SET session_id = ? WHERE id = ?",
                                 (session_id, vid))
            if outcome:
                self._db.execute("UPDATE verifications SET call_outcome = ? WHERE id = ?",
                                 (outcome, vid))

    def close(self) -> None:
        self.closed = True
        if self._worker is not None:
            self._worker.shutdown(wait=True)      # what was asked so far lands first
            self._worker = None
        with self._lock:
            self.to_speak.clear()
            self._db.close()


def _load_key(path: str) -> bytes:
    """The HMAC key of stored codes, made on first use (readable by the engine's user only)."""
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) >= 32:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    try:
        os.link(tmp, path)            # first writer wins when two start at once
    except FileExistsError:
        with open(path, "rb") as f:
            key = f.read()
    finally:
        os.unlink(tmp)
    return key


def service_for(engine) -> VerifyService:
    """The engine's verification service (opened on first use)."""
    svc = getattr(engine, "verify_service", None)
    if svc is None:
        svc = VerifyService(engine)
        engine.verify_service = svc
    return svc


# -- the module ---------------------------------------------------------------------------

class VerifyState(Prompter):
    def __init__(self, ctl):
        super().__init__(ctl)
        self.verification: Verification | None = None
        self.tries = 0
        self.lookup = None          # the store's work in flight (off the loop)


class VerifyModule(PromptingModule):
    code = "baton.verify"
    level = "service"
    outlets = ("verified", "failed", "expired", "done")

    @classmethod
    def check_params(cls, params: dict) -> None:
        check_keys(params, NODE_KEYS)
        check_common(params)
        mode = params.get("mode", "collect")
        if mode not in ("collect", "speak"):
            raise ValueError(f"mode: collect or speak, not {mode!r}")
        for k in PROMPTS:
            check_text(params, k)
        check_text(params, "message")
        msg = params.get("message")
        if msg is not None and msg.count("{code}") != 1:
            raise ValueError("message: must contain {code} once")
        check_number(params, "repeat", 1, 5, integer=True)
        check_text(params, "verification_id")
        if not isinstance(params.get("trust_from", False), bool):
            raise ValueError("trust_from: true or false")

    def _p(self, ctl, key: str):
        return ctl.params.get(key) or PROMPTS.get(key)

    def take(self, ctl) -> None:
        state = self.begin(ctl, VerifyState)
        if state is None:
            return
        # The store is SQLite: its reads and writes run on the store's thread.
        state.lookup = ctl.engine.loop.create_task(self._guard(ctl, self._start(ctl)))

    async def _guard(self, ctl, work) -> None:
        """Run the module's store work; a store failure ends this module's
        part through `failed` instead of escaping into the loop."""
        try:
            await work
        except Exception:
            log.exception("session %s: verification store failed", ctl.session.id)
            ctl.release("failed", VerifyStatus="failed", VerifyReason="error")

    async def _start(self, ctl) -> None:
        state = ctl.state
        svc = service_for(ctl.engine)
        session = ctl.session
        vid = ctl.params.get("verification_id")
        if ctl.params.get("mode", "collect") == "speak":
            await self._speak(ctl, svc, vid)
            return
        if vid:
            v = await svc.run(svc.get, session.account, str(vid))
        else:
            # The caller proves the number they call from: only where the From can be
            # believed (docs/security.md) — a trusted trunk asserted it, or the operator
            # says an authenticating front door (an SBC) stands before the engine.
            if not self._from_believed(ctl):
                log.warning("session %s: verification by an inbound call from %s refused: "
                            "the caller's From is not asserted by a trusted trunk",
                            session.id, session.from_uri)
                self._end(ctl, "failed", self._p(ctl, "missing_prompt"),
                          reason="untrusted-caller")
                return
            v = await svc.run(svc.pending_for, session.account, session.from_uri or "")
        if not ctl.active:
            return
        state.verification = v
        if v is None or v.status not in ("pending", "expired"):
            self._end(ctl, "failed", self._p(ctl, "missing_prompt"), reason="no-code")
            return
        if not await self._attach(ctl, svc, v):
            return
        v.session_id = session.id
        if v.status == "expired":
            self._end(ctl, "expired", self._p(ctl, "expired_prompt"))
            return
        self._ask(ctl)

    @staticmethod
    def _from_believed(ctl) -> bool:
        if ctl.params.get("trust_from") is True:
            return True
        leg = ctl.session.legs[0] if ctl.session.legs else None
        d = leg.dialog if leg is not None else None
        source = d.source[0] if d is not None and d.source else ""
        return bool(source) and trusted_source(ctl.engine.cfg, source)

    @staticmethod
    async def _attach(ctl, svc: VerifyService, v: Verification) -> bool:
        """Record this call on `v` (off the loop); False when control left meanwhile."""
        ctl.session.params["VerificationId"] = v.id
        await svc.run(svc.attach_call, v.id, session_id=ctl.session.id)
        return ctl.active

    # -- speak (a call placed by Create) -------------------------------------------------
    async def _speak(self, ctl, svc: VerifyService, vid) -> None:
        session = ctl.session
        code = svc.to_speak.pop(str(vid), None) if vid else None
        v = await svc.run(svc.get, session.account, str(vid)) if vid else None
        if not ctl.active:
            return
        if code is None or v is None or v.status != "pending":
            log.info("session %s: no code to speak for %r", session.id, vid)
            ctl.release("done", VerifyStatus=v.status if v is not None else "missing")
            return
        if not await self._attach(ctl, svc, v):
            return
        before, _, after = str(ctl.params.get("message") or MESSAGE).partition("{code}")
        # Each digit is rendered on its own: the speech cache on disk then holds
        # single digits, never a whole code.
        once = [(before.strip(), None)] if before.strip() else []
        once += [(d, None) for d in code]
        if after.strip(".,; "):
            once.append((after.strip(), None))
        parts = once * int(ctl.params.get("repeat", 2))
        ctl.state.say(parts, lambda *_: ctl.release("done", VerifyStatus="spoken"),
                      voice=ctl.params.get("voice", "en"), language=ctl.params.get("language"))

    # -- collect (an inbound call) ----------------------------------------------------
    def _ask(self, ctl, prefix=None) -> None:
        state = ctl.state
        state.tries += 1
        parts = [(prefix, None)] if prefix else []
        parts.append((self._p(ctl, "prompt"), None))
        state.ask(parts, lambda digits, why: self._entered(ctl, digits, why),
                  max_digits=state.verification.length, finish_on_key="#",
                  timeout=float(ctl.params.get("timeout", 10)),
                  voice=ctl.params.get("voice", "en"), language=ctl.params.get("language"))

    def _entered(self, ctl, digits: str, why: str) -> None:
        state = ctl.state
        if not digits:
            if state.tries > int(ctl.params.get("retries", 2)):
                self._end(ctl, "failed", self._p(ctl, "failed_prompt"), reason="timeout")
            else:
                self._ask(ctl)
            return
        state.lookup = ctl.engine.loop.create_task(self._guard(ctl, self._check(ctl, digits)))

    async def _check(self, ctl, digits: str) -> None:
        state = ctl.state
        svc = service_for(ctl.engine)
        v, ok = await svc.run(svc.check, ctl.session.account, state.verification.id,
                                        digits, session=ctl.session)
        if not ctl.active:
            return
        state.verification = v
        if ok:
            self._end(ctl, "verified", self._p(ctl, "verified_prompt"))
        elif v.status == "pending":
            state.tries = 0
            self._ask(ctl, self._p(ctl, "invalid_prompt"))
        elif v.status == "expired":
            self._end(ctl, "expired", self._p(ctl, "expired_prompt"))
        else:
            self._end(ctl, "failed", self._p(ctl, "failed_prompt"),
                      reason="attempts" if v.status == "failed" else v.status)

    def _end(self, ctl, outlet: str, prompt: str | None, reason: str = "") -> None:
        session = ctl.session
        v = ctl.state.verification
        session.params["VerifyStatus"] = outlet
        if reason:
            session.params["VerifyReason"] = reason
        params = {"VerifyStatus": outlet, "VerificationId": v.id if v is not None else ""}
        if reason:
            params["VerifyReason"] = reason
        if not prompt:
            ctl.release(outlet, **params)
            return
        ctl.state.say([(prompt, None)], lambda *_: ctl.release(outlet, **params),
                      voice=ctl.params.get("voice", "en"), language=ctl.params.get("language"))


__all__ = ["VerifyModule", "VerifyService", "Verification", "VerifyError", "service_for",
           "user_of", "EVENT", "CHANNELS"]
