"""Red team 26c: the core under a long seeded soak, at the edges of scale.

Every public call of the manager in random order (batches with salts, adapters, priorities,
retention ranges, chunks, reservations and skip-reading; appends, prefill chunks,
releases, failed copies and passes, resets, key-space drops, imports, soft claims, pickles)
over pools of 1 to 30 blocks and blocks of 1 to 4 tokens, every policy, checking after each
call: the books (``check_invariants``), the KV events replayed into an index that must
equal ``cached_blocks()`` (no block stored twice, none removed or moved from a tier it is
not in, a child never before its parent), the reuse each admission got equal to what
``lookup`` promised just before, and ``import_blocks`` adding exactly the host blocks it
returned. At the end every request leaves and the GPU pool is whole again.
"""

from __future__ import annotations

import pickle
import random

import pytest

from event_view import replay
from fake_clock import FakeClock
from kvtier import (
    CacheConfig,
    KVCacheManager,
    Retention,
    RetentionRange,
    SequenceSpec,
    Tier,
)
from kvtier.config import EVICTION_POLICIES


def _random_spec(rng: random.Random, rid: str, prefixes: list[list[int]],
                 max_tail: int) -> SequenceSpec:
    tokens = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(max_tail))]
    kw: dict[str, object] = {}
    if rng.random() < .3:
        kw["lora_id"] = rng.randrange(3)
    if rng.random() < .3:
        kw["salt"] = rng.choice(["a", "b"])
    if rng.random() < .3:
        kw["priority"] = rng.randrange(101)
    if rng.random() < .3:
        kw["retention_s"] = rng.choice([0.5, 5.0])
    if rng.random() < .2:
        kw["retention"] = Retention(
            (RetentionRange(rng.randrange(len(tokens)), None, rng.randrange(101),
                            rng.choice([None, 2.0])),),
            decode_priority=rng.randrange(101), decode_retention_s=rng.choice([None, 1.0]))
    if rng.random() < .2:
        kw["num_new_tokens"] = rng.randrange(1, len(tokens) + 1)
    if rng.random() < .2:
        kw["num_reserved_blocks"] = rng.randrange(3)
    if rng.random() < .1:
        kw["skip_reading_prefix_cache"] = True
    return SequenceSpec(rid, tokens, **kw)  # type: ignore[arg-type]


def _admit_batch(mgr: KVCacheManager, specs: list[SequenceSpec], live: set[str]) -> None:
    """Admit ``specs``: each gets the reuse ``lookup`` promised; a batch that can never fit
    is refused, nothing changed."""
    promises = [mgr.lookup_spec(s) for s in specs]
    before = (mgr.cached_blocks(), mgr.num_free_gpu_blocks, mgr.num_sequences)
    try:
        admissions = mgr.add_sequence_batch(specs)
    except ValueError as e:
        assert "needs" in str(e) and "num_gpu_blocks" in str(e), e
        assert (mgr.cached_blocks(), mgr.num_free_gpu_blocks, mgr.num_sequences) == before
        return
    for spec, adm, promise in zip(specs, admissions, promises, strict=True):
        if adm.admitted:
            assert adm.num_reused_tokens == promise.num_tokens, (spec, adm, promise)
            live.add(spec.request_id)


def _import(mgr: KVCacheManager, rng: random.Random, prefixes: list[list[int]]) -> None:
    """``import_blocks`` adds exactly the host blocks it returns, past what was cached."""
    tpb = mgr.config.tokens_per_block
    tokens = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(8))]
    key = {"lora_id": rng.choice([None, 1]), "salt": rng.choice([None, "a"])}
    found = mgr.lookup(tokens, **key)  # type: ignore[arg-type]
    missing = mgr.missing_block_hashes(tokens, **key)  # type: ignore[arg-type]
    num_full = (found.num_tokens - found.num_partial_tokens) // tpb
    assert num_full + len(missing) == (len(tokens) - 1) // tpb
    slots = mgr.import_blocks(tokens, rng.randrange(0, 4), **key)  # type: ignore[arg-type]
    mgr.check_invariants()
    now = mgr.lookup(tokens, **key)  # type: ignore[arg-type]
    assert (now.num_tokens - now.num_partial_tokens) // tpb == num_full + len(slots)
    assert mgr.missing_block_hashes(tokens, **key) == missing[len(slots):]  # type: ignore[arg-type]


def _soak(seed: int, num_calls: int) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    config = CacheConfig(
        tokens_per_block=rng.choice([1, 2, 4]), num_gpu_blocks=rng.choice([1, 2, 5, 12, 30]),
        num_host_blocks=rng.choice([0, 1, 3, 10]), enable_partial_reuse=rng.random() < .5,
        copy_on_partial_reuse=rng.random() < .7, eviction_policy=rng.choice(EVICTION_POLICIES),
        enable_events=True, offload_min_priority=rng.choice([0, 30, 60]))
    mgr = KVCacheManager(config, clock=clock)
    # Prompts mostly fit the pool (a pool of 1 block of 1 token takes 1-token prompts).
    room = config.num_gpu_blocks * config.tokens_per_block
    max_tail = max(1, min(8, room // 2))
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, max(2, min(12, room))))]
                for _ in range(4)]
    live: set[str] = set()
    index: dict[int, Tier] = {}
    for i in range(num_calls):
        clock.now += rng.choice([0, 0.1, 1, 10])
        op = rng.random()
        if op < .35:
            specs = [_random_spec(rng, f"r{i}.{k}", prefixes, max_tail)
                     for k in range(rng.randrange(1, 4))]
            _admit_batch(mgr, specs, live)
        elif op < .55 and live:
            rid = rng.choice(sorted(live))
            if not mgr.num_unscheduled_tokens(rid):
                mgr.append_tokens(rid, [rng.randrange(5) for _ in range(rng.randrange(1, 4))])
        elif op < .6 and live:
            rid = rng.choice(sorted(live))
            if left := mgr.num_unscheduled_tokens(rid):
                mgr.schedule_prefill(rid, rng.randrange(1, left + 1))
        elif op < .8 and live:
            rid = rng.choice(sorted(live))
            mgr.remove_sequence(rid, store_for_reuse=rng.random() < .9)
        elif op < .85:
            plan = mgr.take_plan()
            if len(plan) and rng.random() < .5:
                mgr.transfer_failed(plan, rng.sample(range(len(plan)),
                                                     rng.randrange(1, len(plan) + 1)))
        elif op < .88 and live:
            mgr.compute_failed(rng.sample(sorted(live), rng.randrange(1, len(live) + 1)))
        elif op < .9:
            mgr.reset_cache()
        elif op < .92:
            mgr.drop_key_space(lora_id=rng.choice([None, 0, 1]), salt=rng.choice([None, "a"]))
        elif op < .94:
            mgr, clock = pickle.loads(pickle.dumps((mgr, clock)))
        elif op < .97:
            _import(mgr, rng, prefixes)
        else:
            mgr.hint_waiting([SequenceSpec(f"h{i}", rng.choice(prefixes) + [1])])
        live = {rid for rid in live if mgr.has_sequence(rid)}
        mgr.check_invariants()
        replay(mgr.drain_events(), index)
        assert index == {b.block_hash: b.tier for b in mgr.cached_blocks()}, (seed, i)
    for rid in sorted(live):
        mgr.remove_sequence(rid)
    mgr.take_plan()
    mgr.check_invariants()
    assert mgr.num_sequences == 0 and mgr.num_reserved_blocks == 0
    assert mgr.num_free_gpu_blocks == config.num_gpu_blocks


@pytest.mark.parametrize("seed", range(16))
def test_a_seeded_soak_keeps_books_events_and_promises(seed: int) -> None:
    """Random calls of every kind keep the books, the event stream and the promises."""
    _soak(seed, 300)


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_queries_never_change_what_the_cache_decides(policy: str) -> None:
    """The same admissions and releases, with and without pure queries between them
    (``lookup``, ``lookup_spec``, ``missing_block_hashes``, ``cached_blocks``,
    ``num_common_prefix_blocks``, ``stats``), give the same plan, blocks and events."""
    results = []
    for with_queries in (False, True):
        rng, queries = random.Random(3), random.Random(99)
        clock = FakeClock()
        mgr = KVCacheManager(CacheConfig(tokens_per_block=2, num_gpu_blocks=24,
                                         num_host_blocks=8, eviction_policy=policy,
                                         enable_events=True), clock=clock)
        prefixes = [[rng.randrange(4) for _ in range(rng.randrange(1, 14))] for _ in range(6)]
        live: list[str] = []
        for i in range(200):
            clock.now += 0.3
            if with_queries:
                q = queries.choice(prefixes) + [queries.randrange(4)]
                mgr.lookup(q)
                mgr.lookup_spec(SequenceSpec("q", q))
                mgr.missing_block_hashes(q)
                mgr.cached_blocks()
                mgr.num_common_prefix_blocks()
                _ = mgr.stats
            if rng.random() < .5 or not live:
                tokens = rng.choice(prefixes) + [rng.randrange(4) for _ in range(rng.randrange(6))]
                if mgr.add_sequence(SequenceSpec(f"r{i}", tokens)).admitted:
                    live.append(f"r{i}")
            else:
                mgr.remove_sequence(live.pop(rng.randrange(len(live))))
        results.append((mgr.take_plan().ops, mgr.cached_blocks(), mgr.drain_events()))
    assert results[0] == results[1]
