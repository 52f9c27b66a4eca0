"""Signed webhooks against a real aiohttp receiver on loopback: signatures,
retries after 500s, ids to dedupe by, the outbox surviving a restart, and a
real call producing session.started / session.ended."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from engine.config.load import ConfigError, from_dict
from engine.common.webhooks import (HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, SyncWebhooks,
                             WebhookSettings, Webhooks, sign, verify)
from tests.helpers import engine_config, period_now
from tests.vendor_procs.harness import wait_until

SECRET = "whsec-0123456789abcdef"


class Receiver:
    """A webhook endpoint: records what it is sent and answers `fail` 500s first."""

    def __init__(self, fail: int = 0, secret: str = SECRET):
        self.fail = fail
        self.secret = secret
        self.attempts: list[dict] = []     # every request, verified or not
        self.messages: dict[str, dict] = {}  # id -> message, deduplicated
        self.runner = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ok = verify(self.secret, request.headers, body)
        self.attempts.append({"id": request.headers.get(HEADER_ID), "verified": ok,
                              "ts": request.headers.get(HEADER_TIMESTAMP)})
        if not ok:
            return web.json_response({"error": "bad signature"}, status=401)
        if self.fail > 0:
            self.fail -= 1
            return web.json_response({"error": "try later"}, status=500)
        msg = json.loads(body)
        assert msg["id"] == request.headers[HEADER_ID]
        self.messages.setdefault(msg["id"], msg)
        return web.json_response({"ok": True})

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


def settings(url: str, **kw) -> WebhookSettings:
    raw = {"webhooks": {"url": url, "secret": SECRET, "retry_base": 0.05, "retry_max": 0.2,
                        **kw}}
    return WebhookSettings.from_raw(raw)


def test_sign_and_verify():
    body = b'{"id":"msg_1"}'
    sig = sign(SECRET, "msg_1", 1700000000, body)
    import hashlib
    import hmac
    assert sig == hmac.new(SECRET.encode(), b"msg_1.1700000000." + body, hashlib.sha256).hexdigest()
    h = {HEADER_ID: "msg_1", HEADER_TIMESTAMP: "1700000000", HEADER_SIGNATURE: f"v0=x v1={sig}"}
    assert verify(SECRET, h, body, now=1700000010)
    assert not verify(SECRET, h, body + b" ", now=1700000010)
    assert not verify("another-secret-0123456", h, body, now=1700000010)
    assert not verify(SECRET, h, body, now=1700000000 + 3600)        # a replay, too old
    assert not verify(SECRET, {**h, HEADER_ID: "msg_2"}, body, now=1700000010)
    # A forged signature with non-ASCII characters is a bad signature, not an exception.
    assert not verify(SECRET, {**h, HEADER_SIGNATURE: "v1=\u00e9" + sig[1:]}, body,
                      now=1700000010)


def test_config_errors_name_the_key():
    for raw, key in (({"webhooks": {"url": "ftp://x", "secret": SECRET}}, "webhooks.url"),
                     ({"webhooks": {"url": "http://127.0.0.1/"}}, "webhooks.secret"),
                     ({"webhooks": {"secret": "short"}}, "webhooks.secret"),
                     ({"webhooks": {"events": ["call.done"]}}, "webhooks.events"),
                     ({"webhooks": {"max_attempts": 0}}, "webhooks.max_attempts"),
                     ({"webhooks": {"low_balance": "five"}}, "webhooks.low_balance"),
                     ({"webhooks": {"colour": 1}}, "webhooks.colour")):
        with pytest.raises(ConfigError) as err:
            from_dict(raw)
        assert err.value.key == key, (raw, str(err.value))
    raw = {"webhooks": {"secret": "s" * 32},
           "accounts": {"a": {"webhook_url": "http://127.0.0.1/x"}}}
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert err.value.key == "accounts.a.webhook_secret"


async def test_signed_delivery_retry_and_dedupe(tmp_path):
    rx = await Receiver(fail=2).start()
    wh = Webhooks(settings(rx.url), str(tmp_path))
    await wh.start()
    try:
        a = wh.send("balance.low", {"account": "demo", "funds_left": "0.50"}, account="demo")
        b = wh.send("cap.reached", {"account": "demo"}, account="demo")
        assert a != b and a.startswith("msg_")
        await wait_until(lambda: len(rx.messages) == 2, timeout=10)
        assert await wh.flush()
        assert set(rx.messages) == {a, b}
        assert rx.messages[a]["type"] == "balance.low"
        assert rx.messages[a]["data"] == {"account": "demo", "funds_left": "0.50"}
        assert set(rx.messages[a]) == {"id", "type", "created", "data"}
        assert all(x["verified"] for x in rx.attempts)
        # Two 500s were answered: those messages came again with the same id.
        assert len(rx.attempts) == 4
        assert {x["id"] for x in rx.attempts} == {a, b}
        assert wh.pending() == [] and wh.stats()["delivered"] == 2
        # An explicit destination (the survey's results URL) with its own secret.
        rx2 = await Receiver(secret="other-secret-0123456789").start()
        c = wh.send("survey.completed", {"answers": [1, 2]}, url=rx2.url,
                    secret="other-secret-0123456789")
        await wait_until(lambda: c in rx2.messages)
        await rx2.stop()
    finally:
        await wh.stop()
        await rx.stop()


async def test_bounded_attempts_and_events_filter(tmp_path):
    rx = await Receiver(fail=1000).start()
    wh = Webhooks(settings(rx.url, max_attempts=3, events=["balance.low"]), str(tmp_path))
    await wh.start()
    try:
        skipped = wh.send("cap.reached", {"account": "demo"})
        m = wh.send("balance.low", {"account": "demo"})
        await wait_until(lambda: wh.stats()["failed"] == 1, timeout=10)
        assert [x["id"] for x in rx.attempts] == [m, m, m]
        (row,) = wh.pending()
        assert row["id"] == m and row["state"] == "failed" and row["attempts"] == 3
        assert row["last_error"] == "HTTP 500" and skipped not in {x["id"] for x in rx.attempts}
    finally:
        await wh.stop()
        await rx.stop()


async def test_outbox_survives_a_restart(tmp_path):
    # Nobody listens at first: the message waits in the outbox.
    rx = await Receiver().start()
    url = rx.url
    await rx.stop()
    wh = Webhooks(settings(url, retry_base=30, retry_max=30), str(tmp_path))
    await wh.start()
    m = wh.send("invoice.ready", {"account": "demo", "period": "2026-10"})
    await wait_until(lambda: wh.pending() and wh.pending()[0]["attempts"] == 1)
    await wh.stop()
    # A new sender on the same data directory (the restarted process) sends it,
    # as soon as it is due (the retry time is kept: force it here).
    import sqlite3
    db = sqlite3.connect(str(tmp_path / "webhooks" / "engine.db"))
    db.execute("UPDATE outbox SET next_at = 0")
    db.commit()
    db.close()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    app = web.Application()
    rx2 = Receiver()
    app.router.add_post("/hook", rx2.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    wh2 = Webhooks(settings(url), str(tmp_path))
    await wh2.start()
    try:
        await wait_until(lambda: m in rx2.messages, timeout=10)
        assert rx2.messages[m]["data"]["period"] == "2026-10"
        await wh2.flush()
        assert wh2.pending() == []
    finally:
        await wh2.stop()
        await runner.cleanup()


async def test_sync_sender_from_a_thread(tmp_path):
    rx = await Receiver(fail=1).start()
    wh = SyncWebhooks(settings(rx.url), str(tmp_path)).start()
    try:
        m = await asyncio.to_thread(wh.send, "balance.low", {"account": "demo"}, account="demo")
        await wait_until(lambda: m in rx.messages, timeout=10)
        assert [x["id"] for x in rx.attempts] == [m, m]
        assert await asyncio.to_thread(wh.flush)
        assert wh.pending() == []
    finally:
        await asyncio.to_thread(wh.stop)
        await rx.stop()


async def test_a_call_sends_session_started_and_ended():
    pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")
    from tests.helpers import running_engine
    from tests.test_sessions import Caller

    rx = await Receiver().start()
    raw = engine_config()
    raw["webhooks"] = {"url": rx.url, "secret": SECRET}
    try:
        async with running_engine(raw) as eng:
            seen = []
            eng.listeners.append(lambda s, kind, detail: seen.append(kind))
            caller = Caller(eng, "1000")
            await caller.dial()
            sid = next(iter(eng.sessions))
            await wait_until(lambda: len(rx.messages) == 1)
            await caller.bye()
            await wait_until(lambda: len(rx.messages) == 2)
        kinds = {m["type"]: m for m in rx.messages.values()}
        assert set(kinds) == {"session.started", "session.ended"}
        started, ended = kinds["session.started"]["data"], kinds["session.ended"]["data"]
        assert started["session_id"] == ended["session_id"] == sid
        assert started["account"] == "demo" and started["module"] == "baton.hold"
        assert ended["modules"] == ["baton.hold"] and ended["reason"]
        assert all(x["verified"] for x in rx.attempts)
        # The same notifications reach Watch listeners.
        assert "session.started" in seen and "session.ended" in seen
    finally:
        await rx.stop()


def toml_text(raw: dict) -> str:
    """A config dict as TOML (inline tables: enough for a test config)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))
    return "".join(f"{json.dumps(k)} = {value(v)}\n" for k, v in raw.items())


NOTIFY_CONFIG = {
    "plans": {"per-minute": {"price": "0.60", "unit": "minute"},
              "sms": {"price": "0.01", "unit": "action", "cap": 2, "at_cap": "deny"}},
    "billing": {"default_plan": "per-minute", "level_plans": {"basic": "per-minute"},
                "action_plans": {"message": "sms"}},
    "accounts": {"demo": {"billing": {"prepaid_balance": "1.00"}, "low_balance": "0.50"},
                 "rich": {"billing": {"prepaid_balance": "100.00"}}},
}


def stamp_call(data_dir, sid: str, account: str, seconds: int, messages: int) -> None:
    """A finished call stamped into the ring as the engine does, at the current time."""
    from ext.kernels import ring
    from engine.common import clock

    w = ring.RingWriter(str(data_dir / "ring" / "ring.dat"), slots=1024, node_id="n1")
    mono, wall = time.monotonic_ns() - seconds * 10**9, clock.wall_ns() - seconds * 10**9
    w.stamp_session("start", sid, account, mono, wall)
    w.stamp_transition(sid, account, "", "baton.bridge", "basic", "initial", mono, wall)
    for _ in range(messages):
        w.stamp_action(sid, account, "baton.bridge", "message", 1)
    end = seconds * 10**9
    w.stamp_session("end", sid, account, mono + end, wall + end, "hangup")
    w.close()


async def test_accountant_notifications_fire_once(tmp_path):
    from engine.accounting.accountant import Accountant
    from engine.accounting.service import previous_period, start_service

    rx = await Receiver().start()
    raw = {**NOTIFY_CONFIG, "webhooks": {"url": rx.url, "secret": SECRET, "retry_base": 0.05}}
    stamp_call(tmp_path, "S1", "demo", 60, 3)     # 0.60 + 2 messages: below 0.50 left
    stamp_call(tmp_path, "S2", "rich", 60, 0)

    def run_accountant(next_period: bool):
        with Accountant(str(tmp_path), raw) as acct:
            srv = start_service(acct, raw)
            try:
                acct.drain()
                snap = acct.policy_snapshot()
                acct.write_policy()         # balance.low, cap.reached
                if next_period:             # as if the month had turned: invoice.ready
                    y, m = map(int, snap["period"].split("-"))
                    later = f"{y + m // 12:04d}-{m % 12 + 1:02d}"
                    assert previous_period(later) == snap["period"]
                    srv.notifier.on_snapshot({"period": later, "accounts": {}})
                assert srv.webhooks.flush(10)
                return snap
            finally:
                srv.stop()

    try:
        snap = await asyncio.to_thread(run_accountant, True)
        period = snap["period"]
        demo = snap["accounts"]["demo"]
        assert demo["funds_left_micro"] == 1_000_000 - 600_000 - 20_000
        by_type = {}
        for m in rx.messages.values():
            by_type.setdefault(m["type"], []).append(m["data"])
        low, = by_type["balance.low"]
        assert (low["account"], low["funds_left"], low["threshold_micro"]) == \
            ("demo", "0.38", 500_000)
        cap, = by_type["cap.reached"]
        assert (cap["account"], cap["target"], cap["period"], cap["cap"]) == \
            ("demo", "baton.bridge:message", period, 2)
        ready = sorted(by_type["invoice.ready"], key=lambda d: d["account"])
        assert [(d["account"], d["period"], d["total"]) for d in ready] == \
            [("demo", period, "0.62"), ("rich", period, "0.60")]
        assert all(a["verified"] for a in rx.attempts)
        n = len(rx.messages)
        # A restarted accountant, same crossings: nothing is sent twice.
        await asyncio.to_thread(run_accountant, True)
        assert len(rx.messages) == n
    finally:
        await rx.stop()


async def test_bill_invoice_notify(tmp_path):
    import subprocess

    from engine.accounting.accountant import Accountant
    from tests.helpers import BATON, ROOT

    rx = await Receiver().start()
    raw = {**NOTIFY_CONFIG, "webhooks": {"url": rx.url, "secret": SECRET}}
    stamp_call(tmp_path, "S1", "demo", 60, 0)
    with Accountant(str(tmp_path), raw) as acct:
        acct.drain()
    path = tmp_path / "baton.toml"
    path.write_text(toml_text(raw))
    period = period_now()
    try:
        r = await asyncio.to_thread(subprocess.run, [
            BATON, "bill", "invoice", "--account", "demo", "--period", period, "--format",
            "json", "--data-dir", str(tmp_path), "--config", str(path), "--notify"],
            capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        (m,) = rx.messages.values()
        assert m["type"] == "invoice.ready" and m["data"]["total"] == json.loads(r.stdout)["total"]
        assert m["id"] in r.stderr
    finally:
        await rx.stop()
