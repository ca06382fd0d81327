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
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtier.model.checkpoint import CheckpointError, TensorEntry, build_model, check_tensors
from kvtier.model.config import ModelConfig
from kvtier.model.llama import LlamaModel
from kvtier.reprs import shown
from kvtier.sequence import first_line

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


class _PastTheEnd(Exception):
    """A read of bytes ``start..end`` of a file of ``size`` bytes (``tensor``: the tensor
    whose data they are, None for the header)."""

    def __init__(self, start: int, end: int, size: int, tensor: str | None) -> None:
        super().__init__(start, end, size, tensor)
        self.start, self.end, self.size, self.tensor = start, end, size, tensor


@functools.cache
def _reader_class() -> type[Any]:
    """``gguf.GGUFReader`` refusing every read past the file's end (``_PastTheEnd``).

    NOTE: the reader slices its memory map, and a slice past the end is short, not an
    error: a truncated file (a download or copy cut short) failed later in numpy's words,
    'cannot reshape array of size 66784 into shape (576,360)' or 'index 0 is out of
    bounds', naming neither the tensor nor that the file is short."""
    base: Any = _import_gguf().GGUFReader

    class CheckedReader(base):  # type: ignore[misc]
        _tensor_fields: Sequence[Any] = ()
        _tensor_start = 0

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            self._tensor_start, self._tensor_fields = start_offs, fields
            super()._build_tensors(start_offs, fields)

        def _get(self, offset: int, dtype: Any, count: int = 1,
                 override_order: Any = None) -> Any:
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise _PastTheEnd(int(offset), end, len(self.data), self._tensor_at(offset))
            return super()._get(offset, dtype, count, override_order)

        def _tensor_at(self, offset: int) -> str | None:
            """The name of the tensor whose data starts at ``offset`` (None: none). Pure."""
            for field in self._tensor_fields:
                try:  # name length, name, dimensions, their count, type, data offset
                    name, data_offset = field.parts[1], field.parts[5]
                    if self._tensor_start + int(data_offset[0]) == offset:
                        return bytes(name).decode("utf-8", "replace")
                except (IndexError, TypeError, ValueError):
                    return None
            return None

    return CheckedReader


@functools.lru_cache(maxsize=2)
def open_gguf(path: Path) -> Any:
    """The ``gguf.GGUFReader`` of ``path`` (memory-mapped; parsed once, as the model and
    the tokenizer both read it). CheckpointError naming the file if it cannot be read, and
    for a file that ends before the bytes its header lists (a truncated download), the
    tensor (or the header) that runs past its end."""
    reader_class = _reader_class()
    try:
        return reader_class(str(path))
    except _PastTheEnd as exc:
        where = (f"its header (metadata and tensor list) runs past them (a field at bytes "
                 f"{exc.start:,}..{exc.end:,})" if exc.tensor is None
                 else f"tensor {shown(exc.tensor)} lies at bytes {exc.start:,}..{exc.end:,}")
        raise CheckpointError(f"{path} is truncated or corrupt: the file holds {exc.size:,} "
                              f"bytes, and {where}") from None
    except (OSError, ValueError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a readable GGUF file ({exc})") from None


def gguf_field(reader: Any, key: str, origin: str | Path, default: Any = None) -> Any:
    """The value of metadata ``key`` (``default`` if absent); CheckpointError naming
    ``origin`` and the key if a string in it is no UTF-8. Pure.

    NOTE: the gguf package decodes a string only when its value is read: a flipped bit in
    one raised UnicodeDecodeError, which the command line printed naming neither the file
    nor the key."""
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{origin}: metadata key {key} is no UTF-8 text "
                              f"({first_line(exc)})") from None


def gguf_int(reader: Any, key: str, origin: str) -> int | None:
    """Metadata ``key`` as an int (None if absent); CheckpointError naming ``origin`` and the
    key if it holds anything else (a string, an array, a bool, a float). Pure."""
    value = gguf_field(reader, key, origin)
    if value is None:
        return None
    if type(value) is not int:
        raise CheckpointError(f"{origin}: {key} must be an integer, got {shown(value):.60}")
    return value


def gguf_number(reader: Any, key: str, origin: str) -> float | None:
    """Metadata ``key`` as a float (None if absent); CheckpointError naming ``origin`` and
    the key if it is no real number. Pure."""
    value = gguf_field(reader, key, origin)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CheckpointError(f"{origin}: {key} must be a number, got {shown(value):.60}")
    return float(value)


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor (unknown names are kept). Pure."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return gguf_name


_HF_LAYER_NAMES = {hf: own for own, hf in _LAYER_NAMES.items()}
_HF_GLOBAL_NAMES = {hf: own for own, hf in _GLOBAL_NAMES.items()}


def gguf_name(hf: str) -> str:
    """The GGUF name of a Hugging Face tensor name, :func:`hf_name` undone (other names
    are kept). Pure."""
    if hf in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[hf]
    parts = hf.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        module = ".".join(parts[3:-1])
        if module in _HF_LAYER_NAMES:
            return f"blk.{parts[2]}.{_HF_LAYER_NAMES[module]}.{parts[-1]}"
    return hf


def config_from_gguf(reader: Any, origin: str, dtype: str = "float32") -> ModelConfig:
    """The :class:`ModelConfig` in a GGUF file's metadata. CheckpointError naming the key
    if one is missing or unsupported."""
    arch = gguf_field(reader, "general.architecture", origin)
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise CheckpointError(f"{origin} holds a {shown(arch):.60} model; kvtier reads "
                              f"{sorted(ARCHITECTURES)}")

    # NOTE: every number is checked for its type here: int() of an array was a TypeError,
    # of a string a ValueError that named no key.
    def need(key: str) -> int:
        value = gguf_int(reader, f"{arch}.{key}", origin)
        if value is None:
            raise CheckpointError(f"{origin} lacks the metadata key {arch}.{key}")
        return value

    def optional(key: str, default: int) -> int:
        value = gguf_int(reader, f"{arch}.{key}", origin)
        return default if value is None else value

    scaling = gguf_field(reader, f"{arch}.rope.scaling.type", origin)
    if scaling not in (None, "none"):
        raise CheckpointError(f"{origin}: RoPE scaling {shown(scaling)} ({arch}.rope.scaling.type) "
                              "is not supported")
    names = {t.name for t in reader.tensors}
    dim, heads = need("embedding_length"), need("attention.head_count")
    vocab = gguf_int(reader, f"{arch}.vocab_size", origin)
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(f"{origin} lacks {arch}.vocab_size and tokenizer.ggml.tokens")
        vocab = len(tokens.data)
    norm_eps = gguf_number(reader, f"{arch}.attention.layer_norm_rms_epsilon", origin)
    rope_theta = gguf_number(reader, f"{arch}.rope.freq_base", origin)
    if norm_eps is None:
        raise CheckpointError(f"{origin} lacks the metadata key "
                              f"{arch}.attention.layer_norm_rms_epsilon")
    # A head count of 0 is ModelConfig's to refuse (naming it), not a division's.
    head_dim = optional("attention.key_length", dim // heads if heads > 0 else 0)
    num_layers, ffn_dim = need("block_count"), need("feed_forward_length")
    num_kv_heads = optional("attention.head_count_kv", heads)
    # NOTE: a rotation of part of each head (GPT-NeoX style) was computed as one of all of
    # it, without a word: every logit past the first position wrong.
    rope_dims = gguf_int(reader, f"{arch}.rope.dimension_count", origin)
    if rope_dims is not None and rope_dims != head_dim:
        raise CheckpointError(f"{origin}: {arch}.rope.dimension_count is {rope_dims}, the "
                              f"heads' size {head_dim}: RoPE over part of each head is not "
                              "supported")
    context = need("context_length")
    try:
        return ModelConfig(
            vocab_size=vocab, dim=dim, num_layers=num_layers, num_heads=heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, ffn_dim=ffn_dim,
            rope_theta=10000.0 if rope_theta is None else rope_theta,
            norm_eps=norm_eps, dtype=dtype,
            tie_word_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
            mlp_bias="blk.0.ffn_up.bias" in names, max_position_embeddings=context)
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
    arch = gguf_field(reader, "general.architecture", origin)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    check_tensor_data(reader, origin)
    tensors = gguf_tensors(reader, config, arch)
    check_tensors(config, tensors, origin, gguf_name)
    factors = None if freqs is None else rope_freq_factors(freqs, config, origin)
    return build_model(config, tensors, origin, device, factors, gguf_name)


def check_tensor_data(reader: Any, origin: str) -> None:
    """CheckpointError naming both if two tensors' data share bytes of the file. Pure.

    NOTE: the reader checks that each tensor lies inside the file, not that they lie apart:
    a file of one layer's data and a header of thousands of layers all pointing at it was
    read layer after layer, each a new copy dequantized into memory, until the process ran
    out of it (killed, no word said); the model's memory is now bounded by the file's size
    (times the dequantization's growth)."""
    spans = sorted((int(t.data_offset), int(t.n_bytes), t.name) for t in reader.tensors)
    for (start, size, name), (next_start, _, next_name) in itertools.pairwise(spans):
        if start + size > next_start:
            raise CheckpointError(f"{origin}: tensors {shown(name)} and {shown(next_name)} "
                                  f"share bytes of the file ({size:,} bytes at offset "
                                  f"{start:,}, the other at {next_start:,}): each tensor's "
                                  "data must be its own")


def rope_freq_factors(tensor: Any, config: ModelConfig, origin: str) -> torch.Tensor:
    """Llama 3's scaled RoPE as llama.cpp stores it: ``rope_freqs.weight``, one divisor per
    pair of each head's dimensions (head_dim / 2 of them), float32. CheckpointError naming
    the tensor if it has another shape, cannot be read as numbers, or holds a divisor that
    is no finite number > 0.

    NOTE: it was taken as it came: a tensor of 1 value was broadcast over every pair, one
    of another length was torch's RuntimeError (status 70) when the model was built, an
    integer one the gguf package's NotImplementedError, and a 0 or NaN made every angle
    infinite or NaN, every logit past the first position garbage, without a word."""
    name = "rope_freqs.weight"
    shape = tuple(int(n) for n in reversed(tensor.shape))
    want = (config.head_dim // 2,)
    if shape != want:
        raise CheckpointError(f"tensor {shown(name)} of {origin} has shape {list(shape)}, "
                              f"the config needs {list(want)} (one divisor per pair of a "
                              f"head's {config.head_dim} dimensions)")
    try:
        array = _import_gguf().quants.dequantize(tensor.data, tensor.tensor_type)
        factors = torch.from_numpy(np.array(array, dtype=np.float32)).reshape(want)
    except Exception as exc:  # the gguf package's: a type it cannot dequantize
        raise CheckpointError(f"tensor {shown(name)} of {origin} cannot be read "
                              f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not bool((torch.isfinite(factors) & (factors > 0)).all()):
        bad = next(float(x) for x in factors.tolist() if not (math.isfinite(x) and x > 0))
        raise CheckpointError(f"tensor {shown(name)} of {origin} holds {bad}, not a RoPE "
                              "frequency divisor (a finite number > 0)")
    return factors
