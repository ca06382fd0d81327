"""The README's API example runs as written and prints what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


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
