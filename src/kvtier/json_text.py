"""JSON read from outside kvtier (trace lines, prompt files, checkpoint configs, wire
snapshots): ``loads`` refuses an object that gives one key twice.

NOTE: ``json.loads`` keeps the last of two values of one key, without a word: a trace line
with ``hash_ids`` twice replayed the second list, a config with ``num_hidden_layers`` twice
built the model of the last one.
"""

from __future__ import annotations

import json
from typing import Any

from kvtier.reprs import shown


class DuplicateKeyError(ValueError):
    """A JSON object gives ``key`` twice."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the key {shown(key):.60} is given twice in one object")
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return obj


def loads(text: str | bytes | bytearray) -> Any:
    """``json.loads(text)``; DuplicateKeyError (a ValueError) for an object with a key
    twice, what ``json.loads`` raises otherwise. Pure."""
    return json.loads(text, object_pairs_hook=_unique)
