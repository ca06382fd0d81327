"""A request admitted again to recompute (preempted, or requeued after a failed copy or
pass) is no query: what it finds cached is mostly its own work coming back. Its admission
is counted apart (``num_resumed*``), as vLLM keeps preempted requests out of its
prefix-cache hit rate; each prompt is one query, at its first admission."""

from __future__ import annotations

import pytest

from kvtier import CacheConfig, KVCacheManager, Request, Scheduler, SchedulerConfig, SequenceSpec

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 2 full blocks of 4 and a last token
OTHER = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32]  # 3 full blocks and a token


def make_manager(num_gpu_blocks: int = 8, num_host_blocks: int = 0) -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu_blocks,
                                      num_host_blocks=num_host_blocks,
                                      eviction_policy="priority-lru"))


def counters(mgr: KVCacheManager) -> tuple[int, ...]:
    s = mgr.stats
    return (s.num_admitted, s.num_prompt_tokens, s.num_reused_tokens, s.num_host_reused_tokens,
            s.num_resumed, s.num_resumed_prompt_tokens, s.num_resumed_reused_tokens)


def test_a_resumed_admission_is_counted_apart_from_the_queries() -> None:
    """a computes PROMPT (GPU 0-2); b, resumed, finds its 8 tokens: counted as resumed
    reuse, in no hit rate and no tier's reused or missed blocks; c, a query, finds them
    too and is counted as a hit."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", PROMPT))
    mgr.remove_sequence("a")
    b = mgr.add_sequence(SequenceSpec("b", PROMPT, resumed=True))
    assert (b.admitted, b.num_reused_tokens, b.block_ids[:2]) == (True, 8, (0, 1))
    assert counters(mgr) == (2, 9, 0, 0, 1, 9, 8)
    assert (mgr.stats.gpu.reused_blocks, mgr.stats.gpu.missed_blocks) == (0, 2)
    assert mgr.stats.token_hit_rate == 0.0
    mgr.remove_sequence("b")
    mgr.add_sequence(SequenceSpec("c", PROMPT))
    assert counters(mgr) == (3, 18, 8, 0, 1, 9, 8)
    assert (mgr.stats.gpu.reused_blocks, mgr.stats.gpu.missed_blocks) == (2, 2)
    assert mgr.stats.token_hit_rate == 8 / 18
    mgr.check_invariants()


def test_host_reuse_counts_a_querys_onboards_not_a_resumed_ones() -> None:
    """3 GPU blocks: a's 2 full blocks are offloaded to the host when x fills the GPU.
    b (resumed) onboards them: the host's onboarded blocks count the copies, its reused
    blocks and the host hit tokens do not. After x is gone and b's blocks are pushed out
    again, c (a query) onboards them and is counted as 8 host hit tokens."""
    mgr = make_manager(num_gpu_blocks=3, num_host_blocks=8)
    for rid, spec in (("a", SequenceSpec("a", PROMPT)), ("x", SequenceSpec("x", OTHER[:12]))):
        mgr.add_sequence(spec)
        mgr.remove_sequence(rid)
    assert mgr.lookup(PROMPT).num_tokens == 8
    b = mgr.add_sequence(SequenceSpec("b", PROMPT, resumed=True))
    assert (b.num_reused_tokens, b.num_onboarded_tokens) == (8, 8)
    assert counters(mgr)[3:] == (0, 1, 9, 8)
    assert (mgr.stats.host.onboarded_blocks, mgr.stats.host.reused_blocks) == (2, 0)
    mgr.remove_sequence("b")
    mgr.add_sequence(SequenceSpec("y", OTHER[:12]))  # x's blocks, back from the host
    mgr.remove_sequence("y")
    c = mgr.add_sequence(SequenceSpec("c", PROMPT))
    assert (c.num_reused_tokens, c.num_onboarded_tokens) == (8, 8)
    # y found 11 of x's tokens on the host (the last is computed: 2 blocks, and 3 tokens
    # copied from the third), c its 8.
    assert counters(mgr)[2:4] == (8 + 11, 8 + 11)
    assert mgr.stats.host.reused_blocks == 2 + 2
    mgr.check_invariants()


@pytest.mark.parametrize("value", [1, "yes", None, 0.0])
def test_a_resumed_flag_that_is_no_bool_is_refused_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match=r"^resumed of 'b' must be a bool, got "):
        SequenceSpec("b", PROMPT, resumed=value)  # type: ignore[arg-type]


def test_a_request_requeued_after_a_failed_onboard_is_one_query() -> None:
    """x pushes a's second block [5 6 7 8] to the host (a's first stays on the GPU). b's
    onboard of it fails: the manager aborts b (the block is gone) and the scheduler
    requeues it to recompute. Its second admission is resumed (4 tokens found again, on
    the GPU): the queries are a's, x's and b's prompts, each once. b's first admission's
    hit (4 GPU + 4 host tokens) is taken back when its onboard fails (it obtained none of
    it) and counted lost; its recompute's 4 tokens are counted as resumed."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=8)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    for rid, prompt in (("a", PROMPT), ("x", OTHER[:12])):
        sched.add_request(Request(rid, prompt, 1))
        step = sched.step()
        sched.update(step, {rid: 0})
    assert not sched.has_unfinished() and mgr.lookup(PROMPT).num_tokens == 8
    sched.add_request(Request("b", PROMPT, 2))
    step = sched.step()
    plan = step.transfer_plan
    assert len(plan) and step.context_chunks[0].num_reused_tokens == 8
    aborted = mgr.transfer_failed(plan, range(len(plan)))
    assert aborted == ["b"]
    sched.update(sched.requeue_failed(step, aborted), {})
    while sched.has_unfinished():
        step = sched.step()
        sched.update(step, dict.fromkeys(
            [c.request_id for c in step.context_chunks] + list(step.decode_request_ids), 0))
        mgr.check_invariants()
    s = mgr.stats
    assert (s.num_admitted, s.num_prompt_tokens, s.num_resumed) == (4, 9 + 12 + 9, 1)
    assert (s.num_reused_tokens, s.num_host_reused_tokens, s.num_lost_reused_tokens) == (0, 0, 8)
    assert (s.num_resumed_prompt_tokens, s.num_resumed_reused_tokens) == (9, 4)
