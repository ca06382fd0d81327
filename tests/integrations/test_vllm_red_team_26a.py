"""Red team 26a, the vLLM secondary tier's mechanics (``StoreTier``, no vLLM needed): what
the tier answers after its own jobs, in the orders vLLM's tiering manager calls it. Each
test fails on the code before its fix and asserts the books after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvtier.integrations.vllm.keys import EngineLayout
from kvtier.integrations.vllm.store_tier import StoreTier
from kvtier.remote import InMemoryRemoteStore

PAGE = 64


def make_key(i: int) -> bytes:
    return i.to_bytes(32, "big") + bytes(4)


@pytest.fixture
def parts() -> Iterator[tuple[StoreTier, InMemoryRemoteStore]]:
    layout = EngineLayout(model="m", kv_dtype="float16", page_bytes=PAGE, tokens_per_hash=16,
                          blocks_per_chunk=1, groups=((16, 2),), tp_size=1, pp_size=1,
                          pcp_size=1, dcp_size=1, rank=0)
    store = InMemoryRemoteStore(layout.namespace())
    tier = StoreTier(store, memoryview(bytearray(PAGE * 8)), PAGE)
    yield tier, store
    tier.close()
    store.close()


def probe(tier: StoreTier, request_id: str, *keys: int) -> list[str]:
    """One step's lookups, the probe's round trip, and the next step's lookups."""
    tier.lookup(make_key(keys[0]), request_id)
    for k in keys:
        tier.lookup(make_key(k), request_id)
    tier.flush()
    tier.drain()
    return [tier.lookup(make_key(k), request_id) for k in keys]


def test_a_key_this_tier_stored_is_a_hit_while_the_request_that_missed_it_lives(
        parts: tuple[StoreTier, InMemoryRemoteStore]) -> None:
    """Request A misses keys 1-2 (the store lacks them), computes them and its store job
    writes them. Before, the MISS that A's probe learnt stayed the verdict of every request
    while A lived: B, asking after the write (its CPU tier had evicted them), was told
    MISS for pages the store held, and recomputed them. Now a store job that succeeds
    makes its keys HIT for every request, A's included; a failed one changes nothing."""
    tier, store = parts
    assert probe(tier, "A", 1, 2) == ["miss", "miss"]
    tier.submit_store(1, [make_key(1), make_key(2)], [0, 1])
    tier.drain()
    assert [(o.job_id, o.success) for o in tier.finished_jobs()] == [(1, True)]
    tier.check_invariants()
    assert [tier.lookup(make_key(k), "B") for k in (1, 2)] == ["hit", "hit"]
    assert [tier.lookup(make_key(k), "A") for k in (1, 2)] == ["hit", "hit"]
    assert not tier.has_pending_work()
    tier.check_invariants()
    # A store job that fails (the store refused its write) teaches nothing.
    assert probe(tier, "C", 3) == ["miss"]
    store.close()
    tier.submit_store(2, [make_key(3)], [2])
    tier.drain()
    assert [(o.job_id, o.success) for o in tier.finished_jobs()] == [(2, False)]
    assert tier.lookup(make_key(3), "D") == "miss"
    tier.check_invariants()
    for request_id in "ABCD":
        tier.request_finished(request_id)
    assert tier._probes == {} and tier._keys_of_request == {}
    stats = tier.stats
    assert (stats.num_hits, stats.num_misses, stats.num_stored_pages) == (4, 4, 2)


class RaisingStore(InMemoryRemoteStore):
    """A caller's store client that raises where a kvtier store would answer a fault."""

    def contains_many(self, hashes: object) -> set[int]:
        raise ConnectionError("store down")


def test_a_store_job_that_never_asked_the_store_counts_no_page_skipped() -> None:
    """A store job whose existence check raised (the store down) counted every page of the
    job as skipped, "already in the store": 3 pages the store never held reported as held.
    Now a failed check counts none skipped; the job fails, nothing written."""
    layout = EngineLayout(model="m", kv_dtype="float16", page_bytes=PAGE, tokens_per_hash=16,
                          blocks_per_chunk=1, groups=((16, 2),), tp_size=1, pp_size=1,
                          pcp_size=1, dcp_size=1, rank=0)
    store = RaisingStore(layout.namespace())
    tier = StoreTier(store, memoryview(bytearray(PAGE * 8)), PAGE)
    tier.submit_store(1, [make_key(1), make_key(2), make_key(3)], [0, 1, 2])
    tier.drain()
    assert [(o.job_id, o.success, o.transfer_bytes) for o in tier.finished_jobs()] == [
        (1, False, 0)]
    stats = tier.stats
    assert (stats.num_store_jobs, stats.num_failed_store_jobs, stats.num_stored_pages,
            stats.num_skipped_pages, stats.bytes_stored) == (1, 1, 0, 0, 0)
    assert store.backend == {}
    tier.check_invariants()
    tier.close()
    store.close()


def test_a_clock_that_fails_never_loses_a_job_nor_raises_into_a_lookup(
        parts: tuple[StoreTier, InMemoryRemoteStore]) -> None:
    """The tier's clock was read raw: one that raised on the I/O thread ended the job
    before it reported (vLLM waited on it for ever: a load's CPU pages pinned, the engine
    stepping with pending work, never done), and one that raised in a flush or lookup raised into
    vLLM's step. Now it is read as a cache reads its clock (``CacheClock``): the last good
    time stands in, every job reports, and lookups answer."""
    _, store = parts
    ticks = iter(range(1, 1_000_000))

    def clock() -> float:
        value = next(ticks)
        if value > 2:  # good twice (the tier's start), then down for good
            raise OSError("clock down")
        return float(value)

    tier = StoreTier(store, memoryview(bytearray(PAGE * 8)), PAGE, clock=clock)
    tier._view[0:PAGE] = bytes([5]) * PAGE
    tier.submit_store(1, [make_key(1)], [0])
    tier.drain()
    assert [(o.job_id, o.success, o.transfer_bytes) for o in tier.finished_jobs()] == [
        (1, True, PAGE)]
    assert probe(tier, "A", 1) == ["hit"]
    tier.submit_load(2, [make_key(1)], [3])
    tier.drain()
    assert [(o.job_id, o.success, o.transfer_bytes) for o in tier.finished_jobs()] == [
        (2, True, PAGE)]
    assert bytes(tier._view[3 * PAGE:4 * PAGE]) == bytes([5]) * PAGE
    assert not tier.has_pending_work() and tier.stats.num_job_errors == 0
    tier.check_invariants()
    tier.close()
