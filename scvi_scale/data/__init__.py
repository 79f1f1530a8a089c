"""Minibatches for the training loop: the ``Batch`` contract, splits and loaders."""

from __future__ import annotations

from scvi_scale.data.batch import Batch
from scvi_scale.data.memory import MemoryLoader, train_val_split

__all__ = ["Batch", "MemoryLoader", "train_val_split"]
