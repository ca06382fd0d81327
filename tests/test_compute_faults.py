"""Failed forward passes degrade to recompute: what a failed pass was to compute never
stays cached, what earlier passes computed does, nothing leaks.

The "physical memory" model of ``test_faults`` holds what each slot contains. Each step's
plan is applied to it, then the forward pass of each request writes its new positions; a
failed pass writes garbage there instead (a pass may fail halfway through its layers).
After ``compute_failed`` every cached block must hold exactly its prefix.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CacheConfig, KVCacheManager, SequenceSpec, Tier
from test_faults import GARBAGE, SALTS, TOKENS, Memory, check_cache_contents


@settings(max_examples=80, deadline=None)
@given(
    tpb=st.sampled_from([1, 2, 4]),
    num_gpu_blocks=st.integers(8, 24),
    num_host_blocks=st.sampled_from([0, 4, 16]),
    partial=st.booleans(),
    prefixes=st.lists(st.lists(TOKENS, min_size=1, max_size=10), min_size=1, max_size=3),
    num_steps=st.integers(1, 30),
    data=st.data(),
)
def test_failed_forward_passes_never_leave_garbage_cached(
    tpb: int, num_gpu_blocks: int, num_host_blocks: int, partial: bool,
    prefixes: list[list[int]], num_steps: int, data: st.DataObject,
) -> None:
    """Random steps of admissions and decodes whose forward passes fail at random: the
    requests aborted are exactly those whose pass failed, in admission order; every cached
    block holds its own prefix (none of a failed pass's garbage); every reused block of
    every later admission too; nothing leaks."""
    mgr = KVCacheManager(CacheConfig(
        tokens_per_block=tpb, num_gpu_blocks=num_gpu_blocks, num_host_blocks=num_host_blocks,
        enable_partial_reuse=partial), clock=lambda: 0.0)
    mem = Memory()
    tokens: dict[str, list[int]] = {}  # live request -> its tokens
    salts: dict[str, bytes | str | int | None] = {}
    done: dict[str, int] = {}  # live request -> tokens computed by passes that succeeded
    n = num_failed = 0
    for _ in range(num_steps):
        mgr.begin_step()
        specs = []
        for _ in range(data.draw(st.integers(0, 2))):
            n += 1
            prompt = data.draw(st.sampled_from(prefixes)) + data.draw(
                st.lists(TOKENS, min_size=1, max_size=6))
            specs.append(SequenceSpec(f"r{n}", prompt, salt=data.draw(SALTS)))
        try:
            admissions = mgr.add_sequence_batch(specs)
        except ValueError:
            specs, admissions = [], []  # the batch outgrows the pool
        for spec, adm in zip(specs, admissions, strict=True):
            if not adm.admitted:
                continue
            tokens[spec.request_id] = list(spec.tokens)
            salts[spec.request_id] = spec.salt
            done[spec.request_id] = adm.num_reused_tokens
        new = {a.request_id for a in admissions if a.admitted}
        for rid in sorted(set(tokens) - new):  # decodes
            if data.draw(st.booleans(), label=f"decode {rid}"):
                token = data.draw(TOKENS)
                if mgr.append_tokens(rid, [token]) is not None:
                    tokens[rid].append(token)
        plan = mgr.end_step()
        assert not mem.apply(plan, set(), tpb)
        for spec, adm in zip(specs, admissions, strict=True):
            toks = tuple(spec.tokens)
            for b, slot in enumerate(adm.block_ids):  # what it reuses is the right KV
                end = min((b + 1) * tpb, len(toks))
                if adm.admitted and end <= adm.num_reused_tokens:
                    assert mem.slots.get((Tier.GPU, slot)) == (spec.salt, toks[:end])
        # The forward passes: each request with new positions computes them, or fails.
        stepped = [rid for rid in tokens if done[rid] < len(tokens[rid])]
        failed = [rid for rid in stepped if data.draw(st.booleans(), label=f"fail {rid}")]
        for rid in stepped:
            toks, table = tuple(tokens[rid]), mgr.block_table(rid)
            for b in range(done[rid] // tpb, len(table)):
                end = min((b + 1) * tpb, len(toks))
                mem.slots[(Tier.GPU, table[b])] = (
                    GARBAGE if rid in failed else (salts[rid], toks[:end]))
            done[rid] = len(toks)
        aborted = mgr.compute_failed(failed)
        assert aborted == [rid for rid in tokens if rid in failed]  # admission order
        num_failed += len(failed)
        assert mgr.stats.num_failed_computes == num_failed
        for rid in aborted:
            del tokens[rid], salts[rid], done[rid]
            with pytest.raises(KeyError, match=rid):
                mgr.block_table(rid)
        mgr.check_invariants()
        check_cache_contents(mgr, mem, tpb)
        for rid in sorted(tokens):  # some finish
            if data.draw(st.booleans(), label=f"finish {rid}"):
                mgr.remove_sequence(rid)
                del tokens[rid], salts[rid], done[rid]
        check_cache_contents(mgr, mem, tpb)
    for rid in list(tokens):
        mgr.remove_sequence(rid)
    mgr.check_invariants()
    assert mgr.num_free_gpu_blocks == num_gpu_blocks  # nothing leaked


def make_manager() -> KVCacheManager:
    return KVCacheManager(CacheConfig(tokens_per_block=2, num_gpu_blocks=12,
                                      num_host_blocks=0), clock=lambda: 0.0)


def test_a_failed_chunk_drops_only_what_it_was_to_compute() -> None:
    """tpb 2. ``a`` = [1..9] prefills in two chunks: 4 tokens (GPU 0-1), then 5 (GPU 2-4).
    The second chunk's pass fails: its blocks [5 6] and [7 8] (GPU 2-3), stored for
    reuse at the step's end, leave the cache; [1 2] [3 4] (GPU 0-1), computed by the
    first chunk, stay. ``b``, prefilled in the same step, is untouched."""
    mgr = make_manager()
    mgr.begin_step()
    a = mgr.add_sequence(SequenceSpec("a", list(range(1, 10)), num_new_tokens=4,
                                      num_reserved_blocks=3))
    mgr.end_step()
    assert a.block_ids == (0, 1)
    mgr.begin_step()
    mgr.schedule_prefill("a", 5)
    mgr.add_sequence(SequenceSpec("b", [7, 7, 7, 7, 7]))
    mgr.end_step()
    assert mgr.block_table("a") == [0, 1, 2, 3, 4]
    assert mgr.block_table("b") == [5, 6, 7]
    assert mgr.lookup(list(range(1, 10))).num_tokens == 8  # stored at the step's end
    assert mgr.compute_failed(["a"]) == ["a"]
    mgr.check_invariants()
    assert not mgr.has_sequence("a") and mgr.has_sequence("b")
    assert mgr.lookup(list(range(1, 10))).num_tokens == 4
    assert sorted((b.tokens, b.slot) for b in mgr.cached_blocks()) == [
        ((1, 2), 0), ((3, 4), 1), ((7, 7), 5), ((7, 7), 6)]
    assert mgr.stats.num_failed_computes == 1
    assert mgr.num_free_gpu_blocks == 12 - 3  # b holds three; a's cached ones can go


def test_a_failed_decode_drops_the_block_it_filled() -> None:
    """tpb 2. ``a`` = [1 2 3] computed; its decode of token 4 fills block [3 4] (GPU 1),
    stored at the step's end; the pass fails: [3 4] leaves, [1 2] stays."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3]))
    mgr.begin_step()
    assert mgr.append_tokens("a", [4]) == []
    mgr.end_step()
    assert mgr.lookup([1, 2, 3, 4, 5]).num_tokens == 4
    assert mgr.compute_failed(["a"]) == ["a"]
    mgr.check_invariants()
    assert [(b.tokens, b.slot) for b in mgr.cached_blocks()] == [((1, 2), 0)]
    assert mgr.num_free_gpu_blocks == 12  # GPU 1 free again, [1 2] evictable


@pytest.mark.parametrize(("ids", "error", "shown"), [
    ("a", TypeError, "iterable of request ids"),
    (None, TypeError, "iterable of request ids"),
    ([1], TypeError, "request id 1 is not a str"),
    (["a", "zz"], KeyError, "zz"),
])
def test_compute_failed_refuses_bad_ids_and_changes_nothing(
    ids: object, error: type[Exception], shown: str,
) -> None:
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3]))
    before = (mgr.version, mgr.block_table("a"), mgr.cached_blocks())
    with pytest.raises(error, match=shown):
        mgr.compute_failed(ids)  # type: ignore[arg-type]
    assert (mgr.version, mgr.block_table("a"), mgr.cached_blocks()) == before
    mgr.check_invariants()


def test_compute_failed_is_refused_inside_a_step() -> None:
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("a", [1, 2, 3]))
    mgr.begin_step()
    with pytest.raises(RuntimeError, match="not one in progress"):
        mgr.compute_failed(["a"])
    mgr.end_step()
    assert mgr.has_sequence("a")
