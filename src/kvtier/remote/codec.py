"""The stored value of one KV block in the remote tier: a fixed header, then the raw bytes.

::

    offset  size  field
         0     4  magic b"KVTB"
         4     2  format version
         6    16  namespace fingerprint (model, layout, dtype, salt scope)
        22    16  block hash (128-bit chained hash)
        38     4  token count
        42    16  layout: num_layers, num_kv_heads, head_dim, tokens_per_block (u32 each)
        58     1  dtype code
        59     1  layout code
        60     8  payload length in bytes
        68     8  xxh3_64 of header bytes 0..68 and the payload
        76     -  payload: the block's KV bytes

The checksum covers the header too, so any flipped byte is refused. Decoding parses fixed
integer fields only: nothing in a value is ever evaluated.

Under tensor parallelism each rank stores its own shard of a block as its own value, under
a namespace that also fingerprints the rank and the TP size (the header's ``num_kv_heads``
is the model's; the payload is the shard's bytes)::

    kvtier:{ns(model, layout, rank 0 of 2)}:{hash}  ->  rank 0's heads of the block
    kvtier:{ns(model, layout, rank 1 of 2)}:{hash}  ->  rank 1's heads of the block

so a TP-2 deployment never reads a TP-4 deployment's bytes, and a block is found only when
every rank found its shard (:func:`num_found_on_every_rank`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

import xxhash

from kvtier.reprs import shown
from kvtier.storage import DTYPE_BYTES, LAYOUTS, KVLayout

MAGIC = b"KVTB"
FORMAT_VERSION = 1
_FIELDS = struct.Struct(">4sH16s16sIIIIIBBQ")
_CHECKSUM = struct.Struct(">Q")
HEADER_BYTES = _FIELDS.size + _CHECKSUM.size

_DTYPE_CODES = {name: code for code, name in enumerate(sorted(DTYPE_BYTES), start=1)}
_LAYOUT_CODES = {name: code for code, name in enumerate(LAYOUTS, start=1)}
_DTYPE_NAMES = {code: name for name, code in _DTYPE_CODES.items()}
_LAYOUT_NAMES = {code: name for name, code in _LAYOUT_CODES.items()}

REASONS = ("type", "truncated", "magic", "version", "checksum", "namespace", "block_hash", "layout",
           "num_tokens", "length")


class PayloadError(ValueError):
    """A stored value that must not be served; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """What a value says about its block; ``decode_block`` compares it field by field."""

    namespace: str
    block_hash: int
    num_tokens: int
    layout: KVLayout

    def __post_init__(self) -> None:
        if len(self.namespace) != 32 or not all(c in "0123456789abcdef" for c in self.namespace):
            raise ValueError(f"namespace must be 32 lowercase hex digits, got "
                             f"{shown(self.namespace)}")
        if type(self.block_hash) is not int or not 0 <= self.block_hash < 1 << 128:
            raise ValueError(f"block_hash must be a 128-bit unsigned int, got "
                             f"{shown(self.block_hash)}")
        tpb = self.layout.tokens_per_block
        if type(self.num_tokens) is not int or not 1 <= self.num_tokens <= tpb:
            raise ValueError(f"num_tokens must be an integer in 1..{tpb}, got "
                             f"{shown(self.num_tokens)}")


def namespace_fingerprint(model_id: str, layout: KVLayout, salt_scope: str | None = None) -> str:
    """32 hex digits naming one model, block shape, dtype, memory layout, tenant salt scope
    and, under tensor parallelism, the rank and TP size of the shard. Pure.

    Two models, layouts, dtypes, salt scopes or shards never share a fingerprint, hence
    never a key: every field is length-prefixed, so no field's content (a NUL, a separator)
    can pass for another field's, nor a list of fields for a longer one.
    """
    if not isinstance(model_id, str):
        raise ValueError(f"model_id must be a str, got {shown(model_id)}")
    if salt_scope is not None and not isinstance(salt_scope, str):
        raise ValueError(f"salt_scope must be None or a str, got {shown(salt_scope)}")
    if not isinstance(layout, KVLayout):
        raise ValueError(f"layout must be a KVLayout, got {shown(layout)}")
    parts: tuple[str, ...] = (
        "kvtier-remote/v2", model_id, str(layout.num_layers), str(layout.num_kv_heads),
        str(layout.head_dim), str(layout.tokens_per_block), layout.dtype, layout.layout,
        "none" if salt_scope is None else "salt", "" if salt_scope is None else salt_scope,
    )
    if layout.tp_size > 1:
        # NOTE: only then, so that every key written without tensor parallelism stays valid.
        parts += ("tp", str(layout.tp_rank), str(layout.tp_size))
    hasher = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        hasher.update(len(data).to_bytes(8, "big"))
        hasher.update(data)
    return hasher.hexdigest()


def block_key(namespace: str, block_hash: int) -> str:
    """The Redis key of a block: ``kvtier:{namespace}:{block_hash:032x}``. Pure."""
    return f"kvtier:{namespace}:{block_hash:032x}"


def _checksum(head: bytes | bytearray, payload: bytes | memoryview) -> int:
    hasher = xxhash.xxh3_64(head)
    hasher.update(payload)
    return int(hasher.intdigest())


def encode_block(header: BlockHeader, payload: bytes | memoryview) -> bytes:
    """The stored value of a block: header then ``payload`` (exactly one block's bytes)."""
    layout = header.layout
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ValueError(f"payload must be bytes, got {type(payload).__name__}")
    # NOTE: its bytes, not its len(): a view of 4-byte floats (or of rows) as long as a
    # block has bytes passed, and its value (four times a block, the header saying one)
    # was written to the shared store, counted as written, and refused by every reader;
    # a strided view raised BufferError from the join.
    data = exact_bytes(payload, layout.bytes_per_block)
    if data is None:
        raise ValueError(f"payload must be {layout.bytes_per_block} bytes (contiguous: one "
                         f"block of {layout}), got {payload_size(payload)}")
    head = _FIELDS.pack(
        MAGIC, FORMAT_VERSION, bytes.fromhex(header.namespace),
        header.block_hash.to_bytes(16, "big"), header.num_tokens,
        layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.tokens_per_block,
        _DTYPE_CODES[layout.dtype], _LAYOUT_CODES[layout.layout], len(data),
    )
    return b"".join((head, _CHECKSUM.pack(_checksum(head, data)), data))


def decode_block(data: object, expected: BlockHeader) -> memoryview:
    """The payload of ``data`` if every header field matches ``expected`` and the checksum
    holds, as a read-only view into the value (no copy: the view keeps the value alive);
    raises :class:`PayloadError` naming the first check that failed. Pure."""
    if isinstance(data, bytearray):
        # NOTE: a view of a mutable buffer could change after its check: checked bytes are
        # immutable ones (a store's values are bytes; this copy is for a caller's bytearray).
        data = bytes(data)
    if not isinstance(data, bytes):
        raise PayloadError("type", f"a value must be bytes, got {type(data).__name__}")
    if len(data) < HEADER_BYTES:
        raise PayloadError("truncated", f"{len(data)} bytes, header alone is {HEADER_BYTES}")
    (magic, version, namespace, block_hash, num_tokens, num_layers, num_kv_heads, head_dim,
     tokens_per_block, dtype_code, layout_code, payload_len) = _FIELDS.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError("magic", f"got {shown(magic)}, want {shown(MAGIC)}")
    if version != FORMAT_VERSION:
        raise PayloadError("version", f"got {version}, want {FORMAT_VERSION}")
    if len(data) != HEADER_BYTES + payload_len:
        kind = "truncated" if len(data) < HEADER_BYTES + payload_len else "length"
        raise PayloadError(kind, f"{len(data) - HEADER_BYTES} payload bytes, header says "
                                 f"{payload_len}")
    view = memoryview(data)
    (stored_checksum,) = _CHECKSUM.unpack_from(data, _FIELDS.size)
    if stored_checksum != _checksum(data[: _FIELDS.size], view[HEADER_BYTES:]):
        raise PayloadError("checksum", "payload or header bytes changed after writing")
    if namespace.hex() != expected.namespace:
        raise PayloadError("namespace", f"got {namespace.hex()}, want {expected.namespace}")
    if int.from_bytes(block_hash, "big") != expected.block_hash:
        raise PayloadError("block_hash", f"got {block_hash.hex()}, "
                                         f"want {expected.block_hash:032x}")
    layout = expected.layout
    stored = (num_layers, num_kv_heads, head_dim, tokens_per_block,
              _DTYPE_NAMES.get(dtype_code), _LAYOUT_NAMES.get(layout_code))
    wanted = (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.tokens_per_block,
              layout.dtype, layout.layout)
    if stored != wanted:
        raise PayloadError("layout", f"got {stored}, want {wanted}")
    if num_tokens != expected.num_tokens:
        raise PayloadError("num_tokens", f"got {num_tokens}, want {expected.num_tokens}")
    if payload_len != layout.bytes_per_block:
        raise PayloadError("length", f"{payload_len} bytes, a block is {layout.bytes_per_block}")
    return view[HEADER_BYTES:]


@dataclass(frozen=True, slots=True)
class RemoteNamespace:
    """One model's blocks of one layout and salt scope: their keys and their values."""

    model_id: str
    layout: KVLayout
    salt_scope: str | None = None

    def __post_init__(self) -> None:
        namespace_fingerprint(self.model_id, self.layout, self.salt_scope)  # validates

    @property
    def fingerprint(self) -> str:
        return namespace_fingerprint(self.model_id, self.layout, self.salt_scope)

    def for_rank(self, tp_rank: int, tp_size: int) -> RemoteNamespace:
        """The namespace of rank ``tp_rank``'s shards (this one names whole blocks). Pure."""
        return RemoteNamespace(self.model_id, self.layout.shard(tp_rank, tp_size),
                               self.salt_scope)

    def every_rank(self) -> list[RemoteNamespace]:
        """The namespaces of every rank of the deployment this rank's namespace belongs to,
        in rank order (``[self]`` without tensor parallelism). Pure."""
        layout = self.layout
        whole = RemoteNamespace(self.model_id, replace(layout, tp_rank=0, tp_size=1),
                                self.salt_scope)
        if layout.tp_size == 1:
            return [whole]
        return [whole.for_rank(rank, layout.tp_size) for rank in range(layout.tp_size)]

    def key(self, block_hash: int) -> str:
        """The Redis key of ``block_hash`` in this namespace. Pure."""
        return block_key(self.fingerprint, block_hash)

    def header(self, block_hash: int) -> BlockHeader:
        """The header of a full block (the remote tier stores full blocks only). Pure."""
        return BlockHeader(self.fingerprint, block_hash, self.layout.tokens_per_block,
                           self.layout)

    def encode(self, block_hash: int, payload: bytes | memoryview) -> bytes:
        return encode_block(self.header(block_hash), payload)

    def decode(self, block_hash: int, value: object) -> memoryview:
        """The payload of ``value`` (a read-only view into it), or :class:`PayloadError`.
        Pure."""
        return decode_block(value, self.header(block_hash))


def exact_bytes(value: object, num_bytes: int) -> memoryview | None:
    """``value`` as exactly ``num_bytes`` contiguous bytes, or None where it is not that
    (no bytes-like object, a strided view, another size). What a store answered is read
    through this where a caller's client could answer past the codec's checks: a value a
    slot cannot take whole is a miss, never an exception half way through a copy. Pure."""
    if not isinstance(value, bytes | bytearray | memoryview):
        return None
    try:
        data = memoryview(value).cast("B")  # NOTE: refuses a non-contiguous view
    except (TypeError, ValueError):
        return None
    return data if data.nbytes == num_bytes else None


def payload_size(value: object) -> str:
    """What a refusal says of a payload that is no block: its size in bytes, and where
    its items are not bytes or it is not contiguous, that too. Pure."""
    if not isinstance(value, bytes | bytearray | memoryview):
        return type(value).__name__
    try:
        view = memoryview(value)
    except ValueError:  # a released view
        return "a released memoryview"
    size = f"{view.nbytes} bytes"
    if view.itemsize != 1 or view.ndim != 1:
        size += f" ({len(view)} items of format {view.format!r}, shape {view.shape})"
    if not view.c_contiguous:
        size += " (not contiguous)"
    return size


def num_found_on_every_rank(wanted: Sequence[int],
                            found_by_rank: Sequence[Collection[int]]) -> int:
    """How many of ``wanted`` (a prompt's block hashes, in order) every rank found, counted
    from the first: a block counts only when each rank found its shard, and a block after a
    miss is no use (a prefix must be consecutive). Pure.

    ::

        wanted          h0  h1  h2  h3
        rank 0 found    h0  h1      h3
        rank 1 found    h0  h1  h2  h3
        -> 2            (h2 lacks rank 0's shard, so h3 is unreachable)
    """
    if not found_by_rank:
        raise ValueError("found_by_rank must hold the blocks found by at least one rank")
    run = 0
    while run < len(wanted) and all(wanted[run] in found for found in found_by_rank):
        run += 1
    return run

