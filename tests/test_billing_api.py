"""The Billing API end to end: a real engine (this process) and a real
accountant (a child process on the same data directory). A live call's cost
over gRPC, the invoice and payouts against `baton bill`, balances, bad
input, tokens, the accountant's notifications reaching webhooks and Watch,
and `baton sessions cost`."""
from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

import grpc  # noqa: E402

from proto import pb  # noqa: E402
from control.sdk import VendorClient  # noqa: E402
from engine.accounting.service import billing_address  # noqa: E402
from tests.helpers import BATON, ROOT, period_now, running_engine  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402
from tests.test_webhooks import SECRET, Receiver, toml_text  # noqa: E402
from tests.vendor_procs.harness import (OTHER_TOKEN, SECRET_A, SECRET_B, TOKEN,  # noqa: E402
                                        bearer, control_config, target, wait_until)

bp = pb.billing_pb2
sp = pb.sessions_pb2
S = 1_000_000_000
PER_SECOND = 10_000          # "0.60" a minute, billed per second: 10,000 micro-units a second


def billing_config(hook_url: str) -> dict:
    raw = control_config()
    raw["plans"] = {"per-second": {"price": "0.60", "unit": "minute", "increment": "1/1"}}
    raw["billing"] = {"default_plan": "per-second",
                      "level_plans": {"basic": "per-second", "application": "per-second",
                                      "service": "per-second"},
                      "policy_interval": 0.1}
    raw["vendors"]["acme"]["revenue_share"] = "0.7"
    raw["accounts"]["other"]["numbers"]["4998"] = {"module": "acme.survey"}
    demo = raw["accounts"]["demo"]
    demo["billing"] = {"prepaid_balance": "5.00"}
    demo["low_balance"] = "4.999"         # any call at all crosses it
    raw["webhooks"] = {"url": hook_url, "secret": SECRET, "retry_base": 0.05}
    return raw


class Accountant:
    """`python -m engine.accounting.accountant` on the engine's data directory."""

    def __init__(self, data_dir: str, config_path: str):
        self.data_dir = data_dir
        self.log = open(os.path.join(data_dir, "accountant-test.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.accounting.accountant", "--data-dir", data_dir,
             "--config", config_path], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    async def ready(self, stub) -> None:
        async def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the accountant exited:\n{self.output()}")
            try:
                await stub.Balance(bp.BalanceRequest(), metadata=bearer(), timeout=2)
                return True
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                return False
        for _ in range(200):
            if await answers():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the accountant's Billing API did not come up:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def code_of(coro) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    return err.value.code(), err.value.details()


async def baton(*args: str) -> tuple[int, str, str]:
    # subprocess from a thread: the loop keeps serving the engine the command may call.
    r = await asyncio.to_thread(subprocess.run, [BATON, *args], capture_output=True, text=True,
                                cwd=ROOT, timeout=60)
    return r.returncode, r.stdout, r.stderr


def vendor_md(vendor="acme", secret=SECRET_A) -> tuple:
    return (("x-baton-vendor", vendor), ("x-baton-secret", secret))


async def settled(stub, sid: str, token: str = TOKEN) -> bp.SessionCost:
    """The session's cost once the accountant has closed it."""
    last = None
    for _ in range(300):
        last = await stub.Cost(bp.SessionCostRequest(session_id=sid), metadata=bearer(token))
        if not last.live:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"session {sid} still live at the accountant: {last}")


async def test_billing_api_against_a_real_accountant(tmp_path):
    rx = await Receiver().start()
    raw = billing_config(rx.url)
    raw["engine"]["data_dir"] = str(tmp_path / "data")
    path = tmp_path / "baton.toml"
    path.write_text(toml_text(raw))
    raw = tomllib.loads(path.read_text())      # exactly what the accountant reads
    period = period_now()
    acct = None
    try:
        async with running_engine(raw) as eng:
            data = eng.cfg.data_dir
            v = VendorClient(target(eng), "acme.survey", SECRET_A)

            @v.on_offer
            async def on(offer):
                call = await offer.take()
                await call.answer()

            await v.start()
            async with grpc.aio.insecure_channel(target(eng)) as ch:
                billing = pb.billing_pb2_grpc.BillingStub(ch)
                sessions = pb.sessions_pb2_grpc.SessionsStub(ch)

                # No accountant yet: UNAVAILABLE, saying why.
                code, text = await code_of(billing.Invoice(
                    bp.InvoiceRequest(period=period), metadata=bearer()))
                assert code == grpc.StatusCode.UNAVAILABLE and "accountant" in text

                acct = Accountant(data, str(path))
                await acct.ready(billing)
                addr = billing_address(data)
                assert not addr.startswith("unix:") or os.path.exists(addr[len("unix:"):])
                watched = []

                async def watch():
                    async for ev in sessions.Watch(sp.WatchRequest(kinds=["balance.low"]),
                                                   metadata=bearer()):
                        watched.append((ev.kind, pb.from_struct(ev.detail)))
                watcher = asyncio.ensure_future(watch())

                # A live call: its cost is whole seconds completed so far.
                caller = Caller(eng, "1000")
                await caller.dial()
                sid = next(s for s in eng.sessions if eng.sessions[s].number == "1000")
                span_start = eng.sessions[sid].history[-1].start_mono
                costs = []
                for _ in range(3):
                    before = time.monotonic_ns() - span_start
                    c = await billing.Cost(bp.SessionCostRequest(session_id=sid),
                                           metadata=bearer())
                    after = time.monotonic_ns() - span_start
                    assert c.live and c.account == "demo" and c.cost.currency == "USD"
                    n, rest = divmod(c.cost.micros, PER_SECOND)
                    assert rest == 0, c
                    # A session not drained from the ring yet costs nothing so far.
                    assert n == 0 or math.floor((before - 10**6) / S) <= n <= after // S, \
                        (n, before, after)
                    costs.append(c.cost.micros)
                    await asyncio.sleep(0.7)
                assert costs == sorted(costs) and costs[-1] > costs[0], costs
                sc = await sessions.Cost(sp.CostRequest(session_id=sid), metadata=bearer())
                assert sc.live and sc.currency == "USD"
                assert sc.amount_micros % PER_SECOND == 0 and sc.amount_micros >= costs[-1]
                await caller.bye()

                # A vendor's module, used by the other account.
                vcall = Caller(eng, "4998")
                await vcall.dial()
                vsid = next(s for s in eng.sessions if eng.sessions[s].number == "4998")
                await asyncio.sleep(1.2)
                await vcall.bye()

                final = await settled(billing, sid)
                assert final.cost.micros >= costs[-1] and final.cost.micros % PER_SECOND == 0
                sc = await sessions.Cost(sp.CostRequest(session_id=sid), metadata=bearer())
                assert (sc.live, sc.amount_micros, sc.amount_decimal) == \
                    (False, final.cost.micros, final.cost.amount)
                vfinal = await settled(billing, vsid, OTHER_TOKEN)
                assert vfinal.cost.micros > 0

                # The invoice over gRPC is `baton bill invoice`, and the call's cost its total.
                inv = await billing.Invoice(bp.InvoiceRequest(period=period), metadata=bearer())
                rc, out, err = await baton("bill", "invoice", "--account", "demo", "--period",
                                           period, "--format", "json", "--data-dir", data,
                                           "--config", str(path))
                assert rc == 0, err
                cli = json.loads(out)
                assert inv.account == "demo" and inv.period == period and inv.currency == "USD"
                assert inv.total.micros == cli["total_micro"] == final.cost.micros
                assert inv.total.amount == cli["total"]
                assert [(ln.module, ln.item, ln.plan, ln.quantity, ln.unit, ln.unit_price.amount,
                         ln.amount.micros, ln.transactions) for ln in inv.lines] == \
                    [(ln["module"], ln["item"], ln["plan"], ln["quantity"], ln["unit"],
                      ln["unit_price"], ln["amount_micro"], ln["transactions"])
                     for ln in cli["lines"]]
                # Payouts over gRPC (as the vendor) are `baton bill payouts --vendor`.
                pay = await billing.Payouts(bp.PayoutsRequest(period=period),
                                            metadata=vendor_md())
                rc, out, err = await baton("bill", "payouts", "--period", period, "--vendor",
                                           "acme", "--format", "json", "--data-dir", data,
                                           "--config", str(path))
                assert rc == 0, err
                cli = json.loads(out)
                assert pay.total.micros == cli["total_micro"] > 0
                assert [(st.vendor, st.currency, st.gross.micros, st.platform_share.micros,
                         st.total.micros, [(ln.module, ln.gross.micros, ln.platform_share.micros,
                                            ln.payout.micros) for ln in st.lines])
                        for st in pay.statements] == \
                    [(st["vendor"], st["currency"], st["gross_micro"],
                      st["platform_share_micro"], st["total_micro"],
                      [(ln["module"], ln["gross_micro"], ln["platform_share_micro"],
                        ln["payout_micro"]) for ln in st["lines"]])
                     for st in cli["statements"]]
                assert pay.statements[0].gross.micros == vfinal.cost.micros
                # The other account's invoice is its own.
                other = await billing.Invoice(bp.InvoiceRequest(period=period),
                                              metadata=bearer(OTHER_TOKEN))
                assert other.total.micros == vfinal.cost.micros

                # Balance: prepaid 5.00 less what was spent.
                bal = await billing.Balance(bp.BalanceRequest(), metadata=bearer())
                assert bal.account == "demo" and bal.period == period
                assert bal.balance.micros == 5_000_000 - final.cost.micros
                assert bal.funds_left.micros == bal.balance.micros and not bal.out_of_funds

                # balance.low: a signed webhook from the accountant, and a Watch event.
                await wait_until(lambda: any(m["type"] == "balance.low"
                                             for m in rx.messages.values()), timeout=10)
                low = [m for m in rx.messages.values() if m["type"] == "balance.low"]
                assert len(low) == 1 and low[0]["data"]["account"] == "demo"
                assert low[0]["data"]["threshold_micro"] == 4_999_000
                await wait_until(lambda: watched, timeout=10)
                assert watched[0][0] == "balance.low" and watched[0][1]["id"] == low[0]["id"]
                kinds = {m["type"] for m in rx.messages.values()}
                assert {"session.started", "session.ended", "balance.low"} <= kinds
                assert all(a["verified"] for a in rx.attempts)
                watcher.cancel()

                # Bad input names the field; tokens see their own account only.
                for req, field in ((bp.InvoiceRequest(period="2026-13"), "period"),
                                   (bp.InvoiceRequest(period=""), "period"),
                                   (bp.InvoiceRequest(period=period, account="nobody"),
                                    "account"),
                                   (bp.InvoiceRequest(period=period, account="no such"),
                                    "account")):
                    code, text = await code_of(billing.Invoice(req, metadata=bearer()))
                    assert code == grpc.StatusCode.INVALID_ARGUMENT and text.startswith(field), \
                        (req, text)
                code, text = await code_of(billing.Invoice(
                    bp.InvoiceRequest(period=period, account="other"), metadata=bearer()))
                assert code == grpc.StatusCode.PERMISSION_DENIED and "account" in text
                code, _ = await code_of(billing.Invoice(
                    bp.InvoiceRequest(period=period), metadata=bearer("wrong-token-0123456789")))
                assert code == grpc.StatusCode.UNAUTHENTICATED
                code, _ = await code_of(billing.Balance(bp.BalanceRequest()))
                assert code == grpc.StatusCode.UNAUTHENTICATED
                code, text = await code_of(billing.Cost(bp.SessionCostRequest(session_id=vsid),
                                                        metadata=bearer()))
                assert code == grpc.StatusCode.NOT_FOUND and "session_id" in text
                code, _ = await code_of(sessions.Cost(sp.CostRequest(session_id=vsid),
                                                      metadata=bearer()))
                assert code == grpc.StatusCode.NOT_FOUND
                code, _ = await code_of(billing.Payouts(bp.PayoutsRequest(period=period),
                                                        metadata=bearer()))
                assert code == grpc.StatusCode.PERMISSION_DENIED
                code, _ = await code_of(billing.Payouts(bp.PayoutsRequest(period=period),
                                                        metadata=vendor_md(secret=SECRET_B)))
                assert code == grpc.StatusCode.UNAUTHENTICATED
                code, _ = await code_of(billing.Payouts(
                    bp.PayoutsRequest(period=period, vendor="globex"), metadata=vendor_md()))
                assert code == grpc.StatusCode.PERMISSION_DENIED
                code, text = await code_of(billing.Payouts(bp.PayoutsRequest(period="11/2026"),
                                                           metadata=vendor_md()))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and text.startswith("period")

                # `baton sessions cost`, from the accountant of the data directory.
                rc, out, err = await baton("sessions", "cost", sid, "--data-dir", data,
                                           "--format", "json")
                assert rc == 0, err
                doc = json.loads(out)
                assert (doc["amount_micros"], doc["amount"], doc["live"]) == \
                    (final.cost.micros, final.cost.amount, False)
                rc, out, err = await baton("sessions", "cost", sid, "--grpc-addr", target(eng),
                                           "--token", TOKEN)
                assert rc == 0 and final.cost.amount in out, err
                rc, out, err = await baton("sessions", "cost", "Snope", "--data-dir", data)
                assert rc == 1 and "Snope" in err
            await v.close()
    finally:
        if acct is not None:
            acct.stop()
            assert "Traceback" not in acct.output(), acct.output()
        await rx.stop()


async def test_sessions_cost_cli_without_an_accountant(tmp_path):
    rc, out, err = await baton("sessions", "cost", "S1", "--data-dir", str(tmp_path))
    assert rc == 2 and "does not answer" in err


def test_an_ended_sessions_cost_is_its_last_payers():
    import types

    from engine.accounting.service import _Servicer

    rows = [{"account": "op", "currency": "USD", "amount": 40_000},       # before the PIN
            {"account": "card-1", "currency": "USD", "amount": 250_000},
            {"account": "card-1", "currency": "USD", "amount": 10_000}]
    acct = types.SimpleNamespace(meter=types.SimpleNamespace(find=lambda sid: None))
    srv = types.SimpleNamespace(acct=acct, on_loop=lambda fn: fn(),
                                reader=lambda fn: fn(types.SimpleNamespace(
                                    transactions=lambda session: rows)))
    cost = _Servicer(srv).Cost(bp.SessionCostRequest(session_id="S1"), context=None)
    # The card's holder sees what the card paid, not the number owner's share.
    assert (cost.account, cost.cost.micros, cost.live) == ("card-1", 260_000, False)


async def test_billing_event_watchers_share_one_stream_to_the_accountant():
    import types

    from control.billing import BillingService
    from engine.accounting.client import BillingClient

    def no_stream(*a, **kw):
        raise AssertionError("a watcher opened its own stream to the accountant")

    engine = types.SimpleNamespace(cfg=types.SimpleNamespace(data_dir="/nonexistent",
                                                             accounts={"demo": None}))
    client = engine.accountant_client = BillingClient(engine, address="unix:/nonexistent")
    client._stub = types.SimpleNamespace(Events=no_stream)
    client.connected = True
    authority = types.SimpleNamespace(scope=lambda md: "demo")
    context = types.SimpleNamespace(invocation_metadata=lambda: ())
    svc = BillingService(engine, authority)
    # More watchers than the accountant has threads for its streams.
    watchers = [svc.Events(bp.BillingEventsRequest(), context) for _ in range(20)]
    firsts = [asyncio.ensure_future(w.__anext__()) for w in watchers]
    while len(client._subscribers) < 20:
        await asyncio.sleep(0.01)
    for q in list(client._subscribers):     # what the one stream hands on
        q.put_nowait(bp.BillingEvent(id="e1", type="balance.low", account="other"))
        q.put_nowait(bp.BillingEvent(id="e2", type="balance.low", account="demo"))
    got = await asyncio.gather(*firsts)
    assert {ev.id for ev in got} == {"e2"}       # another account's event is not shown
    for w in watchers:
        await w.aclose()
    assert not client._subscribers
