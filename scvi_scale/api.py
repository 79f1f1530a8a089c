"""The Python API: prepare, train, resume, embed, evaluate, import/export scvi-tools. The CLI calls only this.

A run directory holds ``config.yaml`` (the resolved config), ``model.pt`` (weights, gene names, batch
categories; readable with ``torch.load(weights_only=True)``), ``metrics.csv``, ``split.npz`` (train and
validation rows) and ``checkpoints/last.pt``.
"""

from __future__ import annotations

import dataclasses
import functools
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

from scvi_scale.config import Config, config_from_dict, load_config, parse_override, with_overrides
from scvi_scale.data.memory import MemoryLoader, train_val_split
from scvi_scale.dist import DistContext
from scvi_scale.infer import writeback
from scvi_scale.infer.embed import latent_representation
from scvi_scale.model import VAE, ModelConfig
from scvi_scale.model.fused import compile_kernels
from scvi_scale.prep.prepare import PrepareResult, prepared_library_priors, select_genes
from scvi_scale.prep.prepare import prepare as prepare_store
from scvi_scale.results import (
    Evaluation,
    ProgressLoader,
    plot_embedding,
    plot_losses,
    prepare_summary,
    run_html,
    run_summary,
)
from scvi_scale.store.errors import InputError
from scvi_scale.store.memory import MemoryStore
from scvi_scale.store.subset import GeneSubset
from scvi_scale.train.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION, MODEL_FORMAT, atomic_save, safe_load
from scvi_scale.train.loop import FitResult, TrainingInterrupted, evaluate_elbo, fit
from scvi_scale.train.optim import max_epochs_heuristic

log = logging.getLogger(__name__)

__all__ = [  # what `import scvi_scale as ss` re-exports (scvi_scale/__init__.py)
    "Evaluation", "Run", "TrainingInterrupted", "append", "convert", "demo", "embed", "embed_to_store", "evaluate",
    "export_scvi_tools", "import_scvi_tools", "load_run", "open_counts", "open_store", "plot_embedding",
    "plot_losses", "prepare", "prepare_summary", "read_embedding", "resume", "train",
]  # fmt: skip


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

    def summary(self, last: int = 5) -> str:
        """Where the run is, what it was trained on and its last ``last`` epochs' metrics, as text."""
        return run_summary(self, last)

    def _repr_html_(self) -> str:  # what a notebook shows for a Run
        return run_html(self)

    def plot_losses(self, path: str | Path | None = None, title: str | None = None):
        """The training curves (ELBO, loss, reconstruction, KL, KL weight per epoch) as a matplotlib Figure.

        Examples
        --------
        >>> ss.load_run("runs/a").plot_losses()  # doctest: +SKIP
        <Figure size 1600x480 with 5 Axes>
        """
        return plot_losses(self, path=path, title=title)

    def embed(self, data: Any, **options: Any):
        """:func:`embed` with this run."""
        return embed(self, data, **options)

    def evaluate(self, data: Any, **options: Any) -> Evaluation:
        """:func:`evaluate` with this run."""
        return evaluate(self, data, **options)

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

    Examples
    --------
    >>> open_counts("atlas.zarr")  # doctest: +SKIP
    ZarrStore('atlas.zarr', n_obs=1200000, n_vars=36601, nnz=2400000000)
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


def open_store(
    path_or_url: str | os.PathLike[str],
    *,
    layer: str | None = None,
    storage_options: dict[str, Any] | None = None,
    drop_empty_cells: bool = False,
) -> Any:
    """Open a count store for reading: ``*.zarr`` or ``*.tiledb`` (local path or ``s3://`` URL), or an ``.h5ad``.

    Parameters
    ----------
    path_or_url
        The store. An ``s3://`` URL takes its endpoint, region and keys from ``AWS_ENDPOINT_URL``,
        ``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``, unless ``storage_options`` says.
    layer, drop_empty_cells
        For an ``.h5ad`` (read whole into memory): the layer of raw counts; drop cells with no counts.
    storage_options
        ``endpoint_url``, ``region``, ``key``, ``secret``, ``anon``, ``backend`` (see
        :func:`scvi_scale.store.open.open_store`).

    Examples
    --------
    >>> store = open_store("s3://bucket/atlas.zarr")  # doctest: +SKIP
    >>> store.n_obs, store.n_vars, list(store.obs.columns)  # doctest: +SKIP
    (1200000, 36601, ['batch', 'cell_type'])
    """
    from scvi_scale.store.open import open_store as _open

    return _open(path_or_url, layer=layer, storage_options=storage_options, drop_empty_cells=drop_empty_cells)


_SIZE_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from ``512M``, ``2G``, ``1.5GiB`` or a plain number."""
    if isinstance(size, int):
        return size
    t = str(size).strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(t[:-1]) * _SIZE_UNITS[t[-1]]) if t and t[-1] in _SIZE_UNITS else int(t)
    except ValueError:
        raise InputError(f"{size!r} is not a size like 512M or 2G") from None


def convert(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    batch_key: str | None = None,
    batch_per_file: bool = False,
    layer: str | None = None,
    genes: str | os.PathLike[str] = "union",
    memory: int | str = "1G",
    overwrite: bool = False,
    progress: bool = True,
    drop_empty_cells: bool = False,
    store_format: str | None = None,
    var_names: str = "gene_symbols",
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Stream inputs into a new count store (Zarr v3 or TileDB), local or in object storage; bounded memory.

    Parameters
    ----------
    inputs
        ``.h5ad`` files, AnnData ``.zarr`` stores, 10x ``.h5`` files or 10x ``matrix.mtx`` folders (mixed
        freely), stacked in the order given.
    out
        The store to create: ``atlas.zarr``, ``atlas.tiledb`` or a URL such as ``s3://bucket/atlas.zarr``.
    batch_key, batch_per_file
        An obs column every input has (the batch), or each input its own batch (column ``batch``).
    layer
        AnnData inputs: the layer holding raw counts.
    genes
        ``"union"``, ``"intersection"`` or a file with one gene name per line.
    memory
        Budget of the writer's buffers and row blocks: bytes or ``"512M"``, ``"2G"``.
    overwrite, progress, drop_empty_cells
        Replace an existing store; show progress bars; drop cells with no counts instead of stopping.
    store_format, var_names, storage_options
        ``"zarr"``/``"tiledb"`` (default from the name); 10x gene names (``"gene_symbols"`` or ``"gene_ids"``);
        object-store options (default: the ``AWS_*`` environment).

    Returns
    -------
    ZarrStore or TileDBStore
        The new store, opened; its repr gives cells, genes and stored counts.

    Examples
    --------
    >>> convert(["s1.h5ad", "s2.h5ad"], "s3://bucket/atlas.zarr", batch_per_file=True)  # doctest: +SKIP
    ZarrStore('s3://bucket/atlas.zarr', n_obs=20000, n_vars=33538, nnz=41000000)
    """
    from scvi_scale.store.convert import convert as _convert

    return _convert(
        inputs, out, batch_key=batch_key, batch_per_file=batch_per_file, layer=layer, genes=genes,
        memory_budget_bytes=parse_size(memory), overwrite=overwrite, progress=progress,
        drop_empty_cells=drop_empty_cells, store_format=store_format, var_names=var_names,
        storage_options=storage_options,
    )  # fmt: skip


def append(
    store: str | os.PathLike[str],
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    batch_key: str | None = None,
    batch_per_file: bool = False,
    layer: str | None = None,
    memory: int | str = "1G",
    progress: bool = True,
    drop_empty_cells: bool = False,
    var_names: str = "gene_symbols",
) -> Any:
    """Add the cells of more inputs at the end of a local Zarr store; existing rows keep their place.

    A store prepared before must be prepared again (training refuses a stale ``prepare``). Parameters as in
    :func:`convert`.

    Examples
    --------
    >>> append("atlas.zarr", ["s3.h5ad"], batch_per_file=True)  # doctest: +SKIP
    ZarrStore('atlas.zarr', n_obs=30000, n_vars=33538, nnz=61000000)
    """
    from scvi_scale.store.convert import append as _append

    return _append(
        store, inputs, batch_key=batch_key, batch_per_file=batch_per_file, layer=layer,
        memory_budget_bytes=parse_size(memory), progress=progress, drop_empty_cells=drop_empty_cells,
        var_names=var_names,
    )  # fmt: skip


def prepare(
    data: Any,
    n_top_genes: int = 2000,
    batch_key: str | None = None,
    *,
    progress: bool = False,
    require_store: bool = False,
    **options: Any,
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
    require_store
        Refuse counts held in memory (an ``.h5ad``, an AnnData), whose results would be recorded nowhere.
    options
        ``span``, ``block_rows``, ``num_workers``, ``record`` of :func:`scvi_scale.prep.prepare.prepare`.

    Examples
    --------
    >>> prepare("atlas.zarr", n_top_genes=2000, batch_key="batch")  # doctest: +SKIP
    PrepareResult('atlas.zarr', 2000 HVGs of 36601 genes, seurat_v3, batch_key='batch' (12 batches), ...)
    >>> print(prepare_summary(_))  # doctest: +SKIP
    atlas.zarr: 2000 highly variable genes of 36601 (seurat_v3, ranked in 12 batches of 'batch')
    ...
    """
    store = open_counts(data)
    if require_store and isinstance(store, MemoryStore):
        raise InputError(
            f"{store.source}: prepare records its results in a count store; convert the file first: "
            f"scvi-scale convert {store.source} --out STORE.zarr"
        )
    return prepare_store(store, n_top_genes, batch_key, progress=progress, **options)


_RUN_OUTPUTS = ("config.yaml", "model.pt", "metrics.csv", "split.npz", "checkpoints", "ray")


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Create the run directory; with ``overwrite``, remove what an earlier run wrote there (other files stay),
    so that e.g. its ``metrics.csv`` is not continued."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{out} already exists and is not empty; choose a new --out, or pass --overwrite")
        for name in _RUN_OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _hint_on_interrupt(func: Any) -> Any:
    """Re-raise a :class:`TrainingInterrupted` from ``func`` (:func:`train`) saying how to resume, with its data."""

    @functools.wraps(func)
    def wrapper(source: Any = None, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(source, *args, **kwargs)
        except TrainingInterrupted as err:
            if err.run_dir is None:
                raise
            raise err.with_hint(_resume_hint(source, err.checkpoint)) from None

    return wrapper


def _source_text(source: Any) -> str | None:
    """A path (absolute) or URL the data can be reopened from in another session; None for objects in memory."""
    if not isinstance(source, str | os.PathLike):
        return None
    text = os.fspath(source)
    return text if "://" in text and not text.startswith("file://") else os.path.abspath(text.removeprefix("file://"))


def _resume_hint(source: Any, ckpt: Path) -> str:
    run_dir = ckpt.parent.parent
    if source is None:
        source = safe_load(ckpt, CHECKPOINT_FORMAT).get("source")
    if isinstance(source, str | os.PathLike):
        src = os.fspath(source)
        return (
            f"ss.train({src!r}, {str(run_dir)!r}, resume={str(run_dir)!r}) in Python (or ss.resume({str(run_dir)!r})), "
            f"or on the command line: scvi-scale train {src} --out {run_dir} --resume {run_dir}"
        )
    return f"ss.train(<the same data>, {str(run_dir)!r}, resume={str(run_dir)!r}) in Python"


def _file_and_overrides(
    config: Config | str | Path | None, overrides: Sequence[str], sections: dict[str, Any]
) -> tuple[Config | None, dict[str, Any]]:
    """A config given as a YAML path is loaded; dotted overrides join the keyword sections (they win)."""
    if isinstance(config, str | os.PathLike):
        config = load_config(config)
    sections = {k: dict(v or {}) for k, v in sections.items()}
    for item in overrides:
        key, value = parse_override(item)
        section, _, name = key.partition(".")
        if not name:
            raise InputError(f"override {item!r} must look like section.key=value, e.g. train.max_epochs=20")
        sections.setdefault(section, {})[name] = value
    return config, sections


@_hint_on_interrupt
def train(
    source: Any = None,
    out: str | Path | None = None,
    config: Config | str | Path | None = None,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    overrides: Sequence[str] = (),
    init_from: str | Path | None = None,
    init_weights: bool = True,
    exclude_rows: np.ndarray | None = None,
    **sections: dict[str, Any],
) -> Run:
    """Train scVI on counts and write a run directory.

    Parameters
    ----------
    source
        An ``.h5ad`` path (raw counts in ``X`` or ``config.data.layer``), a ``.zarr``/``.tiledb`` store path or
        URL, an AnnData or a store object. With ``resume`` it may be left out: the run's own data are used.
    out
        Run directory to create (None: train in memory only; multi-worker runs need one).
    config
        The config tree (a :class:`Config`, or the path of a YAML file as ``scvi-scale train --config`` takes);
        keyword sections override it, e.g. ``train={"max_epochs": 20}``, and ``overrides`` those.
    resume
        A checkpoint file or a run directory to continue from; the saved config is used (a new
        ``train={"max_epochs": ...}``, ``workers`` or ``launcher`` is allowed).
    device
        ``"cpu"`` or ``"cuda"``; default CPU.
    overrides
        Dotted ``section.key=value`` entries, as ``scvi-scale train --set``: ``["model.n_latent=20"]``.
    init_from
        A run directory to start from (a warm start): the model trains on that run's genes (by name), and, with
        ``init_weights``, starts from its weights, with columns added for batches it did not know
        (:mod:`scvi_scale.model.surgery`). A resumed run takes its weights from the checkpoint instead.
    exclude_rows
        Rows never used for training or validation (a held-out set); the split is drawn from the others.

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
    >>> run = train("atlas.zarr", "runs/c", "cfg.yaml", overrides=["model.n_latent=20"])  # doctest: +SKIP

    Interrupting it (Ctrl-C, or a notebook's stop button) stops at the next minibatch, writes a checkpoint and
    raises :class:`~scvi_scale.train.loop.TrainingInterrupted`, whose message says how to go on:

    >>> run = train("atlas.zarr", "runs/c", resume="runs/c")  # doctest: +SKIP
    """
    config, sections = _file_and_overrides(config, overrides, sections)
    config, ckpt, out = _resolve_run_config(config, resume, out, sections)
    if source is None:
        source = _saved_source(ckpt)
    tc = config.train
    start = None  # how to start: picklable, for launched workers
    if init_from is not None or exclude_rows is not None:
        start = {
            "init_from": os.path.abspath(init_from) if init_from is not None else None,
            "init_weights": bool(init_weights),
            "exclude_rows": None if exclude_rows is None else np.unique(np.asarray(exclude_rows, dtype=np.int64)),
        }
    elif ckpt is not None:  # a resume continues how the run began (warm start, rows held out)
        start = _saved_start(ckpt)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun rank (or a worker our launchers started)
        return _train_ranked(source, out, config, ckpt, overwrite, device, start)
    if tc.launcher == "torchrun":
        raise InputError(
            "train.launcher=torchrun: start the ranks with `torchrun --nproc_per_node N -m scvi_scale train ...`"
        )
    if tc.workers > 1 or tc.launcher == "ray":
        return _launch_workers(source, out, config, ckpt, overwrite, device, start)
    return _train_process(DistContext.single(device or "cpu"), source, out, config, ckpt, overwrite, start=start)


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


def _saved_source(ckpt: Path | None) -> str:
    """The data a checkpointed run was trained on, as it recorded them (a path or URL)."""
    saved = safe_load(ckpt, CHECKPOINT_FORMAT).get("source") if ckpt is not None else None
    if saved is None:
        raise InputError(
            "no data given: pass the counts to train on"
            + (f" (the checkpoint {ckpt} does not record where its data are)" if ckpt is not None else "")
        )
    return str(saved)


def resume(
    run_dir: str | Path,
    data: Any = None,
    *,
    max_epochs: int | None = None,
    workers: int | None = None,
    launcher: str | None = None,
    device: str | None = None,
    progress: bool | None = None,
) -> Run:
    """Continue a run from its last checkpoint (after an interruption, or to train longer).

    Same as ``train(data, run_dir, resume=run_dir, train={...})``: the run's saved config is used; ``data``
    defaults to the path or URL the run was trained on. It resumes mid-epoch exactly where it stopped: no cell
    repeated or skipped, the same weights as an uninterrupted run.

    Examples
    --------
    >>> run = resume("runs/a")  # doctest: +SKIP
    >>> run = resume("runs/a", max_epochs=100)  # train on to 100 epochs  # doctest: +SKIP
    """
    over = {"max_epochs": max_epochs, "workers": workers, "launcher": launcher, "progress": progress}
    return train(data, run_dir, resume=run_dir, device=device, train={k: v for k, v in over.items() if v is not None})


_RESUME_OVERRIDES = (
    "max_epochs", "workers", "launcher", "gpus_per_worker", "cpus_per_worker", "address", "storage_path", "progress",
)  # fmt: skip


def _launch_workers(
    source: Any, out: Path | None, config: Config, ckpt: Path | None, overwrite: bool, device: str | None,
    start: dict[str, Any] | None = None,
) -> Run:  # fmt: skip
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
        "start": start,
    }
    launch(
        tc.launcher,
        tc.workers,
        _train_worker,
        payload,
        gpus_per_worker=tc.gpus_per_worker,
        cpus_per_worker=tc.cpus_per_worker,
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
        config = config_from_dict(payload["config"])
        _train_process(ctx, payload["source"], out, config, ckpt, True, launched=True, start=payload.get("start"))
    finally:
        ctx.shutdown()


def _train_ranked(
    source: Any, out: Path | None, config: Config, ckpt: Path | None, overwrite: bool, device: str | None,
    start: dict[str, Any] | None = None,
) -> Run:  # fmt: skip
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
        return _train_process(ctx, source, out, config, ckpt, overwrite, launched=True, start=start)
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
    from scvi_scale.data.prefetch import StoreLoader, default_threads

    common = {
        "block_size": dc.block_size,
        "buffer_blocks": dc.buffer_blocks,
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "num_threads": dc.loader_threads or default_threads(store),
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
    start: dict[str, Any] | None = None,
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
    init = load_run(start["init_from"]) if start and start.get("init_from") else None
    if init is not None:  # a warm start, or a retrain on the same genes: the earlier run's genes, by name
        store, prepared = _genes_by_name(store, init.var_names), None
    else:
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
    train_rows, val_rows = _split_rows(store.n_obs, dc, split_seed, start["exclude_rows"] if start else None)
    max_epochs = tc.max_epochs or max_epochs_heuristic(store.n_obs)
    torch.manual_seed(tc.seed)  # the initial weights depend on the seed only
    model = VAE(store.n_vars, n_batch, config.model, lib_means, lib_vars)
    if init is not None and start["init_weights"] and saved is None:
        _warm_start(model, init, categories)
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
        extra_state={
            "config": config.to_dict(),
            "meta": run.model_meta(),
            "source": _source_text(source),
            "start": _start_state(start),
        },  # fmt: skip
        device=ctx.device,
        on_epoch_end=hooks,
        dist=ctx,
    )
    model.eval()
    if run.path is not None and ctx.is_main:
        save_model(run)
    return run


def _start_state(start: dict[str, Any] | None) -> dict[str, Any] | None:
    """``start`` as a checkpoint keeps it (tensors and plain values: ``torch.load(weights_only=True)`` reads it)."""
    if start is None:
        return None
    rows = start.get("exclude_rows")
    return {**start, "exclude_rows": None if rows is None else torch.from_numpy(np.asarray(rows, dtype=np.int64))}


def _saved_start(ckpt: Path) -> dict[str, Any] | None:
    saved = safe_load(ckpt, CHECKPOINT_FORMAT).get("start")
    if saved is None:
        return None
    rows = saved.get("exclude_rows")
    return {**saved, "exclude_rows": None if rows is None else rows.numpy()}


def _genes_by_name(store: Any, names: Sequence[str]) -> Any:
    """``store`` read through the genes ``names`` (in that order); the store itself when they are all its genes."""
    column = {str(g): j for j, g in enumerate(store.var_names)}
    missing = [g for g in names if g not in column]
    if missing:
        raise InputError(f"{store.source}: lacks {len(missing)} genes of the run to start from, e.g. {missing[0]!r}")
    idx = [column[g] for g in names]
    return store if idx == list(range(store.n_vars)) else GeneSubset(store, idx)


def _split_rows(n_obs: int, dc: Any, seed: int, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation rows, drawn from the rows not in ``exclude`` (a held-out set) as from all rows."""
    if exclude is None:
        return train_val_split(n_obs, dc.train_size, seed, dc.batch_size)
    kept = np.setdiff1d(np.arange(n_obs, dtype=np.int64), exclude)
    train_idx, val_idx = train_val_split(kept.size, dc.train_size, seed, dc.batch_size)
    return kept[train_idx], kept[val_idx]


def _warm_start(model: VAE, init: Run, categories: Sequence[str]) -> None:
    """Load ``init``'s weights into ``model``, with the batch covariates extended to ``categories``."""
    from scvi_scale.model.surgery import transfer_weights

    try:
        transfer_weights(init.model, init.batch_categories, model, [str(c) for c in categories])
    except ValueError as err:
        raise InputError(f"cannot start from {init.path}: {err}") from None
    log.info("starting from %s (%d of %d batches new)", init.path, len(set(categories) - set(init.batch_categories)),
             len(categories))  # fmt: skip


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
    """Load a run directory written by :func:`train` or :func:`import_scvi_tools` (model in eval mode).

    Examples
    --------
    >>> run = load_run("runs/a")  # doctest: +SKIP
    >>> print(run.summary())  # doctest: +SKIP
    path     runs/a
    ...
    """
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


def embed(
    run: Run | str | Path,
    data: Any,
    out: str | Path | None = None,
    batch_size: int = 1024,
    *,
    counts: bool = True,
    progress: bool = False,
):
    """Posterior mean of z for every cell (``obsm["X_scvi"]``); writes an ``.h5ad`` when ``out`` is given.

    Parameters
    ----------
    run
        A :class:`Run` or a run directory.
    data
        The cells to embed: a store (path, URL or opened), an ``.h5ad`` or an AnnData, with the run's genes (a
        store with more genes, e.g. all genes of a run trained on HVGs, is read on the run's genes by name).
    out
        Also write the result as an ``.h5ad`` here.
    counts
        Carry the counts along as ``X`` when the data are in memory; ``False`` never does (a light view).
    progress
        A progress bar (cells) in the terminal or the notebook.

    Returns
    -------
    anndata.AnnData
        The input's obs, the model's genes as var, ``obsm["X_scvi"]`` (posterior mean) and ``obsm["X_scvi_var"]``
        (posterior variance). ``X`` holds the counts only when the data were in memory (an ``.h5ad`` or AnnData)
        and ``counts`` is true; from an out-of-core store it is ``None``: an AnnData view of obs and obsm that
        scanpy can plot and neighbour, with no counts loaded.

    Examples
    --------
    >>> adata = embed("runs/a", "s3://bucket/atlas.zarr")  # doctest: +SKIP
    >>> adata  # doctest: +SKIP
    AnnData object with n_obs x n_vars = 1200000 x 2000
        obs: 'batch', 'cell_type'
        uns: 'scvi_scale'
        obsm: 'X_scvi', 'X_scvi_var'
    >>> sc.pp.neighbors(adata, use_rep="X_scvi")  # doctest: +SKIP
    """
    import anndata

    run = load_run(run) if not isinstance(run, Run) else run
    store, loader = _aligned_loader(run, data, batch_size)
    bar = ProgressLoader(loader, progress, "embed", int(store.n_obs))
    mean, var, _ = latent_representation(run.model, bar)
    # counts are copied along only from in-memory data; from a store the output holds obs, var and obsm
    held = _counts_for_loader(store) if counts else None
    counts = held if sp.issparse(held) else None
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


def evaluate(run: Run | str | Path, data: Any, batch_size: int = 1024) -> Evaluation:
    """Per-cell negative ELBO and its parts over all cells of ``data``, KL weight 1, eval mode.

    Same definitions as scvi-tools' ``elbo_validation`` family: ``elbo = reconstruction_loss + kl_local``
    (``kl_global`` is 0 for scVI); lower is better.

    Returns
    -------
    Evaluation
        A ``dict`` (``n_cells``, ``elbo``, ``reconstruction_loss``, ``kl_local``, ``kl_global``) that prints
        as one line; ``json.dumps`` takes it as it is.

    Examples
    --------
    >>> evaluate("runs/a", "atlas.zarr")  # doctest: +SKIP
    Evaluation(n_cells=600, elbo=312.4050: reconstruction_loss=301.2210 + kl_local=11.1840)
    """
    run = load_run(run) if not isinstance(run, Run) else run
    _, loader = _aligned_loader(run, data, batch_size)
    raw = evaluate_elbo(run.model, loader, kl_weight=1.0, prefix="m")
    return Evaluation(
        n_cells=int(raw["m/n_obs"]),
        elbo=raw["m/elbo"],
        reconstruction_loss=raw["m/reconstruction_loss"],
        kl_local=raw["m/kl_local"],
        kl_global=0.0,
    )


def read_embedding(store: Any, storage_options: dict[str, Any] | None = None):
    """The embedding :func:`embed_to_store` wrote into a store, as an AnnData of obs and obsm (no counts loaded).

    Parameters
    ----------
    store
        A ``.zarr``/``.tiledb`` store: path, URL or opened.
    storage_options
        Object-store options for a URL (default: the ``AWS_*`` environment).

    Returns
    -------
    anndata.AnnData
        ``X=None``, the store's obs and genes, and every output of its complete embedding
        (``obsm["X_scvi"]``, and ``X_scvi_var``, ``X_scvi_library`` when they were written).

    Examples
    --------
    >>> embed_to_store("runs/a", "s3://bucket/atlas.zarr")  # doctest: +SKIP
    >>> read_embedding("s3://bucket/atlas.zarr").obsm["X_scvi"].shape  # doctest: +SKIP
    (1200000, 10)
    """
    import anndata

    from scvi_scale.infer.writeback import MANIFEST

    opened = open_store(store, storage_options=storage_options) if isinstance(store, str | os.PathLike) else store
    manifest = dict(getattr(opened, "metadata", {}) or {}).get(MANIFEST) or {}
    if not manifest.get("complete"):
        raise InputError(
            f"{opened.source}: no complete embedding in the store; write one with "
            f"embed_to_store(run, {str(opened.source)!r}) (or `scvi-scale embed RUN STORE`)"
        )
    adata = anndata.AnnData(obs=opened.obs.copy(), var=pd.DataFrame(index=pd.Index([str(v) for v in opened.var_names])))
    for key in manifest["keys"].values():
        adata.obsm[key] = opened.read_obsm(key)
    uns = {"run": str(manifest.get("run")), "model_hash": str(manifest.get("model_hash", ""))}
    batch_key = (manifest.get("config") or {}).get("data", {}).get("batch_key")
    adata.uns["scvi_scale"] = {**uns, "batch_key": batch_key or ""}
    return adata


def demo(
    out: str | Path = "scvi_scale_demo",
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    epochs: int = 30,
    seed: int = 0,
    *,
    progress: bool = True,
    view: str = "auto",
) -> dict[str, Any]:
    """The main job end to end on the built-in synthetic atlas: generate, train, embed, report (``scvi-scale demo``).

    Returns the report (also ``out/report/metrics.json``); see :mod:`scvi_scale.demo`.

    Examples
    --------
    >>> demo("demo_out", n_cells=2000, epochs=10)["summary"]["held_out_elbo"]  # doctest: +SKIP
    412.7
    """
    from scvi_scale.demo import run_demo

    return run_demo(Path(out), n_cells=n_cells, n_genes=n_genes, epochs=epochs, seed=seed, progress=progress, view=view)


def import_scvi_tools(src: str | Path, out: str | Path, overwrite: bool = False) -> Run:
    """Turn a directory saved by scvi-tools' ``SCVI.save`` into a run directory.

    Examples
    --------
    >>> run = import_scvi_tools("path/to/scvi_model", "runs/imported")  # doctest: +SKIP
    >>> adata = embed(run, "atlas.zarr")  # doctest: +SKIP
    """
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
    """Write a directory that ``scvi.model.SCVI.load(out, adata=...)`` accepts.

    Examples
    --------
    >>> export_scvi_tools("runs/a", "exported")  # doctest: +SKIP
    >>> scvi.model.SCVI.load("exported", adata=adata)  # doctest: +SKIP
    """
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


def _job_fields(run: Run, view: Any, batch_size: int, device: str, threads: int | None, launcher: str, workers: int,
                storage_options: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """What every region job (embedding, normalized expression) takes from the run and the launch."""
    return {
        "batch_size": int(batch_size),
        "model_hash": writeback.model_hash(run.model, run.var_names, run.batch_categories),
        "batch_key": run.batch_key,
        "batch_categories": tuple(run.batch_categories),
        "gene_idx": tuple(int(g) for g in view.gene_idx) if isinstance(view, GeneSubset) else None,
        "device": device,
        "threads": threads or (1 if launcher == "ray" else max(1, (os.cpu_count() or 1) // workers)),  # per worker
        "seed": run.config.train.seed,
        "storage_options": storage_options,
    }


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
        **_job_fields(run, view, batch_size, device, threads, launcher, workers, storage_options),
    )
    record = {"run": str(run.path) if run.path is not None else None, "config": run.config.to_dict()}
    return _write_regions(run, target, view, loader, job, record, launcher=launcher, workers=workers, address=address,
                          threads=threads, device=device, progress=progress, started=started, desc="embed")  # fmt: skip


def _write_regions(run: Run, target: Any, view: Any, loader: MemoryLoader, job: writeback.EmbedJob,
                   record: dict[str, Any], *, launcher: str, workers: int, address: str | None, threads: int | None,
                   device: str, progress: bool, started: float, desc: str) -> writeback.EmbedSummary:  # fmt: skip
    """Begin ``job`` on ``target``, write its pending regions (here, on spawned processes or Ray tasks), finish.

    Shared by :func:`embed_to_store` and the per-cell outputs of :mod:`scvi_scale.analysis` (``job`` decides what
    a region holds, where its marks and manifest live).
    """
    import time

    from tqdm.auto import tqdm

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
    name = f"{desc} {Path(job.store_url).name}"
    with tqdm(total=cells, unit="cells", unit_scale=True, desc=name, disable=not progress or not cells) as bar:
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
        if text.rstrip("/").lower().endswith(".h5ad"):  # refused before an .h5ad is read whole
            raise InputError(
                f"{text}: embeddings are written back into .zarr/.tiledb stores; for an .h5ad write a new file: "
                "embed(run, data, out=NEW.h5ad), or scvi-scale embed RUN DATA --out NEW.h5ad"
            )
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
