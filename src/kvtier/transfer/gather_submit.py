"""Queueing a staged plan (``dma_gather``) on CUDA streams: every chunk's gather, DMA and
scatter and every direct batch on the stream of its direction, each after the level
before in its group (extra ``torch``).

The caller's thread plans, launches the gathers and scatters and makes the streams wait;
the batched copies (the driver's ~0.5-1 us of CPU a DMA run) are posted to one thread per
stream (``StreamWorkers``), or made on the caller's thread where there are none. A posted
DMA records a raw event where another stream waits for it; the caller touches a stream
again only after the DMA it posted there has been queued, and an onboard's scatter waits
until then (it is queued when its stream is next needed, or at the end)::

    caller   [gather c0][post c0][post c1]            [gather c2][post c2][scatter c1] ...
    d2h.0              [DMA c0 ................][rec]
    h2d.0                        [DMA c1 .................]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvtier.transfer.dma_batch import CudartBatch, DmaBatch
from kvtier.transfer.dma_gather import D2H, H2D, DmaGatherCopier, GatherChunk, GatherPlan, queue
from kvtier.transfer.fused import to_device
from kvtier.transfer.torch_memory import new_event

if TYPE_CHECKING:
    from concurrent.futures import Future

    import torch

    from kvtier.transfer.copy_streams import CopyStreams
    from kvtier.transfer.stream_workers import StreamWorkers

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


class StepFailed(Exception):
    """A step of a staged plan raised ``cause``; what was queued is the last plan's end."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class GatherSubmitter:
    """Queues prepared staging plans of ``copier`` with ``runtime`` (the batched copy and
    raw events) on ``streams``; ``workers``: the threads the DMAs are posted to (``None``:
    made on the calling thread)."""

    def __init__(self, copier: DmaGatherCopier, runtime: CudartBatch, streams: CopyStreams,
                 device: torch.device, workers: StreamWorkers | None) -> None:
        self.copier = copier
        self.runtime = runtime
        self.streams = streams
        self.device = device
        self.workers = workers
        self._raw_events: list[int] = []

    def raw_event(self, index: int) -> int:
        """Raw event ``index`` of those the plans record, created at first use.

        NOTE: every plan reuses them: a stream's wait refers to the record before it, so
        recording an event again never releases an earlier wait."""
        events = self._raw_events
        while len(events) <= index:
            events.append(self.runtime.new_event())
        return events[index]

    def submit(self, prepared: GatherPlan, before_step: Callable[[], None] | None,
               meanwhile: Callable[[], None]) -> tuple[Any, int]:
        """Queue ``prepared``; ``before_step`` is called before each step is queued (fault
        injection), ``meanwhile`` once after the last DMA was posted (work that overlaps
        the workers'). Returns the plan's completion event and how many batched copies
        were queued. Raises ``StepFailed`` after recording what was queued as the last
        plan's end."""
        import torch

        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            q = _Queue(self, prepared, self.workers is not None)
            # NOTE: recorded after the queue uploaded its GPU slot index on the caller's
            # stream: every copy waits for the upload too. Recorded before it (as it was),
            # a gather or scatter could read the index before it had arrived whenever the
            # caller's stream ran behind (a busy GPU): garbage slots, an index assertion.
            start = q.start = self.streams.start_events()
            try:
                for i in range(len(q.steps)):
                    if before_step is not None:
                        before_step()
                    q.step(i)
                meanwhile()
                q.settle_all()
            except Exception as exc:
                q.drain()
                self.streams.last_done = self.streams.join(q.record_all() or start)
                raise StepFailed(exc) from exc
            finally:
                torch.cuda.set_stream(caller)
            done = self.streams.finish([self.streams.join(q.record_all())])
        return done, len(q.steps)


class _Queue:
    """One plan being queued (see the module docstring): per step its stream, the raw
    event a posted DMA records, the future of the last DMA posted on each stream and the
    onboard whose scatter waits for it."""

    def __init__(self, submitter: GatherSubmitter, prepared: GatherPlan, threaded: bool
                 ) -> None:
        import torch

        self.sub = submitter
        self.copier = submitter.copier
        self.runtime = submitter.runtime
        self.threaded = threaded
        self.start: list[Any] = []  # the plan's start events: set once the slots are up
        self.steps = queue(self.copier, prepared)
        self.names = [stream_name(step) for step in self.steps]
        self.streams = {name: submitter.streams.stream(name) for name in self.names}
        self.deps = level_deps(self.steps)
        self.dsts, self.srcs, self.sizes = self.copier.runs(prepared)
        # On the caller's stream, before the start event that every copy waits for.
        self.gpu_slots = to_device(prepared.gpu_slots, submitter.device)
        for name, stream in self.streams.items():
            if self.gpu_slots.is_cuda and not name.startswith(("d2d", "h2h")):
                self.gpu_slots.record_stream(stream)  # where gpu_slots is read
        self.done: list[tuple[bool, Any] | None] = [None] * len(self.steps)  # (raw?, event)
        self.posted: dict[str, Future[None]] = {}
        self.scatter_due: dict[str, int] = {}
        self.num_raw = 0
        self._set_stream = torch.cuda.set_stream

    def step(self, i: int) -> None:
        """Queue step ``i`` (queue order)."""
        step, name = self.steps[i], self.names[i]
        stream = self.streams[name]
        self.settle(name)
        if isinstance(step, GatherChunk) and step.early:
            self.wait_start(stream)
        else:
            self.wait_deps(stream, i)
        if isinstance(step, GatherChunk):
            a, b = step.run_first, step.run_end
            dma = (self.dsts[a:b], self.srcs[a:b], self.sizes[a:b])
            if step.flags == D2H:
                self._set_stream(stream)
                self.copier.gather(step, self.gpu_slots)
        else:
            dma = (step.dsts, step.srcs, step.sizes)
        # An onboard chunk's scatter follows its DMA on the stream: no event needed.
        recorded = None if isinstance(step, GatherChunk) and step.flags == H2D \
            else self.raw_event()
        self.post(name, stream.cuda_stream, dma, recorded)
        if recorded is not None:
            self.done[i] = (True, recorded)
        else:
            self.scatter_due[name] = i

    def post(self, name: str, handle: int, dma: tuple[Any, Any, Any], event: int | None
             ) -> None:
        """The DMA ``dma`` on stream ``name`` (``handle``), then ``event`` recorded there:
        posted to the stream's worker, or made now."""
        runtime = self.runtime

        def call() -> None:
            runtime(*dma, handle)
            if event is not None:
                runtime.record_event(event, handle)

        if self.threaded:
            assert self.sub.workers is not None
            self.posted[name] = self.sub.workers.post(name, call)
        else:
            call()

    def settle(self, name: str) -> None:
        """Make stream ``name`` the caller's again: the DMA posted there has been queued,
        and the scatter that followed it too."""
        future = self.posted.pop(name, None)
        if future is not None:
            future.result()
        i = self.scatter_due.pop(name, None)
        if i is not None:
            step, stream = self.steps[i], self.streams[name]
            assert isinstance(step, GatherChunk)
            if step.early:  # its DMA waited only for the start; the scatter waits here
                self.wait_deps(stream, i)
            self._set_stream(stream)
            self.copier.scatter(step, self.gpu_slots)
            event = new_event()
            event.record(stream)
            self.done[i] = (False, event)

    def settle_all(self) -> None:
        for name in list(self.streams):
            self.settle(name)

    def wait_start(self, stream: Any) -> None:
        for event in self.start:
            stream.wait_event(event)

    def wait_deps(self, stream: Any, i: int) -> None:
        """Make ``stream`` wait for step ``i``'s deps (the start at level 0), each queued
        first: a posted DMA until it has been, a due scatter queued now."""
        if not self.steps[i].level:
            self.wait_start(stream)
            return
        for j in self.deps[i]:
            if self.done[j] is None:
                self.settle(self.names[j])
            done = self.done[j]
            assert done is not None, f"step {j} ran without an event"
            raw, event = done
            if raw:
                future = self.posted.get(self.names[j])
                if future is not None:
                    future.result()
                self.runtime.wait_event(stream.cuda_stream, event)
            else:
                stream.wait_event(event)

    def raw_event(self) -> int:
        """The plan's next raw event."""
        self.num_raw += 1
        return self.sub.raw_event(self.num_raw - 1)

    def drain(self) -> None:
        """After a failure: wait until no posted DMA is still being made."""
        for future in self.posted.values():
            future.exception()
        self.posted.clear()

    def record_all(self) -> list[Any]:
        """One event on each stream the plan used, recorded now: after all it queued."""
        events = []
        for stream in self.streams.values():
            event = new_event()
            event.record(stream)
            events.append(event)
        return events
