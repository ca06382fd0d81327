"""The workload of a ``kvtier`` command: a trace file or a built-in workload, opened and
checked before anything is simulated."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from kvtier.cli_error import CLIError
from kvtier.cli_output import probe_output
from kvtier.config import CacheConfig
from kvtier.reprs import shown
from kvtier.sim import (
    AgenticWorkload,
    AzureTrace,
    MixedWorkload,
    MooncakeTrace,
    RaceWorkload,
    SyntheticChat,
    TraceFormatError,
    Workload,
)
from kvtier.sim.trace_file import format_suffix

WORKLOADS = ("synthetic-chat", "agentic", "mixed", "race")
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}  # --trace-time-unit: seconds per unit


def open_workload(trace: Path | None, workload: str, *, seed: int, limit: int | None,
                  cache: CacheConfig, max_num_tokens: int, block_tokens: int | None = None,
                  time_unit: str | None = None, chunked_prefill: bool = True) -> Workload:
    """The trace at ``trace`` (``.jsonl`` block hash ids, ``.csv`` Azure or BurstGPT; either
    gzipped, ``.gz`` after it or not), else the
    built-in ``workload``; ``block_tokens`` and ``time_unit`` (a key of ``TIME_UNITS``)
    read a ``.jsonl`` trace whose blocks or clock are not its format's; the race is sized
    for a scheduler with or without ``chunked_prefill``. Raises
    :class:`CLIError` in one sentence for an unreadable, malformed or empty trace (an
    empty ``.jsonl`` and an empty ``.csv`` alike: no requests), or for those options
    without a ``.jsonl`` trace."""
    if (block_tokens is not None or time_unit is not None) and (
            trace is None or format_suffix(trace) != ".jsonl"):
        given = "--trace-block-tokens" if block_tokens is not None else "--trace-time-unit"
        raise CLIError(f"{given} applies to a .jsonl trace only, got "
                       f"{'no TRACE' if trace is None else repr(str(trace))}")
    try:
        if trace is None:
            if workload == "race":
                if limit is not None:
                    raise CLIError("--limit does not apply to --workload race: its requests "
                                   "are sized from --gpu-blocks, --host-blocks and "
                                   "--max-num-tokens")
                if not chunked_prefill and max_num_tokens <= cache.tokens_per_block:
                    raise CLIError(f"--workload race with --no-chunked-prefill needs "
                                   f"--max-num-tokens > --tokens-per-block "
                                   f"({cache.tokens_per_block}): each prefix request, a block "
                                   f"and a token, is prefilled in one step; got "
                                   f"{max_num_tokens}")
                return RaceWorkload(cache, max_num_tokens=max_num_tokens,
                                    chunked_prefill=chunked_prefill)
            if workload == "mixed":  # chat and agents sharing one engine's cache
                return MixedWorkload((SyntheticChat(seed=seed), AgenticWorkload(seed=seed)),
                                     limit=limit)
            built_in: SyntheticChat | AgenticWorkload = (
                AgenticWorkload(seed=seed) if workload == "agentic" else SyntheticChat(seed=seed))
            if limit is None:
                return built_in
            # NOTE: the first ``limit`` of its requests, as for a trace: a larger limit would
            # make the workload that many requests (10**20: a run that never ends).
            return replace(built_in, num_requests=min(limit, built_in.num_requests))
        suffix = format_suffix(trace)
        opened: MooncakeTrace | AzureTrace
        if suffix == ".jsonl":
            opened = MooncakeTrace(trace, tokens_per_block=cache.tokens_per_block, limit=limit,
                                   block_tokens=block_tokens,
                                   time_unit_s=None if time_unit is None else TIME_UNITS[time_unit])
        elif suffix == ".csv":
            opened = AzureTrace(trace, seed=seed, limit=limit)
        else:
            raise CLIError(f"TRACE must be a .jsonl (Mooncake, Bailian) or .csv (Azure, "
                           f"BurstGPT) file, got {shown(str(trace))} (gzipped: .jsonl.gz, "
                           ".csv.gz)")
    except TraceFormatError as exc:
        raise CLIError(f"malformed trace: {exc}") from None
    except OSError as exc:
        raise CLIError(f"cannot read trace {trace}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CLIError(f"invalid option for trace {trace}: {exc}") from None
    if len(opened) == 0:
        raise CLIError(f"no requests in {trace}")
    return opened


def num_requests(workload: Workload) -> int | None:
    """How many requests ``workload`` yields, where that is known without building them."""
    if isinstance(workload, (SyntheticChat, AgenticWorkload)):
        return workload.num_requests
    if isinstance(workload, (MooncakeTrace, AzureTrace)):
        return len(workload)
    return None


def check_outputs(trace: Path | None, **outputs: Path | None) -> None:
    """Refuse an output file (``--json``, ``--plot``) that is the input trace: writing it
    would destroy the trace (:func:`_same_file`: symlinks, ``..``, hard links), or that
    another output names too; or that cannot be written: a directory, or in a directory that does
    not exist or refuses writes.

    NOTE: checked before the run, which may take long: the write, after it, failed with the
    run's results lost (the table is printed after the file is written)."""
    written: list[tuple[str, Path]] = []  # the options checked so far, and their files
    for option, path in outputs.items():
        if path is None:
            continue
        if trace is not None and _same_file(path, trace):
            raise CLIError(f"--{option} {path} is the input trace; choose another file")
        for earlier, earlier_path in written:  # NOTE: the plot overwrote the JSON
            if _same_file(path, earlier_path) and os.path.realpath(path) != os.devnull:
                raise CLIError(f"--{earlier} and --{option} name the same file, {path}; the "
                               "second would overwrite the first")
        written.append((option, path))
        problem = _unwritable(path)
        if problem is not None:
            raise CLIError(f"--{option} {path}: cannot write it ({problem})")


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same real path, or, both existing, the
    same inode (a hard link, a bind mount, /proc/self/fd/N, which realpath leaves apart:
    ``--json`` through a hard link overwrote the trace). Pure.

    NOTE: os.path.realpath, not Path.resolve, which raised RuntimeError for a symlink loop
    (status 70) before the trace's own open could say so."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one does not exist (yet), or cannot be looked up
        return False


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be written as a new or replaced file, or None (a temporary
    file made and removed to tell: :func:`probe_output`).

    NOTE: Path.is_dir raises what it does not take for "no" (a name too long, a parent
    that refuses search): an OSError, status 70; it is the answer here."""
    folder = path.parent
    try:
        if path.is_dir():
            return "it is a directory"
        if not folder.is_dir():
            return f"there is no directory {folder}"
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            return "permission denied"
    except OSError as exc:
        return exc.strerror or str(exc)
    return probe_output(path)
