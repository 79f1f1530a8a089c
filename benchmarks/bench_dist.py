"""Data-parallel training throughput (cells/s): 1 against 2 workers per launcher, and what Ray's start-up costs.

Prints one JSON line per part on stdout (the training runs' own output goes to log files in the work folder),
then the summary lines. Every run trains the same Zarr store end to end through the CLI, in a fresh child
process, with validation off (``train.check_val_every_n_epoch`` beyond the run, as ``bench_train.py``):

1. ``store``: the benchmark store (the synthetic atlas written to ``.h5ad`` and converted with
   :func:`scvi_scale.store.convert.convert`, the same path as ``scvi-scale convert``) and, with
   ``--real-data DIR``, every ``.h5ad`` there converted the same way: cells, non-zeros per cell (all genes,
   and the top 2,000 seurat_v3 genes of ``scvi-scale prepare``), and bytes per stored entry raw (``X/data`` +
   ``X/indices`` item sizes) and on disk (zstd), so ``compression_ratio`` = raw / disk. These are the inputs of
   the bandwidth arithmetic in ``deploy/SCALING.md``.
2. ``model``: parameters of ``VAE(n_genes, n_batch, ModelConfig())`` (what DDP all-reduces every step), and
   the step's fixed cost: forward + backward + Adam on 16 cells, one thread (``tiny_step_ms``), with the
   number of aten calls it makes.
3. ``allreduce``: two gloo processes on this machine all-reduce a tensor of that size (and the 257-float
   packet our global batch norm sends four times a step), median milliseconds.
4. ``loader``: :class:`~scvi_scale.data.prefetch.StoreLoader` alone over the store (no model, CPU minibatches),
   1 and 2 reader threads, batch 1,024, ``--loader-epochs`` epochs after a warm-up one: loader cells/s and the
   thread-microseconds per cell of each stage (``read``/``decode`` in the reader threads, ``assemble`` in the
   one assembler thread).
5. ``train``: ``scvi-scale train STORE --workers W --launcher L`` (``local``: spawned processes, W=1 is the
   plain single process; ``ray``: a Ray Train job on a local Ray instance started by the CLI, with its own
   ``--storage-path`` in the work folder, see ``train_command``; ``torchrun``:
   ``torchrun --standalone --nproc_per_node W``), every ``--batch-sizes`` value **per worker** (2 workers
   train on 2 x B cells a step), ``train.num_threads`` = ``--threads`` (torch intra-op threads per worker)
   and ``data.loader_threads`` = ``--loader-threads``. ``cells_per_s`` is the steady state: the job's cells
   over the epochs after the first (``perf/cells_per_s`` x ``perf/epoch_s`` per epoch; with 2 workers the
   epoch time is the slowest rank's). ``wall_s`` is the child's wall time, ``outside_epochs_s`` = ``wall_s``
   minus all its epochs (interpreter start, imports, opening the store, process group, checkpoints, and for
   Ray the instance and the Train controller).
6. ``ray_bare``: in a fresh process, ``ray.init`` -> a Ray Train ``fit`` of a function that only reports
   (``--workers`` max workers, gloo) -> ``ray.shutdown``, each timed: Ray's fixed cost without our code.

Summaries: ``scaling_efficiency`` per launcher and batch size = cells/s with 2 workers / (2 x cells/s with 1),
with ``speedup`` and the same against the plain single process (``vs_single``); ``ray/local`` (cells/s at
the same worker count); ``ray_overhead_s`` = the Ray run's ``outside_epochs_s`` minus the local run's at
the same worker count. There are no targets here: on a 2-core machine two workers with one torch thread
each already take every core, so the loader threads, the all-reduces and anything else running compete
with the training step; the per-node targets (near-linear to 8 GPUs) need GPUs (``benchmarks/gpu_check.sh``).

Parts 1-4 live in ``_dist_inputs.py``. Run ``python benchmarks/bench_dist.py --help``; ``--quick`` is the tiny
size CI smoke-runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import emit, machine, ratio_line
from _dist_inputs import (
    N_BATCHES,
    SEED,
    allreduce_record,
    build_bench_store,
    load_avg,
    loader_record,
    model_record,
    real_store_record,
    store_facts,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
NEVER = 10**9  # check_val_every_n_epoch beyond any run: no validation, as in bench_train.py
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def log(msg: str) -> None:
    print(f"[bench_dist] {msg}", file=sys.stderr, flush=True)


# -- training runs (part 5) ------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as fh:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(fh)]


def summarize_rows(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Steady-state cells/s over the epochs after the first (all when there is one) and the stage times."""
    measured = list(range(1, len(rows))) if len(rows) >= 2 else list(range(len(rows)))
    epoch_s = [r["perf/epoch_s"] for r in rows]
    cells = [r["perf/cells_per_s"] * r["perf/epoch_s"] for r in rows]
    secs = sum(epoch_s[i] for i in measured)

    def total(key: str) -> float:
        return sum(rows[i].get(key, 0.0) for i in measured)

    step_s, data_s = total("perf/step_s"), total("perf/data_s")
    steps = [rows[i]["step"] - (rows[i - 1]["step"] if i else 0) for i in measured]
    return {
        "cells_per_s": sum(cells[i] for i in measured) / max(secs, 1e-9),
        "epoch_s": epoch_s,
        "measured_epochs": measured,
        "cells_per_epoch": round(cells[-1]) if cells else 0,
        "steps_per_epoch": int(steps[-1]) if steps else 0,
        "step_ms": 1e3 * step_s / max(sum(steps), 1),  # per rank: the slowest rank's sums when distributed
        "data_frac": data_s / max(data_s + step_s, 1e-9),
        "idle_s": total("perf/idle_s"),
        "read_s": total("perf/read_s"),
        "world_size": int(rows[-1].get("world_size", 1) or 1),
        "train_elbo": rows[-1].get("train/elbo"),
    }


def train_command(args: argparse.Namespace, launcher: str, workers: int, batch_size: int, store: Path,
                  run: Path) -> list[str]:  # fmt: skip
    common = [
        "train", str(store), "--out", str(run), "--batch-key", "batch", "--epochs", str(args.epochs),
        "--batch-size", str(batch_size), "--seed", str(SEED), "--no-progress", "--overwrite",
        "--set", f"train.num_threads={args.threads}", "--set", f"data.loader_threads={args.loader_threads}",
        "--set", f"train.check_val_every_n_epoch={NEVER}",
    ]  # fmt: skip
    if launcher == "torchrun":
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        return [torchrun, "--standalone", "--nproc_per_node", str(workers), "-m", "scvi_scale", *common]
    if launcher == "ray":
        # Ray's storage in the work folder, one per run: Ray Train names the experiment after the run directory
        # (RUN.name) and, under its default storage (~/ray_results), a new run whose directory has the same name
        # as an earlier one resumes from that earlier run's checkpoint
        common += ["--storage-path", str(run.parent.parent / "ray_storage" / run.name)]
    return [sys.executable, "-m", "scvi_scale", *common, "--workers", str(workers), "--launcher", launcher]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in RAY_ENV.items():
        env.setdefault(key, value)
    env["OMP_NUM_THREADS"] = str(threads)  # every launcher alike (torchrun would set 1, Ray its CPU share)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def train_record(args: argparse.Namespace, launcher: str, workers: int, batch_size: int, store: Path,
                 workdir: Path, rep: int) -> dict[str, Any]:  # fmt: skip
    tag = f"{launcher}_w{workers}_b{batch_size}_r{rep}"
    run = workdir / "runs" / tag
    logfile = workdir / "logs" / f"{tag}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    ray_storage = workdir / "ray_storage" / tag
    shutil.rmtree(ray_storage, ignore_errors=True)  # a rerun in the same work folder must not resume the last one
    cmd = train_command(args, launcher, workers, batch_size, store, run)
    rec: dict[str, Any] = {
        "bench": "dist",
        "part": "train",
        "launcher": launcher,
        "workers": workers,
        "batch_size": batch_size,
        "global_batch_size": workers * batch_size,
        "threads": args.threads,
        "loader_threads": args.loader_threads,
        "epochs": args.epochs,
        "load_avg_before": load_avg(),
    }
    log(f"train {tag}: {' '.join(cmd[-14:])}")
    t0 = time.perf_counter()
    with logfile.open("w") as fh:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=child_env(args.threads), stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=args.run_timeout)  # fmt: skip
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    rec.update(wall_s=wall, load_avg_after=load_avg(), returncode=rc)
    metrics = run / "metrics.csv"
    if rc != 0 or not metrics.exists():
        tail = logfile.read_text(errors="replace").strip().splitlines()[-15:]
        rec["error"] = "\n".join(tail) or f"exit {rc}, no output"
        rec["log"] = str(logfile)
        return rec
    rows = read_metrics(metrics)
    rec.update(summarize_rows(rows))
    rec["outside_epochs_s"] = wall - sum(rec["epoch_s"])
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(ray_storage, ignore_errors=True)
    return rec


# -- Ray alone (part 6) ------------------------------------------------------------------------------------------
def _noop_train(config: dict[str, Any]) -> None:
    import ray.train

    ray.train.report({"rank": ray.train.get_context().get_world_rank()})


def child_ray_bare(args: argparse.Namespace) -> dict[str, Any]:
    """ray.init -> TorchTrainer.fit of a function that only reports -> ray.shutdown, each timed (this process)."""
    t0 = time.perf_counter()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from scvi_scale.dist import launch

    import_s = time.perf_counter() - t0
    for key, value in {**RAY_ENV, **getattr(launch, "_RAY_ENV", {})}.items():  # the launcher's settings
        os.environ.setdefault(key, value)
    cpus = os.cpu_count() or 1
    t1 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)  # as the launcher starts it
    t2 = time.perf_counter()
    trainer = TorchTrainer(
        _noop_train,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(
            num_workers=args.noop_workers, resources_per_worker={"CPU": cpus / args.noop_workers}
        ),
        run_config=RunConfig(name="noop", storage_path=str(Path(args.workdir).resolve() / "ray_storage")),
    )
    trainer.fit()
    t3 = time.perf_counter()
    ray.shutdown()
    t4 = time.perf_counter()
    return {
        "import_s": import_s,
        "init_s": t2 - t1,
        "noop_fit_s": t3 - t2,
        "shutdown_s": t4 - t3,
        "init_to_shutdown_s": t4 - t1,
        "noop_workers": args.noop_workers,
        "ray": ray.__version__,
    }


def ray_bare_record(args: argparse.Namespace, workdir: Path, workers: int) -> dict[str, Any]:
    cmd = [sys.executable, str(SCRIPT), "--child", "ray-bare", "--noop-workers", str(workers),
           "--workdir", str(workdir)]  # fmt: skip
    rec: dict[str, Any] = {"bench": "dist", "part": "ray_bare", "load_avg_before": load_avg()}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(args.threads), capture_output=True, text=True,
                              timeout=args.run_timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {**rec, "error": "timeout"}
    rec["process_wall_s"] = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**rec, "error": proc.stderr.strip()[-2000:] or f"exit {proc.returncode}"}
    return {**rec, **json.loads(lines[-1]), "load_avg_after": load_avg()}


# -- driver ---------------------------------------------------------------------------------------------------------
def best_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if "cells_per_s" in r]
    if not ok:
        return {**records[-1], "repeats": len(records)}
    best = max(ok, key=lambda r: r["cells_per_s"])
    return {**best, "repeats": len(records), "cells_per_s_runs": [r.get("cells_per_s") for r in records]}


def ray_available() -> str | None:
    try:
        import ray.train  # noqa: F401
    except ImportError as err:
        return f"ray[train] is not importable ({err}); install the ray extra"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, default=40_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--batch-sizes", type=str, default="128,1024", help="per worker, comma-separated")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up if >= 2")
    p.add_argument("--launchers", type=str, default="local,ray,torchrun", help="comma-separated subset")
    p.add_argument("--workers", type=str, default="1,2", help="worker counts, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker")
    p.add_argument("--loader-threads", type=int, default=1, help="reader threads per worker (data.loader_threads)")
    p.add_argument("--repeats", type=int, default=1, help="run each training configuration N times, keep the best")
    p.add_argument("--allreduce-iters", type=int, default=50)
    p.add_argument("--loader-epochs", type=int, default=5, help="measured epochs of the loader-only part")
    p.add_argument("--real-data", type=str, default=str(ROOT.parent / "shared" / "data"),
                   help="folder of real .h5ad files for the store facts ('' to skip)")  # fmt: skip
    p.add_argument("--workdir", type=str, default=None, help="stores, logs and runs (default: a temporary folder)")
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds per training run")
    p.add_argument("--quick", action="store_true", help="tiny smoke size: 3,000 cells x 200 genes, 2 epochs")
    p.add_argument("--child", choices=["ray-bare"], help=argparse.SUPPRESS)
    p.add_argument("--noop-workers", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n_cells, args.n_genes, args.epochs, args.batch_sizes = 3_000, 200, 2, "128"
        args.allreduce_iters, args.loader_epochs = 10, 1
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.launchers = [x.strip() for x in args.launchers.split(",") if x.strip()]
    args.workers = sorted({int(w) for w in args.workers.split(",") if w})
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child == "ray-bare":
        emit(child_ray_bare(args))
        return
    import torch

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_dist_")) if own_workdir else Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ray_missing = ray_available() if "ray" in args.launchers else None
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    emit(
        {
            "bench": "dist",
            "header": True,
            **machine(),
            "uptime": uptime,
            "load_avg": load_avg(),
            "torch": torch.__version__,
            "quick": bool(args.quick),
            "n_cells": args.n_cells,
            "n_genes": args.n_genes,
            "epochs": args.epochs,
            "batch_sizes_per_worker": args.batch_sizes,
            "launchers": args.launchers,
            "workers": args.workers,
            "threads_per_worker": args.threads,
            "loader_threads_per_worker": args.loader_threads,
            "validation": "off (train.check_val_every_n_epoch beyond the run)",
            "workdir": str(workdir),
        }
    )
    try:
        run_parts(args, workdir, ray_missing)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def run_parts(args: argparse.Namespace, workdir: Path, ray_missing: str | None) -> None:
    store, built = build_bench_store(args.n_cells, args.n_genes, workdir)
    emit({"bench": "dist", "part": "store", "store": "bench", "path": str(store), **built, **store_facts(store)})
    if args.real_data:
        for h5ad in sorted(Path(args.real_data).glob("*.h5ad")):
            emit(real_store_record(h5ad, workdir))
    model = model_record(args.n_genes, N_BATCHES)
    emit(model)
    emit(allreduce_record(model["n_params"], args.allreduce_iters, workdir))
    for threads in (1, 2):
        emit(loader_record(store, threads, 1024, args.loader_epochs))

    launchers = list(args.launchers)
    if ray_missing and "ray" in launchers:
        emit({"bench": "dist", "part": "train", "launcher": "ray", "skipped": ray_missing})
        launchers.remove("ray")
    if "torchrun" in launchers and not shutil.which("torchrun", path=str(Path(sys.executable).parent)):
        emit({"bench": "dist", "part": "train", "launcher": "torchrun", "skipped": "no torchrun next to python"})
        launchers.remove("torchrun")
    results: dict[tuple[str, int, int], dict[str, Any]] = {}
    for bs in args.batch_sizes:
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for rep in range(args.repeats):  # interleaved, so a busy spell of the machine hits every configuration
            for launcher in launchers:
                for w in args.workers:
                    runs.setdefault((launcher, w), []).append(train_record(args, launcher, w, bs, store, workdir, rep))
        for (launcher, w), recs in runs.items():
            rec = best_of(recs)
            results[launcher, w, bs] = rec
            emit(rec)
    if "ray" in launchers:
        emit(ray_bare_record(args, workdir, max(args.workers)))
    summaries(args, launchers, results)


def summaries(args: argparse.Namespace, launchers: list[str], results: dict) -> None:
    def cps(launcher: str, w: int, bs: int) -> float | None:
        return results.get((launcher, w, bs), {}).get("cells_per_s")

    top = max(args.workers)
    if top < 2:
        return
    for bs in args.batch_sizes:
        single = cps("local", 1, bs)
        for launcher in launchers:
            one, many = cps(launcher, 1, bs), cps(launcher, top, bs)
            line = ratio_line("dist", "scaling_efficiency", many, top * one if one else None, None,
                              launcher=launcher, batch_size=bs, workers=top)  # fmt: skip
            line["speedup"] = many / one if many and one else None
            line["vs_single"] = many / (top * single) if many and single else None
            emit(line)
        if "ray" in launchers and "local" in launchers:
            for w in args.workers:
                emit(ratio_line("dist", "ray/local", cps("ray", w, bs), cps("local", w, bs), None,
                                batch_size=bs, workers=w))  # fmt: skip
                ray_rec, local_rec = results.get(("ray", w, bs), {}), results.get(("local", w, bs), {})
                if "outside_epochs_s" in ray_rec and "outside_epochs_s" in local_rec:
                    emit(
                        {
                            "bench": "dist",
                            "summary": "ray_overhead_s",
                            "batch_size": bs,
                            "workers": w,
                            "value": ray_rec["outside_epochs_s"] - local_rec["outside_epochs_s"],
                            "ray_outside_epochs_s": ray_rec["outside_epochs_s"],
                            "local_outside_epochs_s": local_rec["outside_epochs_s"],
                        }
                    )


if __name__ == "__main__":
    main()
