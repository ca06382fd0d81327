"""Red team 34c, the model's side: sampling params, the model's config, the engine's and
the tensor-parallel shard's counts take an integer of any kind (NumPy, a caller's
``__index__`` class) as the plain int it is, and refuse a bool or a float naming the field
(``kvtier.counts``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the model tests need torch")

from integer_kinds import Index  # noqa: E402
from kvtier import CacheConfig, KVCacheManager  # noqa: E402
from kvtier.model import LlamaModel, ModelConfig, ModelEngine  # noqa: E402
from kvtier.model.config import RopeScaling  # noqa: E402
from kvtier.model.sampling import Sampler, SamplingParams  # noqa: E402
from kvtier.scheduler import Request, Scheduler, SchedulerConfig  # noqa: E402
from kvtier.storage import KVStorage  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402


def kinds(value: int) -> list[Any]:
    """``value`` as the integer kinds callers pass, but the plain int."""
    return [np.int64(value), np.uint16(value), Index(value)]


TPB = 4
MODEL = LlamaModel(ModelConfig(), "cpu")


def make_engine(**options: Any) -> ModelEngine:
    """The tiny random model over a pool of 16 GPU blocks."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=16,
                                         num_host_blocks=0))
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=64))
    gpu = KVStorage(MODEL.config.kv_layout(TPB), 16, "cpu")
    return ModelEngine(MODEL, manager, scheduler, TorchTransferEngine(gpu, None), **options)


@pytest.mark.parametrize("kind", range(3))
def test_sampling_params_keep_plain_ints(kind: int) -> None:
    """SamplingParams(max_new_tokens=np.int64(8), seed=np.int64(7), stop_token_ids of NumPy
    ints) was refused: now plain ints, drawing exactly what seed 7 draws."""
    params = SamplingParams(max_new_tokens=kinds(8)[kind], temperature=1.0,
                            seed=kinds(7)[kind], stop_token_ids=frozenset([kinds(3)[kind]]))
    plain = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7,
                           stop_token_ids=frozenset([3]))
    assert params == plain
    assert [type(v) for v in (params.max_new_tokens, params.seed,
                              *params.stop_token_ids)] == [int, int, int]
    logits = torch.linspace(-1.0, 1.0, 50)
    a, b = Sampler(params), Sampler(plain)
    assert [a.sample(logits) for _ in range(20)] == [b.sample(logits) for _ in range(20)]
    assert a.stops_at(3)


@pytest.mark.parametrize(("field", "value"), [
    ("max_new_tokens", True), ("max_new_tokens", 8.0), ("seed", np.bool_(True)),
    ("seed", 7.0), ("stop_token_ids", frozenset([True])), ("stop_token_ids", frozenset([2.0])),
])
def test_sampling_params_refuse_bools_and_floats_naming_the_field(field: str,
                                                                 value: object) -> None:
    """A bool or a float (even 8.0) is no integer: ValueError naming the field."""
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


SIZES = ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim")


@pytest.mark.parametrize("kind", range(3))
def test_model_config_keeps_plain_ints(kind: int) -> None:
    """ModelConfig of NumPy sizes (a checkpoint's config read through NumPy), seed and
    context was refused: now plain ints, the config equal to the int one."""
    plain = ModelConfig(max_position_embeddings=512, rope_scaling=RopeScaling(8.0, 1.0, 4.0,
                                                                              8192))
    given = {name: kinds(getattr(plain, name))[kind] for name in SIZES}
    config = ModelConfig(**given, seed=kinds(3)[kind], max_position_embeddings=kinds(512)[kind],
                         rope_scaling=RopeScaling(8.0, 1.0, 4.0, kinds(8192)[kind]))
    assert config == ModelConfig(**{n: getattr(plain, n) for n in SIZES}, seed=3,
                                 max_position_embeddings=512,
                                 rope_scaling=plain.rope_scaling)
    assert all(type(getattr(config, n)) is int for n in (*SIZES, "seed",
                                                         "max_position_embeddings"))
    assert config.rope_scaling is not None
    assert type(config.rope_scaling.original_max_position_embeddings) is int


@pytest.mark.parametrize("field", [*SIZES, "seed", "max_position_embeddings"])
@pytest.mark.parametrize("value", [True, 64.0])
def test_model_config_refuses_bools_and_floats_naming_the_field(field: str,
                                                               value: object) -> None:
    """A bool or a float is no integer: ValueError naming the field."""
    with pytest.raises(ValueError, match=rf"^{field} must be an integer"):
        ModelConfig(**{field: value})  # type: ignore[arg-type]


def test_engine_counts_and_forward_positions_take_any_integer() -> None:
    """ModelEngine(max_forward_faults=np.int64(2)), run(max_steps=np.int64(...)) and
    forward_chunk's start_pos of a NumPy int were refused; now plain ints (a bool or a float
    still refused, naming it)."""
    engine = make_engine(max_forward_faults=np.int64(2))
    assert type(engine.max_forward_faults) is int and engine.max_forward_faults == 2
    engine.add_request(Request("r", list(range(1, 10)), max_output_tokens=3))
    results = engine.run(max_steps=np.int64(50))
    assert len(results["r"].output) == 3
    with pytest.raises(ValueError, match="max_forward_faults must be an int"):
        make_engine(max_forward_faults=True)
    with pytest.raises(ValueError, match="max_steps must be an int"):
        engine.run(max_steps=5.0)  # type: ignore[arg-type]
    kv = KVStorage(MODEL.config.kv_layout(TPB), 4, "cpu")
    first = MODEL.forward_chunk(kv, [0, 1], [1, 2, 3, 4], 0)
    again = MODEL.forward_chunk(kv, [0, 1], [5, 6], np.int64(4))
    plain = MODEL.forward_chunk(kv, [0, 1], [5, 6], 4)
    assert first.shape[0] == 4 and torch.equal(again, plain)
    with pytest.raises(ValueError, match="start_pos must be an int"):
        MODEL.forward_chunk(kv, [0, 1], [5, 6], 4.0)  # type: ignore[arg-type]


def test_tensor_parallel_shard_takes_any_integer_rank_and_size() -> None:
    """TensorParallelLlama(full, np.int64(0), np.int64(1)) was refused; now plain ints (a
    bool rank still refused, naming it)."""
    from kvtier.model.tensor_parallel import TensorParallelLlama

    shard = TensorParallelLlama(MODEL, np.int64(0), Index(1))  # type: ignore[arg-type]
    assert (type(shard.tp_rank), type(shard.tp_size)) == (int, int)
    assert shard.kv_layout(TPB) == MODEL.kv_layout(TPB)
    with pytest.raises(ValueError, match="tp_rank must be an integer"):
        TensorParallelLlama(MODEL, False, 1)
    with pytest.raises(ValueError, match="tp_size must be an integer"):
        TensorParallelLlama(MODEL, 0, 1.0)  # type: ignore[arg-type]
