"""Minibatches for the training loop: the ``Batch`` contract, splits, the block sampler and the loaders."""

from __future__ import annotations

from scvi_scale.data.batch import Batch
from scvi_scale.data.memory import MemoryLoader, train_val_split
from scvi_scale.data.prefetch import StoreLoader, StoreReadError, auto_block_size
from scvi_scale.data.sampler import BlockSampler

__all__ = [
    "Batch",
    "BlockSampler",
    "MemoryLoader",
    "StoreLoader",
    "StoreReadError",
    "auto_block_size",
    "train_val_split",
]
