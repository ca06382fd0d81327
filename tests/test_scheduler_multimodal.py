"""Multimodal prompts through the scheduler and the model engine: a :class:`Request` carries
its ``mm_items`` (vLLM's ``mm_features`` on a request), so a block holding part of an image
is keyed by the image, as :class:`SequenceSpec` keys it, and an engine's remote tier writes
and fetches it under the same keys. Before, a request had no such field: two requests with
the same placeholder tokens and different images shared their blocks through the
scheduler."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import (
    CacheConfig,
    KVCacheManager,
    MultimodalItem,
    Request,
    Scheduler,
    SchedulerConfig,
)
from kvtier.sequence import block_extras, items_before

PROMPT = [1, 2, 3, 4, 0, 0, 0, 0, 9, 10, 11, 12, 13]  # 3 full blocks of 4, the image in block 1
IMAGE_A = (MultimodalItem(4, 4, "image-a"),)
IMAGE_B = (MultimodalItem(4, 4, "image-b"),)


def make_scheduler() -> Scheduler:
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16, num_host_blocks=0,
                                     eviction_policy="priority-lru"))
    return Scheduler(mgr, SchedulerConfig(max_num_tokens=64))


def first_chunks(sched: Scheduler, *requests: Request) -> dict[str, tuple[int, int, int]]:
    """Queue ``requests``, run one step and finish them; their first chunks as (first token,
    tokens, reused tokens)."""
    for req in requests:
        sched.add_request(req)
    step = sched.step()
    chunks = {c.request_id: (c.first_token, c.num_tokens, c.num_reused_tokens)
              for c in step.context_chunks}
    sched.update(step, dict.fromkeys(chunks, 0))
    sched.manager.check_invariants()
    return chunks


def test_another_image_reuses_only_the_blocks_before_it() -> None:
    """a caches 3 blocks under image A. b, the same tokens with image B, reuses block 0 only
    (4 tokens); c, with image A, reuses all 3 (12) and computes the last token; d, without
    an image, only block 0."""
    sched = make_scheduler()
    assert first_chunks(sched, Request("a", PROMPT, 1, mm_items=IMAGE_A)) == {"a": (0, 13, 0)}
    assert first_chunks(sched, Request("b", PROMPT, 1, mm_items=IMAGE_B)) == {"b": (4, 9, 4)}
    assert first_chunks(sched, Request("c", PROMPT, 1, mm_items=IMAGE_A)) == {"c": (12, 1, 12)}
    assert first_chunks(sched, Request("d", PROMPT, 1)) == {"d": (4, 9, 4)}


def test_the_request_keeps_the_items_as_a_tuple() -> None:
    """A list of items is kept as a tuple: changing the caller's list later changes nothing."""
    items = list(IMAGE_A)
    req = Request("a", PROMPT, 1, mm_items=items)  # type: ignore[arg-type]
    items.append(MultimodalItem(8, 4, "image-c"))
    assert req.mm_items == IMAGE_A


@pytest.mark.parametrize(("items", "message"), [
    ((MultimodalItem(10, 4, "x"),), "MultimodalItem at offset 10 with length 4 runs past the "
                                    "13 tokens of 'r'"),
    ("image", "mm_items must be a tuple or list of MultimodalItem, got str"),
    ((("x", 1),), "mm_items must hold MultimodalItem"),
])
def test_bad_items_are_refused_naming_them(items: object, message: str) -> None:
    """Refused when the request is built, and by ``add_request`` for a request changed after
    (nothing queued)."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Request("r", PROMPT, 1, mm_items=items)  # type: ignore[arg-type]
    sched = make_scheduler()
    req = Request("r", PROMPT, 1)
    req.mm_items = items  # type: ignore[assignment]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        sched.add_request(req)
    assert not sched.waiting and not sched.has_unfinished()
    ok = replace(req, mm_items=IMAGE_A)
    sched.add_request(ok)
    assert [r.request_id for r in sched.waiting] == ["r"]


def test_a_preempted_request_is_admitted_again_under_its_image() -> None:
    """A request preempted after two decode steps prefills its prompt and output again, the
    image still keying block 1: the same image's request then reuses its 3 prompt blocks."""
    sched = make_scheduler()
    sched.add_request(Request("a", PROMPT, 8, mm_items=IMAGE_A))
    for _ in range(3):
        step = sched.step()
        sched.update(step, {"a": 7})
    sched.reset_prefix_cache(reset_running_requests=True)
    step = sched.step()
    assert [(c.request_id, c.first_token, c.num_tokens) for c in step.context_chunks] == [
        ("a", 0, 16)]
    sched.update(step, {"a": 7})
    while sched.has_unfinished():
        step = sched.step()
        sched.update(step, {"a": 7})
    sched.manager.check_invariants()
    assert first_chunks(sched, Request("c", PROMPT, 1, mm_items=IMAGE_A)) == {"c": (12, 1, 12)}
    assert first_chunks(sched, Request("b", PROMPT, 1, mm_items=IMAGE_B)) == {"b": (4, 9, 4)}


@pytest.mark.parametrize(("items_x", "items_y", "reused"), [
    # The same two images listed in another order: the same prompt to the cache (y reuses
    # 19 tokens: the 4 full blocks and 3 of the last, partially).
    ((MultimodalItem(0, 4, "a"), MultimodalItem(8, 4, "b")),
     (MultimodalItem(8, 4, "b"), MultimodalItem(0, 4, "a")), 19),
    # Images that differ only in the last block, which y computes.
    ((MultimodalItem(0, 4, "a"), MultimodalItem(16, 3, "c")),
     (MultimodalItem(0, 4, "a"), MultimodalItem(16, 3, "d")), 16),
    # Another image in block 0: no block in common, nothing to wait for.
    ((MultimodalItem(0, 4, "a"),), (MultimodalItem(0, 4, "e"),), None),
])
def test_a_prompt_waits_for_blocks_keyed_alike_however_its_images_are_listed(
        items_x: tuple[MultimodalItem, ...], items_y: tuple[MultimodalItem, ...],
        reused: int | None) -> None:
    """Two requests of one 20-token prompt in one step: the second waits a step and reuses
    the first's blocks wherever the cache keys them alike (vLLM's prefill dedup,
    test_async_scheduler.py::test_prefix_caching_for_prefill_dedup, holds for image prompts
    too: vLLM hashes a block's images by position). Before, the wait compared the items as
    listed: images in another order, or differing past the shared blocks, made the second
    compute all 20 tokens beside the first."""
    sched = make_scheduler()
    prompt = list(range(1, 21))
    chunks = first_chunks(sched, Request("x", prompt, 2, mm_items=items_x),
                          Request("y", prompt, 2, mm_items=items_y))
    if reused is None:
        assert chunks == {"x": (0, 20, 0), "y": (0, 20, 0)}
        return
    assert chunks == {"x": (0, 20, 0)}
    step = sched.step()
    assert [(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [("y", reused, 20 - reused, reused)]


HASHES = st.sampled_from(["a", "b", b"a", 7])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.builds(MultimodalItem, st.integers(0, 15), st.integers(1, 8), HASHES),
                max_size=4),
       st.sampled_from([4, 8, 12, 16]), st.data())
def test_items_keying_the_blocks_before_an_end_alike_key_those_blocks_alike(
        x: list[MultimodalItem], end: int, data: st.DataObject) -> None:
    """``items_before`` (the scheduler's key for a prompt's images up to a block end) is the
    same for the items in any order, with any items past ``end`` added; and prompts with
    equal answers have equal extra keys, as the cache computes them, for every block
    before ``end`` (blocks of 4, prompts of 24 tokens)."""
    later = data.draw(st.lists(st.builds(MultimodalItem, st.integers(end, 23), st.just(1),
                                         HASHES), max_size=2))
    y = data.draw(st.permutations([*x, *later]))
    assert items_before(y, end, 4) == items_before(x, end, 4)
    no_items = [None] * 6  # block_extras' answer for a prompt without items
    assert ((block_extras(x, 24, 4) or no_items)[:end // 4]
            == (block_extras(y, 24, 4) or no_items)[:end // 4])
