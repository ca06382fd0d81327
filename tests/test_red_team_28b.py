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
from plan_ops import apply_op


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
            apply_op(plan.op(i), self.gpu, self.host)

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


# ---- stop conditions and lengths ----------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("max_tokens", [1, 2, 4, 5])
def test_a_stop_or_the_length_ends_a_request_and_its_computed_blocks_serve_the_next(
        prompt_len: int, max_tokens: int) -> None:
    """Prompts of one token, a block -1, a block, a block +1 and two blocks; outputs of 1
    to a block +1 tokens, or a stop on the very first token: the request ends with exactly
    its tokens, every slot comes back, and an identical prompt + output then reuses every
    full block whose KV was computed (all but the last sampled token's), credited exactly."""
    for stop_first in (False, True):
        engine = FakeEngine(max_num_tokens=8)
        prompt = list(range(1, prompt_len + 1))
        engine.sched.add_request(Request("a", prompt, max_tokens))
        step = engine.step(frozenset({"a"}) if stop_first else frozenset())
        assert step.context_chunks[0].num_tokens == prompt_len
        engine.drain()
        output = engine.finished["a"]
        assert len(output) == (1 if stop_first else max_tokens)
        computed = prompt + output[:-1]
        num_full = len(computed) // 4 * 4
        assert engine.mgr.lookup([*computed, 999]).num_tokens == num_full
        engine.sched.add_request(Request("b", [*computed, 999], 1))
        step = engine.step()
        assert step.num_reused_tokens == step.num_credited_tokens == num_full
        engine.drain()


def test_update_refusals_change_nothing_and_extra_ids_are_ignored() -> None:
    """update() refuses a missing token, a bool, a NumPy bool, a float, a list and a
    negative id (ValueError naming the request) and a stop id that is no str (TypeError),
    the step still waiting and nothing changed; a token for a request outside the step or
    mid-prefill, and a stop for one that sampled nothing, are ignored (a batch sampled
    row by row, as vLLM discards a partial prefill's sample); a NumPy int is its int."""
    np = pytest.importorskip("numpy")
    engine = FakeEngine(max_num_tokens=8)
    engine.sched.add_request(Request("a", [1, 2, 3, 4, 5], 4))
    engine.sched.add_request(Request("b", list(range(10, 22)), 4))
    step = engine.sched.step()
    engine.run_plan(step)
    sampled = engine.forward(step)
    assert set(sampled) == {"a"}  # 'b' computes 3 of its 12 prompt tokens
    version = engine.mgr.version
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "got None"), ({"a": True}, "got True"), ({"a": np.bool_(1)}, "bool"),
        ({"a": 5.0}, "got 5.0"), ({"a": [5]}, r"got \[5\]"), ({"a": -1}, "got -1")]
    for bad, match in cases:
        with pytest.raises(ValueError, match=rf"sampled token of 'a' .*{match}"):
            engine.sched.update(step, bad)
        assert engine.sched.unapplied_step is step and engine.mgr.version == version
        assert engine.sched.running["a"].output == []
    with pytest.raises(TypeError, match="b'a'"):
        engine.sched.update(step, sampled, {b"a"})  # type: ignore[arg-type]
    assert engine.sched.unapplied_step is step
    finished = engine.sched.update(step, {"a": np.int64(sampled["a"]), "b": 7, "zz": 8},
                                   {"b", "zz"})
    assert finished == []
    assert engine.sched.running["a"].output == [sampled["a"]]
    assert type(engine.sched.running["a"].output[0]) is int
    assert engine.sched.running["b"].output == [] and engine.sched.running["b"].in_prefill
    engine.check()
    engine.drain()
    assert len(engine.finished["a"]) == len(engine.finished["b"]) == 4


# ---- call order ---------------------------------------------------------------------------


def test_call_order_misuse_is_refused_and_the_loop_goes_on_exactly() -> None:
    """step twice, update with no step, an old step's update, an abort and a reset between
    step and update are refused (RuntimeError), nothing changed; a request queued between
    step and update is admitted by the next step; aborting a finished id returns None and
    queuing its Request again (it stopped early) resumes it from its cached blocks."""
    engine = FakeEngine(max_num_tokens=8)
    sched = engine.sched
    first = Request("a", [1, 2, 3, 4, 5, 6], 6)
    sched.add_request(first)
    with pytest.raises(RuntimeError, match="no step is waiting"):
        sched.update(ScheduledStep((), (), 0, engine.mgr.take_plan(), (), 0, 0, 0), {})
    step = sched.step()
    version = engine.mgr.version
    with pytest.raises(RuntimeError, match="before update"):
        sched.step()
    with pytest.raises(RuntimeError, match="between step"):
        sched.abort("a")
    with pytest.raises(RuntimeError, match="between step"):
        sched.reset_prefix_cache(True)
    assert engine.mgr.version == version and sched.unapplied_step is step
    sched.add_request(Request("b", [1, 2, 3, 4, 5, 6, 7], 2))  # queued between: fine
    engine.run_plan(step)
    sched.update(step, engine.forward(step))
    with pytest.raises(RuntimeError, match="no step is waiting"):
        sched.update(step, {"a": 1})
    engine.check()
    step = engine.step(frozenset({"a"}))  # 'a' decodes and stops; 'b' reuses its block
    assert step.decode_request_ids == ("a",)
    assert [(c.request_id, c.first_token, c.num_reused_tokens) for c in step.context_chunks] \
        == [("b", 4, 4)]
    assert engine.finished["a"] == first.output and len(first.output) == 2
    assert sched.abort("a") is None
    # Queued again: it prefills 6 prompt + 2 output tokens; the KV of 7 was computed, one
    # full block of it (|1 2 3 4|5 6 o o|) is cached.
    sched.add_request(first)
    step = engine.step()
    chunk = next(c for c in step.context_chunks if c.request_id == "a")
    assert chunk.first_token == chunk.num_reused_tokens == step.num_credited_tokens == 4
    engine.drain()
    assert len(engine.finished["a"]) == 6 and engine.finished["a"][:2] == first.output[:2]


# ---- budgets ------------------------------------------------------------------------------


def test_a_preempted_request_resumes_from_the_host_tier_credited_exactly() -> None:
    """Under max_utilization two requests outgrow an 8-block pool: the newest is preempted
    and its blocks, offloaded to the host tier, are onboarded for its recompute: it reuses
    all 16 tokens whose KV was computed, credited exactly, counted as resumed."""
    engine = FakeEngine(tpb=4, gpu=8, host=8, max_num_tokens=16,
                        capacity_policy="max_utilization")
    engine.sched.add_request(Request("a", list(range(1, 9)), 12))
    engine.sched.add_request(Request("b", list(range(20, 28)), 12))
    resumed = []
    for _ in range(60):
        if not engine.sched.has_unfinished():
            break
        step = engine.step()
        resumed += [c for c in step.context_chunks if c.request_id == "b" and c.first_token]
    engine.drain()
    assert [(c.first_token, c.num_reused_tokens) for c in resumed] == [(16, 16)]
    stats = engine.mgr.stats
    assert (stats.num_resumed, stats.num_resumed_reused_tokens) == (1, 16)
    assert stats.host.onboarded_blocks >= 1
    assert len(engine.finished["a"]) == len(engine.finished["b"]) == 12


def test_num_computed_tokens_is_the_prefills_progress_not_the_decodes() -> None:
    """As the Request docstring says: num_computed_tokens stops at the tokens the
    admission prefills (unlike vLLM's, it does not count decodes); a decode's position is
    len(tokens) - 1, which the block table covers."""
    engine = FakeEngine(max_num_tokens=4)
    req = Request("a", [1, 2, 3, 4, 5, 6], 5)
    engine.sched.add_request(req)
    progress = []
    for _ in range(6):
        step = engine.step()
        progress.append((req.num_computed_tokens, req.num_prefill_tokens, len(req.output)))
        if step.decode_request_ids and "a" in engine.sched.running:
            assert len(engine.mgr.block_table("a")) * 4 >= len(req.tokens) - 1
    assert progress == [(4, 6, 0), (6, 6, 1), (6, 6, 2), (6, 6, 3), (6, 6, 4), (6, 6, 5)]
