"""A llama.cpp GGUF file as a :class:`LlamaModel`: config from its metadata, weights
dequantized with the ``gguf`` package (extra ``model``).

llama.cpp's converter stores the rows of Llama's Q and K projections permuted: it turns
Hugging Face's RoPE pairs (i, i + head_dim/2) into adjacent rows (2i, 2i + 1), which its
interleaved rotation wants. This model rotates halves, as Hugging Face does, so each head's
rows are put back::

    GGUF rows of one head   q0 q32 q1 q33 ... q31 q63      (pairs adjacent)
    Hugging Face rows       q0 q1 ... q31 | q32 ... q63    (pairs half a head apart)

Qwen2 files are converted without that permutation (llama.cpp rotates them as halves).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtier.model.checkpoint import CheckpointError, TensorEntry, build_model
from kvtier.model.config import ModelConfig
from kvtier.model.llama import LlamaModel

# Architectures whose GGUF tensors map onto this model, and whether Q/K rows are permuted.
ARCHITECTURES = {"llama": True, "mistral": True, "qwen2": False}

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading a GGUF file needs the gguf package: "
                              "pip install 'kvtier[model]'") from None
    return gguf


@functools.lru_cache(maxsize=2)
def open_gguf(path: Path) -> Any:
    """The ``gguf.GGUFReader`` of ``path`` (memory-mapped; parsed once, as the model and
    the tokenizer both read it)."""
    gguf = _import_gguf()
    try:
        return gguf.GGUFReader(str(path))
    except (OSError, ValueError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a readable GGUF file ({exc})") from None


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata ``key`` (``default`` if absent). Pure."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor (unknown names are kept). Pure."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return gguf_name


def config_from_gguf(reader: Any, origin: str, dtype: str = "float32") -> ModelConfig:
    """The :class:`ModelConfig` in a GGUF file's metadata. CheckpointError naming the key
    if one is missing or unsupported."""
    arch = gguf_field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{origin} holds a {arch!r} model; kvtier reads "
                              f"{sorted(ARCHITECTURES)}")

    def need(key: str) -> Any:
        value = gguf_field(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{origin} lacks the metadata key {arch}.{key}")
        return value

    scaling = gguf_field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointError(f"{origin}: RoPE scaling {scaling!r} ({arch}.rope.scaling.type) "
                              "is not supported")
    names = {t.name for t in reader.tensors}
    dim, heads = int(need("embedding_length")), int(need("attention.head_count"))
    vocab = gguf_field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(f"{origin} lacks {arch}.vocab_size and tokenizer.ggml.tokens")
        vocab = len(tokens.data)
    try:
        return ModelConfig(
            vocab_size=int(vocab), dim=dim, num_layers=int(need("block_count")),
            num_heads=heads, num_kv_heads=int(gguf_field(reader,
                                                         f"{arch}.attention.head_count_kv",
                                                         heads)),
            head_dim=int(gguf_field(reader, f"{arch}.attention.key_length", dim // heads)),
            ffn_dim=int(need("feed_forward_length")),
            rope_theta=float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            norm_eps=float(need("attention.layer_norm_rms_epsilon")), dtype=dtype,
            tie_word_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
            mlp_bias="blk.0.ffn_up.bias" in names,
            max_position_embeddings=int(need("context_length")))
    except ValueError as exc:
        raise CheckpointError(f"{origin}: {exc}") from None


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (see the module docstring). Pure."""
    rows = w.shape[0]
    head_dim = rows // num_heads
    out: np.ndarray = (w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2)
                       .reshape(w.shape))
    return out


def gguf_tensors(reader: Any, config: ModelConfig, arch: str) -> dict[str, TensorEntry]:
    """The file's tensors under Hugging Face names (``rope_freqs`` excluded), each read and
    dequantized only when loaded."""
    gguf = _import_gguf()
    permuted = ARCHITECTURES[arch]
    entries: dict[str, TensorEntry] = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue
        name = hf_name(tensor.name)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest first
        heads = None
        if permuted and ".self_attn.q_proj." in name:
            heads = config.num_heads
        elif permuted and ".self_attn.k_proj." in name:
            heads = config.num_kv_heads

        def load(tensor: Any = tensor, shape: tuple[int, ...] = shape,
                 heads: int | None = heads) -> torch.Tensor:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            if heads is not None:
                array = _unpermute(array, heads)
            # A float32 tensor is a view of the read-only memory map: copy that one.
            return torch.from_numpy(np.require(array, np.float32, ["C", "W"]))

        entries[name] = TensorEntry(shape, load)
    return entries


def load_gguf_model(path: Path, dtype: str = "float32",
                    device: str | torch.device = "cpu") -> LlamaModel:
    """The model in GGUF file ``path``, dequantized to ``dtype`` on ``device``."""
    reader = open_gguf(path)
    origin = str(path)
    config = config_from_gguf(reader, origin, dtype)
    arch = gguf_field(reader, "general.architecture")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    factors = None
    if freqs is not None:  # Llama 3's scaled RoPE, as llama.cpp stores it: per-pair divisors
        factors = torch.from_numpy(np.array(_import_gguf().quants.dequantize(freqs.data,
                                                                     freqs.tensor_type)))
    return build_model(config, gguf_tensors(reader, config, arch), origin, device, factors)
