"""The platform operator's token (`[engine] operator_tokens`): a real engine
(this process) and a real accountant (a child process) with two accounts and
two vendors. The operator sees every account's sessions, invoices, balances,
queues and verifications and every vendor's payouts (with their total); an
account token still sees its own only; a bad operator token is
UNAUTHENTICATED; operator calls are not metered; the config check names the
key at fault."""
from __future__ import annotations

import asyncio
import time
import tomllib

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

import grpc  # noqa: E402

from proto import pb  # noqa: E402
from control.sdk import VendorClient  # noqa: E402
from engine.config import load as config_mod  # noqa: E402
from engine.cli.top import Frame, from_engine  # noqa: E402
from tests.helpers import period_now, running_engine  # noqa: E402
from tests.test_billing_api import Accountant, code_of  # noqa: E402
from tests.test_sessions import Caller  # noqa: E402
from tests.test_webhooks import toml_text  # noqa: E402
from tests.vendor_procs.harness import (OTHER_TOKEN, SECRET_A, SECRET_B, TOKEN,  # noqa: E402
                                        bearer, control_config, target, wait_until)

bp = pb.billing_pb2
sp = pb.sessions_pb2
ccp = pb.call_center_pb2
sv = pb.services_pb2
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
OPERATOR = "operator-token-0123456789abcdef0123456789"
KEY_TOKEN = "partner-key-token-0123456789"


def operator_config() -> dict:
    raw = control_config()
    raw["engine"]["operator_tokens"] = [OPERATOR]
    raw["plans"] = {"per-second": {"price": "0.60", "unit": "minute", "increment": "1/1"}}
    raw["billing"] = {"default_plan": "per-second",
                      "level_plans": {"basic": "per-second", "application": "per-second",
                                      "service": "per-second"}}
    raw["vendors"]["acme"]["revenue_share"] = "0.7"
    raw["vendors"]["globex"]["revenue_share"] = "0.5"
    raw["accounts"]["other"]["numbers"]["4998"] = {"module": "globex.desk"}
    # A metered key of the demo account: operator calls must not count against it.
    raw["api_keys"] = {"partner": {"account": "demo", "token": KEY_TOKEN, "quota": 100}}
    raw["call_center"] = {
        "agents": {"ann": {"uri": "sip:ann@127.0.0.1:9"}, "otto": {"uri": "sip:otto@127.0.0.1:9"}},
        "queues": {"demo-sales": {"account": "demo", "agents": ["ann"]},
                   "other-desk": {"account": "other", "agents": ["otto"]}}}
    return raw


def operator(account: str = "", token: str = OPERATOR) -> tuple:
    md = bearer(token)
    return md + ((("x-baton-account", account),) if account else ())


async def settled(billing, sid: str) -> bp.SessionCost:
    """A session's cost once the accountant has closed it (asked as the operator)."""
    last = None
    for _ in range(300):
        last = await billing.Cost(bp.SessionCostRequest(session_id=sid), metadata=operator())
        if not last.live:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"session {sid} still live at the accountant: {last}")


async def test_operator_sees_every_account_and_vendor(tmp_path):
    raw = operator_config()
    raw["engine"]["data_dir"] = str(tmp_path / "data")
    path = tmp_path / "baton.toml"
    path.write_text(toml_text(raw))
    raw = tomllib.loads(path.read_text())      # exactly what the accountant reads
    period = period_now()
    acct = None
    try:
        async with running_engine(raw) as eng:
            vendors = []
            for code, secret in (("acme.survey", SECRET_A), ("globex.desk", SECRET_B)):
                v = VendorClient(target(eng), code, secret)

                @v.on_offer
                async def on(offer):
                    call = await offer.take()
                    await call.answer()

                await v.start()
                vendors.append(v)
            async with grpc.aio.insecure_channel(target(eng)) as ch:
                billing = pb.billing_pb2_grpc.BillingStub(ch)
                sessions = pb.sessions_pb2_grpc.SessionsStub(ch)
                center = pb.call_center_pb2_grpc.CallCenterStub(ch)
                verify = pb.services_pb2_grpc.VerifyStub(ch)
                survey = pb.services_pb2_grpc.SurveyStub(ch)
                acct = Accountant(eng.cfg.data_dir, str(path))
                await acct.ready(billing)

                watched = []

                async def watch():
                    async for ev in sessions.Watch(sp.WatchRequest(kinds=["session.started"]),
                                                   metadata=operator()):
                        watched.append(ev.account)
                watcher = asyncio.ensure_future(watch())
                await asyncio.sleep(0.2)

                # One live call in each account, each in a vendor's module.
                demo_call, other_call = Caller(eng, "4000"), Caller(eng, "4998")
                await demo_call.dial()
                await other_call.dial()
                sid = {eng.sessions[s].number: s for s in eng.sessions}
                demo_sid, other_sid = sid["4000"], sid["4998"]

                # Sessions: the operator lists both accounts' calls, a token its own.
                r = await sessions.List(sp.ListRequest(), metadata=operator())
                assert {(s.session_id, s.account) for s in r.sessions} == \
                    {(demo_sid, "demo"), (other_sid, "other")}
                assert r.live == 2 and r.started_total >= 2
                frame = Frame(taken=time.monotonic())      # `baton top --token OPERATOR`
                await from_engine(sessions, OPERATOR, 100, False, frame)
                assert {row.session_id for row in frame.rows} == {demo_sid, other_sid}
                r = await sessions.List(sp.ListRequest(account="other"), metadata=operator())
                assert [s.session_id for s in r.sessions] == [other_sid]
                r = await sessions.List(sp.ListRequest(), metadata=operator("demo"))
                assert [s.session_id for s in r.sessions] == [demo_sid]
                r = await sessions.List(sp.ListRequest(), metadata=bearer())
                assert [s.session_id for s in r.sessions] == [demo_sid] and r.live == 1
                code, text = await code_of(sessions.List(sp.ListRequest(account="other"),
                                                         metadata=bearer()))
                assert code == grpc.StatusCode.PERMISSION_DENIED and "account" in text
                info = await sessions.Get(sp.GetRequest(session_id=other_sid),
                                          metadata=operator())
                assert info.account == "other" and info.live
                code, _ = await code_of(sessions.Get(sp.GetRequest(session_id=other_sid),
                                                     metadata=bearer()))
                assert code == grpc.StatusCode.NOT_FOUND
                code, _ = await code_of(sessions.Get(sp.GetRequest(session_id=other_sid),
                                                     metadata=operator("demo")))
                assert code == grpc.StatusCode.NOT_FOUND
                # It acts on any account's session; an originated call names its account.
                code, text = await code_of(sessions.Transition(sp.TransitionRequest(
                    session_id=other_sid, target="nowhere"), metadata=operator()))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and text.startswith("target")
                code, text = await code_of(sessions.Originate(sp.OriginateRequest(
                    to="sip:x@127.0.0.1:9", target="baton.hold"), metadata=operator()))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and text.startswith("account")
                await wait_until(lambda: len(watched) >= 2)
                assert sorted(watched) == ["demo", "other"]
                watcher.cancel()

                # Call centre: every account's queues.
                q = await center.QueueStats(ccp.QueueStatsRequest(), metadata=operator())
                assert {(x.name, x.account) for x in q.queues} == \
                    {("demo-sales", "demo"), ("other-desk", "other")}
                q = await center.QueueStats(ccp.QueueStatsRequest(), metadata=bearer())
                assert [x.name for x in q.queues] == ["demo-sales"]
                a = await center.ListAgents(ccp.ListAgentsRequest(), metadata=operator())
                assert {x.name for x in a.agents} == {"ann", "otto"}

                # Verify: the operator creates for the account it names, reads any.
                code, text = await code_of(verify.Create(
                    sv.VerifyCreateRequest(to="1555", channel="none"), metadata=operator()))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "x-baton-account" in text
                created = await verify.Create(sv.VerifyCreateRequest(to="1555", channel="none"),
                                              metadata=operator("other"))
                assert created.account == "other" and created.code
                got = await verify.Get(sv.VerifyGetRequest(
                    verification_id=created.verification_id), metadata=operator())
                assert got.account == "other"
                code, _ = await code_of(verify.Get(sv.VerifyGetRequest(
                    verification_id=created.verification_id), metadata=bearer()))
                assert code == grpc.StatusCode.NOT_FOUND
                checked = await verify.Check(sv.VerifyCheckRequest(to="1555", code=created.code),
                                             metadata=operator())
                assert checked.valid and checked.verification.status == "verified"
                runs = await survey.Results(sv.SurveyResultsRequest(), metadata=operator())
                assert list(runs.runs) == []

                await asyncio.sleep(1.2)
                await demo_call.bye()
                await other_call.bye()
                demo_cost = (await settled(billing, demo_sid)).cost.micros
                other_cost = (await settled(billing, other_sid)).cost.micros
                assert demo_cost > 0 and other_cost > 0

                # Invoices and balances of both accounts; an account token its own.
                for account, cost in (("demo", demo_cost), ("other", other_cost)):
                    inv = await billing.Invoice(bp.InvoiceRequest(account=account,
                                                                  period=period),
                                                metadata=operator())
                    assert inv.account == account and inv.total.micros == cost, inv
                    bal = await billing.Balance(bp.BalanceRequest(account=account),
                                                metadata=operator())
                    assert bal.account == account and bal.period_charges.micros == cost
                inv = await billing.Invoice(bp.InvoiceRequest(period=period),
                                            metadata=operator("other"))
                assert inv.account == "other" and inv.total.micros == other_cost
                code, text = await code_of(billing.Invoice(bp.InvoiceRequest(period=period),
                                                           metadata=operator()))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and text.startswith("account")
                code, text = await code_of(billing.Invoice(
                    bp.InvoiceRequest(period=period, account="nobody"), metadata=operator()))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and text.startswith("account")
                inv = await billing.Invoice(bp.InvoiceRequest(period=period), metadata=bearer())
                assert inv.account == "demo" and inv.total.micros == demo_cost
                code, _ = await code_of(billing.Invoice(
                    bp.InvoiceRequest(period=period, account="other"), metadata=bearer()))
                assert code == grpc.StatusCode.PERMISSION_DENIED
                code, _ = await code_of(billing.Cost(bp.SessionCostRequest(session_id=other_sid),
                                                     metadata=bearer()))
                assert code == grpc.StatusCode.NOT_FOUND

                # Payouts: every vendor with the total, or the one named.
                pay = await billing.Payouts(bp.PayoutsRequest(period=period),
                                            metadata=operator())
                by_vendor = {st.vendor: st for st in pay.statements}
                assert set(by_vendor) == {"acme", "globex"}
                assert by_vendor["acme"].gross.micros == demo_cost
                assert by_vendor["globex"].gross.micros == other_cost
                assert by_vendor["acme"].total.micros == demo_cost * 7 // 10
                assert pay.total.micros == sum(st.total.micros for st in pay.statements) > 0
                assert pay.total.currency == "USD" and pay.total.amount
                one = await billing.Payouts(bp.PayoutsRequest(period=period, vendor="globex"),
                                            metadata=operator())
                assert [st.vendor for st in one.statements] == ["globex"]
                assert one.total.micros == by_vendor["globex"].total.micros
                code, text = await code_of(billing.Payouts(
                    bp.PayoutsRequest(period=period, vendor="nobody"), metadata=operator()))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and text.startswith("vendor")
                # A vendor still sees its own statement only; an account token none.
                own = await billing.Payouts(bp.PayoutsRequest(period=period), metadata=(
                    ("x-baton-vendor", "acme"), ("x-baton-secret", SECRET_A)))
                assert [st.vendor for st in own.statements] == ["acme"]
                code, _ = await code_of(billing.Payouts(bp.PayoutsRequest(period=period),
                                                        metadata=bearer(OTHER_TOKEN)))
                assert code == grpc.StatusCode.PERMISSION_DENIED

                # A bad operator token is UNAUTHENTICATED everywhere.
                bad = bearer("operator-token-0123456789abcdef012345678X")
                for call in (sessions.List(sp.ListRequest(), metadata=bad),
                             billing.Payouts(bp.PayoutsRequest(period=period), metadata=bad),
                             billing.Invoice(bp.InvoiceRequest(period=period, account="demo"),
                                             metadata=bad),
                             center.QueueStats(ccp.QueueStatsRequest(), metadata=bad),
                             survey.Results(sv.SurveyResultsRequest(), metadata=bad)):
                    code, _ = await code_of(call)
                    assert code == UNAUTH
                code, text = await code_of(sessions.List(sp.ListRequest(),
                                                         metadata=operator("nobody")))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "x-baton-account" in text
                code, _ = await code_of(sessions.List(sp.ListRequest(), metadata=(
                    ("authorization", f"Bearer {TOKEN}"), ("x-baton-account", "other"))))
                assert code == grpc.StatusCode.PERMISSION_DENIED

                # The operator's calls were not counted against any API key.
                assert eng.control.metering.used(eng.cfg.api_keys["partner"]) == 0
            for v in vendors:
                await v.close()
    finally:
        if acct is not None:
            acct.stop()
            assert "Traceback" not in acct.output(), acct.output()


@pytest.mark.parametrize("tokens, key, problem", [
    (["short-operator-token"], "engine.operator_tokens[0]", "at least 32"),
    ([OPERATOR, OPERATOR], "engine.operator_tokens[1]", "listed twice"),
    ([TOKEN + "-and-more-characters"], None, None),
    (["demo-token-0123456789abcdef-is-also-an-account"], "engine.operator_tokens[0]",
     "api_tokens entry of account 'demo'"),
    ([KEY_TOKEN + "-0123"], "engine.operator_tokens[0]", "api_keys.partner"),
    ("not-a-list", "engine.operator_tokens", "expected list"),
])
def test_operator_tokens_are_checked(tokens, key, problem):
    raw = operator_config()
    raw["accounts"]["demo"]["api_tokens"].append("demo-token-0123456789abcdef-is-also-an-account")
    raw["api_keys"]["partner"]["token"] = KEY_TOKEN + "-0123"
    raw["engine"]["operator_tokens"] = tokens
    if problem is None:
        assert config_mod.from_dict(raw).operator_tokens == tokens
        return
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.from_dict(raw)
    assert err.value.key == key and problem in err.value.problem, str(err.value)


def test_operator_token_needs_no_account_and_is_not_an_api_key():
    from control.auth import AuthError, Authority

    raw = operator_config()
    auth = Authority(config_mod.from_dict(raw))
    assert auth.scope(operator()) is None
    assert auth.scope(operator("other")) == "other"
    assert auth.scope(bearer(OTHER_TOKEN)) == "other"
    assert auth.scope(bearer(KEY_TOKEN)) == "demo"
    assert auth.operator(operator()) and not auth.operator(bearer())
    with pytest.raises(AuthError) as err:
        auth.account(operator())          # a call that acts for one account
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert auth.account(operator("demo")) == "demo"
    with pytest.raises(AuthError) as err:
        auth.scope(bearer(OPERATOR[:-1] + "?"))
    assert err.value.code == UNAUTH
