"""The CUDA streams and events a torch transfer engine orders its plans with (extra
``torch``). On the CPU there are none: every copy is done when it returns."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvtier.transfer.torch_memory import new_event, new_stream

if TYPE_CHECKING:
    import torch


class CopyStreams:
    """Named streams of one device, created on first use, and the completion event of the
    last plan (``last_done``): every plan starts after the caller's queued work and after
    the plan before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.last_done: torch.cuda.Event | None = None
        self._streams: dict[str, torch.cuda.Stream] = {}

    def stream(self, name: str) -> torch.cuda.Stream:
        stream = self._streams.get(name)
        if stream is None:
            stream = self._streams[name] = new_stream(self.device)
        return stream

    def start_events(self) -> list[Any]:
        """What a plan's first copies wait for: the caller's stream now, and the plan
        before (none on the CPU)."""
        if not self.is_cuda:
            return []
        import torch

        start = new_event()
        start.record(torch.cuda.current_stream(self.device))
        return [start] if self.last_done is None else [start, self.last_done]

    def join(self, deps: list[Any]) -> Any:
        """One event after all of ``deps`` (CUDA), on a stream of its own so that joining
        holds up no copy."""
        if not self.is_cuda or not deps:
            return None
        if len(deps) == 1:
            return deps[0]
        stream = self.stream("join")
        for event in deps:
            stream.wait_event(event)
        joined = new_event()
        joined.record(stream)
        return joined

    def finish(self, layer_events: list[Any]) -> Any:
        """The plan's completion event; the next plan starts after it."""
        done = self.join([e for e in layer_events if e is not None])
        if done is not None:
            self.last_done = done
        return done
