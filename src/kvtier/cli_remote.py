"""The fleet simulator's shared tier on the command line: ``--remote-url`` (a real Redis)
and what a fetch costs (``--remote-latency-ms``, ``--remote-bandwidth-gb-s``,
``--remote-fetch``, ``--remote-deadline-ms``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, NamedTuple

from kvtier.cli_error import CLIError
from kvtier.cli_numbers import number_in
from kvtier.sim.fleet import FETCH_MODES, FetchMode, stand_in_namespace
from kvtier.sim.timemodel import DEFAULT_REMOTE_BYTES_PER_S, DEFAULT_REMOTE_LATENCY_S, RemoteLink

if TYPE_CHECKING:
    from kvtier.remote import RedisRemoteStore

CONNECT_TIMEOUT_S = 2.0
MAX_LATENCY_MS = 3_600_000.0  # an hour: RemoteLink's bound
MAX_DEADLINE_MS = 3_600_000.0


def connect_redis(url: str, tokens_per_block: int) -> RedisRemoteStore:
    """A store on the Redis at ``url`` that answered PING; :class:`CLIError` in one sentence
    if redis-py is missing, the URL is invalid or the server does not answer."""
    try:
        from kvtier.remote import RedisRemoteStore
    except ImportError:
        raise CLIError("--remote-url needs redis-py: pip install 'kvtier[redis]'") from None
    try:
        store = RedisRemoteStore(url, stand_in_namespace(tokens_per_block),
                                 timeout_s=CONNECT_TIMEOUT_S)
    except ImportError:
        raise CLIError("--remote-url needs redis-py: pip install 'kvtier[redis]'") from None
    except ValueError as exc:
        raise CLIError(f"invalid --remote-url: {exc}") from None
    problem = store.check_connection()
    if problem is not None:
        store.close()
        raise CLIError(f"cannot use --remote-url: {problem}")
    return store


DEFAULT_DEADLINE_MS = 1000.0


def remote_fetch_options(parser: argparse.ArgumentParser) -> None:
    """What the fleet simulator charges for a fetch from its shared tier (with --remote)."""
    parser.add_argument("--remote-latency-ms", metavar="MS", type=number_in(0, MAX_LATENCY_MS),
                        help="with --remote: fixed cost of one fetch from the shared tier "
                        f"(default: {DEFAULT_REMOTE_LATENCY_S * 1e3:g}, measured by "
                        "benchmarks/bench_remote.py)")
    parser.add_argument("--remote-bandwidth-gb-s", metavar="GB/S",
                        type=number_in(0, 1e6, low_open=True),
                        help="with --remote: the shared tier's read (and write) throughput in "
                        "GB/s (1e9 bytes/s), all instances together (default: "
                        f"{DEFAULT_REMOTE_BYTES_PER_S / 1e9:g}, measured by "
                        "benchmarks/bench_remote.py)")
    parser.add_argument("--remote-fetch", choices=FETCH_MODES,
                        help="with --remote: fetch only the blocks whose fetch beats their "
                        "recompute, or the whole prefix found (default: "
                        f"{FETCH_MODES[0]})")
    parser.add_argument("--remote-deadline-ms", metavar="MS",
                        type=number_in(0, MAX_DEADLINE_MS),
                        help="with --remote: the longest a request waits for its fetch "
                        f"(default: {DEFAULT_DEADLINE_MS:g})")


class RemoteFetch(NamedTuple):
    """What ``remote_fetch_options`` set: ``simulate_fleet``'s ``remote_link``, ``fetch``
    and ``fetch_deadline_s``."""

    link: RemoteLink
    fetch: FetchMode
    deadline_s: float


def remote_fetch(args: argparse.Namespace) -> RemoteFetch:
    """The fetch costs of ``remote_fetch_options`` (defaults where not given);
    :class:`CLIError` if one was given without ``--remote``."""
    given = (args.remote_latency_ms, args.remote_bandwidth_gb_s, args.remote_fetch,
             args.remote_deadline_ms)
    if args.remote is None and any(v is not None for v in given):
        raise CLIError("--remote-latency-ms, --remote-bandwidth-gb-s, --remote-fetch and "
                       "--remote-deadline-ms need --remote write-back or write-through")
    latency_ms, gb_per_s, fetch, deadline_ms = given
    try:
        link = RemoteLink(
            latency_s=DEFAULT_REMOTE_LATENCY_S if latency_ms is None else latency_ms / 1e3,
            bytes_per_s=DEFAULT_REMOTE_BYTES_PER_S if gb_per_s is None else gb_per_s * 1e9)
    except ValueError as exc:
        raise CLIError(f"invalid remote link: {exc}") from None
    return RemoteFetch(link, FETCH_MODES[0] if fetch is None else fetch,
                       (DEFAULT_DEADLINE_MS if deadline_ms is None else deadline_ms) / 1e3)
