"""How a :class:`~kvtier.scheduler.Scheduler` budgets and admits: :class:`SchedulerConfig`
and its modes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from kvtier.counts import check_count
from kvtier.reprs import shown

CapacityPolicy = Literal["guaranteed_no_evict", "max_utilization"]
AdmissionMode = Literal["claim", "probe"]
CAPACITY_POLICIES: tuple[CapacityPolicy, ...] = get_args(CapacityPolicy)
ADMISSIONS: tuple[AdmissionMode, ...] = get_args(AdmissionMode)
# Drafts per step beyond which a verification pass is mostly rejected work (EAGLE and
# n-gram drafters propose a handful); a bound, so a typo cannot reserve a pool's worth.
MAX_SPECULATIVE_TOKENS = 64

@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Budgets and policies of a :class:`Scheduler`.

    ``max_chunk_tokens`` caps one request's prefill chunk (``None``: the whole budget;
    refused without ``enable_chunked_prefill``, where it would cap nothing).
    Without ``enable_chunked_prefill`` a prompt is prefilled in one step, so one longer
    than ``max_num_tokens`` (with any output it is queued with) is refused when queued; a
    preempted request's recompute (its
    prompt and output so far) that no step could hold is still chunked.
    A request that has waited ``max_wait_steps`` steps since it was queued stops later
    requests from being admitted ahead of it, which bounds its wait. ``admission`` names
    the scheduler class that runs it: ``claim`` (:class:`Scheduler`) or ``probe`` (the
    simulator's race-measuring :class:`kvtier.sim.probe.ProbeScheduler`).
    ``num_speculative_tokens`` (speculative decoding): up to this many draft tokens per
    decoding request and step, each with a KV slot (``KVCacheManager.reserve_lookahead``)
    and a token of the budget; ``update`` then takes the accepted drafts and the token
    sampled after them. 0 (the default): one token per decode.
    """

    max_num_tokens: int = 8192
    max_batch_size: int = 256
    enable_chunked_prefill: bool = True
    max_chunk_tokens: int | None = None
    capacity_policy: CapacityPolicy = "guaranteed_no_evict"
    admission: AdmissionMode = "claim"
    max_wait_steps: int = 64
    num_speculative_tokens: int = 0

    def __post_init__(self) -> None:
        # Each count kept as the plain int it is (a NumPy integer given is read as one), at
        # most ``MAX_COUNT`` (2**48: no step of any cache holds more tokens or requests).
        set_ = object.__setattr__
        set_(self, "num_speculative_tokens", check_count(
            "num_speculative_tokens", self.num_speculative_tokens, 0, MAX_SPECULATIVE_TOKENS))
        for name in ("max_num_tokens", "max_batch_size", "max_wait_steps"):
            set_(self, name, check_count(name, getattr(self, name), 1))
        cap = self.max_chunk_tokens
        if cap is not None:
            cap = check_count("max_chunk_tokens", cap, 1)
            set_(self, "max_chunk_tokens", cap)
        # NOTE: without chunked prefill the cap was taken and read by nothing (a prompt is
        # prefilled whole, and a recompute no step holds is chunked by the budget alone):
        # a config that said chunks <= 256 ran chunks of max_num_tokens. The CLI refuses
        # the same pair of options.
        if cap is not None and self.enable_chunked_prefill is False:
            raise ValueError(f"max_chunk_tokens={shown(cap)} caps a prefill chunk, and "
                             "enable_chunked_prefill=False prefills each prompt in one step: "
                             "set max_chunk_tokens=None or enable chunked prefill")
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise ValueError(f"capacity_policy must be one of {CAPACITY_POLICIES}, "
                             f"got {shown(self.capacity_policy)}")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {shown(self.admission)}")
        if type(self.enable_chunked_prefill) is not bool:
            raise ValueError(
                f"enable_chunked_prefill must be a bool, got {shown(self.enable_chunked_prefill)}")
