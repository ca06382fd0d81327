"""Scheduler behaviour: budgets, chunking, exact credit (S4), preemption, no starvation."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.scheduler import ContextChunk, Request, ScheduledStep, Scheduler, SchedulerConfig


def make_scheduler(num_gpu_blocks: int = 16, num_host_blocks: int = 0,
                   **kw: object) -> Scheduler:
    """A scheduler over a manager with 4-token blocks."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu_blocks,
                                     num_host_blocks=num_host_blocks,
                                     enable_partial_reuse=False))
    return Scheduler(mgr, SchedulerConfig(**kw))  # type: ignore[arg-type]


def finish_step(s: Scheduler, step: ScheduledStep, token: int = 900) -> list[str]:
    """Feed one sampled token to every request that samples this step."""
    sampled = {c.request_id: token for c in step.context_chunks}
    sampled.update({rid: token for rid in step.decode_request_ids})
    s.manager.check_invariants()
    return [r.request_id for r in s.update(step, sampled)]


def test_config_errors_name_the_field() -> None:
    """Invalid scheduler settings raise ValueError naming field and value."""
    with pytest.raises(ValueError, match="max_num_tokens must be an integer >= 1, got 0"):
        SchedulerConfig(max_num_tokens=0)
    with pytest.raises(ValueError, match="capacity_policy must be one of"):
        SchedulerConfig(capacity_policy="yolo")
    with pytest.raises(ValueError, match="admission must be one of"):
        SchedulerConfig(admission="guess")
    with pytest.raises(ValueError, match="max_output_tokens of 'r' must be"):
        Request("r", [1], 0)


def test_add_request_refuses_duplicates_and_requests_that_never_fit() -> None:
    """A queued id can't be queued twice; a request bigger than the pool is refused."""
    s = make_scheduler(num_gpu_blocks=4)
    s.add_request(Request("a", [1, 2, 3], 1))
    with pytest.raises(ValueError, match="'a' is already queued or running"):
        s.add_request(Request("a", [1], 1))
    with pytest.raises(ValueError, match="'big' needs 5 blocks for 17 tokens"):
        s.add_request(Request("big", list(range(16)), 1))
    with pytest.raises(ValueError, match="token at index 1 must be an int"):
        s.add_request(Request("bad", [1, None], 1))  # type: ignore[list-item]


def test_chunked_prefill_then_decode_exact_steps() -> None:
    """MNT 8: a 10-token prompt is chunked 8 + 2, the next request fills the rest."""
    s = make_scheduler(max_num_tokens=8, max_batch_size=4)
    s.add_request(Request("a", list(range(10)), 2))
    s.add_request(Request("b", list(range(100, 106)), 1))
    st1 = s.step()
    assert st1.context_chunks == (ContextChunk("a", 0, 8, 0),)
    assert finish_step(s, st1) == []
    st2 = s.step()
    assert st2.context_chunks == (ContextChunk("a", 8, 2, 0), ContextChunk("b", 0, 6, 0))
    assert st2.num_scheduled_tokens == 8
    assert finish_step(s, st2) == ["b"]  # one output token: done after its prefill
    st3 = s.step()
    assert (st3.context_chunks, st3.decode_request_ids) == ((), ("a",))
    assert finish_step(s, st3) == ["a"]
    assert not s.has_unfinished() and s.manager.num_sequences == 0


def test_no_chunking_waits_for_room_but_does_not_block_smaller_requests() -> None:
    """Without chunked prefill a prompt larger than the budget left waits; a small one
    behind it goes first (no head-of-line blocking)."""
    s = make_scheduler(max_num_tokens=8, enable_chunked_prefill=False)
    s.add_request(Request("a", list(range(6)), 3))
    s.add_request(Request("big", list(range(10, 17)), 1))
    s.add_request(Request("small", [50, 51], 1))
    st1 = s.step()
    assert [c.request_id for c in st1.context_chunks] == ["a", "small"]
    finish_step(s, st1)
    st2 = s.step()  # a decodes one token; big's 7 tokens fit the 7 left
    assert st2.decode_request_ids == ("a",)
    assert st2.context_chunks == (ContextChunk("big", 0, 7, 0),)
    finish_step(s, st2)


def s4_setup(admission: str) -> tuple[Scheduler, ScheduledStep]:
    """S4 = S1 + a running chunked prefill. MNT 20: L's second chunk (4) + B (8) + C (8).

        GPU (12): L's 6 blocks (live) + 6 cached filler blocks     host (2): [C, B]
    """
    s = make_scheduler(num_gpu_blocks=12, num_host_blocks=2, max_num_tokens=20,
                       capacity_policy="max_utilization", admission=admission)
    mgr = s.manager
    s.add_request(Request("L", list(range(300, 324)), 1))
    st1 = s.step()
    assert st1.context_chunks == (ContextChunk("L", 0, 20, 0),)
    finish_step(s, st1)

    def cycle(rid: str, tokens: list[int], priority: int | None = None) -> None:
        mgr.add_sequence(SequenceSpec(rid, tokens, priority=priority))
        mgr.remove_sequence(rid)

    cycle("c", [1, 1, 1, 1, 9])
    cycle("f1", list(range(100, 124)), priority=0)  # pushes C to host
    cycle("b", [2, 2, 2, 2, 9])
    cycle("f2", list(range(200, 224)))  # pushes B to host
    s.add_request(Request("B", [2, 2, 2, 2, *range(50, 58)], 1))
    s.add_request(Request("C", [1, 1, 1, 1, *range(60, 68)], 1))
    return s, s.step()


def test_s4_claim_admission_keeps_the_budget_exact() -> None:
    """S4 in claim mode: both host prefixes are credited and obtained; 20 tokens == MNT."""
    s, step = s4_setup("claim")
    assert step.context_chunks == (ContextChunk("L", 20, 4, 0), ContextChunk("B", 4, 8, 4),
                                   ContextChunk("C", 4, 8, 4))
    assert (step.num_scheduled_tokens, step.num_overflow_tokens) == (20, 0)
    assert step.num_credited_tokens == step.num_reused_tokens == 8
    finish_step(s, step)


def test_s4_probe_admission_overflows() -> None:
    """S4 in probe mode: B's onboarding evicts C's host block; C computes 12, 24 > 20."""
    s, step = s4_setup("probe")
    assert step.context_chunks == (ContextChunk("L", 20, 4, 0), ContextChunk("B", 4, 8, 4),
                                   ContextChunk("C", 0, 12, 0))
    assert (step.num_scheduled_tokens, step.num_overflow_tokens) == (24, 4)
    assert (step.num_credited_tokens, step.num_reused_tokens) == (8, 4)
    finish_step(s, step)


def test_max_utilization_preempts_newest_and_resumes_from_cache() -> None:
    """When decode runs out of blocks the newest request is preempted; it resumes and
    reuses its own cached blocks."""
    s = make_scheduler(num_gpu_blocks=4, max_num_tokens=16,
                       capacity_policy="max_utilization")
    s.add_request(Request("old", [1, 2, 3, 4, 5, 6, 7], 6))
    s.add_request(Request("new", [9, 9, 9, 9, 8, 8, 8], 6))
    st1 = s.step()
    assert [c.request_id for c in st1.context_chunks] == ["old", "new"]
    finish_step(s, st1, token=11)
    st2 = s.step()  # both decode their 8th token: still 2 blocks each
    assert st2.decode_request_ids == ("old", "new")
    finish_step(s, st2, token=12)
    st3 = s.step()  # old needs a 3rd block: new is preempted
    assert st3.preempted_request_ids == ("new",) and st3.decode_request_ids == ("old",)
    finish_step(s, st3, token=13)
    resumed = None
    for _ in range(20):
        step = s.step()
        for c in step.context_chunks:
            if c.request_id == "new":
                resumed = c
        finish_step(s, step, token=13)
        if not s.has_unfinished():
            break
    assert not s.has_unfinished()
    assert resumed is not None and resumed.num_reused_tokens == 4  # its first full block


def test_guaranteed_no_evict_reserves_decode_blocks() -> None:
    """Under guaranteed_no_evict a request is admitted only with room to finish."""
    s = make_scheduler(num_gpu_blocks=4, max_num_tokens=16)
    s.add_request(Request("a", [1, 2, 3, 4, 5], 7))  # 12 tokens: 3 blocks reserved to finish
    s.add_request(Request("b", [7, 7, 7], 5))  # 8 tokens: 2 blocks; only 1 is left
    st1 = s.step()
    assert [c.request_id for c in st1.context_chunks] == ["a"]
    assert s.manager.num_reserved_gpu_blocks == 1
    steps = [st1]
    finish_step(s, st1)
    while s.has_unfinished():
        steps.append(s.step())
        assert steps[-1].preempted_request_ids == ()
        finish_step(s, steps[-1])
    # a: prefill + 6 decodes; b waits for a's blocks, then prefill + 4 decodes.
    first = [i for i, step in enumerate(steps) if step.context_chunks]
    assert len(steps) == 12 and first == [0, 7]


def test_starving_request_is_admitted_within_the_bound() -> None:
    """A large request that keeps being overtaken stops the overtaking after
    max_skipped_steps and is admitted once room frees up."""
    s = make_scheduler(num_gpu_blocks=8, max_num_tokens=64, max_skipped_steps=3,
                       capacity_policy="max_utilization")
    s.add_request(Request("hold", list(range(100, 112)), 8))  # 5 blocks while it decodes
    step = s.step()
    finish_step(s, step)
    s.add_request(Request("big", list(range(200, 220)), 1))  # 6 blocks: must wait for hold
    admitted_at = None
    for i in range(40):
        s.add_request(Request(f"s{i}", [7, i], 1))  # always fits, always behind big
        step = s.step()
        if any(c.request_id == "big" for c in step.context_chunks):
            admitted_at = i
            break
        finish_step(s, step)
    assert admitted_at is not None and admitted_at <= 3 + 8


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000),
       policy=st.sampled_from(["guaranteed_no_evict", "max_utilization"]))
def test_claim_mode_never_overflows_and_never_loses_credit(seed: int, policy: str) -> None:
    """Random arrivals, shared prefixes, host offload, chunking, decode growth and
    preemption: every step fits MNT and every credited token is obtained."""
    rng = random.Random(seed)
    mgr = KVCacheManager(CacheConfig(
        tokens_per_block=4, num_gpu_blocks=rng.randint(12, 40),
        num_host_blocks=rng.choice([0, 4, 16]), enable_partial_reuse=rng.random() < 0.5))
    s = Scheduler(mgr, SchedulerConfig(
        max_num_tokens=rng.choice([8, 16, 32]), max_batch_size=rng.choice([2, 4, 8]),
        capacity_policy=policy, max_chunk_tokens=rng.choice([None, 4, 8])))
    prefixes = [[rng.randint(0, 5) for _ in range(rng.randint(2, 12))] for _ in range(3)]
    for n in range(150):
        if rng.random() < 0.5:
            prompt = rng.choice(prefixes) + [rng.randint(0, 5) for _ in range(rng.randint(1, 9))]
            with contextlib.suppress(ValueError):  # too large for the pool: refused
                s.add_request(Request(f"r{n}", prompt, rng.randint(1, 8)))
        step = s.step()
        assert step.num_scheduled_tokens <= s.config.max_num_tokens
        assert step.num_overflow_tokens == 0
        assert step.num_credited_tokens == step.num_reused_tokens
        finish_step(s, step, token=rng.randint(0, 5))


def test_copy_source_counts_as_room_when_the_request_fills_the_pool() -> None:
    """A request needing the whole pool, with a partial copy from a cached block, is
    admitted: the source is released after its copy (this used to livelock)."""
    s = Scheduler(KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=4)))
    s.add_request(Request("a", list(range(1, 14)), 1))
    finish_step(s, s.step())
    s.add_request(Request("b", [1, 2, 3, 4, 5, 6] + [0] * 9, 1))  # 16 tokens to finish
    step = s.step()
    assert step.context_chunks == (ContextChunk("b", 6, 9, 6),)
    finish_step(s, step)


def test_held_requests_wait_without_blocking_others() -> None:
    """A held request (its prefix being fetched) is skipped until released; others go."""
    s = make_scheduler()
    s.add_request(Request("held", [1, 2, 3], 1))
    s.add_request(Request("free", [4, 5, 6], 1))
    s.hold("held")
    step = s.step()
    assert [c.request_id for c in step.context_chunks] == ["free"]
    finish_step(s, step)
    s.release("held")
    step = s.step()
    assert [c.request_id for c in step.context_chunks] == ["held"]
    finish_step(s, step)
