"""TensorRT-LLM's eviction by priority and retention as a reference model: random traffic
with per-request priorities, ``KvCacheRetentionConfig`` token ranges, decode priorities and
durations that run out goes through kvtier and through a plain model of TensorRT-LLM's
primary pool, and both give the same reuse, refusals, free counts and lookups, step by step.

The model is the rules ``kvCacheManagerTest.cpp`` and ``evictionPolicyTest.cpp`` pin
(NVIDIA/TensorRT-LLM, ``cpp/tests/unit_tests/batch_manager/``): a block released for reuse
takes the priority of the range its first token lies in (KvCacheRetentionConfigTest.
BlockConfigTest), decoded blocks the decode priority (KVCacheManagerDecodeBlockPriority
Test), the request's own elsewhere, and it keeps the priority of its last release (Event
StreamPriority); a priority with a duration falls back to the default, 35, once the duration
has run from the release (TimedBlockTest, KVCacheManagerTimedEvictionTest: at the instant
it runs out, as TensorRT-LLM's ``refresh`` takes every block whose expiration time is not
after now); a new block is a free one if any, else the unreferenced cached leaf of lowest
priority, least recently released first, a request's blocks released tail first
(BlockManagerBlockPriorityTest, KVCacheManagerPriorityTest's "lowest priority leaf").

One rule is kvtier's, not TensorRT-LLM's, by design: a block whose priority ran out is
ranked among the default blocks by its release (its real last use), where TensorRT-LLM's
``refresh`` re-queues it at the back of the default queue when it runs out. No peer test
orders the two; ``test_trtllm_edges_17_mirror.py::test_a_block_whose_retention_ran_out_is_
ranked_by_its_release`` says why and pins kvtier's answer. With TensorRT-LLM's rule here
instead, 56 of the first 60 seeds of this traffic part ways with kvtier.
kvtier runs with the peers' order (``priority-lru``), one tier, no partial reuse and a
clock the test moves. As in ``test_vllm_model_17_mirror.py``, prompts are never
block-aligned and decoded tokens are new (no duplicate blocks: kvtier and the peers keep
duplicates differently, by design).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from kvtier import Retention, RetentionRange, SequenceSpec
from peer_mirror.mirror_helpers import make_manager

TPB = 4
NUM_BLOCKS = 12
DEFAULT_PRIORITY = 35
MISS = 7777
Settings = Callable[[int], tuple[int, float | None]]  # block index -> (priority, duration)


class TrtllmPrimaryPool:
    """TensorRT-LLM's primary pool, reduced to its books: per block a ref count, a hash (the
    tokens up to its end), the priority and expiration of its last release and that
    release's order; free blocks that hold nothing; the cached blocks by hash."""

    def __init__(self, num_blocks: int) -> None:
        self.now = 0.0
        self.ref = [0] * num_blocks
        self.hash: list[tuple[int, ...] | None] = [None] * num_blocks
        self.priority = [DEFAULT_PRIORITY] * num_blocks
        self.expires: list[float | None] = [None] * num_blocks
        self.released = [0] * num_blocks
        self.num_releases = 0
        self.empty = list(range(num_blocks))
        self.cached: dict[tuple[int, ...], int] = {}
        self.requests: dict[str, tuple[list[int], list[int], Settings]] = {}

    def computed_blocks(self, tokens: list[int]) -> list[int]:
        """The cached blocks of the prompt's longest prefix, its last token aside."""
        blocks = []
        for i in range((len(tokens) - 1) // TPB):
            block = self.cached.get(tuple(tokens[:(i + 1) * TPB]))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_free(self) -> int:
        return len(self.empty) + sum(self.ref[b] == 0 for b in self.cached.values())

    def effective_priority(self, block: int) -> int:
        expires = self.expires[block]
        return DEFAULT_PRIORITY if expires is not None and self.now >= expires \
            else self.priority[block]

    def _take(self) -> int:
        if self.empty:
            return self.empty.pop(0)
        parents = {self.cached.get(h[:-TPB]) for h in self.cached}
        leaves = [b for b in self.cached.values() if self.ref[b] == 0 and b not in parents]
        block = min(leaves, key=lambda b: (self.effective_priority(b), self.released[b]))
        h = self.hash[block]
        assert h is not None
        del self.cached[h]
        self.hash[block] = None
        return block

    def _store_full_blocks(self, request_id: str) -> None:
        tokens, blocks, _ = self.requests[request_id]
        for i in range(len(tokens) // TPB):
            h = tuple(tokens[:(i + 1) * TPB])
            if self.hash[blocks[i]] is None and h not in self.cached:
                self.hash[blocks[i]] = h
                self.cached[h] = blocks[i]

    def add_sequence(self, request_id: str, tokens: list[int], settings: Settings) -> int | None:
        """The reused tokens, or None where the pool cannot take the prompt now."""
        computed = self.computed_blocks(tokens)
        num_new = -(-len(tokens) // TPB) - len(computed)
        if num_new + sum(self.ref[b] == 0 for b in computed) > self.num_free():
            return None
        for block in computed:
            self.ref[block] += 1
        new = []
        for _ in range(num_new):
            block = self._take()
            self.ref[block] = 1
            new.append(block)
        self.requests[request_id] = (list(tokens), computed + new, settings)
        self._store_full_blocks(request_id)
        return len(computed) * TPB

    def add_tokens(self, request_id: str, tokens: list[int]) -> bool:
        own, blocks, _ = self.requests[request_id]
        num_new = -(-(len(own) + len(tokens)) // TPB) - len(blocks)
        if num_new > self.num_free():
            return False
        for _ in range(max(0, num_new)):
            block = self._take()
            self.ref[block] = 1
            blocks.append(block)
        own += tokens
        self._store_full_blocks(request_id)
        return True

    def remove_sequence(self, request_id: str) -> None:
        _, blocks, settings = self.requests.pop(request_id)
        for i in reversed(range(len(blocks))):
            block = blocks[i]
            self.ref[block] -= 1
            if self.ref[block]:
                continue
            if self.hash[block] is None:
                self.empty.insert(0, block)
            else:
                self.num_releases += 1
                self.released[block] = self.num_releases
                priority, duration = settings(i)
                self.priority[block] = priority
                self.expires[block] = None if duration is None else self.now + duration


def random_retention(rng: random.Random, num_tokens: int) -> Retention | None:
    """None, or up to 3 token ranges (some with a duration) and maybe a decode priority."""
    if rng.random() < 0.4:
        return None
    ranges = []
    start = 0
    for end in sorted(rng.sample(range(1, num_tokens + 8), min(3, num_tokens + 6))):
        if rng.random() < 0.7:
            ranges.append(RetentionRange(start, end, rng.choice([5, 20, 50, 90]),
                                         rng.choice([None, 1.0, 2.5])))
        start = end
    decode = rng.choice([None, 15, 60])
    return Retention(tuple(ranges), decode_priority=decode,
                     decode_retention_s=None if decode is None else rng.choice([None, 1.5]))


def block_settings(retention: Retention | None, priority: int, duration: float | None,
                   num_prompt_tokens: int) -> Settings:
    """TensorRT-LLM's rule: a block's settings are those of its first token."""
    def settings(block: int) -> tuple[int, float | None]:
        token = block * TPB
        if retention is None:
            return priority, duration
        if token >= num_prompt_tokens:
            if retention.decode_priority is None:
                return priority, duration
            return retention.decode_priority, retention.decode_retention_s
        for r in retention.ranges:
            if r.start <= token and (r.end is None or token < r.end):
                return r.priority, r.retention_s
        return priority, duration
    return settings


def run_traffic(seed: int, num_steps: int) -> int:
    """Random admissions, decodes and removals, the clock moving half a second a step;
    asserts kvtier and the model agree after every step. Returns kvtier's evictions."""
    rng = random.Random(seed)
    now = [0.0]
    mgr = make_manager(tokens_per_block=TPB, num_gpu_blocks=NUM_BLOCKS, clock=lambda: now[0])
    ref = TrtllmPrimaryPool(NUM_BLOCKS)
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randrange(1, 10))] for _ in range(6)]
    seen: list[list[int]] = []
    live: list[str] = []
    fresh = iter(range(10**6, 2 * 10**6))
    for step in range(num_steps):
        now[0] += 0.5
        ref.now = now[0]
        roll = rng.random()
        if roll < 0.45 and len(live) < 3:
            base = rng.choice(prefixes + seen) if seen and rng.random() < 0.6 else \
                rng.choice(prefixes)
            tokens = base[:rng.randrange(1, len(base) + 1)]
            tokens += [next(fresh) for _ in range(rng.randrange(0, 6))]
            if len(tokens) % TPB == 0:
                tokens.append(next(fresh))
            if -(-len(tokens) // TPB) > NUM_BLOCKS:
                continue
            rid = f"r{step}"
            priority = rng.choice([10, 35, 35, 80])
            duration = rng.choice([None, None, 2.0])
            retention = random_retention(rng, len(tokens))
            expected = ref.add_sequence(rid, tokens, block_settings(
                retention, priority, duration, len(tokens)))
            adm = mgr.add_sequence(SequenceSpec(rid, tokens, priority=priority,
                                                retention_s=duration, retention=retention))
            assert (adm.num_reused_tokens if adm.admitted else None) == expected, (step, rid)
            if adm.admitted:
                live.append(rid)
                seen.append(tokens)
        elif roll < 0.7 and live:
            rid = rng.choice(live)
            tokens = [next(fresh) for _ in range(rng.randrange(1, 6))]
            assert (mgr.append_tokens(rid, tokens) is not None) == ref.add_tokens(rid, tokens)
            seen.append(list(ref.requests[rid][0]))
        elif live:
            rid = live.pop(rng.randrange(len(live)))
            ref.remove_sequence(rid)
            mgr.remove_sequence(rid)
        mgr.check_invariants()
        assert mgr.num_free_gpu_blocks == ref.num_free(), step
        for tokens in seen[-8:]:
            query = [*tokens, MISS]
            assert mgr.lookup(query).num_tokens == len(ref.computed_blocks(query)) * TPB, step
    return mgr.stats.gpu.evicted_blocks


@pytest.mark.parametrize("seed", range(15))
def test_random_traffic_with_priorities_and_retention_evicts_as_tensorrt_llm(seed: int) -> None:
    """Mirrors the priority and retention rules above as a model: 200 random steps of up to
    3 live requests in 12 blocks of 4, with random priorities, token-range retention, decode
    priorities and durations on a moving clock, agree with the model at every step: reuse
    per admission, refusals, free blocks and the lookups of the last 8 sequences; each seed
    evicts often enough that the order matters."""
    assert run_traffic(seed, 200) >= 50
