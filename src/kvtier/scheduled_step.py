"""What one scheduler step decided: the chunks and decodes of a forward pass, the copies to
run before it, and the scheduler's own records of an admission."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from kvtier.clock import CacheClock
from kvtier.request import Request
from kvtier.sequence import SequenceSpec
from kvtier.transfer.plan import TransferPlan


class ContextChunk(NamedTuple):
    """``num_tokens`` prompt tokens from ``first_token`` are computed this step;
    ``num_reused_tokens`` (first chunk only) came from the cache."""

    request_id: str
    first_token: int
    num_tokens: int
    num_reused_tokens: int


class ScheduledStep(NamedTuple):
    """One forward pass: what to compute, and the copies to run before it. With
    speculative decoding, ``num_draft_tokens[i]`` draft tokens follow the token of
    ``decode_request_ids[i]`` (their KV slots reserved); empty without it."""

    context_chunks: tuple[ContextChunk, ...]
    decode_request_ids: tuple[str, ...]
    num_scheduled_tokens: int
    transfer_plan: TransferPlan
    preempted_request_ids: tuple[str, ...]
    num_credited_tokens: int  # reuse promised at admission, by lookup
    num_reused_tokens: int  # reuse the admissions got: its first chunks' (requeue_failed)
    num_overflow_tokens: int  # tokens past max_num_tokens (probe mode only)
    num_draft_tokens: tuple[int, ...] = ()
    # Reuse an earlier step reported obtained that the manager has since taken back (a
    # pass that failed after its step's update: ``compute_failed``, ``transfer_failed``).
    # Summed over steps, ``num_reused_tokens - num_lost_reused_tokens`` is the reuse kept.
    num_lost_reused_tokens: int = 0


class Candidate(NamedTuple):
    """A waiting request to admit this step: ``spec`` is what it prefills, scheduled with
    ``num_new_tokens`` past the ``num_credited_tokens`` that ``lookup`` promised."""

    request: Request
    spec: SequenceSpec
    num_credited_tokens: int
    num_new_tokens: int


class Admitted(NamedTuple):
    """What the admit phase of one step started: first chunks, credited and obtained reuse."""

    chunks: list[ContextChunk]
    num_credited_tokens: int
    num_reused_tokens: int


STEP_PHASES = ("decode", "prefill", "lookup", "admit", "hint", "store", "update")
"""The phases of a scheduler step that :class:`StepPhases` times, in order: decode growth,
prefill chunks, the lookups of the waiting queue, the batch admission, the queue hint, the
stores at the step's end, and ``update``."""


class StepPhases:
    """An opt-in debug counter: real seconds spent in each phase of ``Scheduler.step`` and
    ``update`` (``STEP_PHASES``), for the last step (``last``) and summed (``total``).

    Off by default: a scheduler whose ``phases`` is ``None`` reads no clock. On, it costs a
    clock read per phase per step, never per request or per block. ``clock`` is read as the
    cache reads its own (:class:`~kvtier.clock.CacheClock`): a reading that raises or is no
    number gives the last good one, so a phase counts 0 s, and never fails the step.
    """

    __slots__ = ("_clock", "_t", "last", "total")

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        # NOTE: read bare, a clock that raised (or answered None) in a mark failed the
        # scheduler's step after its decodes were appended: the next step appended each
        # decode's token again, a token in the manager's sequence the request never had.
        self._clock = CacheClock(clock)  # TypeError for a clock that is not callable
        self._t = 0.0
        self.last = dict.fromkeys(STEP_PHASES, 0.0)
        self.total = dict.fromkeys(STEP_PHASES, 0.0)

    def begin(self) -> None:
        """A step starts: clear ``last`` and start the clock."""
        self.last = dict.fromkeys(STEP_PHASES, 0.0)
        self._t = self._clock()

    def resume(self) -> None:
        """Start the clock again (``update`` after a step), keeping ``last``."""
        self._t = self._clock()

    def mark(self, phase: str) -> None:
        """The time since the last mark (or ``begin`` / ``resume``) went to ``phase``."""
        t = self._clock()
        elapsed = t - self._t
        self.last[phase] += elapsed
        self.total[phase] += elapsed
        self._t = t
