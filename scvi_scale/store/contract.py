"""The ``CountStore`` contract: what training, inference and preparation may ask of any count store.

Every backend (:class:`~scvi_scale.store.memory.MemoryStore`, :class:`~scvi_scale.store.zarr_store.ZarrStore`,
``TileDBStore``) satisfies it; code on the data path takes a ``CountStore`` and never asks which backend it is.
``tests/store/test_contract.py`` runs one set of checks against all of them.

Rows are cells and columns genes, in a fixed order; counts come back as ``scipy.sparse.csr_matrix`` float32
with integer values. Per-cell outputs (embeddings) are written by row region into ``obsm``; writers that run
at the same time must own disjoint, chunk-aligned regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["CountStore"]


@runtime_checkable
class CountStore(Protocol):
    """A cells x genes count matrix with its metadata, read in row ranges and written by row region.

    Attributes
    ----------
    source
        What messages call the store (its path or URL; never credentials).
    n_obs, n_vars
        Number of cells and genes.
    var_names
        Gene names in column order (``str`` array, unique).
    obs
        Cell metadata, one row per cell (batch and other categorical columns).
    metadata
        Store metadata: ``format_version``, ``provenance``, and what ``prepare`` recorded.
    """

    source: str

    @property
    def n_obs(self) -> int: ...

    @property
    def n_vars(self) -> int: ...

    @property
    def var_names(self) -> np.ndarray: ...

    @property
    def obs(self) -> pd.DataFrame: ...

    @property
    def metadata(self) -> dict[str, Any]: ...

    def read_range(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR float32."""
        ...

    def read_rows(self, idx: np.ndarray) -> sp.csr_matrix:
        """Rows ``idx`` (any order, repeats allowed) as CSR float32, in the order given."""
        ...

    def batch_codes(
        self, batch_key: str | None, categories: Sequence[str] | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """Integer batch code of every cell, and the batch names in code order."""
        ...

    def library_log_stats(self, batch_codes: np.ndarray, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-batch mean and variance of log total counts (the latent-library prior)."""
        ...

    def write_obsm(self, key: str, start: int, stop: int, values: np.ndarray) -> None:
        """Write rows ``start:stop`` of the per-cell array ``obsm/<key>`` (created on first write)."""
        ...

    def read_obsm(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``obsm/<key>``."""
        ...
