"""Metered API access: API keys, their quotas and top-ups, over real gRPC on
loopback, with the real ring and the accountant posting to a real SQLite ledger."""
from __future__ import annotations

import hashlib
import time

import pytest

pytest.importorskip("ext.rtp", reason="ext.rtp is not built (make build)")

import grpc  # noqa: E402

from proto import pb  # noqa: E402
from engine.config.api_keys import load_api_keys  # noqa: E402
from engine.accounting.accountant import Accountant  # noqa: E402
from engine.accounting.invoices import invoice  # noqa: E402
from engine.config.load import ConfigError, from_dict  # noqa: E402
from tests.helpers import engine_config, period_now, running_engine  # noqa: E402

sp = pb.sessions_pb2

ACCOUNT_TOKEN = "account-token-0123456789"
SMALL = "small-key-token-0123456789"
TOPPED = "topped-key-token-0123456789"


def api_config() -> dict:
    raw = engine_config()
    raw["accounts"]["demo"]["api_tokens"] = [ACCOUNT_TOKEN]
    raw["plans"] = {"api-calls": {"price": "0.001", "unit": "action"}}
    raw["api_keys"] = {
        "small": {"account": "demo", "token": SMALL, "plan": "api-calls", "quota": 3},
        "topped": {"account": "demo", "token_sha256": hashlib.sha256(TOPPED.encode()).hexdigest(),
                   "quota": 2, "auto_top_up": {"calls": 2, "price": "5.00"}},
    }
    return raw


def md(token: str):
    return (("authorization", f"Bearer {token}"),)


async def calls(stub, token: str, n: int) -> list:
    """Make n List calls; the status code of each (OK or the error's)."""
    out = []
    for _ in range(n):
        try:
            await stub.List(sp.ListRequest(), metadata=md(token))
            out.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as exc:
            out.append(exc.code())
            last = exc
    if grpc.StatusCode.RESOURCE_EXHAUSTED in out:
        calls.last_details = last.details()
    return out


def target(eng) -> str:
    return f"127.0.0.1:{eng.grpc_port}"


async def test_quota_top_up_restart_and_invoice():
    raw = api_config()
    OK, EXHAUSTED = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
    async with running_engine(raw) as eng:
        data_dir = eng.cfg.data_dir
        async with grpc.aio.insecure_channel(target(eng)) as ch:
            stub = pb.sessions_pb2_grpc.SessionsStub(ch)
            # Within the quota the calls succeed and are counted; the next is refused.
            assert await calls(stub, SMALL, 4) == [OK, OK, OK, EXHAUSTED]
            assert "'small'" in calls.last_details and "quota of 3 calls" in calls.last_details
            assert eng.control.metering.used(eng.cfg.api_keys["small"]) == 3
            # A streaming call is refused the same way.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ev in stub.Watch(sp.WatchRequest(), metadata=md(SMALL)):
                    break
            assert err.value.code() == EXHAUSTED
            # The account's own token is not metered; a bad token is still refused.
            assert await calls(stub, ACCOUNT_TOKEN, 2) == [OK, OK]
            assert await calls(stub, "x" * 24, 1) == [grpc.StatusCode.UNAUTHENTICATED]
            # An agreement that tops up goes on: 2 included, then blocks of 2 calls.
            assert await calls(stub, TOPPED, 5) == [OK] * 5
            assert eng.control.metering.limit(eng.cfg.api_keys["topped"],
                                              eng.control.metering.period(eng.cfg.api_keys["topped"])) == 6
    # A restart keeps the counts (and stamps the last top-up again, billed once).
    async with running_engine(raw) as eng:
        async with grpc.aio.insecure_channel(target(eng)) as ch:
            stub = pb.sessions_pb2_grpc.SessionsStub(ch)
            assert await calls(stub, SMALL, 1) == [EXHAUSTED]
            assert await calls(stub, TOPPED, 1) == [OK]           # the 6th: no new top-up
            assert eng.control.metering.used(eng.cfg.api_keys["topped"]) == 6
    # The accountant rates the api_call actions per key, by the key's plan.
    period = period_now()
    with Accountant(data_dir, raw) as acct:
        acct.drain()
        assert not acct.ledger.check()
        inv = invoice(acct.ledger, "demo", period)
        api = [t for t in acct.ledger.transactions(account="demo")
               if t["module"].startswith("baton.api.")]
    lines = {(ln["module"], ln["item"]): ln for ln in inv["lines"]}
    small = lines[("baton.api.small", "api_call")]
    assert small["plan"] == "api-calls" and small["quantity"] == "3"
    assert small["amount_micro"] == 3 * 1000
    topped = lines[("baton.api.topped", "api_call")]
    assert topped["transactions"] == 6 and topped["amount_micro"] == 0      # no plan: free
    top_up = lines[("baton.api.topped", "api_top_up")]
    assert top_up["transactions"] == 2 and top_up["amount_micro"] == 2 * 5_000_000
    assert top_up["plan"] == "top-up 2 calls"
    assert inv["total_micro"] == 3 * 1000 + 10_000_000
    # Refused calls are not stamped: 3 + 6 calls and 2 top-ups, each posted once.
    assert sorted(t["item"] for t in api) == ["api_call"] * 9 + ["api_top_up"] * 2
    assert len({t["key"] for t in api}) == 11


@pytest.mark.parametrize("change,key,words", [
    ({"account": "nobody"}, "api_keys.k.account", "no account"),
    ({"token": "short"}, "api_keys.k.token", "16 characters"),
    ({"token_sha256": "ab" * 32}, "api_keys.k", "exactly one of token or token_sha256"),
    ({"token": None, "token_sha256": "xyz"}, "api_keys.k.token_sha256", "64 hex"),
    ({"quota": -1}, "api_keys.k.quota", "integer >= 0"),
    ({"quota": "10"}, "api_keys.k.quota", "integer >= 0"),
    ({"period": "week"}, "api_keys.k.period", "month or day"),
    ({"plan": "nope"}, "api_keys.k.plan", "no plan"),
    ({"plan": "per-minute"}, "api_keys.k.plan", "unit = \"action\""),
    ({"auto_top_up": {"calls": 0, "price": "1"}}, "api_keys.k.auto_top_up.calls", ">= 1"),
    ({"auto_top_up": {"calls": 10}}, "api_keys.k.auto_top_up.price", "required"),
    ({"auto_top_up": {"calls": 10, "price": "0.0000001"}}, "api_keys.k.auto_top_up.price",
     "precision"),
    ({"auto_top_up": {"calls": 10, "price": "1.00 EUR"}}, "api_keys.k.auto_top_up.price", "USD"),
    ({"color": "red"}, "api_keys.k.color", "unknown key"),
    ({"token": ACCOUNT_TOKEN}, "api_keys.k.token", "api_tokens"),
])
def test_config_errors_name_the_key(change, key, words):
    raw = engine_config()
    raw["accounts"]["demo"]["api_tokens"] = [ACCOUNT_TOKEN]
    raw["plans"] = {"per-minute": {"price": "0.01", "unit": "minute"}}
    table = {"account": "demo", "token": "k-token-0123456789abcdef", "quota": 10}
    table.update(change)
    raw["api_keys"] = {"k": {k: v for k, v in table.items() if v is not None}}
    with pytest.raises(ConfigError) as err:
        from_dict(raw, "<test>")
    assert key in str(err.value) and words in str(err.value), str(err.value)


def test_config_reads_keys():
    raw = api_config()
    keys = load_api_keys(raw)
    assert keys["small"].module == "baton.api.small" and keys["small"].top_up is None
    assert keys["topped"].top_up.calls == 2 and keys["topped"].top_up.price == 5_000_000
    assert from_dict(raw, "<test>").api_keys == keys
    raw["api_keys"]["twin"] = {"account": "demo", "token": SMALL, "quota": 1}
    with pytest.raises(ConfigError, match="the same token as api_keys.small"):
        from_dict(raw, "<test>")
