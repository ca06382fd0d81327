"""Retention by token range: how long, and at which priority, a request's blocks are kept.

A request may say that some of its tokens are worth more than the rest: a system prompt
shared by every session at priority 90, the conversation at the default, the generated
tokens at 10 for a minute. These are TensorRT-LLM's ``KvCacheRetentionConfig`` semantics:

* a :class:`RetentionRange` gives the tokens ``start .. end`` (``end`` excluded; ``None``:
  to the end of the prompt) a priority (0..100, lower is evicted first) and, optionally, a
  retention in seconds after which the priority falls back to the cache's default (the
  block then ranks among the default blocks by its release, its last use; TensorRT-LLM
  re-queues it as if used when the retention ran out);
* a block takes the range its *first token* lies in: a block that straddles a range's end
  belongs to the range it starts in;
* prompt blocks in no range take the request's own ``priority`` / ``retention_s``;
* blocks whose first token lies past the prompt (those decoding filled) take
  ``decode_priority`` / ``decode_retention_s`` if given, else the request's own. A request
  admitted again with its output so far (after a preemption) says where that output begins
  (``decode_start``; the scheduler sets it), so its decoded blocks stay decoded blocks.

::

    tokens   0 ......... 8 ........ 16 ........ 24 ...... prompt end ..... decode ...
    ranges   [0, 10) p=90 ]               [20, None) p=50 .......]
    blocks   |  b0   |  b1   |  b2   |  b3   |  b4   |  b5   |  b6   |  b7   |
    (8 tok)     90      90     req     50      50      50    decode  decode

Ranges are checked when the :class:`Retention` is made: none may overlap, and only the last
(by start) may be open-ended. The cache applies the settings when a request releases its
blocks (as for a request's single ``priority``): a run of blocks whose settings differ is cut
where they change, so every cached run has one priority and one expiry.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

from kvtier.blocks import cdiv
from kvtier.config import check_priority
from kvtier.counts import MAX_COUNT, as_integer, check_count
from kvtier.reprs import shown
from kvtier.sequence import check_retention, short_repr


@dataclass(frozen=True, slots=True)
class RetentionRange:
    """The prompt tokens ``start .. end`` (``end`` excluded, ``None``: to the prompt's
    end) are kept at ``priority`` for ``retention_s`` seconds (``None``: no expiry)."""

    start: int
    end: int | None
    priority: int
    retention_s: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "start", check_count("start of a retention range", self.start))
        # NOTE: ``shown``, not ``{self.start}``: a start past Python's 4,300 digits made
        # every message here raise a ValueError naming nothing (and the two below are built
        # for every range: no such range could be made at all).
        start = shown(self.start)
        if self.end is not None:
            end = as_integer(self.end)
            if end is None or not self.start < end <= MAX_COUNT:
                raise ValueError(f"end of the retention range starting at {start} must be "
                                 f"None or an integer in {self.start + 1}..2**48, got "
                                 f"{short_repr(self.end)}")
            set_(self, "end", end)
        set_(self, "priority",
             check_priority(f"priority of the retention range at {start}", self.priority))
        object.__setattr__(self, "retention_s", check_retention(
            self.retention_s, f"retention_s of the retention range at {start}"))

    def span(self) -> str:
        """The tokens as text, ``[start, end)``. Pure."""
        return f"[{shown(self.start)}, {'the prompt end' if self.end is None else shown(self.end)})"

    def contains(self, token: int) -> bool:
        """Whether token index ``token`` lies in the range. Pure."""
        return self.start <= token and (self.end is None or token < self.end)


@dataclass(frozen=True, slots=True)
class Retention:
    """Per-token-range retention of one request (see the module docstring). ``ranges`` may
    be given in any order; they are kept sorted by start."""

    ranges: tuple[RetentionRange, ...] = ()
    decode_priority: int | None = None
    decode_retention_s: float | None = None
    # Where decoded tokens begin, for a sequence admitted again with its output so far
    # (after a preemption): ``None`` is the end of the tokens it is admitted with.
    decode_start: int | None = None

    def __post_init__(self) -> None:
        ranges = self.ranges
        if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Iterable):
            raise TypeError(f"ranges must be an iterable of RetentionRange, got "
                            f"{short_repr(ranges)}")
        items = list(ranges)
        for i, item in enumerate(items):
            if not isinstance(item, RetentionRange):
                raise TypeError(f"ranges[{i}] must be a RetentionRange, got {short_repr(item)}")
        items.sort(key=lambda r: r.start)
        for before, after in pairwise(items):
            if before.end is None or before.end > after.start:
                raise ValueError(f"retention ranges overlap: {before.span()} and "
                                 f"{after.span()} (ranges must not overlap; only the last "
                                 "may be open-ended)")
        object.__setattr__(self, "ranges", tuple(items))
        if self.decode_priority is not None:
            object.__setattr__(self, "decode_priority",
                               check_priority("decode_priority", self.decode_priority))
        elif self.decode_retention_s is not None:
            raise ValueError("decode_retention_s needs a decode_priority (without one, "
                             "decoded blocks follow the request's priority and retention_s)")
        object.__setattr__(self, "decode_retention_s",
                           check_retention(self.decode_retention_s, "decode_retention_s"))
        start = self.decode_start
        if start is not None:
            object.__setattr__(self, "decode_start", check_count("decode_start", start, 1))

    def for_request(self, num_tokens: int, priority: int,
                    retention_s: float | None) -> BlockRetention:
        """The settings of each block of a request admitted with ``num_tokens`` tokens
        (its prompt, unless ``decode_start`` says where it ends) and its own ``priority`` /
        ``retention_s`` (for blocks in no range). Pure."""
        prompt_end = num_tokens if self.decode_start is None else self.decode_start
        return BlockRetention(self, prompt_end, priority, retention_s)


class BlockRetention:
    """A :class:`Retention` resolved for one request: the (priority, retention_s) of each of
    its blocks, and where along a run of blocks they change. Immutable."""

    __slots__ = ("_decode", "_default", "_num_prompt_tokens", "_ranges", "_starts")

    def __init__(self, retention: Retention, num_prompt_tokens: int, priority: int,
                 retention_s: float | None) -> None:
        self._ranges = retention.ranges
        # NOTE: looked up by bisection: a request may name many ranges, and a release
        # asks once per run of its path.
        self._starts = [r.start for r in retention.ranges]
        self._num_prompt_tokens = num_prompt_tokens
        self._default = (priority, retention_s)
        self._decode = self._default if retention.decode_priority is None else (
            retention.decode_priority, retention.decode_retention_s)

    def at(self, block: int, tokens_per_block: int) -> tuple[int, float | None]:
        """(priority, retention_s) of block ``block``: by the range its first token lies in.
        Pure."""
        token = block * tokens_per_block
        if token >= self._num_prompt_tokens:
            return self._decode
        i = bisect_right(self._starts, token) - 1
        if i >= 0 and self._ranges[i].contains(token):
            r = self._ranges[i]
            return r.priority, r.retention_s
        return self._default

    def cuts(self, start_block: int, num_blocks: int, tokens_per_block: int) -> list[int]:
        """Offsets ``k`` in ``1 .. num_blocks - 1``, ascending, where the settings of block
        ``start_block + k`` differ from those of the block before it. Pure."""
        # Settings change only at a block holding the first token at or past a range's
        # start or end, or the prompt's end: those of the ranges that reach into the run.
        first = start_block * tokens_per_block
        last = (start_block + num_blocks) * tokens_per_block
        edges = {self._num_prompt_tokens}
        for r in self._ranges[max(0, bisect_right(self._starts, first) - 1):
                              bisect_right(self._starts, last)]:
            edges.add(r.start)
            if r.end is not None:
                edges.add(r.end)
        found: set[int] = set()
        for edge in edges:
            k = cdiv(edge, tokens_per_block) - start_block
            if 0 < k < num_blocks and (self.at(start_block + k, tokens_per_block)
                                       != self.at(start_block + k - 1, tokens_per_block)):
                found.add(k)
        return sorted(found)
