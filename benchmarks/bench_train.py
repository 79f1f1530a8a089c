"""Training throughput (cells/s): scvi-scale's real data path against scvi-tools and against a model-step ceiling.

Prints one JSON line per configuration on stdout (everything else, including scvi-tools' and Lightning's
chatter, goes to stderr), then one summary line per ratio with its target. Three implementations train the
same architecture (scvi-tools' ``SCVI`` defaults: ZINB, gene dispersion, 128 hidden units, 10 latent
dimensions, one layer, 4 batches as the batch covariate) on the same synthetic atlas, 90/10 split, no
validation:

``scvi-scale``
    :func:`scvi_scale.api.train` on the AnnData, i.e. ``MemoryStore`` -> ``MemoryLoader`` (CSR rows ->
    dense minibatch + the non-zero index tuple) -> :func:`scvi_scale.train.loop.fit`. Our loop validates
    every epoch by default; here ``check_val_every_n_epoch`` is set beyond the run, as scvi-tools' default
    (no validation unless early stopping or checkpointing asks for it). One untimed warm-up ``train`` on a
    small subset runs first (the first optimizer step in a process imports ``torch._dynamo``, ~1 s).
``scvi-tools``
    ``SCVI.setup_anndata(batch_key="batch")``; ``SCVI(adata).train(max_epochs, batch_size, train_size=0.9,
    accelerator="cpu", enable_progress_bar=False)``. One untimed warm-up ``train`` on a small subset runs
    first, so one-time costs of the first call in a process (lazy imports, Lightning set-up) are not counted.
``ceiling``
    The model step alone (forward, backward, Adam step) over the same minibatches pre-built in memory as
    torch tensors, including ``Batch.nonzero``: what our path would reach with a free data path and loop.

``cells_per_s`` is the steady state: training cells over the summed wall time of the measured epochs, with
the first epoch left out as warm-up when ``--epochs`` >= 2 (our ``fit`` reports each epoch's time in
``perf/epoch_s``; scvi-tools' epochs are timed by a Lightning callback from one epoch start to the next,
and the last to the end of training). ``seconds`` is the wall time of the whole ``train`` call, set-up
included; ``setup_s`` is the part of it outside the epochs.

Run ``python benchmarks/bench_train.py --help``; ``--quick`` is the tiny size CI smoke-runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from _common import cpu_model, emit, ratio_line

from scvi_scale import api
from scvi_scale.data import MemoryLoader, train_val_split
from scvi_scale.datasets.synthetic import SyntheticSpec, make_anndata
from scvi_scale.model import VAE, ModelConfig
from scvi_scale.store.memory import MemoryStore
from scvi_scale.train.optim import kl_weight, make_optimizer

TRAIN_SIZE = 0.9
N_BATCHES = 4
SEED = 0
NEVER = 10**9  # check_val_every_n_epoch beyond any run: no validation, as in scvi-tools' default
TARGETS_VS_SCVI_TOOLS = {128: 3.0, 1024: 1.5}
TARGET_VS_CEILING = 0.85


def steady_state(epoch_s: list[float], cells_per_epoch: list[int]) -> tuple[float, list[int]]:
    """Cells/s over the epochs after the first (all epochs when there is only one) and which epochs count."""
    measured = list(range(1, len(epoch_s))) if len(epoch_s) >= 2 else list(range(len(epoch_s)))
    secs = sum(epoch_s[i] for i in measured)
    cells = sum(cells_per_epoch[i] for i in measured)
    return cells / max(secs, 1e-9), measured


def base_record(impl: str, batch_size: int, adata: Any, threads: int) -> dict[str, Any]:
    return {
        "bench": "train",
        "impl": impl,
        "batch_size": batch_size,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "threads": threads,
    }


# -- scvi-scale through its real data path --------------------------------------------------------------------------
def bench_scvi_scale(adata: Any, batch_size: int, epochs: int, threads: int) -> dict[str, Any]:
    """Train with :func:`scvi_scale.api.train` (no run directory, no progress bar, no validation)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run = api.train(
        adata,
        None,
        data={"batch_key": "batch", "batch_size": batch_size, "train_size": TRAIN_SIZE},
        train={
            "max_epochs": epochs,
            "progress": False,
            "check_val_every_n_epoch": NEVER,
            "num_threads": threads,
            "seed": SEED,
            "compile": COMPILE[0],
        },
    )
    wall = time.perf_counter() - t0
    assert run.fit_result is not None
    rows = run.fit_result.history
    assert all("validation/elbo" not in r for r in rows), "validation ran; the comparison would be unfair"
    epoch_s = [float(r["perf/epoch_s"]) for r in rows]
    cells = [round(float(r["perf/cells_per_s"]) * float(r["perf/epoch_s"])) for r in rows]
    cps, measured = steady_state(epoch_s, cells)
    data_s = sum(float(rows[i]["perf/data_s"]) for i in measured)
    step_s = sum(float(rows[i]["perf/step_s"]) for i in measured)
    return {
        **base_record("scvi-scale", batch_size, adata, threads),
        "cells_per_s": cps,
        "seconds": wall,
        "setup_s": wall - sum(epoch_s),
        "epochs": len(rows),
        "measured_epochs": measured,
        "n_train": cells[0],
        "epoch_s": epoch_s,
        "first_epoch_cells_per_s": cells[0] / max(epoch_s[0], 1e-9),
        "data_frac": data_s / max(data_s + step_s, 1e-9),  # loader share of the measured epochs
        "train_elbo": float(rows[-1]["train/elbo"]),
        "threads_after": torch.get_num_threads(),
    }


def warm_up_scvi_scale(adata: Any, threads: int) -> float:
    """One untimed ``train`` on a small subset (the first optimizer step imports ``torch._dynamo``, ~1 s)."""
    t0 = time.perf_counter()
    bench_scvi_scale(adata[: min(adata.n_obs, 1024)].copy(), 128, 1, threads)
    return time.perf_counter() - t0


# -- the ceiling: the model step on minibatches already in memory ---------------------------------------------------
def prebuilt_batches(adata: Any, batch_size: int) -> tuple[list[Any], int]:
    """One epoch of training minibatches, built by our loader once (dense ``x_ng``, codes, ``nonzero``)."""
    store = MemoryStore.from_anndata(adata)
    codes, categories = store.batch_codes("batch")
    train_rows, _ = train_val_split(store.n_obs, TRAIN_SIZE, SEED, batch_size)
    loader = MemoryLoader(store.X, codes, train_rows, batch_size, shuffle=True, seed=SEED)
    return list(loader), len(categories)


def bench_ceiling(adata: Any, batch_size: int, epochs: int, threads: int, profile: bool = False) -> dict[str, Any]:
    """Time forward + backward + Adam step per minibatch, nothing else (no loader, no metric sums)."""
    torch.set_num_threads(threads)
    batches, n_batch = prebuilt_batches(adata, batch_size)
    torch.manual_seed(SEED)
    model = VAE(adata.n_vars, n_batch, ModelConfig())
    optimizer = make_optimizer(model)
    model.train()
    n_train = sum(b.n_obs for b in batches)
    epoch_s = []
    for epoch in range(epochs):
        w = kl_weight(epoch, 0)
        t0 = time.perf_counter()
        for b in batches:
            terms = model(b.x_ng, b.batch_n, w, b.nonzero)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            optimizer.step()
        epoch_s.append(time.perf_counter() - t0)
    cps, measured = steady_state(epoch_s, [n_train] * epochs)
    if profile:
        profile_steps(model, optimizer, batches, batch_size)
    return {
        **base_record("ceiling", batch_size, adata, threads),
        "cells_per_s": cps,
        "seconds": sum(epoch_s),
        "epochs": epochs,
        "measured_epochs": measured,
        "n_train": n_train,
        "epoch_s": epoch_s,
        "step_ms": 1e3 * sum(epoch_s[i] for i in measured) / (len(batches) * len(measured)),
        "threads_after": torch.get_num_threads(),
    }


def profile_steps(model: VAE, optimizer: torch.optim.Optimizer, batches: list[Any], batch_size: int) -> None:
    """Print a torch.profiler table of a few model steps to stderr (``--profile``)."""
    from torch.profiler import ProfilerActivity, profile

    steps = batches[: min(len(batches), max(4, 4096 // batch_size))]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in steps:
            terms = model(b.x_ng, b.batch_n, 1.0, b.nonzero)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            optimizer.step()
    print(f"\n== torch.profiler: {len(steps)} model steps at batch size {batch_size} ==", file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)


# -- scvi-tools -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Keep third-party prints (Lightning, rich) out of the JSON stream."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def import_scvi() -> tuple[Any, str | None]:
    """Import scvi-tools quietly; return ``(module, None)`` or ``(None, reason)``."""
    try:
        with stdout_to_stderr():
            import scvi
    except Exception as err:  # any import failure means "skip", never a crash
        return None, f"{type(err).__name__}: {err}"
    return scvi, None


def _epoch_timer() -> Any:
    from lightning.pytorch import Callback

    class EpochTimer(Callback):
        """Wall time of each epoch: from one epoch start to the next (the last one to the end of fit)."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.end = 0.0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.starts.append(time.perf_counter())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.end = time.perf_counter()

        def epoch_s(self) -> list[float]:
            bounds = [*self.starts, self.end]
            return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    return EpochTimer()


def _scvi_train(
    scvi: Any, adata: Any, batch_size: int, epochs: int, threads: int, callbacks: list[Any]
) -> tuple[Any, float]:
    """Build ``SCVI(adata)`` (untimed) and return it with the wall time of its ``train`` call."""
    with stdout_to_stderr():
        scvi.settings.seed = SEED
        model = scvi.model.SCVI(adata)  # defaults: n_hidden 128, n_latent 10, 1 layer, ZINB, gene dispersion
        torch.set_num_threads(threads)  # set last: nothing before train may change it
        t0 = time.perf_counter()
        model.train(
            max_epochs=epochs,
            batch_size=batch_size,
            train_size=TRAIN_SIZE,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            callbacks=callbacks,
        )
        return model, time.perf_counter() - t0


def scvi_tools_adata(scvi: Any, adata: Any) -> Any:
    """A copy of ``adata`` registered with ``SCVI.setup_anndata(batch_key="batch")`` (untimed)."""
    st = adata.copy()
    with stdout_to_stderr():
        scvi.model.SCVI.setup_anndata(st, batch_key="batch")
    return st


def warm_up_scvi_tools(scvi: Any, adata: Any, threads: int) -> float:
    """One untimed ``train`` on a small subset, so the timed calls do not pay first-call costs."""
    small = scvi_tools_adata(scvi, adata[: min(adata.n_obs, 1024)].copy())
    return _scvi_train(scvi, small, 128, 1, threads, [])[1]


def bench_scvi_tools(scvi: Any, st_adata: Any, batch_size: int, epochs: int, threads: int) -> dict[str, Any]:
    """Time ``SCVI.train`` (model construction excluded) and each of its epochs."""
    timer = _epoch_timer()
    model, wall = _scvi_train(scvi, st_adata, batch_size, epochs, threads, [timer])
    epoch_s = timer.epoch_s()
    n_train = len(model.train_indices)
    cps, measured = steady_state(epoch_s, [n_train] * len(epoch_s))
    history = model.history.get("elbo_train")
    return {
        **base_record("scvi-tools", batch_size, st_adata, threads),
        "cells_per_s": cps,
        "seconds": wall,
        "setup_s": wall - sum(epoch_s),
        "epochs": len(epoch_s),
        "measured_epochs": measured,
        "n_train": n_train,
        "epoch_s": epoch_s,
        "first_epoch_cells_per_s": n_train / max(epoch_s[0], 1e-9),
        "validation_ran": any(k.startswith("elbo_validation") for k in model.history),
        "train_elbo": float(history.iloc[-1, 0]) if history is not None else None,
        "threads_after": torch.get_num_threads(),
    }


# -- driver ---------------------------------------------------------------------------------------------------------
def best_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated measurements (noise on a shared machine only ever slows a run down)."""
    best = max(records, key=lambda r: r["cells_per_s"])
    return {**best, "repeats": len(records), "cells_per_s_runs": [r["cells_per_s"] for r in records]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, default=20_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--batch-sizes", type=str, default="128,1024", help="comma-separated")
    p.add_argument("--epochs", type=int, default=2, help="epochs per measurement; the first is warm-up if >= 2")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every implementation")
    p.add_argument("--repeats", type=int, default=1, help="measure each impl N times (interleaved), keep the best")
    p.add_argument("--impls", type=str, default="scvi-scale,ceiling,scvi-tools", help="comma-separated subset")
    p.add_argument("--compile", action="store_true", help="scvi-scale with train.compile=true (fused ZINB kernel)")
    p.add_argument("--quick", action="store_true", help="tiny smoke size: 2,000 cells x 200 genes, 1 epoch")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of the ceiling's step")
    args = p.parse_args(argv)
    if args.quick:
        args.n_cells, args.n_genes, args.epochs = 2_000, 200, 1
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    return args


COMPILE = [False]  # set from --compile; the ceiling inherits the kernels api.train switched on


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    COMPILE[0] = args.compile
    torch.set_num_threads(args.threads)
    scvi, scvi_missing = (None, "not requested")
    if "scvi-tools" in args.impls:
        scvi, scvi_missing = import_scvi()
    t0 = time.perf_counter()
    adata = make_anndata(SyntheticSpec(n_cells=args.n_cells, n_genes=args.n_genes, n_batches=N_BATCHES, seed=SEED))
    data_s = time.perf_counter() - t0
    emit(
        {
            "bench": "train",
            "header": True,
            "torch": torch.__version__,
            "scvi_tools": getattr(scvi, "__version__", None),
            "numpy": np.__version__,
            "python": platform.python_version(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "quick": bool(args.quick),
            "threads": args.threads,
            "compile": args.compile,
            "n_cells": args.n_cells,
            "n_genes": args.n_genes,
            "n_batches": N_BATCHES,
            "nnz_frac": adata.X.nnz / (adata.n_obs * adata.n_vars),
            "epochs": args.epochs,
            "batch_sizes": args.batch_sizes,
            "train_size": TRAIN_SIZE,
            "validation": "off for all (scvi-tools default; ours via check_val_every_n_epoch)",
            "data_gen_s": data_s,
        }
    )
    if "scvi-scale" in args.impls or "ceiling" in args.impls:
        warm = warm_up_scvi_scale(adata, args.threads)
        emit({"bench": "train", "impl": "scvi-scale", "warmup": True, "seconds": warm, "untimed": True})
    st_adata = None
    if "scvi-tools" in args.impls:
        if scvi is None:
            emit({"bench": "train", "impl": "scvi-tools", "skipped": f"scvi-tools is not importable ({scvi_missing})"})
        else:
            st_adata = scvi_tools_adata(scvi, adata)
            warm = warm_up_scvi_tools(scvi, adata, args.threads)
            emit({"bench": "train", "impl": "scvi-tools", "warmup": True, "seconds": warm, "untimed": True})
    runners = {
        "scvi-scale": lambda bs, rep: bench_scvi_scale(adata, bs, args.epochs, args.threads),
        "ceiling": lambda bs, rep: bench_ceiling(adata, bs, args.epochs, args.threads, args.profile and rep == 0),
        "scvi-tools": lambda bs, rep: bench_scvi_tools(scvi, st_adata, bs, args.epochs, args.threads),
    }
    active = [i for i in ("scvi-scale", "ceiling", "scvi-tools") if i in args.impls]
    if st_adata is None and "scvi-tools" in active:
        active.remove("scvi-tools")
    results: dict[tuple[str, int], float] = {}
    for bs in args.batch_sizes:
        runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in active}
        for rep in range(args.repeats):  # interleaved, so a slow spell of the machine hits every impl alike
            for impl in active:
                runs[impl].append(runners[impl](bs, rep))
        for impl in active:
            rec = best_of(runs[impl])
            results[impl, bs] = rec["cells_per_s"]
            emit(rec)
    for bs in args.batch_sizes:
        ours = results.get(("scvi-scale", bs))
        if "scvi-tools" in args.impls:
            target = TARGETS_VS_SCVI_TOOLS.get(bs)
            emit(
                ratio_line(
                    "train", "scvi_scale/scvi_tools", ours, results.get(("scvi-tools", bs)), target, batch_size=bs
                )
            )
        if "ceiling" in args.impls:
            emit(
                ratio_line(
                    "train", "scvi_scale/ceiling", ours, results.get(("ceiling", bs)), TARGET_VS_CEILING, batch_size=bs
                )
            )


if __name__ == "__main__":
    main()
