"""The remote tier's fetch rule: how many of a prefix's missing blocks to fetch rather
than recompute (:func:`num_blocks_worth_fetching`), and the costs it starts from before
the tier measured its store. Pure (``kvtier.remote.tier`` applies it).
"""

from __future__ import annotations

import math
from fractions import Fraction

from kvtier.remote.options import check_number
from kvtier.reprs import shown

__all__ = [
    "DEFAULT_FETCH_BYTES_PER_S",
    "DEFAULT_FETCH_LATENCY_S",
    "PROBE_AFTER_SKIPS",
    "THROUGHPUT_EWMA_WEIGHT",
    "num_blocks_worth_fetching",
]

# What a fetch costs before the first measurement: the simulator's RemoteLink defaults
# (kvtier.sim.timemodel, a test keeps them equal), measured by benchmarks/bench_remote.py
# (4 MiB blocks from one Redis on loopback; benchmarks/results/remote.md). The tier replaces
# the throughput with what its own fetches take.
DEFAULT_FETCH_LATENCY_S = 0.1e-3
DEFAULT_FETCH_BYTES_PER_S = 0.25e9
# Weight of the newest fetch in the tier's running estimate of the store's read throughput.
THROUGHPUT_EWMA_WEIGHT = 0.25
# Fetches in a row the measured throughput alone turns down before the next is made anyway
# (a probe): only a fetch measures the store, so without one a store slow for a while (a
# stall, a failover) was judged by that while for ever.
PROBE_AFTER_SKIPS = 16


def _cost(field: str, value: object) -> float:
    """``value`` as a cost in seconds: a finite number >= 0, or infinity; else ValueError
    naming ``field``. Pure."""
    if type(value) is float and value == math.inf:
        return value
    return check_number(field, value, 0.0, None)


def num_blocks_worth_fetching(num_blocks: int, *, latency_s: float, fetch_s_per_block: float,
                              recompute_s_per_block: float,
                              max_wait_s: float | None = None) -> int:
    """How many of the next ``num_blocks`` blocks of a prefix to fetch from a remote store
    rather than recompute: the first ``k``, where ``k`` is the answer. Pure.

    ::

        prefix   | local tiers | fetched: k blocks   | recomputed: the rest      |
        time     fetch = latency_s + k x fetch_s_per_block  vs  k x recompute_s_per_block

    The rule, per fetch, from the costs the caller measures or is configured with:

    1. A block is worth fetching only if reading it is faster than computing it:
       ``fetch_s_per_block < recompute_s_per_block``, i.e. the store's read throughput is
       above the break-even ``KV bytes per token / prefill seconds per token`` (131,072 B /
       40 us = 3.3 GB/s for Llama-3-8B on an H100). Otherwise nothing is fetched.
    2. Blocks that could not arrive within ``max_wait_s`` (a request's fetch deadline) are
       not fetched: the request would go on without them. So a prefix's first blocks may be
       worth fetching and the rest not.
    3. The fixed ``latency_s`` must be paid back: ``k x (recompute - fetch) > latency_s``.
       The saving grows with ``k``, so the answer is the most blocks rule 2 allows, or 0.

    Raises ValueError for a negative count or a cost that is not a number >= 0 (any size:
    a store's queue in a loaded fleet, a stalled store's measured throughput); a latency or
    fetch cost of infinity (a fetch that never lands) fetches nothing.
    """
    if type(num_blocks) is not int or num_blocks < 0:
        raise ValueError(f"num_blocks must be an integer >= 0, got {shown(num_blocks)}")
    # NOTE: the costs were capped at an hour: a fleet's store queue of more (the
    # simulator adds it to the latency) or a store measured below bytes_per_block / 3600
    # B/s raised from the step. Any finite cost decides. So does infinity: a fleet's link
    # of 1e-315 GB/s (an option it takes) gave a block's fetch, or a write's queue ahead of
    # a fetch, an infinite time, and the replay ended in "latency_s must be a finite number".
    latency_s = _cost("latency_s", latency_s)
    fetch_s = _cost("fetch_s_per_block", fetch_s_per_block)
    recompute_s = check_number("recompute_s_per_block", recompute_s_per_block, 0.0, None)
    wait_s = None if max_wait_s is None else check_number("max_wait_s", max_wait_s, 0.0, None)
    if num_blocks == 0 or fetch_s >= recompute_s:
        return 0
    k = num_blocks
    if wait_s is not None:
        if latency_s >= wait_s:
            return 0
        if fetch_s > 0:
            # NOTE: the quotient is inf for a subnormal fetch cost (``int`` of it raised
            # OverflowError): compared first, exactly, as a float with an int.
            num_in_time = (wait_s - latency_s) / fetch_s
            if num_in_time < k:
                k = int(num_in_time)
    saving_s = recompute_s - fetch_s
    # A count past 2**53 is no float (past the float range ``k * saving_s`` overflowed):
    # compared exactly there.
    saved_s = k * saving_s if k <= 1 << 53 else Fraction(k) * Fraction(saving_s)
    return k if saved_s > latency_s else 0
