"""Minibatches from a CSR matrix held in memory, and the train/validation split.

The split and the per-epoch order follow scvi-tools' conventions where they matter (90/10 split from a
seeded permutation; a reshuffled order every epoch; a last, smaller minibatch), with the order drawn from
``SeedSequence([seed, epoch])`` so that any restart replays the same batches.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch

from scvi_scale.data.batch import Batch

STATE_VERSION = 1


class RowReader(Protocol):
    """A count store the loader can read minibatches from (``MemoryStore``, ``ZarrStore``, ``TileDBStore``)."""

    n_obs: int

    def read_rows(self, idx: np.ndarray) -> sp.csr_matrix: ...


def _canonical_csr(x: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """CSR float32 with no stored zeros and no duplicates, so ``Batch.nonzero`` lists each count once."""
    x = sp.csr_matrix(x, dtype=np.float32) if not isinstance(x, sp.csr_matrix) or x.dtype != np.float32 else x
    if not x.has_canonical_format or (x.nnz and not np.all(x.data)):
        x = x.copy()
        x.sum_duplicates()
        x.eliminate_zeros()
    return x


def train_val_split(
    n_obs: int, train_size: float = 0.9, seed: int = 0, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n_obs)`` into (train, validation) indices, as scvi-tools' DataSplitter does.

    ``n_train = ceil(train_size * n_obs)``; the permutation comes from ``RandomState(seed)``; the first
    ``n_val`` permuted cells are the validation set. When the training set would end in a minibatch of 1 or
    2 cells (which breaks BatchNorm), those cells move to validation (scvi-tools PR #3036).
    """
    n_train = math.ceil(train_size * n_obs)
    n_val = n_obs - n_train
    if n_train % batch_size in (1, 2) and n_train > batch_size:
        moved = n_train % batch_size
        n_train -= moved
        n_val += moved
    perm = np.random.RandomState(seed).permutation(n_obs)
    dtype = np.int32 if n_obs < 2**31 else np.int64  # row numbers are kept for every cell of an atlas
    return np.sort(perm[n_val : n_val + n_train]).astype(dtype), np.sort(perm[:n_val]).astype(dtype)


class MemoryLoader:
    """Minibatches over chosen rows of an in-memory CSR count matrix, or of a store read row set by row set.

    Parameters
    ----------
    x
        Counts (cells x genes), scipy sparse or dense; or a store with ``n_obs`` and ``read_rows`` (each
        minibatch is then read from it: simple and bounded in memory, but scattered rows are slow to read from
        chunked stores, which the block-shuffling loader of a later release addresses).
    batch_codes
        Integer batch code of every row of ``x``.
    rows
        The rows this loader serves (e.g. the training split).
    batch_size
        Cells per minibatch; the last one may be smaller.
    shuffle
        Reshuffle every epoch (training) or keep row order (validation, inference).
    seed
        Root seed; epoch ``e`` uses ``SeedSequence([seed, e])``.
    """

    def __init__(
        self,
        x: sp.spmatrix | np.ndarray | RowReader,
        batch_codes: np.ndarray,
        rows: np.ndarray | None = None,
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if hasattr(x, "read_rows") and not sp.issparse(x):
            # a store: each minibatch reads its rows through read_rows
            self.x, self._reader, n_rows = None, x, int(x.n_obs)
        else:
            self.x = _canonical_csr(x)
            self._reader, n_rows = None, self.x.shape[0]
        self.batch_codes = np.asarray(batch_codes)  # kept in its own (small) dtype; int64 per minibatch
        self.rows = np.arange(n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.start_step = 0  # minibatches of the current epoch already consumed (for resume)

    @property
    def n_obs(self) -> int:
        return int(self.rows.shape[0])

    def __len__(self) -> int:
        return math.ceil(self.n_obs / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_step = 0
        self.epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The rows in the order epoch ``epoch`` visits them."""
        if not self.shuffle:
            return self.rows
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        return self.rows[rng.permutation(self.n_obs)]

    def __iter__(self):
        order = self.order(self.epoch)
        start, self.start_step = self.start_step, 0
        for step in range(start, len(self)):
            rows = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield self._make(rows)

    def _make(self, rows: np.ndarray) -> Batch:
        if self._reader is None:
            sub = self.x[rows]
        else:  # stores group the requested rows into contiguous runs themselves and return them in order
            sub = _canonical_csr(self._reader.read_rows(rows))
        x_ng = torch.from_numpy(sub.toarray())
        nz_rows = np.repeat(np.arange(len(rows), dtype=np.int64), np.diff(sub.indptr))
        nonzero = (torch.from_numpy(nz_rows), torch.from_numpy(sub.indices.astype(np.int64)))
        return Batch(x_ng, torch.from_numpy(self.batch_codes[rows].astype(np.int64)), rows, nonzero)

    def state_dict(self, steps_done: int) -> dict:
        """State after ``steps_done`` minibatches of the current epoch (what the loop records)."""
        return {
            "version": STATE_VERSION,
            "kind": "memory",
            "epoch": self.epoch,
            "step": int(steps_done),
            "seed": self.seed,
            "n_obs": self.n_obs,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != "memory":
            raise ValueError(f"loader state {state.get('kind')} v{state.get('version')} does not fit MemoryLoader")
        if state["n_obs"] != self.n_obs or state["batch_size"] != self.batch_size or state["seed"] != self.seed:
            raise ValueError(
                "cannot resume: the checkpoint was taken with a different split, batch size or seed "
                f"(n_obs {state['n_obs']} vs {self.n_obs}, batch_size {state['batch_size']} vs {self.batch_size})"
            )
        self.epoch = int(state["epoch"])
        self.start_step = int(state["step"])
