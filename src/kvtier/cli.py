"""The ``kvtier`` command: a thin argparse layer over the simulator.

Every command prints a human table, then one JSON line last on stdout. Bad input (an unknown
option, a missing or malformed trace, an impossible configuration) ends with one sentence
on stderr prefixed ``kvtier: error:`` and exit status 2.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvtier import __version__
from kvtier.cli_config import (
    MAX_INSTANCES,
    MAX_TOTAL_BLOCKS,
    SIZE_HELP,
    check_sweep,
    make_cache,
    make_sched,
)
from kvtier.cli_error import EXIT_USAGE, MAX_ERROR_CHARS, CLIError
from kvtier.cli_generate import add_model_commands
from kvtier.cli_numbers import int_in, int_list, number_in
from kvtier.cli_options import (
    CHAT_GPU_BLOCKS,
    CHAT_HOST_BLOCKS,
    COMPARE_DESCRIPTION,
    COMPARE_HOST_FACTOR,
    DEFAULT_GPU_BLOCKS,
    REPLAY_DESCRIPTION,
    ROUTER_ALPHA_DEFAULT,
    ROUTER_DEFAULT,
    SWEEP_DESCRIPTION,
    OneLineParser,
    admission_option,
    common_options,
    eviction_policy_option,
    oracle_option,
    replay_sizes,
    settle_options,
)
from kvtier.cli_output import (
    OutputFailed,
    checked_stdout,
    discard_stdout,
    names_stdout,
    output_file,
    progress_bar,
)
from kvtier.cli_profile import make_profile
from kvtier.cli_remote import connect_redis, remote_fetch, remote_fetch_options
from kvtier.cli_workload import check_outputs, num_requests, open_workload
from kvtier.config import CacheConfig
from kvtier.launcher import interrupted, tell
from kvtier.reprs import shown
from kvtier.router import ALPHA_BOUNDS, make_policy
from kvtier.router import POLICIES as ROUTER_POLICIES
from kvtier.scheduler import AdmissionMode, SchedulerConfig
from kvtier.sequence import first_line, short_repr
from kvtier.sim import (
    ModelProfile,
    SimReport,
    SimulationStalled,
    TraceFormatError,
    Workload,
    format_report,
    format_side_by_side,
    format_sweep,
    oracle_bounds,
    simulate,
    too_large,
)
from kvtier.sim.fleet import simulate_fleet
from kvtier.sim.fleet_report import format_fleet_report
from kvtier.sim.plot import plot_sweep, require_matplotlib
from kvtier.sim.workload import check_arrivals

EXIT_INTERNAL = 70  # EX_SOFTWARE: a defect in kvtier, not in the input
DEBUG_ENV = "KVTIER_DEBUG"
_CACHE = CacheConfig()
_SCHED = SchedulerConfig()

# ---- the parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``kvtier`` argument parser. Pure."""
    parser = OneLineParser(
        prog="kvtier",
        description="kvtier: a tiered KV-cache block manager with exact two-phase batch "
        "admission, and a serving simulator to measure it.",
    )
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options()
    raw = argparse.RawDescriptionHelpFormatter

    replay = commands.add_parser("replay", parents=[common], formatter_class=raw,
                                 help="simulate serving a trace; the main command",
                                 description=REPLAY_DESCRIPTION)
    replay.add_argument("--gpu-blocks", metavar="N", type=int_in(1, MAX_TOTAL_BLOCKS),
                        help=f"GPU tier size in blocks; {SIZE_HELP} (default: "
                        f"{CHAT_GPU_BLOCKS} for the built-in synthetic-chat, else "
                        f"{DEFAULT_GPU_BLOCKS})")
    replay.add_argument("--host-blocks", metavar="N", type=int_in(0, MAX_TOTAL_BLOCKS),
                        help="host tier size in blocks; 0 disables offloading (default: "
                        f"{CHAT_HOST_BLOCKS} for the built-in synthetic-chat, else 0)")
    eviction_policy_option(replay, several=False)
    admission_option(replay)
    oracle_option(replay, default=None)
    replay.add_argument("--instances", metavar="N", type=int_in(1, MAX_INSTANCES), default=1,
                        help="simulate N engine instances, each with --gpu-blocks and "
                        f"--host-blocks, behind a router; at most {MAX_INSTANCES} (default: 1)")
    replay.add_argument("--router", choices=ROUTER_POLICIES,
                        help=f"how --instances share the requests (default: {ROUTER_DEFAULT})")
    replay.add_argument("--router-alpha", metavar="X", type=number_in(*ALPHA_BOUNDS),
                        help="cache-aware: weight of load (queue depth / max batch size) "
                        f"against the cached share of the prompt (default: "
                        f"{ROUTER_ALPHA_DEFAULT})")
    replay.add_argument("--remote", choices=("write-back", "write-through"),
                        help="with --instances: a shared remote tier (content-addressed, "
                        "unbounded, every fetch charged: --remote-latency-ms, "
                        "--remote-bandwidth-gb-s) that blocks leaving an instance's host "
                        "tier (write-back) or every block it computes (write-through) go "
                        "to, and "
                        "arriving requests import their prefix from")
    replay.add_argument("--remote-url", metavar="URL",
                        help="with --remote: keep the shared tier's blocks in this Redis "
                        "(redis://[user:password@]host:port/db, rediss:// for TLS; extra "
                        "'redis') instead of in memory, so its latency and faults are real")
    remote_fetch_options(replay)
    replay.set_defaults(run=_run_replay)

    compare = commands.add_parser("compare", parents=[common], formatter_class=raw,
                                  help="claim vs probe admission, GPU only vs GPU + host",
                                  description=COMPARE_DESCRIPTION)
    compare.add_argument("--gpu-blocks", metavar="N", type=int_in(1, MAX_TOTAL_BLOCKS),
                         default=DEFAULT_GPU_BLOCKS,
                         help=f"GPU tier size in blocks; {SIZE_HELP} (default: %(default)s)")
    compare.add_argument("--host-blocks", metavar="N", type=int_in(1, MAX_TOTAL_BLOCKS),
                         help=f"host tier of the GPU + host runs (default: "
                         f"{COMPARE_HOST_FACTOR} x --gpu-blocks)")
    eviction_policy_option(compare, several=False)
    oracle_option(compare, default=False)
    compare.set_defaults(run=_run_compare)

    sweep = commands.add_parser("sweep", parents=[common], formatter_class=raw,
                                help="hit rate and TTFT against capacity, with the oracle bound",
                                description=SWEEP_DESCRIPTION)
    sweep.add_argument("--gpu-blocks", metavar="N,N,...", type=int_list(1, MAX_TOTAL_BLOCKS),
                       default=[DEFAULT_GPU_BLOCKS],
                       help=f"GPU tier sizes in blocks; {SIZE_HELP} "
                       f"(default: {DEFAULT_GPU_BLOCKS})")
    sweep.add_argument("--host-blocks", metavar="N,N,...", type=int_list(0, MAX_TOTAL_BLOCKS),
                       default=[0, 4096, 16384],
                       help="host tier sizes in blocks (default: 0,4096,16384)")
    eviction_policy_option(sweep, several=True)
    admission_option(sweep)
    oracle_option(sweep, default=True)
    sweep.add_argument("--plot", metavar="FILE", type=Path,
                       help="also draw hit rate and TTFT against capacity as a PNG "
                       "(pip install 'kvtier[plot]')")
    sweep.set_defaults(run=_run_sweep)
    add_model_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status.
    TypeError, before anything runs, for an ``argv`` that is no sequence of str.

    Bad input ends in one sentence on stderr and status 2. NOTE: any other exception is a
    defect in kvtier, not in the input: it is reported in one line with status 70, or, with
    ``KVTIER_DEBUG=1`` in the environment (as the tests set it), raised with its traceback.
    """
    if argv is not None and (isinstance(argv, str | bytes) or not isinstance(argv, Sequence)
                             or not all(isinstance(arg, str) for arg in argv)):
        # NOTE: argparse read a str as its characters ("invalid choice: '-'" for
        # main("--version")) and raised its own TypeError from inside for ints.
        raise TypeError(f"argv must be a sequence of str (the arguments) or None, got "
                        f"{short_repr(argv)}")
    parser = build_parser()
    try:
        with checked_stdout():  # a write that fails is OutputFailed, not a defect's OSError
            try:
                args = parser.parse_args(argv)
            except SystemExit as exc:  # argparse: --help, --version, or a usage error
                return exc.code if isinstance(exc.code, int) else EXIT_USAGE
            run: Callable[[argparse.Namespace], int] = args.run
            settle_options(args)
            return run(args)
    except CLIError as exc:
        tell(f"kvtier: error: {first_line(exc, MAX_ERROR_CHARS)}")
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # a Ctrl-C, or the launcher's SIGTERM (Terminated)
        return interrupted(exc)
    except BrokenPipeError:
        # NOTE: the reader left (``kvtier replay | head``); point stdout at devnull so the
        # interpreter's final flush does not raise again.
        discard_stdout()
        return 1
    except OutputFailed as exc:  # a full disk, a closed descriptor: the user's to fix
        tell(f"kvtier: error: cannot write to standard output: {first_line(exc)}")
        discard_stdout()
        return EXIT_USAGE
    except MemoryError:
        tell("kvtier: error: out of memory; use smaller --gpu-blocks/--host-blocks/"
             "--instances or a shorter trace (--limit)")
        return EXIT_USAGE
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        # NOTE: BaseException, not Exception: a Rust library's panic (pyo3's PanicException,
        # from tokenizers or safetensors) is a BaseException, and went past this handler as
        # a traceback.
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        tell(f"kvtier: internal error: {type(exc).__name__}: {first_line(exc)} (a defect in "
             f"kvtier; run with {DEBUG_ENV}=1 for the traceback)")
        return EXIT_INTERNAL


# ---- commands ------------------------------------------------------------------------------


def _open(args: argparse.Namespace, cache: CacheConfig) -> Workload:
    check_outputs(args.trace, json=args.json, plot=getattr(args, "plot", None))
    workload = open_workload(args.trace, args.workload, seed=args.seed, limit=args.limit,
                             cache=cache, max_num_tokens=args.max_num_tokens,
                             block_tokens=args.trace_block_tokens,
                             time_unit=args.trace_time_unit,
                             chunked_prefill=not args.no_chunked_prefill)
    try:  # NOTE: before the run: the replay refused a late arrival only on reaching it
        check_arrivals(workload, args.time_scale)
    except TraceFormatError as exc:
        raise CLIError(f"malformed trace: {exc}") from None
    except ValueError as exc:
        raise CLIError(f"cannot replay: {exc}") from None
    return workload


def _run_replay(args: argparse.Namespace) -> int:
    if args.instances > 1:
        return _run_fleet(args)
    if args.remote is not None or args.remote_url is not None:
        raise CLIError("--remote needs --instances > 1 (a remote tier shared by a fleet)")
    remote_fetch(args)  # refuses fetch costs given without --remote
    cache = make_cache(args, *replay_sizes(args))
    sched = make_sched(args, args.admission)
    profile = make_profile(args.profile, args.set_profile)
    workload = _open(args, cache)
    with progress_bar(num_requests(workload), not args.no_progress) as progress:
        report = _simulate(workload, cache, sched, profile, args, progress,
                           args.oracle is not False)
    _emit(format_report(report), report.to_dict(), args.json)
    return 0


def _run_fleet(args: argparse.Namespace) -> int:
    if args.oracle:
        raise CLIError("--oracle is not supported with --instances > 1")
    if args.remote_url is not None and args.remote is None:
        raise CLIError("--remote-url needs --remote write-back or write-through")
    gpu_blocks, host_blocks = replay_sizes(args)
    if args.remote is not None and host_blocks == 0:
        raise CLIError("--remote needs --host-blocks > 0: blocks found in the shared tier "
                       "are imported into each instance's host tier")
    fetch = remote_fetch(args)
    cache = make_cache(args, gpu_blocks, host_blocks, args.instances)
    sched = make_sched(args, args.admission)
    profile = make_profile(args.profile, args.set_profile)
    workload = _open(args, cache)
    try:
        policy = make_policy(args.router, alpha=args.router_alpha)
    except ValueError as exc:
        raise CLIError(f"invalid configuration: --router-alpha: {exc}") from None
    remote_store = None
    if args.remote_url is not None:
        remote_store = connect_redis(args.remote_url, cache.tokens_per_block)
    try:
        with progress_bar(num_requests(workload), not args.no_progress) as progress:
            report = simulate_fleet(workload, cache, args.instances, policy, sched, profile,
                                    args.time_scale, progress, remote=args.remote,
                                    remote_store=remote_store, remote_link=fetch.link,
                                    fetch=fetch.fetch, fetch_deadline_s=fetch.deadline_s,
                                    draft_acceptance=args.draft_acceptance)
    except TraceFormatError as exc:
        raise CLIError(f"malformed trace: {exc}") from None
    except (ValueError, SimulationStalled) as exc:
        raise CLIError(f"cannot replay: {exc}") from None
    finally:
        if remote_store is not None:
            remote_store.close()
    _check_served(report.num_requests, report.num_rejected_too_large, cache, sched)
    _emit(format_fleet_report(report), report.to_dict(), args.json)
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    host_blocks = args.host_blocks
    if host_blocks is None:
        host_blocks = COMPARE_HOST_FACTOR * args.gpu_blocks
    caches = [make_cache(args, args.gpu_blocks, 0),
              make_cache(args, args.gpu_blocks, host_blocks)]
    profile = make_profile(args.profile, args.set_profile)
    workload = _open(args, caches[1])  # the race workload is sized for the host tier
    admissions: tuple[AdmissionMode, ...] = ("claim", "probe")
    runs = [(admission, cache) for admission in admissions for cache in caches]
    total = num_requests(workload)
    reports = []
    settings = [(cache, make_sched(args, admission)) for admission, cache in runs]
    with progress_bar(None if total is None else total * len(runs),
                       not args.no_progress) as progress:
        for cache, sched in settings:
            reports.append(_simulate(workload, cache, sched, profile, args, progress, False))
    if args.oracle:
        reports = _with_oracle(workload, reports, settings)
    labels = [f"{a} {'GPU+host' if c.num_host_blocks else 'GPU only'}" for a, c in runs]
    document = {"command": "compare",
                "runs": [{"label": label, "report": r.to_dict()}
                         for label, r in zip(labels, reports, strict=True)]}
    _emit(format_side_by_side(labels, reports), document, args.json)
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    if args.plot is not None:
        _require_matplotlib(args.plot)  # fail before the long part
    check_sweep(len(args.eviction_policy), len(args.gpu_blocks), len(args.host_blocks))
    caches = [make_cache(args, gpu, host, eviction_policy=policy)
              for policy in args.eviction_policy
              for gpu in args.gpu_blocks for host in args.host_blocks]
    sched = make_sched(args, args.admission)
    profile = make_profile(args.profile, args.set_profile)
    race = args.trace is None and args.workload == "race"
    workload = _open(args, _race_cache(args) if race else caches[0])
    _check_fits(workload, min(caches, key=lambda cache: cache.num_gpu_blocks), sched)
    total = num_requests(workload)
    reports = []
    with progress_bar(None if total is None else total * len(caches),
                       not args.no_progress) as progress:
        for cache in caches:
            reports.append(_simulate(workload, cache, sched, profile, args, progress, False))
    if args.oracle:
        reports = _with_oracle(workload, reports, [(cache, sched) for cache in caches])
    document = {"command": "sweep", "runs": [r.to_dict() for r in reports]}
    _emit(format_sweep(reports), document, args.json)
    if args.plot is not None:  # after the report is out: a plot that fails loses nothing
        _plot_sweep(reports, args.plot)
    return 0


def _race_cache(args: argparse.Namespace) -> CacheConfig:
    """The cache a sweep's race is sized for: the smallest ``--gpu-blocks`` and the smallest
    ``--host-blocks`` above 0 (the race needs a host tier; ``settle_options`` refused a
    sweep without one).

    NOTE: one race for every row, as the sweep compares capacities on one workload. Sized
    for each row's cache, each row replayed another request stream (200 GPU blocks: 104
    requests and hit rate 0.1245 at 50 host blocks, 135 and 0.1208 at 200; 400 + 50:
    0.0661), so the table read as if a larger cache did worse. The smallest, because its
    requests fit every larger GPU pool (the largest's fillers were too large for a smaller
    one), and the race is tightest there: a larger cache keeps more of its prefixes. Its
    row is what ``kvtier replay`` gives at its settings; the others replay the same race
    (each run's ``workload`` in the JSON line names the sizes it was built for)."""
    gpu = min(args.gpu_blocks)
    host = min(size for size in args.host_blocks if size > 0)
    return make_cache(args, gpu, host, eviction_policy=args.eviction_policy[0])


def _simulate(workload: Workload, cache: CacheConfig, sched: SchedulerConfig,
              profile: ModelProfile, args: argparse.Namespace,
              progress: Callable[[int], object] | None, oracle: bool) -> SimReport:
    try:
        report = simulate(workload, cache, sched, profile, args.time_scale, progress, oracle,
                          draft_acceptance=args.draft_acceptance)
    except TraceFormatError as exc:
        raise CLIError(f"malformed trace: {exc}") from None
    except (ValueError, SimulationStalled) as exc:
        raise CLIError(f"cannot replay: {exc}") from None
    _check_served(report.num_requests, report.num_rejected_too_large, cache, sched)
    return report


def _check_fits(workload: Workload, cache: CacheConfig, sched: SchedulerConfig) -> None:
    """:class:`CLIError`, as :func:`_check_served` words it, when no request of ``workload``
    fits ``cache`` (a sweep's smallest GPU tier: what fits it fits every larger one).

    NOTE: checked before the first run: a sweep ran every row before it (``--gpu-blocks
    128,16``: the 128 run) and then refused them all for the one that fit nothing. Reads
    up to the first request that fits, most often the first."""
    num_too_large = 0
    try:
        for request in workload:
            if not too_large(request, cache, sched):
                return
            num_too_large += 1
    except TraceFormatError as exc:
        raise CLIError(f"malformed trace: {exc}") from None
    _check_served(0, num_too_large, cache, sched)


def _check_served(num_served: int, num_too_large: int, cache: CacheConfig,
                  sched: SchedulerConfig) -> None:
    """:class:`CLIError` when a run skipped every request as too large (a fleet's report of
    nothing, every latency n/a, came out with status 0). Pure."""
    if num_served or not num_too_large:
        return
    if not sched.enable_chunked_prefill:
        raise CLIError(
            f"all {num_too_large} requests are too large for {cache.num_gpu_blocks} GPU "
            f"blocks of {cache.tokens_per_block} tokens or, without chunked prefill, a step "
            f"of {sched.max_num_tokens} tokens; raise --gpu-blocks or --max-num-tokens, or "
            "drop --no-chunked-prefill")
    raise CLIError(f"all {num_too_large} requests are too large for {cache.num_gpu_blocks} GPU "
                   f"blocks of {cache.tokens_per_block} tokens; raise --gpu-blocks")


def _with_oracle(workload: Workload, reports: list[SimReport],
                 runs: list[tuple[CacheConfig, SchedulerConfig]]) -> list[SimReport]:
    """The reports with the oracle bounds at each one's GPU + host capacity, over the
    requests it served (``runs``: each report's cache and scheduler settings)."""
    tpb = _int(reports[0].cache_config["tokens_per_block"])
    skipped: list[set[int]] = [set() for _ in reports]
    # Runs that skipped the same requests (most often none) share one oracle pass.
    groups: dict[tuple[frozenset[int], bool], list[int]] = {}
    try:
        skipping = [i for i, report in enumerate(reports) if report.num_rejected_too_large]
        if skipping:  # one pass over the stream finds what each of them skipped
            for pos, request in enumerate(workload):
                for i in skipping:
                    if too_large(request, *runs[i]):
                        skipped[i].add(pos)
        for i, positions in enumerate(skipped):
            key = (frozenset(positions), runs[i][0].enable_partial_reuse)
            groups.setdefault(key, []).append(i)
        with_bounds = list(reports)
        for (skip, partial), members in groups.items():
            capacities = [runs[i][0].num_gpu_blocks + runs[i][0].num_host_blocks
                          for i in members]
            bounds = oracle_bounds(workload, tpb, capacities, skip=skip, partial_reuse=partial)
            for i, b in zip(members, bounds, strict=True):
                with_bounds[i] = replace(reports[i], oracle=b)
    except TraceFormatError as exc:
        raise CLIError(f"malformed trace: {exc}") from None
    return with_bounds


def _int(value: object) -> int:
    assert type(value) is int, value
    return value


def _emit(table: list[str], document: dict[str, Any], json_path: Path | None) -> None:
    """Print the table and the JSON line, then write ``document`` to ``json_path`` if given.

    NOTE: printed first, so a write that fails (the disk filled up during a long run) loses
    no result. Whole or not at all (:func:`output_file`): a write that fails leaves no
    truncated document; ``--json /dev/stdout`` and a symlink are written through."""
    for row in table:
        print(row)
    print(json.dumps(document, allow_nan=False))
    if json_path is not None and names_stdout(json_path):
        # NOTE: reopened, /dev/stdout redirected to a file truncated it: the table and the
        # JSON line printed above were lost, the file held the indented document alone.
        print(json.dumps(document, indent=2, allow_nan=False))
    elif json_path is not None:
        try:
            text = json.dumps(document, indent=2, allow_nan=False) + "\n"
            with output_file(json_path) as target:
                if json_path.suffix.lower() == ".gz":
                    # NOTE: a name ending in .gz held plain JSON, which every reader of the
                    # kind (told by its magic bytes, sim/trace_file.py) refused as gzip.
                    target.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
                else:
                    target.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CLIError(f"cannot write {json_path}: {exc.strerror or exc} (the report is "
                           "on standard output)") from None


# ---- plot ----------------------------------------------------------------------------------


def _require_matplotlib(path: Path | None = None) -> None:
    """Refuse ``--plot`` without matplotlib, or to a ``path`` whose suffix names a format
    matplotlib cannot write (its ValueError, after the whole sweep, was status 70)."""
    try:
        require_matplotlib()
    except ImportError:
        raise CLIError("--plot needs matplotlib; install it with: "
                       "pip install 'kvtier[plot]'") from None
    except ValueError as exc:  # NOTE: its import checks MPLBACKEND: status 70 before
        settings = ", ".join(f"{name}={shown(value)}" for name, value in sorted(os.environ.items())
                             if name.startswith("MPL"))
        raise CLIError(f"--plot: matplotlib refuses its settings"
                       f"{f' ({settings})' if settings else ''}: {exc}") from None
    if path is None or not path.suffix:
        return  # no suffix: a PNG
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise CLIError(f"--plot {path}: matplotlib writes no {shown(path.suffix)} file; end the "
                       f"name in one of {', '.join('.' + f for f in sorted(formats))}")
    if path.suffix.lower() == ".pgf":  # NOTE: its RuntimeError came after the whole sweep
        import matplotlib

        texsystem = matplotlib.rcParams["pgf.texsystem"]
        if shutil.which(texsystem) is None:
            raise CLIError(f"--plot {path}: matplotlib writes a .pgf file with {texsystem}, "
                           "which is not installed; choose another format")


def _plot_sweep(reports: list[SimReport], path: Path) -> None:
    _require_matplotlib()
    try:
        with output_file(path) as target:
            # The format of the name asked for (a PNG without a suffix), not the temporary's.
            plot_sweep(reports, target, path.suffix[1:].lower() or "png")
    except Exception as exc:
        failed = _os_error(exc)
        if failed is not None:
            raise CLIError(f"cannot write {path}: {failed.strerror or failed} (the report is "
                           "on standard output)") from None
        if isinstance(exc, RuntimeError):  # matplotlib's, for an outside tool a format needs
            raise CLIError(f"cannot write {path}: matplotlib: {exc} (the report is on "
                           "standard output)") from None
        raise


def _os_error(exc: BaseException) -> OSError | None:
    """``exc`` if an OSError, else the OSError it was raised while handling, if any. Pure.

    NOTE: matplotlib's PDF writer, its file failing part way (a full disk), raises
    AttributeError ('Stream' object has no attribute 'pos') from its cleanup: status 70."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None
