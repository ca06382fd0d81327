"""Red team 29b: the reuse kvtier reports is the reuse obtained.

Per request (a first chunk's ``num_reused_tokens``), per step (``num_reused_tokens``) and in
the manager's counters (``CacheStats``): a request whose onboard or forward pass fails in its
admission's step degrades to recompute and is reported as having reused nothing there (its
credit lost); a request queued with output reports the reuse its prefill of prompt and
output got. A seeded loop over a fake data plane checks each figure against the positions
the step's forward passes really read from cache."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from kvtier import CacheConfig, KVCacheManager, Request, ScheduledStep, Scheduler, SchedulerConfig
from kvtier.invariants import check_books
from kvtier.metrics import CacheStats
from kvtier.tier import Tier
from plan_ops import apply_op

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


def test_a_request_whose_admission_reused_less_than_its_lookup_reports_the_admission() -> None:
    """r5's lookup before the step promises 6 GPU tokens (a full block and 2 of r0's
    [5 6 7 8] by partial copy); its admission reuses the full block alone (4) and computes
    3. Its result said 6 reused, 1 computed: the lookup's promise, not the admission."""
    pytest.importorskip("torch", reason="the model engine needs torch: pip install "
                                        "'kvtier[torch]'")
    from kvtier.model import LlamaModel, ModelConfig, ModelEngine
    from kvtier.storage import KVStorage
    from kvtier.transfer.torch_engine import TorchTransferEngine

    model = LlamaModel(ModelConfig(), "cpu")
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=9, num_host_blocks=0,
                                     enable_partial_reuse=True, copy_on_partial_reuse=True,
                                     eviction_policy="priority-lru"))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=32, enable_chunked_prefill=False))
    layout = model.config.kv_layout(4)
    engine = ModelEngine(model, mgr, sched, TorchTransferEngine(KVStorage(layout, 9, "cpu"),
                                                                KVStorage(layout, 1)))
    chunks = []
    for queued in ([Request("r0", [*PROMPT, 2], 1), Request("r1", [5, 5, 5, 5, 5, 1], 5,
                                                           output=[6, 7, 5])],
                   [Request("r2", [1, 2, 3, 1], 5, output=[7, 6, 1])],
                   [Request("r3", [1, 2, 3, 4, 7, 7, 3], 3),
                    Request("r4", [1, 2, 3, 3], 6, output=[7, 3, 5])],
                   [],
                   [Request("r5", [1, 2, 3, 4, 5, 6, 1], 2)]):
        for req in queued:
            engine.add_request(req)
        step = engine.step()[0]
        chunks.append([(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
                       for c in step.context_chunks])
    assert chunks[-1] == [("r5", 4, 3, 4)]
    drain_engine(engine)
    # r2 and r4 reused 3 of r0's [1 2 3 4] by partial copy; r5 nothing partially.
    assert {rid: split(r) for rid, r in engine.results.items()} == {
        "r0": (0, 0, 0, 10), "r1": (0, 0, 0, 9), "r2": (3, 0, 0, 4), "r3": (4, 0, 0, 3),
        "r4": (3, 0, 0, 4), "r5": (4, 0, 0, 3)}
    assert mgr.stats.num_partial_tokens == 3 + 3


# ---- a seeded loop: reported reuse == the reuse the data plane saw read -------------------

BAD = "garbage"  # a position a failed copy or pass left, or an unaccepted draft's


def next_token(tokens: list[int]) -> int:
    """The token the fake model samples after ``tokens`` (its drafts are the same)."""
    return (sum(tokens) * 31 + len(tokens)) % 7 + 1


class ReuseLoop:
    """An engine loop over a scheduler and manager whose data plane keeps, per slot and
    position, the prefix whose KV it holds. Copies and passes fail at random. Each step's
    forward passes check every position they read; a first chunk's reads below its first
    token are the reuse its admission obtained, counted here from the data plane and the
    step's final chunks, against every figure kvtier reports."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        tpb = self.tpb = 4
        gpu, host = rng.randint(5, 12), rng.choice([0, 6, 12])
        self.mgr = KVCacheManager(CacheConfig(
            tokens_per_block=tpb, num_gpu_blocks=gpu, num_host_blocks=host,
            enable_partial_reuse=rng.random() < 0.7, copy_on_partial_reuse=rng.random() < 0.7,
            eviction_policy=rng.choice(["lru", "priority-lru"])))
        self.sched = Scheduler(self.mgr, SchedulerConfig(
            max_num_tokens=rng.choice([6, 9, 16, 32]), max_batch_size=rng.choice([2, 8]),
            enable_chunked_prefill=rng.random() < 0.7,
            capacity_policy=rng.choice(["guaranteed_no_evict", "max_utilization"]),
            num_speculative_tokens=rng.choice([0, 0, 2])))
        self.gpu: dict[int, list[object]] = {s: [None] * tpb for s in range(gpu)}
        self.host: dict[int, list[object]] = {s: [None] * tpb for s in range(host)}
        self.fresh: set[str] = set()  # queued, not yet admitted: the next admission's a query
        self.requests: dict[str, Request] = {}
        self.num_batches = 0
        self.totals = {"reused": 0, "host": 0, "lost": 0, "failed": 0, "multi": 0}

    # -- the data plane --

    def run_plan(self, plan: Any, failed: set[int]) -> set[int]:
        """Run the plan's ops (a failed one writes garbage); return the GPU slots that
        hold a host block's copy now (onboarded, or copied from one)."""
        from_host: set[int] = set()
        for i in range(len(plan)):
            op = plan.op(i)
            dst = self.gpu if op.dst_tier is Tier.GPU else self.host
            if i in failed:
                dst[op.dst_slot] = [BAD] * self.tpb
            else:
                apply_op(op, self.gpu, self.host)
            if op.dst_tier is Tier.GPU:
                via_host = op.src_tier is Tier.HOST or (op.src_slot in from_host)
                (from_host.add if via_host else from_host.discard)(op.dst_slot)
        return from_host

    def read(self, rid: str, tokens: list[int], end: int) -> None:
        table = self.mgr.block_table(rid)
        tpb = self.tpb
        for p in range(end):
            assert self.gpu[table[p // tpb]][p % tpb] == tuple(tokens[:p + 1]), (rid, p)

    def write(self, rid: str, tokens: list[int], start: int, end: int,
              marker: object = None) -> None:
        table = self.mgr.block_table(rid)
        tpb = self.tpb
        for p in range(start, end):
            self.gpu[table[p // tpb]][p % tpb] = (tuple(tokens[:p + 1]) if marker is None
                                                  else marker)

    # -- the loop --

    def add(self, i: int) -> None:
        rng = self.rng
        known = [q for q in self.requests.values()
                 if not q.held and len(q.output) < q.max_output_tokens]
        if known and rng.random() < 0.3:
            req = rng.choice(known)  # stopped or aborted: queued again with its output
        else:
            base = rng.choice([[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 7, 7], [5] * 8])
            output = [rng.randint(1, 7) for _ in range(rng.choice([0, 0, 0, 2, 5]))]
            req = Request(f"r{i}", base[:rng.randint(1, len(base))] + [rng.randint(1, 3)],
                          len(output) + rng.randint(1, 8), output=output,
                          skip_reading_prefix_cache=rng.random() < 0.1)
        try:
            self.sched.add_request(req)
        except ValueError:
            assert not req.held
            return
        self.requests[req.request_id] = req
        if not req.skip_reading_prefix_cache:
            self.fresh.add(req.request_id)

    def step(self) -> None:
        rng, sched, mgr = self.rng, self.sched, self.mgr
        before = replace(mgr.stats, gpu=replace(mgr.stats.gpu), host=replace(mgr.stats.host))
        real = mgr.add_sequence_batch
        batches = []

        def counted(specs: Any) -> Any:
            batches.append(1)
            return real(specs)

        mgr.add_sequence_batch = counted  # type: ignore[method-assign]
        try:
            step = sched.step()
        finally:
            del mgr.add_sequence_batch
        assert step.num_credited_tokens == step.num_reused_tokens, step
        admitted = {c.request_id: c for c in step.context_chunks
                    if c.first_token == c.num_reused_tokens}
        queries = {rid for rid in admitted if rid in self.fresh}
        self.fresh -= set(admitted)
        plan = step.transfer_plan
        failed = ({i for i in range(len(plan)) if rng.random() < 0.4}
                  if len(plan) and rng.random() < 0.2 else set())
        from_host = self.run_plan(plan, failed)
        if failed:
            self.totals["failed"] += 1
            step = sched.requeue_failed(step, mgr.transfer_failed(plan, sorted(failed)))
        ids = [c.request_id for c in step.context_chunks] + list(step.decode_request_ids)
        if ids and rng.random() < 0.1:
            rid = rng.choice(ids)  # its pass dies halfway: garbage where it was to write
            running = sched.running[rid]
            chunk = next((c for c in step.context_chunks if c.request_id == rid), None)
            if chunk is not None:
                self.write(rid, running.tokens, chunk.first_token,
                           chunk.first_token + chunk.num_tokens, BAD)
            else:
                self.write(rid, running.tokens, len(running.tokens) - 1,
                           len(running.tokens), BAD)
            self.totals["failed"] += 1
            step = sched.requeue_failed(step, mgr.compute_failed([rid]))
        # The forward passes: what each first chunk read from the cache is its reuse.
        obtained: dict[str, int] = {}
        host_read = 0
        sampled: dict[str, int | list[int]] = {}
        tpb = self.tpb
        for chunk in step.context_chunks:
            req = sched.running[chunk.request_id]
            tokens = req.tokens
            self.read(chunk.request_id, tokens, chunk.first_token)
            if chunk.request_id in admitted:
                obtained[chunk.request_id] = chunk.first_token
                if chunk.request_id in queries:
                    table = mgr.block_table(chunk.request_id)
                    host_read += sum(1 for p in range(chunk.first_token)
                                     if table[p // tpb] in from_host)
            end = chunk.first_token + chunk.num_tokens
            self.write(chunk.request_id, tokens, chunk.first_token, end)
            if end >= len(tokens):
                sampled[chunk.request_id] = next_token(tokens)
        drafts = step.num_draft_tokens or (0,) * len(step.decode_request_ids)
        for rid, num_drafts in zip(step.decode_request_ids, drafts, strict=True):
            tokens = sched.running[rid].tokens
            self.read(rid, tokens, len(tokens) - 1)
            cont = list(tokens)
            for _ in range(num_drafts + 1):
                cont.append(next_token(cont))
            accepted = rng.randint(0, num_drafts)
            self.write(rid, cont, len(tokens) - 1, len(tokens) + accepted)
            self.write(rid, cont, len(tokens) + accepted, len(tokens) + num_drafts, BAD)
            new = cont[len(tokens):len(tokens) + accepted + 1]
            sampled[rid] = new if num_drafts else new[0]
        # Reported == obtained: per request, per step, in the manager's counters.
        for rid, n in obtained.items():
            assert admitted[rid].num_reused_tokens == n, (rid, admitted[rid], n)
        assert step.num_reused_tokens == sum(obtained.values()), (step, obtained)
        s = mgr.stats
        got = sum(obtained.values())
        got_queries = sum(n for rid, n in obtained.items() if rid in queries)
        assert (s.num_reused_tokens + s.num_resumed_reused_tokens) - (
            before.num_reused_tokens + before.num_resumed_reused_tokens) == got
        assert s.num_reused_tokens - before.num_reused_tokens == got_queries
        assert s.num_lost_reused_tokens - before.num_lost_reused_tokens == \
            step.num_credited_tokens - step.num_reused_tokens
        tier_blocks = (s.gpu.reused_blocks + s.host.reused_blocks) * tpb
        assert tier_blocks + s.num_partial_tokens == s.num_reused_tokens
        if len(batches) <= 1:  # one batch: its host blocks are the ones it onboarded
            assert s.num_host_reused_tokens - before.num_host_reused_tokens == host_read
        else:
            self.totals["multi"] += 1
        self.totals["reused"] += got
        self.totals["host"] += host_read
        self.totals["lost"] += step.num_credited_tokens - step.num_reused_tokens
        stopped = frozenset(rid for rid in sampled if rng.random() < 0.15)
        sched.update(step, sampled, stopped)
        sched.check_invariants()
        check_books(mgr._cache, mgr._live)

    def run(self, num_ops: int) -> None:
        rng, sched = self.rng, self.sched
        for i in range(num_ops):
            r = rng.random()
            if r < 0.3:
                self.add(i)
            elif r < 0.36 and self.requests:
                rid = rng.choice(list(self.requests))
                if sched.abort(rid) is not None:
                    self.fresh.discard(rid)
            elif sched.has_unfinished():
                self.step()
        for _ in range(300):
            if not sched.has_unfinished():
                break
            self.step()
        assert not sched.has_unfinished() and self.mgr.num_sequences == 0
        assert self.mgr.num_free_gpu_blocks == self.mgr.config.num_gpu_blocks


@pytest.mark.parametrize("seed", range(300))
def test_the_reuse_reported_is_the_reuse_the_data_plane_read(seed: int) -> None:
    """Random adds (some with output, some skipping the cache, some queued again), aborts,
    steps with failed copies and passes, stops, drafts, chunked prefill, partial reuse, a
    host tier and preemption: every first chunk's reuse, every step's, and the manager's
    counters (queries' and recomputes' reuse, host hits, lost reuse) equal what the
    forward passes read from the cache."""
    loop = ReuseLoop(random.Random(seed))
    loop.run(40)
