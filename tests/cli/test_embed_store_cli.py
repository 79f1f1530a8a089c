"""`scvi-scale embed RUN STORE`: the embedding written into the store, a rerun that does nothing, one-line
refusals, and a run killed with SIGKILL mid-way that a rerun completes to the bytes of an uninterrupted run.

The first embedding and the killed one run as real subprocesses; reruns and refusals call ``cli.main`` here
(the same code path, without another interpreter start-up)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import pytest

from scvi_scale import api
from scvi_scale.cli import main
from scvi_scale.infer import writeback
from scvi_scale.store.convert import convert
from scvi_scale.store.open import open_store
from tests.cli.test_cli import cli

TRAIN = {"data": {"batch_key": "batch", "batch_size": 128}, "model": {"n_hidden": 32, "n_latent": 6},
         "train": {"max_epochs": 1, "progress": False, "num_threads": 1}}  # fmt: skip


@pytest.fixture(scope="module")
def store(small_atlas: Path, tmp_path_factory) -> Path:
    return Path(convert([small_atlas], tmp_path_factory.mktemp("cli") / "atlas.zarr", batch_key="batch",
                        progress=False).source)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(store: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-run") / "run"
    api.train(store, out, **TRAIN)
    return out


def _copy(store: Path, where: Path) -> Path:
    return Path(shutil.copytree(store, where / store.name))


def test_embed_into_store_then_rerun_does_nothing(store, run_dir, tmp_path, capsys):
    path = _copy(store, tmp_path)
    args = ("embed", run_dir, path, "--outputs", "latent,latent_var", "--region-rows", "128", "--no-progress")
    out = cli(*args).stdout
    assert "wrote 5, 0 already committed, complete" in out
    adata = anndata.read_zarr(path)
    assert adata.obsm["X_scvi"].shape == (600, 6) and adata.obsm["X_scvi_var"].dtype == np.float32
    np.testing.assert_allclose(adata.obsm["X_scvi"], api.embed(run_dir, store).obsm["X_scvi"], rtol=1e-6, atol=1e-6)
    assert main([*map(str, args)]) == 0  # the rerun in this process: the CLI's code path, without a startup
    assert "already complete, nothing to do" in capsys.readouterr().out


def test_refusals_are_one_line(store, run_dir, small_atlas, tmp_path, capsys):
    assert main(["embed", str(run_dir), str(small_atlas)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and err.startswith("error: ") and err.count("\n") == 1
    anndata.read_h5ad(small_atlas)[:, :150].copy().write_h5ad(tmp_path / "fewer.h5ad")
    fewer = convert([tmp_path / "fewer.h5ad"], tmp_path / "fewer.zarr", batch_key="batch", progress=False)
    assert main(["embed", str(run_dir), fewer.source, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "150 genes, but the model was trained on 200" in err and err.count("\n") == 1


def _committed(path: Path) -> int:
    chunks = path / "uns" / writeback.MARKS / "c"
    return sum(1 for p in chunks.iterdir() if p.name.isdigit()) if chunks.is_dir() else 0


@pytest.mark.timeout(300)
def test_sigkill_then_rerun_is_byte_identical(store, run_dir, tmp_path, capsys):
    # 4-row regions: 150 of them, so that the kill lands mid-way
    args = ["--outputs", "latent,latent_var,library", "--region-rows", "4", "--batch-size", "4", "--threads", "1"]
    once = _copy(store, tmp_path / "once")
    assert api.embed_to_store(run_dir, once, ("latent", "latent_var", "library"), region_rows=4, batch_size=4).complete
    path = _copy(store, tmp_path / "killed")
    cmd = [sys.executable, "-m", "scvi_scale", "embed", str(run_dir), str(path), *args, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _committed(path) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the embedding ended before it could be killed"
    committed = _committed(path)
    assert 0 < committed < 150
    assert not open_store(path).metadata["embed"]["complete"]
    assert main(["embed", str(run_dir), str(path), *args, "--no-progress"]) == 0
    assert f"{committed} already committed, complete" in capsys.readouterr().out
    for key in ("X_scvi", "X_scvi_var", "X_scvi_library"):
        assert open_store(path).read_obsm(key).tobytes() == open_store(once).read_obsm(key).tobytes(), key
