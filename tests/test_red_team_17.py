"""Red team, seventeenth pass: the modules no pass aimed at, reached the way an engine
developer or an adversary reaches them (failures reported late, imports racing the
requests that compute the same prefix, copied samplers, ...). Each test fails on the code
before its fix and asserts the exact refusal (or the exact state after the fault, the books
recounted) and that nothing else changed."""

from __future__ import annotations

import re

import pytest

from kvtier import CacheConfig, KVCacheManager, OpKind, SequenceSpec, Tier, TransferPlan

TPB = 4
PROMPT = list(range(9))  # two full blocks and one token


def make_manager(num_gpu_blocks: int = 4, num_host_blocks: int = 4) -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=num_gpu_blocks,
                                      num_host_blocks=num_host_blocks), clock=lambda: 0.0)


def prompt_on_host(mgr: KVCacheManager) -> TransferPlan:
    """Cache ``PROMPT``'s two blocks, push them to the host (host slots 0, 1) and return the
    plan of those two offloads (taken, not yet reported)."""
    mgr.add_sequence(SequenceSpec("a", PROMPT, priority=50))
    mgr.remove_sequence("a")
    mgr.add_sequence(SequenceSpec("big", list(range(200, 216))))  # pushes a's to the host
    mgr.remove_sequence("big")
    plan = mgr.take_plan()
    assert [(op.kind, op.src_slot, op.dst_slot) for op in plan.ops] == [
        (OpKind.OFFLOAD, 0, 0), (OpKind.OFFLOAD, 1, 1)]
    assert mgr.lookup(PROMPT).num_host_tokens == 8
    return plan


# ---- transfer_failed reported late: the copies recorded since read the garbage ------------


def test_a_late_failed_offload_aborts_the_request_onboarding_its_garbage() -> None:
    """Both offloads of a plan fail, reported after ``q`` was admitted onto those host
    blocks (its onboards recorded, not taken yet: the report is still of the latest plan).
    The report looked at the failed plan only: it found the host slots free (onboarding had
    moved the blocks to the GPU), aborted nobody, and ``q`` read the garbage the onboards
    copied. Now the ops recorded since the plan was taken run the damage on: ``q``, whose
    GPU blocks the onboards fill from the bad host slots, is aborted, and its prefix leaves
    the cache."""
    mgr = make_manager()
    plan = prompt_on_host(mgr)
    assert mgr.add_sequence(SequenceSpec("q", PROMPT)).num_onboarded_tokens == 8
    assert mgr.transfer_failed(plan, [0, 1]) == ["q"]
    mgr.check_invariants()
    assert not mgr.has_sequence("q")
    assert mgr.lookup(PROMPT).num_tokens == 0
    assert mgr.stats.num_failed_transfers == 2


def test_a_late_failed_onboard_drops_the_host_copy_offloaded_since() -> None:
    """``q``'s first onboard fails (GPU slot 2 is garbage), reported after ``q`` finished
    (its blocks stored on the GPU) and after ``big2`` pushed them to the host (offloads
    recorded, not taken). The host copy of the garbage stayed cached: a later request would
    onboard it. Now the offload of the bad GPU block makes its host copy bad: the prefix
    leaves every tier."""
    mgr = make_manager()
    prompt_on_host(mgr)
    assert mgr.add_sequence(SequenceSpec("q", PROMPT)).num_onboarded_tokens == 8
    plan = mgr.take_plan()
    onboards = [i for i, op in enumerate(plan.ops) if op.kind is OpKind.ONBOARD]
    assert [(plan.ops[i].src_slot, plan.ops[i].dst_slot) for i in onboards] == [(0, 2), (1, 3)]
    mgr.remove_sequence("q")
    assert mgr.add_sequence(SequenceSpec("big2", list(range(300, 316)))).admitted
    assert mgr.lookup(PROMPT).num_host_tokens == 8  # q's blocks went to the host
    # big2 computes into GPU slot 2 itself; it is aborted too (the manager cannot tell a
    # slot handed out again since the plan from one still holding its garbage): recompute.
    assert mgr.transfer_failed(plan, [onboards[0]]) == ["big2"]
    mgr.check_invariants()
    assert mgr.lookup(PROMPT).num_tokens == 0
    assert mgr.num_free_gpu_blocks == 4


def test_a_host_block_a_late_failed_offload_left_garbage_is_not_spilled() -> None:
    """The offload of ``PROMPT``'s first block fails (host slot 0 garbage); before it is
    reported, ``big2`` pushes ``big``'s blocks to the host, which drops both of ``PROMPT``'s
    host blocks to the spill log (a write-back remote tier reads them before the next plan
    runs). The report left the garbage's entry there: the remote store got it under the
    block's hash, for every engine to fetch. Now the report takes it out of the log; the
    good block's entry stays."""
    mgr = offloaded_not_taken()
    plan = mgr.take_plan()
    assert [(op.kind, op.src_slot, op.dst_slot) for op in plan.ops] == [
        (OpKind.OFFLOAD, 0, 0), (OpKind.OFFLOAD, 1, 1)]
    _, second = (b.block_hash for b in mgr.cached_blocks() if b.tier == Tier.HOST)
    assert mgr.drain_spills() == []
    assert mgr.add_sequence(SequenceSpec("big2", list(range(300, 316)))).admitted
    assert mgr.transfer_failed(plan, [0]) == []
    mgr.check_invariants()
    assert mgr.drain_spills() == [(second, 1)]
    assert mgr.lookup(PROMPT).num_tokens == 0


@pytest.mark.parametrize(("index", "message"), [
    (True, "failed_indices[1] is True, a bool, not an integer"),
    # An int subclass (as NumPy's ints are integers) is read as the int it is now (red
    # team 33c, kvtier.counts): a float is not one.
    (1.0, "failed_indices[1] is 1.0, a float, not an integer"),
    (2, "failed op index 2 is not an index into the plan's 2 ops"),
])
def test_a_failed_index_of_another_type_is_refused_naming_its_type(index: object,
                                                                    message: str) -> None:
    """An index in range of another integer type (NumPy's ``int64`` from ``nonzero``, a
    bool) was refused as "not an index into the plan's 2 ops": the wrong fault named. Now
    the message names its position and type; nothing changes either way."""
    mgr = make_manager()
    plan = prompt_on_host(mgr)
    before = (mgr.cached_blocks(), mgr.version, mgr.stats.num_failed_transfers)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        mgr.transfer_failed(plan, [1, index])  # type: ignore[list-item]
    mgr.check_invariants()
    assert (mgr.cached_blocks(), mgr.version, mgr.stats.num_failed_transfers) == before
    assert mgr.transfer_failed(plan, [1]) == []  # still reportable


# ---- a bad block of a claimed run: its successors were computed from it ------------------

SHARED = [1, 2, 3, 9, 10, 11, 12, 13, 14]  # reuses 3 tokens of [1, 2, 3, 4] by a copy


def twins_copying_a_partial_block() -> tuple[KVCacheManager, TransferPlan]:
    """``a`` and ``b``, admitted in one step with one prompt, each copy the first 3 tokens
    of cached block 0 into a block of their own (ops 0 and 1) and compute the rest. ``a``
    stores its blocks first (slots 1, 2); ``b``'s (4, 5) are its private duplicates::

        cached run  [1 2 3 9 | 10 11 12 13]   slots 1, 2 (a's)
        b's table   slots 4, 5, 6             (its own copies of both, and its tail)
    """
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                     num_host_blocks=0, enable_partial_reuse=True),
                         clock=lambda: 0.0)
    mgr.add_sequence(SequenceSpec("c", [1, 2, 3, 4, 5]))
    mgr.remove_sequence("c")
    mgr.begin_step()
    a, b = mgr.add_sequence_batch([SequenceSpec("a", SHARED), SequenceSpec("b", SHARED)])
    assert (tuple(a.block_ids), tuple(b.block_ids)) == ((1, 2, 3), (4, 5, 6))
    plan = mgr.end_step()
    assert [(op.kind, op.src_slot, op.dst_slot) for op in plan.ops] == [
        (OpKind.COPY, 0, 1), (OpKind.COPY, 0, 4)]
    assert [b.slot for b in mgr.cached_blocks()] == [0, 1, 2]
    return mgr, plan


def test_a_late_failed_copy_leaves_no_block_computed_from_it_cached() -> None:
    """``a``'s copy failed (slot 1 garbage, and slot 2, which its forward pass computed
    from it), reported after ``a`` finished. ``b`` holds good copies of both: the report
    gave the run ``b``'s copy of block 0 only, leaving ``a``'s block 1 (garbage) cached
    after it, for every later request to reuse. Now the run takes ``b``'s copies of both,
    and ``a``'s slots are free."""
    mgr, plan = twins_copying_a_partial_block()
    mgr.remove_sequence("a")
    free = mgr.num_free_gpu_blocks
    assert mgr.transfer_failed(plan, [0]) == []
    mgr.check_invariants()
    assert [(b.slot, b.tokens) for b in mgr.cached_blocks()] == [
        (0, (1, 2, 3, 4)), (4, (1, 2, 3, 9)), (5, (10, 11, 12, 13))]
    assert mgr.block_table("b") == [4, 5, 6]
    assert mgr.num_free_gpu_blocks == free + 2  # slots 1 and 2


def test_a_failed_copy_reported_after_an_empty_step_drops_what_was_computed_from_it() -> None:
    """The same failure, reported after one more step that copied nothing (its empty plan
    leaves this one the latest): ``a`` is aborted, but its valid tokens had moved past the
    blocks computed from the garbage, so they were not marked bad and block 1 stayed. Now
    the run takes ``b``'s copies of both."""
    mgr, plan = twins_copying_a_partial_block()
    mgr.begin_step()
    mgr.append_tokens("a", [7])
    assert mgr.end_step().ops == ()
    assert mgr.transfer_failed(plan, [0]) == ["a"]
    mgr.check_invariants()
    assert [(b.slot, b.tokens) for b in mgr.cached_blocks()] == [
        (0, (1, 2, 3, 4)), (4, (1, 2, 3, 9)), (5, (10, 11, 12, 13))]
    assert mgr.block_table("b") == [4, 5, 6]


def test_a_run_computed_below_a_late_failed_copy_leaves_the_cache() -> None:
    """``a`` decodes a third block (slot 3, from its garbage, stored below the run) in
    steps that copy nothing, then finishes; then its failed copy is reported. The run took
    ``b``'s copies, but the block below it, computed from the garbage and held by no live
    request, stayed cached. Now it leaves: what stays is what ``b`` computed."""
    mgr, plan = twins_copying_a_partial_block()
    for token in (15, 16, 17):
        mgr.begin_step()
        mgr.append_tokens("a", [token])
        assert mgr.end_step().ops == ()
    assert [b.slot for b in mgr.cached_blocks()] == [0, 1, 2, 3]
    mgr.remove_sequence("a")
    assert mgr.transfer_failed(plan, [0]) == []
    mgr.check_invariants()
    assert [(b.slot, b.tokens) for b in mgr.cached_blocks()] == [
        (0, (1, 2, 3, 4)), (4, (1, 2, 3, 9)), (5, (10, 11, 12, 13))]
    assert mgr.lookup(SHARED[:8] + [14, 15, 16, 17, 0]).num_tokens == 8


# ---- host slots an offload not yet taken will write ---------------------------------------


def offloaded_not_taken() -> KVCacheManager:
    """``PROMPT``'s two blocks offloaded to host slots 0 and 1 (a full host of 2), the
    offloads recorded and not yet taken: the slots get their KV when that plan runs."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=4,
                                     num_host_blocks=2), clock=lambda: 0.0)
    mgr.record_spills()
    mgr.add_sequence(SequenceSpec("a", PROMPT))
    mgr.remove_sequence("a")
    mgr.add_sequence(SequenceSpec("big", list(range(200, 216))))  # pushes a's to the host
    mgr.remove_sequence("big")
    assert mgr.lookup(PROMPT).num_host_tokens == 8
    return mgr


def test_an_import_never_takes_a_host_slot_an_offload_not_yet_taken_writes() -> None:
    """An import made host room by dropping ``PROMPT``'s host blocks, whose offloads were
    recorded and not yet taken, and handed out their slots: the caller wrote the fetched
    KV into them at once, and the offloads overwrote it when the plan ran (the imported
    prefix then held ``PROMPT``'s KV, served as its own). Now those slots go back to the
    free list: the import takes what else is free (nothing here), and the plan is as it
    was."""
    mgr = offloaded_not_taken()
    other = list(range(500, 509))
    assert mgr.import_blocks(other, 2) == []
    mgr.check_invariants()
    assert mgr.lookup(other).num_tokens == 0
    assert [(op.kind, op.src_slot, op.dst_slot) for op in mgr.take_plan().ops] == [
        (OpKind.OFFLOAD, 0, 0), (OpKind.OFFLOAD, 1, 1)]
    assert mgr.import_blocks(other, 2) == [0, 1]  # once the plan is taken: it runs first
    mgr.check_invariants()


def test_a_block_dropped_before_its_offload_was_taken_is_not_spilled_after_a_drain() -> None:
    """A drain between recording an offload and dropping its host block forgot that the
    slot's KV was still to come: the drop logged the slot, and a write-back tier wrote its
    old content (another block's KV, or nothing) to the store under the block's hash. Now
    the slot stays pending until the plan is taken: nothing is spilled."""
    mgr = offloaded_not_taken()
    assert mgr.drain_spills() == []
    mgr.import_blocks(list(range(500, 509)), 2)  # drops PROMPT's host blocks for room
    assert mgr.lookup(PROMPT).num_tokens == 0
    assert mgr.drain_spills() == []


def test_an_import_never_takes_a_host_slot_an_onboard_not_yet_taken_reads() -> None:
    """``q`` onboards ``PROMPT``'s blocks from host slots 0 and 1 (recorded, not taken),
    which frees them; an import took slot 1 (slot 0 an offload writes): the caller wrote
    the fetched KV there at once, and the onboard read it into ``q``'s GPU block when the
    plan ran: ``q`` computed on another prompt's KV. Now neither slot is handed out."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=4,
                                     num_host_blocks=4), clock=lambda: 0.0)
    prompt_on_host(mgr)
    assert mgr.add_sequence(SequenceSpec("q", PROMPT)).num_onboarded_tokens == 8
    other = list(range(500, 509))
    assert mgr.import_blocks(other, 2) == []
    mgr.check_invariants()
    ops = [(op.kind, op.src_tier, op.src_slot, op.dst_tier, op.dst_slot)
           for op in mgr.take_plan().ops]
    assert (OpKind.ONBOARD, Tier.HOST, 0, Tier.GPU, 2) in ops
    assert (OpKind.ONBOARD, Tier.HOST, 1, Tier.GPU, 3) in ops


def test_a_late_compute_failure_aborts_the_request_copying_its_garbage() -> None:
    """``r``'s pass fails in a step; before it is reported, ``s`` is admitted (outside a
    step) reusing 3 tokens of ``r``'s first block by a partial copy (recorded, not taken).
    The report aborted ``r`` only: ``s`` kept its copy of the garbage, and its block was
    cached for others. Now the copy spreads the damage: ``s`` is aborted too, and nothing
    of either stays cached."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                     num_host_blocks=0, enable_partial_reuse=True),
                         clock=lambda: 0.0)
    mgr.begin_step()
    assert tuple(mgr.add_sequence(SequenceSpec("r", [1, 2, 3, 4, 5])).block_ids) == (0, 1)
    assert mgr.end_step().ops == ()
    s = mgr.add_sequence(SequenceSpec("s", [1, 2, 3, 9, 9]))
    assert (s.num_reused_tokens, tuple(s.block_ids)) == (3, (2, 3))
    assert mgr.compute_failed(["r"]) == ["r", "s"]
    mgr.check_invariants()
    assert mgr.cached_blocks() == []
    assert mgr.num_free_gpu_blocks == 8
    assert mgr.stats.num_failed_computes == 2
