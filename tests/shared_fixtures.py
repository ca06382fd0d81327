"""Fixtures shared by test files in several folders, as a pytest plugin: a file that uses
them names it (``pytest_plugins = ["shared_fixtures"]``) and asks for a fixture by argument
or with ``pytestmark = pytest.mark.usefixtures(...)``. None is autouse.

NOTE: a plugin, not imported from one test file into another (a fixture imported and then
named as a test's argument is a redefinition to ruff, F811: each file kept its own copy),
and not a ``tests/conftest.py`` (mypy names it ``conftest``, as it names
``tests/remote/conftest.py`` under its ``mypy_path``: a duplicate module).
"""

from __future__ import annotations

import pytest

from fake_stream_redis import FakeRedis
from kvtier import stream_client


@pytest.fixture
def debug_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """A defect (an unexpected exception) raises with its traceback instead of exit 70."""
    monkeypatch.setenv("KVTIER_DEBUG", "1")


@pytest.fixture
def fake_redis(monkeypatch: pytest.MonkeyPatch) -> FakeRedis:
    """The event stream's commands in memory, in place of every Redis client made."""
    pytest.importorskip("redis")  # the publisher catches its errors
    client = FakeRedis()
    monkeypatch.setattr(stream_client, "connect", lambda url, **_: client)
    return client
