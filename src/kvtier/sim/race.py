"""A workload built to provoke the admission race (S1 of the background, at scale).

Sized from the cache and budget it will run on, so the race happens at any size::

    t = 0 ..       p_i = P_i + 1 token, P_i one block     P_1 .. P_n cached on the GPU
    then           fillers: num_gpu_blocks + num_host_blocks - n blocks, in whole blocks:
                   P_1 .. P_n go to the host, the oldest blocks there; the rest is full
    then, at once  q_i = P_i + max_num_tokens / n new tokens: each credited one host
                   block, together exactly the step's budget

Without chunked prefill (``chunked_prefill=False``) every prompt is prefilled in one step,
so each fits one: a follow-up's new tokens are at most ``max_num_tokens`` less its block.

Sequential (probe) admission onboards P_1 by evicting a GPU filler, which is offloaded in
place of the oldest host block, P_2: P_2's requester computes a block it was credited and
the step overflows ``max_num_tokens``. Two-phase (claim) admission claims every P_i first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kvtier.config import CacheConfig
from kvtier.reprs import shown
from kvtier.sequence import short_repr
from kvtier.sim.workload import TraceRequest


@dataclass(frozen=True, slots=True)
class RaceWorkload:
    """S1 at scale for ``cache`` and a step budget of ``max_num_tokens``, for a scheduler
    with or without ``chunked_prefill``. The race needs a host tier: without one, the
    fillers drop the prefixes and nothing is credited."""

    cache: CacheConfig
    max_num_tokens: int = 8192
    max_prefixes: int = 64
    name: str = "race"
    chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.cache, CacheConfig):
            # NOTE: anything else was taken, and failed with AttributeError when iterated.
            raise ValueError(f"cache must be a CacheConfig, got {short_repr(self.cache)}")
        for field in ("max_num_tokens", "max_prefixes"):
            value = getattr(self, field)
            if type(value) is not int or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {shown(value)}")
        if type(self.chunked_prefill) is not bool:
            raise ValueError(f"chunked_prefill must be a bool, got {shown(self.chunked_prefill)}")
        tpb = self.cache.tokens_per_block
        if not self.chunked_prefill and self.max_num_tokens <= tpb:
            # NOTE: a prefix request is a block and a token: past one step's budget, every
            # request was skipped as too large and the report said nothing of a race.
            raise ValueError(f"without chunked_prefill, max_num_tokens must be > "
                             f"tokens_per_block ({tpb}): a prefix request is a block and a "
                             f"token, prefilled in one step; got {self.max_num_tokens}")

    @property
    def num_prefixes(self) -> int:
        """At most one per host slot and ``max_prefixes``, and few enough that every
        follow-up's blocks (one onboarded, its new ones) fit the GPU pool at once."""
        cache = self.cache
        n = max(1, min(cache.num_host_blocks, self.max_prefixes, self.max_num_tokens))
        while n > 1 and n * (2 + self._new_tokens(n) // cache.tokens_per_block) > (
                cache.num_gpu_blocks):
            n -= 1
        return n

    def _new_tokens(self, n: int) -> int:
        tpb = self.cache.tokens_per_block
        room = (self.cache.num_gpu_blocks // n - 2) * tpb
        new = max(1, min(self.max_num_tokens // n, room))
        # NOTE: without chunked prefill a follow-up (its block and its new tokens) past the
        # step's budget was skipped as too large: with one prefix, its new tokens alone
        # were the whole budget.
        return new if self.chunked_prefill else min(new, self.max_num_tokens - tpb)

    def __iter__(self) -> Iterator[TraceRequest]:
        cache = self.cache
        tpb = cache.tokens_per_block
        n = self.num_prefixes
        counter = iter(range(1_000_000_000, 1 << 62))
        prefixes = [[next(counter) for _ in range(tpb)] for _ in range(n)]
        t = 0.0
        for i, prefix in enumerate(prefixes):
            yield TraceRequest(f"p{i}", t, [*prefix, next(counter)], 1)
            t += 1.0
        # Fillers of whole blocks (all stored), each small enough to be admitted with room
        # for its one output token, enough to fill the GPU and the rest of the host.
        # NOTE: and each within one step's budget: without chunked prefill a longer prompt
        # is skipped as too large, and the fillers of 8,192 tokens in a step of 1,024 were
        # (64 of 192 requests): nothing was offloaded, no follow-up onboarded, no race.
        blocks_left = cache.num_gpu_blocks + max(0, cache.num_host_blocks - n)
        chunk = max(1, min(256, cache.num_gpu_blocks // 4, self.max_num_tokens // tpb))
        j = 0
        while blocks_left:
            size = min(blocks_left, chunk)
            yield TraceRequest(f"f{j}", t, [next(counter) for _ in range(size * tpb)], 1)
            blocks_left -= size
            j += 1
            t += 1.0
        t += 3600.0  # long after the fillers are done, whatever the model's speed
        new = self._new_tokens(n)
        for i, prefix in enumerate(prefixes):
            yield TraceRequest(f"q{i}", t, [*prefix, *(next(counter) for _ in range(new))], 1)

    def describe(self) -> dict[str, object]:
        """JSON-ready parameters of this workload."""
        return {"name": self.name, "kind": "race", "num_prefixes": self.num_prefixes,
                "max_num_tokens": self.max_num_tokens,
                "chunked_prefill": self.chunked_prefill,
                "num_gpu_blocks": self.cache.num_gpu_blocks,
                "num_host_blocks": self.cache.num_host_blocks}
