"""Offline references for a prefix cache of a given size: unlimited, Belady and LRU.

All three see requests at block granularity. A request is a tuple of block keys, where a
key names the block *together with its whole prefix* (a chained hash, or a Mooncake hash
id), so a block is reusable only behind the same prefix. Requests are served one at a time:

1. hit = the longest prefix of the request's keys that is cached; it counts
   ``min(k * tokens_per_block + partial, num_tokens)`` tokens, ``partial`` the request's
   ``partial_tokens[k]`` (0 where it gives none): with partial reuse, the head of the
   first block missed that matches an earlier request's block behind the same prefix
   (that block taken as still cached: the references stay bounds of the cache's partial
   reuse);
2. every block of the request is then cached, evicting other blocks as needed; a block of
   the current request is never evicted. A request longer than the cache keeps only its
   first ``num_blocks`` blocks (the rest could only push out its own prefix).

Belady evicts the block whose next use is farthest away (never-again first), deeper blocks
first among ties. A block's next use is never later than its descendants', so this keeps the
cache prefix-closed and is optimal (it is MIN on the flattened block sequence). LRU evicts
the least recently used block; within a request, deeper blocks count as older, so children
go before their parents.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Collection, Hashable, Iterable, Iterator, Sequence
from typing import NamedTuple

from kvtier.matching import num_common_tokens
from kvtier.reprs import shown
from kvtier.sequence import short_repr
from kvtier.sim.report import OracleBounds
from kvtier.sim.workload import TraceRequest, Workload


class OracleRequest(NamedTuple):
    """One request as the oracles see it: prefix-naming block keys, the prompt length and,
    with partial reuse, per block (the partial tail's last) how many of its first tokens
    match an earlier request's block behind the same prefix (empty: none)."""

    block_keys: tuple[Hashable, ...]
    num_tokens: int
    partial_tokens: tuple[int, ...] = ()


class OracleResult(NamedTuple):
    """Hits of one oracle run over a request sequence."""

    num_hit_tokens: int
    num_tokens: int
    num_hit_blocks: int
    num_requests: int

    @property
    def hit_rate(self) -> float:
        """Fraction of prompt tokens served from the cache (0.0 for an empty run)."""
        return self.num_hit_tokens / self.num_tokens if self.num_tokens else 0.0


def prefix_block_keys(prompt: Sequence[int], tokens_per_block: int) -> tuple[bytes, ...]:
    """Chained 128-bit BLAKE2b keys of the prompt's full blocks (a partial tail has no key).

    ``key[j] = blake2b(key[j-1] || tokens of block j)``; equal keys mean equal prefixes (up
    to a 2**-128 collision chance).
    """
    if type(tokens_per_block) is not int or tokens_per_block < 1:
        raise ValueError(f"tokens_per_block must be an integer >= 1, got {shown(tokens_per_block)}")
    keys: list[bytes] = []
    parent = b""
    for start in range(0, len(prompt) - tokens_per_block + 1, tokens_per_block):
        block = array("q", prompt[start : start + tokens_per_block]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return tuple(keys)


def oracle_requests(
    workload: Iterable[TraceRequest], tokens_per_block: int, partial_reuse: bool = False
) -> Iterator[OracleRequest]:
    """The oracle view of a workload's requests (full blocks keyed by :func:`prefix_block_keys`);
    with ``partial_reuse`` also each block's ``partial_tokens``: the longest head of it that
    an earlier request's block behind the same prefix (full or its partial tail) shares."""
    # Per parent key (b"" for a first block), the token tuples of the blocks walked behind
    # it, full or a partial tail, sorted: the longest head a block shares with any of them
    # is shared with one of its two neighbours in that order.
    # NOTE: a trie of every token walked (one dict entry a token) took 310 MB for the
    # README's 7.4 M prompt tokens; a tuple a distinct block takes a tenth of that.
    children: dict[Hashable, list[tuple[int, ...]]] = {}
    seen: set[bytes] = set()  # keys of the full blocks walked: in ``children`` already
    for request in workload:
        prompt = request.prompt
        keys = prefix_block_keys(prompt, tokens_per_block)
        if not partial_reuse:
            yield OracleRequest(keys, len(prompt))
            continue
        partial = []
        for j, start in enumerate(range(0, len(prompt), tokens_per_block)):
            if j < len(keys) and keys[j] in seen:  # the whole block seen before
                partial.append(tokens_per_block)
                continue
            if j < len(keys):
                seen.add(keys[j])
            parent: Hashable = keys[j - 1] if j else b""
            walked = children.get(parent)
            if walked is None:
                walked = children[parent] = []
            block = tuple(prompt[start:start + tokens_per_block])
            at = bisect.bisect_left(walked, block)
            partial.append(max((num_common_tokens(block, other)
                                for other in walked[max(0, at - 1):at + 1]), default=0))
            if at == len(walked) or walked[at] != block:
                walked.insert(at, block)
        yield OracleRequest(keys, len(prompt), tuple(partial))


def _check_request(request: OracleRequest, tokens_per_block: int) -> None:
    # NOTE: a plain tuple or any other object was an AttributeError from the loop, a
    # num_tokens of 16.5 came back as the result's num_tokens.
    if not isinstance(request, OracleRequest):
        raise ValueError(f"a request of the oracles must be an OracleRequest, got "
                         f"{short_repr(request)}")
    if not isinstance(request.block_keys, tuple | list):
        raise ValueError(f"block_keys must be a tuple or list of keys, got "
                         f"{short_repr(request.block_keys)}")
    if type(request.num_tokens) is not int or request.num_tokens < 0:
        raise ValueError(f"num_tokens must be an integer >= 0, got "
                         f"{short_repr(request.num_tokens)}")
    num_keys = len(request.block_keys)
    if num_keys * tokens_per_block >= request.num_tokens + tokens_per_block:
        raise ValueError(
            f"block_keys has {num_keys} keys, more than ceil({request.num_tokens}"
            f"/{tokens_per_block}) blocks of num_tokens"
        )
    if len(set(request.block_keys)) != num_keys:
        raise ValueError("block_keys must be distinct within a request (keys name prefixes)")
    partial = request.partial_tokens
    if not isinstance(partial, tuple) or len(partial) > num_keys + 1 or any(
            type(n) is not int or not 0 <= n <= tokens_per_block for n in partial):
        raise ValueError(f"partial_tokens must be a tuple of at most {num_keys + 1} token "
                         f"counts in 0..{tokens_per_block}, got {short_repr(partial)}")


def _check_args(num_blocks: int | None, tokens_per_block: int) -> None:
    if num_blocks is not None and (type(num_blocks) is not int or num_blocks < 1):
        raise ValueError(f"num_blocks must be an integer >= 1, got {shown(num_blocks)}")
    if type(tokens_per_block) is not int or tokens_per_block < 1:
        raise ValueError(f"tokens_per_block must be an integer >= 1, got {shown(tokens_per_block)}")


def _hit_tokens(request: OracleRequest, k: int, tokens_per_block: int) -> int:
    """Tokens a hit of ``k`` whole blocks counts: those, and the head of the next block an
    earlier request's block shares (a partial match: less than a block). Pure."""
    partial = request.partial_tokens
    head = min(partial[k], tokens_per_block - 1) if k < len(partial) else 0
    return min(k * tokens_per_block + head, request.num_tokens)


def _hit_blocks(keys: Sequence[Hashable], cached: dict[Hashable, int] | set[Hashable]) -> int:
    k = 0
    for key in keys:
        if key not in cached:
            break
        k += 1
    return k


def unlimited_hit_tokens(
    requests: Iterable[OracleRequest], tokens_per_block: int
) -> OracleResult:
    """Hits with a cache that never evicts (an upper bound for any capacity)."""
    _check_args(None, tokens_per_block)
    seen: set[Hashable] = set()
    num_hit_tokens = num_tokens = num_hit_blocks = num_requests = 0
    for request in requests:
        _check_request(request, tokens_per_block)
        k = _hit_blocks(request.block_keys, seen)
        num_hit_blocks += k
        num_hit_tokens += _hit_tokens(request, k, tokens_per_block)
        num_tokens += request.num_tokens
        num_requests += 1
        seen.update(request.block_keys)
    return OracleResult(num_hit_tokens, num_tokens, num_hit_blocks, num_requests)


def belady_hit_tokens(
    requests: Iterable[OracleRequest], num_blocks: int, tokens_per_block: int
) -> OracleResult:
    """Hits of the optimal (Belady/MIN) single-tier prefix cache of ``num_blocks`` blocks.

    Next uses are precomputed in one backward pass; the eviction heap holds
    ``(-next_use, -depth, seq, key)`` and drops stale entries lazily, so a run costs
    O(B log B) for B block occurrences.
    """
    _check_args(num_blocks, tokens_per_block)
    reqs = list(requests)
    for request in reqs:
        _check_request(request, tokens_per_block)
    never = len(reqs)
    all_keys = [r.block_keys[:num_blocks] for r in reqs]
    next_uses: list[list[int]] = [[] for _ in reqs]
    last_use: dict[Hashable, int] = {}
    for i in range(len(reqs) - 1, -1, -1):
        next_uses[i] = [last_use.get(key, never) for key in all_keys[i]]
        for key in all_keys[i]:
            last_use[key] = i

    # key -> its next use; a block of the current request holds the current index, which
    # is smaller than any other block's, so it is never the farthest.
    cached: dict[Hashable, int] = {}
    heap: list[tuple[int, int, int, Hashable]] = []
    seq = 0
    num_hit_tokens = num_tokens = num_hit_blocks = 0
    for i, (request, keys) in enumerate(zip(reqs, all_keys, strict=True)):
        k = _hit_blocks(keys, cached)
        num_hit_blocks += k
        num_hit_tokens += _hit_tokens(request, k, tokens_per_block)
        num_tokens += request.num_tokens
        for key in keys[k:]:
            if key in cached:
                continue
            if len(cached) >= num_blocks:
                while True:
                    neg_next, _, _, victim = heapq.heappop(heap)
                    if cached.get(victim) == -neg_next:
                        break
                assert -neg_next > i, f"evicting a block of request {i}"
                del cached[victim]
            cached[key] = i
        for depth, (key, next_use) in enumerate(zip(keys, next_uses[i], strict=True)):
            cached[key] = next_use
            heapq.heappush(heap, (-next_use, -depth, seq, key))
            seq += 1
    return OracleResult(num_hit_tokens, num_tokens, num_hit_blocks, len(reqs))


def lru_hit_tokens(
    requests: Iterable[OracleRequest], num_blocks: int, tokens_per_block: int
) -> OracleResult:
    """Hits of a single-tier LRU prefix cache of ``num_blocks`` blocks (for cross-checks)."""
    _check_args(num_blocks, tokens_per_block)
    # Least recently used first.
    lru: OrderedDict[Hashable, None] = OrderedDict()
    num_hit_tokens = num_tokens = num_hit_blocks = num_requests = 0
    for request in requests:
        _check_request(request, tokens_per_block)
        keys = request.block_keys[:num_blocks]
        k = 0
        for key in keys:
            if key not in lru:
                break
            k += 1
        num_hit_blocks += k
        num_hit_tokens += _hit_tokens(request, k, tokens_per_block)
        num_tokens += request.num_tokens
        num_requests += 1
        # NOTE: protect the request's cached blocks first, so inserting its missing blocks
        # evicts only other requests' blocks; then order it root-last (children older).
        for key in keys:
            if key in lru:
                lru.move_to_end(key)
        for key in keys:
            if key not in lru:
                if len(lru) >= num_blocks:
                    lru.popitem(last=False)
                lru[key] = None
        for key in reversed(keys):
            lru.move_to_end(key)
    return OracleResult(num_hit_tokens, num_tokens, num_hit_blocks, num_requests)


def oracle_bounds(workload: Workload, tokens_per_block: int, capacities: Iterable[int],
                  skip: Collection[int] = (), partial_reuse: bool = False
                  ) -> list[OracleBounds]:
    """Unlimited, Belady and LRU hit rates of ``workload`` for each capacity in blocks,
    leaving out the requests at the positions (0-based, in the workload's order) in
    ``skip``; with ``partial_reuse`` (the replayed cache's ``enable_partial_reuse``) a hit
    also counts the head of the first block missed that an earlier block behind the same
    prefix shares (:func:`oracle_requests`). Pure.

    NOTE: the bounds counted whole blocks only, while a cache with partial reuse (the
    default) also reuses the head of a block: a replay's hit rate came out above the
    unlimited one (held-out ``tiny``: 0.559 against 0.515). A workload with its own
    ``oracle_requests`` (a hash trace) needs none: its ids share no token, and it keys a
    partial last block as the whole block.

    NOTE: ``skip`` names the requests a replay did not serve (too large for its GPU pool):
    a bound is a bound on the stream that was served, not on one with more reuse in it.
    A workload with an ``oracle_requests(tokens_per_block)`` method (a Mooncake trace) gives
    its block keys without building prompts; others are hashed prompt by prompt.
    """
    # NOTE: every argument is checked before the workload is read: ``skip=5`` was a
    # TypeError from ``in`` after the trace was opened, a generator of capacities gave
    # no bounds at all (read once to fill the tables, then found empty), and a bad
    # capacity was found only after the whole workload had been hashed.
    _check_args(None, tokens_per_block)
    if not isinstance(capacities, Iterable):
        raise ValueError(f"capacities must be an iterable of block counts, got "
                         f"{short_repr(capacities)}")
    capacities = list(capacities)
    for i, capacity in enumerate(capacities):
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"capacities[{i}] must be a block count >= 1, got "
                             f"{short_repr(capacity)}")
    if not isinstance(skip, Collection) or isinstance(skip, str | bytes) or any(
            type(i) is not int for i in skip):
        raise ValueError(f"skip must be a collection of request positions (ints), got "
                         f"{short_repr(skip)}")
    if type(partial_reuse) is not bool:
        raise ValueError(f"partial_reuse must be a bool, got {short_repr(partial_reuse)}")
    method = getattr(workload, "oracle_requests", None)
    requests: list[OracleRequest]
    heads = partial_reuse and not callable(method)  # a hash trace's keys count none apart
    if callable(method):
        source: Iterable[OracleRequest] = method(tokens_per_block)
        requests = [r for i, r in enumerate(source) if i not in skip] if skip else list(source)
    else:
        # NOTE: a skipped request is not hashed at all: it may be the millions of tokens
        # the replay skipped it for.
        requests = list(oracle_requests((r for i, r in enumerate(workload) if i not in skip),
                                        tokens_per_block, partial_reuse))
    unlimited = unlimited_hit_tokens(requests, tokens_per_block).hit_rate
    # One replay per distinct capacity (a sweep repeats them).
    belady: dict[int, float] = {}
    lru: dict[int, float] = {}
    for capacity in capacities:
        if capacity not in belady:
            belady[capacity] = belady_hit_tokens(requests, capacity, tokens_per_block).hit_rate
            lru[capacity] = lru_hit_tokens(requests, capacity, tokens_per_block).hit_rate
    return [OracleBounds(tokens_per_block, capacity, unlimited, belady[capacity], lru[capacity],
                         heads)
            for capacity in capacities]
