"""Money as integers of micro-units: 1 USD = 1,000,000 µUSD.

Amounts never pass through a float. Config values are parsed exactly
("0.001", "$1.00", Decimal("2.5"), or an integer of whole units) and anything
finer than a micro-unit is rejected rather than rounded, so a typo such as
"0.0000001" fails at start instead of billing nothing.

Rating computes exact rationals and rounds once per rated line with
`round_half_up` (half away from zero), the single rounding point of the
accounting package.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

__all__ = [
    "MICRO", "MoneyError", "parse_money", "parse_ratio", "format_money", "format_quantity",
    "round_half_up", "split_share", "check_currency", "SYMBOLS",
]

MICRO = 1_000_000
SYMBOLS = {"$": "USD", "€": "EUR", "£": "GBP", "¥": "JPY"}
_CODE = re.compile(r"^[A-Z]{3}$")
_AMOUNT = re.compile(r"^([+-]?)\s*([$€£¥]?)\s*([0-9][0-9_,]*(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Z]{3})?$")


class MoneyError(ValueError):
    """An amount or a ratio that cannot be used as given; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def check_currency(code: object, key: str = "currency") -> str:
    """Return `code` if it is an ISO 4217-style code of three capital letters."""
    if not isinstance(code, str) or not _CODE.match(code):
        raise MoneyError(key, f"a currency is three capital letters such as USD, not {code!r}")
    return code


def _decimal(value: object, key: str) -> tuple[Decimal, str | None]:
    """The exact decimal value of a config amount and the currency it names, if any."""
    if isinstance(value, bool):
        raise MoneyError(key, f"expected an amount such as \"0.01\", got {value!r}")
    if isinstance(value, int):
        return Decimal(value), None
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise MoneyError(key, f"not a finite amount: {value}")
        return value, None
    if isinstance(value, float):
        # TOML has no decimal type: `price = 0.001` arrives as a float. Its
        # shortest repr is the literal that was typed, so that is what counts.
        if value != value or value in (float("inf"), float("-inf")):
            raise MoneyError(key, f"not a finite amount: {value!r}")
        return Decimal(repr(value)), None
    if not isinstance(value, str):
        raise MoneyError(key, f"expected an amount such as \"0.01\", got {type(value).__name__}")
    m = _AMOUNT.match(value.strip())
    if m is None:
        raise MoneyError(key, f"not an amount: {value!r} (write e.g. \"0.001\", \"$1.00\" "
                              f"or \"2.50 EUR\")")
    sign, symbol, digits, code = m.groups()
    if symbol and code and SYMBOLS[symbol] != code:
        raise MoneyError(key, f"{value!r} names two currencies ({symbol} and {code})")
    try:
        dec = Decimal(digits.replace("_", "").replace(",", ""))
    except InvalidOperation:
        raise MoneyError(key, f"not an amount: {value!r}") from None
    return (-dec if sign == "-" else dec), (SYMBOLS[symbol] if symbol else code)


def parse_money(value: object, key: str = "amount", *, currency: str | None = None,
                allow_negative: bool = False) -> int:
    """Parse a config amount into micro-units exactly.

    Accepts "0.001", "$1.00", "2.50 EUR", Decimal, or an int of whole units.
    Raises MoneyError naming `key` when the value has more than six decimal
    places, is negative (unless allowed) or names a currency other than
    `currency`.
    """
    dec, named = _decimal(value, key)
    if named is not None and currency is not None and named != currency:
        raise MoneyError(key, f"{value!r} is in {named}, but the amounts here are in {currency}")
    micro = dec * MICRO
    if micro != micro.to_integral_value():
        raise MoneyError(key, f"{value!r} has more precision than a micro-unit "
                              f"(at most 6 decimal places)")
    if micro < 0 and not allow_negative:
        raise MoneyError(key, f"must not be negative, got {value!r}")
    return int(micro)


def parse_ratio(value: object, key: str = "ratio") -> Fraction:
    """Parse a share such as 0.7, "0.7" or "70%" into an exact Fraction in [0, 1]."""
    if isinstance(value, bool):
        raise MoneyError(key, f"expected a number between 0 and 1, got {value!r}")
    try:
        if isinstance(value, str) and value.strip().endswith("%"):
            frac = Fraction(Decimal(value.strip()[:-1].strip())) / 100
        elif isinstance(value, float):
            frac = Fraction(Decimal(repr(value)))
        elif isinstance(value, (int, str, Decimal, Fraction)):
            frac = Fraction(Decimal(value.strip()) if isinstance(value, str) else value)
        else:
            raise TypeError
    except (InvalidOperation, ValueError, TypeError):
        raise MoneyError(key, f"expected a number between 0 and 1 such as 0.7 or \"70%\", "
                              f"got {value!r}") from None
    if not 0 <= frac <= 1:
        raise MoneyError(key, f"must be between 0 and 1, got {value!r}")
    return frac


def round_half_up(num: int, den: int = 1) -> int:
    """num/den rounded to the nearest integer, halves away from zero.

    This is the accounting package's one rounding rule: "half-up" for the
    non-negative amounts rating produces, symmetric for negative ones so a
    reversal is the exact negation of what it reverses.
    """
    if den <= 0:
        raise ValueError("the denominator must be positive")
    if num >= 0:
        return (2 * num + den) // (2 * den)
    return -((-2 * num + den) // (2 * den))


def format_money(micro: int, currency: str | None = None, *, min_places: int = 2) -> str:
    """Render micro-units as a decimal string with at least `min_places`
    decimals and no trailing zeros beyond them: 23000 -> "0.023",
    1000000 -> "1.00", with currency "0.023 USD"."""
    if not isinstance(micro, int) or isinstance(micro, bool):
        raise TypeError(f"micro-units are an int, not {type(micro).__name__}")
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    digits = f"{frac:06d}".rstrip("0")
    if len(digits) < min_places:
        digits = digits.ljust(min_places, "0")
    text = f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"
    return f"{text} {currency}" if currency else text


def format_quantity(value: Fraction | int, places: int = 6) -> str:
    """A quantity (e.g. minutes as a Fraction of seconds/60) as a short decimal,
    rounded half-up to `places` decimals, trailing zeros dropped."""
    frac = Fraction(value)
    scaled = round_half_up(frac.numerator * 10 ** places, frac.denominator)
    sign = "-" if scaled < 0 else ""
    whole, part = divmod(abs(scaled), 10 ** places)
    digits = f"{part:0{places}d}".rstrip("0") if places else ""
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def split_share(amount: int, share: Fraction) -> int:
    """The vendor's part of `amount` for a share in [0, 1], rounded half-up on
    the magnitude (so a negated amount splits into negated parts)."""
    if not share:
        return 0
    if amount >= 0:
        return round_half_up(amount * share.numerator, share.denominator)
    return -round_half_up(-amount * share.numerator, share.denominator)
