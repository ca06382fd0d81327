"""More of vLLM's own v1 tests, mirrored against kvtier: what the earlier mirrors left out of
``tests/v1/core/test_prefix_caching.py`` (a decoded block's extra keys, events of stores
that store nothing), ``tests/v1/core/test_scheduler.py`` (long prefills under a chunk cap,
drafts beside prefill chunks and at the output length, prefix-cache queries counted once,
chunked prefill off), ``tests/v1/core/test_async_scheduler.py`` (tokens scheduled to the
output length, a next turn's reuse) and ``tests/v1/kv_offload/test_cpu_manager.py`` (a
block whose store is in flight, blocks already stored when the rest is stored).

Each test names the vLLM test it mirrors and asserts kvtier's exact answer; where kvtier
differs by design the test says so and asserts kvtier's. The mapping is the earlier
mirrors': ``get_computed_blocks`` is ``lookup``, ``allocate_slots`` is admission,
``num_scheduled_tokens`` are a step's chunks, ``max_num_batched_tokens`` is
``max_num_tokens`` and ``long_prefill_token_threshold`` is ``max_chunk_tokens``.
"""

from __future__ import annotations

from kvtier import (
    BlockRemoved,
    BlockStored,
    MultimodalItem,
    Request,
    Scheduler,
    SchedulerConfig,
    SequenceSpec,
)
from kvtier.hashing import encode_key, get_hash_fn, prompt_block_hashes
from kvtier.scheduled_step import ScheduledStep
from kvtier.sequence import block_extras
from peer_mirror.mirror_helpers import admit, blocks_of, hit, make_manager, release

HASH = get_hash_fn("xxh3_128")


def sample_all(sched: Scheduler, step: ScheduledStep, token: int = 0) -> None:
    """Apply ``step`` with ``token`` sampled by every request that samples in it."""
    ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
    sched.update(step, {rid: token for rid in ids})
    sched.manager.check_invariants()


def test_a_decoded_block_holding_part_of_an_image_is_keyed_by_it() -> None:
    """Mirrors test_prefix_caching.py::test_mm_prefix_caching's decode (the image "ccc" at
    offset 48 lies in the block that 5 decoded tokens complete: that block's hash carries
    ``("ccc", 0)``). A 14-token prompt with an image at tokens 12-13 stores 3 blocks; the 2
    decoded tokens complete block 3, stored with the image as its extra key (offset 0 in
    the block) and chained on block 2. The prompt and output again hit all 4 blocks with
    the same image, 3 with another image or none."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True)
    ccc = MultimodalItem(12, 2, "ccc")
    prompt = [*range(12), 7, 7]
    admit(mgr, "0", prompt, mm_items=(ccc,))
    assert [type(e) for e in mgr.drain_events()] == [BlockStored] * 3
    assert mgr.append_tokens("0", [8, 8]) == []
    (decoded,) = mgr.drain_events()
    full = [*prompt, 8, 8]
    extras = block_extras((ccc,), len(full), 4)
    assert extras == [None, None, None, (("ccc", 0),)]
    want = prompt_block_hashes(HASH, full, 4, extras=extras)
    assert isinstance(decoded, BlockStored)
    assert (decoded.block_hash, decoded.parent_hash, decoded.token_ids) == (
        want[3], want[2], (7, 7, 8, 8))
    assert decoded.extra_key == encode_key((("ccc", 0),))
    release(mgr, "0")
    assert hit(mgr, [*full, 0], mm_items=(ccc,)) == 16
    assert hit(mgr, [*full, 0], mm_items=(MultimodalItem(12, 2, "ddd"),)) == 12
    assert hit(mgr, [*full, 0]) == 12


def test_a_decoded_block_of_a_salted_prompt_continues_the_salted_chain() -> None:
    """Mirrors test_prefix_caching.py::test_cache_key_salting's decode (the block 5 decoded
    tokens complete is hashed with no extra key of its own, chained on the salted block 2):
    the decoded block's event names no extra key and the salt's key space, its hash is the
    salted chain's fourth; the same salt then hits all 4 blocks, another salt or none
    nothing."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True)
    prompt = [*blocks_of(1, 2, 3), 4, 4]
    admit(mgr, "0", prompt, salt="salt1")
    mgr.drain_events()
    assert mgr.append_tokens("0", [4, 4]) == []
    (decoded,) = mgr.drain_events()
    full = [*prompt, 4, 4]
    want = prompt_block_hashes(HASH, full, 4, salt="salt1")
    assert isinstance(decoded, BlockStored)
    assert (decoded.block_hash, decoded.parent_hash) == (want[3], want[2])
    assert (decoded.extra_key, decoded.salt_key) == (None, encode_key("salt1"))
    release(mgr, "0")
    assert hit(mgr, [*full, 0], salt="salt1") == 16
    assert hit(mgr, [*full, 0], salt="salt2") == 0
    assert hit(mgr, [*full, 0]) == 0


def test_a_store_of_no_new_block_reports_nothing() -> None:
    """Mirrors test_prefix_caching.py::test_masked_block_does_not_emit_empty_stored_event
    and test_emit_cached_block_events_zero_cached (a store that stores no block emits no
    event, not an empty BlockStored): a prompt shorter than a block, a decode that fills no
    block, and a prompt whose every full block is reused report nothing; the one block a
    5-token prompt fills is reported once."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True)
    admit(mgr, "short", [1, 2])
    assert mgr.append_tokens("short", [9]) == []  # 3 of the block's 4 tokens
    assert mgr.drain_events() == []
    admit(mgr, "one", [1, 2, 3, 4, 5])
    assert [(type(e), e.num_tokens) for e in mgr.drain_events()
            if isinstance(e, BlockStored)] == [(BlockStored, 4)]
    release(mgr, "short", "one")
    admit(mgr, "again", [1, 2, 3, 4, 5])
    assert mgr.drain_events() == []


def test_long_prefills_are_capped_and_share_one_budget() -> None:
    """Mirrors test_scheduler.py::test_schedule_concurrent_partial_requests (budget 1024,
    threshold 400, three 800-token prompts: 400, 400, 224 in each of the first two steps;
    then the first two decode one token each and the third computes its last 352)."""
    mgr = make_manager(tokens_per_block=16, num_gpu_blocks=200)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=1024, max_chunk_tokens=400))
    for i in range(3):
        sched.add_request(Request(str(i), list(range(1000 * i, 1000 * i + 800)),
                                  max_output_tokens=4))
    steps = []
    for _ in range(3):
        step = sched.step()
        steps.append(([(c.request_id, c.first_token, c.num_tokens)
                       for c in step.context_chunks], step.decode_request_ids,
                      step.num_scheduled_tokens))
        sample_all(sched, step)
    assert steps == [
        ([("0", 0, 400), ("1", 0, 400), ("2", 0, 224)], (), 1024),
        ([("0", 400, 400), ("1", 400, 400), ("2", 224, 224)], (), 1024),
        ([("2", 448, 352)], ("0", "1"), 354)]


def test_drafts_wait_until_the_prefill_is_done() -> None:
    """Mirrors test_scheduler.py::test_no_spec_tokens_scheduled_for_prefill_chunks (budget
    50, 3 speculative tokens, an 80-token prompt: the second step schedules exactly the 30
    prompt tokens left, no drafts with them): drafts come only with decodes, 3 a step once
    the prompt is done."""
    mgr = make_manager(tokens_per_block=16, num_gpu_blocks=40)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=50, num_speculative_tokens=3))
    sched.add_request(Request("r", list(range(80)), max_output_tokens=10))
    seen = []
    for _ in range(3):
        step = sched.step()
        seen.append(([(c.first_token, c.num_tokens) for c in step.context_chunks],
                      step.decode_request_ids, step.num_draft_tokens,
                      step.num_scheduled_tokens))
        ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
        sched.update(step, {rid: [1] for rid in ids})
    assert seen == [([(0, 50)], (), (), 50), ([(50, 30)], (), (), 30),
                    ([], ("r",), (3,), 4)]


def test_drafts_never_reach_past_the_output_length() -> None:
    """Mirrors test_scheduler.py::test_stop_via_update_from_output's "stop on max tokens"
    (2 drafts for a request of at most 2 new tokens; the 3 tokens sampled are truncated to
    2). Differs by design: kvtier reserves only the drafts the output length leaves room
    for (one, for the request's last token but one), so a step never computes a token past
    it; a caller reporting more than the step's drafts allow is refused, changing
    nothing."""
    mgr = make_manager(num_gpu_blocks=16)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64, num_speculative_tokens=2))
    sched.add_request(Request("a", [1, 2, 3, 4, 5], max_output_tokens=3))
    sample_all(sched, sched.step(), 10)
    step = sched.step()
    assert (step.decode_request_ids, step.num_draft_tokens) == (("a",), (1,))
    try:
        sched.update(step, {"a": [11, 12, 13]})
    except ValueError as e:
        assert "a list of 1..2" in str(e)
    else:
        raise AssertionError("3 tokens for a step with 1 draft were taken")
    assert sched.running["a"].output == [10]
    (done,) = sched.update(step, {"a": [11, 12]})
    assert (done.request_id, done.output) == ("a", [10, 11, 12])
    assert not sched.has_unfinished() and mgr.num_sequences == 0


def test_a_refused_admission_is_no_query_until_it_is_admitted() -> None:
    """Mirrors test_scheduler.py::test_prefix_cache_stats_counted_once_for_retried_then_
    scheduled_request (a cache hit refused once by allocate_slots and admitted a step later
    is counted once, hits included): in a pool of 5 with 2 blocks held, a 13-token prompt
    hitting the 2 cached blocks is refused (counted as a rejection, no query); once the
    holder leaves it is admitted and counted once: 13 prompt tokens, 8 hit."""
    mgr = make_manager(num_gpu_blocks=5)
    admit(mgr, "seed", [*blocks_of(1, 2), 0])
    release(mgr, "seed")
    admit(mgr, "hog", blocks_of(7, 8))
    s = mgr.stats
    before = (s.num_admitted, s.num_prompt_tokens, s.num_reused_tokens)
    prompt = [*blocks_of(1, 2, 3), 0]
    assert not mgr.add_sequence(SequenceSpec("r", prompt)).admitted
    assert (s.num_admitted, s.num_prompt_tokens, s.num_reused_tokens) == before
    assert s.num_rejected == 1
    release(mgr, "hog")
    assert mgr.add_sequence(SequenceSpec("r", prompt)).num_reused_tokens == 8
    assert (s.num_admitted - before[0], s.num_prompt_tokens - before[1],
            s.num_reused_tokens - before[2]) == (1, 13, 8)


def test_a_held_request_is_counted_once_when_released() -> None:
    """Mirrors test_scheduler.py::test_prefix_cache_query_not_inflated_by_connector_defer
    (a request the connector defers three times is one query of its 32 tokens): a request
    held three steps (``hold``: waiting on a remote fetch) is no query while held, and one
    of 32 tokens once released and admitted."""
    mgr = make_manager(num_gpu_blocks=16)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=64))
    sched.add_request(Request("r", list(range(32)), max_output_tokens=2))
    sched.hold("r")
    for _ in range(3):
        step = sched.step()
        assert step.context_chunks == () and step.num_scheduled_tokens == 0
        sample_all(sched, step)
    assert (mgr.stats.num_admitted, mgr.stats.num_prompt_tokens) == (0, 0)
    sched.release("r")
    step = sched.step()
    assert [(c.request_id, c.num_tokens) for c in step.context_chunks] == [("r", 32)]
    assert (mgr.stats.num_admitted, mgr.stats.num_prompt_tokens) == (1, 32)


def test_without_chunked_prefill_a_long_prompt_does_not_hold_up_short_ones() -> None:
    """Mirrors test_scheduler.py::test_schedule_order with chunked prefill off (budget 1024,
    two 800-token prompts then two of 10: vLLM schedules only the first, not skipping the
    second long one). Differs by design: kvtier skips a prompt the budget left cannot hold
    without blocking the ones behind it (until it has waited ``max_wait_steps``), so the
    two short prompts go with the first long one: 820 tokens."""
    mgr = make_manager(tokens_per_block=16, num_gpu_blocks=200)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=1024, enable_chunked_prefill=False))
    for rid, n in (("1", 800), ("2", 800), ("3", 10), ("4", 10)):
        sched.add_request(Request(rid, [int(rid)] * n, max_output_tokens=4))
    step = sched.step()
    assert [(c.request_id, c.num_tokens) for c in step.context_chunks] == [
        ("1", 800), ("3", 10), ("4", 10)]
    assert [r.request_id for r in sched.waiting] == ["2"]


def test_a_block_whose_offload_is_in_flight_is_found_and_onboarded_after_it() -> None:
    """Mirrors test_cpu_manager.py::test_cpu_manager's ``prepare_store`` then ``lookup``
    before ``complete_store`` (a block being stored is not found until its store
    completes). Differs by design: kvtier hands out no store to complete; an offload is an
    op of the plan, and the plan runs its ops in order, so the block counts as a host hit
    at once and an admission reusing it onboards it after its offload in the same plan.
    Request a's 2 blocks are offloaded for b (host slots 0, 1); before the plan is taken a
    lookup finds both on the host, and request a2 onboards them (into GPU 3 and 2), each
    GPU victim going out to the host slot the onboard before it freed."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=4)
    prompt = [*blocks_of(1, 2), 0]
    admit(mgr, "a", prompt)
    release(mgr, "a")
    admit(mgr, "b", [*blocks_of(7, 8, 9), 0])
    m = mgr.lookup(prompt)
    assert (m.num_tokens, m.num_gpu_tokens, m.num_host_tokens) == (8, 0, 8)
    release(mgr, "b")
    a2 = admit(mgr, "a2", prompt)
    assert (a2.num_reused_tokens, a2.num_onboarded_tokens, tuple(a2.block_ids)) == (
        8, 8, (3, 2, 1))
    ops = [(op.kind.name, op.src_tier.name, op.src_slot, op.dst_tier.name, op.dst_slot)
           for op in mgr.take_plan().ops]
    assert ops == [("OFFLOAD", "GPU", 0, "HOST", 0), ("OFFLOAD", "GPU", 1, "HOST", 1),
                   ("ONBOARD", "HOST", 0, "GPU", 3), ("OFFLOAD", "GPU", 2, "HOST", 0),
                   ("ONBOARD", "HOST", 1, "GPU", 2), ("OFFLOAD", "GPU", 1, "HOST", 1)]


def test_blocks_already_stored_are_not_evicted_to_store_the_rest() -> None:
    """Mirrors test_cpu_manager.py::test_already_stored_block_not_evicted_during_prepare_store
    (storing [2, 3, 4, 5] when [2] is stored and the least recent must evict [1], not [2]):
    the host holds the first 2 blocks of a prompt (the oldest) and 2 blocks of another;
    importing the whole prompt evicts the other prompt's 2 blocks, never the prompt's own,
    and stores its blocks 3 and 4 in the slots freed; its fifth finds no room and is not
    imported. All 16 tokens are then host hits."""
    mgr = make_manager(num_gpu_blocks=4, num_host_blocks=4, enable_events=True)
    prompt = [*blocks_of(1, 2, 3, 4, 5), 0]
    assert mgr.import_blocks(prompt, 2) == [0, 1]
    assert mgr.import_blocks([*blocks_of(8, 9), 0], 2) == [2, 3]
    mgr.drain_events()
    assert mgr.import_blocks(prompt, 5) == [2, 3]
    assert [(type(e).__name__, e.tier.name) for e in mgr.drain_events()
            if isinstance(e, (BlockStored, BlockRemoved))] == [
        ("BlockRemoved", "HOST"), ("BlockRemoved", "HOST"),
        ("BlockStored", "HOST"), ("BlockStored", "HOST")]
    assert sorted((b.slot, b.tokens[0]) for b in mgr.cached_blocks()) == [
        (0, 1), (1, 2), (2, 3), (3, 4)]
    m = mgr.lookup(prompt)
    assert (m.num_tokens, m.num_host_tokens) == (16, 16)


def run_to_the_end(sched: Scheduler) -> tuple[int, dict[str, list[int]]]:
    """Serve every queued request to its end (each samples a token of its own); the tokens
    the steps scheduled, and each request's output."""
    scheduled = 0
    outputs: dict[str, list[int]] = {}
    n = 0
    while sched.has_unfinished():
        step = sched.step()
        scheduled += step.num_scheduled_tokens
        ids = [*step.decode_request_ids, *(c.request_id for c in step.context_chunks)]
        for req in sched.update(step, {rid: (7 * n + len(rid)) % 997 for rid in ids}):
            outputs[req.request_id] = req.output
        sched.manager.check_invariants()
        n += 1
    return scheduled, outputs


def test_no_step_schedules_a_token_past_the_output_length() -> None:
    """Mirrors test_async_scheduler.py::test_stop_by_max_tokens (two requests run to
    ``max_tokens``: the steps schedule exactly ``prompt + max_tokens - 1`` tokens each, the
    last sampled token is never computed), for 1, 2, 3 and 5 new tokens."""
    for max_tokens in (1, 2, 3, 5):
        mgr = make_manager(tokens_per_block=16, num_gpu_blocks=32)
        sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=1000))
        for i in range(2):
            sched.add_request(Request(str(i), list(range(100 * i, 100 * i + 20)),
                                      max_output_tokens=max_tokens))
        scheduled, outputs = run_to_the_end(sched)
        assert scheduled == 2 * (20 + max_tokens - 1), max_tokens
        assert sorted(len(o) for o in outputs.values()) == [max_tokens] * 2
        assert mgr.num_sequences == 0


def test_a_next_turn_reuses_the_prompt_and_the_output_of_the_last() -> None:
    """Mirrors test_async_scheduler.py::test_prefix_caching_for_multi_turn (blocks of 16:
    five 100-token prompts with 200 new tokens each; the next turn's prompts, each a prompt
    and its whole output, compute only ``300 % 16`` = 12 tokens): the decoded blocks are
    cached as they fill, so each next turn reuses 288 tokens and the five compute 60 in
    one step."""
    mgr = make_manager(tokens_per_block=16, num_gpu_blocks=200)
    sched = Scheduler(mgr, SchedulerConfig(max_num_tokens=1000))
    prompts = {str(i): list(range(1000 * i, 1000 * i + 100)) for i in range(5)}
    for rid, prompt in prompts.items():
        sched.add_request(Request(rid, prompt, max_output_tokens=200))
    _, outputs = run_to_the_end(sched)
    for rid, prompt in prompts.items():
        sched.add_request(Request("next" + rid, prompt + outputs[rid], max_output_tokens=4))
    step = sched.step()
    assert [(c.request_id, c.first_token, c.num_tokens, c.num_reused_tokens)
            for c in step.context_chunks] == [(f"next{i}", 288, 12, 288) for i in range(5)]
    assert step.num_scheduled_tokens == 60
