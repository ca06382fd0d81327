"""Red team, fifteenth pass: vLLM's CPUOffloadingManager called out of order (stores completed
that were never prepared, lookups and loads after the request finished, loads of evicted
keys) with kvtier's policies. What held: every answer is the one vLLM's own lru policy
gives (evicted keys compared as sets: their order is the policy's), the same calls vLLM's
manager refuses are refused (its own assertions), and the policy's books stay consistent."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from vllm.v1.kv_offload.base import ReqContext, make_offload_key
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

from kvtier.config import EVICTION_POLICIES
from kvtier.integrations.vllm.chunk_policy import vllm_policy_name
from kvtier.integrations.vllm.policy import KvtierCachePolicy

MODULE = "kvtier.integrations.vllm"


def keys(*ints: int) -> list[bytes]:
    return [bytes(make_offload_key(i.to_bytes(32, "big"), 0)) for i in ints]


def script(mgr: CPUOffloadingManager) -> list[str]:
    """The out-of-order calls, each answer (or the exception's type) as text."""
    r1, r2 = ReqContext(req_id="r1"), ReqContext(req_id="r2")
    calls: list[Callable[[], object]] = [
        lambda: mgr.on_new_request(r1),
        lambda: mgr.complete_store(keys(1, 2), r1),  # never prepared
        lambda: mgr.complete_store(keys(1, 2), r1, success=False),
        lambda: mgr.prepare_store(keys(1, 2, 3, 4), r1).keys_to_store,
        lambda: mgr.complete_store(keys(1, 2, 3, 4), r1),
        lambda: mgr.complete_store(keys(1, 2, 3, 4), r1),  # twice
        lambda: mgr.complete_load(keys(1), r1),  # never prepared: vLLM asserts
        lambda: mgr.on_request_finished(r1),
        lambda: [mgr.lookup(k, r1) for k in keys(1, 2, 9)],  # after finish
        lambda: mgr.touch(keys(1, 9), r1),
        lambda: len(mgr.prepare_load(keys(1), r1).chunk_ids),
        lambda: mgr.complete_load(keys(1), r1),
        lambda: mgr.on_new_request(r2),
        lambda: sorted(mgr.prepare_store(keys(5, 6, 7, 8), r2).evicted_keys),
        lambda: mgr.prepare_load(keys(1), r2),  # evicted: vLLM asserts
        lambda: mgr.on_request_finished(r1),  # twice
        lambda: mgr.complete_store(keys(5, 6, 7, 8), r2),
        lambda: [mgr.lookup(k, r2) for k in keys(1, 2, 3, 4, 5, 6, 7, 8)],
    ]
    out = []
    for call in calls:
        try:
            out.append(repr(call()))
        except Exception as e:  # the answer is the exception's type
            out.append(type(e).__name__)
    return out


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_out_of_order_calls_answer_as_vllms_lru(policy: str) -> None:
    ours = CPUOffloadingManager(num_chunks=4, cache_policy=vllm_policy_name(policy),
                                cache_policy_module_path=MODULE)
    theirs = CPUOffloadingManager(num_chunks=4, cache_policy="lru")
    answers = script(ours)
    assert answers == script(theirs)
    assert answers.count("AssertionError") == 2
    assert isinstance(ours._policy, KvtierCachePolicy)
    ours._policy.chunks.check_invariants()
    assert len(ours._policy.chunks) == 4
