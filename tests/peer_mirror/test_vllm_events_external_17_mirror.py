"""vLLM's stored events past a block that is not the request's own, events of reused
blocks, and local cache hits beside external (connector) blocks in an exactly full pool,
mirrored against kvtier.

Each test names the vLLM test it mirrors (vllm-project/vllm,
``tests/v1/core/test_prefix_caching.py``) and asserts kvtier's exact answer. vLLM's
external computed tokens (a KV connector's) are kvtier's blocks imported from a remote
store (``import_blocks``: host blocks, onboarded by the admission that reuses them).
"""

from __future__ import annotations

from kvtier import BlockStored, KVCacheManager, OpKind, Tier
from kvtier.hashing import get_hash_fn, prompt_block_hashes
from peer_mirror.mirror_helpers import admit, blocks_of, hit, make_manager, release

HASH = get_hash_fn("xxh3_128")


def tiers(mgr: KVCacheManager) -> list[tuple[int, str, int, int | None]]:
    """(first token, tier, slot, priority: None while held) of every cached block."""
    # NOTE: the first tokens differ in every test here: no tie reaches a None priority.
    return sorted((b.tokens[0], b.tier.name, b.slot, b.priority) for b in mgr.cached_blocks())


def test_a_block_decoded_past_a_private_copy_names_its_logical_parent() -> None:
    """Mirrors test_prefix_caching.py::test_null_parent_block_hash (the physical parent of
    the blocks stored is not the block that holds the parent hash; the event's parent must
    be the logical one, from the request's hash chain): request 13's prompt [1][2] is all
    cached, held by request 12, so its recomputed [2] is a private copy (slot 3); the
    block it decodes next is stored with [2]'s hash as its parent and found below the
    cached [2]; request 12 leaving leaves [2] held by request 13's path; request 13 leaving
    frees its copy, storing and removing nothing."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True)
    admit(mgr, "12", [*blocks_of(1, 2), 0])
    mgr.drain_events()
    r13 = admit(mgr, "13", blocks_of(1, 2))
    assert (r13.num_reused_tokens, r13.block_ids) == (4, (0, 3))
    assert mgr.drain_events() == []  # the copy of a cached block is no new block
    assert mgr.append_tokens("13", [5, 5, 5, 5]) == [4]
    hashes = prompt_block_hashes(HASH, blocks_of(1, 2, 5), 4)
    (stored,) = mgr.drain_events()
    assert isinstance(stored, BlockStored)
    assert (stored.block_hash, stored.parent_hash, stored.token_ids) == (
        hashes[2], hashes[1], (5, 5, 5, 5))
    assert hit(mgr, [*blocks_of(1, 2, 5), 0]) == 12
    release(mgr, "12")
    assert tiers(mgr) == [(1, "GPU", 0, None), (2, "GPU", 1, None), (5, "GPU", 4, None)]
    assert mgr.num_free_gpu_blocks == 4
    release(mgr, "13")
    assert tiers(mgr) == [(1, "GPU", 0, 35), (2, "GPU", 1, 35), (5, "GPU", 4, 35)]
    assert (mgr.num_free_gpu_blocks, mgr.drain_events()) == (8, [])


def test_reused_blocks_are_not_reported_again() -> None:
    """Mirrors test_prefix_caching.py::test_emit_cached_block_events (and its _disabled and
    _zero_cached variants: vLLM can emit one BlockStored naming the reused prefix blocks of
    a request, changing no block). Differs by design: kvtier reports a block once, when it
    is stored, and again only if it leaves or moves, so a consumer's view never repeats; a
    request reusing 3 cached blocks adds no event, and one reusing none adds only its own."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True)
    admit(mgr, "a", list(range(16)))
    release(mgr, "a")
    assert len(mgr.drain_events()) == 4
    assert admit(mgr, "b", [*range(12), 99]).num_reused_tokens == 12
    assert mgr.drain_events() == []
    release(mgr, "b")
    assert admit(mgr, "c", [50, 51, 52, 53, 54]).num_reused_tokens == 0
    assert [e.token_ids for e in mgr.drain_events() if isinstance(e, BlockStored)] == [
        (50, 51, 52, 53)]


def test_local_hits_beside_external_blocks_in_an_exactly_full_pool() -> None:
    """Mirrors test_prefix_caching.py::test_cache_hit_local_and_external and
    test_cache_hit_local_and_external_three_groups (issue #33775: the external blocks'
    allocation evicted a local cache hit not yet touched, handing one block out twice).
    A 5-block GPU pool holds the prompt's first block [1] (the least recently used), a
    host tier its [2], and the remote store's [3] [4] are imported into the host; the
    prompt [1][2][3][4] + 1 token needs all 5 GPU blocks. Admitted, it reuses 16 tokens
    (12 onboarded), its 5 block ids are distinct, [1] keeps its slot, and the three other
    GPU blocks swap out into the host slots the onboards free, in order."""
    mgr = make_manager(num_gpu_blocks=5, num_host_blocks=4)
    admit(mgr, "a", [*blocks_of(1, 2), 0])
    release(mgr, "a")
    admit(mgr, "f", [*blocks_of(8, 9, 7), 0])  # [2] goes to the host
    release(mgr, "f")
    prompt = [*blocks_of(1, 2, 3, 4), 0]
    assert mgr.missing_block_hashes(prompt) == prompt_block_hashes(HASH, prompt, 4)[2:]
    assert mgr.import_blocks(prompt, 2) == [1, 2]
    assert tiers(mgr) == [(1, "GPU", 0, 35), (2, "HOST", 0, 35), (3, "HOST", 1, 35),
                          (4, "HOST", 2, 35), (7, "GPU", 3, 35), (8, "GPU", 1, 35),
                          (9, "GPU", 2, 35)]
    match = mgr.lookup(prompt)
    assert (match.num_tokens, match.num_gpu_tokens, match.num_host_tokens) == (16, 4, 12)
    mgr.take_plan()
    adm = admit(mgr, "r", prompt)
    assert (adm.num_reused_tokens, adm.num_onboarded_tokens) == (16, 12)
    assert adm.block_ids == (0, 4, 2, 3, 1) and len(set(adm.block_ids)) == 5
    assert [(op.kind, op.src_slot, op.dst_slot) for op in mgr.take_plan().ops] == [
        (OpKind.ONBOARD, 0, 4), (OpKind.OFFLOAD, 2, 0), (OpKind.OFFLOAD, 3, 3),
        (OpKind.ONBOARD, 1, 2), (OpKind.ONBOARD, 2, 3), (OpKind.OFFLOAD, 1, 1)]
    assert tiers(mgr) == [(1, "GPU", 0, None), (2, "GPU", 4, None), (3, "GPU", 2, None),
                          (4, "GPU", 3, None), (7, "HOST", 3, 35), (8, "HOST", 1, 35),
                          (9, "HOST", 0, 35)]
    assert mgr.num_free_gpu_blocks == 0


def test_a_preempted_request_with_external_blocks_is_admitted_again_from_the_gpu() -> None:
    """Mirrors test_prefix_caching.py::test_cache_hit_local_and_external_three_groups_
    preempt_and_reallocate (the request is freed, then allocated again under the same id:
    no block handed out twice): after the admission above, the request is removed (its
    full blocks stay cached, unheld) and admitted again: all 16 tokens come from the GPU
    now, with the same 5 block ids, and no copy at all."""
    mgr = make_manager(num_gpu_blocks=5, num_host_blocks=4)
    admit(mgr, "a", [*blocks_of(1, 2), 0])
    release(mgr, "a")
    admit(mgr, "f", [*blocks_of(8, 9, 7), 0])
    release(mgr, "f")
    prompt = [*blocks_of(1, 2, 3, 4), 0]
    mgr.import_blocks(prompt, 2)
    first = admit(mgr, "r", prompt)
    release(mgr, "r")
    assert mgr.num_free_gpu_blocks == 5
    mgr.take_plan()
    again = admit(mgr, "r", prompt)
    assert (again.num_reused_tokens, again.num_onboarded_tokens) == (16, 0)
    assert again.block_ids == first.block_ids == (0, 4, 2, 3, 1)
    assert mgr.take_plan().ops == ()
    assert [b.tier for b in mgr.cached_blocks() if b.priority is None] == [Tier.GPU] * 4
