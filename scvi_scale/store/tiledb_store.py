"""The TileDB count store: layout, streaming writer, row reads as CSR, and the S3 config built from the environment.

Layout of a store at ``uri`` (a TileDB group; format version 1):

- ``X``: sparse 2-D array, dims ``cell`` (int64, tile ``cell_tile`` = 4096 rows, DoubleDelta + Zstd) and ``gene``
  (int32, one tile spanning all genes, Zstd), attribute ``count`` (uint16 when every count fits, else uint32;
  Zstd 3), row-major cells and tiles, capacity 65,536 non-zeros per data tile. Because a gene tile spans the whole
  row, TileDB's global order *is* CSR order, so the writer streams row blocks into one global-order query and the
  whole matrix lands in ONE fragment: no consolidation, hence none of its pitfalls (the timestamps file).
- ``obs``, ``var``: dense 1-D arrays, one attribute per column (``index`` holds the names); the array metadata
  ``columns`` (JSON) records names, dtypes and categories, so categoricals come back with the same categories
  and order, and strings (with missing values) come back as strings.
- ``obsm/<key>``: dense float32 ``n_obs x k`` arrays written by row region (:meth:`TileDBStore.write_obsm`).
- ``uns/<name>``: dense uint64 commit marks of the region writer (:mod:`scvi_scale.infer.writeback`), one
  fragment per mark written.
- group metadata: ``format_version``, ``count_dtype``, ``provenance`` (JSON), ``n_obs``, ``n_vars``, ``nnz`` and,
  written last, ``complete``. A store without it is refused with "... is incomplete ...".

Local stores are written under a temporary sibling name and renamed at the end, so an interrupted conversion
leaves nothing at ``uri``; on object stores (no rename) the commit flag alone marks completion.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scvi_scale.store.errors import InputError
from scvi_scale.store.lock import folder_lock
from scvi_scale.store.memory import StoreReads
from scvi_scale.store.tiledb_frame import read_frame as _read_frame
from scvi_scale.store.tiledb_frame import write_frame as _write_frame
from scvi_scale.store.validate import check_count_block, check_var_names

if TYPE_CHECKING:
    import anndata

__all__ = ["FORMAT_VERSION", "TileDBStore", "tiledb_config"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CELL_TILE = 4096
CAPACITY = 65_536
_COUNT_MAX = {"uint16": np.iinfo(np.uint16).max, "uint32": np.iinfo(np.uint32).max}


def _tiledb() -> Any:
    try:
        import tiledb
    except ImportError as exc:
        raise InputError("TileDB stores need the tiledb extra: pip install 'scvi-scale[tiledb]'") from exc
    return tiledb


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def tiledb_config(
    uri: str, config: dict[str, str] | None = None, storage_options: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """TileDB config for ``uri``: S3 settings (``storage_options``, then the environment) for s3://; ``config`` last.

    The endpoint (``storage_options["endpoint_url"]``, else ``AWS_ENDPOINT_URL`` or ``S3_ENDPOINT_URL``) sets
    ``vfs.s3.endpoint_override`` (host:port), ``vfs.s3.scheme`` (http for an http endpoint) and path-style
    addressing, as MinIO, moto and Ceph need; region, keys and session token come from the options or ``AWS_*``
    (:func:`~scvi_scale.store.open.s3_settings`), ``anon`` turns request signing off. Credentials are never logged.
    """
    from scvi_scale.store.open import s3_settings

    cfg = {"sm.consolidation.with_timestamps": "false", "py.init_buffer_bytes": str(64 * 2**20)}
    if uri.startswith("s3://"):
        s3 = s3_settings(storage_options)
        if s3.endpoint_url:
            parsed = urlparse(s3.endpoint_url if "://" in s3.endpoint_url else f"https://{s3.endpoint_url}")
            cfg["vfs.s3.endpoint_override"] = parsed.netloc.rsplit("@", 1)[-1]  # host:port, never user:password@
            cfg["vfs.s3.scheme"] = parsed.scheme or "https"
            cfg["vfs.s3.use_virtual_addressing"] = "false"
        if s3.anon:
            cfg["vfs.s3.no_sign_request"] = "true"
        else:
            keys = {"access_key_id": s3.key, "secret_access_key": s3.secret, "session_token": s3.token}
            cfg.update({f"vfs.s3.aws_{name}": value for name, value in keys.items() if value})
        if s3.region:
            cfg["vfs.s3.region"] = s3.region
        endpoint = cfg.get("vfs.s3.endpoint_override", "default")
        logger.debug("TileDB S3 config for %s: endpoint %s, region %s", uri, endpoint, s3.region or "default")
    cfg.update({str(k): str(v) for k, v in (config or {}).items()})
    return cfg


def _object_type(tiledb: Any, uri: str, ctx: Any, cfg: dict[str, str]) -> str | None:
    """``tiledb.object_type``, with an unreachable bucket or endpoint as one line saying what to check."""
    from scvi_scale.store.open import describe_open_error, secret_values

    try:
        return tiledb.object_type(uri, ctx=ctx)
    except tiledb.TileDBError as exc:
        raise InputError(describe_open_error(uri, exc, "TileDB store", secret_values(cfg))) from exc


class TileDBStore(StoreReads):
    """A count store in TileDB (local path or ``s3://``) with the read API of :class:`MemoryStore`.

    Parameters
    ----------
    uri
        A store written by :meth:`create`; opening raises :class:`InputError` when there is none, when it lacks
        the commit flag (an interrupted conversion) or when its format is newer.
    config
        Extra TileDB config entries, on top of :func:`tiledb_config`'s.
    storage_options
        Object-store options (endpoint_url, region, key, secret, token, anon), over the ``AWS_*`` variables.
    """

    def __init__(
        self, uri: str | os.PathLike[str], config: dict[str, str] | None = None, *,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        tiledb = _tiledb()
        self.uri = str(uri) if "://" in str(uri) else os.path.abspath(uri)
        self.source = self.uri
        self._config = tiledb_config(self.uri, config, storage_options)
        self._ctx = tiledb.Ctx(tiledb.Config(self._config))
        if _object_type(tiledb, self.uri, self._ctx, self._config) != "group":
            raise InputError(f"{self.uri}: no TileDB count store here; write one with TileDBStore.create")
        meta = self._read_metadata(tiledb)
        if not meta.get("complete"):
            raise InputError(
                f"{self.uri} is incomplete (no commit flag: its conversion was interrupted); rerun the conversion "
                "with overwrite=True"
            )
        if int(meta["format_version"]) > FORMAT_VERSION:
            raise InputError(f"{self.uri}: format version {meta['format_version']} is newer; upgrade scvi-scale")
        self.metadata: dict[str, Any] = meta
        self.n_obs, self.n_vars = int(meta["n_obs"]), int(meta["n_vars"])
        self.var = _read_frame(tiledb, f"{self.uri}/var", self._ctx)  # gene metadata, indexed by name
        self.var_names: np.ndarray = self.var.index.to_numpy().astype(str)  # gene names in column order
        self._obs: pd.DataFrame | None = None
        self._local = threading.local()

    # ---- pickling (Ray tasks, DataLoader workers): reopen handles on the other side ----

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "config": self._config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["config"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"TileDBStore({self.uri!r}, n_obs={self.n_obs}, n_vars={self.n_vars})"

    @property
    def obs(self) -> pd.DataFrame:
        """Cell metadata, read on first use."""
        if self._obs is None:
            self._obs = _read_frame(_tiledb(), f"{self.uri}/obs", self._ctx)
        return self._obs

    def _x(self) -> Any:
        # One open handle per thread: opening loads fragment metadata once, and threads never share a handle.
        arr = getattr(self._local, "x", None)
        if arr is None:
            arr = self._local.x = _tiledb().open(f"{self.uri}/X", ctx=self._ctx)
        return arr

    def _read_runs(self, starts: np.ndarray, stops: np.ndarray) -> sp.csr_matrix:
        """Rows of the half-open runs ``[starts[i], stops[i])`` (sorted, disjoint), stacked, in one query."""
        lengths = stops - starts
        n_rows = int(lengths.sum())
        if n_rows == 0:
            return sp.csr_matrix((0, self.n_vars), dtype=np.float32)
        # Global order is CSR order here and the fastest single-range read (~30 %), but TileDB refuses it for
        # multi-range queries; those read unordered and are sorted below if needed.
        order = "G" if starts.size == 1 else "U"
        ranges = [slice(int(a), int(b) - 1) for a, b in zip(starts, stops, strict=True)]  # multi_index is inclusive
        res = self._x().query(attrs=["count"], dims=["cell", "gene"], order=order).multi_index[ranges, :]
        cell, gene, count = res["cell"], res["gene"], res["count"]
        if order == "U" and cell.size > 1 and (np.diff(cell) < 0).any():
            perm = np.lexsort((gene, cell))
            cell, gene, count = cell[perm], gene[perm], count[perm]
        if starts.size == 1:
            pos = cell - starts[0]
        else:  # position in the stacked output: the run's offset plus the distance from its start
            run = np.searchsorted(starts, cell, side="right") - 1
            pos = cell + (np.cumsum(lengths) - lengths - starts)[run]
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(pos, minlength=n_rows), out=indptr[1:])
        return sp.csr_matrix((count.astype(np.float32), gene, indptr), shape=(n_rows, self.n_vars))

    def read_rows(self, idx: np.ndarray) -> sp.csr_matrix:
        """Rows ``idx`` (any order, repeats allowed) as CSR float32, in the order given.

        The sorted unique rows are grouped into contiguous runs, read in one query with one range per run.
        """
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_obs):
            raise IndexError(f"row index out of range [0, {self.n_obs})")
        uniq = np.unique(idx)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        starts = uniq[np.r_[0, breaks]] if uniq.size else uniq
        stops = uniq[np.r_[breaks - 1, uniq.size - 1]] + 1 if uniq.size else uniq
        x = self._read_runs(starts, stops)
        if uniq.size == idx.size and np.array_equal(uniq, idx):
            return x
        return x[np.searchsorted(uniq, idx)]

    def read_range(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR float32."""
        if not 0 <= start <= stop <= self.n_obs:
            raise IndexError(f"row range [{start}, {stop}) outside [0, {self.n_obs})")
        return self._read_runs(np.array([start], dtype=np.int64), np.array([stop], dtype=np.int64))

    # ---- obsm: dense float32 outputs written by row region ----

    def write_obsm(self, key: str, start: int, stop: int, values: np.ndarray) -> None:
        """Write rows ``start:stop`` of ``obsm/<key>`` (float32, ``n_obs x k``), creating the array on first use."""
        tiledb = _tiledb()
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not 0 <= start < stop <= self.n_obs or values.ndim != 2 or values.shape[0] != stop - start:
            raise ValueError(f"obsm '{key}': {values.shape} values for rows [{start}, {stop}) of {self.n_obs}")
        uri, k = f"{self.uri}/obsm/{key}", values.shape[1]
        if tiledb.object_type(uri, ctx=self._ctx) != "array":
            dims = [
                tiledb.Dim("cell", domain=(0, self.n_obs - 1), tile=min(CELL_TILE, self.n_obs), dtype=np.int64),
                tiledb.Dim("dim", domain=(0, k - 1), tile=k, dtype=np.int64),
            ]
            attr = tiledb.Attr("value", dtype=np.float32, filters=tiledb.FilterList([tiledb.ZstdFilter(3)]))
            try:
                tiledb.Array.create(uri, tiledb.ArraySchema(tiledb.Domain(*dims), attrs=[attr]), ctx=self._ctx)
            except tiledb.TileDBError:
                if tiledb.object_type(uri, ctx=self._ctx) != "array":  # lost a creation race: fine; else re-raise
                    raise
        with tiledb.open(uri, "w", ctx=self._ctx) as arr:
            width = arr.schema.domain.dim(1).domain[1] + 1
            if width != k:
                raise InputError(f"{self.uri}: obsm '{key}' has {width} columns, got values with {k}")
            arr[start:stop, 0:k] = values

    def read_obsm(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``obsm/<key>`` as float32 (unwritten rows read as NaN)."""
        stop = self.n_obs if stop is None else stop
        with _tiledb().open(f"{self.uri}/obsm/{key}", ctx=self._ctx) as arr:
            return arr[start:stop, :]["value"]

    # ---- prepare (scvi_scale.prep.prepare): gene columns in var, results in the group metadata ----

    def read_var(self) -> pd.DataFrame:
        """The ``var`` frame (gene names as index, with any columns ``prepare`` wrote)."""
        return self.var.copy()

    def write_var_columns(self, frame: pd.DataFrame, drop: Sequence[str] = ()) -> None:
        """Add or replace ``var`` columns (``frame``'s index must be the gene names) and remove ``drop``.

        The frame array is rewritten whole: locally under a temporary name, then swapped in by renames; in
        object storage (no rename) in place.
        """
        tiledb = _tiledb()
        if [str(v) for v in frame.index] != [str(v) for v in self.var_names]:
            raise ValueError("frame's index must be the store's gene names, in order")
        gone = [c for c in self.var.columns if c in {*frame.columns, *drop}]
        var = pd.concat([self.var.drop(columns=gone), frame.set_axis(self.var.index)], axis=1)
        if _is_local(self.uri):
            root = self.uri.removeprefix("file://")
            work = os.path.join(root, f".var.tmp-{os.getpid()}")
            shutil.rmtree(work, ignore_errors=True)
            _write_frame(tiledb, work, var, self._ctx, "var", self.source)
            _replace_dir(work, os.path.join(root, "var"))
        else:
            tiledb.VFS(ctx=self._ctx).remove_dir(f"{self.uri}/var")
            _write_frame(tiledb, f"{self.uri}/var", var, self._ctx, "var", self.source)
        self.var = var

    def _read_metadata(self, tiledb: Any, *, locked: bool = False) -> dict[str, Any]:
        """The group metadata as on disk now (entries as stored, ``provenance`` decoded from JSON).

        Read under the store's shared lock (local stores) unless the caller holds the exclusive one: TileDB
        writes a metadata file in place, and a reader that lists it half written fails to open the group.
        """
        with contextlib.nullcontext() if locked else folder_lock(self._lock_folder, shared=True):
            with tiledb.Group(self.uri, ctx=self._ctx) as group:
                meta = {key: group.meta[key] for key in group.meta.keys()}
        return {**meta, "provenance": json.loads(meta.get("provenance", "{}"))}

    @property
    def _lock_folder(self) -> str | None:
        return self.uri.removeprefix("file://") if _is_local(self.uri) else None

    def update_metadata(self, key: str, value: Any) -> None:
        """Set (or, with None, remove) one group metadata entry, stored as JSON; ``metadata`` is then re-read.

        TileDB writes each change as a metadata file of its own holding only this key, so writers of different
        keys keep each other's. On local disk writers (and readers) are serialized by a lock on the store's folder
        (:func:`~scvi_scale.store.lock.folder_lock`); object storage has no such lock and needs none
        for this (a metadata object is written whole, by one PUT).
        """
        tiledb = _tiledb()
        with folder_lock(self._lock_folder):
            with tiledb.Group(self.uri, ctx=self._ctx) as group:
                present = key in group.meta
            with tiledb.Group(self.uri, "w", ctx=self._ctx) as group:
                if value is not None:
                    group.meta[key] = json.dumps(value)
                elif present:
                    del group.meta[key]
            meta = self._read_metadata(tiledb, locked=True)  # with what other processes wrote meanwhile
        if value is not None:
            meta[key] = value  # as given, not its JSON text (other entries stay as stored, as after opening)
        self.metadata = meta

    @property
    def prepared(self) -> dict[str, Any] | None:
        """The ``prepare`` entry recorded by :func:`scvi_scale.prep.prepare.prepare`, or None."""
        value = self.metadata.get("prepare")
        return json.loads(value) if isinstance(value, str) else value

    # ---- the region writer (scvi_scale.infer.writeback): obsm arrays made up front, per-region commit marks ----

    def obsm_layout(self, key: str) -> tuple[int, int, int] | None:
        """``(rows, columns, tile rows)`` of ``obsm/<key>``, or None when there is no such array."""
        tiledb, uri = _tiledb(), f"{self.uri}/obsm/{key}"
        if tiledb.object_type(uri, ctx=self._ctx) != "array":
            return None
        with tiledb.open(uri, ctx=self._ctx) as arr:
            cells, cols = arr.schema.domain.dim(0), arr.schema.domain.dim(1)
            return int(cells.domain[1]) + 1, int(cols.domain[1]) + 1, int(cells.tile)

    def create_obsm(self, key: str, n_cols: int, chunk_rows: int) -> None:
        """Create ``obsm/<key>`` (float32, ``n_obs x n_cols``, tiles of ``chunk_rows`` rows), replacing any there.

        Each :meth:`write_obsm` is a fragment of its own, committed atomically; concurrent writers of disjoint
        row regions never conflict.
        """
        tiledb = _tiledb()
        self.delete_obsm(key)
        dims = [
            tiledb.Dim("cell", domain=(0, self.n_obs - 1), tile=max(1, min(chunk_rows, self.n_obs)), dtype=np.int64),
            tiledb.Dim("dim", domain=(0, n_cols - 1), tile=n_cols, dtype=np.int64),
        ]
        attr = tiledb.Attr("value", dtype=np.float32, filters=tiledb.FilterList([tiledb.ZstdFilter(3)]))
        schema = tiledb.ArraySchema(tiledb.Domain(*dims), attrs=[attr])
        tiledb.Array.create(f"{self.uri}/obsm/{key}", schema, ctx=self._ctx)

    def delete_obsm(self, key: str) -> None:
        """Remove ``obsm/<key>`` if it exists."""
        tiledb, uri = _tiledb(), f"{self.uri}/obsm/{key}"
        if tiledb.object_type(uri, ctx=self._ctx) is not None:
            tiledb.remove(uri, ctx=self._ctx)

    def read_marks(self, name: str) -> np.ndarray | None:
        """The commit marks ``uns/<name>`` (uint64, 0 = not committed), or None when there are none."""
        tiledb, uri = _tiledb(), f"{self.uri}/uns/{name}"
        if tiledb.object_type(uri, ctx=self._ctx) != "array":
            return None
        with tiledb.open(uri, ctx=self._ctx) as arr:
            return np.asarray(arr[:]["token"], dtype=np.uint64)

    def create_marks(self, name: str, size: int) -> None:
        """Create ``size`` zero commit marks ``uns/<name>`` (a dense uint64 array), replacing any there.

        Each :meth:`write_mark` is a one-cell fragment, which TileDB commits atomically (locally and on S3).
        """
        tiledb, uns = _tiledb(), f"{self.uri}/uns"
        if tiledb.object_type(uns, ctx=self._ctx) is None:
            tiledb.Group.create(uns, ctx=self._ctx)
        if tiledb.object_type(f"{uns}/{name}", ctx=self._ctx) is not None:
            tiledb.remove(f"{uns}/{name}", ctx=self._ctx)
        dim = tiledb.Dim("region", domain=(0, max(size, 1) - 1), tile=1, dtype=np.int64)
        schema = tiledb.ArraySchema(tiledb.Domain(dim), attrs=[tiledb.Attr("token", dtype=np.uint64, fill=0)])
        tiledb.Array.create(f"{uns}/{name}", schema, ctx=self._ctx)

    def write_mark(self, name: str, index: int, value: int) -> None:
        """Set commit mark ``index`` of ``uns/<name>`` to ``value`` (0 clears it); see :meth:`create_marks`."""
        with _tiledb().open(f"{self.uri}/uns/{name}", "w", ctx=self._ctx) as arr:
            arr[index : index + 1] = {"token": np.array([value], dtype=np.uint64)}

    # ---- writing ----

    @classmethod
    def create(
        cls, uri: str | os.PathLike[str], var_names: Sequence[str] | np.ndarray, obs: pd.DataFrame,
        chunks: Iterable[sp.spmatrix | sp.sparray | np.ndarray], *, var: pd.DataFrame | None = None,
        source_names: Sequence[str] = (), count_dtype: str = "uint32", overwrite: bool = False,
        config: dict[str, str] | None = None, cell_tile: int = CELL_TILE,
        storage_options: Mapping[str, Any] | None = None, provenance_extra: Mapping[str, Any] | None = None,
    ) -> TileDBStore:  # fmt: skip
        """Stream row blocks of counts into a new store (one fragment, no consolidation) and return it opened.

        Parameters
        ----------
        uri
            Where to write (local path or ``s3://``); local stores are built under a temporary sibling name.
        var_names, obs, var
            Unique gene names; cell metadata in row order; optional gene metadata (index replaced by the names).
        chunks
            Row blocks in row order (CSR, other sparse, or dense), each checked with :func:`check_count_block`
            (errors name the global row); an exception from the iterator aborts the write and leaves no store.
        source_names
            Input files, recorded in the provenance and named in messages.
        count_dtype
            ``"uint16"`` (smaller, faster; counts up to 65,535) or ``"uint32"``.
        overwrite, config, cell_tile
            Replace an existing store; extra TileDB config; rows per space tile of ``X``.
        storage_options
            Object-store options for ``s3://`` (see :class:`TileDBStore`).
        provenance_extra
            More provenance fields (gene space, batch key, per-input rows), read once all blocks are consumed
            and written before the commit flag.
        """
        tiledb = _tiledb()
        uri = str(uri) if "://" in str(uri) else os.path.abspath(uri)
        source = source_names[0] if len(source_names) == 1 else uri
        if count_dtype not in _COUNT_MAX:
            raise InputError(f"{source}: count_dtype must be one of {sorted(_COUNT_MAX)}, got {count_dtype!r}")
        names_g = check_var_names(var_names, source, None if var is None else var.shape[0])
        n_obs, n_vars = int(obs.shape[0]), int(names_g.shape[0])
        if n_obs == 0 or n_vars == 0:
            raise InputError(f"{source}: nothing to write ({n_obs} cells x {n_vars} genes)")
        cfg = tiledb_config(uri, config, storage_options)
        ctx = tiledb.Ctx(tiledb.Config(cfg))
        exists = _object_type(tiledb, uri, ctx, cfg) is not None or (_is_local(uri) and os.path.exists(uri))
        if exists and not overwrite:
            raise InputError(f"{uri} already exists; pass overwrite=True (--overwrite) to replace it")
        if _is_local(uri):
            parent, name = os.path.split(uri)
            os.makedirs(parent, exist_ok=True)
            work = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
            shutil.rmtree(work, ignore_errors=True)
        else:
            work = uri
            if exists:
                tiledb.VFS(ctx=ctx).remove_dir(uri)
        try:
            tiledb.Group.create(work, ctx=ctx)
            nnz = _write_counts(tiledb, f"{work}/X", chunks, ctx, n_obs, names_g, obs, source, count_dtype, cell_tile)
            _write_frame(tiledb, f"{work}/obs", obs, ctx, "obs", source)
            var_frame = pd.DataFrame(index=pd.Index(names_g)) if var is None else var.set_axis(pd.Index(names_g))
            _write_frame(tiledb, f"{work}/var", var_frame, ctx, "var", source)
            tiledb.Group.create(f"{work}/obsm", ctx=ctx)
            provenance = {"source_names": [str(s) for s in source_names], "tiledb_py": tiledb.__version__,
                          "created": datetime.now(UTC).isoformat(timespec="seconds"),
                          **(provenance_extra or {})}  # fmt: skip
            with tiledb.Group(work, "w", ctx=ctx) as group:
                for member in ("X", "obs", "var", "obsm"):
                    group.add(member, name=member, relative=True)
                group.meta.update(
                    format_version=FORMAT_VERSION, count_dtype=count_dtype, provenance=json.dumps(provenance),
                    n_obs=n_obs, n_vars=n_vars, nnz=nnz,
                )  # fmt: skip
            with tiledb.Group(work, "w", ctx=ctx) as group:
                group.meta["complete"] = 1  # last: a store without it never opens
            if work != uri:
                _replace_dir(work, uri)
        except BaseException:
            if work != uri:
                shutil.rmtree(work, ignore_errors=True)
            raise
        logger.info("wrote TileDB store %s (%d cells x %d genes, %d non-zeros)", uri, n_obs, n_vars, nnz)
        return cls(uri, config, storage_options=storage_options)

    @classmethod
    def from_anndata(
        cls, adata: anndata.AnnData, uri: str | os.PathLike[str], chunk_rows: int = 65_536, *,
        layer: str | None = None, source: str = "<AnnData>", overwrite: bool = False,
        config: dict[str, str] | None = None, storage_options: Mapping[str, Any] | None = None,
    ) -> TileDBStore:  # fmt: skip
        """Write an AnnData's counts (``X`` or ``layers[layer]``), ``obs`` and ``var`` to a new store.

        The counts are stored as uint16 when every count fits, else uint32.
        """
        x = adata.X if layer is None else adata.layers[layer]
        if x is None:
            raise InputError(f"{source}: X is empty (None); choose a layer with counts")
        x = sp.csr_matrix(x.to_memory() if hasattr(x, "to_memory") else x)
        count_dtype = "uint16" if x.nnz == 0 or x.data.max() <= _COUNT_MAX["uint16"] else "uint32"
        blocks = (x[s : s + chunk_rows] for s in range(0, x.shape[0], chunk_rows))
        return cls.create(
            uri, adata.var_names, adata.obs, blocks, var=adata.var, source_names=[source],
            count_dtype=count_dtype, overwrite=overwrite, config=config, storage_options=storage_options,
        )  # fmt: skip


def _write_counts(tiledb: Any, uri: str, chunks: Iterable[Any], ctx: Any, n_obs: int, names_g: np.ndarray,
                  obs: pd.DataFrame, source: str, count_dtype: str, cell_tile: int) -> int:  # fmt: skip
    """Create ``X`` and stream the chunks into one global-order write (one fragment); return the non-zero count."""
    import tiledb.libtiledb as lt

    n_vars, dtype = names_g.shape[0], np.dtype(count_dtype)
    dims = [
        tiledb.Dim("cell", domain=(0, n_obs - 1), tile=min(cell_tile, n_obs), dtype=np.int64,
                   filters=tiledb.FilterList([tiledb.DoubleDeltaFilter(), tiledb.ZstdFilter(3)])),
        tiledb.Dim("gene", domain=(0, n_vars - 1), tile=n_vars, dtype=np.int32,
                   filters=tiledb.FilterList([tiledb.ZstdFilter(3)])),
    ]  # fmt: skip
    attr = tiledb.Attr("count", dtype=dtype, filters=tiledb.FilterList([tiledb.ZstdFilter(3)]))
    schema = tiledb.ArraySchema(
        domain=tiledb.Domain(*dims), attrs=[attr], sparse=True, cell_order="row-major", tile_order="row-major",
        capacity=CAPACITY, allows_duplicates=False,
    )  # fmt: skip
    tiledb.Array.create(uri, schema, ctx=ctx)
    obs_names = obs.index.astype(str).to_numpy()
    start = nnz = 0
    with tiledb.open(uri, "w", ctx=ctx) as arr:
        query = lt.Query(lt.Context(arr.ctx), arr.array, lt.QueryType.WRITE)
        query.layout = lt.LayoutType.GLOBAL_ORDER  # rows in order + one gene tile = CSR order
        for chunk in chunks:
            block = sp.csr_matrix(chunk)
            stop = start + block.shape[0]
            if block.shape[1] != n_vars:
                raise InputError(f"{source}: a block at row {start} has {block.shape[1]} genes, expected {n_vars}")
            if stop > n_obs:
                raise InputError(f"{source}: the count blocks hold more than the {n_obs} rows of obs")
            if not block.has_canonical_format:
                block = block.copy()
                block.sum_duplicates()
            total_n = check_count_block(block, source, names_g, row_offset=start, obs_names=obs_names)
            if (total_n == 0).any():
                row = start + int(np.argmax(total_n == 0))
                raise InputError(
                    f"{source}: row {row} ('{obs_names[row]}') has zero total counts; scVI needs a positive "
                    "library size, so filter empty cells (and their obs rows) out before converting"
                )
            if block.nnz and block.data.max() > _COUNT_MAX[count_dtype]:
                pos = int(np.argmax(block.data > _COUNT_MAX[count_dtype]))
                row = start + int(np.searchsorted(block.indptr, pos, side="right") - 1)
                raise InputError(
                    f"{source}: count {block.data[pos]:g} at row {row} does not fit {count_dtype}; use uint32"
                )
            keep = block.data != 0
            cells = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(block.indptr))[keep]
            genes = block.indices.astype(np.int32)[keep]
            counts = block.data.astype(dtype)[keep]
            if cells.size:
                query.set_data_buffer("cell", cells, np.uint64(cells.size))
                query.set_data_buffer("gene", genes, np.uint64(genes.size))
                query.set_data_buffer("count", counts, np.uint64(counts.size))
                query._submit()
            start, nnz = stop, nnz + int(cells.size)
        if start != n_obs:
            raise InputError(f"{source}: the count blocks hold {start} rows but obs has {n_obs}")
        query.finalize()
    return nnz


def _replace_dir(work: str, uri: str) -> None:
    """Move ``work`` to ``uri``, replacing an old store only once the new one is in place."""
    old = None
    if os.path.exists(uri):
        old = f"{uri}.old-{os.getpid()}"
        os.replace(uri, old)
    os.replace(work, uri)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
