"""Red team, twentieth pass: checkpoint metadata that cannot be read as what it claims to
be (GGUF strings that are no UTF-8), tokenizer settings of the wrong type taken silently."""

from __future__ import annotations

from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="GGUF files need the model extra")
pytest.importorskip("torch", reason="the model needs torch")
pytest.importorskip("tokenizers", reason="the tokenizer needs the model extra")

from bad_input_helpers import assert_one_line_refusal, run_cli  # noqa: E402
from kvtier.model.checkpoint import CheckpointError, load_model  # noqa: E402
from kvtier.model.gguf_loader import open_gguf  # noqa: E402
from kvtier.model.tokenizer import load_tokenizer  # noqa: E402
from test_red_team_model import make_gguf  # noqa: E402


def spoil_string(path: Path, value: bytes) -> Path:
    """``path`` with the first byte of the metadata string ``value`` (with its 8-byte
    length before it) turned into 0x80, a byte UTF-8 never starts a character with."""
    data = bytearray(path.read_bytes())
    at = data.index(len(value).to_bytes(8, "little") + value) + 8
    data[at] = 0x80
    path.write_bytes(bytes(data))
    open_gguf.cache_clear()
    return path


@pytest.mark.parametrize(("value", "load", "key"), [
    (b"llama", load_model, "general.architecture"),
    (b"gpt2", load_tokenizer, "tokenizer.ggml.model"),
    (b"ab", load_tokenizer, "tokenizer.ggml.tokens"),  # a string inside an array
])
def test_a_gguf_string_that_is_no_utf8_names_the_file_and_the_key(
        tmp_path: Path, value: bytes, load: object, key: str) -> None:
    """A metadata string whose bytes are no UTF-8 (a flipped bit) raised the gguf package's
    UnicodeDecodeError when the value was first read: `kvtier generate` printed "'utf-8'
    codec can't decode byte 0x80 in position 0", naming neither the file nor the key. Now
    CheckpointError naming both."""
    path = spoil_string(make_gguf(tmp_path / "m.gguf"), value)
    with pytest.raises(CheckpointError) as refused:
        load(path)  # type: ignore[operator]
    assert str(refused.value) == (f"{path}: metadata key {key} is no UTF-8 text ('utf-8' "
                                  "codec can't decode byte 0x80 in position 0: invalid start "
                                  "byte)")


def test_generate_on_a_gguf_with_a_spoilt_string_is_one_line_naming_the_key(
        tmp_path: Path) -> None:
    """The command line says which file and which key."""
    path = spoil_string(make_gguf(tmp_path / "m.gguf"), b"llama")
    code, err = run_cli(["generate", "ab", "--model", str(path), "--raw", "--device", "cpu"])
    assert_one_line_refusal(code, err, f"{path}: metadata key general.architecture is no "
                                       "UTF-8 text")
