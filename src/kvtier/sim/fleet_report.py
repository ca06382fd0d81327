"""What :func:`kvtier.sim.fleet.simulate_fleet` measured: per instance and for the fleet."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from kvtier.router import CacheAware, Router, RoutingPolicy
from kvtier.scheduler import SchedulerConfig
from kvtier.sim.replay import ReplayLoop
from kvtier.sim.report import (
    LoadEstimate,
    SimReport,
    Summary,
    drafts_text,
    estimate_load,
    format_columns,
    json_ready,
    load_text,
    recomputed_text,
)
from kvtier.sim.timemodel import TimeModel
from kvtier.sim.workload import Workload


class InstanceRun(NamedTuple):
    """One instance of a finished fleet replay: its id, requests routed to it, its loop."""

    instance_id: str
    num_routed: int
    loop: ReplayLoop


@dataclass(frozen=True, slots=True)
class InstanceSummary:
    """What one instance of the fleet served; hit rates are per prompt token."""

    instance_id: str
    num_routed: int
    num_requests: int
    num_prompt_tokens: int
    num_reused_tokens: int
    # Tokens its prefill chunks computed: prompts less their reuse, and the recompute of
    # preempted requests.
    # NOTE: not the queries' prompt less reuse: since a resumed request's admission is no
    # query, that left its recompute out, and an instance that preempted read as lighter.
    num_prefill_tokens: int
    token_hit_rate: float
    gpu_token_hit_rate: float
    host_token_hit_rate: float
    num_preemptions: int
    ttft_s: Summary


@dataclass(frozen=True, slots=True)
class FleetReport:
    """What :func:`simulate_fleet` measured. ``to_dict`` gives the JSON-ready form.

    Every figure counts what was served: ``num_rejected_too_large`` requests (too large
    for any instance) are skipped before routing, never routed (``num_routed``, balance,
    the router's stats, depths and the load bound leave them out).
    Balance is ``max / mean`` over instances (1.0 is perfect). ``max_excess_depth`` is the
    largest ``chosen queue depth - least queue depth`` at any decision;
    ``num_over_load_bound`` counts decisions past the cache-aware policy's bound (always 0
    for it; for other policies the same bound is measured for comparison). ``load`` sets
    the work the instances did against the arrival span (:class:`LoadEstimate`).
    ``remote`` (with a shared tier) gives the fetch costs charged (latency, throughput, the
    profile's break-even, the mode and deadline), counts lookups, blocks found, fetched,
    left to recompute and imported, blocks written and dropped, the fetch times from
    arrival (``fetch_s``), and with a real store its errors, timeouts, failed writes and
    skipped batches.
    """

    workload: dict[str, object]
    router: dict[str, object]
    num_instances: int
    cache_config: dict[str, object]
    scheduler_config: dict[str, object]
    profile: dict[str, object]
    time_scale: float
    instances: list[InstanceSummary]
    num_requests: int
    num_rejected_too_large: int
    num_prompt_tokens: int
    num_reused_tokens: int
    token_hit_rate: float
    gpu_token_hit_rate: float
    host_token_hit_rate: float
    requests_max_over_mean: float
    prefill_tokens_max_over_mean: float
    max_excess_depth: int
    num_over_load_bound: int
    ttft_s: Summary
    e2e_s: Summary
    makespan_s: float
    # The instances' reuse credited, obtained and lost, their steps over max_num_tokens
    # (probe admission's race), and their preemptions with the recompute they caused
    # (counted apart from the queries), as :class:`SimReport` gives them for one.
    num_credited_tokens: int
    num_obtained_tokens: int
    num_lost_reuse_tokens: int
    num_overflow_steps: int
    num_overflow_tokens: int
    max_overflow_tokens: int
    num_preemptions: int
    num_resumed_prompt_tokens: int
    num_resumed_reused_tokens: int
    router_stats: dict[str, object]
    events: dict[str, int]
    wall_s: float
    load: LoadEstimate
    # With a shared remote tier: its write policy, and what instances looked up and imported.
    remote: dict[str, object] | None = None
    # With speculative decoding: the acceptance modelled, the fleet's drafts and accepted.
    speculative: dict[str, float] | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy of the report (an infinite number as None). Pure."""
        return json_ready(asdict(self))


def _max_over_mean(values: Sequence[int]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


def fleet_report(workload: Workload, instances: list[InstanceRun], router: Router,
                 policy: RoutingPolicy, sched: SchedulerConfig, model: TimeModel,
                 time_scale: float, max_excess: int, num_over: int, events: dict[str, int],
                 wall_s: float, num_too_large: int = 0) -> FleetReport:
    """The report of a finished fleet replay. A query of the instances' loops, with
    ``num_too_large`` requests the fleet skipped before routing (never any instance's)."""
    summaries: list[InstanceSummary] = []
    reports: list[SimReport] = []
    ttfts: list[float] = []
    e2es: list[float] = []
    for inst in instances:
        r = inst.loop.report(workload, wall_s)
        reports.append(r)
        ttfts += inst.loop.ttfts
        e2es += inst.loop.e2es
        summaries.append(InstanceSummary(
            inst.instance_id, inst.num_routed, r.num_requests, r.num_prompt_tokens,
            r.num_reused_tokens, inst.loop.num_context_tokens, r.token_hit_rate,
            r.gpu_token_hit_rate, r.host_token_hit_rate, r.num_preemptions, r.ttft_s))
    num_prompt = sum(r.num_prompt_tokens for r in reports)
    num_reused = sum(r.num_reused_tokens for r in reports)

    def share(n: int) -> float:
        return n / num_prompt if num_prompt else 0.0

    starts = [inst.loop.first_arrival_s for inst in instances
              if inst.loop.first_arrival_s is not None]
    span_s = max(inst.loop.last_arrival_s for inst in instances) - min(starts, default=0.0)
    load = estimate_load(sum(inst.loop.busy_s for inst in instances), span_s,
                         float(time_scale), len(instances))
    # NOTE: at least 0: with no request finished (every one too large) the last finish is
    # 0, before the first arrival, and the report said a makespan of -0.78 s.
    makespan_s = max(0.0, max(inst.loop.last_finish_s for inst in instances)
                     - min(starts, default=0.0))
    router_info: dict[str, object] = {"policy": policy.name}
    if isinstance(policy, CacheAware):
        router_info.update(alpha=policy.alpha, host_weight=policy.host_weight,
                           load_factor=policy.load_factor, load_slack=policy.load_slack)
    return FleetReport(
        workload=workload.describe(),
        router=router_info,
        num_instances=len(instances),
        cache_config=reports[0].cache_config,
        scheduler_config=asdict(sched),
        profile=asdict(model.profile),
        time_scale=float(time_scale),
        instances=summaries,
        num_requests=sum(r.num_requests for r in reports),
        num_rejected_too_large=num_too_large + sum(r.num_rejected_too_large for r in reports),
        num_prompt_tokens=num_prompt,
        num_reused_tokens=num_reused,
        token_hit_rate=share(num_reused),
        gpu_token_hit_rate=share(sum(r.num_gpu_hit_tokens for r in reports)),
        host_token_hit_rate=share(sum(r.num_host_hit_tokens for r in reports)),
        requests_max_over_mean=_max_over_mean([s.num_routed for s in summaries]),
        prefill_tokens_max_over_mean=_max_over_mean([s.num_prefill_tokens for s in summaries]),
        max_excess_depth=max_excess,
        num_over_load_bound=num_over,
        ttft_s=Summary.of(ttfts),
        e2e_s=Summary.of(e2es),
        makespan_s=makespan_s,
        num_credited_tokens=sum(r.num_credited_tokens for r in reports),
        num_obtained_tokens=sum(r.num_obtained_tokens for r in reports),
        num_lost_reuse_tokens=sum(r.num_lost_reuse_tokens for r in reports),
        num_overflow_steps=sum(r.num_overflow_steps for r in reports),
        num_overflow_tokens=sum(r.num_overflow_tokens for r in reports),
        max_overflow_tokens=max(r.max_overflow_tokens for r in reports),
        num_preemptions=sum(r.num_preemptions for r in reports),
        num_resumed_prompt_tokens=sum(r.num_resumed_prompt_tokens for r in reports),
        num_resumed_reused_tokens=sum(r.num_resumed_reused_tokens for r in reports),
        router_stats=router.stats.to_dict(),
        events=events,
        wall_s=wall_s,
        load=load,
        speculative=_drafts([r.speculative for r in reports]),
    )


def _drafts(runs: list[dict[str, float] | None]) -> dict[str, float] | None:
    """The instances' draft counts summed (``None`` without speculative decoding). Pure."""
    if not runs or runs[0] is None:
        return None
    return {"draft_acceptance": runs[0]["draft_acceptance"],
            **{key: sum(r[key] for r in runs if r is not None)
               for key in ("num_draft_tokens", "num_accepted_draft_tokens")}}


def _rates(num_prompt_tokens: int, *rates: float) -> tuple[str, ...]:
    """Hit rates for the table: "n/a" for an instance that served no prompt token.

    NOTE: an instance routed nothing (or only requests with empty prompts) read as hit rate
    0.0000 beside the others, a cache that missed everything; the JSON keeps its 0.0."""
    if not num_prompt_tokens:
        return ("n/a",) * len(rates)
    return tuple(f"{rate:.4f}" for rate in rates)


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        # NOTE: a fetch that never lands (a link of 1e-311 B/s) read "p99 inf ms".
        return "never"
    ms = value * 1e3
    return f"{ms:.1f} ms" if ms < 1e9 else f"{ms:.3g} ms"  # 1.8e+305 ms, not 306 digits


def _gb_s(value: float) -> str:
    # NOTE: a break-even of 5.12 B/s (an hour's recompute per block) read "0.00 GB/s",
    # and a link above it "above the break-even 0.00"; one of 1e-300 s a token, 300 digits.
    return f"{value:.2f}" if 0.01 <= value < 1e6 else f"{value:.3g}"


def _remote_lines(remote: dict[str, Any]) -> list[str]:
    """What the shared tier served and what its fetches cost. Pure."""
    link_gb_s, even_gb_s = remote["bytes_per_s"] / 1e9, remote["break_even_bytes_per_s"] / 1e9
    fetch_s = remote["fetch_s"]
    # NOTE: where prefill costs nothing the break-even is infinite: the line read "below the
    # break-even inf GB/s".
    verdict = ("never worth fetching (prefill costs nothing)" if math.isinf(even_gb_s)
               else f"{'above' if link_gb_s > even_gb_s else 'below'} the break-even "
                    f"{_gb_s(even_gb_s)} GB/s")
    return [
        f"remote      {remote['policy']}: {remote['num_hit_blocks']:,} blocks found for "
        f"{remote['num_lookups']:,} arrivals, {remote['num_fetched_blocks']:,} fetched in "
        f"{remote['num_fetches']:,} fetches ({remote['fetch']}; "
        f"{remote['num_skipped_blocks']:,} found left to recompute), "
        f"{remote['num_imported_blocks']:,} imported to host tiers",
        f"fetch cost  {remote['latency_s'] * 1e3:g} ms + bytes at {_gb_s(link_gb_s)} GB/s, "
        f"{verdict}; fetch p50 {_ms(fetch_s['p50'])}, "
        f"p99 {_ms(fetch_s['p99'])} (from arrival, store queue included); "
        f"{remote['num_written_blocks']:,} blocks written, {remote['num_dropped_writes']:,} "
        "dropped (store behind)",
    ]


def format_fleet_report(report: FleetReport) -> list[str]:
    """The human table of one fleet simulation, one string per line. Pure."""
    r = report
    ttft = r.ttft_s
    lines = [
        f"workload    {r.workload.get('name')}, {r.num_instances} instances, router "
        f"{r.router['policy']}, time scale {r.time_scale:g}",
        f"requests    {r.num_requests:,} finished, {r.num_rejected_too_large:,} too large; "
        f"{r.num_preemptions:,} preemptions"
        f"{recomputed_text(r.num_resumed_prompt_tokens, r.num_resumed_reused_tokens)}",
        f"hit rate    {r.token_hit_rate:.4f} of {r.num_prompt_tokens:,} prompt tokens: GPU "
        f"{r.gpu_token_hit_rate:.4f}, host {r.host_token_hit_rate:.4f}",
        f"reuse       credited {r.num_credited_tokens:,}, obtained {r.num_obtained_tokens:,}, "
        f"lost {r.num_lost_reuse_tokens:,} tokens",
        f"overflow    {r.num_overflow_steps:,} steps over max_num_tokens, "
        f"{r.num_overflow_tokens:,} tokens, worst {r.max_overflow_tokens:,}",
        f"balance     requests max/mean {r.requests_max_over_mean:.2f}, prefill tokens "
        f"max/mean {r.prefill_tokens_max_over_mean:.2f}, worst excess depth "
        f"{r.max_excess_depth}, {r.num_over_load_bound} over the load bound",
        f"TTFT        p50 {_ms(ttft.p50)}, p90 {_ms(ttft.p90)}, p99 {_ms(ttft.p99)} (virtual)",
        f"events      {r.events['num_published']:,} published, {r.events['num_gaps']} gaps, "
        f"{r.events['num_resyncs']} resyncs",
    ]
    lines.append(f"load        {load_text(r.load, r.time_scale)}")
    if r.speculative is not None:
        lines.append(f"drafts      {drafts_text(r.scheduler_config, r.speculative)}")
    if r.remote is not None:
        lines += _remote_lines(r.remote)
        faults = ("num_store_errors", "num_store_timeouts", "num_failed_puts",
                  "num_short_circuited")
        if any(r.remote[key] for key in faults):
            lines.append(f"store       {r.remote['num_store_errors']:,} errors, "
                         f"{r.remote['num_store_timeouts']:,} timeouts, "
                         f"{r.remote['num_failed_puts']:,} failed writes, "
                         f"{r.remote['num_short_circuited']:,} batches skipped (breaker open)")
    table: list[tuple[str, ...]] = [("instance", "routed", "hit rate", "GPU", "host",
                                      "prefill tok", "TTFT p50", "TTFT p99")]
    table += [(s.instance_id, f"{s.num_routed:,}",
               *_rates(s.num_prompt_tokens, s.token_hit_rate, s.gpu_token_hit_rate,
                       s.host_token_hit_rate),
               f"{s.num_prefill_tokens:,}", _ms(s.ttft_s.p50), _ms(s.ttft_s.p99))
              for s in r.instances]
    lines += ["", *format_columns(table, num_left=1)]
    return lines
