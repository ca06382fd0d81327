"""Matching a prompt against the tree: where its tokens meet the cached runs. Pure.

::

    tokens   |b0 b0 b0 b0|b1 b1 b1 b1|b2 b2 b2 b2|b3 b3|
    reusable |<----- full blocks ---->|<partial>|       (num_reusable_tokens)

A match walks children by their first block's key, compares a whole run's tokens with one
array comparison (runs and prompts hold ``array('Q')`` ids: a memory comparison), and
gallops then bisects inside a run that matches only in part. Equal tokens with different
multimodal extra keys never match.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import NamedTuple

from kvtier.config import CacheConfig
from kvtier.radix import Node, Root, block_key


class PartialMatch(NamedTuple):
    """``num_tokens`` leading tokens of block ``block_index`` of ``node`` match the request."""

    node: Node
    block_index: int
    num_tokens: int


class Match(NamedTuple):
    """Where a request's tokens meet the tree. Pure data; building it mutates nothing.

    ``path`` holds the nodes matched whole, ``tail`` the last node matched in part with the
    number of its blocks that match, ``partial`` the best partial match of the next block.
    """

    path: list[Node]
    tail: tuple[Node, int] | None
    num_blocks: int
    partial: PartialMatch | None


def _extras_equal(
    node: Node, req_extras: list[object] | None, first_block: int, a: int, b: int
) -> bool:
    """Whether blocks ``a..b`` of ``node`` carry the extra keys of the request's blocks
    ``first_block + a .. first_block + b``."""
    ours = node.extras[a:b] if node.extras is not None else [None] * (b - a)
    if req_extras is None:
        theirs: list[object] = [None] * (b - a)
    else:
        theirs = req_extras[first_block + a : first_block + b]
        theirs += [None] * (b - a - len(theirs))
    return ours == theirs


def num_common_blocks(
    node: Node,
    tokens: Sequence[int],
    pos: int,
    max_blocks: int,
    tokens_per_block: int,
    req_extras: list[object] | None,
) -> int:
    """How many leading blocks of ``node`` equal the request's blocks from token ``pos``
    (at most ``max_blocks``). Pure.

    The caller found ``node`` by its first block, so block 0 is equal. Gallops (1, 2, 4, ...
    blocks) to bracket the first unequal block, then bisects; each comparison covers only
    blocks not yet known equal, so the cost follows the matched length, not the run's.
    """
    ntoks = node.tokens
    tpb = tokens_per_block
    first_block = pos // tpb
    if type(tokens) is not array:
        tokens = array("Q", tokens)  # NOTE: an array equals only an array

    def equal(a: int, b: int) -> bool:
        return ntoks[a * tpb : b * tpb] == tokens[pos + a * tpb : pos + b * tpb] and (
            (node.extras is None and req_extras is None)
            or _extras_equal(node, req_extras, first_block, a, b)
        )

    lo, step = 1, 1  # blocks [0, lo) are equal
    while lo < max_blocks:
        hi = min(max_blocks, lo + step)
        if not equal(lo, hi):
            break
        lo, step = hi, step * 2
    else:
        return max_blocks
    while hi - lo > 1:  # blocks [lo, hi) hold the first unequal one
        mid = (lo + hi) // 2
        if equal(lo, mid):
            lo = mid
        else:
            hi = mid
    return lo


def match(
    root: Root,
    tokens: Sequence[int],
    num_reusable_tokens: int,
    tokens_per_block: int,
    req_extras: list[object] | None,
    find_partial: bool,
) -> Match:
    """Match ``tokens[:num_reusable_tokens]`` against the tree under ``root``. Pure query.

    ::

        tokens   |b0 b0 b0 b0|b1 b1 b1 b1|b2 b2 b2 b2|b3 b3|
        reusable |<----- full blocks ---->|<partial>|       (num_reusable_tokens)
    """
    if type(tokens) is not array:
        tokens = array("Q", tokens)  # NOTE: an array equals only an array
    return _walk(root, [], 0, tokens, num_reusable_tokens, tokens_per_block, req_extras,
                 find_partial)


def rematch(known: Match, num_blocks_then: Sequence[int], root: Root, tokens: array[int],
            num_reusable_tokens: int, tokens_per_block: int, find_partial: bool
            ) -> Match | None:
    """``match`` of ``tokens`` (no extra keys) under ``root`` again, from ``known``, its
    match on an earlier state of the tree, whose runs then held ``num_blocks_then`` blocks
    (the path's, then the tail's). None where one of those runs moved since (split,
    rejoined, cut, grown or dropped: its parent or its block count changed): match afresh.
    Pure.

    A run that kept its parent and its block count kept its key and its token ids (every
    tree surgery that changes a run's ids changes one or the other), so a walk would meet
    the same runs and compare the same ids: the path and the tail stand, only what lies
    past a path that ended at a run's end may have grown (a new child), and the partial
    match is found again. The runs are checked, not compared: no token is read.
    """
    path, tail = known.path, known.tail
    parent: Node = root
    for node, n in zip(path, num_blocks_then, strict=False):
        if node.parent is not parent or len(node.slots) != n:
            return None
        parent = node
    tpb = tokens_per_block
    if tail is not None:
        if tail[0].parent is not parent or len(tail[0].slots) != num_blocks_then[-1]:
            return None
        pos = known.num_blocks * tpb
        partial = None
        if find_partial and pos < num_reusable_tokens:
            partial = _find_partial(parent, tail, tokens, pos, num_reusable_tokens, tpb, None)
        return Match(path, tail, known.num_blocks, partial)
    return _walk(parent, list(path), known.num_blocks * tpb, tokens, num_reusable_tokens, tpb,
                 None, find_partial)


def _walk(node: Node, path: list[Node], pos: int, tokens: array[int], num_reusable_tokens: int,
          tokens_per_block: int, req_extras: list[object] | None, find_partial: bool) -> Match:
    """``match`` from ``node``, the end of ``path``, which matches ``tokens[:pos]``."""
    tpb = tokens_per_block
    limit = num_reusable_tokens // tpb * tpb
    tail: tuple[Node, int] | None = None
    while pos < limit:
        b = pos // tpb
        child = node.children.get(
            block_key(tokens, pos, tpb, req_extras[b] if req_extras is not None else None))
        if child is None:
            break
        ntoks = child.tokens
        end = pos + len(ntoks)
        if end <= limit and ntoks == tokens[pos:end] and (
            (child.extras is None and req_extras is None)
            or _extras_equal(child, req_extras, b, 0, child.num_blocks)
        ):
            num_blocks = child.num_blocks
        else:
            num_blocks = num_common_blocks(
                child, tokens, pos, min(len(ntoks), limit - pos) // tpb, tpb, req_extras)
        pos += num_blocks * tpb
        if num_blocks == child.num_blocks:
            path.append(child)
            node = child
        else:
            tail = (child, num_blocks)
            break
    partial = None
    if find_partial and pos < num_reusable_tokens:
        partial = _find_partial(node, tail, tokens, pos, num_reusable_tokens, tpb, req_extras)
    return Match(path, tail, pos // tpb, partial)


def _find_partial(
    node: Node,
    tail: tuple[Node, int] | None,
    tokens: Sequence[int],
    pos: int,
    num_reusable_tokens: int,
    tpb: int,
    req_extras: list[object] | None,
) -> PartialMatch | None:
    want = tokens[pos : min(pos + tpb, num_reusable_tokens)]
    if tail is not None:
        candidates = [(tail[0], tail[1])]
    else:
        candidates = [(c, 0) for c in node.by_first.get(want[0], ())]
    best: PartialMatch | None = None
    for cand, index in candidates:
        start = index * tpb
        have = cand.tokens[start : start + len(want)]
        if not _extras_equal_one(cand, index, req_extras, pos // tpb):
            continue
        n = num_common_tokens(have, want)
        if n and (best is None or n > best.num_tokens):
            best = PartialMatch(cand, index, n)
    return best


def num_common_tokens(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first tokens ``a`` and ``b`` share (either may be the shorter: a partial
    block). Pure."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _extras_equal_one(
    node: Node, index: int, req_extras: list[object] | None, block: int
) -> bool:
    ours = node.extras[index] if node.extras is not None else None
    theirs = req_extras[block] if req_extras is not None and block < len(req_extras) else None
    return ours == theirs


NO_MATCH = Match([], None, 0, None)


def match_prompt(root: Root | None, tokens: Sequence[int], extras: list[object] | None,
                 config: CacheConfig) -> Match:
    """Where a prompt meets the tree under ``root`` (its key space, if it exists), as the
    config's reuse switches allow: only its first ``len - 1`` tokens are reusable (the
    last one must be computed for the logits). Pure."""
    if root is None or not config.enable_block_reuse:
        return NO_MATCH
    return match(root, tokens, len(tokens) - 1, config.tokens_per_block, extras,
                 config.enable_partial_reuse)
