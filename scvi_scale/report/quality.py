"""The numbers that say how good a trained model is: held-out ELBO, marginal likelihood, integration scores.

:func:`quality_numbers` is the contract the report and the rebuild's quality gate share: a flat dict of floats
with slash names. :func:`compute_quality` returns the same numbers with what they were computed from (the
subsample's embedding and labels, the held-out rows), which the report reuses for its figures.

Which cells each number is computed on:

- ``heldout/*``: the run's validation rows (``split.npz``) when the data is the data it was trained on (same
  number of cells as the split), else every cell given (new data is held out by construction).
- ``marginal_ll``: the same held-out cells, at most ``max_ll_cells`` of them (a seeded subsample).
- ``integration/*``: a seeded subsample of at most ``max_cells`` of all cells.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scvi_scale.store.errors import InputError

__all__ = ["QualityResult", "compute_quality", "heldout_rows", "quality_numbers", "subsample_rows"]

log = logging.getLogger(__name__)


@dataclass
class QualityResult:
    """The numbers and what they were computed from.

    Attributes
    ----------
    numbers
        The flat dict of :func:`quality_numbers`.
    z_nk, batch_n, labels_n, rows_n
        The integration subsample: posterior means, batch and label values (None when no key), store rows.
    x_pre_nd
        PCA of the subsample's log-normalised counts (scib's PCR comparison baseline), or None.
    heldout_rows_n
        The cells the held-out ELBO was computed on; ``heldout_source`` says why those.
    notes
        Plain sentences for a report (fallbacks, which cells were used).
    """

    numbers: dict[str, float]
    z_nk: np.ndarray
    batch_n: np.ndarray | None
    labels_n: np.ndarray | None
    rows_n: np.ndarray
    x_pre_nd: np.ndarray | None
    heldout_rows_n: np.ndarray
    heldout_source: str
    batch_key: str | None
    labels_key: str | None
    notes: list[str] = field(default_factory=list)


def subsample_rows(n_obs: int, max_cells: int | None, seed: int) -> np.ndarray:
    """Sorted rows of a seeded subsample of at most ``max_cells`` of ``n_obs`` rows (all rows when fewer)."""
    if max_cells is None or n_obs <= max_cells:
        return np.arange(n_obs, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n_obs, size=int(max_cells), replace=False)).astype(np.int64)


def heldout_rows(run: Any, n_obs: int, heldout: str = "auto") -> tuple[np.ndarray, str]:
    """The rows to compute the held-out ELBO on, and a phrase saying which they are.

    ``heldout="auto"``: the validation rows of the run's ``split.npz`` when the data has exactly as many cells
    as the split covers (taken to be the training data), else all cells. ``"validation"`` insists on the split;
    ``"all"`` takes every cell.
    """
    if heldout not in ("auto", "validation", "all"):
        raise InputError(f"heldout must be auto, validation or all; got {heldout!r}")
    everything = np.arange(n_obs, dtype=np.int64)
    if heldout == "all":
        return everything, "all cells"
    split_path = Path(run.path) / "split.npz" if getattr(run, "path", None) is not None else None
    if split_path is None or not split_path.is_file():
        if heldout == "validation":
            raise InputError(f"{run.path}: no split.npz, so there are no validation rows; use heldout='all'")
        return everything, "all cells (the run records no train/validation split)"
    with np.load(split_path) as split:
        train, val = np.asarray(split["train"], np.int64), np.asarray(split["validation"], np.int64)
    matches = len(train) + len(val) == n_obs
    if heldout == "validation" and not matches:
        raise InputError(
            f"{split_path} splits {len(train) + len(val)} cells but the data has {n_obs}: it is not the data the run "
            "was trained on; use heldout='all'"
        )
    if not matches:
        return everything, "all cells (not the training data: its cell count differs from the run's split)"
    if len(val) == 0:
        return everything, "all cells (the run trained on every cell: train_size=1, no validation rows)"
    return val, "the run's validation rows (split.npz)"


def _obs_values(obs: Any, key: str | None, what: str, source: str) -> np.ndarray | None:
    if key is None:
        return None
    if key not in obs.columns:
        cols = ", ".join(map(str, obs.columns)) or "(none)"
        raise InputError(f"{source}: no obs column {key!r} for the {what}; the available columns are: {cols}")
    return np.asarray(obs[key].astype(str).to_numpy())


def compute_quality(
    run: Any,
    data: Any,
    *,
    batch_key: str | None = None,
    labels_key: str | None = None,
    max_cells: int | None = 20_000,
    marginal_ll: bool = False,
    n_mc_samples: int = 100,
    max_ll_cells: int | None = 2_000,
    seed: int = 0,
    progress: bool = False,
    heldout: str = "auto",
    batch_size: int = 1024,
    use_scib: bool | None = None,
    device: str = "cpu",
    rows_n: np.ndarray | None = None,
    x_pre_nd: np.ndarray | None = None,
) -> QualityResult:
    """:func:`quality_numbers` with what they were computed from; ``rows_n``/``x_pre_nd`` reuse a subsample."""
    from scvi_scale import api
    from scvi_scale.data.memory import MemoryLoader
    from scvi_scale.infer.embed import latent_representation
    from scvi_scale.report.integration import backend_note, integration_scores
    from scvi_scale.report.marginal_ll import marginal_ll as marginal_ll_fn
    from scvi_scale.report.metrics import lognorm_pca
    from scvi_scale.train.loop import evaluate_elbo

    run = api.load_run(run) if not isinstance(run, api.Run) else run
    store, all_loader = api._aligned_loader(run, data, batch_size)
    codes = all_loader.batch_codes
    counts = api._counts_for_loader(store)
    obs = store.obs
    batch_key = batch_key if batch_key is not None else run.batch_key
    batch_all = _obs_values(obs, batch_key, "batch", store.source)
    labels_all = _obs_values(obs, labels_key, "cell-type labels", store.source)
    model = run.model.to(device)
    numbers: dict[str, float] = {}
    notes: list[str] = []

    def loader(rows: np.ndarray) -> MemoryLoader:
        return MemoryLoader(counts, codes, rows, batch_size, shuffle=False)

    # held-out ELBO: the same definition as api.evaluate (KL weight 1, eval mode), seeded draws of z
    held, held_source = heldout_rows(run, store.n_obs, heldout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        elbo = evaluate_elbo(model, loader(held), kl_weight=1.0, device=device, prefix="heldout")
    numbers["heldout/neg_elbo"] = float(elbo["heldout/elbo"])
    numbers["heldout/reconstruction_loss"] = float(elbo["heldout/reconstruction_loss"])
    numbers["heldout/kl_local"] = float(elbo["heldout/kl_local"])
    numbers["heldout/n_cells"] = float(len(held))
    numbers["heldout/is_validation_split"] = float(held_source.startswith("the run's validation"))
    notes.append(f"Held-out negative ELBO on {len(held)} cells: {held_source}.")

    if marginal_ll:
        ll_rows = held[subsample_rows(len(held), max_ll_cells, seed)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ll_n, _ = marginal_ll_fn(model, _progress(loader(ll_rows), progress, "marginal LL"), n_mc_samples,
                                     device=device)  # fmt: skip
        numbers["marginal_ll"] = float(np.mean(ll_n)) if len(ll_n) else math.nan
        numbers["marginal_ll/n_cells"] = float(len(ll_rows))
        numbers["marginal_ll/n_mc_samples"] = float(n_mc_samples)
        notes.append(
            f"Marginal log-likelihood: importance sampling with {n_mc_samples} samples per cell on {len(ll_rows)} "
            "of the held-out cells (higher is better)."
        )

    # integration: posterior means on a subsample of all cells
    rows = subsample_rows(store.n_obs, max_cells, seed) if rows_n is None else np.asarray(rows_n, np.int64)
    z_nk, _, _ = latent_representation(model, _progress(loader(rows), progress, "embed"), device=device)
    batch_n = batch_all[rows] if batch_all is not None else None
    labels_n = labels_all[rows] if labels_all is not None else None
    if x_pre_nd is None and batch_n is not None and len(np.unique(batch_n)) > 1:
        sub = store.read_rows(rows)
        x_pre_nd = lognorm_pca(sub, n_components=min(50, min(sub.shape) - 1), seed=seed)
    scores = integration_scores(z_nk, batch_n, labels_n, x_pre_nd, seed=seed, use_scib=use_scib)
    numbers.update(scores)
    backend = backend_note(bool(scores["integration/uses_scib_metrics"]))
    notes.append(f"Integration scores on {len(rows)} cells: {backend}.")
    if labels_n is None:
        notes.append("No labels key: integration/total is the batch-correction score (no bio conservation).")
    if batch_n is None or len(np.unique(batch_n)) < 2:
        notes.append("One batch: no batch-correction score; integration/total is the bio-conservation score.")
    return QualityResult(
        numbers=numbers,
        z_nk=z_nk,
        batch_n=batch_n,
        labels_n=labels_n,
        rows_n=rows,
        x_pre_nd=x_pre_nd,
        heldout_rows_n=held,
        heldout_source=held_source,
        batch_key=batch_key,
        labels_key=labels_key,
        notes=notes,
    )


def _progress(loader: Any, progress: bool, desc: str) -> Any:
    if not progress:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, total=len(loader), desc=desc, unit="batch")


def quality_numbers(
    run: Any,
    data: Any,
    *,
    batch_key: str | None = None,
    labels_key: str | None = None,
    max_cells: int | None = 20_000,
    marginal_ll: bool = False,
    n_mc_samples: int = 100,
    seed: int = 0,
    progress: bool = False,
    **options: Any,
) -> dict[str, float]:
    """Held-out negative ELBO, integration scores and (optionally) the marginal log-likelihood of a run.

    Parameters
    ----------
    run
        A :class:`~scvi_scale.api.Run` or a run directory.
    data
        The counts: a path or URL (``.h5ad``, ``.zarr``, ``.tiledb``), a store or an AnnData; the model's genes
        are picked by name from a store with more genes.
    batch_key
        The obs column the batch metrics use (default: the run's batch key).
    labels_key
        The obs column of cell types; without it there is no bio-conservation score.
    max_cells
        Integration metrics on a seeded subsample of at most this many cells.
    marginal_ll
        Also estimate the marginal log-likelihood (importance sampling, ``n_mc_samples`` draws per cell) on the
        held-out cells (at most ``max_ll_cells``, default 2000).
    seed
        Seeds the subsamples and the Monte Carlo draws: the same call gives the same numbers.
    options
        ``max_ll_cells``, ``heldout`` (``"auto"``, ``"validation"``, ``"all"``: see :func:`heldout_rows`),
        ``batch_size``, ``use_scib`` (None: scib-metrics when installed), ``device``.

    Returns
    -------
    dict
        ``heldout/neg_elbo`` (lower is better), ``heldout/reconstruction_loss``, ``heldout/kl_local``,
        ``heldout/n_cells``, ``heldout/is_validation_split``; ``integration/total``, ``integration/batch``,
        ``integration/bio`` (NaN where not computable; higher is better), one ``integration/<metric>`` per
        metric, ``integration/n_cells``, ``integration/uses_scib_metrics``; with ``marginal_ll``:
        ``marginal_ll`` (higher is better), ``marginal_ll/n_cells``, ``marginal_ll/n_mc_samples``.

    Examples
    --------
    >>> quality_numbers("runs/a", "atlas.zarr", labels_key="cell_type")["integration/total"]  # doctest: +SKIP
    0.61
    """
    return compute_quality(
        run,
        data,
        batch_key=batch_key,
        labels_key=labels_key,
        max_cells=max_cells,
        marginal_ll=marginal_ll,
        n_mc_samples=n_mc_samples,
        seed=seed,
        progress=progress,
        **options,
    ).numbers
