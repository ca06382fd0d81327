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
    Request,
    Scheduler,
    SchedulerConfig,
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


# ---- 2. a pass failing after its step's update ------------------------------------------

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 2 full blocks of 4 and a last token


def reused_setup() -> tuple[KVCacheManager, Scheduler]:
    """GPU 16 blocks of 4: a computed PROMPT and finished; PROMPT's lookup finds 8 tokens."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    sched.add_request(Request("a", PROMPT, 1))
    step = sched.step()
    sched.update(step, {"a": 0})
    assert not sched.has_unfinished() and mgr.lookup(PROMPT).num_tokens == 8
    return mgr, sched


def kept_reuse(stats: CacheStats) -> int:
    return stats.num_reused_tokens + stats.num_resumed_reused_tokens


def test_a_pass_failing_after_the_update_reports_its_lost_reuse_next_step() -> None:
    """b reuses 8 tokens; its pass is reported failed after the step's update: the manager
    takes the 8 back (lost), the readmission reuses 8 again. The steps said 8 + 8 = 16
    reused where the manager kept 8: the next step reports the 8 lost."""
    mgr, sched = reused_setup()
    sched.add_request(Request("b", PROMPT, 3))
    steps = [sched.step()]
    assert [(c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in steps[0].context_chunks] == [(8, 1, 8)]
    sched.update(steps[0], {"b": 77})
    assert mgr.compute_failed(["b"]) == ["b"]
    assert (mgr.stats.num_reused_tokens, mgr.stats.num_lost_reused_tokens) == (0, 8)
    steps.append(sched.step())
    assert (steps[1].num_reused_tokens, steps[1].num_lost_reused_tokens) == (8, 8)
    sched.update(steps[1], {"b": 78})
    while sched.has_unfinished():
        steps.append(sched.step())
        sched.update(steps[-1], {"b": 79})
    assert sum(s.num_reused_tokens for s in steps) == 16
    assert sum(s.num_reused_tokens - s.num_lost_reused_tokens for s in steps) == \
        kept_reuse(mgr.stats) == 8
    assert [s.num_lost_reused_tokens for s in steps] == [0, 8, 0, 0]
    mgr.check_invariants()


def test_the_token_a_failed_pass_sampled_is_dropped() -> None:
    """The failed pass's token 77 was appended by the update: the readmission prefilled it
    (a chunk of (8, 2) past the reuse), and b's output kept it. It is dropped: (8, 1), and
    b's output is what its good passes sampled."""
    mgr, sched = reused_setup()
    sched.add_request(Request("b", PROMPT, 2))
    step = sched.step()
    sched.update(step, {"b": 77})
    assert sched.running["b"].output == [77]
    mgr.compute_failed(["b"])
    step = sched.step()
    assert [(c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [(8, 1, 8)]
    sched.update(step, {"b": 78})
    step = sched.step()
    assert step.decode_request_ids == ("b",)
    (done,) = sched.update(step, {"b": 79})
    assert done.output == [78, 79]
    sched.check_invariants()


def test_a_decode_failing_after_the_update_drops_its_token() -> None:
    """b decoded 78 then 79; the pass of 79 is reported failed after its update: b
    recomputes its prompt and 78 (8 reused, 2 computed), never 79."""
    mgr, sched = reused_setup()
    sched.add_request(Request("b", PROMPT, 4))
    step = sched.step()
    sched.update(step, {"b": 77})
    step = sched.step()
    sched.update(step, {"b": 78})
    assert sched.running["b"].output == [77, 78]
    assert mgr.compute_failed(["b"]) == ["b"]
    step = sched.step()
    assert [(c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [(8, 2, 8)]
    assert step.num_lost_reused_tokens == 0  # b's reuse was read by its first pass
    assert sched.running["b"].output == [77]


def test_a_request_removed_without_a_failure_keeps_its_token() -> None:
    """A direct remove_sequence after the update is no failed pass: b's token 77 stays,
    its readmission prefills it (8, 2), and no reuse is lost."""
    mgr, sched = reused_setup()
    sched.add_request(Request("b", PROMPT, 3))
    step = sched.step()
    sched.update(step, {"b": 77})
    mgr.remove_sequence("b")
    step = sched.step()
    assert [(c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [(8, 2, 8)]
    assert step.num_lost_reused_tokens == 0
    assert sched.running["b"].output == [77]


def test_a_failure_inside_the_step_is_not_reported_lost_again() -> None:
    """b's pass fails before the update (requeue_failed): the step reports 0 reused of
    8 credited, and the next step reports nothing lost: the 8 were never reported."""
    mgr, sched = reused_setup()
    sched.add_request(Request("b", PROMPT, 2))
    step = sched.step()
    assert mgr.compute_failed(["b"]) == ["b"]
    step = sched.requeue_failed(step, ["b"])
    assert (step.num_credited_tokens, step.num_reused_tokens) == (8, 0)
    sched.update(step, {})
    step = sched.step()
    assert (step.num_reused_tokens, step.num_lost_reused_tokens) == (8, 0)
    assert kept_reuse(mgr.stats) == 8 and mgr.stats.num_lost_reused_tokens == 8


# ---- 3. the model engine's split is the admission's ------------------------------------


def test_the_engines_split_is_the_admissions_not_a_lookup_before_the_step() -> None:
    """GPU 7 blocks of 4, host 8. a caches PROMPT's 2 blocks, f 2 more, d runs with 3.
    b=PROMPT is looked up before its step: 8 GPU tokens. The step's own evictions offload
    a's second block and b's admission onboards it back: 4 GPU + 4 host tokens. b's result
    said (8, 0, 0, 1) (gpu, host, remote, computed), the lookup's; it is (4, 4, 0, 1)."""
    pytest.importorskip("torch", reason="the model engine needs torch")
    from kvtier.model import LlamaModel, ModelConfig, ModelEngine
    from kvtier.storage import KVStorage
    from kvtier.transfer.torch_engine import TorchTransferEngine

    model = LlamaModel(ModelConfig(), "cpu")
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=7, num_host_blocks=8,
                                     eviction_policy="priority-lru"))
    layout = model.config.kv_layout(4)
    engine = ModelEngine(model, mgr, Scheduler(mgr, SchedulerConfig(max_num_tokens=64)),
                         TorchTransferEngine(KVStorage(layout, 7, "cpu"), KVStorage(layout, 8)))
    for rid, prompt, num_out in (("a", PROMPT, 1), ("f", list(range(30, 39)), 1),
                                 ("d", [*range(20, 30), 40], 4)):
        engine.add_request(Request(rid, prompt, num_out))
        engine.step()
    engine.step()  # d decodes
    assert mgr.lookup(PROMPT) == (8, 8, 0, 0)  # (tokens, GPU, host, partial)
    engine.add_request(Request("b", PROMPT, 2))
    step = engine.step()[0]
    assert [(c.request_id, c.first_token, c.num_reused_tokens)
            for c in step.context_chunks] == [("b", 8, 8)]
    assert sorted(op.kind.value for op in step.transfer_plan.ops) == [
        "offload", "offload", "offload", "onboard"]
    b = engine.results["b"]
    assert (b.num_gpu_tokens, b.num_host_tokens, b.num_remote_tokens,
            b.num_computed_tokens) == (4, 4, 0, 1)
    assert b.num_onboarded_tokens == 4
    assert (mgr.stats.num_reused_tokens, mgr.stats.num_host_reused_tokens) == (8, 4)


def test_admitted_reuse_is_the_admissions_split_and_refuses_unknown_ids() -> None:
    """The manager's query answers what the admission counted; nothing for a request that
    skipped reading the cache; KeyError for an id of no live request."""
    mgr, sched = reused_setup()
    sched.add_request(Request("b", PROMPT, 2))
    sched.add_request(Request("c", PROMPT, 2, skip_reading_prefix_cache=True))
    sched.step()
    assert mgr.admitted_reuse("b") == (8, 8, 0, 0)
    assert mgr.admitted_reuse("c") == (0, 0, 0, 0)
    with pytest.raises(KeyError, match="zz"):
        mgr.admitted_reuse("zz")
