"""One accountant per ring (issue 13, items 2 and 3).

Where money is checked, the ledger is compared with an independent recount of
the ring's stamps, to the micro-unit:
- `test_second_accountant_*` writes its own stamps and rates them itself with
  the per-unit plans of tests/test_accounting_crash.py (`expected_ledger`);
- the `baton serve` crash tests recount with a fresh Accountant over a copy of
  the ring (its released cursor wound back to the first record) into a fresh
  ledger: the same records, metered once, in one run, by one accountant.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import pytest

from ext.kernels import ring
from engine.accounting.accountant import Accountant, AccountantBusy
from engine.accounting.ledger import LedgerFenced, Line
from engine.accounting.ledger_pg import PostgresLedger
from engine.accounting.ledger_sqlite import SqliteLedger
from engine.accounting.lock import AccountantLock, lock_holder, lock_path
from ext.ring_py import RELEASED_OFF
from tests.helpers import BATON, BlockingPeer, EngineProcess, free_port
from tests.test_accounting_crash import CONFIG, WALL0, expected_ledger, generate
from tests.test_accounting_ledger import PG_URL, _drop_schema, _pg_unreachable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIPP = shutil.which("sipp")


def _line(key: str, amount: int = 1000) -> Line:
    return Line(key=key, kind="usage", node="n1", seq=None, session="s1", account="a1",
                module="baton.bridge", item="time", level="basic", period="2031-01",
                wall_ns=WALL0, usage=1, quantity=1, unit="second", plan="p", unit_price=None,
                amount=amount, currency="USD", vendor="", vendor_amount=0, corrects=None, note="")


def _ledgers(kind, tmp_path):
    if kind == "sqlite":
        path = str(tmp_path / "ledger.db")
        return SqliteLedger(path), SqliteLedger(path), None
    reason = _pg_unreachable()
    if reason:
        pytest.skip(reason)
    schema = f"baton_fence_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    url = f"{PG_URL}?schema={schema}"
    return PostgresLedger(url), PostgresLedger(url), schema


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_ledger_refuses_a_post_from_a_fenced_off_writer(tmp_path, kind):
    old, new, schema = _ledgers(kind, tmp_path)
    try:
        t1 = old.acquire_fence()
        assert old.post([_line("n1:1")], position=("n1", 1), fence=t1) == 1
        t2 = new.acquire_fence()                   # another accountant takes the ledger over
        assert t2 == t1 + 1 == new.fence_generation()
        with pytest.raises(LedgerFenced):
            old.post([_line("n1:2")], position=("n1", 2), state={("node", "n1"): b"x"}, fence=t1)
        # Nothing of the refused post is there: not its line, position or state.
        assert [t["key"] for t in new.transactions()] == ["n1:1"]
        assert new.position("n1") == 1 and new.load_state("node") == {}
        assert new.post([_line("n1:2")], position=("n1", 2), fence=t2) == 1
        assert old.check() == []
    finally:
        old.close()
        new.close()
        if schema:
            _drop_schema(schema)


def _config(tmp_path, pipeline="false"):
    cfg = tmp_path / "baton.toml"
    cfg.write_text(CONFIG.format(pipeline=pipeline))
    import tomllib

    return cfg, tomllib.loads(cfg.read_text())


def _write(w, stamps) -> int:
    seq = 0
    for st in stamps:
        if st[0] in ("start", "end"):
            seq = w.stamp_session(st[0], st[1], st[2], st[3], WALL0 + st[3])
        elif st[0] == "go":
            seq = w.stamp_transition(st[1], st[2], st[3], st[4], st[5], "r", st[6], WALL0 + st[6])
        else:
            seq = w.stamp_action(st[1], st[2], st[3], "message", st[4])
    return seq


@pytest.mark.parametrize("pipeline", ["false", "true"])
def test_an_accountant_fenced_off_posts_nothing_and_stops(tmp_path, pipeline):
    _cfg, raw = _config(tmp_path, pipeline)
    data = tmp_path / "data"
    stamps = generate(random.Random(7), 40)
    with ring.RingWriter(str(data / "ring" / "ring.dat"), node_id="n1") as w:
        half = len(stamps) // 2
        _write(w, stamps[:half])
        acct = Accountant(str(data), raw)
        try:
            acct.drain()
            with pytest.raises(AccountantBusy):       # the lock: one accountant per ring
                Accountant(str(data), raw)
            committed = acct.ledger.position("n1")
            # An accountant elsewhere (a shared ledger) takes the ledger over.
            other = SqliteLedger(str(data / "accounting" / "ledger.db"))
            other.acquire_fence()
            _write(w, stamps[half:])
            acct.run_forever(install_signals=False)   # returns: it was fenced off
            assert acct.fenced
            assert other.position("n1") == committed
            other.close()
        finally:
            acct.close()
    assert lock_holder(lock_path(str(data / "ring" / "ring.dat"))) == os.getpid()
    # The lock went with close(): the next accountant takes it and bills the rest.
    with Accountant(str(data), raw) as nxt:
        nxt.drain()
        got = {t["key"]: (t["amount"], t["vendor_amount"]) for t in nxt.ledger.transactions()}
    assert got == expected_ledger(stamps)


def _position(db: str) -> int:
    try:
        led = SqliteLedger(db)
    except Exception:
        return 0
    try:
        return led.position("n1") or 0
    finally:
        led.close()


def _wait(pred, timeout: float, what: str, step: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(180)
def test_second_accountant_waits_for_the_lock_and_bills_exactly(tmp_path):
    """`baton accountant` twice on one ring, the first killed 3 s after the second
    started, while stamps keep coming: the ledger equals the stamps rated by the
    test itself (expected_ledger), key by key and to the micro-unit."""
    cfg, _raw = _config(tmp_path)
    data = tmp_path / "data"
    db = str(data / "accounting" / "ledger.db")
    stamps = generate(random.Random(20310108), 600)
    w = ring.RingWriter(str(data / "ring" / "ring.dat"), node_id="n1")
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "engine.accounting.accountant", "--data-dir", str(data),
           "--config", str(cfg), "--log-level", "info"]
    chunks = [stamps[i:i + 60] for i in range(0, len(stamps), 60)]
    last = [0]
    writing = threading.Event()

    def writer():
        for chunk in chunks:
            last[0] = _write(w, chunk)
            time.sleep(0.15)
        writing.set()

    logs = [open(tmp_path / f"acct{i}.log", "w") for i in range(2)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[0], stderr=subprocess.STDOUT)
    second = None
    t = threading.Thread(target=writer)
    try:
        t.start()
        _wait(lambda: _position(db) > 0, 60, "the first accountant's first commit")
        second = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[1], stderr=subprocess.STDOUT)
        time.sleep(3)
        first.kill()
        first.wait()
        t.join()
        _wait(lambda: _position(db) == last[0], 60, "the second accountant to drain the ring",
              step=0.05)
        _wait(lambda: "Billing API on" in (tmp_path / "acct1.log").read_text(), 30,
              "the second accountant's Billing API")
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
        w.close()
    log2 = (tmp_path / "acct1.log").read_text()
    assert "waiting for the accountant lock" in log2, log2
    want = expected_ledger(stamps)
    led = SqliteLedger(db)
    try:
        got = {t["key"]: (t["amount"], t["vendor_amount"]) for t in led.transactions()}
        assert led.check() == []
        invoice, recount = sum(a for a, _ in got.values()), sum(a for a, _ in want.values())
        print(f"dual accountant: invoice {invoice} µUSD, recount {recount} µUSD, "
              f"{len(got)} lines, {len(stamps)} stamps")
        assert sorted(set(want) - set(got))[:5] == [] and sorted(set(got) - set(want))[:5] == []
        assert [k for k in want if got[k] != want[k]][:5] == []
        assert invoice == recount
        # The calls that never end (15 %) are open; no ended one is left open.
        unended = {st[1] for st in stamps if st[0] == "start"} - \
            {st[1] for st in stamps if st[0] == "end"}
        assert len(led.load_state("session")) == len(unended)
    finally:
        led.close()


# -- baton serve: crash and restart, and a killed accountant ------------------------------

SERVE_CONFIG = """
[engine]
metrics_addr = "127.0.0.1:{metrics}"

[plans.per-second]
price = "0.06"
unit = "minute"
increment = "1/1"

[billing]
level_plans = {{ basic = "per-second", application = "per-second", service = "per-second" }}
{billing}

[accounts.demo]
currency = "USD"

[accounts.demo.numbers]
"1000" = {{ module = "baton.hold" }}
"""


def _serve_config(tmp_path, billing: str = "") -> tuple[str, int]:
    metrics = free_port(socket.SOCK_STREAM)
    path = tmp_path / "serve.toml"
    path.write_text(SERVE_CONFIG.format(metrics=metrics, billing=billing))
    return str(path), metrics


def _serve(config: str, data: str, port: int) -> EngineProcess:
    # The last --data-dir wins: every incarnation runs on the same data directory.
    return EngineProcess(config, port=port, extra=["--data-dir", data]).wait_ready(30)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _recount(data: str, tmp_path, raw: dict) -> dict[str, int]:
    """Every record of the ring, metered and rated once by a fresh Accountant over
    a copy of the ring (released cursor wound back to the first record) into a
    fresh ledger: key -> amount."""
    src = os.path.join(data, "ring", "ring.dat")
    info = ring.ring_info(src)
    assert info["spilled"] == 0 and info["cursor"] <= info["slots"], info
    copy = tmp_path / "recount"
    (copy / "ring").mkdir(parents=True)
    for name in ("ring.dat", "ring.overflow"):
        shutil.copy(os.path.join(data, "ring", name), copy / "ring" / name)
    with open(copy / "ring" / "ring.dat", "r+b") as f:
        f.seek(RELEASED_OFF)
        f.write(struct.pack("<Q", 1))
    with Accountant(str(copy), raw) as acct:
        acct.drain()
        return {t["key"]: t["amount"] for t in acct.ledger.transactions()}


def _ledger(data: str) -> dict[str, int]:
    led = SqliteLedger(os.path.join(data, "accounting", "ledger.db"))
    try:
        assert led.check() == []
        return {t["key"]: t["amount"] for t in led.transactions()}
    finally:
        led.close()


@pytest.mark.interop
@pytest.mark.timeout(240)
@pytest.mark.skipif(SIPP is None, reason="sipp is not installed")
@pytest.mark.parametrize("delay,billing", [
    (0.0, "policy_interval = 5"), (0.1, "policy_interval = 5"), (0.0, "")],
    ids=["restart-0ms-policy-interval-5", "restart-100ms-policy-interval-5", "restart-0ms"])
def test_serve_killed_and_restarted_bills_every_stamp_once(tmp_path, delay, billing):
    """`baton serve` is killed (-9) while SIPp calls flow, just after its accountant
    wrote the policy snapshot (so the longest before it would look for its engine
    by the snapshot's clock), and started again on the same data directory after
    `delay`; the invoice equals a recount by a fresh Accountant over a copy of the
    ring (see `_recount`), line by line."""
    import tomllib

    config, _metrics = _serve_config(tmp_path, billing)
    raw = tomllib.loads(open(config).read())
    data = str(tmp_path / "data")
    port = free_port()
    first = _serve(config, data, port)
    second = None
    sipp = None
    try:
        accountant = _wait(lambda: _children(first.proc.pid), 30, "the first accountant")[0]
        cmd = [SIPP, "-sn", "uac", f"127.0.0.1:{port}", "-s", "1000", "-i", "127.0.0.1",
               "-p", str(free_port()), "-mi", "127.0.0.1", "-mp", str(free_port(even=True)),
               "-r", "20", "-m", "200", "-l", "60", "-d", "1500", "-max_socket", "200",
               "-recv_timeout", "4000", "-timeout", "90s", "-nostdin"]
        sipp = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        policy = os.path.join(data, "policy.json")
        before = os.stat(policy).st_mtime_ns
        _wait(lambda: os.stat(policy).st_mtime_ns != before, 10, "a policy write", 0.002)
        stopped = []
        watcher = threading.Thread(target=lambda: stopped.append(_wait(
            lambda: not _alive(accountant) and time.monotonic(), 30,
            "the dead engine's accountant to stop", 0.002)), daemon=True)
        first.proc.kill()
        killed = time.monotonic()
        watcher.start()
        first.proc.wait()
        time.sleep(delay)
        second = _serve(config, data, port)
        watcher.join()
        print(f"the dead engine's accountant stopped {stopped[0] - killed:.3f} s after the kill")
        sipp.wait(timeout=120)
        time.sleep(1)
        assert second.stop(timeout=60) == 0
    finally:
        for p in (sipp, first.proc, second.proc if second else None):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    got, want = _ledger(data), _recount(data, tmp_path, raw)
    invoice, recount = sum(got.values()), sum(want.values())
    print(f"serve restart after {delay * 1000:.0f} ms ({billing or 'defaults'}): invoice "
          f"{invoice} µUSD, recount {recount} µUSD, {len(got)} lines")
    assert sorted(set(want) - set(got))[:5] == [] and sorted(set(got) - set(want))[:5] == []
    assert [k for k in want if got[k] != want[k]][:5] == []
    assert invoice == recount and len(want) > 100


def _metric(port: int, name: str) -> float | None:
    try:
        r = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except OSError:            # not listening yet
        return None
    with r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def _billing_health(grpc_port: int) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="baton.v1.Billing"), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


@pytest.mark.timeout(120)
def test_serve_restarts_a_killed_accountant_and_reports_it(tmp_path):
    """The accountant is killed under `baton serve`: serve reaps it, logs the exit,
    starts another (which waits for the lock, here held by the test), reports it
    down in /metrics and in the gRPC health of Billing meanwhile, and up again
    once it holds the lock; a call made while it was down is billed."""
    config, metrics = _serve_config(tmp_path)
    data = str(tmp_path / "data")
    eng = _serve(config, data, free_port())
    lock = AccountantLock(lock_path(os.path.join(data, "ring", "ring.dat")))
    try:
        _wait(lambda: _metric(metrics, "baton_accountant_up") == 1, 30, "the accountant up")
        assert _billing_health(eng.grpc_port) == "SERVING"
        old = _children(eng.proc.pid)[0]
        os.kill(old, signal.SIGKILL)
        _wait(lock.try_acquire, 10, "the lock of the killed accountant", 0.002)
        _wait(lambda: _metric(metrics, "baton_accountant_restarts_total") == 1, 30,
              "the restart")
        assert not os.path.exists(f"/proc/{old}"), "the killed accountant is reaped"
        assert _metric(metrics, "baton_accountant_up") == 0
        assert _billing_health(eng.grpc_port) == "NOT_SERVING"
        peer = BlockingPeer(eng, timeout=5)
        call = peer.answered_call("1000")
        time.sleep(1.2)
        peer.hang_up(call)
        peer.close()
        _wait(lambda: (_metric(metrics, "baton_accountant_lag_seconds") or 0) > 0, 10,
              "the lag of the records nobody commits")
        lock.close()
        _wait(lambda: _metric(metrics, "baton_accountant_up") == 1, 30, "the new accountant up")
        _wait(lambda: _billing_health(eng.grpc_port) == "SERVING", 10, "Billing SERVING")
        _wait(lambda: _metric(metrics, "baton_accountant_lag_seconds") == 0, 30, "no lag")
        assert eng.stop(timeout=30) == 0
    finally:
        lock.close()
        if eng.proc.poll() is None:
            eng.proc.kill()
            eng.proc.wait()
    out = eng.output()
    assert "restarting it in 0.5 s (restart 1)" in out and "signal 9" in out, out
    billed = _ledger(data)
    assert sum(billed.values()) >= 2000, billed     # 1.2 s of hold at $0.06/min: 2 s billed
