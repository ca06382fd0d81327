"""The ``kvtier`` command's entry point: the CLI imported inside the command's Ctrl-C handling.

Importing the CLI takes a few hundred milliseconds (the simulator, the scheduler, argparse);
a Ctrl-C then used to print the import's traceback. Here it ends the command as one during
a run does: ``kvtier: interrupted`` on stderr, exit status 130. ``kvtier``'s package
``__init__`` imports nothing eagerly, so this module is the first thing the command runs.

A SIGTERM (``kill``, a container stopping, a job scheduler's time limit) unwinds the command
the same way: ``kvtier: terminated``, status 143. It ended the process where it stood, with
no word on stderr, the ``finally`` blocks not run (a remote store's accepted writes not
flushed, the progress bar left on the terminal). A second SIGTERM ends it at once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TextIO

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised in the main thread where the command stands.

    NOTE: a KeyboardInterrupt, so it unwinds as a Ctrl-C does: no ``except Exception``
    (nor a library's cleanup that spares KeyboardInterrupt) takes it for a fault."""


def tell(line: str) -> None:
    """Write the command's one ``line`` to standard error, if it can take it.

    NOTE: with stderr closed (``2>&-``), ``print(file=sys.stderr)`` printed to stdout, into
    the report; with it full (``2>/dev/full``), the OSError of the refusal's own line went
    out of ``main`` as a traceback, status 1. The exit status says what happened. The line
    is :func:`~kvtier.reprs.printable`: a file name or a library's words holding escape
    sequences do not drive the terminal."""
    from kvtier.reprs import printable  # NOTE: here, so the launcher imports no module

    stream = sys.stderr
    if stream is None:
        return
    line = printable(line, getattr(stream, "encoding", None), is_terminal(stream))
    with contextlib.suppress(OSError, ValueError):  # full, broken, or closed under us
        print(line, file=stream)


def is_terminal(stream: TextIO | None) -> bool:
    """Whether ``stream`` is open on a terminal. Pure."""
    try:
        return stream is not None and bool(stream.isatty())
    except (OSError, ValueError, AttributeError):  # closed, or no isatty
        return False


def interrupted(exc: BaseException | None = None) -> int:
    """The command's answer to a Ctrl-C or a SIGTERM (``exc`` a :class:`Terminated`),
    wherever it came (here or in :func:`kvtier.cli.main`): one line on stderr; returns the
    exit status."""
    if isinstance(exc, Terminated):
        tell("kvtier: terminated")
        return EXIT_TERMINATED
    tell("kvtier: interrupted")
    return EXIT_INTERRUPTED


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process at once
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run :func:`kvtier.cli.main` on ``argv``, a Ctrl-C or a SIGTERM at any point (the
    CLI's import, its argument parsing, the run) ending in one line and status 130 or 143.
    A SIGTERM that its parent set to be ignored stays ignored."""
    catch = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if catch:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        from kvtier.cli import main as run

        return run(argv)
    except KeyboardInterrupt as exc:
        return interrupted(exc)
    finally:
        if catch:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
