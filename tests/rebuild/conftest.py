"""A growing synthetic atlas split into nightly inputs, and rebuild configs over them (tiny model, few epochs)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scvi_scale.rebuild import RebuildConfig, rebuild_config_from_dict


@pytest.fixture(scope="session")
def atlas_parts(tmp_path_factory) -> list[Path]:
    """Three .h5ad inputs of one synthetic atlas (200 genes): two nights of batches 0 and 1, then batch 2 (new)."""
    from scvi_scale.datasets.synthetic import SyntheticSpec, make_anndata

    folder = tmp_path_factory.mktemp("parts")
    adata = make_anndata(SyntheticSpec(n_cells=2400, n_genes=200, n_batches=3, n_cell_types=4, seed=3))
    batch = adata.obs["batch"].astype(str).to_numpy()
    old, new = np.flatnonzero(batch != "batch_2"), np.flatnonzero(batch == "batch_2")
    paths = []
    for i, rows in enumerate([old[: len(old) // 2], old[len(old) // 2 :], new]):
        path = folder / f"night{i + 1}.h5ad"
        adata[rows].copy().write_h5ad(path)
        paths.append(path)
    return paths


def add_input(parts: list[Path], i: int, folder: Path) -> Path:
    """Copy night ``i`` (0-based) into the input folder."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(parts[i], folder / parts[i].name))


def make_config(tmp: Path, inputs: Any = None, *, train: dict | None = None, **policy: Any) -> RebuildConfig:
    tree = {
        "inputs": inputs or [str(tmp / "incoming")],
        "store": str(tmp / "atlas.zarr"),
        "runs": str(tmp / "runs"),
        "train": {
            "model": {"n_hidden": 32, "n_latent": 8},
            "data": {"batch_size": 128},
            "train": {"max_epochs": 5, "progress": False, "num_threads": 1, **(train or {})},
        },
        "policy": {"batch_key": "batch", "labels_key": "cell_type", "holdout_fraction": 0.15, "scib": False,
                   **policy},
        "prepare": {"n_top_genes": 100, "num_workers": 1},
        "device": "cpu",
    }  # fmt: skip
    return rebuild_config_from_dict(tree)
