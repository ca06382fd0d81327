"""Tiny factories shared by the remote-tier tests."""

from __future__ import annotations

import uuid

from kvtier.remote import RemoteNamespace
from kvtier.storage import KVLayout


def make_namespace(bytes_per_token_scale: int = 1, tokens_per_block: int = 16) -> RemoteNamespace:
    """A namespace no other test shares: blocks of 2 * 2 * 2 * 64 * 2 B * tokens."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64 * bytes_per_token_scale,
                      tokens_per_block=tokens_per_block, dtype="float16")
    return RemoteNamespace(f"test-{uuid.uuid4().hex}", layout)


def make_blocks(namespace: RemoteNamespace, num_blocks: int, first_hash: int = 1,
                seed: int = 0) -> dict[int, bytes]:
    """``num_blocks`` distinct payloads keyed by hashes ``first_hash, first_hash + 1, ...``."""
    size = namespace.layout.bytes_per_block
    return {first_hash + i: (seed * 1_000_003 + first_hash + i).to_bytes(8, "big") * (size // 8)
            for i in range(num_blocks)}
