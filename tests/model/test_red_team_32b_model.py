"""Red team 32b: seeds, one stream each; GGUF errors in the file's own tensor names."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the model needs torch")

from kvtier.model.sampling import MAX_SEED, Sampler, SamplingParams  # noqa: E402

# The edges of the range and small seeds. The former range (-2**63..2**64-1) was cut to
# the 32 bits torch keeps: -1, 2**64-1 and 2**32-1 drew one stream, -2**63, 2**32 and 0
# another.
SEEDS = [0, 1, 2, 3, 2**16, 2**31 - 1, 2**31, MAX_SEED - 1, MAX_SEED]


def draws(seed: int, n: int = 24) -> list[int]:
    """``n`` tokens a sampler of ``seed`` draws from a flat distribution over 1,000."""
    sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
    return [sampler.sample(torch.zeros(1000)) for _ in range(n)]


def test_distinct_seeds_in_the_range_draw_distinct_streams() -> None:
    """Every seed of the range seeds its own generator state: no two of the edges draw
    the same 24 tokens (a chance of about 1000**-24 each)."""
    streams = {seed: tuple(draws(seed)) for seed in SEEDS}
    assert len(set(streams.values())) == len(SEEDS)
    assert streams[0] == tuple(draws(0))  # and a seed repeats its run


@pytest.mark.parametrize("seed", [-1, -(2**63), MAX_SEED + 1, 2**64 - 1, True, 1.0])
def test_a_seed_outside_the_range_is_refused_naming_the_field(seed: object) -> None:
    """The seeds that wrapped onto another's stream (negative ones) or that torch cannot
    keeps no bits of (past 2**32) are refused, naming ``seed`` and the range."""
    with pytest.raises(ValueError, match=r"^seed must be an integer in 0\.\.2\*\*32-1 or None"):
        SamplingParams(seed=seed)  # type: ignore[arg-type]


def test_kvtier_generate_refuses_a_negative_seed(capsys: pytest.CaptureFixture[str]) -> None:
    """``--seed -1`` and ``--seed 2**32`` are usage errors naming the option, before any
    model is looked for."""
    from kvtier.cli import main

    for seed in ("-1", str(MAX_SEED + 1)):
        assert main(["generate", "--model", "/nonexistent-32b.gguf", "--seed", seed,
                     "hi"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvtier: error: argument --seed: ") and seed in err, err
        assert "model" not in err, err


def write_gguf(path: Path, tensors: dict[str, object], layers: int = 1) -> Path:
    """test_red_team_model's tiny llama GGUF with ``layers`` layers and ``tensors`` (numpy
    arrays) for its tensors."""
    gguf = pytest.importorskip("gguf", reason="GGUF files need the model extra")
    from kvtier.model.gguf_loader import open_gguf
    from test_red_team_model import METADATA

    writer = gguf.GGUFWriter(str(path), "llama")
    adders = {"u32": writer.add_uint32, "f32": writer.add_float32, "str": writer.add_string,
              "arr": writer.add_array, "bool": writer.add_bool}
    for key, (kind, value) in {**METADATA, "llama.block_count": ("u32", layers)}.items():
        adders[kind](key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    open_gguf.cache_clear()
    return path


def two_layers() -> dict[str, object]:
    """The tensors of a sound two-layer file, by their GGUF names."""
    np = pytest.importorskip("numpy")
    from test_red_team_model import TENSORS

    rng = np.random.default_rng(0)
    shapes = dict(TENSORS)
    shapes.update({n.replace("blk.0.", "blk.1."): s for n, s in TENSORS.items()
                   if n.startswith("blk.0.")})
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def test_gguf_errors_name_the_files_own_tensor_names(tmp_path: Path) -> None:
    """A tensor missing, of another shape, unused or holding NaN was named by its Hugging
    Face name ('model.layers.1.input_layernorm.weight'), which the file holds nowhere; now
    by the file's ('blk.1.attn_norm.weight'), Hugging Face's after it."""
    import numpy as np

    from kvtier.model.checkpoint import CheckpointError, load_model

    sound = two_layers()
    assert load_model(write_gguf(tmp_path / "sound.gguf", sound, layers=2)).config.num_layers == 2
    missing = {n: a for n, a in sound.items() if n != "blk.1.attn_norm.weight"}
    wrong = {**sound, "blk.0.ffn_norm.weight": np.ones(9, np.float32)}
    unused = {**sound, "blk.1.attn_q.bias": np.ones(8, np.float32)}
    nan = {**sound, "blk.1.ffn_down.weight": np.full((8, 16), np.nan, np.float32)}
    cases = [
        (missing, "has no tensor 'blk.1.attn_norm.weight' (Hugging Face: "
                  "model.layers.1.input_layernorm.weight) (shape [8])"),
        (wrong, "tensor 'blk.0.ffn_norm.weight' (Hugging Face: "
                "model.layers.0.post_attention_layernorm.weight) of {path} has shape [9]"),
        (unused, "has a tensor 'blk.1.attn_q.bias' (Hugging Face: "
                 "model.layers.1.self_attn.q_proj.bias) that the config"),
        (nan, "tensor 'blk.1.ffn_down.weight' (Hugging Face: model.layers.1.mlp.down_proj."
              "weight) of {path} holds NaN or infinite values"),
    ]
    for i, (tensors, message) in enumerate(cases):
        path = write_gguf(tmp_path / f"case{i}.gguf", tensors, layers=2)
        with pytest.raises(CheckpointError) as refused:
            load_model(path)
        assert message.format(path=path) in str(refused.value), refused.value


def test_gguf_name_undoes_hf_name() -> None:
    """Every name the GGUF reader maps has its file name back; other names are kept."""
    from kvtier.model.gguf_loader import gguf_name, hf_name

    for name in two_layers():
        for own in (name, name.replace(".weight", ".bias")):
            assert gguf_name(hf_name(own)) == own
    assert gguf_name("rope_freqs.weight") == "rope_freqs.weight"
    assert gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") == (
        "model.layers.0.self_attn.rotary_emb.inv_freq")
