"""Preparing a count store out of core: per-gene statistics, seurat_v3 HVGs, library-size priors, batch codes.

Three passes over row blocks, each a dask graph of one task per block (read it, reduce it to per-batch sums)
and a tree of merges, run on the threaded scheduler with a bounded number of workers; memory is a few blocks
plus ``16 * n_batch * n_genes`` bytes of sums:

1. per batch: cells, and each gene's sum and sum of squares; moments of log total counts (all genes);
2. per batch: each gene's sum and sum of squares of counts clipped at ``mean + sqrt(n_b) * reg_std``, where
   ``reg_std`` comes from a loess fit (skmisc, span 0.3, degree 2) of log10 variance on log10 mean (pass 1);
3. per batch: moments of log total counts over the selected genes (the library prior when training on them).

The selection is scanpy's ``highly_variable_genes(flavor="seurat_v3", batch_key=...)`` on counts: per batch a
normalized variance and its rank; a gene's ``highly_variable_rank`` is its median rank over the batches where
it ranks among the top ``n_top_genes``; genes are ordered by that rank, then by the number of such batches
(more first), then by column order, and the first ``n_top_genes`` are selected. Results go to the store's
``var`` (scanpy's column names) and to a ``"prepare"`` metadata entry written last; :func:`recorded_prepare`
refuses an entry whose store has changed since (cells appended).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.prep.seurat_v3 import loess_trend_std, mean_var, normalized_variance, rank_and_select
from scvi_scale.store.errors import InputError
from scvi_scale.store.memory import MemoryStore
from scvi_scale.store.subset import GeneSubset
from scvi_scale.store.zarr_store import utc_now

__all__ = [
    "PREPARE_VERSION",
    "PrepareResult",
    "fingerprint",
    "prepare",
    "prepared_library_priors",
    "recorded_prepare",
    "select_genes",
]

logger = logging.getLogger(__name__)

PREPARE_VERSION = 1
DEFAULT_BLOCK_ROWS = 16_384
_FAN_IN = 8  # block results merged per task: a shallow tree that keeps few partial sums alive
_NBATCHES = "highly_variable_nbatches"


# ---- per-block reductions (run in dask worker threads) ----


@dataclass
class _BatchSums:
    """Per-gene sums and sums of squares of the batches present (sorted codes), and their cell counts."""

    batches: np.ndarray
    n_b: np.ndarray
    sum_bg: np.ndarray
    sumsq_bg: np.ndarray

    def __add__(self, other: _BatchSums) -> _BatchSums:
        batches = np.union1d(self.batches, other.batches)
        n_genes = self.sum_bg.shape[1]
        shape = (batches.size, n_genes)
        out = _BatchSums(batches, np.zeros(batches.size), np.zeros(shape), np.zeros(shape))
        for part in (self, other):
            at = np.searchsorted(batches, part.batches)
            out.n_b[at] += part.n_b
            out.sum_bg[at] += part.sum_bg
            out.sumsq_bg[at] += part.sumsq_bg
        return out

    def dense(self, n_batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells, sums and sums of squares of every batch code in ``[0, n_batch)`` (zeros where absent)."""
        shape = (n_batch, self.sum_bg.shape[1])
        n_b, sum_bg, sumsq_bg = np.zeros(n_batch), np.zeros(shape), np.zeros(shape)
        n_b[self.batches], sum_bg[self.batches], sumsq_bg[self.batches] = self.n_b, self.sum_bg, self.sumsq_bg
        return n_b, sum_bg, sumsq_bg


@dataclass
class _LogMoments:
    """Per-batch count, mean and M2 of log total counts; ``+`` is Chan et al.'s pairwise merge."""

    count_b: np.ndarray
    mean_b: np.ndarray
    m2_b: np.ndarray

    @classmethod
    def of(cls, total_n: np.ndarray, batch_n: np.ndarray, n_batch: int) -> _LogMoments:
        # zero totals count as log 0, as StoreReads.library_log_stats (and scvi-tools) do
        log_n = np.log(np.where(total_n > 0, total_n, 1.0))
        count_b = np.bincount(batch_n, minlength=n_batch).astype(np.float64)
        mean_b = np.bincount(batch_n, weights=log_n, minlength=n_batch) / np.maximum(count_b, 1.0)
        m2_b = np.bincount(batch_n, weights=(log_n - mean_b[batch_n]) ** 2, minlength=n_batch)
        return cls(count_b, mean_b, m2_b)

    def __add__(self, other: _LogMoments) -> _LogMoments:
        count_b = self.count_b + other.count_b
        safe_b = np.maximum(count_b, 1.0)
        delta_b = other.mean_b - self.mean_b
        mean_b = self.mean_b + delta_b * other.count_b / safe_b
        m2_b = self.m2_b + other.m2_b + delta_b**2 * self.count_b * other.count_b / safe_b
        return _LogMoments(count_b, mean_b, m2_b)

    def stats(self) -> dict[str, list[float]]:
        """Means and population variances; a batch with no cells gets mean 0, variance 1 (scvi-tools)."""
        present = self.count_b > 0
        means_b = np.where(present, self.mean_b, 0.0)
        vars_b = np.where(present, self.m2_b / np.maximum(self.count_b, 1.0), 1.0)
        return {"means": [float(v) for v in means_b], "vars": [float(v) for v in vars_b]}


def _batch_sums(x: sp.csr_matrix, batch_n: np.ndarray, values: np.ndarray) -> _BatchSums:
    n_genes = x.shape[1]
    batches, local_n = np.unique(batch_n, return_inverse=True)
    flat = np.repeat(local_n, np.diff(x.indptr)) * n_genes + x.indices
    size = batches.size * n_genes
    sum_bg = np.bincount(flat, weights=values, minlength=size).reshape(batches.size, n_genes)
    sumsq_bg = np.bincount(flat, weights=values * values, minlength=size).reshape(batches.size, n_genes)
    return _BatchSums(batches, np.bincount(local_n, minlength=batches.size).astype(np.float64), sum_bg, sumsq_bg)


def _pass1_block(
    store: Any, start: int, stop: int, batch_n: np.ndarray, n_batch: int
) -> tuple[_BatchSums, _LogMoments]:
    x = store.read_range(start, stop)
    codes = batch_n[start:stop]
    total_n = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    return _batch_sums(x, codes, x.data.astype(np.float64)), _LogMoments.of(total_n, codes, n_batch)


def _pass2_block(store: Any, start: int, stop: int, batch_n: np.ndarray, clip_bg: np.ndarray) -> _BatchSums:
    x = store.read_range(start, stop)
    codes = batch_n[start:stop]
    clip = clip_bg[np.repeat(codes, np.diff(x.indptr)), x.indices]
    return _batch_sums(x, codes, np.minimum(x.data.astype(np.float64), clip))


def _pass3_block(
    store: Any, start: int, stop: int, batch_n: np.ndarray, n_batch: int, keep_g: np.ndarray
) -> _LogMoments:
    x = store.read_range(start, stop)
    rows = np.repeat(np.arange(stop - start), np.diff(x.indptr))
    total_n = np.bincount(rows, weights=x.data * keep_g[x.indices], minlength=stop - start)
    return _LogMoments.of(total_n, batch_n[start:stop], n_batch)


def _merge(*parts: Any) -> Any:
    out = parts[0]
    for part in parts[1:]:
        out = out + part if not isinstance(out, tuple) else tuple(a + b for a, b in zip(out, part, strict=True))
    return out


def _run_pass(
    desc: str, store: Any, block: Callable[..., Any], args: tuple, block_rows: int, num_workers: int, progress: bool
) -> Any:
    """Map ``block(store, start, stop, *args)`` over row blocks and merge the results, with dask threads."""
    import dask
    from dask.callbacks import Callback
    from tqdm.auto import tqdm

    name = f"prepare-{block.__name__.strip('_')}-{uuid.uuid4().hex[:8]}"  # explicit keys: dask never hashes the store
    rows_of: dict[str, int] = {}
    level = []
    for start in range(0, store.n_obs, block_rows):
        stop = min(start + block_rows, store.n_obs)
        key = f"{name}-{start}"
        rows_of[key] = stop - start
        level.append(dask.delayed(block)(store, start, stop, *args, dask_key_name=key))
    depth = 0
    while len(level) > 1:
        level = [
            dask.delayed(_merge)(*level[i : i + _FAN_IN], dask_key_name=f"{name}-merge-{depth}-{i}")
            for i in range(0, len(level), _FAN_IN)
        ]
        depth += 1

    with tqdm(total=store.n_obs, unit="cells", unit_scale=True, desc=f"prepare {desc}", disable=not progress) as bar:

        class _Bar(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):  # called in the scheduler's thread
                bar.update(rows_of.get(key, 0))

        with _Bar():
            (result,) = dask.compute(level[0], scheduler="threads", num_workers=num_workers)
    return result


# ---- the result and its record ----


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare` computed and recorded.

    Attributes
    ----------
    source
        The store.
    var
        One row per gene (index: gene names): ``highly_variable``, ``highly_variable_rank``, ``means``,
        ``variances``, ``variances_norm`` and, with a batch key, ``highly_variable_nbatches`` (scanpy's names).
    record
        The ``"prepare"`` metadata entry (JSON-able): settings, batch categories, library priors, fingerprint.
    recorded_in
        Where the results were written, or None when the store holds them in memory only.
    """

    source: str
    var: pd.DataFrame
    record: dict[str, Any]
    recorded_in: str | None

    @property
    def hvg_index(self) -> np.ndarray:
        """Column indices of the selected genes, in store order."""
        return np.flatnonzero(self.var["highly_variable"].to_numpy())

    @property
    def hvg_names(self) -> list[str]:
        return [str(g) for g in self.var.index[self.hvg_index]]

    @property
    def batch_categories(self) -> list[str]:
        return list(self.record["batch_categories"])

    def __repr__(self) -> str:
        key = self.record["batch_key"]
        batches = f"batch_key={key!r} ({len(self.batch_categories)} batches)" if key else "one batch"
        where = self.recorded_in or "memory only"
        return (
            f"PrepareResult({self.source!r}, {self.hvg_index.size} HVGs of {self.var.shape[0]} genes, seurat_v3, "
            f"{batches}, recorded in {where})"
        )


def fingerprint(store: Any) -> dict[str, int]:
    """Shape and non-zero count of the store: an append changes it, so a recorded ``prepare`` goes stale."""
    if hasattr(store, "nnz"):
        nnz = int(store.nnz)
    elif hasattr(store, "X"):
        nnz = int(store.X.nnz)
    else:
        nnz = int(store.metadata["nnz"])
    return {"n_obs": int(store.n_obs), "n_vars": int(store.n_vars), "nnz": nnz}


def recorded_prepare(store: Any) -> dict[str, Any] | None:
    """The store's ``prepare`` entry, or None when it has none.

    Raises
    ------
    InputError
        The store changed since it was prepared (cells appended).
    """
    record = getattr(store, "prepared", None)
    if not record:
        return None
    now, then = fingerprint(store), record.get("fingerprint", {})
    if now != then:
        raise InputError(
            f"{store.source}: the store changed after `scvi-scale prepare` (prepared for {then.get('n_obs')} cells, "
            f"{then.get('nnz')} non-zeros; now {now['n_obs']} and {now['nnz']}); rerun `scvi-scale prepare "
            f"{store.source}`, or train on all genes with --set data.genes=all"
        )
    return record


def select_genes(store: Any, genes: Literal["auto", "all", "hvg"]) -> tuple[Any, dict[str, Any] | None]:
    """The store to train on (a :class:`GeneSubset` of the prepared HVGs, or the store) and the record used.

    ``"auto"``: the HVGs when the store records a ``prepare``, else all genes; ``"hvg"``: the HVGs, and an
    error when the store was not prepared; ``"all"``: every gene (a valid record is still returned, for its
    all-gene library priors).
    """
    if genes not in ("auto", "all", "hvg"):
        raise InputError(f"data.genes must be auto, all or hvg; got {genes!r}")
    try:
        record = recorded_prepare(store)
    except InputError:
        if genes == "all":
            return store, None
        raise
    if genes == "all" or record is None:
        if genes == "hvg":
            raise InputError(
                f"{store.source}: data.genes=hvg, but the store has no highly variable genes; run "
                f"`scvi-scale prepare {store.source}` first, or set data.genes=all"
            )
        return store, record if genes == "all" else None
    var = store.read_var()
    if "highly_variable" not in var.columns:
        raise InputError(
            f"{store.source}: var has no 'highly_variable' column; rerun `scvi-scale prepare {store.source}`"
        )
    return GeneSubset(store, np.flatnonzero(var["highly_variable"].to_numpy().astype(bool))), record


def prepared_library_priors(
    record: dict[str, Any] | None, batch_key: str | None, categories: Sequence[str], genes: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Recorded per-batch library priors for ``genes`` (``"hvg"`` or ``"all"``), if they fit the run's batches."""
    if record is None or record["batch_key"] != batch_key or list(record["batch_categories"]) != list(categories):
        return None
    stats = record["library_log_stats"][genes]
    return np.asarray(stats["means"], dtype=np.float64), np.asarray(stats["vars"], dtype=np.float64)


# ---- the entry point ----


def prepare(
    store: Any,
    n_top_genes: int = 2000,
    batch_key: str | None = None,
    *,
    span: float = 0.3,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    num_workers: int = 2,
    progress: bool = False,
    record: bool = True,
) -> PrepareResult:
    """Compute gene statistics, seurat_v3 HVGs and library priors out of core, and record them in the store.

    Parameters
    ----------
    store
        An opened count store (Zarr, TileDB or in memory).
    n_top_genes
        Genes to select.
    batch_key
        ``obs`` column of the batch: HVGs are ranked per batch (scanpy's ``batch_key``), priors are per batch.
    span
        Loess span of the mean-variance trend (scanpy's default 0.3).
    block_rows
        Rows read and reduced per task; with ``num_workers``, bounds the memory of a pass.
    num_workers
        dask threads.
    progress
        One tqdm bar per pass (cells).
    record
        Write the results into the store (``var`` columns, then the ``"prepare"`` metadata entry); an in-memory
        store keeps them with the object.

    Returns
    -------
    PrepareResult

    Raises
    ------
    InputError
        ``n_top_genes`` outside ``[1, n_vars]``, an unknown ``batch_key``, a batch too small to fit.
    """
    n_vars = int(store.n_vars)
    if not 1 <= int(n_top_genes) <= n_vars:
        raise InputError(
            f"{store.source}: n_top_genes={n_top_genes} but the store has {n_vars} genes; choose 1 to {n_vars}"
        )
    n_top_genes = int(n_top_genes)
    if store.n_obs < 2 or block_rows < 1 or num_workers < 1:
        raise InputError(
            f"{store.source}: cannot prepare {store.n_obs} cells with block_rows={block_rows}, "
            f"num_workers={num_workers}; seurat_v3 needs 2 or more cells, and blocks and workers must be positive"
        )
    codes_n, categories = store.batch_codes(batch_key)
    n_batch = len(categories)
    common = dict(block_rows=int(block_rows), num_workers=int(num_workers), progress=progress)

    sums, log_all = _run_pass("1/3 (sums)", store, _pass1_block, (codes_n, n_batch), **common)
    n_b, sum_bg, sumsq_bg = sums.dense(n_batch)
    present = np.flatnonzero(n_b > 0)  # unused categories are skipped, as scanpy's np.unique(batches) does
    small = [categories[b] for b in present if n_b[b] < 2]
    if small:
        raise InputError(
            f"{store.source}: batch {small[0]!r} of '{batch_key}' has one cell; seurat_v3 needs at least 2 per "
            "batch: merge or drop it"
        )
    means_g, variances_g = mean_var(float(n_b.sum()), sum_bg.sum(axis=0), sumsq_bg.sum(axis=0))
    mean_bg, reg_std_bg = np.zeros_like(sum_bg), np.ones_like(sum_bg)
    for b in present:
        mean_bg[b], var_g = mean_var(n_b[b], sum_bg[b], sumsq_bg[b])
        where = f"{store.source}, batch {categories[b]!r}" if batch_key else store.source
        reg_std_bg[b] = loess_trend_std(mean_bg[b], var_g, span, where)
    clip_bg = reg_std_bg * np.sqrt(n_b)[:, None] + mean_bg

    clipped = _run_pass("2/3 (clipped sums)", store, _pass2_block, (codes_n, clip_bg), **common)
    _, csum_bg, csumsq_bg = clipped.dense(n_batch)
    norm_pg = normalized_variance(
        n_b[present, None], mean_bg[present], reg_std_bg[present], csum_bg[present], csumsq_bg[present]
    )
    rank_g, nbatches_g, selected_g = rank_and_select(norm_pg, n_top_genes)

    log_hvg = _run_pass("3/3 (HVG library sizes)", store, _pass3_block, (codes_n, n_batch, selected_g), **common)

    var = pd.DataFrame(
        {
            "highly_variable": selected_g,
            "highly_variable_rank": rank_g,
            "means": means_g,
            "variances": variances_g,
            "variances_norm": norm_pg.mean(axis=0),
        },
        index=pd.Index([str(g) for g in store.var_names]),
    )
    if batch_key is not None:
        var[_NBATCHES] = nbatches_g
    entry = {
        "version": PREPARE_VERSION,
        "method": "seurat_v3",
        "n_top_genes": n_top_genes,
        "span": float(span),
        "batch_key": batch_key,
        "batch_categories": [str(c) for c in categories],
        "batch_n_cells": [int(v) for v in n_b],
        "library_log_stats": {"all": log_all.stats(), "hvg": log_hvg.stats()},
        "var_columns": list(var.columns),
        "fingerprint": fingerprint(store),
        "created": utc_now(),
    }
    recorded_in = None
    if record and hasattr(store, "update_metadata"):  # a view (GeneSubset) has nowhere to record
        store.update_metadata("prepare", None)  # invalidate first: a half-rewritten var is never taken as prepared
        store.write_var_columns(var, drop=[] if batch_key is not None else [_NBATCHES])
        store.update_metadata("prepare", entry)  # the commit: written last
        recorded_in = None if isinstance(store, MemoryStore) else store.source
    logger.info("prepared %s: %d HVGs of %d genes over %d batches", store.source, n_top_genes, n_vars, present.size)
    return PrepareResult(str(store.source), var, entry, recorded_in)
