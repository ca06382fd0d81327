"""A clairvoyant eviction policy for the simulator: Belady's rule with the scheduler in the loop.

``kvtier.sim.oracle``'s Belady serves requests one at a time: while a request is served,
every other block is evictable. Through the simulator, requests run concurrently, and what a
running request holds (its prompt, its output, its reservation) is nobody's to evict: on a
small GPU tier that is most of it. So the offline Belady can promise hits that no eviction
order reaches once requests overlap. This policy gives the reference that does respect it:
it runs in the real simulator, and knows the future of the stream:

    soft-claimed runs last    (the waiting queue's prefixes: needed at once)
    then farthest next use    (the next arrival of a request whose prompt holds the run's
                               last block; never again counts as infinitely far)
    then least recently used

It is not provably optimal (the scheduler's order, chunking and the host tier's moves are
not optimised jointly), but no online policy should beat it by more than noise, and where
one does, its own gain over LRU is partly the scheduler's. ``bench_policy.py`` reports the
gap closed against both references.

A run's last block is named by its chained prefix key (``oracle.prefix_block_keys``,
computed from the run's tokens and its parents'), so the policy serves workloads without
multimodal extras or LoRA/salt key spaces (the built-in and trace workloads).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Iterable

from kvtier.pool import Key
from kvtier.radix import Node
from kvtier.sim.oracle import prefix_block_keys
from kvtier.sim.workload import TraceRequest

_NEVER = float("inf")


class Clairvoyant:
    """Evict the run whose next use is farthest (see the module docstring). Built from the
    whole request stream in arrival order, at the simulator's ``time_scale``. A policy
    object serves one cache."""

    name = "clairvoyant"
    ranks_soft_claims = True
    num_queue_fields = 0

    def __init__(self, requests: Iterable[TraceRequest], tokens_per_block: int,
                 time_scale: float = 1.0) -> None:
        self.tokens_per_block = tokens_per_block
        uses: dict[bytes, list[float]] = {}
        for request in requests:
            arrival = request.arrival_s * time_scale
            for key in prefix_block_keys(request.prompt, tokens_per_block):
                uses.setdefault(key, []).append(arrival)
        self._uses = uses  # arrivals are in stream order: sorted
        self._end_keys: dict[int, tuple[int, int, bytes]] = {}

    def _end_key(self, node: Node) -> bytes:
        """The chained key of ``node``'s last block, memoised per node and shape."""
        if node.parent is None:
            return b""
        shape = (node.start_block, node.num_blocks)
        memo = self._end_keys.get(node.uid)
        if memo is not None and memo[:2] == shape:
            return memo[2]
        key = self._end_key(node.parent)
        tpb, tokens = self.tokens_per_block, node.tokens
        for b in range(node.num_blocks):
            key = hashlib.blake2b(key + tokens[b * tpb:(b + 1) * tpb].tobytes(),
                                  digest_size=16).digest()
        self._end_keys[node.uid] = (*shape, key)
        return key

    def next_use(self, node: Node, now: float) -> float:
        """When a request that needs ``node``'s last block next arrives after ``now``. Pure
        but for the memo."""
        arrivals = self._uses.get(self._end_key(node))
        if not arrivals:
            return _NEVER
        i = bisect_right(arrivals, now)
        return arrivals[i] if i < len(arrivals) else _NEVER

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        return (int(node.soft_claimed), -self.next_use(node, now), node.last_used)

    rank = key
