"""Red team, sixteenth pass: the model path as a caller drives it (stop strings outside
ASCII, messages and parameters of the wrong kind, two engines over one scheduler) and the
library's objects copied or pickled as a user would. Each test fails on the code before its
fix and asserts the exact refusal (or the exact state after it) and that nothing else
changed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import pytest

from kvtier import CacheConfig, KVCacheManager, Request, Scheduler, SchedulerConfig

if TYPE_CHECKING:
    import torch

    from kvtier.model import ModelEngine

TPB = 4


def make_engine(vocab_size: int = 256) -> ModelEngine:
    """A tiny random-weight model engine on CPU, no host tier."""
    pytest.importorskip("torch", reason="the model engine needs torch")
    from kvtier.model import LlamaModel, ModelConfig, ModelEngine
    from kvtier.storage import KVStorage
    from kvtier.transfer.torch_engine import TorchTransferEngine

    model = LlamaModel(ModelConfig(vocab_size=vocab_size), "cpu")
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=64,
                                         num_host_blocks=0))
    gpu = KVStorage(model.config.kv_layout(TPB), 64, "cpu")
    return ModelEngine(model, manager, Scheduler(manager, SchedulerConfig(max_num_tokens=64)),
                       TorchTransferEngine(gpu, None))


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
