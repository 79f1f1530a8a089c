"""Batch-corrected normalized expression, as scvi-tools' ``get_normalized_expression``, and its region writer.

For each minibatch and each batch to condition on, one encoder pass draws ``z ~ q(z|x)`` (a sample, not the
posterior mean: scvi-tools samples even with ``n_samples=1``) and the decoder, with the batch code swapped only
in the generative pass, gives ``px_scale`` (rows summing to 1); the output is ``px_scale * library_size``
(``library_size="latent"``: ``px_rate = exp(library) * px_scale``), averaged over the conditioning batches and,
with ``n_samples > 1``, over the samples. Draws happen in scvi-tools' order, so the same torch seed gives the
same numbers (scvi-tools' data loader takes one int64 draw from the global generator before the first
minibatch; :func:`normalized_minibatch` does not).

:class:`NormalizedJob` writes the result into the store as ``obsm/<key>`` (cells x chosen genes) with the region
machinery of :mod:`scvi_scale.infer.writeback`: chunk-aligned regions, per-region commit marks, a manifest, and
draws seeded per region, so a rerun after a kill gives the bytes of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scvi_scale.infer.writeback import EmbedJob
from scvi_scale.model.vae import VAE
from scvi_scale.store.errors import InputError
from scvi_scale.store.zarr_store import OBSM_CHUNK_ROWS

__all__ = [
    "NormalizedJob",
    "batch_codes_for",
    "gene_columns",
    "normalized_minibatch",
    "region_rows_for",
    "region_seed",
    "seeded",
]

REGION_BYTES = 32 << 20  # a region of a wide output (cells x genes) holds at most this much float32


def batch_codes_for(categories: Sequence[str], transform_batch: Any, what: str = "transform batch") -> list[int | None]:
    """Codes of the batches to condition on: ``None`` keeps each cell's observed batch (scvi-tools' rule).

    ``transform_batch`` is None, one batch name or a list of them (the output is then averaged over them).
    """
    values = transform_batch if isinstance(transform_batch, (list, tuple)) else [transform_batch]
    names = [str(c) for c in categories]
    codes: list[int | None] = []
    for value in values:
        if value is None:
            codes.append(None)
        elif str(value) in names:
            codes.append(names.index(str(value)))
        else:
            shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            raise InputError(
                f"{what} {value!r} is not one of the model's {len(names)} batches ({shown}); "
                "pass one of those names (or none, to keep each cell's own batch)"
            )
    if not codes:
        raise InputError("transform_batch is an empty list; pass a batch name, a list of names, or None")
    return codes


def gene_columns(var_names: Sequence[str], genes: Sequence[str] | str | None) -> np.ndarray | None:
    """Model columns of ``genes`` in the model's gene order (as scvi-tools' ``gene_list`` mask); None for all.

    Unknown genes are an error (scvi-tools drops them silently).
    """
    if genes is None:
        return None
    wanted = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    known = set(var_names)
    missing = [g for g in wanted if g not in known]
    if missing:
        shown = ", ".join(repr(g) for g in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(
            f"gene {shown} is not among the model's {len(known)} genes; pass genes the model was trained on "
            "(run.var_names)"
        )
    if not wanted:
        raise InputError("the gene list is empty; pass at least one of the model's genes, or None for all")
    mask = np.isin(np.asarray(var_names, dtype=str), wanted)
    return np.flatnonzero(mask)


def region_seed(seed: int, region: int) -> int:
    """The torch seed of one region's draws (the same scheme as the embedding's logistic-normal means)."""
    return int(np.random.SeedSequence([seed, region]).generate_state(1)[0])


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's generators seeded by ``seed``, restoring the CPU generator afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def normalized_minibatch(
    model: VAE,
    x_ng: torch.Tensor,
    batch_n: torch.Tensor,
    codes: Sequence[int | None] = (None,),
    *,
    gene_idx: np.ndarray | None = None,
    library_size: float | str = 1.0,
    n_samples: int = 1,
) -> torch.Tensor:
    """Normalized expression of one minibatch, ``(n, g)``: scvi-tools' ``get_normalized_expression`` per batch.

    Parameters
    ----------
    model
        In eval mode (BatchNorm running statistics, no dropout), as every scvi-tools output is computed.
    x_ng, batch_n
        Counts over the model's genes and observed batch codes.
    codes
        Batches to condition the decoder on (None: the observed one); the result is their mean, each with its
        own draws of z.
    gene_idx
        Model columns to keep (None: all).
    library_size
        A number (``px_scale * library_size``) or ``"latent"`` (``px_rate``).
    n_samples
        Draws of z per cell, averaged.
    """
    batch_n = batch_n.reshape(-1).long()
    per_batch = []
    for code in codes:
        inf = model.inference(x_ng, batch_n, n_samples=n_samples)
        px = model.generative(inf.z, inf.library, batch_n, transform_batch=code)
        value = px.rate if library_size == "latent" else px.scale * float(library_size)
        per_batch.append(value if gene_idx is None else value[..., torch.as_tensor(gene_idx, device=value.device)])
    out = torch.stack(per_batch).mean(0)
    return out.mean(0) if n_samples > 1 else out


def region_rows_for(n_cols: int) -> int:
    """Rows per region for an output ``n_cols`` wide: a power of two, at most ``REGION_BYTES`` of float32."""
    rows = max(1, REGION_BYTES // (4 * max(n_cols, 1)))
    return int(min(OBSM_CHUNK_ROWS, 1 << (rows.bit_length() - 1)))


@dataclass(frozen=True)
class NormalizedJob(EmbedJob):
    """A region job writing normalized expression into ``obsm/<key>`` (its own marks and manifest).

    ``genes`` are model columns (None: all), ``transform`` the conditioning batch codes.
    """

    key: str = "scvi_normalized"
    genes: tuple[int, ...] | None = None
    transform: tuple[int | None, ...] = (None,)
    library_size: float | str = 1e4
    n_samples: int = 1

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def manifest(self) -> str:
        return f"obsm/{self.key}"

    @property
    def marks(self) -> str:
        return f"scvi_scale_commits_{self.key}"

    def token_extra(self) -> dict[str, Any]:
        genes = None if self.genes is None else hashlib.sha256(np.asarray(self.genes, np.int64).tobytes()).hexdigest()
        return {
            "output": "normalized",
            "key": self.key,
            "columns": genes,
            "transform": list(self.transform),
            "library_size": self.library_size,
            "n_samples": self.n_samples,
        }

    def region_values(self, model: VAE, view: Any, codes: np.ndarray, region: int) -> dict[str, np.ndarray]:
        start, stop = self.plan.bounds(region)
        gene_idx = None if self.genes is None else np.asarray(self.genes, dtype=np.int64)
        parts = []
        was_training = model.training
        model.eval()
        with seeded(region_seed(self.seed, region)):
            for lo in range(start, stop, self.batch_size):
                hi = min(lo + self.batch_size, stop)
                x_ng = torch.from_numpy(sp.csr_matrix(view.read_range(lo, hi), dtype=np.float32).toarray())
                batch_n = torch.from_numpy(np.asarray(codes[lo:hi], dtype=np.int64))
                out = normalized_minibatch(model, x_ng.to(self.device), batch_n.to(self.device), self.transform,
                                           gene_idx=gene_idx, library_size=self.library_size,
                                           n_samples=self.n_samples)  # fmt: skip
                parts.append(out.float().cpu().numpy())
        model.train(was_training)
        return {"normalized": np.concatenate(parts).astype(np.float32, copy=False)}
