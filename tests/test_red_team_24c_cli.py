"""Red team 24c, the command line's half: ``kvtier generate`` refusing one prompt of many.

Only a prompt too long for the context was refused naming its ``--jsonl`` line (or
PROMPT), conversation and turn; every other refusal of one conversation's prompt (empty
under ``--raw``, the chat template's own ``raise_exception``, an id past the model's
vocabulary) came in the generator's words ("prompt 1 is empty", the index among the
conversations still talking, not the line), and the turns answered before it had no JSON
line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

for _name in ("gguf", "numpy", "torch", "tokenizers"):
    pytest.importorskip(_name, reason="the model extra: pip install 'kvtier[model]'")

from test_red_team_23b import run_cli  # noqa: E402
from test_red_team_model import make_gguf  # noqa: E402

# A template that joins the contents, and refuses one of them by its own raise_exception.
TEMPLATE = ("{% for m in messages %}{% if m['content'] == 'stop' %}"
            "{{ raise_exception('no stop here') }}{% endif %}{{ m['content'] }}{% endfor %}")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """test_red_team_model's tiny GGUF (tokens a, b, ab, d, e, f; context 64)."""
    return make_gguf(tmp_path / "m.gguf", tokenizer__chat_template=("str", TEMPLATE))


def generate(capsys: pytest.CaptureFixture[str], model: Path, *args: str
             ) -> tuple[int, str, str]:
    return run_cli(capsys, "generate", *args, "--model", str(model), "--max-new-tokens", "2",
                   "--device", "cpu")


@pytest.mark.parametrize(("lines", "refusal"), [
    # Line 3 is the second prompt: "prompt 1 is empty: no token to answer".
    (['{"prompt": "ab"}', "", '{"prompt": ""}'],
     "line 3 (conversation 1), turn 0: its prompt is empty: no token to answer"),
    # "prompt 'zz' has no token in this model's vocabulary": which line's?
    (['{"prompt": "ab"}', '{"prompt": "zz"}'],
     "line 2 (conversation 1), turn 0: prompt 'zz' has no token in this model's vocabulary"),
])
def test_a_raw_prompt_without_a_token_names_its_line_before_any_answer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], model: Path, lines: list[str],
        refusal: str) -> None:
    """Under --raw a prompt that gives no token is refused naming its line, conversation
    and turn, before any prompt of the file is answered (status 2, nothing on stdout)."""
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = generate(capsys, model, "--raw", "--jsonl", str(path))
    assert (code, out) == (2, "")
    assert err == f"kvtier: error: {path} {refusal}\n"


def test_a_prompt_argument_without_a_token_names_it(
        capsys: pytest.CaptureFixture[str], model: Path) -> None:
    """The same for a PROMPT on the command line: named by its position."""
    code, out, err = generate(capsys, model, "--raw", "ab", "")
    assert (code, out) == (2, "")
    assert err == ("kvtier: error: PROMPT 1 (conversation 1), turn 0: its prompt is empty: no "
                   "token to answer\n")


def test_a_turn_the_chat_template_refuses_names_its_line_after_the_answered_turns(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], model: Path) -> None:
    """A later turn the checkpoint's chat template refuses (its raise_exception) ended the
    command with "chat template: no stop here", naming no line, conversation or turn, and
    without the JSON line of the turns answered before. Now that JSON line comes first,
    then the refusal names the line, the conversation and the turn, status 2."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "b"}) + "\n"
                    + json.dumps({"turns": ["ab", "stop"]}) + "\n", encoding="utf-8")
    code, out, err = generate(capsys, model, "--jsonl", str(path))
    assert code == 2
    turns = json.loads(out.splitlines()[-1])["turns"]
    assert [(t["conversation"], t["turn"]) for t in turns] == [(0, 0), (1, 0)]
    assert err == (f"kvtier: error: {path} line 2 (conversation 1), turn 1: chat template: "
                   "no stop here\n")


def test_chat_on_a_checkpoint_without_a_chat_template_is_refused_at_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``kvtier chat`` on a checkpoint without a chat template read every line, answered
    none ("(not answered: this checkpoint has no chat template; /new starts a new
    conversation)", which /new cannot help) and ended with status 0. Now one sentence,
    status 2, before a line is read; generate says --raw answers without one, and does."""
    import io

    bare = make_gguf(tmp_path / "bare.gguf")  # no tokenizer.chat_template
    stdin = io.StringIO("ab\n/new\nb\n")
    monkeypatch.setattr("sys.stdin", stdin)
    code, out, err = run_cli(capsys, "chat", "--model", str(bare), "--device", "cpu")
    assert (code, out) == (2, "")
    assert err == (f"kvtier: error: {bare} has no chat template, which kvtier chat needs to put "
                   "messages in the model's turns\n")
    assert stdin.tell() == 0  # nothing read
    code, out, err = generate(capsys, bare, "ab")
    assert (code, out) == (2, "")
    assert err == (f"kvtier: error: {bare} has no chat template, which kvtier generate needs "
                   "to put messages in the model's turns (--raw tokenizes each prompt as it "
                   "is)\n")
    code, out, err = generate(capsys, bare, "--raw", "ab")
    assert (code, err) == (0, "")
    assert json.loads(out.splitlines()[-1])["total"]["num_prompt_tokens"] == 1


def test_text_standard_output_cannot_encode_is_escaped_not_an_internal_error(
        tmp_path: Path) -> None:
    """Standard output writes strictly: under an encoding that cannot hold a prompt's or an
    answer's characters (a Windows console redirected to a file is cp1252, here
    PYTHONIOENCODING=ascii) the first such line ended the command in an internal error
    (status 70), the JSON line lost; a chat turn the template refused in words of its own
    did the same. Now those characters are written as backslash escapes, status 0."""
    import os
    import subprocess
    import sys

    from test_red_team_23b import SRC

    model = make_gguf(tmp_path / "m.gguf", tokenizer__chat_template=("str", (
        "{% for m in messages %}{% if m['content'] != 'ab' %}"
        "{{ raise_exception('refus\u00e9 ' + m['content']) }}{% endif %}"
        "{{ m['content'] }}{% endfor %}")))
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONIOENCODING": "ascii"}
    common = ["--model", str(model), "--device", "cpu", "--max-new-tokens", "2"]
    prompt = "ab\u00e9\U0001f600"
    done = subprocess.run([sys.executable, "-m", "kvtier", "generate", "--raw", prompt, *common],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert lines[0] == "--- conversation 0 turn 0: ab\\xe9\\U0001f600"
    assert json.loads(lines[-1])["turns"][0]["num_prompt_tokens"] == 1
    done = subprocess.run([sys.executable, "-m", "kvtier", "chat", *common], env=env,
                          input="x\nab\n", capture_output=True, text=True, timeout=120,
                          check=False)
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert lines[0] == ("(not answered: chat template: refus\\xe9 x; /new starts a new "
                        "conversation)")
    assert [t["turn"] for t in json.loads(lines[-1])["turns"]] == [0]


def test_a_turn_whose_forward_pass_keeps_failing_names_its_line_after_the_answered_turns(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], model: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A later turn whose forward pass failed every try (out of device memory) ended the
    command with "prompt 0 could not be answered: ..." (the index among the conversations
    still talking: line 2 of the file) and no JSON line of the turns answered before. Now
    that JSON line comes first, then the refusal names the line, conversation and turn."""
    import kvtier.cli_generate as cli_generate

    load = cli_generate._load

    def failing_long_chunks(args: Any) -> Any:
        generator, params = load(args)
        forward = generator.engine.model.forward_chunk

        def chunk(kv: Any, table: Any, tokens: Any, start: int, *rest: Any) -> Any:
            if len(tokens) >= 15:
                raise RuntimeError("CUDA out of memory (injected)")
            return forward(kv, table, tokens, start, *rest)

        monkeypatch.setattr(generator.engine.model, "forward_chunk", chunk)
        return generator, params

    monkeypatch.setattr(cli_generate, "_load", failing_long_chunks)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "b"}) + "\n"
                    + json.dumps({"turns": ["ab", "a" * 20]}) + "\n", encoding="utf-8")
    code, out, err = generate(capsys, model, "--jsonl", str(path))
    assert code == 2
    turns = json.loads(out.splitlines()[-1])["turns"]
    assert [(t["conversation"], t["turn"]) for t in turns] == [(0, 0), (1, 0)]
    assert err == (f"kvtier: error: {path} line 2 (conversation 1), turn 1: its prompt could "
                   "not be answered: forward pass: RuntimeError: CUDA out of memory "
                   "(injected)\n")


def test_chat_with_a_system_message_past_the_context_is_refused_at_once(
        capsys: pytest.CaptureFixture[str], model: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``kvtier chat --system`` of a message that alone passes the context (64 tokens
    here) read every line and refused each ("not answered: a prompt of 71 tokens does not
    fit ...; /new starts a new conversation", which starts one with the same system
    message), then ended with status 0. Now one sentence, status 2, before a line is read;
    a system message that fits still chats."""
    import io

    stdin = io.StringIO("ab\nb\n")
    monkeypatch.setattr("sys.stdin", stdin)
    code, out, err = run_cli(capsys, "chat", "--system", "a" * 70, "--model", str(model),
                             "--device", "cpu", "--max-new-tokens", "2")
    assert (code, out) == (2, "")
    assert err == ("kvtier: error: --system takes 70 tokens in the chat template, leaving no "
                   "room in the maximum context of 64 tokens (model context, GPU pool)\n")
    assert stdin.tell() == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("ab\n"))
    code, out, err = run_cli(capsys, "chat", "--system", "a" * 8, "--model", str(model),
                             "--device", "cpu", "--max-new-tokens", "2")
    assert (code, err) == (0, "")
    assert [t["turn"] for t in json.loads(out.splitlines()[-1])["turns"]] == [0]
