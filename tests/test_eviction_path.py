"""The eviction path per run, not per block: decode growth joins a request's output into one
run, a victim run gives at least a batch of blocks, an eviction round ranks at one instant,
and an unchanged queue hint is not walked again."""

from __future__ import annotations

from array import array

import pytest

from kvtier import (
    BlockStored,
    CacheConfig,
    KVCacheManager,
    OpKind,
    SequenceSpec,
    Tier,
    TransferOp,
)
from kvtier import cache_state as cache_module
from kvtier.cache import MAX_EVICTION_BATCH, BlockCache, eviction_batch
from kvtier.hashing import get_hash_fn, prompt_block_hashes
from kvtier.matching import NO_MATCH
from kvtier.onboarding import Onboarding, Swap
from kvtier.policies import KvtierPredict
from kvtier.pool import TierPool
from kvtier.radix import Node, add_child
from kvtier.transfer.plan import PlanRecorder

TPB = 4
PROMPT = [1] * 4 + [2] * 4        # 2 blocks
OUTPUT = list(range(10, 34))      # 24 tokens: 6 more blocks


def make_manager(num_gpu_blocks: int = 1024, num_host_blocks: int = 1024,
                 enable_events: bool = False) -> KVCacheManager:
    """4-token blocks, priority-LRU (the order is plain recency), a batch of 8 blocks on
    1,024-block tiers."""
    return KVCacheManager(CacheConfig(
        tokens_per_block=TPB, num_gpu_blocks=num_gpu_blocks, num_host_blocks=num_host_blocks,
        eviction_policy="priority-lru", enable_events=enable_events))


def decode_and_release(mgr: KVCacheManager) -> None:
    """Request "a": PROMPT in slots 0-1, then OUTPUT a token at a time (slots 2-7)."""
    assert mgr.add_sequence(SequenceSpec("a", PROMPT)).block_ids == (0, 1)
    for token in OUTPUT:
        mgr.append_tokens("a", [token])
        mgr.check_invariants()
    mgr.remove_sequence("a")
    mgr.check_invariants()


def test_eviction_batch_scales_with_the_tier() -> None:
    """1/128 of the tier, at most MAX_EVICTION_BATCH, at least 1 (small pools cut exactly)."""
    assert [eviction_batch(n) for n in (0, 6, 255, 256, 1024, 2048, 1 << 20)] == [
        1, 1, 1, 2, 8, 16, MAX_EVICTION_BATCH]


def test_decode_output_is_one_run_and_leaves_in_one_batch() -> None:
    """The output's six 1-block stores form one run; a 1-block allocation evicts all six
    (>= the batch of 8 where the run has them), in one offload run, and the next
    allocations take the spare slots without evicting anything::

        before g:  root ─ [P0 P1 | GPU 0-1] ─ [O2..O7 | GPU 2-7]    f holds GPU 8-1023
        after g:   root ─ [P0 P1 | GPU 0-1] ─ [O2..O7 | HOST 0-5]   g took GPU 2; 3-7 free
    """
    mgr = make_manager()
    decode_and_release(mgr)
    assert mgr.add_sequence(SequenceSpec("f", list(range(100, 100 + 1016 * TPB)))).admitted
    mgr.take_plan()
    g = mgr.add_sequence(SequenceSpec("g", [7] * TPB))
    assert g.block_ids == (2,)
    assert mgr.take_plan().ops == tuple(
        TransferOp(OpKind.OFFLOAD, Tier.GPU, 2 + i, Tier.HOST, i, TPB) for i in range(6))
    h = mgr.add_sequence(SequenceSpec("h", [8] * (3 * TPB)))
    assert h.block_ids == (3, 4, 5)
    assert len(mgr.take_plan()) == 0  # the spare slots: no eviction
    stats = mgr.stats
    assert (stats.gpu.offloaded_blocks, stats.gpu.evicted_blocks) == (6, 0)
    mgr.check_invariants()


def test_joined_output_run_reports_each_block_once_with_its_chained_hash() -> None:
    """Growing a run in place stores each block once, chained on the one before it, as
    separate runs would: the events and cached_blocks name the whole sequence's hashes."""
    mgr = make_manager(enable_events=True)
    decode_and_release(mgr)
    expected = prompt_block_hashes(get_hash_fn("xxh3_128"), PROMPT + OUTPUT, TPB)
    stored = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert [e.block_hash for e in stored] == expected
    assert [e.parent_hash for e in stored] == [None, *expected[:-1]]
    assert [b.block_hash for b in mgr.cached_blocks()] == expected
    assert [b.slot for b in mgr.cached_blocks()] == list(range(8))


def test_an_eviction_round_ranks_at_one_instant() -> None:
    """An eviction round freezes the evictor's now at its start (a nested round changes
    nothing, and its end releases nothing); after it, now is the live clock again."""
    ticks = iter(range(100))
    cache = BlockCache(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8),
                       clock=lambda: float(next(ticks)))
    evictor = cache.evictor
    assert (evictor.now(), evictor.now()) == (0.0, 1.0)
    with evictor.eviction_round():
        with evictor.eviction_round():  # inside a round: the outer one holds
            assert (evictor.now(), evictor.now()) == (2.0, 2.0)
        assert evictor.now() == 2.0
    assert evictor.now() == 3.0


def test_an_eviction_round_ends_when_its_body_or_its_expire_raises() -> None:
    """A round left by an exception, from its body or from the ``expire`` it opens with,
    lets the clock run again, and moves the check version on at its start and at its end
    (a pool re-checks its queue heads); a nested round that raises keeps the outer one's
    time."""
    ticks = iter(range(100))
    cache = BlockCache(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8),
                       clock=lambda: float(next(ticks)))
    evictor = cache.evictor
    changes = evictor._num_changes
    with pytest.raises(ZeroDivisionError), evictor.eviction_round():
        assert evictor._num_changes == changes + 1
        assert (evictor.now(), evictor.now()) == (0.0, 0.0)
        1 / 0  # noqa: B018
    assert evictor._num_changes == changes + 2
    assert (evictor.now(), evictor.now()) == (1.0, 2.0)
    with evictor.eviction_round():
        with pytest.raises(ZeroDivisionError), evictor.eviction_round():
            1 / 0  # noqa: B018
        assert evictor.now() == 3.0  # the outer round's time still holds
    assert evictor.now() == 4.0

    def expire() -> None:
        raise RuntimeError("expire")

    evictor.expire = expire  # type: ignore[method-assign]
    changes = evictor._num_changes
    with pytest.raises(RuntimeError, match="expire"), evictor.eviction_round():
        raise AssertionError("the body must not run")  # pragma: no cover
    assert evictor._num_changes == changes + 2
    assert (evictor.now(), evictor.now()) == (6.0, 7.0)  # 5.0 was the failed round's


def soft_claimed_runs(mgr: KVCacheManager) -> list[tuple[int, int]]:
    """(first block, blocks) of every soft-claimed run, in tree order."""
    return [(n.start_block, n.num_blocks) for n in mgr._cache.nodes() if n.soft_claimed]


def test_unchanged_hint_keeps_the_paths_claimed_through_a_split() -> None:
    """A hint repeated unchanged is not walked again, yet the claimed paths stay exact: a
    claim that splits a hinted run leaves both halves claimed, and a new hint moves them::

        root ─ [A0 A1 A2 A3 | GPU]            hint A0..A3: one run claimed
        root ─ [A0 A1] ─ [A2 A3]              a request claimed A0 A1 (split), released
    """
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=16,
                                     eviction_policy="kvtier-predict"))
    a = list(range(1, 17))
    assert mgr.add_sequence(SequenceSpec("a", a + [0])).admitted
    mgr.remove_sequence("a")
    hint = SequenceSpec("w", a + [99])
    mgr.hint_waiting([hint])
    assert soft_claimed_runs(mgr) == [(0, 4)]
    assert mgr.add_sequence(SequenceSpec("b", a[:8] + [50] * 4)).num_reused_tokens == 8
    mgr.remove_sequence("b")
    mgr.hint_waiting([hint])  # the same deepest run: nothing walked
    assert soft_claimed_runs(mgr) == [(0, 2), (2, 2)]
    mgr.hint_waiting([SequenceSpec("v", a[:8] + [50] * 4 + [7])])
    assert soft_claimed_runs(mgr) == [(0, 2), (2, 1)]
    mgr.hint_waiting([])
    assert soft_claimed_runs(mgr) == []
    mgr.check_invariants()


def test_hint_repeated_after_a_claimed_run_was_cut_claims_the_cut_tail() -> None:
    """A claimed GPU run cut for eviction leaves its tail unclaimed (it was the victim);
    where the tail lies on a hinted path (to a host run below it), the same hint repeated
    claims it again, as a fresh walk would::

        root ─ [A0 A1 A2 A3 | GPU] ─ [B4 B5 | HOST]            hint ends at B: all claimed
        root ─ [A0 A1 A2 | GPU] ─ [A3 | HOST] ─ [B4 B5 | HOST]  A3 offloaded: claimed again
    """
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=16,
                                     num_host_blocks=16, eviction_policy="kvtier-predict"))
    a, b = list(range(1, 17)), list(range(20, 28))
    for rid, tokens in (("a", a + [0]), ("b", a + b + [0])):
        assert mgr.add_sequence(SequenceSpec(rid, tokens)).admitted
        mgr.remove_sequence(rid)
    hint = [SequenceSpec("w", a + b + [99])]
    mgr.hint_waiting(hint)
    assert soft_claimed_runs(mgr) == [(0, 4), (4, 2)]
    # 10 GPU blocks free: 12 blocks offload B (the only candidate), 1 more cuts A3 off A.
    assert mgr.add_sequence(SequenceSpec("x", [7] * (12 * TPB))).admitted
    assert mgr.add_sequence(SequenceSpec("y", [8] * TPB)).admitted
    assert [(n.start_block, n.num_blocks, n.tier) for n in mgr._cache.nodes()
            if n.start_block < 6 and n.parent is not None and not n.ref_count] == [
        (0, 3, Tier.GPU), (3, 1, Tier.HOST), (4, 2, Tier.HOST)]
    assert soft_claimed_runs(mgr) == [(0, 3), (4, 2)]  # the victim A3 lost its claim
    mgr.hint_waiting(hint)
    assert soft_claimed_runs(mgr) == [(0, 3), (3, 1), (4, 2)]
    mgr.check_invariants()


def test_a_host_path_comes_in_one_round_swapping_a_victim_piece_by_piece() -> None:
    """A path of host runs is onboarded in one eviction round: its GPU victim leaves a
    piece as large as the host's free room at a time, and the path's blocks take each
    piece's GPU slots, freeing their host slots for the next piece. The victim needs one
    piece of host room, so it is kept whole (a run at a time, its tail was dropped)::

        before c:  root ─ R1 [1 2|3 4 : HOST 1-2] ─ R2 [5 6 : HOST 0]     host 3 free
                   root ─ f [9 9|9 9|9 9|9 9 : GPU 0-3]                   (unreferenced)
        c = [1 2 3 4 5 6 7]: R1, R2 in (3 blocks), then 1 new block
        after c:   R1 GPU 1-2, R2 GPU 3, c's new block GPU 0;  f on HOST 0-3, whole
    """
    mgr = KVCacheManager(CacheConfig(tokens_per_block=2, num_gpu_blocks=4, num_host_blocks=4,
                                     eviction_policy="priority-lru"), clock=lambda: 0.0)
    for rid, tokens in (("a", [1, 2, 3, 4]), ("b", [1, 2, 3, 4, 5, 6, 0]), ("f", [9] * 8)):
        assert mgr.add_sequence(SequenceSpec(rid, tokens)).admitted
        mgr.remove_sequence(rid)
    mgr.take_plan()
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7]).num_host_tokens == 6
    assert mgr.add_sequence(SequenceSpec("c", [1, 2, 3, 4, 5, 6, 7])).block_ids == (1, 2, 3, 0)
    mgr.check_invariants()

    def op(kind: OpKind, src: int, dst: int) -> TransferOp:
        src_tier, dst_tier = ((Tier.GPU, Tier.HOST) if kind is OpKind.OFFLOAD
                              else (Tier.HOST, Tier.GPU))
        return TransferOp(kind, src_tier, src, dst_tier, dst, 2)

    off, on = OpKind.OFFLOAD, OpKind.ONBOARD
    assert mgr.take_plan().ops == (
        op(off, 1, 3), op(on, 1, 1),   # f's block 1 -> the free host slot; R1's first in
        op(off, 2, 1), op(on, 2, 2),   # f's block 2 -> the host slot R1's first left
        op(off, 3, 2), op(on, 0, 3),   # f's block 3; R2 in
        op(off, 0, 0))                 # c's new block: f's head leaves too
    assert mgr.lookup([9] * 8 + [1]).num_host_tokens == 8  # f whole (one run at a time: 6)
    assert (mgr.stats.gpu.evicted_blocks, mgr.stats.host.evicted_blocks) == (0, 0)
    assert mgr.stats.gpu.offloaded_blocks == 3 + 4


def test_a_repeated_hint_claims_a_prefix_cached_since_for_a_request_that_had_none() -> None:
    """A hint repeated with the same requests skips their loop, but not the requests that
    found nothing cached last time: one whose prefix was stored since is claimed, as a
    fresh hint would::

        hint [w, v]:  root ─ [A0 A1 | GPU]         w claims A; v ([B..]) finds nothing
        b stores B:   root ─ [B0 B1 | GPU]         the same hint again claims B for v
    """
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=16,
                                     eviction_policy="kvtier-predict"))
    a, b = list(range(1, 9)), list(range(20, 28))
    assert mgr.add_sequence(SequenceSpec("a", a + [0])).admitted
    mgr.remove_sequence("a")
    hint = [SequenceSpec("w", a + [99]), SequenceSpec("v", b + [99])]
    mgr.hint_waiting(hint)
    assert soft_claimed_runs(mgr) == [(0, 2)]
    mgr.hint_waiting(hint)  # unchanged: nothing matched again
    assert soft_claimed_runs(mgr) == [(0, 2)]
    assert mgr.add_sequence(SequenceSpec("b", b + [0])).admitted
    mgr.remove_sequence("b")
    mgr.hint_waiting(hint)
    assert soft_claimed_runs(mgr) == [(0, 2), (0, 2)]
    assert {n.tokens[0] for n in mgr._cache.nodes() if n.soft_claimed} == {1, 20}
    mgr.check_invariants()


def test_a_swap_in_closed_form_leaves_what_the_piece_by_piece_loop_leaves() -> None:
    """``Onboarding.swap_in`` gives the victim the host slots, the path's copies, the
    piece ends and the free list the loop gives (a piece of the host's free room at a time,
    each taking the slots the one before gave back), for rooms that divide the swap, that
    leave a short last piece, and that hold it whole::

        host  free [20 21 | 0 1 2 ...]   path [10 11 12 13 14]   victim GPU [5 6 7 8 9]
        room 2:  pieces end at 2, 4, 5;  victim -> [20 21 10 11 12]
    """

    def run(room: int, closed_form: bool) -> tuple[object, ...]:
        gpu, host = TierPool(Tier.GPU, 16), TierPool(Tier.HOST, 16)
        path = array("q", range(10, 15))
        host.take(16)
        host.num_referenced = 16
        host.give_back(list(range(20, 20 + room)))  # the room the swap found
        host.num_referenced -= room
        onboarding = Onboarding(path, PlanRecorder(), gpu, host, TPB)
        victim = array("q", [5, 6, 7, 8, 9])
        if closed_form:
            swap = onboarding.swap_in(victim)
        else:  # the loop, piece by piece
            host_slots = array("q")
            path_slots = array("q")
            ends: list[int] = []
            while (done := len(path_slots)) < len(victim):
                end = min(len(victim), done + host.num_free)
                host_slots += host.take(end - done)
                path_slots += onboarding.take_in(victim[done:end])
                ends.append(end)
            swap = Swap(host_slots, path_slots, ends)
        return (swap.host_slots.tolist(), swap.path_slots.tolist(), swap.piece_ends,
                onboarding.gpu_slots.tolist(), host.free_slots(), host.num_referenced,
                gpu.num_referenced)

    for room in (1, 2, 3, 5, 7):
        assert run(room, True) == run(room, False), room
    assert run(2, True)[:3] == ([20, 21, 10, 11, 12], [10, 11, 12, 13, 14], [2, 4, 5])


def test_a_queue_that_lost_its_head_is_hinted_as_a_fresh_one() -> None:
    """A hint whose queue lost its first request and gained one at its end (a step admitted
    the head) claims exactly what a fresh hint of that queue claims, without walking the
    requests it kept; a request id twice makes it walk the queue again::

        root ─ [A0 A1 | GPU]        hint a, b, c: A, B claimed (c: nothing cached)
            ├─ [B0 B1 | GPU]        then b, c, d: B, D claimed
            └─ [D0 D1 | GPU]
    """
    def cached(prompts: dict[str, list[int]]) -> KVCacheManager:
        mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=32,
                                         eviction_policy="kvtier-predict-cost"),
                             clock=lambda: 5.0)
        for rid, tokens in prompts.items():
            assert mgr.add_sequence(SequenceSpec(rid, tokens + [0])).admitted
            mgr.remove_sequence(rid)
        return mgr

    prompts = {"A": [1] * 8, "B": [2] * 8, "D": [4] * 8}
    a, b, c, d = (SequenceSpec(rid, tokens + [9]) for rid, tokens in
                  (("a", [1] * 8), ("b", [2] * 8), ("c", [3] * 8), ("d", [4] * 8)))
    mgr, fresh = cached(prompts), cached(prompts)
    mgr.hint_waiting([a, b, c])
    assert soft_claimed_runs(mgr) == [(0, 2), (0, 2)]
    mgr.hint_waiting([b, c, d])
    fresh.hint_waiting([b, c, d])
    claimed = sorted(n.tokens[0] for n in mgr._cache.nodes() if n.soft_claimed)
    assert claimed == sorted(n.tokens[0] for n in fresh._cache.nodes() if n.soft_claimed)
    assert claimed == [2, 4]
    assert [n.tokens[0] for n in mgr._cache._hinted_queue[1]] == [2, 4]
    assert mgr._cache._hinted_queue[2] == [c]
    mgr.hint_waiting([c, d, SequenceSpec("d", [5] * 8)])  # "d" twice: walked afresh
    assert [n.tokens[0] for n in mgr._cache._hinted_queue[1]] == [4]
    assert mgr._cache._hinted_rids is None
    mgr.check_invariants()


class _RecordingPredict(KvtierPredict):
    """kvtier-predict-cost that keeps every ``forget`` call's arguments."""

    def __init__(self) -> None:
        super().__init__(cost_aware=True)
        self.forgotten: list[tuple[object, ...]] = []

    def forget(self, ghost_key: object, node_uid: int, reuse_class: int, released_s: float,
               num_blocks: int, now: float, released_tick: int = 0) -> None:
        self.forgotten.append((ghost_key, node_uid, reuse_class, released_s, num_blocks, now,
                               released_tick))
        super().forget(ghost_key, node_uid, reuse_class, released_s, num_blocks, now,
                       released_tick)


def test_a_leaf_tail_dropped_in_place_leaves_what_a_cut_tail_dropped_leaves() -> None:
    """``BlockCache.drop_tail`` on a leaf (no node for the tail) leaves the run, the free
    lists, the counts and the learner as ``drop(cut_tail(...))`` does, and forgets the
    tail with the arguments its node would have given (its uid the next drawn: the next
    node's is one later in both), on either tier::

        root ─ [a0 .. a5 | tier]   drop the last 2:   root ─ [a0 .. a3 | tier]
    """

    def state(cache: BlockCache, node: Node, policy: _RecordingPredict,
              uid0: int) -> tuple[object, ...]:
        forgotten = [(f[0], f[1] - uid0, *f[2:]) for f in policy.forgotten]  # type: ignore[operator]
        return (list(node.tokens), node.slots, node.children, node.by_first,
                node.num_gpu_children, cache.gpu.free_slots(), cache.host.free_slots(),
                cache.stats.gpu.evicted_blocks, cache.stats.host.evicted_blocks, forgotten,
                policy.learner.censored, policy.learner.drop_age_s, cache.evictor._soft_cut,
                Node(None, [], [], Tier.GPU, None, 0, None).uid - uid0)

    def built(tier: Tier) -> tuple[BlockCache, _RecordingPredict]:
        """The same cache every call (a fixed clock; uids are compared as differences)."""
        policy = _RecordingPredict()
        mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                         num_host_blocks=64), clock=lambda: 5.0, policy=policy)
        assert mgr.add_sequence(SequenceSpec("a", prompt)).admitted
        mgr.remove_sequence("a")
        if tier is Tier.HOST:  # "b" takes the GPU: "a" leaves for the host
            assert mgr.add_sequence(SequenceSpec("b", [99] * (8 * TPB))).admitted
        mgr.take_plan()
        return mgr._cache, policy

    prompt = list(range(1, 1 + 6 * TPB))  # 6 blocks
    for tier in (Tier.GPU, Tier.HOST):
        results = []
        for in_place in (True, False):
            # NOTE: built twice, not deep-copied: a deep copy of the cache's itertools.count
            # warns on Python 3.12 and fails from 3.14.
            cache, recorder = built(tier)
            assert not recorder.forgotten
            (node,) = [n for n in cache.nodes() if len(n.slots) == 6]
            assert node.tier is tier and not node.children and node.reuse_class is not None
            node.soft_claimed = True
            uid0 = Node(None, [], [], Tier.GPU, None, 0, None).uid
            if in_place:
                cache.drop_tail(node, 2)
            else:
                cache.drop(cache.evictor.cut_tail(node, 2))
            cache.evictor.refile(node)
            results.append(state(cache, node, recorder, uid0))
        assert results[0] == results[1], tier
        # Four blocks stay; one forget, of the 2-block tail, whose uid was drawn right
        # after uid0 (the probe's one later).
        assert results[0][0] == prompt[:4 * TPB] and results[0][-1] == 2
        forgotten = results[0][9]
        assert isinstance(forgotten, list) and len(forgotten) == 1
        assert forgotten[0][1] == 1 and forgotten[0][4] == 2


class _CountingPredict(KvtierPredict):
    """kvtier-predict-cost that counts its ``rank`` calls."""

    def __init__(self) -> None:
        super().__init__(cost_aware=True)
        self.num_ranks = 0

    def rank(self, node: Node, now: float, default_priority: int) -> tuple[float, ...]:
        self.num_ranks += 1
        return super().rank(node, now, default_priority)


def cached_run(cache: BlockCache, parent: Node, first_token: int, tier: Tier,
               reuse_class: int, tick: int) -> Node:
    """An unreferenced two-block run of ``tier`` below ``parent``, released at ``tick``
    under ``reuse_class`` (its eviction queue), filed as a candidate."""
    pool = cache.pool(tier)
    root = parent.root
    assert root is not None
    node = Node(parent, [first_token] * (2 * TPB), pool.take(2), tier, None,
                parent.start_block + len(parent.slots), root)
    node.reuse_class, node.last_used = reuse_class, tick
    add_child(parent, node)
    cache.evictor.refile(node)
    return node


def test_a_victim_taken_below_a_bound_is_ranked_once() -> None:
    """``take_victim``'s bound (``below``) and ``victim_rank`` read the rank the pop
    computed for the victim: the policy ranks each queue head once (three calls before),
    and ``victim_rank`` answers the kept rank once, then asks the policy::

        root ─┬─ [h1 | host, class 1, tick 2]
              └─ [h2 | host, class 3, tick 1]     two queues; h2 goes (older)
    """
    policy = _CountingPredict()
    cache = BlockCache(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8, num_host_blocks=8),
                       clock=lambda: 5.0, policy=policy)
    root = cache.join_root(None, None)
    cached_run(cache, root, 1, Tier.HOST, 1, 2)
    h2 = cached_run(cache, root, 2, Tier.HOST, 3, 1)
    evictor = cache.evictor
    with evictor.eviction_round():
        victim = evictor.take_victim(Tier.HOST, 2, below=(1000.0,))
        assert victim is h2 and policy.num_ranks == 2
        kept = evictor.victim_rank(h2)
        assert policy.num_ranks == 2  # the pop's
        assert kept == evictor.rank(h2) and policy.num_ranks == 3
        evictor.victim_rank(h2)
        assert policy.num_ranks == 4  # kept once: asked again


def test_a_queue_head_dropped_below_a_victim_is_not_taken_again() -> None:
    """A host run found live as a queue head at one pop and dropped below a victim
    before the next (its GPU parent dropped whole) is not taken at the next pop: the
    drop tells the evictor, whose pools check their heads again::

        root ─┬─ [g | GPU] ─ [h1 | host, class 1, tick 2]
              └─ [h2 | host, class 3, tick 1]
    """
    cache = BlockCache(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8, num_host_blocks=8,
                                   eviction_policy="kvtier-predict-cost"), clock=lambda: 5.0)
    root = cache.join_root(None, None)
    g = cached_run(cache, root, 9, Tier.GPU, 1, 3)
    h1 = cached_run(cache, g, 1, Tier.HOST, 1, 2)
    h2 = cached_run(cache, root, 2, Tier.HOST, 3, 1)
    evictor = cache.evictor
    with evictor.eviction_round():
        assert evictor.take_victim(Tier.HOST, 2) is h2  # h1 found live, not taken
        cache.drop(h2)
        cache.drop(g)  # and h1 with it
        assert h1.parent is None
        assert evictor.take_victim(Tier.HOST, 2) is None
    assert cache.host.num_free == 8 and cache.gpu.num_free == 8


def test_a_host_less_victim_loses_its_tail_in_place() -> None:
    """With no host tier a GPU victim larger than the need is trimmed in place
    (``drop_tail``): no node cut off only to be dropped, and the same blocks, ids and run
    as a cut and a drop; with KV events on (the journal names the dropped run) it is cut
    and dropped as before::

        a: root ─ [a0 .. a249 | slots 0-249]   (6 slots free)
        b needs 10: 6 free + 4 evicted   ->   root ─ [a0 .. a245 | slots 0-245]
                                               b: slots 246-249, then 250-255
    """
    for events in (False, True):
        _evict_host_less(events)


def _evict_host_less(events: bool) -> None:
    mgr = make_manager(num_gpu_blocks=256, num_host_blocks=0, enable_events=events)
    prompt_a = list(range(250 * TPB))
    assert mgr.add_sequence(SequenceSpec("a", prompt_a)).admitted
    mgr.remove_sequence("a")
    (run,) = mgr._cache.nodes()
    uid = run.uid
    evictor = mgr._cache.evictor
    cuts: list[int] = []
    cut_tail = evictor.cut_tail

    def counting_cut(node: Node, num_tail_blocks: int) -> Node:
        cuts.append(num_tail_blocks)
        return cut_tail(node, num_tail_blocks)

    evictor.cut_tail = counting_cut  # type: ignore[method-assign]
    b = mgr.add_sequence(SequenceSpec("b", [10**6 + i for i in range(10 * TPB)]))
    assert b.block_ids == (246, 247, 248, 249, *range(250, 256))
    assert cuts == ([4] if events else []), events
    a_run = [n for n in mgr._cache.nodes() if n.uid == uid]
    assert len(a_run) == 1 and a_run[0].slots.tolist() == list(range(246))
    assert list(a_run[0].tokens) == prompt_a[:246 * TPB]
    assert mgr.stats.gpu.evicted_blocks == 4
    assert mgr.lookup(prompt_a).num_tokens == 246 * TPB
    mgr.check_invariants()


def test_a_prompt_whose_first_id_starts_no_cached_run_matches_nothing_without_a_walk(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt whose first id starts no run under its root matches nothing, answered
    before any walk or rematch; a prompt sharing only that first id is still walked (a
    partial match of 3 tokens)::

        root ─ [1 1 1 1 | 2 2 2 2]      "x" = [5 ...]: nothing     "y" = [1 1 1 9 ...]: 3
    """
    mgr = make_manager()
    assert mgr.add_sequence(SequenceSpec("a", PROMPT + [3])).admitted
    mgr.remove_sequence("a")
    cache = mgr._cache
    root = cache.root(None, None)
    assert root is not None
    with monkeypatch.context() as mp:
        def walked(*args: object, **kwargs: object) -> None:
            raise AssertionError("walked")

        mp.setattr(cache_module, "match_prompt", walked)
        mp.setattr(cache_module, "rematch", walked)
        assert cache.match_spec(root, SequenceSpec("x", [5] * 9), None) is NO_MATCH
    assert mgr.lookup_spec(SequenceSpec("y", [1, 1, 1, 9, 9, 9, 9, 9, 9])).num_tokens == 3
    mgr.check_invariants()


def test_a_recall_asks_for_the_ghost_key_its_drop_left() -> None:
    """The keys a miss is recalled at (written out in ``recall_miss``) are the ghost keys
    the drop left (``node_ghost_key``): a run dropped below a cached prefix is found
    again by the request that comes back for it, and its ghost leaves the table."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=6,
                                     eviction_policy="kvtier-predict-cost"))
    policy = mgr._cache.evictor.policy
    assert isinstance(policy, KvtierPredict)
    forgotten: list[object] = []
    recalled: list[tuple[object, object]] = []
    forget, recall = policy.forget, policy.recall

    def spy_forget(ghost_key: object, *args: object) -> None:
        forgotten.append(ghost_key)
        forget(ghost_key, *args)  # type: ignore[arg-type]

    def spy_recall(ghost_key: object, now: float) -> tuple[int, int] | None:
        found = recall(ghost_key, now)
        recalled.append((ghost_key, found))
        return found

    policy.forget = spy_forget  # type: ignore[method-assign, assignment]
    policy.recall = spy_recall  # type: ignore[method-assign]
    head, tail = [1] * TPB + [2] * TPB, [3] * TPB + [4] * TPB
    assert mgr.add_sequence(SequenceSpec("a", head + [0])).admitted
    mgr.remove_sequence("a")
    assert mgr.add_sequence(SequenceSpec("b", head + tail + [0])).admitted
    mgr.remove_sequence("b")  # cached: the head's 2 blocks, the tail's 2 below them
    assert mgr.add_sequence(SequenceSpec("c", head + [0])).admitted  # the head, 1 more
    assert mgr.add_sequence(SequenceSpec("d", [7] * TPB * 2 + [0])).admitted  # tail goes
    assert len(forgotten) == 1 and len(policy.ghosts) == 1
    mgr.remove_sequence("d")
    mgr.remove_sequence("c")
    recalled.clear()
    assert mgr.add_sequence(SequenceSpec("e", head + tail + [0])).admitted
    assert recalled and recalled[0][0] == forgotten[0] and recalled[0][1] is not None
    assert policy.ghosts.pop(forgotten[0]) is None  # taken by the recall (d's is there)
    mgr.check_invariants()


class _WithinAtTimes(KvtierPredict):
    """The default policy, noting the time every ``within`` call is asked at."""

    def __init__(self) -> None:
        super().__init__(cost_aware=True)
        self.asked_at: list[float] = []

    def within(self, node: Node, now: float) -> float:
        self.asked_at.append(now)
        return super().within(node, now)


def test_each_eviction_round_asks_within_at_its_own_time() -> None:
    """A pop asks the policy's ``within`` at its round's held time (bound once a round):
    a round at a later time binds that time anew, so no call answers for a round before
    (one bound kept across rounds would)."""
    now = [0.0]
    policy = _WithinAtTimes()
    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=16,
                                     num_host_blocks=0), clock=lambda: now[0], policy=policy)
    for i in range(4):  # four 3-block runs of one class, released in turn: one queue
        now[0] = float(i)
        assert mgr.add_sequence(SequenceSpec(f"r{i}", [100 * i + 1] * 12)).admitted
        mgr.remove_sequence(f"r{i}")
    for t in (10.0, 20.0, 30.0):  # each admission evicts in one round at its time
        now[0] = t
        del policy.asked_at[:]
        assert mgr.add_sequence(SequenceSpec(f"n{t}", [int(t)] * 28)).admitted
        mgr.remove_sequence(f"n{t}")
        mgr.check_invariants()
        assert policy.asked_at and set(policy.asked_at) == {t}, (t, policy.asked_at)
