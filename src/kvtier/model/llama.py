"""A small Llama-style decoder in plain torch whose attention pages K/V through block tables.

RMSNorm, rotary position embeddings (optionally Llama 3's scaled frequencies), grouped-query
attention and a SwiGLU MLP, optional projection biases (Qwen2) and tied embeddings. The
weights are seeded random ones, or a checkpoint's (``kvtier.model.checkpoint`` loads them
into a :class:`LlamaWeights`; nothing is downloaded). ``forward_chunk`` computes tokens
``[start_pos, start_pos + n)`` of one request::

    block table  [ b0 ][ b1 ][ b2 ]            tokens_per_block = 4, start_pos = 6, n = 3
    positions     0..3  4..7  8..11
    cached        ######..                     read from the pool (reused or computed before)
    this chunk          ###                    K/V written to (b1, 2) (b1, 3) (b2, 0), then read

Each layer writes the chunk's K/V into the pool at the slots its block table names, then
gathers the request's blocks and attends with a causal mask aligned to the last key.
``full_recompute`` is the same model with no cache at all: the reference that reuse,
offloading and onboarding must match.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kvtier.blocks import cdiv
from kvtier.counts import as_integer
from kvtier.model.config import ModelConfig
from kvtier.reprs import shown
from kvtier.sequence import first_line
from kvtier.storage import KVLayout, KVStorage

# Where a layer's attention gets its K/V: (layer, k, v) -> (keys, values).
KVFn = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class LayerWeights(NamedTuple):
    """One decoder layer. Projections are [in, out] (``h @ w``: the transpose of a Hugging
    Face ``Linear.weight``); biases are ``None`` where the model has none."""

    attn_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    mlp_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None


class LlamaWeights(NamedTuple):
    """A whole model's weights, as a checkpoint loader hands them over. ``lm_head`` is
    [dim, vocab] (``None``: tied to ``embed``); ``rope_freq_factors`` divides each RoPE
    frequency (llama.cpp's ``rope_freqs`` tensor; ``None``: from the config alone)."""

    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor | None = None
    rope_freq_factors: torch.Tensor | None = None


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """The RoPE inverse frequencies [head_dim / 2] (float32), with Llama 3 scaling if the
    config has it. Pure."""
    half = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
    inv_freq = 1.0 / config.rope_theta ** half
    sc = config.rope_scaling
    if sc is None:
        return inv_freq
    # Wavelengths longer than the original context / low_freq_factor are stretched by
    # `factor`; shorter than original / high_freq_factor kept; the band between blended.
    old = sc.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / sc.low_freq_factor, inv_freq / sc.factor, inv_freq)
    smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    blended = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= old / sc.high_freq_factor) & (wavelen <= old / sc.low_freq_factor)
    return torch.where(medium, blended, scaled)


def usable_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that holds data here; ValueError naming it for one
    torch cannot parse or this machine cannot use (torch answers "cuda" on a build or a
    machine without CUDA with an AssertionError, or a RuntimeError), or ``meta``."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
        raise ValueError(f"device {shown(str(device)[:40])} cannot be used here: "
                         f"{first_line(exc)}") from None
    if dev.type == "meta":
        raise ValueError("device 'meta' holds no data: a model cannot run on it")
    return dev


class LlamaModel:
    """A decoder on ``device``: ``weights`` if given (a checkpoint's, kept as they are when
    they already have the model's dtype and device: no second copy), else seeded random
    ones; see the module docstring."""

    def __init__(self, config: ModelConfig, device: str | torch.device = "cpu",
                 weights: LlamaWeights | None = None) -> None:
        self.config = config
        self.device = usable_device(device)
        self.dtype: torch.dtype = getattr(torch, config.dtype)
        # The heads this model computes: all of them (a tensor-parallel shard holds its part).
        self.num_local_heads = config.num_heads
        self.num_local_kv_heads = config.num_kv_heads
        inv_freq = rope_inv_freq(config)
        if weights is not None:
            self._take(weights)
            if weights.rope_freq_factors is not None:
                inv_freq = inv_freq / weights.rope_freq_factors.float().cpu()
            self.inv_freq = inv_freq.to(self.device)
            return
        # NOTE: drawn on the model's device (fast for large models), so the weights of a
        # seed differ between CPU and CUDA; each reference runs on its own device.
        gen = torch.Generator(self.device).manual_seed(config.seed)

        def weight(rows: int, cols: int, std: float) -> torch.Tensor:
            w = torch.randn(rows, cols, generator=gen, device=self.device)
            return (w * std).to(self.dtype)

        def norm() -> torch.Tensor:
            w = torch.randn(config.dim, generator=gen, device=self.device)
            return (1.0 + 0.1 * w).to(self.dtype)

        c = config
        s = c.dim ** -0.5
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.embed = weight(c.vocab_size, c.dim, 1.0)
        self.layers = [
            LayerWeights(norm(), weight(c.dim, q_dim, s), weight(c.dim, kv_dim, s),
                         weight(c.dim, kv_dim, s), weight(q_dim, c.dim, q_dim ** -0.5),
                         norm(), weight(c.dim, c.ffn_dim, s), weight(c.dim, c.ffn_dim, s),
                         weight(c.ffn_dim, c.dim, c.ffn_dim ** -0.5))
            for _ in range(c.num_layers)
        ]
        self.final_norm = norm()
        # A tied head is a view of the embeddings, not a copy.
        self.lm_head = self.embed.T if c.tie_word_embeddings else weight(c.dim, c.vocab_size, s)
        self.inv_freq = inv_freq.to(self.device)
        if c.qkv_bias or c.o_bias or c.mlp_bias:
            def bias(n: int) -> torch.Tensor:
                return (0.02 * torch.randn(n, generator=gen, device=self.device)).to(self.dtype)

            def with_bias(w: LayerWeights) -> LayerWeights:
                qkv, o, mlp = c.qkv_bias, c.o_bias, c.mlp_bias
                return w._replace(
                    bq=bias(q_dim) if qkv else None, bk=bias(kv_dim) if qkv else None,
                    bv=bias(kv_dim) if qkv else None, bo=bias(c.dim) if o else None,
                    b_gate=bias(c.ffn_dim) if mlp else None,
                    b_up=bias(c.ffn_dim) if mlp else None, b_down=bias(c.dim) if mlp else None)

            self.layers = [with_bias(w) for w in self.layers]

    def _take(self, weights: LlamaWeights) -> None:
        """Adopt a checkpoint's weights (moved or cast only where they differ)."""
        def own(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=self.device, dtype=self.dtype)

        def own_opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else own(t)

        self.embed = own(weights.embed)
        self.layers = [LayerWeights(*(own_opt(t) for t in w)) for w in weights.layers]  # type: ignore[arg-type]
        self.final_norm = own(weights.final_norm)
        self.lm_head = self.embed.T if weights.lm_head is None else own(weights.lm_head)

    def kv_layout(self, tokens_per_block: int, layout: str = "block_major") -> KVLayout:
        """The KV blocks this model reads and writes (a tensor-parallel shard: its heads).
        Pure."""
        return self.config.kv_layout(tokens_per_block, layout)

    # ---- the two entry points ----------------------------------------------------------

    @torch.inference_mode()
    def forward_chunk(self, kv: KVStorage, block_table: Sequence[int], tokens: Sequence[int],
                      start_pos: int,
                      before_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logits [n, vocab] (float32) of ``tokens`` at positions ``start_pos`` on, reading
        the K/V of positions ``< start_pos`` from ``kv`` through ``block_table`` and writing
        the chunk's own K/V there. ``before_layer(i)`` runs just before layer ``i`` touches
        the pool (to wait for that layer's copies)."""
        tpb = kv.layout.tokens_per_block
        pos = as_integer(start_pos)
        if pos is None:
            raise ValueError(f"start_pos must be an int, got {shown(start_pos)}")
        start_pos = pos
        end = start_pos + len(tokens)
        self.config.check_context(end)
        if start_pos < 0 or not tokens or end > len(block_table) * tpb:
            raise ValueError(f"tokens [{start_pos}, {end}) do not fit a block table of "
                             f"{len(block_table)} blocks of {tpb} tokens")
        used = block_table[:cdiv(end, tpb)]
        check_ids(used, kv.num_blocks, "block_table")
        if len(set(used)) != len(used):
            # NOTE: a block named twice took two ranges of positions: the later chunk's K/V
            # overwrote the earlier's, and attention read them twice, logits wrong without
            # a word (a hand-built table; the manager never repeats a block).
            first: dict[int, int] = {}
            for j, block in enumerate(used):
                i = first.setdefault(block, j)
                if i != j:
                    raise ValueError(f"block_table[{j}] is block {block}, as block_table[{i}] "
                                     "is: each block holds its own positions")
        positions = torch.arange(start_pos, end, device=self.device)
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        blocks, offsets = table[positions // tpb], positions % tpb
        context = table[: cdiv(end, tpb)]

        def paged(layer: int, k: torch.Tensor,
                  v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if before_layer is not None:
                before_layer(layer)
            kv.write(layer, blocks, offsets, k, v)
            return kv.gather(layer, context, end)

        return self._forward(tokens, positions, paged)

    @torch.inference_mode()
    def full_recompute(self, tokens: Sequence[int]) -> torch.Tensor:
        """Logits [len(tokens), vocab] (float32) with no cache at all: the reference."""
        self.config.check_context(len(tokens))
        positions = torch.arange(len(tokens), device=self.device)
        return self._forward(tokens, positions, lambda layer, k, v: (k, v))

    # ---- the layers --------------------------------------------------------------------

    def _forward(self, tokens: Sequence[int], positions: torch.Tensor,
                 kv_of: KVFn) -> torch.Tensor:
        c = self.config
        n = len(tokens)
        ids = list(tokens)
        check_ids(ids, c.vocab_size, "tokens")
        x = self.embed[torch.tensor(ids, dtype=torch.long, device=self.device)]
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        lin = _linear
        heads, kv_heads, out = self.num_local_heads, self.num_local_kv_heads, self._row_split
        for i, w in enumerate(self.layers):
            h = self._rms_norm(x, w.attn_norm)
            q = self._rope(lin(h, w.wq, w.bq).view(n, heads, c.head_dim), cos, sin)
            k = self._rope(lin(h, w.wk, w.bk).view(n, kv_heads, c.head_dim), cos, sin)
            v = lin(h, w.wv, w.bv).view(n, kv_heads, c.head_dim)
            keys, values = kv_of(i, k, v)
            x = x + out(self._attend(q, keys, values), w.wo, w.bo)
            h = self._rms_norm(x, w.mlp_norm)
            x = x + out(F.silu(lin(h, w.w_gate, w.b_gate)) * lin(h, w.w_up, w.b_up),
                        w.w_down, w.b_down)
        return (self._rms_norm(x, self.final_norm) @ self.lm_head).float()

    def _row_split(self, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
        """The output projections (attention's ``wo``, the MLP's ``w_down``): the ones a
        tensor-parallel shard splits by rows, so its partial results are summed over ranks."""
        return _linear(x, weight, bias)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.norm_eps)
        return x32.to(self.dtype) * weight

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the (first half, second half) pairs of each head by position angles."""
        x32 = x.float()
        half = x32.shape[-1] // 2
        x1, x2 = x32[..., :half], x32[..., half:]
        cos, sin = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(self.dtype)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [n, H, D] against k, v [T, KVH, D]; the n queries are the last n of T keys."""
        n, num_heads, head_dim = q.shape
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        mask = causal_lower_right(n, k.shape[1])
        # NOTE: a batch axis of 1: the fused (flash, memory-efficient) kernels want 4-D.
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None],
                                             attn_mask=mask)
        return out[0].transpose(0, 1).reshape(n, num_heads * head_dim)


_INT = frozenset((int,))


def check_ids(ids: Sequence[int], num: int, what: str) -> None:
    """ValueError naming the first of ``ids`` that is no int in ``0..num - 1`` (a token of
    the vocabulary, a block of the pool) before any of them indexes a tensor. Pure.

    NOTE: torch's indexing took -1 as the last row (the last token's embedding, the pool's
    last block: a negative block id was written before the gather refused it), truncated
    1.7 to 1, and on CUDA an id past the end is a device-side assert that ends the
    process's CUDA context."""
    if not ids or (_INT.issuperset(map(type, ids)) and min(ids) >= 0 and max(ids) < num):
        return
    for i, x in enumerate(ids):
        if type(x) is not int or not 0 <= x < num:
            raise ValueError(f"{what}[{i}] is {shown(x)}, not an int in 0..{num - 1}")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight (+ bias)``."""
    return x @ weight if bias is None else torch.addmm(bias, x, weight)
