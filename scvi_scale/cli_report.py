"""The ``scvi-scale report`` subcommand: the model quality report (:func:`scvi_scale.report.build_report`)."""

from __future__ import annotations

import argparse
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="model quality report: held-out ELBO, marginal likelihood, integration metrics, plots",
        description="Held-out negative ELBO (the run's validation rows when STORE is its training data), "
        "importance-sampled marginal log-likelihood (as scvi-tools' get_marginal_ll), integration metrics from "
        "scib-metrics (batch correction and bio conservation, on a subsample), loss curves, a 2-D view coloured "
        "by batch and label and the per-stage training times, written to OUT as report.md, PNGs and report.json "
        "(every number). --side-by-side also trains scvi-tools on the same data and reports its numbers beside "
        "ours. Exit 2 on bad input (e.g. an unknown obs column).",
    )
    p.add_argument("run_dir", help="a run directory written by `scvi-scale train`")
    p.add_argument("data", metavar="STORE", help="the counts: .zarr/.tiledb store (path or URL) or .h5ad")
    p.add_argument("--out", required=True, help="report directory to write")
    p.add_argument("--labels-key", default=None, help="obs column of cell types (bio-conservation metrics)")
    p.add_argument("--batch-key", default=None, help="obs column of batches (default: the run's batch key)")
    p.add_argument("--max-cells", type=int, default=20_000, help="integration metrics on at most N cells")
    p.add_argument("--n-mc-samples", type=int, default=100, help="importance samples per cell for the marginal LL")
    p.add_argument("--max-ll-cells", type=int, default=2_000, help="marginal LL on at most N held-out cells")
    p.add_argument("--no-marginal-ll", action="store_true", help="skip the marginal log-likelihood")
    p.add_argument("--side-by-side", action="store_true", help="also train scvi-tools on the same data and compare")
    p.add_argument("--epochs", type=int, default=None, help="the peer's epochs (default: as many as the run)")
    p.add_argument("--view", choices=("auto", "umap", "pca"), default="auto", help="the 2-D view (auto: UMAP if any)")
    p.add_argument(
        "--metrics",
        choices=("auto", "scib", "own"),
        default="auto",
        help="integration metrics: scib-metrics (auto: when installed) or scvi-scale's own kNN/silhouette ones",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the subsamples and Monte Carlo draws")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run_command=_report)


def _report(args: argparse.Namespace) -> int:
    from scvi_scale.report.build import build_report

    report = build_report(
        args.run_dir,
        args.data,
        args.out,
        batch_key=args.batch_key,
        labels_key=args.labels_key,
        max_cells=args.max_cells,
        marginal_ll=not args.no_marginal_ll,
        n_mc_samples=args.n_mc_samples,
        max_ll_cells=args.max_ll_cells,
        side_by_side=args.side_by_side,
        epochs=args.epochs,
        seed=args.seed,
        view=args.view,
        use_scib={"auto": None, "scib": True, "own": False}[args.metrics],
        overwrite=args.overwrite,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    print(report)
    for note in report.notes:
        print(f"  {note}")
    print(f"report: {report.files['markdown']}  numbers: {report.files['json']}")
    return 0
