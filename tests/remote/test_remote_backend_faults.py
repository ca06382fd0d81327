"""A backend that breaks RemoteStoreBase's contract (it raises, or answers with no list of
one result per key) is a failed batch: misses and failed puts, counted as errors, never an
exception in the caller or a prefetch whose callback is never called."""

from __future__ import annotations

import pytest
from remote_helpers import make_blocks, make_namespace

from kvtier.remote import InMemoryRemoteStore, RemoteNamespace


class BrokenBackend(InMemoryRemoteStore):
    """Raises ``fault`` from every batch, or answers ``answer`` where it is not None."""

    def __init__(self, namespace: RemoteNamespace, fault: Exception | None,
                 answer: object = None) -> None:
        super().__init__(namespace)
        self.fault = fault
        self.answer = answer

    def _fail(self) -> object:
        if self.fault is not None:
            raise self.fault
        return self.answer

    def read_values(self, keys: list[str]) -> list[bytes | None]:
        return self._fail()  # type: ignore[return-value]

    def write_values(self, pairs: list[tuple[str, bytes]]) -> list[bool]:
        return self._fail()  # type: ignore[return-value]

    def has_keys(self, keys: list[str]) -> list[bool]:
        return self._fail()  # type: ignore[return-value]


@pytest.mark.parametrize(("fault", "answer"), [
    (ConnectionError("connection refused"), None),  # the store is down
    (TimeoutError("timed out"), None),
    (None, iter([None])),  # no list
    (None, 5),
    (None, [None]),  # one answer for three keys
])
def test_a_broken_backend_is_a_miss_and_counted(fault: Exception | None,
                                               answer: object) -> None:
    """get_many, put_many and contains_many over a backend that raises or answers garbage:
    {} / 0 / set(), each batch counted in num_errors (they raised ConnectionError,
    TimeoutError or TypeError into the caller)."""
    namespace = make_namespace()
    store = BrokenBackend(namespace, fault, answer)
    blocks = make_blocks(namespace, 3)
    assert store.get_many(list(blocks)) == {}
    assert store.put_many(blocks) == 0
    assert store.contains_many(list(blocks)) == set()
    stats = store.stats
    assert (stats.num_errors, stats.num_misses, stats.num_failed_puts) == (3, 3, 3)
    got: list[dict[int, memoryview]] = []
    # The prefetch's callback is called with nothing found (it was never called: the job
    # raised on the I/O thread, and a fetch waited for its deadline).
    assert store.prefetch(list(blocks), got.append) and store.flush(5.0)
    assert got == [{}]
    store.close()
