"""vLLM's offload keys in kvtier's remote store: folding and namespacing. Pure; no vLLM import.

vLLM 0.33.0 names an offloaded chunk by an ``OffloadKey``: the hash of the chunk's last
block (32 bytes with sha256, 16 with xxhash; chained over the whole prefix, so it names the
prefix) and a 4-byte KV-cache group index::

    OffloadKey   = block_hash (32 B; 16 B with xxhash) | group_idx (4 B, big-endian)
    fold_key     = blake2b-128(OffloadKey)  ->  kvtier block hash (128-bit int)
    Redis key    = kvtier:{namespace fingerprint}:{folded hash as 32 hex digits}

The chunk's bytes are one page of vLLM's CPU tier (``primary_kv_view``: every worker's share
of the chunk, side by side), so the namespace fingerprint covers what makes two pages with
one key differ: the model, the KV dtype, the page size, the groups' shapes, and the
parallel layout (tensor / pipeline / context parallel sizes and the scheduler's rank). Two
engines differing in any of them never read each other's bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from kvtier.remote.codec import RemoteNamespace
from kvtier.reprs import shown
from kvtier.storage import KVLayout

# A 32-byte (sha256, sha256_cbor) or 16-byte (xxhash, xxhash_cbor) block hash and the group.
OFFLOAD_KEY_SIZES = (20, 36)
# The codec describes a payload as layers x heads x head_dim x tokens of a dtype; a vLLM page
# is opaque bytes, so it is described as one float16 "token" of page_bytes / 4 lanes (K and V
# of 2 bytes each per lane). The real identity lives in the namespace's model id.
_PAGE_DTYPE = "float16"
_BYTES_PER_LANE = 4


def fold_key(key: bytes) -> int:
    """The 128-bit kvtier block hash of a vLLM ``OffloadKey``. Pure.

    blake2b, not a truncation: a truncated sha256 chain hash would do, but vLLM may hash
    blocks with xxhash, whose low bits are not meant to stand alone."""
    # NOTE: 36 bytes only were taken before: an engine hashing with xxhash (16-byte hashes)
    # raised ValueError into vLLM's step at its first lookup.
    if not isinstance(key, bytes) or len(key) not in OFFLOAD_KEY_SIZES:
        raise ValueError(f"an OffloadKey is 20 or 36 bytes (a 16-byte xxhash or 32-byte "
                         f"sha256 block hash, then a 4-byte group index), got "
                         f"{shown(key):.80}")
    return int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "big")


def key_group(key: bytes) -> int:
    """The KV-cache group index of a vLLM ``OffloadKey`` (its last 4 bytes, big-endian, as
    vLLM's ``get_offload_group_idx``); the key is one ``fold_key`` takes. Pure."""
    return int.from_bytes(key[-4:], "big")


@dataclass(frozen=True, slots=True)
class EngineLayout:
    """What makes one vLLM engine's offloaded pages readable by another: the namespace's
    inputs, read from vLLM's ``OffloadingConfig`` by the tier (``from_vllm_config``)."""

    model: str
    kv_dtype: str
    page_bytes: int
    tokens_per_hash: int
    blocks_per_chunk: int
    groups: tuple[tuple[int, int], ...]  # (tokens_per_block, number of layers) per group
    tp_size: int
    pp_size: int
    pcp_size: int
    dcp_size: int
    rank: int
    replicated_layout: bool = False
    kv_cache_layout: str | None = None
    canonical_layout: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty str, got {shown(self.model)}")
        if not isinstance(self.kv_dtype, str) or not self.kv_dtype:
            raise ValueError(f"kv_dtype must be a non-empty str, got {shown(self.kv_dtype)}")
        for name in ("page_bytes", "tokens_per_hash", "blocks_per_chunk", "tp_size", "pp_size",
                     "pcp_size", "dcp_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {shown(value)}")
        if type(self.rank) is not int or self.rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {shown(self.rank)}")
        groups = self.groups
        if (not isinstance(groups, tuple) or not groups
                or not all(isinstance(g, tuple) and len(g) == 2 and type(g[0]) is int
                           and g[0] >= 1 and type(g[1]) is int and g[1] >= 0
                           for g in groups)):
            # NOTE: each group is part of the namespace: garbage here named a namespace
            # no engine of the same layout would name, or failed in json.dumps later.
            raise ValueError(f"groups must be a non-empty tuple of (tokens_per_block >= 1, "
                             f"num_layers >= 0) pairs of ints, got {shown(groups):.80}")
        for name in ("replicated_layout", "canonical_layout"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be a bool, got {shown(getattr(self, name))}")
        if self.kv_cache_layout is not None and not isinstance(self.kv_cache_layout, str):
            raise ValueError(f"kv_cache_layout must be a str or None, got "
                             f"{shown(self.kv_cache_layout):.80}")
        if self.page_bytes % _BYTES_PER_LANE:
            raise ValueError(f"page_bytes must be a multiple of {_BYTES_PER_LANE} (vLLM aligns "
                             f"its CPU pages), got {self.page_bytes}")

    def model_id(self) -> str:
        """Every field as canonical JSON: the namespace's model id. Pure."""
        fields = {
            "engine": "vllm", "model": self.model, "kv_dtype": self.kv_dtype,
            "page_bytes": self.page_bytes, "tokens_per_hash": self.tokens_per_hash,
            "blocks_per_chunk": self.blocks_per_chunk, "groups": [list(g) for g in self.groups],
            "tp": self.tp_size, "pp": self.pp_size, "pcp": self.pcp_size, "dcp": self.dcp_size,
            "rank": self.rank, "replicated": self.replicated_layout,
            "kv_cache_layout": self.kv_cache_layout, "canonical": self.canonical_layout,
        }
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    def namespace(self, tenant: str | None = None) -> RemoteNamespace:
        """The remote namespace of this engine's pages; ``tenant`` scopes it further (two
        tenants never share blocks). Pure. ValueError naming ``tenant`` unless a non-empty
        str or None.

        NOTE: "" was taken: an empty namespace part, a tenant no one meant (a template's
        unset variable), scoped apart from the engine's unscoped blocks without a word."""
        if tenant is not None and not isinstance(tenant, str):
            raise ValueError(f"tenant must be a str or None, got {shown(tenant):.80}")
        if tenant == "":
            raise ValueError("tenant must be a non-empty str (or None for no tenant), got ''")
        layout = KVLayout(num_layers=1, num_kv_heads=1,
                          head_dim=self.page_bytes // _BYTES_PER_LANE, tokens_per_block=1,
                          dtype=_PAGE_DTYPE)
        assert layout.bytes_per_block == self.page_bytes
        return RemoteNamespace(self.model_id(), layout, tenant)
