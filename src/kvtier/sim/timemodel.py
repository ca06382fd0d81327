"""How long a serving step takes: prefill, decode, fixed overhead and PCIe transfers.

The numbers of the built-in profiles are rough estimates from public figures, good enough
to rank cache policies by the time they save, not to predict a real engine's latency:

- KV bytes per token = 2 (K and V) x layers x KV heads x head dim x 2 bytes (bf16).
- Prefill cost assumes about 50 % of an H100's ~989 dense bf16 TFLOP/s at 2 FLOP per
  parameter per token.
- The step overhead is one read of the weights from HBM (~3.35 TB/s) plus launch costs;
  the per-sequence decode cost stands for reading that sequence's KV.
- PCIe Gen5 x16 moves about 55 GB/s each way with pinned, batched copies (measured on an
  H200 host, BACKGROUND.md section 6).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from kvtier.reprs import shown
from kvtier.sim._checks import FieldRange, check_float, check_int

MAX_KV_BYTES_PER_TOKEN = 1 << 30
MAX_COST_S = 3600.0
MAX_BYTES_PER_S = 1e15
MAX_COUNT = (1 << 63) - 1  # tokens, sequences or bytes of one step or fetch

# NOTE: upper (and PCIe's lower) bounds far past any machine keep a replay's virtual clock
# finite: 1e306 s a token overflowed it to inf (OverflowError).
PROFILE_RANGES: dict[str, FieldRange] = {
    "kv_bytes_per_token": FieldRange("int", 1, MAX_KV_BYTES_PER_TOKEN),
    "prefill_s_per_token": FieldRange("float", 0.0, MAX_COST_S),
    "decode_s_per_seq": FieldRange("float", 0.0, MAX_COST_S),
    "step_overhead_s": FieldRange("float", 0.0, MAX_COST_S),
    "pcie_bytes_per_s": FieldRange("float", 1.0, MAX_BYTES_PER_S),
    "pcie_duplex": FieldRange("float", 0.5, 1.0),
}
"""The range of each number field of :class:`ModelProfile`, which its checks and the
command line's ``--set-profile`` both read."""


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """Cost constants of one model on one machine (see the module docstring for provenance).

    ``pcie_bytes_per_s`` is per direction; H2D and D2H run at the same time, together at
    ``pcie_duplex`` times twice that rate (the two-way ceiling over two one-way ones,
    measured in the same run: 97.8 / (55.4 + 55.3) GB/s = 0.88 on an H200 host, PCIe
    Gen5). With ``overlap_transfers`` the copies run beside compute (separate streams),
    else after.
    """

    name: str
    kv_bytes_per_token: int
    prefill_s_per_token: float
    decode_s_per_seq: float
    step_overhead_s: float
    pcie_bytes_per_s: float
    overlap_transfers: bool = True
    pcie_duplex: float = 0.88

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {shown(self.name)}")
        for field, valid in PROFILE_RANGES.items():
            value = valid.check(field, getattr(self, field))
            if valid.kind == "int":  # kept as the plain int (``kvtier.counts``)
                object.__setattr__(self, field, value)
        if type(self.overlap_transfers) is not bool:
            raise ValueError(f"overlap_transfers must be a bool, got "
                             f"{shown(self.overlap_transfers)}")


_GIB = 1 << 30

PROFILES: dict[str, ModelProfile] = {
    profile.name: profile
    for profile in (
        # Llama-3-8B bf16 on one H100: KV 2 x 32 layers x 8 heads x 128 x 2 B = 128 KiB;
        # 16 GFLOP/token at ~500 TFLOP/s = 32 us, rounded up to 40 us (25k tokens/s);
        # 16 GB of weights at 3.35 TB/s = 4.8 ms per step.
        ModelProfile(
            name="llama3-8b-h100",
            kv_bytes_per_token=128 * 1024,
            prefill_s_per_token=40e-6,
            decode_s_per_seq=80e-6,
            step_overhead_s=5e-3,
            pcie_bytes_per_s=55e9,
        ),
        # Llama-3-70B bf16, tensor-parallel on four H100s: KV 2 x 80 x 8 x 128 x 2 B =
        # 320 KiB per token over all GPUs; 140 GFLOP/token at ~40 % of 4 x 989 TFLOP/s
        # (all-reduces cost the rest) = 88 us; 140 GB / 4 GPUs / 3.35 TB/s = 10.4 ms plus
        # all-reduce latency; each GPU moves its KV shard over its own PCIe link.
        ModelProfile(
            name="llama3-70b-h100x4",
            kv_bytes_per_token=320 * 1024,
            prefill_s_per_token=90e-6,
            decode_s_per_seq=100e-6,
            step_overhead_s=12e-3,
            pcie_bytes_per_s=4 * 55e9,
        ),
        # Round binary numbers for tests: every product and sum below is exact in floats.
        ModelProfile(
            name="tiny-test",
            kv_bytes_per_token=1024,
            prefill_s_per_token=2.0**-10,
            decode_s_per_seq=2.0**-6,
            step_overhead_s=2.0**-3,
            pcie_bytes_per_s=float(_GIB),
            overlap_transfers=False,
            pcie_duplex=1.0,
        ),
    )
}


def get_profile(name: str, **overrides: Any) -> ModelProfile:
    """The registered profile ``name``, with ``overrides`` replacing some of its fields."""
    if name not in PROFILES:
        raise ValueError(f"unknown model profile {shown(name)}; known: {sorted(PROFILES)}")
    known = {f.name for f in fields(ModelProfile)} - {"name"}
    for field in overrides:
        if field not in known:
            raise ValueError(
                f"unknown ModelProfile field {shown(field)} in overrides; known: {sorted(known)}"
            )
    return replace(PROFILES[name], **overrides)


# A remote fetch's defaults: what benchmarks/bench_remote.py measured of RedisRemoteStore
# reading 4 MiB blocks (one llama3-8b block of 32 tokens) from one Redis on loopback, with
# redis-py + hiredis; benchmarks/results/remote.md has the run.
DEFAULT_REMOTE_LATENCY_S = 0.1e-3
DEFAULT_REMOTE_BYTES_PER_S = 0.25e9


@dataclass(frozen=True, slots=True)
class RemoteLink:
    """The shared remote store as the fleet simulator charges it: every fetch costs
    ``latency_s + bytes / bytes_per_s``, and the store serves one transfer at a time (reads
    and writes of every instance queue for it, as on one single-threaded Redis).

    ``bytes_per_s`` is the store's aggregate read throughput (all shards together);
    ``max_backlog_s`` bounds the queued work: a write arriving when the store is further
    behind than that is dropped, as a full I/O queue refuses it.
    """

    latency_s: float = DEFAULT_REMOTE_LATENCY_S
    bytes_per_s: float = DEFAULT_REMOTE_BYTES_PER_S
    max_backlog_s: float = 1.0

    def __post_init__(self) -> None:
        check_float("latency_s", self.latency_s, 0.0, 3600.0)
        check_float("bytes_per_s", self.bytes_per_s, 0.0, None)
        if self.bytes_per_s == 0:
            raise ValueError(f"bytes_per_s must be > 0, got {shown(self.bytes_per_s)}")
        check_float("max_backlog_s", self.max_backlog_s, 0.0, 3600.0)

    def transfer_seconds(self, num_bytes: int) -> float:
        """How long the store is busy moving ``num_bytes`` (latency excluded). Pure."""
        num_bytes = _check_count("num_bytes", num_bytes)
        return num_bytes / self.bytes_per_s


def _check_count(field: str, value: int) -> int:
    """``value`` as a plain int (``kvtier.counts``); ValueError naming ``field``.

    NOTE: bounded: a count past the float range raised OverflowError, naming no field. The
    plain int is what the arithmetic reads: a NumPy count times the bytes per token wrapped
    around in int64."""
    return check_int(field, value, 0, MAX_COUNT)


@dataclass(frozen=True, slots=True)
class TimeModel:
    """Step durations under a :class:`ModelProfile`; every method is a pure query."""

    profile: ModelProfile

    def __post_init__(self) -> None:
        if not isinstance(self.profile, ModelProfile):
            raise ValueError(f"profile must be a ModelProfile, got {shown(self.profile)}")

    def kv_bytes(self, num_tokens: int) -> int:
        """Bytes of KV cache that ``num_tokens`` tokens occupy."""
        num_tokens = _check_count("num_tokens", num_tokens)
        return num_tokens * self.profile.kv_bytes_per_token

    def compute_seconds(self, num_prefill_tokens: int, num_decode_seqs: int) -> float:
        """GPU time of a step: overhead + prefill + decode, or 0.0 when it has no work."""
        num_prefill_tokens = _check_count("num_prefill_tokens", num_prefill_tokens)
        num_decode_seqs = _check_count("num_decode_seqs", num_decode_seqs)
        if num_prefill_tokens == 0 and num_decode_seqs == 0:
            return 0.0
        p = self.profile
        return (
            p.step_overhead_s
            + num_prefill_tokens * p.prefill_s_per_token
            + num_decode_seqs * p.decode_s_per_seq
        )

    @property
    def break_even_bytes_per_s(self) -> float:
        """The read throughput above which fetching a token's KV beats recomputing it:
        KV bytes per token / prefill seconds per token (infinite when prefill is free).
        Pure."""
        p = self.profile
        if p.prefill_s_per_token == 0:
            return float("inf")
        return p.kv_bytes_per_token / p.prefill_s_per_token

    def transfer_seconds(self, bytes_h2d: int, bytes_d2h: int) -> float:
        """PCIe time of a step's copies: the two directions run at the same time, each at
        most at the one-way rate, both together at most at the two-way ceiling."""
        bytes_h2d = _check_count("bytes_h2d", bytes_h2d)
        bytes_d2h = _check_count("bytes_d2h", bytes_d2h)
        p = self.profile
        one_way = max(bytes_h2d, bytes_d2h) / p.pcie_bytes_per_s
        return max(one_way, (bytes_h2d + bytes_d2h) / (2 * p.pcie_duplex * p.pcie_bytes_per_s))

    def step_seconds(
        self, num_prefill_tokens: int, num_decode_seqs: int, bytes_h2d: int, bytes_d2h: int
    ) -> float:
        """Duration of one step: ``max(compute, transfer)`` when overlapped, else the sum."""
        compute_s = self.compute_seconds(num_prefill_tokens, num_decode_seqs)
        transfer_s = self.transfer_seconds(bytes_h2d, bytes_d2h)
        if self.profile.overlap_transfers:
            return max(compute_s, transfer_s)
        return compute_s + transfer_s
