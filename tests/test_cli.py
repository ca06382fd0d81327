"""Tests of the ``kvtier`` command and the manager-level replay it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import kvtier
from kvtier import CacheConfig
from kvtier.cli import main
from kvtier.replay import replay_manager
from kvtier.sim import SyntheticChat

REPORT_KEYS = {
    "workload", "config", "in_flight", "num_requests", "num_prompt_tokens", "num_reused_tokens",
    "token_hit_rate", "num_admitted_blocks", "num_early_releases", "gpu", "host", "transfers",
    "wall_s", "manager_s", "manager_us_per_block",
}
TIER_KEYS = {
    "reused_blocks", "missed_blocks", "onboarded_blocks", "offloaded_blocks", "evicted_blocks",
    "hit_rate",
}

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


def test_help_names_replay_and_its_scope(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists replay; replay --help says the replay is manager-level, no time model."""
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "replay" in out
    code, out, _ = run_cli(capsys, "replay", "--help")
    assert code == 0
    assert "manager-level replay" in out and "time model" in out and "--in-flight" in out


def test_replay_default_workload(capsys: pytest.CaptureFixture[str]) -> None:
    """The built-in synthetic workload replays: a table, then one JSON report line last."""
    code, out, err = run_cli(capsys, "replay", "--limit", "50", "--no-progress")
    assert (code, err) == (0, "")
    report = last_json(out)
    assert set(report) == REPORT_KEYS
    assert report["num_requests"] == 50
    assert isinstance(report["token_hit_rate"], float) and 0 < report["token_hit_rate"] < 1
    assert set(report["gpu"]) == set(report["host"]) == TIER_KEYS
    assert report["workload"] == SyntheticChat(num_requests=50).describe()
    table = out.splitlines()[:-1]
    assert [row.split()[0] for row in table] == [
        "workload", "cache", "policy", "requests", "prompt", "hit", "blocks", "transfers",
        "manager",
    ]


def test_replay_default_workload_follows_seed(capsys: pytest.CaptureFixture[str]) -> None:
    """The same seed gives the same reuse; another seed gives other prompts."""
    runs = [last_json(run_cli(capsys, "replay", "--limit", "30", "--no-progress",
                              "--seed", seed)[1]) for seed in ("0", "0", "1")]
    assert runs[0]["num_reused_tokens"] == runs[1]["num_reused_tokens"]
    assert runs[0]["num_prompt_tokens"] != runs[2]["num_prompt_tokens"]


@pytest.mark.parametrize(
    ("flags", "num_reused", "num_copies"),
    [([], 512 + 299, 1), (["--no-partial-reuse"], 512 + 288, 0)],
)
def test_replay_mooncake_exact_reuse(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], num_reused: int,
    num_copies: int,
) -> None:
    """A shared 512-token hash id is reused exactly; partial reuse adds 11 copied tokens."""
    path = make_mooncake(tmp_path, SHARED_PREFIX_TRACE)
    code, out, _ = run_cli(capsys, "replay", str(path), "--no-progress", *flags)
    assert code == 0
    report = last_json(out)
    assert report["num_requests"] == 3
    assert report["num_prompt_tokens"] == 1500
    assert report["num_reused_tokens"] == num_reused
    assert report["token_hit_rate"] == num_reused / 1500
    assert report["transfers"] == {  # the one copy is r2's 11 tokens of block 9
        "offload": {"num_ops": 0, "num_tokens": 0},
        "onboard": {"num_ops": 0, "num_tokens": 0},
        "copy": {"num_ops": num_copies, "num_tokens": 11 * num_copies},
    }
    assert report["num_admitted_blocks"] == 19 + 19 + 10


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


def test_json_file_equals_stdout_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--json FILE holds the same report as the JSON line on stdout."""
    target = tmp_path / "report.json"
    code, out, _ = run_cli(capsys, "replay", "--limit", "20", "--no-progress", "--host-blocks",
                           "64", "--json", str(target))
    assert code == 0
    assert json.loads(target.read_text(encoding="utf-8")) == last_json(out)
    assert last_json(out)["config"]["num_host_blocks"] == 64


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


def test_replay_manager_library(capsys: pytest.CaptureFixture[str]) -> None:
    """replay_manager never prints, reports progress per request, and releases early on need."""
    calls: list[int] = []
    workload = SyntheticChat(num_requests=40)
    # Prompts reach 8,000 tokens (250 blocks), so 300 blocks cannot hold 16 live requests.
    report = replay_manager(workload, CacheConfig(num_gpu_blocks=300, num_host_blocks=600),
                            in_flight=16, progress=calls.append)
    assert capsys.readouterr() == ("", "")
    assert calls == [1] * 40
    assert report.num_requests == 40 and report.num_early_releases > 0
    assert report.host["onboarded_blocks"] == report.transfers["onboard"]["num_ops"] > 0
    assert report.to_dict()["manager_us_per_block"] == report.manager_us_per_block


def test_replay_manager_rejects_bad_in_flight() -> None:
    """in_flight must be a positive integer; the message names it."""
    with pytest.raises(ValueError, match="in_flight must be an integer >= 1, got 0"):
        replay_manager(SyntheticChat(num_requests=1), CacheConfig(), in_flight=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens-per-block", "3"],
         "invalid configuration: tokens_per_block must be a power of two >= 1, got 3"),
        (["--offload-min-priority", "200"],
         "invalid configuration: offload_min_priority must be an integer in 0..100, got 200"),
        (["--gpu-blocks", "0"], "invalid configuration: num_gpu_blocks must be an integer >= 1"),
        (["--gpu-blocks", "4"],
         "cannot replay: request 'synthetic-chat-0' needs 57 blocks (1802 tokens / 32) but "
         "num_gpu_blocks is 4"),
        (["no-such-trace.jsonl"],
         "cannot read trace no-such-trace.jsonl: No such file or directory"),
        (["trace.txt"],
         "TRACE must be a .jsonl (Mooncake) or .csv (Azure) file, got 'trace.txt'"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """Impossible settings and unreadable traces end in one error line and status 2."""
    code, out, err = run_cli(capsys, "replay", "--no-progress", "--limit", "3", *args)
    assert (code, out) == (2, "")
    assert err.startswith(f"kvtier: error: {message}") and err.count("\n") == 1


def test_malformed_trace_names_file_line_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A bad trace line is reported as file:line: field, with status 2 and no traceback."""
    bad = dict(SHARED_PREFIX_TRACE[1], input_length="600")
    path = make_mooncake(tmp_path, [SHARED_PREFIX_TRACE[0], bad])
    code, out, err = run_cli(capsys, "replay", str(path))
    assert (code, out) == (2, "")
    assert err == (f"kvtier: error: malformed trace: {path}:2: field 'input_length': "
                   "expected an integer, got '600'\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "--bogus"], "unrecognized arguments: --bogus"),
        (["replay", "--in-flight", "0"], "argument --in-flight: must be an integer >= 1, got 0"),
        (["replay", "--limit", "x"], "argument --limit: expected an integer, got 'x'"),
        (["replay", "--hash-algo", "md5"], "argument --hash-algo: invalid choice: 'md5'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """argparse's own errors (unknown option, bad value, no command) exit 2 with usage."""
    code, out, err = run_cli(capsys, *args)
    assert (code, out) == (2, "")
    assert message in err and "Traceback" not in err
