"""Tests of the offline cache references: unlimited, Belady and LRU."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from itertools import combinations
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.sim import (
    MooncakeTrace,
    OracleRequest,
    SyntheticChat,
    belady_hit_tokens,
    lru_hit_tokens,
    oracle_requests,
    prefix_block_keys,
    unlimited_hit_tokens,
)


def make_requests(paths: Sequence[str]) -> list[OracleRequest]:
    """One request per string; block j is keyed by the string's first j+1 characters."""
    return [OracleRequest(tuple(p[: j + 1] for j in range(len(p))), len(p)) for p in paths]


def brute_force_hit_blocks(requests: Sequence[OracleRequest], num_blocks: int) -> int:
    """Best hit blocks over every eviction choice (forced insertion, current blocks kept)."""
    states: dict[frozenset[Hashable], int] = {frozenset(): 0}
    for request in requests:
        keys = request.block_keys[:num_blocks]
        following: dict[frozenset[Hashable], int] = {}
        for cached, hits in states.items():
            k = 0
            while k < len(keys) and keys[k] in cached:
                k += 1
            others = cached - set(keys)
            room = num_blocks - len(keys)
            if len(others) <= room:
                choices: list[frozenset[Hashable]] = [others]
            else:
                choices = [frozenset(kept) for kept in combinations(others, room)]
            for kept in choices:
                state = kept | frozenset(keys)
                following[state] = max(following.get(state, 0), hits + k)
        states = following
    return max(states.values())


# Requests are paths in a small tree of blocks: strings over "abc" of length 1..3.
paths_strategy = st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1, max_size=10)


def test_belady_scenario_evicts_farthest_next_use() -> None:
    """Belady keeps the block needed soonest where LRU keeps the most recent one."""
    # capacity 3; requests r0 [A, AB]  r1 [C]  r2 [D]  r3 [A, AB]  r4 [C]
    # Belady, r2: next uses A@r3, AB@r3, C@r4 -> evict C     -> {A, AB, D}
    #         r3: hits A, AB (2 blocks)
    #         r4: D is never used again -> evict D, miss C  -> {A, AB, C}
    # LRU after r1 (oldest first): AB, A, C; r2 evicts AB    -> A, C, D
    #         r3: hits A (1 block), evicts C for AB;  r4: misses C
    requests = make_requests(["A", "C", "D", "A", "C"])
    requests[0] = requests[3] = OracleRequest(("A", "AB"), 2)
    belady = belady_hit_tokens(requests, num_blocks=3, tokens_per_block=1)
    lru = lru_hit_tokens(requests, num_blocks=3, tokens_per_block=1)
    assert (belady.num_hit_blocks, belady.num_hit_tokens, belady.num_tokens) == (2, 2, 7)
    assert (lru.num_hit_blocks, lru.num_hit_tokens) == (1, 1)
    assert brute_force_hit_blocks(requests, 3) == 2
    assert belady.num_requests == lru.num_requests == 5


def test_belady_prefers_evicting_children_among_ties() -> None:
    """Among never-reused blocks Belady evicts the deepest, so the prefix stays usable."""
    # capacity 3: r0 [a, ab, abb] r1 [b] -> evict abb (deepest of the never-reused chain)
    requests = make_requests(["abb", "b", "a"])
    assert belady_hit_tokens(requests, 3, 1).num_hit_blocks == 1
    assert brute_force_hit_blocks(requests, 3) == 1


def test_hit_tokens_count_partial_last_block() -> None:
    """A hit on a partial last block counts only the prompt's tokens."""
    requests = [OracleRequest((1, 2), 600), OracleRequest((1, 2), 600)]
    for result in (
        unlimited_hit_tokens(requests, 512),
        belady_hit_tokens(requests, 2, 512),
        lru_hit_tokens(requests, 2, 512),
    ):
        assert (result.num_hit_tokens, result.num_tokens, result.hit_rate) == (600, 1200, 0.5)


def test_requests_longer_than_the_cache_keep_their_first_blocks() -> None:
    """A request with more blocks than the cache caches only its first num_blocks blocks."""
    requests = make_requests(["aaaa", "aaaa"])
    assert belady_hit_tokens(requests, 2, 1).num_hit_tokens == 2
    assert lru_hit_tokens(requests, 2, 1).num_hit_tokens == 2


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (OracleRequest((1, 2, 3), 1024), "block_keys has 3 keys"),
        (OracleRequest((1, 1), 1024), "distinct"),
    ],
)
def test_invalid_oracle_requests_are_rejected(request_: OracleRequest, message: str) -> None:
    """More keys than blocks of the prompt, or repeated keys, raise ValueError."""
    with pytest.raises(ValueError, match=message):
        unlimited_hit_tokens([request_], 512)
    with pytest.raises(ValueError, match=message):
        belady_hit_tokens([request_], 4, 512)
    with pytest.raises(ValueError, match=message):
        lru_hit_tokens([request_], 4, 512)


def test_invalid_sizes_are_rejected() -> None:
    """num_blocks and tokens_per_block must be positive integers, named in the message."""
    with pytest.raises(ValueError, match=r"num_blocks .*0"):
        belady_hit_tokens([], 0, 1)
    with pytest.raises(ValueError, match=r"tokens_per_block .*0"):
        lru_hit_tokens([], 1, 0)
    with pytest.raises(ValueError, match=r"tokens_per_block .*-1"):
        prefix_block_keys([1, 2], -1)
    assert unlimited_hit_tokens([], 1).hit_rate == 0.0


def test_prefix_block_keys_name_prefixes() -> None:
    """Keys cover full blocks only and are equal exactly when the prefixes are equal."""
    a = prefix_block_keys([1, 2, 3, 4, 5], 2)
    b = prefix_block_keys([1, 2, 3, 9, 5, 6], 2)
    c = prefix_block_keys([0, 2, 3, 4], 2)
    assert (len(a), len(b), len(c)) == (2, 3, 2)
    assert a[0] == b[0] and a[1] != b[1]
    assert c[1] != a[1]  # same block content, different prefix


@settings(max_examples=300, deadline=None)
@given(paths=paths_strategy, num_blocks=st.integers(1, 4))
def test_belady_matches_brute_force_optimum(paths: list[str], num_blocks: int) -> None:
    """On tiny cases Belady's hits equal the best over every eviction choice."""
    requests = make_requests(paths)
    result = belady_hit_tokens(requests, num_blocks, 1)
    assert result.num_hit_blocks == brute_force_hit_blocks(requests, num_blocks)
    assert result.num_hit_tokens == result.num_hit_blocks


@settings(max_examples=200, deadline=None)
@given(
    paths=st.lists(st.text(alphabet="abc", min_size=1, max_size=6), min_size=1, max_size=40),
    num_blocks=st.integers(1, 12),
)
def test_belady_beats_lru_and_trails_unlimited(paths: list[str], num_blocks: int) -> None:
    """LRU <= Belady <= unlimited on random request sequences."""
    requests = make_requests(paths)
    lru = lru_hit_tokens(requests, num_blocks, 1).num_hit_tokens
    belady = belady_hit_tokens(requests, num_blocks, 1).num_hit_tokens
    unlimited = unlimited_hit_tokens(requests, 1).num_hit_tokens
    assert lru <= belady <= unlimited
    big = max(1, sum(len(p) for p in paths))
    assert lru_hit_tokens(requests, big, 1).num_hit_tokens == unlimited
    assert belady_hit_tokens(requests, big, 1).num_hit_tokens == unlimited


def test_lru_reproduces_background_numbers(trace_file: Callable[[str], Path]) -> None:
    """Single-tier LRU, 512-token blocks, conversation trace: 4.5/8.8/26.8/36.6 %."""
    trace = MooncakeTrace(trace_file("mooncake_conversation_trace.jsonl"))
    requests = list(trace.oracle_requests(512))
    rates = [
        round(100 * lru_hit_tokens(requests, n, 512).hit_rate, 1)
        for n in (1000, 4000, 16000, 64000)
    ]
    assert rates == [4.5, 8.8, 26.8, 36.6]
    unlimited = unlimited_hit_tokens(requests, 512)
    assert unlimited.hit_rate == trace.unlimited_hit_rate()


def test_belady_on_conversation_trace(trace_file: Callable[[str], Path]) -> None:
    """Belady at 512-token blocks: exact hit rates, between LRU and unlimited."""
    trace = MooncakeTrace(trace_file("mooncake_conversation_trace.jsonl"))
    requests = list(trace.oracle_requests(512))
    rates = [
        round(100 * belady_hit_tokens(requests, n, 512).hit_rate, 2)
        for n in (1000, 4000, 16000, 64000)
    ]
    assert rates == [18.27, 32.68, 37.36, 37.36]


def test_synthetic_chat_shows_reuse_and_eviction() -> None:
    """Default chat at 32-token blocks: LRU loses hits at 1,024 blocks, none at 4,096."""
    requests = list(oracle_requests(SyntheticChat(), 32))
    unlimited = unlimited_hit_tokens(requests, 32).hit_rate
    lru_1k = lru_hit_tokens(requests, 1024, 32).hit_rate
    belady_1k = belady_hit_tokens(requests, 1024, 32).hit_rate
    lru_4k = lru_hit_tokens(requests, 4096, 32).hit_rate
    assert [round(100 * r, 1) for r in (unlimited, lru_1k, belady_1k, lru_4k)] == [
        71.9, 49.8, 67.6, 71.9
    ]
