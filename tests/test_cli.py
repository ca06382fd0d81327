"""Tests of the ``kvtier`` command: replay, compare and sweep, their reports and errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import kvtier
from kvtier.cli import main
from kvtier.sim import SimReport, SyntheticChat

REPORT_KEYS = {field.name for field in dataclasses.fields(SimReport)}
TIER_KEYS = {
    "reused_blocks", "missed_blocks", "onboarded_blocks", "offloaded_blocks", "evicted_blocks",
    "hit_rate",
}
SUMMARY_KEYS = {"mean", "p50", "p90", "p99"}
CPU_KEYS = {"wall_s", "scheduler_s", "us_per_step_mean", "us_per_step_p99",
            "us_per_full_step_mean", "us_per_full_step_p99"}
ORACLE_KEYS = {"tokens_per_block", "num_capacity_blocks", "unlimited_hit_rate",
               "belady_hit_rate", "lru_hit_rate", "partial_reuse"}
LOAD_KEYS = {"busy_s", "arrival_span_s", "num_instances", "utilization", "overloaded",
             "sustainable_time_scale", "sustainable_instances"}


pytest_plugins = ["shared_fixtures"]
# A defect (an unexpected exception) raises with its traceback instead of exit 70.
pytestmark = pytest.mark.usefixtures("debug_mode")

# Three requests over 512-token hash ids (hash id h = tokens h*512 .. h*512+511):
#   r0  [1        | 2   ]  600 tokens
#   r1  [1        | 3   ]  600 tokens: shares all of hash 1 with r0 -> 16 blocks = 512 tokens
#   r2  [1 ]               300 tokens: matches up to its last token but one (299 tokens):
#                          9 full blocks = 288, plus 11 tokens of block 9 by partial reuse
SHARED_PREFIX_TRACE = [
    {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]},
    {"timestamp": 10, "input_length": 600, "output_length": 5, "hash_ids": [1, 3]},
    {"timestamp": 20, "input_length": 300, "output_length": 5, "hash_ids": [1]},
]


def make_mooncake(tmp_path: Path, records: list[dict[str, object]]) -> Path:
    """Write ``records`` as a Mooncake JSONL trace and return its path."""
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``kvtier args...`` in-process; return exit status, stdout and stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict[str, Any]:
    """The JSON object on the last line of ``out``."""
    report: dict[str, Any] = json.loads(out.splitlines()[-1])
    return report


def assert_report_schema(report: dict[str, Any]) -> None:
    """The keys of one simulation report, nested groups included."""
    assert set(report) == REPORT_KEYS
    assert set(report["gpu"]) == set(report["host"]) == TIER_KEYS
    assert set(report["ttft_s"]) == set(report["e2e_s"]) == SUMMARY_KEYS
    assert set(report["cpu"]) == CPU_KEYS
    assert report["oracle"] is None or set(report["oracle"]) == ORACLE_KEYS
    assert set(report["load"]) == LOAD_KEYS


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version and exits 0."""
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0
    assert out == f"kvtier {kvtier.__version__}\n" == "kvtier 0.1.0\n"


def test_version_via_python_m() -> None:
    """``python -m kvtier --version`` works as a separate process."""
    done = subprocess.run([sys.executable, "-m", "kvtier", "--version"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "kvtier 0.1.0\n", "")


def test_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists the three commands; replay --help names the scheduler knobs."""
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(name in out for name in ("replay", "compare", "sweep"))
    code, out, _ = run_cli(capsys, "replay", "--help")
    assert code == 0
    for option in ("--max-num-tokens", "--admission", "--capacity-policy", "--set-profile",
                   "--time-scale", "--oracle"):
        assert option in out


def test_replay_default_workload(capsys: pytest.CaptureFixture[str]) -> None:
    """The built-in synthetic workload replays on its own tiers (1,024 GPU + 1,024 host
    blocks) with the offline references: a table, then one JSON report line last."""
    code, out, err = run_cli(capsys, "replay", "--limit", "30", "--no-progress")
    assert (code, err) == (0, "")
    report = last_json(out)
    assert_report_schema(report)
    assert report["num_requests"] == 30
    assert (report["cache_config"]["num_gpu_blocks"],
            report["cache_config"]["num_host_blocks"]) == (1024, 1024)
    assert report["oracle"]["num_capacity_blocks"] == 2048
    assert isinstance(report["token_hit_rate"], float) and 0 < report["token_hit_rate"] < 1
    assert report["num_overflow_steps"] == report["num_lost_reuse_tokens"] == 0
    assert report["workload"] == SyntheticChat(num_requests=30).describe()
    assert report["profile"]["name"] == "llama3-8b-h100"
    table = out.splitlines()[:-1]
    assert [row.split()[0] for row in table] == [
        "workload", "cache", "scheduler", "model", "requests", "hit", "reuse", "overflow",
        "TTFT", "E2E", "throughput", "load", "transfers", "cpu", "oracle",
    ]
    assert f"LRU {report['oracle']['lru_hit_rate']:.4f}, Belady" in table[-1]
    _, out, _ = run_cli(capsys, "replay", "--limit", "5", "--no-progress", "--no-oracle",
                        "--workload", "agentic")
    report = last_json(out)
    assert report["oracle"] is None and report["cache_config"]["num_host_blocks"] == 0
    assert report["cache_config"]["num_gpu_blocks"] == 16384


def test_replay_default_workload_follows_seed(capsys: pytest.CaptureFixture[str]) -> None:
    """The same seed gives the same reuse; another seed gives other prompts."""
    runs = [last_json(run_cli(capsys, "replay", "--limit", "20", "--no-progress",
                              "--seed", seed)[1]) for seed in ("0", "0", "1")]
    assert runs[0]["num_reused_tokens"] == runs[1]["num_reused_tokens"]
    assert runs[0]["num_prompt_tokens"] != runs[2]["num_prompt_tokens"]


def test_replay_knobs_reach_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Scheduler, cache and profile options appear in the report's configs."""
    code, out, _ = run_cli(
        capsys, "replay", "--limit", "10", "--no-progress", "--max-num-tokens", "1024",
        "--max-batch-size", "8", "--max-chunk-tokens", "256", "--capacity-policy",
        "max_utilization", "--admission", "probe", "--host-blocks", "64", "--time-scale", "2",
        "--set-profile", "pcie_bytes_per_s=2.5e10", "--set-profile", "overlap_transfers=false",
        "--num-speculative-tokens", "2", "--draft-acceptance", "0.5", "--oracle")
    assert code == 0
    report = last_json(out)
    assert report["scheduler_config"] == {
        "max_num_tokens": 1024, "max_batch_size": 8, "enable_chunked_prefill": True,
        "max_chunk_tokens": 256, "capacity_policy": "max_utilization", "admission": "probe",
        "max_wait_steps": 64, "num_speculative_tokens": 2}
    spec = report["speculative"]
    assert spec["draft_acceptance"] == 0.5 and 0 < spec["num_accepted_draft_tokens"] < (
        spec["num_draft_tokens"])
    assert any(line.startswith("drafts      up to 2 a decode") for line in out.splitlines())
    assert report["cache_config"]["num_host_blocks"] == 64 and report["time_scale"] == 2.0
    assert report["profile"]["pcie_bytes_per_s"] == 2.5e10
    assert report["profile"]["overlap_transfers"] is False
    assert report["oracle"]["num_capacity_blocks"] == 1024 + 64  # the built-in chat's GPU tier
    assert out.splitlines()[-2].startswith("oracle")


@pytest.mark.parametrize(
    ("flags", "num_reused"),
    [([], 512 + 299), (["--no-partial-reuse"], 512 + 288)],
)
def test_replay_mooncake_exact_reuse(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], num_reused: int
) -> None:
    """A shared 512-token hash id is reused exactly; partial reuse adds 11 copied tokens."""
    path = make_mooncake(tmp_path, SHARED_PREFIX_TRACE)
    code, out, _ = run_cli(capsys, "replay", str(path), "--no-progress", *flags)
    assert code == 0
    report = last_json(out)
    assert (report["num_requests"], report["num_prompt_tokens"]) == (3, 1500)
    assert report["num_reused_tokens"] == report["num_credited_tokens"] == num_reused
    assert report["token_hit_rate"] == num_reused / 1500
    assert report["num_output_tokens"] == 15


def test_replay_azure_csv(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A .csv trace is read as Azure 2023, every row a request of ContextTokens tokens."""
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:15:47.0000000,1200,10\n", encoding="utf-8")
    code, out, _ = run_cli(capsys, "replay", str(path), "--no-progress", "--seed", "7")
    assert code == 0
    report = last_json(out)
    assert (report["num_requests"], report["num_prompt_tokens"]) == (2, 1574)
    assert report["workload"]["kind"] == "azure"


def test_replay_bailian_jsonl(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A Qwen-Bailian trace (chat ids, seconds, 16-token block hashes) is read as such:
    with whole blocks only, the second turn reuses the first's one whole 32-token block
    (the first turn's next block holds its last 8 prompt tokens, then its output)."""
    rows = [
        {"chat_id": 1, "parent_chat_id": -1, "timestamp": 0.5, "input_length": 40,
         "output_length": 3, "type": "text", "turn": 1, "hash_ids": [10, 11, 12]},
        {"chat_id": 2, "parent_chat_id": 1, "timestamp": 9.5, "input_length": 80,
         "output_length": 3, "type": "text", "turn": 2, "hash_ids": [10, 11, 12, 13, 14]},
    ]
    path = make_mooncake(tmp_path, rows)
    code, out, _ = run_cli(capsys, "replay", str(path), "--no-progress",
                           "--no-partial-reuse")
    assert code == 0
    report = last_json(out)
    assert (report["workload"]["kind"], report["workload"]["hash_block_tokens"]) == (
        "bailian", 16)
    assert report["workload"]["span_s"] == 9.0
    assert report["num_reused_tokens"] == 32  # one whole 32-token block: tokens 0..31
    code, _, err = run_cli(capsys, "replay", str(path), "--no-progress",
                           "--trace-time-unit", "ms", "--trace-block-tokens", "32")
    assert code == 2 and "has 3 ids, expected ceil(40/32) = 2" in err


@pytest.mark.parametrize("option", [["--trace-block-tokens", "16"], ["--trace-time-unit", "s"]])
def test_trace_options_need_a_jsonl_trace(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                          option: list[str]) -> None:
    csv_path = tmp_path / "azure.csv"
    csv_path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                        "2023-11-16 18:15:46.6805900,374,44\n", encoding="utf-8")
    for trace in ([], [str(csv_path)]):
        code, _, err = run_cli(capsys, "replay", *trace, "--no-progress", *option)
        assert code == 2
        assert f"{option[0]} applies to a .jsonl trace only" in err


def test_trace_time_unit_rescales_a_mooncake_trace(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    path = make_mooncake(tmp_path, SHARED_PREFIX_TRACE)
    code, out, _ = run_cli(capsys, "replay", str(path), "--no-progress",
                           "--trace-time-unit", "s")
    assert code == 0 and last_json(out)["workload"]["span_s"] == 20.0


def test_compare_four_runs_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    """compare runs claim and probe, GPU only and GPU + host (4 x GPU by default)."""
    code, out, _ = run_cli(capsys, "compare", "--limit", "15", "--no-progress",
                           "--gpu-blocks", "1024", "--oracle")
    assert code == 0
    document = last_json(out)
    assert set(document) == {"command", "runs"} and document["command"] == "compare"
    runs = document["runs"]
    assert [run["label"] for run in runs] == [
        "claim GPU only", "claim GPU+host", "probe GPU only", "probe GPU+host"]
    for run in runs:
        assert set(run) == {"label", "report"}
        assert_report_schema(run["report"])
    assert [run["report"]["cache_config"]["num_host_blocks"] for run in runs] == [0, 4096] * 2
    assert [run["report"]["oracle"]["num_capacity_blocks"] for run in runs] == [1024, 5120] * 2
    header, *rows = out.splitlines()[:-1]
    assert header.split() == ["claim", "GPU", "only", "claim", "GPU+host", "probe", "GPU",
                              "only", "probe", "GPU+host"]
    assert [row[:15].strip() for row in rows] == [
        "admission", "GPU blocks", "host blocks", "hit rate", "from host", "LRU (offline)",
        "Belady",
        "overflow steps", "worst overflow", "lost reuse", "preemptions", "TTFT p50",
        "TTFT p99", "tokens/s", "us/step"]


def test_sweep_one_run_per_capacity(capsys: pytest.CaptureFixture[str]) -> None:
    """sweep crosses GPU and host sizes, with the oracle bound on by default."""
    code, out, _ = run_cli(capsys, "sweep", "--limit", "15", "--no-progress",
                           "--gpu-blocks", "512,1024", "--host-blocks", "0,256")
    assert code == 0
    document = last_json(out)
    assert set(document) == {"command", "runs"} and document["command"] == "sweep"
    sizes = [(r["cache_config"]["num_gpu_blocks"], r["cache_config"]["num_host_blocks"])
             for r in document["runs"]]
    assert sizes == [(512, 0), (512, 256), (1024, 0), (1024, 256)]
    for report in document["runs"]:
        assert_report_schema(report)
        assert report["oracle"]["belady_hit_rate"] <= report["oracle"]["unlimited_hit_rate"]
    table = out.splitlines()[:-1]
    assert table[0].split()[:4] == ["GPU", "blocks", "host", "blocks"] and len(table) == 5


@pytest.mark.parametrize("command", ["replay", "compare"])
def test_eviction_policy_is_reported(capsys: pytest.CaptureFixture[str], command: str) -> None:
    """--eviction-policy NAME runs that policy and reports it as cache_config.eviction_policy."""
    code, out, _ = run_cli(capsys, command, "--limit", "10", "--no-progress",
                           "--gpu-blocks", "512", "--eviction-policy", "kvtier-predict")
    assert code == 0
    document = last_json(out)
    reports = [document] if command == "replay" else [r["report"] for r in document["runs"]]
    assert [r["cache_config"]["eviction_policy"] for r in reports] == (
        ["kvtier-predict"] * len(reports))


def test_replay_default_policy(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --eviction-policy the JSON line names the default policy,
    kvtier-predict-cost."""
    code, out, _ = run_cli(capsys, "replay", "--limit", "5", "--no-progress", "--gpu-blocks",
                           "512")
    assert (code == 0
            and last_json(out)["cache_config"]["eviction_policy"] == "kvtier-predict-cost")


def test_sweep_one_run_per_policy_and_capacity(capsys: pytest.CaptureFixture[str]) -> None:
    """sweep --eviction-policy a,b runs every capacity per policy, policy first in the table,
    with the same Belady bound for the same capacity."""
    code, out, _ = run_cli(capsys, "sweep", "--limit", "15", "--no-progress",
                           "--gpu-blocks", "512", "--host-blocks", "0,256",
                           "--eviction-policy", "lru,kvtier-predict")
    assert code == 0
    runs = last_json(out)["runs"]
    assert [(r["cache_config"]["eviction_policy"], r["cache_config"]["num_host_blocks"])
            for r in runs] == [("lru", 0), ("lru", 256), ("kvtier-predict", 0),
                               ("kvtier-predict", 256)]
    assert runs[0]["oracle"] == runs[2]["oracle"] and runs[1]["oracle"] == runs[3]["oracle"]
    table = out.splitlines()[:-1]
    assert table[0].split()[:3] == ["policy", "GPU", "blocks"] and len(table) == 5
    assert [row.split()[0] for row in table[1:]] == ["lru", "lru", "kvtier-predict",
                                                     "kvtier-predict"]


def test_sweep_plot_one_line_per_policy(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    """--plot with two policies writes a PNG with a hit-rate line per policy."""
    pytest.importorskip("matplotlib", reason="the 'plot' extra (matplotlib) is not installed")
    import matplotlib.axes

    labels: list[str] = []
    original = matplotlib.axes.Axes.plot

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        labels.append(str(kwargs.get("label")))
        return original(self, *args, **kwargs)

    target = tmp_path / "sweep.png"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.axes.Axes, "plot", spy)
        code, _, _ = run_cli(capsys, "sweep", "--limit", "10", "--no-progress",
                             "--host-blocks", "0,128", "--eviction-policy",
                             "priority-lru,kvtier-predict", "--plot", str(target))
    assert code == 0 and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert labels[:1] + labels[3:4] == ["kvtier priority-lru", "kvtier kvtier-predict"]
    assert {"Belady (offline)", "LRU (offline)", "unlimited"} <= set(labels)


def test_agentic_workload(capsys: pytest.CaptureFixture[str]) -> None:
    """--workload agentic replays the built-in agentic tool loops (its first N steps)."""
    code, out, _ = run_cli(capsys, "replay", "--workload", "agentic", "--limit", "12",
                           "--no-progress", "--gpu-blocks", "4096")
    assert code == 0
    document = last_json(out)
    assert document["workload"]["kind"] == "agentic"
    assert document["workload"]["num_requests"] == 12 and document["num_requests"] == 12


def test_sweep_plot_writes_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--plot FILE writes a PNG when matplotlib is installed."""
    pytest.importorskip("matplotlib", reason="the 'plot' extra (matplotlib) is not installed")
    target = tmp_path / "sweep.png"
    code, _, _ = run_cli(capsys, "sweep", "--limit", "10", "--no-progress", "--host-blocks",
                         "0,128", "--plot", str(target))
    assert code == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_plot_without_matplotlib(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without matplotlib, --plot fails at once with the install command, exit 2."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes ``import matplotlib`` fail
    code, out, err = run_cli(capsys, "sweep", "--limit", "5", "--no-progress", "--plot",
                             str(tmp_path / "x.png"))
    assert (code, out) == (2, "")
    assert err == ("kvtier: error: --plot needs matplotlib; install it with: "
                   "pip install 'kvtier[plot]'\n")


@pytest.mark.parametrize("command", ["replay", "compare", "sweep"])
def test_json_file_equals_stdout_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    """--json FILE holds the same document as the JSON line on stdout."""
    target = tmp_path / "report.json"
    code, out, _ = run_cli(capsys, command, "--limit", "8", "--no-progress", "--no-oracle",
                           "--json", str(target))
    assert code == 0
    assert json.loads(target.read_text(encoding="utf-8")) == last_json(out)


def test_progress_bar_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --no-progress a tqdm bar counts requests on stderr, never on stdout."""
    code, out, err = run_cli(capsys, "replay", "--limit", "5")
    assert code == 0
    assert "/5 [" in err and "req/s" in err
    assert last_json(out)["num_requests"] == 5


def test_progress_without_tqdm(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When tqdm is not installed the replay runs silently, without a bar."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes ``import tqdm`` fail
    code, out, err = run_cli(capsys, "replay", "--limit", "5")
    assert (code, err) == (0, "")
    assert last_json(out)["num_requests"] == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens-per-block", "3"],
         "argument --tokens-per-block: must be a power of two in 1..65536, got 3"),
        (["--offload-min-priority", "200"],
         "argument --offload-min-priority: must be an integer <= 100, got 200"),
        (["--max-num-tokens", "0"],
         "argument --max-num-tokens: must be an integer >= 1, got 0"),
        (["--gpu-blocks", "4"],
         "all 3 requests are too large for 4 GPU blocks of 32 tokens; raise --gpu-blocks"),
        # Without chunked prefill no step could prefill them (the scheduler refuses them).
        (["--no-chunked-prefill", "--max-num-tokens", "16"],
         "all 3 requests are too large for 1024 GPU blocks of 32 tokens or, without chunked "
         "prefill, a step of 16 tokens; raise --gpu-blocks or --max-num-tokens, or drop "
         "--no-chunked-prefill"),
        (["--set-profile", "warp_speed=9"],
         "--set-profile: unknown profile constant 'warp_speed'; known: decode_s_per_seq, "
         "kv_bytes_per_token, overlap_transfers, pcie_bytes_per_s, pcie_duplex, "
         "prefill_s_per_token, step_overhead_s"),
        (["--set-profile", "pcie_bytes_per_s=fast"],
         "--set-profile pcie_bytes_per_s: expected a number, got 'fast'"),
        (["--set-profile", "kv_bytes_per_token=1.5"],
         "--set-profile kv_bytes_per_token: expected an integer, got '1.5'"),
        (["--set-profile", "overlap_transfers=maybe"],
         "--set-profile overlap_transfers: expected true or false, got 'maybe'"),
        (["--set-profile", "pcie_bytes_per_s"], "--set-profile expects KEY=VALUE, got "
         "'pcie_bytes_per_s'"),
        (["--set-profile", "pcie_bytes_per_s=0"],
         "--set-profile pcie_bytes_per_s=0: must be a finite number in [1.0, "
         "1000000000000000.0], got 0"),
        (["no-such-trace.jsonl"],
         "cannot read trace no-such-trace.jsonl: No such file or directory"),
        (["trace.txt"],
         "TRACE must be a .jsonl (Mooncake, Bailian) or .csv (Azure, BurstGPT) file, got "
         "'trace.txt'"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Impossible settings and unreadable traces end in one error line and status 2."""
    code, out, err = run_cli(capsys, "replay", "--no-progress", "--limit", "3", *args)
    assert (code, out) == (2, "")
    assert err.startswith(f"kvtier: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["replay", "compare", "sweep"])
def test_malformed_trace_names_file_line_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    """A bad trace line is reported as file:line: field, with status 2 and no traceback."""
    bad = dict(SHARED_PREFIX_TRACE[1], input_length="600")
    path = make_mooncake(tmp_path, [SHARED_PREFIX_TRACE[0], bad])
    code, out, err = run_cli(capsys, command, str(path))
    assert (code, out) == (2, "")
    assert err == (f"kvtier: error: malformed trace: {path}:2: field 'input_length': "
                   "expected an integer, got '600'\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "--bogus"], "unrecognized arguments: --bogus"),
        (["replay", "--time-scale", "0"],
         "argument --time-scale: must be a finite number in (0, 1e+10]"),
        (["replay", "--limit", "x"], "argument --limit: expected an integer, got 'x'"),
        (["replay", "--hash-algo", "md5"], "argument --hash-algo: invalid choice: 'md5'"),
        (["replay", "--profile", "gpt-9"], "argument --profile: invalid choice: 'gpt-9'"),
        (["sweep", "--host-blocks", "0,x"],
         "argument --host-blocks: expected comma-separated integers, got '0,x'"),
        (["sweep", "--gpu-blocks", "0"], "argument --gpu-blocks: every value must be >= 1"),
        (["replay", "--eviction-policy", "fifo"],
         "argument --eviction-policy: invalid choice: 'fifo'"),
        (["sweep", "--eviction-policy", "lru,fifo"],
         "argument --eviction-policy: unknown policy 'fifo'; choose from priority-lru, lru, "
         "arc, s3fifo, kvtier-predict, kvtier-predict-cost"),
        (["sweep", "--eviction-policy", "lru,lru"],
         "argument --eviction-policy: a policy is named twice in 'lru,lru'"),
        (["replay", "--gpu-blocks", "0"], "argument --gpu-blocks: must be an integer >= 1, got 0"),
        (["replay", "--instances", "100000"],
         "argument --instances: must be an integer <= 1024, got 100000"),
        (["replay", "--router-alpha", "nan"], "argument --router-alpha: must be a finite number"),
        (["replay", "--limit", "0"], "argument --limit: must be an integer >= 1, got 0"),
        (["replay", "--max-wait-steps", "0"],
         "argument --max-wait-steps: must be an integer >= 1, got 0"),
        (["compare", "--admission", "probe"], "unrecognized arguments: --admission"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """argparse's own errors (unknown option, bad value, no command) exit 2 in one line, like
    every other refusal: the message and where the options are listed, not the usage."""
    code, out, err = run_cli(capsys, *args)
    assert (code, out) == (2, "")
    assert message in err and "Traceback" not in err
    assert err.startswith("kvtier: error: ") and err.endswith(" --help')\n"), err
    assert len(err.splitlines()) == 1, err


def test_replay_fleet_behind_a_router(capsys: pytest.CaptureFixture[str]) -> None:
    """--instances N replays N engines behind the router; its report names each one."""
    code, out, _ = run_cli(capsys, "replay", "--limit", "40", "--instances", "3", "--router",
                           "cache-aware", "--gpu-blocks", "512", "--no-progress")
    assert code == 0
    report = last_json(out)
    assert len(report["instances"]) == 3
    assert sum(i["num_requests"] for i in report["instances"]) == 40
    assert 0.0 < report["token_hit_rate"] < 1.0


def test_replay_fleet_refuses_oracle(capsys: pytest.CaptureFixture[str]) -> None:
    """The oracle bounds are per engine: asking for them with a fleet is one clear error."""
    code, out, err = run_cli(capsys, "replay", "--limit", "5", "--instances", "2", "--oracle",
                             "--no-progress")
    assert code == 2 and out == ""
    assert err.strip() == "kvtier: error: --oracle is not supported with --instances > 1"


def test_compare_race_workload_shows_the_race(capsys: pytest.CaptureFixture[str]) -> None:
    """--workload race: probe admission overflows with a host tier, claim admission never."""
    code, out, _ = run_cli(capsys, "compare", "--workload", "race", "--gpu-blocks", "256",
                           "--host-blocks", "512", "--max-num-tokens", "2048", "--no-progress")
    assert code == 0
    runs = {r["label"]: r["report"] for r in last_json(out)["runs"]}
    assert runs["probe GPU+host"]["num_overflow_steps"] == 1
    assert runs["probe GPU+host"]["num_lost_reuse_tokens"] > 0
    for label in ("claim GPU only", "claim GPU+host"):
        assert runs[label]["num_overflow_steps"] == 0
        assert runs[label]["num_lost_reuse_tokens"] == 0
    assert runs["claim GPU+host"]["num_credited_tokens"] > 0


def test_replay_fleet_with_a_shared_remote_tier(capsys: pytest.CaptureFixture[str]) -> None:
    """--remote write-through: the fleet report says what the shared tier served."""
    code, out, _ = run_cli(capsys, "replay", "--limit", "40", "--instances", "2", "--router",
                           "round-robin", "--gpu-blocks", "512", "--host-blocks", "256",
                           "--remote", "write-through", "--no-progress")
    assert code == 0
    remote = last_json(out)["remote"]
    assert remote["policy"] == "write-through" and remote["num_lookups"] == 40
    assert "remote      write-through:" in out
    code, out, err = run_cli(capsys, "replay", "--limit", "5", "--remote", "write-back",
                             "--no-progress")
    assert code == 2
    assert "--remote needs --instances > 1" in err


# ---- bad input: one sentence, exit 2, never a traceback (issue 8, section 5) ---------------


def assert_one_line_error(code: int, out: str, err: str, message: str) -> None:
    """Exit 2, nothing on stdout, one ``kvtier: error:`` line containing ``message``."""
    assert (code, out) == (2, ""), err
    assert err.startswith("kvtier: error: ") and err.count("\n") == 1, err
    assert message in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "--gpu-blocks", str(2**25)],
         "--gpu-blocks/--host-blocks: (33,554,432 GPU + 1,024 host) = "
         "33,555,456 blocks is more than the 33,554,432 one run may hold"),
        (["replay", "--host-blocks", str(2**25)],
         "(1,024 GPU + 33,554,432 host) = 33,555,456 blocks is more than the 33,554,432"),
        (["replay", "--instances", "1024", "--gpu-blocks", "65536"],
         "--gpu-blocks/--host-blocks/--instances: 1,024 instances x (65,536 GPU + 1,024 host) "
         "= 68,157,440 blocks"),
        (["compare", "--gpu-blocks", str(2**24)],
         "(16,777,216 GPU + 67,108,864 host) = 83,886,080 blocks"),
        (["sweep", "--gpu-blocks", "64", "--host-blocks", f"0,{2**25}"],
         "(64 GPU + 33,554,432 host)"),
    ],
)
def test_sizes_are_bounded_before_allocating(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Huge tiers or fleets are refused by size, naming the options, before any pool is
    built (this used to end in MemoryError or the OOM killer)."""
    assert_one_line_error(*run_cli(capsys, *args, "--limit", "3", "--no-progress"), message)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", "Infinity"])
@pytest.mark.parametrize("key", ["pcie_bytes_per_s", "prefill_s_per_token", "kv_bytes_per_token"])
def test_set_profile_refuses_non_finite_values(
    capsys: pytest.CaptureFixture[str], key: str, value: str
) -> None:
    """A non-finite --set-profile value is refused (it used to exit 0 with Infinity in the
    JSON line, or raise OverflowError for an integer field)."""
    assert_one_line_error(
        *run_cli(capsys, "replay", "--limit", "3", "--no-progress", "--set-profile",
                 f"{key}={value}"),
        f"--set-profile {key}: expected a finite number, got {value!r}")


def test_sweep_with_a_single_cache_size(capsys: pytest.CaptureFixture[str]) -> None:
    """sweep with one GPU and one host size runs (it used to raise IndexError)."""
    code, out, _ = run_cli(capsys, "sweep", "--limit", "5", "--no-progress", "--gpu-blocks",
                           "512", "--host-blocks", "0", "--no-oracle")
    assert code == 0
    assert [r["cache_config"]["num_host_blocks"] for r in last_json(out)["runs"]] == [0]


@pytest.mark.parametrize("command", ["replay", "compare", "sweep"])
@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink"])
def test_json_naming_the_input_trace_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str, spelling: str
) -> None:
    """--json pointing at the trace (by any path to it) would overwrite it: refused, and
    the trace is left as it was."""
    path = make_mooncake(tmp_path, SHARED_PREFIX_TRACE)
    before = path.read_bytes()
    target = {"same": path, "dotted": tmp_path / "sub" / ".." / path.name,
              "symlink": tmp_path / "link.jsonl"}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        target.symlink_to(path)
    assert_one_line_error(
        *run_cli(capsys, command, str(path), "--no-progress", "--json", str(target)),
        f"--json {target} is the input trace; choose another file")
    assert path.read_bytes() == before


def test_remote_without_host_tier_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """A fleet's shared tier imports into host tiers: --remote with --host-blocks 0 is one
    sentence (it used to exit 0 with remote hits counted and nothing imported)."""
    for policy in ("write-back", "write-through"):
        assert_one_line_error(
            *run_cli(capsys, "replay", "--limit", "5", "--instances", "2", "--remote", policy,
                     "--host-blocks", "0", "--no-progress"),
            "--remote needs --host-blocks > 0: blocks found in the shared tier are imported "
            "into each instance's host tier")


@pytest.mark.parametrize(("name", "content"), [
    ("empty.jsonl", b""), ("empty.csv", b""), ("blank.jsonl", b"\n\n  \n"),
    ("header.csv", b"TIMESTAMP,ContextTokens,GeneratedTokens\n"),
])
def test_an_empty_trace_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, content: bytes
) -> None:
    """An empty .jsonl and an empty .csv get the same sentence (one exited 0, one 2)."""
    path = tmp_path / name
    path.write_bytes(content)
    assert_one_line_error(*run_cli(capsys, "replay", str(path), "--no-progress"),
                          f"no requests in {path}")


MOONCAKE_OK = '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}\n'


@pytest.mark.parametrize(("name", "content", "message"), [
    ("garbage.jsonl", MOONCAKE_OK.encode() + b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01",
     ":2: field '<text>': not UTF-8 text: not a JSONL trace line"),
    ("garbage.csv", b"\xff\xfe\x00\x01binary", ":1: field '<text>': not UTF-8 text (byte 0)"),
    ("nul.csv", b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1\x00,1\n",
     ":2: field '<text>': contains a NUL byte: not a CSV trace"),
    ("deep.jsonl", (MOONCAKE_OK + "[" * 100_000 + "]" * 100_000 + "\n").encode(),
     ":2: field '<json>': nested too deeply: not a trace record"),
    ("bighash.jsonl", b'{"timestamp": 0, "input_length": 600, "output_length": 5, '
     b'"hash_ids": [1, 36028797018963968]}\n',
     ":1: field 'hash_ids': id 36028797018963968 is too large: token ids h*512.. must stay "
     "below 2**62, where a replay's sampled tokens begin"),
    ("huge.jsonl", b'{"timestamp": 0, "input_length": 10000000000, "output_length": 5, '
     b'"hash_ids": []}\n',
     ":1: field 'input_length': 10000000000 tokens is more than the 16777216"),
    ("huge.csv", b"TIMESTAMP,ContextTokens,GeneratedTokens\n"
     b"2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47,10000000000,1\n",
     ":3: field 'ContextTokens': must be an integer in 1..16777216, got 10000000000"),
    ("quote.csv", b'TIMESTAMP,ContextTokens,GeneratedTokens\n"2023-11-16 18:15:46,1,1\n',
     "malformed trace: "),
])
@pytest.mark.parametrize("instances", ["1", "2"])
def test_malformed_bytes_name_the_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, content: bytes,
    message: str, instances: str
) -> None:
    """Binary garbage, NUL bytes, deep nesting, ids past int64 and absurd lengths are each
    one sentence naming file and line, for one engine and for a fleet."""
    path = tmp_path / name
    path.write_bytes(content)
    assert_one_line_error(
        *run_cli(capsys, "replay", str(path), "--no-progress", "--instances", instances,
                 "--host-blocks", "64"),
        message)


def test_unexpected_exception_is_one_line_exit_70(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect is one line naming the exception and exit 70 for a user; with
    KVTIER_DEBUG=1 (as in these tests) it raises with its traceback."""

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("boom")

    monkeypatch.setattr("kvtier.cli.simulate", broken)
    with pytest.raises(TypeError, match="boom"):
        main(["replay", "--limit", "3", "--no-progress"])
    monkeypatch.delenv("KVTIER_DEBUG")
    code, out, err = run_cli(capsys, "replay", "--limit", "3", "--no-progress")
    assert (code, out) == (70, "")
    assert err == ("kvtier: internal error: TypeError: boom (a defect in kvtier; run with "
                   "KVTIER_DEBUG=1 for the traceback)\n")


def test_overload_is_said_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Arrivals faster than one instance serves: the table says so and where the load fits;
    the JSON says it too. The scale it names is a lower bound (an overloaded step batches
    more work than a light one): below it the load is still too much, well above it fits."""
    records = [{"timestamp": 10 * i, "input_length": 2048, "output_length": 50,
                "hash_ids": [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]} for i in range(40)]
    path = make_mooncake(tmp_path, records)
    code, out, _ = run_cli(capsys, "replay", str(path), "--no-progress")
    assert code == 0
    load = last_json(out)["load"]
    assert load["overloaded"] is True and load["utilization"] > 1
    assert load["sustainable_time_scale"] == pytest.approx(load["utilization"])
    assert load["sustainable_instances"] >= 2
    row = next(r for r in out.splitlines() if r.startswith("load"))
    assert row.startswith("load        OVERLOADED: arrivals bring ")
    assert (f"sustainable from at least --time-scale {load['sustainable_time_scale']:.3g} "
            f"(now 1) or --instances {load['sustainable_instances']}") in row
    for factor, overloaded in ((0.8, True), (10, False)):
        code, out, _ = run_cli(capsys, "replay", str(path), "--no-progress", "--time-scale",
                               str(factor * load["sustainable_time_scale"]))
        assert last_json(out)["load"]["overloaded"] is overloaded


def test_fleet_reports_overload(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A fleet's load line counts every instance's work against the arrival span."""
    records = [{"timestamp": 10 * i, "input_length": 2048, "output_length": 50,
                "hash_ids": [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]} for i in range(40)]
    path = make_mooncake(tmp_path, records)
    code, out, _ = run_cli(capsys, "replay", str(path), "--no-progress", "--instances", "2")
    assert code == 0
    load = last_json(out)["load"]
    assert load["num_instances"] == 2 and load["overloaded"] is True
    assert "load        OVERLOADED: arrivals bring" in out


@pytest.mark.parametrize("args", [
    ["replay", "--workload", "race"],
    ["replay", "--workload", "race", "--gpu-blocks", "200", "--host-blocks", "0"],
    ["sweep", "--workload", "race", "--gpu-blocks", "200", "--host-blocks", "0"],
])
def test_the_race_without_a_host_tier_is_refused(capsys: pytest.CaptureFixture[str],
                                                 args: list[str]) -> None:
    """``--workload race`` onboards host blocks while other requests evict (its help says
    it needs --host-blocks): without a host tier it replayed and reported a hit rate of 0
    without a word. Now it is refused naming --host-blocks; a sweep with one host size
    above 0 still runs its 0 row beside it."""
    assert_one_line_error(*run_cli(capsys, *args, "--no-progress"),
                          "--workload race needs --host-blocks > 0")
    code, out, _ = run_cli(capsys, "sweep", "--workload", "race", "--gpu-blocks", "200",
                           "--host-blocks", "0,50", "--no-progress")
    assert code == 0
    rows = json.loads(out.splitlines()[-1])["runs"]
    assert [r["cache_config"]["num_host_blocks"] for r in rows] == [0, 50]
    assert rows[0]["token_hit_rate"] == 0.0 < rows[1]["token_hit_rate"]
