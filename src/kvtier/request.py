"""What the scheduler tracks of one request: :class:`Request`, validated field by field."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from kvtier.config import check_priority
from kvtier.counts import check_count
from kvtier.reprs import shown
from kvtier.sequence import (
    MultimodalItem,
    as_token_list,
    check_key,
    check_lora_id,
    check_mm_items,
    check_retention,
    check_retention_type,
    check_tokens,
    is_finite_number,
    request_id_of,
    short_repr,
    token_list,
)

if TYPE_CHECKING:
    from kvtier.retention import Retention

# NOTE: SequenceSpec's checks, run here so that a Request is refused when it is built,
# naming the request, not when the scheduler first admits it.


@dataclass(slots=True)
class Request:
    """A request as the scheduler tracks it. ``output`` holds the tokens sampled so far.

    Every field is validated when the request is built and again by
    :meth:`Scheduler.add_request` (a dataclass can be changed in between): ``prompt`` is a
    non-empty sequence of token ids ``0 <= id < 2**63`` (any sequence but ``str``/``bytes``;
    the request keeps a list copy, so changing the caller's list later has no effect),
    ``max_output_tokens`` an int >= 1, ``arrival_s`` a finite number; ``salt``, ``lora_id``,
    ``priority`` and ``retention_s`` as :class:`SequenceSpec` takes them (an int salt below
    2**128 in magnitude or a str / bytes one of at most 4096; ``lora_id`` in 0..2**63-1;
    ``retention_s`` in 0..1e9 seconds); ``retention`` a :class:`~kvtier.retention.Retention`
    or None; ``skip_reading_prefix_cache`` a bool (:class:`SequenceSpec`: the request reuses
    no cached block, e.g. for prompt logprobs, and stores its own); ``mm_items`` a tuple or
    list of :class:`~kvtier.sequence.MultimodalItem` lying within the prompt (kept as a
    tuple: a block holding part of an image is keyed by the image too, as
    :class:`SequenceSpec` keys it). ``bool`` is never taken for a number.

    While a scheduler holds it (from ``add_request`` until it finishes or is aborted) no
    field may be assigned (AttributeError naming it): the scheduler sized its admission,
    reservation and recompute by them, and keeps its own copy of the prompt (a change in
    place to ``prompt`` is not seen). ``output`` is the scheduler's to append to.

    ``num_prefill_tokens`` and ``num_computed_tokens`` are the progress of the current
    admission's prefill (its prompt, and after a preemption or when queued with output,
    the output so far): decoded tokens are not counted, unlike vLLM's
    ``num_computed_tokens``. A decode computes the KV of ``tokens[-1]``, at position
    ``len(tokens) - 1``; a chunk's positions are its ``ContextChunk``'s.
    """

    request_id: str
    prompt: list[int]
    max_output_tokens: int
    arrival_s: float = 0.0
    salt: bytes | str | int | None = None
    lora_id: int | None = None
    priority: int | None = None
    retention_s: float | None = None
    output: list[int] = field(default_factory=list)
    num_prefill_tokens: int = 0  # tokens its current admission prefills
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    # Priorities per token range and for decoded blocks (``SequenceSpec.retention``).
    retention: Retention | None = None
    skip_reading_prefix_cache: bool = False
    mm_items: tuple[MultimodalItem, ...] = ()
    # Whether a scheduler holds it (``hold_request``): then its fields are frozen.
    _held: bool = field(default=False, init=False, repr=False, compare=False)

    def __new__(cls, *args: object, **kwargs: object) -> Request:
        # NOTE: the flag set first, so that ``__setattr__`` reads it as a slot: an unset
        # slot read (an AttributeError caught) for each field made a Request 2.3x dearer.
        self = object.__new__(cls)
        object.__setattr__(self, "_held", False)
        return self

    def __post_init__(self) -> None:
        self.prompt, self.output, self.mm_items = check_request(self)

    def __setattr__(self, name: str, value: object) -> None:
        # NOTE: a field changed while queued or running broke the scheduler's books: a
        # max_output_tokens raised past the blocks guaranteed_no_evict reserved failed an
        # assertion at the decode past them; one set to None raised in the middle of an
        # update; a new request_id left the scheduler's tables keyed by the old one (a
        # KeyError when it finished); a new salt or priority recomputed it elsewhere.
        if self._held:
            raise AttributeError(
                f"{name} of request {shown(self.request_id)} cannot change while a scheduler "
                f"holds it (queued or running: it was admitted and sized by its fields); abort "
                f"it, change it, and queue it again")
        object.__setattr__(self, name, value)

    def __getstate__(self) -> dict[str, object]:
        # NOTE: a copy (``copy``, ``deepcopy``, pickle) is held by no scheduler: one taken
        # of a queued or running request kept the flag, and refused every field assignment
        # and every scheduler (as "queued or running already") for good. A scheduler
        # copied with its requests holds its copies again (``Scheduler.__setstate__``).
        return {name: getattr(self, name) for name in _FIELDS}

    def __setstate__(self, state: dict[str, object]) -> None:
        object.__setattr__(self, "_held", False)
        for name, value in state.items():
            object.__setattr__(self, name, value)

    @property
    def held(self) -> bool:
        """Whether a scheduler holds it (queued or running): then its fields are frozen.
        A copy of it is held by none, but in a copy of its scheduler."""
        return self._held

    @property
    def tokens(self) -> list[int]:
        """The prompt and the output so far (a new list). After a preemption this is what
        the request prefills again."""
        return self.prompt + self.output

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prefill_tokens


_FIELDS = tuple(f.name for f in fields(Request) if f.name != "_held")


def check_token_ids(tokens: object, what: str, allow_empty: bool = False) -> list[int]:
    """A new list of the token ids in ``tokens`` (a sequence of ints in ``0..2**63-1``, not
    ``str``/``bytes``); ValueError naming ``what`` and the first bad index otherwise."""
    if allow_empty and isinstance(tokens, Sequence) and not isinstance(tokens, (str, bytes)) \
            and not tokens:
        return []
    # NOTE: a prompt is checked, not converted: a NumPy int in it stays as given (the specs
    # the scheduler builds pack every id as an int); converting meant reading each id's
    # type, 20 ns an id. The output, short and appended to, is converted.
    if allow_empty:
        ids = token_list(tokens, what)
    else:
        ids = as_token_list(tokens, what)
        check_tokens(ids, what)
    return list(ids) if ids is tokens else ids


def check_request(req: Request) -> tuple[list[int], list[int], tuple[MultimodalItem, ...]]:
    """Validate every field of ``req``; return copies of its prompt and output and its
    multimodal items as a tuple. Its counts are kept as the plain ints they are (a NumPy
    integer given is read as one: the same value); nothing else changes."""
    rid = request_id_of(req.request_id)
    if not rid:
        raise ValueError(f"request_id must be a non-empty str, got {shown(req.request_id)}")
    if rid is not req.request_id:
        object.__setattr__(req, "request_id", rid)
    what = f"request {shown(rid)}"
    prompt = check_token_ids(req.prompt, f"prompt of {what}")
    output = check_token_ids(req.output, f"output of {what}", allow_empty=True)
    set_progress(req, max_output_tokens=check_count(f"max_output_tokens of {shown(rid)}",
                                                    req.max_output_tokens, 1))
    if not is_finite_number(req.arrival_s):
        raise ValueError(f"arrival_s of {what} must be a finite number, got {shown(req.arrival_s)}")
    object.__setattr__(req, "salt", check_key(f"salt of {what}", req.salt))
    object.__setattr__(req, "lora_id", check_lora_id(req.lora_id, f"lora_id of {what}"))
    if req.priority is not None:
        set_progress(req, priority=check_priority(f"priority of {what}", req.priority))
    check_retention(req.retention_s, f"retention_s of {what}")
    if req.retention is not None:
        # NOTE: with the tokens it is admitted with, as SequenceSpec checks it: unbounded
        # here, a decode_start past the prompt was refused only by add_request's spec,
        # after the request's prompt, output and mm_items had been replaced by copies.
        check_retention_type(req.retention, f"retention of {what}", len(prompt) + len(output))
    if type(req.skip_reading_prefix_cache) is not bool:
        raise ValueError(f"skip_reading_prefix_cache of {what} must be a bool, got "
                         f"{short_repr(req.skip_reading_prefix_cache)}")
    mm_items = check_mm_items(req.mm_items, len(prompt), rid)
    for name in ("num_prefill_tokens", "num_computed_tokens", "num_preemptions"):
        set_progress(req, **{name: check_count(f"{name} of {what}", getattr(req, name))})
    return prompt, output, mm_items


def hold_request(req: Request, held: bool) -> None:
    """A scheduler takes ``req`` (its fields frozen) or gives it back."""
    object.__setattr__(req, "_held", held)


def set_progress(req: Request, **fields: int | list[int]) -> None:
    """The scheduler's own writes of a held request's progress fields (``num_*``,
    ``output``)."""
    for name, value in fields.items():
        object.__setattr__(req, name, value)
