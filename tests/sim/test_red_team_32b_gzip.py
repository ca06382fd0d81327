"""Red team 32b: gzipped traces (public traces ship as ``.jsonl.gz``) read as the plain
file reads, streamed, with the same line numbers in errors; a damaged one refused naming
the file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.cli import main
from kvtier.sim import AzureTrace, MooncakeTrace, TraceFormatError


def mooncake_rows(n: int) -> list[dict[str, object]]:
    return [{"timestamp": 1000 * i, "input_length": 1100, "output_length": 4,
             "hash_ids": [0, 1, 2 + i]} for i in range(n)]


def azure_text(n: int) -> str:
    return "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:{i // 60:02d}:{i % 60:02d}.0,{100 + i},{i % 7 + 1}\n" for i in range(n))


MOONCAKE_ROWS = mooncake_rows(6)
AZURE_TEXT = azure_text(6)


def jsonl(rows: list[dict[str, object]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def requests(trace: MooncakeTrace | AzureTrace) -> list[tuple[object, ...]]:
    return [(r.request_id, r.arrival_s, r.prompt, r.output_length, r.session_id) for r in trace]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("reader", "suffix", "data"), [
    (MooncakeTrace, ".jsonl", jsonl(MOONCAKE_ROWS)),
    (AzureTrace, ".csv", AZURE_TEXT.encode()),
])
def test_a_gzipped_trace_reads_as_the_plain_one(tmp_path: Path, reader: type, suffix: str,
                                                data: bytes) -> None:
    """``t.jsonl.gz`` (and gzip bytes under the plain name: told by the magic bytes) yields
    the plain file's requests, ids and description alike; a limit too."""
    plain = reader(write(tmp_path / f"t{suffix}", data))
    want = requests(plain)
    assert len(want) == 6
    (tmp_path / "gz").mkdir()
    zipped = reader(write(tmp_path / "gz" / f"t{suffix}.gz", gzip.compress(data)))
    assert requests(zipped) == want
    assert zipped.name == "t"
    (tmp_path / "named").mkdir()
    unnamed = reader(write(tmp_path / "named" / f"t{suffix}", gzip.compress(data)))
    assert requests(unnamed) == want
    limited = reader(tmp_path / "gz" / f"t{suffix}.gz", limit=2)
    assert requests(limited) == want[:2]


@pytest.mark.parametrize(("reader", "suffix", "data", "line"), [
    (MooncakeTrace, ".jsonl", jsonl(MOONCAKE_ROWS[:3]) + b'{"timestamp": oops}\n', 4),
    (AzureTrace, ".csv", (AZURE_TEXT + "2023-11-16 18:15:49.0,x,1\n").encode(), 8),
    (AzureTrace, ".csv", azure_text(3).encode() + b"2023-11-16 18:15:49.0,\xff,1\n", 5),
    (MooncakeTrace, ".jsonl", jsonl(MOONCAKE_ROWS[:2]) + b"\xff\xfe\n", 3),
])
def test_a_gzipped_traces_errors_name_the_plain_files_line(
        tmp_path: Path, reader: type, suffix: str, data: bytes, line: int) -> None:
    """A malformed row is refused at the line it has uncompressed."""
    with pytest.raises(TraceFormatError) as plain:
        reader(write(tmp_path / f"t{suffix}", data))
    with pytest.raises(TraceFormatError) as zipped:
        reader(write(tmp_path / f"t{suffix}.gz", gzip.compress(data)))
    assert plain.value.line_number == zipped.value.line_number == line
    assert plain.value.field == zipped.value.field
    assert str(zipped.value).startswith(f"{tmp_path / f't{suffix}.gz'}:{line}:")


def damaged(data: bytes, how: str) -> bytes:
    """``data`` gzipped, then cut short or with its deflate stream overwritten."""
    zipped = gzip.compress(data)
    if how == "truncated":
        return zipped[: len(zipped) // 2]
    if how == "corrupt":
        middle = len(zipped) // 2
        return zipped[:middle] + b"\xff" * 8 + zipped[middle + 8:]
    assert how == "bad crc"
    return zipped[:-8] + bytes(b ^ 0xFF for b in zipped[-8:-4]) + zipped[-4:]


@pytest.mark.parametrize("reader,suffix,data", [
    (MooncakeTrace, ".jsonl", jsonl(mooncake_rows(240))),
    (AzureTrace, ".csv", azure_text(240).encode()),
])
@pytest.mark.parametrize("how", ["truncated", "corrupt", "bad crc"])
def test_a_damaged_gzip_is_refused_naming_the_file(
        tmp_path: Path, reader: type, suffix: str, data: bytes, how: str) -> None:
    """A truncated or corrupt .gz is a TraceFormatError naming the file, a line and
    "<gzip>", never EOFError or zlib.error (status 70 from the CLI)."""
    path = write(tmp_path / f"t{suffix}.gz", damaged(data, how))
    with pytest.raises(TraceFormatError) as refused:
        reader(path)
    if refused.value.field == "<gzip>":
        assert str(refused.value).startswith(f"{path}:{refused.value.line_number}: field "
                                             "'<gzip>': the compressed data is truncated "
                                             "or corrupt")
    else:  # corrupt bytes that inflate to a row the reader refuses: named as any row
        assert how == "corrupt", refused.value


def test_a_gzipped_trace_is_streamed(tmp_path: Path) -> None:
    """With a limit, only the rows kept are decompressed: a file damaged far past them
    reads (the whole file decompressed first would be refused)."""
    data = jsonl(MOONCAKE_ROWS[:2]) + jsonl(MOONCAKE_ROWS[:1] * 20_000)
    path = write(tmp_path / "t.jsonl.gz", damaged(data, "truncated"))
    with pytest.raises(TraceFormatError):
        MooncakeTrace(path)
    assert len(MooncakeTrace(path, limit=2)) == 2


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200), cut=st.integers(0, 300), suffix=st.sampled_from(
    [".jsonl", ".csv"]))
def test_any_gzip_cut_anywhere_reads_or_is_refused_naming_its_line(
        data: bytes, cut: int, suffix: str) -> None:
    """Any bytes gzipped and cut anywhere: requests, or a TraceFormatError naming the
    file and a line; never another exception."""
    import tempfile

    reader = MooncakeTrace if suffix == ".jsonl" else AzureTrace
    with tempfile.TemporaryDirectory(prefix="rt32b-") as folder:
        path = write(Path(folder) / f"t{suffix}.gz", gzip.compress(data)[:cut])
        try:
            sum(1 for _ in reader(path))
        except TraceFormatError as exc:
            assert str(exc).startswith(f"{path}:") and exc.line_number >= 1, exc


@pytest.mark.parametrize(("name", "suffix"), [
    ("t.jsonl.gz", ".jsonl"), ("T.CSV.GZ", ".csv"), ("t.jsonl", ".jsonl"), ("t.gz", ""),
    ("t.tar.gz", ".tar"), ("t", "")])
def test_the_format_suffix_passes_over_gz(name: str, suffix: str) -> None:
    """What names the reader: the suffix before a ``.gz``."""
    from kvtier.sim.trace_file import format_suffix

    assert format_suffix(Path(name)) == suffix


@pytest.mark.parametrize(("suffix", "data"), [(".jsonl", jsonl(MOONCAKE_ROWS)),
                                              (".csv", AZURE_TEXT.encode())])
def test_kvtier_replay_reads_a_gzipped_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             suffix: str, data: bytes) -> None:
    """``kvtier replay t.jsonl.gz`` replays what ``t.jsonl`` replays (it was refused:
    "TRACE must be a .jsonl ... file")."""
    outs = []
    for name, content in ((f"t{suffix}", data), (f"t{suffix}.gz", gzip.compress(data))):
        code = main(["replay", "--no-progress", str(write(tmp_path / name, content))])
        out, err = capsys.readouterr()
        assert (code, err) == (0, ""), err
        outs.append(json.loads(out.splitlines()[-1]))
    for report in outs:
        del report["workload"], report["cpu"]  # the file's path; the run's own timing
    assert outs[0] == outs[1]


def test_kvtier_replay_refuses_a_gz_naming_no_format(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A ``.gz`` with no format before it is a usage error saying what is read."""
    code = main(["replay", "--no-progress", str(write(tmp_path / "t.gz",
                                                         gzip.compress(b"x")))])
    _, err = capsys.readouterr()
    assert code == 2
    assert "TRACE must be a .jsonl (Mooncake, Bailian) or .csv (Azure, BurstGPT) file" in err
    assert "(gzipped: .jsonl.gz, .csv.gz)" in err
