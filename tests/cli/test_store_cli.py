"""Stores through the CLI: convert .h5ad -> Zarr, then train, embed and evaluate from the store."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pytest
import torch

from scvi_scale import api
from tests.cli.test_cli import cli


def test_convert_then_train_from_zarr_equals_training_from_h5ad(tmp_path, small_atlas):
    store = tmp_path / "atlas.zarr"
    cli("convert", small_atlas, "--out", store, "--batch-key", "batch", "--memory", "4M", "--no-progress")
    opts = ["--batch-key", "batch", "--epochs", "2", "--no-progress", "--set", "model.n_hidden=32"]
    cli("train", store, "--out", tmp_path / "from_store", *opts)
    cli("train", small_atlas, "--out", tmp_path / "from_h5ad", *opts)
    # same rows, same seed, same minibatches: the store path must give bit-identical weights
    a = api.load_run(tmp_path / "from_store").model.state_dict()
    b = api.load_run(tmp_path / "from_h5ad").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    cli("embed", tmp_path / "from_store", store, "--out", tmp_path / "emb.h5ad")
    emb = anndata.read_h5ad(tmp_path / "emb.h5ad")
    ref = api.embed(tmp_path / "from_h5ad", small_atlas)
    np.testing.assert_array_equal(emb.obsm["X_scvi"], ref.obsm["X_scvi"])
    assert list(emb.obs["batch"]) == list(ref.obs["batch"])
    result = json.loads(cli("evaluate", tmp_path / "from_store", store, "--json").stdout)
    assert result["n_cells"] == 600


def test_train_from_tiledb_store(tmp_path, small_atlas):
    pytest.importorskip("tiledb")
    from scvi_scale.store.tiledb_store import TileDBStore

    TileDBStore.from_anndata(anndata.read_h5ad(small_atlas), str(tmp_path / "atlas.tiledb"), chunk_rows=256)
    run = api.train(
        tmp_path / "atlas.tiledb",
        None,
        data={"batch_key": "batch"},
        train={"max_epochs": 2, "progress": False},
        model={"n_hidden": 32},
    )
    ref = api.train(
        small_atlas,
        None,
        data={"batch_key": "batch"},
        train={"max_epochs": 2, "progress": False},
        model={"n_hidden": 32},
    )
    a, b = run.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_convert_errors_are_one_line(tmp_path, small_atlas):
    bad = cli(
        "convert", small_atlas, "--out", tmp_path / "x.zarr", "--batch-key", "donor", "--no-progress", check=False
    )
    assert bad.returncode == 2 and "donor" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = cli("train", tmp_path / "nothing.zarr", "--out", tmp_path / "r", "--no-progress", check=False)
    assert missing.returncode == 2 and "nothing.zarr" in missing.stderr
