"""Frozen, validated configuration of the block manager."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.counts import as_integer, check_count
from kvtier.reprs import shown

HASH_ALGOS = ("xxh3_128", "sha256")
EVICTION_POLICIES = (
    "priority-lru", "lru", "arc", "s3fifo", "kvtier-predict", "kvtier-predict-cost")
"""The eviction policies by name (``kvtier.policies``)."""

DEFAULT_PRIORITY = 35
MIN_PRIORITY = 0
MAX_PRIORITY = 100


def check_priority(field: str, value: object) -> int:
    """``value`` as a plain int; ValueError naming ``field`` unless it is an integer
    (``kvtier.counts``) in 0..100."""
    n = as_integer(value)
    if n is None or not MIN_PRIORITY <= n <= MAX_PRIORITY:
        raise ValueError(
            f"{field} must be an integer in {MIN_PRIORITY}..{MAX_PRIORITY}, got {shown(value)}"
        )
    return n


MAX_BLOCKS = 2**32
"""The most slots one tier may have (block ids fit in 32 bits)."""

MAX_TOKENS_PER_BLOCK = 2**16


def check_tokens_per_block(tpb: object) -> int:
    """``tpb`` as a plain int; ValueError unless it is a block size a cache takes: a power
    of two in 1..65536 (an integer, ``kvtier.counts``: never a bool). Pure."""
    n = as_integer(tpb)
    if n is None or not 1 <= n <= MAX_TOKENS_PER_BLOCK or n & (n - 1):
        # NOTE: shown, whatever the type: str() of a NumPy int64(4) read 'got 4'.
        text = shown(tpb)
        text = text if len(text) <= 40 else text[:37] + "..."
        raise ValueError(f"tokens_per_block must be a power of two in 1..65536, got {text}")
    return n


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Sizes and policies of a :class:`~kvtier.manager.KVCacheManager`.

    ``num_gpu_blocks`` and ``num_host_blocks`` are slot counts of the two tiers; the host
    tier may be empty. A GPU block evicted while its priority is at least
    ``offload_min_priority`` is offloaded to the host tier; below it, it is dropped.
    ``eviction_policy`` names one of ``EVICTION_POLICIES``; the default, kvtier's own
    ``kvtier-predict-cost``, was picked by measurement (``docs/policy-lab.md``);
    ``priority-lru`` is the peers' order.
    """

    tokens_per_block: int = 32
    num_gpu_blocks: int = 1024
    num_host_blocks: int = 0
    enable_block_reuse: bool = True
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    offload_min_priority: int = 30
    default_priority: int = DEFAULT_PRIORITY
    hash_algo: str = "xxh3_128"
    eviction_policy: str = "kvtier-predict-cost"
    enable_events: bool = False
    max_events: int = 1_000_000

    def __post_init__(self) -> None:
        # Each count kept as the plain int it is (a NumPy integer given is read as one).
        set_ = object.__setattr__
        set_(self, "tokens_per_block", check_tokens_per_block(self.tokens_per_block))
        set_(self, "num_gpu_blocks", check_count("num_gpu_blocks", self.num_gpu_blocks, 1,
                                                 MAX_BLOCKS))
        set_(self, "num_host_blocks", check_count("num_host_blocks", self.num_host_blocks, 0,
                                                  MAX_BLOCKS))
        set_(self, "max_events", check_count("max_events", self.max_events, 1, 2**40))
        set_(self, "offload_min_priority",
             check_priority("offload_min_priority", self.offload_min_priority))
        set_(self, "default_priority", check_priority("default_priority", self.default_priority))
        if self.hash_algo not in HASH_ALGOS:
            raise ValueError(f"hash_algo must be one of {HASH_ALGOS}, got {shown(self.hash_algo)}")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction_policy must be one of {sorted(EVICTION_POLICIES)}, "
                             f"got {shown(self.eviction_policy)}")
        for name in ("enable_block_reuse", "enable_partial_reuse", "copy_on_partial_reuse",
                     "enable_events"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be a bool, got {shown(getattr(self, name))}")
