"""The integer kinds callers pass where kvtier takes a count or an id (``kvtier.counts``'
rule): NumPy scalars and a class with only ``__index__``."""

from __future__ import annotations

import numpy as np


class Index:
    """A caller's integer type: only ``__index__``, as ``operator.index`` reads it."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"Index({self.value})"


def integer_kinds(value: int) -> list[object]:
    """``value`` as the integer kinds callers pass, but the plain int."""
    return [np.int64(value), np.uint32(value), np.int8(value), Index(value)]
