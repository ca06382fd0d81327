"""Red team 31b: the trace readers fed what a hostile or careless user writes. Each file
either reads to requests or is refused with :class:`TraceFormatError` naming its file and
line; never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.sim import AzureTrace, MooncakeTrace, TraceFormatError

MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids", "chat_id",
                 "parent_chat_id", "turn", "type")
NUMBERS = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.sampled_from([0, 1, 3.0, 3.5, 512, 1024, 10**10, 2**63]))
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8)
ROW = st.dictionaries(st.sampled_from(MOONCAKE_KEYS), JSON_VALUES, max_size=len(MOONCAKE_KEYS))
SOUND_ROW = st.fixed_dictionaries({
    "timestamp": st.one_of(st.integers(0, 10**6), st.floats(0, 1e6)),
    "input_length": st.integers(1, 3000),
    "output_length": st.integers(0, 50),
    "hash_ids": st.lists(st.integers(0, 20), min_size=1, max_size=6),
})
NOISE = st.sampled_from(["", "\n", "\r\n", "   ", "\ufeff", "garbage", "}", "\x00", "[]", "{}",
                         "null", "\t"])
SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def read_all(data: bytes, suffix: str) -> int:
    """The requests of a file holding ``data``, built one by one (the reader the suffix
    names): their count, or -1 for a TraceFormatError naming the file and a line."""
    reader = MooncakeTrace if suffix == ".jsonl" else AzureTrace
    with tempfile.TemporaryDirectory(prefix="rt31b-") as folder:
        path = Path(folder) / f"t{suffix}"
        path.write_bytes(data)
        try:
            return sum(1 for _ in reader(path))
        except TraceFormatError as exc:
            assert str(exc).startswith(f"{path}:"), exc
            assert exc.line_number >= 1
            return -1


@SETTINGS
@given(rows=st.lists(st.one_of(ROW, SOUND_ROW), max_size=5),
       noise=st.lists(st.tuples(st.integers(0, 5), NOISE), max_size=3),
       newline=st.sampled_from(["\n", "\r\n"]))
def test_a_mooncake_file_of_any_rows_reads_or_is_refused_naming_its_line(
        rows: list[dict[str, object]], noise: list[tuple[int, str]], newline: str) -> None:
    """Rows of any keys and values (floats for ints, NaN, huge, negative, nested, strings),
    CRLF, a BOM, blank lines and garbage between them."""
    lines = [json.dumps(row) for row in rows]
    for position, text in noise:
        lines.insert(min(position, len(lines)), text)
    read_all(newline.join(lines).encode("utf-8", "surrogatepass"), ".jsonl")


@SETTINGS
@given(data=st.binary(max_size=300))
def test_a_mooncake_file_of_any_bytes_reads_or_is_refused_naming_its_line(data: bytes) -> None:
    """Any bytes at all: non-UTF-8, NULs, a gzip header."""
    read_all(data, ".jsonl")


CSV_CELLS = st.one_of(
    st.sampled_from(["2023-11-16 18:15:46.6805900", "2024-05-10 00:00:00.0+00:00", "600",
                     "600.0", "-5", "nan", "1e3", "", " 4", "4 ", "\"4\"", "0", "99999999999"]),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12))
CSV_HEADERS = st.sampled_from(["TIMESTAMP,ContextTokens,GeneratedTokens",
                               "Timestamp,Model,Request tokens,Response tokens,Total tokens,"
                               "Log Type"])


@SETTINGS
@given(header=CSV_HEADERS, rows=st.lists(st.lists(CSV_CELLS, min_size=1, max_size=7),
                                         max_size=5),
       newline=st.sampled_from(["\n", "\r\n", "\r"]), bom=st.booleans())
def test_a_csv_file_of_any_cells_reads_or_is_refused_naming_its_line(
        header: str, rows: list[list[str]], newline: str, bom: bool) -> None:
    """Azure and BurstGPT headers over rows of any cells, any count of them."""
    text = ("\ufeff" if bom else "") + newline.join([header, *(",".join(r) for r in rows)])
    read_all(text.encode(), ".csv")


@SETTINGS
@given(data=st.binary(max_size=300))
def test_a_csv_file_of_any_bytes_reads_or_is_refused_naming_its_line(data: bytes) -> None:
    """Any bytes under the .csv name."""
    read_all(data, ".csv")
