"""The reference model and its engine loop (extra ``torch``): a small Llama-style decoder
that reads and writes real KV blocks through the manager's block tables."""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("kvtier.model needs torch: pip install 'kvtier[torch]'") from exc

from kvtier.model.config import ModelConfig
from kvtier.model.engine import ModelEngine, RequestResult
from kvtier.model.llama import LlamaModel

__all__ = ["LlamaModel", "ModelConfig", "ModelEngine", "RequestResult"]
