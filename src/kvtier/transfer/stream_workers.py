"""Driver calls posted to one thread per stream, so that they run while the caller's thread
goes on launching and planning (pure Python; the threads of the standard library).

Why: on the staging path (``dma_gather``) the CUDA runtime's batched copy costs the CPU
~0.5-1 us a DMA run, and a plan of 64 KiB blocks at random host slots has one run a block:
on the caller's thread the driver alone took as long as the copy (benchmarks/results/
transfer.md). A ctypes call releases the GIL, so a call posted here runs beside the
caller's Python. NOTE: measured on an H200 host, the driver's batched copies from 2 or 4
threads at once took 0.46-0.54 us of wall time a copy (each thread 0.75-1.5 us a copy:
the calls serialize in the driver), and the caller has little left to do once a plan is
cut, so posting saved CPU only for plans of ~25,000 single 16 KiB blocks (-15 %) and cost
up to 75 % more elsewhere: the engine leaves it off unless asked (``submit_threads``).

Only calls that hold the GIL for microseconds belong here (ctypes calls and the slicing
around them): a worker that ran Python or torch launches would take turns with the
caller's thread for the GIL, which cost ~150 us a chunk in a first version that queued
whole chunks (gathers and scatters too) from four threads.

Order: the calls posted for one stream run one after another in posting order, on that
stream's thread; the caller orders them against its own work on the stream by waiting for
the future of the last call it posted there (``Future.result``, which raises the call's
error).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class StreamWorkers:
    """One worker thread per stream name, created on first use and kept (``init`` runs
    once in each new thread: a CUDA engine selects its device there)."""

    def __init__(self, init: Callable[[], None] | None = None) -> None:
        self._init = init
        self._pools: dict[str, ThreadPoolExecutor] = {}

    def post(self, name: str, call: Callable[[], None]) -> Future[None]:
        """Run ``call`` on the thread of stream ``name``, after every call posted there
        before; its future says when it has run (and raises its error)."""
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = ThreadPoolExecutor(
                1, thread_name_prefix=f"kvtier-{name}",
                initializer=self._init if self._init is not None else _no_init)
        return pool.submit(call)

    def shutdown(self) -> None:
        """Stop the threads after the calls posted so far (they also end at exit)."""
        for pool in self._pools.values():
            pool.shutdown()
        self._pools.clear()


def _no_init() -> None:
    pass
