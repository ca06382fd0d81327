"""The policy lab: hit rate of every eviction policy on every workload, against Belady.

Replays each workload's request stream block by block (``benchmarks/policy_lab/replay.py``:
prefix hits only, capacity in blocks, arrival order, the model of ``kvtier.sim.oracle``)
through the known policies (LRU, ARC, SIEVE, S3-FIFO), vLLM 0.33.0's ``LRUCachePolicy`` and
``ARCCachePolicy`` (in ``.venv-peers``, through ``benchmarks/peers/vllm_policy_peer.py``),
kvtier's candidates (``benchmarks/policy_lab/learned.py``) and the offline optimum, at two
capacities per workload. Prints a table, then one JSON line.

Per policy: token hit rate, the fraction of the LRU->Belady gap it closes,
``(p - lru) / (belady - lru)``, and CPU microseconds per block access (``process_time``).
Queue-aware policies see the requests that arrived within ``--queue-delay-s`` after the one
being served (a FIFO queue where every request waits that long: its p50 TTFT).

    python benchmarks/policy_lab.py                   # first 3,000 requests of big traces
    python benchmarks/policy_lab.py --limit 0         # whole traces (final numbers)
    python benchmarks/policy_lab.py --workloads agentic,chat --no-peers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.policy_lab import workloads  # noqa: E402
from benchmarks.policy_lab.baselines import ARC, LRU, S3FIFO, SIEVE, Belady  # noqa: E402
from benchmarks.policy_lab.learned import Predictive  # noqa: E402
from benchmarks.policy_lab.replay import LabRequest, Policy, replay, truncate  # noqa: E402

from kvtier.sim.agentic import AgenticWorkload  # noqa: E402
from kvtier.sim.oracle import OracleRequest, belady_hit_tokens, lru_hit_tokens  # noqa: E402

PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
FRACTIONS = (0.03, 0.10)  # capacities: these fractions of the stream's distinct blocks


def load(name: str, limit: int | None, tpb: int) -> tuple[list[LabRequest], int]:
    """The stream of workload ``name`` and its tokens per block."""
    if name == "mooncake-conv":
        return workloads.mooncake(
            workloads.TRACES / "mooncake_conversation_trace.jsonl", limit), 512
    if name == "mooncake-synth":
        return workloads.mooncake(workloads.TRACES / "mooncake_synthetic_trace.jsonl", limit), 512
    if name in ("azure-conv", "azure-code"):
        return workloads.azure(name.split("-")[1], tpb, limit), tpb
    if name == "chat":
        return workloads.synthetic_chat(tpb), tpb
    if name == "agentic":
        return workloads.from_workload(AgenticWorkload(), tpb), tpb
    raise SystemExit(f"unknown workload {name!r}")


def capacities(name: str, requests: Sequence[LabRequest], limit: int | None,
               fractions: Sequence[float] = FRACTIONS) -> list[int]:
    if name == "mooncake-conv":  # issue 10's two settings
        return [5120, 17408] if limit is None else [5120]
    distinct = len({key for r in requests for key in r.keys})
    return [max(64, int(distinct * f) // 64 * 64) for f in fractions]


def policies(capacity: int, stream: Sequence[LabRequest], tpb: int
             ) -> list[Callable[[], Policy]]:
    def kv(**kw: bool) -> Callable[[], Policy]:
        return lambda: Predictive(capacity, tokens_per_block=tpb, **kw)
    return [
        lambda: LRU(capacity), lambda: ARC(capacity), lambda: SIEVE(capacity),
        lambda: S3FIFO(capacity),
        kv(predictor=False), kv(predictor=False, queue_aware=True), kv(),
        kv(queue_aware=True), kv(queue_aware=True, cost_aware=True),
        lambda: Belady(capacity, stream),
    ]


def run_peer(python: Path, stream: Sequence[LabRequest], tpb: int, capacity: int,
             policy: str) -> dict[str, object]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"tokens_per_block": tpb,
                   "requests": [[r.num_tokens, list(r.keys)] for r in stream]}, f)
    try:
        out = subprocess.run(
            [str(python), str(REPO / "benchmarks/peers/vllm_policy_peer.py"), f.name, policy,
             str(capacity)], capture_output=True, text=True, check=True, cwd=REPO)
    finally:
        os.unlink(f.name)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mooncake-conv,mooncake-synth,azure-conv,"
                        "azure-code,chat,agentic")
    parser.add_argument("--limit", type=int, default=3000,
                        help="first requests of each trace (0: whole traces)")
    parser.add_argument("--tokens-per-block", type=int, default=64,
                        help="block size of token-list workloads (Mooncake: 512)")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                        help="capacities as fractions of the distinct blocks (not Mooncake conv)")
    parser.add_argument("--queue-delay-s", type=float, default=1.0)
    parser.add_argument("--peers", type=Path, default=PEERS_PYTHON)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    limit = args.limit or None
    rows: list[dict[str, object]] = []
    for name in args.workloads.split(","):
        requests, tpb = load(name, limit, args.tokens_per_block)
        fractions = [float(f) for f in args.fractions.split(",")]
        for capacity in capacities(name, requests, limit, fractions):
            stream = truncate(requests, capacity)
            results: dict[str, dict[str, float]] = {}
            for make in policies(capacity, stream, tpb):
                policy = make()
                r = replay(stream, policy, tpb, args.queue_delay_s)
                results[policy.name] = {"hit_rate": r.hit_rate, "us_per_block": r.us_per_block}
            oracle = [OracleRequest(r.keys, r.num_tokens) for r in requests]
            # The lab's LRU and Belady are kvtier.sim.oracle's, step for step.
            assert results["lru"]["hit_rate"] == lru_hit_tokens(oracle, capacity, tpb).hit_rate
            assert results["belady"]["hit_rate"] == belady_hit_tokens(
                oracle, capacity, tpb).hit_rate
            if not args.no_peers and args.peers.exists():
                for peer_policy in ("lru", "arc"):
                    p = run_peer(args.peers, stream, tpb, capacity, peer_policy)
                    results[str(p["name"])] = {
                        "hit_rate": float(p["hit_rate"]),  # type: ignore[arg-type]
                        "us_per_block": 1e6 * float(p["cpu_s"])  # type: ignore[arg-type]
                        / max(1, int(p["num_blocks"]))}  # type: ignore[call-overload]
            lru, belady = results["lru"]["hit_rate"], results["belady"]["hit_rate"]
            print(f"\n{name}: {len(requests)} requests, {capacity} blocks of {tpb} tokens, "
                  f"LRU {lru:.4f}, Belady {belady:.4f}")
            print(f"  {'policy':18s} {'hit rate':>8s} {'gap closed':>10s} {'us/block':>8s}")
            for policy_name, res in results.items():
                gap = (res["hit_rate"] - lru) / (belady - lru) if belady > lru else 0.0
                res["gap_closed"] = gap
                print(f"  {policy_name:18s} {res['hit_rate']:8.4f} {gap:10.3f} "
                      f"{res['us_per_block']:8.2f}")
                rows.append({"workload": name, "num_requests": len(requests),
                             "capacity_blocks": capacity, "tokens_per_block": tpb,
                             "policy": policy_name, **res})
            sys.stdout.flush()
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(json.dumps({"queue_delay_s": args.queue_delay_s, "limit": limit, "rows": rows}))


if __name__ == "__main__":
    main()
