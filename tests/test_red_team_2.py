"""Red-team inputs, second pass: each test names the input, fails on the code before its fix
and asserts the exact refusal (or the exact state after it)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest.mock import ANY

import pytest
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from bad_input_helpers import assert_one_line_refusal, run_cli
from kvtier import (
    CacheConfig,
    KVCacheManager,
    Request,
    Retention,
    RetentionRange,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
    TransferPlan,
)
from kvtier.integrations.vllm.store_tier import JobOutcome, StoreTier
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace
from kvtier.sim import AgenticWorkload
from kvtier.sim.synthetic import PrefixModel, SyntheticChat

if TYPE_CHECKING:
    from kvtier.model import ModelEngine
    from kvtier.remote.tier import RemoteTier

TPB = 4
PREFIX = [(7 * i + 3) % 256 for i in range(22)]  # 5 full blocks of 4 tokens and a partial


def make_engine(store: type[InMemoryRemoteStore] | None = None,
                backend: dict[str, bytes] | None = None) -> ModelEngine:
    """A tiny random-weight model engine on CPU (vocabulary 256), with a remote tier over
    ``store`` (sharing ``backend``) if given."""
    pytest.importorskip("torch", reason="the model engine needs torch")
    from kvtier.model import LlamaModel, ModelConfig, ModelEngine
    from kvtier.remote.tier import RemoteTier
    from kvtier.storage import KVStorage
    from kvtier.transfer.torch_engine import TorchTransferEngine

    model = LlamaModel(ModelConfig(), "cpu")
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=32,
                                         num_host_blocks=16, hash_algo="sha256"))
    layout = model.config.kv_layout(TPB)
    gpu, host = KVStorage(layout, 32, "cpu"), KVStorage(layout, 16)
    remote = None
    if store is not None:
        remote = RemoteTier(store(RemoteNamespace("tiny-llama", layout), backend), manager,
                            gpu, host, fetch_deadline_s=5.0)
    return ModelEngine(model, manager, Scheduler(manager, SchedulerConfig(max_num_tokens=64)),
                       TorchTransferEngine(gpu, host), remote=remote)


# ---- the model engine: what it cannot run is refused when queued, not mid-step --------------


@pytest.mark.parametrize(("field", "tokens", "shown"), [
    ("prompt", [1, 2, 256], "token id 256 at index 2"),
    ("prompt", [10**6, 1], "token id 1000000 at index 0"),
    ("output", [3, 2**63 - 1], "token id 9223372036854775807 at index 1"),
    ("prompt", [1, "numpy"], "token id 300 at index 1"),  # a numpy int64, replaced below
])
def test_engine_refuses_token_ids_past_the_models_vocabulary(
        field: str, tokens: list[object], shown: str) -> None:
    """A token id the model has no embedding for was queued; the step that prefilled it
    raised IndexError between the scheduler's step and update, and every later step was
    refused ('step() called before update()'): no request ever ran again. Now ValueError
    naming the field, the index and the id, nothing queued; the other requests run."""
    if "numpy" in tokens:
        np = pytest.importorskip("numpy")
        tokens = [1, np.int64(300)]
    engine = make_engine()
    engine.add_request(Request("ok", [1, 2, 3], 2))
    bad = Request("bad", [1, 2, 3], 2)
    setattr(bad, field, tokens)
    with pytest.raises(ValueError, match=f"{field} of request 'bad': {shown} is past the "
                                         "model's vocabulary of 256"):
        engine.add_request(bad)
    assert [r.request_id for r in engine.scheduler.waiting] == ["ok"]
    assert "bad" not in engine.results
    results = engine.run()
    assert results["ok"].finished and len(results["ok"].output) == 2
    engine.manager.check_invariants()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("rope_theta", "10000", "rope_theta must be a finite number > 0, got '10000'"),  # TypeError
    ("norm_eps", None, "norm_eps must be a finite number > 0, got None"),  # TypeError
    ("rope_theta", float("inf"), "rope_theta must be a finite number > 0, got inf"),
    ("rope_theta", 10**400, "rope_theta must be a finite number > 0, got an int of 1329 bits"),
    ("norm_eps", True, "norm_eps must be a finite number > 0, got True"),
    ("seed", "7", "seed must be an integer, got '7'"),  # torch refused it when drawing weights
    ("rope_scaling", "factor=inf", "rope_scaling.factor must be a finite number > 0, got inf"),
])
def test_model_config_refuses_numbers_that_are_no_finite_numbers(field: str, value: object,
                                                                 message: str) -> None:
    """ModelConfig checked its float fields with ``> 0`` only: a str or None raised
    TypeError naming nothing, inf (or an int past the float range) was taken."""
    pytest.importorskip("torch", reason="the model package needs torch")
    from kvtier.model import ModelConfig
    from kvtier.model.config import RopeScaling

    with pytest.raises(ValueError, match=re.escape(message)):
        if field == "rope_scaling":
            RopeScaling(factor=float("inf"), low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)
        ModelConfig(**{field: value})  # type: ignore[arg-type]


def test_run_returns_when_its_last_allowed_step_finishes_the_work() -> None:
    """``run(max_steps=n)`` raised 'requests still unfinished after n steps' when its n-th
    step finished the last request (it never checked after that step), and ``run(0)`` with
    nothing queued raised too. Now both return the results; a bad ``max_steps`` is refused."""
    engine = make_engine()
    assert engine.run(0) == {}
    engine.add_request(Request("a", [1, 2, 3], 2))  # a prefill step, then a decode step
    with pytest.raises(RuntimeError, match="unfinished after 1 steps"):
        engine.run(1)
    assert engine.run(1)["a"].finished and engine.num_steps == 2
    with pytest.raises(ValueError, match="max_steps must be an int >= 0, got -1"):
        engine.run(-1)


def test_generate_queues_no_prompt_when_one_is_refused() -> None:
    """``Generator.generate([good, bad])`` with a token id past the vocabulary in the second
    prompt: the first was queued before the engine refused the second, and stayed queued
    (the next call ran it, its result never returned). Now ValueError naming the prompt,
    nothing queued, and the next call runs only its own prompts."""
    pytest.importorskip("torch", reason="the model needs torch")
    from kvtier.model import LlamaModel, ModelConfig
    from kvtier.model.generate import Generator, TierSizes
    from kvtier.model.sampling import SamplingParams

    class Decoder:
        """All generate() asks of a tokenizer: the text of an answer."""

        def decode(self, ids: list[int]) -> str:
            return " ".join(map(str, ids))

    generator = Generator(LlamaModel(ModelConfig(), "cpu"), Decoder(),  # type: ignore[arg-type]
                          TierSizes(TPB, 32, 0, max_num_tokens=64))
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 1 holds token id 999, past the model's "
                                         "vocabulary of 256"):
        generator.generate([[1, 2, 3], [4, 999]], params)
    assert not generator.engine.scheduler.has_unfinished()
    (result,) = generator.generate([[5, 6, 7]], params)
    assert result.num_prompt_tokens == 3
    assert not generator.engine.results


@pytest.mark.parametrize(("sampler", "stop", "message"), [
    (object(), None, "sampler must be a Sampler or None, got object"),
    ("greedy", None, "sampler must be a Sampler or None, got str"),
    (None, 42, "stop must be a callable or None, got int"),
])
def test_engine_refuses_a_sampler_or_stop_it_cannot_call(
        sampler: object, stop: object, message: str) -> None:
    """A sampler that is no Sampler (or a stop that is no callable) was queued with its
    request, which then raised AttributeError (TypeError) in the middle of the step that
    sampled it, wedging the engine. Now TypeError, nothing queued."""
    engine = make_engine()
    with pytest.raises(TypeError, match=message):
        engine.add_request(Request("a", [1, 2, 3], 2), sampler, stop)  # type: ignore[arg-type]
    assert not engine.scheduler.waiting and not engine.results
    engine.add_request(Request("a", [1, 2, 3], 2))
    assert engine.run()["a"].finished


def test_a_finished_request_id_queued_again_fetches_from_the_remote_tier() -> None:
    """A request id queued again once its request finished (a new request) never looked
    the remote tier up: the engine remembered the id as fetched for ever (and kept every id
    it ever saw). Now the new request fetches the prefix a peer wrote."""
    backend: dict[str, bytes] = {}
    writer = make_engine(InMemoryRemoteStore, backend)
    writer.add_request(Request("w", PREFIX, 2))
    writer.run()
    engine = make_engine(InMemoryRemoteStore, backend)
    engine.add_request(Request("a", [200, 201, 202, 203, 204], 2))
    engine.run()
    assert engine.remote is not None and engine.remote.num_fetched_blocks == 0
    engine.add_request(Request("a", PREFIX + [9], 2))
    engine.run()
    assert engine.remote.num_fetched_blocks == 5  # the whole prefix, from the store
    assert engine.results["a"].num_remote_tokens == 5 * TPB
    engine.manager.check_invariants()


@pytest.mark.parametrize(("logits", "token"), [
    ([float("nan")] * 4, 0),
    ([0.0, float("nan"), 5.0, 1.0], 2),  # NaN ranks lowest
    ([0.0, float("inf"), float("nan"), 3.0], 1),  # +inf highest
    ([float("-inf")] * 4, 0),
])
def test_sampling_logits_with_nan_or_inf_takes_the_greedy_token(logits: list[float],
                                                                token: int) -> None:
    """A sampler at temperature > 0 given logits with NaN or inf (a model's numbers
    overflowed): ``torch.multinomial`` raised RuntimeError ('probability tensor contains
    either inf, nan or element < 0'). Now the greedy token."""
    torch = pytest.importorskip("torch", reason="sampling needs torch")
    from kvtier.model.sampling import Sampler, SamplingParams

    sampler = Sampler(SamplingParams(temperature=0.7, top_p=0.9, seed=1))
    assert sampler.sample(torch.tensor(logits)) == token


@pytest.mark.parametrize(("field", "value", "message"), [
    # math.isfinite(10**400) raised OverflowError.
    ("temperature", 10**400, "temperature must be a finite number >= 0, got an int of 1329 bits"),
    # Taken, then Sampler() raised torch's 'Overflow when unpacking long long' (kvtier
    # generate --seed 10**23: that sentence, naming no option).
    ("seed", 2**64, "seed must be an integer in 0..2**32-1 or None, got 18446744073709551616"),
    # Red team 32b: a negative seed wrapped (-1 drew what 2**32-1 drew), and torch keeps a
    # seed's low 32 bits (2**32 drew what 0 drew).
    ("seed", 2**32, "seed must be an integer in 0..2**32-1 or None, got 4294967296"),
    ("seed", -1, "seed must be an integer in 0..2**32-1 or None, got -1"),
])
def test_sampling_params_refuse_what_a_sampler_cannot_use(field: str, value: object,
                                                          message: str) -> None:
    """SamplingParams refuses, naming the field, what would fail later or unnamed."""
    pytest.importorskip("torch", reason="sampling needs torch")
    from kvtier.model.sampling import SamplingParams

    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_an_engine_whose_model_computes_nan_still_finishes_every_request() -> None:
    """A model whose weights hold NaN (its logits are NaN) under a sampling request: the
    sampler raised in the middle of the step and every later step was refused. Now each
    request finishes (with the greedy token 0), nothing left live."""
    from kvtier.model.sampling import Sampler, SamplingParams

    engine = make_engine()
    engine.model.embed.fill_(float("nan"))
    for i in range(2):
        engine.add_request(Request(f"r{i}", [1, 2, 3 + i], 3),
                           Sampler(SamplingParams(temperature=1.0, seed=i)))
    results = engine.run()
    assert [results[f"r{i}"].output for i in range(2)] == [[0, 0, 0]] * 2
    assert engine.manager.num_sequences == 0
    engine.manager.check_invariants()


# ---- the remote tier: a store client that raises is a miss, never a wedge -------------------


class RaisingStore(InMemoryRemoteStore):
    """A caller's store client past the contract: every call raises its backend's error."""

    def get_many(self, hashes: Iterable[int]) -> dict[int, memoryview]:
        raise ConnectionError("the store is down")

    def put_many(self, items: object) -> int:
        raise TimeoutError("the store timed out")


def test_a_prefetch_whose_lookup_raises_still_calls_back_with_a_miss() -> None:
    """``prefetch`` queued ``callback(self.get_many(...))``: a ``get_many`` that raised
    (a subclass's) skipped the callback, so the remote tier held that fetch pending for
    ever (one per request). Now the callback gets ``{}`` and the error is counted."""
    pytest.importorskip("torch", reason="a namespace's layout comes from the model package")
    from kvtier.model import ModelConfig

    store = RaisingStore(RemoteNamespace("tiny-llama", ModelConfig().kv_layout(TPB)))
    got: list[dict[int, memoryview]] = []
    assert store.prefetch([1, 2], got.append)
    assert store.flush(10.0)
    assert got == [{}]
    assert store.stats.num_errors == 1
    store.close()


def test_a_store_client_that_raises_is_a_miss_on_every_path_of_the_tier() -> None:
    """A remote tier over a store client that raises on every read and write (past the
    contract): the blocking fetch raised ConnectionError, a write that waits raised
    TimeoutError, and a background fetch never arrived (held pending for ever: its request
    waited out the whole deadline). Now each is a miss or nothing written, at once, and
    every request finishes by recompute."""
    engine = make_engine(RaisingStore, {})
    remote = engine.remote
    assert remote is not None
    remote.fetch_deadline_s = 3600.0  # a fetch that never arrives is never over
    assert remote.fetch(PREFIX + [7]) == 0
    assert remote.write(PREFIX, [0, 1, 2, 3, 4], wait=True) == 0
    assert remote.start_fetch("r", PREFIX + [7])
    assert remote.flush(10.0)
    assert remote.poll() == ["r"] and remote.num_waiting == 0
    for i in range(3):
        engine.add_request(Request(f"r{i}", PREFIX + [i], 2))
    results = engine.run()
    assert all(results[f"r{i}"].finished for i in range(3))
    assert remote.num_waiting == 0 and remote.num_fetched_blocks == 0
    engine.manager.check_invariants()


@pytest.mark.parametrize(("call", "message"), [
    # slot -1 read the last GPU slot: another block's bytes were stored under this
    # prompt's hash, served to every engine that fetched it.
    (lambda r: r.write(PREFIX, [0, 1, 2, 3, -1]), r"block_table\[4\] must be a GPU slot in "
                                                   r"0..31, got -1"),
    (lambda r: r.write(PREFIX, [32, 1, 2, 3, 4]), r"block_table\[0\] must be a GPU slot in "
                                                   r"0..31, got 32"),  # IndexError
    (lambda r: r.write(PREFIX, [0, True, 2, 3, 4]), r"block_table\[1\] .* got True"),
    (lambda r: r.write(PREFIX, [0, 1, 2, 3, 4], wait="no"), "wait must be a bool, got 'no'"),
    (lambda r: r.start_fetch(7, PREFIX), "request_id must be a non-empty str, got 7"),
    (lambda r: r.num_blocks_to_fetch(-5), "num_missing must be an int >= 0, got -5"),
])
def test_remote_tier_calls_with_bad_arguments_are_refused_changing_nothing(
        call: Callable[[RemoteTier], object], message: str) -> None:
    """A block table slot that is no GPU slot, a wait that is no bool, a request id that
    is no str, a negative count: ValueError naming it, nothing written to the store."""
    backend: dict[str, bytes] = {}
    engine = make_engine(InMemoryRemoteStore, backend)
    assert engine.remote is not None
    with pytest.raises(ValueError, match=message):
        call(engine.remote)
    assert engine.remote.flush(10.0)
    assert backend == {} and engine.remote.num_written_blocks == 0
    assert engine.remote.num_waiting == 0


# ---- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(("device", "shown"), [
    ("meta", "device 'meta' holds no data"),
    ("cuda:0", "device 'cuda:0' cannot be used here"),
])
def test_generate_on_a_device_this_machine_cannot_use_is_one_line(device: str,
                                                                   shown: str) -> None:
    """``kvtier generate --device cuda`` on a machine without CUDA ended in torch's
    AssertionError ('Torch not compiled with CUDA enabled'), status 70; ``--device meta``
    loaded the model and failed in its first forward pass. Now status 2 in one line, before
    any weight is read."""
    torch = pytest.importorskip("torch", reason="kvtier generate needs the model extra")
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, stderr = run_cli(["generate", "--raw", "--device", device, "hi"])
    assert_one_line_refusal(code, stderr, shown)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("argv", [
    ["replay", "--no-progress", "{dir}/trace.jsonl"],
    ["replay", "--no-progress", "{dir}/trace.csv"],
    ["compare", "--no-progress", "{dir}/trace.jsonl"],
    ["generate", "--jsonl", "{dir}/trace.jsonl"],
])
def test_a_fifo_for_an_input_file_is_refused_not_waited_on(tmp_path: Path,
                                                           argv: list[str]) -> None:
    """A FIFO named as the trace (or generate's --jsonl): the read blocked until a writer
    came, for ever if none did (a device like /dev/zero never ended). Now status 2 in one
    line, at once."""
    for name in ("trace.jsonl", "trace.csv"):
        os.mkfifo(tmp_path / name)
    argv = [a.format(dir=tmp_path) for a in argv]
    code, stderr = run_cli(argv)
    assert_one_line_refusal(code, stderr, "not a regular file (a FIFO, socket or device)",
                            str(tmp_path))


@pytest.mark.parametrize("call", ["encode", "encode_chat"])
def test_text_of_bytes_that_were_not_utf8_is_a_value_error(call: str) -> None:
    """A prompt or chat line read from bytes that are not UTF-8 (Python keeps them as lone
    surrogates): the tokenizer raised TypeError ('TextInputSequence must be str') and
    ``kvtier generate`` / ``chat`` ended in an internal error (status 70). Now ValueError,
    which the commands report in one line (status 2)."""
    tokenizers = pytest.importorskip("tokenizers", reason="the model extra")
    from kvtier.model.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"hi": 0, "?": 1},
                                                               unk_token="?"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = Tokenizer(backend, [0], "{% for m in messages %}{{ m.content }} {% endfor %}")
    text = "hi \udcff"
    with pytest.raises(ValueError, match=r"is not valid Unicode text \(character \d+: bytes "
                                         "that are not UTF-8\\?\\)"):
        if call == "encode":
            tokenizer.encode(text)
        else:
            tokenizer.encode_chat([{"role": "user", "content": text}])
    assert tokenizer.encode("hi hi") == [0, 0]


@pytest.mark.parametrize(("line", "current"), [
    ("/switch \u00b2", 0),  # '²'.isdigit() is True; int('²') raised ValueError (status 70)
    ("/switch -1", 0),
    ("/switch 1", 1),
])
def test_chat_switch_takes_what_int_reads_as_a_conversation(line: str, current: int) -> None:
    """``/switch ²`` in ``kvtier chat`` ended the session in an internal error."""
    from kvtier.cli_generate import _switch

    assert _switch(line, 2, 0) == current


@pytest.mark.parametrize(("argv", "shown"), [
    # matplotlib's ValueError ('Format txt is not supported'), after the whole sweep: 70.
    (["sweep", "--plot", "{dir}/hit.txt"], "--plot {dir}/hit.txt: matplotlib writes no '.txt'"),
    # These failed after the run, the results lost (the table comes after the file).
    (["sweep", "--plot", "{dir}/none/hit.png"],
     "--plot {dir}/none/hit.png: cannot write it (there is no directory {dir}/none)"),
    (["replay", "--json", "{dir}/none/out.json"],
     "--json {dir}/none/out.json: cannot write it (there is no directory {dir}/none)"),
    (["compare", "--json", "{dir}"], "--json {dir}: cannot write it (it is a directory)"),
])
def test_an_output_file_that_cannot_be_written_is_refused_before_the_run(
        tmp_path: Path, argv: list[str], shown: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--json / --plot files that cannot be written are refused in one line before anything
    is simulated (the simulation is not even started)."""
    if "--plot" in argv:
        pytest.importorskip("matplotlib", reason="--plot needs the plot extra")
    import kvtier.cli

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the simulation ran")

    monkeypatch.setattr(kvtier.cli, "simulate", never)
    argv = [a.format(dir=tmp_path) for a in argv] + ["--no-progress", "--limit", "3"]
    code, stderr = run_cli(argv)
    assert_one_line_refusal(code, stderr, shown.format(dir=tmp_path))


# ---- the simulator's workloads ----------------------------------------------------------------


def test_a_zipf_exponent_past_the_float_range_picks_the_first_system_prompt() -> None:
    """``PrefixModel(zipf_exponent=2000)``: ``2 ** 2000.0`` raised OverflowError when the
    workload was first iterated. Now a weight past the float range is 0: every session
    opens with system prompt 0 (token ids from 0)."""
    chat = SyntheticChat(num_requests=20, prefix_model=PrefixModel(zipf_exponent=2000.0),
                         max_prompt_tokens=10_000)
    assert [r.prompt[0] for r in chat] == [0] * 20


@pytest.mark.parametrize(("build", "message"), [
    # 10**6 system prompts of 1,000+ tokens were built before the first request
    # (minutes and gigabytes); 10**9 tokens in one prompt, likewise.
    (lambda: PrefixModel(num_system_prompts=10**6, min_system_prompt_tokens=1000),
     "num_system_prompts x min_system_prompt_tokens must be at most 16,777,216 tokens"),
    (lambda: PrefixModel(min_system_prompt_tokens=10**9, max_system_prompt_tokens=10**9),
     "min_system_prompt_tokens must be an integer in 1..16777216, got 1000000000"),
    (lambda: SyntheticChat(max_user_turn_tokens=10**9, max_prompt_tokens=2 * 10**9),
     "max_user_turn_tokens must be an integer in 200..16777216"),
    (lambda: AgenticWorkload(num_agent_types=10**5, min_tool_spec_tokens=3000),
     "num_agent_types x min_tool_spec_tokens must be at most"),
    (lambda: AgenticWorkload(max_tool_output_tokens=10**9),
     "max_tool_output_tokens must be an integer in 50..16777216"),
    # A rate this low drew an infinite gap (or one past any arrival a replay can time):
    # refused mid-run as some request's arrival_s.
    (lambda: SyntheticChat(arrival_rate_per_s=1e-320),
     "arrival_rate_per_s must be at least 1e-10"),
    (lambda: AgenticWorkload(session_rate_per_s=1e-12),
     "session_rate_per_s must be at least 1e-10"),
    (lambda: AgenticWorkload(max_step_gap_s=1e308), "max_step_gap_s must be at most 1e+10 s"),
])
def test_workload_sizes_and_rates_that_cannot_run_are_refused_when_made(
        build: Callable[[], object], message: str) -> None:
    """What no replay could run is refused naming the field, when the workload is made."""
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


@pytest.mark.parametrize(("suffix", "text", "shown"), [
    # Replayed with arrivals at 1e297 s: every latency came out 0.0 ms, exit 0.
    (".jsonl", '{"timestamp": 1e300, "input_length": 600, "output_length": 4, '
               '"hash_ids": [1, 2]}\n',
     "field 'timestamp': 1e+300 is 1e+297 s, more than the 1e+10 s"),
    (".csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,10,5\n"
             "9023-11-16 18:15:46.6805900,10,5\n", "is more than 1e+10 s after the first row"),
])
def test_trace_arrivals_past_the_virtual_clocks_precision_name_the_line(
        tmp_path: Path, suffix: str, text: str, shown: str) -> None:
    """A trace whose arrivals are past 1e10 s is refused by line, in one line (status 2)."""
    trace = tmp_path / f"trace{suffix}"
    trace.write_text(text)
    code, stderr = run_cli(["replay", str(trace), "--no-progress", "--gpu-blocks", "64"])
    assert_one_line_refusal(code, stderr, shown, ":3" if suffix == ".csv" else ":1")


# ---- the scheduler -------------------------------------------------------------------------


def test_a_prompt_past_the_budget_without_chunked_prefill_is_refused() -> None:
    """Without chunked prefill a prompt of more than ``max_num_tokens`` tokens can never be
    admitted; once it has waited ``max_wait_steps`` steps nothing behind it is admitted
    either, and every request waited for ever (a replay ended 'made no progress'). Now it
    is refused when queued, naming the budget (the fix is scheduler.py's)."""
    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=32))
    scheduler = Scheduler(manager, SchedulerConfig(max_num_tokens=8, max_wait_steps=1,
                                                   enable_chunked_prefill=False))
    scheduler.add_request(Request("small", [1, 2], 1))
    with pytest.raises(ValueError, match=r"'long' .* 9 prompt tokens .* max_num_tokens is 8"):
        scheduler.add_request(Request("long", list(range(9)), 1))
    for _ in range(4):
        scheduler.update(scheduler.step(), {"small": 5})
    assert not scheduler.has_unfinished()


# ---- vLLM's secondary tier (StoreTier, no vLLM needed): a store's answer of the wrong type --


def make_store_tier(answers: dict[str, object]) -> tuple[StoreTier, memoryview]:
    """A StoreTier of 8 pages of 64 bytes (pages 0 and 1 filled) over an in-memory store
    whose methods named in ``answers`` answer that instead."""
    from kvtier.integrations.vllm.keys import EngineLayout

    layout = EngineLayout(model="m", kv_dtype="float16", page_bytes=64, tokens_per_hash=16,
                          blocks_per_chunk=1, groups=((16, 2),), tp_size=1, pp_size=1,
                          pcp_size=1, dcp_size=1, rank=0)
    methods = {name: answering(value) for name, value in answers.items()}
    store = type("Answers", (InMemoryRemoteStore,), methods)(layout.namespace())
    view = memoryview(bytearray(64 * 8))
    view[0:128] = bytes([7]) * 64 + bytes([8]) * 64
    return StoreTier(store, view, 64, max_lookup_wait_s=60.0), view


@pytest.mark.parametrize(("field", "value", "message"), [
    ("groups", (), "groups must be a non-empty tuple"),
    ("groups", "xx", "groups must be a non-empty tuple"),  # named a namespace of ['x'], ['x']
    ("groups", ((0, 2),), "groups must be a non-empty tuple"),
    ("groups", ((True, 2),), "groups must be a non-empty tuple"),
    ("groups", ((16, object()),), "groups must be a non-empty tuple"),  # json.dumps raised
    ("replicated_layout", "yes", "replicated_layout must be a bool, got 'yes'"),
    ("kv_cache_layout", 5, "kv_cache_layout must be a str or None, got 5"),
])
def test_engine_layout_refuses_what_no_engine_has(field: str, value: object,
                                                  message: str) -> None:
    """Every field of a vLLM engine's layout is checked when it is built, as the counts
    were: the groups and the layout flags were taken as they came (garbage named a
    namespace of its own, or raised TypeError when the namespace was first named)."""
    from kvtier.integrations.vllm.keys import EngineLayout

    fields: dict[str, object] = dict(
        model="m", kv_dtype="float16", page_bytes=64, tokens_per_hash=16, blocks_per_chunk=1,
        groups=((16, 2),), tp_size=1, pp_size=1, pcp_size=1, dcp_size=1, rank=0)
    fields[field] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineLayout(**fields)  # type: ignore[arg-type]


def test_a_tenant_that_is_no_str_is_named() -> None:
    """The tier's ``tenant`` option of another type was refused as 'salt_scope must be None
    or a str', a name the tier's options do not have."""
    from kvtier.integrations.vllm.keys import EngineLayout

    layout = EngineLayout(model="m", kv_dtype="float16", page_bytes=64, tokens_per_hash=16,
                          blocks_per_chunk=1, groups=((16, 2),), tp_size=1, pp_size=1,
                          pcp_size=1, dcp_size=1, rank=0)
    with pytest.raises(ValueError, match="tenant must be a str or None, got 5"):
        layout.namespace(5)  # type: ignore[arg-type]
    assert layout.namespace("a") != layout.namespace(None)


def answering(value: object) -> Callable[..., object]:
    """A method that answers ``value`` whatever it is asked."""
    return lambda self, *args: value


def vllm_key(i: int) -> bytes:
    return i.to_bytes(32, "big") + bytes(4)


@pytest.mark.parametrize("present", [None, 7, "abc"])
def test_a_probe_answered_with_no_set_is_a_miss_not_an_exception(present: object) -> None:
    """``contains_many`` answering None (or any non-set) was queued as the probe's result,
    and the next ``lookup`` raised TypeError ('argument of type NoneType is not iterable')
    into vLLM's scheduler step. Now the probed keys are absent: MISS."""
    tier, _ = make_store_tier({"contains_many": present})
    assert tier.lookup(vllm_key(1), "r") == "retry"
    tier.flush()
    tier.drain()
    assert tier.lookup(vllm_key(1), "r") == "miss"
    assert not tier.has_pending_work()
    tier.check_invariants()
    tier.close()


@pytest.mark.parametrize("found", [
    None, [1, 2], {"x": 1},
    {"any": 0},  # replaced below by each key's hash: a value that is no buffer
    {"any": "a" * 64},  # a str of the page's length
    {"any": memoryview(bytearray(256)).cast("I")},  # 64 items of 4 bytes: 256 bytes
])
def test_a_load_answered_with_garbage_fails_its_job_instead_of_losing_it(found: object) -> None:
    """``get_many`` answering no dict, or values that are no page (an int, a str of the
    page's length, a view of 64 wide items) raised on the I/O thread: the load job never
    reported, stayed in flight for ever (``has_pending_work`` True: vLLM waits on it, its
    CPU pages pinned). Now the job fails, every key a miss from then on, nothing pending."""
    from kvtier.integrations.vllm.keys import fold_key

    if isinstance(found, dict) and "any" in found:
        found = {fold_key(vllm_key(1)): found["any"]}
    tier, view = make_store_tier({"get_many": found})
    tier.submit_load(5, [vllm_key(1)], [3])
    tier.drain()
    assert tier.finished_jobs() == [JobOutcome(5, False, [], ANY, 0)]
    assert not tier.has_pending_work() and tier.stats.num_job_errors == 0
    assert bytes(view[192:256]) == bytes(64)  # page 3 untouched
    tier.check_invariants()
    tier.close()


@pytest.mark.parametrize("written", [None, "2", 3])
def test_a_store_job_answered_with_no_count_fails_instead_of_being_lost(written: object) -> None:
    """``put_many`` answering no count of the pages written (None, a str, more than it was
    given) raised TypeError on the I/O thread (``max(None, 0)``) or counted pages
    never written: the store job never reported. Now it fails, nothing pending."""
    tier, _ = make_store_tier({"put_many": written, "contains_many": set()})
    tier.submit_store(9, [vllm_key(1), vllm_key(2)], [0, 1])
    tier.drain()
    assert tier.finished_jobs() == [JobOutcome(9, False, None, ANY, 0)]
    assert not tier.has_pending_work() and tier.stats.num_job_errors == 0
    tier.check_invariants()
    tier.close()


# ---- a random sequence of public calls, good and bad, against the books ---------------------

IDS = ("a", "b", "c", "d")
NUM_GPU_BLOCKS = 12
# Retention by token range: runs a release cuts where its blocks' priorities differ.
RETENTIONS = st.builds(
    lambda start, length, priority, decode: Retention(
        (RetentionRange(start, start + length, priority),), decode_priority=decode),
    st.integers(0, 8), st.integers(1, 8), st.integers(0, 100), st.none() | st.integers(0, 100))


class ManagerCalls(RuleBasedStateMachine):
    """Random public calls on a small manager, in any order, many of them refused (unknown
    or finished ids, a second begin_step, bad counts, a batch with one id twice, a failed
    plan reported twice): a refused call changes nothing; after every call the books hold,
    and a fresh request that fits the free blocks is admitted with exactly its lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.manager = KVCacheManager(
            CacheConfig(tokens_per_block=TPB, num_gpu_blocks=NUM_GPU_BLOCKS, num_host_blocks=6,
                        enable_events=True), clock=lambda: 0.0)
        self.plans: list[TransferPlan] = []
        self.num_probes = 0

    def snapshot(self) -> tuple[object, ...]:
        m = self.manager
        return (m.version, m.num_free_gpu_blocks, m.num_reserved_blocks, m.num_free_host_blocks,
                [(b.block_hash, b.tier, b.slot) for b in m.cached_blocks()],
                {rid: m.block_table(rid) for rid in IDS if m.has_sequence(rid)},
                {rid: m.num_unscheduled_tokens(rid) for rid in IDS if m.has_sequence(rid)})

    def call(self, op: Callable[[], object]) -> None:
        """``op()``; if it refuses (the documented errors), nothing may have changed."""
        before = self.snapshot()
        try:
            op()
        except (ValueError, TypeError, KeyError, RuntimeError):
            assert self.snapshot() == before

    @rule(items=st.lists(st.tuples(st.sampled_from(IDS), st.lists(st.integers(0, 2),
                                                                   max_size=14),
                                   st.none() | st.integers(1, 14), st.integers(0, 3),
                                   st.none() | RETENTIONS),
                         max_size=3))
    def add_batch(self, items: list[tuple[str, list[int], int | None, int,
                                          Retention | None]]) -> None:
        specs = [SequenceSpec(rid, tokens, num_new_tokens=num_new, num_reserved_blocks=reserve,
                              retention=retention)
                 for rid, tokens, num_new, reserve, retention in items if tokens]
        self.call(lambda: self.manager.add_sequence_batch(specs))

    @rule(rid=st.sampled_from(IDS), num_tokens=st.integers(-1, 8))
    def schedule_prefill(self, rid: str, num_tokens: int) -> None:
        self.call(lambda: self.manager.schedule_prefill(rid, num_tokens))

    @rule(rid=st.sampled_from(IDS), tokens=st.lists(st.integers(0, 2), max_size=6))
    def append_tokens(self, rid: str, tokens: list[int]) -> None:
        self.call(lambda: self.manager.append_tokens(rid, tokens))

    @rule(items=st.lists(st.tuples(st.sampled_from(IDS), st.integers(0, 2)), max_size=4))
    def append_token_batch(self, items: list[tuple[str, int]]) -> None:
        self.call(lambda: self.manager.append_token_batch(items))

    @rule(rid=st.sampled_from(IDS), num_tokens=st.integers(-1, 9))
    def reserve_lookahead(self, rid: str, num_tokens: int) -> None:
        self.call(lambda: self.manager.reserve_lookahead(rid, num_tokens))

    @rule(rid=st.sampled_from(IDS), store=st.booleans())
    def remove(self, rid: str, store: bool) -> None:
        self.call(lambda: self.manager.remove_sequence(rid, store))

    @rule(begin=st.booleans())
    def step_bound(self, begin: bool) -> None:
        if begin:
            self.call(self.manager.begin_step)
        else:
            self.call(lambda: self.plans.append(self.manager.end_step()))

    @rule(data=st.data())
    def fail_a_plan(self, data: st.DataObject) -> None:
        self.plans.append(self.manager.take_plan())
        plan = data.draw(st.sampled_from(self.plans))
        if len(plan):
            failed = data.draw(st.lists(st.integers(0, len(plan) - 1), max_size=3))
            self.call(lambda: self.manager.transfer_failed(plan, failed))

    @rule(tokens=st.lists(st.integers(0, 2), max_size=14), num_blocks=st.integers(0, 4))
    def import_blocks(self, tokens: list[int], num_blocks: int) -> None:
        self.call(lambda: self.manager.import_blocks(tokens, num_blocks))

    @rule()
    def reset(self) -> None:
        self.manager.reset_cache()

    @rule(num_blocks=st.integers(1, NUM_GPU_BLOCKS))
    def probe(self, num_blocks: int) -> None:
        """A fresh prompt (ids no other request has) that fits the free blocks is admitted,
        reusing exactly what lookup promised (nothing), and leaves without a trace."""
        m = self.manager
        assume(num_blocks <= m.num_free_gpu_blocks)
        self.num_probes += 1
        tokens = [1000 + self.num_probes] * (num_blocks * TPB)
        promised = m.lookup(tokens)
        (admission,) = m.add_sequence_batch([SequenceSpec("probe", tokens)])
        assert admission.admitted and len(admission.block_ids) == num_blocks
        assert admission.num_reused_tokens == promised.num_tokens == 0
        m.remove_sequence("probe", store_for_reuse=False)

    @invariant()
    def books_hold(self) -> None:
        self.manager.check_invariants()
        assert not self.manager.has_sequence("probe")


def test_random_public_calls_keep_the_books_and_admit_what_fits() -> None:
    """See ``ManagerCalls``."""
    run_state_machine_as_test(ManagerCalls, settings=settings(
        max_examples=60, stateful_step_count=40, deadline=None))


# ---- abort: a client gone mid-request ------------------------------------------------------

def test_an_engine_aborts_a_running_request_and_the_others_are_unchanged() -> None:
    """``ModelEngine.abort`` of a request that shares its prefix with another, after its
    first token: its result is finished ("abort", the output so far), the manager holds it
    no more, and the other request's tokens are exactly what it makes alone."""
    from kvtier import Request

    alone = make_engine()
    alone.add_request(Request("b", PREFIX + [9, 8], 4))
    expected = alone.run()["b"].output

    engine = make_engine()
    engine.add_request(Request("a", PREFIX + [1, 2], 6))
    engine.add_request(Request("b", PREFIX + [9, 8], 4))
    engine.step()
    result = engine.abort("a")
    assert result is not None and result.finished and result.stop_reason == "abort"
    assert len(result.output) == 1
    assert not engine.manager.has_sequence("a") and engine.abort("a") is None
    engine.manager.check_invariants()
    results = engine.run()
    assert results["b"].output == expected and results["b"].stop_reason == "length"
    engine.manager.check_invariants()


# ---- a caller's sampler or stop function that faults mid-step ------------------------------

@pytest.mark.parametrize("fault", ["raises", "no int", "past the vocabulary", "stop raises"])
def test_a_faulting_sampler_or_stop_ends_its_request_and_the_engine_goes_on(
    fault: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A caller's ``Sampler`` subclass whose ``sample`` raises or answers no token of the
    vocabulary at its second token, or a ``stop`` that raises: that request ends there
    ("error", its output so far and the greedy token, the reason kept), logged; the other
    request's tokens are exactly what it makes alone, and later steps run. Before, the
    fault came out between the scheduler's step and update: every later step was refused
    ("step() called before update()")."""
    import logging

    from kvtier import Request
    from kvtier.model.sampling import Sampler, SamplingParams

    class Faulty(Sampler):
        num_calls = 0

        def sample(self, logits: Any) -> int:
            self.num_calls += 1
            if self.num_calls == 2:
                if fault == "raises":
                    raise RuntimeError("sampler broke")
                return "x" if fault == "no int" else 10**6  # type: ignore[return-value]
            return super().sample(logits)

    def stop(output: Sequence[int]) -> bool:
        if len(output) == 2:
            raise RuntimeError("stop broke")
        return False

    alone = make_engine()
    alone.add_request(Request("b", PREFIX + [9, 8], 4))
    expected = alone.run()["b"].output

    engine = make_engine()
    if fault == "stop raises":
        engine.add_request(Request("a", PREFIX + [1, 2], 6), stop=stop)
    else:
        engine.add_request(Request("a", PREFIX + [1, 2], 6),
                           sampler=Faulty(SamplingParams(temperature=0.0)))
    engine.add_request(Request("b", PREFIX + [9, 8], 4))
    with caplog.at_level(logging.ERROR, logger="kvtier.model.engine"):
        results = engine.run()
    a = results["a"]
    assert a.finished and a.stop_reason == "error" and len(a.output) == 2
    assert a.error is not None and ("broke" in a.error or "sample returned" in a.error)
    assert [r.getMessage().startswith("kvtier: request 'a' ends") for r in caplog.records] == [True]
    assert results["b"].output == expected and results["b"].stop_reason == "length"
    assert not engine.manager.has_sequence("a")
    engine.manager.check_invariants()
