"""The vLLM secondary tier's mechanics (``StoreTier``) against in-memory and faulty stores:
no vLLM needed. Every test checks the books after each call."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kvtier.integrations.vllm.keys import EngineLayout, fold_key
from kvtier.integrations.vllm.store_tier import JobOutcome, StoreTier
from kvtier.remote import FaultyRemoteStore, InMemoryRemoteStore, RemoteNamespace

PAGE = 64
NUM_PAGES = 8


def make_layout(**kw: object) -> EngineLayout:
    fields: dict[str, object] = dict(
        model="m", kv_dtype="float16", page_bytes=PAGE, tokens_per_hash=16, blocks_per_chunk=1,
        groups=((16, 2),), tp_size=1, pp_size=1, pcp_size=1, dcp_size=1, rank=0)
    fields.update(kw)
    return EngineLayout(**fields)  # type: ignore[arg-type]


def make_key(i: int, group: int = 0) -> bytes:
    return i.to_bytes(32, "big") + group.to_bytes(4, "big")


def make_view() -> memoryview:
    return memoryview(bytearray(PAGE * NUM_PAGES))


def fill(view: memoryview, page: int, byte: int) -> None:
    view[page * PAGE:(page + 1) * PAGE] = bytes([byte]) * PAGE


def page_of(view: memoryview, page: int) -> bytes:
    return bytes(view[page * PAGE:(page + 1) * PAGE])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def namespace() -> RemoteNamespace:
    return make_layout().namespace()


@pytest.fixture
def store(namespace: RemoteNamespace) -> Iterator[InMemoryRemoteStore]:
    s = InMemoryRemoteStore(namespace)
    yield s
    s.close()


def make_tier(store: object, view: memoryview | None = None, **kw: object) -> StoreTier:
    return StoreTier(store, make_view() if view is None else view, PAGE, **kw)  # type: ignore[arg-type]


def settle(tier: StoreTier) -> list[JobOutcome]:
    """Wait for the I/O thread, then take the finished jobs (what a next step would see)."""
    tier.drain()
    tier.check_invariants()
    return tier.finished_jobs()


def test_fold_key_is_128_bits_and_refuses_other_keys() -> None:
    """A 36-byte key folds to a 128-bit int; group index changes it; other sizes raise."""
    h = fold_key(make_key(1))
    assert 0 <= h < 1 << 128 and h != fold_key(make_key(1, group=1))
    with pytest.raises(ValueError, match="36 bytes"):
        fold_key(b"x" * 32)


def test_namespace_separates_models_dtypes_pages_and_layouts() -> None:
    """Any field that changes a page's bytes changes the namespace fingerprint."""
    base = make_layout().namespace().fingerprint
    for change in (dict(model="other"), dict(kv_dtype="bfloat16"), dict(page_bytes=128),
                   dict(tp_size=2), dict(pp_size=2), dict(rank=1), dict(groups=((16, 3),)),
                   dict(blocks_per_chunk=2)):
        assert make_layout(**change).namespace().fingerprint != base, change
    assert make_layout().namespace("tenant-a").fingerprint != base
    assert make_layout().namespace().fingerprint == base


def test_layout_refuses_bad_fields() -> None:
    """Bad layout fields raise naming the field."""
    with pytest.raises(ValueError, match="page_bytes must be a multiple of 4"):
        make_layout(page_bytes=66)
    with pytest.raises(ValueError, match="tp_size"):
        make_layout(tp_size=0)


def test_lookup_retries_then_hits_after_one_batched_probe(store: InMemoryRemoteStore) -> None:
    """Unknown keys RETRY until the step's probe (one batch) resolves them: HIT or MISS."""
    view = make_view()
    tier = make_tier(store, view)
    store.put_many({fold_key(make_key(1)): b"\x01" * PAGE, fold_key(make_key(2)): b"\x02" * PAGE})
    assert [tier.lookup(make_key(i), "A") for i in (1, 2, 3)] == ["retry"] * 3
    assert tier.has_pending_work()
    tier.flush()  # the end of the step
    settle(tier)
    assert [tier.lookup(make_key(i), "A") for i in (1, 2, 3)] == ["hit", "hit", "miss"]
    stats = tier.stats
    assert (stats.num_probe_batches, stats.num_probed_keys) == (1, 3)
    assert not tier.has_pending_work()
    tier.close()


def test_store_then_load_round_trips_pages(store: InMemoryRemoteStore) -> None:
    """A stored page comes back byte for byte into another page; stored keys are skipped."""
    view = make_view()
    tier = make_tier(store, view)
    fill(view, 0, 7)
    fill(view, 1, 9)
    tier.submit_store(10, [make_key(1), make_key(2)], [0, 1])
    assert settle(tier) == [JobOutcome(10, True, None, pytest.approx(0.0, abs=5.0),  # type: ignore[arg-type]
                                       2 * PAGE)]
    tier.submit_store(11, [make_key(1)], [0])  # already there: not written again
    assert [o.transfer_bytes for o in settle(tier)] == [0]
    assert tier.stats.num_skipped_pages == 1
    tier.submit_load(12, [make_key(2), make_key(1)], [5, 6])
    [outcome] = settle(tier)
    assert (outcome.job_id, outcome.success, outcome.successful_keys) == (12, True, None)
    assert page_of(view, 5) == bytes([9]) * PAGE and page_of(view, 6) == bytes([7]) * PAGE
    tier.close()


def test_partial_load_reports_the_keys_that_arrived(store: InMemoryRemoteStore) -> None:
    """A load of a present and an absent key succeeds for the first only, and the absent
    key is a MISS from then on (vLLM would otherwise promote it again)."""
    view = make_view()
    tier = make_tier(store, view)
    store.put_many({fold_key(make_key(1)): b"\x05" * PAGE})
    tier.submit_load(1, [make_key(1), make_key(2)], [0, 1])
    [outcome] = settle(tier)
    assert (outcome.success, outcome.successful_keys) == (False, [make_key(1)])
    assert page_of(view, 0) == b"\x05" * PAGE and page_of(view, 1) == bytes(PAGE)
    assert tier.lookup(make_key(2), "B") == "miss"
    tier.close()


def test_corrupt_value_is_a_miss_until_our_store_rewrites_it(
        store: InMemoryRemoteStore, namespace: RemoteNamespace) -> None:
    """A corrupt value fails its load (checksum), turns MISS, and the next store of that
    key overwrites it instead of skipping it as present."""
    view = make_view()
    tier = make_tier(store, view)
    fill(view, 0, 3)
    tier.submit_store(1, [make_key(1)], [0])
    settle(tier)
    redis_key = namespace.key(fold_key(make_key(1)))
    value = bytearray(store.backend[redis_key])
    value[-1] ^= 0xFF
    store.backend[redis_key] = bytes(value)
    tier.submit_load(2, [make_key(1)], [4])
    assert [o.success for o in settle(tier)] == [False]
    assert tier.lookup(make_key(1), "A") == "miss"
    tier.submit_store(3, [make_key(1)], [0])
    assert [o.transfer_bytes for o in settle(tier)] == [PAGE]
    assert store.get_many([fold_key(make_key(1))]) == {fold_key(make_key(1)): bytes([3]) * PAGE}
    assert tier.lookup(make_key(1), "C") == "retry"  # no longer known bad: probed again
    tier.close()


def test_store_down_makes_misses_and_failed_jobs(store: InMemoryRemoteStore) -> None:
    """With the store down: probes say absent, stores and loads fail; nothing raises."""
    faulty = FaultyRemoteStore(store)
    faulty.down = True
    tier = make_tier(faulty)
    assert tier.lookup(make_key(1), "A") == "retry"
    tier.flush()
    tier.submit_store(1, [make_key(1)], [0])
    tier.submit_load(2, [make_key(2)], [1])
    outcomes = settle(tier)
    assert sorted((o.job_id, o.success) for o in outcomes) == [(1, False), (2, False)]
    assert tier.lookup(make_key(1), "A") == "miss"
    tier.close()
    faulty.close()


def test_slow_store_lookup_gives_up_without_blocking(store: InMemoryRemoteStore) -> None:
    """A probe in flight longer than max_lookup_wait_s is a MISS, answered at once."""
    faulty = FaultyRemoteStore(store)
    faulty.delay_s = 0.3
    tier = make_tier(faulty, max_lookup_wait_s=0.05)
    tier.lookup(make_key(1), "A")
    tier.flush()
    start = time.perf_counter()
    assert tier.lookup(make_key(1), "A") == "retry"
    time.sleep(0.06)
    assert tier.lookup(make_key(1), "A") == "miss"
    assert time.perf_counter() - start < 0.25  # never waited for the 0.3 s probe
    assert tier.stats.num_lookups_given_up == 1
    settle(tier)
    tier.close()
    faulty.close()


def test_full_io_queue_fails_jobs_at_once(store: InMemoryRemoteStore) -> None:
    """When the I/O queue is full a job fails at once (reported next poll), a probe says
    absent; nothing waits."""
    faulty = FaultyRemoteStore(store)
    faulty.delay_s = 0.2
    tier = make_tier(faulty, max_queued_jobs=1)
    tier.submit_store(1, [make_key(1)], [0])  # running
    time.sleep(0.02)
    tier.submit_store(2, [make_key(2)], [1])  # queued
    tier.submit_load(3, [make_key(3)], [2])  # refused
    assert tier.finished_jobs() == [JobOutcome(3, False, None, 0.0, 0)]
    assert tier.stats.num_refused_jobs == 1
    assert sorted(o.job_id for o in settle(tier)) == [1, 2]
    tier.close()
    faulty.close()


def test_verdicts_live_while_a_request_holds_them(store: InMemoryRemoteStore) -> None:
    """A request keeps its verdict for its life; once no request holds it, the key is
    probed afresh (another engine may have stored it since)."""
    tier = make_tier(store)
    tier.lookup(make_key(1), "A")
    tier.flush()
    settle(tier)
    assert tier.lookup(make_key(1), "A") == "miss"
    store.put_many({fold_key(make_key(1)): b"\x01" * PAGE})
    assert tier.lookup(make_key(1), "A") == "miss"  # A's answer holds for A
    tier.request_finished("A")
    tier.check_invariants()
    assert tier.lookup(make_key(1), "B") == "retry"
    tier.flush()
    settle(tier)
    assert tier.lookup(make_key(1), "B") == "hit"
    tier.close()


def test_closed_tier_misses_and_fails_jobs(store: InMemoryRemoteStore) -> None:
    """After close(): lookups miss, jobs fail at once."""
    tier = make_tier(store)
    tier.close()
    assert tier.lookup(make_key(1), "A") == "miss"
    tier.submit_store(1, [make_key(1)], [0])
    assert tier.finished_jobs() == [JobOutcome(1, False, None, 0.0, 0)]


def test_bad_jobs_raise_before_any_io(store: InMemoryRemoteStore) -> None:
    """A job naming a page outside the view, or unequal keys and pages, raises at once."""
    tier = make_tier(store)
    with pytest.raises(ValueError, match="outside the 8 pages"):
        tier.submit_store(1, [make_key(1)], [8])
    with pytest.raises(ValueError, match="2 keys but 1 chunk ids"):
        tier.submit_load(1, [make_key(1), make_key(2)], [0])
    assert tier.stats.num_store_jobs == 0 and not tier.has_pending_work()
    with pytest.raises(ValueError, match="whole number"):
        StoreTier(store, memoryview(bytearray(PAGE + 1)), PAGE)
    tier.close()
