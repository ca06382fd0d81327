"""kvtier's eviction policies as vLLM 0.33.0 ``CachePolicy`` classes for its CPU tier.

Selected with ``"eviction_policy": "kvtier-<kvtier policy name>"`` (``kvtier-lru``,
``kvtier-arc``, ``kvtier-s3fifo``, ``kvtier-priority-lru``; names that already start with
``kvtier-`` stay as they are: ``kvtier-predict``) and ``"cache_policy_module_path":
"kvtier.integrations.vllm"``: vLLM imports that module and takes the attribute named by
the policy, which the module makes on demand (``policy_class``) for every name in
``kvtier.config.EVICTION_POLICIES``, so a policy added to kvtier is usable from vLLM with no
change here. (The prefix: vLLM's own ``lru`` and ``arc`` are registered names, which win
over a module path.)

A request may set its chunks' priority and retention through ``kv_transfer_params``:
``{"kvtier_priority": 0..100, "kvtier_retention_s": seconds}`` (lower priority goes
first; after the retention the default priority holds). A bad value is logged and ignored:
nothing raises into vLLM's step.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from vllm.v1.kv_offload.base import OffloadKey, ReqContext
from vllm.v1.kv_offload.cpu.policies.base import CachePolicy, ChunkStatus, order_request_keys

from kvtier.config import EVICTION_POLICIES, MAX_PRIORITY, MIN_PRIORITY
from kvtier.integrations.vllm.chunk_policy import (
    Claim,
    PolicyChunks,
    kvtier_policy_name,
    vllm_policy_name,
)
from kvtier.reprs import shown
from kvtier.sequence import short_repr

logger = logging.getLogger(__name__)

PRIORITY_PARAM = "kvtier_priority"
RETENTION_PARAM = "kvtier_retention_s"


class _RequestState:
    """Per request (in its ReqContext): its recency tick, its (priority, retention) read
    once from its kv_transfer_params, and the chunks it soft-claimed (ended at its
    finish)."""

    __slots__ = ("generation", "keys", "owner", "rank", "retention")

    def __init__(self, owner: object, generation: int, rank: int,
                 retention: tuple[int | None, float | None]) -> None:
        self.owner = owner
        self.generation = generation
        self.rank = rank
        # NOTE: read once: a bad value was logged at every chunk the request inserted.
        self.retention = retention
        self.keys: list[Claim] = []


def request_retention(req_context: ReqContext) -> tuple[int | None, float | None]:
    """The request's (priority, retention seconds) from its kv_transfer_params; None for
    what it does not set or sets wrong (logged). Pure."""
    params = req_context.kv_transfer_params
    if params is None:
        return None, None
    if not isinstance(params, Mapping):
        # NOTE: vLLM passes a request's kv_transfer_params on as they came (an offline
        # caller's extra_args may hold anything): not ours to refuse, only to ignore.
        logger.warning("request %s: kv_transfer_params must be a mapping, got %s; ignored",
                       req_context.req_id, type(params).__name__)
        return None, None
    priority = params.get(PRIORITY_PARAM)
    retention = params.get(RETENTION_PARAM)
    if priority is not None and (type(priority) is not int
                                 or not MIN_PRIORITY <= priority <= MAX_PRIORITY):
        logger.warning("request %s: %s must be an int in %d..%d, got %s; ignored",
                       req_context.req_id, PRIORITY_PARAM, MIN_PRIORITY, MAX_PRIORITY,
                       short_repr(priority))
        priority = None
    # NOTE: bounded by the largest float, not inf: float() of a larger int overflows.
    if retention is not None and (isinstance(retention, bool)
                                  or not isinstance(retention, int | float)
                                  or not 0 < retention <= sys.float_info.max):
        logger.warning("request %s: %s must be a finite number of seconds > 0, got %s; "
                       "ignored", req_context.req_id, RETENTION_PARAM, short_repr(retention))
        retention = None
    return priority, None if retention is None else float(retention)


class KvtierCachePolicy(CachePolicy):  # type: ignore[misc]
    """A vLLM CPU-tier policy running the kvtier policy ``policy_name`` (set by
    ``policy_class``); the books are ``PolicyChunks``'."""

    policy_name: ClassVar[str] = "priority-lru"

    def __init__(self, cache_capacity: int) -> None:
        super().__init__(cache_capacity)
        self.chunks: PolicyChunks[ChunkStatus] = PolicyChunks(self.policy_name, cache_capacity)

    def get(self, key: OffloadKey) -> ChunkStatus | None:
        return self.chunks.get(key)

    def _state(self, req_context: ReqContext) -> _RequestState:
        state: _RequestState | None = req_context.get_state(_RequestState)
        # NOTE: a request that outlives a reset_cache() (clear) takes a new rank: its old
        # one would rank it below every request since.
        if (state is None or state.owner is not self
                or state.generation != self.chunks.generation):
            state = _RequestState(self, self.chunks.generation, self.chunks.new_rank(),
                                  request_retention(req_context))
            req_context.set_state(state)
        return state

    def insert(self, key: OffloadKey, chunk: ChunkStatus, req_context: ReqContext) -> None:
        state = self._state(req_context)
        priority, retention_s = state.retention
        self.chunks.insert(key, chunk, evictable=chunk.ref_cnt == 0,
                           depth=req_context.get_offload_key_position(key),
                           rank=state.rank, priority=priority, retention_s=retention_s)

    def remove(self, key: OffloadKey) -> None:
        self.chunks.remove(key)

    def touch(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> None:
        self.chunks.touch(keys)

    def on_store_miss(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> None:
        self.chunks.recall(keys)

    def on_request_access(self, keys: Iterable[OffloadKey], req_context: ReqContext) -> None:
        keys = list(keys)
        state = self._state(req_context)
        positioned = [(k, p) for k in keys
                      if (p := req_context.get_offload_key_position(k)) is not None]
        self.chunks.access(positioned, state.rank)
        state.keys.extend(self.chunks.soft_claim(keys))

    def on_request_finished(self, key_groups: Sequence[Sequence[OffloadKey]],
                            insertion_only_keys: set[OffloadKey],
                            reused_keys: set[OffloadKey], req_context: ReqContext) -> None:
        state = req_context.get_state(_RequestState)
        if (state is not None and state.owner is self
                and state.generation == self.chunks.generation):
            self.chunks.unclaim(state.keys)
            state.keys = []
            priority, retention_s = state.retention
        else:
            priority, retention_s = request_retention(req_context)
        self.chunks.release(order_request_keys(key_groups, req_context), set(reused_keys),
                            priority=priority, retention_s=retention_s)

    def evict(self, n: int, protected: set[OffloadKey]
              ) -> list[tuple[OffloadKey, ChunkStatus]] | None:
        return self.chunks.evict(n, protected)

    def clear(self) -> None:
        self.chunks.clear()

    def mark_evictable(self, key: OffloadKey) -> None:
        self.chunks.mark_evictable(key)

    def mark_non_evictable(self, key: OffloadKey) -> None:
        self.chunks.mark_non_evictable(key)


@functools.cache
def policy_class(vllm_name: str) -> type[KvtierCachePolicy]:
    """The CachePolicy class vLLM's ``eviction_policy`` name ``vllm_name`` (e.g.
    ``kvtier-arc``) selects: kvtier's policy of that name (one class per name)."""
    policy = kvtier_policy_name(vllm_name)
    if policy is None:
        known = sorted(vllm_policy_name(p) for p in EVICTION_POLICIES)
        raise ValueError(f"eviction_policy must be one of {known} for kvtier, got "
                         f"{shown(vllm_name)}")
    attrs: dict[str, Any] = {"policy_name": policy, "__module__": __name__,
                             "__doc__": f"vLLM CPU-tier policy: kvtier's {shown(policy)}."}
    return type(f"KvtierCachePolicy[{vllm_name}]", (KvtierCachePolicy,), attrs)
