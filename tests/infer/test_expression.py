"""Normalized expression: draw-for-draw equal to scvi-tools' ``get_normalized_expression`` on the same weights,
the API within Monte Carlo error of it, and the array written into Zarr and TileDB stores region by region:
the bytes returned in memory, a rerun that does nothing, a crash and rerun that end with the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch

from scvi_scale import analysis, api
from scvi_scale.infer import writeback
from scvi_scale.infer.expression import normalized_minibatch
from scvi_scale.store.convert import convert
from scvi_scale.store.errors import InputError
from scvi_scale.store.open import open_store

TRAIN = {"data": {"batch_key": "batch", "batch_size": 128}, "model": {"n_hidden": 32, "n_latent": 6},
         "train": {"max_epochs": 3, "progress": False, "num_threads": 1}}  # fmt: skip
GENES = ["gene_0003", "gene_0150", "gene_0042", "gene_0007"]  # not in model order: columns follow the model's


@pytest.fixture(scope="module")
def adata(small_atlas: Path) -> anndata.AnnData:
    return anndata.read_h5ad(small_atlas)


@pytest.fixture(scope="module")
def run(adata, tmp_path_factory) -> api.Run:
    return api.train(adata, tmp_path_factory.mktemp("expr") / "run", **TRAIN)


@pytest.fixture(scope="module")
def scvi_model(run, adata, tmp_path_factory):
    """scvi-tools' SCVI holding our weights (what `export-scvi-tools` writes), on the same AnnData."""
    scvi = pytest.importorskip("scvi")
    path = api.export_scvi_tools(run, tmp_path_factory.mktemp("expr-st") / "scvi")
    model = scvi.model.SCVI.load(str(path), adata=adata.copy())
    model.module.eval()
    return model


def _ours(run, adata, seed, batch_size=128, **kwargs) -> np.ndarray:
    """Ours over scvi-tools' minibatches, with the one int64 draw its DataLoader takes before the first one."""
    torch.manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_()
    codes = adata.obs["batch"].cat.codes.to_numpy().astype(np.int64)
    out = []
    for lo in range(0, adata.n_obs, batch_size):
        x_ng = torch.from_numpy(adata.X[lo : lo + batch_size].toarray())
        out.append(normalized_minibatch(run.model, x_ng, torch.from_numpy(codes[lo : lo + batch_size]), **kwargs))
    return torch.cat(out).numpy()


@pytest.mark.parity
@pytest.mark.parametrize(
    ("transform_batch", "genes", "library_size", "n_samples"),
    [(None, None, 1e4, 1), ("batch_1", GENES, 1e4, 1), (["batch_0", "batch_2"], None, 1.0, 3),
     ("batch_2", GENES, "latent", 1)],
)  # fmt: skip
def test_draw_for_draw_equal_to_scvi_tools(run, adata, scvi_model, transform_batch, genes, library_size, n_samples):
    from scvi_scale.infer.expression import batch_codes_for, gene_columns

    codes = batch_codes_for(run.batch_categories, transform_batch)
    cols = gene_columns(run.var_names, genes)
    ours = _ours(run, adata, 11, codes=codes, gene_idx=cols, library_size=library_size, n_samples=n_samples)
    torch.manual_seed(11)
    theirs = scvi_model.get_normalized_expression(
        transform_batch=transform_batch, gene_list=genes, library_size=library_size, n_samples=n_samples,
        batch_size=128, return_numpy=True,
    )  # fmt: skip
    assert ours.shape == theirs.shape == (600, 200 if genes is None else len(genes))
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-6 * float(np.abs(theirs).max()))


@pytest.mark.parity
def test_api_within_monte_carlo_error_of_scvi_tools(run, adata, scvi_model):
    """Averages of 100 draws per cell, ours (per-region seeds, other minibatches) against scvi-tools'."""
    n = 100
    ours = analysis.normalized_expression(run, adata, transform_batch="batch_1", n_samples=n, batch_size=64,
                                          region_rows=256, write=False)  # fmt: skip
    assert list(ours.columns) == run.var_names and list(ours.index) == list(adata.obs_names)
    torch.manual_seed(3)
    draws = scvi_model.get_normalized_expression(transform_batch="batch_1", library_size=1e4, n_samples=n,
                                                 return_mean=False, return_numpy=True)  # fmt: skip
    se = np.sqrt(2 * draws.var(axis=0, ddof=1) / n)  # both means carry the same per-draw variance
    z = (ours.to_numpy() - draws.mean(axis=0)) / np.maximum(se, 1e-12)
    assert np.abs(z).max() < 6.5  # 120,000 entries: |z| > 6.5 has probability ~1e-5 under N(0, 1)
    assert 0.8 < float(np.mean(z**2)) < 1.25  # the scale of the difference is the Monte Carlo error
    np.testing.assert_allclose(ours.to_numpy().sum(axis=1), 1e4, rtol=1e-4)  # all genes: rows sum to the library


def test_errors_name_the_gene_the_batch_and_the_fix(run, adata):
    with pytest.raises(InputError, match=r"gene 'NOPE'.*model's 200 genes.*run.var_names"):
        analysis.normalized_expression(run, adata, genes=["gene_0001", "NOPE"], write=False)
    with pytest.raises(InputError, match=r"transform batch 'batch_9'.*batch_0, batch_1, batch_2.*pass one"):
        analysis.normalized_expression(run, adata, transform_batch="batch_9", write=False)
    with pytest.raises(InputError, match="write=False"):
        analysis.normalized_expression(run, adata, write=True)
    with pytest.raises(InputError, match="library_size"):
        analysis.normalized_expression(run, adata, library_size=0, write=False)


@pytest.fixture(scope="module")
def stores(small_atlas: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("expr-stores")
    return {
        backend: Path(convert([small_atlas], root / f"atlas.{backend}", batch_key="batch", progress=False).source)
        for backend in ("zarr", "tiledb")
    }


KW = {"genes": GENES, "transform_batch": "batch_1", "region_rows": 128, "batch_size": 64}


@pytest.fixture(scope="module")
def in_memory(run, adata) -> np.ndarray:
    return analysis.normalized_expression(run, adata, write=False, **KW).to_numpy()


@pytest.mark.parametrize("backend", ["zarr", "tiledb"])
def test_written_into_the_store_equals_in_memory_and_rerun_does_nothing(backend, stores, run, in_memory, tmp_path):
    if backend == "tiledb":
        pytest.importorskip("tiledb")
    path = Path(shutil.copytree(stores[backend], tmp_path / stores[backend].name))
    api.embed_to_store(run, path, ("latent",), region_rows=128)  # the embedding stays alongside
    summary = analysis.normalized_expression(run, path, **KW)
    assert (summary.complete, summary.n_regions, summary.written, summary.keys) == (True, 5, 5, ("scvi_normalized",))
    store = open_store(path)
    np.testing.assert_array_equal(store.read_obsm("scvi_normalized"), in_memory)
    manifest = store.metadata["obsm/scvi_normalized"]
    manifest = manifest if isinstance(manifest, dict) else json.loads(manifest)
    order = sorted(GENES, key=run.var_names.index)
    assert manifest["complete"] and manifest["genes"] == order and manifest["transform_batch"] == ["batch_1"]
    assert manifest["library_size"] == 1e4 and manifest["model_hash"] == summary.model_hash
    assert store.read_obsm("X_scvi").shape == (600, 6)
    if backend == "zarr":
        assert anndata.read_zarr(path).obsm["scvi_normalized"].shape == (600, 4)
    again = analysis.normalized_expression(run, path, **KW)
    assert (again.complete, again.written) == (True, 0)
    other = analysis.normalized_expression(run, path, **{**KW, "transform_batch": "batch_2"})
    assert other.written == 5 and not np.array_equal(open_store(path).read_obsm("scvi_normalized"), in_memory)


class Crash(Exception):
    pass


@pytest.mark.parametrize("backend", ["zarr", "tiledb"])
def test_crash_and_rerun_gives_the_uninterrupted_bytes(backend, stores, run, in_memory, tmp_path, monkeypatch):
    if backend == "tiledb":
        pytest.importorskip("tiledb")
    path = Path(shutil.copytree(stores[backend], tmp_path / stores[backend].name))
    seen = []

    def fault(stage: str, region: int) -> None:
        if stage == "written":
            seen.append(region)
            if len(seen) == 3:
                raise Crash(region)

    monkeypatch.setattr(writeback, "_fault_point", fault)
    with pytest.raises(Crash):
        analysis.normalized_expression(run, path, **KW)
    monkeypatch.undo()
    store = open_store(path)
    marks = store.read_marks("scvi_scale_commits_scvi_normalized")
    assert int((marks != 0).sum()) == 2
    summary = analysis.normalized_expression(run, path, **KW)
    assert (summary.complete, summary.written, summary.skipped) == (True, 3, 2)
    assert open_store(path).read_obsm("scvi_normalized").tobytes() == in_memory.tobytes()


@pytest.mark.slow
def test_two_worker_processes_write_the_same_bytes(stores, run, in_memory, tmp_path):
    path = Path(shutil.copytree(stores["zarr"], tmp_path / "atlas.zarr"))
    summary = analysis.normalized_expression(run.path, path, workers=2, threads=1, **KW)
    assert summary.complete and summary.workers == 2
    assert open_store(path).read_obsm("scvi_normalized").tobytes() == in_memory.tobytes()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_tasks_write_the_same_bytes(stores, run, in_memory, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    pytest.importorskip("tiledb")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    path = Path(shutil.copytree(stores["tiledb"], tmp_path / "atlas.tiledb"))
    summary = analysis.normalized_expression(run, path, launcher="ray", workers=2, threads=1, **KW)
    assert summary.complete and summary.written == 5 and summary.launcher == "ray"
    assert open_store(path).read_obsm("scvi_normalized").tobytes() == in_memory.tobytes()
