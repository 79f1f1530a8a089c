"""`scvi-scale normalize | de | sample`: the analysis tasks from the command line, their outputs and one-line
refusals (exit 2). The commands run through ``cli.main`` in this process (the CLI's code path, without another
interpreter start-up per call); one runs as a real subprocess."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from scvi_scale import api
from scvi_scale.cli import main
from scvi_scale.store.convert import convert
from scvi_scale.store.open import open_store
from tests.cli.test_cli import cli

TRAIN = {"data": {"batch_key": "batch", "batch_size": 128}, "model": {"n_hidden": 16, "n_latent": 4},
         "train": {"max_epochs": 1, "progress": False, "num_threads": 1}}  # fmt: skip


@pytest.fixture(scope="module")
def store(small_atlas: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    return Path(convert([small_atlas], root / "atlas.zarr", batch_key="batch", progress=False).source)


@pytest.fixture(scope="module")
def run_dir(store: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks-run") / "run"
    api.train(store, out, **TRAIN)
    return out


def test_help_lists_the_task_commands():
    out = cli("--help").stdout
    for command in ("normalize", "de", "sample"):
        assert command in out
    assert "--transform-batch" in cli("normalize", "--help").stdout


def test_normalize_into_the_store_then_rerun_does_nothing(store, run_dir, tmp_path, capsys):
    path = Path(shutil.copytree(store, tmp_path / "atlas.zarr"))
    args = ["normalize", str(run_dir), str(path), "--genes", "gene_0001,gene_0005", "--transform-batch", "batch_0",
            "--region-rows", "256", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "wrote 3, 0 already committed, complete" in capsys.readouterr().out
    x = anndata.read_zarr(path).obsm["scvi_normalized"]
    assert x.shape == (600, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    assert main(args) == 0
    assert "already complete, nothing to do" in capsys.readouterr().out
    csv = tmp_path / "norm.csv"
    assert main([*args[:-3], "--region-rows", "256", "--out", str(csv), "--no-progress"]) == 0
    frame = pd.read_csv(csv, index_col=0)
    np.testing.assert_array_equal(frame.to_numpy(np.float32), open_store(path).read_obsm("scvi_normalized"))


def test_de_writes_a_csv_and_prints_the_top_genes(store, run_dir, tmp_path, capsys):
    out = tmp_path / "de" / "t0_t1.csv"
    args = ["de", str(run_dir), str(store), "--groupby", "cell_type", "--group1", "type_0", "--group2", "type_1",
            "--mode", "change", "--n-samples", "500", "--top", "5", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out, index_col="gene")
    assert len(table) == 200 and {"proba_de", "lfc_mean", "is_de_fdr_0.05", "raw_mean1"} <= set(table.columns)
    assert printed.startswith("type_0 vs type_1: 200 genes, change mode; top 5:")
    assert all(g in printed for g in table.index[:5])
    where = ["--where", "batch=batch_0", "--where", "batch=batch_1"]
    assert main(["de", str(run_dir), str(store), "--groupby", "cell_type", "--group1", "type_2", *where,
                 "--n-samples", "200", "--no-progress"]) == 0  # fmt: skip
    assert "type_2 vs Rest" in capsys.readouterr().out


def test_sample_saves_counts(store, run_dir, tmp_path, capsys):
    out = tmp_path / "pp.npy"
    assert main(["sample", str(run_dir), str(store), "--cells", "4,0,9", "--n-samples", "3", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    counts = np.load(out)
    assert counts.shape == (3, 200, 3) and np.array_equal(counts, counts.round())
    assert "counts of shape (3, 200, 3)" in capsys.readouterr().out


def test_refusals_are_one_line_with_exit_2(store, run_dir, tmp_path, small_atlas):
    proc = cli("de", run_dir, store, "--groupby", "cell_type", "--group1", "type_7", check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "no cells with cell_type == 'type_7'" in proc.stderr
    for args, message in (
        (["normalize", run_dir, store, "--genes", "NOPE", "--out", tmp_path / "x.csv"], "gene 'NOPE'"),
        (["normalize", run_dir, small_atlas], "pass --out X.csv"),
        (["normalize", run_dir, store, "--transform-batch", "b9", "--out", tmp_path / "x.csv"], "transform batch 'b9'"),
        (["sample", run_dir, store, "--where", "cell_type", "--out", tmp_path / "x.npy"], "expected COLUMN=VALUE"),
        (["de", run_dir, store, "--groupby", "kind", "--group1", "a"], "no obs column 'kind'"),
    ):
        assert main([*map(str, args), "--no-progress"]) == 2, message
