"""The Python API end to end (convert -> prepare -> train -> embed -> evaluate), on a local store and an S3 one,
and what its results show: summaries, notebook HTML, figures, an AnnData view without counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import scvi_scale as ss

TRAIN = {"max_epochs": 2, "n_epochs_kl_warmup": 1, "progress": False}


def test_end_to_end_on_a_local_store(tmp_path: Path, small_atlas: Path):
    store = ss.convert([small_atlas], tmp_path / "atlas.zarr", batch_key="batch", memory="64M", progress=False)
    assert (store.n_obs, store.n_vars) == (600, 200)
    prepared = ss.prepare(store.source, n_top_genes=80, batch_key="batch", progress=False)
    assert prepared.hvg_index.size == 80 and "80 highly variable genes of 200" in ss.api.prepare_summary(prepared)

    run = ss.train(store.source, tmp_path / "run", data={"batch_key": "batch"}, train=TRAIN)
    assert len(run.var_names) == 80 and list(run.metrics["epoch"]) == [0, 1]  # trained on the prepared HVGs
    assert ss.load_run(run.path).var_names == run.var_names

    adata = ss.embed(run, store.source, progress=False)  # a store: obs + obsm, no counts loaded
    assert adata.X is None and adata.shape == (600, 80) and adata.obsm["X_scvi"].shape == (600, 10)
    assert list(adata.obs.columns) == ["batch", "cell_type"] and np.isfinite(adata.obsm["X_scvi"]).all()

    result = ss.evaluate(run, store.source)
    assert isinstance(result, dict) and result["n_cells"] == 600 and np.isfinite(result["elbo"])
    assert json.loads(json.dumps(result)) == dict(result)
    assert result["elbo"] == pytest.approx(result["reconstruction_loss"] + result["kl_local"])
    assert repr(result).startswith("Evaluation(n_cells=600, elbo=") and "kl_local" in str(result)

    summary = ss.embed_to_store(run, store.source)
    assert summary.complete and summary.written == 1
    written = ss.read_embedding(store.source)
    assert written.X is None and written.uns["scvi_scale"]["batch_key"] == "batch"
    np.testing.assert_allclose(written.obsm["X_scvi"], adata.obsm["X_scvi"], rtol=1e-5, atol=1e-6)


def test_train_takes_a_yaml_config_and_dotted_overrides(tmp_path: Path, small_atlas: Path):
    config = ss.load_config(data={"batch_key": "batch"}, train=TRAIN, model={"n_latent": 4})
    (tmp_path / "cfg.yaml").write_text(config.to_yaml())
    run = ss.train(small_atlas, None, tmp_path / "cfg.yaml", overrides=["model.n_hidden=16", "train.max_epochs=1"])
    assert (run.config.model.n_latent, run.config.model.n_hidden, run.config.train.max_epochs) == (4, 16, 1)
    assert run.path is None and len(run.metrics) == 1  # trained in memory: the metrics come from the fit
    with pytest.raises(ss.ConfigError, match="unknown key model.n_latnet"):
        ss.train(small_atlas, None, overrides=["model.n_latnet=3"])


def test_a_run_shows_itself(tmp_path: Path, small_atlas: Path):
    run = ss.train(small_atlas, tmp_path / "run", data={"batch_key": "batch"}, train=TRAIN, model={"n_hidden": 16})
    text = run.summary()
    assert str(run.path) in text and "200 genes, 3 batches (obs['batch'])" in text
    assert "train/elbo" in text and "validation/elbo" in text and "model.pt" in text
    page = run._repr_html_()
    assert "<table" in page and "validation/elbo" in page and str(run.path) in page
    assert "epochs=2" in repr(run)

    fig = run.plot_losses()
    assert isinstance(fig, Figure) and len(fig.axes) >= 2
    assert isinstance(ss.plot_losses(run.path), Figure)

    adata = run.embed(small_atlas, counts=False, progress=False)  # in memory, but a light view on request
    assert adata.X is None and adata.uns["scvi_scale"]["batch_key"] == "batch"
    fig = ss.plot_embedding(adata, method="pca", path=tmp_path / "embedding.png")
    assert isinstance(fig, Figure) and [ax.get_title() for ax in fig.axes] == ["batch", "cell_type"]
    assert (tmp_path / "embedding.png").stat().st_size > 1000
    with pytest.raises(KeyError, match="donor"):
        ss.plot_embedding(adata, color="donor")
    assert isinstance(ss.plot_embedding(adata.obsm["X_scvi"][:, :2], obs=adata.obs, color="batch"), Figure)


def test_end_to_end_on_an_s3_store(s3_env: str, s3_atlas: str, tmp_path: Path):
    store = ss.open_store(s3_atlas)
    assert store.n_obs == 600 and "s3://" in repr(store)
    prepared = ss.prepare(s3_atlas, n_top_genes=60, batch_key="batch", block_rows=300, progress=False)
    assert prepared.recorded_in is not None and prepared.hvg_index.size == 60
    run = ss.train(s3_atlas, tmp_path / "run", data={"batch_key": "batch"}, train=TRAIN)
    assert len(run.var_names) == 60 and len(run.metrics) == 2
    adata = ss.embed(run, s3_atlas, progress=False)
    assert adata.X is None and adata.obsm["X_scvi"].shape == (600, 10)
    assert np.isfinite(ss.evaluate(run, s3_atlas)["elbo"])
    # the run records where its data are: resuming needs no data argument
    more = ss.resume(run.path, max_epochs=3, progress=False)
    assert list(more.metrics["epoch"]) == [0, 1, 2]
    assert isinstance(pd.read_csv(run.path / "metrics.csv"), pd.DataFrame)
