"""The cache's clock: the caller's time source, read so that its faults never reach the cache.

The cache reads the time in the middle of its operations (a release stamps the runs it
leaves cached, an eviction round ranks runs by age), after it has changed some state and
before it has changed the rest. A clock that raised there left a request half admitted or
half released (its claims counted, its path not), and a clock that answered ``None`` or
NaN did the same or made every age NaN, so retentions never ran out. ``CacheClock`` makes
every reading a finite number of seconds that never runs backwards: a reading that raises,
is not a finite real number (any ``numbers.Real`` but a bool, a NumPy scalar included), or
is below the last good one, gives the last good reading instead (0.0 before the first), is
counted, and is logged once. Time then stands still for the cache until the clock
recovers: ages stop growing, which costs eviction some order, never a block or a request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from numbers import Real

from kvtier.reprs import shown

logger = logging.getLogger(__name__)


class CallerCode:
    """How many calls into a caller's code (its clock, its eviction policy) a manager's
    operation is inside now: while any is, the manager refuses every call that changes it
    (RuntimeError), so a clock or policy that calls back into the manager it serves faults
    (a guarded fault: the last good time, the fallback policy) instead of changing the cache
    under the operation in flight, which broke its books (an AssertionError, blocks lost).

    ``num_operations`` counts the manager's operations in flight: inside one, an exception
    of the caller's code that is no ``Exception`` (a ``KeyboardInterrupt`` or
    ``SystemExit`` raised in the clock or a policy) is held (``defer``), that call answered
    as a fault's, and raised when the operation has completed (``raise_deferred``).

    NOTE: raised where it came, a Ctrl-C in the clock left an admission half done (a key
    space's user counted, the request not live) and every book check after it failed."""

    __slots__ = ("deferred", "depth", "num_operations")

    def __init__(self) -> None:
        self.depth = 0
        self.num_operations = 0
        self.deferred: BaseException | None = None

    def defer(self, exc: BaseException) -> bool:
        """Hold ``exc`` (the first held wins) until the operation in flight completes;
        False, holding nothing, where none is in flight: the caller raises it at once."""
        if not self.num_operations:
            return False
        if self.deferred is None:
            self.deferred = exc
        return True

    def raise_deferred(self) -> None:
        """Raise the exception held, once no operation is in flight."""
        exc = self.deferred
        if exc is not None and not self.num_operations:
            self.deferred = None
            raise exc


class CacheClock:
    """A caller's clock (seconds, any epoch), read safely: see the module docstring.
    ``calls`` counts the readings in progress (see :class:`CallerCode`)."""

    def __init__(self, clock: Callable[[], float], calls: CallerCode | None = None) -> None:
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {shown(clock)}")
        self._clock = clock
        self.calls = CallerCode() if calls is None else calls
        self.last = 0.0        # the last good reading
        self._started = False  # whether there was one
        self.num_faults = 0    # readings replaced by the last good one, in all
        self.last_fault = ""   # what the last of them was

    def __call__(self) -> float:
        calls = self.calls
        calls.depth += 1
        try:
            t = self._clock()
        except Exception as exc:  # any fault of the caller's clock
            return self._fault(f"raised {type(exc).__name__}: {exc}")
        except BaseException as exc:  # a Ctrl-C: raised once the operation completes
            if not calls.defer(exc):
                raise
            return self.last
        finally:
            calls.depth -= 1
        if t.__class__ is not float:
            # NOTE: any real number but a bool: a NumPy float32 or int64 (a simulated clock
            # kept in an array) was a fault, and the cache's time stood still for good.
            if isinstance(t, bool) or not isinstance(t, Real):
                return self._fault(f"returned {shown(t)}, not a number of seconds")
            try:
                t = float(t)
            except OverflowError:
                return self._fault(f"returned {shown(t)}, too large for seconds")
            except Exception as exc:  # a number type of the caller's whose float() raises
                return self._fault(f"returned {shown(t)}, whose float() raised "
                                   f"{type(exc).__name__}: {exc}")
        if not math.isfinite(t):
            return self._fault(f"returned {shown(t)}")
        if t < self.last and self._started:
            return self._fault(f"went back from {shown(self.last)} to {shown(t)}")
        self.last = t
        self._started = True
        return t

    def _fault(self, what: str) -> float:
        if not self.num_faults:
            logger.warning("kvtier: the cache's clock %s; the last good time, %r, stands "
                           "until it recovers (logged once; CacheClock.num_faults counts)",
                           what, self.last)
        self.num_faults += 1
        self.last_fault = what
        return self.last
