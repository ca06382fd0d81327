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
            ) == (1024, 2048)
    assert (report["num_prompt_tokens"], report["num_gpu_hit_tokens"],
            report["num_host_hit_tokens"]) == (7_440_009, 3_701_311, 1_624_485)
    assert round(report["token_hit_rate"], 4) == 0.7158
    oracle = report["oracle"]
    assert (round(oracle["lru_hit_rate"], 4), round(oracle["belady_hit_rate"], 4)) == (
        0.7171, 0.7194)
