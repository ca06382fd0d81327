"""Red team, fifteenth pass: the vLLM secondary tier's mechanics (``StoreTier``) called with
values vLLM never sends (no vLLM needed). Each test fails on the code before its fix and
asserts the exact refusal and that the tier's books did not move."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest

from kvtier.integrations.vllm.keys import EngineLayout
from kvtier.integrations.vllm.store_tier import StoreTier
from kvtier.remote import InMemoryRemoteStore

PAGE = 64


def make_key(i: int) -> bytes:
    return i.to_bytes(32, "big") + bytes(4)


@pytest.fixture
def tier() -> Iterator[StoreTier]:
    layout = EngineLayout(model="m", kv_dtype="float16", page_bytes=PAGE, tokens_per_hash=16,
                          blocks_per_chunk=1, groups=((16, 2),), tp_size=1, pp_size=1,
                          pcp_size=1, dcp_size=1, rank=0)
    store = InMemoryRemoteStore(layout.namespace())
    t = StoreTier(store, memoryview(bytearray(PAGE * 8)), PAGE)
    yield t
    t.close()
    store.close()


def books(t: StoreTier) -> tuple[object, ...]:
    return (t.stats, dict(t._probes), list(t._batch), dict(t._keys_of_request),
            t.has_pending_work())


@pytest.mark.parametrize(("call", "message"), [
    # before: TypeError (unhashable) with the lookup counted and its probe queued
    (lambda t: t.lookup(make_key(1), ["r"]), "request_id must be a str, got ['r']"),
    # before: kept as the key of the request's verdicts
    (lambda t: t.lookup(make_key(1), None), "request_id must be a str, got None"),
    (lambda t: t.request_finished(5), "request_id must be a str, got 5"),
    # before: page 1 written under the key (int(1.9)), another request's page
    (lambda t: t.submit_store(1, [make_key(3)], [1.9]),
     "chunk_ids[0] must be an int, got 1.9"),
    (lambda t: t.submit_store(1, [make_key(3), make_key(4)], [0, "2"]),
     "chunk_ids[1] must be an int, got '2'"),
    (lambda t: t.submit_load(1, [make_key(3)], [True]), "chunk_ids[0] must be an int, got True"),
    # before: a job id of "x" handed back to the engine in its JobOutcome
    (lambda t: t.submit_store("x", [make_key(3)], [1]), "job_id must be an int, got 'x'"),
])
def test_a_call_vllm_never_makes_is_refused_changing_nothing(
        tier: StoreTier, call: Callable[[StoreTier], object], message: str) -> None:
    tier._view[PAGE:2 * PAGE] = bytes([7]) * PAGE
    before = books(tier)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call(tier)
    tier.drain()
    assert books(tier) == before
    assert tier.finished_jobs() == []
    assert bytes(tier._view[PAGE:2 * PAGE]) == bytes([7]) * PAGE
    tier.check_invariants()


def test_a_job_id_still_open_is_refused(tier: StoreTier) -> None:
    """A second job under the id of one whose outcome ``finished_jobs`` has not handed
    back: before, both were accepted and reported under one id (the engine took one's
    outcome for the other's). Refused, nothing counted or queued; the id is free again
    once its outcome is handed back."""
    tier.submit_store(1, [make_key(3)], [1])
    before = books(tier)
    with pytest.raises(ValueError, match=r"^job 1 is still open \(its outcome not handed "
                                         r"back by finished_jobs\)"):
        tier.submit_load(1, [make_key(3)], [2])
    assert books(tier) == before
    tier.drain()
    assert [(o.job_id, o.success) for o in tier.finished_jobs()] == [(1, True)]
    tier.submit_load(1, [make_key(3)], [2])
    tier.drain()
    assert [(o.job_id, o.success) for o in tier.finished_jobs()] == [(1, True)]
    assert tier.stats.num_store_jobs == 1 and tier.stats.num_load_jobs == 1
