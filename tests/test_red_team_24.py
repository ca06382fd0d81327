"""Red team 24a: the core's counters and the scheduler around ``SequenceSpec.resumed``.

Each prompt is one query, counted at its first admission in every tier's books alike: a
request admitted by a step that failed part way, and left waiting, is not counted again
when admitted next; a prefix found on the host by two requests of one batch is a host hit
for both in the tokens as in the blocks."""

from __future__ import annotations

from typing import Any

from kvtier import CacheConfig, KVCacheManager, Request, Scheduler, SchedulerConfig, SequenceSpec

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 2 full blocks of 4 and a last token
FILLER = list(range(20, 36))  # 4 full blocks


def make_manager(num_gpu_blocks: int = 8, num_host_blocks: int = 0,
                 **options: Any) -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu_blocks,
                                      num_host_blocks=num_host_blocks,
                                      eviction_policy="priority-lru", **options))


class Injected(Exception):
    """The fault the tests inject."""


def test_a_request_a_failed_step_admitted_and_left_waiting_is_one_query() -> None:
    """The manager admits a (counted: 9 prompt tokens, a query), then the step raises (a
    fault after add_sequence_batch, before the scheduler started it): the step fails
    whole, a leaves the manager and stays waiting. Its next admission is a recompute, not
    a second query: the queries' prompt tokens stay 9 (they read 18)."""
    mgr = make_manager()
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    real = mgr.add_sequence_batch
    calls: list[int] = []

    def faulty(specs: Any) -> Any:
        result = real(specs)
        calls.append(1)
        if len(calls) == 1:
            raise Injected("after add_sequence_batch")
        return result

    mgr.add_sequence_batch = faulty  # type: ignore[method-assign]
    sched.add_request(Request("a", PROMPT, 1))
    try:
        sched.step()
    except Injected:
        pass
    else:  # pragma: no cover
        raise AssertionError("the step did not raise")
    assert [r.request_id for r in sched.waiting] == ["a"] and not mgr.has_sequence("a")
    assert (mgr.stats.num_admitted, mgr.stats.num_prompt_tokens) == (1, 9)
    step = sched.step()
    sched.update(step, {"a": 0})
    assert not sched.has_unfinished()
    s = mgr.stats
    assert (s.num_admitted, s.num_prompt_tokens, s.num_resumed,
            s.num_resumed_prompt_tokens) == (2, 9, 1, 9)
    assert s.gpu.missed_blocks == 2  # the query's 2 full blocks, once
    sched.check_invariants()
    mgr.check_invariants()


def test_a_host_prefix_two_requests_of_a_batch_find_is_a_host_hit_for_both() -> None:
    """a's 2 blocks are pushed to the host by x. b and c (one batch) both find them there:
    b's admission onboards them and c shares b's copies. The host's reused blocks count 2
    for each (4), and the host hit tokens must say the same, 16: they said 8, and the
    replay's GPU hit tokens (reused less host) read 8 where the GPU's reused blocks are 0."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=8, enable_partial_reuse=False)
    for rid, prompt in (("a", PROMPT), ("x", FILLER)):
        mgr.add_sequence(SequenceSpec(rid, prompt))
        mgr.remove_sequence(rid)
    assert tuple(mgr.lookup(PROMPT)) == (8, 0, 8, 0)
    b, c = mgr.add_sequence_batch([SequenceSpec("b", PROMPT),
                                   SequenceSpec("c", PROMPT[:8] + [77])])
    assert (b.num_reused_tokens, b.num_onboarded_tokens) == (8, 8)
    assert (c.num_reused_tokens, c.num_onboarded_tokens) == (8, 0)
    s = mgr.stats
    assert (s.gpu.reused_blocks, s.host.reused_blocks) == (0, 4)
    assert (s.num_reused_tokens, s.num_host_reused_tokens) == (16, 16)
    mgr.check_invariants()
