"""Chained 128-bit block hashes.

A block's hash covers its parent's hash, its tokens and its extra keys, so equal hashes mean
an equal prefix up to and including the block::

    root seed = H(namespace, lora_id, salt)      salt enters the first block only
    hash[0]   = H(seed     || lora || tokens[0:B]  || extras[0])
    hash[i]   = H(hash[i-1] || lora || tokens[iB:(i+1)B] || extras[i])

Every extra key is encoded self-delimiting (a type tag, then a length, then the bytes), so
two different keys never give the same bytes, whatever they contain. Hashes are computed
only where a feature needs them (events, the remote tier, the router), lazily and once per
block; matching compares tokens directly and never hashes.

Contract: every function here is pure; nothing here holds state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import xxhash

from kvtier.config import check_tokens_per_block
from kvtier.counts import check_count
from kvtier.reprs import shown
from kvtier.sequence import (
    as_token_sequence,
    check_key,
    check_lora_id,
    check_token,
    packed_token_ids,
)

HashFn = Callable[[bytes], int]

# NOTE: v2 since extra keys are length-prefixed: a v1 hash never equals a v2 hash of the
# same prompt, so blocks hashed by an older kvtier (e.g. in a shared store) are never reused.
_NAMESPACE = b"kvtier/v2"
_LENGTH_BYTES = 8


def _xxh3_128(data: bytes) -> int:
    return int(xxhash.xxh3_128_intdigest(data))


def _sha256_128(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:16], "big")


_HASH_FNS: dict[str, HashFn] = {"xxh3_128": _xxh3_128, "sha256": _sha256_128}


def get_hash_fn(algo: str) -> HashFn:
    """The 128-bit hash function named ``algo`` (``xxh3_128`` or ``sha256``)."""
    try:
        return _HASH_FNS[algo]
    except (KeyError, TypeError):
        raise ValueError(f"hash_algo must be one of {sorted(_HASH_FNS)}, got "
                         f"{shown(algo)}") from None


def _framed(tag: bytes, data: bytes) -> bytes:
    return tag + len(data).to_bytes(_LENGTH_BYTES, "big") + data


def encode_key(value: object) -> bytes:
    """Canonical, self-delimiting bytes of an extra key (salt, LoRA id, multimodal hash).

    Accepted: ``None``, ``bytes``, ``str``, ``int`` (never ``bool``: ``True`` is not the
    salt ``1``) and tuples of them, nested. Distinct values give distinct bytes. Pure.
    """
    if value is None:
        return b"n"
    if isinstance(value, bool):  # before int: bool is an int subclass
        raise TypeError(f"extra key must not be a bool (True is not 1), got {shown(value)}")
    if isinstance(value, bytes):
        return _framed(b"b", value)
    if isinstance(value, str):
        # surrogatepass: every str, even one with lone surrogates, has its own bytes.
        return _framed(b"s", value.encode("utf-8", "surrogatepass"))
    if isinstance(value, int):
        return _framed(b"i", value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))
    if isinstance(value, tuple):
        items = b"".join(encode_key(v) for v in value)
        return b"t" + len(value).to_bytes(_LENGTH_BYTES, "big") + _framed(b"", items)
    raise TypeError(
        f"extra key must be None, bytes, str, int or a tuple of them, got "
        f"{type(value).__name__} {shown(value)}"
    )


def root_hash(hash_fn: HashFn, lora_id: object, salt: object) -> int:
    """The seed that a tree root contributes as the 'parent hash' of its first blocks."""
    return hash_fn(_NAMESPACE + encode_key(lora_id) + encode_key(salt))


def _token_bytes(tokens: Sequence[int]) -> bytes:
    packed = packed_token_ids(tokens)
    if packed is not None:
        return packed
    for index, token in enumerate(tokens):  # names the first bad id, as every entry does
        check_token(token, f"token ids: token at index {index}")
    raise AssertionError("token ids: no bad id, yet the ids did not pack")


def chain_hashes(
    hash_fn: HashFn,
    parent_hash: int,
    tokens: Sequence[int],
    tokens_per_block: int,
    lora_id: object,
    extras: Sequence[object] | None = None,
) -> list[int]:
    """Hashes of the full blocks of ``tokens``, chained on ``parent_hash``. Pure."""
    data = _token_bytes(tokens)
    stride = 8 * tokens_per_block
    lora = encode_key(lora_id)
    hashes: list[int] = []
    prev = parent_hash
    for i in range(len(tokens) // tokens_per_block):
        extra = encode_key(extras[i] if extras is not None else None)
        prev = hash_fn(
            prev.to_bytes(16, "big") + lora + data[i * stride : (i + 1) * stride] + extra
        )
        hashes.append(prev)
    return hashes


def prompt_block_hashes(
    hash_fn: HashFn,
    tokens: Sequence[int],
    tokens_per_block: int,
    lora_id: object = None,
    salt: object = None,
    extras: Sequence[object] | None = None,
    num_blocks: int | None = None,
) -> list[int]:
    """The chained hashes of a prompt's first ``num_blocks`` full blocks (all full blocks
    when None), as the local cache names them: the one helper for a prompt's hash chain.
    ValueError for tokens (a container of them: the ids are checked as they are hashed), a
    salt, lora_id, block size or extras the manager refuses. Pure.

    ::

        tokens    |  block 0  |  block 1  |  block 2  | tail |
        hashes    [   h0      ,   h1      ,   h2      ]         (num_blocks=None)
                  [   h0      ,   h1      ]                     (num_blocks=2)
    """
    # NOTE: checked here, where callers outside the manager (a router, a remote tier) come
    # in: a block size of 0 divided by zero, a negative one or True hashed garbage; a salt
    # or lora_id the manager refuses named blocks no instance could hold (a remote write
    # under one filled the shared store with garbage).
    # A str, bytes, a mapping, a set, an iterator or None is refused as the manager refuses
    # it: bytes were hashed as raw memory (names of blocks no instance holds), a dict's
    # keys or a set's members as if they were a prompt.
    tokens = as_token_sequence(tokens, "tokens")
    salt = check_key("salt", salt)
    lora_id = check_lora_id(lora_id)
    # NOTE: the cache's own rule (a power of two in 1..65536), not only >= 1: a block size
    # of 3 hashed a chain no cache could hold, though this docstring said it refused what
    # the manager refuses.
    tokens_per_block = check_tokens_per_block(tokens_per_block)
    if num_blocks is not None:
        num_blocks = check_count("num_blocks", num_blocks)
        tokens = tokens[: num_blocks * tokens_per_block]
    if extras is not None and len(extras) < len(tokens) // tokens_per_block:
        raise ValueError(f"extras must hold one extra key per full block "
                         f"({len(tokens) // tokens_per_block}), got {len(extras)}")
    return chain_hashes(hash_fn, root_hash(hash_fn, lora_id, salt), tokens, tokens_per_block,
                        lora_id, extras)
