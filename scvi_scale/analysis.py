"""The seed's analysis tasks on a trained run, streamed from a count store with bounded memory.

- :func:`normalized_expression`: batch-corrected normalized expression (scvi-tools' ``get_normalized_expression``),
  written into the store as ``obsm/<out_key>`` region by region (restartable, row-aligned), or returned;
- :func:`differential_expression`: scvi-tools' ``vanilla`` and ``change`` DE between two groups of cells, reading
  only the groups' cells, in chunks;
- :func:`posterior_predictive_sample`: counts drawn from the posterior predictive of a subset of cells.

``run`` is a :class:`~scvi_scale.api.Run` or a run directory; ``data`` a ``.zarr``/``.tiledb`` store (path, URL
or opened), an ``.h5ad`` path or an AnnData, with the run's genes (a store with more genes is read through the
run's genes) and batch column. The math lives in :mod:`scvi_scale.infer.expression`, :mod:`~scvi_scale.infer.de`
and :mod:`~scvi_scale.infer.predictive`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scvi_scale import api
from scvi_scale.infer import de, writeback
from scvi_scale.infer.expression import (
    NormalizedJob,
    batch_codes_for,
    gene_columns,
    normalized_minibatch,
    region_rows_for,
    region_seed,
    seeded,
)
from scvi_scale.infer.predictive import predictive_minibatch
from scvi_scale.store.errors import InputError

__all__ = ["differential_expression", "normalized_expression", "posterior_predictive_sample"]

log = logging.getLogger(__name__)


def _run(run: api.Run | str | Path) -> api.Run:
    run = run if isinstance(run, api.Run) else api.load_run(run)
    run.model.eval()  # every scvi-tools output is computed in eval mode
    return run


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="cells", unit_scale=True, desc=desc, disable=not progress or not total)


def _is_store_path(data: Any) -> bool:
    return isinstance(data, (str, Path)) and not str(data).rstrip("/").lower().endswith(".h5ad")


# ---- normalized expression -------------------------------------------------------------------------------------


def normalized_expression(
    run: api.Run | str | Path,
    data: Any,
    *,
    genes: Sequence[str] | str | None = None,
    transform_batch: str | Sequence[str] | None = None,
    library_size: float | str = 1e4,
    n_samples: int = 1,
    out_key: str = "scvi_normalized",
    write: bool | None = None,
    batch_size: int = 1024,
    region_rows: int | None = None,
    launcher: str = "local",
    workers: int = 1,
    address: str | None = None,
    threads: int | None = None,
    device: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> pd.DataFrame | writeback.EmbedSummary:
    """Batch-corrected normalized expression of every cell: ``px_scale * library_size`` (1e4: counts per 10k).

    The semantics of scvi-tools' ``get_normalized_expression(transform_batch, gene_list, library_size,
    n_samples)``: z is *drawn* from q(z|x) (``n_samples`` draws averaged), the decoder is conditioned on
    ``transform_batch`` (a list: the mean over those batches), and the columns are the chosen genes in the model's
    gene order. Draws are seeded per region (``train.seed`` of the run): the numbers depend on the seed,
    ``region_rows`` and ``batch_size``, not on who computes a region, and a written array is the array
    ``write=False`` returns with the same ``region_rows``.

    Parameters
    ----------
    genes
        Gene names (None: all of the model's genes); an unknown name is an error.
    transform_batch
        Batch name(s) to condition on (None: each cell's own batch).
    library_size
        The constant library size, or ``"latent"`` (scvi-tools: ``px_rate``, the cell's own library).
    out_key, write
        ``write=True`` (default for a ``.zarr``/``.tiledb`` store) writes ``obsm/<out_key>`` (float32, cells x
        genes) into the store, region by region with commit marks, and records a manifest (store metadata
        ``"obsm/<out_key>"``: genes, transform batches, library size, model hash, completion); a rerun skips the
        committed regions. ``write=False`` returns a DataFrame (cells x genes).
    region_rows
        Rows per region (default: a power of two holding at most 32 MiB of output, at most 16,384).
    launcher, workers, address, threads, device, storage_options
        As :func:`scvi_scale.api.embed_to_store` (processes or Ray tasks over the regions; writing only).

    Returns
    -------
    The :class:`~scvi_scale.infer.writeback.EmbedSummary` of the write, or the DataFrame (obs names x genes).
    """
    started = time.perf_counter()
    run = _run(run)
    if library_size != "latent":
        try:
            library_size = float(library_size)
        except (TypeError, ValueError):
            raise InputError(f"library_size must be a number or 'latent'; got {library_size!r}") from None
        if not library_size > 0:
            raise InputError(f"library_size must be positive; got {library_size}")
    if n_samples < 1:
        raise InputError(f"n_samples must be >= 1; got {n_samples}")
    codes = batch_codes_for(run.batch_categories, transform_batch)
    cols = gene_columns(run.var_names, genes)
    names = list(run.var_names) if cols is None else [run.var_names[i] for i in cols]
    if write is None:
        write = _is_store_path(data) or hasattr(data, "write_mark")
    if write:
        if not (_is_store_path(data) or hasattr(data, "write_mark")):
            raise InputError(
                "normalized expression is written into .zarr or .tiledb stores only; for an .h5ad file or an AnnData "
                "pass write=False (a DataFrame is returned)"
            )
        target, url = api._region_store(data, storage_options, launcher, workers)
    else:
        target = api.open_counts(data, run.layer)
        url = str(target.source)
    view, loader = api._aligned_loader(run, target, batch_size)
    device = device or "cpu"
    job = NormalizedJob(
        store_url=url,
        outputs=("normalized",),
        widths=(len(names),),
        plan=writeback.plan_regions(target.n_obs, region_rows or region_rows_for(len(names))),
        **api._job_fields(run, view, batch_size, device, threads, launcher, workers, storage_options),
        key=out_key,
        genes=None if cols is None else tuple(int(c) for c in cols),
        transform=tuple(codes),
        library_size=library_size,
        n_samples=int(n_samples),
    )
    if write:
        record = {
            "run": str(run.path) if run.path is not None else None,
            "config": run.config.to_dict(),
            "genes": names,
            "transform_batch": [None if c is None else run.batch_categories[c] for c in codes],
            "library_size": library_size,
            "n_samples": int(n_samples),
        }
        return api._write_regions(run, target, view, loader, job, record, launcher=launcher, workers=workers,
                                  address=address, threads=threads, device=device, progress=progress,
                                  started=started, desc="normalize")  # fmt: skip
    if threads:
        torch.set_num_threads(threads)
    run.model.to(device)
    out = np.empty((target.n_obs, len(names)), dtype=np.float32)
    with _bar(target.n_obs, "normalize", progress) as bar:
        for region in range(job.plan.n_regions):
            start, stop = job.plan.bounds(region)
            out[start:stop] = job.region_values(run.model, view, loader.batch_codes, region)["normalized"]
            bar.update(stop - start)
    return pd.DataFrame(out, index=pd.Index(view.obs.index.astype(str)), columns=pd.Index(names))


# ---- differential expression -------------------------------------------------------------------------------------


def _cells_mask(obs: pd.DataFrame, subset: Any, source: str) -> np.ndarray:
    """A boolean mask of the cells ``subset`` selects: None (all), a mask, row numbers or ``{column: value(s)}``."""
    n = len(obs)
    if subset is None:
        return np.ones(n, dtype=bool)
    if isinstance(subset, dict):
        mask = np.ones(n, dtype=bool)
        for column, values in subset.items():
            _check_column(obs, column, source)
            wanted = [str(v) for v in (values if isinstance(values, (list, tuple, set)) else [values])]
            labels = obs[column].astype(str).to_numpy()
            absent = [v for v in wanted if v not in set(labels)]
            if absent:
                raise InputError(
                    f"{source}: obs column '{column}' has no value {absent[0]!r}; values: {_values(labels)}"
                )
            mask &= np.isin(labels, wanted)
        return mask
    arr = np.asarray(subset)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise InputError(f"a boolean cell mask must have one entry per cell ({n}); got shape {arr.shape}")
        return arr
    rows = arr.astype(np.int64).ravel()
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise InputError(f"cell rows must lie in [0, {n}); got {rows.min()}..{rows.max()}")
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask


def _check_column(obs: pd.DataFrame, column: str, source: str) -> None:
    if column not in obs.columns:
        raise InputError(f"{source}: no obs column '{column}'; available columns: {list(obs.columns) or 'none'}")


def _values(labels: np.ndarray, limit: int = 12) -> str:
    names, counts = np.unique(labels, return_counts=True)
    shown = ", ".join(f"{v!r} ({c})" for v, c in list(zip(names, counts, strict=True))[:limit])
    return shown + (" ..." if len(names) > limit else "")


def _sample_group(
    run: api.Run,
    view: Any,
    codes_n: np.ndarray,
    rows: np.ndarray,
    plans: list[tuple],
    *,
    chunk_cells: int,
    batch_size: int,
    device: str,
    bar: Any,
) -> tuple[list[np.ndarray], de.GroupCounts]:
    """One pass over a group's cells, ``chunk_cells`` at a time: raw statistics, and the planned scale draws.

    ``plans`` holds ``(code, cells_u, inverse)`` per conditioning batch (see :func:`scvi_scale.infer.de.draw_plan`).
    """
    model, n_genes = run.model, run.model.n_genes
    stats = de.GroupCounts(n_genes)
    outs = [np.empty((len(cells_u), n_genes), dtype=np.float32) for _, cells_u, _ in plans]
    for a in range(0, len(rows), chunk_cells):
        b = min(a + chunk_cells, len(rows))
        x = sp.csr_matrix(view.read_rows(rows[a:b]), dtype=np.float32)
        stats.add(x)
        for p, (code, cells_u, _) in enumerate(plans):
            sel = np.flatnonzero((cells_u >= a) & (cells_u < b))
            for lo in range(0, sel.size, batch_size):
                part = sel[lo : lo + batch_size]
                local = cells_u[part] - a
                x_ng = torch.from_numpy(x[local].toarray()).to(device)
                batch_n = torch.from_numpy(np.asarray(codes_n[rows[a + local]], dtype=np.int64)).to(device)
                scale = normalized_minibatch(model, x_ng, batch_n, (code,), library_size=1.0)
                outs[p][part] = scale.float().cpu().numpy()
        bar.update(b - a)
    return [out[inverse] for out, (_, _, inverse) in zip(outs, plans, strict=True)], stats


def differential_expression(
    run: api.Run | str | Path,
    data: Any,
    groupby: str,
    group1: str | Sequence[str],
    group2: str | None = None,
    *,
    mode: str = "vanilla",
    delta: float | None = 0.25,
    subset: Any = None,
    batch_correction: bool = False,
    batchid1: Sequence[str] | None = None,
    batchid2: Sequence[str] | None = None,
    n_samples_overall: int = 5000,
    pseudocounts: float | None = None,
    threshold_counts: float = 0.01,
    test_mode: str = "three",
    use_permutation: bool = False,
    m_permutation: int = 10000,
    cred_interval_lvls: Sequence[float] | None = None,
    fdr_target: float = 0.05,
    all_stats: bool = True,
    seed: int = 0,
    batch_size: int = 1024,
    chunk_cells: int = 8192,
    device: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Per-gene differential expression of ``groupby == group1`` against ``group2`` (None: every other cell).

    scvi-tools 1.4.2's ``differential_expression`` (``DifferentialComputation.get_bayes_factors``): per group,
    ``n_samples_overall`` scale vectors (``px_scale``, library size 1) drawn uniformly over the group's cells and
    posterior draws; with ``batch_correction=False`` (the default) each conditioned on the cell's observed batch,
    with ``True`` on each of ``batchid1``/``batchid2`` (default all batches) in turn, pairs formed within a batch.

    - ``vanilla``: ``proba_m1 = P(s1 > s2)``, ``proba_m2``, ``bayes_factor``, ``scale1``, ``scale2``; sorted by
      bayes_factor.
    - ``change``: ``lfc = log2(s1 + pc) - log2(s2 + pc)``; ``proba_de = max(P(lfc >= delta), P(lfc < -delta))``
      (``test_mode="two"``: their sum), ``proba_not_de``, ``bayes_factor``, ``scale1/2``, ``pseudocounts``,
      ``delta``, ``lfc_mean/median/std/min/max`` (with pc / 1000), ``is_de_fdr_<fdr_target>``; sorted by proba_de.
      ``pseudocounts=None`` estimates pc from genes unseen in a group (raw mean < ``threshold_counts``);
      ``delta=None`` estimates delta with a 3-component Gaussian mixture.

    With ``all_stats``, ``raw_mean1/2``, ``non_zeros_proportion1/2`` and ``raw_normalized_mean1/2`` (counts per
    10k); then ``comparison``, ``group1``, ``group2``. Only the two groups' cells are read, ``chunk_cells`` at a
    time; at most ``n_samples_overall`` cells per group are decoded. Results are Monte Carlo estimates: ``seed``
    fixes them.

    Parameters
    ----------
    groupby, group1, group2
        An obs column and its values; a list ``group1`` gives one comparison per value, concatenated.
    subset
        Restricts both groups: ``{column: value or values}`` (e.g. ``{"cell_type": "B"}``), a boolean mask or
        row numbers.

    Examples
    --------
    >>> differential_expression("runs/a", "atlas.zarr", "condition", "STIM", "CTRL",
    ...                         subset={"cell_type": "CD14 Mono"}, mode="change")  # doctest: +SKIP
    """
    if mode not in ("vanilla", "change"):
        raise InputError(f"unknown DE mode {mode!r}; choose vanilla or change")
    if test_mode not in ("two", "three"):
        raise InputError(f"unknown test_mode {test_mode!r}; choose three (default) or two")
    if n_samples_overall < 1:
        raise InputError(f"n_samples_overall must be >= 1; got {n_samples_overall}")
    run = _run(run)
    view, loader = api._aligned_loader(run, data, batch_size)
    obs = view.obs
    _check_column(obs, groupby, view.source)
    labels = obs[groupby].astype(str).to_numpy()
    keep = _cells_mask(obs, subset, view.source)
    use_observed = not batch_correction
    if use_observed and (batchid1 is not None or batchid2 is not None):
        raise InputError("batchid1/batchid2 choose the batches to condition on: pass batch_correction=True with them")
    everything = list(range(len(run.batch_categories)))
    conds = []
    for batchid in (batchid1, batchid2):
        conds.append([None] if use_observed else everything if batchid is None else
                     batch_codes_for(run.batch_categories, list(batchid), "batchid batch"))  # fmt: skip
    device = device or "cpu"
    run.model.to(device)
    firsts = [group1] if isinstance(group1, str) or not isinstance(group1, Sequence) else list(group1)
    tables = []
    for gi, g1 in enumerate(firsts):
        masks = [keep & (labels == str(g1)), keep & (labels == str(group2)) if group2 is not None else None]
        masks[1] = keep & ~masks[0] if masks[1] is None else masks[1]
        for value, mask in zip((g1, group2 if group2 is not None else "rest"), masks, strict=True):
            if not mask.any():
                within = " within the subset" if subset is not None else ""
                raise InputError(
                    f"{view.source}: no cells with {groupby} == {value!r}{within}; values: {_values(labels[keep])}"
                )
        rng = np.random.default_rng(np.random.SeedSequence([seed, gi]))
        samples, stats = [], []
        total = int(masks[0].sum() + masks[1].sum())
        with _bar(total, f"de {g1} vs {group2 if group2 is not None else 'rest'}", progress) as bar, \
                seeded(region_seed(seed, gi)):  # fmt: skip
            for mask, cond in zip(masks, conds, strict=True):
                rows = np.flatnonzero(mask)
                n_draws = int(n_samples_overall / len(cond)) or 2  # scvi-tools: per conditioning batch
                plans = [(code, *de.draw_plan(rng, rows.size, n_draws)) for code in cond]
                scales, group_stats = _sample_group(run, view, loader.batch_codes, rows, plans, chunk_cells=chunk_cells,
                                                    batch_size=batch_size, device=device, bar=bar)  # fmt: skip
                ids = np.concatenate([np.full(n_draws, -1 if code is None else code) for code in cond])
                samples.append((np.concatenate(scales), ids))
                stats.append(group_stats)
        info = de.bayes_factors(
            samples[0][0], samples[0][1], samples[1][0], samples[1][1],
            mode=mode, use_observed_batches=use_observed, raw_mean1=stats[0].mean_g, raw_mean2=stats[1].mean_g,
            delta=delta, pseudocounts=pseudocounts, threshold_counts=threshold_counts, test_mode=test_mode,
            cred_interval_lvls=cred_interval_lvls, use_permutation=use_permutation, m_permutation=m_permutation,
            rng=rng,
        )  # fmt: skip
        if all_stats:
            info.update(stats[0].properties(stats[1]))
        g2 = "Rest" if group2 is None else str(group2)
        tables.append(de.de_table(info, run.var_names, mode, fdr_target, (str(g1), g2)))
    return pd.concat(tables, axis=0)


# ---- posterior predictive samples ---------------------------------------------------------------------------------


def posterior_predictive_sample(
    run: api.Run | str | Path,
    data: Any,
    cells: Any = None,
    n_samples: int = 1,
    *,
    genes: Sequence[str] | str | None = None,
    transform_batch: str | None = None,
    output: str = "dense",
    seed: int = 0,
    batch_size: int = 1024,
    device: str | None = None,
    progress: bool = False,
) -> Any:
    """Counts drawn from the posterior predictive of the chosen cells (scvi-tools' ``posterior_predictive_sample``).

    For each cell, ``n_samples`` draws of z ~ q(z|x), each followed by one draw of counts from p(x|z, l) (ZINB,
    NB or Poisson, as the model), conditioned on ``transform_batch`` (None: the cell's own batch).

    Parameters
    ----------
    cells
        The cells: row numbers (in the order wanted), a boolean mask, ``{column: value(s)}`` or None (all cells;
        the output is cells x genes x samples, so keep it to a subset).
    genes
        Gene names (None: all), columns in the model's gene order.
    output
        ``"dense"``: a float32 numpy array; ``"sparse"``: a ``sparse.GCXS`` as scvi-tools returns (needs the
        ``sparse`` package). Shape ``(cells, genes)``, or ``(cells, genes, n_samples)`` when ``n_samples > 1``.
    """
    if output not in ("dense", "sparse"):
        raise InputError(f"unknown output {output!r}; choose dense or sparse")
    if n_samples < 1:
        raise InputError(f"n_samples must be >= 1; got {n_samples}")
    if isinstance(transform_batch, (list, tuple)):
        raise InputError("posterior predictive samples condition on one batch; pass one name (or None)")
    run = _run(run)
    (code,) = batch_codes_for(run.batch_categories, transform_batch)
    cols = gene_columns(run.var_names, genes)
    view, loader = api._aligned_loader(run, data, batch_size)
    if cells is None or isinstance(cells, dict) or np.asarray(cells).dtype == bool:
        rows = np.flatnonzero(_cells_mask(view.obs, cells, view.source))
    else:
        rows = np.asarray(cells, dtype=np.int64).ravel()
        _cells_mask(view.obs, rows, view.source)  # range check
    if rows.size == 0:
        raise InputError("no cells selected for posterior predictive samples")
    device = device or "cpu"
    run.model.to(device)
    parts = []
    gene_idx = None if cols is None else torch.as_tensor(cols, device=device)
    with _bar(rows.size, "sample", progress) as bar, seeded(region_seed(seed, 0)):
        for lo in range(0, rows.size, batch_size):
            chunk = rows[lo : lo + batch_size]
            x_ng = torch.from_numpy(sp.csr_matrix(view.read_rows(chunk), dtype=np.float32).toarray()).to(device)
            batch_n = torch.from_numpy(np.asarray(loader.batch_codes[chunk], dtype=np.int64)).to(device)
            counts = predictive_minibatch(run.model, x_ng, batch_n, n_samples=n_samples, code=code)
            if gene_idx is not None:
                counts = counts.index_select(1, gene_idx)
            parts.append(counts.float().cpu().numpy())
            bar.update(chunk.size)
    out = np.concatenate(parts)
    if output == "sparse":
        try:
            import sparse
        except ImportError:
            raise InputError("output='sparse' returns a sparse.GCXS; install the 'sparse' package, or pass "
                             "output='dense'") from None  # fmt: skip
        return sparse.GCXS.from_numpy(out)
    return out
