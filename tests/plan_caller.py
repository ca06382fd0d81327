"""A manager driven as a serving loop drives it: after every call, the call's copies (its
``take_plan()``, or what ``end_step`` returns) go to a transfer engine, once."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from kvtier import KVCacheManager, TransferEngine, TransferPlan
from kvtier.transfer.plan import PlanColumns

# Covariant: a caller over a RecordingTransferEngine is a caller over a TransferEngine.
EngineT = TypeVar("EngineT", bound=TransferEngine, covariant=True)


class PlanCaller(Generic[EngineT]):
    """Forwards every attribute to ``manager``; after each method call, submits the plan
    of copies it left (if any) to ``engine``, so the engine sees one plan per call. Every
    plan's columns must describe exactly its ops."""

    def __init__(self, manager: KVCacheManager, engine: EngineT) -> None:
        self.manager = manager
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.manager, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                result = attr(*args, **kwargs)
            finally:
                plan = self.manager.take_plan()
                if plan.ops:
                    assert plan.columns == PlanColumns.of(plan.ops), plan
                    self.engine.submit(plan)
            if isinstance(result, TransferPlan) and result.ops:
                assert result.columns == PlanColumns.of(result.ops), result
                self.engine.submit(result)
            return result

        return call
