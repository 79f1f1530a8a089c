"""Data-parallel training with real processes: 2 local workers, 2 torchrun ranks and 2 Ray Train workers each end
with the same parameters as one process fed the same global minibatches; resuming on fewer workers works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scvi_scale import api
from tests.dist.conftest import EPOCHS, SECTIONS, assert_same_parameters


@pytest.mark.timeout(300)
def test_local_launcher_two_workers(store_path: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "local"
    run = api.train(store_path, out, **{**SECTIONS, "train": {**SECTIONS["train"], "workers": 2}})
    assert_same_parameters(out, reference)
    metrics = run.metrics
    assert list(metrics["world_size"]) == [2] * EPOCHS and len(metrics) == EPOCHS
    assert np.isfinite(metrics["validation/elbo"]).all()


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "scvi_scale", *args],
        capture_output=True, text=True, timeout=280, env=env,
    )  # fmt: skip


def _cli_overrides() -> list[str]:
    flat = []
    for section, values in SECTIONS.items():
        for key, value in values.items():
            flat += ["--set", f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return flat


@pytest.mark.timeout(300)
def test_torchrun_two_ranks(store_path: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "torchrun"
    proc = _torchrun("train", str(store_path), "--out", str(out), *_cli_overrides())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_parameters(out, reference)
    assert proc.stdout.count("Run(") <= 1  # rank 0 alone prints the summary


@pytest.mark.timeout(300)
def test_torchrun_bad_input_is_one_line_on_every_rank(store_path: Path, tmp_path: Path) -> None:
    proc = _torchrun("train", str(store_path), "--out", str(tmp_path / "r"), "--batch-key", "nope")
    assert proc.returncode != 0
    assert "no obs column 'nope'" in proc.stderr


@pytest.mark.timeout(300)
def test_resume_two_workers_on_one(store_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    train = {**SECTIONS["train"], "workers": 2, "max_epochs": 1, "checkpoint_every_n_steps": 3}
    api.train(store_path, out, **{**SECTIONS, "train": train})
    run = api.train(store_path, None, resume=out, train={"max_epochs": 3, "workers": 1})
    assert run.fit_result.epochs == 3
    metrics = api.load_run(out).metrics
    assert list(metrics["epoch"]) == [0, 1, 2] and list(metrics["world_size"].fillna(1)) == [2, 1, 1]


def test_launcher_errors(store_path: Path, tmp_path: Path) -> None:
    from scvi_scale.store import InputError

    with pytest.raises(InputError, match="torchrun --nproc_per_node"):
        api.train(store_path, tmp_path / "a", train={"launcher": "torchrun"})
    import anndata

    with pytest.raises(InputError, match="pass a path or URL"):
        api.train(anndata.read_zarr(store_path), tmp_path / "b", train={"workers": 2})
