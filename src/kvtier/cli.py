"""The ``kvtier`` command: a thin argparse layer over the library.

Every command prints a human table, then one JSON line last on stdout. Bad input (an unknown
option, a missing or malformed trace, an impossible configuration) ends with one sentence
on stderr prefixed ``kvtier: error:`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from kvtier import __version__
from kvtier.config import HASH_ALGOS, CacheConfig
from kvtier.replay import ReplayReport, replay_manager
from kvtier.sim import AzureTrace, MooncakeTrace, SyntheticChat, TraceFormatError, Workload

EXIT_USAGE = 2
_CONFIG_DEFAULTS = CacheConfig()

REPLAY_DESCRIPTION = """\
Replay a workload through the block manager alone: each request is admitted whole, in
arrival order, with N requests in flight; the oldest is released (its full blocks stay
cached) as each new one arrives. This is a manager-level replay: the step scheduler and
the time model come later, so the report has hit rates, tier traffic and manager CPU time,
not latencies.

TRACE is a Mooncake trace (.jsonl, with prefix hash ids) or an Azure 2023 trace (.csv,
prefixes synthesised from --seed). Without TRACE, the built-in synthetic chat workload
(2,000 requests, seeded by --seed) is replayed."""


class CLIError(Exception):
    """Bad input the user can fix; ``main`` prints it as one line and exits 2."""


def build_parser() -> argparse.ArgumentParser:
    """The ``kvtier`` argument parser. Pure."""
    parser = argparse.ArgumentParser(
        prog="kvtier",
        description="kvtier: a tiered KV-cache block manager with exact two-phase batch "
        "admission.",
    )
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    replay = commands.add_parser(
        "replay",
        help="replay a trace through the block manager (manager-level, no time model yet)",
        description=REPLAY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("trace", metavar="TRACE", nargs="?", type=Path,
                        help="a .jsonl (Mooncake) or .csv (Azure) trace; default: synthetic chat")
    replay.add_argument("--limit", metavar="N", type=_int_at_least(0),
                        help="replay only the first N requests")
    replay.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic workload and of Azure prefixes (default: 0)")
    replay.add_argument("--in-flight", metavar="N", type=_int_at_least(1), default=16,
                        help="requests live at once (default: 16)")
    replay.add_argument("--tokens-per-block", metavar="N", type=int, default=32,
                        help="tokens per KV block, a power of two (default: 32)")
    replay.add_argument("--gpu-blocks", metavar="N", type=int, default=16384,
                        help="GPU tier size in blocks (default: 16384)")
    replay.add_argument("--host-blocks", metavar="N", type=int, default=0,
                        help="host tier size in blocks; 0 disables offloading (default: 0)")
    replay.add_argument("--no-partial-reuse", action="store_true",
                        help="reuse full blocks only")
    replay.add_argument("--no-copy-on-partial-reuse", action="store_true",
                        help="reuse a partial block only in place, never by copying it")
    replay.add_argument("--offload-min-priority", metavar="P", type=int,
                        default=_CONFIG_DEFAULTS.offload_min_priority,
                        help="evicted GPU blocks of at least this priority (0..100) go to the "
                        "host tier (default: %(default)s)")
    replay.add_argument("--hash-algo", choices=HASH_ALGOS, default=_CONFIG_DEFAULTS.hash_algo,
                        help="block hash (default: %(default)s)")
    replay.add_argument("--json", metavar="FILE", type=Path,
                        help="also write the full report to FILE as JSON")
    replay.add_argument("--no-progress", action="store_true",
                        help="no progress bar on stderr")
    replay.set_defaults(run=_run_replay)
    return parser


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, or a usage error (status 2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except CLIError as exc:
        print(f"kvtier: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kvtier: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # NOTE: the reader left (``kvtier replay | head``); point stdout at devnull so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# ---- replay ------------------------------------------------------------------------------


def _run_replay(args: argparse.Namespace) -> int:
    config = _make_config(args)
    workload = _make_workload(args, config)
    with _progress_bar(_num_requests(workload), enabled=not args.no_progress) as progress:
        try:
            report = replay_manager(workload, config, args.in_flight, progress)
        except TraceFormatError as exc:
            raise CLIError(f"malformed trace: {exc}") from None
        except ValueError as exc:
            raise CLIError(f"cannot replay: {exc}") from None
    line = json.dumps(report.to_dict())
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise CLIError(f"cannot write {args.json}: {exc.strerror or exc}") from None
    for row in format_replay(report):
        print(row)
    print(line)
    return 0


def _make_config(args: argparse.Namespace) -> CacheConfig:
    try:
        return CacheConfig(
            tokens_per_block=args.tokens_per_block,
            num_gpu_blocks=args.gpu_blocks,
            num_host_blocks=args.host_blocks,
            enable_partial_reuse=not args.no_partial_reuse,
            copy_on_partial_reuse=not args.no_copy_on_partial_reuse,
            offload_min_priority=args.offload_min_priority,
            hash_algo=args.hash_algo,
        )
    except ValueError as exc:
        raise CLIError(f"invalid configuration: {exc}") from None


def _make_workload(args: argparse.Namespace, config: CacheConfig) -> Workload:
    path: Path | None = args.trace
    try:
        if path is None:
            if args.limit is None:
                return SyntheticChat(seed=args.seed)
            return SyntheticChat(num_requests=args.limit, seed=args.seed)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return MooncakeTrace(path, tokens_per_block=config.tokens_per_block, limit=args.limit)
        if suffix == ".csv":
            return AzureTrace(path, seed=args.seed, limit=args.limit)
    except TraceFormatError as exc:
        raise CLIError(f"malformed trace: {exc}") from None
    except OSError as exc:
        raise CLIError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CLIError(f"invalid option for trace {path}: {exc}") from None
    raise CLIError(f"TRACE must be a .jsonl (Mooncake) or .csv (Azure) file, got {str(path)!r}")


def _num_requests(workload: Workload) -> int | None:
    if isinstance(workload, SyntheticChat):
        return workload.num_requests
    if isinstance(workload, (MooncakeTrace, AzureTrace)):
        return len(workload)
    return None


@contextmanager
def _progress_bar(total: int | None, enabled: bool) -> Iterator[Callable[[int], object] | None]:
    """A tqdm bar's ``update`` on stderr; ``None`` when disabled or tqdm is not installed."""
    if not enabled:
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield None
        return
    with tqdm(total=total, unit="req", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield bar.update


def format_replay(report: ReplayReport) -> list[str]:
    """The human table of a replay report, one string per line. Pure."""
    config = report.config
    workload = report.workload
    gpu, host = report.gpu, report.host
    if not config["enable_partial_reuse"]:
        partial = "off"
    elif config["copy_on_partial_reuse"]:
        partial = "on (copy or in place)"
    else:
        partial = "on (in place only)"
    transfers = " | ".join(
        f"{kind} {t['num_ops']:,} ops ({t['num_tokens']:,} tokens)"
        for kind, t in report.transfers.items()
    )
    us = report.manager_us_per_block
    source = [str(workload.get("kind", "workload"))]
    for key in ("path", "seed"):
        if key in workload:
            source.append(f"{key} {workload[key]}")
    rows = [
        ("workload", f"{workload.get('name')} ({', '.join(source)})"),
        ("cache", f"{config['tokens_per_block']} tokens/block, {config['num_gpu_blocks']:,} GPU "
                  f"+ {config['num_host_blocks']:,} host blocks, {config['hash_algo']}"),
        ("policy", f"partial reuse {partial}, offload at priority >= "
                   f"{config['offload_min_priority']}"),
        ("requests", f"{report.num_requests:,} ({report.in_flight} in flight, "
                     f"{report.num_early_releases:,} released early)"),
        ("prompt tokens", f"{report.num_prompt_tokens:,} ({report.num_reused_tokens:,} reused)"),
        ("hit rate", f"{report.token_hit_rate:.4f} of tokens; of blocks: GPU "
                     f"{gpu['hit_rate']:.4f}, host {host['hit_rate']:.4f}"),
        ("blocks", f"onboarded {host['onboarded_blocks']:,} | offloaded "
                   f"{gpu['offloaded_blocks']:,} | evicted GPU {gpu['evicted_blocks']:,}, "
                   f"host {host['evicted_blocks']:,}"),
        ("transfers", transfers),
        ("manager time", f"{'n/a' if us is None else f'{us:.3f}'} us/block "
                         f"({report.num_admitted_blocks:,} blocks admitted, "
                         f"{report.manager_s:.3f} s of {report.wall_s:.3f} s wall)"),
    ]
    return [f"{name:<14} {value}" for name, value in rows]
