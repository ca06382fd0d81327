"""Queued work issued from one thread per stream, so that driver calls of different streams
run side by side while Python plans or launches elsewhere (pure Python; the threads of
the standard library).

Why: on the staging path (``dma_gather``) the CUDA runtime's batched copy costs the CPU
~0.5 us a DMA run, and a plan of 64 KiB blocks at random host slots has one run a block:
on one thread the driver alone takes ~0.7 of the copy's time (benchmarks/results/
transfer.md). A ctypes call releases the GIL, so the runs of four streams go to the
driver from four threads at once, while the GIL is held only for the short launches
around them.

Order: step ``i`` runs on the worker of ``streams[i]``; each worker runs its steps in list
order (stream order on the device follows), and a step that needs another stream's event
calls ``wait`` on the steps that record it, which blocks until they have run. The list is
in queue order and a step waits only for earlier ones, so the earliest step not yet run
can always run: no cycle, no deadlock::

    d2h.0  [s0 gather+DMA][s2 gather+DMA]
    h2d.0     [s1 DMA .. wait(s0) .. scatter][s3 DMA .. wait(s2) .. scatter]

A step that raises stops its worker; every waiter wakes and stops too (``StepsAborted``),
and ``run`` raises the first error once every worker has stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

# work(step, wait): issue step ``step``; ``wait(steps)`` blocks until those have run.
Work = Callable[[int, Callable[[Sequence[int]], None]], None]


class StepsAborted(Exception):
    """A step waited for one that did not run (another step raised first)."""


class StreamWorkers:
    """One worker thread per stream name, created on first use and kept (``init`` runs
    once in each new thread: a CUDA engine selects its device there). Not reentrant: one
    ``run`` at a time."""

    def __init__(self, init: Callable[[], None] | None = None) -> None:
        self._init = init
        self._pools: dict[str, ThreadPoolExecutor] = {}

    def run(self, streams: Sequence[str], work: Work,
            meanwhile: Callable[[], None] | None = None) -> None:
        """Run ``work(i, wait)`` for every step ``i`` on the worker of ``streams[i]`` (see
        the module docstring); ``meanwhile`` runs on the calling thread while they do.
        Returns when every worker has stopped; raises the first error a step raised."""
        ran = [threading.Event() for _ in streams]
        failed = threading.Event()

        def wait(steps: Sequence[int]) -> None:
            for j in steps:
                ran[j].wait()
            if failed.is_set():
                raise StepsAborted

        def worker(mine: list[int]) -> None:
            try:
                for i in mine:
                    if failed.is_set():
                        return
                    work(i, wait)
                    ran[i].set()
            except BaseException:
                failed.set()
                for event in ran:  # wake every waiter: it stops at its next check
                    event.set()
                raise

        per_stream: dict[str, list[int]] = {}
        for i, name in enumerate(streams):
            per_stream.setdefault(name, []).append(i)
        futures: list[Future[None]] = [self._pool(name).submit(worker, mine)
                                       for name, mine in per_stream.items()]
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            errors = [f.exception() for f in futures]  # waits for every worker
        first = next((e for e in errors if e is not None and not isinstance(e, StepsAborted)),
                     None)
        if first is not None:
            raise first
        assert not any(errors), "a step was aborted though none failed"

    def _pool(self, name: str) -> ThreadPoolExecutor:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = ThreadPoolExecutor(
                1, thread_name_prefix=f"kvtier-{name}",
                initializer=self._init if self._init is not None else _no_init)
        return pool

    def shutdown(self) -> None:
        """Stop the threads (they end by themselves at exit)."""
        for pool in self._pools.values():
            pool.shutdown()
        self._pools.clear()


def _no_init() -> None:
    pass
