"""One Triton kernel that runs a whole plan (one layer of it) in every direction at once.

Imported only by ``kvtier.transfer.fused``, and only where Triton is installed (CUDA
builds of torch bring it). Each row of ``items`` is one op::

    items[i] = (flags, src_slot, dst_slot, num_tokens)   flags: bit 0 source on the host,
                                                                bit 1 destination on the host

and ops ``starts[c] .. starts[c + 1]`` form component ``c`` (without ``starts``, op ``c``
alone). A block is ``block_len`` elements: ``num_segs`` segments ``seg_stride`` apart,
of which an op copies the first ``num_tokens * row`` elements (all of it when whole).

Work is cut into *units*: one component over one chunk (``CHUNK`` elements at the same
offset of every block it touches). Chunks of different offsets never overlap, so units are
independent; inside a unit the component's ops run in plan order with a CTA barrier
between them. Small units keep every program switching between reads and writes of the
link, so offloads and onboards overlap even when one component is an offload followed by
an onboard into the same slot (a step's usual pair).

Even programs take units from the front of the list, odd ones from the back, so a plan
that lists its offloads before its onboards has both directions in flight at all times::

    units      0 1 2 3 ...                              ... u-4 u-3 u-2 u-1
    programs   0 2 4 6 (round 0), then 0 2 4 6 (round 1)     7 5 3 1 (round 0) ...
"""

from __future__ import annotations

import functools

import triton  # type: ignore[import-not-found,unused-ignore]
import triton.language as tl  # type: ignore[import-not-found,unused-ignore]


# NOTE: not decorated (an untyped decorator would untype it for mypy); jit() compiles it.
def copy_components(  # type: ignore[no-untyped-def,unused-ignore]
    gpu_ptr, host_ptr, items_ptr, starts_ptr, num_comps, num_chunks,
    gpu_block_stride, host_block_stride, block_len, seg_stride, row, num_segs,
    tokens_per_block, HAS_STARTS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    # NOTE: while loops, not range() over run-time bounds: Triton's interpreter (the CPU
    # tests) cannot turn its one-element arrays into Python ints under NumPy 2.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    half = (num_programs + 1) // 2
    lanes = tl.arange(0, BLOCK)
    num_units = num_comps * num_chunks
    v = pid
    while v < num_units:
        rank = (v // num_programs) * half + pid // 2
        unit = rank
        if pid % 2 == 1:
            unit = num_units - 1 - rank
        c = unit // num_chunks
        lo = (unit % num_chunks) * CHUNK
        hi = tl.minimum(lo + CHUNK, block_len)
        if HAS_STARTS:
            i = tl.load(starts_ptr + c)
            last = tl.load(starts_ptr + c + 1)
        else:
            i = c.to(tl.int64)
            last = i + 1
        while i < last:
            flags = tl.load(items_ptr + 4 * i)
            num_tokens = tl.load(items_ptr + 4 * i + 3)
            src_host = (flags & 1) != 0
            dst_host = (flags & 2) != 0
            src_base = tl.load(items_ptr + 4 * i + 1) * tl.where(
                src_host, host_block_stride, gpu_block_stride)
            dst_base = tl.load(items_ptr + 4 * i + 2) * tl.where(
                dst_host, host_block_stride, gpu_block_stride)
            whole = num_tokens == tokens_per_block
            num_parts = tl.where(whole, 1, num_segs)
            part_len = tl.where(whole, block_len, num_tokens * row).to(tl.int32)
            part = 0
            while part < num_parts:
                # This part of the block, cut to the unit's chunk.
                start = tl.maximum(part * seg_stride, lo)
                end = tl.minimum(part * seg_stride + part_len, hi)
                while start < end:
                    offs = start + lanes
                    mask = offs < end
                    if src_host:
                        x = tl.load(host_ptr + src_base + offs, mask=mask)
                    else:
                        x = tl.load(gpu_ptr + src_base + offs, mask=mask)
                    if dst_host:
                        tl.store(host_ptr + dst_base + offs, x, mask=mask)
                    else:
                        tl.store(gpu_ptr + dst_base + offs, x, mask=mask)
                    start += BLOCK
                part += 1
            # The next op of the component may read what this one wrote, or overwrite
            # what it read: every thread of the program is done with this one first.
            tl.debug_barrier()
            i += 1
        v += num_programs


@functools.cache
def jit(interpret: bool) -> object:
    """The kernel compiled by Triton, or run by its interpreter (tests on CPU tensors)."""
    if interpret:
        from triton.runtime.interpreter import (  # type: ignore[import-not-found,unused-ignore]
            InterpretedFunction,
        )

        return InterpretedFunction(copy_components)
    return triton.jit(copy_components)
