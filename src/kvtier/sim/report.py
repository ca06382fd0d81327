"""What one simulation measured: :class:`SimReport`, its latency summaries and percentiles.

Latencies are in virtual seconds (the time model's clock); only the ``cpu`` group holds
real time, so two runs with the same inputs give reports equal but for ``cpu``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from kvtier.reprs import shown


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ascending values, or ``None``
    when there are none. Pure."""
    if not 0 < q <= 100:
        raise ValueError(f"q must be in (0, 100], got {shown(q)}")
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
    reused farthest in the future; ``lru_hit_rate`` the same cache evicting the least
    recently used block (the peers' policy, in the same model). All count whole prompts in
    arrival order, not scheduling or live-request pinning: they frame a simulated hit rate,
    they do not reproduce it. ``partial_reuse``: whether a hit also counts the head of the
    first block missed that an earlier block behind the same prefix shares, as a cache with
    partial reuse reuses it (``oracle_bounds(..., partial_reuse=True)``), or whole blocks
    only.
    """

    tokens_per_block: int
    num_capacity_blocks: int
    unlimited_hit_rate: float
    belady_hit_rate: float
    lru_hit_rate: float
    partial_reuse: bool = False


@dataclass(frozen=True, slots=True)
class LoadEstimate:
    """Offered work against capacity, from the time model.

    ``busy_s`` is the virtual time the instances spent in steps, ``arrival_span_s`` the time
    from the first arrival to the last (after the time scale) of the requests served, not
    of those skipped as too large. ``utilization`` is
    ``busy_s / (arrival_span_s x num_instances)`` (``None`` when every request arrives at
    once): past 1.0 the arrivals bring more work per second than the instances serve, so
    queues grow for the whole trace and latencies measure queueing (flagged past
    ``OVERLOAD_UTILIZATION``, which leaves room for the drain after the last arrival). Then
    ``sustainable_time_scale`` (the current scale x utilization) and
    ``sustainable_instances`` are where the same work would fit; they are lower bounds,
    since an overloaded step batches more work than a lightly loaded one.
    """

    busy_s: float
    arrival_span_s: float
    num_instances: int
    utilization: float | None
    overloaded: bool
    sustainable_time_scale: float | None
    sustainable_instances: int | None


# NOTE: a serving loop steps whenever anything is in flight, so a well-served stream keeps
# it busy about as long as the arrivals span, plus the last requests' drain: 5 % above 1.0
# absorbs that tail (the default chat replay, TTFT p50 55 ms, reads 1.002); a stream that
# queues for minutes reads far above it.
OVERLOAD_UTILIZATION = 1.05


def estimate_load(busy_s: float, arrival_span_s: float, time_scale: float,
                  num_instances: int = 1) -> LoadEstimate:
    """The :class:`LoadEstimate` of a replay that kept ``num_instances`` busy ``busy_s``
    virtual seconds over arrivals spanning ``arrival_span_s``. Pure."""
    utilization = busy_s / (arrival_span_s * num_instances) if arrival_span_s > 0 else None
    needed = None if utilization is None else utilization * num_instances
    # NOTE: arrivals a --time-scale of 1e-300 packs into 1e-301 s span a positive time too
    # short to divide by: the quotients overflow (math.ceil(inf) raised OverflowError). As
    # for a span of 0, every request arrives at once.
    if (utilization is None or needed is None or not math.isfinite(needed)
            or not math.isfinite(time_scale * utilization)):
        return LoadEstimate(busy_s, arrival_span_s, num_instances, None, False, None, None)
    if utilization <= OVERLOAD_UTILIZATION:
        return LoadEstimate(busy_s, arrival_span_s, num_instances, utilization, False, None,
                            None)
    return LoadEstimate(busy_s, arrival_span_s, num_instances, utilization, True,
                        time_scale * utilization, math.ceil(needed))


def load_text(load: LoadEstimate, time_scale: float) -> str:
    """The table's one line on load: the utilization, or what an overload would need."""
    if load.utilization is None:
        return f"every request arrives at once; busy {_seconds(load.busy_s)}"
    share = (f"{_ratio(load.utilization)} x what {load.num_instances} instance"
             f"{'s' if load.num_instances > 1 else ''} can serve")
    if not load.overloaded:
        return (f"{share} (busy {_seconds(load.busy_s)} over {_seconds(load.arrival_span_s)} "
                "of arrivals)")
    assert load.sustainable_time_scale is not None
    return (f"OVERLOADED: arrivals bring {share}, so latencies are mostly queueing; "
            f"sustainable from at least --time-scale {load.sustainable_time_scale:.3g} (now "
            f"{time_scale:g}) or --instances {_count(load.sustainable_instances)}")


# NOTE: a load is finite up to the float range: a --time-scale of 1e-300 made a ratio of
# 6e301, printed to 302 digits (and the instance count too) on the table's one line.
def _ratio(value: float) -> str:
    return f"{value:.2f}" if value < 1e6 else f"{value:.3g}"


def recomputed_text(num_prompt_tokens: int, num_reused_tokens: int) -> str:
    """What preempted requests recomputed (``num_resumed_*``), for a requests line; empty
    where nothing was. Pure."""
    if not num_prompt_tokens:
        return ""
    return (f" (recomputing {num_prompt_tokens:,} tokens, {num_reused_tokens:,} found "
            "cached: in no hit rate)")


def _count(value: int | None) -> str:
    return str(value) if value is None or value < 10**9 else f"{float(value):.3g}"


@dataclass(frozen=True, slots=True)
class SimReport:
    """What :func:`kvtier.sim.simulate` measured. ``to_dict`` gives the JSON-ready form.

    Prompt and hit counts are per query: a request's first admission. A request whose
    trace gives it no output (``output_length`` 0) is served as its prefill, which samples
    one token, counted in no output figure. A preempted request
    admitted again recomputes what it had (``num_resumed_prompt_tokens``), most of it found
    cached again (``num_resumed_reused_tokens``): counted apart, as vLLM's preempted stats,
    since that reuse is its own work coming back, not a hit the cache earned.
    ``num_host_hit_tokens`` are reused tokens the lookup found on the host tier (onboarded,
    by the request or by another of its batch, or copied from a host block), as the host's
    reused blocks count them; ``num_gpu_hit_tokens`` the rest of the reuse. Reuse
    ``credited`` is what the scheduler counted on when it filled the budget, ``obtained``
    what the admissions got; ``num_lost_reuse_tokens`` sums, step by step, credit that was
    not obtained (the probe-mode race). ``gpu`` and ``host`` are the manager's per-tier
    block counters (hit rates per block, onboarded, offloaded, evicted). ``load`` says
    whether the arrivals exceed what the instance can serve (:class:`LoadEstimate`).
    ``step_phases_us`` (only when the replay timed phases) holds, for all full steps and
    for their slowest 1 %, the mean microseconds of each phase of a step. ``speculative``
    (only with speculative decoding): the draft acceptance modelled, the draft tokens the
    steps verified and how many were accepted.
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
    num_resumed_prompt_tokens: int
    num_resumed_reused_tokens: int
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
    load: LoadEstimate
    oracle: OracleBounds | None = None
    step_phases_us: dict[str, dict[str, float]] | None = None
    speculative: dict[str, float] | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy of the report (an infinite number as None). Pure."""
        return json_ready(asdict(self))


def json_ready(document: dict[str, object]) -> dict[str, object]:
    """``document`` with every infinite float in it, at any depth, as None: JSON has no
    infinity. Pure.

    NOTE: valid options give some: a fleet's break-even rate where prefill is free, the
    fetch times of a link of 1e-320 GB/s (a fetch that never lands); the JSON line then
    raised ValueError after the table (status 70). A NaN is left to fail: a defect."""
    def ready(value: object) -> object:
        if isinstance(value, float):
            return None if math.isinf(value) else value
        if isinstance(value, dict):
            return {key: ready(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(map(ready, value))
        return value

    return {key: ready(item) for key, item in document.items()}


# ---- tables ------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.2f} s" if value < 1e9 else f"{value:.3g} s"  # 3e+300 s, not 301 digits


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} us"


def _float(value: object) -> float:
    assert isinstance(value, (int, float)), value
    return float(value)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / (1 << 30):,.1f} GiB"


def drafts_text(sched: dict[str, object], speculative: dict[str, float]) -> str:
    """The drafts line of a report with speculative decoding. Pure."""
    return (f"up to {sched['num_speculative_tokens']} a decode, each accepted with p "
            f"{speculative['draft_acceptance']:g}: "
            f"{speculative['num_accepted_draft_tokens']:,.0f} of "
            f"{speculative['num_draft_tokens']:,.0f} accepted")


def format_report(report: SimReport) -> list[str]:
    """The human table of one simulation, one string per line. Pure."""
    r = report
    cache, sched, workload = r.cache_config, r.scheduler_config, r.workload
    source = [str(workload.get("kind", "workload"))]
    source += [f"{key} {workload[key]}" for key in ("path", "seed") if key in workload]
    chunk = (f"chunks <= {sched['max_chunk_tokens'] or sched['max_num_tokens']}"
             if sched["enable_chunked_prefill"] else "no chunking")
    ttft, e2e, cpu = r.ttft_s, r.e2e_s, r.cpu
    recomputed = recomputed_text(r.num_resumed_prompt_tokens, r.num_resumed_reused_tokens)
    rows = [
        ("workload", f"{workload.get('name')} ({', '.join(source)}), time scale {r.time_scale:g}"),
        ("cache", f"{cache['tokens_per_block']} tokens/block, {cache['num_gpu_blocks']:,} GPU + "
                  f"{cache['num_host_blocks']:,} host blocks, partial reuse "
                  f"{'on' if cache['enable_partial_reuse'] else 'off'}"),
        ("scheduler", f"{sched['admission']} admission, {sched['capacity_policy']}, "
                      f"{sched['max_num_tokens']:,} tokens x {sched['max_batch_size']} seqs, "
                      f"{chunk}"),
        ("model", f"{r.profile['name']} ({r.profile['kv_bytes_per_token']:,} B/token KV, "
                  f"PCIe {_float(r.profile['pcie_bytes_per_s']) / 1e9:g} GB/s)"),
        ("requests", f"{r.num_requests:,} finished, {r.num_rejected_too_large:,} too large for "
                     f"the GPU pool{_or_a_step(r)}; {r.num_steps:,} steps, "
                     f"{r.num_preemptions:,} preemptions{recomputed}"),
        ("hit rate", f"{r.token_hit_rate:.4f} of {r.num_prompt_tokens:,} prompt tokens: GPU "
                     f"{r.gpu_token_hit_rate:.4f}, host {r.host_token_hit_rate:.4f}"),
        ("reuse", f"credited {r.num_credited_tokens:,}, obtained {r.num_obtained_tokens:,}, "
                  f"lost {r.num_lost_reuse_tokens:,} tokens"),
        ("overflow", f"{r.num_overflow_steps:,} steps over max_num_tokens, "
                     f"{r.num_overflow_tokens:,} tokens, worst {r.max_overflow_tokens:,}"),
        ("TTFT", f"p50 {_seconds(ttft.p50)}, p90 {_seconds(ttft.p90)}, "
                 f"p99 {_seconds(ttft.p99)} (virtual)"),
        ("E2E", f"p50 {_seconds(e2e.p50)}, p90 {_seconds(e2e.p90)}, p99 {_seconds(e2e.p99)}"),
        ("throughput", f"{r.throughput_tokens_per_s:,.0f} tokens/s, {r.requests_per_s:.2f} "
                       f"requests/s over {_seconds(r.makespan_s)}"),
        ("load", load_text(r.load, r.time_scale)),
        ("transfers", f"onboarded {r.num_onboarded_blocks:,} blocks ({_gib(r.bytes_h2d)}), "
                      f"offloaded {r.num_offloaded_blocks:,} ({_gib(r.bytes_d2h)}); evicted "
                      f"GPU {r.num_evicted_gpu_blocks:,}, host {r.num_evicted_host_blocks:,}"),
        ("cpu", f"scheduler+manager {_us(cpu['us_per_step_mean'])}/step mean, p99 "
                f"{_us(cpu['us_per_step_p99'])}; full steps {_us(cpu['us_per_full_step_mean'])} "
                f"mean, p99 {_us(cpu['us_per_full_step_p99'])}; wall {cpu['wall_s']:.2f} s"),
    ]
    if r.speculative is not None:
        rows.append(("drafts", drafts_text(sched, r.speculative)))
    if r.step_phases_us is not None:
        for group, label in (("all", "full steps"), ("slowest_1pct", "slowest 1 %")):
            means = r.step_phases_us[group]
            rows.append(("phases", f"{label}: " + ", ".join(
                f"{phase} {_us(us)}" for phase, us in means.items())))
    if r.oracle is not None:
        rows.append(("oracle", _oracle_text(r.oracle)))
    return [f"{name:<11} {value}" for name, value in rows]


def _oracle_text(bounds: OracleBounds) -> str:
    # NOTE: "full blocks" was printed for bounds that count a block's head too.
    blocks = (f"{bounds.tokens_per_block}-token blocks and the heads partial reuse takes"
              if bounds.partial_reuse else f"full {bounds.tokens_per_block}-token blocks")
    return (f"offline, {blocks}, arrival order: at "
            f"{bounds.num_capacity_blocks:,} blocks LRU {bounds.lru_hit_rate:.4f}, Belady "
            f"{bounds.belady_hit_rate:.4f}; unlimited {bounds.unlimited_hit_rate:.4f}")


def format_side_by_side(labels: Sequence[str], reports: Sequence[SimReport]) -> list[str]:
    """One column per report: hit rates (and the requests they leave out as too large,
    where a run skipped any), the race, latency and throughput. Pure."""
    rows: list[tuple[str, list[str]]] = [
        ("admission", [str(r.scheduler_config["admission"]) for r in reports]),
        ("GPU blocks", [f"{r.cache_config['num_gpu_blocks']:,}" for r in reports]),
        ("host blocks", [f"{r.cache_config['num_host_blocks']:,}" for r in reports]),
        ("hit rate", [f"{r.token_hit_rate:.4f}" for r in reports]),
        ("  from host", [f"{r.host_token_hit_rate:.4f}" for r in reports]),
    ]
    if any(r.num_rejected_too_large for r in reports):  # the hit rates leave them out
        rows.append(("too large", [f"{r.num_rejected_too_large:,}" for r in reports]))
    if all(r.oracle is not None for r in reports):
        rows.append(("LRU (offline)", [f"{r.oracle.lru_hit_rate:.4f}" for r in reports
                                       if r.oracle is not None]))
        rows.append(("Belady", [f"{r.oracle.belady_hit_rate:.4f}" for r in reports
                                if r.oracle is not None]))
    rows += [
        ("overflow steps", [f"{r.num_overflow_steps:,}" for r in reports]),
        ("worst overflow", [f"{r.max_overflow_tokens:,}" for r in reports]),
        ("lost reuse", [f"{r.num_lost_reuse_tokens:,}" for r in reports]),
        ("preemptions", [f"{r.num_preemptions:,}" for r in reports]),
        ("TTFT p50", [_seconds(r.ttft_s.p50) for r in reports]),
        ("TTFT p99", [_seconds(r.ttft_s.p99) for r in reports]),
        ("tokens/s", [f"{r.throughput_tokens_per_s:,.0f}" for r in reports]),
        ("us/step", [_us(r.cpu["us_per_step_mean"]) for r in reports]),
    ]
    width = max(14, *(len(label) for label in labels), *(len(c) for _, cs in rows for c in cs))
    lines = [f"{'':<15}" + "".join(f"{label:>{width + 2}}" for label in labels)]
    lines += [f"{name:<15}" + "".join(f"{cell:>{width + 2}}" for cell in cells)
              for name, cells in rows]
    return lines


def format_sweep(reports: Sequence[SimReport]) -> list[str]:
    """One row per run of a capacity sweep, with the oracle bounds where known; a policy
    column first when the runs use more than one eviction policy; the race's columns
    (steps over ``max_num_tokens``, reuse lost) where a run admits by probe; last, the
    requests skipped as too large where a run skipped any (its figures leave them out).
    Pure."""
    header: tuple[str, ...] = ("GPU blocks", "host blocks", "hit rate", "from host",
                               "LRU (offline)", "Belady", "unlimited", "TTFT p50", "TTFT p99",
                               "tokens/s")
    policies = [str(r.cache_config["eviction_policy"]) for r in reports]
    several = len(set(policies)) > 1
    if several:
        header = ("policy", *header)
    # NOTE: probe admission is run to measure its race: a sweep of it showed no sign of
    # the steps it ran past the budget (only the JSON had them).
    race = any(r.scheduler_config.get("admission") == "probe" for r in reports)
    if race:
        header = (*header, "overflow steps", "lost reuse")
    # NOTE: a run's hit rate and bounds cover the requests it served: a GPU size that
    # skipped the large ones as too large read as the better cache, with no sign of them
    # (12 requests, every third too large for 64 GPU blocks: 0.8680 against 0.8488 at 128).
    skipped = any(r.num_rejected_too_large for r in reports)
    if skipped:
        header = (*header, "too large")
    table = [header]
    for r, policy in zip(reports, policies, strict=True):
        bounds = r.oracle
        table.append(((policy,) if several else ()) + (
            f"{r.cache_config['num_gpu_blocks']:,}", f"{r.cache_config['num_host_blocks']:,}",
            f"{r.token_hit_rate:.4f}", f"{r.host_token_hit_rate:.4f}",
            "n/a" if bounds is None else f"{bounds.lru_hit_rate:.4f}",
            "n/a" if bounds is None else f"{bounds.belady_hit_rate:.4f}",
            "n/a" if bounds is None else f"{bounds.unlimited_hit_rate:.4f}",
            _seconds(r.ttft_s.p50), _seconds(r.ttft_s.p99), f"{r.throughput_tokens_per_s:,.0f}",
        ) + ((f"{r.num_overflow_steps:,}", f"{r.num_lost_reuse_tokens:,}") if race else ())
          + ((f"{r.num_rejected_too_large:,}",) if skipped else ()))
    return format_columns(table)


def format_columns(table: Sequence[Sequence[str]], num_left: int = 0) -> list[str]:
    """A table's rows as lines: each column as wide as its widest cell, two spaces between
    columns; the first ``num_left`` columns aligned left, the rest right. Pure.

    NOTE: widths come from the content, never fixed: a fixed width let a long cell (a TTFT
    of 10^14 ms) run into its neighbour, ``1,504,851148582186414.0 ms298330283679.2 ms``."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) if i < num_left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in table]


def _or_a_step(r: SimReport) -> str:
    """What else "too large" means: without chunked prefill, a prompt past the step's token
    budget is refused too. Pure."""
    sched = r.scheduler_config
    if sched.get("enable_chunked_prefill", True):
        return ""
    return f" or a step's {sched.get('max_num_tokens')} tokens"
