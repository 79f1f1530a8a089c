"""`scvi-scale demo`, the README's main job, end to end at a small size."""

from __future__ import annotations

import json

import anndata
import numpy as np

from tests.cli.test_cli import cli


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = cli(
        "demo", "--out", out, "--n-cells", "1200", "--n-genes", "300", "--epochs", "6", "--view", "pca", "--no-progress"
    )
    assert "held_out_elbo" in proc.stdout
    report = json.loads((out / "report" / "metrics.json").read_text())
    assert report["summary"]["epochs"] == 6 and np.isfinite(report["held_out"]["elbo"])
    assert set(report["integration"]) == {"scvi", "lognorm_pca"}
    for png in ("loss_curves.png", "embedding.png"):
        data = (out / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    emb = anndata.read_h5ad(out / "embedding.h5ad")
    assert emb.obsm["X_scvi"].shape == (1200, 10)
    # synthetic cell types are well separated: the embedding must find them
    assert report["integration"]["scvi"]["integration/knn_label_accuracy"] > 0.9
    # a finished demo is not silently overwritten
    again = cli("demo", "--out", out, "--n-cells", "1200", check=False)
    assert again.returncode == 2 and "already holds" in again.stderr
