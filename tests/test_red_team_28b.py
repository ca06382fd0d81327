"""Red team 28b: an engine's own serving loop over ``Scheduler`` + ``KVCacheManager``.

A fake data plane keeps, per GPU and host slot, the prefix whose KV each position holds;
every step's forward pass checks each position it reads and writes the ones it computes,
as a real engine's attention would. The loop adds requests, steps, samples, stops,
aborts and preempts, and after each step the credited reuse is the reuse obtained and
every book recounts."""

from __future__ import annotations

import random
from typing import Any

import pytest

from kvtier import CacheConfig, KVCacheManager
from kvtier.invariants import check_books
from kvtier.scheduler import Request, ScheduledStep, Scheduler, SchedulerConfig
from kvtier.tier import Tier
from kvtier.transfer.plan import OpKind


def next_token(tokens: list[int]) -> int:
    """The token the fake model samples after ``tokens``."""
    return (sum(tokens) * 31 + len(tokens)) % 1000 + 1


class FakeEngine:
    """An engine loop over a scheduler and manager, with a data plane that checks reads."""

    def __init__(self, tpb: int = 4, gpu: int = 16, host: int = 0, **config: Any) -> None:
        self.tpb = tpb
        self.mgr = KVCacheManager(CacheConfig(tokens_per_block=tpb, num_gpu_blocks=gpu,
                                              num_host_blocks=host))
        self.sched = Scheduler(self.mgr, SchedulerConfig(**config))
        self.gpu: dict[int, list[object]] = {s: [None] * tpb for s in range(gpu)}
        self.host: dict[int, list[object]] = {s: [None] * tpb for s in range(host)}
        self.finished: dict[str, list[int]] = {}

    def run_plan(self, step: ScheduledStep) -> None:
        plan = step.transfer_plan
        for i in range(len(plan)):
            op = plan.op(i)
            src = self.gpu if op.src_tier is Tier.GPU else self.host
            dst = self.gpu if op.dst_tier is Tier.GPU else self.host
            data = list(src[op.src_slot])
            if op.kind is OpKind.COPY:
                dst[op.dst_slot][:op.num_tokens] = data[:op.num_tokens]
            else:
                dst[op.dst_slot] = data

    def forward(self, step: ScheduledStep) -> dict[str, int]:
        """Check every position the step reads, write those it computes, sample."""
        tpb = self.tpb
        sampled = {}
        for chunk in step.context_chunks:
            tokens = self.sched.running[chunk.request_id].tokens
            table = self.mgr.block_table(chunk.request_id)
            assert len(table) * tpb >= chunk.first_token + chunk.num_tokens, chunk
            for p in range(chunk.first_token):
                assert self.gpu[table[p // tpb]][p % tpb] == tuple(tokens[:p + 1]), (chunk, p)
            for p in range(chunk.first_token, chunk.first_token + chunk.num_tokens):
                self.gpu[table[p // tpb]][p % tpb] = tuple(tokens[:p + 1])
            if chunk.first_token + chunk.num_tokens >= len(tokens):
                sampled[chunk.request_id] = next_token(tokens)
        for rid in step.decode_request_ids:
            tokens = self.sched.running[rid].tokens
            table = self.mgr.block_table(rid)
            assert len(table) * tpb >= len(tokens), (rid, table, tokens)
            for p in range(len(tokens) - 1):
                assert self.gpu[table[p // tpb]][p % tpb] == tuple(tokens[:p + 1]), (rid, p)
            p = len(tokens) - 1
            self.gpu[table[p // tpb]][p % tpb] = tuple(tokens)
            sampled[rid] = next_token(tokens)
        return sampled

    def step(self, stopped: frozenset[str] = frozenset()) -> ScheduledStep:
        """One step of the loop: schedule, copy, compute, sample, update, check."""
        step = self.sched.step()
        assert step.num_credited_tokens == step.num_reused_tokens, step
        self.run_plan(step)
        for req in self.sched.update(step, self.forward(step), stopped):
            self.finished[req.request_id] = list(req.output)
        self.check()
        return step

    def check(self) -> None:
        self.sched.check_invariants()
        check_books(self.mgr._cache, self.mgr._live)

    def drain(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                assert self.mgr.num_sequences == 0
                assert self.mgr.num_free_gpu_blocks == self.mgr.config.num_gpu_blocks
                return
            self.step()
        raise AssertionError("the loop did not finish its requests")


# ---- chunked prefill off: what a request queued with output prefills ---------------------


def test_without_chunked_prefill_a_request_whose_prompt_and_output_pass_the_budget_is_refused(
        ) -> None:
    """A conversation resumed (queued with its output) prefills prompt and output; with
    chunked prefill off, one longer than max_num_tokens was admitted and chunked (a second
    chunk from token 8), which an engine that turned chunks off cannot run."""
    engine = FakeEngine(max_num_tokens=8, enable_chunked_prefill=False)
    req = Request("a", [1, 2, 3, 4, 5, 6], 10, output=[7, 8, 9, 10, 11])
    with pytest.raises(ValueError, match=r"'a' has 6 prompt tokens and 5 output tokens to "
                                         r"prefill but max_num_tokens is 8"):
        engine.sched.add_request(req)
    assert not engine.sched.has_unfinished() and not req.held
    engine.check()


def test_without_chunked_prefill_every_prefill_of_the_loop_is_one_chunk() -> None:
    """Requests finished by a stop and queued again with their output, within the budget,
    are prefilled in one chunk each, their decoded blocks reused."""
    engine = FakeEngine(max_num_tokens=8, enable_chunked_prefill=False)
    first = Request("a", [1, 2, 3, 4, 5], 6)
    engine.sched.add_request(first)
    engine.step()
    engine.step(stopped=frozenset({"a"}))  # a stop on its second token
    assert engine.finished["a"] == first.output and len(first.output) == 2
    engine.sched.add_request(first)  # queued again: prompt and output, 7 tokens
    step = engine.step()
    assert step.context_chunks[0].first_token == 4  # the first block reused
    assert step.context_chunks[0].num_tokens == 3
    engine.drain()
    assert len(engine.finished["a"]) == 6


# ---- the loop at random: budgets below a block, batch of one, stops, aborts, re-adds ----


@pytest.mark.parametrize("seed", range(12))
def test_an_engine_loop_at_random_reads_only_what_it_computed_and_leaks_nothing(
        seed: int) -> None:
    """Random adds (some resumed with output, some re-added after a stop or an abort),
    steps with stops on any sampled token, aborts refused between step and update, resets,
    under budgets below a block, batches of one and both capacity policies: every position
    a step reads holds its prefix's KV, the credit is exact, no block is left held."""
    rng = random.Random(seed)
    tpb = rng.choice([1, 2, 4])
    engine = FakeEngine(
        tpb=tpb, gpu=rng.randint(6, 16), host=rng.choice([0, 4, 12]),
        max_num_tokens=rng.choice([1, 3, 4, 5, 16]), max_batch_size=rng.choice([1, 2, 8]),
        enable_chunked_prefill=rng.random() < 0.7,
        capacity_policy=rng.choice(["guaranteed_no_evict", "max_utilization"]))
    sched = engine.sched
    bases = [[rng.randint(1, 5) for _ in range(rng.randint(1, 10))] for _ in range(3)]
    requests: dict[str, Request] = {}
    for i in range(60):
        r = rng.random()
        if r < 0.3:
            known = [q for q in requests.values()
                     if not q.held and len(q.output) < q.max_output_tokens]
            if known and rng.random() < 0.3:
                req = rng.choice(known)  # stopped or aborted: queued again with its output
            else:
                output = [rng.randint(1, 9) for _ in range(rng.choice([0, 0, 1, 3]))]
                req = Request(f"r{i}", rng.choice(bases) + [rng.randint(1, 3)],
                              len(output) + rng.randint(1, 6), output=output)
            try:
                sched.add_request(req)
            except ValueError:
                assert not req.held
                continue
            requests[req.request_id] = req
        elif r < 0.38 and requests:
            sched.abort(rng.choice(list(requests)))
            engine.check()
        elif r < 0.4:
            if sched.reset_prefix_cache(rng.random() < 0.5):
                engine.gpu = {s: [None] * tpb for s in engine.gpu}
                engine.host = {s: [None] * tpb for s in engine.host}
            engine.check()
        elif sched.has_unfinished():
            step = sched.step()
            assert step.num_credited_tokens == step.num_reused_tokens, step
            assert step.num_scheduled_tokens <= sched.config.max_num_tokens
            if requests:
                with pytest.raises(RuntimeError, match="between step"):
                    sched.abort(rng.choice(list(requests)))
            engine.run_plan(step)
            sampled = engine.forward(step)
            stopped = frozenset(rid for rid in sampled if rng.random() < 0.15)
            sched.update(step, sampled, stopped)
            engine.check()
    engine.drain(400)
