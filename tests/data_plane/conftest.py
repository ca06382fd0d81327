"""Data-plane tests need torch (the ``torch`` extra); each module skips itself without it."""

from __future__ import annotations

import contextlib
import warnings

with warnings.catch_warnings(), contextlib.suppress(ImportError):
    # NOTE: a torch wheel without numpy warns at import, and pytest makes warnings errors:
    # import it once here, quietly, before the modules' importorskip.
    warnings.simplefilter("ignore")
    import torch

    # NOTE: the tensors here are tiny; on a small shared CI machine OpenMP threads only
    # contend (copies of a few KiB took tens of ms with 2 threads on 2 busy cores).
    torch.set_num_threads(1)
