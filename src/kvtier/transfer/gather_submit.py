"""Queueing a staged plan (``dma_gather``) on CUDA streams: every chunk's gather, DMA and
scatter and every direct batch on the stream of its direction, each after the level
before in its group (extra ``torch``).

Two ways to issue the same steps: on the calling thread in queue order, or from one
worker thread per stream (``stream_workers``), so that the driver's batched copies of
different streams (~0.5 us of CPU a DMA run, with the GIL released) run side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvtier.transfer.dma_batch import DmaBatch, Executor
from kvtier.transfer.dma_gather import D2H, H2D, DmaGatherCopier, GatherChunk, GatherPlan, queue
from kvtier.transfer.fused import to_device
from kvtier.transfer.stream_workers import StreamWorkers
from kvtier.transfer.torch_memory import new_event

if TYPE_CHECKING:
    import torch

    from kvtier.transfer.copy_streams import CopyStreams

STREAM_OF_FLAGS = {0: "d2d", 1: "h2d", 2: "d2h", 3: "h2h"}  # fused flags: bit 0 src host


def stream_name(step: GatherChunk | DmaBatch) -> str:
    """The stream a step is queued on: its direction's, a chunk's ``stream`` (the buffer
    it uses) numbered from the second on. Pure."""
    name = STREAM_OF_FLAGS[step.flags]
    if isinstance(step, GatherChunk) and step.stream:
        return f"{name}.{step.stream}"
    return name


def level_deps(steps: Sequence[GatherChunk | DmaBatch]) -> list[list[int]]:
    """Per step (queue order), the earlier steps of its group's level before it: what its
    copies wait for (none at level 0: those wait for the plan's start). Pure."""
    at: dict[tuple[int, int], list[int]] = {}
    for i, step in enumerate(steps):
        at.setdefault((step.group, step.level), []).append(i)
    return [at.get((s.group, s.level - 1), []) if s.level else [] for s in steps]


class GatherSubmitter:
    """Queues prepared staging plans of ``copier`` with ``execute`` (the batched copy) on
    ``streams``; ``workers``: issue from one thread per stream (``None``: the calling
    thread)."""

    def __init__(self, copier: DmaGatherCopier, execute: Executor, streams: CopyStreams,
                 device: torch.device, workers: StreamWorkers | None) -> None:
        self.copier = copier
        self.execute = execute
        self.streams = streams
        self.device = device
        self.workers = workers

    def submit(self, prepared: GatherPlan, before_step: Callable[[], None] | None,
               meanwhile: Callable[[], None]) -> tuple[Any, int]:
        """Queue ``prepared``; ``before_step`` is called before each step is queued (fault
        injection), ``meanwhile`` once on the calling thread (work that overlaps the
        workers'). Returns the plan's completion event and how many batched copies were
        queued. Raises ``StepFailed`` (its ``cause`` the error) after recording what was
        queued as the last plan's end."""
        import torch

        copier, execute = self.copier, self.execute
        dsts, srcs, sizes = copier.runs(prepared)
        # On the caller's stream, before the start event that every copy waits for.
        gpu_slots = to_device(prepared.gpu_slots, self.device)
        start = self.streams.start_events()
        steps = queue(copier, prepared)
        names = [stream_name(step) for step in steps]
        streams = [self.streams.stream(name) for name in names]
        for name, stream in dict(zip(names, streams, strict=True)).items():
            if not name.startswith(("d2d", "h2h")):  # where gpu_slots is read
                gpu_slots.record_stream(stream)
        deps = level_deps(steps)
        events: list[Any] = [None] * len(steps)

        def wait_events(stream: Any, i: int, wait: Callable[[Sequence[int]], None]) -> None:
            if not steps[i].level:
                for event in start:
                    stream.wait_event(event)
                return
            wait(deps[i])
            for j in deps[i]:
                stream.wait_event(events[j])

        def work(i: int, wait: Callable[[Sequence[int]], None]) -> None:
            step, stream = steps[i], streams[i]
            if before_step is not None:
                before_step()
            if not isinstance(step, GatherChunk):
                wait_events(stream, i, wait)
                execute(step.dsts, step.srcs, step.sizes, stream.cuda_stream)
            else:
                a, b = step.run_first, step.run_end
                if step.early:  # its DMA into staging waits only for the start
                    for event in start:
                        stream.wait_event(event)
                else:
                    wait_events(stream, i, wait)
                # NOTE: set_stream, not a stream context per chunk (~10 us each on the
                # H200 host); the caller's is restored after the last step.
                if step.flags == D2H:
                    torch.cuda.set_stream(stream)
                    copier.gather(step, gpu_slots)
                execute(dsts[a:b], srcs[a:b], sizes[a:b], stream.cuda_stream)
                if step.flags == H2D:
                    if step.early:
                        wait_events(stream, i, wait)
                    torch.cuda.set_stream(stream)
                    copier.scatter(step, gpu_slots)
            event = new_event()
            event.record(stream)
            events[i] = event

        try:
            with torch.cuda.device(self.device):
                caller = torch.cuda.current_stream(self.device)
                try:
                    if self.workers is not None:
                        self.workers.run(names, work, meanwhile)
                    else:
                        for i in range(len(steps)):
                            work(i, _no_wait)
                        meanwhile()
                finally:
                    torch.cuda.set_stream(caller)
        except Exception as exc:
            self.streams.last_done = self.streams.join(
                [e for e in events if e is not None] or start)
            raise StepFailed(exc) from exc
        last: dict[str, Any] = {}
        for name, event in zip(names, events, strict=True):
            last[name] = event
        done = self.streams.finish([self.streams.join(list(last.values()))])
        return done, len(steps)


class StepFailed(Exception):
    """A step of a staged plan raised ``cause``; what was queued is the last plan's end."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _no_wait(steps: Sequence[int]) -> None:
    del steps  # on one thread in queue order, every step waited for has run
