"""End to end: reuse, offload, onboarding, partial copies, chunked prefill and preemption
give exactly the logits and greedy tokens of a full recompute without any cache."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

torch = pytest.importorskip("torch", reason="the data-plane tests need torch: "
                                            "pip install 'kvtier[torch]'")

from kvtier import CacheConfig, KVCacheManager  # noqa: E402
from kvtier.model import LlamaModel, ModelConfig, ModelEngine, RequestResult  # noqa: E402
from kvtier.scheduler import Request, Scheduler, SchedulerConfig  # noqa: E402
from kvtier.scheduler_config import CapacityPolicy  # noqa: E402
from kvtier.storage import KVStorage  # noqa: E402
from kvtier.transfer import OpKind, TransferError, TransferPlan  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402
from kvtier.transfer.torch_handle import TransferHandle  # noqa: E402

if TYPE_CHECKING:
    from torch import Tensor

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TPB = 4
# fp32 (CPU or CUDA; TF32 is off by default): chunks and the reference differ only in
# summation order. bf16 keeps 8 significant bits, so chunked and full attention round
# differently: logits here are O(1) and stay within 0.1; a greedy token may then differ
# only where the reference's two best logits are closer than that.
FP32_ATOL = 1e-4
BF16_ATOL = 0.1


@dataclass(frozen=True)
class Scenario:
    """A workload and the pools, budgets and policies it runs under."""

    name: str
    num_gpu_blocks: int
    num_host_blocks: int
    max_num_tokens: int
    capacity_policy: CapacityPolicy = "guaranteed_no_evict"
    max_chunk_tokens: int | None = None
    num_requests: int = 24
    max_output_tokens: int = 4
    salts: tuple[str | None, ...] = (None,)
    seed: int = 0


SCENARIOS = [
    # Shared prefixes, roomy GPU pool: GPU reuse and partial reuse (in place and by copy).
    Scenario("gpu_reuse", num_gpu_blocks=96, num_host_blocks=0, max_num_tokens=64),
    # A GPU pool of a few requests: prefixes are offloaded, then onboarded for reuse.
    Scenario("host_tier", num_gpu_blocks=24, num_host_blocks=64, max_num_tokens=48,
             salts=(None, "tenant-b")),
    # Small chunks and long outputs on a tight pool without reservations: preemption.
    Scenario("chunked_preempt", num_gpu_blocks=28, num_host_blocks=48, max_num_tokens=24,
             capacity_policy="max_utilization", max_chunk_tokens=7, max_output_tokens=10,
             seed=1),
]


def make_prompts(sc: Scenario) -> list[tuple[list[int], str | None]]:
    """Prompts that share a few prefixes (cut at any token, so blocks are also shared in
    part), with per-request suffixes and salts."""
    rng = random.Random(sc.seed)
    prefixes = [[rng.randrange(256) for _ in range(rng.randrange(20, 40))] for _ in range(4)]
    out = []
    for _ in range(sc.num_requests):
        prefix = rng.choice(prefixes)
        cut = rng.randrange(len(prefix) // 2, len(prefix) + 1)
        suffix = [rng.randrange(256) for _ in range(rng.randrange(1, 12))]
        out.append((prefix[:cut] + suffix, rng.choice(sc.salts)))
    return out


def make_engine(sc: Scenario, device: str, dtype: str = "float32",
                layouts: tuple[str, str] = ("block_major", "block_major")) -> ModelEngine:
    """Model, manager, scheduler and torch transfer engine over NaN-poisoned pools."""
    model = LlamaModel(ModelConfig(dtype=dtype), device)
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=sc.num_gpu_blocks,
                                         num_host_blocks=sc.num_host_blocks))
    scheduler = Scheduler(manager, SchedulerConfig(
        max_num_tokens=sc.max_num_tokens, max_batch_size=8, capacity_policy=sc.capacity_policy,
        max_chunk_tokens=sc.max_chunk_tokens))
    gpu = KVStorage(model.config.kv_layout(TPB, layouts[0]), sc.num_gpu_blocks, device)
    host = (KVStorage(model.config.kv_layout(TPB, layouts[1]), sc.num_host_blocks)
            if sc.num_host_blocks else None)
    for storage in (gpu, host):
        if storage is not None:
            storage.fill_(float("nan"))  # reading a slot nobody wrote poisons the logits
    return ModelEngine(model, manager, scheduler, TorchTransferEngine(gpu, host),
                       record_logits=True)


def run_workload(engine: ModelEngine, sc: Scenario) -> dict[str, RequestResult]:
    """Two requests arrive per step, so later ones find earlier ones cached."""
    pending = [Request(f"r{i}", prompt, sc.max_output_tokens, salt=salt)
               for i, (prompt, salt) in enumerate(make_prompts(sc))]
    while pending or engine.scheduler.has_unfinished():
        for req in pending[:2]:
            engine.add_request(req)
        del pending[:2]
        engine.step()
        engine.manager.check_invariants()
    return engine.results


def assert_like_full_recompute(model: LlamaModel, results: dict[str, RequestResult],
                               atol: float) -> None:
    """Every computed position's logits match a cacheless recompute of the same tokens;
    every greedy token is the recompute's argmax (up to ties within ``atol``)."""
    for r in results.values():
        assert r.finished and len(r.output) > 0, r.request_id
        tokens = r.prompt + r.output
        ref = model.full_recompute(tokens[:-1]).cpu()
        last_prompt = len(r.prompt) - 1
        assert set(range(last_prompt, len(tokens) - 1)) <= set(r.logits), r.request_id
        for pos, row in r.logits.items():
            diff = (row - ref[pos]).abs().max().item()
            assert diff < atol, (r.request_id, pos, diff)
        for i, token in enumerate(r.output):
            row = ref[last_prompt + i]
            assert row[token] >= row.max() - (0.0 if atol <= FP32_ATOL else atol), (
                r.request_id, i, token, int(row.argmax()))


def assert_scenario_happened(sc: Scenario, engine: ModelEngine) -> None:
    """The run really exercised what its scenario is about."""
    stats = engine.manager.stats
    copies = engine.transfer.stats
    assert stats.num_reused_tokens > 0
    assert stats.num_partial_copies + stats.num_partial_in_place > 0
    assert copies.num_partial_ops > 0
    if sc.num_host_blocks:
        assert stats.gpu.offloaded_blocks > 0 and stats.host.onboarded_blocks > 0
        assert copies.bytes_h2d > 0 and copies.bytes_d2h > 0
    if sc.capacity_policy == "max_utilization":
        assert sum(r.num_preemptions for r in engine.results.values()) > 0
    if sc.max_chunk_tokens is not None:
        assert copies.num_batches < copies.num_ops  # copies were batched, not one by one


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda sc: sc.name)
@pytest.mark.parametrize("layouts", [("block_major", "block_major"),
                                     ("layer_major", "block_major")], ids=["bm", "lm-bm"])
def test_cached_runs_equal_full_recompute_fp32(sc: Scenario, layouts: tuple[str, str]) -> None:
    """fp32 on CPU: every logit within 1e-4 of a full recompute, tokens identical."""
    engine = make_engine(sc, "cpu", layouts=layouts)
    results = run_workload(engine, sc)
    assert_scenario_happened(sc, engine)
    assert_like_full_recompute(engine.model, results, FP32_ATOL)


@pytest.mark.parametrize("seed", range(4))
def test_random_workloads_equal_full_recompute(seed: int) -> None:
    """Random pools, budgets, policies and layouts: still exact (fp32, CPU)."""
    rng = random.Random(seed)
    sc = Scenario(f"random-{seed}", num_gpu_blocks=rng.randrange(20, 48),
                  num_host_blocks=rng.choice((0, 16, 64)),
                  max_num_tokens=rng.randrange(12, 64),
                  capacity_policy=rng.choice(("guaranteed_no_evict", "max_utilization")),
                  max_chunk_tokens=rng.choice((None, 5, 9)), num_requests=16,
                  max_output_tokens=rng.randrange(2, 8), salts=(None, "x"), seed=100 + seed)
    layouts = rng.choice([("block_major", "block_major"), ("layer_major", "layer_major"),
                          ("layer_major", "block_major")])
    engine = make_engine(sc, "cpu", layouts=layouts)
    results = run_workload(engine, sc)
    assert engine.manager.stats.num_reused_tokens > 0
    assert_like_full_recompute(engine.model, results, FP32_ATOL)


@pytest.mark.parametrize("seed", range(3))
def test_failed_copies_degrade_to_recompute_and_stay_exact(seed: int) -> None:
    """Copies that fail at random (offloads, onboards, partial copies) never leave stale
    KV behind: the affected requests recompute, invariants hold, outputs stay exact."""
    rng = random.Random(seed)
    sc = Scenario(f"faults-{seed}", num_gpu_blocks=24, num_host_blocks=64, max_num_tokens=48,
                  num_requests=20, salts=(None, "tenant-b"), seed=200 + seed)
    engine = make_engine(sc, "cpu")

    def flaky(batch: object) -> None:
        if rng.random() < 0.3:
            raise RuntimeError("injected copy failure")

    engine.transfer.before_batch = flaky
    results = run_workload(engine, sc)
    assert engine.num_failed_steps > 0 and engine.manager.stats.num_failed_transfers > 0
    assert engine.manager.num_sequences == 0  # nothing leaked
    engine.manager.check_invariants()
    assert_like_full_recompute(engine.model, results, FP32_ATOL)


@CUDA
@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda sc: sc.name)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_runs_equal_full_recompute_cuda(sc: Scenario, dtype: str) -> None:
    """On CUDA, layer-major GPU pool over a pinned host: fp32 within 1e-4, bf16 within
    0.1 (see BF16_ATOL)."""
    engine = make_engine(sc, "cuda", dtype=dtype, layouts=("layer_major", "block_major"))
    results = run_workload(engine, sc)
    assert_scenario_happened(sc, engine)
    assert_like_full_recompute(engine.model, results,
                               FP32_ATOL if dtype == "float32" else BF16_ATOL)


@pytest.mark.parametrize("names", ["ops", "nothing", "plain", "other ops", "bad indices"])
def test_a_transfer_error_without_indices_degrades_to_recompute(names: str) -> None:
    """An engine of another project may raise a TransferError naming only its failed ops,
    or nothing, or a plain RuntimeError (a CUDA error). The first two plans with an onboard
    fail whole that way: before, the engine read only ``failed_indices``, empty, so nothing
    was aborted and the step read unfilled (NaN) slots, and a plain RuntimeError left the
    scheduler between step and update, refusing every later step; now they are recomputed
    and every answer equals a full recompute. So too (red team 22c) where the error names
    ops the plan does not hold (``failed_in`` matched none: the plan counted as done, and
    the step read the NaN) or indices past the plan (``transfer_failed`` refused them and
    the step raised to the caller)."""
    sc = next(sc for sc in SCENARIOS if sc.name == "host_tier")
    engine = make_engine(sc, "cpu")
    submit = engine.transfer.submit
    failures = [0]

    def failing_submit(plan: TransferPlan) -> TransferHandle:
        if failures[0] < 2 and OpKind.ONBOARD in {op.kind for op in plan.ops}:
            failures[0] += 1
            if names == "plain":
                raise RuntimeError("CUDA error: unspecified launch failure")
            if names == "other ops":
                raise TransferError("injected", [op._replace(num_tokens=op.num_tokens + 100)
                                                 for op in plan.ops])
            if names == "bad indices":
                raise TransferError("injected", (), [len(plan) + 5])
            raise TransferError("injected", plan.ops if names == "ops" else ())
        return submit(plan)

    engine.transfer.submit = failing_submit  # type: ignore[method-assign]
    results = run_workload(engine, sc)
    assert failures[0] == 2 and engine.num_failed_steps == 2
    assert engine.manager.stats.num_failed_transfers > 0
    assert_like_full_recompute(engine.model, results, FP32_ATOL)
    assert engine.manager.num_sequences == 0


def half_a_pass(engine: ModelEngine, fails: Callable[[Sequence[int], int], bool]) -> list[int]:
    """Make the engine's forward passes for which ``fails(tokens, start_pos)`` says so
    write NaN K/V over every position they were to compute (a pass dying halfway through
    its layers), then raise as a CUDA out-of-memory would. Returns the list the faults are
    counted in."""
    forward_chunk = engine.model.forward_chunk
    faults = [0]

    def failing(kv: KVStorage, block_table: Sequence[int], tokens: Sequence[int],
                start_pos: int, before_layer: Callable[[int], None] | None = None
                ) -> Tensor:
        if not fails(tokens, start_pos):
            return forward_chunk(kv, block_table, tokens, start_pos, before_layer)
        faults[0] += 1
        for layer in range(kv.layout.num_layers):
            # NOTE: as a real pass, each layer after its copies (``before_layer``): the
            # step's plan may still be offloading the blocks these slots held. Written
            # without it, the NaN raced the offload on a busy GPU and reached the host copy.
            if before_layer is not None:
                before_layer(layer)
            for pos in range(start_pos, start_pos + len(tokens)):
                kv.layer(layer)[block_table[pos // TPB], :, pos % TPB] = float("nan")
        raise RuntimeError("CUDA out of memory (injected)")

    engine.model.forward_chunk = failing  # type: ignore[method-assign]
    return faults


@pytest.mark.parametrize("sc", SCENARIOS[1:], ids=lambda sc: sc.name)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_failed_forward_passes_degrade_to_recompute_and_stay_exact(sc: Scenario,
                                                                   device: str) -> None:
    """Forward passes (prefill chunks and decodes) that fail at random after writing NaN
    over what they were to compute: the blocks they were to fill leave the cache, their
    requests recompute, and every logit equals a full recompute. Before, the first fault
    came out between the scheduler's step and update: every later step was refused, and
    the blocks the step had stored for reuse held NaN for every later request."""
    rng = random.Random(sc.seed)
    engine = make_engine(sc, device, layouts=("layer_major", "block_major"))
    engine.max_forward_faults = 1_000  # the fault is transient: never give up here
    faults = half_a_pass(engine, lambda tokens, start_pos: rng.random() < 0.2)
    results = run_workload(engine, sc)
    assert faults[0] == engine.num_failed_forwards > 5
    assert engine.manager.stats.num_failed_computes == faults[0]
    assert engine.manager.num_sequences == 0  # nothing leaked
    engine.manager.check_invariants()
    assert all(r.stop_reason == "length" for r in results.values())
    assert_like_full_recompute(engine.model, results, FP32_ATOL)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_max_forward_faults_is_checked(bad: object) -> None:
    sc = SCENARIOS[0]
    engine = make_engine(sc, "cpu")
    with pytest.raises(ValueError, match=r"max_forward_faults must be an int >= 1, got "):
        ModelEngine(engine.model, engine.manager, engine.scheduler, engine.transfer,
                    max_forward_faults=bad)  # type: ignore[arg-type]


def test_a_request_whose_forward_pass_keeps_failing_ends_with_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A prompt whose pass always fails (here: a prompt no other request has) is tried
    ``max_forward_faults`` times, then ends ("error", the fault kept, logged each time);
    the others' answers equal a full recompute."""
    import logging

    sc = next(sc for sc in SCENARIOS if sc.name == "host_tier")
    engine = make_engine(sc, "cpu")
    prompt = [9, 8, 7, 6, 5, 4, 255, 3]
    faults = half_a_pass(engine, lambda tokens, start_pos: list(tokens) == prompt)
    engine.add_request(Request("bad", prompt, 4))
    with caplog.at_level(logging.ERROR, logger="kvtier.model.engine"):
        results = run_workload(engine, sc)
    bad = results.pop("bad")
    assert bad.finished and bad.stop_reason == "error" and bad.output == []
    assert bad.num_forward_faults == faults[0] == engine.max_forward_faults == 3
    assert bad.error == "forward pass: RuntimeError: CUDA out of memory (injected)"
    assert [r.getMessage().startswith("kvtier: the forward pass of request 'bad' raised")
            for r in caplog.records] == [True] * 3
    assert engine.manager.num_sequences == 0
    engine.manager.check_invariants()
    assert all(r.stop_reason == "length" for r in results.values())
    assert_like_full_recompute(engine.model, results, FP32_ATOL)


def test_resets_of_the_prefix_cache_with_running_requests_stay_exact() -> None:
    """``scheduler.reset_prefix_cache(reset_running_requests=True)`` every third step (as
    vLLM's after a weight update): the running requests are preempted and recompute from
    scratch over NaN-poisoned pools, every logit matches a full recompute, and the greedy
    outputs are those of a run without resets."""
    sc = SCENARIOS[1]
    truth = {rid: r.output for rid, r in run_workload(make_engine(sc, "cpu"), sc).items()}
    engine = make_engine(sc, "cpu")
    pending = [Request(f"r{i}", prompt, sc.max_output_tokens, salt=salt)
               for i, (prompt, salt) in enumerate(make_prompts(sc))]
    num_resets = 0
    while pending or engine.scheduler.has_unfinished():
        for req in pending[:2]:
            engine.add_request(req)
        del pending[:2]
        if engine.num_steps % 3 == 2 and engine.scheduler.running:
            assert engine.scheduler.reset_prefix_cache(reset_running_requests=True)
            assert engine.manager.cached_blocks() == []
            num_resets += 1
        engine.step()
        engine.manager.check_invariants()
    assert num_resets >= 3
    assert sum(r.num_preemptions for r in engine.results.values()) >= num_resets
    assert {rid: r.output for rid, r in engine.results.items()} == truth
    assert_like_full_recompute(engine.model, engine.results, FP32_ATOL)
