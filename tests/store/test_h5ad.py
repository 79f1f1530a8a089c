"""Reading .h5ad files into a MemoryStore, and the MemoryStore contract (rows, batch codes, library prior)."""

from __future__ import annotations

from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_scale.store import InputError, MemoryStore, library_log_stats_from_totals, read_h5ad

CELLBENCH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cellbench_lung_celllines_5batch.h5ad"


def _adata(n_obs: int = 30, n_vars: int = 8, seed: int = 0) -> anndata.AnnData:
    rng = np.random.default_rng(seed)
    x_ng = rng.poisson(2.0, (n_obs, n_vars)).astype(np.float32)
    x_ng[:, 0] += 1
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(rng.choice(["s2", "s10", "s1"], n_obs)),
            "donor": rng.choice([3, 11, 7], n_obs),
        },
        index=pd.Index([f"cell{i}" for i in range(n_obs)]),
    )
    var = pd.DataFrame(index=pd.Index([f"gene{i}" for i in range(n_vars)]))
    return anndata.AnnData(X=sp.csr_matrix(x_ng), obs=obs, var=var)


def _write(adata: anndata.AnnData, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def cellbench() -> MemoryStore:
    if not CELLBENCH.exists():
        pytest.skip(f"{CELLBENCH} not available")
    return read_h5ad(CELLBENCH)


# ---------------------------------------------------------------- real data


def test_cellbench_shape_and_batches(cellbench: MemoryStore) -> None:
    assert (cellbench.n_obs, cellbench.n_vars) == (992, 11533)
    assert isinstance(cellbench.X, sp.csr_matrix) and cellbench.X.dtype == np.float32
    assert cellbench.var_names.shape == (11533,) and cellbench.var_names[0] == "ENSG00000000003"
    codes_n, cats = cellbench.batch_codes("batch")
    assert len(cats) == 5 and codes_n.dtype == np.int8 and codes_n.shape == (992,)
    # scvi-tools' convention: codes of obs[key].astype("category")
    expected = cellbench.obs["batch"].astype("category")
    np.testing.assert_array_equal(codes_n, expected.cat.codes.to_numpy())
    assert cats == list(expected.cat.categories)
    assert cellbench.source == str(CELLBENCH)


def test_cellbench_library_stats_match_numpy(cellbench: MemoryStore) -> None:
    codes_n, cats = cellbench.batch_codes("batch")
    means_b, vars_b = cellbench.library_log_stats(codes_n, len(cats) + 1, chunk_rows=97)
    log_lib_n = np.log(np.asarray(cellbench.X.sum(axis=1, dtype=np.float64)).ravel())
    for b in range(len(cats)):
        np.testing.assert_allclose(means_b[b], log_lib_n[codes_n == b].mean(), rtol=1e-12)
        np.testing.assert_allclose(vars_b[b], log_lib_n[codes_n == b].var(), rtol=1e-10)
    assert (means_b[-1], vars_b[-1]) == (0.0, 1.0)  # absent batch, as scvi-tools


# ---------------------------------------------------------------- MemoryStore contract


def test_batch_codes_follow_pandas_categories() -> None:
    store = MemoryStore.from_anndata(_adata())
    codes_n, cats = store.batch_codes("batch")
    assert cats == ["s1", "s10", "s2"]  # sorted as strings, exactly as pandas does
    np.testing.assert_array_equal(codes_n, store.obs["batch"].astype("category").cat.codes)
    codes_n, cats = store.batch_codes("donor")  # integer column: numeric order
    assert cats == ["3", "7", "11"]
    np.testing.assert_array_equal(codes_n, store.obs["donor"].astype("category").cat.codes)


def test_batch_codes_keep_existing_category_order() -> None:
    adata = _adata()
    adata.obs["batch"] = adata.obs["batch"].cat.reorder_categories(["s2", "s10", "s1"])
    codes_n, cats = MemoryStore.from_anndata(adata).batch_codes("batch")
    assert cats == ["s2", "s10", "s1"]
    np.testing.assert_array_equal(codes_n, adata.obs["batch"].cat.codes)


def test_no_batch_key_is_one_batch() -> None:
    store = MemoryStore.from_anndata(_adata())
    codes_n, cats = store.batch_codes(None)
    assert cats == ["0"] and codes_n.dtype == np.int8 and not codes_n.any()


def test_missing_batch_column_names_file_and_columns() -> None:
    store = MemoryStore.from_anndata(_adata(), source="pbmc.h5ad")
    with pytest.raises(InputError, match=r"pbmc\.h5ad: no obs column 'sample'.*'batch', 'donor'"):
        store.batch_codes("sample")


def test_fixed_categories_from_a_trained_model() -> None:
    store = MemoryStore.from_anndata(_adata(), source="new.h5ad")
    codes_n, cats = store.batch_codes("batch", categories=["s2", "s1", "s10", "s99"])
    assert cats == ["s2", "s1", "s10", "s99"]
    lookup = {"s2": 0, "s1": 1, "s10": 2}
    np.testing.assert_array_equal(codes_n, [lookup[v] for v in store.obs["batch"]])
    with pytest.raises(InputError, match=r"new\.h5ad: column 'batch' has values the model was not trained with.*'s10'"):
        store.batch_codes("batch", categories=["s1", "s2"])


def test_missing_values_in_batch_column() -> None:
    adata = _adata()
    adata.obs["batch"] = adata.obs["batch"].astype(object)
    adata.obs.iloc[4, 0] = np.nan
    with pytest.raises(InputError, match=r"column 'batch' has 1 missing values \(first: row 4, 'cell4'\)"):
        MemoryStore.from_anndata(adata).batch_codes("batch")


def test_read_rows_in_given_order_and_ranges() -> None:
    adata = _adata()
    store = MemoryStore.from_anndata(adata)
    idx = np.array([7, 2, 2, 29, 0])
    np.testing.assert_array_equal(store.read_rows(idx).toarray(), adata.X[idx].toarray())
    np.testing.assert_array_equal(store.read_range(5, 9).toarray(), adata.X[5:9].toarray())
    assert store.read_rows(np.array([], dtype=np.int64)).shape == (0, 8)
    with pytest.raises(IndexError):
        store.read_rows(np.array([30]))
    with pytest.raises(IndexError):
        store.read_range(5, 31)


def test_library_stats_chunked_equals_direct() -> None:
    store = MemoryStore.from_anndata(_adata(n_obs=101))
    codes_n, cats = store.batch_codes("batch")
    total_n = np.asarray(store.X.sum(axis=1)).ravel()
    direct = library_log_stats_from_totals(total_n, codes_n, len(cats))
    for chunk_rows in (1, 7, 1000):
        chunked = store.library_log_stats(codes_n, len(cats), chunk_rows=chunk_rows)
        np.testing.assert_allclose(chunked, direct, rtol=1e-12)


def test_library_stats_zero_total_counts_as_log_zero() -> None:
    # scvi-tools masks log(0) and fills it with 0 (it warns); our stores never hold empty cells, but the helper agrees.
    means_b, vars_b = library_log_stats_from_totals(np.array([0.0, np.e**2]), np.array([0, 0]), 1)
    np.testing.assert_allclose([means_b[0], vars_b[0]], [1.0, 1.0])


def test_from_anndata_layer_and_drop_empty_cells() -> None:
    adata = _adata()
    adata.layers["counts"] = adata.X.copy()
    adata.layers["counts"][[3, 9], :] = 0
    adata.X = np.log1p(adata.X.toarray())
    with pytest.raises(InputError, match="non-integer.*--layer counts"):
        MemoryStore.from_anndata(adata)
    with pytest.raises(InputError, match="no layer 'raw'; available layers: \\['counts'\\]"):
        MemoryStore.from_anndata(adata, layer="raw")
    with pytest.raises(InputError, match="2 of 30 cells have zero total counts"):
        MemoryStore.from_anndata(adata, layer="counts")
    store = MemoryStore.from_anndata(adata, layer="counts", drop_empty_cells=True)
    assert store.n_obs == 28 and store.n_dropped == 2
    assert "cell3" not in store.obs.index and store.obs.shape[0] == store.n_obs


# ---------------------------------------------------------------- read_h5ad


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_read_h5ad_accepts_csr_csc_dense(tmp_path: Path, fmt: str) -> None:
    adata = _adata()
    expected = adata.X.toarray()
    adata.X = expected if fmt == "dense" else sp.csr_matrix(expected).asformat(fmt)
    store = read_h5ad(_write(adata, tmp_path / "a.h5ad"))
    np.testing.assert_array_equal(store.X.toarray(), expected)
    assert list(store.var_names) == list(adata.var_names)
    pd.testing.assert_frame_equal(store.obs, adata.obs)


def test_read_h5ad_layer(tmp_path: Path) -> None:
    adata = _adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X * 0.5
    path = _write(adata, tmp_path / "norm.h5ad")
    with pytest.raises(
        InputError, match=r"norm\.h5ad: a non-integer value \(\d\.5\) at row 0 \('cell0'\), gene 'gene0'"
    ):
        read_h5ad(path)
    np.testing.assert_array_equal(read_h5ad(path, layer="counts").X.toarray(), adata.layers["counts"].toarray())
    with pytest.raises(InputError, match=r"norm\.h5ad: no layer 'raw'; available layers: \['counts'\]"):
        read_h5ad(path, layer="raw")


def test_read_h5ad_drop_empty_cells(tmp_path: Path) -> None:
    adata = _adata()
    adata.X.data[adata.X.indptr[5] : adata.X.indptr[6]] = 0  # keeps scipy from warning about structure
    path = _write(adata, tmp_path / "e.h5ad")
    with pytest.raises(InputError, match=r"e\.h5ad: 1 of 30 cells .* \(first: row 5 \('cell5'\)\).*--drop-empty-cells"):
        read_h5ad(path)
    assert read_h5ad(path, drop_empty_cells=True).n_obs == 29


def test_read_h5ad_duplicated_genes(tmp_path: Path) -> None:
    adata = _adata()
    path = _write(adata, tmp_path / "dup.h5ad")
    with h5py.File(path, "r+") as f:  # anndata would warn on construction; write the duplicate directly
        names = f["var/_index"][...]
        names[3] = names[1]
        f["var/_index"][...] = names
    with pytest.raises(InputError, match=r"dup\.h5ad: 1 gene names are duplicated \('gene1'\)"):
        read_h5ad(path)


@pytest.mark.parametrize("shape", [(0, 8), (30, 0)])
def test_read_h5ad_empty_matrix(tmp_path: Path, shape: tuple[int, int]) -> None:
    adata = _adata()[: shape[0], : shape[1]].copy()
    path = _write(adata, tmp_path / "empty.h5ad")
    with pytest.raises(InputError, match=rf"empty\.h5ad: the count matrix is empty \({shape[0]} cells x {shape[1]}"):
        read_h5ad(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.h5ad: no such file"):
        read_h5ad(tmp_path / "nope.h5ad")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        read_h5ad(tmp_path)


def test_random_bytes_are_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.h5ad"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match=r"corrupt\.h5ad: not an HDF5 file") as info:
        read_h5ad(path)
    assert "\n" not in str(info.value)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "zero.h5ad"
    path.touch()
    with pytest.raises(InputError, match=r"zero\.h5ad: the file is empty \(0 bytes\)"):
        read_h5ad(path)


def test_truncated_file_is_a_clean_error(tmp_path: Path) -> None:
    path = _write(_adata(n_obs=2000, n_vars=50), tmp_path / "cut.h5ad")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cut\.h5ad: .*(truncated or corrupt)") as info:
        read_h5ad(path)
    assert "\n" not in str(info.value)


def test_hdf5_that_is_not_anndata(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["matrix"] = np.ones((3, 3))
    with pytest.raises(InputError, match=r"other\.h5: an HDF5 file but not an AnnData"):
        read_h5ad(path)


def test_file_without_x_suggests_layers(tmp_path: Path) -> None:
    adata = _adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = None
    path = _write(adata, tmp_path / "nox.h5ad")
    with pytest.raises(
        InputError, match=r"nox\.h5ad: the file has no X matrix; pass --layer with one of: \['counts'\]"
    ):
        read_h5ad(path)
    assert read_h5ad(path, layer="counts").n_obs == 30


@pytest.mark.parametrize("batch_key", ["batch", None])
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parity
def test_codes_and_library_prior_match_scvi_tools(batch_key: str | None, drop: bool) -> None:
    scvi = pytest.importorskip("scvi")
    from scvi.model._utils import _init_library_size

    if not CELLBENCH.exists():
        pytest.skip(f"{CELLBENCH} not available")
    adata = anndata.read_h5ad(CELLBENCH)
    if drop:  # scvi-tools users filter empty cells with a subset; the store drops them itself
        adata.X.data[adata.X.indptr[3] : adata.X.indptr[4]] = 0
        adata.X.eliminate_zeros()
        store = MemoryStore.from_anndata(adata, drop_empty_cells=True)
        adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    else:
        store = MemoryStore.from_anndata(adata)
    assert store.n_obs == adata.n_obs == 992 - drop
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    manager = scvi.model.SCVI(adata).adata_manager
    codes_n, cats = store.batch_codes(batch_key)
    np.testing.assert_array_equal(codes_n, adata.obs["_scvi_batch"].to_numpy())
    assert cats == [str(c) for c in manager.get_state_registry("batch").categorical_mapping]
    means_1b, vars_1b = _init_library_size(manager, len(cats))
    means_b, vars_b = store.library_log_stats(codes_n, len(cats))
    # scvi-tools sums and logs in float32; we use float64
    np.testing.assert_allclose(means_b, means_1b.ravel(), rtol=1e-6)
    np.testing.assert_allclose(vars_b, vars_1b.ravel(), rtol=1e-5)


def test_codes_take_the_smallest_integer_type() -> None:
    """Batch codes are kept for every cell of an atlas: one byte a cell below 128 batches, wider above."""
    from scvi_scale.store.memory import category_codes

    for n, dtype in ((3, np.int8), (127, np.int8), (128, np.int16), (40_000, np.int32)):
        values = pd.Series([f"b{i}" for i in range(n)])
        codes_n, cats = category_codes(values, name="batch", source="test")
        assert codes_n.dtype == dtype and len(cats) == n and codes_n.flags.writeable
        assert sorted(codes_n.tolist()) == list(range(n))
