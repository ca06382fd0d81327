"""The witness's books on the first 200 agentic steps (twelfth session): when it switches,
on what evidence, and what it would say left blind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.policy_lab.witness_trace import Switch, trace_agentic


def test_the_first_switch_comes_on_the_first_losses_once_the_gpu_is_full() -> None:
    """The GPU fills at ~100 steps; at the 97th admission 8 runs lost against 3 won put
    the lead beyond one sd, and in LRU's order only the learned order's losses still show
    (its kept runs go first): 6 runs won against 35 lost by step 200, LRU's order for 80
    admissions, 0.7457 (pinned in test_policy_reach.py too)."""
    t = trace_agentic("witnessed", 200)
    assert round(t.hit_rate, 4) == 0.7457
    assert t.switches[:2] == [Switch(97, True, -86, 78, 3, 8), Switch(114, False, -39, 45, 3, 11)]
    assert (t.num_lru_admissions, t.runs_won, t.runs_lost) == (80, 6, 35)
    assert (t.blocks_won, t.blocks_lost) == (246, 1335)


def test_blind_the_witness_reads_the_learned_orders_lead_over_lru() -> None:
    """Left blind (the learned order alone, 0.7897 against LRU's 0.7611), the same first
    verdict is withdrawn at the next admission, and its won less lost (2,301 blocks) is the
    learned order's lead over LRU in the simulator (2,194 blocks) within 5 %."""
    t = trace_agentic("blind", 200)
    assert round(t.hit_rate, 4) == 0.7897
    assert t.switches == [Switch(97, True, -86, 78, 3, 8), Switch(98, False, -40, 90, 4, 8)]
    assert t.num_lru_admissions == 0
    assert (t.blocks_won, t.blocks_lost, t.runs_won, t.runs_lost) == (4328, 2027, 96, 52)


def test_censored_outcomes_shorten_the_stay_in_lrus_order() -> None:
    """Counting no outcome while LRU's order rules: 37 admissions in it, 0.7561."""
    t = trace_agentic("censor", 200)
    assert round(t.hit_rate, 4) == 0.7561
    assert t.num_lru_admissions == 37
    assert t.switches[1] == Switch(102, False, -43, 55, 3, 8)


def test_an_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="variant"):
        trace_agentic("hysteresis", 10)
