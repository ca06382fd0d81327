"""What every trace reader shares: the error that names file, line and field, the
checks on a file and its lines before a row is parsed, the file opened (a gzip file
decompressed as it is read), and the file's name and length (``TraceRecords``)."""

from __future__ import annotations

import contextlib
import errno
import gzip
import re
import stat
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO, Generic, TypeVar, cast

from kvtier.reprs import shown

# NOTE: the longest sound row (2**24 tokens: 32,768 hash ids of up to 17 digits) is under
# 1 MB. A longer line is refused unread: a 60 MB line took 380 MB to parse, so a file of one
# line of gigabytes ended in the OOM killer.
MAX_LINE_BYTES = 1 << 22


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape made of a byte

GZIP_MAGIC = b"\x1f\x8b"  # how a gzip file begins, whatever its name
# What reading a damaged gzip file raises: EOFError (truncated), zlib.error (corrupt
# data), BadGzipFile (a bad header or CRC).
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


@contextlib.contextmanager
def open_trace(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading bytes; a gzip file (told by its first two bytes, not by
    its name) decompressed as it is read, never whole. OSError (``strerror`` saying why)
    for what cannot be opened or is no regular file.

    NOTE: a ``.jsonl.gz`` was refused by its suffix and its bytes as "not UTF-8", where
    public traces ship compressed."""
    check_regular_file(path)
    with path.open("rb") as f:
        if f.peek(len(GZIP_MAGIC))[:len(GZIP_MAGIC)] == GZIP_MAGIC:
            with gzip.GzipFile(fileobj=f, mode="rb") as unzipped:
                yield cast(BinaryIO, unzipped)
        else:
            yield f


def read_line(f: IO[Any], path: Path, line_number: int, size: int) -> bytes | str:
    """``f.readline(size)``; a damaged gzip file's error as a :class:`TraceFormatError`
    naming ``path`` and ``line_number`` (the line being read when its data ended)."""
    try:
        line: bytes | str = f.readline(size)
        return line
    except _GZIP_ERRORS as exc:
        raise TraceFormatError(path, line_number, "<gzip>",
                               f"the compressed data is truncated or corrupt ({exc}): a "
                               "damaged .gz file") from None


def format_suffix(path: Path) -> str:
    """The suffix that names ``path``'s format, lower case, a trailing ``.gz`` passed over
    (``trace.jsonl.gz``: ``.jsonl``). Pure."""
    return Path(without_gz(path.name)).suffix.lower()


def without_gz(name: str) -> str:
    """``name`` without a trailing ``.gz`` (of any case). Pure."""
    return name[:-3] if name.lower().endswith(".gz") else name


class CheckedLines:
    """A text file's lines, each checked: at most :data:`MAX_LINE_BYTES` characters
    (read no further), no NUL; ``num_read`` counts those read so far."""

    def __init__(self) -> None:
        self.num_read = 0

    def of(self, f: IO[str], path: Path) -> Iterator[str]:
        while line := cast(str, read_line(f, path, self.num_read + 1, MAX_LINE_BYTES + 1)):
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
        """The file name without its suffix (nor a ``.gz`` after it)."""
        return Path(without_gz(self.path.name)).stem

    def __len__(self) -> int:
        return len(self._records)
