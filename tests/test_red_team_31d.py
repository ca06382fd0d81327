"""Red team 31d, the core's edges: the public calls test_api_garbage never fed garbage
(``drop_key_space``, ``drop_lora``, ``drop_salt``, ``admitted_reuse``, the step calls out of
order, the scheduler's ``hold``, ``release``, ``abort`` and ``reset_prefix_cache``), each
refused with an error naming the argument or its value and changing nothing: the books, the
lookups, the tables, the plan taken after."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from bad_input_helpers import make_manager, snapshot
from kvtier import (
    CacheConfig,
    KVCacheManager,
    Request,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
)

REFUSED = (ValueError, TypeError, KeyError, RuntimeError)

# (call, a fragment its error must hold): the argument's name or the value as shown.
MANAGER_GARBAGE: list[tuple[str, Callable[[KVCacheManager], object], str]] = [
    ("drop_key_space salt bool", lambda m: m.drop_key_space(salt=True), "salt"),
    ("drop_key_space salt float", lambda m: m.drop_key_space(salt=1.5),  # type: ignore[arg-type]
     "salt"),
    ("drop_key_space salt list", lambda m: m.drop_key_space(salt=[1]),  # type: ignore[arg-type]
     "salt"),
    # A NumPy integer is an integer (red team 33c, kvtier.counts); a float is not.
    ("drop_key_space lora float", lambda m: m.drop_key_space(lora_id=np.float64(3.0)),
     "lora_id"),
    ("drop_key_space lora negative", lambda m: m.drop_key_space(lora_id=-1), "lora_id"),
    ("drop_key_space lora huge", lambda m: m.drop_key_space(lora_id=2**63), "lora_id"),
    ("drop_lora None", lambda m: m.drop_lora(None), "lora_id"),  # type: ignore[arg-type]
    ("drop_lora bool", lambda m: m.drop_lora(True), "lora_id"),
    ("drop_lora str", lambda m: m.drop_lora("3"), "lora_id"),  # type: ignore[arg-type]
    ("drop_salt None", lambda m: m.drop_salt(None), "salt"),  # type: ignore[arg-type]
    ("drop_salt nan", lambda m: m.drop_salt(float("nan")), "salt"),  # type: ignore[arg-type]
    ("drop_salt huge int", lambda m: m.drop_salt(2**200), "salt"),
    ("admitted_reuse unknown", lambda m: m.admitted_reuse("nobody"), "nobody"),
    # NumPy's str_ names its str's request (red team 33c): one that is no live request's.
    ("admitted_reuse numpy str", lambda m: m.admitted_reuse(np.str_("nobody")), "nobody"),
    ("end_step unopened", lambda m: m.end_step(), "begin_step"),
    ("reserve_lookahead chunked", lambda m: m.reserve_lookahead("chunked", 3), "chunked"),
    ("reserve_lookahead numpy float", lambda m: m.reserve_lookahead("live", np.float64(3)),
     "num_tokens"),
    ("reserve_lookahead negative", lambda m: m.reserve_lookahead("live", -1), "num_tokens"),
    ("compute_failed a str", lambda m: m.compute_failed("live"), "request_ids"),
    ("compute_failed unknown", lambda m: m.compute_failed(["live", "nobody"]), "nobody"),
    ("transfer_failed bool index", lambda m: m.transfer_failed(m.take_plan(), [True]),
     "bool"),
    ("remove numpy bool",
     lambda m: m.remove_sequence("live", np.bool_(True)),  # type: ignore[arg-type]
     "store_for_reuse"),
]


@pytest.mark.parametrize(("label", "call", "named"), MANAGER_GARBAGE,
                         ids=[g[0] for g in MANAGER_GARBAGE])
def test_manager_calls_refuse_garbage_naming_it_and_changing_nothing(
        label: str, call: Callable[[KVCacheManager], object], named: str) -> None:
    """Refused, the error naming the argument or its value; no book, lookup, table or
    copy changed."""
    mgr = make_manager()
    before = snapshot(mgr)
    with pytest.raises(REFUSED) as info:
        call(mgr)
    assert named in str(info.value), (label, info.value)
    assert snapshot(mgr) == before, label


def make_scheduler() -> tuple[KVCacheManager, Scheduler]:
    """A scheduler between steps: ``a`` decoding, ``b`` waiting."""
    mgr = make_manager()
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=16))
    sched.add_request(Request("a", [1, 2, 3, 4, 5], 4))
    sched.update(sched.step(), {"a": 7})
    sched.add_request(Request("b", [2, 2, 2, 2, 2, 2], 4))
    return mgr, sched


SCHEDULER_GARBAGE: list[tuple[str, Callable[[Scheduler], object], str]] = [
    ("hold int", lambda s: s.hold(3), "request_id"),  # type: ignore[arg-type]
    ("hold None", lambda s: s.hold(None), "request_id"),  # type: ignore[arg-type]
    ("release bytes", lambda s: s.release(b"b"), "request_id"),  # type: ignore[arg-type]
    ("abort list", lambda s: s.abort(["b"]), "request_id"),  # type: ignore[arg-type]
    ("reset_prefix_cache int", lambda s: s.reset_prefix_cache(1),  # type: ignore[arg-type]
     "reset_running_requests"),
    ("reset_prefix_cache None", lambda s: s.reset_prefix_cache(None),  # type: ignore[arg-type]
     "reset_running_requests"),
]


@pytest.mark.parametrize(("label", "call", "named"), SCHEDULER_GARBAGE,
                         ids=[g[0] for g in SCHEDULER_GARBAGE])
def test_scheduler_calls_refuse_garbage_naming_it_and_changing_nothing(
        label: str, call: Callable[[Scheduler], object], named: str) -> None:
    """Refused naming the argument; the queues and the manager as they were, and the next
    step the one an untouched scheduler takes."""
    mgr, sched = make_scheduler()
    twin_mgr, twin = make_scheduler()
    before = snapshot(mgr)
    with pytest.raises(REFUSED) as info:
        call(sched)
    assert named in str(info.value), (label, info.value)
    assert snapshot(mgr) == before, label
    assert [r.request_id for r in sched.waiting] == ["b"] and list(sched.running) == ["a"]
    step, twin_step = sched.step(), twin.step()
    assert step.context_chunks == twin_step.context_chunks
    assert step.decode_request_ids == twin_step.decode_request_ids
    assert snapshot(mgr) == snapshot(twin_mgr)


# ---- scenarios: exact block ids and reuse --------------------------------------------------

def make_small() -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=6), clock=lambda: 0.0)


def cached(mgr: KVCacheManager) -> list[tuple[int, tuple[int, ...]]]:
    return [(b.slot, b.tokens) for b in mgr.cached_blocks()]


def test_draft_slots_are_cached_only_as_accepted_tokens_fill_them() -> None:
    """Lookahead blocks hold drafts' KV: a block is stored only once accepted tokens fill
    it; the block no accepted token filled is freed with the request.

    ::

        tokens  |1 2 3 4|5 . . .|. . . .|     reserve_lookahead(a, 6): block 2 added
        table   [ 0     ][ 1     ][ 2     ]
        append 6 7  -> nothing new stored; append 8 -> block 1 (5 6 7 8) stored
    """
    mgr = make_small()
    assert mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5])).block_ids == (0, 1)
    assert mgr.reserve_lookahead("a", 6) == [2] and mgr.block_table("a") == [0, 1, 2]
    assert mgr.append_tokens("a", [6, 7]) == []
    assert cached(mgr) == [(0, (1, 2, 3, 4))]
    assert mgr.append_tokens("a", [8]) == []
    assert cached(mgr) == [(0, (1, 2, 3, 4)), (1, (5, 6, 7, 8))]
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9]).num_gpu_tokens == 8
    mgr.remove_sequence("a")
    assert mgr.num_free_gpu_blocks == 6 and cached(mgr) == [(0, (1, 2, 3, 4)),
                                                            (1, (5, 6, 7, 8))]
    mgr.check_invariants()


def test_an_id_removed_and_admitted_again_in_one_step_stores_only_the_new_request() -> None:
    """Inside a step, ``a`` removed then admitted anew: the step's end stores the new
    request's blocks, never the old one's under its id.

    ::

        old a  |1 2 3 4|5 6 7 8|9|   blocks 0 1 stored at admission, 2 freed at removal
        new a  |9 9 9 9|9|           blocks 2 3; end_step stores block 2 (9 9 9 9)
    """
    mgr = make_small()
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    mgr.begin_step()
    mgr.remove_sequence("a")
    assert mgr.add_sequence(SequenceSpec("a", [9, 9, 9, 9, 9])).block_ids == (2, 3)
    assert cached(mgr) == [(0, (1, 2, 3, 4)), (1, (5, 6, 7, 8))]
    mgr.end_step()
    assert cached(mgr) == [(0, (1, 2, 3, 4)), (1, (5, 6, 7, 8)), (2, (9, 9, 9, 9))]
    mgr.check_invariants()


def test_a_failed_pass_after_accepted_drafts_uncaches_only_that_steps_block() -> None:
    """Drafts accepted in a step fill block 1, stored at ``end_step``; the step's pass
    fails: block 1 leaves the cache, block 0 (an earlier step's) stays, every block free.

    ::

        tokens  |1 2 3 4|5 6 7 8|9 . . .|   step: append 6 7 8 9 into lookahead blocks
        table   [ 0     ][ 1     ][ 2     ]   compute_failed(a) -> cached: block 0 only
    """
    mgr = make_small()
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5]))
    assert mgr.reserve_lookahead("a", 4) == [2]
    mgr.begin_step()
    mgr.append_tokens("a", [6, 7, 8, 9])
    mgr.end_step()
    assert cached(mgr) == [(0, (1, 2, 3, 4)), (1, (5, 6, 7, 8))]
    assert mgr.compute_failed(["a"]) == ["a"]
    assert cached(mgr) == [(0, (1, 2, 3, 4))] and mgr.num_free_gpu_blocks == 6
    mgr.check_invariants()
