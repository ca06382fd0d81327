"""Real KV memory of one tier: :class:`KVLayout` (the shape of a block) and :class:`KVStorage`.

A block holds ``tokens_per_block`` tokens of K and V for every layer. Two layouts::

    block_major   one tensor [num_blocks, num_layers, 2, tokens_per_block, kv_heads, head_dim]
                  a block of all layers is contiguous: one block is one copy (best to offload)
    layer_major   per layer a tensor [num_blocks, 2, tokens_per_block, kv_heads, head_dim]
                  what the attention kernels of vLLM-style engines index (views of one
                  allocation, equally spaced: a copy kernel can span every layer at once)

Either way ``storage.layer(i)`` is the [num_blocks, 2, tokens_per_block, kv_heads, head_dim]
view of layer ``i``. torch is imported lazily: ``import kvtier`` works without it.

Under tensor parallelism each of ``tp_size`` ranks holds the same block ids with its own
contiguous share of the KV heads (``kv_heads`` above is then the shard's count)::

    KV heads     0   1   2   3   4   5   6   7        num_kv_heads = 8, tp_size = 2
    rank 0      [===============]                     kv_head_slice = slice(0, 4)
    rank 1                      [===============]     kv_head_slice = slice(4, 8)

A shard's ``bytes_per_token`` and tensors count its own heads only; ``tp_size = 1`` (the
default) is the whole model, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from kvtier.counts import as_integer
from kvtier.reprs import shown

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
LAYOUTS = ("block_major", "layer_major")


def _positive(field: str, value: object) -> int:
    """``value`` as the plain int it is (``kvtier.counts``); ValueError naming ``field``
    unless it is an integer >= 1. Pure."""
    n = as_integer(value)
    if n is None or n < 1:
        raise ValueError(f"{field} must be an integer >= 1, got {shown(value)}")
    return n


def _index(field: str, value: object, size: int) -> int:
    """``value`` as the plain int it is (``kvtier.counts``); ValueError naming ``field``
    unless it is an integer in ``0..size - 1``. Pure."""
    n = as_integer(value)
    if n is None or not 0 <= n < size:
        raise ValueError(f"{field} must be an int in 0..{size - 1}, got {shown(value)}")
    return n


# The fields of a KVLayout that name the model's block, not how a tier or a rank holds it.
MODEL_SHAPE_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "tokens_per_block", "dtype")


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The shape of one KV block, and how a tier lays blocks out in memory."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens_per_block: int
    dtype: str = "float32"
    layout: str = "block_major"
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        # NOTE: kept as the plain ints they are (``kvtier.counts``): a NumPy or ``__index__``
        # tokens_per_block was refused.
        for name in ("num_layers", "num_kv_heads", "head_dim", "tokens_per_block", "tp_size"):
            object.__setattr__(self, name, _positive(name, getattr(self, name)))
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {shown(self.dtype)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {shown(self.layout)}")
        rank = as_integer(self.tp_rank)
        if rank is None or not 0 <= rank < self.tp_size:
            raise ValueError(f"tp_rank must be an integer in 0..{self.tp_size - 1} "
                             f"(tp_size {self.tp_size}), got {shown(self.tp_rank)}")
        object.__setattr__(self, "tp_rank", rank)
        if self.num_kv_heads % self.tp_size:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must split evenly over "
                             f"tp_size ({self.tp_size}) ranks")

    @property
    def model_shape(self) -> tuple[object, ...]:
        """What every tier's and every rank's block of one model shares, whatever the
        memory layout kind and the shard (``MODEL_SHAPE_FIELDS``). Pure."""
        return tuple(getattr(self, name) for name in MODEL_SHAPE_FIELDS)

    @property
    def num_shard_kv_heads(self) -> int:
        """The KV heads this rank holds (all of them when ``tp_size`` is 1)."""
        return self.num_kv_heads // self.tp_size

    @property
    def kv_head_slice(self) -> slice:
        """Which of the model's KV heads this rank holds. Pure."""
        start = self.tp_rank * self.num_shard_kv_heads
        return slice(start, start + self.num_shard_kv_heads)

    def shard(self, tp_rank: int, tp_size: int) -> KVLayout:
        """The layout of rank ``tp_rank``'s shard of this whole-model layout. Pure."""
        if self.tp_size != 1:
            raise ValueError(f"shard() splits a whole-model layout; this one is already rank "
                             f"{self.tp_rank} of {self.tp_size}")
        return replace(self, tp_rank=tp_rank, tp_size=tp_size)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token, all layers, of this rank's heads."""
        return (2 * self.num_layers * self.num_shard_kv_heads * self.head_dim
                * DTYPE_BYTES[self.dtype])

    @property
    def bytes_per_block(self) -> int:
        return self.tokens_per_block * self.bytes_per_token

    def num_blocks_for_bytes(self, nbytes: int) -> int:
        """How many whole blocks fit in ``nbytes``. Pure."""
        n = as_integer(nbytes)
        if n is None or n < 0:
            raise ValueError(f"nbytes must be an integer >= 0, got {shown(nbytes)}")
        return n // self.bytes_per_block

    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)  # type: ignore[no-any-return]

    def tensor_shapes(self, num_blocks: int) -> list[tuple[int, ...]]:
        """The shapes of the tensors a storage of ``num_blocks`` blocks allocates. Pure."""
        per_layer = (2, self.tokens_per_block, self.num_shard_kv_heads, self.head_dim)
        if self.layout == "block_major":
            return [(num_blocks, self.num_layers, *per_layer)]
        return [(num_blocks, *per_layer)] * self.num_layers


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (False when torch has no CUDA build)."""
    import torch

    return bool(torch.cuda.is_available())


class KVStorage:
    """The KV blocks of one tier on one device; under tensor parallelism, of one rank's
    shard (``layout.tp_rank`` of ``layout.tp_size``: its KV heads only, every block id).

    ``pin_memory=None`` pins a CPU storage when CUDA is available (so copies to and from
    the GPU are real DMA) and leaves it in plain memory otherwise. Contents start
    uninitialised: a block holds only what was written to it.
    """

    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        device: str | torch.device = "cpu",
        pin_memory: bool | None = None,
    ) -> None:
        import torch

        # NOTE: checked before torch reads them: a str layout was an AttributeError
        # ('torch_dtype'), a device "gpu" torch's RuntimeError listing its device types,
        # and a pin_memory of "yes" pinned (or failed to) as True.
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, got {shown(layout)}")
        num_blocks = _positive("num_blocks", num_blocks)
        if pin_memory is not None and type(pin_memory) is not bool:
            raise ValueError(f"pin_memory must be None or a bool, got {shown(pin_memory)}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"device must name a torch device ('cpu', 'cuda:0', ...), got "
                             f"{shown(device)}") from None
        self.layout = layout
        self.num_blocks = num_blocks
        on_cpu = self.device.type == "cpu"
        if pin_memory is None:
            pin_memory = on_cpu and cuda_available()
        if pin_memory and not on_cpu:
            raise ValueError(f"pin_memory is for CPU storage, got device {self.device}")
        self.pinned = bool(pin_memory)
        dtype = layout.torch_dtype()
        shapes = layout.tensor_shapes(num_blocks)
        # One allocation either way (layer-major: its per-layer slices).
        try:
            whole = torch.empty((len(shapes), *shapes[0]), dtype=dtype, device=self.device,
                                pin_memory=self.pinned)
        except RuntimeError as exc:
            # NOTE: torch's allocators say so in their own words (OutOfMemoryError on CUDA,
            # "can't allocate memory" on CPU, "CUDA error: out of memory" for pinned host
            # memory, an AcceleratorError); a caller sees the sizes it chose.
            text = str(exc)
            if not (isinstance(exc, torch.OutOfMemoryError) or "allocate" in text
                    or "out of memory" in text):
                raise
            raise MemoryError(f"cannot allocate {num_blocks:,} blocks of "
                              f"{layout.bytes_per_block:,} bytes ({self.nbytes / 1e9:,.1f} GB) "
                              f"on {self.device}") from None
        self.tensors: list[torch.Tensor] = list(whole.unbind(0))

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.layout.bytes_per_block

    def layer(self, index: int) -> torch.Tensor:
        """View [num_blocks, 2, tokens_per_block, kv_heads, head_dim] of one layer;
        ValueError for an ``index`` that is no layer.

        NOTE: as ``block``'s slot: -1 was the last layer, and True (block-major) a view with
        one more axis, which ``write`` broadcast K and V into: another layer's KV, silently;
        past the last layer, IndexError or TypeError in torch's or a list's words."""
        index = _index("layer", index, self.layout.num_layers)
        if self.layout.layout == "block_major":
            return self.tensors[0][:, index]
        return self.tensors[index]

    def write(
        self,
        layer: int,
        block_ids: torch.Tensor,
        offsets: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Store K and V [n, kv_heads, head_dim] (this shard's heads) of ``n`` tokens at
        (block, offset) pairs, ``block_ids`` and ``offsets`` 1-D integer tensors of ``n``.
        ValueError naming the argument, writing nothing, for any other shape or index type,
        and (index tensors on the CPU, where it costs no wait for a device) for a block or
        offset outside the storage.

        NOTE: torch's indexing took a block id or offset of -1 as the last block or token
        (another block's KV overwritten, silently), broadcast a K of [n, head_dim] over
        every head, read a bool tensor as a mask, and with K good and V of another shape
        wrote K, then raised its own RuntimeError (the block half written)."""
        view = self.layer(layer)
        self._check_write(block_ids, offsets, k, v)
        view[block_ids, 0, offsets] = k.to(view.dtype)
        view[block_ids, 1, offsets] = v.to(view.dtype)

    def _check_write(self, block_ids: object, offsets: object, k: object, v: object) -> None:
        """``write``'s checks of its arguments (see there). Pure."""
        import torch

        _check_index("block_ids", block_ids, self.num_blocks)
        _check_index("offsets", offsets, self.layout.tokens_per_block)
        assert isinstance(block_ids, torch.Tensor) and isinstance(offsets, torch.Tensor)
        n = block_ids.numel()
        if offsets.numel() != n:
            raise ValueError(f"offsets must hold one offset per block id ({n}), got "
                             f"{offsets.numel()}")
        shape = (n, self.layout.num_shard_kv_heads, self.layout.head_dim)
        for name, tensor in (("k", k), ("v", v)):
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must be a tensor of shape {list(shape)} (tokens, this "
                                 f"storage's KV heads, head_dim), got {_describe_tensor(tensor)}")

    def gather(self, layer: int, block_ids: torch.Tensor,
               num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [num_tokens, kv_heads, head_dim] of the first ``num_tokens`` tokens held
        by ``block_ids`` (a block table), in order. Pure. ValueError for a ``num_tokens``
        that is no int in ``0..len(block_ids) * tokens_per_block`` (-3 gave all but the
        last 3 tokens, 20 of 8 the 8, without a word); ValueError, as ``write``'s, for
        block ids that are no 1-D integer tensor or (on the CPU) no blocks of the storage
        (torch's IndexError or RuntimeError, naming nothing)."""
        _check_index("block_ids", block_ids, self.num_blocks)
        held = block_ids.numel() * self.layout.tokens_per_block
        n = as_integer(num_tokens)
        if n is None or not 0 <= n <= held:
            raise ValueError(f"num_tokens must be an int in 0..{held} (the tokens of "
                             f"{block_ids.numel()} blocks), got {shown(num_tokens)}")
        num_tokens = n
        blocks = self.layer(layer).index_select(0, block_ids)  # [b, 2, tpb, H, D]
        tail = blocks.shape[3:]
        k = blocks[:, 0].reshape(-1, *tail)[:num_tokens]
        v = blocks[:, 1].reshape(-1, *tail)[:num_tokens]
        return k, v

    def block(self, slot: int) -> torch.Tensor:
        """A copy of one block, [num_layers, 2, tokens_per_block, kv_heads, head_dim];
        ValueError for a ``slot`` that is not one (-1 read the last block, True a stack of
        every block). Pure."""
        import torch

        slot = _index("slot", slot, self.num_blocks)

        return torch.stack([self.layer(i)[slot] for i in range(self.layout.num_layers)])

    def fill_(self, value: float) -> None:
        """Overwrite every block with ``value`` (tests poison storage with NaN)."""
        for t in self.tensors:
            t.fill_(value)


def _check_index(name: str, index: object, size: int) -> None:
    """ValueError naming ``name`` unless ``index`` is a 1-D int64 or int32 tensor whose
    values (checked where it is on the CPU: on a device that would wait for it) are in
    ``0..size - 1``. Pure."""
    import torch

    if (not isinstance(index, torch.Tensor) or index.dim() != 1
            or index.dtype not in (torch.int64, torch.int32)):
        raise ValueError(f"{name} must be a 1-D tensor of int64 or int32, got "
                         f"{_describe_tensor(index)}")
    if index.numel() and index.device.type == "cpu":
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= size:
            raise ValueError(f"{name} must hold ints in 0..{size - 1}, got "
                             f"{low if low < 0 else high}")


def _describe_tensor(value: object) -> str:
    """What a refusal says of a value given for a tensor: its shape and dtype, else its
    repr. Pure."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"a tensor of shape {list(shape)} and dtype {dtype}"
    return shown(value)


def num_host_blocks(layout: KVLayout, host_cache_bytes: int) -> int:
    """Host blocks that ``host_cache_bytes`` holds. Pure."""
    return layout.num_blocks_for_bytes(host_cache_bytes)


def num_gpu_blocks(
    layout: KVLayout,
    gpu_cache_bytes: int | None = None,
    free_memory_fraction: float | None = None,
    device: Any = None,
) -> int:
    """GPU blocks from a byte budget, or from a fraction of the device's free memory now
    (``torch.cuda.mem_get_info``). Exactly one of the two must be given."""
    if (gpu_cache_bytes is None) == (free_memory_fraction is None):
        raise ValueError("give exactly one of gpu_cache_bytes and free_memory_fraction, got "
                         f"{shown(gpu_cache_bytes)} and {shown(free_memory_fraction)}")
    if gpu_cache_bytes is not None:
        return layout.num_blocks_for_bytes(gpu_cache_bytes)
    assert free_memory_fraction is not None
    if not 0.0 < free_memory_fraction <= 1.0:
        raise ValueError(f"free_memory_fraction must be in (0, 1], got "
                         f"{shown(free_memory_fraction)}")
    import torch

    free_bytes, _ = torch.cuda.mem_get_info(device)
    return layout.num_blocks_for_bytes(int(free_bytes * free_memory_fraction))
