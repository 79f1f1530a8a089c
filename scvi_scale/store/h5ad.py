"""Reading an ``.h5ad`` file into a :class:`~scvi_scale.store.memory.MemoryStore`, with one-line errors.

Only the elements needed are read (``obs``, ``var`` and ``X`` or one layer, via ``anndata.io.read_elem``),
so unused layers, ``obsm`` and ``uns`` never reach memory; the count matrix itself is read whole. Streaming
conversion of files larger than memory belongs to the store converters, not here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from scvi_scale.store.errors import InputError
from scvi_scale.store.memory import MemoryStore

__all__ = ["read_h5ad"]

logger = logging.getLogger(__name__)

_CORRUPT_HINT = "the file may be truncated or corrupt; re-export it with adata.write_h5ad()"


def _check_file(path: Path, source: str) -> None:
    if not path.exists():
        raise InputError(f"{source}: no such file; check the path")
    if path.is_dir():
        raise InputError(f"{source}: is a directory, not an .h5ad file; pass the path of an .h5ad file")
    if path.stat().st_size == 0:
        raise InputError(f"{source}: the file is empty (0 bytes); {_CORRUPT_HINT}")
    if not h5py.is_hdf5(path):
        raise InputError(f"{source}: not an HDF5 file, so not an .h5ad (another format, or corrupt); {_CORRUPT_HINT}")


def _read_elem(f: h5py.File, key: str, source: str) -> object:
    import anndata.io  # heavy import, only when a file is actually read

    try:
        return anndata.io.read_elem(f[key])
    except InputError:
        raise
    except Exception as exc:  # any reader failure becomes one user-facing line
        raise InputError(f"{source}: cannot read '{key}' ({type(exc).__name__}: {exc}); {_CORRUPT_HINT}") from exc


def _layers(f: h5py.File) -> list[str]:
    return sorted(f["layers"].keys()) if "layers" in f and isinstance(f["layers"], h5py.Group) else []


def read_h5ad(path: str | os.PathLike[str], layer: str | None = None, drop_empty_cells: bool = False) -> MemoryStore:
    """Read counts, gene names and cell metadata of an ``.h5ad`` file and validate them.

    Parameters
    ----------
    path
        The ``.h5ad`` file. ``X`` (or the layer) may be stored as CSR, CSC or dense.
    layer
        Read counts from ``layers[layer]`` instead of ``X`` (e.g. ``"counts"`` when ``X`` is normalised).
    drop_empty_cells
        Drop cells with zero total counts instead of raising.

    Returns
    -------
    MemoryStore
        With ``source`` set to the path as given.

    Raises
    ------
    InputError
        Missing, empty, non-HDF5 or corrupt file; not an AnnData file; missing layer or ``X``; and every
        count problem :func:`~scvi_scale.store.validate.validate_counts` checks (empty matrix, non-integer,
        negative or non-finite values, empty cells, duplicated gene names).
    """
    path = Path(path)
    source = str(path)
    _check_file(path, source)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{source}: cannot be opened as HDF5 ({exc}); {_CORRUPT_HINT}") from exc
    with f:
        if "obs" not in f or "var" not in f:
            raise InputError(
                f"{source}: an HDF5 file but not an AnnData .h5ad (no 'obs'/'var' groups); "
                "write it with anndata's adata.write_h5ad()"
            )
        if layer is not None:
            if layer not in _layers(f):
                raise InputError(f"{source}: no layer '{layer}'; available layers: {_layers(f) or 'none'}")
            key = f"layers/{layer}"
        else:
            if "X" not in f:
                raise InputError(
                    f"{source}: the file has no X matrix; pass --layer with one of: {_layers(f) or 'none (no layers)'}"
                )
            key = "X"
        var = _read_elem(f, "var", source)
        obs = _read_elem(f, "obs", source)
        x = _read_elem(f, key, source)
    if not (sp.issparse(x) or isinstance(x, np.ndarray)):
        raise InputError(f"{source}: '{key}' is a {type(x).__name__}, not a count matrix; {_CORRUPT_HINT}")
    if x.ndim != 2 or x.shape != (obs.shape[0], var.shape[0]):
        raise InputError(
            f"{source}: '{key}' has shape {x.shape} but the file has {obs.shape[0]} cells and {var.shape[0]} "
            f"genes; {_CORRUPT_HINT}"
        )
    store = MemoryStore(x, var.index, obs, source=source, drop_empty_cells=drop_empty_cells)
    logger.info("read %s: %d cells x %d genes from '%s'", source, store.n_obs, store.n_vars, key)
    return store
