"""More of SGLang's own radix-cache and HiCache tests, mirrored against kvtier: extra-key
namespaces, and which host block goes when the host is full.

Each test names the test it mirrors (sgl-project/sglang,
``test/registered/unit/mem_cache/test_radix_cache_unit.py`` and
``test_boundary_hiradix_cache_unit.py``); the mapping is ``test_sglang_mirror.py``'s (an
extra key is kvtier's ``salt``; one token per block mirrors ``page_size=1``; queries carry
one token more, ``END``, since kvtier's ``lookup`` keeps the last prompt token out).
"""

from __future__ import annotations

from kvtier import AllBlocksCleared, BlockRemoved, BlockStored, Tier
from peer_mirror.mirror_helpers import admit, hit, make_manager, release

END = 999  # the prompt token past what SGLang's match would cover


def test_an_empty_extra_key_is_a_namespace_of_its_own() -> None:
    """Mirrors test_radix_cache_unit.py TestRadixKey.test_hash_page_includes_extra_key:
    the same page under no extra key, the empty key, and keys "key1" / "key2" hash four
    ways; kvtier also tells the empty str from empty bytes: five key spaces, each matching
    only its own blocks."""
    mgr = make_manager(num_gpu_blocks=16, enable_events=True)
    keys: tuple[str | bytes | None, ...] = (None, "", b"", "key1", "key2")
    hashes = []
    for i, key in enumerate(keys):
        admit(mgr, f"r{i}", [1, 2, 3, 4, END], salt=key)
        release(mgr, f"r{i}")
        (stored,) = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
        hashes.append(stored.block_hash)
    assert len(set(hashes)) == 5 and mgr.num_key_spaces == 5
    for key in keys:
        assert hit(mgr, [1, 2, 3, 4, END], salt=key) == 4
    assert hit(mgr, [1, 2, 3, 4, END], salt="key3") == 0


def test_host_eviction_takes_the_leaf_and_keeps_its_host_parent() -> None:
    """Mirrors test_boundary_hiradix_cache_unit.py test_l2_preserves_boundary_host_value_
    when_h_descendant_exists / test_l2_deletes_h_leaves_after_duplicates_are_gone: with a
    host path [1] -> [2] and the host full, one more offload drops the host leaf [2] (a
    removed event on the host) and keeps its parent [1], which still hits.

        before:  host [1] -> [2]        GPU [5] -> [6]   (all unheld, all at 50)
        r = [7]: GPU leaf [6] -> host, into the slot of the host leaf [2], dropped first
        after:   host [1]   GPU [5] -> host [6]   GPU [7]
    """
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=2, num_host_blocks=2,
                       enable_events=True)
    admit(mgr, "p", [1, 2], priority=50)  # 2 blocks: the whole pool
    release(mgr, "p")
    admit(mgr, "q", [5, 6], priority=50)  # p's [1] -> [2] to the host
    release(mgr, "q")
    mgr.take_plan()
    tokens = {b.block_hash: b.tokens for b in mgr.cached_blocks()}
    assert sorted((b.tokens, b.tier.name) for b in mgr.cached_blocks()) == [
        ((1,), "HOST"), ((2,), "HOST"), ((5,), "GPU"), ((6,), "GPU")]
    mgr.drain_events()
    admit(mgr, "r", [7])  # one block: q's leaf [6] leaves the GPU
    events = mgr.drain_events()
    assert [(type(e).__name__, tokens.get(e.block_hash)) for e in events
            if not isinstance(e, AllBlocksCleared)] == [
        ("BlockRemoved", (2,)), ("BlockTierChanged", (6,)), ("BlockStored", None)]
    assert isinstance(events[0], BlockRemoved) and events[0].tier is Tier.HOST
    assert sorted((b.tokens, b.tier.name) for b in mgr.cached_blocks()) == [
        ((1,), "HOST"), ((5,), "GPU"), ((6,), "HOST"), ((7,), "GPU")]
    assert hit(mgr, [1, END]) == 1 and hit(mgr, [1, 2, END]) == 1
    assert hit(mgr, [5, 6, END]) == 2
    mgr.check_invariants()


def test_an_onboarded_block_keeps_no_host_copy() -> None:
    """Mirrors test_boundary_hiradix_cache_unit.py test_l2_evicts_duplicate_dh_host_leaf_
    before_h_only_leaf and test_boundary_becomes_duplicate_after_last_h_descendant_removed
    (HiCache keeps a device block's host copy, a "duplicate" evicted first). Differs by
    design: kvtier's tiers are exclusive (a block lives in one tier: offload frees its GPU
    slot, onboard its host slot), so there is never a duplicate to evict: the host slots
    the two onboards free take the two GPU blocks they displace, and every block is in one
    tier only.

        before r:  host [1] -> [2] (full)          GPU [5] -> [6] -> [7]
        r = [1, 2, 999]: drop [7] (no host slot free yet); [1] in; [6] -> the slot [1]
                         freed; [2] in; [5] -> the slot [2] freed
    """
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=3, num_host_blocks=2)
    admit(mgr, "p", [1, 2], priority=50)
    release(mgr, "p")
    admit(mgr, "q", [5, 6, 7])  # p's two blocks to the host
    release(mgr, "q")
    mgr.take_plan()
    r = admit(mgr, "r", [1, 2, END])
    assert (r.num_reused_tokens, r.num_onboarded_tokens) == (2, 2)
    kinds = [op.kind.name for op in mgr.take_plan().ops]
    assert kinds == ["ONBOARD", "OFFLOAD", "ONBOARD", "OFFLOAD"]
    assert sorted((b.tokens, b.tier.name) for b in mgr.cached_blocks()) == [
        ((1,), "GPU"), ((2,), "GPU"), ((5,), "HOST"), ((6,), "HOST"), ((END,), "GPU")]
    mgr.check_invariants()


def test_expiring_a_salt_frees_only_its_blocks() -> None:
    """Mirrors test_cache_salt_ttl.py TestCacheSaltExpiry.test_expiry_frees_only_the_named_
    salt (``expire_cache_salts`` is kvtier's ``drop_key_space(salt=...)``): [1, 2, 3] under
    "salt-a", "salt-b" and no salt; expiring "salt-a" frees its 3 blocks, and the others
    still match all 3 tokens."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=16)
    for rid, salt in (("a", "salt-a"), ("b", "salt-b"), ("n", None)):
        admit(mgr, rid, [1, 2, 3], salt=salt)  # SGLang's insert: 3 blocks cached
        release(mgr, rid)
    assert mgr.drop_key_space(salt="salt-a") == 3
    mgr.check_invariants()
    assert [hit(mgr, [1, 2, 3, END], salt=s) for s in ("salt-a", "salt-b", None)] == [0, 3, 3]
    assert len(mgr.cached_blocks()) == 6 and mgr.num_key_spaces == 2


def test_a_held_prefix_outlives_the_expiry_of_its_salt() -> None:
    """Mirrors test_cache_salt_ttl.py TestCacheSaltExpiry.test_a_locked_node_defers_until_
    the_lock_drops: with [1, 2] and [1, 2, 7] under "salt-a" and a request holding [1, 2],
    expiring the salt drops the unheld branch [7] at once and keeps the held prefix.
    Differs by design: SGLang drops the prefix when its lock drops; kvtier keeps it cached
    (a released request's blocks are cached as usual) until ``drop_key_space`` is called
    again."""
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=16)
    for rid, prompt in (("a", [1, 2]), ("b", [1, 2, 7])):
        admit(mgr, rid, prompt, salt="salt-a")
        release(mgr, rid)
    admit(mgr, "held", [1, 2, 5], salt="salt-a")  # holds [1, 2]
    assert mgr.drop_key_space(salt="salt-a") == 1  # [7]; [1, 2] is held, [5] too
    mgr.check_invariants()
    assert hit(mgr, [1, 2, 7, END], salt="salt-a") == 2
    release(mgr, "held")
    assert hit(mgr, [1, 2, END], salt="salt-a") == 2  # cached again, as released
    assert mgr.drop_key_space(salt="salt-a") == 3  # [1, 2] and held's [5]
    assert hit(mgr, [1, 2, END], salt="salt-a") == 0 and mgr.cached_blocks() == []


def test_a_device_block_goes_to_the_host_keeping_its_host_child() -> None:
    """Mirrors test_boundary_hiradix_cache_unit.py test_l1_evicts_dh_leaf_to_h_without_
    deleting_children (a device block whose child is on the host only is evicted to the
    host, and the child stays attached): [1] -> [2] go to the host; r reuses [1] (onboarded
    to the GPU, [2] stays on the host below it); s pushes [1] back to the host, and [1, 2]
    still hits both blocks.

        after r:  GPU [1] -> host [2]        after s:  host [1] -> host [2]
    """
    mgr = make_manager(tokens_per_block=1, num_gpu_blocks=2, num_host_blocks=8)
    admit(mgr, "p", [1, 2])
    release(mgr, "p")
    admit(mgr, "q", [5, 6])  # [1], [2] to the host
    release(mgr, "q")
    r = admit(mgr, "r", [1, END])
    assert (r.num_reused_tokens, r.num_onboarded_tokens) == (1, 1)
    release(mgr, "r")
    tiers = {b.tokens: b.tier for b in mgr.cached_blocks()}
    assert (tiers[(1,)], tiers[(2,)]) == (Tier.GPU, Tier.HOST)
    mgr.take_plan()
    admit(mgr, "s", [7, 8])  # the GPU's two unheld blocks, [1] and END, to the host
    assert [op.kind.name for op in mgr.take_plan().ops] == ["OFFLOAD", "OFFLOAD"]
    tiers = {b.tokens: b.tier for b in mgr.cached_blocks()}
    assert (tiers[(1,)], tiers[(2,)], tiers[(END,)]) == (Tier.HOST, Tier.HOST, Tier.HOST)
    m = mgr.lookup([1, 2, END])
    assert (m.num_tokens, m.num_host_tokens) == (2, 2)
