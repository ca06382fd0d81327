"""Frozen, validated shape of the reference model."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.storage import DTYPE_BYTES, KVLayout


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A Llama-style decoder: ``num_heads`` query heads share ``num_kv_heads`` K/V heads."""

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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "ffn_dim"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ValueError(f"rope_theta and norm_eps must be > 0, got {self.rope_theta!r} "
                             f"and {self.norm_eps!r}")

    def kv_layout(self, tokens_per_block: int, layout: str = "block_major") -> KVLayout:
        """The KV block shape this model reads and writes. Pure."""
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, tokens_per_block,
                        self.dtype, layout)
