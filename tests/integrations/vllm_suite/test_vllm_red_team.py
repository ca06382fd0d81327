"""Red-team inputs to the vLLM policy adapter (second pass): a request's kv_transfer_params
that are bad are logged and ignored (docs/vllm.md), never raised into vLLM's step."""

from __future__ import annotations

import logging

import pytest
from vllm.v1.kv_offload.base import ReqContext

from kvtier.integrations.vllm.policy import request_retention


@pytest.mark.parametrize(("params", "logged"), [
    # float() of an int past the float range raised OverflowError into vLLM's step.
    ({"kvtier_retention_s": 10**400}, "kvtier_retention_s must be a finite number of seconds "
                                      "> 0, got an int of 1329 bits; ignored"),
    # kv_transfer_params that are no mapping (an offline caller's extra_args) raised
    # AttributeError ('list' object has no attribute 'get').
    (["kvtier_priority", 90], "kv_transfer_params must be a mapping, got list; ignored"),
    ("kvtier_priority=90", "kv_transfer_params must be a mapping, got str; ignored"),
])
def test_bad_kv_transfer_params_are_logged_and_ignored(
        params: object, logged: str, caplog: pytest.LogCaptureFixture) -> None:
    """The request keeps the default priority and no retention; one warning names it."""
    ctx = ReqContext(req_id="r", kv_transfer_params=params)
    with caplog.at_level(logging.WARNING, logger="kvtier.integrations.vllm.policy"):
        assert request_retention(ctx) == (None, None)
    assert [r.getMessage() for r in caplog.records] == [f"request r: {logged}"]


def test_the_largest_float_retention_is_kept() -> None:
    """The bound is the largest float, not inf: a finite retention is still taken."""
    ctx = ReqContext(req_id="r", kv_transfer_params={"kvtier_retention_s": 1e308,
                                                     "kvtier_priority": 90})
    assert request_retention(ctx) == (90, 1e308)
