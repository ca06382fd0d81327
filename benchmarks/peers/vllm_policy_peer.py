"""vLLM 0.33.0's CPU-offload cache policies (``LRUCachePolicy``, ``ARCCachePolicy``) on a
block-id request stream, driven through vLLM's own ``CPUOffloadingManager`` in the order its
offloading connector calls it. Runs in the peers' interpreter (``.venv-peers``).

Per request, one at a time (every transfer finishes before the next request, so nothing is
ever pending across requests)::

    ctx = ReqContext(req_id); ctx.set_offload_key_position(key_j, (j + 1) * tokens_per_block)
    manager.on_new_request(ctx)
    k = number of leading keys whose manager.lookup(key, ctx) is HIT
    manager.prepare_load(keys[:k], ctx); manager.complete_load(keys[:k], ctx)   # the hits
    for key in keys[k:]:                                  # stored block by block, in order,
        out = manager.prepare_store([key], ctx)           # as the connector stores blocks;
    manager.complete_store(stored keys, ctx)              # evict(n, protected={key}) inside
    manager.on_request_finished(ctx)                      # the policy's recency/frequency

``prepare_store`` returns ``None`` when no chunk can be evicted (all pending): that block is
then not cached (counted as ``num_store_failures``). Keys are the lab's integer block ids as
``make_offload_key(id.to_bytes(8), group 0)``.

    .venv-peers/bin/python benchmarks/peers/vllm_policy_peer.py STREAM.json POLICY CAPACITY

``STREAM.json``: ``{"tokens_per_block": int, "requests": [[num_tokens, [id, ...]], ...]}``.
Prints one JSON line: policy, version, hit rate, hit and prompt tokens, CPU seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(requests: list[tuple[int, list[int]]], policy: str, capacity: int,
        tokens_per_block: int) -> dict[str, object]:
    """Replay ``requests`` (prompt length, block ids) through vLLM's manager and ``policy``."""
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    sys.path.insert(0, str(REPO))
    from benchmarks.peers import prepare_torch_imports

    prepare_torch_imports()
    import importlib.metadata

    from vllm.v1.kv_offload.base import LookupResult, ReqContext, make_offload_key
    from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

    manager = CPUOffloadingManager(num_chunks=capacity, cache_policy=policy)
    tpb = tokens_per_block
    num_hit_tokens = num_tokens = num_blocks = num_store_failures = 0
    c0 = time.process_time()
    for index, (n, ids) in enumerate(requests):
        keys = [make_offload_key(i.to_bytes(8, "big"), 0) for i in ids[:capacity]]
        ctx = ReqContext(req_id=str(index))
        for j, key in enumerate(keys):
            ctx.set_offload_key_position(key, (j + 1) * tpb)
        manager.on_new_request(ctx)
        k = 0
        for key in keys:
            if manager.lookup(key, ctx) is not LookupResult.HIT:
                break
            k += 1
        if k:
            manager.prepare_load(keys[:k], ctx)
            manager.complete_load(keys[:k], ctx)
        stored = []
        for key in keys[k:]:
            out = manager.prepare_store([key], ctx)
            if out is None:
                num_store_failures += 1
                continue
            stored.extend(out.keys_to_store)
        if stored:
            manager.complete_store(stored, ctx)
        manager.on_request_finished(ctx)
        num_hit_tokens += min(k * tpb, n)
        num_tokens += n
        num_blocks += len(keys)
    cpu_s = time.process_time() - c0
    return {
        "name": f"vllm-{policy}",
        "version": importlib.metadata.version("vllm"),
        "hit_rate": num_hit_tokens / num_tokens if num_tokens else 0.0,
        "num_hit_tokens": num_hit_tokens,
        "num_tokens": num_tokens,
        "num_blocks": num_blocks,
        "num_store_failures": num_store_failures,
        "cpu_s": cpu_s,
    }


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        raise SystemExit("usage: vllm_policy_peer.py STREAM.json lru|arc CAPACITY")
    stream = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    requests = [(int(n), [int(i) for i in ids]) for n, ids in stream["requests"]]
    print(json.dumps(run(requests, args[1], int(args[2]), int(stream["tokens_per_block"]))))


if __name__ == "__main__":
    main()
