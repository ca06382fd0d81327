"""Tests of TraceRequest, the prefix model and the built-in synthetic chat workload."""

from __future__ import annotations

import re

import pytest

from kvtier.sim import PrefixModel, SessionBuilder, SyntheticChat, TraceRequest, Workload


def make_chat(num_requests: int = 300, seed: int = 0) -> SyntheticChat:
    return SyntheticChat(num_requests=num_requests, seed=seed)


def fingerprint(workload: Workload) -> list[tuple[str, float, int, str | None, int, int, int]]:
    return [
        (r.request_id, r.arrival_s, r.output_length, r.session_id, len(r.prompt), r.prompt[0],
         hash(tuple(r.prompt)))
        for r in workload
    ]


def test_trace_request_validates_fields() -> None:
    """TraceRequest names the offending field and value."""
    with pytest.raises(ValueError, match=r"request_id .*''"):
        TraceRequest("", 0.0, [1], 1)
    with pytest.raises(ValueError, match=r"arrival_s .*-1\.0"):
        TraceRequest("r", -1.0, [1], 1)
    with pytest.raises(ValueError, match=r"prompt .*\[\]"):
        TraceRequest("r", 0.0, [], 1)
    with pytest.raises(ValueError, match=r"output_length .*-2"):
        TraceRequest("r", 0.0, [1], -2)
    with pytest.raises(ValueError, match=r"session_id .*3"):
        TraceRequest("r", 0.0, [1], 1, 3)  # type: ignore[arg-type]
    assert TraceRequest("r", 0.5, [4, 5], 0, "s").num_prompt_tokens == 2


def test_synthetic_chat_is_a_workload() -> None:
    """SyntheticChat meets the Workload protocol and describes itself."""
    chat = make_chat(10)
    assert isinstance(chat, Workload)
    info = chat.describe()
    assert info["name"] == "synthetic-chat"
    assert info["num_requests"] == 10
    assert isinstance(info["prefix_model"], dict)
    assert info["prefix_model"]["max_open_sessions"] == 32


def test_synthetic_chat_is_deterministic_per_seed() -> None:
    """The same seed yields identical requests on every iteration; another seed differs."""
    assert fingerprint(make_chat()) == fingerprint(make_chat())
    assert fingerprint(make_chat()) != fingerprint(make_chat(seed=1))


def test_synthetic_chat_shape() -> None:
    """Default chat: 2,000 requests, prompts of 500-8,000 tokens, arrivals in order."""
    requests = list(SyntheticChat())
    assert len(requests) == 2000
    assert all(500 <= len(r.prompt) <= 8000 for r in requests)
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals)
    assert len({r.request_id for r in requests}) == 2000
    num_sessions = len({r.session_id for r in requests})
    assert 2000 > num_sessions > 100


def test_follow_ups_extend_previous_turn_and_new_content_is_fresh() -> None:
    """A follow-up starts with its session's previous prompt; unshared tokens were never seen."""
    previous: dict[str, TraceRequest] = {}
    seen: set[int] = set()
    num_follow_ups = 0
    for request in make_chat():
        prompt = request.prompt
        assert request.session_id is not None
        before = previous.get(request.session_id)
        if before is not None:
            num_follow_ups += 1
            assert prompt[: len(before.prompt)] == before.prompt
            # The previous output follows as fresh ids (the reply), then the new user turn.
            reply = prompt[len(before.prompt) : len(before.prompt) + before.output_length]
            assert not seen.intersection(reply)
        first_new = next(i for i, t in enumerate(prompt) if t not in seen)
        new_part = prompt[first_new:]
        assert not seen.intersection(new_part)
        seen.update(prompt)
        previous[request.session_id] = request
    assert num_follow_ups > 100


def test_system_prompts_are_shared_with_zipf_popularity() -> None:
    """First turns start with one of the system prompts; the most popular is used most."""
    model = PrefixModel(num_system_prompts=4, zipf_exponent=1.0, follow_up_fraction=0.0)
    builder = SessionBuilder(model, seed=3)
    counts: dict[int, int] = {}
    for _ in range(400):
        _, prompt = builder.fixed_length_prompt(1200, 10)
        counts[prompt[0]] = counts.get(prompt[0], 0) + 1
    assert len(counts) == 4
    ranked = sorted(counts.values(), reverse=True)
    # Zipf(1) over 4 prompts: shares 0.48, 0.24, 0.16, 0.12.
    assert ranked[0] > 150 and ranked[-1] < 80


def test_fixed_length_prompt_follows_the_documented_rules() -> None:
    """Exact lengths; short first turns truncate the system prompt; follow-ups must fit."""
    model = PrefixModel(
        num_system_prompts=1, min_system_prompt_tokens=100, max_system_prompt_tokens=100,
        follow_up_fraction=1.0, min_user_turn_tokens=16,
    )
    builder = SessionBuilder(model, seed=0)
    system = list(range(100))
    s0, p0 = builder.fixed_length_prompt(50, 5)  # no open session: first turn, truncated
    assert (s0, p0) == ("s0", system[:34] + list(range(100, 116)))
    s1, p1 = builder.fixed_length_prompt(70, 5)  # history 55 + 16 > 70: new session
    assert s1 == "s1"
    assert p1 == system[:54] + list(range(121, 137))
    s2, p2 = builder.fixed_length_prompt(200, 5)  # a follow-up of s0 or s1
    history = {"s0": p0 + list(range(116, 121)), "s1": p1 + list(range(137, 142))}[s2]
    assert p2 == history + list(range(142, 142 + 200 - len(history)))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_system_prompts", 0),
        ("min_system_prompt_tokens", 0),
        ("max_system_prompt_tokens", 10),
        ("zipf_exponent", -0.5),
        ("follow_up_fraction", 1.5),
        ("max_open_sessions", 0),
        ("max_turns_per_session", 0),
        ("min_user_turn_tokens", 0),
    ],
)
def test_prefix_model_validates_fields(field: str, value: object) -> None:
    """PrefixModel names the offending field and value."""
    with pytest.raises(ValueError, match=f"{field} .*{re.escape(repr(value))}"):
        PrefixModel(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_requests", -1),
        ("seed", 1.5),
        ("max_user_turn_tokens", 100),
        ("max_output_tokens", 10),
        ("max_prompt_tokens", 3000),
        ("arrival_rate_per_s", 0.0),
        ("name", ""),
    ],
)
def test_synthetic_chat_validates_fields(field: str, value: object) -> None:
    """SyntheticChat names the offending field and value."""
    with pytest.raises(ValueError, match=f"{field} .*{re.escape(repr(value))}"):
        SyntheticChat(**{field: value})  # type: ignore[arg-type]



def test_open_sessions_hold_at_most_max_held_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Open sessions keep their histories, but never more than ``MAX_HELD_TOKENS`` tokens
    together: the idle-longest close first (a trace of multi-million-token contexts held 32
    of them, 19.7 GB for 31 requests a replay then skipped). Below the bound nothing
    changes: every prompt is the one the count bound alone gives."""
    import kvtier.sim.synthetic as synthetic

    model = PrefixModel(follow_up_fraction=0.5, max_open_sessions=32, max_turns_per_session=99)
    sizes = [300 + 50 * i for i in range(16)]
    unbounded = SessionBuilder(model, seed=3)
    expected, held = [], []
    for n in sizes:
        expected.append(unbounded.fixed_length_prompt(n, 10))
        held.append(unbounded.num_held_tokens)
    assert max(held) > 2_000  # the unbounded run passes the bound set below
    monkeypatch.setattr(synthetic, "MAX_HELD_TOKENS", 2_000)
    builder = SessionBuilder(model, seed=3)
    got = []
    for n in sizes:
        got.append(builder.fixed_length_prompt(n, 10))
        assert builder.num_held_tokens == sum(len(s.history) for s in builder._open.values())
        assert builder.num_held_tokens <= 2_000
    first_over = next(i for i, h in enumerate(held) if h > 2_000)
    assert got[:first_over + 1] == expected[:first_over + 1]
    assert len(builder._open) < len(unbounded._open)
