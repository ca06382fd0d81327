"""Tests of the step time model and the profile registry."""

from __future__ import annotations

import re

import pytest

from kvtier.sim import PROFILES, ModelProfile, TimeModel, get_profile


def make_model(**overrides: object) -> TimeModel:
    return TimeModel(get_profile("tiny-test", **overrides))


def test_registry_has_the_named_profiles() -> None:
    """The three documented profiles are registered under their names."""
    assert {"llama3-8b-h100", "llama3-70b-h100x4", "tiny-test"} <= set(PROFILES)
    for name, profile in PROFILES.items():
        assert profile.name == name


def test_llama3_8b_constants() -> None:
    """Llama-3-8B holds 128 KiB of KV per token and moves it over 55 GB/s PCIe."""
    profile = get_profile("llama3-8b-h100")
    assert profile.kv_bytes_per_token == 131072
    assert profile.pcie_bytes_per_s == 55e9
    assert get_profile("llama3-70b-h100x4").kv_bytes_per_token == 327680


def test_compute_only_step() -> None:
    """A step costs overhead + prefill tokens + decode sequences (tiny-test constants)."""
    # 1/8 + 64 * 1/1024 + 4 * 1/64 = 0.125 + 0.0625 + 0.0625
    assert make_model().step_seconds(64, 4, 0, 0) == 0.25


def test_serial_transfers_add_to_compute() -> None:
    """Without overlap the transfer time adds; H2D and D2H run at the same time."""
    # compute 0.25 s; max(2**29, 2**28) bytes at 2**30 B/s = 0.5 s
    assert make_model().step_seconds(64, 4, 1 << 29, 1 << 28) == 0.75
    assert make_model().transfer_seconds(1 << 28, 1 << 29) == 0.5


def test_overlapped_transfers_take_the_max() -> None:
    """With overlap a step lasts as long as the longer of compute and transfer."""
    model = make_model(overlap_transfers=True)
    assert model.step_seconds(64, 4, 1 << 29, 0) == 0.5
    assert model.step_seconds(64, 4, 1 << 27, 0) == 0.25


def test_both_directions_together_move_at_the_two_way_ceiling() -> None:
    """Each direction moves at most ``pcie_bytes_per_s``; both at once at most
    ``pcie_duplex`` times twice that: a step moving as much each way takes longer than one
    direction alone (before, both ran at the one-way rate at once: a full-duplex link that
    no PCIe host gives, a figure better than the hardware)."""
    model = make_model(pcie_duplex=0.75)  # 2**30 B/s one way, 1.5 * 2**30 both ways
    assert model.transfer_seconds(1 << 30, 0) == 1.0
    assert model.transfer_seconds(1 << 29, 1 << 30) == 1.0  # the larger direction bounds it
    assert model.transfer_seconds(1 << 30, 1 << 30) == 2 / 1.5  # the two-way ceiling does
    assert model.step_seconds(0, 0, 1 << 30, 1 << 30) == 2 / 1.5
    # Measured on the H200 host: 97.8 GB/s both ways against 55.4 + 55.3 one way.
    assert get_profile("llama3-8b-h100").pcie_duplex == 0.88
    assert make_model().transfer_seconds(1 << 30, 1 << 30) == 1.0  # tiny-test: ideal duplex


@pytest.mark.parametrize("value", [0.4, 1.5, float("nan"), True])
def test_pcie_duplex_is_a_fraction_from_half_to_one(value: object) -> None:
    """Both directions at once move at least one direction's worth and at most two."""
    with pytest.raises(ValueError, match="pcie_duplex"):
        make_model(pcie_duplex=value)


def test_empty_step_costs_nothing_and_pure_transfer_costs_only_pcie() -> None:
    """No work costs 0 s (no overhead); a copy-only step costs only its transfer."""
    model = make_model()
    assert model.step_seconds(0, 0, 0, 0) == 0.0
    assert model.step_seconds(0, 0, 0, 1 << 30) == 1.0


def test_kv_bytes() -> None:
    """KV bytes are tokens times the profile's bytes per token."""
    assert make_model().kv_bytes(3) == 3072


def test_overrides_replace_fields() -> None:
    """Overrides change only the named fields of the registered profile."""
    profile = get_profile("llama3-8b-h100", pcie_bytes_per_s=25e9)
    assert profile.pcie_bytes_per_s == 25e9
    assert profile.kv_bytes_per_token == 131072
    assert PROFILES["llama3-8b-h100"].pcie_bytes_per_s == 55e9


def test_unknown_profile_name_is_rejected() -> None:
    """An unknown profile name raises ValueError naming it."""
    with pytest.raises(ValueError, match="'llama9'"):
        get_profile("llama9")


def test_unknown_override_field_is_rejected() -> None:
    """An override of a field ModelProfile lacks raises ValueError naming the field."""
    with pytest.raises(ValueError, match="'pcie_gbps'"):
        get_profile("tiny-test", pcie_gbps=3)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kv_bytes_per_token", 0),
        ("prefill_s_per_token", -1.0),
        ("decode_s_per_seq", float("nan")),
        ("step_overhead_s", "1"),
        ("pcie_bytes_per_s", 0.0),
        ("overlap_transfers", 1),
    ],
)
def test_invalid_profile_values_name_the_field(field: str, value: object) -> None:
    """A bad profile value raises ValueError naming the field and the value."""
    with pytest.raises(ValueError, match=f"{field} .*{re.escape(repr(value))}"):
        get_profile("tiny-test", **{field: value})


@pytest.mark.parametrize(
    "args", [(-1, 0, 0, 0), (0, -1, 0, 0), (0, 0, -1, 0), (0, 0, 0, 1.5)]
)
def test_negative_or_fractional_step_arguments_are_rejected(
    args: tuple[int, int, int, int],
) -> None:
    """Step arguments must be integers >= 0."""
    with pytest.raises(ValueError, match=r"must be an integer in 0\.\."):
        make_model().step_seconds(*args)


def test_time_model_requires_a_profile() -> None:
    """TimeModel rejects anything but a ModelProfile."""
    with pytest.raises(ValueError, match="profile must be a ModelProfile"):
        TimeModel("tiny-test")  # type: ignore[arg-type]
    assert isinstance(make_model().profile, ModelProfile)
