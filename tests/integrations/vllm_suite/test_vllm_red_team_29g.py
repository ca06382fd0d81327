"""Red team 29g: the hits kvtier reports to vLLM 0.33.0 are the hits vLLM gets, through vLLM's
real Scheduler, OffloadingConnector and TieringOffloadingManager with kvtier's Redis tier
and CPU-tier policy, over a real redis-server. Each test fails on the code before its fix,
or pins what held."""

from __future__ import annotations

import pytest
import redis
from remote_helpers import RedisServers
from vllm.v1.kv_offload.base import OffloadKey, ReqContext, make_offload_key

from integrations.vllm_suite.engine_harness import (
    BLOCK_SIZE,
    kv_transfer_config,
    make_request,
    make_scheduler,
    offload_keys,
)
from integrations.vllm_suite.test_vllm_engine import (  # noqa: F401 (a fixture)
    PROMPT,
    make_engine,
    redis_tier,
    scheduled_tokens,
    shut_engines_down,
    store_prompt,
    the_tier,
)
from kvtier.config import EVICTION_POLICIES
from kvtier.integrations.vllm.chunk_policy import vllm_policy_name
from kvtier.integrations.vllm.keys import fold_key
from kvtier.integrations.vllm.policy import KvtierCachePolicy


def test_a_promotion_past_a_corrupt_chunk_brings_nothing_the_request_cannot_use(
        redis_servers: RedisServers) -> None:
    """Engine 1 stored blocks 0-3; block 1's value is corrupt in Redis. Engine 2's request
    B finds all 4 in Redis and promotes them in one job::

        block   0      1         2      3      4
        Redis   ok     corrupt   ok     ok     (new)
        B       load   compute   compute        compute

    Before, blocks 2 and 3 were read and copied into engine 2's CPU tier too, and reported
    arrived: the tier counted 3 pages loaded (and vLLM 3 chunks promoted) for a request
    that could use 1, and the two held CPU chunks (evicting others) until B computed
    them anyway. Now the job reports block 0 only: 1 page loaded, and B computes the same
    64 tokens."""
    tier = redis_tier(redis_servers.url, max_lookup_wait_s=5.0)
    first, _ = store_prompt(tier)
    request = make_request("B", PROMPT + list(range(5000, 5000 + BLOCK_SIZE)))
    keys = offload_keys(request)
    client = redis.Redis.from_url(redis_servers.url)
    try:
        redis_key = the_tier(first).namespace.key(fold_key(keys[1]))
        value = bytearray(client.get(redis_key))  # type: ignore[arg-type]
        value[-1] ^= 0xFF
        client.set(redis_key, bytes(value))
    finally:
        client.close()
    second = make_engine(tier)
    second.scheduler.add_request(request)
    second.run()
    assert scheduled_tokens(second, "B") == [64]  # block 0 loaded: 16 of 80 tokens
    stats = the_tier(second).stats
    assert (stats.num_load_jobs, stats.num_failed_load_jobs, stats.num_loaded_pages) == (1, 1, 1)


def key_list(*ints: int) -> list[OffloadKey]:
    return [make_offload_key(i.to_bytes(32, "big"), 0) for i in ints]


@pytest.mark.parametrize("policy", ["lru", *(vllm_policy_name(p) for p in EVICTION_POLICIES)])
def test_chunks_a_request_is_loading_outlive_other_requests_stores_and_its_own_finish(
        policy: str) -> None:
    """The lookup -> load window in the manager the connector drives (vLLM's tiering
    manager over a 4-chunk CPU tier, no secondary tier). A's lookups HIT chunks 1-2 and
    its load pins them; C, which read them before, finishes; B's and D's stores need room;
    A finishes (aborted) before its load reports::

        after           CPU tier (pinned in [])        evicted
        R stores        1 2 3 4                        -
        A prepare_load  [1 2] 3 4                      -     (then 3 4 touched: 1 2 oldest)
        B stores 5 6    [1 2] 5 6                      3 4
        A finishes      [1 2] 5 6                      -
        D stores 7 8    [1 2] 7 8                      5 6   (1 2 still loading)
        A's load done   1 2 7 8                        -
        E stores 9      one of 1 2 7 8 out             1 victim

    Pinned: every policy evicts exactly the unpinned chunks vLLM's lru evicts, never a
    page A's load reads, and the policy's books recount after every call (with the
    policy's pin dropped, mark_non_evictable a no-op, 4 of the 6 kvtier policies fail)."""
    scheduler = make_scheduler(kv_transfer_config(4, eviction_policy=policy))
    try:
        manager = scheduler.connector.connector_scheduler.manager
        cache_policy = manager.primary_tier._policy
        assert isinstance(cache_policy, KvtierCachePolicy) == (policy != "lru")

        def check() -> None:
            if isinstance(cache_policy, KvtierCachePolicy):
                cache_policy.chunks.check_invariants()

        r, a, b, c, d, e = (ReqContext(req_id=n) for n in "RABCDE")
        for ctx in (r, a, b, c, d, e):
            manager.on_new_request(ctx)
        assert manager.prepare_store(key_list(1, 2, 3, 4), r).evicted_keys == []
        manager.complete_store(key_list(1, 2, 3, 4), r)
        manager.on_request_finished(r)
        manager.prepare_load(key_list(1, 2), c)  # C read 1-2 before A
        manager.complete_load(key_list(1, 2), c)
        check()
        assert [manager.lookup(k, a).name for k in key_list(1, 2)] == ["HIT", "HIT"]
        spec = manager.prepare_load(key_list(1, 2), a)
        manager.touch(key_list(3, 4), e)  # 1-2 now the oldest: a policy's first victims
        check()
        out = manager.prepare_store(key_list(5, 6), b)
        assert sorted(out.evicted_keys) == key_list(3, 4)
        assert set(out.store_spec.chunk_ids.tolist()).isdisjoint(spec.chunk_ids.tolist())
        manager.on_request_finished(c)  # releases 1-2 while A's load holds them
        manager.on_request_finished(a)  # aborted mid-load: its load still runs
        check()
        assert manager.prepare_store(key_list(7, 8), d) is None  # 5-6 still being written
        manager.complete_store(key_list(5, 6), b)
        out = manager.prepare_store(key_list(7, 8), d)
        assert sorted(out.evicted_keys) == key_list(5, 6)
        assert set(out.store_spec.chunk_ids.tolist()).isdisjoint(spec.chunk_ids.tolist())
        assert [manager.lookup(k, e).name for k in key_list(1, 2)] == ["HIT", "HIT"]
        manager.complete_store(key_list(7, 8), d)
        manager.complete_load(key_list(1, 2), a)
        check()
        out = manager.prepare_store(key_list(9), e)
        assert len(out.evicted_keys) == 1 and out.evicted_keys[0] in key_list(1, 2, 7, 8)
        check()
    finally:
        scheduler.shutdown()
