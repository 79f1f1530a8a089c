"""Model quality with the block-shuffled loader: held-out ELBO against fully random in-memory minibatches.

For every ``.h5ad`` in ``--data-dir`` (default ``../shared/data``; raw counts in ``X``, batch column
``--batch-key``), the file is converted to a Zarr store and trained with :func:`scvi_scale.api.train`, the
same config, seed, split and epochs in every run, as:

``memory``
    ``data.loader="memory"`` on the ``.h5ad``: random minibatches from a permutation of all training cells
    (what scvi-tools does); the reference.
``block``
    ``data.loader="block"`` on the store with the default block size and shuffle buffer (what ``train`` uses
    for an on-disk store). On data this small one buffer may hold the whole split (``buffers_per_epoch`` says
    so), and the shuffle is then as random as ``memory``'s.
``block-small``
    ``data.loader="block"`` with ``data.block_size=16`` and ``data.buffer_blocks=16``: 256-cell shuffle buffers,
    so every minibatch mixes at most 16 runs of 16 consecutive stored cells. Harsher than the defaults on an
    atlas (128 blocks a buffer): the stress case for block sampling.
``memory-seed+1``
    ``memory`` with ``train.seed`` + 1 (same split: ``data.shuffle_seed`` is fixed): how much the held-out ELBO
    moves with the seed alone, the noise floor for reading the other differences.

Every run trains ``--epochs`` epochs (no early stopping, no per-epoch validation, one torch thread; KL warm-up
over ``--kl-warmup-epochs`` so the weight reaches 1 before the end). The held-out ELBO is then
:func:`scvi_scale.api.evaluate` on the validation rows of the run's ``split.npz`` (identical in every run;
checked), read from the ``.h5ad`` in memory, averaged over ``--eval-draws`` draws of the latent noise with the
same seeds for every run. Lower is better (negative ELBO per cell, scvi-tools' ``elbo_validation``).

One JSON line per run; per data set one summary per loader: ``rel_diff = (elbo - elbo_memory) / elbo_memory``
(positive: worse than in memory) against the target ``|rel_diff| <= 0.005``. ``entropy_ratio`` is the mean
per-minibatch entropy of the batch labels over that of i.i.d. minibatches, from the sampler's epoch-0 plan.

``--quick`` trains 2 epochs on a synthetic 2,000-cell x 200-gene ``.h5ad`` (rows sorted by batch) for the CI
smoke test; its differences mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _common import emit, machine

ROOT = Path(__file__).resolve().parents[1]
TARGET_REL = 0.005
RUNS = ("memory", "block", "block-small", "memory-seed+1")


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    with contextlib.redirect_stdout(sys.stderr):
        yield


def entropy(labels: np.ndarray, n: int) -> float:
    p = np.bincount(labels, minlength=n) / max(labels.size, 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def plan_stats(store: Any, codes: np.ndarray, train_rows: np.ndarray, data: dict, seed: int) -> dict[str, Any]:
    """Buffers per epoch and minibatch batch-label entropy over i.i.d. for the block loader's epoch-0 plan."""
    from scvi_scale.data.prefetch import StoreLoader

    loader = StoreLoader(
        store, codes, train_rows, data["batch_size"], block_size=data.get("block_size"),
        buffer_blocks=data.get("buffer_blocks", 128), seed=seed,
    )  # fmt: skip
    loader.set_epoch(0)
    batches = list(loader.sampler)
    n = int(codes.max()) + 1
    ours = np.mean([entropy(codes[b], n) for b in batches])
    rng = np.random.default_rng(seed + 1)
    perm = codes[train_rows][rng.permutation(train_rows.size)]
    cuts = np.cumsum([0, *[b.size for b in batches]])
    iid = np.mean([entropy(perm[a:b], n) for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
    return {
        "block_size": loader.block_size,
        "buffer_blocks": loader.sampler.buffer_blocks,
        "buffers_per_epoch": len(loader.sampler.plan().pieces),
        "entropy_ratio": float(ours / iid) if iid > 0 else None,
    }


def held_out(run: Any, adata_val: Any, draws: int) -> dict[str, float]:
    """``api.evaluate`` averaged over ``draws`` seeded draws of the latent noise (same seeds for every run)."""
    import torch

    from scvi_scale import api

    vals = []
    for d in range(draws):
        torch.manual_seed(10_000 + d)
        vals.append(api.evaluate(run, adata_val))
    out = {k: float(np.mean([v[k] for v in vals])) for k in ("elbo", "reconstruction_loss", "kl_local")}
    out["elbo_draws_sd"] = float(np.std([v["elbo"] for v in vals]))
    out["n_val"] = int(vals[0]["n_cells"])
    return out


def run_dataset(name: str, h5ad: Path, args: argparse.Namespace, work: Path) -> None:
    import anndata

    from scvi_scale import api
    from scvi_scale.store.convert import convert

    zarr_path = work / f"{name}.zarr"
    with stdout_to_stderr():
        store = convert([h5ad], zarr_path, batch_key=args.batch_key, progress=False, overwrite=True)
    adata = anndata.read_h5ad(h5ad)
    base_data = {"batch_key": args.batch_key, "batch_size": args.batch_size, "shuffle_seed": args.seed}
    train = {
        "max_epochs": args.epochs,
        "progress": False,
        "check_val_every_n_epoch": 10**9,  # no per-epoch validation: only the final held-out ELBO is compared
        "n_epochs_kl_warmup": args.kl_warmup_epochs,
        "num_threads": args.torch_threads,
    }
    configs = {
        "memory": (h5ad, {"loader": "memory"}, args.seed),
        "block": (zarr_path, {"loader": "block"}, args.seed),
        "block-small": (zarr_path, {"loader": "block", "block_size": 16, "buffer_blocks": 16}, args.seed),
        "memory-seed+1": (h5ad, {"loader": "memory"}, args.seed + 1),
    }
    results: dict[str, dict] = {}
    val_ref = None
    for label in args.runs:
        source, data_over, seed = configs[label]
        data = {**base_data, **data_over}
        out = work / f"run_{name}_{label}"
        t0 = time.perf_counter()
        with stdout_to_stderr():
            run = api.train(str(source), out, data=data, train={**train, "seed": seed}, overwrite=True)
        seconds = time.perf_counter() - t0
        split = np.load(out / "split.npz")
        train_rows, val_rows = split["train"], split["validation"]
        if val_ref is None:
            val_ref = val_rows
        elif not np.array_equal(val_ref, val_rows):
            raise RuntimeError(f"{name}: run {label} has another validation split than the first run")
        rec: dict[str, Any] = {"bench": "loader_quality", "dataset": name, "run": label, "seed": seed}
        rec.update({k: v for k, v in data_over.items() if k != "loader"} | {"loader": data["loader"]})
        if data["loader"] == "block":
            codes, _ = store.batch_codes(args.batch_key)
            rec.update(plan_stats(store, codes, train_rows, data, seed))
        rec.update(held_out(run, adata[val_rows].copy(), args.eval_draws))
        hist = run.fit_result.history if run.fit_result is not None else []
        rec.update(
            {
                "epochs": len(hist),
                "train_elbo_last": float(hist[-1]["train/elbo"]) if hist else None,
                "kl_weight_last": float(hist[-1]["kl_weight"]) if hist else None,
                "seconds": seconds,
                "cells_per_s": float(np.mean([h["perf/cells_per_s"] for h in hist[1:] or hist])),
                "n_train": int(train_rows.size),
            }
        )
        results[label] = rec
        emit(rec)
    ref = results.get("memory")
    for label, rec in results.items():
        if label == "memory" or ref is None:
            continue
        rel = (rec["elbo"] - ref["elbo"]) / abs(ref["elbo"])
        emit(
            {
                "bench": "loader_quality",
                "summary": f"{label}/memory",
                "dataset": name,
                "elbo": rec["elbo"],
                "elbo_memory": ref["elbo"],
                "rel_diff": rel,
                "ratio": rec["elbo"] / ref["elbo"],
                "target": TARGET_REL,
                "met": bool(abs(rel) <= TARGET_REL) if label.startswith("block") else None,
            }
        )


def quick_dataset(work: Path) -> Path:
    """A tiny synthetic ``.h5ad``, rows sorted by batch (the worst case for block sampling)."""
    from scvi_scale.datasets.synthetic import SyntheticSpec, make_anndata

    adata = make_anndata(SyntheticSpec(n_cells=2_000, n_genes=200, n_batches=4, seed=0))
    adata = adata[np.argsort(adata.obs["batch"].cat.codes.to_numpy(), kind="stable")].copy()
    path = work / "synthetic_quick.h5ad"
    adata.write_h5ad(path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data", help="the .h5ad files")
    p.add_argument("--datasets", default="", help="comma-separated file stems (default: every .h5ad)")
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--kl-warmup-epochs", type=int, default=None, help="default: half of --epochs")
    p.add_argument("--batch-size", type=int, default=128, help="scvi-tools' default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-draws", type=int, default=20, help="latent noise draws averaged per held-out ELBO")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--workdir", type=Path, default=None, help="stores and run directories (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="2 epochs on a synthetic 2,000 x 200 .h5ad")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.eval_draws = 2, 2
    if args.kl_warmup_epochs is None:
        args.kl_warmup_epochs = max(1, args.epochs // 2)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(args.runs) - set(RUNS)
    if unknown or "memory" not in args.runs:
        p.error(f"--runs must include memory and be a subset of {', '.join(RUNS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_loader_quality_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.quick:
            files = [quick_dataset(work)]
        else:
            wanted = {s.strip() for s in args.datasets.split(",") if s.strip()}
            files = [f for f in sorted(args.data_dir.glob("*.h5ad")) if not wanted or f.stem in wanted]
            if not files:
                raise SystemExit(f"no .h5ad files in {args.data_dir}")
        emit(
            {
                "bench": "loader_quality",
                "header": True,
                "torch": torch.__version__,
                **machine(),
                "quick": bool(args.quick),
                "datasets": [f.stem for f in files],
                "epochs": args.epochs,
                "kl_warmup_epochs": args.kl_warmup_epochs,
                "batch_size": args.batch_size,
                "seed": args.seed,
                "eval_draws": args.eval_draws,
                "torch_threads": args.torch_threads,
                "runs": args.runs,
            }
        )
        for f in files:
            run_dataset(f.stem, f, args, work)
    emit({"bench": "loader_quality", "done": True, "load_avg_1m": machine()["load_avg_1m"]})


if __name__ == "__main__":
    main()
