"""Red team 23c, the vLLM secondary tier's mechanics (``StoreTier``, no vLLM needed): a
store whose blocks are not the tier's pages."""

from __future__ import annotations

import pytest

from kvtier.config import DEFAULT_PRIORITY
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


def test_the_cpu_tiers_retention_heap_stays_as_small_as_its_chunks() -> None:
    """kvtier's policy over vLLM's CPU tier pushed a retention's end on its heap at every
    release of a chunk whose request set one, and dropped entries only once they ran out:
    4 chunks released 10,000 times within their hour held 40,004 entries (one float per
    chunk release of the last retention period, for ever growing with the traffic). The
    heap is now rebuilt from the chunks' own expiries past twice their number (as the
    evictor's is); retentions still run out when they should."""
    from kvtier.integrations.vllm.chunk_policy import PolicyChunks

    now = [0.0]
    chunks: PolicyChunks[str] = PolicyChunks("priority-lru", 8, clock=lambda: now[0])
    keys = [bytes([i]) * 36 for i in range(4)]
    for key in keys:
        chunks.insert(key, key.hex(), evictable=True, priority=80, retention_s=3600.0)
    for _ in range(10_000):
        chunks.release(keys, set(keys), priority=80, retention_s=3600.0)
    chunks.check_invariants()
    assert len(chunks._expiries) <= 2 * len(keys) + 64
    plain = bytes([9]) * 36
    chunks.insert(plain, "plain", evictable=True)  # the default priority: evicted first
    assert chunks.evict(1, set()) == [(plain, "plain")]
    now[0] = 3601.0  # the retentions ran out: the default priority again
    chunks.insert(plain, "plain", evictable=True)
    # Released tail first: the last chunk is the least recent of all.
    assert chunks.evict(1, set()) == [(keys[3], keys[3].hex())]
    assert all(chunks.node(k).priority == DEFAULT_PRIORITY  # type: ignore[union-attr]
               for k in keys[:3])
    chunks.check_invariants()


def test_the_retention_heap_shrinks_with_the_chunks_evicted() -> None:
    """The bound holds as chunks leave too: 100 chunks with a retention, 90 of them
    evicted or removed, leave a heap within twice the 10 left (plus 64)."""
    from kvtier.integrations.vllm.chunk_policy import PolicyChunks

    chunks: PolicyChunks[int] = PolicyChunks("priority-lru", 128, clock=lambda: 0.0)
    keys = [i.to_bytes(36, "big") for i in range(100)]
    for i, key in enumerate(keys):
        chunks.insert(key, i, evictable=True, priority=80, retention_s=60.0)
    evicted = chunks.evict(80, set())
    assert evicted is not None and len(evicted) == 80
    for key in [k for k in keys if chunks.get(k) is not None][:10]:
        chunks.remove(key)
    assert len(chunks) == 10 and len(chunks._expiries) <= 2 * 10 + 64
    chunks.check_invariants()
