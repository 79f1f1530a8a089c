"""Readers for conversion inputs: ``.h5ad``, AnnData ``.zarr``, 10x ``.h5`` and 10x ``matrix.mtx`` folders.

Every reader is a :class:`CountInput`: the input's gene names and ``obs`` are held in memory (small next to
the counts), the counts are read in row blocks of about ``max_entries`` stored entries cut at row boundaries,
never whole. Reading takes two passes: :meth:`CountInput.scan` finds the largest count (the store's count
dtype depends on it) and whatever else a reader needs before streaming; :meth:`CountInput.blocks` yields
``(start, stop, block)`` with ``block`` the rows ``start:stop`` over :attr:`CountInput.var_names` (CSR, or
dense rows of a dense AnnData ``X``), unvalidated: the converter checks every block.

:func:`open_input` picks the reader from the path:

- a folder holding ``matrix.mtx(.gz)``, or that file itself: 10x MatrixMarket (:mod:`scvi_scale.store.mtx`);
- ``*.h5``: 10x CellRanger HDF5 (v3 ``/matrix``, v2 ``/<genome>``), or AnnData when it holds ``X``/``obs``/``var``;
- ``*.zarr`` (or a folder with ``zarr.json``/``.zgroup``): AnnData Zarr, v2 or v3 format, scvi-scale stores included;
- ``*.h5ad``: AnnData HDF5;
- a TileDB group folder or an ``s3://`` URL: a TileDB-SOMA experiment (:mod:`scvi_scale.store.soma_input`).

10x inputs keep only the "Gene Expression" features when the features table has a type column (antibody
capture, CRISPR guides and custom features are not genes), and name genes by symbol (``gene_symbols``, as
scanpy does) or by ID (``gene_ids``).
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.store.errors import InputError
from scvi_scale.store.validate import check_var_names

__all__ = [
    "KINDS_HINT",
    "VAR_NAMES",
    "ArrayInput",
    "CountInput",
    "gene_columns",
    "open_input",
    "row_cuts",
    "select_columns",
]

KINDS_HINT = (
    "an .h5ad file, an AnnData .zarr store, a 10x .h5 file, a 10x folder with matrix.mtx(.gz), "
    "features.tsv(.gz) and barcodes.tsv(.gz), or a TileDB-SOMA experiment (folder or s3:// URL)"
)
VAR_NAMES = ("gene_symbols", "gene_ids")
_INDPTR_WINDOW = 1 << 20  # rows of indptr held at a time: 8 MB
_GEX = "Gene Expression"

Block = sp.csr_matrix | np.ndarray


def _no_progress(n: int) -> None:
    return None


def row_cuts(ptr: np.ndarray, max_entries: int) -> Iterator[tuple[int, int]]:
    """Cut the rows whose entry offsets are ``ptr`` (``n + 1`` long) into runs of about ``max_entries`` entries.

    Every run holds at least one row (a row is never split), otherwise as many rows as fit.
    """
    n, start = ptr.shape[0] - 1, 0
    while start < n:
        stop = int(np.searchsorted(ptr, ptr[start] + max_entries, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        yield start, stop
        start = stop


def select_columns(block: sp.csr_matrix, col_map: np.ndarray, n_out: int) -> sp.csr_matrix:
    """``block`` with column ``j`` moved to ``col_map[j]`` and columns mapped to -1 dropped (row order kept)."""
    cols = col_map[block.indices]
    keep = cols >= 0
    indptr, data = block.indptr, block.data
    if not keep.all():
        row_of = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        indptr = np.zeros(block.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of[keep], minlength=block.shape[0]), out=indptr[1:])
        cols, data = cols[keep], data[keep]
    return sp.csr_matrix((data, cols.astype(np.int32), indptr), shape=(block.shape[0], n_out))


def _stat(path: Path) -> tuple[int, float]:
    """Size (bytes; all files of a folder) and latest modification time of an input."""
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_mtime
    size, mtime = 0, path.stat().st_mtime
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            size, mtime = size + st.st_size, max(mtime, st.st_mtime)
    return size, mtime


class CountInput(ABC):
    """One input: names and metadata in memory, counts read in row blocks.

    Attributes
    ----------
    path
        The file or folder given.
    kind
        ``"h5ad"``, ``"anndata-zarr"``, ``"10x-h5"`` or ``"10x-mtx"``.
    key
        Where the counts live inside it (``X``, ``layers/counts``, ``matrix``, ``matrix.mtx.gz``).
    var_names, obs
        Gene names (unique, column order of the blocks) and cell metadata (index: cell names).
    nnz
        Stored entries (``n_obs * n_vars`` for dense counts): what :meth:`scan` reports progress in.
    max_entries
        Entries per row block, from the memory budget (the converter may set it again before reading).
    """

    kind = ""

    def __init__(
        self, path: Path, key: str, var_names: np.ndarray, obs: pd.DataFrame, nnz: int, max_entries: int
    ) -> None:
        self.path, self.key, self.var_names, self.obs = path, key, var_names, obs
        self.n_obs, self.nnz, self.max_entries = int(obs.shape[0]), int(nnz), int(max_entries)

    @property
    def source(self) -> str:
        """The file named in messages."""
        return str(self.path)

    @abstractmethod
    def scan(self, progress: Callable[[int], object] = _no_progress) -> float:
        """First pass: the largest stored count (NaN and negatives are left for validation to report).

        ``progress`` is called with the number of entries read since its last call.
        """

    @abstractmethod
    def blocks(self) -> Iterator[tuple[int, int, Block]]:
        """Yield ``(start, stop, block)``: rows ``start:stop`` over :attr:`var_names`, in row order."""

    def provenance(self) -> dict[str, Any]:
        size, mtime = _stat(self.path)
        return {
            "path": str(self.path.resolve()),
            "kind": self.kind,
            "key": self.key,
            "size_bytes": size,
            "mtime": mtime,
        }


class ArrayInput(CountInput):
    """Counts in arrays read by slices (h5py datasets or zarr arrays): CSR ``data``/``indices``/``indptr``, or dense.

    ``open_node`` is a context manager factory giving the CSR group (or dense array) for the duration of a pass;
    ``col_map`` (source column -> column of :attr:`var_names`, -1 to drop) filters 10x feature types.
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        key: str,
        var_names: np.ndarray,
        obs: pd.DataFrame,
        open_node: Callable[[], contextlib.AbstractContextManager[Any]],
        *,
        dense: bool,
        n_cols: int,
        nnz: int,
        max_entries: int,
        col_map: np.ndarray | None = None,
    ) -> None:
        super().__init__(path, key, var_names, obs, nnz, max_entries)
        self.kind, self.dense, self.n_cols = kind, dense, n_cols
        self._open, self._col_map = open_node, col_map

    def scan(self, progress: Callable[[int], object] = _no_progress) -> float:
        with self._open() as node:
            ds = node if self.dense else node["data"]
            kind = np.dtype(ds.dtype).kind
            if kind in "ui" and np.dtype(ds.dtype).itemsize <= 2:
                progress(self.nnz)
                return float(np.iinfo(ds.dtype).max)
            if kind not in "biuf":
                return 0.0  # not numbers: the first block's validation says so
            step = max(1, self.max_entries // max(1, self.n_cols)) if self.dense else self.max_entries
            best = 0.0
            for lo in range(0, ds.shape[0], step):
                part = np.asarray(ds[lo : lo + step])
                best = max(best, float(np.nanmax(part, initial=0)))
                progress(part.size)
            return best

    def blocks(self) -> Iterator[tuple[int, int, Block]]:
        with self._open() as node:
            if self.dense:
                step = max(1, self.max_entries // max(1, self.n_cols))
                for start in range(0, self.n_obs, step):
                    yield start, min(start + step, self.n_obs), np.asarray(node[start : start + step])
                return
            ptr_ds, data_ds, ind_ds = node["indptr"], node["data"], node["indices"]
            for w0 in range(0, self.n_obs, _INDPTR_WINDOW):
                ptr = np.asarray(ptr_ds[w0 : min(w0 + _INDPTR_WINDOW, self.n_obs) + 1], dtype=np.int64)
                for start, stop in row_cuts(ptr, self.max_entries):
                    lo, hi = int(ptr[start]), int(ptr[stop])
                    shape = (stop - start, self.n_cols)
                    block = sp.csr_matrix((data_ds[lo:hi], ind_ds[lo:hi], ptr[start : stop + 1] - lo), shape=shape)
                    if self._col_map is not None:
                        block = select_columns(block, self._col_map, len(self.var_names))
                    yield w0 + start, w0 + stop, block


def _decode(values: Any) -> np.ndarray:
    return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=str)


def gene_columns(
    ids: np.ndarray, names: np.ndarray | None, types: np.ndarray | None, source: str, var_names: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """10x features -> (gene names, column map or ``None`` when every feature is kept).

    Only "Gene Expression" features are kept when ``types`` is given; ``var_names`` picks symbols or IDs.
    """
    keep = np.ones(ids.shape[0], dtype=bool) if types is None else types == _GEX
    if not keep.any():
        raise InputError(f"{source}: no '{_GEX}' features (types: {sorted(set(types))}); this is not an RNA matrix")
    chosen = (names if var_names == "gene_symbols" and names is not None else ids)[keep]
    dup = pd.Index(chosen)
    if var_names == "gene_symbols" and not dup.is_unique:
        repeated = dup[dup.duplicated()].unique()
        shown = ", ".join(f"'{d}'" for d in repeated[:3]) + (
            f" and {len(repeated) - 3} more" if len(repeated) > 3 else ""
        )
        raise InputError(
            f"{source}: {len(repeated)} gene symbols are duplicated ({shown}); pass --var-names gene_ids "
            "(var_names='gene_ids') to name genes by their unique IDs"
        )
    chosen = check_var_names(chosen, source)
    col_map = None if keep.all() else np.where(keep, np.cumsum(keep) - 1, -1).astype(np.int64)
    return chosen, col_map


@contextlib.contextmanager
def _h5_node(path: Path, key: str) -> Iterator[Any]:
    with h5py.File(path, "r") as f:
        yield f[key]


def _anndata_parts(
    root: Any, source: str, layer: str | None, dense_type: type
) -> tuple[str, pd.DataFrame, np.ndarray, bool, int, int]:
    """(key, obs, var_names, dense, n_vars, nnz) of an AnnData group (h5py File or zarr Group) ``root``."""
    import anndata.io

    key = f"layers/{layer}" if layer is not None else "X"
    if key not in root:
        raise InputError(f"{source}: no '{key}' in the file; pass --layer with the layer holding raw counts")
    if "obs" not in root or "var" not in root:
        raise InputError(f"{source}: not an AnnData file (no obs/var); write it with anndata")
    obs = anndata.io.read_elem(root["obs"])
    var_names = check_var_names(anndata.io.read_elem(root["var"]).index, source)
    node = root[key]
    dense = isinstance(node, dense_type)
    enc = node.attrs.get("encoding-type", "array")
    if not dense and enc != "csr_matrix":
        raise InputError(
            f"{source}: '{key}' is stored as {enc}; streaming needs CSR (or dense) rows, so rewrite it with "
            "adata.X = adata.X.tocsr() and write it again"
        )
    shape = tuple(int(s) for s in (node.shape if dense else node.attrs["shape"]))
    if shape != (obs.shape[0], var_names.shape[0]) or shape[0] == 0:
        raise InputError(f"{source}: '{key}' has shape {shape} for {obs.shape[0]} cells x {var_names.shape[0]} genes")
    nnz = shape[0] * shape[1] if dense else int(node["data"].shape[0])
    return key, obs, var_names, dense, shape[1], nnz


def _open_h5ad(path: Path, layer: str | None, max_entries: int) -> ArrayInput:
    with h5py.File(path, "r") as f:
        key, obs, var_names, dense, n_vars, nnz = _anndata_parts(f, str(path), layer, h5py.Dataset)
    return ArrayInput(
        path, "h5ad", key, var_names, obs, lambda: _h5_node(path, key),
        dense=dense, n_cols=n_vars, nnz=nnz, max_entries=max_entries,
    )  # fmt: skip


def _open_anndata_zarr(path: Path, layer: str | None, max_entries: int) -> ArrayInput:
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # any zarr failure to open becomes one line
        raise InputError(f"{path}: cannot open as a Zarr group ({type(exc).__name__}: {exc})") from exc
    meta = root.attrs.get("scvi_scale")
    if isinstance(meta, dict) and not meta.get("complete"):
        raise InputError(f"{path}: an incomplete scvi-scale store (an interrupted conversion); rebuild it first")
    key, obs, var_names, dense, n_vars, nnz = _anndata_parts(root, str(path), layer, zarr.Array)
    return ArrayInput(
        path, "anndata-zarr", key, var_names, obs, lambda: contextlib.nullcontext(root[key]),
        dense=dense, n_cols=n_vars, nnz=nnz, max_entries=max_entries,
    )  # fmt: skip


def _open_10x_h5(path: Path, var_names: str, max_entries: int) -> ArrayInput:
    with h5py.File(path, "r") as f:
        if "matrix" in f and "features" in f["matrix"]:  # CellRanger >= 3
            group, feats = "matrix", f["matrix/features"]
            ids = _decode(feats["id"][:])
            names = _decode(feats["name"][:]) if "name" in feats else None
            types = _decode(feats["feature_type"][:]) if "feature_type" in feats else None
        else:  # CellRanger 2: one group per genome
            genomes = [k for k in f if isinstance(f[k], h5py.Group) and {"indptr", "barcodes", "genes"} <= set(f[k])]
            if len(genomes) != 1:
                raise InputError(
                    f"{path}: not a 10x .h5 matrix (found {len(genomes)} genome groups with indptr/barcodes/genes; "
                    "one is supported) and not AnnData (no X/obs/var)"
                )
            group, types = genomes[0], None
            ids = _decode(f[group]["genes"][:])
            names = _decode(f[group]["gene_names"][:]) if "gene_names" in f[group] else None
        g = f[group]
        missing = [k for k in ("data", "indices", "indptr", "shape", "barcodes") if k not in g]
        if missing:
            raise InputError(f"{path}: 10x group '{group}' lacks {missing}; the file is damaged or not a 10x matrix")
        n_features, n_cells = (int(s) for s in g["shape"][:])
        barcodes = _decode(g["barcodes"][:])
        nnz = int(g["data"].shape[0])
        if len(ids) != n_features or len(barcodes) != n_cells or g["indptr"].shape[0] != n_cells + 1:
            raise InputError(
                f"{path}: shape {n_features} features x {n_cells} cells disagrees with {len(ids)} features, "
                f"{len(barcodes)} barcodes and {g['indptr'].shape[0]} indptr entries; the file is damaged"
            )
    genes, col_map = gene_columns(ids, names, types, str(path), var_names)
    obs = pd.DataFrame(index=pd.Index(barcodes))
    # CSC genes x cells (indptr over cells) is CSR cells x genes: the same reader as an AnnData CSR X
    return ArrayInput(
        path, "10x-h5", group, genes, obs, lambda: _h5_node(path, group),
        dense=False, n_cols=n_features, nnz=nnz, max_entries=max_entries, col_map=col_map,
    )  # fmt: skip


def _is_anndata_h5(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        return "obs" in f and "var" in f and ("X" in f or "layers" in f)


def open_input(
    path: str | os.PathLike[str], *, max_entries: int, layer: str | None = None, var_names: str = "gene_symbols"
) -> CountInput:
    """Open one input for streaming; the kind comes from the path (see the module docstring).

    Parameters
    ----------
    path
        A local file or folder.
    max_entries
        Stored entries per row block.
    layer
        AnnData inputs: read ``layers[layer]`` instead of ``X`` (10x inputs hold raw counts only and ignore it).
    var_names
        10x inputs: ``"gene_symbols"`` (default) or ``"gene_ids"``.
    """
    from scvi_scale.store.mtx import MTX_NAMES, open_mtx
    from scvi_scale.store.soma_input import is_soma, open_soma  # imports tiledbsoma only when opening one

    if var_names not in VAR_NAMES:
        raise InputError(f"var_names must be one of {list(VAR_NAMES)}, got {var_names!r}")
    if is_soma(path):
        return open_soma(path, max_entries=max_entries, layer=layer, var_names=var_names)
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the path")
    name = path.name.lower()
    if path.is_dir():
        if any((path / m).is_file() for m in MTX_NAMES):
            return open_mtx(path, None, var_names, max_entries)
        if name.endswith(".zarr") or (path / "zarr.json").is_file() or (path / ".zgroup").is_file():
            return _open_anndata_zarr(path, layer, max_entries)
    elif name.endswith((".mtx", ".mtx.gz")):
        return open_mtx(path.parent, path, var_names, max_entries)
    elif name.endswith((".h5ad", ".h5")):
        if not h5py.is_hdf5(path):
            raise InputError(f"{path}: not an HDF5 file (truncated, or another format under an HDF5 name)")
        if name.endswith(".h5ad") or _is_anndata_h5(path):
            return _open_h5ad(path, layer, max_entries)
        return _open_10x_h5(path, var_names, max_entries)
    raise InputError(f"{path}: not an input scvi-scale converts; expected {KINDS_HINT}")
