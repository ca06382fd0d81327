"""The ``kvtier`` command: a thin argparse layer over the simulator.

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
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtier import __version__
from kvtier.config import HASH_ALGOS, CacheConfig
from kvtier.router import POLICIES as ROUTER_POLICIES
from kvtier.router import make_policy
from kvtier.scheduler import ADMISSIONS, CAPACITY_POLICIES, SchedulerConfig
from kvtier.sim import (
    PROFILES,
    AzureTrace,
    ModelProfile,
    MooncakeTrace,
    RaceWorkload,
    SimReport,
    SimulationStalled,
    SyntheticChat,
    TraceFormatError,
    Workload,
    format_report,
    format_side_by_side,
    format_sweep,
    get_profile,
    oracle_bounds,
    simulate,
)
from kvtier.sim.fleet import format_fleet_report, simulate_fleet
from kvtier.sim.plot import plot_sweep, require_matplotlib

if TYPE_CHECKING:
    from kvtier.remote import RedisRemoteStore

EXIT_USAGE = 2
DEFAULT_GPU_BLOCKS = 16384
COMPARE_HOST_FACTOR = 4
_CACHE = CacheConfig()
_SCHED = SchedulerConfig()

WORKLOAD_HELP = """\
TRACE is a Mooncake trace (.jsonl, with prefix hash ids) or an Azure 2023 trace (.csv,
prefixes synthesised from --seed). Without TRACE, the built-in synthetic chat workload
(2,000 requests, seeded by --seed) is used. Requests that could never fit the GPU pool are
skipped and counted. Latencies are virtual: the time model of --profile."""

REPLAY_DESCRIPTION = f"""\
Simulate serving a workload: requests arrive at their trace times (x --time-scale), a step
scheduler fills each forward pass with up to --max-num-tokens tokens through the tiered block
manager, and a time model advances a virtual clock by each step's compute and PCIe copies.
Reports hit rates per tier, reuse credited vs obtained, budget overflow, preemptions,
TTFT/E2E percentiles, throughput, tier traffic and the scheduler's real CPU time per step.

{WORKLOAD_HELP}"""

COMPARE_DESCRIPTION = f"""\
Run the same workload four ways: claim vs probe admission, each with the GPU tier alone and
with a host tier (--host-blocks, default {COMPARE_HOST_FACTOR} x --gpu-blocks), side by side.
Probe admission is the legacy estimate-then-admit loop: its overflow and lost reuse show the
race that claim admission closes; the host columns show what the host tier is worth.

{WORKLOAD_HELP}"""

SWEEP_DESCRIPTION = f"""\
One simulation per capacity: every --gpu-blocks value with every --host-blocks value
(comma-separated). The table gives hit rate and TTFT against capacity beside the offline
bounds for the same capacity (unlimited cache; Belady's optimal eviction over GPU + host
blocks). --plot FILE draws them as a PNG (needs the 'plot' extra).

{WORKLOAD_HELP}"""


class CLIError(Exception):
    """Bad input the user can fix; ``main`` prints it as one line and exits 2."""


# ---- the parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``kvtier`` argument parser. Pure."""
    parser = argparse.ArgumentParser(
        prog="kvtier",
        description="kvtier: a tiered KV-cache block manager with exact two-phase batch "
        "admission, and a serving simulator to measure it.",
    )
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options()
    raw = argparse.RawDescriptionHelpFormatter

    replay = commands.add_parser("replay", parents=[common], formatter_class=raw,
                                 help="simulate serving a trace; the main command",
                                 description=REPLAY_DESCRIPTION)
    replay.add_argument("--gpu-blocks", metavar="N", type=int, default=DEFAULT_GPU_BLOCKS,
                        help="GPU tier size in blocks (default: %(default)s)")
    replay.add_argument("--host-blocks", metavar="N", type=int, default=0,
                        help="host tier size in blocks; 0 disables offloading (default: 0)")
    _admission_option(replay)
    _oracle_option(replay, default=False)
    replay.add_argument("--instances", metavar="N", type=_int_at_least(1), default=1,
                        help="simulate N engine instances, each with --gpu-blocks and "
                        "--host-blocks, behind a router (default: 1)")
    replay.add_argument("--router", choices=ROUTER_POLICIES, default="cache-aware",
                        help="how --instances share the requests (default: %(default)s)")
    replay.add_argument("--router-alpha", metavar="X", type=float, default=1.0,
                        help="cache-aware: weight of load (queue depth / max batch size) "
                        "against the cached share of the prompt (default: %(default)s)")
    replay.add_argument("--remote", choices=("write-back", "write-through"),
                        help="with --instances: a shared remote tier (content-addressed, "
                        "unbounded, fetches not timed) that blocks leaving an instance "
                        "(write-back) or every stored block (write-through) go to, and "
                        "arriving requests import their prefix from")
    replay.add_argument("--remote-url", metavar="URL",
                        help="with --remote: keep the shared tier's blocks in this Redis "
                        "(redis://[user:password@]host:port/db, rediss:// for TLS; extra "
                        "'redis') instead of in memory, so its latency and faults are real")
    replay.set_defaults(run=_run_replay)

    compare = commands.add_parser("compare", parents=[common], formatter_class=raw,
                                  help="claim vs probe admission, GPU only vs GPU + host",
                                  description=COMPARE_DESCRIPTION)
    compare.add_argument("--gpu-blocks", metavar="N", type=int, default=DEFAULT_GPU_BLOCKS,
                         help="GPU tier size in blocks (default: %(default)s)")
    compare.add_argument("--host-blocks", metavar="N", type=_int_at_least(1),
                         help=f"host tier of the GPU + host runs (default: "
                         f"{COMPARE_HOST_FACTOR} x --gpu-blocks)")
    _oracle_option(compare, default=False)
    compare.set_defaults(run=_run_compare)

    sweep = commands.add_parser("sweep", parents=[common], formatter_class=raw,
                                help="hit rate and TTFT against capacity, with the oracle bound",
                                description=SWEEP_DESCRIPTION)
    sweep.add_argument("--gpu-blocks", metavar="N,N,...", type=_int_list(1),
                       default=[DEFAULT_GPU_BLOCKS],
                       help=f"GPU tier sizes in blocks (default: {DEFAULT_GPU_BLOCKS})")
    sweep.add_argument("--host-blocks", metavar="N,N,...", type=_int_list(0),
                       default=[0, 4096, 16384],
                       help="host tier sizes in blocks (default: 0,4096,16384)")
    _admission_option(sweep)
    _oracle_option(sweep, default=True)
    sweep.add_argument("--plot", metavar="FILE", type=Path,
                       help="also draw hit rate and TTFT against capacity as a PNG "
                       "(pip install 'kvtier[plot]')")
    sweep.set_defaults(run=_run_sweep)
    return parser


def _common_options() -> argparse.ArgumentParser:
    """Workload, cache policy, scheduler, time model and output options of every command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("trace", metavar="TRACE", nargs="?", type=Path,
                   help="a .jsonl (Mooncake) or .csv (Azure) trace; default: --workload")
    p.add_argument("--workload", choices=("synthetic-chat", "race"), default="synthetic-chat",
                   help="the built-in workload when no TRACE is given: seeded multi-turn chat, "
                   "or 'race', sized from the cache options to provoke the admission race "
                   "(S1 at scale; needs --host-blocks) (default: %(default)s)")
    p.add_argument("--limit", metavar="N", type=_int_at_least(0),
                   help="replay only the first N requests")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic workload and of Azure prefixes (default: 0)")
    p.add_argument("--time-scale", metavar="X", type=_positive_float, default=1.0,
                   help="multiply arrival times by X; > 1 lowers the load (default: 1)")
    p.add_argument("--tokens-per-block", metavar="N", type=int, default=_CACHE.tokens_per_block,
                   help="tokens per KV block, a power of two (default: %(default)s)")
    p.add_argument("--no-partial-reuse", action="store_true", help="reuse full blocks only")
    p.add_argument("--no-copy-on-partial-reuse", action="store_true",
                   help="reuse a partial block only in place, never by copying it")
    p.add_argument("--offload-min-priority", metavar="P", type=int,
                   default=_CACHE.offload_min_priority,
                   help="evicted GPU blocks of at least this priority (0..100) go to the host "
                   "tier (default: %(default)s)")
    p.add_argument("--hash-algo", choices=HASH_ALGOS, default=_CACHE.hash_algo,
                   help="block hash (default: %(default)s)")
    p.add_argument("--max-num-tokens", metavar="N", type=int, default=_SCHED.max_num_tokens,
                   help="token budget of one step (default: %(default)s)")
    p.add_argument("--max-batch-size", metavar="N", type=int, default=_SCHED.max_batch_size,
                   help="requests in one step (default: %(default)s)")
    p.add_argument("--no-chunked-prefill", action="store_true",
                   help="prefill each prompt in one step")
    p.add_argument("--max-chunk-tokens", metavar="N", type=int,
                   help="cap one request's prefill chunk (default: the step budget)")
    p.add_argument("--capacity-policy", choices=CAPACITY_POLICIES, default=_SCHED.capacity_policy,
                   help="reserve decode blocks up front, or admit more and preempt "
                   "(default: %(default)s)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="llama3-8b-h100",
                   help="time model profile (default: %(default)s)")
    p.add_argument("--set-profile", metavar="KEY=VALUE", action="append", default=[],
                   help="override one profile constant, e.g. pcie_bytes_per_s=2.5e10 "
                   "(repeatable)")
    p.add_argument("--json", metavar="FILE", type=Path,
                   help="also write the full report to FILE as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _admission_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admission", choices=ADMISSIONS, default=_SCHED.admission,
                        help="claim: exact two-phase credit; probe: the legacy racy loop "
                        "(default: %(default)s)")


def _oracle_option(parser: argparse.ArgumentParser, default: bool) -> None:
    parser.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=default,
                        help="add the unlimited and Belady hit rates for the same capacity "
                        f"(default: {'on' if default else 'off'})")


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


def _int_list(minimum: int) -> Callable[[str], list[int]]:
    """An argparse ``type`` accepting comma-separated integers >= ``minimum``."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {text!r}") from None
        if any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"every value must be >= {minimum}, got {text!r}")
        return values

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


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


# ---- commands ------------------------------------------------------------------------------


def _run_replay(args: argparse.Namespace) -> int:
    if args.instances > 1:
        return _run_fleet(args)
    if args.remote is not None or args.remote_url is not None:
        raise CLIError("--remote needs --instances > 1 (a remote tier shared by a fleet)")
    cache = _make_cache(args, args.gpu_blocks, args.host_blocks)
    sched = _make_sched(args, args.admission)
    profile = _make_profile(args)
    workload = _make_workload(args, cache)
    with _progress_bar(_num_requests(workload), not args.no_progress) as progress:
        report = _simulate(workload, cache, sched, profile, args, progress, args.oracle)
    _emit(format_report(report), report.to_dict(), args.json)
    return 0


def _run_fleet(args: argparse.Namespace) -> int:
    if args.oracle:
        raise CLIError("--oracle is not supported with --instances > 1")
    cache = _make_cache(args, args.gpu_blocks, args.host_blocks)
    sched = _make_sched(args, args.admission)
    profile = _make_profile(args)
    workload = _make_workload(args, cache)
    try:
        policy = make_policy(args.router, alpha=args.router_alpha)
    except ValueError as exc:
        raise CLIError(f"invalid configuration: --router-alpha: {exc}") from None
    remote_store = None
    if args.remote_url is not None:
        if args.remote is None:
            raise CLIError("--remote-url needs --remote write-back or write-through")
        remote_store = _redis_store(args.remote_url, cache.tokens_per_block)
    with _progress_bar(_num_requests(workload), not args.no_progress) as progress:
        try:
            report = simulate_fleet(workload, cache, args.instances, policy, sched, profile,
                                    args.time_scale, progress, remote=args.remote,
                                    remote_store=remote_store)
        except TraceFormatError as exc:
            raise CLIError(f"malformed trace: {exc}") from None
        except (ValueError, SimulationStalled) as exc:
            raise CLIError(f"cannot replay: {exc}") from None
    _emit(format_fleet_report(report), report.to_dict(), args.json)
    return 0


def _redis_store(url: str, tokens_per_block: int) -> RedisRemoteStore:
    """The fleet's shared tier on the Redis at ``url``; one sentence if it can't be used."""
    try:
        from kvtier.remote import RedisRemoteStore
        from kvtier.sim.fleet import stand_in_namespace

        store = RedisRemoteStore(url, stand_in_namespace(tokens_per_block), timeout_s=2.0)
    except ImportError:
        raise CLIError("--remote-url needs redis-py: pip install 'kvtier[redis]'") from None
    except ValueError as exc:
        raise CLIError(f"invalid --remote-url: {exc}") from None
    problem = store.check_connection()
    if problem is not None:
        raise CLIError(f"cannot use --remote-url: {problem}")
    return store


def _run_compare(args: argparse.Namespace) -> int:
    host_blocks = args.host_blocks
    if host_blocks is None:
        host_blocks = COMPARE_HOST_FACTOR * args.gpu_blocks
    caches = [_make_cache(args, args.gpu_blocks, 0),
              _make_cache(args, args.gpu_blocks, host_blocks)]
    profile = _make_profile(args)
    workload = _make_workload(args, caches[1])  # the race workload is sized for the host tier
    runs = [(admission, cache) for admission in ("claim", "probe") for cache in caches]
    total = _num_requests(workload)
    reports = []
    with _progress_bar(None if total is None else total * len(runs),
                       not args.no_progress) as progress:
        for admission, cache in runs:
            sched = _make_sched(args, admission)
            reports.append(_simulate(workload, cache, sched, profile, args, progress, False))
    if args.oracle:
        reports = _with_oracle(workload, reports)
    labels = [f"{a} {'GPU+host' if c.num_host_blocks else 'GPU only'}" for a, c in runs]
    document = {"command": "compare",
                "runs": [{"label": label, "report": r.to_dict()}
                         for label, r in zip(labels, reports)]}
    _emit(format_side_by_side(labels, reports), document, args.json)
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    if args.plot is not None:
        _require_matplotlib()  # fail before the long part
    caches = [_make_cache(args, gpu, host) for gpu in args.gpu_blocks for host in args.host_blocks]
    sched = _make_sched(args, args.admission)
    profile = _make_profile(args)
    workload = _make_workload(args, caches[1])  # the race workload is sized for the host tier
    total = _num_requests(workload)
    reports = []
    with _progress_bar(None if total is None else total * len(caches),
                       not args.no_progress) as progress:
        for cache in caches:
            reports.append(_simulate(workload, cache, sched, profile, args, progress, False))
    if args.oracle:
        reports = _with_oracle(workload, reports)
    if args.plot is not None:
        _plot_sweep(reports, args.plot)
    document = {"command": "sweep", "runs": [r.to_dict() for r in reports]}
    _emit(format_sweep(reports), document, args.json)
    return 0


def _simulate(workload: Workload, cache: CacheConfig, sched: SchedulerConfig,
              profile: ModelProfile, args: argparse.Namespace,
              progress: Callable[[int], object] | None, oracle: bool) -> SimReport:
    try:
        report = simulate(workload, cache, sched, profile, args.time_scale, progress, oracle)
    except TraceFormatError as exc:
        raise CLIError(f"malformed trace: {exc}") from None
    except (ValueError, SimulationStalled) as exc:
        raise CLIError(f"cannot replay: {exc}") from None
    if report.num_requests == 0 and report.num_rejected_too_large:
        raise CLIError(
            f"all {report.num_rejected_too_large} requests are too large for "
            f"{cache.num_gpu_blocks} GPU blocks of {cache.tokens_per_block} tokens; "
            "raise --gpu-blocks")
    return report


def _with_oracle(workload: Workload, reports: list[SimReport]) -> list[SimReport]:
    """The reports with the oracle bounds at each one's GPU + host capacity."""
    tpb = _int(reports[0].cache_config["tokens_per_block"])
    capacities = [_int(r.cache_config["num_gpu_blocks"]) + _int(r.cache_config["num_host_blocks"])
                  for r in reports]
    try:
        bounds = oracle_bounds(workload, tpb, capacities)
    except TraceFormatError as exc:
        raise CLIError(f"malformed trace: {exc}") from None
    return [replace(r, oracle=b) for r, b in zip(reports, bounds)]


def _int(value: object) -> int:
    assert type(value) is int, value
    return value


def _emit(table: list[str], document: dict[str, Any], json_path: Path | None) -> None:
    """Write ``document`` to ``json_path`` if given, then print the table and the JSON line."""
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise CLIError(f"cannot write {json_path}: {exc.strerror or exc}") from None
    for row in table:
        print(row)
    print(json.dumps(document))


# ---- inputs --------------------------------------------------------------------------------


def _make_cache(args: argparse.Namespace, gpu_blocks: int, host_blocks: int) -> CacheConfig:
    try:
        return CacheConfig(
            tokens_per_block=args.tokens_per_block,
            num_gpu_blocks=gpu_blocks,
            num_host_blocks=host_blocks,
            enable_partial_reuse=not args.no_partial_reuse,
            copy_on_partial_reuse=not args.no_copy_on_partial_reuse,
            offload_min_priority=args.offload_min_priority,
            hash_algo=args.hash_algo,
        )
    except ValueError as exc:
        raise CLIError(f"invalid configuration: {exc}") from None


def _make_sched(args: argparse.Namespace, admission: str) -> SchedulerConfig:
    try:
        return SchedulerConfig(
            max_num_tokens=args.max_num_tokens,
            max_batch_size=args.max_batch_size,
            enable_chunked_prefill=not args.no_chunked_prefill,
            max_chunk_tokens=args.max_chunk_tokens,
            capacity_policy=args.capacity_policy,
            admission=admission,
        )
    except ValueError as exc:
        raise CLIError(f"invalid configuration: {exc}") from None


def _make_profile(args: argparse.Namespace) -> ModelProfile:
    """``--profile`` with each ``--set-profile KEY=VALUE`` applied, parsed by field type."""
    types = {f.name: f.type for f in fields(ModelProfile) if f.name != "name"}
    overrides: dict[str, object] = {}
    for item in args.set_profile:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise CLIError(f"--set-profile expects KEY=VALUE, got {item!r}")
        if key not in types:
            raise CLIError(f"--set-profile: unknown profile constant {key!r}; "
                           f"known: {', '.join(sorted(types))}")
        overrides[key] = _parse_constant(key, str(types[key]), text)
    try:
        return get_profile(args.profile, **overrides)
    except ValueError as exc:
        raise CLIError(f"invalid profile: {exc}") from None


def _parse_constant(key: str, type_name: str, text: str) -> object:
    if type_name == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise CLIError(f"--set-profile {key}: expected true or false, got {text!r}")
    try:
        if type_name == "int":
            return int(float(text)) if float(text).is_integer() else int(text)
        return float(text)
    except ValueError:
        kind = "an integer" if type_name == "int" else "a number"
        raise CLIError(f"--set-profile {key}: expected {kind}, got {text!r}") from None


def _make_workload(args: argparse.Namespace, config: CacheConfig) -> Workload:
    path: Path | None = args.trace
    try:
        if path is None and args.workload == "race":
            return RaceWorkload(config, max_num_tokens=args.max_num_tokens)
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


# ---- plot ----------------------------------------------------------------------------------


def _require_matplotlib() -> None:
    try:
        require_matplotlib()
    except ImportError:
        raise CLIError("--plot needs matplotlib; install it with: "
                       "pip install 'kvtier[plot]'") from None


def _plot_sweep(reports: list[SimReport], path: Path) -> None:
    _require_matplotlib()
    try:
        plot_sweep(reports, path)
    except OSError as exc:
        raise CLIError(f"cannot write {path}: {exc.strerror or exc}") from None
