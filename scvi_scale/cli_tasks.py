"""The analysis subcommands ``normalize``, ``de`` and ``sample``: thin layers over :mod:`scvi_scale.analysis`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scvi_scale.store.errors import InputError


def _delta(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (or none, to estimate it)") from None


def _library_size(text: str) -> float | str:
    if text == "latent":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'latent'") from None


def _genes(args: argparse.Namespace) -> list[str] | None:
    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else []
    if args.genes_file:
        genes += [line.strip() for line in Path(args.genes_file).read_text().splitlines() if line.strip()]
    return genes or None


def _where(items: list[str]) -> dict[str, list[str]] | None:
    """``COL=VALUE`` pairs (repeatable; a column given twice accepts either value) as a subset dict."""
    out: dict[str, list[str]] = {}
    for item in items:
        column, sep, value = item.partition("=")
        if not sep or not column:
            raise InputError(f"--where {item!r}: expected COLUMN=VALUE, e.g. --where cell_type=B")
        out.setdefault(column, []).append(value)
    return out or None


def _add_common(p: argparse.ArgumentParser, genes: bool = True) -> None:
    p.add_argument("run_dir", help="a run directory (scvi-scale train)")
    p.add_argument("data", help="a .zarr/.tiledb store (path or URL) or an .h5ad file, with the run's genes")
    if genes:
        p.add_argument("--genes", help="comma-separated gene names (default: all of the model's genes)")
        p.add_argument("--genes-file", help="a text file with one gene name per line")
    p.add_argument("--batch-size", type=int, default=1024, help="cells per forward pass (default 1024)")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "normalize",
        help="batch-corrected normalized expression (counts per 10k), written into the store",
        description="Normalized expression of every cell, as scvi-tools' get_normalized_expression: px_scale x "
        "library size, decoded with --transform-batch. Into a .zarr/.tiledb store it is written as "
        "obsm/<key> (cells x genes, float32) region by region; a killed run resumes when rerun. With --out, a "
        "CSV (cells x genes) is written instead.",
    )
    _add_common(p)
    p.add_argument("--transform-batch", action="append", default=[], metavar="BATCH",
                   help="batch to condition on (repeatable: the mean over them; default: each cell's own)")  # fmt: skip
    p.add_argument("--library-size", type=_library_size, default=1e4,
                   help="library size to scale to (default 1e4), or 'latent' (each cell's own)")  # fmt: skip
    p.add_argument("--n-samples", type=int, default=1, help="posterior draws of z per cell, averaged (default 1)")
    p.add_argument("--key", default="scvi_normalized", help="obsm key in the store (default scvi_normalized)")
    p.add_argument("--out", help="write a CSV here instead of writing into the store")
    p.add_argument("--region-rows", type=int, help="rows per region (default: at most 32 MiB of output)")
    p.add_argument("--launcher", choices=["local", "ray"], default="local", help="local processes or Ray tasks")
    p.add_argument("--workers", type=int, default=1, help="worker processes, or Ray tasks in flight (default 1)")
    p.add_argument("--address", help="Ray cluster: auto, or ray://HEAD:10001 (default: start a local Ray)")
    p.add_argument("--threads", type=int, help="torch threads per worker")
    p.set_defaults(run_command=_normalize)

    p = sub.add_parser(
        "de",
        help="differential expression between two groups of cells (scvi-tools' vanilla or change mode)",
        description="Per-gene differential expression of GROUPBY == GROUP1 against GROUP2 (default: all other "
        "cells), as scvi-tools' differential_expression; only the groups' cells are read. Prints the top genes; "
        "--out writes the whole table as CSV.",
    )
    _add_common(p, genes=False)
    p.add_argument("--groupby", required=True, help="obs column holding the groups")
    p.add_argument("--group1", required=True, help="the value of the first group")
    p.add_argument("--group2", help="the value of the second group (default: every other cell)")
    p.add_argument("--where", action="append", default=[], metavar="COL=VALUE",
                   help="restrict both groups, e.g. --where cell_type='CD14 Mono' (repeatable)")  # fmt: skip
    p.add_argument("--mode", choices=["vanilla", "change"], default="vanilla", help="default vanilla")
    p.add_argument("--delta", type=_delta, default=0.25, help="change mode: LFC threshold (default 0.25; none: fit)")
    p.add_argument("--batch-correction", action="store_true",
                   help="condition every cell on each batch in turn (default: the observed batches)")  # fmt: skip
    p.add_argument("--n-samples", type=int, default=5000, help="scale samples per group (default 5000)")
    p.add_argument("--fdr", type=float, default=0.05, help="change mode: target FDR of the is_de flag (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=10, help="genes to print (default 10)")
    p.add_argument("--out", help="write the table here (CSV)")
    p.set_defaults(run_command=_de)

    p = sub.add_parser(
        "sample",
        help="posterior predictive counts for a subset of cells (an .npy array)",
        description="Draw counts from the posterior predictive of the chosen cells (scvi-tools' "
        "posterior_predictive_sample) and save them as a float32 .npy array: cells x genes, or cells x genes x "
        "samples with --n-samples > 1.",
    )
    _add_common(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--cells", help="comma-separated row numbers, e.g. 0,15,200")
    group.add_argument("--where", action="append", metavar="COL=VALUE", help="cells with these obs values")
    p.add_argument("--n-samples", type=int, default=1, help="draws per cell (default 1)")
    p.add_argument("--transform-batch", help="batch to condition on (default: each cell's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the .npy file to write")
    p.set_defaults(run_command=_sample)


def _normalize(args: argparse.Namespace) -> int:
    from scvi_scale import analysis

    common: dict[str, Any] = dict(
        genes=_genes(args),
        transform_batch=args.transform_batch or None,
        library_size=args.library_size,
        n_samples=args.n_samples,
        batch_size=args.batch_size,
        region_rows=args.region_rows,  # the draws are seeded per region: the same rows, the same numbers
        device=args.device,
        progress=not args.no_progress,
    )
    if args.out is not None:
        frame = analysis.normalized_expression(args.run_dir, args.data, write=False, **common)
        frame.to_csv(args.out)
        print(f"wrote {args.out}: {frame.shape[0]} cells x {frame.shape[1]} genes")
        return 0
    if args.data.rstrip("/").lower().endswith(".h5ad"):
        raise InputError(f"{args.data}: normalized expression is written into .zarr/.tiledb stores; pass --out X.csv")
    summary = analysis.normalized_expression(
        args.run_dir, args.data, out_key=args.key, launcher=args.launcher,
        workers=args.workers, address=args.address, threads=args.threads, **common,
    )  # fmt: skip
    print(summary)
    return 0 if summary.complete else 1


def _de(args: argparse.Namespace) -> int:
    import pandas as pd

    from scvi_scale import analysis

    table = analysis.differential_expression(
        args.run_dir, args.data, args.groupby, args.group1, args.group2, mode=args.mode, delta=args.delta,
        subset=_where(args.where), batch_correction=args.batch_correction, n_samples_overall=args.n_samples,
        fdr_target=args.fdr, seed=args.seed, batch_size=args.batch_size, device=args.device,
        progress=not args.no_progress,
    )  # fmt: skip
    if args.out is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index_label="gene")
    comparison = table["comparison"].iloc[0]
    shown = ["proba_m1", "bayes_factor"] if args.mode == "vanilla" else ["proba_de", "lfc_mean", "bayes_factor"]
    shown += ["scale1", "scale2"]
    print(f"{comparison}: {len(table)} genes, {args.mode} mode; top {min(args.top, len(table))}:")
    with pd.option_context("display.width", 120, "display.max_columns", 10):
        print(table[shown].head(args.top).to_string(float_format=lambda v: f"{v:.4g}"))
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import numpy as np

    from scvi_scale import analysis

    if args.cells is not None:
        try:
            cells: Any = [int(c) for c in args.cells.split(",") if c.strip()]
        except ValueError:
            raise InputError(f"--cells {args.cells!r}: expected comma-separated row numbers, e.g. 0,15,200") from None
    else:
        cells = _where(args.where)
    counts = analysis.posterior_predictive_sample(
        args.run_dir, args.data, cells, args.n_samples, genes=_genes(args), transform_batch=args.transform_batch,
        seed=args.seed, batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, counts)
    print(f"wrote {out}: counts of shape {tuple(counts.shape)}")
    return 0
