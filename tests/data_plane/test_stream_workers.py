"""StreamWorkers: calls posted to one thread per stream, in posting order per stream, their
errors raised by their futures. And the staging path's stream names and level
dependencies."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from kvtier.transfer.dma_batch import DmaBatch
from kvtier.transfer.dma_gather import D2H, H2D, GatherChunk
from kvtier.transfer.gather_submit import level_deps, stream_name
from kvtier.transfer.stream_workers import StreamWorkers


def test_calls_of_a_stream_run_in_posting_order_on_its_own_thread() -> None:
    """Calls posted to 3 streams (sleeps shuffle the threads) run each on its stream's
    thread, in posting order per stream; a future says when its call has run."""
    rng = random.Random(7)
    workers = StreamWorkers()
    ran: list[tuple[str, int, str]] = []
    futures = []
    for i in range(60):
        name = rng.choice(["d2h", "h2d", "h2d.1"])

        def call(name: str = name, i: int = i) -> None:
            time.sleep(rng.random() * 1e-4)
            ran.append((name, i, threading.current_thread().name))
        futures.append(workers.post(name, call))
    for future in futures:
        future.result()
    assert len(ran) == 60
    for name in ("d2h", "h2d", "h2d.1"):
        mine = [(i, thread) for n, i, thread in ran if n == name]
        assert [i for i, _ in mine] == sorted(i for i, _ in mine)
        assert len({thread for _, thread in mine}) == 1
        assert f"kvtier-{name}" in mine[0][1]
    assert threading.current_thread().name not in {thread for _, _, thread in ran}
    workers.shutdown()


def test_a_failing_call_raises_from_its_future_and_its_stream_goes_on() -> None:
    """A call that raises: its future raises the error; the next call on that stream
    runs; ``init`` ran once in the thread."""
    inits: list[str] = []
    workers = StreamWorkers(lambda: inits.append(threading.current_thread().name))

    def fail() -> None:
        raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected failure"):
        workers.post("d2h", fail).result()
    ran: list[int] = []
    workers.post("d2h", lambda: ran.append(1)).result()
    assert ran == [1] and len(inits) == 1


def chunk(group: int, level: int, flags: int, stream: int) -> GatherChunk:
    return GatherChunk(group, level, flags, stream, flags == H2D, 0, 0, 0, 0)


def test_steps_wait_for_their_groups_level_before_on_their_directions_stream() -> None:
    """A step's queue: offload chunks of groups 0 and 1 (level 0), then their onboards
    (level 1) and a direct batch of group 1 at level 1; each level-1 step waits for its
    own group's level-0 steps only, and each goes on its direction's stream (the second
    buffer's as ``.1``)::

        0 g0 L0 d2h   1 g0 L0 d2h.1   2 g1 L0 d2h   3 g0 L1 h2d  <- 0, 1
        4 g1 L1 h2d.1 <- 2            5 g1 L1 batch d2h <- 2
    """
    empty = np.zeros(0, dtype=np.uint64)
    steps: list[GatherChunk | DmaBatch] = [
        chunk(0, 0, D2H, 0), chunk(0, 0, D2H, 1), chunk(1, 0, D2H, 0),
        chunk(0, 1, H2D, 0), chunk(1, 1, H2D, 1), DmaBatch(1, 1, D2H, empty, empty, empty)]
    assert level_deps(steps) == [[], [], [], [0, 1], [2], [2]]
    assert [stream_name(s) for s in steps] == ["d2h", "d2h.1", "d2h", "h2d", "h2d.1", "d2h"]
