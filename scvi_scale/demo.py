"""``scvi-scale demo``: the main job end to end on the built-in synthetic atlas.

Generates the atlas (``atlas.h5ad``), trains scVI (``run/``), embeds every cell (``embedding.h5ad``) and
writes ``report/``: ``loss_curves.png``, ``embedding.png`` (2-D view coloured by batch and cell type) and
``metrics.json`` (held-out ELBO, integration metrics of scVI next to a log-normalised PCA baseline).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from scvi_scale import api
from scvi_scale.datasets.synthetic import SyntheticSpec, write_h5ad
from scvi_scale.store.errors import InputError

log = logging.getLogger(__name__)


def run_demo(
    out: Path,
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    epochs: int = 30,
    seed: int = 0,
    progress: bool = True,
    n_batches: int = 4,
    n_cell_types: int = 8,
    view: str = "auto",
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the report dict (also written to ``report/metrics.json``)."""
    from scvi_scale.report.embed2d import embed_2d
    from scvi_scale.report.metrics import integration_summary, lognorm_pca
    from scvi_scale.report.plots import plot_embedding, plot_loss_curves

    if n_cells < 200:
        raise InputError(f"--n-cells {n_cells} is too small for a train/validation split; use at least 200")
    out = Path(out)
    if (out / "report" / "metrics.json").exists():
        raise InputError(f"{out} already holds a finished demo; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    spec = SyntheticSpec(n_cells=n_cells, n_genes=n_genes, n_batches=n_batches, n_cell_types=n_cell_types, seed=seed)
    atlas = write_h5ad(spec, out / "atlas.h5ad")
    timings["generate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # the KL weight reaches 1 halfway: scvi-tools' 400-epoch warm-up would leave a short demo a plain autoencoder
    train_cfg = {"max_epochs": epochs, "n_epochs_kl_warmup": max(1, epochs // 2), "seed": seed, "progress": progress}
    run = api.train(atlas, out / "run", data={"batch_key": "batch"}, train=train_cfg, overwrite=True)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    adata = api.embed(run, atlas, out / "embedding.h5ad")
    timings["embed_s"] = time.perf_counter() - t0
    split = np.load(run.path / "split.npz")
    held_out = api.evaluate(run, adata[split["validation"]].copy())

    t0 = time.perf_counter()
    report_dir = out / "report"
    report_dir.mkdir(exist_ok=True)
    z = adata.obsm["X_scvi"]
    labels, batches = adata.obs["cell_type"].to_numpy(), adata.obs["batch"].to_numpy()
    ours = integration_summary(z, labels, batches, seed=seed)
    baseline = integration_summary(lognorm_pca(adata.X, n_components=30, seed=seed), labels, batches, seed=seed)
    plot_loss_curves(run.path / "metrics.csv", path=report_dir / "loss_curves.png", title="scVI training")
    coords, method = embed_2d(z, seed=seed, method=view)
    plot_embedding(
        coords,
        {"batch": batches, "cell type": labels},
        path=report_dir / "embedding.png",
        title=f"scVI latent space ({method})",
    )
    timings["report_s"] = time.perf_counter() - t0
    metrics = run.metrics
    summary = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "epochs": int(len(metrics)),
        "held_out_elbo": held_out["elbo"],
        "train_cells_per_s": float(metrics["perf/cells_per_s"].median()),
        "scvi/knn_label_accuracy": ours["integration/knn_label_accuracy"],
        "scvi/batch_mixing": ours["integration/batch_mixing"],
        "pca/knn_label_accuracy": baseline["integration/knn_label_accuracy"],
        "pca/batch_mixing": baseline["integration/batch_mixing"],
    }
    report = {
        "summary": summary,
        "held_out": held_out,
        "integration": {"scvi": ours, "lognorm_pca": baseline},
        "timings": timings,
        "embedding_2d": method,
        "config": run.config.to_dict(),
    }
    tmp = report_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(report_dir / "metrics.json")  # written last: its presence means the demo finished
    return report
