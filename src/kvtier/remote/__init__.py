"""The shared remote tier: block payload codec, store contract, Redis/Valkey client.

redis-py is needed only by :class:`RedisRemoteStore` (extra ``redis``) and imported lazily.
"""

from __future__ import annotations

from kvtier.remote.codec import (
    BlockHeader,
    PayloadError,
    RemoteNamespace,
    block_key,
    decode_block,
    encode_block,
    namespace_fingerprint,
)
from kvtier.remote.redis_store import RedisRemoteStore
from kvtier.remote.store import (
    BlockStoreBase,
    FaultyRemoteStore,
    MemoryRemoteStore,
    RemoteStats,
    RemoteStore,
)

__all__ = [
    "BlockHeader",
    "BlockStoreBase",
    "FaultyRemoteStore",
    "MemoryRemoteStore",
    "PayloadError",
    "RedisRemoteStore",
    "RemoteNamespace",
    "RemoteStats",
    "RemoteStore",
    "block_key",
    "decode_block",
    "encode_block",
    "namespace_fingerprint",
]
