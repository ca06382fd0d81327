"""The regret-weighted mixture of LRU's and the learned order (fourteenth session): the
draw, the ghosts' tags and the weights on scripted drops and recalls, against a plain
reference; on a small replay, that the mixture at a constant weight of 0 is the learned
order to the decision and at 1 never lets the learned order drop a run. And the veto of
the witness's LRU order by each order's own drops: its books against a plain
two-proportion test, and its figure on the first 200 agentic steps."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.policy_lab.mixture import (
    _LEARNED,
    _LRU,
    RegretMixture,
    RegretVeto,
    StratifiedVeto,
    pack_class,
    phi,
    run,
    unpack_class,
)

from kvtier.config import CacheConfig
from kvtier.policies import KvtierPredict
from kvtier.sim import SyntheticChat, simulate
from kvtier.witness import Z


def bound(policy: KvtierPredict, gpu: int = 8, host: int = 0) -> KvtierPredict:
    policy.bind(CacheConfig(tokens_per_block=4, num_gpu_blocks=gpu, num_host_blocks=host))
    return policy


def test_the_class_field_carries_the_class_the_expert_and_its_weight() -> None:
    for cls in (0, 1, 12, 63):
        for expert in (_LRU, _LEARNED):
            for w in (0.5, 0.25, 1.0, 2.0 ** -20):
                assert unpack_class(pack_class(cls, expert, w)) == (cls, expert, w)
    # Below 2^-20 a weight is kept as 2^-20 (a charge is never infinite).
    assert unpack_class(pack_class(3, _LRU, 0.0)) == (3, _LRU, 2.0 ** -20)


def test_the_draw_is_a_sturmian_word_of_the_weight() -> None:
    """At a constant weight w (dyadic: the accumulator is exact), the k-th drop (from 1)
    is LRU's exactly where floor((k - 1) w) steps up: over any k drops LRU makes k w of
    them, +-1."""
    for w in (0.25, 0.375, 0.75):
        policy = RegretMixture(fixed=w)
        bound(policy)
        experts = []
        for k in range(1, 41):
            experts.append(_LRU if policy.lru_now else _LEARNED)
            policy.forget(("g", k), k, 1, 0.0, 1, 1.0)
        reference = [_LRU if k >= 2 and math.floor((k - 1) * w) > math.floor((k - 2) * w)
                     else _LEARNED for k in range(1, 41)]
        assert experts == reference
        assert policy.num_drops == [reference.count(_LRU), reference.count(_LEARNED)]


def reference_weights(script: list[tuple[str, int, int]], window: int) -> list[float]:
    """The mixture's rules written plainly: ``("drop", key, blocks)`` drops a run under
    the expert drawn now, ``("recall", key, 0)`` recalls it. Returns LRU's weight after
    each step."""
    w, acc, lru_now = 0.5, 0.0, False
    loss = {_LRU: 0.0, _LEARNED: 0.0}
    volume = 0.0
    dropped = 0
    ghosts: dict[int, tuple[int, float, int]] = {}
    out = []

    def weigh() -> float:
        z = (loss[_LEARNED] - loss[_LRU]) / math.sqrt(volume) if volume > 0 else 0.0
        return 0.5 * math.erfc(-z / math.sqrt(2.0))

    for op, key, n in script:
        if op == "drop":
            expert = _LRU if lru_now else _LEARNED
            ghosts[key] = (expert, w if lru_now else 1.0 - w, n)
            dropped += n
            if dropped >= window:
                dropped = 0
                loss = {e: x / 2 for e, x in loss.items()}
                volume /= 2
                w = weigh()
            acc += w
            lru_now = acc >= 1.0
            if lru_now:
                acc -= 1.0
        else:
            expert, weight, n = ghosts.pop(key)
            # The weight as the ghost keeps it: to 2^-20.
            weight = round(weight * 2 ** 20) / 2 ** 20
            loss[expert] += n / weight
            volume += (n / weight) ** 2
            w = weigh()
        out.append(w)
    return out


def test_weights_follow_each_experts_regret_per_drop() -> None:
    """Runs dropped by one order and come back for charge that order blocks / its weight;
    LRU's weight is Phi of the learned order's excess loss over its noise; every two
    capacities of blocks dropped (here 16) the books halve. A hand-made script: the
    learned order's drops come back (its weight falls), then LRU's (it recovers)."""
    script = [("drop", 1, 3), ("drop", 2, 2), ("recall", 1, 0), ("drop", 3, 4),
              ("drop", 4, 1), ("recall", 2, 0), ("drop", 5, 5), ("recall", 4, 0),
              ("recall", 3, 0), ("drop", 6, 2), ("drop", 7, 3), ("recall", 6, 0),
              ("recall", 7, 0), ("drop", 8, 6), ("recall", 5, 0), ("recall", 8, 0)]
    policy = RegretMixture()
    bound(policy)
    got = []
    for op, key, n in script:
        if op == "drop":
            policy.forget(("g", key), key, 1, 0.0, n, 1.0)
        else:
            assert policy.recall(("g", key), 2.0) == (key, n if n else policy_n(script, key))
        got.append(policy.w_lru)
    assert got == reference_weights(script, 16)
    # The first recall is the learned order's (3 blocks at weight 1/2): z = 1, Phi(1).
    assert got[2] == pytest.approx(phi(1.0), abs=0.0)


def policy_n(script: list[tuple[str, int, int]], key: int) -> int:
    return next(n for op, k, n in script if op == "drop" and k == key)


def test_a_ghost_recalled_after_a_trim_is_gone_and_charges_no_one() -> None:
    policy = RegretMixture()
    bound(policy, gpu=1)  # ghosts bounded to 4 blocks
    policy.forget(("g", 1), 1, 1, 0.0, 3, 1.0)
    policy.forget(("g", 2), 2, 1, 0.0, 3, 1.0)  # the first is trimmed
    assert policy.recall(("g", 1), 2.0) is None
    assert policy.loss == [0.0, 0.0]


def replay(policy: KvtierPredict) -> float:
    config = CacheConfig(tokens_per_block=32, num_gpu_blocks=96, num_host_blocks=160)
    return simulate(SyntheticChat(num_requests=300), config, policy=policy).token_hit_rate


def test_at_weight_0_the_mixture_is_the_learned_order_and_at_1_lrus() -> None:
    """A small chat replay that drops runs: at a constant weight of 0 every drop is the
    learned order's, and the hit rate is the witness-free learned order's to the bit; at
    1 every drop but the first is LRU's order (the draw starts on the learned order)."""
    learned = RegretMixture(fixed=0.0)
    assert replay(learned) == replay(KvtierPredict(cost_aware=True, witnessed=False))
    assert learned.num_drops[_LRU] == 0 and learned.num_drops[_LEARNED] > 50
    lru = RegretMixture(fixed=1.0)
    replay(lru)
    assert lru.num_drops[_LEARNED] == 1 and lru.num_drops[_LRU] > 50


def two_proportion_veto(dropped: list[float], returned: list[float], runs: list[float]) -> bool:
    """The veto written plainly: LRU's drops (index 0) come back more often per block than
    the learned order's (1), beyond Z standard errors of a two-proportion test over runs."""
    if min(runs) < 1 or min(dropped) <= 0:
        return False
    rate = [r / d for r, d in zip(returned, dropped, strict=True)]
    pooled = sum(returned) / sum(dropped)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / runs[0] + 1 / runs[1]))
    return rate[0] - rate[1] > Z * se


def test_lrus_own_drops_coming_back_veto_its_order() -> None:
    """The learned order drops five 4-block runs, one comes back (0.2 a block). The
    witness says LRU is ahead: LRU's order. It drops four 2-block runs; as they come back,
    2 / 8 and 4 / 8 are within chance of 0.2 (0.05 against se 0.275, 0.30 against
    0.303), 6 / 8 is not (0.55 against 0.321): LRU's order is vetoed, the witness's
    verdict unchanged."""
    policy = RegretVeto()
    bound(policy, gpu=100)
    witness = policy.witness
    assert witness is not None
    for k in range(5):
        policy.forget(("p", k), k, 1, 0.0, 4, 1.0)
    assert policy.recall(("p", 0), 2.0) == (0, 4)
    witness.lru_ahead = True
    assert policy.rank_version % 2 == 1 and policy.lru_now
    for k in range(4):
        policy.forget(("l", k), 10 + k, 1, 0.0, 2, 3.0)
    lru_now, books = [], []
    for k in range(3):
        assert policy.recall(("l", k), 4.0) == (10 + k, 2)
        lru_now.append(policy.lru_now)
        books.append(two_proportion_veto(policy.dropped, policy.recalled, policy.runs))
    assert lru_now == [True, True, False] and books == [False, False, True]
    assert (policy.dropped, policy.recalled, policy.runs) == ([8.0, 20.0], [6.0, 4.0],
                                                               [4.0, 5.0])
    assert policy.rank_version % 2 == 0 and witness.lru_ahead  # the verdict stands
    policy.forget(("n", 0), 20, 1, 0.0, 1, 5.0)
    assert policy.runs == [4.0, 6.0]  # the next drop is the learned order's


def test_the_veto_ends_the_agentic_cold_start_lock_in() -> None:
    """First 200 agentic steps (2,698 GPU blocks): the witness switches to LRU's order at
    the 97th admission (twelfth session: locked there for 80 admissions, 0.7457); LRU's
    drops come back at once and the veto takes 52 drops from it: 0.7793 (the learned
    order alone 0.7897)."""
    assert round(run("agentic200", "main")["hit_rate"], 4) == 0.7457
    r = run("agentic200", "veto")
    assert round(r["hit_rate"], 4) == 0.7793
    assert r["vetoed_drops"] == 52


def test_a_stratified_veto_does_not_read_what_each_order_drops_as_its_choice() -> None:
    """The learned order drops five 4-block runs of class 1 (two come back: 0.4) and five
    of class 2 (none: output tails, say). In LRU's order, four of class 1 (two come back:
    0.5). Pooled, LRU's 0.5 against the learned order's 0.2 is beyond chance (0.30 against
    se 0.267): vetoed. Within class 1, 0.5 against 0.4 is not (z = 0.3): the learned
    order's advantage was only that it dropped class 2."""
    for policy, vetoed in ((RegretVeto(), True), (StratifiedVeto(), False)):
        bound(policy, gpu=100)
        witness = policy.witness
        assert witness is not None
        for cls in (1, 2):
            for k in range(5):
                policy.forget(("p", cls, k), 10 * cls + k, cls, 0.0, 4, 1.0)
        for k in range(2):
            policy.recall(("p", 1, k), 2.0)
        witness.lru_ahead = True
        assert policy.rank_version % 2 == 1
        for k in range(4):
            policy.forget(("l", k), 100 + k, 1, 0.0, 4, 3.0)
        for k in range(2):
            policy.recall(("l", k), 4.0)
        assert (policy.veto == 1, policy.lru_now) == (vetoed, not vetoed)
        assert two_proportion_veto(policy.dropped, policy.recalled, policy.runs)
