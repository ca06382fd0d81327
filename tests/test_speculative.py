"""Speculative decoding. The manager's draft slots (``reserve_lookahead``): the table covers
the drafts, only accepted tokens fill and store blocks, nothing leaks, and the cache ends up
exactly as without the drafts. The scheduler's drafts (``num_speculative_tokens``): budgeted,
bounded by the output length, applied from ``update``, exact under preemption."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.scheduler import Request, Scheduler, SchedulerConfig
from kvtier.sim import SyntheticChat, simulate
from kvtier.sim.fleet import simulate_fleet
from kvtier.sim.report import SimReport


def make_manager(**kw: Any) -> KVCacheManager:
    cfg: dict[str, Any] = {"tokens_per_block": 4, "num_gpu_blocks": 8, **kw}
    return KVCacheManager(CacheConfig(**cfg))


def test_drafts_get_slots_and_only_accepted_tokens_are_cached() -> None:
    """Exact ids: a 6-token prompt holds blocks 0-1; 5 drafts take block 2; two accepted
    tokens fill block 1 (stored), a rejected step adds one token; on release only the
    accepted tokens' full blocks stay cached and the draft block is free again."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5, 6]))
    assert mgr.block_table("a") == [0, 1] and mgr.num_free_gpu_blocks == 6
    #   tokens |1 2 3 4|5 6 . .|. . . .|     drafts d1..d5 at positions 6-10
    #   table  [   0   ][  1   ][  2   ]
    assert mgr.reserve_lookahead("a", 5) == [2]
    assert mgr.block_table("a") == [0, 1, 2] and mgr.num_free_gpu_blocks == 5
    mgr.check_invariants()
    # d1, d2 accepted (and the bonus token 9 sampled after them): block 1 fills.
    assert mgr.append_tokens("a", [7, 8, 9]) == []
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 0]).num_tokens == 8
    # The next drafts need slots to position 9 + 4 = 13: block 3.
    assert mgr.reserve_lookahead("a", 4) == [3]
    assert mgr.reserve_lookahead("a", 3) == []  # already covered
    mgr.check_invariants()
    assert mgr.append_tokens("a", [10]) == []  # every draft rejected: the bonus token only
    mgr.remove_sequence("a")
    mgr.check_invariants()
    # Tokens 1-10 leave blocks 0-1 cached; block 2 held 9, 10 (not full), 3 nothing.
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]).num_tokens == 8
    assert [(b.slot, b.tokens) for b in mgr.cached_blocks()] == [(0, (1, 2, 3, 4)),
                                                                (1, (5, 6, 7, 8))]
    assert mgr.num_free_gpu_blocks == 8  # 2 of them cached, evictable


def test_a_reservation_the_pool_cannot_supply_changes_nothing() -> None:
    """``None``, with the table, the free count and the version unchanged."""
    mgr = make_manager(num_gpu_blocks=3)
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5]))
    before = (mgr.block_table("a"), mgr.num_free_gpu_blocks, mgr.version)
    assert mgr.reserve_lookahead("a", 8) is None
    assert (mgr.block_table("a"), mgr.num_free_gpu_blocks, mgr.version) == before
    assert mgr.reserve_lookahead("a", 7) == [2]  # exactly what is left
    mgr.check_invariants()


def test_drafts_draw_on_their_own_reservation_never_on_anothers() -> None:
    """Blocks another request reserved for its growth are not the drafts' to take; the
    request's own reservation is (as ``append_tokens`` draws on it first)."""
    mgr = make_manager(num_gpu_blocks=7)
    mgr.add_sequence(SequenceSpec("b", [20, 21, 22, 23, 24], num_reserved_blocks=2))
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5], num_reserved_blocks=1))
    assert (mgr.num_free_gpu_blocks, mgr.num_reserved_blocks) == (0, 3)  # 3 unused, reserved
    assert mgr.reserve_lookahead("a", 3) == []  # 8 tokens: its 2 blocks hold them
    assert mgr.reserve_lookahead("a", 4) == [4]  # its own reserved block
    assert mgr.num_reserved_blocks == 2
    assert mgr.reserve_lookahead("a", 8) is None  # b's two are not free for a
    assert mgr.append_tokens("b", list(range(25, 36))) == [5, 6]  # 16 tokens: its 2
    mgr.check_invariants()


@pytest.mark.parametrize(("num_tokens", "error"), [
    (-1, ValueError), (True, ValueError), (1.0, ValueError), ("2", ValueError)])
def test_bad_counts_are_refused_naming_the_value(num_tokens: Any, error: type) -> None:
    """A count that is no integer >= 0 raises, naming it, and changes nothing."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3]))
    version = mgr.version
    with pytest.raises(error, match=f"num_tokens must be an integer >= 0, got {num_tokens!r}"):
        mgr.reserve_lookahead("a", num_tokens)
    assert mgr.version == version and mgr.block_table("a") == [0]


def test_unknown_requests_and_unfinished_prefills_are_refused() -> None:
    """No draft slots for a request that is not live or still has prompt to prefill."""
    mgr = make_manager()
    with pytest.raises(KeyError, match="'nobody'"):
        mgr.reserve_lookahead("nobody", 2)
    mgr.add_sequence(SequenceSpec("a", list(range(10)), num_new_tokens=4))
    with pytest.raises(ValueError, match="6 unscheduled prompt tokens"):
        mgr.reserve_lookahead("a", 2)
    assert mgr.block_table("a") == [0]


ops = st.lists(st.tuples(st.sampled_from(["add", "reserve", "accept", "remove"]),
                         st.integers(0, 2), st.integers(0, 6)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_drafts_change_nothing_but_the_free_blocks(program: list[tuple[str, int, int]]) -> None:
    """Random admissions, draft reservations, accepted tokens and releases, run twice: with
    the reservations and without (a pool that never evicts). After every step both caches
    hold exactly the same blocks, the plain tables cover exactly the tokens, and the free
    blocks differ by exactly the draft blocks live requests hold."""
    with_drafts, plain = make_manager(num_gpu_blocks=256), make_manager(num_gpu_blocks=256)
    live: dict[str, int] = {}
    for step, (op, which, n) in enumerate(program):
        rid = f"r{which}"
        if op == "add" and rid not in live:
            prompt = [which, *range(n + 1)]
            for mgr in (with_drafts, plain):
                mgr.add_sequence(SequenceSpec(rid, prompt))
            live[rid] = len(prompt)
        elif op == "reserve" and rid in live:
            assert with_drafts.reserve_lookahead(rid, n) is not None
        elif op == "accept" and rid in live:
            tokens = [(step + i) % 3 for i in range(n + 1)]
            for mgr in (with_drafts, plain):
                assert mgr.append_tokens(rid, tokens) is not None
            live[rid] += len(tokens)
        elif op == "remove" and rid in live:
            for mgr in (with_drafts, plain):
                mgr.remove_sequence(rid)
            del live[rid]
        with_drafts.check_invariants()
        plain.check_invariants()
        assert ({b.block_hash for b in with_drafts.cached_blocks()}
                == {b.block_hash for b in plain.cached_blocks()})
        num_drafts = 0
        for r, num_tokens in live.items():
            table, base = with_drafts.block_table(r), plain.block_table(r)
            assert len(table) >= len(base) == -(-num_tokens // 4)
            num_drafts += len(table) - len(base)
        assert plain.num_free_gpu_blocks - with_drafts.num_free_gpu_blocks == num_drafts


# ---- the scheduler ----------------------------------------------------------------------


def make_scheduler(num_gpu_blocks: int = 16, **kw: Any) -> Scheduler:
    return Scheduler(make_manager(num_gpu_blocks=num_gpu_blocks),
                     SchedulerConfig(num_speculative_tokens=3, **kw))


def test_drafts_are_budgeted_bounded_and_applied_exactly() -> None:
    """Exact steps, 4-token blocks, 3 drafts: prefill samples one token; each decode
    appends what the last update sampled, reserves 3 draft slots (2 when only 3 more tokens
    may follow) and costs 1 + drafts tokens; update takes 1..drafts + 1 tokens."""
    s = make_scheduler()
    mgr = s.manager
    s.add_request(Request("a", [1, 2, 3, 4, 5, 6], 10))
    step = s.step()
    assert step.num_draft_tokens == () and step.num_scheduled_tokens == 6
    s.update(step, {"a": 100})
    # 7 tokens and 3 drafts: slots to 10, blocks 0-2.
    step = s.step()
    assert (step.decode_request_ids, step.num_draft_tokens, step.num_scheduled_tokens) == (
        ("a",), (3,), 4)
    assert mgr.block_table("a") == [0, 1, 2]
    mgr.check_invariants()
    s.update(step, {"a": [101, 102]})  # the first draft accepted, then 102
    step = s.step()  # 9 tokens in the manager, drafts to 12: still blocks 0-2
    assert step.num_draft_tokens == (3,) and mgr.block_table("a") == [0, 1, 2]
    s.update(step, {"a": [103, 104, 105, 106]})  # every draft accepted
    assert s.running["a"].output == [100, 101, 102, 103, 104, 105, 106]
    step = s.step()  # 13 tokens; 3 more outputs at most: 2 drafts, slots to 15
    assert step.num_draft_tokens == (2,) and step.num_scheduled_tokens == 3
    assert mgr.block_table("a") == [0, 1, 2, 3]
    assert [r.request_id for r in s.update(step, {"a": [107, 108, 109]})] == ["a"]
    mgr.check_invariants()
    # Released: the full blocks of the 13 tokens it held; the 3 last outputs were never
    # appended (nothing computed their KV).
    assert [b.tokens for b in mgr.cached_blocks()] == [
        (1, 2, 3, 4), (5, 6, 100, 101), (102, 103, 104, 105)]
    assert mgr.num_free_gpu_blocks == 16


def test_drafts_fit_the_budget_left() -> None:
    """With 5 tokens of budget, once both requests decode: the first takes 1 + 3 drafts, the
    second 1 and none."""
    s = make_scheduler(max_num_tokens=5)
    for rid in ("a", "b"):
        s.add_request(Request(rid, [7, 7, 7, 2 if rid == "a" else 3], 20))
    step = s.step()
    while len(step.decode_request_ids) < 2:
        sampled: dict[str, int | list[int]] = {c.request_id: 1 for c in step.context_chunks}
        sampled.update({rid: [1] for rid in step.decode_request_ids})
        s.update(step, sampled)
        step = s.step()
    assert (step.decode_request_ids, step.num_draft_tokens) == (("a", "b"), (3, 0))
    assert step.num_scheduled_tokens == 5


@pytest.mark.parametrize("value", [[], [1, 2, 3, 4, 5], "7", [1, -1], None, [True]])
def test_a_bad_sample_is_refused_changing_nothing(value: Any) -> None:
    """More tokens than drafts + 1, none, or a bad id: ValueError naming the request; the
    step stays unapplied and the output unchanged."""
    s = make_scheduler()
    s.add_request(Request("a", [1, 2, 3, 4, 5], 10))
    s.update(s.step(), {"a": 9})
    step = s.step()
    with pytest.raises(ValueError, match="'a'"):
        s.update(step, {"a": value})
    assert s.running["a"].output == [9]
    s.update(step, {"a": [10, 11]})
    assert s.running["a"].output == [9, 10, 11]


def run_stream(seed: int, drafts: int, policy: str) -> int:
    """Eight random requests with prompts sharing prefixes through a 12-block pool, each
    draft accepted with probability 0.6 until one is not: every step within budget, the
    books checked after every step, every request ending with exactly its output length,
    every block free at the end. Returns how many preemptions it saw."""
    rng = random.Random(seed)
    mgr = make_manager(num_gpu_blocks=12)
    s = Scheduler(mgr, SchedulerConfig(max_num_tokens=24, num_speculative_tokens=drafts,
                                       capacity_policy=policy))  # type: ignore[arg-type]
    lengths = {}
    for i in range(8):
        rid = f"r{i}"
        lengths[rid] = rng.randint(1, 20)
        s.add_request(Request(rid, [i % 2] * rng.randint(1, 6) + [i + 2], lengths[rid]))
    done: dict[str, list[int]] = {}
    token = num_preempted = 0
    while s.has_unfinished():
        step = s.step()
        assert step.num_scheduled_tokens <= 24
        num_preempted += len(step.preempted_request_ids)
        sampled: dict[str, int | list[int]] = {c.request_id: 1000 + token
                                               for c in step.context_chunks}
        for rid, d in zip(step.decode_request_ids, step.num_draft_tokens, strict=True):
            accepted = 0
            while accepted < d and rng.random() < 0.6:
                accepted += 1
            sampled[rid] = [1000 + token + i for i in range(accepted + 1)]
        token += 10
        for req in s.update(step, sampled):
            done[req.request_id] = req.output
        mgr.check_invariants()
    assert {rid: len(out) for rid, out in done.items()} == lengths
    assert mgr.num_free_gpu_blocks == 12
    return num_preempted


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), drafts=st.integers(1, 4),
       policy=st.sampled_from(["guaranteed_no_evict", "max_utilization"]))
def test_random_streams_finish_exactly_with_every_block_back(seed: int, drafts: int,
                                                            policy: str) -> None:
    """``run_stream`` for random seeds, draft counts and both capacity policies."""
    run_stream(seed, drafts, policy)


def test_streams_with_drafts_preempt_under_max_utilization() -> None:
    """The random streams do reach preemption (a request's drafts and appends finding no
    block), so the property above covers it."""
    assert sum(run_stream(seed, 3, "max_utilization") for seed in range(5)) > 0


def test_a_failed_pass_requeues_the_request_and_drops_its_drafts_from_the_step() -> None:
    """``compute_failed`` aborts a decoder with drafts: ``requeue_failed`` returns the step
    without its decode and drafts, the other's tokens still apply, and the aborted request
    prefills its prompt and output again."""
    s = make_scheduler()
    s.add_request(Request("a", [1, 2, 3, 4, 5], 10))
    s.add_request(Request("b", [6, 7, 8], 10))
    s.update(s.step(), {"a": 20, "b": 30})
    step = s.step()
    assert (step.decode_request_ids, step.num_draft_tokens) == (("a", "b"), (3, 3))
    assert s.manager.compute_failed(["a"]) == ["a"]
    step = s.requeue_failed(step, ["a"])
    assert (step.decode_request_ids, step.num_draft_tokens) == (("b",), (3,))
    assert step.num_scheduled_tokens == 4
    s.update(step, {"b": [31, 32]})
    s.manager.check_invariants()
    # a prefills its prompt and output again, past the block its first step computed.
    step = s.step()
    assert [(c.request_id, c.num_reused_tokens, c.num_tokens)
            for c in step.context_chunks] == [("a", 4, 2)]
    assert (step.decode_request_ids, step.num_draft_tokens) == (("b",), (3,))


# ---- the simulator ----------------------------------------------------------------------


def chat_replay(drafts: int, acceptance: float) -> SimReport:
    return simulate(SyntheticChat(num_requests=16, arrival_rate_per_s=20.0),
                    CacheConfig(num_gpu_blocks=400, num_host_blocks=400),
                    SchedulerConfig(max_num_tokens=2048, num_speculative_tokens=drafts),
                    check_every=7, draft_acceptance=acceptance)


def test_replays_with_drafts_serve_the_same_output_in_fewer_steps() -> None:
    """Every draft accepted: the same output tokens as without drafts in fewer steps, and
    every draft counted accepted; none accepted: one token a decode, as without drafts,
    each draft still verified."""
    plain, all_in, none_in = chat_replay(0, 0.7), chat_replay(3, 1.0), chat_replay(3, 0.0)
    assert plain.speculative is None
    assert plain.num_output_tokens == all_in.num_output_tokens == none_in.num_output_tokens
    assert all_in.num_steps < plain.num_steps
    spec = all_in.speculative
    assert spec is not None and spec["num_draft_tokens"] == spec["num_accepted_draft_tokens"] > 0
    spec = none_in.speculative
    assert spec is not None and spec["num_accepted_draft_tokens"] == 0 < spec["num_draft_tokens"]
    assert none_in.num_steps >= plain.num_steps  # drafts cost budget, never save a step


@pytest.mark.parametrize("acceptance", [-0.1, 1.5, float("nan"), True])
def test_a_bad_acceptance_is_refused(acceptance: float) -> None:
    """draft_acceptance outside [0, 1] raises, naming it."""
    with pytest.raises(ValueError, match="draft_acceptance must be a number in"):
        chat_replay(2, acceptance)


def test_a_fleet_takes_the_acceptance_and_sums_its_instances_drafts() -> None:
    """Every instance of a fleet draws with the acceptance given (none accepted at 0, all at
    1), and the fleet's report sums their drafts; a bad acceptance is refused, naming it."""
    workload = SyntheticChat(num_requests=12, arrival_rate_per_s=20.0)
    cache = CacheConfig(num_gpu_blocks=400, num_host_blocks=400)
    sched = SchedulerConfig(max_num_tokens=2048, num_speculative_tokens=2)
    for acceptance in (0.0, 1.0):
        report = simulate_fleet(workload, cache, 2, sched=sched, draft_acceptance=acceptance)
        spec = report.speculative
        assert spec is not None and spec["num_draft_tokens"] > 0
        assert spec["num_accepted_draft_tokens"] == acceptance * spec["num_draft_tokens"]
    with pytest.raises(ValueError, match="draft_acceptance must be a number in"):
        simulate_fleet(workload, cache, 2, sched=sched, draft_acceptance=2.0)
    assert simulate_fleet(workload, cache, 2).speculative is None


@pytest.mark.parametrize("value", [-1, 65, True, 2.0, "3", None])
def test_a_bad_draft_count_is_refused_naming_it(value: Any) -> None:
    """num_speculative_tokens outside 0..64, or no int: ValueError naming the field."""
    with pytest.raises(ValueError, match=f"num_speculative_tokens must be an integer in "
                       f"0..64, got {value!r}"):
        SchedulerConfig(num_speculative_tokens=value)
