"""``replay``: a consumer's view of a cache's KV events (block hash -> tier), each event
checked to be possible where it arrives."""

from __future__ import annotations

from kvtier import AllBlocksCleared, BlockRemoved, BlockStored, BlockTierChanged, Event, Tier


def replay(events: list[Event], tiers: dict[int, Tier]) -> None:
    """Apply ``events`` to a consumer's view (block hash -> tier), checking each."""
    for event in events:
        if isinstance(event, BlockStored):
            assert event.block_hash not in tiers, event
            assert event.parent_hash is None or event.parent_hash in tiers, event
            tiers[event.block_hash] = event.tier
        elif isinstance(event, BlockRemoved):
            assert tiers.pop(event.block_hash, None) is event.tier, event
        elif isinstance(event, BlockTierChanged):
            assert tiers.get(event.block_hash) is event.old_tier, event
            tiers[event.block_hash] = event.new_tier
        else:
            assert isinstance(event, AllBlocksCleared), event
            tiers.clear()
