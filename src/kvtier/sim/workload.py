"""Requests of a replayed workload, and the contract every workload source meets."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvtier.reprs import shown
from kvtier.sequence import is_finite_number

# NOTE: a request longer than this could never fit a GPU pool the CLI accepts, and its
# prompt alone would take gigabytes to build: refused when a workload is made or read.
MAX_REQUEST_TOKENS = 1 << 24
SAMPLED_TOKEN_BASE = 1 << 62
"""Where a replay's sampled tokens begin (fresh ids, one a token, counting up): a workload's
token ids stay below it, so no prompt ever holds an output and reuses it as a prefix."""
MAX_ARRIVAL_S = 1e10
"""The latest arrival a workload may have (about 317 years): past it the replay's virtual
clock, a float of seconds, no longer tells microseconds apart (every latency came out 0)."""
MAX_TIME_SCALE = MAX_ARRIVAL_S
"""The largest time scale: past it, a request one second into any workload arrives past
:data:`MAX_ARRIVAL_S`. (A scale up to it may still push a later request past the clock:
:func:`check_arrivals` reads the workload for those before a replay.)"""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload: when it arrives, its prompt tokens and how much it generates.

    ``prompt`` holds token ids. Workloads build it lazily, one request at a time; equal
    content has equal ids and distinct content distinct ids, so prefix reuse in the ids is
    exactly the reuse the workload means. ``session_id`` groups the turns of one
    conversation where the workload knows them (``None`` otherwise).
    """

    request_id: str
    arrival_s: float
    prompt: list[int]
    output_length: int
    session_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {shown(self.request_id)}")
        arrival = self.arrival_s
        if not is_finite_number(arrival) or not 0 <= arrival <= MAX_ARRIVAL_S:
            raise ValueError(f"arrival_s must be a finite number in 0..{MAX_ARRIVAL_S:.0e}, "
                             f"got {shown(arrival)}")
        if not isinstance(self.prompt, list) or not self.prompt:
            raise ValueError(f"prompt must be a non-empty list of token ids, got "
                             f"{shown(self.prompt)}")
        if type(self.output_length) is not int or self.output_length < 0:
            raise ValueError(f"output_length must be an integer >= 0, got "
                             f"{shown(self.output_length)}")
        if self.session_id is not None and not isinstance(self.session_id, str):
            raise ValueError(f"session_id must be a string or None, got {shown(self.session_id)}")

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt in tokens."""
        return len(self.prompt)

    def scaled_arrival_s(self, time_scale: float) -> float:
        """``arrival_s x time_scale``, the time a replay queues it; ValueError naming the
        request past :data:`MAX_ARRIVAL_S`. Pure.

        NOTE: ``arrival_s`` is bounded when made, the product was not: ``--time-scale
        1e300`` put every arrival where the virtual clock loses whole steps, and the report
        said TTFT 0.0 ms."""
        arrival_s = self.arrival_s * time_scale
        if not arrival_s <= MAX_ARRIVAL_S:
            raise ValueError(f"request {shown(self.request_id)} arrives at {self.arrival_s:g} s x "
                             f"time scale {time_scale:g} = {arrival_s:.3g} s, past the "
                             f"{MAX_ARRIVAL_S:.0e} s a replay's virtual clock tells "
                             "microseconds apart; lower the time scale")
        return arrival_s


@runtime_checkable
class Workload(Protocol):
    """A named, re-iterable source of requests.

    Every call to ``__iter__`` starts over and yields the same requests (same ids, same
    tokens) in arrival order (``arrival_s`` never decreases). Prompts are built one request
    at a time: a workload never holds all of its prompts in memory at once.
    """

    @property
    def name(self) -> str:
        """Short name for reports."""
        ...

    def __iter__(self) -> Iterator[TraceRequest]:
        """Yield the requests in arrival order, starting from the first."""
        ...

    def describe(self) -> dict[str, object]:
        """JSON-ready summary of where the requests come from and how they were made."""
        ...


def check_time_scale(value: object) -> float:
    """``value`` as a time scale: ValueError unless a number in ``(0, MAX_TIME_SCALE]``.
    Pure.

    NOTE: an int past the float range (10**400) passed ``0 < value < inf`` and the replay
    then failed at its first arrival with a bare OverflowError ('int too large to convert
    to float'), naming no argument; a finite scale had no upper bound (1e300 put every
    arrival past the clock)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 < value <= MAX_TIME_SCALE):
        raise ValueError(f"time_scale must be a finite number in (0, {MAX_TIME_SCALE:g}], got "
                         f"{shown(value)}")
    return float(value)


def check_arrivals(requests: Iterable[TraceRequest], time_scale: float) -> None:
    """ValueError naming the first of ``requests`` whose arrival x ``time_scale`` passes
    the replay's clock (:meth:`TraceRequest.scaled_arrival_s`). Reads them all where the
    scale is above 1; at most 1 none can (every arrival is within the clock when made).

    NOTE: the replay found such a request only when it reached it: ``kvtier replay
    --time-scale 3e7`` simulated 1,379 requests for 12 s, then refused them all; on a
    day-long trace, after hours."""
    if time_scale <= 1:
        return
    for request in requests:
        request.scaled_arrival_s(time_scale)
