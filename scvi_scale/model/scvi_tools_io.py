"""Owns the scvi-tools save format: reading and writing ``SCVI.save`` directories (``model.pt``) as plain tensors.

It knows scvi-tools' state-dict keys, the ``attr_dict`` that ``SCVI.load`` (1.4.2) needs and which options we can
represent; it works on dicts of tensors, so it needs neither scvi-tools nor our model class. Our model omits modules
it never calls (``l_encoder``, ``decoder.px_r_decoder``, ``decoder.px_dropout_decoder`` under most options); writing
fills them with freshly initialised tensors because scvi-tools loads state dicts strictly. Reading never runs pickled
code: ``torch.load(weights_only=True)`` with an explicit allow-list of the numpy and pandas globals scvi-tools writes.
"""

from __future__ import annotations

import builtins
import math
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

MODEL_FILE = "model.pt"
SCVI_TOOLS_VERSION = "1.4.2"  # the release whose save format this module reproduces

# SCVI.__init__'s named arguments with their defaults; the rest travel in init_params_["kwargs"]["kwargs"].
_NON_KWARGS = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "dropout_rate": 0.1, "dispersion": "gene"}
_NON_KWARGS |= {"gene_likelihood": "zinb", "use_observed_lib_size": True, "latent_distribution": "normal"}
# The VAE keyword arguments we implement, with scvi-tools' defaults (filled in on read, so callers see them all).
_VAE_KWARGS = {"log_variational": True, "encode_covariates": False, "deeply_inject_covariates": True}
_VAE_KWARGS |= {"batch_representation": "one-hot", "use_batch_norm": "both", "use_layer_norm": "none"}
_CHOICES = {"gene_likelihood": ("zinb", "nb", "poisson"), "dispersion": ("gene", "gene-batch", "gene-cell")}
_CHOICES |= {"latent_distribution": ("normal", "ln"), "batch_representation": ("one-hot",)}
_CHOICES |= dict.fromkeys(("use_batch_norm", "use_layer_norm"), ("none", "encoder", "decoder", "both"))
# Accepted only at their "off" value (None or empty), in which case they change nothing and are dropped.
_OFF_ONLY = ("var_activation", "extra_encoder_kwargs", "extra_decoder_kwargs", "batch_embedding_kwargs")
_IGNORED = ("extra_payload_autotune",)  # changes what training logs, never the weights
_UNSUPPORTED_SETUP = ("size_factor_key", "categorical_covariate_keys", "continuous_covariate_keys")


class UnsafePickleError(pickle.UnpicklingError):
    """``model.pt`` holds a pickled object outside the allow-list; nothing in it was executed."""


@dataclass
class ScviToolsModel:
    """An scVI model as scvi-tools saves it, reduced to what we can represent.

    Attributes
    ----------
    state_dict
        Tensors under scvi-tools' ``VAE`` key names, without ``pyro_param_store``. Reading gives every key
        scvi-tools has; writing accepts the unused modules missing (see :func:`unused_prefixes`).
    model_kwargs
        SCVI's named arguments plus the VAE keyword arguments we implement, under scvi-tools' names.
    var_names, layer
        Gene names in column order, and the ``adata.layers`` key holding the counts (None for ``adata.X``).
    batch_key, batch_categories
        The ``adata.obs`` batch column and its categories in code order (empty when ``batch_key`` is None).
    labels_key, label_categories
        The labels column and its categories in code order. SCVI's weights never depend on labels ("gene-label"
        dispersion is refused), but ``SCVI.load`` needs the column to set the data up.
    n_obs, history
        Cells in the training data and scvi-tools' ``history_`` (metric name to DataFrame), both informational.
    """

    state_dict: dict[str, torch.Tensor]
    model_kwargs: dict[str, Any]
    var_names: list[str]
    batch_key: str | None = None
    batch_categories: list[Any] = field(default_factory=list)
    layer: str | None = None
    labels_key: str | None = None
    label_categories: list[Any] = field(default_factory=list)
    n_obs: int = 0
    history: dict[str, pd.DataFrame] | None = None

    @property
    def n_batch(self) -> int:
        """Number of batches as scvi-tools counts them (1 without a batch column)."""
        return max(len(self.batch_categories), 1)

    @property
    def n_labels(self) -> int:
        """Number of labels as scvi-tools counts them (1 without a labels column)."""
        return max(len(self.label_categories), 1)


def complete_model_kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fill scvi-tools' defaults into ``model_kwargs``; raise ValueError naming an option we cannot represent."""
    unknown = set(model_kwargs) - set(_NON_KWARGS) - set(_VAE_KWARGS) - set(_OFF_ONLY) - set(_IGNORED)
    if unknown:
        raise ValueError(f"unsupported scvi-tools model option(s): {sorted(unknown)}")
    for name in _OFF_ONLY:
        if model_kwargs.get(name):
            raise ValueError(f"unsupported scvi-tools model option {name}={model_kwargs[name]!r}")
    kwargs = {**_NON_KWARGS, **_VAE_KWARGS}
    kwargs.update({k: v for k, v in model_kwargs.items() if k in kwargs})
    for name, choices in _CHOICES.items():
        if kwargs[name] not in choices:
            raise ValueError(f"unsupported scvi-tools model option {name}={kwargs[name]!r}; we support {choices}")
    return kwargs


def scvi_tools_shapes(model_kwargs: dict[str, Any], n_genes: int, n_batch: int) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of scvi-tools' ``VAE`` with its shape, in ``module.state_dict()`` order."""
    kw = complete_model_kwargs(model_kwargs)
    hidden, latent, n_layers = kw["n_hidden"], kw["n_latent"], kw["n_layers"]
    # FCLayers ignores a categorical covariate with a single category.
    batch_one_hot = n_batch if n_batch > 1 else 0
    encoder_cov = batch_one_hot if kw["encode_covariates"] else 0
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(stem: str, n_in: int, n_out: int) -> None:
        shapes[f"{stem}.weight"], shapes[f"{stem}.bias"] = (n_out, n_in), (n_out,)

    def fc_layers(stem: str, n_in: int, n_out: int, depth: int, n_cov: int, norm_on: str) -> None:
        widths = [n_in] + [hidden] * (depth - 1) + [n_out]
        for i in range(depth):
            # Covariates enter layer 0 always and deeper layers only when deeply injected.
            injected = n_cov if i == 0 or kw["deeply_inject_covariates"] else 0
            linear(f"{stem}.fc_layers.Layer {i}.0", widths[i] + injected, widths[i + 1])
            if kw["use_batch_norm"] in (norm_on, "both"):
                for leaf in ("weight", "bias", "running_mean", "running_var"):
                    shapes[f"{stem}.fc_layers.Layer {i}.1.{leaf}"] = (widths[i + 1],)
                shapes[f"{stem}.fc_layers.Layer {i}.1.num_batches_tracked"] = ()

    # nn.Module.state_dict lists a module's own parameters, then its buffers, then its children.
    px_r = {"gene": (n_genes,), "gene-batch": (n_genes, n_batch)}.get(kw["dispersion"])  # "gene-cell": none
    if px_r:
        shapes["px_r"] = px_r
    if not kw["use_observed_lib_size"]:
        shapes["library_log_means"] = shapes["library_log_vars"] = (1, n_batch)
    for encoder, depth, n_out in (("z_encoder", n_layers, latent), ("l_encoder", 1, 1)):  # l_encoder: one layer
        fc_layers(f"{encoder}.encoder", n_genes, hidden, depth, encoder_cov, "encoder")
        linear(f"{encoder}.mean_encoder", hidden, n_out)
        linear(f"{encoder}.var_encoder", hidden, n_out)
    fc_layers("decoder.px_decoder", latent, hidden, n_layers, batch_one_hot, "decoder")
    for head in ("px_scale_decoder.0", "px_r_decoder", "px_dropout_decoder"):
        linear(f"decoder.{head}", hidden, n_genes)
    return shapes


def unused_prefixes(model_kwargs: dict[str, Any]) -> tuple[str, ...]:
    """Key prefixes of the modules scvi-tools builds and saves but never calls under these options."""
    kw = complete_model_kwargs(model_kwargs)
    unused = [("l_encoder.", kw["use_observed_lib_size"]), ("decoder.px_r_decoder.", kw["dispersion"] != "gene-cell")]
    unused.append(("decoder.px_dropout_decoder.", kw["gene_likelihood"] != "zinb"))
    return tuple(prefix for prefix, is_unused in unused if is_unused)


def missing_unused_keys(
    model_kwargs: dict[str, Any], n_genes: int, n_batch: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Freshly initialised tensors for the unused modules, as torch's own layer constructors would make them.

    Linear layers get torch's default init (weight and bias uniform in +-1/sqrt(fan_in), which is what
    ``kaiming_uniform_(a=sqrt(5))`` reduces to); BatchNorm gets weight 1, bias 0, running mean 0, running
    variance 1 and no batches tracked. A fixed ``torch.Generator`` makes the result deterministic.
    """
    shapes = scvi_tools_shapes(model_kwargs, n_genes, n_batch)
    prefixes = unused_prefixes(model_kwargs)
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if not key.startswith(prefixes):
            continue
        stem, leaf = key.rsplit(".", 1)
        if leaf == "num_batches_tracked":
            out[key] = torch.zeros((), dtype=torch.long)
        elif len(shapes[f"{stem}.weight"]) == 2:  # a Linear layer's weight or bias
            bound = 1.0 / math.sqrt(shapes[f"{stem}.weight"][1])
            out[key] = torch.empty(shape).uniform_(-bound, bound, generator=generator)
        else:  # BatchNorm: weight and running variance 1, bias and running mean 0
            out[key] = torch.ones(shape) if leaf in ("weight", "running_var") else torch.zeros(shape)
    return out


def _defaultdict_as_dict(default_factory: Any = None) -> dict:
    # scvi-tools' registry is a defaultdict, which torch's weights-only unpickler cannot fill; a dict holds it.
    return {}


def _bytes_from_bytes(*args: Any) -> bytes:
    # Protocol-2 pickles rebuild bytes as bytes() or bytes(b"..."); refuse bytes(n), which allocates n zeros.
    if args and not isinstance(args[0], bytes | bytearray):
        raise pickle.UnpicklingError(f"refused bytes() of {type(args[0]).__name__}")
    return bytes(*args)


def _allowed_globals() -> list[Any]:
    """The globals scvi-tools' pickles need beyond tensors: numpy arrays and the pandas DataFrames of history."""
    from pandas._libs.internals import _unpickle_block
    from pandas.core.indexes.base import _new_Index
    from pandas.core.indexes.range import RangeIndex
    from pandas.core.internals.managers import BlockManager

    reconstruct = np._core.multiarray._reconstruct
    dtypes = [getattr(np.dtypes, f"{kind}DType") for kind in ("Bool", "Object", "Str", "Bytes")]
    dtypes += [getattr(np.dtypes, f"{kind}{bits}DType") for kind in ("Int", "UInt") for bits in (8, 16, 32, 64)]
    dtypes += [getattr(np.dtypes, f"Float{bits}DType") for bits in (16, 32, 64)]
    # numpy 1.x writes _reconstruct under numpy.core, numpy 2 under numpy._core.
    numpy_parts = [np.ndarray, np.dtype, reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), *dtypes]
    pandas_parts = [pd.DataFrame, pd.Index, RangeIndex, _new_Index, BlockManager, _unpickle_block]
    substitutes = [(_bytes_from_bytes, "builtins.bytes"), (_defaultdict_as_dict, "collections.defaultdict")]
    return [builtins.dict, builtins.slice, *substitutes, *numpy_parts, *pandas_parts]


def _safe_torch_load(file: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False, which is exactly what must not happen here.
        boilerplate = ("Weights only load failed", "(1)", "(2)", "Check the documentation", "Please file an issue")
        lines = [line for line in map(str.strip, str(err).splitlines()) if line and not line.startswith(boilerplate)]
        reason = lines[0].removeprefix("WeightsUnpickler error: ") if lines else str(err)
        raise UnsafePickleError(f"{file}: refused to unpickle: {reason}") from None
    except Exception as err:  # a corrupt archive, or an allowed callable given arguments it rejects
        raise ValueError(f"{file}: not a readable torch file: {type(err).__name__}: {err}") from err


def _categories(field_registry: dict, key: str | None) -> list[Any]:
    return [] if key is None else list(np.asarray(field_registry["state_registry"]["categorical_mapping"]).tolist())


def _model_kwargs(init_params: dict) -> dict[str, Any]:
    if "non_kwargs" not in init_params:
        raise ValueError("unsupported scvi-tools save: init_params_ predates the non_kwargs/kwargs layout")
    merged = dict(init_params["non_kwargs"])
    for group in init_params.get("kwargs", {}).values():  # {"kwargs": {...}}: the name of SCVI's **kwargs
        merged.update(group)
    kwargs = complete_model_kwargs({k: v for k, v in merged.items() if k not in _IGNORED})
    return {k: v for k, v in kwargs.items() if k not in _OFF_ONLY}


def read_scvi_tools(path: str | os.PathLike, prefix: str | None = None) -> ScviToolsModel:
    """Read the directory ``scvi.model.SCVI.save(path, prefix=prefix)`` wrote.

    Raises :class:`UnsafePickleError` if ``model.pt`` pickles anything outside the numpy/pandas allow-list (nothing
    is executed), and ValueError naming the option if the model uses one we cannot represent.
    """
    file = Path(path) / f"{prefix or ''}{MODEL_FILE}"
    if not file.is_file():
        raise FileNotFoundError(f"no scvi-tools model file at {file}")
    payload = _safe_torch_load(file)
    if not isinstance(payload, dict) or not {"model_state_dict", "var_names", "attr_dict"} <= payload.keys():
        raise ValueError(f"{file} is not an scvi-tools model.pt (expected model_state_dict, var_names, attr_dict)")
    attrs, registry = payload["attr_dict"], payload["attr_dict"]["registry_"]
    for name, wanted in (("model_name", "SCVI"), ("setup_method_name", "setup_anndata")):
        if registry.get(name, wanted) != wanted:
            raise ValueError(f"unsupported scvi-tools save: {name}={registry[name]!r}; we read {wanted!r} only")
    setup = registry["setup_args"]
    for name in _UNSUPPORTED_SETUP:
        if setup.get(name):
            raise ValueError(f"unsupported scvi-tools setup option {name}={setup[name]!r}")
    if isinstance(payload["var_names"], dict):
        raise ValueError("unsupported scvi-tools save: per-modality var_names (MuData)")
    fields = registry["field_registries"]
    state = {k: v for k, v in payload["model_state_dict"].items() if k != "pyro_param_store"}
    model = ScviToolsModel(
        state_dict=state,
        model_kwargs=_model_kwargs(attrs["init_params_"]),
        var_names=[str(v) for v in np.asarray(payload["var_names"]).tolist()],
        batch_key=setup.get("batch_key"),
        batch_categories=_categories(fields["batch"], setup.get("batch_key")),
        layer=setup.get("layer"),
        labels_key=setup.get("labels_key"),
        label_categories=_categories(fields["labels"], setup.get("labels_key")),
        n_obs=int(fields["X"]["state_registry"].get("n_obs", 0)),
        history=attrs.get("history_"),
    )
    expected = scvi_tools_shapes(model.model_kwargs, len(model.var_names), model.n_batch)
    got = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    if got != expected or len(got) != len(state):
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise ValueError(f"{file}: state dict does not match the options we support; first differences: {diff}")
    return model


def _categorical_field(key: str | None, categories: list[Any], default_key: str, stat: str) -> dict:
    if key is None:
        mapping, original = np.array([0]), default_key  # scvi-tools' placeholder column of zeros
    else:
        is_str = all(isinstance(c, str) for c in categories)
        mapping, original = np.array(categories, dtype=object if is_str else None), key
    return {
        "data_registry": {"attr_name": "obs", "attr_key": default_key},
        "state_registry": {"categorical_mapping": mapping, "original_key": original},
        "summary_stats": {stat: len(mapping)},
    }


def _registry(model: ScviToolsModel) -> dict:
    column_names = np.array(model.var_names, dtype=object)
    # A name derived from the content keeps the file deterministic; load does not look at it.
    scvi_uuid = uuid.uuid5(uuid.NAMESPACE_OID, repr((model.var_names, model.batch_categories, model.model_kwargs)))
    empty = {"data_registry": {}, "state_registry": {}}
    setup_args = {"layer": model.layer, "batch_key": model.batch_key, "labels_key": model.labels_key}
    return {
        "scvi_version": SCVI_TOOLS_VERSION,
        "model_name": "SCVI",
        "setup_args": {**setup_args, **dict.fromkeys(_UNSUPPORTED_SETUP)},
        "field_registries": {
            "X": {
                "data_registry": {"attr_name": "layers" if model.layer else "X", "attr_key": model.layer},
                "state_registry": {"n_obs": model.n_obs, "n_vars": len(model.var_names), "column_names": column_names},
                "summary_stats": {"n_cells": model.n_obs, "n_vars": len(model.var_names)},
            },
            "batch": _categorical_field(model.batch_key, model.batch_categories, "_scvi_batch", "n_batch"),
            "labels": _categorical_field(model.labels_key, model.label_categories, "_scvi_labels", "n_labels"),
            "size_factor": {**empty, "summary_stats": {}},
            "extra_categorical_covs": {**empty, "summary_stats": {"n_extra_categorical_covs": 0}},
            "extra_continuous_covs": {**empty, "summary_stats": {"n_extra_continuous_covs": 0}},
        },
        "setup_method_name": "setup_anndata",
        "_scvi_uuid": str(scvi_uuid),
    }


def _full_state_dict(model: ScviToolsModel, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    shapes = scvi_tools_shapes(kwargs, len(model.var_names), model.n_batch)
    extra = sorted(set(model.state_dict) - set(shapes))
    if extra:
        raise ValueError(f"state_dict has keys scvi-tools does not know under these options: {extra[:3]}")
    filler = missing_unused_keys(kwargs, len(model.var_names), model.n_batch)
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        tensor = model.state_dict.get(key)
        if tensor is None:
            if key not in filler:
                raise ValueError(f"state_dict lacks {key!r}, which the model uses")
            tensor = filler[key]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"state_dict[{key!r}] has shape {tuple(tensor.shape)}; scvi-tools expects {shape}")
        # clone: torch.save writes a view's whole storage, and the caller's tensors may be views.
        state[key] = tensor.detach().to("cpu").clone()
    return state


def write_scvi_tools(
    path: str | os.PathLike, model: ScviToolsModel, overwrite: bool = False, prefix: str | None = None
) -> Path:
    """Write ``model`` as a directory that ``scvi.model.SCVI.load(path, adata=adata)`` accepts.

    ``adata`` must have the same ``var_names`` (in order) and, if set, the batch and labels columns and
    ``layer``. The file appears atomically: a new directory is renamed into place, and an existing one
    (``overwrite=True``) gets its ``model.pt`` replaced with ``os.replace``; other files there are kept.

    Returns
    -------
    The directory written.
    """
    kwargs = complete_model_kwargs(model.model_kwargs)
    for key, categories in ((model.batch_key, model.batch_categories), (model.labels_key, model.label_categories)):
        if (key is None) != (not categories):
            raise ValueError(f"obs column {key!r}: categories must be given exactly when the column is set")
    state = _full_state_dict(model, kwargs)
    state["pyro_param_store"] = {"params": {}, "constraints": {}}  # what SCVI.save stores; load pops it
    attr_dict = {
        "init_params_": {
            "kwargs": {"kwargs": {k: v for k, v in kwargs.items() if k not in _NON_KWARGS}},
            "non_kwargs": {k: kwargs[k] for k in _NON_KWARGS},
        },
        "registry_": _registry(model),
        "is_trained_": True,
        "history_": model.history,
        **dict.fromkeys(("train_indices_", "validation_indices_", "test_indices_")),
        "run_name_": "scvi_scale_export",
        "run_id_": "",
        "get_normalized_function_name_": "get_normalized_expression",
    }
    payload = {"model_state_dict": state, "var_names": np.array(model.var_names, dtype=object), "attr_dict": attr_dict}

    target, name = Path(path), f"{prefix or ''}{MODEL_FILE}"
    if target.exists() and not (overwrite and target.is_dir()):
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace its {name}")
    # Temporary names start with "." and sit next to their destination, so the rename cannot cross filesystems.
    staging = target if target.exists() else target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    partial = staging / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        staging.mkdir(parents=True, exist_ok=staging == target)
        with open(partial, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, staging / name)
        if staging != target:
            staging.rename(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        if staging != target:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
