"""kvtier inside vLLM 0.33.0's OffloadingConnector (extra ``vllm``; docs/vllm.md).

Two plug-ins, both named in ``--kv-transfer-config`` with this module as their path:

* ``KvtierRedisTier``: kvtier's Redis / Valkey / Redis Cluster store as a secondary tier of
  ``TieringOffloadingSpec`` (``"secondary_tiers": [{"type": "KvtierRedisTier",
  "module_path": "kvtier.integrations.vllm", "url": ...}]``).
* every kvtier eviction policy (``kvtier.config.EVICTION_POLICIES``) as the CPU tier's
  ``CachePolicy``, named ``kvtier-<policy>`` (``"eviction_policy": "kvtier-predict"``,
  ``"kvtier-arc"``, ...; ``"cache_policy_module_path": "kvtier.integrations.vllm"``).

And for an engine that uses kvtier's own manager: ``events.VllmEventTranslator``, kvtier's
KV events as vLLM's ``KVEventBatch`` for vLLM's event publishers and their consumers.

vLLM is imported only when one of them is asked for, so the vLLM-free parts (``keys``,
``store_tier``, ``chunk_policy``) import without it.
"""

from __future__ import annotations

from typing import Any

from kvtier.config import EVICTION_POLICIES
from kvtier.integrations.vllm.chunk_policy import VLLM_PREFIX, kvtier_policy_name, vllm_policy_name
from kvtier.reprs import shown

__all__ = ["KvtierCachePolicy", "KvtierRedisTier", "policy_class"]


def __getattr__(name: str) -> Any:
    # NOTE: vLLM resolves plug-ins with getattr(module, name): a policy's name (with its
    # dash) is an attribute here only through this hook.
    if name == "KvtierRedisTier":
        from kvtier.integrations.vllm.tier import KvtierRedisTier

        return KvtierRedisTier
    if name in ("KvtierCachePolicy", "policy_class"):
        from kvtier.integrations.vllm import policy

        return getattr(policy, name)
    if kvtier_policy_name(name) is not None:
        from kvtier.integrations.vllm.policy import policy_class

        return policy_class(name)
    if name.startswith(VLLM_PREFIX):
        # NOTE: a misspelt eviction_policy ("kvtier-lfu") reached vLLM's operator as "no
        # attribute 'kvtier-lfu'", naming none of the policies there are.
        known = sorted(vllm_policy_name(p) for p in EVICTION_POLICIES)
        raise AttributeError(f"module {shown(__name__)} has no attribute {shown(name)}: "
                             f"eviction_policy must be one of {known} for kvtier")
    raise AttributeError(f"module {shown(__name__)} has no attribute {shown(name)}")
