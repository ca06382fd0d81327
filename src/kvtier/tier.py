"""Where a block's KV lives."""

from __future__ import annotations

from enum import IntEnum


class Tier(IntEnum):
    """A memory tier; lower is closer to the compute."""

    GPU = 0
    HOST = 1
