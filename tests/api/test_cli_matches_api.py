"""The CLI is a thin layer over the API: the same config gives the same weights and metrics either way, and
cli.py reaches the package only through the API."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import scvi_scale as ss
from scvi_scale import cli

CONFIG = {
    "model": {"n_hidden": 32, "n_latent": 5},
    "data": {"batch_key": "batch", "batch_size": 64},
    "train": {"max_epochs": 3, "n_epochs_kl_warmup": 2, "seed": 3, "num_threads": 1, "progress": False},
}


def test_cli_and_api_train_the_same_model(tmp_path: Path, small_atlas: Path):
    config = ss.load_config(**CONFIG)
    (tmp_path / "cfg.yaml").write_text(config.to_yaml())
    cmd = [sys.executable, "-m", "scvi_scale", "train", str(small_atlas), "--out", str(tmp_path / "cli"),
           "--config", str(tmp_path / "cfg.yaml")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "epochs=3" in proc.stdout  # the CLI prints the Run

    ss.train(small_atlas, tmp_path / "api", tmp_path / "cfg.yaml")
    a = torch.load(tmp_path / "cli" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "api" / "model.pt", weights_only=True)
    assert a["config"] == b["config"] and a["meta"] == b["meta"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    ma, mb = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("cli", "api"))
    losses = [c for c in ma.columns if c.startswith(("train/", "validation/")) or c == "kl_weight"]
    pd.testing.assert_frame_equal(ma[losses], mb[losses])


def test_cli_evaluate_prints_the_api_result(tmp_path: Path, small_atlas: Path, capsys):
    run = ss.train(small_atlas, tmp_path / "run", **CONFIG)
    assert cli.main(["evaluate", str(run.path), str(small_atlas), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    direct = ss.evaluate(run, small_atlas)  # z is sampled, so the numbers differ a little from call to call
    assert printed.keys() == direct.keys() and printed["n_cells"] == direct["n_cells"] == 600
    assert printed["elbo"] == pytest.approx(direct["elbo"], rel=0.05)
    assert cli.main(["evaluate", str(run.path), str(small_atlas)]) == 0
    assert "reconstruction_loss" in capsys.readouterr().out


def test_cli_handlers_reach_the_package_only_through_the_api():
    """cli.py imports the API (and the config loader and error types it re-exports), nothing else of ours."""
    allowed = {"scvi_scale", "scvi_scale.api", "scvi_scale.config", "scvi_scale.store.errors", "scvi_scale.train.loop"}
    tree = ast.parse(Path(cli.__file__).read_text())
    ours = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scvi_scale")
    }
    ours |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.startswith("scvi_scale")
    }
    assert ours <= allowed, sorted(ours - allowed)
