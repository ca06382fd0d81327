"""Counts and ids as the public API takes them: one rule for every entry.

An integer is an ``int`` or anything ``operator.index`` takes (a NumPy integer, a one-element
integer tensor, a caller's class with ``__index__``), read as the plain ``int`` it is; never
a bool (nor a NumPy or torch bool), never a float (not even ``3.0``), never a str. A count is
such an integer within its bounds, at most ``MAX_COUNT`` unless the field says less.
"""

from __future__ import annotations

import operator

from kvtier.reprs import shown

MAX_COUNT = 2**48
"""The most tokens (or blocks) a count may name: ``MAX_BLOCKS`` (2**32) blocks of
``MAX_TOKENS_PER_BLOCK`` (2**16) tokens, more than any cache holds."""


def as_integer(value: object) -> int | None:
    """``value`` as a plain ``int`` if it is an integer (see the module), else None. Pure."""
    if type(value) is int:
        return value
    if isinstance(value, (bool, float, str, bytes)):
        return None
    dtype = getattr(value, "dtype", None)
    if dtype is not None and "bool" in str(dtype):
        return None  # a torch bool scalar's __index__ reads 0 or 1
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except Exception:  # NOTE: a caller's __index__ may raise anything: no integer
        return None


def check_count(field: str, value: object, minimum: int = 0,
                maximum: int = MAX_COUNT) -> int:
    """``value`` as a plain ``int``; ValueError naming ``field`` and the value unless it is
    an integer in ``minimum..maximum``. Pure."""
    n = as_integer(value)
    if n is None or not minimum <= n <= maximum:
        text = shown(value)
        text = text if len(text) <= 40 else text[:37] + "..."
        bound = (f">= {minimum}" if maximum == MAX_COUNT and (n is None or n < minimum)
                 else f"in {minimum}..{'2**48' if maximum == MAX_COUNT else maximum}")
        raise ValueError(f"{field} must be an integer {bound}, got {text}")
    return n
