"""Sampling (greedy, seeded, top-p, validation) and the model commands' clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the model tests need torch: "
                                            "pip install 'kvtier[model]'")

from kvtier.cli import main  # noqa: E402
from kvtier.model.sampling import Sampler, SamplingParams, find_stop  # noqa: E402


def test_greedy_seeded_and_top_p() -> None:
    """Greedy is argmax; a seed repeats its draws; a tiny top_p keeps only the best token."""
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams()).sample(logits) == 1
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7)) for _ in range(2)]
    a = [draws[0].sample(logits) for _ in range(20)]
    b = [draws[1].sample(logits) for _ in range(20)]
    assert a == b and len(set(a)) > 1
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=1))
    assert {nucleus.sample(logits) for _ in range(20)} == {1}


def test_params_are_checked() -> None:
    """Bad sampling parameters are refused naming the field."""
    with pytest.raises(ValueError, match="top_p must be a number in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        SamplingParams(max_new_tokens=0)
    assert find_stop("abc END x", ("END", "x")) == 4


def test_missing_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing model path ends with one sentence and status 2."""
    assert main(["generate", "--model", str(tmp_path / "none.gguf"), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvtier: error: model path") and "does not exist" in err


def test_bad_jsonl_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A JSONL line without a prompt is named by its line number."""
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"turns": []}\n')
    assert main(["generate", "--jsonl", str(bad)]) == 2
    assert "line 2 needs" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "--raw", "--system-priority", "90", "hi"],
     "kvtier: error: --system-priority needs the chat template, which --raw leaves out"),
    (["chat", "--system-priority", "101"], "--system-priority: must be an integer <= 100, got 101"),
    (["chat", "--eviction-policy", "mru"], "--eviction-policy: invalid choice: 'mru'"),
])
def test_retention_and_policy_options_are_checked_before_a_model_loads(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A system priority without a chat template, or out of range, and an unknown policy
    end with one sentence and status 2 (no model is loaded)."""
    assert main(argv) == 2
    assert message in capsys.readouterr().err
