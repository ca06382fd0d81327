"""Onboard and offload bandwidth of TorchTransferEngine for scattered blocks, against one
large pinned copy on the same card in the same run (the ceiling).

Blocks of 16 KiB .. 4 MiB (all layers, K and V; 4 layers x 8 KV heads x 128 dims bf16, so
16 KiB a token and 1 .. 256 tokens a block) sit at random slots of pools twice the size of
one transfer; a plan moves ``--total-mib`` of them GPU->host ("d2h"), host->GPU ("h2d"),
half each way at once between unrelated slots ("both"), or a serving step ("step"): half
the bytes offloaded from GPU slots, then as many onboarded into those same slots, so every
onboard must follow the offload of its slot. "both" and "step" count against both
ceilings run at once. ``--host-runs`` puts the host slots in runs of consecutive slots, as
a step's offloads take them from the host's free queue. On CUDA the copies are timed with
events while the caller's stream sleeps through the CPU's planning, so ``ratio`` is the
copy's; ``wall_ratio`` times the same plan from ``submit`` on an idle device to the end of
its copies (lower where the CPU sets the pace); ``submit_ms`` is the CPU time of
``submit`` (planning included), also per block (``cpu_us_per_block``) next to the copy's
time per block. Plans carry their ops as arrays (``PlanColumns``);
``columns_us_per_block`` is what reading those arrays off the ops costs a producer that
records only ops.

``--trace DIR`` also profiles one "step" plan per method (torch.profiler: a Chrome trace
per method in DIR, and a timeline of its kernels and copies printed).

    python benchmarks/bench_transfer.py                      # CUDA, method auto
    python benchmarks/bench_transfer.py --methods auto,kernel,dma,staged
    python benchmarks/bench_transfer.py --smoke              # seconds, on CPU too

Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a torch wheel without numpy warns at import
    import torch

from kvtier.storage import KVLayout, KVStorage
from kvtier.tier import Tier
from kvtier.transfer.dma_gather import STAGING_BYTES
from kvtier.transfer.engine import TransferError
from kvtier.transfer.plan import OpKind, PlanColumns, TransferOp, TransferPlan
from kvtier.transfer.torch_engine import TorchTransferEngine

KIB = 1024
MIB = 1024 * KIB
BYTES_PER_TOKEN = 16 * KIB  # 2 (K, V) x 4 layers x 8 heads x 128 dims x 2 bytes
CEILING = {"d2h": "d2h", "h2d": "h2d", "both": "both", "step": "both"}


def environment(device: torch.device) -> dict[str, Any]:
    """Card, driver and software the figures were measured with."""
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "device": str(device)}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30, check=False)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["driver"] = None
    return env


class Timing(NamedTuple):
    """Medians: device seconds (copies only), CPU seconds of ``fn``, and wall seconds from
    calling ``fn`` on an idle device to its copies' end (what a caller waits for when the
    CPU, not the link, sets the pace)."""

    device_s: float
    cpu_s: float
    wall_s: float


class Timer:
    """Times the device work queued by ``fn``: CUDA events around it, with the caller's
    stream asleep while the CPU queues it (so CPU planning is not counted), then again
    wall-clock without the sleep; wall-clock only on CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int) -> None:
        self.device = device
        self.reps = reps
        self.warmup = warmup

    def __call__(self, fn: Callable[[], Callable[[], None]]) -> Timing:
        """``fn`` queues the work and returns a function that makes the caller's stream
        wait for it."""
        warm_s = [0.0]
        for _ in range(self.warmup):
            t0 = time.perf_counter()
            fn()()
            warm_s.append(time.perf_counter() - t0)
            self._sync()
        device_s: list[float] = []
        cpu_s: list[float] = []
        for _ in range(self.reps):
            self._sync()
            if self.device.type != "cuda":
                t0 = time.perf_counter()
                fn()()
                cpu_s.append(time.perf_counter() - t0)
                device_s.append(cpu_s[-1])
                continue
            stream = torch.cuda.current_stream(self.device)
            # NOTE: from the last warm-up only (the first compiles kernels): a method that
            # blocks the CPU would count the sleep.
            sleep_s = 2 * max(warm_s[-1], 5e-3) + 1e-3
            torch.cuda._sleep(int(sleep_s * 2e9))  # about 2 GHz: cycles of the SM clock
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            t0 = time.perf_counter()
            wait = fn()
            cpu_s.append(time.perf_counter() - t0)
            wait()
            end.record(stream)
            end.synchronize()
            device_s.append(start.elapsed_time(end) / 1e3)
        wall_s = list(device_s) if self.device.type != "cuda" else []
        for _ in range(self.reps if self.device.type == "cuda" else 0):
            self._sync()
            t0 = time.perf_counter()
            fn()()
            self._sync()
            wall_s.append(time.perf_counter() - t0)
        return Timing(statistics.median(device_s), statistics.median(cpu_s),
                      statistics.median(wall_s))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def ceilings(device: torch.device, nbytes: int, timer: Timer) -> dict[str, float]:
    """GB/s of one large pinned copy each way, and of one each way at once."""
    pinned = device.type == "cuda"
    host_a = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host_b = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dev_a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev_b = torch.empty(nbytes, dtype=torch.uint8, device=device)
    streams = [torch.cuda.Stream(device) for _ in range(2)] if pinned else []

    def one(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], Callable[[], None]]:
        def run() -> Callable[[], None]:
            dst.copy_(src, non_blocking=True)
            return lambda: None
        return run

    def both() -> Callable[[], None]:
        if not streams:
            dev_a.copy_(host_a)
            host_b.copy_(dev_b)
            return lambda: None
        current = torch.cuda.current_stream(device)
        events = []
        for stream, (dst, src) in zip(streams, ((dev_a, host_a), (host_b, dev_b)), strict=True):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            events.append(event)

        def wait() -> None:
            for event in events:
                current.wait_event(event)
        return wait

    h2d = timer(one(dev_a, host_a)).device_s
    d2h = timer(one(host_b, dev_b)).device_s
    bidir = timer(both).device_s
    return {"h2d": nbytes / h2d / 1e9, "d2h": nbytes / d2h / 1e9, "both": 2 * nbytes / bidir / 1e9}


def make_ops(direction: str, num_blocks: int, tpb: int, rng: random.Random,
             host_run: int = 1) -> list[TransferOp]:
    """``num_blocks`` whole-block copies between random slots of pools of 2x that size; the
    host slots in runs of ``host_run`` consecutive slots (at random places), as a step's
    offloads take them from the host's free queue."""
    gpu_slots = rng.sample(range(2 * num_blocks), num_blocks)
    num_runs = -(-num_blocks // host_run)
    # Runs start on multiples of host_run, all inside the pool of 2 * num_blocks slots.
    starts = rng.sample(range(0, 2 * num_blocks - host_run + 1, host_run), num_runs)
    host_slots = [start + i for start in starts for i in range(host_run)][:num_blocks]
    pairs = list(zip(gpu_slots, host_slots, strict=True))
    if direction == "d2h":
        return [TransferOp(OpKind.OFFLOAD, Tier.GPU, g, Tier.HOST, h, tpb) for g, h in pairs]
    if direction == "h2d":
        return [TransferOp(OpKind.ONBOARD, Tier.HOST, h, Tier.GPU, g, tpb) for g, h in pairs]
    half = num_blocks // 2
    if direction == "step":  # offload victims, onboard into the slots they free
        return ([TransferOp(OpKind.OFFLOAD, Tier.GPU, g, Tier.HOST, h, tpb)
                 for g, h in pairs[:half]]
                + [TransferOp(OpKind.ONBOARD, Tier.HOST, h, Tier.GPU, g, tpb)
                   for (g, _), (_, h) in zip(pairs[:half], pairs[half:], strict=True)])
    return ([TransferOp(OpKind.OFFLOAD, Tier.GPU, g, Tier.HOST, h, tpb) for g, h in pairs[:half]]
            + [TransferOp(OpKind.ONBOARD, Tier.HOST, h, Tier.GPU, g, tpb)
               for g, h in pairs[half:]])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block-kib", default="16,64,256,1024,4096",
                   help="block sizes in KiB, comma-separated")
    p.add_argument("--layouts", default="block_major,layer_major,layer_major/block_major",
                   help="GPU layout kinds, or GPU/host pairs, comma-separated")
    p.add_argument("--directions", default="d2h,h2d,both,step")
    p.add_argument("--methods", default="auto",
                   help="auto, dma_batch, fused, kernel, dma, staged (commas)")
    p.add_argument("--total-mib", type=int, default=1024, help="bytes moved by one plan")
    p.add_argument("--host-runs", default="1",
                   help="host slots in runs of this many consecutive slots (1: all at random; "
                        "the Mooncake conversation trace's steps average 5.8-7.9), commas")
    p.add_argument("--gather-streams", type=int, default=2,
                   help="dma_gather: streams (and staging buffers) per direction")
    p.add_argument("--staging-mib", type=int, default=STAGING_BYTES >> 20,
                   help="dma_gather: MiB of one staging buffer")
    p.add_argument("--submit-threads", default="0",
                   help="dma_gather (and auto): 1 makes the DMAs on a thread per stream, 0 on "
                        "the caller's; commas to compare")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds, CPU ok")
    p.add_argument("--trace", metavar="DIR", help="profile one step plan per method into DIR")
    p.add_argument("--trace-block-kib", default="16,1024",
                   help="block sizes to trace (first layout only), comma-separated")
    args = p.parse_args(argv)
    if args.smoke:
        args.block_kib, args.total_mib, args.reps, args.warmup = "16,64", 2, 2, 1
    return args


def print_row(r: dict[str, Any]) -> None:
    print(f"{r['layout']:24} {r['block_kib']:>5} KiB {r['host_run']:>3} {r['direction']:>5} "
          f"{r['method']:>10} {r['path']:>10} {r['submit_threads']:>3} "
          f"{r['num_blocks']:>7} {r['ms']:>8.2f} {r['GBps']:>7.1f} {r['ratio']:>6.2f} "
          f"{r['wall_ratio']:>6.2f} "
          f"{r['submit_ms']:>10.2f} {r['cpu_us_per_block']:>8.3f} "
          f"{r['columns_us_per_block']:>8.3f} {r['copy_us_per_block']:>8.3f} "
          f"{r['calls_per_plan']:>7.1f}")


def trace_step(engine: TorchTransferEngine, plan: TransferPlan, path: str) -> list[dict[str, Any]]:
    """Profile one submit of ``plan`` (after a warm-up); write a Chrome trace to ``path``
    and return the device activities (kernels, copies) in start order, times in us from
    the first one."""
    from torch.profiler import ProfilerActivity, profile

    engine.synchronize(engine.submit(plan))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        handle = engine.submit(plan)
        engine.synchronize(handle)
    prof.export_chrome_trace(path)
    rows = []
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        start = e.time_range.start
        rows.append({"name": e.name[:60], "start_us": start,
                     "dur_us": e.time_range.end - start})
    rows.sort(key=lambda r: r["start_us"])
    t0 = rows[0]["start_us"] if rows else 0.0
    for r in rows:
        r["start_us"] -= t0
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    print(f"device: {env['device_name']} ({env['device']}), driver {env.get('driver')}, "
          f"torch {env['torch']}, CUDA {env.get('cuda')}")
    timer = Timer(device, args.reps, args.warmup)
    total = args.total_mib * MIB
    ceiling = ceilings(device, total, timer)
    print(f"ceiling, one {args.total_mib} MiB pinned copy: h2d {ceiling['h2d']:.1f} GB/s, "
          f"d2h {ceiling['d2h']:.1f} GB/s, both at once {ceiling['both']:.1f} GB/s")
    print(f"{'layout (GPU/host)':24} {'block':>9} {'run':>3} {'dir':>5} {'method':>10} "
          f"{'path':>10} {'thr':>3} {'blocks':>7} "
          f"{'ms':>8} {'GB/s':>7} {'ratio':>6} {'wall r':>6} {'submit ms':>10} {'CPU us/b':>8} "
          f"{'cols us/b':>8} {'copy us/b':>8} {'calls':>7}")
    rng = random.Random(0)
    rows = []
    traced: set[tuple[str, int, str]] = set()
    timelines: dict[str, list[dict[str, Any]]] = {}
    if args.trace:
        import os

        os.makedirs(args.trace, exist_ok=True)
    for kinds in args.layouts.split(","):
        gpu_kind, _, host_kind = kinds.partition("/")
        host_kind = host_kind or gpu_kind
        for block_kib in (int(x) for x in args.block_kib.split(",")):
            tpb = block_kib * KIB // BYTES_PER_TOKEN
            layout = KVLayout(4, 8, 128, tpb, "bfloat16", gpu_kind)
            num_blocks = max(2, total // layout.bytes_per_block)
            gpu = KVStorage(layout, 2 * num_blocks, device)
            host = KVStorage(KVLayout(4, 8, 128, tpb, "bfloat16", host_kind), 2 * num_blocks)
            for direction, host_run in ((d, int(r)) for r in args.host_runs.split(",")
                                        for d in args.directions.split(",")):
                ops = tuple(make_ops(direction, num_blocks, tpb, rng, host_run))
                # The plan carries its ops as arrays too (PlanColumns), as a producer that
                # holds slot lists records them; reading them off the ops is timed apart.
                t0 = time.perf_counter()
                plan = TransferPlan(ops, PlanColumns.of(ops))
                columns_s = time.perf_counter() - t0
                for method, threads in ((m, int(t)) for m in args.methods.split(",")
                                        for t in (args.submit_threads.split(",")
                                                  if m in ("auto", "dma_gather") else "0")):
                    try:
                        engine = TorchTransferEngine(
                            gpu, host, method=method, gather_streams=args.gather_streams,
                            staging_bytes=args.staging_mib * MIB, submit_threads=bool(threads))
                    except ValueError as exc:
                        print(f"skip {kinds} {block_kib} KiB {method}: {exc}", file=sys.stderr)
                        continue

                    def run(engine: TorchTransferEngine = engine,
                            plan: TransferPlan = plan) -> Callable[[], None]:
                        handle = engine.submit(plan)
                        return lambda: engine.wait(handle)

                    try:
                        seconds, cpu_seconds, wall_seconds = timer(run)
                    except TransferError as exc:
                        print(f"failed {kinds} {block_kib} KiB {direction} {method}: {exc}",
                              file=sys.stderr)
                        continue
                    num_ops = len(plan)
                    nbytes = num_ops * layout.bytes_per_block
                    gbps = nbytes / seconds / 1e9
                    stats = engine.stats
                    rows.append({
                        "layout": f"{gpu_kind}/{host_kind}", "block_kib": block_kib,
                        "direction": direction, "host_run": host_run, "method": method,
                        "submit_threads": threads,
                        "num_blocks": num_ops, "path": engine.plan_path(plan),
                        "bytes": nbytes, "ms": seconds * 1e3,
                        "GBps": gbps, "ratio": gbps / ceiling[CEILING[direction]],
                        "wall_ms": wall_seconds * 1e3,
                        "wall_ratio": nbytes / wall_seconds / 1e9 / ceiling[CEILING[direction]],
                        "submit_ms": cpu_seconds * 1e3,
                        "cpu_us_per_block": cpu_seconds * 1e6 / num_ops,
                        "columns_us_per_block": columns_s * 1e6 / num_ops,
                        "copy_us_per_block": seconds * 1e6 / num_ops,
                        "calls_per_plan": (stats.num_kernel_groups + stats.num_staged_groups
                                           + stats.num_dma_copies + stats.num_fused_launches
                                           + stats.num_dma_batches)
                        / max(1, stats.num_plans),
                    })
                    print_row(rows[-1])
                    key = (kinds, block_kib, method)  # the first host-run length only
                    if (args.trace and direction == "step" and key not in traced
                            and kinds == args.layouts.split(",")[0]
                            and str(block_kib) in args.trace_block_kib.split(",")):
                        traced.add(key)
                        name = kinds.replace("/", "-")
                        path = f"{args.trace}/step_{name}_{block_kib}KiB_{method}.json"
                        traced_engine = TorchTransferEngine(
                            gpu, host, method=method, gather_streams=args.gather_streams,
                            staging_bytes=args.staging_mib * MIB)
                        timelines[f"{kinds} {block_kib} KiB {method}"] = tl = trace_step(
                            traced_engine, plan, path)
                        print(f"  timeline of one step plan ({method}, {path}):")
                        for r in tl[:16]:
                            print(f"    {r['start_us']:>9.1f} us +{r['dur_us']:>8.1f} us  "
                                  f"{r['name']}")
                        if tl:
                            span_us = tl[-1]["start_us"] + tl[-1]["dur_us"]
                            s = traced_engine.stats
                            print(f"  per plan: {s.bytes_d2h / s.num_plans / MIB:.0f} MiB to "
                                  f"the host and {s.bytes_h2d / s.num_plans / MIB:.0f} MiB back "
                                  f"in {span_us:.0f} us of device activity: "
                                  f"{(s.bytes_d2h + s.bytes_h2d) / s.num_plans / span_us / 1e3:.1f}"
                                  f" GB/s both ways together")
            del gpu, host
    print(json.dumps({"benchmark": "bench_transfer", **env, "smoke": args.smoke,
                      "total_mib": args.total_mib, "reps": args.reps,
                      "gather_streams": args.gather_streams, "staging_mib": args.staging_mib,
                      "ceiling_GBps": ceiling, "results": rows, "timelines": timelines}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
