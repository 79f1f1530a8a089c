"""Run reports: integration metrics on embeddings, a PCA baseline, 2-D views and the figures built from them."""

from __future__ import annotations

from scvi_scale.report.embed2d import embed_2d, umap_available
from scvi_scale.report.metrics import (
    integration_summary,
    knn_batch_mixing,
    knn_label_accuracy,
    lognorm_pca,
    pca,
    silhouette,
)
from scvi_scale.report.plots import plot_embedding, plot_loss_curves

__all__ = [
    "embed_2d",
    "integration_summary",
    "knn_batch_mixing",
    "knn_label_accuracy",
    "lognorm_pca",
    "pca",
    "plot_embedding",
    "plot_loss_curves",
    "silhouette",
    "umap_available",
]
