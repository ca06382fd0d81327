"""The remote store's background I/O: one daemon thread running queued jobs in order."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

Job = Callable[[], object]


class IOThread:
    """One daemon thread running queued jobs in order; at most ``maxsize`` wait at once."""

    def __init__(self, maxsize: int, on_error: Callable[[BaseException], None]) -> None:
        self._jobs: deque[Job] = deque()
        self._maxsize = maxsize
        self._on_error = on_error
        self._cond = threading.Condition()
        self._num_running = 0
        self._stopping = False
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="kvtier-remote-io", daemon=True)
        thread.start()
        return thread

    def _revive(self) -> None:
        """(Under the condition.) Start the thread again where it is found dead while not
        stopping: this process is a fork of the one that started it (no thread but the
        forking one carries over). What is queued runs; a job it was running then is lost.

        NOTE: in a forked engine every job was accepted and never run: each fetch held its
        request to the deadline and found nothing, each background write was lost without
        ``on_lost`` (the tier skipped those blocks as written for good), and a flush
        without a timeout waited for ever."""
        if not self._stopping and not self._thread.is_alive():
            self._num_running = 0
            self._thread = self._start()

    def submit(self, job: Job) -> bool:
        with self._cond:
            if self._stopping or len(self._jobs) >= self._maxsize:
                return False
            self._revive()
            self._jobs.append(job)
            self._cond.notify_all()
        return True

    def wait_idle(self, timeout: float | None) -> bool:
        with self._cond:
            self._revive()
            return self._cond.wait_for(lambda: not self._jobs and not self._num_running, timeout)

    def stop(self) -> None:
        """Run what is queued, then end the thread (joined unless called from it)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._stopping)
                if not self._jobs:
                    return  # stopping, and every accepted job has run
                job = self._jobs.popleft()
                self._num_running = 1
            try:
                job()
            # NOTE: a caller's callback must not kill the I/O thread, whatever it raises: one
            # raising SystemExit (a BaseException) ended the thread, every later job was
            # accepted and never run, and flush() without a timeout waited for ever.
            except BaseException as exc:
                self._on_error(exc)
            with self._cond:
                self._num_running = 0
                self._cond.notify_all()
