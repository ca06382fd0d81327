"""Field validators shared by the simulator's frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvtier.counts import as_integer
from kvtier.reprs import shown
from kvtier.sequence import is_finite_number, short_repr


def check_int(field: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` as a plain int; ValueError naming ``field`` unless it is an integer
    (``kvtier.counts``: a NumPy or ``__index__`` one too, never a bool or a float) in
    ``minimum..maximum``. Pure."""
    n = value if type(value) is int else as_integer(value)
    if n is None or n < minimum or (maximum is not None and n > maximum):
        raise ValueError(f"{field} must be an integer {_int_bounds(minimum, maximum)}, got "
                         f"{short_repr(value)}")
    return n


def keep_plain_ints(obj: object, *fields: str) -> None:
    """Set each of a frozen dataclass's ``fields`` that holds an integer of another kind (a
    NumPy or ``__index__`` one) to the plain int it is, before its checks read them; what
    is no integer (a bool, a float) is left for the checks to refuse."""
    for name in fields:
        value = getattr(obj, name)
        if type(value) is not int:
            n = as_integer(value)
            if n is not None:
                object.__setattr__(obj, name, n)


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

    def check(self, field: str, value: object) -> int | float:
        """``value`` (an integer as the plain int it is); ValueError ``<field> must be
        <describe()>, got <value>`` unless :meth:`contains`."""
        if self.kind == "int":
            return check_int(field, value, int(self.low), int(self.high))
        check_float(field, value, float(self.low), float(self.high))  # type: ignore[arg-type]
        return value  # type: ignore[return-value]
