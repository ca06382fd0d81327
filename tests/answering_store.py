"""``AnsweringStore``: an in-memory remote store whose ``flush`` answers what a test sets."""

from __future__ import annotations

from kvtier.remote import InMemoryRemoteStore


class AnsweringStore(InMemoryRemoteStore):
    """A store whose ``flush`` answers ``answer`` (or raises it, an exception)."""

    answer: object = True

    def flush(self, timeout: float | None = None) -> bool:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer  # type: ignore[return-value]
