"""The Python API: prepare, train, resume, embed, evaluate, import/export scvi-tools. The CLI calls only this.

A run directory holds ``config.yaml`` (the resolved config), ``model.pt`` (weights, gene names, batch
categories; readable with ``torch.load(weights_only=True)``), ``metrics.csv``, ``split.npz`` (train and
validation rows) and ``checkpoints/last.pt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scvi_scale.config import Config, config_from_dict, with_overrides
from scvi_scale.data.memory import MemoryLoader, train_val_split
from scvi_scale.dist import DistContext
from scvi_scale.infer import writeback
from scvi_scale.infer.embed import latent_representation
from scvi_scale.model import VAE, ModelConfig
from scvi_scale.model.fused import compile_kernels
from scvi_scale.prep.prepare import PrepareResult, prepared_library_priors, select_genes
from scvi_scale.prep.prepare import prepare as prepare_store
from scvi_scale.store.errors import InputError
from scvi_scale.store.memory import MemoryStore
from scvi_scale.store.subset import GeneSubset
from scvi_scale.train.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION, MODEL_FORMAT, atomic_save, safe_load
from scvi_scale.train.loop import FitResult, evaluate_elbo, fit
from scvi_scale.train.optim import max_epochs_heuristic

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A trained model with what it was trained on: config, gene names, batch categories, metrics."""

    path: Path | None
    model: VAE
    config: Config
    var_names: list[str]
    batch_key: str | None
    batch_categories: list[str]
    layer: str | None = None
    max_epochs: int | None = None
    fit_result: FitResult | None = None

    @property
    def metrics(self) -> pd.DataFrame:
        """Per-epoch metrics (empty when the run has none, e.g. an imported scvi-tools model)."""
        if self.path is not None and (self.path / "metrics.csv").exists():
            return pd.read_csv(self.path / "metrics.csv")
        if self.fit_result is not None:  # trained in memory (no run directory)
            return pd.DataFrame(self.fit_result.history)
        return pd.DataFrame()

    def __repr__(self) -> str:
        m = self.metrics
        last = ""
        if len(m):
            row = m.iloc[-1]
            val = row.get("validation/elbo", float("nan"))
            last = f", epochs={len(m)}, train/elbo={row['train/elbo']:.3f}, validation/elbo={val:.3f}"
        return (
            f"Run(path={str(self.path)!r}, genes={len(self.var_names)}, batches={len(self.batch_categories)}, "
            f"likelihood={self.config.model.gene_likelihood!r}{last})"
        )

    def model_meta(self) -> dict[str, Any]:
        return {
            "var_names": list(self.var_names),
            "batch_key": self.batch_key,
            "batch_categories": list(self.batch_categories),
            "layer": self.layer,
            "max_epochs": self.max_epochs,
        }


def open_counts(data: Any, layer: str | None = None, drop_empty_cells: bool = False) -> Any:
    """Open counts from a path or URL (``.h5ad``, ``.zarr``, ``.tiledb``), an AnnData or a store.

    ``.h5ad`` files and AnnData objects are read into a validated :class:`MemoryStore`; Zarr and TileDB
    stores stay on disk (or in object storage) and are read minibatch by minibatch.
    """
    if hasattr(data, "read_rows") and hasattr(data, "batch_codes"):
        return data
    if isinstance(data, (str, Path)):
        from scvi_scale.store.open import open_store

        return open_store(data, layer=layer, drop_empty_cells=drop_empty_cells)
    import anndata

    if isinstance(data, anndata.AnnData):
        return MemoryStore.from_anndata(data, layer=layer, drop_empty_cells=drop_empty_cells)
    raise InputError(f"cannot read counts from {type(data).__name__}; pass an .h5ad/.zarr/.tiledb path or an AnnData")


def prepare(
    data: Any, n_top_genes: int = 2000, batch_key: str | None = None, *, progress: bool = False, **options: Any
) -> PrepareResult:
    """Highly variable genes (scanpy's seurat_v3 on counts), gene statistics and library priors, out of core.

    The results are recorded in the store (``var`` columns and a ``prepare`` metadata entry), and training on
    it then uses the selected genes (``data.genes``, default ``"auto"``) and the recorded priors.

    Parameters
    ----------
    data
        A ``.zarr``/``.tiledb`` store (path, URL or opened), or an ``.h5ad``/AnnData (computed in memory, recorded
        nowhere).
    n_top_genes, batch_key
        As in ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")``.
    progress
        Show a progress bar per pass over the store.
    options
        ``span``, ``block_rows``, ``num_workers``, ``record`` of :func:`scvi_scale.prep.prepare.prepare`.

    Examples
    --------
    >>> prepare("atlas.zarr", n_top_genes=2000, batch_key="batch")  # doctest: +SKIP
    PrepareResult('atlas.zarr', 2000 HVGs of 36601 genes, seurat_v3, batch_key='batch' (12 batches), ...)
    """
    return prepare_store(open_counts(data), n_top_genes, batch_key, progress=progress, **options)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} already exists and is not empty; choose a new --out, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)


def train(
    source: Any,
    out: str | Path | None,
    config: Config | None = None,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    **sections: dict[str, Any],
) -> Run:
    """Train scVI on counts and write a run directory.

    Parameters
    ----------
    source
        An ``.h5ad`` path (raw counts in ``X`` or ``config.data.layer``), a ``.zarr``/``.tiledb`` store path or
        URL, an AnnData or a store object.
    out
        Run directory to create (None: train in memory only; multi-worker runs need one).
    config
        The config tree; keyword sections override it, e.g. ``train={"max_epochs": 20}``.
    resume
        A checkpoint file or a run directory to continue from; the saved config is used.
    device
        ``"cpu"`` or ``"cuda"``; default CPU.

    Notes
    -----
    On a store prepared with :func:`prepare`, ``data.genes="auto"`` (the default) trains on its highly variable
    genes, read through a :class:`~scvi_scale.store.subset.GeneSubset`, and takes the recorded library-size
    priors when the batch key matches; ``"all"`` trains on every gene.

    On-disk stores are read by the block-shuffling prefetching loader
    (:class:`~scvi_scale.data.prefetch.StoreLoader`); counts in memory by random minibatches
    (``data.loader`` chooses). ``train.workers`` > 1 trains data-parallel on that many processes
    (``train.launcher``: ``local`` spawns them here, ``ray`` runs them as a Ray Train job); under ``torchrun``
    every rank calls this function and the environment says which rank it is.

    Examples
    --------
    >>> run = train("atlas.h5ad", "runs/a", data={"batch_key": "batch"}, train={"max_epochs": 20})  # doctest: +SKIP
    >>> run = train("s3://bucket/atlas.zarr", "runs/b", train={"workers": 2, "launcher": "ray"})  # doctest: +SKIP
    """
    config, ckpt, out = _resolve_run_config(config, resume, out, sections)
    tc = config.train
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun rank (or a worker our launchers started)
        return _train_ranked(source, out, config, ckpt, overwrite, device)
    if tc.launcher == "torchrun":
        raise InputError(
            "train.launcher=torchrun: start the ranks with `torchrun --nproc_per_node N -m scvi_scale train ...`"
        )
    if tc.workers > 1 or tc.launcher == "ray":
        return _launch_workers(source, out, config, ckpt, overwrite, device)
    return _train_process(DistContext.single(device or "cpu"), source, out, config, ckpt, overwrite)


def _resolve_run_config(
    config: Config | None, resume: str | Path | None, out: str | Path | None, sections: dict[str, Any]
) -> tuple[Config, Path | None, Path | None]:
    """The config to train with (a resumed run's own, with a new ``max_epochs`` allowed), the checkpoint, out."""
    if resume is None:
        return with_overrides(config, **sections), None, Path(out) if out is not None else None
    ckpt = Path(resume) / "checkpoints" / "last.pt" if Path(resume).is_dir() else Path(resume)
    try:
        saved = safe_load(ckpt, CHECKPOINT_FORMAT)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"cannot resume: {err}; pass a run directory or its checkpoints/last.pt") from None
    config = config_from_dict(saved["config"])
    train_over = {k: v for k, v in sections.get("train", {}).items() if k in _RESUME_OVERRIDES and v is not None}
    if train_over:  # a resumed run may train longer, or on another number of workers
        tree = config.to_dict()
        tree["train"].update(train_over)
        config = config_from_dict(tree)
    return config, ckpt, Path(out) if out is not None else ckpt.parent.parent


_RESUME_OVERRIDES = ("max_epochs", "workers", "launcher", "gpus_per_worker", "address", "storage_path", "progress")


def _launch_workers(
    source: Any, out: Path | None, config: Config, ckpt: Path | None, overwrite: bool, device: str | None
) -> Run:
    """Start ``train.workers`` processes (local spawn or Ray) that each run :func:`_train_worker`."""
    from scvi_scale.dist.launch import launch

    tc = config.train
    if not isinstance(source, (str, Path)):
        raise InputError(
            "multi-worker training opens the counts in every worker: pass a path or URL, not an in-memory object"
        )
    if out is None:
        raise InputError("multi-worker training needs a run directory (out)")
    # Ray keeps its checkpoints under storage_path/name: by default inside this run directory, else under a name
    # unique to it, so a restarted worker group never picks up another run's checkpoint of the same base name
    storage_path = tc.storage_path or str((out / "ray").resolve())
    name = (
        "train"
        if tc.storage_path is None
        else f"{out.name}-{hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:8]}"
    )
    if ckpt is None:
        _prepare_out(out, overwrite)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a restarted worker group resumes only from ours
        shutil.rmtree(out / "ray", ignore_errors=True)
    text = str(source)
    payload = {  # absolute paths: Ray workers run in their own working directories
        "source": text
        if "://" in text and not text.startswith("file://")
        else os.path.abspath(text.removeprefix("file://")),
        "out": str(out.resolve()),
        "config": config.to_dict(),
        "resume": str(ckpt) if ckpt is not None else None,
        "device": device,
        "ray": tc.launcher == "ray",
    }
    launch(
        tc.launcher,
        tc.workers,
        _train_worker,
        payload,
        gpus_per_worker=tc.gpus_per_worker,
        address=tc.address,
        storage_path=storage_path,
        max_failures=tc.max_failures,
        name=name,
    )
    return load_run(out)


def _train_worker(payload: dict[str, Any]) -> None:
    """One rank of a launched job. After a restart (Ray), it resumes from the run's last checkpoint."""
    out = Path(payload["out"])
    last = out / "checkpoints" / "last.pt"
    ckpt = last if last.exists() else Path(payload["resume"]) if payload["resume"] else None
    if ckpt is None and payload["ray"]:
        from scvi_scale.dist.ray_hooks import restored_checkpoint

        ckpt = restored_checkpoint(out)  # a checkpoint Ray kept in its storage (another node's disk, S3)
    ctx = DistContext.from_env(payload["device"])
    try:
        _train_process(ctx, payload["source"], out, config_from_dict(payload["config"]), ckpt, True, launched=True)
    finally:
        ctx.shutdown()


def _train_ranked(
    source: Any, out: Path | None, config: Config, ckpt: Path | None, overwrite: bool, device: str | None
) -> Run:
    """A torchrun rank: join the process group, rank 0 prepares the run directory, all train."""
    ctx = DistContext.from_env(device)
    try:
        error = None
        if ctx.is_main and ckpt is None and out is not None:
            try:
                _prepare_out(out, overwrite)
            except InputError as err:
                error = str(err)
        error = ctx.broadcast_object(error)
        if error is not None:
            raise InputError(error)
        return _train_process(ctx, source, out, config, ckpt, overwrite, launched=True)
    finally:
        ctx.shutdown()


def _make_loaders(store: Any, codes: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray, config: Config,
                  ctx: DistContext) -> tuple[Any, Any]:  # fmt: skip
    """Random in-memory minibatches, or the block-shuffling prefetching loader (each rank its share)."""
    dc, tc = config.data, config.train
    in_memory = isinstance(store, MemoryStore) or (
        isinstance(store, GeneSubset) and isinstance(store.store, MemoryStore)
    )
    if dc.loader == "memory" or (dc.loader == "auto" and in_memory and not ctx.distributed):
        if ctx.distributed:
            raise InputError("data.loader=memory cannot split the cells across ranks; use data.loader=block")
        counts = _counts_for_loader(store)
        train_loader = MemoryLoader(counts, codes, train_rows, dc.batch_size, shuffle=True, seed=tc.seed)
        val_loader = MemoryLoader(counts, codes, val_rows, dc.batch_size, shuffle=False) if len(val_rows) else None
        return train_loader, val_loader
    from scvi_scale.data.prefetch import StoreLoader

    common = {
        "block_size": dc.block_size,
        "buffer_blocks": dc.buffer_blocks,
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "num_threads": dc.loader_threads,
        "memory_budget_bytes": dc.loader_memory_bytes,
        "device": ctx.device if ctx.device.type == "cuda" else None,
    }
    train_loader = StoreLoader(store, codes, train_rows, dc.batch_size, seed=tc.seed, **common)
    val_loader = None
    if len(val_rows):
        val_loader = StoreLoader(store, codes, val_rows, dc.batch_size, shuffle=False, seed=tc.seed, **common)
    return train_loader, val_loader


def _train_process(
    ctx: DistContext,
    source: Any,
    out: Path | None,
    config: Config,
    ckpt: Path | None,
    overwrite: bool,
    launched: bool = False,
) -> Run:
    """Train in this process (one rank of ``ctx``); rank 0 writes the run directory."""
    saved = safe_load(ckpt, CHECKPOINT_FORMAT) if ckpt is not None else None
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    compile_kernels(config.train.compile)
    dc, tc = config.data, config.train
    store = open_counts(source, dc.layer, dc.drop_empty_cells)
    codes, categories = store.batch_codes(dc.batch_key)
    genes = dc.genes
    if saved is not None and genes == "auto" and [str(v) for v in store.var_names] == saved["meta"]["var_names"]:
        genes = "all"  # a run begun on all genes resumes on all genes, even if the store was prepared since
    store, prepared = select_genes(store, genes)
    if saved is not None and [str(v) for v in store.var_names] != list(saved["meta"]["var_names"]):
        raise InputError(f"cannot resume {ckpt} on {store.source}: its genes differ from the checkpoint's")
    n_batch = len(categories)
    lib_means = lib_vars = None
    if not config.model.use_observed_lib_size:
        gene_set = "hvg" if isinstance(store, GeneSubset) else "all"
        priors = prepared_library_priors(prepared, dc.batch_key, categories, gene_set)
        lib_means, lib_vars = priors if priors is not None else store.library_log_stats(codes, n_batch)
    split_seed = tc.seed if dc.shuffle_seed is None else dc.shuffle_seed
    train_rows, val_rows = train_val_split(store.n_obs, dc.train_size, split_seed, dc.batch_size)
    max_epochs = tc.max_epochs or max_epochs_heuristic(store.n_obs)
    torch.manual_seed(tc.seed)  # the initial weights depend on the seed only
    model = VAE(store.n_vars, n_batch, config.model, lib_means, lib_vars)
    run = Run(out, model, config, [str(v) for v in store.var_names], dc.batch_key, list(categories), dc.layer,
              max_epochs)  # fmt: skip
    if run.path is not None and ctx.is_main:
        if ckpt is None and not launched:
            _prepare_out(run.path, overwrite)
        (run.path / "config.yaml").write_text(config.to_yaml())
        np.savez(run.path / "split.npz", train=train_rows, validation=val_rows)
    train_loader, val_loader = _make_loaders(store, codes, train_rows, val_rows, config, ctx)
    if ctx.is_main:
        log.info(
            "training on %d cells x %d genes, %d batches, %d epochs, %d worker(s), %s loader",
            store.n_obs, store.n_vars, n_batch, max_epochs, ctx.world_size, type(train_loader).__name__,
        )  # fmt: skip
    hooks = None
    if launched and tc.launcher == "ray":
        from scvi_scale.dist.ray_hooks import report_epoch

        hooks = report_epoch(ctx, run.path)
    run.fit_result = fit(
        model,
        train_loader,
        val_loader,
        tc,
        max_epochs,
        run_dir=run.path,
        resume_from=ckpt,
        extra_state={"config": config.to_dict(), "meta": run.model_meta()},
        device=ctx.device,
        on_epoch_end=hooks,
        dist=ctx,
    )
    model.eval()
    if run.path is not None and ctx.is_main:
        save_model(run)
    return run


def save_model(run: Run) -> Path:
    """Write ``model.pt`` (weights, config and data meta; tensors and plain values only)."""
    assert run.path is not None
    return atomic_save(
        {
            "format": MODEL_FORMAT,
            "version": FORMAT_VERSION,
            "state_dict": run.model.state_dict(),
            "config": run.config.to_dict(),
            "meta": run.model_meta(),
            "n_genes": run.model.n_genes,
            "n_batch": run.model.n_batch,
        },
        run.path / "model.pt",
    )


def load_run(run_dir: str | Path) -> Run:
    """Load a run directory written by :func:`train` or :func:`import_scvi_tools` (model in eval mode)."""
    run_dir = Path(run_dir)
    if not (run_dir / "model.pt").is_file():
        raise InputError(f"{run_dir} has no model.pt; pass a run directory written by `scvi-scale train`")
    try:
        saved = safe_load(run_dir / "model.pt", MODEL_FORMAT)
    except ValueError as err:
        raise InputError(f"{err}; retrain, or re-import the model") from None
    config = config_from_dict(saved["config"])
    model = VAE(
        int(saved["n_genes"]),
        int(saved["n_batch"]),
        config.model,
        *(
            (np.zeros(saved["n_batch"]), np.ones(saved["n_batch"]))
            if not config.model.use_observed_lib_size
            else (None, None)
        ),
    )
    model.load_state_dict(saved["state_dict"])
    model.eval()
    meta = saved["meta"]
    return Run(
        run_dir,
        model,
        config,
        list(meta["var_names"]),
        meta["batch_key"],
        list(meta["batch_categories"]),
        meta.get("layer"),
        meta.get("max_epochs"),
    )


def _aligned_loader(run: Run, data: Any, batch_size: int) -> tuple[Any, MemoryLoader]:
    """Open ``data`` for a trained run: same genes in the same order, batches mapped to the run's codes.

    A store with more genes than the run (e.g. the full prepared store of a run on its HVGs) is read through a
    :class:`GeneSubset` of the run's genes, chosen by name, when it has all of them.
    """
    store = open_counts(data, run.layer)
    names = [str(v) for v in store.var_names]
    if names != run.var_names and len(names) > len(run.var_names):
        column = {name: j for j, name in enumerate(names)}
        if all(g in column for g in run.var_names):
            store = GeneSubset(store, [column[g] for g in run.var_names])
            names = list(run.var_names)
    if names != run.var_names:
        if len(names) != len(run.var_names):
            raise InputError(
                f"{store.source}: {len(names)} genes, but the model was trained on "
                f"{len(run.var_names)}; subset the data to the model's genes"
            )
        first = next(i for i, (a, b) in enumerate(zip(names, run.var_names, strict=True)) if a != b)
        raise InputError(
            f"{store.source}: gene {first} is {names[first]!r} but the model expects "
            f"{run.var_names[first]!r}; reorder the genes to the model's order"
        )
    codes, _ = store.batch_codes(run.batch_key, categories=run.batch_categories)
    return store, MemoryLoader(_counts_for_loader(store), codes, None, batch_size, shuffle=False)


def _counts_for_loader(store: Any) -> Any:
    """The in-memory CSR when the store holds one (fast slicing), else the store itself (read per minibatch)."""
    if isinstance(store, GeneSubset) and isinstance(store.store, MemoryStore):
        return store.store.X[:, store.gene_idx]
    return store.X if isinstance(store, MemoryStore) else store


def embed(run: Run | str | Path, data: Any, out: str | Path | None = None, batch_size: int = 1024):
    """Posterior mean of z for every cell (``obsm["X_scvi"]``); writes an ``.h5ad`` when ``out`` is given.

    Returns an AnnData with the input's obs, the model's genes as var, ``obsm["X_scvi"]`` (posterior mean) and
    ``obsm["X_scvi_var"]`` (posterior variance); ``X`` holds the counts only when the data were in memory
    (an ``.h5ad`` or AnnData), never when they come from an out-of-core store.
    """
    import anndata

    run = load_run(run) if not isinstance(run, Run) else run
    store, loader = _aligned_loader(run, data, batch_size)
    mean, var, _ = latent_representation(run.model, loader)
    # counts are copied along only from in-memory data; from a store the output holds obs, var and obsm
    counts = _counts_for_loader(store)
    counts = counts if sp.issparse(counts) else None
    adata = anndata.AnnData(X=counts, obs=store.obs.copy(), var=pd.DataFrame(index=pd.Index(run.var_names)))
    adata.obsm["X_scvi"] = mean.astype(np.float32)
    adata.obsm["X_scvi_var"] = var.astype(np.float32)
    adata.uns["scvi_scale"] = {"run": str(run.path), "batch_key": run.batch_key or "", "config": run.config.to_yaml()}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        adata.write_h5ad(tmp)
        tmp.replace(out)
    return adata


def evaluate(run: Run | str | Path, data: Any, batch_size: int = 1024) -> dict[str, float]:
    """Per-cell negative ELBO and its parts over all cells of ``data``, KL weight 1, eval mode.

    Same definitions as scvi-tools' ``elbo_validation`` family: ``elbo = reconstruction_loss + kl_local``
    (``kl_global`` is 0 for scVI); lower is better.
    """
    run = load_run(run) if not isinstance(run, Run) else run
    _, loader = _aligned_loader(run, data, batch_size)
    raw = evaluate_elbo(run.model, loader, kl_weight=1.0, prefix="m")
    return {
        "n_cells": int(raw["m/n_obs"]),
        "elbo": raw["m/elbo"],
        "reconstruction_loss": raw["m/reconstruction_loss"],
        "kl_local": raw["m/kl_local"],
        "kl_global": 0.0,
    }


def import_scvi_tools(src: str | Path, out: str | Path, overwrite: bool = False) -> Run:
    """Turn a directory saved by scvi-tools' ``SCVI.save`` into a run directory."""
    from scvi_scale.model.scvi_tools_io import complete_model_kwargs, read_scvi_tools

    st = read_scvi_tools(src)
    kwargs = complete_model_kwargs(st.model_kwargs)  # our ModelConfig fields carry scvi-tools' names
    mcfg = ModelConfig(**{f.name: kwargs[f.name] for f in dataclasses.fields(ModelConfig) if f.name in kwargs})
    n_genes, n_batch = len(st.var_names), max(len(st.batch_categories), 1)
    lib = (None, None)
    if not mcfg.use_observed_lib_size:
        lib = (st.state_dict["library_log_means"].numpy(), st.state_dict["library_log_vars"].numpy())
    model = VAE(n_genes, n_batch, mcfg, *lib)
    ours = model.state_dict()
    model.load_state_dict({k: st.state_dict[k] for k in ours})
    model.eval()
    config = dataclasses.replace(
        Config(), model=mcfg, data=dataclasses.replace(Config().data, batch_key=st.batch_key, layer=st.layer)
    )
    out = Path(out)
    _prepare_out(out, overwrite)
    (out / "config.yaml").write_text(config.to_yaml())
    run = Run(
        out,
        model,
        config,
        [str(v) for v in st.var_names],
        st.batch_key,
        [str(c) for c in st.batch_categories],
        st.layer,
    )
    save_model(run)
    return run


def export_scvi_tools(run: Run | str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a directory that ``scvi.model.SCVI.load(out, adata=...)`` accepts."""
    from scvi_scale.model.scvi_tools_io import ScviToolsModel, write_scvi_tools

    run = load_run(run) if not isinstance(run, Run) else run
    st = ScviToolsModel(
        state_dict=dict(run.model.state_dict()),
        model_kwargs=dataclasses.asdict(run.config.model),
        var_names=list(run.var_names),
        batch_key=run.batch_key,
        batch_categories=list(run.batch_categories),
        layer=run.layer,
    )
    return write_scvi_tools(out, st, overwrite=overwrite)


def embed_to_store(
    run: Run | str | Path,
    store: Any,
    outputs: Sequence[str] = ("latent",),
    launcher: str = "local",
    workers: int = 1,
    batch_size: int = 1024,
    *,
    region_rows: int | None = None,
    storage_options: dict[str, Any] | None = None,
    address: str | None = None,
    threads: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> writeback.EmbedSummary:
    """Write the embedding of every cell into the store itself: ``obsm/X_scvi``, row-aligned with the counts.

    The rows are written region by region (chunk-aligned, one writer each), every region committed by a mark
    once its data are in place, and a manifest (store metadata ``"embed"``: model hash, config, rows, outputs,
    completion) is written last. A rerun skips committed regions, so a killed job is resumed by running it again,
    and its result is byte-identical to an uninterrupted run; a rerun after completion does nothing; a run with
    another model replaces the earlier embedding. See :mod:`scvi_scale.infer.writeback`.

    Parameters
    ----------
    run
        A run directory or :class:`Run`.
    store
        A ``.zarr`` or ``.tiledb`` store: path, URL (``s3://...``) or an opened store (in-process writing only).
    outputs
        Any of ``"latent"`` (``obsm/X_scvi``, posterior mean), ``"latent_var"`` (``X_scvi_var``, posterior
        variance) and ``"library"`` (``X_scvi_library``: log total counts over the model's genes, or the posterior
        mean of the log library when the model's library is latent).
    launcher, workers
        ``"local"`` with 1 worker writes in this process; with N, on N spawned processes. ``"ray"``: Ray tasks,
        N in flight at once (on the Ray at ``address``, or one started here).
    batch_size
        Cells per forward pass; minibatches start at each region's first row, so the bytes written do not depend
        on the launcher or the number of workers.
    region_rows
        Rows per region: a multiple of ``OBSM_CHUNK_ROWS`` (16,384, the default), or fewer (chunks then shrink to
        the region; small stores and tests).
    threads
        Torch threads of this process (one worker), of each worker process (default: the cores shared among the
        workers) or of each Ray task (its CPUs; default 1).
    progress
        A progress bar (cells/s) over the regions left to write.

    Examples
    --------
    >>> embed_to_store("runs/a", "s3://bucket/atlas.zarr", ["latent", "latent_var"], "ray", 8)  # doctest: +SKIP
    EmbedSummary('s3://bucket/atlas.zarr': obsm X_scvi, X_scvi_var of 1200000 cells in 74 regions; wrote 74, ...)
    """
    import time

    from tqdm.auto import tqdm

    started = time.perf_counter()
    outputs = _embed_outputs(outputs)
    if launcher not in ("local", "ray"):
        raise InputError(f"unknown launcher {launcher!r} for embedding; choose local or ray")
    if workers < 1:
        raise InputError(f"workers must be >= 1; got {workers}")
    run = load_run(run) if not isinstance(run, Run) else run
    target, url = _region_store(store, storage_options, launcher, workers)
    view, loader = _aligned_loader(run, target, batch_size)
    device = device or "cpu"
    job = writeback.EmbedJob(
        store_url=url,
        outputs=outputs,
        widths=tuple(1 if o == "library" else run.model.config.n_latent for o in outputs),
        plan=writeback.plan_regions(target.n_obs, region_rows),
        batch_size=int(batch_size),
        model_hash=writeback.model_hash(run.model, run.var_names, run.batch_categories),
        batch_key=run.batch_key,
        batch_categories=tuple(run.batch_categories),
        gene_idx=tuple(int(g) for g in view.gene_idx) if isinstance(view, GeneSubset) else None,
        device=device,
        threads=threads or (1 if launcher == "ray" else max(1, (os.cpu_count() or 1) // workers)),  # per worker
        seed=run.config.train.seed,
        storage_options=storage_options,
    )
    record = {"run": str(run.path) if run.path is not None else None, "config": run.config.to_dict()}
    state = writeback.begin(target, job, record)
    if state.replaced:
        log.info("%s: replacing the embedding of model %s", target.source, state.replaced[:12])
    items = [(r, int(state.prior[r])) for r in state.pending]
    cells = sum(job.plan.bounds(r)[1] - job.plan.bounds(r)[0] for r in state.pending)
    if launcher == "ray" and items:
        from scvi_scale.dist.ray_tasks import ray_map

        gpus = 1.0 if torch.device(device).type == "cuda" else 0.0
        done = ray_map(writeback.region_task, items, shared=(job, run.model), max_in_flight=workers,
                       num_cpus=float(job.threads or 1), num_gpus=gpus, address=address)  # fmt: skip
    elif workers > 1 and len(items) > 1:
        done = writeback.run_processes(job, run.model, items, min(workers, len(items)))
    else:
        if threads:
            torch.set_num_threads(threads)
        run.model.to(device)
        codes = loader.batch_codes
        done = ((r, writeback.write_region(target, view, codes, run.model, job, r, prior)) for r, prior in items)
    written = 0
    with tqdm(
        total=cells, unit="cells", unit_scale=True, desc=f"embed {Path(url).name}", disable=not progress or not cells
    ) as bar:
        for _, n in done:
            written += 1
            bar.update(n)
    complete = writeback.finish(target, job, record) if not state.already_complete else True
    return writeback.EmbedSummary(
        store=target.source,
        keys=job.keys,
        n_obs=job.plan.n_obs,
        n_regions=job.plan.n_regions,
        written=written,
        skipped=job.plan.n_regions - len(items),
        cells=cells,
        complete=complete,
        seconds=time.perf_counter() - started,
        model_hash=job.model_hash,
        workers=workers,
        launcher=launcher,
        replaced=state.replaced,
    )


def _embed_outputs(outputs: Sequence[str] | str) -> tuple[str, ...]:
    from scvi_scale.infer.writeback import OUTPUT_KEYS

    names = [o.strip() for o in outputs.split(",")] if isinstance(outputs, str) else [str(o) for o in outputs]
    unknown = [o for o in names if o not in OUTPUT_KEYS]
    if unknown or not names:
        raise InputError(f"unknown outputs {unknown or names}; choose from {', '.join(OUTPUT_KEYS)}")
    return tuple(o for o in OUTPUT_KEYS if o in names)  # a fixed order, whatever order they were asked in


def _region_store(store: Any, storage_options: dict[str, Any] | None, launcher: str, workers: int) -> tuple[Any, str]:
    """The opened store that embeddings are written into, and the path or URL workers reopen it by."""
    if isinstance(store, (str, Path)):
        text = str(store)
        url = (
            text if "://" in text and not text.startswith("file://") else os.path.abspath(text.removeprefix("file://"))
        )
        from scvi_scale.store.open import open_store

        target = open_store(url, storage_options=storage_options)
    else:
        target, url = store, str(store.source)
        if launcher == "ray" or workers > 1:
            raise InputError("embedding on several workers reopens the store in each: pass its path or URL")
    if not hasattr(target, "write_mark"):
        raise InputError(
            f"{target.source}: embeddings are written back into .zarr or .tiledb stores only; for an .h5ad file "
            "write a new file instead (scvi-scale embed RUN DATA --out embedded.h5ad)"
        )
    return target, url
