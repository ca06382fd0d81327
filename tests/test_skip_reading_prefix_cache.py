"""``skip_reading_prefix_cache`` (vLLM's flag of that name, set for requests that need every
prompt position's logits, e.g. prompt logprobs): the request is admitted as if nothing were
cached, computes its whole prompt, and still stores its blocks for the requests after it.

Mirrors vLLM's ``KVCacheManager.get_computed_blocks`` (vllm-project/vllm,
``vllm/v1/core/kv_cache_manager.py``: no computed blocks when the request skips reading)
and its scheduler, which then schedules the whole prompt.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvtier import (
    CacheConfig,
    KVCacheManager,
    Request,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
    Tier,
)

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 2 full blocks of 4 and a last token


def make_manager(**kw: Any) -> KVCacheManager:
    cfg: dict[str, Any] = {"tokens_per_block": 4, "num_gpu_blocks": 8, "num_host_blocks": 0,
                           "eviction_policy": "priority-lru", **kw}
    return KVCacheManager(CacheConfig(**cfg))


def test_a_request_that_skips_reading_reuses_nothing_and_still_stores() -> None:
    """a caches the prompt's 2 blocks in slots 0, 1 (its partial block in 2, freed). b,
    skipping, gets 3 fresh slots (2, 3, 4) and 0 reused tokens although lookup says 8 are there; its
    duplicates are counted when stored; c, not skipping, then reuses 8 tokens."""
    mgr = make_manager()
    a = mgr.add_sequence(SequenceSpec("a", PROMPT))
    assert a.block_ids == (0, 1, 2)
    mgr.remove_sequence("a")
    spec = SequenceSpec("b", PROMPT, skip_reading_prefix_cache=True)
    assert mgr.lookup(PROMPT).num_tokens == 8
    assert mgr.lookup_spec(spec).num_tokens == 0
    b = mgr.add_sequence(spec)
    assert (b.admitted, b.num_reused_tokens, b.num_onboarded_tokens) == (True, 0, 0)
    assert b.block_ids == (2, 3, 4)
    mgr.check_invariants()
    mgr.remove_sequence("b")
    assert mgr.stats.num_duplicate_stores == 2
    c = mgr.add_sequence(SequenceSpec("c", PROMPT))
    assert c.num_reused_tokens == 8
    mgr.check_invariants()


def test_host_blocks_are_not_onboarded_for_a_request_that_skips_reading() -> None:
    """The prompt's blocks on the host are left there: the step's plan onboards nothing for
    the skipping request, and its hit counters do not move."""
    mgr = make_manager(num_gpu_blocks=3, num_host_blocks=4)
    mgr.add_sequence(SequenceSpec("a", PROMPT))
    mgr.remove_sequence("a")
    mgr.add_sequence(SequenceSpec("x", [50] * 9))  # a's blocks go to the host
    mgr.remove_sequence("x")
    mgr.take_plan()
    assert mgr.lookup(PROMPT).num_host_tokens == 8
    stats = mgr.stats
    hits_before = (stats.num_reused_tokens, stats.host.onboarded_blocks)
    b = mgr.add_sequence(SequenceSpec("b", PROMPT, skip_reading_prefix_cache=True))
    assert (b.admitted, b.num_reused_tokens, b.num_onboarded_tokens) == (True, 0, 0)
    plan = mgr.take_plan()
    onboarded = [op for op in plan.ops if op.src_tier is Tier.HOST]
    assert onboarded == []
    assert (mgr.stats.num_reused_tokens, mgr.stats.host.onboarded_blocks) == hits_before
    mgr.check_invariants()


def test_the_scheduler_computes_the_whole_prompt_of_a_request_that_skips_reading() -> None:
    """Two requests of one cached prompt: the plain one computes its last token only (8
    reused), the skipping one all 9; both finish and the cache stays consistent."""
    mgr = make_manager(num_gpu_blocks=16)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    sched.add_request(Request("warm", PROMPT, 1))
    step = sched.step()
    sched.update(step, {"warm": 0})
    sched.add_request(Request("plain", PROMPT, 2))
    sched.add_request(Request("logprobs", PROMPT, 2, skip_reading_prefix_cache=True))
    step = sched.step()
    chunks = {c.request_id: (c.first_token, c.num_tokens, c.num_reused_tokens)
              for c in step.context_chunks}
    assert chunks == {"plain": (8, 1, 8), "logprobs": (0, 9, 0)}
    sched.update(step, {"plain": 0, "logprobs": 0})
    while sched.has_unfinished():
        step = sched.step()
        sched.update(step, dict.fromkeys(step.decode_request_ids, 0))
    mgr.check_invariants()


@pytest.mark.parametrize("value", [1, "yes", None, 0.0])
def test_a_flag_that_is_no_bool_is_refused_naming_it(value: object) -> None:
    """ValueError naming the field and the request, for a spec and for a request."""
    with pytest.raises(ValueError, match="skip_reading_prefix_cache of 'b' must be a bool"):
        SequenceSpec("b", PROMPT, skip_reading_prefix_cache=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError,
                       match="skip_reading_prefix_cache of request 'b' must be a bool"):
        Request("b", PROMPT, 1, skip_reading_prefix_cache=value)  # type: ignore[arg-type]
