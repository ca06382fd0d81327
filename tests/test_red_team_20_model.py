"""Red team, twentieth pass, the model's half: checkpoint metadata that cannot be read as
what it claims to be (GGUF strings that are no UTF-8, sizes of 0, keys given twice),
tokenizer settings of the wrong type taken silently, and `kvtier chat`'s commands."""

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


# ---- tokenizer settings of the wrong type ------------------------------------------------------

def make_tokenizer_dir(folder: Path, files: dict[str, str]) -> Path:
    """A Hugging Face directory with a word-level tokenizer.json of tokens a..e (ids 0..4),
    and ``files`` (name: JSON text) beside it."""
    import tokenizers

    folder.mkdir()
    vocab = {token: i for i, token in enumerate("abcde")}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="e"))
    backend.save(str(folder / "tokenizer.json"))
    for name, text in {"config.json": "{}", **files}.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(("name", "text", "shown"), [
    # bool("false") is True: a BOS was put before every prompt.
    ("tokenizer_config.json", '{"add_bos_token": "false", "bos_token": "a"}',
     "add_bos_token must be true or false, got 'false'"),
    # taken as stop_token_ids: "stop_token_ids must be a frozenset of integers >= 0, got
    # frozenset({-1})", naming neither the file nor the key.
    ("config.json", '{"eos_token_id": -1}',
     "eos_token_id must be a token id (an integer in 0..4294967295) or an array of them, "
     "got -1"),
    ("generation_config.json", '{"eos_token_id": [2, 99999999999]}',
     "eos_token_id must be a token id (an integer in 0..4294967295) or an array of them, "
     "got [2, 99999999999]"),
    # dropped silently: the model never stopped at its end of text.
    ("generation_config.json", '{"eos_token_id": "2"}',
     "eos_token_id must be a token id (an integer in 0..4294967295) or an array of them, "
     "got '2'"),
    ("generation_config.json", '{"eos_token_id": [true]}',
     "eos_token_id must be a token id (an integer in 0..4294967295) or an array of them, "
     "got [True]"),
    # dropped silently: `kvtier chat` said "this checkpoint has no chat template".
    ("tokenizer_config.json", '{"chat_template": 5}',
     "chat_template must be a string or an array of named templates, got 5"),
    ("tokenizer_config.json", '{"eos_token": 3}',
     'eos_token must be a string or an object with a string "content", got 3'),
    ("tokenizer_config.json", '{"bos_token": {"content": ["a"]}}',
     'bos_token must be a string or an object with a string "content", got '
     "{'content': ['a']}"),
])
def test_hf_tokenizer_settings_of_the_wrong_type_name_the_file_and_the_key(
        tmp_path: Path, name: str, text: str, shown: str) -> None:
    """tokenizer_config.json, generation_config.json and config.json settings of the wrong
    type were taken (bool of a string) or dropped without a word. Now CheckpointError naming
    the file and the key."""
    folder = make_tokenizer_dir(tmp_path / "ckpt", {name: text})
    with pytest.raises(CheckpointError) as refused:
        load_tokenizer(folder)
    assert str(refused.value) == f"{folder / name}: {shown}"


def test_hf_tokenizer_settings_of_the_right_type_still_load(tmp_path: Path) -> None:
    """What a real checkpoint writes still loads: null for what is unset, an array of EOS
    ids, special tokens as objects, named templates without a default."""
    folder = make_tokenizer_dir(tmp_path / "ckpt", {
        "config.json": '{"eos_token_id": null, "bos_token_id": 0}',
        "generation_config.json": '{"eos_token_id": [3, 4]}',
        "tokenizer_config.json": '{"add_bos_token": null, "bos_token": {"content": "a"}, '
                                 '"eos_token": null, "chat_template": [{"name": "tool_use", '
                                 '"template": "x"}]}'})
    tokenizer = load_tokenizer(folder)
    assert set(tokenizer.eos_token_ids) == {3, 4}
    assert (tokenizer.bos_token, tokenizer.add_bos, tokenizer.chat_template) == (
        "a", False, None)


@pytest.mark.parametrize(("changes", "shown"), [
    # bool("false") is True.
    ({"tokenizer__ggml__add_bos_token": ("str", "false")},
     "tokenizer.ggml.add_bos_token must be true or false, got 'false'"),
    # past the vocabulary: never sampled, so never a stop.
    ({"tokenizer__ggml__eos_token_id": ("u32", 6)},
     "tokenizer.ggml.eos_token_id must be a token id, got 6 (the vocabulary's ids are 0..5)"),
    # past the vocabulary: no BOS was put before the prompt, without a word.
    ({"tokenizer__ggml__bos_token_id": ("u32", 1000)},
     "tokenizer.ggml.bos_token_id must be a token id, got 1000 (the vocabulary's ids "
     "are 0..5)"),
])
def test_gguf_tokenizer_settings_that_lie_name_the_key(
        tmp_path: Path, changes: dict[str, tuple[str, object]], shown: str) -> None:
    """GGUF tokenizer settings of the wrong type or past the vocabulary were taken or
    dropped silently. Now CheckpointError naming the file and the key."""
    path = make_gguf(tmp_path / "t.gguf", **changes)
    with pytest.raises(CheckpointError) as refused:
        load_tokenizer(path)
    assert str(refused.value) == f"{path}: {shown}"


@pytest.mark.parametrize(("changes", "shown"), [
    # `or`: a 0 was taken as unset, the heads' own size or count put in its place.
    ({"num_key_value_heads": 0}, "num_kv_heads must be an integer >= 1, got 0"),
    ({"head_dim": 0}, "head_dim must be an integer >= 1, got 0"),
])
def test_hf_config_sizes_of_zero_are_refused_not_replaced(changes: dict[str, object],
                                                          shown: str) -> None:
    """config.json's num_key_value_heads or head_dim of 0 was read as absent: the model was
    built with as many K/V heads as query heads (a checkpoint of that shape loaded), or
    hidden_size / heads as the head size. Now refused naming the value, as GGUF's are."""
    from kvtier.model.safetensors_loader import config_from_hf
    from test_red_team_model import HF_CONFIG

    with pytest.raises(CheckpointError) as refused:
        config_from_hf({**HF_CONFIG, **changes}, "c.json")
    assert str(refused.value) == f"c.json: {shown}"


def test_a_checkpoint_config_with_a_key_twice_names_the_file_and_the_key(
        tmp_path: Path) -> None:
    """config.json with num_hidden_layers twice built the model of the last one."""
    import json

    from test_red_team_model import HF_CONFIG

    folder = tmp_path / "ckpt"
    folder.mkdir()
    text = json.dumps(HF_CONFIG)
    (folder / "config.json").write_text(text[:-1] + ', "num_hidden_layers": 2}')
    with pytest.raises(CheckpointError) as refused:
        load_model(folder)
    assert str(refused.value) == (f"{folder / 'config.json'} is not valid JSON (the key "
                                  "'num_hidden_layers' is given twice in one object)")


# ---- kvtier chat: a message that only starts like a command ------------------------------------

def test_chat_answers_a_message_that_only_starts_with_switch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Any line starting with "/switch" was taken as the command: "/switchboard is down"
    was not answered, the usage line printed in its place. Now only the word /switch is
    the command (as /new and /quit are whole words); the rest are messages."""
    import io
    import json
    import sys

    from kvtier.cli import main
    from test_red_team_13 import make_chat_gguf

    path = make_chat_gguf(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(
        b"/switchboard ab\n/new\n/switch 0\n/switch\n"), encoding="utf-8"))
    code = main(["chat", "--model", str(path), "--device", "cpu", "--max-new-tokens", "2"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out.count("(usage: /switch N with N in 0..1)") == 1  # the bare /switch only
    assert "(conversation 0)" in out
    summary = json.loads(out[-1])
    assert [(t["conversation"], t["turn"]) for t in summary["turns"]] == [(0, 0)]
