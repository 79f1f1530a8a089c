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
    # with the random-row loader forced: same rows, same seed, same minibatches, so bit-identical weights
    cli("train", store, "--out", tmp_path / "from_store", *opts, "--set", "data.loader=memory")
    cli("train", small_atlas, "--out", tmp_path / "from_h5ad", *opts)
    a = api.load_run(tmp_path / "from_store").model.state_dict()
    b = api.load_run(tmp_path / "from_h5ad").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # by default a store trains with the block-shuffling prefetching loader, whose stage times land in metrics
    cli("train", store, "--out", tmp_path / "blocks", *opts)
    metrics = api.load_run(tmp_path / "blocks").metrics
    assert (metrics["perf/read_s"] > 0).all() and np.isfinite(metrics["validation/elbo"]).all()

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

    def train(source, **data):
        return api.train(source, None, data={"batch_key": "batch", **data}, train={"max_epochs": 2, "progress": False},
                         model={"n_hidden": 32})  # fmt: skip

    # with the random-row loader, the same minibatches as from the .h5ad: bit-identical weights
    run, ref = train(tmp_path / "atlas.tiledb", loader="memory"), train(small_atlas)
    a, b = run.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the block loader (the default for stores) reads TileDB too, and training gets somewhere
    blocks = train(tmp_path / "atlas.tiledb")
    elbo = blocks.metrics["validation/elbo"]
    assert np.isfinite(elbo).all() and elbo.iloc[-1] < elbo.iloc[0]


def test_convert_errors_are_one_line(tmp_path, small_atlas):
    bad = cli(
        "convert", small_atlas, "--out", tmp_path / "x.zarr", "--batch-key", "donor", "--no-progress", check=False
    )
    assert bad.returncode == 2 and "donor" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = cli("train", tmp_path / "nothing.zarr", "--out", tmp_path / "r", "--no-progress", check=False)
    assert missing.returncode == 2 and "nothing.zarr" in missing.stderr


def test_convert_10x_inputs_to_tiledb(tmp_path):
    pytest.importorskip("tiledb")
    from scvi_scale.store.tiledb_store import TileDBStore
    from tests.tenx import counts, write_10x_h5, write_mtx

    ids, names = [f"ENSG{i}" for i in range(10)], [f"G{i}" for i in range(10)]
    x_a, x_b = counts(80, 10, 0), counts(50, 6, 1)
    write_mtx(tmp_path / "a", x_a, ids, names, [f"a{i}" for i in range(80)], shuffle=True)
    write_10x_h5(tmp_path / "b.h5", x_b, ids[4:], names[4:], [f"b{i}" for i in range(50)])
    out = tmp_path / "atlas.tdb"
    done = cli("convert", tmp_path / "a", tmp_path / "b.h5", "--out", out, "--format", "tiledb", "--batch-per-file",
               "--memory", "64K", "--no-progress")  # fmt: skip
    assert "130 cells x 10 genes" in done.stdout
    store = TileDBStore(out)
    want = np.vstack([x_a, np.hstack([np.zeros((50, 4), x_b.dtype), x_b])])
    np.testing.assert_array_equal(store.read_range(0, 130).toarray(), want)
    assert store.obs["batch"].tolist() == ["a"] * 80 + ["b"] * 50


def test_convert_10x_errors_exit_2(tmp_path):
    from tests.tenx import counts, write_mtx

    ids, names = [f"ENSG{i}" for i in range(6)], ["G0", "G1", "G2", "G1", "G4", "G5"]
    write_mtx(tmp_path / "dup", counts(20, 6, 0), ids, names, [f"c{i}" for i in range(20)])
    bad = cli("convert", tmp_path / "dup", "--out", tmp_path / "x.zarr", "--no-progress", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "features.tsv.gz" in bad.stderr and "pass --var-names gene_ids" in bad.stderr
    (tmp_path / "dup" / "barcodes.tsv.gz").unlink()
    gone = cli("convert", tmp_path / "dup", "--out", tmp_path / "y.zarr", "--no-progress", check=False)
    assert gone.returncode == 2 and "no barcodes.tsv.gz or barcodes.tsv" in gone.stderr
