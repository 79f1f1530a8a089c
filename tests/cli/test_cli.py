"""The `scvi-scale` command as a user runs it: real subprocesses, real files, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "scvi_scale", *map(str, args)], capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_lists_commands():
    out = cli("--help").stdout
    for command in ("demo", "train", "embed", "evaluate", "import-scvi-tools", "export-scvi-tools"):
        assert command in out
    assert "--batch-key" in cli("train", "--help").stdout


def test_train_embed_evaluate(tmp_path, small_atlas):
    run = tmp_path / "run"
    cli(
        "train",
        small_atlas,
        "--out",
        run,
        "--batch-key",
        "batch",
        "--epochs",
        "3",
        "--no-progress",
        "--set",
        "model.n_hidden=32",
        "--set",
        "model.n_latent=6",
    )
    assert (run / "model.pt").is_file() and (run / "config.yaml").is_file()
    assert len(pd.read_csv(run / "metrics.csv")) == 3
    cli("embed", run, small_atlas, "--out", tmp_path / "emb.h5ad")
    emb = anndata.read_h5ad(tmp_path / "emb.h5ad")
    assert emb.obsm["X_scvi"].shape == (600, 6) and emb.obsm["X_scvi"].dtype == np.float32
    assert np.isfinite(emb.obsm["X_scvi"]).all()
    result = json.loads(cli("evaluate", run, small_atlas, "--json").stdout)
    assert result["n_cells"] == 600
    assert result["elbo"] == pytest.approx(result["reconstruction_loss"] + result["kl_local"], rel=1e-9)
    assert 0 < result["kl_local"] < result["elbo"]


def test_existing_out_is_refused_then_overwritten(tmp_path, small_atlas):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("x")
    proc = cli("train", small_atlas, "--out", run, "--epochs", "1", "--no-progress", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_dry_run_touches_no_data(tmp_path):
    proc = cli("train", tmp_path / "nothing.h5ad", "--out", tmp_path / "r", "--dry-run", "--set", "model.n_latent=7")
    assert "n_latent: 7" in proc.stdout and not (tmp_path / "r").exists()


def _write(path: Path, x, obs=None, var_names=None):
    """Write an .h5ad as a user's pipeline would (duplicate gene names included, so anndata's warning is expected)."""
    import warnings

    n, g = x.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = anndata.AnnData(
            X=x,
            obs=obs if obs is not None else pd.DataFrame(index=[f"c{i}" for i in range(n)]),
            var=pd.DataFrame(index=var_names or [f"g{j}" for j in range(g)]),
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Variable names are not unique": that is the point
        a.write_h5ad(path)
    return path


@pytest.mark.parametrize(
    "case, expect",
    [
        ("fractional", ["non-integer", "row", "--layer"]),
        ("negative", ["negative"]),
        ("nan", ["NaN"]),
        ("empty_cell", ["zero", "--drop-empty-cells"]),
        ("duplicate_genes", ["duplicate", "gA"]),
        ("missing_batch", ["donor", "column"]),
        ("missing_file", ["no such file"]),
        ("bad_override", ["unknown key model.bogus"]),
        ("empty_file", ["empty"]),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, case, expect):
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(40, 12)).astype(np.float32) + np.eye(40, 12, dtype=np.float32)
    x[:, 0] += 1
    path = tmp_path / f"{case}.h5ad"
    extra: list[str] = []
    if case == "fractional":
        x[5, 3] = 1.5
    elif case == "negative":
        x[2, 1] = -1
    elif case == "nan":
        x[7, 4] = np.nan
    elif case == "empty_cell":
        x[9] = 0
    elif case == "missing_batch":
        extra = ["--batch-key", "donor"]
    elif case == "bad_override":
        extra = ["--set", "model.bogus=3"]
    if case == "duplicate_genes":
        _write(path, sp.csr_matrix(x), var_names=["gA"] * 2 + [f"g{j}" for j in range(10)])
    elif case == "empty_file":
        _write(path, sp.csr_matrix((0, 12), dtype=np.float32))
    elif case != "missing_file":
        _write(path, sp.csr_matrix(x))
    proc = cli("train", path, "--out", tmp_path / "run", "--epochs", "1", "--no-progress", *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in expect:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    if case not in ("missing_file", "bad_override"):
        assert path.name in lines[0]


def test_drop_empty_cells_trains(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.poisson(2.0, size=(300, 20)).astype(np.float32)
    x[:, 0] += 1
    x[[3, 50]] = 0
    path = _write(tmp_path / "holes.h5ad", sp.csr_matrix(x))
    cli("train", path, "--out", tmp_path / "run", "--epochs", "1", "--no-progress", "--drop-empty-cells")
    split = np.load(tmp_path / "run" / "split.npz")
    assert len(split["train"]) + len(split["validation"]) == 298


def test_resume_extends_a_finished_run(tmp_path, small_atlas):
    run = tmp_path / "run"
    common = ["--batch-key", "batch", "--no-progress", "--set", "model.n_hidden=16"]
    cli("train", small_atlas, "--out", run, "--epochs", "2", *common)
    cli("train", small_atlas, "--out", run, "--resume", run, "--epochs", "4", "--no-progress")
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1, 2, 3]
    assert "n_hidden: 16" in (run / "config.yaml").read_text()
    bad = cli("train", small_atlas, "--out", run, "--resume", tmp_path / "nope", "--no-progress", check=False)
    assert bad.returncode == 2 and "nope" in bad.stderr
