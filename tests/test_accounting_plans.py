"""Money parsing and rounding, and every usage plan against hand-computed amounts."""
from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest

from engine.accounting.config import BillingConfig, BillingConfigError
from engine.accounting.money import (MoneyError, format_money, format_quantity, parse_money,
                                     parse_ratio, round_half_up)
from engine.accounting.plans import (GraduatedPlan, Increment, PerUnitPlan, PlanError,
                                     SubscriptionPlan, VolumePlan, parse_plan)

S = 1_000_000_000  # ns per second


# -- money ----------------------------------------------------------------------

@pytest.mark.parametrize("value, micro", [
    ("0.001", 1000), ("$1.00", 1_000_000), ("1", 1_000_000), (2, 2_000_000),
    (Decimal("0.000001"), 1), ("0.0010000", 1000), ("1,234.5", 1_234_500_000),
    ("2.50 USD", 2_500_000), ("$ 0.5", 500_000), (0.001, 1000), (".25", 250_000),
    ("1_000", 1_000_000_000),
])
def test_parse_money_exact(value, micro):
    assert parse_money(value, "price") == micro


@pytest.mark.parametrize("value, problem", [
    ("0.0000001", "more precision than a micro-unit"),
    (Decimal("1.0000005"), "more precision"),
    ("-1.00", "must not be negative"),
    ("abc", "not an amount"),
    (True, "expected an amount"),
    ([1], "expected an amount"),
    ("$1.00 EUR", "two currencies"),
    (float("nan"), "not a finite amount"),
])
def test_parse_money_rejects(value, problem):
    with pytest.raises(MoneyError) as exc:
        parse_money(value, "plans.basic.price")
    assert str(exc.value).startswith("plans.basic.price: ")
    assert problem in str(exc.value)


def test_parse_money_currency_and_sign():
    assert parse_money("-0.5", "x", allow_negative=True) == -500_000
    assert parse_money("€2", "x", currency="EUR") == 2_000_000
    with pytest.raises(MoneyError, match="is in USD, but the amounts here are in EUR"):
        parse_money("$2", "x", currency="EUR")


def test_format_money():
    assert format_money(23_000) == "0.023"
    assert format_money(1_000_000) == "1.00"
    assert format_money(1) == "0.000001"
    assert format_money(-1_250_000, "USD") == "-1.25 USD"
    assert format_money(0) == "0.00"
    assert format_money(5, min_places=0) == "0.000005"
    with pytest.raises(TypeError):
        format_money(1.5)  # type: ignore[arg-type]


def test_round_half_up_is_the_one_rule():
    assert [round_half_up(n, 2) for n in (1, 3, 5, -1, -3)] == [1, 2, 3, -1, -2]
    assert round_half_up(5, 10) == 1 and round_half_up(4, 10) == 0
    assert round_half_up(-5, 10) == -1          # symmetric: a reversal negates exactly
    assert format_quantity(Fraction(61, 60)) == "1.016667"
    assert format_quantity(Fraction(3, 1)) == "3"


def test_parse_ratio():
    assert parse_ratio(0.7) == Fraction(7, 10)
    assert parse_ratio("70%") == Fraction(7, 10)
    assert parse_ratio("0.333") == Fraction(333, 1000)
    with pytest.raises(MoneyError, match="between 0 and 1"):
        parse_ratio(1.5, "vendors.acme.revenue_share")


# -- increments -----------------------------------------------------------------

@pytest.mark.parametrize("inc, ns, billed", [
    ("60/60", 0, 0), ("60/60", 1, 60), ("60/60", 60 * S, 60), ("60/60", 60 * S + 1, 120),
    ("6/6", 61 * S, 66), ("6/6", 1 * S, 6), ("1/1", 61 * S + 1, 62), ("1/1", 61 * S, 61),
    ("30/6", 10 * S, 30), ("30/6", 31 * S, 36), ("0/1", S // 2, 1),
])
def test_increment_billing(inc, ns, billed):
    first, nxt = (int(x) for x in inc.split("/"))
    assert Increment(first, nxt).bill(ns) == billed


def test_increment_completed_for_running_costs():
    inc = Increment(60, 60)
    assert inc.completed(59 * S) == 0
    assert inc.completed(60 * S) == 60
    assert inc.completed(119 * S) == 60
    assert Increment(6, 6).completed(13 * S) == 12


# -- per unit -------------------------------------------------------------------

def plan(**table) -> object:
    return parse_plan("p", table)


def seg(p, seconds_ns, **kw):
    return p.rate(p.segment_quantity(seconds_ns), segment=True, **kw).amount


def test_per_unit_increments_hand_computed():
    # $0.01/min: 61 s at 1/1 = 61/60 * 10000 µ = 10166.67 -> 10167
    assert seg(plan(price="0.01", unit="minute", increment="1/1"), 61 * S) == 10167
    # 60/60: 61 s bills 120 s = 2 minutes
    assert seg(plan(price="0.01", unit="minute", increment="60/60"), 61 * S) == 20000
    assert seg(plan(price="0.01", unit="minute", increment="60/60"), 1) == 10000
    # 6/6: 61 s bills 66 s = 1.1 minutes
    assert seg(plan(price="0.01", unit="minute", increment="6/6"), 61 * S) == 11000
    # per second and per hour
    assert seg(plan(price="0.0001", unit="second"), 61 * S + 500_000_000) == 6200
    assert seg(plan(price="1.20", unit="hour"), 90 * S) == 30000


def test_per_unit_minimum_and_connect_fee():
    p = plan(price="0.01", unit="minute", increment="6/6", minimum="0.05")
    assert seg(p, 30 * S) == 50000                  # 5000 lifted to the minimum
    assert seg(p, 600 * S) == 100000                # above the minimum
    p = plan(price="0.01", unit="minute", connect_fee="0.02")
    assert seg(p, 60 * S) == 30000                  # 10000 + 20000 connect
    assert seg(p, 0) == 20000                       # a zero-length segment still connected
    assert p.rate(3, segment=False).amount == 500   # an action line has no connect fee


def test_per_unit_half_up_rounding():
    p = plan(price="0.000003", unit="minute")       # 0.05 µ per second
    assert [seg(p, s * S) for s in (10, 30, 50, 70)] == [1, 2, 3, 4]   # .5 .5 .5 .5 -> up


def test_per_unit_actions():
    p = plan(price="0.0075", unit="action")
    assert p.rate(3).amount == 22500
    assert p.segment_quantity(123 * S) == 1           # a segment is one use
    assert p.rate(1, segment=True).amount == 7500


def test_seed_example_rates():
    bridge = plan(price="0.001", unit="minute")
    app = plan(price="0.01", unit="minute")
    assert seg(bridge, 180 * S) == 3000 and seg(app, 120 * S) == 20000
    assert format_money(3000 + 20000) == "0.023"


# -- graduated --------------------------------------------------------------------

def test_graduated_session_scope_across_the_boundary():
    p = plan(kind="graduated", tier_scope="session", unit="minute",
             tiers=[{"up_to": 600, "price": "0.10"}, {"price": "0.05"}])
    assert isinstance(p, GraduatedPlan)
    # 900 s from the start of a session: 600 s at 0.10 + 300 s at 0.05 = 1.00 + 0.25
    assert p.rate(900, prior_session=0).amount == 1_250_000
    # the same session later: all in the second tier
    assert p.rate(120, prior_session=900).amount == 100_000
    # a segment straddling the boundary: 500..700 = 100 s at 0.10 + 100 s at 0.05
    assert p.rate(200, prior_session=500).amount == 250_000
    # session scope ignores the period
    assert p.rate(60, prior_session=0, prior_period=10_000).amount == 100_000


def test_graduated_flat_first_tier_then_per_minute():
    # "first 10 minutes at $1.00 total, then $0.10/min"
    p = plan(kind="graduated", tier_scope="period",
             tiers=[{"up_to": "10m", "flat": "1.00"}, {"price": "0.10", "unit": "minute"}])
    assert p.rate(300, prior_period=0).amount == 1_000_000      # 5 min: the flat dollar
    assert p.rate(420, prior_period=300).amount == 200_000      # 5..12 min: 2 min at 0.10
    assert p.rate(720, prior_period=0).amount == 1_200_000      # the same in one piece
    assert p.rate(0, prior_period=0).amount == 0                # no use, no flat


def test_graduated_period_scope():
    p = plan(kind="graduated", tier_scope="period", unit="action",
             tiers=[{"up_to": 100, "price": "0.02"}, {"up_to": 1000, "price": "0.01"},
                    {"price": "0.005"}])
    assert p.rate(50, prior_period=80).amount == 20 * 20000 + 30 * 10000
    assert p.rate(1000, prior_period=500).amount == 500 * 10000 + 500 * 5000


# -- volume -----------------------------------------------------------------------

def test_volume_tiers_price_the_whole_period():
    p = plan(kind="volume", unit="action",
             tiers=[{"up_to": 1000, "price": "0.01"}, {"price": "0.008"}])
    assert isinstance(p, VolumePlan)
    first = p.rate(600, prior_period=0).amount
    second = p.rate(600, prior_period=600).amount
    assert first == 6_000_000
    assert first + second == 9_600_000           # all 1200 at 0.008
    assert p.period_total(1200) == 9_600_000


def test_volume_line_can_be_a_credit():
    p = plan(kind="volume", unit="action",
             tiers=[{"up_to": 100, "price": "0.10"}, {"price": "0.05"}])
    assert p.rate(100).amount == 10_000_000
    assert p.rate(1, prior_period=100).amount == 5_050_000 - 10_000_000


def test_volume_minutes_with_flat():
    p = plan(kind="volume", tiers=[{"up_to": "1h", "price": "0.02", "unit": "minute"},
                                   {"price": "0.01", "unit": "minute", "flat": "0.50"}])
    assert p.rate(1800).amount == 600_000                         # 30 min at 0.02
    assert p.rate(3600, prior_period=1800).amount == 500_000 + 900_000 - 600_000


# -- subscriptions and caps -----------------------------------------------------

def test_subscription_zero_while_paid():
    p = plan(kind="subscription", fee="20.00", unit="minute")
    assert isinstance(p, SubscriptionPlan) and p.fee == 20_000_000 and p.unpaid == "charge"
    ch = p.rate(p.segment_quantity(3600 * S), segment=True, paid=True)
    assert ch.amount == 0 and ch.note == ""
    ch = p.rate(60, paid=False)
    assert ch.amount == 0 and ch.note == "unpaid"


def test_cap_deny_and_overage():
    deny = plan(price="0.01", unit="action", cap=500, at_cap="deny")
    ch = deny.rate(20, prior_period=490)
    assert ch.amount == 10 * 10000 and ch.note == "over-cap"
    assert deny.rate(5, prior_period=600).amount == 0
    over = plan(price="0.01", unit="action", cap=500, at_cap="overage", overage_price="0.02")
    ch = over.rate(20, prior_period=490)
    assert ch.amount == 10 * 10000 + 10 * 20000 and ch.note == "overage" and ch.unit_price is None
    assert over.rate(3, prior_period=500).unit_price == 20000
    # "500 messages a month" within a subscription
    sub = plan(kind="subscription", fee="5.00", unit="action", cap=500, at_cap="overage",
               overage_price="0.01")
    assert sub.rate(502, prior_period=0, paid=True).amount == 20000


def test_cap_on_time_with_duration():
    p = plan(price="0.01", unit="minute", cap="10m", at_cap="deny")
    assert p.cap == 600
    assert p.rate(120, prior_period=540, segment=True).amount == 10000   # only 60 s within


@pytest.mark.parametrize("table, key, problem", [
    ({"price": "0.01", "colour": "red"}, "plans.p.colour", "unknown key"),
    ({"kind": "tiered"}, "plans.p.kind", "must be one of"),
    ({}, "plans.p.price", "required"),
    ({"price": "0.0000001"}, "plans.p.price", "more precision"),
    ({"price": "0.01", "increment": "60"}, "plans.p.increment", "FIRST/NEXT"),
    ({"price": "0.01", "increment": "6/0"}, "plans.p.increment", "at least"),
    ({"price": "0.01", "unit": "action", "increment": "6/6"}, "plans.p.increment", "unit of time"),
    ({"price": "0.01", "unit": "day"}, "plans.p.unit", "unit must be"),
    ({"price": "0.01", "at_cap": "deny"}, "plans.p.at_cap", "needs a cap"),
    ({"price": "0.01", "cap": 5, "at_cap": "overage"}, "plans.p.overage_price", "required"),
    ({"price": "0.01", "cap": 0}, "plans.p.cap", "positive"),
    ({"price": "0.01", "currency": "usd"}, "plans.p.currency", "three capital letters"),
    ({"kind": "graduated"}, "plans.p.tiers", "required"),
    ({"kind": "graduated", "tiers": [{"up_to": 60, "price": "1"}, {"up_to": 30, "price": "1"},
                                     {"price": "1"}]}, "plans.p.tiers[1].up_to", "must rise"),
    ({"kind": "graduated", "tiers": [{"up_to": 60, "price": "1"}]}, "plans.p.tiers[0]", "last tier"),
    ({"kind": "graduated", "tiers": [{"price": "1"}, {"price": "1"}]}, "plans.p.tiers[0].up_to",
     "only the last"),
    ({"kind": "graduated", "unit": "minute", "tiers": [{"price": "1", "unit": "action"}]},
     "plans.p.tiers[0].unit", "same thing"),
    ({"kind": "graduated", "tier_scope": "call", "tiers": [{"price": "1"}]}, "plans.p.tier_scope",
     "session or period"),
    ({"kind": "volume", "tiers": [{"price": "1"}], "cap": 5}, "plans.p.cap", "unknown key"),
    ({"kind": "subscription"}, "plans.p.fee", "required"),
    ({"kind": "subscription", "fee": "1", "unpaid": "maybe"}, "plans.p.unpaid", "charge or deny"),
])
def test_plan_errors_name_the_key(table, key, problem):
    with pytest.raises(PlanError) as exc:
        parse_plan("p", table)
    assert exc.value.key == key, str(exc.value)
    assert problem in exc.value.problem


def test_per_unit_parsed_fields():
    p = parse_plan("basic", {"price": "$0.001", "unit": "minute", "increment": "60/60",
                             "minimum": "0.01", "connect_fee": "0.005", "description": "d"})
    assert isinstance(p, PerUnitPlan)
    assert (p.price, p.increment, p.minimum, p.connect_fee) == (1000, Increment(60, 60), 10000, 5000)
    assert p.describe()["increment"] == "60/60"


# -- billing config --------------------------------------------------------------

BASE = {
    "plans": {"std": {"price": "0.01"}, "bridge": {"price": "0.001"},
              "survey": {"price": "0.05", "unit": "minute"},
              "sms": {"price": "0.0075", "unit": "action"},
              "eur": {"price": "0.01", "currency": "EUR"}},
    "billing": {"default_plan": "std", "level_plans": {"basic": "bridge"},
                "action_plans": {"message": "sms"}},
    "vendors": {"acme": {"revenue_share": 0.7, "modules": ["acme.survey"],
                         "plans": {"acme.survey": "survey"}}},
    "accounts": {"demo": {"currency": "USD", "billing": {"plans": {"baton.bridge": "std"},
                                                         "prepaid_balance": "10.00"}}},
}


def test_plan_resolution_order():
    b = BillingConfig.from_dict(BASE)
    assert b.plan_for("demo", "baton.bridge", "basic").name == "std"       # the account's own
    assert b.plan_for("other", "baton.bridge", "basic").name == "bridge"   # level default
    assert b.plan_for("other", "acme.survey", "service").name == "survey"  # listing default
    assert b.plan_for("other", "baton.hold", "application").name == "std"  # platform default
    assert b.plan_for("other", "acme.survey", "", "message").name == "sms"
    assert b.plan_for("other", "acme.survey", "", "api_call").name == "free"
    assert b.vendor_of("acme.survey") == ("acme", Fraction(7, 10))
    assert b.vendor_of("baton.bridge") == ("", 0)
    assert b.vendor_of("zeta.x") == ("zeta", 0)
    assert b.accounts["demo"].prepaid_balance == 10_000_000


@pytest.mark.parametrize("patch, key", [
    ({"billing": {"default_plan": "nope"}}, "billing.default_plan"),
    ({"billing": {"level_plans": {"premium": "std"}}}, "billing.level_plans.premium"),
    ({"billing": {"action_plans": {"fax": "std"}}}, "billing.action_plans.fax"),
    ({"billing": {"whatever": 1}}, "billing.whatever"),
    ({"vendors": {"acme": {"revenue_share": 2}}}, "vendors.acme.revenue_share"),
    ({"vendors": {"acme": {"modules": ["baton.hold"]}}}, "vendors.acme.modules"),
    ({"vendors": {"acme": {"plans": {"other.mod": "std"}}}}, "vendors.acme.plans.\"other.mod\""),
    ({"accounts": {"x": {"billing": {"plans": {"baton.bridge": "missing"}}}}},
     "accounts.x.billing.plans.\"baton.bridge\""),
    ({"accounts": {"x": {"billing": {"credit": 1}}}}, "accounts.x.billing.credit"),
    ({"accounts": {"x": {"billing": {"prepaid_balance": "1.0000001"}}}},
     "accounts.x.billing.prepaid_balance"),
    ({"accounts": {"x": {"currency": "EUR"}}}, "billing.default_plan"),
    ({"accounts": {"x": {"billing": {"plans": {"baton.bridge": "eur"}}}}},
     "accounts.x.billing.plans.\"baton.bridge\""),
])
def test_billing_config_errors_name_the_key(patch, key):
    raw = {k: dict(v) for k, v in BASE.items()}
    for section, value in patch.items():
        raw[section] = {**raw.get(section, {}), **value}
    with pytest.raises(BillingConfigError) as exc:
        BillingConfig.from_dict(raw)
    assert exc.value.key == key, str(exc.value)


def test_unpriced_actions_are_counted_as_actions_not_minutes():
    # 86 characters of speech with no action plan: free, and 86 of them on the
    # invoice, not 86 seconds shown as 1.43 minutes.
    b = BillingConfig.from_dict({"plans": {"p": {"price": "0.01", "unit": "minute"}},
                                 "billing": {"default_plan": "p"}})
    plan = b.plan_for("a", "baton.menu", "service", action="tts_characters")
    assert plan.unit == "action" and plan.price == 0 and not plan.is_time
    assert plan.rate(86).amount == 0
    assert b.plan_for("a", "baton.menu", "service").name == "p"
