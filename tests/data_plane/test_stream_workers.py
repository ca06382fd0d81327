"""StreamWorkers: steps issued from one thread per stream, in list order per stream, each
after the steps it waits for; a failing step stops every worker without a deadlock. And
the staging path's stream names and level dependencies."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from kvtier.transfer.dma_batch import DmaBatch
from kvtier.transfer.dma_gather import D2H, H2D, GatherChunk
from kvtier.transfer.gather_submit import level_deps, stream_name
from kvtier.transfer.stream_workers import StreamWorkers


def run_with_deadline(workers: StreamWorkers, streams: Sequence[str],
                      work: Callable[[int, Callable[[Sequence[int]], None]], None],
                      ) -> BaseException | None:
    """``workers.run`` on a thread of its own, which must end within 10 s; its error."""
    caught: list[BaseException] = []

    def call() -> None:
        try:
            workers.run(streams, work)
        except BaseException as exc:  # handed to the test
            caught.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "run did not return: a worker is stuck"
    return caught[0] if caught else None


def test_random_steps_run_in_stream_order_after_what_they_wait_for() -> None:
    """60 steps on 4 streams, each waiting for up to 3 earlier steps (with sleeps that
    shuffle the threads): every step runs once, on its stream's thread, in list order per
    stream, and after every step it waited for."""
    rng = random.Random(7)
    workers = StreamWorkers()
    for _ in range(5):
        streams = [rng.choice(["d2h", "d2h.1", "h2d", "h2d.1"]) for _ in range(60)]
        deps = [rng.sample(range(i), min(i, rng.randint(0, 3))) for i in range(60)]
        ran: list[int] = []
        threads: dict[int, str] = {}
        lock = threading.Lock()

        def work(i: int, wait: Callable[[Sequence[int]], None],
                 deps: list[list[int]] = deps, ran: list[int] = ran,
                 threads: dict[int, str] = threads, lock: threading.Lock = lock) -> None:
            time.sleep(rng.random() * 1e-4)
            wait(deps[i])
            with lock:
                assert set(deps[i]) <= set(ran), f"step {i} ran before {deps[i]}"
                ran.append(i)
                threads[i] = threading.current_thread().name

        assert run_with_deadline(workers, streams, work) is None
        assert sorted(ran) == list(range(60))
        for name in set(streams):
            mine = [i for i in ran if streams[i] == name]
            assert mine == sorted(mine)
            assert {threads[i] for i in mine} == {threads[mine[0]]}
            assert name in threads[mine[0]]
    workers.shutdown()


def test_a_failing_step_stops_every_worker_and_its_error_is_raised() -> None:
    """Step 2 (stream b) raises: the steps after it on b never run, step 3 (stream a)
    waits for it and stops there, step 4 (a, after 3) never runs; run raises step 2's
    error, and the workers serve the next run."""
    workers = StreamWorkers()
    streams = ["a", "b", "b", "a", "a", "b"]
    waits = {3: [2], 4: [3]}
    ran: list[int] = []

    def work(i: int, wait: Callable[[Sequence[int]], None]) -> None:
        wait(waits.get(i, []))
        if i == 2:
            raise RuntimeError("injected failure of step 2")
        ran.append(i)

    error = run_with_deadline(workers, streams, work)
    assert isinstance(error, RuntimeError) and str(error) == "injected failure of step 2"
    assert sorted(ran) == [0, 1]
    ran.clear()
    waits.clear()
    assert run_with_deadline(workers, ["a", "b"], lambda i, wait: ran.append(i)) is None
    assert sorted(ran) == [0, 1]


def test_meanwhile_runs_on_the_calling_thread_while_the_workers_do() -> None:
    """``meanwhile`` runs on the caller's thread, and ``run`` returns only after every
    step (one that sleeps longer than ``meanwhile``) has run."""
    workers = StreamWorkers()
    seen: list[str] = []

    def slow(i: int, wait: Callable[[Sequence[int]], None]) -> None:
        time.sleep(0.02)
        seen.append(f"step {i}")

    workers.run(["a"], slow, lambda: seen.append(threading.current_thread().name))
    assert seen == [threading.current_thread().name, "step 0"]


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


@pytest.mark.parametrize("num_steps", [0, 1])
def test_an_empty_or_single_run_returns(num_steps: int) -> None:
    """No steps, or one: run returns after running them."""
    ran: list[int] = []
    StreamWorkers().run(["a"] * num_steps, lambda i, wait: ran.append(i))
    assert ran == list(range(num_steps))
