"""Eviction policies beyond priority-LRU: the node statistics the cache keeps for them,
kvtier-predict's key order and online predictor, soft queue claims, and the model-based
test run with kvtier-predict and random queue hints."""

from __future__ import annotations

import random
from collections.abc import Sequence
from copy import deepcopy

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule, run_state_machine_as_test

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.eviction import ROLE_BODY, ROLE_SHARED, ROLE_TAIL, EvictionPolicy, ReuseLearner
from kvtier.policies import (
    _BIN_LOWS,
    ARC,
    LRU,
    NUM_AGE_BINS,
    POLICIES,
    S3FIFO,
    Ghosts,
    HitDensity,
    KvtierPredict,
    PriorityLRU,
    _bin_widths,
    age_bin,
    get_policy,
)
from kvtier.pool import TierPool
from kvtier.radix import Node
from kvtier.scheduler import Scheduler, SchedulerConfig
from kvtier.tier import Tier
from kvtier.witness import LruWitness
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
    """Every policy by name, each call a new object; an unknown name is refused."""
    assert list(POLICIES) == ["priority-lru", "lru", "arc", "s3fifo", "kvtier-predict",
                              "kvtier-predict-cost"]
    assert CacheConfig().eviction_policy == "kvtier-predict-cost"
    assert isinstance(get_policy("kvtier-predict"), KvtierPredict)
    assert get_policy("arc") is not get_policy("arc")
    assert get_policy("kvtier-predict-cost").name == "kvtier-predict-cost"
    with pytest.raises(ValueError, match="eviction_policy must be one of"):
        get_policy("sieve")


def test_learners_and_hints() -> None:
    """LRU and priority-LRU stay plain key functions; ARC, S3-FIFO and kvtier-predict
    learn from the stream; only kvtier-predict takes the queue's hints."""
    for policy in (PriorityLRU(), LRU()):
        assert not isinstance(policy, ReuseLearner) and not policy.ranks_soft_claims
        assert policy.num_queue_fields == 0
    for name in ("arc", "s3fifo", "kvtier-predict", "kvtier-predict-cost"):
        assert isinstance(get_policy(name), ReuseLearner)
    assert KvtierPredict.ranks_soft_claims and not ARC.ranks_soft_claims
    assert not make_manager(PriorityLRU()).ranks_soft_claims
    assert make_manager(KvtierPredict()).ranks_soft_claims


# ---- kvtier-predict's key and rank ---------------------------------------------------------


def test_key_names_the_queue_and_rank_orders_by_value() -> None:
    """The key files a run in the queue (priority, soft claim, class), oldest first; the
    rank compares runs of any queue by priority, soft claim, the class's value at the
    run's age, then the release tick."""
    policy = KvtierPredict()
    value = policy.learner.value
    value[1] = [0.5] * NUM_AGE_BINS
    value[2] = [0.1] * NUM_AGE_BINS
    value[3] = [0.9] * NUM_AGE_BINS
    value[3][age_bin(60.0)] = 0.05  # class 3 at a minute old is worth least
    low_soft = make_node(priority=20, last_used=9, last_used_s=90.0, soft=True, reuse_class=3)
    a = make_node(last_used=1, last_used_s=10.0, reuse_class=1)
    b = make_node(last_used=5, last_used_s=50.0, reuse_class=2)
    c_old = make_node(last_used=2, last_used_s=40.0, reuse_class=3)   # 60 s old at 100
    c_new = make_node(last_used=6, last_used_s=99.0, reuse_class=3)   # 1 s old
    soft = make_node(last_used=0, last_used_s=0.0, soft=True, reuse_class=2)
    never = make_node(last_used=3, last_used_s=20.0)  # never released: class 1
    nodes = [soft, a, b, c_old, c_new, never, low_soft]
    assert policy.key(b, 100.0, 35) == (35, 0, 2, 5)
    assert policy.key(never, 100.0, 35) == (35, 0, 1, 3)
    assert policy.key(soft, 100.0, 35) == (35, 1, 2, 0)
    assert policy.rank(c_old, 100.0, 35) == (35, 0, 0.05, 2)
    order = sorted(nodes, key=lambda n: policy.rank(n, 100.0, 35))
    assert order == [low_soft, c_old, b, a, never, c_new, soft]


def test_cost_aware_value_grows_with_depth() -> None:
    """kvtier-predict-cost weighs value by 1 + depth tokens / 16384."""
    policy = KvtierPredict(cost_aware=True)
    policy.bind(CacheConfig(tokens_per_block=512, num_gpu_blocks=8))
    policy.learner.value[1] = [0.25] * NUM_AGE_BINS
    deep = make_node(reuse_class=1)
    deep.start_block = 64  # 32,768 tokens deep: three times the cost of the first block
    assert policy.rank(deep, 0.0, 35)[2] == pytest.approx(0.75)
    assert policy.rank(make_node(reuse_class=1), 0.0, 35)[2] == pytest.approx(0.25)


def test_key_retention_expiry_falls_back_to_default_priority() -> None:
    """A retained high priority holds until its expiry, then the default priority counts."""
    for policy in (KvtierPredict(), ARC(), S3FIFO()):
        node = make_node(priority=80)
        node.expiry = 10.0
        assert policy.key(node, 9.9, 35)[0] == policy.rank(node, 9.9, 35)[0] == 80
        assert policy.key(node, 10.0, 35)[0] == policy.rank(node, 10.0, 35)[0] == 35


def test_priority_lru_and_lru_keys_unchanged() -> None:
    """The built-in policies' keys are exactly as before: (priority, tick) and (0, tick)."""
    node = make_node(priority=50, last_used=7, last_used_s=3.0, soft=True, reuse_class=1)
    assert PriorityLRU().key(node, 0.0, 35) == PriorityLRU().rank(node, 0.0, 35) == (50, 7)
    assert LRU().key(node, 0.0, 35) == (0, 7)


def test_reuse_class_by_turn_and_role() -> None:
    """Class 0: shared prefixes; then 2 x turn bucket (1, 2, 3, 4, 5-7, 8+) + 1 for output."""
    policy = KvtierPredict()
    node = make_node()
    assert policy.reuse_class(node, 1, ROLE_SHARED) == 0
    got = [(policy.reuse_class(node, t, ROLE_BODY), policy.reuse_class(node, t, ROLE_TAIL))
           for t in (1, 2, 3, 4, 5, 7, 8, 100)]
    assert got == [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (9, 10), (11, 12), (11, 12)]


# ---- the online learner ----------------------------------------------------------------


def reference_value(events: list[float], censored: list[float], prior: list[float],
                    weight: float, horizon_s: float = float("inf")) -> list[float]:
    """Hit density per age bin, the forward way (the policy lab's loop): from each bin on,
    the chance of a reuse over the expected block-seconds spent waiting for it; within
    ``horizon_s`` seconds of the bin's start only (the bin it ends in counts in part)."""
    nb = len(events)
    risk = [sum(events[b:]) + sum(censored[b:]) for b in range(nb)]
    hazard = [(events[b] + weight * prior[b]) / (risk[b] + weight)
              if risk[b] + weight else 0.0 for b in range(nb)]
    lows = [0.0] + [float(2 ** (b - 1)) for b in range(1, nb)]
    widths = [1.0] + [float(2 ** (b - 1)) for b in range(1, nb)]
    widths[-1] = 3.0 * 2 ** (nb - 2)
    out = []
    for start in range(nb):
        alive, hits, waited = 1.0, 0.0, 0.0
        end = lows[start] + horizon_s
        for b in range(start, nb):
            if end <= lows[b]:
                break
            part = 1.0 if b == nb - 1 else min(1.0, (end - lows[b]) / widths[b])
            p = hazard[b] * part
            hits += alive * p
            waited += alive * widths[b] * part * (1 - p / 2)
            alive *= 1 - p
        out.append(hits / waited)
    return out


def test_hit_density_matches_the_forward_definition() -> None:
    """The learner's backward recursion equals the lab's forward loop, with and without
    shrinkage toward the pooled hazard."""
    for weight in (0.0, 8.0):
        h = HitDensity(2, refresh_every=1, prior_blocks=weight)
        h.record(0, 1.5, 4, True)    # bin 1
        h.record(0, 1.9, 4, False)   # bin 1, censored
        h.record(0, 40.0, 2, True)   # bin 6
        h.record(1, 0.5, 1, True)    # bin 0
        h.record(1, 3000.0, 3, False)
        ev = [[0.0] * NUM_AGE_BINS for _ in range(2)]
        ce = [[0.0] * NUM_AGE_BINS for _ in range(2)]
        ev[0][1], ce[0][1], ev[0][6] = 4, 4, 2
        ev[1][0], ce[1][age_bin(3000.0)] = 1, 3
        risk = [[sum(ev[c][b:]) + sum(ce[c][b:]) for b in range(NUM_AGE_BINS)] for c in (0, 1)]
        pooled = [(ev[0][b] + ev[1][b]) / (risk[0][b] + risk[1][b])
                  if risk[0][b] + risk[1][b] else 0.0 for b in range(NUM_AGE_BINS)]
        for c in (0, 1):
            assert h.value[c] == pytest.approx(reference_value(ev[c], ce[c], pooled, weight))
            # No run dropped yet: the near term is the whole future.
            assert h.near[c] == pytest.approx(h.value[c])
        # The near term: 4x the mean age of a drop (here one, at 1.5 s), from each bin.
        h.dropped(1.5)
        assert h.horizon_s == 6.0
        h.refresh()
        for c in (0, 1):
            assert h.near[c] == pytest.approx(
                reference_value(ev[c], ce[c], pooled, weight, horizon_s=6.0))
    # Class 0, no shrinkage: reused at 1-2 s half the time, later only at 32-64 s.
    assert h.value[0][0] > h.value[0][2]
    # Over the near term, a run of 4-8 s is worth little (its reuse at 32-64 s is past
    # the horizon) and one of 32-64 s much: the value of that class rises with age.
    assert h.near[0][3] < h.near[0][6]


def test_hit_density_near_term_follows_the_drops() -> None:
    """The horizon is 4x a moving mean of the drop ages, at least 1 s."""
    h = HitDensity(1)
    assert h.horizon_s == float("inf")
    h.dropped(10.0)
    assert h.horizon_s == 40.0
    for _ in range(2000):
        h.dropped(0.01)
    assert h.horizon_s == 1.0


def test_a_class_gives_its_youngest_run_where_the_near_term_values_it_less() -> None:
    """Three first-turn prompts cached, released at 0, 10 and 20 s; at 21 s a request
    needs one of them evicted. Where the class's near-term value rises with age (runs
    come back some seconds after they leave, like agent steps), the youngest (c) goes;
    where it is flat, the oldest (a), as LRU; and the oldest while the witness says LRU is
    ahead (its order, whole)."""
    a, b, c = [1] * 8, [2] * 8, [3] * 8
    rising = list(range(NUM_AGE_BINS))
    for near, lru_ahead, lost in ((rising, False, c), ([1.0] * NUM_AGE_BINS, False, a),
                                  (rising, True, a)):
        clock = [0.0]
        policy = KvtierPredict(cost_aware=True)
        mgr = make_manager(policy, num_gpu_blocks=8, clock=clock)
        for t, (rid, tokens) in zip((0.0, 10.0, 20.0), (("a", a), ("b", b), ("c", c)),
                                    strict=True):
            clock[0] = t
            admit_and_release(mgr, rid, [*tokens, 9])
        cls = policy.reuse_class(make_node(), 1, ROLE_BODY)
        policy.learner.near[cls][:] = [float(x) for x in near]
        assert policy.witness is not None
        policy.witness.lru_ahead = lru_ahead
        clock[0] = 21.0
        assert mgr.add_sequence(SequenceSpec("n", list(range(100, 116)))).admitted
        mgr.check_invariants()
        kept = [t for t in (a, b, c) if t is not lost]
        assert [mgr.lookup([*t, 0]).num_tokens for t in (*kept, lost)] == [8, 8, 0]


def test_hit_density_decays_old_counts() -> None:
    """Past ``decay_blocks`` the histograms halve, so the learner follows the stream."""
    h = HitDensity(1, refresh_every=1, decay_blocks=10.0)
    h.record(0, 1.5, 8, True)
    h.record(0, 1.5, 8, False)
    assert (h.events[0][1], h.censored[0][1]) == (4.0, 4.0)


# ---- what the cache keeps for the learner ------------------------------------------------


def test_cache_keeps_access_release_and_class_stats() -> None:
    """Stores stamp creation time, turn and prompt end; claims count accesses and end an
    open release as a reuse at its age; releases stamp time and class."""
    policy = KvtierPredict()
    clock = [5.0]
    mgr = make_manager(policy, clock=clock)
    a = [1, 1, 1, 1, 2, 2, 2, 2]
    assert mgr.add_sequence(SequenceSpec("r0", [*a, 9])).admitted
    clock[0] = 7.0
    mgr.remove_sequence("r0")
    (node,) = [n for n in mgr._cache.nodes()]  # one run of two blocks
    assert (node.created_s, node.last_used_s, node.num_accesses) == (5.0, 7.0, 1)
    assert (node.turn, node.prompt_end_block) == (1, 2)
    assert node.reuse_class == 1  # turn 1, body
    clock[0] = 10.0
    assert mgr.add_sequence(SequenceSpec("r1", [*a[:4], 7, 7])).admitted  # splits the run
    head, tail = [n for n in mgr._cache.nodes()][:2]
    assert (head.num_accesses, tail.num_accesses) == (2, 1)
    assert (head.created_s, tail.created_s) == (5.0, 5.0)
    assert head.reuse_class is None and tail.reuse_class == 1  # head's release ended
    assert policy.learner.events[1][age_bin(3.0)] == 1.0  # one block back 3 s after release
    mgr.check_invariants()


def test_turns_follow_sessions() -> None:
    """A request whose reused prefix covers an earlier request's whole prompt continues
    its session (turn + 1); one that shares only part of it starts a session; the
    shared part of a first turn is filed as shared, output past the prompt as tail."""
    policy = KvtierPredict()
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=32),
                         clock=lambda: 0.0, policy=policy)
    sys_prompt = [7] * 8
    turn1 = [*sys_prompt, 1, 1, 1, 1, 5]          # 3 full blocks, 1 token more
    live = mgr._live
    assert mgr.add_sequence(SequenceSpec("s1", turn1)).admitted
    assert live.get("s1").turn == 1
    mgr.remove_sequence("s1")
    turn2 = [*turn1[:12], 3, 3, 3, 3, 4]          # covers turn 1's three full blocks
    assert mgr.add_sequence(SequenceSpec("s2", turn2)).admitted
    assert (live.get("s2").turn, live.get("s2").num_hit_blocks) == (2, 3)
    other = [*sys_prompt, 2, 2, 2, 2]             # shares the system prompt only
    assert mgr.add_sequence(SequenceSpec("o1", other)).admitted
    seq = live.get("o1")
    assert (seq.turn, seq.num_hit_blocks, seq.num_prompt_blocks) == (1, 2, 3)
    mgr.remove_sequence("o1")
    released = {n.start_block: n.reuse_class for n in mgr._cache.nodes() if not n.ref_count}
    assert released == {2: 1}  # o1's own block: turn 1, body (its shared part is claimed)
    mgr.remove_sequence("s2")
    classes = {(n.start_block, n.tokens[0]): n.reuse_class for n in mgr._cache.nodes()}
    # s2 (turn 2) releases the system prompt, turn 1's block and its own new block as body
    # of turn 2 (class 3); o1's block stays filed as o1 released it.
    assert classes == {(0, 7): 3, (2, 1): 3, (3, 3): 3, (2, 2): 1}
    mgr.check_invariants()


def test_ghosts_see_reuse_after_eviction() -> None:
    """A run dropped and then asked for again counts as a reuse at its age; so do its
    extensions dropped with it or before it (the whole chain, followed by uid)."""
    policy = KvtierPredict()
    clock = [0.0]
    mgr = make_manager(policy, num_gpu_blocks=4, clock=clock)
    a = [1] * 4 + [2] * 4 + [3] * 4
    mgr.add_sequence(SequenceSpec("a", a[:8]))      # run [1][2]
    mgr.remove_sequence("a")
    mgr.add_sequence(SequenceSpec("a2", [*a, 0]))   # extends it: run [3] below
    clock[0] = 2.0
    mgr.remove_sequence("a2")
    clock[0] = 3.0
    admit_and_release(mgr, "x", [9] * 16)            # evicts all of a's three blocks
    assert mgr.lookup([*a, 0]).num_tokens == 0
    assert policy.learner.num_records == 1 and sum(map(sum, policy.learner.events)) == 2
    clock[0] = 20.0
    admit_and_release(mgr, "b", [*a, 0])             # misses at [1]: the chain comes back
    events = policy.learner.events
    assert sum(map(sum, events)) == 2 + 3
    assert sum(events[c][age_bin(18.0)] for c in range(len(events))) == 3
    assert [e[2] for e in policy.ghosts.values()] == [4]  # x's run, evicted by b


def test_a_rejected_request_teaches_the_learner_nothing() -> None:
    """Claims rolled back (the request did not fit) record no reuse, count no access and
    recall no ghost: the learner hears of a claim only once admission holds."""
    policy = KvtierPredict()
    clock = [0.0]
    mgr = make_manager(policy, num_gpu_blocks=4, clock=clock)
    admit_and_release(mgr, "a", [1] * 8 + [0])          # run [1][1], released at 0 s
    assert mgr.add_sequence(SequenceSpec("hog", [2] * 4)).admitted
    clock[0] = 5.0
    (run,) = [n for n in mgr._cache.nodes() if n.tokens[0] == 1]
    state = (run.reuse_class, run.num_accesses, policy.learner.num_records)
    assert not mgr.add_sequence(SequenceSpec("big", [1] * 8 + [3] * 8)).admitted
    assert (run.reuse_class, run.num_accesses, policy.learner.num_records) == state
    assert mgr.add_sequence(SequenceSpec("fits", [1] * 8 + [3])).admitted
    assert (run.reuse_class, run.num_accesses) == (None, 2)
    assert policy.learner.events[1][age_bin(5.0)] == 2.0
    mgr.check_invariants()


# ---- ARC and S3-FIFO over runs -------------------------------------------------------------


def test_arc_evicts_once_used_runs_first_until_ghosts_move_the_target() -> None:
    """T1 (stored, never reused) goes before T2 (reused) while T1 is over the target;
    a miss where a T1 run was dropped raises the target, so T1 keeps more."""
    policy = ARC()
    mgr = make_manager(policy, num_gpu_blocks=6)
    admit_and_release(mgr, "a", [1] * 8 + [0])        # A: 2 blocks, T1
    admit_and_release(mgr, "a'", [1] * 8 + [5])       # A reused: T2
    admit_and_release(mgr, "b", [2] * 8 + [0])        # B: 2 blocks, T1 (newer than A)
    assert policy.cached == [2, 2] and policy.target == 0.0
    admit_and_release(mgr, "c", [3] * 8 + [0])        # needs 3: 2 free + B's last block
    assert policy.cached == [3, 2]
    admit_and_release(mgr, "d", [4] * 8 + [0])        # needs 3: T1 first (B's, then C's)
    assert mgr.lookup([1] * 9).num_tokens == 8 and mgr.lookup([2] * 9).num_tokens == 0
    assert mgr.lookup([3] * 9).num_tokens == 4
    admit_and_release(mgr, "b2", [2] * 8 + [0])       # B's ghost: T1 was cut short
    assert policy.target > 0.0


def test_arc_target_moves_by_the_ghosts_it_still_holds() -> None:
    """ARC's step is scaled by the ghosts' blocks per list, counting only ghosts still held:
    those trimmed past the bound no longer weigh (they used to be counted forever)."""
    policy = ARC()
    policy.ghosts.max_blocks = 4
    policy.cached = [10, 10]
    for i in range(6):                                  # B1: six 1-block ghosts, oldest first
        policy.forget(("t1", i), 100 + i, 0, 0.0, 1, 1.0)
    policy.forget(("t2", 0), 200, 1, 0.0, 2, 1.0)       # B2: one 2-block ghost
    assert policy.ghosts.class_blocks == {0: 2, 1: 2}   # four of B1 trimmed
    assert policy.recall(("t1", 5), 2.0) == (105, 1)    # B1 hit: 1 x max(1, 2 / 1)
    assert policy.target == 2.0
    assert policy.recall(("t2", 0), 3.0) == (200, 2)    # B2 hit: 2 x max(1, 1 / 1)
    assert policy.target == 0.0 and policy.ghosts.class_blocks == {0: 1, 1: 0}


def test_rank_version_changes_with_what_rank_reads() -> None:
    """The pool keeps a queue head's rank while ``(now, rank_version)`` holds, so the
    version must change whenever ``rank`` may change for the same node at the same time:
    the value table refreshed, the witness's verdict flipped, ARC's first class moved."""
    policy = KvtierPredict(cost_aware=True)
    policy.bind(CacheConfig(tokens_per_block=4, num_gpu_blocks=8))
    assert policy.witness is not None
    node = make_node(reuse_class=3, last_used_s=0.0)
    before, rank = policy.rank_version, policy.rank(node, 5.0, 35)
    policy.learner.record(3, 1.0, 4, True)              # counts move, no refresh yet
    assert policy.rank_version == before and policy.rank(node, 5.0, 35) == rank
    policy.learner.refresh()
    assert policy.rank_version != before and policy.rank(node, 5.0, 35) != rank
    before = policy.rank_version
    policy.witness.lru_ahead = True
    assert policy.rank_version != before and policy.rank(node, 5.0, 35)[2] == 0.0
    arc = ARC()
    arc.cached = [5, 5]
    assert arc.rank_version == arc.first_class() == 0
    arc.target = 10.0
    assert arc.rank_version == arc.first_class() == 1


def test_s3fifo_small_queue_first_and_ghosts_go_to_main() -> None:
    """New runs sit in the small FIFO and go first (while it holds a tenth of the cache);
    a run stored again where its ghost sits goes to main."""
    policy = S3FIFO()
    mgr = make_manager(policy, num_gpu_blocks=6)
    admit_and_release(mgr, "a", [1] * 8 + [0])        # S
    admit_and_release(mgr, "a'", [1] * 8 + [5])       # reused: M
    admit_and_release(mgr, "b", [2] * 8 + [0])        # S
    admit_and_release(mgr, "c", [3] * 8 + [0])        # S; needs 1 block: b's last (S's
    assert mgr.lookup([1] * 9).num_tokens == 8 and mgr.lookup([2] * 9).num_tokens == 4  # oldest)
    admit_and_release(mgr, "b2", [2] * 8 + [0])       # b's ghost: back, into M
    (node,) = [n for n in mgr._cache.nodes() if n.tokens[0] == 2 and n.start_block == 1]
    assert node.reuse_class == 1


# ---- the per-class pool -------------------------------------------------------------------


def test_pool_queues_pop_the_best_head_and_refile_stale_keys() -> None:
    """With queues, a pop compares the heads of every queue by rank; an entry whose key
    changed is filed again in its new queue first."""
    pool = TierPool(Tier.GPU, 8, num_queue_fields=1)
    nodes = [make_node(last_used=i) for i in range(4)]
    keys = {0: (0.0, 0.0), 1: (0.0, 1.0), 2: (1.0, 2.0), 3: (1.0, 3.0)}
    for i, n in enumerate(nodes):
        pool.push(n, keys[i])
    rank = {0: 5.0, 1: 6.0, 2: 1.0, 3: 0.0}
    got = pool.pop_candidate(lambda n: keys[n.last_used], lambda n: (rank[n.last_used],))
    assert got is nodes[2]  # queue 1's head (oldest) is ranked 1.0 < queue 0's head 5.0
    keys[0] = (1.0, 9.0)  # node 0 moved to queue 1, behind node 3
    got = pool.pop_candidate(lambda n: keys[n.last_used], lambda n: (rank[n.last_used],))
    assert got is nodes[3]  # heads now: node 1 (6.0) and node 3 (0.0)
    assert sorted(n.last_used for n in pool.heap_nodes()) == [0, 1]


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
    """ManagerModel under the learning policies (kvtier-predict's values refreshed on
    every ended release) with random queue hints between operations."""

    @initialize(
        tpb=st.sampled_from([1, 2, 4]),
        num_gpu_blocks=st.integers(4, 24),
        num_host_blocks=st.integers(0, 16),
        partial=st.booleans(),
        copy=st.booleans(),
        events=st.booleans(),
        policy=st.sampled_from(["kvtier-predict", "kvtier-predict-cost", "arc", "s3fifo"]),
        prefixes=st.lists(st.lists(st.integers(0, 3), max_size=12), min_size=1, max_size=3),
        failures=st.booleans(),
    )
    def setup(self, tpb: int, num_gpu_blocks: int, num_host_blocks: int, partial: bool,
              copy: bool, events: bool, policy: str, prefixes: list[list[int]],
              failures: bool) -> None:
        super().setup(tpb, num_gpu_blocks, num_host_blocks, partial, copy, events, policy,
                      prefixes, failures)
        self.policy = get_policy(policy)
        if isinstance(self.policy, KvtierPredict):  # values move on every ended release
            self.policy.learner = HitDensity(KvtierPredict.NUM_CLASSES, refresh_every=1)
        self.mgr = PlanCaller(KVCacheManager(self.config, clock=lambda: self.now,
                                             policy=self.policy), self.memory)

    @rule(data=st.data())
    def hint_queue(self, data: st.DataObject) -> None:
        prompts = [self.draw_prompt(data, 12) for _ in range(data.draw(st.integers(0, 3)))]
        self.mgr.hint_waiting([SequenceSpec(f"w{i}", tokens, salt=salt, lora_id=lora)
                               for i, (tokens, salt, lora) in enumerate(prompts)])


def test_kvtier_predict_matches_physical_model() -> None:
    """Random operations and queue hints under every learning policy keep every block's
    KV exact."""
    run_state_machine_as_test(PredictModel, settings=settings(
        max_examples=150, stateful_step_count=50, deadline=None))


def test_switching_to_lru_and_back_keeps_the_books(monkeypatch: pytest.MonkeyPatch) -> None:
    """The witness's verdict flips at every count (the learned order and LRU's in turn, as
    often as the model's operations move the evidence): every block's KV stays exact."""
    flips = [0]

    def flip(self: LruWitness) -> None:
        self.lru_ahead = not self.lru_ahead
        flips[0] += 1

    monkeypatch.setattr(LruWitness, "_judge", flip)
    run_state_machine_as_test(PredictModel, settings=settings(
        max_examples=60, stateful_step_count=50, deadline=None, derandomize=True,
        database=None))
    assert flips[0] > 5, flips


def refresh_by_bins(h: HitDensity) -> tuple[list[list[float]], list[list[float]]]:
    """The value and near tables by plain bin-by-bin loops (the refresh as first written),
    from ``h``'s histograms and horizon; what ``HitDensity.refresh`` must give bit for bit
    (the tables order evictions: a last-bit change moves a learned order)."""
    nb, w, widths = NUM_AGE_BINS, h.prior_blocks, _bin_widths()
    at_risk = []
    for ev, ce in zip(h.events, h.censored, strict=True):
        risk, total = [0.0] * nb, 0.0
        for b in range(nb - 1, -1, -1):
            total += ev[b] + ce[b]
            risk[b] = total
        at_risk.append(risk)
    pooled = []
    for b in range(nb):
        hits_b = sum(ev[b] for ev in h.events)
        risk_b = sum(risk[b] for risk in at_risk)
        pooled.append(hits_b / risk_b if risk_b else 0.0)
    values, nears = [], []
    for c in range(h.num_classes):
        ev, risk = h.events[c], at_risk[c]
        hazard = [min(1.0, (ev[b] + w * pooled[b]) / (risk[b] + w)) if risk[b] + w else 0.0
                  for b in range(nb)]
        value = [0.0] * nb
        hits = waited = 0.0
        for b in range(nb - 1, -1, -1):
            p = hazard[b]
            hits = p + (1.0 - p) * hits
            waited = widths[b] * (1.0 - p / 2) + (1.0 - p) * waited
            value[b] = hits / waited
        alive, wait, a, s = [1.0], [0.0], 1.0, 0.0
        for p, width in zip(hazard, widths, strict=True):
            s += a * width * (1.0 - p / 2)
            a *= 1.0 - p
            alive.append(a)
            wait.append(s)
        near = [0.0] * nb
        for b in range(nb):
            start = alive[b]
            if start <= 0.0:
                near[b] = 2.0 * hazard[b] / widths[b]
                continue
            end = _BIN_LOWS[b] + h.horizon_s
            if end >= _BIN_LOWS[nb - 1]:
                last, part = nb - 1, 1.0
            else:
                last = max(b, int(end).bit_length())
                part = (end - _BIN_LOWS[last]) / widths[last]
            p = hazard[last] * part
            rest = alive[last] / start
            hits = 1.0 - rest + rest * p
            spent = ((wait[last] - wait[b]) / start
                     + rest * widths[last] * part * (1.0 - p / 2))
            near[b] = hits / spent if spent else 0.0
        values.append(value)
        nears.append(near)
    return values, nears


@pytest.mark.parametrize("seed", range(8))
def test_refresh_gives_the_bin_by_bin_tables_bit_for_bit(seed: int) -> None:
    """The refresh (column sums, accumulated risks, each bin's window found once, the
    classes with nothing counted computed once) gives exactly the tables of the plain
    loops, on random histograms and horizons, every class counted or only some."""
    rng = random.Random(seed)
    h = HitDensity(13, refresh_every=1 << 30, prior_blocks=rng.choice([0.0, 8.0]))
    classes = range(13) if seed < 3 else rng.sample(range(13), rng.randrange(1, 10))
    for _ in range(rng.randrange(1, 3000)):
        h.record(rng.choice(classes), rng.expovariate(rng.choice([0.05, 1.0])),
                 rng.randrange(1, 300), rng.random() < 0.6)
    if seed % 2:
        for _ in range(rng.randrange(1, 50)):
            h.dropped(rng.expovariate(0.2))
    h.refresh()
    values, nears = refresh_by_bins(h)
    assert h.value == values and h.near == nears


def test_soft_claims_refile_runs_in_the_hints_order() -> None:
    """Runs whose soft claim flips are re-filed in the hint's order (its requests, each
    path from its deepest run up), claimed and released alike: the order runs are filed in
    is what a policy that gives a queue's youngest reads, so it must not follow where the
    allocator put the nodes (a set of nodes iterates by address)."""
    mgr = make_manager(KvtierPredict(), num_gpu_blocks=200)
    prompts = [[100 + i] * 8 + [1] for i in range(40)]
    order = [3 * i % 40 for i in range(40)]  # not the order they were cached in
    for i, tokens in enumerate(prompts):
        admit_and_release(mgr, f"r{i}", tokens)
    pool = mgr._cache.gpu

    def filed(soft: int) -> list[int]:
        """The first token of each live run filed in the soft-claimed (or not) queue."""
        out = []
        for queue, entries in pool._filed.items():
            if queue[1] == soft:
                out += [e[2].tokens[0] - 100 for e in entries
                        if e[2].parent is not None and e[2].soft_claimed == bool(soft)]
        return out

    mgr.hint_waiting([SequenceSpec(f"w{i}", prompts[i]) for i in order])
    assert filed(1) == order
    mgr.hint_waiting([])
    assert filed(0)[-40:] == order
    mgr.check_invariants()


def test_ghost_entries_come_back_exactly() -> None:
    """Ghost entries are kept packed (no object for the garbage collector to walk); what
    comes back is exactly what went in, floats to the bit, and the counts follow."""
    ghosts = Ghosts(max_blocks=10)
    ghosts.add(("k", 1), (3, 1234.5678901234567, 4, 2 ** 40 + 7, 2 ** 33 + 1))
    ghosts.add(("k", 2), (0, 0.1, 5, 9, 10))
    assert len(ghosts) == 2 and ghosts.class_blocks == {3: 4, 0: 5}
    assert ghosts.values() == [(3, 1234.5678901234567, 4, 2 ** 40 + 7, 2 ** 33 + 1),
                               (0, 0.1, 5, 9, 10)]
    assert ghosts.pop(("k", 1)) == (3, 1234.5678901234567, 4, 2 ** 40 + 7, 2 ** 33 + 1)
    assert ghosts.pop(("k", 1)) is None and ghosts.num_blocks == 5
    ghosts.add(("k", 3), (1, 2.0, 6, 11, 12))  # 11 blocks: the oldest goes
    assert ghosts.trim() == [(0, 0.1, 5, 9, 10)] and ghosts.values() == [(1, 2.0, 6, 11, 12)]


@pytest.mark.parametrize("seed", range(4))
def test_forget_does_what_dropped_add_trim_and_record_do(seed: int) -> None:
    """``KvtierPredict.forget`` (written out for speed) leaves the learner and the ghosts
    exactly as the calls it stands for: ``HitDensity.dropped``, ``Ghosts.add_trim``, and a
    censored ``record`` of every ghost trimmed; random forgets, keys that repeat (a ghost
    replaced), bounds small enough to trim, recalls between them (``recall``, written out
    too, against ``Ghosts.pop``, a reused ``record`` and the witness's ``recalled``)."""
    rng = random.Random(seed)
    fast, ref = KvtierPredict(cost_aware=True), KvtierPredict(cost_aware=True)
    for policy in (fast, ref):
        policy.bind(CacheConfig(num_gpu_blocks=8 + seed * 20))
        policy.ghosts.max_entries = 5 + seed * 7
    now = 0.0
    for _ in range(2000):
        now += rng.expovariate(1.0)
        key = ("k", rng.randrange(60))
        if rng.random() < 0.2:
            # ``recall`` (``Ghosts.pop`` written out) against the calls it stands for.
            got = fast.recall(key, now)
            entry = ref.ghosts.pop(key)
            if entry is None:
                assert got is None
                continue
            c, released, m, uid, tick = entry
            ref.learner.record(c, now - released, m, True)
            assert ref.witness is not None
            ref.witness.recalled(tick, m)
            if c == 0:
                if len(ref._returning) >= ref.ghosts.max_entries:
                    ref._returning.clear()
                ref._returning.add(hash(key))
            assert got == (uid, m) and fast._returning == ref._returning
            assert vars(fast.witness) == vars(ref.witness)
            continue
        args = (rng.randrange(13), now - rng.expovariate(0.1), rng.randrange(1, 40),
                rng.randrange(1 << 40), rng.randrange(1 << 20))
        cls, released_s, n, uid, tick = args
        fast.forget(key, uid, cls, released_s, n, now, tick)
        ref.learner.dropped(now - released_s)
        for c, released, m, _, _ in ref.ghosts.add_trim(key, cls, released_s, n, uid, tick):
            ref.learner.record(c, now - released, m, False)
        for a, b in ((fast.learner, ref.learner), (fast.ghosts, ref.ghosts)):
            assert vars(a) == vars(b)
    assert fast.learner.num_records > 100 and fast.learner.num_refreshes > 0


class _OwnRecall(KvtierPredict):
    """kvtier-predict-cost with ``recall`` replaced by itself: the cache asks it at every
    miss, however empty its ghost table."""

    def __init__(self) -> None:
        super().__init__(cost_aware=True)

    def recall(self, ghost_key: object, now: float) -> tuple[int, int] | None:
        return super().recall(ghost_key, now)


def test_a_miss_asks_no_recall_while_no_ghost_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the default policy's ghost table is empty a miss builds no key and asks no
    recall (each would find nothing); the decisions are those of the same policy asked at
    every miss, over a stream that fills the cache, drops runs and recalls some of them;
    and a deep copy's cache reads its own policy's table."""
    fast, asked = KvtierPredict(cost_aware=True), _OwnRecall()
    recalls = [0, 0, 0]  # the fast policy's recalls asked with an empty table, a full one; found
    own = KvtierPredict.recall

    def counted(self: KvtierPredict, ghost_key: object, now: float) -> tuple[int, int] | None:
        found = own(self, ghost_key, now)
        if self is fast:
            recalls[bool(self.ghosts._entries) or found is not None] += 1
            recalls[2] += found is not None
        return found

    monkeypatch.setattr(KvtierPredict, "recall", counted)
    now = [0.0]
    mgrs = [make_manager(p, num_gpu_blocks=16, clock=now) for p in (fast, asked)]
    assert mgrs[0]._cache._ghost_table is fast.ghosts._entries
    assert mgrs[1]._cache._ghost_table is None
    rng = random.Random(5)
    sessions: list[list[int]] = [[] for _ in range(6)]
    for i in range(300):
        now[0] += 1.0
        s = rng.randrange(len(sessions))
        sessions[s] = sessions[s][:36] + [rng.randrange(30) for _ in range(rng.randrange(1, 7))]
        results = [m.add_sequence(SequenceSpec(str(i), sessions[s])) for m in mgrs]
        assert results[0] == results[1], i
        assert mgrs[0].take_plan() == mgrs[1].take_plan(), i
        if results[0].admitted:
            for m in mgrs:
                m.remove_sequence(str(i))
        if i == 20:
            copy = deepcopy(mgrs[0])
            assert copy._cache._ghost_table is copy._cache._learner.ghosts._entries
    assert mgrs[0].stats == mgrs[1].stats
    assert recalls[0] == 0 and recalls[1] > 20 and recalls[2] > 5, recalls
