"""kvtier inside vLLM 0.33.0, measured through vLLM's real Scheduler + OffloadingConnector on
CPU (no model runs: the benchmark plays the workers and reports every transfer done).

1. Hit rate inside vLLM's CPU tier. One engine per policy: vLLM's own ``lru`` and ``arc``,
   and kvtier's policies through ``cache_policy_module_path`` (``kvtier-<name>``). The same
   synthetic chat stream (``kvtier.sim.SyntheticChat``: Zipf system prompts, multi-turn
   sessions) is served one request at a time, and the GPU prefix cache is reset after each
   request, so every reused token was loaded from the CPU tier. CPU tier sizes: a fraction
   of the stream's distinct full blocks. Hit rate = loaded prompt tokens / prompt tokens.
2. The Redis tier (``KvtierRedisTier``) on a real redis-server: engine 1 serves prompts and
   cascades them to Redis, engine 2 (its own caches) serves the same prompts and loads them
   from Redis. Per kind (existence probe batch, store job, load job): latency p50/p99 and
   throughput, from the tier's own samples; and the engine step (``schedule()``) p50/p99,
   which holds every lookup: it must not grow with the network.

Each step is followed by a 1 ms sleep standing in for the model's forward pass (which is
when a real engine's tier I/O thread runs).

Runs in .venv-vllm (``.ci/vllm-env``):

    .venv-vllm/bin/python benchmarks/bench_vllm_tier.py                  # 400 requests
    .venv-vllm/bin/python benchmarks/bench_vllm_tier.py --smoke          # seconds

Redis: ``KVTIER_REDIS_URL`` if set, else a private redis-server on a free port. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

BLOCK_SIZE = 16
MODEL_CONFIG = {
    "architectures": ["OPTForCausalLM"], "model_type": "opt", "activation_function": "relu",
    "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "do_layer_norm_before": True,
    "ffn_dim": 64, "hidden_size": 32, "word_embed_proj_dim": 32, "num_attention_heads": 2,
    "num_hidden_layers": 2, "max_position_embeddings": 16384, "vocab_size": 50272,
    "torch_dtype": "float16", "use_cache": True}
VLLM_POLICIES = ("lru", "arc")


def model_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), "kvtier-bench-vllm-model")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(MODEL_CONFIG, f)
    return path


class Engine:
    """vLLM's scheduler with its connector; ``serve`` plays the workers for one request."""

    def __init__(self, extra: dict[str, Any], *, num_gpu_blocks: int, num_kv_heads: int = 1,
                 head_size: int = 1, max_tokens_per_step: int = 8192) -> None:
        import torch
        from vllm.config import (
            CacheConfig,
            DeviceConfig,
            KVTransferConfig,
            ModelConfig,
            SchedulerConfig,
            VllmConfig,
        )
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import (
            FullAttentionSpec,
            KVCacheConfig,
            KVCacheGroupSpec,
        )
        from vllm.v1.structured_output import StructuredOutputManager

        model = ModelConfig(model=model_dir(), dtype="float16", seed=0, skip_tokenizer_init=True)
        sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=max_tokens_per_step,
                                max_model_len=16384, enable_chunked_prefill=True,
                                is_encoder_decoder=False)
        cache = CacheConfig(block_size=BLOCK_SIZE, gpu_memory_utilization=0.9,
                            enable_prefix_caching=True)
        cache.kv_cache_layout = "LBNHC"
        ktc = KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                               kv_connector_extra_config=extra,
                               engine_id=f"kvtier-bench-{uuid.uuid4().hex[:12]}")
        cfg = VllmConfig(model_config=model, scheduler_config=sched, cache_config=cache,
                         kv_transfer_config=ktc, device_config=DeviceConfig("cpu"))
        spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=num_kv_heads,
                                 head_size=head_size, dtype=torch.float16)
        kv_cfg = KVCacheConfig(num_blocks=num_gpu_blocks, kv_cache_tensors=[],
                               kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
        cfg.cache_config.num_gpu_blocks = num_gpu_blocks
        self.scheduler = Scheduler(vllm_config=cfg, kv_cache_config=kv_cfg, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(cfg),
                                   block_size=BLOCK_SIZE, hash_block_size=BLOCK_SIZE)
        self.jobs: dict[int, str | None] = {}
        self.step_s: list[float] = []
        self.forward_s = 0.001  # the model's time per step, played by a sleep
        self._num_requests = 0

    @property
    def manager(self) -> Any:
        return self.scheduler.connector.connector_scheduler.manager

    def _step(self) -> dict[str, int]:
        from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
            OffloadingWorkerMetadata,
        )
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        start = time.perf_counter()
        out = self.scheduler.schedule()
        self.step_s.append(time.perf_counter() - start)
        meta = out.kv_connector_metadata
        reqs = list(out.num_scheduled_tokens)
        kv_out = None
        if self.jobs:
            kv_out = KVConnectorOutput(
                finished_recving={r for r in self.jobs.values() if r is not None} or None,
                kv_connector_worker_meta=OffloadingWorkerMetadata(
                    completed_jobs=dict.fromkeys(self.jobs, 1)))
        self.scheduler.update_from_output(out, ModelRunnerOutput(
            req_ids=reqs, req_id_to_index={r: i for i, r in enumerate(reqs)},
            sampled_token_ids=[[7] for _ in reqs], logprobs=None, prompt_logprobs_dict={},
            pooler_output=None, kv_connector_output=kv_out))
        self.jobs = {j: t.req_id for j, t in meta.load_jobs.items()}
        self.jobs.update(dict.fromkeys(meta.store_jobs))
        return dict(out.num_scheduled_tokens)

    def serve(self, prompt: list[int], *, reset_gpu_cache: bool) -> int:
        """Serve ``prompt`` (one output token) to the end of its transfers; the prompt
        tokens it did not compute (loaded)."""
        from vllm import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher
        from vllm.v1.request import Request

        params = SamplingParams(max_tokens=1)
        params.update_from_generation_config({}, 2)
        rid = f"r{self._num_requests}"
        self._num_requests += 1
        self.scheduler.add_request(Request(
            request_id=rid, prompt_token_ids=prompt, sampling_params=params,
            pooling_params=None, block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256)))
        computed = 0
        for _ in range(100_000):
            s = self.scheduler
            if not (s.has_unfinished_requests() or self.jobs
                    or s.connector.has_pending_push_work() or self.manager.has_pending_work()):
                break
            computed += self._step().get(rid, 0)
            # NOTE: a real step runs the model between schedule() calls, which frees the
            # GIL for the tier's I/O thread; an empty busy loop would starve it.
            time.sleep(self.forward_s)
        if reset_gpu_cache:
            assert self.scheduler.reset_prefix_cache(), "GPU prefix cache reset refused"
        return len(prompt) - computed

    def shutdown(self) -> None:
        self.scheduler.shutdown()


def chat_prompts(num_requests: int, max_prompt_tokens: int) -> list[list[int]]:
    from kvtier.sim import SyntheticChat

    return [r.prompt for r in SyntheticChat(num_requests=num_requests,
                                             max_prompt_tokens=max_prompt_tokens)]


def page_bytes() -> int:
    from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion

    return int(SharedOffloadRegion.BLOCK_SIZE_ALIGNMENT)


def hit_rates(prompts: list[list[int]], policies: Sequence[str],
              fractions: Sequence[float]) -> list[dict[str, Any]]:
    distinct = {tuple(p[: (i + 1) * BLOCK_SIZE]) for p in prompts
                for i in range(len(p) // BLOCK_SIZE)}
    longest = max(len(p) for p in prompts) // BLOCK_SIZE + 2
    num_prompt_tokens = sum(len(p) for p in prompts)
    rows = []
    for fraction in fractions:
        num_chunks = max(longest, int(fraction * len(distinct)))
        for policy in policies:
            extra: dict[str, Any] = {"cpu_bytes_to_use": num_chunks * page_bytes(),
                                     "eviction_policy": policy}
            if policy not in VLLM_POLICIES:
                extra["cache_policy_module_path"] = "kvtier.integrations.vllm"
            engine = Engine(extra, num_gpu_blocks=longest + 8)
            start = time.perf_counter()
            loaded = sum(engine.serve(p, reset_gpu_cache=True) for p in prompts)
            seconds = time.perf_counter() - start
            engine.shutdown()
            rows.append({"capacity_fraction": fraction, "cpu_chunks": num_chunks,
                         "policy": policy, "hit_rate": loaded / num_prompt_tokens,
                         "loaded_tokens": loaded, "seconds": seconds,
                         "us_per_step": 1e6 * statistics.mean(engine.step_s)})
    return rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def redis_tier(url: str, prompts: list[list[int]], num_kv_heads: int,
               head_size: int) -> dict[str, Any]:
    """Engine 1 stores ``prompts`` through the Redis tier, engine 2 loads them."""
    tier = {"type": "KvtierRedisTier", "module_path": "kvtier.integrations.vllm", "url": url,
            "tenant": f"bench-{uuid.uuid4().hex}", "max_lookup_wait_s": 5.0}
    longest = max(len(p) for p in prompts) // BLOCK_SIZE + 2
    results: dict[str, Any] = {}
    for name, tiers in (("no secondary tier", []), ("redis tier", [tier])):
        steps = []
        loaded = 0
        stats = None
        for engine_index in range(2 if tiers else 1):
            engine = Engine({"spec_name": "TieringOffloadingSpec",
                             "cpu_bytes_to_use": 2 * longest * _page(num_kv_heads, head_size),
                             "secondary_tiers": tiers},
                            num_gpu_blocks=longest + 8, num_kv_heads=num_kv_heads,
                            head_size=head_size)
            for p in prompts:
                got = engine.serve(p, reset_gpu_cache=True)
                if engine_index == 1:
                    loaded += got
            steps += engine.step_s
            if tiers:
                [secondary] = engine.manager.secondary_tiers
                stats = secondary.stats if engine_index == 0 else stats
                if engine_index == 1:
                    results["load_stats"] = secondary.stats
            engine.shutdown()
        results[name] = {"step_ms_p50": 1e3 * _percentile(steps, 0.5),
                         "step_ms_p99": 1e3 * _percentile(steps, 0.99)}
        if tiers:
            results["store_stats"] = stats
            results["loaded_tokens"] = loaded
    return results


def _page(num_kv_heads: int, head_size: int) -> int:
    raw = 2 * BLOCK_SIZE * num_kv_heads * head_size * 2
    align = page_bytes()
    return -(-raw // align) * align


def _start_redis() -> tuple[str, subprocess.Popen[bytes] | None]:
    url = os.environ.get("KVTIER_REDIS_URL")
    if url:
        return url, None
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return f"redis://127.0.0.1:{port}/0", proc
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-prompt-tokens", type=int, default=4000)
    parser.add_argument("--fractions", default="0.03,0.10")
    parser.add_argument("--policies", default="lru,arc,kvtier-priority-lru,kvtier-lru,"
                        "kvtier-arc,kvtier-s3fifo,kvtier-predict")
    parser.add_argument("--redis-requests", type=int, default=100)
    parser.add_argument("--redis-prompt-tokens", type=int, default=1024)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.redis_requests, args.fractions = 20, 5, "0.10"
        args.policies = "lru,kvtier-predict"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import vllm
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import init_none_hash

    init_none_hash(sha256)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    prompts = chat_prompts(args.requests, args.max_prompt_tokens)
    fractions = [float(f) for f in args.fractions.split(",")]
    policies = args.policies.split(",")
    print(f"vLLM {vllm.__version__} on {machine}")
    print(f"1. CPU-tier hit rate: synthetic chat, {len(prompts)} requests, "
          f"{sum(map(len, prompts))} prompt tokens, block {BLOCK_SIZE}, one at a time, "
          "GPU prefix cache reset after each")
    rows = hit_rates(prompts, policies, fractions)
    print(f"  {'capacity':>9} {'chunks':>7}  {'policy':<22} {'hit rate':>8} {'us/step':>8}")
    for r in rows:
        print(f"  {r['capacity_fraction']:>9.0%} {r['cpu_chunks']:>7}  {r['policy']:<22} "
              f"{r['hit_rate']:>8.4f} {r['us_per_step']:>8.0f}")

    url, proc = _start_redis()
    try:
        size = args.redis_prompt_tokens
        redis_prompts = [[10_000_000 + i * 100_000 + t for t in range(size)]
                         for i in range(args.redis_requests)]
        redis = redis_tier(url, redis_prompts, args.num_kv_heads, args.head_size)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    page = _page(args.num_kv_heads, args.head_size)
    store, load = redis["store_stats"], redis["load_stats"]
    kinds = {"probe (batch)": (load.probe_s, None), "store job": (store.store_s, store),
             "load job": (load.load_s, load)}
    print(f"2. Redis tier: {args.redis_requests} prompts of {size} tokens, pages of "
          f"{page} B ({size // BLOCK_SIZE} per prompt), redis-server on loopback")
    print(f"  {'kind':<14} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'MB/s':>8}")
    redis_rows = []
    for kind, (samples, st) in kinds.items():
        mb_s = None
        if st is not None and sum(samples):
            nbytes = st.bytes_stored if kind == "store job" else st.bytes_loaded
            mb_s = nbytes / sum(samples) / 1e6
        row = {"kind": kind, "n": len(samples), "p50_ms": 1e3 * _percentile(samples, 0.5),
               "p99_ms": 1e3 * _percentile(samples, 0.99), "mb_per_s": mb_s}
        redis_rows.append(row)
        print(f"  {kind:<14} {row['n']:>5} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
              f"{'' if mb_s is None else f'{mb_s:8.0f}':>8}")
    for name in ("no secondary tier", "redis tier"):
        r = redis[name]
        print(f"  engine step ({name}): p50 {r['step_ms_p50']:.3f} ms, "
              f"p99 {r['step_ms_p99']:.3f} ms")
    expected = args.redis_requests * (size - 1)  # vLLM computes at least the last token
    print(f"  engine 2 loaded {redis['loaded_tokens']} of {expected} loadable prompt tokens "
          f"from Redis; lookups {load.num_lookups} ({load.num_retries} RETRY, "
          f"{load.num_lookups_given_up} given up)")
    print(json.dumps({
        "bench": "vllm_tier", "vllm": vllm.__version__, "machine": machine,
        "inputs": {k: v for k, v in vars(args).items()},
        "hit_rate": rows, "redis": redis_rows,
        "step_ms": {k: redis[k] for k in ("no secondary tier", "redis tier")},
        "redis_loaded_tokens": redis["loaded_tokens"], "redis_expected_tokens": expected}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
