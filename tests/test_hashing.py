"""Block hashing: extra keys encoded injectively, bools refused, one prompt-hash helper."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CacheConfig, KVCacheManager, SequenceSpec
from kvtier.events import BlockStored
from kvtier.hashing import (
    chain_hashes,
    encode_key,
    get_hash_fn,
    prompt_block_hashes,
    root_hash,
)

XXH = get_hash_fn("xxh3_128")

atoms = st.none() | st.binary(max_size=12) | st.text(max_size=12) | st.integers(
    -(1 << 200), 1 << 200)
keys = st.recursive(atoms, lambda inner: st.tuples(inner) | st.tuples(inner, inner)
                    | st.lists(inner, max_size=4).map(tuple), max_leaves=12)


def canonical(value: object) -> object:
    """``value`` with its types made explicit, so that 1 and '1' and b'1' stay apart."""
    if isinstance(value, tuple):
        return ("tuple", tuple(canonical(v) for v in value))
    return (type(value).__name__, value)


@settings(max_examples=400, deadline=None)
@given(keys, keys)
def test_distinct_keys_have_distinct_encodings(a: object, b: object) -> None:
    """encode_key is injective over every accepted type, nested tuples included."""
    assert (encode_key(a) == encode_key(b)) == (canonical(a) == canonical(b))


@settings(max_examples=200, deadline=None)
@given(keys, keys, keys, keys)
def test_key_sequences_never_collide(a: object, b: object, c: object, d: object) -> None:
    """Encodings are self-delimiting: two keys written back to back never read as two others."""
    if canonical((a, b)) != canonical((c, d)):
        assert encode_key(a) + encode_key(b) != encode_key(c) + encode_key(d)


def test_multimodal_extras_that_collided_before_now_differ() -> None:
    """('x'@0, 'y'@2) and 'x,i0),t(sy'@2 on one block hashed alike with the comma encoding."""
    tokens = [7, 7, 7, 7]
    two_items = (("x", 0), ("y", 2))
    one_item = (("x,i0),t(sy", 2),)
    assert chain_hashes(XXH, 0, tokens, 4, None, [two_items]) != chain_hashes(
        XXH, 0, tokens, 4, None, [one_item])


@pytest.mark.parametrize("value", [True, False, ("x", True), (1, (b"a", False))])
def test_bool_keys_are_refused(value: object) -> None:
    """True is not the salt 1: a bool anywhere in a key raises, naming the bool."""
    with pytest.raises(TypeError, match="must not be a bool"):
        encode_key(value)
    with pytest.raises(TypeError, match="must not be a bool"):
        root_hash(XXH, None, value)


@pytest.mark.parametrize("value", [1.0, [1], {"a": 1}, object()])
def test_other_types_are_refused(value: object) -> None:
    """Floats, lists and other objects are not keys: TypeError naming the type."""
    with pytest.raises(TypeError, match=f"got {type(value).__name__}"):
        encode_key(value)


def test_salt_types_never_share_a_root() -> None:
    """Salts 1, '1', b'1' and None give four different roots."""
    roots = {root_hash(XXH, None, salt) for salt in (1, "1", b"1", None)}
    assert len(roots) == 4


@pytest.mark.parametrize("token", [-1, 1 << 63, 10**30])
def test_out_of_range_tokens_raise_value_error(token: int) -> None:
    """A token id outside [0, 2**63) is a ValueError naming it, not an OverflowError."""
    with pytest.raises(ValueError, match=f"token ids: token at index 3 must be an int in "
                                         f"0..2\\*\\*63-1, got {token} \\(int\\)"):
        prompt_block_hashes(XXH, [1, 2, 3, token], 4)


def test_prompt_block_hashes_is_the_chain_on_the_root() -> None:
    """The helper equals chain_hashes on root_hash, cut to num_blocks full blocks."""
    tokens = list(range(11))
    full = chain_hashes(XXH, root_hash(XXH, 3, "s"), tokens, 4, 3)
    assert len(full) == 2
    assert prompt_block_hashes(XXH, tokens, 4, lora_id=3, salt="s") == full
    assert prompt_block_hashes(XXH, tokens, 4, lora_id=3, salt="s", num_blocks=1) == full[:1]
    assert prompt_block_hashes(XXH, tokens, 4, lora_id=3, salt="s", num_blocks=0) == []
    assert prompt_block_hashes(XXH, tokens, 4, lora_id=3, salt="s", num_blocks=9) == full
    with pytest.raises(ValueError, match="num_blocks must be an integer >= 0, got -1"):
        prompt_block_hashes(XXH, tokens, 4, num_blocks=-1)


def stored_hashes(tokens: list[int], salt: str | None, lora_id: int | None) -> list[int]:
    """The hashes of the BlockStored events a fresh manager emits admitting ``tokens``."""
    mgr = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=16, enable_events=True))
    mgr.add_sequence(SequenceSpec("r", tokens, salt=salt, lora_id=lora_id))
    return [e.block_hash for e in mgr.drain_events() if isinstance(e, BlockStored)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, (1 << 63) - 1), min_size=1, max_size=40),
       st.none() | st.text(max_size=4), st.none() | st.integers(0, 5))
def test_events_of_equal_prompts_agree_with_the_helper(tokens: list[int], salt: str | None,
                                                       lora_id: int | None) -> None:
    """Two managers admitting equal prompts emit equal hashes, those of prompt_block_hashes."""
    first = stored_hashes(tokens, salt, lora_id)
    assert first == stored_hashes(list(tokens), salt, lora_id)
    assert first == prompt_block_hashes(XXH, tokens, 4, lora_id, salt)[: len(first)]
    assert len(first) == len(tokens) // 4
