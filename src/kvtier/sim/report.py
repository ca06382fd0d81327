"""What one simulation measured: :class:`SimReport`, its latency summaries and percentiles.

Latencies are in virtual seconds (the time model's clock); only the ``cpu`` group holds
real time, so two runs with the same inputs give reports equal but for ``cpu``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ascending values, or ``None``
    when there are none. Pure."""
    if not 0 < q <= 100:
        raise ValueError(f"q must be in (0, 100], got {q!r}")
    if not sorted_values:
        return None
    rank = math.ceil(q / 100 * len(sorted_values))
    return float(sorted_values[max(rank, 1) - 1])


@dataclass(frozen=True, slots=True)
class Summary:
    """Mean and p50/p90/p99 of a sample; every field is ``None`` for an empty sample."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """Summarise ``values`` (any order). Pure."""
        ordered = sorted(values)
        mean = math.fsum(ordered) / len(ordered) if ordered else None
        return cls(mean, percentile(ordered, 50), percentile(ordered, 90),
                   percentile(ordered, 99))


@dataclass(frozen=True, slots=True)
class OracleBounds:
    """Offline references for the same requests at ``tokens_per_block`` granularity.

    ``unlimited_hit_rate`` is a cache that never evicts; ``belady_hit_rate`` the best
    single-tier cache of ``num_capacity_blocks`` (GPU + host) blocks, evicting the block
    reused farthest in the future. Both count whole prompts, not live-request pinning.
    """

    tokens_per_block: int
    num_capacity_blocks: int
    unlimited_hit_rate: float
    belady_hit_rate: float


@dataclass(frozen=True, slots=True)
class SimReport:
    """What :func:`kvtier.sim.simulate` measured. ``to_dict`` gives the JSON-ready form.

    Token counts are per admission: a preempted request admitted again counts again.
    ``num_host_hit_tokens`` are reused tokens that came from the host tier (onboarded, or
    copied from a host block); ``num_gpu_hit_tokens`` the rest of the reuse. Reuse
    ``credited`` is what the scheduler counted on when it filled the budget, ``obtained``
    what the admissions got; ``num_lost_reuse_tokens`` sums, step by step, credit that was
    not obtained (the probe-mode race). ``gpu`` and ``host`` are the manager's per-tier
    block counters (hit rates per block, onboarded, offloaded, evicted).
    """

    workload: dict[str, object]
    cache_config: dict[str, object]
    scheduler_config: dict[str, object]
    profile: dict[str, object]
    time_scale: float
    num_requests: int
    num_rejected_too_large: int
    num_steps: int
    num_prompt_tokens: int
    num_output_tokens: int
    num_reused_tokens: int
    num_gpu_hit_tokens: int
    num_host_hit_tokens: int
    token_hit_rate: float
    gpu_token_hit_rate: float
    host_token_hit_rate: float
    gpu: dict[str, object]
    host: dict[str, object]
    num_credited_tokens: int
    num_obtained_tokens: int
    num_lost_reuse_tokens: int
    num_scheduled_tokens: int
    num_overflow_steps: int
    num_overflow_tokens: int
    max_overflow_tokens: int
    num_preemptions: int
    ttft_s: Summary
    e2e_s: Summary
    makespan_s: float
    throughput_tokens_per_s: float
    output_tokens_per_s: float
    requests_per_s: float
    num_onboarded_blocks: int
    num_offloaded_blocks: int
    num_evicted_gpu_blocks: int
    num_evicted_host_blocks: int
    bytes_h2d: int
    bytes_d2h: int
    cpu: dict[str, float | None]
    oracle: OracleBounds | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy of the report. Pure."""
        return asdict(self)
