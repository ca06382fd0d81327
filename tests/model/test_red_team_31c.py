"""Red team 31c, the model's half: checkpoints cut short, and a block table that names a
block twice."""

from __future__ import annotations

from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="GGUF files need the model extra")
pytest.importorskip("torch", reason="the model needs torch")

import torch  # noqa: E402

from kvtier.model import LlamaModel, ModelConfig  # noqa: E402
from kvtier.model.checkpoint import CheckpointError, load_model  # noqa: E402
from kvtier.model.gguf_loader import open_gguf  # noqa: E402
from kvtier.model.tokenizer import load_tokenizer  # noqa: E402
from kvtier.storage import KVStorage  # noqa: E402
from model.test_red_team_24c_model import make_gguf  # noqa: E402


def cut(path: Path, size: int) -> Path:
    """``path``'s first ``size`` bytes, as a file of their own beside it."""
    short = path.with_name(f"cut-{size}.gguf")
    short.write_bytes(path.read_bytes()[:size])
    open_gguf.cache_clear()
    return short


def test_a_gguf_cut_inside_a_tensor_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    """A GGUF file cut short inside a tensor's data (a download cut off) raised numpy's
    'cannot reshape array of size 124 into shape (8,16)' inside a CheckpointError: no tensor
    named, no word that the file is short. Now it names the file, its size and the tensor
    whose bytes lie past its end; the tokenizer's reader says the same."""
    whole = make_gguf(tmp_path / "m.gguf")
    tensors = open_gguf(whole).tensors
    last = max(tensors, key=lambda t: t.data_offset)
    start, end = int(last.data_offset), int(last.data_offset) + int(last.n_bytes)
    short = cut(whole, end - 16)
    message = (f"{short} is truncated or corrupt: the file holds {end - 16:,} bytes, and "
               f"tensor {last.name!r} lies at bytes {start:,}..{end:,}")
    with pytest.raises(CheckpointError) as refused:
        load_model(short)
    assert str(refused.value) == message
    with pytest.raises(CheckpointError) as refused:
        load_tokenizer(short)
    assert str(refused.value) == message


@pytest.mark.parametrize("size", [30, 200])
def test_a_gguf_cut_inside_its_header_is_refused_saying_so(tmp_path: Path, size: int) -> None:
    """Cut inside its metadata, a GGUF file raised 'index 0 is out of bounds for axis 0
    with size 0' (or a dtype view's complaint) inside a CheckpointError. Now the message
    says the header runs past the file's end."""
    short = cut(make_gguf(tmp_path / "m.gguf"), size)
    with pytest.raises(CheckpointError) as refused:
        load_model(short)
    text = str(refused.value)
    assert text.startswith(f"{short} is truncated or corrupt: the file holds {size:,} bytes, "
                           "and its header (metadata and tensor list) runs past them"), text


def test_a_whole_gguf_still_loads_as_before(tmp_path: Path) -> None:
    """The checked reader reads a whole file as the gguf package's reader does."""
    path = make_gguf(tmp_path / "m.gguf")
    mine = open_gguf(path)
    theirs = gguf.GGUFReader(str(path))
    assert [(t.name, int(t.data_offset)) for t in mine.tensors] == [
        (t.name, int(t.data_offset)) for t in theirs.tensors]
    assert list(mine.fields) == list(theirs.fields)
    load_model(path)


def test_a_block_table_naming_a_block_twice_is_refused_writing_nothing() -> None:
    """``forward_chunk`` over a hand-built table ``[1, 1]`` wrote positions 4..7 over 0..3
    in block 1 and read them twice: logits of another context, without a word. Now
    ValueError naming both places, before any K/V is written; a table of distinct blocks
    still gives the cacheless logits."""
    model = LlamaModel(ModelConfig(), "cpu")
    kv = KVStorage(model.config.kv_layout(4), 4)
    kv.fill_(0.5)
    tokens = list(range(3, 11))
    with pytest.raises(ValueError, match=r"^block_table\[1\] is block 1, as block_table\[0\] "
                                         r"is: each block holds its own positions$"):
        model.forward_chunk(kv, [1, 1, 2], tokens, 0)
    assert all(bool((t == 0.5).all()) for t in kv.tensors)  # nothing written
    logits = model.forward_chunk(kv, [1, 3], tokens, 0)
    torch.testing.assert_close(logits, model.full_recompute(tokens))
