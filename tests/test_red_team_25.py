"""Red team 25a: the core, the scheduler and its config: each refusal names the problem and
changes nothing, and every count reported is what happened."""

from __future__ import annotations

import re

import pytest

from kvtier import SchedulerConfig


@pytest.mark.parametrize("cap", [1, 256])
def test_a_chunk_cap_without_chunked_prefill_is_refused_naming_both(cap: int) -> None:
    """max_chunk_tokens with chunked prefill off capped nothing (chunks of the whole budget
    ran under a config saying chunks <= cap): refused, as the CLI refuses the pair."""
    with pytest.raises(ValueError, match=re.escape(
            f"max_chunk_tokens={cap} caps a prefill chunk, and enable_chunked_prefill=False")):
        SchedulerConfig(enable_chunked_prefill=False, max_chunk_tokens=cap)
    assert SchedulerConfig(enable_chunked_prefill=False).max_chunk_tokens is None
    assert SchedulerConfig(max_chunk_tokens=cap).max_chunk_tokens == cap
