"""Red team 29g, the vLLM secondary tier's mechanics (``StoreTier``, no vLLM needed): the
keys a load reports to vLLM as arrived are the keys a request can use. Each test fails on
the code before its fix, or pins what held, and asserts the books after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvtier.integrations.vllm.chunk_policy import PolicyChunks
from kvtier.integrations.vllm.keys import EngineLayout, fold_key
from kvtier.integrations.vllm.store_tier import StoreTier
from kvtier.remote import InMemoryRemoteStore

PAGE = 64
NUM_PAGES = 8


def make_key(i: int, group: int = 0) -> bytes:
    return i.to_bytes(32, "big") + group.to_bytes(4, "big")


def page_of(view: memoryview, page: int) -> bytes:
    return bytes(view[page * PAGE:(page + 1) * PAGE])


@pytest.fixture
def parts() -> Iterator[tuple[StoreTier, InMemoryRemoteStore, memoryview]]:
    layout = EngineLayout(model="m", kv_dtype="float16", page_bytes=PAGE, tokens_per_hash=16,
                          blocks_per_chunk=1, groups=((16, 2), (16, 2)), tp_size=1, pp_size=1,
                          pcp_size=1, dcp_size=1, rank=0)
    store = InMemoryRemoteStore(layout.namespace())
    view = memoryview(bytearray(PAGE * NUM_PAGES))
    tier = StoreTier(store, view, PAGE)
    yield tier, store, view
    tier.close()
    store.close()


def test_a_load_reports_no_chunk_past_a_failed_one_of_its_group(
        parts: tuple[StoreTier, InMemoryRemoteStore, memoryview]) -> None:
    """A promotion of one request's chunks, in its lookup order (group 0's prefix, then
    group 1's), where group 0's second chunk is gone from the store::

        job    g0:1   g0:2   g0:3   g1:1   g1:2
        store  ok     gone   ok     ok     ok
        pages  0      1      2      3      4

    Before, g0:3 was copied into page 2 and reported arrived: the tier counted it loaded,
    vLLM counted it promoted and kept it in its CPU tier (evicting a chunk some request
    could use), and the request, whose prefix ends at g0:1, computed it anyway. Now a
    chunk past a failed one of its own group is not copied and is reported failed (not
    bad: its value is sound, a later lookup finds it); group 1, whose chunks all arrived,
    is whole."""
    tier, store, view = parts
    present = [make_key(1), make_key(3), make_key(1, group=1), make_key(2, group=1)]
    store.put_many({fold_key(k): bytes([n + 1]) * PAGE for n, k in enumerate(present)})
    job = [make_key(1), make_key(2), make_key(3), make_key(1, group=1), make_key(2, group=1)]
    tier.submit_load(7, job, [0, 1, 2, 3, 4])
    tier.drain()
    tier.check_invariants()
    [outcome] = tier.finished_jobs()
    assert (outcome.job_id, outcome.success) == (7, False)
    assert outcome.successful_keys == [make_key(1), make_key(1, group=1),
                                       make_key(2, group=1)]
    assert outcome.transfer_bytes == 3 * PAGE
    assert [page_of(view, p) for p in range(5)] == [
        b"\x01" * PAGE, bytes(PAGE), bytes(PAGE), b"\x03" * PAGE, b"\x04" * PAGE]
    stats = tier.stats
    assert (stats.num_load_jobs, stats.num_failed_load_jobs, stats.num_loaded_pages,
            stats.bytes_loaded) == (1, 1, 3, 3 * PAGE)
    # The gone chunk is a MISS from now on; the one past it is asked of the store again.
    assert [tier.lookup(make_key(i), "B") for i in (2, 3)] == ["miss", "retry"]
    tier.flush()
    tier.drain()
    assert tier.lookup(make_key(3), "B") == "hit"
    tier.request_finished("B")
    tier.check_invariants()


def test_a_load_whose_chunks_all_arrive_reports_success_with_every_page(
        parts: tuple[StoreTier, InMemoryRemoteStore, memoryview]) -> None:
    """The rule drops nothing from a whole load: two groups, every chunk present, every page
    copied and the job a success (successful_keys None, as vLLM reads it)."""
    tier, store, view = parts
    job = [make_key(1), make_key(2), make_key(1, group=1)]
    store.put_many({fold_key(k): bytes([n + 1]) * PAGE for n, k in enumerate(job)})
    tier.submit_load(1, job, [5, 6, 7])
    tier.drain()
    [outcome] = tier.finished_jobs()
    assert (outcome.success, outcome.successful_keys, outcome.transfer_bytes) == (
        True, None, 3 * PAGE)
    assert [page_of(view, p) for p in (5, 6, 7)] == [bytes([n]) * PAGE for n in (1, 2, 3)]
    assert tier.stats.num_loaded_pages == 3


def test_a_refused_job_is_counted_failed_as_vllm_counts_it(
        parts: tuple[StoreTier, InMemoryRemoteStore, memoryview]) -> None:
    """A load (or store) the tier refuses (its I/O queue full, or the tier closed) is
    reported failed to vLLM, which counts a failed promotion (cascade) and recomputes.
    Before, the tier's own books counted it a job and a refusal, but not a failed job: of
    num_load_jobs 1, num_failed_load_jobs 0, a load that never ran read as one that
    succeeded. Now every job reported failed is counted failed."""
    tier, _, _ = parts
    tier.close()
    tier.submit_load(1, [make_key(1)], [0])
    tier.submit_store(2, [make_key(2)], [1])
    assert [(o.job_id, o.success, o.successful_keys) for o in tier.finished_jobs()] == [
        (1, False, None), (2, False, None)]
    stats = tier.stats
    assert (stats.num_load_jobs, stats.num_failed_load_jobs, stats.num_loaded_pages) == (1, 1, 0)
    assert (stats.num_store_jobs, stats.num_failed_store_jobs, stats.num_stored_pages) == (1, 1, 0)
    assert stats.num_refused_jobs == 2


def test_a_finished_request_ends_only_its_own_soft_claims() -> None:
    """kvtier-predict ranks chunks live requests read (soft claims) after the rest. A read
    chunk K, which was then evicted and stored again; B read the new K. When A finished,
    its claim on the old K ended B's on the new one (claims were counted per key): K ranked
    unclaimed while B lived, and went before chunks no one reads. Now a claim names the
    chunk it was made on: A's end leaves B's claim, and B's end ends it."""
    chunks: PolicyChunks[str] = PolicyChunks("kvtier-predict", 4)
    chunks.insert(make_key(1), "old", evictable=True)
    claimed_by_a = chunks.soft_claim([make_key(1)])
    assert chunks.evict(1, set()) == [(make_key(1), "old")]
    chunks.insert(make_key(1), "new", evictable=True)
    claimed_by_b = chunks.soft_claim([make_key(1)])
    chunks.unclaim(claimed_by_a)
    chunks.check_invariants()
    node = chunks.node(make_key(1))
    assert node is not None and node.soft_claimed
    chunks.unclaim(claimed_by_b)
    chunks.check_invariants()
    assert not node.soft_claimed
