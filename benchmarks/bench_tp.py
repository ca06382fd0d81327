"""Tensor parallelism on two GPUs: each rank's offload and onboard bandwidth and the
aggregate, against the two-GPU ceiling measured in the same run, and the time to first
token of a host hit against a recompute at TP 2.

Bandwidth (one process, ``ShardedTransferEngine`` over one engine per GPU): each rank's
KV shard (8 layers x 4 of 8 KV heads x 128 dims bf16: 16 KiB a token a rank, blocks of 32
tokens, 512 KiB a block a rank) sits at random slots; one plan moves ``--mib-per-rank`` of
blocks each way on every rank. Copies are timed with CUDA events while each GPU's stream
sleeps through the CPU's planning::

    alone      rank r's plan on its GPU only               vs one pinned copy on that GPU
    together   the plan on both ranks at once (per rank)   vs one pinned copy per GPU, at
               and their sum (aggregate)                     once (the two-GPU ceiling)

TTFT (one process per rank, NCCL for activations, gloo for control; one scheduler and
manager on rank 0): the reference decoder of bench_ttft (8 layers, dim 4096, 32 query / 8
KV heads of 128, SwiGLU 14336, bf16; random weights) split over 2 ranks; an 8192-token
prompt whose first 7680 tokens are ``recompute`` (not cached), ``gpu_hit`` (cached on the
GPUs) or ``host_hit`` (offloaded to each rank's host shard, then onboarded layer by layer).
Then, with a remote tier (an in-memory store in each rank's process, each rank's shards
under its rank's namespace; the remote tier needs one memory layout for GPU, host and store,
so these cases run on block-major GPU pools): ``remote_hit``, where an engine computed the
prefix and wrote it through, and a fresh engine (empty cache) fetches it from the store
into host blocks on every rank and onboards it; ``recompute`` and ``host_hit`` again on the
same pools, and the store's read throughput (``get_many`` of the prefix on rank 0).

    python benchmarks/bench_tp.py            # needs 2 GPUs (1 GPU: bandwidth with both
                                             # ranks' storages on it, no TTFT)
    python benchmarks/bench_tp.py --smoke    # tiny, CPU with 2 gloo ranks

Prints tables, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a torch wheel without numpy warns at import
    import torch
    import torch.distributed as dist

from bench_transfer import environment, make_ops
from kvtier import CacheConfig, KVCacheManager
from kvtier.model import LlamaModel, ModelConfig
from kvtier.model.tensor_parallel import TensorParallelLlama
from kvtier.model.tp_engine import CommandChannel, DistributedRanks, TensorParallelLeader, serve
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace
from kvtier.remote.ranks import RemoteShard
from kvtier.remote.tier import RemoteTier
from kvtier.scheduler import Request, Scheduler, SchedulerConfig
from kvtier.storage import KVLayout, KVStorage
from kvtier.transfer.plan import TransferPlan
from kvtier.transfer.torch_engine import TorchTransferEngine
from kvtier.transfer.tp_engine import DistributedTransferEngine, ShardedTransferEngine

TP_SIZE = 2
MIB = 1 << 20
LARGE = ModelConfig(vocab_size=1024, dim=4096, num_layers=8, num_heads=32, num_kv_heads=8,
                    head_dim=128, ffn_dim=14336, dtype="bfloat16")
SMALL = ModelConfig()
CASES = ("recompute", "gpu_hit", "host_hit")
REMOTE_CASES = ("recompute", "host_hit", "remote_hit")  # on block-major GPU pools


# ---- bandwidth, one process ----------------------------------------------------------------


def sync(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def timed(devices: list[torch.device], queue: Callable[[], Callable[[], None]],
          reps: int) -> list[float]:
    """Per device, the median seconds of the work ``queue`` puts on it (``queue`` returns a
    function that makes each device's current stream wait for it). CUDA: events around it,
    each stream asleep while the CPU queues; CPU: wall clock, the same for every device."""
    queue()()  # warm-up
    sync(devices)
    per_device: list[list[float]] = [[] for _ in devices]
    for _ in range(reps):
        sync(devices)
        if devices[0].type != "cuda":
            t0 = time.perf_counter()
            queue()()
            for times in per_device:
                times.append(time.perf_counter() - t0)
            continue
        starts, ends = [], []
        for d in devices:
            with torch.cuda.device(d):
                # ~20 ms at ~2 GHz: longer than the CPU's planning
                torch.cuda._sleep(int(20e-3 * 2e9))  # type: ignore[no-untyped-call]
                start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                start.record(torch.cuda.current_stream(d))
                starts.append(start)
        queue()()
        for d in devices:
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end.record(torch.cuda.current_stream(d))
            ends.append(end)
        sync(devices)
        for times, start, end in zip(per_device, starts, ends, strict=True):
            times.append(start.elapsed_time(end) / 1e3)
    return [statistics.median(t) for t in per_device]


def pinned_copies(devices: list[torch.device], nbytes: int,
                  direction: str) -> Callable[[], Callable[[], None]]:
    """One large copy per device between its own pinned buffer and its memory."""
    pinned = devices[0].type == "cuda"
    pairs = []
    for d in devices:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=d)
        pairs.append((dev, host) if direction == "h2d" else (host, dev))

    def queue() -> Callable[[], None]:
        for (dst, src), d in zip(pairs, devices, strict=True):
            if d.type == "cuda":
                with torch.cuda.device(d):
                    dst.copy_(src, non_blocking=True)
            else:
                dst.copy_(src)
        return lambda: None
    return queue


def bandwidth(args: argparse.Namespace, devices: list[torch.device]) -> dict[str, Any]:
    """Per-rank and aggregate GB/s of the sharded engine, and the ceilings, each way."""
    layout = KVLayout(8, 8, 128, args.tokens_per_block, "bfloat16", "layer_major")
    num_blocks = max(2, args.mib_per_rank * MIB // layout.shard(0, TP_SIZE).bytes_per_block)
    engines = []
    for rank, d in enumerate(devices):
        shard = layout.shard(rank, TP_SIZE)
        host = KVStorage(KVLayout(8, 8, 128, args.tokens_per_block, "bfloat16", "block_major",
                                  rank, TP_SIZE), 2 * num_blocks)
        engines.append(TorchTransferEngine(KVStorage(shard, 2 * num_blocks, d), host))
    sharded = ShardedTransferEngine(engines)
    rank_bytes = num_blocks * layout.shard(0, TP_SIZE).bytes_per_block
    rng = random.Random(0)
    out: dict[str, Any] = {"num_blocks": num_blocks, "rank_bytes": rank_bytes}
    for direction in ("d2h", "h2d"):
        plan = TransferPlan(tuple(make_ops(direction, num_blocks, args.tokens_per_block, rng)))
        alone = []
        for rank, engine in enumerate(engines):

            def one(engine: TorchTransferEngine = engine,
                    plan: TransferPlan = plan) -> Callable[[], None]:
                handle = engine.submit(plan)
                return lambda: engine.wait(handle)
            alone.append(timed([devices[rank]], one, args.reps)[0])

        def both(plan: TransferPlan = plan) -> Callable[[], None]:
            handle = sharded.submit(plan)
            return lambda: sharded.wait(handle)
        together = timed(devices, both, args.reps)
        ceiling_alone = [timed([d], pinned_copies([d], rank_bytes, direction), args.reps)[0]
                         for d in devices]
        ceiling_together = timed(devices, pinned_copies(devices, rank_bytes, direction),
                                 args.reps)
        out[direction] = {
            "alone_GBps": [rank_bytes / s / 1e9 for s in alone],
            "together_GBps": [rank_bytes / s / 1e9 for s in together],
            "aggregate_GBps": TP_SIZE * rank_bytes / max(together) / 1e9,
            "ceiling_alone_GBps": [rank_bytes / s / 1e9 for s in ceiling_alone],
            "ceiling_together_GBps": [rank_bytes / s / 1e9 for s in ceiling_together],
            "ceiling_aggregate_GBps": TP_SIZE * rank_bytes / max(ceiling_together) / 1e9,
        }
    sharded.close()
    return out


def print_bandwidth(bw: dict[str, Any]) -> None:
    print(f"bandwidth: {bw['num_blocks']} blocks of "
          f"{bw['rank_bytes'] // bw['num_blocks'] // 1024} KiB a rank, "
          f"{bw['rank_bytes'] / MIB:.0f} MiB a rank a plan, GPU layer_major / host block_major")
    print(f"{'dir':4} {'rank':>4} {'alone GB/s':>11} {'ceil alone':>11} {'together':>9} "
          f"{'ceil together':>14} {'ratio':>6}")
    for direction in ("d2h", "h2d"):
        r = bw[direction]
        for rank in range(TP_SIZE):
            print(f"{direction:4} {rank:>4} {r['alone_GBps'][rank]:>11.1f} "
                  f"{r['ceiling_alone_GBps'][rank]:>11.1f} {r['together_GBps'][rank]:>9.1f} "
                  f"{r['ceiling_together_GBps'][rank]:>14.1f} "
                  f"{r['together_GBps'][rank] / r['ceiling_together_GBps'][rank]:>6.2f}")
        print(f"{direction:4} {'all':>4} {'':>11} {'':>11} {r['aggregate_GBps']:>9.1f} "
              f"{r['ceiling_aggregate_GBps']:>14.1f} "
              f"{r['aggregate_GBps'] / r['ceiling_aggregate_GBps']:>6.2f}")


# ---- TTFT at TP 2, one process per rank ---------------------------------------------------


def ttft_rank(rank: int, args: argparse.Namespace, rendezvous: str, out: str) -> None:
    """One rank of the TTFT run; rank 0 leads and saves the timings."""
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # NOTE: one process per rank: each takes its share of the cores, so that CPU torch work
    # (planning) does not fight over an oversubscribed thread pool.
    torch.set_num_threads(max(1, (os.cpu_count() or TP_SIZE) // TP_SIZE) if cuda else 1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}",
                            rank=rank, world_size=TP_SIZE)
    try:
        control = dist.new_group(backend="gloo") if cuda else None
        full = LlamaModel(SMALL if args.smoke else LARGE, device)
        shard = TensorParallelLlama(full, rank, TP_SIZE)
        del full
        tpb = args.tokens_per_block
        num_prompt_blocks = args.prompt_tokens // tpb
        cfg = shard.config
        reduce_ms = {n: all_reduce_ms((n, cfg.dim), shard.dtype, device, 2 * cfg.num_layers)
                     for n in (args.prompt_tokens - args.cached_tokens, args.prompt_tokens)}
        sessions = [("layer_major", CASES)]
        if not args.no_remote:
            sessions.append(("block_major", REMOTE_CASES))
        timings: dict[str, Any] = {"all_reduce_ms": reduce_ms}
        for gpu_kind, cases in sessions:
            gpu = KVStorage(shard.kv_layout(tpb, gpu_kind), 2 * num_prompt_blocks + 2, device)
            host = KVStorage(shard.kv_layout(tpb, "block_major"), 2 * num_prompt_blocks)
            engine = TorchTransferEngine(gpu, host, method=args.method, layerwise=not args.whole)
            transfer = DistributedTransferEngine(engine, control)
            channel = CommandChannel(control)
            remote = None
            if "remote_hit" in cases:
                namespace = RemoteNamespace("bench-tp", cfg.kv_layout(tpb, gpu_kind))
                remote = RemoteShard(InMemoryRemoteStore(namespace.for_rank(rank, TP_SIZE)),
                                     gpu, host)
            if rank:
                serve(shard, transfer, channel, remote)
                continue
            leader = Leader(args, shard, transfer, channel, device, remote)
            timings[gpu_kind] = leader.measure(cases)
        if not rank:
            Path(out).write_text(json.dumps(timings))
    finally:
        dist.destroy_process_group()


def all_reduce_ms(shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                  count: int) -> float:
    """Milliseconds of ``count`` all-reduces of a ``shape`` activation (one forward pass's
    worth), the median of 5 after a warm-up; every rank must call it."""
    x = torch.ones(shape, dtype=dtype, device=device)
    times = []
    for _ in range(6):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(count):
            dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


class Leader:
    """Rank 0's cases: a fresh manager and scheduler per case over the same shards."""

    def __init__(self, args: argparse.Namespace, shard: TensorParallelLlama,
                 transfer: DistributedTransferEngine, channel: CommandChannel,
                 device: torch.device, remote: RemoteShard | None = None) -> None:
        self.args = args
        self.shard = shard
        self.transfer = transfer
        self.channel = channel
        self.device = device
        self.tpb = args.tokens_per_block
        self.num_prompt_blocks = args.prompt_tokens // self.tpb
        self.rng = random.Random(0)
        self.remote = remote
        self.last: TensorParallelLeader | None = None
        self.cpu_ms: dict[str, list[dict[str, float]]] = {}
        self.prefix_hashes: list[int] = []  # of the last remote_hit's stored prefix

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.shard.config.vocab_size) for _ in range(n)]

    def leader(self, num_gpu_blocks: int, write_through: bool | None = None
               ) -> TensorParallelLeader:
        """A fresh manager and scheduler; with ``write_through`` set, over the remote tier
        (write-through, or write-back: nothing is written while the step runs)."""
        assert self.transfer.host is not None
        manager = KVCacheManager(CacheConfig(
            tokens_per_block=self.tpb, num_gpu_blocks=num_gpu_blocks,
            num_host_blocks=self.transfer.host.num_blocks,
            hash_algo="xxh3_128" if write_through is None else "sha256"))
        scheduler = Scheduler(manager, SchedulerConfig(
            max_num_tokens=self.args.prompt_tokens + self.tpb,
            capacity_policy="max_utilization"))
        tier = None
        if write_through is not None:
            assert self.remote is not None
            tier = RemoteTier(DistributedRanks(self.remote, self.channel), manager,
                              fetch_deadline_s=60.0,
                              write_policy="write-through" if write_through else "write-back")
        self.last = TensorParallelLeader(self.shard, self.transfer, manager, scheduler,
                                         self.channel, remote=tier)
        return self.last

    def run(self, leader: TensorParallelLeader, prompt: list[int], priority: int | None = None,
            name: str = "r") -> float:
        """Seconds from the step that admits ``prompt`` to its first token."""
        leader.engine.add_request(Request(name, prompt, 1, priority=priority))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        leader.engine.step()  # samples the first token (.tolist() waits for the GPU)
        seconds = time.perf_counter() - t0
        assert not leader.engine.scheduler.has_unfinished()
        self.step_cpu_ms = {k: v * 1e3 for k, v in leader.engine.last_step_seconds.items()}
        return seconds

    def case(self, name: str) -> tuple[float, int]:
        """TTFT of one case, and the tokens it onboarded."""
        n, cached = self.args.prompt_tokens, self.args.cached_tokens
        prefix = self.tokens(cached)
        prompt = prefix + self.tokens(n - cached)
        if name == "recompute":
            return self.run(self.leader(2 * self.num_prompt_blocks + 2), prompt), 0
        if name == "remote_hit":
            writer = self.leader(2 * self.num_prompt_blocks + 2, write_through=True)
            self.run(writer, prefix + self.tokens(n - cached), name="warm")
            assert writer.engine.remote is not None and writer.engine.remote.flush(600.0)
            # A fresh engine: nothing cached here, the prefix is in every rank's store.
            leader = self.leader(2 * self.num_prompt_blocks + 2, write_through=False)
            seconds = self.run(leader, prompt)
            assert leader.engine.remote is not None
            self.prefix_hashes = leader.engine.remote.block_hashes(prefix, None, None)
            fetched = leader.engine.results["r"].num_remote_tokens
            assert fetched == cached, (fetched, cached)
            return seconds, fetched
        if name == "gpu_hit":
            leader = self.leader(2 * self.num_prompt_blocks + 2)
            self.run(leader, prefix + self.tokens(n - cached), name="warm")
            return self.run(leader, prompt), 0
        # The pool holds one request: a low-priority one a block longer pushes the prefix to
        # the host (every rank offloads its shard of it).
        leader = self.leader(self.num_prompt_blocks + 1)
        self.run(leader, prefix + self.tokens(n - cached), name="warm")
        self.run(leader, self.tokens(n + self.tpb - 1), priority=10, name="evictor")
        stats = leader.engine.manager.stats
        before = stats.host.onboarded_blocks
        seconds = self.run(leader, prompt)
        onboarded = (leader.engine.manager.stats.host.onboarded_blocks - before) * self.tpb
        assert onboarded == cached, (onboarded, cached)
        return seconds, onboarded

    def measure(self, cases: tuple[str, ...]) -> dict[str, Any]:
        for name in cases:  # warm-up
            self.case(name)
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        self.cpu_ms = {name: [] for name in cases}
        onboarded = 0
        for _ in range(self.args.reps):
            for name in cases:
                s, n = self.case(name)
                seconds[name].append(s)
                self.cpu_ms[name].append(self.step_cpu_ms)
                onboarded = max(onboarded, n)
        assert self.last is not None
        self.last.stop()
        step_cpu_ms = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                       for name, rows in self.cpu_ms.items()}
        out = {"ttft_ms": {k: statistics.median(v) * 1e3 for k, v in seconds.items()},
               "step_cpu_ms": step_cpu_ms,
               "onboarded_tokens": onboarded,
               "rank_bytes_per_token": self.shard.kv_layout(self.tpb).bytes_per_token}
        if self.remote is not None:
            out["store_read_GBps_per_rank"] = self.store_read_GBps()
        return out

    def store_read_GBps(self) -> float:
        """Rank 0's store read throughput: ``get_many`` of the last stored prefix (values
        checked and decoded), the median of 3."""
        assert self.remote is not None and self.prefix_hashes
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            found = self.remote.store.get_many(self.prefix_hashes)
            seconds = time.perf_counter() - t0
            assert len(found) == len(self.prefix_hashes)
            rates.append(sum(len(v) for v in found.values()) / seconds / 1e9)
        return statistics.median(rates)


def ttft(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ttft.json")
        spawn_args = (args, os.path.join(tmp, "rdzv"), out)
        torch.multiprocessing.spawn(  # type: ignore[attr-defined,no-untyped-call]
            ttft_rank, args=spawn_args, nprocs=TP_SIZE, join=True)
        result: dict[str, Any] = json.loads(Path(out).read_text())
        return result


def print_remote(r: dict[str, Any]) -> dict[str, Any]:
    """The remote cases' table; their figures for the JSON line."""
    ms, cpu = r["ttft_ms"], r["step_cpu_ms"]
    fetched_bytes = r["onboarded_tokens"] * r["rank_bytes_per_token"]
    read_GBps = r["store_read_GBps_per_rank"]
    print(f"remote tier at TP {TP_SIZE} (block-major GPU pools; an in-memory store in each "
          f"rank's process, read at {read_GBps:.2f} GB/s a rank by get_many, values checked):")
    print(f"{'case':10} {'TTFT ms':>9} {'schedule ms':>12} {'submit ms':>10}")
    for name in REMOTE_CASES:
        print(f"{name:10} {ms[name]:>9.2f} {cpu[name]['schedule']:>12.2f} "
              f"{cpu[name]['submit']:>10.2f}")
    print(f"remote_hit fetched {fetched_bytes / MIB:.1f} MiB a rank (the store read alone: "
          f"{fetched_bytes / read_GBps / 1e6:.2f} ms); remote_hit is "
          f"{ms['recompute'] / ms['remote_hit']:.2f}x the speed of a recompute")
    return {"ttft_ms": ms, "step_cpu_ms": cpu, "fetched_bytes_per_rank": fetched_bytes,
            "store_read_GBps_per_rank": read_GBps}


# ---- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib-per-rank", type=int, default=512, help="bytes a plan moves a rank")
    p.add_argument("--prompt-tokens", type=int, default=8192)
    p.add_argument("--cached-tokens", type=int, default=7680)
    p.add_argument("--tokens-per-block", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU with 2 gloo ranks")
    p.add_argument("--no-ttft", action="store_true", help="bandwidth only")
    p.add_argument("--no-bandwidth", action="store_true", help="TTFT only")
    p.add_argument("--no-remote", action="store_true", help="TTFT without the remote cases")
    p.add_argument("--method", default="auto", help="the TTFT ranks' transfer method")
    p.add_argument("--whole", action="store_true",
                   help="TTFT: onboard the whole plan before the forward (not layer by layer)")
    args = p.parse_args(argv)
    if args.smoke:
        args.mib_per_rank, args.reps, args.device = 2, 2, "cpu"
        args.prompt_tokens, args.cached_tokens, args.tokens_per_block = 256, 240, 16
    if args.cached_tokens % args.tokens_per_block or args.prompt_tokens % args.tokens_per_block:
        p.error("prompt and cached tokens must be whole blocks")
    num_gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and num_gpus >= TP_SIZE:
        devices = [torch.device("cuda", r) for r in range(TP_SIZE)]
    elif args.device == "cuda":  # one GPU holding both ranks' storages
        devices = [torch.device("cuda", 0)] * TP_SIZE
    else:
        devices = [torch.device("cpu")] * TP_SIZE
    envs = [environment(d) for d in dict.fromkeys(devices)]
    for env in envs:
        print(f"device: {env['device_name']} ({env['device']}), driver {env.get('driver')}, "
              f"torch {env['torch']}, CUDA {env.get('cuda')}, Python {env['python']}")
    result: dict[str, Any] = {"benchmark": "bench_tp", **envs[0], "smoke": args.smoke,
                              "tp_size": TP_SIZE, "devices": [str(d) for d in devices],
                              "mib_per_rank": args.mib_per_rank, "reps": args.reps,
                              "tokens_per_block": args.tokens_per_block}
    if args.no_bandwidth:
        nbytes = args.mib_per_rank * MIB
        seconds = timed(devices, pinned_copies(devices, nbytes, "h2d"), args.reps)
        h2d_ceiling_GBps = TP_SIZE * nbytes / max(seconds) / 1e9
        print(f"two-GPU h2d ceiling (one {args.mib_per_rank} MiB pinned copy per GPU at once): "
              f"{h2d_ceiling_GBps:.1f} GB/s")
    else:
        result["bandwidth"] = bw = bandwidth(args, devices)
        print_bandwidth(bw)
        h2d_ceiling_GBps = bw["h2d"]["ceiling_aggregate_GBps"]
    result["h2d_ceiling_aggregate_GBps"] = h2d_ceiling_GBps
    if args.no_ttft or (args.device == "cuda" and num_gpus < TP_SIZE):
        print("TTFT at TP 2 not run (--no-ttft, or fewer than 2 GPUs)")
    else:
        timings = ttft(args)
        t = timings["layer_major"]
        ms = t["ttft_ms"]
        onboard_bytes = t["onboarded_tokens"] * t["rank_bytes_per_token"]
        ceiling_ms = onboard_bytes / (h2d_ceiling_GBps / TP_SIZE * 1e9) * 1e3
        overhead_ms = ms["host_hit"] - ms["gpu_hit"]
        cfg = SMALL if args.smoke else LARGE
        print(f"TTFT at TP {TP_SIZE}: {cfg.num_layers} layers, dim {cfg.dim}, {cfg.num_heads} "
              f"heads / {cfg.num_kv_heads} KV heads x {cfg.head_dim}, {cfg.dtype}; prompt "
              f"{args.prompt_tokens} tokens, {args.cached_tokens} cached; blocks of "
              f"{args.tokens_per_block}")
        print(f"TTFT ranks: transfer method {args.method}, "
              f"{'whole plan first' if args.whole else 'layer by layer'}")
        print(f"{'case':10} {'TTFT ms':>9} {'schedule ms':>12} {'submit ms':>10}")
        for name in CASES:
            cpu = t["step_cpu_ms"][name]
            print(f"{name:10} {ms[name]:>9.2f} {cpu['schedule']:>12.2f} {cpu['submit']:>10.2f}")
        print("all-reduce, one forward pass's worth (2 a layer) of [tokens, dim]: "
              + ", ".join(f"{n} tokens {v:.2f} ms"
                          for n, v in timings["all_reduce_ms"].items()))
        print(f"host_hit - gpu_hit = {overhead_ms:.2f} ms for {onboard_bytes / MIB:.1f} MiB a "
              f"rank; at the two-GPU h2d ceiling {ceiling_ms:.2f} ms; host_hit is "
              f"{ms['recompute'] / ms['host_hit']:.1f}x the speed of a recompute")
        result.update(prompt_tokens=args.prompt_tokens, cached_tokens=args.cached_tokens,
                      method=args.method, whole=args.whole, step_cpu_ms=t["step_cpu_ms"],
                      all_reduce_ms=timings["all_reduce_ms"], ttft_ms=ms,
                      onboard_bytes_per_rank=onboard_bytes,
                      onboard_overhead_ms=overhead_ms, onboard_ceiling_ms=ceiling_ms)
        if "block_major" in timings:
            result["remote"] = print_remote(timings["block_major"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
