"""Loading tiny Hugging Face checkpoints: configs (biases, tied embeddings, llama3 RoPE,
Qwen2), sharded safetensors, and the errors a checkpoint that does not fit gets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the model tests need torch: "
                                            "pip install 'kvtier[model]'")
pytest.importorskip("safetensors", reason="the checkpoint tests need safetensors: "
                                          "pip install 'kvtier[model]'")

from kvtier.model.checkpoint import CheckpointError, expected_shapes, load_model  # noqa: E402
from kvtier.model.config import ModelConfig, RopeScaling  # noqa: E402
from kvtier.model.llama import rope_inv_freq  # noqa: E402
from kvtier.model.safetensors_loader import config_from_hf  # noqa: E402


def write_hf_dir(path: Path, config: dict[str, Any], tensors: dict[str, Any],
                 num_shards: int = 1) -> Path:
    """A Hugging Face checkpoint directory: config.json and ``num_shards`` safetensors
    files (with an index when sharded)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if num_shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(num_shards):
        file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[s::num_shards]
        save_file({n: tensors[n].contiguous() for n in part}, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def make_hf_config(**kw: Any) -> dict[str, Any]:
    """A tiny Llama config.json."""
    cfg: dict[str, Any] = {
        "model_type": "llama", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "tie_word_embeddings": False, "hidden_act": "silu"}
    cfg.update(kw)
    return cfg


def make_tensors(config: ModelConfig, seed: int = 0) -> dict[str, Any]:
    """Random tensors of every name and shape ``config`` needs."""
    gen = torch.Generator().manual_seed(seed)
    return {name: 0.2 * torch.randn(shape, generator=gen)
            for name, shape in expected_shapes(config).items()}


def make_dir(tmp_path: Path, num_shards: int = 1, **kw: Any) -> Path:
    """A tiny random checkpoint directory of ``make_hf_config(**kw)``."""
    cfg = make_hf_config(**kw)
    config = config_from_hf(cfg, "test")
    return write_hf_dir(tmp_path / "ckpt", cfg, make_tensors(config), num_shards)


def transformers_logits(path: Path, tokens: list[int]) -> Any:
    """Hugging Face transformers' logits for ``tokens`` from the same directory."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("kw", [
    {},
    {"tie_word_embeddings": True},
    {"attention_bias": True, "mlp_bias": True},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
     "rope_theta": 500000.0},
    {"model_type": "qwen2", "num_key_value_heads": 4},
], ids=["plain", "tied", "biases", "llama3_rope", "qwen2"])
def test_tiny_checkpoint_matches_transformers(tmp_path: Path, kw: dict[str, Any]) -> None:
    """A tiny checkpoint of each supported kind gives transformers' logits (two shards)."""
    path = make_dir(tmp_path, num_shards=2, **kw)
    model = load_model(path)
    tokens = [5, 17, 3, 90, 44, 12, 7, 61, 2, 33] * 3
    ours = model.full_recompute(tokens)
    ref = transformers_logits(path, tokens)
    assert torch.allclose(ours, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


def test_tied_head_is_a_view_of_the_embeddings(tmp_path: Path) -> None:
    """Tied embeddings are not copied: lm_head shares the embedding's memory."""
    model = load_model(make_dir(tmp_path, tie_word_embeddings=True))
    assert model.lm_head.data_ptr() == model.embed.data_ptr()


def test_llama3_rope_frequencies() -> None:
    """llama3 scaling keeps short wavelengths, divides long ones by the factor."""
    base = ModelConfig(head_dim=64, rope_theta=500000.0)
    scaled = ModelConfig(head_dim=64, rope_theta=500000.0,
                         rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
    a, b = rope_inv_freq(base), rope_inv_freq(scaled)
    assert torch.equal(a[:4], b[:4])  # wavelength < 8192 / 4: unchanged
    assert torch.allclose(b[-4:], a[-4:] / 8.0)  # wavelength > 8192: stretched


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    """A tensor of the wrong shape is refused, naming it and both shapes."""
    cfg = make_hf_config()
    tensors = make_tensors(config_from_hf(cfg, "test"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    path = write_hf_dir(tmp_path / "bad", cfg, tensors)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight'"
                       r".* shape \[8, 32\], the config needs \[16, 32\]"):
        load_model(path)


def test_missing_and_unknown_tensors_are_named(tmp_path: Path) -> None:
    """A missing tensor and an unexpected one are each refused by name."""
    cfg = make_hf_config()
    tensors = make_tensors(config_from_hf(cfg, "test"))
    del tensors["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"no tensor 'model\.norm\.weight'"):
        load_model(write_hf_dir(tmp_path / "a", cfg, tensors))
    tensors = make_tensors(config_from_hf(cfg, "test"))
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(48, 32)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.mlp\.up_proj\.weight' that"):
        load_model(write_hf_dir(tmp_path / "b", cfg, tensors))


def test_bad_paths_and_configs(tmp_path: Path) -> None:
    """Missing paths, non-checkpoints and unsupported configs get one clear sentence."""
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="neither a GGUF file nor a checkpoint directory"):
        load_model(junk)
    with pytest.raises(CheckpointError, match=r"without a config\.json"):
        load_model(tmp_path)
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(make_hf_config(model_type="gpt2")))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        load_model(d)
    with pytest.raises(CheckpointError, match="rope_scaling type 'yarn'"):
        config_from_hf(make_hf_config(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "x")


def test_context_limit(tmp_path: Path) -> None:
    """Positions past max_position_embeddings are refused with the numbers."""
    model = load_model(make_dir(tmp_path))
    with pytest.raises(ValueError, match="65 tokens exceed the model's maximum context of 64"):
        model.full_recompute([1] * 65)
