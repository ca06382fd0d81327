"""vLLM's real Scheduler + OffloadingConnector + TieringOffloadingSpec with kvtier's Redis tier
and kvtier's CPU-tier policy, configured as a user would, over real Redis servers."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from remote_helpers import PrivateRedis, RedisServers

from integrations.vllm_suite.engine_harness import (
    BLOCK_SIZE,
    Engine,
    kv_transfer_config,
    make_request,
    make_scheduler,
    offload_keys,
)
from kvtier.integrations.vllm.keys import fold_key
from kvtier.integrations.vllm.tier import KvtierRedisTier

PROMPT = list(range(1000, 1000 + 4 * BLOCK_SIZE))  # 4 full blocks


def redis_tier(url: str, **options: Any) -> dict[str, Any]:
    """The tier's JSON object, in a namespace of its own (tenant) per test."""
    return {"type": "KvtierRedisTier", "module_path": "kvtier.integrations.vllm", "url": url,
            "tenant": f"test-{uuid.uuid4().hex}", **options}


_ENGINES: list[Engine] = []


@pytest.fixture(autouse=True)
def shut_engines_down() -> Iterator[None]:
    """Every engine a test made is shut down, also when the test fails (an engine left
    running keeps its CPU tier's file in /dev/shm)."""
    yield
    while _ENGINES:
        _ENGINES.pop().shutdown()


def make_engine(tier: dict[str, Any], policy: str = "kvtier-predict") -> Engine:
    engine = Engine(make_scheduler(kv_transfer_config(16, eviction_policy=policy,
                                                      tiers=[tier])))
    _ENGINES.append(engine)
    return engine


def the_tier(engine: Engine) -> KvtierRedisTier:
    [tier] = engine.manager.secondary_tiers
    assert isinstance(tier, KvtierRedisTier)
    return tier


def pages_of(engine: Engine, keys: list[Any]) -> list[bytes]:
    """The CPU-tier bytes of ``keys`` (read through the manager's public load path)."""
    from vllm.v1.kv_offload.base import ReqContext

    manager = engine.manager
    ctx = ReqContext(req_id=f"inspect-{uuid.uuid4().hex}")
    manager.on_new_request(ctx)
    spec = manager.prepare_load(keys, ctx)
    size = the_tier(engine).block_size_bytes
    with the_tier(engine)._primary_kv_view.cast("B") as view:
        out = [bytes(view[c * size:(c + 1) * size]) for c in spec.chunk_ids]
    manager.complete_load(keys, ctx)
    manager.on_request_finished(ctx)
    return out


def store_prompt(tier: dict[str, Any]) -> tuple[Engine, list[bytes]]:
    """Engine 1 computes PROMPT (its CPU pages hold known bytes) and cascades it to Redis."""
    first = make_engine(tier)
    with the_tier(first)._primary_kv_view.cast("B") as view:
        view[:] = os.urandom(len(view))  # what the GPU workers would have copied in
    request = make_request("A", PROMPT)
    first.scheduler.add_request(request)
    first.run()
    stats = the_tier(first).stats
    assert (stats.num_store_jobs, stats.num_stored_pages, stats.num_failed_store_jobs) == (1, 4, 0)
    return first, pages_of(first, offload_keys(request))


def scheduled_tokens(engine: Engine, request_id: str) -> list[int]:
    return [step[request_id] for step in engine.scheduled if request_id in step]


@pytest.mark.parametrize("topology", ["standalone", "cluster"])
def test_prompt_stored_by_one_engine_is_loaded_by_another(redis_servers: RedisServers,
                                                          topology: str) -> None:
    """Engine 2 (its own GPU and CPU caches) finds engine 1's prompt in Redis: it loads the
    4 blocks, byte for byte, and computes only its 16 new tokens."""
    url = redis_servers.url if topology == "standalone" else redis_servers.cluster_url
    # NOTE: a generous lookup wait: on a loaded CI machine a probe may take longer than the
    # default, and giving up (computing instead) is right for a server, wrong for this test.
    tier = redis_tier(url, cluster=topology == "cluster", max_lookup_wait_s=5.0)
    _, stored_pages = store_prompt(tier)
    second = make_engine(tier)
    request = make_request("B", PROMPT + list(range(5000, 5000 + BLOCK_SIZE)))
    second.scheduler.add_request(request)
    second.run()
    # Prompt 80 tokens, 64 loaded from Redis: one chunk of 16 computed, then 1 decode step.
    assert scheduled_tokens(second, "B") == [16]
    stats = the_tier(second).stats
    assert (stats.num_load_jobs, stats.num_loaded_pages, stats.num_failed_load_jobs) == (1, 4, 0)
    assert stats.num_retries >= 4 and stats.num_probe_batches >= 1
    assert pages_of(second, offload_keys(request)[:4]) == stored_pages


def test_redis_down_degrades_to_recompute(redis_servers: RedisServers, tmp_path: Path) -> None:
    """Engine 2 runs while the server is dead: lookups miss, stores fail, the request
    computes its whole prompt, and nothing raises into the step."""
    server = PrivateRedis(tmp_path / "redis")
    tier = redis_tier(server.url, timeout_s=0.05, max_retries=0)
    store_prompt(tier)
    server.kill()
    second = make_engine(tier)
    second.scheduler.add_request(make_request("B", PROMPT + list(range(5000, 5016))))
    second.run()
    assert scheduled_tokens(second, "B") == [80]
    stats = the_tier(second).stats
    assert stats.num_loaded_pages == 0 and stats.num_failed_store_jobs == 1


def test_stalled_redis_never_blocks_a_step(redis_servers: RedisServers, tmp_path: Path) -> None:
    """With the server frozen (SIGSTOP) every step returns within milliseconds: the lookup
    gives up after max_lookup_wait_s and the request computes instead of waiting."""
    server = PrivateRedis(tmp_path / "redis")
    tier = redis_tier(server.url, timeout_s=1.0, max_retries=0, max_lookup_wait_s=0.02)
    store_prompt(tier)
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        second = make_engine(tier)
        second.scheduler.add_request(make_request("B", PROMPT + list(range(5000, 5016))))
        step_s = []
        for _ in range(100):
            if not second.scheduler.has_unfinished_requests():
                break
            start = time.perf_counter()
            second.step()
            step_s.append(time.perf_counter() - start)
            time.sleep(0.005)
        assert not second.scheduler.has_unfinished_requests()
        assert scheduled_tokens(second, "B") == [80]  # computed: nothing loaded
        assert max(step_s) < 0.25, max(step_s)  # a step never waited on the 1 s timeout
        assert the_tier(second).stats.num_lookups_given_up >= 1
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    second.run()  # the frozen jobs end (as failures or late successes); the engine drains
    server.kill()


def test_corrupt_value_is_recomputed(redis_servers: RedisServers) -> None:
    """A value whose bytes changed in Redis fails its checksum on load: the request
    recomputes from that block, and the next store rewrites it."""
    import redis

    tier = redis_tier(redis_servers.url, max_lookup_wait_s=5.0)
    first, _ = store_prompt(tier)
    namespace = the_tier(first).namespace
    request = make_request("B", PROMPT + list(range(5000, 5016)))
    key = namespace.key(fold_key(offload_keys(request)[2]))  # the third block
    client = redis.Redis.from_url(redis_servers.url)
    value = bytearray(client.get(key))  # type: ignore[arg-type]
    value[-1] ^= 0xFF
    client.set(key, bytes(value))
    second = make_engine(tier)
    second.scheduler.add_request(request)
    second.run()
    # Blocks 0-1 load (32 tokens); the promotion of block 2 failed, so 48 are computed.
    assert scheduled_tokens(second, "B") == [48]
    assert the_tier(second).stats.num_failed_load_jobs == 1
    assert client.get(key) != bytes(value)  # engine 2's store rewrote the bad value
    client.close()
