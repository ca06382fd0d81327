"""The in-simulator clairvoyant: farthest next use goes first."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.sim import SyntheticChat, simulate
from kvtier.sim.clairvoyant import Clairvoyant
from kvtier.sim.workload import TraceRequest


def prompt(first: int, num_blocks: int) -> list[int]:
    """``num_blocks`` full 4-token blocks of distinct ids from ``first`` on, plus one more
    token, so a request's last full block is cached when it is released."""
    return list(range(first, first + 4 * num_blocks + 1))


def test_the_run_needed_last_goes_first() -> None:
    """Three 2-block runs released at t = 0; the stream comes back for B at t = 1, for A at
    t = 2, never for C. A request that needs 3 of the 6 cached blocks takes C's (never
    again), then the tail of A's (needed after B's), and B stays whole."""
    a, b, c, d = prompt(100, 2), prompt(200, 2), prompt(300, 2), prompt(400, 4)
    future = [TraceRequest("a", 0.0, a, 1), TraceRequest("b", 0.0, b, 1),
              TraceRequest("c", 0.0, c, 1), TraceRequest("d", 0.5, d, 1),
              TraceRequest("b2", 1.0, b, 1), TraceRequest("a2", 2.0, a, 1)]
    now = [0.0]
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8),
                         clock=lambda: now[0], policy=Clairvoyant(future, 4))
    for rid, tokens in (("a", a), ("b", b), ("c", c)):
        assert mgr.add_sequence(SequenceSpec(rid, tokens)).admitted
        mgr.remove_sequence(rid)
    now[0] = 0.5
    assert mgr.add_sequence(SequenceSpec("d", d)).admitted  # 5 blocks: 2 free + 3 evicted
    mgr.check_invariants()
    assert mgr.lookup(c).num_tokens == 0        # never again: first
    assert mgr.lookup(b).num_tokens == 8        # back at t = 1: kept whole
    assert mgr.lookup(a).num_tokens == 4        # back at t = 2: its tail went next


def test_it_leads_every_online_policy_on_an_unloaded_chat_stream() -> None:
    """On a small tier at a load the instance sustains, knowing the stream beats LRU by far
    and every kvtier policy, reuse stays exact, and the report names the policy used. (It
    is a reference, not a bound: where a long queue reorders requests, an online policy
    can come out a little above it.)"""
    workload = SyntheticChat(num_requests=80)
    cache = CacheConfig(tokens_per_block=32, num_gpu_blocks=300, eviction_policy="lru")
    clairvoyant = simulate(workload, cache, time_scale=3.0,
                           policy=Clairvoyant(workload, 32, time_scale=3.0))
    assert clairvoyant.cache_config["eviction_policy"] == "clairvoyant"
    assert clairvoyant.num_lost_reuse_tokens == 0
    lru = simulate(workload, cache, time_scale=3.0)
    assert lru.cache_config["eviction_policy"] == "lru"
    assert clairvoyant.token_hit_rate > lru.token_hit_rate + 0.03
    for name in ("priority-lru", "arc", "s3fifo", "kvtier-predict", "kvtier-predict-cost"):
        online = simulate(workload, replace(cache, eviction_policy=name), time_scale=3.0)
        assert online.token_hit_rate < clairvoyant.token_hit_rate, name


def test_what_is_no_policy_is_refused_by_name() -> None:
    """``simulate(policy=...)`` with something that is no eviction policy (a policy's name,
    say) is a clear error naming what it lacks, before anything runs."""
    with pytest.raises(ValueError, match=r"policy must be an eviction policy.*'lru' has no"
                                         r" name, ranks_soft_claims, num_queue_fields"):
        simulate(SyntheticChat(num_requests=5), CacheConfig(num_gpu_blocks=256),
                 policy="lru")  # type: ignore[arg-type]
