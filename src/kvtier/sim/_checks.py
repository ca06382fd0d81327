"""Field validators shared by the simulator's frozen dataclasses."""

from __future__ import annotations

from kvtier.reprs import shown
from kvtier.sequence import is_finite_number, short_repr


def check_int(field: str, value: int, minimum: int, maximum: int | None = None) -> None:
    """Raise ValueError naming ``field`` unless ``value`` is an int in
    ``minimum..maximum``."""
    if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
        bounds = (f">= {shown(minimum)}" if maximum is None
                  else f"in {shown(minimum)}..{shown(maximum)}")
        raise ValueError(f"{field} must be an integer {bounds}, got {short_repr(value)}")


def check_float(field: str, value: float, low: float, high: float | None = None) -> None:
    """Raise ValueError naming ``field`` unless ``value`` is a finite number in [low, high]."""
    if (
        not is_finite_number(value)
        or value < low
        or (high is not None and value > high)
    ):
        bounds = f">= {shown(low)}" if high is None else f"in [{shown(low)}, {shown(high)}]"
        raise ValueError(f"{field} must be a finite number {bounds}, got {shown(value)}")
