"""Red team 33c: the core's follow-ups of 31d.

``check_invariants`` recounts the soft claims' flags (the waiting queue's hint) against the
evictor and the hint; counts and ids accept any integral ``operator.index`` takes, never a
bool or a float; request ids are ``str`` at the scheduler's edge as at the manager's; sizes
past ``MAX_BLOCKS`` are refused naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from kvtier import (
    CacheConfig,
    KVCacheManager,
    MultimodalItem,
    Request,
    Retention,
    RetentionRange,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
)
from kvtier.blocks import cdiv
from kvtier.policies import KvtierPredict
from kvtier.radix import Node


def make_manager(num_gpu_blocks: int = 8) -> KVCacheManager:
    """A GPU-only manager of 4-token blocks under kvtier's own policy (it ranks soft claims)."""
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu_blocks),
                          clock=lambda: 0.0, policy=KvtierPredict())


def hinted_manager() -> tuple[KVCacheManager, Node, Node]:
    """A manager with two cached runs, A = [1]*8 hinted by a waiting request, B = [2]*8
    not; returns it with A's and B's runs.

        root ─ A [1 1 1 1 | 1 1 1 1]  soft-claimed (waiting "w" starts with it)
             └ B [2 2 2 2 | 2 2 2 2]  not claimed
    """
    mgr = make_manager()
    for rid, tokens in (("a", [1] * 8 + [9]), ("b", [2] * 8 + [9])):
        assert mgr.add_sequence(SequenceSpec(rid, tokens)).admitted
        mgr.remove_sequence(rid)
    mgr.hint_waiting([SequenceSpec("w", [1] * 8 + [5, 5])])
    runs = {node.tokens[0]: node for node in mgr._cache.nodes()}
    assert runs[1].soft_claimed and not runs[2].soft_claimed
    mgr.check_invariants()
    return mgr, runs[1], runs[2]


# ---- 1. the soft claims' flags recounted -----------------------------------------------


def test_a_flag_the_evictor_does_not_track_is_seen() -> None:
    """A run flagged soft-claimed behind the evictor's back (never released) is named."""
    mgr, _, b = hinted_manager()
    b.soft_claimed = True
    with pytest.raises(AssertionError, match="soft-claimed but the evictor does not track"):
        mgr.check_invariants()


def test_a_flag_on_a_run_no_hint_names_is_seen() -> None:
    """A run flagged and tracked, but on no path the hint claimed, is named."""
    mgr, _, b = hinted_manager()
    b.soft_claimed = True
    mgr._cache.evictor.split_off(b)  # tracked as a head split off a claimed run would be
    with pytest.raises(AssertionError, match="lies on no path the waiting queue's hint"):
        mgr.check_invariants()


def test_a_claimed_run_that_lost_its_flag_is_seen() -> None:
    """A run on a claimed path whose flag was cleared (no protection) is named."""
    mgr, a, _ = hinted_manager()
    a.soft_claimed = False
    with pytest.raises(AssertionError, match="not soft-claimed"):
        mgr.check_invariants()


def test_a_released_hint_leaves_no_flag() -> None:
    """A later hint without the request releases the claim; a flag put back is seen."""
    mgr, a, _ = hinted_manager()
    mgr.hint_waiting([])
    assert not a.soft_claimed
    mgr.check_invariants()
    a.soft_claimed = True
    with pytest.raises(AssertionError, match="soft-claimed"):
        mgr.check_invariants()


# ---- 2. counts and ids: any integral operator.index takes, one rule ---------------------


class Index:
    """A caller's integer type: only ``__index__``, as ``operator.index`` reads it."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def integer_kinds(value: int) -> list[object]:
    """``value`` as the integer kinds callers pass: int, NumPy ints, a custom ``__index__``."""
    return [value, np.int64(value), np.uint32(value), np.int8(value), Index(value)]


NOT_INTEGERS = [3.0, np.float64(3.0), True, np.True_, "3", None, [3], Index(-1)]


def prefilled_manager() -> KVCacheManager:
    """A manager with request "a" of 9 tokens admitted whole (3 blocks of 4: 12 slots)."""
    mgr = make_manager(num_gpu_blocks=16)
    assert mgr.add_sequence(SequenceSpec("a", list(range(9)))).admitted
    return mgr


@pytest.mark.parametrize("make", integer_kinds(3), ids=repr)
def test_manager_counts_take_any_integer(make: Any) -> None:
    """num_blocks_to_append, reserve_lookahead and schedule_prefill take a NumPy or
    ``__index__`` integer as the int it is (were ValueError 'must be an int')."""
    mgr = prefilled_manager()
    assert mgr.num_blocks_to_append("a", make) == 0  # 9 + 3 = 12 tokens: 3 blocks
    assert mgr.reserve_lookahead("a", make) == []
    mgr.check_invariants()
    mgr2 = make_manager(num_gpu_blocks=16)
    assert mgr2.add_sequence(SequenceSpec("b", list(range(9)), num_new_tokens=4,
                                          num_reserved_blocks=2)).admitted
    mgr2.schedule_prefill("b", make)  # 4 + 3 = 7 of 9 scheduled
    assert mgr2.num_unscheduled_tokens("b") == 2
    mgr2.check_invariants()


@pytest.mark.parametrize("bad", NOT_INTEGERS, ids=repr)
def test_manager_counts_refuse_the_rest_alike(bad: Any) -> None:
    """A bool, a float (3.0 too), a str, None: one ValueError naming the field, nothing
    changed."""
    mgr = prefilled_manager()
    table = mgr.block_table("a")
    for call in (lambda: mgr.num_blocks_to_append("a", bad),
                 lambda: mgr.reserve_lookahead("a", bad),
                 lambda: mgr.schedule_prefill("a", bad)):
        with pytest.raises(ValueError, match=r"^num_tokens must be an integer >= [01], got"):
            call()
    assert mgr.block_table("a") == table
    mgr.check_invariants()


@pytest.mark.parametrize("make", integer_kinds(2), ids=repr)
def test_configs_and_specs_keep_plain_ints(make: Any) -> None:
    """Every count of CacheConfig, SchedulerConfig, SequenceSpec, Request, MultimodalItem
    and the retention types takes any integer and keeps it as a plain int."""
    cfg = CacheConfig(tokens_per_block=make, num_gpu_blocks=make, num_host_blocks=make,
                      max_events=make, default_priority=make, offload_min_priority=make)
    scfg = SchedulerConfig(max_num_tokens=make, max_batch_size=make, max_wait_steps=make,
                           max_chunk_tokens=make, num_speculative_tokens=make)
    spec = SequenceSpec("s", [1, 2, 3], lora_id=make, priority=make, num_new_tokens=make,
                        num_reserved_blocks=make)
    req = Request("r", [1, 2, 3], max_output_tokens=make, lora_id=make, priority=make)
    item = MultimodalItem(make, make, b"img")
    five: Any = Index(5)
    rng = RetentionRange(make, five, make)
    ret = Retention((), decode_priority=make, decode_start=make)
    values = [cfg.tokens_per_block, cfg.num_gpu_blocks, cfg.num_host_blocks, cfg.max_events,
              cfg.default_priority, cfg.offload_min_priority, scfg.max_num_tokens,
              scfg.max_batch_size, scfg.max_wait_steps, scfg.max_chunk_tokens,
              scfg.num_speculative_tokens, spec.lora_id, spec.priority, spec.num_new_tokens,
              spec.num_reserved_blocks, req.max_output_tokens, req.lora_id, req.priority,
              item.offset, item.length, rng.start, rng.priority, ret.decode_priority,
              ret.decode_start]
    assert [type(v) for v in values] == [int] * len(values)
    assert values == [2] * len(values)
    assert rng.end == 5 and type(rng.end) is int


@pytest.mark.parametrize(("build", "field"), [
    (lambda v: CacheConfig(num_gpu_blocks=v), "num_gpu_blocks"),
    (lambda v: CacheConfig(tokens_per_block=v), "tokens_per_block"),
    (lambda v: SchedulerConfig(max_num_tokens=v), "max_num_tokens"),
    (lambda v: SchedulerConfig(max_chunk_tokens=v), "max_chunk_tokens"),
    (lambda v: SequenceSpec("s", [1, 2], num_new_tokens=v), "num_new_tokens"),
    (lambda v: SequenceSpec("s", [1, 2], priority=v), "priority"),
    (lambda v: Request("r", [1, 2], max_output_tokens=v), "max_output_tokens"),
    (lambda v: MultimodalItem(0, v, b"img"), "MultimodalItem.length"),
    (lambda v: Retention((), decode_start=v), "decode_start"),
])
@pytest.mark.parametrize("bad", [3.0, True, np.True_, np.float32(2.0)], ids=repr)
def test_config_counts_refuse_bools_and_floats(build: Callable[[object], object],
                                               field: str, bad: Any) -> None:
    """A bool or a float (even 3.0) is refused naming the field, as before."""
    with pytest.raises(ValueError, match=f"^{field}"):
        build(bad)


def test_token_ids_take_a_custom_index_class() -> None:
    """Token ids follow the same rule (a custom ``__index__`` class, NumPy ints), in a
    spec, a lookup and an append; a bool among them is refused naming its index."""
    mgr = make_manager()
    tokens: list[Any] = [Index(1)] * 4 + [np.int16(1)] * 4 + [2]
    assert mgr.add_sequence(SequenceSpec("a", tokens)).admitted
    assert mgr.lookup([1] * 8 + [3]).num_tokens == 8
    appended: list[Any] = [Index(7), np.uint64(8)]
    assert mgr.append_tokens("a", appended) == []
    mgr.check_invariants()
    with pytest.raises(ValueError, match=r"token at index 1 must be an int in 0\.\.2\*\*63-1"):
        mgr.lookup([1, np.True_, 2])  # type: ignore[list-item]


def test_failed_indices_take_numpy_integers() -> None:
    """transfer_failed takes a NumPy index into the plan as the int it is."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=3, num_host_blocks=4))
    assert mgr.add_sequence(SequenceSpec("a", [1] * 8 + [2])).admitted
    mgr.remove_sequence("a")
    mgr.take_plan()
    assert mgr.add_sequence(SequenceSpec("b", [5] * 8 + [2])).admitted  # offloads a's blocks
    plan = mgr.take_plan()
    assert plan.ops
    assert mgr.transfer_failed(plan, [np.int64(0)]) == []
    mgr.check_invariants()
    assert mgr.lookup([1] * 8 + [2]).num_tokens == 0  # the failed offload's block is gone


# ---- 4. sizes bounded ------------------------------------------------------------------


@pytest.mark.parametrize(("call", "field"), [
    (lambda m: m.num_blocks_to_append("a", 10**30), "num_tokens"),
    (lambda m: m.reserve_lookahead("a", 2**48 + 1), "num_tokens"),
    (lambda m: m.schedule_prefill("a", np.uint64(2**63)), "num_tokens"),
    (lambda m: SchedulerConfig(max_num_tokens=10**30), "max_num_tokens"),
    (lambda m: SchedulerConfig(max_batch_size=2**48 + 1), "max_batch_size"),
    (lambda m: SchedulerConfig(max_wait_steps=10**30), "max_wait_steps"),
    (lambda m: SchedulerConfig(max_chunk_tokens=10**30), "max_chunk_tokens"),
    (lambda m: SequenceSpec("s", [1, 2], num_new_tokens=10**30), "num_new_tokens"),
    (lambda m: SequenceSpec("s", [1, 2], num_reserved_blocks=2**32 + 1),
     "num_reserved_blocks"),
    (lambda m: Request("r", [1, 2], max_output_tokens=10**30), "max_output_tokens"),
    (lambda m: m.import_blocks([1] * 8, 2**32 + 1), "num_blocks"),
])
def test_sizes_past_their_bound_are_refused(call: Callable[[KVCacheManager], object],
                                            field: str) -> None:
    """A size past MAX_COUNT (2**48 tokens) or MAX_BLOCKS (2**32 blocks) is refused naming
    the field and the bound (10**30 was accepted), nothing changed."""
    mgr = prefilled_manager()
    bound = r"must be an integer in \d+\.\.(2\*\*48|4294967296), got"
    with pytest.raises(ValueError, match=rf"^{field}( of 'r')? {bound}"):
        call(mgr)
    assert mgr.num_blocks_to_append("a", 2**48) == cdiv(9 + 2**48, 4) - 3  # the bound itself
    mgr.check_invariants()


# ---- 3. request ids: a str subclass names its str's request, in the manager too ---------


class Rid(str):
    """A caller's str subclass (as NumPy's ``str_`` is one)."""


@pytest.mark.parametrize("make_id", [np.str_, Rid], ids=["numpy", "subclass"])
def test_manager_and_scheduler_read_a_str_subclass_id_alike(make_id: Any) -> None:
    """The scheduler's hold/release/abort took NumPy's str_('a') as 'a' while every
    manager call refused it (KeyError 'unknown request_id'): now both read it as 'a', and a
    spec or request made with one holds the plain str."""
    mgr = make_manager(num_gpu_blocks=16)
    spec = SequenceSpec(make_id("a"), list(range(9)))
    assert type(spec.request_id) is str
    assert mgr.add_sequence(spec).admitted
    rid = make_id("a")
    assert mgr.has_sequence(rid)
    assert mgr.block_table(rid) == mgr.block_table("a")
    assert mgr.num_blocks_to_append(rid, 4) == 1
    assert mgr.admitted_reuse(rid).num_tokens == 0
    assert mgr.append_token_batch([(rid, 5)]) == 1  # applied
    assert mgr.append_token_columns([rid], [6]) == 1
    assert mgr.num_blocks_to_append(rid, 4) == 1  # 11 + 4 tokens: a 4th block
    mgr.begin_step()
    mgr.end_step()
    assert mgr.compute_failed([rid]) == ["a"]
    assert not mgr.has_sequence("a")
    mgr.check_invariants()

    sched = Scheduler(make_manager(num_gpu_blocks=16), SchedulerConfig(max_num_tokens=32))
    req = Request(make_id("r"), list(range(9)), 2)
    assert type(req.request_id) is str
    sched.add_request(req)
    sched.hold(make_id("r"))
    held = sched.step()
    assert not held.context_chunks  # held
    sched.update(held, {})
    sched.release(make_id("r"))
    step = sched.step()
    assert [c.request_id for c in step.context_chunks] == ["r"]
    sched.update(step, {"r": 1})
    assert sched.manager.num_blocks_to_append(make_id("r"), 3) == 0
    assert sched.abort(make_id("r")) is req
    assert not sched.manager.has_sequence(make_id("r"))
    sched.check_invariants()


@pytest.mark.parametrize("rid", [b"a", ["a"], 1, None], ids=repr)
def test_non_str_ids_are_refused_alike(rid: Any) -> None:
    """What is no str names no request: KeyError in the manager's lookups, TypeError at
    the scheduler's hold/release/abort and the manager's compute_failed, nothing changed."""
    mgr = make_manager(num_gpu_blocks=16)
    assert mgr.add_sequence(SequenceSpec("a", list(range(9)))).admitted
    assert not mgr.has_sequence(rid)
    with pytest.raises(KeyError, match="unknown request_id"):
        mgr.block_table(rid)
    with pytest.raises(TypeError, match="is not a str"):
        mgr.compute_failed([rid])
    sched = Scheduler(make_manager(), SchedulerConfig())
    for call in (sched.hold, sched.release, sched.abort):
        with pytest.raises(TypeError, match="request_id must be a str"):
            call(rid)
    assert mgr.has_sequence("a")
    mgr.check_invariants()
