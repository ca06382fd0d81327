"""CSV traces of arrivals and lengths alone (Azure's LLM inference traces, BurstGPT's),
prefixes synthesised by a seeded model.

The reader parses and validates the whole file when constructed and builds token lists
lazily, one request at a time, when iterated.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from kvtier.reprs import shown
from kvtier.sequence import short_repr
from kvtier.sim.synthetic import PrefixModel, SessionBuilder
from kvtier.sim.trace_file import (
    CheckedLines,
    TraceFormatError,
    TraceRecords,
    check_limit,
    open_trace,
    trace_path,
)
from kvtier.sim.workload import MAX_ARRIVAL_S, MAX_REQUEST_TOKENS, TraceRequest

if TYPE_CHECKING:
    from _csv import Reader as _CsvReader

DEFAULT_PREFIX_MODEL = PrefixModel()


class _AzureRecord(NamedTuple):
    arrival_s: float
    context_tokens: int
    generated_tokens: int


_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class _CsvFormat(NamedTuple):
    """A CSV trace's columns: arrival time (a date and time, or seconds), prompt and output
    lengths; other columns are read past."""

    name: str
    time: str
    prompt: str
    output: str
    time_in_seconds: bool


# The Azure LLM inference traces (2023, and 2024's, which kept the columns) and BurstGPT's
# (Azure OpenAI GPT use: "Timestamp" in seconds, "Model", "Request tokens", "Response
# tokens", "Total tokens", "Log Type"; in some releases more columns).
_CSV_FORMATS = (_CsvFormat("azure", *_AZURE_COLUMNS, False),
                _CsvFormat("burstgpt", "Timestamp", "Request tokens", "Response tokens", True))
# BurstGPT's sum of the two lengths, checked where the file has it: a row whose total is
# not request + response has its columns mixed up or cut (NOTE: read past unchecked, such
# a row was replayed with lengths its own total contradicts).
_BURSTGPT_TOTAL = "Total tokens"
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_MAX_DIGITS = 20  # far past MAX_REQUEST_TOKENS: a longer number is refused unparsed


_DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", re.ASCII)


def _parse_seconds(text: str) -> float:
    """A number of seconds, written plainly (no sign, exponent, ``inf`` or ``_``), at most
    :data:`MAX_ARRIVAL_S`.

    NOTE: bounded as a JSONL trace's timestamp is: past it, arrivals are measured from the
    first row in floats that no longer tell the rows apart (seconds of 21 digits, rows a
    second apart, all arrived at 0.0)."""
    digits = text.strip()
    if _DECIMAL.fullmatch(digits) is None or len(digits) > 64:
        # NOTE: the refusal said only "a number of seconds >= 0", which 1e308 and +5 are.
        raise ValueError("expected a number of seconds >= 0 written plainly (digits and a "
                         "point: no sign, exponent or inf)")
    seconds = float(digits)
    if seconds > MAX_ARRIVAL_S:
        raise ValueError(f"more than the {MAX_ARRIVAL_S:.0e} s a trace may span")
    return seconds


# A TIMESTAMP of Azure's traces: 2023's "2023-11-16 18:17:03.9799600", 2024's
# "2024-05-10 00:00:00.009930+00:00" (a UTC offset; the fraction left out at whole seconds).
_AZURE_TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2}) ([0-9]{2}):([0-9]{2}):([0-9]{2})"
                         r"(?:\.([0-9]{1,9}))?(Z|[+-][0-9]{2}:[0-9]{2})?", re.ASCII)


def _parse_azure_timestamp(text: str) -> tuple[datetime, bool]:
    """A TIMESTAMP as a naive UTC moment where it gives a UTC offset (else as written),
    and whether it gives one. ValueError saying what was expected. Pure.

    NOTE: 2024's offsets ("+00:00") were refused as "bad fractional seconds", the whole
    trace with them; and strptime took digits of any script ('٢٠٢٣') and fields of one
    digit, as int() did for lengths."""
    match = _AZURE_TIME.fullmatch(text.strip())
    if match is None:
        raise ValueError("expected YYYY-MM-DD HH:MM:SS, an optional fraction of a second "
                         "and an optional UTC offset (+HH:MM)")
    year, month, day, hour, minute, second = (int(f) for f in match.groups()[:6])
    fraction, zone = match.group(7), match.group(8)
    try:
        moment = datetime(year, month, day, hour, minute, second,
                          int((fraction or "0")[:6].ljust(6, "0")))
        if zone is not None and zone != "Z":
            hours, minutes = int(zone[1:3]), int(zone[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError(f"UTC offset {zone} is no offset")
            offset = timedelta(hours=hours, minutes=minutes)
            moment = moment - offset if zone[0] == "+" else moment + offset
    except OverflowError:  # an offset past year 1 or 9999
        raise ValueError("out of the range of dates") from None
    return moment, zone is not None


class AzureTrace(TraceRecords[_AzureRecord]):
    """An Azure LLM inference trace (CSV: 2023's, 2024's) or a BurstGPT trace: arrivals and
    lengths, prefixes synthesised. The format is told by the header.

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
            raise ValueError(f"prefix_model must be a PrefixModel, got {shown(prefix_model)}")
        if type(seed) is not int:
            raise ValueError(f"seed must be an integer, got {shown(seed)}")
        check_limit(limit)
        self.path = trace_path(path)
        self.prefix_model = prefix_model
        self.seed = seed
        self.limit = limit
        self.format = _CSV_FORMATS[0]
        self._records = self._parse()

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
            "kind": self.format.name,
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
        lines = CheckedLines()
        # A byte order mark (Windows tools write one) is skipped; bytes that are not UTF-8
        # come through as lone surrogates, for CheckedLines to name their line.
        with open_trace(self.path) as raw:
            f = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape",
                                 newline="")
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
        names = [h.strip() for h in header]
        found = [f for f in _CSV_FORMATS if {f.time, f.prompt, f.output} <= set(names)]
        if len(found) > 1:
            # NOTE: was read as the first format's, the other's columns dropped unread.
            raise TraceFormatError(self.path, 1, "<header>", "has the columns of both "
                                   f"{' and '.join(f.name for f in found)}: not one format")
        if not found:
            raise TraceFormatError(
                self.path, 1, "<header>", f"expected columns {_AZURE_COLUMNS} (Azure) or "
                f"{_CSV_FORMATS[1][1:4]} among others (BurstGPT), got {header}")
        fmt = found[0]
        twice = next((n for n in (fmt.time, fmt.prompt, fmt.output) if names.count(n) > 1),
                     None)
        if twice is not None:
            raise TraceFormatError(self.path, 1, "<header>", f"column {shown(twice)} twice")
        self.format = fmt
        columns = [(names.index(c), c, minimum)
                   for c, minimum in ((fmt.prompt, 1), (fmt.output, 0))]
        time_at = names.index(fmt.time)
        total_at = (names.index(_BURSTGPT_TOTAL) if fmt.name == "burstgpt"
                    and names.count(_BURSTGPT_TOTAL) == 1 else None)
        first: datetime | None = None
        zoned: bool | None = None  # whether the first row's TIMESTAMP gives a UTC offset
        first_s: float | None = None
        previous_s = 0.0
        for row in reader:
            line_number = reader.line_num
            if self.limit is not None and len(records) >= self.limit:
                break
            if not row:
                continue
            if len(row) != len(names):
                raise TraceFormatError(
                    self.path, line_number, "<row>",
                    f"expected {len(names)} columns, got {len(row)}",
                )
            text = row[time_at]
            try:
                if fmt.time_in_seconds:
                    seconds = _parse_seconds(text)
                    first_s = seconds if first_s is None else first_s
                    arrival_s = seconds - first_s
                else:
                    moment, with_offset = _parse_azure_timestamp(text)
                    zoned = with_offset if zoned is None else zoned
                    if with_offset != zoned:  # NOTE: UTC against local time: no order
                        raise ValueError(f"{'gives' if with_offset else 'gives no'} UTC "
                                         f"offset, where the first row "
                                         f"{'does not' if with_offset else 'does'}")
                    first = moment if first is None else first
                    arrival_s = (moment - first).total_seconds()
            except ValueError as exc:
                raise TraceFormatError(
                    self.path, line_number, fmt.time, f"{shown(text)}: {exc}"
                ) from None
            if arrival_s < previous_s:
                raise TraceFormatError(
                    self.path, line_number, fmt.time,
                    f"{shown(text)} is earlier than the previous row",
                )
            if arrival_s > MAX_ARRIVAL_S:
                raise TraceFormatError(
                    self.path, line_number, fmt.time,
                    f"{shown(text)} is more than {MAX_ARRIVAL_S:.0e} s after the first row",
                )
            previous_s = arrival_s
            lengths = []
            for at, column, minimum in columns:
                value = _integer_cell(row[at])
                if value is None:
                    raise TraceFormatError(
                        self.path, line_number, column,
                        f"expected an integer in {minimum}..{MAX_REQUEST_TOKENS}, "
                        f"got {short_repr(row[at].strip())}")
                if not minimum <= value <= MAX_REQUEST_TOKENS:
                    raise TraceFormatError(
                        self.path, line_number, column,
                        f"must be an integer in {minimum}..{MAX_REQUEST_TOKENS}, got {value}",
                    )
                lengths.append(value)
            if total_at is not None:
                self._check_total(row[total_at], lengths, line_number)
            records.append(_AzureRecord(arrival_s, lengths[0], lengths[1]))
        return records

    def _check_total(self, text: str, lengths: list[int], line_number: int) -> None:
        """TraceFormatError naming the line unless BurstGPT's ``Total tokens`` cell is the
        row's request and response tokens summed. Pure."""
        if _integer_cell(text) != sum(lengths):
            raise TraceFormatError(
                self.path, line_number, _BURSTGPT_TOTAL,
                f"must be the request and response tokens summed, {lengths[0]} + "
                f"{lengths[1]} = {sum(lengths)}, got {short_repr(text.strip())}")


def _integer_cell(text: str) -> int | None:
    """The integer a cell holds (ASCII digits, an optional sign, at most ``_MAX_DIGITS``,
    spaces around), else None. Pure.

    NOTE: not int() alone: it also takes '1_000' and non-ASCII digits ('١٢')."""
    digits = text.strip()
    if _INTEGER.fullmatch(digits) is None or len(digits) > _MAX_DIGITS:
        return None
    return int(digits)
