"""Fixtures of the simulator tests: where the shared public traces live."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest


def _traces_dir() -> Path:
    override = os.environ.get("KVTIER_TRACES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "../shared/data/traces"


@pytest.fixture
def trace_file() -> Callable[[str], Path]:
    """Return a lookup that gives a trace's path, or skips the test when it is absent."""

    def lookup(name: str) -> Path:
        path = _traces_dir() / name
        if not path.is_file():
            pytest.skip(f"trace file {path} not found (set KVTIER_TRACES to the traces folder)")
        return path

    return lookup
