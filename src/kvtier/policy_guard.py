"""The guard around a caller's eviction policy: a policy's fault never reaches the cache.

The cache calls its policy from inside its operations (``key`` and ``rank`` in the middle
of a pop, of an eviction round, of an admission's second phase, of a release), after it has
changed some state and before it has changed the rest. A policy that raised there left
claims counted on half-admitted paths, runs unfiled and slots lost; one that answered NaN
or a key of another shape broke the heaps' order. ``PolicyGuard`` has its inner policy's
shape (but for a queue field, below) and passes every call on; the first call that raises,
or answers something the cache cannot use, is a *fault*: logged once at ERROR (with the
traceback), counted, and from then on every call is answered by the fallback, priority
first, then least recently released (a learner's calls learn nothing), so the operation in
flight completes and the cache keeps serving in a known order.

The guard files the inner's keys (and ranks) behind a 0 and the fallback's behind a 1 (so
a guard has one queue field more than a policy with queues): every key the policy filed
sorts before every fallback key, whatever its values (a run never needed again may key at
-inf), and no fallback queue is one of the policy's. The heaps file keys lazily, so at the
first pop after a fault every entry filed under the policy's keys reaches its heap's head
(or its queue empties) and is re-filed under the fallback's key before any run filed under
the fallback is taken. From that pop on the order is exactly the fallback's. (A compaction
of a heap before that pop meets those entries too: it must re-file them, not drop them.)

Policies of kvtier's own classes (``kvtier.policies``, the simulator's ``Clairvoyant``) are
not wrapped: they are tested with the cache, and the guard's checks would cost every pop on
the hot path.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

from kvtier.clock import CallerCode
from kvtier.config import CacheConfig
from kvtier.eviction import EvictionPolicy, effective_priority
from kvtier.pool import Key
from kvtier.radix import Node
from kvtier.reprs import shown
from kvtier.witness import LruWitness

logger = logging.getLogger(__name__)

# What the cache calls of a policy: an instance of a class of kvtier's own with none of
# these replaced on the instance is used as it is.
_CALLED = frozenset({"key", "rank", "within", "rank_version", "bind", "reuse_class",
                     "record", "forget", "recall"})


def guard_policy(policy: EvictionPolicy) -> EvictionPolicy:
    """``policy`` itself if its class is kvtier's own (``kvtier.policies``, the simulator's
    ``Clairvoyant``), else a :class:`PolicyGuard` of its shape around it. Raises ValueError,
    naming the attribute, where ``name``, ``ranks_soft_claims`` or ``num_queue_fields`` is
    unusable (they shape the pools)."""
    module = getattr(type(policy), "__module__", None) or ""
    if (module.partition(".")[0] == "kvtier"
            and not _CALLED & getattr(policy, "__dict__", {}).keys()):
        return policy
    if _has(policy, "rank_version"):
        return VersionedPolicyGuard(policy)
    return PolicyGuard(policy)


def _has(policy: object, attr: str) -> bool:
    """Whether ``policy`` has ``attr``, found without reading it where it can be (a
    property is not called: its first reading is the guard's); one that raises on reading
    has it (and faults when read)."""
    try:
        inspect.getattr_static(policy, attr)
        return True
    except AttributeError:
        pass
    try:
        return hasattr(policy, attr)  # one a ``__getattr__`` gives
    except Exception:
        return True


# ``ReuseLearner``'s members: a policy with all of them is a learner (as ``isinstance``
# says, without reading a property).
_LEARNER = ("witness", "bind", "reuse_class", "record", "forget", "recall")


class PolicyFault(ValueError):
    """A policy's answer the cache cannot use (the fault, where no call raised)."""


def _real(x: object, method: str) -> float:
    """``x`` as a plain int or float that is a number (infinities are: a policy may rank
    a run that is never needed again at -inf). Raises PolicyFault."""
    if type(x) is int:
        return x
    if type(x) is float:
        if x == x:
            return x
    elif isinstance(x, Integral):
        return int(x)
    elif isinstance(x, Real):
        f = float(x)
        if f == f:
            return f
    raise PolicyFault(f"{method} returned {shown(x)} where a real number (not NaN) belongs")


def _checked_key(key: object, min_fields: int, method: str) -> Key:
    """``key``, of at least ``min_fields`` real numbers, as the guard files it: a plain
    tuple of ints and floats (the heaps compare nothing of the policy's) behind a 0, which
    sorts it before every fallback key. Raises PolicyFault."""
    if not isinstance(key, tuple) or len(key) < min_fields:
        raise PolicyFault(f"{method} returned {shown(key)}, not a tuple of at least {min_fields} "
                          f"real numbers")
    fields: list[float] = [0]
    try:
        for x in key:
            fields.append(_real(x, method))
    except PolicyFault:
        raise PolicyFault(f"{method} returned {shown(key)}, not a tuple of real numbers "
                          f"(none NaN)") from None
    return tuple(fields)


class PolicyGuard:
    """A caller's eviction policy behind a guard (see the module docstring). It has the
    inner policy's shape: its ``name`` and ``ranks_soft_claims``, its queues (one field
    more, the 0 or 1 in front); ``within`` and ``rank_version`` only if the inner has them;
    the learner's methods and ``witness`` only if the inner is a ``ReuseLearner``.
    ``num_faults`` (0 or 1: after its fault the inner policy is called no more) and
    ``first_fault`` say whether it faulted."""

    # Instance attributes, set only where the inner policy has them (its shape):
    within: Any  # (node, now) -> float
    witness: LruWitness | None  # and the learner's methods, where it is a ReuseLearner
    bind: Any
    reuse_class: Any
    record: Any
    forget: Any
    recall: Any

    def __init__(self, policy: EvictionPolicy) -> None:
        self.inner = policy
        name = _static(policy, "name")
        if not isinstance(name, str):
            raise ValueError(f"policy.name must be a str, got {shown(name)}")
        ranks = _static(policy, "ranks_soft_claims")
        if not isinstance(ranks, bool):
            raise ValueError(f"policy.ranks_soft_claims must be a bool, got {shown(ranks)}")
        nq = _static(policy, "num_queue_fields")
        if isinstance(nq, bool) or not isinstance(nq, int) or nq < 0:
            raise ValueError(f"policy.num_queue_fields must be an int >= 0, got {shown(nq)}")
        self.name: str = name
        self.ranks_soft_claims: bool = ranks
        # Every key behind a 0 (the inner's) or a 1 (the fallback's): one queue field more.
        self.num_queue_fields: int = nq + 1 if nq else 0
        self.num_faults = 0
        self.first_fault: Exception | None = None
        self._fallen = False
        # Called once a fault turns the keys to the fallback's: the cache's evictor, whose
        # pools then check every queue head again (``Evictor.changed``).
        self.on_fault: Callable[[], None] | None = None
        # The inner's calls in progress: the manager shares its own (``clock.CallerCode``).
        self.calls = CallerCode()
        self._min_key_fields = nq + 1  # a queue and an order in it
        # The fallback's key: (1, priority, 0 ... 0, last_used), its first
        # ``num_queue_fields`` fields its queue (one per priority).
        self._pad = (0,) * max(0, self.num_queue_fields - 2)
        self._key = policy.key
        self._rank = policy.rank
        if _has(policy, "within"):
            self.within = self._guarded_within
        if all(_has(policy, attr) for attr in _LEARNER):
            self.witness = None  # the inner's, once bound
            self.bind = self._bind
            self.reuse_class = self._reuse_class
            self.record = self._record
            self.forget = self._forget
            self.recall = self._recall

    @property
    def faulted(self) -> bool:
        """Whether the fallback answers now. Pure."""
        return self._fallen

    def _fault(self, method: str, exc: Exception) -> None:
        """The inner policy faulted in ``method``: log it once, count it, fall back."""
        self._fallen = True
        self.num_faults += 1
        self.first_fault = exc
        # NOTE: every key changes at once (the fallback's, behind a 1): within an eviction
        # round the pools trusted a queue head found live before (``pop_candidate``'s
        # ``check_version``), so a run filed under both keys was taken twice, the second
        # time from the host as a GPU victim (a GPU parent's count of GPU children went
        # to -1; test_policy_faults, ARC faulting in ``forget`` mid-round).
        if self.on_fault is not None:
            self.on_fault()
        logger.error("kvtier: eviction policy %r faulted in %s (%s: %s); the cache evicts "
                     "by priority, then least recently released, from now on (logged once; "
                     "KVCacheManager.num_policy_faults counts)", self.name, method,
                     type(exc).__name__, exc, exc_info=(type(exc), exc, exc.__traceback__))

    def _interrupted(self, exc: BaseException) -> None:
        """The inner policy raised ``exc``, no ``Exception`` (a Ctrl-C in the middle of
        it): inside a manager's operation it is held until the operation completes
        (``CallerCode.defer``), and this one call is answered by the fallback (no fault:
        the inner policy answers the next); anywhere else it goes on at once."""
        if not self.calls.defer(exc):
            raise exc

    def fallback_key(self, node: Node, now: float, default_priority: int) -> Key:
        """The fallback's key (and rank) of ``node``: after every key the inner gave (those
        start with 0), then priority, then least recently released. Pure."""
        return (1, effective_priority(node, now, default_priority), *self._pad,
                node.last_used)

    def key(self, node: Node, now: float, default_priority: int) -> Key:
        if not self._fallen:
            self.calls.depth += 1
            try:
                return _checked_key(self._key(node, now, default_priority),
                                    self._min_key_fields, "key")
            except Exception as exc:
                self._fault("key", exc)
            except BaseException as exc:
                self._interrupted(exc)
            finally:
                self.calls.depth -= 1
        return self.fallback_key(node, now, default_priority)

    def rank(self, node: Node, now: float, default_priority: int) -> Key:
        if not self._fallen:
            self.calls.depth += 1
            try:
                return _checked_key(self._rank(node, now, default_priority), 1, "rank")
            except Exception as exc:
                self._fault("rank", exc)
            except BaseException as exc:
                self._interrupted(exc)
            finally:
                self.calls.depth -= 1
        return self.fallback_key(node, now, default_priority)

    def _guarded_within(self, node: Node, now: float) -> float:
        if not self._fallen:
            self.calls.depth += 1
            try:
                return _real(self.inner.within(node, now), "within")  # type: ignore[attr-defined]
            except Exception as exc:
                self._fault("within", exc)
            except BaseException as exc:
                self._interrupted(exc)
            finally:
                self.calls.depth -= 1
        return 0.0  # every run alike: the winning queue gives its head

    # ---- ReuseLearner, where the inner is one ------------------------------------------

    def _bind(self, config: CacheConfig) -> None:
        if self._fallen:
            return
        learner: Any = self.inner
        self.calls.depth += 1
        try:
            learner.bind(config)
            witness = learner.witness
            if witness is not None and not isinstance(witness, LruWitness):
                raise PolicyFault(f"witness is {shown(witness)}, not an LruWitness or None")
        except Exception as exc:
            self._fault("bind", exc)
            return
        finally:
            self.calls.depth -= 1
        self.witness = None if witness is None else _GuardedWitness(witness, self)

    def _reuse_class(self, node: Node, turn: int, role: int) -> int:
        if not self._fallen:
            self.calls.depth += 1
            try:
                cls = self.inner.reuse_class(node, turn, role)  # type: ignore[attr-defined]
                if isinstance(cls, Integral) and not isinstance(cls, bool):
                    return int(cls)
                raise PolicyFault(f"reuse_class returned {shown(cls)}, not an int")
            except Exception as exc:
                self._fault("reuse_class", exc)
            except BaseException as exc:
                self._interrupted(exc)
            finally:
                self.calls.depth -= 1
        return 0

    def _record(self, reuse_class: int, age_s: float, num_blocks: int, reused: bool) -> None:
        if not self._fallen:
            self.calls.depth += 1
            try:
                self.inner.record(reuse_class, age_s, num_blocks, reused)  # type: ignore[attr-defined]
            except Exception as exc:
                self._fault("record", exc)
            except BaseException as exc:
                self._interrupted(exc)
            finally:
                self.calls.depth -= 1

    def _forget(self, ghost_key: object, node_uid: int, reuse_class: int, released_s: float,
                num_blocks: int, now: float, released_tick: int = 0) -> None:
        if not self._fallen:
            self.calls.depth += 1
            try:
                self.inner.forget(ghost_key, node_uid, reuse_class,  # type: ignore[attr-defined]
                                  released_s, num_blocks, now, released_tick)
            except Exception as exc:
                self._fault("forget", exc)
            except BaseException as exc:
                self._interrupted(exc)
            finally:
                self.calls.depth -= 1

    def _recall(self, ghost_key: object, now: float) -> tuple[int, int] | None:
        if not self._fallen:
            self.calls.depth += 1
            try:
                found = self.inner.recall(ghost_key, now)  # type: ignore[attr-defined]
                if found is None:
                    return None
                # The cache walks on past the recalled run's blocks: at least one.
                if (isinstance(found, tuple) and len(found) == 2
                        and all(isinstance(x, Integral) and not isinstance(x, bool)
                                for x in found) and found[1] >= 1):
                    return int(found[0]), int(found[1])
                raise PolicyFault(f"recall returned {shown(found)}, not None or (uid, blocks >= 1)")
            except Exception as exc:
                self._fault("recall", exc)
            except BaseException as exc:
                self._interrupted(exc)
            finally:
                self.calls.depth -= 1
        return None


class VersionedPolicyGuard(PolicyGuard):
    """A :class:`PolicyGuard` of a policy with a ``rank_version``."""

    def __init__(self, policy: EvictionPolicy) -> None:
        super().__init__(policy)
        self._version: object = None   # the inner's last version
        self._num_versions = 0         # versions seen: what the pools compare

    @property
    def rank_version(self) -> int | None:
        """A count of the inner's ``rank_version`` changes (None where it says None): the
        pools compare only ints, never an object of the policy's."""
        if not self._fallen:
            self.calls.depth += 1
            try:
                version = self.inner.rank_version  # type: ignore[attr-defined]
                if version is None:
                    return None
                if bool(version != self._version):
                    self._version = version
                    self._num_versions += 1
                return self._num_versions
            except Exception as exc:
                self._fault("rank_version", exc)
            except BaseException as exc:
                self._interrupted(exc)
                return None  # no rank kept across the interrupted call
            finally:
                self.calls.depth -= 1
        # One version for the fallback, which no rank kept before the fault holds.
        return self._num_versions + 1


def _static(policy: object, attr: str) -> object:
    """An attribute the cache reads once, when it is built. Raises ValueError."""
    try:
        return getattr(policy, attr)
    except Exception as exc:
        raise ValueError(f"policy.{attr} could not be read: {type(exc).__name__}: "
                         f"{exc}") from exc


class _GuardedWitness(LruWitness):
    """A learner's witness, called by the cache through its guard: a witness that raises
    faults the policy, and after the fault it is told nothing more (the fallback reads no
    witness).

    NOTE: a subclass only so it types as the witness it stands for; it keeps none of an
    ``LruWitness``'s state (``__init__`` does not call the base's): every method the cache
    may call is passed on (the inner learner holds the witness itself)."""

    def __init__(self, witness: LruWitness, guard: PolicyGuard) -> None:
        self._witness = witness
        self._guard = guard

    def _call(self, method: str, *args: Any) -> object:
        guard = self._guard
        if guard.faulted:
            return None
        guard.calls.depth += 1
        try:
            result: object = getattr(self._witness, method)(*args)
        except Exception as exc:
            guard._fault(f"witness.{method}", exc)
            return None
        except BaseException as exc:
            guard._interrupted(exc)
            return None
        finally:
            guard.calls.depth -= 1
        return result

    def clear(self) -> None:
        self._call("clear")

    def released(self, old_tick: int, new_tick: int, num_blocks: int) -> None:
        self._call("released", old_tick, new_tick, num_blocks)

    def admitted(self, num_prompt_blocks: int, runs: list[tuple[int, int]], room: int) -> None:
        self._call("admitted", num_prompt_blocks, runs, room)

    def recalled(self, tick: int, num_blocks: int) -> None:
        self._call("recalled", tick, num_blocks)

    def settle(self, room: int) -> None:
        self._call("settle", room)

    def holds(self, tick: int) -> bool:
        return self._call("holds", tick) is True
