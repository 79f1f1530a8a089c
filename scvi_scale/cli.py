"""The ``scvi-scale`` command: a thin layer over :mod:`scvi_scale.api` that owns what the user sees.

Each handler turns its arguments into one API call and prints the result's summary; the work, and every check
on the data, is the API's (so Python users get the same behaviour and the same messages).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from scvi_scale import __version__

EXIT_BAD_INPUT = 2

# modules that add subcommands: each has add_parsers(sub), and its parsers set_defaults(run_command=handler)
_COMMAND_MODULES = ("scvi_scale.cli_tasks", "scvi_scale.cli_report", "scvi_scale.cli_rebuild")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train scVI on raw counts (.h5ad file, or a .zarr/.tiledb store)",
        description="Train scVI on raw counts (X or --layer) and write a run directory.",
    )
    p.add_argument("data", help="raw integer counts: an .h5ad file or a .zarr/.tiledb store (path or URL)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--batch-key", help="obs column holding the batch (default: one batch)")
    p.add_argument("--layer", help="layer holding the raw counts (default: X)")
    p.add_argument("--epochs", type=int, help="epochs (default: scvi-tools' heuristic, 400 up to 20k cells)")
    p.add_argument("--batch-size", type=int, help="cells per minibatch (default 128)")
    p.add_argument("--seed", type=int, help="seed for weights, split and minibatch order (default 0)")
    p.add_argument("--config", help="YAML config file (sections: model, data, train)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. --set model.n_latent=20 (repeatable)",
    )
    p.add_argument("--drop-empty-cells", action="store_true", help="drop cells with zero counts instead of failing")
    p.add_argument("--resume", help="checkpoint file or run directory to continue from")
    p.add_argument("--overwrite", action="store_true", help="allow --out to exist and be replaced")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="validate the config and print it; touch no data")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    d = p.add_argument_group(
        "data-parallel training",
        "N workers train on disjoint shares of every epoch (re-drawn each epoch) and average gradients. "
        "Under torchrun, start the ranks with `torchrun --nproc_per_node N -m scvi_scale train ...` instead.",
    )
    d.add_argument("--launcher", choices=["local", "torchrun", "ray"], help="how workers start (default local)")
    d.add_argument("--workers", type=int, help="number of training processes (default 1)")
    d.add_argument("--gpus-per-worker", type=float, help="Ray: GPUs per worker (default 0: CPU)")
    d.add_argument("--address", help="Ray cluster: auto, or ray://HEAD:10001 (default: start a local Ray)")
    d.add_argument("--storage-path", help="Ray run storage for results and checkpoints (local path or s3://)")
    d.add_argument("--max-failures", type=int, help="Ray: restarts after a worker dies (default 2)")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    kinds = ".h5ad files, AnnData .zarr stores, 10x .h5 files or 10x matrix.mtx folders"
    for name, what in (
        ("convert", f"stream {kinds} into a new Zarr or TileDB count store"),
        ("append", f"append {kinds} to an existing Zarr store (existing rows keep their place)"),
    ):
        p = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + "; memory stays bounded.")
        p.add_argument("inputs", nargs="+", help=f"{kinds} (kinds may be mixed), stacked in the order given")
        p.add_argument(
            "--out" if name == "convert" else "--store",
            required=True,
            dest="out",
            help="the store: a local path (atlas.zarr, atlas.tiledb) or a URL (s3://bucket/atlas.zarr)"
            if name == "convert"
            else "the Zarr store (a directory, e.g. atlas.zarr)",
        )
        group = p.add_mutually_exclusive_group()
        group.add_argument("--batch-key", help="obs column every input must have (the batch)")
        group.add_argument("--batch-per-file", action="store_true", help="each input is its own batch (column 'batch')")
        p.add_argument(
            "--layer",
            help="AnnData inputs: layer holding the raw counts (default: X); TileDB-SOMA: the X layer "
            "(default: raw, then counts)",
        )
        p.add_argument(
            "--var-names",
            choices=["gene_symbols", "gene_ids"],
            default="gene_symbols",
            help="10x inputs: name genes by symbol (default) or by their unique ID",
        )
        if name == "convert":
            p.add_argument(
                "--genes", default="union", help="union (default), intersection, or a text file with one gene per line"
            )
            p.add_argument(
                "--format",
                choices=["zarr", "tiledb"],
                dest="store_format",
                help="store format (default: tiledb for an --out ending in .tiledb, else zarr)",
            )
            p.add_argument("--overwrite", action="store_true", help="replace an existing store")
        p.add_argument(
            "--memory",
            default="1G",
            help="memory budget for the writer's shard buffers and the row blocks, e.g. 256M (default 1G; about 30M "
            "of library buffers and ~0.3K per cell of metadata come on top)",
        )
        p.add_argument("--drop-empty-cells", action="store_true", help="drop cells with zero counts instead of failing")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _convert(args: argparse.Namespace) -> int:
    from scvi_scale import api

    common = dict(
        batch_key=args.batch_key,
        batch_per_file=args.batch_per_file,
        layer=args.layer,
        memory=args.memory,
        progress=not args.no_progress,
        drop_empty_cells=args.drop_empty_cells,
        var_names=args.var_names,
    )
    if args.command == "convert":
        store = api.convert(
            args.inputs, args.out, genes=args.genes, overwrite=args.overwrite, store_format=args.store_format, **common
        )
    else:
        store = api.append(args.out, args.inputs, **common)
    print(f"{store.source}: {store.n_obs} cells x {store.n_vars} genes")
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="select highly variable genes and library priors out of core; record them in the store",
        description="Compute per-gene statistics, highly variable genes (scanpy's seurat_v3 on counts, per batch "
        "with --batch-key) and per-batch library-size priors in passes over row blocks, and record them in the "
        "store: var columns (highly_variable, highly_variable_rank, means, variances, variances_norm) and a "
        "'prepare' metadata entry. `scvi-scale train` then trains on those genes (data.genes=auto).",
    )
    p.add_argument("store", help="a .zarr or .tiledb count store (path or URL)")
    p.add_argument("--n-top-genes", type=int, default=2000, help="genes to select (default 2000)")
    p.add_argument("--batch-key", help="obs column of the batch: genes ranked per batch, priors per batch")
    p.add_argument("--span", type=float, default=0.3, help="loess span of the mean-variance trend (default 0.3)")
    p.add_argument("--block-rows", type=int, default=16_384, help="rows read per task (default 16384)")
    p.add_argument("--workers", type=int, default=2, help="threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _prepare(args: argparse.Namespace) -> int:
    from scvi_scale import api

    result = api.prepare(
        args.store,
        args.n_top_genes,
        args.batch_key,
        span=args.span,
        block_rows=args.block_rows,
        num_workers=args.workers,
        progress=not args.no_progress,
        require_store=True,
    )
    print(api.prepare_summary(result))
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scvi-scale", description="Train scVI on atlases, faithful to scvi-tools.")
    parser.add_argument("--version", action="version", version=f"scvi-scale {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "demo",
        help="generate a synthetic atlas, train, embed and report (the main job)",
        description="Generate the built-in synthetic atlas, train scVI, embed every cell and write "
        "a report (loss curves, 2-D embedding coloured by batch and cell type, metrics JSON).",
    )
    p.add_argument("--out", default="scvi_scale_demo", help="output folder (default: ./scvi_scale_demo)")
    p.add_argument("--n-cells", type=int, default=10_000, help="cells in the synthetic atlas (default 10000)")
    p.add_argument("--n-genes", type=int, default=2_000, help="genes (default 2000)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--view",
        choices=["auto", "umap", "pca"],
        default="auto",
        help="2-D view of the embedding (auto: UMAP when umap-learn is installed, else PCA)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_train(sub)
    _add_convert(sub)
    _add_prepare(sub)
    p = sub.add_parser(
        "embed",
        help="write the latent embedding obsm['X_scvi'] for every cell (into the store, or a new .h5ad)",
        description="Embed every cell of DATA with a trained run. Without --out, DATA is a .zarr/.tiledb store "
        "(path or URL) and the embedding is written back into it (obsm/X_scvi, row-aligned with the counts) "
        "region by region; a killed run resumes when rerun, a finished one is not redone. With --out, write a "
        "new .h5ad with obsm['X_scvi'] (posterior mean) and obsm['X_scvi_var'].",
    )
    p.add_argument("run_dir")
    p.add_argument("data", help="a .zarr/.tiledb store (path or URL), or an .h5ad with --out")
    p.add_argument("--out", help="write a new .h5ad here instead of writing into the store")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument(
        "--outputs",
        default="latent",
        help="into the store: comma-separated latent (obsm/X_scvi), latent_var (X_scvi_var), library "
        "(X_scvi_library); default latent",
    )
    p.add_argument("--launcher", choices=["local", "ray"], default="local", help="local processes or Ray tasks")
    p.add_argument("--workers", type=int, default=1, help="worker processes, or Ray tasks in flight (default 1)")
    p.add_argument("--address", help="Ray cluster: auto, or ray://HEAD:10001 (default: start a local Ray)")
    p.add_argument("--region-rows", type=int, help="rows per region: a multiple of 16384 (default), or fewer")
    p.add_argument("--threads", type=int, help="torch threads per worker")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser(
        "evaluate",
        help="negative ELBO per cell of a trained run on data",
        description="Print the per-cell negative ELBO, reconstruction loss and KL (KL weight 1, eval "
        "mode), as scvi-tools' elbo_validation family defines them.",
    )
    p.add_argument("run_dir")
    p.add_argument("data")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: a table)")
    p.add_argument("--batch-size", type=int, default=1024)
    p = sub.add_parser("import-scvi-tools", help="turn a scvi-tools SCVI.save directory into a run directory")
    p.add_argument("scvi_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("export-scvi-tools", help="write a directory scvi.model.SCVI.load accepts")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    for module in _COMMAND_MODULES:  # each adds its subcommands with set_defaults(run_command=handler)
        importlib.import_module(module).add_parsers(sub)
    return parser


def _train(args: argparse.Namespace) -> int:
    from scvi_scale import api
    from scvi_scale.config import load_config  # the API's config loader (ss.load_config)

    overrides = list(args.set)
    for flag, key in (
        ("batch_key", "data.batch_key"),
        ("layer", "data.layer"),
        ("epochs", "train.max_epochs"),
        ("batch_size", "data.batch_size"),
        ("seed", "train.seed"),
        ("threads", "train.num_threads"),
        ("launcher", "train.launcher"),
        ("workers", "train.workers"),
        ("gpus_per_worker", "train.gpus_per_worker"),
        ("address", "train.address"),
        ("storage_path", "train.storage_path"),
        ("max_failures", "train.max_failures"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.drop_empty_cells:
        overrides.append("data.drop_empty_cells=true")
    if args.no_progress:
        overrides.append("train.progress=false")
    config = load_config(args.config, overrides)
    if args.dry_run:
        print(config.to_yaml(), end="")
        return 0
    resumed = {
        key: getattr(args, flag)
        for key, flag in (("max_epochs", "epochs"), ("workers", "workers"), ("launcher", "launcher"),
                          ("gpus_per_worker", "gpus_per_worker"), ("address", "address"),
                          ("storage_path", "storage_path"))
    }  # fmt: skip
    run = api.train(
        args.data,
        args.out,
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        train=resumed if args.resume else {},
    )
    if run.path is None or _is_main_rank():
        print(run)
    return 0


def _embed(args: argparse.Namespace) -> int:
    from scvi_scale import api

    if args.out is not None:
        adata = api.embed(args.run_dir, args.data, args.out, batch_size=args.batch_size, progress=not args.no_progress)
        print(f"wrote {args.out}: obsm['X_scvi'] {adata.obsm['X_scvi'].shape}")
        return 0
    summary = api.embed_to_store(
        args.run_dir,
        args.data,
        args.outputs,
        launcher=args.launcher,
        workers=args.workers,
        batch_size=args.batch_size,
        region_rows=args.region_rows,
        address=args.address,
        threads=args.threads,
        device=args.device,
        progress=not args.no_progress,
    )
    print(summary)
    return 0 if summary.complete else 1


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    from scvi_scale.config import ConfigError
    from scvi_scale.store.errors import InputError
    from scvi_scale.train.loop import TrainingInterrupted

    try:
        return _dispatch(args)
    except (InputError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingInterrupted as err:
        print(f"{err}", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from scvi_scale import api

    if getattr(args, "run_command", None) is not None:
        return args.run_command(args)
    if args.command == "train":
        return _train(args)
    if args.command in ("convert", "append"):
        return _convert(args)
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "demo":
        report = api.demo(
            args.out,
            n_cells=args.n_cells,
            n_genes=args.n_genes,
            epochs=args.epochs,
            seed=args.seed,
            progress=not args.no_progress,
            view=args.view,
        )
        print(json.dumps(report["summary"], indent=2))
        print(f"report: {os.path.join(args.out, 'report')}")
        return 0
    if args.command == "embed":
        return _embed(args)
    if args.command == "evaluate":
        result = api.evaluate(args.run_dir, args.data, batch_size=args.batch_size)
        print(json.dumps(result) if args.json else result)  # the Evaluation prints as a table
        return 0
    if args.command == "import-scvi-tools":
        print(api.import_scvi_tools(args.scvi_dir, args.out, overwrite=args.overwrite))
        return 0
    if args.command == "export-scvi-tools":
        print(f"wrote {api.export_scvi_tools(args.run_dir, args.out, overwrite=args.overwrite)}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
