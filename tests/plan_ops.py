"""Transfer ops for the data-plane tests: whole-block offloads and onboards, and random plans
over few slots (pure Python, no torch)."""

from __future__ import annotations

import random

from kvtier.tier import Tier
from kvtier.transfer.plan import OpKind, TransferOp

G, H = Tier.GPU, Tier.HOST
TPB = 4


def offload(g: int, h: int) -> TransferOp:
    """GPU slot g -> host slot h, a whole block."""
    return TransferOp(OpKind.OFFLOAD, G, g, H, h, TPB)


def onboard(h: int, g: int) -> TransferOp:
    """Host slot h -> GPU slot g, a whole block."""
    return TransferOp(OpKind.ONBOARD, H, h, G, g, TPB)


def random_ops(rng: random.Random, max_ops: int) -> list[TransferOp]:
    """1 to ``max_ops - 1`` offloads, onboards and partial copies over 12 GPU and 10 host
    slots, so hazards are common."""
    ops: list[TransferOp] = []
    for _ in range(rng.randrange(1, max_ops)):
        kind = rng.randrange(3)
        if kind == 0:
            ops.append(offload(rng.randrange(12), rng.randrange(10)))
        elif kind == 1:
            ops.append(onboard(rng.randrange(10), rng.randrange(12)))
        else:
            src, dst = rng.choice([(G, 12), (H, 10)]), rng.randrange(12)
            slot = rng.choice([x for x in range(src[1]) if (src[0], x) != (G, dst)])
            ops.append(TransferOp(OpKind.COPY, src[0], slot, G, dst, rng.randrange(1, TPB + 1)))
    return ops
