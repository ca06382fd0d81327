"""Red team 29g: the hits kvtier reports to vLLM 0.33.0 are the hits vLLM gets, through vLLM's
real Scheduler, OffloadingConnector and TieringOffloadingManager with kvtier's Redis tier
and CPU-tier policy, over a real redis-server. Each test fails on the code before its fix,
or pins what held."""

from __future__ import annotations

import redis
from remote_helpers import RedisServers

from integrations.vllm_suite.engine_harness import BLOCK_SIZE, make_request, offload_keys
from integrations.vllm_suite.test_vllm_engine import (  # noqa: F401 (a fixture)
    PROMPT,
    make_engine,
    redis_tier,
    scheduled_tokens,
    shut_engines_down,
    store_prompt,
    the_tier,
)
from kvtier.integrations.vllm.keys import fold_key


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
