"""TileDB store: round trips against AnnData, row reads, batch codes and priors, errors, interrupted writes, obsm."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scvi_scale.store.tiledb_store as tiledb_store
from scvi_scale.datasets.synthetic import SyntheticSpec, make_anndata
from scvi_scale.store import InputError, MemoryStore
from scvi_scale.store.tiledb_store import TileDBStore, tiledb_config

pytest.importorskip("tiledb")  # the module imports tiledb lazily; the tests need it


@pytest.fixture(scope="module")
def atlas():
    return make_anndata(SyntheticSpec(n_cells=3000, n_genes=300))


@pytest.fixture(scope="module")
def store(atlas, tmp_path_factory) -> TileDBStore:
    # 700-row blocks: not aligned with the 4096-row tiles, several submits into one fragment
    return TileDBStore.from_anndata(atlas, tmp_path_factory.mktemp("tdb") / "atlas.tiledb", chunk_rows=700)


def _assert_same_counts(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    assert a.shape == b.shape and a.dtype == np.float32
    assert (a != b).nnz == 0


def test_round_trip(atlas, store):
    assert (store.n_obs, store.n_vars) == atlas.shape
    _assert_same_counts(store.read_range(0, store.n_obs), atlas.X)
    np.testing.assert_array_equal(store.var_names, atlas.var_names.to_numpy())
    pd.testing.assert_frame_equal(store.obs, atlas.obs)
    assert list(store.obs["batch"].cat.categories) == list(atlas.obs["batch"].cat.categories)
    assert store.metadata["format_version"] == 1 and store.metadata["count_dtype"] == "uint16"
    assert store.metadata["nnz"] == atlas.X.nnz and store.metadata["provenance"]["source_names"] == ["<AnnData>"]
    assert store.read_range(5, 5).shape == (0, atlas.n_vars)


def test_read_rows_any_order(atlas, store):
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.permutation(store.n_obs)[:500], [7, 7, 2999, 0], np.arange(100, 140)])
    _assert_same_counts(store.read_rows(idx), atlas.X[idx])
    _assert_same_counts(store.read_rows(np.arange(1000, 2100)), atlas.X[1000:2100])
    assert store.read_rows(np.array([], dtype=np.int64)).shape == (0, atlas.n_vars)
    with pytest.raises(IndexError):
        store.read_rows(np.array([store.n_obs]))


def test_batch_codes_and_library_stats_match_memory_store(atlas, store):
    mem = MemoryStore.from_anndata(atlas)
    codes, cats = store.batch_codes("batch")
    mem_codes, mem_cats = mem.batch_codes("batch")
    np.testing.assert_array_equal(codes, mem_codes)
    assert cats == mem_cats
    for got, want in zip(
        store.library_log_stats(codes, len(cats), chunk_rows=1000), mem.library_log_stats(codes, len(cats)), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert store.batch_codes(None)[1] == ["0"]


def test_real_data_round_trip(shared_data, tmp_path):
    import anndata

    path = shared_data / "ifnb_pbmc_ctrl_stim_1k.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not found")
    adata = anndata.read_h5ad(path)
    store = TileDBStore.from_anndata(adata, tmp_path / "ifnb.tiledb", chunk_rows=300, source=str(path))
    _assert_same_counts(store.read_range(0, store.n_obs), sp.csr_matrix(adata.X))
    pd.testing.assert_frame_equal(store.obs, adata.obs)
    np.testing.assert_array_equal(store.var_names, adata.var_names.to_numpy())
    np.testing.assert_array_equal(
        store.batch_codes("batch")[0], MemoryStore.from_anndata(adata).batch_codes("batch")[0]
    )


def test_obs_columns_of_every_kind(tmp_path):
    x = sp.csr_matrix(np.array([[1, 0], [0, 2], [3, 4]], dtype=np.float32))
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical(["b", "a", "b"], categories=["b", "a", "c"], ordered=True),
            "plate": pd.Categorical([3, 1, 3]),
            "note": ["x", np.nan, "ü"],
            "n_genes": np.array([1, 1, 2], dtype=np.int16),
            "frac": [0.5, np.nan, 1.0],
            "ok": [True, False, True],
        },
        index=pd.Index(["c0", "c1", "c2"], name="cell"),
    )
    store = TileDBStore.create(tmp_path / "s", ["g0", "g1"], obs, [x[:2], x[2:]])
    pd.testing.assert_frame_equal(store.obs, obs)
    assert store.metadata["count_dtype"] == "uint32"


def test_bad_counts_name_the_row(atlas, tmp_path):
    x = atlas.X.copy()
    x.data[x.indptr[1234]] = 2.5  # an existing entry: no change of sparsity structure
    with pytest.raises(InputError, match=r"non-integer value \(2.5\) at row 1234 \('cell_0001234'\)"):
        TileDBStore.create(
            tmp_path / "bad", atlas.var_names, atlas.obs, [x[s : s + 1000] for s in range(0, 3000, 1000)]
        )
    assert not (tmp_path / "bad").exists() and not list(tmp_path.iterdir())
    x = atlas.X.copy()
    x.data[x.indptr[2001] + 1] = 70_000
    with pytest.raises(InputError, match="70000 at row 2001 does not fit uint16"):
        TileDBStore.create(tmp_path / "big", atlas.var_names, atlas.obs, [x[:2000], x[2000:]], count_dtype="uint16")


def test_shape_mismatches(atlas, tmp_path):
    with pytest.raises(InputError, match="hold 2000 rows but obs has 3000"):
        TileDBStore.create(tmp_path / "s", atlas.var_names, atlas.obs, [atlas.X[:2000]])
    with pytest.raises(InputError, match="has 299 genes, expected 300"):
        TileDBStore.create(tmp_path / "s", atlas.var_names, atlas.obs, [atlas.X[:, :299]])


def _interrupted(x: sp.csr_matrix):
    yield x[:1000]
    raise RuntimeError("source went away")


@pytest.mark.parametrize("local", [True, False])
def test_interrupted_write_leaves_no_complete_store(atlas, tmp_path, monkeypatch, local):
    uri = tmp_path / "atlas.tiledb"
    if not local:  # the object-store path: written in place, so only the commit flag protects readers
        monkeypatch.setattr(tiledb_store, "_is_local", lambda uri: False)
    with pytest.raises(RuntimeError, match="source went away"):
        TileDBStore.create(uri, atlas.var_names, atlas.obs, _interrupted(atlas.X))
    with pytest.raises(InputError, match="is incomplete .*; rerun the conversion" if not local else "no TileDB"):
        TileDBStore(uri)
    assert [p.name for p in tmp_path.iterdir()] == ([] if local else ["atlas.tiledb"])
    store = TileDBStore.create(uri, atlas.var_names, atlas.obs, [atlas.X], overwrite=True)
    _assert_same_counts(store.read_range(2990, 3000), atlas.X[2990:3000])


def test_overwrite_replaces_and_refuses_without_flag(atlas, tmp_path):
    uri = tmp_path / "s"
    TileDBStore.create(uri, atlas.var_names, atlas.obs, [atlas.X])
    with pytest.raises(InputError, match="already exists; pass overwrite=True"):
        TileDBStore.create(uri, atlas.var_names, atlas.obs, [atlas.X])
    obs = atlas.obs.assign(batch=atlas.obs["batch"].cat.rename_categories(lambda c: c.upper()))
    store = TileDBStore.create(uri, atlas.var_names, obs, [atlas.X], overwrite=True)
    assert store.batch_codes("batch")[1][0] == "BATCH_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_write_obsm_regions(store):
    rng = np.random.default_rng(1)
    z = rng.normal(size=(store.n_obs, 10)).astype(np.float32)
    for start in range(0, store.n_obs, 1100):  # regions as ranks would write them, out of order
        stop = min(start + 1100, store.n_obs)
        store.write_obsm("X_test", start, stop, z[start:stop])
    np.testing.assert_array_equal(store.read_obsm("X_test"), z)
    np.testing.assert_array_equal(store.read_obsm("X_test", 50, 60), z[50:60])
    with pytest.raises(InputError, match="has 10 columns"):
        store.write_obsm("X_test", 0, 2, z[:2, :3])
    with pytest.raises(ValueError, match="rows"):
        store.write_obsm("X_test", 0, 3, z[:2])


def test_pickle_reopens(atlas, store):
    clone = pickle.loads(pickle.dumps(store))
    _assert_same_counts(clone.read_rows(np.array([3, 1])), atlas.X[[3, 1]])


def test_s3_config_from_env(monkeypatch, caplog):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "top-secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    with caplog.at_level(logging.DEBUG, logger="scvi_scale.store.tiledb_store"):
        cfg = tiledb_config("s3://bucket/atlas.tiledb", {"sm.io_concurrency_level": 2})
    assert cfg["vfs.s3.endpoint_override"] == "127.0.0.1:5123" and cfg["vfs.s3.scheme"] == "http"
    assert cfg["vfs.s3.use_virtual_addressing"] == "false" and cfg["vfs.s3.region"] == "eu-west-1"
    assert cfg["vfs.s3.aws_secret_access_key"] == "top-secret" and cfg["sm.io_concurrency_level"] == "2"
    assert "top-secret" not in caplog.text and "key-id" not in caplog.text
    assert "vfs.s3.endpoint_override" not in tiledb_config("/local/path")


def test_missing_store(tmp_path):
    with pytest.raises(InputError, match="no TileDB count store"):
        TileDBStore(tmp_path / "nothing")
