"""Red team 24c, the model path's half: GGUF metadata and tensors that the loader took as
they came (a RoPE over part of each head, ``rope_freqs`` of another length, type or
value), and a model engine built over storages of another model or given requests past
its context. Each test fails on the code before its fix and asserts the exact refusal."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="GGUF files need the model extra")
np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch", reason="the model needs torch")

from kvtier import CacheConfig, KVCacheManager  # noqa: E402
from kvtier.model import LlamaModel, ModelConfig, ModelEngine  # noqa: E402
from kvtier.model.checkpoint import CheckpointError, load_model  # noqa: E402
from kvtier.model.gguf_loader import open_gguf  # noqa: E402
from kvtier.model.sampling import Sampler, SamplingParams  # noqa: E402
from kvtier.scheduler import Request, Scheduler, SchedulerConfig  # noqa: E402
from kvtier.storage import KVLayout, KVStorage  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402
from test_red_team_model import METADATA, TENSORS  # noqa: E402

HEAD_DIM = 4  # METADATA: an embedding of 8 over 2 heads


def make_gguf(path: Path, metadata: dict[str, tuple[str, object]] | None = None,
              extra: dict[str, object] | None = None) -> Path:
    """test_red_team_model's tiny llama GGUF, with ``metadata`` added (or replaced) and the
    ``extra`` tensors (numpy arrays) after its own."""
    writer = gguf.GGUFWriter(str(path), "llama")
    adders = {"u32": writer.add_uint32, "f32": writer.add_float32, "str": writer.add_string,
              "arr": writer.add_array, "bool": writer.add_bool}
    for key, (kind, value) in {**METADATA, **(metadata or {})}.items():
        adders[kind](key, value)
    rng = np.random.default_rng(0)
    for name, shape in TENSORS.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    open_gguf.cache_clear()  # a path reused by the next test is another file
    return path


def test_rope_over_part_of_each_head_is_refused_naming_the_key(tmp_path: Path) -> None:
    """llama.rope.dimension_count of half the head (GPT-NeoX's partial rotary) was ignored:
    the model rotated every dimension, every logit past position 0 wrong, without a word.
    Now refused naming the key and both sizes; the head's own size still loads."""
    path = make_gguf(tmp_path / "partial.gguf", {"llama.rope.dimension_count": ("u32", 2)})
    with pytest.raises(CheckpointError) as refused:
        load_model(path)
    assert str(refused.value) == (f"{path}: llama.rope.dimension_count is 2, the heads' size "
                                  "4: RoPE over part of each head is not supported")
    whole = make_gguf(tmp_path / "whole.gguf", {"llama.rope.dimension_count": ("u32", 4)})
    assert load_model(whole).config.head_dim == HEAD_DIM


@pytest.mark.parametrize(("array", "why"), [
    # Broadcast over both pairs: the second pair's frequency divided too, silently.
    (np.array([2.0], np.float32), "has shape [1], the config needs [2]"),
    (np.ones(3, np.float32), "has shape [3], the config needs [2]"),  # RuntimeError, 70
    (np.ones((2, 2), np.float32), "has shape [2, 2], the config needs [2]"),
    (np.ones(2, np.int32), "cannot be read (NotImplementedError: "),  # the gguf package's
    (np.array([1.0, 0.0], np.float32), "holds 0.0, not a RoPE frequency divisor"),  # inf
    (np.array([np.nan, 1.0], np.float32), "holds nan, not a RoPE frequency divisor"),
    (np.array([1.0, -2.0], np.float32), "holds -2.0, not a RoPE frequency divisor"),
])
def test_rope_freqs_that_are_no_divisor_per_pair_are_refused_naming_the_tensor(
        tmp_path: Path, array: object, why: str) -> None:
    """llama.cpp's rope_freqs.weight (Llama 3's scaled RoPE: one divisor per pair of a
    head's dimensions) was read unchecked: one value was broadcast over every pair, another
    length was torch's RuntimeError out of the model's constructor (status 70), an integer
    tensor the gguf package's NotImplementedError, and a 0, a NaN or a negative divisor made
    the angles infinite, NaN or turned the wrong way, silently. Now CheckpointError naming
    the file, the tensor and what is wrong with it."""
    path = make_gguf(tmp_path / "f.gguf", extra={"rope_freqs.weight": array})
    with pytest.raises(CheckpointError) as refused:
        load_model(path)
    assert str(refused.value).startswith(f"tensor 'rope_freqs.weight' of {path} {why}")


def test_sound_rope_freqs_still_divide_the_frequencies(tmp_path: Path) -> None:
    """A divisor per pair, all > 0, still divides each pair's frequency, as before."""
    plain = load_model(make_gguf(tmp_path / "plain.gguf"))
    scaled = load_model(make_gguf(tmp_path / "scaled.gguf", extra={
        "rope_freqs.weight": np.array([1.0, 8.0], np.float32)}))
    assert torch.equal(scaled.inv_freq, plain.inv_freq / torch.tensor([1.0, 8.0]))


def engine_over(model: LlamaModel, layout: KVLayout | None = None) -> ModelEngine:
    """A ModelEngine of ``model`` over a GPU storage of ``layout`` (the model's own by
    default): 32 blocks of 4 tokens, no host tier."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=32,
                                         num_host_blocks=0))
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=64))
    gpu = KVStorage(layout or model.kv_layout(4), 32)
    return ModelEngine(model, manager, scheduler, TorchTransferEngine(gpu, None),
                       record_logits=True)


@pytest.mark.parametrize(("config", "layout", "shown"), [
    # Every forward pass raised (SDPA's dtype check): each request an error after three.
    (ModelConfig(), KVLayout(2, 2, 16, 4, "bfloat16"),
     "GPU storage holds 2 layers of 2 KV heads of head_dim 16 in bfloat16, the model "
     "computes 2 layers of 2 KV heads of head_dim 16 in float32"),
    (ModelConfig(), KVLayout(2, 1, 16, 4),  # K/V of 2 heads into 1: every pass raised
     "GPU storage holds 2 layers of 1 KV heads of head_dim 16 in float32, the model "
     "computes 2 layers of 2 KV heads of head_dim 16 in float32"),
    (ModelConfig(num_kv_heads=1), KVLayout(2, 2, 16, 4),  # 1 head broadcast into 2, twice
     "GPU storage holds 2 layers of 2 KV heads of head_dim 16 in float32, the model "
     "computes 2 layers of 1 KV heads of head_dim 16 in float32"),
    (ModelConfig(), KVLayout(2, 2, 16, 4).shard(0, 2),  # a TP rank's shard, one device
     "GPU storage holds 2 layers of KV heads 0..0 of 2 KV heads (rank 0 of 2) of head_dim 16 "
     "in float32, the model computes 2 layers of 2 KV heads of head_dim 16 in float32"),
])
def test_an_engine_refuses_a_storage_of_other_kv_heads_or_dtype(
        config: ModelConfig, layout: KVLayout, shown: str) -> None:
    """ModelEngine compared only the storage's layers and head_dim with the model's: a
    bfloat16 storage under a float32 model, or one of another number of KV heads, was
    taken, and every forward pass raised (each request ended with an error after three
    tries) or wrote its K/V broadcast. Now refused when the engine is built, naming both."""
    with pytest.raises(ValueError) as refused:
        engine_over(LlamaModel(config), layout)
    assert str(refused.value) == shown


def test_a_request_past_the_models_context_is_refused_when_queued(
        caplog: pytest.LogCaptureFixture) -> None:
    """A request whose prompt and max_output_tokens pass max_position_embeddings was
    queued: the pass that went past raised, the request recomputed twice more and ended
    with stop_reason "error" (a prompt past the context: after three passes that all
    raised). Now ModelEngine.add_request refuses it, queueing nothing; one that ends
    exactly at the context runs to its length, exact."""
    model = LlamaModel(ModelConfig(max_position_embeddings=16))
    engine = engine_over(model)
    for prompt, max_output, positions in ((list(range(1, 11)), 8, 17), (list(range(30)), 1, 30)):
        with pytest.raises(ValueError) as refused:
            engine.add_request(Request("a", prompt, max_output))
        assert str(refused.value) == (
            f"request 'a': a prompt of {len(prompt)} tokens and max_output_tokens "
            f"{max_output} need {positions} positions, past the model's maximum context of 16")
        assert not engine.scheduler.has_unfinished() and "a" not in engine.results
    prompt = list(range(1, 11))
    engine.add_request(Request("b", prompt, 7))  # positions 0..15
    with caplog.at_level(logging.ERROR):
        result = engine.run()["b"]
    assert (result.stop_reason, len(result.output), engine.num_failed_forwards) == ("length", 7, 0)
    assert not caplog.records
    reference = model.full_recompute(prompt + result.output[:-1])
    assert result.output == reference[len(prompt) - 1:].argmax(-1).tolist()


def test_a_system_priority_keeps_the_system_message_not_the_users_first_block(
        smollm2_path: Path) -> None:
    """``chat(system_priority=90)`` gave the range the longest prefix the system message
    encoded alone shares with the prompt, but encoded alone with the generation prompt
    ("<|im_start|>assistant"), whose "<|im_start|>" the user's turn starts with too: the
    range took one token of the user's turn, and where the system message fills whole
    blocks (32 tokens here) the user's first block was kept at 90 with it, a block no other
    conversation shares held on the GPU. Now the range ends where the system message does."""
    from kvtier.model.generate import Generator, TierSizes
    from kvtier.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    gen = Generator(load_model(smollm2_path), tokenizer,
                    TierSizes(16, 16, 0, eviction_policy="priority-lru"))
    system = {"role": "system", "content": "You are a terse assistant for a small family "
              "bakery in Lyon. Answer in at most ten words, and never discuss the prices."}
    user = {"role": "user", "content": "Which of your breads keeps best for a long week of "
            "hiking in the mountains?"}
    ids = tokenizer.encode_chat([system, user])
    assert len(tokenizer.encode_chat([system], add_generation_prompt=False)) == 32
    assert len(ids) >= 48  # the user's turn fills a third block
    retention = gen._system_retention([system, user], ids, 90)
    assert retention is not None and [(r.start, r.end, r.priority)
                                      for r in retention.ranges] == [(0, 32, 90)]
    gen.chat([[system, user]], gen.default_params(max_new_tokens=1), 90)
    held = [b.priority for b in gen.engine.manager.cached_blocks()]
    assert held[:3] == [90, 90, 35]


def tensor_offset_at(data: bytes | bytearray, name: str) -> int:
    """Where the data offset of tensor ``name``'s info lies in a GGUF v3 file's bytes (its
    name as a u64 length and the bytes, then n_dims u32, n_dims u64 dims, type u32, offset
    u64)."""
    key = len(name).to_bytes(8, "little") + name.encode()
    at = data.index(key) + len(key)
    num_dims = int.from_bytes(data[at:at + 4], "little")
    return at + 4 + 8 * num_dims + 4


def test_tensors_sharing_bytes_of_the_file_are_refused_naming_both(tmp_path: Path) -> None:
    """The gguf reader checks each tensor lies inside the file, not that tensors lie apart:
    a header whose tensors all point at the same bytes (one layer's data under thousands of
    layers) was read tensor after tensor, each dequantized into memory of its own, a model
    far past the file's size (until the process was killed). Here blk.0.attn_k.weight
    points at blk.0.attn_q.weight's bytes: it loaded, K's weights a copy of Q's, without a
    word. Now refused before any tensor is read, naming both."""
    path = make_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    q, k = (tensor_offset_at(data, f"blk.0.attn_{n}.weight") for n in ("q", "k"))
    data[k:k + 8] = data[q:q + 8]
    path.write_bytes(bytes(data))
    open_gguf.cache_clear()
    start = next(t.data_offset for t in open_gguf(path).tensors
                 if t.name == "blk.0.attn_q.weight")
    with pytest.raises(CheckpointError) as refused:
        load_model(path)
    assert str(refused.value) == (
        f"{path}: tensors 'blk.0.attn_k.weight' and 'blk.0.attn_q.weight' share bytes of the "
        f"file (256 bytes at offset {start:,}, the other at {start:,}): each tensor's data "
        "must be its own")


def hf_config(**kw: object) -> dict[str, object]:
    """A tiny Llama config.json (test_checkpoint's), with ``kw``."""
    return {"model_type": "llama", "vocab_size": 96, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 48, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": 64, "hidden_act": "silu", **kw}


def hf_dir(path: Path, **kw: object) -> Path:
    """A checkpoint directory of ``hf_config(**kw)`` with random weights."""
    import json

    pytest.importorskip("safetensors", reason="the model extra")
    from safetensors.torch import save_file

    from kvtier.model.checkpoint import expected_shapes
    from kvtier.model.safetensors_loader import config_from_hf

    cfg = hf_config(**kw)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: 0.2 * torch.randn(shape, generator=gen)
               for name, shape in expected_shapes(config_from_hf(cfg, "test")).items()}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize(("kw", "context"), [
    ({"model_type": "mistral", "sliding_window": 8}, 8),
    ({"model_type": "mistral"}, 64),  # transformers' default window, 4096: past the context
    ({"model_type": "mistral", "sliding_window": None}, 64),
    ({"model_type": "qwen2", "num_key_value_heads": 4, "use_sliding_window": True,
      "sliding_window": 8, "max_window_layers": 1}, 8),  # layer 1 of 2 slides
    ({"model_type": "qwen2", "num_key_value_heads": 4, "use_sliding_window": True,
      "sliding_window": 8}, 64),  # max_window_layers 28: no layer of 2 slides
    ({"model_type": "qwen2", "num_key_value_heads": 4, "sliding_window": 8}, 64),  # unused
    ({"sliding_window": 8}, 64),  # llama has no sliding window
], ids=["mistral", "mistral-default", "mistral-null", "qwen2-sliding", "qwen2-late-layers",
        "qwen2-unused", "llama"])
def test_a_sliding_window_caps_the_context_where_the_model_stays_exact(
        tmp_path: Path, kw: dict[str, object], context: int) -> None:
    """This model attends to every earlier position; a sliding-window model (Mistral's
    config, Qwen2's with use_sliding_window) reads only the last ``sliding_window``: past
    the window every logit differed from transformers' (by 0.2 here), without a word. Now
    the context is capped at the window, where the logits are transformers' (1e-4), and a
    longer prompt is refused; a window no layer uses (or past the context) changes nothing."""
    transformers = pytest.importorskip("transformers", reason="the reference extra")
    path = hf_dir(tmp_path / "ckpt", **kw)
    model = load_model(path)
    assert model.config.max_position_embeddings == context
    tokens = [5, 17, 3, 90, 44, 12, 7, 61, 2, 33] * 2
    if context < len(tokens):
        with pytest.raises(ValueError, match=f"^20 tokens exceed the model's maximum context "
                                             f"of {context} tokens$"):
            model.full_recompute(tokens)
    ours = model.full_recompute(tokens[:context])
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path),
                                                                  dtype=torch.float32)
    with torch.no_grad():
        ref = reference(torch.tensor([tokens[:context]])).logits[0].float()
    assert torch.allclose(ours, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


def test_a_sliding_window_that_is_no_size_is_named() -> None:
    """A window of 0 or of another type is refused naming the key."""
    from kvtier.model.safetensors_loader import config_from_hf

    for window, shown in ((0, "sliding_window must be an integer >= 1 or null, got 0"),
                          ("8", "sliding_window must be an integer, got '8'")):
        with pytest.raises(CheckpointError, match=f"^c: {shown}$"):
            config_from_hf(hf_config(model_type="mistral", sliding_window=window), "c")
    with pytest.raises(CheckpointError, match=r"^c: layer_types must be an array of strings"):
        config_from_hf(hf_config(model_type="qwen2", use_sliding_window=True,
                                 layer_types="sliding_attention"), "c")


class FixedSampler(Sampler):
    """A caller's sampler that answers ``value`` every time."""

    def __init__(self, value: object) -> None:
        super().__init__(SamplingParams())
        self.value = value

    def sample(self, logits: object) -> int:
        return self.value  # type: ignore[return-value]


@pytest.mark.parametrize(("value", "output", "error"), [
    (np.int64(7), [7, 7], None),  # was: "sample returned np.int64(7), not an int"
    (np.uint8(7), [7, 7], None),
    (torch.tensor(7), [7, 7], None),
    (torch.tensor([7]), [7, 7], None),
    (torch.tensor(7.9), None, "sampler: TypeError: sample returned tensor(7.9000), not an int"),
    (torch.tensor(True), None, "sampler: TypeError: sample returned tensor(True), not an int"),
    (np.bool_(True), None, "sampler: TypeError: sample returned np.True_, not an int"),
], ids=["np-int64", "np-uint8", "tensor", "tensor-1", "float-tensor", "bool-tensor", "np-bool"])
def test_a_sampler_answering_an_integer_of_another_kind_is_read_as_it(
        value: object, output: list[int] | None, error: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    """A caller's sampler answering a NumPy integer (``np.argmax``'s answer, which every
    other entry of kvtier takes as a token id) ended its request with an error; one
    answering a tensor of any dtype went through int(): a float tensor of 7.9 sampled
    token 7, a bool tensor token 1, without a word. Now integer scalars of any kind are read
    as the int they are; floats and bools, tensors too, end the request naming them."""
    model = LlamaModel(ModelConfig())
    engine = engine_over(model)
    engine.add_request(Request("a", [1, 2, 3], 2), FixedSampler(value))
    with caplog.at_level(logging.CRITICAL):
        result = engine.run()["a"]
    if error is None:
        assert (result.output, result.stop_reason, result.error) == (output, "length", None)
    else:
        greedy = int(model.full_recompute([1, 2, 3])[-1].argmax())
        assert (result.output, result.stop_reason, result.error) == ([greedy], "error", error)
