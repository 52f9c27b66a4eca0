"""One PostgreSQL ledger for a cluster (issue 19, item 4): one accountant per
node, each fenced per node, all posting into the same schema.

The ledger is compared with an independent recount of every node's stamps
(tests/test_accounting_crash.py `expected_ledger`, keys renamed per node), to
the micro-unit, with one node's accountant killed and restarted mid-way.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from engine.accounting.accountant import Accountant
from engine.accounting.invoices import invoice
from engine.accounting.ledger import LedgerError, LedgerFenced
from engine.accounting.ledger_pg import PostgresLedger
from ext.kernels import ring
from tests.helpers import pg_store
from tests.test_accounting_crash import CONFIG, expected_ledger, generate
from tests.test_accounting_fence import _line, _write

pytestmark = pytest.mark.kernels_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES = ("n1", "n2")


@pytest.fixture
def pg_url():
    with pg_store("baton_cluster") as (url, _schema):
        yield url


def _node_config(tmp_path, node: str) -> tuple[str, dict]:
    path = tmp_path / f"{node}.toml"
    path.write_text(f'[engine]\nnode_id = "{node}"\n' + CONFIG.format(pipeline="false"))
    return str(path), tomllib.loads(path.read_text())


def _expected(node: str, stamps) -> dict[str, tuple[int, int]]:
    return {f"{node}:{k.split(':', 1)[1]}": v for k, v in expected_ledger(stamps).items()}


def _periods(got: dict) -> set[str]:
    return {t["period"] for t in got.values()}


def test_fences_are_per_node(pg_url):
    a, b = PostgresLedger(pg_url), PostgresLedger(pg_url)
    try:
        ta = a.acquire_fence("n1")
        tb = b.acquire_fence("n2")
        # Two nodes' accountants post side by side: neither fences the other off.
        assert a.post([_line("n1:1")], position=("n1", 1), fence=ta, fence_node="n1") == 1
        assert b.post([_line("n2:1")], position=("n2", 1), fence=tb, fence_node="n2") == 1
        # A restarted accountant of n1 fences off the old one of n1 only.
        c = PostgresLedger(pg_url)
        tc = c.acquire_fence("n1")
        assert tc == ta + 1 == c.fence_generation("n1") and c.fence_generation("n2") == tb
        with pytest.raises(LedgerFenced):
            a.post([_line("n1:2")], position=("n1", 2), fence=ta, fence_node="n1")
        assert b.post([_line("n2:2")], position=("n2", 2), fence=tb, fence_node="n2") == 1
        assert c.post([_line("n1:2")], position=("n1", 2), fence=tc, fence_node="n1") == 1
        assert sorted(t["key"] for t in c.transactions()) == ["n1:1", "n1:2", "n2:1", "n2:2"]
        assert c.position("n1") == 2 and c.position("n2") == 2
        assert c.fenced_nodes() == {"n1", "n2"}
        assert c.check() == []
        c.close()
    finally:
        a.close()
        b.close()


def test_two_accountants_of_one_node_are_refused_on_a_shared_ledger(tmp_path, pg_url):
    _path, raw1 = _node_config(tmp_path, "n1")
    _path, raw2 = _node_config(tmp_path, "n2")
    first = Accountant(str(tmp_path / "d1"), raw1, pg_url)
    try:
        # Another node's accountant writes beside it ...
        Accountant(str(tmp_path / "d2"), raw2, pg_url).close()
        # ... but a second accountant of n1 (another data dir: another machine) may not.
        with pytest.raises(LedgerError, match="node n1"):
            Accountant(str(tmp_path / "d3"), raw1, pg_url)
    finally:
        first.close()


def _accountant(data: str, config: str, store: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.accounting.accountant", "--data-dir",
                             data, "--config", config, "--store", store, "--log-level", "warning"],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _position(url: str, node: str) -> int:
    with PostgresLedger(url) as led:
        return led.position(node) or 0


@pytest.mark.timeout(120)
def test_consolidated_invoices_equal_every_nodes_stamps_with_a_node_killed(tmp_path, pg_url):
    rng = random.Random(19)
    stamps = {node: generate(rng, 300) for node in NODES}
    procs: dict[str, subprocess.Popen] = {}
    configs = {node: _node_config(tmp_path, node)[0] for node in NODES}
    writers = {node: ring.RingWriter(str(tmp_path / node / "ring" / "ring.dat"), node_id=node)
               for node in NODES}
    try:
        for node in NODES:
            half = len(stamps[node]) // 2
            _write(writers[node], stamps[node][:half])
            procs[node] = _accountant(str(tmp_path / node), configs[node], pg_url)
        # n1's accountant is killed once it has committed something, then restarted.
        deadline = time.monotonic() + 60
        while _position(pg_url, "n1") == 0:
            assert procs["n1"].poll() is None, procs["n1"].stderr.read().decode()
            assert time.monotonic() < deadline, "n1's accountant posted nothing"
            time.sleep(0.05)
        procs["n1"].send_signal(signal.SIGKILL)
        procs["n1"].wait()
        for node in NODES:
            _write(writers[node], stamps[node][len(stamps[node]) // 2:])
        procs["n1"] = _accountant(str(tmp_path / "n1"), configs["n1"], pg_url)
        last = {node: len(stamps[node]) for node in NODES}
        while any(_position(pg_url, node) < last[node] for node in NODES):
            for node, p in procs.items():
                assert p.poll() is None, f"{node}: {p.stderr.read().decode()}"
            assert time.monotonic() < deadline, "the accountants did not drain their rings"
            time.sleep(0.05)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for w in writers.values():
            w.close()
    want: dict[str, tuple[int, int]] = {}
    for node in NODES:
        want.update(_expected(node, stamps[node]))
    with PostgresLedger(pg_url) as led:
        txns = {t["key"]: t for t in led.transactions()}
        assert {k: (t["amount"], t["vendor_amount"]) for k, t in txns.items()} == want
        assert led.check() == []
        # One invoice per account per period, across nodes, equal to the recount.
        for account in {t["account"] for t in txns.values()}:
            for period in _periods(txns):
                doc = invoice(led, account, period)
                assert doc["total_micro"] == sum(
                    t["amount"] for t in txns.values()
                    if t["account"] == account and t["period"] == period)
        total = sum(invoice(led, a, p)["total_micro"]
                    for a in {t["account"] for t in txns.values()} for p in _periods(txns))
    assert total == sum(v[0] for v in want.values())
