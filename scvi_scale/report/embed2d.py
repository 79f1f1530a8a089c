"""Two-dimensional views of an embedding for plots: UMAP when installed, otherwise PCA."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import warnings

import numpy as np

from scvi_scale.report.metrics import pca

__all__ = ["embed_2d", "umap_available"]

log = logging.getLogger(__name__)

_METHODS = ("auto", "umap", "pca")


def umap_available() -> bool:
    """Whether ``umap-learn`` can be imported (it is optional, not a dependency of the package)."""
    return importlib.util.find_spec("umap") is not None


def _umap_2d(z_nk: np.ndarray, seed: int, n_neighbors: int) -> np.ndarray:
    with warnings.catch_warnings():
        # umap warns on import that ParametricUMAP needs TensorFlow; we never use it.
        warnings.simplefilter("ignore", ImportWarning)
        umap = importlib.import_module("umap")
    # n_jobs=1 because a fixed random_state forces umap to one thread anyway (and it warns otherwise).
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, z_nk.shape[0] - 1), random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(z_nk), dtype=np.float64)


def embed_2d(z_nk: np.ndarray, seed: int = 0, method: str = "auto", n_neighbors: int = 15) -> tuple[np.ndarray, str]:
    """Map an embedding to 2-D coordinates for plotting.

    Parameters
    ----------
    z_nk
        Embedding, one row per cell.
    seed
        Random state of UMAP, and of the PCA solver when it is the randomized one (over 500 dimensions).
    method
        ``"umap"`` (requires ``umap-learn``), ``"pca"``, or ``"auto"``: UMAP when importable, else PCA.
    n_neighbors
        UMAP neighbourhood size (capped at n_cells - 1).

    Returns
    -------
    coords_n2, method_name
        The coordinates, float64 of shape (n, 2), and ``"umap"`` or ``"pca"``, whichever produced them.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    z_nk = np.asarray(z_nk, dtype=np.float64)
    if z_nk.ndim != 2:
        raise ValueError(f"embedding must be 2-D (cells x dims), got shape {z_nk.shape}")
    if method == "umap" and not umap_available():
        raise ImportError("method='umap' needs the optional package umap-learn: pip install umap-learn")
    # UMAP's spectral initialisation needs a handful of points; tiny inputs fall back to PCA.
    use_umap = method == "umap" or (method == "auto" and umap_available() and z_nk.shape[0] > 10)
    if use_umap:
        return _umap_2d(z_nk, seed, n_neighbors), "umap"
    coords = np.zeros((z_nk.shape[0], 2))
    if z_nk.shape[0] > 0 and z_nk.shape[1] > 0:
        scores = pca(z_nk, n_components=2, seed=seed)
        coords[:, : scores.shape[1]] = scores  # a 1-D input (or one cell) gives fewer than 2 components
    log.debug("embed_2d: PCA on %d cells", z_nk.shape[0])
    return coords, "pca"
