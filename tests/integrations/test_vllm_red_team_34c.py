"""Red team 34c, the vLLM integration's counts and ids: the store tier's job and chunk
ids take an integer of any kind (NumPy, a caller's ``__index__`` class) as the plain int it is, and
refuse a bool or a float naming the field (``kvtier.counts``)."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.integrations.vllm.keys import EngineLayout
from kvtier.integrations.vllm.store_tier import StoreTier
from kvtier.remote import InMemoryRemoteStore

PAGE = 64


class Index:
    """A caller's integer type: only ``__index__``, as ``operator.index`` reads it."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def test_store_tier_jobs_take_any_integer_ids() -> None:
    """submit_store / submit_load with NumPy chunk ids (an engine's block ids from a NumPy
    array) and job id were refused ('chunk_ids[0] must be an int'): now the pages round
    trip and the outcome names the plain job id; a bool chunk id is still refused."""
    layout = EngineLayout(model="m", kv_dtype="float16", page_bytes=PAGE, tokens_per_hash=16,
                          blocks_per_chunk=1, groups=((16, 2),), tp_size=1, pp_size=1,
                          pcp_size=1, dcp_size=1, rank=0)
    store = InMemoryRemoteStore(layout.namespace())
    view = memoryview(bytearray(PAGE * 4))
    tier = StoreTier(store, view, PAGE)
    try:
        view[0:PAGE] = bytes([7]) * PAGE
        key = (1).to_bytes(32, "big") + (0).to_bytes(4, "big")
        tier.submit_store(np.int64(10), [key], np.array([0]))  # type: ignore[arg-type]
        tier.drain()
        [stored] = tier.finished_jobs()
        assert (type(stored.job_id), stored.job_id, stored.success) == (int, 10, True)
        tier.submit_load(Index(11), [key], [np.int64(3)])  # type: ignore[arg-type]
        tier.drain()
        [loaded] = tier.finished_jobs()
        assert (type(loaded.job_id), loaded.job_id, loaded.success) == (int, 11, True)
        assert bytes(view[3 * PAGE:4 * PAGE]) == bytes([7]) * PAGE
        tier.check_invariants()
        with pytest.raises(ValueError, match=r"chunk_ids\[0\] must be an int"):
            tier.submit_load(12, [key], [True])
        with pytest.raises(ValueError, match="given twice"):
            tier.submit_load(12, [key, key], [np.int64(1), 1])
    finally:
        tier.close()
        store.close()
