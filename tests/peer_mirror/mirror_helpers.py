"""Tiny factories shared by the peer-mirror suites (vLLM, SGLang, TensorRT-LLM).

Every suite runs kvtier with the peers' eviction order (``priority-lru``: priority first,
then least recently released, a run's tail before its head) unless a test says otherwise,
so that a peer's expected eviction order carries over."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kvtier import Admission, CacheConfig, KVCacheManager, SequenceSpec


def make_manager(tokens_per_block: int = 4, num_gpu_blocks: int = 8,
                 clock: Callable[[], float] | None = None, **kw: Any) -> KVCacheManager:
    """A manager with the peers' eviction order and no partial reuse unless told otherwise
    (and the caller's clock, if given)."""
    # Any: the options are CacheConfig's own fields, which it checks itself.
    cfg: dict[str, Any] = {"enable_partial_reuse": False, "eviction_policy": "priority-lru",
                           **kw}
    config = CacheConfig(tokens_per_block=tokens_per_block, num_gpu_blocks=num_gpu_blocks,
                         **cfg)
    return KVCacheManager(config) if clock is None else KVCacheManager(config, clock=clock)


def blocks_of(*values: int, tokens_per_block: int = 4) -> list[int]:
    """A prompt of whole blocks, block ``i`` filled with ``values[i]`` (vLLM's habit)."""
    return [v for v in values for _ in range(tokens_per_block)]


def admit(mgr: KVCacheManager, rid: str, tokens: Sequence[int], **kw: Any) -> Admission:
    """Admit one request, assert it was admitted, and check the books."""
    adm = mgr.add_sequence(SequenceSpec(rid, tokens, **kw))
    assert adm.admitted, adm
    mgr.check_invariants()
    return adm


def release(mgr: KVCacheManager, *rids: str) -> None:
    """Remove the requests in order, checking the books after each."""
    for rid in rids:
        mgr.remove_sequence(rid)
        mgr.check_invariants()


def cached_slots(mgr: KVCacheManager) -> list[int]:
    """The GPU slots of the cached blocks, sorted."""
    return sorted(b.slot for b in mgr.cached_blocks() if b.tier.name == "GPU")


def hit(mgr: KVCacheManager, tokens: Sequence[int], **kw: Any) -> int:
    """The tokens ``lookup`` promises for ``tokens`` (a pure query)."""
    return mgr.lookup(tokens, **kw).num_tokens
