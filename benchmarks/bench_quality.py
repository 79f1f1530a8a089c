"""Model quality against scvi-tools on the real data sets: held-out negative ELBO and scib-metrics total score.

For each data set in ``../shared/data`` (cellbench: 5 protocols; ifnb: ctrl/stim; Kang 2018: 8 donors) this
trains scvi-scale (``api.train``) and scvi-tools' ``SCVI`` with the same architecture (scvi-tools' defaults),
epochs, KL warm-up, seed, batch key and train/validation rows, then runs the quality report
(``scvi_scale.report.build_report(side_by_side=True)``): both models' numbers come from the same code on the
same held-out cells and the same integration subsample. One JSON line per data set (and seed) on stdout:

- ``neg_elbo_ours``/``neg_elbo_peer`` and ``elbo_ratio`` (target: ours <= peer * 1.005, ``elbo_met``);
- ``scib_total_ours``/``scib_total_peer`` and ``scib_ratio`` (target: ours >= peer, ``scib_met``);
- the batch and bio scores, the marginal log-likelihoods, training seconds of each.

Genes: the ``--n-top-genes`` highly variable genes (seurat_v3 on counts, batch-aware, our ``prepare``) of sets
with more; Kang's 1,287-gene panel is used whole.

    nice .venv/bin/python benchmarks/bench_quality.py > quality.jsonl
    .venv/bin/python benchmarks/bench_quality.py --quick        # CI smoke: a tiny synthetic set, 2 epochs
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {  # name -> (file, batch key, labels key, epochs)
    "cellbench": ("cellbench_lung_celllines_5batch.h5ad", "batch", "cell_type", 100),
    "ifnb": ("ifnb_pbmc_ctrl_stim_1k.h5ad", "batch", "cell_type", 100),
    "kang": ("kang18_pbmc_ctrl_8donors.h5ad", "batch", "cell_type", 20),
}
ELBO_TOLERANCE = 1.005


def _subset_genes(path: Path, n_top: int, batch_key: str, workdir: Path) -> tuple[Path, int]:
    """The data on its ``n_top`` highly variable genes (written to workdir), or the file itself when smaller."""
    import anndata

    from scvi_scale import api
    from scvi_scale.store.errors import InputError

    adata = anndata.read_h5ad(path)
    if adata.n_vars <= n_top:
        return path, adata.n_vars
    try:
        hvg = api.prepare(adata, n_top_genes=n_top, batch_key=batch_key).hvg_names
    except InputError:  # e.g. ifnb's CTRL batch: the loess fit is near-singular at scanpy's span 0.3
        hvg = api.prepare(adata, n_top_genes=n_top, batch_key=batch_key, span=0.5).hvg_names
    out = workdir / f"{path.stem}.hvg{n_top}.h5ad"
    adata[:, hvg].copy().write_h5ad(out)
    return out, len(hvg)


def run_one(name: str, path: Path, batch_key: str, labels_key: str, epochs: int, seed: int, args: Any) -> dict:
    from scvi_scale import api
    from scvi_scale.report import build_report

    workdir = Path(args.workdir)
    data, n_genes = _subset_genes(path, args.n_top_genes, batch_key, workdir)
    train = {"max_epochs": epochs, "n_epochs_kl_warmup": max(1, epochs // 2), "seed": seed, "progress": False,
             "num_threads": args.threads}  # fmt: skip
    t0 = time.perf_counter()
    run = api.train(data, workdir / f"{name}-s{seed}" / "run", data={"batch_key": batch_key}, train=train,
                    overwrite=True)  # fmt: skip
    ours_s = time.perf_counter() - t0
    report = build_report(
        run,
        data,
        workdir / f"{name}-s{seed}" / "report",
        labels_key=labels_key,
        side_by_side=True,
        epochs=epochs,
        n_mc_samples=args.n_mc_samples,
        max_ll_cells=args.max_ll_cells,
        max_cells=args.max_cells,
        view="pca",
        seed=seed,
        use_scib={"auto": None, "scib": True, "own": False}[args.metrics],
        overwrite=True,
    )
    n = report.numbers
    elbo_ratio = n["heldout/neg_elbo"] / n["peer/heldout/neg_elbo"]
    scib_ratio = n["integration/total"] / n["peer/integration/total"]
    return {
        "bench": "quality",
        "dataset": name,
        "seed": seed,
        "n_cells": int(api.open_counts(data).n_obs),
        "n_genes": n_genes,
        "epochs": epochs,
        "heldout_cells": int(n["heldout/n_cells"]),
        "neg_elbo_ours": n["heldout/neg_elbo"],
        "neg_elbo_peer": n["peer/heldout/neg_elbo"],
        "elbo_ratio": elbo_ratio,
        "elbo_target": f"ours <= peer * {ELBO_TOLERANCE}",
        "elbo_met": bool(elbo_ratio <= ELBO_TOLERANCE),
        "scib_total_ours": n["integration/total"],
        "scib_total_peer": n["peer/integration/total"],
        "scib_ratio": scib_ratio,
        "scib_target": "ours >= peer",
        "scib_met": bool(scib_ratio >= 1.0),
        "scib_metrics": bool(n["integration/uses_scib_metrics"]),
        "batch_ours": n["integration/batch"],
        "batch_peer": n["peer/integration/batch"],
        "bio_ours": n["integration/bio"],
        "bio_peer": n["peer/integration/bio"],
        "marginal_ll_ours": n.get("marginal_ll"),
        "marginal_ll_peer": n.get("peer/marginal_ll"),
        "train_s_ours": ours_s,
        "train_s_peer": n["peer/train_s"],
        "report": str(report.out),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: " + ", ".join(DATASETS))
    p.add_argument("--seeds", default="0", help="comma-separated seeds (one line per data set and seed)")
    p.add_argument("--epochs", type=int, default=None, help="override every data set's epochs (100/100/20)")
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--n-mc-samples", type=int, default=100, help="importance samples per cell (marginal LL)")
    p.add_argument("--max-ll-cells", type=int, default=500)
    p.add_argument("--max-cells", type=int, default=20_000, help="integration metrics on at most N cells")
    p.add_argument(
        "--metrics",
        choices=("auto", "scib", "own"),
        default="auto",
        help="integration metrics: scib-metrics (auto: when installed) or our own (fallback)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads for both implementations")
    p.add_argument("--workdir", default=None, help="where runs and reports go (default: a temporary directory)")
    p.add_argument("--quick", action="store_true", help="CI smoke: a 600-cell synthetic set, 2 epochs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_quality_")
        args.workdir = tmp.name
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    versions = {p: version(p) for p in ("torch", "scvi-tools", "scib-metrics")}
    emit({"bench": "quality", "header": True, **machine(), **versions, "threads": args.threads})
    jobs = []
    if args.quick:
        from scvi_scale.datasets.synthetic import SyntheticSpec, write_h5ad

        path = write_h5ad(SyntheticSpec(n_cells=600, n_genes=200, n_batches=3, n_cell_types=4, seed=7),
                          Path(args.workdir) / "synthetic.h5ad")  # fmt: skip
        jobs.append(("synthetic", path, "batch", "cell_type", args.epochs or 2))
    else:
        for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            file, batch_key, labels_key, epochs = DATASETS[name]
            jobs.append((name, SHARED / file, batch_key, labels_key, args.epochs or epochs))
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, path, batch_key, labels_key, epochs in jobs:
            with contextlib.redirect_stdout(sys.stderr):  # scvi-tools and Lightning print; stdout is JSON only
                record = run_one(name, path, batch_key, labels_key, epochs, seed, args)
            emit(record)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
