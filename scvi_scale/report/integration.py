"""Integration scores of an embedding: scib-metrics' batch correction and bio conservation, or our own metrics.

scib-metrics (the JAX reimplementation of scib that scvi-tools uses) is an optional dependency, installed with
``pip install 'scvi-scale[report]'``. Without it, :func:`integration_scores` falls back to the kNN and
silhouette metrics of :mod:`scvi_scale.report.metrics` and says so (``"integration/uses_scib_metrics"`` = 0,
:func:`backend_note`).

The scores are the unscaled scib numbers (``Benchmarker.get_results(min_max_scale=False)``), so two embeddings
scored separately on the same cells are comparable: ``batch`` is the mean of the batch-correction metrics,
``bio`` the mean of the bio-conservation metrics and ``total = 0.4 batch + 0.6 bio`` (Luecken et al. 2022).
Neighbours are exact (a k-d tree) rather than pynndescent's approximate ones.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings

import numpy as np

__all__ = ["SCIB_EXTRA_MESSAGE", "backend_note", "integration_scores", "scib_available"]

log = logging.getLogger(__name__)

SCIB_EXTRA_MESSAGE = (
    "scib-metrics is not installed, so the integration scores come from scvi-scale's own kNN/silhouette "
    "metrics, which are not scib's; install it with `pip install 'scvi-scale[report]'`"
)
_MIN_CELLS = 100  # scib's cLISI/iLISI use 90 neighbours
_NAN = float("nan")


def scib_available() -> bool:
    """Whether ``scib_metrics`` can be imported."""
    return importlib.util.find_spec("scib_metrics") is not None


def backend_note(uses_scib: bool) -> str:
    """One line for a report saying where the integration scores come from."""
    if uses_scib:
        from importlib.metadata import version

        return f"scib-metrics {version('scib-metrics')} (unscaled scores; total = 0.4 batch + 0.6 bio)"
    return "scvi-scale's own metrics (fallback: " + SCIB_EXTRA_MESSAGE + ")"


def _exact_knn(x_nd: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k nearest neighbours of every row among all rows (itself first): indices, distances.

    A k-d tree in few dimensions; chunked brute force (BLAS) in many, where trees degrade to it anyway.
    """
    x_nd = np.ascontiguousarray(x_nd, dtype=np.float64)
    n = x_nd.shape[0]
    k = min(int(k), n)
    if x_nd.shape[1] <= 16:
        from scipy.spatial import cKDTree

        dist, idx = cKDTree(x_nd).query(x_nd, k=k, workers=-1)
        return idx.reshape(n, k).astype(np.int64), dist.reshape(n, k)
    sq_n = np.einsum("nd,nd->n", x_nd, x_nd)
    idx = np.empty((n, k), np.int64)
    dist = np.empty((n, k))
    for lo in range(0, n, 1024):
        hi = min(lo + 1024, n)
        d2 = np.maximum(sq_n[lo:hi, None] + sq_n[None, :] - 2.0 * x_nd[lo:hi] @ x_nd.T, 0.0)
        d2[np.arange(hi - lo), np.arange(lo, hi)] = -1.0  # each row is its own nearest neighbour
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d2, part, axis=1), axis=1, kind="stable")
        idx[lo:hi] = np.take_along_axis(part, order, axis=1)
        dist[lo:hi] = np.sqrt(np.maximum(np.take_along_axis(d2, idx[lo:hi], axis=1), 0.0))
    return idx, dist


def _import_scib():
    """``scib_metrics``, imported without umap's import-time warning that ParametricUMAP needs TensorFlow."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)
        import scib_metrics
        import scib_metrics.benchmark

    return scib_metrics


def _exact_neighbors(x_nd: np.ndarray, n_neighbors: int, **_: object):
    """scib's ``NeighborsResults`` from an exact search (each cell is its own first neighbour)."""
    NeighborsResults = _import_scib().nearest_neighbors.NeighborsResults  # noqa: N806

    idx, dist = _exact_knn(np.asarray(x_nd), n_neighbors)
    return NeighborsResults(indices=idx, distances=dist.astype(np.float32))


@contextlib.contextmanager
def _exact_neighbors_everywhere():
    """Route scib's internal pynndescent calls (kBET's diffusion-map neighbours) to the exact search.

    pynndescent's numba code takes ~30 s to compile in every new process, longer than the whole report on a few
    thousand cells; exact neighbours are also what ``prepare`` is given, so all of scib sees one definition.
    """
    nn_module = _import_scib().nearest_neighbors
    saved = nn_module.pynndescent
    nn_module.pynndescent = _exact_neighbors
    try:
        yield
    finally:
        nn_module.pynndescent = saved


def integration_scores(
    z_nk: np.ndarray,
    batch_n: np.ndarray | None,
    labels_n: np.ndarray | None,
    x_pre_nd: np.ndarray | None = None,
    *,
    seed: int = 0,
    use_scib: bool | None = None,
) -> dict[str, float]:
    """Batch-correction and bio-conservation scores of one embedding (all cells given are used).

    Parameters
    ----------
    z_nk
        The embedding (e.g. posterior means), one row per cell.
    batch_n, labels_n
        Per-cell batch and cell-type labels; None when unknown. Without labels, the batch-correction metrics
        that are computed within cell types (BRAS, kBET, graph connectivity) treat all cells as one type and
        there is no bio score; with one batch (or none) there is no batch score.
    x_pre_nd
        An embedding before integration (e.g. PCA of log-normalised counts) for scib's PCR comparison; without
        it that metric is left out.
    use_scib
        Force scib-metrics (True: error if missing) or our own metrics (False); default: scib when installed.

    Returns
    -------
    dict
        ``integration/total``, ``integration/batch``, ``integration/bio`` (NaN where not computable), one
        ``integration/<metric>`` per metric, ``integration/n_cells`` and ``integration/uses_scib_metrics``.
    """
    z_nk = np.asarray(z_nk, dtype=np.float32)
    n = z_nk.shape[0]
    has_batch = batch_n is not None and len(np.unique(np.asarray(batch_n))) > 1
    has_labels = labels_n is not None and len(np.unique(np.asarray(labels_n))) > 1
    if use_scib is None:
        use_scib = scib_available()
        if not use_scib:
            log.warning(SCIB_EXTRA_MESSAGE)
    elif use_scib and not scib_available():
        raise ImportError(SCIB_EXTRA_MESSAGE)
    out: dict[str, float] = {}
    if n < _MIN_CELLS or not (has_batch or has_labels):
        batch = bio = _NAN
    elif use_scib:
        out, batch, bio = _scib(z_nk, batch_n, labels_n, x_pre_nd, has_batch, has_labels)
    else:
        out, batch, bio = _own(z_nk, batch_n, labels_n, has_batch, has_labels, seed)
    total = 0.4 * batch + 0.6 * bio if has_labels and has_batch else (bio if has_labels else batch)
    return {
        "integration/total": float(total),
        "integration/batch": float(batch),
        "integration/bio": float(bio),
        **out,
        "integration/n_cells": float(n),
        "integration/uses_scib_metrics": float(bool(use_scib)),
    }


def _scib(z_nk, batch_n, labels_n, x_pre_nd, has_batch, has_labels) -> tuple[dict[str, float], float, float]:
    import anndata
    import pandas as pd

    bm = _import_scib().benchmark
    BatchCorrection, Benchmarker, BioConservation = bm.BatchCorrection, bm.Benchmarker, bm.BioConservation  # noqa: N806

    n = z_nk.shape[0]
    obs = pd.DataFrame(
        {
            "batch": np.asarray(batch_n).astype(str) if has_batch else np.zeros(n, dtype=str),
            "labels": np.asarray(labels_n).astype(str) if has_labels else np.full(n, "all"),
        },
        index=pd.RangeIndex(n).astype(str),
    )
    adata = anndata.AnnData(obs=obs)
    adata.obsm["X_emb"] = z_nk
    # scib would otherwise run PCA on adata.X; without a pre-integration embedding, PCR comparison is skipped
    adata.obsm["X_pre"] = np.asarray(x_pre_nd, dtype=np.float32) if x_pre_nd is not None else z_nk
    batch_metrics = BatchCorrection(pcr_comparison=x_pre_nd is not None, kbet_per_label=True) if has_batch else None
    bench = Benchmarker(
        adata,
        batch_key="batch",
        label_key="labels",
        embedding_obsm_keys=["X_emb"],
        bio_conservation_metrics=BioConservation() if has_labels else None,
        batch_correction_metrics=batch_metrics,
        pre_integrated_embedding_obsm_key="X_pre",
        progress_bar=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        # scib warns e.g. that a negative PCR comparison is clipped to 0; those go to the log, not the caller
        warnings.simplefilter("always")
        with _exact_neighbors_everywhere():
            bench.prepare(neighbor_computer=_exact_neighbors)
            bench.benchmark()
        res = bench.get_results(min_max_scale=False, clean_names=False)
    for w in caught:
        log.info("scib-metrics: %s", w.message)
    row = res.loc["X_emb"]
    out = {}
    for name in res.columns:
        if name in ("Batch correction", "Bio conservation", "Total"):
            continue
        out[f"integration/{name}"] = float(row[name])
    batch = float(row["Batch correction"]) if has_batch else _NAN
    bio = float(row["Bio conservation"]) if has_labels else _NAN
    return out, batch, bio


def _own(z_nk, batch_n, labels_n, has_batch, has_labels, seed) -> tuple[dict[str, float], float, float]:
    """Fallback: kNN label accuracy and label silhouette (bio), kNN batch mixing and batch silhouette (batch)."""
    from scvi_scale.report.metrics import knn_batch_mixing, knn_label_accuracy, silhouette

    out: dict[str, float] = {}
    batch = bio = _NAN
    if has_labels:
        out["integration/knn_label_accuracy"] = knn_label_accuracy(z_nk, labels_n, max_cells=None, seed=seed)
        out["integration/silhouette_label"] = silhouette(z_nk, labels_n, seed=seed)
        # silhouettes live in [-1, 1]; rescaled to [0, 1] as scib does for its silhouette_label
        bio = float(np.mean([out["integration/knn_label_accuracy"], (out["integration/silhouette_label"] + 1) / 2]))
    if has_batch:
        out["integration/batch_mixing"] = knn_batch_mixing(z_nk, batch_n, max_cells=None, seed=seed)
        out["integration/silhouette_batch"] = silhouette(z_nk, batch_n, seed=seed)
        batch = float(np.mean([out["integration/batch_mixing"], 1 - abs(out["integration/silhouette_batch"])]))
    return out, batch, bio
