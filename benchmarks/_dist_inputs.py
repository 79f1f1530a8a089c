"""The inputs of the scaling arithmetic that ``bench_dist.py`` measures besides training runs: store facts (entries
per cell, bytes per entry raw and on disk), the model's gradient size and the step's fixed cost, a gloo all-reduce
of that size, and the loader alone.

Imported by plain name by ``bench_dist.py`` (``python benchmarks/NAME.py`` puts this folder on the path); the
all-reduce workers are spawned from here, so they import this module, not the script.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

N_BATCHES = 4
SEED = 0
HVG = 2_000
BN_PACKET = 2 * 128 + 1  # GlobalBatchNorm1d all-reduces sum, sum of squares and the count of 128 features


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- stores --------------------------------------------------------------------------------------------------------
def store_facts(path: Path) -> dict[str, Any]:
    """Cells, non-zeros and bytes per entry of a converted Zarr store (raw item sizes and on disk)."""
    import zarr

    x = zarr.open_group(str(path), mode="r")["X"]
    n_obs, n_vars = (int(v) for v in x.attrs["shape"])
    nnz = int(x["data"].shape[0])

    def disk(name: str) -> int:
        return sum(p.stat().st_size for p in (path / "X" / name).rglob("*") if p.is_file())

    data_b, indices_b, indptr_b = disk("data"), disk("indices"), disk("indptr")
    raw_per_entry = x["data"].dtype.itemsize + x["indices"].dtype.itemsize
    disk_per_entry = (data_b + indices_b) / max(nnz, 1)
    return {
        "n_cells": n_obs,
        "n_genes": n_vars,
        "nnz": nnz,
        "nnz_per_cell": nnz / max(n_obs, 1),
        "density": nnz / max(n_obs * n_vars, 1),
        "count_dtype": str(x["data"].dtype),
        "index_dtype": str(x["indices"].dtype),
        "raw_bytes_per_entry": raw_per_entry,
        "disk_bytes_per_entry": disk_per_entry,
        "compression_ratio": raw_per_entry / max(disk_per_entry, 1e-12),
        "indptr_disk_bytes_per_cell": indptr_b / max(n_obs, 1),
        "disk_bytes_per_cell": (data_b + indices_b + indptr_b) / max(n_obs, 1),
        "x_disk_bytes": data_b + indices_b + indptr_b,
    }


def convert_h5ad(h5ad: Path, out: Path, batch_key: str | None) -> tuple[Any, float]:
    from scvi_scale.store.convert import convert

    t0 = time.perf_counter()
    store = convert(h5ad, out, batch_key=batch_key, progress=False, overwrite=True)
    return store, time.perf_counter() - t0


def build_bench_store(n_cells: int, n_genes: int, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The synthetic atlas as ``.h5ad``, converted to Zarr (reused when the same size is already there)."""
    from scvi_scale.datasets.synthetic import SyntheticSpec, write_h5ad
    from scvi_scale.store.zarr_store import ZarrStore

    name = f"synthetic_{n_cells}x{n_genes}_b{N_BATCHES}_s{SEED}"
    zpath = workdir / f"{name}.zarr"
    try:
        ZarrStore(zpath)
        return zpath, {"cached": True, "convert_s": None}
    except Exception:  # missing or incomplete: build it
        pass
    h5 = workdir / f"{name}.h5ad"
    write_h5ad(SyntheticSpec(n_cells=n_cells, n_genes=n_genes, n_batches=N_BATCHES, seed=SEED), h5)
    _, secs = convert_h5ad(h5, zpath, "batch")
    h5.unlink()
    return zpath, {"cached": False, "convert_s": secs}


def real_store_record(h5ad: Path, workdir: Path) -> dict[str, Any]:
    """Convert one real ``.h5ad`` and count its non-zeros per cell over all genes and over the top 2,000."""
    import anndata

    from scvi_scale import api

    rec: dict[str, Any] = {"bench": "dist", "part": "store", "store": "real", "name": h5ad.stem}
    adata = anndata.read_h5ad(h5ad)
    batch_key = "batch" if "batch" in adata.obs else None
    zpath = workdir / f"real_{h5ad.stem}.zarr"
    store, secs = convert_h5ad(h5ad, zpath, batch_key)
    rec.update(store_facts(zpath), convert_s=secs)
    n_top = min(HVG, int(adata.n_vars))
    errors = []
    for span in (0.3, 0.5):  # scanpy's default span; its loess can fail on small batches, as the error advises
        try:
            hvg = api.prepare(store, n_top_genes=n_top, batch_key=batch_key, span=span).hvg_index
        except Exception as err:  # noqa: BLE001 - a failed HVG pass is reported, not fatal
            errors.append(f"span {span}: {type(err).__name__}: {err}")
            continue
        rec["hvg_n_genes"] = int(hvg.size)
        rec["hvg_nnz_per_cell"] = float(adata.X[:, hvg].nnz) / adata.n_obs
        rec["hvg_method"] = f"seurat_v3 (scvi-scale prepare, span {span})"
        break
    if errors:
        rec["hvg_errors"] = errors
    shutil.rmtree(zpath, ignore_errors=True)
    return rec


# -- model size and all-reduce -----------------------------------------------------------------------------------
def tiny_step_ms(model: Any, n_genes: int, n_batch: int, cells: int = 16, iters: int = 30) -> tuple[float, int]:
    """Median ms of forward + backward + Adam step on ``cells`` cells (one thread): the step's fixed cost (op
    dispatch, Python), which no batch size hides on a fast device; and the number of aten ops it runs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from scvi_scale.train.optim import make_optimizer

    torch.manual_seed(SEED)
    x = torch.poisson(torch.full((cells, n_genes), 0.3))
    rows, cols = x.nonzero(as_tuple=True)
    batch = torch.arange(cells) % n_batch
    optimizer = make_optimizer(model)
    model.train()

    def step() -> None:
        loss = model(x, batch, 1.0, (rows, cols)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    n_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return 1e3 * float(np.median(times)), int(n_ops)


def model_record(n_genes: int, n_batch: int) -> dict[str, Any]:
    import torch

    from scvi_scale.model import VAE, ModelConfig

    torch.set_num_threads(1)
    model = VAE(n_genes, n_batch, ModelConfig())
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step_ms, n_ops = tiny_step_ms(model, n_genes, n_batch)
    return {
        "bench": "dist",
        "part": "model",
        "n_genes": n_genes,
        "n_batch": n_batch,
        "n_params": n,
        "grad_bytes_fp32": 4 * n,
        "buffers": sum(b.numel() for b in model.buffers()),
        "batchnorm_layers": sum(1 for m in model.modules() if type(m).__name__.endswith("BatchNorm1d")),
        "tiny_step_cells": 16,
        "tiny_step_ms": step_ms,  # 1 torch thread on this CPU
        "aten_ops_per_step": n_ops,  # every aten call, nested ones included (an upper bound on kernels)
    }


def _allreduce_worker(rank: int, world: int, port: int, n_params: int, iters: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for label, size in (("grad", n_params), ("bn_packet", BN_PACKET)):
            t = torch.ones(size)
            for _ in range(5):
                dist.all_reduce(t)
            times = []
            for _ in range(iters):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(t)
                times.append(time.perf_counter() - t0)
            result[f"{label}_ms"] = 1e3 * float(np.median(times))
            result[f"{label}_ms_p90"] = 1e3 * float(np.percentile(times, 90))
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def allreduce_record(n_params: int, iters: int, workdir: Path) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    out = workdir / "allreduce.json"
    mp.start_processes(_allreduce_worker, args=(2, port, n_params, iters, str(out)), nprocs=2, start_method="spawn")
    res = json.loads(out.read_text())
    return {
        "bench": "dist",
        "part": "allreduce",
        "backend": "gloo",
        "world_size": 2,
        "floats": n_params,
        "bytes": 4 * n_params,
        "iters": iters,
        **res,
    }


# -- the loader alone ------------------------------------------------------------------------------------------------
def loader_record(store_path: Path, threads: int, batch_size: int, epochs: int) -> dict[str, Any]:
    import torch

    from scvi_scale.data.memory import train_val_split
    from scvi_scale.data.prefetch import StoreLoader
    from scvi_scale.store.zarr_store import ZarrStore

    torch.set_num_threads(1)
    store = ZarrStore(store_path)
    codes, _ = store.batch_codes("batch")
    rows, _ = train_val_split(store.n_obs, 0.9, SEED, batch_size)
    loader = StoreLoader(store, codes, rows, batch_size, seed=SEED, num_threads=threads)
    for _ in loader:  # warm-up epoch: page cache, thread pools
        pass
    before = loader.timings()
    t0 = time.perf_counter()
    cells = 0
    for epoch in range(1, 1 + epochs):
        loader.set_epoch(epoch)
        cells += sum(b.n_obs for b in loader)
    secs = time.perf_counter() - t0
    after = loader.timings()
    per_cell = {f"{k}_per_cell_us": 1e6 * (after[k] - before[k]) / max(cells, 1) for k in after}
    return {
        "bench": "dist",
        "part": "loader",
        "threads": threads,
        "batch_size": batch_size,
        "device": "cpu",
        "epochs": epochs,
        "cells": cells,
        "seconds": secs,
        "cells_per_s": cells / max(secs, 1e-9),
        "block_size": loader.block_size,
        **per_cell,
        "load_avg": load_avg(),
    }
