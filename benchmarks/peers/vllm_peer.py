"""vLLM's v1 ``KVCacheManager`` (prefix caching on) on kvtier's benchmark loop.

One full-attention KV cache group, built as vLLM's own unit tests do
(``tests/v1/core/test_prefix_caching.py``: ``KVCacheConfig`` with one ``KVCacheGroupSpec`` of a
``FullAttentionSpec``, no tensors). Per prompt, all timed:

    req = Request(request_id, prompt_token_ids, sampling_params, pooling_params=None,
                  block_hasher=get_request_block_hasher(block_size, hash_fn))  # hashes blocks
    blocks, num_computed, _ = manager.get_computed_blocks(req)     # capped at len - 1
    manager.allocate_slots(req, len - num_computed, num_computed, blocks)
    ... manager.free(req)                                          # ``in_flight`` prompts later

Hashing is ``vllm.utils.hashing.xxhash`` (xxh3-128 over pickle; vLLM's ``xxhash`` option) by
default, or ``sha256`` (vLLM's default ``prefix_caching_hash_algo``).
Note: vLLM keeps block 0 as its null block, so ``num_gpu_blocks - 1`` blocks are usable.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterable

from benchmarks.peers import import_error, prepare_torch_imports, result

HASH_FNS = ("xxhash", "sha256", "xxhash_cbor", "sha256_cbor")


def _import() -> None:
    # Keep vLLM's logger off stdout (callers read the result from stdout); warnings still reach
    # stderr through logging's last-resort handler.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    prepare_torch_imports()
    import vllm.v1.core.kv_cache_manager
    import vllm.v1.request  # noqa: F401


def available() -> str | None:
    """None if vLLM's block manager imports here, else a one-line reason."""
    return import_error(_import)


def run(prompts: Iterable[list[int]], *, tokens_per_block: int, num_gpu_blocks: int,
        in_flight: int, hash_fn: str = "xxhash") -> dict[str, object]:
    _import()
    import importlib.metadata

    import torch
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request

    tpb = tokens_per_block
    fn = get_hash_fn_by_name(hash_fn)
    init_none_hash(fn)
    config = KVCacheConfig(
        num_blocks=num_gpu_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"],
                FullAttentionSpec(block_size=tpb, num_kv_heads=1, head_size=1,
                                  dtype=torch.float32),
            )
        ],
    )
    manager = KVCacheManager(
        config,
        max_model_len=num_gpu_blocks * tpb,
        scheduler_block_size=tpb,
        hash_block_size=tpb,
        enable_caching=True,
    )
    block_hasher = get_request_block_hasher(tpb, fn)
    sampling_params = SamplingParams(max_tokens=1)  # shared: its construction is not the cache's

    live: deque[Request] = deque()
    clock, cpu_clock = time.perf_counter, time.thread_time
    seconds = cpu_seconds = 0.0
    num_requests = num_blocks = num_tokens = num_reused = num_rejected = 0
    for i, tokens in enumerate(prompts):
        n = len(tokens)
        c0 = cpu_clock()  # outside the wall-clock span
        t0 = clock()
        req = Request(
            request_id=str(i),
            prompt_token_ids=tokens,
            sampling_params=sampling_params,
            pooling_params=None,
            block_hasher=block_hasher,
        )
        computed, num_computed, _ = manager.get_computed_blocks(req)
        new_blocks = manager.allocate_slots(req, n - num_computed, num_computed, computed)
        if new_blocks is not None:
            live.append(req)
        done = None
        if len(live) > in_flight:
            done = live.popleft()
            manager.free(done)
        seconds += clock() - t0
        cpu_seconds += cpu_clock() - c0
        # The caller's request (and its token list) dies here, not timed: what a cache
        # manager keeps alive is its own cost, what the caller holds is not (all peers alike).
        del req, done
        num_requests += 1
        if new_blocks is None:  # pool full of live blocks: not admitted
            num_rejected += 1
            continue
        num_blocks += math.ceil(n / tpb)
        num_tokens += n
        num_reused += num_computed
    c0 = cpu_clock()
    t0 = clock()
    while live:
        manager.free(live.popleft())
    seconds += clock() - t0
    cpu_seconds += cpu_clock() - c0
    assert manager.block_pool.get_num_free_blocks() == num_gpu_blocks - 1  # all but null block

    return result(
        "vllm", importlib.metadata.version("vllm"), num_requests, num_blocks, num_tokens,
        num_reused, seconds, hash=hash_fn, num_rejected=num_rejected,
        cpu_seconds=cpu_seconds,
    )
