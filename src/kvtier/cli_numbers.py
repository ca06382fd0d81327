"""The numbers of the ``kvtier`` command line, read by one rule: the argparse types of every
integer and number option, ``--set-profile``'s values and ``chat``'s ``/switch N``.

An integer is ASCII digits, with a leading ``-`` for a negative one (``16``, ``-1``); a
number is a decimal, with an optional fraction and exponent (``0.5``, ``.5``, ``2.5e10``),
and finite.

NOTE: ``int()`` and ``float()`` decided before, and took what no one types for a number:
``1_000``, `` 5 `` (spaces or a newline around), ``+5``, digits of another script (``٥``,
``５``), and ``float`` ``nan``, ``inf`` and ``infinity`` (``--time-scale nan`` gave every
arrival at time NaN) for options where only some checked.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

from kvtier.reprs import shown

_INTEGER = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_NOT_FINITE = re.compile(r"[-+]?(?:nan|inf(?:inity)?)", re.IGNORECASE)


class NotFinite(ValueError):
    """A number word or decimal past the float range (``nan``, ``inf``, ``1e999``): a
    number, and not a finite one (callers tell it from text that is no number by its
    class, never by its message)."""


def parse_int(text: str) -> int:
    """``text`` as an integer by the rule above; ValueError ``expected an integer, got
    <text>`` for anything else (an integer past Python's 4,300 digits too). Pure."""
    if _INTEGER.fullmatch(text) is not None:
        try:
            return int(text)
        except ValueError:  # past the digits int() converts
            raise ValueError(f"expected an integer of at most 4,300 digits, got one of "
                             f"{len(text.lstrip('-')):,}") from None
    raise ValueError(f"expected an integer, got {shown(text):.80}")


def parse_number(text: str) -> float:
    """``text`` as a finite number by the rule above; ValueError naming the text for
    anything else, :class:`NotFinite` for a number that is not finite or one past the
    float range (``1e999``). Pure."""
    if _NOT_FINITE.fullmatch(text) is not None:
        raise NotFinite(f"must be a finite number, got {text}")
    if _NUMBER.fullmatch(text) is None:
        raise ValueError(f"expected a number, got {shown(text):.80}")
    value = float(text)
    if not math.isfinite(value):
        raise NotFinite(f"must be a finite number, got {text:.80}")
    return value


@dataclass(frozen=True, slots=True)
class IntRange:
    """An argparse ``type`` accepting integers in ``minimum..maximum`` (None: no bound),
    only powers of two where ``power_of_two``. Its range is the option's whole range: a
    value in it is one the command takes (so an option's range errors name the option and
    the value as typed, never a field of a config behind it), and its bounds say which
    values are out of it (``tests/test_red_team_30c_cli.py`` walks every option's)."""

    minimum: int | None = None
    maximum: int | None = None
    power_of_two: bool = False

    def __call__(self, text: str) -> int:
        try:
            value = parse_int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        low, high = self.minimum, self.maximum
        if self.power_of_two and (value < 1 or value & (value - 1) or (
                low is not None and value < low) or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(
                f"must be a power of two in {low}..{high}, got {text:.80}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text:.80}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be an integer <= {high}, got {text:.80}")
        return value


def int_in(minimum: int | None = None, maximum: int | None = None) -> IntRange:
    """An argparse ``type`` accepting integers in ``minimum..maximum`` (None: no bound)."""
    return IntRange(minimum, maximum)


def power_of_two_in(minimum: int, maximum: int) -> IntRange:
    """An argparse ``type`` accepting the powers of two in ``minimum..maximum``."""
    return IntRange(minimum, maximum, power_of_two=True)


@dataclass(frozen=True, slots=True)
class IntListRange:
    """An argparse ``type`` accepting comma-separated integers in ``minimum..maximum``
    (None: no upper bound), each once."""

    minimum: int
    maximum: int | None = None

    def __call__(self, text: str) -> list[int]:
        try:
            values = [parse_int(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {shown(text):.80}") from None
        if any(v < self.minimum for v in values):
            raise argparse.ArgumentTypeError(
                f"every value must be >= {self.minimum}, got {text:.80}")
        if self.maximum is not None and any(v > self.maximum for v in values):
            raise argparse.ArgumentTypeError(
                f"every value must be <= {self.maximum}, got {text:.80}")
        # NOTE: a value given twice made every run of it twice (as a policy named twice would).
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise argparse.ArgumentTypeError(f"{twice} is given twice in {shown(text):.80}")
        return values


def int_list(minimum: int, maximum: int | None = None) -> IntListRange:
    """An argparse ``type`` accepting comma-separated integers in ``minimum..maximum``."""
    return IntListRange(minimum, maximum)


def _number(text: str) -> float:
    """``text`` as a decimal or a word of ``float`` for a number that is not finite (each
    type says what range it takes); ArgumentTypeError otherwise. Pure."""
    if _NUMBER.fullmatch(text) is None and _NOT_FINITE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"expected a number, got {shown(text):.80}")
    return float(text)


@dataclass(frozen=True, slots=True)
class NumberRange:
    """An argparse ``type`` accepting finite numbers from ``low`` (excluded where
    ``low_open``) to ``high``; an infinite bound is none."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False

    def __call__(self, text: str) -> float:
        value = _number(text)
        low, high = self.low, self.high
        if math.isfinite(value) and (low < value if self.low_open else low <= value) and (
                value <= high):
            return value
        raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text:.80}")

    def describe(self) -> str:
        """The range in words: ``a finite number in [0, 1]``, ``... > 0``. Pure."""
        low, high = self.low, self.high
        if math.isinf(low) and math.isinf(high):
            return "a finite number"
        if math.isinf(high):
            return f"a finite number {'>' if self.low_open else '>='} {low:g}"
        if math.isinf(low):
            return f"a finite number <= {high:g}"
        return f"a finite number in {'(' if self.low_open else '['}{low:g}, {high:g}]"


def number_in(low: float, high: float, *, low_open: bool = False) -> NumberRange:
    """An argparse ``type`` accepting finite numbers in ``[low, high]`` (``(low, high]``
    with ``low_open``)."""
    return NumberRange(low, high, low_open)


finite_float = NumberRange()  # any finite number
unit_float = NumberRange(0.0, 1.0)  # in [0, 1]
