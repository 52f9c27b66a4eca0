"""Prepaid balances: the time limit the policy computes from the funds left
and the usage plan, the warning before it runs out and the cut-off at zero.

Unit tests of the computation, then one call end to end: `baton serve`
(engine and accountant), a prepaid account whose number bridges to the
engine's echo number, a PJSIP caller. The warning event arrives, the caller
hears the spoken warning over the bridge, the call is cut at the limit, and
the ledger charges the account no more than its balance.
"""
from __future__ import annotations

import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
import wave

import pytest

from engine.accounting.plans import parse_plan
from engine.sessions.policy import Decision, Pending, Snapshot
from engine.sessions.prepaid import GUARD, affordable, limit_seconds, segment_cost
from tests.helpers import BATON, EngineProcess, ROOT, period_now

M = 1_000_000


# -- the limit computation ------------------------------------------------------------

def plan(**table):
    return parse_plan("p", table)


@pytest.mark.parametrize("table,funds,billed", [
    # per second at $0.60/min (1 cent a second): 100 s for $1.00
    ({"price": "0.60", "increment": "1/1"}, 1 * M, 100),
    # 60/60: whole minutes only
    ({"price": "0.60", "increment": "60/60"}, 1 * M, 60),
    ({"price": "0.60", "increment": "60/60"}, 1_200_000, 120),
    # 6/6 with a connect fee: $0.95 left after the fee -> 95 s -> 90 on the 6 s grid
    ({"price": "0.60", "increment": "6/6", "connect_fee": "0.05"}, 1 * M, 90),
    # 30/6: at least 30 s, then 6 s steps
    ({"price": "0.60", "increment": "30/6"}, 400_000, 36),
    ({"price": "0.60", "increment": "30/6"}, 290_000, 0),
    # a minimum per line: nothing below $0.50 is billed
    ({"price": "0.60", "increment": "1/1", "minimum": "0.50"}, 400_000, 0),
    ({"price": "0.60", "increment": "1/1", "minimum": "0.50"}, 600_000, 60),
    # per hour, per second increments: $3.60/h = 0.1 cent a second
    ({"price": "3.60", "unit": "hour", "increment": "1/1"}, 10_000, 10),
    # graduated, falling prices: $0.10/min for 10 minutes, then $0.05/min
    ({"kind": "graduated", "tier_scope": "session",
      "tiers": [{"up_to": "10m", "price": "0.10"}, {"price": "0.05"}]}, 1_500_000, 1200),
])
def test_affordable_time_per_plan_shape(table, funds, billed):
    p = plan(**table)
    assert affordable(p, funds) == billed
    if billed:
        assert segment_cost(p, billed) <= funds
        nxt = billed + p.increment.next
        assert segment_cost(p, nxt) > funds


def test_free_time_and_paid_subscriptions_have_no_limit():
    assert affordable(plan(price="0"), 1) is None
    assert affordable(plan(kind="subscription", fee="10.00"), 1) is None
    # $0.001/min lasts beyond the horizon with $100
    assert affordable(plan(price="0.001", increment="1/1"), 100 * M) is None


def test_tiers_that_get_dearer_are_priced_at_the_top_for_every_unit():
    p = plan(kind="graduated", tiers=[{"up_to": 60, "price": "0.60", "unit": "minute"},
                                      {"price": "1.20", "unit": "minute"}])
    # 2 cents a second for every second: $1.00 -> 50 s (the exact price would allow 80 s)
    assert affordable(p, 1 * M) == 50
    v = plan(kind="volume", tiers=[{"up_to": 600, "price": "0.60"}, {"price": "0.30"}],
             unit="minute")
    assert affordable(v, 1 * M) == 100


def test_the_capped_plan_counts_the_period_usage_and_overage():
    p = plan(price="0.60", increment="1/1", cap=100, at_cap="overage", overage_price="1.20")
    assert affordable(p, 1 * M, prior_period=0) == 100
    # the cap is used up: every second is overage at 2 cents
    assert affordable(p, 1 * M, prior_period=100) == 50


def test_limit_seconds_stay_inside_the_last_increment():
    assert limit_seconds(None) is None
    assert limit_seconds(60) == 60 - GUARD
    assert limit_seconds(1) == 0.75


# -- the snapshot hook ----------------------------------------------------------------

class FakeLoop:
    def call_later(self, *_a):
        return types.SimpleNamespace(cancel=lambda: None)


def fake_engine(raw: dict, policy: dict | None = None):
    cfg = types.SimpleNamespace(raw=raw, policy=policy or {})
    return types.SimpleNamespace(cfg=cfg, stamper=types.SimpleNamespace(
                                     node_id="n1", writer=types.SimpleNamespace(next_seq=50)),
                                 loop=FakeLoop(), listeners=[])


def fake_session(engine, account, sid="S1"):
    return types.SimpleNamespace(id=sid, engine=engine, account=account, from_uri="<sip:a@b>",
                                 control=None, module=None, ended=False)


RAW = {"plans": {"bridge": {"price": "1.80", "increment": "1/1"},
                 "svc": {"price": "0.60", "increment": "6/6", "connect_fee": "0.02"}},
       "billing": {"level_plans": {"basic": "bridge", "service": "svc"}},
       "accounts": {"pre": {"billing": {"prepaid_balance": "0.30"}}}}


def snapshot_with(tmp_path, accounts: dict) -> Snapshot:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"accounts": accounts, "node": "n1", "position": 10}))
    return Snapshot(str(path))


def test_snapshot_limits_and_shares_the_funds_between_live_sessions(tmp_path):
    snap = snapshot_with(tmp_path, {"pre": {"funds_left_micro": 300_000, "balance_micro": 300_000}})
    eng = fake_engine(RAW, {"warn_before": 4, "warning_text": "Low balance."})
    bridge = types.SimpleNamespace(code="baton.bridge", level="basic")
    node = types.SimpleNamespace(params={})
    s1 = fake_session(eng, "pre", "S1")
    d = snap.check(s1, node, bridge)
    # 3 cents a second: $0.30 -> 10 s, cut 0.25 s before
    assert d.allow and d.limit == 10 - GUARD and d.cost == 300_000
    assert (d.warn_before, d.warning) == (4.0, "Low balance.")
    # A second live call of the account gets what the first did not reserve: nothing.
    s2 = fake_session(eng, "pre", "S2")
    d2 = snap.check(s2, node, bridge)
    assert not d2.allow and "first increment" in d2.reason
    # When the first ends, its reservation counts until a snapshot covers its end.
    s1.ended = True
    assert not snap.check(s2, node, bridge).allow
    snap.position = 10**9
    d3 = snap.check(s2, node, bridge)
    assert d3.allow and d3.limit == 10 - GUARD
    # The node's params win over [policy]; a service plan with a connect fee and 6/6.
    svc = types.SimpleNamespace(code="baton.calling_card", level="service")
    s3 = fake_session(eng, "pre", "S3")
    snap._holds.clear()
    d4 = snap.check(s3, types.SimpleNamespace(params={"warn_before": 9}), svc)
    # ($0.30 - $0.02) at 1 cent a second -> 28 s -> 24 s on the 6 s grid
    assert d4.limit == 24 - GUARD and d4.warn_before == 9.0


def test_snapshot_denies_without_funds_and_leaves_other_accounts_alone(tmp_path):
    snap = snapshot_with(tmp_path, {"pre": {"funds_left_micro": 0, "out_of_funds": True},
                                    "post": {"funds_left_micro": None}})
    eng = fake_engine(RAW)
    bridge = types.SimpleNamespace(code="baton.bridge", level="basic")
    node = types.SimpleNamespace(params={})
    assert not snap.check(fake_session(eng, "pre"), node, bridge).allow
    d = snap.check(fake_session(eng, "post"), node, bridge)
    assert d.allow and d.limit is None
    assert snap.check(fake_session(eng, "nobody"), node, bridge) == Decision(True)


def test_policy_warning_keys_are_checked_at_load():
    from engine.config.load import ConfigError, from_dict

    for pol, key in [({"warn_before": -1}, "policy.warn_before"),
                     ({"warn_before": "30"}, "policy.warn_before"),
                     ({"warning_text": 5}, "policy.warning_text"),
                     ({"accounts": {"a": {"warn_befor": 3}}}, "policy.accounts.a.warn_befor"),
                     ({"accounts": {"a": {"warn_before": 9999}}}, "policy.accounts.a.warn_before")]:
        with pytest.raises(ConfigError) as err:
            from_dict({"policy": pol})
        assert err.value.key == key, err.value
    cfg = from_dict({"policy": {"warn_before": 10, "warning_text": "Soon.",
                                "accounts": {"a": {"warn_before": 5}}}})
    assert cfg.policy["warn_before"] == 10


# -- end to end -------------------------------------------------------------------------

def run_bill(*args, timeout=60):
    return subprocess.run([BATON, "bill", *args], capture_output=True, text=True,
                          timeout=timeout)


def drain(data_dir: str, config: str) -> None:
    """Post what the stopped engine stamped last: `serve` stops its accountant
    after the batch in hand, and the rest waits in the ring for the next run."""
    r = subprocess.run([BATON, "accountant", "--data-dir", data_dir, "--config", config,
                        "--once"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


class Caller:
    """tests/pjsip_caller.py in a child process: commands in, EVENT lines out."""

    def __init__(self, port: int, number: str, record: str, max_seconds: float = 60,
                 user: str = "pjsip"):
        self.record = record
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "pjsip_caller.py"), "--engine",
             f"127.0.0.1:{port}", "--number", number, "--record", record,
             "--max", str(max_seconds), "--user", user],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT)
        self.events: queue.Queue = queue.Queue()
        self.seen: list = []
        self.result = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("EVENT "):
                self.events.put(json.loads(line[6:]))
            elif line.startswith("RESULT "):
                self.result = json.loads(line[7:])
                self.events.put({"event": "result"})

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def wait(self, kind: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        for ev in self.seen:
            if ev["event"] == kind:
                return ev
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"caller: no {kind} event (seen {self.seen})")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(ev)
            if ev["event"] == kind:
                return ev

    def finish(self, timeout: float = 20) -> dict:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout)
        err = self.proc.stderr.read()
        assert self.result is not None, err
        assert "error" not in self.result, self.result
        return self.result


class Watcher:
    """gRPC Sessions.Watch of one account, in a thread: (kind, detail, wall) events."""

    def __init__(self, grpc_port: int, token: str):
        import grpc

        from proto import pb

        self.pb = pb
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.stub = pb.sessions_pb2_grpc.SessionsStub(self.channel)
        self.events: list = []
        self.cond = threading.Condition()
        # The engine answers SIP before its gRPC server listens: connect first,
        # then give the server a moment to register the stream's listener.
        grpc.channel_ready_future(self.channel).result(timeout=20)
        self.stream = self.stub.Watch(pb.sessions_pb2.WatchRequest(),
                                      metadata=(("authorization", f"Bearer {token}"),))
        threading.Thread(target=self._run, daemon=True).start()
        time.sleep(1.0)

    def _run(self):
        try:
            for ev in self.stream:
                with self.cond:
                    self.events.append((ev.kind, self.pb.from_struct(ev.detail), time.time(),
                                        ev.session_id))
                    self.cond.notify_all()
        except Exception:
            pass

    def wait(self, pred, timeout: float = 20, after: int = 0):
        """The first event from index `after` on that `pred(kind, detail)` accepts:
        (index, kind, detail, wall time)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(self.events)):
                    kind, detail, wall, _sid = self.events[i]
                    if pred(kind, detail):
                        return i, kind, detail, wall
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"watch: no matching event in {self.events[after:]}")
                self.cond.wait(left)

    def close(self):
        self.stream.cancel()
        self.channel.close()


def wait_for_policy(data_dir: str, account: str, timeout: float = 15) -> dict:
    path = os.path.join(data_dir, "policy.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                acc = json.load(f)["accounts"].get(account)
            if acc is not None:
                return acc
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no policy snapshot for {account} in {path}")


def loudness(path: str, start: float, end: float) -> float:
    """RMS of a 16-bit mono WAV between two offsets (seconds)."""
    import numpy as np

    with wave.open(path) as w:
        rate = w.getframerate()
        w.setpos(min(w.getnframes(), int(start * rate)))
        frames = w.readframes(max(0, int((end - start) * rate)))
    x = np.frombuffer(frames, dtype="<i2").astype(np.float64)
    return float(math.sqrt((x ** 2).mean())) if len(x) else 0.0


def media_config() -> str:
    base = 30000 + (os.getpid() * 131 % 18000)
    base -= base % 2
    return f"""
[engine]
transports = ["udp"]
[media]
address = "127.0.0.1"
rtp_port_min = {base}
rtp_port_max = {base + 1000}
"""


PREPAID_TOML = """
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

[policy]
warn_before = 4
warning_text = "Your balance is about to run out."

[accounts.pre]
api_tokens = ["{token}"]
[accounts.pre.billing]
prepaid_balance = "0.30"
[accounts.pre.numbers]
"8000" = {{ endpoint = "sip:7000@{{self}}" }}

[accounts.far.numbers]
"7000" = {{ module = "baton.echo" }}
"""

TOKEN = "prepaid-test-token-0123456789"


def needs_peers(test):
    """An end-to-end test with a PJSIP caller and spoken prompts."""
    test = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                              reason="needs espeak-ng (Debian espeak-ng)")(test)
    return pytest.mark.interop(test)


@needs_peers
def test_prepaid_call_is_warned_then_cut_off_at_the_balance():
    pytest.importorskip("pjsua2")
    tmp = tempfile.mkdtemp(prefix="baton-prepaid-")
    config = os.path.join(tmp, "prepaid.toml")
    with open(config, "w") as f:
        f.write(media_config() + PREPAID_TOML.format(token=TOKEN))
    eng = EngineProcess(config)
    with eng:
        acc = wait_for_policy(eng.data_dir, "pre")
        assert acc["funds_left_micro"] == 300_000
        watch = Watcher(eng.grpc_port, TOKEN)
        record = os.path.join(tmp, "heard.wav")
        caller = Caller(eng.port, "8000", record, max_seconds=30)
        confirmed = caller.wait("confirmed")
        _, _, warning, warned_at = watch.wait(lambda k, d: k == "limit-warning")
        assert warning["module"] == "baton.bridge"
        # $0.30 at 3 cents a second: 10 s, cut a guard before; warned 4 s before that
        assert warning["limit"] == pytest.approx(10 - GUARD)
        assert warning["seconds_left"] == pytest.approx(4.0)
        _, _, ended, ended_at = watch.wait(lambda k, d: k == "ended")
        assert ended["reason"] == "limit"
        caller.wait("disconnected")
        result = caller.finish()
        assert result["disconnected"]
        watch.close()
        assert eng.stop(timeout=20) == 0
    assert "Traceback" not in eng.output(), eng.output()
    # The caller heard silence echoed back before the warning, and speech with it.
    t0 = confirmed["record_start"]
    quiet = loudness(record, 1.0, warned_at - t0 - 0.5)
    spoken = loudness(record, warned_at - t0, warned_at - t0 + 3.0)
    assert spoken > 300 and spoken > 10 * (quiet + 1), (quiet, spoken)
    drain(eng.data_dir, config)
    period = period_now()
    r = run_bill("invoice", "--account", "pre", "--period", period, "--format", "json",
                 "--data-dir", eng.data_dir, "--config", config)
    assert r.returncode == 0, r.stderr
    inv = json.loads(r.stdout)
    modules = {ln["module"] for ln in inv["lines"]}
    assert modules == {"baton.bridge"}, inv
    # Never more than the balance: the cut-off comes GUARD s before the last paid
    # second ends, so only an event loop late by more than that would add one
    # more increment (3 cents) -- the documented bound.
    assert inv["total_micro"] <= 300_000 + 30_000, inv
    assert inv["total_micro"] >= 270_000, inv


ECHO_TOML = """
[plans.basic]
price = "1.80"
unit = "minute"
increment = "1/1"
[billing]
level_plans = {{ basic = "basic" }}

[accounts.pre]
api_tokens = ["{token}"]
[accounts.pre.numbers]
"8100" = {{ module = "baton.echo" }}

[policy.accounts.pre]
warn_before = 4
warning_text = "Two seconds of warning."
"""


@needs_peers
def test_the_warning_is_spoken_over_an_echo_and_the_snapshot_alone_sets_the_limit():
    """No accountant: the limit comes from a snapshot file as the accountant
    would write it; the warning is spoken over the echo, which then goes on."""
    pytest.importorskip("pjsua2")
    tmp = tempfile.mkdtemp(prefix="baton-prepaid-")
    config = os.path.join(tmp, "echo.toml")
    with open(config, "w") as f:
        f.write(media_config() + ECHO_TOML.format(token=TOKEN))
    eng = EngineProcess(config, extra=["--no-accountant"])
    with open(os.path.join(eng.data_dir, "policy.json"), "w") as f:
        json.dump({"node": "node1", "position": None, "accounts": {
            "pre": {"funds_left_micro": 200_000, "balance_micro": 200_000}}}, f)
    with eng:
        watch = Watcher(eng.grpc_port, TOKEN)
        record = os.path.join(tmp, "heard.wav")
        caller = Caller(eng.port, "8100", record, max_seconds=20)
        confirmed = caller.wait("confirmed")
        _, _, warning, warned_at = watch.wait(lambda k, d: k == "limit-warning")
        # $0.20 at 3 cents a second: 6 s billed, so the limit is 5.75 s
        assert warning == {"module": "baton.echo", "seconds_left": 4.0, "limit": 6 - GUARD}
        _, _, ended, _ = watch.wait(lambda k, d: k == "ended")
        assert ended["reason"] == "limit"
        caller.wait("disconnected")
        caller.finish()
        watch.close()
        assert eng.stop(timeout=20) == 0
    assert "Traceback" not in eng.output(), eng.output()
    t0 = confirmed["record_start"]
    spoken = loudness(record, warned_at - t0, warned_at - t0 + 2.5)
    assert spoken > 300, spoken


def test_free_time_needs_no_funds_even_when_others_reserved_them():
    assert affordable(plan(price="0"), -5) is None
    assert affordable(plan(price="0.60", increment="1/1"), -5) == 0
    assert affordable(plan(price="0.60", unit="action"), 1_000_000) is None
    assert affordable(plan(price="0.60", unit="action"), 10) == 0


def _live_session(policy_decision):
    import asyncio

    from engine.sessions.session import Control, Session

    loop = asyncio.new_event_loop()
    noop = lambda *a, **k: None  # noqa: E731
    eng = types.SimpleNamespace(
        loop=loop, listeners=[], journal=noop,
        stamper=types.SimpleNamespace(transition=noop, session_start=noop),
        policy=types.SimpleNamespace(check=lambda s, n, m: policy_decision))
    s = Session(eng, "op", "1234", "<sip:a@b>", "<sip:1234@b>")
    s.module = types.SimpleNamespace(code="baton.calling_card", level="service")
    s.node = types.SimpleNamespace(name="card", params={})
    ctl = s.control = Control(s, s.node, s.module, {})
    return loop, s, ctl


def test_a_new_paying_account_replaces_the_earlier_limit():
    loop, s, ctl = _live_session(Decision(True, limit=100.0, warn_before=10.0))
    try:
        s._arm_limit(ctl, Decision(True, limit=5.0, warn_before=2.0))
        old = ctl.limit_timers
        assert len(old) == 2 and not any(h.cancelled() for h in old)
        assert s.set_account("card-1").limit == 100.0
        # The number's account's cut-off must not end the card's call.
        assert all(h.cancelled() for h in old)
        assert len(ctl.limit_timers) == 2 and not any(h.cancelled() for h in ctl.limit_timers)
    finally:
        ctl.deactivate()
        loop.close()


def test_rearmed_timers_do_not_pile_up_on_a_long_call():
    loop, s, ctl = _live_session(Decision(True))
    try:
        h = None
        for _ in range(1000):       # a prompt's timeout re-armed on every key
            if h is not None:
                h.cancel()
            h = ctl.later(5.0, lambda: None)
        assert len(ctl.timers) <= 32
    finally:
        ctl.deactivate()
        loop.close()


@pytest.mark.parametrize("batched", [True, False], ids=["one-batch", "record-by-record"])
def test_a_new_payer_starts_its_own_session_tiers(batched):
    from engine.accounting.config import BillingConfig
    from engine.accounting.meter import Meter
    from engine.accounting.rater import Rater
    from tests.test_accounting_meter import Stream

    book = BillingConfig.from_dict({
        "plans": {"card": {"kind": "graduated", "tier_scope": "session",
                           "tiers": [{"up_to": "10m", "flat": "1.00"},
                                     {"price": "0.10", "unit": "minute"}]}},
        "billing": {"level_plans": {"service": "card"}}})
    s, m, r = Stream(), Meter(), Rater(book)
    sec = 10**9
    code = "baton.calling_card"
    records = [s.start("S", 0, account="op"),
               s.go("S", "", code, 0, level="service", account="op"),
               # The PIN is known: the rest of the session is the card's.
               s.go("S", code, code, 30 * sec, level="service", account="card"),
               s.end("S", 60 * sec, account="card")]
    lines = []
    if batched:
        r.rate(m.feed_many(records), lines)
    else:
        for rec in records:
            r.rate(m.feed_many([rec]), lines)
    charged = {}
    for ln in lines:
        charged[ln.account] = charged.get(ln.account, 0) + ln.amount
    # Each payer's first unit opens its first tier: the flat amount, once each.
    assert charged == {"op": 1_000_000, "card": 1_000_000}


def test_a_payer_change_counts_the_time_so_far_against_the_previous_payer(tmp_path):
    raw = {**RAW, "accounts": {"op": {"billing": {"prepaid_balance": "1.00"}},
                               "card": {"billing": {"prepaid_balance": "1.00"}}}}
    snap = snapshot_with(tmp_path, {"op": {"funds_left_micro": 1_000_000},
                                    "card": {"funds_left_micro": 1_000_000}})
    eng = fake_engine(raw)
    bridge = types.SimpleNamespace(code="baton.bridge", level="basic")
    s1 = fake_session(eng, "op", "S1")
    s1.module = bridge
    # 10 s in the bridge so far, at 3 cents a second, not in any snapshot yet.
    s1.control = types.SimpleNamespace(active=True, span=types.SimpleNamespace(
        start_mono=time.monotonic_ns() - 10 * 10**9))
    snap.payer_changing(s1)
    s1.account = "card"
    s1.control.span = types.SimpleNamespace(start_mono=time.monotonic_ns())
    other_op, other_card = fake_session(eng, "op", "S2"), fake_session(eng, "card", "S3")
    assert 640_000 <= snap.available(other_op, 1_000_000) <= 700_000
    assert snap.available(other_card, 1_000_000) == 1_000_000
    # The card's grant: its funds less the first second of the new segment;
    # nothing of the time before is counted against the card.
    d = snap.check(s1, types.SimpleNamespace(params={}), bridge)
    assert d.allow and d.cost == 960_000
    assert snap.available(other_card, 1_000_000) == 1_000_000 - d.cost
    assert 640_000 <= snap.available(other_op, 1_000_000) <= 700_000


class FakeClusterFunds:
    """engine/sessions/reservations.py's contract: grant(free) under the row lock."""

    def __init__(self, free: int):
        self.free = free
        self.reserved: list[int] = []

    def reserve(self, account, session, funds_micro, grant):
        cost = grant(self.free)
        if cost == 0:
            return None
        self.reserved.append(cost)
        return cost

    def run(self, fn, *args, grant=False):
        """The worker thread's job, run at once (its result on the loop, as the real one)."""
        import asyncio

        fut = asyncio.get_running_loop().create_future()
        fut.set_result(fn(*args))
        return fut


async def test_cluster_funds_that_outlast_the_horizon_grant_an_unlimited_call(tmp_path):
    """A card whose cluster-wide funds last longer than prepaid.HORIZON: the call is
    allowed without a cut-off and the horizon's cost is what gets reserved."""
    from engine.sessions.prepaid import HORIZON

    raw = {**RAW, "accounts": {"rich": {"billing": {"prepaid_balance": "50000.00"}}}}
    snap = snapshot_with(tmp_path, {"rich": {"funds_left_micro": 50_000 * M,
                                             "balance_micro": 50_000 * M}})
    snap.cluster = FakeClusterFunds(50_000 * M)
    eng = fake_engine(raw)
    bridge = types.SimpleNamespace(code="baton.bridge", level="basic")
    d = snap.check(fake_session(eng, "rich"), types.SimpleNamespace(params={}), bridge)
    assert isinstance(d, Pending)       # the cluster is asked off the loop
    d = await d
    assert d.allow and d.limit is None, d
    # 3 cents a second over the horizon
    assert snap.cluster.reserved == [HORIZON * 30_000]
