"""Red team 29b: the reuse kvtier reports is the reuse obtained.

Per request (a first chunk's ``num_reused_tokens``), per step (``num_reused_tokens``) and in
the manager's counters (``CacheStats``): a request whose onboard or forward pass fails in its
admission's step degrades to recompute and is reported as having reused nothing there (its
credit lost); a request queued with output reports the reuse its prefill of prompt and
output got. A seeded loop over a fake data plane checks each figure against the positions
the step's forward passes really read from cache."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier import CacheConfig, KVCacheManager, Request, ScheduledStep, Scheduler, SchedulerConfig
from kvtier.metrics import CacheStats

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 2 full blocks of 4 and a last token
OTHER = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]  # 3 full blocks


def reuse_counters(stats: CacheStats) -> tuple[int, ...]:
    return (stats.num_prompt_tokens, stats.num_reused_tokens, stats.num_host_reused_tokens,
            stats.gpu.reused_blocks, stats.gpu.missed_blocks, stats.host.reused_blocks,
            stats.host.missed_blocks, stats.num_resumed_reused_tokens,
            stats.num_lost_reused_tokens)


def run_alone(sched: Scheduler, rid: str, prompt: list[int]) -> None:
    """Queue a request of one output token and step until it finishes."""
    sched.add_request(Request(rid, prompt, 1))
    while sched.has_unfinished():
        step = sched.step()
        sched.update(step, {c.request_id: 0 for c in step.context_chunks})


def host_prefix_setup() -> tuple[KVCacheManager, Scheduler]:
    """GPU 4, host 8: a computes PROMPT, x pushes a's second block [5 6 7 8] to the host
    (a's first stays on the GPU): PROMPT's lookup finds 4 GPU + 4 host tokens."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=4, num_host_blocks=8,
                                     eviction_policy="priority-lru"))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    run_alone(sched, "a", PROMPT)
    run_alone(sched, "x", OTHER)
    found = mgr.lookup(PROMPT)
    assert (found.num_gpu_tokens, found.num_host_tokens) == (4, 4)
    return mgr, sched


# ---- a first admission whose onboard fails ---------------------------------------------


def test_a_failed_onboard_leaves_the_step_with_the_reuse_its_chunks_got() -> None:
    """b is credited 8 reused tokens; its onboard fails and requeue_failed takes its chunk
    out of the step: the step reused nothing (it said 8), its 8 credited tokens lost."""
    mgr, sched = host_prefix_setup()
    sched.add_request(Request("b", PROMPT, 2))
    step = sched.step()
    assert (step.num_credited_tokens, step.num_reused_tokens) == (8, 8)
    assert mgr.transfer_failed(step.transfer_plan, range(len(step.transfer_plan))) == ["b"]
    step = sched.requeue_failed(step, ["b"])
    assert (step.context_chunks, step.num_scheduled_tokens) == ((), 0)
    assert (step.num_credited_tokens, step.num_reused_tokens) == (8, 0)


def test_a_failed_onboard_takes_the_first_admissions_reuse_back_from_the_counters() -> None:
    """b's first admission is counted a query with 8 reused tokens (4 host); its onboard
    fails before its pass runs: the counters take the 8 back (its 2 blocks counted as GPU
    misses, 2 as host misses) and count them lost. Its readmission, a recompute, finds
    a's first block again: 4 resumed tokens, the reuse it really got."""
    mgr, sched = host_prefix_setup()
    before = reuse_counters(mgr.stats)
    assert before == (9 + 12, 0, 0, 0, 2 + 3, 0, 2 + 3, 0, 0)
    sched.add_request(Request("b", PROMPT, 2))
    step = sched.step()
    assert reuse_counters(mgr.stats) == (30, 8, 4, 1, 6, 1, 5, 0, 0)  # the promise counted
    mgr.transfer_failed(step.transfer_plan, range(len(step.transfer_plan)))
    assert reuse_counters(mgr.stats) == (30, 0, 0, 0, 7, 0, 7, 0, 8)
    sched.update(sched.requeue_failed(step, ["b"]), {})
    step = sched.step()
    assert [(c.first_token, c.num_reused_tokens) for c in step.context_chunks] == [(4, 4)]
    assert (step.num_credited_tokens, step.num_reused_tokens) == (4, 4)
    sched.update(step, {"b": 0})
    assert reuse_counters(mgr.stats) == (30, 0, 0, 0, 7, 0, 7, 4, 8)
    mgr.check_invariants()


def test_a_failed_pass_in_the_admission_step_takes_its_reuse_back() -> None:
    """The same for a forward pass that fails in b's admission step: its reuse is taken
    back (b computed nothing from it) and the step reports none."""
    mgr, sched = host_prefix_setup()
    sched.add_request(Request("b", PROMPT, 2))
    step = sched.step()
    assert mgr.compute_failed(["b"]) == ["b"]
    assert (mgr.stats.num_reused_tokens, mgr.stats.num_lost_reused_tokens) == (0, 8)
    step = sched.requeue_failed(step, ["b"])
    assert (step.num_credited_tokens, step.num_reused_tokens) == (8, 0)


def test_a_failed_pass_after_the_first_chunk_keeps_the_reuse_that_chunk_read() -> None:
    """b's first chunk (4 tokens past its 8 reused) runs; its second chunk's pass fails:
    the first chunk read the 8 reused tokens, so they stay counted; the failed step
    reused nothing of its own (a later chunk reuses nothing)."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64, max_chunk_tokens=4))
    run_alone(sched, "a", PROMPT)
    sched.add_request(Request("b", PROMPT[:8] + list(range(40, 50)), 2))
    step = sched.step()
    assert [(c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [(8, 4, 8)]
    sched.update(step, {})
    step = sched.step()
    assert mgr.compute_failed(["b"]) == ["b"]
    step = sched.requeue_failed(step, ["b"])
    assert (step.num_credited_tokens, step.num_reused_tokens) == (0, 0)
    assert (mgr.stats.num_reused_tokens, mgr.stats.num_lost_reused_tokens) == (8, 0)


# ---- the model engine's per-request figures ----------------------------------------------


def make_model_engine(num_gpu: int, num_host: int) -> Any:
    """A ModelEngine of a tiny random Llama on the CPU (skips without torch)."""
    pytest.importorskip("torch", reason="the model engine needs torch: pip install "
                                        "'kvtier[torch]'")
    from kvtier.model import LlamaModel, ModelConfig, ModelEngine
    from kvtier.storage import KVStorage
    from kvtier.transfer.torch_engine import TorchTransferEngine

    model = LlamaModel(ModelConfig(), "cpu")
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu,
                                     num_host_blocks=num_host, eviction_policy="priority-lru"))
    layout = model.config.kv_layout(4)
    gpu, host = KVStorage(layout, num_gpu, "cpu"), KVStorage(layout, max(1, num_host))
    return ModelEngine(model, mgr, Scheduler(mgr, SchedulerConfig(max_num_tokens=64)),
                       TorchTransferEngine(gpu, host))


def drain_engine(engine: Any) -> list[ScheduledStep]:
    steps = []
    while engine.scheduler.has_unfinished():
        steps.append(engine.step()[0])
    return steps


def split(result: Any) -> tuple[int, int, int, int]:
    return (result.num_gpu_tokens, result.num_host_tokens, result.num_remote_tokens,
            result.num_computed_tokens)


def test_a_request_queued_with_output_reports_the_reuse_its_prefill_got() -> None:
    """a finishes PROMPT with 3 tokens; b is queued with PROMPT and a's first 2 (11 tokens
    to prefill): its admission reuses a's 2 full blocks and computes 3. Its result said 0
    reused and 0 computed (a request with output was never looked up)."""
    engine = make_model_engine(12, 0)
    engine.add_request(Request("a", PROMPT, 3))
    drain_engine(engine)
    output = engine.results["a"].output
    assert split(engine.results["a"]) == (0, 0, 0, 9)
    engine.add_request(Request("b", PROMPT, 6, output=output[:2]))
    steps = drain_engine(engine)
    assert [(c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in steps[0].context_chunks] == [(8, 3, 8)]
    assert split(engine.results["b"]) == (8, 0, 0, 3)
    assert engine.results["b"].num_reused_tokens == 8


def test_a_request_whose_onboard_fails_reports_the_readmission_that_ran() -> None:
    """b's first admission promises 4 GPU + 4 host tokens; its plan fails (a CUDA error):
    it is requeued and its readmission reuses the 4 GPU tokens and computes 5. Its result
    said 4 GPU + 4 host reused, 1 computed: the admission that never ran."""
    engine = make_model_engine(4, 8)
    for rid, prompt in (("a", PROMPT), ("x", OTHER)):
        engine.add_request(Request(rid, prompt, 1))
        drain_engine(engine)
    submit = engine.transfer.submit
    failures: list[Any] = []

    def failing_submit(plan: Any) -> Any:
        if not failures and len(plan):
            failures.append(plan)
            raise RuntimeError("CUDA error: unspecified launch failure")
        return submit(plan)

    engine.transfer.submit = failing_submit
    engine.add_request(Request("b", PROMPT, 2))
    steps = drain_engine(engine)
    assert len(failures) == 1 and engine.num_failed_steps == 1
    assert (steps[0].context_chunks, steps[0].num_credited_tokens,
            steps[0].num_reused_tokens) == ((), 8, 0)
    assert [(c.first_token, c.num_reused_tokens) for c in steps[1].context_chunks] == [(4, 4)]
    assert split(engine.results["b"]) == (4, 0, 0, 5)
    stats = engine.manager.stats
    assert (stats.num_reused_tokens, stats.num_resumed_reused_tokens,
            stats.num_lost_reused_tokens) == (0, 4, 8)

