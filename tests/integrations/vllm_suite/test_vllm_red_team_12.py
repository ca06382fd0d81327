"""Red team, twelfth pass: events that are no kvtier events, given to the vLLM translator."""

from __future__ import annotations

import msgspec
import pytest

from kvtier.events import BlockRemoved, BlockStored, Event
from kvtier.integrations.vllm.events import VllmEventTranslator
from kvtier.tier import Tier

GOOD = BlockStored(0, 9, None, Tier.GPU, 4, None, (1, 2, 3, 4), None, None)


@pytest.mark.parametrize(("bad", "message"), [
    # KeyError 7 from the medium table, the good block already recorded.
    (BlockRemoved(1, 5, 7), r"events\[1\]\.tier must be a Tier, got 7"),  # type: ignore[arg-type]
    # OverflowError from to_bytes(16), the hash already recorded.
    (GOOD._replace(seq=1, block_hash=1 << 130),
     r"events\[1\]\.block_hash must be an int in \[0, 2\*\*128\), got an int of 131 bits"),
    # TypeError from seq + 1.
    (GOOD._replace(seq="1"), r"events\[1\]\.seq must be an int in \[0, 2\*\*63\), got '1'"),  # type: ignore[arg-type]
    # A float token id: vLLM's BlockStored took it, msgpack sent 4.0 to the routers.
    (GOOD._replace(seq=1, token_ids=(1, 2, 3, 4.0)), r"events\[1\]\.token_ids must be"),  # type: ignore[arg-type]
])
def test_a_bad_event_is_refused_changing_nothing(bad: Event, message: str) -> None:
    """translate raised KeyError, OverflowError or TypeError from inside its loop (the
    good event before it recorded, its next sequence number moved), or sent a float id.
    Now ValueError names the event, and the translator's next batch is what it would
    have been."""
    translator = VllmEventTranslator(4, clock=lambda: 0.0)
    with pytest.raises(ValueError, match=message):
        translator.translate([GOOD, bad])
    fresh = VllmEventTranslator(4, clock=lambda: 0.0)
    batch = translator.translate([GOOD])
    assert msgspec.msgpack.encode(batch) == msgspec.msgpack.encode(fresh.translate([GOOD]))
    assert translator.num_resyncs == 0


def test_a_clock_that_fails_stamps_the_last_good_time_and_loses_no_event() -> None:
    """The clock was read after the batch was built: one that raised lost the batch's
    events (the translator's record and next sequence number already moved on, so no
    resync told the routers), one that answered None or NaN sent that as the batch's ts.
    Now it is read first, as a cache reads its clock: the last good time stamps the batch."""
    readings: list[object] = [5.0, RuntimeError("clock down"), None, float("nan"), 7.5]

    def clock() -> float:
        value = readings.pop(0)
        if isinstance(value, Exception):
            raise value
        return value  # type: ignore[return-value]

    translator = VllmEventTranslator(4, clock=clock)
    chain = [GOOD._replace(seq=i, block_hash=10 + i, parent_hash=9 + i if i else None)
             for i in range(5)]
    batches = [translator.translate([e]) for e in chain]
    assert [b.ts for b in batches] == [5.0, 5.0, 5.0, 5.0, 7.5]
    assert [b.events[0].block_hashes for b in batches] == [
        [(10 + i).to_bytes(16, "big")] for i in range(5)]
    assert translator.num_resyncs == 0


@pytest.mark.parametrize(("options", "message"), [
    ({"int_hashes": "no"}, "int_hashes must be a bool, got 'no'"),
    ({"int_hashes": 1}, "int_hashes must be a bool, got 1"),
    ({"data_parallel_rank": -1}, r"data_parallel_rank must be None or an int in \[0, 2\*\*31\), "
                                 "got -1"),
    ({"data_parallel_rank": "0"}, r"data_parallel_rank .* got '0'"),
])
def test_options_a_batch_cannot_carry_are_refused(options: dict[str, object],
                                                  message: str) -> None:
    """int_hashes='no' was true (every hash cut to 64 bits), a str rank went into every
    batch (vLLM's routers read it as an int). Now ValueError names the option."""
    with pytest.raises(ValueError, match=message):
        VllmEventTranslator(4, **options)  # type: ignore[arg-type]
