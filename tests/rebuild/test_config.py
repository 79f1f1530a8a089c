"""The rebuild config: the example in deploy/ parses; unknown keys and wrong types name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scvi_scale.cli import main
from scvi_scale.config import ConfigError
from scvi_scale.rebuild import load_rebuild_config, rebuild_config_from_dict

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "atlas.example.yaml"


def test_example_parses() -> None:
    cfg = load_rebuild_config(EXAMPLE)
    assert cfg.inputs[0] == "s3://atlas-incoming/samples/"
    assert cfg.store == "/data/atlas/atlas.zarr" and cfg.runs == "/data/atlas/runs"
    assert cfg.train.model.n_latent == 30 and cfg.train.train.max_epochs == 100
    assert cfg.policy.warm_start and cfg.policy.full_retrain_every == 7 and cfg.policy.batch_key == "sample"
    assert cfg.policy.max_elbo_worsening == 0.01 and cfg.prepare.n_top_genes == 4000
    assert main(["rebuild", "--config", str(EXAMPLE), "--dry-run"]) == 0


BASE = {"inputs": "in", "store": "atlas.zarr", "runs": "runs"}


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({**BASE, "polcy": {}}, "unknown key polcy"),
        ({**BASE, "policy": {"warm_strat": True}}, "unknown key policy.warm_strat"),
        ({**BASE, "train": {"model": {"n_latnt": 3}}}, "unknown key train.model.n_latnt"),
        ({**BASE, "train": {"train": {"max_epochs": "many"}}}, "train.train.max_epochs must be an integer"),
        ({**BASE, "policy": {"holdout_fraction": 1.5}}, "holdout_fraction"),
        ({**BASE, "policy": {"batch_key": "a"}, "train": {"data": {"batch_key": "b"}}}, "set the batch key once"),
        ({**BASE, "store": "s3://b/atlas.zarr"}, "local Zarr path"),
        ({"inputs": "in", "runs": "runs"}, "needs store"),
        ({**BASE, "inputs": []}, "inputs must be"),
    ],
)
def test_errors_name_the_key(tree: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        rebuild_config_from_dict(tree)


def test_relative_paths_follow_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "atlas.yaml"
    path.write_text(yaml.safe_dump({**BASE, "inputs": ["in", "s3://b/p/"]}))
    cfg = load_rebuild_config(path)
    assert cfg.inputs == (str(tmp_path / "conf" / "in"), "s3://b/p/")
    assert cfg.store == str(tmp_path / "conf" / "atlas.zarr")


def test_cli_bad_config_exits_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "atlas.yaml"
    path.write_text(yaml.safe_dump({**BASE, "extra": 1}))
    assert main(["rebuild", "--config", str(path)]) == 2
    assert "unknown key extra" in capsys.readouterr().err
