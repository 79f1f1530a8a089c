"""Nightly rebuilds on a growing synthetic atlas: versions, warm start with a new batch, the gate, nothing to do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scvi_scale import api
from scvi_scale.cli import main
from scvi_scale.rebuild import RunRoot, rebuild
from scvi_scale.rebuild.heldout import heldout_mask
from scvi_scale.rebuild.run import LEDGER
from scvi_scale.store.zarr_store import ZarrStore
from tests.rebuild.conftest import add_input, make_config

pytestmark = pytest.mark.slow


def _latest(runs: Path) -> str:
    return json.loads((runs / "latest").read_text())["version"]


def test_three_nights_then_nothing(tmp_path: Path, atlas_parts: list[Path], capsys) -> None:
    cfg = make_config(tmp_path)
    runs, versions = tmp_path / "runs", []
    for night in range(3):
        add_input(atlas_parts, night, tmp_path / "incoming")
        result = rebuild(cfg)
        assert result.status == "published", result
        versions.append(result.version)
        assert _latest(runs) == result.version  # latest moved
        api.load_run(runs / "versions" / result.version)
    assert versions == ["v0001", "v0002", "v0003"]
    manifests = [RunRoot(runs).manifest(v) for v in versions]
    assert [m["mode"] for m in manifests] == ["full", "warm", "warm"]
    assert [m["parent"] for m in manifests] == [None, "v0001", "v0002"]

    # the third night brought batch_2: the warm start extended the batch covariates (surgery)
    v2, v3 = (api.load_run(runs / "versions" / v) for v in versions[1:])
    assert v2.batch_categories == ["batch_0", "batch_1"]
    assert sorted(v3.batch_categories) == ["batch_0", "batch_1", "batch_2"] and v3.var_names == v2.var_names

    # every cell once, in the order of the nights; the ledger records each input with its rows
    store = ZarrStore(cfg.store)
    sizes = [api.open_counts(p).n_obs for p in atlas_parts]
    assert store.n_obs == sum(sizes)
    ledger = store.metadata[LEDGER]
    assert [r["rows"] for r in ledger] == [[0, sizes[0]], [sizes[0], sum(sizes[:2])], [sum(sizes[:2]), sum(sizes)]]
    assert not np.isnan(store.read_obsm("X_scvi")).any()
    assert store.metadata["embed"]["model_hash"] == manifests[-1]["model_hash"]

    # the held-out cells were never trained or validated on, and the gate compared on the previous set
    held = np.flatnonzero(heldout_mask(store, 0.15, None, None)[0])
    with np.load(runs / "versions" / "v0003" / "split.npz") as split:
        seen = np.concatenate([split["train"], split["validation"]])
    assert held.size > 100 and not np.intersect1d(held, seen).size and seen.size + held.size == store.n_obs
    assert manifests[2]["gate"]["on_previous_set"]["heldout/n_cells"] == manifests[1]["quality"]["heldout/n_cells"]

    # no new inputs: nothing done, exit 0 (through the command line)
    cfg_file = tmp_path / "atlas.yaml"
    cfg_file.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    assert main(["rebuild", "--config", str(cfg_file), "--no-progress"]) == 0
    assert "nothing: no new inputs among 3; latest is v0003" in capsys.readouterr().out
    assert sorted(p.name for p in (runs / "versions").iterdir()) == versions


def test_gate_refuses_a_worse_model(tmp_path: Path, atlas_parts: list[Path]) -> None:
    add_input(atlas_parts, 0, tmp_path / "incoming")
    assert rebuild(make_config(tmp_path)).version == "v0001"
    store_hash = ZarrStore(tmp_path / "atlas.zarr").metadata["embed"]["model_hash"]

    # night 2 under a policy that retrains from scratch for one epoch at a tiny learning rate: genuinely worse
    add_input(atlas_parts, 1, tmp_path / "incoming")
    worse = make_config(tmp_path, train={"max_epochs": 1, "lr": 1e-5}, full_retrain=True)
    result = rebuild(worse)
    assert result.status == "refused" and result.version is None, result
    assert "heldout/neg_elbo" in result.message and "worse" in result.message
    on_prev, prev = result.gate["on_previous_set"], result.gate["previous"]
    assert on_prev["heldout/neg_elbo"] > prev["heldout/neg_elbo"] * 1.01
    assert "refused" in repr(result)

    # latest, its version folder and the store's embedding are those of v0001
    runs = tmp_path / "runs"
    assert _latest(runs) == "v0001" and sorted(p.name for p in (runs / "versions").iterdir()) == ["v0001"]
    api.load_run(runs / "versions" / "v0001")
    assert ZarrStore(tmp_path / "atlas.zarr").metadata["embed"]["model_hash"] == store_hash

    again = rebuild(worse)  # nothing new: the refused attempt is not retried
    assert again.status == "nothing" and "refused by the gate" in again.message


def test_bad_input_rolls_back_and_is_not_retried(tmp_path: Path, atlas_parts: list[Path]) -> None:
    import anndata

    from scvi_scale.store.errors import InputError

    add_input(atlas_parts, 0, tmp_path / "incoming")
    cfg = make_config(tmp_path)
    assert rebuild(cfg).version == "v0001"
    n1 = ZarrStore(cfg.store).n_obs
    add_input(atlas_parts, 1, tmp_path / "incoming")
    bad = anndata.read_h5ad(atlas_parts[0])[:50].copy()
    bad.obs_names = [f"bad_{i}" for i in range(50)]
    bad.X = bad.X.astype(np.float32) * 0.5  # not counts
    bad.write_h5ad(tmp_path / "incoming" / "zz_bad.h5ad")  # appended after night2's cells were written
    with pytest.raises(InputError, match="zz_bad.h5ad"):
        rebuild(cfg)
    assert ZarrStore(cfg.store).n_obs == n1  # rolled back: the store (and v0001's embedding) stays readable
    assert _latest(tmp_path / "runs") == "v0001"
    (tmp_path / "incoming" / "zz_bad.h5ad").unlink()
    result = rebuild(cfg)  # a new attempt, without the bad input
    assert result.version == "v0002" and result.new_inputs == 1, result
