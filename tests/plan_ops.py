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


def apply_op(op: TransferOp, gpu: dict[int, list[object]], host: dict[int, list[object]]
             ) -> None:
    """One copy on a fake data plane whose slots are lists of token markers: a partial copy
    (``COPY``) writes the head of its destination, the others the whole slot."""
    src = gpu if op.src_tier is G else host
    dst = gpu if op.dst_tier is G else host
    data = list(src[op.src_slot])
    if op.kind is OpKind.COPY:
        dst[op.dst_slot][:op.num_tokens] = data[:op.num_tokens]
    else:
        dst[op.dst_slot] = data
