"""A piece of a shuffle buffer held in memory: its rows' counts in the narrowest dtypes they fit.

The loader holds whole pieces (a buffer's cells) while it cuts minibatches from them, so a piece's entries
are the largest thing in flight. Kept as scipy CSR they cost 8 bytes each (float32 value, int32 column). A
:class:`CompactPiece` keeps the values as ``uint16`` when the store declares ``uint16`` counts (every store
``convert`` writes with counts below 65,536) and the columns as ``uint16`` when the store has at most 65,536
genes: 4 bytes an entry, half the memory. Minibatches come out as ordinary float32/int32 CSR (:meth:`take`).

When the store's row pointers are known (Zarr), a piece is allocated once at its exact size and the reader
threads write their blocks straight into it (:meth:`CompactPiece.allocate`, :meth:`CompactPiece.fill`): beside
the piece, each thread holds only the float32 block of its current ``read_range`` (at most two loader blocks of
rows). Otherwise (TileDB, views) the blocks are converted as they arrive and joined once
(:meth:`CompactPiece.join`), which briefly holds the piece twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["EntryDtypes", "CompactPiece", "piece_bytes"]

_U16_MAX = np.iinfo(np.uint16).max


@dataclass(frozen=True)
class EntryDtypes:
    """How a piece stores its entries' values and column indices."""

    values: np.dtype
    indices: np.dtype

    @classmethod
    def for_store(cls, store: Any) -> EntryDtypes:
        """uint16 values for stores that declare uint16 counts (``store.count_dtype``), else float32; uint16
        columns for at most 65,536 genes, else int32."""
        declared = getattr(store, "count_dtype", None)
        values = np.dtype(np.uint16) if declared is not None and np.dtype(declared) == np.uint16 else np.dtype("f4")
        indices = np.dtype(np.uint16) if int(store.n_vars) <= _U16_MAX + 1 else np.dtype(np.int32)
        return cls(values, indices)

    @property
    def entry_bytes(self) -> int:
        return self.values.itemsize + self.indices.itemsize


def piece_bytes(nnz: int, n_rows: int, dtypes: EntryDtypes) -> int:
    """Bytes a piece of ``n_rows`` rows and ``nnz`` entries holds: its entries, its int64 row pointers and the
    two row-number arrays the loader keeps with it (visiting order and sorted)."""
    return dtypes.entry_bytes * nnz + 24 * n_rows


class CompactPiece:
    """Rows of counts as CSR arrays in :class:`EntryDtypes` (``indptr`` int64 of ``n_rows + 1``)."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n_vars: int) -> None:
        self.indptr, self.indices, self.values, self.n_vars = indptr, indices, values, int(n_vars)

    @property
    def n_rows(self) -> int:
        return self.indptr.size - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @classmethod
    def allocate(cls, row_nnz: np.ndarray, n_vars: int, dtypes: EntryDtypes) -> CompactPiece:
        """An empty piece whose row ``i`` will hold ``row_nnz[i]`` entries (filled by :meth:`fill`)."""
        indptr = np.zeros(row_nnz.size + 1, dtype=np.int64)
        np.cumsum(row_nnz, out=indptr[1:])
        nnz = int(indptr[-1])
        # zeros, not empty: calloc'd pages cost nothing until the readers write them, and no row is ever garbage
        return cls(indptr, np.zeros(nnz, dtype=dtypes.indices), np.zeros(nnz, dtype=dtypes.values), n_vars)

    def fill(self, first_row: int, block: sp.csr_matrix) -> None:
        """Write ``block`` as rows ``first_row, first_row + 1, ...``; its row lengths must match the layout.

        Raises ValueError when they do not (the store changed since its row pointers were read)."""
        layout = self.indptr[first_row : first_row + block.shape[0] + 1]
        lo, hi = int(layout[0]), int(layout[-1])
        if hi - lo != block.nnz or not np.array_equal(np.diff(block.indptr), np.diff(layout)):
            raise ValueError(
                f"rows {first_row}..{first_row + block.shape[0]} of the piece hold {block.nnz} counts, "
                f"the store's row pointers say {hi - lo}"
            )
        self.values[lo:hi] = _fitting(block.data, self.values.dtype)  # narrowing: checked to fit
        self.indices[lo:hi] = block.indices  # columns: below n_vars, which chose the dtype

    @classmethod
    def convert(cls, block: sp.csr_matrix, dtypes: EntryDtypes) -> CompactPiece:
        """One CSR block in ``dtypes`` (a copy)."""
        values = _fitting(block.data, dtypes.values).astype(dtypes.values)
        indices = block.indices.astype(dtypes.indices)
        return cls(np.asarray(block.indptr, dtype=np.int64), indices, values, block.shape[1])

    @classmethod
    def join(cls, parts: list[CompactPiece], n_vars: int, dtypes: EntryDtypes) -> CompactPiece:
        """Parts stacked row-wise (one copy; parts made by :meth:`convert`)."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls(np.zeros(1, dtype=np.int64), np.empty(0, dtypes.indices), np.empty(0, dtypes.values), n_vars)
        offsets = np.cumsum([0] + [p.nnz for p in parts[:-1]])
        indptr = np.concatenate([parts[0].indptr[:1]] + [p.indptr[1:] + o for p, o in zip(parts, offsets, strict=True)])
        indices = np.concatenate([p.indices for p in parts])
        values = np.concatenate([p.values for p in parts])
        return cls(indptr, indices, values, n_vars)

    def nbytes(self) -> int:
        """Bytes of the arrays plus the two row-number arrays the loader keeps (as :func:`piece_bytes`)."""
        return self.indices.nbytes + self.values.nbytes + 24 * self.n_rows

    def take(self, idx: np.ndarray) -> sp.csr_matrix:
        """Rows ``idx`` (local row numbers, any order) as a float32 CSR with int32 columns.

        Each row is one contiguous slice: copying the slices is ~1.7x faster than gathering entry by entry (a
        piece is tens of MB, so the rows are far apart in memory)."""
        starts = self.indptr[idx]
        stops = self.indptr[idx + 1]
        indptr = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(stops - starts, out=indptr[1:])
        bounds = list(zip(starts.tolist(), stops.tolist(), strict=True))
        if bounds:
            values = np.concatenate([self.values[a:b] for a, b in bounds]).astype(np.float32, copy=False)
            indices = np.concatenate([self.indices[a:b] for a, b in bounds]).astype(np.int32, copy=False)
        else:
            values, indices = np.empty(0, np.float32), np.empty(0, np.int32)
        if indptr[-1] < 2**31:  # int32 row pointers like the indices: scipy then keeps the arrays as they are
            indptr = indptr.astype(np.int32)
        return sp.csr_matrix((values, indices, indptr), shape=(idx.size, self.n_vars), copy=False)


def _fitting(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values``, after checking they fit a narrower integer ``dtype`` (a store whose metadata says uint16
    counts while it holds larger ones must not wrap around silently)."""
    if dtype.kind == "u" and values.size and values.dtype != dtype:
        top = values.max()
        if top > np.iinfo(dtype).max or values.min() < 0:
            raise ValueError(f"a count of {top:g} does not fit the store's declared {dtype} counts")
    return values
