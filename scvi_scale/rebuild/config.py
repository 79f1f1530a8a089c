"""The nightly rebuild's config: inputs, store, run root, the training config tree and the publishing policy.

Frozen dataclasses loaded from YAML, checked as :mod:`scvi_scale.config` checks its tree (it builds the
sections): unknown keys and wrong types are errors that name the key. Relative local paths are taken relative
to the config file's folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from scvi_scale.config import Config, ConfigError, _build  # one builder for every typed config in the package

__all__ = ["IngestConfig", "PolicyConfig", "PrepareConfig", "RebuildConfig", "load_rebuild_config"]


@dataclass(frozen=True)
class IngestConfig:
    """How new inputs are converted and appended (the options of ``scvi-scale convert``/``append``)."""

    batch_per_file: bool = False  # the input's name is the batch (obs column policy.batch_key, default "batch")
    layer: str | None = None
    drop_empty_cells: bool = False
    var_names: Literal["gene_symbols", "gene_ids"] = "gene_symbols"
    genes: str = "union"  # gene space of the first conversion: union, intersection or a gene list file
    memory_mb: int = 1024

    def __post_init__(self) -> None:
        if self.memory_mb < 1:
            raise ConfigError(f"ingest.memory_mb must be >= 1; got {self.memory_mb}")


@dataclass(frozen=True)
class PrepareConfig:
    """Preparation statistics refreshed after every append (``scvi-scale prepare``)."""

    n_top_genes: int | None = 2000  # null: no HVG selection, train on every gene
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.n_top_genes is not None and self.n_top_genes < 1 or self.num_workers < 1:
            raise ConfigError("prepare.n_top_genes and prepare.num_workers must be >= 1")


@dataclass(frozen=True)
class PolicyConfig:
    """How to train, what to hold out, and when to refuse to publish."""

    warm_start: bool = True  # start from the last published model (new batches added by surgery)
    full_retrain: bool = False  # always train from scratch
    full_retrain_every: int | None = None  # a full retrain after this many versions in a row (warm ones between)
    warm_epochs: int | None = None  # epochs of a warm start (null: train.train.max_epochs)
    reselect_genes: bool = False  # a full retrain picks new HVGs (then the held-out ELBO gate cannot compare)
    holdout_fraction: float = 0.05  # cells held out for good, chosen by a hash of their id
    holdout_file: str | None = None  # and/or these cell ids (one a line)
    cell_id_key: str | None = None  # obs column of the stable cell id; null: the obs names
    max_eval_cells: int = 20_000  # held-out cells evaluated (the lowest hashes)
    max_elbo_worsening: float = 0.01  # refuse when held-out -ELBO grows by more than this fraction
    max_integration_drop: float = 0.02  # refuse when integration/total falls by more than this
    batch_key: str | None = None
    labels_key: str | None = None  # cell types for the integration score (batch mixing only without them)
    scib: bool | None = None  # integration metrics: scib-metrics when installed (null), or scvi-scale's own (false)
    embed_outputs: str = "latent"  # comma-separated: latent, latent_var, library
    embed_launcher: Literal["local", "ray"] = "local"  # ray: Ray tasks on the cluster (train.train.address)
    embed_workers: int = 1  # processes, or Ray tasks in flight
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"policy.holdout_fraction must be in [0, 1); got {self.holdout_fraction}")
        if self.holdout_fraction == 0.0 and self.holdout_file is None:
            raise ConfigError("policy: hold some cells out (holdout_fraction > 0 or a holdout_file) for the gate")
        if self.full_retrain_every is not None and self.full_retrain_every < 1:
            raise ConfigError(f"policy.full_retrain_every must be >= 1; got {self.full_retrain_every}")
        if self.warm_epochs is not None and self.warm_epochs < 1 or self.max_eval_cells < 10 or self.embed_workers < 1:
            raise ConfigError("policy.warm_epochs and embed_workers must be >= 1, and policy.max_eval_cells >= 10")
        for name in ("max_elbo_worsening", "max_integration_drop"):
            if math.isnan(getattr(self, name)):
                raise ConfigError(f"policy.{name} must be a number")


@dataclass(frozen=True)
class RebuildConfig:
    """The whole rebuild config (see ``deploy/atlas.example.yaml``)."""

    inputs: tuple[str, ...]
    store: str
    runs: str
    train: Config = field(default_factory=Config)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    device: str | None = None  # null: cuda when available, else cpu
    source: str | None = None  # the file it was read from

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": list(self.inputs),
            "store": self.store,
            "runs": self.runs,
            "train": self.train.to_dict(),
            "policy": _fields(self.policy),
            "ingest": _fields(self.ingest),
            "prepare": _fields(self.prepare),
            "device": self.device,
        }


def _fields(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}


_SECTIONS = {"policy": PolicyConfig, "ingest": IngestConfig, "prepare": PrepareConfig}
_KEYS = ("inputs", "store", "runs", "train", "device", *_SECTIONS)


def _local(value: str, base: Path | None) -> str:
    """A relative local path made relative to the config file's folder; URLs and absolute paths as they are."""
    if "://" in value or base is None or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _string(tree: dict[str, Any], key: str) -> str:
    value = tree.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a path (a non-empty string); got {value!r}")
    return value


def rebuild_config_from_dict(tree: Any, base: Path | None = None, source: str | None = None) -> RebuildConfig:
    """Build a :class:`RebuildConfig` from a parsed YAML mapping; ``base`` resolves relative paths."""
    if not isinstance(tree, dict):
        raise ConfigError(f"a rebuild config must be a mapping with keys {', '.join(_KEYS)}; got {tree!r}")
    unknown = sorted(set(tree) - set(_KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]} in the rebuild config; known: {', '.join(sorted(_KEYS))}")
    missing = [k for k in ("inputs", "store", "runs") if k not in tree]
    if missing:
        raise ConfigError(f"the rebuild config needs {', '.join(missing)}")
    inputs = tree["inputs"]
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) and i for i in inputs):
        raise ConfigError("inputs must be a path or URL, or a list of them (files, folders, s3://bucket/prefix)")
    store = _string(tree, "store")
    if "://" in store and not store.startswith("file://"):
        raise ConfigError(f"store must be a local Zarr path (appending works on local stores only); got {store}")
    try:
        train = _build(Config, tree.get("train") or {}, "train")
    except ConfigError as err:
        raise ConfigError(str(err)) from None
    sections = {name: _build(cls, tree.get(name) or {}, name) for name, cls in _SECTIONS.items()}
    policy = sections["policy"]
    if train.data.batch_key not in (None, policy.batch_key):
        raise ConfigError(
            f"train.data.batch_key={train.data.batch_key!r} differs from policy.batch_key={policy.batch_key!r}; "
            "set the batch key once, in policy"
        )
    if sections["ingest"].batch_per_file and policy.batch_key is None:
        raise ConfigError("ingest.batch_per_file names each input's batch: set policy.batch_key (e.g. batch)")
    device = tree.get("device")
    if device is not None and not isinstance(device, str):
        raise ConfigError(f"device must be cpu, cuda or null; got {device!r}")
    if policy.holdout_file is not None:
        policy = PolicyConfig(**{**_fields(policy), "holdout_file": _local(policy.holdout_file, base)})
    return RebuildConfig(
        inputs=tuple(_local(i, base) for i in inputs),
        store=_local(store.removeprefix("file://"), base),
        runs=_local(_string(tree, "runs"), base),
        train=train,
        policy=policy,
        ingest=sections["ingest"],
        prepare=sections["prepare"],
        device=device,
        source=source,
    )


def load_rebuild_config(path: str | Path) -> RebuildConfig:
    """Read a rebuild config from a YAML file (``scvi-scale rebuild --config FILE``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        tree = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {str(err).splitlines()[0]}") from None
    return rebuild_config_from_dict(tree, p.resolve().parent, str(p))
