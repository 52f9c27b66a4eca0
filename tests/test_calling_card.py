"""`baton.calling_card` end to end: `baton serve` (engine and accountant), a
PJSIP caller sending RFC 4733 DTMF, driven by the session events it causes.

A wrong PIN, then the right one (the paying account becomes the card's), the
balance, a destination whose far end speaks and hangs up, back to the card
with the balance after that call, "press 1", a second call to the echo
number cut off at the balance with the spoken warning before; then one
invoice of the card's account with service time and bridged time at their
own rates, and the time before the PIN on the number owner's invoice.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import pytest

from engine.config import ConfigError, from_dict
from engine.modules.services.calling_card import CallingCardModule, spoken_money, spoken_time
from tests.test_prepaid import (Caller, Watcher, drain, loudness, media_config, needs_peers,
                                run_bill, wait_for_policy)

OP_TOKEN = "card-operator-token-0123456789"
CARD_TOKEN = "card-1001-token-0123456789abc"

CARD_TOML = """
[billing]
policy_interval = 0.1
level_plans = {{ basic = "bridge", service = "service", application = "service" }}

# 3 cents a second bridged, 1 cent a second at the service level
[plans.bridge]
price = "1.80"
unit = "minute"
increment = "1/1"
[plans.service]
price = "0.60"
unit = "minute"
increment = "1/1"

[apps.card]
start = "card"
[apps.card.nodes.card]
module = "baton.calling_card"
outlets = {{ done = "hangup" }}
[apps.card.nodes.card.params]
pins = {{ "4321" = "card-1001" }}
dial = "sip:{{digits}}@{{self}}"
warn_before = 4
warning_text = "Your card is about to run out."
min_call_seconds = 2
timeout = 10

[apps.bye]
start = "msg"
[apps.bye.nodes.msg]
module = "baton.play"
params = {{ text = "Hello from the far end. Goodbye." }}

[accounts.op]
api_tokens = ["{op}"]
[accounts.op.numbers]
"7100" = {{ app = "card" }}

[accounts.card-1001]
api_tokens = ["{card}"]
[accounts.card-1001.billing]
prepaid_balance = "0.50"

[accounts.far.numbers]
"7000" = {{ module = "baton.echo" }}
"7001" = {{ app = "bye" }}
"""


def test_money_and_time_are_spoken_in_words():
    assert spoken_money(2_050_000, "USD") == "2 dollars and 5 cents"
    assert spoken_money(1_000_000, "EUR") == "1 euro"
    assert spoken_money(509_999, "USD") == "50 cents"      # never more than there is
    assert spoken_money(-5, "GBP") == "0 pounds"
    assert spoken_money(1_230_000, "CHF") == "1.23 CHF"
    assert spoken_time(200) == "3 minutes and 20 seconds"
    assert spoken_time(60) == "1 minute"
    assert spoken_time(9) == "9 seconds"


def card_app(**params) -> dict:
    return {"apps": {"c": {"start": "card", "nodes": {"card": {
        "module": "baton.calling_card", "params": params}}}}}


@pytest.mark.parametrize("params,key", [
    ({"pins": {"12a4": "x"}}, "params.pins.12a4"),
    ({"pins": {"1234": ""}}, "params.pins.1234"),
    ({"pins": ["1234"]}, "params.pins"),
    ({"dial": "sip:1000@example.com"}, "params.dial"),
    ({"dial": "{digits}"}, "params.dial"),
    ({"max_attempts": 0}, "params.max_attempts"),
    ({"pin_min": 8, "pin_max": 4}, "params.pin_min"),
    ({"pin_prompt": ""}, "params.pin_prompt"),
    ({"warn_before": -2}, "params.warn_before"),
    ({"colour": "red"}, "params.colour"),
])
def test_params_are_checked_at_load(params, key):
    with pytest.raises(ConfigError) as err:
        from_dict(card_app(**params))
    assert err.value.key == f"apps.c.nodes.card.{key}", err.value


def test_good_params_load_and_a_trunk_takes_bare_digits():
    from_dict(card_app(pins={"4321": "card-1"}, dial="{digits}", trunk="carrier",
                       warning_text="Soon.", max_attempts=2))
    CallingCardModule.check_params({})


def test_pins_are_compared_whole_and_come_from_params_and_accounts():
    import types

    mod = CallingCardModule.__new__(CallingCardModule)
    accounts = {"a": types.SimpleNamespace(kv={"card_pin": "9999"}),
                "b": types.SimpleNamespace(kv={})}
    ctl = types.SimpleNamespace(params={"pins": {"4321": "card-1"}, "pin_min": 4},
                                engine=types.SimpleNamespace(cfg=types.SimpleNamespace(
                                    accounts=accounts)))
    assert mod.verify(ctl, "4321") == "card-1"
    assert mod.verify(ctl, "9999") == "a"
    assert mod.verify(ctl, "432") is None
    assert mod.verify(ctl, "43210") is None
    assert mod.verify(ctl, "") is None


def step(name):
    return lambda kind, detail: kind == "calling_card.step" and detail.get("step") == name


@needs_peers
def test_calling_card_end_to_end():
    pytest.importorskip("pjsua2")
    from tests.helpers import EngineProcess

    tmp = tempfile.mkdtemp(prefix="baton-card-")
    config = os.path.join(tmp, "card.toml")
    with open(config, "w") as f:
        f.write(media_config() + CARD_TOML.format(op=OP_TOKEN, card=CARD_TOKEN))
    eng = EngineProcess(config)
    with eng:
        assert wait_for_policy(eng.data_dir, "card-1001")["balance_micro"] == 500_000
        op, card = Watcher(eng.grpc_port, OP_TOKEN), Watcher(eng.grpc_port, CARD_TOKEN)
        record = os.path.join(tmp, "heard.wav")
        caller = Caller(eng.port, "7100", record, max_seconds=60)
        confirmed = caller.wait("confirmed")
        i, *_ = op.wait(step("pin"))
        caller.send("dtmf 1111#")                              # a wrong PIN
        i, _, wrong, _ = op.wait(step("pin-invalid"), after=i)
        assert wrong["attempts"] == 1
        op.wait(step("pin"), after=i)
        caller.send("dtmf 4321#")
        # The session is the card's from here on: its events reach the card's watchers.
        j, _, auth, _ = card.wait(step("authenticated"))
        assert auth["account"] == "card-1001"
        j, *_ = card.wait(step("destination"), after=j)
        caller.send("dtmf 7001#")                              # the far end speaks, hangs up
        j, _, dialled, _ = card.wait(step("dialling"), after=j)
        assert dialled == {"step": "dialling", "destination": "7001", "call": 1}
        j, _, after, _ = card.wait(step("after-call"), after=j)
        assert after["outcome"] == "completed"
        j, _, again, _ = card.wait(step("another"), after=j)
        # The balance read again covers the call just made: the service time and
        # at least one bridged second (3 cents) are gone.
        assert again["balance_micro"] <= 500_000 - 30_000 - 10_000, again
        caller.send("dtmf 1")
        j, *_ = card.wait(step("destination"), after=j)
        caller.send("dtmf 7000#")                              # the echo: cut at the limit
        j, _, dialled, _ = card.wait(step("dialling"), after=j)
        assert dialled["call"] == 2
        j, _, warning, warned_at = card.wait(lambda k, d: k == "limit-warning", after=j)
        assert warning["module"] == "baton.bridge" and warning["seconds_left"] == 4.0
        j, _, ended, _ = card.wait(lambda k, d: k == "ended", after=j)
        assert ended["reason"] == "limit"
        caller.wait("disconnected")
        assert caller.finish()["disconnected"]
        op.close()
        card.close()
        assert eng.stop(timeout=20) == 0
    assert "Traceback" not in eng.output(), eng.output()
    t0 = confirmed["record_start"]
    spoken = loudness(record, warned_at - t0, warned_at - t0 + 3.0)
    quiet = loudness(record, warned_at - t0 - 1.5, warned_at - t0 - 0.3)
    assert spoken > 300 and spoken > 10 * (quiet + 1), (quiet, spoken)

    drain(eng.data_dir, config)
    period = time.strftime("%Y-%m", time.gmtime())

    def invoice(account):
        r = run_bill("invoice", "--account", account, "--period", period, "--format", "json",
                     "--data-dir", eng.data_dir, "--config", config)
        assert r.returncode == 0, r.stderr
        inv = json.loads(r.stdout)
        return inv, {ln["module"]: ln for ln in inv["lines"] if ln["item"] == "time"}

    inv, lines = invoice("card-1001")
    # One invoice: service time at the service rate, bridged time at the bridge rate.
    assert set(lines) == {"baton.calling_card", "baton.bridge"}, inv
    assert lines["baton.calling_card"]["plan"] == "service"
    assert lines["baton.calling_card"]["unit_price"] == "0.60"
    assert lines["baton.bridge"]["plan"] == "bridge"
    assert lines["baton.bridge"]["unit_price"] == "1.80"
    assert lines["baton.bridge"]["amount_micro"] > lines["baton.calling_card"]["amount_micro"] > 0
    # Within the balance, but for one increment of the module cut off (3 cents).
    assert inv["total_micro"] <= 500_000 + 30_000, inv
    # The time before the PIN was entered is the number owner's.
    op_inv, op_lines = invoice("op")
    assert set(op_lines) == {"baton.calling_card"}, op_inv
    assert op_lines["baton.calling_card"]["amount_micro"] > 0


@pytest.mark.parametrize("path", ["feed", "feed_payloads"])
def test_a_mid_session_account_change_bills_each_account_its_own_time(path):
    """What `Session.set_account` stamps (a transition to the same module
    naming the new account) splits the segment: the time before is the old
    account's, everything after (this module and the next) the new one's."""
    import msgpack

    from engine.accounting.meter import Meter, Segment

    s = 1_000_000_000
    recs = [
        {"type": "session", "kind": "start", "session": "S1", "account": "op",
         "mono_ns": 0, "wall_ns": 0},
        {"type": "transition", "session": "S1", "account": "op", "from": "",
         "to": "baton.calling_card", "level": "service", "mono_ns": 0, "wall_ns": 0},
        {"type": "transition", "session": "S1", "account": "card-1",
         "from": "baton.calling_card", "to": "baton.calling_card", "level": "service",
         "reason": "calling-card:pin", "mono_ns": 7 * s, "wall_ns": 7 * s},
        {"type": "transition", "session": "S1", "account": "card-1",
         "from": "baton.calling_card", "to": "baton.bridge", "level": "basic",
         "mono_ns": 12 * s, "wall_ns": 12 * s},
        {"type": "session", "kind": "end", "session": "S1", "account": "card-1",
         "mono_ns": 40 * s, "wall_ns": 40 * s, "reason": "limit"},
    ]
    m = Meter()
    out: list = []
    if path == "feed":
        for seq, rec in enumerate(recs, 1):
            m.feed({**rec, "seq": seq, "node": "n1"}, out)
    else:
        m.feed_payloads([(seq, msgpack.packb(rec)) for seq, rec in enumerate(recs, 1)],
                        "n1", out, msgpack.unpackb)
    segs = [(e.account, e.module, e.duration_ns // s) for e in out if isinstance(e, Segment)]
    assert segs == [("op", "baton.calling_card", 7), ("card-1", "baton.calling_card", 5),
                    ("card-1", "baton.bridge", 28)]
