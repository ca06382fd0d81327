"""SGLang's ``RadixCache`` (paged, ``page_size = tokens_per_block``) on kvtier's benchmark loop.

Simulated mode as in SGLang's ``RadixCache.create_simulated`` (no request-to-token pool), with
a stand-in token allocator: it only counts free KV slots (``num_gpu_blocks * page_size``) and
takes back what ``evict`` frees. Per prompt, all timed:

    key = RadixKey(array("q", tokens))                   # the request object
    m = cache.match_prefix(MatchPrefixParams(key=RadixKey(ids, limit=len - 1)))
    cache.inc_lock_ref(m.last_device_node)
    allocate ceil(len / page) * page - m.device_prefix_len slots,
        calling cache.evict(EvictParams(num_tokens=short)) when the pool is short
    r = cache.insert(InsertParams(key=key, value=slot_ids))   # full pages of the prompt
    give back r.prefix_len - m.device_prefix_len duplicate slots (as SGLang does)
    cache.inc_lock_ref(r.last_device_node); cache.dec_lock_ref(m.last_device_node)
    ... cache.dec_lock_ref(r.last_device_node), give back the partial last page  # later

The lock moves to the inserted leaf as in SGLang's ``cache_unfinished_req``, so a live request's
own pages cannot be evicted (as vLLM's ref counts keep them). The values inserted are views of
one preallocated int64 tensor (there is no KV pool); the tree copies what it keeps.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from benchmarks.peers import import_error, prepare_torch_imports, result


def _import() -> None:
    prepare_torch_imports()
    import sglang.srt.mem_cache.base_prefix_cache
    import sglang.srt.mem_cache.radix_cache  # noqa: F401


def available() -> str | None:
    """None if SGLang's radix cache imports here, else a one-line reason."""
    return import_error(_import)


class _SlotCounter:
    """Stand-in for SGLang's token-to-KV allocator: counts free slots, nothing else."""

    device = "cpu"

    def __init__(self, num_slots: int) -> None:
        self.num_free = num_slots

    def free_segment(self, indices: Any, start_pos: int = 0) -> None:
        self.num_free += len(indices)


def run(prompts: Iterable[list[int]], *, tokens_per_block: int, num_gpu_blocks: int,
        in_flight: int) -> dict[str, object]:
    _import()
    import importlib.metadata
    from array import array

    import torch
    from sglang.srt.mem_cache.base_prefix_cache import (
        EvictParams,
        InsertParams,
        MatchPrefixParams,
    )
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    page = tokens_per_block
    slots = _SlotCounter(num_gpu_blocks * page)
    cache = RadixCache.create_simulated(mock_allocator=slots, page_size=page)
    slot_ids = torch.arange(1 << 20, dtype=torch.int64)

    live: deque[tuple[Any, int]] = deque()  # (locked node, partial-page slots held)
    clock, cpu_clock = time.perf_counter, time.thread_time
    seconds = cpu_seconds = 0.0
    num_requests = num_blocks = num_tokens = num_reused = num_rejected = 0
    for tokens in prompts:
        n = len(tokens)
        full = n // page * page
        if full > len(slot_ids):  # not timed: the stand-in's buffer of slot ids
            slot_ids = torch.arange(2 * full, dtype=torch.int64)
        c0 = cpu_clock()  # outside the wall-clock span
        t0 = clock()
        ids = array("q", tokens)
        key = RadixKey(ids)
        m = cache.match_prefix(MatchPrefixParams(key=RadixKey(ids, limit=n - 1)))
        prefix, node = m.device_prefix_len, m.last_device_node
        cache.inc_lock_ref(node)
        need = -(-n // page) * page - prefix
        if slots.num_free < need:
            cache.evict(EvictParams(num_tokens=need - slots.num_free))
        admitted = slots.num_free >= need
        if admitted:
            slots.num_free -= need
            r = cache.insert(InsertParams(key=key, value=slot_ids[:full]))
            slots.num_free += r.prefix_len - prefix  # duplicates of pages already cached
            cache.inc_lock_ref(r.last_device_node)
            live.append((r.last_device_node, n - full and page))
        cache.dec_lock_ref(node)
        if len(live) > in_flight:
            done, tail = live.popleft()
            cache.dec_lock_ref(done)
            slots.num_free += tail
        seconds += clock() - t0
        cpu_seconds += cpu_clock() - c0
        num_requests += 1
        if not admitted:  # pool full of locked pages
            num_rejected += 1
            continue
        num_blocks += math.ceil(n / page)
        num_tokens += n
        num_reused += prefix
    c0 = cpu_clock()
    t0 = clock()
    while live:
        done, tail = live.popleft()
        cache.dec_lock_ref(done)
        slots.num_free += tail
    seconds += clock() - t0
    cpu_seconds += cpu_clock() - c0
    assert cache.protected_size() == 0
    assert slots.num_free + cache.total_size() == num_gpu_blocks * page

    return result(
        "sglang", importlib.metadata.version("sglang"), num_requests, num_blocks, num_tokens,
        num_reused, seconds, num_rejected=num_rejected,
        cpu_seconds=cpu_seconds,
    )
