"""Plots of simulator reports (extra ``plot``: matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtier.sim.report import OracleBounds, SimReport


def require_matplotlib() -> Any:
    """matplotlib's pyplot on the Agg backend; ImportError if the extra is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(reports: list[SimReport], path: Path, file_format: str | None = None) -> None:
    """Hit rate (one line per eviction policy, with the oracle bounds) and TTFT against
    GPU + host capacity, as a PNG (or ``file_format``, else the one ``path`` names).

    Where runs of different GPU sizes share a capacity (300 GPU + 300 host, 600 GPU + 0),
    every line is drawn per GPU size too: each run's bounds cover the requests it served,
    which its GPU size decides, so one line by capacity alone dropped all but one run's
    bounds at that capacity and joined two runs of a policy by a vertical stroke."""
    plt = require_matplotlib()
    fig, (hits, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    split = _gpu_sizes_share_a_capacity(reports)
    policies = {str(r.cache_config["eviction_policy"]) for r in reports}
    several = len(policies) > 1
    by_line: dict[tuple[str, int | None], list[SimReport]] = {}
    for r in reports:
        key = (str(r.cache_config["eviction_policy"]), _gpu(r) if split else None)
        by_line.setdefault(key, []).append(r)
    for (policy, gpu), runs in by_line.items():
        runs = sorted(runs, key=_capacity)
        name = " ".join(part for part in (policy if several else "",
                                          "" if gpu is None else f"{gpu:,} GPU") if part)
        capacity = [_capacity(r) for r in runs]
        hits.plot(capacity, [r.token_hit_rate for r in runs], "o-",
                  label=f"kvtier {name}" if name else "kvtier")
        for q in ("p50", "p99"):
            ttft.plot(capacity, [getattr(r.ttft_s, q) for r in runs], "o-",
                      label=f"{name} {q}" if name else q)
    if all(r.oracle is not None for r in reports):
        by_bounds: dict[int | None, dict[int, OracleBounds]] = {}
        for r in reports:
            assert r.oracle is not None
            by_bounds.setdefault(_gpu(r) if split else None, {})[_capacity(r)] = r.oracle
        for gpu, bounds in by_bounds.items():
            capacity = sorted(bounds)
            where = "" if gpu is None else f", {gpu:,} GPU"
            hits.plot(capacity, [bounds[c].belady_hit_rate for c in capacity], "s--",
                      label=f"Belady (offline{where})")
            hits.plot(capacity, [bounds[c].lru_hit_rate for c in capacity], "x--",
                      label=f"LRU (offline{where})")
            hits.plot(capacity, [bounds[c].unlimited_hit_rate for c in capacity], ":",
                      label=f"unlimited{where}")
    hits.set(xlabel="GPU + host blocks", ylabel="token hit rate", title="Hit rate")
    hits.legend()
    ttft.set(xlabel="GPU + host blocks", ylabel="TTFT (virtual s)", title="Time to first token")
    ttft.legend()
    fig.suptitle(str(reports[0].workload.get("name")))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100, format=file_format)
    finally:
        plt.close(fig)


def _gpu_sizes_share_a_capacity(reports: list[SimReport]) -> bool:
    """Whether two runs of different GPU sizes have the same GPU + host capacity. Pure."""
    sizes: dict[int, set[int]] = {}
    for r in reports:
        sizes.setdefault(_capacity(r), set()).add(_gpu(r))
    return any(len(gpus) > 1 for gpus in sizes.values())


def _gpu(report: SimReport) -> int:
    return int(str(report.cache_config["num_gpu_blocks"]))


def _capacity(report: SimReport) -> int:
    return (int(str(report.cache_config["num_gpu_blocks"]))
            + int(str(report.cache_config["num_host_blocks"])))
