"""JSONL traces of block hash ids: Mooncake's FAST'25 traces and Qwen-Bailian's.

The reader parses and validates the whole file when constructed (lengths and ids only) and
builds token lists lazily, one request at a time, when iterated.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, cast

from kvtier import json_text
from kvtier.blocks import cdiv
from kvtier.json_text import DuplicateKeyError
from kvtier.reprs import shown
from kvtier.sequence import is_finite_number, short_repr
from kvtier.sim.oracle import OracleRequest
from kvtier.sim.trace_file import (
    MAX_LINE_BYTES,
    TraceFormatError,
    TraceRecords,
    check_limit,
    open_trace,
    read_line,
    trace_path,
)
from kvtier.sim.workload import (
    MAX_ARRIVAL_S,
    MAX_REQUEST_TOKENS,
    SAMPLED_TOKEN_BASE,
    TraceRequest,
)

MOONCAKE_BLOCK_TOKENS = 512
MAX_HASH_ID_ANY = (1 << 63) - 1  # a row's ids, before its trace's block size is known


class _MooncakeRecord(NamedTuple):
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    session_id: str | None


HASH_BLOCK_SIZES = tuple(1 << k for k in range(9, -1, -1))  # 512 .. 1 tokens, largest first
_OTHER_BLOCKS = (" (for hash blocks of another size, give it: block_tokens, or kvtier's "
                 "--trace-block-tokens)")
# The JSONL formats read, by a key their rows carry: Qwen-Bailian rows have chat ids.
_BAILIAN_KEY = "chat_id"


# The keys the readers take (the other Bailian keys, ``turn`` and ``type``, are known and
# ignored), as spelt in the published files.
_READ_KEYS = ("timestamp", "input_length", "output_length", "hash_ids", _BAILIAN_KEY,
              "parent_chat_id")
_KNOWN_KEYS = frozenset((*_READ_KEYS, "turn", "type"))


def _near_miss(key: str) -> str | None:
    """The key the readers take that ``key`` (not one of them) misspells, if any: equal
    once case, ``_``, ``-`` and spaces are dropped, or one letter off. Pure."""
    def plain(text: str) -> str:
        return "".join(c for c in text.lower() if c not in "_- ")

    typed = plain(key)
    for known in _READ_KEYS:
        target = plain(known)
        if typed == target or (abs(len(typed) - len(target)) <= 1 and _one_edit(typed, target)):
            return known
    return None


def _one_edit(a: str, b: str) -> bool:
    """Whether ``a`` becomes ``b`` by one insertion, deletion or substitution. Pure."""
    if len(a) > len(b):
        a, b = b, a
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    return a[i + (len(a) == len(b)):] == b[i + 1:]


class _Format(NamedTuple):
    name: str
    block_tokens: int  # the hash block the format documents
    ticks_per_s: float  # timestamp units per second
    prefix_ids: bool  # an id names its block with every block before it (else: its content)
    tail_without_id: bool  # a partial last block may have no id (floor, not ceil)


# NOTE: the Mooncake files give every block an id, the partial last one too (checked on
# every row of both); the Bailian README says neither way: both are taken.
MOONCAKE = _Format("mooncake", MOONCAKE_BLOCK_TOKENS, 1000.0, True, False)
BAILIAN = _Format("bailian", 16, 1.0, False, True)


def _checked_tokens_per_block(tpb: object) -> int:
    """``tpb``, a block size of the oracle's keys; ValueError naming it unless an int >= 1."""
    if type(tpb) is not int or tpb < 1:
        raise ValueError(f"tokens_per_block must be an integer >= 1, got {shown(tpb)}")
    return tpb


class MooncakeTrace(TraceRecords[_MooncakeRecord]):
    """A JSONL trace of block hash ids: arrivals, lengths and one id per block of a prompt.

    Two public formats, told apart by their rows: Mooncake's FAST'25 traces (``timestamp``
    in ms; ``hash_ids`` of 512-token blocks, *prefix* hashes: an id names its block with
    every block before it) and Qwen-Bailian's (``chat_id``, ``parent_chat_id``, ``turn``,
    ``type``; ``timestamp`` in seconds; ``hash_ids`` of 16-token blocks, each hashing its
    block's own content). A row has ``ceil(input_length / B)`` ids for blocks of ``B``
    tokens (a Bailian row may leave the partial last block without one). ``block_tokens``
    is ``B`` where the trace's blocks are not its format's (a power of two up to 512).

    Hash id ``h`` stands for tokens ``h*B .. h*B+B-1``; the last block is cut so the
    prompt has ``input_length`` tokens (tokens past the last id are the request's own).
    Equal prefixes of ids give equal token ids, so the cache reuses exactly the prefixes
    the trace shares::

        hash_ids   [ 7          | 8          | 9     ]   input_length = 1200, B = 512
        tokens     [3584..4095  | 4096..4607 | 4608..4783]

    A Bailian row's session is its conversation's first request (``parent_chat_id``
    followed back). ``tokens_per_block`` is the block size of :meth:`oracle_requests`;
    ``time_unit_s``, where given, the seconds one ``timestamp`` unit stands for (else the
    format's). ``limit`` keeps only the first ``limit`` requests.
    """

    def __init__(self, path: str | Path, tokens_per_block: int = 32, limit: int | None = None,
                 block_tokens: int | None = None, time_unit_s: float | None = None):
        tpb = _checked_tokens_per_block(tokens_per_block)
        if block_tokens is not None and (type(block_tokens) is not int
                                         or block_tokens not in HASH_BLOCK_SIZES):
            raise ValueError(f"block_tokens must be a power of two in 1..512 or None, got "
                             f"{shown(block_tokens)}")
        if time_unit_s is not None and (not is_finite_number(time_unit_s)
                                        or not 1e-9 <= time_unit_s <= 3600):
            raise ValueError(f"time_unit_s must be a number of seconds in 1e-9..3600 or None, "
                             f"got {short_repr(time_unit_s)}")
        check_limit(limit)
        self.path = trace_path(path)
        self.tokens_per_block = tpb
        self.limit = limit
        self.format = MOONCAKE  # till the first row tells
        self.block_tokens = MOONCAKE_BLOCK_TOKENS if block_tokens is None else block_tokens
        self._records = self._parse(block_tokens, time_unit_s)
        self._chains: list[tuple[int, ...]] | None = None

    def __iter__(self) -> Iterator[TraceRequest]:
        """Yield the requests in file (arrival) order, building each prompt when reached."""
        block = self.block_tokens
        tail_id = self._first_tail_id
        for index, rec in enumerate(self._records):
            prompt: list[int] = []
            for h in rec.hash_ids:
                prompt.extend(range(h * block, h * block + block))
            if len(prompt) < rec.input_length:  # a partial last block without an id
                prompt.extend(range((tail_id + index) * block,
                                    (tail_id + index) * block + block))
            del prompt[rec.input_length :]
            yield TraceRequest(f"{self.name}-{index}", rec.arrival_s, prompt,
                               rec.output_length, rec.session_id)

    def oracle_requests(self, tokens_per_block: int | None = None) -> Iterator[OracleRequest]:
        """Block keys of each request at ``tokens_per_block`` (default: the trace's setting).

        No tokens are built. With prefix hashes (Mooncake) and blocks that divide the hash
        block, sub-block ``j`` of hash id ``h`` is keyed ``(h, j)`` (or ``h`` itself at the
        hash block's size): the id already names the whole prefix, so the key does too.
        Otherwise a block is keyed by the prefix of ids it ends in (numbered once for the
        trace) and where in that hash block it ends. The last, partial block is included,
        keyed as the whole block, following the Mooncake trace's convention that it is
        cacheable (so the offline references stay upper bounds of what a cache reuses).
        """
        tpb = (self.tokens_per_block if tokens_per_block is None
               else _checked_tokens_per_block(tokens_per_block))
        block = self.block_tokens
        if self.format.prefix_ids and block % tpb == 0:
            per_hash = block // tpb
            for index, rec in enumerate(self._records):
                num_blocks = cdiv(rec.input_length, tpb)
                ids = self._ids_with_tail(rec, index)
                if per_hash == 1:
                    yield OracleRequest(ids, rec.input_length)
                else:
                    keys = tuple((h, j) for h in ids for j in range(per_hash))
                    yield OracleRequest(keys[:num_blocks], rec.input_length)
            return
        for rec, chain in zip(self._records, self.chains(), strict=True):
            block_keys: list[tuple[int, int]] = []
            for k in range(cdiv(rec.input_length, tpb)):
                i = (min((k + 1) * tpb, rec.input_length) - 1) // block  # its last hash block
                # Where the block would end, within that hash block: a partial last block is
                # keyed as the whole one (the Mooncake convention: the oracles stay bounds).
                block_keys.append((chain[i], min((k + 1) * tpb, (i + 1) * block) - i * block))
            yield OracleRequest(tuple(block_keys), rec.input_length)

    def chains(self) -> list[tuple[int, ...]]:
        """Per request, its prefixes of hash ids numbered: equal numbers, equal prefixes
        (the ids themselves where they are prefix hashes); a partial last block without
        an id is the request's own. Built once. Pure."""
        if self._chains is None:
            numbered: dict[tuple[int, int], int] = {}
            chains = []
            for index, rec in enumerate(self._records):
                chain = []
                prev = -1
                for h in self._ids_with_tail(rec, index):
                    prev = numbered.setdefault((prev, h), len(numbered))
                    chain.append(prev)
                chains.append(tuple(chain))
            self._chains = chains
        return self._chains

    def _ids_with_tail(self, rec: _MooncakeRecord, index: int) -> tuple[int, ...]:
        if len(rec.hash_ids) * self.block_tokens < rec.input_length:
            return (*rec.hash_ids, self._first_tail_id + index)
        return rec.hash_ids

    def unlimited_hit_rate(self) -> float:
        """Token hit rate with an unlimited cache at the hash blocks' granularity (a query).

        For each request in order, the longest prefix of its ids already seen counts
        ``min(k * B, input_length)`` tokens as hits: a block seen, each with at least as
        many of its tokens as the request has (a partial last block is seen by a prompt
        that had it whole, not the reverse).

        NOTE: a block seen only as a partial last block counted whole: after a request of
        100 tokens, one of 512 with the same id counted 512 hits.
        """
        block = self.block_tokens
        num_seen: dict[int, int] = {}  # prefix of ids (numbered) -> most of its tokens seen
        num_hit_tokens = 0
        num_tokens = 0
        for rec, chain in zip(self._records, self.chains(), strict=True):
            hitting = True
            for k, c in enumerate(chain):
                num_block_tokens = min(block, rec.input_length - k * block)
                if hitting and num_seen.get(c, 0) < num_block_tokens:
                    hitting = False
                    num_hit_tokens += k * block
                num_seen[c] = max(num_seen.get(c, 0), num_block_tokens)
            if hitting:
                num_hit_tokens += rec.input_length
            num_tokens += rec.input_length
        return num_hit_tokens / num_tokens if num_tokens else 0.0

    def describe(self) -> dict[str, object]:
        """JSON-ready summary: file, format (``kind``: ``mooncake`` or ``bailian``), request
        count, span, token totals and the hash blocks' size."""
        recs = self._records
        return {
            "name": self.name,
            "kind": self.format.name,
            "path": str(self.path),
            "num_requests": len(recs),
            "span_s": recs[-1].arrival_s - recs[0].arrival_s if recs else 0.0,
            "num_prompt_tokens": sum(r.input_length for r in recs),
            "num_output_tokens": sum(r.output_length for r in recs),
            "hash_block_tokens": self.block_tokens,
            "tokens_per_block": self.tokens_per_block,
            "limit": self.limit,
        }

    def _parse(self, block_tokens: int | None, time_unit_s: float | None
               ) -> list[_MooncakeRecord]:
        """The records, each row checked as it is read; sets ``format`` (by the first row),
        ``block_tokens`` and the first id past the trace's (``_first_tail_id``: the partial
        last blocks without an id are numbered from it)."""
        records: list[_MooncakeRecord] = []
        links: dict[int, tuple[int, int]] = {}  # Bailian: chat id -> (its parent, its line)
        chats: list[int] = []  # Bailian: each record's chat id
        parents: dict[int, int | None] = {}  # Mooncake: what each hash id follows
        previous = 0.0
        max_id = -1
        max_line = 0
        fmt = self.format
        block, ticks_per_s = self.block_tokens, fmt.ticks_per_s
        with open_trace(self.path) as f:
            line_number = 0
            while True:
                if self.limit is not None and len(records) >= self.limit:
                    break
                line_number += 1
                raw = cast(bytes, read_line(f, self.path, line_number, MAX_LINE_BYTES + 1))
                if not raw:
                    break
                if len(raw) > MAX_LINE_BYTES:
                    raise TraceFormatError(self.path, line_number, "<text>",
                                           f"the line is longer than {MAX_LINE_BYTES:,} bytes, "
                                           "more than any trace row")
                try:
                    # NOTE: a byte order mark (Windows tools write one) opens line 1 only.
                    line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise TraceFormatError(self.path, line_number, "<text>",
                                           "not UTF-8 text: not a JSONL trace line") from None
                if not line.strip():
                    continue
                obj = self._parse_line(line, line_number)

                def fail(field: str, problem: str, line_number: int = line_number
                         ) -> TraceFormatError:
                    return TraceFormatError(self.path, line_number, field, problem)

                if not records:  # the first row tells the format
                    fmt = self.format = BAILIAN if _BAILIAN_KEY in obj else MOONCAKE
                    ticks_per_s = fmt.ticks_per_s if time_unit_s is None else 1.0 / time_unit_s
                    block = self.block_tokens = (fmt.block_tokens if block_tokens is None
                                                 else block_tokens)
                elif (_BAILIAN_KEY in obj) != (fmt is BAILIAN):
                    # NOTE: a Bailian file's row without a chat id raised KeyError, naming no
                    # line; a Mooncake file's row with one was read as Mooncake's, the chat
                    # id dropped. One file, one format.
                    raise fail(_BAILIAN_KEY, f"{'missing' if fmt is BAILIAN else 'given'} in a "
                               f"row of a {fmt.name} trace (told by the first row): not one "
                               "format")

                timestamp = cast(float, obj["timestamp"])
                if timestamp < previous:
                    raise fail("timestamp", f"{timestamp} is earlier than the previous line's "
                               f"{previous}")
                previous = timestamp
                # NOTE: bounded here, in the trace's unit (its format's, or time_unit_s), not
                # in Mooncake's ms alone: 1e15 us (1e9 s) was refused as past 1e13.
                arrival_s = timestamp / ticks_per_s
                if not arrival_s <= MAX_ARRIVAL_S:
                    raise fail("timestamp", f"{timestamp} is {arrival_s:.3g} s, more than the "
                               f"{MAX_ARRIVAL_S:.0e} s a trace may span")
                length = cast(int, obj["input_length"])
                hash_ids = cast("tuple[int, ...]", obj["hash_ids"])
                expected = cdiv(length, block)
                if len(hash_ids) != expected and not (
                        fmt.tail_without_id and len(hash_ids) == length // block):
                    wanted = f"ceil({length}/{block}) = {expected}"
                    if fmt.tail_without_id and length % block:
                        wanted += f" (or {length // block}, the partial last block without one)"
                    raise fail("hash_ids", f"has {len(hash_ids)} ids, expected {wanted}"
                               f"{'' if block_tokens is not None else _OTHER_BLOCKS}")
                if fmt.prefix_ids:
                    self._check_prefixes(hash_ids, parents, line_number)
                row_max = max(hash_ids, default=-1)
                if row_max > max_id:
                    max_id, max_line = row_max, line_number
                if fmt is BAILIAN:
                    chat = cast(int, obj[_BAILIAN_KEY])
                    if chat in links:
                        raise fail(_BAILIAN_KEY, f"chat id {chat} is given twice (first on "
                                   f"line {links[chat][1]})")
                    links[chat] = (cast(int, obj.get("parent_chat_id", -1)), line_number)
                    chats.append(chat)
                records.append(_MooncakeRecord(arrival_s, length,
                                               cast(int, obj["output_length"]), hash_ids,
                                               None))
        if fmt is BAILIAN:
            roots = self._roots(links)
            records = [rec._replace(session_id=f"chat-{roots[chat]}")
                       for rec, chat in zip(records, chats, strict=True)]
        # Token ids h*B .. must stay below 2**62, the tails' ids (one a request) too.
        # NOTE: the bound was 2**63 (int64): ids from 2**62 are a replay's sampled tokens,
        # and a prompt holding them reused another request's output as its prefix.
        self._first_tail_id = max_id + 1
        if (max_id + 1 + len(records)) * self.block_tokens > SAMPLED_TOKEN_BASE:
            raise TraceFormatError(
                self.path, max_line, "hash_ids", f"id {max_id} is too large: token ids "
                f"h*{self.block_tokens}.. must stay below 2**62, where a replay's sampled "
                "tokens begin")
        return records

    def _roots(self, links: dict[int, tuple[int, int]]) -> dict[int, int]:
        """Each chat's conversation: the first chat of its chain of parents (a parent the
        trace does not hold, before its window, is the root); TraceFormatError naming the
        line of a chain that comes back to a chat.

        NOTE: resolved once the rows are read: a parent read after its child (the chain
        followed as far as it was read) split one conversation in two sessions."""
        roots: dict[int, int] = {}
        for start in links:
            path: list[int] = []
            chat = start
            while chat not in roots:
                if chat in path:
                    lines = ", ".join(str(links[c][1]) for c in path[path.index(chat):])
                    raise TraceFormatError(self.path, links[chat][1], "parent_chat_id",
                                           f"chat {chat} follows itself (lines {lines})")
                path.append(chat)
                parent = links[chat][0]
                if parent < 0 or parent not in links:
                    roots[chat] = chat if parent < 0 else parent
                    break
                chat = parent
            root = roots[chat]
            for c in path:
                roots[c] = root
        return roots

    def _check_prefixes(self, hash_ids: tuple[int, ...], parents: dict[int, int | None],
                        line_number: int) -> None:
        """Record what each of ``hash_ids`` (prefix hashes) follows; TraceFormatError naming
        the line and the id if it followed something else before (``parents``).

        NOTE: a prefix hash names its whole prefix, so it always follows the same id. An
        id twice in one prompt ran the whole replay, then failed in the oracles
        ("block_keys must be distinct"), naming no line; one after two different prefixes
        made the oracles count a hit the cache could never have. (Bailian ids hash their
        block's content alone: they may repeat anywhere.)"""
        previous = None
        for index, h in enumerate(hash_ids):
            before = parents.setdefault(h, previous)
            if before != previous:
                def where(p: int | None) -> str:
                    return "opens the prompt" if p is None else f"follows hash id {p}"

                raise TraceFormatError(self.path, line_number, "hash_ids",
                                       f"hash id {h} at index {index} {where(previous)}, but "
                                       f"it {where(before)} before: a hash id names its whole "
                                       "prefix")
            previous = h

    def _parse_line(self, line: str, line_number: int) -> dict[str, object]:
        """The row's fields, each checked alone (the hash ids as a tuple)."""
        def fail(field: str, problem: str) -> TraceFormatError:
            return TraceFormatError(self.path, line_number, field, problem)

        try:
            obj = json_text.loads(line)
        except DuplicateKeyError as exc:
            raise fail(exc.key, "given twice in one object") from None
        except json.JSONDecodeError as exc:
            raise fail("<json>", f"malformed JSON: {exc.msg}") from None
        except ValueError:
            # NOTE: json.loads raises a bare ValueError, not a JSONDecodeError, for a number
            # past Python's limit on int parsing (4,300 digits).
            raise fail("<json>", "malformed JSON: a number too long to read") from None
        except RecursionError:
            raise fail("<json>", "nested too deeply: not a trace record") from None
        if not isinstance(obj, dict):
            raise fail("<json>", f"expected an object, got {type(obj).__name__}")
        # NOTE: a key the readers do not know is ignored, so a misspelt one was too: a
        # Bailian row's "parent_chatid" split its conversation in two sessions without a
        # word. A key one letter (or only case and separators) off one they read is refused.
        for key in obj.keys() - _KNOWN_KEYS:
            meant = _near_miss(key)
            if meant is not None:
                raise fail(key, f"unknown key; did you mean {meant!r}? (a misspelt key would "
                           "be ignored)")
        for field in ("timestamp", "input_length", "output_length", "hash_ids"):
            if field not in obj:
                raise fail(field, "missing")
        timestamp = obj["timestamp"]
        if not is_finite_number(timestamp) or timestamp < 0:
            raise fail("timestamp", f"expected a finite number >= 0, got "
                       f"{short_repr(timestamp)}")
        for field in ("input_length", "output_length"):
            value = obj[field]
            if type(value) is not int:
                raise fail(field, f"expected an integer, got {shown(value)}")
            if value < (1 if field == "input_length" else 0):
                raise fail(field, f"length must not be negative or empty, got {value}")
            if value > MAX_REQUEST_TOKENS:
                raise fail(field, f"{value} tokens is more than the {MAX_REQUEST_TOKENS} "
                           "a request may have")
        for field, lowest in ((_BAILIAN_KEY, 0), ("parent_chat_id", -1)):
            if field in obj:
                value = obj[field]
                if type(value) is not int or not lowest <= value < 1 << 63:
                    raise fail(field, f"expected an integer id >= {lowest}, got "
                               f"{short_repr(value)}")
        hash_ids = obj["hash_ids"]
        expected_ids = f"expected a list of integers in 0..{MAX_HASH_ID_ANY}"
        if not isinstance(hash_ids, list):
            raise fail("hash_ids", f"{expected_ids}, got {short_repr(hash_ids)}")
        bad = next((i for i, h in enumerate(hash_ids)
                    if type(h) is not int or not 0 <= h <= MAX_HASH_ID_ANY), None)
        if bad is not None:
            raise fail("hash_ids", f"{expected_ids}, got {short_repr(hash_ids[bad])} at "
                       f"index {bad}")
        obj["hash_ids"] = tuple(hash_ids)
        return obj
