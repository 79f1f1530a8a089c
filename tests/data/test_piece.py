"""Pieces held by the loader: narrow dtypes where the store allows them, exact rows back, and a read-ahead of one
piece so the loader's memory does not grow with the number of pieces an epoch has."""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scvi_scale.data.piece import CompactPiece, EntryDtypes, piece_bytes
from scvi_scale.data.pipeline import QUEUE_BATCHES
from scvi_scale.data.prefetch import StoreLoader
from scvi_scale.store import MemoryStore
from scvi_scale.store.convert import convert


def _zarr(x: sp.csr_matrix, path):
    """``x`` converted into a Zarr store the way users make one (from an ``.h5ad``)."""
    import anndata

    h5ad = path.with_suffix(".h5ad")
    anndata.AnnData(x, var={"name": [f"g{i}" for i in range(x.shape[1])]}).write_h5ad(h5ad)
    return convert([h5ad], path, progress=False)


def _csr(n: int, g: int, seed: int = 0, scale: float = 3.0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(0.3, scale, size=(n, g))).astype(np.float32)
    x[:, 0] += 1
    return sp.csr_matrix(x)


class _Declared:
    """A store view that declares a count dtype (as Zarr and TileDB stores do from their metadata)."""

    def __init__(self, inner: MemoryStore, count_dtype: str | None) -> None:
        self.inner, self.count_dtype = inner, count_dtype
        self.n_obs, self.n_vars, self.source = inner.n_obs, inner.n_vars, inner.source

    def read_range(self, start: int, stop: int) -> sp.csr_matrix:
        return self.inner.read_range(start, stop)


@pytest.mark.parametrize(
    ("declared", "n_vars", "values", "indices"),
    [("uint16", 40, np.uint16, np.uint16), ("uint32", 40, np.float32, np.uint16), (None, 40, np.float32, np.uint16),
     ("uint16", 70_000, np.uint16, np.int32)],
)  # fmt: skip
def test_entry_dtypes_follow_the_store(declared, n_vars, values, indices):
    store = _Declared(MemoryStore(sp.csr_matrix((3, n_vars), dtype=np.float32) + sp.eye(3, n_vars, format="csr"),
                                  [f"g{i}" for i in range(n_vars)]), declared)  # fmt: skip
    dt = EntryDtypes.for_store(store)
    assert (dt.values, dt.indices) == (np.dtype(values), np.dtype(indices))
    assert piece_bytes(10, 2, dt) == 10 * dt.entry_bytes + 48


@pytest.mark.parametrize("dtypes", [EntryDtypes(np.dtype(np.uint16), np.dtype(np.uint16)),
                                    EntryDtypes(np.dtype("f4"), np.dtype(np.int32))])  # fmt: skip
def test_filled_and_joined_pieces_give_back_the_rows(dtypes):
    x = _csr(300, 50, seed=1)
    blocks = [(0, 120), (120, 121), (121, 300)]
    row_nnz = np.diff(x.indptr)
    filled = CompactPiece.allocate(row_nnz, 50, dtypes)
    for a, b in reversed(blocks):  # threads fill in any order
        filled.fill(a, x[a:b])
    joined = CompactPiece.join([CompactPiece.convert(x[a:b], dtypes) for a, b in blocks], 50, dtypes)
    idx = np.random.default_rng(0).permutation(300)[:77]
    for piece in (filled, joined):
        got = piece.take(idx)
        assert got.dtype == np.float32 and got.indices.dtype == np.int32
        assert (got != x[idx]).nnz == 0 and np.array_equal(got.indptr, x[idx].indptr)
        assert piece.values.dtype == dtypes.values and piece.nbytes() == piece_bytes(x.nnz, 300, dtypes)


def test_a_block_that_does_not_match_the_row_pointers_is_refused():
    x = _csr(20, 10)
    piece = CompactPiece.allocate(np.diff(x.indptr), 10, EntryDtypes(np.dtype("f4"), np.dtype(np.int32)))
    with pytest.raises(ValueError, match="row pointers say"):
        piece.fill(0, _csr(20, 10, seed=5)[:5])


def test_large_counts_of_a_uint32_store_are_kept_exactly(tmp_path):
    x = _csr(200, 30).tolil()
    x[7, 3], x[150, 29] = 70_000.0, 123_456.0  # beyond uint16: the store keeps uint32
    store = _zarr(sp.csr_matrix(x), tmp_path / "big.zarr")
    assert store.count_dtype == np.uint32
    loader = StoreLoader(store, np.zeros(200, dtype=np.int8), None, 16, block_size=16, buffer_blocks=4)
    assert loader.entry_dtypes.values == np.float32
    for batch in loader:
        assert torch.equal(batch.x_ng, torch.from_numpy(sp.csr_matrix(x)[batch.rows_n].toarray()))


def test_uint16_zarr_store_pieces_take_half_the_bytes(tmp_path):
    x = _csr(2000, 40)
    store = _zarr(x, tmp_path / "small.zarr")
    loader = StoreLoader(store, np.zeros(2000, dtype=np.int8), None, 32, block_size=64, buffer_blocks=4)
    assert (loader.entry_dtypes.values, loader.entry_dtypes.indices) == (np.uint16, np.uint16)
    for batch in loader:
        assert torch.equal(batch.x_ng, torch.from_numpy(x[batch.rows_n].toarray()))


def _peak_in_flight(n_cells: int) -> tuple[int, int, int]:
    """Peak bytes a slow consumer lets the loader hold on an ``n_cells`` store with a roomy budget, the largest
    piece's bytes and a minibatch's bytes."""
    x = _csr(n_cells, 40, seed=3)
    store = MemoryStore(x, [f"g{i}" for i in range(40)])
    loader = StoreLoader(store, np.zeros(n_cells, dtype=np.int8), None, 32, block_size=16, buffer_blocks=16,
                         memory_budget_bytes=1 << 30)  # fmt: skip
    for _ in loader:
        time.sleep(0.001)  # the threads could run ahead as far as the budget allows
    piece = piece_bytes(int(x.indptr[256 + 0] - x.indptr[0]) * 2, 256, loader.entry_dtypes)  # ample: 2x density
    return loader.max_inflight_bytes, piece, loader.batch_bytes(32, 40 * 32)


def test_read_ahead_is_one_piece_whatever_the_store_size():
    small, piece, batch = _peak_in_flight(600)  # 3 pieces of 256 cells
    large, _, _ = _peak_in_flight(6000)  # 24 pieces
    # the piece being cut and the next one, plus minibatches queued, one being assembled and the headroom
    assert large <= 2 * piece + (QUEUE_BATCHES + 2) * batch
