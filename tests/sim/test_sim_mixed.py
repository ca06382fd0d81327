"""The mixed workload: parts merged by arrival, each in its own token space."""

from __future__ import annotations

import pytest

from kvtier.config import CacheConfig
from kvtier.sim import AgenticWorkload, SyntheticChat, TraceRequest, Workload, simulate
from kvtier.sim.mixed import MixedWorkload


class Fixed:
    """A workload of the given requests."""

    def __init__(self, name: str, requests: list[TraceRequest]) -> None:
        self.name = name
        self.requests = requests

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.requests)

    def describe(self) -> dict[str, object]:
        return {"name": self.name}


def req(rid: str, at: float, prompt: list[int], session: str | None = None) -> TraceRequest:
    return TraceRequest(rid, at, prompt, 2, session)


A = Fixed("a", [req("0", 0.0, [0, 1, 2], "s"), req("1", 2.0, [0, 1, 2, 3], "s"),
                req("2", 5.0, [7])])
B = Fixed("b", [req("0", 1.0, [0, 1, 2]), req("1", 2.0, [4]), req("2", 3.0, [5, 5])])


def test_requests_merge_by_arrival_each_part_in_its_own_token_space() -> None:
    """Token t of part k of 2 is 2t + k: a's [0 1 2] and b's [0 1 2] share nothing; a tie at
    2.0 s goes to the earlier part; ids and sessions are prefixed; the mix ends when b, its
    first part to end, does (a's last request is not reached)."""
    mix = MixedWorkload((A, B))
    assert isinstance(mix, Workload)
    assert list(mix) == [
        req("a/0", 0.0, [0, 2, 4], "a/s"), req("b/0", 1.0, [1, 3, 5]),
        req("a/1", 2.0, [0, 2, 4, 6], "a/s"), req("b/1", 2.0, [9]),
        req("b/2", 3.0, [11, 11]),
    ]
    assert [r.request_id for r in MixedWorkload((A, B), until_all=True)] == [
        "a/0", "b/0", "a/1", "b/1", "b/2", "a/2"]
    assert [r.request_id for r in MixedWorkload((A, B), limit=2)] == ["a/0", "b/0"]
    assert list(mix) == list(mix)  # re-iterable, the same requests
    assert mix.describe() == {"name": "mixed", "kind": "mixed", "until_all": False,
                              "limit": None, "parts": [{"name": "a"}, {"name": "b"}]}


@pytest.mark.parametrize(("kwargs", "shown"), [
    ({"parts": (A,)}, "at least two workloads"),
    ({"parts": [A, B]}, "at least two workloads"),
    ({"parts": (A, 3)}, r"parts\[1\] is not a workload"),
    ({"parts": (A, A)}, "names must differ"),
    ({"parts": (A, B), "name": ""}, "name must be a non-empty string"),
    ({"parts": (A, B), "limit": -1}, "limit must be an integer >= 0"),
    ({"parts": (A, B), "until_all": 1}, "until_all must be a bool"),
])
def test_bad_mixes_are_refused(kwargs: dict[str, object], shown: str) -> None:
    with pytest.raises(ValueError, match=shown):
        MixedWorkload(**kwargs)  # type: ignore[arg-type]


def test_a_token_id_too_large_to_share_is_refused_naming_it() -> None:
    big = Fixed("big", [req("0", 0.0, [1 << 61])])
    with pytest.raises(ValueError, match=r"request '0' of part 'big' holds token id "
                                         r"2305843009213693952"):
        list(MixedWorkload((A, big)))


def test_chat_and_agents_share_a_cache_and_neither_reuses_the_others_tokens() -> None:
    """The built-in chat and agentic workloads number their fresh tokens from 0 alike: mixed
    without their own token spaces, agents would "reuse" chat prompts. Each part's hit
    tokens in the mix are at most what it reuses alone with the whole cache to itself, and
    the mix reuses no more than the two alone."""
    chat, agents = SyntheticChat(num_requests=60), AgenticWorkload(num_requests=60)
    cfg = CacheConfig(tokens_per_block=32, num_gpu_blocks=4096, num_host_blocks=0)
    mix = MixedWorkload((chat, agents), until_all=True)
    assert sum(1 for _ in mix) == 120
    together = simulate(mix, cfg)
    alone = [simulate(w, cfg) for w in (chat, agents)]
    assert together.num_prompt_tokens == sum(r.num_prompt_tokens for r in alone)
    # A cache large enough for all of it: sharing it changes nothing, to the token.
    assert together.num_reused_tokens == sum(r.num_reused_tokens for r in alone)
