"""How many of a prompt's missing blocks a remote tier fetches: :class:`FetchDecision`,
the costs it weighs (``fetch_deadline_s``, ``recompute_s_per_token``, ``fetch_latency_s``),
the store's read throughput as fetches measured it, and the probes that measure it again
(``kvtier.remote.fetch_rule`` holds the rule itself). Pure Python, no I/O.

May change: only its own costs, estimate and counters.
"""

from __future__ import annotations

import threading

from kvtier.remote.fetch_rule import (
    PROBE_AFTER_SKIPS,
    THROUGHPUT_EWMA_WEIGHT,
    num_blocks_worth_fetching,
)
from kvtier.remote.options import check_number
from kvtier.remote.ranks import Arrival
from kvtier.reprs import shown

__all__ = ["FetchDecision"]


class FetchDecision:
    """The fetch decision of one :class:`~kvtier.remote.tier.RemoteTier`: blocks of
    ``bytes_per_block`` bytes and ``tokens_per_block`` tokens. Thread-safe where the I/O
    thread folds a fetch's throughput in (``measure``) while the engine asks."""

    def __init__(self, bytes_per_block: int, tokens_per_block: int, *,
                 fetch_deadline_s: float, recompute_s_per_token: float | None,
                 fetch_latency_s: float, fetch_bytes_per_s: float) -> None:
        self._bytes_per_block = bytes_per_block
        self._tpb = tokens_per_block
        self.fetch_deadline_s = fetch_deadline_s
        self.recompute_s_per_token = recompute_s_per_token
        self.fetch_latency_s = fetch_latency_s
        self._bytes_per_s = check_number("fetch_bytes_per_s", fetch_bytes_per_s, 0.0, 1e15,
                                         low_open=True)
        self._configured_bytes_per_s = self._bytes_per_s
        self._num_turned_down = 0  # fetches in a row the measured throughput alone turned down
        self._lock = threading.Lock()
        self.num_probes = 0  # fetches made only to measure the store again
        self.num_skipped_blocks = 0  # missing blocks cheaper to recompute than to fetch

    # NOTE: the costs are checked when set, not only when made: a NaN deadline set later
    # held every fetching request for ever (``now - started >= nan`` is never true), a NaN
    # cost raised from the next ``start_fetch`` in the engine's step.

    @property
    def fetch_deadline_s(self) -> float:
        """The longest a request is held back for its fetch, in seconds (0..3600)."""
        return self._fetch_deadline_s

    @fetch_deadline_s.setter
    def fetch_deadline_s(self, value: float) -> None:
        self._fetch_deadline_s = check_number("fetch_deadline_s", value, 0.0, 3600.0)

    @property
    def recompute_s_per_token(self) -> float | None:
        """The model's prefill seconds per token (0..3600), or None: fetch every block."""
        return self._recompute_s_per_token

    @recompute_s_per_token.setter
    def recompute_s_per_token(self, value: float | None) -> None:
        self._recompute_s_per_token = None if value is None else check_number(
            "recompute_s_per_token", value, 0.0, 3600.0)

    @property
    def fetch_latency_s(self) -> float:
        """The fixed cost of one fetch in seconds (0..3600)."""
        return self._fetch_latency_s

    @fetch_latency_s.setter
    def fetch_latency_s(self, value: float) -> None:
        self._fetch_latency_s = check_number("fetch_latency_s", value, 0.0, 3600.0)

    @property
    def measured_bytes_per_s(self) -> float:
        """The store's read throughput as this tier's fetches saw it (bytes of the values
        found over the time from asking to having them, queueing included; a running
        average; the leader's store under tensor parallelism, each rank reading its own
        shards at once), or ``fetch_bytes_per_s`` before the first fetch that found
        anything. Pure."""
        with self._lock:
            return self._bytes_per_s

    def num_blocks_to_fetch(self, num_missing: int) -> int:
        """How many of ``num_missing`` blocks past the local tiers this tier would fetch now:
        all of them without ``recompute_s_per_token``, else :func:`num_blocks_worth_fetching`
        under the measured throughput and ``fetch_deadline_s``. Pure.

        NOTE: the rule assumes the store holds every one of them; where it holds fewer, the
        fetch saves less, and loses at most one ``fetch_latency_s`` against a recompute.
        Under tensor parallelism a block's bytes are a rank's shard: the ranks read at once."""
        if type(num_missing) is not int or num_missing < 0:
            raise ValueError(f"num_missing must be an int >= 0, got {shown(num_missing)}")
        if self.recompute_s_per_token is None:
            return num_missing
        return self._worth_fetching(num_missing, self.measured_bytes_per_s)

    def _worth_fetching(self, num_missing: int, bytes_per_s: float) -> int:
        """``num_blocks_worth_fetching`` of ``num_missing`` blocks read at ``bytes_per_s``
        (with ``recompute_s_per_token`` set). Pure."""
        assert self.recompute_s_per_token is not None
        return num_blocks_worth_fetching(
            num_missing, latency_s=self.fetch_latency_s,
            fetch_s_per_block=self._bytes_per_block / bytes_per_s,
            recompute_s_per_block=self._tpb * self.recompute_s_per_token,
            max_wait_s=self.fetch_deadline_s)

    def choose(self, num_missing: int) -> int:
        """How many of ``num_missing`` blocks (the first ones) to fetch: as many as are
        worth it (or, every ``PROBE_AFTER_SKIPS`` fetches the measured throughput alone
        turned down, as many as the configured throughput finds worth it: a probe); the
        others counted in ``num_skipped_blocks``."""
        k = self.num_blocks_to_fetch(num_missing)
        if k == 0 and num_missing and self.recompute_s_per_token is not None:
            # NOTE: a store slow for a while (its measured throughput dragged below the
            # break-even) was never read again: no fetch, no new measurement, every remote
            # hit lost for good once the store was fast again.
            configured = self._worth_fetching(num_missing, self._configured_bytes_per_s)
            if configured:
                self._num_turned_down += 1
                if self._num_turned_down > PROBE_AFTER_SKIPS:
                    self._num_turned_down = 0
                    self.num_probes += 1
                    k = configured
        elif k:
            self._num_turned_down = 0
        self.num_skipped_blocks += num_missing - k
        return k

    def measure(self, arrival: Arrival) -> None:
        """Fold one fetch's throughput into the running estimate."""
        if not arrival.num_bytes or arrival.elapsed_s <= 0:
            return
        sample = arrival.num_bytes / arrival.elapsed_s
        with self._lock:
            self._bytes_per_s += THROUGHPUT_EWMA_WEIGHT * (sample - self._bytes_per_s)
