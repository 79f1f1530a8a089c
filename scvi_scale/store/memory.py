"""The in-memory count store (tests, notebooks, small files): the reference for the ``CountStore`` contract.

A store exposes ``n_obs``, ``n_vars``, ``var_names``, ``obs`` (a DataFrame indexed by cell name),
``source`` (what to name in messages), row reads as CSR float32 (``read_rows``, ``read_range``), batch
codes with scvi-tools' category convention (``batch_codes``) and the per-batch library-size prior
(``library_log_stats``). Counts are validated on construction, so a store never holds invalid counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.store.errors import InputError
from scvi_scale.store.validate import DEFAULT_CHUNK_ROWS, validate_counts

if TYPE_CHECKING:
    import anndata

__all__ = ["MemoryStore", "category_codes", "library_log_stats_from_totals"]

logger = logging.getLogger(__name__)


def small_codes(codes_n: np.ndarray, n_categories: int) -> np.ndarray:
    """``codes_n`` in the smallest signed integer dtype that holds ``n_categories`` codes (1 byte a cell for
    fewer than 128 batches): codes are kept for every cell of an atlas."""
    dtype = np.int8 if n_categories <= 127 else np.int16 if n_categories <= 32767 else np.int32
    return np.array(codes_n, dtype=dtype)  # a writable copy: torch refuses read-only arrays


def category_codes(
    values: pd.Series, *, name: str, source: str, categories: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Integer codes and category names of one obs column, as scvi-tools makes them.

    Without ``categories`` this is ``values.astype("category")``: sorted unique values, or the column's own
    category order when it already is categorical (scvi-tools' ``_make_column_categorical``). With
    ``categories`` (e.g. a trained model's mapping) values are matched by their string form.

    Parameters
    ----------
    values
        The column.
    name
        Column name, for messages.
    source
        The file the column comes from, for messages.
    categories
        Fixed category names in code order.

    Returns
    -------
    tuple
        ``(codes_n, categories)``: codes in ``[0, len(categories))`` (the smallest signed integer dtype that
        holds them: :func:`small_codes`) and the names as ``str``.

    Raises
    ------
    InputError
        On missing values, or values not in ``categories``.
    """
    if values.isna().any():
        row = int(np.argmax(values.isna().to_numpy()))
        raise InputError(
            f"{source}: column '{name}' has {int(values.isna().sum())} missing values (first: row {row}, "
            f"'{values.index[row]}'); fill them with a category before training"
        )
    if categories is None:
        cat = values.astype("category")
        names = [str(c) for c in cat.cat.categories]
        return small_codes(cat.cat.codes.to_numpy(), len(names)), names
    categories = [str(c) for c in categories]
    cat = pd.Categorical(values.astype(str), categories=categories)
    codes_n = small_codes(np.asarray(cat.codes), len(categories))
    if (codes_n < 0).any():
        unseen = pd.unique(values.astype(str).to_numpy()[codes_n < 0])
        shown = ", ".join(f"'{u}'" for u in unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        raise InputError(
            f"{source}: column '{name}' has values the model was not trained with ({shown}); "
            f"known categories are {categories[:10]}{' ...' if len(categories) > 10 else ''}; "
            "drop those cells or retrain on data that includes them"
        )
    return codes_n, categories


def library_log_stats_from_totals(
    total_n: np.ndarray, batch_codes: np.ndarray, n_batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and population variance of ``log(total counts)`` (scvi-tools' ``_init_library_size``).

    Zero totals count as ``log = 0`` (scvi-tools masks and fills them with 0); a batch with no cells gets
    mean 0 and variance 1.

    Parameters
    ----------
    total_n
        Total counts of each cell.
    batch_codes
        Batch code of each cell, in ``[0, n_batch)``.
    n_batch
        Number of batches.

    Returns
    -------
    tuple
        ``(means_b, vars_b)``, float64 arrays of length ``n_batch``.
    """
    stats = _LogLibraryAccumulator(n_batch)
    stats.add(total_n, batch_codes)
    return stats.result()


class _LogLibraryAccumulator:
    """Chan et al.'s pairwise update of per-batch count, mean and M2, block by block (no cell loop)."""

    def __init__(self, n_batch: int) -> None:
        self.count_b = np.zeros(n_batch, dtype=np.float64)
        self.mean_b = np.zeros(n_batch, dtype=np.float64)
        self.m2_b = np.zeros(n_batch, dtype=np.float64)

    def add(self, total_n: np.ndarray, batch_n: np.ndarray) -> None:
        n_batch = self.count_b.shape[0]
        total_n = np.asarray(total_n, dtype=np.float64)  # float32 totals would give float32 logs
        log_n = np.log(np.where(total_n > 0, total_n, 1.0))
        count_b = np.bincount(batch_n, minlength=n_batch).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_b = np.bincount(batch_n, weights=log_n, minlength=n_batch) / count_b
        mean_b[count_b == 0] = 0.0
        m2_b = np.bincount(batch_n, weights=(log_n - mean_b[batch_n]) ** 2, minlength=n_batch)
        total_b = self.count_b + count_b
        safe_b = np.where(total_b > 0, total_b, 1.0)
        delta_b = mean_b - self.mean_b
        self.mean_b = self.mean_b + delta_b * count_b / safe_b
        self.m2_b = self.m2_b + m2_b + delta_b**2 * self.count_b * count_b / safe_b
        self.count_b = total_b

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        present = self.count_b > 0
        means_b = np.where(present, self.mean_b, 0.0)
        vars_b = np.where(present, self.m2_b / np.where(present, self.count_b, 1.0), 1.0)
        return means_b, vars_b


class StoreReads:
    """What every count store derives from its ``obs``, ``n_obs``, ``source`` and ``read_range``.

    One implementation of the batch codes and the library-size prior for the in-memory, Zarr and TileDB
    stores; a backend overrides ``library_log_stats`` only when it can total rows faster.
    """

    source: str
    n_obs: int
    obs: pd.DataFrame

    def read_range(self, start: int, stop: int) -> sp.csr_matrix:  # pragma: no cover - every store defines it
        raise NotImplementedError

    def batch_codes(
        self, batch_key: str | None, categories: Sequence[str] | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """Integer batch code of every cell and the batch names in code order.

        Parameters
        ----------
        batch_key
            An ``obs`` column; ``None`` means one batch (scvi-tools' default): all codes 0, categories ``["0"]``.
        categories
            Fixed names in code order (from a trained model); values outside them are an error.

        Returns
        -------
        tuple
            ``(codes_n, categories)``: codes of shape ``(n_obs,)`` (int8 for fewer than 128 batches; see
            :func:`category_codes`) and the names as ``str``.
            Codes equal pandas ``obs[batch_key].astype("category").cat.codes`` when ``categories`` is None.

        Raises
        ------
        InputError
            Unknown column, missing values, or values not in ``categories``.
        """
        if batch_key is None:
            names = ["0"] if categories is None else [str(c) for c in categories]
            if len(names) != 1:
                raise InputError(
                    f"{self.source}: the model was trained with {len(names)} batches but no batch key was given; "
                    "pass the batch column it was trained with"
                )
            return np.zeros(self.n_obs, dtype=np.int8), names
        columns = self.obs_columns()
        if batch_key not in columns:
            raise InputError(f"{self.source}: no obs column '{batch_key}'; available columns: {columns or 'none'}")
        return category_codes(self.obs_column(batch_key), name=batch_key, source=self.source, categories=categories)

    @property
    def count_dtype(self) -> np.dtype | None:
        """The integer dtype the store keeps its counts in (``uint16`` or ``uint32``, from its metadata), or None
        when it does not declare one (counts held as floats in memory)."""
        name = (getattr(self, "metadata", None) or {}).get("count_dtype")
        return np.dtype(name) if name else None

    def obs_columns(self) -> list[str]:
        """Names of the ``obs`` columns."""
        return [str(c) for c in self.obs.columns]

    def obs_column(self, key: str) -> pd.Series:
        """One ``obs`` column (stores on disk read only that column)."""
        return self.obs[key]

    def library_log_stats(
        self, batch_codes: np.ndarray, n_batch: int, chunk_rows: int = DEFAULT_CHUNK_ROWS
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-batch mean and population variance of the log total counts (the latent-library prior).

        Matches scvi-tools' ``_init_library_size``: a batch with no cells gets mean 0 and variance 1.
        Computed ``chunk_rows`` rows at a time, as out-of-core stores do.

        Parameters
        ----------
        batch_codes
            Code of every cell, shape ``(n_obs,)``, values in ``[0, n_batch)``.
        n_batch
            Number of batches.
        chunk_rows
            Rows summed at a time.

        Returns
        -------
        tuple
            ``(means_b, vars_b)``, float64 arrays of shape ``(n_batch,)``.
        """
        batch_n = np.asarray(batch_codes, dtype=np.int64)
        if batch_n.shape != (self.n_obs,):
            raise ValueError(f"batch_codes has shape {batch_n.shape}, expected ({self.n_obs},)")
        if batch_n.size and (batch_n.min() < 0 or batch_n.max() >= n_batch):
            raise ValueError(f"batch codes must lie in [0, {n_batch})")
        stats = _LogLibraryAccumulator(n_batch)
        for start in range(0, self.n_obs, chunk_rows):
            stop = min(start + chunk_rows, self.n_obs)
            total_n = np.asarray(self.read_range(start, stop).sum(axis=1, dtype=np.float64)).ravel()
            stats.add(total_n, batch_n[start:stop])
        return stats.result()


class MemoryStore(StoreReads):
    """Validated counts, gene names and cell metadata held in memory.

    Parameters
    ----------
    x
        Counts, cells x genes (scipy sparse or dense); validated with
        :func:`~scvi_scale.store.validate.validate_counts` and kept as CSR float32.
    var_names
        Unique gene names, one per column.
    obs
        Cell metadata, one row per cell, index = cell names; default: names ``"0"``, ``"1"``, ...
    source
        What messages call the data (a path, or ``<AnnData>``).
    drop_empty_cells
        Drop cells with zero total counts (and their ``obs`` rows) instead of raising.

    Attributes
    ----------
    X
        The counts, ``scipy.sparse.csr_matrix`` float32 with integer values.
    n_dropped
        Number of empty cells dropped on construction.
    """

    def __init__(
        self,
        x: sp.spmatrix | sp.sparray | np.ndarray,
        var_names: Sequence[str] | np.ndarray,
        obs: pd.DataFrame | None = None,
        *,
        source: str = "<memory>",
        drop_empty_cells: bool = False,
    ) -> None:
        n_obs = int(x.shape[0])
        if obs is None:
            obs = pd.DataFrame(index=pd.Index([str(i) for i in range(n_obs)]))
        elif obs.shape[0] != n_obs:
            raise InputError(f"{source}: {n_obs} rows in the count matrix but {obs.shape[0]} rows of cell metadata")
        obs_names = obs.index.astype(str).to_numpy()
        x_csr, keep, n_dropped = validate_counts(
            x, var_names, source, drop_empty_cells=drop_empty_cells, obs_names=obs_names
        )
        self.X: sp.csr_matrix = x_csr
        if keep is not None:
            # As AnnData subsetting does (e.g. after sc.pp.filter_cells), so codes match that workflow.
            obs = obs.iloc[keep].copy()
            for col in obs.columns:
                if isinstance(obs[col].dtype, pd.CategoricalDtype):
                    obs[col] = obs[col].cat.remove_unused_categories()
        self.obs: pd.DataFrame = obs
        self._var_names = np.asarray([str(v) for v in var_names], dtype=str)
        self.source = source
        self.n_dropped = n_dropped
        self.obsm: dict[str, np.ndarray] = {}  # per-cell outputs written by write_obsm
        self._metadata: dict[str, Any] = {"format_version": 1, "provenance": [{"source": source}]}

    @classmethod
    def from_anndata(
        cls,
        adata: anndata.AnnData,
        layer: str | None = None,
        source: str = "<AnnData>",
        drop_empty_cells: bool = False,
    ) -> MemoryStore:
        """Build a store from an AnnData's ``X`` (or ``layers[layer]``), ``obs`` and ``var_names``.

        Parameters
        ----------
        adata
            In memory or backed.
        layer
            Read counts from this layer instead of ``X``.
        source
            What messages call the data.
        drop_empty_cells
            Drop cells with zero total counts instead of raising.
        """
        if layer is not None:
            if layer not in adata.layers:
                raise InputError(
                    f"{source}: no layer '{layer}'; available layers: {sorted(adata.layers.keys()) or 'none'}"
                )
            x = adata.layers[layer]
        else:
            x = adata.X
            if x is None:
                raise InputError(
                    f"{source}: X is empty (None); choose a layer with counts, available layers: "
                    f"{sorted(adata.layers.keys()) or 'none'}"
                )
        if hasattr(x, "to_memory"):  # backed sparse dataset
            x = x.to_memory()
        elif not sp.issparse(x) and not isinstance(x, np.ndarray):  # h5py dataset of a backed dense X
            x = np.asarray(x[()])
        return cls(x, adata.var_names, adata.obs.copy(), source=source, drop_empty_cells=drop_empty_cells)

    @property
    def n_obs(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_vars(self) -> int:
        return int(self.X.shape[1])

    @property
    def var_names(self) -> np.ndarray:
        """Gene names in column order, as a ``str`` array."""
        return self._var_names

    def __repr__(self) -> str:
        return f"MemoryStore({self.source!r}, n_obs={self.n_obs}, n_vars={self.n_vars}, nnz={self.X.nnz})"

    @property
    def metadata(self) -> dict[str, Any]:
        """Store metadata (format version, provenance, and what ``prepare`` records), as the disk stores keep it."""
        return self._metadata

    def write_obsm(self, key: str, start: int, stop: int, values: np.ndarray) -> None:
        """Write rows ``start:stop`` of ``obsm[key]`` (created on first write; unwritten float rows are NaN)."""
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[0] != stop - start or not 0 <= start <= stop <= self.n_obs:
            raise ValueError(f"values of shape {values.shape} do not fit rows [{start}, {stop}) of {self.n_obs}")
        arr = self.obsm.get(key)
        if arr is None:
            arr = np.full((self.n_obs, values.shape[1]), np.nan if values.dtype.kind == "f" else 0, values.dtype)
            self.obsm[key] = arr
        elif arr.shape[1] != values.shape[1]:
            raise ValueError(f"obsm[{key!r}] has {arr.shape[1]} columns, values have {values.shape[1]}")
        arr[start:stop] = values

    def read_obsm(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``obsm[key]``."""
        if key not in self.obsm:
            raise InputError(f"{self.source}: no obsm[{key!r}]; available: {sorted(self.obsm) or 'none'}")
        return self.obsm[key][start : self.n_obs if stop is None else stop].copy()

    def read_rows(self, idx: np.ndarray) -> sp.csr_matrix:
        """Rows ``idx`` (any order, repeats allowed) as CSR float32, in the order given."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_obs):
            raise IndexError(f"row index out of range [0, {self.n_obs})")
        return self.X[idx]

    def read_range(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR float32."""
        if not 0 <= start <= stop <= self.n_obs:
            raise IndexError(f"row range [{start}, {stop}) outside [0, {self.n_obs})")
        return self.X[start:stop]

    # ---- prepare (scvi_scale.prep.prepare): results held with the object, written nowhere ----

    def read_var(self) -> pd.DataFrame:
        """Gene names as index, with any columns ``prepare`` added."""
        var = self.__dict__.get("_var")
        return pd.DataFrame(index=pd.Index(self.var_names)) if var is None else var.copy()

    def write_var_columns(self, frame: pd.DataFrame, drop: Sequence[str] = ()) -> None:
        """Add or replace gene columns (``frame``'s index must be the gene names) and remove ``drop``."""
        if [str(v) for v in frame.index] != [str(v) for v in self.var_names]:
            raise ValueError("frame's index must be the store's gene names, in order")
        var = self.read_var()
        var = var.drop(columns=[c for c in var.columns if c in {*frame.columns, *drop}])
        self._var = pd.concat([var, frame.set_axis(var.index)], axis=1)

    def update_metadata(self, key: str, value: object) -> None:
        """Set (or, with None, remove) one metadata entry."""
        meta = self.__dict__.setdefault("_metadata", {})
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value

    @property
    def prepared(self) -> dict | None:
        """The ``prepare`` entry recorded by :func:`scvi_scale.prep.prepare.prepare`, or None."""
        return self.__dict__.get("_metadata", {}).get("prepare")
