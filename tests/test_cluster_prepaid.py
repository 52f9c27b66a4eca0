"""A prepaid balance shared by two nodes (issue 19, docs/cluster.md "Limits across
nodes"): two real `baton serve` nodes on 127.0.0.11 and .12 post into one PostgreSQL
ledger and reserve prepaid grants from it in slices; the same card called on both nodes
at once never spends more than its balance plus one slice per node."""
from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from tests.helpers import BlockingPeer, Call, EngineProcess, SDP_OFFER, free_port
from tests.test_accounting_ledger import PG_URL, _drop_schema, _pg_unreachable

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
    reason = _pg_unreachable()
    if reason:
        pytest.skip(reason)
    schema = f"baton_prepaid_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield f"{PG_URL}?schema={schema}", schema
    _drop_schema(schema)


def _charged(schema: str) -> int:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        if not conn.execute("SELECT to_regclass(%s)", (f'"{schema}".summary',)).fetchone()[0]:
            return 0
        return int(conn.execute(
            f'SELECT COALESCE(SUM(s.amount), 0) FROM "{schema}".summary s '
            f'JOIN "{schema}".classes c ON c.id = s.class_id WHERE c.account = %s',
            ("card",)).fetchone()[0])


def _invite(engine: EngineProcess) -> tuple[BlockingPeer, Call]:
    peer = BlockingPeer(engine, timeout=5)
    peer.host = engine.host
    call = Call(peer, "2000")
    peer.send(call.request("INVITE", SDP_OFFER.format(port=40000)))
    return peer, call


def _outcome(peer: BlockingPeer, call: Call) -> int:
    """The INVITE's final status (a 200 is acknowledged)."""
    while True:
        m = peer.recv()
        if not m.is_request and m.status >= 200:
            break
    if m.status == 200:
        call.to_tag = m.to_tag
        peer.send(call.request("ACK"))
    return m.status


def test_a_card_on_two_nodes_at_once_never_overspends_past_one_slice_per_node(store, tmp_path):
    url, schema = store
    cfg = tmp_path / "card.toml"
    cfg.write_text(CONFIG.format(url=url))
    nodes = []
    peers = []
    try:
        for i, host in enumerate(("127.0.0.11", "127.0.0.12")):
            nodes.append(EngineProcess(str(cfg), host=host, extra=[
                "--grpc-addr", f"{host}:{free_port(socket.SOCK_STREAM, host=host)}",
                "--node-id", f"n{i + 1}", "--media-addr", host, "--store", url]))
        for n in nodes:
            n.wait_ready(30)
        # The same card, on both nodes at once: $2.00 at $0.50 a second.
        calls = [_invite(n) for n in nodes]
        peers = [p for p, _c in calls]
        outcomes = [_outcome(p, c) for p, c in calls]
        assert 200 in outcomes, outcomes
        # Every grant ran out (4 s of funds at most, whoever got them), then both hang up.
        time.sleep(5.0)
        for (p, c), status in zip(calls, outcomes):
            if status == 200:
                c.cseq += 1
                p.send(c.request("BYE"))
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
            p, c = _invite(n)
            peers.append(p)
            status = _outcome(p, c)
            if status == 200:        # answered, then cut at once by the policy
                time.sleep(0.5)
        assert _charged(schema) <= BALANCE + 2 * SLICE
    finally:
        for p in peers:
            p.close()
        for n in nodes:
            try:
                n.stop(20)
            finally:
                n.__exit__()
