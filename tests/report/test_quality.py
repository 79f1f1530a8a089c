"""quality_numbers against direct computations: held-out ELBO = api.evaluate on the validation rows, etc."""

from __future__ import annotations

import logging
import math

import anndata
import numpy as np
import pytest
import torch

from scvi_scale import api
from scvi_scale.report.quality import compute_quality, heldout_rows, quality_numbers
from scvi_scale.store.errors import InputError
from tests.report import report_fixtures

trained_run = report_fixtures.trained_run  # the shared session fixture


def test_heldout_elbo_equals_evaluate_on_validation_rows(trained_run, small_atlas):
    q = quality_numbers(trained_run, small_atlas, labels_key="cell_type", use_scib=False, seed=3)
    val = np.load(trained_run.path / "split.npz")["validation"]
    adata = anndata.read_h5ad(small_atlas)
    torch.manual_seed(3)  # quality_numbers seeds the draws of z the same way
    direct = api.evaluate(trained_run, adata[val].copy())
    assert q["heldout/n_cells"] == len(val) == direct["n_cells"]
    assert q["heldout/is_validation_split"] == 1.0
    assert q["heldout/neg_elbo"] == pytest.approx(direct["elbo"], rel=1e-6)
    assert q["heldout/reconstruction_loss"] == pytest.approx(direct["reconstruction_loss"], rel=1e-6)
    # the contract's keys, all floats; the same call gives the same numbers
    for key in ("heldout/neg_elbo", "integration/total", "integration/batch", "integration/bio"):
        assert isinstance(q[key], float) and math.isfinite(q[key])
    assert q["integration/total"] == pytest.approx(0.4 * q["integration/batch"] + 0.6 * q["integration/bio"])
    assert "marginal_ll" not in q
    assert quality_numbers(trained_run, small_atlas, labels_key="cell_type", use_scib=False, seed=3) == q


def test_other_data_is_held_out_whole(trained_run, small_atlas):
    adata = anndata.read_h5ad(small_atlas)[:250].copy()
    q = quality_numbers(trained_run.path, adata, use_scib=False, marginal_ll=True, n_mc_samples=20, max_cells=120)
    assert q["heldout/n_cells"] == 250 and q["heldout/is_validation_split"] == 0.0
    torch.manual_seed(0)
    assert q["heldout/neg_elbo"] == pytest.approx(api.evaluate(trained_run, adata)["elbo"], rel=1e-6)
    # no labels: no bio score, and the total is the batch score
    assert math.isnan(q["integration/bio"])
    assert q["integration/total"] == q["integration/batch"]
    assert q["integration/n_cells"] == 120
    # the marginal likelihood is at least the ELBO on average (a tighter bound), and finite
    assert -q["marginal_ll"] < q["heldout/neg_elbo"] + 1.0
    assert q["marginal_ll/n_cells"] == 250


def test_heldout_rows_modes(trained_run):
    n = sum(len(v) for v in np.load(trained_run.path / "split.npz").values())
    rows, why = heldout_rows(trained_run, n)
    assert "validation" in why and len(rows) < n
    assert len(heldout_rows(trained_run, n, "all")[0]) == n
    with pytest.raises(InputError, match="not the data the run"):
        heldout_rows(trained_run, n + 1, "validation")


def test_bad_keys_name_the_columns(trained_run, small_atlas):
    with pytest.raises(InputError, match=r"'celltype'.*available columns are: batch, cell_type"):
        quality_numbers(trained_run, small_atlas, labels_key="celltype", use_scib=False)
    with pytest.raises(InputError, match=r"'donor'"):
        quality_numbers(trained_run, small_atlas, batch_key="donor", use_scib=False)


def test_without_scib_metrics_the_fallback_is_named(trained_run, small_atlas, monkeypatch, caplog):
    import scvi_scale.report.integration as integration

    monkeypatch.setattr(integration, "scib_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        res = compute_quality(trained_run, small_atlas, labels_key="cell_type", max_cells=300)
    assert res.numbers["integration/uses_scib_metrics"] == 0.0
    assert "integration/knn_label_accuracy" in res.numbers
    assert "pip install 'scvi-scale[report]'" in caplog.text
    assert any("scvi-scale's own metrics" in n and "scvi-scale[report]" in n for n in res.notes)
    with pytest.raises(ImportError, match=r"scvi-scale\[report\]"):
        integration.integration_scores(res.z_nk, res.batch_n, res.labels_n, use_scib=True)


@pytest.mark.slow
def test_scib_metrics_scores(trained_run, small_atlas):
    pytest.importorskip("scib_metrics")
    q = quality_numbers(trained_run, small_atlas, labels_key="cell_type", seed=0)
    assert q["integration/uses_scib_metrics"] == 1.0
    for key in ("integration/ilisi_knn", "integration/kbet_per_label", "integration/silhouette_label",
                "integration/nmi_ari_cluster_labels_kmeans_nmi", "integration/pcr_comparison"):  # fmt: skip
        assert 0.0 <= q[key] <= 1.0, key
    batch = np.mean([q[f"integration/{m}"] for m in
                     ("bras", "ilisi_knn", "kbet_per_label", "graph_connectivity", "pcr_comparison")])  # fmt: skip
    assert q["integration/batch"] == pytest.approx(batch)
    assert q["integration/total"] == pytest.approx(0.4 * q["integration/batch"] + 0.6 * q["integration/bio"])
