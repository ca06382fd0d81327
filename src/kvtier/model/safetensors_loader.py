"""A Hugging Face checkpoint directory as a :class:`LlamaModel`: ``config.json`` into a
:class:`ModelConfig`, weights from ``*.safetensors`` (one file, or shards named by
``model.safetensors.index.json``), read lazily with the ``safetensors`` package (extra
``model``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvtier.model.checkpoint import CheckpointError, TensorEntry, build_model, read_json_object
from kvtier.model.config import ModelConfig, RopeScaling
from kvtier.model.llama import LlamaModel

# config.json's model_type values whose weights this model computes exactly.
MODEL_TYPES = ("llama", "mistral", "qwen2")


def config_from_hf(cfg: dict[str, Any], origin: str, dtype: str = "float32") -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` (as a dict).
    CheckpointError naming the key if one is missing or unsupported."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{origin}: model_type {model_type!r} is not supported; kvtier "
                              f"reads {list(MODEL_TYPES)}")

    def need(key: str) -> Any:
        if key not in cfg:
            raise CheckpointError(f"{origin} lacks the key {key!r}")
        return cfg[key]

    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{origin}: hidden_act {cfg['hidden_act']!r} is not supported "
                              "(the MLP is SwiGLU)")
    scaling = None
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    rope_theta = cfg.get("rope_theta")
    if isinstance(rs, dict):
        rope_type = rs.get("rope_type", rs.get("type", "default"))
        rope_theta = rs.get("rope_theta", rope_theta)
        if rope_type == "llama3":
            try:
                scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]),
                                      float(rs["high_freq_factor"]),
                                      int(rs["original_max_position_embeddings"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{origin}: rope_scaling {rs!r} is not a llama3 "
                                      f"scaling ({exc})") from None
        elif rope_type != "default":
            raise CheckpointError(f"{origin}: rope_scaling type {rope_type!r} is not "
                                  "supported (default or llama3)")
    dim, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    attention_bias = bool(cfg.get("attention_bias", False))
    qwen2 = model_type == "qwen2"
    try:
        return ModelConfig(
            vocab_size=int(need("vocab_size")), dim=dim,
            num_layers=int(need("num_hidden_layers")), num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or dim // heads),
            ffn_dim=int(need("intermediate_size")),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), dtype=dtype,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias, o_bias=attention_bias and not qwen2,
            mlp_bias=bool(cfg.get("mlp_bias", False)), rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings"))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{origin}: {exc}") from None


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index ({exc})") from None
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors file")
    return files


def safetensors_tensors(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of the directory's shards, with its shape; read only when loaded."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError("reading safetensors needs the safetensors package: "
                              "pip install 'kvtier[model]'") from None
    entries: dict[str, TensorEntry] = {}
    for shard in _shards(path):
        if not shard.is_file():
            raise CheckpointError(f"shard {shard} named by the index does not exist")
        try:
            with safe_open(str(shard), framework="pt") as f:
                names = list(f.keys())
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
        except Exception as exc:  # the Rust side raises SafetensorError, a bare Exception
            raise CheckpointError(f"{shard} is not a readable safetensors file "
                                  f"({exc})") from None
        for name in names:
            if name in entries:
                raise CheckpointError(f"tensor {name!r} is in two shards of {path}")

            def load(shard: Path = shard, name: str = name) -> torch.Tensor:
                with safe_open(str(shard), framework="pt") as f:
                    tensor: torch.Tensor = f.get_tensor(name)
                return tensor

            entries[name] = TensorEntry(shapes[name], load)
    return entries


def load_safetensors_model(path: Path, dtype: str = "float32",
                           device: str | torch.device = "cpu") -> LlamaModel:
    """The model in Hugging Face directory ``path``, in ``dtype`` on ``device``."""
    file = path / "config.json"
    config = config_from_hf(read_json_object(file), str(file), dtype)
    return build_model(config, safetensors_tensors(path), str(path), device)
