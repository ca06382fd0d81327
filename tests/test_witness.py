"""The LRU witness: its count of what LRU would hold against a per-block reference LRU, and
the content-keyed ghosts it counts LRU's wins by (tests/sim/test_sim_witness.py checks it
against LRU itself)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.policies import KvtierPredict
from kvtier.witness import LruWitness, Z

# ---- the witness alone ---------------------------------------------------------------------


def test_mark_passes_the_oldest_and_cuts_a_run_from_its_tail() -> None:
    w = LruWitness(capacity=16)
    w.released(0, 1, 4)  # A
    w.released(0, 2, 4)  # B
    w.released(0, 3, 4)  # C
    w.settle(10)         # 12 > 10: A's last two blocks go
    assert (w.holds(1), w.holds(2), w.holds(3)) == (True, True, True)
    # A request takes A's first three blocks: LRU still held two of them.
    w.admitted(3, [(1, 3)], room=7)
    assert (w.num_won, w.lead) == (1, 1.0)
    # The room shrinks to B and C's 8 blocks minus one: A's rest and B's tail go.
    w.settle(7)
    assert not w.holds(1) and w.holds(3)
    w.admitted(4, [(2, 4)], room=4)  # B: three of its four blocks held
    assert w.num_won == 2
    # C was dropped by kvtier while LRU holds it: a request comes back for it.
    w.recalled(3, 4)
    assert (w.num_lost, w.lead) == (4, -2.0)


def test_lru_ahead_beyond_chance_then_the_evidence_fades() -> None:
    """The cache evicts by LRU only while LRU leads by more than chance (Z standard
    deviations of a sign test over runs: one run alone never decides); faded by half every
    window of prompt blocks, the evidence falls back below chance and the learned order is
    tried again."""
    assert Z == 1.0  # the figures below
    w = LruWitness(capacity=100, window_blocks=10)
    w.released(0, 1, 4)
    w.recalled(1, 4)            # one 4-block run lost: -4, not below -1 x sqrt(16)
    assert (w.lead, w.volume, w.lru_ahead) == (-4.0, 16.0, False)
    for tick in range(2, 14):   # twelve 1-block runs lost: -16 against sqrt(28)
        w.released(0, tick, 1)
        w.recalled(tick, 1)
    assert (w.lead, w.lru_ahead, w.num_switches) == (-16.0, True, 1)
    ahead = []
    for _ in range(4):          # -8 vs sqrt(14), -4 vs sqrt(7), -2 vs sqrt(3.5), -1 vs sqrt(1.75)
        w.admitted(10, [], room=100)
        ahead.append(w.lru_ahead)
    assert (ahead, w.lead) == ([True, True, True, False], -1.0)
    # A win counts for the learned order: a hit on a run LRU dropped.
    w.released(0, 14, 2)
    w.settle(0)
    w.admitted(2, [(14, 2)], room=0)
    assert (w.num_won, w.num_lost, w.lead) == (2, 16, 1.0)


def test_bad_capacity_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity must be positive, got 0"):
        LruWitness(0)


@dataclass
class ReferenceLru:
    """LRU over single blocks: every block released is held, the oldest (the tail of a run
    first) dropped when the room is short, a dropped block never back."""

    held: list[tuple[int, int, int]] = field(default_factory=list)  # (tick, run, index)
    num_won: int = 0

    def release(self, run: int, tick: int, num_blocks: int) -> None:
        self.held = [b for b in self.held if b[1] != run]
        self.held += [(tick, run, i) for i in range(num_blocks)]

    def settle(self, room: int) -> None:
        self.held.sort(key=lambda b: (b[0], -b[2]))
        del self.held[:max(0, len(self.held) - room)]

    def admit(self, run: int, num_claimed: int, room: int) -> None:
        self.settle(room + num_claimed)
        claimed_held = [b for b in self.held if b[1] == run and b[2] < num_claimed]
        self.num_won += num_claimed - len(claimed_held)
        self.held = [b for b in self.held if not (b[1] == run and b[2] < num_claimed)]
        self.settle(room)


ops = st.lists(st.tuples(st.sampled_from(["release", "admit"]), st.integers(0, 4),
                         st.integers(1, 5), st.integers(0, 12)), max_size=40)


@given(ops)
@settings(max_examples=300, deadline=None)
def test_witness_matches_a_per_block_lru(program: list[tuple[str, int, int, int]]) -> None:
    """Releases (whole runs) and admissions (a run's head, with the room left) in any order:
    the witness counts the same wins as LRU kept block by block."""
    w, ref = LruWitness(capacity=64), ReferenceLru()
    ticks: dict[int, int] = {}     # run -> its tick while counted (0: in use)
    sizes: dict[int, int] = {}     # run -> blocks
    tick = 0
    for op, run, n, room in program:
        if op == "release":
            tick += 1
            old = ticks.get(run, 0)
            size = sizes.get(run, n)
            w.released(old, tick, size)
            ref.release(run, tick, size)
            ticks[run], sizes[run] = tick, size
        elif ticks.get(run):
            # A claim of a run's whole head: what is left stays counted under the tick
            # (the cache splits the run; the tail keeps its tick).
            k = min(n, sizes[run])
            w.admitted(k, [(ticks[run], k)], room)
            ref.admit(run, k, room)
            if k == sizes[run]:
                ticks[run] = 0
            else:  # the head goes on as a new run in use; this one keeps the tail
                sizes[run] -= k
                ref.held = [(t, r, i - k) if r == run else (t, r, i) for t, r, i in ref.held]
        assert w.num_won == ref.num_won


# ---- in the cache -------------------------------------------------------------------------


class _Spy(KvtierPredict):
    """kvtier-predict that notes every recall it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.recalled: list[tuple[int, int]] = []

    def recall(self, key: object, now: float) -> tuple[int, int] | None:
        found = super().recall(key, now)
        if found is not None:
            self.recalled.append(found)
        return found


def test_a_run_is_found_again_after_its_parent_was_stored_again() -> None:
    """Ghosts are keyed by content: a run dropped with its parent is still found once the
    parent was dropped and stored again as a new node (by its uid it would be lost)."""
    policy = _Spy()
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=4), policy=policy)
    parent, child = list(range(8)), list(range(100, 108))

    def run(rid: str, tokens: list[int]) -> None:
        assert mgr.add_sequence(SequenceSpec(rid, tokens)).admitted
        mgr.remove_sequence(rid)
        mgr.check_invariants()

    run("a0", parent)               # the parent: a 2-block run
    run("a", parent + child)        # the child below it: another
    run("flush1", list(range(200, 216)))  # drops both
    run("b", parent)                # the parent again: a new node
    assert policy.recalled == [(policy.recalled[0][0], 2)]  # the parent's ghost
    run("flush2", list(range(300, 316)))
    run("c", parent + child)
    # The parent (dropped again) and then the child, whose ghost predates the new parent.
    assert [n for _, n in policy.recalled] == [2, 2, 2]


class _ReferenceWitness(LruWitness):
    """The witness's ``released`` and ``settle`` as they were before they were written out
    (one ``_add`` a tick, the mark and count as attributes): the reference for the fast
    ones."""

    def released(self, old_tick: int, new_tick: int, num_blocks: int) -> None:
        if old_tick:
            self._add(old_tick, -num_blocks)
        self._add(new_tick, num_blocks)

    def settle(self, room: int) -> None:
        blocks = self._blocks
        while self._held > room:
            n = blocks.get(self._mark, 0)
            excess = self._held - room
            if n > excess:
                blocks[self._mark] = n - excess
                self._held = room
                return
            self._held -= n
            blocks.pop(self._mark, None)
            self._mark += 1


@pytest.mark.parametrize("seed", range(6))
def test_written_out_release_and_settle_match_the_reference(seed: int) -> None:
    """``released`` and ``settle`` (written out for speed) leave the witness exactly as the
    steps they stand for: random releases (fresh ticks, ticks released again, ticks behind
    the mark, blocks taken back past zero), admissions, recalls and settles to any room,
    every attribute compared after each call."""
    import random

    rng = random.Random(seed)
    fast, ref = LruWitness(capacity=40), _ReferenceWitness(capacity=40)
    tick = 0
    released: list[int] = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.45:
            tick += 1
            old = rng.choice(released) if released and rng.random() < 0.4 else 0
            n = rng.randrange(1, 9)
            for w in (fast, ref):
                w.released(old, tick, n)
            released.append(tick)
        elif op < 0.55 and released:
            old, new = rng.choice(released), rng.choice(released)
            n = rng.randrange(1, 12)  # may take back more than is counted there
            for w in (fast, ref):
                w.released(old, new, n)
        elif op < 0.8:
            runs = [(rng.choice(released), rng.randrange(1, 6))
                    for _ in range(rng.randrange(3))] if released else []
            room, num_prompt_blocks = rng.randrange(0, 60), rng.randrange(1, 20)
            for w in (fast, ref):
                w.admitted(num_prompt_blocks, list(runs), room)
        elif op < 0.9 and released:
            t, n = rng.choice(released), rng.randrange(1, 6)
            for w in (fast, ref):
                w.recalled(t, n)
        else:
            room = rng.randrange(0, 60)
            for w in (fast, ref):
                w.settle(room)
        assert vars(fast) == vars(ref)
    assert fast._mark > 10 and fast.num_won and fast.num_lost


def test_ghost_key_below_is_the_key_made_of_its_parts() -> None:
    """``ghost_key_below`` (``block_key`` and ``ghost_key`` written out) gives the key made
    from its parts: at a root, below a run without extras, and below runs whose last block
    has an extra key or none (multimodal), in two key spaces."""
    from kvtier.eviction import ghost_key, ghost_key_below, node_ghost_key
    from kvtier.radix import Node, Root, block_key
    from kvtier.tier import Tier

    tpb = 4
    for root in (Root(None, None), Root("lora", b"salt")):
        plain = Node(root, list(range(12)), [0, 1, 2], Tier.GPU, None, 0, root)
        extra_last = Node(root, list(range(50, 58)), [3, 4], Tier.GPU, [None, ("img", 7)], 0,
                          root)
        extra_first = Node(root, list(range(70, 78)), [5, 6], Tier.GPU, [("img", 8), None], 0,
                           root)
        child_key = block_key(list(range(90, 94)), 0, tpb, None)
        for parent in (root, plain, extra_last, extra_first):
            block = parent.start_block + parent.num_blocks
            prev = b"" if parent is root else block_key(
                parent.tokens, (parent.num_blocks - 1) * tpb, tpb,
                parent.extras[-1] if parent.extras else None)
            want = ghost_key(root, block, prev, child_key)
            assert ghost_key_below(parent, block, child_key, tpb) == want
            child = Node(parent, list(range(90, 94)), [9], Tier.GPU, None, block, root)
            assert node_ghost_key(child, tpb) == want
    below = ghost_key_below(extra_last, 2, child_key, tpb)
    assert isinstance(below, tuple) and below[3] == (
        block_key(list(range(54, 58)), 0, tpb, None), ("img", 7))


def test_an_admission_tells_its_reuses_and_recalls_one_instant() -> None:
    """An admission's reused runs and the ghost it recalls are told to the learner at one
    reading of the clock (``note_reuse`` hands its time to ``recall_miss``): with a clock
    that moves at every reading, the reuse's age and the recall's time still agree."""

    class Recorder(KvtierPredict):
        def __init__(self) -> None:
            super().__init__()
            self.reuse_ages: list[float] = []
            self.recall_times: list[float] = []

        def record(self, reuse_class: int, age_s: float, num_blocks: int,
                   reused: bool) -> None:
            if reused:
                self.reuse_ages.append(age_s)
            super().record(reuse_class, age_s, num_blocks, reused)

        def recall(self, key: object, now: float) -> tuple[int, int] | None:
            found = super().recall(key, now)
            self.recall_times.append(now if found is not None else -1.0)
            return found

    readings = iter(float(t) for t in range(1, 10_000))
    policy = Recorder()
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=6),
                         clock=lambda: next(readings), policy=policy)
    head, tail = list(range(8)), list(range(100, 108))

    def run(rid: str, tokens: list[int]) -> None:
        assert mgr.add_sequence(SequenceSpec(rid, tokens)).admitted
        mgr.remove_sequence(rid)

    run("a0", head)              # the head: a 2-block run
    run("a", head + tail)        # the tail below it, released before the head
    run("flush", list(range(200, 216)))  # 4 blocks: the tail goes, the head stays
    (head_run,) = [n for n in mgr._cache.nodes() if n.tokens.tolist() == head]
    released_s = head_run.last_used_s
    policy.reuse_ages.clear()
    policy.recall_times.clear()
    run("b", head + tail)        # the head reused, the tail recalled
    assert len(policy.reuse_ages) == 1 and len(policy.recall_times) == 1  # the tail found
    assert policy.recall_times[0] == released_s + policy.reuse_ages[0]
    mgr.check_invariants()
