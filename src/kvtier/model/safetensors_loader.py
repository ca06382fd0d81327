"""A Hugging Face checkpoint directory as a :class:`LlamaModel`: ``config.json`` into a
:class:`ModelConfig`, weights from ``*.safetensors`` (one file, or shards named by
``model.safetensors.index.json``), read lazily with the ``safetensors`` package (extra
``model``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvtier import json_text
from kvtier.model.checkpoint import CheckpointError, TensorEntry, build_model, read_json_object
from kvtier.model.config import ModelConfig, RopeScaling
from kvtier.model.llama import LlamaModel
from kvtier.reprs import shown
from kvtier.sequence import is_finite_number

# config.json's model_type values whose weights this model computes exactly.
MODEL_TYPES = ("llama", "mistral", "qwen2")


_REQUIRED = object()  # value()'s default for a key that must be there


def config_from_hf(cfg: dict[str, Any], origin: str, dtype: str = "float32") -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` (as a dict).
    CheckpointError naming the key if one is missing or unsupported."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{origin}: model_type {shown(model_type)} is not supported; kvtier "
                              f"reads {list(MODEL_TYPES)}")

    # NOTE: each value is checked for its type: int() of a list was a TypeError (status 70),
    # bool("no") is True, int(3.7) is 3.
    def value(key: str, kinds: tuple[type, ...], what: str, default: Any) -> Any:
        found = cfg.get(key)
        if found is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{origin} lacks the key {shown(key)}")
            return default
        if isinstance(found, bool) is not (bool in kinds) or not isinstance(found, kinds):
            raise CheckpointError(f"{origin}: {key} must be {what}, got {shown(found):.60}")
        _check_finite(found, kinds, key, origin)
        return found

    def count(key: str, default: Any = _REQUIRED) -> Any:
        return value(key, (int,), "an integer", default)

    def flag(key: str) -> bool:
        return bool(value(key, (bool,), "true or false", False))

    def nested(rs: dict[str, Any], key: str, kinds: tuple[type, ...], what: str,
               default: Any = _REQUIRED) -> Any:
        found = rs.get(key)
        if found is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{origin}: rope_scaling lacks the key {shown(key)}")
            return default
        if isinstance(found, bool) or not isinstance(found, kinds):
            raise CheckpointError(f"{origin}: rope_scaling.{key} must be {what}, got "
                                  f"{shown(found):.60}")
        _check_finite(found, kinds, f"rope_scaling.{key}", origin)
        return found

    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{origin}: hidden_act {shown(cfg['hidden_act']):.60} is not "
                              "supported (the MLP is SwiGLU)")
    scaling = None
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if rs is not None and not isinstance(rs, dict):
        raise CheckpointError(f"{origin}: rope_scaling must be an object or null, got "
                              f"{shown(rs):.60}")
    rope_theta = value("rope_theta", (int, float), "a number", None)
    if isinstance(rs, dict):
        rope_type = rs.get("rope_type", rs.get("type", "default"))
        # NOTE: the nested values are checked as the top-level ones: float() took "2.0"
        # and true (1.0), int() took 8192.7 as 8192, and a list raised a TypeError that
        # named no key.
        rope_theta = nested(rs, "rope_theta", (int, float), "a number", rope_theta)
        if rope_type == "llama3":
            factor, low, high = (float(nested(rs, key, (int, float), "a number"))
                                 for key in ("factor", "low_freq_factor", "high_freq_factor"))
            original = nested(rs, "original_max_position_embeddings", (int,), "an integer")
            try:
                scaling = RopeScaling(factor, low, high, original)
            except ValueError as exc:
                raise CheckpointError(f"{origin}: rope_scaling is not a llama3 scaling "
                                      f"({exc})") from None
        elif rope_type != "default":
            raise CheckpointError(f"{origin}: rope_scaling type {shown(rope_type):.60} is not "
                                  "supported (default or llama3)")
    dim, heads = count("hidden_size"), count("num_attention_heads")
    attention_bias = flag("attention_bias")
    qwen2 = model_type == "qwen2"
    # A head count of 0 is ModelConfig's to refuse (naming it), not a division's.
    # NOTE: defaults only for what is unset: with `or`, a 0 was read as unset (as many K/V
    # heads as query heads; hidden_size / heads as the head size).
    head_dim = count("head_dim", dim // heads if heads > 0 else 0)
    sizes = (count("vocab_size"), count("num_hidden_layers"),
             count("num_key_value_heads", heads), count("intermediate_size"),
             count("max_position_embeddings", None))
    norm_eps = value("rms_norm_eps", (int, float), "a number", 1e-6)
    window = _sliding_window(cfg, model_type, sizes[1], count, flag, origin)
    if window is not None:
        # NOTE: this model attends to every earlier position: past the window a sliding
        # window model (Mistral's 4096, Qwen2's when used) reads fewer, and every logit
        # there differed from transformers', without a word. Exact up to it, refused past.
        sizes = (*sizes[:4], window if sizes[4] is None else min(sizes[4], window))
    tie, mlp_bias = flag("tie_word_embeddings"), flag("mlp_bias")
    try:
        return ModelConfig(
            vocab_size=sizes[0], dim=dim, num_layers=sizes[1], num_heads=heads,
            num_kv_heads=sizes[2], head_dim=head_dim, ffn_dim=sizes[3],
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            norm_eps=float(norm_eps), dtype=dtype, tie_word_embeddings=tie,
            qkv_bias=qwen2 or attention_bias, o_bias=attention_bias and not qwen2,
            mlp_bias=mlp_bias, rope_scaling=scaling, max_position_embeddings=sizes[4])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{origin}: {exc}") from None


def _check_finite(found: Any, kinds: tuple[type, ...], key: str, origin: str) -> None:
    """CheckpointError naming ``key`` if ``found``, read as a number (``float`` among
    ``kinds``), is none a float holds: NaN, infinite, or an integer past the float range.

    NOTE: JSON writes an integer of any length: a rope_theta or rms_norm_eps of 400 digits
    raised OverflowError from float() (status 70), naming nothing."""
    if float in kinds and not is_finite_number(found):
        raise CheckpointError(f"{origin}: {key} must be a finite number, got {shown(found):.60}")


# transformers' defaults: Mistral's and Qwen2's sliding window where config.json names
# none, and the first Qwen2 layer that slides.
_DEFAULT_SLIDING_WINDOW = 4096
_DEFAULT_MAX_WINDOW_LAYERS = 28


def _sliding_window(cfg: dict[str, Any], model_type: str, num_layers: int,
                    count: Any, flag: Any, origin: str) -> int | None:
    """The attention window of some layer of the model, as transformers reads
    ``config.json`` (``None``: every layer attends to the whole context). ``count`` and
    ``flag`` read a key as config_from_hf does. Pure."""
    if model_type == "llama":
        return None  # LlamaConfig has no sliding window
    if model_type == "qwen2" and not flag("use_sliding_window"):
        return None
    if "sliding_window" in cfg and cfg["sliding_window"] is None:
        return None
    window: int = count("sliding_window", _DEFAULT_SLIDING_WINDOW)
    if window < 1:
        raise CheckpointError(f"{origin}: sliding_window must be an integer >= 1 or null, "
                              f"got {window}")
    if model_type == "mistral":
        return window
    kinds = cfg.get("layer_types")
    if kinds is not None:
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise CheckpointError(f"{origin}: layer_types must be an array of strings, got "
                                  f"{shown(kinds):.60}")
        return window if "sliding_attention" in kinds else None
    first = count("max_window_layers", _DEFAULT_MAX_WINDOW_LAYERS)
    return window if first < num_layers else None


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json_text.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index "
                                  f"({str(exc)[:200]})") from None
        # NOTE: a weight_map of 5 raised AttributeError, a shard name of 5 TypeError (70).
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object mapping each tensor "
                                  f"to its shard, got {shown(weight_map):.60}")
        names = list(weight_map.values())
        for name in names:
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise CheckpointError(f"{index}: weight_map must map each tensor to the name "
                                      f"of a shard file in {path}, got {shown(name):.60}")
        return [path / name for name in sorted(set(names))]
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
                raise CheckpointError(f"tensor {shown(name)} is in two shards of {path}")

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
