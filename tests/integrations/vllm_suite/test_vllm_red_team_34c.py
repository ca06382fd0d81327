"""Red team 34c, the vLLM event translator (needs vLLM: runs in .venv-vllm): its
``block_size`` and ``data_parallel_rank`` take an integer of any kind (NumPy, a caller's
``__index__`` class) as the plain int it is, and refuse a bool or a float naming the
field (``kvtier.counts``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest


class Index:
    """A caller's integer type: only ``__index__``, as ``operator.index`` reads it."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def translator(**options: Any) -> Any:
    """A VllmEventTranslator (the import needs no vLLM)."""
    from kvtier.integrations.vllm.events import VllmEventTranslator

    return VllmEventTranslator(clock=lambda: 0.0, **options)


@pytest.mark.parametrize("value", [np.int64(16), np.uint32(16), Index(16)])
def test_translator_takes_any_integer_block_size_and_rank(value: Any) -> None:
    """VllmEventTranslator(np.int64(16), data_parallel_rank=np.int64(1)) was refused ('must
    be a positive int'): now the plain ints, as a batch carries them."""
    t = translator(block_size=value, data_parallel_rank=np.int32(1))
    assert (type(t.block_size), t.block_size) == (int, 16)
    assert (type(t.data_parallel_rank), t.data_parallel_rank) == (int, 1)


@pytest.mark.parametrize(("field", "value"), [
    ("block_size", True), ("block_size", 16.0), ("data_parallel_rank", np.bool_(False)),
    ("data_parallel_rank", 1.0),
])
def test_translator_refuses_bools_and_floats_naming_the_field(field: str,
                                                              value: object) -> None:
    """A bool or a float is no integer: ValueError naming the field."""
    options: dict[str, object] = {"block_size": 16, field: value}
    with pytest.raises(ValueError, match=f"^{field} must be"):
        translator(**options)
