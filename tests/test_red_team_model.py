"""Red team, eleventh pass: GGUF files whose metadata lies about its types, and failures
from Rust libraries, which raise what ``except Exception`` does not stop."""

from __future__ import annotations

from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="GGUF files need the model extra")
np = pytest.importorskip("numpy")
pytest.importorskip("torch", reason="the model needs torch")
pytest.importorskip("tokenizers", reason="the tokenizer needs the model extra")

from bad_input_helpers import assert_one_line_refusal, run_cli  # noqa: E402
from kvtier.model.checkpoint import CheckpointError  # noqa: E402
from kvtier.model.gguf_loader import load_gguf_model, open_gguf  # noqa: E402
from kvtier.model.tokenizer import load_tokenizer  # noqa: E402

H, F, V = 8, 16, 6
METADATA: dict[str, tuple[str, object]] = {
    "llama.embedding_length": ("u32", H), "llama.attention.head_count": ("u32", 2),
    "llama.attention.head_count_kv": ("u32", 2), "llama.block_count": ("u32", 1),
    "llama.feed_forward_length": ("u32", F), "llama.context_length": ("u32", 64),
    "llama.attention.layer_norm_rms_epsilon": ("f32", 1e-5),
    "tokenizer.ggml.model": ("str", "gpt2"),
    "tokenizer.ggml.tokens": ("arr", ["a", "b", "ab", "d", "e", "f"]),
    "tokenizer.ggml.merges": ("arr", ["a b"]), "tokenizer.ggml.eos_token_id": ("u32", 5),
}
TENSORS = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "output.weight": (V, H),
           "blk.0.attn_norm.weight": (H,), "blk.0.ffn_norm.weight": (H,),
           "blk.0.attn_q.weight": (H, H), "blk.0.attn_k.weight": (H, H),
           "blk.0.attn_v.weight": (H, H), "blk.0.attn_output.weight": (H, H),
           "blk.0.ffn_gate.weight": (F, H), "blk.0.ffn_up.weight": (F, H),
           "blk.0.ffn_down.weight": (H, F)}


def make_gguf(path: Path, **changes: tuple[str, object] | None) -> Path:
    """A tiny llama GGUF file at ``path`` with ``changes`` to its metadata (keys with
    ``__`` for ``.``; None drops one)."""
    metadata = dict(METADATA)
    for key, value in changes.items():
        metadata.pop(key.replace("__", "."), None)
        if value is not None:
            metadata[key.replace("__", ".")] = value
    writer = gguf.GGUFWriter(str(path), "llama")
    adders = {"u32": writer.add_uint32, "f32": writer.add_float32, "str": writer.add_string,
              "arr": writer.add_array, "bool": writer.add_bool}
    for key, (kind, field) in metadata.items():
        adders[kind](key, field)
    rng = np.random.default_rng(0)
    for name, shape in TENSORS.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    open_gguf.cache_clear()  # a path reused by the next test is another file
    return path


def test_a_sound_tiny_file_loads(tmp_path: Path) -> None:
    """The factory's file is sound: the refusals below are the changes' doing."""
    path = make_gguf(tmp_path / "ok.gguf")
    assert load_gguf_model(path).config.num_heads == 2
    assert load_tokenizer(path).encode("ab") == [2]


@pytest.mark.parametrize(("changes", "shown"), [
    ({"llama__embedding_length": ("arr", [1, 2])},  # int(list): TypeError, status 70
     r"llama.embedding_length must be an integer, got \[1, 2\]"),
    ({"llama__embedding_length": ("str", "abc")},  # int('abc'): a ValueError naming no key
     r"llama.embedding_length must be an integer, got 'abc'"),
    ({"llama__attention__head_count": ("u32", 0)},  # dim // 0: ZeroDivisionError
     r"num_heads must be an integer >= 1, got 0"),
    ({"llama__attention__layer_norm_rms_epsilon": ("bool", True)},  # float(True) == 1.0
     r"llama.attention.layer_norm_rms_epsilon must be a number, got True"),
    ({"llama__rope__freq_base": ("str", "x")}, r"llama.rope.freq_base must be a number"),
    ({"general__architecture": ("arr", ["llama"])},  # unhashable: TypeError
     r"holds a \['llama'\] model"),
])
def test_gguf_model_metadata_of_the_wrong_type_names_the_key(
        tmp_path: Path, changes: dict[str, tuple[str, object]], shown: str) -> None:
    """Metadata numbers of the wrong type: TypeError or ZeroDivisionError (status 70), or a
    ValueError naming no key. Now CheckpointError naming the file and the key."""
    path = make_gguf(tmp_path / "m.gguf", **changes)
    with pytest.raises(CheckpointError, match=shown) as refused:
        load_gguf_model(path)
    assert str(refused.value).startswith(str(path))


@pytest.mark.parametrize(("changes", "shown"), [
    ({"tokenizer__ggml__tokens": None},  # len(None): TypeError
     r"tokenizer.ggml.tokens must be a non-empty array of strings, got None"),
    ({"tokenizer__ggml__tokens": ("arr", [1, 2, 3, 4, 5, 6])},  # TypeError from Rust
     r"tokenizer.ggml.tokens must be a non-empty array of strings"),
    ({"tokenizer__ggml__merges": ("arr", ["ab"])},  # a 1-tuple: TypeError from Rust
     r"tokenizer.ggml.merges must be an array of 'left right' strings, got \['ab'\]"),
    ({"tokenizer__ggml__eos_token_id": ("str", "x")},  # int('x'), naming no key
     r"tokenizer.ggml.eos_token_id must be a token id, got 'x'"),
    # A merge whose result is no token: a Rust panic, a BaseException past every handler
    # (its message printed by Rust's panic hook).
    ({"tokenizer__ggml__tokens": ("arr", ["a", "b", "c", "d", "e", "f"])},
     r"tokenizer.ggml.merges\[0\]: 'a b' merges into 'ab', which is no token"),
    ({"tokenizer__ggml__merges": ("arr", ["a b", "x b"])},
     r"tokenizer.ggml.merges\[1\]: 'x b' merges 'x', which is no token"),
])
def test_gguf_tokenizer_metadata_the_library_cannot_take_names_the_key(
        tmp_path: Path, changes: dict[str, tuple[str, object] | None], shown: str) -> None:
    """Tokenizer metadata the tokenizers library cannot take: TypeError (status 70) or a
    Rust panic (a traceback). Now CheckpointError naming the file and the key."""
    path = make_gguf(tmp_path / "t.gguf", **changes)
    with pytest.raises(CheckpointError, match=shown):
        load_tokenizer(path)


def test_generate_on_a_gguf_file_whose_tokenizer_panicked_is_one_line(tmp_path: Path) -> None:
    """``kvtier generate --model`` such a file printed the Rust panic's traceback."""
    path = make_gguf(tmp_path / "p.gguf",
                     tokenizer__ggml__tokens=("arr", ["a", "b", "c", "d", "e", "f"]))
    code, err = run_cli(["generate", "ab", "--model", str(path), "--raw", "--device", "cpu"])
    assert_one_line_refusal(code, err, "p.gguf: tokenizer.ggml.merges[0]: 'a b' merges into "
                                       "'ab', which is no token")


def test_a_tokenizer_the_library_panics_on_is_a_checkpoint_error(tmp_path: Path) -> None:
    """What the checks above do not foresee and the library panics on (a pyo3
    PanicException, a BaseException) is a CheckpointError naming the file."""
    from kvtier.model.tokenizer import _built

    def build() -> object:
        raise _Panic("range end index 2 out of range for slice of length 1")

    with pytest.raises(CheckpointError, match=r"x.gguf holds a tokenizer the tokenizers "
                                              r"library refuses \(_Panic: range end"):
        _built(tmp_path / "x.gguf", build)


class _Panic(BaseException):
    """Stands in for pyo3's PanicException (a BaseException, not an Exception)."""


def test_a_base_exception_from_a_library_is_one_line_status_70(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A panic anywhere below the command went past main's ``except Exception`` as a
    traceback. Now it is a defect like any other: one line, status 70."""
    import kvtier.cli as cli

    def panic(args: object) -> int:
        raise _Panic("called `Option::unwrap()` on a `None` value")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_run(parser(), panic))
    monkeypatch.delenv("KVTIER_DEBUG", raising=False)
    assert cli.main(["replay"]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "kvtier: internal error: _Panic: called `Option::unwrap()`" in err


def _with_run(parser: object, run: object) -> object:
    """``parser`` with every command's ``run`` set to ``run``."""
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for sub in action.choices.values():  # type: ignore[union-attr]
            sub.set_defaults(run=run)
    return parser


@pytest.mark.parametrize(("dtype", "fault", "shown"), [
    ("int8", None, r"tensor 'model.norm.weight' of ckpt holds torch.int8, not floating-point"),
    ("bool", None, r"holds torch.bool, not floating-point numbers"),
    ("complex64", None, r"holds torch.complex64, not floating-point numbers"),
    ("float32", OSError("file changed"),
     r"tensor 'model.norm.weight' of ckpt cannot be read \(OSError: file changed\)"),
])
def test_a_checkpoint_tensor_that_is_no_float_or_cannot_be_read_is_named(
        dtype: str, fault: Exception | None, shown: str) -> None:
    """A checkpoint's int8, bool or complex tensor was cast to float without a word (int8
    weights are quantized: their scales live elsewhere; complex lost its imaginary part);
    a read that failed was the reader's own error (status 70). Now CheckpointError naming
    the tensor."""
    import torch

    from kvtier.model.checkpoint import TensorEntry, build_model, expected_shapes
    from kvtier.model.config import ModelConfig

    config = ModelConfig(vocab_size=V, dim=H, num_layers=1, num_heads=2, num_kv_heads=2,
                         head_dim=H // 2, ffn_dim=F, max_position_embeddings=64)

    def entry(name: str, shape: tuple[int, ...]) -> TensorEntry:
        def load() -> torch.Tensor:
            if name != "model.norm.weight":
                return torch.ones(shape)
            if fault is not None:
                raise fault
            return torch.ones(shape, dtype=getattr(torch, dtype))

        return TensorEntry(shape, load)

    tensors = {name: entry(name, shape) for name, shape in expected_shapes(config).items()}
    with pytest.raises(CheckpointError, match=shown):
        build_model(config, tensors, "ckpt")


@pytest.mark.parametrize(("value", "dtype", "shown"), [
    (float("nan"), "float32", r"tensor 'model.norm.weight' of ckpt holds NaN or infinite"),
    (float("-inf"), "float32", r"holds NaN or infinite values"),
    (1e6, "float16", r"holds values past the range of float16"),
])
def test_a_checkpoint_tensor_with_values_that_are_no_numbers_is_named(
        value: float, dtype: str, shown: str) -> None:
    """A NaN weight made every logit NaN without a word (the sampler fell back to a fixed
    token), and a float32 weight past float16's range became inf in the cast: now
    CheckpointError naming the tensor."""
    import torch

    from kvtier.model.checkpoint import TensorEntry, build_model, expected_shapes
    from kvtier.model.config import ModelConfig

    config = ModelConfig(vocab_size=V, dim=H, num_layers=1, num_heads=2, num_kv_heads=2,
                         head_dim=H // 2, ffn_dim=F, max_position_embeddings=64, dtype=dtype)

    def entry(name: str, shape: tuple[int, ...]) -> TensorEntry:
        fill = value if name == "model.norm.weight" else 1.0
        return TensorEntry(shape, lambda: torch.full(shape, fill))

    tensors = {name: entry(name, shape) for name, shape in expected_shapes(config).items()}
    with pytest.raises(CheckpointError, match=shown):
        build_model(config, tensors, "ckpt")
    tensors["model.norm.weight"] = entry("other", (H,))
    assert build_model(config, tensors, "ckpt") is not None  # the same, finite: loads


HF_CONFIG = {"model_type": "llama", "hidden_size": H, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": F,
             "vocab_size": V, "rms_norm_eps": 1e-5, "max_position_embeddings": 64}


@pytest.mark.parametrize(("changes", "shown"), [
    ({"hidden_size": [8]}, r"hidden_size must be an integer, got \[8\]"),  # TypeError: 70
    ({"num_attention_heads": 0}, r"num_heads must be an integer >= 1, got 0"),  # dim // 0
    ({"hidden_size": True}, r"hidden_size must be an integer, got True"),
    ({"vocab_size": 6.0}, r"vocab_size must be an integer, got 6.0"),  # int(6.0) taken
    ({"head_dim": "x"}, r"head_dim must be an integer, got 'x'"),  # named no key
    ({"tie_word_embeddings": "no"}, r"tie_word_embeddings must be true or false, got 'no'"),
    ({"attention_bias": 1}, r"attention_bias must be true or false, got 1"),
    ({"rope_scaling": [1]}, r"rope_scaling must be an object or null, got \[1\]"),  # ignored
    ({"rope_theta": "x"}, r"rope_theta must be a number, got 'x'"),
    ({"rms_norm_eps": "x"}, r"rms_norm_eps must be a number, got 'x'"),
])
def test_hf_config_values_of_the_wrong_type_name_the_key(changes: dict[str, object],
                                                        shown: str) -> None:
    """config.json values of the wrong type: a TypeError or ZeroDivisionError (status 70),
    a ValueError naming no key, or taken as something else (bool('no') is True, a list of
    rope_scaling ignored). Now CheckpointError naming the file and the key."""
    from kvtier.model.safetensors_loader import config_from_hf

    assert config_from_hf(dict(HF_CONFIG), "c.json").dim == H
    with pytest.raises(CheckpointError, match=rf"^c.json: {shown}"):
        config_from_hf({**HF_CONFIG, **changes}, "c.json")
