"""The Zarr v3 count store: AnnData's on-disk CSR layout, sharded for row-block reads, with a commit flag.

Layout (``anndata.read_zarr`` and ``anndata.io.sparse_dataset(zarr.open_group(p)["X"])`` open it)::

    store.zarr/                root attrs: encoding-type "anndata", "scvi_scale": metadata (below)
      X/                       encoding-type "csr_matrix", shape [n_obs, n_vars]
        data                   uint16 counts (uint32 when a count exceeds 65,535)
        indices                int32 gene index of each entry (int64 only past 2**31 genes)
        indptr                 int64, n_obs + 1 (an atlas can hold more than 2**31 entries)
      obs/  var/               AnnData dataframes (categoricals kept as categories + codes)
      obsm/<key>               float arrays n_obs x k, chunks of OBSM_CHUNK_ROWS rows (embeddings)
      uns/                     uns/<name>: commit marks of the region writer, one chunk each (infer.writeback)

``X/data`` and ``X/indices`` use chunks of ``ENTRY_CHUNK`` = 65,536 entries (the read unit: a 1,024-row
block of a 5-12 % dense 2,000-gene matrix is 100-250k entries, 2-5 chunks) inside shards of ``ENTRY_SHARD``
= 4,194,304 entries (one file or object each: a 200k-cell atlas is a dozen files, not hundreds, which matters
for object stores and inode limits; reads fetch only the chunks they need via the shard index). Codecs are
zarr's defaults (zstd). :class:`CsrAppender` buffers one shard per array and writes whole shards only.

Metadata (root attribute ``"scvi_scale"``): ``format_version`` (1), ``count_dtype``, ``provenance`` (one
entry per input file, with the rows it became), ``created``/``updated`` (UTC ISO times), ``genes`` (how the
gene space was chosen), ``batch_key``, and ``complete``: the commit flag, set last; stores without it are refused.
Writers of the metadata (:func:`set_complete`, :meth:`ZarrStore.update_metadata`) change only their own entries of
the dict as it is on disk at that moment; on local disk they hold an exclusive ``flock`` on the store's folder
meanwhile (:func:`metadata_lock`), so writers in different processes (a nightly rebuild's ledger, a user's
embedding manifest) never drop each other's entries.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from scvi_scale.store.errors import InputError
from scvi_scale.store.lock import folder_lock
from scvi_scale.store.memory import StoreReads, library_log_stats_from_totals
from scvi_scale.store.open import open_zarr_group, resolve_location

__all__ = [
    "ENTRY_CHUNK",
    "ENTRY_SHARD",
    "FORMAT_VERSION",
    "CsrAppender",
    "ZarrStore",
    "count_dtype_for",
    "create_layout",
    "metadata_lock",
    "set_complete",
    "truncate",
    "utc_now",
    "write_elem",
]

FORMAT_VERSION = 1
ENTRY_CHUNK = 65_536
ENTRY_SHARD = 4_194_304
INDPTR_SHARD = 1_048_576  # 8 MB of int64 per shard: bounds the writer's indptr buffer
OBSM_CHUNK_ROWS = 16_384
_MAX_SLICED_RUNS = 8  # more runs of consecutive rows than this are read as one coordinate selection
_META = "scvi_scale"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def count_dtype_for(max_count: float) -> np.dtype:
    """The smallest unsigned dtype (uint16 or uint32) that holds ``max_count``."""
    if max_count <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if max_count <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise InputError(f"a count of {max_count:g} exceeds 2**32 - 1; these are not UMI counts")


def write_elem(group: zarr.Group, key: str, elem: object) -> None:
    """``anndata.io.write_elem`` into a v3 group, with anndata's sharding choice made explicitly."""
    import anndata

    # Not setting auto_shard_zarr_v3 makes anndata warn on every write; small elements need no shards.
    with anndata.settings.override(zarr_write_format=3, auto_shard_zarr_v3=True):
        anndata.io.write_elem(group, key, elem)


def _local_root(location: Any) -> str | None:
    """The folder of a local store (a path or a ``LocalStore``), or None for object storage."""
    if isinstance(location, (str, os.PathLike)):
        text = os.fspath(location)
        return None if "://" in text and not text.startswith("file://") else text.removeprefix("file://")
    root = getattr(location, "root", None)  # zarr's LocalStore; ObjectStore and FsspecStore have no folder
    return os.fspath(root) if isinstance(location, zarr.storage.LocalStore) and root is not None else None


def metadata_lock(location: Any, *, shared: bool = False) -> contextlib.AbstractContextManager[None]:
    """:func:`~scvi_scale.store.lock.folder_lock` on the folder of a local store (a path or a zarr
    ``LocalStore``); nothing for object storage."""
    return folder_lock(_local_root(location), shared=shared)


def _change_metadata(store: Any, path: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``change`` to the metadata as it is on disk now, and write it back; returns the written dict.

    The group is opened afresh under the lock: a ``zarr.Group`` keeps the attributes read when it was opened,
    so writing through an older handle would put back every entry as it was then.
    """
    with metadata_lock(store):
        fresh = zarr.open_group(store, path=path, mode="r+")
        meta = dict(fresh.attrs[_META])
        change(meta)
        meta["updated"] = utc_now()
        fresh.attrs[_META] = meta
    return meta


def set_complete(root: zarr.Group, complete: bool, **updates: Any) -> None:
    """Set the commit flag (and any other fields) in the metadata; the flag is the last thing set.

    Only these fields change: the rest is re-read from the store, so entries that other processes wrote since
    ``root`` was opened are kept (serialized by a lock on the store's folder on local disk; on object storage,
    where there is no lock, two writers at the same instant can still lose one's entry). ``root``'s attributes
    show the result.
    """

    def change(meta: dict[str, Any]) -> None:
        meta.update(updates, complete=bool(complete))

    root.metadata.attributes[_META] = _change_metadata(root.store, root.path, change)


def _checked_zstd() -> Any:
    """zstd at zarr's default level, with the frame checksum on: a damaged chunk fails to decode instead of
    reading as wrong counts (the shard index has its own crc32c)."""
    from zarr.codecs import ZstdCodec

    return ZstdCodec(level=0, checksum=True)


class _Damaged:
    """Turns a failure to read or decode part of ``X`` into one :class:`InputError` naming the store and entries."""

    def __init__(self, source: str, what: str) -> None:
        self.source, self.what = source, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, InputError) or not isinstance(exc, (ValueError, RuntimeError)):
            return False  # only decoding failures (checksums, zstd frames, shard indices) mean damage; I/O errors,
            # e.g. a dropped connection to object storage, pass through unchanged for the caller to retry
        raise InputError(
            f"{self.source}: cannot read {self.what} ({type(exc).__name__}: {str(exc)[:160]}); the store is damaged "
            "(a truncated or corrupted chunk file): restore it or rebuild it with `scvi-scale convert`"
        ) from exc


def create_layout(
    location: Any, var_names: Sequence[str], count_dtype: np.dtype, metadata: dict[str, Any]
) -> zarr.Group:
    """Create an empty store (0 cells, ``var_names`` genes), its metadata marked incomplete.

    Parameters
    ----------
    location
        A local path or a zarr store; overwritten.
    var_names
        The gene space, in column order.
    count_dtype
        uint16 or uint32.
    metadata
        Extra metadata fields (provenance, genes, batch_key, ...).
    """
    root = zarr.open_group(location, mode="w", zarr_format=3)
    meta = {"format_version": FORMAT_VERSION, "count_dtype": np.dtype(count_dtype).name, "created": utc_now()}
    root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0", _META: {**meta, **metadata}})
    set_complete(root, False)
    n_vars = len(var_names)
    x = root.create_group("X")
    x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [0, n_vars]})
    index_dtype = np.int32 if n_vars < np.iinfo(np.int32).max else np.int64
    for name, dtype in (("data", count_dtype), ("indices", index_dtype)):
        x.create_array(
            name, shape=(0,), dtype=dtype, chunks=(ENTRY_CHUNK,), shards=(ENTRY_SHARD,), compressors=_checked_zstd()
        )
    indptr = x.create_array(
        "indptr", shape=(1,), dtype=np.int64, chunks=(ENTRY_CHUNK,), shards=(INDPTR_SHARD,), compressors=_checked_zstd()
    )
    indptr[:] = np.zeros(1, dtype=np.int64)
    write_elem(root, "var", pd.DataFrame(index=pd.Index([str(g) for g in var_names])))
    write_elem(root, "obsm", {})
    write_elem(root, "uns", {})
    return root


class _ShardedAppender:
    """Appends to a 1-D array in whole shards through one preallocated shard buffer.

    The trailing partial shard of an existing array is read back into the buffer once and rewritten whole.
    """

    def __init__(self, arr: zarr.Array, expected: int | None = None) -> None:
        self.arr = arr
        self.shard = int((arr.shards or arr.chunks)[0])
        self.length = int(arr.shape[0])
        self.flushed = (self.length // self.shard) * self.shard
        # the buffer, allocated on first use: one shard, or what ``expected`` more values need when that is less
        size = self.shard if expected is None else min(self.shard, self.length - self.flushed + int(expected))
        self._size = max(size, 1)
        self.buf: np.ndarray | None = None
        self.n_pending = 0
        if self.length > self.flushed:
            self._take(np.asarray(arr[self.flushed : self.length]))

    def _take(self, values: np.ndarray) -> None:
        """Copy ``values`` into the buffer, writing each shard it fills."""
        done = 0
        while done < values.shape[0]:
            if self.buf is None or (self.buf.shape[0] == self.n_pending < self.shard):  # first use, or more came
                grown = np.empty(self.shard if self.buf is not None else self._size, dtype=self.arr.dtype)
                if self.buf is not None:
                    grown[: self.n_pending] = self.buf[: self.n_pending]
                self.buf = grown
            n = min(self.buf.shape[0] - self.n_pending, values.shape[0] - done)
            self.buf[self.n_pending : self.n_pending + n] = values[done : done + n]
            self.n_pending += n
            done += n
            if self.n_pending == self.shard:
                self._write(self.buf)
                self.n_pending = 0

    def extend(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        self.length += values.shape[0]
        self._take(values)

    def _write(self, values: np.ndarray) -> None:
        stop = self.flushed + values.shape[0]
        if self.arr.shape[0] < stop:
            self.arr.resize((stop,))
        self.arr[self.flushed : stop] = values
        self.flushed = stop

    def close(self) -> None:
        if self.n_pending:
            self._write(self.buf[: self.n_pending])
        self.n_pending, self.buf = 0, None
        self.arr.resize((self.length,))


class CsrAppender:
    """Appends CSR row blocks to a store's ``X`` (existing rows are kept); call :meth:`close` at the end."""

    def __init__(self, root: zarr.Group, expected: tuple[int, int] | None = None) -> None:
        """``expected``: (entries, rows) to be appended, when known: buffers are then no larger than they need."""
        self.x = root["X"]
        self.n_vars = int(self.x.attrs["shape"][1])
        nnz, rows = expected if expected is not None else (None, None)
        self._data = _ShardedAppender(self.x["data"], nnz)
        self._indices = _ShardedAppender(self.x["indices"], nnz)
        self._indptr = _ShardedAppender(self.x["indptr"], rows)
        self.n_obs = self._indptr.length - 1
        self.nnz = self._data.length

    def append(self, block: sp.csr_matrix) -> None:
        """Append rows of a canonical CSR block whose columns are the store's genes."""
        if block.shape[1] != self.n_vars:
            raise ValueError(f"block has {block.shape[1]} columns, the store {self.n_vars}")
        self._data.extend(block.data)
        self._indices.extend(block.indices)
        self._indptr.extend(self.nnz + np.asarray(block.indptr[1:], dtype=np.int64))
        self.nnz += int(block.nnz)
        self.n_obs += int(block.shape[0])

    def close(self) -> None:
        for part in (self._data, self._indices, self._indptr):
            part.close()
        self.x.attrs["shape"] = [self.n_obs, self.n_vars]


def truncate(root: zarr.Group, n_obs: int, nnz: int) -> None:
    """Cut ``X`` (and ``obs``) back to ``n_obs`` rows and ``nnz`` entries: undoes a half-done append."""
    import anndata

    x = root["X"]
    x["indptr"].resize((n_obs + 1,))
    x["data"].resize((nnz,))
    x["indices"].resize((nnz,))
    x.attrs["shape"] = [n_obs, int(x.attrs["shape"][1])]
    if "obs" not in root:
        raise InputError(f"{root.store}: an interrupted append lost obs; reconvert the store from its inputs")
    obs = anndata.io.read_elem(root["obs"])
    if obs.shape[0] != n_obs:
        del root["obs"]
        write_elem(root, "obs", obs.iloc[:n_obs])


def _check_shards_present(arr: zarr.Array, source: str) -> None:
    """Refuse a store whose arrays lack shard (or chunk) files: zarr would read them as zeros, silently."""
    n = int(arr.shape[0])
    unit = int((arr.shards or arr.chunks)[0])
    expected = -(-n // unit)
    per_unit = unit // int(arr.chunks[0])
    present = int(arr.nchunks_initialized) // max(per_unit, 1)
    if present < expected:
        raise InputError(
            f"{source}: {arr.path} has {present} of its {expected} shard files; the store is damaged "
            f"(files under {arr.path}/c/ are missing): restore them or rebuild it with `scvi-scale convert`"
        )


class ZarrStore(StoreReads):
    """A converted count store on local disk or in object storage, read in row blocks.

    Parameters
    ----------
    path_or_url
        A ``.zarr`` directory, ``file://`` URL or object-store URL (``s3://bucket/atlas.zarr``).
    storage_options
        Object-store options for URLs (:func:`~scvi_scale.store.open.open_store`); they override the ``AWS_*``
        environment variables.

    Raises
    ------
    InputError
        Missing store, not written by ``scvi-scale convert``, incomplete (no commit flag), or written by a
        newer format version.
    """

    def __init__(self, path_or_url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> None:
        self._url = os.fspath(path_or_url)
        self._storage_options = storage_options
        self._root, self.source = open_zarr_group(self._url, storage_options, mode="r")
        meta = self._root.attrs.get(_META)
        if not isinstance(meta, dict) or "X" not in self._root:
            raise InputError(
                f"{self.source}: not a scvi-scale count store (no '{_META}' metadata or no X); "
                "create one with `scvi-scale convert INPUT.h5ad --out STORE.zarr`"
            )
        if not meta.get("complete"):
            raise InputError(
                f"{self.source}: the store is incomplete (an interrupted conversion?); rerun `scvi-scale convert` "
                "(or the interrupted `append`) to rebuild it"
            )
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise InputError(
                f"{self.source}: store format version {meta['format_version']} is newer than this scvi-scale "
                f"understands ({FORMAT_VERSION}); upgrade scvi-scale"
            )
        x = self._root["X"]
        if x.attrs.get("encoding-type") != "csr_matrix":
            raise InputError(f"{self.source}: X is {x.attrs.get('encoding-type')!r}, expected csr_matrix; reconvert")
        self._data, self._indices, self._indptr_arr = x["data"], x["indices"], x["indptr"]
        self.n_obs, self.n_vars = (int(s) for s in x.attrs["shape"])
        for arr in (self._data, self._indices, self._indptr_arr):
            _check_shards_present(arr, self.source)

    def __repr__(self) -> str:
        return f"ZarrStore({self.source!r}, n_obs={self.n_obs}, n_vars={self.n_vars}, nnz={self.nnz})"

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the store's ``scvi_scale`` metadata."""
        return dict(self._root.attrs[_META])

    @property
    def nnz(self) -> int:
        return int(self._data.shape[0])

    @cached_property
    def indptr(self) -> np.ndarray:
        """Row pointers (int64, ``n_obs + 1``), read once: 8 bytes per cell."""
        with _Damaged(self.source, "X/indptr"):
            return np.asarray(self._indptr_arr[:], dtype=np.int64)

    @cached_property
    def var_names(self) -> np.ndarray:
        """Gene names in column order, as a ``str`` array."""
        import anndata

        var = anndata.io.read_elem(self._root["var"])
        return np.asarray([str(v) for v in var.index], dtype=str)

    @cached_property
    def obs(self) -> pd.DataFrame:
        """Cell metadata (categoricals preserved), read on first use."""
        import anndata

        return anndata.io.read_elem(self._root["obs"])

    def obs_columns(self) -> list[str]:
        """Names of the ``obs`` columns, from the frame's attributes (no column is read)."""
        if "obs" in self.__dict__:
            return [str(c) for c in self.obs.columns]
        return [str(c) for c in self._root["obs"].attrs.get("column-order", [])]

    def obs_column(self, key: str) -> pd.Series:
        """One ``obs`` column, read alone: the batch codes of an atlas need only its bytes, not the whole frame."""
        if "obs" in self.__dict__:
            return self.obs[key]
        import anndata

        return pd.Series(anndata.io.read_elem(self._root["obs"][key]), name=key)

    def _entries(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        with _Damaged(self.source, f"X entries {lo}..{hi} (shard file c/{lo // ENTRY_SHARD} of X/data, X/indices)"):
            return np.asarray(self._data[lo:hi]), np.asarray(self._indices[lo:hi])

    def read_range(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR float32 (one slice of data and of indices)."""
        if not 0 <= start <= stop <= self.n_obs:
            raise IndexError(f"row range [{start}, {stop}) outside [0, {self.n_obs})")
        ptr = self.indptr[start : stop + 1]
        data, indices = self._entries(int(ptr[0]), int(ptr[-1]))
        return sp.csr_matrix(
            (data.astype(np.float32), indices, ptr - ptr[0]), shape=(stop - start, self.n_vars), copy=False
        )

    def read_rows(self, idx: np.ndarray) -> sp.csr_matrix:
        """Rows ``idx`` (any order, repeats allowed) as CSR float32, in the order given.

        Requested rows are sorted and grouped into runs of consecutive rows; a few runs cost one slice of
        ``data`` and of ``indices`` each, many runs one coordinate selection. Scattered rows stay slow
        (every touched 64k-entry chunk is decoded): sample by block.
        """
        idx = np.asarray(idx, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_obs):
            raise IndexError(f"row index out of range [0, {self.n_obs})")
        if idx.size == 0:
            return sp.csr_matrix((0, self.n_vars), dtype=np.float32)
        rows, inverse = np.unique(idx, return_inverse=True)
        cut = np.flatnonzero(np.diff(rows) != 1) + 1
        starts, stops = rows[np.r_[0, cut]], rows[np.r_[cut - 1, rows.size - 1]] + 1
        ptr = self.indptr
        sub_ptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(ptr[rows + 1] - ptr[rows], out=sub_ptr[1:])
        if starts.size <= _MAX_SLICED_RUNS:
            parts = [self._entries(int(ptr[a]), int(ptr[b])) for a, b in zip(starts, stops, strict=True)]
            data, indices = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        else:  # scattered: one coordinate read decodes each touched chunk once, concurrently (~5x faster)
            pos = np.repeat(ptr[rows] - sub_ptr[:-1], np.diff(sub_ptr)) + np.arange(sub_ptr[-1])
            with _Damaged(self.source, f"X entries of {rows.size} scattered rows"):
                data, indices = self._data.get_coordinate_selection(pos), self._indices.get_coordinate_selection(pos)
        data = np.asarray(data).astype(np.float32)
        sub = sp.csr_matrix((data, indices, sub_ptr), shape=(rows.size, self.n_vars), copy=False)
        if rows.size == idx.size and np.array_equal(rows, idx):
            return sub
        return sub[inverse]

    def row_totals(self, chunk_entries: int = ENTRY_SHARD) -> np.ndarray:
        """Total counts of every cell (float64), read about ``chunk_entries`` entries at a time."""
        ptr = self.indptr
        total_n = np.empty(self.n_obs, dtype=np.float64)
        start = 0
        while start < self.n_obs:
            # at least one row per read, otherwise as many rows as fit in chunk_entries
            stop = max(start + 1, int(np.searchsorted(ptr, ptr[start] + chunk_entries, side="right")) - 1)
            stop = min(stop, self.n_obs)
            lo, hi = int(ptr[start]), int(ptr[stop])
            csum = np.zeros(hi - lo + 1, dtype=np.float64)
            with _Damaged(self.source, f"X entries {lo}..{hi} (shard file c/{lo // ENTRY_SHARD} of X/data, X/indices)"):
                np.cumsum(np.asarray(self._data[lo:hi]), dtype=np.float64, out=csum[1:])
            local = ptr[start : stop + 1] - lo
            total_n[start:stop] = csum[local[1:]] - csum[local[:-1]]
            start = stop
        return total_n

    def library_log_stats(self, batch_codes: np.ndarray, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-batch mean and population variance of log total counts (scvi-tools' library prior).

        Totals come from ``indptr`` and ``X/data`` read chunk-wise (:meth:`row_totals`), never the whole matrix.
        """
        batch_n = np.asarray(batch_codes, dtype=np.int64)
        if batch_n.shape != (self.n_obs,):
            raise ValueError(f"batch_codes has shape {batch_n.shape}, expected ({self.n_obs},)")
        if batch_n.size and (batch_n.min() < 0 or batch_n.max() >= n_batch):
            raise ValueError(f"batch codes must lie in [0, {n_batch})")
        return library_log_stats_from_totals(self.row_totals(), batch_n, n_batch)

    def read_obsm(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``obsm/<key>`` (rows never written read as NaN for float arrays)."""
        location, _ = resolve_location(self._url, self._storage_options, read_only=True)
        obsm = zarr.open_group(location, mode="r")["obsm"]
        if key not in obsm:
            raise InputError(f"{self.source}: no obsm/{key}; available: {sorted(obsm.keys()) or 'none'}")
        return np.asarray(obsm[key][start : self.n_obs if stop is None else stop])

    def write_obsm(self, key: str, start: int, stop: int, values: np.ndarray) -> None:
        """Write rows ``start:stop`` of ``obsm/<key>`` (created on first write, chunks of OBSM_CHUNK_ROWS rows).

        Concurrent writers must own whole chunk-aligned row regions; a row region that shares a chunk with
        another writer's region is a read-modify-write race.
        """
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[0] != stop - start or not 0 <= start <= stop <= self.n_obs:
            raise ValueError(f"values of shape {values.shape} do not fit rows [{start}, {stop}) of {self.n_obs}")
        root, _ = open_zarr_group(self._url, self._storage_options, mode="r+")
        obsm = root["obsm"]
        if key not in obsm:
            arr = obsm.create_array(
                key,
                shape=(self.n_obs, values.shape[1]),
                dtype=values.dtype,
                chunks=(min(OBSM_CHUNK_ROWS, max(self.n_obs, 1)), values.shape[1]),
                fill_value=np.nan if values.dtype.kind == "f" else 0,
            )
            arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        else:
            arr = obsm[key]
            if arr.shape != (self.n_obs, values.shape[1]):
                raise ValueError(f"obsm/{key} has shape {arr.shape}, values have {values.shape[1]} columns")
        arr[start:stop] = values.astype(arr.dtype, copy=False)

    # ---- prepare (scvi_scale.prep.prepare): gene columns in var, results in the metadata ----

    def _open_writable(self) -> zarr.Group:
        location, _ = resolve_location(self._url, self._storage_options, read_only=False)
        return zarr.open_group(location, mode="r+")

    def read_var(self) -> pd.DataFrame:
        """The ``var`` dataframe (gene names as index, with any columns ``prepare`` wrote), read now."""
        import anndata

        return anndata.io.read_elem(self._root["var"])

    def write_var_columns(self, frame: pd.DataFrame, drop: Sequence[str] = ()) -> None:
        """Add or replace ``var`` columns (``frame``'s index must be the gene names) and remove ``drop``.

        Columns are arrays in the AnnData ``var`` group; ``column-order`` (what anndata reads) first forgets the
        replaced columns and lists the new ones only once they are written, so ``var`` stays readable throughout.
        """
        if [str(v) for v in frame.index] != [str(v) for v in self.var_names]:
            raise ValueError("frame's index must be the store's gene names, in order")
        var = self._open_writable()["var"]
        gone = {*map(str, frame.columns), *map(str, drop)}
        kept = [c for c in var.attrs.get("column-order", []) if c not in gone]
        var.attrs["column-order"] = kept
        for name in gone & set(var.array_keys()):
            del var[name]
        for name in frame.columns:
            write_elem(var, str(name), frame[name].to_numpy())
        var.attrs["column-order"] = kept + [str(c) for c in frame.columns]

    def update_metadata(self, key: str, value: Any) -> None:
        """Set (or, with None, remove) one entry of the ``scvi_scale`` root metadata; JSON-able values only.

        The other entries are re-read from the store and written back as they are, so concurrent writers of
        different keys (a rebuild's ledger, ``embed_to_store``'s manifest, ``prepare``) keep each other's. On
        local disk writers are serialized by an exclusive lock on the store's folder (:func:`metadata_lock`);
        object storage has no such lock, so there two writers at the same instant can still lose one's entry
        (the window is one read and one write of ``zarr.json``).
        """

        def change(meta: dict[str, Any]) -> None:
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value

        location, _ = resolve_location(self._url, self._storage_options, read_only=False)
        _change_metadata(location, "", change)
        location, _ = resolve_location(self._url, self._storage_options, read_only=True)
        self._root = zarr.open_group(location, mode="r")  # so `metadata` shows the update

    @property
    def prepared(self) -> dict[str, Any] | None:
        """The ``prepare`` entry recorded by :func:`scvi_scale.prep.prepare.prepare`, or None."""
        return self.metadata.get("prepare")

    # ---- the region writer (scvi_scale.infer.writeback): obsm arrays made up front, per-region commit marks ----

    def obsm_layout(self, key: str) -> tuple[int, int, int] | None:
        """``(rows, columns, chunk rows)`` of ``obsm/<key>``, or None when there is no such array."""
        obsm = open_zarr_group(self._url, self._storage_options, mode="r")[0]["obsm"]
        if key not in obsm:
            return None
        arr = obsm[key]
        return int(arr.shape[0]), int(arr.shape[1]) if arr.ndim > 1 else 1, int(arr.chunks[0])

    def create_obsm(self, key: str, n_cols: int, chunk_rows: int) -> None:
        """Create ``obsm/<key>`` (float32, ``n_obs x n_cols``, NaN until written), replacing any array there.

        Concurrent writers of :meth:`write_obsm` must each own whole chunks of ``chunk_rows`` rows.
        """
        obsm = open_zarr_group(self._url, self._storage_options, mode="r+")[0]["obsm"]
        if key in obsm:
            del obsm[key]
        arr = obsm.create_array(
            key,
            shape=(self.n_obs, n_cols),
            dtype=np.float32,
            chunks=(max(1, min(chunk_rows, self.n_obs)), n_cols),
            fill_value=np.nan,
        )
        arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})

    def delete_obsm(self, key: str) -> None:
        """Remove ``obsm/<key>`` if it exists."""
        obsm = open_zarr_group(self._url, self._storage_options, mode="r+")[0]["obsm"]
        if key in obsm:
            del obsm[key]

    def read_marks(self, name: str) -> np.ndarray | None:
        """The commit marks ``uns/<name>`` (uint64, 0 = not committed), or None when there are none."""
        root = open_zarr_group(self._url, self._storage_options, mode="r")[0]
        if "uns" not in root or name not in root["uns"]:
            return None
        return np.asarray(root["uns"][name][:], dtype=np.uint64)

    def create_marks(self, name: str, size: int) -> None:
        """Create ``size`` zero commit marks ``uns/<name>``, replacing any there.

        One uncompressed chunk per mark: each mark is its own file or object, written whole (zarr writes local
        files under a temporary name and renames them; an object-store PUT is atomic), so writers of different
        marks never touch the same object and a mark is either there or not.
        """
        root = open_zarr_group(self._url, self._storage_options, mode="r+")[0]
        if "uns" in root:
            uns = root["uns"]
        else:
            uns = root.create_group("uns", attributes={"encoding-type": "dict", "encoding-version": "0.1.0"})
        if name in uns:
            del uns[name]
        arr = uns.create_array(name, shape=(size,), chunks=(1,), dtype=np.uint64, fill_value=0, compressors=None)
        arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})

    def write_mark(self, name: str, index: int, value: int) -> None:
        """Set commit mark ``index`` of ``uns/<name>`` to ``value`` (0 removes it); see :meth:`create_marks`."""
        location, _ = resolve_location(self._url, self._storage_options, read_only=False)
        arr = zarr.open_array(location, path=f"uns/{name}", mode="r+")
        arr[index] = np.uint64(value)
