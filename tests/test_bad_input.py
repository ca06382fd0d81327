"""Generated garbage through every public entry point (issue 8, "Done when").

Every refusal is a ValueError, TypeError or KeyError whose message names the offending field
(or line), never an OverflowError, IndexError, AttributeError, RecursionError or MemoryError;
and a refused call changes nothing: lookups of fixed probe prompts, stats, version, free
blocks, live requests and the recorded plans are identical, and ``check_invariants`` passes
(``bad_input_helpers.snapshot``).

A bool token id is an int (True is the id 1): the suite does not count it as garbage.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bad_input_helpers import (
    BAD_COUNT,
    BAD_LORA,
    BAD_PRIORITY,
    BAD_RETENTION,
    BAD_SALT,
    BAD_TOKEN,
    GOOD_TOKEN,
    GOOD_TOKENS,
    MAX_TOKEN_ID,
    NOT_A_NUMBER,
    REFUSALS,
    TPB,
    assert_one_line_refusal,
    bad_token_lists,
    check_refused,
    make_manager,
    probe_prompts,
    run_cli,
    snapshot,
)
from kvtier import (
    CacheConfig,
    MultimodalItem,
    OpKind,
    Request,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
    Tier,
    TransferOp,
    TransferPlan,
)

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- CacheConfig --------------------------------------------------------------------------

CONFIG_GARBAGE = {
    "tokens_per_block": st.one_of(BAD_COUNT, st.sampled_from([0, 3, 6, 12, 4.0, True])),
    "num_gpu_blocks": st.one_of(BAD_COUNT, st.sampled_from([0, None])),
    "num_host_blocks": st.one_of(BAD_COUNT, st.none()),
    "max_events": st.one_of(BAD_COUNT, st.sampled_from([0, None])),
    "offload_min_priority": st.one_of(BAD_PRIORITY, st.none()),
    "default_priority": st.one_of(BAD_PRIORITY, st.none()),
    "hash_algo": st.one_of(st.sampled_from(["md5", "XXH3_128", "", None, 1, True])),
    "eviction_policy": st.one_of(st.sampled_from(["fifo", "LRU", "", None, 0, False])),
    "enable_block_reuse": st.sampled_from([1, 0, "yes", None, 1.0]),
    "enable_partial_reuse": st.sampled_from([1, 0, "no", None]),
    "copy_on_partial_reuse": st.sampled_from([1, "", None]),
    "enable_events": st.sampled_from([1, 0, "true", None]),
}


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(CONFIG_GARBAGE)))
def test_cache_config_refuses_garbage_naming_the_field(data: st.DataObject, name: str) -> None:
    """Every CacheConfig field refuses garbage with a ValueError naming it."""
    value = data.draw(CONFIG_GARBAGE[name], label=name)
    exc = check_refused(lambda: CacheConfig(**{name: value}), (name,))  # type: ignore[arg-type]
    assert isinstance(exc, ValueError)


@pytest.mark.parametrize("name", ["num_gpu_blocks", "num_host_blocks", "max_events"])
@pytest.mark.parametrize("size", [10**12, 2**62, 2**200])
def test_huge_sizes_are_refused_or_lazy(name: str, size: int) -> None:
    """A huge pool size is refused naming the field (ValueError, not MemoryError), or
    accepted without allocating it: the manager then works."""
    try:
        CacheConfig(**{name: size})  # type: ignore[arg-type]
    except ValueError as exc:
        assert name in str(exc)
        return
    mgr = make_manager(**{name: size})
    assert mgr.add_sequence(SequenceSpec("h", [1, 2, 3, 4, 5])).admitted
    mgr.check_invariants()


# ---- SequenceSpec and MultimodalItem ------------------------------------------------------

SPEC_GARBAGE = {
    "request_id": st.one_of(st.just(""), GOOD_TOKEN, st.none(), st.binary(max_size=2),
                            st.lists(st.text(max_size=1), max_size=1)),
    "salt": BAD_SALT,
    "lora_id": BAD_LORA,
    "priority": BAD_PRIORITY,
    "retention_s": BAD_RETENTION,
    "num_new_tokens": st.one_of(BAD_COUNT, st.just(0)),
    "num_reserved_blocks": st.one_of(BAD_COUNT, st.none()),
    "mm_items": st.one_of(
        st.sampled_from([5, "ab", None, [1], [None], [(0, 1, "h")], ({"offset": 0},)]),
        st.lists(st.builds(MultimodalItem, st.integers(0, 3), st.integers(1, 3), st.text()),
                 min_size=1, max_size=2).map(
            lambda items: [*items, MultimodalItem(100, 1, "past the end")])),
}


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(SPEC_GARBAGE)), tokens=GOOD_TOKENS)
def test_sequence_spec_refuses_garbage_naming_the_field(
    data: st.DataObject, name: str, tokens: list[int],
) -> None:
    """Every SequenceSpec field refuses garbage naming it."""
    value = data.draw(SPEC_GARBAGE[name], label=name)
    fields = ("MultimodalItem", "mm_items") if name == "mm_items" else (name,)
    kwargs: dict[str, object] = {"request_id": "r", "tokens": tokens, name: value}
    check_refused(lambda: SequenceSpec(**kwargs), fields)  # type: ignore[arg-type]


@SETTINGS
@given(tokens=bad_token_lists())
def test_sequence_spec_refuses_bad_tokens(tokens: object) -> None:
    """Tokens out of 0 <= id < 2**63, non-ints, bools, empties and non-sequences are refused
    naming the tokens."""
    check_refused(lambda: SequenceSpec("r", tokens), ("tokens",))  # type: ignore[arg-type]


MM_GARBAGE = {
    "offset": st.one_of(st.integers(max_value=-1), st.booleans(), st.floats(), NOT_A_NUMBER,
                        st.none()),
    "length": st.one_of(st.integers(max_value=0), st.booleans(), st.floats(), NOT_A_NUMBER,
                        st.none()),
    "content_hash": st.one_of(st.booleans(), st.floats(), st.none(),
                              st.lists(GOOD_TOKEN, max_size=1)),
}


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(MM_GARBAGE)))
def test_multimodal_item_refuses_garbage_naming_the_field(data: st.DataObject, name: str) -> None:
    """Every MultimodalItem field refuses garbage naming it (a bool is no int)."""
    kwargs: dict[str, object] = {"offset": 0, "length": 1, "content_hash": "img"}
    kwargs[name] = data.draw(MM_GARBAGE[name], label=name)
    check_refused(lambda: MultimodalItem(**kwargs), (name,))  # type: ignore[arg-type]


@FEW
@given(tokens=GOOD_TOKENS, extra=GOOD_TOKEN)
def test_spec_takes_a_snapshot_of_its_tokens(tokens: list[int], extra: int) -> None:
    """Changing the caller's token list after the spec is built changes nothing admitted."""
    mgr = make_manager()
    original = list(tokens)
    spec = SequenceSpec("m", tokens)
    expected = mgr.lookup(original)
    tokens.append("x")  # type: ignore[arg-type]
    tokens.clear()
    tokens.append(extra)
    adm = mgr.add_sequence(spec)
    assert adm.admitted and adm.num_reused_tokens == expected.num_tokens
    assert len(adm.block_ids) == -(-len(original) // TPB)
    assert list(spec.tokens) == original
    mgr.remove_sequence("m")
    mgr.check_invariants()
    assert mgr.lookup(original + [0]).num_tokens >= len(original) // TPB * TPB


# ---- lookup -------------------------------------------------------------------------------

LOOKUP_GARBAGE = {"salt": BAD_SALT, "lora_id": BAD_LORA,
                  "mm_items": SPEC_GARBAGE["mm_items"]}


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(LOOKUP_GARBAGE)), tokens=GOOD_TOKENS)
def test_lookup_validates_like_sequence_spec(data: st.DataObject, name: str,
                                             tokens: list[int]) -> None:
    """lookup refuses exactly what SequenceSpec refuses, naming the same field."""
    mgr = make_manager()
    value = data.draw(LOOKUP_GARBAGE[name], label=name)
    fields = ("MultimodalItem", "mm_items") if name == "mm_items" else (name,)
    check_refused(lambda: SequenceSpec("r", tokens, **{name: value}), fields)
    check_refused(lambda: mgr.lookup(tokens, **{name: value}), fields, mgr)


@SETTINGS
@given(tokens=bad_token_lists())
def test_lookup_refuses_bad_tokens(tokens: object) -> None:
    """lookup refuses the tokens SequenceSpec refuses, naming them, changing nothing."""
    mgr = make_manager()
    check_refused(lambda: mgr.lookup(tokens), ("tokens",), mgr)  # type: ignore[arg-type]


@SETTINGS
@given(data=st.data())
def test_lookup_answers_the_same_for_every_sequence_type(data: st.DataObject) -> None:
    """lookup(tuple(t)) == lookup(list(t)) == what admission reuses."""
    mgr = make_manager()
    tokens, salt, lora_id = data.draw(st.sampled_from(probe_prompts()))
    tokens = tokens[: data.draw(st.integers(1, len(tokens)))]
    want = mgr.lookup(list(tokens), salt=salt, lora_id=lora_id)
    assert mgr.lookup(tuple(tokens), salt=salt, lora_id=lora_id) == want
    adm = mgr.add_sequence(SequenceSpec("t", tuple(tokens), salt=salt,
                                        lora_id=lora_id))
    assert adm.admitted and adm.num_reused_tokens == want.num_tokens


def test_lookup_of_a_range_equals_the_list() -> None:
    """A range is a sequence of ints too: same answer as its list, or refused clearly."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("r", list(range(9))))
    want = mgr.lookup(list(range(9)))
    try:
        got = mgr.lookup(range(9))
    except REFUSALS as exc:
        assert "tokens" in str(exc)
        return
    assert got == want


# ---- add_sequence_batch -------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_batch_with_a_garbage_item_is_refused_whole(data: st.DataObject) -> None:
    """A batch holding anything but SequenceSpecs is refused naming the item; nothing of
    it is admitted."""
    mgr = make_manager()
    good = [SequenceSpec(f"g{i}", [1, 2, 3, i]) for i in range(data.draw(st.integers(0, 2)))]
    junk = data.draw(st.sampled_from([None, 5, "spec", ("g9", [1, 2]), [1, 2, 3], {"a": 1}]))
    batch = list(good)
    batch.insert(data.draw(st.integers(0, len(good))), junk)  # type: ignore[arg-type]
    check_refused(lambda: mgr.add_sequence_batch(batch), ("item", "SequenceSpec"), mgr)


@pytest.mark.parametrize("junk", [None, 5, "ab", b"ab", 1.5, SequenceSpec("x", [1])])
def test_batch_that_is_no_iterable_of_specs_is_refused(junk: object) -> None:
    """A batch that is no collection of specs (a spec itself, a str, a number) is refused."""
    mgr = make_manager()
    check_refused(lambda: mgr.add_sequence_batch(junk),  # type: ignore[arg-type]
                  ("batch", "SequenceSpec", "specs", "item"), mgr)


@pytest.mark.parametrize("wrap", [iter, lambda specs: (s for s in specs), tuple, dict.fromkeys],
                         ids=["iter", "generator", "tuple", "dict"])
def test_batch_from_any_iterable_admits_like_a_list(wrap: object) -> None:
    """An iterator or generator of specs admits exactly what the list does (or is refused
    clearly); it never silently returns [] for a non-empty batch."""
    specs = [SequenceSpec("a", [1, 2, 3, 4, 5, 6, 7, 0, 9]), SequenceSpec("b", [7] * 6)]
    twin, mgr = make_manager(), make_manager()
    want = twin.add_sequence_batch(specs)
    try:
        got = mgr.add_sequence_batch(wrap(specs))  # type: ignore[operator]
    except REFUSALS as exc:
        assert "batch" in str(exc) or "specs" in str(exc)
        assert snapshot(mgr) == snapshot(make_manager())
        return
    assert got == want
    assert snapshot(mgr) == snapshot(twin)


@SETTINGS
@given(data=st.data())
def test_duplicate_or_live_ids_refuse_the_batch_naming_the_id(data: st.DataObject) -> None:
    """A duplicate id in the batch, or the id of a live request, refuses the whole batch
    naming it, changing nothing (no version bump, no empty root, no claims)."""
    mgr = make_manager()
    n = data.draw(st.integers(1, 3))
    specs = [SequenceSpec(f"n{i}", data.draw(GOOD_TOKENS), salt=data.draw(
        st.sampled_from([None, "fresh-salt", 12345]))) for i in range(n)]
    bad_id = data.draw(st.sampled_from(["live", "chunked", *[s.request_id for s in specs]]))
    specs.insert(data.draw(st.integers(0, n)), SequenceSpec(bad_id, [1, 2, 3]))
    check_refused(lambda: mgr.add_sequence_batch(specs), (repr(bad_id),), mgr)


@FEW
@given(salt=st.text(min_size=1, max_size=4))
def test_batch_too_big_for_the_pool_changes_nothing(salt: str) -> None:
    """A batch that could not fit an empty GPU pool is refused; version and tree unchanged."""
    mgr = make_manager()
    specs = [SequenceSpec("big", [3] * (TPB * 17), salt=salt)]
    check_refused(lambda: mgr.add_sequence_batch(specs), ("num_gpu_blocks",), mgr)


# ---- growth, release, import, recovery ----------------------------------------------------


@SETTINGS
@given(tokens=bad_token_lists())
def test_append_tokens_refuses_bad_tokens(tokens: object) -> None:
    """append_tokens validates its tokens before anything changes."""
    mgr = make_manager()
    check_refused(lambda: mgr.append_tokens("live", tokens), ("tokens",), mgr)  # type: ignore[arg-type]


@pytest.mark.parametrize("rid", ["nobody", "", 5, None, ("live",), ["live"], b"live"])
def test_unknown_request_ids_are_refused_naming_the_id(rid: object) -> None:
    """Every call taking a request id refuses an unknown (or unhashable) one, naming it."""
    mgr = make_manager()
    fields = ("request_id", repr(rid))
    check_refused(lambda: mgr.append_tokens(rid, [1]), fields, mgr)  # type: ignore[arg-type]
    check_refused(lambda: mgr.schedule_prefill(rid, 1), fields, mgr)  # type: ignore[arg-type]
    check_refused(lambda: mgr.remove_sequence(rid), fields, mgr)  # type: ignore[arg-type]
    check_refused(lambda: mgr.block_table(rid), fields, mgr)  # type: ignore[arg-type]
    check_refused(lambda: mgr.append_token_batch([(rid, 1)]), fields, mgr)  # type: ignore[list-item]


@SETTINGS
@given(data=st.data())
def test_append_token_batch_validates_every_item_before_applying_any(
    data: st.DataObject,
) -> None:
    """A bad item k refuses the whole batch: items before k are not applied either."""
    mgr = make_manager()
    good = [("live", data.draw(GOOD_TOKEN)) for _ in range(data.draw(st.integers(0, 3)))]
    bad = data.draw(st.one_of(
        st.tuples(st.just("live"), BAD_TOKEN),
        st.tuples(st.sampled_from(["nobody", "chunked"]), GOOD_TOKEN),
        st.sampled_from([("live",), ("live", 1, 2), 5, None, "live"])))
    items: list[object] = list(good)
    items.insert(data.draw(st.integers(0, len(good))), bad)
    check_refused(lambda: mgr.append_token_batch(items),  # type: ignore[arg-type]
                  ("token", "item", "request_id", "unscheduled", "'nobody'"), mgr)


@SETTINGS
@given(num_tokens=st.one_of(BAD_COUNT, st.just(0), st.integers(min_value=7)))
def test_schedule_prefill_refuses_bad_counts(num_tokens: object) -> None:
    """schedule_prefill refuses a count that is no int in 1..unscheduled, naming it."""
    mgr = make_manager()
    check_refused(lambda: mgr.schedule_prefill("chunked", num_tokens),  # type: ignore[arg-type]
                  ("num_tokens", "unscheduled"), mgr)


@pytest.mark.parametrize("flag", [None, "no", 1.0])
def test_remove_sequence_refuses_a_non_bool_flag(flag: object) -> None:
    """store_for_reuse is a bool; anything else is refused naming it."""
    mgr = make_manager()
    check_refused(lambda: mgr.remove_sequence("live", store_for_reuse=flag),  # type: ignore[arg-type]
                  ("store_for_reuse",), mgr)


IMPORT_GARBAGE = {
    "tokens": bad_token_lists(),
    "num_blocks": st.one_of(BAD_COUNT, st.none()),
    "salt": BAD_SALT,
    "lora_id": BAD_LORA,
}


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(IMPORT_GARBAGE)))
def test_import_blocks_refuses_garbage_naming_the_field(data: st.DataObject, name: str) -> None:
    """import_blocks validates every argument before touching the tree."""
    mgr = make_manager()
    kwargs: dict[str, object] = {"tokens": [4] * 13, "num_blocks": 2}
    kwargs[name] = data.draw(IMPORT_GARBAGE[name], label=name)
    check_refused(lambda: mgr.import_blocks(**kwargs), (name,), mgr)  # type: ignore[arg-type]


def a_plan() -> TransferPlan:
    return TransferPlan((TransferOp(OpKind.ONBOARD, Tier.HOST, 0, Tier.GPU, 3, TPB),))


@pytest.mark.parametrize("failed", [[1], [-1], [10**30], ["0"], [True], [0.0], [None], 5, None,
                                    "0"])
def test_transfer_failed_refuses_bad_indices(failed: object) -> None:
    """failed_ops must be indices into the plan: anything else is refused naming it."""
    mgr = make_manager()
    check_refused(lambda: mgr.transfer_failed(a_plan(), failed),  # type: ignore[arg-type]
                  ("failed_ops", "failed"), mgr)


@pytest.mark.parametrize("plan", [None, [], (), "plan", 5])
def test_transfer_failed_refuses_a_non_plan(plan: object) -> None:
    """The plan must be a TransferPlan."""
    mgr = make_manager()
    check_refused(lambda: mgr.transfer_failed(plan, [0]),  # type: ignore[arg-type]
                  ("plan", "TransferPlan"), mgr)


# ---- accepted edge values work through the whole lifecycle --------------------------------


@SETTINGS
@given(
    tokens=st.lists(st.sampled_from([0, 1, MAX_TOKEN_ID, MAX_TOKEN_ID - 1, 2**62]),
                    min_size=1, max_size=10),
    decode=st.lists(st.sampled_from([0, MAX_TOKEN_ID]), min_size=1, max_size=TPB + 1),
    salt=st.one_of(st.none(), st.integers(), st.text(max_size=3), st.binary(max_size=3)),
    lora_id=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    retention_s=st.one_of(st.none(), st.sampled_from([0, 0.0, 1e300, 5])),
    hash_algo=st.sampled_from(["xxh3_128", "sha256"]),
)
def test_edge_values_are_refused_or_work_end_to_end(
    tokens: list[int], decode: list[int], salt: bytes | str | int | None, lora_id: int | None,
    retention_s: float | None, hash_algo: str,
) -> None:
    """Extreme but documented values (ids up to 2**63 - 1, big salts and LoRA ids, long
    retentions) are admitted, appended, hashed into events and released without error."""
    mgr = make_manager(hash_algo=hash_algo)
    try:
        spec = SequenceSpec("e", tokens, salt=salt, lora_id=lora_id,
                            retention_s=retention_s, priority=100)
    except ValueError as exc:  # a value outside the documented contract, named
        assert any(f in str(exc) for f in ("salt", "lora_id", "retention_s")), exc
        return
    want = mgr.lookup(tokens, salt=salt, lora_id=lora_id)
    adm = mgr.add_sequence(spec)
    assert adm.admitted and adm.num_reused_tokens == want.num_tokens
    assert mgr.append_tokens("e", decode) is not None
    assert mgr.append_token_batch([("e", decode[0])]) == 1
    mgr.remove_sequence("e")
    mgr.check_invariants()
    mgr.drain_events()
    full = tokens + decode + [decode[0]]
    found = mgr.lookup(full + [0], salt=salt, lora_id=lora_id)
    assert found.num_tokens - found.num_partial_tokens == len(full) // TPB * TPB


# ---- Scheduler ----------------------------------------------------------------------------

REQUEST_GARBAGE = {
    "request_id": SPEC_GARBAGE["request_id"],
    "prompt": bad_token_lists(),
    "max_output_tokens": st.one_of(BAD_COUNT, st.sampled_from([0, None])),
    "arrival_s": st.one_of(st.sampled_from([float("inf"), float("nan"), 10**400, True, None]),
                           NOT_A_NUMBER),
    "salt": BAD_SALT,
    "lora_id": BAD_LORA,
    "priority": BAD_PRIORITY,
    "retention_s": BAD_RETENTION,
}


def make_scheduler(num_gpu_blocks: int = 16) -> Scheduler:
    from kvtier import KVCacheManager

    mgr = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=num_gpu_blocks,
                                     enable_partial_reuse=False))
    return Scheduler(mgr, SchedulerConfig(max_num_tokens=16,
                                          capacity_policy="max_utilization"))


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(REQUEST_GARBAGE)))
def test_request_refuses_garbage_naming_the_field(data: st.DataObject, name: str) -> None:
    """Request(...) refuses garbage in any field, naming it; so does add_request for a
    request changed to garbage after it was built; the queue is unchanged."""
    value = data.draw(REQUEST_GARBAGE[name], label=name)
    fields = ("prompt",) if name == "prompt" else (name,)
    kwargs: dict[str, object] = {"request_id": "q", "prompt": [1, 2, 3],
                                 "max_output_tokens": 2, name: value}
    check_refused(lambda: Request(**kwargs), fields)  # type: ignore[arg-type]
    s = make_scheduler()
    req = Request("q", [1, 2, 3], 2)
    setattr(req, name, value)
    check_refused(lambda: s.add_request(req), fields)
    assert not s.has_unfinished()


@pytest.mark.parametrize("junk", [None, "q", SequenceSpec("q", [1]), ("q", [1, 2], 2)])
def test_add_request_refuses_a_non_request(junk: object) -> None:
    """add_request takes a Request only."""
    s = make_scheduler()
    check_refused(lambda: s.add_request(junk), ("Request", "request"))  # type: ignore[arg-type]
    assert not s.has_unfinished()


def run_to_completion(s: Scheduler, max_steps: int = 200) -> list[tuple[str, tuple[int, ...]]]:
    """Step until every request finished; returns (id, output) in finishing order."""
    done: list[tuple[str, tuple[int, ...]]] = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            return done
        step = s.step()
        sampled = {c.request_id: 7 for c in step.context_chunks}
        sampled.update({rid: 7 for rid in step.decode_request_ids})
        for req in s.update(step, sampled):
            done.append((req.request_id, tuple(req.output)))
        s.manager.check_invariants()
    raise AssertionError(f"not finished after {max_steps} steps: {done}")


def test_tuple_prompts_survive_preemption_like_lists() -> None:
    """Tuple prompts run exactly like list prompts, through preemption; no request is lost."""
    outcomes = []
    for kind in (list, tuple):
        s = make_scheduler(num_gpu_blocks=4)
        s.add_request(Request("old", kind([1, 2, 3, 4, 5, 6, 7]), 6))  # type: ignore[arg-type]
        s.add_request(Request("new", kind([9, 9, 9, 9, 8, 8, 8]), 6))  # type: ignore[arg-type]
        outcomes.append(run_to_completion(s))
    assert outcomes[0] == outcomes[1]
    assert sorted(rid for rid, _ in outcomes[0]) == ["new", "old"]


# ---- remote store and event decoders ------------------------------------------------------


def make_namespace() -> object:
    from kvtier.remote import RemoteNamespace
    from kvtier.storage import KVLayout

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, tokens_per_block=TPB)
    return RemoteNamespace("model", layout)


@SETTINGS
@given(value=st.one_of(st.binary(max_size=200), st.text(max_size=20), st.none(), st.integers(),
                       st.lists(st.integers(0, 255), max_size=8)),
       block_hash=st.integers(0, 2**128 - 1))
def test_codec_decode_of_garbage_is_a_value_error(value: object, block_hash: int) -> None:
    """Decoding random bytes (or no bytes at all) raises ValueError naming the problem."""
    ns = make_namespace()
    with pytest.raises(ValueError, match=r"\S"):
        ns.decode(block_hash, value)  # type: ignore[attr-defined]


@SETTINGS
@given(data=st.data())
def test_codec_decode_of_a_damaged_block_is_a_value_error(data: st.DataObject) -> None:
    """A valid block with any byte flipped or cut short is refused, never served."""
    ns = make_namespace()
    payload = bytes(ns.layout.bytes_per_block)  # type: ignore[attr-defined]
    blob = bytearray(ns.encode(5, payload))  # type: ignore[attr-defined]
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= data.draw(st.integers(1, 255))
    else:
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    with pytest.raises(ValueError, match=r"\S"):
        ns.decode(5, bytes(blob))  # type: ignore[attr-defined]


@SETTINGS
@given(values=st.dictionaries(st.integers(0, 50), st.binary(max_size=64), max_size=6),
       hashes=st.lists(st.integers(0, 60), max_size=8))
def test_in_memory_store_serves_no_garbage(values: dict[int, bytes], hashes: list[int]) -> None:
    """Garbage under a block's key is a counted miss, never a hit, never an exception."""
    from kvtier.remote import InMemoryRemoteStore

    ns = make_namespace()
    backend = {ns.key(h): v for h, v in values.items()}  # type: ignore[attr-defined]
    store = InMemoryRemoteStore(ns, backend=backend)  # type: ignore[arg-type]
    try:
        assert store.get_many(hashes) == {}
        stats = store.stats
        wanted = len(set(hashes))
        assert stats.num_misses == wanted and stats.num_hits == 0
        assert stats.num_bad_payloads == len(set(hashes) & set(values))
    finally:
        store.close()


@pytest.mark.parametrize("hashes", [[-1], [2**128], [True], ["1"], [1.0], [None], 5, None])
def test_in_memory_store_refuses_bad_hashes(hashes: object) -> None:
    """Block hashes are 128-bit unsigned ints; anything else is refused naming them."""
    from kvtier.remote import InMemoryRemoteStore

    store = InMemoryRemoteStore(make_namespace())  # type: ignore[arg-type]
    try:
        check_refused(lambda: store.get_many(hashes), ("hash",))  # type: ignore[arg-type]
        check_refused(lambda: store.contains_many(hashes), ("hash",))  # type: ignore[arg-type]
        items = dict.fromkeys(hashes, b"") if isinstance(hashes, list) else hashes
        check_refused(lambda: store.put_many(items), ("hash",))  # type: ignore[arg-type]
        assert store.stats.num_hits == 0 and store.stats.num_misses == 0
    finally:
        store.close()


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=4), st.sampled_from(["S", "R", "T", "C", "ff", "0" * 33])),
    lambda inner: st.one_of(st.lists(inner, max_size=7),
                            st.dictionaries(st.sampled_from(["i", "n", "b", "x"]), inner,
                                            max_size=3)),
    max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(st.binary(max_size=60), st.text(max_size=60),
                      JSONISH.map(lambda doc: json.dumps(doc)),
                      st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n)))
def test_event_decoders_raise_only_value_error(text: str | bytes) -> None:
    """decode_events / decode_snapshot of garbage: a ValueError or a valid result."""
    from kvtier.events import Event
    from kvtier.publisher import Snapshot, decode_events, decode_snapshot

    try:
        events = decode_events(text)
    except ValueError:
        pass
    else:
        assert all(isinstance(e, Event) for e in events)
    try:
        snap = decode_snapshot(text)
    except ValueError:
        pass
    else:
        assert isinstance(snap, Snapshot)


# ---- the command line ---------------------------------------------------------------------


SMALL = ["--limit", "3", "--no-progress", "--gpu-blocks", "64", "--tokens-per-block", "16"]

OPTION_GARBAGE = {
    "--gpu-blocks": ["0", "-1", "x", "1e3", "10**12", "99999999999999999999", "nan"],
    "--host-blocks": ["-1", "y", "1.5", "99999999999999999999"],
    "--tokens-per-block": ["0", "3", "-4", "z"],
    "--max-num-tokens": ["0", "-5", "inf"],
    "--limit": ["0", "-1", "many"],
    "--time-scale": ["0", "-1", "nan", "inf", "1e400", "x"],
    "--instances": ["0", "-1", "99999999999999999999"],
    "--set-profile": ["pcie_bytes_per_s=inf", "pcie_bytes_per_s=nan", "nokey=1", "x",
                      "pcie_bytes_per_s=-1", "pcie_bytes_per_s=1e400"],
    "--offload-min-priority": ["-1", "101", "True"],
}


@settings(max_examples=40, deadline=None)
@given(data=st.data(), option=st.sampled_from(sorted(OPTION_GARBAGE)),
       command=st.sampled_from(["replay", "compare", "sweep"]))
def test_cli_garbage_options_exit_2_with_one_line(data: st.DataObject, option: str,
                                                  command: str) -> None:
    """A bad option value: exit status 2 and one line on stderr, never a traceback."""
    value = data.draw(st.sampled_from(OPTION_GARBAGE[option]), label=option)
    code, stderr = run_cli([command, *SMALL, option, value])
    assert_one_line_refusal(code, stderr)


def test_cli_sweep_with_a_single_size_exits_cleanly() -> None:
    """sweep over one cache size works or is refused in one line (no IndexError)."""
    code, stderr = run_cli(["sweep", *SMALL, "--host-blocks", "0"])
    assert code in (0, 2) and "Traceback" not in stderr, stderr
    if code == 2:
        assert len(stderr.strip().splitlines()) == 1


def mooncake_line(**fields: object) -> str:
    row: dict[str, object] = {"timestamp": 0, "input_length": 600, "output_length": 4,
                              "hash_ids": [1, 2]}
    row.update(fields)
    return json.dumps(row)


TRACE_FIELD_GARBAGE: dict[str, list[object]] = {
    "timestamp": [None, "0", -1, True, [0], 1e400],
    "input_length": [0, -1, "600", 600.5, True, None, 10**12, 2**70],
    "output_length": [-1, "4", 4.5, None, True, 10**12],
    "hash_ids": [None, "12", [1, "2"], [1, -2], [1, 2**55], [1, True], [[1], [2]], [1], {}],
}


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(TRACE_FIELD_GARBAGE)),
       line=st.integers(1, 3))
def test_cli_trace_with_a_bad_field_names_the_line(data: st.DataObject, name: str, line: int,
                                                   tmp_path_factory: pytest.TempPathFactory,
                                                   ) -> None:
    """A Mooncake trace with one bad field: exit 2, one line naming the line number."""
    value = data.draw(st.sampled_from(TRACE_FIELD_GARBAGE[name]), label=name)
    if name == "timestamp" and value == 1e400:
        bad = mooncake_line().replace('"timestamp": 0', '"timestamp": 1e400')
    else:
        bad = mooncake_line(**{name: value})
    lines = [mooncake_line(timestamp=i) for i in range(3)]
    lines[line - 1] = bad
    path = tmp_path_factory.mktemp("trace") / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, stderr = run_cli(["replay", str(path), *SMALL])
    assert_one_line_refusal(code, stderr, str(line))


@settings(max_examples=30, deadline=None)
@given(blob=st.one_of(st.binary(min_size=1, max_size=300),
                      st.integers(1, 100_000).map(lambda n: ("[" * n + "]" * n).encode()),
                      st.integers(1, 100_000).map(
                          lambda n: ('{"a":' * n + "1" + "}" * n).encode()),
                      JSONISH.map(lambda doc: json.dumps(doc).encode())),
       suffix=st.sampled_from([".jsonl", ".csv"]))
def test_cli_garbage_trace_files_exit_2_with_one_line(
    blob: bytes, suffix: str, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Random bytes, deep nesting or wrong JSON in a trace: exit 2, one line, no traceback."""
    path = tmp_path_factory.mktemp("trace") / f"junk{suffix}"
    path.write_bytes(blob)
    code, stderr = run_cli(["replay", str(path), *SMALL])
    assert_one_line_refusal(code, stderr)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_cli_empty_traces_are_treated_alike(suffix: str, tmp_path: object) -> None:
    """An empty trace is refused the same way whatever its format."""
    import pathlib

    path = pathlib.Path(str(tmp_path)) / f"empty{suffix}"
    path.write_text("")
    code, stderr = run_cli(["replay", str(path), *SMALL])
    assert_one_line_refusal(code, stderr)


def test_cli_refuses_json_output_over_its_trace(tmp_path: object) -> None:
    """--json naming the input trace is refused; the trace is left intact."""
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "t.jsonl"
    text = "\n".join(mooncake_line(timestamp=i) for i in range(3)) + "\n"
    path.write_text(text)
    code, stderr = run_cli(["replay", str(path), *SMALL, "--json", str(path)])
    assert_one_line_refusal(code, stderr, "--json")
    assert path.read_text() == text


def test_cli_subprocess_garbage_gives_one_line_and_status_2(tmp_path: object) -> None:
    """The installed entry point, run as a process, on a binary file: status 2, one line."""
    import pathlib
    import subprocess
    import sys

    path = pathlib.Path(str(tmp_path)) / "junk.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    proc = subprocess.run([sys.executable, "-m", "kvtier", "replay", str(path), "--no-progress"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert_one_line_refusal(proc.returncode, proc.stderr)
    proc = subprocess.run([sys.executable, "-m", "kvtier", "replay", "--gpu-blocks", "-3"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert math.isfinite(proc.returncode)
