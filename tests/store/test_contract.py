"""One set of ``CountStore`` checks, run against every backend built from the same AnnData."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from scvi_scale.datasets.synthetic import SyntheticSpec, make_anndata
from scvi_scale.store import InputError, MemoryStore
from scvi_scale.store.contract import CountStore
from scvi_scale.store.convert import convert
from scvi_scale.store.open import open_store

BACKENDS = ["memory", "zarr", "tiledb"]


@pytest.fixture(scope="module")
def atlas() -> anndata.AnnData:
    return make_anndata(SyntheticSpec(n_cells=1500, n_genes=120, n_batches=3, seed=4))


@pytest.fixture(scope="module")
def stores(atlas: anndata.AnnData, tmp_path_factory) -> dict[str, CountStore]:
    root = tmp_path_factory.mktemp("contract")
    atlas.write_h5ad(root / "atlas.h5ad")
    out = {"memory": MemoryStore.from_anndata(atlas)}
    convert([root / "atlas.h5ad"], root / "atlas.zarr", progress=False, memory_budget_bytes=300 * 48)
    out["zarr"] = open_store(root / "atlas.zarr")
    pytest.importorskip("tiledb", reason="the tiledb extra is not installed")
    from scvi_scale.store.tiledb_store import TileDBStore

    TileDBStore.from_anndata(atlas, root / "atlas.tiledb", chunk_rows=400)
    out["tiledb"] = open_store(root / "atlas.tiledb")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_satisfies_the_protocol(stores, backend: str) -> None:
    assert isinstance(stores[backend], CountStore)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_names_obs_metadata(stores, atlas, backend: str) -> None:
    store = stores[backend]
    assert (store.n_obs, store.n_vars) == atlas.shape
    np.testing.assert_array_equal(store.var_names, atlas.var_names.to_numpy().astype(str))
    np.testing.assert_array_equal(store.obs.index.to_numpy(), atlas.obs_names.to_numpy())
    pd.testing.assert_series_equal(store.obs["batch"], atlas.obs["batch"], check_names=False)
    assert store.metadata["format_version"] >= 1 and store.metadata["provenance"]
    assert store.source and "secret" not in repr(store).lower()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_equal_the_source(stores, atlas, backend: str) -> None:
    store, x = stores[backend], atlas.X.tocsr()
    for start, stop in [(0, 1), (0, atlas.n_obs), (299, 301), (1499, 1500), (700, 700)]:
        got = store.read_range(start, stop)
        assert got.dtype == np.float32 and got.shape == (stop - start, atlas.n_vars)
        assert (got != x[start:stop]).nnz == 0
    idx = np.r_[np.random.default_rng(1).permutation(atlas.n_obs)[:200], 5, 5, 0]
    assert (stores[backend].read_rows(idx) != x[idx]).nnz == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_codes_and_priors_agree_across_backends(stores, backend: str) -> None:
    ref_codes, ref_cats = stores["memory"].batch_codes("batch")
    codes, cats = stores[backend].batch_codes("batch")
    np.testing.assert_array_equal(codes, ref_codes)
    assert cats == ref_cats
    np.testing.assert_allclose(
        stores[backend].library_log_stats(codes, len(cats)), stores["memory"].library_log_stats(codes, len(cats))
    )
    with pytest.raises(InputError, match="no obs column 'nope'"):
        stores[backend].batch_codes("nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_obsm_written_by_region_reads_back(stores, backend: str) -> None:
    store = stores[backend]
    values = np.random.default_rng(2).normal(size=(store.n_obs, 4)).astype(np.float32)
    store.write_obsm("X_contract", 1000, store.n_obs, values[1000:])  # the later region first
    store.write_obsm("X_contract", 0, 1000, values[:1000])
    np.testing.assert_array_equal(store.read_obsm("X_contract"), values)
    np.testing.assert_array_equal(store.read_obsm("X_contract", 10, 20), values[10:20])
    with pytest.raises(ValueError):
        store.write_obsm("X_contract", 0, 10, values[:11])


def test_zarr_obsm_is_anndata_obsm(stores, tmp_path: Path) -> None:
    store = stores["zarr"]
    values = np.arange(store.n_obs * 2, dtype=np.float32).reshape(-1, 2)
    store.write_obsm("X_two", 0, store.n_obs, values)
    np.testing.assert_array_equal(anndata.read_zarr(store.source).obsm["X_two"], values)
