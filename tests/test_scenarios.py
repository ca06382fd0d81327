"""Scenario tests S1, S2, S3, S5 of the background: exact block ids and exact reuse.

Each shows the sequential ``lookup`` + ``add_sequence`` loop losing reuse it was promised,
and ``add_sequence_batch`` keeping every promise. Common: 4-token blocks, 6 GPU blocks.
"""

from __future__ import annotations

from typing import Any

from kvtier import CacheConfig, KVCacheManager, OpKind, SequenceSpec, Tier, TransferOp

C = [1, 1, 1, 1]
B = [2, 2, 2, 2]


def make_manager(num_host_blocks: int = 0, partial: bool = False) -> KVCacheManager:
    """A 6-block GPU pool with 4-token blocks."""
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=6,
                                      num_host_blocks=num_host_blocks,
                                      enable_partial_reuse=partial))


def admit_and_release(mgr: KVCacheManager, rid: str, tokens: list[int], **kw: Any) -> None:
    """Admit one request and release it at once, so its full blocks stay cached."""
    assert mgr.add_sequence(SequenceSpec(rid, tokens, **kw)).admitted
    mgr.remove_sequence(rid)
    mgr.check_invariants()


def setup_s1() -> KVCacheManager:
    """Host holds C (older) then B; the GPU is full of cached, offloadable filler blocks.

        host: [C h0 | B h1]           GPU: [F0..F5] one run, priority 35
    """
    mgr = make_manager(num_host_blocks=2)
    admit_and_release(mgr, "c", C + [9])
    admit_and_release(mgr, "f1", list(range(100, 124)), priority=0)  # pushes C to host
    admit_and_release(mgr, "b", B + [9])  # drops two priority-0 fillers
    admit_and_release(mgr, "f2", list(range(200, 224)))  # pushes B to host
    return mgr


B12 = B + list(range(50, 58))
C12 = C + list(range(60, 68))


def host_op(kind: OpKind, src: int, dst: int) -> TransferOp:
    src_tier, dst_tier = (Tier.GPU, Tier.HOST) if kind is OpKind.OFFLOAD else (Tier.HOST, Tier.GPU)
    return TransferOp(kind, src_tier, src, dst_tier, dst, 4)


def test_s1_sequential_add_loses_host_reuse() -> None:
    """S1: onboarding B offloads a filler into C's host slot, so C computes 12 tokens."""
    mgr = setup_s1()
    promised = [mgr.lookup(B12).num_tokens, mgr.lookup(C12).num_tokens]
    assert promised == [4, 4]  # 8 + 8 computed tokens: exactly MNT 16
    mgr.take_plan()
    b = mgr.add_sequence(SequenceSpec("B", B12))
    assert (b.num_reused_tokens, b.block_ids) == (4, (5, 2, 3))
    # Onboarding B took GPU slot 5; its filler went to host slot 0, where C was.
    assert mgr.take_plan().ops[:2] == (
        host_op(OpKind.OFFLOAD, 5, 0), host_op(OpKind.ONBOARD, 1, 5))
    c = mgr.add_sequence(SequenceSpec("C", C12))
    assert c.num_reused_tokens == 0  # promised 4: C computes 12, the step computes 20 > 16
    mgr.check_invariants()


def test_s1_batch_keeps_every_promise() -> None:
    """S1: both host blocks are claimed first; onboarding drops fillers instead of C."""
    mgr = setup_s1()
    mgr.take_plan()
    b, c = mgr.add_sequence_batch([SequenceSpec("B", B12), SequenceSpec("C", C12)])
    assert (b.num_reused_tokens, b.num_onboarded_tokens, b.block_ids) == (4, 4, (5, 2, 3))
    assert (c.num_reused_tokens, c.num_onboarded_tokens, c.block_ids) == (4, 4, (1, 4, 0))
    plan = mgr.take_plan()
    assert [op for op in plan.ops if op.kind is OpKind.ONBOARD] == [
        host_op(OpKind.ONBOARD, 1, 5), host_op(OpKind.ONBOARD, 0, 1)]
    # No filler was offloaded into a claimed host slot before its onboarding read it.
    read_at = {op.src_slot: i for i, op in enumerate(plan.ops) if op.kind is OpKind.ONBOARD}
    for i, op in enumerate(plan.ops):
        if op.kind is OpKind.OFFLOAD and op.dst_slot in read_at:
            assert i > read_at[op.dst_slot]
    mgr.check_invariants()


def setup_s2() -> KVCacheManager:
    """No host tier. C's block is the oldest cached block; D0..D4 fill the rest.

        GPU LRU front -> back: C(0), D4(5), D3(4), D2(3), D1(2), D0(1)
    """
    mgr = make_manager()
    admit_and_release(mgr, "c", C + [9])
    admit_and_release(mgr, "d", list(range(100, 120)))
    return mgr


def test_s2_sequential_miss_evicts_promised_prefix() -> None:
    """S2: B is a miss; its allocation takes C's cached prefix from the LRU front."""
    mgr = setup_s2()
    assert mgr.lookup(C + [8] * 8).num_tokens == 4
    assert mgr.add_sequence(SequenceSpec("B", [7] * 12)).block_ids == (4, 5, 0)
    c = mgr.add_sequence(SequenceSpec("C", C + [8] * 8))
    assert (c.num_reused_tokens, c.block_ids) == (0, (1, 2, 3))


def test_s2_batch_claims_prefix_before_allocating() -> None:
    """S2: C's prefix is claimed in phase 1, so B's allocation evicts D's tail instead."""
    mgr = setup_s2()
    b, c = mgr.add_sequence_batch([SequenceSpec("B", [7] * 12), SequenceSpec("C", C + [8] * 8)])
    assert b.block_ids == (3, 4, 5)
    assert (c.num_reused_tokens, c.block_ids) == (4, (0, 1, 2))
    mgr.check_invariants()


def setup_s3() -> KVCacheManager:
    """Partial reuse on, copy on. X=[1 2 3 4] with child Y=[5 6 7 8] (oldest), then D0..D3.

        root ─ X(0) ─ Y(1)        root ─ D0(2) D1(3) D2(4) D3(5)
    """
    mgr = make_manager(partial=True)
    admit_and_release(mgr, "x", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit_and_release(mgr, "d", list(range(100, 116)))
    return mgr


A3 = [1, 2, 20, 21, 22]  # its first 2 tokens match X, which has a child: copy, not in place


def test_s3_sequential_miss_evicts_partial_source() -> None:
    """S3: X has no refs but a child; B's allocation evicts it before A copies from it."""
    mgr = setup_s3()
    assert mgr.lookup(A3).num_partial_tokens == 2
    assert mgr.add_sequence(SequenceSpec("B", [7] * 12)).block_ids == (5, 0, 1)
    a = mgr.add_sequence(SequenceSpec("A", A3))
    assert a.num_reused_tokens == 0


def test_s3_batch_protects_partial_source_until_copied() -> None:
    """S3: the partial source is claimed in phase 1 and copied before anyone may evict it."""
    mgr = setup_s3()
    mgr.take_plan()
    b, a = mgr.add_sequence_batch([SequenceSpec("B", [7] * 12), SequenceSpec("A", A3)])
    assert b.block_ids == (4, 5, 1)  # Y and D's tail; X (slot 0) is protected
    # A's partial block (slot 3) gets X's first 2 tokens; then X is released, and A's
    # second block may take X's slot: the copy reads it first, in plan order.
    assert (a.num_reused_tokens, a.block_ids) == (2, (3, 0))
    assert mgr.take_plan().ops == (TransferOp(OpKind.COPY, Tier.GPU, 0, Tier.GPU, 3, 2),)
    assert mgr.stats.num_partial_copies == 1
    mgr.check_invariants()


def test_s5_shared_prefix_claimed_once_referenced_twice() -> None:
    """S5: two requests of one batch share a cached prefix: both credited, one block, 2 refs."""
    mgr = make_manager()
    admit_and_release(mgr, "p", C + B + [9])
    before = mgr.num_free_gpu_blocks
    x, y = mgr.add_sequence_batch([SequenceSpec("x", C + B + [3, 3]),
                                   SequenceSpec("y", C + B + [4, 4, 4])])
    assert (x.num_reused_tokens, x.block_ids) == (8, (0, 1, 2))
    assert (y.num_reused_tokens, y.block_ids) == (8, (0, 1, 3))
    assert [b.tier for b in mgr.cached_blocks()] == [Tier.GPU, Tier.GPU]  # slots 0 and 1
    assert mgr.num_free_gpu_blocks == before - 4  # 2 shared + 2 private
    mgr.check_invariants()
