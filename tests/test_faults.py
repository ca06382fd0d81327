"""Failed transfers degrade to recompute: nothing stale is ever served, nothing leaks.

A "physical memory" model holds what each slot contains (the prefix it encodes). Every
plan is applied to it in order, with some copies failing (their destination, and anything
later copied from it, becomes garbage). After ``transfer_failed`` every cached block must
hold exactly its prefix, and every reused block of every admitted request too.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import CacheConfig, KVCacheManager, OpKind, SequenceSpec, Tier, TransferPlan
from kvtier.radix import Node, path_to_root

GARBAGE = ("garbage",)


class Memory:
    """What every slot holds: a prefix key (salt, tokens through the block) or garbage."""

    def __init__(self) -> None:
        self.slots: dict[tuple[Tier, int], tuple[object, ...]] = {}

    def apply(self, plan: TransferPlan, failed: set[int], tpb: int) -> None:
        for i, op in enumerate(plan.ops):
            src = self.slots.get((op.src_tier, op.src_slot), GARBAGE)
            if i in failed or src == GARBAGE:
                self.slots[(op.dst_tier, op.dst_slot)] = GARBAGE
            elif op.kind is OpKind.COPY:
                salt, toks = src[0], src[1]
                assert isinstance(toks, tuple)
                start = (len(toks) - 1) // tpb * tpb
                self.slots[(op.dst_tier, op.dst_slot)] = (salt, toks[: start + op.num_tokens])
            else:
                self.slots[(op.dst_tier, op.dst_slot)] = src


def node_prefix(node: Node) -> tuple[int, ...]:
    """All tokens from the root through the end of ``node``."""
    return tuple(t for n in reversed(list(path_to_root(node))) for t in n.tokens)


def check_cache_contents(mgr: KVCacheManager, mem: Memory, tpb: int) -> None:
    """Every cached block holds the KV of exactly its prefix."""
    for (_, salt), root in mgr._store.roots.items():
        stack = list(root.iter_children())
        while stack:
            node = stack.pop()
            stack.extend(node.iter_children())
            prefix = node_prefix(node)
            for i, slot in enumerate(node.slots):
                end = (node.start_block + i + 1) * tpb
                assert mem.slots.get((node.tier, slot)) == (salt, prefix[:end]), (node, i)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 100_000))
def test_failed_transfers_never_serve_stale_blocks(seed: int) -> None:
    """Random batches with random copy failures: reused KV is always the right KV."""
    rng = random.Random(seed)
    tpb = rng.choice([1, 2, 4])
    mgr = KVCacheManager(CacheConfig(
        tokens_per_block=tpb, num_gpu_blocks=rng.randint(6, 20),
        num_host_blocks=rng.choice([2, 6, 16]), enable_partial_reuse=rng.random() < 0.6))
    mem = Memory()
    prefixes = [[rng.randint(0, 3) for _ in range(rng.randint(1, 10))] for _ in range(3)]
    live: dict[str, list[int]] = {}
    n = 0
    for _ in range(40):
        if rng.random() < 0.3:
            # KV fetched from a remote store: the caller fills the host slots it is given.
            tokens = rng.choice(prefixes) + [rng.randint(0, 3) for _ in range(rng.randint(1, 6))]
            salt = rng.choice([None, "s"])
            before = mgr.lookup(tokens, salt=salt).num_tokens // tpb
            slots = mgr.import_blocks(tokens, rng.randint(1, 3), salt=salt)
            for i, slot in enumerate(slots):
                end = (before + i + 1) * tpb
                mem.slots[(Tier.HOST, slot)] = (salt, tuple(tokens[:end]))
            plans_since_import = list(mgr.engine.plans)  # type: ignore[attr-defined]
            mgr.engine.plans.clear()  # type: ignore[attr-defined]
            for p in plans_since_import:  # evictions made room: nothing is copied
                assert not p.ops
            mgr.check_invariants()
            check_cache_contents(mgr, mem, tpb)
        specs = []
        for _ in range(rng.randint(1, 3)):
            n += 1
            tokens = rng.choice(prefixes) + [rng.randint(0, 3) for _ in range(rng.randint(1, 6))]
            specs.append(SequenceSpec(f"r{n}", tokens, salt=rng.choice([None, "s"])))
        mgr.begin_step()
        try:
            admissions = mgr.add_sequence_batch(specs)
        except ValueError:
            admissions = []
        for rid in list(live):
            if rng.random() < 0.3:
                mgr.remove_sequence(rid)
                del live[rid]
        mgr.end_step()
        plans = list(mgr.engine.plans)  # type: ignore[attr-defined]
        mgr.engine.plans.clear()  # type: ignore[attr-defined]
        plan = TransferPlan(tuple(op for p in plans for op in p.ops))
        failed = {i for i in range(len(plan.ops)) if rng.random() < 0.3}
        mem.apply(plan, failed, tpb)
        aborted = set(mgr.transfer_failed(plan, failed))
        mgr.check_invariants()
        # The forward pass: admitted, surviving requests read their reused blocks and write
        # the rest. Reused blocks must hold exactly the right prefix.
        for spec, adm in zip(specs, admissions):
            if not adm.admitted or spec.request_id in aborted:
                continue
            salt, toks = spec.salt, tuple(spec.tokens)
            for b, slot in enumerate(adm.block_ids):
                end = min((b + 1) * tpb, len(toks))
                if end <= adm.num_reused_tokens:
                    assert mem.slots.get((Tier.GPU, slot)) == (salt, toks[:end]), (spec, b)
                mem.slots[(Tier.GPU, slot)] = (salt, toks[:end])
            live[spec.request_id] = spec.tokens
        for rid in aborted:
            live.pop(rid, None)
        check_cache_contents(mgr, mem, tpb)
    assert mgr.stats.num_failed_transfers >= 0
