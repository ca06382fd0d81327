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
from collections.abc import Callable, Iterable
from dataclasses import replace

from kvtier.config import CacheConfig
from kvtier.events import BlockRemoved, BlockStored, Event
from kvtier.publisher import InMemoryEventBus, Snapshot, manager_snapshot
from kvtier.remote import RemoteStore
from kvtier.remote.codec import RemoteNamespace
from kvtier.remote.tier import WRITE_POLICIES, WritePolicy
from kvtier.router import CacheAware, InstanceLoad, Router, RoutingPolicy, make_policy
from kvtier.scheduler import SchedulerConfig
from kvtier.sim.fleet_report import FleetReport, InstanceRun, fleet_report
from kvtier.sim.replay import ReplayLoop, SimulationStalled, as_time_model, fewer_gc_passes
from kvtier.sim.timemodel import ModelProfile, TimeModel
from kvtier.sim.workload import TraceRequest, Workload
from kvtier.storage import KVLayout


class _SharedTier:
    """The fleet's shared remote tier as block hashes: a set, or a real store (e.g. Redis)
    holding a small stand-in value per block, so its latency and faults are real."""

    def __init__(self, store: RemoteStore | None) -> None:
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

    def store_errors(self) -> dict[str, int]:
        """The real store's fault counters (all 0 for the in-memory set): a store that
        failed mid-run turned lookups into misses and writes into losses, and says so."""
        if self.store is None:
            return dict.fromkeys(("num_store_errors", "num_store_timeouts", "num_failed_puts",
                                  "num_short_circuited"), 0)
        stats = self.store.stats
        return {"num_store_errors": stats.num_errors, "num_store_timeouts": stats.num_timeouts,
                "num_failed_puts": stats.num_failed_puts,
                "num_short_circuited": stats.num_short_circuited}

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

    def __init__(self, instance_id: str, loop: ReplayLoop, remote: _SharedTier | None = None,
                 write_through: bool = False) -> None:
        self.instance_id = instance_id
        self.loop = loop
        self.remote = remote  # the shared remote tier's block hashes, if there is one
        self.written = (BlockStored, BlockRemoved) if write_through else (BlockRemoved,)
        self.pending: deque[tuple[float, list[Event]]] = deque()
        self.next_seq = 0  # one past the last event drained
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
            if not loop.step():
                break  # nothing can be scheduled until an arrival
            self._collect()
        loop.now_s = max(loop.now_s, t)

    def finish(self) -> None:
        loop = self.loop
        while loop.scheduler.has_unfinished():
            if not loop.step():
                raise SimulationStalled(f"instance {self.instance_id}: {loop.stall_message()}")
            self._collect()

    def _collect(self) -> None:
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
    remote: WritePolicy | None = None,
    remote_store: RemoteStore | None = None,
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
    model = as_time_model(profile)
    policy = make_policy(policy) if isinstance(policy, str) else policy
    cache = replace(cache, enable_events=True)

    bus = InMemoryEventBus()
    subscriber = bus.subscribe(max_bus_events)
    router = Router(policy, cache.tokens_per_block, cache.hash_algo)
    if remote is not None and remote not in WRITE_POLICIES:
        raise ValueError(f"remote must be None or one of {WRITE_POLICIES}, got {remote!r}")
    if remote_store is not None and remote is None:
        raise ValueError("remote_store needs a remote write policy")
    shared = _SharedTier(remote_store) if remote else None
    remote_stats = {"num_lookups": 0, "num_hit_blocks": 0, "num_imported_blocks": 0}
    instances = [_Instance(f"i{k}", ReplayLoop(cache, sched, model, time_scale, progress,
                                               check_every),
                           shared, remote == "write-through")
                 for k in range(num_instances)]
    by_id = {inst.instance_id: inst for inst in instances}
    for inst in instances:
        bus.register_snapshot(inst.instance_id, inst.snapshot)
    # The cache-aware bound, measured for every policy so reports compare.
    bound_policy = policy if isinstance(policy, CacheAware) else CacheAware()
    max_excess = num_over = 0

    wall_start = time.perf_counter()
    with fewer_gc_passes():
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
            chosen.loop.arrive(request)
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
    runs = [InstanceRun(inst.instance_id, inst.num_routed, inst.loop) for inst in instances]
    report = fleet_report(workload, runs, router, policy, sched, model, time_scale,
                          max_excess, num_over, events, wall_s)
    if shared is None:
        return report
    return replace(report, remote={"policy": remote, **remote_stats, **shared.store_errors()})


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
