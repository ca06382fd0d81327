"""Red team 32b: the vLLM tier's ``tenant`` option refuses an empty namespace part."""

from __future__ import annotations

import pytest

from kvtier.integrations.vllm.keys import EngineLayout


def make_layout() -> EngineLayout:
    return EngineLayout(model="m", kv_dtype="float16", page_bytes=4096, tokens_per_hash=16,
                        blocks_per_chunk=1, groups=((16, 2),), tp_size=1, pp_size=1,
                        pcp_size=1, dcp_size=1, rank=0)


def test_an_empty_tenant_is_refused_naming_the_option() -> None:
    """``tenant: ""`` (a template's unset variable) was a namespace of its own, apart from
    the engine's unscoped one, without a word; KvtierRedisTier builds its namespace here,
    before it connects."""
    with pytest.raises(ValueError, match=r"^tenant must be a non-empty str \(or None for no "
                                         r"tenant\), got ''$"):
        make_layout().namespace("")


def test_a_tenant_or_none_still_scopes_the_namespace() -> None:
    """None is the unscoped namespace; each non-empty tenant its own."""
    layout = make_layout()
    fingerprints = {layout.namespace(t).fingerprint for t in (None, "a", "b", " ")}
    assert len(fingerprints) == 4
