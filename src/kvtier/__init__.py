"""kvtier: a tiered KV-cache block manager with exact two-phase batch admission."""

from kvtier.admission import Admission, PrefixMatch
from kvtier.config import CacheConfig
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, BlockTierChanged, Event
from kvtier.eviction import EvictionPolicy
from kvtier.journal import CachedBlock
from kvtier.manager import KVCacheManager
from kvtier.metrics import CacheStats, TierStats
from kvtier.retention import Retention, RetentionRange
from kvtier.scheduler import ContextChunk, Request, ScheduledStep, Scheduler, SchedulerConfig
from kvtier.sequence import MultimodalItem, SequenceSpec, TokenIds
from kvtier.tier import Tier
from kvtier.transfer import (
    OpKind,
    RecordingTransferEngine,
    TransferEngine,
    TransferError,
    TransferOp,
    TransferPlan,
)

__version__ = "0.1.0"

__all__ = [
    "Admission",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "BlockTierChanged",
    "CacheConfig",
    "CacheStats",
    "CachedBlock",
    "ContextChunk",
    "Event",
    "EvictionPolicy",
    "KVCacheManager",
    "MultimodalItem",
    "OpKind",
    "PrefixMatch",
    "RecordingTransferEngine",
    "Request",
    "Retention",
    "RetentionRange",
    "ScheduledStep",
    "Scheduler",
    "SchedulerConfig",
    "SequenceSpec",
    "Tier",
    "TierStats",
    "TokenIds",
    "TransferEngine",
    "TransferError",
    "TransferOp",
    "TransferPlan",
    "__version__",
]
