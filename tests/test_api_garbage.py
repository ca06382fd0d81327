"""Every public method of the manager and the scheduler, each argument in turn replaced by
a value of the wrong type or range: the call is refused with ValueError, TypeError,
KeyError or RuntimeError and changes nothing (``bad_input_helpers.snapshot``), or it is
accepted and the books still balance. Never AttributeError, OverflowError, IndexError..."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bad_input_helpers import make_manager, snapshot
from kvtier import (
    KVCacheManager,
    OpKind,
    Request,
    ScheduledStep,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
    Tier,
    TransferOp,
    TransferPlan,
)

REFUSED = (ValueError, TypeError, KeyError, RuntimeError)

GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, -(10**400), 2**63, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), st.binary(max_size=3),
    st.lists(st.integers(-2, 9), max_size=3), st.tuples(st.text(max_size=1)),
    st.dictionaries(st.text(max_size=1), st.integers(0, 3), max_size=2),
    st.sampled_from([object(), complex(1, 2), frozenset({1}), range(3), iter([1, 2]),
                     SequenceSpec("live", [1, 2, 3]), Request("x", [1], 1)]),
)

SPEC = SequenceSpec("new", [1, 2, 3, 4, 5, 6, 7, 0, 1])
FOREIGN_PLAN = TransferPlan([TransferOp(OpKind.ONBOARD, Tier.HOST, 0, Tier.GPU, 0, 4)])

# method name -> valid arguments; each test replaces one of them with garbage.
MANAGER_CALLS: dict[str, tuple[object, ...]] = {
    "lookup": ([1, 2, 3, 4, 5], None, None, ()),
    "lookup_spec": (SPEC,),
    "missing_block_hashes": ([1, 2, 3, 4, 5, 6, 7, 0, 1], None, None),
    "hint_waiting": ([SPEC],),
    "add_sequence": (SPEC,),
    "add_sequence_batch": ([SPEC],),
    "schedule_prefill": ("chunked", 2),
    "num_unscheduled_tokens": ("chunked",),
    "num_blocks_to_append": ("live", 3),
    "block_table": ("live",),
    "append_tokens": ("live", [1, 2]),
    "append_token_batch": ([("live", 3)],),
    "append_token_columns": (["live"], [3]),
    "reserve_lookahead": ("live", 5),
    "import_blocks": ([3, 3, 3, 3, 3, 3, 3, 3, 3], 2, None, None),
    "remove_sequence": ("live", True),
    "transfer_failed": (TransferPlan([]), []),
    "compute_failed": (["live"],),
}
POLICIES = ["priority-lru", "kvtier-predict-cost"]


def call_with_garbage(target: object, name: str, args: tuple[object, ...], index: int,
                      junk: object) -> Callable[[], object]:
    call: Callable[..., object] = getattr(target, name)
    bad = list(args)
    bad[index] = junk
    return lambda: call(*bad)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(MANAGER_CALLS)), data=st.data(),
       policy=st.sampled_from(POLICIES), junk=GARBAGE)
def test_manager_methods_refuse_garbage_changing_nothing(name: str, data: st.DataObject,
                                                         policy: str, junk: object) -> None:
    """A manager method with one argument replaced by garbage: refused (ValueError,
    TypeError, KeyError, RuntimeError) changing nothing, or accepted with the books intact."""
    mgr = make_manager(eviction_policy=policy)
    args = MANAGER_CALLS[name]
    index = data.draw(st.integers(0, len(args) - 1), label="argument")
    check_call(mgr, call_with_garbage(mgr, name, args, index, junk))


def check_call(mgr: KVCacheManager, call: Callable[[], object]) -> None:
    before = snapshot(mgr)
    try:
        call()
    except REFUSED:
        assert snapshot(mgr) == before, "state changed by a refused call"
        return
    mgr.check_invariants()


def make_scheduler() -> tuple[KVCacheManager, Scheduler, Any]:
    """A scheduler with one request decoding and one waiting, and its unapplied step."""
    mgr = make_manager()
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=16))
    sched.add_request(Request("a", [1, 2, 3, 4, 5], 4))
    sched.update(sched.step(), {"a": 7})
    sched.add_request(Request("b", [2, 2, 2, 2, 2, 2], 4))
    return mgr, sched, sched.step()


def scheduler_state(mgr: KVCacheManager, sched: Scheduler) -> tuple[object, ...]:
    return (snapshot(mgr), [r.request_id for r in sched.waiting], list(sched.running),
            [(r.output, r.num_computed_tokens) for r in sched.running.values()])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), junk=GARBAGE)
def test_scheduler_methods_refuse_garbage_changing_nothing(data: st.DataObject,
                                                           junk: object) -> None:
    """update, requeue_failed and add_request with one argument replaced by garbage:
    refused changing neither queue, any request's progress nor the manager; or accepted,
    after which the run still ends with every request finished and the books balanced."""
    mgr, sched, step = make_scheduler()
    calls: dict[str, tuple[object, ...]] = {
        "update": (step, {"a": 8, "b": 9}, ()),
        "requeue_failed": (step, ["b"]),
        "add_request": (Request("c", [4, 4, 4], 2),),
    }
    name = data.draw(st.sampled_from(sorted(calls)), label="method")
    index = data.draw(st.integers(0, len(calls[name]) - 1), label="argument")
    before = scheduler_state(mgr, sched)
    try:
        result = call_with_garbage(sched, name, calls[name], index, junk)()
    except REFUSED:
        assert scheduler_state(mgr, sched) == before, "state changed by a refused call"
        sched.update(step, {"a": 8, "b": 9})
    else:
        if name == "requeue_failed":
            assert isinstance(result, ScheduledStep)
            sched.update(result, {"a": 8, "b": 9})
        elif name == "add_request":
            sched.update(step, {"a": 8, "b": 9})
    for _ in range(40):
        if not sched.has_unfinished():
            break
        step = sched.step()
        sampled = {c.request_id: 5 for c in step.context_chunks}
        sampled.update({rid: 6 for rid in step.decode_request_ids})
        sched.update(step, sampled)
        mgr.check_invariants()
    assert not sched.has_unfinished() and mgr.num_sequences == 2  # live, chunked
    assert math.isfinite(mgr.stats.token_hit_rate)
