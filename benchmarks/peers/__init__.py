"""Peer harness: vLLM's and SGLang's prefix-cache block managers on kvtier's benchmark loop.

Each peer module (``vllm_peer``, ``sglang_peer``) exposes

    available() -> str | None    # None if the peer imports here, else a one-line reason
    run(prompts, *, tokens_per_block, num_gpu_blocks, in_flight) -> dict

and runs the same loop as ``benchmarks/bench_manager.py``: for each prompt in order, create the
peer's request object from the tokens, look up the cached prefix, allocate blocks for the whole
prompt (reusing the prefix) and, once more than ``in_flight`` are live, free the request admitted
``in_flight`` earlier (its full blocks stay cached). Only the peer's calls are timed.

The peers need their own interpreter (``.venv-peers``, see README.md); importing this package
never imports vllm, sglang or torch.

    .venv-peers/bin/python -m benchmarks.peers [--requests 2000] [--blocks 16384] [--sha256]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRACE = Path(os.environ.get("KVTIER_TRACES", REPO.parent / "shared/data/traces")) / (
    "mooncake_conversation_trace.jsonl"
)


def result(name: str, version: str, num_requests: int, num_blocks: int, num_prompt_tokens: int,
           num_reused_tokens: int, seconds: float, **extra: object) -> dict[str, object]:
    """The result dict every peer returns (extra keys go after the common ones)."""
    return {
        "name": name,
        "version": version,
        "num_requests": num_requests,
        "num_blocks": num_blocks,
        "num_prompt_tokens": num_prompt_tokens,
        "num_reused_tokens": num_reused_tokens,
        "hit_rate": num_reused_tokens / num_prompt_tokens if num_prompt_tokens else 0.0,
        "seconds": seconds,
        "us_per_block": seconds / num_blocks * 1e6 if num_blocks else math.nan,
        **extra,
    }


def import_error(do_import: Callable[[], None]) -> str | None:
    """None if ``do_import`` succeeds, else a one-line reason (a peer's ``available``)."""
    try:
        do_import()
    except Exception as e:
        return one_line(e)
    return None


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def prepare_torch_imports() -> None:
    """Let ``import torchvision`` succeed with the CPU torch of ``.venv-peers``.

    transformers (imported by vllm and sglang) and sglang's config modules import torchvision.
    PyPI's torchvision wheels are CUDA builds whose C++ ops cannot load against the CPU torch,
    and torchvision then fails at import on ``register_fake("torchvision::nms")``. Declaring the
    two op schemas it registers fakes for lets the pure-Python parts import; neither block
    manager uses torchvision. No-op when torchvision imports (or is absent).
    """
    try:
        import torchvision
    except ImportError:
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        import torch

        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        for op in ("nms", "qnms"):
            with contextlib.suppress(RuntimeError):  # RuntimeError: already defined
                torch.library.define(
                    f"torchvision::{op}",
                    "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                )
        import torchvision  # noqa: F401


def mooncake_prompts(path: Path = TRACE, limit: int | None = None) -> Iterator[list[int]]:
    """Token lists of the trace's requests (hash id h = tokens h*512 .. h*512+511, cut)."""
    with path.open() as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                return
            rec = json.loads(line)
            tokens: list[int] = []
            for h in rec["hash_ids"]:
                tokens.extend(range(h * 512, h * 512 + 512))
            del tokens[rec["input_length"]:]
            yield tokens


def _child(peer: str, trace: str, limit: int | None, kw: dict[str, object]) -> None:
    """Run one peer in this (fresh) interpreter and print its result as the last stdout line."""
    import importlib

    mod = importlib.import_module(f"benchmarks.peers.{peer}_peer")
    why = mod.available()
    out = {"unavailable": why} if why else mod.run(mooncake_prompts(Path(trace), limit), **kw)
    print(json.dumps(out), flush=True)


def run_isolated(peer: str, *, trace: Path = TRACE, limit: int | None = None,
                 python: str = sys.executable, **kw: object) -> dict[str, object]:
    """``run`` of one peer in its own interpreter, so peers never share a heap or imports.

    Returns the peer's result dict, or ``{"unavailable": reason}``.
    """
    import subprocess

    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.peers import _child;"
            f" _child({peer!r}, {str(trace)!r}, {limit!r}, {kw!r})")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        err = out.stderr.strip().splitlines()
        return {"unavailable": f"exit {out.returncode}: {err[-1] if err else ''}"}
    res: dict[str, object] = json.loads(lines[-1])
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="vLLM and SGLang block managers on the trace")
    ap.add_argument("--requests", type=int, default=2000, help="0 = whole trace")
    ap.add_argument("--blocks", type=int, default=16_384)
    ap.add_argument("--tokens-per-block", type=int, default=32)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--sha256", action="store_true", help="also run vLLM with sha256 hashing")
    ap.add_argument("--trace", type=Path, default=TRACE)
    args = ap.parse_args(argv)
    limit = args.requests or None
    kw: dict[str, object] = {"tokens_per_block": args.tokens_per_block,
                             "num_gpu_blocks": args.blocks, "in_flight": args.in_flight}
    runs: list[tuple[str, dict[str, object]]] = [("vllm", {})]
    if args.sha256:
        runs.append(("vllm", {"hash_fn": "sha256"}))
    runs.append(("sglang", {}))
    rows = []
    for peer, extra in runs:  # one after the other, each in a fresh interpreter
        r = run_isolated(peer, trace=args.trace, limit=limit, **kw, **extra)
        if "unavailable" in r:
            print(f"{peer}: unavailable: {r['unavailable']}", file=sys.stderr)
            continue
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{'impl':20} {'requests':>9} {'blocks':>9} {'hit rate':>9} {'seconds':>8} "
          f"{'us/block':>9} {'cpu us/block':>12}")
    for r in rows:
        label = f"{r['name']} {r['version']}" + (f" {r['hash']}" if "hash" in r else "")
        cpu_us = float(r["cpu_seconds"]) / int(r["num_blocks"]) * 1e6  # type: ignore[arg-type]
        print(f"{label:20} {r['num_requests']:>9} {r['num_blocks']:>9} {r['hit_rate']:>9.4f} "
              f"{r['seconds']:>8.2f} {r['us_per_block']:>9.3f} {cpu_us:>12.3f}")


if __name__ == "__main__":
    main()
