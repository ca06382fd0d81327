"""kvtier's policies inside vLLM's own CPUOffloadingManager, resolved the way vLLM resolves an
out-of-tree policy (name + cache_policy_module_path), held to the manager's contract."""

from __future__ import annotations

import pytest
from vllm.v1.kv_offload.base import LookupResult, ReqContext, make_offload_key
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager
from vllm.v1.kv_offload.cpu.policies.factory import CachePolicyFactory

from kvtier.config import EVICTION_POLICIES
from kvtier.integrations.vllm.chunk_policy import vllm_policy_name
from kvtier.integrations.vllm.policy import KvtierCachePolicy, policy_class

MISS, HIT, PENDING = LookupResult.MISS, LookupResult.HIT, LookupResult.HIT_PENDING
MODULE = "kvtier.integrations.vllm"


def key(i: int) -> bytes:
    return bytes(make_offload_key(i.to_bytes(32, "big"), 0))


def keys(*ints: int) -> list[bytes]:
    return [key(i) for i in ints]


def make_manager(policy: str, num_chunks: int = 4) -> CPUOffloadingManager:
    return CPUOffloadingManager(num_chunks=num_chunks, cache_policy=policy,
                                cache_policy_module_path=MODULE, enable_events=True)


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_factory_resolves_every_kvtier_policy_by_name(policy: str) -> None:
    """vLLM's CachePolicyFactory finds each kvtier policy from its name and module path."""
    name = vllm_policy_name(policy)
    cls = CachePolicyFactory.get_cache_policy_cls(name, MODULE)
    assert issubclass(cls, KvtierCachePolicy) and cls is policy_class(name)
    assert cls(cache_capacity=4).chunks.policy.name == policy


def test_unknown_name_is_refused() -> None:
    """A name that is no kvtier policy is an AttributeError vLLM reports at start-up."""
    with pytest.raises(AttributeError):
        CachePolicyFactory.get_cache_policy_cls("fifo", MODULE)


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_manager_contract_with_kvtier_policy(policy: str) -> None:
    """The checks vLLM's CPU tier needs of a policy: MISS -> HIT_PENDING -> HIT, pins are
    never evicted (a store that would need them is refused), a failed store is forgotten,
    an offer never evicts its own keys, reset drops everything."""
    mgr = make_manager(vllm_policy_name(policy))
    assert isinstance(mgr._policy, KvtierCachePolicy)  # not vLLM's own lru / arc
    ctx = ReqContext(req_id="r1")
    mgr.on_new_request(ctx)
    assert mgr.lookup(key(1), ctx) is MISS
    out = mgr.prepare_store(keys(1, 2, 3, 4), ctx)
    assert out is not None and out.keys_to_store == keys(1, 2, 3, 4) and not out.evicted_keys
    assert mgr.lookup(key(1), ctx) is PENDING
    mgr.complete_store(keys(1, 2, 3, 4), ctx)
    assert all(mgr.lookup(k, ctx) is HIT for k in keys(1, 2, 3, 4))

    spec = mgr.prepare_load(keys(1, 2, 3), ctx)  # pins 1..3; only 4 is evictable
    assert len(spec.chunk_ids) == 3
    assert mgr.prepare_store(keys(5, 6), ctx) is None
    out = mgr.prepare_store(keys(5), ctx)
    assert out is not None and out.evicted_keys == keys(4)
    assert mgr.lookup(key(4), ctx) is MISS
    mgr.complete_store(keys(5), ctx, success=False)
    assert mgr.lookup(key(5), ctx) is MISS
    mgr.complete_load(keys(1, 2, 3), ctx)

    mgr.touch(keys(1), ctx)
    out = mgr.prepare_store(keys(2, 7, 8), ctx)
    assert out is not None and key(2) not in out.evicted_keys and out.keys_to_store == keys(7, 8)
    mgr.complete_store(keys(7, 8), ctx)
    mgr.on_request_finished(ctx)
    assert sum(len(e.keys) for e in mgr.take_events() if e.removed) >= 2
    mgr.reset_cache()
    assert all(mgr.lookup(k, ctx) is MISS for k in keys(1, 2, 3, 7, 8))


def test_priority_from_kv_transfer_params_outlives_default_chunks() -> None:
    """A request's kvtier_priority (kv_transfer_params) keeps its chunks past older and
    newer default-priority ones under priority-lru; a bad value is ignored, not raised."""
    mgr = make_manager("kvtier-priority-lru", num_chunks=3)
    vip = ReqContext(req_id="vip", kv_transfer_params={"kvtier_priority": 90})
    bad = ReqContext(req_id="bad", kv_transfer_params={"kvtier_priority": "high"})
    for ctx, k in ((vip, 1), (bad, 2)):
        mgr.on_new_request(ctx)
        assert mgr.prepare_store(keys(k), ctx) is not None
        mgr.complete_store(keys(k), ctx)
        mgr.on_request_finished(ctx)
    plain = ReqContext(req_id="plain")
    mgr.on_new_request(plain)
    assert mgr.prepare_store(keys(3), plain) is not None
    mgr.complete_store(keys(3), plain)
    out = mgr.prepare_store(keys(4, 5), plain)  # evicts 2 of 3: the default ones go
    assert out is not None and sorted(out.evicted_keys) == keys(2, 3)
    assert mgr.lookup(key(1), plain) is HIT


def test_bench_vllm_tier_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/bench_vllm_tier.py --smoke runs end to end and ends with its JSON line:
    both policies load from the CPU tier, engine 2 loads every loadable token from Redis."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    bench = __import__("bench_vllm_tier")
    assert bench.main(["--smoke"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["policy"] for r in result["hit_rate"]] == ["lru", "kvtier-predict"]
    assert all(0 < r["hit_rate"] < 1 for r in result["hit_rate"])
    assert result["redis_loaded_tokens"] == result["redis_expected_tokens"] > 0
