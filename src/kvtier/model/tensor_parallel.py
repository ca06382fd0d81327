"""The reference decoder at tensor-parallel size N: one rank's shard of a :class:`LlamaModel`.

Megatron-style: each rank holds a contiguous share of the attention heads (query heads and
the KV heads they read, so its KV pool holds only those heads) and of the MLP's hidden
columns; the output projections are split by rows, so each rank's output is a partial sum
that one all-reduce completes::

                      rank r holds                       then
    attention   wq, wk, wv columns of its heads     attend over its own KV shard
                wo rows of its heads                 all-reduce(sum)  -> x += ...
    MLP         w_gate, w_up columns of its share    SwiGLU
                w_down rows of its share             all-reduce(sum)  -> x += ...
    replicated  embeddings, norms, lm_head, the      (x is the same on every rank)
                biases of wo and w_down

NOTE: a sequential Llama block needs the whole residual before attention's norm and again
before the MLP's, so a layer costs two all-reduces, one per row-split projection; fewer
would need a parallel (GPT-J style) block, a different model.

The shard is cut from a whole model's weights, so a TP run and the single-device model
compute with the same numbers and differ only in summation order.
"""

from __future__ import annotations

from typing import Any

import torch

from kvtier.counts import as_integer
from kvtier.model.llama import LlamaModel
from kvtier.reprs import shown
from kvtier.storage import KVLayout


class TensorParallelLlama(LlamaModel):
    """Rank ``tp_rank`` of ``tp_size``'s shard of ``full``, on ``device`` (``full``'s by
    default). With ``tp_size > 1`` every forward pass is a collective over ``group`` (a
    ``torch.distributed`` group, the default one when ``None``; NCCL on GPUs, gloo on
    CPU): every rank must run the same forward passes in the same order."""

    tp_rank: int
    tp_size: int

    def __init__(self, full: LlamaModel, tp_rank: int, tp_size: int,
                 device: str | torch.device | None = None, group: Any = None) -> None:
        # NOTE: LlamaModel.__init__ is not called: it would draw a whole model of random
        # weights. The shard takes its slices of ``full``'s instead (same weights, same
        # fields, so the inherited forward_chunk and full_recompute work on the shard).
        c = full.config
        if isinstance(full, TensorParallelLlama) and full.tp_size > 1:
            # NOTE: a shard's weights were cut again as if whole: rank r > 0 took the empty
            # columns past them, and its first forward pass raised on that rank alone while
            # the others waited in the pass's all-reduce.
            raise ValueError(f"full must be a whole model, got the shard of rank "
                             f"{full.tp_rank} of {full.tp_size}")
        # NOTE: the plain ints they are (``kvtier.counts``): NumPy ones were refused.
        size, rank = as_integer(tp_size), as_integer(tp_rank)
        if size is None or size < 1:
            raise ValueError(f"tp_size must be an integer >= 1, got {shown(tp_size)}")
        if rank is None or not 0 <= rank < size:
            raise ValueError(f"tp_rank must be an integer in 0..{size - 1}, got "
                             f"{shown(tp_rank)}")
        tp_size, tp_rank = size, rank
        for name in ("num_heads", "num_kv_heads", "ffn_dim"):
            if getattr(c, name) % tp_size:
                raise ValueError(f"{name} ({getattr(c, name)}) must split evenly over "
                                 f"tp_size ({tp_size}) ranks")
        if tp_size > 1:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise ValueError("tp_size > 1 needs torch.distributed initialised in every "
                                 "rank's process (init_process_group)")
            rank, size = dist.get_rank(group), dist.get_world_size(group)
            if (rank, size) != (tp_rank, tp_size):
                raise ValueError(f"this process is rank {rank} of {size} in its group, not "
                                 f"rank {tp_rank} of {tp_size}")
        self.config = c
        self.device = torch.device(device) if device is not None else full.device
        self.dtype = full.dtype
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.group = group
        self.num_local_heads = c.num_heads // tp_size
        self.num_local_kv_heads = c.num_kv_heads // tp_size
        hd = c.head_dim
        q = slice(tp_rank * self.num_local_heads * hd, (tp_rank + 1) * self.num_local_heads * hd)
        kv = slice(tp_rank * self.num_local_kv_heads * hd,
                   (tp_rank + 1) * self.num_local_kv_heads * hd)
        ffn = slice(tp_rank * c.ffn_dim // tp_size, (tp_rank + 1) * c.ffn_dim // tp_size)

        def here(t: torch.Tensor) -> torch.Tensor:
            return t.contiguous().to(self.device)

        # Query heads [r*H/N, (r+1)*H/N) read KV heads [r*KVH/N, (r+1)*KVH/N) (grouped-query
        # attention maps head h to KV head h // (H/KVH)), so a rank never needs another's KV.
        # Columns (and their biases) of the column-split projections, rows of the row-split
        # ones; the rest (norms, the row-split projections' biases) is whole on every rank.
        cut = {"wq": (1, q), "wk": (1, kv), "wv": (1, kv), "wo": (0, q), "w_gate": (1, ffn),
               "w_up": (1, ffn), "w_down": (0, ffn), "bq": (0, q), "bk": (0, kv),
               "bv": (0, kv), "b_gate": (0, ffn), "b_up": (0, ffn)}

        def share(name: str, t: torch.Tensor) -> torch.Tensor:
            if name not in cut:
                return here(t)
            axis, part = cut[name]
            return here(t[part] if axis == 0 else t[:, part])

        self.layers = [w._replace(**{name: share(name, t) for name, t in w._asdict().items()
                                     if t is not None})
                       for w in full.layers]
        self.embed = here(full.embed)
        self.final_norm = here(full.final_norm)
        self.lm_head = here(full.lm_head)
        self.inv_freq = here(full.inv_freq)

    def kv_layout(self, tokens_per_block: int, layout: str = "block_major") -> KVLayout:
        """The layout of this rank's KV shard. Pure."""
        return self.config.kv_layout(tokens_per_block, layout).shard(self.tp_rank, self.tp_size)

    def _all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(partial, group=self.group)
        return partial

    def _row_split(self, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
        # This rank's rows give a partial product: summed over ranks, then the bias once.
        return _add(self._all_reduce(x @ weight), bias)


def _add(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias
