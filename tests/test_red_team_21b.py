"""Red team 21b: the scheduler's same-step wait for image prompts (``items_before`` against
the cache's own keys, ``block_extras``) and the scheduler's new guards."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CacheConfig, KVCacheManager, MultimodalItem, Request, Scheduler, SchedulerConfig
from kvtier.sequence import block_extras, items_before

HASHES = st.sampled_from(["a", "b", b"a", 7])
ITEMS = st.lists(st.builds(MultimodalItem, st.integers(0, 15), st.integers(1, 8), HASHES),
                 max_size=3)


@settings(max_examples=1500, deadline=None)
@given(ITEMS, ITEMS, st.sampled_from([4, 8, 12, 16]))
def test_items_before_is_equal_exactly_where_the_cache_keys_the_blocks_alike(
        x: list[MultimodalItem], y: list[MultimodalItem], end: int) -> None:
    """The reference is the cache's own key of each block before ``end`` (blocks of 4,
    prompts of 24 tokens): ``items_before`` is equal for two prompts' items if and only if
    those keys are. The old one keyed an item by its last token, the cache by the blocks it
    overlaps: an image one token longer within the same block was another key to the
    scheduler's wait and the same block to the cache (``(0, 1, "a")`` and ``(0, 2, "a")``)."""
    no_items = [None] * 6
    alike = ((block_extras(x, 24, 4) or no_items)[:end // 4]
             == (block_extras(y, 24, 4) or no_items)[:end // 4])
    assert (items_before(x, end, 4) == items_before(y, end, 4)) is alike


def test_a_prompt_waits_for_a_block_the_cache_keys_alike_whatever_an_images_length() -> None:
    """Two requests of one 20-token prompt in one step, an image at token 0 of 3 and of 4
    tokens (one content hash): the cache keys their blocks alike, so the second waits a step
    and reuses the first's 19 tokens. Before, it computed all 20 beside the first."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16, num_host_blocks=0,
                                     eviction_policy="priority-lru"))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    prompt = list(range(1, 21))
    sched.add_request(Request("x", prompt, 2, mm_items=(MultimodalItem(0, 3, "img"),)))
    sched.add_request(Request("y", prompt, 2, mm_items=(MultimodalItem(0, 4, "img"),)))
    step = sched.step()
    assert [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks] == [
        ("x", 0, 20)]
    sched.update(step, {"x": 5})
    step = sched.step()
    assert [(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [("y", 19, 1, 19)]
    assert step.decode_request_ids == ("x",)
    sched.update(step, {"x": 5, "y": 5})
    sched.check_invariants()
    mgr.check_invariants()


def test_a_call_that_raised_leaves_no_guard_behind() -> None:
    """A step whose manager raised, and an update refused for its sampled tokens, end their
    call: the next step, update, abort and add_request run (the re-entrancy guard is no
    false positive after an exception)."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16, num_host_blocks=0))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    sched.add_request(Request("a", list(range(1, 10)), 3))

    def broken() -> None:
        raise RuntimeError("the manager broke")

    mgr.begin_step = broken  # type: ignore[method-assign]
    try:
        sched.step()
    except RuntimeError as exc:
        assert str(exc) == "the manager broke"
    else:
        raise AssertionError("the step did not raise")
    del mgr.begin_step
    step = sched.step()
    try:
        sched.update(step, {"a": "no token"})  # type: ignore[dict-item]
    except ValueError:
        pass
    else:
        raise AssertionError("the update took a str token")
    assert sched.update(step, {"a": 1}) == []
    sched.add_request(Request("b", [7, 7, 7, 7, 7], 2))
    assert sched.abort("b") is not None
    step = sched.step()
    assert step.decode_request_ids == ("a",)
    sched.update(step, {"a": 2})
    sched.check_invariants()
    mgr.check_invariants()
