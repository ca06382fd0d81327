"""Counters of what the cache did, per tier."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(slots=True)
class TierStats:
    """Blocks per outcome in one tier.

    ``reused`` counts full blocks of admitted prompts found in this tier and ``missed`` those
    a lookup reaching this tier did not find there (so GPU misses include host hits).
    """

    reused_blocks: int = 0
    missed_blocks: int = 0
    onboarded_blocks: int = 0
    offloaded_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.reused_blocks + self.missed_blocks
        return self.reused_blocks / total if total else 0.0


class CountedReuse(NamedTuple):
    """The reuse one admission added to :class:`CacheStats` (``resumed``: to the resumed
    counters), kept on its live sequence for ``CacheStats.take_back``."""

    resumed: bool
    num_reused_tokens: int
    num_partial_tokens: int
    num_host_reused_tokens: int
    num_gpu_blocks: int
    num_host_blocks: int


@dataclass(slots=True)
class CacheStats:
    """Counters since the manager was created; ``token_hit_rate`` is reused/prompt tokens.
    The prompt tokens and the reused and missed blocks are those of the admitted requests
    that looked the cache up: one that skips reading it (``skip_reading_prefix_cache``) is
    counted in ``num_admitted`` only, as vLLM's prefix-cache stats leave it out.
    ``num_host_reused_tokens`` are the reused tokens the queries' lookups found on the host
    tier (a partial block copied from a host block included), as ``host.reused_blocks``
    counts them: a host prefix that two requests of one batch reuse is a host hit for both,
    though only the first one's admission onboards it. A resumed request (``SequenceSpec.resumed``:
    preempted or requeued, recomputing) is no query either: its prompt and reuse are counted
    in ``num_resumed`` / ``num_resumed_prompt_tokens`` / ``num_resumed_reused_tokens``, as
    vLLM counts preempted requests apart, and in no hit rate.

    The reuse counted is the reuse obtained: an admission aborted before any of its work
    ran (a copy it needed or its forward pass failed in its admission's step: it
    recomputes) has its reused tokens and blocks taken back (its prompt, a query's,
    counted with none reused, its blocks as misses) and counted in
    ``num_lost_reused_tokens``, query or resumed; its readmission is a resumed one."""

    gpu: TierStats = field(default_factory=TierStats)
    host: TierStats = field(default_factory=TierStats)
    num_admitted: int = 0
    num_rejected: int = 0
    num_prompt_tokens: int = 0
    num_reused_tokens: int = 0
    num_partial_tokens: int = 0
    num_host_reused_tokens: int = 0
    num_resumed: int = 0
    num_resumed_prompt_tokens: int = 0
    num_resumed_reused_tokens: int = 0
    num_partial_copies: int = 0
    num_partial_in_place: int = 0
    num_duplicate_stores: int = 0
    num_failed_transfers: int = 0
    num_failed_computes: int = 0  # requests aborted by failed forward passes
    num_lost_reused_tokens: int = 0  # reuse counted, then lost to a failed copy or pass
    num_imported_blocks: int = 0

    @property
    def token_hit_rate(self) -> float:
        return self.num_reused_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0

    def take_back(self, counted: CountedReuse) -> None:
        """An admission's reuse (``counted``) was never obtained: its work never ran (a
        copy or the pass of its step failed). Its reused tokens and blocks leave the
        counters, as if its lookup had found nothing, and count as lost."""
        n = counted.num_reused_tokens
        self.num_lost_reused_tokens += n
        if counted.resumed:
            self.num_resumed_reused_tokens -= n
            return
        self.num_reused_tokens -= n
        self.num_partial_tokens -= counted.num_partial_tokens
        self.num_host_reused_tokens -= counted.num_host_reused_tokens
        gpu, host = counted.num_gpu_blocks, counted.num_host_blocks
        self.gpu.reused_blocks -= gpu
        self.gpu.missed_blocks += gpu
        self.host.reused_blocks -= host
        # A lookup that finds no GPU block reaches the host for every block.
        self.host.missed_blocks += gpu + host

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready snapshot. Pure."""
        out: dict[str, object] = {
            name: getattr(self, name)
            for name in (
                "num_admitted", "num_rejected", "num_prompt_tokens", "num_reused_tokens",
                "num_partial_tokens", "num_host_reused_tokens", "num_resumed",
                "num_resumed_prompt_tokens", "num_resumed_reused_tokens",
                "num_partial_copies", "num_partial_in_place",
                "num_duplicate_stores", "num_failed_transfers", "num_failed_computes",
                "num_lost_reused_tokens", "num_imported_blocks",
            )
        }
        out["token_hit_rate"] = self.token_hit_rate
        for tier_name in ("gpu", "host"):
            tier: TierStats = getattr(self, tier_name)
            out[tier_name] = {
                "reused_blocks": tier.reused_blocks,
                "missed_blocks": tier.missed_blocks,
                "onboarded_blocks": tier.onboarded_blocks,
                "offloaded_blocks": tier.offloaded_blocks,
                "evicted_blocks": tier.evicted_blocks,
                "hit_rate": tier.hit_rate,
            }
        return out
