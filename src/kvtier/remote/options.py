"""Checks of the remote tier's numeric options: finite, in range, never a bool.

A bad option is an impossible request: it raises ``ValueError`` naming the field and the
value at construction, so no fault path later does arithmetic on it (``backoff_s=1e300``
once made a retry's sleep overflow). Pure functions.
"""

from __future__ import annotations

import math
import sys

from kvtier.reprs import shown

# A wait this long has no limit; it is within every platform's threading.TIMEOUT_MAX
# (about 292 years on Linux, 49 days on Windows).
LONGEST_WAIT_S = 3600.0 * 24 * 30


def describe(value: object) -> str:
    """``repr(value)``, or a short description where repr itself fails (ints past 4300
    digits): ``kvtier.reprs.shown``. Pure."""
    return shown(value)


def check_number(field: str, value: object, low: float, high: float | None, *,
                 low_open: bool = False) -> float:
    """``value`` as a float if it is an int or float (never a bool) in ``[low, high]``
    (``(low, high]`` with ``low_open``; ``high`` None: any finite number from ``low`` up);
    else ValueError naming ``field``. NaN and infinities are out of every range. Pure."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        # NOTE: Python compares a huge int with a float exactly, without overflow; an int
        # past the largest float is out of every range (``float`` of it would overflow).
        above_low = low < value if low_open else low <= value  # type: ignore[operator]
        ok = above_low and value <= (  # type: ignore[operator]
            sys.float_info.max if high is None else high)
    if not ok:
        opening = "(" if low_open else "["
        where = (f"{'>' if low_open else '>='} {low:g}" if high is None
                 else f"in {opening}{low:g}, {high:g}]")
        raise ValueError(f"{field} must be a finite number {where}, got {describe(value)}")
    return float(value)  # type: ignore[arg-type]


def check_timeout(field: str, value: object) -> float | None:
    """``value`` as a wait's timeout in seconds: None (no limit) for None, for infinity and
    for anything from :data:`LONGEST_WAIT_S` up (a month; past the platform's
    ``threading.TIMEOUT_MAX`` a wait raised); else a float >= 0. ValueError naming
    ``field`` for a negative number, NaN or a non-number.

    NOTE: a condition's ``wait_for(pred, inf)`` raises OverflowError, and one with NaN returns
    at once as if the wait were over. Pure."""
    if value is None:
        return None
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or math.isnan(value) or value < 0):
        raise ValueError(f"{field} must be a number of seconds >= 0 or None, got "
                         f"{describe(value)}")
    return None if value >= LONGEST_WAIT_S else float(value)


def check_count(field: str, value: object, low: int, high: int) -> int:
    """``value`` if it is an int (never a bool) in ``[low, high]``; else ValueError naming
    ``field``. Pure."""
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{field} must be an integer in [{low}, {high}], got {describe(value)}")
    return value
