"""The circuit breaker of each server a store talks to: a standalone server, or each node of
a cluster (a node's name; ``""`` for the whole), so a dead node costs only its own batches::

    closed ──threshold failed batches in a row──> open: short-circuited
      ^                                             │ cooldown_s passed
      │ the probe succeeds                          v
      └──────────────────────────── half-open: the first batch probes (probing), the
                                    others are refused until it answers;
                                    the probe fails: open again

A batch asks :meth:`Breakers.admit` first and is sent only where it answers ``CLOSED`` or
``HALF_OPEN`` (then it is the probe, and ends with :meth:`Breakers.end_probe`); its outcome
is :meth:`Breakers.record_success` or :meth:`Breakers.record_failure`. Pure Python, no
redis import; the store counts the refusals (``num_short_circuited``,
``num_refused_probes``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum


class BreakerState(Enum):
    """Where one server's breaker stands."""

    CLOSED = "closed"  # batches are sent
    OPEN = "open"  # batches are short-circuited until the cooldown passed
    HALF_OPEN = "half-open"  # the cooldown passed: the next batch probes
    PROBING = "probing"  # half-open with its probe out: the others are refused


class Breakers:
    """The breakers of every server, each closed until it fails ``threshold`` batches in a
    row. May change: its own books only. Thread-safe: every method holds one lock.

    NOTE: once the cooldown passed, every batch that came probed the node at once (four
    pipelines to a node that had not answered yet, each a wait of up to the store's
    ``max_blocking_s``): one does; the others are refused until it answers."""

    def __init__(self, threshold: int, cooldown_s: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if type(threshold) is not int or threshold < 1:
            raise ValueError(f"threshold must be an integer >= 1, got {threshold!r}")
        if not cooldown_s >= 0.0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s!r}")
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()  # guards the three books below
        self._num_failures_in_row: dict[str, int] = {}
        self._open_until: dict[str, float] = {}  # open, then half-open once it passed
        self._probing: set[str] = set()  # half-open breakers whose one probe is out

    def _state(self, server: str) -> BreakerState:
        """``state``, the lock held."""
        open_until = self._open_until.get(server)
        if open_until is None:
            return BreakerState.CLOSED
        if self._clock() < open_until:
            return BreakerState.OPEN
        return BreakerState.PROBING if server in self._probing else BreakerState.HALF_OPEN

    def state(self, server: str) -> BreakerState:
        """The state of ``server``'s breaker now. Pure: changes nothing."""
        with self._lock:
            return self._state(server)

    def num_failures_in_row(self, server: str) -> int:
        """The failed batches of ``server`` since its last success. Pure."""
        with self._lock:
            return self._num_failures_in_row.get(server, 0)

    def admit(self, server: str) -> BreakerState:
        """The state a batch for ``server`` finds: send it where ``CLOSED`` or
        ``HALF_OPEN``; on ``HALF_OPEN`` the batch is the probe (the breaker is
        ``PROBING`` until :meth:`end_probe`). ``OPEN`` or ``PROBING``: do not send it."""
        with self._lock:
            state = self._state(server)
            if state is BreakerState.HALF_OPEN:
                self._probing.add(server)
            return state

    def end_probe(self, server: str) -> None:
        """The probe :meth:`admit` let out for ``server`` answered (its outcome recorded
        first): the next batch may probe again where the breaker is still not closed."""
        with self._lock:
            self._probing.discard(server)

    def record_success(self, server: str) -> None:
        """A batch for ``server`` succeeded: its breaker closes."""
        with self._lock:
            self._num_failures_in_row[server] = 0
            self._open_until.pop(server, None)

    def record_failure(self, server: str) -> None:
        """A batch for ``server`` failed: at ``threshold`` failures in a row its breaker
        opens for ``cooldown_s`` (again at once where it was half-open)."""
        with self._lock:
            failures = self._num_failures_in_row.get(server, 0) + 1
            self._num_failures_in_row[server] = failures
            if failures >= self.threshold:
                self._open_until[server] = self._clock() + self.cooldown_s

    def end_cooldowns(self) -> None:
        """Let the cooldown of every open breaker end now: each is half-open, its next
        batch a probe."""
        with self._lock:
            self._open_until = dict.fromkeys(self._open_until, float("-inf"))

    def check_invariants(self) -> None:
        """Recount the books: a breaker is open only past ``threshold`` failures in a
        row, and no count is negative."""
        with self._lock:
            assert all(n >= 0 for n in self._num_failures_in_row.values()), (
                self._num_failures_in_row)
            for server in self._open_until:
                num_failures = self._num_failures_in_row.get(server, 0)
                assert num_failures >= self.threshold, (server, num_failures, self.threshold)
