"""seurat_v3 highly variable genes from per-batch sums: scanpy's ``flavor="seurat_v3"`` arithmetic, step by step.

Every function works on sums over cells that :mod:`scvi_scale.prep.prepare` accumulates out of core, in the
operation order scanpy uses, so that on the same counts the results agree to the last bit or nearly (scanpy
squares float32 counts in float32, which is inexact above 4,096; these sums are exact float64).
"""

from __future__ import annotations

import numpy as np

from scvi_scale.store.errors import InputError

__all__ = ["loess_trend_std", "mean_var", "normalized_variance", "rank_and_select"]


def mean_var(n: float, sum_g: np.ndarray, sumsq_g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance from exact integer sums (the operation order of scanpy's, so equal bits)."""
    mean_g = sum_g / n
    var_g = sumsq_g / n - mean_g**2
    if n != 1:
        var_g = var_g * (n / (n - 1))
    return mean_g, var_g


def loess_trend_std(mean_g: np.ndarray, var_g: np.ndarray, span: float, what: str) -> np.ndarray:
    """Expected standard deviation of each gene from the loess trend of log10 variance on log10 mean."""
    try:
        from skmisc.loess import loess
    except ImportError as exc:
        raise InputError("prepare needs scikit-misc for the seurat_v3 loess fit: pip install scikit-misc") from exc
    varies = var_g > 0
    log_var_g = np.zeros_like(var_g)  # constant genes: a trend of 1 (scanpy's choice)
    try:
        model = loess(np.log10(mean_g[varies]), np.log10(var_g[varies]), span=span, degree=2)
        model.fit()
    except (ValueError, RuntimeError) as exc:
        raise InputError(
            f"{what}: the seurat_v3 loess fit failed on {int(varies.sum())} varying genes ({exc}); "
            "pass a larger span (e.g. 0.5), or merge small batches"
        ) from exc
    log_var_g[varies] = model.outputs.fitted_values
    return np.sqrt(10**log_var_g)


def rank_and_select(norm_bg: np.ndarray, n_top_genes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank genes in each batch, combine the batches' ranks, select ``n_top_genes``.

    Parameters
    ----------
    norm_bg
        Normalized variance of every gene in every batch with cells (batches x genes).
    n_top_genes
        Genes to select.

    Returns
    -------
    tuple
        ``(rank_g, nbatches_g, selected_g)``: float32 median rank over the batches where the gene is among the
        top ``n_top_genes`` (NaN in none), int64 number of those batches, and the bool selection: genes by
        median rank, then by more batches, then by column order.
    """
    # rank 0 = most variable in the batch; ties keep numpy's default argsort order, as scanpy's does
    rank_bg = np.argsort(np.argsort(-norm_bg, axis=1), axis=1).astype(np.float32)
    top_bg = rank_bg < n_top_genes
    nbatches_g = top_bg.sum(axis=0).astype(np.int64)
    rank_g = np.ma.median(np.ma.masked_array(rank_bg, mask=~top_bg), axis=0).filled(np.nan)
    # lexsort is stable: ties in (rank, batches) stay in column order, as pandas' sort_values in scanpy keeps them
    order = np.lexsort((-nbatches_g, np.where(np.isnan(rank_g), np.inf, rank_g)))
    selected_g = np.zeros(norm_bg.shape[1], dtype=bool)
    selected_g[order[:n_top_genes]] = True
    return rank_g.astype(np.float32), nbatches_g, selected_g


def normalized_variance(
    n: np.ndarray, mean_g: np.ndarray, reg_std_g: np.ndarray, clipped_sum_g: np.ndarray, clipped_sumsq_g: np.ndarray
) -> np.ndarray:
    """Variance of the standardized counts ``(x - mean) / reg_std``, counts clipped at ``mean + sqrt(n) reg_std``.

    ``sum((x - mean)^2)`` is expanded as ``n mean^2 + sum(x^2) - 2 mean sum(x)`` so that only the non-zero
    (clipped) counts need summing; zeros are never clipped, since the bound is positive.

    Parameters
    ----------
    n
        Cells of the batch (broadcasts against the genes).
    mean_g, reg_std_g
        Mean and loess-trend standard deviation of each gene in the batch.
    clipped_sum_g, clipped_sumsq_g
        Sum and sum of squares of the clipped counts.
    """
    return (1 / ((n - 1) * np.square(reg_std_g))) * (
        n * np.square(mean_g) + clipped_sumsq_g - 2 * clipped_sum_g * mean_g
    )
