"""Billing at the edges of periods: a call across midnight at a month's end, a
leap day, the year's end. The rule (docs/billing.md): a module's time in
control (a segment) belongs to the period in which it began, in the invoice
and in the balance alike. "Now" is billing's clock, travelled with
time-machine; no test here depends on today's date."""
from __future__ import annotations

import calendar

from ext.kernels import ring
from engine.accounting.accountant import Accountant
from engine.accounting.config import PeriodClock
from engine.accounting.invoices import invoice

S = 1_000_000_000
MONO0 = 9_000 * S

CONFIG = {
    "plans": {"app": {"price": "0.06", "unit": "minute", "increment": "1/1"},
              "bridge": {"price": "0.006", "unit": "minute", "increment": "1/1"}},
    "billing": {"level_plans": {"basic": "bridge", "application": "app"}},
    "accounts": {
        "post": {"billing": {"credit_limit": "100.00"}},
        "pre": {"billing": {"prepaid_balance": "10.00"}},
    },
}
APP_PER_S = 1000        # 0.06 USD a minute = 1,000 µUSD a second
BRIDGE_PER_S = 100


def at(y, mo, d, h=0, mi=0, s=0) -> int:
    return calendar.timegm((y, mo, d, h, mi, s)) * S


class Stamps:
    """Stamps a call into the ring as the engine does; monotonic time follows
    the wall clock from the call's first stamp."""

    def __init__(self, data_dir, wall0: int) -> None:
        self.w = ring.RingWriter(str(data_dir / "ring" / "ring.dat"), slots=1024, node_id="n1")
        self.wall0 = wall0

    def mono(self, wall: int) -> int:
        return MONO0 + wall - self.wall0

    def start(self, sid, account, wall):
        self.w.stamp_session("start", sid, account, self.mono(wall), wall)

    def go(self, sid, account, frm, to, level, wall):
        self.w.stamp_transition(sid, account, frm, to, level, "r", self.mono(wall), wall)

    def end(self, sid, account, wall):
        self.w.stamp_session("end", sid, account, self.mono(wall), wall, "hangup")


def lines_by_period(ledger, account):
    out = {}
    for t in ledger.transactions(account=account):
        out.setdefault(t["period"], []).append((t["module"], t["usage"] // S, t["amount"]))
    return out


def test_a_call_across_midnight_at_the_end_of_a_month(tmp_path, billing_time):
    # 23:58 on 30 November: two minutes of the app (begun in November, ending at
    # 00:00:30 in December), then five minutes of the bridge (begun in December).
    t0 = at(2026, 11, 30, 23, 58, 0)
    app_end = at(2026, 12, 1, 0, 0, 30)
    st = Stamps(tmp_path, t0)
    st.start("M", "post", t0)
    st.go("M", "post", "", "baton.instructions", "application", t0)
    with Accountant(str(tmp_path), CONFIG) as acct:
        acct.drain()
        # Live, 00:00:10 in December: the app's segment began in November, so it is
        # not December's yet: December's balance is 0, and November's would hold it.
        billing_time(at(2026, 12, 1, 0, 0, 10))
        snap = acct.policy_snapshot(now_mono_ns=st.mono(at(2026, 12, 1, 0, 0, 10)))
        assert snap["period"] == "2026-12"
        assert snap["accounts"]["post"]["balance_micro"] == 0
        billing_time(at(2026, 11, 30, 23, 59, 0))
        snap = acct.policy_snapshot(now_mono_ns=st.mono(at(2026, 11, 30, 23, 59, 0)))
        assert snap["period"] == "2026-11"
        assert snap["accounts"]["post"]["balance_micro"] == -60 * APP_PER_S

        st.go("M", "post", "baton.instructions", "baton.bridge", "basic", app_end)
        st.end("M", "post", app_end + 300 * S)
        acct.drain()
        nov, dec = invoice(acct.ledger, "post", "2026-11"), invoice(acct.ledger, "post", "2026-12")
        # The whole 150 s of the app are November's, though 30 s fell in December.
        assert nov["total_micro"] == 150 * APP_PER_S
        assert dec["total_micro"] == 300 * BRIDGE_PER_S
        assert lines_by_period(acct.ledger, "post") == {
            "2026-11": [("baton.instructions", 150, 150 * APP_PER_S)],
            "2026-12": [("baton.bridge", 300, 300 * BRIDGE_PER_S)]}
        # The balance in December is December's invoice; in November, November's.
        billing_time(at(2026, 12, 15))
        snap = acct.policy_snapshot()
        assert snap["accounts"]["post"]["balance_micro"] == -dec["total_micro"]
        billing_time(at(2026, 11, 30, 23, 59, 59))
        snap = acct.policy_snapshot()
        assert snap["accounts"]["post"]["balance_micro"] == -nov["total_micro"]
    st.w.close()


def test_prepaid_balance_spans_periods(tmp_path, billing_time):
    t0 = at(2026, 11, 30, 23, 59, 0)
    st = Stamps(tmp_path, t0)
    st.start("P", "pre", t0)
    st.go("P", "pre", "", "baton.instructions", "application", t0)
    st.go("P", "pre", "baton.instructions", "baton.bridge", "basic", t0 + 120 * S)
    with Accountant(str(tmp_path), CONFIG) as acct:
        acct.drain()
        # Prepaid funds are all-time: November's charge and December's live bridge
        # both come off the balance, whatever period it is now.
        now = t0 + 180 * S
        billing_time(now)
        snap = acct.policy_snapshot(now_mono_ns=st.mono(now))
        assert snap["period"] == "2026-12"
        assert snap["accounts"]["pre"]["balance_micro"] == \
            10_000_000 - 120 * APP_PER_S - 60 * BRIDGE_PER_S
        billing_time(at(2027, 3, 1))
        snap = acct.policy_snapshot(now_mono_ns=st.mono(now))
        assert snap["accounts"]["pre"]["balance_micro"] == \
            10_000_000 - 120 * APP_PER_S - 60 * BRIDGE_PER_S
    st.w.close()


def test_leap_day():
    months, days = PeriodClock("month"), PeriodClock("day")
    assert days.of(at(2028, 2, 29, 12)) == "2028-02-29"
    assert days.of(at(2028, 2, 29, 23, 59, 59) + S - 1) == "2028-02-29"
    assert days.of(at(2028, 3, 1)) == "2028-03-01"
    assert months.of(at(2028, 2, 29, 23, 59, 59)) == "2028-02"
    assert months.of(at(2028, 3, 1)) == "2028-03"
    assert days.of(at(2027, 2, 28, 23, 59, 59) + S) == "2027-03-01"   # not a leap year


def test_a_call_on_a_leap_day_with_daily_periods(tmp_path, billing_time):
    cfg = {**CONFIG, "billing": {**CONFIG["billing"], "period": "day"}}
    t0 = at(2028, 2, 29, 23, 59, 0)
    st = Stamps(tmp_path, t0)
    st.start("L", "post", t0)
    st.go("L", "post", "", "baton.instructions", "application", t0)
    st.go("L", "post", "baton.instructions", "baton.bridge", "basic", t0 + 90 * S)
    st.end("L", "post", t0 + 150 * S)
    with Accountant(str(tmp_path), cfg) as acct:
        acct.drain()
        assert lines_by_period(acct.ledger, "post") == {
            "2028-02-29": [("baton.instructions", 90, 90 * APP_PER_S)],
            "2028-03-01": [("baton.bridge", 60, 60 * BRIDGE_PER_S)]}
        billing_time(at(2028, 2, 29, 23, 59, 59))
        assert acct.policy_snapshot()["accounts"]["post"]["balance_micro"] == -90 * APP_PER_S
        billing_time(at(2028, 3, 1, 8))
        assert acct.policy_snapshot()["accounts"]["post"]["balance_micro"] == -60 * BRIDGE_PER_S
    st.w.close()


def test_the_years_end(tmp_path, billing_time):
    t0 = at(2026, 12, 31, 23, 59, 30)
    st = Stamps(tmp_path, t0)
    st.start("Y", "post", t0)
    st.go("Y", "post", "", "baton.instructions", "application", t0)
    st.go("Y", "post", "baton.instructions", "baton.bridge", "basic", t0 + 45 * S)
    st.end("Y", "post", t0 + 105 * S)
    with Accountant(str(tmp_path), CONFIG) as acct:
        acct.drain()
        assert invoice(acct.ledger, "post", "2026-12")["total_micro"] == 45 * APP_PER_S
        assert invoice(acct.ledger, "post", "2027-01")["total_micro"] == 60 * BRIDGE_PER_S
        billing_time(at(2027, 1, 1, 0, 5), tick=True)
        snap = acct.policy_snapshot()
        assert snap["period"] == "2027-01"
        assert snap["accounts"]["post"]["balance_micro"] == -60 * BRIDGE_PER_S
    st.w.close()


def test_the_suite_runs_on_a_fixed_calendar():
    # tests/conftest.py shifts billing's clock for every process of the run.
    from engine.common import clock

    assert PeriodClock().now() == "2031-01"
    assert abs(clock.wall_ns() - at(2031, 1, 8, 12)) < 3 * 3600 * S
