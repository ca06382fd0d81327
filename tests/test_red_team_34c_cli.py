"""Red team 34c, the command line: ``--json FILE.gz`` writes gzip (what every reader takes
a ``.gz`` name for), and ``--plot`` to a name matplotlib writes no format of is a usage
error before the run."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kvtier.cli import main


@pytest.mark.parametrize("name", ["report.json.gz", "REPORT.JSON.GZ"])
def test_json_to_a_gz_name_is_gzip_of_the_document(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path, name: str) -> None:
    """replay --json report.json.gz wrote plain JSON under a .gz name (gzip.open refused it:
    'Not a gzipped file'); now gzip of the document the JSON line on stdout holds."""
    target = tmp_path / name
    assert main(["replay", "--limit", "4", "--no-progress", "--no-oracle",
                 "--json", str(target)]) == 0
    out = capsys.readouterr().out
    assert target.read_bytes()[:2] == b"\x1f\x8b"
    with gzip.open(target, "rt", encoding="utf-8") as f:
        assert json.load(f) == json.loads(out.splitlines()[-1])


def test_plot_to_a_gz_name_is_a_usage_error_before_the_run(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--plot sweep.png.gz: matplotlib writes no .gz file; refused in one line, status 2,
    before the sweep runs (no report printed, no file made)."""
    pytest.importorskip("matplotlib")
    target = tmp_path / "sweep.png.gz"
    code = main(["sweep", "--limit", "4", "--no-progress", "--no-oracle",
                 "--plot", str(target)])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert "matplotlib writes no '.gz' file" in err and err.count("\n") == 1
    assert not target.exists()
