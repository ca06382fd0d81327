"""``--profile NAME --set-profile KEY=VALUE ...``: a time model profile with overrides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

from kvtier.cli_error import CLIError
from kvtier.cli_numbers import NotFinite, parse_int, parse_number
from kvtier.reprs import shown
from kvtier.sim import ModelProfile, get_profile
from kvtier.sim.timemodel import PROFILE_RANGES


def make_profile(name: str, assignments: Sequence[str]) -> ModelProfile:
    """Profile ``name`` with each ``KEY=VALUE`` applied, parsed by the field's type.

    Raises :class:`CLIError` naming the assignment for an unknown key, a key set twice, a
    value of the wrong type, a value that is not finite, or one the profile refuses.
    """
    types = {f.name: str(f.type) for f in fields(ModelProfile) if f.name != "name"}
    overrides: dict[str, object] = {}
    given: dict[str, str] = {}
    for item in assignments:
        # NOTE: the value is read as given, by the command line's rule for numbers: a strip
        # here took "pcie_bytes_per_s= 5" and "...=5\n" (spaces around a number), which
        # every option refuses.
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"--set-profile expects KEY=VALUE, got {shown(item)}")
        if key not in types:
            raise CLIError(f"--set-profile: unknown profile constant {shown(key)}; "
                           f"known: {', '.join(sorted(types))}")
        if key in given:  # NOTE: the first value was dropped without a word
            raise CLIError(f"--set-profile {key} is set twice ({shown(given[key])}, then "
                           f"{shown(text)})")
        given[key] = text
        overrides[key] = parse_constant(key, types[key], text)
    for key, value in overrides.items():
        # NOTE: each constant's range named by its option and the value as typed, read
        # from the profile's table of ranges (the profile's own refusal names the field and
        # its float: "pcie_bytes_per_s must be ..., got -1.0" for pcie_bytes_per_s=-1).
        valid = PROFILE_RANGES.get(key)
        if valid is not None and not valid.contains(value):
            raise CLIError(f"--set-profile {key}={given[key]}: must be {valid.describe()}, "
                           f"got {given[key]}")
    try:
        return get_profile(name, **overrides)
    except ValueError as exc:
        raise CLIError(f"invalid profile: {exc}") from None


def parse_constant(key: str, type_name: str, text: str) -> bool | int | float:
    """``text`` as the value of profile field ``key`` of type ``type_name``."""
    if type_name == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise CLIError(f"--set-profile {key}: expected true or false, got {shown(text)}")
    kind = "an integer" if type_name == "int" else "a number"
    try:
        number = parse_number(text)
    except NotFinite:
        raise CLIError(f"--set-profile {key}: expected a finite number, got "
                       f"{shown(text)}") from None
    except ValueError:  # NOTE: by the command line's rule: no 1_000, +5, nan
        raise CLIError(f"--set-profile {key}: expected {kind}, got {shown(text)}") from None
    if type_name != "int":
        return number
    try:
        return parse_int(text)
    except ValueError:
        if not number.is_integer():
            raise CLIError(f"--set-profile {key}: expected an integer, got {shown(text)}") from None
        return int(number)  # written as a float: 1e6, 131072.0
