"""The event wire format never crashes on bad data: the decoders raise ValueError (only)
or give a valid result, whatever the bytes, and round-trip every event."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, BlockTierChanged, Event
from kvtier.publisher import (
    InstanceLost,
    SeqTracker,
    Snapshot,
    Update,
    decode_events,
    decode_snapshot,
    encode_events,
    encode_snapshot,
)
from kvtier.tier import Tier

seqs = st.integers(0, (1 << 63) - 1)
hashes = st.integers(0, (1 << 128) - 1)
tiers = st.sampled_from(list(Tier))

@st.composite
def stored_events(draw: st.DrawFn) -> BlockStored:
    """A stored block: its tokens, when reported (an older publisher did not), as many as
    ``num_tokens``."""
    num_tokens = draw(st.integers(1, 64))
    tokens = st.lists(st.integers(0, (1 << 63) - 1), min_size=num_tokens, max_size=num_tokens)
    return BlockStored(draw(seqs), draw(hashes), draw(st.none() | hashes), draw(tiers),
                       num_tokens, draw(st.none() | st.integers(-(1 << 63), (1 << 63) - 1)),
                       draw(st.none() | tokens.map(tuple)),
                       draw(st.none() | st.binary(min_size=1, max_size=40)),
                       draw(st.none() | st.binary(min_size=1, max_size=40)))


events = st.one_of(
    stored_events(),
    st.builds(BlockRemoved, seqs, hashes, tiers),
    st.builds(BlockTierChanged, seqs, hashes, tiers, tiers),
    st.builds(AllBlocksCleared, seqs),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=4),
    max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=10))
def test_events_round_trip(batch: list[Event]) -> None:
    """decode_events(encode_events(x)) == x for every kind and field range."""
    assert decode_events(encode_events(batch)) == batch


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=10), seqs, st.frozensets(st.tuples(hashes, tiers), max_size=10))
def test_snapshots_round_trip(instance_id: str, next_seq: int,
                              blocks: frozenset[tuple[int, Tier]]) -> None:
    """decode_snapshot(encode_snapshot(x)) == x."""
    snapshot = Snapshot(instance_id, next_seq, blocks)
    assert decode_snapshot(encode_snapshot(snapshot)) == snapshot


def decodes_or_refuses(payload: str | bytes) -> None:
    """Both decoders either give a valid result or raise ValueError naming 'malformed'."""
    for decode in (decode_events, decode_snapshot):
        try:
            result = decode(payload)
        except ValueError as exc:
            assert "malformed" in str(exc)
            continue
        if decode is decode_events:
            assert decode_events(encode_events(result)) == result  # type: ignore[arg-type]
        else:
            assert decode_snapshot(encode_snapshot(result)) == result  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_value_error(payload: bytes) -> None:
    """Any bytes: ValueError or a valid result, never another exception."""
    decodes_or_refuses(payload)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_arbitrary_json_never_raises_anything_but_value_error(doc: object) -> None:
    """Any JSON document (arrays, objects, floats, bools, huge ints): ValueError or valid."""
    decodes_or_refuses(json.dumps(doc))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["S", "R", "T", "C", "X", 1, None]), min_size=1, max_size=1),
       st.lists(json_values, max_size=7))
def test_event_rows_with_wrong_fields_are_refused_or_valid(kind: list[object],
                                                           fields: list[object]) -> None:
    """Rows of every kind with arbitrary field values: ValueError or a valid event."""
    decodes_or_refuses(json.dumps([kind + fields]))


@pytest.mark.parametrize("payload", [
    '[["S", true, "' + "0" * 32 + '", null, 0, 4, null]]',  # a bool is not a seq
    '[["S", 0, "' + "0" * 32 + '", null, 0, 0, null]]',  # no block has 0 tokens
    '[["R", 0, "0x1f", 0]]',  # a hash is 32 lowercase hex digits
    '[["R", 0, "' + "0" * 32 + '", 7]]',  # no tier 7
    '[["R", 1e400, "' + "0" * 32 + '", 0]]',  # an infinite seq
    '[["C", 1, 2]]',  # too many fields
    '{"i": "a", "n": 1, "b": [["' + "0" * 32 + '", 0]], "x": 1}',  # a stray key
    "[" * 100_000,  # nested too deep for the parser
    "[" + "1" * 5000 + "]",  # an integer past Python's digit limit
    b"\xff\xfe",  # not UTF-8
])
def test_known_malformed_payloads_are_value_errors(payload: str | bytes) -> None:
    """Each of these once passed as valid or raised another exception type."""
    for decode in (decode_events, decode_snapshot):
        with pytest.raises(ValueError, match="malformed"):
            decode(payload)


def test_tracker_lose_reports_one_gap_and_makes_the_instance_stale() -> None:
    """An unreadable entry: one InstanceLost (got_seq None) and the instance waits for a
    snapshot; a second one while stale reports nothing more."""
    tracker = SeqTracker()
    out: list[Update] = []
    tracker.receive("a", [BlockRemoved(0, 1, Tier.GPU)], out)
    tracker.lose("a", out)
    tracker.lose("a", out)
    assert out[1:] == [InstanceLost("a", 1, None)]
    assert tracker.stale_instances() == ["a"] and tracker.num_gaps == 1
