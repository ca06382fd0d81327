"""A fetch of the remote tier in flight for a waiting request (:class:`Fetch`), and what
one poll of the tier found (:class:`Polled`). Pure data (``kvtier.remote.tier``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from kvtier.sequence import MultimodalItem

__all__ = ["Fetch", "Polled"]


@dataclass(slots=True)
class Fetch:
    """A fetch in flight for a waiting request."""

    tokens: list[int]
    salt: bytes | str | int | None
    lora_id: int | None
    mm_items: tuple[MultimodalItem, ...]
    hashes: list[int]  # of the prompt's reusable full blocks, computed once
    started_s: float
    fetch_id: int  # the ranks' name for it
    asked: list[int]  # the hashes looked up: past the local tiers, as many as pay
    released: bool = False


class Polled(NamedTuple):
    """What one :meth:`RemoteTier.poll_imports` found: the requests whose wait is over, and
    per request the blocks its own fetch imported into host blocks (absent: none)."""

    released: list[str]
    imported: dict[str, int]
