"""Every fault kind at once, interleaved at random with arrivals and aborts, on the real
model engine: failed copies, failed forward passes (writing NaN first), a caller's sampler
that raises, aborts of queued and running requests, bad requests refused. After every step
the manager's books hold; at the end nothing is live, and every logit any request was given
equals a cacheless recompute of its tokens (pools start as NaN: a stale or unwritten block
read anywhere would show)."""

from __future__ import annotations

import random
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the data-plane tests need torch: "
                                            "pip install 'kvtier[torch]'")

from data_plane.test_model_exactness import (  # noqa: E402
    CUDA,
    FP32_ATOL,
    Scenario,
    half_a_pass,
    make_engine,
)
from kvtier.model import ModelEngine  # noqa: E402
from kvtier.model.sampling import Sampler, SamplingParams  # noqa: E402
from kvtier.scheduler import Request  # noqa: E402
from kvtier.transfer import TransferPlan  # noqa: E402
from kvtier.transfer.torch_handle import TransferHandle  # noqa: E402

SCENARIOS = [
    Scenario("host", num_gpu_blocks=24, num_host_blocks=64, max_num_tokens=48),
    Scenario("preempt", num_gpu_blocks=28, num_host_blocks=48, max_num_tokens=24,
             capacity_policy="max_utilization", max_chunk_tokens=7, max_output_tokens=8),
]


class Flaky(Sampler):
    """Greedy, but raises at the ``fail_at``-th token."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(SamplingParams(temperature=0.0))
        self.fail_at = fail_at
        self.num_calls = 0

    def sample(self, logits: Any) -> int:
        self.num_calls += 1
        if self.num_calls == self.fail_at:
            raise RuntimeError("sampler broke")
        return super().sample(logits)


def check_logits(engine: ModelEngine) -> int:
    """Every recorded logit row equals the cacheless recompute of the tokens up to its
    position; returns how many rows were checked."""
    n = 0
    for r in engine.results.values():
        if not r.logits:
            continue
        tokens = r.prompt + r.output
        ref = engine.model.full_recompute(tokens[:max(r.logits) + 1]).cpu()
        for pos, row in r.logits.items():
            assert (row - ref[pos]).abs().max().item() < FP32_ATOL, (r.request_id, pos)
            n += 1
    return n


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda sc: sc.name)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_every_fault_at_once_stays_exact(sc: Scenario, seed: int, device: str) -> None:
    rng = random.Random(seed)
    engine = make_engine(sc, device, layouts=("layer_major", "block_major"))
    prefixes = [[rng.randrange(256) for _ in range(rng.randrange(8, 30))] for _ in range(3)]
    half_a_pass(engine, lambda tokens, start_pos: rng.random() < 0.1)
    submit = engine.transfer.submit

    def flaky_submit(plan: TransferPlan) -> TransferHandle:
        if plan.ops and rng.random() < 0.15:
            raise RuntimeError("CUDA error: unspecified launch failure (injected)")
        return submit(plan)

    engine.transfer.submit = flaky_submit  # type: ignore[method-assign]
    added: list[str] = []
    for n in range(40):
        for _ in range(rng.randrange(3)):
            rid = f"r{n}-{len(added)}"
            prompt = rng.choice(prefixes)[:rng.randrange(4, 31)] + [
                rng.randrange(256) for _ in range(rng.randrange(1, 9))]
            sampler = Flaky(rng.randrange(1, 6)) if rng.random() < 0.15 else None
            engine.add_request(Request(rid, prompt, rng.randrange(1, sc.max_output_tokens + 1)),
                               sampler=sampler)
            added.append(rid)
        if rng.random() < 0.2:  # refused, changing nothing
            with pytest.raises(ValueError):
                engine.add_request(Request(f"bad{n}", [1, 2, 300], 2))
        if added and rng.random() < 0.15:
            engine.abort(rng.choice(added))
        if engine.scheduler.has_unfinished():
            engine.step()
        engine.manager.check_invariants()
    while engine.scheduler.has_unfinished():
        engine.step()
        engine.manager.check_invariants()
    assert engine.manager.num_sequences == 0
    results = engine.results
    assert all(results[rid].finished for rid in added if rid in results)
    assert engine.num_failed_forwards > 0 and engine.num_failed_steps > 0
    assert check_logits(engine) > 100
