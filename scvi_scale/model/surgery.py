"""Architecture surgery for new batches (scArches-style): a trained VAE's weights in a VAE with more batches.

scVI feeds the batch as a one-hot into every layer that takes covariates: the first hidden layer of the
decoder (and of every decoder layer with ``deeply_inject_covariates``), the encoders' when
``encode_covariates``, plus ``px_r`` for ``dispersion="gene-batch"`` and the per-batch library priors. A
one-hot input is a column lookup in the Linear weight (:func:`~scvi_scale.model.layers._linear_with_onehot`),
so extending the categories means extending those columns: the columns of batches the old model knew are
copied (matched by name, whatever their order), and new batches get new columns (the mean of the old ones, or
zeros). Everything else is copied unchanged, so cells of old batches give exactly the old outputs.

scArches (Lotfollahi et al., Nat. Biotechnol. 2022) and scvi-tools' ``load_query_data`` do the same copy; they
leave new columns at their random initialisation and may freeze the old weights, whereas a nightly rebuild
fine-tunes everything, from new columns that start as an average batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from scvi_scale.model.layers import FCLayers
from scvi_scale.model.vae import VAE

__all__ = ["NewColumns", "category_index", "extend_batches", "transfer_weights"]

NewColumns = Literal["mean", "zeros"]
_PRIORS = ("library_log_means", "library_log_vars")


def category_index(old: Sequence[str], new: Sequence[str]) -> list[int]:
    """For each new category, its position among the old ones, or -1 when it is new."""
    where = {str(c): i for i, c in enumerate(old)}
    return [where.get(str(c), -1) for c in new]


def _map_columns(old_rc: torch.Tensor, index: list[int], fill: NewColumns) -> torch.Tensor:
    """Columns of ``old_rc`` (rows x old categories) arranged for the new categories; new ones filled."""
    if fill == "mean" and old_rc.shape[1]:
        new_col = old_rc.mean(dim=1, keepdim=True)
    else:
        new_col = torch.zeros(old_rc.shape[0], 1, dtype=old_rc.dtype, device=old_rc.device)
    cols = [old_rc[:, i : i + 1] if i >= 0 else new_col for i in index]
    return torch.cat(cols, dim=1) if cols else old_rc[:, :0]


def _extended_state(
    source: VAE, old: Sequence[str], new: Sequence[str], target: VAE, fill: NewColumns
) -> dict[str, torch.Tensor]:
    """``source``'s state dict reshaped for ``target`` (same architecture and genes, ``len(new)`` batches)."""
    if len(old) != source.n_batch:
        raise ValueError(f"the source model has {source.n_batch} batches but {len(old)} category names were given")
    if len(new) != target.n_batch:
        raise ValueError(f"the target model has {target.n_batch} batches but {len(new)} category names were given")
    if source.n_genes != target.n_genes or source.config != target.config:
        raise ValueError("surgery needs the same genes and architecture; only the batches may differ")
    index = category_index(old, new)
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    for name, fc in source.named_modules():
        if not isinstance(fc, FCLayers):
            continue
        new_fc = target.get_submodule(name)
        for i in range(len(fc.fc_layers)):
            if not fc._injects(i):  # noqa: SLF001 (same package: which layers take the one-hot)
                continue
            key = f"{name}.fc_layers.Layer {i}.0.weight"
            w = state[key]
            d_in = w.shape[1] - fc.n_cov
            # one batch means no covariate columns (scvi-tools ignores a single category): its column is zero
            old_cols = w[:, d_in:] if fc.n_cov else w.new_zeros(w.shape[0], len(old))
            if new_fc.n_cov == 0:
                if fc.n_cov and not (len(new) == 1 and index[0] >= 0 and torch.all(old_cols[:, index[0]] == 0)):
                    raise ValueError(f"{key}: cannot drop the batch covariates of a model trained with them")
                state[key] = w[:, :d_in].clone()
            else:
                state[key] = torch.cat([w[:, :d_in], _map_columns(old_cols, index, fill)], dim=1)
    if source.config.dispersion == "gene-batch":
        state["px_r"] = _map_columns(state["px_r"], index, fill)
    for key in _PRIORS:
        if key in state:
            state[key] = _map_columns(state[key], index, "mean")
    expected = target.state_dict()
    for key, value in state.items():
        if expected[key].shape != value.shape:  # a bug here, not a user error
            raise AssertionError(
                f"surgery produced {key} of shape {tuple(value.shape)}, expected {expected[key].shape}"
            )
    return state


def transfer_weights(
    source: VAE, source_categories: Sequence[str], target: VAE, target_categories: Sequence[str],
    new_columns: NewColumns = "mean",
) -> VAE:  # fmt: skip
    """Load ``source``'s weights into ``target`` (in place), extending the batch covariates by name.

    ``target`` keeps its own library priors (they are statistics of the data it will train on); every weight,
    bias and BatchNorm statistic comes from ``source``.

    Parameters
    ----------
    source, source_categories
        The trained model and its batch names in code order (``["0"]`` without a batch key).
    target, target_categories
        A model built for the new data (same genes and :class:`~scvi_scale.model.ModelConfig`), and its batch
        names in code order: a superset of the old ones, in any order.
    new_columns
        ``"mean"``: a new batch starts as the average of the old ones; ``"zeros"``: as no batch effect.
    """
    state = _extended_state(source, source_categories, target_categories, target, new_columns)
    for key in _PRIORS:
        if key in state:
            state[key] = target.state_dict()[key]
    target.load_state_dict(state)
    return target


def extend_batches(
    model: VAE,
    old_categories: Sequence[str],
    new_categories: Sequence[str],
    new_columns: NewColumns = "mean",
) -> VAE:
    """A new VAE for ``new_categories`` with ``model``'s weights; old batches keep their columns exactly.

    Library priors (a latent library only) of new batches start at the mean of the old ones.

    Examples
    --------
    >>> big = extend_batches(run.model, run.batch_categories, [*run.batch_categories, "night_42"])  # doctest: +SKIP
    """
    n_batch = max(len(new_categories), 1)
    priors: tuple = (None, None)
    if not model.config.use_observed_lib_size:
        index = category_index(old_categories, new_categories)
        priors = tuple(_map_columns(getattr(model, k), index, "mean")[0].numpy() for k in _PRIORS)
    target = VAE(model.n_genes, n_batch, model.config, *priors)
    target.load_state_dict(_extended_state(model, old_categories, new_categories, target, new_columns))
    target.train(model.training)
    return target
