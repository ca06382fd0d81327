"""Red team 22c, the vLLM secondary tier's mechanics (``StoreTier``, no vLLM needed): a job
that names one page for two keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kvtier.integrations.vllm.keys import EngineLayout, fold_key
from kvtier.integrations.vllm.store_tier import StoreTier
from kvtier.remote import InMemoryRemoteStore

PAGE = 64


def make_key(i: int) -> bytes:
    return i.to_bytes(32, "big") + bytes(4)


@pytest.fixture
def parts() -> Iterator[tuple[StoreTier, InMemoryRemoteStore, memoryview]]:
    layout = EngineLayout(model="m", kv_dtype="float16", page_bytes=PAGE, tokens_per_hash=16,
                          blocks_per_chunk=1, groups=((16, 2),), tp_size=1, pp_size=1,
                          pcp_size=1, dcp_size=1, rank=0)
    store = InMemoryRemoteStore(layout.namespace())
    view = memoryview(bytearray(PAGE * 8))
    for page in range(8):
        view[page * PAGE:(page + 1) * PAGE] = bytes([page]) * PAGE
    tier = StoreTier(store, view, PAGE)
    yield tier, store, view
    tier.close()
    store.close()


@pytest.mark.parametrize("submit", [StoreTier.submit_store, StoreTier.submit_load])
def test_a_job_naming_one_page_for_two_keys_is_refused_changing_nothing(
        parts: tuple[StoreTier, InMemoryRemoteStore, memoryview],
        submit: Callable[[StoreTier, int, list[bytes], list[int]], None]) -> None:
    """A store job of keys 1, 3 and 5 with chunk ids [1, 3, 1] wrote page 1 under keys 1
    and 5: the store held chunk 1's bytes under key 5, for every engine to load as chunk
    5's KV; a load job wrote two values into one page and reported both keys loaded. Now
    ValueError naming the chunk id and both places, nothing queued, the job id not taken,
    the store and the pages as they were."""
    tier, store, view = parts
    before = bytes(view)
    with pytest.raises(ValueError, match=r"chunk id 1 is given twice \(chunk_ids\[0\] and "
                                         r"chunk_ids\[2\]\): one page holds one chunk"):
        submit(tier, 7, [make_key(1), make_key(3), make_key(5)], [1, 3, 1])
    tier.drain()
    assert tier.finished_jobs() == [] and not tier.has_pending_work()
    assert store.get_many([fold_key(make_key(i)) for i in (1, 3, 5)]) == {}
    assert bytes(view) == before
    s = tier.stats
    assert (s.num_store_jobs, s.num_load_jobs) == (0, 0)
    tier.submit_store(7, [make_key(1), make_key(3)], [1, 3])  # the id is free; sound jobs run
    tier.drain()
    assert [(o.job_id, o.success) for o in tier.finished_jobs()] == [(7, True)]
    tier.check_invariants()
