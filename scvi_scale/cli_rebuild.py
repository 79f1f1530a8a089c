"""The ``scvi-scale rebuild`` subcommand: one nightly atlas rebuild (:func:`scvi_scale.rebuild.rebuild`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rebuild",
        help="nightly atlas rebuild: ingest new inputs, retrain, gate, re-embed, publish a version",
        description="Ingest inputs not yet in the store (local files/folders or s3:// prefixes), refresh the "
        "preparation statistics, train (warm start from the latest version with new batches added, or a full "
        "retrain by policy), evaluate on a fixed held-out set, refuse to publish a worse model, re-embed the "
        "store and publish RUNS/versions/vNNNN with RUNS/latest written last. A killed run resumes when rerun; "
        "with no new inputs nothing is done. Exit 0: published or nothing to do; 1: refused by the gate; "
        "2: bad config or input. See deploy/atlas.example.yaml.",
    )
    p.add_argument("--config", required=True, help="the rebuild config (YAML)")
    p.add_argument("--dry-run", action="store_true", help="check the config and print it; touch no data")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run_command=_rebuild)


def _rebuild(args: argparse.Namespace) -> int:
    from scvi_scale.rebuild import load_rebuild_config, rebuild

    cfg = load_rebuild_config(args.config)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2, default=str))
        print(f"config OK: {args.config}", file=sys.stderr)
        return 0
    logging.getLogger("scvi_scale.rebuild").setLevel(logging.INFO)  # the steps are what an operator reads
    result = rebuild(cfg, progress=not args.no_progress and sys.stderr.isatty())
    print(f"{result.status}: {result.message}")
    return 1 if result.status == "refused" else 0
