"""Streaming conversion of inputs into a Zarr or TileDB count store (:func:`convert`); growing one (:func:`append`).

Inputs (``.h5ad``, AnnData ``.zarr``, 10x ``.h5`` and ``matrix.mtx`` folders; :mod:`scvi_scale.store.inputs`)
are read in row blocks, never whole: each is validated with :func:`~scvi_scale.store.validate.check_count_block`
(messages name the file and its row and gene), mapped to the store's genes and written. A first pass over
every input finds the largest count, so that the store's counts are uint16 when they fit.

Memory: ``memory_budget_bytes`` pays first for a Zarr writer's buffers (:func:`writer_bytes`: up to one shard
each of ``X/data``, ``X/indices`` and ``X/indptr``, allocated once: at most 32 MB for
uint16 counts), and what is left sizes the blocks, ``BYTES_PER_ENTRY`` bytes per entry, cut at row
boundaries. The budget also pays for the inputs' cell metadata (``obs``, held and merged: twice its size)
and a constant ``LIBRARY_BYTES`` for the libraries' own buffers (zstd, h5py). A budget that cannot hold all
that and a block of ``MIN_BLOCK_ENTRIES`` is exceeded, with a warning naming the minimum;
``benchmarks/RESULTS.md`` has measured peaks.

Where the output goes:

- a local Zarr store is written under a hidden sibling (``.NAME.converting``) with the commit flag set
  last, then renamed into place; a killed run leaves only that sibling, which the next run removes;
- a Zarr store at a URL (``s3://...``; object stores cannot rename) is written in place with the commit flag
  cleared, and the flag is set last (:class:`~scvi_scale.store.zarr_store.ZarrStore` refuses a store without
  it); an incomplete store left there by a killed run is removed first; replacing a complete one needs
  ``overwrite`` and is not atomic;
- a TileDB store (``store_format="tiledb"``, or a name ending ``.tiledb``) is written by
  :meth:`~scvi_scale.store.tiledb_store.TileDBStore.create` (local or ``s3://``), which fixes the number of
  rows up front: with ``drop_empty_cells`` the inputs are read once more to find the empty cells first.

:func:`append` works in place on a local Zarr store with the commit flag cleared, and rolls a half-done
append back before retrying.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from scvi_scale.store import zarr_store
from scvi_scale.store.errors import InputError
from scvi_scale.store.inputs import KINDS_HINT, CountInput, open_input, select_columns
from scvi_scale.store.open import resolve_location
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

__all__ = [
    "BYTES_PER_ENTRY",
    "DEFAULT_MEMORY_BUDGET",
    "FORMATS",
    "MIN_BLOCK_ENTRIES",
    "append",
    "convert",
    "writer_bytes",
]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 1 << 30
# Peak bytes per stored entry of a block: source data+indices, validation masks and rint copy, mapped
# indices, float64 row sums, the output copy (measured order of magnitude, rounded up).
BYTES_PER_ENTRY = 48
MIN_BLOCK_ENTRIES = 65_536  # one X chunk (3 MB of block): smaller blocks mostly add per-block overhead
FORMATS = ("zarr", "tiledb")
_NAME_SUFFIXES = (".h5ad", ".h5", ".zarr", ".mtx.gz", ".mtx", ".soma", ".tiledb")


LIBRARY_BYTES = 48 << 20  # buffers of zarr, zstd and h5py and the allocator's slack (measured: bench_store.py)


def writer_bytes(nnz: int, n_obs: int, count_dtype: np.dtype, tail: tuple[int, int] = (0, 0)) -> int:
    """Peak bytes of :class:`~scvi_scale.store.zarr_store.CsrAppender`'s buffers for ``nnz`` entries in ``n_obs`` rows.

    It holds up to one shard of ``X/data`` and ``X/indices`` (``ENTRY_SHARD`` entries; int32 indices) and of
    ``X/indptr`` (``INDPTR_SHARD`` rows), less when the store is smaller, in buffers allocated once. ``tail``
    is the (entries, rows) an appended-to store already has: its last partial shard is buffered too.
    """
    shard, indptr_shard = zarr_store.ENTRY_SHARD, zarr_store.INDPTR_SHARD  # read now: tests shrink them
    entries = min(shard, tail[0] % shard + nnz)
    rows = min(indptr_shard, (tail[1] + 1) % indptr_shard + n_obs)
    return entries * (np.dtype(count_dtype).itemsize + 4) + rows * 8


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB" if n >= 1 << 20 else f"{n / 1024:.1f} KB"


def _size_blocks(opened: list[CountInput], budget: int, fixed: int, warn: bool = True) -> None:
    """Set every input's block size from what ``budget`` leaves after ``fixed`` bytes (the writer's buffers).

    What is left must hold a block of ``MIN_BLOCK_ENTRIES`` (or the whole input, if smaller). A budget below
    that cannot be kept: blocks then get ``MIN_BLOCK_ENTRIES`` (or fewer, down to 1,024, for a budget that
    small: how tests get many blocks out of tiny inputs), and a warning names the minimum.
    """
    nnz = sum(inp.nnz for inp in opened)
    minimum = fixed + min(MIN_BLOCK_ENTRIES, nnz) * BYTES_PER_ENTRY
    if budget >= minimum:
        entries = (budget - fixed) // BYTES_PER_ENTRY
    else:
        entries = max(1024, min(budget // BYTES_PER_ENTRY, MIN_BLOCK_ENTRIES))  # the smallest blocks we allow
        if warn:
            logger.warning(
                "a memory budget of %s is below the %s this conversion needs to keep it (%s for the store writer's "
                "shard buffers, cell metadata and library buffers, %s for a row block): expect a peak of about %s; "
                "pass --memory %dM or more",
                _size(budget), _size(minimum), _size(fixed), _size(minimum - fixed),
                _size(fixed + entries * BYTES_PER_ENTRY), -(-minimum // (1 << 20)),
            )  # fmt: skip
    for inp in opened:
        inp.max_entries = int(entries)


def _gene_space(inputs: list[CountInput], genes: str | os.PathLike[str]) -> tuple[np.ndarray, str]:
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


def _to_store_block(block: sp.csr_matrix | np.ndarray, col_map: np.ndarray, n_out: int) -> sp.csr_matrix:
    """A validated source block as canonical CSR over the output genes (dropped genes removed)."""
    csr = sp.csr_matrix(block)
    if not csr.has_canonical_format:
        csr.sum_duplicates()
    out = select_columns(csr, col_map, n_out)
    out.has_sorted_indices = False
    out.sort_indices()  # a reordered gene space scrambles the order within rows
    return out


def _write_block(writer: CsrAppender, block: sp.csr_matrix) -> None:
    writer.append(block)


def _out_blocks(
    opened: list[CountInput], out_genes: np.ndarray, drop_empty: bool, pbar: Any, kept: list, provenance: list
) -> Iterator[sp.csr_matrix]:
    """Every input's validated rows over ``out_genes``, in order; fills ``kept`` (row masks) and ``provenance``."""
    n_out = 0
    for inp in opened:
        col_map = pd.Index(out_genes).get_indexer(inp.var_names).astype(np.int64)  # -1: gene not kept
        obs_names = inp.obs.index.astype(str).to_numpy()
        keep_n, first = np.ones(inp.n_obs, dtype=bool), n_out
        for start, stop, block in inp.blocks():
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
            n_out += out.shape[0]
            yield out
            pbar.update(stop - start)
        kept.append(keep_n)
        provenance.append({**inp.provenance(), "n_obs_in": inp.n_obs, "rows": [first, n_out]})


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


# names that 10x Cell Ranger gives every sample: never a batch name (the sample's folder is)
_GENERIC_NAMES = frozenset(
    {"filtered_feature_bc_matrix", "raw_feature_bc_matrix", "sample_filtered_feature_bc_matrix", "outs", "count"}
)


def _batch_labels(inputs: list[CountInput], taken: frozenset[str] = frozenset()) -> list[str]:
    """One batch name per input: file names without their suffix, else the nearest folder names that differ.

    10x outputs share their file names (``s1/outs/filtered_feature_bc_matrix.h5``, ``s2/outs/...``): they
    become ``s1`` and ``s2``, also when there is only one. ``taken`` are the batches a store already has (an
    append): a new input is never merged into one of them because its file has the same name.
    """
    chains = []
    for inp in inputs:
        name = inp.path.name
        suffix = next((s for s in _NAME_SUFFIXES if name.lower().endswith(s)), "")
        chain = [name[: len(name) - len(suffix)], *(p.name for p in inp.path.resolve().parents if p.name)]
        chains.append([c for c in chain if c.lower() not in _GENERIC_NAMES] or chain)
    for depth in range(max(len(c) for c in chains)):
        labels = [c[depth] if depth < len(c) else "" for c in chains]
        if len(set(labels)) == len(labels) and not taken.intersection(labels):
            if depth and taken:
                logger.warning("batch names from folders, as the file names are batches of the store already: %s",
                               labels)  # fmt: skip
            return labels
    raise InputError(
        f"batch_per_file needs inputs whose names tell them apart (and from the store's batches "
        f"{sorted(taken)[:10]}); got {[str(i.path) for i in inputs]}; rename the files or give a batch column"
    )


def _inputs_obs(
    inputs: list[CountInput], batch_key: str | None, batch_per_file: bool, taken: frozenset[str] = frozenset()
) -> list[pd.DataFrame]:
    frames = []
    labels = _batch_labels(inputs, taken) if batch_per_file else []
    for i, inp in enumerate(inputs):
        obs = inp.obs.copy()
        if batch_per_file:
            obs[batch_key or "batch"] = pd.Categorical([labels[i]] * inp.n_obs, categories=labels)
        elif batch_key is not None and batch_key not in obs.columns:
            raise InputError(
                f"{inp.source}: no obs column '{batch_key}' (present in the other inputs); available columns: "
                f"{list(obs.columns) or 'none'}; add it, or pass --batch-per-file to use file names as batches"
            )
        frames.append(obs)
    return frames


def _prepare(
    paths: list, layer: str | None, batch_key: str | None, batch_per_file: bool, budget: int, var_names: str,
    progress: bool, fixed_bytes: Callable[[int, int, np.dtype], int], taken: frozenset[str] = frozenset(),
) -> tuple[list[CountInput], list[pd.DataFrame], np.dtype]:  # fmt: skip
    """Open, check and scan every input (before anything is written); their obs frames and the count dtype.

    Blocks are sized from ``budget`` less ``fixed_bytes(nnz, n_obs, count dtype)``: for the scan with uint16
    counts, then with the dtype it found.
    """
    from tqdm.auto import tqdm

    if not paths:
        raise InputError(f"no inputs given; pass one or more of: {KINDS_HINT}")
    opened = [open_input(p, max_entries=MIN_BLOCK_ENTRIES, layer=layer, var_names=var_names) for p in paths]
    frames = _inputs_obs(opened, batch_key, batch_per_file, taken)
    best = 0.0
    total, n_obs = sum(inp.nnz for inp in opened), sum(inp.n_obs for inp in opened)
    # outside the blocks: the cell metadata (held, then merged into one frame and written) and the libraries'
    # own buffers (zarr/zstd, h5py chunk caches; measured ~30 MB, constant)
    held = LIBRARY_BYTES + 2 * sum(int(fr.memory_usage(deep=True).sum()) for fr in frames)
    _size_blocks(opened, budget, held + fixed_bytes(total, n_obs, np.dtype(np.uint16)), warn=False)
    with tqdm(total=total, unit="entries", unit_scale=True, desc="scan", disable=not progress) as pbar:
        for inp in opened:
            best = max(best, inp.scan(pbar.update))
    dtype = count_dtype_for(best)
    _size_blocks(opened, budget, held + fixed_bytes(total, n_obs, dtype))
    return opened, frames, dtype


def _stream_zarr(
    root: zarr.Group, opened: list[CountInput], out_genes: np.ndarray, drop_empty: bool, progress: bool, desc: str
) -> tuple[list, list, int]:
    """Append every input to ``root``'s ``X`` under one progress bar (cells/s): (kept masks, provenance, n_obs)."""
    from tqdm.auto import tqdm

    writer = CsrAppender(root, expected=(sum(i.nnz for i in opened), sum(i.n_obs for i in opened)))
    kept: list = []
    provenance: list = []
    first = writer.n_obs
    with tqdm(total=sum(i.n_obs for i in opened), unit="cells", unit_scale=True, desc=desc, disable=not progress) as pb:
        for block in _out_blocks(opened, out_genes, drop_empty, pb, kept, provenance):
            _write_block(writer, block)
    writer.close()
    for entry in provenance:  # rows count from the store's first row, not from this call's
        entry["rows"] = [entry["rows"][0] + first, entry["rows"][1] + first]
    return kept, provenance, writer.n_obs


def _fill_zarr(location: Any, opened: list[CountInput], frames: list, out_genes: np.ndarray, dtype: np.dtype,
               meta: dict, drop_empty: bool, progress: bool, desc: str) -> int:  # fmt: skip
    """Create a store at ``location``, stream the inputs in, write obs and set the commit flag last."""
    root = create_layout(location, out_genes, dtype, {**meta, "provenance": []})
    kept, provenance, n_obs = _stream_zarr(root, opened, out_genes, drop_empty, progress, desc)
    write_elem(root, "obs", _merge_obs([fr[k] for fr, k in zip(frames, kept, strict=True)], sort_new=True))
    set_complete(root, True, provenance=provenance)  # the commit flag: last write
    return n_obs


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _to_local_zarr(out: Path, *args: Any) -> ZarrStore:
    tmp = out.with_name(f".{out.name}.converting")
    if tmp.exists():
        logger.info("removing %s left by an interrupted conversion", tmp)
        _discard(tmp)
    try:
        _fill_zarr(str(tmp), *args)
    except BaseException:
        _discard(tmp)
        raise
    old = out.with_name(f".{out.name}.replaced")
    _discard(old)
    if out.exists():
        os.replace(out, old)  # two renames: a complete store is in place at every moment but between them
    os.replace(tmp, out)
    _discard(old)
    return ZarrStore(out)


def _url_meta(url: str, storage_options: dict | None) -> dict | None:
    """What a URL holds: the scvi-scale metadata of a store, ``{}`` for another Zarr group, ``None`` for no group."""
    location, _ = resolve_location(url, storage_options, read_only=True)
    try:
        root = zarr.open_group(location, mode="r")
    except FileNotFoundError:
        return None
    except Exception as exc:  # any fsspec/zarr failure (credentials, endpoint) becomes one line
        raise InputError(f"{url}: cannot check what is there ({type(exc).__name__}: {exc})") from exc
    meta = root.attrs.get("scvi_scale")
    return dict(meta) if isinstance(meta, dict) else {}


def _to_url_zarr(url: str, storage_options: dict | None, overwrite: bool, *args: Any) -> ZarrStore:
    location, _ = resolve_location(url, storage_options, read_only=False)
    meta = _url_meta(url, storage_options)
    if meta is None:
        try:  # nothing Zarr there: refuse to clear other objects under the prefix
            zarr.open_group(location, mode="w-", zarr_format=3)
        except FileExistsError:
            raise InputError(f"{url}: holds objects that are not a Zarr store; choose an empty location") from None
    elif not meta.get("complete"):
        logger.warning("removing the incomplete store at %s left by an interrupted conversion", url)
    elif not overwrite:  # checked before the scan too; this catches a store that appeared meanwhile
        raise InputError(f"{url}: already exists; pass --overwrite to replace it")
    _fill_zarr(location, *args)  # create_layout clears the location first
    return ZarrStore(url, storage_options=storage_options)


def _to_tiledb(uri: str, opened: list[CountInput], frames: list, out_genes: np.ndarray, dtype: np.dtype, meta: dict,
               drop_empty: bool, progress: bool, overwrite: bool, storage_options: dict | None) -> Any:  # fmt: skip
    from tqdm.auto import tqdm

    if importlib.util.find_spec("tiledb") is None:  # fail before any reading
        raise InputError(f"{uri}: TileDB stores need the tiledb extra: pip install 'scvi-scale[tiledb]'")
    from scvi_scale.store.tiledb_store import TileDBStore

    total, name = sum(inp.n_obs for inp in opened), uri.rstrip("/").rsplit("/", 1)[-1]
    kept: list = []
    if drop_empty:  # the array's row count is fixed at creation: find the empty cells first
        with tqdm(total=total, unit="cells", unit_scale=True, desc="find empty cells", disable=not progress) as pb:
            for _ in _out_blocks(opened, out_genes, True, pb, kept, []):
                pass
    else:
        kept = [np.ones(inp.n_obs, dtype=bool) for inp in opened]
    obs = _merge_obs([fr[k] for fr, k in zip(frames, kept, strict=True)], sort_new=True)
    provenance: list = []
    with tqdm(total=total, unit="cells", unit_scale=True, desc=f"convert {name}", disable=not progress) as pb:
        store = TileDBStore.create(
            uri, out_genes, obs, _out_blocks(opened, out_genes, drop_empty, pb, [], provenance),
            source_names=[inp.source for inp in opened], count_dtype=dtype.name, overwrite=overwrite,
            storage_options=storage_options,
            # read after the blocks are consumed, so the per-input rows are filled in; written before the commit flag
            provenance_extra={**meta, "inputs": provenance},
        )  # fmt: skip
    return store


def _out_format(text: str, store_format: str | None) -> str:
    if store_format is None:
        return "tiledb" if text.rstrip("/").lower().endswith(".tiledb") else "zarr"
    if store_format not in FORMATS:
        raise InputError(f"unknown store format {store_format!r}; choose one of {list(FORMATS)}")
    return store_format


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
    *,
    store_format: str | None = None,
    var_names: str = "gene_symbols",
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Convert inputs into one count store, streaming in row blocks.

    Parameters
    ----------
    inputs
        One or more ``.h5ad`` files, AnnData ``.zarr`` stores, 10x ``.h5`` files or 10x folders with
        ``matrix.mtx(.gz)`` (kinds may be mixed); their rows are stacked in the order given.
    out
        The store to create: a local path or a URL (``s3://bucket/atlas.zarr``).
    batch_key
        An obs column every input must have (the batch covariate); recorded in the metadata.
    batch_per_file
        Make the input's name the batch: obs column ``batch_key`` (default ``"batch"``).
    layer
        AnnData inputs: read counts from ``layers[layer]`` instead of ``X``.
    genes
        ``"union"`` (genes missing from an input are zeros; order of first appearance), ``"intersection"``
        (genes present in every input, in the first one's order), or the path of a text file with one gene
        name per line (that order; listed genes an input lacks are zeros).
    memory_budget_bytes
        Bounds the Zarr writer's shard buffers (:func:`writer_bytes`, up to 64 MB for uint16 counts) plus the
        row block held at a time; the inputs' obs/var and the libraries' own buffers come on top (see the
        module docstring). A smaller budget than the buffers and one small block is exceeded, with a warning.
    overwrite
        Replace an existing ``out``.
    progress
        Show tqdm bars: entries/s while scanning, cells/s while converting.
    drop_empty_cells
        Drop cells with no counts (in the input or in the selected genes) instead of raising.
    store_format
        ``"zarr"`` or ``"tiledb"``; by default TileDB for an ``out`` ending in ``.tiledb``, else Zarr.
    var_names
        10x inputs: name genes by ``"gene_symbols"`` (default, as scanpy) or ``"gene_ids"`` (unique IDs).
    storage_options
        fsspec options for a Zarr URL (by default ``s3://`` takes ``AWS_*`` from the environment).

    Returns
    -------
    ZarrStore or TileDBStore
        The new store, opened.
    """
    paths = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    text = os.fspath(out)
    fmt = _out_format(text, store_format)
    is_url = "://" in text and not text.startswith("file://")
    local = None if is_url else Path(text.removeprefix("file://"))
    if local is not None:
        exists = local.exists()
    else:  # an incomplete store at a URL does not count: it is replaced
        meta = _url_meta(text, storage_options) if fmt == "zarr" else None
        exists = meta is not None and (not meta or bool(meta.get("complete")))
    if exists and not overwrite:  # checked before reading the inputs
        raise InputError(f"{text}: already exists; pass --overwrite to replace it, or use `append` to add cells")
    fixed = (lambda nnz, n, dt: 0) if fmt == "tiledb" else writer_bytes  # TileDB's writer keeps its own buffers
    opened, frames, dtype = _prepare(
        paths, layer, batch_key, batch_per_file, memory_budget_bytes, var_names, progress, fixed
    )
    out_genes, genes_mode = _gene_space(opened, genes)
    meta = {"genes": genes_mode, "batch_key": batch_key or ("batch" if batch_per_file else None)}
    if fmt == "tiledb":
        store = _to_tiledb(
            text if is_url else str(local), opened, frames, out_genes, dtype, meta, drop_empty_cells, progress,
            overwrite, storage_options,
        )  # fmt: skip
    else:
        args = (opened, frames, out_genes, dtype, meta, drop_empty_cells, progress, f"convert {Path(text).name}")
        store = _to_url_zarr(text, storage_options, overwrite, *args) if is_url else _to_local_zarr(local, *args)
    logger.info("converted %d inputs into %s: %d cells x %d genes", len(opened), text, store.n_obs, len(out_genes))
    return store


def append(
    store_path: str | os.PathLike[str],
    inputs: list[str | os.PathLike[str]] | str | os.PathLike[str],
    batch_key: str | None = None,
    batch_per_file: bool = False,
    layer: str | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
    drop_empty_cells: bool = False,
    *,
    var_names: str = "gene_symbols",
) -> ZarrStore:
    """Append new inputs' cells at the end of an existing local Zarr store (existing rows keep their place).

    Genes an input lacks are zeros; genes the store lacks are an error. The commit flag is cleared meanwhile,
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
    store_dtype, tail = np.dtype(meta["count_dtype"]), (store.nnz, store.n_obs)
    column = batch_key or "batch"
    taken = frozenset()
    if batch_per_file and column in store.obs_columns():
        taken = frozenset(str(v) for v in pd.unique(store.obs_column(column).astype(str)))
    opened, frames, dtype = _prepare(
        paths, layer, batch_key, batch_per_file, memory_budget_bytes, var_names, progress,
        lambda nnz, n, dt: writer_bytes(nnz, n, store_dtype, tail),  # the store's dtype; a larger one is refused
        taken,
    )  # fmt: skip
    out_genes = store.var_names
    for inp in opened:
        extra = np.setdiff1d(inp.var_names, out_genes)
        if extra.size:
            shown = ", ".join(f"'{g}'" for g in extra[:5]) + (f" and {extra.size - 5} more" if extra.size > 5 else "")
            raise InputError(
                f"{inp.source}: {extra.size} genes are not in the store's gene space ({shown}); drop them or "
                "reconvert all inputs together"
            )
    if dtype.itemsize > np.dtype(meta["count_dtype"]).itemsize:
        raise InputError(f"{store_path}: the new counts exceed the store's {meta['count_dtype']}; reconvert all inputs")
    n0, nnz0 = store.n_obs, store.nnz
    set_complete(root, False, append_pending={"n_obs": n0, "nnz": nnz0})
    desc = f"append {Path(store_path).name}"
    kept, provenance, n_obs = _stream_zarr(root, opened, out_genes, drop_empty_cells, progress, desc)
    new = [fr[k] for fr, k in zip(frames, kept, strict=True)]
    obs = _merge_obs([store.obs, *new], sort_new=False)
    del root["obs"]
    write_elem(root, "obs", obs)
    for key in list(root["obsm"].array_keys()):
        arr = root["obsm"][key]
        arr.resize((n_obs, *arr.shape[1:]))
    set_complete(root, True, provenance=[*meta.get("provenance", []), *provenance], append_pending=None)
    logger.info("appended %d cells to %s (now %d)", n_obs - n0, store_path, n_obs)
    return ZarrStore(store_path)
