"""The fleet simulator's shared tier kept in a real Redis behaves like the in-memory one."""

from __future__ import annotations

import json
import uuid

import pytest
from remote_helpers import RedisServers

from kvtier.cli import main
from kvtier.config import CacheConfig
from kvtier.remote import RedisRemoteStore, RemoteNamespace
from kvtier.sim import SyntheticChat
from kvtier.sim.fleet import simulate_fleet, stand_in_namespace


def test_fleet_shared_tier_in_redis_matches_the_set(redis_servers: RedisServers) -> None:
    """Same workload, same routing: a Redis-held shared tier serves the same blocks."""
    workload = SyntheticChat(num_requests=60, seed=4)
    cache = CacheConfig(num_gpu_blocks=512, num_host_blocks=128)
    in_memory = simulate_fleet(workload, cache, 3, "round-robin", remote="write-through")
    # A namespace of this test only: another test session sharing the server (or an earlier
    # one) may have left stand-in blocks, which would be hits here.
    layout = stand_in_namespace(cache.tokens_per_block).layout
    store = RedisRemoteStore(redis_servers.url, RemoteNamespace(f"test-{uuid.uuid4().hex}",
                                                                layout))
    store.put_many({})  # connect
    in_redis = simulate_fleet(workload, cache, 3, "round-robin", remote="write-through",
                              remote_store=store)
    assert in_redis.remote == in_memory.remote
    assert in_redis.token_hit_rate == in_memory.token_hit_rate
    assert store.stats.num_puts > 0 and store.stats.num_errors == 0


def test_cli_remote_url(redis_servers: RedisServers, capsys: pytest.CaptureFixture[str]) -> None:
    """kvtier replay --remote-url keeps the shared tier in Redis; a dead URL is one sentence."""
    code = main(["replay", "--limit", "30", "--instances", "2", "--gpu-blocks", "512",
                 "--host-blocks", "64", "--remote", "write-through", "--remote-url",
                 redis_servers.url, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["remote"]["num_lookups"] == 30
    code = main(["replay", "--limit", "5", "--instances", "2", "--host-blocks", "64",
                 "--remote", "write-back",
                 "--remote-url", "redis://127.0.0.1:1/0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kvtier: error: cannot use --remote-url:")
