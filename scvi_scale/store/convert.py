"""Streaming conversion of ``.h5ad`` files into a Zarr count store (:func:`convert`) and growing it (:func:`append`).

Each input is read in row blocks through h5py (``X`` or a layer; CSR or dense), never whole: a block holds
about ``memory_budget_bytes / BYTES_PER_ENTRY`` entries, cut at row boundaries from ``indptr``, is validated
with :func:`~scvi_scale.store.validate.check_count_block` (messages name the file and its row), mapped to the
store's genes and appended to ``X``. Inputs' ``obs``/``var`` are held in memory (small next to ``X``). A first
pass over ``X/data`` finds the largest count, so that the store's counts are uint16 when they fit.

A conversion writes to a hidden sibling (``.NAME.converting``), sets the commit flag last and renames it
into place; a killed run leaves only that sibling, which the next run removes. :func:`append` works in place
with the commit flag cleared, and rolls a half-done append back before retrying.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from scvi_scale.store.errors import InputError
from scvi_scale.store.validate import check_count_block, check_var_names
from scvi_scale.store.zarr_store import (
    CsrAppender,
    ZarrStore,
    count_dtype_for,
    create_layout,
    set_complete,
    truncate,
    write_elem,
)

__all__ = ["BYTES_PER_ENTRY", "DEFAULT_MEMORY_BUDGET", "append", "convert"]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 1 << 30
# Peak bytes per stored entry of a block: source data+indices, validation masks and rint copy, mapped
# indices, float64 row sums, the output copy (measured order of magnitude, rounded up).
BYTES_PER_ENTRY = 48
_INDPTR_WINDOW = 1 << 20


@dataclass
class _Input:
    """One source file: its names and metadata, and where its counts live."""

    path: Path
    key: str
    var_names: np.ndarray
    obs: pd.DataFrame
    dense: bool
    source: str
    n_obs: int
    max_entries: int  # entries per row block, from the memory budget


def _open_input(path: str | os.PathLike[str], layer: str | None, max_entries: int) -> _Input:
    import anndata.io

    path = Path(path)
    if not path.is_file() or not h5py.is_hdf5(path):
        raise InputError(f"{path}: not an existing .h5ad file; check the path")
    with h5py.File(path, "r") as f:
        key = f"layers/{layer}" if layer is not None else "X"
        if key not in f:
            raise InputError(f"{path}: no '{key}' in the file; pass --layer with the layer holding raw counts")
        if "obs" not in f or "var" not in f:
            raise InputError(f"{path}: not an AnnData .h5ad (no obs/var); write it with adata.write_h5ad()")
        obs = anndata.io.read_elem(f["obs"])
        var_names = check_var_names(anndata.io.read_elem(f["var"]).index, str(path))
        node = f[key]
        dense = isinstance(node, h5py.Dataset)
        enc = node.attrs.get("encoding-type", "array")
        if not dense and enc != "csr_matrix":
            raise InputError(
                f"{path}: '{key}' is stored as {enc}; streaming needs CSR (or dense) rows, so rewrite it with "
                "adata.X = adata.X.tocsr(); adata.write_h5ad(...)"
            )
        shape = tuple(int(s) for s in (node.shape if dense else node.attrs["shape"]))
    if shape != (obs.shape[0], var_names.shape[0]) or shape[0] == 0:
        raise InputError(f"{path}: '{key}' has shape {shape} for {obs.shape[0]} cells x {var_names.shape[0]} genes")
    return _Input(path, key, var_names, obs, dense, str(path), shape[0], max_entries)


def _iter_blocks(f: h5py.File, inp: _Input):
    """Yield ``(start, stop, block)`` row blocks of about ``max_entries`` stored entries (CSR or dense)."""
    node, max_entries = f[inp.key], inp.max_entries
    if inp.dense:
        step = max(1, max_entries // max(1, inp.var_names.shape[0]))
        for start in range(0, inp.n_obs, step):
            yield start, min(start + step, inp.n_obs), node[start : start + step]
        return
    ptr_ds, data_ds, ind_ds = node["indptr"], node["data"], node["indices"]
    for w0 in range(0, inp.n_obs, _INDPTR_WINDOW):
        ptr = np.asarray(ptr_ds[w0 : min(w0 + _INDPTR_WINDOW, inp.n_obs) + 1], dtype=np.int64)
        start = 0
        while start < ptr.shape[0] - 1:
            stop = int(np.searchsorted(ptr, ptr[start] + max_entries, side="right")) - 1
            stop = min(max(stop, start + 1), ptr.shape[0] - 1)
            lo, hi = int(ptr[start]), int(ptr[stop])
            block = sp.csr_matrix(
                (data_ds[lo:hi], ind_ds[lo:hi], ptr[start : stop + 1] - lo), shape=(stop - start, len(inp.var_names))
            )
            yield w0 + start, w0 + stop, block
            start = stop


def _max_count(f: h5py.File, inp: _Input) -> float:
    """Largest stored value (first pass; NaN and negatives are left for validation to report)."""
    node = f[inp.key]
    ds = node if inp.dense else node["data"]
    if ds.dtype.kind in "ui" and ds.dtype.itemsize <= 2:
        return float(np.iinfo(ds.dtype).max)
    step = max(1, inp.max_entries // ds.shape[1]) if inp.dense else inp.max_entries  # rows of dense X, entries of CSR
    return max(float(np.nanmax(ds[lo : lo + step], initial=0)) for lo in range(0, ds.shape[0], step))


def _gene_space(inputs: list[_Input], genes: str | os.PathLike[str]) -> tuple[np.ndarray, str]:
    if isinstance(genes, str) and genes in ("union", "intersection"):
        if genes == "union":
            names = pd.unique(np.concatenate([inp.var_names for inp in inputs]))
        else:
            shared = set(inputs[0].var_names).intersection(*(set(inp.var_names) for inp in inputs[1:]))
            names = np.asarray([g for g in inputs[0].var_names if g in shared])
        mode = genes
    else:
        gene_file = Path(genes)
        if not gene_file.is_file():
            raise InputError(f"{gene_file}: gene list not found; pass 'union', 'intersection' or a file of names")
        names = np.asarray([ln.strip() for ln in gene_file.read_text().splitlines() if ln.strip()])
        names = check_var_names(names, str(gene_file))
        mode = f"file:{gene_file}"
    if len(names) == 0:
        raise InputError(f"the inputs share no genes ({mode}); check that they use the same gene naming")
    return np.asarray(names, dtype=str), mode


def _to_store_block(block, col_map: np.ndarray, n_out: int) -> sp.csr_matrix:
    """A validated source block as canonical CSR over the output genes (dropped genes removed)."""
    csr = sp.csr_matrix(block)
    if not csr.has_canonical_format:
        csr.sum_duplicates()
    cols = col_map[csr.indices]
    keep = cols >= 0
    indptr, data = csr.indptr, csr.data
    if not keep.all():
        row_of = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
        indptr = np.zeros(csr.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of[keep], minlength=csr.shape[0]), out=indptr[1:])
        cols, data = cols[keep], data[keep]
    out = sp.csr_matrix((data, cols.astype(np.int32), indptr), shape=(csr.shape[0], n_out))
    out.has_sorted_indices = False
    out.sort_indices()  # a reordered gene space scrambles the order within rows
    return out


def _write_block(writer: CsrAppender, block: sp.csr_matrix) -> None:
    writer.append(block)


def _stream_file(inp: _Input, writer: CsrAppender, out_genes: np.ndarray, drop_empty: bool, pbar) -> np.ndarray:
    """Append one file's rows to ``writer``; return the mask of rows kept."""
    col_map = pd.Index(out_genes).get_indexer(inp.var_names).astype(np.int64)  # -1: gene not kept
    obs_names = inp.obs.index.astype(str).to_numpy()
    keep_n = np.ones(inp.n_obs, dtype=bool)
    with h5py.File(inp.path, "r") as f:
        for start, stop, block in _iter_blocks(f, inp):
            total = check_count_block(block, inp.source, inp.var_names, row_offset=start, obs_names=obs_names)
            out = _to_store_block(block, col_map, len(out_genes))
            empty = (total == 0) | (np.diff(out.indptr) == 0)
            if empty.any():
                if not drop_empty:
                    row = int(np.argmax(empty))
                    why = "has zero total counts" if total[row] == 0 else "has no counts in the selected genes"
                    raise InputError(
                        f"{inp.source}: row {start + row} ('{obs_names[start + row]}') {why}; scVI needs a positive "
                        "library size, so filter such cells out or pass --drop-empty-cells"
                    )
                keep_n[start:stop] = ~empty
                out = out[~empty]
            _write_block(writer, out)
            pbar.update(stop - start)
    return keep_n


def _merge_obs(frames: list[pd.DataFrame], sort_new: bool) -> pd.DataFrame:
    """Concatenate obs frames; categoricals get the union of categories (kept as is when all are equal).

    ``sort_new``: a sorted union, as ``astype("category")`` of the values (convert); otherwise the first
    frame's order then new categories as they appear, so existing codes stay valid (append).
    """
    obs = pd.concat(frames, axis=0, join="outer")
    for col in obs.columns:
        cats = [f[col].cat.categories for f in frames if col in f and isinstance(f[col].dtype, pd.CategoricalDtype)]
        if not cats:
            continue
        if all(c.equals(cats[0]) for c in cats):
            merged = list(cats[0])
        else:
            merged = list(pd.unique(np.concatenate([np.asarray(c, dtype=object) for c in cats])))
            if sort_new:
                merged = sorted(merged, key=str)
        obs[col] = pd.Categorical(obs[col].astype(object), categories=merged)
    if not obs.index.is_unique:
        logger.warning("cell names repeat across inputs; the store keeps them as they are")
    return obs


def _inputs_obs(inputs: list[_Input], batch_key: str | None, batch_per_file: bool) -> list[pd.DataFrame]:
    frames = []
    stems = [inp.path.stem for inp in inputs]
    if batch_per_file and len(set(stems)) != len(stems):
        raise InputError(f"batch_per_file needs distinct file names; got {stems}")
    for inp in inputs:
        obs = inp.obs.copy()
        if batch_per_file:
            obs[batch_key or "batch"] = pd.Categorical([inp.path.stem] * inp.n_obs, categories=stems)
        elif batch_key is not None and batch_key not in obs.columns:
            raise InputError(
                f"{inp.source}: no obs column '{batch_key}' (present in the other inputs); available columns: "
                f"{list(obs.columns) or 'none'}; add it, or pass --batch-per-file to use file names as batches"
            )
        frames.append(obs)
    return frames


def _prepare(
    paths: list, layer: str | None, batch_key: str | None, batch_per_file: bool, budget: int
) -> tuple[list[_Input], list[pd.DataFrame], np.dtype]:
    """Open and check every input (before anything is written); their obs frames and the count dtype."""
    if not paths:
        raise InputError("no input files given; pass one or more .h5ad files")
    opened = [_open_input(p, layer, max(1024, int(budget) // BYTES_PER_ENTRY)) for p in paths]
    frames = _inputs_obs(opened, batch_key, batch_per_file)
    best = 0.0
    for inp in opened:
        with h5py.File(inp.path, "r") as f:
            best = max(best, _max_count(f, inp))
    return opened, frames, count_dtype_for(best)


def _stream_all(
    opened: list[_Input], writer: CsrAppender, out_genes: np.ndarray, drop_empty: bool, progress: bool, desc: str
) -> tuple[list, list]:
    """Stream every input into ``writer`` (closed at the end) under one progress bar (cells/s)."""
    from tqdm.auto import tqdm

    kept, provenance = [], []
    total = sum(inp.n_obs for inp in opened)
    with tqdm(total=total, unit="cells", unit_scale=True, desc=desc, disable=not progress) as pbar:
        for inp in opened:
            start, stat = writer.n_obs, inp.path.stat()
            kept.append(_stream_file(inp, writer, out_genes, drop_empty, pbar))
            where = {"path": str(inp.path.resolve()), "key": inp.key, "size_bytes": stat.st_size}
            provenance.append({**where, "mtime": stat.st_mtime, "n_obs_in": inp.n_obs, "rows": [start, writer.n_obs]})
    writer.close()
    return kept, provenance


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def convert(
    inputs: list[str | os.PathLike[str]] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    batch_key: str | None = None,
    batch_per_file: bool = False,
    layer: str | None = None,
    genes: str | os.PathLike[str] = "union",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    overwrite: bool = False,
    progress: bool = True,
    drop_empty_cells: bool = False,
) -> ZarrStore:
    """Convert ``.h5ad`` files into one Zarr count store, streaming in row blocks.

    Parameters
    ----------
    inputs
        One or more ``.h5ad`` files; their rows are stacked in the order given.
    out
        The store directory to create (local path, usually ``*.zarr``).
    batch_key
        An obs column every input must have (the batch covariate); recorded in the metadata.
    batch_per_file
        Make the file stem the batch: obs column ``batch_key`` (default ``"batch"``).
    layer
        Read counts from ``layers[layer]`` instead of ``X``.
    genes
        ``"union"`` (genes missing from a file are zeros; order of first appearance), ``"intersection"``
        (genes present in every file, in the first file's order), or the path of a text file with one gene
        name per line (that order; listed genes a file lacks are zeros).
    memory_budget_bytes
        Bounds the row block held at a time (plus a fixed overhead of about one shard per ``X`` array
        and the inputs' obs/var).
    overwrite
        Replace an existing ``out``.
    progress
        Show a tqdm bar with cells/s.
    drop_empty_cells
        Drop cells with no counts (in the file or in the selected genes) instead of raising.

    Returns
    -------
    ZarrStore
        The new store, opened.
    """
    paths = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it, or use `append` to add cells")
    opened, frames, dtype = _prepare(paths, layer, batch_key, batch_per_file, memory_budget_bytes)
    out_genes, genes_mode = _gene_space(opened, genes)
    tmp = out.with_name(f".{out.name}.converting")
    if tmp.exists():
        logger.info("removing %s left by an interrupted conversion", tmp)
        _discard(tmp)
    key = batch_key or ("batch" if batch_per_file else None)
    try:
        root = create_layout(str(tmp), out_genes, dtype, {"genes": genes_mode, "batch_key": key, "provenance": []})
        writer = CsrAppender(root)
        kept, provenance = _stream_all(opened, writer, out_genes, drop_empty_cells, progress, f"convert {out.name}")
        write_elem(root, "obs", _merge_obs([fr[k] for fr, k in zip(frames, kept, strict=True)], sort_new=True))
        set_complete(root, True, provenance=provenance)  # the commit flag: last write
    except BaseException:
        _discard(tmp)
        raise
    old = out.with_name(f".{out.name}.replaced")
    _discard(old)
    if out.exists():
        os.replace(out, old)  # two renames: a complete store is in place at every moment but between them
    os.replace(tmp, out)
    _discard(old)
    logger.info("converted %d files into %s: %d cells x %d genes", len(opened), out, writer.n_obs, len(out_genes))
    return ZarrStore(out)


def append(
    store_path: str | os.PathLike[str],
    inputs: list[str | os.PathLike[str]] | str | os.PathLike[str],
    batch_key: str | None = None,
    batch_per_file: bool = False,
    layer: str | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
    drop_empty_cells: bool = False,
) -> ZarrStore:
    """Append new files' cells at the end of an existing store (existing rows keep their place).

    Genes the file lacks are zeros; genes the store lacks are an error. The commit flag is cleared meanwhile,
    and the next call rolls an interrupted append back. ``obsm`` arrays grow with NaN rows. Parameters as in
    :func:`convert`.
    """
    paths = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if not Path(store_path).is_dir():
        raise InputError(f"{store_path}: no such store; create it with `scvi-scale convert` first")
    root = zarr.open_group(str(store_path), mode="r+")
    meta = dict(root.attrs.get("scvi_scale", {}))
    if not meta.get("complete") and meta.get("append_pending"):
        truncate(root, int(meta["append_pending"]["n_obs"]), int(meta["append_pending"]["nnz"]))
        logger.warning("rolled back an interrupted append to %d cells", meta["append_pending"]["n_obs"])
        set_complete(root, True, append_pending=None)
    store = ZarrStore(store_path)
    opened, frames, dtype = _prepare(paths, layer, batch_key, batch_per_file, memory_budget_bytes)
    out_genes = store.var_names
    for inp in opened:
        extra = np.setdiff1d(inp.var_names, out_genes)
        if extra.size:
            shown = ", ".join(f"'{g}'" for g in extra[:5]) + (f" and {extra.size - 5} more" if extra.size > 5 else "")
            raise InputError(
                f"{inp.source}: {extra.size} genes are not in the store's gene space ({shown}); drop them or "
                "reconvert all files together"
            )
    if dtype.itemsize > np.dtype(meta["count_dtype"]).itemsize:
        raise InputError(f"{store_path}: the new counts exceed the store's {meta['count_dtype']}; reconvert all files")
    n0, nnz0 = store.n_obs, store.nnz
    set_complete(root, False, append_pending={"n_obs": n0, "nnz": nnz0})
    writer = CsrAppender(root)
    desc = f"append {Path(store_path).name}"
    kept, provenance = _stream_all(opened, writer, out_genes, drop_empty_cells, progress, desc)
    new = [fr[k] for fr, k in zip(frames, kept, strict=True)]
    obs = _merge_obs([store.obs, *new], sort_new=False)
    del root["obs"]
    write_elem(root, "obs", obs)
    for key in list(root["obsm"].array_keys()):
        arr = root["obsm"][key]
        arr.resize((writer.n_obs, *arr.shape[1:]))
    set_complete(root, True, provenance=[*meta.get("provenance", []), *provenance], append_pending=None)
    logger.info("appended %d cells to %s (now %d)", writer.n_obs - n0, store_path, writer.n_obs)
    return ZarrStore(store_path)
