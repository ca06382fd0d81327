"""vLLM's prefix cache as a reference model: random traffic through kvtier and through a
plain model of vLLM v1's ``KVCacheManager`` / ``BlockPool`` give the same reuse, the same
refusals, the same free counts and the same lookups, step by step.

The model is the rules ``tests/v1/core/test_prefix_caching.py`` pins (vllm-project/vllm):
``get_computed_blocks`` walks the prompt's chained block hashes up to ``len(prompt) - 1``
tokens, taking the first cached block of each hash; ``allocate_slots`` refuses unless the
free queue holds the new blocks plus the computed blocks nobody holds (test_prefill_not_
enough_free_blocks_with_computed_blocks), touches the computed blocks (out of the queue),
pops new ones from its head (evicting what they cached: test_evict, test_hash_block_
correct_reuse) and caches every block that is full; ``free`` releases a request's blocks
tail first, appending cached ones to the queue and putting blocks without a hash at its head
(test_prefill's free-queue order). kvtier runs with the peers' order (``priority-lru``), one
tier and no partial reuse.

Two differences by design are kept out of the traffic, each pinned by its own mirror:
a block-aligned prompt whose blocks are all cached recomputes its last block, and decode
can fill a block equal to one cached; vLLM then keeps both copies cached, while kvtier lets
the cached run take over the request's copy (freeing the old slot: one free block more) or,
where another request holds it, keeps the copy private and the held run pinned
(``test_vllm_queue_offload_mirror.py::test_a_duplicate_of_a_held_block_stays_private_and_
pins_both_copies``). So prompts here are never block-aligned and decoded tokens are new.
"""

from __future__ import annotations

import random
from collections import deque

import pytest

from kvtier import SequenceSpec
from peer_mirror.mirror_helpers import make_manager

TPB = 4
NUM_BLOCKS = 12
MISS = 7777  # a query's extra last token: lookups count whole blocks before it


class VllmPrefixCache:
    """vLLM v1's prefix cache, one KV cache group, reduced to its books: per block a ref
    count and a hash (a tuple of the tokens up to the block's end: a chained hash without
    collisions), the free queue, and the hash -> blocks map (several blocks may share a
    hash; the first is the one found)."""

    def __init__(self, num_blocks: int) -> None:
        self.ref = [0] * num_blocks
        self.hash: list[tuple[int, ...] | None] = [None] * num_blocks
        self.queue = deque(range(num_blocks))
        self.cached: dict[tuple[int, ...], list[int]] = {}
        self.requests: dict[str, tuple[list[int], list[int]]] = {}

    def computed_blocks(self, tokens: list[int]) -> list[int]:
        """``get_computed_blocks``: the cached blocks of the prompt's longest prefix, its
        last token aside."""
        blocks: list[int] = []
        for i in range((len(tokens) - 1) // TPB):
            ids = self.cached.get(tuple(tokens[:(i + 1) * TPB]))
            if not ids:
                break
            blocks.append(ids[0])
        return blocks

    def _pop_new(self, n: int) -> list[int]:
        new = []
        for _ in range(n):
            block = self.queue.popleft()
            h = self.hash[block]
            if h is not None:  # evicted: forget its hash
                self.cached[h].remove(block)
                if not self.cached[h]:
                    del self.cached[h]
                self.hash[block] = None
            self.ref[block] = 1
            new.append(block)
        return new

    def _cache_full_blocks(self, request_id: str) -> None:
        tokens, blocks = self.requests[request_id]
        for i in range(len(tokens) // TPB):
            if self.hash[blocks[i]] is None:
                h = tuple(tokens[:(i + 1) * TPB])
                self.hash[blocks[i]] = h
                self.cached.setdefault(h, []).append(blocks[i])

    def allocate(self, request_id: str, tokens: list[int]) -> int | None:
        """``get_computed_blocks`` then ``allocate_slots`` for the whole prompt: the reused
        tokens, or None where it refuses (changing nothing)."""
        computed = self.computed_blocks(tokens)
        num_new = -(-len(tokens) // TPB) - len(computed)
        if num_new + sum(self.ref[b] == 0 for b in computed) > len(self.queue):
            return None
        for block in computed:
            if self.ref[block] == 0:
                self.queue.remove(block)
            self.ref[block] += 1
        self.requests[request_id] = (list(tokens), computed + self._pop_new(num_new))
        self._cache_full_blocks(request_id)
        return len(computed) * TPB

    def append(self, request_id: str, tokens: list[int]) -> bool:
        """``allocate_slots`` for decoded tokens: False where the queue is short."""
        own, blocks = self.requests[request_id]
        num_new = -(-(len(own) + len(tokens)) // TPB) - len(blocks)
        if num_new > len(self.queue):
            return False
        blocks += self._pop_new(max(0, num_new))
        own += tokens
        self._cache_full_blocks(request_id)
        return True

    def free(self, request_id: str) -> None:
        """``free``: tail first; cached blocks to the queue's tail, others to its head."""
        for block in reversed(self.requests.pop(request_id)[1]):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if self.hash[block] is None:
                    self.queue.appendleft(block)
                else:
                    self.queue.append(block)


def run_traffic(seed: int, num_steps: int, max_live: int = 3) -> tuple[int, int]:
    """Random admissions, decodes and removals through both; asserts they agree after every
    step. Returns how many admissions were refused and how many cached blocks evicted."""
    rng = random.Random(seed)
    mgr = make_manager(tokens_per_block=TPB, num_gpu_blocks=NUM_BLOCKS)
    ref = VllmPrefixCache(NUM_BLOCKS)
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randrange(1, 10))] for _ in range(6)]
    seen: list[list[int]] = []
    live: list[str] = []
    fresh = iter(range(10**6, 2 * 10**6))
    num_refused = 0
    for step in range(num_steps):
        roll = rng.random()
        if roll < 0.45 and len(live) < max_live:
            base = rng.choice(prefixes + seen) if seen and rng.random() < 0.6 else \
                rng.choice(prefixes)
            tokens = base[:rng.randrange(1, len(base) + 1)]
            tokens += [next(fresh) for _ in range(rng.randrange(0, 6))]
            if len(tokens) % TPB == 0:
                tokens.append(next(fresh))
            if -(-len(tokens) // TPB) > NUM_BLOCKS:
                continue
            rid = f"r{step}"
            expected = ref.allocate(rid, tokens)
            adm = mgr.add_sequence(SequenceSpec(rid, tokens))
            assert (adm.num_reused_tokens if adm.admitted else None) == expected, (step, rid)
            if adm.admitted:
                live.append(rid)
                seen.append(tokens)
            else:
                num_refused += 1
        elif roll < 0.7 and live:
            rid = rng.choice(live)
            tokens = [next(fresh) for _ in range(rng.randrange(1, 6))]
            assert (mgr.append_tokens(rid, tokens) is not None) == ref.append(rid, tokens)
            seen.append(list(ref.requests[rid][0]))
        elif live:
            rid = live.pop(rng.randrange(len(live)))
            ref.free(rid)
            mgr.remove_sequence(rid)
        mgr.check_invariants()
        assert mgr.num_free_gpu_blocks == len(ref.queue), step
        for tokens in seen[-8:]:
            query = [*tokens, MISS]
            assert mgr.lookup(query).num_tokens == len(ref.computed_blocks(query)) * TPB
    return num_refused, mgr.stats.gpu.evicted_blocks


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_reuses_evicts_and_frees_as_vllm_does(seed: int) -> None:
    """Mirrors test_prefix_caching.py's allocation, eviction and free-queue rules as a
    model (see the module docstring): 200 random steps of up to 3 live requests in 12
    blocks of 4 agree with vLLM's books at every step: reuse per admission, refusals, free
    blocks, and the lookup of each of the last 8 prompts and decoded sequences; and the pool
    is small enough that every seed evicts cached blocks often (the order matters)."""
    _, num_evicted = run_traffic(seed, 200)
    assert num_evicted >= 50


@pytest.mark.parametrize("seed", range(3))
def test_crowded_traffic_is_refused_where_vllm_refuses(seed: int) -> None:
    """The same with up to 6 live requests: the pool runs short, and kvtier refuses exactly
    the admissions vLLM's ``allocate_slots`` refuses (at least 5 per 200 steps)."""
    num_refused, _ = run_traffic(seed, 200, max_live=6)
    assert num_refused >= 5
