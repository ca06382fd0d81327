"""The manager's input contract: every bad argument is refused with a ValueError (or
TypeError/KeyError) naming it, before anything changes; good arguments of any accepted type
give the same answer; memory does not grow with the history."""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import pickle
import tracemalloc

import pytest

from kvtier import CacheConfig, KVCacheManager, MultimodalItem, SequenceSpec, TokenIds

PROBES = ([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0], [7, 7, 7, 7, 7])


def make_manager(events: bool = True, num_gpu_blocks: int = 8) -> KVCacheManager:
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=num_gpu_blocks,
                                     num_host_blocks=4, enable_events=events), clock=lambda: 0.0)
    mgr.add_sequence(SequenceSpec("cached", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    mgr.remove_sequence("cached")
    mgr.add_sequence(SequenceSpec("live", [1, 2, 3, 4, 5]))
    mgr.drain_events()
    return mgr


def state(mgr: KVCacheManager) -> tuple[object, ...]:
    """Everything a caller can observe; a refused call must leave it as it was."""
    mgr.check_invariants()
    return (mgr.version, dataclasses.asdict(mgr.stats), mgr.num_free_gpu_blocks,
            mgr.num_free_host_blocks, mgr.num_sequences, mgr.num_key_spaces,
            mgr.block_table("live"), [mgr.lookup(p) for p in PROBES], mgr.drain_events())


BAD_TOKEN_LISTS = [
    ([1, 2, 2**63],
     "token at index 2 must be an int in 0..2\\*\\*63-1, got 9223372036854775808 \\(int\\)"),
    ([1, -1], "token at index 1 must be an int in 0..2\\*\\*63-1, got -1 \\(int\\)"),
    ([10**400], "token at index 0 must be an int in 0..2\\*\\*63-1, got an int of 1329 bits"),
    ([1, 2.0], "token at index 1 must be an int in 0..2\\*\\*63-1, got 2.0 \\(float\\)"),
    ([1, "2"], "token at index 1 must be an int in 0..2\\*\\*63-1, got '2' \\(str\\)"),
    ([], "must not be empty"),
    ("abc", "must be a sequence of ints"),
    ({1, 2}, "must be a sequence of ints"),
]


@pytest.mark.parametrize(("tokens", "message"), BAD_TOKEN_LISTS)
def test_bad_token_ids_are_refused_on_every_path_changing_nothing(
        tokens: object, message: str) -> None:
    """Ids outside 0..2**63-1 or not ints are refused by every call that takes tokens."""
    mgr = make_manager()
    before = state(mgr)
    with pytest.raises(ValueError, match=message):
        SequenceSpec("x", tokens)  # type: ignore[arg-type]
    for call in (lambda: mgr.lookup(tokens),  # type: ignore[arg-type]
                 lambda: mgr.missing_block_hashes(tokens),  # type: ignore[arg-type]
                 lambda: mgr.import_blocks(tokens, 1),  # type: ignore[arg-type]
                 lambda: mgr.append_tokens("live", tokens)):  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=message):
            call()
        assert state(mgr) == before


@pytest.mark.parametrize("token", [2**63, -1, 1.0, True and "1", None])
def test_a_bad_decode_token_in_a_batch_changes_nothing(token: object) -> None:
    """append_token_batch checks every item first: a bad item 1 leaves item 0 unapplied."""
    mgr = make_manager()
    mgr.add_sequence(SequenceSpec("other", [9, 9]))
    before = state(mgr)
    with pytest.raises(ValueError, match="item 1: the token appended to 'other'"):
        mgr.append_token_batch([("live", 6), ("other", token)])  # type: ignore[list-item]
    assert state(mgr) == before
    with pytest.raises(KeyError, match="item 1: unknown request_id 'ghost'"):
        mgr.append_token_batch([("live", 6), ("ghost", 1)])
    assert state(mgr) == before


@pytest.mark.parametrize(("bad", "error", "message"), [
    (("r7", -1), ValueError, "item 200: the token appended to 'r7'"),
    (("r7", True), ValueError, "item 200: the token appended to 'r7'"),
    (("ghost", 1), KeyError, "item 200: unknown request_id 'ghost'"),
    (("r7", 1, 2), ValueError, "item 200 must be a"),
    (["r7"], ValueError, "item 200 must be a"),
    (("chunked", 1), ValueError, "'chunked' still has 2 unscheduled prompt tokens"),
])
def test_a_large_decode_batch_names_its_first_bad_item(
        bad: object, error: type[Exception], message: str) -> None:
    """A decode batch is checked whole, then item by item only when that fails: the
    first bad item of a large batch is named as exactly as in a small one."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=128), clock=lambda: 0.0)
    for i in range(8):
        mgr.add_sequence(SequenceSpec(f"r{i}", [i + 1] * 5))
    mgr.add_sequence(SequenceSpec("chunked", [9, 9, 9, 9, 9], num_new_tokens=3))
    before = [mgr.block_table(f"r{i}") for i in range(8)], mgr.version
    items: list[object] = [(f"r{i % 8}", i) for i in range(256)]
    items[200] = bad
    with pytest.raises(error, match=message):
        mgr.append_token_batch(items)  # type: ignore[arg-type]
    assert ([mgr.block_table(f"r{i}") for i in range(8)], mgr.version) == before
    assert mgr.append_token_batch([(f"r{i % 8}", i) for i in range(256)]) == 256


def test_decode_token_completing_a_block_with_events_never_overflows() -> None:
    """A huge id that would complete (and hash) a block is refused before anything moves."""
    mgr = make_manager()
    mgr.append_tokens("live", [6, 7])
    before = state(mgr)
    with pytest.raises(ValueError, match=r"must be an int in 0\.\.2\*\*63-1"):
        mgr.append_tokens("live", [2**64])
    assert state(mgr) == before
    assert mgr.append_tokens("live", [8]) == []
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 0]).num_tokens == 8


@pytest.mark.parametrize("retention", [10**400, math.inf, math.nan, True, -1, "5", 1e10])
def test_retention_must_be_finite_seconds(retention: object) -> None:
    """retention_s: a finite number in 0..1e9 or None; never a bool, never inf or nan."""
    with pytest.raises(ValueError, match="retention_s must be a finite number of seconds"):
        SequenceSpec("r", [1, 2], retention_s=retention)  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("salt", True, "salt must be bytes, str, int or None, got True"),
    ("salt", 1.0, "salt must be bytes, str, int or None, got 1.0"),
    ("salt", 2**200, "salt must be an int of magnitude below 2\\*\\*128"),
    ("salt", "s" * 5000, "salt must be at most 4096 long"),
    ("lora_id", True, "lora_id must be an int in 0..2\\*\\*63-1 or None, got True"),
    ("lora_id", -1, "lora_id must be an int in 0..2\\*\\*63-1 or None, got -1"),
    ("lora_id", "a", "lora_id must be an int"),
    ("mm_items", [("x", 0)], "mm_items must hold MultimodalItem"),
    ("mm_items", "abc", "mm_items must be a tuple or list of MultimodalItem"),
    ("mm_items", [MultimodalItem(0, 9, b"i")], "runs past the 5 tokens"),
])
def test_lookup_checks_keys_exactly_as_a_spec_does(field: str, value: object,
                                                   message: str) -> None:
    """lookup refuses what SequenceSpec refuses, with the same message."""
    mgr = make_manager()
    before = state(mgr)
    with pytest.raises(ValueError, match=message):
        SequenceSpec("x", [1, 2, 3, 4, 5], **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        mgr.lookup([1, 2, 3, 4, 5], **{field: value})  # type: ignore[arg-type]
    assert state(mgr) == before


def test_content_hash_and_priority_refuse_bool() -> None:
    """A bool is never taken for an int: True would share blocks with 1."""
    with pytest.raises(ValueError, match=r"MultimodalItem\.content_hash must be bytes, str, int"):
        MultimodalItem(0, 1, True)
    with pytest.raises(ValueError, match=r"priority must be an integer in 0\.\.100, got True"):
        SequenceSpec("x", [1], priority=True)


@pytest.mark.parametrize("convert", [tuple, list, range, lambda t: memoryview(bytes(t)).cast("B")])
def test_every_sequence_type_gets_the_same_answer(convert: object) -> None:
    """lookup and admission see a tuple, a range or a list of the same ids alike."""
    mgr = make_manager()
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    mgr.add_sequence(SequenceSpec("src", tokens))
    mgr.remove_sequence("src")
    if convert is range:
        given: object = range(1, 14)
    else:
        given = convert(tokens)  # type: ignore[operator]
    if isinstance(given, memoryview):
        with pytest.raises(ValueError, match="must be a sequence of ints"):
            mgr.lookup(given)
        return
    assert mgr.lookup(given) == mgr.lookup(tokens)  # type: ignore[arg-type]
    assert mgr.lookup(given).num_tokens == 12  # type: ignore[arg-type]
    (adm,) = mgr.add_sequence_batch([SequenceSpec("again", given)])  # type: ignore[arg-type]
    assert adm.num_reused_tokens == 12


def test_a_batch_may_be_any_iterable() -> None:
    """A generator of specs admits exactly what a list admits; a lone spec is refused."""
    mgr = make_manager()
    results = mgr.add_sequence_batch(SequenceSpec(f"g{i}", [i + 20, 1]) for i in range(2))
    assert [r.admitted for r in results] == [True, True]
    with pytest.raises(TypeError, match="specs must be an iterable of SequenceSpec"):
        mgr.add_sequence_batch(SequenceSpec("lone", [1]))  # type: ignore[arg-type]


def test_a_spec_is_a_snapshot_of_its_tokens() -> None:
    """Changing the caller's list after building the spec changes nothing admitted."""
    mgr = make_manager()
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    spec = SequenceSpec("snap", tokens)
    tokens.append("x")  # type: ignore[arg-type]
    tokens.clear()
    assert spec.tokens == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    with pytest.raises(TypeError, match="tokens are a snapshot"):
        spec.tokens.append(10)
    with pytest.raises(TypeError, match="tokens are a snapshot"):
        spec.tokens[0] = 5
    assert spec.tokens == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    for copied in (copy.deepcopy(spec), pickle.loads(pickle.dumps(spec))):
        assert copied == spec and type(copied.tokens) is TokenIds
    assert hash(spec.tokens) == hash(tuple(spec.tokens))
    adm = mgr.add_sequence(spec)
    assert adm.num_reused_tokens == 8 and len(adm.block_ids) == 3


def test_a_specs_tokens_keep_only_the_packed_array_and_read_like_the_list() -> None:
    """``spec.tokens`` holds the validation's ``array('Q')`` and nothing else (freeing a
    long prompt frees one buffer, no int per id), yet reads like the list it came from."""
    tokens = [5, 6, 7, 2**63 - 1]
    spec = SequenceSpec("p", tokens)
    ids = spec.tokens
    assert [r for r in gc.get_referents(ids) if r is not TokenIds] == [spec.token_array]
    assert ids == tokens and tokens == ids and (ids != tokens) is False
    as_tuple: object = tuple(tokens)
    assert ids != [5, 6, 7] and ids != as_tuple and ids != spec.token_array
    assert (len(ids), ids[1], ids[-1], list(ids), list(reversed(ids))) == (
        4, 6, 2**63 - 1, tokens, tokens[::-1])
    assert ids[1:3] == [6, 7] and type(ids[1:3]) is list and type(ids[0]) is int
    assert 7 in ids and 8 not in ids and ids.index(7) == 2 and ids.count(5) == 1
    assert repr(ids) == f"TokenIds({tokens!r})" and hash(ids) == hash(tuple(tokens))
    with pytest.raises(IndexError):
        ids[4]
    assert SequenceSpec("q", ids).token_array is spec.token_array  # shared, not copied
    assert TokenIds(tokens) == ids == TokenIds(tuple(tokens)) == TokenIds(ids)
    with pytest.raises(ValueError,
                       match=r"tokens: token at index 1 must be an int in 0\.\.2\*\*63-1, got -1"):
        TokenIds([1, -1])
    with pytest.raises(ValueError, match="tokens must be a sequence of ints"):
        TokenIds(b"\x01")


@pytest.mark.parametrize("index", [0, 4095, 4096, 8191, 9999])
@pytest.mark.parametrize("bad", [2**63, 2**64 - 1])
def test_a_long_prompts_ids_are_checked_in_every_chunk(index: int, bad: int) -> None:
    """A long prompt's top bytes are read a chunk of 4,096 ids at a time: an id past
    2**63-1 that packs as unsigned is refused, naming it, in any chunk, the first and the
    last included; the largest good id packs anywhere."""
    tokens = list(range(10_000))
    tokens[index] = bad
    with pytest.raises(ValueError, match=f"token at index {index} must be an int in "
                                         f"0..2\\*\\*63-1, got {bad} \\(int\\)"):
        SequenceSpec("long", tokens)
    with pytest.raises(ValueError, match=f"token at index {index} must be an int in "
                                         f"0..2\\*\\*63-1, got {bad} \\(int\\)"):
        TokenIds(tuple(tokens))
    tokens[index] = 2**63 - 1
    assert list(SequenceSpec("long", tokens).token_array) == tokens


def test_decoding_grows_a_copy_never_the_specs_token_array() -> None:
    """The cache matches a spec's ``token_array``; a request decoding past its prompt grows
    an array of its own, so the spec (and a later lookup of it) still sees the prompt."""
    mgr = make_manager()
    spec = SequenceSpec("grow", [1, 2, 3, 4, 5])
    assert list(spec.token_array) == [1, 2, 3, 4, 5] and spec.token_array.typecode == "Q"
    assert dataclasses.replace(spec, request_id="other").token_array == spec.token_array
    mgr.add_sequence(spec)
    mgr.append_token_batch([("grow", 6), ("grow", 7), ("grow", 8)])
    mgr.append_tokens("grow", [9])
    assert list(spec.token_array) == [1, 2, 3, 4, 5] and spec.tokens == [1, 2, 3, 4, 5]
    assert mgr.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9, 0]).num_tokens == 8  # grown blocks stored
    mgr.check_invariants()


def test_cached_token_ids_are_never_walked_by_the_garbage_collector() -> None:
    """A cache of millions of blocks holds tens of millions of ids: runs keep them in
    arrays, whose ids the collector never visits (it visits every item of a list of ints,
    on every full pass)."""
    mgr = make_manager()
    for i in range(3):
        mgr.add_sequence(SequenceSpec(f"r{i}", [i, 1, 2, 3, 4, 5, 6, 7, 8]))
        mgr.remove_sequence(f"r{i}")
    nodes = list(mgr._cache.nodes())
    assert len(nodes) >= 3
    for ids in [n.tokens for n in nodes] + [SequenceSpec("s", [1000, 1001]).token_array]:
        assert all(type(x) is not int for x in gc.get_referents(ids)), ids  # at most its type
    assert len(gc.get_referents([1000, 1001])) == 2  # what a list would cost


def test_a_refused_batch_changes_nothing_not_even_the_version() -> None:
    """A batch refused for its size leaves no root, no claim and the same version."""
    mgr = make_manager()
    before = state(mgr)
    with pytest.raises(ValueError, match="needs 9 GPU blocks at once but num_gpu_blocks is 8"):
        mgr.add_sequence_batch([SequenceSpec("big", list(range(1, 21)), salt="new-tenant"),
                                SequenceSpec("big2", list(range(30, 45)), salt="other")])
    assert state(mgr) == before


def test_key_spaces_do_not_grow_with_the_salts_ever_seen() -> None:
    """10,000 tenants come and go: only the key spaces still holding blocks remain."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=4))
    for i in range(10_000):
        mgr.add_sequence(SequenceSpec(f"r{i}", [1, 2, 3], salt=i))
        mgr.remove_sequence(f"r{i}")
    assert mgr.num_key_spaces == 0
    for i in range(100):  # full blocks stay cached in their key space until evicted
        mgr.add_sequence(SequenceSpec(f"s{i}", [1, 2, 3, 4, 5], salt=i))
        mgr.remove_sequence(f"s{i}")
    mgr.check_invariants()
    assert mgr.num_key_spaces <= 4
    mgr.reset_cache()
    assert mgr.num_key_spaces == 0


def test_retention_bookkeeping_does_not_grow_with_releases() -> None:
    """Releasing with a retention over and over keeps memory flat (no eviction ever runs)."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=128), clock=lambda: 0.0)

    def churn(n: int) -> None:
        for _ in range(n):
            mgr.add_sequence(SequenceSpec("r", [1, 2, 3, 4, 5, 6, 7, 8, 9],
                                          priority=80, retention_s=60))
            mgr.remove_sequence("r")

    churn(2_000)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    churn(20_000)
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    mgr.check_invariants()
    assert grown < 100_000, grown


def test_huge_pools_are_refused_or_built_lazily() -> None:
    """A pool too large to address is refused; a large one costs nothing until used."""
    with pytest.raises(ValueError, match=r"num_gpu_blocks must be an integer in 1\.\.4294967296"):
        CacheConfig(num_gpu_blocks=10**12)
    with pytest.raises(ValueError, match=r"num_host_blocks must be an integer in 0\.\.4294967296"):
        CacheConfig(num_host_blocks=True)
    tracemalloc.start()
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=2**32,
                                     num_host_blocks=2**32))
    used = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert used < 1_000_000, used
    assert mgr.add_sequence(SequenceSpec("a", [1, 2, 3, 4, 5])).block_ids == (0, 1)


@pytest.mark.parametrize("field, value", [
    ("salt", True), ("salt", 2**128), ("salt", 1.5), ("lora_id", True), ("lora_id", -1),
    ("retention_s", -1.0), ("retention_s", True), ("mm_items", None), ("mm_items", "x"),
    ("num_new_tokens", 0), ("num_new_tokens", True), ("num_reserved_blocks", False),
    ("num_reserved_blocks", 0.0), ("num_reserved_blocks", -1), ("num_reserved_blocks", None),
])
def test_a_spec_checks_every_field_it_is_given(field: str, value: object) -> None:
    """A spec skips the checks of the fields left at their defaults (None, (), 0), and
    only those: any other value, falsy ones and ones equal to a default included
    (``False``, ``0.0``), is checked and refused as before."""
    with pytest.raises(ValueError):
        SequenceSpec("a", [1, 2], **{field: value})  # type: ignore[arg-type]


def test_a_spec_converts_what_it_is_given_as_before() -> None:
    """The conversions the checks make still happen for values other than the defaults:
    an int retention becomes a float, a list of items a tuple."""
    spec = SequenceSpec("a", [1, 2], retention_s=5, mm_items=[],  # type: ignore[arg-type]
                        num_reserved_blocks=2)
    assert type(spec.retention_s) is float and spec.retention_s == 5.0
    assert type(spec.mm_items) is tuple and spec.mm_items == ()
    item = MultimodalItem(0, 2, "img")
    listed = SequenceSpec("a", [1, 2], mm_items=[item])  # type: ignore[arg-type]
    assert listed.mm_items == (item,)
    plain = SequenceSpec("a", [1, 2])
    assert (plain.salt, plain.lora_id, plain.retention_s, plain.mm_items,
            plain.num_new_tokens, plain.num_reserved_blocks) == (None, None, None, (), None, 0)
