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
