"""`scvi-scale prepare` as a user runs it: convert, prepare, then train on the prepared genes and embed the store."""

from __future__ import annotations

import anndata
import numpy as np
import pytest

from scvi_scale import api
from scvi_scale.cli import main
from scvi_scale.store.convert import convert
from tests.cli.test_cli import cli

pytest.importorskip("skmisc")


@pytest.fixture
def store(tmp_path, small_atlas):
    convert([small_atlas], tmp_path / "atlas.zarr", batch_key="batch", progress=False)
    return tmp_path / "atlas.zarr"


def test_prepare_then_train_on_the_prepared_genes(tmp_path, store, capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "--n-top-genes" in capsys.readouterr().out

    out = cli("prepare", store, "--n-top-genes", "60", "--batch-key", "batch", "--block-rows", "200").stdout
    assert "60 highly variable genes of 200" in out and "3 batches" in out and f"recorded in {store}" in out
    var = anndata.read_zarr(store).var
    hvg = list(var.index[var["highly_variable"]])
    assert len(hvg) == 60 and var["highly_variable_nbatches"].max() == 3

    opts = ["--batch-key", "batch", "--epochs", "1", "--no-progress", "--set", "model.n_hidden=16"]
    cli("train", store, "--out", tmp_path / "run", *opts, "--set", "data.genes=hvg")
    run = api.load_run(tmp_path / "run")
    assert run.var_names == hvg and run.config.data.genes == "hvg"
    cli("embed", tmp_path / "run", store, "--out", tmp_path / "emb.h5ad")  # the full store: genes chosen by name
    emb = anndata.read_h5ad(tmp_path / "emb.h5ad")
    assert emb.obsm["X_scvi"].shape == (600, 10) and np.isfinite(emb.obsm["X_scvi"]).all()
    assert list(emb.var_names) == hvg


def test_prepare_errors_are_one_line(tmp_path, store, small_atlas, capsys):
    bad = cli("prepare", store, "--n-top-genes", "500", "--no-progress", check=False)
    assert bad.returncode == 2 and "n_top_genes=500 but the store has 200 genes" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    for args, says in (
        (["prepare", store, "--n-top-genes", "50", "--batch-key", "donor"], "no obs column 'donor'"),
        (["prepare", small_atlas], "convert the file first"),
        (["train", store, "--out", tmp_path / "r", "--set", "data.genes=hvg"], "run `scvi-scale prepare"),
    ):
        assert main([*map(str, args), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
