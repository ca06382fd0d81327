"""``ListWorkload``: a workload of hand-built requests, for the simulator's tests."""

from __future__ import annotations

from collections.abc import Iterator

from kvtier.sim.workload import TraceRequest


class ListWorkload:
    """A workload of hand-built requests, replayed in the order given."""

    name = "list"

    def __init__(self, requests: list[TraceRequest]) -> None:
        self.requests = requests

    def __iter__(self) -> Iterator[TraceRequest]:
        return iter(self.requests)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "num_requests": len(self.requests)}
