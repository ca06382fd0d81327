"""Red team, eleventh pass: the command line, given options an adversary would."""

from __future__ import annotations

from bad_input_helpers import assert_one_line_refusal, run_cli
from kvtier.cli_config import MAX_SWEEP_RUNS


def test_a_sweep_of_millions_of_runs_is_refused_before_any() -> None:
    """``sweep --gpu-blocks <3,000 sizes> --host-blocks <3,000 sizes>`` built 9 M run
    configurations (minutes, over a GB) before simulating anything. Now the number of runs
    is bounded and refused at once, naming the options and the product."""
    sizes = ",".join(str(n) for n in range(100, 3100))
    code, err = run_cli(["sweep", "--limit", "2", "--gpu-blocks", sizes, "--host-blocks", sizes,
                         "--no-progress"])
    assert_one_line_refusal(code, err, "--eviction-policy/--gpu-blocks/--host-blocks",
                            "1 x 3,000 x 3,000 = 9,000,000 runs",
                            f"the {MAX_SWEEP_RUNS:,} one sweep may make")


def test_a_sweep_at_the_bound_is_not_refused_for_its_size() -> None:
    """The bound refuses only what passes it: 2 policies x 512 x 1 sizes is allowed (it
    then fails on the one-block GPU tier, which proves it got past the check)."""
    sizes = ",".join(["1"] * 512)
    code, err = run_cli(["sweep", "--limit", "2", "--eviction-policy", "lru,arc",
                         "--gpu-blocks", sizes, "--host-blocks", "0", "--no-oracle",
                         "--no-progress"])
    assert_one_line_refusal(code, err, "too large for 1 GPU blocks")
