"""The README's API example runs as written and prints what its comments say; the options,
command lines and first command's figures the README (and docs/models.md) give are the
code's."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# The first command's hit rate and Belady bound (rounded to 4 places), pinned below and
# quoted in the README.
FIRST_COMMAND_HIT_RATE = 0.6522
# (0.7194 and the offline LRU 0.6508 counting whole blocks: since red team 26b the bounds
# follow the cache's partial reuse, BENCHMARKS.md)
FIRST_COMMAND_BELADY = 0.7231


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The python block of the README executes and prints the block tables it shows."""
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert match is not None
    exec(compile(match.group(1), str(README), "exec"), {})
    assert capsys.readouterr().out.splitlines() == ["(0, 1, 2) (0, 3)", "0.5"]


def test_readme_opens_with_the_two_setup_commands() -> None:
    """The first code block holds the replay command, then the test command CI runs."""
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    lines = block.group(1).strip().splitlines()
    assert lines[0].endswith(".venv/bin/kvtier replay")
    assert lines[1].endswith(".venv/bin/python -m pytest -q")
    ci = (README.parent / ".ci" / "run").read_text()
    assert lines[1] in ci


def test_the_first_command_replays_to_its_pinned_figures(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """``kvtier replay`` on its embedded default (the README's first command) gives exactly
    the figures of this code: the reuse by tier and the references beside it. A change of
    any eviction decision moves them: update them only with a measured reason (BENCHMARKS.md
    and docs/policy-lab.md say what each figure was, and why it moved)."""
    import json

    from kvtier.cli import main

    assert main(["replay", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["cache_config"]["eviction_policy"] == "kvtier-predict-cost"
    assert (report["cache_config"]["num_gpu_blocks"], report["cache_config"]["num_host_blocks"]
            ) == (1024, 1024)
    assert (report["num_prompt_tokens"], report["num_gpu_hit_tokens"],
            report["num_host_hit_tokens"]) == (7_440_009, 3_706_884, 1_145_569)
    assert round(report["token_hit_rate"], 4) == FIRST_COMMAND_HIT_RATE
    oracle = report["oracle"]
    assert (round(oracle["lru_hit_rate"], 4), round(oracle["belady_hit_rate"], 4)) == (
        0.6551, FIRST_COMMAND_BELADY)


# ---- the options and commands the docs name ------------------------------------------------

DOCS = README.parent / "docs"

# Options a doc names that are not kvtier's own, with whose they are.
NOT_KVTIER = {
    "--kv-transfer-config": "vLLM's (docs/vllm.md)",
    "--no-deps": "pip's",
}
# Scripts whose options a doc names beside the script's file name.
SCRIPTS = ("bench_policy.py", "bench_manager.py")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _subcommand_options() -> dict[str, set[str]]:
    """Each kvtier subcommand's option strings, from the parser itself."""
    import argparse

    from kvtier.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {s for act in p._actions for s in act.option_strings}
            for name, p in sub.choices.items()}


def _units(text: str) -> list[tuple[str, str]]:
    """(section heading, unit) for each line of a code block and each inline code span of
    ``text`` (one that runs over a line break joined): the pieces of a doc that name an
    option."""
    units = []
    section = ""
    for part in re.split(r"(^```.*?^```$)", text, flags=re.S | re.M):
        if part.startswith("```"):
            units += [(section, line) for line in part.splitlines()[1:-1]]
            continue
        for m in re.finditer(r"^#+ (.*)$|`([^`]+)`", part, re.M):
            if m.group(1) is not None:
                section = m.group(1).strip()
            else:
                units.append((section, " ".join(m.group(2).split())))
    return units


def _check_options(doc: Path, section_commands: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Every ``--option`` ``doc`` names, checked against what it names it on: the kvtier
    subcommand its line or span names (``kvtier sweep ... --plot``), a benchmark script
    named beside it, else the subcommands of its section in ``section_commands`` (else
    any subcommand). Returns the misses."""
    options = _subcommand_options()
    scripts = {name: (README.parent / "benchmarks" / name).read_text() for name in SCRIPTS}
    misses = []
    for section, unit in _units(doc.read_text()):
        named = OPTION.findall(unit)
        if not named or "pip install" in unit or "vllm serve" in unit:
            continue
        script = next((s for s in SCRIPTS if s in unit), None)
        command = re.search(r"\bkvtier\s+(\w+)", unit)
        for opt in named:
            if opt in NOT_KVTIER:
                continue
            if script is not None:
                if f'"{opt}"' not in scripts[script]:
                    misses.append(f"{doc.name} [{section}] {script} has no {opt}: {unit!r}")
                continue
            if command is not None and command.group(1) in options:
                where: tuple[str, ...] = (command.group(1),)
            else:
                where = section_commands.get(section, tuple(options))
            lacking = [c for c in where if opt not in options[c]]
            if len(lacking) == len(where) or (command is not None and lacking):
                misses.append(f"{doc.name} [{section}] {opt} is not an option of "
                              f"{'/'.join(lacking)}: {unit!r}")
    return misses


def test_every_option_the_readme_names_exists_where_it_names_it() -> None:
    """Each ``--option`` of the README is an option of the command it is named for: the
    command-line section's (and the eviction section's) of ``kvtier replay``, the real
    models' of ``generate`` / ``chat``, a benchmark's of its script."""
    sections = {"The command line": ("replay",), "Eviction": ("replay",),
                "Real models": ("generate", "chat")}
    assert _check_options(README, sections) == []


def test_every_option_the_model_guide_names_exists() -> None:
    """docs/models.md: each option it names is one of ``generate`` or ``chat`` (the one
    its line names, where it names one)."""
    sections = {"Commands": ("generate", "chat")}
    assert _check_options(DOCS / "models.md", sections) == []


def test_the_readme_command_lines_parse() -> None:
    """Each line of the README's command-line block, with its optional parts given (a
    Redis URL as a placeholder), is a command line kvtier accepts: its options, their
    values and their combination (``settle_options``), without running it."""
    from kvtier.cli import build_parser
    from kvtier.cli_options import settle_options

    text = README.read_text()
    block = re.search(r"## The command line\n\n```\n(.*?)```", text, re.S)
    assert block is not None
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    commands = [line for line in lines if line.startswith("kvtier ")]
    assert len(commands) == 6
    for line in commands:
        argv = line.replace("[TRACE]", "").replace("[", "").replace("]", "").split()[1:]
        argv = ["redis://localhost:6379/0" if a == "redis://..." else a for a in argv]
        args = build_parser().parse_args(argv)
        settle_options(args)


def test_the_readme_option_values_parse() -> None:
    """An option the README's command-line prose shows with a value (``--workload
    agentic``, ``--admission claim|probe``, ``--set-profile pcie_bytes_per_s=2.5e10``, ...)
    is a ``kvtier replay`` line kvtier accepts, each alternative of ``a|b``."""
    from kvtier.cli import build_parser
    from kvtier.cli_options import settle_options

    checked = 0
    for section, unit in _units(README.read_text()):
        words = unit.split()
        if (section != "The command line" or not words or not words[0].startswith("--")
                or len(words) < 2 or words[1].startswith("--")):
            continue
        choices = re.search(r"(\S+)\|(\S+)", unit)
        for value in (choices.groups() if choices else (None,)):
            argv = words if value is None else [words[0], value]
            args = build_parser().parse_args(["replay", *argv])
            settle_options(args)
            checked += 1
    assert checked >= 8


def test_every_readme_python_block_runs() -> None:
    """Every python block of the README executes as written (the first is also held to
    its printed lines above)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_the_readme_quotes_the_first_commands_pinned_figures() -> None:
    """The README's sizes and figures for its first command are the ones
    ``test_the_first_command_replays_to_its_pinned_figures`` pins."""
    text = " ".join(README.read_text().split())
    assert "1,024 GPU + 1,024 host blocks" in text
    assert (f"on the first command above {FIRST_COMMAND_HIT_RATE} against priority-LRU's"
            in text)
    assert f"Belady {FIRST_COMMAND_BELADY})" in text


def test_the_model_guide_shows_the_line_printed_after_each_turn() -> None:
    """docs/models.md's line after an answer is ``TurnResult.summary``'s for its figures."""
    pytest.importorskip("torch")
    from kvtier.model.generate import TurnResult

    turn = TurnResult("Paris", [0] * 8, "stop_token", 59, 32, 0, 0, 0, 27, 0.4123)
    text = " ".join((DOCS / "models.md").read_text().split())
    assert f"`{turn.summary()}`" in text
