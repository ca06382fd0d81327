"""Red team, eleventh pass: trace files whose one line is megabytes long, or that are long
and read only in part."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from kvtier.sim.traces import MAX_LINE_BYTES, AzureTrace, MooncakeTrace, TraceFormatError

AZURE_HEADER = b"TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZURE_ROW = b"2023-11-16 18:15:46.6805900,374,44\n"
MOONCAKE_ROW = b'{"timestamp": 0, "input_length": 100, "output_length": 10, "hash_ids": [1]}\n'


def peak_bytes(call: Callable[[], object]) -> int:
    """The most memory Python allocated while ``call`` ran."""
    tracemalloc.start()
    try:
        call()
    except TraceFormatError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize(("name", "head", "trace"), [
    ("t.jsonl", MOONCAKE_ROW, MooncakeTrace), ("t.csv", AZURE_HEADER + AZURE_ROW, AzureTrace),
])
def test_a_line_longer_than_any_row_is_refused_unread(
        tmp_path: Path, name: str, head: bytes,
        trace: type[MooncakeTrace] | type[AzureTrace]) -> None:
    """A trace whose next line runs on for megabytes: the whole line was read (a Mooncake
    row also parsed: a 60 MB line took 380 MB; an Azure file was read whole, three copies),
    so a big enough one ended in the OOM killer. Now refused naming the line, having held
    at most MAX_LINE_BYTES of it."""
    path = tmp_path / name
    path.write_bytes(head + b"1," * MAX_LINE_BYTES + b"\n")  # a line of 8 MB
    line = head.count(b"\n") + 1
    with pytest.raises(TraceFormatError, match=rf"{name}:{line}: field '<text>': the line is "
                                               rf"longer than 4,194,304"):
        len(trace(path))
    assert peak_bytes(lambda: len(trace(path))) < 4 * MAX_LINE_BYTES


def test_an_azure_trace_is_read_only_as_far_as_its_limit(tmp_path: Path) -> None:
    """AzureTrace read the whole file into memory (three copies of it) even with a limit
    of a few rows. Now it reads a line at a time and stops at the limit."""
    path = tmp_path / "t.csv"
    path.write_bytes(AZURE_HEADER + AZURE_ROW * 100_000)  # 3.5 MB
    assert len(AzureTrace(path, limit=3)) == 3
    assert peak_bytes(lambda: len(AzureTrace(path, limit=3))) < 1 << 20
