"""Peak memory of training from a store: does it stay flat as the store grows from 100k to millions of cells?

Prints one JSON line per part on stdout (third-party output goes to stderr), then the summary lines:

1. ``build``: a synthetic Zarr store per size (``--small`` and ``--large`` cells x ``--n-genes`` genes,
   :func:`_stores.build_synthetic_store`: the generator streamed into the store, never the whole matrix in
   memory), cached in ``--workdir`` by spec, each built in a child process whose peak RSS is reported.
2. ``setup``: in a fresh child process per store, the resident memory added by each set-up step ``api.train``
   takes before its first minibatch (open the store, read ``obs`` and the batch codes, the row pointers, the
   train/validation split, the loader): what grows with the number of cells.
3. ``train``: in a fresh child process per store, ``scvi_scale.api.train(store, run_dir, data={"batch_key":
   "batch", "batch_size": --batch-size}, train={"max_epochs": --epochs, "progress": False, "num_threads":
   --torch-threads})``: by default one epoch over the 90 % training split with the default block loader, then the
   default validation pass over the other 10 %, the checkpoint and ``model.pt`` (``--epochs 2`` also crosses an
   epoch boundary, where the next epoch's first piece is read ahead). ``--max-steps N`` stops each epoch
   after N minibatches instead (labelled in the output); the default is the whole epoch. ``--loader-memory``
   sets ``data.loader_memory_bytes`` (default 1 GiB); ``loader_max_inflight_bytes`` reports the peak bytes
   the training and validation loaders held (``StoreLoader.max_inflight_bytes``, read from the loaders
   ``api.train`` built: the child wraps ``api._make_loaders`` to keep them, nothing else changes).

The child's peak is ``VmHWM`` from its own ``/proc/self/status`` (``ru_maxrss`` of a child started by
fork/exec can report the parent's peak), next to ``VmRSS`` right after its imports (``baseline_rss``); a thread
samples ``VmRSS`` twice a second (``rss_trace``: a rising trace means memory grows along the epoch).

Summaries: ``peak_large/peak_small`` (target <= 1.10) and ``peak_large_bytes`` (target < 3 GB = 3e9 bytes).
What to expect: the loader holds the piece it cuts minibatches from and the next one (a shuffle buffer, 65k
cells at 2,000 genes, 4 bytes a stored count), whatever the store's size; a 100k-cell store's split is only
1.4 buffers, so it holds a little less. Past that, the peak grows by the per-cell arrays of the set-up
(``indptr``, batch codes, the split: ~25 bytes a cell, see ``setup``).
``--quick`` builds tiny stores (2,000 and 10,000 cells x 200 genes) for the CI smoke test; its ratios mean
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import emit, machine

SCRIPT = Path(__file__).resolve()
TARGET_PEAK_BYTES = 3 * 10**9
TARGET_PEAK_RATIO = 1.10
N_BATCHES = 4
SEED = 0


# -- memory of this process -------------------------------------------------------------------------------------------
def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``: peak resident set; ``VmRSS``: current) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


class RssSampler:
    """Samples ``VmRSS`` every ``every_s`` seconds in a daemon thread."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s, self.samples, self._t0 = every_s, [], time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append((time.perf_counter() - self._t0, proc_status_bytes("VmRSS")))

    def stop(self, points: int = 12) -> list[list[float]]:
        """The trace cut down to about ``points`` evenly spaced ``[seconds, rss_bytes]`` pairs."""
        self._stop.set()
        self._thread.join()
        s = self.samples
        if len(s) <= points:
            return [[round(t, 1), r] for t, r in s]
        idx = sorted({round(i * (len(s) - 1) / (points - 1)) for i in range(points)})
        return [[round(s[i][0], 1), s[i][1]] for i in idx]


# -- child processes ------------------------------------------------------------------------------------------------
def child_build(args: argparse.Namespace) -> dict[str, Any]:
    from _stores import build_synthetic_store

    from scvi_scale.datasets.synthetic import SyntheticSpec

    spec = SyntheticSpec(n_cells=args.n_cells, n_genes=args.n_genes, n_batches=N_BATCHES, seed=SEED)
    store, info = build_synthetic_store(spec, args.workdir)
    return {**info, "n_cells": store.n_obs, "n_genes": store.n_vars, "peak_rss": proc_status_bytes("VmHWM")}


def child_setup(args: argparse.Namespace) -> dict[str, Any]:
    """RSS added by each set-up step of ``api._train_process``, in its order, before the first minibatch."""
    from scvi_scale.api import open_counts
    from scvi_scale.data.memory import train_val_split
    from scvi_scale.data.prefetch import StoreLoader

    steps: dict[str, int] = {}
    rss = proc_status_bytes("VmRSS")
    base = rss

    def step(name: str) -> None:
        nonlocal rss
        now = proc_status_bytes("VmRSS")
        steps[name] = now - rss
        rss = now

    store = open_counts(args.store)
    step("open_store")
    codes, _ = store.batch_codes("batch")
    step("obs_and_batch_codes")
    _ = store.indptr
    step("indptr")
    train_rows, val_rows = train_val_split(store.n_obs, 0.9, SEED, args.batch_size)
    step("train_val_split")
    loader = StoreLoader(store, codes, train_rows, args.batch_size)
    step("train_loader")
    StoreLoader(store, codes, val_rows, args.batch_size, shuffle=False)
    step("val_loader")
    loader.set_epoch(0)
    plan = loader.sampler.plan()
    step("epoch_plan")
    obs_bytes = int(store.obs.memory_usage(deep=True).sum())
    return {
        "n_cells": store.n_obs,
        "baseline_rss": base,
        "setup_rss_added": rss - base,
        "steps_rss_added": steps,
        "obs_bytes_deep": obs_bytes,
        "obs_bytes_per_cell": obs_bytes / store.n_obs,
        "indptr_bytes": int(store.indptr.nbytes),
        "codes_bytes": int(codes.nbytes),
        "split_bytes": int(train_rows.nbytes + val_rows.nbytes),
        "pieces_per_epoch": len(plan.pieces),
        "block_size": loader.block_size,
    }


def _limit_steps(max_steps: int) -> None:
    """Stop every StoreLoader epoch after ``max_steps`` minibatches (``--max-steps``; a benchmark-only patch)."""
    import itertools

    from scvi_scale.data import prefetch

    full_iter = prefetch.StoreLoader.__iter__

    def limited(self: Any) -> Any:
        it = full_iter(self)
        try:
            yield from itertools.islice(it, max_steps) if self.sampler.shuffle else it
        finally:
            it.close()

    prefetch.StoreLoader.__iter__ = limited  # type: ignore[method-assign]


def child_train(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # noqa: F401  (imported before the baseline, as api.train would)

    from scvi_scale import api

    if args.max_steps:
        _limit_steps(args.max_steps)
    loaders: list[Any] = []
    make_loaders = api._make_loaders

    def keep_loaders(*a: Any, **k: Any) -> Any:  # instrumentation only: remember the loaders train builds
        made = make_loaders(*a, **k)
        loaders.extend(made)
        return made

    api._make_loaders = keep_loaders
    data = {"batch_key": "batch", "batch_size": args.batch_size}
    if args.loader_memory:
        data["loader_memory_bytes"] = args.loader_memory
    base = proc_status_bytes("VmRSS")
    sampler = RssSampler()
    t0 = time.perf_counter()
    run = api.train(
        args.store,
        args.out,
        data=data,
        train={"max_epochs": args.epochs, "progress": False, "num_threads": args.torch_threads},
        overwrite=True,
    )
    seconds = time.perf_counter() - t0
    peak = proc_status_bytes("VmHWM")
    trace = sampler.stop()
    assert run.fit_result is not None
    row = run.fit_result.history[-1]
    return {
        "n_cells": args.n_cells,
        "peak_rss": peak,
        "baseline_rss": base,
        "peak_above_baseline": peak - base,
        "final_rss": proc_status_bytes("VmRSS"),
        "seconds": seconds,
        "train_cells_per_s": float(row["perf/cells_per_s"]),
        "epoch_s": float(row["perf/epoch_s"]),
        "steps": int(row["step"]),
        "max_steps": args.max_steps,
        "epochs": args.epochs,
        "train_elbo": float(row["train/elbo"]),
        "validation_elbo": float(row["validation/elbo"]) if "validation/elbo" in row else None,
        "loader_memory_bytes": loaders[0].memory_budget_bytes,
        "loader_max_inflight_bytes": [getattr(x, "max_inflight_bytes", None) for x in loaders if x is not None],
        "rss_trace": trace,
    }


CHILDREN = {"build": child_build, "setup": child_setup, "train": child_train}


def run_child(kind: str, extra: list[str], timeout_s: float) -> dict[str, Any]:
    """Run this script as a fresh process in ``--child kind`` mode; its last stdout line is its JSON record."""
    cmd = [sys.executable, str(SCRIPT), "--child", kind, *extra]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout_s, cwd=SCRIPT.parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} failed with exit code {proc.returncode} (its stderr is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- driver ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = Path(tempfile.gettempdir()) / "scvi_scale_bench_memory"
    p.add_argument("--workdir", type=Path, default=default_dir, help="store cache and run directories")
    p.add_argument("--small", type=int, default=100_000, help="cells of the small store")
    p.add_argument("--large", type=int, default=2_000_000, help="cells of the large store")
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--torch-threads", type=int, default=1, help="train.num_threads")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after N minibatches; 0: whole epoch")
    p.add_argument("--epochs", type=int, default=1, help="train.max_epochs (>= 2 crosses an epoch boundary)")
    p.add_argument("--loader-memory", type=int, default=0, help="data.loader_memory_bytes; 0: the default (1 GiB)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per child process")
    p.add_argument("--quick", action="store_true", help="tiny smoke size: 2,000 and 10,000 cells x 200 genes")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--n-cells", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.small, args.large, args.n_genes = 2_000, 10_000, 200
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        emit(CHILDREN[args.child](args))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    emit(
        {
            "bench": "memory",
            "header": True,
            **machine(),
            "quick": bool(args.quick),
            "sizes": [args.small, args.large],
            "n_genes": args.n_genes,
            "batch_size": args.batch_size,
            "torch_threads": args.torch_threads,
            "max_steps": args.max_steps or None,
            "epochs": args.epochs,
            "loader_memory_bytes": args.loader_memory or None,
            "workdir": str(args.workdir),
            "disk_free_bytes": shutil.disk_usage(args.workdir).free,
        }
    )
    common = ["--n-genes", str(args.n_genes), "--batch-size", str(args.batch_size)]
    peaks: dict[str, int] = {}
    for label, n in (("small", args.small), ("large", args.large)):
        base = {"bench": "memory", "store": label, "n_cells": n, "n_genes": args.n_genes}
        built = run_child("build", [*common, "--n-cells", str(n), "--workdir", str(args.workdir)], args.timeout)
        emit({**base, "part": "build", **built, "load_avg_1m": os.getloadavg()[0]})
        extra = [*common, "--n-cells", str(n), "--store", built["path"]]
        setup = run_child("setup", extra, args.timeout)
        emit({**base, "part": "setup", **setup})
        out = args.workdir / f"run_{label}"
        train_extra = [*extra, "--out", str(out), "--torch-threads", str(args.torch_threads)]
        train_extra += ["--max-steps", str(args.max_steps), "--loader-memory", str(args.loader_memory)]
        train_extra += ["--epochs", str(args.epochs)]
        load_before = os.getloadavg()[0]
        trained = run_child("train", train_extra, args.timeout)
        emit({**base, "part": "train", **trained, "load_avg_1m": [load_before, os.getloadavg()[0]]})
        shutil.rmtree(out, ignore_errors=True)
        peaks[label] = int(trained["peak_rss"])
    ratio = peaks["large"] / peaks["small"]
    emit(
        {
            "bench": "memory",
            "summary": "peak_large/peak_small",
            "ratio": ratio,
            "target": TARGET_PEAK_RATIO,
            "met": bool(ratio <= TARGET_PEAK_RATIO),
            "direction": "<=",
            "sizes": [args.small, args.large],
        }
    )
    emit(
        {
            "bench": "memory",
            "summary": "peak_large_bytes",
            "value": peaks["large"],
            "ratio": peaks["large"] / TARGET_PEAK_BYTES,
            "target": TARGET_PEAK_BYTES,
            "met": bool(peaks["large"] < TARGET_PEAK_BYTES),
            "direction": "<",
        }
    )


if __name__ == "__main__":
    main()
