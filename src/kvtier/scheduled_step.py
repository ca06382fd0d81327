"""What one scheduler step decided: the chunks and decodes of a forward pass, the copies to
run before it, and the scheduler's own records of an admission."""

from __future__ import annotations

from typing import NamedTuple

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
    """One forward pass: what to compute, and the copies to run before it."""

    context_chunks: tuple[ContextChunk, ...]
    decode_request_ids: tuple[str, ...]
    num_scheduled_tokens: int
    transfer_plan: TransferPlan
    preempted_request_ids: tuple[str, ...]
    num_credited_tokens: int  # reuse promised at admission, by lookup
    num_reused_tokens: int  # reuse the admissions got
    num_overflow_tokens: int  # tokens past max_num_tokens (probe mode only)


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
