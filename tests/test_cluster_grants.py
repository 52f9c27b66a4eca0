"""A cluster's reservations never hold up the event loop (docs/cluster.md "Limits across
nodes"): a grant that waits for PostgreSQL (here: another node's transaction holding the
account's row lock in `prepaid_locks`) is a `policy.Pending`, taken on the Reservations'
worker thread, while timers and other calls on the same loop go on. The grant is made
once the lock is let go, denied when PostgreSQL's timeout passes first, and a session
that ended meanwhile never starts its module nor keeps what was reserved for it. A prepaid
account's text waits for its 202 while another account's texts are served."""
from __future__ import annotations

import asyncio
import collections
import os
import socket
import types
import uuid

import pytest

from engine.runtime.server import Engine as RealEngine
from engine.sessions.apps import Node
from engine.sessions.policy import Decision, Pending, Snapshot
from engine.sessions.reservations import Reservations
from engine.sessions.session import Session
from tests.test_accounting_ledger import PG_URL, _drop_schema, _pg_unreachable
from tests.test_prepaid import fake_engine, fake_session

RAW = {"plans": {"bridge": {"price": "1.80", "increment": "1/1"}},
       "billing": {"level_plans": {"basic": "bridge"}},
       "accounts": {"card": {"billing": {"prepaid_balance": "0.30"}},
                    "card2": {"billing": {"prepaid_balance": "0.30"}},
                    "postpaid": {"billing": {}}}}
BRIDGE = types.SimpleNamespace(code="baton.bridge", level="basic")
NODE = types.SimpleNamespace(params={})


@pytest.fixture
def store():
    reason = _pg_unreachable()
    if reason:
        pytest.skip(reason)
    schema = f"baton_grants_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield f"{PG_URL}?schema={schema}", schema
    _drop_schema(schema)


class Lock:
    """Another node's transaction holding `account`'s row lock until `release()`."""

    def __init__(self, schema: str, account: str):
        import psycopg

        self.conn = psycopg.connect(PG_URL)
        self.conn.execute(f'SET search_path TO "{schema}"')
        self.conn.execute("INSERT INTO prepaid_locks (account) VALUES (%s) ON CONFLICT DO "
                          "NOTHING", (account,))
        self.conn.execute("SELECT account FROM prepaid_locks WHERE account = %s FOR UPDATE",
                          (account,))

    def blocks(self, pid: int) -> bool:
        return self.conn.execute("SELECT pg_backend_pid() = ANY(pg_blocking_pids(%s))",
                                 (pid,)).fetchone()[0]

    def release(self) -> None:
        if not self.conn.closed:
            self.conn.commit()
            self.conn.close()


async def _blocked(res: Reservations, lock: Lock) -> None:
    """Until the reservations' connection waits for `lock` in PostgreSQL."""
    for _ in range(1000):
        conn = res.conn
        if conn is not None and lock.blocks(conn.info.backend_pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the reservation never waited for the row lock")


def _ticker() -> list[int]:
    """A timer firing every 10 ms on the running loop; the list counts its ticks."""
    loop = asyncio.get_running_loop()
    ticks = [0]

    def tick():
        ticks[0] += 1
        loop.call_later(0.01, tick)

    loop.call_later(0.01, tick)
    return ticks


async def _ready(res: Reservations) -> None:
    """Connected and the schema made (a first grant of another account)."""
    await res.run(res.reserve, "other", "S0", 1_000_000, lambda free: 100_000)


async def _close(res: Reservations) -> None:
    await asyncio.get_running_loop().run_in_executor(None, res.close)


async def test_a_grant_waiting_for_the_accounts_row_lock_leaves_the_loop_running(store, tmp_path):
    url, schema = store
    snap = Snapshot(str(tmp_path / "policy.json"))
    snap.cluster = res = Reservations(url, "n1", 100_000, timeout=30)
    eng = fake_engine(RAW)
    lock = None
    try:
        await _ready(res)
        lock = Lock(schema, "card")
        ticks = _ticker()
        d = snap.check(fake_session(eng, "card", "S1"), NODE, BRIDGE)
        assert isinstance(d, Pending)
        await _blocked(res, lock)
        # The grant waits in PostgreSQL; the loop does not: timers fire, and a call of an
        # account without a prepaid balance is decided at once, without the cluster.
        seen = ticks[0]
        await asyncio.sleep(0.1)
        assert ticks[0] > seen
        other = snap.check(fake_session(eng, "postpaid", "S2"), NODE, BRIDGE)
        assert isinstance(other, Decision) and other.allow and other.limit is None
        assert not d.task.done()
        lock.release()
        d = await d
        # $0.30 at 3 cents a second, reserved in whole slices of $0.10.
        assert d.allow and d.limit == 10 - 0.25 and d.cost == 300_000, d
        assert res.held == {"S0": 100_000, "S1": 300_000}
    finally:
        if lock is not None:
            lock.release()
        await _close(res)


async def test_a_grant_waiting_past_the_timeout_is_denied_and_the_loop_ran_meanwhile(
        store, tmp_path):
    url, schema = store
    snap = Snapshot(str(tmp_path / "policy.json"))
    snap.cluster = res = Reservations(url, "n1", 100_000, timeout=0.3)
    eng = fake_engine(RAW)
    lock = None
    try:
        await _ready(res)
        lock = Lock(schema, "card")
        ticks = _ticker()
        d = snap.check(fake_session(eng, "card", "S1"), NODE, BRIDGE)
        assert isinstance(d, Pending)
        seen = ticks[0]
        d = await d                 # PostgreSQL's statement timeout ends the wait
        assert not d.allow and "limit unavailable" in d.reason, d
        assert ticks[0] > seen
        assert not res.holds("S1")
        # Once the lock is gone the same account is granted again.
        lock.release()
        d = await snap.check(fake_session(eng, "card", "S3"), NODE, BRIDGE)
        assert d.allow and d.limit == 10 - 0.25, d
    finally:
        if lock is not None:
            lock.release()
        await _close(res)


async def test_postgresql_that_does_not_answer_denies_the_grant_without_stalling_the_loop(
        tmp_path):
    # A listening socket that never accepts: PostgreSQL's connection never completes.
    quiet = socket.socket()
    quiet.bind(("127.0.0.1", 0))
    quiet.listen(0)
    snap = Snapshot(str(tmp_path / "policy.json"))
    port = quiet.getsockname()[1]
    snap.cluster = res = Reservations(f"postgresql://postgres@127.0.0.1:{port}/test", "n1",
                                      100_000, timeout=1)
    eng = fake_engine(RAW)
    try:
        ticks = _ticker()
        d = snap.check(fake_session(eng, "card", "S1"), NODE, BRIDGE)
        assert isinstance(d, Pending)
        await asyncio.sleep(0.1)
        assert ticks[0] > 0 and not d.task.done()
        d = await d
        assert not d.allow and "limit unavailable" in d.reason, d
    finally:
        await _close(res)
        quiet.close()


class Module:
    code, level, metered_from_take = "baton.bridge", "basic", False

    def __init__(self):
        self.taken = []

    def take(self, ctl):
        self.taken.append(ctl)

    def revoke(self, ctl, reason):
        pass


class Engine:
    """What a Session needs of the engine; `session_ended` is the engine's own."""

    session_ended = RealEngine.session_ended
    setup_done = RealEngine.setup_done

    def __init__(self, snap, module):
        base = fake_engine(RAW)
        self.cfg = types.SimpleNamespace(raw=RAW, policy={"warn_before": 0}, accounts={})
        self.policy = snap
        self.loop = asyncio.get_running_loop()
        noop = lambda *a, **k: None      # noqa: E731
        self.stamper = types.SimpleNamespace(node_id="n1", writer=base.stamper.writer,
                                             session_start=noop, transition=noop,
                                             session_end=noop)
        self.registry = types.SimpleNamespace(resolve=lambda code: module)
        self.listeners, self.denials = [], collections.Counter()
        self.sessions, self.in_setup, self.finished = {}, {}, []
        self.directory = None

    def journal(self, session):
        pass


async def test_a_caller_who_hangs_up_while_the_grant_waits_gets_no_module_and_holds_nothing(
        store, tmp_path):
    import psycopg

    url, schema = store
    snap = Snapshot(str(tmp_path / "policy.json"))
    snap.cluster = res = Reservations(url, "n1", 100_000, timeout=30)
    module = Module()
    eng = Engine(snap, module)
    lock = None
    try:
        await _ready(res)
        lock = Lock(schema, "card")
        s = Session(eng, "card", "2000", "<sip:a@b>", "<sip:2000@b>")
        eng.sessions[s.id] = s
        s.start(Node(name="n", module="baton.bridge"))
        pending = s.pending
        assert isinstance(pending, Pending) and s.control is None
        await _blocked(res, lock)
        assert not module.taken
        s.end("hangup")
        lock.release()
        d = await pending
        assert not d.allow and "ended" in d.reason
        await res.run(lambda: None)        # the release queued after the grant
        assert not module.taken and s.control is None
        assert not res.holds(s.id)
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            row = conn.execute(f'SELECT end_seq FROM "{schema}".reservations WHERE session = %s',
                               (s.id,)).fetchone()
        # Marked ended: it lasts until this node's accountant posts past the end.
        assert row is not None and row[0] is not None, row
        # The ended call's reservation still holds the card's funds until posted. A call
        # of another card that waits and is granted starts its module only then.
        lock = Lock(schema, "card2")
        s2 = Session(eng, "card2", "2000", "<sip:a@b>", "<sip:2000@b>")
        eng.sessions[s2.id] = s2
        s2.start(Node(name="n", module="baton.bridge"))
        await _blocked(res, lock)
        assert not module.taken
        lock.release()
        await s2.pending
        await asyncio.sleep(0)          # the session's callback, after the decision
        assert len(module.taken) == 1 and s2.control is module.taken[0]
        assert s2.control.limit is not None and res.holds(s2.id)
        s2.end("hangup")
    finally:
        if lock is not None:
            lock.release()
        await _close(res)


async def _no_final_answer(c) -> None:
    """`c` got no final answer (only provisional ones, if any) for now."""
    try:
        while True:
            m = await c.recv(0.1)
            assert m.is_request or m.status < 200, m.status
    except asyncio.TimeoutError:
        pass


async def test_a_prepaid_text_waits_for_its_grant_while_the_engine_serves_other_texts(store):
    from tests.helpers import UdpClient, running_engine
    from tests.test_messaging import answer, message, next_request, text_config

    url, schema = store
    raw = text_config()
    raw["accounts"]["demo"]["billing"] = {"prepaid_balance": "5.00"}
    raw["accounts"]["post"] = {"numbers": {"3000": {"module": "baton.hold",
                                                    "messaging": "baton.bot",
                                                    "reply": "post heard: {Body}"}}}
    raw["cluster"] = {"reservations": url}
    async with running_engine(raw) as eng:
        res = eng.policy.cluster
        await _ready(res)
        prepaid = UdpClient("127.0.0.1", eng.sip_port)
        other = UdpClient("127.0.0.1", eng.sip_port)
        lock = Lock(schema, "demo")
        try:
            prepaid.send(message(prepaid, b"hi", number="1000"))
            await _blocked(res, lock)
            # The prepaid account's first text waits for its grant; another account's
            # text on the same engine is answered and replied to meanwhile.
            other.send(message(other, b"hello", number="3000"))
            await other.expect(202)
            reply = await next_request(other)
            assert reply.body == b"post heard: hello"
            answer(other, reply)
            await _no_final_answer(prepaid)
            lock.release()
            await prepaid.expect(202)
            reply = await next_request(prepaid)
            assert reply.body == b"number 1000 heard: hi"
            answer(prepaid, reply)
        finally:
            lock.release()
            prepaid.close()
            other.close()


async def test_a_payer_changing_to_a_prepaid_card_gets_its_limit_once_the_grant_is_made(
        store, tmp_path):
    """Session.set_account (a calling card's PIN): the module keeps control while the
    card's funds are reserved; its limit is armed when they are."""
    url, schema = store
    snap = Snapshot(str(tmp_path / "policy.json"))
    snap.cluster = res = Reservations(url, "n1", 100_000, timeout=30)
    module = Module()
    eng = Engine(snap, module)
    lock = None
    try:
        await _ready(res)
        s = Session(eng, "postpaid", "2000", "<sip:a@b>", "<sip:2000@b>")
        s.start(Node(name="n", module="baton.bridge"))
        (ctl,) = module.taken                 # no cluster asked: at once, no limit
        assert s.pending is None and ctl.limit is None
        lock = Lock(schema, "card")
        d = s.set_account("card")
        assert isinstance(d, Pending)
        await _blocked(res, lock)
        assert ctl.active and ctl.limit is None
        lock.release()
        d = await d
        assert d.allow and ctl.limit == d.limit == 10 - 0.25, d
        assert res.holds(s.id) and s.control is ctl
        s.end("hangup")
    finally:
        if lock is not None:
            lock.release()
        await _close(res)
