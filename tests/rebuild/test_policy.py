"""Which training a night gets (warm or full), and the gate's arithmetic."""

from __future__ import annotations

import math
from pathlib import Path

from scvi_scale.rebuild.run import RebuildResult, _gate, _heldout_changed, _mode
from tests.rebuild.conftest import make_config


def _prev(cfg, streak: int) -> dict:
    return {"version": "v0004", "warm_streak": streak, "config": cfg.to_dict()}


def test_warm_or_full(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    assert _mode(cfg, None) == ("full", "first version")
    assert _mode(cfg, _prev(cfg, 5)) == ("warm", "warm start from v0004")
    every3 = make_config(tmp_path, full_retrain_every=3)
    assert _mode(every3, _prev(every3, 1))[0] == "warm"
    assert _mode(every3, _prev(every3, 2)) == ("full", "policy: a full retrain every 3 versions")
    assert _mode(make_config(tmp_path, full_retrain=True), _prev(cfg, 0))[0] == "full"
    assert _mode(make_config(tmp_path, warm_start=False), _prev(cfg, 0))[0] == "full"
    other = _prev(cfg, 0)
    other["config"]["train"]["model"]["n_latent"] = 20
    assert _mode(cfg, other) == ("full", "the model section changed since the last version")
    assert _mode(make_config(tmp_path, batch_key="donor"), _prev(cfg, 0)) == (
        "full", "policy.batch_key changed since the last version"
    )  # fmt: skip


def test_changed_heldout_settings_are_named(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    assert _heldout_changed(cfg, _prev(cfg, 0)) == []
    moved = make_config(tmp_path, holdout_fraction=0.3, cell_id_key="barcode")
    assert _heldout_changed(moved, _prev(cfg, 0)) == ["holdout_fraction", "cell_id_key"]


def test_gate_tolerances(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, max_elbo_worsening=0.01, max_integration_drop=0.02)
    old = {"heldout/neg_elbo": 200.0, "integration/total": 0.70, "integration/uses_scib_metrics": 0.0}

    def gate(elbo: float, total: float | None, scib: float = 0.0, same_genes: bool = True) -> bool:
        new = {"heldout/neg_elbo": elbo, "integration/total": total, "integration/uses_scib_metrics": scib}
        return _gate(new, old, cfg, same_genes)[0]

    assert gate(201.9, 0.69) and gate(150.0, 0.99)  # within 1% and 0.02, or better
    assert not gate(202.1, 0.70)  # held-out -ELBO 1.05% worse
    assert not gate(199.0, 0.67)  # integration dropped by 0.03
    assert gate(199.0, None) and gate(199.0, 0.1, scib=1.0)  # not computable, or other metrics: not compared
    assert not gate(math.nan, 0.7)  # a diverged model is never published
    assert gate(500.0, 0.7, same_genes=False)  # new genes: the ELBOs are not comparable
    assert not gate(math.nan, 0.7, same_genes=False)  # ... but a diverged model is still refused

    def gate_after(previous: float, elbo: float) -> bool:  # a previous version whose own score is not finite
        prev = {**old, "heldout/neg_elbo": previous}
        new = {"heldout/neg_elbo": elbo, "integration/total": 0.7, "integration/uses_scib_metrics": 0.0}
        return _gate(new, prev, cfg, True)[0]

    assert gate_after(math.nan, 210.0)  # nothing to compare with: not refused forever
    assert gate_after(math.nan, math.nan)  # no held-out cells on either side


def test_result_repr() -> None:
    r = RebuildResult("published", "v0003 (warm start from v0002; 1 new inputs, 3000 cells)", version="v0003",
                      quality={"heldout/neg_elbo": 123.456, "integration/total": 0.81234, "x": 1.0})  # fmt: skip
    assert repr(r) == (
        "RebuildResult(published: v0003 (warm start from v0002; 1 new inputs, 3000 cells); "
        "heldout/neg_elbo=123.5, integration/total=0.8123)"
    )
    assert repr(RebuildResult("nothing", "no new inputs among 3; latest is v0003")).startswith("RebuildResult(nothing")
