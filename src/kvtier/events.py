"""KV cache events: what entered, left or moved between tiers, in order."""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from kvtier.tier import Tier


class BlockStored(NamedTuple):
    """A block became reusable in ``tier``.

    ``token_ids`` are the block's own tokens, ``extra_key`` the canonical bytes of its
    extra key (``hashing.encode_key``; ``None`` where it has none) and ``salt_key`` those of
    its key space's salt (``None``: unsalted), what its hash covers besides its parent's
    hash and the LoRA id (the salt through the root's seed, ``hashing.root_hash``): a
    consumer that indexes prefixes by tokens (a router with its own hash, a KV-aware
    scheduler) needs no kvtier code and never mixes two tenants' equal prompts. All three
    are ``None`` only in events decoded from a publisher older than these fields.
    """

    seq: int
    block_hash: int
    parent_hash: int | None
    tier: Tier
    num_tokens: int
    lora_id: int | None
    token_ids: tuple[int, ...] | None
    extra_key: bytes | None
    salt_key: bytes | None


class BlockRemoved(NamedTuple):
    """A block left the cache (dropped from its last tier)."""

    seq: int
    block_hash: int
    tier: Tier


class BlockTierChanged(NamedTuple):
    """A block moved between tiers (offload or onboard)."""

    seq: int
    block_hash: int
    old_tier: Tier
    new_tier: Tier


class AllBlocksCleared(NamedTuple):
    """Every cached block was dropped."""

    seq: int


Event = BlockStored | BlockRemoved | BlockTierChanged | AllBlocksCleared


class EventLog:
    """A bounded buffer of events with a monotonic sequence number.

    When the buffer is full the oldest events are dropped and counted in ``num_dropped``; a
    consumer that sees a gap in ``seq`` knows it missed events and should resync. May change
    only its own buffer and counters; ``drain`` is the one command that empties it.
    """

    def __init__(self, max_events: int) -> None:
        self._events: deque[Event] = deque(maxlen=max_events)
        self._next_seq = 0
        self.num_dropped = 0

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def append(self, event: Event) -> None:
        if len(self._events) == self._events.maxlen:
            self.num_dropped += 1
        self._events.append(event)

    def drain(self) -> list[Event]:
        """All buffered events, oldest first; the buffer is left empty."""
        events = list(self._events)
        self._events.clear()
        return events
