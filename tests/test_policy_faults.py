"""A caller's eviction policy that raises or answers nonsense (kvtier.policy_guard): the
fault is logged once and counted, the cache falls back to priority-LRU, and no operation
fails, no block leaks and no admitted request gets other than what lookup promised."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.cache import BlockCache
from kvtier.eviction import EvictionPolicy, ReuseLearner, effective_priority
from kvtier.policies import ARC, LRU, POLICIES, S3FIFO, KvtierPredict, PriorityLRU
from kvtier.policy_guard import PolicyGuard, guard_policy
from kvtier.pool import Key
from kvtier.radix import Node
from kvtier.sim.clairvoyant import Clairvoyant
from kvtier.tier import Tier
from kvtier.witness import LruWitness


class Mru:
    """A minimal custom policy: most recently released first (so the fallback's order,
    least recently released first, differs from it)."""

    name = "mru"
    ranks_soft_claims = False
    num_queue_fields = 0

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        return (effective_priority(node, now, default_priority), -node.last_used)

    def rank(self, node: Node, now: float, default_priority: int) -> Key:
        return self.key(node, now, default_priority)


BASES: list[type] = [PriorityLRU, LRU, ARC, S3FIFO, KvtierPredict, Mru]
METHODS = ("key", "rank", "within", "rank_version", "bind", "reuse_class", "record",
           "forget", "recall")
KINDS = ("raise", "bad", "nan")


class _Unequal:
    """A rank version that cannot be compared."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no order")

    __hash__ = None  # type: ignore[assignment]


def bad_answer(method: str, kind: str) -> object:
    """What a faulting ``method`` answers (or raises) for ``kind``."""
    if kind == "raise" or method in ("bind", "record", "forget"):
        raise RuntimeError(f"{method} broke")
    nan = kind == "nan"
    if method in ("key", "rank"):
        return (math.nan, 1.0) if nan else ("soon", 1)
    if method == "within":
        return math.nan if nan else "soon"
    if method == "reuse_class":
        return math.nan if nan else "hot"
    if method == "recall":
        return (7, math.nan) if nan else (7,)
    assert method == "rank_version"
    if nan:
        raise RuntimeError("rank_version broke")
    return _Unequal()


class Trip:
    """The ``at``-th call of ``method`` faults as ``kind``, once (the policy is sound
    otherwise, so without the guard only that one call misbehaves)."""

    def __init__(self, method: str, at: int, kind: str) -> None:
        self.method, self.at, self.kind = method, at, kind
        self.calls = 0
        self.fired = False

    def hit(self, method: str) -> bool:
        if method != self.method or self.fired:
            return False
        self.calls += 1
        self.fired = self.calls == self.at
        return self.fired


def faulty(base: type, trip: Trip) -> EvictionPolicy:
    """A subclass of ``base`` whose every method goes through ``trip``, instantiated."""
    ns: dict[str, Any] = {}

    def tripping(method: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: object, *args: Any) -> Any:
            if trip.hit(method):
                return bad_answer(method, trip.kind)
            return original(self, *args)
        return call

    for method in METHODS:
        original = getattr(base, method, None)
        if isinstance(original, property):
            getter = original.fget
            assert getter is not None
            ns[method] = property(tripping(method, getter))
        elif original is not None:
            ns[method] = tripping(method, original)
    policy: EvictionPolicy = type(f"Faulty{base.__name__}", (base,), ns)()
    return policy


class Faults(logging.Handler):
    """The guard's log records."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_workload(mgr: KVCacheManager, rng: random.Random, clock: list[float],
                 num_ops: int) -> None:
    """Random admissions (shared prefixes, priorities, retentions, prefill chunks,
    reservations), prefill chunks, decode growth, releases, hints and time passing; the
    books checked after every operation, every admitted request's reuse checked against
    what lookup promised just before."""
    tpb = mgr.config.tokens_per_block
    prefixes = [[p] * (tpb * n) for p, n in ((1, 1), (2, 2), (3, 3))]
    live: dict[str, SequenceSpec] = {}
    decoding: set[str] = set()
    waiting: list[SequenceSpec] = []

    def new_spec(i: int) -> SequenceSpec:
        tokens = rng.choice(prefixes) + [rng.randrange(4)
                                         for _ in range(rng.randrange(1, 3 * tpb))]
        chunk = rng.choice([None, None, rng.randrange(1, len(tokens) + 1)])
        return SequenceSpec(f"r{i}", tokens, priority=rng.choice([None, 10, 50, 80]),
                            retention_s=rng.choice([None, None, 0.5, 3.0]),
                            num_new_tokens=chunk, num_reserved_blocks=rng.choice([0, 0, 1]))

    for i in range(num_ops):
        op = rng.random()
        clock[0] += rng.choice([0.0, 0.1, 1.0])
        if op < 0.35 or not live:
            specs = [new_spec(i * 4 + j) for j in range(rng.randrange(1, 3))]
            promised = [mgr.lookup_spec(s) for s in specs]
            for spec, promise, adm in zip(specs, promised, mgr.add_sequence_batch(specs),
                                          strict=True):
                if adm.admitted:
                    assert adm.num_reused_tokens == promise.num_tokens, (promise, adm)
                    live[spec.request_id] = spec
        elif op < 0.5:
            rid = rng.choice(sorted(live))
            left = mgr.num_unscheduled_tokens(rid)
            if left:
                mgr.schedule_prefill(rid, rng.randrange(1, left + 1))
            else:
                decoding.add(rid)
                mgr.append_tokens(rid, [rng.randrange(4)] * rng.randrange(1, tpb + 2))
        elif op < 0.8:
            rid = rng.choice(sorted(live))
            del live[rid]
            decoding.discard(rid)
            mgr.remove_sequence(rid, store_for_reuse=rng.random() < 0.9)
        else:
            waiting = [new_spec(10_000 + i * 4 + j) for j in range(rng.randrange(0, 3))]
            mgr.hint_waiting(waiting)
        mgr.take_plan()
        mgr.check_invariants()
    for rid in sorted(live):
        mgr.remove_sequence(rid)
    mgr.check_invariants()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(BASES), method=st.sampled_from(METHODS),
       kind=st.sampled_from(KINDS), at=st.integers(1, 60), seed=st.integers(0, 2**16),
       num_host_blocks=st.sampled_from([0, 6, 24]), partial=st.booleans())
# A fault in the middle of an eviction round (the whole-pool request's): the pools had
# found queue heads live under the policy's keys and trusted them after the switch to the
# fallback's, and took one run twice, the second time from the host as a GPU victim.
@example(base=ARC, method="forget", kind="raise", at=5, seed=2938, num_host_blocks=24,
         partial=True)
def test_a_faulting_policy_never_breaks_an_operation_or_the_books(
        base: type, method: str, kind: str, at: int, seed: int, num_host_blocks: int,
        partial: bool) -> None:
    """A policy (a subclass of each built-in, and a minimal custom one) faults at a random
    call of a random method (raising, a key of the wrong shape, NaN): every operation of a
    random workload completes, the books hold after each, admissions get what lookup
    promised, the fault is counted and logged once, and the cache still serves all of its
    GPU room afterwards (no block leaked or stuck out of the eviction order)."""
    if not hasattr(base, method):
        method = "key"
    trip = Trip(method, at, kind)
    handler = Faults()
    logger = logging.getLogger("kvtier.policy_guard")
    logger.addHandler(handler)
    try:
        clock = [0.0]
        config = CacheConfig(tokens_per_block=4, num_gpu_blocks=12,
                             num_host_blocks=num_host_blocks, enable_partial_reuse=partial)
        mgr = KVCacheManager(config, clock=lambda: clock[0], policy=faulty(base, trip))
        run_workload(mgr, random.Random(seed), clock, 80)
        # Still serving: a request as large as the whole GPU pool evicts everything cached.
        fresh = SequenceSpec("all", [9] * 4 * 12)
        assert mgr.add_sequence(fresh).admitted
        mgr.check_invariants()
        mgr.remove_sequence("all")
        mgr.check_invariants()
        assert mgr.num_policy_faults == int(trip.fired), (trip.calls, trip.fired)
        assert len(handler.records) == mgr.num_policy_faults
        if trip.fired:
            assert isinstance(mgr.policy_fault, Exception)
            message = handler.records[0].getMessage()
            assert repr(mgr.eviction_policy_name) in message, message
    finally:
        logger.removeHandler(handler)


class Switch:
    """A policy's fault switched on from the test."""

    def __init__(self) -> None:
        self.on = False


class MruQueues:
    """A custom policy with queues, ``within`` and ``rank_version``: runs in two queues (by
    uid parity), each oldest first, the queue whose head was released last goes first;
    priorities ignored. Most recently released first, as ``Mru``, through every queue
    path of the pool."""

    name = "mru-queues"
    ranks_soft_claims = False
    num_queue_fields = 1
    rank_version = 0

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        return (node.uid % 2, -node.last_used)

    def rank(self, node: Node, now: float, default_priority: int) -> Key:
        return (-node.last_used,)

    def within(self, node: Node, now: float) -> float:
        return 0.0


class MruAll(Mru):
    """``Mru`` with priorities ignored."""

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        return (-node.last_used,)


@pytest.mark.parametrize("base", [MruAll, MruQueues])
def test_after_a_fault_the_cache_evicts_by_priority_then_least_recently_released(
        base: type[MruAll | MruQueues]) -> None:
    """Most recently released first until the policy breaks, then the fallback's order,
    priority first, then least recently released: exact block ids, with one heap and with
    queues (the keys filed before the fault all re-filed before the first pop after it).

    ::

        gpu slots   0     1     2     3     4     released a, b, g, c in that order
                    a:35  b:20  g:35  c:35  .     (name:priority)
        d (2 blocks, the policy)  evicts c (most recent): d = (3, 4)
        the policy breaks
        e (1 block, fallback)     evicts b (lowest priority, though released after a): (1,)
        f (1 block)               evicts a (priority 35, least recent): (0,)
        h (1 block)               evicts g: (2,)
    """
    switch = Switch()

    def key(self: Any, node: Node, now: float, default_priority: int) -> Key:
        if switch.on:
            raise RuntimeError("policy broke")
        return base.key(self, node, now, default_priority)

    policy = type("Breaks", (base,), {"key": key})()
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=5), policy=policy)
    for slot, (rid, priority) in enumerate((("a", 35), ("b", 20), ("g", 35), ("c", 35))):
        spec = SequenceSpec(rid, [slot + 1] * 4, priority=priority)
        assert mgr.add_sequence(spec).block_ids == (slot,)
    for rid in "abgc":
        mgr.remove_sequence(rid)
    assert mgr.add_sequence(SequenceSpec("d", [7] * 8)).block_ids == (3, 4)
    switch.on = True
    assert mgr.add_sequence(SequenceSpec("e", [8] * 4)).block_ids == (1,)
    assert mgr.num_policy_faults == 1 and isinstance(mgr.policy_fault, RuntimeError)
    assert mgr.add_sequence(SequenceSpec("f", [9] * 4)).block_ids == (0,)
    assert mgr.add_sequence(SequenceSpec("h", [10] * 4)).block_ids == (2,)
    assert mgr.num_policy_faults == 1
    mgr.check_invariants()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_kvtiers_own_policies_are_not_wrapped(name: str) -> None:
    """A built-in policy is used as it is (no guard on the hot path); a subclass, or a
    built-in instance with a method replaced, is guarded; a manager never faults on one."""
    policy = POLICIES[name]()
    assert guard_policy(policy) is policy
    cache = BlockCache(CacheConfig(num_gpu_blocks=8), lambda: 0.0, policy)
    assert cache.evictor.policy is policy
    mgr = KVCacheManager(CacheConfig(num_gpu_blocks=8, eviction_policy=name))
    assert mgr.num_policy_faults == 0 and mgr.policy_fault is None
    sub = type("Sub", (type(policy),), {})()
    assert isinstance(guard_policy(sub), PolicyGuard)
    policy.key = policy.key  # type: ignore[method-assign]
    assert isinstance(guard_policy(policy), PolicyGuard)


@pytest.mark.parametrize("base", BASES)
def test_the_guard_has_its_policys_shape(base: type) -> None:
    """``within`` and ``rank_version`` only where the inner has them; the learner's methods
    only on a learner; the same name, and its queues (one field more: the 0 in front)."""
    inner = type("Sub", (base,), {})()
    guard = guard_policy(inner)
    assert guard is not inner
    nq = inner.num_queue_fields
    assert guard.name == inner.name and guard.num_queue_fields == (nq + 1 if nq else 0)
    assert guard.ranks_soft_claims == inner.ranks_soft_claims
    for attr in ("within", "rank_version"):
        assert hasattr(guard, attr) == hasattr(inner, attr), attr
    assert isinstance(guard, ReuseLearner) == isinstance(inner, ReuseLearner)


def test_infinite_key_fields_are_no_fault() -> None:
    """A key may hold infinities (the simulator's ``Clairvoyant`` keys a run never needed
    again at -inf); it is filed behind a 0, before every fallback key. NaN is a fault."""
    policy = Mru()
    guard = guard_policy(policy)
    node = Node(None, [0], [0], Tier.GPU, None, 0, None)
    node.priority, node.last_used = 35, 3
    never = type("Never", (Mru,), {"key": lambda self, n, now, p: (p, -math.inf)})()
    assert guard_policy(never).key(node, 0.0, 35) == (0, 35, -math.inf)
    assert guard.key(node, 0.0, 35) == (0, 35, -3)
    nan = guard_policy(type("NaN", (Mru,), {"key": lambda self, n, now, p: (p, math.nan)})())
    assert nan.key(node, 0.0, 35) == (1, 35, 3)  # the fallback's
    assert isinstance(nan, PolicyGuard) and nan.num_faults == 1
    clairvoyant = Clairvoyant([], tokens_per_block=4)
    assert guard_policy(clairvoyant) is clairvoyant  # kvtier's own: not wrapped


class RaisingWitness(LruWitness):
    """A learner's witness that breaks at its first release."""

    def released(self, old_tick: int, new_tick: int, num_blocks: int) -> None:
        raise RuntimeError("witness broke")


@pytest.mark.parametrize(("witness", "method"), [(RaisingWitness(8), "witness.released"),
                                                 ("not a witness", "bind")])
def test_a_learners_witness_that_raises_is_its_policys_fault(
        witness: object, method: str, caplog: pytest.LogCaptureFixture) -> None:
    """The cache tells a learner's witness of releases through the guard: a witness that
    raises (or is no ``LruWitness``) is the policy's one fault, and the cache serves on."""

    class Learner(KvtierPredict):
        def bind(self, config: CacheConfig) -> None:
            super().bind(config)
            self.witness = witness  # type: ignore[assignment]

    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8), policy=Learner())
    with caplog.at_level(logging.ERROR, logger="kvtier.policy_guard"):
        for i in range(12):
            assert mgr.add_sequence(SequenceSpec(f"r{i}", [i] * 8 + [1])).admitted
            mgr.remove_sequence(f"r{i}")
            mgr.check_invariants()
    assert mgr.num_policy_faults == 1
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"kvtier: eviction policy 'kvtier-predict' faulted in {method}"]


@pytest.mark.parametrize(("attr", "value", "message"), [
    ("name", 3, "policy.name must be a str, got 3"),
    ("ranks_soft_claims", 1, "policy.ranks_soft_claims must be a bool, got 1"),
    ("num_queue_fields", -1, "policy.num_queue_fields must be an int >= 0, got -1"),
    ("num_queue_fields", True, "policy.num_queue_fields must be an int >= 0, got True"),
])
def test_a_policy_of_an_unusable_shape_is_refused(attr: str, value: object,
                                                  message: str) -> None:
    """What shapes the pools is checked once, when the manager is built (ValueError)."""
    policy = type("Odd", (Mru,), {attr: value})()
    with pytest.raises(ValueError, match=message):
        KVCacheManager(CacheConfig(num_gpu_blocks=8), policy=policy)


def churn_without_eviction(mgr: KVCacheManager) -> None:
    """100 admissions and releases of one 3-block prompt in a roomy pool: many re-files
    (past a compaction of the GPU heap), no pop; the books checked after each."""
    for i in range(100):
        assert mgr.add_sequence(SequenceSpec(f"h{i}", [7] * 8 + [i % 3])).admitted
        mgr.remove_sequence(f"h{i}")
        mgr.check_invariants()


def test_a_compaction_after_a_fault_loses_no_candidate() -> None:
    """After a fault every key the policy filed is stale; a compaction before the next pop
    (releases alone, 88 of them here) must re-file those runs, not drop them: dropped, 8
    cached blocks could never be evicted and the next admission that needs them failed
    ("8 blocks short of eviction candidates")."""
    switch = Switch()

    class Breaks(Mru):
        def key(self, node: Node, now: float, default_priority: int) -> Key:
            if switch.on:
                raise RuntimeError("policy broke")
            return super().key(node, now, default_priority)

    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16), policy=Breaks())
    for i in range(8):
        assert mgr.add_sequence(SequenceSpec(f"c{i}", [100 + i] * 4)).admitted
    for i in range(8):
        mgr.remove_sequence(f"c{i}")
    switch.on = True
    churn_without_eviction(mgr)  # the 8 runs' stale entries never reach a pop
    assert mgr.num_policy_faults == 1
    assert mgr.add_sequence(SequenceSpec("all", [9] * 4 * 16)).admitted
    mgr.check_invariants()


def test_a_compaction_after_a_retention_ran_out_loses_no_candidate() -> None:
    """The same loss under kvtier's own policy, no fault needed: runs whose retention ran
    out key under the default priority before ``expire`` re-files them (at the next
    eviction round); a compaction in between (releases alone) left them unfiled."""
    now = [0.0]
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16,
                                     eviction_policy="priority-lru"), clock=lambda: now[0])
    for i in range(8):
        spec = SequenceSpec(f"c{i}", [100 + i] * 4, priority=80, retention_s=1.0)
        assert mgr.add_sequence(spec).admitted
    for i in range(8):
        mgr.remove_sequence(f"c{i}")
    now[0] = 5.0
    churn_without_eviction(mgr)


# ---- the other boundaries a caller plugs in ---------------------------------------------

def test_a_store_client_answering_a_short_value_leaves_no_unfilled_block_cached() -> None:
    """A caller's store client (here a subclass overriding ``get_many``, past the codec's
    checks) answers one block's value 4 bytes short. The fetch imported the run into host
    blocks, then failed to write that block (an AssertionError out of ``fetch``, or out of
    ``ModelEngine.step``), leaving it cached with bytes nobody wrote: a request onboarding
    it read NaN (the engine-level probe's logits were NaN). A value the host cannot take
    must be a miss, so no unfilled block is ever cached."""
    torch = pytest.importorskip("torch", reason="the remote tier's storages need torch")
    from kvtier.remote import InMemoryRemoteStore, RemoteNamespace
    from kvtier.remote.tier import RemoteTier
    from kvtier.storage import KVLayout, KVStorage
    from kvtier.tier import Tier

    class ShortValues(InMemoryRemoteStore):
        def get_many(self, hashes: Any) -> dict[int, memoryview]:
            found = super().get_many(hashes)
            second = sorted(found, key=list(hashes).index)[1]
            found[second] = found[second][:-4]
            return found

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_block=4)
    manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8,
                                         num_host_blocks=4, hash_algo="sha256"))
    store = ShortValues(RemoteNamespace("m", layout))
    host = KVStorage(layout, 4)
    host.fill_(float("nan"))  # a slot nobody wrote reads NaN
    tier = RemoteTier(store, manager, KVStorage(layout, 8, "cpu"), host)
    prompt = list(range(1, 15))  # 3 reusable full blocks of 4 tokens
    hashes = tier.block_hashes(prompt, None, None)[:3]
    assert store.put_many({h: bytes(layout.bytes_per_block) for h in hashes}) == 3
    tier.fetch(prompt)
    manager.check_invariants()
    cached = [b.slot for b in manager.cached_blocks() if b.tier is Tier.HOST]
    assert all(not torch.isnan(host.block(slot)).any() for slot in cached), cached


def test_a_transfer_engine_raising_any_exception_degrades_to_recompute() -> None:
    """A caller's transfer engine whose ``submit`` raises an ``OSError`` (not a
    RuntimeError) once: the step's copies degrade to recompute as for a RuntimeError.
    Before, the error left ``step`` between the scheduler's step and update, and every
    later step was refused ("step() called before update() applied the previous step")."""
    pytest.importorskip("torch", reason="the model engine needs torch")
    from kvtier.model import LlamaModel, ModelConfig, ModelEngine
    from kvtier.scheduler import Request, Scheduler, SchedulerConfig
    from kvtier.storage import KVStorage
    from kvtier.transfer.plan import TransferPlan
    from kvtier.transfer.torch_engine import TorchTransferEngine
    from kvtier.transfer.torch_handle import TransferHandle

    class FailsOnce(TorchTransferEngine):
        num_failed = 0

        def submit(self, plan: TransferPlan) -> TransferHandle:
            if len(plan) and not self.num_failed:
                self.num_failed += 1
                raise OSError("the copy engine's device went away")
            return super().submit(plan)

    model = LlamaModel(ModelConfig(), "cpu")
    manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16,
                                         num_host_blocks=16))
    layout = model.config.kv_layout(4)
    transfer = FailsOnce(KVStorage(layout, 16, "cpu"), KVStorage(layout, 16))
    engine = ModelEngine(model, manager, Scheduler(manager, SchedulerConfig(max_num_tokens=32)),
                         transfer)
    prefix = [(5 * i + 1) % 97 for i in range(10)]  # 2 full blocks and a partial one
    for i in range(6):
        engine.add_request(Request(f"r{i}", prefix + [i, i + 1], 3))
    engine.run()
    assert transfer.num_failed == 1 and engine.num_failed_steps == 1
    assert manager.num_sequences == 0
    manager.check_invariants()


def test_an_eviction_of_vllms_cpu_tier_that_raises_midway_changes_nothing() -> None:
    """``PolicyChunks.evict`` is atomic ("exactly n chunks, or no change"); a fault in the
    middle of its selection (here vLLM's ``protected`` container raising at its third
    membership test) left the chunks popped so far evictable but filed nowhere: never
    evicted again, so the tier could never free them (``evict`` of every chunk: None)."""
    from kvtier.integrations.vllm.chunk_policy import PolicyChunks

    class Breaks(set[bytes]):
        num_calls = 0

        def __contains__(self, key: object) -> bool:
            self.num_calls += 1
            if self.num_calls == 3:
                raise RuntimeError("protected set broke")
            return super().__contains__(key)

    chunks: PolicyChunks[int] = PolicyChunks("priority-lru", 16, clock=lambda: 0.0)
    for i in range(8):
        chunks.insert(bytes([i]), i, evictable=True)
    with pytest.raises(RuntimeError, match="protected set broke"):
        chunks.evict(4, Breaks())
    chunks.check_invariants()
    evicted = chunks.evict(8, set())
    assert evicted is not None and sorted(k for k, _ in evicted) == [bytes([i]) for i in range(8)]
