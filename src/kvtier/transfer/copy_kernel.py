"""One Triton kernel that runs a whole plan (one layer of it) in every direction at once.

Imported only by ``kvtier.transfer.fused``, and only where Triton is installed (CUDA
builds of torch bring it). Each row of ``items`` is one op::

    items[i] = (flags, src_slot, dst_slot, num_tokens)   flags: bit 0 source on the host,
                                                                bit 1 destination on the host

and ops ``starts[c] .. starts[c + 1]`` form component ``c`` (without ``starts``, op ``c``
alone). A program runs whole components, each in plan order with a CTA barrier between its
ops, so the ops that share a written slot keep their order, and nothing else is ordered.

Programs take components from both ends of the list at once (``zigzag``): a plan that lists
its offloads before its onboards still has both directions in flight from the start::

    components    0 1 2 3 | 4 5 6 7 | ... | n-8 .. n-5 | n-4 n-3 n-2 n-1
    round         0         2               3            1
    (programs 0..3, round r: even rounds from the front, odd rounds from the back)

A block of one op is ``num_segs`` segments, ``seg_stride`` elements apart, whose first
``num_tokens * row`` elements are copied (K and V of one layer: 2 segments); a whole block
is one contiguous run of ``num_segs * seg_stride`` elements.
"""

from __future__ import annotations

import functools

import triton  # type: ignore[import-not-found,unused-ignore]
import triton.language as tl  # type: ignore[import-not-found,unused-ignore]


# NOTE: not decorated (an untyped decorator would untype it for mypy); fused.py jits it.
def copy_components(  # type: ignore[no-untyped-def,unused-ignore]
    gpu_ptr, host_ptr, items_ptr, starts_ptr, num_comps,
    gpu_block_stride, host_block_stride, seg_stride, row, num_segs, tokens_per_block,
    HAS_STARTS: tl.constexpr, BLOCK: tl.constexpr,
):
    # NOTE: while loops, not range() over run-time bounds: Triton's interpreter (the CPU
    # tests) cannot turn its one-element arrays into Python ints under NumPy 2.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    v = pid
    while v < num_comps:
        k = v // num_programs
        c = (k // 2) * num_programs + pid
        if k % 2 == 1:
            c = num_comps - 1 - c
        if HAS_STARTS:
            i = tl.load(starts_ptr + c)
            last = tl.load(starts_ptr + c + 1)
        else:
            i = c.to(tl.int64)
            last = i + 1
        while i < last:
            flags = tl.load(items_ptr + 4 * i)
            src_slot = tl.load(items_ptr + 4 * i + 1)
            dst_slot = tl.load(items_ptr + 4 * i + 2)
            num_tokens = tl.load(items_ptr + 4 * i + 3)
            src_host = (flags & 1) != 0
            dst_host = (flags & 2) != 0
            src_base = src_slot * tl.where(src_host, host_block_stride, gpu_block_stride)
            dst_base = dst_slot * tl.where(dst_host, host_block_stride, gpu_block_stride)
            whole = num_tokens == tokens_per_block
            num_parts = tl.where(whole, 1, num_segs)
            part_len = tl.where(whole, num_segs * seg_stride, num_tokens * row).to(tl.int32)
            part = 0
            while part < num_parts:
                src = src_base + part * seg_stride
                dst = dst_base + part * seg_stride
                start = 0
                while start < part_len:
                    offs = start + lanes
                    mask = offs < part_len
                    if src_host:
                        x = tl.load(host_ptr + src + offs, mask=mask)
                    else:
                        x = tl.load(gpu_ptr + src + offs, mask=mask)
                    if dst_host:
                        tl.store(host_ptr + dst + offs, x, mask=mask)
                    else:
                        tl.store(gpu_ptr + dst + offs, x, mask=mask)
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
