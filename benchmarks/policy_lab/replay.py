"""Request model, policy contract and replay loop of the policy lab.

The model is ``kvtier.sim.oracle``'s: a request is a chain of block ids (equal id = equal
prefix up to and including that block), a block counts as a hit only if its whole prefix
is cached, requests are served one at a time in arrival order, capacity is in blocks, and
a request never evicts its own blocks. A request longer than the cache keeps only its first
``capacity`` blocks::

    request i:   [ k0 | k1 | k2 | k3 | k4 ]       hit = longest cached prefix (here 3)
    cache:         k0   k1   k2        k4         k4 is cached but useless behind k3
    tokens hit:  min(3 * tokens_per_block, num_tokens)

Look-ahead: with ``queue_delay_s = W`` a request arriving at ``t`` is served at ``t + W``
(FIFO), so when it is served the requests that arrived in ``(t, t + W]`` wait in the queue.
Their prompts are known to a real scheduler at that moment; policies may be told of them
(``claim``) and are told again when they are served (``release``). Nothing else of the
future is visible, except to Belady, which takes the whole stream in its constructor.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple


class LabRequest(NamedTuple):
    """One request: its index in the stream, arrival, block ids and prompt length."""

    index: int
    arrival_s: float
    keys: tuple[int, ...]
    num_tokens: int


class Policy(ABC):
    """An online cache of at most ``capacity`` blocks.

    ``serve`` is the only command that changes what is cached: it must leave every key of
    the request cached (the request is at most ``capacity`` blocks) and at most
    ``capacity`` keys in all. ``claim``/``release`` only change what the policy prefers to
    keep; a claimed block still yields when nothing else can go (a soft claim).
    """

    name: str = "policy"

    def __init__(self, capacity: int) -> None:
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity

    @abstractmethod
    def __contains__(self, key: int) -> bool:
        """Whether ``key`` is cached. Pure."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of cached blocks. Pure."""

    @abstractmethod
    def serve(self, request: LabRequest, num_hit: int) -> None:
        """Record the request's access: its first ``num_hit`` blocks were hits; cache the rest."""

    def claim(self, request: LabRequest) -> None:  # noqa: B027 - optional hook
        """``request`` arrived and waits in the queue (default: ignored)."""

    def release(self, request: LabRequest) -> None:  # noqa: B027 - optional hook
        """``request`` leaves the queue to be served (default: ignored)."""


class LabResult(NamedTuple):
    """Hits of one replay and its CPU cost."""

    num_hit_tokens: int
    num_tokens: int
    num_blocks: int
    cpu_s: float

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_tokens if self.num_tokens else 0.0

    @property
    def us_per_block(self) -> float:
        return 1e6 * self.cpu_s / self.num_blocks if self.num_blocks else 0.0


def truncate(requests: Sequence[LabRequest], capacity: int) -> list[LabRequest]:
    """The stream as a cache of ``capacity`` blocks sees it (longer requests cut)."""
    return [r if len(r.keys) <= capacity else r._replace(keys=r.keys[:capacity])
            for r in requests]


def replay(requests: Sequence[LabRequest], policy: Policy, tokens_per_block: int,
           queue_delay_s: float = 0.0) -> LabResult:
    """Serve ``requests`` (already truncated to the capacity) through ``policy``."""
    num_hit_tokens = num_tokens = num_blocks = 0
    next_claim = 0
    n = len(requests)
    c0 = time.process_time()
    for request in requests:
        horizon = request.arrival_s + queue_delay_s
        while next_claim < n and requests[next_claim].arrival_s <= horizon:
            policy.claim(requests[next_claim])
            next_claim += 1
        policy.release(request)
        k = 0
        for key in request.keys:
            if key not in policy:
                break
            k += 1
        num_hit_tokens += min(k * tokens_per_block, request.num_tokens)
        num_tokens += request.num_tokens
        num_blocks += len(request.keys)
        policy.serve(request, k)
        assert len(policy) <= policy.capacity, f"{policy.name} holds {len(policy)} blocks"
    cpu_s = time.process_time() - c0
    return LabResult(num_hit_tokens, num_tokens, num_blocks, cpu_s)
