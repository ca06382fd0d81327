"""TensorRT-LLM's capacity-scheduler tests, mirrored against kvtier's scheduler.

Each test names the test it mirrors (NVIDIA/TensorRT-LLM,
``cpp/tests/unit_tests/batch_manager/capacitySchedulerTest.cpp``) and asserts kvtier's exact
trace: per step, which requests run and which prefill chunks are computed. TensorRT-LLM's
policies map onto ``SchedulerConfig.capacity_policy``: GUARANTEED_NO_EVICT is
``guaranteed_no_evict`` (a request is admitted only with every block to its completion
reserved), MAX_UTILIZATION is ``max_utilization`` (admit greedily, preempt the newest running
request when a decode finds no block). STATIC_BATCH, LoRA page budgets, cross-attention pools
and request priorities have no kvtier counterpart.

The scale: kvtier's blocks are a power of two, so TensorRT-LLM's blocks of 10 tokens become
blocks of 8 and its lengths shrink with them (a 10-token prompt with 80 new tokens in a pool
of 10 blocks is here an 8-token prompt with 64 new tokens in a pool of 10 blocks: each
request needs 9 blocks to complete, as there). A step of the scheduler is one of
TensorRT-LLM's iterations: a request's prefill step samples its first token, each later step
one more, so a request with ``n`` new tokens that runs alone finishes in ``n`` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvtier import KVCacheManager, Request, Scheduler, SchedulerConfig
from kvtier.scheduler_config import CapacityPolicy
from peer_mirror.mirror_helpers import make_manager

# (first step, step after the last, running requests, preempted, prefill chunks as
# (request, first token, tokens, reused tokens)); consecutive steps that only decode the
# same requests are merged into one row.
Row = tuple[int, int, tuple[str, ...], tuple[str, ...], tuple[tuple[str, int, int, int], ...]]


def run(mgr: KVCacheManager, policy: CapacityPolicy, prompts: Sequence[Sequence[int]],
        max_output_tokens: int, max_chunk_tokens: int | None = None,
        arrivals: Callable[[int, Scheduler], None] | None = None) -> tuple[int, list[Row]]:
    """Serve ``prompts`` (request ``str(i)``) to the end; the number of steps and the trace.
    ``arrivals(step, scheduler)`` may queue more requests before a step."""
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=8192, capacity_policy=policy,
                                           max_chunk_tokens=max_chunk_tokens))
    for i, prompt in enumerate(prompts):
        sched.add_request(Request(str(i), list(prompt), max_output_tokens=max_output_tokens))
    rows: list[Row] = []
    n = 0
    while sched.has_unfinished():
        if arrivals is not None:
            arrivals(n, sched)
        step = sched.step()
        ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
        chunks = tuple((c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
                       for c in step.context_chunks)
        running = tuple(sorted(ids))
        last = rows[-1] if rows else None
        if (last is not None and last[2] == running and not last[3] and not last[4]
                and not step.preempted_request_ids and not chunks):
            rows[-1] = (last[0], n + 1, running, (), ())
        else:
            rows.append((n, n + 1, running, step.preempted_request_ids, chunks))
        sched.update(step, {rid: 1000 + n for rid in ids})
        mgr.check_invariants()
        sched.check_invariants()
        n += 1
        assert n < 1000, "the requests did not finish"
    return n, rows


def test_two_requests_that_fit_run_together_to_the_end() -> None:
    """Mirrors SimpleShouldFit (200 tokens of cache, two requests of 90: both run from the
    first iteration to the 80th) under both policies: 18 blocks hold both requests' 9, so
    both prefill in step 0 and decode together until step 64."""
    for policy in ("guaranteed_no_evict", "max_utilization"):
        steps, rows = run(make_manager(tokens_per_block=8, num_gpu_blocks=18,
                                       enable_block_reuse=False),
                          policy, [[1] * 8, [2] * 8], 64)
        assert steps == 64, policy
        assert rows == [(0, 1, ("0", "1"), (), (("0", 0, 8, 0), ("1", 0, 8, 0))),
                        (1, 64, ("0", "1"), (), ())], policy


def test_max_utilization_runs_both_then_preempts_the_newest() -> None:
    """Mirrors SimpleDoesntFitMaxUtilization (100 tokens of cache: both requests run until
    iteration 41, when request 1 is paused; request 0 finishes at 80, then request 1 comes
    back with its output as prompt, 51 tokens, and 39 new ones: 119 iterations). Here both
    decode until step 33, where request 0's token 41 needs a sixth block of a full pool:
    request 1 (the newer) is preempted with its 33 tokens of output; request 0 finishes in
    step 63, and request 1 prefills its 8 + 33 tokens in step 64 (nothing cached: reuse off,
    as there) and samples its last 31 by step 94."""
    steps, rows = run(make_manager(tokens_per_block=8, num_gpu_blocks=10,
                                   enable_block_reuse=False),
                      "max_utilization", [[1] * 8, [2] * 8], 64)
    assert steps == 95
    assert rows == [(0, 1, ("0", "1"), (), (("0", 0, 8, 0), ("1", 0, 8, 0))),
                    (1, 33, ("0", "1"), (), ()),
                    (33, 34, ("0",), ("1",), ()),
                    (34, 64, ("0",), (), ()),
                    (64, 65, ("1",), (), (("1", 0, 41, 0),)),
                    (65, 95, ("1",), (), ())]


def test_a_chunked_request_preempted_resumes_in_chunks_after_the_first() -> None:
    """Mirrors SimpleDoesntFitMaxUtilizationInChunk (prompts of 30 in chunks of 20, 60 new
    tokens, 10 blocks: both prefill in 2 iterations and decode until 22, where request 1 is
    paused; it comes back at 61 with 51 tokens, chunked again; 100 iterations). Here
    prompts of 24 in chunks of 16 with 48 new tokens: both prefill in steps 0 and 1, decode
    until step 18, where request 1 (the newer) is preempted; request 0 finishes in step 48
    and request 1 recomputes its 24 + 17 tokens in chunks of 16, 16 and 9 (reuse off), then
    samples its last 30."""
    steps, rows = run(make_manager(tokens_per_block=8, num_gpu_blocks=10,
                                   enable_block_reuse=False),
                      "max_utilization", [[1] * 24, [2] * 24], 48, max_chunk_tokens=16)
    assert steps == 82
    assert rows == [(0, 1, ("0", "1"), (), (("0", 0, 16, 0), ("1", 0, 16, 0))),
                    (1, 2, ("0", "1"), (), (("0", 16, 8, 0), ("1", 16, 8, 0))),
                    (2, 18, ("0", "1"), (), ()),
                    (18, 19, ("0",), ("1",), ()),
                    (19, 49, ("0",), (), ()),
                    (49, 50, ("1",), (), (("1", 0, 16, 0),)),
                    (50, 51, ("1",), (), (("1", 16, 16, 0),)),
                    (51, 52, ("1",), (), (("1", 32, 9, 0),)),
                    (52, 82, ("1",), (), ())]


def test_guaranteed_no_evict_runs_the_second_request_after_the_first() -> None:
    """Mirrors SimpleDoesntFitGuaranteedCompletion (the two requests cannot both complete
    in the pool: request 0 runs iterations 0-79, request 1 80-159; 160 in all): request 0
    reserves its 9 blocks at admission, so request 1 waits until it finishes."""
    steps, rows = run(make_manager(tokens_per_block=8, num_gpu_blocks=10,
                                   enable_block_reuse=False),
                      "guaranteed_no_evict", [[1] * 8, [2] * 8], 64)
    assert steps == 128
    assert rows == [(0, 1, ("0",), (), (("0", 0, 8, 0),)), (1, 64, ("0",), (), ()),
                    (64, 65, ("1",), (), (("1", 0, 8, 0),)), (65, 128, ("1",), (), ())]


def test_chunked_contexts_that_fit_advance_together() -> None:
    """Mirrors SimpleShouldFitInChunk (prompts of 50 in chunks of 20: both advance 20, 20,
    10 tokens in iterations 0-2 and then decode; 42 iterations): prompts of 40 in chunks of
    16 advance 16, 16, 8 tokens together, under both policies; the third chunk samples the
    first token, so 32 new tokens end in step 33."""
    for policy in ("guaranteed_no_evict", "max_utilization"):
        steps, rows = run(make_manager(tokens_per_block=8, num_gpu_blocks=25,
                                       enable_block_reuse=False),
                          policy, [[1] * 40, [2] * 40], 32, max_chunk_tokens=16)
        assert steps == 34, policy
        assert rows == [(0, 1, ("0", "1"), (), (("0", 0, 16, 0), ("1", 0, 16, 0))),
                        (1, 2, ("0", "1"), (), (("0", 16, 16, 0), ("1", 16, 16, 0))),
                        (2, 3, ("0", "1"), (), (("0", 32, 8, 0), ("1", 32, 8, 0))),
                        (3, 34, ("0", "1"), (), ())], policy


def test_a_chunked_context_that_does_not_fit_waits_for_the_whole_prompt() -> None:
    """Mirrors SimpleDoesntFitMaxUtilizationInChunkedCache (prompts of 70 in chunks of 40
    in 10 blocks: request 1 starts only when request 0 is done, 42 iterations): kvtier
    reserves a chunked prompt's blocks at admission (the rest of the prompt stays reserved),
    so request 1's 7 prompt blocks wait for request 0's to be freed."""
    steps, rows = run(make_manager(tokens_per_block=8, num_gpu_blocks=10,
                                   enable_block_reuse=False),
                      "max_utilization", [[1] * 56, [2] * 56], 16, max_chunk_tokens=32)
    assert steps == 34
    assert rows == [(0, 1, ("0",), (), (("0", 0, 32, 0),)),
                    (1, 2, ("0",), (), (("0", 32, 24, 0),)),
                    (2, 17, ("0",), (), ()),
                    (17, 18, ("1",), (), (("1", 0, 32, 0),)),
                    (18, 19, ("1",), (), (("1", 32, 24, 0),)),
                    (19, 34, ("1",), (), ())]


def test_requests_arriving_later_wait_for_guaranteed_room() -> None:
    """Mirrors SimpleDoesntFitAddingNewRequestsGuaranteedCompletion (two more requests
    arrive at iteration 10; each of the four runs alone, in order: 320 iterations): the
    requests queued at step 8 run after the first two, one at a time, in arrival order."""
    mgr = make_manager(tokens_per_block=8, num_gpu_blocks=10, enable_block_reuse=False)

    def arrivals(step: int, sched: Scheduler) -> None:
        if step == 8:
            for i in (2, 3):
                sched.add_request(Request(str(i), [i + 1] * 8, max_output_tokens=64))

    steps, rows = run(mgr, "guaranteed_no_evict", [[1] * 8, [2] * 8], 64, arrivals=arrivals)
    assert steps == 256
    assert rows == [row for i in range(4) for row in (
        (64 * i, 64 * i + 1, (str(i),), (), ((str(i), 0, 8, 0),)),
        (64 * i + 1, 64 * (i + 1), (str(i),), (), ()))]


def test_a_duplicate_prompt_waits_one_step_and_reuses_the_first() -> None:
    """Mirrors DelayDuplicateRequest (three requests of one 21-token prompt: request 0
    computes it at iteration 0, the other two start at iteration 1 reusing its 2 full
    blocks; 3 iterations, 4 blocks reused) under both policies: a 17-token prompt's 2 full
    blocks are computed once; requests 1 and 2 wait one step and compute only its last
    token."""
    for policy in ("guaranteed_no_evict", "max_utilization"):
        mgr = make_manager(tokens_per_block=8, num_gpu_blocks=25)
        steps, rows = run(mgr, policy, [list(range(17))] * 3, 2)
        assert steps == 3, policy
        assert rows == [(0, 1, ("0",), (), (("0", 0, 17, 0),)),
                        (1, 2, ("0", "1", "2"), (), (("1", 16, 1, 16), ("2", 16, 1, 16))),
                        (2, 3, ("1", "2"), (), ())], policy
        assert mgr.stats.gpu.reused_blocks == 4


def test_a_duplicate_chunked_prompt_starts_when_only_its_last_block_is_left() -> None:
    """Mirrors DelayDuplicateRequestChunked (two requests of one 50-token prompt in chunks of
    20: request 1 waits until request 0's prefill is done at iteration 2, then reuses 4
    blocks; 43 iterations). Differs by design, a step earlier: request 1 waits while a chunk
    of request 0 completes a block it would compute from (steps 0 and 1), not for the last
    chunk, whose block ends the prompt and is never reused (the last token's logits are
    computed): it starts in step 2 reusing 4 blocks beside request 0's last chunk."""
    mgr = make_manager(tokens_per_block=8, num_gpu_blocks=25)
    steps, rows = run(mgr, "guaranteed_no_evict", [list(range(40))] * 2, 32,
                      max_chunk_tokens=16)
    assert steps == 34
    assert rows == [(0, 1, ("0",), (), (("0", 0, 16, 0),)),
                    (1, 2, ("0",), (), (("0", 16, 16, 0),)),
                    (2, 3, ("0", "1"), (), (("0", 32, 8, 0), ("1", 32, 8, 32))),
                    (3, 34, ("0", "1"), (), ())]
    assert mgr.stats.gpu.reused_blocks == 4


def test_a_partial_prefix_match_waits_and_reuses_its_shared_blocks() -> None:
    """Mirrors ReuseAwareSchedulingWithPartialPrefixMatch (request 1 shares 2 of request
    0's 3 blocks: it starts at iteration 1 reusing both; 2 blocks reused, 6 iterations)."""
    mgr = make_manager(tokens_per_block=8, num_gpu_blocks=25)
    steps, rows = run(mgr, "guaranteed_no_evict",
                      [list(range(24)), [*range(16), *[999] * 8]], 5)
    assert steps == 6
    assert rows == [(0, 1, ("0",), (), (("0", 0, 24, 0),)),
                    (1, 2, ("0", "1"), (), (("1", 16, 8, 16),)),
                    (2, 5, ("0", "1"), (), ()),
                    (5, 6, ("1",), (), ())]
    assert mgr.stats.gpu.reused_blocks == 2


def test_different_prompts_are_not_delayed() -> None:
    """Mirrors NoReuseWithDifferentPrompts (two prompts sharing no prefix run together from
    iteration 0: 5 iterations, nothing reused)."""
    mgr = make_manager(tokens_per_block=8, num_gpu_blocks=25)
    steps, rows = run(mgr, "guaranteed_no_evict", [[100] * 16, [200] * 16], 5)
    assert steps == 5
    assert rows == [(0, 1, ("0", "1"), (), (("0", 0, 16, 0), ("1", 0, 16, 0))),
                    (1, 5, ("0", "1"), (), ())]
    assert mgr.stats.gpu.reused_blocks == 0


def test_without_block_reuse_a_duplicate_prompt_is_not_delayed() -> None:
    """Mirrors MaxUtilizationNoReuseWhenDisabled (reuse off: two requests of one prompt are
    scheduled together, no beneficial skip: 5 iterations, nothing reused), under both
    policies. With nothing stored, a request that waited for a block another computes would
    reuse nothing a step later: before, it waited anyway (6 steps, its first token a step
    late)."""
    for policy in ("guaranteed_no_evict", "max_utilization"):
        mgr = make_manager(tokens_per_block=8, num_gpu_blocks=25, enable_block_reuse=False)
        steps, rows = run(mgr, policy, [list(range(16))] * 2, 5)
        assert steps == 5, policy
        assert rows == [(0, 1, ("0", "1"), (), (("0", 0, 16, 0), ("1", 0, 16, 0))),
                        (1, 5, ("0", "1"), (), ())], policy
        assert mgr.stats.gpu.reused_blocks == 0


def test_five_requests_with_two_shared_prompts_reuse_three_blocks() -> None:
    """Mirrors DelayFiveRequestsComplicated (two requests with prompts of their own, three
    whose prompts of 1, 2 and 3 blocks plus a token share one prefix: requests 0-2 start at
    iteration 0, 3 at 1 and 4 at 2, each waiting on the block the one before it computes;
    3 blocks reused, 82 iterations): here with 64 new tokens, 66 steps."""
    own = [list(range(i + 1, i + 1 + 8 * (i + 1) + 1)) for i in range(2)]
    shared = [list(range(8 * (i + 1) + 1)) for i in range(3)]
    for policy in ("guaranteed_no_evict", "max_utilization"):
        mgr = make_manager(tokens_per_block=8, num_gpu_blocks=125)
        steps, rows = run(mgr, policy, [*own, *shared], 64)
        assert steps == 66, policy
        assert rows[:3] == [
            (0, 1, ("0", "1", "2"), (), (("0", 0, 9, 0), ("1", 0, 17, 0), ("2", 0, 9, 0))),
            (1, 2, ("0", "1", "2", "3"), (), (("3", 8, 9, 8),)),
            (2, 3, ("0", "1", "2", "3", "4"), (), (("4", 16, 9, 16),))], policy
        assert rows[-2:] == [(64, 65, ("3", "4"), (), ()), (65, 66, ("4",), (), ())], policy
        assert mgr.stats.gpu.reused_blocks == 3, policy


def test_reuse_lets_two_requests_share_a_tight_pool() -> None:
    """Mirrors MaxUtilizationUnderMemoryPressureWithReuse (5 blocks: two requests of one
    20-token prompt with 5 new tokens fit only because the second reuses the first's
    blocks; it starts at iteration 1: 6 iterations) under both policies: each request needs
    3 blocks to complete, the second reuses block 0 (or 15 tokens with partial reuse: the
    last token of a block-aligned prompt is always computed), so both fit the 5 blocks."""
    for policy in ("guaranteed_no_evict", "max_utilization"):
        for partial, reused in ((False, 8), (True, 15)):
            mgr = make_manager(tokens_per_block=8, num_gpu_blocks=5,
                               enable_partial_reuse=partial)
            steps, rows = run(mgr, policy, [list(range(16))] * 2, 5)
            assert steps == 6, (policy, partial)
            assert rows == [(0, 1, ("0",), (), (("0", 0, 16, 0),)),
                            (1, 2, ("0", "1"), (), (("1", reused, 16 - reused, reused),)),
                            (2, 5, ("0", "1"), (), ()),
                            (5, 6, ("1",), (), ())], (policy, partial)
