"""Readers for public LLM-serving traces: Mooncake (with prefix hashes) and Azure 2023.

Both readers parse and validate the whole file when constructed (a few MB; lengths and ids
only) and build token lists lazily, one request at a time, when iterated.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import re
import stat
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from _csv import Reader as _CsvReader

from kvtier.blocks import cdiv
from kvtier.sequence import is_finite_number, short_repr
from kvtier.sim.oracle import OracleRequest
from kvtier.sim.synthetic import PrefixModel, SessionBuilder
from kvtier.sim.workload import MAX_ARRIVAL_S, MAX_REQUEST_TOKENS, TraceRequest

MOONCAKE_BLOCK_TOKENS = 512
DEFAULT_PREFIX_MODEL = PrefixModel()
# Hash id h stands for token ids h*512 .. h*512+511, which must stay int64.
MAX_HASH_ID = (1 << 63) // MOONCAKE_BLOCK_TOKENS - 1
# NOTE: the longest sound row (2**24 tokens: 32,768 hash ids of up to 17 digits) is under
# 1 MB. A longer line is refused unread: a 60 MB line took 380 MB to parse, so a file of one
# line of gigabytes ended in the OOM killer.
MAX_LINE_BYTES = 1 << 22


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape made of a byte


class _Lines:
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
                                       f"not UTF-8 text (byte {bad.start()}): not an Azure "
                                       "CSV trace")
            if "\0" in line:
                raise TraceFormatError(path, self.num_read, "<text>",
                                       "contains a NUL byte: not an Azure CSV trace")
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
        super().__init__(f"{path}:{line_number}: field {field!r}: {problem}")
        self.path = path
        self.line_number = line_number
        self.field = field


def _check_limit(limit: int | None) -> None:
    if limit is not None and (type(limit) is not int or limit < 0):
        raise ValueError(f"limit must be an integer >= 0 or None, got {limit!r}")


class _MooncakeRecord(NamedTuple):
    timestamp_ms: int | float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


class MooncakeTrace:
    """A Mooncake FAST'25 trace (JSONL): arrivals, lengths and 512-token prefix hash ids.

    Hash id ``h`` stands for tokens ``h*512 .. h*512+511``; the last block is cut so the
    prompt has ``input_length`` tokens. Because the ids are prefix hashes (equal id, equal
    prefix), equal ids give equal token ids and distinct ids distinct ones::

        hash_ids   [ 7          | 8          | 9     ]   input_length = 1200
        tokens     [3584..4095  | 4096..4607 | 4608..4783]

    ``tokens_per_block`` (a divisor of 512) is the block size of :meth:`oracle_requests`.
    ``limit`` keeps only the first ``limit`` requests.
    """

    def __init__(self, path: str | Path, tokens_per_block: int = 32, limit: int | None = None):
        tpb = tokens_per_block
        if type(tpb) is not int or tpb < 1 or MOONCAKE_BLOCK_TOKENS % tpb:
            raise ValueError(f"tokens_per_block must be a divisor of 512, got {tpb!r}")
        _check_limit(limit)
        self.path = Path(path)
        self.tokens_per_block = tpb
        self.limit = limit
        self._records = self._parse()

    @property
    def name(self) -> str:
        """The file name without its suffix."""
        return self.path.stem

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[TraceRequest]:
        """Yield the requests in file (arrival) order, building each prompt when reached."""
        block = MOONCAKE_BLOCK_TOKENS
        for index, rec in enumerate(self._records):
            prompt: list[int] = []
            for h in rec.hash_ids:
                prompt.extend(range(h * block, h * block + block))
            del prompt[rec.input_length :]
            yield TraceRequest(
                f"{self.name}-{index}", rec.timestamp_ms / 1000.0, prompt, rec.output_length
            )

    def oracle_requests(self, tokens_per_block: int | None = None) -> Iterator[OracleRequest]:
        """Block keys of each request at ``tokens_per_block`` (default: the trace's setting).

        No tokens are built. Sub-block ``j`` of hash id ``h`` is keyed ``(h, j)`` (or ``h``
        itself at 512 tokens); the id already names the whole prefix, so the key does too.
        The last, partial block is included, following the trace's convention that it is
        cacheable.
        """
        tpb = self.tokens_per_block if tokens_per_block is None else tokens_per_block
        if type(tpb) is not int or tpb < 1 or MOONCAKE_BLOCK_TOKENS % tpb:
            raise ValueError(f"tokens_per_block must be a divisor of 512, got {tpb!r}")
        per_hash = MOONCAKE_BLOCK_TOKENS // tpb
        for rec in self._records:
            num_blocks = cdiv(rec.input_length, tpb)
            if per_hash == 1:
                yield OracleRequest(rec.hash_ids, rec.input_length)
            else:
                keys = tuple((h, j) for h in rec.hash_ids for j in range(per_hash))
                yield OracleRequest(keys[:num_blocks], rec.input_length)

    def unlimited_hit_rate(self) -> float:
        """Token hit rate with an unlimited cache at 512-token granularity (a query).

        For each request in order, the longest prefix of ``hash_ids`` already seen counts
        ``min(k * 512, input_length)`` tokens as hits.
        """
        seen: set[int] = set()
        num_hit_tokens = 0
        num_tokens = 0
        for rec in self._records:
            k = 0
            for h in rec.hash_ids:
                if h not in seen:
                    break
                k += 1
            num_hit_tokens += min(k * MOONCAKE_BLOCK_TOKENS, rec.input_length)
            num_tokens += rec.input_length
            seen.update(rec.hash_ids)
        return num_hit_tokens / num_tokens if num_tokens else 0.0

    def describe(self) -> dict[str, object]:
        """JSON-ready summary: file, request count, span and token totals."""
        recs = self._records
        return {
            "name": self.name,
            "kind": "mooncake",
            "path": str(self.path),
            "num_requests": len(recs),
            "span_s": (recs[-1].timestamp_ms - recs[0].timestamp_ms) / 1000.0 if recs else 0.0,
            "num_prompt_tokens": sum(r.input_length for r in recs),
            "num_output_tokens": sum(r.output_length for r in recs),
            "tokens_per_block": self.tokens_per_block,
            "limit": self.limit,
        }

    def _parse(self) -> list[_MooncakeRecord]:
        records: list[_MooncakeRecord] = []
        previous_ms: float = 0.0
        check_regular_file(self.path)
        with self.path.open("rb") as f:
            lines = iter(lambda: f.readline(MAX_LINE_BYTES + 1), b"")
            for line_number, raw in enumerate(lines, start=1):
                if self.limit is not None and len(records) >= self.limit:
                    break
                if len(raw) > MAX_LINE_BYTES:
                    raise TraceFormatError(self.path, line_number, "<text>",
                                           f"the line is longer than {MAX_LINE_BYTES:,} bytes, "
                                           "more than any Mooncake row")
                try:
                    # NOTE: a byte order mark (Windows tools write one) opens line 1 only.
                    line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise TraceFormatError(self.path, line_number, "<text>",
                                           "not UTF-8 text: not a Mooncake JSONL line") from None
                if not line.strip():
                    continue
                rec = self._parse_line(line, line_number)
                if rec.timestamp_ms < previous_ms:
                    raise TraceFormatError(
                        self.path, line_number, "timestamp",
                        f"{rec.timestamp_ms} is earlier than the previous line's {previous_ms}",
                    )
                previous_ms = rec.timestamp_ms
                records.append(rec)
        return records

    def _parse_line(self, line: str, line_number: int) -> _MooncakeRecord:
        def fail(field: str, problem: str) -> TraceFormatError:
            return TraceFormatError(self.path, line_number, field, problem)

        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise fail("<json>", f"malformed JSON: {exc.msg}") from None
        except ValueError:
            # NOTE: json.loads raises a bare ValueError, not a JSONDecodeError, for a number
            # past Python's limit on int parsing (4,300 digits).
            raise fail("<json>", "malformed JSON: a number too long to read") from None
        except RecursionError:
            raise fail("<json>", "nested too deeply: not a Mooncake record") from None
        if not isinstance(obj, dict):
            raise fail("<json>", f"expected an object, got {type(obj).__name__}")
        for field in ("timestamp", "input_length", "output_length", "hash_ids"):
            if field not in obj:
                raise fail(field, "missing")
        timestamp = obj["timestamp"]
        if not is_finite_number(timestamp) or not 0 <= timestamp <= MAX_ARRIVAL_S * 1000:
            raise fail("timestamp", f"expected a number of ms in 0..{MAX_ARRIVAL_S * 1000:.0e}, "
                       f"got {short_repr(timestamp)}")
        lengths = []
        for field in ("input_length", "output_length"):
            value = obj[field]
            if type(value) is not int:
                raise fail(field, f"expected an integer, got {value!r}")
            if value < (1 if field == "input_length" else 0):
                raise fail(field, f"length must not be negative or empty, got {value}")
            if value > MAX_REQUEST_TOKENS:
                raise fail(field, f"{value} tokens is more than the {MAX_REQUEST_TOKENS} "
                           "a request may have")
            lengths.append(value)
        hash_ids = obj["hash_ids"]
        expected_ids = (f"expected a list of integers in 0..{MAX_HASH_ID} (2**54 - 1: token ids "
                        "h*512.. must stay below 2**63)")
        if not isinstance(hash_ids, list):
            raise fail("hash_ids", f"{expected_ids}, got {short_repr(hash_ids)}")
        bad = next((i for i, h in enumerate(hash_ids)
                    if type(h) is not int or not 0 <= h <= MAX_HASH_ID), None)
        if bad is not None:
            raise fail("hash_ids", f"{expected_ids}, got {short_repr(hash_ids[bad])} at "
                       f"index {bad}")
        expected = cdiv(lengths[0], MOONCAKE_BLOCK_TOKENS)
        if len(hash_ids) != expected:
            raise fail(
                "hash_ids",
                f"has {len(hash_ids)} ids, expected ceil({lengths[0]}/512) = {expected}",
            )
        return _MooncakeRecord(timestamp, lengths[0], lengths[1], tuple(hash_ids))


class _AzureRecord(NamedTuple):
    arrival_s: float
    context_tokens: int
    generated_tokens: int


_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_MAX_DIGITS = 20  # far past MAX_REQUEST_TOKENS: a longer number is refused unparsed


def _parse_azure_timestamp(text: str) -> datetime:
    # NOTE: the files carry 7 fractional digits (100 ns), more than strptime's %f accepts.
    whole, _, fraction = text.strip().partition(".")
    moment = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S")
    if fraction and not fraction.isdigit():
        raise ValueError(f"bad fractional seconds {fraction!r}")
    return moment.replace(microsecond=int((fraction or "0")[:6].ljust(6, "0")))


class AzureTrace:
    """An Azure LLM inference 2023 trace (CSV): arrivals and lengths, prefixes synthesised.

    ``arrival_s`` is measured from the first row. The file has no prefix information, so a
    :class:`~kvtier.sim.synthetic.PrefixModel` (deterministic for ``seed``) assigns each
    request a Zipf-popular system prompt or makes it a follow-up turn of an open session.
    The prompt always has exactly ``ContextTokens`` tokens: a follow-up's new user turn fills
    whatever the history leaves (sessions whose history does not fit are not candidates), and
    a first turn truncates its system prompt when the request is short
    (see :meth:`SessionBuilder.fixed_length_prompt`). ``limit`` keeps the first rows only.
    """

    def __init__(
        self,
        path: str | Path,
        prefix_model: PrefixModel = DEFAULT_PREFIX_MODEL,
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        if not isinstance(prefix_model, PrefixModel):
            raise ValueError(f"prefix_model must be a PrefixModel, got {prefix_model!r}")
        if type(seed) is not int:
            raise ValueError(f"seed must be an integer, got {seed!r}")
        _check_limit(limit)
        self.path = Path(path)
        self.prefix_model = prefix_model
        self.seed = seed
        self.limit = limit
        self._records = self._parse()

    @property
    def name(self) -> str:
        """The file name without its suffix."""
        return self.path.stem

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[TraceRequest]:
        """Yield the requests in arrival order; each prompt is built when it is reached."""
        builder = SessionBuilder(self.prefix_model, self.seed)
        for index, rec in enumerate(self._records):
            session_id, prompt = builder.fixed_length_prompt(
                rec.context_tokens, rec.generated_tokens
            )
            yield TraceRequest(
                f"{self.name}-{index}", rec.arrival_s, prompt, rec.generated_tokens, session_id
            )

    def describe(self) -> dict[str, object]:
        """JSON-ready summary: file, request count, span, token totals and the prefix model."""
        recs = self._records
        return {
            "name": self.name,
            "kind": "azure",
            "path": str(self.path),
            "num_requests": len(recs),
            "span_s": recs[-1].arrival_s if recs else 0.0,
            "num_prompt_tokens": sum(r.context_tokens for r in recs),
            "num_output_tokens": sum(r.generated_tokens for r in recs),
            "seed": self.seed,
            "limit": self.limit,
            "prefix_model": asdict(self.prefix_model),
        }

    def _parse(self) -> list[_AzureRecord]:
        """The records, read a line at a time.

        NOTE: not the whole file at once: it took three times the file's size in memory
        (bytes, text, the reader's copy) even with --limit, and a line of gigabytes without
        a newline was read whole. A line longer than :data:`MAX_LINE_BYTES` is refused
        unread."""
        check_regular_file(self.path)
        lines = _Lines()
        # A byte order mark (Windows tools write one) is skipped; bytes that are not UTF-8
        # come through as lone surrogates, for _Lines to name their line.
        with self.path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(lines.of(f, self.path))
            try:
                return self._parse_rows(reader)
            except csv.Error as exc:
                raise TraceFormatError(self.path, reader.line_num, "<row>", str(exc)) from None

    def _parse_rows(self, reader: _CsvReader) -> list[_AzureRecord]:
        records: list[_AzureRecord] = []
        header = next(reader, None)
        if header is None:
            return records  # an empty file: no requests, as an empty Mooncake trace
        if tuple(h.strip() for h in header) != _AZURE_COLUMNS:
            raise TraceFormatError(
                self.path, 1, "<header>", f"expected columns {_AZURE_COLUMNS}, got {header}"
            )
        first: datetime | None = None
        previous_s = 0.0
        for row in reader:
            line_number = reader.line_num
            if self.limit is not None and len(records) >= self.limit:
                break
            if not row:
                continue
            if len(row) != len(_AZURE_COLUMNS):
                raise TraceFormatError(
                    self.path, line_number, "<row>",
                    f"expected {len(_AZURE_COLUMNS)} columns, got {len(row)}",
                )
            try:
                moment = _parse_azure_timestamp(row[0])
            except ValueError as exc:
                raise TraceFormatError(
                    self.path, line_number, "TIMESTAMP", f"{row[0]!r}: {exc}"
                ) from None
            first = moment if first is None else first
            arrival_s = (moment - first).total_seconds()
            if arrival_s < previous_s:
                raise TraceFormatError(
                    self.path, line_number, "TIMESTAMP",
                    f"{row[0]!r} is earlier than the previous row",
                )
            if arrival_s > MAX_ARRIVAL_S:
                raise TraceFormatError(
                    self.path, line_number, "TIMESTAMP",
                    f"{row[0]!r} is more than {MAX_ARRIVAL_S:.0e} s after the first row",
                )
            previous_s = arrival_s
            lengths = []
            for column, text, minimum in zip(_AZURE_COLUMNS[1:], row[1:], (1, 0), strict=True):
                digits = text.strip()
                # NOTE: not int() alone: it also takes '1_000' and non-ASCII digits ('١٢').
                if _INTEGER.fullmatch(digits) is None or len(digits) > _MAX_DIGITS:
                    raise TraceFormatError(
                        self.path, line_number, column,
                        f"expected an integer in {minimum}..{MAX_REQUEST_TOKENS}, "
                        f"got {short_repr(digits)}")
                value = int(digits)
                if not minimum <= value <= MAX_REQUEST_TOKENS:
                    raise TraceFormatError(
                        self.path, line_number, column,
                        f"must be an integer in {minimum}..{MAX_REQUEST_TOKENS}, got {value}",
                    )
                lengths.append(value)
            records.append(_AzureRecord(arrival_s, lengths[0], lengths[1]))
        return records
