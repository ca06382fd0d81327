"""The options every ``kvtier`` command shares, and the argparse types that check them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from kvtier.cli_error import EXIT_USAGE, MAX_ERROR_CHARS, CLIError
from kvtier.cli_numbers import int_in, number_in, power_of_two_in, unit_float
from kvtier.cli_workload import TIME_UNITS, WORKLOADS
from kvtier.config import (
    EVICTION_POLICIES,
    HASH_ALGOS,
    MAX_PRIORITY,
    MAX_TOKENS_PER_BLOCK,
    CacheConfig,
)
from kvtier.launcher import tell
from kvtier.reprs import shown
from kvtier.scheduler import ADMISSIONS, CAPACITY_POLICIES, SchedulerConfig
from kvtier.scheduler_config import MAX_SPECULATIVE_TOKENS
from kvtier.sim import PROFILES
from kvtier.sim.hash_trace import HASH_BLOCK_SIZES
from kvtier.sim.replay import DRAFT_ACCEPTANCE
from kvtier.sim.trace_file import format_suffix
from kvtier.sim.workload import MAX_TIME_SCALE

_CACHE = CacheConfig()
_SCHED = SchedulerConfig()
COMPARE_HOST_FACTOR = 4
ROUTER_DEFAULT = "cache-aware"
WORKLOAD_DEFAULT = WORKLOADS[0]
ROUTER_ALPHA_DEFAULT = 1.0
DEFAULT_GPU_BLOCKS = 16384
# The embedded default (`kvtier replay`: the built-in synthetic chat) runs where the tiers are
# at work and the eviction order matters: a GPU tier that holds about a tenth of the
# stream's distinct blocks and a host tier as large, where LRU (0.6508 offline) falls 0.069
# short of Belady (0.7194); with twice the host blocks Belady keeps everything (0.7194, LRU
# 0.7171) and no order would matter; with fewer GPU blocks the load queues (TTFT p50 20 s
# at 768); at 16,384 GPU blocks it never evicts.
CHAT_GPU_BLOCKS = 1024
CHAT_HOST_BLOCKS = 1024

WORKLOAD_HELP = """\
TRACE is a trace of block hash ids (.jsonl: Mooncake's FAST'25 traces, 512-token prefix
hashes, or Qwen-Bailian's, 16-token block hashes with chat ids; --trace-block-tokens and
--trace-time-unit for one whose blocks or clock differ) or a trace of lengths alone (.csv:
Azure's LLM inference traces, BurstGPT; prefixes synthesised from --seed). Without TRACE,
the built-in --workload is used: synthetic chat or agentic tool loops (2,000 requests,
seeded by --seed). Requests that could never fit the GPU pool are skipped and counted.
Latencies are virtual: the time model of --profile."""

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
One simulation per capacity and eviction policy: every --gpu-blocks value with every
--host-blocks value and every --eviction-policy (comma-separated). The table gives hit rate
and TTFT against capacity beside the offline bounds for the same capacity (unlimited cache;
Belady's optimal eviction over GPU + host blocks). --plot FILE draws them as a PNG, one hit
rate line per policy (needs the 'plot' extra).

Every row replays the same requests. --workload race is sized once, for the smallest
--gpu-blocks and the smallest --host-blocks above 0: its race is at that size (the row that
`kvtier replay` gives at those settings), and the larger caches show what capacity does
to the same requests.

{WORKLOAD_HELP}"""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other refusal of the
    command: ``kvtier: error: <what>`` and where to look, then exit status 2 (argparse
    prints its whole usage, 20 lines for ``replay``, before the line that matters), written
    by :func:`~kvtier.launcher.tell` (argparse quotes an unrecognized argument as given: its
    escape sequences reached the terminal)."""

    def error(self, message: str) -> NoReturn:
        # NOTE: cut as every other refusal is: argparse quotes what it refuses whole, so
        # "--trace-block-tokens <4,300 digits>" was a line of 4,444 characters.
        if len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS - 4] + " ..."
        tell(f"kvtier: error: {message} (see '{self.prog} --help')")
        self.exit(EXIT_USAGE)


def common_options() -> OneLineParser:
    """Workload, cache policy, scheduler, time model and output options of every command."""
    p = OneLineParser(add_help=False)
    p.add_argument("trace", metavar="TRACE", nargs="?", type=Path,
                   help="a .jsonl (block hash ids: Mooncake, Qwen-Bailian) or .csv (Azure, "
                   "BurstGPT) trace; default: --workload")
    p.add_argument("--trace-block-tokens", metavar="N", type=int_in(), choices=HASH_BLOCK_SIZES,
                   help="tokens per hash id of a .jsonl trace whose blocks are not its "
                   "format's; a power of two up to 512 (default: the format's, Mooncake 512, "
                   "Bailian 16)")
    p.add_argument("--trace-time-unit", choices=tuple(TIME_UNITS),
                   help="the unit of a .jsonl trace's timestamps where it is not its "
                   "format's (default: the format's, Mooncake ms, Bailian s)")
    p.add_argument("--workload", choices=WORKLOADS,
                   help="the built-in workload when no TRACE is given: seeded multi-turn chat, "
                   "agentic tool loops over shared tool specs (seconds between steps), "
                   "'mixed' (the two sharing one cache, merged by arrival), "
                   "or 'race', sized from the cache options to provoke the admission race "
                   f"(S1 at scale; needs --host-blocks) (default: {WORKLOAD_DEFAULT})")
    p.add_argument("--limit", metavar="N", type=int_in(1),
                   help="replay only the first N requests (of the trace, or of the built-in "
                   "workload's 2,000) (default: all)")
    p.add_argument("--seed", type=int_in(),
                   help="seed of the synthetic workload and of Azure prefixes (default: 0)")
    p.add_argument("--time-scale", metavar="X",
                   type=number_in(0.0, MAX_TIME_SCALE, low_open=True), default=1.0,
                   help="multiply arrival times by X; > 1 lowers the load; at most "
                   f"{MAX_TIME_SCALE:g}, and no arrival may pass {MAX_TIME_SCALE:g} s "
                   "(default: 1)")
    p.add_argument("--tokens-per-block", metavar="N",
                   type=power_of_two_in(1, MAX_TOKENS_PER_BLOCK),
                   default=_CACHE.tokens_per_block,
                   help="tokens per KV block, a power of two (default: %(default)s)")
    p.add_argument("--no-partial-reuse", action="store_true", help="reuse full blocks only")
    p.add_argument("--no-copy-on-partial-reuse", action="store_true",
                   help="reuse a partial block only in place, never by copying it")
    p.add_argument("--offload-min-priority", metavar="P", type=int_in(0, MAX_PRIORITY),
                   help="evicted GPU blocks of at least this priority (0..100) go to the host "
                   f"tier (default: {_CACHE.offload_min_priority})")
    p.add_argument("--hash-algo", choices=HASH_ALGOS, default=_CACHE.hash_algo,
                   help="block hash (default: %(default)s)")
    p.add_argument("--max-num-tokens", metavar="N", type=int_in(1),
                   default=_SCHED.max_num_tokens,
                   help="token budget of one step (default: %(default)s)")
    p.add_argument("--max-batch-size", metavar="N", type=int_in(1),
                   default=_SCHED.max_batch_size,
                   help="requests in one step (default: %(default)s)")
    p.add_argument("--no-chunked-prefill", action="store_true",
                   help="prefill each prompt in one step")
    p.add_argument("--max-chunk-tokens", metavar="N", type=int_in(1),
                   help="cap one request's prefill chunk (default: the step budget)")
    p.add_argument("--max-wait-steps", metavar="N", type=int_in(1),
                   default=_SCHED.max_wait_steps,
                   help="a waiting request stops later ones from being admitted ahead of it "
                   "once it has waited this many steps (default: %(default)s)")
    p.add_argument("--num-speculative-tokens", metavar="K", type=int_in(0, MAX_SPECULATIVE_TOKENS),
                   default=_SCHED.num_speculative_tokens,
                   help="speculative decoding: up to K draft tokens per decode and step, each "
                   "with a KV slot and a token of the budget (default: %(default)s, off)")
    p.add_argument("--draft-acceptance", metavar="P", type=unit_float,
                   help="with --num-speculative-tokens: the chance the replay accepts each "
                   f"draft token, until one is refused (default: {DRAFT_ACCEPTANCE})")
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


def settle_options(args: argparse.Namespace) -> None:
    """Refuse (:class:`CLIError`) an option the rest of the command line leaves without
    effect, naming what it needs; then give the options left unset their defaults.

    NOTE: each was ignored without a word: ``--router``/``--router-alpha`` of a single
    replay, ``--max-chunk-tokens`` with ``--no-chunked-prefill``, ``--draft-acceptance``
    without drafts, ``--workload`` beside a TRACE, ``--seed`` of a .jsonl trace or of
    the race (``--remote-latency-ms`` without ``--remote`` was already refused); then
    ``--router-alpha`` of a router that never reads it, ``--no-copy-on-partial-reuse`` with
    ``--no-partial-reuse``, ``--offload-min-priority`` where no run has a host tier."""
    if hasattr(args, "workload"):  # the simulator's commands
        _check_workload_options(args.trace, args.workload, args.seed)
    if getattr(args, "instances", 2) == 1 and (args.router is not None
                                               or args.router_alpha is not None):
        raise CLIError("--router and --router-alpha need --instances > 1 (a fleet behind a "
                       "router)")
    if getattr(args, "max_chunk_tokens", None) is not None and args.no_chunked_prefill:
        raise CLIError("--max-chunk-tokens caps a prefill chunk, and --no-chunked-prefill "
                       "prefills each prompt in one step")
    if getattr(args, "draft_acceptance", None) is not None and not args.num_speculative_tokens:
        raise CLIError("--draft-acceptance needs --num-speculative-tokens > 0 (drafts to "
                       "accept)")
    if getattr(args, "router_alpha", None) is not None and args.router not in (
            None, "cache-aware"):
        raise CLIError(f"--router-alpha weighs load in the cache-aware router; --router "
                       f"{args.router} does not read it")
    if getattr(args, "no_copy_on_partial_reuse", False) and args.no_partial_reuse:
        raise CLIError("--no-copy-on-partial-reuse says how a partial block is reused, and "
                       "--no-partial-reuse reuses none")
    for name, default in (("router", ROUTER_DEFAULT), ("router_alpha", ROUTER_ALPHA_DEFAULT),
                          ("draft_acceptance", DRAFT_ACCEPTANCE), ("workload", WORKLOAD_DEFAULT),
                          ("seed", 0)):
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, default)
    if (getattr(args, "workload", None) == "race" and args.trace is None
            and not any(_host_sizes(args))):
        # NOTE: it replayed, and reported a hit rate of 0 without a word.
        raise CLIError("--workload race needs --host-blocks > 0: it is sized to onboard host "
                       "blocks while other requests evict, and without a host tier it has "
                       "nothing to reuse")
    if getattr(args, "offload_min_priority", None) is not None and not any(_host_sizes(args)):
        raise CLIError("--offload-min-priority picks the evicted GPU blocks that go to the "
                       "host tier, and there is none (--host-blocks 0)")
    if hasattr(args, "offload_min_priority") and args.offload_min_priority is None:
        args.offload_min_priority = _CACHE.offload_min_priority


def replay_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """GPU and host blocks of a replay: as given, else the defaults of its workload."""
    chat = args.trace is None and args.workload == "synthetic-chat"
    gpu = args.gpu_blocks if args.gpu_blocks is not None else (
        CHAT_GPU_BLOCKS if chat else DEFAULT_GPU_BLOCKS)
    host = args.host_blocks if args.host_blocks is not None else (
        CHAT_HOST_BLOCKS if chat else 0)
    return gpu, host


def _host_sizes(args: argparse.Namespace) -> list[int]:
    """The host tier sizes of the command's runs (``compare``'s host run always has one)."""
    if args.command == "sweep":
        return list(args.host_blocks)
    if args.command == "compare":
        return [args.host_blocks or COMPARE_HOST_FACTOR * args.gpu_blocks]
    return [replay_sizes(args)[1]]


def _check_workload_options(trace: Path | None, workload: str | None, seed: int | None) -> None:
    """CLIError for ``--workload`` beside a TRACE (the trace was replayed, the workload
    ignored), or ``--seed`` where nothing is drawn from it: a .jsonl trace, the race."""
    if trace is not None and workload is not None:
        raise CLIError(f"--workload {workload} is a built-in workload, and TRACE {trace} is "
                       "given too; replay one of them")
    if seed is None:
        return
    if trace is not None and format_suffix(trace) == ".jsonl":
        raise CLIError("--seed draws the built-in workloads and an Azure trace's prefixes; a "
                       ".jsonl trace (Mooncake, Bailian) has its own")
    if trace is None and workload == "race":
        raise CLIError("--seed does not apply to --workload race: its requests are sized from "
                       "--gpu-blocks, --host-blocks and --max-num-tokens")


def eviction_policy_option(parser: argparse.ArgumentParser, several: bool) -> None:
    """``--eviction-policy``: one name, or (``several``) a comma-separated list of them."""
    names = ", ".join(EVICTION_POLICIES)
    if several:
        parser.add_argument("--eviction-policy", metavar="NAME,NAME,...",
                            type=policy_list, default=[_CACHE.eviction_policy],
                            help=f"eviction policies to sweep, of {names} "
                            f"(default: {_CACHE.eviction_policy})")
    else:
        parser.add_argument("--eviction-policy", metavar="NAME", choices=EVICTION_POLICIES,
                            default=_CACHE.eviction_policy,
                            help=f"eviction policy: {names} (default: %(default)s)")


def policy_list(text: str) -> list[str]:
    """An argparse ``type`` accepting comma-separated eviction policy names, each once."""
    names = text.split(",")
    unknown = [name for name in names if name not in EVICTION_POLICIES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown policy {shown(unknown[0])}; choose from {', '.join(EVICTION_POLICIES)}")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"a policy is named twice in {shown(text)}")
    return names


def admission_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admission", choices=ADMISSIONS, default=_SCHED.admission,
                        help="claim: exact two-phase credit; probe: the legacy racy loop "
                        "(default: %(default)s)")


def oracle_option(parser: argparse.ArgumentParser, default: bool | None) -> None:
    """``--oracle``/``--no-oracle``; ``default`` None: on for one instance, off for a fleet."""
    # NOTE: "on for one instance" read as if a fleet took --oracle, off by default; it
    # refuses it.
    text = {True: "on", False: "off",
            None: "on; one instance only: --instances > 1 refuses --oracle"}[default]
    parser.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=default,
                        help="add the offline LRU, Belady and unlimited hit rates for the same "
                        f"capacity (default: {text})")
