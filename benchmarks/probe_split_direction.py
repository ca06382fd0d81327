"""Probe: both directions at once, each on the engine suited to it (issue 13, item 1).

    python benchmarks/probe_split_direction.py [--block-kib 16,64,256] [--total-mib 512]

The fused kernel moves both directions with SM loads and stores, and stops at ~0.8 of the
two-way ceiling: SM reads of pinned host memory are the weak half. The copy engines reach
the ceiling, but each scattered block is one DMA, and the driver's CPU per DMA (0.5-1.3
us) is above a 64 KiB block's time on the link (0.7 us). This probe splits a plan by
direction instead of by block:

- offloads: the victims' GPU blocks are first snapshot into a GPU staging buffer (one
  ``index_select``, HBM speed), then the fused kernel writes them to their host slots (SM
  *stores* to the host: posted writes, no round trip);
- onboards: one copy-engine DMA per block (``cudaMemcpyBatchAsync``), host slot to GPU
  slot, queued right after the snapshot: an onboard into a slot a victim just left (a
  step's usual pair) waits only for the snapshot, not for the victim's trip to the host.

So the DMAs are half the blocks (the CPU per block about halves), and SMs only write.
It times, per block size and plan shape (``both``: disjoint slots, ``step``: each onboard
into a slot an offload frees), the fused kernel alone and the split, against the two-way
ceiling of the same run, with the CPU to submit each, and checks every byte moved. Prints a
table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_transfer import Timer, ceilings, make_ops

from kvtier.transfer.dma_batch import load_cudart_batch
from kvtier.transfer.fused import (
    FusedCopier,
    FusedPlan,
    LaunchTarget,
    components,
    pack_items,
    plan_arrays,
    to_device,
)
from kvtier.transfer.plan import OpKind

TOKENS_PER_BLOCK = 16


def fused_plan(arrays: Any, device: torch.device) -> FusedPlan:
    grouped = components(arrays)
    if grouped is None:
        return FusedPlan(to_device(pack_items(arrays, None), device), None,
                         len(arrays.src_slot), arrays)
    order, starts = grouped
    return FusedPlan(to_device(pack_items(arrays, order), device), to_device(starts, device),
                     len(starts) - 1, arrays)


class Case:
    """One block size's pools, and a plan of one shape over them, with both ways to run it."""

    def __init__(self, kib: int, total: int, programs: int, device: torch.device,
                 cudart: Any, streams: tuple[torch.cuda.Stream, torch.cuda.Stream]) -> None:
        self.bs = bs = kib << 10
        self.n = n = total // bs
        self.device = device
        self.cudart = cudart
        self.side, self.dma = streams
        row = bs // TOKENS_PER_BLOCK
        self.gpu = torch.randint(0, 255, (2 * n, TOKENS_PER_BLOCK, row), dtype=torch.uint8,
                                 device=device)
        self.host = torch.empty((2 * n, TOKENS_PER_BLOCK, row), dtype=torch.uint8,
                                pin_memory=True)
        self.host.copy_(torch.randint(0, 255, self.host.shape, dtype=torch.uint8))
        self.staging = torch.empty((n, TOKENS_PER_BLOCK, row), dtype=torch.uint8,
                                   device=device)
        self.target = LaunchTarget(self.gpu, self.host, 1)
        self.copier = FusedCopier([self.target], None, TOKENS_PER_BLOCK, programs)
        self.stage_target = LaunchTarget(self.staging, self.host, 1)
        self.stage_copier = FusedCopier([self.stage_target], None, TOKENS_PER_BLOCK, programs)

    def use(self, shape: str, seed: int) -> int:
        """Make the plan of ``shape``; returns its number of ops."""
        ops = make_ops(shape, self.n, TOKENS_PER_BLOCK, random.Random(seed))
        offs = [op for op in ops if op.kind is OpKind.OFFLOAD]
        ons = [op for op in ops if op.kind is OpKind.ONBOARD]
        self.whole = plan_arrays(ops)
        self.off_gpu = np.array([op.src_slot for op in offs], dtype=np.int64)
        self.off_host = np.array([op.dst_slot for op in offs], dtype=np.int64)
        self.on_host = np.array([op.src_slot for op in ons], dtype=np.int64)
        self.on_gpu = np.array([op.dst_slot for op in ons], dtype=np.int64)
        self.sizes = np.full(len(ons), self.bs, dtype=np.uint64)
        return len(ops)

    def run_fused(self) -> Callable[[], None]:
        self.copier._launch(fused_plan(self.whole, self.device), self.target)
        return lambda: None

    def run_split(self) -> Callable[[], None]:
        current = torch.cuda.current_stream(self.device)
        k = len(self.off_gpu)
        index = to_device(self.off_gpu, self.device)
        torch.index_select(self.gpu, 0, index, out=self.staging[:k])
        snap = torch.cuda.Event()  # type: ignore[no-untyped-call]
        snap.record(current)
        # Offloads: the snapshot's rows to their host slots, SM stores only.
        items = np.stack([np.full(k, 2, dtype=np.int64), np.arange(k, dtype=np.int64),
                          self.off_host, np.full(k, TOKENS_PER_BLOCK, dtype=np.int64)], 1)
        self.side.wait_event(snap)
        with torch.cuda.stream(self.side):
            plan = FusedPlan(to_device(items, self.device), None, k, self.whole)
            self.stage_copier._launch(plan, self.stage_target)
            done_off = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done_off.record(self.side)
        # Onboards: one DMA a block, queued after the snapshot read the slots they fill.
        self.dma.wait_event(snap)
        bs = self.bs
        dsts = (self.on_gpu * bs + self.gpu.data_ptr()).astype(np.uint64)
        srcs = (self.on_host * bs + self.host.data_ptr()).astype(np.uint64)
        self.cudart(dsts, srcs, self.sizes, self.dma.cuda_stream)
        done_on = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done_on.record(self.dma)

        def wait() -> None:
            current.wait_event(done_off)
            current.wait_event(done_on)
        return wait

    def correct(self, fn: Callable[[], Callable[[], None]]) -> bool:
        """Run ``fn`` once; whether every offloaded and onboarded block arrived whole."""
        before_gpu = self.gpu.clone()
        before_host = self.host.clone()
        fn()()
        torch.cuda.synchronize(self.device)
        off_gpu, off_host = torch.from_numpy(self.off_gpu), torch.from_numpy(self.off_host)
        on_gpu, on_host = torch.from_numpy(self.on_gpu), torch.from_numpy(self.on_host)
        return (torch.equal(self.host[off_host], before_gpu[off_gpu.to(self.device)].cpu())
                and torch.equal(self.gpu[on_gpu.to(self.device)].cpu(), before_host[on_host]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-kib", default="16,64,256")
    ap.add_argument("--total-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--programs", default="264",
                    help="the fused kernel's grid, a comma list to compare (the engine: 8 x SMs)")
    ap.add_argument("--paths", default="fused,split")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    cudart = load_cudart_batch()
    if cudart is None:
        print("no cudaMemcpyBatchAsync here (CUDA runtime < 12.8)")
        return 1
    timer = Timer(device, args.reps, 2)
    total = args.total_mib << 20
    ceiling = ceilings(device, total, timer)
    props = torch.cuda.get_device_properties(device)
    print(f"device {props.name}, torch {torch.__version__}, python {platform.python_version()}; "
          f"ceiling h2d {ceiling['h2d']:.1f} d2h {ceiling['d2h']:.1f} "
          f"both {ceiling['both']:.1f} GB/s")
    rows = []
    streams = (torch.cuda.Stream(device),  # type: ignore[no-untyped-call]
               torch.cuda.Stream(device))  # type: ignore[no-untyped-call]
    for kib in map(int, args.block_kib.split(",")):
        for programs in map(int, args.programs.split(",")):
            case = Case(kib, total, programs, device, cudart, streams)
            for shape in ("both", "step"):
                num_ops = case.use(shape, kib)
                nbytes = num_ops * case.bs
                paths = {"fused": case.run_fused, "split": case.run_split}
                for name in args.paths.split(","):
                    fn = paths[name]
                    ok = case.correct(fn)
                    t = timer(fn)
                    gbps = nbytes / t.device_s / 1e9
                    r = {"block_kib": kib, "shape": shape, "path": name, "programs": programs,
                         "GBps": gbps,
                         "ratio": gbps / ceiling["both"],
                         "cpu_us_per_block": t.cpu_s / num_ops * 1e6,
                         "copy_us_per_block": t.device_s / num_ops * 1e6, "correct": ok}
                    rows.append(r)
                    print(f"{kib:5d} KiB {shape:5s} {name:6s} grid {programs:5d} {gbps:6.1f} GB/s "
                          f"{r['ratio']:.2f} of both-ways ceiling; CPU {r['cpu_us_per_block']:.3f} "
                          f"us/block vs copy {r['copy_us_per_block']:.3f}; correct {ok}")
            del case
            torch.cuda.empty_cache()
    print(json.dumps({"benchmark": "probe_split_direction", "device": props.name,
                      "torch": torch.__version__, "python": platform.python_version(),
                      "total_mib": args.total_mib, "ceiling_GBps": ceiling, "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
