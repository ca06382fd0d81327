"""Sweep the fused copy kernel's launch shape (issue 13, item 1): warps a program, bytes a
loop turn, turns a unit of work, programs a multiprocessor.

    python benchmarks/sweep_fused.py [--warps 4,8] [--block-bytes 8192,16384]
        [--chunk-blocks 1,2,4] [--programs-per-sm 4,8,16] [bench_transfer options...]

For every combination of the lists (their cross product), the engine's ``fused`` path is
built with that shape, every byte of one small ``step`` plan is checked against the
blocks it copies from, and ``bench_transfer.py`` runs with the options that follow (by
default 16 and 64 KiB blocks, both layouts, ``both`` and ``step`` plans at random slots,
512 MiB, method ``fused``): each run measures its own two-way ceiling, so each row's
ratio is against the link of the same minutes. The shape in ``kvtier.transfer.fused``
today is marked ``*``. Prints a table (one row per shape and plan) and one JSON line last.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import platform
import random
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_transfer

from kvtier.storage import KVLayout, KVStorage
from kvtier.tier import Tier
from kvtier.transfer import fused
from kvtier.transfer.plan import OpKind, TransferOp, TransferPlan
from kvtier.transfer.torch_engine import TorchTransferEngine

BENCH_DEFAULTS = ["--block-kib", "16,64", "--layouts", "block_major,layer_major",
                  "--directions", "both,step", "--methods", "fused", "--total-mib", "512"]


class Shape(tuple[int, int, int, int]):
    """(warps, block bytes, chunk blocks, programs per SM)."""

    def __str__(self) -> str:
        return f"w{self[0]} b{self[1]} c{self[2]} p{self[3]}"


def current_shape() -> Shape:
    return Shape((fused.NUM_WARPS, fused.BLOCK_BYTES, fused.CHUNK_BLOCKS, 8))


@contextlib.contextmanager
def shaped(shape: Shape) -> Any:
    """The engine's fused path with ``shape`` while the block runs."""
    warps, block_bytes, chunk_blocks, per_sm = shape
    saved = fused.NUM_WARPS, fused.CHUNK_BLOCKS, TorchTransferEngine._fused_copier

    def copier(self: TorchTransferEngine) -> fused.FusedCopier:
        num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return fused.FusedCopier(*self._targets(), self._tpb, per_sm * num_sms,
                                 block_bytes=block_bytes)

    fused.NUM_WARPS, fused.CHUNK_BLOCKS = warps, chunk_blocks
    TorchTransferEngine._fused_copier = copier  # type: ignore[method-assign,unused-ignore]
    try:
        yield
    finally:
        fused.NUM_WARPS, fused.CHUNK_BLOCKS = saved[:2]
        TorchTransferEngine._fused_copier = saved[2]  # type: ignore[method-assign]


def check_bytes(device: torch.device, layout_kind: str) -> bool:
    """One ``step`` plan of 64 KiB blocks (two of them partial): every byte where it goes."""
    rng = random.Random(1)
    tpb = 4
    layout = KVLayout(4, 8, 128, tpb, "bfloat16", layout_kind)
    gpu, host = KVStorage(layout, 96, device), KVStorage(layout, 96)
    for storage in (gpu, host):
        for t in storage.tensors:
            t.copy_(torch.randn(t.shape, dtype=torch.float32).to(t.dtype))
    gpu_slots, host_slots = rng.sample(range(96), 64), rng.sample(range(96), 64)
    tokens = [tpb] * 62 + [1, 3]
    ops = ([TransferOp(OpKind.OFFLOAD, Tier.GPU, g, Tier.HOST, h, tpb)
            for g, h in zip(gpu_slots[:32], host_slots[:32], strict=True)]
           + [TransferOp(OpKind.ONBOARD, Tier.HOST, h, Tier.GPU, g, n)
              for g, h, n in zip(gpu_slots[:32], host_slots[32:], tokens[32:], strict=True)])
    before_gpu = [gpu.block(s).cpu() for s in range(96)]
    before_host = [host.block(s).clone() for s in range(96)]
    engine = TorchTransferEngine(gpu, host, method="fused")
    engine.wait(engine.submit(TransferPlan(tuple(ops))))
    for op in ops:
        if op.kind is OpKind.OFFLOAD:
            if not torch.equal(host.block(op.dst_slot), before_gpu[op.src_slot]):
                return False
        else:
            got, want = gpu.block(op.dst_slot).cpu(), before_host[op.src_slot]
            n = op.num_tokens
            if not torch.equal(got[:, :, :n], want[:, :, :n]):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--warps", default="4")
    p.add_argument("--block-bytes", default="8192")
    p.add_argument("--chunk-blocks", default="2")
    p.add_argument("--programs-per-sm", default="8")
    args, bench_args = p.parse_known_args(argv)
    if not torch.cuda.is_available():
        print("sweep_fused.py: the fused kernel needs a CUDA GPU (and Triton); none here",
              file=sys.stderr)
        return 2
    device = torch.device("cuda")
    shapes = [Shape(s) for s in itertools.product(
        *(tuple(int(x) for x in value.split(",")) for value in
          (args.warps, args.block_bytes, args.chunk_blocks, args.programs_per_sm)))]
    print(f"machine: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"Python {platform.python_version()}; bench_transfer "
          f"{' '.join(BENCH_DEFAULTS + bench_args)}")
    print(f"{'shape':22} {'layout':24} {'block':>6} {'plan':>5} {'GB/s':>7} {'ceiling':>8} "
          f"{'ratio':>6} {'CPU us/b':>8} {'bytes ok':>8}")
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        with shaped(shape):
            ok = all(check_bytes(device, kind) for kind in ("block_major", "layer_major"))
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                bench_transfer.main(BENCH_DEFAULTS + bench_args)
        result = json.loads(out.getvalue().strip().splitlines()[-1])
        for r in result["results"]:
            ceiling = result["ceiling_GBps"][bench_transfer.CEILING[r["direction"]]]
            mark = "*" if shape == current_shape() else ""
            print(f"{str(shape) + mark:22} {r['layout']:24} {r['block_kib']:>4}Ki "
                  f"{r['direction']:>5} {r['GBps']:>7.1f} {ceiling:>8.1f} {r['ratio']:>6.3f} "
                  f"{r['cpu_us_per_block']:>8.3f} {ok!s:>8}", flush=True)
            rows.append({"shape": list(shape), "layout": r["layout"],
                         "block_kib": r["block_kib"], "direction": r["direction"],
                         "GBps": r["GBps"], "ceiling_GBps": ceiling, "ratio": r["ratio"],
                         "cpu_us_per_block": r["cpu_us_per_block"], "bytes_ok": ok})
    print(json.dumps({"benchmark": "sweep_fused", "device": torch.cuda.get_device_name(device),
                      "torch": torch.__version__, "python": platform.python_version(),
                      "bench_args": BENCH_DEFAULTS + bench_args, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
