"""kvtier's eviction policies on the same request streams, through the real simulator.

Every workload is replayed through ``kvtier.sim.simulate`` (scheduler, two-phase admission,
GPU + host tiers, virtual clock) once per kvtier policy, at two capacities: 3 % and 10 % of
the stream's distinct full blocks, a quarter on the GPU (at least twice the largest
prompt, and every request with its output) and the rest on the host. Per policy: token
hit rate and the fraction of the LRU->Belady gap it closes, ``(p - lru) / (belady - lru)``,
with ``lru`` kvtier's own ``lru`` run and ``belady`` the offline optimum over the same
GPU + host blocks (``kvtier.sim.oracle``, counting the heads partial reuse takes, as the
replays count hits; arrival order); plus the scheduler's and manager's CPU
microseconds per prompt block (``step()`` + ``update()``, as the replay times them).
Workloads: the Mooncake conversation and synthetic traces, the Azure conversation and code
traces (synthetic prefixes), the built-in chat and agentic workloads, and ``mixed``: chat
and agents sharing one cache (``kvtier.sim.MixedWorkload``, until the first part ends).

The offline Belady serves one request at a time; through the simulator requests overlap and
what running requests hold is nobody's to evict (on a small GPU tier, half of it). So each
row also runs ``kvtier.sim.clairvoyant.Clairvoyant`` (Belady's rule inside the simulator:
farthest next use first, knowing the stream) and reports the gap each policy closes
against it too, ``(p - lru) / (clairvoyant - lru)``: the share of what was reachable.

vLLM 0.33.0's ``LRUCachePolicy`` / ``ARCCachePolicy`` run on the block-level stream of the
same requests (``benchmarks/peers/vllm_policy_peer.py`` in ``.venv-peers``): a block cache of
the same capacity in arrival order, no scheduler. Their gap fraction is against the
block-level LRU and Belady (``oracle_bounds(..., partial_reuse=False)``) of the same stream,
which vLLM's LRU equals: the row's ``block_lru`` and ``block_belady``, the table's "block
LRU/Belady" column.

Load: each workload runs at the time scale where priority-LRU's p50 TTFT is under 2 s
(scale 1 if it already is, else the probe's utilization / 0.7); the scale is reported.

    .venv/bin/python benchmarks/bench_policy.py                 # first 2,000 requests
    .venv/bin/python benchmarks/bench_policy.py --smoke         # tiny, for the tests
    .venv/bin/python benchmarks/bench_policy.py --audit --jobs 2  # the held-out audit
    .venv/bin/python benchmarks/bench_policy.py --heldout        # its sixteenth-session families
    .venv/bin/python benchmarks/bench_policy.py --workloads PATH.jsonl,chat  # a trace file too

``--audit`` replays workloads no policy was tuned on (``benchmarks/policy_lab/audit.py``:
memoryless sessions, scans with a hot set, Zipf system prompts, long-document QA,
heavy-tailed gaps, a phase shift, flipping regimes; other windows and seeds of the traces;
1 % and 30 % capacities, 16- and 512-token blocks) through the baselines, vLLM's LRU / ARC
and the default at several time scales within +-0.05 % (its noise: a learned order is
chaotic in the arrival times), and flags every row where the default falls below LRU or
vLLM's best beyond that noise. ``--heldout`` runs the same audit on the families of
``kvtier.sim.heldout`` (multi-tenant LoRA key spaces, RAG documents at varying positions,
reordered few-shot examples, long-document QA, bursts with idle gaps, parallel sampling,
prompts below one block, a stationary control).

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from kvtier.blocks import cdiv
from kvtier.config import CacheConfig
from kvtier.policies import POLICIES
from kvtier.sim import (
    AgenticWorkload,
    AzureTrace,
    MixedWorkload,
    MooncakeTrace,
    SimReport,
    SyntheticChat,
    Workload,
    oracle_bounds,
    oracle_requests,
    simulate,
)
from kvtier.sim.clairvoyant import Clairvoyant
from kvtier.sim.heldout import FAMILIES as HELDOUT_FAMILIES
from kvtier.sim.heldout import HeldOutWorkload
from kvtier.sim.oracle import OracleRequest
from kvtier.sim.report import OracleBounds

REPO = Path(__file__).resolve().parents[1]
TRACES = Path(os.environ.get("KVTIER_TRACES", REPO.parent / "shared" / "data" / "traces"))
PEER_PYTHON = REPO / ".venv-peers" / "bin" / "python"
FRACTIONS = (0.03, 0.10)
TTFT_TARGET_S = 2.0
PEERS = ("lru", "arc")  # vLLM's policies, as benchmarks/peers/vllm_policy_peer.py names them


def workloads(names: Sequence[str], limit: int) -> dict[str, Workload]:
    """The workloads by name (a trace file's: its stem); SystemExit naming a name given
    twice (the second replaced the first without a word), an unknown one, a missing or
    malformed trace."""
    out: dict[str, Workload] = {}
    given: dict[str, str] = {}
    for name in names:
        key = Path(name).stem if name.endswith((".jsonl", ".csv")) else name
        if key in given:
            raise SystemExit(f"workload {key!r} given twice: {given[key]!r} and {name!r}")
        given[key] = name
        try:
            out[key] = _workload(name, limit)
        except ValueError as exc:  # TraceFormatError names the file, line and field
            raise SystemExit(f"malformed trace: {exc}") from None
        except OSError as exc:
            raise SystemExit(f"cannot read trace {name}: {exc.strerror or exc}") from None
    return out


def _workload(name: str, limit: int) -> Workload:
    if name == "mooncake-conv":
        return MooncakeTrace(TRACES / "mooncake_conversation_trace.jsonl", limit=limit)
    if name == "mooncake-synth":
        return MooncakeTrace(TRACES / "mooncake_synthetic_trace.jsonl", limit=limit)
    if name in ("azure-conv", "azure-code"):
        # kvtier's default synthetic prefix model (seed 0): the CSVs carry no prompts.
        return AzureTrace(TRACES / f"azure_llm_2023_{name[6:]}.csv", limit=limit)
    if name == "chat":
        return SyntheticChat(num_requests=limit)
    if name == "agentic":
        return AgenticWorkload(num_requests=limit)
    if name == "mixed":  # both sharing one cache, until the first ends
        return MixedWorkload((SyntheticChat(num_requests=limit),
                              AgenticWorkload(num_requests=limit)))
    if name.endswith((".jsonl", ".csv")):  # a trace file of any format kvtier reads
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"trace not found: {name}")
        return (MooncakeTrace(path, limit=limit) if name.endswith(".jsonl")
                else AzureTrace(path, limit=limit))
    raise SystemExit(f"unknown workload {name!r} (a built-in name, or a .jsonl / .csv "
                     "trace file)")


def capacities(stream: list[OracleRequest], tpb: int, max_blocks: int,
               fractions: Sequence[float], min_gpu_blocks: int = 0) -> list[tuple[int, int]]:
    """(GPU, host) blocks per capacity: a quarter on the GPU, at least 2x the largest
    request and ``min_gpu_blocks`` (:func:`blocks_to_serve`), the rest on the host."""
    distinct = len({key for r in stream for key in r.block_keys})
    out = []
    for f in fractions:
        total = max(64, int(distinct * f))
        gpu = max(total // 4, 2 * max_blocks, min_gpu_blocks)
        out.append((gpu, max(0, total - gpu)))
    return out


def blocks_to_serve(workload: Workload, tpb: int) -> int:
    """The GPU blocks a replay needs to serve every request of ``workload``: its largest
    prompt and output together, as ``kvtier.sim.replay.too_large`` counts a request. Pure.

    NOTE: the floor of twice the largest prompt left out the output: a request of a short
    prompt and a long output (4 tokens and 400, at 4-token blocks: 101 blocks, the GPU 34)
    was skipped by every replay while the bounds and the peers counted it, so the gaps
    compared two streams."""
    return max(cdiv(len(r.prompt) + max(1, r.output_length), tpb) for r in workload)


def run_peer(stream: list[OracleRequest], tpb: int, capacity: int, policy: str) -> float | None:
    """vLLM's policy's hit rate on the block stream (ids interned from the prefix keys), or
    None where the peer gave none (the reason on stderr): one peer failing at one capacity
    leaves that cell empty, not the benchmark's other rows unprinted."""
    ids: dict[object, int] = {}
    requests = [[r.num_tokens, [ids.setdefault(k, len(ids)) for k in r.block_keys]] for r in stream]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"tokens_per_block": tpb, "requests": requests}, f)
    try:
        out = subprocess.run([str(PEER_PYTHON), str(REPO / "benchmarks/peers/vllm_policy_peer.py"),
                              f.name, policy, str(capacity)], capture_output=True, text=True,
                             check=False, cwd=REPO)
    finally:
        os.unlink(f.name)
    try:
        return float(json.loads(out.stdout.strip().splitlines()[-1])["hit_rate"])
    except (IndexError, ValueError, KeyError, TypeError):
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"vllm-{policy} at {capacity} blocks gave no hit rate (status "
              f"{out.returncode}): {last}", file=sys.stderr)
        return None


def gap(p: float | None, lru: float, belady: float) -> float | None:
    """The share of the LRU->Belady gap ``p`` closes, ``(p - lru) / (belady - lru)``; None
    where there is no gap to close (Belady within 1e-3 of LRU) or no ``p``. Pure."""
    if p is None or belady - lru < 1e-3:
        return None
    return (p - lru) / (belady - lru)


def row_bounds(workload: Workload, tpb: int, caps: Sequence[tuple[int, int]]
               ) -> tuple[list[OracleBounds], list[OracleBounds]]:
    """Per (GPU, host) capacity, the offline bounds kvtier's replays are measured against
    (counting the heads partial reuse takes, as the replayed caches count hits) and those
    of whole blocks: vLLM's policies run on the block-level stream, where a block is reused
    whole or not at all, so their gap is against the LRU and Belady of that stream. Pure.

    NOTE: measured against the partial-reuse bounds of kvtier's replays, vLLM's LRU read
    below its own stream's LRU (Azure conversation 3 %: a gap of -1.54 for the policy
    that *is* that LRU), a peer made to look worse than it is. And without peers the row's
    ``block_lru`` / ``block_belady`` held the partial-reuse bounds under the whole-block
    names (60 chat requests at 528 blocks: LRU 0.5162 for the whole-block 0.5114)."""
    capacities = [g + h for g, h in caps]
    bounds = oracle_bounds(workload, tpb, capacities,
                           partial_reuse=CacheConfig().enable_partial_reuse)
    if not any(b.partial_reuse for b in bounds):  # whole blocks already (a hash trace)
        return bounds, bounds
    return bounds, oracle_bounds(workload, tpb, capacities, partial_reuse=False)


def peer_columns(hits: dict[str, float | None], block: OracleBounds) -> dict[str, object]:
    """A row's vLLM columns: each peer's hit rate (None: it gave none) and the gap it closes
    against the whole-block LRU and Belady of the same stream (``block``). Pure."""
    out: dict[str, object] = {}
    for peer, hit in hits.items():
        out[f"vllm-{peer}"] = hit
        out[f"vllm-{peer} gap"] = gap(hit, block.lru_hit_rate, block.belady_hit_rate)
    return out


def us_per_block(report: SimReport, tpb: int) -> float:
    cpu = report.cpu["scheduler_s"] or 0.0
    return 1e6 * cpu / max(1, report.num_prompt_tokens // tpb)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mooncake-conv,mooncake-synth,azure-conv,"
                        "azure-code,chat,agentic,mixed",
                        help="built-in names and trace files (.jsonl: Mooncake, Bailian; "
                        ".csv: Azure, BurstGPT), comma-separated")
    parser.add_argument("--limit", type=int, default=2000, help="requests per workload")
    parser.add_argument("--tokens-per-block", type=int, default=32)
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                        help="capacities as fractions of the stream's distinct blocks")
    parser.add_argument("--no-peers", action="store_true", help="skip vLLM's policies")
    parser.add_argument("--smoke", action="store_true", help="tiny run (chat, 60 requests)")
    parser.add_argument("--audit", action="store_true",
                        help="the held-out audit (benchmarks/policy_lab/audit.py) instead")
    parser.add_argument("--heldout", action="store_true",
                        help="the audit on kvtier.sim.heldout's families instead")
    parser.add_argument("--rows", default="", help="--audit: only rows whose label has one "
                        "of these comma-separated substrings")
    parser.add_argument("--jobs", type=int, default=1, help="--audit: processes")
    parser.add_argument("--num-scales", type=int, default=3,
                        help="--audit: time scales the default runs at (its noise)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.num_scales < 1:
        parser.error(f"--jobs and --num-scales must be >= 1, got {args.jobs}, {args.num_scales}")
    if args.audit or args.heldout:
        if args.audit and args.heldout:
            parser.error("--audit and --heldout: one at a time")
        specs = (HELDOUT_SMOKE_ROWS if args.smoke else HELDOUT_ROWS) if args.heldout else \
            (AUDIT_SMOKE_ROWS if args.smoke else AUDIT_ROWS)
        return audit_main(specs, args.rows, args.jobs, args.num_scales, args.smoke,
                          args.no_peers)
    names = args.workloads.split(",")
    limit = args.limit
    if args.smoke:
        names, limit = ["chat"], 60
    tpb = args.tokens_per_block
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        parser.error(f"--fractions: not a list of numbers: {args.fractions!r}")
    if not all(0 < f <= 1 for f in fractions):
        parser.error(f"--fractions: each must be in (0, 1], got {args.fractions!r}")
    peers_reason = None
    if args.no_peers or args.smoke:
        peers_reason = "not asked for" if args.no_peers else "smoke run"
    elif not PEER_PYTHON.exists():
        peers_reason = f"{PEER_PYTHON.relative_to(REPO)} is missing"
    policies = list(POLICIES)
    rows: list[dict[str, object]] = []
    for name, workload in workloads(names, limit).items():
        method = getattr(workload, "oracle_requests", None)  # as oracle_bounds reads it
        stream = list(method(tpb) if callable(method) else oracle_requests(workload, tpb))
        max_blocks = max(cdiv(r.num_tokens, tpb) for r in stream) + 16
        caps = capacities(stream, tpb, max_blocks, fractions, blocks_to_serve(workload, tpb))
        # NOTE: under the replayed caches' partial reuse (on by default), as their hit
        # rates count it: whole-block bounds put Belady below what a replay can reach.
        bounds, blocks = row_bounds(workload, tpb, caps)
        scale = 1.0
        for (gpu, host), bound, block in zip(caps, bounds, blocks, strict=True):
            cache = {p: CacheConfig(tokens_per_block=tpb, num_gpu_blocks=gpu,
                                    num_host_blocks=host, eviction_policy=p) for p in policies}
            if not rows or rows[-1]["workload"] != name:  # once per workload: the load
                probe = simulate(workload, cache["priority-lru"], time_scale=1.0)
                p50 = probe.ttft_s.p50 or 0.0
                utilization = probe.load.utilization or 0.0
                if p50 > TTFT_TARGET_S:
                    scale = max(1.0, utilization / 0.7)
            reports = {p: simulate(workload, cache[p], time_scale=scale) for p in policies}
            # The bounds and the peers count every request: so must the replays.
            assert not any(r.num_rejected_too_large for r in reports.values()), (name, gpu)
            lru = reports["lru"].token_hit_rate
            belady = bound.belady_hit_rate
            clairvoyant = simulate(workload, cache["lru"], time_scale=scale,
                                   policy=Clairvoyant(workload, tpb, scale)).token_hit_rate
            row: dict[str, object] = {
                "workload": name, "num_requests": len(stream), "gpu_blocks": gpu,
                "host_blocks": host, "time_scale": round(scale, 3), "belady": belady,
                "clairvoyant": clairvoyant, "unlimited": bound.unlimited_hit_rate,
                "block_lru": block.lru_hit_rate, "block_belady": block.belady_hit_rate,
            }
            for p, report in reports.items():
                row[p] = report.token_hit_rate
                row[f"{p} gap"] = gap(report.token_hit_rate, lru, belady)
                row[f"{p} sim gap"] = gap(report.token_hit_rate, lru, clairvoyant)
                row[f"{p} us/block"] = us_per_block(report, tpb)
                row[f"{p} ttft_p50_s"] = report.ttft_s.p50
            if peers_reason is None:
                row.update(peer_columns({peer: run_peer(stream, tpb, gpu + host, peer)
                                         for peer in PEERS}, block))
            rows.append(row)
    print_table(rows, policies, peers_reason)
    print(json.dumps({
        "benchmark": "bench_policy", "smoke": args.smoke, "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "inputs": {"workloads": names, "limit": limit, "tokens_per_block": tpb,
                   "traces": str(TRACES), "fractions": fractions},
        "peers": peers_reason or "vllm 0.33.0 (.venv-peers)",
        "unix_time": int(time.time()), "rows": rows,
    }, allow_nan=False))
    return 0


def print_table(rows: list[dict[str, object]], policies: list[str],
                peers_reason: str | None) -> None:
    def cell(row: dict[str, object], key: str) -> str:
        value = row.get(key)
        if not isinstance(value, float):
            return "skipped"
        g = row.get(f"{key} gap")
        return f"{value:.4f} ({'n/a' if not isinstance(g, float) else f'{g:+.2f}'})"

    peers = [] if peers_reason is not None else [f"vllm-{peer}" for peer in PEERS]
    # NOTE: the vLLM columns' gaps are against the whole-block LRU and Belady, which the
    # table did not show: their gap could not be read off its "belady" (kvtier's bound).
    blocks = [] if peers_reason is not None else ["block LRU/Belady"]
    header = ["workload (requests)", "GPU+host blocks", "scale", *policies, *peers, "belady",
              *blocks, "clairvoyant", *(f"{p} us/blk" for p in policies), "TTFT p50 (s)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [f"{row['workload']} ({row['num_requests']})",
                 f"{row['gpu_blocks']}+{row['host_blocks']}", f"{row['time_scale']}",
                 *(cell(row, p) for p in policies), *(cell(row, p) for p in peers),
                 f"{row['belady']:.4f}",
                 *(f"{row['block_lru']:.4f}/{row['block_belady']:.4f}" for _ in blocks),
                 f"{row['clairvoyant']:.4f}",
                 *(f"{row[f'{p} us/block']:.1f}" for p in policies),
                 "/".join(f"{row[f'{p} ttft_p50_s']:.2f}" for p in policies)]
        print("| " + " | ".join(cells) + " |")
    print()
    print("Gap closed against the in-simulator clairvoyant, (p - lru) / (clairvoyant - lru):")
    print("| workload | GPU+host blocks | " + " | ".join(policies) + " |")
    print("|" + "---|" * (2 + len(policies)))
    for row in rows:
        gaps = (row.get(f"{p} sim gap") for p in policies)
        print(f"| {row['workload']} | {row['gpu_blocks']}+{row['host_blocks']} | "
              + " | ".join("n/a" if not isinstance(g, float) else f"{g:+.2f}" for g in gaps)
              + " |")
    if peers_reason is not None:
        print(f"vLLM columns skipped: {peers_reason}")


# The audit (``--audit``): rows of (label, source, tokens per block, fractions). A source is
# (kind, seed or first request, requests): an audit family, the built-in chat at a seed, or
# a window of a trace.
AuditSource = tuple[str, int, int]
AUDIT_ROWS: list[tuple[str, AuditSource, int, tuple[float, ...]]] = [
    *((f"{fam}", (fam, 0, 1500), 32, (0.03, 0.10))
      for fam in ("memoryless", "scan-hot", "zipf-system", "doc-qa", "heavy-tail",
                  "phase-shift", "flip")),
    ("memoryless#1", ("memoryless", 1, 1500), 32, (0.01, 0.30)),
    ("zipf-system#1", ("zipf-system", 1, 1500), 32, (0.01, 0.30)),
    ("chat#3", ("chat", 3, 1500), 32, (0.01, 0.30)),
    ("chat#4 16-token", ("chat", 4, 1500), 16, (0.03,)),
    ("mooncake-conv 512-token", ("mooncake-conv", 0, 2000), 512, (0.03, 0.10)),
    ("mooncake-conv@10000", ("mooncake-conv", 10000, 2000), 32, (0.03, 0.10)),
    ("azure-conv@5000", ("azure-conv", 5000, 2000), 32, (0.03, 0.10)),
    ("azure-code seed 1", ("azure-code#1", 0, 2000), 32, (0.03, 0.10)),
]
AUDIT_SMOKE_ROWS: list[tuple[str, AuditSource, int, tuple[float, ...]]] = [
    ("memoryless", ("memoryless", 0, 80), 32, (0.03,)),
]
# The sixteenth session's families (kvtier.sim.heldout), at seed 0: book-qa's books fill
# the GPU's floor (twice the largest request) at 3 %, so it runs at 10 % and 30 %.
HELDOUT_ROWS: list[tuple[str, AuditSource, int, tuple[float, ...]]] = [
    *((f"{fam}", (fam, 0, 1500), 32, (0.03, 0.10))
      for fam in ("tenants", "rag", "fewshot", "bursty", "parallel", "tiny", "irm")),
    ("book-qa", ("book-qa", 0, 600), 32, (0.10, 0.30)),
    # Seed 1's two rows below LRU at one scale (the sixteenth session's shortfalls).
    ("book-qa#1", ("book-qa", 1, 600), 32, (0.30,)),
    ("rag#1", ("rag", 1, 1500), 32, (0.10,)),
]
HELDOUT_SMOKE_ROWS: list[tuple[str, AuditSource, int, tuple[float, ...]]] = [
    ("parallel", ("parallel", 0, 80), 32, (0.03,)),
]
DEFAULT_POLICY = "kvtier-predict-cost"


def audit_workload(source: AuditSource) -> Workload:
    """The workload an audit row names."""
    sys.path.insert(0, str(REPO))
    from benchmarks.policy_lab.audit import FAMILIES, Window, family

    kind, arg, n = source
    if kind in HELDOUT_FAMILIES:
        return HeldOutWorkload(kind, arg, n)
    if kind in FAMILIES:
        return family(kind, arg, n)
    if kind == "chat":
        return SyntheticChat(num_requests=n, seed=arg)
    if kind == "mooncake-conv":
        return Window(MooncakeTrace(TRACES / "mooncake_conversation_trace.jsonl",
                                    limit=arg + n), arg, n)
    if kind == "azure-conv":
        return Window(AzureTrace(TRACES / "azure_llm_2023_conv.csv", limit=arg + n), arg, n)
    if kind == "azure-code#1":
        return AzureTrace(TRACES / "azure_llm_2023_code.csv", seed=1, limit=n)
    raise ValueError(f"unknown audit source {source!r}")


def _audit_setup(job: tuple[AuditSource, int, tuple[float, ...], bool]) -> list[dict[str, object]]:
    """Per capacity of one row: blocks, the time scale, Belady, vLLM's policies."""
    source, tpb, fractions, peers = job
    workload = audit_workload(source)
    stream = list(oracle_requests(workload, tpb))
    max_blocks = max(cdiv(r.num_tokens, tpb) for r in stream) + 16
    caps = capacities(stream, tpb, max_blocks, fractions, blocks_to_serve(workload, tpb))
    bounds, blocks = row_bounds(workload, tpb, caps)
    probe = simulate(workload, CacheConfig(tokens_per_block=tpb, num_gpu_blocks=caps[0][0],
                                           num_host_blocks=caps[0][1],
                                           eviction_policy="priority-lru"))
    scale = 1.0
    if (probe.ttft_s.p50 or 0.0) > TTFT_TARGET_S:
        scale = max(1.0, (probe.load.utilization or 0.0) / 0.7)
    out: list[dict[str, object]] = []
    for f, (gpu, host), bound, block in zip(fractions, caps, bounds, blocks, strict=True):
        row: dict[str, object] = {
            "fraction": f, "num_requests": len(stream), "tokens_per_block": tpb,
            "gpu_blocks": gpu, "host_blocks": host, "time_scale": round(scale, 4),
            "belady": bound.belady_hit_rate, "block_lru": block.lru_hit_rate,
            "block_belady": block.belady_hit_rate}
        if peers:
            for peer in PEERS:
                row[f"vllm-{peer}"] = run_peer(stream, tpb, gpu + host, peer)
        out.append(row)
    return out


def _audit_sim(job: tuple[AuditSource, int, int, int, float, str]) -> float:
    source, tpb, gpu, host, scale, policy = job
    config = CacheConfig(tokens_per_block=tpb, num_gpu_blocks=gpu, num_host_blocks=host,
                         eviction_policy=policy)
    return simulate(audit_workload(source), config, time_scale=scale).token_hit_rate


def audit_main(specs: list[tuple[str, AuditSource, int, tuple[float, ...]]], only: str,
               jobs: int, num_scales: int, smoke: bool, no_peers: bool) -> int:
    """Run the audit over ``specs``; print its table, then one JSON line."""
    from concurrent.futures import ProcessPoolExecutor

    if only:
        wanted = only.split(",")
        specs = [s for s in specs if any(w in s[0] for w in wanted)]
    peers = not (smoke or no_peers) and PEER_PYTHON.exists()
    policies = ["lru", "priority-lru", "s3fifo", "arc", "kvtier-predict"]
    # Scales within +-0.05 % of the row's: a learned order's draws (baselines do not move).
    steps = [k - (num_scales - 1) / 2 for k in range(num_scales)]
    with ProcessPoolExecutor(jobs) as pool:
        setups = list(pool.map(_audit_setup, [(src, tpb, fr, peers) for _, src, tpb, fr in specs]))
        rows = [{"label": label, **cap} for (label, *_), caps in zip(specs, setups, strict=True)
                for cap in caps]
        sources = [(src, tpb) for (_, src, tpb, fr) in specs for _ in fr]
        sims = [(src, tpb, int(str(r["gpu_blocks"])), int(str(r["host_blocks"])),
                 float(str(r["time_scale"])) * (1 + 0.0005 * k), p)
                for r, (src, tpb) in zip(rows, sources, strict=True)
                for p, k in [*((p, 0.0) for p in policies),
                             *((DEFAULT_POLICY, k) for k in steps)]]
        hits = iter(pool.map(_audit_sim, sims))
    for row in rows:
        for p in policies:
            row[p] = next(hits)
        draws = [next(hits) for _ in steps]
        row[DEFAULT_POLICY] = statistics.mean(draws)
        row[f"{DEFAULT_POLICY} sd"] = statistics.pstdev(draws)
        row[f"{DEFAULT_POLICY} draws"] = draws
        judge_audit_row(row)
    print_audit(rows, policies, peers)
    print(json.dumps({
        "benchmark": "bench_policy_audit", "smoke": smoke, "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "inputs": {"rows": [s[0] for s in specs], "traces": str(TRACES),
                   "num_scales": num_scales,
                   "source": "kvtier.sim.heldout" if specs[0][1][0] in HELDOUT_FAMILIES
                   else "benchmarks/policy_lab/audit.py"},
        "peers": "vllm 0.33.0 (.venv-peers)" if peers else "skipped",
        "unix_time": int(time.time()), "rows": rows}, allow_nan=False))
    return 0


def judge_audit_row(row: dict[str, object]) -> None:
    """Flag where the default falls below LRU, or vLLM's best (gap against the block-level
    LRU, as in the main table), beyond its noise (2 sd of its draws, at least 0.0005)."""
    mean = float(str(row[DEFAULT_POLICY]))
    noise = max(0.0005, 2 * float(str(row[f"{DEFAULT_POLICY} sd"])))
    lru, belady = float(str(row["lru"])), float(str(row["belady"]))
    flags = []
    if mean < lru - noise:
        flags.append("below LRU")
    # NOTE: a peer that gave no hit rate (None) is no best; a None read as a float was a
    # ValueError that lost the whole audit.
    hits = [v for v in (row.get(f"vllm-{peer}") for peer in PEERS) if isinstance(v, float)]
    best = max(hits) if hits else None
    mine = gap(mean, lru, belady)
    if best is not None:
        theirs = gap(best, float(str(row["block_lru"])), float(str(row["block_belady"])))
        if mine is not None and theirs is not None and mine < theirs - noise / (belady - lru):
            flags.append("below vLLM's best")
    row["default gap"] = mine
    row["flags"] = flags


def print_audit(rows: list[dict[str, object]], policies: list[str], peers: bool) -> None:
    cols = [*policies, DEFAULT_POLICY, *(["vllm-lru", "vllm-arc"] if peers else [])]
    header = ["row", "tpb", "GPU+host", "scale", *cols, "belady", "default's gap", "flags"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [f"{row['label']} {float(str(row['fraction'])):.0%}", f"{row['tokens_per_block']}",
                 f"{row['gpu_blocks']}+{row['host_blocks']}", f"{row['time_scale']}"]
        for c in cols:
            v = row.get(c)
            if not isinstance(v, float):  # a peer that gave no hit rate
                cells.append("skipped")
                continue
            cells.append(f"{v:.4f} (sd {float(str(row[f'{c} sd'])):.4f})"
                         if c == DEFAULT_POLICY else f"{v:.4f}")
        g = row["default gap"]
        cells += [f"{float(str(row['belady'])):.4f}",
                  "n/a" if not isinstance(g, float) else f"{g:+.3f}",
                  ", ".join(row["flags"]) if isinstance(row["flags"], list) else ""]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
