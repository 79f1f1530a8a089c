"""Shared fixtures: a small synthetic atlas written once per session, and the real data folder."""

from __future__ import annotations

import os

# OpenBLAS threads spinning against torch's on two cores made numpy's eigh 25-50x slower; pin them first
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# two cores: one torch thread keeps tests from fighting each other and the loader
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found (the project's ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_atlas(tmp_path_factory) -> Path:
    """600 cells x 200 genes, 3 batches, 4 cell types, as an .h5ad."""
    from scvi_scale.datasets.synthetic import SyntheticSpec, write_h5ad

    path = tmp_path_factory.mktemp("atlas") / "small.h5ad"
    write_h5ad(SyntheticSpec(n_cells=600, n_genes=200, n_batches=3, n_cell_types=4, seed=7), path)
    return path
