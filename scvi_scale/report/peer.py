"""The side-by-side peer: scvi-tools' SCVI trained on the same cells, architecture, split, epochs and seed.

The peer reads the run's training data into an AnnData (a small-data comparison tool: above ``max_cells`` it
refuses), trains ``scvi.model.SCVI`` with the run's model and optimiser settings on exactly the run's
train/validation rows (``split.npz``, passed as scvi-tools' ``external_indexing``), saves it, and imports the
weights as a run directory. Its numbers then come from the same code as ours
(:func:`scvi_scale.report.quality.compute_quality`) on the same held-out cells and the same subsample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scvi_scale.store.errors import InputError

__all__ = ["PEER_MAX_CELLS", "scvi_tools_available", "train_peer"]

log = logging.getLogger(__name__)

PEER_MAX_CELLS = 100_000
_MODEL_KWARGS = (
    "n_hidden",
    "n_latent",
    "n_layers",
    "dropout_rate",
    "dispersion",
    "gene_likelihood",
    "latent_distribution",
    "use_observed_lib_size",
    "encode_covariates",
    "deeply_inject_covariates",
    "use_batch_norm",
    "use_layer_norm",
    "log_variational",
)


def scvi_tools_available() -> bool:
    return importlib.util.find_spec("scvi") is not None


def train_peer(
    run: Any,
    data: Any,
    out: str | Path,
    *,
    epochs: int | None = None,
    max_cells: int = PEER_MAX_CELLS,
    threads: int | None = None,
) -> tuple[Any, dict[str, float]]:
    """Train scvi-tools' SCVI like ``run`` and return it as a :class:`~scvi_scale.api.Run` (in ``out``) with timings.

    Parameters
    ----------
    run
        Our run (its config, genes, batch key and ``split.npz`` are copied).
    data
        The data it was trained on.
    out
        A directory for the peer: ``scvi_tools/`` (its own save) and ``run/`` (the imported run directory).
    epochs
        Epochs to train (default: as many as the run trained).
    max_cells
        Refuse larger data: the peer holds all counts in memory.
    threads
        torch threads while the peer trains (restored afterwards).

    Returns
    -------
    run, numbers
        The imported peer run (with ``metrics.csv`` from scvi-tools' history and our ``split.npz``) and
        ``peer/train_s``, ``peer/epochs``.
    """
    import torch

    from scvi_scale import api

    if not scvi_tools_available():
        raise InputError(
            "side-by-side mode trains scvi-tools, which is not installed: pip install 'scvi-scale[parity]'"
        )
    run = api.load_run(run) if not isinstance(run, api.Run) else run
    store, _ = api._aligned_loader(run, data, 1024)
    if store.n_obs > max_cells:
        raise InputError(
            f"{store.source}: {store.n_obs} cells; side-by-side mode holds the data in memory for scvi-tools and "
            f"stops at {max_cells} (a small-data comparison tool); subsample the data or drop --side-by-side"
        )
    split = Path(run.path) / "split.npz" if run.path is not None else None
    if split is None or not split.is_file():
        raise InputError(f"{run.path}: no split.npz, so the peer cannot train on the same rows")
    with np.load(split) as s:
        train_rows, val_rows = np.asarray(s["train"], np.int64), np.asarray(s["validation"], np.int64)
    if len(train_rows) + len(val_rows) != store.n_obs:
        raise InputError(
            f"{store.source} has {store.n_obs} cells but {split} splits {len(train_rows) + len(val_rows)}: "
            "side-by-side mode needs the data the run was trained on"
        )
    epochs = int(epochs or run.max_epochs or len(run.metrics) or 0)
    if epochs < 1:
        raise InputError(f"{run.path}: cannot tell how many epochs it trained; pass epochs")

    import anndata

    obs = store.obs.copy()
    obs.index = obs.index.astype(str)
    adata = anndata.AnnData(X=store.read_range(0, store.n_obs), obs=obs, var=pd.DataFrame(index=run.var_names))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model, seconds = _fit(adata, run, train_rows, val_rows, epochs)
        st_dir = out / "scvi_tools"
        model.save(str(st_dir), overwrite=True)
        history = model.history
    finally:
        torch.set_num_threads(before)
    peer = api.import_scvi_tools(st_dir, out / "run", overwrite=True)
    np.savez(peer.path / "split.npz", train=train_rows, validation=val_rows)
    _write_metrics(peer.path / "metrics.csv", history, seconds / max(epochs, 1), len(train_rows))
    return peer, {"peer/train_s": seconds, "peer/epochs": float(epochs)}


def _fit(adata: Any, run: Any, train_rows: np.ndarray, val_rows: np.ndarray, epochs: int) -> tuple[Any, float]:
    import scvi

    cfg = run.config
    tc, dc = cfg.train, cfg.data
    mkw = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k in _MODEL_KWARGS}
    plan = {"lr": tc.lr, "eps": tc.eps, "weight_decay": tc.weight_decay, "n_epochs_kl_warmup": tc.n_epochs_kl_warmup,
            "n_steps_kl_warmup": tc.n_steps_kl_warmup, "min_kl_weight": tc.min_kl_weight,
            "max_kl_weight": tc.max_kl_weight}  # fmt: skip
    quiet = contextlib.redirect_stdout(io.StringIO())
    loggers = [logging.getLogger(n) for n in ("scvi", "lightning", "lightning_fabric", "lightning.fabric",
                                               "pytorch_lightning", "lightning.pytorch")]  # fmt: skip
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), quiet, contextlib.ExitStack() as restore:
        warnings.simplefilter("ignore")  # scvi-tools/Lightning chatter (seed, num_workers, small batches)
        restore.callback(lambda: [lg.setLevel(lv) for lg, lv in zip(loggers, levels, strict=True)])
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        scvi.settings.seed = tc.seed
        scvi.model.SCVI.setup_anndata(adata, batch_key=run.batch_key)
        model = scvi.model.SCVI(adata, **mkw)
        t0 = time.perf_counter()
        model.train(
            max_epochs=epochs,
            batch_size=dc.batch_size,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            early_stopping=tc.early_stopping,
            check_val_every_n_epoch=1 if len(val_rows) else None,
            plan_kwargs=plan,
            datasplitter_kwargs={"external_indexing": [train_rows, val_rows, np.array([], dtype=np.int64)]},
        )
        seconds = time.perf_counter() - t0
    return model, seconds


def _write_metrics(path: Path, history: dict[str, pd.DataFrame], epoch_s: float, n_train: int) -> None:
    """scvi-tools' per-epoch history under our ``metrics.csv`` names, so the loss-curve plot reads both."""
    names = {
        "train_loss_epoch": "train/loss",
        "elbo_train": "train/elbo",
        "reconstruction_loss_train": "train/reconstruction_loss",
        "kl_local_train": "train/kl_local",
        "validation_loss": "validation/loss",
        "elbo_validation": "validation/elbo",
        "reconstruction_loss_validation": "validation/reconstruction_loss",
        "kl_local_validation": "validation/kl_local",
        "kl_weight": "kl_weight",
    }
    cols = {}
    for theirs, ours in names.items():
        if theirs in history:
            cols[ours] = history[theirs].iloc[:, 0].astype(float).reset_index(drop=True)
    df = pd.DataFrame(cols)
    df.insert(0, "epoch", np.arange(len(df)))
    df["perf/epoch_s"] = epoch_s
    df["perf/cells_per_s"] = n_train / max(epoch_s, 1e-9)
    df.to_csv(path, index=False)
