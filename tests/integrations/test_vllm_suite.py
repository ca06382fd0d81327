"""Runs the vLLM integration's suite (``vllm_suite/``: vLLM's real scheduler and connector
with kvtier's tier and policies, over real Redis) in its own interpreter, .venv-vllm, which
``.ci/vllm-env`` makes. Skipped, saying so, where that venv is absent."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SUITE = Path(__file__).resolve().parent / "vllm_suite"


def test_vllm_suite_passes_in_its_venv() -> None:
    """Every test of vllm_suite passes under vllm==0.33.0 (the suite's own output is shown
    on failure)."""
    if not PYTHON.exists():
        pytest.skip(f"{PYTHON.relative_to(ROOT)} is missing: run .ci/vllm-env to make it "
                    "(vllm==0.33.0 on the CPU torch) and this test runs the vLLM suite")
    done = subprocess.run(
        [str(PYTHON), "-m", "pytest", "-c", str(SUITE / "pytest.ini"), str(SUITE), "-q",
         "-x", "-W", "ignore::DeprecationWarning"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
