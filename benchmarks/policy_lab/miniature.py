"""Exact books for the witness: two simulated caches on a sample of the stream (thirteenth
session).

The default policy's LRU witness counts LRU's hits from release ticks alone (Mattson),
and the learned order's from what the real cache holds; once the cache follows LRU's
order the learned order's kept runs are gone, so only its losses can still show (twelfth
session). Here the verdict comes from two *miniature* caches instead (Waldspurger et al.,
ATC '17; SHARDS): one evicts by LRU, one by the learned order (the real policy's own
value and near-term tables, the same classes), both fed the same sampled requests
(``rate``: a request is in the sample when the hash of its sampling unit falls below
``rate``; the miniatures hold ``rate`` x the capacity). At every sampled admission each
miniature counts the prompt blocks it hits; the lead is the learned miniature's hits less
LRU's, summed over requests, and the real cache follows LRU's order while
``lead < -Z sqrt(volume)`` (volume: the sum of the squared per-request differences; both
halved every two turnovers of the miniatures' prompt blocks), as the witness does, but
on books where neither order ever stops running.

A miniature is block-level: a block's key chains its ids to its prefix's key (per key
space), a request's hit is its longest cached prefix of full blocks among its first
``len - 1`` tokens plus the longest common head of a cached child with the next block
(a partial hit, as ``match_prompt``), in tokens; its blocks (prompt, then the full blocks
of its output at release) are pinned while it runs, and only unpinned leaves are evicted
(a prefix is never dropped before its extensions). The learned miniature files a released
block under the class the real policy's rules give it in *that* miniature (the session
turn as the miniature counted it, the role; a head dropped while shared and stored again
by a first turn is shared again), ranks each class's oldest leaf by ``value[class][age
bin]`` x the cost weight of its depth and gives the winning class's oldest or youngest
leaf by ``near`` (``KvtierPredict.rank`` and ``within``, without priorities or soft
claims). Not modelled: the two tiers (one pool of GPU + host blocks, as the witness counts
it), soft claims, runs (a block is the unit).

Variants (``make_policy``): ``mini@R`` the miniatures decide; ``cold@R`` the same, and
LRU's order until the learner's first refresh (no verdict on an order that has learned
nothing); ``and@R`` LRU's order only where the miniatures and the old count agree;
``oldcold@0`` the old witness with the cold-start rule; ``watch@R`` / ``lruwatch@R`` the
books kept while the cache runs the learned order / LRU's order throughout (the
miniatures' error). ``R:session`` samples by the trace's session id (a probe's partition,
not a signal the cache sees), else by the first block; ``+touch``: requests outside the
sample refresh what the miniatures hold; ``+share``: and a block so touched takes the
rate's share of the room (``MiniCache.shared_weight``).

The probe hooks the cache (``BlockCache.__init__``, ``note_reuse``, ``unref_path``, inside
``hooked()``) for ``KvtierPredict`` objects that carry a ``mini_rate``; nothing in ``src/``
changes.

    .venv/bin/python benchmarks/policy_lab/miniature.py --rows agentic200,azure-code \
        --variants main,cold@1 --num-scales 3
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import sys
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from kvtier import policies
from kvtier.cache import BlockCache
from kvtier.config import CacheConfig
from kvtier.policies import _LAST_BIN_S, _TURN_BUCKETS, NUM_AGE_BINS, KvtierPredict
from kvtier.sim import Workload, simulate
from kvtier.witness import LruWitness, Z

SAMPLE_SPACE = 1 << 24


def age_bin(age: float) -> int:
    return (NUM_AGE_BINS - 1 if age >= _LAST_BIN_S else int(age).bit_length()) if age > 0 else 0


class _Block:
    __slots__ = ("children", "cls", "data", "depth", "key", "kids", "parent", "pins",
                 "prompt_end", "released_s", "space", "tick", "turn", "weight")

    def __init__(self, key: int, parent: _Block | None, depth: int, turn: int,
                 prompt_end: int) -> None:
        self.key = key
        self.parent = parent
        self.depth = depth
        self.children = 0
        self.pins = 1
        self.tick = 0
        self.released_s = 0.0
        self.cls = 1
        self.turn = turn
        self.prompt_end = prompt_end
        self.kids: list[_Block] = []
        self.data = b""
        self.space: object = None
        self.weight = 1.0


class MiniCache:
    """A block cache of ``capacity`` blocks evicting by LRU (``learned`` None) or by the
    learned order of ``learned`` (its tables, read live). See the module."""

    def __init__(self, capacity: int, learned: KvtierPredict | None, tpb: int) -> None:
        self.capacity = max(1, capacity)
        self.learned = learned
        self.tpb = tpb
        self.blocks: dict[int, _Block] = {}
        nq = learned.NUM_CLASSES if learned is not None else 1
        self._old: list[list[tuple[int, int]]] = [[] for _ in range(nq)]   # (tick, key)
        self._young: list[list[tuple[int, int]]] = [[] for _ in range(nq)]  # (-tick, key)
        self._tick = 0
        self._live: dict[str, tuple[list[int], int, int, int]] = {}
        self.num_hits = 0
        self.num_evictions = 0
        self.count_partial = True
        # Keys of blocks dropped while filed shared (class 0): a first turn that stores one
        # again from the prompt's head on files it shared again (``KvtierPredict``'s rule
        # for a shared head come back for, the S3-FIFO ghost -> main move).
        self.returning: OrderedDict[int, None] = OrderedDict()
        self._roots: dict[object, list[_Block]] = {}
        # The room a block takes: 1, or ``shared_weight`` once a request outside the sample
        # touched it (a key-sampled miniature would hold such a block with that chance).
        self.shared_weight = 1.0
        self.used = 0.0

    # ---- requests ----------------------------------------------------------------------

    def admit(self, rid: str, keys: list[int], now: float, tokens: Sequence[int] = (),
              space: object = None) -> int:
        """A request with prompt block ``keys`` (and ``tokens``) is admitted; returns the
        tokens it hits: its longest cached prefix of full blocks among the first ``len - 1``
        tokens (the last is computed for the logits, as ``match_prompt``), then the longest
        common head of a cached child's tokens with the next block (a partial hit)."""
        blocks = self.blocks
        m = 0
        parent: _Block | None = None
        reusable = len(tokens) - 1 if tokens else len(keys) * self.tpb
        limit = min(len(keys), reusable // self.tpb)
        for k in keys[:limit]:
            b = blocks.get(k)
            if b is None:
                break
            b.pins += 1
            parent = b
            m += 1
        tpb = self.tpb
        partial = 0
        pos = m * tpb
        if self.count_partial and pos < reusable:
            want = bytes(memoryview(tokens[pos:min(pos + tpb, reusable)]))  # type: ignore
            kids = parent.kids if parent is not None else self._roots.get(space, ())
            for c in kids:
                have = c.data
                n = 0
                for a, b2 in zip(have, want, strict=False):
                    if a != b2:
                        break
                    n += 1
                partial = max(partial, n // 8)
        turn = 1
        if parent is not None and parent.turn and m >= parent.prompt_end:
            turn = parent.turn + 1
        n = len(keys)
        for i in range(m, n):
            b = blocks.get(keys[i])
            if b is not None:  # the last block, past the reusable tokens: held as it is
                b.pins += 1
                parent = b
                continue
            self._make_room(now)
            b = _Block(keys[i], parent, i, turn, n)
            b.space = space
            if self.count_partial:
                b.data = bytes(memoryview(tokens[i * tpb:(i + 1) * tpb]))  # type: ignore
                (parent.kids if parent is not None else self._roots.setdefault(space, [])
                 ).append(b)
            blocks[keys[i]] = b
            self.used += 1.0
            if parent is not None:
                parent.children += 1
            parent = b
        self._live[rid] = (keys, m, turn, n)
        self.num_hits += m
        return m * tpb + partial

    def touch(self, keys: list[int], now: float) -> None:
        """A request outside the sample reused the cached prefix of ``keys``: its blocks
        are referenced now (released again at once, deepest first), nothing is stored."""
        blocks = self.blocks
        chain = []
        for k in keys:
            b = blocks.get(k)
            if b is None:
                break
            chain.append(b)
        w = self.shared_weight
        for b in reversed(chain):
            if b.weight != w:
                self.used += w - b.weight
                b.weight = w
            if b.pins:
                continue
            self._tick += 1
            b.tick = self._tick
            b.released_s = now
            if not b.children:
                self._file(b)

    def release(self, rid: str, out_keys: list[int], now: float,
                out_data: Sequence[bytes] = ()) -> None:
        """The request ends; ``out_keys`` are its output's full blocks past the prompt."""
        entry = self._live.pop(rid, None)
        if entry is None:
            return
        keys, m, turn, n = entry
        blocks = self.blocks
        chain = [blocks.get(k) for k in keys]
        parent = chain[-1] if chain else None
        for j, k in enumerate(out_keys):
            if k in blocks or parent is None:
                break
            self._make_room(now)
            b = _Block(k, parent, n + j, turn, n)
            if self.count_partial:
                b.data = out_data[j]
                parent.kids.append(b)
            blocks[k] = b
            self.used += 1.0
            parent.children += 1
            parent = b
            chain.append(b)
        learned = self.learned
        head_returning = 0  # the prompt's head blocks whose shared ghosts came back
        if learned is not None and turn <= 1 and self.returning:
            ret = self.returning
            while head_returning < n and keys[head_returning] in ret:
                del ret[keys[head_returning]]
                head_returning += 1
        for i in range(len(chain) - 1, -1, -1):
            held = chain[i]
            if held is None:
                continue
            b = held
            b.pins -= 1
            if b.pins:
                continue
            self._tick += 1
            b.tick = self._tick
            b.released_s = now
            if learned is not None:
                if i >= n:
                    b.cls = 1 + 2 * _TURN_BUCKETS[min(max(turn, 1), 8) - 1] + 1
                elif (turn == 1 and i < m) or i < head_returning:
                    b.cls = 0
                else:
                    b.cls = 1 + 2 * _TURN_BUCKETS[min(max(turn, 1), 8) - 1]
            if not b.children:
                self._file(b)

    # ---- eviction ----------------------------------------------------------------------

    def _file(self, b: _Block) -> None:
        c = b.cls if self.learned is not None else 0
        heapq.heappush(self._old[c], (b.tick, b.key))
        if self.learned is not None:
            heapq.heappush(self._young[c], (-b.tick, b.key))

    def _valid(self, tick: int, key: int) -> _Block | None:
        b = self.blocks.get(key)
        if b is None or b.pins or b.children or b.tick != tick:
            return None
        return b

    def _head(self, heap: list[tuple[int, int]], sign: int) -> _Block | None:
        while heap:
            t, k = heap[0]
            b = self._valid(sign * t, k)
            if b is not None:
                return b
            heapq.heappop(heap)
        return None

    def _make_room(self, now: float) -> None:
        while self.used >= self.capacity:
            if not self._evict(now):
                return  # everything pinned: the miniature overflows, as a GPU would stall

    def _evict(self, now: float) -> bool:
        learned = self.learned
        if learned is None:
            victim = self._head(self._old[0], 1)
        else:
            best: tuple[float, int] | None = None
            best_c = -1
            value = learned.learner.value
            cost = learned.cost_aware
            per = self.tpb / learned.crossover_tokens
            for c, heap in enumerate(self._old):
                h = self._head(heap, 1)
                if h is None:
                    continue
                v = value[c][age_bin(now - h.released_s)]
                if cost:
                    v *= 1.0 + h.depth * per
                if best is None or (v, h.tick) < best:
                    best, best_c = (v, h.tick), c
            if best is None:
                return False
            victim = self._head(self._old[best_c], 1)
            young = self._head(self._young[best_c], -1)
            assert victim is not None
            if young is not None and young is not victim:
                near = learned.learner.near[best_c]
                if near[age_bin(now - young.released_s)] < near[age_bin(now - victim.released_s)]:
                    victim = young
        if victim is None:
            return False
        del self.blocks[victim.key]
        self.used -= victim.weight
        self.num_evictions += 1
        if learned is not None and victim.cls == 0:
            ret = self.returning
            ret[victim.key] = None
            if len(ret) > 4 * self.capacity:
                ret.popitem(last=False)
        p = victim.parent
        if self.count_partial:
            kids = p.kids if p is not None else self._roots.get(victim.space, [])
            kids.remove(victim)
        if p is not None:
            p.children -= 1
            if not p.children and not p.pins and p.key in self.blocks:
                self._file(p)
        return True


def block_keys(tokens: Sequence[int], tpb: int, space: object, start: int = 0,
               prev: int | None = None) -> list[int]:
    """Chained keys of the full blocks of ``tokens`` from block ``start`` (``prev``: the
    key of the block before it)."""
    out = []
    h = hash(space) if prev is None else prev
    arr = tokens
    for i in range(start, len(arr) // tpb):
        h = hash((h, bytes(memoryview(arr[i * tpb:(i + 1) * tpb]))))  # type: ignore[arg-type]
        out.append(h)
    return out


class MiniWitness(LruWitness):
    """The witness with its verdict taken from two miniatures (see the module)."""

    def __init__(self, capacity: int, policy: KvtierPredict, tpb: int, rate: float,
                 unit: str = "root", min_evictions: int = 0) -> None:
        super().__init__(capacity)
        self.rate = rate
        self.unit = unit
        self.tpb = tpb
        mini_cap = max(1, round(rate * capacity))
        self.lru = MiniCache(mini_cap, None, tpb)
        self.mine = MiniCache(mini_cap, policy, tpb)
        self.window = 2 * mini_cap
        self.mlead = 0.0
        self.mvol = 0.0
        self.mtraffic = 0
        self.sampled: dict[str, list[int]] = {}
        self.num_sampled = 0
        self.num_admissions = 0
        self.num_lru_admissions = 0
        self.num_verdicts = 0
        self.min_evictions = min_evictions
        self.first_verdict = 0
        self.tok_mine = 0
        self.tok_lru = 0

    mode = "mini"  # "mini": the miniatures decide; "and": they and the old count must agree
    old_ahead = False

    def _judge(self) -> None:  # the real cache's own count: the old verdict
        self.old_ahead = self.lead < -Z * self.volume ** 0.5
        if self.mode in ("and", "oldcold"):
            self._mjudge()

    def _mjudge(self) -> None:
        if self.lru.num_evictions + self.mine.num_evictions < self.min_evictions:
            ahead = False
        else:
            ahead = self.mlead < -Z * self.mvol ** 0.5
        self.mini_ahead = ahead
        if self.mode == "and":
            ahead = ahead and self.old_ahead
        elif self.mode == "cold":
            # LRU's order until the learner has refreshed its tables once (a learned order
            # that has learned nothing yet is the prior's guess), then the miniatures'.
            ahead = ahead or self.mine.learned.learner.num_refreshes < 1  # type: ignore
        elif self.mode == "oldcold":
            # the old witness's verdict, and LRU's order until the learner's first refresh
            ahead = self.old_ahead or self.mine.learned.learner.num_refreshes < 1  # type: ignore
        elif self.mode == "watch":
            ahead = False  # counts, never acts: the learned order alone
        elif self.mode == "lruwatch":
            ahead = True  # counts, the cache in LRU's order throughout
        if ahead and not self.lru_ahead:
            self.num_switches += 1
            if not self.first_verdict:
                self.first_verdict = self.num_admissions
        self.lru_ahead = ahead

    sessions: dict[str, object] | None = None  # request id -> the trace's session id
    touch_all = False  # requests outside the sample touch what the miniatures hold

    def in_sample(self, rid: str, keys: list[int]) -> bool:
        if self.rate >= 1.0:
            return True
        # unit "root": the request's first block (a prefix root: its whole tree together);
        # "session": the trace's session id where it has one (a probe's partition of the
        # stream, not a signal the cache sees), else the first block.
        unit: object = None
        if self.unit == "session" and self.sessions is not None:
            unit = self.sessions.get(rid)
        if unit is None:
            if not keys:
                return False
            unit = self._first_block
        # NOTE: a stable digest (``hash`` of a str or bytes changes with every process).
        digest = zlib.crc32(repr(unit).encode()) if not isinstance(unit, bytes) else \
            zlib.crc32(unit)
        return (digest % SAMPLE_SPACE) < self.rate * SAMPLE_SPACE

    def on_admit(self, seq: object, now: float) -> None:
        self.num_admissions += 1
        self.num_lru_admissions += self.lru_ahead
        tokens = seq.tokens  # type: ignore[attr-defined]
        root = seq.root  # type: ignore[attr-defined]
        rid = seq.request_id  # type: ignore[attr-defined]
        n = seq.num_prompt_blocks  # type: ignore[attr-defined]
        space = (root.lora_id, root.salt)
        keys = block_keys(tokens[:n * self.tpb], self.tpb, space)
        self._first_block = repr(space).encode() + bytes(memoryview(tokens[:self.tpb]))
        if not self.in_sample(rid, keys):
            if self.touch_all:
                self.mine.touch(keys, now)
                self.lru.touch(keys, now)
            if self.mode in ("cold", "oldcold"):
                self._mjudge()
            return
        self.num_sampled += 1
        self.sampled[rid] = keys
        prompt = tokens[:len(tokens)]
        hm = self.mine.admit(rid, keys, now, prompt, space)
        hl = self.lru.admit(rid, keys, now, prompt, space)
        self.tok_mine += hm
        self.tok_lru += hl
        d = hm - hl
        self.mlead += d
        self.mvol += d * d
        self.mtraffic += len(keys)
        if self.mtraffic >= self.window:
            self.mtraffic = 0
            self.mlead /= 2
            self.mvol /= 2
        self._mjudge()

    def on_release(self, seq: object, now: float) -> None:
        rid = seq.request_id  # type: ignore[attr-defined]
        keys = self.sampled.pop(rid, None)
        if keys is None:
            return
        tokens = seq.tokens  # type: ignore[attr-defined]
        tpb = self.tpb
        out = block_keys(tokens, tpb, None, len(keys), keys[-1]) if keys else []
        data = [bytes(memoryview(tokens[i * tpb:(i + 1) * tpb]))
                for i in range(len(keys), len(keys) + len(out))]
        self.mine.release(rid, out, now, data)
        self.lru.release(rid, out, now, data)


@contextmanager
def hooked() -> Iterator[None]:
    """Within: the cache routes admissions and releases to a ``MiniWitness`` where the
    policy asks for one (``mini_rate`` set on a ``KvtierPredict``); restored on the way
    out."""
    init, note, unref = BlockCache.__init__, BlockCache.note_reuse, BlockCache.unref_path

    def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
        init(self, *a, **kw)
        learner = self._learner
        rate = getattr(learner, "mini_rate", None)
        self._mini = None
        if rate is not None and learner.witness is not None:
            cfg = self.config
            w = MiniWitness(max(1, cfg.num_gpu_blocks + cfg.num_host_blocks), learner,
                            cfg.tokens_per_block, rate, getattr(learner, "mini_unit", "root"),
                            getattr(learner, "mini_min_evictions", 0))
            w.mode = getattr(learner, "mini_mode", "mini")
            w.sessions = getattr(learner, "mini_sessions", None)
            w.touch_all = getattr(learner, "mini_touch", False)
            if getattr(learner, "mini_share", False):
                w.touch_all = True
                w.lru.shared_weight = w.mine.shared_weight = rate
            learner.witness = w
            self._witness = w
            self._mini = w
            learner.mini = w

    def note_reuse(self, seq):  # type: ignore[no-untyped-def]
        if self._mini is not None:
            self._mini.on_admit(seq, self.evictor.now())
        note(self, seq)

    def unref_path(self, node, release=None):  # type: ignore[no-untyped-def]
        if release is not None and self._mini is not None:
            self._mini.on_release(release, self.evictor.now())
        unref(self, node, release)

    BlockCache.__init__ = __init__  # type: ignore[method-assign]
    BlockCache.note_reuse = note_reuse  # type: ignore[method-assign]
    BlockCache.unref_path = unref_path  # type: ignore[method-assign]
    try:
        yield
    finally:
        BlockCache.__init__ = init  # type: ignore[method-assign]
        BlockCache.note_reuse = note   # type: ignore[method-assign]
        BlockCache.unref_path = unref  # type: ignore[method-assign]


def make_policy(variant: str) -> KvtierPredict:
    """``main`` (the default as it is), ``blind`` (its witness never acts), ``mini@R``
    (the miniature witness at rate R), ``mini@R/e`` (no verdict before e evictions),
    ``mini@R:session`` (sampled by the trace's session id); ``and@``, ``cold@``, ``watch@``,
    ``lruwatch@`` the same with ``MiniWitness.mode`` so named."""
    p = policies.KvtierPredict(cost_aware=True)
    if variant == "main":
        return p
    if variant == "blind":
        p.witnessed = False
        return p
    if variant.startswith(("mini@", "and@", "watch@", "lruwatch@", "cold@",
                                   "oldcold@")):
        mode, _, spec = variant.partition("@")
        p.mini_mode = mode  # type: ignore[attr-defined]
        rate, _, rest = spec.partition("/")
        rate, _, unit = rate.partition(":")
        if unit.endswith("+touch"):
            unit = unit[:-6]
            p.mini_touch = True  # type: ignore[attr-defined]
        if unit.endswith("+share"):
            unit = unit[:-6]
            p.mini_share = True  # type: ignore[attr-defined]
        if unit:
            p.mini_unit = unit  # type: ignore[attr-defined]
        p.mini_rate = float(rate)  # type: ignore[attr-defined]
        if rest:
            p.mini_min_evictions = int(rest)  # type: ignore[attr-defined]
        return p
    raise ValueError(f"unknown variant {variant!r}")


# ---- rows --------------------------------------------------------------------------------

def _row(name: str) -> tuple[Callable[[], Workload], CacheConfig, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import bench_policy as bp

    from kvtier.sim import AgenticWorkload, AzureTrace, MooncakeTrace, SyntheticChat

    def cfg(g: int, h: int) -> CacheConfig:
        return CacheConfig(tokens_per_block=32, num_gpu_blocks=g, num_host_blocks=h,
                           eviction_policy="kvtier-predict-cost")
    if name == "agentic200":
        return (lambda: AgenticWorkload(num_requests=200)), cfg(2698, 0), 4.1317
    if name == "agentic":
        return (lambda: AgenticWorkload(num_requests=2000)), cfg(2698, 0), 4.1317
    if name == "agentic1":
        return (lambda: AgenticWorkload(num_requests=2000, seed=1)), cfg(2698, 0), 4.1317
    if name == "agentic-host":
        return (lambda: AgenticWorkload(num_requests=2000)), cfg(2698, 2896), 4.1317
    if name == "azure-code":
        return (lambda: AzureTrace(bp.TRACES / "azure_llm_2023_code.csv", limit=2000)), \
            cfg(625, 1878), 1.0
    if name == "azure-conv":
        return (lambda: AzureTrace(bp.TRACES / "azure_llm_2023_conv.csv", limit=2000)), \
            cfg(528, 674), 1.0
    if name == "mcc3":
        return (lambda: MooncakeTrace(bp.TRACES / "mooncake_conversation_trace.jsonl",
                                      limit=2000)), cfg(7732, 10457), 2.874
    if name == "mcc10":
        return (lambda: MooncakeTrace(bp.TRACES / "mooncake_conversation_trace.jsonl",
                                      limit=2000)), cfg(15157, 45474), 2.874
    if name == "mcs3":
        return (lambda: MooncakeTrace(bp.TRACES / "mooncake_synthetic_trace.jsonl",
                                      limit=2000)), cfg(8456, 6960), 2.85
    if name == "chat":
        return (lambda: SyntheticChat(num_requests=2000)), cfg(532, 1396), 2.292
    if name == "readme":
        return (lambda: SyntheticChat()), cfg(1024, 2048), 1.0
    if name == "scan-hot10":
        return (lambda: bp.audit_workload(("scan-hot", 0, 1500))), None, 1.0  # type: ignore
    raise ValueError(f"unknown row {name!r}")


def run(name: str, variant: str, scale_step: float = 0.0) -> dict[str, float]:
    make, config, scale = _row(name)
    if config is None:  # an audit row: its 10 % capacity
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from benchmarks import bench_policy as bp

        from kvtier.blocks import cdiv
        from kvtier.sim import oracle_requests
        stream = list(oracle_requests(make(), 32))
        mb = max(cdiv(r.num_tokens, 32) for r in stream) + 16
        g, h = bp.capacities(stream, 32, mb, (0.10,))[0]
        config = CacheConfig(tokens_per_block=32, num_gpu_blocks=g, num_host_blocks=h,
                             eviction_policy="kvtier-predict-cost")
    policy = make_policy(variant)
    if getattr(policy, "mini_unit", None) == "session":
        policy.mini_sessions = {r.request_id: r.session_id  # type: ignore[attr-defined]
                                for r in make()}
    t0 = time.process_time()
    with hooked():
        report = simulate(make(), config, time_scale=scale * (1 + 0.0005 * scale_step),
                          policy=policy)
    out = {"hit_rate": report.token_hit_rate, "cpu_s": time.process_time() - t0}
    w = getattr(policy, "mini", None)
    if w is not None:
        out.update(lru_adm=w.num_lru_admissions, adm=w.num_admissions, sampled=w.num_sampled,
                   switches=w.num_switches, first=w.first_verdict,
                   mini_lru=w.tok_lru, mini_mine=w.tok_mine,
                   real_tok=report.token_hit_rate * report.num_prompt_tokens)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="agentic200")
    ap.add_argument("--variants", default="main,mini@1")
    ap.add_argument("--num-scales", type=int, default=1)
    args = ap.parse_args(argv)
    steps = [k - (args.num_scales - 1) / 2 for k in range(args.num_scales)]
    for name in args.rows.split(","):
        for variant in args.variants.split(","):
            hs = []
            extra = ""
            for s in steps:
                r = run(name, variant, s)
                hs.append(r["hit_rate"])
                if "adm" in r:
                    extra += (f" [LRU-order {r['lru_adm']}/{r['adm']}, sampled {r['sampled']},"
                              f" sw {r['switches']}, first {r['first']}, mini hits "
                              f"{r['mini_mine']}/{r['mini_lru']} real {r['real_tok']:.0f},"
                              f" cpu {r['cpu_s']:.1f}s]")
                else:
                    extra += f" [cpu {r['cpu_s']:.1f}s]"
            sd = statistics.stdev(hs) if len(hs) > 1 else 0.0
            print(f"{name:12s} {variant:14s} {statistics.mean(hs):.4f} (sd {sd:.4f})"
                  f" {' '.join(f'{h:.4f}' for h in hs)}{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    raise SystemExit(main())
