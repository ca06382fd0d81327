"""The held-out families (sixteenth session): deterministic, re-iterable workloads, each
built on its principle; their replays pinned to the figures of a real run."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from kvtier.config import CacheConfig
from kvtier.sim import Workload, simulate
from kvtier.sim.heldout import FAMILIES, SALT_SHIFT, HeldOutWorkload


def make(family: str, n: int = 200, seed: int = 0) -> list:  # type: ignore[type-arg]
    return list(HeldOutWorkload(family, seed, n))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_families_are_deterministic_workloads(name: str) -> None:
    """Every family yields the same requests on every pass, exactly as many as asked, in
    arrival order, with unique ids; another seed gives another stream."""
    workload = HeldOutWorkload(name, 3, 60)
    assert isinstance(workload, Workload) and workload.name == f"{name}#3"
    first, again = list(workload), list(workload)
    assert len(first) == 60 and first == again
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(first))
    assert len({r.request_id for r in first}) == 60
    assert [r.prompt for r in HeldOutWorkload(name, 4, 60)] != [r.prompt for r in first]


def test_bad_family_and_sizes_are_refused() -> None:
    """A family the module lacks, and a negative seed or no requests, are named."""
    with pytest.raises(ValueError, match=r"family must be one of .* got 'nope'"):
        HeldOutWorkload("nope")
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        HeldOutWorkload("irm", -1)
    with pytest.raises(ValueError, match="num_requests must be an integer >= 1, got 0"):
        HeldOutWorkload("irm", 0, 0)


def test_tenants_salt_their_key_spaces() -> None:
    """Each tenant's tokens sit in its own 2^40 key space, so the same system prompt under
    two adapters shares no block; a session stays in its tenant's space."""
    requests = make("tenants", 300)
    spaces = {r.prompt[0] >> SALT_SHIFT for r in requests}
    assert len(spaces) > 3
    for r in requests:
        assert {x >> SALT_SHIFT for x in r.prompt} == {int(str(r.session_id)[1:].split("/")[0])}
    heads = {(r.prompt[0] >> SALT_SHIFT, r.prompt[0] % (1 << SALT_SHIFT)) for r in requests}
    assert len({low for _, low in heads}) < len(heads)  # one text, several key spaces


def test_rag_puts_a_document_at_several_positions() -> None:
    """A retrieved document's tokens appear at different offsets in different prompts (its
    blocks differ by what precedes them), while the system prompts' stay put."""
    positions: dict[int, set[int]] = {}
    for r in make("rag", 400):
        for at, token in enumerate(r.prompt):
            positions.setdefault(token, set()).add(at)
    moved = sum(len(v) > 1 for v in positions.values())
    assert moved > 10_000 and all(positions[t] == {t - 1} for t in (1, 2, 3))


def test_fewshot_template_and_shuffles() -> None:
    """Half the requests open with their task's template (its first four examples in
    order): per task (its instruction's first token), the most common 420-token head (the
    shortest a template can be) is about half the task's requests, 217 of 400."""
    heads: dict[int, Counter[tuple[int, ...]]] = {}
    for r in make("fewshot", 400):
        heads.setdefault(r.prompt[0], Counter())[tuple(r.prompt[:420])] += 1
    assert len(heads) == 6
    assert sum(c.most_common(1)[0][1] for c in heads.values()) == 217


def test_parallel_sends_every_node_as_four_branches() -> None:
    """Requests come in fours: one prompt, one arrival, one tree; only some go on."""
    requests = make("parallel", 200)
    for k in range(0, 200, 4):
        group = requests[k:k + 4]
        assert len({(r.arrival_s, tuple(r.prompt), r.session_id) for r in group}) == 1
    assert len({r.session_id for r in requests}) < 200 // 4


def test_tiny_prompts_are_mostly_below_a_block() -> None:
    """171 of 400 prompts are shorter than one 32-token block (nothing a cache can hold),
    every one-off is 4-40 tokens, and a fifth of all tokens sit in partial blocks."""
    requests = make("tiny", 400)
    assert sum(len(r.prompt) < 32 for r in requests) == 171
    assert all(4 <= len(r.prompt) <= 40 for r in requests if r.session_id is None)
    partial = sum(len(r.prompt) % 32 for r in requests) / sum(len(r.prompt) for r in requests)
    assert 0.2 < partial < 0.25


def test_irm_requests_are_fixed_prompts() -> None:
    """The stationary control: each request is one of at most 200 fixed prompts, whole."""
    requests = make("irm", 1000)
    assert len({tuple(r.prompt) for r in requests}) <= 200
    assert all(r.session_id is None for r in requests)


def test_bursty_arrivals_have_idle_gaps() -> None:
    """Between bursts the stream is silent for minutes (a gap over 60 s), within a burst
    requests are seconds apart."""
    arrivals = [r.arrival_s for r in make("bursty", 1000)]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(g > 60 for g in gaps) >= 3 and sorted(gaps)[len(gaps) // 2] < 2.0


@pytest.mark.parametrize(("family", "gpu", "host", "policy", "hit"), [
    ("irm", 120, 120, "lru", 0.163903),
    ("irm", 120, 120, "kvtier-predict-cost", 0.238021),
    ("tiny", 40, 0, "lru", 0.356209),
    ("tiny", 40, 0, "kvtier-predict-cost", 0.342322),
])
def test_replays_are_pinned(family: str, gpu: int, host: int, policy: str, hit: float) -> None:
    """300 requests through the simulator, figures of a real run: the stationary control
    (the default well above LRU) and prompts below a block (the default 0.014 below it on
    this small run; the bench's rows show it at scale)."""
    config = CacheConfig(tokens_per_block=32, num_gpu_blocks=gpu, num_host_blocks=host,
                         eviction_policy=policy)
    assert simulate(HeldOutWorkload(family, 0, 300), config).token_hit_rate == \
        pytest.approx(hit, abs=5e-7)
