"""Red team 31b: the command line's refusals, made from data and not from another
module's message text, and what a careless or hostile user hands ``kvtier``."""

from __future__ import annotations

import pytest

from kvtier.cli import main
from kvtier.cli_error import MAX_ERROR_CHARS
from kvtier.cli_numbers import NotFinite, parse_number
from kvtier.sim import ModelProfile, get_profile
from kvtier.sim.timemodel import PROFILE_RANGES


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``kvtier argv...`` in process: (status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def just_past(low: float, high: float, kind: str) -> list[float]:
    """A value just below ``low`` and one just above ``high``. Pure."""
    if kind == "int":
        return [low - 1, high + 1]
    return [low - max(abs(low), 1.0) * 1e-9, high + max(abs(high), 1.0) * 1e-9]


def test_every_number_field_of_a_profile_has_a_range_as_data() -> None:
    """The table names every int and float field of ModelProfile, and no other."""
    numbers = {name for name in ModelProfile.__dataclass_fields__
               if ModelProfile.__dataclass_fields__[name].type in ("int", "float")}
    assert set(PROFILE_RANGES) == numbers
    assert PROFILE_RANGES["pcie_duplex"].describe() == "a finite number in [0.5, 1.0]"
    assert PROFILE_RANGES["kv_bytes_per_token"].describe() == "an integer in 1..1073741824"


@pytest.mark.parametrize("key", sorted(PROFILE_RANGES))
def test_the_range_table_is_the_profile_check(key: str) -> None:
    """The profile takes each bound of its table and refuses just past it, in the words
    of the table (one table for the check and for the command line)."""
    valid = PROFILE_RANGES[key]
    for bound in (valid.low, valid.high):
        value = int(bound) if valid.kind == "int" else float(bound)
        assert getattr(get_profile("tiny-test", **{key: value}), key) == value
        assert valid.contains(value)
    for value in just_past(valid.low, valid.high, valid.kind):
        value = int(value) if valid.kind == "int" else value
        assert not valid.contains(value)
        with pytest.raises(ValueError, match=rf"^{key} must be "
                           rf"{valid.describe().replace('[', '.').replace(']', '.')}, got "):
            get_profile("tiny-test", **{key: value})


@pytest.mark.parametrize("key", sorted(PROFILE_RANGES))
def test_a_set_profile_refusal_reads_the_range_from_the_table(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """cli_profile took the range out of the profile's ValueError text (``<field> ...,
    got ...``): a reworded profile message broke the command line's. Now the command line
    asks the table: a profile that refuses in other words changes nothing for the user."""
    import kvtier.sim._checks as checks

    def terse(field: str, value: object, *bounds: object) -> None:
        raise ValueError("no")  # a refusal worded otherwise, and wrongly for any value

    monkeypatch.setattr(checks, "check_float", terse)
    monkeypatch.setattr(checks, "check_int", terse)
    valid = PROFILE_RANGES[key]
    code, out, err = run(capsys, "replay", "--no-progress", "--limit", "1", "--set-profile",
                         f"{key}=-1")
    assert (code, out) == (2, "")
    assert err == f"kvtier: error: --set-profile {key}=-1: must be {valid.describe()}, got -1\n"


@pytest.mark.parametrize("text", ["nan", "-inf", "Infinity", "1e999", "-1e400"])
def test_a_number_that_is_not_finite_is_told_by_its_class(text: str) -> None:
    """parse_number's refusals of a number that is not finite are NotFinite (the profile
    option told them apart by the message's first words)."""
    with pytest.raises(NotFinite):
        parse_number(text)


@pytest.mark.parametrize("text", ["fast", "1_0", "+5", " 5"])
def test_text_that_is_no_number_is_not_not_finite(text: str) -> None:
    """Text that is no number is a plain ValueError, not NotFinite."""
    with pytest.raises(ValueError) as caught:
        parse_number(text)
    assert type(caught.value) is ValueError


@pytest.mark.parametrize("argv", [
    ["replay", "--trace-block-tokens", "9" * 4300],
    ["replay", "--bogus" + "x" * 100_000],
    ["sweep", "--eviction-policy", "x" * 100_000],
    ["replay", "--profile", "p" * 100_000],
])
def test_a_usage_error_quoting_a_huge_argument_is_cut_like_every_refusal(
        capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """argparse's refusals quoted the argument whole (a line of 4,444 characters for a
    4,300-digit --trace-block-tokens, 100 kB for a long unknown option), where every other
    refusal is cut at MAX_ERROR_CHARS."""
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("kvtier: error: ") and err.count("\n") == 1
    assert " ... (see 'kvtier " in err and len(err) <= MAX_ERROR_CHARS + 60, len(err)
