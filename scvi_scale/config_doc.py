"""The config reference (``docs/config.md``), generated from the config dataclasses so that it cannot drift.

Each section of :class:`~scvi_scale.config.Config` becomes a table of its fields: name, type, default and the
description, taken from the comments beside or above the field in its dataclass (or, for a field with none, from
:data:`NOTES`). Regenerate with::

    python -m scvi_scale.config_doc docs/config.md

``tests/api/test_config_doc.py`` fails when the file and the dataclasses disagree.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

from scvi_scale.config import Config

REGENERATE = "python -m scvi_scale.config_doc docs/config.md"

# What a field means when its dataclass has no comment for it (a comment there wins). The model's fields carry
# scvi-tools' SCVI argument names, and these are scvi-tools' meanings.
NOTES = {
    "model.n_hidden": "nodes per hidden layer",
    "model.n_latent": "dimensionality of the latent space (the width of `obsm['X_scvi']`)",
    "model.n_layers": "hidden layers in the encoder and the decoder",
    "model.dropout_rate": "dropout rate of the encoder's hidden layers",
    "model.dispersion": "inverse dispersion of the negative binomial: per gene, gene and batch, or gene and cell",
    "model.gene_likelihood": "likelihood of the counts: zero-inflated negative binomial, negative binomial or Poisson",
    "model.latent_distribution": "`normal`, or `ln` (logistic normal: a softmax of a normal draw)",
    "model.use_observed_lib_size": "use each cell's observed total count as its library size; false: a latent "
    "library with a per-batch log-normal prior",
    "model.encode_covariates": "also feed the batch to the encoder",
    "model.deeply_inject_covariates": "feed the batch to every hidden layer, not only the first",
    "model.use_batch_norm": "where to use batch norm",
    "model.use_layer_norm": "where to use layer norm",
    "model.log_variational": "the encoder sees `log1p` of the counts",
    "data.batch_key": "obs column of the batch (the covariate the model corrects for); null: one batch",
    "data.layer": "AnnData layer holding the raw counts; null: `X`",
    "data.drop_empty_cells": "drop cells with no counts instead of stopping with an error",
    "data.batch_size": "cells per minibatch (per worker in data-parallel runs)",
    "data.train_size": "fraction of the cells trained on; the rest validate (1.0: no validation)",
    "train.lr": "Adam's learning rate",
    "train.eps": "Adam's eps (scvi-tools uses 0.01)",
    "train.weight_decay": "Adam's weight decay",
    "train.n_epochs_kl_warmup": "epochs over which the KL weight rises from `min_kl_weight` to `max_kl_weight`",
    "train.n_steps_kl_warmup": "the same warm-up counted in steps (used instead of epochs when set)",
    "train.min_kl_weight": "KL weight at the start of the warm-up",
    "train.max_kl_weight": "KL weight at the end of the warm-up",
    "train.early_stopping": "stop when the validation ELBO has not improved for `early_stopping_patience` checks",
    "train.early_stopping_patience": "validation checks without improvement before stopping",
    "train.early_stopping_min_delta": "smallest decrease of the validation ELBO that counts as an improvement",
    "train.check_val_every_n_epoch": "validate every this many epochs",
    "train.checkpoint_every_n_epochs": "write `checkpoints/last.pt` every this many epochs (and at the end)",
    "train.seed": "seed of the initial weights, the train/validation split and the minibatch order",
    "train.progress": "show a progress bar (terminal or notebook)",
    "train.workers": "training processes (data-parallel when more than 1)",
    "train.gpus_per_worker": "Ray: GPUs per worker (0: CPU)",
}

_SECTIONS = (
    ("model", "scvi_scale.model.config.ModelConfig"),
    ("data", "scvi_scale.config.DataConfig"),
    ("train", "scvi_scale.config.TrainConfig"),
)


def field_comments(cls: type) -> dict[str, str]:
    """The comment beside each field of a dataclass, with the comment lines just above it before it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    out: dict[str, str] = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        beside = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments]
        text = " ".join(part for part in [*above, *beside] if part and not part.startswith("fmt:"))
        out[node.target.id] = text
    return out


def type_name(tp: Any) -> str:
    """A field's type as a reader writes it in YAML terms: ``int``, ``int or null``, ``"a" | "b"``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(rest) + (" or null" if type(None) in args else "")
    if typing.get_origin(tp) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    return getattr(tp, "__name__", str(tp))


def yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _section(name: str, dotted: str) -> list[str]:
    module, _, cls_name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    summary = inspect.getdoc(cls) or ""
    out = [f"## `{name}`", "", summary.split("\n\n")[0].replace("\n", " "), ""]
    out += ["| key | type | default | what |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        what = comments.get(f.name) or NOTES.get(f"{name}.{f.name}", "")
        what = what.replace("|", "\\|")
        out.append(f"| `{name}.{f.name}` | {type_name(hints[f.name])} | `{yaml_value(default)}` | {what} |")
    return [*out, ""]


def render() -> str:
    """The whole reference, as markdown."""
    out = [
        "# Configuration reference",
        "",
        f"<!-- generated from the config dataclasses by `{REGENERATE}`; do not edit by hand -->",
        "",
        "One config tree with three sections, the same for the command line and Python. Set entries in a YAML file",
        "(`scvi-scale train --config cfg.yaml`, `ss.train(..., config='cfg.yaml')`), one by one",
        "(`--set model.n_latent=20`, `ss.train(..., overrides=['model.n_latent=20'])`) or by section",
        "(`ss.train(..., model={'n_latent': 20})`). Unknown keys and values of the wrong type are errors that name",
        "the key. Sizes that come from the data (genes, batches) are read from the data, never configured. Every",
        "run saves its resolved config as `config.yaml` and in its checkpoints.",
        "",
        "The defaults, as YAML (`ss.Config().to_yaml()`):",
        "",
        "```yaml",
        Config().to_yaml().rstrip(),
        "```",
        "",
    ]
    for name, dotted in _SECTIONS:
        out += _section(name, dotted)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Write the reference to the path given (or print it)."""
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if args:
        Path(args[0]).parent.mkdir(parents=True, exist_ok=True)
        Path(args[0]).write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
