"""Run reports: the quality report (:func:`build_report`, :func:`quality_numbers`), integration metrics, plots."""

from __future__ import annotations

from scvi_scale.report.build import Report, build_report
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
from scvi_scale.report.quality import quality_numbers

__all__ = [
    "Report",
    "build_report",
    "embed_2d",
    "integration_summary",
    "knn_batch_mixing",
    "knn_label_accuracy",
    "lognorm_pca",
    "pca",
    "plot_embedding",
    "plot_loss_curves",
    "quality_numbers",
    "silhouette",
    "umap_available",
]
