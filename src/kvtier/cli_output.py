"""The ``kvtier`` command's output: standard output, whose failures are the user's to fix (a
full disk, a file too large for its limit, a closed descriptor), told apart from kvtier's own
defects; and the progress bar on standard error.

An ``OSError`` from a ``print`` was reported as an internal error (status 70, "a defect in
kvtier"); one at the interpreter's final flush as a traceback-like "Exception ignored" line
and status 120; argparse swallowed it (``--help > /dev/full``: status 0, nothing written); a
closed standard output (``kvtier replay >&-``) dropped the report without a word, status 0.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO, TypeVar

from kvtier.cli_error import CLIError
from kvtier.launcher import is_terminal
from kvtier.reprs import printable, shown

T = TypeVar("T")


class OutputFailed(Exception):
    """Standard output cannot be written; the message says why, in one sentence.

    NOTE: not an OSError, which argparse's ``--help`` and ``--version`` swallow."""


class _CheckedOutput:
    """``sys.stdout`` while a command runs, the one writer of every command's output: text
    is written as the stream can take it (:func:`~kvtier.reprs.printable`: what its
    encoding cannot hold, and on a terminal control characters, as backslash escapes); a
    write or flush that fails raises :class:`OutputFailed`; a reader that left
    (``BrokenPipeError``) is let through, for the command's quiet exit."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self._encoding: str | None = getattr(stream, "encoding", None)
        self._errors: str | None = getattr(stream, "errors", None)
        self._terminal = is_terminal(stream)

    def write(self, text: str) -> int:
        text = printable(text, self._encoding, self._terminal, self._errors)
        return self._checked(lambda stream: stream.write(text))

    def flush(self) -> None:
        self._checked(lambda stream: stream.flush())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _checked(self, call: Callable[[TextIO], T]) -> T:
        if self._stream is None:  # the interpreter found descriptor 1 closed
            raise OutputFailed(os.strerror(errno.EBADF) + " (standard output is closed)")
        try:
            return call(self._stream)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputFailed(exc.strerror or str(exc)) from None


@contextmanager
def checked_stdout() -> Iterator[None]:
    """Run the body with ``sys.stdout`` checked: every write of the command, and a final
    flush (a write still in the buffer fails here, not at the interpreter's exit), raises
    :class:`OutputFailed` if standard output cannot take it."""
    stream = sys.stdout
    checked = _CheckedOutput(stream)
    sys.stdout = checked
    try:
        yield
        checked.flush()
    finally:
        if sys.stdout is checked:
            sys.stdout = stream


def discard_stdout() -> None:
    """Point descriptor 1 at /dev/null, so the interpreter's final flush of what could not
    be written (a reader gone, a full disk) does not fail again at exit."""
    stream = sys.stdout
    try:
        fd = stream.fileno() if stream is not None else None
    except (OSError, ValueError, AttributeError):  # a StringIO in tests: nothing to flush
        fd = None
    if fd is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


@contextmanager
def progress_bar(total: int | None, enabled: bool) -> Iterator[Callable[[int], object] | None]:
    """A tqdm bar's ``update`` on stderr; ``None`` when disabled or tqdm is not installed.
    :class:`CLIError` naming the ``TQDM_*`` settings if the bar fails on them.

    NOTE: tqdm takes a default for any of its arguments from ``TQDM_<NAME>`` in the
    environment, unchecked: ``TQDM_MININTERVAL=abc`` raised ValueError (from the import),
    ``TQDM_ASCII=5`` ZeroDivisionError and ``TQDM_BAR_FORMAT={x}`` KeyError from the bar,
    all status 70. A bar that standard error cannot take (closed, full) stops drawing, and
    the last redraw's fault at the end is ignored: the run's outcome stands."""
    if not enabled or sys.stderr is None:  # stderr closed: nowhere to draw
        yield None
        return
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="req", file=sys.stderr, leave=False, dynamic_ncols=True)
    except ImportError:
        yield None
        return
    except OSError:  # stderr refuses the first drawing (full, broken): the run goes on
        yield None
        return
    except Exception as exc:  # the import too reads TQDM_* settings (into its defaults)
        raise _bar_failed(exc) from None
    drawing = True

    def update(n: int) -> None:
        nonlocal drawing
        if not drawing:
            return
        try:
            bar.update(n)
        except OSError:  # NOTE: stderr full: a CLIError whose own line failed, status 1
            drawing = False
        except Exception as exc:
            raise _bar_failed(exc) from None

    try:
        yield update
    finally:
        with suppress(Exception):
            bar.close()


def _bar_failed(exc: Exception) -> CLIError:
    settings = ", ".join(f"{name}={shown(value)}" for name, value in sorted(os.environ.items())
                         if name.startswith("TQDM_"))
    return CLIError(f"the progress bar (tqdm) failed on its settings"
                    f"{f' ({settings})' if settings else ''}: {type(exc).__name__}: {exc}; "
                    "fix them or pass --no-progress")


@contextmanager
def output_file(path: Path) -> Iterator[Path]:
    """Where to write the whole new content of the output file ``path`` (``--json``,
    ``--plot``): a temporary file beside it, which replaces it once the body is done, or
    is removed if the body raises (a full disk, a file size limit, a Ctrl-C), leaving
    ``path`` as it was; ``path`` itself where it is no plain file to replace.

    NOTE: written in place, a write that failed part way left a truncated JSON document
    (or image) under the name asked for. A symlink is written through (its target is
    replaced, the link kept), an existing file keeps its permission bits. Written in place,
    as before: a device, FIFO or socket (``--json /dev/stdout``, ``>(jq .)``), a path
    under /dev or /proc, a file with other hard links, of another owner, or that is
    standard output or error (redirected to a file), and a file whose folder takes no new
    file."""
    if not _replaceable(path):
        yield path
        return
    real = Path(os.path.realpath(path))
    try:
        fd, name = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.",
                                    suffix=f".part{real.suffix}")
    except OSError:  # a folder that refuses new files, a name too long: written in place
        fd, name = -1, ""
    if not name:
        yield path
        return
    temporary = Path(name)
    try:
        try:
            mode = stat.S_IMODE(os.stat(real).st_mode)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.close(fd)
        fd = -1
        os.chmod(temporary, mode)
        yield temporary
        os.replace(temporary, real)
    except BaseException:
        if fd >= 0:
            with suppress(OSError):
                os.close(fd)
        with suppress(OSError):
            temporary.unlink()
        raise


def probe_output(path: Path) -> str | None:
    """Why :func:`output_file` could not write ``path``, found by doing what it will do
    short of writing content, or None: a temporary file made (and removed) beside a file
    it replaces; else ``path`` opened for writing, without truncating it, and written zero
    bytes (what a device or a /proc file refuses, as /dev/full and /proc/version do). A
    FIFO without a reader yet passes (its reader may come when the report does).

    NOTE: the check looked at permission bits only: ``--json /dev/full`` or
    ``/proc/version`` passed it and failed after the whole run."""
    if _replaceable(path):
        real = Path(os.path.realpath(path))
        try:
            fd, name = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.",
                                        suffix=".probe")
        except OSError:
            pass  # output_file writes in place, then: probe that
        else:
            os.close(fd)
            with suppress(OSError):
                os.unlink(name)
            return None
    created = not os.path.lexists(path)
    flags = os.O_WRONLY | os.O_NONBLOCK | (os.O_CREAT | os.O_EXCL if created else 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ENXIO and not created:  # a FIFO no one reads yet
            return None
        return exc.strerror or str(exc)
    try:
        os.write(fd, b"")
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
        if created:
            with suppress(OSError):
                os.unlink(path)
    return None


def _replaceable(path: Path) -> bool:
    """Whether ``path`` names a plain file (or none yet) that :func:`output_file` may
    replace by a renamed one. Pure."""
    if os.path.abspath(path).startswith(("/dev/", "/proc/")):
        return False
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if (not stat.S_ISREG(status.st_mode) or status.st_nlink > 1
            or status.st_uid != os.geteuid()):  # a renamed file would change its owner
        return False
    for fd in (1, 2):  # NOTE: --json /dev/fd/1, or a name of the file stdout goes to
        with suppress(OSError):
            other = os.fstat(fd)
            if (other.st_dev, other.st_ino) == (status.st_dev, status.st_ino):
                return False
    return True


def names_stdout(path: Path) -> bool:
    """Whether ``path`` is the file standard output writes to (``/dev/stdout``, ``/dev/fd/1``,
    or the name of the file it is redirected to). Pure."""
    stream = sys.stdout
    try:
        fd = stream.fileno() if stream is not None else None
        if fd is None:
            return False
        status, out = os.stat(path), os.fstat(fd)
    except (OSError, ValueError, AttributeError):  # a StringIO in tests: no descriptor
        return False
    return (status.st_dev, status.st_ino) == (out.st_dev, out.st_ino)
