"""Red team 25c, the model's half: ``generate --raw`` of a Llama 3 checkpoint without its
BOS, a ``--stop`` of a special token's text that never stopped, and a model's answer
driving the terminal."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="GGUF files need the model extra")
pytest.importorskip("torch", reason="the model needs torch")
tokenizers = pytest.importorskip("tokenizers", reason="the tokenizer needs the model extra")

from kvtier.cli import main  # noqa: E402
from kvtier.model.tokenizer import load_tokenizer  # noqa: E402
from test_red_team_model import make_gguf  # noqa: E402

# GPT-2's byte-level alphabet writes the byte ESC (0x1b) as this character.
ESC_TOKEN = "\u011b"


pytest_plugins = ["shared_fixtures"]
# A defect (an unexpected exception) raises with its traceback instead of exit 70.
pytestmark = pytest.mark.usefixtures("debug_mode")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- the BOS of a Llama 3 checkpoint -------------------------------------------------------------

@pytest.mark.parametrize(("pre", "add_bos", "ids"), [
    ("llama-bpe", None, [3, 2]),  # Llama 3's files: no key, and llama.cpp puts a BOS
    ("llama3", None, [3, 2]),
    ("llama-bpe", False, [2]),  # the file says no
    ("default", None, [2]),  # GPT-2's: none unless the file says so
    ("default", True, [3, 2]),
])
def test_a_gguf_of_llama3s_pre_tokenizer_puts_a_bos_unless_it_says_not(
        tmp_path: Path, pre: str, add_bos: bool | None, ids: list[int]) -> None:
    """A Llama 3 GGUF file has no ``tokenizer.ggml.add_bos_token``: llama.cpp puts the BOS
    before a text for its pre-tokenizer unless the file says otherwise; kvtier took the
    missing key for false, and ``generate --raw`` prompts had no BOS."""
    changes: dict[str, tuple[str, object] | None] = {
        "tokenizer__ggml__pre": ("str", pre), "tokenizer__ggml__bos_token_id": ("u32", 3)}
    if add_bos is not None:
        changes["tokenizer__ggml__add_bos_token"] = ("bool", add_bos)
    tokenizer = load_tokenizer(make_gguf(tmp_path / "m.gguf", **changes))
    assert tokenizer.encode("ab") == ids


@pytest.mark.parametrize(("prompt", "why"), [
    ("zz", "prompt 'zz' has no token in this model's vocabulary"),
    ("", "its prompt is empty: no token to answer"),
])
@pytest.mark.parametrize("changes", [
    {"tokenizer__ggml__pre": ("str", "llama-bpe")},  # a BOS by llama.cpp's default
    {"tokenizer__ggml__add_bos_token": ("bool", True)},  # a BOS the file asks for
])
def test_a_raw_prompt_of_no_token_but_the_bos_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, object],
        prompt: str, why: str) -> None:
    """Under --raw a prompt with no token of the vocabulary ("zz") or none at all was
    refused by its empty list of ids; with a BOS put before every text that list is
    [BOS], and the model answered from the BOS alone, the prompt lost without a word. Now
    a prompt of nothing but what the tokenizer puts before any text is refused as
    before."""
    model = make_gguf(tmp_path / "m.gguf", tokenizer__ggml__bos_token_id=("u32", 3),
                      **changes)  # type: ignore[arg-type]
    code, out, err = run(capsys, "generate", "--raw", "ab", prompt, "--model", str(model),
                         "--device", "cpu", "--max-new-tokens", "2")
    assert (code, out) == (2, "")
    assert err == f"kvtier: error: PROMPT 1 (conversation 1), turn 0: {why}\n"


def make_hf_tokenizer(folder: Path, config: dict[str, object], bos_processor: bool) -> Path:
    """A Hugging Face directory with a word-level tokenizer of a, b, c, <|begin_of_text|>
    (id 3), whose post-processor (``bos_processor``) puts that token before a text, as
    Llama 3's does."""
    from tokenizers import processors

    folder.mkdir()
    vocab = {token: i for i, token in enumerate(["a", "b", "c", "<|begin_of_text|>", "e"])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="e"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.add_special_tokens([tokenizers.AddedToken("<|begin_of_text|>", special=True)])
    if bos_processor:
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 3)])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize(("config", "bos_processor", "ids"), [
    # Llama 3: no add_bos_token; the post-processor puts <|begin_of_text|> first.
    ({"bos_token": "<|begin_of_text|>"}, True, [3, 0, 1]),
    ({"bos_token": "<|begin_of_text|>", "add_bos_token": False}, True, [0, 1]),
    ({"bos_token": "<|begin_of_text|>"}, False, [0, 1]),
    ({"bos_token": "<|begin_of_text|>", "add_bos_token": True}, False, [3, 0, 1]),
    ({}, True, [0, 1]),  # no BOS named: none
])
def test_a_hf_tokenizer_whose_post_processor_puts_a_bos_keeps_it(
        tmp_path: Path, config: dict[str, object], bos_processor: bool, ids: list[int]) -> None:
    """Llama 3's tokenizer_config.json has no ``add_bos_token``: its tokenizer.json's
    post-processor puts the BOS first (transformers encodes with it), and kvtier encodes
    without the post-processor: a raw prompt had no BOS. Now the post-processor's BOS is
    kept where the config does not say."""
    tokenizer = load_tokenizer(make_hf_tokenizer(tmp_path / "ckpt", config, bos_processor))
    assert tokenizer.encode("a b") == ids


# ---- config.json numbers past the float range --------------------------------------------------

@pytest.mark.parametrize(("key", "where"), [
    ("rope_theta", "rope_theta"), ("rms_norm_eps", "rms_norm_eps"),
    ("factor", "rope_scaling.factor"), ("low_freq_factor", "rope_scaling.low_freq_factor"),
    ("rope_theta_nested", "rope_scaling.rope_theta"),
])
def test_a_config_number_past_the_float_range_names_its_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, where: str) -> None:
    """JSON writes an integer of any length: a config.json number of 400 digits (a
    rope_theta, an rms_norm_eps, a llama3 rope_scaling factor) raised OverflowError from
    float(), an internal error (status 70) of `kvtier generate` naming nothing. Now
    refused naming the file and the key, before any tensor is looked for."""
    from test_red_team_model import HF_CONFIG

    huge = "1" + "0" * 400
    config: dict[str, object] = {**HF_CONFIG, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}
    nested = key in ("factor", "low_freq_factor", "rope_theta_nested")
    name = "rope_theta" if key == "rope_theta_nested" else key
    target = config["rope_scaling"] if nested else config
    assert isinstance(target, dict)
    target[name] = "HUGE"
    text = json.dumps(config).replace('"HUGE"', huge)
    folder = make_hf_tokenizer(tmp_path / "ckpt", {"bos_token": "a"}, False)
    (folder / "config.json").write_text(text)
    code, out, err = run(capsys, "generate", "--raw", "a", "--model", str(folder), "--device",
                         "cpu")
    assert (code, out) == (2, "")
    assert err == (f"kvtier: error: {folder / 'config.json'}: {where} must be a finite number, "
                   f"got {huge[:60]}\n")


# ---- a stop of a special token's text ------------------------------------------------------------

@pytest.fixture
def special_model(tmp_path: Path) -> Path:
    """The tiny GGUF with token 3 a special (control) token ``<|x|>``: greedy from "a" it
    answers e e e e e <|x|> a <|x|> ..."""
    return make_gguf(tmp_path / "s.gguf",
                     tokenizer__ggml__tokens=("arr", ["a", "b", "ab", "<|x|>", "e", "f"]),
                     tokenizer__ggml__token_type=("arr", [1, 1, 1, 3, 1, 1]))


@pytest.mark.parametrize(("stop", "num_tokens", "text"), [
    ("<|x|>", 6, "eeeee"),
    ("e<|x|>", 6, "eeee"),  # text before the special token is cut with the stop
    ("<|x|>a<|x|>", 8, "eeeee"),
    ("ea", 7, "eeee"),  # a stop in the text alone: across the special token, as before
])
def test_a_stop_of_a_special_tokens_text_ends_the_answer_there(
        capsys: pytest.CaptureFixture[str], special_model: Path, stop: str, num_tokens: int,
        text: str) -> None:
    """``--stop '<|x|>'`` where the model emits the special token <|x|> (not its EOS): the
    stop was looked for in the text, which leaves special tokens out, so it never matched
    and the answer ran to --max-new-tokens. Now it stops there, its text cut before the
    stop."""
    code, out, err = run(capsys, "generate", "--raw", "a", "--model", str(special_model),
                         "--device", "cpu", "--max-new-tokens", "12", "--stop", stop)
    assert (code, err) == (0, "")
    turn = json.loads(out.splitlines()[-1])["turns"][0]
    assert (turn["stop_reason"], turn["num_output_tokens"], turn["text"]) == (
        "stop", num_tokens, text)


# ---- the tokens a generation ends at -------------------------------------------------------------

@pytest.mark.parametrize(("changes", "ends"), [
    # SmolLM2's file names <|im_end|> its EOS; llama.cpp also ends at <|endoftext|>.
    ({"tokenizer__ggml__tokens": ("arr", ["a", "b", "ab", "<|endoftext|>", "e", "f"]),
      "tokenizer__ggml__token_type": ("arr", [1, 1, 1, 3, 1, 1])}, {3, 5}),
    ({"tokenizer__ggml__tokens": ("arr", ["a", "b", "ab", "<|eot_id|>", "e", "f"])}, {3, 5}),
    ({"tokenizer__ggml__eom_token_id": ("u32", 3)}, {3, 5}),  # end of message
    ({}, {5}),
])
def test_a_gguf_ends_a_generation_where_llama_cpp_does(
        tmp_path: Path, changes: dict[str, tuple[str, object]], ends: set[int]) -> None:
    """llama.cpp ends a generation at the EOS, the end-of-turn and end-of-message ids and
    at every token whose text ends a turn (<|endoftext|>, <|eot_id|>, <|im_end|>, ...);
    kvtier read the EOS and end-of-turn ids alone: a model that ended its answer with
    <|endoftext|> (SmolLM2's, named by no key) had it skipped in the text and ran on."""
    tokenizer = load_tokenizer(make_gguf(tmp_path / "m.gguf", **changes))
    assert tokenizer.eos_token_ids == ends


def test_generate_stops_at_a_token_that_ends_a_turn(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Greedy from "a" the tiny model answers e e e e e <|endoftext|> a ...: it ran on to
    --max-new-tokens, the text "eeeeeaaa"; now it stops there, as at its EOS."""
    model = make_gguf(tmp_path / "m.gguf",
                      tokenizer__ggml__tokens=("arr", ["a", "b", "ab", "<|endoftext|>", "e", "f"]),
                      tokenizer__ggml__token_type=("arr", [1, 1, 1, 3, 1, 1]))
    code, out, err = run(capsys, "generate", "--raw", "a", "--model", str(model), "--device",
                         "cpu", "--max-new-tokens", "12")
    assert (code, err) == (0, "")
    turn = json.loads(out.splitlines()[-1])["turns"][0]
    assert (turn["stop_reason"], turn["num_output_tokens"], turn["text"]) == (
        "stop_token", 6, "eeeee")


# ---- what reaches the terminal -------------------------------------------------------------------

class _Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def test_a_models_escape_sequences_reach_a_terminal_escaped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose answer holds ESC (here its token 3 is the byte 0x1b: greedy from "a"
    it answers ``eeeee ESC a ESC``) and a prompt holding one were printed as they were: on
    a terminal they move the cursor, recolour or retitle the window. Now every control
    character but newline and tab reaches a terminal as its escape; the JSON line keeps
    the text as it is."""
    model = make_gguf(tmp_path / "m.gguf",
                      tokenizer__ggml__tokens=("arr", ["a", "b", "ab", ESC_TOKEN, "e", "f"]))
    out = _Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", "--raw", "a", "b\x1b]0;t\x07", "--model", str(model), "--device",
                 "cpu", "--max-new-tokens", "8"]) == 0
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["--- conversation 0 turn 0: a", "eeeee\\x1ba\\x1b"]
    assert lines[3] == "--- conversation 1 turn 0: b\\x1b]0;t\\x07"
    assert not any(c in out.getvalue() for c in "\x1b\x07")
    assert json.loads(lines[-1])["turns"][0]["text"] == "eeeee\x1ba\x1b"


def test_chat_switch_takes_the_command_lines_numbers(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``/switch N`` reads N as every number of the command line: int() took '\u0661' (an
    Arabic-Indic 1) and ' +1'-like forms for 1."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("/new\n/switch \u0660\n/switch +0\n/quit\n"))
    model = make_gguf(tmp_path / "c.gguf", tokenizer__chat_template=(
        "str", "{% for m in messages %}{{ m['content'] }}{% endfor %}"))
    code, out, err = run(capsys, "chat", "--model", str(model), "--device", "cpu",
                         "--max-new-tokens", "2")
    assert (code, err) == (0, "")
    assert out.splitlines()[:3] == ["(conversation 1)", "(usage: /switch N with N in 0..1)",
                                    "(usage: /switch N with N in 0..1)"]
