"""GeneSubset: a column view that reads like the store it wraps, in any column order."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from scvi_scale.datasets.synthetic import SyntheticSpec, make_anndata
from scvi_scale.store import MemoryStore
from scvi_scale.store.subset import GeneSubset


@pytest.fixture(scope="module")
def store() -> MemoryStore:
    return MemoryStore.from_anndata(make_anndata(SyntheticSpec(n_cells=500, n_genes=120, n_batches=3, seed=5)))


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_reads_equal_column_slices(store: MemoryStore, order: str):
    idx = np.sort(np.random.default_rng(0).choice(store.n_vars, 40, replace=False))
    if order == "shuffled":
        idx = np.random.default_rng(1).permutation(idx)
    view = GeneSubset(store, idx)
    assert (view.n_obs, view.n_vars) == (store.n_obs, 40)
    np.testing.assert_array_equal(view.var_names, store.var_names[idx])
    for got, want in (
        (view.read_range(30, 410), store.X[30:410][:, idx]),
        (view.read_rows(np.array([7, 3, 3, 499, 0])), store.X[[7, 3, 3, 499, 0]][:, idx]),
        (view.read_range(5, 5), store.X[5:5][:, idx]),
    ):
        assert got.dtype == np.float32 and got.has_canonical_format and got.shape == want.shape
        assert (got != want).nnz == 0


def test_batch_codes_and_priors_are_those_of_the_selected_counts(store: MemoryStore):
    idx = np.arange(0, store.n_vars, 3)
    view = GeneSubset(store, idx)
    ref = MemoryStore(store.X[:, idx], store.var_names[idx], store.obs, drop_empty_cells=False)
    codes, cats = view.batch_codes("batch")
    ref_codes, ref_cats = ref.batch_codes("batch")
    np.testing.assert_array_equal(codes, ref_codes)
    assert cats == ref_cats and view.obs is store.obs and view.source == store.source
    for a, b in zip(view.library_log_stats(codes, len(cats)), ref.library_log_stats(codes, len(cats)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    again = pickle.loads(pickle.dumps(view))
    assert (again.read_range(0, 50) != view.read_range(0, 50)).nnz == 0


def test_rejects_bad_columns(store: MemoryStore):
    with pytest.raises(IndexError):
        GeneSubset(store, [0, store.n_vars])
    with pytest.raises(ValueError, match="repeated"):
        GeneSubset(store, [1, 1])
