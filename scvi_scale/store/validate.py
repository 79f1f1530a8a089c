"""Count validation: the "counts are counts" contract every store and converter enforces before writing.

scVI models raw UMI counts with a ZINB likelihood, so the matrix must hold finite, non-negative integers,
every cell must have a positive total (the observed library is ``log(total)``), and gene names must be
unique (they are the model's input order). Each failure raises :class:`~scvi_scale.store.errors.InputError`
naming the file, the first offending row and gene, and what to do.

The checks work on row blocks (``chunk_rows`` rows at a time) with vectorised numpy, so temporaries stay
bounded on large matrices and streaming converters can call :func:`check_count_block` on each block they
read, passing ``row_offset`` so that messages name global rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from scvi_scale.store.errors import InputError

__all__ = ["DEFAULT_CHUNK_ROWS", "ValidatedCounts", "check_count_block", "check_var_names", "validate_counts"]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 10_000
_RAW_HINT = "pass raw integer counts (e.g. --layer counts), not normalised or log-transformed values"


class ValidatedCounts(NamedTuple):
    """What :func:`validate_counts` returns (a tuple, so it unpacks as ``x, keep, n_dropped``).

    Attributes
    ----------
    x
        The counts as a canonical (sorted, summed-duplicate) CSR matrix of float32 holding integer values,
        with empty cells removed when ``drop_empty_cells`` was set. It may share memory with the input
        when the input already was a canonical float32 ``csr_matrix`` and nothing was dropped.
    keep
        Boolean mask over the input rows, ``True`` for kept cells; ``None`` when no cell was dropped.
    n_dropped
        Number of empty cells dropped (0 unless ``drop_empty_cells``).
    """

    x: sp.csr_matrix
    keep: np.ndarray | None
    n_dropped: int


def _cell(row: int, obs_names: Sequence[str] | np.ndarray | None) -> str:
    return f"row {row} ('{obs_names[row]}')" if obs_names is not None else f"row {row}"


def check_var_names(var_names: Sequence[str] | np.ndarray, source: str, n_vars: int | None = None) -> np.ndarray:
    """Check that gene names are unique (and match the matrix width); return them as a str array.

    Parameters
    ----------
    var_names
        One name per gene (column).
    source
        The file (or ``<AnnData>``) the names come from, used in messages.
    n_vars
        Number of matrix columns, if known; a different length is an error.

    Returns
    -------
    numpy.ndarray
        The names as a 1-D array of ``str``.
    """
    names_g = np.asarray([str(v) for v in var_names], dtype=str) if len(var_names) else np.zeros(0, dtype=str)
    if n_vars is not None and names_g.shape[0] != n_vars:
        raise InputError(
            f"{source}: the count matrix has {n_vars} genes but {names_g.shape[0]} gene names; "
            "the file is inconsistent, rewrite it with one name per column"
        )
    uniq, first_idx, counts = np.unique(names_g, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        dup = dup[np.argsort(first_idx[counts > 1])]  # report in file order, not sorted order
        shown = ", ".join(f"'{d}'" for d in dup[:3]) + (f" and {dup.shape[0] - 3} more" if dup.shape[0] > 3 else "")
        raise InputError(
            f"{source}: {dup.shape[0]} gene names are duplicated ({shown}); gene names must be unique, "
            "e.g. run adata.var_names_make_unique() or aggregate the duplicated genes, then rewrite the file"
        )
    return names_g


def _first_flagged(x_block: sp.csr_matrix | np.ndarray, bad: np.ndarray) -> tuple[int, int, float]:
    """(row within block, column, value) of the first flagged entry in row-major order."""
    if sp.issparse(x_block):
        pos = int(np.argmax(bad))
        row = int(np.searchsorted(x_block.indptr, pos, side="right") - 1)
        return row, int(x_block.indices[pos]), float(x_block.data[pos])
    row, col = divmod(int(np.argmax(bad.ravel())), x_block.shape[1])
    return row, col, float(x_block[row, col])


def check_count_block(
    x_block: sp.csr_matrix | np.ndarray,
    source: str,
    var_names: Sequence[str] | np.ndarray,
    *,
    row_offset: int = 0,
    obs_names: Sequence[str] | np.ndarray | None = None,
) -> np.ndarray:
    """Check one row block of counts and return each row's total.

    Parameters
    ----------
    x_block
        Rows ``row_offset ...`` of the count matrix, CSR or dense.
    source
        The file the block comes from, used in messages.
    var_names
        Gene names of the columns, used in messages.
    row_offset
        Global index of the block's first row, so that messages name the row in the whole file.
    obs_names
        Optional cell names of the *whole* matrix (indexed by global row), used in messages.

    Returns
    -------
    numpy.ndarray
        ``total_n``: float64 row sums of the block.

    Raises
    ------
    InputError
        On a NaN or infinite, negative or non-integer value (checked in that order), naming the first one.
    """
    values = x_block.data if sp.issparse(x_block) else np.asarray(x_block)
    kind = values.dtype.kind
    if kind not in "biuf":
        raise InputError(f"{source}: the count matrix has dtype {values.dtype}, not numbers; {_RAW_HINT}")
    checks = []
    if kind == "f":
        checks.append((lambda v: ~np.isfinite(v), "a non-finite value ({value})", "counts must be finite"))
    if kind in "if":
        checks.append((lambda v: v < 0, "a negative value ({value:g})", "counts must be non-negative"))
    if kind == "f":
        checks.append((lambda v: v != np.rint(v), "a non-integer value ({value:g})", "scVI models raw counts"))
    for flag, what, why in checks:
        bad = flag(values)
        if bad.any():
            row, col, value = _first_flagged(x_block, bad)
            where = _cell(row_offset + row, obs_names)
            raise InputError(
                f"{source}: {what.format(value=value)} at {where}, gene '{var_names[col]}'; {why}, {_RAW_HINT}"
            )
    if sp.issparse(x_block):
        return np.asarray(x_block.sum(axis=1, dtype=np.float64)).ravel()
    return values.sum(axis=1, dtype=np.float64)


def _row_block(x: sp.csr_matrix | np.ndarray, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
    """Rows ``start:stop`` of ``x`` without copying the values of a CSR matrix."""
    if not sp.issparse(x):
        return x[start:stop]
    lo, hi = x.indptr[start], x.indptr[stop]
    return sp.csr_matrix(
        (x.data[lo:hi], x.indices[lo:hi], x.indptr[start : stop + 1] - lo), shape=(stop - start, x.shape[1])
    )


def validate_counts(
    x: sp.spmatrix | sp.sparray | np.ndarray,
    var_names: Sequence[str] | np.ndarray,
    source: str,
    *,
    drop_empty_cells: bool = False,
    obs_names: Sequence[str] | np.ndarray | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> ValidatedCounts:
    """Check a whole count matrix block by block and return it as canonical float32 CSR.

    Parameters
    ----------
    x
        Counts, cells x genes: any scipy sparse matrix or array (CSR is read without conversion; CSC and
        others are converted to CSR first), or a dense array.
    var_names
        One name per gene, must be unique.
    source
        The file (or ``<AnnData>``) the counts come from, named in every message.
    drop_empty_cells
        Drop cells whose total count is zero (and log how many) instead of raising.
    obs_names
        Optional cell names, only used to name the offending cell in messages.
    chunk_rows
        Rows checked at a time; bounds the temporaries to about one block.

    Returns
    -------
    ValidatedCounts
        ``(x, keep, n_dropped)``: the CSR float32 counts, the mask of kept input rows (``None`` when none
        were dropped) and the number of dropped cells.

    Raises
    ------
    InputError
        Empty matrix (0 cells or 0 genes), wrong number of gene names, duplicated gene names, a NaN,
        infinite, negative or non-integer value, or (without ``drop_empty_cells``) cells with zero counts.
    """
    if not sp.issparse(x):
        x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"{source}: the count matrix must be 2-D (cells x genes), got shape {x.shape}")
    n_obs, n_vars = (int(s) for s in x.shape)
    if n_obs == 0 or n_vars == 0:
        raise InputError(
            f"{source}: the count matrix is empty ({n_obs} cells x {n_vars} genes); "
            "choose a file (or layer) that holds counts"
        )
    names_g = check_var_names(var_names, source, n_vars)
    if obs_names is not None and len(obs_names) != n_obs:
        raise InputError(f"{source}: {n_obs} rows in the count matrix but {len(obs_names)} cell names")
    if sp.issparse(x) and not isinstance(x, sp.csr_matrix):
        x = sp.csr_matrix(x)  # CSC/COO/sparse arrays: one conversion, O(nnz)

    total_n = np.empty(n_obs, dtype=np.float64)
    dense_blocks = []
    for start in range(0, n_obs, chunk_rows):
        stop = min(start + chunk_rows, n_obs)
        block = _row_block(x, start, stop)
        total_n[start:stop] = check_count_block(block, source, names_g, row_offset=start, obs_names=obs_names)
        if not sp.issparse(x):
            dense_blocks.append(sp.csr_matrix(block, dtype=np.float32))

    empty = total_n == 0
    n_empty = int(empty.sum())
    if n_empty and not drop_empty_cells:
        first = _cell(int(np.argmax(empty)), obs_names)
        raise InputError(
            f"{source}: {n_empty} of {n_obs} cells have zero total counts (first: {first}); "
            "scVI needs a positive library size, so filter them out or pass --drop-empty-cells"
        )
    if n_empty == n_obs:
        raise InputError(f"{source}: all {n_obs} cells have zero total counts; the matrix holds no counts")

    if dense_blocks:
        x_csr = sp.vstack(dense_blocks, format="csr", dtype=np.float32)
    else:
        x_csr = x if x.dtype == np.float32 else x.astype(np.float32)
    if not x_csr.has_canonical_format:
        x_csr = x_csr.copy() if x_csr is x else x_csr  # never reorder the caller's arrays in place
        x_csr.sum_duplicates()
    if n_empty:
        keep = ~empty
        logger.info("%s: dropped %d of %d cells with zero total counts", source, n_empty, n_obs)
        return ValidatedCounts(x_csr[keep], keep, n_empty)
    return ValidatedCounts(x_csr, None, 0)
