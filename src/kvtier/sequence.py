"""What a caller asks the manager to admit: :class:`SequenceSpec` and its validation."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from kvtier.config import check_priority
from kvtier.radix import Node, Root


@dataclass(frozen=True, slots=True)
class MultimodalItem:
    """A multimodal input occupying ``tokens[offset : offset + length]``.

    ``content_hash`` identifies the content (e.g. an image digest). It becomes part of the key
    of every block the item overlaps, so equal placeholder tokens with different images never
    share a block.
    """

    offset: int
    length: int
    content_hash: bytes | str | int

    def __post_init__(self) -> None:
        if type(self.offset) is not int or self.offset < 0:
            raise ValueError(f"MultimodalItem.offset must be an int >= 0, got {self.offset!r}")
        if type(self.length) is not int or self.length < 1:
            raise ValueError(f"MultimodalItem.length must be an int >= 1, got {self.length!r}")
        if not isinstance(self.content_hash, (bytes, str, int)):
            raise ValueError(
                f"MultimodalItem.content_hash must be bytes, str or int, got {self.content_hash!r}"
            )


@dataclass(frozen=True, slots=True)
class SequenceSpec:
    """One request to admit.

    ``tokens`` is the prompt. ``salt`` isolates tenants (mixed into the first block's key),
    ``lora_id`` selects an adapter (part of every block's key). ``priority`` (0..100, lower is
    evicted first; ``None`` means the config's default) applies to the request's blocks once
    released, for ``retention_s`` seconds if given, after which they fall back to the default.
    ``num_new_tokens`` is how many prompt tokens past the reused prefix this step computes
    (a prefill chunk); ``None`` means the whole prompt. Only computed or scheduled blocks are
    ever stored for reuse. ``num_reserved_blocks`` GPU blocks are set aside for the request's
    later growth (``append_tokens`` draws on them first), so a scheduler can guarantee that
    decoding never runs out of blocks.
    """

    request_id: str
    tokens: list[int]
    salt: bytes | str | int | None = None
    lora_id: int | None = None
    priority: int | None = None
    retention_s: float | None = None
    mm_items: tuple[MultimodalItem, ...] = field(default=())
    num_new_tokens: int | None = None
    num_reserved_blocks: int = 0

    def __post_init__(self) -> None:
        if type(self.request_id) is not str or not self.request_id:
            raise ValueError(f"request_id must be a non-empty str, got {self.request_id!r}")
        tokens = self.tokens
        if type(tokens) is not list:
            if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__len__"):
                raise ValueError(
                    f"tokens of {self.request_id!r} must be a list of ints, got {type(tokens)}"
                )
            tokens = list(tokens)
            object.__setattr__(self, "tokens", tokens)
        check_tokens(tokens, f"tokens of {self.request_id!r}")
        if self.salt is not None and not isinstance(self.salt, (bytes, str, int)):
            raise ValueError(f"salt must be bytes, str, int or None, got {self.salt!r}")
        if self.lora_id is not None and type(self.lora_id) is not int:
            raise ValueError(f"lora_id must be an int or None, got {self.lora_id!r}")
        if self.priority is not None:
            check_priority("priority", self.priority)
        if self.retention_s is not None and (
            not isinstance(self.retention_s, (int, float)) or not self.retention_s >= 0
        ):
            raise ValueError(f"retention_s must be a number >= 0 or None, got {self.retention_s!r}")
        if type(self.mm_items) is not tuple:
            object.__setattr__(self, "mm_items", tuple(self.mm_items))
        for item in self.mm_items:
            if not isinstance(item, MultimodalItem):
                raise ValueError(f"mm_items must hold MultimodalItem, got {item!r}")
            if item.offset + item.length > len(tokens):
                raise ValueError(
                    f"MultimodalItem at offset {item.offset} with length {item.length} runs past "
                    f"the {len(tokens)} tokens of {self.request_id!r}"
                )
        _check_schedule(self.num_new_tokens, self.num_reserved_blocks)

    def with_schedule(self, num_new_tokens: int | None, num_reserved_blocks: int) -> SequenceSpec:
        """A copy with other scheduling fields. Only those are checked: the rest was
        validated when this spec was built (a scheduler re-admits the same prompt often)."""
        _check_schedule(num_new_tokens, num_reserved_blocks)
        spec = object.__new__(SequenceSpec)
        for f in fields(self):
            name = f.name
            object.__setattr__(spec, name, getattr(self, name))
        object.__setattr__(spec, "num_new_tokens", num_new_tokens)
        object.__setattr__(spec, "num_reserved_blocks", num_reserved_blocks)
        return spec


def _check_schedule(num_new_tokens: int | None, num_reserved_blocks: int) -> None:
    n = num_new_tokens
    if n is not None and (type(n) is not int or n < 1):
        raise ValueError(f"num_new_tokens must be an int >= 1 or None, got {n!r}")
    r = num_reserved_blocks
    if type(r) is not int or r < 0:
        raise ValueError(f"num_reserved_blocks must be an int >= 0, got {r!r}")


def check_tokens(tokens: list[int], what: str) -> None:
    """Raise ValueError unless ``tokens`` is a non-empty list of ints.

    NOTE: the fast path is one C-level ``sum`` (about 4 ns a token); only a list that fails it
    is scanned in Python to name the offending index and value.
    """
    if not tokens:
        raise ValueError(f"{what} must not be empty")
    try:
        total = sum(tokens)
    except TypeError:
        total = None
    if type(total) is int:
        return
    for index, token in enumerate(tokens):
        if not isinstance(token, int):
            raise ValueError(
                f"{what}: token at index {index} must be an int, got {token!r} ({type(token)})"
            )


class LiveSequence:
    """A live request: its claimed path (``last_node`` and up) and its private blocks."""

    __slots__ = (
        "block_table",
        "can_store",
        "extras",
        "last_node",
        "num_reserved",
        "num_scheduled_tokens",
        "num_valid_tokens",
        "owns_tokens",
        "priority",
        "request_id",
        "retention_s",
        "root",
        "tokens",
    )

    def __init__(self, spec: SequenceSpec, root: Root, extras: list[object] | None,
                 priority: int) -> None:
        self.request_id = spec.request_id
        self.tokens = spec.tokens
        self.owns_tokens = False
        self.root = root
        self.extras = extras
        self.priority = priority
        self.retention_s = spec.retention_s
        self.num_reserved = 0
        self.last_node: Node = root
        self.block_table: list[int] = []
        self.num_scheduled_tokens = 0
        # Tokens whose KV exists by the time this step's copies run: those scheduled before
        # the latest call (before the current step, inside begin_step/end_step).
        self.num_valid_tokens = 0
        self.can_store = True

    @property
    def num_path_blocks(self) -> int:
        node = self.last_node
        return node.start_block + len(node.slots)
