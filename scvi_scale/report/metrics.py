"""Integration metrics on an embedding (kNN label accuracy, batch mixing, silhouettes) and a PCA baseline.

Only numpy and scipy are used, so the report needs nothing beyond the package's runtime dependencies.
Names follow the package convention: ``z_nk`` is an embedding of n cells in k dimensions, ``labels_n`` and
``batch_n`` are per-cell categories (strings or integers), ``counts_ng`` is a cells x genes count matrix.

The neighbourhood metrics are computed on at most ``max_cells`` cells (a seeded random subsample) so that a
report on an atlas costs the same as one on 20k cells; neighbours are found among the subsampled cells only.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.spatial import cKDTree
from scipy.stats import binom

__all__ = [
    "expected_entropy",
    "integration_summary",
    "knn_batch_mixing",
    "knn_indices",
    "knn_label_accuracy",
    "lognorm_pca",
    "pca",
    "silhouette",
]

_SILHOUETTE_MAX_CELLS = 5000
_DIST_CHUNK = 1024  # rows of the distance matrix held at once in ``silhouette`` (1024 x 5000 doubles = 40 MB)


def _codes(values_n: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer codes 0..c-1 for arbitrary category values, and c."""
    uniques, codes_n = np.unique(np.asarray(values_n).reshape(-1), return_inverse=True)
    return codes_n.reshape(-1), len(uniques)


def _subsample(n: int, max_cells: int | None, seed: int) -> np.ndarray | None:
    """Sorted row indices of a seeded subsample of ``max_cells`` rows, or None when all rows are kept."""
    if max_cells is None or n <= max_cells:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))


def _prepare(z_nk: np.ndarray, *per_cell: np.ndarray, max_cells: int | None, seed: int) -> list[np.ndarray]:
    """Validate shapes and apply one shared subsample to the embedding and the per-cell arrays."""
    z_nk = np.asarray(z_nk, dtype=np.float64)
    if z_nk.ndim != 2:
        raise ValueError(f"embedding must be 2-D (cells x dims), got shape {z_nk.shape}")
    arrays = [np.asarray(a).reshape(-1) for a in per_cell]
    for a in arrays:
        if a.shape[0] != z_nk.shape[0]:
            raise ValueError(f"per-cell array has {a.shape[0]} entries for {z_nk.shape[0]} cells")
    keep = _subsample(z_nk.shape[0], max_cells, seed)
    if keep is not None:
        z_nk = z_nk[keep]
        arrays = [a[keep] for a in arrays]
    return [z_nk, *arrays]


def knn_indices(z_nk: np.ndarray, k: int) -> np.ndarray:
    """The k nearest other cells of every cell (Euclidean), nearest first, shape (n, k).

    The cell itself is excluded even when other cells sit at exactly the same point: the tree is asked for
    k + 1 neighbours and the query cell's own index is removed (or the farthest one, if the tie order left the
    cell out of its own list).
    """
    n = z_nk.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, n_cells - 1] = [1, {n - 1}], got {k}")
    _, idx_nk1 = cKDTree(z_nk).query(z_nk, k=k + 1, workers=-1)
    is_self = idx_nk1 == np.arange(n)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    return idx_nk1[~is_self].reshape(n, k)


def knn_label_accuracy(
    z_nk: np.ndarray, labels_n: np.ndarray, k: int = 15, max_cells: int | None = 20_000, seed: int = 0
) -> float:
    """Leave-one-out kNN classification accuracy of the labels in the embedding.

    Each cell's label is predicted by majority vote of its ``k`` nearest other cells; a tie goes to the tied
    label held by the nearest neighbour. High values mean cell types stay apart.

    Parameters
    ----------
    z_nk
        Embedding, one row per cell.
    labels_n
        Cell labels (e.g. cell types).
    k
        Number of neighbours that vote.
    max_cells
        Evaluate on a seeded random subsample of this many cells when there are more; None keeps all.
    seed
        Seed of the subsample.

    Returns
    -------
    float
        Fraction of cells whose predicted label equals their own, in [0, 1].
    """
    z_nk, labels_n = _prepare(z_nk, labels_n, max_cells=max_cells, seed=seed)
    return _label_accuracy(_codes(labels_n)[0], knn_indices(z_nk, k))


def _label_accuracy(codes_n: np.ndarray, knn_nk: np.ndarray) -> float:
    nbr_nk = codes_n[knn_nk]
    # votes_nk[i, j]: how many of cell i's neighbours share neighbour j's label. argmax returns the first
    # maximum, i.e. the nearest neighbour among the winning labels, which is the documented tie-break.
    votes_nk = (nbr_nk[:, :, None] == nbr_nk[:, None, :]).sum(axis=2)
    pred_n = nbr_nk[np.arange(len(codes_n)), votes_nk.argmax(axis=1)]
    return float(np.mean(pred_n == codes_n))


def expected_entropy(proportions_b: np.ndarray, k: int) -> float:
    """Expected Shannon entropy (nats) of the label frequencies among k draws with replacement.

    Entropy is a sum over labels, so by linearity only each label's binomial count distribution is needed:
    ``E[H] = sum_b sum_x Binom(x; k, q_b) * (-(x/k) log(x/k))``.
    """
    q_b = np.asarray(proportions_b, dtype=np.float64)
    x = np.arange(1, k + 1)
    f_x = -(x / k) * np.log(x / k)
    return float(np.sum(binom.pmf(x[None, :], k, q_b[:, None]) * f_x[None, :]))


def knn_batch_mixing(
    z_nk: np.ndarray, batch_n: np.ndarray, k: int = 15, max_cells: int | None = 20_000, seed: int = 0
) -> float:
    """How well batches mix in each cell's neighbourhood, relative to random mixing.

    Definition: for cell i with k nearest other cells, let ``p_ib`` be the fraction of those neighbours from
    batch b and ``H_i = -sum_b p_ib log p_ib``. Let ``q_b`` be batch b's share of the evaluated cells and
    ``E_q[H]`` the expected value of that entropy when the k neighbours are drawn at random with proportions
    ``q`` (see :func:`expected_entropy`). The score is ``mean_i H_i / E_q[H]``.

    Dividing by the expected entropy of a random draw, rather than by ``H(q)``, removes the small-sample bias
    of k neighbours, so an embedding that ignores batch scores 1.0 on average whatever k is; 0 means every
    neighbourhood holds a single batch. Neighbourhoods more even than random (e.g. a lattice of alternating
    batches) can score slightly above 1.

    Parameters
    ----------
    z_nk
        Embedding, one row per cell.
    batch_n
        Batch of each cell.
    k
        Neighbourhood size.
    max_cells
        Evaluate on a seeded random subsample of this many cells when there are more; None keeps all.
    seed
        Seed of the subsample.

    Returns
    -------
    float
        The score, or NaN when the evaluated cells come from a single batch (mixing is undefined).
    """
    z_nk, batch_n = _prepare(z_nk, batch_n, max_cells=max_cells, seed=seed)
    codes_n, n_batches = _codes(batch_n)
    return _batch_mixing(codes_n, n_batches, knn_indices(z_nk, k))


def _batch_mixing(codes_n: np.ndarray, n_batches: int, knn_nk: np.ndarray) -> float:
    if n_batches < 2:
        return float("nan")
    n, k = knn_nk.shape
    nbr_nk = codes_n[knn_nk]
    counts_nb = np.bincount((np.arange(n)[:, None] * n_batches + nbr_nk).ravel(), minlength=n * n_batches)
    p_nb = counts_nb.reshape(n, n_batches) / k
    with np.errstate(divide="ignore", invalid="ignore"):
        h_n = -np.sum(np.where(p_nb > 0, p_nb * np.log(p_nb), 0.0), axis=1)
    q_b = np.bincount(codes_n, minlength=n_batches) / n
    return float(np.mean(h_n) / expected_entropy(q_b, k))


def silhouette(
    z_nk: np.ndarray, labels_n: np.ndarray, max_cells: int | None = _SILHOUETTE_MAX_CELLS, seed: int = 0
) -> float:
    """Mean silhouette width of the labels in the embedding (Euclidean distance).

    For cell i, ``a_i`` is the mean distance to the other cells of its label and ``b_i`` the smallest mean
    distance to the cells of another label; ``s_i = (b_i - a_i) / max(a_i, b_i)``, and 0 for a cell alone in
    its label (the convention of scikit-learn's ``silhouette_score``, which this matches).

    Parameters
    ----------
    z_nk
        Embedding, one row per cell.
    labels_n
        Category of each cell.
    max_cells
        Pairwise distances cost O(n^2), so a seeded random subsample of this many cells is used when there
        are more; None keeps all.
    seed
        Seed of the subsample.

    Returns
    -------
    float
        Mean of ``s_i`` in [-1, 1]; NaN when fewer than two labels are present or every cell has its own.
    """
    z_nk, labels_n = _prepare(z_nk, labels_n, max_cells=max_cells, seed=seed)
    codes_n, n_labels = _codes(labels_n)
    n = len(codes_n)
    if not 2 <= n_labels <= n - 1:
        return float("nan")
    onehot_nc = np.zeros((n, n_labels))
    onehot_nc[np.arange(n), codes_n] = 1.0
    size_c = onehot_nc.sum(axis=0)
    sq_n = np.einsum("nk,nk->n", z_nk, z_nk)
    s_n = np.empty(n)
    for start in range(0, n, _DIST_CHUNK):
        stop = min(start + _DIST_CHUNK, n)
        d2_mn = sq_n[start:stop, None] + sq_n[None, :] - 2.0 * (z_nk[start:stop] @ z_nk.T)
        d_mn = np.sqrt(np.maximum(d2_mn, 0.0))
        d_mn[np.arange(stop - start), np.arange(start, stop)] = 0.0  # exact zero self-distance despite rounding
        sum_mc = d_mn @ onehot_nc
        own_m = codes_n[start:stop]
        own_size_m = size_c[own_m]
        rows_m = np.arange(stop - start)
        with np.errstate(divide="ignore", invalid="ignore"):
            a_m = sum_mc[rows_m, own_m] / (own_size_m - 1)
            mean_mc = sum_mc / size_c[None, :]
        mean_mc[rows_m, own_m] = np.inf
        b_m = mean_mc.min(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            s_m = (b_m - a_m) / np.maximum(a_m, b_m)
        s_n[start:stop] = np.where(own_size_m > 1, np.nan_to_num(s_m, nan=0.0), 0.0)
    return float(np.mean(s_n))


def integration_summary(
    z_nk: np.ndarray,
    labels_n: np.ndarray,
    batch_n: np.ndarray,
    k: int = 15,
    max_cells: int | None = 20_000,
    seed: int = 0,
) -> dict[str, float]:
    """All integration metrics for one embedding, as a flat dict with slash names.

    Keys: ``integration/knn_label_accuracy`` and ``integration/silhouette_label`` (high = cell types kept
    apart), ``integration/batch_mixing`` (1 = batches mixed as if at random, 0 = separated) and
    ``integration/silhouette_batch``, the silhouette of the batch labels (near 0 or below = batches overlap,
    near 1 = batches form their own clusters). One subsample of ``max_cells`` cells is shared by the kNN
    metrics; the silhouettes take a further 5000-cell subsample of it.
    """
    z_nk, labels_n, batch_n = _prepare(z_nk, labels_n, batch_n, max_cells=max_cells, seed=seed)
    knn_nk = knn_indices(z_nk, k)  # the expensive part, shared by both kNN metrics
    return {
        "integration/knn_label_accuracy": _label_accuracy(_codes(labels_n)[0], knn_nk),
        "integration/batch_mixing": _batch_mixing(*_codes(batch_n), knn_nk),
        "integration/silhouette_label": silhouette(z_nk, labels_n, seed=seed),
        "integration/silhouette_batch": silhouette(z_nk, batch_n, seed=seed),
    }


def _flip_signs(u_nk: np.ndarray, vt_kd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make each component's largest-magnitude loading positive, so results do not depend on the solver."""
    sign_k = np.sign(vt_kd[np.arange(vt_kd.shape[0]), np.abs(vt_kd).argmax(axis=1)])
    sign_k[sign_k == 0] = 1.0
    return u_nk * sign_k, vt_kd * sign_k[:, None]


def _randomized_svd(
    x_nd: np.ndarray | sp.spmatrix, mean_d: np.ndarray, k: int, n_iter: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k SVD of ``x - mean`` by randomized subspace iteration (Halko et al. 2011), centering implicitly.

    ``x`` is never centered in place, so a sparse matrix stays sparse: ``(x - 1 m^T) M = x M - 1 (m^T M)``.
    """
    n, d = x_nd.shape
    rng = np.random.default_rng(seed)
    n_basis = min(k + 10, n, d)

    def times(m_dl: np.ndarray) -> np.ndarray:
        return np.asarray(x_nd @ m_dl) - mean_d @ m_dl

    def times_t(m_nl: np.ndarray) -> np.ndarray:
        return np.asarray(x_nd.T @ m_nl) - np.outer(mean_d, m_nl.sum(axis=0))

    q_dl = rng.standard_normal((d, n_basis))
    for _ in range(n_iter):
        # Renormalising on both sides keeps the smaller directions from being lost to rounding. A pivoted LU
        # is enough for that and far cheaper than QR on tall matrices (the choice scikit-learn makes too);
        # the basis only has to be orthonormal once, at the end.
        q_nl, _ = scipy.linalg.lu(times(q_dl), permute_l=True, check_finite=False)
        q_dl, _ = scipy.linalg.lu(times_t(q_nl), permute_l=True, check_finite=False)
    q_nl, _ = np.linalg.qr(times(q_dl))
    b_ld = times_t(q_nl).T
    u_ll, s_l, vt_ld = np.linalg.svd(b_ld, full_matrices=False)
    return (q_nl @ u_ll)[:, :k], s_l[:k], vt_ld[:k]


def pca(
    x_nd: np.ndarray | sp.spmatrix,
    n_components: int = 30,
    method: str = "auto",
    n_iter: int = 6,
    seed: int = 0,
) -> np.ndarray:
    """Principal-component scores of the rows of ``x`` (centered, not scaled).

    Parameters
    ----------
    x_nd
        Dense array or scipy sparse matrix, one row per observation.
    n_components
        Number of components; capped at ``min(n, d)``.
    method
        ``"exact"`` (LAPACK SVD of the densified centered matrix), ``"randomized"`` (subspace iteration with
        implicit centering, so sparse input is never densified) or ``"auto"``: exact when ``min(n, d) <= 500``.
    n_iter
        Power iterations of the randomized solver; more is closer to exact on slowly decaying spectra.
    seed
        Seed of the randomized solver.

    Returns
    -------
    np.ndarray
        Scores ``(x - mean) @ V``, shape (n, n_components), float64; each component's sign is fixed so its
        largest-magnitude loading is positive.
    """
    n, d = x_nd.shape
    k = min(n_components, n, d)
    if k < 1:
        raise ValueError(f"need at least one component, got n_components={n_components} for shape {(n, d)}")
    if method == "auto":
        method = "exact" if min(n, d) <= 500 else "randomized"
    if sp.issparse(x_nd):
        x_nd = sp.csr_matrix(x_nd, dtype=np.float64)
        mean_d = np.asarray(x_nd.mean(axis=0)).ravel()
    else:
        x_nd = np.asarray(x_nd, dtype=np.float64)
        mean_d = x_nd.mean(axis=0)
    if method == "exact":
        dense_nd = x_nd.toarray() if sp.issparse(x_nd) else x_nd
        u_nk, s_k, vt_kd = np.linalg.svd(dense_nd - mean_d, full_matrices=False)
        u_nk, s_k, vt_kd = u_nk[:, :k], s_k[:k], vt_kd[:k]
    elif method == "randomized":
        u_nk, s_k, vt_kd = _randomized_svd(x_nd, mean_d, k, n_iter, seed)
    else:
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    u_nk, _ = _flip_signs(u_nk, vt_kd)
    return u_nk * s_k


def lognorm_pca(
    counts_ng: sp.spmatrix | np.ndarray,
    n_components: int = 30,
    target_sum: float = 1e4,
    n_top_genes: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """Baseline embedding: PCA of log-normalised counts on the most variable genes.

    Each cell is scaled to ``target_sum`` total counts and ``log1p`` is applied (cells with no counts stay
    zero); the ``n_top_genes`` genes with the highest variance of these values are kept and projected on
    their top principal components. Only the nonzero values are transformed and the randomized solver centers
    implicitly, so a sparse input is never densified.

    Parameters
    ----------
    counts_ng
        Raw counts, cells x genes; CSR preferred (other layouts are converted).
    n_components
        Number of principal components.
    target_sum
        Total counts each cell is scaled to before ``log1p``.
    n_top_genes
        Number of highest-variance genes kept; all genes when there are fewer.
    seed
        Seed of the randomized PCA solver.

    Returns
    -------
    np.ndarray
        PCA scores, shape (n_cells, n_components), float64.
    """
    x_ng = sp.csr_matrix(counts_ng, dtype=np.float64, copy=True)
    x_ng.sum_duplicates()
    n_cells, n_genes = x_ng.shape
    total_n = np.asarray(x_ng.sum(axis=1)).ravel()
    scale_n = np.divide(target_sum, total_n, out=np.zeros_like(total_n), where=total_n > 0)
    x_ng.data *= np.repeat(scale_n, np.diff(x_ng.indptr))
    np.log1p(x_ng.data, out=x_ng.data)
    mean_g = np.bincount(x_ng.indices, weights=x_ng.data, minlength=n_genes) / n_cells
    var_g = np.bincount(x_ng.indices, weights=x_ng.data**2, minlength=n_genes) / n_cells - mean_g**2
    if n_genes > n_top_genes:
        # Stable sort of -var keeps the lower gene index first among equal variances, so selection is repeatable.
        top_g = np.sort(np.argsort(-var_g, kind="stable")[:n_top_genes])
        x_ng = x_ng[:, top_g]
    return pca(x_ng, n_components=n_components, seed=seed)
