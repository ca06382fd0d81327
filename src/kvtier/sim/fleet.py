"""N engine instances behind a router, on one virtual clock.

Each instance is a replay loop of its own (manager with events, scheduler, time model).
Requests are taken in arrival order; for each one at time ``t``::

    every instance: step while it has work and its clock is < t (a step may end past t);
                    an idle instance's clock jumps to t
    every step's events are stamped with the step's end time and published to the bus
    once the fleet clock reaches that time: the router never sees the future
    router: apply the bus updates to its index, hash the prompt, ask the policy
    the chosen instance's scheduler gets the request (arrival t)

After the last arrival every instance runs to completion. The index lags the instances by
up to one step, as a real subscriber would.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace

from kvtier.config import CacheConfig
from kvtier.events import BlockRemoved, BlockStored, Event
from kvtier.publisher import InMemoryEventBus, Snapshot, manager_snapshot
from kvtier.remote.codec import RemoteNamespace
from kvtier.remote.store import BlockStoreBase
from kvtier.router import CacheAware, InstanceLoad, Router, RoutingPolicy, make_policy
from kvtier.scheduler import SchedulerConfig
from kvtier.sim.engine import SimulationStalled, _fewer_gc_passes, _Loop, _time_model
from kvtier.sim.report import SimReport, Summary
from kvtier.sim.timemodel import ModelProfile, TimeModel
from kvtier.sim.workload import TraceRequest, Workload
from kvtier.storage import KVLayout


@dataclass(frozen=True, slots=True)
class InstanceSummary:
    """What one instance of the fleet served; hit rates are per prompt token."""

    instance_id: str
    num_routed: int
    num_requests: int
    num_prompt_tokens: int
    num_reused_tokens: int
    num_prefill_tokens: int  # prompt tokens computed, not reused
    token_hit_rate: float
    gpu_token_hit_rate: float
    host_token_hit_rate: float
    num_preemptions: int
    ttft_s: Summary


@dataclass(frozen=True, slots=True)
class FleetReport:
    """What :func:`simulate_fleet` measured. ``to_dict`` gives the JSON-ready form.

    Balance is ``max / mean`` over instances (1.0 is perfect). ``max_excess_depth`` is the
    largest ``chosen queue depth - least queue depth`` at any decision;
    ``num_over_load_bound`` counts decisions past the cache-aware policy's bound (always 0
    for it; for other policies the same bound is measured for comparison).
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
    router_stats: dict[str, object]
    events: dict[str, int]
    wall_s: float
    # With a shared remote tier: its write policy, and what instances looked up and imported.
    remote: dict[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready copy of the report. Pure."""
        return asdict(self)


class _SharedTier:
    """The fleet's shared remote tier as block hashes: a set, or a real store (e.g. Redis)
    holding a small stand-in value per block, so its latency and faults are real."""

    def __init__(self, store: BlockStoreBase | None) -> None:
        self.store = store
        self.hashes: set[int] = set()
        self._value = b""
        if store is not None:
            self._value = bytes(store.namespace.layout.bytes_per_block)

    def add(self, hashes: Iterable[int]) -> None:
        if self.store is None:
            self.hashes.update(hashes)
        else:
            self.store.put_many(dict.fromkeys(hashes, self._value))

    def run_length(self, hashes: list[int]) -> int:
        """How many of ``hashes``, from the first, the tier holds."""
        present = self.hashes if self.store is None else self.store.contains_many(hashes)
        run = 0
        while run < len(hashes) and hashes[run] in present:
            run += 1
        return run


def stand_in_namespace(tokens_per_block: int) -> RemoteNamespace:
    """The namespace of the fleet simulator's stand-in values (one byte pair per token)."""
    return RemoteNamespace("kvtier-fleet-sim", KVLayout(1, 1, 1, tokens_per_block, "float16"))


class _Instance:
    """One engine: a replay loop whose events wait, stamped, until the fleet clock passes."""

    def __init__(self, instance_id: str, loop: _Loop, remote: _SharedTier | None = None,
                 write_through: bool = False) -> None:
        self.instance_id = instance_id
        self.loop = loop
        self.remote = remote  # the shared remote tier's block hashes, if there is one
        self.written = (BlockStored, BlockRemoved) if write_through else (BlockRemoved,)
        self.pending: deque[tuple[float, list[Event]]] = deque()
        self.next_seq = 0  # one past the last event drained
        self.num_steps = 0
        self.num_routed = 0

    def queue_depth(self) -> int:
        scheduler = self.loop.scheduler
        return len(scheduler.waiting) + len(scheduler.running)

    def snapshot(self) -> Snapshot:
        # NOTE: the manager's state now, which may include a step ending after the fleet
        # clock: a resync can see up to one step ahead. next_seq covers those events, so
        # they are skipped when published, never applied twice.
        return manager_snapshot(self.loop.manager, self.instance_id, self.next_seq)

    def advance_to(self, t: float) -> None:
        loop = self.loop
        while loop.scheduler.has_unfinished() and loop.now_s < t:
            if not loop._step():
                break  # nothing can be scheduled until an arrival
            self._collect()
        loop.now_s = max(loop.now_s, t)

    def finish(self) -> None:
        loop = self.loop
        while loop.scheduler.has_unfinished():
            if not loop._step():
                raise SimulationStalled(f"instance {self.instance_id}: {loop._stall_message()}")
            self._collect()

    def _collect(self) -> None:
        self.num_steps += 1
        check_every = self.loop.check_every
        if check_every is not None and self.num_steps % check_every == 0:
            self.loop.manager.check_invariants()
        events = self.loop.manager.drain_events()
        if self.remote is not None:
            # Write-back: a block that leaves this instance's last tier goes to the shared
            # tier (write-through: every block stored), where every instance can fetch it,
            # content-addressed by its chained hash.
            written = self.written
            self.remote.add(e.block_hash for e in events if isinstance(e, written))
        if events:
            self.next_seq = events[-1].seq + 1
            self.pending.append((self.loop.now_s, events))

    def publish_until(self, t: float, bus: InMemoryEventBus) -> None:
        pending = self.pending
        while pending and pending[0][0] <= t:
            bus.publish(self.instance_id, pending.popleft()[1])


def simulate_fleet(
    workload: Workload,
    cache: CacheConfig,
    num_instances: int,
    policy: RoutingPolicy | str = "cache-aware",
    sched: SchedulerConfig | None = None,
    profile: ModelProfile | TimeModel | str = "llama3-8b-h100",
    time_scale: float = 1.0,
    progress: Callable[[int], object] | None = None,
    max_bus_events: int = 1 << 20,
    check_every: int | None = None,
    remote: str | None = None,
    remote_store: BlockStoreBase | None = None,
) -> FleetReport:
    """Replay ``workload`` through ``num_instances`` engines of ``cache`` each behind a
    router with ``policy``; see the module docstring.

    Every instance gets ``cache`` with events on. ``max_bus_events`` bounds the router's
    subscriber buffer (a smaller one forces gaps and resyncs). With ``remote`` (``write-back``
    or ``write-through``), the fleet shares an unbounded remote tier: blocks leaving an
    instance (or, write-through, every block it stores) are written to it (to a set, or
    to ``remote_store`` as small stand-in values keyed by block hash: see
    ``stand_in_namespace``), and
    a request's prefix found there past what its instance holds is imported into that
    instance's host tier when the request arrives (the fetch itself is not timed). Other
    arguments as in
    :func:`kvtier.sim.simulate`. Raises ValueError for a bad argument and
    :class:`SimulationStalled` if an instance can never admit its waiting requests.
    """
    if type(num_instances) is not int or num_instances < 1:
        raise ValueError(f"num_instances must be an integer >= 1, got {num_instances!r}")
    if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float)) or not (
            0 < time_scale < float("inf")):
        raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
    sched = sched if sched is not None else SchedulerConfig()
    model = _time_model(profile)
    policy = make_policy(policy) if isinstance(policy, str) else policy
    cache = replace(cache, enable_events=True)

    bus = InMemoryEventBus()
    subscriber = bus.subscribe(max_bus_events)
    router = Router(policy, cache.tokens_per_block, cache.hash_algo)
    if remote not in (None, "write-back", "write-through"):
        raise ValueError(f"remote must be None, 'write-back' or 'write-through', got {remote!r}")
    if remote_store is not None and remote is None:
        raise ValueError("remote_store needs a remote write policy")
    shared = _SharedTier(remote_store) if remote else None
    remote_stats = {"num_lookups": 0, "num_hit_blocks": 0, "num_imported_blocks": 0}
    instances = [_Instance(f"i{k}", _Loop(cache, sched, model, time_scale, progress, check_every),
                           shared, remote == "write-through")
                 for k in range(num_instances)]
    by_id = {inst.instance_id: inst for inst in instances}
    for inst in instances:
        bus.register_snapshot(inst.instance_id, inst.snapshot)
    # The cache-aware bound, measured for every policy so reports compare.
    bound_policy = policy if isinstance(policy, CacheAware) else CacheAware()
    max_excess = num_over = 0

    wall_start = time.perf_counter()
    with _fewer_gc_passes():
        for request in workload:
            t = request.arrival_s * time_scale
            for inst in instances:
                inst.advance_to(t)
                inst.publish_until(t, bus)
            router.index.apply_updates(subscriber.poll())
            loads = [InstanceLoad(inst.instance_id, inst.queue_depth(), sched.max_batch_size)
                     for inst in instances]
            decision = router.route(request.prompt, loads)
            chosen = by_id[decision.instance_id]
            depth = chosen.queue_depth()
            max_excess = max(max_excess, depth - min(x.queue_depth for x in loads))
            num_over += depth > bound_policy.bound(loads)
            chosen.num_routed += 1
            if shared is not None:
                _fetch_remote(chosen, request, shared, remote_stats)
            _arrive(chosen, request)
        for inst in instances:
            inst.finish()
    wall_s = time.perf_counter() - wall_start

    for inst in instances:
        inst.loop.manager.check_invariants()
        inst.publish_until(float("inf"), bus)
    router.index.apply_updates(subscriber.poll())
    router.index.check_invariants()
    tracker = subscriber.tracker
    events = {"num_published": bus.num_published, "num_dropped": subscriber.num_dropped,
              "num_gaps": tracker.num_gaps, "num_resyncs": tracker.num_resyncs,
              "num_index_inconsistent": router.index.num_inconsistent}
    report = _report(workload, instances, router, policy, sched, model, time_scale,
                     max_excess, num_over, events, wall_s)
    return replace(report, remote={"policy": remote, **remote_stats}) if remote else report


def _fetch_remote(inst: _Instance, request: TraceRequest, shared: _SharedTier,
                  stats: dict[str, int]) -> None:
    """Import into ``inst``'s host tier the blocks of ``request`` that the shared tier has
    past what ``inst`` holds (the chain stops at the first block it lacks)."""
    manager = inst.loop.manager
    stats["num_lookups"] += 1
    found = shared.run_length(manager.missing_block_hashes(request.prompt))
    if found:
        stats["num_hit_blocks"] += found
        stats["num_imported_blocks"] += len(manager.import_blocks(request.prompt, found))


def _arrive(inst: _Instance, request: TraceRequest) -> None:
    loop = inst.loop
    config = loop.manager.config
    loop._arrive(request, config.tokens_per_block, config.num_gpu_blocks)


def _max_over_mean(values: Sequence[int]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


def _report(workload: Workload, instances: list[_Instance], router: Router,
            policy: RoutingPolicy, sched: SchedulerConfig, model: TimeModel, time_scale: float,
            max_excess: int, num_over: int, events: dict[str, int], wall_s: float) -> FleetReport:
    summaries: list[InstanceSummary] = []
    reports: list[SimReport] = []
    ttfts: list[float] = []
    e2es: list[float] = []
    for inst in instances:
        inst.loop.num_steps = inst.num_steps
        r = inst.loop.report(workload, wall_s)
        reports.append(r)
        ttfts += inst.loop.ttfts
        e2es += inst.loop.e2es
        summaries.append(InstanceSummary(
            inst.instance_id, inst.num_routed, r.num_requests, r.num_prompt_tokens,
            r.num_reused_tokens, r.num_prompt_tokens - r.num_reused_tokens, r.token_hit_rate,
            r.gpu_token_hit_rate, r.host_token_hit_rate, r.num_preemptions, r.ttft_s))
    num_prompt = sum(r.num_prompt_tokens for r in reports)
    num_reused = sum(r.num_reused_tokens for r in reports)

    def share(n: int) -> float:
        return n / num_prompt if num_prompt else 0.0

    starts = [inst.loop.first_arrival_s for inst in instances
              if inst.loop.first_arrival_s is not None]
    makespan_s = max(inst.loop.last_finish_s for inst in instances) - min(starts, default=0.0)
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
        num_rejected_too_large=sum(r.num_rejected_too_large for r in reports),
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
        router_stats=router.stats.to_dict(),
        events=events,
        wall_s=wall_s,
    )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1e3:.1f} ms"


def format_fleet_report(report: FleetReport) -> list[str]:
    """The human table of one fleet simulation, one string per line. Pure."""
    r = report
    ttft = r.ttft_s
    lines = [
        f"workload    {r.workload.get('name')}, {r.num_instances} instances, router "
        f"{r.router['policy']}, time scale {r.time_scale:g}",
        f"requests    {r.num_requests:,} finished, {r.num_rejected_too_large:,} too large",
        f"hit rate    {r.token_hit_rate:.4f} of {r.num_prompt_tokens:,} prompt tokens: GPU "
        f"{r.gpu_token_hit_rate:.4f}, host {r.host_token_hit_rate:.4f}",
        f"balance     requests max/mean {r.requests_max_over_mean:.2f}, prefill tokens "
        f"max/mean {r.prefill_tokens_max_over_mean:.2f}, worst excess depth "
        f"{r.max_excess_depth}, {r.num_over_load_bound} over the load bound",
        f"TTFT        p50 {_ms(ttft.p50)}, p90 {_ms(ttft.p90)}, p99 {_ms(ttft.p99)} (virtual)",
        f"events      {r.events['num_published']:,} published, {r.events['num_gaps']} gaps, "
        f"{r.events['num_resyncs']} resyncs",
    ]
    if r.remote is not None:
        lines.append(f"remote      {r.remote['policy']}: {r.remote['num_hit_blocks']:,} blocks "
                     f"found for {r.remote['num_lookups']:,} arrivals, "
                     f"{r.remote['num_imported_blocks']:,} imported to host tiers")
    lines += [
        "",
        f"{'instance':<9}{'routed':>8}{'hit rate':>10}{'GPU':>8}{'host':>8}"
        f"{'prefill tok':>13}{'TTFT p50':>11}{'TTFT p99':>11}",
    ]
    for s in r.instances:
        lines.append(f"{s.instance_id:<9}{s.num_routed:>8,}{s.token_hit_rate:>10.4f}"
                     f"{s.gpu_token_hit_rate:>8.4f}{s.host_token_hit_rate:>8.4f}"
                     f"{s.num_prefill_tokens:>13,}{_ms(s.ttft_s.p50):>11}{_ms(s.ttft_s.p99):>11}")
    return lines
