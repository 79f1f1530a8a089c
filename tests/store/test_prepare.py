"""prepare: seurat_v3 HVGs equal scanpy's, records survive reopening, stale records are refused, training uses them."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from scvi_scale import api
from scvi_scale.prep.prepare import prepare, recorded_prepare, select_genes
from scvi_scale.store import InputError, MemoryStore, read_h5ad
from scvi_scale.store.convert import append, convert
from scvi_scale.store.subset import GeneSubset
from scvi_scale.store.zarr_store import ZarrStore

sc = pytest.importorskip("scanpy")
pytest.importorskip("skmisc")

STATS = ["means", "variances", "variances_norm"]


def _assert_matches_scanpy(var: pd.DataFrame, adata: anndata.AnnData, n_top: int, key: str | None, span=0.3) -> None:
    # scanpy squares float32 counts in float32, inexact above 4096; float64 counts make its sums exact, as ours are
    adata.X = adata.X.astype(np.float64)
    ref = sc.pp.highly_variable_genes(
        adata, flavor="seurat_v3", n_top_genes=n_top, batch_key=key, span=span, inplace=False
    )
    assert list(var.index) == list(ref.index)
    np.testing.assert_array_equal(var["highly_variable"].to_numpy(), ref["highly_variable"].to_numpy())
    # the same ranks, NaN where a gene is a top gene in no batch; float32 as scanpy's
    assert var["highly_variable_rank"].dtype == ref["highly_variable_rank"].dtype
    np.testing.assert_array_equal(var["highly_variable_rank"].to_numpy(), ref["highly_variable_rank"].to_numpy())
    for col in STATS:
        np.testing.assert_allclose(var[col].to_numpy(), ref[col].to_numpy(), rtol=1e-12, atol=1e-14, err_msg=col)
    if key is None:
        assert "highly_variable_nbatches" not in var
    else:
        np.testing.assert_array_equal(var["highly_variable_nbatches"], ref["highly_variable_nbatches"])


@pytest.mark.parametrize(
    ("name", "n_top", "key", "span"),
    [
        ("ifnb_pbmc_ctrl_stim_1k", 2000, None, 0.3),
        ("ifnb_pbmc_ctrl_stim_1k", 2000, "batch", 0.5),  # at span 0.3 the CTRL loess is singular, in scanpy too
        ("kang18_pbmc_ctrl_8donors", 500, "batch", 0.3),  # 8 batches: medians of an even count
        ("cellbench_lung_celllines_5batch", 2000, "batch", 0.3),
    ],
)
def test_agrees_with_scanpy_on_real_data(shared_data: Path, name: str, n_top: int, key: str | None, span: float):
    path = shared_data / f"{name}.h5ad"
    # 300-row blocks: every pass merges many partial sums, in a tree
    result = prepare(read_h5ad(path), n_top, key, span=span, block_rows=300)
    _assert_matches_scanpy(result.var, anndata.read_h5ad(path), n_top, key, span)
    assert result.hvg_index.size == n_top and result.recorded_in is None


def test_singular_loess_is_one_line_naming_the_batch(shared_data: Path):
    store = read_h5ad(shared_data / "ifnb_pbmc_ctrl_stim_1k.h5ad")
    with pytest.raises(InputError, match=r"batch 'CTRL'.*larger span") as err:
        prepare(store, 2000, "batch")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def atlas_zarr(small_atlas: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "atlas.zarr"
    convert([small_atlas], out, batch_key="batch", progress=False)
    return out


@pytest.fixture
def prepared_zarr(atlas_zarr, tmp_path) -> Path:
    """A private copy of the atlas store, prepared with 50 HVGs per batch of 'batch'."""
    path = tmp_path / "atlas.zarr"
    shutil.copytree(atlas_zarr, path)
    prepare(ZarrStore(path), 50, "batch", block_rows=128)
    return path


def test_zarr_store_records_survive_reopening(prepared_zarr: Path, small_atlas: Path):
    store = ZarrStore(prepared_zarr)
    record = recorded_prepare(store)
    assert record["n_top_genes"] == 50 and record["batch_key"] == "batch" and record["method"] == "seurat_v3"
    assert record["batch_categories"] == list(store.obs["batch"].cat.categories)
    assert sum(record["batch_n_cells"]) == store.n_obs == record["fingerprint"]["n_obs"]
    assert store.metadata["complete"] is True  # the conversion's metadata is kept
    # anndata sees scanpy's columns, which agree with scanpy on the same counts
    var = anndata.read_zarr(prepared_zarr).var
    assert var["highly_variable"].dtype == bool and var["highly_variable_rank"].dtype == np.float32
    _assert_matches_scanpy(var, anndata.read_h5ad(small_atlas), 50, "batch")
    pd.testing.assert_frame_equal(store.read_var(), var)

    # library priors: all genes as StoreReads computes them; HVGs as a view of those genes computes them
    codes, cats = store.batch_codes("batch")
    for genes, view in (("all", store), ("hvg", GeneSubset(store, np.flatnonzero(var["highly_variable"])))):
        means, variances = view.library_log_stats(codes, len(cats))
        np.testing.assert_allclose(record["library_log_stats"][genes]["means"], means, rtol=1e-12)
        np.testing.assert_allclose(record["library_log_stats"][genes]["vars"], variances, rtol=1e-10)


def test_prepare_again_replaces_the_record(prepared_zarr: Path, small_atlas: Path):
    result = api.prepare(prepared_zarr, 30)
    assert "one batch" in repr(result) and str(prepared_zarr) in repr(result)
    var = anndata.read_zarr(prepared_zarr).var
    assert list(var.columns) == ["highly_variable", "highly_variable_rank", "means", "variances", "variances_norm"]
    assert int(var["highly_variable"].sum()) == 30 and ZarrStore(prepared_zarr).prepared["batch_key"] is None
    _assert_matches_scanpy(var, anndata.read_h5ad(small_atlas), 30, None)


def test_append_makes_the_record_stale(prepared_zarr: Path, small_atlas: Path):
    append(prepared_zarr, [small_atlas], batch_key="batch", progress=False)
    store = ZarrStore(prepared_zarr)
    with pytest.raises(InputError, match=r"changed after `scvi-scale prepare`.*rerun `scvi-scale prepare") as err:
        select_genes(store, "auto")
    assert str(prepared_zarr) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="changed after"):
        select_genes(store, "hvg")
    assert select_genes(store, "all") == (store, None)  # all genes need no record


def test_bad_arguments_are_one_line(atlas_zarr):
    store = ZarrStore(atlas_zarr)
    with pytest.raises(InputError, match=r"n_top_genes=201 but the store has 200 genes") as err:
        prepare(store, 201)
    assert store.source in str(err.value)
    with pytest.raises(InputError, match="no obs column 'donor'"):
        prepare(store, 50, "donor")
    with pytest.raises(InputError, match=r"data.genes=hvg.*run `scvi-scale prepare"):
        select_genes(store, "hvg")
    assert store.prepared is None and select_genes(store, "auto") == (store, None)


def test_tiledb_store_records_the_same(prepared_zarr: Path, small_atlas: Path, tmp_path: Path):
    pytest.importorskip("tiledb")
    from scvi_scale.store.tiledb_store import TileDBStore

    store = TileDBStore.from_anndata(anndata.read_h5ad(small_atlas), tmp_path / "atlas.tiledb", chunk_rows=256)
    result = prepare(store, 50, "batch", block_rows=100)
    reopened = TileDBStore(tmp_path / "atlas.tiledb")
    ref = ZarrStore(prepared_zarr)
    pd.testing.assert_frame_equal(reopened.read_var(), result.var)
    pd.testing.assert_frame_equal(reopened.read_var(), ref.read_var(), check_index_type=False)
    ours, theirs = recorded_prepare(reopened)["library_log_stats"], ref.prepared["library_log_stats"]
    for genes in ("all", "hvg"):
        np.testing.assert_allclose(ours[genes]["means"], theirs[genes]["means"], rtol=1e-12)
        np.testing.assert_allclose(ours[genes]["vars"], theirs[genes]["vars"], rtol=1e-10)
    view, _ = select_genes(reopened, "auto")
    assert list(view.var_names) == result.hvg_names


def test_training_uses_the_prepared_genes_and_priors(prepared_zarr: Path):
    store = ZarrStore(prepared_zarr)
    hvg = list(store.read_var().index[store.read_var()["highly_variable"]])
    small = {"model": {"n_hidden": 16, "n_latent": 4, "use_observed_lib_size": False}}
    run = api.train(
        prepared_zarr, None, data={"batch_key": "batch"}, train={"max_epochs": 1, "progress": False}, **small
    )
    assert run.var_names == hvg and run.model.n_genes == 50
    priors = store.prepared["library_log_stats"]["hvg"]
    np.testing.assert_allclose(run.model.library_log_means.numpy().ravel(), priors["means"], rtol=1e-6)
    # embedding the full store picks the run's genes by name
    emb = api.embed(run, prepared_zarr)
    assert emb.shape == (store.n_obs, 50) and list(emb.var_names) == hvg
    everything = api.train(
        prepared_zarr, None, data={"batch_key": "batch", "genes": "all"}, train={"max_epochs": 1, "progress": False}
    )
    assert everything.model.n_genes == store.n_vars


class _CountingReads(MemoryStore):
    """A store that records every row range read, to check that prepare reads by bounded blocks only."""

    def read_range(self, start: int, stop: int):
        self.spans.append((start, stop))
        return super().read_range(start, stop)

    def read_rows(self, idx):
        raise AssertionError("prepare reads row blocks, never scattered rows")


def test_reads_each_row_once_per_pass_in_bounded_blocks(small_atlas: Path):
    ref = read_h5ad(small_atlas)
    store = _CountingReads(ref.X, ref.var_names, ref.obs)
    store.spans = []
    result = prepare(store, 40, "batch", block_rows=64, num_workers=2)
    assert max(b - a for a, b in store.spans) == 64
    rows_read = np.zeros(store.n_obs, dtype=int)
    for a, b in store.spans:
        rows_read[a:b] += 1
    assert (rows_read == 3).all()  # sums, clipped sums, HVG library sizes
    assert store.prepared == result.record and result.recorded_in is None
    pd.testing.assert_frame_equal(store.read_var(), result.var)
