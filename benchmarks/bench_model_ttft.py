"""TTFT of the reference model for the next turn of a long conversation: its prefix found
on the GPU, brought back from the host tier, or recomputed.

    prompt  [ earlier turns (prefix_tokens)           | new turn (new_tokens) ]
    gpu     reused in place                             computed
    host    onboarded (host -> GPU copies, per layer)   computed
    none    computed                                    computed

Shapes: ``smollm2`` (SmolLM2-135M: 30 layers, dim 576, 9/3 heads) and ``llama-8b``
(Llama-3-8B: 32 layers, dim 4096, 32/8 heads, ffn 14336, vocab 128256). Weights are
random (TTFT does not depend on their values; the GGUF does not fit the GPU machine's
upload limit), or the real SmolLM2 with ``--checkpoint PATH``. Prints a table, then one
JSON line.

    python benchmarks/bench_model_ttft.py --models smollm2,llama-8b --prefix-tokens 4096
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
from typing import Any

import torch

from kvtier import CacheConfig, KVCacheManager
from kvtier.blocks import cdiv
from kvtier.model import LlamaModel, ModelConfig, ModelEngine
from kvtier.model.checkpoint import load_model
from kvtier.scheduler import Request, Scheduler, SchedulerConfig
from kvtier.storage import KVStorage
from kvtier.transfer.torch_engine import TorchTransferEngine

SHAPES = {
    "smollm2": ModelConfig(vocab_size=49152, dim=576, num_layers=30, num_heads=9,
                           num_kv_heads=3, head_dim=64, ffn_dim=1536, rope_theta=100000.0,
                           tie_word_embeddings=True),
    "llama-8b": ModelConfig(vocab_size=128256, dim=4096, num_layers=32, num_heads=32,
                            num_kv_heads=8, head_dim=128, ffn_dim=14336, rope_theta=500000.0),
    "tiny": ModelConfig(),
}
MODES = ("gpu", "host", "none")


def run_one(engine: ModelEngine, rid: str, tokens: list[int]) -> float:
    engine.add_request(Request(rid, tokens, 1))
    engine.run()
    ttft = engine.results.pop(rid).ttft_s
    assert ttft is not None
    return ttft


def measure(model: LlamaModel, mode: str, prefix: list[int], new: list[int], tpb: int,
            rng: random.Random) -> tuple[float, int]:
    """TTFT (s) of ``prefix + new`` with the prefix in ``mode``; and the tokens reused."""
    prompt = prefix + new
    blocks = cdiv(len(prompt) + 1, tpb) + 1
    manager = KVCacheManager(CacheConfig(tokens_per_block=tpb, num_gpu_blocks=blocks,
                                         num_host_blocks=2 * blocks))
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=1 << 20,
                                                   max_chunk_tokens=1 << 20))
    layout = model.config.kv_layout(tpb)
    gpu = KVStorage(layout, blocks, model.device)
    host = KVStorage(layout, 2 * blocks)
    engine = ModelEngine(model, manager, scheduler, TorchTransferEngine(gpu, host))
    if mode != "none":
        run_one(engine, "prefix", prefix)
    if mode == "host":  # a request that needs the whole pool pushes the prefix to the host
        filler = [rng.randrange(model.config.vocab_size) for _ in range((blocks - 2) * tpb)]
        run_one(engine, "filler", filler)
    engine.add_request(Request("turn", prompt, 1))
    engine.run()
    r = engine.results["turn"]
    assert r.ttft_s is not None
    # The prefix really came from that tier (all but a partial last block), or from none.
    if mode == "none":
        assert r.num_reused_tokens == 0, r
    else:
        got = r.num_gpu_tokens if mode == "gpu" else r.num_host_tokens
        assert got >= len(prefix) // 2, (mode, got, len(prefix))
    return r.ttft_s, r.num_reused_tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,llama-8b")
    ap.add_argument("--checkpoint", default=None,
                    help="a real checkpoint for the smollm2 row (GGUF or HF directory)")
    ap.add_argument("--prefix-tokens", default="1024,4096")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--tokens-per-block", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        if name == "smollm2" and args.checkpoint:
            model = load_model(args.checkpoint, dtype, device)
            weights = f"real ({args.checkpoint})"
        else:
            cfg = SHAPES[name]
            model = LlamaModel(ModelConfig(**{**{f: getattr(cfg, f) for f in cfg.__slots__},
                                              "dtype": dtype}), device)
            weights = "random"
        for n in (int(x) for x in args.prefix_tokens.split(",")):
            vocab = model.config.vocab_size
            prefix = [rng.randrange(vocab) for _ in range(n)]
            new = [rng.randrange(vocab) for _ in range(args.new_tokens)]
            measure(model, "none", prefix[:64], new[:8], args.tokens_per_block, rng)  # warm-up
            for mode in MODES:
                times = [measure(model, mode, prefix, new, args.tokens_per_block, rng)
                         for _ in range(args.repeats)]
                rows.append({"model": name, "weights": weights, "prefix_tokens": n,
                             "new_tokens": args.new_tokens, "prefix_in": mode,
                             "reused_tokens": times[0][1],
                             "ttft_ms": round(1000 * statistics.median(t for t, _ in times), 2)})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    machine = (torch.cuda.get_device_name() if device == "cuda" else platform.processor()
               or platform.machine())
    print(f"machine: {machine}; torch {torch.__version__}; cuda {torch.version.cuda}; "
          f"python {sys.version.split()[0]}; dtype {dtype}; tokens/block "
          f"{args.tokens_per_block}; median of {args.repeats}")
    print(f"{'model':<10} {'weights':<8} {'prefix':>7} {'new':>5} {'prefix in':<10} "
          f"{'reused':>7} {'TTFT ms':>9}")
    for r in rows:
        print(f"{r['model']:<10} {r['weights'][:8]:<8} {r['prefix_tokens']:>7} "
              f"{r['new_tokens']:>5} {r['prefix_in']:<10} {r['reused_tokens']:>7} "
              f"{r['ttft_ms']:>9.2f}")
    print(json.dumps({"machine": machine, "torch": torch.__version__, "dtype": dtype,
                      "device": device, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
