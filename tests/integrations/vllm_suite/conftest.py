"""The vLLM suite runs in .venv-vllm (``tests/integrations/test_vllm_suite.py`` starts it):
real redis servers, as the remote-tier tests get them, and vLLM's logs kept quiet."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "remote"))
sys.path.insert(0, str(ROOT / "tests"))  # the harness: integrations.vllm_suite.engine_harness

from remote_helpers import RedisServers, shared_redis_servers  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def redis_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServers]:
    """The shared standalone server (with a password) and three-node cluster: from CI's
    environment, else started for the session with .ci/redis.sh."""
    yield from shared_redis_servers(tmp_path_factory.mktemp("redis"))
