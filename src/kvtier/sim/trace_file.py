"""What every trace reader shares: the error that names file, line and field, the
checks on a file and its lines before a row is parsed, and the file's name and length
(``TraceRecords``)."""

from __future__ import annotations

import errno
import io
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from kvtier.reprs import shown

# NOTE: the longest sound row (2**24 tokens: 32,768 hash ids of up to 17 digits) is under
# 1 MB. A longer line is refused unread: a 60 MB line took 380 MB to parse, so a file of one
# line of gigabytes ended in the OOM killer.
MAX_LINE_BYTES = 1 << 22


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape made of a byte


class CheckedLines:
    """A text file's lines, each checked: at most :data:`MAX_LINE_BYTES` characters
    (read no further), no NUL; ``num_read`` counts those read so far."""

    def __init__(self) -> None:
        self.num_read = 0

    def of(self, f: io.TextIOBase, path: Path) -> Iterator[str]:
        for line in iter(lambda: f.readline(MAX_LINE_BYTES + 1), ""):
            self.num_read += 1
            if len(line) > MAX_LINE_BYTES:
                raise TraceFormatError(path, self.num_read, "<text>",
                                       f"the line is longer than {MAX_LINE_BYTES:,} "
                                       "characters, more than any trace row")
            bad = _NOT_UTF8.search(line)
            if bad is not None:
                raise TraceFormatError(path, self.num_read, "<text>",
                                       f"not UTF-8 text (byte {bad.start()}): not a CSV "
                                       "trace")
            if "\0" in line:
                raise TraceFormatError(path, self.num_read, "<text>",
                                       "contains a NUL byte: not a CSV trace")
            yield line


def check_regular_file(path: Path) -> None:
    """Raise OSError (``strerror`` saying why) unless ``path`` is a regular file or a
    directory (whose open fails at once): a FIFO blocked the read until a writer came, for
    ever if none did; a device such as /dev/zero never ends."""
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)")


class TraceFormatError(ValueError):
    """A trace file is malformed; the message names the file, the 1-based line and the field."""

    def __init__(self, path: Path, line_number: int, field: str, problem: str) -> None:
        super().__init__(f"{path}:{line_number}: field {shown(field)}: {problem}")
        self.path = path
        self.line_number = line_number
        self.field = field


def trace_path(path: object) -> Path:
    """``path`` (a str or an ``os.PathLike`` of one) as a Path; ValueError naming it
    otherwise. Pure.

    NOTE: pathlib's TypeError ("expected str, bytes or os.PathLike object, not NoneType")
    named neither the argument nor the reader."""
    try:
        return Path(path)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"path must be a str or os.PathLike naming the trace file, got "
                         f"{shown(path):.60}") from None


def check_limit(limit: int | None) -> None:
    if limit is not None and (type(limit) is not int or limit < 0):
        raise ValueError(f"limit must be an integer >= 0 or None, got {shown(limit)}")


R = TypeVar("R")


class TraceRecords(Generic[R]):
    """What a trace reader is besides its format: the file (``path``) and its records, one
    a request (``_records``, which the reader sets)."""

    path: Path
    _records: Sequence[R]

    @property
    def name(self) -> str:
        """The file name without its suffix."""
        return self.path.stem

    def __len__(self) -> int:
        return len(self._records)
