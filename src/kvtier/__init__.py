"""kvtier: a tiered KV-cache block manager with exact two-phase batch admission.

The public names below are imported on first use (PEP 562), so ``import kvtier`` and the
``kvtier`` command's first instant import nothing heavy: the command's launcher
(:mod:`kvtier.launcher`) can then import the CLI inside its own Ctrl-C handling.
"""

from __future__ import annotations

import importlib

# NOTE: not ``typing.TYPE_CHECKING``: importing typing is most of a bare ``import kvtier``'s
# time; type checkers treat any name ``TYPE_CHECKING`` as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from kvtier.admission import Admission, PrefixMatch
    from kvtier.config import CacheConfig
    from kvtier.events import (
        AllBlocksCleared,
        BlockRemoved,
        BlockStored,
        BlockTierChanged,
        Event,
    )
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

# Each public name and the module that defines it (what ``from kvtier import X`` imports).
_HOMES = {
    "Admission": "admission", "PrefixMatch": "admission",
    "CacheConfig": "config",
    "AllBlocksCleared": "events", "BlockRemoved": "events", "BlockStored": "events",
    "BlockTierChanged": "events", "Event": "events",
    "EvictionPolicy": "eviction",
    "CachedBlock": "journal",
    "KVCacheManager": "manager",
    "CacheStats": "metrics", "TierStats": "metrics",
    "Retention": "retention", "RetentionRange": "retention",
    "ContextChunk": "scheduler", "Request": "scheduler", "ScheduledStep": "scheduler",
    "Scheduler": "scheduler", "SchedulerConfig": "scheduler",
    "MultimodalItem": "sequence", "SequenceSpec": "sequence", "TokenIds": "sequence",
    "Tier": "tier",
    "OpKind": "transfer", "RecordingTransferEngine": "transfer", "TransferEngine": "transfer",
    "TransferError": "transfer", "TransferOp": "transfer", "TransferPlan": "transfer",
}

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


# NOTE: hidden from type checkers, which see the imports above instead: a module
# ``__getattr__`` would make them accept any name (``kvtier.KVCachManager``) as Any.
if not TYPE_CHECKING:
    def __getattr__(name: str) -> Any:
        home = _HOMES.get(name)
        if home is not None:
            value = getattr(importlib.import_module(f"kvtier.{home}"), name)
        elif name.isidentifier() and not name.startswith("_"):
            # A submodule (``kvtier.events``): the eager imports made each an attribute of
            # the package, and code reads them so after a bare ``import kvtier``.
            try:
                value = importlib.import_module(f"kvtier.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"kvtier.{name}":
                    raise  # a module it imports is missing: not this name's fault
                raise AttributeError(f"module 'kvtier' has no attribute {name!r}") from None
        else:
            raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
        globals()[name] = value  # the next lookup is a plain module attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_HOMES})
