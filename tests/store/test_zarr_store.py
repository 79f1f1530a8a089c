"""The Zarr count store: round trips, anndata compatibility, row reads, batch codes, commit flag, obsm writes."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from scvi_scale.store import InputError, MemoryStore, read_h5ad
from scvi_scale.store.convert import convert
from scvi_scale.store.open import open_store
from scvi_scale.store.zarr_store import ZarrStore, set_complete

IFNB = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ifnb_pbmc_ctrl_stim_1k.h5ad"


@pytest.fixture(scope="module")
def atlas_zarr(small_atlas: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zarr") / "small.zarr"
    # a small budget makes many row blocks, so block seams are exercised
    convert([small_atlas], out, batch_key="batch", memory_budget_bytes=2048 * 48, progress=False)
    return out


@pytest.fixture(scope="module")
def source(small_atlas: Path) -> MemoryStore:
    return read_h5ad(small_atlas)


def _assert_same_store(store: ZarrStore, ref: MemoryStore) -> None:
    assert (store.n_obs, store.n_vars) == (ref.n_obs, ref.n_vars)
    np.testing.assert_array_equal(store.var_names, ref.var_names)
    got = store.read_range(0, store.n_obs)
    assert got.dtype == np.float32
    assert (got != ref.X).nnz == 0
    pd.testing.assert_frame_equal(store.obs, ref.obs)


def test_round_trip_synthetic(atlas_zarr: Path, source: MemoryStore) -> None:
    store = ZarrStore(atlas_zarr)
    _assert_same_store(store, source)
    meta = store.metadata
    assert meta["complete"] is True and meta["format_version"] == 1 and meta["count_dtype"] == "uint16"
    assert meta["provenance"][0]["rows"] == [0, store.n_obs] and meta["batch_key"] == "batch"
    x = zarr.open_group(atlas_zarr, mode="r")["X"]
    assert x["data"].dtype == np.uint16 and x["indices"].dtype == np.int32 and x["indptr"].dtype == np.int64
    assert x["data"].shards == (4_194_304,) and x["data"].chunks == (65_536,)


def test_round_trip_real_data(tmp_path: Path) -> None:
    if not IFNB.exists():
        pytest.skip(f"{IFNB} not available")
    store = convert([IFNB], tmp_path / "ifnb.zarr", batch_key="batch", memory_budget_bytes=8 << 20, progress=True)
    ref = read_h5ad(IFNB)
    _assert_same_store(store, ref)
    assert list(store.obs["cell_type"].cat.categories) == list(ref.obs["cell_type"].cat.categories)


def test_anndata_opens_the_store(atlas_zarr: Path, source: MemoryStore) -> None:
    adata = anndata.read_zarr(atlas_zarr)
    assert (sp.csr_matrix(adata.X, dtype=np.float32) != source.X).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, source.obs)
    ds = anndata.io.sparse_dataset(zarr.open_group(atlas_zarr, mode="r")["X"])
    assert ds.shape == (source.n_obs, source.n_vars)
    assert (sp.csr_matrix(ds[100:300], dtype=np.float32) != source.X[100:300]).nnz == 0


def test_read_rows_any_order(atlas_zarr: Path, source: MemoryStore) -> None:
    store = ZarrStore(atlas_zarr)
    rng = np.random.default_rng(0)
    for idx in (
        rng.integers(0, store.n_obs, 300),  # scattered, with repeats
        np.arange(store.n_obs)[::-1],
        np.r_[np.arange(10, 50), np.arange(400, 420), [5, 5, 599]],
        np.arange(0, 64),
    ):
        got = store.read_rows(idx)
        assert got.shape == (idx.size, store.n_vars)
        assert (got != source.X[idx]).nnz == 0
    assert store.read_rows(np.array([], dtype=np.int64)).shape == (0, store.n_vars)
    with pytest.raises(IndexError):
        store.read_rows(np.array([store.n_obs]))
    with pytest.raises(IndexError):
        store.read_range(10, store.n_obs + 1)


def test_batch_codes_and_library_stats_match_memory_store(atlas_zarr: Path, source: MemoryStore) -> None:
    store = ZarrStore(atlas_zarr)
    codes, cats = store.batch_codes("batch")
    ref_codes, ref_cats = source.batch_codes("batch")
    np.testing.assert_array_equal(codes, ref_codes)
    assert cats == ref_cats
    np.testing.assert_array_equal(store.batch_codes("batch", categories=cats[::-1])[0], len(cats) - 1 - ref_codes)
    means, vars_ = store.library_log_stats(codes, len(cats))
    ref_means, ref_vars = source.library_log_stats(ref_codes, len(cats))
    np.testing.assert_allclose(means, ref_means, rtol=1e-12)
    np.testing.assert_allclose(vars_, ref_vars, rtol=1e-10)
    np.testing.assert_array_equal(store.row_totals(chunk_entries=500), np.asarray(source.X.sum(axis=1)).ravel())
    assert store.batch_codes(None)[1] == ["0"]
    with pytest.raises(InputError, match="no obs column 'donor'"):
        store.batch_codes("donor")


def test_missing_commit_flag_is_refused(atlas_zarr: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(atlas_zarr, copy)
    set_complete(zarr.open_group(copy, mode="r+"), False)
    with pytest.raises(InputError, match=r"incomplete \(an interrupted conversion\?\); rerun `scvi-scale convert`"):
        ZarrStore(copy)
    with pytest.raises(InputError, match="no such store"):
        ZarrStore(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=3).create_group("X")
    with pytest.raises(InputError, match="not a scvi-scale count store"):
        ZarrStore(tmp_path / "plain.zarr")


def test_large_counts_use_uint32(tmp_path: Path) -> None:
    x = sp.csr_matrix(np.array([[70_000, 1], [2, 0]], dtype=np.float32))
    anndata.AnnData(X=x, obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["g", "h"])).write_h5ad(
        tmp_path / "big.h5ad"
    )
    store = convert(tmp_path / "big.h5ad", tmp_path / "big.zarr", progress=False)
    assert store.metadata["count_dtype"] == "uint32"
    np.testing.assert_array_equal(store.read_range(0, 2).toarray(), x.toarray())


def test_write_obsm_regions(atlas_zarr: Path, tmp_path: Path) -> None:
    copy = tmp_path / "obsm.zarr"
    shutil.copytree(atlas_zarr, copy)
    store = ZarrStore(copy)
    z = np.arange(200 * 4, dtype=np.float32).reshape(200, 4)
    store.write_obsm("X_scvi", 0, 100, z[:100])
    store.write_obsm("X_scvi", 100, 200, z[100:])
    adata = anndata.read_zarr(copy)
    np.testing.assert_array_equal(adata.obsm["X_scvi"][:200], z)
    assert np.isnan(adata.obsm["X_scvi"][200:]).all()
    with pytest.raises(ValueError, match="do not fit"):
        store.write_obsm("X_scvi", 0, 10, z[:5])


def test_open_store_dispatch(atlas_zarr: Path, small_atlas: Path, tmp_path: Path) -> None:
    assert isinstance(open_store(atlas_zarr), ZarrStore)
    assert isinstance(open_store(f"file://{atlas_zarr}"), ZarrStore)
    assert isinstance(open_store(small_atlas), MemoryStore)
    with pytest.raises(InputError, match="unknown kind of store"):
        open_store(tmp_path / "counts.csv")
    if importlib.util.find_spec("scvi_scale.store.tiledb_store") is None:
        with pytest.raises(InputError, match=r"scvi-scale\[tiledb\]"):
            open_store(tmp_path / "atlas.tiledb")


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_s3_without_s3fs_names_the_extra(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "me")
    with pytest.raises(InputError, match=r"scvi-scale\[s3\]") as info:
        open_store("s3://bucket/atlas.zarr")
    assert "hunter2" not in str(info.value)
