"""Time to first token of an 8k-token prompt whose first 7.5k tokens are cached on the host
(onboarded, then 512 tokens computed), against a full recompute and a GPU hit, in one run.

The model is the reference decoder at a larger size (8 layers, 32 query and 8 KV heads of
128 dims, dim 4096, SwiGLU 14336, bf16; random weights), driven by the scheduler, the
manager and the torch transfer engine like any request. Each case gets a fresh manager
over the same storages::

    recompute   an empty cache: all 8192 tokens computed
    gpu_hit     the prompt's 7680-token prefix cached on the GPU: 512 computed
    host_hit    the prefix evicted to the host by a low-priority request (whose own blocks
                are then dropped, not offloaded): onboarded, then 512 computed; each layer
                waits only for its own copies (layerwise)
    host_hit_whole  the same, with the whole onboarding done before the forward starts

Target: host_hit - gpu_hit <= 1.1 x the time the onboarded bytes take at the ceiling
(one pinned copy of as many bytes, measured in the same run).

    python benchmarks/bench_ttft.py              # CUDA
    python benchmarks/bench_ttft.py --smoke      # tiny model on CPU

Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a torch wheel without numpy warns at import
    import torch

from bench_transfer import environment
from kvtier import CacheConfig, KVCacheManager
from kvtier.model import LlamaModel, ModelConfig, ModelEngine
from kvtier.scheduler import Request, Scheduler, SchedulerConfig
from kvtier.storage import KVStorage
from kvtier.transfer.torch_engine import TorchTransferEngine

LARGE = ModelConfig(vocab_size=1024, dim=4096, num_layers=8, num_heads=32, num_kv_heads=8,
                    head_dim=128, ffn_dim=14336, dtype="bfloat16")
SMALL = ModelConfig()


class Bench:
    """One model and one pair of storages; a fresh manager and scheduler per case."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.model = LlamaModel(SMALL if args.smoke else LARGE, device)
        self.tpb = args.tokens_per_block
        self.num_prompt_blocks = args.prompt_tokens // self.tpb
        self.num_gpu_blocks = 2 * self.num_prompt_blocks + 2
        cfg = self.model.config
        self.gpu = KVStorage(cfg.kv_layout(self.tpb, args.gpu_layout), self.num_gpu_blocks,
                             device)
        self.host = KVStorage(cfg.kv_layout(self.tpb, args.host_layout),
                              2 * self.num_prompt_blocks)
        self.layerwise = TorchTransferEngine(self.gpu, self.host, method=args.method)
        self.whole = TorchTransferEngine(self.gpu, self.host, method=args.method,
                                         layerwise=False)
        self.cpu_ms: dict[str, float] = {}
        self.rng = random.Random(0)

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.model.config.vocab_size) for _ in range(n)]

    def engine(self, num_gpu_blocks: int, layerwise: bool = True) -> ModelEngine:
        manager = KVCacheManager(CacheConfig(tokens_per_block=self.tpb,
                                             num_gpu_blocks=num_gpu_blocks,
                                             num_host_blocks=self.host.num_blocks))
        # max_utilization: no blocks held back for decoding, so the pool's size is exact.
        budget = self.args.prompt_tokens + self.tpb
        scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=budget,
                                                       capacity_policy="max_utilization"))
        transfer = self.layerwise if layerwise else self.whole
        return ModelEngine(self.model, manager, scheduler, transfer)

    def run(self, engine: ModelEngine, prompt: list[int], priority: int | None = None,
            name: str = "r") -> float:
        """Seconds from the step that admits ``prompt`` to its first token."""
        engine.add_request(Request(name, prompt, 1, priority=priority))
        self._sync()
        t0 = time.perf_counter()
        engine.step()  # samples the first token (its .tolist() waits for the GPU)
        seconds = time.perf_counter() - t0
        assert not engine.scheduler.has_unfinished()
        return seconds

    def case(self, name: str) -> tuple[float, int]:
        """TTFT of one case, and the tokens it onboarded."""
        n, cached = self.args.prompt_tokens, self.args.cached_tokens
        prefix = self.tokens(cached)
        prompt = prefix + self.tokens(n - cached)
        if name == "recompute":
            engine = self.engine(self.num_gpu_blocks)
            return self.run(engine, prompt), 0
        if name == "gpu_hit":
            engine = self.engine(self.num_gpu_blocks)
            self.run(engine, prefix + self.tokens(n - cached), name="warm")
            return self.run(engine, prompt), 0
        # The pool holds one request: a low-priority one a block longer pushes the whole
        # prefix to the host.
        engine = self.engine(self.num_prompt_blocks + 1, layerwise=name == "host_hit")
        self.run(engine, prefix + self.tokens(n - cached), name="warm")
        self.run(engine, self.tokens(n + self.tpb - 1), priority=10, name="evictor")
        onboarded = engine.manager.stats.host.onboarded_blocks
        seconds = self.run(engine, prompt)
        if name == "host_hit":
            self.cpu_ms = {k: v * 1e3 for k, v in engine.last_step_seconds.items()}
        num_onboarded = (engine.manager.stats.host.onboarded_blocks - onboarded) * self.tpb
        assert num_onboarded == cached, (num_onboarded, cached)
        return seconds, num_onboarded

    def ceiling_ms(self, nbytes: int) -> float:
        """One pinned host->GPU copy of ``nbytes`` (the median of 5), in ms."""
        pinned = self.device.type == "cuda"
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        times = []
        for _ in range(6):
            self._sync()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            self._sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]) * 1e3

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-tokens", type=int, default=8192)
    p.add_argument("--cached-tokens", type=int, default=7680)
    p.add_argument("--tokens-per-block", type=int, default=32)
    p.add_argument("--gpu-layout", default="layer_major")
    p.add_argument("--host-layout", default="block_major")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--method", default="auto", help="the transfer engine's method")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny model and prompt, CPU ok")
    args = p.parse_args(argv)
    if args.smoke:
        args.prompt_tokens, args.cached_tokens, args.tokens_per_block, args.reps = 256, 240, 16, 2
    if args.cached_tokens % args.tokens_per_block or args.prompt_tokens % args.tokens_per_block:
        p.error("prompt and cached tokens must be whole blocks")
    device = torch.device(args.device)
    env = environment(device)
    bench = Bench(args, device)
    cases = ("recompute", "gpu_hit", "host_hit", "host_hit_whole")
    for name in cases:  # warm-up: kernels, allocator, pinned staging
        bench.case(name)
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    num_onboarded = 0
    for _ in range(args.reps):
        for name in cases:
            s, onboarded = bench.case(name)
            seconds[name].append(s)
            num_onboarded = max(num_onboarded, onboarded)
    ttft_ms = {name: statistics.median(v) * 1e3 for name, v in seconds.items()}
    onboard_bytes = num_onboarded * bench.gpu.layout.bytes_per_token
    ceiling_ms = bench.ceiling_ms(onboard_bytes)
    overhead_ms = ttft_ms["host_hit"] - ttft_ms["gpu_hit"]
    cfg = bench.model.config
    print(f"device: {env['device_name']} ({env['device']}), driver {env.get('driver')}, "
          f"torch {env['torch']}, CUDA {env.get('cuda')}")
    print(f"model: {cfg.num_layers} layers, dim {cfg.dim}, {cfg.num_heads} heads / "
          f"{cfg.num_kv_heads} KV heads x {cfg.head_dim}, {cfg.dtype}; prompt "
          f"{args.prompt_tokens} tokens, {args.cached_tokens} cached, blocks of "
          f"{args.tokens_per_block}; GPU {args.gpu_layout}, host {args.host_layout}")
    print(f"{'case':15} {'TTFT ms':>9}")
    for name in cases:
        print(f"{name:15} {ttft_ms[name]:>9.2f}")
    ratio = overhead_ms / ceiling_ms
    stats = bench.layerwise.stats  # auto may stage a plan whose host slots come in runs
    path: str = bench.layerwise.path
    if stats.num_gather_plans:
        path = f"{path}, dma_gather for {stats.num_gather_plans} of {stats.num_plans} plans"
    whole_ms = ttft_ms["host_hit_whole"] - ttft_ms["gpu_hit"]
    print(f"onboarding: {onboard_bytes / 2**20:.1f} MiB; host_hit - gpu_hit = "
          f"{overhead_ms:.2f} ms (whole plan first: {whole_ms:.2f} ms); one pinned copy of "
          f"those bytes {ceiling_ms:.2f} ms ({onboard_bytes / ceiling_ms / 1e6:.1f} GB/s); "
          f"ratio {ratio:.2f} (target <= 1.1); copy path: {path}")
    print(f"CPU in the host_hit step: schedule {bench.cpu_ms.get('schedule', 0):.2f} ms, "
          f"submit {bench.cpu_ms.get('submit', 0):.2f} ms")
    print(json.dumps({"benchmark": "bench_ttft", **env, "smoke": args.smoke,
                      "prompt_tokens": args.prompt_tokens, "cached_tokens": args.cached_tokens,
                      "tokens_per_block": args.tokens_per_block, "gpu_layout": args.gpu_layout,
                      "host_layout": args.host_layout, "reps": args.reps,
                      "method": args.method, "ttft_ms": ttft_ms,
                      "onboard_bytes": onboard_bytes, "onboard_overhead_ms": overhead_ms,
                      "ceiling_ms": ceiling_ms, "overhead_ratio": ratio,
                      "whole_overhead_ms": whole_ms, "host_hit_cpu_ms": bench.cpu_ms,
                      "path": path}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
