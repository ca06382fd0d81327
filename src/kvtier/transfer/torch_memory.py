"""KV memory as the torch transfer engine sees and moves it: byte views, the pinned host
seen from the GPU (unified addressing), and copies staged through pinned buffers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class _CudaArray:
    """Describes raw memory to ``torch.as_tensor`` through the CUDA array interface."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2,
            "strides": None,
        }


def uva_alias(t: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor over the pinned CPU tensor ``t``'s memory (unified virtual addressing),
    or ``None`` where that is not possible. The alias does not own the memory: keep ``t``."""
    import torch

    nbytes = t.numel() * t.element_size()
    try:
        raw = torch.as_tensor(_CudaArray(t.data_ptr(), nbytes), device=device)
    except Exception:  # NOTE: no numpy, no UVA, or an old torch: the engine stages instead
        return None
    if raw.device.type != "cuda":
        return None
    return raw.view(t.dtype).view(t.shape)


def copy_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., tokens, heads, head_dim] as [..., tokens, row] of the widest integer type
    that divides a row: copies move bytes, and wide elements make gathers fast."""
    import torch

    flat = t.reshape(*t.shape[:-2], -1)
    row_bytes = flat.shape[-1] * t.element_size()
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = torch.empty((), dtype=dtype).element_size()
        if size >= t.element_size() and row_bytes % size == 0:
            return flat.view(dtype)
    return flat


def new_event() -> torch.cuda.Event:
    import torch

    return torch.cuda.Event()  # type: ignore[no-untyped-call]


def new_stream(device: torch.device) -> torch.cuda.Stream:
    import torch

    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


def copy_staged(src: torch.Tensor, dst: torch.Tensor, src_index: torch.Tensor,
                dst_index: torch.Tensor) -> None:
    """``dst[dst_index] = src[src_index]`` between a GPU and a pinned CPU tensor without
    unified addressing: gather on the source's side, one DMA through a pinned staging
    buffer, scatter on the destination's. The CPU side runs synchronously (the caller has
    waited for earlier GPU work on host sources; a host destination waits here)."""
    import torch

    if src.device.type == "cpu":
        staging = torch.empty((len(src_index), *src.shape[1:]), dtype=src.dtype,
                              pin_memory=True)
        torch.index_select(src, 0, src_index, out=staging)
        gathered = staging.to(dst.device, non_blocking=True)
    else:
        gathered = src.index_select(0, src_index)
    if dst.device.type == "cpu" and gathered.device.type != "cpu":
        staging = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
        staging.copy_(gathered, non_blocking=True)
        torch.cuda.current_stream(gathered.device).synchronize()
        gathered = staging
    dst.index_copy_(0, dst_index, gathered)


def blocks_view(layers: list[torch.Tensor]) -> torch.Tensor | None:
    """[blocks, layers, ...]: one view over per-layer tensors [blocks, ...] that are equally
    spaced slices of one allocation (``KVStorage`` makes them so), so one kernel indexes a
    block's every layer; ``None`` where they are not. Pure."""
    first = layers[0]
    step = (layers[1].data_ptr() - first.data_ptr()) if len(layers) > 1 else 0
    elem = first.element_size()
    for i, t in enumerate(layers):
        if (t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.data_ptr() - first.data_ptr() != i * step):
            return None
    if step % elem:
        return None
    return first.as_strided((first.shape[0], len(layers), *first.shape[1:]),
                            (first.stride(0), step // elem, *first.stride()[1:]))


def layer_view(tensors: list[torch.Tensor], kind: str, index: int) -> torch.Tensor:
    """Layer ``index`` of a tier's tensors of layout ``kind``, [blocks, 2, tokens, ...]."""
    if kind == "block_major":
        return tensors[0][:, index]
    return tensors[index]


# glibc's mallopt parameter: how much freed memory to keep at the top of the heap.
M_TOP_PAD = -2
HEAP_PAD_BYTES = 64 << 20


def retain_freed_heap(pad_bytes: int) -> bool:
    """Ask the C library's malloc (glibc) to keep ``pad_bytes`` of freed memory at the top
    of the heap rather than hand it back to the kernel; for the whole process. Returns
    whether it was set (False elsewhere: musl, macOS).

    NOTE: planning a staged plan of 32,768 ops allocates and frees NumPy arrays of
    256-512 KiB; glibc gave the freed top of the heap back after each plan and took it
    back with ~450 page faults at the next (``prepare`` 3.0 ms against 1.9-2.5 ms with
    64 MiB kept, 2-core test machine; a fault costs more on a virtual machine such as the
    H200 host). 64 MiB of heap is small beside the pinned tiers of such a process."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TOP_PAD, pad_bytes))
