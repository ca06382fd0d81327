"""Eviction policies beyond priority-LRU: the node statistics the cache keeps for them,
kvtier-predict's key order and online predictor, soft queue claims, and the model-based
test run with kvtier-predict and random queue hints."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule, run_state_machine_as_test

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.eviction import EvictionPolicy, ReuseLearner
from kvtier.policies import LRU, POLICIES, KvtierPredict, PriorityLRU, ReusePredictor, get_policy
from kvtier.radix import Node, cut_tail, split
from kvtier.scheduler import Scheduler, SchedulerConfig
from kvtier.tier import Tier
from plan_caller import PlanCaller
from test_manager_model import ManagerModel


def make_node(priority: int = 35, last_used: int = 1, last_used_s: float = 0.0,
              soft: bool = False, reuse_class: int | None = None) -> Node:
    """A detached one-block node with the given key fields."""
    node = Node(None, [0], [0], Tier.GPU, None, 0, None)
    node.priority, node.last_used, node.last_used_s = priority, last_used, last_used_s
    node.soft_claimed, node.reuse_class = soft, reuse_class
    return node


def make_manager(policy: EvictionPolicy, num_gpu_blocks: int = 6,
                 clock: list[float] | None = None) -> KVCacheManager:
    """A GPU-only manager with 4-token blocks, ``policy`` and a settable clock."""
    now = clock if clock is not None else [0.0]
    return KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu_blocks),
                          clock=lambda: now[0], policy=policy)


def admit_and_release(mgr: KVCacheManager, rid: str, tokens: list[int]) -> None:
    assert mgr.add_sequence(SequenceSpec(rid, tokens)).admitted
    mgr.remove_sequence(rid)
    mgr.check_invariants()


# ---- policy names ----------------------------------------------------------------------


def test_policy_names() -> None:
    """The three policies by name; the default stays priority-lru; an unknown name is refused."""
    assert list(POLICIES) == ["priority-lru", "lru", "kvtier-predict"]
    assert CacheConfig().eviction_policy == "priority-lru"
    assert isinstance(get_policy("kvtier-predict"), KvtierPredict)
    with pytest.raises(ValueError, match="eviction_policy must be one of"):
        get_policy("arc")


def test_only_kvtier_predict_learns_and_takes_hints() -> None:
    """LRU and priority-LRU stay plain key functions: no learner, no queue hint."""
    for policy in (PriorityLRU(), LRU()):
        assert not isinstance(policy, ReuseLearner) and not policy.ranks_soft_claims
    assert isinstance(KvtierPredict(), ReuseLearner) and KvtierPredict.ranks_soft_claims
    assert not make_manager(PriorityLRU()).ranks_soft_claims
    assert make_manager(KvtierPredict()).ranks_soft_claims


# ---- kvtier-predict's key ----------------------------------------------------------------


def test_key_priority_then_soft_then_credited_age_then_tick() -> None:
    """Priority first (a soft claim never lifts a lower priority), then soft claims, then
    release time plus the class's credit, then the release tick."""
    policy = KvtierPredict()
    policy.predictor.credit_s[1] = -30.0  # class 1 rarely comes back: 30 s older
    policy.predictor.credit_s[2] = 20.0
    low_soft = make_node(priority=20, last_used=9, last_used_s=90.0, soft=True)
    plain_old = make_node(last_used=1, last_used_s=10.0)
    plain_new = make_node(last_used=5, last_used_s=50.0)
    tail_new = make_node(last_used=6, last_used_s=50.0, reuse_class=1)
    kept = make_node(last_used=2, last_used_s=40.0, reuse_class=2)
    soft_old = make_node(last_used=0, last_used_s=0.0, soft=True)
    tie = make_node(last_used=4, last_used_s=50.0)
    nodes = [soft_old, kept, tie, plain_new, tail_new, plain_old, low_soft]
    keys = {id(n): policy.key(n, 100.0, 35) for n in nodes}
    assert keys[id(tail_new)] == (35, 0, 20.0, 6)
    assert keys[id(kept)] == (35, 0, 60.0, 2)
    assert keys[id(soft_old)] == (35, 1, 0.0, 0)
    order = sorted(nodes, key=lambda n: keys[id(n)])
    assert order == [low_soft, plain_old, tail_new, tie, plain_new, kept, soft_old]


def test_key_retention_expiry_falls_back_to_default_priority() -> None:
    """A retained high priority holds until its expiry, then the default priority counts."""
    policy = KvtierPredict()
    node = make_node(priority=80)
    node.expiry = 10.0
    assert policy.key(node, 9.9, 35)[0] == 80
    assert policy.key(node, 10.0, 35)[0] == 35


def test_priority_lru_and_lru_keys_unchanged() -> None:
    """The built-in policies' keys are exactly as before: (priority, tick) and (0, tick)."""
    node = make_node(priority=50, last_used=7, last_used_s=3.0, soft=True, reuse_class=1)
    assert PriorityLRU().key(node, 0.0, 35) == (50, 7)
    assert LRU().key(node, 0.0, 35) == (0, 7)


def test_reuse_class_by_accesses_and_tail() -> None:
    """Classes: 2 x access bucket (1, 2, 3-4, 5-8, 9+) + 1 for the request's deepest run."""
    policy = KvtierPredict()
    node = make_node()
    got = []
    for accesses in (1, 2, 3, 4, 5, 8, 9, 100):
        node.num_accesses = accesses
        got.append((policy.reuse_class(node, False), policy.reuse_class(node, True)))
    assert got == [(0, 1), (2, 3), (4, 5), (4, 5), (6, 7), (6, 7), (8, 9), (8, 9)]


# ---- the online predictor --------------------------------------------------------------


def test_predictor_credits_exact() -> None:
    """Hits, misses and censored drops give the exact credits of the docstring's rule."""
    p = ReusePredictor(3, refresh_every=1, prior_blocks=0.0, min_blocks=1.0)
    p.record(0, 10.0, 100, False)  # first drop: horizon 10 s; 10 >= 10: a miss of class 0
    assert p.horizon_s == 10.0 and p.num_trials == [100.0, 0.0, 0.0]
    p.record(1, 5.0, 100, True)  # back within the horizon: a hit of class 1
    p.record(2, 2.0, 50, False)  # dropped at 2 s < horizon: censored, moves the horizon
    assert p.horizon_s == pytest.approx(9.92)
    assert (p.num_hits, p.num_trials) == ([0.0, 100.0, 0.0], [100.0, 100.0, 0.0])
    # p0 = 0.5; class 0: p = 0 -> clipped to -2 horizons; class 1: p = 1 -> +1 horizon;
    # class 2: no trials -> 0.
    assert p.credit_s == pytest.approx([-2 * 9.92, 9.92, 0.0])
    p.record(2, 30.0, 10, True)  # came back, but past the horizon: a miss
    assert (p.num_hits[2], p.num_trials[2]) == (0.0, 10.0)


def test_predictor_no_credit_without_significant_difference() -> None:
    """Classes within two standard errors of the pool, or too few blocks: LRU order."""
    p = ReusePredictor(2, refresh_every=1, prior_blocks=0.0, min_blocks=1.0)
    p.record(0, 10.0, 1, False)
    for cls in (0, 1):
        for _ in range(5):
            p.record(cls, 1.0, 1, True)
    p.record(1, 20.0, 1, False)
    assert p.credit_s == [0.0, 0.0]  # 5/6 vs 5/6
    few = ReusePredictor(2, refresh_every=1)
    few.record(0, 10.0, 100, False)
    few.record(1, 1.0, 100, True)
    assert few.credit_s == [0.0, 0.0]  # 200 blocks < min_blocks


# ---- statistics the cache keeps on nodes -------------------------------------------------


def test_cache_keeps_access_release_and_class_stats() -> None:
    """Stores stamp creation time; claims count accesses and end an open release as a
    reuse (with its age); releases stamp time and class, the deepest run as the tail."""
    policy = KvtierPredict()
    policy.predictor = ReusePredictor(KvtierPredict.NUM_CLASSES, refresh_every=10**9)
    clock = [5.0]
    mgr = make_manager(policy, clock=clock)
    a = [1, 1, 1, 1, 2, 2, 2, 2]
    assert mgr.add_sequence(SequenceSpec("r0", [*a, 9])).admitted
    clock[0] = 7.0
    mgr.remove_sequence("r0")
    (node,) = [n for n in mgr._cache.nodes()]  # one run of two blocks
    assert (node.created_s, node.last_used_s, node.num_accesses) == (5.0, 7.0, 1)
    assert node.reuse_class == 1  # one access, the request's deepest run
    clock[0] = 10.0
    assert mgr.add_sequence(SequenceSpec("r1", [*a[:4], 7, 7])).admitted  # splits the run
    head, tail = [n for n in mgr._cache.nodes()][:2]
    assert (head.num_accesses, tail.num_accesses) == (2, 1)
    assert (head.created_s, tail.created_s) == (5.0, 5.0)
    assert head.reuse_class is None and tail.reuse_class == 1  # head's release ended
    assert policy.predictor.num_hits[1] == 1.0  # one block came back 3 s after release
    mgr.check_invariants()


def test_split_and_cut_tail_carry_stats() -> None:
    """A split's head and an eviction cut's tail keep the run's statistics; a cut tail is
    no longer soft-claimed."""
    root = Node(None, [], [], Tier.GPU, None, 0, None)
    node = Node(root, list(range(12)), [0, 1, 2], Tier.GPU, None, 0, None)
    root.children[node.key] = node
    root.by_first[0] = [node]
    node.last_used, node.last_used_s, node.created_s = 4, 3.5, 1.0
    node.num_accesses, node.reuse_class, node.soft_claimed = 3, 5, True
    head = split(node, 1, 4)
    stats = (4, 3.5, 1.0, 3, 5, True)
    assert (head.last_used, head.last_used_s, head.created_s, head.num_accesses,
            head.reuse_class, head.soft_claimed) == stats
    tail = cut_tail(node, 1, 4)
    assert (tail.last_used, tail.last_used_s, tail.created_s, tail.num_accesses,
            tail.reuse_class, tail.soft_claimed) == (*stats[:5], False)


# ---- soft queue claims -----------------------------------------------------------------


def test_soft_claim_protects_a_waiting_prefix() -> None:
    """Of two cached prefixes, the older one, soft-claimed by a waiting request, outlives
    the newer one; without the hint, or once a later hint drops it, LRU order evicts it
    first.

        GPU (6 blocks):  A = [a0 a1] (released first)   B = [b0 b1] (released second)
        a new request needs 4 blocks: 2 free + 2 evicted
    """
    a = [1] * 8
    b = [2] * 8
    for hints, kept in (((), b), (([*a, 5, 5],), a), (([*a, 5, 5], None), b)):
        mgr = make_manager(KvtierPredict())
        admit_and_release(mgr, "a", [*a, 9])
        admit_and_release(mgr, "b", [*b, 9])
        version = mgr.version
        for tokens in hints:
            mgr.hint_waiting([] if tokens is None else [SequenceSpec("w", tokens)])
        assert mgr.version == version  # a hint changes no lookup
        assert mgr.add_sequence(SequenceSpec("n", list(range(100, 116)))).admitted
        mgr.check_invariants()
        lost = a if kept is b else b
        assert (mgr.lookup([*kept, 0]).num_tokens, mgr.lookup([*lost, 0]).num_tokens) == (8, 0)


def test_soft_claims_yield_before_a_refusal() -> None:
    """Soft-claimed blocks are still evictable: admission is never refused for them."""
    mgr = make_manager(KvtierPredict(), num_gpu_blocks=4)
    admit_and_release(mgr, "a", [1] * 8 + [9])
    mgr.hint_waiting([SequenceSpec("w", [1] * 9)])
    assert mgr.add_sequence(SequenceSpec("n", list(range(100, 116)))).admitted  # evicts A
    mgr.check_invariants()
    assert mgr.lookup([1] * 9).num_tokens == 0


def test_a_plain_policy_ignores_hints() -> None:
    """Under priority-LRU a hint changes nothing: the older prefix still goes first."""
    mgr = make_manager(PriorityLRU())
    admit_and_release(mgr, "a", [1] * 8 + [9])
    admit_and_release(mgr, "b", [2] * 8 + [9])
    mgr.hint_waiting([SequenceSpec("w", [1] * 10)])
    assert mgr.add_sequence(SequenceSpec("n", list(range(100, 116)))).admitted
    assert (mgr.lookup([1] * 9).num_tokens, mgr.lookup([2] * 9).num_tokens) == (0, 8)


def test_scheduler_hints_the_waiting_queue() -> None:
    """After each step the scheduler names the waiting requests, head first, to its hint;
    an unchanged queue and cache are not hinted again."""

    from kvtier import Request

    calls: list[list[str]] = []

    class Spy(KVCacheManager):
        def hint_waiting(self, specs: Sequence[SequenceSpec]) -> None:
            calls.append([s.request_id for s in specs])
            super().hint_waiting(specs)

    mgr = Spy(CacheConfig(tokens_per_block=4, num_gpu_blocks=64,
                          eviction_policy="kvtier-predict"))
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=8, max_batch_size=4))
    for rid in ("r0", "r1", "r2"):
        sched.add_request(Request(rid, list(range(8)), 4))
    sched.step()
    assert calls == [["r1", "r2"]]  # r0 took the whole 8-token budget


# ---- the model-based test with kvtier-predict ----------------------------------------------


class PredictModel(ManagerModel):
    """ManagerModel under kvtier-predict (credits refreshed on every ended release) with
    random queue hints between operations."""

    @initialize(
        tpb=st.sampled_from([1, 2, 4]),
        num_gpu_blocks=st.integers(4, 24),
        num_host_blocks=st.integers(0, 16),
        partial=st.booleans(),
        copy=st.booleans(),
        events=st.booleans(),
        policy=st.just("kvtier-predict"),
        prefixes=st.lists(st.lists(st.integers(0, 3), max_size=12), min_size=1, max_size=3),
        failures=st.booleans(),
    )
    def setup(self, tpb: int, num_gpu_blocks: int, num_host_blocks: int, partial: bool,
              copy: bool, events: bool, policy: str, prefixes: list[list[int]],
              failures: bool) -> None:
        super().setup(tpb, num_gpu_blocks, num_host_blocks, partial, copy, events, policy,
                      prefixes, failures)
        self.policy = KvtierPredict()
        self.policy.predictor = ReusePredictor(KvtierPredict.NUM_CLASSES, refresh_every=1,
                                               prior_blocks=0.0, min_blocks=1.0)
        self.mgr = PlanCaller(KVCacheManager(self.config, clock=lambda: self.now,
                                             policy=self.policy), self.memory)

    @rule(data=st.data())
    def hint_queue(self, data: st.DataObject) -> None:
        prompts = [self.draw_prompt(data, 12) for _ in range(data.draw(st.integers(0, 3)))]
        self.mgr.hint_waiting([SequenceSpec(f"w{i}", tokens, salt=salt, lora_id=lora)
                               for i, (tokens, salt, lora) in enumerate(prompts)])


def test_kvtier_predict_matches_physical_model() -> None:
    """Random operations and queue hints under kvtier-predict keep every block's KV exact."""
    run_state_machine_as_test(PredictModel, settings=settings(
        max_examples=150, stateful_step_count=50, deadline=None))
