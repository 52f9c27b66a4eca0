"""Plan caps and period tiers shared by two nodes (issue 19, docs/cluster.md "Limits
across nodes: plan caps and period tiers"): two real `baton serve` nodes on 127.0.0.11
and .12 post into one PostgreSQL ledger. A module capped at 6 s a period, used on both
nodes at once, is reserved from the cluster in 2 s slices and never used past its cap
(each node counting alone would allow 6 s each); a graduated plan with period tiers
prices the units past its first tier at the second tier's price once the two nodes'
usage together crosses the boundary."""
from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from tests.helpers import bye_answered, free_port, invite, pg_store, two_nodes
from tests.test_accounting_ledger import PG_URL

pytestmark = pytest.mark.kernels_only

CAP = 6                  # seconds of baton.hold a period
INCREMENT = 1            # the plan's increment (1/1): a late cut-off bills one more
TIER_1 = 3               # seconds at $1.00, then $0.10 a second
CONFIG = """
[engine]
transports = ["udp"]
[media]
rtp_port_min = 31000
rtp_port_max = 31999
[plans.capped]
price = "0.60"
unit = "minute"
cap = {cap}
at_cap = "deny"
[plans.tiered]
kind = "graduated"
unit = "second"
tier_scope = "period"
tiers = [{{ up_to = {tier}, price = "1.00" }}, {{ price = "0.10" }}]
[accounts.acme]
[accounts.acme.billing]
plans = {{ "baton.hold" = "capped", "baton.echo" = "tiered" }}
[accounts.acme.numbers]
"2000" = {{ module = "baton.hold" }}
"2001" = {{ module = "baton.echo" }}
[cluster]
reservations = "{url}"
reservation_ttl = 30
cap_slice = 2
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with pg_store("baton_caps") as (url, schema):
        cfg = tmp_path_factory.mktemp("caps") / "caps.toml"
        cfg.write_text(CONFIG.format(url=url, cap=CAP, tier=TIER_1))
        with two_nodes(str(cfg), url) as nodes:
            yield nodes, schema, str(cfg)


def _rows(schema: str, module: str) -> list[tuple]:
    """(node, quantity, amount, note) of the ledger's lines of `module`."""
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        if not conn.execute("SELECT to_regclass(%s)", (f'"{schema}".lines',)).fetchone()[0]:
            return []
        return [tuple(r) for r in conn.execute(
            f'SELECT node, quantity, amount, note FROM "{schema}".lines WHERE account = %s '
            f"AND module = %s ORDER BY id", ("acme", module)).fetchall()]


def _settled(schema: str, module: str, lines: int) -> list[tuple]:
    """The module's lines once both accountants have posted `lines` and stopped moving."""
    deadline = time.monotonic() + 30
    last, stable = None, 0
    while stable < 3:
        assert time.monotonic() < deadline, f"the ledger did not settle: {last}"
        now = _rows(schema, module)
        stable = stable + 1 if now == last and len(now) >= lines else 0
        last = now
        time.sleep(0.3)
    return last


def test_a_cap_used_on_two_nodes_at_once_holds_across_the_cluster(cluster):
    nodes, schema, _cfg = cluster
    calls = [invite(n, "2000") for n in nodes]
    try:
        outcomes = [p.final_status(c) for p, c in calls]
        assert outcomes == [200, 200], outcomes
        # Each call takes 2 s slices while the cap has room: 6 s in all, so both are cut
        # off by 4 s (each node alone would allow 6 s, so both would last until the BYE).
        time.sleep(5.5)
        bye_answered(calls, outcomes)
        rows = _settled(schema, "baton.hold", 2)
        used = sum(q for _n, q, _a, _note in rows)
        print(f"capped module used {used} s of a {CAP} s cap on two nodes: {rows}")
        assert {n for n, *_ in rows} == {"n1", "n2"}, rows
        assert CAP - 2 <= used <= CAP + 2 * INCREMENT, rows
        # The cap is used up across the cluster: a new call on either node gets no time.
        for n in nodes:
            p, c = invite(n, "2000")
            calls.append((p, c))
            if p.final_status(c) == 200:
                time.sleep(0.5)
                c.cseq += 1
                p.send(c.request("BYE"))
        time.sleep(1.5)
        after = sum(q for _n, q, _a, _note in _rows(schema, "baton.hold"))
        assert after <= CAP + 2 * INCREMENT, _rows(schema, "baton.hold")
    finally:
        for p, _c in calls:
            p.close()


def test_period_tiers_price_the_clusters_total(cluster):
    nodes, schema, cfg = cluster
    calls = [invite(n, "2001") for n in nodes]
    try:
        outcomes = [p.final_status(c) for p, c in calls]
        assert outcomes == [200, 200], outcomes
        time.sleep(2.2)
        bye_answered(calls, outcomes)
        rows = _settled(schema, "baton.echo", 2)
    finally:
        for p, _c in calls:
            p.close()
    total = sum(q for _n, q, _a, _note in rows)
    charged = sum(a for _n, _q, a, _note in rows)
    print(f"tiered module: {total} s over two nodes charged {charged / 1e6:.2f}: {rows}")
    assert {n for n, *_ in rows} == {"n1", "n2"}, rows
    assert all(q < TIER_1 + 1 for _n, q, _a, _note in rows) and total > TIER_1, rows
    # The first 3 s of the period (whichever node used them) at $1.00, the rest at $0.10;
    # each node pricing its own usage from the first unit would charge $1.00 for each.
    assert charged == TIER_1 * 1_000_000 + (total - TIER_1) * 100_000, rows
    # The consolidated invoice says the same.
    import json
    import subprocess
    import sys

    from engine.accounting.config import PeriodClock
    from engine.common import clock

    period = PeriodClock("month").of(clock.wall_ns())
    url = f"{PG_URL}?schema={schema}"
    out = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bill", "invoice", "--account", "acme",
         "--period", period, "--store", url, "--config", cfg, "--format", "json"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    inv = json.loads(out.stdout)
    echo = [ln for ln in inv["lines"] if ln["module"] == "baton.echo"]
    assert sum(int(ln["amount_micro"]) for ln in echo) == charged, inv


@pytest.fixture
def store():
    with pg_store("baton_caps") as (url, _schema):
        yield url


def test_two_accountants_claim_disjoint_places_on_the_period_and_a_replay_the_same(store):
    from engine.accounting.ledger_pg import PeriodUsage

    a, b = PeriodUsage(store), PeriodUsage(store)
    try:
        assert a.claim("n1:5", "acme", "baton.echo", "2026-11", 3) == 0
        assert b.claim("n2:9", "acme", "baton.echo", "2026-11", 4) == 3
        # n1's accountant restarted before its batch was committed: the same place.
        assert PeriodUsage(store).claim("n1:5", "acme", "baton.echo", "2026-11", 3) == 0
        assert a.claim("n1:6", "acme", "baton.echo", "2026-11", 1) == 7
        assert a.claim("n1:7", "acme", "baton.echo", "2026-12", 2) == 0   # a new period
        assert b.used("2026-11") == {("acme", "baton.echo", "2026-11"): 8}
        # PostgreSQL drops the connection: the claim fails (its batch is rated again),
        # the next one reconnects and gets its place.
        import psycopg

        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (a._conn.info.backend_pid,))
        with pytest.raises(psycopg.Error):
            a.claim("n1:8", "acme", "baton.echo", "2026-11", 2)
        assert a.claim("n1:8", "acme", "baton.echo", "2026-11", 2) == 8
    finally:
        a.close()
        b.close()


def test_cap_units_reserved_by_two_nodes_never_exceed_the_cap(store):
    from engine.sessions.reservations import Reservations

    n1, n2 = Reservations(store, "n1", 100_000), Reservations(store, "n2", 100_000)
    try:
        args = ("acme", "baton.hold", "2026-11")
        assert n1.reserve_units(*args, "s1", 10, 4) == 4
        assert n2.reserve_units(*args, "s2", 10, 4) == 4
        assert n1.reserve_units(*args, "s1", 10, 4) == 6       # renewed: 2 were left
        assert n2.reserve_units(*args, "s2", 10, 4) == 4       # nothing left
        assert n2.reserve_units(*args, "s3", 10, 4) == 0
        assert n1.holds("s1") and not n2.holds("s3")
        # Another account's cap and another period are apart.
        assert n2.reserve_units("other", "baton.hold", "2026-11", "s4", 10, 4) == 4
        assert n2.reserve_units("acme", "baton.hold", "2026-12", "s5", 10, 4) == 4
        # s1 ended: held until its node's accountant posts past its end (no ledger yet).
        n1.ended("s1", 7)
        assert not n1.holds("s1")
        assert n2.reserve_units(*args, "s3", 10, 4) == 0
    finally:
        n1.close()
        n2.close()


def test_a_cap_slice_that_is_not_positive_is_refused_naming_the_key():
    from engine.common.errors import ConfigError
    from engine.config.load import from_dict

    with pytest.raises(ConfigError) as exc:
        from_dict({"cluster": {"cap_slice": 0}})
    assert exc.value.key == "cluster.cap_slice"
    with pytest.raises(ConfigError) as exc:
        from_dict({"cluster": {"cap_slice": "1m"}})
    assert "cap_slice" in str(exc.value)


VOLUME_BOOK = {
    "plans": {
        "sms-volume": {"kind": "volume", "unit": "action",
                       "tiers": [{"up_to": 5, "price": "0.10"}, {"price": "0.05"}]},
        "sms-capped": {"price": "0.01", "unit": "action", "cap": 4, "at_cap": "deny"},
    },
    "accounts": {"acme": {"billing": {"plans": {"baton.bot:message": "sms-volume",
                                                  "baton.bot:message_out": "sms-capped"}}}},
}


def test_volume_tiers_and_a_cap_rated_by_two_accountants_price_the_clusters_total(store):
    """Two nodes' raters (their accountants) share the period's counters: volume lines
    add up to the volume price of the cluster's total, and a cap counts both nodes."""
    from engine.accounting.config import BillingConfig
    from engine.accounting.ledger_pg import PeriodUsage
    from engine.accounting.meter import Action
    from engine.accounting.rater import Rater

    wall = 1_790_000_000 * 10**9           # 2026-09
    book = BillingConfig.from_dict(VOLUME_BOOK)
    raters, shared = [], []
    for _ in range(2):
        r = Rater(book)
        r.shared = PeriodUsage(store)
        raters.append(r)
        shared.append(r.shared)
    try:
        lines = []
        for seq in range(1, 5):            # 4 texts on each node, interleaved: 8 in all
            for i, r in enumerate(raters):
                r.rate([Action(f"n{i + 1}", seq, f"s{i}", "acme", "baton.bot", "message", 1, wall)],
                       lines)
                r.rate([Action(f"n{i + 1}", 100 + seq, f"s{i}", "acme", "baton.bot", "message_out",
                               1, wall)], lines)
        volume = [ln for ln in lines if ln.module == "baton.bot" and ln.item == "message"]
        capped = [ln for ln in lines if ln.item == "message_out"]
        # 8 texts reach the second tier: all 8 at $0.05 = $0.40 (each node alone: 4 at
        # $0.10 each, $0.80 in all).
        assert sum(ln.amount for ln in volume) == 400_000, volume
        # A cap of 4 over both nodes: 4 texts at $0.01, the other 4 at zero.
        assert sum(ln.amount for ln in capped) == 40_000, capped
        assert sum(1 for ln in capped if ln.note == "over-cap") == 4, capped
        caps = raters[0].caps("2026-09")["acme"]["baton.bot:message_out"]
        assert caps["used"] == 8 and caps["reached"], caps
    finally:
        for s in shared:
            s.close()


def test_capped_time_cannot_be_reserved_without_postgresql_and_says_so():
    from engine.sessions.reservations import ReservationError, Reservations

    port = free_port(socket.SOCK_STREAM)          # nothing listens there
    res = Reservations(f"postgresql://postgres@127.0.0.1:{port}/test", "n1", 100_000)
    with pytest.raises(ReservationError):
        res.reserve_units("acme", "baton.hold", "2026-11", "s1", 10, 4)
    assert not res.holds("s1")


CAPPED_RAW = {"plans": {"capped": {"price": "0.60", "increment": "6/6", "cap": 30,
                                   "at_cap": "deny"}},
              "accounts": {"acme": {"billing": {"plans": {"baton.hold": "capped"}}}}}


async def test_the_policy_grants_capped_time_in_slices_on_the_increment_grid_then_denies(
        store, tmp_path):
    """Two nodes' policy hooks (engine/sessions/policy.py) share a 30 s cap with a 6/6
    increment in 10 s slices: a limit never passes what the units held pay for."""
    import types

    from engine.sessions.policy import Snapshot
    from engine.sessions.reservations import Reservations
    from tests.test_prepaid import fake_engine, fake_session

    hold = types.SimpleNamespace(code="baton.hold", level="basic")
    node = types.SimpleNamespace(params={})
    snaps, engines = [], []
    for name in ("n1", "n2"):
        snap = Snapshot(str(tmp_path / f"{name}.json"))
        snap.cluster = Reservations(store, name, 100_000)
        snap.cap_slice = 10
        snaps.append(snap)
        engines.append(fake_engine(CAPPED_RAW))
    try:
        a, b = fake_session(engines[0], "acme", "A"), fake_session(engines[1], "acme", "B")
        d = await snaps[0].check(a, node, hold)
        assert d.allow and d.limit == 6 - 0.25 and d.warn_before == 0    # 10 units: 6 s paid
        assert (await snaps[1].check(b, node, hold)).limit == 6 - 0.25
        a.module = hold
        ctl = types.SimpleNamespace(span=None)
        # A used its grant: the next slice (20 units: 18 s on the grid).
        assert (await snaps[0].renew(a, ctl)).limit == 18 - 0.25
        # B renews: 10 units are left of 30 (A holds 20, B 10 -> B 20 would be 40).
        b.module = hold
        assert await snaps[1].renew(b, ctl) is None    # nothing free: the limit stands
        # A third call on either node: the cap is held in full, denied.
        c = fake_session(engines[1], "acme", "C")
        d = await snaps[1].check(c, node, hold)
        assert not d.allow and "reached across the cluster" in d.reason
        # PostgreSQL lost: the capped module is denied, never unlimited.
        snaps[1].cluster.close()
        port = free_port(socket.SOCK_STREAM)
        snaps[1].cluster = Reservations(f"postgresql://postgres@127.0.0.1:{port}/test", "n2",
                                        100_000)
        d = await snaps[1].check(fake_session(engines[1], "acme", "D"), node, hold)
        assert not d.allow and "unavailable" in d.reason
    finally:
        for s in snaps:
            await asyncio.get_running_loop().run_in_executor(None, s.cluster.close)
