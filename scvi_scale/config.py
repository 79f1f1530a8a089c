"""One typed config tree: frozen dataclasses, loaded from YAML with dotted ``--set a.b=c`` overrides.

Unknown keys and values of the wrong type are errors that name the key. Sizes that come from the data
(genes, batches) are not configured here; they are read from the data.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from scvi_scale.model.config import ModelConfig


class ConfigError(ValueError):
    """A config file or override that does not fit the config tree."""


@dataclass(frozen=True)
class DataConfig:
    """Where the counts come from and how they are split and batched."""

    batch_key: str | None = None
    layer: str | None = None
    drop_empty_cells: bool = False
    batch_size: int = 128
    train_size: float = 0.9
    shuffle_seed: int | None = None  # the split's seed; None: the run's seed
    # which genes to train on: "auto" the highly variable genes a `scvi-scale prepare` recorded in the store
    # (all genes when it has none), "hvg" those and an error without them, "all" every gene
    genes: Literal["auto", "all", "hvg"] = "auto"
    # minibatches: "auto" is random rows for counts in memory (one process) and the block-shuffling
    # prefetching loader for on-disk stores and data-parallel runs; "memory" and "block" force one
    loader: Literal["auto", "memory", "block"] = "auto"
    block_size: int | None = None  # rows per block read; None: about 131k stored counts per block
    buffer_blocks: int = 128  # blocks shuffled together (minibatch mixing: see the loader's docstring)
    loader_threads: int | None = None  # reader threads; None: 2, or 8 for a store in object storage
    loader_memory_bytes: int = 1 << 30  # bytes of decoded rows the loader may hold in flight

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(f"data.batch_size must be >= 2 (BatchNorm needs 2 cells); got {self.batch_size}")
        if not 0.0 < self.train_size <= 1.0:
            raise ConfigError(f"data.train_size must be in (0, 1]; got {self.train_size}")
        few_threads = self.loader_threads is not None and self.loader_threads < 1
        if self.block_size is not None and self.block_size < 1 or self.buffer_blocks < 1 or few_threads:
            raise ConfigError("data.block_size, data.buffer_blocks and data.loader_threads must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, checkpoints; defaults are scvi-tools' ``SCVI.train`` defaults."""

    max_epochs: int | None = None  # None: scvi-tools' heuristic min(round(20000/n_obs*400), 400)
    lr: float = 1e-3
    eps: float = 0.01
    weight_decay: float = 1e-6
    n_epochs_kl_warmup: int | None = 400
    n_steps_kl_warmup: int | None = None
    min_kl_weight: float = 0.0
    max_kl_weight: float = 1.0
    early_stopping: bool = False
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    check_val_every_n_epoch: int = 1
    checkpoint_every_n_epochs: int = 1
    checkpoint_every_n_steps: int | None = None  # also checkpoint mid-epoch (resumable)
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads; None: leave torch's default
    compile: bool = False  # torch.compile the fused ZINB kernel (needs a C++ compiler; ~10 s once, ~7% faster)
    progress: bool = True
    precision: Literal["auto", "32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU
    sync_batchnorm: bool = True  # data-parallel batch norm over the global minibatch (as one process would)
    # reparameterisation noise keyed by cell (same draw on any rank or minibatch); auto: on for data-parallel
    # runs, off in one process (torch's generator, whose draws match scvi-tools' for a seed)
    keyed_noise: Literal["auto", "on", "off"] = "auto"
    # data-parallel launch: see `scvi-scale train --help` and deploy/SCALING.md
    launcher: Literal["local", "torchrun", "ray"] = "local"
    workers: int = 1
    gpus_per_worker: float = 0.0
    # Ray CPUs per worker; None: this machine's cores shared evenly on a local Ray, 1 on a cluster
    cpus_per_worker: float | None = None
    address: str | None = None  # Ray: None starts a local instance; "auto" or "ray://head:10001" joins a cluster
    storage_path: str | None = None  # Ray's run storage (local path or s3://); default: Ray's own
    max_failures: int = 2  # Ray restarts of the worker group after a worker dies (resuming from the checkpoint)

    def __post_init__(self) -> None:
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"train.max_epochs must be >= 1; got {self.max_epochs}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0; got {self.lr}")
        if self.workers < 1:
            raise ConfigError(f"train.workers must be >= 1; got {self.workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"train.cpus_per_worker must be > 0; got {self.cpus_per_worker}")


@dataclass(frozen=True)
class Config:
    """The whole tree: ``model``, ``data``, ``train``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0] if len(rest) == 1 else tp
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    optional, base = _is_optional(tp)
    if value is None:  # YAML null (also what `--set key=null` parses to)
        if optional:
            return None
        raise ConfigError(f"{key} may not be null")
    if typing.get_origin(base) is typing.Literal:
        allowed = typing.get_args(base)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        try:
            if isinstance(value, str):
                value = int(value)
            elif isinstance(value, float) and value.is_integer():
                value = int(value)
        except ValueError:
            pass
        if not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number; got {value!r}") from None
    if base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping; got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "the config"
        raise ConfigError(
            f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; known: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ValueError as err:  # __post_init__ checks
        raise ConfigError(str(err)) from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is parsed as YAML (so ``1e-3``, ``true``, ``null`` work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.max_epochs=20")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (), **sections: Any) -> Config:
    """Build a :class:`Config` from an optional YAML file, ``--set`` overrides and keyword dicts.

    Later sources win: file, then ``sections`` (``model={...}``), then ``overrides``.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (model, data, train)")
        tree = loaded
    return _apply(tree, overrides, sections)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a checkpoint)."""
    return _build(Config, tree, "")


def with_overrides(config: Config | None = None, overrides: typing.Iterable[str] = (), **sections: Any) -> Config:
    """A copy of ``config`` (default: the defaults) with keyword sections and dotted overrides applied."""
    return _apply((config or Config()).to_dict(), overrides, sections)


def _apply(tree: dict[str, Any], overrides: typing.Iterable[str], sections: dict[str, Any]) -> Config:
    for section, values in sections.items():
        for k, v in (values or {}).items():
            _set_dotted(tree, f"{section}.{k}", v)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")
