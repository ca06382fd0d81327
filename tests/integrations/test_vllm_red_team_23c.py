"""Red team 23c, the vLLM secondary tier's mechanics (``StoreTier``, no vLLM needed): a
store whose blocks are not the tier's pages."""

from __future__ import annotations

import pytest

from kvtier.integrations.vllm.keys import EngineLayout
from kvtier.integrations.vllm.store_tier import StoreTier
from kvtier.remote import InMemoryRemoteStore

PAGE = 64


def make_layout(page_bytes: int) -> EngineLayout:
    return EngineLayout(model="m", kv_dtype="float16", page_bytes=page_bytes,
                        tokens_per_hash=16, blocks_per_chunk=1, groups=((16, 2),), tp_size=1,
                        pp_size=1, pcp_size=1, dcp_size=1, rank=0)


def test_a_tier_refuses_a_store_of_another_page_size() -> None:
    """A StoreTier over a store whose blocks are 128 bytes, for pages of 64, was made:
    every store job then failed (the codec refused each page's size) and every load
    missed, counted as the store's faults, with nothing saying why. It is refused now,
    naming both sizes; a store of the pages' size is taken."""
    store = InMemoryRemoteStore(make_layout(2 * PAGE).namespace())
    view = memoryview(bytearray(PAGE * 8))
    with pytest.raises(ValueError, match=rf"the store's blocks are {2 * PAGE} bytes .* the "
                                         rf"pages page_bytes={PAGE}"):
        StoreTier(store, view, PAGE)
    assert store.stats.num_puts == 0 and store.backend == {}
    tier = StoreTier(InMemoryRemoteStore(make_layout(PAGE).namespace()), view, PAGE)
    tier.close()
