"""Embed-and-write throughput (cells/s) against reading the same rows with no model, on the same store.

Prints one JSON line per configuration on stdout (everything else goes to stderr), then the summary ratio. The
store is the synthetic atlas (``SyntheticSpec(n_cells, n_genes, n_batches=4, seed=0)``) streamed into a Zarr
store by ``_stores.build_synthetic_store`` (cached under ``--workdir``). The model is scvi-tools' default
architecture (ZINB, 128 hidden, 10 latent, 1 layer, batch covariate), untrained: inference costs the same
whatever the weights. Timed, interleaved ``--repeats`` times (best kept):

``loader-only``
    the rows of every region read in ``--batch-size`` minibatches from each region's first row, exactly as the
    region writer reads them (``ZarrStore.read_range`` -> CSR float32 -> dense -> torch), and nothing else.
``model-only``
    the encoder pass (``latent_representation``) on ``--model-minibatches`` dense minibatches already in
    memory, scaled to cells/s: the model's share of the work on its own.
``embed-and-write``
    ``api.embed_to_store(run, store, ["latent"])`` in this process: read, encode, write ``obsm/X_scvi`` region
    by region with commit marks and the manifest (the previous embedding is removed first, so every region is
    written).
``normalize-and-write`` (with ``--normalize-genes N``)
    ``analysis.normalized_expression`` of N genes written as ``obsm/scvi_normalized`` (no target).

Summary: ``embed_write/loader_only`` against the target 0.8 (issue 6), and ``ceiling_if_serial`` =
``1 / (1 + loader_cells_per_s / model_cells_per_s)``: what embed-and-write can reach when reading and encoding
take turns on the same cores (as they do here, one minibatch after another).

Run ``python benchmarks/bench_infer.py --help``; ``--quick`` is the size CI smoke-runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from _common import emit, machine, peak_rss_bytes, ratio_line
from _stores import build_synthetic_store

from scvi_scale import analysis, api
from scvi_scale.config import Config, with_overrides
from scvi_scale.data.batch import Batch
from scvi_scale.datasets.synthetic import SyntheticSpec
from scvi_scale.infer import writeback
from scvi_scale.infer.embed import latent_representation
from scvi_scale.model import VAE

TARGET = 0.8
N_BATCHES = 4


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    with contextlib.redirect_stdout(sys.stderr):
        yield


def make_run(store, n_genes: int) -> api.Run:
    """An in-memory run with scvi-tools' default architecture on the store's genes and batches."""
    codes, categories = store.batch_codes("batch")
    config = with_overrides(Config(), data={"batch_key": "batch"})
    torch.manual_seed(0)
    model = VAE(n_genes, len(categories), config.model).eval()
    return api.Run(None, model, config, [str(v) for v in store.var_names], "batch", list(categories))


def time_loader(store, plan: writeback.RegionPlan, batch_size: int) -> dict:
    t0 = time.perf_counter()
    cells = 0
    for region in range(plan.n_regions):
        start, stop = plan.bounds(region)
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            x = torch.from_numpy(sp.csr_matrix(store.read_range(lo, hi), dtype=np.float32).toarray())
            cells += x.shape[0]
    seconds = time.perf_counter() - t0
    return {"cells": cells, "seconds": seconds, "cells_per_s": cells / seconds}


def time_model(run: api.Run, store, batch_size: int, n_minibatches: int) -> dict:
    codes, _ = store.batch_codes("batch")
    codes = np.array(codes, dtype=np.int64)  # writable, for torch
    batches = []
    for i in range(n_minibatches):
        lo = (i * batch_size) % max(store.n_obs - batch_size, 1)
        x = torch.from_numpy(sp.csr_matrix(store.read_range(lo, lo + batch_size), dtype=np.float32).toarray())
        batches.append(Batch(x, torch.from_numpy(codes[lo : lo + batch_size]), np.arange(lo, lo + batch_size)))
    latent_representation(run.model, batches[:1])  # warm-up
    t0 = time.perf_counter()
    latent_representation(run.model, batches)
    seconds = time.perf_counter() - t0
    cells = n_minibatches * batch_size
    return {"cells": cells, "seconds": seconds, "cells_per_s": cells / seconds}


def time_embed(run: api.Run, path: Path, args: argparse.Namespace) -> dict:
    store = api.open_counts(path)
    store.delete_obsm("X_scvi")  # a fresh embedding: every region written (begin() remakes array and marks)
    store.update_metadata(writeback.MANIFEST, None)
    t0 = time.perf_counter()
    summary = api.embed_to_store(run, path, ("latent",), batch_size=args.batch_size, threads=args.threads)
    seconds = time.perf_counter() - t0
    assert summary.complete and summary.written == summary.n_regions, summary
    return {"cells": summary.cells, "seconds": seconds, "cells_per_s": summary.cells / seconds,
            "regions": summary.n_regions}  # fmt: skip


def time_normalize(run: api.Run, path: Path, args: argparse.Namespace) -> dict:
    store = api.open_counts(path)
    store.delete_obsm("scvi_normalized")
    store.update_metadata("obsm/scvi_normalized", None)
    genes = run.var_names[: args.normalize_genes]
    t0 = time.perf_counter()
    summary = analysis.normalized_expression(run, path, genes=genes, batch_size=args.batch_size, threads=args.threads)
    seconds = time.perf_counter() - t0
    assert summary.complete and summary.written == summary.n_regions, summary
    return {"cells": summary.cells, "seconds": seconds, "cells_per_s": summary.cells / seconds,
            "regions": summary.n_regions, "genes": len(genes)}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, default=100_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--batch-size", type=int, default=1024, help="cells per forward pass and per read")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the reads run in the same thread)")
    p.add_argument("--repeats", type=int, default=2, help="measure each N times (interleaved), keep the best")
    p.add_argument("--model-minibatches", type=int, default=30, help="minibatches timed for model-only")
    p.add_argument("--normalize-genes", type=int, default=0, help="also time normalized expression of N genes")
    p.add_argument("--workdir", help="store cache (default: a temporary folder, removed afterwards)")
    p.add_argument("--quick", action="store_true", help="tiny smoke size: 4,000 cells x 200 genes")
    args = p.parse_args(argv)
    if args.quick:
        args.n_cells, args.n_genes, args.repeats, args.model_minibatches = 4_000, 200, 1, 4
        args.normalize_genes = args.normalize_genes or 20
    return args


def best_of(records: list[dict]) -> dict:
    best = max(records, key=lambda r: r["cells_per_s"])
    return {**best, "repeats": len(records), "cells_per_s_runs": [r["cells_per_s"] for r in records]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        spec = SyntheticSpec(n_cells=args.n_cells, n_genes=args.n_genes, n_batches=N_BATCHES, seed=0)
        with stdout_to_stderr():
            store, info = build_synthetic_store(spec, workdir)
        path = Path(info["path"])
        run = make_run(store, args.n_genes)
        plan = writeback.plan_regions(store.n_obs)
        emit({"bench": "infer", "header": True, "torch": torch.__version__, "numpy": np.__version__, **machine(),
              "quick": bool(args.quick), "n_cells": args.n_cells, "n_genes": args.n_genes, "nnz": info["nnz"],
              "batch_size": args.batch_size, "threads": args.threads, "regions": plan.n_regions,
              "region_rows": plan.region_rows, "store_build_s": info.get("build_s"), "store_cached": info["cached"],
              "store": "zarr (local disk; page cache warm after the first pass)"})  # fmt: skip
        time_loader(store, plan, args.batch_size)  # warm the page cache, so every timed pass reads it warm
        runs: dict[str, list[dict]] = {"loader-only": [], "model-only": [], "embed-and-write": []}
        if args.normalize_genes:
            runs["normalize-and-write"] = []
        for _ in range(args.repeats):  # interleaved: a slow spell of the shared machine hits each alike
            runs["loader-only"].append(time_loader(store, plan, args.batch_size))
            runs["model-only"].append(time_model(run, store, args.batch_size, args.model_minibatches))
            with stdout_to_stderr():
                runs["embed-and-write"].append(time_embed(run, path, args))
                if args.normalize_genes:
                    runs["normalize-and-write"].append(time_normalize(run, path, args))
        best = {impl: best_of(records) for impl, records in runs.items()}
        for impl, rec in best.items():
            emit({"bench": "infer", "impl": impl, "batch_size": args.batch_size, "n_cells": args.n_cells,
                  "n_genes": args.n_genes, "threads": args.threads, **rec,
                  "peak_rss_bytes_so_far": peak_rss_bytes()})  # fmt: skip
        loader, model = best["loader-only"]["cells_per_s"], best["model-only"]["cells_per_s"]
        emit(ratio_line("infer", "embed_write/loader_only", best["embed-and-write"]["cells_per_s"], loader, TARGET,
                        ceiling_if_serial=1 / (1 + loader / model), batch_size=args.batch_size,
                        threads=args.threads))  # fmt: skip
        emit({"bench": "infer", "done": True})


if __name__ == "__main__":
    main()
