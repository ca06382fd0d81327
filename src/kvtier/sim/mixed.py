"""Several workloads served by one engine, sharing its cache: a mixed workload.

A deployment rarely serves one kind of traffic: chat sessions (turns minutes apart) and
agents (tool loops seconds apart, over large shared tool specs) compete for the same
blocks. ``MixedWorkload`` merges its parts' requests by arrival time::

    chat     c0 ----- c1 ------------- c2 ---- c3 ...
    agentic  a0 - a1 - a2 - a3 - a4 - a5 - a6 ...
    mixed    c0 a0 a1 c1 a2 a3 a4 c2 a5 c3 a6 ...

Each part keeps its own token space: token ``t`` of part ``k`` of ``n`` becomes
``t * n + k``, so equal content within a part stays equal and two parts never share a
prefix by accident (each built-in workload numbers its fresh tokens from 0). Request and
session ids are prefixed with the part's name. By default the mix ends where its first
part does, so that every request of it meets the others' traffic (``until_all`` runs
every part to its end).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kvtier.reprs import shown
from kvtier.sim._checks import check_int
from kvtier.sim.workload import SAMPLED_TOKEN_BASE, TraceRequest, Workload


@dataclass(frozen=True, slots=True)
class MixedWorkload:
    """``parts`` (at least two workloads, distinct names without '/') merged by arrival; at
    most ``limit`` requests if given. Ties in arrival go to the earlier part."""

    parts: tuple[Workload, ...]
    name: str = "mixed"
    until_all: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.parts, tuple) or len(self.parts) < 2:
            raise ValueError(f"parts must be a tuple of at least two workloads, got "
                             f"{shown(self.parts)}")
        for i, part in enumerate(self.parts):
            if not isinstance(part, Workload):
                raise ValueError(f"parts[{i}] is not a workload (name, __iter__, describe): "
                                 f"{shown(part)}")
        names = [part.name for part in self.parts]
        for i, name in enumerate(names):
            # NOTE: the prefix ends at the first "/": parts named "a" and "a/b" gave their
            # requests "b/c" and "c" one id, "a/b/c", and the replay was refused.
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"parts[{i}] has the name {shown(name)}: a part's name must "
                                 f"be a non-empty string without '/' (it prefixes its "
                                 f"requests' ids, 'name/id')")
        if len(set(names)) != len(names):
            raise ValueError(f"the parts' names must differ (request ids are prefixed with "
                             f"them), got {names}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {shown(self.name)}")
        if type(self.until_all) is not bool:
            raise ValueError(f"until_all must be a bool, got {shown(self.until_all)}")
        if self.limit is not None:
            object.__setattr__(self, "limit", check_int("limit", self.limit, 0))

    def __iter__(self) -> Iterator[TraceRequest]:
        """The parts' requests in arrival order, each part in its own token space."""
        n = len(self.parts)
        sources = [iter(part) for part in self.parts]
        heads: list[TraceRequest | None] = [next(s, None) for s in sources]
        num = 0
        while self.limit is None or num < self.limit:
            live = [k for k, head in enumerate(heads) if head is not None]
            if not live or (len(live) < n and not self.until_all):
                return
            k = min(live, key=lambda i: (heads[i].arrival_s, i))  # type: ignore[union-attr]
            req = heads[k]
            assert req is not None
            heads[k] = next(sources[k], None)
            yield self._remap(req, k, n)
            num += 1

    def _remap(self, req: TraceRequest, k: int, n: int) -> TraceRequest:
        part = self.parts[k].name
        top = max(req.prompt)
        # NOTE: a remapped id must stay below the replay's sampled tokens, never meet them.
        if top * n + k >= SAMPLED_TOKEN_BASE:
            raise ValueError(f"request {shown(req.request_id)} of part {shown(part)} holds "
                             f"token id "
                             f"{shown(top)}: past what {n} parts can share (ids below "
                             f"{SAMPLED_TOKEN_BASE // n})")
        session = None if req.session_id is None else f"{part}/{req.session_id}"
        return TraceRequest(f"{part}/{req.request_id}", req.arrival_s,
                            [t * n + k for t in req.prompt], req.output_length, session)

    def describe(self) -> dict[str, object]:
        """JSON-ready: the parts' own descriptions and how they are merged."""
        return {"name": self.name, "kind": "mixed", "until_all": self.until_all,
                "limit": self.limit, "parts": [part.describe() for part in self.parts]}
