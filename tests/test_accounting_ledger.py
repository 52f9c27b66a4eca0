"""The ledger, invoices and payouts: the same tests against SQLite and PostgreSQL."""
from __future__ import annotations

import csv
import io
import json
import os
import uuid
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.accounting.invoices import invoice, payouts, render
from engine.accounting.ledger import ENTRY_COLUMNS, Ledger, LedgerError, Line, entries_of
from engine.accounting.ledger_pg import PostgresLedger
from engine.accounting.ledger_sqlite import SqliteLedger
from engine.accounting.ledgers import open_ledger
from engine.accounting.money import split_share

PG_URL = os.environ.get("BATON_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


def _pg_unreachable() -> str | None:
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc})"
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except Exception as exc:  # noqa: BLE001 - any failure means: no server to test against
        return f"PostgreSQL at {PG_URL} is unreachable: {exc}"
    return None


def _drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


class Backends:
    """Opens fresh ledgers of one backend and removes them afterwards."""

    def __init__(self, kind: str, tmp_path) -> None:
        self.kind = kind
        self.tmp = tmp_path
        self.opened: list[Ledger] = []
        self.schemas: list[str] = []

    def new(self) -> Ledger:
        if self.kind == "sqlite":
            led: Ledger = SqliteLedger(str(self.tmp / f"ledger-{len(self.opened)}.db"))
        else:
            schema = f"baton_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
            self.schemas.append(schema)
            led = PostgresLedger(f"{PG_URL}?schema={schema}")
        self.opened.append(led)
        return led

    def cleanup(self) -> None:
        for led in self.opened:
            led.close()
        for schema in self.schemas:
            _drop_schema(schema)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    if request.param == "postgresql":
        reason = _pg_unreachable()
        if reason:
            pytest.skip(reason)
    b = Backends(request.param, tmp_path)
    yield b
    b.cleanup()


@pytest.fixture
def ledger(backend):
    return backend.new()


def line(key: str, amount: int, *, account: str = "demo", module: str = "baton.bridge",
         vendor: str = "", share: Fraction = Fraction(0), period: str = "2026-11",
         quantity: int = 60, unit: str = "minute", plan: str = "basic",
         unit_price: int | None = 1000, item: str = "time", kind: str = "usage",
         currency: str = "USD", seq: int | None = None) -> Line:
    node, _, s = key.partition(":")
    return Line(key, kind, node, seq if seq is not None else (int(s) if s.isdigit() else None),
                "S1", account, module, item, "basic", period, 1_795_000_000 * 10**9,
                quantity * 10**9, quantity, unit, plan, unit_price, amount, currency, vendor,
                split_share(amount, share) if vendor else 0)


def seed_lines() -> list[Line]:
    """One call: 3 minutes bridged at $0.001/min, 2 minutes of application at $0.01/min."""
    return [line("n1:3", 3000, module="baton.bridge", quantity=180, plan="bridge-basic",
                 unit_price=1000),
            line("n1:4", 20000, module="baton.instructions", quantity=120, plan="app-std",
                 unit_price=10000)]


# -- posting --------------------------------------------------------------------------

def test_post_balances_and_reads_back(ledger):
    n = ledger.post([line("n1:1", 1000), line("n1:2", 2500, module="acme.survey", vendor="acme",
                                              share=Fraction(7, 10))])
    assert n == 2 and ledger.count() == 2
    assert ledger.check() == []
    t = ledger.transaction(2)
    assert t["key"] == "n1:2" and t["amount"] == 2500 and t["vendor_amount"] == 1750
    legs = [(e["account"], e["debit"], e["credit"]) for e in t["entries"]]
    assert legs == [("customer:demo", 2500, 0), ("platform", 0, 750), ("vendor:acme", 0, 1750)]
    assert [e["leg"] for e in ledger.entries(1)] == [0, 1]


def test_reposting_posts_nothing(ledger):
    lines = [line(f"n1:{i}", 100 * i) for i in range(1, 6)]
    assert ledger.post(lines, position=("n1", 5)) == 5
    before = (ledger.transactions(), ledger.entries())
    assert ledger.post(lines, position=("n1", 5)) == 0
    assert ledger.post(lines[2:] + [line("n1:6", 7)], position=("n1", 6)) == 1
    after = ledger.transactions()
    assert after[:5] == before[0] and ledger.entries()[:len(before[1])] == before[1]
    assert [t["key"] for t in after] == [f"n1:{i}" for i in range(1, 7)]
    assert ledger.position("n1") == 6
    # duplicates within one batch count once
    assert ledger.post([line("n1:7", 1), line("n1:7", 1)]) == 1


def test_position_and_state_commit_with_the_rows(ledger):
    ledger.post([line("n1:1", 5)], position=("n1", 1),
                state={("session", "a"): b"x", ("usage", "u"): b"1"})
    assert ledger.position("n1") == 1
    assert ledger.load_state() == {("session", "a"): b"x", ("usage", "u"): b"1"}
    ledger.post([], position=("n1", 2), state={("session", "a"): None, ("usage", "u"): b"2"})
    assert ledger.load_state() == {("usage", "u"): b"2"} and ledger.positions() == {"n1": 2}
    # A batch that fails half-way leaves rows, position and state as they were.
    with pytest.raises(Exception):
        ledger.post([line("n1:3", 5)], position=("n1", 3),
                    state={("usage", "u"): {"not": "bytes"}})  # type: ignore[dict-item]
    assert ledger.count() == 1 and ledger.position("n1") == 2
    assert ledger.load_state() == {("usage", "u"): b"2"}


def test_large_state_batches_go_through_the_log(ledger):
    """Batches of many state rows are logged as one row and folded every few
    batches; what load_state returns is the same, and a failed batch leaves it."""
    from engine.accounting import ledger as ledger_mod

    want: dict = {}
    for b in range(ledger_mod._STATE_LOG_MAX + 3):
        state = {("session", f"s{i}"): f"{b}:{i}".encode() for i in range(b, b + 80)}
        state[("session", f"s{b - 1}")] = None            # ended: deleted
        ledger.post([line(f"n1:{b + 1}", 1)], position=("n1", b + 1), state=state)
        want.update(state)
        want = {k: v for k, v in want.items() if v is not None}
        assert ledger.load_state() == want
        assert ledger.load_state("usage") == {}
    with pytest.raises(LedgerError, match="must be bytes"):
        ledger.post([line("n1:999", 1)], position=("n1", 999),
                    state={**{("session", f"x{i}"): b"x" for i in range(80)},
                           ("usage", "u"): {"not": "bytes"}})  # type: ignore[dict-item]
    assert ledger.load_state() == want and ledger.position("n1") == ledger_mod._STATE_LOG_MAX + 3


def test_rejects_unbalanced_lines(ledger):
    bad = line("n1:1", 100, vendor="acme").replace(vendor_amount=150)
    with pytest.raises(LedgerError, match="not within the amount"):
        ledger.post([bad])
    bad = line("n1:2", 100).replace(vendor_amount=10)
    with pytest.raises(LedgerError, match="without a vendor"):
        ledger.post([bad])
    assert ledger.count() == 0


def test_append_only(ledger):
    ledger.post([line("n1:1", 100)])
    for sql in ("UPDATE txns SET amount = 1", "DELETE FROM txns", "UPDATE entries SET debit = 0",
                "DELETE FROM entries", "UPDATE classes SET account = 'x'", "DELETE FROM classes",
                "DELETE FROM batches"):
        with pytest.raises(Exception, match="append-only"):
            with ledger._tx():
                ledger._exec(sql)
    assert ledger.transaction(1)["amount"] == 100 and len(ledger.entries()) == 2


def test_corrections_are_new_transactions(ledger):
    ledger.post([line("n1:1", 10000, module="acme.survey", vendor="acme", share=Fraction(7, 10))])
    original = ledger.entries()
    rev, fix = ledger.correct(1, amount=8000, quantity=48, note="wrong duration")
    assert (rev, fix) == (2, 3)
    r, f = ledger.transaction(rev), ledger.transaction(fix)
    assert (r["kind"], r["amount"], r["vendor_amount"], r["corrects"]) == ("reversal", -10000, -7000, 1)
    assert (f["kind"], f["amount"], f["vendor_amount"], f["quantity"]) == ("correction", 8000, 5600, 48)
    assert [(e["account"], e["debit"], e["credit"]) for e in r["entries"]] == [
        ("customer:demo", 0, 10000), ("platform", 3000, 0), ("vendor:acme", 7000, 0)]
    assert ledger.entries()[:len(original)] == original
    assert ledger.check() == []
    with pytest.raises(LedgerError, match="already corrected"):
        ledger.correct(1, amount=1)
    with pytest.raises(LedgerError, match="is a reversal"):
        ledger.correct(rev, amount=1)
    # correct the fix again, this time voiding it
    rev2, none = ledger.correct(fix, void=True)
    assert none is None and ledger.transaction(rev2)["amount"] == -8000
    inv = invoice(ledger, "demo", "2026-11")
    assert inv["total_micro"] == 0
    with pytest.raises(LedgerError, match="cannot change"):
        ledger.correct(1, key="x")
    with pytest.raises(LedgerError, match="no transaction"):
        ledger.correct(999, amount=1)


# -- invoices and payouts ---------------------------------------------------------------

def test_seed_example_invoice(ledger):
    ledger.post(seed_lines())
    inv = invoice(ledger, "demo", "2026-11")
    assert inv["currency"] == "USD" and inv["total"] == "0.023" and inv["total_micro"] == 23000
    lines = {ln["module"]: ln for ln in inv["lines"]}
    assert lines["baton.bridge"]["amount"] == "0.003"
    assert lines["baton.bridge"]["quantity"] == "3" and lines["baton.bridge"]["unit"] == "minute"
    assert lines["baton.bridge"]["unit_price"] == "0.001"
    assert lines["baton.instructions"]["amount"] == "0.02"
    assert lines["baton.instructions"]["quantity"] == "2"


def test_invoice_renderings(ledger):
    ledger.post(seed_lines() + [line("n1:5", 2500, module="acme.survey", vendor="acme",
                                     share=Fraction(7, 10), plan="survey-tiers", unit_price=None,
                                     quantity=30)])
    inv = invoice(ledger, "demo", "2026-11")
    table = render(inv, "table")
    assert "Invoice  account demo  period 2026-11  currency USD" in table
    assert "survey-tiers" in table           # no single unit price: the plan's name
    assert table.splitlines()[-1].split()[-2:] == ["TOTAL", "0.0255"]
    doc = json.loads(render(inv, "json"))
    assert doc["total"] == "0.0255" and doc["total_micro"] == 25500 and len(doc["lines"]) == 3
    rows = list(csv.DictReader(io.StringIO(render(inv, "csv"))))
    assert [r["module"] for r in rows] == ["acme.survey", "baton.bridge", "baton.instructions",
                                           "TOTAL"]
    assert rows[-1]["amount"] == "0.0255" and rows[1]["unit_price"] == "0.001"
    assert rows[0]["quantity"] == "0.5"
    empty = invoice(ledger, "nobody", "2026-11", "EUR")
    assert empty["total"] == "0.00" and empty["currency"] == "EUR" and empty["lines"] == []
    with pytest.raises(ValueError):
        render(inv, "xml")


def test_payouts_sum_over_accounts_minus_platform_share(ledger):
    share = Fraction(7, 10)
    ledger.post([
        line("n1:1", 1001, account="a", module="acme.survey", vendor="acme", share=share),
        line("n1:2", 2000, account="b", module="acme.survey", vendor="acme", share=share),
        line("n1:3", 500, account="b", module="acme.poll", vendor="acme", share=share),
        line("n1:4", 900, account="a", module="zeta.tts", vendor="zeta", share=Fraction(1, 2)),
        line("n1:5", 700, account="a", module="baton.bridge"),
        line("n1:6", 800, account="a", module="acme.survey", vendor="acme", share=share,
             period="2026-12"),
    ])
    rep = payouts(ledger, "2026-11")
    by_vendor = {s["vendor"]: s for s in rep["statements"]}
    assert set(by_vendor) == {"acme", "zeta"}           # the platform's own modules pay nobody
    acme = by_vendor["acme"]
    # 1001 * 0.7 = 700.7 -> 701; 2000 -> 1400; 500 -> 350
    assert acme["total_micro"] == 701 + 1400 + 350
    assert acme["gross_micro"] == 3501 and acme["platform_share_micro"] == 3501 - 2451
    survey = [ln for ln in acme["lines"] if ln["module"] == "acme.survey"][0]
    assert survey["accounts"] == 2 and survey["transactions"] == 2
    # Each line in integer micro-units too: gross = platform share + payout.
    assert (survey["gross_micro"], survey["platform_share_micro"], survey["payout_micro"]) == \
        (3001, 3001 - 2101, 2101)
    assert (survey["gross"], survey["platform_share"], survey["payout"]) == \
        ("0.003001", "0.0009", "0.002101")
    for key in ("gross_micro", "platform_share_micro", "payout_micro"):
        total = "total_micro" if key == "payout_micro" else key
        assert sum(ln[key] for ln in acme["lines"]) == acme[total]
    assert by_vendor["zeta"]["total_micro"] == 450
    assert rep["total_micro"] == 2451 + 450 and rep["total"] == "0.002901"
    only = payouts(ledger, "2026-11", "zeta")
    assert [s["vendor"] for s in only["statements"]] == ["zeta"]
    table = render(rep, "table")
    assert "Payout  vendor acme  period 2026-11  currency USD" in table
    doc = json.loads(render(rep, "json"))
    assert doc["total"] == "0.002901" and doc["statements"][0]["total"] == "0.002451"
    assert doc["statements"][0]["lines"] == acme["lines"]
    rows = list(csv.DictReader(io.StringIO(render(rep, "csv"))))
    assert [r for r in rows if r["vendor"] == "acme" and r["module"] == "TOTAL"][0]["payout"] \
        == "0.002451"
    assert "No payouts" in render(payouts(ledger, "2020-01"), "table")


def test_open_ledger_urls(tmp_path):
    a = open_ledger(f"sqlite://{tmp_path}/x.db")
    b = open_ledger(None, str(tmp_path))
    c = open_ledger(str(tmp_path / "y.db"))
    assert a.path == str(tmp_path / "x.db")
    assert b.path == str(tmp_path / "accounting" / "ledger.db")
    assert c.path == str(tmp_path / "y.db")
    for led in (a, b, c):
        led.close()
    with pytest.raises(LedgerError, match="unknown ledger store"):
        open_ledger("mysql://x")


# -- properties ---------------------------------------------------------------------

line_specs = st.lists(
    st.tuples(st.integers(1, 60),                         # seq
              st.integers(-10**9, 10**9),                 # amount
              st.sampled_from(["", "acme", "zeta"]),      # vendor
              st.fractions(0, 1, max_denominator=100),    # share
              st.sampled_from(["a", "b"])),               # account
    min_size=0, max_size=40)


def _check_invariants(led: Ledger, posted_entries: list[dict]) -> None:
    assert led.check() == []
    for t in led.transactions():
        es = led.entries(t["id"])
        assert sum(e["debit"] for e in es) == sum(e["credit"] for e in es)
        # the entries the SQL derived are those the line calls for
        want = [dict(zip(ENTRY_COLUMNS, r)) for r in entries_of(t["id"], Line.from_dict(t))]
        assert es == want
    # entries are never updated or deleted: what was there is still there
    assert led.entries()[:len(posted_entries)] == posted_entries


@pytest.mark.parametrize("kind", BACKENDS)
def test_ledger_invariants_property(kind, tmp_path):
    if kind == "postgresql" and _pg_unreachable():
        pytest.skip(_pg_unreachable())
    examples = 60 if kind == "sqlite" else 15
    backends = Backends(kind, tmp_path)

    @settings(max_examples=examples, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(line_specs, st.integers(1, 4))
    def run(specs, batches):
        led = backends.new()
        try:
            lines = []
            for seq, amount, vendor, share, account in specs:
                lines.append(line(f"n1:{seq}", amount, vendor=vendor, share=share,
                                  account=account, module=f"{vendor or 'baton'}.m"))
            size = max(1, len(lines) // batches)
            seen: list[dict] = []
            for i in range(0, len(lines), size):
                led.post(lines[i:i + size], position=("n1", i))
                _check_invariants(led, seen)
                seen = led.entries()
            snapshot = (led.transactions(), led.entries())
            # posting all of it again changes nothing
            assert led.post(lines) == 0
            assert (led.transactions(), led.entries()) == snapshot
            first: dict[str, Line] = {}
            for ln in lines:
                first.setdefault(ln.key, ln)
            assert led.count() == len(first)
            total = sum(ln.amount for ln in first.values())
            by_account = {}
            for e in led.entries():
                by_account[e["account"]] = by_account.get(e["account"], 0) + e["debit"] - e["credit"]
            assert sum(v for k, v in by_account.items() if k.startswith("customer:")) == total
            assert sum(by_account.values()) == 0
        finally:
            led.close()

    try:
        run()
    finally:
        backends.cleanup()
