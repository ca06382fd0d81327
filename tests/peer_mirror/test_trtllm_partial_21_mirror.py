"""TensorRT-LLM's partial-reuse rules, mirrored against kvtier: which cached block a prompt
diverging inside a block reuses part of, and how (in place or by copy), from
``cpp/tests/unit_tests/batch_manager/radixBlockTreeTest.cpp`` (``findMatchingBlock``) and
``kvCacheManagerTest.cpp`` (the partial cases of BlockManagerReuseTest and of the LoRA and
extra-id reuse tests).

TensorRT-LLM reuses the longest partial match among a block's children in place when that
block has no holder and no children, and copies its leading tokens into a new block
otherwise (``copy_on_partial_reuse``). kvtier keeps the same rule (``CacheConfig``'s
``enable_partial_reuse`` and ``copy_on_partial_reuse``); a copy is a ``COPY`` op of the
plan, of the matched tokens only. Each test names the case it mirrors and asserts kvtier's
exact answer: reused tokens, block tables, the copies and the blocks left cached.
"""

from __future__ import annotations

from kvtier import KVCacheManager, MultimodalItem, SequenceSpec
from peer_mirror.mirror_helpers import admit, blocks_of, hit, make_manager, release


def ops(mgr: KVCacheManager) -> list[tuple[str, str, int, str, int, int]]:
    """The copies recorded since the last plan: (kind, from tier, slot, to tier, slot,
    tokens)."""
    return [(op.kind.name, op.src_tier.name, op.src_slot, op.dst_tier.name, op.dst_slot,
             op.num_tokens) for op in mgr.take_plan().ops]


def cached(mgr: KVCacheManager) -> list[tuple[str, int, tuple[int, ...]]]:
    """(tier, slot, tokens) of every cached block, sorted."""
    return sorted((b.tier.name, b.slot, b.tokens) for b in mgr.cached_blocks())


def test_a_partial_match_takes_the_longest_of_several_held_siblings() -> None:
    """Mirrors radixBlockTreeTest.cpp PartialMatchReturnsBestChild (of a block's children
    the one matching the most leading tokens is returned) with PartialMatchSkipsRefedBlock
    WhenNoCopy's other half (a held block is accepted for a copy). Three live requests
    leave three held siblings after the block [1, 2, 3, 4]: [5, 9, 9, 9], [5, 6, 7, 9] and
    [5, 6, 9, 9] (each copied the best partial match it found). A fourth prompt
    [.., 5, 6, 7, 8, ..] matches 1, 3 and 2 of their tokens: it copies the 3 of slot 3."""
    mgr = make_manager(num_gpu_blocks=12, enable_partial_reuse=True)
    a = admit(mgr, "a", [1, 2, 3, 4, 5, 9, 9, 9, 0])
    assert (tuple(a.block_ids), ops(mgr)) == ((0, 1, 2), [])
    b = admit(mgr, "b", [1, 2, 3, 4, 5, 6, 7, 9, 0])
    assert (b.num_reused_tokens, tuple(b.block_ids)) == (5, (0, 3, 4))
    assert ops(mgr) == [("COPY", "GPU", 1, "GPU", 3, 1)]
    c = admit(mgr, "c", [1, 2, 3, 4, 5, 6, 9, 9, 0])
    assert (c.num_reused_tokens, tuple(c.block_ids)) == (6, (0, 5, 6))
    assert ops(mgr) == [("COPY", "GPU", 3, "GPU", 5, 2)]
    m = mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert (m.num_tokens, m.num_partial_tokens) == (7, 3)
    d = admit(mgr, "d", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert (d.num_reused_tokens, tuple(d.block_ids)) == (7, (0, 7, 8))
    assert ops(mgr) == [("COPY", "GPU", 3, "GPU", 7, 3)]
    assert cached(mgr) == [("GPU", 0, (1, 2, 3, 4)), ("GPU", 1, (5, 9, 9, 9)),
                           ("GPU", 3, (5, 6, 7, 9)), ("GPU", 5, (5, 6, 9, 9)),
                           ("GPU", 7, (5, 6, 7, 8))]


def test_a_partial_match_never_crosses_another_multimodal_extra() -> None:
    """Mirrors radixBlockTreeTest.cpp BlockKeyTest.NumMatchingTokensUsesExtraIdsMismatch (a
    block key with extra ids matches no token of one without, however equal the tokens)
    and BlockManagerReuseWithExtraIdTest's partial case: block 1 of the cached prompt holds
    an image ("img1"); a prompt equal in its first 3 tokens reuses 3 of them only with the
    same image at the same place, none without it or with another image."""
    mgr = make_manager(num_gpu_blocks=8, enable_partial_reuse=True)
    img1 = MultimodalItem(4, 4, "img1")
    admit(mgr, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9], mm_items=(img1,))
    release(mgr, "a")
    query = [1, 2, 3, 4, 5, 6, 7, 99, 0]
    assert hit(mgr, query, mm_items=(img1,)) == 7
    assert hit(mgr, query) == 4
    assert hit(mgr, query, mm_items=(MultimodalItem(4, 4, "img2"),)) == 4
    b = admit(mgr, "b", query)
    assert (b.num_reused_tokens, tuple(b.block_ids), ops(mgr)) == (4, (0, 2, 3), [])


def test_a_partial_match_never_crosses_another_adapter() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerReuseWithLoraTaskIdTest's partial cases
    (task 1 reuses "0, 1, 2(p)" of its own blocks; the same tokens under another task reuse
    nothing): under LoRA 1 a prompt reuses 8 tokens, a diverging one 6 (a partial block),
    while LoRA 2 or no adapter reuse nothing of them, not even partially."""
    mgr = make_manager(num_gpu_blocks=12, enable_partial_reuse=True)
    admit(mgr, "a", list(range(9)), lora_id=1)
    release(mgr, "a")
    assert hit(mgr, [*range(8), 5], lora_id=1) == 8
    m = mgr.lookup([0, 1, 2, 3, 4, 5, 9, 9, 9], lora_id=1)
    assert (m.num_tokens, m.num_partial_tokens) == (6, 2)
    assert hit(mgr, [0, 1, 2, 3, 4, 5, 9, 9, 9], lora_id=2) == 0
    assert hit(mgr, [0, 1, 2, 3, 4, 5, 9, 9, 9]) == 0


def test_a_partial_source_with_children_is_copied_not_reused_in_place() -> None:
    """Mirrors kvCacheManagerTest.cpp's partial reuse rule (a partially matched block is
    reused in place only if no sequence holds it and it has no children; else its tokens
    are copied, so its children keep their parent): block [2, 2, 2, 2] has the cached child
    [3, 3, 3, 3]; a prompt matching 2 of its tokens copies them into a new block, and the
    whole prefix stays cached and found."""
    mgr = make_manager(num_gpu_blocks=12, enable_partial_reuse=True)
    admit(mgr, "a", [*blocks_of(1, 2, 3), 0])
    release(mgr, "a")
    x = admit(mgr, "x", [*blocks_of(1), 2, 2, 9, 9, 0])
    assert (x.num_reused_tokens, tuple(x.block_ids)) == (6, (0, 3, 4))
    assert ops(mgr) == [("COPY", "GPU", 1, "GPU", 3, 2)]
    assert cached(mgr) == [("GPU", 0, (1, 1, 1, 1)), ("GPU", 1, (2, 2, 2, 2)),
                           ("GPU", 2, (3, 3, 3, 3)), ("GPU", 3, (2, 2, 9, 9))]
    assert hit(mgr, [*blocks_of(1, 2, 3), 0]) == 12


def test_a_partial_source_on_the_host_is_copied_from_its_host_slot() -> None:
    """Mirrors kvCacheManagerTest.cpp's partial reuse of a block in the secondary pool
    (runPartialCopyTest: a block offloaded to the secondary pool is partially reused by
    copying its leading tokens into a primary block). Request a's blocks [1..], [2..] are
    offloaded for b's; a prompt matching block 0 and 2 tokens of block 1 onboards block 0
    and copies the 2 tokens from host slot 1 into a GPU block: 6 tokens reused, all 6 from
    the host; block [2, 2, 2, 2] stays cached on the host."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=4, enable_partial_reuse=True)
    admit(mgr, "a", [*blocks_of(1, 2), 0])
    release(mgr, "a")
    admit(mgr, "b", [*blocks_of(7, 8, 9), 0])
    release(mgr, "b")
    assert ops(mgr) == [("OFFLOAD", "GPU", 0, "HOST", 0, 4), ("OFFLOAD", "GPU", 1, "HOST", 1, 4)]
    m = mgr.lookup([*blocks_of(1), 2, 2, 5, 5, 0])
    assert (m.num_tokens, m.num_host_tokens, m.num_partial_tokens) == (6, 6, 2)
    x = admit(mgr, "x", [*blocks_of(1), 2, 2, 5, 5, 0])
    assert (x.num_reused_tokens, x.num_onboarded_tokens, tuple(x.block_ids)) == (6, 6, (3, 2, 1))
    assert ops(mgr) == [("ONBOARD", "HOST", 0, "GPU", 3, 4), ("OFFLOAD", "GPU", 2, "HOST", 0, 4),
                        ("COPY", "HOST", 1, "GPU", 2, 2), ("OFFLOAD", "GPU", 1, "HOST", 2, 4)]
    assert cached(mgr) == [("GPU", 0, (7, 7, 7, 7)), ("GPU", 2, (2, 2, 5, 5)),
                           ("GPU", 3, (1, 1, 1, 1)), ("HOST", 0, (9, 9, 9, 9)),
                           ("HOST", 1, (2, 2, 2, 2)), ("HOST", 2, (8, 8, 8, 8))]


def test_a_refused_partial_reuse_leaves_the_source_as_it_was() -> None:
    """Mirrors kvCacheManagerTest.cpp BlockManagerTest's "no more blocks" refusal with a
    partial match (TensorRT-LLM throws before it claims anything): a prompt partially
    matching a cached block in a pool with no room is refused, and the block is cached and
    matched as before, no copy recorded."""
    mgr = make_manager(num_gpu_blocks=4, enable_partial_reuse=True)
    admit(mgr, "a", [*blocks_of(1), 2, 2, 2, 2, 0])
    release(mgr, "a")
    admit(mgr, "hog", [*blocks_of(5, 6), 7])  # 3 blocks: the cached 2 of them evicted
    before = cached(mgr)
    m = mgr.lookup([*blocks_of(5), 6, 6, 9, 9, 0])
    assert (m.num_tokens, m.num_partial_tokens) == (6, 2)
    refused = mgr.add_sequence(SequenceSpec("x", [*blocks_of(5), 6, 6, 9, 9, 0]))
    assert not refused.admitted
    mgr.check_invariants()
    assert (cached(mgr), ops(mgr)) == (before, [])
    assert mgr.lookup([*blocks_of(5), 6, 6, 9, 9, 0]) == m
