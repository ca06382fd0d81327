"""A settable clock for tests of retentions and recency (seconds)."""

from __future__ import annotations


class FakeClock:
    """Returns ``now``; a test moves it forward by setting it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now
