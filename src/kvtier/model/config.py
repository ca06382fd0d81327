"""Frozen, validated shape of the reference model, and how it reads a checkpoint's config:
:class:`ModelConfig`, :class:`RopeScaling`."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.counts import as_integer, check_count
from kvtier.reprs import shown
from kvtier.sequence import is_finite_number, short_repr
from kvtier.storage import DTYPE_BYTES, KVLayout


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3's RoPE frequency scaling (``rope_type: llama3``): long wavelengths are
    stretched by ``factor``, short ones kept, the band between blended smoothly."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not is_finite_number(value) or not value > 0:  # inf: RoPE degenerate
                raise ValueError(f"rope_scaling.{name} must be a finite number > 0, got "
                                 f"{short_repr(value)}")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be "
                             f"> low_freq_factor ({self.low_freq_factor})")
        object.__setattr__(self, "original_max_position_embeddings", check_count(
            "rope_scaling.original_max_position_embeddings",
            self.original_max_position_embeddings, 1))


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A Llama-style decoder: ``num_heads`` query heads share ``num_kv_heads`` K/V heads.

    ``tie_word_embeddings``: the output projection is the embedding matrix (no second copy).
    ``qkv_bias`` / ``o_bias`` / ``mlp_bias``: the projections carry biases (Qwen2: q, k, v;
    Llama's ``attention_bias``: q, k, v and o). ``max_position_embeddings``: the longest
    context the model may see (``None``: unchecked). ``seed`` draws random weights when a
    model is built without a checkpoint.
    """

    vocab_size: int = 256
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    ffn_dim: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "float32"
    seed: int = 0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "ffn_dim"):
            # NOTE: kept as the plain ints they are (``kvtier.counts``): NumPy sizes (a
            # checkpoint's config read through NumPy) were refused.
            object.__setattr__(self, name, check_count(name, getattr(self, name), 1))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({shown(self.num_heads)}) must be a multiple of "
                             f"num_kv_heads ({shown(self.num_kv_heads)})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got "
                             f"{shown(self.head_dim)}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {shown(self.dtype)}")
        for name in ("rope_theta", "norm_eps"):
            # NOTE: finite floats: a str raised TypeError ('>' not supported), and inf or an
            # int past the float range made RoPE or the norms silently degenerate.
            value = getattr(self, name)
            if not is_finite_number(value) or not value > 0:
                raise ValueError(f"{name} must be a finite number > 0, got {short_repr(value)}")
        seed = as_integer(self.seed)
        if seed is None:
            raise ValueError(f"seed must be an integer, got {shown(self.seed)}")
        object.__setattr__(self, "seed", seed)
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be a bool, got {shown(getattr(self, name))}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling must be a RopeScaling or None, "
                             f"got {shown(self.rope_scaling)}")
        n = self.max_position_embeddings
        if n is not None:
            limit = as_integer(n)
            if limit is None or limit < 1:
                raise ValueError(f"max_position_embeddings must be an integer >= 1 or None, "
                                 f"got {shown(n)}")
            object.__setattr__(self, "max_position_embeddings", limit)

    def kv_layout(self, tokens_per_block: int, layout: str = "block_major") -> KVLayout:
        """The KV block shape this model reads and writes. Pure."""
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, tokens_per_block,
                        self.dtype, layout)

    def check_context(self, num_tokens: int) -> None:
        """Raise ValueError if ``num_tokens`` positions exceed the model's context. Pure."""
        limit = self.max_position_embeddings
        if limit is not None and num_tokens > limit:
            raise ValueError(f"{num_tokens} tokens exceed the model's maximum context of "
                             f"{limit} tokens")
