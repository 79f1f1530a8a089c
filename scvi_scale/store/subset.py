"""Read-time gene selection: a view of a count store restricted to some of its columns.

A :class:`GeneSubset` reads whole rows from the store and keeps the chosen columns of each CSR block, so
training on a store's highly variable genes needs no second, written store. The cost is the full rows' read
and decode plus one pass over their entries: on a 100k x 2,000 synthetic Zarr store (12 % non-zero), keeping
1,000 genes costs 12 ms on a 16,384-row block that takes 68 ms to read (~85 % of the full store's rows/s),
0.5 ms on a 1,024-row block (5.6 ms), and nothing measurable next to scattered-row minibatch reads. A
selection out of column order costs ~4x more (each row's columns are re-sorted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.store.memory import StoreReads

__all__ = ["GeneSubset"]


class GeneSubset(StoreReads):
    """The columns ``gene_idx`` of ``store``, in that order, with the store's reading interface.

    Parameters
    ----------
    store
        Any count store (``n_obs``, ``n_vars``, ``var_names``, ``obs``, ``source``, ``read_range``,
        ``read_rows``).
    gene_idx
        Distinct column indices of ``store``; the view's column ``j`` is the store's ``gene_idx[j]``.

    Notes
    -----
    Batch codes and the library-size prior come from :class:`~scvi_scale.store.memory.StoreReads`: the prior
    is computed over the selected genes (the counts the model sees), reading ``read_range`` blocks.
    """

    def __init__(self, store: Any, gene_idx: Sequence[int] | np.ndarray) -> None:
        idx = np.asarray(gene_idx, dtype=np.int64).ravel()
        n_store = int(store.n_vars)
        if idx.size and (idx.min() < 0 or idx.max() >= n_store):
            raise IndexError(f"gene index out of range [0, {n_store})")
        if np.unique(idx).size != idx.size:
            raise ValueError("gene_idx has repeated columns")
        self.store = store
        self.gene_idx = idx
        self.source: str = store.source
        self.n_obs: int = int(store.n_obs)
        self.n_vars: int = int(idx.size)
        self.var_names: np.ndarray = np.asarray(store.var_names)[idx]
        # store column -> view column (-1: dropped), and which store columns are kept
        self._column_map = np.full(n_store, -1, dtype=np.int32 if self.n_vars < 2**31 else np.int64)
        self._column_map[idx] = np.arange(idx.size)
        self._keep_g = self._column_map >= 0
        self._sorted = bool(np.all(np.diff(idx) > 0))

    def __repr__(self) -> str:
        return f"GeneSubset({self.store!r}, n_vars={self.n_vars})"

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "gene_idx": self.gene_idx}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store"], state["gene_idx"])  # type: ignore[misc]

    @property
    def obs(self) -> pd.DataFrame:  # type: ignore[override]
        return self.store.obs

    @property
    def count_dtype(self) -> np.dtype | None:  # type: ignore[override]
        return getattr(self.store, "count_dtype", None)

    def _select(self, x: sp.csr_matrix) -> sp.csr_matrix:
        # integer positions of the kept entries and ndarray.take everywhere: ~2x faster than boolean masks or
        # fancy indexing, and faster than scipy's x[:, idx] (12 vs 19 ms on a 4M-entry block)
        pos = np.flatnonzero(self._keep_g.take(x.indices))
        indptr = np.searchsorted(pos, x.indptr)
        columns = self._column_map.take(x.indices.take(pos))
        out = sp.csr_matrix((x.data.take(pos), columns, indptr), shape=(x.shape[0], self.n_vars), copy=False)
        if not self._sorted:  # a reordered selection leaves each row's columns out of order
            out.sort_indices()
        return out

    def read_range(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` of the selected columns, as CSR float32."""
        return self._select(self.store.read_range(start, stop))

    def read_rows(self, idx: np.ndarray) -> sp.csr_matrix:
        """Rows ``idx`` (any order, repeats allowed) of the selected columns, as CSR float32, in the order given."""
        return self._select(self.store.read_rows(idx))
