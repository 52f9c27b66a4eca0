"""A prepaid balance shared by two nodes (issue 19, docs/cluster.md "Limits across
nodes"): two real `baton serve` nodes on 127.0.0.11 and .12 post into one PostgreSQL
ledger and reserve prepaid grants from it in slices; the same card called on both nodes
at once never spends more than its balance plus one slice per node."""
from __future__ import annotations

import time

import pytest

from tests.helpers import bye_answered, invite, pg_store, two_nodes
from tests.test_accounting_ledger import PG_URL

pytestmark = pytest.mark.kernels_only

BALANCE = 2_000_000          # "2.00"
SLICE = 100_000              # "0.10"
CONFIG = """
[engine]
transports = ["udp"]
[media]
rtp_port_min = 30000
rtp_port_max = 30999
[plans.dear]
price = "30.00"
unit = "minute"
increment = "1/1"
[accounts.card]
[accounts.card.billing]
prepaid_balance = "2.00"
plans = {{ "baton.hold" = "dear" }}
[accounts.card.numbers]
"2000" = {{ module = "baton.hold" }}
[cluster]
reservations = "{url}"
slice = "0.10"
reservation_ttl = 30
"""


@pytest.fixture
def store():
    with pg_store("baton_prepaid") as url_and_schema:
        yield url_and_schema


def _charged(schema: str) -> int:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        if not conn.execute("SELECT to_regclass(%s)", (f'"{schema}".summary',)).fetchone()[0]:
            return 0
        return int(conn.execute(
            f'SELECT COALESCE(SUM(s.amount), 0) FROM "{schema}".summary s '
            f'JOIN "{schema}".classes c ON c.id = s.class_id WHERE c.account = %s',
            ("card",)).fetchone()[0])


def test_a_card_on_two_nodes_at_once_never_overspends_past_one_slice_per_node(store, tmp_path):
    url, schema = store
    cfg = tmp_path / "card.toml"
    cfg.write_text(CONFIG.format(url=url))
    peers = []
    with two_nodes(str(cfg), url) as nodes:
        try:
            # The same card, on both nodes at once: $2.00 at $0.50 a second.
            calls = [invite(n, "2000") for n in nodes]
            peers = [p for p, _c in calls]
            outcomes = [p.final_status(c) for p, c in calls]
            assert 200 in outcomes, outcomes
            # Every grant ran out (4 s of funds at most, whoever got them), then both hang up.
            time.sleep(5.0)
            bye_answered(calls, outcomes)
            # Both accountants post into the one ledger: wait until it stops moving.
            deadline = time.monotonic() + 30
            last, stable = -1, 0
            while stable < 3:
                assert time.monotonic() < deadline, "the ledger did not settle"
                now = _charged(schema)
                stable = stable + 1 if now == last and now > 0 else 0
                last = now
                time.sleep(0.5)
            print(f"card charged {last / 1e6:.2f} of {BALANCE / 1e6:.2f} (outcomes {outcomes})")
            # Without shared reservations each node grants the whole $2.00: $4.00 in all.
            assert 0 < last <= BALANCE + 2 * SLICE, "\n".join(line for n in nodes for line in n.output().splitlines() if "policy" in line or "reserv" in line)
            # The balance is spent: a new call on either node gets no time.
            for n in nodes:
                p, c = invite(n, "2000")
                peers.append(p)
                status = p.final_status(c)
                if status == 200:        # answered, then cut at once by the policy
                    time.sleep(0.5)
            assert _charged(schema) <= BALANCE + 2 * SLICE
        finally:
            for p in peers:
                p.close()
