"""The vLLM suite runs in .venv-vllm (``tests/integrations/test_vllm_suite.py`` starts it):
real redis servers, as the remote-tier tests get them, and vLLM's logs kept quiet."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "remote"))
sys.path.insert(0, str(ROOT / "tests"))  # the harness: integrations.vllm_suite.engine_harness

from remote_helpers import RedisServers  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def redis_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServers]:
    """The shared standalone server (with a password) and three-node cluster: from CI's
    environment, else started for the session with .ci/redis.sh."""
    url = os.environ.get("KVTIER_REDIS_URL")
    cluster_url = os.environ.get("KVTIER_REDIS_CLUSTER_URL")
    if url and cluster_url:
        yield RedisServers(url, cluster_url)
        return
    env = {**os.environ, "KVTIER_REDIS_DIR": str(tmp_path_factory.mktemp("redis"))}
    script = str(ROOT / ".ci" / "redis.sh")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True,
                             timeout=600, check=False)
    if started.returncode != 0:
        pytest.skip("redis-server is missing and .ci/redis.sh could not start it: "
                    + started.stderr.strip()[-400:])
    urls = dict(line.split("=", 1) for line in started.stdout.split() if "=" in line)
    yield RedisServers(urls["KVTIER_REDIS_URL"], urls["KVTIER_REDIS_CLUSTER_URL"])
    if "already running" not in started.stderr:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=60, check=False)
