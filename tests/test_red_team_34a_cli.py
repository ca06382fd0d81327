"""Red team 34a, the command line: ``kvtier generate --jsonl`` reads a gzip file as every
trace reader does (told by its magic bytes, decompressed as it is read)."""

from __future__ import annotations

from typing import Any

import pytest


def test_generate_reads_a_gzipped_jsonl_as_the_plain_one(tmp_path: Any) -> None:
    """``--jsonl prompts.jsonl.gz`` (or a gzip file of any name: told by its magic bytes)
    gives the prompts of the plain file; it was refused as 'line 1 is not UTF-8 text'."""
    import gzip

    from kvtier.cli_generate import _read_jsonl

    text = ('{"prompt": "Hello"}\n\n{"turns": ["a", "b"], "system": "s"}\n'
            '{"prompt": "caf\\u00e9 \u00e9t\u00e9"}\n')
    plain = tmp_path / "prompts.jsonl"
    plain.write_text(text, encoding="utf-8")
    expected = _read_jsonl(plain)
    assert len(expected) == 3
    for name in ("prompts.jsonl.gz", "prompts.jsonl"):
        packed = tmp_path / "gz" / name
        packed.parent.mkdir(exist_ok=True)
        packed.write_bytes(gzip.compress(text.encode("utf-8")))
        assert packed.read_bytes()[:2] == b"\x1f\x8b"
        assert _read_jsonl(packed) == expected


def test_generate_refuses_a_damaged_gzip_naming_the_file(tmp_path: Any) -> None:
    """A truncated .gz is one CLIError naming the file and the line being read when its
    data ended, no traceback."""
    import gzip

    from kvtier.cli_error import CLIError
    from kvtier.cli_generate import _read_jsonl

    path = tmp_path / "p.jsonl.gz"
    data = gzip.compress(b'{"prompt": "x"}\n' * 2000)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CLIError, match=r"p\.jsonl\.gz:[0-9]+: field '<gzip>': the "
                                       r"compressed data is truncated or corrupt"):
        _read_jsonl(path)
