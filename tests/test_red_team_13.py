"""Red team, thirteenth pass: the command line end to end as a user's shell runs it, its
standard streams and the paths it is given included. Each test fails on the code before its
fix and asserts the exact refusal."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bad_input_helpers import assert_one_line_refusal, run_cli
from kvtier.cli import main

SMALL = ["--limit", "2", "--no-progress"]
LONG_NAME = "a" * 300  # past NAME_MAX (255) on every file system kvtier runs on
ENOSPC = os.strerror(errno.ENOSPC)


class FullDisk(io.StringIO):
    """Standard output on a full disk: every write fails (``flush_only``: only the flush,
    as when the text still fits the buffer and the interpreter's exit writes it)."""

    def __init__(self, flush_only: bool = False) -> None:
        super().__init__()
        self.flush_only = flush_only

    def write(self, text: str) -> int:
        if not self.flush_only:
            raise OSError(errno.ENOSPC, ENOSPC)
        return super().write(text)

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, ENOSPC)


def run_main(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` with the standard output the caller set: (status, stderr)."""
    err = io.StringIO()
    saved = sys.stderr
    sys.stderr = err
    try:
        code = main(argv)
    finally:
        sys.stderr = saved
    return code, err.getvalue()


# ---- standard output that cannot be written --------------------------------------------------

@pytest.mark.parametrize("argv", [["replay", *SMALL], ["--version"], ["--help"],
                                  ["sweep", "--help"]])
@pytest.mark.parametrize("flush_only", [False, True])
def test_standard_output_on_a_full_disk_is_one_line_and_status_2(
        monkeypatch: pytest.MonkeyPatch, argv: list[str], flush_only: bool) -> None:
    """``kvtier replay > /dev/full``: an internal error (status 70, "a defect in kvtier"),
    or, with the report still in the buffer, status 0 and an error at the interpreter's
    exit; ``--help`` and ``--version`` (argparse swallows OSError) status 0, nothing
    written. Now one line naming standard output and the reason, status 2."""
    monkeypatch.delenv("KVTIER_DEBUG", raising=False)
    monkeypatch.setattr(sys, "stdout", FullDisk(flush_only))
    code, err = run_main(argv)
    assert_one_line_refusal(code, err, f"kvtier: error: cannot write to standard output: "
                                       f"{ENOSPC}")


@pytest.mark.parametrize("argv", [["replay", *SMALL], ["--version"]])
def test_a_closed_standard_output_is_one_line_and_status_2(
        monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    """``kvtier replay >&-``: Python makes sys.stdout None, print writes nowhere, and the
    report was lost with status 0. Now refused in one line."""
    monkeypatch.setattr(sys, "stdout", None)
    code, err = run_main(argv)
    assert_one_line_refusal(code, err, "cannot write to standard output: Bad file "
                                       "descriptor (standard output is closed)")


def test_dev_full_as_the_shell_redirects_it() -> None:
    """The real thing, in a subprocess: ``python -m kvtier --version > /dev/full`` says so
    in one line with status 2, no "Exception ignored" line from the interpreter's exit."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    env.pop("KVTIER_DEBUG", None)
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "kvtier", "--version"], stdout=full,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=60,
                              check=False)
    assert (done.returncode, done.stderr) == (
        2, f"kvtier: error: cannot write to standard output: {ENOSPC}\n")


def test_a_reader_that_leaves_is_still_a_quiet_status_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kvtier replay | head -1`` stays a quiet status 1 through the check of standard
    output (and its handler no longer needs a descriptor: a StringIO's fileno raised)."""

    class Gone(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    monkeypatch.setattr(sys, "stdout", Gone())
    assert run_main(["replay", *SMALL]) == (1, "")


def test_a_good_run_prints_the_same_report_through_the_check(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The checked standard output passes every line through, flushed, and is put back."""
    stdout = sys.stdout
    assert main(["replay", *SMALL]) == 0
    assert sys.stdout is stdout
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("workload") and lines[-1].startswith('{"')


# ---- paths the operating system refuses to look up -------------------------------------------

def test_a_trace_that_is_a_symlink_loop_is_one_line(tmp_path: Path) -> None:
    """A TRACE that links to itself: Path.resolve raised RuntimeError("Symlink loop"),
    status 70, before the trace's open could say what is wrong."""
    for name in ("loop.jsonl", "loop.csv"):
        loop = tmp_path / name
        loop.symlink_to(loop)
        code, err = run_cli(["replay", str(loop), *SMALL])
        assert_one_line_refusal(code, err, f"cannot read trace {loop}: "
                                           f"{os.strerror(errno.ELOOP)}")


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_output_name_too_long_is_refused_before_the_run(
        tmp_path: Path, option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--json <300 characters>.json``: Path.is_dir raised OSError (ENAMETOOLONG), status
    70. Now refused in one line before anything is simulated."""
    if option == "--plot":
        pytest.importorskip("matplotlib", reason="--plot needs the plot extra")
    import kvtier.cli

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulation ran")

    monkeypatch.setattr(kvtier.cli, "simulate", never)
    path = tmp_path / f"{LONG_NAME}.png"
    code, err = run_cli(["sweep", "--gpu-blocks", "512", "--host-blocks", "0", "--no-oracle",
                         option, str(path), *SMALL])
    assert_one_line_refusal(code, err, f"{option} {path}: cannot write it "
                                       f"({os.strerror(errno.ENAMETOOLONG)})")


def make_path(folder: Path, kind: str) -> Path:
    """A path in ``folder`` that is no file a model can be read from."""
    if kind == "long":
        return folder / f"{LONG_NAME}.gguf"
    if kind == "device":
        return Path("/dev/zero")
    path = folder / f"{kind}.gguf"
    if kind == "loop":
        path.symlink_to(path)
    else:
        os.mkfifo(path)
    return path


NOT_REGULAR = "is not a regular file (a FIFO, socket or device)"


@pytest.mark.parametrize(("kind", "problem"), [
    ("long", os.strerror(errno.ENAMETOOLONG)),  # is_dir raised OSError: status 70
    ("loop", os.strerror(errno.ELOOP)),  # these three "did not exist"
    ("fifo", NOT_REGULAR), ("device", NOT_REGULAR),
])
def test_a_model_path_that_is_no_file_says_what_it_is(tmp_path: Path, kind: str,
                                                       problem: str) -> None:
    """``--model`` given a name too long, a symlink loop, a FIFO or a device: one sentence
    naming the path and what it is (CheckpointError, which the command prints)."""
    pytest.importorskip("torch", reason="the model needs torch")
    from kvtier.model.checkpoint import CheckpointError, checkpoint_kind

    path = make_path(tmp_path, kind)
    with pytest.raises(CheckpointError) as info:
        checkpoint_kind(path)
    assert str(path) in str(info.value) and problem in str(info.value)
    code, err = run_cli(["generate", "hi", "--model", str(path), "--device", "cpu"])
    assert_one_line_refusal(code, err, str(path), problem)


# ---- kvtier chat's standard input ------------------------------------------------------------

def test_chat_with_standard_input_closed_is_refused_before_loading(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``kvtier chat <&-``: sys.stdin is None, and ``stdin.isatty()`` raised AttributeError
    (status 70) after the model had loaded. Now one line, before any loading."""
    pytest.importorskip("torch", reason="kvtier chat needs torch")
    from kvtier.model.generate import Generator

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Generator, "load", never)
    monkeypatch.setattr(sys, "stdin", None)
    code, err = run_cli(["chat", "--model", "unused.gguf", "--device", "cpu"])
    assert_one_line_refusal(code, err, "kvtier chat reads its messages from standard input, "
                                       "which is closed")


def make_chat_gguf(folder: Path) -> Path:
    """The tiny GGUF model of ``test_red_team_model`` with a chat template."""
    from test_red_team_model import make_gguf

    return make_gguf(folder / "chat.gguf", tokenizer__chat_template=(
        "str", "{% for m in messages %}{{ m['content'] }}{% endfor %}"))


def test_chat_refuses_a_line_that_is_no_utf8_and_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Under a UTF-8 locale sys.stdin decodes strictly: a line with a stray byte raised
    UnicodeDecodeError (status 70) and the session's answers and summary were lost. Now that
    message alone is not answered; the lines before and after it are."""
    pytest.importorskip("gguf", reason="GGUF files need the model extra")
    pytest.importorskip("torch", reason="the model needs torch")
    import json

    path = make_chat_gguf(tmp_path)
    stdin = io.TextIOWrapper(io.BytesIO(b"ab\nab\xff\nab\n"), encoding="utf-8",
                             errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin)
    code = main(["chat", "--model", str(path), "--device", "cpu", "--max-new-tokens", "2"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    # (character 5 of the rendered conversation "abab\udcff": the template joins the turns)
    assert ("(not answered: a message is not valid Unicode text (character 5: bytes that are "
            "not UTF-8?); /new starts a new conversation)") in out
    summary = json.loads(out[-1])
    assert [(t["conversation"], t["turn"]) for t in summary["turns"]] == [(0, 0), (0, 1)]


# ---- the progress bar's settings from the environment ---------------------------------------

class FakeTqdm:
    """A tqdm whose constructor or ``update`` fails as tqdm does on bad TQDM_* settings."""

    fail_in = "init"

    def __init__(self, **kwargs: object) -> None:
        if self.fail_in == "init":
            raise ZeroDivisionError("integer division or modulo by zero")

    def update(self, n: int) -> None:
        raise KeyError("nope")

    def close(self) -> None:
        raise KeyError("nope")

    def __enter__(self) -> FakeTqdm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.mark.parametrize(("fail_in", "shown"), [
    ("init", "ZeroDivisionError: integer division or modulo by zero"),  # TQDM_ASCII=5
    ("update", "KeyError: 'nope'"),  # TQDM_BAR_FORMAT={nope}
])
def test_a_progress_bar_failing_on_its_environment_names_the_settings(
        monkeypatch: pytest.MonkeyPatch, fail_in: str, shown: str) -> None:
    """tqdm reads a default for each argument from TQDM_<NAME>, unchecked, and failed in
    the constructor or at a redraw (status 70). Now one line naming the settings."""
    import types

    module = types.ModuleType("tqdm")
    monkeypatch.setattr(FakeTqdm, "fail_in", fail_in)
    module.tqdm = FakeTqdm  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tqdm", module)
    monkeypatch.setenv("TQDM_ASCII", "5")
    code, err = run_cli(["replay", "--limit", "2"])
    assert_one_line_refusal(code, err, f"the progress bar (tqdm) failed on its settings "
                                       f"(TQDM_ASCII='5'): {shown}; fix them or pass "
                                       "--no-progress")


def test_a_tqdm_setting_that_fails_its_import_is_one_line() -> None:
    """``TQDM_MININTERVAL=abc kvtier replay``: tqdm's import converts the settings, and
    raised ValueError (status 70); a subprocess, as tqdm is imported once per process."""
    pytest.importorskip("tqdm", reason="the progress bar needs tqdm")
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "TQDM_MININTERVAL": "abc"}
    env.pop("KVTIER_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "kvtier", "replay", "--limit", "1"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", (
        "kvtier: error: the progress bar (tqdm) failed on its settings "
        "(TQDM_MININTERVAL='abc'): ValueError: could not convert string to float: 'abc'; "
        "fix them or pass --no-progress\n"))


# ---- kvtier generate --jsonl, in the encodings and line ends files come in ---------------------

@pytest.mark.parametrize(("data", "prompts"), [
    # A byte order mark: "line 1 is not JSON (Unexpected UTF-8 BOM)", where a trace's is
    # skipped.
    (b'\xef\xbb\xbf{"prompt": "ab"}\n', ["ab"]),
    # str.splitlines split a JSON string holding a raw U+2028 or U+0085 (JSON allows them)
    # and refused the halves as "not JSON".
    ('{"prompt": "a\u2028b"}\n{"prompt": "c\x85d"}\n'.encode(), ["a\u2028b", "c\x85d"]),
    (b'{"prompt": "ab"}\r\n{"prompt": "cd"}', ["ab", "cd"]),  # CRLF, no final newline
])
def test_a_prompts_file_reads_as_json_lines(tmp_path: Path, data: bytes,
                                            prompts: list[str]) -> None:
    """Prompt files that are sound JSON Lines read as their prompts."""
    from kvtier.cli_generate import _read_jsonl

    path = tmp_path / "p.jsonl"
    path.write_bytes(data)
    assert [item["prompt"] for item in _read_jsonl(path)] == prompts


@pytest.mark.parametrize(("data", "argv", "shown"), [
    # 'utf-8' codec can't decode byte 0xff in position 0 ...: now the line and its byte.
    ('{"prompt": "ab"}\n'.encode("utf-16"), [], "line 1 is not UTF-8 text (byte 0 of the line)"),
    (b'{"prompt": "ab"}\n{"prompt": "a\xffb"}\n', [],
     "line 2 is not UTF-8 text (byte 13 of the line)"),
    # With --raw a conversation's "system" message was dropped without a word.
    (b'{"prompt": "ab"}\n{"turns": ["ab"], "system": "be brief"}\n', ["--raw"],
     'line 2 has a "system" message, which --raw leaves out'),
])
def test_a_prompts_file_refused_names_the_line_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, argv: list[str],
        shown: str) -> None:
    """A prompts file kvtier cannot use is refused naming its line, before any model is
    looked for."""
    import kvtier.cli_generate

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kvtier.cli_generate, "_load", never)
    path = tmp_path / "p.jsonl"
    path.write_bytes(data)
    code, err = run_cli(["generate", "--jsonl", str(path), *argv])
    assert_one_line_refusal(code, err, f"{path} {shown}")


# ---- SIGTERM ---------------------------------------------------------------------------------

# The child sends itself a SIGTERM from inside the run (the simulation's first call), so the
# signal lands there deterministically.
_TERMINATE_IN_RUN = """
    import os, signal, sys
    import kvtier.cli

    def simulate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the SIGTERM did not stop the run")

    kvtier.cli.simulate = simulate
    {ignore}
    from kvtier.launcher import main
    status = main(["replay", "--limit", "5", "--no-progress"])
    print(status, signal.getsignal(signal.SIGTERM) is {handler})
"""


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    import textwrap

    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    env.pop("KVTIER_DEBUG", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


def test_sigterm_during_a_run_is_one_line_and_status_143() -> None:
    """``kill <kvtier>``: the process ended where it stood, nothing on stderr, no finally
    block run (a remote store's writes not flushed, the bar left on the terminal). Now the
    run unwinds as from a Ctrl-C: ``kvtier: terminated``, status 143, and the default
    handler is back after the command."""
    done = run_child(_TERMINATE_IN_RUN.format(ignore="", handler="signal.SIG_DFL"))
    assert (done.stdout, done.stderr) == ("143 True\n", "kvtier: terminated\n")


def test_a_sigterm_the_parent_ignores_stays_ignored() -> None:
    """``nohup``-like parents set SIGTERM to be ignored: the launcher leaves that alone (the
    run is not stopped; here it then fails on the stand-in simulation, status 70)."""
    done = run_child(_TERMINATE_IN_RUN.format(
        ignore="signal.signal(signal.SIGTERM, signal.SIG_IGN)", handler="signal.SIG_IGN"))
    assert done.stdout == "70 True\n"
    assert done.stderr.startswith("kvtier: internal error: AssertionError: the SIGTERM did "
                                  "not stop the run")


# ---- lines longer than any message -----------------------------------------------------------

def test_chat_stops_at_a_line_longer_than_any_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``kvtier chat < /dev/zero`` read one line until memory ran out (or the OOM killer
    came). A line is now read only as far as MAX_MESSAGE_BYTES: past it the session ends
    with the summary of what was answered, then one line naming the line, status 2."""
    pytest.importorskip("gguf", reason="GGUF files need the model extra")
    pytest.importorskip("torch", reason="the model needs torch")
    import json

    from kvtier.cli_generate import MAX_MESSAGE_BYTES

    path = make_chat_gguf(tmp_path)
    data = b"ab\n" + b"a" * (MAX_MESSAGE_BYTES + 1) + b"\nab\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    code, err = run_main(["chat", "--model", str(path), "--device", "cpu",
                          "--max-new-tokens", "2"])
    assert_one_line_refusal(code, err, "standard input line 2 is longer than 4,194,304 "
                                       "bytes, more than any message; the session ends there")
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [(t["conversation"], t["turn"]) for t in summary["turns"]] == [(0, 0)]


def test_a_prompts_file_line_longer_than_any_message_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``generate --jsonl`` read the whole file at once, a 2 GB line too. Now each line is
    read only as far as MAX_MESSAGE_BYTES, and one past it is refused naming it."""
    import kvtier.cli_generate
    from kvtier.cli_generate import MAX_MESSAGE_BYTES

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(kvtier.cli_generate, "_load", never)
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "ab"}\n{"prompt": "' + b"a" * MAX_MESSAGE_BYTES + b'"}\n')
    code, err = run_cli(["generate", "--jsonl", str(path)])
    assert_one_line_refusal(code, err, f"{path} line 2 is longer than 4,194,304 bytes, more "
                                       "than any message")


# ---- options that conflict, or that the rest of the command line leaves without effect --------

def test_json_and_plot_naming_one_file_are_refused_before_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sweep --json out.png --plot out.png`` (or a symlink to it): the plot overwrote the
    JSON report without a word. Now refused before anything is simulated; /dev/null may
    take both."""
    pytest.importorskip("matplotlib", reason="--plot needs the plot extra")
    import kvtier.cli

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulation ran")

    monkeypatch.setattr(kvtier.cli, "simulate", never)
    out = tmp_path / "out.png"
    link = tmp_path / "link.json"
    link.symlink_to(out)
    sweep = ["sweep", "--gpu-blocks", "512", "--host-blocks", "0", "--no-oracle", *SMALL]
    for json_path in (out, link):
        code, err = run_cli([*sweep, "--json", str(json_path), "--plot", str(out)])
        assert_one_line_refusal(code, err, f"--json and --plot name the same file, {out}; "
                                           "the second would overwrite the first")
    with pytest.raises(AssertionError, match="the simulation ran"):  # past the checks
        run_cli([*sweep, "--json", os.devnull, "--plot", os.devnull])


@pytest.mark.parametrize(("argv", "shown"), [
    (["replay", "--router", "round-robin"],
     "--router and --router-alpha need --instances > 1 (a fleet behind a router)"),
    (["replay", "--router-alpha", "2"], "--router and --router-alpha need --instances > 1"),
    (["sweep", "--no-chunked-prefill", "--max-chunk-tokens", "256"],
     "--max-chunk-tokens caps a prefill chunk, and --no-chunked-prefill prefills each "
     "prompt in one step"),
    (["compare", "--draft-acceptance", "0.3"],
     "--draft-acceptance needs --num-speculative-tokens > 0 (drafts to accept)"),
    (["replay", "{trace}", "--workload", "agentic"],
     "--workload agentic is a built-in workload, and TRACE {trace} is given too; replay one "
     "of them"),
    (["replay", "{trace}", "--seed", "3"],
     "--seed draws the built-in workloads and an Azure trace's prefixes; a .jsonl trace "
     "(Mooncake, Bailian) has its own"),
    (["compare", "--workload", "race", "--seed", "1"],
     "--seed does not apply to --workload race"),
    (["generate", "hi", "--system-priority", "90"],
     '--system-priority needs a system message to keep: a "system" of a --jsonl conversation'),
    (["chat", "--system-priority", "90"],
     "--system-priority needs --system, the message whose blocks it keeps"),
])
def test_an_option_left_without_effect_is_refused_before_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], shown: str) -> None:
    """Each of these was ignored without a word (the run as without it), where the
    command already refused ``--remote-latency-ms`` without ``--remote``. Now one line
    naming what the option needs, before anything runs or loads."""
    import kvtier.cli
    import kvtier.cli_generate

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr(kvtier.cli, "simulate", never)
    monkeypatch.setattr(kvtier.cli_generate, "_load", never)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 600, "output_length": 4, '
                     '"hash_ids": [1, 2]}\n')
    argv = [a.format(trace=trace) for a in argv]
    shown = shown.format(trace=trace)
    code, err = run_cli([*argv, "--no-progress"] if argv[0] in ("replay", "compare", "sweep")
                        else argv)
    assert_one_line_refusal(code, err, shown)


def test_the_defaults_of_the_settled_options_reach_the_report(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Unset, --router, --router-alpha and --draft-acceptance still take their defaults
    (cache-aware, 1.0, 0.7) where they have an effect."""
    import json

    assert main(["replay", "--limit", "4", "--no-progress", "--num-speculative-tokens", "2"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["speculative"]["draft_acceptance"] == 0.7
    assert main(["replay", "--limit", "4", "--no-progress", "--instances", "2"]) == 0
    fleet = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (fleet["router"]["policy"], fleet["router"]["alpha"]) == ("cache-aware", 1.0)


# ---- standard error closed or full -----------------------------------------------------------

@pytest.mark.parametrize("stderr", ["closed", "full"])
def test_a_run_whose_stderr_cannot_take_the_bar_still_reports(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        stderr: str) -> None:
    """``kvtier replay 2>/dev/full``: the bar's OSError became a CLIError whose own line
    failed too, out of main as a traceback, status 1, the run lost; ``2>&-``: refused as a
    bar failing on its settings. Now the bar stops drawing and the report comes out whole,
    status 0 (with the progress bar on, as by default)."""
    pytest.importorskip("tqdm", reason="the progress bar needs tqdm")
    import json

    monkeypatch.delenv("KVTIER_DEBUG", raising=False)
    monkeypatch.setattr(sys, "stderr", None if stderr == "closed" else FullDisk())
    assert main(["replay", "--limit", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("workload") and json.loads(out[-1])["num_requests"] == 3


@pytest.mark.parametrize("stderr", ["closed", "full"])
def test_a_refusal_whose_stderr_cannot_take_its_line_is_still_status_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        stderr: str) -> None:
    """With stderr closed, ``print(file=sys.stderr)`` printed the refusal to stdout (into
    a report a reader parses); with it full, its OSError went out of main (status 1). Now
    the line goes to stderr or nowhere; the status says it."""
    monkeypatch.delenv("KVTIER_DEBUG", raising=False)
    monkeypatch.setattr(sys, "stderr", None if stderr == "closed" else FullDisk())
    assert main(["replay", "--router-alpha", "2", "--no-progress"]) == 2
    assert capsys.readouterr().out == ""


# ---- --plot formats that need an outside program ---------------------------------------------

def test_a_pgf_plot_without_its_tex_is_refused_before_the_sweep(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``sweep --plot out.pgf`` without xelatex: matplotlib's RuntimeError after the whole
    sweep, status 70. Now refused before the run, naming the program."""
    pytest.importorskip("matplotlib", reason="--plot needs the plot extra")
    import shutil

    import kvtier.cli

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulation ran")

    monkeypatch.setattr(kvtier.cli, "simulate", never)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code, err = run_cli(["sweep", "--gpu-blocks", "512", "--host-blocks", "0", "--no-oracle",
                         "--plot", "out.PGF", *SMALL])
    assert_one_line_refusal(code, err, "--plot out.PGF: matplotlib writes a .pgf file with "
                                       "xelatex, which is not installed; choose another format")


def test_a_plot_whose_writer_fails_after_the_sweep_loses_no_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A format's outside program failing at the write (matplotlib's RuntimeError) was an
    internal error, status 70. Now one line, status 2, the report out first."""
    pytest.importorskip("matplotlib", reason="--plot needs the plot extra")
    import kvtier.cli

    def fails(*args: object) -> None:
        raise RuntimeError("'gs' not found")

    monkeypatch.setattr(kvtier.cli, "plot_sweep", fails)
    path = tmp_path / "out.eps"
    code, err = run_main(["sweep", "--gpu-blocks", "512", "--host-blocks", "0", "--no-oracle",
                          "--plot", str(path), *SMALL])
    assert_one_line_refusal(code, err, f"cannot write {path}: matplotlib: 'gs' not found (the "
                                       "report is on standard output)")
    assert capsys.readouterr().out.splitlines()[-1].startswith('{"command": "sweep"')


def test_matplotlib_refusing_its_environment_is_one_line_before_the_sweep(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``MPLBACKEND=foo kvtier sweep --plot p.png``: matplotlib's import raised ValueError
    ("Key backend: 'foo' is not a valid value"), status 70. Now one line naming the
    setting, before the run. (matplotlib reads it once per process, so its error is
    stood in for here.)"""
    import kvtier.cli

    def refuses() -> None:
        raise ValueError("Key backend: 'foo' is not a valid value for backend")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulation ran")

    monkeypatch.setattr(kvtier.cli, "require_matplotlib", refuses)
    monkeypatch.setattr(kvtier.cli, "simulate", never)
    monkeypatch.setenv("MPLBACKEND", "foo")
    code, err = run_cli(["sweep", "--gpu-blocks", "512", "--host-blocks", "0", "--no-oracle",
                         "--plot", "p.png", *SMALL])
    assert_one_line_refusal(code, err, "--plot: matplotlib refuses its settings "
                                       "(MPLBACKEND='foo'): Key backend: 'foo' is not a valid "
                                       "value for backend")


@pytest.mark.parametrize(("prompts", "shown"), [
    (["ab", "zzz"], "prompt 'zzz' has no token in this model's vocabulary"),
    (["ab", ""], "PROMPT 1 (conversation 1), turn 0: its prompt is empty: no token to answer"),
])
def test_a_prompt_of_no_token_is_named(tmp_path: Path, prompts: list[str], shown: str) -> None:
    """``generate --raw zzz`` on a vocabulary without z: "a prompt is empty", of a prompt
    that is not, and naming none of several. Now the prompt (or its index)."""
    pytest.importorskip("gguf", reason="GGUF files need the model extra")
    pytest.importorskip("torch", reason="the model needs torch")
    path = make_chat_gguf(tmp_path)
    code, err = run_cli(["generate", *prompts, "--raw", "--model", str(path), "--device",
                         "cpu", "--max-new-tokens", "2"])
    assert_one_line_refusal(code, err, shown)


# ---- Hugging Face checkpoint files that lie ----------------------------------------------------

HF_CONFIG = ('{"model_type": "llama", "vocab_size": 96, "hidden_size": 32, '
             '"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, '
             '"intermediate_size": 48, "rms_norm_eps": 1e-6, "max_position_embeddings": 64}')


@pytest.mark.parametrize(("config", "index", "shown"), [
    # RecursionError and the int-digits ValueError said neither file nor JSON.
    ("[" * 100_000 + "]" * 100_000, None,
     "config.json is not valid JSON (maximum recursion depth exceeded"),
    ('{"vocab_size": ' + "1" * 5000 + "}", None,
     "config.json is not valid JSON (Exceeds the limit (4300 digits)"),
    (HF_CONFIG, '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "model.safetensors.index.json is not a safetensors index (maximum recursion depth"),
    # AttributeError and TypeError, status 70; a name outside the directory was read.
    (HF_CONFIG, '{"weight_map": 5}', "weight_map must be an object mapping each tensor to "
                                     "its shard, got 5"),
    (HF_CONFIG, '{"weight_map": {"lm_head.weight": 5}}',
     "weight_map must map each tensor to the name of a shard file in {dir}, got 5"),
    (HF_CONFIG, '{"weight_map": {"lm_head.weight": "../model.safetensors"}}',
     "weight_map must map each tensor to the name of a shard file in {dir}, got "
     "'../model.safetensors'"),
])
def test_a_checkpoint_json_file_that_lies_is_named(tmp_path: Path, config: str,
                                                   index: str | None, shown: str) -> None:
    """config.json, tokenizer_config.json and the safetensors index, nested too deeply,
    with a number too long to read, or an index whose weight_map is no map of shard names:
    a CheckpointError naming the file (the command prints it)."""
    pytest.importorskip("torch", reason="the model needs torch")
    pytest.importorskip("safetensors", reason="the model extra reads safetensors")
    from kvtier.model.checkpoint import CheckpointError, load_model

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    assert shown.format(dir=folder) in str(info.value) and str(folder) in str(info.value)


def test_an_output_that_is_the_trace_through_a_hard_link_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``replay t.jsonl --json t-link.json``, a hard link to the trace: realpath tells the
    two apart, and the JSON report overwrote the trace. Now the same inode is the same
    file, between the outputs too."""
    import kvtier.cli

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulation ran")

    monkeypatch.setattr(kvtier.cli, "simulate", never)
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 600, "output_length": 4, '
                     '"hash_ids": [1, 2]}\n')
    link = tmp_path / "t-link.json"
    os.link(trace, link)
    code, err = run_cli(["replay", str(trace), "--json", str(link), *SMALL])
    assert_one_line_refusal(code, err, f"--json {link} is the input trace; choose another file")
    assert trace.read_text().startswith('{"timestamp": 0')
