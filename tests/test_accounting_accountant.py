"""The accountant end to end: ring -> meter -> rater -> ledger -> invoice, its
resumption, running costs, the policy snapshot and the command line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ext.kernels import ring
from engine.accounting.accountant import COMMIT_BURST, Accountant, bill_main, main
from engine.accounting.invoices import invoice, payouts
from engine.accounting.ledger_sqlite import SqliteLedger
from engine.common import clock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 1_000_000_000
WALL0 = 1_793_491_200 * S          # 2026-11-01T00:00:00Z
MONO0 = 5_000 * S

SEED_CONFIG = {
    "plans": {"bridge-basic": {"price": "0.001", "unit": "minute"},
              "app-std": {"price": "0.01", "unit": "minute"}},
    "billing": {"level_plans": {"basic": "bridge-basic", "application": "app-std"}},
}

SEED_TOML = """
[plans.bridge-basic]
price = "0.001"
unit = "minute"

[plans.app-std]
price = "0.01"
unit = "minute"

[billing]
level_plans = { basic = "bridge-basic", application = "app-std" }
"""


class Engine:
    """Stamps records into a data dir's ring as the engine does."""

    def __init__(self, data_dir, node: str = "n1") -> None:
        self.w = ring.RingWriter(os.path.join(str(data_dir), "ring", "ring.dat"), slots=1024,
                                 node_id=node)

    def start(self, sid, t, account="demo"):
        self.w.stamp_session("start", sid, account, MONO0 + t, WALL0 + t)

    def go(self, sid, frm, to, level, t, account="demo"):
        self.w.stamp_transition(sid, account, frm, to, level, "r", MONO0 + t, WALL0 + t)

    def end(self, sid, t, account="demo"):
        self.w.stamp_session("end", sid, account, MONO0 + t, WALL0 + t, "hangup")

    def act(self, sid, module, action, count, account="demo"):
        self.w.stamp_action(sid, account, module, action, count)

    def seed_call(self, sid="S1", account="demo", t0=0):
        self.start(sid, t0, account)
        self.go(sid, "", "baton.instructions", "application", t0, account)
        self.go(sid, "baton.instructions", "baton.bridge", "basic", t0 + 120 * S, account)
        self.end(sid, t0 + 300 * S, account)

    def close(self):
        self.w.close()


def test_seed_example_through_the_ring(tmp_path):
    eng = Engine(tmp_path)
    eng.seed_call()
    with Accountant(str(tmp_path), SEED_CONFIG) as acct:
        assert acct.drain() == 4
        inv = invoice(acct.ledger, "demo", "2026-11")
        assert acct.ledger.check() == []
    assert inv["total"] == "0.023"
    amounts = {ln["module"]: ln["amount"] for ln in inv["lines"]}
    assert amounts == {"baton.bridge": "0.003", "baton.instructions": "0.02"}
    eng.close()


def test_seed_example_with_postgresql_store(tmp_path):
    from test_accounting_ledger import PG_URL, _drop_schema, _pg_unreachable

    reason = _pg_unreachable()
    if reason:
        pytest.skip(reason)
    schema = f"baton_acct_{os.getpid()}"
    eng = Engine(tmp_path)
    eng.seed_call()
    try:
        with Accountant(str(tmp_path), SEED_CONFIG, f"{PG_URL}?schema={schema}") as acct:
            acct.drain()
            assert invoice(acct.ledger, "demo", "2026-11")["total"] == "0.023"
            assert acct.ledger.position("n1") == 4
    finally:
        _drop_schema(schema)
        eng.close()


def test_open_sessions_survive_a_restart_and_batches(tmp_path):
    eng = Engine(tmp_path)
    cfg = {**SEED_CONFIG, "billing": {**SEED_CONFIG["billing"], "batch_records": 2}}
    eng.start("A", 0)
    eng.go("A", "", "baton.instructions", "application", 0)
    eng.start("B", 1 * S)
    eng.go("B", "", "baton.bridge", "basic", 1 * S)
    eng.go("A", "baton.instructions", "baton.bridge", "basic", 60 * S)
    with Accountant(str(tmp_path), cfg) as acct:
        assert acct.drain() == 5
        assert acct.batches == 3 and acct.ledger.count() == 1
        assert acct.ledger.position("n1") == 5
    with ring.RingReader(os.path.join(tmp_path, "ring", "ring.dat")) as r:
        assert r.position == 5          # the ring was released up to the committed position
    eng.end("A", 120 * S)
    eng.end("B", 121 * S)
    with Accountant(str(tmp_path), cfg) as acct:
        assert acct.drain() == 2
        txns = {t["session"] + ":" + t["module"]: t for t in acct.ledger.transactions()}
        assert acct.ledger.position("n1") == 7 and not acct.meter.sessions
    assert txns["A:baton.instructions"]["amount"] == 10000        # 60 s at 0.01/min
    assert txns["A:baton.bridge"]["amount"] == 1000               # 60 s at 0.001/min
    assert txns["B:baton.bridge"]["usage"] == 120 * S
    assert txns["B:baton.bridge"]["amount"] == 2000
    eng.close()


CONFIG = {
    "plans": {
        "bridge": {"price": "0.01", "unit": "minute", "increment": "60/60",
                   "connect_fee": "0.005"},
        "app": {"price": "0.02", "unit": "minute"},
        "survey": {"kind": "graduated", "tier_scope": "session", "unit": "minute",
                   "tiers": [{"up_to": 60, "price": "0.10"}, {"price": "0.05"}]},
        "sms": {"price": "0.01", "unit": "action", "cap": 5, "at_cap": "deny"},
        "unlimited": {"kind": "subscription", "fee": "20.00", "unit": "minute"},
        "gated": {"kind": "subscription", "fee": "5.00", "unit": "minute", "unpaid": "deny"},
    },
    "billing": {"level_plans": {"basic": "bridge", "application": "app"},
                "action_plans": {"message": "sms"}},
    "vendors": {"acme": {"revenue_share": 0.7, "modules": ["acme.survey"],
                         "plans": {"acme.survey": "survey"}}},
    "accounts": {
        "pre": {"billing": {"prepaid_balance": "1.00", "credit_limit": "0.50"}},
        "post": {"billing": {"credit_limit": "100.00", "banned": True}},
        "subs": {"billing": {"plans": {"baton.bridge": "unlimited", "baton.menu": "gated"},
                             "paid_periods": ["2026-12"]}},
    },
}


def test_running_cost_and_policy_snapshot(tmp_path):
    eng = Engine(tmp_path)
    eng.start("L", 0, "pre")
    eng.go("L", "", "baton.bridge", "basic", 0, "pre")
    eng.start("V", 0, "post")
    eng.go("V", "", "acme.survey", "service", 0, "post")
    eng.go("V", "acme.survey", "baton.menu", "application", 90 * S, "post")
    for _ in range(3):
        eng.act("V", "baton.menu", "message", 2, "post")
    with Accountant(str(tmp_path), CONFIG) as acct:
        acct.drain()
        # 60/60 + connect fee: 59 s -> no increment completed yet, only the connect fee
        assert acct.running_cost("L", MONO0 + 59 * S) == 5000
        assert acct.running_cost("L", MONO0 + 61 * S) == 5000 + 10000
        assert acct.running_cost("L", MONO0 + 125 * S) == 5000 + 20000
        assert acct.running_cost("nope") is None
        # survey 90 s in one session: 60 s at 0.10 + 30 s at 0.05 = 0.125; vendor 0.7
        survey = [t for t in acct.ledger.transactions(session="V") if t["module"] == "acme.survey"][0]
        assert survey["amount"] == 125000 and survey["vendor_amount"] == 87500
        # messages: 6 with a cap of 5 -> the sixth is denied, recorded at zero
        msgs = [t for t in acct.ledger.transactions(session="V") if t["item"] == "message"]
        assert [t["amount"] for t in msgs] == [20000, 20000, 10000]
        assert msgs[-1]["note"] == "over-cap"
        assert acct.running_cost("V", MONO0 + 150 * S) == 125000 + 50000 + 20000
        snap = acct.policy_snapshot(now_mono_ns=MONO0 + 125 * S, now_wall_ns=WALL0 + 125 * S)
        pre, post = snap["accounts"]["pre"], snap["accounts"]["post"]
        assert pre["balance_micro"] == 1_000_000 - 25000
        assert pre["funds_left_micro"] == 1_500_000 - 25000 and not pre["out_of_funds"]
        assert post["banned"] is True
        assert post["caps_reached"] == ["baton.menu:message"]
        assert post["deny"] == ["baton.menu:message"]
        # postpaid: this period's charges plus the live segment (35 s at 0.02/min = 11667)
        assert post["balance_micro"] == -(175000 + 11667)
        assert post["funds_left_micro"] == 100_000_000 - 186667
        assert post["live_sessions_cost_micro"] == 11667
        path = acct.write_policy()
    with open(path) as f:
        on_disk = json.load(f)
    assert set(on_disk["accounts"]) >= {"pre", "post", "subs"}
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    eng.close()


def test_running_cost_after_a_payer_change_is_the_new_payers(tmp_path):
    # A calling card: the number's owner pays for the service until the PIN, the card
    # after it. The live cost is the card's, as an ended session's cost is its last
    # payer's; what the owner was charged stays the owner's (in the owner's currency).
    eng = Engine(tmp_path)
    eng.start("P", 0, "post")
    eng.go("P", "", "baton.menu", "application", 0, "post")
    eng.go("P", "baton.menu", "baton.bridge", "basic", 60 * S, "pre")     # the card pays
    with Accountant(str(tmp_path), CONFIG) as acct:
        acct.drain()
        owner = [t for t in acct.ledger.transactions(session="P") if t["account"] == "post"]
        assert [t["amount"] for t in owner] == [20000]        # 60 s at 0.02/min
        # 61 s into the bridge: its connect fee and one 60 s increment, the card's alone
        assert acct.running_cost("P", MONO0 + 121 * S) == 5000 + 10000
        snap = acct.policy_snapshot(now_mono_ns=MONO0 + 121 * S, now_wall_ns=WALL0 + 121 * S)
        assert snap["accounts"]["pre"]["balance_micro"] == 1_000_000 - 15000
    # The split by payer survives the accountant's restart (its state is reloaded).
    with Accountant(str(tmp_path), CONFIG) as acct:
        acct.drain()
        assert acct.running_cost("P", MONO0 + 121 * S) == 5000 + 10000
    eng.close()


def test_subscriptions(tmp_path):
    eng = Engine(tmp_path)
    month2 = 30 * 86400 * S            # into 2026-12, which is paid outside
    for i, t in enumerate((0, 3600 * S, month2)):
        sid = f"U{i}"
        eng.start(sid, t, "subs")
        eng.go(sid, "", "baton.bridge", "basic", t, "subs")
        eng.go(sid, "baton.bridge", "baton.menu", "application", t + 600 * S, "subs")
        eng.end(sid, t + 660 * S, "subs")
    with Accountant(str(tmp_path), CONFIG) as acct:
        acct.drain()
        nov = invoice(acct.ledger, "subs", "2026-11")
        dec = invoice(acct.ledger, "subs", "2026-12")
        fees = [t for t in acct.ledger.transactions(account="subs") if t["kind"] == "fee"]
        menu = [t for t in acct.ledger.transactions(account="subs") if t["module"] == "baton.menu"]
        snap = acct.policy_snapshot(now_wall_ns=WALL0 + 10 * S)
    # one fee in November (charged at the first use), none in the prepaid December
    assert [(f["period"], f["amount"]) for f in fees] == [("2026-11", 20_000_000)]
    assert nov["total"] == "20.00" and dec["total"] == "0.00"
    assert [t["note"] for t in menu] == ["unpaid", "unpaid", ""]   # gated: only December paid
    sub = snap["accounts"]["subs"]
    assert sub["subscriptions"]["baton.bridge"]["paid"] is True
    assert sub["subscriptions"]["baton.menu"]["paid"] is False
    assert sub["deny"] == ["baton.menu"] and sub["period_paid"] is False
    eng.close()


def test_node_restart_closes_stale_sessions(tmp_path):
    eng = Engine(tmp_path)
    eng.start("A", 0)
    eng.go("A", "", "baton.instructions", "application", 0)
    eng.start("B", 30 * S)
    eng.go("B", "", "baton.instructions", "application", 30 * S)
    with Accountant(str(tmp_path), SEED_CONFIG) as acct:
        acct.drain()
        assert acct.close_stale() == 2
        txns = {t["session"]: t for t in acct.ledger.transactions()}
        assert txns["A"]["key"] == "n1:stale:A" and txns["A"]["usage"] == 30 * S
        assert txns["B"]["usage"] == 0
        assert not acct.meter.sessions
    with Accountant(str(tmp_path), SEED_CONFIG) as acct:      # and that was committed
        assert not acct.meter.sessions and acct.ledger.count() == 2
    eng.close()


def test_cli_once_and_bill(tmp_path, capsys):
    cfg = tmp_path / "baton.toml"
    cfg.write_text(SEED_TOML)
    data = tmp_path / "data"
    eng = Engine(data)
    eng.seed_call()
    assert main(["--data-dir", str(data), "--config", str(cfg), "--once",
                 "--log-level", "warning"]) == 0
    assert os.path.exists(data / "policy.json")
    capsys.readouterr()
    assert bill_main(["invoice", "--account", "demo", "--period", "2026-11", "--format", "json",
                      "--data-dir", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == "0.023"
    assert bill_main(["payouts", "--period", "2026-11", "--data-dir", str(data)]) == 0
    assert "No payouts" in capsys.readouterr().out
    assert bill_main(["invoice", "--account", "demo", "--period", "2026-11",
                      "--data-dir", str(tmp_path / "none")]) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('[plans.x]\nprice = "0.0000001"\n')
    assert main(["--data-dir", str(data), "--config", str(bad), "--once"]) == 2
    assert "plans.x.price" in capsys.readouterr().err
    eng.close()


def test_standalone_process_and_sigterm(tmp_path):
    cfg = tmp_path / "baton.toml"
    cfg.write_text(SEED_TOML)
    data = tmp_path / "data"
    eng = Engine(data)
    # The accountant's clock reads mid-November 2026, the period of the stamps.
    env = {**os.environ, "PYTHONPATH": ROOT,
           clock.SHIFT_ENV: str(clock.shift_to(WALL0 + 14 * 86400 * S))}
    proc = subprocess.Popen([sys.executable, "-m", "engine.accounting.accountant", "--data-dir",
                             str(data), "--config", str(cfg), "--log-level", "warning"],
                            cwd=ROOT, env=env)
    try:
        eng.seed_call("S1")
        eng.seed_call("S2", t0=400 * S)
        deadline = time.monotonic() + 20
        led = None
        while time.monotonic() < deadline:
            if os.path.exists(data / "accounting" / "ledger.db"):
                led = led or SqliteLedger(str(data / "accounting" / "ledger.db"))
                if led.position("n1") == 8:
                    break
            time.sleep(0.05)
        assert led is not None and led.position("n1") == 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert invoice(led, "demo", "2026-11")["total"] == "0.046"
        assert json.load(open(data / "policy.json"))["accounts"]["demo"]["balance"] == "-0.046"
        led.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        eng.close()
    out = subprocess.run([sys.executable, "-m", "engine.accounting.accountant", "bill", "invoice",
                          "--account", "demo", "--period", "2026-11", "--format", "csv",
                          "--data-dir", str(data)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "demo,2026-11,TOTAL,,,,,,0.046,USD"


def test_payouts_from_the_accountant(tmp_path):
    eng = Engine(tmp_path)
    for i, acc in enumerate(("a", "b")):
        eng.start(f"P{i}", 0, acc)
        eng.go(f"P{i}", "", "acme.survey", "service", 0, acc)
        eng.end(f"P{i}", 60 * S, acc)
    with Accountant(str(tmp_path), CONFIG) as acct:
        acct.drain()
        rep = payouts(acct.ledger, "2026-11")
    st = rep["statements"][0]
    assert st["vendor"] == "acme" and st["gross"] == "0.20"
    assert st["total"] == "0.14" and st["platform_share"] == "0.06"
    eng.close()


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_failed_commit_is_retried_from_the_committed_position(tmp_path, pipeline):
    eng = Engine(tmp_path)
    cfg = {**SEED_CONFIG, "billing": {**SEED_CONFIG["billing"], "batch_records": 3}}
    for i in range(4):
        eng.seed_call(f"F{i}", t0=i * 1000 * S)
    with Accountant(str(tmp_path), cfg, pipeline=pipeline) as acct:
        # what posts the batches: the ledger, or the committer's writer process
        poster = acct._committer.ledger if acct._committer is not None else acct.ledger
        real = poster.post
        calls = []

        def flaky(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("database went away")
            return real(*a, **k)

        poster.post = flaky               # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="went away"):
            acct.drain()
        acct.drain()
        assert acct.ledger.position("n1") == 16
        assert invoice(acct.ledger, "demo", "2026-11")["total"] == "0.092"
        assert acct.ledger.count() == 8 and acct.ledger.check() == []
    eng.close()


def test_commits_are_paced_while_records_keep_coming(tmp_path):
    """`billing.commit_ms`: while calls keep stamping, a batch is committed at most once
    per commit_ms (each commit is an fsync), and every record still reaches the ledger."""
    import threading

    eng = Engine(tmp_path)
    cfg = {**SEED_CONFIG, "billing": {**SEED_CONFIG["billing"], "commit_ms": 200}}
    with Accountant(str(tmp_path), cfg) as acct:
        runner = threading.Thread(target=acct.run_forever, kwargs={"install_signals": False})
        runner.start()
        t0 = time.monotonic()
        for i in range(60):                    # a call's four records every 10 ms or so
            eng.seed_call(f"P{i}", t0=i * 1000 * S)
            time.sleep(0.01)
        stamping = time.monotonic() - t0
        batches_while_stamping = acct.batches
        acct.stop()
        runner.join(10)
        assert not runner.is_alive()
        # One batch per 200 ms at most after a burst of COMMIT_BURST, however slow the
        # machine: a slower one only stretches the gaps.
        assert 1 <= batches_while_stamping <= stamping / 0.2 + COMMIT_BURST + 1
        assert acct.ledger.position("n1") == 240 and acct.ledger.check() == []
    eng.close()


def test_commit_ms_must_be_a_number(tmp_path):
    from engine.accounting.config import BillingConfig, BillingConfigError

    with pytest.raises(BillingConfigError, match="billing.commit_ms"):
        BillingConfig.from_dict({**SEED_CONFIG, "billing": {"commit_ms": -1}})
    assert BillingConfig.from_dict({**SEED_CONFIG, "billing": {"commit_ms": 0}}).commit_ms == 0
