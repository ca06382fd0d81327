"""The shared remote tier: block payload codec, the :class:`RemoteStore` contract, its
in-memory and Redis/Valkey implementations.

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
    FaultyRemoteStore,
    InMemoryRemoteStore,
    RemoteStats,
    RemoteStore,
    RemoteStoreBase,
)

__all__ = [
    "BlockHeader",
    "FaultyRemoteStore",
    "InMemoryRemoteStore",
    "PayloadError",
    "RedisRemoteStore",
    "RemoteNamespace",
    "RemoteStats",
    "RemoteStore",
    "RemoteStoreBase",
    "block_key",
    "decode_block",
    "encode_block",
    "namespace_fingerprint",
]

