"""GatherSubmitter on a simulated device (CPU tensors): every launch, DMA, event record and
stream wait it issues is queued on its stream, from the caller's thread or a DMA thread,
and the device then runs them in a random order that stream order and event waits allow.
The result must be exactly the in-order one, with DMAs made on threads or not."""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the data-plane tests need torch: "
                                            "pip install 'kvtier[torch]'")

from data_plane.in_order import assert_matches, in_order  # noqa: E402
from data_plane.test_dma_gather import NUM_BLOCKS, NUM_LAYERS, make_copier  # noqa: E402
from kvtier.transfer import gather_submit  # noqa: E402
from kvtier.transfer.dma_batch import memmove_batch  # noqa: E402
from kvtier.transfer.dma_gather import DmaGatherCopier  # noqa: E402
from kvtier.transfer.gather_submit import GatherSubmitter, StepFailed  # noqa: E402
from kvtier.transfer.plan import TransferPlan  # noqa: E402
from kvtier.transfer.stream_workers import StreamWorkers  # noqa: E402
from plan_ops import offload, onboard, random_ops  # noqa: E402

Record = tuple[int, int]  # (event, how many records of it came before): what a wait means


class Device:
    """Streams as queues of operations, run later in any order the waits allow."""

    def __init__(self) -> None:
        self.queues: dict[int, list[tuple[str, Any]]] = {}
        self.num_records: dict[int, int] = {}
        self.done: set[Record] = set()  # the records run so far
        self.lock = threading.Lock()
        self.current = 0

    def add(self, stream: int, op: str, arg: Any) -> None:
        with self.lock:
            self.queues.setdefault(stream, []).append((op, arg))

    def record(self, event: int, stream: int) -> None:
        with self.lock:
            n = self.num_records.get(event, 0)
            self.num_records[event] = n + 1
        self.add(stream, "record", (event, n))

    def wait(self, stream: int, event: int) -> None:
        with self.lock:
            n = self.num_records.get(event)
        if n is not None:  # waiting for an event never recorded waits for nothing
            self.add(stream, "wait", (event, n - 1))

    def run(self, rng: random.Random) -> None:
        done = self.done
        while any(self.queues.values()):
            ready = [q for q in self.queues.values()
                     if q and (q[0][0] != "wait" or q[0][1] in done)]
            assert ready, "the streams wait for each other: deadlock"
            op, arg = rng.choice(ready).pop(0)
            if op == "record":
                done.add(arg)
            elif op == "call":
                arg()


class Event:
    ids = iter(range(10_000, 10**9))

    def __init__(self, device: Device) -> None:
        self.device = device
        self.id = next(Event.ids)

    def record(self, stream: Stream) -> None:
        self.device.record(self.id, stream.cuda_stream)


class Stream:
    def __init__(self, device: Device, handle: int) -> None:
        self.device = device
        self.cuda_stream = handle

    def wait_event(self, event: Event) -> None:
        self.device.wait(self.cuda_stream, event.id)


class Streams:
    """CopyStreams on the simulated device."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.last_done: Event | None = None
        self._streams: dict[str, Stream] = {}

    def stream(self, name: str) -> Stream:
        if name not in self._streams:
            self._streams[name] = Stream(self.device, len(self._streams) + 1)
        return self._streams[name]

    def start_events(self) -> list[Event]:
        """The caller's stream now (stream 0), and the plan before, as ``CopyStreams``."""
        start = Event(self.device)
        start.record(Stream(self.device, 0))
        return [start] if self.last_done is None else [start, self.last_done]

    def join(self, deps: list[Event]) -> Event:
        stream = self.stream("join")
        for event in deps:
            stream.wait_event(event)
        joined = Event(self.device)
        joined.record(stream)
        return joined

    def finish(self, events: list[Event]) -> Event:
        self.last_done = self.join(events)
        return self.last_done


class Runtime:
    """CudartBatch on the simulated device; ``fail_at``: the DMA (counted from 1) that
    raises."""

    def __init__(self, device: Device, fail_at: int | None = None) -> None:
        self.device = device
        self.fail_at = fail_at
        self.num_dmas = 0
        self.events = iter(range(1, 10_000))

    def __call__(self, dsts: Any, srcs: Any, sizes: Any, stream: int) -> None:
        self.num_dmas += 1
        if self.num_dmas == self.fail_at:
            raise RuntimeError("injected DMA failure")
        self.device.add(stream, "call", lambda: memmove_batch(dsts, srcs, sizes, stream))

    def new_event(self) -> int:
        return next(self.events)

    def record_event(self, event: int, stream: int) -> None:
        self.device.record(event, stream)

    def wait_event(self, stream: int, event: int) -> None:
        self.device.wait(stream, event)


def make_submitter(monkeypatch: pytest.MonkeyPatch, copier: DmaGatherCopier, streams: Streams,
                   runtime: Runtime, threaded: bool) -> GatherSubmitter:
    """A submitter whose streams, events, runtime and launches are the simulated device's."""
    device = streams.device

    def set_stream(stream: Stream) -> None:
        device.current = stream.cuda_stream

    def queued(launch: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        def launch_later(chunk: Any, slots: Any) -> None:
            device.add(device.current, "call", lambda: launch(chunk, slots))
        return launch_later

    @contextlib.contextmanager
    def on_device(_: object) -> Iterator[None]:
        yield

    monkeypatch.setattr(torch.cuda, "device", on_device)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda _: Stream(device, 0))
    monkeypatch.setattr(torch.cuda, "set_stream", set_stream)
    def to_device_later(a: Any, target: Any) -> Any:
        # An upload is queued on the current stream, as a non-blocking copy is: until the
        # stream runs it, the tensor holds slots no tier has (a read then fails the test).
        values = torch.as_tensor(a).clone()
        uploaded = torch.full_like(values, -(1 << 40))
        device.add(device.current, "call", lambda: uploaded.copy_(values))
        return uploaded

    monkeypatch.setattr(gather_submit, "new_event", lambda: Event(device))
    monkeypatch.setattr(gather_submit, "to_device", to_device_later)
    monkeypatch.setattr(copier, "gather", queued(copier.gather))
    monkeypatch.setattr(copier, "scatter", queued(copier.scatter))
    return GatherSubmitter(copier, runtime, streams,  # type: ignore[arg-type]
                           torch.device("cpu"), StreamWorkers() if threaded else None)


@pytest.mark.parametrize("threaded", [True, False], ids=["dma-threads", "caller"])
def test_random_plans_queued_and_run_in_any_allowed_order_match_in_order(
        monkeypatch: pytest.MonkeyPatch, threaded: bool) -> None:
    """Random plans (hazards, partial copies, runs of host slots, a step's offloads and
    onboards into the freed slots) in buffers of three blocks, one after another: queued
    by the submitter, run by the device in a random allowed order, exactly in order."""
    storages, copier = make_copier("layer_major", capacity=3, spanned=True)
    device = Device()
    submitter = make_submitter(monkeypatch, copier, Streams(device), Runtime(device), threaded)
    rng = random.Random(f"submit{threaded}")
    for trial in range(30):
        if trial % 3 == 2:  # a step: victims out into a run, then onboards into their slots
            victims = rng.sample(range(12), 4)
            ops = [offload(g, 5 + i) for i, g in enumerate(victims)]
            ops += [onboard(rng.choice([0, 1, 2, 3, 4]), g) for g in victims[:3]]
        else:
            ops = random_ops(rng, 24)
        expected = in_order(storages, ops, NUM_LAYERS)
        plan = copier.prepare(TransferPlan(tuple(ops)), NUM_BLOCKS)
        counted: list[str] = []

        def count(counted: list[str] = counted) -> None:
            counted.append("stats")
        submitter.submit(plan, None, count)
        assert counted == ["stats"]
        device.run(rng)
        assert_matches(storages, expected, (trial, ops))


@pytest.mark.parametrize("threaded", [True, False], ids=["dma-threads", "caller"])
def test_a_failing_dma_fails_the_plan_and_the_next_plan_starts_after_it(
        monkeypatch: pytest.MonkeyPatch, threaded: bool) -> None:
    """The third DMA raises (on its thread or the caller's): StepFailed with its error,
    nothing left posted, and the next plan waits for what the failed one queued."""
    storages, copier = make_copier("block_major", capacity=2)
    device = Device()
    runtime = Runtime(device, fail_at=3)
    streams = Streams(device)
    submitter = make_submitter(monkeypatch, copier, streams, runtime, threaded)
    ops = [offload(g, 2 + g) for g in range(6)] + [onboard(9, 0), onboard(8, 1)]
    with pytest.raises(StepFailed, match="injected DMA failure"):
        submitter.submit(copier.prepare(TransferPlan(tuple(ops)), NUM_BLOCKS), None,
                         lambda: None)
    failed_end = streams.last_done
    assert failed_end is not None
    runtime.fail_at = None
    expected = in_order(storages, ops, NUM_LAYERS)
    before = {stream: len(q) for stream, q in device.queues.items()}
    submitter.submit(copier.prepare(TransferPlan(tuple(ops)), NUM_BLOCKS), None, lambda: None)
    join = streams.stream("join").cuda_stream
    # The copy streams (not the caller's, stream 0, nor the join's): each starts by waiting
    # for the caller's stream and for the failed plan's end.
    used = {s: q[before.get(s, 0):] for s, q in device.queues.items() if s not in (join, 0)}
    for q in used.values():
        waits = list(itertools.takewhile(lambda op: op[0] == "wait", q))
        assert q and ("wait", (failed_end.id, 0)) in waits, q[:3]
    assert sum(map(len, used.values())) > 10
    device.run(random.Random(0))
    assert_matches(storages, expected, ops)
