"""Red team, fourteenth pass: the remote tier's calls at random among the manager's, over
real (tiny, CPU) KV storages and a store that goes down, loses values and serves corrupt
ones: admissions whose plans run (some copies failing), writes through (waiting or on the
I/O thread), write-back spills, blocking and background fetches (some cancelled, as for an
aborted request), resets and tenant drops.

Every block's KV is a value its hash names (``kv_of``): a request computes it into its new
blocks, and each check compares. After every rule: every block a request reused holds its
KV, every cached block of every tier holds its KV, every value in the shared store is its
hash's KV (nothing garbage ever reached it), and the manager's books balance."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch", reason="the remote tier moves real KV: needs torch")

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvtier import CacheConfig, KVCacheManager, SequenceSpec, Tier
from kvtier.remote import FaultyRemoteStore, InMemoryRemoteStore, RemoteNamespace
from kvtier.remote.tier import RemoteTier
from kvtier.storage import KVLayout, KVStorage
from kvtier.transfer.plan import TransferPlan
from kvtier.transfer.torch_engine import TorchTransferEngine

TPB = 2
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, tokens_per_block=TPB)
PROMPTS = st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=9)
SALTS = st.sampled_from([None, None, "t"])


def kv_of(block_hash: int) -> float:
    """The KV a block of hash ``block_hash`` holds (exact in float32)."""
    return float(block_hash % 65521 + 1)


def holds(storage: KVStorage, slot: int) -> float | None:
    """The one value filling ``slot``, or None where it holds several (or NaN)."""
    values = set(storage.block(slot).flatten().tolist())
    value = values.pop() if len(values) == 1 else None
    return None if value is None or value != value else value


class RemoteCalls(RuleBasedStateMachine):
    """One engine's manager and remote tier, every call at random."""

    @initialize(gpu=st.integers(3, 6), host=st.integers(2, 4),
                policy=st.sampled_from(["write-through", "write-back"]))
    def build(self, gpu: int, host: int, policy: str) -> None:
        self.mgr = KVCacheManager(CacheConfig(
            tokens_per_block=TPB, num_gpu_blocks=gpu, num_host_blocks=host,
            hash_algo="sha256", enable_partial_reuse=False), clock=lambda: 0.0)
        self.backend: dict[str, bytes] = {}
        self.store = FaultyRemoteStore(InMemoryRemoteStore(RemoteNamespace("m", LAYOUT),
                                                           self.backend))
        self.gpu, self.host = KVStorage(LAYOUT, gpu), KVStorage(LAYOUT, host)
        self.gpu.fill_(float("nan"))
        self.host.fill_(float("nan"))
        self.tier = RemoteTier(self.store, self.mgr, self.gpu, self.host,
                               write_policy=policy, fetch_deadline_s=60.0)  # type: ignore[arg-type]
        self.engine = TorchTransferEngine(self.gpu, self.host)
        self.live: dict[str, tuple[list[int], object]] = {}
        self.n = 0

    # ---- the data plane ----------------------------------------------------------------

    def run(self, plan: TransferPlan, failed: set[int]) -> None:
        """Run ``plan`` as an engine does (write-back spills read first); the ops in
        ``failed`` leave garbage (NaN) and are reported."""
        if self.tier.write_policy == "write-back":
            self.tier.write_spilled()
        for i in range(len(plan)):
            op = plan.op(i)
            if i in failed:
                dst = self.gpu if op.dst_tier is Tier.GPU else self.host
                for tensor in dst.tensors:
                    tensor[op.dst_slot].fill_(float("nan"))
            else:
                self.engine.submit(TransferPlan((op,)))
        if failed:
            for rid in self.mgr.transfer_failed(plan, sorted(failed)):
                del self.live[rid]

    def hashes(self, tokens: list[int], salt: object) -> list[int]:
        return self.tier.block_hashes(tokens, salt, None)

    # ---- rules ---------------------------------------------------------------------------

    @rule(data=st.data(), prompt=PROMPTS, salt=SALTS, fail=st.booleans())
    def admit(self, data: st.DataObject, prompt: list[int], salt: object, fail: bool) -> None:
        self.n += 1
        rid = f"r{self.n}"
        try:
            a = self.mgr.add_sequence(SequenceSpec(rid, prompt, salt=salt))  # type: ignore[arg-type]
        except ValueError as e:
            assert "num_gpu_blocks is" in str(e), e  # more blocks than the pool holds
            return
        plan = self.mgr.take_plan()
        failed = (set(data.draw(st.lists(st.integers(0, len(plan) - 1), min_size=1,
                                         max_size=2)))
                  if fail and len(plan) else set())
        if not a.admitted:
            self.run(plan, failed)
            return
        self.live[rid] = (prompt, salt)
        self.run(plan, failed)
        if rid not in self.live:
            return  # aborted: it read a block a failed copy was to fill
        table = self.mgr.block_table(rid)
        hashes = self.hashes(prompt, salt)
        reused = a.num_reused_tokens // TPB
        for i in range(reused):
            assert holds(self.gpu, table[i]) == kv_of(hashes[i]), (rid, i)
        for i in range(reused, len(hashes)):  # the forward pass computes the rest
            for tensor in self.gpu.tensors:
                tensor[table[i]].fill_(kv_of(hashes[i]))
        if self.tier.write_policy == "write-through" and data.draw(st.booleans()):
            # As the engine writes a prompt through once computed (waiting, or not).
            self.tier.write(prompt, table, salt, wait=data.draw(st.booleans()),
                            reused_blocks=reused)
            self.written.append((prompt, salt))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), wait=st.booleans(), reused=st.integers(0, 4))
    def write(self, data: st.DataObject, wait: bool, reused: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        prompt, salt = self.live[rid]
        self.tier.write(prompt, self.mgr.block_table(rid), salt, wait=wait,
                        reused_blocks=reused)
        self.written.append((prompt, salt))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), store=st.booleans())
    def release(self, data: st.DataObject, store: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[rid]
        self.mgr.remove_sequence(rid, store)
        self.run(self.mgr.take_plan(), set())

    @rule(data=st.data(), prompt=PROMPTS, salt=SALTS, background=st.booleans(),
          cancel=st.booleans())
    def fetch(self, data: st.DataObject, prompt: list[int], salt: object, background: bool,
              cancel: bool) -> None:
        written = data.draw(st.booleans()) if self.written else False
        if written:  # a prompt written before
            prompt, salt = data.draw(st.sampled_from(self.written))
            prompt = prompt + [data.draw(st.sampled_from([1, 2, 3]))]
            if data.draw(st.booleans()):
                self.reset()  # (the local tiers hold what this engine wrote, else)
        if self.tier.write_policy == "write-back":
            self.tier.write_spilled()  # an import may take the slots of blocks it evicts
        if not background:
            self.tier.fetch(prompt, salt)  # type: ignore[arg-type]
        elif self.tier.start_fetch("f", prompt, salt) and cancel:  # type: ignore[arg-type]
            self.tier.cancel_fetch("f")
        assert self.mgr.take_plan().ops == ()  # imports evict, never copy

    @rule()
    def poll(self) -> None:
        self.tier.flush(10.0)
        self.tier.poll()

    @rule(down=st.sampled_from([False, False, True]), miss_rate=st.sampled_from([0.0, 0.0, 0.5]))
    def store_faults(self, down: bool, miss_rate: float) -> None:
        self.store.down = down
        self.store.miss_rate = miss_rate

    @rule(data=st.data())
    def corrupt_a_value(self, data: st.DataObject) -> None:
        """Another writer's garbage under a key: the codec's checks make it a miss."""
        if self.backend:
            key = data.draw(st.sampled_from(sorted(self.backend)))
            value = bytearray(self.backend[key])
            value[-1] ^= 0xFF
            self.backend[key] = bytes(value)
            self.corrupted.add(key)

    @rule()
    def reset(self) -> None:
        """Every request released, then every tier emptied (a weight update's reset)."""
        for rid in sorted(self.live):
            self.mgr.remove_sequence(rid)
        self.live.clear()
        self.run(self.mgr.take_plan(), set())
        assert self.mgr.reset_cache()

    @rule()
    def drop_tenant(self) -> None:
        self.mgr.drop_salt("t")

    # ---- checks after every rule ---------------------------------------------------------

    def __init__(self) -> None:
        super().__init__()
        self.corrupted: set[str] = set()
        self.written: list[tuple[list[int], object]] = []

    @invariant()
    def every_block_holds_its_kv(self) -> None:
        if not hasattr(self, "mgr"):
            return
        self.mgr.check_invariants()
        for b in self.mgr.cached_blocks():
            storage = self.gpu if b.tier is Tier.GPU else self.host
            if b.tier is Tier.HOST or b.priority is not None:  # computed (not in flight)
                assert holds(storage, b.slot) == kv_of(b.block_hash), b

    @invariant()
    def the_store_holds_only_good_kv(self) -> None:
        if not hasattr(self, "mgr"):
            return
        self.tier.flush(10.0)
        namespace = self.store.namespace
        for key, value in list(self.backend.items()):
            if key in self.corrupted:
                continue
            block_hash = int(key.rsplit(":", 1)[1], 16)
            payload: Any = namespace.decode(block_hash, value)
            values = set(np.frombuffer(payload, np.float32).tolist())
            assert values == {kv_of(block_hash)}, (key, values)

    def teardown(self) -> None:
        if hasattr(self, "tier"):
            self.store.down = False
            self.tier.flush(10.0)
            self.tier.poll()
            self.store.close()


def test_remote_calls_at_random_keep_every_block_and_the_store_exact() -> None:
    run_state_machine_as_test(RemoteCalls, settings=settings(
        max_examples=80, stateful_step_count=25, deadline=None,
        suppress_health_check=list(HealthCheck)))
