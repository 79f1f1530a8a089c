"""Loader throughput from object storage: ``StoreLoader`` over ``s3://`` against the same store on local disk.

Starts moto's S3 server on 127.0.0.1 (``tests/s3.py``'s :class:`MotoServer`, a subprocess; dummy credentials),
uploads a synthetic Zarr store (``--n-cells`` x ``--n-genes``, built by :func:`_stores.build_synthetic_store`
and cached in ``--workdir``) to a fresh bucket, and times the same loader configuration (shuffled minibatches
of ``--batch-size``, the 90 % training split, default block size and shuffle buffer, ``--threads`` reader
threads, no model step) over:

``local``
    :class:`~scvi_scale.store.zarr_store.ZarrStore` on the local path (warm page cache: it was just written).
``s3-obstore`` / ``s3-fsspec``
    ``ZarrStore("s3://bucket/NAME.zarr")`` through each client ``storage_options={"backend": ...}`` selects
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` point at the
    server). obstore is what ``auto`` picks when it is installed.

One JSON line per configuration (``cells_per_s`` over the measured epochs: the first is warm-up when
``--epochs`` >= 2; an epoch still running after ``--max-seconds`` is stopped and measured on what it delivered),
then ``s3-*/local`` summaries against the target 0.5. ``process_cpu_s`` and ``server_cpu_s`` are the CPU
seconds the benchmark process and the moto server spent over all epochs of a configuration: on 2 cores, a
server busy for most of the wall time is the bottleneck, not the loader. With ``--repeats N`` the
configurations run interleaved N times and the fastest run of each is kept.

What this measures and what it does not: the loader's request pattern and its client over HTTP, with every
request answered by a Python server on the same 2 cores (which competes with the loader for CPU) and no network
latency. A real bucket adds 10-100 ms a request and takes away the server's CPU; cold-cache local disk is slower
than the warm page cache here.

``--quick``: 3,000 cells x 200 genes, 1 epoch, for the CI smoke test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import emit, machine

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.5
SEED = 0
BACKENDS = ("obstore", "fsspec")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/PID/stat``; Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_loader(
    store: Any, codes: np.ndarray, rows: np.ndarray, args: argparse.Namespace, server_pid: int
) -> dict[str, Any]:
    """``--epochs`` epochs of ``StoreLoader`` on ``store``; cells/s over the measured ones, stage seconds and the
    CPU seconds this process and the S3 server spent (all epochs)."""
    from scvi_scale.data.prefetch import StoreLoader

    loader = StoreLoader(store, codes, rows, args.batch_size, seed=SEED, num_threads=args.threads)
    cpu0, server0 = time.process_time(), cpu_seconds(server_pid)
    epoch_s, epoch_cells, stopped = [], [], False
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        cells, t0 = 0, time.perf_counter()
        for batch in loader:
            cells += batch.n_obs
            if time.perf_counter() - t0 > args.max_seconds:
                stopped = True
                break
        epoch_s.append(time.perf_counter() - t0)
        epoch_cells.append(cells)
    measured = list(range(1, len(epoch_s))) if len(epoch_s) >= 2 else [0]
    t = loader.timings()
    return {
        "process_cpu_s": time.process_time() - cpu0,
        "server_cpu_s": cpu_seconds(server_pid) - server0,
        "cells_per_s": sum(epoch_cells[i] for i in measured) / max(sum(epoch_s[i] for i in measured), 1e-9),
        "epoch_s": epoch_s,
        "epoch_cells": epoch_cells,
        "measured_epochs": measured,
        "stopped_at_max_seconds": stopped,
        "read_s": t["read_s"],
        "idle_s": t["idle_s"],
        "block_size": loader.block_size,
        "buffers_per_epoch": len(loader.sampler.plan().pieces),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = Path(tempfile.gettempdir()) / "scvi_scale_bench_stores"
    p.add_argument("--workdir", type=Path, default=default_dir, help="synthetic store cache")
    p.add_argument("--n-cells", type=int, default=200_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=2, help="epochs per configuration; the first is warm-up if >= 2")
    p.add_argument("--threads", type=int, default=2, help="StoreLoader reader threads")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of obstore, fsspec")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop an epoch after this long")
    p.add_argument("--quick", action="store_true", help="3,000 cells x 200 genes, 1 epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.n_cells, args.n_genes, args.epochs, args.max_seconds = 3_000, 200, 1, 10.0
        args.batch_size = min(args.batch_size, 256)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if set(args.backends) - set(BACKENDS):
        p.error(f"--backends: choose from {', '.join(BACKENDS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))  # tests/s3.py: the project's moto starter and bucket helpers
    from _stores import build_synthetic_store

    from scvi_scale.data.memory import train_val_split
    from scvi_scale.datasets.synthetic import SyntheticSpec
    from scvi_scale.store.zarr_store import ZarrStore
    from tests.s3 import MotoServer, make_bucket, s3_env, upload_tree

    spec = SyntheticSpec(n_cells=args.n_cells, n_genes=args.n_genes, n_batches=4, seed=SEED)
    local, info = build_synthetic_store(spec, args.workdir)
    codes, _ = local.batch_codes("batch")
    rows, _ = train_val_split(local.n_obs, 0.9, SEED, args.batch_size)
    with MotoServer() as server:
        server_pid = server._proc.pid  # the server's process, for its CPU seconds
        saved = {k: os.environ.get(k) for k in s3_env(server.endpoint)}
        try:
            for key, value in s3_env(server.endpoint).items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            t0 = time.perf_counter()
            url = upload_tree(info["path"], f"{make_bucket(server.endpoint, 'bench')}/{Path(info['path']).name}",
                              server.endpoint)  # fmt: skip
            upload_s = time.perf_counter() - t0
            emit(
                {
                    "bench": "loader_s3",
                    "header": True,
                    **machine(),
                    "quick": bool(args.quick),
                    "n_cells": local.n_obs,
                    "n_genes": local.n_vars,
                    "n_train": int(rows.size),
                    "batch_size": args.batch_size,
                    "epochs": args.epochs,
                    "threads": args.threads,
                    "store_bytes": info["disk_bytes"],
                    "store_cached": info["cached"],
                    "upload_s": upload_s,
                    "server": "moto (subprocess, 127.0.0.1)",
                }
            )
            stores: dict[str, Any] = {"local": local}
            for backend in args.backends:
                stores[f"s3-{backend}"] = ZarrStore(url, storage_options={"backend": backend})
            runs: dict[str, list[dict]] = {name: [] for name in stores}
            for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every configuration
                for name, store in stores.items():
                    runs[name].append(time_loader(store, codes, rows, args, server_pid))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    best = {}
    for name, recs in runs.items():
        rec = max(recs, key=lambda r: r["cells_per_s"])
        best[name] = rec["cells_per_s"]
        emit(
            {
                "bench": "loader_s3",
                "store": name,
                "batch_size": args.batch_size,
                **rec,
                "repeats": len(recs),
                "cells_per_s_runs": [r["cells_per_s"] for r in recs],
                "load_avg_1m": machine()["load_avg_1m"],
            }
        )
    for name in runs:
        if name != "local":
            ratio = best[name] / best["local"] if best["local"] else None
            met = None if ratio is None else bool(ratio >= TARGET)
            emit({"bench": "loader_s3", "summary": f"{name}/local", "ratio": ratio, "target": TARGET, "met": met})


if __name__ == "__main__":
    main()
