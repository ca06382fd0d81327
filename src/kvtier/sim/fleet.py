"""N engine instances behind a router, on one virtual clock.

Each instance is a replay loop of its own (manager with events, scheduler, time model).
Requests are taken in arrival order; for each one at time ``t``::

    every instance: step while it has work and its clock is < t (a step may end past t),
                    the instance with the earliest clock first; an idle instance's clock
                    jumps to t
    every step's events are stamped with the step's end time and published to the bus
    once the fleet clock reaches that time: the router never sees the future
    router: apply the bus updates to its index, hash the prompt, ask the policy
    the chosen instance's scheduler gets the request (arrival t)

After the last arrival every instance runs to completion. The index lags the instances by
up to one step, as a real subscriber would.

With a shared remote tier, every fetch is charged (:class:`~kvtier.sim.timemodel.RemoteLink`)::

    arrival t   missing = the prompt's blocks past what the chosen instance holds
                k = how many of them to fetch: those whose fetch beats their recompute
                    (kvtier.remote.tier.num_blocks_worth_fetching, the rule the engine's
                    RemoteTier uses) or, with fetch="whole-prefix", all of them
                the request is held; the store reads the blocks of missing[:k] it has:
                    start = max(t, when the store is free)
                    done  = start + latency + bytes found / bytes_per_s
                at done: the consecutive run found is imported into the instance's host
                tier and the request released (at t + fetch_deadline_s at the latest,
                without what has not arrived); admission onboards the run over PCIe
    every step  the blocks it writes (write-through: computed, write-back: evicted from the
                host tier, as the engine's tier writes them) queue on the same store and
                become visible to fetches when their write is done

so a remote hit is never cheaper than its fetch: the request's TTFT includes the wait.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Literal, get_args

from kvtier.config import CacheConfig
from kvtier.event_bus import InMemoryEventBus
from kvtier.event_codec import Snapshot
from kvtier.event_updates import manager_snapshot
from kvtier.events import BlockRemoved, BlockStored, Event
from kvtier.remote import RemoteStore
from kvtier.remote.codec import RemoteNamespace
from kvtier.remote.tier import WRITE_POLICIES, WritePolicy, num_blocks_worth_fetching
from kvtier.reprs import shown
from kvtier.router import CacheAware, InstanceLoad, Router, RoutingPolicy, make_policy
from kvtier.scheduler import SchedulerConfig
from kvtier.sim.fleet_report import FleetReport, InstanceRun, fleet_report
from kvtier.sim.replay import (
    DRAFT_ACCEPTANCE,
    ReplayLoop,
    SimulationStalled,
    as_time_model,
    check_draft_acceptance,
    check_replay_args,
    fewer_gc_passes,
    replay_requests,
    too_large,
)
from kvtier.sim.report import Summary
from kvtier.sim.timemodel import ModelProfile, RemoteLink, TimeModel
from kvtier.sim.workload import TraceRequest, Workload, check_time_scale
from kvtier.storage import KVLayout
from kvtier.tier import Tier

FetchMode = Literal["beats-recompute", "whole-prefix"]
"""Which missing blocks a fetch reads: those whose fetch beats their recompute, or all."""
FETCH_MODES: tuple[FetchMode, ...] = get_args(FetchMode)


class _SharedTier:
    """The fleet's shared remote tier: which blocks it holds and since when, and the store's
    queue of transfers (:class:`RemoteLink`). The blocks live in a dict, or in a real store
    (e.g. Redis) as small stand-in values, so its faults are real; the time is the link's.
    """

    def __init__(self, store: RemoteStore | None, link: RemoteLink, bytes_per_block: int) -> None:
        self.store = store
        self.link = link
        self.bytes_per_block = bytes_per_block
        self.visible_s: dict[int, float] = {}  # block hash -> when its write is done
        self.free_s = 0.0  # when the store is done with every transfer queued so far
        self.num_written_blocks = self.num_dropped_writes = 0
        self._value = b""
        if store is not None:
            self._value = bytes(store.namespace.layout.bytes_per_block)

    def reserve(self, at_s: float, num_bytes: int) -> float:
        """Queue a transfer of ``num_bytes`` at ``at_s``; when the store has moved them."""
        start_s = max(at_s, self.free_s)
        self.free_s = start_s + self.link.transfer_seconds(num_bytes)
        return self.free_s

    def add(self, hashes: list[int], now_s: float) -> None:
        """Write ``hashes`` (one batch, at ``now_s``), or drop them if the store is more
        than ``max_backlog_s`` behind."""
        if not hashes:
            return
        if self.free_s - now_s > self.link.max_backlog_s:
            self.num_dropped_writes += len(hashes)
            return
        written = len(hashes)
        if self.store is not None:
            # NOTE: a caller's store may raise or answer anything (a subclass's put_many):
            # a str or an exception stopped the fleet, 99 for 2 blocks counted 99 written,
            # 2.0 made the count a float, -1 took one off. No count of the blocks written is
            # a write that failed, as the engine's tier reads it (remote/ranks.py).
            try:
                written = self.store.put_many(dict.fromkeys(hashes, self._value))
            except Exception:
                written = 0
            if type(written) is not int or not 0 < written <= len(hashes):
                return
        done_s = self.reserve(now_s, len(hashes) * self.bytes_per_block)
        # NOTE: a real store's count: one that took some of a batch (a SET refused out of
        # memory) had the whole batch counted written beside its failed puts. Which ones it
        # took is not known: each is visible, and a read asks the store.
        self.num_written_blocks += written
        visible = self.visible_s
        for h in hashes:
            if h not in visible:  # a rewrite of a block does not hide it meanwhile
                visible[h] = done_s

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

    def visible(self, hashes: list[int], at_s: float) -> set[int]:
        """Which of ``hashes`` have been written by ``at_s`` (their write done). Pure."""
        visible = self.visible_s
        return {h for h in hashes if visible.get(h, float("inf")) <= at_s}

    def read(self, hashes: list[int]) -> set[int]:
        """Which of ``hashes`` (all visible) a read returns: all of them from the dict; from
        a real store, those it still answers for (a fault is a miss)."""
        if self.store is None or not hashes:
            return set(hashes)
        # NOTE: a caller's store that raises or answers no mapping is a miss (it stopped
        # the fleet), and a block it answers that was not asked for is not fetched (it was
        # charged and counted fetched).
        try:
            found = self.store.get_many(hashes)
            return set(hashes).intersection(found) if isinstance(found, Mapping) else set()
        except Exception:
            return set()


@dataclass(slots=True)
class _Fetch:
    """A fetch in flight: its request, its prompt, the hashes read, when they arrive."""

    request_id: str
    prompt: list[int]
    found: set[int]
    done_s: float


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
        # NOTE: as the engine's tier writes: write-through a block computed here (stored),
        # write-back a host block that left (removed from the host tier, the spill log).
        # Write-through wrote removed blocks again, and a block imported from the store back
        # to it (its BlockStored); write-back a GPU block dropped with no host copy (its
        # KV gone with its slot): none is a write the engine makes, yet each took the
        # store's queue, ahead of every instance's next fetch, and the last served hits.
        self.write_through = write_through
        self.imported: set[int] = set()  # fetched blocks whose BlockStored is not drained
        self.pending: deque[tuple[float, list[Event]]] = deque()
        self.next_seq = 0  # one past the last event drained
        self.num_routed = 0
        # Remote fetches in flight: (time, order, fetch or a request id to release).
        self.fetches: list[tuple[float, int, _Fetch | str]] = []
        self.num_fetch_events = 0
        self.num_imported_blocks = 0

    def queue_depth(self) -> int:
        scheduler = self.loop.scheduler
        return len(scheduler.waiting) + len(scheduler.running)

    def snapshot(self) -> Snapshot:
        # NOTE: the manager's state now, which may include a step ending after the fleet
        # clock: a resync can see up to one step ahead. next_seq covers those events, so
        # they are skipped when published, never applied twice.
        return manager_snapshot(self.loop.manager, self.instance_id, self.next_seq)

    def advance_once(self, t: float) -> bool:
        """One step (or a jump to the next fetch landing) if the clock is before ``t`` and
        there is work; else move the clock to ``t`` (an idle instance waits for the next
        arrival) and return False. With ``t`` infinite, run to the end: False when done,
        :class:`SimulationStalled` if nothing can ever run."""
        loop = self.loop
        self._land_fetches()
        if loop.scheduler.has_unfinished() and loop.now_s < t:
            if loop.step():
                self._collect()
                return True
            # Nothing can be scheduled until a fetch lands or a request arrives.
            next_s = self.fetches[0][0] if self.fetches else None
            if next_s is not None and next_s < t:
                loop.now_s = next_s
                return True
            if t == float("inf"):
                raise SimulationStalled(f"instance {self.instance_id}: {loop.stall_message()}")
        if t < float("inf"):
            loop.now_s = max(loop.now_s, t)
            self._land_fetches()
        return False

    def start_fetch(self, fetch: _Fetch, release_s: float) -> None:
        """Hold the fetch's request until its blocks land (or ``release_s``, if earlier)."""
        self.loop.scheduler.hold(fetch.request_id)
        self._push(fetch.done_s, fetch)
        if release_s < fetch.done_s:
            self._push(release_s, fetch.request_id)

    def _push(self, at_s: float, item: _Fetch | str) -> None:
        self.num_fetch_events += 1
        heapq.heappush(self.fetches, (at_s, self.num_fetch_events, item))

    def _land_fetches(self) -> None:
        """Import the fetches that have arrived by now and release their requests."""
        fetches, loop = self.fetches, self.loop
        while fetches and fetches[0][0] <= loop.now_s:
            item = heapq.heappop(fetches)[2]
            if isinstance(item, str):
                loop.scheduler.release(item)  # its deadline: it goes on without the rest
                continue
            manager = loop.manager
            # The local tiers may have grown meanwhile: import from where they end now.
            missing = manager.missing_block_hashes(item.prompt)
            run = 0
            while run < len(missing) and missing[run] in item.found:
                run += 1
            if run:
                num_imported = len(manager.import_blocks(item.prompt, run))
                self.num_imported_blocks += num_imported
                if self.write_through:  # else nothing stored is written
                    self.imported.update(missing[:num_imported])
            loop.scheduler.release(item.request_id)

    def _collect(self) -> None:
        events = self.loop.manager.drain_events()
        if self.remote is not None:
            # Write-back: a block that leaves this instance's host tier goes to the shared
            # tier (write-through: every block computed here), where every instance can
            # fetch it, content-addressed by its chained hash.
            imported = self.imported
            hashes = []
            for e in events:
                if self.write_through:
                    if not isinstance(e, BlockStored):
                        continue
                    if e.block_hash in imported:
                        imported.discard(e.block_hash)  # its import: read from the store
                        continue
                elif not (isinstance(e, BlockRemoved) and e.tier is Tier.HOST):
                    continue
                hashes.append(e.block_hash)
            self.remote.add(hashes, self.loop.now_s)
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
    remote_link: RemoteLink | None = None,
    fetch: FetchMode = "beats-recompute",
    fetch_deadline_s: float = 1.0,
    draft_acceptance: float = DRAFT_ACCEPTANCE,
) -> FleetReport:
    """Replay ``workload`` through ``num_instances`` engines of ``cache`` each behind a
    router with ``policy``; see the module docstring.

    Every instance gets ``cache`` with events on. ``max_bus_events`` bounds the router's
    subscriber buffer (a smaller one forces gaps and resyncs). With ``remote`` (``write-back``
    or ``write-through``), the fleet shares an unbounded remote tier: blocks leaving an
    instance's host tier (or, write-through, every block it computes) are written to it (to a
    set, or to ``remote_store`` as small stand-in values keyed by block hash: see
    ``stand_in_namespace``), and a request's prefix found there past what its instance
    holds is fetched, charged on ``remote_link`` (default: :class:`RemoteLink`'s measured
    figures), into that instance's host tier while the request is held: with ``fetch``
    ``"beats-recompute"`` only the blocks whose fetch beats their recompute under the
    profile's prefill cost (none when the link is slower than
    ``TimeModel.break_even_bytes_per_s``), with ``"whole-prefix"`` all of them; a request
    waits at most ``fetch_deadline_s`` (see the module docstring). Other arguments as in
    :func:`kvtier.sim.simulate` (``draft_acceptance`` for every instance's drafts, with
    ``sched.num_speculative_tokens``). Raises ValueError for a bad argument and
    :class:`SimulationStalled` if an instance can never admit its waiting requests.
    """
    if type(num_instances) is not int or num_instances < 1:
        raise ValueError(f"num_instances must be an integer >= 1, got {shown(num_instances)}")
    time_scale = check_time_scale(time_scale)
    sched = check_replay_args(workload, cache, sched, progress)
    model = as_time_model(profile)
    acceptance = check_draft_acceptance(draft_acceptance)
    policy = make_policy(policy) if isinstance(policy, str) else policy
    cache = replace(cache, enable_events=True)

    bus = InMemoryEventBus()
    subscriber = bus.subscribe(max_bus_events)
    router = Router(policy, cache.tokens_per_block, cache.hash_algo)
    if remote is not None and remote not in WRITE_POLICIES:
        raise ValueError(f"remote must be None or one of {WRITE_POLICIES}, got {shown(remote)}")
    if remote_store is not None and remote is None:
        raise ValueError("remote_store needs a remote write policy")
    link = remote_link if remote_link is not None else RemoteLink()
    if not isinstance(link, RemoteLink):
        raise ValueError(f"remote_link must be a RemoteLink or None, got {shown(remote_link)}")
    if fetch not in FETCH_MODES:
        raise ValueError(f"fetch must be one of {FETCH_MODES}, got {shown(fetch)}")
    if isinstance(fetch_deadline_s, bool) or not isinstance(fetch_deadline_s, (int, float)) \
            or not 0 <= fetch_deadline_s <= 3600:
        raise ValueError(f"fetch_deadline_s must be a number in [0, 3600], got "
                         f"{shown(fetch_deadline_s)}")
    tpb = cache.tokens_per_block
    shared = (_SharedTier(remote_store, link, tpb * model.profile.kv_bytes_per_token)
              if remote else None)
    plan = _FetchPlan(fetch, tpb * model.profile.prefill_s_per_token, float(fetch_deadline_s))
    remote_stats = dict.fromkeys(("num_lookups", "num_hit_blocks", "num_fetches",
                                  "num_fetched_blocks", "num_skipped_blocks"), 0)
    fetch_s: list[float] = []
    instances = [_Instance(f"i{k}", ReplayLoop(cache, sched, model, time_scale, progress,
                                               check_every, draft_acceptance=acceptance),
                           shared, remote == "write-through")
                 for k in range(num_instances)]
    by_id = {inst.instance_id: inst for inst in instances}
    for inst in instances:
        bus.register_snapshot(inst.instance_id, inst.snapshot)
    # The cache-aware bound, measured for every policy so reports compare.
    bound_policy = policy if isinstance(policy, CacheAware) else CacheAware()
    max_excess = num_over = num_too_large = 0

    wall_start = time.perf_counter()
    with fewer_gc_passes():
        for request in replay_requests(workload):
            t = request.scaled_arrival_s(time_scale)
            _advance(instances, t)
            for inst in instances:
                inst.publish_until(t, bus)
            router.apply_updates(subscriber.poll())
            if too_large(request, cache, sched):
                # NOTE: skipped before routing (every instance has the same pools and step
                # budget, so none could serve it): routed first, it counted as routed to the
                # instance that skipped it (per-instance counts, requests max/mean, the
                # router's stats, the excess depth and the load bound), as served work.
                num_too_large += 1
                if progress is not None:
                    progress(1)
                continue
            loads = [InstanceLoad(inst.instance_id, inst.queue_depth(), sched.max_batch_size)
                     for inst in instances]
            decision = router.route(request.prompt, loads)
            chosen = by_id[decision.instance_id]
            depth = chosen.queue_depth()
            max_excess = max(max_excess, depth - min(x.queue_depth for x in loads))
            num_over += depth > bound_policy.bound(loads)
            chosen.num_routed += 1
            chosen.loop.arrive(request)
            if shared is not None and request.request_id in chosen.loop.live:
                _fetch_remote(chosen, request, t, shared, plan, remote_stats, fetch_s)
        _advance(instances, float("inf"))
    wall_s = time.perf_counter() - wall_start

    for inst in instances:
        inst.loop.manager.check_invariants()
        inst.publish_until(float("inf"), bus)
    router.apply_updates(subscriber.poll())
    router.index.check_invariants()
    tracker = subscriber.tracker
    events = {"num_published": bus.num_published, "num_dropped": subscriber.num_dropped,
              "num_gaps": tracker.num_gaps, "num_resyncs": tracker.num_resyncs,
              "num_index_inconsistent": router.index.num_inconsistent}
    runs = [InstanceRun(inst.instance_id, inst.num_routed, inst.loop) for inst in instances]
    report = fleet_report(workload, runs, router, policy, sched, model, time_scale,
                          max_excess, num_over, events, wall_s, num_too_large)
    if shared is None:
        return report
    return replace(report, remote={
        "policy": remote, "fetch": fetch, "latency_s": link.latency_s,
        "bytes_per_s": link.bytes_per_s, "break_even_bytes_per_s": model.break_even_bytes_per_s,
        "fetch_deadline_s": plan.deadline_s, **remote_stats,
        "num_imported_blocks": sum(inst.num_imported_blocks for inst in instances),
        "num_written_blocks": shared.num_written_blocks,
        "num_dropped_writes": shared.num_dropped_writes,
        "fetch_s": asdict(Summary.of(fetch_s)),
        **shared.store_errors()})


def _advance(instances: list[_Instance], t: float) -> None:
    """Run every instance up to ``t`` (to the end if infinite), always stepping the one
    whose clock is earliest, so that the shared tier sees their writes in time order."""
    heap = [(inst.loop.now_s, k) for k, inst in enumerate(instances)]
    heapq.heapify(heap)
    while heap:
        k = heapq.heappop(heap)[1]
        if instances[k].advance_once(t):
            heapq.heappush(heap, (instances[k].loop.now_s, k))


def _fetch_remote(inst: _Instance, request: TraceRequest, t: float, shared: _SharedTier,
                  plan: _FetchPlan, stats: dict[str, int], fetch_s: list[float]) -> None:
    """Start the fetch, charged, of the blocks of ``request`` (arrived at ``t``) past what
    ``inst`` holds: as many as ``plan`` says, of which the store returns those it has; see
    the module docstring."""
    manager = inst.loop.manager
    stats["num_lookups"] += 1
    missing = manager.missing_block_hashes(request.prompt)
    if not missing:
        return
    visible = shared.visible(missing, t)
    run = 0
    while run < len(missing) and missing[run] in visible:
        run += 1
    stats["num_hit_blocks"] += run
    link = shared.link
    wait_s = max(0.0, shared.free_s - t)  # the store's queue ahead of this read
    if plan.mode == "whole-prefix":
        num_asked = len(missing)
    else:
        # NOTE: like the engine, decided before knowing how many the store has: a fetch
        # that finds fewer loses at most one latency against their recompute.
        num_asked = num_blocks_worth_fetching(
            len(missing), latency_s=link.latency_s + wait_s,
            fetch_s_per_block=link.transfer_seconds(shared.bytes_per_block),
            recompute_s_per_block=plan.recompute_s_per_block, max_wait_s=plan.deadline_s)
    stats["num_skipped_blocks"] += run - min(run, num_asked)
    if not num_asked:
        return
    found = shared.read([h for h in missing[:num_asked] if h in visible])
    done_s = shared.reserve(t, len(found) * shared.bytes_per_block) + link.latency_s
    stats["num_fetches"] += 1
    stats["num_fetched_blocks"] += len(found)
    fetch_s.append(done_s - t)
    inst.start_fetch(_Fetch(request.request_id, request.prompt, found, done_s),
                     t + plan.deadline_s)


@dataclass(frozen=True, slots=True)
class _FetchPlan:
    """How a fleet decides its fetches: the mode, a block's recompute time, the deadline."""

    mode: FetchMode
    recompute_s_per_block: float
    deadline_s: float
