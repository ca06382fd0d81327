"""The fetch-cost options of the fleet simulator's shared tier (kvtier.cli_remote):
checked like every other option, defaults from the measured RemoteLink."""

from __future__ import annotations

import argparse

import pytest

from kvtier.cli_error import CLIError
from kvtier.cli_remote import RemoteFetch, remote_fetch, remote_fetch_options
from kvtier.sim.timemodel import RemoteLink


def parse(*argv: str) -> argparse.Namespace:
    """The options as replay would parse them, with --remote as given."""
    parser = argparse.ArgumentParser(prog="kvtier replay", exit_on_error=False)
    parser.add_argument("--remote", choices=("write-back", "write-through"))
    remote_fetch_options(parser)
    return parser.parse_args(list(argv))


def test_defaults_are_the_measured_link() -> None:
    """Nothing given: RemoteLink's defaults, the beats-recompute rule, a 1 s deadline."""
    assert remote_fetch(parse("--remote", "write-back")) == RemoteFetch(
        RemoteLink(), "beats-recompute", 1.0)
    assert remote_fetch(parse()) == RemoteFetch(RemoteLink(), "beats-recompute", 1.0)


def test_given_costs_reach_the_link() -> None:
    """2.5 ms, 12.5 GB/s, whole-prefix and 250 ms become the link and the fetch settings."""
    got = remote_fetch(parse("--remote", "write-through", "--remote-latency-ms", "2.5",
                             "--remote-bandwidth-gb-s", "12.5", "--remote-fetch",
                             "whole-prefix", "--remote-deadline-ms", "250"))
    assert got == RemoteFetch(RemoteLink(latency_s=2.5e-3, bytes_per_s=12.5e9),
                              "whole-prefix", 0.25)


@pytest.mark.parametrize(("argv", "message"), [
    (["--remote-latency-ms", "-1"], "must be a finite number in [0, 3.6e+06], got -1"),
    (["--remote-latency-ms", "nan"], "must be a finite number in [0, 3.6e+06], got nan"),
    (["--remote-bandwidth-gb-s", "0"], "must be a finite number in (0, 1e+06], got 0"),
    (["--remote-bandwidth-gb-s", "fast"], "expected a number, got 'fast'"),
    (["--remote-deadline-ms", "inf"], "must be a finite number in [0, 3.6e+06], got inf"),
    (["--remote-fetch", "some"], "invalid choice: 'some'"),
])
def test_bad_values_are_refused_naming_the_option(argv: list[str], message: str) -> None:
    """A bad value is an argparse error naming the option and the value."""
    with pytest.raises(argparse.ArgumentError) as raised:
        parse("--remote", "write-back", *argv)
    assert argv[0] in str(raised.value) and message in str(raised.value)


def test_costs_without_a_remote_tier_are_refused() -> None:
    """A fetch cost given without --remote is a mistake, said in one sentence."""
    with pytest.raises(CLIError, match="need --remote write-back or write-through"):
        remote_fetch(parse("--remote-bandwidth-gb-s", "25"))
