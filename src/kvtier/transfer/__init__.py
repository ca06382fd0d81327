"""Transfer plans and the engines that execute them."""

from kvtier.transfer.engine import RecordingTransferEngine, TransferEngine
from kvtier.transfer.plan import OpKind, TransferOp, TransferPlan

__all__ = ["OpKind", "RecordingTransferEngine", "TransferEngine", "TransferOp", "TransferPlan"]
