"""Red team, nineteenth pass: the core's admission, recovery and remote fetch rule, reached
with mixed batches (a request that skips reading the cache beside one reusing a partial
block), forward passes failing on runs two requests stored, and costs at the ends of their
ranges. Each test fails on the code before its fix and asserts the exact state after (block
ids, reuse, what stays cached), the books recounted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bad_input_helpers import run_cli
from kvtier import CacheConfig, KVCacheManager, SequenceSpec, Tier
from kvtier.remote.tier import num_blocks_worth_fetching
from test_faults import GARBAGE, Memory, check_cache_contents

TPB = 4


def make_manager(num_gpu_blocks: int = 8, num_host_blocks: int = 4,
                 partial: bool = False) -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=num_gpu_blocks,
                                      num_host_blocks=num_host_blocks,
                                      enable_partial_reuse=partial), clock=lambda: 0.0)


def cached(mgr: KVCacheManager) -> list[tuple[int, tuple[int, ...]]]:
    """(GPU or host slot, tokens) of every cached block, parents first."""
    return [(b.slot, tuple(b.tokens)) for b in mgr.cached_blocks()]


# ---- admission: a skip-reading request's store inside its batch --------------------------

X0, X1 = [0, 1, 2, 3], [4, 5, 6, 7]


def x1_cached_as_a_leaf() -> KVCacheManager:
    """``X0 X1`` cached as one GPU run (slots 0, 1), unreferenced: ``X1`` is a leaf block a
    partial match can reuse in place."""
    mgr = make_manager(partial=True)
    mgr.add_sequence(SequenceSpec("p", X0 + X1 + [100]))
    mgr.remove_sequence("p")
    assert cached(mgr) == [(0, tuple(X0)), (1, tuple(X1))]
    return mgr


@pytest.mark.parametrize("tail", [[100], [100, 101, 102, 103, 104]])
def test_a_skip_reading_request_does_not_store_under_a_partial_claimed_in_its_batch(
        tail: list[int]) -> None:
    """``b`` reuses 2 tokens of the leaf ``X1`` in place; ``a``, ahead of it in the same
    batch, skips reading the cache and computes ``X0 X1`` again. ``a``'s blocks were stored
    during phase 2, before ``b``'s: its store followed ``b``'s claimed source (a second
    holder, or children grown below it), and ``b``'s in-place reuse detached a block that
    was no longer its alone (AssertionError, or a live request on a detached node). Now
    ``a`` stores after the whole batch: ``b`` takes ``X1``'s slot 1 in place and ``a``'s
    own ``X1`` (slot 3) is cached in its stead::

        before   root ─ X0(0) ─ X1(1)
        after    root ─ X0(0) ─ X1(3) ─ [100..103](4)       b: [0, 1]   a: [2, 3, 4, ...]
    """
    mgr = x1_cached_as_a_leaf()
    b_prompt = X0 + X1[:2] + [77]
    assert mgr.lookup(b_prompt).num_partial_tokens == 2
    a, b = mgr.add_sequence_batch([
        SequenceSpec("a", X0 + X1 + tail, skip_reading_prefix_cache=True),
        SequenceSpec("b", b_prompt)])
    mgr.check_invariants()
    assert (a.num_reused_tokens, list(a.block_ids)) == (0, [2, 3, 4, 5][:len(a.block_ids)])
    assert len(a.block_ids) == (8 + len(tail) + TPB - 1) // TPB
    assert (b.num_reused_tokens, list(b.block_ids)) == (6, [0, 1])
    assert mgr.stats.num_partial_in_place == 1
    want = [(0, tuple(X0)), (3, tuple(X1))]
    if len(tail) > TPB:
        want.append((4, tuple(tail[:TPB])))
    assert cached(mgr) == want
    mgr.remove_sequence("a")
    mgr.remove_sequence("b")
    mgr.check_invariants()
    assert cached(mgr) == want
    assert mgr.num_free_gpu_blocks == 8


# ---- recovery: a failed pass on a run another request stored first ----------------------


def test_a_failed_pass_drops_its_block_grown_onto_a_run_another_request_stored() -> None:
    """``o`` and ``f`` decode the same tokens: ``o`` stores decode block 2 (slot 4) first,
    ``f`` follows it with a private copy (slot 5); ``o`` leaves, and ``f``'s next decode
    block (slot 6) grows that run in place (``f`` holds it alone). ``f``'s pass computing
    block 3 fails. Recovery judged a run by its first block, ``o``'s, so block 3, never
    computed, stayed cached for the next request to read. Now it is judged block by block:
    block 3 leaves, ``o``'s block 2 stays::

        run      [ 50..53 (4, o's) | 54..57 (6, f's: garbage) ]
        f table  [ 2 | 3 | 5 | 6 ]          valid through block 2
    """
    mgr = make_manager(num_gpu_blocks=16, num_host_blocks=0)
    prompt = X0 + X1
    mgr.add_sequence_batch([SequenceSpec("o", prompt), SequenceSpec("f", prompt)])
    for t in (50, 51, 52, 53):
        mgr.append_tokens("o", [t])
        mgr.append_tokens("f", [t])
    mgr.remove_sequence("o")
    for t in (54, 55, 56):
        mgr.append_tokens("f", [t])
    mgr.begin_step()
    mgr.append_tokens("f", [57])
    mgr.end_step()
    assert mgr.block_table("f") == [2, 3, 5, 6]
    assert cached(mgr)[2:] == [(4, (50, 51, 52, 53)), (6, (54, 55, 56, 57))]
    assert mgr.compute_failed(["f"]) == ["f"]
    mgr.check_invariants()
    assert cached(mgr) == [(0, tuple(X0)), (1, tuple(X1)), (4, (50, 51, 52, 53))]
    assert mgr.lookup(prompt + list(range(50, 58)) + [9]).num_tokens == 12
    assert mgr.num_free_gpu_blocks == 16


# ---- the remote fetch rule at the ends of its costs' ranges -----------------------------


def worth(num_blocks: int, **kw: object) -> int:
    costs: dict[str, object] = dict(latency_s=1e-3, fetch_s_per_block=1e-3,
                                    recompute_s_per_block=3e-3)
    costs.update(kw)
    return num_blocks_worth_fetching(num_blocks, **costs)  # type: ignore[arg-type]


def test_the_fetch_rule_decides_on_costs_past_an_hour() -> None:
    """A store queue of two hours ahead of the read (the fleet simulator adds it to the
    latency), a store measured at a block per 4096 s, a recompute of 3 hours a block: each
    raised ValueError (capped at 3600 s). Any finite cost decides."""
    assert worth(10, latency_s=7200.0, recompute_s_per_block=10_800.0) == 10
    assert worth(10, latency_s=7200.0) == 0  # 10 x 2 ms never pays two hours back
    assert worth(3, fetch_s_per_block=4096.0, recompute_s_per_block=10_800.0) == 3
    assert worth(3, fetch_s_per_block=4096.0, recompute_s_per_block=10_800.0,
                 max_wait_s=3 * 3600.0) == 2  # the third arrives after 12,288 s
    assert worth(10, max_wait_s=1e300) == 10


def test_the_fetch_rule_takes_a_subnormal_fetch_cost() -> None:
    """A fetch cost of 5e-324 s a block (a subnormal, from a huge measured throughput)
    made ``int((wait - latency) / fetch)`` an ``int(inf)``: OverflowError. Every block
    arrives within the wait."""
    assert worth(10, fetch_s_per_block=5e-324, max_wait_s=1.0) == 10
    assert worth(10, fetch_s_per_block=5e-324, recompute_s_per_block=1e-323,
                 latency_s=0.0, max_wait_s=1.0) == 10
    assert worth(10**400, max_wait_s=None) == 10**400  # no float of the count is made


@pytest.mark.parametrize("field", ["latency_s", "fetch_s_per_block", "recompute_s_per_block",
                                   "max_wait_s"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -1e-300, True,
                                   "1", None, pytest.param(10**400, id="10**400")])
def test_the_fetch_rule_refuses_what_is_no_finite_cost(field: str, value: object) -> None:
    """NaN, infinities, a negative, a bool, a non-number, an int past the float range: a
    ValueError naming the field (``max_wait_s`` None is no limit, not a cost; an infinite
    latency or fetch time is a fetch that never lands: none worth it)."""
    if field == "max_wait_s" and value is None:
        assert worth(3, max_wait_s=None) == 3
        return
    if field in ("latency_s", "fetch_s_per_block") and value == float("inf"):
        # A fetch that never lands is a cost, and no block is worth it (22b: a link slow
        # enough that the fleet's fetch times overflow to infinity fetches nothing).
        assert worth(3, **{field: value}) == 0
        return
    with pytest.raises(ValueError, match=f"^{field} must be a finite number >= 0, got "):
        worth(3, **{field: value})
    # Refused even where the answer needs no cost (nothing to fetch).
    with pytest.raises(ValueError, match=f"^{field} must be a finite number >= 0"):
        worth(0, **{field: value})


# ---- mixed rounds against a slot-content model -------------------------------------------

SALT_CHOICES: tuple[str | None, ...] = (None, "s")
SELDOM = st.sampled_from([False, False, False, False, True])  # a request lives for rounds
MOSTLY = st.sampled_from([True, True, True, False])


def next_token(salt: object, tokens: list[int]) -> int:
    """The model: a token of a tiny alphabet, a function of the key space and the tokens so
    far, so requests of one prompt decode alike (runs stored first by one, followed and
    grown by another)."""
    return (sum(tokens) * 3 + len(tokens) + (salt == "s")) % 2


def holds(held: object, salt: object, tokens: tuple[int, ...], end: int) -> bool:
    """Whether a slot holding ``held`` has the KV of ``tokens[:end]`` (a partial copy holds
    only the positions it copied)."""
    return (isinstance(held, tuple) and held != GARBAGE and held[0] == salt
            and len(held[1]) >= end and held[1][:end] == tokens[:end])


@settings(max_examples=300, deadline=None)
@given(
    tpb=st.sampled_from([1, 2, 4]),
    num_gpu_blocks=st.integers(8, 24),
    num_host_blocks=st.sampled_from([0, 4, 16]),
    partial=st.booleans(),
    copy=st.booleans(),
    prefixes=st.lists(st.lists(st.integers(0, 1), min_size=1, max_size=9), min_size=1,
                      max_size=3),
    num_rounds=st.integers(1, 25),
    data=st.data(),
)
def test_mixed_rounds_never_serve_or_cache_garbage(
    tpb: int, num_gpu_blocks: int, num_host_blocks: int, partial: bool, copy: bool,
    prefixes: list[list[int]], num_rounds: int, data: st.DataObject,
) -> None:
    """Rounds, inside a step or not, of batches mixing requests that skip reading the cache
    with partial reuse, host onboards and chunked prefills, prefill chunks, decodes of one
    prompt alike, copies and forward passes failing at random, finishes: every admitted
    request gets
    the reuse ``lookup`` promised (none if it skips reading), every position a pass reads
    holds its KV, every cached block its prefix, nothing leaks."""
    mgr = KVCacheManager(CacheConfig(
        tokens_per_block=tpb, num_gpu_blocks=num_gpu_blocks, num_host_blocks=num_host_blocks,
        enable_partial_reuse=partial, copy_on_partial_reuse=copy), clock=lambda: 0.0)
    mem = Memory()
    tokens: dict[str, list[int]] = {}
    salts: dict[str, object] = {}
    prompt_len: dict[str, int] = {}
    done: dict[str, int] = {}  # tokens its passes computed
    history: list[list[int]] = []
    n = 0
    for _ in range(num_rounds):
        in_step = data.draw(st.booleans(), label="in step")
        specs: list[SequenceSpec] = []
        for _ in range(data.draw(st.integers(0, 3), label="batch")):
            n += 1
            # A seed prefix or an earlier request's tokens (its decodes too), cut anywhere,
            # then a few tokens: full, partial and no matches, in either key space.
            twin = data.draw(st.booleans(), label="twin") if specs else False
            if twin:
                # The previous request's prompt again: the two decode alike.
                prompt, salt = list(specs[-1].tokens), specs[-1].salt
            else:
                base = data.draw(st.sampled_from(prefixes + history[-6:]))
                base = base[:data.draw(st.integers(0, len(base)), label="cut")]
                prompt = (base + data.draw(st.lists(st.integers(0, 1), max_size=5))) or [0]
                salt = data.draw(st.sampled_from(SALT_CHOICES))
            specs.append(SequenceSpec(
                f"r{n}", prompt, salt=salt,
                skip_reading_prefix_cache=data.draw(st.booleans(), label="skip"),
                num_new_tokens=data.draw(st.one_of(st.none(), st.integers(1, len(prompt))),
                                         label="chunk")))
        lookups = [mgr.lookup(s.tokens, salt=s.salt) for s in specs]
        if in_step:
            mgr.begin_step()
        try:
            admissions = mgr.add_sequence_batch(specs)
        except ValueError as exc:
            assert "num_gpu_blocks is" in str(exc)
            specs, lookups, admissions = [], [], []
        new = set()
        for spec, found, adm in zip(specs, lookups, admissions, strict=True):
            if not adm.admitted:
                continue
            rid = spec.request_id
            want = 0 if spec.skip_reading_prefix_cache else found.num_tokens
            assert adm.num_reused_tokens == want, (spec, found, adm)
            new.add(rid)
            tokens[rid], salts[rid] = list(spec.tokens), spec.salt
            prompt_len[rid], done[rid] = len(spec.tokens), adm.num_reused_tokens
        for rid in sorted(set(tokens) - new):
            scheduled = len(tokens[rid]) - mgr.num_unscheduled_tokens(rid)
            if scheduled < prompt_len[rid]:
                if data.draw(st.booleans(), label=f"chunk {rid}"):
                    mgr.schedule_prefill(rid, data.draw(
                        st.integers(1, prompt_len[rid] - scheduled), label="chunk size"))
            elif data.draw(MOSTLY, label=f"decode {rid}"):
                token = next_token(salts[rid], tokens[rid])
                if mgr.append_tokens(rid, [token]) is not None:
                    tokens[rid].append(token)
        plan = mgr.end_step() if in_step else mgr.take_plan()
        bad_ops: set[int] = set()
        if len(plan) and data.draw(SELDOM, label="copies fail"):
            bad_ops = set(data.draw(st.lists(st.integers(0, len(plan) - 1), min_size=1),
                                    label="failed copies"))
        mem.apply(plan, bad_ops, tpb)
        if bad_ops:
            for rid in mgr.transfer_failed(plan, sorted(bad_ops)):
                del tokens[rid], salts[rid], prompt_len[rid], done[rid]
        # The passes: each request reads what it did not compute now, then writes.
        stepped = {rid: len(tokens[rid]) - mgr.num_unscheduled_tokens(rid)
                   for rid in tokens}
        stepped = {rid: end for rid, end in stepped.items() if done[rid] < end}
        failed = [rid for rid in tokens if rid in stepped
                  and data.draw(SELDOM, label=f"fail {rid}")]
        for rid, end in stepped.items():
            toks, table, salt_of = tuple(tokens[rid]), mgr.block_table(rid), salts[rid]
            first = done[rid]
            for p in range(first):
                assert holds(mem.slots.get((Tier.GPU, table[p // tpb])), salt_of, toks, p + 1), (
                    rid, p, table)
            for b in range(first // tpb, -(-end // tpb)):
                mem.slots[(Tier.GPU, table[b])] = (
                    GARBAGE if rid in failed else (salt_of, toks[:min((b + 1) * tpb, end)]))
            done[rid] = end
        aborted = mgr.compute_failed(failed) if failed else []
        assert set(failed) <= set(aborted)
        for rid in aborted:
            del tokens[rid], salts[rid], prompt_len[rid], done[rid]
        mgr.check_invariants()
        check_cache_contents(mgr, mem, tpb)
        for rid in sorted(tokens):
            if data.draw(SELDOM, label=f"finish {rid}"):
                history.append(tokens[rid])
                mgr.remove_sequence(rid)
                del tokens[rid], salts[rid], prompt_len[rid], done[rid]
        mgr.check_invariants()
        check_cache_contents(mgr, mem, tpb)
    for rid in list(tokens):
        mgr.remove_sequence(rid)
    mgr.check_invariants()
    assert mgr.num_free_gpu_blocks == num_gpu_blocks


def test_a_fleet_whose_blocks_take_over_an_hour_to_recompute_runs() -> None:
    """``--set-profile prefill_s_per_token=200`` (a valid profile: at most 3600 s a token)
    with 32-token blocks makes recomputing a block 6400 s: the fleet's fetch rule refused
    it mid-run, ``cannot replay: recompute_s_per_block must be a finite number in [0,
    3600], got 6400.0``, a cost the user never set under that name. Now it decides."""
    code, err = run_cli(["replay", "--workload", "synthetic-chat", "--limit", "10",
                         "--instances", "2", "--remote", "write-through", "--profile",
                         "tiny-test", "--set-profile", "prefill_s_per_token=200",
                         "--tokens-per-block", "32", "--no-progress", "--no-oracle"])
    assert (code, err) == (0, "")
