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
    assert (tokenizer.eos_token_ids, tokenizer.bos_token, tokenizer.add_bos,
            tokenizer.chat_template) == ({3, 4}, "a", False, None)


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


# ---- kvtier generate --jsonl lines whose keys contradict or go unread --------------------------

@pytest.mark.parametrize(("line", "shown"), [
    # "prompt" was read when present, "turns" checked in its place: 5.encode(), an
    # internal error (status 70).
    ('{"prompt": 5, "turns": ["hi"]}', 'has both "prompt" and "turns"'),
    # The prompt was answered and the conversation dropped, without a word.
    ('{"prompt": "a", "turns": ["hi", "there"]}', 'has both "prompt" and "turns"'),
    # A misspelt key was ignored: the answer came without its system message.
    ('{"turns": ["hi"], "sytem": "be brief"}', "has a key kvtier does not read: 'sytem'"),
])
def test_a_prompts_line_whose_keys_contradict_or_go_unread_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, shown: str) -> None:
    """A --jsonl line is one prompt or one conversation: one with both, or with a key no
    form has, is refused naming the line, before any model is looked for."""
    import kvtier.cli_generate

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kvtier.cli_generate, "_load", never)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ab"}\n' + line + "\n")
    code, err = run_cli(["generate", "--jsonl", str(path)])
    assert_one_line_refusal(code, err, f"{path} line 2 {shown}")


# ---- an option naming one thing twice -----------------------------------------------------------

@pytest.mark.parametrize(("argv", "shown"), [
    # Every run was made twice: two identical rows in the table, two points on the plot.
    (["sweep", "--gpu-blocks", "4096,2048,4096"],
     "argument --gpu-blocks: 4096 is given twice in '4096,2048,4096'"),
    (["sweep", "--host-blocks", "0,0"], "argument --host-blocks: 0 is given twice in '0,0'"),
    # The first value was dropped without a word.
    (["replay", "--set-profile", "pcie_bytes_per_s=1e9", "--set-profile",
      "pcie_bytes_per_s=2e9"],
     "--set-profile pcie_bytes_per_s is set twice ('1e9', then '2e9')"),
])
def test_an_option_naming_one_value_twice_is_refused_before_any_run(
        monkeypatch: pytest.MonkeyPatch, argv: list[str], shown: str) -> None:
    """A sweep's size list naming a size twice, or a profile constant set twice: refused
    in one line, before any run (as a policy named twice already was)."""
    import kvtier.cli

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulation ran")

    monkeypatch.setattr(kvtier.cli, "simulate", never)
    code, err = run_cli([*argv, "--limit", "2", "--no-progress"])
    assert_one_line_refusal(code, err, shown)


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


# ---- JSON objects with a key twice ---------------------------------------------------------------

def test_a_mooncake_line_with_a_key_twice_names_the_line_and_the_key(tmp_path: Path) -> None:
    """json.loads keeps the last of two values of one key: a line whose hash_ids were
    given twice replayed the second list, without a word. Now TraceFormatError naming the
    line and the key."""
    from kvtier.sim.traces import MooncakeTrace, TraceFormatError

    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 100, "output_length": 10, '
                    '"hash_ids": [1]}\n'
                    '{"timestamp": 5, "input_length": 100, "output_length": 10, '
                    '"hash_ids": [1], "hash_ids": [2]}\n')
    with pytest.raises(TraceFormatError) as refused:
        MooncakeTrace(path)
    assert str(refused.value) == f"{path}:2: field 'hash_ids': given twice in one object"


def test_a_prompts_line_with_a_key_twice_is_refused_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --jsonl line with "prompt" twice answered the second, without a word."""
    import kvtier.cli_generate

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kvtier.cli_generate, "_load", never)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ab", "prompt": "cd"}\n')
    code, err = run_cli(["generate", "--jsonl", str(path)])
    assert_one_line_refusal(code, err, f"{path} line 1 has the key 'prompt' twice")


def test_a_checkpoint_config_with_a_key_twice_names_the_file_and_the_key(
        tmp_path: Path) -> None:
    """config.json with num_hidden_layers twice built the model of the last one."""
    from test_red_team_model import HF_CONFIG

    folder = tmp_path / "ckpt"
    folder.mkdir()
    text = json_text(HF_CONFIG)
    (folder / "config.json").write_text(text[:-1] + ', "num_hidden_layers": 2}')
    with pytest.raises(CheckpointError) as refused:
        load_model(folder)
    assert str(refused.value) == (f"{folder / 'config.json'} is not valid JSON (the key "
                                  "'num_hidden_layers' is given twice in one object)")


def test_a_snapshot_with_a_key_twice_is_malformed() -> None:
    """A snapshot {"i", "n", "n", "b"} resynced the router at the last next_seq."""
    from kvtier.event_codec import decode_snapshot

    with pytest.raises(ValueError) as refused:
        decode_snapshot('{"i": "a", "n": 0, "n": 7, "b": []}')
    assert str(refused.value) == ("malformed snapshot: the key 'n' is given twice in one "
                                  "object")


def json_text(obj: object) -> str:
    """``obj`` as JSON text."""
    import json

    return json.dumps(obj)


# ---- the time model's counts past any engine's -----------------------------------------------

@pytest.mark.parametrize(("call", "shown"), [
    (lambda tm: tm.compute_seconds(10**400, 0), "num_prefill_tokens"),
    (lambda tm: tm.compute_seconds(0, 10**400), "num_decode_seqs"),
    (lambda tm: tm.transfer_seconds(0, 10**400), "bytes_d2h"),
    (lambda tm: tm.step_seconds(0, 0, 10**400, 0), "bytes_h2d"),
    (lambda tm: tm.kv_bytes(2**63), "num_tokens"),
])
def test_time_model_counts_past_int64_name_the_field(call: object, shown: str) -> None:
    """A count past the float range raised OverflowError ("int too large to convert to
    float"), naming no field. Now ValueError naming it, for every count past 2**63 - 1."""
    from kvtier.sim import TimeModel, get_profile

    with pytest.raises(ValueError) as refused:
        call(TimeModel(get_profile("llama3-8b-h100")))  # type: ignore[operator]
    assert str(refused.value).startswith(f"{shown} must be an integer in 0..{2**63 - 1}, got")


def test_a_remote_links_bytes_past_int64_name_the_field() -> None:
    """The same for the fleet's remote link."""
    from kvtier.sim.timemodel import RemoteLink

    with pytest.raises(ValueError) as refused:
        RemoteLink().transfer_seconds(10**400)
    assert str(refused.value).startswith(f"num_bytes must be an integer in 0..{2**63 - 1}, got")


@pytest.mark.parametrize(("policy", "load", "shown"), [
    ("least-loaded", ("a", 10**400, 1), f"loads[0].queue_depth must be at most {2**63 - 1}"),
    ("cache-aware", ("a", 10**400, 1), f"loads[0].queue_depth must be at most {2**63 - 1}"),
    ("least-loaded", ("a", 1, 2**1100), f"loads[0].capacity must be at most {2**63 - 1}"),
])
def test_route_refuses_loads_past_int64_changing_no_stats(policy: str, load: tuple[str, int, int],
                                                          shown: str) -> None:
    """A queue depth (or capacity) past the float range was an OverflowError from inside
    the policy's division ("integer division result too large for a float"). Now refused
    with the other loads' checks, naming the load and the field; no stats counted."""
    from kvtier.router import InstanceLoad, Router, make_policy

    router = Router(make_policy(policy), 4)
    loads = [InstanceLoad(*load), InstanceLoad("b", 10**400, 1)]
    with pytest.raises(ValueError) as refused:
        router.route([1, 2, 3, 4, 5], loads)
    assert str(refused.value).startswith(shown)
    assert router.stats.num_routed == 0 and router.stats.per_instance == {}


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


# ---- Mooncake hash ids that contradict the prefixes they name -----------------------------------

@pytest.mark.parametrize(("rows", "shown"), [
    # One id twice in a prompt: the replay ran in full, then "cannot replay: block_keys must
    # be distinct within a request", naming neither the file, the line nor the field.
    (['[1, 1]'], "1: field 'hash_ids': hash id 1 at index 1 follows hash id 1, but it opens "
                 "the prompt before: a hash id names its whole prefix"),
    # One id after two different prefixes: the oracles counted a hit the cache could never
    # have (its tokens follow other tokens there).
    (['[7, 8]', '[8]'], "2: field 'hash_ids': hash id 8 at index 0 opens the prompt, but it "
                        "follows hash id 7 before: a hash id names its whole prefix"),
    (['[7, 8]', '[9, 8]'], "2: field 'hash_ids': hash id 8 at index 1 follows hash id 9, but "
                           "it follows hash id 7 before: a hash id names its whole prefix"),
])
def test_mooncake_hash_ids_that_contradict_their_prefixes_name_the_line(
        tmp_path: Path, rows: list[str], shown: str) -> None:
    """A Mooncake hash id names a whole prefix, so it always follows the same id (or opens
    the prompt). A trace where it does not is refused when read, naming the line and the id;
    the real traces keep the rule (their 226,714 ids)."""
    from kvtier.sim.traces import MooncakeTrace, TraceFormatError

    path = tmp_path / "t.jsonl"
    lines = [f'{{"timestamp": {i}, "input_length": {512 * row.count(",") + 100}, '
             f'"output_length": 4, "hash_ids": {row}}}' for i, row in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFormatError) as refused:
        MooncakeTrace(path)
    assert str(refused.value) == f"{path}:{shown}"
    assert len(MooncakeTrace(path, limit=len(rows) - 1)) == len(rows) - 1  # read no further
