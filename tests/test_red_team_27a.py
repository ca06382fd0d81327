"""Red team 27a: lifetimes and exception safety of the core and the scheduler.

An exception that is no ``Exception`` (a Ctrl-C, a ``SystemExit``) raised by the caller's
clock or eviction policy in the middle of an operation is held until the operation has
completed, then raised: no book is left half updated. And a long run keeps no state that
grows with the requests ever seen."""

from __future__ import annotations

import random
from array import array
from collections import deque
from collections.abc import Iterator

import pytest

from fake_clock import FakeClock
from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.clock import CacheClock
from kvtier.invariants import check_books
from kvtier.radix import Node
from kvtier.scheduler import CapacityPolicy, Request, Scheduler, SchedulerConfig
from kvtier.sequence import MultimodalItem


class InterruptingClock:
    """A clock of seconds that raises ``exc`` at its ``at``-th reading (1-based)."""

    def __init__(self, at: int, exc: type[BaseException] = KeyboardInterrupt) -> None:
        self.at = at
        self.exc = exc
        self.num_readings = 0
        self.now = 0.0

    def __call__(self) -> float:
        self.num_readings += 1
        if self.num_readings == self.at:
            raise self.exc("Ctrl-C")
        self.now += 0.01
        return self.now


class InterruptingLRU:
    """A caller's eviction policy (LRU) whose ``at``-th call raises ``exc``."""

    name = "interrupting-lru"
    ranks_soft_claims = False
    num_queue_fields = 0

    def __init__(self, at: int, exc: type[BaseException] = KeyboardInterrupt) -> None:
        self.at = at
        self.exc = exc
        self.num_calls = 0

    def _call(self, node: Node) -> tuple[float]:
        self.num_calls += 1
        if self.num_calls == self.at:
            raise self.exc("Ctrl-C")
        return (float(node.last_used),)

    def key(self, node: Node, now: float, default_priority: int) -> tuple[float]:
        return self._call(node)

    def rank(self, node: Node, now: float, default_priority: int) -> tuple[float]:
        return self._call(node)


def _books(manager: KVCacheManager) -> None:
    check_books(manager._cache, manager._live)
    gpu = manager._cache.gpu
    assert gpu.num_free + gpu.num_cached + gpu.num_referenced == gpu.capacity


def test_a_ctrl_c_in_the_clock_mid_admission_completes_the_admission_first() -> None:
    """The clock raises KeyboardInterrupt as an admission reads it (the reuse of a cached
    run is stamped): the interrupt reaches the caller once the admission is whole.

    Before: it came out of the middle of the admission, the key space counting a user for a
    request never made live: ``check_books`` failed ('1 users recorded') for good."""
    clock = InterruptingClock(at=0)
    manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8), clock=clock)
    prompt = list(range(9))
    manager.add_sequence(SequenceSpec("a", prompt))
    manager.remove_sequence("a")
    clock.at = clock.num_readings + 1  # the next reading raises
    with pytest.raises(KeyboardInterrupt):
        manager.add_sequence(SequenceSpec("b", prompt))
    assert clock.num_readings >= clock.at  # it was read inside the admission
    _books(manager)
    assert manager.has_sequence("b")
    # The admission is whole: it goes on as any other.
    manager.remove_sequence("b")
    assert manager.lookup(prompt).num_tokens == 8
    assert manager.add_sequence(SequenceSpec("c", prompt)).num_reused_tokens == 8
    _books(manager)


def test_a_ctrl_c_in_a_callers_policy_mid_release_completes_the_release_first() -> None:
    """A caller's policy raises KeyboardInterrupt as a release files the runs it leaves
    cached: the release completes (that one key answered by the fallback), then the
    interrupt is raised; the policy answers again after it (it did not fault)."""
    policy = InterruptingLRU(at=0)
    manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8),
                             clock=FakeClock(), policy=policy)
    prompt = list(range(9))
    manager.add_sequence(SequenceSpec("a", prompt))
    policy.at = policy.num_calls + 1
    with pytest.raises(KeyboardInterrupt):
        manager.remove_sequence("a")
    _books(manager)
    assert not manager.has_sequence("a")
    assert manager.num_policy_faults == 0
    assert manager.add_sequence(SequenceSpec("b", prompt)).num_reused_tokens == 8
    # An admission that must evict ranks by the policy again.
    calls = policy.num_calls
    manager.remove_sequence("b")
    manager.add_sequence(SequenceSpec("c", list(range(100, 129))))
    assert policy.num_calls > calls
    _books(manager)


def test_a_ctrl_c_outside_any_operation_is_not_held() -> None:
    """A clock read outside a manager's operation (the scheduler's step timer, a vLLM
    translator) raises a KeyboardInterrupt at once: held, it would be lost."""
    clock = CacheClock(InterruptingClock(at=1))
    with pytest.raises(KeyboardInterrupt):
        clock()
    assert clock.calls.deferred is None


def _drive(scheduler: Scheduler, rng: random.Random, num_steps: int, prompts: list[list[int]],
           first_id: int) -> None:
    """Random traffic over shared prefixes: admissions, decodes, aborts, resets; the books
    checked after every call."""
    manager = scheduler.manager
    num = first_id
    for _ in range(num_steps):
        while len(scheduler.waiting) + len(scheduler.running) < 6:
            prompt = rng.choice(prompts) + [rng.randrange(500) for _ in range(rng.randrange(1, 9))]
            scheduler.add_request(Request(f"r{num}", prompt, rng.randrange(1, 6),
                                          priority=rng.choice([None, 10, 80]),
                                          retention_s=rng.choice([None, 0.05])))
            num += 1
        if rng.random() < 0.05 and scheduler.running:
            scheduler.abort(rng.choice(list(scheduler.running)))
        if rng.random() < 0.03:
            scheduler.reset_prefix_cache(reset_running_requests=True)
        step = scheduler.step()
        lookups = {c.request_id: c.num_reused_tokens for c in step.context_chunks}
        assert step.num_credited_tokens == step.num_reused_tokens, lookups
        sampled = {rid: rng.randrange(500) for rid in step.decode_request_ids}
        sampled.update({c.request_id: rng.randrange(500) for c in step.context_chunks})
        scheduler.update(step, sampled)
        _books(manager)
        scheduler.check_invariants()


def _interrupted_runs(
        where: str, policy_name: str, num_host_blocks: int,
        capacity_policy: CapacityPolicy) -> Iterator[tuple[int, Scheduler, random.Random]]:
    """For k = 1, 12, 23, ...: a scheduler whose clock (or caller's policy) raises
    KeyboardInterrupt at its k-th call, run until it did (or the run ends)."""
    at = 1
    while True:
        clock = InterruptingClock(at if where == "clock" else 0)
        policy = InterruptingLRU(at) if where == "policy" else None
        manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=24,
                                             num_host_blocks=num_host_blocks,
                                             eviction_policy=policy_name),
                                 clock=clock, policy=policy)
        scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=32, max_batch_size=6,
                                                       capacity_policy=capacity_policy))
        rng = random.Random(at)
        prompts = [[rng.randrange(500) for _ in range(rng.randrange(4, 16))] for _ in range(4)]
        try:
            _drive(scheduler, rng, 25, prompts, 0)
        except KeyboardInterrupt:
            yield at, scheduler, rng
            at += 11
            continue
        return


@pytest.mark.parametrize(("where", "policy_name", "num_host_blocks", "capacity_policy"), [
    ("clock", "priority-lru", 16, "guaranteed_no_evict"),
    ("clock", "kvtier-predict-cost", 16, "max_utilization"),
    ("policy", "priority-lru", 16, "max_utilization"),
])
def test_a_ctrl_c_at_any_reading_leaves_the_scheduler_and_cache_whole(
        where: str, policy_name: str, num_host_blocks: int,
        capacity_policy: CapacityPolicy) -> None:
    """A KeyboardInterrupt from the clock (or a caller's policy) at any of its calls in a
    scheduler's run (admissions, decodes, evictions, releases, aborts, resets): after it,
    every book holds and the scheduler goes on serving with exact reuse.

    Before: 78 of 280 such interrupts of the clock left the books broken (a key space's
    users, a path's refs), and one in an abort left the scheduler keeping the prompt of a
    request it no longer ran ('a prompt kept for one gone')."""
    num_runs = 0
    for at, scheduler, rng in _interrupted_runs(where, policy_name, num_host_blocks,
                                                capacity_policy):
        num_runs += 1
        manager = scheduler.manager
        _books(manager)
        scheduler.check_invariants()
        step = scheduler.unapplied_step
        if step is not None:
            sampled = {rid: 1 for rid in step.decode_request_ids}
            sampled.update({c.request_id: 1 for c in step.context_chunks})
            scheduler.update(step, sampled)
        _drive(scheduler, rng, 12, [[7, 7, 7, 7, 7]], 10_000)
        while scheduler.has_unfinished():
            _drive_to_idle_step(scheduler)
        assert manager.num_sequences == 0, at
        gpu = manager._cache.gpu
        assert gpu.num_referenced == 0, at  # no slot leaked to a request gone
    assert num_runs > 15


def _drive_to_idle_step(scheduler: Scheduler) -> None:
    step = scheduler.step()
    sampled = {rid: 1 for rid in step.decode_request_ids}
    sampled.update({c.request_id: 1 for c in step.context_chunks})
    scheduler.update(step, sampled, stopped=list(sampled))
    _books(scheduler.manager)
    scheduler.check_invariants()


def test_an_abort_whose_removal_is_interrupted_leaves_the_request_gone() -> None:
    """``Scheduler.abort`` of a running request whose release reads a clock that raises
    KeyboardInterrupt: the request leaves the scheduler whole (no prompt kept for it), and
    its id may be queued again.

    Before: the interrupt skipped the scheduler's own release of the request: it was in no
    queue yet its prompt was kept ('a prompt kept for one gone'), and queueing the id again
    was refused as 'already queued or running'."""
    clock = InterruptingClock(at=0)
    manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16), clock=clock)
    scheduler = Scheduler(manager)
    scheduler.add_request(Request("a", list(range(9)), 4))
    step = scheduler.step()
    scheduler.update(step, {"a": 1})
    clock.at = clock.num_readings + 1
    with pytest.raises(KeyboardInterrupt):
        scheduler.abort("a")
    scheduler.check_invariants()
    _books(manager)
    assert "a" not in scheduler.running and not manager.has_sequence("a")
    scheduler.add_request(Request("a", list(range(9)), 4))
    assert scheduler.step().num_reused_tokens == 8


# ---- bounded state ------------------------------------------------------------------------

_CONTAINERS = (dict, set, frozenset, list, deque, array, bytearray)


def _container_sizes(root: object) -> dict[str, int]:
    """Every container reachable from ``root`` through attributes, by attribute path (a
    path through a dict's values or a list's items is one path), its size the largest met
    there; and how many tree nodes (``"<nodes>"``), not walked into (the tree is bounded by
    the cache's blocks)."""
    sizes: dict[str, int] = {"<nodes>": 0}
    seen: set[int] = set()
    stack: list[tuple[str, object]] = [("", root)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen:
            continue
        if isinstance(obj, Node):
            sizes["<nodes>"] += 1
            seen.add(id(obj))
            continue
        if isinstance(obj, (str, bytes, int, float, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, _CONTAINERS):
            sizes[path] = max(sizes.get(path, 0), len(obj))
            if isinstance(obj, dict):
                stack += [(path + "{}", v) for v in obj.values()]
            elif not isinstance(obj, (array, bytearray)):
                stack += [(path + "[]", v) for v in obj]
            continue
        if isinstance(obj, tuple):
            stack += [(f"{path}({i})", v) for i, v in enumerate(obj)]
            continue
        names = list(getattr(obj, "__dict__", {}))
        for cls in type(obj).__mro__:
            slots = getattr(cls, "__slots__", ())
            names += [slots] if isinstance(slots, str) else list(slots)
        stack += [(f"{path}.{name}", getattr(obj, name)) for name in names
                  if hasattr(obj, name)]
    return sizes


def _long_run(policy: str, num_host_blocks: int, num_requests: int) -> Scheduler:
    """``num_requests`` requests through a scheduler, every one finished or aborted:
    shared prefixes, salts (new ones too), LoRA ids, images, priorities and retentions,
    preemptions, drafts, failed copies and passes, holds, resets."""
    rng = random.Random(27)
    clock = FakeClock()
    manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=48,
                                         num_host_blocks=num_host_blocks,
                                         eviction_policy=policy, enable_events=True),
                             clock=clock)
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=64, max_batch_size=8,
                                                   capacity_policy="max_utilization",
                                                   num_speculative_tokens=2))
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(4, 24))] for _ in range(6)]
    issued = finished = 0
    while finished < num_requests:
        clock.now += 0.05
        while issued < num_requests and len(scheduler.waiting) + len(scheduler.running) < 10:
            prompt = rng.choice(prefixes) + [rng.randrange(1000)
                                             for _ in range(rng.randrange(1, 12))]
            salt = rng.choice([None, None, "a", 3, f"new{issued}"])
            items = ((MultimodalItem(rng.randrange(3), 1, 4),)
                     if rng.random() < 0.2 and len(prompt) > 6 else ())
            scheduler.add_request(Request(
                f"r{issued}", prompt, rng.randrange(1, 10), salt=salt,
                lora_id=rng.choice([None, None, 1]), priority=rng.choice([None, 5, 90]),
                retention_s=rng.choice([None, 0.5]), mm_items=items))
            issued += 1
        if rng.random() < 0.05:
            rid = rng.choice([r.request_id for r in scheduler.waiting] + list(scheduler.running))
            finished += scheduler.abort(rid) is not None
            continue
        if scheduler.waiting and rng.random() < 0.03:
            rid = scheduler.waiting[-1].request_id
            scheduler.hold(rid)
            scheduler.release(rid)
        if rng.random() < 0.005:
            scheduler.reset_prefix_cache(reset_running_requests=True)
        step = scheduler.step()
        plan = step.transfer_plan
        if len(plan) and rng.random() < 0.1:
            aborted = manager.transfer_failed(plan, [rng.randrange(len(plan))])
            step = scheduler.requeue_failed(step, aborted)
        elif step.decode_request_ids and rng.random() < 0.05:
            aborted = manager.compute_failed(step.decode_request_ids[:1])
            step = scheduler.requeue_failed(step, aborted)
        sampled: dict[str, int | list[int]] = {
            rid: [rng.randrange(1000) for _ in range(1 + rng.randrange(1 + n))]
            for rid, n in zip(step.decode_request_ids, step.num_draft_tokens, strict=True)}
        sampled.update({c.request_id: rng.randrange(1000) for c in step.context_chunks})
        stopped = [rid for rid in sampled if rng.random() < 0.05]
        finished += len(scheduler.update(step, sampled, stopped))
        manager.drain_events()
    while scheduler.has_unfinished():
        _drive_to_idle_step(scheduler)
    manager.drain_events()
    _books(manager)
    scheduler.check_invariants()
    return scheduler


# What bounds each container that may hold more than the cache's runs: the memo of
# matched prompts (``cache._MAX_MATCHES``) and the ghosts' and recall tables' (2**18).
_FIXED_BOUNDS = {"._manager._cache._matches": 512}


@pytest.mark.parametrize(("policy", "num_host_blocks"), [
    ("kvtier-predict-cost", 0), ("kvtier-predict-cost", 32), ("arc", 32), ("s3fifo", 0),
    ("priority-lru", 32),
])
def test_no_container_grows_with_the_requests_ever_seen(policy: str,
                                                        num_host_blocks: int) -> None:
    """Every container a scheduler and its manager hold, after 1,500 requests that all
    finished or were aborted, is bounded by what is cached (a few times the blocks: lazy
    heaps compact at twice their pool) or by a fixed bound, never by the requests seen;
    the scheduler's per-request books are empty."""
    scheduler = _long_run(policy, num_host_blocks, 1500)
    assert not scheduler.has_unfinished()
    num_blocks = 48 + num_host_blocks
    sizes = _container_sizes(scheduler)
    del sizes["<nodes>"]  # the tree's, and the matches' (bounded by the memo's 512)
    for path, size in sizes.items():
        bound = _FIXED_BOUNDS.get(path, 4 * num_blocks + 128)
        assert size <= bound, (path, size, bound)
    for books in ("_specs", "_prompts", "_queued_at", "_held", "_lookups", "_num_unappended",
                  "_prefill_specs", "_computing", "_step_touched"):
        assert not getattr(scheduler, books), books
    # Key spaces (a new salt per request too) only while they hold blocks.
    assert scheduler.manager.num_key_spaces <= len(scheduler.manager.cached_blocks())


@pytest.mark.parametrize(("policy", "num_host_blocks"), [
    ("kvtier-predict-cost", 32), ("arc", 0), ("priority-lru", 32),
])
def test_a_reset_cache_keeps_no_dropped_run_alive(policy: str, num_host_blocks: int) -> None:
    """After ``reset_cache`` no container of the cache still names a run it dropped: the
    memo of matched prompts, the pools' heaps, the expiry heap and soft claims are as a
    new cache's (the learner keeps what it learned, its ghosts bounded).

    Before: the memo held up to 512 matches through the old tree and the lazy heaps up to
    twice the pool's entries, each keeping a dropped run and its token ids alive."""
    scheduler = _long_run(policy, num_host_blocks, 300)
    manager = scheduler.manager
    assert manager.reset_cache()
    _books(manager)
    cache = manager._cache
    assert not cache._matches
    assert _container_sizes(cache.evictor)["<nodes>"] == 0  # its pools' heaps too
    # And it serves as before.
    scheduler.add_request(Request("again", list(range(13)), 2))
    _drive_to_idle_step(scheduler)
    scheduler.add_request(Request("again2", list(range(13)), 2))
    assert scheduler.step().num_reused_tokens == 12
