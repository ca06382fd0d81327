"""Red team 30b: the event transport without a Redis server: subscribers of the in-memory
bus dropped by their owner, forgotten instances, incarnations of one instance id.

Every count here is exact; each test failed before its fix.
"""

from __future__ import annotations

import gc
import weakref

from kvtier.events import BlockStored
from kvtier.publisher import EventBatch, InMemoryEventBus
from kvtier.tier import Tier

G = Tier.GPU


def stored(seq: int, h: int) -> BlockStored:
    """A BlockStored event of one 4-token block."""
    return BlockStored(seq, h, None, G, 4, None, (1, 2, 3, 4), None, None)


def test_a_bus_keeps_no_subscriber_its_owner_dropped() -> None:
    """100 subscribers made and dropped beside one kept: the bus held all 101 for ever and
    pushed every batch into each one's buffer (up to max_events each); now it holds only
    the live one, which still reads every batch."""
    bus = InMemoryEventBus()
    live = bus.subscribe(max_events=16)
    dropped = [weakref.ref(bus.subscribe(max_events=16)) for _ in range(100)]
    gc.collect()
    bus.publish("a", [stored(0, 1), stored(1, 2)])
    assert sum(ref() is not None for ref in dropped) == 0  # before: 100
    assert bus.num_subscribers == 1  # before: 101
    assert live.poll() == [EventBatch("a", [stored(0, 1), stored(1, 2)])]
