"""Field validators shared by the simulator's frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvtier.reprs import shown
from kvtier.sequence import is_finite_number, short_repr


def check_int(field: str, value: int, minimum: int, maximum: int | None = None) -> None:
    """Raise ValueError naming ``field`` unless ``value`` is an int in
    ``minimum..maximum``."""
    if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{field} must be an integer {_int_bounds(minimum, maximum)}, got "
                         f"{short_repr(value)}")


def check_float(field: str, value: float, low: float, high: float | None = None) -> None:
    """Raise ValueError naming ``field`` unless ``value`` is a finite number in [low, high]."""
    if (
        not is_finite_number(value)
        or value < low
        or (high is not None and value > high)
    ):
        raise ValueError(f"{field} must be a finite number {_float_bounds(low, high)}, got "
                         f"{shown(value)}")


def _int_bounds(minimum: int, maximum: int | None) -> str:
    return f">= {shown(minimum)}" if maximum is None else f"in {shown(minimum)}..{shown(maximum)}"


def _float_bounds(low: float, high: float | None) -> str:
    return f">= {shown(low)}" if high is None else f"in [{shown(low)}, {shown(high)}]"


@dataclass(frozen=True, slots=True)
class FieldRange:
    """The values a number field takes, as data: an ``int`` in ``low..high`` or a finite
    ``float`` in ``[low, high]`` (both bounds inclusive).

    NOTE: one table serves the dataclass's own check and its callers' messages: the
    command line took the range out of the dataclass's ValueError text, which a reworded
    message would have broken without a failing check."""

    kind: Literal["int", "float"]
    low: int | float
    high: int | float

    def describe(self) -> str:
        """The range in words, as a refusal gives it: ``an integer in 1..1073741824``,
        ``a finite number in [0.5, 1.0]``. Pure."""
        if self.kind == "int":
            return f"an integer {_int_bounds(int(self.low), int(self.high))}"
        return f"a finite number {_float_bounds(float(self.low), float(self.high))}"

    def contains(self, value: object) -> bool:
        """Whether :meth:`check` takes ``value``. Pure."""
        try:
            self.check("value", value)
        except ValueError:
            return False
        return True

    def check(self, field: str, value: object) -> None:
        """Raise ValueError ``<field> must be <describe()>, got <value>`` unless
        :meth:`contains`."""
        if self.kind == "int":
            check_int(field, value, int(self.low), int(self.high))  # type: ignore[arg-type]
        else:
            check_float(field, value, float(self.low), float(self.high))  # type: ignore[arg-type]
