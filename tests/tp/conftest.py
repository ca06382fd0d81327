"""Tensor-parallel tests need torch (the ``torch`` extra); each module skips itself without it."""

from __future__ import annotations

import contextlib
import warnings

with warnings.catch_warnings(), contextlib.suppress(ImportError):
    # NOTE: a torch wheel without numpy warns at import, and pytest makes warnings errors.
    warnings.simplefilter("ignore")
    import torch

    # NOTE: tiny tensors on a small shared CI machine: OpenMP threads only contend.
    torch.set_num_threads(1)
