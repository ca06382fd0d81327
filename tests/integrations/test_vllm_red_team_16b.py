"""Red team, sixteenth pass (b): the vLLM secondary tier's mechanics (``StoreTier``) when
vLLM's jobs overlap in one step (no vLLM needed). Each test fails on the code before its
fix and asserts the tier's books after the fault."""

from __future__ import annotations

from kvtier.integrations.vllm.keys import EngineLayout, fold_key
from kvtier.integrations.vllm.store_tier import StoreTier
from kvtier.remote import InMemoryRemoteStore

PAGE = 64
NUM_PAGES = 8


def key(i: int) -> bytes:
    return i.to_bytes(32, "big") + (0).to_bytes(4, "big")


def test_a_store_that_skipped_a_corrupt_key_leaves_it_bad() -> None:
    """A load of a corrupt value and a store of the same key in one step (two requests: one
    promotes the key, the other computed it): the store was queued before the load failed,
    so it skipped the key as present, and then cleared the bad mark the load had just set:
    the key, never rewritten, was probed and HIT again, and its next load failed again.
    Now a store clears the marks of the keys it wrote only: the key stays a MISS, and the
    next store overwrites it."""
    layout = EngineLayout(model="m", kv_dtype="float16", page_bytes=PAGE, tokens_per_hash=16,
                          blocks_per_chunk=1, groups=((16, 2),), tp_size=1, pp_size=1,
                          pcp_size=1, dcp_size=1, rank=0)
    namespace = layout.namespace()
    store = InMemoryRemoteStore(namespace)
    view = memoryview(bytearray(PAGE * NUM_PAGES))
    tier = StoreTier(store, view, PAGE)
    view[0:PAGE] = bytes([3]) * PAGE
    tier.submit_store(1, [key(1)], [0])
    tier.drain()
    assert [o.success for o in tier.finished_jobs()] == [True]
    redis_key = namespace.key(fold_key(key(1)))
    value = bytearray(store.backend[redis_key])
    value[-1] ^= 0xFF
    store.backend[redis_key] = corrupt = bytes(value)
    tier.submit_load(2, [key(1)], [4])
    tier.submit_store(3, [key(1)], [0])
    tier.drain()
    assert [(o.job_id, o.success, o.transfer_bytes) for o in tier.finished_jobs()] == [
        (2, False, 0), (3, True, 0)]
    tier.check_invariants()
    assert tier.lookup(key(1), "A") == "miss"
    assert store.backend[redis_key] == corrupt
    tier.submit_store(4, [key(1)], [0])
    tier.drain()
    assert [(o.job_id, o.success, o.transfer_bytes) for o in tier.finished_jobs()] == [
        (4, True, PAGE)]
    assert store.get_many([fold_key(key(1))]) == {fold_key(key(1)): bytes([3]) * PAGE}
    stats = tier.stats
    assert (stats.num_stored_pages, stats.num_skipped_pages, stats.num_failed_load_jobs) == (
        2, 1, 1)
    tier.close()
    store.close()
