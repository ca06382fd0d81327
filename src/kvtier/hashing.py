"""Chained 128-bit block hashes.

A block's hash covers its parent's hash, its tokens and its extra keys, so equal hashes mean
an equal prefix up to and including the block::

    root seed = H(namespace, lora_id, salt)      salt enters the first block only
    hash[0]   = H(seed     || lora || tokens[0:B]  || extras[0])
    hash[i]   = H(hash[i-1] || lora || tokens[iB:(i+1)B] || extras[i])

Hashes are computed only where a feature needs them (events, the remote tier), lazily and
once per block; matching compares tokens directly and never hashes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence

import xxhash

HashFn = Callable[[bytes], int]

_NAMESPACE = b"kvtier/v1"


def _xxh3_128(data: bytes) -> int:
    return int(xxhash.xxh3_128_intdigest(data))


def _sha256_128(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:16], "big")


_HASH_FNS: dict[str, HashFn] = {"xxh3_128": _xxh3_128, "sha256": _sha256_128}


def get_hash_fn(algo: str) -> HashFn:
    """The 128-bit hash function named ``algo`` (``xxh3_128`` or ``sha256``)."""
    try:
        return _HASH_FNS[algo]
    except KeyError:
        raise ValueError(f"hash_algo must be one of {sorted(_HASH_FNS)}, got {algo!r}") from None


def encode_key(value: object) -> bytes:
    """Canonical bytes of an extra key (salt, LoRA id, multimodal hash); ``None`` is empty."""
    if value is None:
        return b""
    if isinstance(value, bytes):
        return b"b" + value
    if isinstance(value, str):
        return b"s" + value.encode()
    if isinstance(value, int):
        return b"i" + str(value).encode()
    if isinstance(value, tuple):
        return b"t(" + b",".join(encode_key(v) for v in value) + b")"
    raise TypeError(f"extra key must be bytes, str, int or a tuple of them, got {value!r}")


def root_hash(hash_fn: HashFn, lora_id: object, salt: object) -> int:
    """The seed that a tree root contributes as the 'parent hash' of its first blocks."""
    return hash_fn(_NAMESPACE + b"|" + encode_key(lora_id) + b"|" + encode_key(salt))


def chain_hashes(
    hash_fn: HashFn,
    parent_hash: int,
    tokens: Sequence[int],
    tokens_per_block: int,
    lora_id: object,
    extras: Sequence[object] | None = None,
) -> list[int]:
    """Hashes of the full blocks of ``tokens``, chained on ``parent_hash``."""
    data = array("q", tokens).tobytes()
    stride = 8 * tokens_per_block
    lora = encode_key(lora_id)
    hashes: list[int] = []
    prev = parent_hash
    for i in range(len(tokens) // tokens_per_block):
        extra = encode_key(extras[i]) if extras is not None else b""
        prev = hash_fn(
            prev.to_bytes(16, "big") + lora + data[i * stride : (i + 1) * stride] + extra
        )
        hashes.append(prev)
    return hashes
