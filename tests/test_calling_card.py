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

from engine.config.load import ConfigError, from_dict
from engine.modules.services.calling_card import (CallingCardModule, LockoutBook, backoff,
                                                  caller_key, spoken_money, spoken_time)
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
    ({"lockout_after": 1.5}, "params.lockout_after"),
    ({"lockout_after": 101}, "params.lockout_after"),
    ({"lockout_window": 0}, "params.lockout_window"),
    ({"lockout_seconds": "10"}, "params.lockout_seconds"),
    ({"lockout_text": ""}, "params.lockout_text"),
    ({"pins": {"123": "card-1"}}, "params.pins.123"),           # pin_min is 4 by default
    ({"pins": {"12345": "card-1"}, "pin_min": 6}, "params.pins.12345"),
    ({"guess_budget": -1}, "params.guess_budget"),
    ({"backoff_seconds": 0}, "params.backoff_seconds"),
    ({"backoff_seconds": 30, "backoff_max": 10}, "params.backoff_seconds"),
    ({"colour": "red"}, "params.colour"),
])
def test_params_are_checked_at_load(params, key):
    with pytest.raises(ConfigError) as err:
        from_dict(card_app(**params))
    assert err.value.key == f"apps.c.nodes.card.{key}", err.value


def test_good_params_load_and_a_trunk_takes_bare_digits():
    from_dict(card_app(pins={"4321": "card-1"}, dial="{digits}", trunk="carrier",
                       warning_text="Soon.", max_attempts=2))
    from_dict(card_app(lockout_after=0))                  # no lockout across calls
    from_dict(card_app(lockout_after=4, lockout_window=600, lockout_seconds=1800))
    from_dict(card_app(pins={"123": "card-1"}, pin_min=3, guess_budget=50, backoff_seconds=1,
                       backoff_max=120))
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


def test_callers_are_counted_by_the_from_user():
    assert caller_key('"Bob" <sip:+15551234@carrier.example>;tag=a1') == "caller:15551234"
    assert caller_key("sip:Alice@pbx.example;transport=tcp") == "caller:alice"
    assert caller_key("<sip:pbx.example>") == "caller:pbx.example"
    assert caller_key("") == "caller:anonymous"
    assert len(caller_key("sip:" + "9" * 10_000 + "@x")) == len("caller:") + 128


def test_wrong_pins_lock_a_caller_within_a_sliding_window(tmp_path):
    path = str(tmp_path / "services" / "calling_card.db")
    book = LockoutBook(path)
    bob, card = "caller:1555", "caller:1666"
    try:
        # Two wrong PINs 70 s apart with a 60 s window: never two in the window.
        assert book.fail(bob, 1000.0, 2, 60, 30) == 0
        assert book.fail(bob, 1070.0, 2, 60, 30) == 0
        assert book.locked([bob], 1070.0) == {}
        # A third within 60 s of the second: locked for 30 s, whatever PIN comes next.
        assert book.fail(bob, 1100.0, 2, 60, 30) == 30
        assert book.locked([bob, card], 1110.0) == {bob: 20.0}
        assert book.locked(["caller:other"], 1110.0) == {}
        # Another caller's lock is its own.
        assert book.fail(card, 1110.0, 1, 60, 30) == 30
        assert book.locked([bob, card], 1125.0) == {bob: 5.0, card: 15.0}
        # The lock ends; the count started again at the lock, so one wrong PIN is not enough.
        assert book.locked([bob, card], 1141.0) == {}
        assert book.fail(bob, 1141.0, 2, 60, 30) == 0
        assert book.fail(bob, 1143.0, 2, 60, 30) == 30
    finally:
        book.close()
    # A restart: the lock is still there (and then over at its time).
    book = LockoutBook(path)
    try:
        assert book.locked([bob], 1150.0) == {bob: 23.0}
        assert book.locked([bob], 1173.0) == {}
    finally:
        book.close()


def test_wrong_pins_at_a_node_back_off_every_caller_past_the_budget(tmp_path):
    # No wait within the budget, then the first back-off doubled per wrong PIN, capped.
    assert [backoff(n, 3, 2, 60) for n in range(2, 10)] == [0, 2, 4, 8, 16, 32, 60, 60]
    assert backoff(10 ** 6, 3, 2, 60) == 60
    assert backoff(100, 0, 2, 60) == 0                       # guess_budget = 0: none
    book = LockoutBook(str(tmp_path / "c.db"))
    pool = "cards:card/card"
    try:
        # Wrong PINs from many callers all count against the node's cards; none
        # of those callers is locked (one wrong PIN each).
        for i in range(4):
            assert book.guess(f"caller:{i}", pool, 1000.0 + i, 2, 60, 30) == 0
        assert book.check("caller:new", pool, 1004.0, 60) == ({}, 4)
        # The window slides; a note counts for the node only.
        book.note(pool, 1005.0)
        assert book.check("caller:0", pool, 1061.5, 60) == ({}, 3)
        # The second wrong PIN from one caller locks that caller (not the node).
        assert book.guess("caller:3", pool, 1062.0, 2, 60, 30) == 30
        assert book.check("caller:3", pool, 1062.0, 60) == ({"caller:3": 30.0}, 3)
    finally:
        book.close()


def test_the_lockout_book_stays_bounded(tmp_path):
    book = LockoutBook(str(tmp_path / "c.db"), max_rows=50)
    try:
        for i in range(LockoutBook.PRUNE_EVERY * 4):
            book.fail(f"caller:{i}", 1000.0 + i, 100, 60, 30)
            book.fail(f"caller:x{i}", 1000.0 + i, 1, 60, 1)
        db = book._db
        # Failures older than the longest window and ended locks go, and never
        # more than max_rows of either are kept.
        kept = db.execute("SELECT COUNT(*) FROM failures").fetchone()[0]
        assert kept <= 50 + 2 * book.PRUNE_EVERY
        newest = db.execute("SELECT MAX(at) FROM failures").fetchone()[0]
        assert db.execute("SELECT COUNT(*) FROM locks").fetchone()[0] <= 2
        # What is kept is the newest.
        assert newest == 1000.0 + LockoutBook.PRUNE_EVERY * 4 - 1
    finally:
        book.close()


def test_the_lockout_book_runs_in_order_on_its_own_thread(tmp_path):
    import threading

    book = LockoutBook(str(tmp_path / "c.db"))
    try:
        seen = book.submit(lambda: threading.current_thread().name).result(5)
        assert seen.startswith("baton-card")
        futs = [book.submit(book.fail, "caller:1", 1000.0 + i, 3, 60, 30) for i in range(3)]
        assert [f.result(5) for f in futs] == [0, 0, 30]
        assert book.submit(book.locked, ["caller:1"], 1002.0).result(5) == {"caller:1": 30.0}
    finally:
        book.close()
    with pytest.raises(RuntimeError):
        book.submit(book.locked, ["caller:1"], 1000.0).result(5)


def step(name):
    return lambda kind, detail: kind == "calling_card.step" and detail.get("step") == name


@needs_peers
def test_calling_card_end_to_end():
    pytest.importorskip("pjsua2")
    from tests.helpers import EngineProcess, period_now

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
    period = period_now()

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


LOCKOUT_TOML = """
[apps.card]
start = "card"
[apps.card.nodes.card]
module = "baton.calling_card"
outlets = {{ done = "hangup" }}
[apps.card.nodes.card.params]
pins = {{ "4321" = "card-1001" }}
max_attempts = 1
lockout_after = 2
lockout_window = 600
lockout_seconds = {lock}
guess_budget = {budget}
backoff_seconds = 1
backoff_max = 2
timeout = 10

[accounts.op]
api_tokens = ["{op}"]
[accounts.op.numbers]
"7100" = {{ app = "card" }}

[accounts.card-1001]
api_tokens = ["{card}"]
"""
LOCK_SECONDS = 15


def _card_call(port: int, tmp: str, n: int, pin: str, op, until, user: str = "pjsip") -> tuple:
    """One call to the card from `user` (the From user): the PIN keyed after its
    prompt, then the step `until` accepts; (the watcher's index, detail, wall time)."""
    start = len(op.events)
    caller = Caller(port, "7100", os.path.join(tmp, f"call{n}.wav"), max_seconds=40, user=user)
    caller.wait("confirmed")
    i, *_ = op.wait(step("pin"), after=start)
    caller.send(f"dtmf {pin}#")
    i, _, detail, wall = until(i)
    return caller, i, detail, wall


def _lockout_config(prefix: str, budget: int) -> tuple[str, str]:
    """A temporary directory and the LOCKOUT_TOML config written in it."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    config = os.path.join(tmp, "card.toml")
    with open(config, "w") as f:
        f.write(media_config() + LOCKOUT_TOML.format(op=OP_TOKEN, card=CARD_TOKEN,
                                                     lock=LOCK_SECONDS, budget=budget))
    return tmp, config


@needs_peers
def test_wrong_pins_across_calls_lock_the_caller_out_even_after_a_restart():
    """Two calls with a wrong PIN lock the caller (From user) out: the third,
    after an engine restart, is refused with the right PIN; the card is not
    locked, so its owner (another From) enters the right PIN and is in."""
    pytest.importorskip("pjsua2")
    from tests.helpers import EngineProcess

    tmp, config = _lockout_config("baton-card-lock-", budget=10)
    # No accountant: nothing here is billed, and the restart is quicker (the
    # third call must come within LOCK_SECONDS of the second).
    eng = EngineProcess(config, extra=["--no-accountant"])
    with eng:
        op = Watcher(eng.grpc_port, OP_TOKEN)
        # 1: a wrong PIN ends the call (max_attempts = 1), not locked out yet.
        c, i, _, _ = _card_call(eng.port, tmp, 1, "1111", op,
                                lambda i: op.wait(step("locked"), after=i))
        c.wait("disconnected")
        c.finish()
        assert not [e for e in op.events if e[1].get("step") == "lockout"]
        # 2: the second wrong PIN from the same caller: locked out.
        c, i, out, _ = _card_call(eng.port, tmp, 2, "2222", op,
                                  lambda i: op.wait(step("lockout"), after=i))
        assert 0 < out["seconds_left"] <= LOCK_SECONDS
        c.wait("disconnected")
        c.finish()
        op.close()
        assert eng.stop(timeout=20) == 0
    assert "Traceback" not in eng.output(), eng.output()

    # The same data directory after a restart: still locked, even with the right PIN.
    again = EngineProcess(config, extra=["--data-dir", eng.data_dir, "--no-accountant"])
    with again:
        op = Watcher(again.grpc_port, OP_TOKEN)
        c, i, out, _ = _card_call(again.port, tmp, 3, "4321", op,
                                  lambda i: op.wait(step("lockout"), after=i))
        assert 0 < out["seconds_left"] < LOCK_SECONDS
        c.wait("disconnected")
        c.finish()
        # The call left through `locked` (unwired: ended) and never became the card's.
        op.wait(lambda k, d: k == "ended" and d.get("reason") == "outlet:locked", after=i)
        # The guesser's right PIN locked no card: its owner, calling now, is in.
        assert not [e for e in op.events if e[1].get("step") == "card-locked"]
        card = Watcher(again.grpc_port, CARD_TOKEN)
        c, i, auth, _ = _card_call(again.port, tmp, 4, "4321", op,
                                   lambda i: card.wait(step("authenticated")), user="owner")
        assert auth["account"] == "card-1001"
        assert not [e for e in op.events if e[1].get("step") == "backoff"]
        c.send("hangup")
        c.wait("disconnected")
        c.finish()
        op.close()
        card.close()
        assert again.stop(timeout=20) == 0
    assert "Traceback" not in again.output(), again.output()


@needs_peers
def test_guesses_from_many_callers_back_off_the_card_but_not_its_owner():
    """Wrong PINs from three callers (one each, none locked out) use up the
    node's budget of 3: the next caller, a From never seen, waits before its PIN
    is checked and its wrong PIN ends the call; the card's owner (a new From
    too) waits longer, and its right PIN is accepted."""
    pytest.importorskip("pjsua2")
    from tests.helpers import EngineProcess

    tmp, config = _lockout_config("baton-card-guess-", budget=3)
    eng = EngineProcess(config, extra=["--no-accountant"])
    with eng:
        op = Watcher(eng.grpc_port, OP_TOKEN)
        card = Watcher(eng.grpc_port, CARD_TOKEN)

        def steps(after):
            return [e[1]["step"] for e in op.events[after:] if e[0] == "calling_card.step"]

        for n, user in enumerate(("1001", "1002", "1003"), 1):
            start = len(op.events)
            c, i, _, _ = _card_call(eng.port, tmp, n, f"{n}{n}{n}{n}", op,
                                    lambda i: op.wait(step("locked"), after=i), user=user)
            c.wait("disconnected")
            c.finish()
            assert steps(start) == ["pin", "pin-invalid", "locked"], steps(start)
        # The budget is spent: a fresh From backs off (1 s), then its wrong PIN ends the call.
        start = len(op.events)
        c, i, back, _ = _card_call(eng.port, tmp, 4, "5555", op,
                                   lambda i: op.wait(step("backoff"), after=i), user="1004")
        assert back == {"step": "backoff", "seconds": 1.0, "guesses": 3}
        op.wait(step("locked"), after=i)
        c.wait("disconnected")
        c.finish()
        assert steps(start) == ["pin", "backoff", "pin-invalid", "locked"], steps(start)
        # The owner: a longer back-off (one more guess), then the right PIN is accepted.
        start = len(op.events)
        c, i, back, _ = _card_call(eng.port, tmp, 5, "4321", op,
                                   lambda i: op.wait(step("backoff"), after=i), user="owner")
        assert back == {"step": "backoff", "seconds": 2.0, "guesses": 4}
        _, _, auth, _ = card.wait(step("authenticated"))
        assert auth["account"] == "card-1001"
        c.send("hangup")
        c.wait("disconnected")
        c.finish()
        op.close()
        card.close()
        assert eng.stop(timeout=20) == 0
    assert "Traceback" not in eng.output(), eng.output()
