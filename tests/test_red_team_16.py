"""Red team, sixteenth pass: the model path as a caller drives it (stop strings outside
ASCII, messages and parameters of the wrong kind, two engines over one scheduler) and the
library's objects copied or pickled as a user would. Each test fails on the code before its
fix and asserts the exact refusal (or the exact state after it) and that nothing else
changed."""

from __future__ import annotations

import copy
import pickle
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvtier import (
    CacheConfig,
    KVCacheManager,
    Request,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
)
from kvtier.config import EVICTION_POLICIES

if TYPE_CHECKING:
    import torch

    from kvtier.model import LlamaModel, ModelEngine

TPB = 4


def make_engine(model: LlamaModel | None = None, num_gpu_blocks: int = 64,
                num_host_blocks: int = 0) -> ModelEngine:
    """A tiny random-weight model engine on CPU (vocabulary 256), or one of ``model``."""
    pytest.importorskip("torch", reason="the model engine needs torch")
    from kvtier.model import LlamaModel, ModelConfig, ModelEngine
    from kvtier.storage import KVStorage
    from kvtier.transfer.torch_engine import TorchTransferEngine

    model = model or LlamaModel(ModelConfig(), "cpu")
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=num_gpu_blocks,
                                         num_host_blocks=num_host_blocks))
    layout = model.config.kv_layout(TPB)
    host = KVStorage(layout, num_host_blocks) if num_host_blocks else None
    return ModelEngine(model, manager, Scheduler(manager, SchedulerConfig(max_num_tokens=64)),
                       TorchTransferEngine(KVStorage(layout, num_gpu_blocks, "cpu"), host))


class ByteTokenizer:
    """A byte-level vocabulary: token i is byte i (a character of UTF-8 takes 1-4 tokens)."""

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", "replace")


# ---- stop strings outside ASCII -----------------------------------------------------------


@pytest.mark.parametrize("stop", ["Ж" * 12, "🦜" * 5, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ありがとうございます"])
def test_a_stop_string_of_multibyte_characters_is_found(stop: str) -> None:
    """StopCheck decoded a window of (characters + 8) tokens; a byte-level vocabulary writes
    a Cyrillic letter in 2 tokens, an emoji in 4: the window never held the whole stop
    (SmolLM2 writes 'Ж' * 12 in 24 tokens, 4 past the window). Now the window counts UTF-8
    bytes: the stop is found at the token that completes it, not one token earlier."""
    pytest.importorskip("torch", reason="the model package needs torch")
    from kvtier.model.generate import StopCheck

    text = ("say " + stop + " and go on").encode()
    end = len(b"say " + stop.encode())
    check = StopCheck(ByteTokenizer(), (stop,))  # type: ignore[arg-type]
    assert [check(list(text[:n])) for n in (end - 1, end)] == [False, True]


def test_a_stop_string_of_cyrillic_ends_the_answer_there() -> None:
    """End to end: an answer sampling the bytes of a text holding a Cyrillic stop ran to
    max_new_tokens; now it stops at the token completing the stop, with reason 'stop'."""
    pytest.importorskip("torch", reason="the model engine needs torch")
    from kvtier.model.generate import StopCheck
    from kvtier.model.sampling import Sampler, SamplingParams

    stop = "Ж" * 12
    text = ("say " + stop + " and go on").encode()

    class Scripted(Sampler):
        """Samples the bytes of ``text``, one a step."""

        def __init__(self) -> None:
            super().__init__(SamplingParams())
            self.tokens: Iterator[int] = iter(text)

        def sample(self, logits: torch.Tensor) -> int:
            return next(self.tokens)

    engine = make_engine()
    check = StopCheck(ByteTokenizer(), (stop,))  # type: ignore[arg-type]
    engine.add_request(Request("r", [1, 2, 3], len(text)), Scripted(), check)
    result = engine.run()["r"]
    assert (result.stop_reason, bytes(result.output)) == ("stop", ("say " + stop).encode())


# ---- two engines over one scheduler -------------------------------------------------------


def engine_state(engine: ModelEngine) -> tuple[object, ...]:
    """What a refused call must leave as it was."""
    scheduler, manager = engine.scheduler, engine.manager
    return (manager.version, manager.num_sequences, manager.stats.gpu,
            [r.request_id for r in scheduler.waiting], list(scheduler.running),
            engine.num_steps, sorted(engine.results))


def test_a_request_queued_past_the_engine_is_refused_before_the_step_runs() -> None:
    """A second ModelEngine over the same scheduler (or a Scheduler.add_request) queued a
    request the first engine had no result for: the first engine's step ran it, raised
    KeyError after the scheduler's update, and every later step raised it again (no request
    of either engine ever finished). Now the step is refused before it runs, naming the
    request, nothing changed; once its own engine aborts it, the step runs."""
    from kvtier.model import ModelEngine

    first = make_engine()
    second = ModelEngine(first.model, first.manager, first.scheduler, first.transfer)
    first.add_request(Request("a", [1, 2, 3, 4, 9], 3))
    second.add_request(Request("b", [1, 2, 3, 4, 5, 6], 3))
    message = ("request 'b' is queued on this engine's scheduler but was not added through "
               "this engine (ModelEngine.add_request): another engine's, or "
               "Scheduler.add_request's; abort it there")
    before = engine_state(first)
    for call in (first.step, first.run, lambda: first.abort("b")):
        with pytest.raises(RuntimeError) as info:
            call()
        assert str(info.value) == message
        assert engine_state(first) == before
    assert second.abort("b") is not None
    assert first.run()["a"].stop_reason == "length"
    first.manager.check_invariants()


def test_a_request_added_to_the_scheduler_directly_is_refused_by_the_engine() -> None:
    """The same through Scheduler.add_request, and for an id the engine finished before
    (its finished result is no result to fill): refused naming it, nothing changed."""
    engine = make_engine()
    engine.add_request(Request("done", [5, 6, 7], 1))
    engine.run()
    engine.scheduler.add_request(Request("done", [5, 6, 7, 8], 2))
    before = engine_state(engine)
    with pytest.raises(RuntimeError) as info:
        engine.step()
    assert str(info.value).startswith("request 'done' is queued on this engine's scheduler "
                                      "but was not added through this engine")
    assert engine_state(engine) == before
    assert engine.scheduler.abort("done") is not None
    assert engine.abort("done") is None  # finished, and queued nowhere now


# ---- conversations and parameters of the wrong kind ----------------------------------------


class Template:
    """A checkpoint's tokenizer as far as chat() goes: a Jinja template over the messages."""

    def __init__(self) -> None:
        pytest.importorskip("jinja2", reason="chat templates need jinja2: kvtier[model]")
        from kvtier.model.tokenizer import Tokenizer

        class Backend:
            def get_vocab_size(self, with_added_tokens: bool) -> int:
                return 256

            def encode(self, text: str, add_special_tokens: bool) -> object:
                class Encoding:
                    ids = list(text.encode())[:40]
                return Encoding()

            def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
                return bytes(ids).decode("utf-8", "replace")

        self.tokenizer = Tokenizer(Backend(), [255], "{% for m in messages %}"
                                   "{{ m['role'] + ': ' + m['content'] }}\n{% endfor %}")


@pytest.mark.parametrize(("conversations", "message"), [
    ([[{"role": "user", "content": 5}]],
     "conversation 0: the 'content' of message 0 must be a str, got int"),
    ([[{"role": "user", "content": "hi"}], [{"role": "user", "content": None}]],
     "conversation 1: the 'content' of message 0 must be a str, got NoneType"),
    ([[{"role": "user", "content": "hi"}, {"content": "hi"}]],
     "conversation 0: the 'role' of message 1 must be a str, got nothing"),
    ([[("user", "hi")]], 'conversation 0: message 0 must be a mapping with a "role" and a '
                         '"content", got tuple'),
    (["hello"], 'conversation 0 must be a sequence of messages (mappings with a "role" and a '
                '"content"), got str'),
    ([{"role": "user", "content": "hi"}], 'conversation 0 must be a sequence of messages '
                                          '(mappings with a "role" and a "content"), got dict'),
    ("hello", "conversations must be a sequence of conversations (each a sequence of "
              "messages), got str"),
])
def test_a_conversation_that_is_no_messages_is_refused_naming_it(
        conversations: object, message: str) -> None:
    """Generator.chat put whatever it was given through the template: a content that is no
    str raised TypeError from inside Jinja ('can only concatenate str (not "int") to str'),
    naming neither conversation, message nor key; a conversation given as a str was read
    one message a character. Now ValueError naming them, nothing queued or computed."""
    pytest.importorskip("torch", reason="the model needs torch")
    from kvtier.model import LlamaModel, ModelConfig
    from kvtier.model.generate import Generator, TierSizes
    from kvtier.model.sampling import SamplingParams

    generator = Generator(LlamaModel(ModelConfig(), "cpu"), Template().tokenizer,
                          TierSizes(TPB, 32, 0, max_num_tokens=64))
    before = engine_state(generator.engine)
    with pytest.raises(ValueError) as info:
        generator.chat(conversations, SamplingParams(max_new_tokens=1))  # type: ignore[arg-type]
    assert str(info.value) == message
    assert engine_state(generator.engine) == before
    (ok,) = generator.chat(iter([[{"role": "user", "content": "hi"}]]),  # type: ignore[arg-type]
                           SamplingParams(max_new_tokens=1))
    assert ok.num_prompt_tokens == len(b"user: hi\n")


def test_the_chat_template_refuses_a_message_that_is_no_str_naming_it() -> None:
    """The tokenizer's own apply_chat_template, as a caller of the library calls it."""
    tokenizer = Template().tokenizer
    with pytest.raises(ValueError) as info:
        tokenizer.apply_chat_template([{"role": "user", "content": b"hi"}])  # type: ignore[dict-item]
    assert str(info.value) == ("the conversation: the 'content' of message 0 must be a str, "
                               "got bytes")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "user: hi\n"


@pytest.mark.parametrize("params", [None, {"max_new_tokens": 2}, 2])
def test_sampling_params_that_are_no_sampling_params_are_refused(params: object) -> None:
    """generate() and chat() read params as a SamplingParams: a dict or None raised
    AttributeError ('dict' object has no attribute 'max_new_tokens'). Now TypeError naming
    the argument, before anything is queued."""
    pytest.importorskip("torch", reason="the model needs torch")
    from kvtier.model import LlamaModel, ModelConfig
    from kvtier.model.generate import Generator, TierSizes

    generator = Generator(LlamaModel(ModelConfig(), "cpu"), Template().tokenizer,
                          TierSizes(TPB, 32, 0, max_num_tokens=64))
    before = engine_state(generator.engine)
    message = f"params must be a SamplingParams, got {type(params).__name__}"
    calls: list[Callable[[], object]] = [
        lambda: generator.generate([[1, 2, 3]], params),  # type: ignore[arg-type]
        lambda: generator.chat([[{"role": "user", "content": "hi"}]], params)]  # type: ignore[arg-type]
    for call in calls:
        with pytest.raises(TypeError) as info:
            call()
        assert str(info.value) == message
        assert engine_state(generator.engine) == before


# ---- a manager pickled or copied ------------------------------------------------------------


def test_a_manager_that_matched_a_prompt_pickles() -> None:
    """A manager pickled after add_sequence raised TypeError ('cannot pickle
    weakref.ReferenceType object': the memo of matched prompts holds weak references); one
    that had matched nothing pickled. Now both pickle, and the copy answers as the
    original."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=6,
                                         num_host_blocks=2))
    manager.add_sequence(SequenceSpec("a", list(range(1, 10))))
    manager.remove_sequence("a")
    manager.add_sequence(SequenceSpec("b", list(range(1, 7))))  # matched a cached prefix
    copied = pickle.loads(pickle.dumps(manager))
    copied.check_invariants()
    probe = list(range(1, 12))
    assert copied.lookup(probe) == manager.lookup(probe)
    assert copied.block_table("b") == manager.block_table("b")


def drive(scheduler: Scheduler, arrivals: list[list[Request]]) -> list[object]:
    """Steps of ``scheduler`` with ``arrivals[i]`` added before step i, each token sampled
    from the request's id and length: what each step decided, the books after it."""
    seen: list[object] = []
    for batch in arrivals:
        for req in batch:
            scheduler.add_request(copy.deepcopy(req))
        step = scheduler.step()
        sampled = {c.request_id: (len(c.request_id) * 7 + c.first_token) % 50 + 1
                   for c in step.context_chunks}
        sampled.update({rid: (len(scheduler.running[rid].output) * 3) % 50 + 1
                        for rid in step.decode_request_ids})
        finished = scheduler.update(step, sampled)
        manager = scheduler.manager
        manager.check_invariants()
        seen.append((step.context_chunks, step.decode_request_ids, step.preempted_request_ids,
                     step.transfer_plan.ops, [r.request_id for r in finished],
                     manager.stats, manager.drain_events()))
    return seen


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_a_pickled_or_copied_scheduler_decides_as_the_original(policy: str) -> None:
    """A scheduler (and its manager) pickled, or deep-copied, in the middle of a run with
    requests waiting and running, blocks offloaded, onboarded and evicted, then driven
    exactly as the original: every step's chunks, decodes, preemptions, copies, finished
    requests, stats and events are the original's (the memo a copy starts without changes
    no decision)."""
    rng = random.Random(16)
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randrange(6, 14))] for _ in range(3)]
    arrivals = [[Request(f"r{step}-{i}", rng.choice(prefixes) + [rng.randrange(1, 50) for _ in
                                                                  range(rng.randrange(1, 9))],
                         rng.randrange(1, 6)) for i in range(rng.randrange(0, 3))]
                for step in range(40)]
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=12,
                                         num_host_blocks=8, eviction_policy=policy,
                                         enable_events=True))
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=24))
    drive(scheduler, arrivals[:20])
    assert scheduler.has_unfinished()
    twins = [pickle.loads(pickle.dumps(scheduler)), copy.deepcopy(scheduler)]
    expected = drive(scheduler, arrivals[20:])
    assert manager.stats.host.onboarded_blocks and manager.stats.gpu.offloaded_blocks
    for twin in twins:
        assert drive(twin, arrivals[20:]) == expected


# ---- a step interrupted between the scheduler's step and its update ------------------------


def outputs(engine: ModelEngine) -> dict[str, list[int]]:
    return {rid: r.output for rid, r in engine.results.items()}


def test_a_forward_pass_interrupted_gives_the_step_up_and_the_engine_runs_on() -> None:
    """A KeyboardInterrupt in a forward pass (Ctrl-C in a notebook) left the scheduler's
    step unapplied: every later step raised 'step() called before update() applied the
    previous step' and the engine never ran again. Now the interrupt still reaches the
    caller, the step's requests are back in the queue to recompute (nothing they were to
    compute stays cached), and the next run gives the outputs of a run never interrupted."""
    reference = make_engine()
    engine = make_engine(reference.model)
    for e in (reference, engine):
        e.add_request(Request("a", [1, 2, 3, 4, 5, 6, 7], 4))
        e.add_request(Request("b", [1, 2, 3, 5, 9, 9], 4))  # not a's first block: no wait
    reference.run()
    forward = engine.model.forward_chunk
    calls = []

    def interrupted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(args)
        if len(calls) == 2:  # a's pass ran, b's is cut short
            raise KeyboardInterrupt
        return forward(*args, **kwargs)  # type: ignore[arg-type]

    engine.model.forward_chunk = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    engine.manager.check_invariants()
    assert [r.request_id for r in engine.scheduler.waiting] == ["a", "b"]
    assert (engine.scheduler.running, engine.manager.num_sequences) == ({}, 0)
    assert engine.manager.lookup([1, 2, 3, 4, 5, 6, 7]).num_tokens == 0
    engine.model.forward_chunk = forward  # type: ignore[method-assign]
    engine.run()
    assert outputs(engine) == outputs(reference)


def test_an_interrupted_submit_reports_the_plan_failed_and_recomputes() -> None:
    """Interrupted while its copies are submitted (an onboard from the host): the plan is
    reported failed (nothing it was to fill is served), the request recomputes, and its
    output is a run never interrupted's."""
    reference = make_engine(num_gpu_blocks=8, num_host_blocks=16)
    engine = make_engine(reference.model, num_gpu_blocks=8, num_host_blocks=16)
    first, other = [7 * i % 250 + 1 for i in range(20)], [3 * i % 250 + 2 for i in range(24)]
    for e in (reference, engine):
        for rid, prompt in (("first", first), ("other", other)):
            e.add_request(Request(rid, prompt, 2))
            e.run()
    assert engine.manager.lookup(first + [5]).num_host_tokens > 0
    submit = engine.transfer.submit

    def interrupted(plan: object) -> object:
        raise KeyboardInterrupt

    engine.transfer.submit = interrupted  # type: ignore[assignment,method-assign]
    for e in (reference, engine):
        e.add_request(Request("again", first + [5], 3))
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    engine.manager.check_invariants()
    assert [r.request_id for r in engine.scheduler.waiting] == ["again"]
    assert engine.manager.stats.num_failed_transfers > 0
    engine.transfer.submit = submit  # type: ignore[method-assign]
    reference.run()
    engine.run()
    assert outputs(engine) == outputs(reference)


def test_an_interrupted_generate_leaves_nothing_queued() -> None:
    """Generator.generate interrupted left its prompts queued: the next call ran them too
    and their results stayed in the engine. Now they are aborted; the next call runs only
    its own prompt."""
    pytest.importorskip("torch", reason="the model needs torch")
    from kvtier.model import LlamaModel, ModelConfig
    from kvtier.model.generate import Generator, TierSizes
    from kvtier.model.sampling import SamplingParams

    generator = Generator(LlamaModel(ModelConfig(), "cpu"), ByteTokenizer(),  # type: ignore[arg-type]
                          TierSizes(TPB, 32, 0, max_num_tokens=64))
    engine = generator.engine
    forward = engine.model.forward_chunk

    def interrupted(*args: object, **kwargs: object) -> torch.Tensor:
        raise KeyboardInterrupt

    engine.model.forward_chunk = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        generator.generate([[1, 2, 3], [4, 5, 6]], SamplingParams(max_new_tokens=2))
    assert (engine.scheduler.has_unfinished(), engine.results) == (False, {})
    engine.model.forward_chunk = forward  # type: ignore[method-assign]
    (result,) = generator.generate([[7, 8, 9]], SamplingParams(max_new_tokens=2))
    assert (result.num_prompt_tokens, len(result.output_ids), engine.results) == (3, 2, {})


# ---- sampling parameters at the edge of their range ----------------------------------------


@pytest.mark.parametrize("top_p", [1e-50, 5e-324])
def test_a_top_p_below_the_float32_range_samples_the_best_token(top_p: float) -> None:
    """top_p is compared in float32, where 1e-50 is 0: no token was kept and multinomial
    raised 'invalid multinomial distribution (sum of probabilities <= 0)', so a request
    with a top_p in (0, 1] ended in an error after one token. Now the most likely token
    always stays, as the nucleus of any top_p below its probability is that token."""
    torch = pytest.importorskip("torch", reason="sampling needs torch")
    from kvtier.model.sampling import Sampler, SamplingParams

    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=top_p, seed=3))
    assert [sampler.sample(logits) for _ in range(5)] == [1] * 5


def test_a_retention_its_prompt_cannot_take_queues_no_prompt() -> None:
    """generate() checks every prompt before queueing any, but a retention whose
    decode_start lies past its prompt was refused only by the scheduler, as that prompt
    was queued: the prompts before it stayed queued (run by the next call, their results
    left in the engine). Now ValueError naming the prompt, nothing queued, and the next
    call runs only its own prompt."""
    pytest.importorskip("torch", reason="the model needs torch")
    from kvtier import Retention, RetentionRange
    from kvtier.model import LlamaModel, ModelConfig
    from kvtier.model.generate import Generator, TierSizes
    from kvtier.model.sampling import SamplingParams

    generator = Generator(LlamaModel(ModelConfig(), "cpu"), ByteTokenizer(),  # type: ignore[arg-type]
                          TierSizes(TPB, 32, 0, max_num_tokens=64))
    params = SamplingParams(max_new_tokens=2)
    before = engine_state(generator.engine)
    with pytest.raises(ValueError) as info:
        generator.generate([[1, 2, 3], [4, 5, 6]], params, [
            None, Retention((RetentionRange(0, 2, 90),), decode_start=10)])
    # (refused as the Request is built since 608eb72, naming it as one)
    assert str(info.value) == ("prompt 1: retention of request 'req-1': decode_start 10 lies "
                               "past the 3 tokens admitted")
    assert engine_state(generator.engine) == before
    (result,) = generator.generate([[7, 8, 9]], params)
    assert (result.num_prompt_tokens, generator.engine.results) == (3, {})


def test_a_stop_string_that_is_no_unicode_text_is_refused() -> None:
    """A --stop of bytes that are no UTF-8 reaches Python as lone surrogates, which no
    decoded answer holds: it was accepted and never stopped anything. Now refused naming
    it, as the prompts' text is (``check_text``)."""
    pytest.importorskip("torch", reason="sampling needs torch")
    from kvtier.model.sampling import SamplingParams

    with pytest.raises(ValueError) as info:
        SamplingParams(stop=("END", "x\udcff"))
    assert str(info.value) == ("stop[1] is not valid Unicode text (character 1: bytes that "
                               "are not UTF-8?), so no answer could ever hold it")
    assert SamplingParams(stop=("Ж", "🦜")).stop == ("Ж", "🦜")


@pytest.mark.parametrize(("option", "message"), [
    (["--top-p", "0"], "argument --top-p: must be a finite number in (0, 1], got 0 (see "
                       "'kvtier generate --help')"),
    (["--seed", str(2**64)], "argument --seed: must be an integer <= 4294967295, got "
                             "18446744073709551616 (see 'kvtier generate --help')"),
    (["--stop", "\udcff"], "stop[0] is not valid Unicode text (character 0: bytes that are "
                           "not UTF-8?), so no answer could ever hold it"),
])
def test_sampling_options_are_refused_before_a_model_is_looked_for(
        option: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The sampling options were checked only once the model had loaded (with the default
    model, tens of seconds of reading weights), after the model path: a missing model was
    named instead. Now they are refused first, in one sentence and status 2."""
    pytest.importorskip("torch", reason="the model commands need torch")
    from kvtier.cli import main

    assert main(["generate", "--model", str(tmp_path / "none.gguf"), *option, "hi"]) == 2
    assert capsys.readouterr().err == f"kvtier: error: {message}\n"


# ---- a library's error text, many lines long, in a one-sentence refusal ---------------------


def test_first_line_keeps_one_line_of_a_library_message() -> None:
    """The helper every one-sentence refusal puts a library's text through."""
    from kvtier.sequence import first_line

    assert first_line("") == ""
    assert first_line("\n  one  \n") == "one"
    assert first_line("\nfirst\n\nsecond\n") == "first ..."
    assert first_line("x" * 400) == "x" * 296 + " ..."
    assert first_line(ValueError("bad\ntail"), 10) == "bad ..."


def test_a_device_torch_has_no_kernels_for_is_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    """torch refuses a tensor on 'xla' (no such backend built) with 55 lines, one per
    dispatch key: `kvtier generate --device xla` printed all of them as its 'one sentence'
    (and the library's ValueError held them). Now one line, status 2."""
    pytest.importorskip("torch", reason="the model commands need torch")
    from kvtier.cli import main
    from kvtier.model.llama import usable_device

    with pytest.raises(ValueError) as info:
        usable_device("xla")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("device 'xla' cannot be used here: Could not run ")
    assert main(["generate", "--device", "xla", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvtier: error: device 'xla' cannot be "
                                                   "used here: Could not run ")


@pytest.mark.parametrize(("ids", "message"), [
    ([5, -1], "ids: token at index 1 must be an int in 0..2**63-1, got -1 (int)"),
    ([1.5], "ids: token at index 0 must be an int in 0..2**63-1, got 1.5 (float)"),
    ([1, 2**32], "ids: token id 4294967296 at index 1 is past the tokenizer's id range "
                 "(0..2**32-1)"),
    ("hi", "ids must be a sequence of ints (a list or tuple), got str"),
])
def test_decode_refuses_what_is_no_token_id_naming_it(ids: object, message: str) -> None:
    """Tokenizer.decode handed its ids to the library, which raised OverflowError ('number
    too small to fit in target type') for -1 and TypeError for 1.5, naming neither the id
    nor its index. Now ValueError naming both; tensors and arrays of ids still decode."""
    torch = pytest.importorskip("torch", reason="the tokenizer's module needs torch")
    tokenizer = Template().tokenizer
    with pytest.raises(ValueError) as info:
        tokenizer.decode(ids)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert tokenizer.decode(torch.tensor([72, 105])) == tokenizer.decode((72, 105)) == "Hi"


# ---- a checkpoint header that lies about its size -----------------------------------------


def test_a_gguf_claiming_a_billion_layers_is_refused_at_once(tmp_path: Path) -> None:
    """A GGUF whose block_count says 10**9 (one layer in the file): the check of names and
    shapes built the dict of every tensor a billion layers need before naming the first
    missing one, for hours and until memory ran out. Now it names the first missing one
    (layer 1's) at once, no tensor read."""
    pytest.importorskip("gguf", reason="GGUF files need the model extra")
    pytest.importorskip("torch", reason="the model needs torch")
    from kvtier.model.checkpoint import CheckpointError, load_model
    from test_red_team_model import make_gguf

    path = make_gguf(tmp_path / "lies.gguf", llama__block_count=("u32", 10**9))
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert str(info.value) == (f"{path} has no tensor 'blk.1.attn_norm.weight' (Hugging "
                               "Face: model.layers.1.input_layernorm.weight) (shape [8])")


@pytest.mark.parametrize(("argv", "jsonl", "message"), [
    (["chat", "--system", "be \udcff"], None,
     "--system is not valid Unicode text (character 3: bytes that are not UTF-8?)"),
    (["generate", "ok", "x\udcff"], None,
     "prompt 1 is not valid Unicode text (character 1: bytes that are not UTF-8?)"),
    (["generate"], '{"prompt": "ok"}\n{"turns": ["ok", "a\\udcffb"]}\n',
     "{jsonl} line 2 is not valid Unicode text (character 1: bytes that are not UTF-8?)"),
    (["generate"], '{"prompt": "ok", "system": "\\ud800"}\n',
     "{jsonl} line 1 is not valid Unicode text (character 0: bytes that are not UTF-8?)"),
])
def test_text_that_is_no_unicode_is_refused_before_a_model_is_looked_for(
        argv: list[str], jsonl: str | None, message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Bytes that are no UTF-8 in an argument (or a lone surrogate a JSON string escapes)
    reach Python as surrogates, which the tokenizer refuses: only once the model had
    loaded (after the model path was looked for), and for a chat's --system at every
    turn, each one 'not answered', for ever. Now refused first, naming the argument or
    the line."""
    from kvtier.cli import main

    extra = []
    path = tmp_path / "prompts.jsonl"
    if jsonl is not None:
        path.write_text(jsonl, encoding="utf-8")
        extra = ["--jsonl", str(path)]
    assert main([*argv, *extra, "--model", str(tmp_path / "none.gguf")]) == 2
    assert capsys.readouterr().err == f"kvtier: error: {message.format(jsonl=path)}\n"


@pytest.mark.parametrize(("value", "shown"), [
    (("u32", 7), "7"), (("arr", ["a", "b"]), "['a', 'b']")])
def test_a_gguf_chat_template_that_is_no_string_names_the_key(
        value: tuple[str, object], shown: str, tmp_path: Path) -> None:
    """A GGUF whose tokenizer.chat_template is a number or an array loaded, then Jinja
    raised TypeError ("Can't compile non template nodes") at the first chat turn: `kvtier
    chat` ended with an internal error (status 70). Now the tokenizer is refused when
    loaded, naming the key."""
    pytest.importorskip("gguf", reason="GGUF files need the model extra")
    pytest.importorskip("tokenizers", reason="the tokenizer needs the model extra")
    pytest.importorskip("torch", reason="the model package needs torch")
    from kvtier.model.checkpoint import CheckpointError
    from kvtier.model.tokenizer import load_tokenizer
    from test_red_team_model import make_gguf

    path = make_gguf(tmp_path / "template.gguf", tokenizer__chat_template=value)
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(path)
    assert str(info.value) == f"{path}: tokenizer.chat_template must be a string, got {shown}"


def test_a_chat_template_file_that_is_no_utf8_names_the_file(tmp_path: Path) -> None:
    """A checkpoint directory's chat_template.jinja of bytes that are no UTF-8 raised the
    codec's UnicodeDecodeError ("'utf-8' codec can't decode byte 0xff ..."), naming no
    file (the command line printed only that). Now CheckpointError naming the file."""
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizer needs the model extra")
    pytest.importorskip("torch", reason="the model package needs torch")
    from kvtier.model.checkpoint import CheckpointError
    from kvtier.model.tokenizer import load_tokenizer

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1},
                                                               unk_token="[UNK]"))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(tmp_path)
    assert str(info.value) == (f"{tmp_path / 'chat_template.jinja'} is not readable UTF-8 "
                               "text ('utf-8' codec can't decode byte 0xff in position 0: "
                               "invalid start byte)")


@pytest.mark.parametrize(("template", "message"), [
    ("{{ 'x' * 10**8 }}", "chat template: a repetition of 100,000,000 items, more than "
                          "1,048,584"),
    ("{% set n = 10 ** 6 %}{{ 10 ** n }}", "chat template: a power of about 4,000,000 bits, "
                                          "more than 4,096"),
    ("{% for i in range(100000) %}xxxxxxxxxxxxxxxxxxxx{% endfor %}",
     "chat template: it writes more than 1,048,584 characters for these messages"),
    ("{{ 1 // 0 }}", "chat template: ZeroDivisionError: integer division or modulo by zero"),
    ("{{ messages + 1 }}", 'chat template: TypeError: can only concatenate list (not "int") '
                           'to list'),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
     "chat template: RecursionError: maximum recursion depth exceeded"),
])
def test_a_chat_template_that_runs_away_or_raises_is_refused(template: str,
                                                             message: str) -> None:
    """A checkpoint's chat template is code from a file. A repetition or a power past any
    prompt (10**8 characters, a million-digit number) was computed in full, a loop's
    output grew without bound, and what the template raised went out as is (ZeroDivision,
    TypeError, RecursionError: an internal error, status 70, of `kvtier chat`). Now each is
    a ValueError naming the chat template, the runaways refused before they are computed
    or where their output passes four times the messages' text and a MiB."""
    pytest.importorskip("jinja2", reason="chat templates need jinja2: kvtier[model]")
    tokenizer = Template().tokenizer
    tokenizer.chat_template = template
    with pytest.raises(ValueError) as info:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    got = str(info.value)
    if "RecursionError" in message:  # Python words the rest by where the limit was hit
        got = got[:len(message)]
    assert got == message


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro f() %}{% for i in range(100000) %}{% endfor %}{{ f() }}{% endmacro %}{{ f() }}",
])
def test_a_chat_template_that_loops_without_output_is_stopped(
        monkeypatch: pytest.MonkeyPatch, template: str) -> None:
    """A loop that writes nothing passes every bound on output: 10**10 turns of an empty
    loop ran for hours. Now the lines a template runs are counted and it is refused past
    ``MAX_TEMPLATE_LINES`` (lowered here to keep the test fast); a real template, and the
    caller's own trace function, are untouched."""
    pytest.importorskip("jinja2", reason="chat templates need jinja2: kvtier[model]")
    import sys

    import kvtier.model.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "MAX_TEMPLATE_LINES", 20_000)
    tokenizer = Template().tokenizer
    before = sys.gettrace()
    tokenizer.chat_template = template
    with pytest.raises(ValueError) as info:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(info.value) == "chat template: it runs more than 20,000 lines of its code"
    assert sys.gettrace() is before
    tokenizer.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}] * 100) == (
        "user: hi" * 100)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize(("rope", "shown"), [
    ({**LLAMA3, "factor": "8"}, "rope_scaling.factor must be a number, got '8'"),
    ({**LLAMA3, "low_freq_factor": True}, "rope_scaling.low_freq_factor must be a number, "
                                          "got True"),
    ({**LLAMA3, "original_max_position_embeddings": 8192.7},
     "rope_scaling.original_max_position_embeddings must be an integer, got 8192.7"),
    ({**LLAMA3, "original_max_position_embeddings": None},
     "rope_scaling lacks the key 'original_max_position_embeddings'"),
    ({"rope_type": "default", "rope_theta": [1e4]},
     "rope_scaling.rope_theta must be a number, got [10000.0]"),
    ({"rope_type": "default", "rope_theta": True},
     "rope_scaling.rope_theta must be a number, got True"),
])
def test_hf_rope_scaling_values_of_the_wrong_type_name_the_key(
        rope: dict[str, object], shown: str) -> None:
    """config.json's rope_scaling (or rope_parameters) values were read with float() and
    int(): "8" and true taken as 8.0 and 1.0, 8192.7 as 8192, a rope_theta of true as 1.0,
    a list a TypeError naming no key. Now CheckpointError naming the file and the key, as
    the top-level values are."""
    pytest.importorskip("torch", reason="the model package needs torch")
    from kvtier.model.checkpoint import CheckpointError
    from kvtier.model.safetensors_loader import config_from_hf

    config = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    assert config_from_hf({**config, "rope_scaling": LLAMA3}, "c.json").rope_scaling
    with pytest.raises(CheckpointError) as info:
        config_from_hf({**config, "rope_scaling": rope}, "c.json")
    assert str(info.value) == f"c.json: {shown}"
