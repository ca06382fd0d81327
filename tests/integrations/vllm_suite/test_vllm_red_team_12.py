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
