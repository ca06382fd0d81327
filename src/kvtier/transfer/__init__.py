"""Transfer plans and the engines that execute them (torch: ``kvtier.transfer.torch_engine``)."""

from kvtier.transfer.engine import RecordingTransferEngine, TransferEngine, TransferError
from kvtier.transfer.plan import OpKind, TransferOp, TransferPlan

__all__ = [
    "OpKind",
    "RecordingTransferEngine",
    "TransferEngine",
    "TransferError",
    "TransferOp",
    "TransferPlan",
]
