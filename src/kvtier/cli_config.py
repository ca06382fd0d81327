"""Cache and scheduler configurations from ``kvtier`` options, with the size bounds that
keep a run within memory."""

from __future__ import annotations

import argparse

from kvtier.cli_error import CLIError
from kvtier.config import CacheConfig
from kvtier.scheduler import AdmissionMode, SchedulerConfig

# NOTE: the manager keeps about 40 bytes of books per block slot (GPU and host), built up
# front: 2**25 blocks in one run is about 1.3 GB. A larger request is refused before any
# allocation instead of ending in MemoryError or the OOM killer.
MAX_TOTAL_BLOCKS = 1 << 25
MAX_INSTANCES = 1024
# NOTE: a sweep builds every run's configuration before the first runs: 3,000 sizes of each
# tier (9 M runs) took minutes and over a GB before anything was simulated.
MAX_SWEEP_RUNS = 1024
SIZE_HELP = (f"at most {MAX_TOTAL_BLOCKS:,} blocks in one run, over every tier and instance "
             "(about 40 bytes of memory each)")


def check_blocks(num_gpu_blocks: int, num_host_blocks: int, num_instances: int = 1) -> None:
    """Raise :class:`CLIError` naming the options when the blocks of one run pass
    :data:`MAX_TOTAL_BLOCKS`."""
    total = num_instances * (num_gpu_blocks + num_host_blocks)
    if total <= MAX_TOTAL_BLOCKS:
        return
    fleet = f"{num_instances:,} instances x " if num_instances > 1 else ""
    raise CLIError(f"--gpu-blocks/--host-blocks{'/--instances' if fleet else ''}: {fleet}"
                   f"({num_gpu_blocks:,} GPU + {num_host_blocks:,} host) = {total:,} blocks "
                   f"is more than the {MAX_TOTAL_BLOCKS:,} one run may hold")


def check_sweep(num_policies: int, num_gpu_sizes: int, num_host_sizes: int) -> None:
    """Raise :class:`CLIError` naming the options when a sweep would make more than
    :data:`MAX_SWEEP_RUNS` runs."""
    total = num_policies * num_gpu_sizes * num_host_sizes
    if total > MAX_SWEEP_RUNS:
        raise CLIError(f"--eviction-policy/--gpu-blocks/--host-blocks: {num_policies:,} x "
                       f"{num_gpu_sizes:,} x {num_host_sizes:,} = {total:,} runs is more than "
                       f"the {MAX_SWEEP_RUNS:,} one sweep may make")


def make_cache(args: argparse.Namespace, num_gpu_blocks: int, num_host_blocks: int,
               num_instances: int = 1, eviction_policy: str | None = None) -> CacheConfig:
    """The cache of one run (of each instance), within the size bound; its eviction policy
    is ``eviction_policy``, else ``--eviction-policy``."""
    check_blocks(num_gpu_blocks, num_host_blocks, num_instances)
    try:
        return CacheConfig(
            tokens_per_block=args.tokens_per_block,
            num_gpu_blocks=num_gpu_blocks,
            num_host_blocks=num_host_blocks,
            enable_partial_reuse=not args.no_partial_reuse,
            copy_on_partial_reuse=not args.no_copy_on_partial_reuse,
            offload_min_priority=args.offload_min_priority,
            hash_algo=args.hash_algo,
            eviction_policy=(eviction_policy if eviction_policy is not None
                             else args.eviction_policy),
        )
    except ValueError as exc:
        raise CLIError(f"invalid configuration: {exc}") from None


def make_sched(args: argparse.Namespace, admission: AdmissionMode) -> SchedulerConfig:
    """The scheduler of one run."""
    try:
        return SchedulerConfig(
            max_num_tokens=args.max_num_tokens,
            max_batch_size=args.max_batch_size,
            enable_chunked_prefill=not args.no_chunked_prefill,
            max_chunk_tokens=args.max_chunk_tokens,
            capacity_policy=args.capacity_policy,
            admission=admission,
            max_wait_steps=args.max_wait_steps,
            num_speculative_tokens=args.num_speculative_tokens,
        )
    except ValueError as exc:
        raise CLIError(f"invalid configuration: {exc}") from None
