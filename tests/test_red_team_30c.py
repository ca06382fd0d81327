"""Red team 30c: what a step and the manager report is what happened.

Failed copies are not counted as copies made (the manager's onboarded, offloaded and
partial-copied blocks; a torch engine's ops and bytes); the reuse a forward pass failing
after its step was applied loses is reported by the next step, and the token that pass
sampled is dropped."""

from __future__ import annotations

import pytest

from kvtier import (
    CacheConfig,
    KVCacheManager,
    OpKind,
    SequenceSpec,
    Tier,
    TransferOp,
)
from kvtier.metrics import CacheStats

G, H = Tier.GPU, Tier.HOST


def copy_counters(stats: CacheStats) -> tuple[int, int, int]:
    """(onboarded, offloaded, partial-copied) blocks."""
    return (stats.host.onboarded_blocks, stats.gpu.offloaded_blocks, stats.num_partial_copies)


def make_manager(num_gpu_blocks: int, num_host_blocks: int, partial: bool) -> KVCacheManager:
    return KVCacheManager(
        CacheConfig(tokens_per_block=2, num_gpu_blocks=num_gpu_blocks,
                    num_host_blocks=num_host_blocks, enable_partial_reuse=partial,
                    eviction_policy="priority-lru"),
        clock=lambda: 0.0)


# ---- 1. failed copies are not counted --------------------------------------------------


def test_failed_onboard_and_offloads_leave_the_copy_counters() -> None:
    """A step onboards one block and offloads three; the onboard and two offloads fail:
    the step counted (1, 3, 0) copies, only (0, 1, 0) landed."""
    # tpb 2, GPU 4, host 8. a=[1 2 3] leaves [1 2] cached; the filler's 4 blocks push it to
    # host 0 (offload counted before the step: (0, 1, 0)). b=[1 2 20 21 22] onboards [1 2]
    # into GPU 3 after offloading the filler block there, then offloads two more for room.
    mgr = make_manager(4, 8, partial=False)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3]))
    mgr.remove_sequence("a")
    mgr.add_sequence(SequenceSpec("f", [5, 6, 7, 8, 9, 10, 11, 12]))
    mgr.remove_sequence("f")
    mgr.take_plan()
    before = copy_counters(mgr.stats)
    assert before == (0, 1, 0)
    (b,) = mgr.add_sequence_batch([SequenceSpec("b", [1, 2, 20, 21, 22])])
    assert b.block_ids == (3, 1, 2)
    plan = mgr.take_plan()
    assert plan.ops == (TransferOp(OpKind.OFFLOAD, G, 3, H, 1, 2),
                        TransferOp(OpKind.ONBOARD, H, 0, G, 3, 2),
                        TransferOp(OpKind.OFFLOAD, G, 1, H, 0, 2),
                        TransferOp(OpKind.OFFLOAD, G, 2, H, 2, 2))
    step = tuple(n - m for n, m in zip(copy_counters(mgr.stats), before, strict=True))
    assert step == (1, 3, 0)
    assert mgr.transfer_failed(plan, [0, 1, 2]) == ["b"]
    mgr.check_invariants()
    step = tuple(n - m for n, m in zip(copy_counters(mgr.stats), before, strict=True))
    assert step == (0, 1, 0)  # the offload of GPU 2 alone landed
    assert copy_counters(mgr.stats) == (0, 2, 0)
    assert mgr.stats.num_failed_transfers == 3


def test_a_failed_partial_copy_is_no_partial_copy() -> None:
    """r2 reuses 1 token of r1's block by copying it; the copy fails: 1 partial copy was
    counted, none landed."""
    mgr = make_manager(6, 2, partial=True)
    mgr.begin_step()
    mgr.add_sequence(SequenceSpec("r1", [0, 0]))
    mgr.end_step()
    mgr.begin_step()
    assert mgr.add_sequence(SequenceSpec("r2", [0, 0])).block_ids == (1,)
    plan = mgr.end_step()
    assert plan.ops == (TransferOp(OpKind.COPY, G, 0, G, 1, 1),)
    assert copy_counters(mgr.stats) == (0, 0, 1)
    assert mgr.transfer_failed(plan, [0]) == ["r2"]
    assert copy_counters(mgr.stats) == (0, 0, 0)
    mgr.check_invariants()


def test_a_failed_op_reported_twice_in_the_indices_is_taken_back_once() -> None:
    """transfer_failed(plan, [0, 0]): one op failed, one offload taken back."""
    mgr = make_manager(2, 2, partial=False)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3]))
    mgr.remove_sequence("a")
    mgr.take_plan()
    mgr.add_sequence_batch([SequenceSpec("b", [5, 6, 7])])
    plan = mgr.take_plan()
    assert plan.ops == (TransferOp(OpKind.OFFLOAD, G, 0, H, 0, 2),)
    assert copy_counters(mgr.stats) == (0, 1, 0)
    assert mgr.transfer_failed(plan, [0, 0]) == []
    assert copy_counters(mgr.stats) == (0, 0, 0)


def test_a_torch_engine_counts_only_the_copies_that_landed() -> None:
    """The second wave's batch fails: the engine counted 4 ops (2 offloads, 2 onboards),
    2 landed (one of each): ops, and bytes each way, are those 2."""
    pytest.importorskip("torch", reason="the data plane needs torch")
    from kvtier.storage import KVLayout, KVStorage
    from kvtier.transfer import TransferError, TransferPlan
    from kvtier.transfer.batching import TransferBatch
    from kvtier.transfer.torch_engine import TorchTransferEngine

    layout = KVLayout(2, 2, 8, 4, "float32", "block_major")
    gpu, host = KVStorage(layout, 12, "cpu"), KVStorage(layout, 10)
    ops = (TransferOp(OpKind.OFFLOAD, G, 0, H, 0, 4),    # wave 0
           TransferOp(OpKind.ONBOARD, H, 5, G, 0, 4),    # wave 1: fails
           TransferOp(OpKind.OFFLOAD, G, 0, H, 1, 4),    # wave 2: after the failed one
           TransferOp(OpKind.ONBOARD, H, 6, G, 7, 4))    # wave 0
    engine = TorchTransferEngine(gpu, host, method="kernel")

    def fail_in_wave_1(batch: TransferBatch) -> None:
        if batch.wave == 1:
            raise RuntimeError("injected copy failure")

    engine.before_batch = fail_in_wave_1
    with pytest.raises(TransferError, match="2 of 4 copies not done"):
        engine.submit(TransferPlan(ops))
    block = layout.bytes_per_block
    s = engine.stats
    assert (s.num_plans, s.num_ops, s.bytes_h2d, s.bytes_d2h, s.bytes_d2d) == (
        1, 2, block, block, 0)
    assert block == 2 * 2 * 8 * 4 * 2 * 4  # layers, K and V, heads, dim, tokens, float32
