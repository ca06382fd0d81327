"""The replay loop: a workload driven through the scheduler and manager on a virtual clock.

::

    clock ──► add every request whose arrival (arrival_s x time_scale) has come
              idle (nothing waiting or running)? jump the clock to the next arrival
              step()  → chunks, decodes, transfer plan
              clock += step_seconds(prefill tokens, decode seqs, bytes H2D, bytes D2H)
              update(step, sampled tokens) → finished requests

A request's first token comes at the end of the step that completes its (first) prefill;
TTFT and end-to-end latency are measured from its arrival. Only ``step()`` and ``update()``
are timed, in the CPU time of the thread that runs them (``time.thread_time``: what a
machine shared with other work takes from it between two readings does not count):
building prompts and the loop's own books are not.
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from fractions import Fraction
from itertools import count

from kvtier.blocks import cdiv
from kvtier.config import CacheConfig
from kvtier.eviction import EvictionPolicy
from kvtier.manager import KVCacheManager
from kvtier.reprs import shown
from kvtier.request import Request
from kvtier.scheduled_step import STEP_PHASES, ScheduledStep, StepPhases
from kvtier.scheduler import SchedulerConfig
from kvtier.sequence import short_repr
from kvtier.sim.oracle import oracle_bounds
from kvtier.sim.probe import make_scheduler
from kvtier.sim.report import OracleBounds, SimReport, Summary, estimate_load
from kvtier.sim.timemodel import ModelProfile, TimeModel, get_profile
from kvtier.sim.workload import SAMPLED_TOKEN_BASE, TraceRequest, Workload, check_time_scale
from kvtier.tier import Tier
from kvtier.transfer.plan import OP_KINDS, OpKind, PlanColumns, TransferPlan

# NOTE: sampled tokens are fresh ids from SAMPLED_TOKEN_BASE up, above every token id a
# workload may hold (and still int64, as block hashing packs them), so output never
# matches a prompt.

# The clock of the CPU figures: the calling thread's CPU time, not the wall clock, so a step
# the OS preempted (another job on a shared machine) does not read as slow.
_cpu_clock = time.thread_time

# A step counts as "full" for the CPU figures when it schedules at least this share of
# max_num_tokens: the cost the scheduler's speed target is about. NOTE: a fraction, so
# that the threshold is an exact int for any budget (0.9 x a budget past the float range,
# 10**400, raised OverflowError after the first step).
FULL_STEP_SHARE = Fraction(9, 10)

# The chance that one draft token is accepted, where the caller gives none: the middle of
# what EAGLE-style drafters report on chat (0.6-0.8 a token).
DRAFT_ACCEPTANCE = 0.7


_OFFLOAD = OP_KINDS.index(OpKind.OFFLOAD)
_ONBOARD = OP_KINDS.index(OpKind.ONBOARD)


class SimulationStalled(RuntimeError):
    """The scheduler scheduled nothing, nothing was running and no request was left to
    arrive: the waiting requests can never be admitted (a scheduler or manager defect)."""


def simulate(
    workload: Workload,
    cache: CacheConfig,
    sched: SchedulerConfig | None = None,
    profile: ModelProfile | TimeModel | str = "llama3-8b-h100",
    time_scale: float = 1.0,
    progress: Callable[[int], object] | None = None,
    oracle: bool = False,
    check_every: int | None = None,
    phases: bool = False,
    policy: EvictionPolicy | None = None,
    draft_acceptance: float = DRAFT_ACCEPTANCE,
) -> SimReport:
    """Replay ``workload`` through a fresh scheduler and manager; see the module docstring.

    ``time_scale`` multiplies arrival times (2.0 spreads arrivals out, halving the load).
    ``progress`` is called with 1 as each request finishes or is skipped (a tqdm bar's
    ``update`` fits). Requests that could never fit the GPU pool are skipped and counted in
    ``num_rejected_too_large``. ``oracle`` adds :func:`oracle_bounds` at the cache's
    capacity, over the requests served (the skipped ones left out), under its partial
    reuse rule. ``check_every`` runs
    ``check_invariants`` every that many steps (for tests); they always run once at the end.
    ``phases`` times each phase of every step (:class:`~kvtier.scheduled_step.StepPhases`,
    a debug counter) and reports where the full steps' time went
    (``SimReport.step_phases_us``). ``policy`` replaces the eviction policy ``cache`` names
    (e.g. :class:`~kvtier.sim.clairvoyant.Clairvoyant`, which must see the stream; a policy
    object serves one cache, so pass a new one to every call); the report names the one
    used. With ``sched.num_speculative_tokens``, each draft is accepted with probability
    ``draft_acceptance`` until one is not (a seeded draw: replays repeat), the drafts are
    timed as tokens the step computes (the drafter's own cost is not modelled), and the
    report's ``speculative`` counts them. Raises ValueError for a bad argument
    and :class:`SimulationStalled` if waiting requests can never be admitted.
    """
    sched = check_replay_args(workload, cache, sched, progress, oracle=oracle, phases=phases)
    model = as_time_model(profile)
    time_scale = check_time_scale(time_scale)
    if check_every is not None and (type(check_every) is not int or check_every < 1):
        raise ValueError(f"check_every must be an integer >= 1 or None, got {shown(check_every)}")
    loop = ReplayLoop(cache, sched, model, time_scale, progress, check_every, phases, policy,
                      check_draft_acceptance(draft_acceptance))
    wall_start = time.perf_counter()
    with fewer_gc_passes():
        loop.run(replay_requests(workload))
    wall_s = time.perf_counter() - wall_start
    report = loop.report(workload, wall_s)
    if oracle:
        capacity = cache.num_gpu_blocks + cache.num_host_blocks
        # Nothing served, nothing to bound (and no stream of skipped giants to read again).
        bounds = (oracle_bounds(workload, cache.tokens_per_block, [capacity],
                                skip=frozenset(loop.skipped),
                                partial_reuse=cache.enable_partial_reuse)[0]
                  if loop.num_requests
                  else OracleBounds(cache.tokens_per_block, capacity, 0.0, 0.0, 0.0))
        report = replace(report, oracle=bounds)
    return report


def check_replay_args(workload: object, cache: object, sched: object, progress: object,
                      **flags: object) -> SchedulerConfig:
    """``sched`` (a fresh :class:`SchedulerConfig` for None) once the arguments a replay
    takes before its first step are of the right kind; TypeError naming the first that is
    not. Pure.

    NOTE: a list of requests (no ``name`` or ``describe``) failed with AttributeError only
    after the whole replay had run, a ``sched`` of the wrong type and a ``progress`` that
    cannot be called failed mid-run from deep inside, and ``phases="no"`` timed phases."""
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a Workload (name, describe() and __iter__), got "
                        f"{short_repr(workload)}")
    if not isinstance(cache, CacheConfig):
        raise TypeError(f"cache must be a CacheConfig, got {short_repr(cache)}")
    if sched is not None and not isinstance(sched, SchedulerConfig):
        raise TypeError(f"sched must be a SchedulerConfig or None, got {short_repr(sched)}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable or None, got {short_repr(progress)}")
    for flag, value in flags.items():
        if type(value) is not bool:
            raise TypeError(f"{flag} must be a bool, got {short_repr(value)}")
    return sched if sched is not None else SchedulerConfig()


def replay_requests(workload: Iterable[object]) -> Iterator[TraceRequest]:
    """``workload``'s requests, each checked as it comes: ValueError naming its position
    for one that is not a :class:`TraceRequest`, that arrives before the one before it,
    that repeats an earlier one's id or whose prompt holds a token id from
    :data:`SAMPLED_TOKEN_BASE` up (the replay's sampled tokens: a prompt holding them
    reused another request's output as its own prefix, hits no trace holds).

    NOTE: the trace readers refuse lines out of order, a workload of objects was not
    checked: a request arriving earlier than the one before was queued late and its
    latencies counted from its own earlier arrival, a non-request was an AttributeError
    from the loop, and an id repeated was refused by the scheduler while the first was
    live and served twice (in a fleet, on two instances) once it had finished."""
    previous_s = 0.0
    seen: set[str] = set()
    for position, request in enumerate(workload):
        if not isinstance(request, TraceRequest):
            raise ValueError(f"request {position} of the workload must be a TraceRequest, got "
                             f"{short_repr(request)}")
        if request.request_id in seen:
            raise ValueError(f"request {position} of the workload has the id "
                             f"{shown(request.request_id)} of an earlier request: a workload's "
                             "request ids are distinct")
        seen.add(request.request_id)
        try:
            top = max(request.prompt)
        except TypeError:  # a token that is no number: the scheduler's checks name it
            top = None
        if isinstance(top, int) and top >= SAMPLED_TOKEN_BASE:
            raise ValueError(f"request {position} of the workload ({shown(request.request_id)}) "
                             f"holds token id {shown(top)}: a workload's ids stay below "
                             f"2**62, where a replay's sampled tokens begin")
        if request.arrival_s < previous_s:
            raise ValueError(f"request {position} of the workload ({shown(request.request_id)}) "
                             f"arrives at {shown(request.arrival_s)} s, before the request before "
                             f"it ({shown(previous_s)} s): a workload yields requests in arrival "
                             "order")
        previous_s = request.arrival_s
        yield request


def check_draft_acceptance(value: object) -> float:
    """``value`` as a draft acceptance: ValueError unless a number in [0, 1]. Pure."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"draft_acceptance must be a number in [0, 1], got {shown(value)}")
    return float(value)


def too_large(request: TraceRequest, cache: CacheConfig, sched: SchedulerConfig) -> bool:
    """Whether a replay skips ``request`` (and counts it in ``num_rejected_too_large``):
    its prompt and output could never fit the GPU pool at once or, without chunked
    prefill, its prompt is past one step's token budget. Pure."""
    num_blocks = cdiv(len(request.prompt) + max(1, request.output_length),
                      cache.tokens_per_block)
    return num_blocks > cache.num_gpu_blocks or (
        not sched.enable_chunked_prefill and len(request.prompt) > sched.max_num_tokens)


@contextmanager
def fewer_gc_passes() -> Iterator[None]:
    """Raise the cyclic collector's thresholds for the duration of a replay.

    NOTE: a replay keeps millions of long-lived objects (the cached tree, its runs and
    token lists), and with the default thresholds the collector rescans that whole, growing
    heap every few thousand steps, finding no cycles: a fifth of the run time on the whole
    Mooncake conversation trace. The thresholds are restored afterwards.
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def as_time_model(profile: ModelProfile | TimeModel | str) -> TimeModel:
    """``profile`` as a time model: a registered profile name, a profile, or a model."""
    if isinstance(profile, TimeModel):
        return profile
    if isinstance(profile, str):
        return TimeModel(get_profile(profile))
    return TimeModel(profile)


class ReplayLoop:
    """One engine instance under replay: a manager, a scheduler, a virtual clock and the
    books of what it served.

    Contract: ``arrive`` queues a request (or counts it as too large), ``step`` runs one
    forward pass and advances ``now_s`` by its modelled duration, ``run`` drives a whole
    request stream; ``now_s`` may also be moved forward by the caller (an idle instance's
    clock jumping to the next arrival), never back. ``report`` is a query.
    """

    def __init__(self, cache: CacheConfig, sched: SchedulerConfig, model: TimeModel,
                 time_scale: float, progress: Callable[[int], object] | None,
                 check_every: int | None, phases: bool = False,
                 policy: EvictionPolicy | None = None,
                 draft_acceptance: float = DRAFT_ACCEPTANCE) -> None:
        self.now_s = 0.0
        self.manager = KVCacheManager(cache, clock=lambda: self.now_s, policy=policy)
        self.scheduler = make_scheduler(self.manager, sched)
        self.sched = sched
        self.num_full_step_tokens = math.ceil(FULL_STEP_SHARE * sched.max_num_tokens)
        self.model = model
        self.time_scale = time_scale
        self.progress = progress
        self.check_every = check_every
        self.sampled_ids = count(SAMPLED_TOKEN_BASE)
        # Speculative decoding: which drafts are accepted (seeded), and how many were.
        self.draft_acceptance = draft_acceptance
        self.drafts_rng = random.Random(0)
        self.num_draft_tokens = self.num_accepted_draft_tokens = 0
        self.live: dict[str, Request] = {}
        # Live requests whose trace gives no output: served as their prefill, whose one
        # sampled token (an engine samples one to end the prefill) is no output.
        self.prefill_only: set[str] = set()
        self.first_token_s: dict[str, float] = {}
        self.ttfts: list[float] = []
        self.e2es: list[float] = []
        self.step_cpu_s: list[float] = []  # per step that ran (``num_steps``)
        self.scheduler_cpu_s = 0.0  # every call, a step or not
        self.full_step_cpu_s: list[float] = []
        # With ``phases``: each full step's seconds per phase, as the scheduler timed them.
        self.phases = StepPhases(_cpu_clock) if phases else None
        self.scheduler.phases = self.phases
        self.full_step_phases: list[dict[str, float]] = []
        self.num_requests = self.num_rejected = self.num_output_tokens = 0
        # Positions in the arrival stream of the requests skipped as too large.
        self.num_arrived = 0
        self.skipped: list[int] = []
        self.num_finished_prompt_tokens = 0
        self.first_arrival_s: float | None = None
        self.last_finish_s = 0.0
        self.num_credited = self.num_obtained = self.num_lost = 0
        self.num_scheduled = self.num_overflow_steps = self.num_overflow = 0
        # The tokens the steps' prefill chunks computed (a preempted request's recompute
        # included): the prefill work done, which the queries' prompt less reuse is not.
        self.num_context_tokens = 0
        self.max_overflow = self.num_preemptions = 0
        self.bytes_h2d = self.bytes_d2h = 0
        self.num_steps = 0
        self.busy_s = 0.0  # virtual time spent in steps
        self.last_arrival_s = 0.0

    def run(self, requests: Iterator[TraceRequest]) -> None:
        """Serve ``requests`` (in arrival order) to the end; see the module docstring."""
        scheduler = self.scheduler
        scale = self.time_scale
        upcoming = next(requests, None)
        while True:
            while upcoming is not None and upcoming.arrival_s * scale <= self.now_s:
                self.arrive(upcoming)
                upcoming = next(requests, None)
            if not scheduler.has_unfinished():
                if upcoming is None:
                    break
                self.now_s = max(self.now_s, upcoming.arrival_s * scale)
                continue
            if not self.step():
                # Nothing could be scheduled now; only an arrival can change that.
                if upcoming is None:
                    raise SimulationStalled(self.stall_message())
                self.now_s = max(self.now_s, upcoming.arrival_s * scale)
        self.manager.check_invariants()

    def stall_message(self) -> str:
        """Why nothing can be scheduled: the queues and the first waiting request. Pure."""
        scheduler = self.scheduler
        head = scheduler.waiting[0] if scheduler.waiting else None
        text = (f"the scheduler made no progress at t={self.now_s:.3f} s with "
                f"{len(scheduler.waiting)} requests waiting, {len(scheduler.running)} running "
                "and none to come")
        if head is None:
            return text
        config = self.manager.config
        num_blocks = cdiv(len(head.prompt) + head.max_output_tokens, config.tokens_per_block)
        return (f"{text}; the first waiting, {shown(head.request_id)}, needs {num_blocks} of "
                f"{config.num_gpu_blocks} GPU blocks")

    def arrive(self, request: TraceRequest) -> None:
        """Queue ``request`` at its (scaled) arrival time, or count it as too large (for
        the GPU pool, or, without chunked prefill, for a step's token budget). Raises
        ValueError if the scheduler refuses it for another reason."""
        config = self.manager.config
        arrival_s = request.scaled_arrival_s(self.time_scale)
        max_output = max(1, request.output_length)
        position = self.num_arrived
        self.num_arrived += 1
        # The scheduler refuses these too (ValueError); checked here so that only they are
        # skipped and any other refusal still raises.
        if too_large(request, config, self.scheduler.config):
            self.num_rejected += 1
            self.skipped.append(position)
            if self.progress is not None:
                self.progress(1)
            return
        # NOTE: the span of the arrivals served, as every other figure: a skipped request
        # 600 s after the rest stretched the span (a replay 27 x over capacity read as
        # 0.02 x) and one 600 s before them the makespan (4,488 tokens/s read as 79).
        if self.first_arrival_s is None:
            self.first_arrival_s = arrival_s
        self.last_arrival_s = arrival_s
        req = Request(request.request_id, request.prompt, max_output, arrival_s)
        self.scheduler.add_request(req)
        self.live[req.request_id] = req
        if not request.output_length:
            self.prefill_only.add(req.request_id)

    def step(self) -> bool:
        """Run one step; False if it scheduled nothing (the clock did not move). Runs
        ``check_invariants`` every ``check_every`` steps."""
        scheduler = self.scheduler
        live = self.live
        t0 = _cpu_clock()
        step = scheduler.step()
        cpu_s = _cpu_clock() - t0

        # Who samples: every decode, and every chunk that completes its prefill.
        sampled: dict[str, int | list[int]] = {}
        first: list[str] = []
        num_prefill = 0
        for chunk in step.context_chunks:
            num_prefill += chunk.num_tokens
            rid = chunk.request_id
            if chunk.first_token + chunk.num_tokens >= live[rid].num_prefill_tokens:
                sampled[rid] = next(self.sampled_ids)
                if rid not in self.first_token_s:
                    first.append(rid)
        if step.num_draft_tokens:
            num_prefill += self._sample_drafts(step, sampled)
        else:
            for rid in step.decode_request_ids:
                sampled[rid] = next(self.sampled_ids)
        t0 = _cpu_clock()
        finished = scheduler.update(step, sampled)
        cpu_s += _cpu_clock() - t0
        num_decode = len(step.decode_request_ids)
        bytes_h2d, bytes_d2h = self._transfers(step.transfer_plan)
        step_s = self.model.step_seconds(num_prefill, num_decode, bytes_h2d, bytes_d2h)
        self.now_s += step_s
        self.busy_s += step_s

        # NOTE: a call that scheduled nothing (a request held for a fetch, nothing else to
        # run) is no step (``num_steps``): its CPU counts in the total, not in the per-step
        # figures, which such cheap polls pulled down.
        self.scheduler_cpu_s += cpu_s
        if num_prefill or num_decode:
            self.step_cpu_s.append(cpu_s)
        if step.num_scheduled_tokens >= self.num_full_step_tokens:
            self.full_step_cpu_s.append(cpu_s)
            if self.phases is not None:
                self.full_step_phases.append(self.phases.last)
        self.num_scheduled += step.num_scheduled_tokens
        self.num_context_tokens += sum(c.num_tokens for c in step.context_chunks)
        self.num_credited += step.num_credited_tokens
        self.num_obtained += step.num_reused_tokens
        self.num_lost += max(0, step.num_credited_tokens - step.num_reused_tokens)
        if step.num_overflow_tokens:
            self.num_overflow_steps += 1
            self.num_overflow += step.num_overflow_tokens
            self.max_overflow = max(self.max_overflow, step.num_overflow_tokens)
        self.num_preemptions += len(step.preempted_request_ids)
        for rid in first:
            self.first_token_s[rid] = self.now_s
            self.ttfts.append(self.now_s - live[rid].arrival_s)
        for req in finished:
            rid = req.request_id
            del live[rid]
            self.e2es.append(self.now_s - req.arrival_s)
            self.first_token_s.pop(rid, None)
            self.num_requests += 1
            # NOTE: a request of no output (a trace row of 0 tokens) was counted 1, the
            # token it sampled to end its prefill: more output than the trace holds.
            if rid in self.prefill_only:
                self.prefill_only.discard(rid)
            else:
                self.num_output_tokens += len(req.output)
            self.num_finished_prompt_tokens += len(req.prompt)
            self.last_finish_s = self.now_s
            if self.progress is not None:
                self.progress(1)
        if num_prefill == 0 and num_decode == 0:
            return False
        self.num_steps += 1
        if self.check_every is not None and self.num_steps % self.check_every == 0:
            self.manager.check_invariants()
        return True

    def _sample_drafts(self, step: ScheduledStep, sampled: dict[str, int | list[int]]) -> int:
        """Each decode's accepted drafts and the token after them, into ``sampled``; returns
        the step's draft tokens (computed as the verification pass's extra tokens)."""
        rng, p, ids = self.drafts_rng, self.draft_acceptance, self.sampled_ids
        num_drafts = 0
        for rid, drafts in zip(step.decode_request_ids, step.num_draft_tokens, strict=True):
            accepted = 0
            while accepted < drafts and rng.random() < p:
                accepted += 1
            sampled[rid] = [next(ids) for _ in range(accepted + 1)]
            num_drafts += drafts
            self.num_accepted_draft_tokens += accepted
        self.num_draft_tokens += num_drafts
        return num_drafts

    def _transfers(self, plan: TransferPlan) -> tuple[int, int]:
        """Bytes H2D (onboards, copies from a host block) and D2H (offloads) of a plan."""
        h2d = d2h = 0
        if len(plan):
            # The plan's columns, not its ops: no Python object per block.
            columns = plan.columns if plan.columns is not None else PlanColumns.of(plan.ops)
            for kind, src_tier, num_tokens in zip(plan.kinds, columns.src_tiers,
                                                  columns.num_tokens, strict=True):
                if kind == _OFFLOAD:
                    d2h += num_tokens
                elif kind == _ONBOARD or src_tier == Tier.HOST:
                    h2d += num_tokens
        kv = self.model.profile.kv_bytes_per_token
        self.bytes_h2d += h2d * kv
        self.bytes_d2h += d2h * kv
        return h2d * kv, d2h * kv

    def report(self, workload: Workload, wall_s: float) -> SimReport:
        """What this loop measured, as a report. A query."""
        stats = self.manager.stats
        num_prompt = stats.num_prompt_tokens
        num_reused = stats.num_reused_tokens
        # NOTE: the manager's count, not the plans' onboards: those include a resumed
        # request's, whose recompute is no query, and count a host prefix two requests of
        # a batch reuse once.
        num_host_hit = stats.num_host_reused_tokens
        num_gpu_hit = num_reused - num_host_hit
        # NOTE: at least 0: with no request served the last finish is the clock's start.
        makespan_s = max(0.0, self.last_finish_s - (self.first_arrival_s or 0.0))

        def per_s(n: int) -> float:
            return n / makespan_s if makespan_s > 0 else 0.0

        def share(n: int) -> float:
            return n / num_prompt if num_prompt else 0.0

        tiers = stats.as_dict()
        gpu, host = tiers["gpu"], tiers["host"]
        assert isinstance(gpu, dict) and isinstance(host, dict)
        steps = Summary.of(self.step_cpu_s)
        full = Summary.of(self.full_step_cpu_s)
        cpu: dict[str, float | None] = {
            "wall_s": wall_s,
            "scheduler_s": self.scheduler_cpu_s,
            "us_per_step_mean": _us(steps.mean),
            "us_per_step_p99": _us(steps.p99),
            "us_per_full_step_mean": _us(full.mean),
            "us_per_full_step_p99": _us(full.p99),
        }
        return SimReport(
            workload=workload.describe(),
            cache_config={**asdict(self.manager.config),
                          "eviction_policy": self.manager.eviction_policy_name},
            scheduler_config=asdict(self.sched),
            profile=asdict(self.model.profile),
            time_scale=float(self.time_scale),
            num_requests=self.num_requests,
            num_rejected_too_large=self.num_rejected,
            num_steps=self.num_steps,
            num_prompt_tokens=num_prompt,
            num_output_tokens=self.num_output_tokens,
            num_reused_tokens=num_reused,
            num_gpu_hit_tokens=num_gpu_hit,
            num_host_hit_tokens=num_host_hit,
            token_hit_rate=share(num_reused),
            gpu_token_hit_rate=share(num_gpu_hit),
            host_token_hit_rate=share(num_host_hit),
            gpu=dict(gpu),
            host=dict(host),
            num_credited_tokens=self.num_credited,
            num_obtained_tokens=self.num_obtained,
            num_lost_reuse_tokens=self.num_lost,
            num_scheduled_tokens=self.num_scheduled,
            num_overflow_steps=self.num_overflow_steps,
            num_overflow_tokens=self.num_overflow,
            max_overflow_tokens=self.max_overflow,
            num_preemptions=self.num_preemptions,
            num_resumed_prompt_tokens=stats.num_resumed_prompt_tokens,
            num_resumed_reused_tokens=stats.num_resumed_reused_tokens,
            ttft_s=Summary.of(self.ttfts),
            e2e_s=Summary.of(self.e2es),
            makespan_s=makespan_s,
            throughput_tokens_per_s=per_s(self.num_finished_prompt_tokens
                                          + self.num_output_tokens),
            output_tokens_per_s=per_s(self.num_output_tokens),
            requests_per_s=per_s(self.num_requests),
            num_onboarded_blocks=stats.host.onboarded_blocks,
            num_offloaded_blocks=stats.gpu.offloaded_blocks,
            num_evicted_gpu_blocks=stats.gpu.evicted_blocks,
            num_evicted_host_blocks=stats.host.evicted_blocks,
            bytes_h2d=self.bytes_h2d,
            bytes_d2h=self.bytes_d2h,
            cpu=cpu,
            load=estimate_load(self.busy_s, self.last_arrival_s - (self.first_arrival_s or 0.0),
                               float(self.time_scale)),
            step_phases_us=(None if self.phases is None
                            else phase_breakdown(self.full_step_cpu_s, self.full_step_phases)),
            speculative=(None if not self.sched.num_speculative_tokens else {
                "draft_acceptance": self.draft_acceptance,
                "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_draft_tokens": self.num_accepted_draft_tokens}),
        )


def phase_breakdown(step_s: list[float],
                    phases: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean microseconds per phase over all the given steps (``"all"``) and over the
    slowest 1 % of them (``"slowest_1pct"``, at least one step), with the steps' own mean
    (``"step"``). Pure."""
    order = sorted(range(len(step_s)), key=step_s.__getitem__)
    groups = {"all": order, "slowest_1pct": order[len(order) - max(1, len(order) // 100):]}
    out: dict[str, dict[str, float]] = {}
    for name, members in groups.items():
        n = max(1, len(members))
        means = {"step": sum(step_s[i] for i in members) / n * 1e6}
        for phase in STEP_PHASES:
            means[phase] = sum(phases[i][phase] for i in members) / n * 1e6
        out[name] = means
    return out


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6
