"""Batch names from file names (``batch_per_file``): 10x's shared names never become a batch, and an append
never merges a new input into an existing batch because its file has the same name."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.store.convert import append, convert
from scvi_scale.store.zarr_store import ZarrStore


def _write(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(rng.poisson(1.0, size=(n, 12)).astype(np.float32) + np.eye(n, 12, dtype=np.float32))
    obs = pd.DataFrame(index=[f"{path.parent.name}-{seed}-{i}" for i in range(n)])
    path.parent.mkdir(parents=True, exist_ok=True)
    anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(12)])).write_h5ad(path)
    return path


def test_a_single_10x_style_input_is_named_by_its_sample_folder(tmp_path: Path) -> None:
    src = _write(tmp_path / "donor7" / "outs" / "filtered_feature_bc_matrix.h5ad", 30, 0)
    store = convert([src], tmp_path / "a.zarr", batch_per_file=True, progress=False)
    assert set(store.obs["batch"].astype(str)) == {"donor7"}


def test_append_does_not_merge_a_same_named_file_into_an_existing_batch(tmp_path: Path, caplog) -> None:
    night1 = _write(tmp_path / "night1" / "sample.h5ad", 30, 1)
    night2 = _write(tmp_path / "night2" / "sample.h5ad", 20, 2)
    convert([night1], tmp_path / "a.zarr", batch_per_file=True, progress=False)
    with caplog.at_level(logging.WARNING):
        append(tmp_path / "a.zarr", [night2], batch_per_file=True, progress=False)
    batches = ZarrStore(tmp_path / "a.zarr").obs["batch"].astype(str)
    assert list(batches.value_counts().sort_index().items()) == [("night2", 20), ("sample", 30)]
    assert "batches of the store already" in caplog.text
