"""Red team 27c, the model engine end to end on the CPU: a cache, a fault or a step given
up never changes what the model outputs (greedy tokens, logits within fp32 tolerance,
seeded samples)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pytest

torch = pytest.importorskip("torch", reason="the model tests need torch: "
                                            "pip install 'kvtier[torch]'")

from exact_engine import assert_exact  # noqa: E402
from kvtier import CacheConfig, KVCacheManager  # noqa: E402
from kvtier.model import LlamaModel, ModelConfig, ModelEngine  # noqa: E402
from kvtier.model.sampling import Sampler, SamplingParams  # noqa: E402
from kvtier.scheduler import Request, ScheduledStep, Scheduler, SchedulerConfig  # noqa: E402
from kvtier.storage import KVStorage  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402

if TYPE_CHECKING:
    from torch import Tensor

TPB = 4
MODEL = LlamaModel(ModelConfig(), "cpu")


def make_engine(num_gpu_blocks: int = 32, num_host_blocks: int = 0,
                max_num_tokens: int = 64) -> ModelEngine:
    """The tiny random model over NaN-poisoned pools."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=num_gpu_blocks,
                                         num_host_blocks=num_host_blocks))
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=max_num_tokens))
    layout = MODEL.config.kv_layout(TPB)
    gpu = KVStorage(layout, num_gpu_blocks, "cpu")
    host = KVStorage(layout, num_host_blocks) if num_host_blocks else None
    for storage in (gpu, host):
        if storage is not None:
            storage.fill_(float("nan"))
    return ModelEngine(MODEL, manager, scheduler, TorchTransferEngine(gpu, host),
                       record_logits=True)


PROMPTS = {"a": list(range(1, 11)), "b": list(range(20, 31)), "c": list(range(1, 8)) + [99]}
SEEDED = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)


def run_seeded(interrupt_at: int | None) -> dict[str, list[int]]:
    """Three requests drawing seeded samples; request b's stop check raises a
    KeyboardInterrupt (Ctrl-C) at its ``interrupt_at``-th call, and the engine runs on."""
    engine = make_engine()
    calls = [0]

    def stop(output: Sequence[int]) -> bool:
        calls[0] += 1
        if calls[0] == interrupt_at:
            raise KeyboardInterrupt
        return False

    for rid, prompt in PROMPTS.items():
        engine.add_request(Request(rid, prompt, SEEDED.max_new_tokens), Sampler(SEEDED),
                           stop if rid == "b" else None)
    if interrupt_at is not None:
        with pytest.raises(KeyboardInterrupt):
            engine.run()
    results = engine.run()
    engine.manager.check_invariants()
    assert engine.manager.num_sequences == 0
    return {rid: r.output for rid, r in results.items()}


@pytest.mark.parametrize("interrupt_at", [1, 3, 6])
def test_a_step_given_up_after_sampling_draws_the_same_samples_again(interrupt_at: int) -> None:
    """A step interrupted after its samplers drew (a Ctrl-C in a stop check) is given up:
    its requests recompute and sample those positions again. Their seeded samplers had
    moved on by the draws of the step given up, so every request's answer from there on
    was another than a run never interrupted gives (a: [200, 80, 179, 87, ...] became
    [200, 80, 87, 118, ...]). Now each sampler is put back as it was before the step."""
    assert run_seeded(interrupt_at) == run_seeded(None)


class InterruptedOnce(Sampler):
    """A seeded sampler interrupted (Ctrl-C) in its ``when``-th draw, after the draw."""

    def __init__(self, params: SamplingParams, when: int | None) -> None:
        super().__init__(params)
        self.when = when
        self.calls = [0]  # shared by its copies: the interrupt comes once

    def sample(self, logits: Tensor) -> int:
        token = super().sample(logits)
        self.calls[0] += 1
        if self.calls[0] == self.when:
            raise KeyboardInterrupt
        return token


@pytest.mark.parametrize("when", [2, 5])
def test_a_sampler_interrupted_in_its_draw_draws_the_same_samples_again(when: int) -> None:
    """The interrupt raised inside a sampler's own draw (after the samplers before it in
    the step drew): every request's answer equals a run never interrupted."""
    outputs = []
    for interrupt in (when, None):
        engine = make_engine()
        for rid, prompt in PROMPTS.items():
            sampler = InterruptedOnce(SEEDED, interrupt if rid == "c" else None)
            engine.add_request(Request(rid, prompt, SEEDED.max_new_tokens), sampler)
        if interrupt is not None:
            with pytest.raises(KeyboardInterrupt):
                engine.run()
        outputs.append({rid: r.output for rid, r in engine.run().items()})
        assert engine.manager.num_sequences == 0
    assert outputs[0] == outputs[1]


def test_a_preemption_in_a_step_given_up_is_counted() -> None:
    """A step that preempted a request (a pool of 10 blocks, three requests growing to 19
    tokens each) and was then interrupted in its forward pass was given up after the
    scheduler had preempted it: the request recomputed, yet its result counted no
    preemption. Now each result counts every step that preempted it, and the answers are
    a full recompute's."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=10))
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=32,
                                                   capacity_policy="max_utilization"))
    gpu = KVStorage(MODEL.config.kv_layout(TPB), 10, "cpu")
    gpu.fill_(float("nan"))
    engine = ModelEngine(MODEL, manager, scheduler, TorchTransferEngine(gpu, None))
    preempted: dict[str, int] = {}
    scheduler_step = scheduler.step
    forward_chunk = MODEL.forward_chunk

    def interrupted(*args: object, **kwargs: object) -> Tensor:
        raise KeyboardInterrupt

    def step() -> ScheduledStep:
        scheduled = scheduler_step()
        if scheduled.preempted_request_ids and not preempted:  # interrupted once
            engine.model.forward_chunk = interrupted  # type: ignore[method-assign]
        for rid in scheduled.preempted_request_ids:
            preempted[rid] = preempted.get(rid, 0) + 1
        return scheduled

    scheduler.step = step  # type: ignore[method-assign]
    for i in range(3):
        engine.add_request(Request(f"r{i}", [i * 50 + j for j in range(9)], 10))
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.run()
    finally:
        del engine.model.forward_chunk
    results = engine.run()
    assert preempted and engine.model.forward_chunk == forward_chunk
    assert {rid: r.num_preemptions for rid, r in results.items() if r.num_preemptions} == (
        preempted)
    for r in results.values():
        tokens = r.prompt + r.output
        ref = MODEL.full_recompute(tokens[:-1])
        assert r.output == ref[len(r.prompt) - 1:].argmax(-1).tolist()


def shared_prefix_prompts(seed: int, num: int) -> list[list[int]]:
    """Prompts over three prefixes cut at any token (none a multiple of the block size by
    design), each with its own tail."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(256) for _ in range(rng.randrange(5, 23))] for _ in range(3)]
    prompts = []
    for _ in range(num):
        prefix = rng.choice(prefixes)
        cut = rng.randrange(1, len(prefix) + 1)
        prompts.append(prefix[:cut] + [rng.randrange(256) for _ in range(rng.randrange(0, 6))])
    return prompts


def run_prompts(engine: ModelEngine, prompts: list[list[int]], max_output_tokens: int,
                params: SamplingParams | None = None) -> dict[str, list[int]]:
    """Two requests arrive per step; the books are checked after every step."""
    pending = [Request(f"r{i}", p, max_output_tokens) for i, p in enumerate(prompts)]
    while pending or engine.scheduler.has_unfinished():
        for req in pending[:2]:
            engine.add_request(req, None if params is None else Sampler(params))
        del pending[:2]
        engine.step()
        engine.manager.check_invariants()
    assert engine.manager.num_sequences == 0
    return {rid: r.output for rid, r in engine.results.items()}


def tight_engine(max_chunk_tokens: int | None, num_speculative_tokens: int = 0,
                 enable_block_reuse: bool = True) -> ModelEngine:
    """A GPU pool of 9 blocks over a host tier of 32, preemption allowed: every few steps
    a block is evicted, offloaded, onboarded or reused in part."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=9,
                                         num_host_blocks=32,
                                         enable_block_reuse=enable_block_reuse))
    scheduler = Scheduler(manager, SchedulerConfig(
        max_num_tokens=16, max_batch_size=4, capacity_policy="max_utilization",
        max_chunk_tokens=max_chunk_tokens, num_speculative_tokens=num_speculative_tokens))
    layout = MODEL.config.kv_layout(TPB)
    gpu, host = KVStorage(layout, 9, "cpu"), KVStorage(layout, 32)
    gpu.fill_(float("nan"))
    host.fill_(float("nan"))
    return ModelEngine(MODEL, manager, scheduler, TorchTransferEngine(gpu, host),
                       record_logits=True)


@pytest.mark.parametrize(("max_chunk_tokens", "num_speculative_tokens"),
                         [(1, 0), (TPB - 1, 2), (TPB + 1, 0), (None, 1)])
def test_chunks_drafts_and_a_tight_pool_give_a_full_recomputes_logits(
        max_chunk_tokens: int | None, num_speculative_tokens: int) -> None:
    """Chunks of 1, a block - 1 and a block + 1 tokens, draft slots reserved (the engine
    decodes one token), a pool that evicts, offloads, onboards and preempts: every logit
    the engine computed is within 1e-4 of a cacheless recompute and every greedy token
    is its argmax, and the run reused from both tiers."""
    engine = tight_engine(max_chunk_tokens, num_speculative_tokens)
    run_prompts(engine, shared_prefix_prompts(3, 14), 5)
    stats = engine.manager.stats
    assert stats.num_reused_tokens > 0 and stats.host.onboarded_blocks > 0
    assert_exact(engine)


def test_seeded_samples_do_not_depend_on_the_cache() -> None:
    """Seeded temperature sampling through a tight pool (reuse, offloading, preemption,
    1-token chunks) draws the tokens an engine with block reuse off and whole prompts draws."""
    params = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=11)
    prompts = shared_prefix_prompts(5, 8)
    tight = tight_engine(1)
    cached = run_prompts(tight, prompts, 6, params)
    assert tight.manager.stats.num_reused_tokens > 0
    assert sum(r.num_preemptions for r in tight.results.values()) > 0
    assert cached == run_prompts(tight_engine(None, enable_block_reuse=False), prompts, 6,
                                 params)


class Uncopyable(Sampler):
    """A caller's sampler that refuses to be copied."""

    def __copy__(self) -> Uncopyable:
        raise TypeError("no copies")


def test_a_sampler_that_cannot_be_copied_still_samples() -> None:
    """The engine copies a sampler before it draws (to put it back if the step is given
    up); one whose copy raises samples as before, its answer the seeded run's."""
    engine = make_engine()
    engine.add_request(Request("a", PROMPTS["a"], 6), Uncopyable(SEEDED))
    plain = make_engine()
    plain.add_request(Request("a", PROMPTS["a"], 6), Sampler(SEEDED))
    result = engine.run()["a"]
    assert result.stop_reason == "length" and result.output == plain.run()["a"].output


def test_a_request_preempted_in_its_prefill_reports_its_first_admission() -> None:
    """A request preempted part way into its chunked prefill is admitted again, reusing
    the blocks it computed itself. Its result reported that second admission (here
    "reused gpu 12, computed 9" of 21 tokens the cache had none of), where its docstring,
    and the manager's hit counts (a resumed admission is no query), say the first. Now
    the figures are the first admission's: the results' reuse sums to the manager's."""
    rng = random.Random(0)
    num_gpu_blocks = rng.randrange(6, 14)
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=num_gpu_blocks))
    scheduler = Scheduler(manager, SchedulerConfig(
        max_num_tokens=rng.randrange(4, 10), capacity_policy="max_utilization",
        max_chunk_tokens=rng.choice((2, 3, 4))))
    gpu = KVStorage(MODEL.config.kv_layout(TPB), num_gpu_blocks, "cpu")
    gpu.fill_(float("nan"))
    engine = ModelEngine(MODEL, manager, scheduler, TorchTransferEngine(gpu, None))
    admissions: dict[str, list[int]] = {}
    scheduler_step = scheduler.step

    def step() -> ScheduledStep:
        scheduled = scheduler_step()
        for c in scheduled.context_chunks:
            if (c.first_token == c.num_reused_tokens
                    and engine.results[c.request_id].first_token_s is None):
                admissions.setdefault(c.request_id, []).append(c.num_reused_tokens)
        return scheduled

    scheduler.step = step  # type: ignore[method-assign]
    for i in range(3):
        n = rng.randrange(4, (num_gpu_blocks - 2) * TPB - 10)
        engine.add_request(Request(f"r{i}", [rng.randrange(256) for _ in range(n)],
                                   rng.randrange(1, 10)))
    results = engine.run()
    assert any(len(a) > 1 and a[-1] > a[0] for a in admissions.values())  # it happened
    for rid, r in results.items():
        assert r.num_reused_tokens == admissions[rid][0], rid
        assert r.num_computed_tokens == len(r.prompt) - r.num_reused_tokens, rid
    assert sum(r.num_reused_tokens for r in results.values()) == (
        manager.stats.num_reused_tokens)
