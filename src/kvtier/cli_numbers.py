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
from collections.abc import Callable

from kvtier.reprs import shown

_INTEGER = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_NOT_FINITE = re.compile(r"[-+]?(?:nan|inf(?:inity)?)", re.IGNORECASE)


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
    anything else, or one past the float range (``1e999``). Pure."""
    if _NOT_FINITE.fullmatch(text) is not None:
        raise ValueError(f"must be a finite number, got {text}")
    if _NUMBER.fullmatch(text) is None:
        raise ValueError(f"expected a number, got {shown(text):.80}")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {text:.80}")
    return value


def int_in(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in ``minimum..maximum`` (None: no bound)."""

    def parse(text: str) -> int:
        try:
            value = parse_int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text:.80}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be an integer <= {maximum}, got {text:.80}")
        return value

    return parse


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """An argparse ``type`` accepting comma-separated integers >= ``minimum``."""

    def parse(text: str) -> list[int]:
        try:
            values = [parse_int(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {shown(text):.80}") from None
        if any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(
                f"every value must be >= {minimum}, got {shown(text):.80}")
        # NOTE: a value given twice made every run of it twice (as a policy named twice would).
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise argparse.ArgumentTypeError(f"{twice} is given twice in {shown(text):.80}")
        return values

    return parse


def _number(text: str) -> float:
    """``text`` as a decimal or a word of ``float`` for a number that is not finite (each
    type says what range it takes); ArgumentTypeError otherwise. Pure."""
    if _NUMBER.fullmatch(text) is None and _NOT_FINITE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"expected a number, got {shown(text):.80}")
    return float(text)


def finite_float(text: str) -> float:
    """An argparse ``type`` accepting finite numbers."""
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text:.80}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type`` accepting finite numbers > 0."""
    value = _number(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text:.80}")
    return value


def unit_float(text: str) -> float:
    """An argparse ``type`` accepting numbers in [0, 1]."""
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text:.80}")
    return value


def number_in(low: float, high: float, *, low_open: bool = False
              ) -> Callable[[str], float]:
    """An argparse ``type`` accepting finite numbers in ``[low, high]`` (``(low, high]``
    with ``low_open``)."""

    def parse(text: str) -> float:
        value = _number(text)
        if not (math.isfinite(value) and (low < value if low_open else low <= value)
                and value <= high):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got "
                                             f"{text:.80}")
        return value

    return parse
