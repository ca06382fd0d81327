"""Red team, pass 20b: the JSONL trace readers (Mooncake, Bailian) given files that mix
their formats, timestamps in a unit the reader was told, and blocks an id names at two
lengths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.sim.traces import MooncakeTrace, TraceFormatError


def write_rows(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def row(timestamp: float = 0, input_length: int = 20, hash_ids: tuple[int, ...] = (1,),
        **extra: object) -> dict[str, object]:
    return {"timestamp": timestamp, "input_length": input_length, "output_length": 1,
            "hash_ids": list(hash_ids), **extra}


# ---- a file whose rows are of two formats -------------------------------------------------------

@pytest.mark.parametrize(("first", "second"), [
    # A Bailian row, then one without "chat_id": KeyError 'chat_id', naming no line.
    (row(chat_id=1), row(timestamp=1)),
    # A Mooncake row, then one with "chat_id": read as Mooncake's, its chat ids dropped.
    (row(), row(timestamp=1, chat_id=1)),
])
def test_a_row_of_the_other_format_than_the_first_is_refused_naming_its_line(
        tmp_path: Path, first: dict[str, object], second: dict[str, object]) -> None:
    """The first row tells the format; a later row of the other one (with or without a
    chat id) is a TraceFormatError naming its line and the key."""
    path = write_rows(tmp_path / "t.jsonl", [first, second])
    with pytest.raises(TraceFormatError) as refused:
        MooncakeTrace(path)
    assert refused.value.line_number == 2
    assert refused.value.field == "chat_id"


# ---- timestamps in the unit the reader was told -------------------------------------------------

@pytest.mark.parametrize(("unit_s", "timestamp", "arrival_s"), [
    # 1e15 us is 1e9 s, under the 1e10 s a trace may span: refused as "more than 1e13
    # (ms, or s in a Bailian trace)", whatever the unit.
    (1e-6, 10**15, 1e9),
    (1e-3, 9 * 10**12, 9e9),
])
def test_a_timestamp_is_bounded_in_the_unit_given(tmp_path: Path, unit_s: float,
                                                  timestamp: int, arrival_s: float) -> None:
    """A timestamp is bounded by the seconds it stands for in the trace's unit, not by
    the ms of Mooncake's."""
    path = write_rows(tmp_path / "t.jsonl", [row(timestamp=timestamp)])
    assert [r.arrival_s for r in MooncakeTrace(path, time_unit_s=unit_s)] == [arrival_s]


@pytest.mark.parametrize(("unit_s", "timestamp", "shown"), [
    (1e-6, 10**17, "1e+11 s"),
    (3600.0, 10**7, "3.6e+10 s"),
    (1e-9, 10**400, "expected a finite number >= 0"),  # past the float range
    (None, 2 * 10**13, "2e+10 s"),
])
def test_a_timestamp_past_the_span_names_its_seconds(tmp_path: Path, unit_s: float | None,
                                                      timestamp: int, shown: str) -> None:
    """Past the span, the refusal names the timestamp's seconds in the unit given."""
    path = write_rows(tmp_path / "t.jsonl", [row(timestamp=timestamp)])
    with pytest.raises(TraceFormatError, match="timestamp") as refused:
        MooncakeTrace(path, time_unit_s=unit_s)
    assert shown in str(refused.value)
